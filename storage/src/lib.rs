//! Durable storage of received instances: byte-exact blobs in `object_store`
//! and a SQLite index of clinics, patients, studies, series and instances.
//!
//! # Layout
//! - [`spool`]: a receiving instance streams to a temporary file, hashed on the way.
//! - [`attrs`]: index attributes read from the spooled dataset without trusting it.
//! - [`blobs`]: content-addressed blobs (`LocalFileSystem` or any `ObjectStore`).
//! - [`index`]: schema migrations, the single group-committing writer, queries.
//! - [`owed`]: storage commitment reports owed to requesters, until acknowledged.
//! - [`part10`]: the Part 10 header written in front of each received dataset.
//!
//! # Durability contract
//! [`Storage::commit`] returns `Ok` only when the blob is durable (fsynced file
//! and directory, or a completed object-store put) *and* its index row is
//! committed. The blob is made durable before the row is written, so a row
//! never points at a missing blob; a crash in between leaves at most an
//! unreferenced blob.

pub mod attrs;
pub mod background;
pub mod blobs;
mod error;
pub mod index;
pub mod owed;
pub mod part10;
pub mod query;
pub mod spool;
pub mod transcode;

use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::SystemTime;

use tokio::sync::oneshot;

pub use attrs::{DatasetError, InstanceAttrs};
pub use blobs::BlobStore;
pub use error::{Error, Result};
pub use index::{IndexReader, InstanceRecord, PooledReader, StoreOutcome};
pub use owed::OwedReport;
pub use spool::{Spool, Spooled};

use index::writer::{Job, NewInstance};

/// One audited access to patient data.
#[derive(Debug, Clone, Default)]
pub struct AuditEntry {
    pub calling_ae: String,
    pub clinic_id: String,
    pub peer: String,
    pub action: String,
    pub detail: String,
    pub outcome: String,
    pub matches: u64,
}

/// The index database's file name inside the data directory.
pub const INDEX_FILE: &str = "index.sqlite";

/// Who sent an instance.
#[derive(Debug, Clone)]
pub struct Source {
    pub clinic_id: String,
    pub calling_ae: String,
}

/// One writer per data directory. A second one would discard the first
/// one's spool (instances still arriving, not yet acknowledged) when it
/// starts, and write the index beside it; the lock (released when the
/// process ends, however it ends) makes it refuse to start instead.
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File> {
    let path = data_dir.join("writer.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(Error::io("open lock file", &path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::InUse(data_dir.to_owned())),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", &path)(e)),
    }
}

/// The storage layer, cheap to clone and share between associations.
#[derive(Debug, Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    blobs: BlobStore,
    spool_dir: PathBuf,
    writer: std::sync::Mutex<mpsc::Sender<Job>>,
    readers: Arc<index::ReaderPool>,
    /// Free bytes the data directory's filesystem keeps (0: no check).
    min_free_bytes: u64,
    /// Held (locked) while this storage is open: see [`lock_data_dir`].
    _lock: std::fs::File,
}

impl Storage {
    /// Opens (creating if needed) storage under `data_dir` with blobs on the
    /// local filesystem in `data_dir/blobs`.
    pub fn open(data_dir: &Path) -> Result<Storage> {
        let blobs = BlobStore::local(&data_dir.join("blobs"))?;
        Storage::open_with_blobs(data_dir, blobs, 0)
    }

    /// Opens the storage a `[storage]` section describes: blobs in its S3
    /// bucket when it names one, else on the local disk as [`Storage::open`];
    /// new instances refused below its `min_free_bytes`.
    pub fn open_configured(config: &consortium_config::StorageConfig) -> Result<Storage> {
        let blobs = BlobStore::open(config)?;
        Storage::open_with_blobs(&config.data_dir, blobs, config.min_free_bytes)
    }

    /// Opens storage with blobs in any object store (in-memory, S3-compatible).
    /// The spool and the index still live under `data_dir`.
    pub fn open_with_store(
        data_dir: &Path,
        store: Arc<dyn object_store::ObjectStore>,
    ) -> Result<Storage> {
        Storage::open_with_blobs(data_dir, BlobStore::remote(store), 0)
    }

