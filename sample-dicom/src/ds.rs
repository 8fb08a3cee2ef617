//! Data set building helpers and the Part 10 file writer for every
//! transfer syntax the generator emits.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use dicom_core::value::{DataSetSequence, PixelFragmentSequence};
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::uids;
use dicom_encoding::encode::EncoderFor;
use dicom_encoding::encode::explicit_be::ExplicitVRBigEndianEncoder;
use dicom_encoding::encode::explicit_le::ExplicitVRLittleEndianEncoder;
use dicom_encoding::encode::implicit_le::ImplicitVRLittleEndianEncoder;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};

/// Implementation Class UID written in every file meta group.
pub(crate) const IMPLEMENTATION_CLASS_UID: &str = "2.25.254134795130297451360187012390542771711";
/// Implementation Version Name (SH, at most 16 characters).
pub(crate) const IMPLEMENTATION_VERSION_NAME: &str = "SAMPLE_DICOM_01";

/// The transfer syntaxes the generator writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ts {
    ImplicitLe,
    ExplicitLe,
    ExplicitBe,
    Deflated,
    Rle,
    JpegBaseline,
}

impl Ts {
    pub(crate) fn uid(self) -> &'static str {
        match self {
            Ts::ImplicitLe => uids::IMPLICIT_VR_LITTLE_ENDIAN,
            Ts::ExplicitLe => uids::EXPLICIT_VR_LITTLE_ENDIAN,
            // retired in the standard but still sent by some modalities
            Ts::ExplicitBe => "1.2.840.10008.1.2.2",
            Ts::Deflated => uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
            Ts::Rle => uids::RLE_LOSSLESS,
            Ts::JpegBaseline => uids::JPEG_BASELINE8_BIT,
        }
    }
}

/// A data set under construction.
#[derive(Clone, Debug)]
pub(crate) struct Ds {
    pub(crate) obj: InMemDicomObject,
}

impl Ds {
    pub(crate) fn new() -> Ds {
        Ds {
            obj: InMemDicomObject::new_empty(),
        }
    }

    /// A string value; an empty string gives a zero-length (type 2) value.
    pub(crate) fn s(&mut self, tag: Tag, vr: VR, value: impl AsRef<str>) -> &mut Ds {
        let value = value.as_ref();
        let pv = if value.is_empty() {
            PrimitiveValue::Empty
        } else {
            PrimitiveValue::from(value)
        };
        self.obj.put(DataElement::new(tag, vr, pv));
        self
    }

    /// A multi-valued string.
    pub(crate) fn m(&mut self, tag: Tag, vr: VR, values: &[&str]) -> &mut Ds {
        let v: Vec<String> = values.iter().map(|s| (*s).to_string()).collect();
        self.obj
            .put(DataElement::new(tag, vr, PrimitiveValue::Strs(v.into())));
        self
    }

    /// A multi-valued decimal string from numbers.
    pub(crate) fn dsv(&mut self, tag: Tag, values: &[f64]) -> &mut Ds {
        let v: Vec<String> = values.iter().map(|x| ds(*x)).collect();
        self.obj.put(DataElement::new(
            tag,
            VR::DS,
            PrimitiveValue::Strs(v.into()),
        ));
        self
    }

    pub(crate) fn us(&mut self, tag: Tag, value: u16) -> &mut Ds {
        self.obj
            .put(DataElement::new(tag, VR::US, PrimitiveValue::from(value)));
        self
    }

    pub(crate) fn ul(&mut self, tag: Tag, value: u32) -> &mut Ds {
        self.obj
            .put(DataElement::new(tag, VR::UL, PrimitiveValue::from(value)));
        self
    }

    pub(crate) fn at(&mut self, tag: Tag, value: Tag) -> &mut Ds {
        self.obj
            .put(DataElement::new(tag, VR::AT, PrimitiveValue::from(value)));
        self
    }

    pub(crate) fn seq(&mut self, tag: Tag, items: Vec<Ds>) -> &mut Ds {
        let items: Vec<InMemDicomObject> = items.into_iter().map(|d| d.obj).collect();
        self.obj
            .put(DataElement::new(tag, VR::SQ, DataSetSequence::from(items)));
        self
    }

    pub(crate) fn raw(&mut self, tag: Tag, vr: VR, value: PrimitiveValue) -> &mut Ds {
        self.obj.put(DataElement::new(tag, vr, value));
        self
    }

