//! One association, from A-ASSOCIATE-RQ to release or abort.
//!
//! The task reads PDUs with [`PduReader`], assembles DIMSE messages from PDVs
//! and dispatches them (C-ECHO, C-STORE). Protocol violations end in an
//! A-ABORT; a bad dataset only fails its own C-STORE.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dicom_ul::pdu::{AbortRQServiceProviderReason as AbortReason, Pdu};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::admission::{Admission, Ticket};
use crate::c_store::StoreInProgress;
use crate::commitment;
use crate::negotiate::{self, Context, Refusal};
use crate::retrieve::{self, Item};
use consortium_config::{AccessDenied, Config};
use consortium_dimse::ul::{self, Incoming, PduReader};
use consortium_dimse::{Command, Response, field, status, tag};
use storage::{Source, Storage};

/// What every association task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Arc<Config>,
    pub(crate) storage: Storage,
    pub(crate) admission: Arc<Admission>,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Wakes the delivery of owed commitment reports (`report_delivery`).
    pub(crate) reports_due: tokio::sync::Notify,
}

/// Serves one TCP connection to completion.
pub(crate) async fn serve(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, id: u64) {
    let span = info_span!("association", id, %peer, calling_ae = tracing::field::Empty, clinic = tracing::field::Empty);
    async move {
        let _ = stream.set_nodelay(true);
        let mut conn = Connection {
            stream,
            reader: PduReader::new(shared.config.gateway.max_pdu_length),
            last_message_id: 0,
            pending_cancel: false,
            dropping_dataset: None,
            unacked_reports: Vec::new(),
        };
        let Some(assoc) = conn.establish(&shared, peer).await else {
            return;
        };
        conn.run(&shared, assoc).await;
    }
    .instrument(span)
    .await
}

struct Connection {
    stream: TcpStream,
    reader: PduReader,
    /// Message ID of the last request we sent (N-EVENT-REPORT, C-STORE).
    last_message_id: u16,
    /// A C-CANCEL arrived for the retrieve in progress.
    pending_cancel: bool,
    /// The context whose dataset is being dropped: an Event Reply that came
    /// with an N-EVENT-REPORT-RSP while an operation streamed.
    dropping_dataset: Option<u8>,
    /// Storage commitment reports owed on this association (recorded in
    /// storage's ledger). Those not acknowledged when it ends are
    /// delivered on a new association by `report_delivery`.
    unacked_reports: Vec<UnackedReport>,
}

/// Longest a write to the peer may take before the association is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a C-GET or C-MOVE sub-operation's C-STORE-RSP: a
/// receiver may take long to keep a large object (slow storage, a router
/// forwarding it before it answers), and DCMTK waits without limit; one
/// answer late is not a reason to fail every instance after it.
const SUB_OPERATION_ANSWER: Duration = Duration::from_secs(600);
/// Pending C-GET/C-MOVE responses after the first come at most this often:
/// enough for a progress bar.
const PENDING_INTERVAL: Duration = Duration::from_millis(100);

/// A storage commitment report sent on this association; forgotten by the
/// ledger once acknowledged.
struct UnackedReport {
    message_id: u16,
    /// Its row in storage's ledger of owed reports.
    owed_id: i64,
    acknowledged: bool,
}

/// Largest N-ACTION dataset collected (about 50,000 references).
const MAX_ACTION_BYTES: usize = 8 << 20;

/// What a collected dataset is for.
enum Collected {
    /// N-ACTION, Request Storage Commitment.
    Commitment,
    /// A C-FIND identifier.
    Find,
    /// A C-GET (`None`) or C-MOVE (destination AE) identifier.
    Retrieve { move_to: Option<String> },
}

impl Collected {
    fn limit(&self) -> usize {
        match self {
            Collected::Commitment => MAX_ACTION_BYTES,
            Collected::Find | Collected::Retrieve { .. } => crate::find::MAX_IDENTIFIER_BYTES,
        }
    }

    /// The audit trail's name for the operation.
    fn action(&self) -> &'static str {
        match self {
            Collected::Commitment => "N-ACTION",
            Collected::Find => "C-FIND",
            Collected::Retrieve { move_to: None } => "C-GET",
            Collected::Retrieve { move_to: Some(_) } => "C-MOVE",
        }
    }

    /// How a dataset over the limit is refused: with (response field,
    /// status) once it has been read, or, when `None`, by aborting.
    fn refusal(&self) -> Option<(u16, u16)> {
        match self {
            Collected::Commitment => Some((field::N_ACTION_RSP, status::RESOURCE_LIMITATION)),
            Collected::Find => Some((field::C_FIND_RSP, status::OUT_OF_RESOURCES)),
            Collected::Retrieve { .. } => None,
        }
    }
}

/// An established association.
struct Established {
    contexts: HashMap<u8, Context>,
    peer_max_pdu: u32,
    source: Source,
    /// The center's own reading stations see every clinic's instances.
    county: bool,
    ticket: Ticket,
}

/// How the message loop ended.
enum End {
    PeerReleased,
    PeerAborted,
    PeerClosed,
    Release(&'static str),
    Abort(AbortReason, String),
    Lost(String),
}

impl End {
    /// How the association ended, for the audit trail.
    fn summary(&self) -> String {
        match self {
            End::PeerReleased => "released by the peer".into(),
            End::PeerAborted => "aborted by the peer".into(),
            End::PeerClosed => "connection closed by the peer".into(),
            End::Release(why) => format!("released: {why}"),
            End::Abort(_, why) => format!("aborted: {why}"),
            End::Lost(why) => format!("connection lost: {why}"),
        }
    }
}

/// A DIMSE message being received.
enum Pending {
    /// Command fragments so far, on this context.
    Command { context_id: u8, bytes: Vec<u8> },
    /// A C-STORE dataset arriving.
    Store {
        context_id: u8,
        message_id: u16,
        op: Box<StoreInProgress>,
    },
    /// A small dataset collected in memory before it is acted on.
    Collect {
        context_id: u8,
        message_id: u16,
        kind: Collected,
        bytes: Vec<u8>,
    },
    /// A dataset we will discard, then answer with `status` (`why` for
    /// the audit trail, when the request was a query, retrieve or
    /// commitment request).
    Discard {
        context_id: u8,
        message_id: u16,
        response_field: u16,
        status: u16,
        why: Option<&'static str>,
    },
    /// The dataset of an answer (an N-EVENT-REPORT-RSP's Event Reply,
    /// PS3.7 10.1.1.1): read and dropped, nothing to answer.
    Drop { context_id: u8 },
}

impl Connection {
    async fn establish(&mut self, shared: &Shared, peer: SocketAddr) -> Option<Established> {
        let gw = &shared.config.gateway;
        let rq = match tokio::time::timeout(gw.artim_timeout(), self.reader.next(&mut self.stream))
            .await
        {
            Err(_) => {
                info!("no A-ASSOCIATE-RQ within the ARTIM timeout; closing");
                return None;
            }
            Ok(Ok(Some(Incoming::Other(Pdu::AssociationRQ(rq))))) => rq,
            Ok(Ok(None)) => {
                debug!("closed before A-ASSOCIATE-RQ");
                return None;
            }
            Ok(Ok(Some(other))) => {
                warn!(pdu = ?pdu_kind(&other), "expected A-ASSOCIATE-RQ; aborting");
                ul::abort(&mut self.stream, AbortReason::UnexpectedPdu).await;
                return None;
            }
            Ok(Err(e)) => {
                warn!(error = %e, "bad A-ASSOCIATE-RQ");
                if let Some(reason) = e.abort_reason() {
                    ul::abort(&mut self.stream, reason).await;
                }
                return None;
            }
        };
        let span = tracing::Span::current();
        span.record("calling_ae", rq.calling_ae_title.as_str());

        let decision = negotiate::check_request(&rq, &gw.ae_title)
            .and_then(|()| {
                shared
                    .config
                    .clinic_for_ae(&rq.calling_ae_title, peer.ip())
                    .map_err(|e| match e {
                        AccessDenied::UnknownCallingAe => Refusal::CallingAeTitle,
                        AccessDenied::AddressNotAllowed => Refusal::AddressNotAllowed,
                    })
            })
            .and_then(|clinic| shared.admission.admit(&clinic.id).map(|t| (clinic, t)));
        let (clinic, ticket) = match decision {
            Ok(ok) => ok,
            Err(refusal) => {
                warn!(
                    reason = refusal.describe(),
                    called_ae = %rq.called_ae_title,
                    "association rejected"
                );
                let _ = ul::send(&mut self.stream, &Pdu::AssociationRJ(refusal.to_rj())).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut self.stream).await;
                return None;
            }
        };
        span.record("clinic", clinic.id.as_str());
        let (ac, contexts) = negotiate::accept(&rq, gw.max_pdu_length);
        if let Err(e) = ul::send(&mut self.stream, &Pdu::AssociationAC(ac)).await {
            warn!(error = %e, "cannot send A-ASSOCIATE-AC");
            return None;
        }
        info!(accepted_contexts = contexts.len(), "association accepted");
        Some(Established {
            contexts,
            peer_max_pdu: negotiate::peer_max_pdu(&rq),
            source: Source {
                clinic_id: clinic.id.clone(),
                calling_ae: rq.calling_ae_title.clone(),
            },
            county: clinic.role == consortium_config::ClinicRole::County,
            ticket,
        })
    }

