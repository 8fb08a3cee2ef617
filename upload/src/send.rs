//! Sending: several associations in parallel, each streaming files as they
//! are (their own transfer syntax whenever the center accepts it), with
//! retries of transient failures and no retry of refusals.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use consortium_dimse::client::{Association, ClientError, Proposed};
use consortium_dimse::{Response, field, tag};
use tokio::io::AsyncReadExt;

use sha2::Digest;

use crate::Settings;
use crate::commit;
use crate::progress::Progress;
use crate::scan::Candidate;

const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
/// Datasets up to this size are read whole before sending.
const IN_MEMORY_BYTES: u64 = 16 << 20;
/// Bytes a lane holds for hashing (besides the file on the wire and the
/// one read ahead) before it waits for the oldest file's hash.
const HASHING_BYTES: u64 = 32 << 20;
/// Files up to this size can be converted (in memory) to a syntax the
/// center accepted when it refused their own.
const MAX_CONVERTED_BYTES: u64 = 1 << 30;

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Success (or a warning status, which also means stored); `sha256` of
    /// the file as read; `converted_to` the transfer syntax its dataset was
    /// converted to when the center did not accept the file's own.
    Stored {
        status: u16,
        sha256: String,
        converted_to: Option<String>,
    },
    /// The center refused it; sending again will not help.
    Refused { status: u16, comment: String },
    /// Could not be delivered (after retries).
    Failed { reason: String },
}

/// Why a file the center kept answering 0xA7xx was not stored: a state of
/// the center (a full disk, say), not a verdict on the file, so not
/// "refused"; a later run may store it.
fn out_of_resources(status: u16, comment: &str, attempts: u32) -> String {
    let comment = if comment.is_empty() {
        String::new()
    } else {
        format!(": {comment}")
    };
    let times = match attempts {
        1 => "once".to_string(),
        n => format!("{n} times"),
    };
    format!(
        "the center answered 0x{status:04X} (out of resources{comment}) {times}; run again later"
    )
}

/// Why one C-STORE did not get an answer.
enum StoreError {
    /// The file could not be read as scanned (unreadable, changed, a read
    /// error part way): that file fails, not the connection. `usable` is
    /// false when part of its dataset had gone out, so the association
    /// must be given up (without counting against the connection).
    Local { reason: String, usable: bool },
    /// The association broke.
    Link(ClientError),
}

impl From<ClientError> for StoreError {
    fn from(e: ClientError) -> Self {
        StoreError::Link(e)
    }
}

/// Sends every candidate over `settings.associations` parallel associations,
/// handing each stored instance to `committer` once the center answered
/// its C-STORE and its SHA-256 is known.
pub(crate) async fn send_all(
    settings: &Settings,
    files: Vec<Candidate>,
    progress: &Progress,
    committer: &commit::Committer,
) -> Vec<(Candidate, Outcome)> {
    let lanes = settings.associations.max(1);
    let mut shares: Vec<(u64, Vec<Candidate>)> = (0..lanes).map(|_| (0, Vec::new())).collect();
    let mut by_size = files;
    by_size.sort_by_key(|c| std::cmp::Reverse(c.size));
    for file in by_size {
        let lightest = shares
            .iter_mut()
            .min_by_key(|(bytes, _)| *bytes)
            .expect("at least one lane");
        lightest.0 += file.size;
        lightest.1.push(file);
    }
    let queues: Arc<[Queue]> = shares
        .into_iter()
        .map(|(_, mut share)| {
            share.sort_by(|a, b| a.path.cmp(&b.path));
            Queue(Arc::new(Mutex::new(share.into())))
        })
        .collect();
    let attempts = Attempts::default();
    let running = Running::new(queues.len());
    let mut tasks = tokio::task::JoinSet::new();
    for own in 0..queues.len() {
        let settings = settings.clone();
        let progress = progress.clone();
        let stored = committer.stored();
        let (queues, attempts, running) = (Arc::clone(&queues), attempts.clone(), running.clone());
        tasks.spawn(async move {
            let lanes = Lanes {
                queues: &queues,
                own,
                attempts: &attempts,
                running: &running,
            };
            lane(&settings, lanes, &progress, &stored).await
        });
    }
    let mut results = Vec::new();
    while let Some(res) = tasks.join_next().await {
        results.extend(res.expect("send task panicked"));
    }
    results
}

