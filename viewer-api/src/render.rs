//! From a stored instance to an 8-bit picture: decode one frame, apply the
//! Modality LUT (rescale slope/intercept), the VOI (window), the presentation
//! (MONOCHROME1 inverts), convert colour to RGB, scale, encode PNG or JPEG.
//!
//! Pure and synchronous: callers run it off the async runtime.

use std::borrow::Cow;

use dicom_object::DefaultDicomObject;
use dicom_pixeldata::{
    DecodedPixelData, PhotometricInterpretation, PixelDecoder, PixelRepresentation,
    PlanarConfiguration, VoiLutFunction,
};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};

/// Output encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Png,
    Jpeg { quality: u8 },
}

/// Which window (VOI) to apply to a monochrome frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Voi {
    /// Given by the caller.
    Window { center: f64, width: f64 },
    /// A named preset in modality units (Hounsfield for CT).
    Preset(&'static str),
    /// The file's first window, else the frame's full range.
    Default,
}

/// Named presets: (name, center, width), Hounsfield units.
pub const PRESETS: &[(&str, f64, f64)] = &[
    ("abdomen", 40.0, 400.0),
    ("bone", 400.0, 1800.0),
    ("brain", 40.0, 80.0),
    ("lung", -600.0, 1500.0),
    ("mediastinum", 50.0, 350.0),
];

/// What to render.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// 0-based frame index.
    pub frame: u32,
    pub voi: Voi,
    pub format: Format,
    /// Fit within these bounds (0: no bound), keeping the aspect ratio.
    pub max_width: u32,
    pub max_height: u32,
}

/// A rendered, encoded frame.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// Shared, so a cached frame goes out without a copy.
    pub data: bytes::Bytes,
    pub width: u32,
    pub height: u32,
    /// The window applied (monochrome only).
    pub window: Option<(f64, f64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("the instance has no pixel data")]
    NoPixelData,
    #[error("frame {frame} is out of range (the instance has {frames})")]
    FrameOutOfRange { frame: u32, frames: u32 },
    #[error("transfer syntax {0} cannot be decoded by this build")]
    UnsupportedSyntax(String),
    #[error("cannot render: {0}")]
    Unsupported(String),
    #[error("pixel data cannot be decoded: {0}")]
    Decode(String),
}

/// Number of frames the object declares (1 when absent).
pub fn number_of_frames(obj: &DefaultDicomObject) -> u32 {
    obj.element_opt(dicom_dictionary_std::tags::NUMBER_OF_FRAMES)
        .ok()
        .flatten()
        .and_then(|e| e.to_int::<u32>().ok())
        .unwrap_or(1)
        .max(1)
}

/// One decoded frame before any display choice: what the frame cache keeps,
/// so that a new window, size or format needs no second decode.
#[derive(Debug, Clone)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    pixels: Pixels,
}

#[derive(Debug, Clone)]
enum Pixels {
    Mono(Mono),
    /// Interleaved 8-bit RGB.
    Rgb(Vec<u8>),
}

/// Monochrome stored values and what turns them into display values.
#[derive(Debug, Clone)]
struct Mono {
    /// Stored bit patterns, masked to Bits Stored (at most 16).
    patterns: Vec<u16>,
    bits_stored: u16,
    signed: bool,
    /// Rescale slope and intercept (the Modality LUT).
    rescale: (f64, f64),
    /// The file's first window, and its VOI LUT function.
    file_window: Option<(f64, f64)>,
    function: VoiLutFunction,
    /// MONOCHROME1: low values are white.
    invert: bool,
}

impl Frame {
    /// Memory held, for the cache's budget.
    pub fn bytes(&self) -> usize {
        match &self.pixels {
            Pixels::Mono(m) => m.patterns.len() * 2,
            Pixels::Rgb(v) => v.len(),
        }
    }
}

