//! The shared worklist: settled studies by priority then waiting time,
//! exclusive claims with expiring leases, and a change feed for watchers.
//!
//! The gateway (another process) adds studies, so changes are found by
//! polling the index once a second, while it changes or studies may still
//! settle (an idle index is not re-read); claims made here are published
//! at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use consortium_proto::v1::{ItemStatus, Priority, WorklistFilter, WorklistItem, worklist_event};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{Notify, broadcast};

use crate::auth::{Caller, Role};
use crate::db::{Db, now_unix};
use crate::error::{ApiError, Result};
use crate::studies::counted_clinic;
use crate::studies::split_modalities;
use storage::query::{modalities_in_study_where, sent_by_clinic, series_sent_by_clinic};

/// One change seen by the poller.
#[derive(Debug, Clone)]
pub struct Change {
    pub kind: worklist_event::Kind,
    pub item: WorklistItem,
}

pub struct Worklist {
    db: Db,
    settle: Duration,
    lease: Duration,
    changes: broadcast::Sender<Change>,
    poke: Notify,
}

/// A filter made safe for the caller: the clinic is forced for roles that
/// see only their own clinic.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub clinic_id: String,
    pub modality: String,
    pub date_from: String,
    pub date_to: String,
    /// `,1,2,` style list of statuses; empty: all.
    pub statuses: String,
    pub study_uid: String,
    /// A township caller's clinic: counts and modalities cover only the
    /// instances it sent (not another clinic's series filed under the same
    /// study). Empty for the county, who see everything.
    pub sent_by: String,
}

impl Scope {
    pub fn for_caller(caller: &Caller, filter: Option<&WorklistFilter>) -> Result<Scope> {
        caller.require_patient_access()?;
        let f = filter.cloned().unwrap_or_default();
        let clinic_id = if caller.sees_all_clinics() {
            f.clinic_id
        } else if f.clinic_id.is_empty() || f.clinic_id == caller.clinic_id {
            caller.clinic_id.clone()
        } else {
            return Err(ApiError::PermissionDenied(
                "you may only see your own clinic's studies".into(),
            ));
        };
        for d in [&f.study_date_from, &f.study_date_to] {
            if !d.is_empty() && (d.len() != 8 || !d.bytes().all(|b| b.is_ascii_digit())) {
                return Err(ApiError::InvalidArgument("dates are YYYYMMDD".into()));
            }
        }
        let statuses = if f.statuses.is_empty() {
            String::new()
        } else {
            let mut s = String::from(",");
            for st in &f.statuses {
                match ItemStatus::try_from(*st) {
                    Ok(ItemStatus::Unspecified) | Err(_) => {
                        return Err(ApiError::InvalidArgument("unknown status".into()));
                    }
                    Ok(v) => s.push_str(&format!("{},", v as i32)),
                }
            }
            s
        };
        Ok(Scope {
            clinic_id,
            modality: f.modality,
            date_from: f.study_date_from,
            date_to: f.study_date_to,
            statuses,
            study_uid: String::new(),
            sent_by: counted_clinic(caller).to_string(),
        })
    }

    /// Whether an item found by the poller belongs to this scope.
    fn admits(&self, item: &WorklistItem) -> bool {
        (self.clinic_id.is_empty() || item.clinic_id == self.clinic_id)
            && (self.modality.is_empty() || item.modalities.contains(&self.modality))
            && (self.date_from.is_empty() || item.study_date >= self.date_from)
            && (self.date_to.is_empty() || item.study_date <= self.date_to)
            && (self.statuses.is_empty() || self.statuses.contains(&format!(",{},", item.status)))
    }
}

