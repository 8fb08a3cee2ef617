//! The local record of what the center has confirmed: re-runs skip files
//! whose (SOP Instance UID, file SHA-256) the same center already committed
//! for the same calling AE (the center confirms to a clinic only what that
//! clinic sent). Written as each confirmation arrives, so an interrupted
//! run resumes where it stopped.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

#[derive(Debug)]
pub(crate) struct Record {
    conn: Connection,
    /// `CALLING@host:port/CALLED`: a record is only valid for the center
    /// that confirmed it, to the clinic that sent it.
    center: String,
}

impl Record {
    /// Opens (creating) the record at `path` for `center`; rows kept under
    /// `legacy_center` (an older key for the same center) become its own.
    pub(crate) fn open(path: &Path, center: &str, legacy_center: &str) -> rusqlite::Result<Record> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        Record::on(Connection::open(path)?, center, legacy_center)
    }

    /// Like [`Record::open`], but a record that does not exist yet is not
    /// created (a dry run leaves nothing behind): an empty one in memory.
    pub(crate) fn open_existing(
        path: &Path,
        center: &str,
        legacy_center: &str,
    ) -> rusqlite::Result<Record> {
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Record::on(Connection::open_in_memory()?, center, legacy_center)
            }
            // One that cannot be read is an error, as in a real run.
            _ => Record::open(path, center, legacy_center),
        }
    }

    fn on(conn: Connection, center: &str, legacy_center: &str) -> rusqlite::Result<Record> {
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS committed (
                 center           TEXT NOT NULL,
                 sop_instance_uid TEXT NOT NULL,
                 sha256           TEXT NOT NULL,
                 committed_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
                 PRIMARY KEY (center, sop_instance_uid, sha256)
             );",
        )?;
        conn.execute(
            "UPDATE OR IGNORE committed SET center = ?1 WHERE center = ?2",
            params![center, legacy_center],
        )?;
        Ok(Record {
            conn,
            center: center.to_string(),
        })
    }

    /// Whether any version of this instance was committed here (then the
    /// file's hash decides).
    pub(crate) fn has_uid(&self, sop_instance_uid: &str) -> rusqlite::Result<bool> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT 1 FROM committed WHERE center = ?1 AND sop_instance_uid = ?2 LIMIT 1",
            )?
            .query_row(params![self.center, sop_instance_uid], |_| Ok(()))
            .optional()?
            .is_some())
    }

    pub(crate) fn is_committed(
        &self,
        sop_instance_uid: &str,
        sha256: &str,
    ) -> rusqlite::Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM committed WHERE center = ?1 AND sop_instance_uid = ?2 AND sha256 = ?3")?
            .query_row(params![self.center, sop_instance_uid, sha256], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Records `(SOP Instance UID, file SHA-256)` pairs the center
    /// confirmed. Each replaces what was recorded for its UID: the center
    /// now holds these bytes, so an older version's file is no longer
    /// committed there (a re-run with it sends it again).
    pub(crate) fn mark_committed<'a>(
        &mut self,
        items: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut older = tx.prepare_cached(
                "DELETE FROM committed WHERE center = ?1 AND sop_instance_uid = ?2 AND sha256 != ?3",
            )?;
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO committed (center, sop_instance_uid, sha256) VALUES (?1, ?2, ?3)",
            )?;
            for (uid, sha) in items {
                older.execute(params![self.center, uid, sha])?;
                insert.execute(params![self.center, uid, sha])?;
            }
        }
        tx.commit()
    }

    /// Forgets every version of these instances: the center no longer
    /// confirms them, so the next run sends them again.
    pub(crate) fn forget<'a>(
        &mut self,
        sop_instance_uids: impl IntoIterator<Item = &'a str>,
    ) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "DELETE FROM committed WHERE center = ?1 AND sop_instance_uid = ?2",
            )?;
            for uid in sop_instance_uids {
                stmt.execute(params![self.center, uid])?;
            }
        }
        tx.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_version_replaces_the_older_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = Record::open(&dir.path().join("r.sqlite"), "C", "old").unwrap();
        record
            .mark_committed([("2.25.1", "aa"), ("2.25.2", "cc")])
            .unwrap();
        record.mark_committed([("2.25.1", "bb")]).unwrap();
        assert!(!record.is_committed("2.25.1", "aa").unwrap());
        assert!(record.is_committed("2.25.1", "bb").unwrap());
        assert!(record.is_committed("2.25.2", "cc").unwrap());
        // Confirming the same bytes again changes nothing.
        record.mark_committed([("2.25.1", "bb")]).unwrap();
        assert!(record.is_committed("2.25.1", "bb").unwrap());
    }
}
