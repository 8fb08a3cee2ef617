//! An instance's dataset in another transfer syntax, for a receiver that
//! does not accept the one it is kept in (a C-GET or C-MOVE destination, or
//! a center refusing an upload's own syntax): explicit or implicit VR
//! little endian (or explicit big endian), from the other uncompressed
//! syntaxes and deflated by rewriting the dataset, and from the compressed
//! syntaxes dicom-rs decodes (JPEG baseline/extended/lossless, RLE, JPEG-LS
//! through CharLS, JPEG 2000 through openjp2) by decoding the pixel data.
//! Others (HTJ2K, JPEG XL, MPEG) cannot be converted.

use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const EXPLICIT_BE: &str = "1.2.840.10008.1.2.2";
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";

/// Compressed syntaxes whose pixel data we can decode.
const DECODABLE: &[&str] = &[
    JPEG_BASELINE,            // JPEG Baseline
    JPEG_EXTENDED,            // JPEG Extended (8-bit)
    "1.2.840.10008.1.2.4.57", // JPEG Lossless
    "1.2.840.10008.1.2.4.70", // JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80", // JPEG-LS Lossless (CharLS)
    JPEG_LS_NEAR_LOSSLESS,    // JPEG-LS Near-Lossless (CharLS)
    "1.2.840.10008.1.2.4.90", // JPEG 2000 Lossless (openjp2)
    JPEG_2000,                // JPEG 2000 (openjp2)
    "1.2.840.10008.1.2.5",    // RLE Lossless
];
const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
const JPEG_EXTENDED: &str = "1.2.840.10008.1.2.4.51";
const JPEG_LS_NEAR_LOSSLESS: &str = "1.2.840.10008.1.2.4.81";
const JPEG_2000: &str = "1.2.840.10008.1.2.4.91";

/// The Lossy Image Compression Method (0028,2114) of `obj`'s pixel data
/// when it is known to have been compressed lossily: always for JPEG
/// baseline and extended; for JPEG-LS near-lossless and JPEG 2000, which
/// also carry lossless codestreams, only when the first frame's codestream
/// says so (a NEAR above 0; an irreversible 9-7 wavelet). A reversible
/// JPEG 2000 codestream may still have been truncated, so it proves
/// nothing either way.
fn lossy_method(obj: &InMemDicomObject, from: &str) -> Option<&'static str> {
    let first_frame = || {
        obj.element(dicom_dictionary_std::tags::PIXEL_DATA)
            .ok()?
            .value()
            .fragments()?
            .first()
            .map(Vec::as_slice)
    };
    match from {
        JPEG_BASELINE | JPEG_EXTENDED => Some("ISO_10918_1"),
        JPEG_LS_NEAR_LOSSLESS => jpeg_ls_near(first_frame()?)
            .filter(|near| *near > 0)
            .map(|_| "ISO_14495_1"),
        JPEG_2000 => j2k_irreversible(first_frame()?)
            .filter(|irreversible| *irreversible)
            .map(|_| "ISO_15444_1"),
        _ => None,
    }
}

/// The NEAR parameter of the first scan of a JPEG-LS codestream (ISO/IEC
/// 14495-1 C.2.3): 0 is lossless.
fn jpeg_ls_near(codestream: &[u8]) -> Option<u8> {
    if !codestream.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let mut at = 2;
    while at + 4 <= codestream.len() {
        if codestream[at] != 0xFF {
            return None;
        }
        let marker = codestream[at + 1];
        let len = u16::from_be_bytes([codestream[at + 2], codestream[at + 3]]) as usize;
        let segment = codestream.get(at + 4..at + 2 + len)?;
        if marker == 0xDA {
            let components = *segment.first()? as usize;
            return segment.get(1 + 2 * components).copied();
        }
        at += 2 + len;
    }
    None
}

