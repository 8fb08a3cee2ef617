//! Blobs: every instance as one object, keyed by the SHA-256 of its bytes.
//!
//! With a local data directory the spooled file is linked into place and
//! the file and the directories it touched are returned as [`SyncItem`]s: the
//! index writer fsyncs a whole batch's items concurrently, so the kernel
//! folds them into one journal commit (group commit), before it commits the
//! batch's index rows. Other `object_store` backends (in-memory in tests,
//! S3-compatible) get a `put`, which is durable when it returns.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::error::{Error, Result};
use crate::spool::{Spooled, hex};

/// The one function from content to key: `instances/ab/<sha256>.dcm`.
/// One level of 256 directories keeps directory fsyncs few; ext4's hashed
/// directories hold millions of entries each.
pub fn key_for(sha256: &[u8; 32]) -> String {
    let h = hex(sha256);
    format!("instances/{}/{}.dcm", &h[0..2], h)
}

/// Something to fsync before the index may reference a blob.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum SyncItem {
    /// A blob file: its data and size.
    File(PathBuf),
    /// A directory whose entries changed.
    Dir(PathBuf),
}

#[derive(Debug, Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    /// Set when `store` is a `LocalFileSystem` rooted here.
    local_root: Option<PathBuf>,
}

/// Where a placed blob is and what must be fsynced to make it durable.
#[derive(Debug)]
pub(crate) struct PlacedBlob {
    pub(crate) key: String,
    pub(crate) to_sync: Vec<SyncItem>,
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

