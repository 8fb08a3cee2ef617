//! The gRPC services: each call is authenticated, authorized by role and
//! clinic, and (when it touches patient data or is refused) audited.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use consortium_config::Config;
use consortium_proto::v1 as pb;
use consortium_proto::v1::center_service_server::CenterService;
use consortium_proto::v1::identity_service_server::IdentityService;
use consortium_proto::v1::image_service_server::ImageService;
use consortium_proto::v1::study_service_server::StudyService;
use consortium_proto::v1::worklist_service_server::WorklistService;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::audit::{self, Entry};
use crate::auth::{Auth, Caller};
use crate::db::Db;
use crate::error::{ApiError, Result};
use crate::images::{self, Images};
use crate::streams::{StreamLimits, StreamSlot};
use crate::studies;
use crate::worklist::{Scope, Watcher, Worklist};

type Streamed<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send>>;

/// How often a running watch checks its token again.
const WATCH_RECHECK: Duration = Duration::from_secs(2);

/// State shared by every service.
pub struct App {
    pub config: Config,
    pub db: Db,
    pub auth: Auth,
    pub worklist: Arc<Worklist>,
    pub images: Arc<Images>,
    /// Long-lived streams open per user.
    pub streams: Arc<StreamLimits>,
    /// Largest GetStudyMetadata answer, in bytes.
    pub metadata_answer_limit: usize,
    /// Unauthenticated refusals audited per peer address and minute.
    refusals: std::sync::Mutex<HashMap<String, RefusalWindow>>,
}

/// Refused unauthenticated calls from one address in the current minute.
struct RefusalWindow {
    started: Instant,
    audited: u32,
    suppressed: u32,
}

/// Unauthenticated refusals audited one by one per address and minute;
/// beyond that they are counted, and the count is audited once.
const REFUSALS_AUDITED_PER_MINUTE: u32 = 60;
const REFUSAL_WINDOW: Duration = Duration::from_secs(60);

/// Removes the windows ended by `now`; the audit rows of the refusals
/// they only counted.
fn ended_windows(windows: &mut HashMap<String, RefusalWindow>, now: Instant) -> Vec<Entry> {
    let mut entries = Vec::new();
    windows.retain(|peer, w| {
        if now.saturating_duration_since(w.started) < REFUSAL_WINDOW {
            return true;
        }
        if w.suppressed > 0 {
            entries.push(Entry {
                action: "Refused",
                peer: peer.clone(),
                outcome: format!(
                    "denied: {} more unauthenticated calls that minute, not listed one by one",
                    w.suppressed
                ),
                matches: u64::from(w.suppressed),
                ..Entry::default()
            });
        }
        false
    });
    entries
}

fn peer_of<T>(req: &Request<T>) -> String {
    req.remote_addr()
        .map_or_else(|| "unknown".to_string(), |a| a.ip().to_string())
}

impl App {
    pub fn open(config: Config) -> Result<Arc<App>> {
        let viewer = config.viewer.clone().ok_or_else(|| {
            ApiError::InvalidArgument("the configuration has no [viewer] section".into())
        })?;
        let db = Db::open_configured(&config)?;
        let blobs = storage::BlobStore::open(&config.storage)?;
        Ok(Arc::new(App {
            auth: Auth::new(db.clone(), Duration::from_secs(viewer.token_lifetime_s))?,
            worklist: Worklist::new(
                db.clone(),
                Duration::from_secs(viewer.worklist_settle_s),
                Duration::from_secs(viewer.lease_s),
            ),
            refusals: std::sync::Mutex::new(HashMap::new()),
            streams: StreamLimits::new(viewer.max_streams_per_user),
            metadata_answer_limit: (viewer.max_metadata_answer_kib << 10) as usize,
            images: Arc::new(Images::new(
                blobs,
                (viewer.render_cache_mib << 20) as usize,
                (viewer.frame_cache_mib << 20) as usize,
            )),
            db,
            config,
        }))
    }

    /// Authenticates the call; a refusal is audited.
    async fn caller<T>(&self, req: &Request<T>, action: &'static str) -> Result<Caller, Status> {
        let peer = peer_of(req);
        match self.auth.authenticate(req.metadata(), peer.clone()).await {
            Ok(c) => Ok(c),
            Err(e) => {
                if let Some(entry) = self.refusal_entry(action, &peer, &e)
                    && let Err(a) = audit::record(&self.db, entry).await
                {
                    tracing::error!(error = %a, "audit write failed");
                }
                Err(e.into())
            }
        }
    }