/// Whether the main header of a JPEG 2000 codestream (ISO/IEC 15444-1
/// A.6.1, A.6.2) codes any component with the irreversible 9-7 wavelet: a
/// component's COC, where there is one, overrides the COD.
fn j2k_irreversible(codestream: &[u8]) -> Option<bool> {
    if !codestream.starts_with(&[0xFF, 0x4F]) {
        return None;
    }
    let (mut at, mut components) = (2, 0usize);
    let mut default = None;
    let mut own: std::collections::HashMap<usize, u8> = Default::default();
    while at + 4 <= codestream.len() {
        let marker = u16::from_be_bytes([codestream[at], codestream[at + 1]]);
        if marker == 0xFF90 {
            break; // the first tile-part: the main header is over
        }
        let len = u16::from_be_bytes([codestream[at + 2], codestream[at + 3]]) as usize;
        let Some(segment) = codestream.get(at + 4..at + 2 + len) else {
            break; // cut short: judge by what was read
        };
        match marker {
            // SIZ: Rsiz, then eight 4-byte sizes and offsets, then Csiz.
            0xFF51 => {
                let csiz = segment.get(34..36)?;
                components = u16::from_be_bytes([csiz[0], csiz[1]]) as usize;
            }
            // COD: Scod, SGcod (4), then SPcod's transformation at 9.
            0xFF52 => default = Some(*segment.get(9)?),
            // COC: Ccoc (1 byte, or 2 with 257 components or more), Scoc,
            // then SPcoc's transformation 5 bytes on.
            0xFF53 => {
                let wide = components >= 257;
                let component = if wide {
                    u16::from_be_bytes([*segment.first()?, *segment.get(1)?]) as usize
                } else {
                    *segment.first()? as usize
                };
                own.insert(component, *segment.get(if wide { 7 } else { 6 })?);
            }
            _ => {}
        }
        at += 2 + len;
    }
    let default = default?;
    Some((0..components.max(1)).any(|c| own.get(&c).copied().unwrap_or(default) == 0))
}

fn is_uncompressed(ts: &str) -> bool {
    matches!(ts, IMPLICIT_LE | EXPLICIT_LE | EXPLICIT_BE | DEFLATED)
}

/// True for the syntaxes anything convertible can be rewritten as: explicit
/// or implicit VR little endian, explicit big endian.
pub fn is_conversion_target(ts: &str) -> bool {
    matches!(ts, IMPLICIT_LE | EXPLICIT_LE | EXPLICIT_BE)
}

/// True when `from` can be rewritten as `to` (an uncompressed syntax).
pub fn can_convert(from: &str, to: &str) -> bool {
    is_conversion_target(to) && (is_uncompressed(from) || DECODABLE.contains(&from))
}

