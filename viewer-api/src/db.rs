//! The index as the viewer-api sees it: one write connection for its own
//! tables (users, sessions, worklist state, audit) and a pool of read-only
//! connections, used from blocking threads.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use storage::index::ReaderPool;

use crate::error::{ApiError, Result};

#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Mutex<Connection>,
    /// Without parameter-dependent plans here, statements need no
    /// re-preparing for each new value (stable plans).
    readers: Arc<ReaderPool>,
    data_dir: std::path::PathBuf,
}

impl Db {
    /// Opens the index under `data_dir`, creating and migrating it if needed.
    pub fn open(data_dir: &Path) -> Result<Db> {
        let writer = storage::index::open_service(data_dir)?;
        Ok(Db {
            inner: Arc::new(Inner {
                writer: Mutex::new(writer),
                readers: ReaderPool::new(data_dir.join(storage::INDEX_FILE), true),
                data_dir: data_dir.to_owned(),
            }),
        })
    }

    /// A read connection of its own, outside the pool: for a poller that
    /// asks it whether anything was committed since (`PRAGMA data_version`
    /// is per connection).
    pub fn own_reader(&self) -> Result<storage::index::IndexReader> {
        Ok(storage::index::IndexReader::open_in(&self.inner.data_dir)?)
    }

    /// Opens the index of `config`'s data directory and records the
    /// configuration's clinics in it (users belong to one).
    pub fn open_configured(config: &consortium_config::Config) -> Result<Db> {
        let db = Db::open(&config.storage.data_dir)?;
        db.save_clinics(
            config
                .clinics
                .iter()
                .map(|c| (c.id.as_str(), c.name.as_str())),
        )?;
        Ok(db)
    }

    /// Runs `f` on the write connection, on a blocking thread.
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.write_blocking(f)).await?
    }

    /// Runs `f` on the write connection on this (blocking) thread.
    pub fn write_blocking<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let mut conn = self
            .inner
            .writer
            .lock()
            .map_err(|_| ApiError::Internal("writer lock poisoned".into()))?;
        f(&mut conn)
    }

    /// Adds clinics `(id, name)` to the index, or renames them.
    pub fn save_clinics<'a>(
        &self,
        clinics: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<()> {
        self.write_blocking(|c| {
            let mut stmt = c.prepare_cached(
                "INSERT INTO clinics (id, name) VALUES (?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name",
            )?;
            for (id, name) in clinics {
                stmt.execute([id, name])?;
            }
            Ok(())
        })
    }

    /// Runs `f` on a read-only connection, on a blocking thread.
    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.read_blocking(f)).await?
    }

    /// Runs `f` on a read-only connection on this (blocking) thread.
    pub fn read_blocking<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        f(self.inner.readers.get()?.connection())
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
