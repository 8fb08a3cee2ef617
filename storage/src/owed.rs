//! The ledger of storage commitment reports owed to requesters (PS3.4
//! J.3.3). The gateway records a request before it answers the N-ACTION
//! and removes it once a report is acknowledged, so that neither a
//! requester that left nor a restart of the gateway loses a report. What a
//! report says is decided when it is sent (by re-verifying); this is only
//! the list of what is owed, to whom, and when to try next.

use rusqlite::{Connection, params};

use crate::index::writer::Job;
use crate::{Result, Storage};

/// A report owed to a requester.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwedReport {
    /// The ledger's id of this report (ignored by [`Storage::owe_report`]).
    pub id: i64,
    /// The calling AE title that asked.
    pub requester_ae: String,
    pub transaction_uid: String,
    /// The clinic whose instances alone may be confirmed (`None`: the
    /// county's stations, which may confirm any).
    pub clinic_scope: Option<String>,
    /// (Referenced SOP Class UID, Referenced SOP Instance UID), as asked.
    pub references: Vec<(String, String)>,
    /// Unix seconds of the request.
    pub created_at: i64,
    /// Deliveries on a new association tried so far.
    pub attempts: u32,
}

/// A change to the ledger, applied by the index writer (durably, like an
/// instance row).
#[derive(Debug)]
pub(crate) enum Change {
    /// Held by the association that asked (not due) until released. A
    /// request repeating its transaction UID replaces the earlier one
    /// (under a new id). `added` receives the new row's id.
    Add {
        report: OwedReport,
        added: std::cell::Cell<i64>,
    },
    Remove {
        id: i64,
    },
    Due {
        id: i64,
        at: i64,
        attempted: bool,
    },
    /// At start no association holds a report and none need wait: all due at `at`.
    AllDue {
        at: i64,
    },
}

impl Change {
    /// The id of the row changed (added, for `Add`).
    pub(crate) fn row_id(&self) -> i64 {
        match self {
            Change::Add { added, .. } => added.get(),
            Change::Remove { id } | Change::Due { id, .. } => *id,
            Change::AllDue { .. } => 0,
        }
    }

    pub(crate) fn apply(&self, c: &Connection) -> Result<()> {
        match self {
            Change::Add { report: r, added } => {
                c.prepare_cached(
                    "INSERT OR REPLACE INTO owed_reports
                       (requester_ae, transaction_uid, clinic_scope, refs, created_at, attempts, due_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, 0, NULL)",
                )?
                .execute(params![
                    r.requester_ae,
                    r.transaction_uid,
                    r.clinic_scope,
                    encode_refs(&r.references),
                    r.created_at
                ])?;
                added.set(c.last_insert_rowid());
            }
            Change::Remove { id } => {
                c.prepare_cached("DELETE FROM owed_reports WHERE id = ?1")?
                    .execute([id])?;
            }
            Change::Due { id, at, attempted } => {
                c.prepare_cached(
                    "UPDATE owed_reports SET due_at = ?2, attempts = attempts + ?3 WHERE id = ?1",
                )?
                .execute(params![id, at, *attempted as i64])?;
            }
            Change::AllDue { at } => {
                c.prepare_cached(
                    "UPDATE owed_reports SET due_at = ?1 WHERE due_at IS NULL OR due_at > ?1",
                )?
                .execute([at])?;
            }
        }
        Ok(())
    }
}

/// References as text: one `class<TAB>instance` line each. A peer's value
/// could hold a tab or a newline, so `%`, tab and newline are escaped.
fn encode_refs(refs: &[(String, String)]) -> String {
    let esc = |s: &str| {
        s.replace('%', "%25")
            .replace('\t', "%09")
            .replace('\n', "%0A")
    };
    refs.iter()
        .map(|(class, instance)| format!("{}\t{}\n", esc(class), esc(instance)))
        .collect()
}

fn decode_refs(text: &str) -> Vec<(String, String)> {
    let unesc = |s: &str| {
        s.replace("%0A", "\n")
            .replace("%09", "\t")
            .replace("%25", "%")
    };
    text.lines()
        .filter_map(|line| line.split_once('\t'))
        .map(|(class, instance)| (unesc(class), unesc(instance)))
        .collect()
}

impl Storage {
    /// Records a report as owed, held by the asking association; its id.
    pub async fn owe_report(&self, report: OwedReport) -> Result<i64> {
        self.change_owed(Change::Add {
            report,
            added: std::cell::Cell::new(0),
        })
        .await
    }