    async fn run(&mut self, shared: &Shared, assoc: Established) {
        let mut pending: Option<Pending> = None;
        let mut shutdown = shared.shutdown.clone();
        let idle_timeout = shared.config.gateway.idle_timeout();
        // Chosen to make room while a message was arriving: released once it
        // is answered, not in the middle of it, and within `idle_timeout`
        // (its slot is already another's: a peer trickling bytes must not
        // keep it).
        let mut evicted: Option<Instant> = None;
        let end = loop {
            // Not idle while a message is under way: a PDU arriving, the last
            // PDU's next message waiting in the reader, a message incomplete.
            let idle =
                pending.is_none() && !self.reader.has_unread() && self.reader.buffered() == 0;
            assoc.ticket.set_busy(!idle);
            if idle && evicted.is_some() {
                break End::Release("making room for a new association");
            }
            if idle && *shutdown.borrow() {
                break End::Release("the center is shutting down");
            }
            let stalled = || {
                End::Abort(
                    AbortReason::ReasonNotSpecified,
                    "peer stalled mid-message".into(),
                )
            };
            let next = if idle {
                let next = tokio::select! {
                    r = self.reader.next_unless_quiet(&mut self.stream, idle_timeout) => match r {
                        Some(r) => Some(r),
                        // Quiet with part of a PDU read: not between messages.
                        None if self.reader.buffered() > 0 => break stalled(),
                        None => break End::Release("idle timeout"),
                    },
                    () = assoc.ticket.evicted() => None,
                    _ = shutdown.changed() => continue,
                };
                match next {
                    Some(r) => {
                        // Busy from its first PDU on, however long the
                        // operation runs (a C-MOVE answers from within it).
                        assoc.ticket.set_busy(true);
                        r
                    }
                    None => {
                        evicted = Some(Instant::now());
                        continue;
                    }
                }
            } else if let Some(since) = evicted {
                let left = idle_timeout.saturating_sub(since.elapsed());
                match tokio::time::timeout(left, self.reader.next(&mut self.stream)).await {
                    Ok(r) => r,
                    Err(_) => {
                        break End::Abort(
                            AbortReason::ReasonNotSpecified,
                            "asked to make room, and the message under way did not end in time"
                                .into(),
                        );
                    }
                }
            } else {
                match self
                    .reader
                    .next_unless_quiet(&mut self.stream, idle_timeout)
                    .await
                {
                    Some(r) => r,
                    None => break stalled(),
                }
            };
            let pdu = match next {
                Ok(Some(pdu)) => pdu,
                Ok(None) => break End::PeerClosed,
                Err(e) => match e.abort_reason() {
                    Some(reason) => break End::Abort(reason, e.to_string()),
                    None => break End::Lost(e.to_string()),
                },
            };
            match pdu {
                Incoming::PData(body) => {
                    if let Err(end) = self.on_pdata(shared, &assoc, &mut pending, body).await {
                        break end;
                    }
                }
                Incoming::Other(Pdu::ReleaseRQ) if pending.is_none() => break End::PeerReleased,
                Incoming::Other(Pdu::AbortRQ { .. }) => break End::PeerAborted,
                Incoming::Other(other) => {
                    break End::Abort(
                        AbortReason::UnexpectedPdu,
                        format!("unexpected {}", pdu_kind(&Incoming::Other(other))),
                    );
                }
            }
        };
        let discarded = pending.is_some();
        drop(pending); // deletes any partial spool file
        match end {
            End::PeerReleased => {
                let _ = ul::send(&mut self.stream, &Pdu::ReleaseRP).await;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut self.stream).await;
                info!("association released by peer");
            }
            End::PeerAborted => info!(discarded, "association aborted by peer"),
            End::PeerClosed if discarded => {
                warn!("peer closed the connection mid-message; partial data discarded")
            }
            End::PeerClosed => info!("peer closed the connection"),
            End::Lost(reason) => {
                warn!(%reason, discarded, "connection lost; partial data discarded")
            }
            End::Abort(reason, why) => {
                warn!(%why, discarded, "aborting association");
                ul::abort(&mut self.stream, reason).await;
            }
            End::Release(why) => {
                info!(why, "releasing association");
                self.release().await;
            }
        }
        self.settle_reports(shared, true).await;
    }

    /// Tells the ledger which reports were acknowledged; with `ending`,
    /// also which are now due on a new association (and wakes their
    /// delivery).
    async fn settle_reports(&mut self, shared: &Shared, ending: bool) {
        let mut woke = false;
        for report in std::mem::take(&mut self.unacked_reports) {
            let res = if report.acknowledged {
                shared.storage.report_settled(report.owed_id).await
            } else if ending {
                woke = true;
                let now = crate::report_delivery::unix_now();
                shared.storage.report_due(report.owed_id, now, false).await
            } else {
                self.unacked_reports.push(report);
                continue;
            };
            if let Err(e) = res {
                tracing::error!(error = %e, "cannot update the owed commitment reports");
            }
        }
        if woke {
            shared.reports_due.notify_one();
        }
    }

    /// Acceptor-initiated A-RELEASE (PS3.8 7.2): send RQ, wait briefly for RP.
    async fn release(&mut self) {
        if ul::send(&mut self.stream, &Pdu::ReleaseRQ).await.is_err() {
            return;
        }
        let wait = async {
            // A release collision (the peer asked too): the acceptor answers
            // only after the requestor's A-RELEASE-RP (PS3.8 Sta10, AR-10
            // then AR-4); a requestor waiting in Sta9 for ours first would
            // take an early one as out of order.
            let mut collided = false;
            loop {
                match self.reader.next(&mut self.stream).await {
                    Ok(Some(Incoming::Other(Pdu::ReleaseRP))) => {
                        if collided {
                            let _ = ul::send(&mut self.stream, &Pdu::ReleaseRP).await;
                        }
                        return;
                    }
                    Ok(None) | Err(_) => return,
                    Ok(Some(Incoming::Other(Pdu::ReleaseRQ))) => collided = true,
                    Ok(Some(_)) => continue,
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .is_err()
        {
            ul::abort(&mut self.stream, AbortReason::ReasonNotSpecified).await;
            return;
        }
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut self.stream).await;
    }

    async fn on_pdata(
        &mut self,
        shared: &Shared,
        assoc: &Established,
        pending: &mut Option<Pending>,
        body: Bytes,
    ) -> Result<(), End> {
        let pdvs = ul::pdvs(body)
            .map_err(|e| End::Abort(AbortReason::InvalidPduParameter, e.to_string()))?;
        for (i, pdv) in pdvs.iter().enumerate() {
            let Some(context) = assoc.contexts.get(&pdv.context_id) else {
                return Err(End::Abort(
                    AbortReason::InvalidPduParameter,
                    format!(
                        "PDV on presentation context {} which was not accepted",
                        pdv.context_id
                    ),
                ));
            };
            if pdv.is_command {
                match pending {
                    None => {
                        *pending = Some(Pending::Command {
                            context_id: pdv.context_id,
                            bytes: Vec::new(),
                        })
                    }
                    Some(Pending::Command { context_id, .. }) if *context_id == pdv.context_id => {}
                    Some(_) => {
                        return Err(End::Abort(
                            AbortReason::UnexpectedPduParameter,
                            "command fragment while another message is incomplete".into(),
                        ));
                    }
                }
                let Some(Pending::Command { bytes, .. }) = pending.as_mut() else {
                    unreachable!("set just above")
                };
                append_command(bytes, &pdv.data)?;
                if pdv.is_last {
                    let Some(Pending::Command { bytes, .. }) = pending.take() else {
                        unreachable!()
                    };
                    *pending = self
                        .on_command(shared, assoc, pdv.context_id, context, &bytes)
                        .await?;
                }
            } else {
                match pending.as_mut() {
                    Some(Pending::Store { context_id, op, .. })
                        if *context_id == pdv.context_id =>
                    {
                        op.write(&pdv.data);
                    }
                    Some(Pending::Collect {
                        context_id,
                        message_id,
                        kind,
                        bytes,
                    }) if *context_id == pdv.context_id => {
                        if bytes.len() + pdv.data.len() <= kind.limit() {
                            bytes.extend_from_slice(&pdv.data);
                        } else if let Some((response_field, status)) = kind.refusal() {
                            *pending = Some(Pending::Discard {
                                context_id: *context_id,
                                message_id: *message_id,
                                response_field,
                                status,
                                why: Some("identifier or request too large"),
                            });
                        } else {
                            let action = kind.action();
                            self.audit(
                                shared,
                                assoc,
                                action,
                                "identifier too large",
                                "refused: association aborted",
                                0,
                            )
                            .await;
                            return Err(End::Abort(
                                AbortReason::InvalidPduParameter,
                                "identifier too large".into(),
                            ));
                        }
                    }
                    Some(Pending::Discard { context_id, .. } | Pending::Drop { context_id })
                        if *context_id == pdv.context_id => {}
                    _ => {
                        return Err(End::Abort(
                            AbortReason::UnexpectedPduParameter,
                            "dataset fragment without a matching command".into(),
                        ));
                    }
                }
                if pdv.is_last {
                    // The rest of this PDU belongs to the next message (a
                    // C-CANCEL, say): it is read after this one, and by
                    // the operation this one starts.
                    self.reader.unread(&pdvs[i + 1..]);
                    match pending.take() {
                        Some(Pending::Store {
                            context_id,
                            message_id,
                            op,
                        }) => {
                            self.finish_store(shared, assoc, context_id, message_id, *op)
                                .await?
                        }
                        Some(Pending::Collect {
                            context_id,
                            message_id,
                            kind,
                            bytes,
                        }) => match kind {
                            Collected::Commitment => {
                                self.on_commitment(shared, assoc, context_id, message_id, &bytes)
                                    .await?
                            }
                            Collected::Find => {
                                self.on_find(shared, assoc, context_id, message_id, &bytes)
                                    .await?
                            }
                            Collected::Retrieve { move_to } => {
                                self.on_retrieve(
                                    shared, assoc, context_id, message_id, move_to, &bytes,
                                )
                                .await?
                            }
                        },
                        Some(Pending::Discard {
                            context_id,
                            message_id,
                            response_field,
                            status,
                            why,
                        }) => {
                            if let Some(why) = why {
                                self.audit_refusal(shared, assoc, response_field, status, why)
                                    .await;
                            }
                            let rsp = Response::new(response_field, message_id, status).encode();
                            self.respond(assoc, context_id, &rsp).await?;
                        }
                        Some(Pending::Drop { .. }) => {}
                        _ => unreachable!("checked above"),
                    }
                    // An Event Reply begun while an operation streamed: the
                    // rest of it is dropped here.
                    if let Some(context_id) = self.dropping_dataset.take() {
                        *pending = Some(Pending::Drop { context_id });
                    }
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// A complete command set arrived.
    async fn on_command(
        &mut self,
        shared: &Shared,
        assoc: &Established,
        context_id: u8,
        context: &Context,
        bytes: &[u8],
    ) -> Result<Option<Pending>, End> {
        let command = Command::parse(bytes)
            .map_err(|e| End::Abort(AbortReason::InvalidPduParameter, e.to_string()))?;
        let message_id = command.message_id();
        let command_field = command.command_field().unwrap_or_default();
        // A request names itself by its Message ID (PS3.7 9.1.5.1), which
        // its response repeats; a C-CANCEL names the request it cancels.
        if command_field & 0x8000 == 0
            && command_field != field::C_CANCEL_RQ
            && command.u16(tag::MESSAGE_ID).is_none()
        {
            return Err(End::Abort(
                AbortReason::InvalidPduParameter,
                "a request without a Message ID".into(),
            ));
        }
        match command.command_field() {
            Some(field::C_ECHO_RQ)
                if !command.has_dataset() && context.abstract_syntax == negotiate::VERIFICATION =>
            {
                let rsp = Response::new(field::C_ECHO_RSP, message_id, status::SUCCESS)
                    .uid(tag::AFFECTED_SOP_CLASS_UID, &context.abstract_syntax)
                    .encode();
                self.respond(assoc, context_id, &rsp).await?;
                debug!("C-ECHO answered");
                Ok(None)
            }
            Some(field::C_STORE_RQ) if negotiate::is_storage_class(&context.abstract_syntax) => {
                let op = StoreInProgress::start(
                    &shared.storage,
                    &command,
                    context,
                    shared.config.gateway.max_instance_bytes,
                );
                if command.has_dataset() {
                    Ok(Some(Pending::Store {
                        context_id,
                        message_id,
                        op: Box::new(op),
                    }))
                } else {
                    self.finish_store(shared, assoc, context_id, message_id, op)
                        .await?;
                    Ok(None)
                }
            }
            Some(field::C_CANCEL_RQ) => Ok(None),
            Some(field::C_GET_RQ)
                if retrieve::is_get_class(&context.abstract_syntax) && command.has_dataset() =>
            {
                Ok(Some(Pending::Collect {
                    context_id,
                    message_id,
                    kind: Collected::Retrieve { move_to: None },
                    bytes: Vec::new(),
                }))
            }
            Some(field::C_MOVE_RQ)
                if retrieve::is_move_class(&context.abstract_syntax) && command.has_dataset() =>
            {
                Ok(Some(Pending::Collect {
                    context_id,
                    message_id,
                    kind: Collected::Retrieve {
                        move_to: Some(command.uid(tag::MOVE_DESTINATION).unwrap_or_default()),
                    },
                    bytes: Vec::new(),
                }))
            }
            Some(field::C_FIND_RQ) if crate::find::is_find_class(&context.abstract_syntax) => {
                if command.has_dataset() {
                    Ok(Some(Pending::Collect {
                        context_id,
                        message_id,
                        kind: Collected::Find,
                        bytes: Vec::new(),
                    }))
                } else {
                    self.audit_refusal(
                        shared,
                        assoc,
                        field::C_FIND_RSP,
                        status::DATASET_MISMATCH,
                        "no identifier",
                    )
                    .await;
                    let rsp =
                        Response::new(field::C_FIND_RSP, message_id, status::DATASET_MISMATCH)
                            .error_comment("C-FIND without an identifier")
                            .encode();
                    self.respond(assoc, context_id, &rsp).await?;
                    Ok(None)
                }
            }
            Some(field::N_ACTION_RQ) => {
                let status = check_commitment_request(&command, context);
                match (status, command.has_dataset()) {
                    (None, true) => Ok(Some(Pending::Collect {
                        context_id,
                        message_id,
                        kind: Collected::Commitment,
                        bytes: Vec::new(),
                    })),
                    (status, has_dataset) => {
                        let why = if status.is_none() {
                            "storage commitment request without its dataset"
                        } else {
                            "not a storage commitment request"
                        };
                        let status = status.unwrap_or(status::PROCESSING_FAILURE);
                        if has_dataset {
                            Ok(Some(Pending::Discard {
                                context_id,
                                message_id,
                                response_field: field::N_ACTION_RSP,
                                status,
                                why: Some(why),
                            }))
                        } else {
                            self.audit_refusal(shared, assoc, field::N_ACTION_RSP, status, why)
                                .await;
                            let rsp =
                                Response::new(field::N_ACTION_RSP, message_id, status).encode();
                            self.respond(assoc, context_id, &rsp).await?;
                            Ok(None)
                        }
                    }
                }
            }
            Some(field::N_EVENT_REPORT_RSP) => {
                // Between operations an answer with a dataset counts too;
                // the dataset itself is dropped as it comes.
                ack_report(&mut self.unacked_reports, &command);
                Ok(command
                    .has_dataset()
                    .then_some(Pending::Drop { context_id }))
            }
            // A response to nothing we asked (a late C-STORE-RSP of a
            // cancelled C-GET, a confused peer): nothing to answer.
            Some(other) if other & 0x8000 != 0 => {
                warn!(
                    command_field = format_args!("0x{other:04X}"),
                    "unsolicited DIMSE response ignored"
                );
                Ok(command
                    .has_dataset()
                    .then_some(Pending::Drop { context_id }))
            }
            Some(other) => {
                let status = match other {
                    // A query or retrieve on a context of another SOP class
                    // (or a C-GET/C-MOVE without its identifier).
                    field::C_FIND_RQ | field::C_GET_RQ | field::C_MOVE_RQ => {
                        let class = &context.abstract_syntax;
                        if (other == field::C_GET_RQ && retrieve::is_get_class(class))
                            || (other == field::C_MOVE_RQ && retrieve::is_move_class(class))
                        {
                            status::DATASET_MISMATCH
                        } else {
                            status::SOP_CLASS_NOT_SUPPORTED
                        }
                    }
                    // A C-STORE on a context of a service class, a C-ECHO
                    // on one of a storage class.
                    field::C_STORE_RQ => status::SOP_CLASS_NOT_SUPPORTED,
                    field::C_ECHO_RQ if context.abstract_syntax != negotiate::VERIFICATION => {
                        status::SOP_CLASS_NOT_SUPPORTED
                    }
                    _ => {
                        warn!(
                            command_field = format_args!("0x{other:04X}"),
                            "unsupported DIMSE operation"
                        );
                        status::UNRECOGNIZED_OPERATION
                    }
                };
                let response_field = other | 0x8000;
                let why = Some(if status == status::DATASET_MISMATCH {
                    "no identifier"
                } else {
                    "not this presentation context's SOP class"
                });
                if command.has_dataset() {
                    Ok(Some(Pending::Discard {
                        context_id,
                        message_id,
                        response_field,
                        status,
                        why,
                    }))
                } else {
                    if let Some(why) = why {
                        self.audit_refusal(shared, assoc, response_field, status, why)
                            .await;
                    }
                    let rsp = Response::new(response_field, message_id, status).encode();
                    self.respond(assoc, context_id, &rsp).await?;
                    Ok(None)
                }
            }
            None => unreachable!("Command::parse requires a Command Field"),
        }
    }

    async fn finish_store(
        &mut self,
        shared: &Shared,
        assoc: &Established,
        context_id: u8,
        message_id: u16,
        op: StoreInProgress,
    ) -> Result<(), End> {
        let sop_class = op.sop_class_uid.clone();
        let sop_instance = op.sop_instance_uid.clone();
        let result = op.finish(&shared.storage, &assoc.source).await;
        let mut rsp = Response::new(field::C_STORE_RSP, message_id, status::SUCCESS);
        match &result {
            Ok(outcome) => debug!(sop_instance_uid = %sop_instance, ?outcome, "instance stored"),
            Err(e) => {
                warn!(sop_instance_uid = %sop_instance, status = format_args!("0x{:04X}", e.status()), error = %e, "C-STORE failed");
                rsp = Response::new(field::C_STORE_RSP, message_id, e.status())
                    .error_comment(&e.comment());
            }
        }
        if storage::part10::is_valid_uid(&sop_class) {
            rsp = rsp.uid(tag::AFFECTED_SOP_CLASS_UID, &sop_class);
        }
        if storage::part10::is_valid_uid(&sop_instance) {
            rsp = rsp.uid(tag::AFFECTED_SOP_INSTANCE_UID, &sop_instance);
        }
        self.respond(assoc, context_id, &rsp.encode()).await
    }

    /// A complete C-GET or C-MOVE identifier: send every named instance
    /// (over this association for C-GET, to the destination for C-MOVE),
    /// with pending responses counting the sub-operations.
    async fn on_retrieve(
        &mut self,
        shared: &Shared,
        assoc: &Established,
        context_id: u8,
        message_id: u16,
        move_to: Option<String>,
        identifier: &[u8],
    ) -> Result<(), End> {
        let context = assoc.contexts[&context_id].clone();
        let (action, rsp_field) = match move_to {
            Some(_) => ("C-MOVE", field::C_MOVE_RSP),
            None => ("C-GET", field::C_GET_RSP),
        };
        let scope = (!assoc.county).then(|| assoc.source.clinic_id.clone());
        let model = retrieve::find_model_of(&context.abstract_syntax);
        let destination_config = match &move_to {
            Some(ae) => {
                let found = shared
                    .config
                    .destinations
                    .iter()
                    .find(|d| &d.ae_title == ae);
                // A destination this clinic may not send to is, for it, not
                // a known one (0xA801 is the status C-MOVE defines).
                let refusal = match found {
                    None => Some(("destination unknown", "move destination unknown")),
                    Some(_) if !shared.config.may_move_to(&assoc.source.clinic_id, ae) => Some((
                        "destination not allowed for this clinic",
                        "move destination not allowed for this clinic",
                    )),
                    Some(_) => None,
                };
                if let Some((why, comment)) = refusal {
                    warn!(destination = %ae, why, "C-MOVE refused");
                    // Refused before any instance is listed; the audit row
                    // still names what was asked for.
                    let what = crate::find::parse(
                        identifier,
                        &context.transfer_syntax,
                        model,
                        scope.clone(),
                    )
                    .map_or_else(|e| format!("invalid identifier: {e}"), |r| r.describe());
                    self.audit(
                        shared,
                        assoc,
                        action,
                        &format!("to {ae}; {what}"),
                        &format!("refused: {why}"),
                        0,
                    )
                    .await;
                    let rsp =
                        Response::new(rsp_field, message_id, status::MOVE_DESTINATION_UNKNOWN)
                            .uid(tag::AFFECTED_SOP_CLASS_UID, &context.abstract_syntax)
                            .error_comment(comment)
                            .encode();
                    return self.respond(assoc, context_id, &rsp).await;
                }
                found
            }
            None => None,
        };
        let listed = {
            let (storage, identifier, ts) = (
                shared.storage.clone(),
                identifier.to_vec(),
                context.transfer_syntax.clone(),
            );
            tokio::task::spawn_blocking(move || {
                retrieve::list(&storage, &identifier, &ts, model, scope)
            })
            .await
            .unwrap_or_else(|e| Err(retrieve::ListError::Index(e.to_string())))
        };
        let (items, what) = match listed {
            Ok(listed) => listed,
            Err(failure) => {
                let (status, comment, detail, outcome) = match failure {
                    retrieve::ListError::Identifier(why) => {
                        warn!(%why, action, "invalid retrieve identifier");
                        (
                            status::DATASET_MISMATCH,
                            why.clone(),
                            why,
                            "refused: invalid identifier".to_string(),
                        )
                    }
                    retrieve::ListError::Index(why) => {
                        tracing::error!(error = %why, action, "cannot list the instances to retrieve");
                        (
                            status::CANNOT_UNDERSTAND,
                            "the index could not be read".to_string(),
                            String::new(),
                            format!("failed: {why}"),
                        )
                    }
                };
                self.audit(shared, assoc, action, &detail, &outcome, 0)
                    .await;
                let rsp = Response::new(rsp_field, message_id, status)
                    .uid(tag::AFFECTED_SOP_CLASS_UID, &context.abstract_syntax)
                    .error_comment(&comment)
                    .encode();
                return self.respond(assoc, context_id, &rsp).await;
            }
        };
        // The first stored object is read while the destination's
        // association is being opened; then one is read ahead while the
        // current one is sent.
        let read_ahead = |i: &Item| retrieve::read_ahead(&shared.storage, i);
        let mut ahead = items.first().map(read_ahead);
        let mut destination = None;
        // Nothing matched: no association (it would propose no context).
        if let Some(dest) = destination_config.filter(|_| !items.is_empty()) {
            destination = match open_destination(shared, dest, &items).await {
                Ok(d) => Some(d),
                Err(e) => {
                    warn!(destination = %dest.ae_title, error = %e, "cannot reach the move destination");
                    None
                }
            };
        }
        let total = items.len();
        // A C-CANCEL belongs to one retrieve only.
        self.pending_cancel = false;
        let (mut completed, mut failed, mut warning) = (0u32, 0u32, 0u32);
        // Stored by the receiver as a converted copy, not the bytes kept.
        let mut converted = 0u32;
        let mut failed_uids = Vec::new();
        let mut cancelled = false;
        // Nothing more is read for a move whose destination is unreachable.
        let sending = move_to.is_none() || destination.is_some();
        if !sending {
            ahead = None;
        }
        // The sub-operations and the final response; an association that
        // ends on the way still gets its audit row below.
        let mut sub_message_id = 0u16;
        let mut last_pending: Option<Instant> = None;
        let ran: Result<u16, End> = async {
            for (n, item) in items.iter().enumerate() {
                if self.cancel_arrived(message_id).await? {
                    cancelled = true;
                    break;
                }
                let blob = match ahead.take() {
                    Some(reading) => match reading.await {
                        Ok(read) => read.map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    },
                    None => Err("not read".to_string()),
                };
                // (Not for a destination given up, below.)
                let sending = move_to.is_none() || destination.is_some();
                ahead = items.get(n + 1).filter(|_| sending).map(read_ahead);
                let mut give_up = false;
                let result = match (&move_to, destination.as_mut()) {
                    (None, _) => self.get_one(assoc, item, blob, message_id).await?,
                    (Some(_), Some(dest)) => {
                        sub_message_id = sub_message_id.wrapping_add(1);
                        let originator = &assoc.source.calling_ae;
                        // The destination may take minutes to answer; a
                        // requester that aborts or goes meanwhile ends the
                        // move now, not after it.
                        let sub =
                            move_one(dest, item, blob, originator, message_id, sub_message_id);
                        let answered = tokio::select! {
                            answered = sub => answered,
                            end = self.requester_gone() => return Err(end),
                        };
                        match answered {
                            Ok(answer) => Ok(answer),
                            Err(SubOpFailure::Instance(why)) => Err(why),
                            Err(SubOpFailure::Destination(why)) => {
                                give_up = true;
                                Err(why)
                            }
                        }
                    }
                    (Some(_), None) => Err("move destination unreachable".to_string()),
                };
                if give_up && let Some(dest) = destination.take() {
                    warn!("the association to the move destination is out of step; aborted");
                    dest.abort().await;
                    // Nothing more is read for a destination given up.
                    ahead = None;
                }
                let result = result.map(|(status, was_converted)| {
                    if was_converted && (status == 0 || is_warning(status)) {
                        converted += 1;
                    }
                    status
                });
                match result {
                    Ok(0x0000) => completed += 1,
                    Ok(s) if is_warning(s) => warning += 1,
                    Ok(other) => {
                        warn!(sop_instance_uid = %item.sop_instance_uid, status = format_args!("0x{other:04X}"), "sub-operation refused");
                        failed += 1;
                        failed_uids.push(item.sop_instance_uid.clone());
                    }
                    Err(why) => {
                        warn!(sop_instance_uid = %item.sop_instance_uid, %why, "sub-operation failed");
                        failed += 1;
                        failed_uids.push(item.sop_instance_uid.clone());
                    }
                }
                // The first sub-operation's count, then one at most every
                // PENDING_INTERVAL: they are optional (PS3.4 C.4.2.3.1, C.4.3.3.1), and
                // one per instance costs the requester (a viewer drawing
                // progress) as much as it costs us.
                if n + 1 < total && last_pending.is_none_or(|t| t.elapsed() >= PENDING_INTERVAL) {
                    last_pending = Some(Instant::now());
                    let rsp = Response::new(rsp_field, message_id, status::PENDING)
                        .uid(tag::AFFECTED_SOP_CLASS_UID, &context.abstract_syntax)
                        .u16(
                            tag::NUMBER_OF_REMAINING_SUBOPERATIONS,
                            (total - n - 1).min(0xFFFF) as u16,
                        )
                        .u16(tag::NUMBER_OF_COMPLETED_SUBOPERATIONS, saturate(completed))
                        .u16(tag::NUMBER_OF_FAILED_SUBOPERATIONS, saturate(failed))
                        .u16(tag::NUMBER_OF_WARNING_SUBOPERATIONS, saturate(warning))
                        .encode();
                    self.respond(assoc, context_id, &rsp).await?;
                }
            }
            if let Some(dest) = destination.take() {
                dest.release().await;
            }
            let done = completed as usize + failed as usize + warning as usize;
            let final_status = if cancelled {
                status::CANCEL
            } else if failed == 0 && warning == 0 {
                status::SUCCESS
            } else if completed == 0 && warning == 0 {
                status::UNABLE_TO_PERFORM_SUBOPERATIONS
            } else {
                status::SUBOPERATIONS_WITH_FAILURES
            };
            let mut rsp = Response::new(rsp_field, message_id, final_status)
                .uid(tag::AFFECTED_SOP_CLASS_UID, &context.abstract_syntax)
                .u16(tag::NUMBER_OF_COMPLETED_SUBOPERATIONS, saturate(completed))
                .u16(tag::NUMBER_OF_FAILED_SUBOPERATIONS, saturate(failed))
                .u16(tag::NUMBER_OF_WARNING_SUBOPERATIONS, saturate(warning));
            if cancelled {
                rsp = rsp.u16(
                    tag::NUMBER_OF_REMAINING_SUBOPERATIONS,
                    (total - done).min(0xFFFF) as u16,
                );
            }
            let failed_list = (!failed_uids.is_empty())
                .then(|| failed_uid_list(&failed_uids, &context.transfer_syntax))
                .flatten();
            if failed_list.is_some() {
                rsp = rsp.with_dataset();
            }
            self.respond(assoc, context_id, &rsp.encode()).await?;
            if let Some(list) = failed_list {
                ul::send_message(
                    &mut self.stream,
                    context_id,
                    false,
                    &list,
                    assoc.peer_max_pdu,
                )
                .await
                .map_err(|e| End::Lost(e.to_string()))?;
            }
            Ok(final_status)
        }
        .await;
        if let Some(dest) = destination {
            // This association ended mid-retrieve: the destination's goes too.
            dest.abort().await;
        }
        let mut counts = format!("completed {completed}, failed {failed}, warning {warning}");
        if converted > 0 {
            counts += &format!(" ({converted} converted to an uncompressed syntax)");
        }
        let outcome = match &ran {
            Ok(final_status) => format!("{counts}, status 0x{final_status:04X}"),
            Err(end) => format!("{counts}, then the association ended: {}", end.summary()),
        };
        info!(
            action,
            total, completed, failed, warning, "retrieve finished"
        );
        let detail = match &move_to {
            Some(ae) => format!("to {ae}; {what}; {total} instances"),
            None => format!("{what}; {total} instances"),
        };
        self.audit(
            shared,
            assoc,
            action,
            &detail,
            &outcome,
            u64::from(completed),
        )
        .await;
        ran.map(drop)
    }

    /// One C-GET sub-operation: C-STORE back to the requester. Its status
    /// and whether what it got was a converted copy, or why it failed.
    async fn get_one(
        &mut self,
        assoc: &Established,
        item: &Item,
        blob: Result<bytes::Bytes, String>,
        get_message_id: u16,
    ) -> Result<Result<(u16, bool), String>, End> {
        let pick = assoc
            .contexts
            .iter()
            .filter(|(_, c)| c.requestor_scp && c.abstract_syntax == item.sop_class_uid)
            .filter(|(_, c)| {
                c.transfer_syntax == item.transfer_syntax
                    || storage::transcode::can_convert(&item.transfer_syntax, &c.transfer_syntax)
            })
            .min_by_key(|(id, c)| (c.transfer_syntax != item.transfer_syntax, **id))
            .map(|(id, c)| (*id, c.transfer_syntax.clone()));
        let Some((ctx, ts)) = pick else {
            return Ok(Err(format!(
                "no accepted context (with SCP role) for {} in or from {}",
                item.sop_class_uid, item.transfer_syntax
            )));
        };
        let dataset = match async { retrieve::dataset_for(blob?, item, &ts).await }.await {
            Ok(d) => d,
            Err(why) => return Ok(Err(why)),
        };
        self.last_message_id = self.last_message_id.wrapping_add(1);
        let id = self.last_message_id;
        let rq = Response::request(field::C_STORE_RQ, id, true)
            .uid(tag::AFFECTED_SOP_CLASS_UID, &item.sop_class_uid)
            .u16(tag::PRIORITY, 0)
            .uid(tag::AFFECTED_SOP_INSTANCE_UID, &item.sop_instance_uid)
            .encode();
        ul::send_command_and_dataset(&mut self.stream, ctx, &rq, &dataset, assoc.peer_max_pdu)
            .await
            .map_err(|e| End::Lost(e.to_string()))?;
        // Wait for the C-STORE-RSP; a C-CANCEL may come first.
        loop {
            let cmd = self.next_command(Vec::new(), SUB_OPERATION_ANSWER).await?;
            match cmd.command_field() {
                Some(field::C_STORE_RSP)
                    if cmd.u16(tag::MESSAGE_ID_BEING_RESPONDED_TO) == Some(id) =>
                {
                    let status = cmd.u16(tag::STATUS).unwrap_or(0xFFFF);
                    return Ok(Ok((status, ts != item.transfer_syntax)));
                }
                Some(field::C_CANCEL_RQ) if is_cancel_for(&cmd, get_message_id) => {
                    self.pending_cancel = true;
                }
                _ if take_report_ack(&mut self.unacked_reports, &cmd) => {}
                _ => {
                    return Err(End::Abort(
                        AbortReason::UnexpectedPduParameter,
                        "expected C-STORE-RSP during C-GET".into(),
                    ));
                }
            }
        }
    }

    /// The next command set from the peer (no dataset expected), continuing
    /// from fragments already in `bytes`, waiting up to `wait` for each PDU.
    async fn next_command(&mut self, mut bytes: Vec<u8>, wait: Duration) -> Result<Command, End> {
        loop {
            let pdu = tokio::time::timeout(wait, self.reader.next(&mut self.stream))
                .await
                .map_err(|_| {
                    End::Abort(
                        AbortReason::ReasonNotSpecified,
                        "peer silent during a retrieve".into(),
                    )
                })?;
            let body = pdata_or_end(pdu, "a retrieve")?;
            if let Some(command) = command_from(
                body,
                &mut bytes,
                &mut self.reader,
                &mut self.dropping_dataset,
            )? {
                return Ok(command);
            }
        }
    }

    /// Waits, while a C-MOVE sub-operation is under way, for the requester
    /// to abort or close its connection. A message from it (a C-CANCEL,
    /// say) is given back, to be read between sub-operations, and the
    /// watch ends there (never returns). Cancel-safe: a PDU is taken whole
    /// or not at all.
    async fn requester_gone(&mut self) -> End {
        if !self.reader.has_unread() {
            match pdata_or_end(self.reader.next(&mut self.stream).await, "a retrieve") {
                Ok(body) => match ul::pdvs(body) {
                    Ok(pdvs) => self.reader.unread(&pdvs),
                    Err(e) => return End::Abort(AbortReason::InvalidPduParameter, e.to_string()),
                },
                Err(end) => return end,
            }
        }
        std::future::pending().await
    }

    /// True when a C-CANCEL for `message_id` has arrived (checks without waiting).
    async fn cancel_arrived(&mut self, message_id: u16) -> Result<bool, End> {
        if self.pending_cancel {
            return Ok(true);
        }
        let ready = tokio::select! {
            biased;
            pdu = self.reader.next(&mut self.stream) => Some(pdu),
            () = std::future::ready(()) => None,
        };
        let Some(pdu) = ready else { return Ok(false) };
        let mut bytes = Vec::new();
        let command = match command_from(
            pdata_or_end(pdu, "a retrieve")?,
            &mut bytes,
            &mut self.reader,
            &mut self.dropping_dataset,
        )? {
            Some(command) => command,
            // Only a dropped dataset's fragments.
            None if bytes.is_empty() => return Ok(false),
            // The rest of a command split across PDUs follows at once.
            None => self.next_command(bytes, Duration::from_secs(60)).await?,
        };
        if take_report_ack(&mut self.unacked_reports, &command) {
            return Ok(false);
        }
        expect_cancel(&command, message_id, "a retrieve")?;
        self.pending_cancel = true;
        Ok(true)
    }

    /// A complete C-FIND identifier: stream the matches, watching for C-CANCEL.
    async fn on_find(
        &mut self,
        shared: &Shared,
        assoc: &Established,
        context_id: u8,
        message_id: u16,
        identifier: &[u8],
    ) -> Result<(), End> {
        let context = assoc.contexts[&context_id].clone();
        let scope = (!assoc.county).then(|| assoc.source.clinic_id.clone());
        let final_rsp = |status: u16, comment: Option<&str>| {
            let mut r = Response::new(field::C_FIND_RSP, message_id, status)
                .uid(tag::AFFECTED_SOP_CLASS_UID, &context.abstract_syntax);
            if let Some(c) = comment {
                r = r.error_comment(c);
            }
            r.encode()
        };
        let request = match crate::find::parse(
            identifier,
            &context.transfer_syntax,
            &context.abstract_syntax,
            scope,
        ) {
            Ok(mut r) => {
                r.query.combined_datetime = context.combined_datetime;
                r
            }
            Err(why) => {
                warn!(%why, "invalid C-FIND identifier");
                self.audit(
                    shared,
                    assoc,
                    "C-FIND",
                    &why,
                    "refused: invalid identifier",
                    0,
                )
                .await;
                return self
                    .respond(
                        assoc,
                        context_id,
                        &final_rsp(status::DATASET_MISMATCH, Some(&why)),
                    )
                    .await;
            }
        };
        let pending_status = if request.unmatched_keys {
            status::PENDING_OPTIONAL_KEYS_UNSUPPORTED
        } else {
            status::PENDING
        };
        let limit = shared.config.gateway.max_find_results;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<String>>(32);
        let storage = shared.storage.clone();
        let query = request.query.clone();
        let producer = tokio::task::spawn_blocking(move || {
            storage
                .reader()?
                .find(&query, |row| tx.blocking_send(row).is_ok())
        });

        enum Event {
            Incoming(Result<Option<Incoming>, ul::UlError>),
            Row(Option<Vec<String>>),
        }
        let mut sent = 0u64;
        let mut cancel_bytes = Vec::new();
        let mut end_status = None;
        // The matches; an association that ends on the way still gets its
        // audit row below.
        let streamed: Result<(), End> = async {
            let (mut rd, mut wr) = self.stream.split();
            loop {
                let event = tokio::select! {
                    biased;
                    incoming = self.reader.next(&mut rd) => Event::Incoming(incoming),
                    row = rx.recv() => Event::Row(row),
                };
                match event {
                    Event::Row(None) => break,
                    Event::Row(Some(values)) => {
                        if sent >= limit {
                            end_status = Some((
                                status::OUT_OF_RESOURCES,
                                "too many matches: narrow the query",
                            ));
                            break;
                        }
                        let dataset = crate::find::encode_match(
                            &request,
                            &values,
                            &context.transfer_syntax,
                            &shared.config.gateway.ae_title,
                        )
                        .map_err(|e| {
                            End::Abort(
                                AbortReason::ReasonNotSpecified,
                                format!("cannot encode match: {e}"),
                            )
                        })?;
                        let rsp = Response::new(field::C_FIND_RSP, message_id, pending_status)
                            .uid(tag::AFFECTED_SOP_CLASS_UID, &context.abstract_syntax)
                            .with_dataset()
                            .encode();
                        let sent_ok = ul::send_command_and_dataset(
                            &mut wr,
                            context_id,
                            &rsp,
                            &dataset,
                            assoc.peer_max_pdu,
                        );
                        // A client that stops reading must not pin the query forever.
                        match tokio::time::timeout(WRITE_TIMEOUT, sent_ok).await {
                            Ok(res) => res.map_err(|e| {
                                End::Lost(format!("cannot send C-FIND response: {e}"))
                            })?,
                            Err(_) => {
                                return Err(End::Abort(
                                    AbortReason::ReasonNotSpecified,
                                    "peer stopped reading C-FIND responses".into(),
                                ));
                            }
                        }
                        sent += 1;
                    }
                    Event::Incoming(pdu) => {
                        // Only a C-CANCEL for this query may arrive now.
                        let body = pdata_or_end(pdu, "a C-FIND")?;
                        if let Some(command) = command_from(
                            body,
                            &mut cancel_bytes,
                            &mut self.reader,
                            &mut self.dropping_dataset,
                        )? {
                            if take_report_ack(&mut self.unacked_reports, &command) {
                                cancel_bytes.clear();
                                continue;
                            }
                            expect_cancel(&command, message_id, "a C-FIND")?;
                            end_status = Some((status::CANCEL, ""));
                            break;
                        }
                    }
                }
            }
            Ok(())
        }
        .await;
        drop(rx); // stops the producer at its next row
        let produced = producer.await;
        if let Err(end) = streamed {
            let outcome = format!(
                "{sent} matches sent, then the association ended: {}",
                end.summary()
            );
            self.audit(shared, assoc, "C-FIND", &request.describe(), &outcome, sent)
                .await;
            return Err(end);
        }
        let (status, comment, outcome) = match (end_status, produced) {
            (Some((status::CANCEL, _)), _) => (status::CANCEL, None, "cancelled".to_string()),
            (Some((s, c)), _) => (s, Some(c), format!("stopped: {c}")),
            (None, Ok(Ok(_))) => (status::SUCCESS, None, "success".to_string()),
            (None, Ok(Err(e))) => {
                warn!(error = %e, "C-FIND query failed");
                (
                    status::CANNOT_UNDERSTAND,
                    Some("query failed"),
                    format!("failed: {e}"),
                )
            }
            (None, Err(e)) => (
                status::CANNOT_UNDERSTAND,
                Some("query failed"),
                format!("failed: {e}"),
            ),
        };
        info!(
            matches = sent,
            status = format_args!("0x{status:04X}"),
            "C-FIND answered"
        );
        self.audit(shared, assoc, "C-FIND", &request.describe(), &outcome, sent)
            .await;
        self.respond(assoc, context_id, &final_rsp(status, comment))
            .await
    }

    /// Records an access in the audit trail; a failure to audit is logged.
    async fn audit(
        &self,
        shared: &Shared,
        assoc: &Established,
        action: &str,
        detail: &str,
        outcome: &str,
        matches: u64,
    ) {
        let entry = storage::AuditEntry {
            calling_ae: assoc.source.calling_ae.clone(),
            clinic_id: assoc.source.clinic_id.clone(),
            peer: self
                .stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            action: action.to_string(),
            detail: detail.to_string(),
            outcome: outcome.to_string(),
            matches,
        };
        if let Err(e) = shared.storage.audit(entry).await {
            tracing::error!(error = %e, "cannot write the audit trail");
        }
    }

    /// The audit row of a query, retrieve or commitment request refused
    /// before it was read (answered `status` with response `response_field`);
    /// other operations touch no patient data and are not audited.
    async fn audit_refusal(
        &self,
        shared: &Shared,
        assoc: &Established,
        response_field: u16,
        status: u16,
        why: &str,
    ) {
        let action = match response_field {
            field::C_FIND_RSP => "C-FIND",
            field::C_GET_RSP => "C-GET",
            field::C_MOVE_RSP => "C-MOVE",
            field::N_ACTION_RSP => "N-ACTION",
            _ => return,
        };
        let outcome = format!("refused: 0x{status:04X}");
        self.audit(shared, assoc, action, why, &outcome, 0).await;
    }

    /// A complete N-ACTION (Request Storage Commitment): verify every
    /// instance, answer N-ACTION-RSP, then report on this association.
    async fn on_commitment(
        &mut self,
        shared: &Shared,
        assoc: &Established,
        context_id: u8,
        message_id: u16,
        dataset: &[u8],
    ) -> Result<(), End> {
        let ts = assoc.contexts[&context_id].transfer_syntax.clone();
        let request = match commitment::parse_request(dataset, &ts) {
            Ok(r) => r,
            Err(commitment::Refused { status, why }) => {
                warn!(%why, "invalid storage commitment request");
                self.audit(
                    shared,
                    assoc,
                    "N-ACTION",
                    "storage commitment",
                    &format!("refused: {why}"),
                    0,
                )
                .await;
                let rsp = commitment::action_rsp(message_id, status)
                    .error_comment(&why)
                    .encode();
                return self.respond(assoc, context_id, &rsp).await;
            }
        };
        let requested = request.references.len();
        let scope = (!assoc.county).then_some(assoc.source.clinic_id.as_str());
        self.settle_reports(shared, false).await;
        // Answering success promises a report: the request is recorded
        // first, so that a report the requester leaves without, or one cut
        // short by a restart, is still delivered (`report_delivery`).
        let owed = storage::OwedReport {
            id: 0,
            requester_ae: assoc.source.calling_ae.clone(),
            transaction_uid: request.transaction_uid.clone(),
            clinic_scope: scope.map(str::to_owned),
            references: request
                .references
                .iter()
                .map(|r| (r.sop_class_uid.clone(), r.sop_instance_uid.clone()))
                .collect(),
            created_at: crate::report_delivery::unix_now(),
            attempts: 0,
        };
        let owed_id = match shared.storage.owe_report(owed).await {
            Ok(id) => id,
            Err(e) => {
                tracing::error!(error = %e, "cannot record a storage commitment request");
                self.audit_refusal(
                    shared,
                    assoc,
                    field::N_ACTION_RSP,
                    status::PROCESSING_FAILURE,
                    "cannot record the request",
                )
                .await;
                let rsp = commitment::action_rsp(message_id, status::PROCESSING_FAILURE)
                    .error_comment("the center cannot record the request now; ask again later")
                    .encode();
                return self.respond(assoc, context_id, &rsp).await;
            }
        };
        // The request is accepted at once; the verdict follows in the
        // N-EVENT-REPORT, however long re-verifying takes (PS3.4 Annex J).
        let rsp = commitment::action_rsp(message_id, status::SUCCESS)
            .u16(tag::ACTION_TYPE_ID, commitment::ACTION_REQUEST)
            .encode();
        // Even if this answer cannot be written (the peer may still have
        // it), the report is owed: verify and queue it before giving up.
        let answered = self.respond(assoc, context_id, &rsp).await;
        let outcome = commitment::verify(&shared.storage, scope, request).await;
        // Which instances a clinic holds is patient data too: audited.
        self.audit(
            shared,
            assoc,
            "N-ACTION",
            &format!(
                "storage commitment, transaction {}; {requested} instances",
                outcome.transaction_uid
            ),
            &format!(
                "committed {}, failed {}",
                outcome.committed.len(),
                outcome.failed.len()
            ),
            outcome.committed.len() as u64,
        )
        .await;
        // If anything below fails, the ledger still has the report: it goes
        // out on a new association once this one ends.
        self.last_message_id = self.last_message_id.wrapping_add(1);
        let report_id = self.last_message_id;
        self.unacked_reports.push(UnackedReport {
            message_id: report_id,
            owed_id,
            acknowledged: false,
        });
        answered?;

        let report = commitment::event_report_dataset(&outcome, &ts).map_err(|e| {
            End::Abort(
                AbortReason::ReasonNotSpecified,
                format!("cannot encode report: {e}"),
            )
        })?;
        let rq = Response::request(field::N_EVENT_REPORT_RQ, report_id, true)
            .uid(tag::AFFECTED_SOP_CLASS_UID, commitment::SOP_CLASS)
            .uid(
                tag::AFFECTED_SOP_INSTANCE_UID,
                commitment::WELL_KNOWN_INSTANCE,
            )
            .u16(tag::EVENT_TYPE_ID, outcome.event_type())
            .encode();
        self.respond(assoc, context_id, &rq).await?;
        ul::send_message(
            &mut self.stream,
            context_id,
            false,
            &report,
            assoc.peer_max_pdu,
        )
        .await
        .map_err(|e| End::Lost(format!("cannot send commitment report: {e}")))?;
        info!(
            requested,
            committed = outcome.committed.len(),
            failed = outcome.failed.len(),
            "storage commitment reported"
        );
        Ok(())
    }

    async fn respond(
        &mut self,
        assoc: &Established,
        context_id: u8,
        command: &[u8],
    ) -> Result<(), End> {
        let send = ul::send_message(
            &mut self.stream,
            context_id,
            true,
            command,
            assoc.peer_max_pdu,
        );
        match tokio::time::timeout(WRITE_TIMEOUT, send).await {
            Ok(res) => res.map_err(|e| End::Lost(format!("cannot send response: {e}"))),
            Err(_) => Err(End::Lost("peer stopped reading".into())),
        }
    }
}

/// Opens the association to a C-MOVE destination, proposing each needed
/// (SOP class, stored transfer syntax) and an uncompressed fallback.
async fn open_destination(
    shared: &Shared,
    dest: &consortium_config::Destination,
    items: &[Item],
) -> Result<consortium_dimse::client::Association, consortium_dimse::client::ClientError> {
    use consortium_dimse::client::Proposed;
    let mut pairs = std::collections::BTreeSet::new();
    for item in items {
        pairs.insert((item.sop_class_uid.clone(), item.transfer_syntax.clone()));
        pairs.insert((
            item.sop_class_uid.clone(),
            "1.2.840.10008.1.2.1".to_string(),
        ));
    }
    // An A-ASSOCIATE-RQ holds 128 contexts (odd IDs 1-255).
    if pairs.len() > 128 {
        warn!(
            destination = %dest.ae_title,
            pairs = pairs.len(),
            "more (SOP class, transfer syntax) pairs than one association can propose; instances of those left out fail"
        );
    }
    let contexts: Vec<Proposed> = pairs
        .into_iter()
        .take(128)
        .enumerate()
        .map(|(i, (abstract_syntax, ts))| Proposed {
            id: (2 * i + 1) as u8,
            transfer_syntaxes: if ts == "1.2.840.10008.1.2.1" {
                vec![ts, "1.2.840.10008.1.2".to_string()]
            } else {
                vec![ts]
            },
            abstract_syntax,
        })
        .collect();
    consortium_dimse::client::associate(
        (dest.host.as_str(), dest.port),
        &shared.config.gateway.ae_title,
        &dest.ae_title,
        &contexts,
        shared.config.gateway.max_pdu_length,
        Duration::from_secs(30),
    )
    .await
}

/// Why a C-MOVE sub-operation failed.
enum SubOpFailure {
    /// This instance only (no accepted context, not readable, not
    /// transcodable): the next one may go.
    Instance(String),
    /// The association to the destination is out of step or gone (a
    /// request unanswered in time, a wrong or garbled answer): nothing
    /// more may be sent on it.
    Destination(String),
}

/// One C-MOVE sub-operation: C-STORE to the destination, as `message_id`
/// of that association (the C-MOVE's own is the Move Originator Message ID).
/// The destination's status, and whether what it got was a converted copy.
async fn move_one(
    dest: &mut consortium_dimse::client::Association,
    item: &Item,
    blob: Result<bytes::Bytes, String>,
    originator_ae: &str,
    originator_message_id: u16,
    message_id: u16,
) -> Result<(u16, bool), SubOpFailure> {
    let pick = dest
        .accepted
        .iter()
        .filter(|(_, (a, t))| {
            *a == item.sop_class_uid
                && (*t == item.transfer_syntax
                    || storage::transcode::can_convert(&item.transfer_syntax, t))
        })
        .min_by_key(|(id, (_, t))| (*t != item.transfer_syntax, **id))
        .map(|(id, (_, t))| (*id, t.clone()));
    let Some((ctx, ts)) = pick else {
        return Err(SubOpFailure::Instance(format!(
            "the destination accepted no context for {} in or from {}",
            item.sop_class_uid, item.transfer_syntax
        )));
    };
    let dataset = async { retrieve::dataset_for(blob?, item, &ts).await }
        .await
        .map_err(SubOpFailure::Instance)?;
    let rq = Response::request(field::C_STORE_RQ, message_id, true)
        .uid(tag::AFFECTED_SOP_CLASS_UID, &item.sop_class_uid)
        .u16(tag::PRIORITY, 0)
        .uid(tag::AFFECTED_SOP_INSTANCE_UID, &item.sop_instance_uid)
        .text(tag::MOVE_ORIGINATOR_AE_TITLE, originator_ae)
        .u16(tag::MOVE_ORIGINATOR_MESSAGE_ID, originator_message_id)
        .encode();
    let lost = |e: consortium_dimse::client::ClientError| SubOpFailure::Destination(e.to_string());
    dest.send_command_and_dataset(ctx, &rq, &dataset)
        .await
        .map_err(lost)?;
    let rsp = dest
        .receive_within(0, SUB_OPERATION_ANSWER)
        .await
        .map_err(lost)?;
    if rsp.command.command_field() != Some(field::C_STORE_RSP)
        || rsp.command.u16(tag::MESSAGE_ID_BEING_RESPONDED_TO) != Some(message_id)
    {
        return Err(SubOpFailure::Destination(
            "the destination did not answer this C-STORE-RQ".into(),
        ));
    }
    let status = rsp.command.u16(tag::STATUS).unwrap_or(0xFFFF);
    Ok((status, ts != item.transfer_syntax))
}

/// The Failed SOP Instance UID List (0008,0058) identifier.
fn failed_uid_list(uids: &[String], transfer_syntax: &str) -> Option<Vec<u8>> {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
    let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry.get(transfer_syntax)?;
    // In explicit VR a UI value has a 16-bit length: as many UIDs as fit
    // (the counts still say how many failed), not no list at all.
    let mut listed = 0usize;
    let mut length = 0usize;
    for uid in uids {
        let next = length + uid.len() + usize::from(listed > 0);
        if transfer_syntax != "1.2.840.10008.1.2" && next > 0xFFFE {
            warn!(
                listed,
                failed = uids.len(),
                "failed SOP instance UID list cut to what explicit VR can carry"
            );
            break;
        }
        (listed, length) = (listed + 1, next);
    }
    let obj = dicom_object::InMemDicomObject::from_element_iter([DataElement::new(
        dicom_dictionary_std::tags::FAILED_SOP_INSTANCE_UID_LIST,
        VR::UI,
        PrimitiveValue::Strs(uids[..listed].iter().cloned().collect()),
    )]);
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts).ok()?;
    Some(out)
}

/// The body of a P-DATA-TF that may arrive while an operation streams; any
/// other PDU, or the end of the connection, ends the association.
fn pdata_or_end(pdu: Result<Option<Incoming>, ul::UlError>, during: &str) -> Result<Bytes, End> {
    match pdu {
        Ok(Some(Incoming::PData(body))) => Ok(body),
        Ok(Some(Incoming::Other(Pdu::AbortRQ { .. }))) => Err(End::PeerAborted),
        Ok(Some(other)) => Err(End::Abort(
            AbortReason::UnexpectedPdu,
            format!("unexpected {} during {during}", pdu_kind(&other)),
        )),
        Ok(None) => Err(End::PeerClosed),
        Err(e) => Err(match e.abort_reason() {
            Some(reason) => End::Abort(reason, e.to_string()),
            None => End::Lost(e.to_string()),
        }),
    }
}

/// Adds the command fragments of a P-DATA-TF body to `bytes`; the parsed
/// command once its last fragment is in. Datasets are not expected here.
/// PDVs after that last fragment (the next message, in the same PDU) go
/// back to `reader` for whoever reads next.
fn command_from(
    body: Bytes,
    bytes: &mut Vec<u8>,
    reader: &mut PduReader,
    dropping: &mut Option<u8>,
) -> Result<Option<Command>, End> {
    let pdvs =
        ul::pdvs(body).map_err(|e| End::Abort(AbortReason::InvalidPduParameter, e.to_string()))?;
    for (i, pdv) in pdvs.iter().enumerate() {
        if !pdv.is_command {
            if *dropping == Some(pdv.context_id) {
                if pdv.is_last {
                    *dropping = None;
                }
                continue;
            }
            return Err(End::Abort(
                AbortReason::UnexpectedPduParameter,
                "unexpected dataset".into(),
            ));
        }
        if dropping.is_some() {
            return Err(End::Abort(
                AbortReason::UnexpectedPduParameter,
                "a command in the middle of a dataset".into(),
            ));
        }
        append_command(bytes, &pdv.data)?;
        if pdv.is_last {
            reader.unread(&pdvs[i + 1..]);
            let command = Command::parse(bytes)
                .map_err(|e| End::Abort(AbortReason::InvalidPduParameter, e.to_string()))?;
            // An answer to our report may carry an Event Reply (PS3.7
            // 10.1.1.1): dropped as it comes.
            if command.command_field() == Some(field::N_EVENT_REPORT_RSP) && command.has_dataset() {
                *dropping = Some(pdv.context_id);
            }
            return Ok(Some(command));
        }
    }
    Ok(None)
}

/// When `command` answers a storage commitment report we sent (an
/// N-EVENT-REPORT-RSP; [`command_from`] drops its dataset), takes it as the report's
/// acknowledgement and returns true. It may arrive at any time, also in the
/// middle of the requestor's next operation (PS3.7: responses to our
/// requests are not bound to its own). A function of the one field, for
/// callers holding the stream.
fn take_report_ack(unacked: &mut [UnackedReport], command: &Command) -> bool {
    if command.command_field() != Some(field::N_EVENT_REPORT_RSP) {
        return false;
    }
    ack_report(unacked, command);
    true
}

/// Takes an N-EVENT-REPORT-RSP as the acknowledgement of the report it
/// answers (when it says success).
fn ack_report(unacked: &mut [UnackedReport], command: &Command) {
    let status = command.u16(tag::STATUS).unwrap_or(0xFFFF);
    let answered = command.u16(tag::MESSAGE_ID_BEING_RESPONDED_TO);
    if status == status::SUCCESS {
        for r in unacked.iter_mut() {
            r.acknowledged |= Some(r.message_id) == answered;
        }
    }
    info!(
        status = format_args!("0x{status:04X}"),
        "storage commitment report acknowledged"
    );
}

/// True when `command` is a C-CANCEL for the request `message_id`.
fn is_cancel_for(command: &Command, message_id: u16) -> bool {
    command.command_field() == Some(field::C_CANCEL_RQ)
        && command.u16(tag::MESSAGE_ID_BEING_RESPONDED_TO) == Some(message_id)
}

/// Only a C-CANCEL of the operation may arrive while it streams.
fn expect_cancel(command: &Command, message_id: u16, during: &str) -> Result<(), End> {
    if is_cancel_for(command, message_id) {
        Ok(())
    } else {
        Err(End::Abort(
            AbortReason::UnexpectedPduParameter,
            format!("only C-CANCEL may interrupt {during}"),
        ))
    }
}

/// A sub-operation status that counts as a warning: the C-STORE warnings
/// (PS3.4 B.2.3, 0xBxxx) and the general ones of PS3.7 Annex C (attribute
/// list error, attribute value out of range): the instance was stored.
fn is_warning(status: u16) -> bool {
    matches!(status, 0xB000..=0xBFFF | 0x0107 | 0x0116)
}

/// A sub-operation count as the US element carries it.
fn saturate(n: u32) -> u16 {
    n.min(u32::from(u16::MAX)) as u16
}

/// Adds a command fragment, refusing command sets beyond the limit.
fn append_command(bytes: &mut Vec<u8>, fragment: &[u8]) -> Result<(), End> {
    if bytes.len() + fragment.len() > consortium_dimse::command::MAX_COMMAND_BYTES {
        return Err(End::Abort(
            AbortReason::InvalidPduParameter,
            "command set too large".into(),
        ));
    }
    bytes.extend_from_slice(fragment);
    Ok(())
}

/// `None` when an N-ACTION is a valid storage commitment request, else the
/// status to refuse it with.
fn check_commitment_request(command: &Command, context: &Context) -> Option<u16> {
    if context.abstract_syntax != commitment::SOP_CLASS
        || command.uid(tag::REQUESTED_SOP_CLASS_UID).as_deref() != Some(commitment::SOP_CLASS)
    {
        return Some(status::SOP_CLASS_NOT_SUPPORTED);
    }
    if command.uid(tag::REQUESTED_SOP_INSTANCE_UID).as_deref()
        != Some(commitment::WELL_KNOWN_INSTANCE)
    {
        return Some(status::NO_SUCH_SOP_INSTANCE);
    }
    if command.u16(tag::ACTION_TYPE_ID) != Some(commitment::ACTION_REQUEST) {
        return Some(status::NO_SUCH_ACTION);
    }
    None
}

fn pdu_kind(pdu: &Incoming) -> &'static str {
    match pdu {
        Incoming::PData(_) => "P-DATA-TF",
        Incoming::Other(p) => match p {
            Pdu::AssociationRQ(_) => "A-ASSOCIATE-RQ",
            Pdu::AssociationAC(_) => "A-ASSOCIATE-AC",
            Pdu::AssociationRJ(_) => "A-ASSOCIATE-RJ",
            Pdu::PData { .. } => "P-DATA-TF",
            Pdu::ReleaseRQ => "A-RELEASE-RQ",
            Pdu::ReleaseRP => "A-RELEASE-RP",
            Pdu::AbortRQ { .. } => "A-ABORT",
            Pdu::Unknown { .. } => "unknown PDU",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed-UID list too long for explicit VR's 16-bit length is cut to
    /// what fits; implicit VR carries it all.
    #[test]
    fn failed_uid_lists_fit_their_transfer_syntax() {
        let uids: Vec<String> = (0..2000).map(|i| format!("2.25.{i:058}")).collect();
        let explicit = failed_uid_list(&uids, "1.2.840.10008.1.2.1").expect("encoded");
        let value_len = u16::from_le_bytes([explicit[6], explicit[7]]) as usize;
        assert_eq!(explicit.len(), 8 + value_len);
        assert_eq!(value_len / 64, 65534 / 64, "as many 63-byte UIDs as fit");
        let implicit = failed_uid_list(&uids, "1.2.840.10008.1.2").expect("encoded");
        let value_len = u32::from_le_bytes(implicit[4..8].try_into().unwrap()) as usize;
        assert_eq!(value_len, 2000 * 64 - 1 + 1, "all, padded to even");
    }
}