    /// The audit row for an unauthenticated refusal, unless this address
    /// already had its share this minute (then it is only counted, and the
    /// count is written with the first refusal of a later minute).
    fn refusal_entry(&self, action: &'static str, peer: &str, e: &ApiError) -> Option<Entry> {
        let mut windows = self.refusals.lock().expect("refusals lock");
        if windows.len() > 10_000 {
            // Ended windows with nothing left to write (the others are
            // written by `flush_refusals`).
            windows.retain(|_, w| w.started.elapsed() < REFUSAL_WINDOW || w.suppressed > 0);
        }
        // Per IPv4 address or IPv6 /64, as failed logins are counted.
        let w = windows
            .entry(crate::auth::limiter_scope(peer))
            .or_insert(RefusalWindow {
                started: Instant::now(),
                audited: 0,
                suppressed: 0,
            });
        let mut outcome = e.outcome();
        if w.started.elapsed() >= REFUSAL_WINDOW {
            if w.suppressed > 0 {
                outcome = format!(
                    "{outcome} (and {} earlier refusals not listed)",
                    w.suppressed
                );
            }
            *w = RefusalWindow {
                started: Instant::now(),
                audited: 0,
                suppressed: 0,
            };
        }
        if w.audited >= REFUSALS_AUDITED_PER_MINUTE {
            w.suppressed += 1;
            return None;
        }
        w.audited += 1;
        Some(Entry {
            action,
            peer: peer.to_string(),
            outcome,
            ..Entry::default()
        })
    }

    /// Writes the counts of refusals not listed one by one, for addresses
    /// whose minute has ended (also when they never come back), and
    /// forgets those windows. Run every few seconds by the server.
    pub async fn flush_refusals(&self) {
        let entries = {
            let mut windows = self.refusals.lock().expect("refusals lock");
            ended_windows(&mut windows, Instant::now())
        };
        for entry in entries {
            if let Err(e) = audit::record(&self.db, entry).await {
                tracing::error!(error = %e, "audit write failed");
            }
        }
    }

    /// [`App::audited`], with one more row for each of `others`: patients
    /// besides the entry's whose instances the answer carries (another
    /// clinic's instances filed into the study or series).
    async fn audited_patients<T>(
        &self,
        entry: Entry,
        others: &[String],
        result: Result<T>,
    ) -> Result<T, Status> {
        for mut row in per_patient(&entry, others).into_iter().skip(1) {
            row.set_outcome(&result);
            audit::record(&self.db, row).await?;
        }
        self.audited(entry, result).await
    }

    /// Records the call's outcome; data is only returned once its access is audited.
    async fn audited<T>(&self, mut entry: Entry, result: Result<T>) -> Result<T, Status> {
        entry.set_outcome(&result);
        if let Err(e) = audit::record(&self.db, entry).await {
            return Err(e.into());
        }
        result.map_err(Status::from)
    }
}

/// What a running stream ends with when its token is no longer valid.
fn token_lapsed() -> Status {
    Status::unauthenticated("the token is no longer valid; log in again")
}

/// `rx`'s items, for as long as `caller`'s token stays valid (checked every
/// [`WATCH_RECHECK`], as a watch is): a logout, revocation, disabled user or
/// expiry ends a long download or series stream with `unauthenticated`
/// instead of letting it run on. Dropping `rx` stops its producer. `slot`
/// is held until the stream ends. How the stream ended (completed, failed,
/// its token lapsed, its client gone) and how many messages went out is
/// audited in `closing`, the stream's rows (one per patient): the rows
/// written when it started can only say it was allowed.
fn while_valid<T: Send + 'static>(
    app: Arc<App>,
    caller: Caller,
    slot: Arc<StreamSlot>,
    mut rx: mpsc::Receiver<std::result::Result<T, Status>>,
    closing: Vec<Entry>,
) -> Streamed<T> {
    let (tx, out) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut recheck = tokio::time::interval(WATCH_RECHECK);
        recheck.tick().await; // (the first tick is immediate)
        let mut sent = 0u64;
        let mut failure: Option<String> = None;
        let (last_error, ended) = loop {
            tokio::select! {
                biased;
                _ = recheck.tick() => {
                    if !app.auth.still_valid(&caller).await {
                        break (Some(token_lapsed()), Some("the token is no longer valid"));
                    }
                }
                item = rx.recv() => match item {
                    Some(item) => {
                        let error = item.as_ref().err().map(|e| e.message().to_string());
                        if !send_or_give_up(&tx, item).await {
                            break (None, Some(if tx.is_closed() {
                                "the client cancelled it"
                            } else {
                                "the client stopped reading"
                            }));
                        }
                        match error {
                            Some(e) => failure = Some(e),
                            None => sent += 1,
                        }
                    }
                    None => break (None, None),
                },
                () = tx.closed() => break (None, Some("the client cancelled it")),
            }
        };
        // The producer stops and the place is given back before the last
        // error waits for a client that may not read it.
        drop((rx, slot));
        let outcome = match (failure, ended) {
            (Some(why), _) => format!("failed after {sent} messages: {why}"),
            (None, Some(why)) => format!("ended after {sent} messages: {why}"),
            (None, None) => format!("completed: {sent} messages"),
        };
        // One row per patient the stream carried, as when it started.
        for mut row in closing {
            row.matches = sent;
            row.outcome = outcome.clone();
            if let Err(e) = audit::record(&app.db, row).await {
                tracing::error!(error = %e, "audit write failed");
            }
        }
        if let Some(e) = last_error {
            send_or_give_up(&tx, Err(e)).await;
        }
    });
    Box::pin(ReceiverStream::new(out))
}

