//! C-GET and C-MOVE (PS3.4 C.4.2, C.4.3): which instances an identifier
//! names, and how each is sent: as stored whenever the receiver accepted the
//! stored transfer syntax, otherwise transcoded to explicit or implicit VR
//! little endian (or explicit big endian): from the other uncompressed
//! syntaxes and deflated by rewriting the dataset, from the compressed
//! syntaxes dicom-rs decodes (JPEG baseline/extended/lossless, RLE, JPEG-LS
//! through CharLS, JPEG 2000 through openjp2) by decoding the pixel data.
//! Others (HTJ2K, JPEG XL, MPEG) fail that sub-operation with the reason
//! logged.

use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use storage::query::{Key, Level};

pub(crate) const PATIENT_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.1.2";
pub(crate) const PATIENT_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.1.3";
pub(crate) const STUDY_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.2.2";
pub(crate) const STUDY_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";

pub(crate) fn is_get_class(uid: &str) -> bool {
    uid == PATIENT_ROOT_GET || uid == STUDY_ROOT_GET
}

pub(crate) fn is_move_class(uid: &str) -> bool {
    uid == PATIENT_ROOT_MOVE || uid == STUDY_ROOT_MOVE
}

/// The model (root) of a retrieve SOP class, for identifier checks.
pub(crate) fn find_model_of(uid: &str) -> &'static str {
    if uid == PATIENT_ROOT_GET || uid == PATIENT_ROOT_MOVE {
        crate::find::PATIENT_ROOT
    } else {
        crate::find::STUDY_ROOT
    }
}

/// One instance to send.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub(crate) sop_class_uid: String,
    pub(crate) sop_instance_uid: String,
    pub(crate) transfer_syntax: String,
    pub(crate) blob_key: String,
    pub(crate) dataset_offset: u64,
}

/// Why no list of instances came out of a retrieve identifier.
#[derive(Debug)]
pub(crate) enum ListError {
    /// The requester's identifier (answered 0xA900).
    Identifier(String),
    /// Ours: the index could not be read (answered 0xC000).
    Index(String),
}

impl From<storage::Error> for ListError {
    fn from(e: storage::Error) -> Self {
        ListError::Index(e.to_string())
    }
}

/// The instances an identifier names (scoped to `clinic` when given).
pub(crate) fn list(
    storage: &storage::Storage,
    identifier: &[u8],
    transfer_syntax: &str,
    model: &str,
    clinic: Option<String>,
) -> Result<Vec<Item>, ListError> {
    let request = crate::find::parse(identifier, transfer_syntax, model, clinic.clone())
        .map_err(ListError::Identifier)?;
    let mut query = request.query;
    if query
        .conditions
        .iter()
        .all(|(_, m)| *m == storage::query::Matcher::Universal)
    {
        return Err(ListError::Identifier(
            "a retrieve needs at least one key with a value".into(),
        ));
    }
    query.level = Level::Image;
    query.returns = vec![Key::SopInstanceUid];
    let reader = storage.reader()?;
    // One read transaction for the query and every lookup: a consistent
    // list, and the WAL's read locks taken once instead of per instance.
    let snapshot = reader
        .connection()
        .unchecked_transaction()
        .map_err(storage::Error::from)?;
    let mut uids = Vec::new();
    reader.find(&query, |row| {
        uids.extend(row);
        true
    })?;
    let mut items = Vec::with_capacity(uids.len());
    for uid in uids {
        let Some(r) = reader.instance(&uid)? else {
            continue;
        };
        // A clinic retrieves only the bytes it sent itself: not another
        // clinic's series filed under the same study, as the viewer and
        // storage commitment decide.
        let own = match &clinic {
            Some(c) => reader.sent_by(&uid, &r.sha256, c)?,
            None => true,
        };
        if own {
            items.push(Item {
                sop_class_uid: r.sop_class_uid,
                sop_instance_uid: r.sop_instance_uid,
                transfer_syntax: r.transfer_syntax,
                blob_key: r.blob_key,
                dataset_offset: r.dataset_offset,
            });
        }
    }
    drop(snapshot);
    Ok(items)
}

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

/// True when `from` can be rewritten as `to` (an uncompressed syntax).
pub(crate) fn can_transcode(from: &str, to: &str) -> bool {
    matches!(to, IMPLICIT_LE | EXPLICIT_LE | EXPLICIT_BE)
        && (is_uncompressed(from) || DECODABLE.contains(&from))
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
pub(crate) fn transcode(dataset: &[u8], from: &str, to: &str) -> Result<Vec<u8>, String> {
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

/// Starts reading `item`'s stored object, so it is in memory by the time
/// the previous sub-operation's C-STORE-RSP arrives.
pub(crate) fn read_ahead(
    storage: &storage::Storage,
    item: &Item,
) -> tokio::task::JoinHandle<storage::Result<bytes::Bytes>> {
    storage.blobs().prefetch(&item.blob_key)
}

/// The dataset of `item` (whose stored object is `blob`) in `to_ts`.
pub(crate) async fn dataset_for(
    blob: bytes::Bytes,
    item: &Item,
    to_ts: &str,
) -> Result<bytes::Bytes, String> {
    let offset = item.dataset_offset as usize;
    if offset > blob.len() {
        return Err("stored object shorter than its header".into());
    }
    if to_ts == item.transfer_syntax {
        // As stored: a view of the blob, no copy.
        return Ok(blob.slice(offset..));
    }
    let (from, to) = (item.transfer_syntax.clone(), to_ts.to_string());
    tracing::info!(
        sop_instance_uid = %item.sop_instance_uid,
        from = %from,
        to = %to,
        "transcoding for a receiver that did not accept the stored syntax"
    );
    let converted = tokio::task::spawn_blocking(move || {
        if is_uncompressed(&from) {
            transcode(&blob[offset..], &from, &to)
        } else {
            decode_to(&blob, &from, &to)
        }
    })
    .await
    .map_err(|e| e.to_string())??;
    Ok(converted.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcodes_between_uncompressed_syntaxes_only() {
        assert!(can_transcode(EXPLICIT_LE, IMPLICIT_LE));
        assert!(can_transcode(DEFLATED, EXPLICIT_LE));
        assert!(can_transcode("1.2.840.10008.1.2.5", EXPLICIT_LE));
        assert!(can_transcode("1.2.840.10008.1.2.4.90", EXPLICIT_LE));
        assert!(can_transcode("1.2.840.10008.1.2.4.80", EXPLICIT_LE));
        assert!(!can_transcode("1.2.840.10008.1.2.4.201", EXPLICIT_LE));
        assert!(!can_transcode(EXPLICIT_LE, DEFLATED));
    }
}