/// Decodes the pixel data of a compressed Part 10 blob and writes its
/// dataset in `to`.
fn decode_to(blob: &[u8], from: &str, to: &str) -> Result<Vec<u8>, String> {
    use dicom_pixeldata::Transcode;
    let body = blob.get(128..).ok_or("stored object too short")?;
    let mut obj = dicom_object::OpenFileOptions::new()
        .from_reader(body)
        .map_err(|e| e.to_string())?;
    let target = TransferSyntaxRegistry
        .get(to)
        .ok_or("unknown target syntax")?;
    let lossy = lossy_method(&obj, from);
    obj.transcode(target)
        .map_err(|e| format!("cannot decode {from}: {e}"))?;
    // Once lossy, always said so (PS3.3 C.7.6.1.1.5); otherwise the
    // source's own value stands, "00" included.
    if let Some(method) = lossy {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        use dicom_dictionary_std::tags;
        obj.put(DataElement::new(
            tags::LOSSY_IMAGE_COMPRESSION,
            VR::CS,
            PrimitiveValue::from("01"),
        ));
        if obj.element(tags::LOSSY_IMAGE_COMPRESSION_METHOD).is_err() {
            obj.put(DataElement::new(
                tags::LOSSY_IMAGE_COMPRESSION_METHOD,
                VR::CS,
                PrimitiveValue::from(method),
            ));
        }
    }
    let mut out = Vec::with_capacity(blob.len() * 2);
    obj.write_dataset_with_ts(&mut out, target)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// Rewrites a dataset from one uncompressed syntax to another.
fn transcode(dataset: &[u8], from: &str, to: &str) -> Result<Vec<u8>, String> {
    let (source, read_ts): (std::borrow::Cow<'_, [u8]>, &str) = if from == DEFLATED {
        use std::io::Read;
        let mut inflated = Vec::new();
        flate2::read::DeflateDecoder::new(dataset)
            .read_to_end(&mut inflated)
            .map_err(|e| format!("cannot inflate: {e}"))?;
        (inflated.into(), EXPLICIT_LE)
    } else {
        (dataset.into(), from)
    };
    let read = TransferSyntaxRegistry
        .get(read_ts)
        .ok_or("unknown source syntax")?;
    let write = TransferSyntaxRegistry
        .get(to)
        .ok_or("unknown target syntax")?;
    let obj =
        InMemDicomObject::read_dataset_with_ts(&source[..], read).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(source.len() + 1024);
    obj.write_dataset_with_ts(&mut out, write)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// The dataset of the Part 10 object `file` (its dataset at
/// `dataset_offset`, in `from`) written in `to`.
pub fn convert(
    file: &[u8],
    dataset_offset: usize,
    from: &str,
    to: &str,
) -> Result<Vec<u8>, String> {
    let dataset = file
        .get(dataset_offset..)
        .ok_or("the object is shorter than its header")?;
    if is_uncompressed(from) {
        transcode(dataset, from, to)
    } else {
        decode_to(file, from, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_to_uncompressed_syntaxes_only() {
        assert!(can_convert(EXPLICIT_LE, IMPLICIT_LE));
        assert!(can_convert(DEFLATED, EXPLICIT_LE));
        assert!(can_convert("1.2.840.10008.1.2.5", EXPLICIT_LE));
        assert!(can_convert("1.2.840.10008.1.2.4.90", EXPLICIT_LE));
        assert!(can_convert("1.2.840.10008.1.2.4.80", EXPLICIT_LE));
        assert!(!can_convert("1.2.840.10008.1.2.4.201", EXPLICIT_LE));
        assert!(!can_convert(EXPLICIT_LE, DEFLATED));
    }

    /// SOC, a one-component SIZ, COD with `transform`, then optional COC.
    fn j2k(transform: u8, coc: Option<u8>) -> Vec<u8> {
        let mut cs = vec![0xFF, 0x4F, 0xFF, 0x51, 0x00, 41];
        cs.extend([0u8; 34]);
        cs.extend([0x00, 0x01, 0x07, 0x01, 0x01]); // Csiz 1, one component
        cs.extend([0xFF, 0x52, 0x00, 0x0C, 0, 0, 0, 1, 0, 5, 4, 4, 0, transform]);
        if let Some(t) = coc {
            cs.extend([0xFF, 0x53, 0x00, 0x09, 0, 0, 5, 4, 4, 0, t]);
        }
        cs.extend([0xFF, 0x90, 0x00, 0x0A]);
        cs
    }

    #[test]
    fn reads_lossiness_from_the_codestream() {
        assert_eq!(j2k_irreversible(&j2k(1, None)), Some(false));
        assert_eq!(j2k_irreversible(&j2k(0, None)), Some(true));
        // A component coded otherwise than the default.
        assert_eq!(j2k_irreversible(&j2k(1, Some(0))), Some(true));
        // Every component overridden to 5-3: reversible after all.
        assert_eq!(j2k_irreversible(&j2k(0, Some(1))), Some(false));
        assert_eq!(j2k_irreversible(b"\0\0\0\x0CjP  "), None); // a JP2 file, not a codestream
        // JPEG-LS: SOI, then SOS with one component and NEAR.
        let jls = |near| vec![0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x08, 1, 1, 0, near, 0, 0];
        assert_eq!(jpeg_ls_near(&jls(0)), Some(0));
        assert_eq!(jpeg_ls_near(&jls(3)), Some(3));
        // Truncated anywhere: unknown, never a panic.
        for cut in 0..j2k(0, Some(1)).len() {
            let _ = j2k_irreversible(&j2k(0, Some(1))[..cut]);
        }
        for cut in 0..jls(2).len() {
            let _ = jpeg_ls_near(&jls(2)[..cut]);
        }
        assert_eq!(jpeg_ls_near(&jls(2)[..9]), None);
    }
}