/// A lane's files still to send. Shared, so that a lane with none left
/// takes the last files of a busier one instead of ending: the lanes then
/// finish together, not one association alone at the end.
struct Queue(Arc<Mutex<VecDeque<Candidate>>>);

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Candidate>> {
        // Nothing under this lock panics (pushes, pops, drains).
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Tries per file (by SOP Instance UID) over the whole upload: a file put
/// back for another try may be taken by another lane, and keeps its count.
#[derive(Clone, Default)]
struct Attempts(Arc<Mutex<HashMap<String, u32>>>);

impl Attempts {
    /// Counts one more try of `uid`; returns how many there were.
    fn bump(&self, uid: &str) -> u32 {
        let mut tries = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = tries.entry(uid.to_owned()).or_default();
        *n += 1;
        *n
    }
}

/// Which lanes are still running. A lane the center does not admit now (a
/// transient A-ASSOCIATE-RJ: it limits associations per clinic or in
/// all) hands its files to a running lane instead of failing them; only
/// the last lane running fails what it cannot send. A lane stops only
/// under this lock, together with taking whatever was handed to it.
#[derive(Clone)]
struct Running(Arc<Mutex<Vec<bool>>>);

impl Running {
    fn new(lanes: usize) -> Running {
        Running(Arc::new(Mutex::new(vec![true; lanes])))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<bool>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Moves `queues[own]`'s files to the running lane with the fewest
    /// bytes queued, and stops `own`; false (nothing moved, `own` still
    /// running) when no other lane runs.
    fn pass_on(&self, queues: &[Queue], own: usize) -> bool {
        let mut running = self.lock();
        let bytes = |i: usize| queues[i].lock().iter().map(|c| c.size).sum::<u64>();
        let Some(to) = (0..queues.len())
            .filter(|&i| i != own && running[i])
            .min_by_key(|&i| bytes(i))
        else {
            return false;
        };
        let files: Vec<Candidate> = queues[own].lock().drain(..).collect();
        queues[to].lock().extend(files);
        running[own] = false;
        true
    }

    /// Stops `own` when its queue is empty; false when files are there
    /// (handed to it since it last looked).
    fn stop_if_idle(&self, queue: &Queue, own: usize) -> bool {
        let mut running = self.lock();
        if !queue.lock().is_empty() {
            return false;
        }
        running[own] = false;
        true
    }

    /// Stops `own` for good; the files handed to it meanwhile, which it
    /// will not send.
    fn stop(&self, queue: &Queue, own: usize) -> Vec<Candidate> {
        let mut running = self.lock();
        running[own] = false;
        queue.lock().drain(..).collect()
    }
}

/// The last file of the lane with the most bytes behind its first, if it
/// `fits` (the thief's association can carry it as it is); else the next
/// fullest lane's. A lane's first file is never taken: it may be read
/// ahead already.
fn steal(queues: &[Queue], own: usize, fits: impl Fn(&Candidate) -> bool) -> Option<Candidate> {
    let mut others: Vec<(u64, usize)> = (0..queues.len())
        .filter(|&i| i != own)
        .map(|i| (queues[i].lock().iter().skip(1).map(|c| c.size).sum(), i))
        .filter(|&(bytes, _)| bytes > 0)
        .collect();
    others.sort_by_key(|&(bytes, _)| std::cmp::Reverse(bytes));
    others.into_iter().find_map(|(_, i)| {
        let mut queue = queues[i].lock();
        let take = queue.len() >= 2 && fits(queue.back()?);
        take.then(|| queue.pop_back()).flatten()
    })
}

/// What the lanes share, and which lane this is.
struct Lanes<'a> {
    queues: &'a [Queue],
    own: usize,
    attempts: &'a Attempts,
    running: &'a Running,
}

/// One association's share of the files (`queues[own]`), then whatever it
/// can take from the others' ends, with retries.
async fn lane(
    settings: &Settings,
    lanes: Lanes<'_>,
    progress: &Progress,
    stored: &tokio::sync::mpsc::UnboundedSender<commit::Stored>,
) -> Vec<(Candidate, Outcome)> {
    let Lanes {
        queues,
        own,
        attempts,
        running,
    } = lanes;
    let pending = &queues[own];
    // Why the lane stopped early, for files handed to it meanwhile.
    let mut stopped_by: Option<String> = None;
    // Whether the center ever admitted this lane's association.
    let mut admitted = false;
    let mut results = Vec::new();
    let mut prefetched: Option<Prefetch> = None;
    let mut failures_in_a_row = 0u32;
    // Different files answered 0xA7xx one after the other, with no success
    // between: more than `settings.retries` of them (and at least three)
    // means the center itself is short of resources (a full disk), not one
    // file too large for it; the lane stops.
    let mut short_in_a_row: std::collections::HashSet<String> = Default::default();
    // Files during which the connection was lost since the last success:
    // when that is one file alone, given up, the others still get their
    // chance (the file, not the link, is the likely cause).
    let mut lost_on: std::collections::HashSet<String> = Default::default();
    // Files given up that way one after the other, with no success between:
    // more than `settings.retries` (and at least three) and it is the link
    // or the center after all; the lane stops.
    let mut given_up_alone = 0u32;
    // Stored files whose SHA-256 is still being computed, oldest first.
    let mut hashing: VecDeque<Hashing> = VecDeque::new();
    loop {
        if pending.lock().is_empty() && running.stop_if_idle(pending, own) {
            break;
        }
        // The files this association is proposed for: those at the front
        // now (files handed to the lane later go behind them).
        let (contexts, covered) = {
            let queue = pending.lock();
            let (contexts, batch_len) = propose(&queue);
            let uids: std::collections::HashSet<String> = queue
                .iter()
                .take(batch_len)
                .map(|c| c.sop_instance_uid.clone())
                .collect();
            (contexts, uids)
        };
        let assoc = settings.associate(&contexts).await;
        let mut assoc = match assoc {
            Ok(a) => {
                admitted = true;
                a
            }
            // The center admits no more associations (its limits), while
            // other lanes have theirs: they send this lane's files. Only a
            // lane never admitted: one refused for a moment between two
            // of its associations tries again, as below.
            Err(e) if !admitted && e.is_transient_rejection() && running.pass_on(queues, own) => {
                progress.note(&format!("{e}; its files go to the other associations"));
                break;
            }
            Err(e) if e.is_transient() && failures_in_a_row < settings.retries => {
                failures_in_a_row += 1;
                progress.note(&format!(
                    "association failed ({e}); retrying in {:?}",
                    backoff(failures_in_a_row)
                ));
                tokio::time::sleep(backoff(failures_in_a_row)).await;
                continue;
            }
            Err(e) => {
                let reason = e.to_string();
                if !(e.is_transient() && passed_on(running, queues, own, &reason, progress)) {
                    fail_pending(pending, &reason, progress, &mut results);
                    stopped_by = Some(reason);
                }
                break;
            }
        };
        let mut message_id = 0u16;
        let mut lost: Option<ClientError> = None;
        let mut lost_file_given_up = false;
        let mut unusable = false;
        // Files to try again after this association's batch (which its
        // contexts cover; files behind it may need others).
        let mut again: Vec<Candidate> = Vec::new();
        // This association's own files first (those its contexts were
        // proposed for), then, once the lane has none left, others' last ones.
        loop {
            hand_over(&mut hashing, false, stored, &mut results).await;
            let own_file = {
                let mut queue = pending.lock();
                match queue.front() {
                    Some(f) if covered.contains(&f.sop_instance_uid) => queue.pop_front(),
                    _ => None,
                }
            };
            let file = match own_file {
                Some(file) => file,
                None if pending.lock().is_empty() => {
                    // Only files it carries as they are: a stolen file is
                    // never converted where its own lane would not have.
                    let as_they_are =
                        |f: &Candidate| assoc.context_for(&f.sop_class_uid, &f.transfer_syntax);
                    match steal(queues, own, |f| as_they_are(f).is_some()) {
                        Some(file) => file,
                        None => break,
                    }
                }
                // The rest need other contexts: a new association.
                None => break,
            };
            let Some((context, convert_to)) = choose_context(&assoc, &file) else {
                progress.done(&file);
                let reason = refusal_reason(&assoc, &file);
                results.push((file, Outcome::Failed { reason }));
                continue;
            };
            message_id = message_id.wrapping_add(1);
            let next = pending.lock().front().cloned();
            match store_one(
                &mut assoc,
                context,
                convert_to.as_deref(),
                message_id,
                &file,
                &mut prefetched,
                next.as_ref(),
            )
            .await
            {
                Ok((status, comment, sha256)) => {
                    failures_in_a_row = 0;
                    lost_on.clear();
                    given_up_alone = 0;
                    match classify(status) {
                        Class::Stored => {
                            short_in_a_row.clear();
                            progress.done(&file);
                            hashing.push_back(Hashing {
                                file,
                                status,
                                converted_to: convert_to,
                                sha256: sha256.start(),
                            });
                        }
                        Class::Transient => {
                            short_in_a_row.insert(file.sop_instance_uid.clone());
                            let short = short_in_a_row.len() as u32;
                            let n = attempts.bump(&file.sop_instance_uid);
                            if short > settings.retries.max(2) {
                                progress.done(&file);
                                let reason = out_of_resources(status, &comment, n);
                                results.push((file, Outcome::Failed { reason }));
                                let reason = format!(
                                    "not sent: the center answered 0x{status:04X} (out of resources) \
                                     to {short} files in a row"
                                );
                                pending.lock().extend(again.drain(..));
                                fail_pending(pending, &reason, progress, &mut results);
                                break;
                            } else if n > settings.retries {
                                progress.done(&file);
                                let reason = out_of_resources(status, &comment, n);
                                results.push((file, Outcome::Failed { reason }));
                            } else {
                                // The center is short of resources: give it time.
                                let wait = backoff(n.max(short));
                                progress.note(&format!(
                                    "the center is out of resources (0x{status:04X}); retrying in {wait:?}"
                                ));
                                again.push(file);
                                hand_over(&mut hashing, false, stored, &mut results).await;
                                tokio::time::sleep(wait).await;
                            }
                        }
                        Class::Refused => {
                            short_in_a_row.clear();
                            progress.done(&file);
                            results.push((file, Outcome::Refused { status, comment }));
                        }
                    }
                }
                Err(StoreError::Local { reason, usable }) => {
                    // This file's fault, not the connection's: it fails alone.
                    progress.done(&file);
                    results.push((file, Outcome::Failed { reason }));
                    if !usable {
                        unusable = true;
                        break;
                    }
                }
                Err(StoreError::Link(e)) => {
                    // The association is gone: this file and the rest go again.
                    let n = attempts.bump(&file.sop_instance_uid);
                    lost_on.insert(file.sop_instance_uid.clone());
                    if n > settings.retries {
                        lost_file_given_up = true;
                        progress.done(&file);
                        results.push((
                            file,
                            Outcome::Failed {
                                reason: e.to_string(),
                            },
                        ));
                    } else {
                        pending.lock().push_front(file);
                    }
                    lost = Some(e);
                    break;
                }
            }
        }
        pending.lock().extend(again);
        hand_over(&mut hashing, false, stored, &mut results).await;
        match lost {
            None if unusable => assoc.abort().await,
            None => assoc.release().await,
            Some(e) => {
                // Gone, or out of step (an answer to another message): an
                // A-ABORT either way (a write to a closed one fails at once).
                assoc.abort().await;
                if lost_file_given_up && lost_on.len() == 1 {
                    // Every loss since the last success was during this
                    // one file, now given up: the rest go on, with a loss
                    // budget of their own.
                    lost_on.clear();
                    given_up_alone += 1;
                    if given_up_alone > settings.retries.max(2) {
                        let reason = format!(
                            "connection lost during each of {given_up_alone} files in a row: {e}"
                        );
                        if !passed_on(running, queues, own, &reason, progress) {
                            fail_pending(pending, &reason, progress, &mut results);
                            stopped_by = Some(reason);
                        }
                        break;
                    }
                    failures_in_a_row = 0;
                    progress.note(&format!(
                        "connection lost during the same file each time ({e}); it is given up, the rest go on"
                    ));
                    tokio::time::sleep(backoff(1)).await;
                    continue;
                }
                failures_in_a_row += 1;
                if failures_in_a_row > settings.retries {
                    let reason = format!("connection lost repeatedly: {e}");
                    if !passed_on(running, queues, own, &reason, progress) {
                        fail_pending(pending, &reason, progress, &mut results);
                        stopped_by = Some(reason);
                    }
                    break;
                }
                progress.note(&format!(
                    "connection lost ({e}); retrying in {:?}",
                    backoff(failures_in_a_row)
                ));
                tokio::time::sleep(backoff(failures_in_a_row)).await;
            }
        }
    }
    // Files handed to this lane after it stopped early fail as its own did
    // (a lane that stopped idle, or handed its files on, has none).
    let reason = stopped_by.unwrap_or_else(|| "not sent: its association ended".into());
    for file in running.stop(pending, own) {
        progress.done(&file);
        results.push((
            file,
            Outcome::Failed {
                reason: reason.clone(),
            },
        ));
    }
    hand_over(&mut hashing, true, stored, &mut results).await;
    results
}

/// A stored file waiting for its SHA-256.
struct Hashing {
    file: Candidate,
    status: u16,
    converted_to: Option<String>,
    sha256: Sha256,
}

/// Hands stored files whose SHA-256 is known to the committer and to the
/// results, oldest first; waits for the oldest while the lane holds more
/// than [`HASHING_BYTES`] for hashing, or for every one when `all`.
async fn hand_over(
    hashing: &mut VecDeque<Hashing>,
    all: bool,
    stored: &tokio::sync::mpsc::UnboundedSender<commit::Stored>,
    results: &mut Vec<(Candidate, Outcome)>,
) {
    while let Some(oldest) = hashing.front() {
        let held: u64 = hashing.iter().map(|h| h.sha256.bytes_held()).sum();
        if !(all || oldest.sha256.is_known() || held > HASHING_BYTES) {
            break;
        }
        let Some(Hashing {
            file,
            status,
            converted_to,
            sha256,
        }) = hashing.pop_front()
        else {
            break;
        };
        match sha256.get().await {
            Ok(sha256) => {
                // The committer outlives the lanes.
                let _ = stored.send((
                    file.sop_class_uid.clone(),
                    file.sop_instance_uid.clone(),
                    sha256.clone(),
                ));
                results.push((
                    file,
                    Outcome::Stored {
                        status,
                        sha256,
                        converted_to,
                    },
                ));
            }
            Err(e) => results.push((
                file,
                Outcome::Failed {
                    reason: format!("stored, but what was sent could not be hashed: {e}"),
                },
            )),
        }
    }
}

/// The context to send `file` on: one that accepted its own transfer
/// syntax (bytes as they are), else one of its SOP class in a syntax its
/// dataset can be converted to (the proposed uncompressed fallback), with
/// that syntax.
fn choose_context(assoc: &Association, file: &Candidate) -> Option<(u8, Option<String>)> {
    if let Some(id) = assoc.context_for(&file.sop_class_uid, &file.transfer_syntax) {
        return Some((id, None));
    }
    assoc
        .accepted
        .iter()
        .filter(|(_, (class, ts))| {
            *class == file.sop_class_uid
                && storage::transcode::can_convert(&file.transfer_syntax, ts)
        })
        // Explicit VR little endian first, then the lowest context id.
        .min_by_key(|(id, (_, ts))| (ts.as_str() != EXPLICIT_LE, **id))
        .map(|(id, (_, ts))| (*id, Some(ts.clone())))
}

/// Why no context fits `file`, in words.
fn refusal_reason(assoc: &Association, file: &Candidate) -> String {
    if assoc
        .accepted
        .values()
        .any(|(class, _)| *class == file.sop_class_uid)
    {
        format!(
            "the center did not accept its transfer syntax {}, and it cannot be converted to one the center accepted",
            file.transfer_syntax
        )
    } else {
        format!(
            "the center does not accept SOP class {}",
            file.sop_class_uid
        )
    }
}

/// Gives up on every file still pending, with one reason.
fn fail_pending(
    pending: &Queue,
    reason: &str,
    progress: &Progress,
    results: &mut Vec<(Candidate, Outcome)>,
) {
    let files: Vec<Candidate> = pending.lock().drain(..).collect();
    for file in files {
        progress.done(&file);
        results.push((
            file,
            Outcome::Failed {
                reason: reason.to_string(),
            },
        ));
    }
}

/// A lane giving up on its link hands its files to a lane still running
/// (which may get through, with its own retries) instead of failing them;
/// false when it is the last.
fn passed_on(
    running: &Running,
    queues: &[Queue],
    own: usize,
    why: &str,
    progress: &Progress,
) -> bool {
    let passed = running.pass_on(queues, own);
    if passed {
        progress.note(&format!("{why}; its files go to the other associations"));
    }
    passed
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250 << attempt.min(6))
}