    fn open_with_blobs(data_dir: &Path, blobs: BlobStore, min_free_bytes: u64) -> Result<Storage> {
        blobs.prepare_local()?;
        std::fs::create_dir_all(data_dir).map_err(Error::io("create data directory", data_dir))?;
        let lock = lock_data_dir(data_dir)?;
        let spool_dir = data_dir.join("spool");
        // Anything left in the spool was never acknowledged: discard it.
        let _ = std::fs::remove_dir_all(&spool_dir);
        std::fs::create_dir_all(&spool_dir)
            .map_err(Error::io("create spool directory", &spool_dir))?;
        let index_path = data_dir.join(INDEX_FILE);
        let conn = index::open_writer(&index_path)?;
        let writer =
            index::writer::spawn(conn).map_err(Error::io("start index writer", &index_path))?;
        Ok(Storage {
            inner: Arc::new(Inner {
                blobs,
                spool_dir,
                writer: std::sync::Mutex::new(writer),
                readers: index::ReaderPool::new(index_path, false),
                min_free_bytes,
                _lock: lock,
            }),
        })
    }

    /// Starts receiving an instance; `limit` bounds the dataset's size.
    /// Refused with [`Error::StorageFull`] while the filesystem of the
    /// spool and the index is down to its reserve.
    pub fn spool(
        &self,
        sop_class_uid: &str,
        sop_instance_uid: &str,
        transfer_syntax: &str,
        limit: u64,
    ) -> Result<Spool> {
        let reserve = self.inner.min_free_bytes;
        if reserve > 0 {
            let dir = &self.inner.spool_dir;
            let fs = rustix::fs::statvfs(dir)
                .map_err(|e| Error::io("check free space", dir)(e.into()))?;
            let free = fs.f_bavail.saturating_mul(fs.f_frsize);
            if free < reserve {
                return Err(Error::StorageFull { free, reserve });
            }
        }
        let header = part10::file_header(sop_class_uid, sop_instance_uid, transfer_syntax);
        Spool::create(&self.inner.spool_dir, &header, transfer_syntax, limit)
    }

    /// Closes a completely received spool. Durability comes later, in
    /// [`Storage::commit`]'s group commit.
    pub fn finish_spool(&self, spool: Spool) -> Result<Spooled> {
        spool.finish()
    }

    /// Makes a received, validated instance durable and indexes it.
    pub async fn commit(
        &self,
        mut spooled: Spooled,
        attrs: InstanceAttrs,
        source: &Source,
    ) -> Result<StoreOutcome> {
        let started = std::time::Instant::now();
        let placed = self.inner.blobs.place(&mut spooled).await?;
        let placed_at = started.elapsed();
        let instance = NewInstance {
            attrs,
            clinic_id: source.clinic_id.clone(),
            calling_ae: source.calling_ae.clone(),
            blob_key: placed.key,
            sha256: spooled.sha256_hex(),
            size: spooled.size,
            dataset_offset: spooled.dataset_offset,
            transfer_syntax: spooled.transfer_syntax.clone(),
            received_at: utc_timestamp(SystemTime::now()),
        };
        let (reply, rx) = oneshot::channel();
        self.send(Job::Insert {
            instance: Box::new(instance),
            to_sync: placed.to_sync,
            reply,
        })?;
        let outcome = rx.await.map_err(|_| Error::ShuttingDown)?;
        tracing::debug!(
            place_us = placed_at.as_micros() as u64,
            total_us = started.elapsed().as_micros() as u64,
            "committed"
        );
        outcome
    }

    /// Records the clinic registry in the index.
    pub async fn sync_clinics(&self, clinics: Vec<(String, String)>) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.send(Job::Clinics { clinics, reply })?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Appends to the audit trail (committed with the next index batch).
    pub async fn audit(&self, entry: AuditEntry) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.send(Job::Audit { entry, reply })?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    fn send(&self, job: Job) -> Result<()> {
        self.inner
            .writer
            .lock()
            .expect("writer sender lock")
            .send(job)
            .map_err(|_| Error::ShuttingDown)
    }

    /// A read-only connection to the index, from the pool when one is free.
    pub fn reader(&self) -> Result<index::PooledReader> {
        self.inner.readers.get()
    }

    pub fn blobs(&self) -> &BlobStore {
        &self.inner.blobs
    }

    /// Checks that every indexed version's blob exists with its size and
    /// SHA-256; returns a description of each problem found.
    pub async fn verify(&self) -> Result<Vec<String>> {
        let rows = self.reader()?.all_blobs()?;
        let mut problems = Vec::new();
        for (key, sha, size) in rows {
            // Streamed: an instance may be larger than the memory to spare.
            match self.inner.blobs.sha256(&key).await {
                Ok((_, len)) if len != size => {
                    problems.push(format!("{key}: size {len} != indexed {size}"))
                }
                Ok((actual, _)) if actual != sha => {
                    problems.push(format!("{key}: sha256 {actual} != indexed {sha}"))
                }
                Ok(_) => {}
                Err(e) => problems.push(format!("{key}: {e}")),
            }
        }
        Ok(problems)
    }
}