fn query_items(
    conn: &Connection,
    settle: Duration,
    scope: &Scope,
    limit: u32,
) -> Result<Vec<WorklistItem>> {
    let now = now_unix();
    let cutoff = storage::utc_timestamp(SystemTime::now() - settle);
    // ?10: the caller's clinic when only what it sent counts, else ''.
    let series_shown = format!("(?10 = '' OR {})", series_sent_by_clinic("x", "?10"));
    let modalities = modalities_in_study_where(&series_shown);
    let instance_counts = format!("(?10 = '' OR {})", sent_by_clinic("i", "?10"));
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT * FROM (
           SELECT st.study_uid, st.clinic_id, p.name, p.patient_id, st.study_date, st.description,
                  st.accession_number,
                  {modalities} AS modalities,
                  (SELECT count(*) FROM series se JOIN instances i ON i.series_pk = se.pk
                     WHERE se.study_pk = st.pk AND {instance_counts}) AS n,
                  COALESCE(w.priority, CASE st.requested_priority
                     WHEN 'STAT' THEN 1 WHEN 'HIGH' THEN 2 ELSE 3 END) AS prio,
                  CASE WHEN w.reported_at IS NOT NULL THEN 3
                       WHEN w.claimed_by != '' AND w.lease_expires_at > ?1 THEN 2 ELSE 1 END AS status,
                  COALESCE(w.claimed_by, '') AS claimed_by,
                  COALESCE(w.lease_expires_at, 0) AS lease,
                  unixepoch(st.last_received_at) AS last_at
           FROM studies st JOIN patients p ON p.pk = st.patient_pk
                LEFT JOIN worklist w ON w.study_pk = st.pk
           WHERE st.last_received_at <= ?2
             AND (?3 = '' OR st.clinic_id = ?3)
             AND (?4 = '' OR st.study_date >= ?4)
             AND (?5 = '' OR st.study_date <= ?5)
             AND (?6 = '' OR EXISTS (SELECT 1 FROM series x WHERE x.study_pk = st.pk AND x.modality = ?6
                                      AND {series_shown}))
             AND (?7 = '' OR st.study_uid = ?7))
         WHERE (?8 = '' OR instr(?8, ',' || status || ',') > 0)
         ORDER BY prio, last_at, study_uid
         LIMIT ?9"
    ))?;
    let rows = stmt.query_map(
        params![
            now,
            cutoff,
            scope.clinic_id,
            scope.date_from,
            scope.date_to,
            scope.modality,
            scope.study_uid,
            scope.statuses,
            limit,
            scope.sent_by
        ],
        |r| {
            let status: i32 = r.get(10)?;
            let claimed = status == ItemStatus::Claimed as i32;
            let modalities = r.get(7)?;
            Ok(WorklistItem {
                study_instance_uid: r.get(0)?,
                clinic_id: r.get(1)?,
                patient_name: r.get(2)?,
                patient_id: r.get(3)?,
                study_date: r.get(4)?,
                study_description: r.get(5)?,
                accession_number: r.get(6)?,
                modalities: split_modalities(modalities),
                instance_count: r.get::<_, i64>(8)? as u32,
                priority: r.get(9)?,
                status,
                waiting_seconds: (now - r.get::<_, Option<i64>>(13)?.unwrap_or(now)).max(0),
                claimed_by: if claimed { r.get(11)? } else { String::new() },
                lease_expires_at_unix: if claimed { r.get(12)? } else { 0 },
            })
        },
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn format_unix(secs: i64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    let s = storage::utc_timestamp(t);
    // 2026-11-24T03:00:00.000000Z -> 2026-11-24T03:00:00Z
    format!("{}Z", &s[..19])
}

impl Worklist {
    pub fn new(db: Db, settle: Duration, lease: Duration) -> Arc<Worklist> {
        let (changes, _) = broadcast::channel(1024);
        Arc::new(Worklist {
            db,
            settle,
            lease,
            changes,
            poke: Notify::new(),
        })
    }

    pub async fn list(&self, scope: Scope, limit: u32) -> Result<Vec<WorklistItem>> {
        let settle = self.settle;
        let limit = if limit == 0 { 500 } else { limit.min(500) };
        self.db
            .read(move |c| query_items(c, settle, &scope, limit))
            .await
    }

    /// The item as it is now, settled or not (a priority may be set on a
    /// study still arriving, and an instance may arrive right after a claim).
    async fn item(&self, study_uid: String) -> Result<WorklistItem> {
        self.item_seen_by(String::new(), study_uid).await
    }

    /// The item as it is now, counting only what clinic `sent_by` sent
    /// (all when empty): what a township watcher is shown of a change.
    pub async fn item_seen_by(&self, sent_by: String, study_uid: String) -> Result<WorklistItem> {
        let scope = Scope {
            study_uid,
            sent_by,
            ..Scope::default()
        };
        self.db
            .read(move |c| query_items(c, Duration::ZERO, &scope, 1))
            .await?
            .pop()
            .ok_or(ApiError::NotFound("worklist item"))
    }

    /// The pk of a study the caller may change in the worklist, refused while
    /// it is still arriving (no instance for `settle`).
    fn locate(tx: &Connection, study_uid: &str, settle: Duration, caller: &Caller) -> Result<i64> {
        let row: Option<(i64, String, String)> = tx
            .query_row(
                "SELECT pk, clinic_id, last_received_at FROM studies WHERE study_uid = ?1",
                [study_uid],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((pk, clinic_id, last)) = row else {
            return Err(ApiError::NotFound("study"));
        };
        if !caller.may_see_clinic(&clinic_id) {
            return Err(ApiError::NotFound("study"));
        }
        if last > storage::utc_timestamp(SystemTime::now() - settle) {
            return Err(ApiError::FailedPrecondition(format!(
                "the study is still arriving; it enters the worklist {} s after its last instance",
                settle.as_secs()
            )));
        }
        Ok(pk)
    }

    /// Claims (or renews the caller's claim on) a study.
    pub async fn claim(&self, caller: &Caller, study_uid: String) -> Result<WorklistItem> {
        if caller.role != Role::Radiologist {
            return Err(ApiError::PermissionDenied(
                "only radiologists claim studies".into(),
            ));
        }
        let (settle, lease) = (self.settle, self.lease);
        let (me, uid) = (caller.username.clone(), study_uid.clone());
        let c2 = caller.clone();
        self.db
            .write(move |c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let pk = Worklist::locate(&tx, &uid, settle, &c2)?;
                let now = now_unix();
                let held: Option<(String, i64, Option<String>)> = tx
                    .query_row(
                        "SELECT claimed_by, lease_expires_at, reported_at FROM worklist WHERE study_pk = ?1",
                        [pk],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()?;
                if let Some((holder, until, reported)) = held {
                    if reported.is_some() {
                        return Err(ApiError::FailedPrecondition(
                            "the study is already reported".into(),
                        ));
                    }
                    if !holder.is_empty() && holder != me && until > now {
                        return Err(ApiError::FailedPrecondition(format!(
                            "the study is claimed by {holder} until {}",
                            format_unix(until)
                        )));
                    }
                }
                tx.execute(
                    "INSERT INTO worklist (study_pk, claimed_by, lease_expires_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (study_pk) DO UPDATE SET
                        claimed_by = excluded.claimed_by, lease_expires_at = excluded.lease_expires_at",
                    params![pk, me, now + lease.as_secs() as i64],
                )?;
                tx.commit()?;
                Ok(())
            })
            .await?;
        self.poke.notify_one();
        self.item(study_uid).await
    }

    /// Releases the caller's claim.
    pub async fn release(&self, caller: &Caller, study_uid: String) -> Result<()> {
        if caller.role != Role::Radiologist {
            return Err(ApiError::PermissionDenied(
                "only radiologists claim and release studies".into(),
            ));
        }
        let c2 = caller.clone();
        self.db
            .write(move |c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let pk = Worklist::locate(&tx, &study_uid, Duration::ZERO, &c2)?;
                let changed = tx.execute(
                    "UPDATE worklist SET claimed_by = '', lease_expires_at = 0
                     WHERE study_pk = ?1 AND claimed_by = ?2 AND lease_expires_at > ?3",
                    params![pk, c2.username, now_unix()],
                )?;
                if changed == 0 {
                    return Err(ApiError::FailedPrecondition(
                        "you do not hold a claim on this study".into(),
                    ));
                }
                tx.commit()?;
                Ok(())
            })
            .await?;
        self.poke.notify_one();
        Ok(())
    }

    /// Sets a study's priority: the sending clinic's technicians, or radiologists.
    pub async fn set_priority(
        &self,
        caller: &Caller,
        study_uid: String,
        priority: Priority,
    ) -> Result<WorklistItem> {
        if !matches!(caller.role, Role::Radiologist | Role::Technician) {
            return Err(ApiError::PermissionDenied(
                "only technicians and radiologists set priorities".into(),
            ));
        }
        if priority == Priority::Unspecified {
            return Err(ApiError::InvalidArgument("priority is required".into()));
        }
        let c2 = caller.clone();
        let uid = study_uid.clone();
        self.db
            .write(move |c| {
                let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let pk = Worklist::locate(&tx, &uid, Duration::ZERO, &c2)?;
                tx.execute(
                    "INSERT INTO worklist (study_pk, priority, priority_set_by) VALUES (?1, ?2, ?3)
                     ON CONFLICT (study_pk) DO UPDATE SET
                        priority = excluded.priority, priority_set_by = excluded.priority_set_by",
                    params![pk, priority as i32, c2.username],
                )?;
                tx.commit()?;
                Ok(())
            })
            .await?;
        self.poke.notify_one();
        self.item_seen_by(counted_clinic(caller).to_string(), study_uid)
            .await
    }

    /// Changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Polls the index for changes once a second (or at once after a local
    /// claim) and publishes them; an idle index is not re-read. Runs until
    /// the process stops.
    pub async fn run_poller(self: Arc<Self>) {
        let scope = Scope {
            statuses: format!(
                ",{},{},",
                ItemStatus::Unread as i32,
                ItemStatus::Claimed as i32
            ),
            ..Scope::default()
        };
        let mut known: Option<HashMap<String, WorklistItem>> = None;
        // Whether polling can find anything new: the index changed (another
        // connection committed: the gateway, a claim), a study may have
        // settled since (something was committed within the settle time),
        // or a claim's lease may have run out. Otherwise the poll, which
        // counts every listed study's instances, is skipped.
        let watch = self.db.own_reader().ok();
        let mut seen_version: Option<i64> = None;
        let mut changed_at = std::time::Instant::now();
        let mut polled_at = std::time::Instant::now();
        let mut first = true;
        loop {
            // A second between polls, or a local claim's poke.
            let poked = first
                || tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => false,
                    _ = self.poke.notified() => true,
                };
            first = false;
            let version = watch.as_ref().and_then(|w| {
                w.connection()
                    .query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))
                    .ok()
            });
            if version.is_none() || version != seen_version {
                seen_version = version;
                changed_at = std::time::Instant::now();
            }
            let since = Since {
                change: changed_at.elapsed(),
                poll: polled_at.elapsed(),
            };
            if !poked && !worth_polling(known.as_ref(), since, self.settle, now_unix()) {
                continue;
            }
            polled_at = std::time::Instant::now();
            let settle = self.settle;
            let s = scope.clone();
            match self
                .db
                .read(move |c| query_items(c, settle, &s, 10_000))
                .await
            {
                Ok(items) => {
                    let current: HashMap<String, WorklistItem> = items
                        .into_iter()
                        .map(|i| (i.study_instance_uid.clone(), i))
                        .collect();
                    if let Some(previous) = &known {
                        self.publish(previous, &current);
                    }
                    known = Some(current);
                }
                Err(e) => tracing::warn!(error = %e, "worklist poll failed"),
            }
        }
    }

    fn publish(
        &self,
        previous: &HashMap<String, WorklistItem>,
        current: &HashMap<String, WorklistItem>,
    ) {
        use worklist_event::Kind;
        for (uid, item) in current {
            let kind = match previous.get(uid) {
                None => Kind::Added,
                Some(old) if !same_but_waiting(old, item) => Kind::Changed,
                Some(_) => continue,
            };
            let _ = self.changes.send(Change {
                kind,
                item: item.clone(),
            });
        }
        for (uid, item) in previous {
            if !current.contains_key(uid) {
                let _ = self.changes.send(Change {
                    kind: Kind::Removed,
                    item: item.clone(),
                });
            }
        }
    }
}