/// Decodes frame `frame` (0-based) of `obj`.
pub fn decode(obj: &DefaultDicomObject, frame: u32) -> Result<Frame, RenderError> {
    let ts = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_string();
    // Decodable: uncompressed, deflated, JPEG (baseline, extended,
    // lossless), RLE, JPEG-LS (CharLS) and JPEG 2000 (openjp2).
    use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
    let decodable = dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(&ts)
        .is_some_and(|t| t.can_decode_all());
    if !decodable {
        return Err(RenderError::UnsupportedSyntax(ts));
    }
    if obj
        .element_opt(dicom_dictionary_std::tags::PIXEL_DATA)
        .ok()
        .flatten()
        .is_none()
    {
        return Err(RenderError::NoPixelData);
    }
    let frames = number_of_frames(obj);
    if frame >= frames {
        return Err(RenderError::FrameOutOfRange {
            frame: frame + 1,
            frames,
        });
    }
    let stored_pi = obj
        .element_opt(dicom_dictionary_std::tags::PHOTOMETRIC_INTERPRETATION)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    const RLE: &str = "1.2.840.10008.1.2.5";
    let native = matches!(
        ts.as_str(),
        "1.2.840.10008.1.2"
            | "1.2.840.10008.1.2.1"
            | "1.2.840.10008.1.2.2"
            | "1.2.840.10008.1.2.1.99"
    );
    if native && stored_pi == "YBR_FULL_422" && frames > 1 {
        // dicom-pixeldata slices native frames as three full samples per
        // pixel; 4:2:2 frames are two thirds of that.
        return Err(RenderError::Unsupported(
            "multi-frame YBR_FULL_422 without compression".into(),
        ));
    }
    let decoded = obj
        .decode_pixel_data_frame(frame)
        .map_err(|e| RenderError::Decode(e.to_string()))?;
    let (width, height) = (decoded.columns(), decoded.rows());
    let pixels = width as usize * height as usize;
    if pixels == 0 {
        return Err(RenderError::Unsupported("empty frame".into()));
    }
    let pixels = match decoded.samples_per_pixel() {
        1 => Pixels::Mono(monochrome(&decoded, pixels)?),
        3 => {
            let mut rgb = color(&decoded, pixels)?;
            // The RLE decoder reports RGB but leaves YBR_FULL samples as they were.
            if ts == RLE && stored_pi == "YBR_FULL" {
                for px in rgb.chunks_exact_mut(3) {
                    px.copy_from_slice(&ybr_to_rgb(px[0], px[1], px[2]));
                }
            }
            Pixels::Rgb(rgb)
        }
        n => {
            return Err(RenderError::Unsupported(format!("{n} samples per pixel")));
        }
    };
    Ok(Frame {
        width,
        height,
        pixels,
    })
}

/// Applies the display choices of `spec` to a decoded frame: VOI through a
/// lookup table (monochrome), scaling, encoding.
pub fn display(frame: &Frame, spec: &Spec) -> Result<Rendered, RenderError> {
    let started = std::time::Instant::now();
    let (new_w, new_h) = fit(frame.width, frame.height, spec);
    // Whole-factor reductions average k x k blocks (for monochrome, of
    // display values, in the same pass as the lookup).
    let k = (frame.width / new_w).min(frame.height / new_h);
    let (samples, gray, width, height, window): (Cow<'_, [u8]>, _, _, _, _) = match &frame.pixels {
        Pixels::Mono(m) => {
            let (lut, window) = m.lut(&spec.voi);
            let (samples, w, h) = if k >= 2 {
                lut_box_reduce(&m.patterns, &lut, frame.width, frame.height, k)
            } else {
                let all = m.patterns.iter().map(|&p| lut[usize::from(p)]).collect();
                (all, frame.width, frame.height)
            };
            (Cow::Owned(samples), true, w, h, Some(window))
        }
        Pixels::Rgb(rgb) if k >= 2 => {
            let (samples, w, h) = box_reduce(rgb, 3, frame.width, frame.height, k);
            (Cow::Owned(samples), false, w, h, None)
        }
        Pixels::Rgb(rgb) => (
            Cow::Borrowed(&rgb[..]),
            false,
            frame.width,
            frame.height,
            None,
        ),
    };
    let looked_up = std::time::Instant::now();
    let (samples, width, height) = resize(samples, gray, width, height, new_w, new_h)?;
    let scaled = std::time::Instant::now();
    let data = encode(&samples, gray, width, height, spec.format)?;
    tracing::trace!(
        lut_us = (looked_up - started).as_micros() as u64,
        scale_us = (scaled - looked_up).as_micros() as u64,
        encode_us = scaled.elapsed().as_micros() as u64,
        "display stages"
    );
    Ok(Rendered {
        data: data.into(),
        width,
        height,
        window,
    })
}

