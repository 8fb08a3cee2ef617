//! Blobs: every instance as one object, keyed by the SHA-256 of its bytes.
//!
//! With a local data directory the spooled file is moved into place
//! (`rename` after `fdatasync`), and the directories it touched are returned
//! so the index writer can fsync them once per batch (group commit). Other
//! `object_store` backends (in-memory in tests, S3-compatible) get a `put`,
//! which is durable when it returns.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::error::{Error, Result};
use crate::spool::{Spooled, hex};

/// The one function from content to key: `instances/ab/cd/<sha256>.dcm`.
pub fn key_for(sha256: &[u8; 32]) -> String {
    let h = hex(sha256);
    format!("instances/{}/{}/{}.dcm", &h[0..2], &h[2..4], h)
}

#[derive(Debug, Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    /// Set when `store` is a `LocalFileSystem` rooted here.
    local_root: Option<PathBuf>,
}

/// Where a committed blob is and what must be fsynced to make its name durable.
#[derive(Debug)]
pub(crate) struct PlacedBlob {
    pub(crate) key: String,
    pub(crate) dirs_to_sync: Vec<PathBuf>,
}

impl BlobStore {
    pub(crate) fn local(root: &Path) -> Result<BlobStore> {
        std::fs::create_dir_all(root).map_err(Error::io("create blob directory", root))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(root)?.with_fsync(true);
        Ok(BlobStore {
            store: Arc::new(store),
            local_root: Some(root.to_owned()),
        })
    }

    pub(crate) fn remote(store: Arc<dyn ObjectStore>) -> BlobStore {
        BlobStore {
            store,
            local_root: None,
        }
    }

    /// True when spooled files must be fsynced before `place` (local renames).
    pub(crate) fn needs_spool_sync(&self) -> bool {
        self.local_root.is_some()
    }

    /// Moves or uploads a spooled instance to its content-addressed key.
    pub(crate) async fn place(&self, spooled: &mut Spooled) -> Result<PlacedBlob> {
        let key = key_for(&spooled.sha256);
        match &self.local_root {
            Some(root) => {
                let target = root.join(&key);
                let source = spooled.path.clone();
                let size = spooled.size;
                let dirs = tokio::task::spawn_blocking(move || place_local(&source, &target, size))
                    .await
                    .map_err(|e| Error::io("place blob", "")(std::io::Error::other(e)))??;
                spooled.disarm();
                Ok(PlacedBlob {
                    key,
                    dirs_to_sync: dirs,
                })
            }
            None => {
                self.upload(&spooled.path, &key).await?;
                Ok(PlacedBlob {
                    key,
                    dirs_to_sync: Vec::new(),
                })
            }
        }
    }

    async fn upload(&self, source: &Path, key: &str) -> Result<()> {
        const PART: usize = 16 << 20;
        let location = ObjectPath::from(key);
        let path = source.to_owned();
        let len = std::fs::metadata(&path)
            .map_err(Error::io("stat spool file", &path))?
            .len();
        if len as usize <= PART {
            let bytes = tokio::fs::read(&path)
                .await
                .map_err(Error::io("read spool file", &path))?;
            self.store.put(&location, PutPayload::from(bytes)).await?;
            return Ok(());
        }
        let mut upload = self.store.put_multipart(&location).await?;
        let mut file = tokio::fs::File::open(&path)
            .await
            .map_err(Error::io("open spool file", &path))?;
        loop {
            use tokio::io::AsyncReadExt;
            let mut chunk = Vec::with_capacity(PART);
            let n = (&mut file)
                .take(PART as u64)
                .read_to_end(&mut chunk)
                .await
                .map_err(Error::io("read spool file", &path))?;
            if n == 0 {
                break;
            }
            if let Err(e) = upload.put_part(PutPayload::from(chunk)).await {
                let _ = upload.abort().await;
                return Err(e.into());
            }
        }
        upload.complete().await?;
        Ok(())
    }

    /// Reads a whole blob.
    pub async fn get(&self, key: &str) -> Result<bytes::Bytes> {
        Ok(self
            .store
            .get(&ObjectPath::from(key))
            .await?
            .bytes()
            .await?)
    }

    /// Size of a blob, or `None` when it does not exist.
    pub async fn size(&self, key: &str) -> Result<Option<u64>> {
        match self.store.head(&ObjectPath::from(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Filesystem path of a blob in local mode.
    pub fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.local_root.as_ref().map(|r| r.join(key))
    }
}

/// Renames `source` to `target`, creating directories; returns the
/// directories whose entries changed (to fsync before acknowledging).
fn place_local(source: &Path, target: &Path, size: u64) -> Result<Vec<PathBuf>> {
    let parent = target.parent().expect("blob keys have a directory");
    let mut dirs = vec![parent.to_owned()];
    if !parent.exists() {
        // New fan-out directories: their own names must become durable too.
        let mut p = parent;
        while let Some(up) = p.parent() {
            dirs.push(up.to_owned());
            if up.exists() {
                break;
            }
            p = up;
        }
        std::fs::create_dir_all(parent).map_err(Error::io("create blob directory", parent))?;
    }
    match std::fs::metadata(target) {
        // Same content hash and size: the bytes are already stored. Its
        // directory is still synced: the earlier copy may predate a crash
        // that left its name only in the page cache.
        Ok(meta) if meta.len() == size => {
            std::fs::remove_file(source).map_err(Error::io("remove spool file", source))?;
            return Ok(dirs);
        }
        _ => {}
    }
    std::fs::rename(source, target).map_err(Error::io("rename blob into place", target))?;
    Ok(dirs)
}

/// Fsyncs directories so renamed entries survive a crash.
pub(crate) fn sync_dirs(dirs: &[PathBuf]) -> Result<()> {
    for dir in dirs {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(Error::io("fsync directory", dir))?;
    }
    Ok(())
}
