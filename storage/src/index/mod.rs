//! The SQLite index: schema migrations, the single writer, and read queries.

pub(crate) mod schema;
pub(crate) mod writer;

use std::path::Path;
use std::sync::Arc;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::error::Result;

pub use writer::StoreOutcome;

/// Opens the write connection (WAL, synchronous=FULL: a COMMIT is on disk)
/// and brings the schema up to date.
pub(crate) fn open_writer(path: &Path) -> Result<Connection> {
    let conn = open_migrated(path, "FULL")?;
    schema::backfill_name_groups(&conn)?;
    Ok(conn)
}

/// A read-write connection to the index at `path` in WAL mode with
/// `synchronous`, foreign keys on, its schema brought up to date.
fn open_migrated(path: &Path, synchronous: &str) -> Result<Connection> {
    let mut conn = Connection::open(path)?;
    // First: another service may be opening (and migrating) the same index.
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    retry_busy(|| Ok(conn.pragma_update(None, "journal_mode", "WAL")?))?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    retry_busy(|| schema::migrate(&mut conn))?;
    Ok(conn)
}

/// Runs `f` again, for up to 10 s, while SQLite answers "busy" or "locked"
/// at once. Two processes opening a fresh index together (the gateway, the
/// viewer-api, the admin command) contend for switching it to WAL, which
/// the busy timeout does not cover; a start must not fail for that. (An
/// attempt may itself wait out the busy timeout, so a start blocked by
/// another process's long migration may take longer than 10 s.)
fn retry_busy<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match f() {
            Err(crate::Error::Index(rusqlite::Error::SqliteFailure(e, _)))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Opens a read-write connection for a service beside the gateway (the
/// viewer-api, the admin command) that keeps its own tables (users, sessions,
/// worklist state, audit) in the index. The schema is brought up to date.
///
/// `synchronous=NORMAL`: a commit reaches the WAL before this returns, so it
/// survives a crash of the process; a power loss may drop the last commits
/// until the next checkpoint or the gateway's next (fully synced) commit.
pub fn open_service(data_dir: &Path) -> Result<Connection> {
    std::fs::create_dir_all(data_dir)
        .map_err(crate::Error::io("create data directory", data_dir))?;
    open_migrated(&data_dir.join(crate::INDEX_FILE), "NORMAL")
}

/// SQL functions the queries use (see `query::condition_sql`):
/// `pn_search(name)`, a person name's search form
/// ([`crate::query::pn_search_form`]), and `pn_group(name, i)`, component
/// group `i` of it (0 alphabetic, 1 ideographic, 2 phonetic).
fn register_functions(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
    conn.create_scalar_function("pn_search", 1, flags, |ctx| {
        Ok(crate::query::pn_search_form(&ctx.get::<String>(0)?))
    })?;
    conn.create_scalar_function("pn_group", 2, flags, |ctx| {
        let form = crate::query::pn_search_form(&ctx.get::<String>(0)?);
        let group = usize::try_from(ctx.get::<i64>(1)?).unwrap_or(usize::MAX);
        Ok(form.split('=').nth(group).unwrap_or_default().to_string())
    })?;
    Ok(())
}

/// A read-only connection for queries.
#[derive(Debug)]
pub struct IndexReader {
    conn: Connection,
}

/// Read-only connections to one index, kept for the next query (opening
/// one and loading the schema costs more than a selective query).
#[derive(Debug)]
pub struct ReaderPool {
    path: std::path::PathBuf,
    stable_plans: bool,
    idle: std::sync::Mutex<Vec<IndexReader>>,
}

/// Idle connections a [`ReaderPool`] keeps.
const READERS_KEPT: usize = 8;

impl ReaderPool {
    /// A pool for the index at `path`. `stable_plans` sets
    /// `SQLITE_DBCONFIG_ENABLE_QPSG`: no statement is prepared again for
    /// new parameter values, for callers none of whose plans depend on them
    /// (not C-FIND, whose GLOB prefixes need the bound value).
    pub fn new(path: std::path::PathBuf, stable_plans: bool) -> Arc<ReaderPool> {
        Arc::new(ReaderPool {
            path,
            stable_plans,
            idle: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// A connection, from the idle ones when there is one.
    pub fn get(self: &Arc<Self>) -> Result<PooledReader> {
        let idle = self.idle.lock().ok().and_then(|mut p| p.pop());
        let reader = match idle {
            Some(r) => r,
            None => {
                let r = IndexReader::open(&self.path)?;
                if self.stable_plans {
                    r.conn.set_db_config(
                        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
                        true,
                    )?;
                }
                r
            }
        };
        Ok(PooledReader {
            reader: Some(reader),
            pool: self.clone(),
        })
    }
}

/// A read-only connection from a [`ReaderPool`]; goes back to it when dropped.
#[derive(Debug)]
pub struct PooledReader {
    reader: Option<IndexReader>,
    pool: Arc<ReaderPool>,
}

impl std::ops::Deref for PooledReader {
    type Target = IndexReader;

    fn deref(&self) -> &IndexReader {
        self.reader.as_ref().expect("reader present until dropped")
    }
}

impl Drop for PooledReader {
    fn drop(&mut self) {
        // A connection still inside a read transaction would pin an old
        // snapshot (and the WAL) for its next user: it is closed instead.
        if let Some(reader) = self.reader.take()
            && reader.conn.is_autocommit()
            && let Ok(mut idle) = self.pool.idle.lock()
            && idle.len() < READERS_KEPT
        {
            idle.push(reader);
        }
    }
}

/// Whether `clinic_id` sent these exact bytes (SHA-256) of the instance.
pub fn sent_by(
    conn: &Connection,
    sop_instance_uid: &str,
    sha256: &str,
    clinic_id: &str,
) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM instance_senders
             WHERE sop_instance_uid = ?1 AND sha256 = ?2 AND clinic_id = ?3",
        )?
        .query_row([sop_instance_uid, sha256, clinic_id], |_| Ok(()))
        .optional()?
        .is_some())
}

/// [`IndexReader::instance`]'s statement.
const INSTANCE_SQL: &str = "SELECT i.sop_instance_uid, i.sop_class_uid,
        (SELECT series_uid FROM series WHERE pk = i.series_pk),
        (SELECT st.study_uid FROM series se JOIN studies st ON st.pk = se.study_pk
         WHERE se.pk = i.series_pk),
        i.transfer_syntax, i.blob_key, i.sha256, i.size, i.dataset_offset,
        i.clinic_id, i.calling_ae, i.received_at
    FROM instances i WHERE i.sop_instance_uid = ?1";

/// The current version of an instance, as indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRecord {
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub series_instance_uid: String,
    pub study_instance_uid: String,
    pub transfer_syntax: String,
    pub blob_key: String,
    pub sha256: String,
    pub size: u64,
    pub dataset_offset: u64,
    pub clinic_id: String,
    pub calling_ae: String,
    pub received_at: String,
}

/// One stored version of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRecord {
    pub blob_key: String,
    pub sha256: String,
    pub size: u64,
    /// When it stopped being current; equal to `received_at` for a version
    /// that never was (another clinic's bytes under a UID its owner holds).
    pub superseded_at: Option<String>,
}