/// How long a stream waits for its client to take the next message: a
/// client that stops reading loses the stream (and gives its place back).
const STREAM_SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `item` unless the client is gone or has not read for
/// [`STREAM_SEND_TIMEOUT`]; false when the stream should end. (A last
/// error, such as a lapsed token, goes the same way: a client that reads
/// again within the time learns why its stream ended.)
async fn send_or_give_up<T>(tx: &mpsc::Sender<T>, item: T) -> bool {
    matches!(
        tokio::time::timeout(STREAM_SEND_TIMEOUT, tx.send(item)).await,
        Ok(Ok(()))
    )
}

/// `entry`, then a copy of it for each of `others` (patient refs).
fn per_patient(entry: &Entry, others: &[String]) -> Vec<Entry> {
    std::iter::once(entry.clone())
        .chain(others.iter().map(|p| Entry {
            patient_ref: p.clone(),
            ..entry.clone()
        }))
        .collect()
}

/// Where a paged GetStudyMetadata pass goes on: after the instance whose
/// sort key `page_token` carries (see [`studies::StudyInstance::sort_key`]),
/// whether that instance is still there or not, so a re-sent instance that
/// moved meanwhile neither stops the pass nor repeats the instances
/// between. An empty token starts at the first instance.
fn metadata_page_start(
    instances: &[studies::StudyInstance],
    page_size: u32,
    page_token: &str,
) -> Result<usize, ApiError> {
    if page_token.is_empty() {
        return Ok(0);
    }
    if page_size == 0 {
        // Unpaged, the rest of a study would pass for all of it.
        return Err(ApiError::InvalidArgument(
            "page_token goes with a page_size".into(),
        ));
    }
    let after = studies::SortKey::from_token(page_token).ok_or_else(|| {
        ApiError::InvalidArgument("page_token is not one this center gave".into())
    })?;
    Ok(instances.partition_point(|i| i.sort_key <= after))
}

/// Instance headers GetStudyMetadata reads at once: enough to hide a
/// bucket's round trips; parsing them still takes render workers' turns.
const HEADERS_AHEAD: usize = 8;

/// The instances from `from` on (all of them unpaged, at most `page_size`
/// paged) whose metadata fits in one answer of the configured size.
/// Unpaged, a study that does not fit is refused, not cut short: a client
/// that does not page must not take part of a study for all of it.
async fn metadata_page(
    app: &App,
    instances: &[studies::StudyInstance],
    from: usize,
    page_size: u32,
) -> Result<pb::GetStudyMetadataResponse, ApiError> {
    use prost::Message;
    let paged = page_size > 0;
    let last = match paged {
        true => instances.len().min(from.saturating_add(page_size as usize)),
        false => instances.len(),
    };
    let limit = app.metadata_answer_limit;
    // The message around the JSON and the references: field tags,
    // lengths, the page token.
    let mut size = 256;
    let mut json = String::from("[");
    let mut to = from;
    // Several headers read at once (from a bucket, each a round trip),
    // taken in order; those read ahead of a page's end are dropped.
    let mut headers = futures::stream::iter(from..last)
        .map(|i| {
            let (images, key, size) = (
                app.images.clone(),
                instances[i].blob_key.clone(),
                instances[i].size,
            );
            async move { Ok::<_, ApiError>((i, images.header_json(&key, size).await?)) }
        })
        .buffered(HEADERS_AHEAD);
    while let Some(header) = headers.next().await {
        let (i, one) = header?;
        let instance = &instances[i];
        let reference = instance.reference.encoded_len();
        size += one.len() + 1 + reference + 11;
        if size > limit {
            if paged && to > from {
                break; // the rest on the next page
            }
            let mib = limit as f64 / (1 << 20) as f64;
            return Err(ApiError::ResourceExhausted(if to > from {
                format!(
                    "the study's metadata is more than one answer may be ({mib:.1} MiB): \
                     ask for it in pages (page_size)"
                )
            } else {
                // Nothing can carry it: say how to go on past it.
                format!(
                    "instance {}'s metadata alone is more than one answer may be \
                     ({mib:.1} MiB); page_token {} goes on after it",
                    instance.reference.sop_instance_uid,
                    instance.sort_key.token()
                )
            }));
        }
        if to > from {
            json.push(',');
        }
        json.push_str(&one);
        to += 1;
    }
    json.push(']');
    let next_page_token = match paged && to < instances.len() {
        true => instances[to - 1].sort_key.token(),
        false => String::new(),
    };
    Ok(pb::GetStudyMetadataResponse {
        dicom_json: json,
        instances: instances[from..to]
            .iter()
            .map(|i| i.reference.clone())
            .collect(),
        next_page_token,
    })
}

/// The patients of `refs` other than `first`, each once, in order.
fn other_patients<'a>(first: &str, refs: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut others: Vec<String> = Vec::new();
    for r in refs {
        if r != first && !others.contains(r) {
            others.push(r.clone());
        }
    }
    others
}

/// The audit trail's `clinic:patient-id` of a worklist item.
fn patient_ref(item: &pb::WorklistItem) -> String {
    format!("{}:{}", item.clinic_id, item.patient_id)
}

