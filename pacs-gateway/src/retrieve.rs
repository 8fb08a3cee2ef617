//! C-GET and C-MOVE (PS3.4 C.4.2, C.4.3): which instances an identifier
//! names, and how each is sent: as stored whenever the receiver accepted the
//! stored transfer syntax, otherwise transcoded between the uncompressed
//! syntaxes (implicit/explicit VR little endian, explicit big endian,
//! deflated as a source). Compressed pixel data is not decoded yet: such a
//! sub-operation fails with the reason logged.

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

/// The instances an identifier names (scoped to `clinic` when given).
pub(crate) fn list(
    storage: &storage::Storage,
    identifier: &[u8],
    transfer_syntax: &str,
    model: &str,
    clinic: Option<String>,
) -> Result<Vec<Item>, String> {
    let request = crate::find::parse(identifier, transfer_syntax, model, clinic)?;
    let mut query = request.query;
    if query
        .conditions
        .iter()
        .all(|(_, m)| *m == storage::query::Matcher::Universal)
    {
        return Err("a retrieve needs at least one key with a value".into());
    }
    query.level = Level::Image;
    query.returns = vec![Key::SopInstanceUid];
    let reader = storage.reader().map_err(|e| e.to_string())?;
    let mut uids = Vec::new();
    reader
        .find(&query, |row| {
            uids.extend(row);
            true
        })
        .map_err(|e| e.to_string())?;
    let mut items = Vec::with_capacity(uids.len());
    for uid in uids {
        if let Some(r) = reader.instance(&uid).map_err(|e| e.to_string())? {
            items.push(Item {
                sop_class_uid: r.sop_class_uid,
                sop_instance_uid: r.sop_instance_uid,
                transfer_syntax: r.transfer_syntax,
                blob_key: r.blob_key,
                dataset_offset: r.dataset_offset,
            });
        }
    }
    Ok(items)
}

const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const EXPLICIT_BE: &str = "1.2.840.10008.1.2.2";
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";

/// True when `from` can be rewritten as `to` without a pixel codec.
pub(crate) fn can_transcode(from: &str, to: &str) -> bool {
    matches!(from, IMPLICIT_LE | EXPLICIT_LE | EXPLICIT_BE | DEFLATED)
        && matches!(to, IMPLICIT_LE | EXPLICIT_LE | EXPLICIT_BE)
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

/// The dataset to send for `item` in `to_ts`, from its stored blob.
pub(crate) async fn dataset_for(
    storage: &storage::Storage,
    item: &Item,
    to_ts: &str,
) -> Result<Vec<u8>, String> {
    let blob = storage
        .blobs()
        .get(&item.blob_key)
        .await
        .map_err(|e| e.to_string())?;
    let stored = blob
        .get(item.dataset_offset as usize..)
        .ok_or("stored object shorter than its header")?;
    if to_ts == item.transfer_syntax {
        return Ok(stored.to_vec());
    }
    let (stored, from, to) = (
        stored.to_vec(),
        item.transfer_syntax.clone(),
        to_ts.to_string(),
    );
    tokio::task::spawn_blocking(move || transcode(&stored, &from, &to))
        .await
        .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcodes_between_uncompressed_syntaxes_only() {
        assert!(can_transcode(EXPLICIT_LE, IMPLICIT_LE));
        assert!(can_transcode(DEFLATED, EXPLICIT_LE));
        assert!(!can_transcode("1.2.840.10008.1.2.5", EXPLICIT_LE));
        assert!(!can_transcode(EXPLICIT_LE, DEFLATED));
    }
}