/// The stored bit patterns of a monochrome frame, masked to Bits Stored.
fn monochrome(decoded: &DecodedPixelData<'_>, pixels: usize) -> Result<Mono, RenderError> {
    let bits_allocated = decoded.bits_allocated();
    let bits_stored = decoded.bits_stored().clamp(1, 16);
    if !matches!(
        decoded.photometric_interpretation(),
        PhotometricInterpretation::Monochrome1 | PhotometricInterpretation::Monochrome2
    ) {
        return Err(RenderError::Unsupported(format!(
            "photometric interpretation {} with one sample per pixel",
            decoded.photometric_interpretation()
        )));
    }
    let data = decoded
        .frame_data(0)
        .map_err(|e| RenderError::Decode(e.to_string()))?;
    let mask = ((1u32 << bits_stored) - 1) as u16;
    let short = || RenderError::Decode("pixel data shorter than the frame".into());
    let patterns: Vec<u16> = match bits_allocated {
        8 if data.len() < pixels => return Err(short()),
        16 if data.len() < pixels * 2 => return Err(short()),
        8 => data[..pixels]
            .iter()
            .map(|&b| u16::from(b) & mask)
            .collect(),
        16 => data[..pixels * 2]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) & mask)
            .collect(),
        n => {
            return Err(RenderError::Unsupported(format!(
                "{n} bits allocated for monochrome"
            )));
        }
    };
    Ok(Mono {
        patterns,
        bits_stored,
        signed: decoded.pixel_representation() == PixelRepresentation::Signed,
        rescale: decoded
            .rescale()
            .ok()
            .and_then(|r| r.first().copied())
            .map_or((1.0, 0.0), |r| (r.slope, r.intercept)),
        file_window: decoded
            .window()
            .ok()
            .flatten()
            .and_then(|w| w.first().copied())
            .filter(|w| w.width > 0.0)
            .map(|w| (w.center, w.width)),
        function: decoded
            .voi_lut_function()
            .ok()
            .flatten()
            .and_then(|f| f.first().copied())
            .unwrap_or_default(),
        invert: *decoded.photometric_interpretation() == PhotometricInterpretation::Monochrome1,
    })
}

impl Mono {
    /// The modality value (after rescale) of a stored bit pattern.
    fn value_of(&self, pattern: u32) -> f64 {
        let bits = self.bits_stored;
        let stored = if self.signed && pattern & (1 << (bits - 1)) != 0 {
            i64::from(pattern) - (1i64 << bits)
        } else {
            i64::from(pattern)
        };
        stored as f64 * self.rescale.0 + self.rescale.1
    }