pub struct Identity(pub Arc<App>);
pub struct Worklists(pub Arc<App>);
pub struct Studies(pub Arc<App>);
pub struct Imaging(pub Arc<App>);
pub struct Center(pub Arc<App>);

#[tonic::async_trait]
impl IdentityService for Identity {
    async fn login(
        &self,
        req: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let peer = peer_of(&req);
        let r = req.into_inner();
        let result = self.0.auth.login(&r.username, &r.password, &peer).await;
        // As typed, without control characters (no forged audit lines).
        let username: String = r
            .username
            .chars()
            .filter(|c| !c.is_control())
            .take(64)
            .collect();
        let result = match result {
            Ok(signed_in) => Ok(signed_in),
            Err(e) => {
                // Failed logins need no account: like other unauthenticated
                // refusals, an address gets its share of rows a minute, then
                // a count (the append-only audit table is no disk to fill).
                if let Some(mut entry) = self.0.refusal_entry("Login", &peer, &e) {
                    entry.username = username;
                    if let Err(a) = audit::record(&self.0.db, entry).await {
                        tracing::error!(error = %a, "audit write failed");
                    }
                }
                return Err(e.into());
            }
        };
        let entry = Entry {
            action: "Login",
            username,
            peer,
            clinic_id: result
                .as_ref()
                .map(|(_, _, u)| u.clinic_id.clone())
                .unwrap_or_default(),
            ..Entry::default()
        };
        let (token, expires, user) = self.0.audited(entry, result).await?;
        Ok(Response::new(pb::LoginResponse {
            token,
            expires_at_unix: expires,
            user: Some(pb::User {
                username: user.username,
                display_name: user.display_name,
                role: user.role.to_proto() as i32,
                clinic_id: user.clinic_id,
            }),
        }))
    }

    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let caller = self.0.caller(&req, "WhoAmI").await?;
        Ok(Response::new(pb::WhoAmIResponse {
            user: Some(caller.to_proto()),
            expires_at_unix: caller.expires_at,
        }))
    }

    async fn logout(
        &self,
        req: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        let caller = self.0.caller(&req, "Logout").await?;
        self.0.auth.logout(&caller).await?;
        Ok(Response::new(pb::LogoutResponse {}))
    }
}

#[tonic::async_trait]
impl WorklistService for Worklists {
    async fn list_worklist(
        &self,
        req: Request<pb::ListWorklistRequest>,
    ) -> Result<Response<pb::ListWorklistResponse>, Status> {
        let caller = self.0.caller(&req, "ListWorklist").await?;
        let r = req.into_inner();
        let mut entry = Entry::new("ListWorklist", &caller);
        entry.detail = format!("{:?}", r.filter.clone().unwrap_or_default());
        let result = async {
            let scope = Scope::for_caller(&caller, r.filter.as_ref())?;
            self.0.worklist.list(scope, r.limit).await
        }
        .await;
        entry.matches = result.as_ref().map_or(0, |i| i.len() as u64);
        let items = self.0.audited(entry, result).await?;
        Ok(Response::new(pb::ListWorklistResponse { items }))
    }