/// Whether an instance can be confirmed as safely stored (storage commitment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitCheck {
    /// Indexed, its blob present and matching the indexed SHA-256.
    Committed,
    /// Not indexed (or not visible to the asking clinic).
    NoSuchInstance,
    /// Indexed under another SOP class.
    ClassMismatch { stored: String },
    /// Indexed, but the blob is missing or does not match its SHA-256.
    Damaged(String),
}

impl Storage {
    /// Re-verifies instances for storage commitment: each must be indexed
    /// (for `clinic`, when given) under its SOP class, with its blob present
    /// and its SHA-256 recomputed equal. `refs` are (SOP class, SOP instance).
    /// Blobs are hashed a few at a time.
    pub async fn check_committed(
        &self,
        clinic: Option<&str>,
        refs: &[(String, String)],
    ) -> Result<Vec<CommitCheck>> {
        use futures::StreamExt;
        const CONCURRENT_HASHES: usize = 4;
        let records = {
            let (storage, uids, asking) = (
                self.clone(),
                refs.iter().map(|(_, i)| i.clone()).collect::<Vec<_>>(),
                clinic.map(str::to_owned),
            );
            // A clinic has committed the bytes it sent: the current version
            // when it sent those (whoever sent them first), else its own
            // version kept beside another clinic's current one.
            tokio::task::spawn_blocking(move || -> Result<Vec<_>> {
                let reader = storage.reader()?;
                // One read transaction, not one per instance.
                let _snapshot = reader.connection().unchecked_transaction()?;
                uids.iter()
                    .map(|uid| match &asking {
                        Some(clinic) => reader.instance_sent_by(uid, clinic),
                        None => reader.instance(uid),
                    })
                    .collect()
            })
            .await
            .map_err(|e| Error::io("look up instances", "")(std::io::Error::other(e)))??
        };
        let checks: Vec<_> = refs
            .iter()
            .zip(records)
            .map(|((class, _), record)| {
                let (storage, class) = (self.clone(), class.clone());
                async move { storage.check_one(&class, record).await }
            })
            .collect();
        futures::stream::iter(checks)
            .buffered(CONCURRENT_HASHES)
            .collect::<Vec<Result<CommitCheck>>>()
            .await
            .into_iter()
            .collect()
    }

    /// `record` is None when the instance is not indexed, or the asking
    /// clinic did not send its current bytes.
    async fn check_one(&self, class: &str, record: Option<InstanceRecord>) -> Result<CommitCheck> {
        let Some(record) = record else {
            return Ok(CommitCheck::NoSuchInstance);
        };
        if record.sop_class_uid != class {
            return Ok(CommitCheck::ClassMismatch {
                stored: record.sop_class_uid,
            });
        }
        match self.inner.blobs.sha256(&record.blob_key).await {
            Ok((sha, size)) if sha == record.sha256 && size == record.size => {
                Ok(CommitCheck::Committed)
            }
            Ok(_) => Ok(CommitCheck::Damaged(
                "stored bytes do not match their SHA-256".into(),
            )),
            Err(Error::ObjectStore(object_store::Error::NotFound { .. })) => {
                Ok(CommitCheck::Damaged("stored object is missing".into()))
            }
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(CommitCheck::Damaged("stored object is missing".into()))
            }
            Err(e) => Err(e),
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` in UTC.
pub fn utc_timestamp(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_772_323_200);
        assert_eq!(utc_timestamp(t), "2026-03-01T00:00:00.000000Z");
    }

    #[test]
    fn a_second_writer_on_a_data_dir_is_refused_and_leaves_the_spool_alone() {
        let dir = tempfile::tempdir().unwrap();
        let first = Storage::open(dir.path()).unwrap();
        let mut arriving = first
            .spool(
                "1.2.840.10008.5.1.4.1.1.7",
                "2.25.1",
                "1.2.840.10008.1.2.1",
                1 << 20,
            )
            .unwrap();
        arriving.write(b"still arriving").unwrap();
        let spooled = || std::fs::read_dir(dir.path().join("spool")).unwrap().count();
        assert_eq!(spooled(), 1);

        let second = Storage::open(dir.path());
        assert!(matches!(second, Err(Error::InUse(_))), "{second:?}");
        assert_eq!(spooled(), 1, "the first writer's spool is untouched");

        // Closed, the directory is free again (and a new writer clears the spool).
        drop(arriving);
        drop(first);
        std::fs::write(dir.path().join("spool/left-by-a-crash"), b"x").unwrap();
        let _again = Storage::open(dir.path()).unwrap();
        assert_eq!(spooled(), 0);
    }
}