    /// The report was acknowledged (or will never be deliverable): forgets it.
    pub async fn report_settled(&self, id: i64) -> Result<()> {
        self.change_owed(Change::Remove { id }).await.map(drop)
    }

    /// The report is to be delivered on a new association from `at` (Unix
    /// seconds); `attempted` counts a failed delivery.
    pub async fn report_due(&self, id: i64, at: i64, attempted: bool) -> Result<()> {
        self.change_owed(Change::Due { id, at, attempted })
            .await
            .map(drop)
    }

    /// Makes every owed report due at `at` (at start: none is held, and a
    /// restart is as good a time as any to try again).
    pub async fn all_reports_due(&self, at: i64) -> Result<()> {
        self.change_owed(Change::AllDue { at }).await.map(drop)
    }

    async fn change_owed(&self, change: Change) -> Result<i64> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Job::Owed { change, reply })?;
        rx.await.map_err(|_| crate::Error::ShuttingDown)?
    }

    /// The reports due at `now`, oldest first, and when the next of the
    /// others falls due (reports held by an association are neither).
    pub fn due_reports(&self, now: i64) -> Result<(Vec<OwedReport>, Option<i64>)> {
        let reader = self.reader()?;
        let c = reader.connection();
        let due = c
            .prepare_cached(
                "SELECT id, requester_ae, transaction_uid, clinic_scope, refs, created_at, attempts
                 FROM owed_reports WHERE due_at <= ?1 ORDER BY id",
            )?
            .query_map([now], |r| {
                Ok(OwedReport {
                    id: r.get(0)?,
                    requester_ae: r.get(1)?,
                    transaction_uid: r.get(2)?,
                    clinic_scope: r.get(3)?,
                    references: decode_refs(&r.get::<_, String>(4)?),
                    created_at: r.get(5)?,
                    attempts: r.get::<_, i64>(6)? as u32,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let next = c
            .prepare_cached("SELECT min(due_at) FROM owed_reports WHERE due_at > ?1")?
            .query_row([now], |r| r.get(0))?;
        Ok((due, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(txn: &str) -> OwedReport {
        OwedReport {
            id: 0,
            requester_ae: "XINZHEN_CT".into(),
            transaction_uid: txn.into(),
            clinic_scope: Some("xinzhen".into()),
            references: vec![
                ("1.2.840.10008.5.1.4.1.1.2".into(), "2.25.1".into()),
                ("odd\tclass%".into(), "two\nlines".into()),
            ],
            created_at: 1_000,
            attempts: 0,
        }
    }

    #[tokio::test]
    async fn owed_reports_are_held_then_due_then_settled_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ten = {
            let storage = Storage::open(dir.path()).unwrap();
            let ten = storage.owe_report(report("2.25.10")).await.unwrap();
            let eleven = storage.owe_report(report("2.25.11")).await.unwrap();
            assert_ne!(ten, eleven);
            // Held by their association: not due.
            assert_eq!(storage.due_reports(5_000).unwrap(), (vec![], None));
            storage.report_due(ten, 2_000, false).await.unwrap();
            let (due, next) = storage.due_reports(1_500).unwrap();
            assert!(due.is_empty());
            assert_eq!(next, Some(2_000));
            let (due, _) = storage.due_reports(2_000).unwrap();
            let expected = OwedReport {
                id: ten,
                ..report("2.25.10")
            };
            assert_eq!(due, vec![expected], "references survive escaping");
            storage.report_due(ten, 9_000, true).await.unwrap();
            storage.report_settled(eleven).await.unwrap();
            ten
        };
        // After a restart every owed report is due at once.
        let storage = Storage::open(dir.path()).unwrap();
        storage.all_reports_due(3_000).await.unwrap();
        let (due, next) = storage.due_reports(3_000).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].id, due[0].attempts), (ten, 1));
        assert_eq!(next, None);
    }

    /// A request repeating a transaction UID replaces the older row; whoever
    /// still holds the older one changes nothing any more.
    #[tokio::test]
    async fn a_repeated_transaction_uid_gets_a_row_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let first = storage.owe_report(report("2.25.20")).await.unwrap();
        let second = storage.owe_report(report("2.25.20")).await.unwrap();
        assert_ne!(first, second);
        storage.report_settled(first).await.unwrap();
        storage.report_due(first, 0, true).await.unwrap();
        assert_eq!(
            storage.due_reports(10).unwrap(),
            (vec![], None),
            "still held"
        );
        storage.report_due(second, 5, false).await.unwrap();
        let (due, _) = storage.due_reports(10).unwrap();
        assert_eq!((due.len(), due[0].id, due[0].attempts), (1, second, 0));
    }
}