impl IndexReader {
    pub(crate) fn open(path: &Path) -> Result<IndexReader> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        register_functions(&conn)?;
        Ok(IndexReader { conn })
    }

    /// Opens the index of the data directory `data_dir` for reading, without
    /// touching the spool or starting a writer (for services beside the gateway).
    pub fn open_in(data_dir: &Path) -> Result<IndexReader> {
        IndexReader::open(&data_dir.join(crate::INDEX_FILE))
    }

    /// The underlying connection, for queries owned by other crates.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn instance(&self, sop_instance_uid: &str) -> Result<Option<InstanceRecord>> {
        // Cached: a retrieve or a storage commitment asks once per
        // instance, and preparing this statement costs more than running
        // it. The series and study UIDs come from correlated subqueries,
        // not a join: this SQLite (built with STAT4) prepares a join with a
        // bound parameter again for every new value, which cost a 60-slice
        // retrieve about 0.8 ms before its first byte was sent.
        Ok(self
            .conn
            .prepare_cached(INSTANCE_SQL)?
            .query_row([sop_instance_uid], |r| {
                Ok(InstanceRecord {
                    sop_instance_uid: r.get(0)?,
                    sop_class_uid: r.get(1)?,
                    series_instance_uid: r.get(2)?,
                    study_instance_uid: r.get(3)?,
                    transfer_syntax: r.get(4)?,
                    blob_key: r.get(5)?,
                    sha256: r.get(6)?,
                    size: r.get::<_, i64>(7)? as u64,
                    dataset_offset: r.get::<_, i64>(8)? as u64,
                    clinic_id: r.get(9)?,
                    calling_ae: r.get(10)?,
                    received_at: r.get(11)?,
                })
            })
            .optional()?)
    }

    /// The instance as `clinic_id` sent it: the current version when that
    /// clinic sent its bytes, else the newest version it sent that is kept
    /// beside the current one. Such a record has that version's blob, hash,
    /// size, transfer syntax and SOP class, and the current row's other
    /// fields (dataset offset included): it is for verifying, not for sending.
    pub fn instance_sent_by(
        &self,
        sop_instance_uid: &str,
        clinic_id: &str,
    ) -> Result<Option<InstanceRecord>> {
        let Some(current) = self.instance(sop_instance_uid)? else {
            return Ok(None);
        };
        if self.sent_by(sop_instance_uid, &current.sha256, clinic_id)? {
            return Ok(Some(current));
        }
        let version = self
            .conn
            .prepare_cached(
                "SELECT v.blob_key, v.sha256, v.size, v.transfer_syntax, v.sop_class_uid
                 FROM instance_versions v
                 WHERE v.sop_instance_uid = ?1 AND EXISTS (SELECT 1 FROM instance_senders s
                     WHERE s.sop_instance_uid = v.sop_instance_uid AND s.sha256 = v.sha256
                       AND s.clinic_id = ?2)
                 ORDER BY v.pk DESC LIMIT 1",
            )?
            .query_row([sop_instance_uid, clinic_id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .optional()?;
        Ok(version.map(
            |(blob_key, sha256, size, transfer_syntax, class)| InstanceRecord {
                blob_key,
                sha256,
                size: size as u64,
                transfer_syntax,
                // ('' for versions stored before the class was recorded.)
                sop_class_uid: if class.is_empty() {
                    current.sop_class_uid.clone()
                } else {
                    class
                },
                ..current
            },
        ))
    }

    /// Every version of an instance, oldest first.
    pub fn versions(&self, sop_instance_uid: &str) -> Result<Vec<VersionRecord>> {
        let mut stmt = self.conn.prepare(
            "SELECT blob_key, sha256, size, superseded_at FROM instance_versions
             WHERE sop_instance_uid = ?1 ORDER BY pk",
        )?;
        let rows = stmt.query_map([sop_instance_uid], |r| {
            Ok(VersionRecord {
                blob_key: r.get(0)?,
                sha256: r.get(1)?,
                size: r.get::<_, i64>(2)? as u64,
                superseded_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether `clinic_id` sent these exact bytes (SHA-256) of the instance.
    pub fn sent_by(&self, sop_instance_uid: &str, sha256: &str, clinic_id: &str) -> Result<bool> {
        sent_by(&self.conn, sop_instance_uid, sha256, clinic_id)
    }

    /// Number of (current) instances.
    pub fn instance_count(&self) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM instances", [], |r| r.get::<_, i64>(0))?
            as u64)
    }

    /// `(blob_key, sha256, size)` of every version the index references.
    pub fn all_blobs(&self) -> Result<Vec<(String, String, u64)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT blob_key, sha256, size FROM instance_versions ORDER BY pk")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn instance_lookups_are_prepared_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::INDEX_FILE);
        let _schema = super::open_writer(&path).unwrap();
        let reader = super::IndexReader::open(&path).unwrap();
        for uid in ["2.25.1", "2.25.2", "2.25.3"] {
            assert_eq!(reader.instance(uid).unwrap(), None);
        }
        let stmt = reader.conn.prepare_cached(super::INSTANCE_SQL).unwrap();
        assert_eq!(
            stmt.get_status(rusqlite::StatementStatus::RePrepare),
            0,
            "a new UID must not prepare the lookup again"
        );
    }

    /// Services opening a fresh index at the same moment (the gateway, the
    /// viewer-api, its admin command) all start: none fails with "database
    /// is locked" while another switches it to WAL or migrates it.
    #[test]
    fn services_opening_a_fresh_index_together_all_start() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let start = std::sync::Arc::new(std::sync::Barrier::new(4));
            let openers: Vec<_> = (0..4)
                .map(|i| {
                    let (dir, start) = (dir.path().to_owned(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        if i == 0 {
                            super::open_writer(&dir.join(crate::INDEX_FILE)).map(drop)
                        } else {
                            super::open_service(&dir).map(drop)
                        }
                    })
                })
                .collect();
            for opener in openers {
                opener.join().unwrap().unwrap();
            }
        }
    }
}