    /// Creates the 256 blob directories and makes their entries durable (the
    /// chain up to the data directory), so that a blob linked into one needs
    /// fsyncs of itself and of that directory only. Once per writer start:
    /// three fsyncs, instead of one more per instance.
    pub(crate) fn prepare_local(&self) -> Result<()> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let instances = root.join("instances");
        for i in 0..=255u8 {
            let dir = instances.join(hex(&[i]));
            std::fs::create_dir_all(&dir).map_err(Error::io("create blob directory", &dir))?;
        }
        for dir in dirs_to_sync(root) {
            sync_one(&SyncItem::Dir(dir))?;
        }
        Ok(())
    }

    /// The blob store a `[storage]` section names: its S3-compatible bucket,
    /// else `data_dir/blobs`. For services that only read blobs (the
    /// viewer-api) as well as for [`crate::Storage::open_configured`].
    pub fn open(config: &consortium_config::StorageConfig) -> Result<BlobStore> {
        match &config.s3 {
            Some(s3) => BlobStore::s3(s3),
            None => BlobStore::local(&config.data_dir.join("blobs")),
        }
    }

    /// An S3-compatible bucket. Requests that fail for a transient reason
    /// are retried for at most 20 s, so that a store which is down fails a
    /// C-STORE promptly instead of holding the sender; one that hangs takes
    /// up to a minute per request (a 16 MiB part on a slow link needs time).
    #[cfg(feature = "s3")]
    pub fn s3(config: &consortium_config::S3Config) -> Result<BlobStore> {
        use object_store::aws::AmazonS3Builder;
        use object_store::{ClientOptions, RetryConfig};
        use std::time::Duration;
        // reqwest's rustls takes the process's provider: ring, as tonic's.
        // Installing fails only when one is already installed, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(config.secret_access_key.expose())
            .with_virtual_hosted_style_request(!config.path_style)
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(config.allow_http)
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(60)),
            )
            .with_retry(RetryConfig {
                max_retries: 4,
                retry_timeout: Duration::from_secs(20),
                ..RetryConfig::default()
            });
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        Ok(BlobStore::remote(Arc::new(builder.build()?)))
    }

    #[cfg(not(feature = "s3"))]
    pub fn s3(_: &consortium_config::S3Config) -> Result<BlobStore> {
        Err(object_store::Error::NotSupported {
            source: "this program was built without storage's `s3` feature".into(),
        }
        .into())
    }

    /// Checks that blobs can be written (a remote store: its bucket exists
    /// and the credentials may write), so that a misconfigured store stops
    /// the gateway at start instead of failing every C-STORE.
    pub async fn check_writable(&self) -> Result<()> {
        if self.local_root.is_some() {
            return Ok(());
        }
        let probe = ObjectPath::from("probe/gateway-start");
        self.store
            .put(
                &probe,
                PutPayload::from_static(b"written by pacs-gateway at start"),
            )
            .await?;
        Ok(())
    }

    /// Fails when a remote store cannot be read (no such bucket, wrong
    /// credentials, no server): for services that only read blobs (the
    /// viewer-api), at start rather than at the first radiologist's request.
    pub async fn check_readable(&self) -> Result<()> {
        if self.local_root.is_some() {
            return Ok(());
        }
        self.store
            .list_with_delimiter(Some(&ObjectPath::from("probe")))
            .await?;
        Ok(())
    }

    pub(crate) fn remote(store: Arc<dyn ObjectStore>) -> BlobStore {
        BlobStore {
            store,
            local_root: None,
        }
    }

    /// Moves or uploads a spooled instance to its content-addressed key.
    pub(crate) async fn place(&self, spooled: &mut Spooled) -> Result<PlacedBlob> {
        let key = key_for(&spooled.sha256);
        match &self.local_root {
            Some(root) => {
                // A link and a stat or two: short enough to run inline.
                let target = root.join(&key);
                let to_sync = match place_local(&spooled.path, &target, spooled.size)? {
                    Placed::Linked(items) => items,
                    Placed::Exists(items) => {
                        // The same key means the same bytes only if the file
                        // there holds them: a leftover whose fsync failed, or
                        // of a crash on a filesystem that keeps a size with
                        // garbage under it, must not be trusted. Re-hashing
                        // costs an identical re-send one read.
                        let (source, expected) = (spooled.path.clone(), hex(&spooled.sha256));
                        tokio::task::spawn_blocking(move || {
                            keep_or_replace(&source, &target, &expected)
                        })
                        .await
                        .map_err(|e| Error::io("check blob", "")(std::io::Error::other(e)))??;
                        items
                    }
                };
                spooled.disarm();
                Ok(PlacedBlob { key, to_sync })
            }
            None => {
                self.upload(&spooled.path, &key).await?;
                Ok(PlacedBlob {
                    key,
                    to_sync: Vec::new(),
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
        // Any failure abandons the upload, so no parts are left behind.
        let sent: Result<()> = async {
            loop {
                use tokio::io::AsyncReadExt;
                let mut chunk = Vec::with_capacity(PART);
                let n = (&mut file)
                    .take(PART as u64)
                    .read_to_end(&mut chunk)
                    .await
                    .map_err(Error::io("read spool file", &path))?;
                if n == 0 {
                    return Ok(());
                }
                upload.put_part(PutPayload::from(chunk)).await?;
            }
        }
        .await;
        let done = match sent {
            Ok(()) => upload.complete().await.map(drop).map_err(Error::from),
            Err(e) => Err(e),
        };
        if done.is_err() {
            let _ = upload.abort().await;
        }
        done
    }

    /// Reads a whole blob.
    pub async fn get(&self, key: &str) -> Result<bytes::Bytes> {
        if let Some(path) = self.local_path(key) {
            // Local disk: one read on a blocking thread (object_store's
            // local GET opens, stats and reads through more hand-offs).
            return tokio::task::spawn_blocking(move || read_local(&path))
                .await
                .map_err(|e| Error::io("read blob", "")(std::io::Error::other(e)))?;
        }
        Ok(self
            .store
            .get(&ObjectPath::from(key))
            .await?
            .bytes()
            .await?)
    }

    /// The first `len` bytes of a blob (`len` at most its size): from a
    /// bucket, one ranged GET instead of the whole object.
    pub async fn get_prefix(&self, key: &str, len: u64) -> Result<bytes::Bytes> {
        if let Some(path) = self.local_path(key) {
            return tokio::task::spawn_blocking(move || -> Result<bytes::Bytes> {
                use std::io::Read;
                let mut head = Vec::new();
                std::fs::File::open(&path)
                    .and_then(|f| f.take(len).read_to_end(&mut head))
                    .map_err(Error::io("read blob", &path))?;
                Ok(head.into())
            })
            .await
            .map_err(|e| Error::io("read blob", "")(std::io::Error::other(e)))?;
        }
        Ok(self.store.get_range(&ObjectPath::from(key), 0..len).await?)
    }

    /// Starts reading a blob now, to be awaited when it is needed (a
    /// retrieve reads the next instance while it sends this one). A local
    /// read starts on a blocking thread at once, not when a spawned task
    /// is first polled.
    pub fn prefetch(&self, key: &str) -> tokio::task::JoinHandle<Result<bytes::Bytes>> {
        match self.local_path(key) {
            Some(path) => tokio::task::spawn_blocking(move || read_local(&path)),
            None => {
                let (blobs, key) = (self.clone(), key.to_owned());
                tokio::spawn(async move { blobs.get(&key).await })
            }
        }
    }

    /// A blob as a stream of chunks (bounded memory whatever its size).
    pub async fn get_stream(
        &self,
        key: &str,
    ) -> Result<futures::stream::BoxStream<'static, Result<bytes::Bytes>>> {
        use futures::StreamExt;
        let stream = self.store.get(&ObjectPath::from(key)).await?.into_stream();
        Ok(stream.map(|r| r.map_err(Error::from)).boxed())
    }

    /// SHA-256 (hex) and size of a blob, streamed (bounded memory).
    pub async fn sha256(&self, key: &str) -> Result<(String, u64)> {
        use futures::StreamExt;
        use sha2::Digest;
        if let Some(path) = self.local_path(key) {
            // Local disk: one thread reading large chunks beats the generic
            // stream's many small hand-offs; a background one, so that
            // re-verifying never holds up acknowledging a C-STORE.
            return crate::background::run(move || {
                file_sha256(&path).map_err(Error::io("hash blob", &path))
            })
            .await
            .map_err(|e| Error::io("hash blob", "")(std::io::Error::other(e)))?;
        }
        let mut stream = self.store.get(&ObjectPath::from(key)).await?.into_stream();
        let mut hasher = sha2::Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            size += chunk.len() as u64;
            hasher.update(&chunk);
        }
        Ok((hex(&hasher.finalize()), size))
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

fn read_local(path: &Path) -> Result<bytes::Bytes> {
    std::fs::read(path)
        .map(bytes::Bytes::from)
        .map_err(Error::io("read blob", path))
}

/// The directories whose entries [`BlobStore::prepare_local`] makes
/// durable: `root/instances`, `root`, the data directory above it and the
/// directory holding that, so a data directory created at the first start
/// is durable too. (Above a relative path of one component is "": the
/// working directory, ".".)
fn dirs_to_sync(root: &Path) -> Vec<PathBuf> {
    let above = |p: &Path| -> Option<PathBuf> {
        p.parent().map(|a| {
            if a.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                a.to_owned()
            }
        })
    };
    let data_dir = above(root);
    let holder = root.parent().and_then(above);
    [
        Some(root.join("instances")),
        Some(root.to_owned()),
        data_dir,
        holder,
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// What [`place_local`] did; either way, what must be fsynced before the
/// blob may be indexed.
enum Placed {
    /// `source` is now the blob (linked, or replacing a short leftover).
    Linked(Vec<SyncItem>),
    /// A file of the right size is already there: see [`keep_or_replace`].
    Exists(Vec<SyncItem>),
}

/// Links `source` to `target` (in a directory [`BlobStore::prepare_local`]
/// made durable).
///
/// Not yet synced, a blob is only referenced by the index after its batch's
/// fsyncs, so a crash leaves at most an unreferenced (possibly short) file.
/// A short leftover from a crash is replaced rather than trusted. When the
/// key already exists with the right size, the caller checks its content.
fn place_local(source: &Path, target: &Path, size: u64) -> Result<Placed> {
    let parent = target.parent().expect("blob keys have a directory");
    // The file and its new entry. Every fsync is also a flush of the disk's
    // cache: the directory's own entry was made durable at open.
    let items = vec![
        SyncItem::File(target.to_owned()),
        SyncItem::Dir(parent.to_owned()),
    ];
    if !parent.is_dir() {
        // Removed behind our back since open: recreate it durably (rare).
        create_durable_dir(parent)?;
    }
    // A hard link fails atomically when the key exists, so two associations
    // storing the same bytes at once cannot replace each other's file.
    match std::fs::hard_link(source, target) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let existing = std::fs::metadata(target).map_err(Error::io("stat blob", target))?;
            if existing.len() != size {
                // A short leftover of a crash, never indexed: replace it.
                std::fs::rename(source, target).map_err(Error::io("replace blob", target))?;
                return Ok(Placed::Linked(items));
            }
            return Ok(Placed::Exists(items));
        }
        Err(e) => return Err(Error::io("link blob into place", target)(e)),
    }
    std::fs::remove_file(source).map_err(Error::io("remove spool file", source))?;
    Ok(Placed::Linked(items))
}

/// `target` exists with the size of `source`: keeps it when its SHA-256 is
/// `expected` (the new copy goes), else puts `source` in its place.
fn keep_or_replace(source: &Path, target: &Path, expected: &str) -> Result<()> {
    let intact = matches!(file_sha256(target), Ok((actual, _)) if actual == expected);
    if intact {
        std::fs::remove_file(source).map_err(Error::io("remove spool file", source))?;
    } else {
        tracing::warn!(path = %target.display(), "replaced a blob whose bytes did not match its key");
        std::fs::rename(source, target).map_err(Error::io("replace blob", target))?;
    }
    Ok(())
}

/// SHA-256 (hex) and size of a local file, read in chunks (bounded
/// memory whatever its size).
pub fn file_sha256(path: &Path) -> std::io::Result<(String, u64)> {
    use sha2::Digest;
    use std::io::Read;
    // One buffer per thread, not a fresh one per file: a commitment request
    // hashes hundreds of blobs on the same few threads.
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 256 * 1024]);
    }
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut size = 0u64;
    BUF.with_borrow_mut(|buf| {
        loop {
            let n = file.read(buf)?;
            if n == 0 {
                return Ok((hex(&hasher.finalize()), size));
            }
            size += n as u64;
            hasher.update(&buf[..n]);
        }
    })
}

