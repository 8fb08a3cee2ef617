//! Storage commitment, SCU side: ask the center to confirm every stored
//! instance and wait for its N-EVENT-REPORT on the same association.

use std::collections::HashMap;
use std::time::Duration;

use consortium_dimse::client::{Association, ClientError, Proposed};
use consortium_dimse::{Response, field, status, tag};
use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::Settings;
use crate::record::Record;

const SOP_CLASS: &str = "1.2.840.10008.1.20.1";
const WELL_KNOWN_INSTANCE: &str = "1.2.840.10008.1.20.1.1";
/// Instances per N-ACTION.
const CHUNK: usize = 1_000;
/// How a missing report is told apart: the one failure of a commitment
/// request that asking again does not mend.
const NO_REPORT: &str = "the center sent no storage commitment report within";

/// The center's answer per SOP Instance UID: `None` committed, `Some(reason)` failed.
pub(crate) type Answers = HashMap<String, Option<u16>>;

/// Requests commitment of `refs` (SOP class, SOP instance), with retries.
/// The answers received, and the error that ended the requests early (the
/// answers of requests before it are kept).
pub(crate) async fn commit(
    settings: &Settings,
    refs: &[(String, String)],
) -> (Answers, Option<ClientError>) {
    let mut answers = Answers::new();
    for chunk in refs.chunks(CHUNK) {
        let mut attempt = 0;
        loop {
            match commit_chunk(settings, chunk).await {
                Ok(a) => {
                    answers.extend(a);
                    break;
                }
                Err(e) if e.is_transient() && attempt < settings.retries => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(500 << attempt.min(5))).await;
                }
                Err(e) => return (answers, Some(e)),
            }
        }
    }
    (answers, None)
}

/// An association for storage commitment only; returns it with the
/// accepted transfer syntax of its one context.
async fn associate(settings: &Settings) -> Result<(Association, String), ClientError> {
    let contexts = [Proposed {
        id: 1,
        abstract_syntax: SOP_CLASS.to_string(),
        transfer_syntaxes: vec!["1.2.840.10008.1.2.1".into(), "1.2.840.10008.1.2".into()],
    }];
    let assoc = settings.associate(&contexts).await?;
    let Some((_, ts)) = assoc.accepted.get(&1).cloned() else {
        assoc.abort().await;
        return Err(ClientError::Protocol(
            "the center does not offer storage commitment".into(),
        ));
    };
    Ok((assoc, ts))
}

async fn commit_chunk(
    settings: &Settings,
    refs: &[(String, String)],
) -> Result<Answers, ClientError> {
    let (mut assoc, ts) = associate(settings).await?;
    let answers = exchange(&mut assoc, 1, &ts, refs, settings.report_wait).await;
    match answers {
        Ok(a) => {
            assoc.release().await;
            Ok(a)
        }
        Err(e) => {
            assoc.abort().await;
            Err(e)
        }
    }
}

/// A stored instance handed to the committer: SOP class, SOP instance, and
/// the SHA-256 of the file as sent (for the record).
pub(crate) type Stored = (String, String, String);

/// Storage commitment beside the sending lanes: each stored instance is
/// handed over as soon as its SHA-256 is known, and one association of its
/// own asks the center about whatever has gathered while its previous
/// request was being checked. The center's re-verification (reading and
/// hashing every instance) so overlaps the sending instead of following
/// it; what remains at the end is the last batch, asked about on a second
/// association beside the one still being checked. Each confirmation goes into the record as
/// it arrives. Instances whose request failed are not in the answers: the
/// caller asks again for them.
pub(crate) struct Committer {
    stored: tokio::sync::mpsc::UnboundedSender<Stored>,
    task: tokio::task::JoinHandle<(Answers, Record)>,
}

/// A batch waits for more instances at most this long while sending goes on.
const GATHER: Duration = Duration::from_millis(100);
/// ... unless it has this many already.
const GATHER_ENOUGH: usize = 256;
/// Failed requests in a row after which the committer stops asking.
const GIVE_UP_AFTER: u32 = 3;

