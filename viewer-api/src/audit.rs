//! Every read of patient data, and every refused call, leaves a row in the
//! index's append-only `audit` table: who, which patient and study, what,
//! when, from where, and the outcome.

use rusqlite::params;

use crate::auth::Caller;
use crate::db::Db;
use crate::error::Result;

/// One audited call.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    /// The RPC, e.g. `RenderFrame`.
    pub action: &'static str,
    pub username: String,
    pub clinic_id: String,
    pub peer: String,
    pub study_uid: String,
    /// `clinic:patient-id` of the patient whose data was read.
    pub patient_ref: String,
    /// What exactly (instance UID and frame, filter, ...), never demographics.
    pub detail: String,
    /// `success`, `denied: ...`, `not found: ...`, `failed: ...`.
    pub outcome: String,
    /// Number of items returned, where it means something.
    pub matches: u64,
}

impl Entry {
    /// Sets the outcome column from a call's result.
    pub fn set_outcome<T>(&mut self, result: &crate::error::Result<T>) {
        self.outcome = match result {
            Ok(_) => "success".into(),
            Err(e) => e.outcome(),
        };
    }

    pub fn new(action: &'static str, caller: &Caller) -> Entry {
        Entry {
            action,
            username: caller.username.clone(),
            clinic_id: caller.clinic_id.clone(),
            peer: caller.peer.clone(),
            ..Entry::default()
        }
    }
}

/// Appends `entry` to the audit log.
pub async fn record(db: &Db, entry: Entry) -> Result<()> {
    let db2 = db.clone();
    tokio::task::spawn_blocking(move || record_blocking(&db2, entry)).await?
}

/// At most this many characters of a client-given field are kept.
const MAX_FIELD: usize = 256;

/// A client-given field as kept: control characters, separators and
/// bidirectional overrides escaped (`\n`, not a line break, so no reader
/// of the trail is shown a forged line), at most
/// [`MAX_FIELD`] characters.
fn bounded(s: String) -> String {
    let escaped = if s.chars().any(is_unsafe) {
        let mut escaped = String::with_capacity(s.len() + 8);
        for c in s.chars() {
            if is_unsafe(c) {
                escaped.extend(c.escape_default());
            } else {
                escaped.push(c);
            }
        }
        escaped
    } else {
        s
    };
    if escaped.chars().count() <= MAX_FIELD {
        escaped
    } else {
        escaped.chars().take(MAX_FIELD).chain("…".chars()).collect()
    }
}

/// Characters a reader of the trail could be misled by: controls, line
/// and paragraph separators, and bidirectional overrides and isolates.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// [`record`] on this (blocking) thread.
pub fn record_blocking(db: &Db, entry: Entry) -> Result<()> {
    let entry = Entry {
        detail: bounded(entry.detail),
        username: bounded(entry.username),
        study_uid: bounded(entry.study_uid),
        // Error messages may quote what the client sent; a Patient ID is
        // what a sender's dataset said.
        outcome: bounded(entry.outcome),
        patient_ref: bounded(entry.patient_ref),
        ..entry
    };
    db.write_blocking(move |c| {
        c.prepare_cached(
            "INSERT INTO audit (at, calling_ae, clinic_id, peer, action, detail, outcome, matches,
                                username, study_uid, patient_ref)
             VALUES (?1, '', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?
        .execute(params![
            storage::utc_timestamp(std::time::SystemTime::now()),
            entry.clinic_id,
            entry.peer,
            entry.action,
            entry.detail,
            entry.outcome,
            entry.matches as i64,
            entry.username,
            entry.study_uid,
            entry.patient_ref
        ])?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_given_fields_keep_no_control_characters_and_are_bounded() {
        assert_eq!(bounded("2.25.1 frame 1".into()), "2.25.1 frame 1");
        assert_eq!(
            bounded("2.25.1\n2026-01-01 admin login success\u{1b}[2J".into()),
            "2.25.1\\n2026-01-01 admin login success\\u{1b}[2J"
        );
        let long = bounded("x".repeat(1000));
        assert_eq!(long.chars().count(), MAX_FIELD + 1);
        assert!(long.ends_with('…'));
        assert_eq!(
            bounded("a\u{202E}b\u{2028}c".into()),
            "a\\u{202e}b\\u{2028}c"
        );
        let short = bounded("y".repeat(MAX_FIELD));
        assert_eq!(short, "y".repeat(MAX_FIELD));
    }
}