/// Creates `dir` and syncs the two directories above it.
fn create_durable_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(Error::io("create blob directory", dir))?;
    let mut entry_of = dir;
    for _ in 0..2 {
        let Some(parent) = entry_of.parent() else {
            break;
        };
        sync_one(&SyncItem::Dir(parent.to_owned()))?;
        entry_of = parent;
    }
    Ok(())
}

/// Which file a path named when it was synced (device, inode): a later
/// check that the path still names it tells a synced blob from one put in
/// its place since (after a failed fsync removed the first).
pub(crate) type FileId = (u64, u64);

/// The synced files, by path.
pub(crate) type SyncedFiles = std::collections::HashMap<PathBuf, FileId>;

/// Fsyncs `item`; for a file, also which file it was.
fn sync_one(item: &SyncItem) -> Result<Option<(PathBuf, FileId)>> {
    use std::os::unix::fs::MetadataExt;
    match item {
        SyncItem::File(path) => std::fs::File::open(path)
            .and_then(|f| {
                let meta = f.metadata()?;
                f.sync_data()?;
                Ok(Some((path.clone(), (meta.dev(), meta.ino()))))
            })
            .map_err(Error::io("fsync blob", path)),
        SyncItem::Dir(path) => std::fs::File::open(path)
            .and_then(|d| d.sync_all())
            .map(|()| None)
            .map_err(Error::io("fsync directory", path)),
    }
}