impl Committer {
    pub(crate) fn start(settings: &Settings, record: Record) -> Self {
        let (stored, received) = tokio::sync::mpsc::unbounded_channel();
        let settings = settings.clone();
        let task = tokio::spawn(async move { run_committer(&settings, received, record).await });
        Self { stored, task }
    }

    /// Where lanes hand over each stored instance.
    pub(crate) fn stored(&self) -> tokio::sync::mpsc::UnboundedSender<Stored> {
        self.stored.clone()
    }

    /// Waits for the answers to everything handed over; gives the record back.
    pub(crate) async fn finish(self) -> (Answers, Record) {
        drop(self.stored);
        self.task.await.expect("committer task")
    }
}

/// Records the instances of `batch` that `answers` says are committed.
fn record_committed(record: &mut Record, batch: &[Stored], answers: &Answers) {
    let committed = batch
        .iter()
        .filter(|(_, uid, _)| answers.get(uid) == Some(&None))
        .map(|(_, uid, sha)| (uid.as_str(), sha.as_str()));
    // A short SQLite transaction: on this worker thread, not the runtime's.
    if let Err(e) = tokio::task::block_in_place(|| record.mark_committed(committed)) {
        eprintln!("consortium-upload: cannot update the record: {e}");
    }
}

/// One commitment request on its own task: the association it used (kept
/// when the exchange went well), the batch, and the center's answers.
type Flight = (
    Option<(Association, String)>,
    Vec<Stored>,
    Result<Answers, ClientError>,
);

async fn fly(
    settings: Settings,
    assoc: Option<(Association, String)>,
    batch: Vec<Stored>,
) -> Flight {
    let (mut assoc, ts) = match assoc {
        Some(open) => open,
        None => match associate(&settings).await {
            Ok(open) => open,
            Err(e) => return (None, batch, Err(e)),
        },
    };
    let refs: Vec<(String, String)> = batch
        .iter()
        .map(|(class, uid, _)| (class.clone(), uid.clone()))
        .collect();
    let result = exchange(&mut assoc, 1, &ts, &refs, settings.report_wait).await;
    match result {
        Ok(answers) => (Some((assoc, ts)), batch, Ok(answers)),
        Err(e) => {
            assoc.abort().await;
            (None, batch, Err(e))
        }
    }
}

async fn run_committer(
    settings: &Settings,
    mut received: tokio::sync::mpsc::UnboundedReceiver<Stored>,
    mut record: Record,
) -> (Answers, Record) {
    let mut answers = Answers::new();
    let mut idle: Vec<(Association, String)> = Vec::new();
    let mut flights: tokio::task::JoinSet<Flight> = tokio::task::JoinSet::new();
    let mut batch: Vec<Stored> = Vec::new();
    // When the batch's first instance came: it waits at most `GATHER` for more.
    let mut gathering_since = tokio::time::Instant::now();
    let mut sending = true;
    let mut reported = false;
    // After a few failures in a row (the center refuses or drops these
    // associations), stop asking during the run: batches are then left to
    // the caller's request at the end instead of a new association each.
    let mut failures = 0;
    loop {
        // While files are being sent, one request at a time: the next batch
        // grows while the center checks this one. Once sending is over, the
        // rest goes at once on a second association beside it, instead of
        // waiting behind it; but only to a center that has reported on an
        // association before (one that never does is asked once).
        let room = if sending || !reported { 1 } else { 2 };
        let due = !sending || batch.len() >= GATHER_ENOUGH || gathering_since.elapsed() >= GATHER;
        if failures >= GIVE_UP_AFTER {
            batch.clear(); // unanswered: the caller asks again
        }
        while !batch.is_empty() && due && flights.len() < room {
            let chunk: Vec<_> = batch.drain(..batch.len().min(CHUNK)).collect();
            flights.spawn(fly(settings.clone(), idle.pop(), chunk));
        }
        if !sending && batch.is_empty() && flights.is_empty() {
            break;
        }
        let deadline = gathering_since + GATHER;
        tokio::select! {
            stored = received.recv(), if sending => match stored {
                Some(stored) => {
                    if batch.is_empty() {
                        gathering_since = tokio::time::Instant::now();
                    }
                    batch.push(stored);
                }
                None => sending = false,
            },
            Some(flight) = flights.join_next(), if !flights.is_empty() => {
                let (assoc, chunk, result) = flight.expect("commitment task");
                match result {
                    Ok(a) => {
                        failures = 0;
                        reported = true;
                        record_committed(&mut record, &chunk, &a);
                        answers.extend(a);
                    }
                    // No report: asking again during the run will not mend it.
                    Err(e) if is_no_report(&e) => failures = GIVE_UP_AFTER,
                    Err(_) => failures += 1,
                }
                idle.extend(assoc);
            },
            _ = tokio::time::sleep_until(deadline),
                if !batch.is_empty() && !due && flights.len() < room => {}
        }
    }
    for (a, _) in idle {
        a.release().await;
    }
    (answers, record)
}