    /// A table from stored bit pattern to display value, with Modality LUT,
    /// VOI and MONOCHROME1 folded in (one load per pixel), and the window used.
    fn lut(&self, voi: &Voi) -> (Vec<u8>, (f64, f64)) {
        let (center, width, function) = match voi {
            Voi::Window { center, width } => (*center, *width, VoiLutFunction::Linear),
            Voi::Preset(name) => {
                let (_, c, w) = PRESETS
                    .iter()
                    .find(|(n, _, _)| n == name)
                    .copied()
                    .unwrap_or(("", 40.0, 400.0));
                (c, w, VoiLutFunction::Linear)
            }
            Voi::Default => match self.file_window {
                Some((c, w)) => (c, w, self.function),
                None => {
                    // The frame's full range of modality values.
                    let (lo, hi) = self
                        .patterns
                        .iter()
                        .map(|&p| self.value_of(u32::from(p)))
                        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                            (lo.min(v), hi.max(v))
                        });
                    (
                        (lo + hi) / 2.0 + 0.5,
                        (hi - lo + 1.0).max(1.0),
                        VoiLutFunction::Linear,
                    )
                }
            },
        };
        let mut lut = vec![0u8; 1 << self.bits_stored];
        for (pattern, out) in lut.iter_mut().enumerate() {
            let y = voi_value(self.value_of(pattern as u32), center, width, function);
            *out = if self.invert { 255 - y } else { y };
        }
        (lut, (center, width))
    }
}

/// The VOI LUT functions of PS3.3 C.11.2.1.2 with an 8-bit output range.
pub fn voi_value(x: f64, center: f64, width: f64, function: VoiLutFunction) -> u8 {
    let y = match function {
        VoiLutFunction::Linear => {
            let w = width.max(1.0);
            if x <= center - 0.5 - (w - 1.0) / 2.0 {
                0.0
            } else if x > center - 0.5 + (w - 1.0) / 2.0 {
                255.0
            } else {
                ((x - (center - 0.5)) / (w - 1.0) + 0.5) * 255.0
            }
        }
        VoiLutFunction::LinearExact => {
            let w = width.max(f64::MIN_POSITIVE);
            if x <= center - w / 2.0 {
                0.0
            } else if x > center + w / 2.0 {
                255.0
            } else {
                ((x - center) / w + 0.5) * 255.0
            }
        }
        VoiLutFunction::Sigmoid => 255.0 / (1.0 + (-4.0 * (x - center) / width.max(1.0)).exp()),
    };
    y.round().clamp(0.0, 255.0) as u8
}

/// Colour frames to interleaved 8-bit RGB.
fn color(decoded: &DecodedPixelData<'_>, pixels: usize) -> Result<Vec<u8>, RenderError> {
    let data = decoded
        .frame_data(0)
        .map_err(|e| RenderError::Decode(e.to_string()))?;
    let bytes_per_sample = match decoded.bits_allocated() {
        8 => 1,
        16 => 2,
        n => {
            return Err(RenderError::Unsupported(format!(
                "{n} bits allocated for colour"
            )));
        }
    };
    let sample = |i: usize| -> u8 {
        if bytes_per_sample == 1 {
            data[i]
        } else {
            // Keep the most significant byte of Bits Stored.
            let v = u16::from_le_bytes([data[2 * i], data[2 * i + 1]]);
            (v >> decoded.bits_stored().saturating_sub(8)) as u8
        }
    };
    let pi = decoded.photometric_interpretation();
    if *pi == PhotometricInterpretation::YbrFull422 {
        // Native 4:2:2: Y1 Y2 Cb Cr for each pair of pixels.
        if data.len() < pixels.div_ceil(2) * 4 * bytes_per_sample {
            return Err(RenderError::Decode(
                "pixel data shorter than the frame".into(),
            ));
        }
        let mut rgb = Vec::with_capacity(pixels * 3);
        for pair in 0..pixels.div_ceil(2) {
            let (cb, cr) = (sample(pair * 4 + 2), sample(pair * 4 + 3));
            rgb.extend_from_slice(&ybr_to_rgb(sample(pair * 4), cb, cr));
            if pair * 2 + 1 < pixels {
                rgb.extend_from_slice(&ybr_to_rgb(sample(pair * 4 + 1), cb, cr));
            }
        }
        return Ok(rgb);
    }
    if data.len() < pixels * 3 * bytes_per_sample {
        return Err(RenderError::Decode(
            "pixel data shorter than the frame".into(),
        ));
    }
    let planar = decoded.planar_configuration() == PlanarConfiguration::PixelFirst;
    let at = |p: usize, c: usize| -> u8 {
        if planar {
            sample(c * pixels + p)
        } else {
            sample(p * 3 + c)
        }
    };
    let ybr = match pi {
        PhotometricInterpretation::Rgb => false,
        PhotometricInterpretation::YbrFull => true,
        other => {
            return Err(RenderError::Unsupported(format!(
                "photometric interpretation {other}"
            )));
        }
    };
    let mut rgb = Vec::with_capacity(pixels * 3);
    for p in 0..pixels {
        let (a, b, c) = (at(p, 0), at(p, 1), at(p, 2));
        if ybr {
            rgb.extend_from_slice(&ybr_to_rgb(a, b, c));
        } else {
            rgb.extend_from_slice(&[a, b, c]);
        }
    }
    Ok(rgb)
}

