//! Storage commitment reports owed to requesters that left before
//! acknowledging one (PS3.4 J.3.3): delivered on a new association to the
//! requester's configured address (`[[destinations]]`), from storage's
//! ledger of owed reports, so that a restart of the gateway loses none.
//! Each attempt re-verifies, so a late report says what the center holds
//! when it is sent.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{Instrument, error, info, info_span, warn};

use crate::association::Shared;
use crate::commitment::{self, Reference, Request};
use consortium_config::Destination;
use consortium_dimse::{Response, field, tag};
use storage::OwedReport;

/// A report still undelivered this long after its request is given up.
const GIVE_UP_AFTER_S: i64 = 24 * 60 * 60;
/// The first retry after a failed delivery; doubled each time, up to `MAX_RETRY_S`.
const FIRST_RETRY_S: i64 = 5;
const MAX_RETRY_S: i64 = 10 * 60;
/// Between attempts at a requester that refused the report's context or role.
const HOUR_S: i64 = 60 * 60;
/// Reports delivered at the same time.
const PARALLEL: usize = 4;
/// The longest one delivery may take, connecting included.
const SEND_TIMEOUT: Duration = Duration::from_secs(90);
/// How soon to look again after the ledger could not be read or written.
const LEDGER_RETRY_S: i64 = 30;
/// Implicit VR little endian: what every requester accepts.
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Makes every owed report due: at start no association holds one. Runs
/// before the listener accepts, so that it cannot touch a report a new
/// association holds.
pub(crate) async fn all_due_at_start(shared: &Shared) {
    if let Err(e) = shared.storage.all_reports_due(unix_now()).await {
        error!(error = %e, "cannot read the owed commitment reports");
    }
}