fn is_no_report(e: &ClientError) -> bool {
    matches!(e, ClientError::Protocol(m) if m.starts_with(NO_REPORT))
}

/// The commitment exchange on an open association: N-ACTION, N-ACTION-RSP,
/// then the center's N-EVENT-REPORT and our N-EVENT-REPORT-RSP.
async fn exchange(
    assoc: &mut Association,
    context_id: u8,
    ts: &str,
    refs: &[(String, String)],
    report_wait: Duration,
) -> Result<Answers, ClientError> {
    let transaction_uid = new_uid();
    let dataset = request_dataset(&transaction_uid, refs, ts)?;
    let rq = Response::request(field::N_ACTION_RQ, 0xC0FF, true)
        .uid(tag::REQUESTED_SOP_CLASS_UID, SOP_CLASS)
        .uid(tag::REQUESTED_SOP_INSTANCE_UID, WELL_KNOWN_INSTANCE)
        .u16(tag::ACTION_TYPE_ID, 1)
        .encode();
    assoc.send_command(context_id, &rq).await?;
    assoc.send_dataset(context_id, &dataset).await?;
    let rsp = assoc.receive(1 << 20).await?;
    let action_status = rsp.command.u16(tag::STATUS).unwrap_or(0xFFFF);
    if rsp.command.command_field() != Some(field::N_ACTION_RSP) || action_status != status::SUCCESS
    {
        return Err(ClientError::Protocol(format!(
            "storage commitment request refused (status 0x{action_status:04X})"
        )));
    }
    // The report follows on this association, once every instance has been
    // re-read and hashed.
    // A center that has not reported by then (one that reports only on a
    // new association, which this tool does not listen for) will not when
    // asked again: not a transient failure, so not retried.
    let report = match assoc.receive_within(64 << 20, report_wait).await {
        Err(ClientError::Timeout) => {
            return Err(ClientError::Protocol(format!(
                "{NO_REPORT} {} s on the association (a center that reports only on a new association is not supported)",
                report_wait.as_secs()
            )));
        }
        other => other?,
    };
    if report.command.command_field() != Some(field::N_EVENT_REPORT_RQ) {
        return Err(ClientError::Protocol("expected N-EVENT-REPORT".into()));
    }
    let event_type = report.command.u16(tag::EVENT_TYPE_ID).unwrap_or(0);
    // Only about what was asked: a report naming other instances does not
    // make them committed.
    let asked: std::collections::HashSet<&str> = refs.iter().map(|(_, i)| i.as_str()).collect();
    let answers = parse_report(
        report.dataset.as_deref().unwrap_or(&[]),
        ts,
        &transaction_uid,
    )
    .map(|mut a| {
        a.retain(|uid, _| asked.contains(uid.as_str()));
        a
    });
    let reply = Response::new(
        field::N_EVENT_REPORT_RSP,
        report.command.message_id(),
        if answers.is_ok() {
            status::SUCCESS
        } else {
            status::PROCESSING_FAILURE
        },
    )
    .uid(tag::AFFECTED_SOP_CLASS_UID, SOP_CLASS)
    .uid(tag::AFFECTED_SOP_INSTANCE_UID, WELL_KNOWN_INSTANCE)
    .u16(tag::EVENT_TYPE_ID, event_type)
    .encode();
    assoc.send_command(report.context_id, &reply).await?;
    answers.map_err(ClientError::Protocol)
}