    /// Encapsulated Pixel Data: one fragment per frame with a Basic Offset
    /// Table; fragments are padded to even length.
    pub(crate) fn fragments(&mut self, frames: Vec<Vec<u8>>) -> &mut Ds {
        let mut offsets = Vec::with_capacity(frames.len());
        let mut pos = 0u32;
        let frames: Vec<Vec<u8>> = frames
            .into_iter()
            .map(|mut f| {
                if f.len() % 2 == 1 {
                    f.push(0);
                }
                offsets.push(pos);
                pos += 8 + f.len() as u32;
                f
            })
            .collect();
        self.obj.put(DataElement::new(
            dicom_dictionary_std::tags::PIXEL_DATA,
            VR::OB,
            PixelFragmentSequence::new(offsets, frames),
        ));
        self
    }

    pub(crate) fn get_str(&self, tag: Tag) -> String {
        self.obj
            .get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
            .unwrap_or_default()
    }
}

/// A code sequence item (Code Value, Coding Scheme Designator, Code Meaning).
pub(crate) fn code(value: &str, scheme: &str, meaning: &str) -> Ds {
    use dicom_dictionary_std::tags;
    let mut d = Ds::new();
    d.s(tags::CODE_VALUE, VR::SH, value)
        .s(tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme)
        .s(tags::CODE_MEANING, VR::LO, meaning);
    d
}

/// Format a number as a DICOM DS (at most 16 characters).
pub(crate) fn ds(x: f64) -> String {
    for decimals in (0..=6).rev() {
        let mut s = format!("{x:.decimals$}");
        if s.contains('.') {
            while s.ends_with('0') {
                s.pop();
            }
            if s.ends_with('.') {
                s.pop();
            }
        }
        if s == "-0" {
            s = "0".to_string();
        }
        if s.len() <= 16 {
            return s;
        }
    }
    format!("{x:.6e}")
}

/// Write `ds` as a Part 10 file: preamble, `DICM`, file meta group, then
/// the data set in `ts`. Returns the file size.
pub(crate) fn write_part10(path: &Path, ds: &Ds, ts: Ts, source_ae: &str) -> io::Result<u64> {
    let file = File::create(path)?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    write_header(&mut out, ds, ts, source_ae)?;
    write_dataset(&mut out, ds, ts)?;
    out.flush()?;
    drop(out);
    Ok(std::fs::metadata(path)?.len())
}

/// Preamble, magic code and file meta group.
pub(crate) fn write_header(
    out: &mut impl Write,
    ds: &Ds,
    ts: Ts,
    source_ae: &str,
) -> io::Result<()> {
    use dicom_dictionary_std::tags;
    let meta = FileMetaTableBuilder::new()
        .transfer_syntax(ts.uid())
        .media_storage_sop_class_uid(ds.get_str(tags::SOP_CLASS_UID))
        .media_storage_sop_instance_uid(ds.get_str(tags::SOP_INSTANCE_UID))
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME)
        .source_application_entity_title(source_ae)
        .build()
        .map_err(io::Error::other)?;
    out.write_all(&[0u8; 128])?;
    out.write_all(b"DICM")?;
    meta.write(&mut *out).map_err(io::Error::other)?;
    Ok(())
}

/// The data set alone, encoded per `ts` (deflated after the meta group for
/// the deflated syntax; encapsulated syntaxes use explicit VR LE).
pub(crate) fn write_dataset(out: &mut impl Write, ds: &Ds, ts: Ts) -> io::Result<()> {
    match ts {
        Ts::ImplicitLe => ds
            .obj
            .write_dataset(
                &mut *out,
                EncoderFor::new(ImplicitVRLittleEndianEncoder::default()),
            )
            .map_err(io::Error::other),
        Ts::ExplicitLe | Ts::Rle | Ts::JpegBaseline => ds
            .obj
            .write_dataset(
                &mut *out,
                EncoderFor::new(ExplicitVRLittleEndianEncoder::default()),
            )
            .map_err(io::Error::other),
        Ts::ExplicitBe => ds
            .obj
            .write_dataset(
                &mut *out,
                EncoderFor::new(ExplicitVRBigEndianEncoder::default()),
            )
            .map_err(io::Error::other),
        Ts::Deflated => {
            // PS3.5 A.5: raw deflate (RFC 1951, no zlib header) of the
            // explicit VR little endian data set
            let mut z = flate2::write::DeflateEncoder::new(&mut *out, flate2::Compression::new(6));
            ds.obj
                .write_dataset(
                    &mut z,
                    EncoderFor::new(ExplicitVRLittleEndianEncoder::default()),
                )
                .map_err(io::Error::other)?;
            z.finish()?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ds_fits() {
        assert_eq!(ds(-1024.0), "-1024");
        assert_eq!(ds(0.703125), "0.703125");
        assert_eq!(ds(-179.6484375), "-179.648438");
        assert_eq!(ds(-0.0), "0");
        assert!(ds(123_456_789.123_456).len() <= 16);
    }
}