    async fn claim(
        &self,
        req: Request<pb::ClaimRequest>,
    ) -> Result<Response<pb::ClaimResponse>, Status> {
        let caller = self.0.caller(&req, "Claim").await?;
        let uid = req.into_inner().study_instance_uid;
        let mut entry = Entry::new("Claim", &caller);
        let result = async {
            studies::check_uid(&uid, "study_instance_uid")?;
            entry.study_uid = uid.clone();
            self.0.worklist.claim(&caller, uid.clone()).await
        }
        .await;
        if let Ok(item) = &result {
            entry.patient_ref = patient_ref(item);
        }
        let item = self.0.audited(entry, result).await?;
        Ok(Response::new(pb::ClaimResponse { item: Some(item) }))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let caller = self.0.caller(&req, "Release").await?;
        let uid = req.into_inner().study_instance_uid;
        let mut entry = Entry::new("Release", &caller);
        let result = async {
            studies::check_uid(&uid, "study_instance_uid")?;
            entry.study_uid = uid.clone();
            self.0.worklist.release(&caller, uid.clone()).await
        }
        .await;
        self.0.audited(entry, result).await?;
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    async fn set_priority(
        &self,
        req: Request<pb::SetPriorityRequest>,
    ) -> Result<Response<pb::SetPriorityResponse>, Status> {
        let caller = self.0.caller(&req, "SetPriority").await?;
        let r = req.into_inner();
        let mut entry = Entry::new("SetPriority", &caller);
        entry.detail = format!("priority {}", r.priority);
        let result = async {
            studies::check_uid(&r.study_instance_uid, "study_instance_uid")?;
            entry.study_uid = r.study_instance_uid.clone();
            let priority = pb::Priority::try_from(r.priority)
                .map_err(|_| ApiError::InvalidArgument("unknown priority".into()))?;
            self.0
                .worklist
                .set_priority(&caller, r.study_instance_uid.clone(), priority)
                .await
        }
        .await;
        if let Ok(item) = &result {
            entry.patient_ref = patient_ref(item);
        }
        let item = self.0.audited(entry, result).await?;
        Ok(Response::new(pb::SetPriorityResponse { item: Some(item) }))
    }

    type WatchWorklistStream = Streamed<pb::WorklistEvent>;

    async fn watch_worklist(
        &self,
        req: Request<pb::WatchWorklistRequest>,
    ) -> Result<Response<Self::WatchWorklistStream>, Status> {
        let caller = self.0.caller(&req, "WatchWorklist").await?;
        let r = req.into_inner();
        let mut entry = Entry::new("WatchWorklist", &caller);
        entry.detail = format!("{:?}", r.filter.clone().unwrap_or_default());
        let mut changes = self.0.worklist.subscribe();
        let result = async {
            let scope = Scope::for_caller(&caller, r.filter.as_ref())?;
            let slot = self.0.streams.acquire(&caller)?;
            let current = self.0.worklist.list(scope.clone(), 500).await?;
            Ok((scope, current, slot))
        }
        .await;
        entry.matches = result.as_ref().map_or(0, |(_, c, _)| c.len() as u64);
        let (scope, current, slot) = self.0.audited(entry, result).await?;
        let (tx, rx) = mpsc::channel(64);
        let app = self.0.clone();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            let mut watcher = Watcher::new(scope, &current);
            for item in current {
                let event = pb::WorklistEvent {
                    kind: pb::worklist_event::Kind::Current as i32,
                    item: Some(item),
                };
                if !send_or_give_up(&tx, Ok(event)).await {
                    return;
                }
            }
            // The token is checked again while the stream lives: logout,
            // revocation, a disabled user or expiry end it.
            let mut recheck = tokio::time::interval(WATCH_RECHECK);
            let last_error = loop {
                tokio::select! {
                    _ = tx.closed() => break None,
                    _ = recheck.tick() => {
                        if !app.auth.still_valid(&caller).await {
                            break Some(token_lapsed());
                        }
                    }
                    change = changes.recv() => match change {
                        Ok(change) => {
                            let (kind, item) = match watcher.event(&app.worklist, change).await {
                                Ok(Some(event)) => event,
                                Ok(None) => continue,
                                Err(e) => break Some(e.into()),
                            };
                            // Each pushed item is a read of that patient's
                            // data: audited before it goes out.
                            let mut entry = Entry::new("WatchWorklist", &caller);
                            entry.detail = format!("event {}", kind.as_str_name());
                            entry.study_uid = item.study_instance_uid.clone();
                            entry.patient_ref = patient_ref(&item);
                            entry.matches = 1;
                            if let Err(e) = app.audited(entry, Ok(())).await {
                                break Some(e);
                            }
                            let event = pb::WorklistEvent {
                                kind: kind as i32,
                                item: Some(item),
                            };
                            if !send_or_give_up(&tx, Ok(event)).await {
                                break None;
                            }
                        }
                        Err(RecvError::Lagged(n)) => {
                            // Events were lost: the client's list is wrong now.
                            tracing::warn!(skipped = n, "worklist watcher lagged");
                            break Some(Status::aborted("the watch fell behind; start it again"));
                        }
                        Err(RecvError::Closed) => break None,
                    },
                }
            };
            // The place is given back before the last error waits for a
            // client that may not read it.
            drop((changes, slot));
            if let Some(e) = last_error {
                send_or_give_up(&tx, Err(e)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl StudyService for Studies {
    async fn get_study_metadata(
        &self,
        req: Request<pb::GetStudyMetadataRequest>,
    ) -> Result<Response<pb::GetStudyMetadataResponse>, Status> {
        let caller = self.0.caller(&req, "GetStudyMetadata").await?;
        let pb::GetStudyMetadataRequest {
            study_instance_uid: uid,
            page_size,
            page_token,
            series_instance_uid: series,
            sop_instance_uid: instance,
        } = req.into_inner();
        let mut entry = Entry::new("GetStudyMetadata", &caller);
        let mut others = Vec::new();
        let app = self.0.clone();
        let result = async {
            caller.require_patient_access()?;
            studies::check_uid(&uid, "study_instance_uid")?;
            entry.study_uid = uid.clone();
            let c = caller.clone();
            for (value, field) in [
                (&series, "series_instance_uid"),
                (&instance, "sop_instance_uid"),
            ] {
                if !value.is_empty() {
                    studies::check_uid(value, field)?;
                }
            }
            let (study, mut instances) = app
                .db
                .read(move |conn| {
                    let study = studies::find_study(conn, &c, &uid)?;
                    let instances = studies::study_instances(conn, &c, study.pk)?;
                    Ok((study, instances))
                })
                .await?;
            // One series or one instance of it: the same order, the same
            // paging; not found like a study the caller may not see.
            if !series.is_empty() {
                instances.retain(|i| i.reference.series_instance_uid == series);
                if instances.is_empty() {
                    return Err(ApiError::NotFound("series"));
                }
            }
            if !instance.is_empty() {
                instances.retain(|i| i.reference.sop_instance_uid == instance);
                if instances.is_empty() {
                    return Err(ApiError::NotFound("instance"));
                }
            }
            let from = metadata_page_start(&instances, page_size, &page_token)?;
            // The study's patient, unless the caller reached the study only
            // through instances its clinic filed there: then only theirs
            // (those of this page).
            entry.patient_ref = match instances.get(from).or(instances.first()) {
                Some(first) if !caller.may_see_clinic(&study.clinic_id) => {
                    first.patient_ref.clone()
                }
                _ => study.patient_ref.clone(),
            };
            let page = metadata_page(&app, &instances, from, page_size).await?;
            others = other_patients(
                &entry.patient_ref,
                instances[from..from + page.instances.len()]
                    .iter()
                    .map(|i| &i.patient_ref),
            );
            Ok(page)
        }
        .await;
        entry.matches = result.as_ref().map_or(0, |r| r.instances.len() as u64);
        Ok(Response::new(
            self.0.audited_patients(entry, &others, result).await?,
        ))
    }

    async fn get_priors(
        &self,
        req: Request<pb::GetPriorsRequest>,
    ) -> Result<Response<pb::GetPriorsResponse>, Status> {
        let caller = self.0.caller(&req, "GetPriors").await?;
        let uid = req.into_inner().study_instance_uid;
        let mut entry = Entry::new("GetPriors", &caller);
        let result = async {
            caller.require_patient_access()?;
            studies::check_uid(&uid, "study_instance_uid")?;
            entry.study_uid = uid.clone();
            let c = caller.clone();
            let (study, priors) = self
                .0
                .db
                .read(move |conn| {
                    let study = studies::find_study(conn, &c, &uid)?;
                    // A study a clinic reaches only through instances it
                    // filed there is another clinic's patient: linking it
                    // to the clinic's own patients would tell who that is.
                    if !c.may_see_clinic(&study.clinic_id) {
                        return Err(ApiError::NotFound("study"));
                    }
                    let priors = studies::priors(conn, &c, &study)?;
                    Ok((study, priors))
                })
                .await?;
            entry.patient_ref = study.patient_ref;
            Ok(priors)
        }
        .await;
        entry.matches = result.as_ref().map_or(0, |p| p.len() as u64);
        let priors = self.0.audited(entry, result).await?;
        Ok(Response::new(pb::GetPriorsResponse { priors }))
    }
}

/// What the first blocking hop of a render found.
enum RenderStep {
    /// Answered and audited: a frame rendered before, or a refusal.
    Done(Result<pb::RenderedFrame>),
    /// A frame to render after a worker's turn; its audit row follows.
    Render(Box<(Entry, studies::InstanceRow, images::Spec)>),
}

impl App {
    /// Finds the instance with the caller's access check, renders the frame
    /// (or takes it from the cache) and writes the audit row. A frame
    /// rendered before takes one blocking hop (lookup, cache, audit row); a
    /// frame to render waits for a worker's turn between two hops, holding
    /// no thread while it waits.
    async fn render_audited(
        self: &Arc<Self>,
        caller: Caller,
        action: &'static str,
        sop_uid: String,
        spec: Result<images::Spec>,
    ) -> Result<pb::RenderedFrame, Status> {
        let app = self.clone();
        let step = tokio::task::spawn_blocking(move || -> Result<RenderStep> {
            let mut entry = Entry::new(action, &caller);
            let frame = spec.as_ref().map_or(1, |s| s.frame + 1);
            entry.detail = format!("{sop_uid} frame {frame}");
            let answer = match app.render_lookup(&caller, &sop_uid, spec, &mut entry) {
                Ok((instance, spec)) => match app.images.cached(&instance, &spec) {
                    Some(hit) => Ok(images::to_proto(&instance.sop_instance_uid, &spec, &hit)),
                    None => return Ok(RenderStep::Render(Box::new((entry, instance, spec)))),
                },
                Err(e) => Err(e),
            };
            entry.set_outcome(&answer);
            audit::record_blocking(&app.db, entry)?;
            Ok(RenderStep::Done(answer))
        })
        .await
        .map_err(ApiError::from)??;
        let (mut entry, instance, spec) = match step {
            RenderStep::Done(answer) => return answer.map_err(Status::from),
            RenderStep::Render(found) => *found,
        };
        // A task of its own: a client that gives up while the render waits
        // for its turn still leaves the audit row of an allowed access.
        let app = self.clone();
        tokio::spawn(async move {
            let turn = match app.images.worker().await {
                Ok(turn) => turn,
                Err(e) => {
                    entry.outcome = e.outcome();
                    audit::record(&app.db, entry).await?;
                    return Err(e);
                }
            };
            let handle = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                let answer = app
                    .images
                    .render_blocking(&instance, &spec, &handle, &turn)
                    .map(|r| images::to_proto(&instance.sop_instance_uid, &spec, &r));
                drop(turn);
                entry.set_outcome(&answer);
                audit::record_blocking(&app.db, entry)?;
                answer
            })
            .await?
        })
        .await
        .map_err(ApiError::from)?
        .map_err(Status::from)
    }

    /// The instance and the frame asked for, checked against the caller's
    /// access and the instance's frames; fills the audit entry. On a
    /// blocking thread.
    fn render_lookup(
        &self,
        caller: &Caller,
        sop_uid: &str,
        spec: Result<images::Spec>,
        entry: &mut Entry,
    ) -> Result<(studies::InstanceRow, images::Spec)> {
        let instance = self.instance_blocking(caller, sop_uid, entry)?;
        let spec = spec?;
        if spec.frame >= instance.number_of_frames {
            return Err(ApiError::InvalidArgument(format!(
                "frame {} is out of range (the instance has {})",
                spec.frame + 1,
                instance.number_of_frames
            )));
        }
        Ok((instance, spec))
    }

    /// The instance, checked against the caller's access; fills the audit
    /// entry. On a blocking thread.
    fn instance_blocking(
        &self,
        caller: &Caller,
        sop_uid: &str,
        entry: &mut Entry,
    ) -> Result<studies::InstanceRow> {
        caller.require_patient_access()?;
        studies::check_uid(sop_uid, "sop_instance_uid")?;
        let row = self
            .db
            .read_blocking(|c| studies::find_instance(c, caller, sop_uid))?;
        entry.study_uid = row.study_uid.clone();
        entry.patient_ref = row.patient_ref.clone();
        Ok(row)
    }
}

#[tonic::async_trait]
impl ImageService for Imaging {
    async fn render_frame(
        &self,
        req: Request<pb::RenderFrameRequest>,
    ) -> Result<Response<pb::RenderedFrame>, Status> {
        let caller = self.0.caller(&req, "RenderFrame").await?;
        let r = req.into_inner();
        let spec = images::spec_from(r.options.as_ref(), r.frame_number.max(1) - 1);
        let frame = self
            .0
            .render_audited(caller, "RenderFrame", r.sop_instance_uid, spec)
            .await?;
        Ok(Response::new(frame))
    }

    async fn get_thumbnail(
        &self,
        req: Request<pb::GetThumbnailRequest>,
    ) -> Result<Response<pb::RenderedFrame>, Status> {
        let caller = self.0.caller(&req, "GetThumbnail").await?;
        let r = req.into_inner();
        let size = if r.size == 0 { 128 } else { r.size.min(512) };
        let options = pb::RenderOptions {
            max_width: size,
            max_height: size,
            ..pb::RenderOptions::default()
        };
        let spec = images::spec_from(Some(&options), 0);
        let frame = self
            .0
            .render_audited(caller, "GetThumbnail", r.sop_instance_uid, spec)
            .await?;
        Ok(Response::new(frame))
    }

    type StreamSeriesStream = Streamed<pb::RenderedFrame>;

    async fn stream_series(
        &self,
        req: Request<pb::StreamSeriesRequest>,
    ) -> Result<Response<Self::StreamSeriesStream>, Status> {
        let caller = self.0.caller(&req, "StreamSeries").await?;
        let r = req.into_inner();
        let mut entry = Entry::new("StreamSeries", &caller);
        let mut others = Vec::new();
        entry.detail = r.series_instance_uid.clone();
        let result = async {
            caller.require_patient_access()?;
            studies::check_uid(&r.series_instance_uid, "series_instance_uid")?;
            let spec = images::spec_from(r.options.as_ref(), 0)?;
            let slot = self.0.streams.acquire(&caller)?;
            let (c, uid) = (caller.clone(), r.series_instance_uid.clone());
            let instances = self
                .0
                .db
                .read(move |conn| studies::series_instances(conn, &c, &uid))
                .await?;
            entry.study_uid = instances[0].study_uid.clone();
            entry.patient_ref = instances[0].patient_ref.clone();
            others = other_patients(
                &instances[0].patient_ref,
                instances.iter().map(|i| &i.patient_ref),
            );
            entry.matches = instances.len() as u64;
            Ok((instances, spec, slot))
        }
        .await;
        let closing = per_patient(&entry, &others);
        let (instances, spec, slot) = self.0.audited_patients(entry, &others, result).await?;
        // Held by the forwarder and by the producer: the place comes back
        // only when both have ended.
        let slot = Arc::new(slot);
        let (tx, rx) = mpsc::channel(4);
        self.0
            .images
            .stream_series(instances, spec, tx, slot.clone());
        Ok(Response::new(while_valid(
            self.0.clone(),
            caller,
            slot,
            rx,
            closing,
        )))
    }

    type GetRawInstanceStream = Streamed<pb::RawChunk>;

    async fn get_raw_instance(
        &self,
        req: Request<pb::GetRawInstanceRequest>,
    ) -> Result<Response<Self::GetRawInstanceStream>, Status> {
        let caller = self.0.caller(&req, "GetRawInstance").await?;
        let r = req.into_inner();
        let mut entry = Entry::new("GetRawInstance", &caller);
        entry.detail = r.sop_instance_uid.clone();
        let app = self.0.clone();
        let streaming_for = caller.clone();
        let slot = self.0.streams.acquire(&caller);
        let (result, entry) = tokio::task::spawn_blocking(move || {
            let result = slot.and_then(|slot| {
                app.instance_blocking(&caller, &r.sop_instance_uid, &mut entry)
                    .map(|instance| (instance, slot))
            });
            (result, entry)
        })
        .await
        .map_err(ApiError::from)?;
        let closing = entry.clone();
        let (instance, slot) = self.0.audited(entry, result).await?;
        let slot = Arc::new(slot);
        let (tx, rx) = mpsc::channel(4);
        let images = self.0.images.clone();
        let producer_slot = slot.clone();
        tokio::spawn(async move {
            let _slot = producer_slot;
            let errors = tx.clone();
            if let Err(e) = images.stream_raw(instance, tx).await {
                let _ = errors.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(while_valid(
            self.0.clone(),
            streaming_for,
            slot,
            rx,
            vec![closing],
        )))
    }
}

#[tonic::async_trait]
impl CenterService for Center {
    async fn get_center_info(
        &self,
        request: Request<pb::GetCenterInfoRequest>,
    ) -> Result<Response<pb::GetCenterInfoResponse>, Status> {
        // No patient data, but like every call, for signed-in users only.
        let caller = self.0.caller(&request, "GetCenterInfo").await?;
        // A township clinic's users count the instances whose current
        // bytes their clinic sent; the county counts everything.
        let clinic = crate::studies::counted_clinic(&caller).to_string();
        let instance_count = self
            .0
            .db
            .read(move |c| {
                let count = |r: &rusqlite::Row| r.get::<_, i64>(0);
                Ok(if clinic.is_empty() {
                    c.query_row("SELECT count(*) FROM instances", [], count)?
                } else {
                    // From the clinic's senders' rows, each looked up by its
                    // UID: no pass over every instance of the center.
                    c.query_row(
                        "SELECT count(*) FROM instance_senders s JOIN instances i \
                         ON i.sop_instance_uid = s.sop_instance_uid AND i.sha256 = s.sha256 \
                         WHERE s.clinic_id = ?1",
                        [&clinic],
                        count,
                    )?
                })
            })
            .await? as u64;
        let config = &self.0.config;
        Ok(Response::new(pb::GetCenterInfoResponse {
            ae_title: config.gateway.ae_title.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            clinics: config
                .clinics
                .iter()
                .map(|c| pb::Clinic {
                    id: c.id.clone(),
                    name: c.name.clone(),
                })
                .collect(),
            instance_count,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_refusals_are_written_when_their_minute_ends() {
        let start = Instant::now();
        let mut windows = HashMap::new();
        let window = |audited, suppressed| RefusalWindow {
            started: start,
            audited,
            suppressed,
        };
        windows.insert("10.0.0.1".to_string(), window(60, 940));
        windows.insert("10.0.0.2".to_string(), window(3, 0));
        assert!(ended_windows(&mut windows, start + Duration::from_secs(30)).is_empty());
        assert_eq!(windows.len(), 2, "a minute not over is kept");
        let rows = ended_windows(&mut windows, start + Duration::from_secs(61));
        assert!(windows.is_empty());
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].peer, "10.0.0.1");
        assert_eq!(rows[0].matches, 940);
        assert!(
            rows[0].outcome.starts_with("denied: 940 more"),
            "{}",
            rows[0].outcome
        );
    }

    /// A paged pass goes on after its token's place, whether that instance
    /// is still there or moved (re-sent with another number) meanwhile; a
    /// token without a page size, or one this center did not give, is
    /// refused.
    #[test]
    fn a_page_token_resumes_after_its_place_even_when_its_instance_moved() {
        let instance = |token: &str| studies::StudyInstance {
            reference: Default::default(),
            sort_key: studies::SortKey::from_token(token).unwrap(),
            blob_key: String::new(),
            size: 0,
            patient_ref: String::new(),
        };
        let list = [
            instance("k1:0:1:1.2.1:0:1:1.2.1.1"),
            instance("k1:0:1:1.2.1:0:2:1.2.1.2"),
            instance("k1:0:1:1.2.1:0:4:1.2.1.4"),
            instance("k1:0:2:1.2.2:0:1:1.2.2.1"),
        ];
        let start = |token: &str| metadata_page_start(&list, 2, token);
        assert_eq!(start("").unwrap(), 0);
        assert_eq!(start("k1:0:1:1.2.1:0:2:1.2.1.2").unwrap(), 2);
        // Instance 3 of series 1 was handed out as the last of a page,
        // then re-sent as instance 9: the pass goes on after number 3.
        assert_eq!(start("k1:0:1:1.2.1:0:3:1.2.1.3").unwrap(), 2);
        assert_eq!(start("k1:0:2:1.2.2:0:1:1.2.2.1").unwrap(), 4);
        assert!(matches!(
            metadata_page_start(&list, 0, "k1:0:1:1.2.1:0:2:1.2.1.2"),
            Err(ApiError::InvalidArgument(_))
        ));
        assert!(matches!(
            start("1.2.1.2"),
            Err(ApiError::InvalidArgument(_))
        ));
    }
}