enum Class {
    Stored,
    Transient,
    Refused,
}

/// PS3.4 B.2.3: success and warnings (0xBxxx, and PS3.7's general 0x0001,
/// 0x0107, 0x0116) mean stored; 0xA7xx (out of resources) may pass;
/// everything else is a refusal.
fn classify(status: u16) -> Class {
    match status {
        0x0000 | 0x0001 | 0x0107 | 0x0116 | 0xB000..=0xBFFF => Class::Stored,
        0xA700..=0xA7FF => Class::Transient,
        _ => Class::Refused,
    }
}

/// Presentation contexts for the first files of `pending` (at most 128):
/// per SOP class, the files' own transfer syntaxes, and an uncompressed
/// fallback. Returns the contexts and how many files they cover.
fn propose(pending: &VecDeque<Candidate>) -> (Vec<Proposed>, usize) {
    let mut pairs: BTreeSet<(String, String)> = BTreeSet::new();
    let mut covered = 0;
    for file in pending {
        let mut next = pairs.clone();
        next.insert((file.sop_class_uid.clone(), file.transfer_syntax.clone()));
        next.insert((file.sop_class_uid.clone(), EXPLICIT_LE.to_string()));
        if next.len() > 128 {
            break;
        }
        pairs = next;
        covered += 1;
    }
    let contexts: Vec<Proposed> = pairs
        .into_iter()
        .enumerate()
        .map(|(i, (abstract_syntax, ts))| Proposed {
            id: (2 * i + 1) as u8,
            transfer_syntaxes: if ts == EXPLICIT_LE {
                vec![EXPLICIT_LE.to_string(), IMPLICIT_LE.to_string()]
            } else {
                vec![ts]
            },
            abstract_syntax,
        })
        .collect();
    (contexts, covered)
}