/// YBR_FULL to RGB, PS3.3 C.7.6.3.1.2.
fn ybr_to_rgb(y: u8, cb: u8, cr: u8) -> [u8; 3] {
    let (y, cb, cr) = (f32::from(y), f32::from(cb) - 128.0, f32::from(cr) - 128.0);
    let clamp = |v: f32| v.round().clamp(0.0, 255.0) as u8;
    [
        clamp(y + 1.402 * cr),
        clamp(y - 0.344_136 * cb - 0.714_136 * cr),
        clamp(y + 1.772 * cb),
    ]
}

/// The size that fits the requested bounds, keeping the aspect ratio
/// (never enlarging).
fn fit(width: u32, height: u32, spec: &Spec) -> (u32, u32) {
    let bound_w = if spec.max_width == 0 {
        width
    } else {
        spec.max_width.min(width)
    };
    let bound_h = if spec.max_height == 0 {
        height
    } else {
        spec.max_height.min(height)
    };
    if bound_w == width && bound_h == height {
        return (width, height);
    }
    let ratio = (f64::from(bound_w) / f64::from(width)).min(f64::from(bound_h) / f64::from(height));
    (
        ((f64::from(width) * ratio).round() as u32).max(1),
        ((f64::from(height) * ratio).round() as u32).max(1),
    )
}

/// Interpolates to the final size what whole-factor reduction left over.
fn resize(
    samples: Cow<'_, [u8]>,
    gray: bool,
    width: u32,
    height: u32,
    new_w: u32,
    new_h: u32,
) -> Result<(Cow<'_, [u8]>, u32, u32), RenderError> {
    if (width, height) == (new_w, new_h) {
        return Ok((samples, width, height));
    }
    let samples = samples.into_owned();
    let filter = image::imageops::FilterType::Triangle;
    let bad = || RenderError::Decode("frame size does not match its pixel data".into());
    let out = if gray {
        let img = image::GrayImage::from_raw(width, height, samples).ok_or_else(bad)?;
        image::imageops::resize(&img, new_w, new_h, filter).into_raw()
    } else {
        let img = image::RgbImage::from_raw(width, height, samples).ok_or_else(bad)?;
        image::imageops::resize(&img, new_w, new_h, filter).into_raw()
    };
    Ok((Cow::Owned(out), new_w, new_h))
}

/// Looks up and averages `k` x `k` blocks of a monochrome frame in one pass.
fn lut_box_reduce(
    patterns: &[u16],
    lut: &[u8],
    width: u32,
    height: u32,
    k: u32,
) -> (Vec<u8>, u32, u32) {
    let (out_w, out_h) = ((width / k) as usize, (height / k) as usize);
    let (k, width) = (k as usize, width as usize);
    let area = (k * k) as u64;
    let mut out = Vec::with_capacity(out_w * out_h);
    let mut sums = vec![0u64; out_w];
    for oy in 0..out_h {
        sums.iter_mut().for_each(|s| *s = 0);
        for y in oy * k..oy * k + k {
            let row = &patterns[y * width..][..out_w * k];
            for (sum, block) in sums.iter_mut().zip(row.chunks_exact(k)) {
                *sum += block
                    .iter()
                    .map(|&p| u64::from(lut[usize::from(p)]))
                    .sum::<u64>();
            }
        }
        out.extend(sums.iter().map(|s| ((s + area / 2) / area) as u8));
    }
    (out, out_w as u32, out_h as u32)
}