fn request_dataset(
    transaction_uid: &str,
    refs: &[(String, String)],
    ts: &str,
) -> Result<Vec<u8>, ClientError> {
    let ts = TransferSyntaxRegistry
        .get(ts)
        .ok_or_else(|| ClientError::Protocol("unknown transfer syntax".into()))?;
    let items: Vec<InMemDicomObject> = refs
        .iter()
        .map(|(class, instance)| {
            InMemDicomObject::from_element_iter([
                DataElement::new(
                    tags::REFERENCED_SOP_CLASS_UID,
                    VR::UI,
                    PrimitiveValue::from(class.as_str()),
                ),
                DataElement::new(
                    tags::REFERENCED_SOP_INSTANCE_UID,
                    VR::UI,
                    PrimitiveValue::from(instance.as_str()),
                ),
            ])
        })
        .collect();
    let obj = InMemDicomObject::from_element_iter([
        DataElement::new(
            tags::TRANSACTION_UID,
            VR::UI,
            PrimitiveValue::from(transaction_uid),
        ),
        DataElement::new(
            tags::REFERENCED_SOP_SEQUENCE,
            VR::SQ,
            DataSetSequence::from(items),
        ),
    ]);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts)
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    Ok(out)
}

fn parse_report(dataset: &[u8], ts: &str, transaction_uid: &str) -> Result<Answers, String> {
    storage::attrs::validate(dataset, ts).map_err(|e| e.to_string())?;
    let ts = TransferSyntaxRegistry
        .get(ts)
        .ok_or("unknown transfer syntax")?;
    let obj = InMemDicomObject::read_dataset_with_ts(dataset, ts).map_err(|e| e.to_string())?;
    let text = |o: &InMemDicomObject, tag| {
        o.element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
            .unwrap_or_default()
    };
    if text(&obj, tags::TRANSACTION_UID) != transaction_uid {
        return Err("the report is for another transaction".into());
    }
    let mut answers = Answers::new();
    let items = |tag| {
        obj.element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.items())
            .map(<[_]>::to_vec)
            .unwrap_or_default()
    };
    for item in items(tags::REFERENCED_SOP_SEQUENCE) {
        answers.insert(text(&item, tags::REFERENCED_SOP_INSTANCE_UID), None);
    }
    for item in items(tags::FAILED_SOP_SEQUENCE) {
        let reason = item
            .element_opt(tags::FAILURE_REASON)
            .ok()
            .flatten()
            .and_then(|e| e.to_int::<u16>().ok())
            .unwrap_or(0x0110);
        answers.insert(text(&item, tags::REFERENCED_SOP_INSTANCE_UID), Some(reason));
    }
    Ok(answers)
}

/// A fresh UID under 2.25 from the clock, the process and a counter.
fn new_uid() -> String {
    use sha2::{Digest, Sha256};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let seed = format!(
        "{nanos}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let digest = Sha256::digest(seed.as_bytes());
    let mut n = [0u8; 16];
    n.copy_from_slice(&digest[..16]);
    format!("2.25.{}", u128::from_be_bytes(n) >> 1)
}

/// Failure reasons worth asking about again: the center could not check
/// the instance this time (PS3.3 C.14.1.1), not "it is not here".
pub(crate) fn may_pass(reason: u16) -> bool {
    matches!(reason, 0x0110 | 0x0213)
}

/// Failure Reason in words.
pub(crate) fn describe_failure(reason: u16) -> &'static str {
    match reason {
        0x0110 => "processing failure (the center could not verify it)",
        0x0112 => "no such instance at the center",
        0x0119 => "stored under another SOP class",
        0x0122 => "SOP class not supported",
        0x0131 => "duplicate transaction UID",
        0x0213 => "resource limitation",
        _ => "unknown reason",
    }
}