/// How long ago the index last changed, and the worklist was last polled.
#[derive(Debug, Clone, Copy)]
struct Since {
    change: Duration,
    poll: Duration,
}

/// Whether a poll can find anything `known` (the last poll's items) does
/// not show: nothing was polled yet, a study may have settled since (a
/// commit within the settle time, plus a margin), or a listed claim's lease
/// has run out. And once a minute regardless: settling is judged by the
/// wall clock, which may step, and a failed poll must not leave it idle.
fn worth_polling(
    known: Option<&HashMap<String, WorklistItem>>,
    since: Since,
    settle: Duration,
    now: i64,
) -> bool {
    let Some(items) = known else {
        return true;
    };
    since.change <= settle + Duration::from_secs(2)
        || since.poll >= Duration::from_secs(60)
        || items
            .values()
            .any(|i| i.lease_expires_at_unix != 0 && i.lease_expires_at_unix <= now)
}

/// Whether two items show the same, apart from how long they have waited.
fn same_but_waiting(a: &WorklistItem, b: &WorklistItem) -> bool {
    let mut a = a.clone();
    a.waiting_seconds = b.waiting_seconds;
    a == *b
}

/// What one watcher has been shown, to turn the poller's changes into its
/// own events: an item enters (Added) when it first passes the watcher's
/// filter, changes (Changed) only when what it shows changes, and leaves
/// (Removed) when it stops passing or leaves the worklist. A township
/// watcher's items count only what its clinic sent: each change is read
/// again for it.
pub struct Watcher {
    scope: Scope,
    shown: HashMap<String, WorklistItem>,
}

