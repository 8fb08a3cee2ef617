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
    "1.2.840.10008.1.2.4.50", // JPEG Baseline
    "1.2.840.10008.1.2.4.51", // JPEG Extended (8-bit)
    "1.2.840.10008.1.2.4.57", // JPEG Lossless
    "1.2.840.10008.1.2.4.70", // JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80", // JPEG-LS Lossless (CharLS)
    "1.2.840.10008.1.2.4.81", // JPEG-LS Near-Lossless (CharLS)
    "1.2.840.10008.1.2.4.90", // JPEG 2000 Lossless (openjp2)
    "1.2.840.10008.1.2.4.91", // JPEG 2000 (openjp2)
    "1.2.840.10008.1.2.5",    // RLE Lossless
];
/// Lossy sources: the transcoded object keeps Lossy Image Compression "01".
const LOSSY: &[&str] = &[
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91",
];

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
    obj.transcode(target)
        .map_err(|e| format!("cannot decode {from}: {e}"))?;
    if LOSSY.contains(&from) {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        obj.put(DataElement::new(
            dicom_dictionary_std::tags::LOSSY_IMAGE_COMPRESSION,
            VR::CS,
            PrimitiveValue::from("01"),
        ));
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
}
