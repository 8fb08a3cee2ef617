//! RLE Lossless (PS3.5 Annex G) encoder: one fragment per frame, a 64-byte
//! header then one PackBits segment per byte plane (most significant byte
//! of each sample first, then each colour component).

/// Encode one frame. `samples` holds the frame's values in pixel order;
/// `bytes_per_sample` is 1 or 2 and `components` 1 or 3 (interleaved, i.e.
/// Planar Configuration 0 in the uncompressed form).
pub(crate) fn encode_frame(
    samples: &FrameSamples<'_>,
    rows: usize,
    cols: usize,
    components: usize,
) -> Vec<u8> {
    let bytes_per_sample = match samples {
        FrameSamples::U8(_) => 1,
        FrameSamples::U16(_) => 2,
    };
    let n_segments = components * bytes_per_sample;
    assert!(n_segments <= 15, "RLE allows at most 15 segments");
    let mut segments = Vec::with_capacity(n_segments);
    for comp in 0..components {
        for byte in 0..bytes_per_sample {
            // byte 0 = most significant
            let plane: Vec<u8> = match samples {
                FrameSamples::U8(v) => v.iter().skip(comp).step_by(components).copied().collect(),
                FrameSamples::U16(v) => v
                    .iter()
                    .skip(comp)
                    .step_by(components)
                    .map(|s| if byte == 0 { (s >> 8) as u8 } else { *s as u8 })
                    .collect(),
            };
            debug_assert_eq!(plane.len(), rows * cols);
            let mut seg = Vec::with_capacity(plane.len() / 2);
            // each row is encoded separately and never crosses a row boundary
            for row in plane.chunks(cols) {
                pack_bits(row, &mut seg);
            }
            if seg.len() % 2 == 1 {
                seg.push(0);
            }
            segments.push(seg);
        }
    }
    let mut out = Vec::with_capacity(64 + segments.iter().map(Vec::len).sum::<usize>());
    out.extend_from_slice(&(n_segments as u32).to_le_bytes());
    let mut offset = 64u32;
    for seg in &segments {
        out.extend_from_slice(&offset.to_le_bytes());
        offset += seg.len() as u32;
    }
    for _ in n_segments..15 {
        out.extend_from_slice(&0u32.to_le_bytes());
    }
    for seg in &segments {
        out.extend_from_slice(seg);
    }
    out
}

/// The samples of one frame.
pub(crate) enum FrameSamples<'a> {
    U8(&'a [u8]),
    U16(&'a [u16]),
}

/// PackBits: header n in 0..=127 means n+1 literal bytes follow; n in
/// -127..=-1 means the next byte repeats 1-n times; -128 is never written.
fn pack_bits(src: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < src.len() {
        // length of the run starting at i
        let mut run = 1;
        while i + run < src.len() && run < 128 && src[i + run] == src[i] {
            run += 1;
        }
        if run >= 2 {
            out.push((257 - run) as u8); // -(run-1) as a byte
            out.push(src[i]);
            i += run;
            continue;
        }
        // literal: extend until a run of 2+ starts or 128 bytes
        let start = i;
        let mut len = 0;
        while i < src.len() && len < 128 {
            if i + 1 < src.len() && src[i + 1] == src[i] {
                break;
            }
            i += 1;
            len += 1;
        }
        if len == 0 {
            // a run of length >= 2 starts right here; handled next loop
            continue;
        }
        out.push((len - 1) as u8);
        out.extend_from_slice(&src[start..start + len]);
    }
}

/// Decoder for tests: returns each segment's decoded bytes.
#[cfg(test)]
pub(crate) fn decode_segments(frame: &[u8]) -> Vec<Vec<u8>> {
    let n = u32::from_le_bytes(frame[0..4].try_into().unwrap()) as usize;
    let offsets: Vec<usize> = (0..n)
        .map(|i| u32::from_le_bytes(frame[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize)
        .collect();
    (0..n)
        .map(|s| {
            let end = if s + 1 < n {
                offsets[s + 1]
            } else {
                frame.len()
            };
            let data = &frame[offsets[s]..end];
            let mut out = Vec::new();
            let mut i = 0;
            while i < data.len() {
                let h = data[i] as i8;
                i += 1;
                if h >= 0 {
                    let len = h as usize + 1;
                    if i + len > data.len() {
                        break; // trailing pad byte
                    }
                    out.extend_from_slice(&data[i..i + len]);
                    i += len;
                } else if h != -128 {
                    let len = (1 - i32::from(h)) as usize;
                    out.extend(std::iter::repeat_n(data[i], len));
                    i += 1;
                }
            }
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn round_trip_u16() {
        let mut rng = Rng::new(9);
        let (rows, cols) = (17, 33);
        let v: Vec<u16> = (0..rows * cols)
            .map(|i| {
                if i % 7 < 3 {
                    1000
                } else {
                    rng.below(4096) as u16
                }
            })
            .collect();
        let enc = encode_frame(&FrameSamples::U16(&v), rows, cols, 1);
        assert_eq!(enc.len() % 2, 0);
        let segs = decode_segments(&enc);
        assert_eq!(segs.len(), 2);
        for (k, s) in v.iter().enumerate() {
            assert_eq!(segs[0][k], (s >> 8) as u8);
            assert_eq!(segs[1][k], *s as u8);
        }
    }

    #[test]
    fn round_trip_rgb_and_long_runs() {
        let (rows, cols) = (4, 300);
        let mut v = vec![7u8; rows * cols * 3];
        v[10] = 1;
        v[11] = 2;
        let enc = encode_frame(&FrameSamples::U8(&v), rows, cols, 3);
        let segs = decode_segments(&enc);
        assert_eq!(segs.len(), 3);
        for (c, seg) in segs.iter().enumerate() {
            let plane: Vec<u8> = v.iter().skip(c).step_by(3).copied().collect();
            assert_eq!(*seg, plane);
        }
    }
}