impl Watcher {
    pub fn new(scope: Scope, current: &[WorklistItem]) -> Watcher {
        let shown = current
            .iter()
            .map(|i| (i.study_instance_uid.clone(), i.clone()))
            .collect();
        Watcher { scope, shown }
    }

    /// The event this watcher gets for `change`, if any.
    pub async fn event(
        &mut self,
        worklist: &Worklist,
        change: Change,
    ) -> Result<Option<(worklist_event::Kind, WorklistItem)>> {
        use worklist_event::Kind;
        let uid = change.item.study_instance_uid.clone();
        if change.kind == Kind::Removed {
            return Ok(self.shown.remove(&uid).map(|item| (Kind::Removed, item)));
        }
        if !self.scope.clinic_id.is_empty() && change.item.clinic_id != self.scope.clinic_id {
            return Ok(None);
        }
        let item = if self.scope.sent_by.is_empty() {
            change.item
        } else {
            worklist
                .item_seen_by(self.scope.sent_by.clone(), uid.clone())
                .await?
        };
        let kind = match (self.shown.get(&uid), self.scope.admits(&item)) {
            (None, true) => Kind::Added,
            (Some(shown), true) if same_but_waiting(shown, &item) => return Ok(None),
            (Some(_), true) => Kind::Changed,
            (Some(_), false) => {
                self.shown.remove(&uid);
                return Ok(Some((Kind::Removed, item)));
            }
            (None, false) => return Ok(None),
        };
        self.shown.insert(uid, item.clone());
        Ok(Some((kind, item)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_index_is_not_polled() {
        let settle = Duration::from_secs(60);
        let secs = Duration::from_secs;
        // The index last changed `change` s ago, polled a second ago.
        let since = |change: u64| Since {
            change: secs(change),
            poll: secs(1),
        };
        let mut items = HashMap::new();
        // Nothing polled yet; a change within the settle time (a study may
        // still settle): poll.
        assert!(worth_polling(None, since(3600), settle, 1_000));
        assert!(worth_polling(Some(&items), since(61), settle, 1_000));
        // Idle for longer: no poll...
        assert!(!worth_polling(Some(&items), since(63), settle, 1_000));
        // ... but for one a minute.
        let overdue = Since {
            change: secs(3600),
            poll: secs(60),
        };
        assert!(worth_polling(Some(&items), overdue, settle, 1_000));
        // ... unless a listed claim's lease has run out.
        let claimed = WorklistItem {
            lease_expires_at_unix: 1_000,
            ..Default::default()
        };
        items.insert("2.25.1".to_string(), claimed);
        assert!(!worth_polling(Some(&items), since(63), settle, 999));
        assert!(worth_polling(Some(&items), since(63), settle, 1_000));
    }
}