/// A file being read ahead of its turn.
struct Prefetch {
    path: std::path::PathBuf,
    read: tokio::task::JoinHandle<std::io::Result<Vec<u8>>>,
}

impl Prefetch {
    fn start(path: &std::path::Path) -> Self {
        let path = path.to_path_buf();
        let reading = path.clone();
        let read = tokio::task::spawn_blocking(move || std::fs::read(&reading));
        Self { path, read }
    }

    async fn take(self) -> std::io::Result<Vec<u8>> {
        self.read.await.map_err(std::io::Error::other)?
    }
}

/// The SHA-256 of the bytes sent: known, or to be computed from them.
pub(crate) enum Sha256 {
    Known(String),
    /// Sent, answer not yet known: nothing is hashed for a file the
    /// center did not store.
    Unhashed(Vec<u8>),
    /// Stored: hashed on storage's low-priority threads (SCHED_IDLE). The
    /// record needs it only once the center has confirmed the file, so a
    /// lane goes on sending meanwhile, and the hash takes what CPU the
    /// sending (and, on a shared machine, the gateway) leaves. A lane that
    /// must wait for it takes the bytes back if the hash has not started,
    /// and hashes them at its own priority; one already started is waited
    /// for (at most 16 MiB, slowly on a machine kept busy by other work).
    Hashing {
        bytes: Arc<Mutex<Option<Vec<u8>>>>,
        job: tokio::task::JoinHandle<Result<Option<String>, &'static str>>,
        len: u64,
    },
}

