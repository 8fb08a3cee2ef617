//! C-GET and C-MOVE (PS3.4 C.4.2, C.4.3): which instances an identifier
//! names, and how each is sent: as stored whenever the receiver accepted the
//! stored transfer syntax, otherwise converted (`storage::transcode`) to an
//! uncompressed syntax it accepted; when none can be, that sub-operation
//! fails with the reason logged.

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

/// The instances an identifier names (scoped to `clinic` when given), and
/// the identifier's level and keys for the audit trail.
pub(crate) fn list(
    storage: &storage::Storage,
    identifier: &[u8],
    transfer_syntax: &str,
    model: &str,
    clinic: Option<String>,
) -> Result<(Vec<Item>, String), ListError> {
    let request = crate::find::parse(identifier, transfer_syntax, model, clinic)
        .map_err(ListError::Identifier)?;
    let what = request.describe();
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
    // A clinic's query scope already keeps only the instances whose current
    // bytes it sent (not another clinic's series filed under the same
    // study), the rule of the viewer and of storage commitment.
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
        items.push(Item {
            sop_class_uid: r.sop_class_uid,
            sop_instance_uid: r.sop_instance_uid,
            transfer_syntax: r.transfer_syntax,
            blob_key: r.blob_key,
            dataset_offset: r.dataset_offset,
        });
    }
    drop(snapshot);
    Ok((items, what))
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
    // A transcode holds the whole object decoded in memory (a multi-frame
    // one can be gigabytes) and is CPU-bound: one per core at a time, so
    // many retrieves for receivers that take no compressed syntax queue
    // here instead of exhausting memory.
    let turn = TRANSCODES
        .acquire()
        .await
        .map_err(|_| "transcoding is shut down".to_string())?;
    tracing::info!(
        sop_instance_uid = %item.sop_instance_uid,
        from = %from,
        to = %to,
        "transcoding for a receiver that did not accept the stored syntax"
    );
    // The turn goes with the work: a retrieve cut short does not free it
    // while its transcode still runs.
    let converted = tokio::task::spawn_blocking(move || {
        let _turn = turn;
        storage::transcode::convert(&blob, offset, &from, &to)
    })
    .await
    .map_err(|e| e.to_string())??;
    Ok(converted.into())
}

/// Transcodes running at once, gateway-wide: one per core.
static TRANSCODES: std::sync::LazyLock<tokio::sync::Semaphore> = std::sync::LazyLock::new(|| {
    tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, usize::from))
});
