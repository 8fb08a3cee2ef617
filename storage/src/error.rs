//! The storage error type: one enum, matched on meaning by callers.

use std::path::PathBuf;

use crate::attrs::DatasetError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The received dataset cannot be stored as it is: the sender must be told why.
    #[error("invalid dataset: {0}")]
    Dataset(#[from] DatasetError),
    /// The instance is larger than the configured limit.
    #[error("instance exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("index: {0}")]
    Index(#[from] rusqlite::Error),
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error("index schema version {found} is newer than this build ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },
    /// The data directory's filesystem is down to its reserve.
    #[error("storage full: {free} bytes free, below the reserve of {reserve} bytes")]
    StorageFull { free: u64, reserve: u64 },
    #[error("storage is shutting down")]
    ShuttingDown,
    /// Another process (a second gateway) holds the data directory.
    #[error("{0} is in use by another process (is a pacs-gateway already running on it?)")]
    InUse(PathBuf),
}

impl Error {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }

    /// True when the failure is ours (disk, index), not the sender's data.
    pub fn is_resource_failure(&self) -> bool {
        match self {
            Error::Dataset(DatasetError::Io(_)) => true,
            Error::Dataset(_) | Error::TooLarge { .. } => false,
            _ => true,
        }
    }
}
