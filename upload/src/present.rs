//! Which files the center already holds byte for byte, though the local
//! record does not know them (a new workstation, a lost record, a folder
//! sent by another tool). One C-FIND at IMAGE level per batch of SOP
//! Instance UIDs asks for the center's private key "SHA-256 of the
//! instance's current bytes" (`(0009,xx10)` under private creator
//! "CONSORTIUM CENTER"). The center keeps each instance as its own Part 10
//! header (`storage::part10::file_header`) followed by the dataset as
//! received, and hashes that; a file whose dataset, behind that header,
//! hashes to what the center returns for its UID is "already present": not
//! sent again over a weak link, only confirmed by storage commitment. Only
//! files whose UID the center knows are hashed here. A center that answers no such key (another
//! archive) makes nothing present, and everything is sent.

use std::collections::HashMap;

use consortium_dimse::client::{Association, ClientError, Proposed};
use consortium_dimse::{Response, field, status, tag};
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::Settings;
use crate::scan::Candidate;

const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
const PRIVATE_CREATOR: &str = "CONSORTIUM CENTER";
/// Our private block at `(0009,0010)`; the SHA-256 key is `(0009,1010)`.
const CREATOR_TAG: Tag = Tag(0x0009, 0x0010);
const SHA256_TAG: Tag = Tag(0x0009, 0x1010);
/// UIDs per query: a UI value's length is 16 bits in explicit VR, and 200
/// UIDs of at most 64 characters stay well under it.
const BATCH: usize = 200;
/// Largest identifier taken back.
const MAX_RESPONSE: usize = 64 << 10;

/// SHA-256 (lower-case hex) of the center's current bytes, per SOP Instance
/// UID, for those of `uids` the center holds and lets this clinic see; and
/// the error that ended the queries early (the answers before it are kept).
pub(crate) async fn held_by_center(
    settings: &Settings,
    uids: &[&str],
) -> (HashMap<String, String>, Option<ClientError>) {
    let mut held = HashMap::new();
    if uids.is_empty() {
        return (held, None);
    }
    let contexts = [Proposed {
        id: 1,
        abstract_syntax: STUDY_ROOT_FIND.to_string(),
        transfer_syntaxes: vec![EXPLICIT_VR_LE.into()],
    }];
    let mut assoc = match settings.associate(&contexts).await {
        Ok(a) => a,
        Err(e) => return (held, Some(e)),
    };
    if !assoc.accepted.contains_key(&1) {
        assoc.abort().await;
        return (held, None); // no C-FIND here: nothing is known to be present
    }
    let mut message_id = 0u16;
    for batch in uids.chunks(BATCH) {
        message_id = message_id.wrapping_add(1);
        if let Err(e) = query(&mut assoc, message_id, batch, &mut held).await {
            assoc.abort().await;
            return (held, Some(e));
        }
    }
    assoc.release().await;
    (held, None)
}

async fn query(
    assoc: &mut Association,
    message_id: u16,
    uids: &[&str],
    held: &mut HashMap<String, String>,
) -> Result<(), ClientError> {
    let rq = Response::request(field::C_FIND_RQ, message_id, true)
        .uid(tag::AFFECTED_SOP_CLASS_UID, STUDY_ROOT_FIND)
        .u16(tag::PRIORITY, 0)
        .encode();
    assoc
        .send_command_and_dataset(1, &rq, &identifier(uids)?)
        .await?;
    loop {
        let rsp = assoc.receive(MAX_RESPONSE).await?;
        match rsp.command.u16(tag::STATUS) {
            Some(status::PENDING | status::PENDING_OPTIONAL_KEYS_UNSUPPORTED) => {
                if let Some((uid, sha)) = rsp.dataset.as_deref().and_then(uid_and_sha256) {
                    held.insert(uid, sha);
                }
            }
            Some(status::SUCCESS) => return Ok(()),
            other => {
                return Err(ClientError::Protocol(format!(
                    "the center's C-FIND answered status {other:04X?}"
                )));
            }
        }
    }
}

/// IMAGE level, SOP Instance UID = the list, and the SHA-256 key to return.
fn identifier(uids: &[&str]) -> Result<Vec<u8>, ClientError> {
    let mut obj = InMemDicomObject::new_empty();
    obj.put(DataElement::new(
        tags::QUERY_RETRIEVE_LEVEL,
        VR::CS,
        PrimitiveValue::from("IMAGE"),
    ));
    obj.put(DataElement::new(
        tags::SOP_INSTANCE_UID,
        VR::UI,
        PrimitiveValue::from(uids.join("\\")),
    ));
    obj.put(DataElement::new(
        CREATOR_TAG,
        VR::LO,
        PrimitiveValue::from(PRIVATE_CREATOR),
    ));
    obj.put(DataElement::new(SHA256_TAG, VR::LO, PrimitiveValue::Empty));
    let ts = TransferSyntaxRegistry
        .get(EXPLICIT_VR_LE)
        .expect("explicit VR little endian is built in");
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts)
        .map_err(|e| ClientError::Protocol(format!("cannot encode the query: {e}")))?;
    Ok(out)
}

/// The SOP Instance UID and SHA-256 of one match, when the center answered
/// the SHA-256 under our creator.
fn uid_and_sha256(dataset: &[u8]) -> Option<(String, String)> {
    let ts = TransferSyntaxRegistry.get(EXPLICIT_VR_LE)?;
    let obj = InMemDicomObject::read_dataset_with_ts(dataset, ts).ok()?;
    let text = |tag| -> Option<String> {
        let e = obj.element_opt(tag).ok().flatten()?;
        Some(e.to_str().ok()?.trim_end_matches(['\0', ' ']).to_string())
    };
    // The key is ours only where the center put our creator in block 0x10.
    if text(CREATOR_TAG).as_deref() != Some(PRIVATE_CREATOR) {
        return None;
    }
    let sha = text(SHA256_TAG)?;
    let is_sha = sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit());
    is_sha.then(|| {
        (
            text(tags::SOP_INSTANCE_UID).unwrap_or_default(),
            sha.to_ascii_lowercase(),
        )
    })
}

/// The SHA-256 of the file (the local record's key) and of its dataset as
/// the center would keep it when sent as it is (behind the center's header,
/// built by this program: a center whose header differs, a later release,
/// only makes files be sent again). One streamed read, bounded memory.
pub(crate) fn hashes(c: &Candidate) -> std::io::Result<(String, String)> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(&c.path)?;
    let mut whole = Sha256::new();
    let mut kept = Sha256::new();
    kept.update(storage::part10::file_header(
        &c.sop_class_uid,
        &c.sop_instance_uid,
        &c.transfer_syntax,
    ));
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        whole.update(&buf[..n]);
        let skip = c.dataset_offset.saturating_sub(at).min(n as u64) as usize;
        kept.update(&buf[skip..n]);
        at += n as u64;
    }
    if at != c.size {
        return Err(std::io::Error::other(
            "the file changed since it was scanned",
        ));
    }
    Ok((
        storage::spool::hex(&whole.finalize()),
        storage::spool::hex(&kept.finalize()),
    ))
}
