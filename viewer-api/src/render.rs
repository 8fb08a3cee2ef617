//! From a stored instance to an 8-bit picture: decode one frame, apply the
//! Modality LUT (rescale slope/intercept), the VOI (window), the presentation
//! (MONOCHROME1 inverts), convert colour to RGB, scale, encode PNG or JPEG.
//!
//! Pure and synchronous: callers run it off the async runtime.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

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
    /// A named preset, its window in modality units (Hounsfield for CT).
    Preset {
        name: &'static str,
        center: f64,
        width: f64,
    },
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
    /// The frame reduced by [`OVERVIEW`] in each direction, made by the
    /// first reduction that needs it and kept with the frame (in the frame
    /// cache), so thumbnails of a cached frame read 1/16 of its pixels.
    overview: std::sync::OnceLock<(Vec<u16>, u32, u32)>,
}

/// The reduction factor of [`Mono::overview`].
const OVERVIEW: u32 = 4;

impl Frame {
    /// Memory held, for the cache's budget (a monochrome frame's overview
    /// included before it exists).
    pub fn bytes(&self) -> usize {
        match &self.pixels {
            Pixels::Mono(m) => m.patterns.len() * 2 * 17 / 16,
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
    // Whole-factor reductions average k x k blocks: for monochrome, of
    // stored values before the lookup (as DCMTK scales before its VOI
    // transformation), so a thumbnail looks up 1/k^2 of the pixels.
    let k = (frame.width / new_w).min(frame.height / new_h);
    let (samples, gray, width, height, window): (Cow<'_, [u8]>, _, _, _, _) = match &frame.pixels {
        Pixels::Mono(m) => {
            let (lut, window) = m.lut(&spec.voi);
            let (samples, w, h) = if k >= 2 {
                let (reduced, w, h) = m.reduce(frame.width, frame.height, k);
                let looked_up = reduced.iter().map(|&p| lut[usize::from(p)]).collect();
                (looked_up, w, h)
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
        overview: std::sync::OnceLock::new(),
    })
}

impl Mono {
    /// The frame's stored values averaged over `k` x `k` blocks. Factors
    /// that are multiples of [`OVERVIEW`] start from the overview (so the
    /// same request always takes the same path, cached or not).
    fn reduce(&self, width: u32, height: u32, k: u32) -> (Cow<'_, [u16]>, u32, u32) {
        if !k.is_multiple_of(OVERVIEW) {
            let (v, w, h) = self.box_reduce(&self.patterns, width, height, k);
            return (Cow::Owned(v), w, h);
        }
        let (overview, ow, oh) = self
            .overview
            .get_or_init(|| self.box_reduce(&self.patterns, width, height, OVERVIEW));
        if k == OVERVIEW {
            return (Cow::Borrowed(overview), *ow, *oh);
        }
        let (v, w, h) = self.box_reduce(overview, *ow, *oh, k / OVERVIEW);
        (Cow::Owned(v), w, h)
    }

    /// Averages `k` x `k` blocks of `patterns` (stored values, two's
    /// complement when signed), rounding to nearest, and returns their bit
    /// patterns; a trailing partial block is dropped. Columns are summed a
    /// whole row at a time so the compiler can vectorize the bulk of it.
    fn box_reduce(
        &self,
        patterns: &[u16],
        width: u32,
        height: u32,
        k: u32,
    ) -> (Vec<u16>, u32, u32) {
        let (out_w, out_h) = ((width / k) as usize, (height / k) as usize);
        let (k, width) = (k as usize, width as usize);
        let area = (k * k) as i64;
        // Sign extension by shifts: (p << s) as i16 >> s.
        let shift = if self.signed {
            16 - u32::from(self.bits_stored)
        } else {
            0
        };
        let mask = (1u32 << self.bits_stored) - 1;
        let by_shift = (area as u64)
            .is_power_of_two()
            .then(|| area.trailing_zeros());
        let mut out = Vec::with_capacity(out_w * out_h);
        let mut columns = vec![0i32; out_w * k];
        for oy in 0..out_h {
            columns.iter_mut().for_each(|c| *c = 0);
            for y in oy * k..oy * k + k {
                let row = &patterns[y * width..][..out_w * k];
                if self.signed {
                    for (c, &p) in columns.iter_mut().zip(row) {
                        *c += i32::from(((p << shift) as i16) >> shift);
                    }
                } else {
                    for (c, &p) in columns.iter_mut().zip(row) {
                        *c += i32::from(p);
                    }
                }
            }
            out.extend(columns.chunks_exact(k).map(|block| {
                let sum: i64 = block.iter().map(|&c| i64::from(c)).sum::<i64>() + area / 2;
                // A shift is the same floor as div_euclid, without a division
                // per output pixel, for the usual 2x2, 4x4, 8x8 blocks.
                let mean = match by_shift {
                    Some(bits) => sum >> bits,
                    None => sum.div_euclid(area),
                };
                (mean as u32 & mask) as u16
            }));
        }
        (out, out_w as u32, out_h as u32)
    }

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
    fn lut(&self, voi: &Voi) -> (Arc<[u8]>, (f64, f64)) {
        let (center, width, function) = match voi {
            Voi::Window { center, width } | Voi::Preset { center, width, .. } => {
                (*center, *width, VoiLutFunction::Linear)
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
        let key = LutKey {
            bits_stored: self.bits_stored,
            signed: self.signed,
            invert: self.invert,
            function: std::mem::discriminant(&function),
            numbers: [self.rescale.0, self.rescale.1, center, width].map(f64::to_bits),
        };
        let mut recent = RECENT_LUTS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = recent.iter().position(|(k, _)| *k == key) {
            let entry = recent.remove(i);
            let lut = entry.1.clone();
            recent.push(entry);
            return (lut, (center, width));
        }
        drop(recent);
        let mut lut = vec![0u8; 1 << self.bits_stored];
        for (pattern, out) in lut.iter_mut().enumerate() {
            let y = voi_value(self.value_of(pattern as u32), center, width, function);
            *out = if self.invert { 255 - y } else { y };
        }
        let lut: Arc<[u8]> = lut.into();
        let mut recent = RECENT_LUTS.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() >= LUTS_KEPT {
            recent.remove(0);
        }
        recent.push((key, lut.clone()));
        (lut, (center, width))
    }
}

/// What a display table depends on (floats by their bits).
#[derive(Debug, Clone, PartialEq, Eq)]
struct LutKey {
    bits_stored: u16,
    signed: bool,
    invert: bool,
    function: std::mem::Discriminant<VoiLutFunction>,
    numbers: [u64; 4],
}

/// Display tables built recently, least recent first: the frames of a
/// series share one (at most 64 KiB each).
static RECENT_LUTS: Mutex<Vec<(LutKey, Arc<[u8]>)>> = Mutex::new(Vec::new());
const LUTS_KEPT: usize = 16;

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

    fn mono(patterns: Vec<u16>, bits_stored: u16, signed: bool) -> Mono {
        Mono {
            patterns,
            bits_stored,
            signed,
            rescale: (1.0, 0.0),
            file_window: None,
            function: VoiLutFunction::Linear,
            invert: false,
            overview: std::sync::OnceLock::new(),
        }
    }

    #[test]
    fn reduction_averages_stored_values() {
        // 4x2, 12-bit unsigned, reduced by 2: means 15.5 -> 16 and 201.5 -> 202.
        let m = mono(vec![0, 10, 200, 201, 20, 32, 202, 203], 12, false);
        assert_eq!(m.box_reduce(&m.patterns, 4, 2, 2), (vec![16, 202], 2, 1));
        // 12-bit signed: -2, -1, 1, 0 (patterns 0xFFE, 0xFFF, 1, 0) average
        // to -0.5, rounded up to 0; -4 x 4 stays -4 (pattern 0xFFC).
        let s = mono(
            vec![0xFFE, 0xFFF, 0xFFC, 0xFFC, 1, 0, 0xFFC, 0xFFC],
            12,
            true,
        );
        assert_eq!(s.box_reduce(&s.patterns, 4, 2, 2), (vec![0, 0xFFC], 2, 1));
        // 16-bit signed extremes do not overflow.
        let e = mono(vec![0x8000; 16], 16, true);
        assert_eq!(e.box_reduce(&e.patterns, 4, 4, 4), (vec![0x8000], 1, 1));
        // 3x3 blocks divide: a sum of -13 over 9 rounds to -1; 2 stays 2.
        #[rustfmt::skip]
        let d = mono(vec![
            0xFFF, 0xFFF, 0xFFE, 2, 2, 2,
            0xFFF, 0xFFF, 0xFFE, 2, 2, 2,
            0xFFF, 0xFFE, 0xFFE, 2, 2, 2,
        ], 12, true);
        assert_eq!(d.box_reduce(&d.patterns, 6, 3, 3).0, vec![0xFFF, 2]);
        // A trailing partial block is dropped.
        let t = mono((0..15).collect(), 12, false);
        assert_eq!(t.box_reduce(&t.patterns, 5, 3, 2), (vec![3, 5], 2, 1));
    }

    #[test]
    fn display_tables_are_shared_only_by_equal_parameters() {
        let a = mono(vec![0; 4], 12, false);
        let b = mono(vec![7; 4], 12, false);
        let window = Voi::Window {
            center: 2047.0,
            width: 1000.0,
        };
        let (t1, _) = a.lut(&window);
        let (t2, _) = b.lut(&window);
        assert!(Arc::ptr_eq(&t1, &t2), "same parameters, one table");
        let inverted = Mono {
            invert: true,
            ..mono(vec![0; 4], 12, false)
        };
        let (t3, _) = inverted.lut(&window);
        assert_eq!(t3[0], 255 - t1[0]);
        let (t4, _) = a.lut(&Voi::Window {
            center: 100.0,
            width: 1000.0,
        });
        assert_ne!(t4[600], t1[600]);
    }

    #[test]
    fn reductions_by_multiples_of_four_go_through_the_overview() {
        // 16x16 ramp: reduced by 8 = the overview (by 4) reduced by 2.
        let m = mono((0..256).collect(), 12, false);
        let (by8, w, h) = m.reduce(16, 16, 8);
        let (overview, ow, oh) = m.box_reduce(&m.patterns, 16, 16, 4);
        assert_eq!((w, h), (2, 2));
        assert_eq!(by8.into_owned(), m.box_reduce(&overview, ow, oh, 2).0);
        assert_eq!(
            m.overview.get().map(|o| o.0.clone()),
            Some(overview.clone())
        );
        // By 4 is the overview itself; by 3 reads the full frame.
        assert_eq!(m.reduce(16, 16, 4).0.into_owned(), overview);
        assert_eq!(
            m.reduce(16, 16, 3).0.into_owned(),
            m.box_reduce(&m.patterns, 16, 16, 3).0
        );
    }

    #[test]
    fn ybr_gray_is_gray() {
        assert_eq!(ybr_to_rgb(100, 128, 128), [100, 100, 100]);
    }
}
