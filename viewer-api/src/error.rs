//! The crate's one error type, mapped once to a gRPC status.
//!
//! Messages are written for the caller: they name what was wrong, never a
//! file path or a patient's data. Internal details go to the log only.

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    PermissionDenied(String),
    /// Also used for data outside the caller's clinic, so existence does not leak.
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    InvalidArgument(String),
    /// A claimed study, a study still arriving, a frame that cannot be rendered.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Too many failed logins, or too many streams open for one user.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unimplemented(String),
    /// The client did not take a stream's data in time.
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> Self {
        ApiError::Internal(format!("index: {e}"))
    }
}

impl From<storage::Error> for ApiError {
    fn from(e: storage::Error) -> Self {
        ApiError::Internal(format!("storage: {e}"))
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        ApiError::Internal(format!("worker task: {e}"))
    }
}

impl ApiError {
    /// A short label for the audit log's outcome column.
    pub fn outcome(&self) -> String {
        match self {
            ApiError::Unauthenticated(m) => format!("denied: {m}"),
            ApiError::PermissionDenied(m) => format!("denied: {m}"),
            ApiError::NotFound(what) => format!("not found: {what}"),
            ApiError::ResourceExhausted(m) => format!("refused: {m}"),
            ApiError::Internal(_) => "error: internal".into(),
            other => format!("failed: {other}"),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::Unauthenticated(m) => Status::unauthenticated(m),
            ApiError::PermissionDenied(m) => Status::permission_denied(m),
            e @ ApiError::NotFound(_) => Status::not_found(e.to_string()),
            ApiError::InvalidArgument(m) => Status::invalid_argument(m),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::ResourceExhausted(m) => Status::resource_exhausted(m),
            ApiError::Unimplemented(m) => Status::unimplemented(m),
            ApiError::DeadlineExceeded(m) => Status::deadline_exceeded(m),
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error; see the server log")
            }
        }
    }
}