/// Delivers owed reports as they fall due until shutdown, several at a
/// time (one requester that is slow or down does not hold up the others).
pub(crate) async fn run(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.clone();
    loop {
        let next = match shared.storage.due_reports(unix_now()) {
            Ok((due, _)) if !due.is_empty() => {
                let mut attempts = tokio::task::JoinSet::new();
                let mut due = due.into_iter();
                let mut ledger_ok = true;
                loop {
                    while attempts.len() < PARALLEL {
                        let Some(report) = due.next() else { break };
                        let span = info_span!(
                            "owed report",
                            requester_ae = %report.requester_ae,
                            transaction_uid = %report.transaction_uid
                        );
                        let shared = shared.clone();
                        attempts
                            .spawn(async move { deliver(&shared, report).await }.instrument(span));
                    }
                    tokio::select! {
                        done = attempts.join_next() => match done {
                            Some(Ok(ok)) => ledger_ok &= ok,
                            Some(Err(e)) => {
                                error!(error = %e, "a report delivery failed");
                                ledger_ok = false;
                            }
                            None => break,
                        },
                        _ = shutdown.changed() => return,
                    }
                }
                if ledger_ok {
                    continue; // each was settled or put off: look again
                }
                // A report the ledger could not settle or put off is still
                // due: look again only after a while, not at once (that
                // would send it over and over).
                Some(unix_now() + LEDGER_RETRY_S)
            }
            Ok((_, next)) => next,
            Err(e) => {
                error!(error = %e, "cannot read the owed commitment reports");
                Some(unix_now() + LEDGER_RETRY_S)
            }
        };
        let wait = next.map_or(MAX_RETRY_S, |t| (t - unix_now()).clamp(1, MAX_RETRY_S));
        tokio::select! {
            () = shared.reports_due.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(wait as u64)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One attempt: re-verify, send, then settle the report or put it off.
/// False when the ledger could not be updated.
async fn deliver(shared: &Shared, report: OwedReport) -> bool {
    let storage = &shared.storage;
    let id = report.id;
    let settle = || async { ledger_updated(storage.report_settled(id).await) };
    // Tried again in `retry_in` seconds from now (the attempt may have
    // taken a while); given up only after a day.
    let put_off = |retry_in: i64| async move {
        ledger_updated(storage.report_due(id, unix_now() + retry_in, true).await)
    };
    let backoff = (FIRST_RETRY_S << report.attempts.min(16)).min(MAX_RETRY_S);
    if unix_now() - report.created_at > GIVE_UP_AFTER_S {
        warn!(
            attempts = report.attempts,
            "giving up on a storage commitment report undelivered for a day"
        );
        return settle().await;
    }
    let config = &shared.config;
    let Some(dest) = config
        .destinations
        .iter()
        .find(|d| d.ae_title == report.requester_ae)
    else {
        warn!(
            "storage commitment report not acknowledged and the requester has no configured address; kept for a day (add its [[destinations]] entry and restart: a restart tries every owed report)"
        );
        // Nothing changes before a restart, which makes every report due.
        return put_off((report.created_at + GIVE_UP_AFTER_S - unix_now()).max(60)).await;
    };
    let request = Request {
        transaction_uid: report.transaction_uid.clone(),
        references: report
            .references
            .iter()
            .map(|(class, instance)| Reference {
                sop_class_uid: class.clone(),
                sop_instance_uid: instance.clone(),
            })
            .collect(),
    };
    let outcome = commitment::verify(storage, report.clinic_scope.as_deref(), request).await;
    let dataset = match commitment::event_report_dataset(&outcome, IMPLICIT_VR_LE) {
        Ok(d) => d,
        Err(e) => {
            error!(error = %e, "cannot encode a storage commitment report; it is lost");
            return settle().await;
        }
    };
    // Which instances the center holds is about to go out: audited first,
    // like every disclosure (an attempt that fails is audited too).
    audit(
        shared,
        &report,
        dest,
        &format!(
            "sending: committed {}, failed {}",
            outcome.committed.len(),
            outcome.failed.len()
        ),
        outcome.committed.len() as u64,
    )
    .await;
    let sent = tokio::time::timeout(
        SEND_TIMEOUT,
        send(config, dest, outcome.event_type(), &dataset),
    )
    .await
    .unwrap_or_else(|_| Err("the requester stopped answering".into()));
    match sent {
        Ok(Sent::Answered(status)) => {
            info!(
                status = format_args!("0x{status:04X}"),
                committed = outcome.committed.len(),
                failed = outcome.failed.len(),
                "storage commitment report delivered on a new association"
            );
            settle().await
        }
        Ok(Sent::ContextRefused) => {
            warn!(
                attempt = report.attempts,
                "the requester refused the storage commitment context, or our SCP role on it, for the report; tried again in an hour (check the requester's configuration)"
            );
            // Its settings, not a passing fault: each attempt re-hashes
            // every instance, so not every few minutes.
            put_off(backoff.max(HOUR_S)).await
        }
        Err(e) => {
            warn!(error = %e, attempt = report.attempts, retry_in_s = backoff, "commitment report delivery failed; tried again later");
            put_off(backoff).await
        }
    }
}

/// True when the ledger took a change; a failure is logged.
fn ledger_updated(res: storage::Result<()>) -> bool {
    res.inspect_err(|e| error!(error = %e, "cannot update the owed commitment reports"))
        .is_ok()
}

/// An audit row for a report sent on a new association.
async fn audit(
    shared: &Shared,
    report: &OwedReport,
    dest: &Destination,
    outcome: &str,
    matches: u64,
) {
    let clinic_id = shared
        .config
        .clinics
        .iter()
        .find(|c| c.ae_titles.contains(&report.requester_ae))
        .map(|c| c.id.clone())
        .or_else(|| report.clinic_scope.clone())
        .unwrap_or_default();
    let entry = storage::AuditEntry {
        calling_ae: report.requester_ae.clone(),
        clinic_id,
        peer: format!("{}:{}", dest.host, dest.port),
        action: "N-EVENT-REPORT".into(),
        detail: format!(
            "storage commitment report on a new association, transaction {}; {} instances",
            report.transaction_uid,
            report.references.len()
        ),
        outcome: outcome.into(),
        matches,
    };
    if let Err(e) = shared.storage.audit(entry).await {
        error!(error = %e, "cannot write the audit trail");
    }
}

enum Sent {
    /// The requester's N-EVENT-REPORT-RSP status.
    Answered(u16),
    ContextRefused,
}

/// Opens an association to `dest` as the commitment SCP (role selection)
/// and sends the N-EVENT-REPORT.
async fn send(
    config: &consortium_config::Config,
    dest: &Destination,
    event_type: u16,
    dataset: &[u8],
) -> Result<Sent, String> {
    use consortium_dimse::client::{self, Proposed};
    let contexts = [Proposed {
        id: 1,
        abstract_syntax: commitment::SOP_CLASS.to_string(),
        transfer_syntaxes: vec![IMPLICIT_VR_LE.to_string()],
    }];
    let mut assoc = client::associate_with_scp_role(
        (dest.host.as_str(), dest.port),
        &config.gateway.ae_title,
        &dest.ae_title,
        &contexts,
        &[commitment::SOP_CLASS],
        config.gateway.max_pdu_length,
        Duration::from_secs(30),
    )
    .await
    .map_err(|e| format!("cannot reach the requester: {e}"))?;
    // The report may go only where we were accepted as the commitment SCP
    // (PS3.4 J.3.3 and PS3.7 D.3.3.4: without that answer we are SCU).
    if !assoc.accepted.contains_key(&1)
        || !assoc
            .scp_role_accepted
            .iter()
            .any(|uid| uid == commitment::SOP_CLASS)
    {
        assoc.abort().await;
        return Ok(Sent::ContextRefused);
    }
    let rq = Response::request(field::N_EVENT_REPORT_RQ, 1, true)
        .uid(tag::AFFECTED_SOP_CLASS_UID, commitment::SOP_CLASS)
        .uid(
            tag::AFFECTED_SOP_INSTANCE_UID,
            commitment::WELL_KNOWN_INSTANCE,
        )
        .u16(tag::EVENT_TYPE_ID, event_type)
        .encode();
    let answered = async {
        assoc.send_command(1, &rq).await?;
        assoc.send_dataset(1, dataset).await?;
        // (An answer with a dataset is an answer too.)
        assoc.receive(64 << 10).await
    }
    .await;
    match answered {
        // Only the answer to this report settles it (PS3.7 9.3.1.2).
        Ok(rsp)
            if rsp.command.command_field() == Some(field::N_EVENT_REPORT_RSP)
                && rsp.command.u16(tag::MESSAGE_ID_BEING_RESPONDED_TO) == Some(1) =>
        {
            assoc.release().await;
            Ok(Sent::Answered(
                rsp.command.u16(tag::STATUS).unwrap_or(0xFFFF),
            ))
        }
        Ok(_) => {
            assoc.abort().await;
            Err("the requester answered something other than the report".into())
        }
        Err(e) => Err(format!("sending the report: {e}")),
    }
}