impl Sha256 {
    /// Starts hashing bytes not hashed yet.
    fn start(self) -> Self {
        let Sha256::Unhashed(bytes) = self else {
            return self;
        };
        let len = bytes.len() as u64;
        let bytes = Arc::new(Mutex::new(Some(bytes)));
        let taken = Arc::clone(&bytes);
        let job = tokio::spawn(storage::background::run(move || {
            let bytes = taken.lock().unwrap_or_else(|e| e.into_inner()).take()?;
            Some(sha256_hex(&bytes))
        }));
        Sha256::Hashing { bytes, job, len }
    }

    fn bytes_held(&self) -> u64 {
        match self {
            Sha256::Known(_) => 0,
            Sha256::Unhashed(bytes) => bytes.len() as u64,
            // A finished job has let its bytes go.
            Sha256::Hashing { job, .. } if job.is_finished() => 0,
            Sha256::Hashing { len, .. } => *len,
        }
    }

    fn is_known(&self) -> bool {
        match self {
            Sha256::Known(_) => true,
            Sha256::Unhashed(_) => false,
            Sha256::Hashing { job, .. } => job.is_finished(),
        }
    }

    async fn get(self) -> Result<String, String> {
        let (bytes, job) = match self {
            Sha256::Known(sha) => return Ok(sha),
            Sha256::Unhashed(bytes) => (Some(bytes), None),
            Sha256::Hashing { bytes, job, .. } => {
                let not_started = bytes.lock().unwrap_or_else(|e| e.into_inner()).take();
                (not_started, Some(job))
            }
        };
        if let Some(bytes) = bytes {
            return tokio::task::spawn_blocking(move || sha256_hex(&bytes))
                .await
                .map_err(|e| e.to_string());
        }
        let Some(job) = job else {
            return Err("nothing to hash".into());
        };
        match job.await {
            Ok(Ok(Some(sha))) => Ok(sha),
            Ok(Ok(None)) => Err("the bytes were taken back".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    storage::spool::hex(&sha2::Sha256::digest(bytes))
}

/// One C-STORE: the file's dataset streamed as is. Typical files are read
/// off the runtime while the previous one is on the wire, and hashed once
/// the center has stored them ([`Sha256::Hashing`]); the next file (`next`) starts
/// reading as soon as this one is sent, while the center writes and syncs
/// it. The SHA-256 returned is always that of the bytes sent (with the
/// file's header), never of a second read.
#[allow(clippy::too_many_arguments)]
async fn store_one(
    assoc: &mut Association,
    context: u8,
    convert_to: Option<&str>,
    message_id: u16,
    file: &Candidate,
    prefetched: &mut Option<Prefetch>,
    next: Option<&Candidate>,
) -> Result<(u16, String, Sha256), StoreError> {
    let rq = Response::request(field::C_STORE_RQ, message_id, true)
        .uid(tag::AFFECTED_SOP_CLASS_UID, &file.sop_class_uid)
        .u16(tag::PRIORITY, 0)
        .uid(tag::AFFECTED_SOP_INSTANCE_UID, &file.sop_instance_uid)
        .encode();
    let local = |reason: String, usable: bool| StoreError::Local { reason, usable };
    let unreadable =
        |e: std::io::Error| local(format!("cannot read {}: {e}", file.path.display()), true);
    let changed = || {
        local(
            format!("{} changed since it was scanned", file.path.display()),
            true,
        )
    };
    let sha256;
    if let Some(to) = convert_to {
        // The center took none of the file's own syntax: its dataset is
        // converted in memory (bounded), then sent.
        if file.size > MAX_CONVERTED_BYTES {
            return Err(local(
                format!(
                    "the center did not accept {} and the file is too large to convert ({} bytes)",
                    file.transfer_syntax, file.size
                ),
                true,
            ));
        }
        let ahead = prefetched
            .take()
            .filter(|p| p.path == file.path)
            .unwrap_or_else(|| Prefetch::start(&file.path));
        let bytes = ahead.take().await.map_err(unreadable)?;
        if bytes.len() as u64 != file.size {
            return Err(changed());
        }
        let (from, to, offset) = (
            file.transfer_syntax.clone(),
            to.to_string(),
            file.dataset_offset as usize,
        );
        let (dataset, sha) = tokio::task::spawn_blocking(move || {
            let sha = sha256_hex(&bytes);
            storage::transcode::convert(&bytes, offset, &from, &to).map(|d| (d, sha))
        })
        .await
        .map_err(|e| local(e.to_string(), true))?
        .map_err(|e| local(format!("cannot convert {}: {e}", file.path.display()), true))?;
        sha256 = Sha256::Known(sha);
        assoc
            .send_command_and_dataset(context, &rq, &dataset)
            .await?;
    } else if file.dataset_len() <= IN_MEMORY_BYTES {
        // Typical instances: one read, then PDUs straight from memory.
        let ahead = prefetched
            .take()
            .filter(|p| p.path == file.path)
            .unwrap_or_else(|| Prefetch::start(&file.path));
        let bytes = ahead.take().await.map_err(unreadable)?;
        let dataset = bytes
            .get(file.dataset_offset as usize..)
            .filter(|d| d.len() as u64 == file.dataset_len())
            .ok_or_else(changed)?;
        assoc
            .send_command_and_dataset(context, &rq, dataset)
            .await?;
        *prefetched = next
            .filter(|n| n.dataset_len() <= IN_MEMORY_BYTES)
            .map(|n| Prefetch::start(&n.path));
        sha256 = Sha256::Unhashed(bytes);
    } else {
        // Large instances stream, one PDU in memory at a time, hashed as
        // they go out.
        let mut source = tokio::fs::File::open(&file.path)
            .await
            .map_err(unreadable)?;
        let len = source.metadata().await.map_err(unreadable)?.len();
        if len != file.size {
            return Err(changed());
        }
        let mut header = vec![0u8; file.dataset_offset as usize];
        source.read_exact(&mut header).await.map_err(unreadable)?;
        let mut hashing = HashingReader {
            inner: tokio::io::BufReader::with_capacity(1 << 20, source),
            hasher: sha2::Sha256::new_with_prefix(&header),
            failed: None,
        };
        assoc.send_command(context, &rq).await?;
        if let Err(e) = assoc
            .send_dataset_from(context, &mut hashing, file.dataset_len())
            .await
        {
            return Err(match hashing.failed.take() {
                // Part of the dataset went out: this association cannot
                // finish that C-STORE any more.
                Some(read) => local(
                    format!("cannot read {}: {read}", file.path.display()),
                    false,
                ),
                None => StoreError::Link(e),
            });
        }
        sha256 = Sha256::Known(storage::spool::hex(&hashing.hasher.finalize()));
    }
    let rsp = assoc.receive(0).await?;
    if rsp.command.command_field() != Some(field::C_STORE_RSP) {
        return Err(ClientError::Protocol("expected C-STORE-RSP".into()).into());
    }
    // An answer to another message, or one without a status, says nothing
    // about this file: the association is out of step (PS3.7 9.3.1.2).
    let answered = rsp.command.u16(tag::MESSAGE_ID_BEING_RESPONDED_TO);
    if answered != Some(message_id) {
        let answered = answered.map_or_else(|| "none".to_string(), |a| a.to_string());
        return Err(ClientError::Protocol(format!(
            "the center answered message {answered} while message {message_id} was outstanding"
        ))
        .into());
    }
    let Some(status) = rsp.command.u16(tag::STATUS) else {
        return Err(ClientError::Protocol("C-STORE-RSP without a status".into()).into());
    };
    let comment = rsp.command.uid(tag::ERROR_COMMENT).unwrap_or_default();
    Ok((status, comment, sha256))
}

/// Hashes what it reads, and remembers a read error (so that it is told
/// from a broken connection).
struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
    failed: Option<std::io::Error>,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for HashingReader<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let me = &mut *self;
        match std::pin::Pin::new(&mut me.inner).poll_read(cx, buf) {
            std::task::Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if read.is_empty() && buf.remaining() > 0 {
                    // The end of the file before the end of its dataset.
                    me.failed = Some(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the file became shorter while it was sent",
                    ));
                }
                me.hasher.update(read);
                std::task::Poll::Ready(Ok(()))
            }
            std::task::Poll::Ready(Err(e)) => {
                me.failed = Some(std::io::Error::new(e.kind(), e.to_string()));
                std::task::Poll::Ready(Err(e))
            }
            pending => pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_hash_is_of_the_bytes_sent_whoever_computes_it() {
        let bytes = b"DICM\x02\x00".repeat(50_000);
        let want = sha256_hex(&bytes);
        // Never started (taken back at once), and started then taken back
        // or finished by the background thread, whichever comes first.
        assert_eq!(
            Sha256::Unhashed(bytes.clone()).get().await,
            Ok(want.clone())
        );
        for _ in 0..20 {
            let started = Sha256::Unhashed(bytes.clone()).start();
            // Held until hashed (then let go).
            assert!(started.bytes_held() == bytes.len() as u64 || started.is_known());
            assert_eq!(started.get().await, Ok(want.clone()));
        }
        // Finished in the background before anyone waits.
        let started = Sha256::Unhashed(bytes.clone()).start();
        while !started.is_known() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(started.get().await, Ok(want));
    }

    #[test]
    fn a_lane_with_nothing_left_takes_the_last_file_of_the_fullest_other_lane() {
        let file = |name: &str, size: u64| Candidate {
            path: name.into(),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: format!("1.2.3.{size}"),
            transfer_syntax: EXPLICIT_LE.into(),
            dataset_offset: 0,
            size,
            sha256: String::new(),
        };
        let queue = |files: Vec<Candidate>| Queue(Arc::new(Mutex::new(files.into())));
        let queues = [
            queue(vec![]),
            queue(vec![file("a1", 10), file("a2", 10), file("a3", 10)]),
            queue(vec![file("b1", 10), file("b2", 50), file("b3", 5)]),
            queue(vec![file("c1", 100)]),
        ];
        let name = |c: Option<Candidate>| c.map(|c| c.path.display().to_string());
        // Lane 2 has the most bytes behind its first file; its last file goes.
        assert_eq!(name(steal(&queues, 0, |_| true)), Some("b3".into()));
        // A file the thief's association cannot carry is left where it is.
        assert_eq!(
            name(steal(&queues, 0, |c| c.path.as_os_str() != "b2")),
            Some("a3".into())
        );
        assert_eq!(name(steal(&queues, 0, |_| true)), Some("b2".into()));
        assert_eq!(name(steal(&queues, 0, |_| true)), Some("a2".into()));
        // Each lane keeps its first file (perhaps being read ahead), and a
        // lane does not take from itself.
        assert_eq!(name(steal(&queues, 0, |_| true)), None);
        assert_eq!(name(steal(&queues, 1, |_| true)), None);
        let left: Vec<usize> = queues.iter().map(|q| q.lock().len()).collect();
        assert_eq!(left, [0, 1, 1, 1]);
    }

    #[test]
    fn warnings_are_stored_and_only_a7xx_is_retried() {
        for stored in [
            0x0000, 0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007, 0xB123,
        ] {
            assert!(matches!(classify(stored), Class::Stored), "{stored:04X}");
        }
        for transient in [0xA700, 0xA7FF] {
            assert!(matches!(classify(transient), Class::Transient));
        }
        for refused in [0xA900, 0xC000, 0x0122, 0x0211] {
            assert!(matches!(classify(refused), Class::Refused), "{refused:04X}");
        }
    }
}