/// Averages `k` x `k` blocks (a trailing partial block is dropped).
fn box_reduce(
    samples: &[u8],
    channels: usize,
    width: u32,
    height: u32,
    k: u32,
) -> (Vec<u8>, u32, u32) {
    let (out_w, out_h) = ((width / k) as usize, (height / k) as usize);
    let (k, width) = (k as usize, width as usize);
    let area = (k * k) as u64;
    let mut out = Vec::with_capacity(out_w * out_h * channels);
    let mut sums = vec![0u64; out_w * channels];
    for oy in 0..out_h {
        sums.iter_mut().for_each(|s| *s = 0);
        for y in oy * k..oy * k + k {
            let row = &samples[y * width * channels..][..out_w * k * channels];
            for (ox, block) in row.chunks_exact(k * channels).enumerate() {
                for (i, &v) in block.iter().enumerate() {
                    sums[ox * channels + i % channels] += u64::from(v);
                }
            }
        }
        out.extend(sums.iter().map(|s| ((s + area / 2) / area) as u8));
    }
    (out, out_w as u32, out_h as u32)
}

fn encode(
    samples: &[u8],
    gray: bool,
    width: u32,
    height: u32,
    format: Format,
) -> Result<Vec<u8>, RenderError> {
    let color = if gray {
        ExtendedColorType::L8
    } else {
        ExtendedColorType::Rgb8
    };
    let mut out = Vec::with_capacity(samples.len() / 2);
    let result = match format {
        Format::Png => {
            PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Sub)
                .write_image(samples, width, height, color)
        }
        Format::Jpeg { quality } => JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100))
            .write_image(samples, width, height, color),
    };
    result.map_err(|e| RenderError::Decode(format!("encoding failed: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_window_follows_the_standard() {
        // Window 40/400: [-160, 240] spans the output range.
        let f = VoiLutFunction::Linear;
        assert_eq!(voi_value(-1000.0, 40.0, 400.0, f), 0);
        assert_eq!(voi_value(-160.0, 40.0, 400.0, f), 0);
        assert_eq!(voi_value(240.0, 40.0, 400.0, f), 255);
        assert_eq!(voi_value(40.0, 40.0, 400.0, f), 128);
        assert_eq!(voi_value(3000.0, 40.0, 400.0, f), 255);
    }

    #[test]
    fn whole_factor_reduction_averages_blocks() {
        // 4x2 gray, reduced by 2: two blocks.
        let px = vec![0, 10, 200, 201, 20, 30, 202, 203];
        let (out, w, h) = box_reduce(&px, 1, 4, 2, 2);
        assert_eq!((w, h), (2, 1));
        assert_eq!(out, vec![15, 202]);
    }

    #[test]
    fn lookup_and_reduce_in_one_pass_equals_lookup_then_reduce() {
        let (w, h, k) = (12u32, 8u32, 4u32);
        let patterns: Vec<u16> = (0..w * h).map(|i| ((i * 37) % 4096) as u16).collect();
        let lut: Vec<u8> = (0..4096u32).map(|p| (p * 255 / 4095) as u8).collect();
        let looked_up: Vec<u8> = patterns.iter().map(|&p| lut[usize::from(p)]).collect();
        assert_eq!(
            lut_box_reduce(&patterns, &lut, w, h, k),
            box_reduce(&looked_up, 1, w, h, k)
        );
    }

    #[test]
    fn ybr_gray_is_gray() {
        assert_eq!(ybr_to_rgb(100, 128, 128), [100, 100, 100]);
    }
}