/// The file a path names now, if any.
pub(crate) fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

type SyncJob = (
    SyncItem,
    std::sync::mpsc::Sender<Result<Option<(PathBuf, FileId)>>>,
);

/// Threads that fsync a batch's items concurrently, so the filesystem can
/// fold them into as few journal commits as possible. Kept alive for the
/// writer's lifetime: spawning threads per batch costs more than the fsyncs.
#[derive(Debug)]
pub(crate) struct SyncPool {
    jobs: std::sync::mpsc::Sender<SyncJob>,
}

impl SyncPool {
    pub(crate) fn new(threads: usize) -> std::io::Result<SyncPool> {
        let (jobs, rx) = std::sync::mpsc::channel::<SyncJob>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("blob-sync-{i}"))
                .spawn(move || {
                    loop {
                        let job = rx.lock().map(|r| r.recv());
                        let Ok(Ok((item, reply))) = job else { return };
                        let _ = reply.send(sync_one(&item));
                    }
                })?;
        }
        Ok(SyncPool { jobs })
    }

    /// Fsyncs every item (the calling thread takes one share of the work);
    /// returns which file each synced path named.
    pub(crate) fn sync_all(&self, items: &[SyncItem]) -> Result<SyncedFiles> {
        let mut files = SyncedFiles::new();
        let Some((first, rest)) = items.split_first() else {
            return Ok(files);
        };
        let (reply, results) = std::sync::mpsc::channel();
        let mut pending = 0;
        let mut outcome = Ok(());
        let mut take = |res: Result<Option<(PathBuf, FileId)>>| match res {
            Ok(Some((path, id))) => {
                files.insert(path, id);
            }
            Ok(None) => {}
            Err(e) => {
                if outcome.is_ok() {
                    outcome = Err(e);
                }
            }
        };
        for item in rest {
            if self.jobs.send((item.clone(), reply.clone())).is_ok() {
                pending += 1;
            } else {
                take(sync_one(item));
            }
        }
        take(sync_one(first));
        for _ in 0..pending {
            take(results.recv().unwrap_or(Err(Error::ShuttingDown)));
        }
        outcome.map(|()| files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Spool;

    fn spooled(dir: &Path, body: &[u8]) -> Spooled {
        let mut spool = Spool::create(dir, b"DICM", "1.2.840.10008.1.2.1", 1 << 20).unwrap();
        spool.write(body).unwrap();
        spool.finish().unwrap()
    }

    #[tokio::test]
    async fn a_placed_blob_syncs_its_file_and_its_directory_only() {
        let tmp = tempfile::tempdir().unwrap();
        let spool_dir = tmp.path().join("spool");
        std::fs::create_dir_all(&spool_dir).unwrap();
        let blobs = BlobStore::local(&tmp.path().join("blobs")).unwrap();
        blobs.prepare_local().unwrap();
        assert_eq!(
            std::fs::read_dir(tmp.path().join("blobs/instances"))
                .unwrap()
                .count(),
            256
        );

        let mut first = spooled(&spool_dir, b"one instance");
        let placed = blobs.place(&mut first).await.unwrap();
        let path = blobs.local_path(&placed.key).unwrap();
        let dir = path.parent().unwrap().to_owned();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            [b"DICM".as_slice(), b"one instance"].concat()
        );
        // The directory chain was synced at open; what is left for the
        // index writer is the file and its entry.
        assert_eq!(
            placed.to_sync,
            vec![SyncItem::File(path.clone()), SyncItem::Dir(dir.clone())]
        );
        assert!(std::fs::read_dir(&spool_dir).unwrap().next().is_none());

        // The same bytes again: no second copy, the same items to sync.
        let mut again = spooled(&spool_dir, b"one instance");
        let placed_again = blobs.place(&mut again).await.unwrap();
        assert_eq!(placed_again.key, placed.key);
        assert_eq!(placed_again.to_sync, placed.to_sync);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn the_synced_directories_reach_above_a_relative_data_dir() {
        let paths = |v: &[&str]| v.iter().map(PathBuf::from).collect::<Vec<_>>();
        assert_eq!(
            dirs_to_sync(Path::new("data/blobs")),
            paths(&["data/blobs/instances", "data/blobs", "data", "."])
        );
        assert_eq!(
            dirs_to_sync(Path::new("/srv/pacs/blobs")),
            paths(&[
                "/srv/pacs/blobs/instances",
                "/srv/pacs/blobs",
                "/srv/pacs",
                "/srv"
            ])
        );
    }

    #[tokio::test]
    async fn a_leftover_of_the_right_size_but_other_bytes_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let spool_dir = tmp.path().join("spool");
        std::fs::create_dir_all(&spool_dir).unwrap();
        let blobs = BlobStore::local(&tmp.path().join("blobs")).unwrap();
        blobs.prepare_local().unwrap();
        let expected = [b"DICM".as_slice(), b"one instance"].concat();
        // What a failed fsync or a crash can leave: the size, not the bytes.
        let mut first = spooled(&spool_dir, b"one instance");
        let path = blobs.local_path(&key_for(&first.sha256)).unwrap();
        std::fs::write(&path, vec![0u8; expected.len()]).unwrap();
        blobs.place(&mut first).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), expected);
        assert!(std::fs::read_dir(&spool_dir).unwrap().next().is_none());
    }
}
