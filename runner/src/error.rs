//! The runner's error type and its single conversion to a gRPC status.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// A stored blob no longer matches its digest (it has been quarantined).
    #[error("{0}")]
    Corrupt(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    /// A configured limit of the daemon is reached (e.g. the queue is full).
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    DigestMismatch(String),
    #[error("sandbox: {0}")]
    Sandbox(#[from] sandbox::SandboxError),
    #[error("provenance: {0}")]
    Provenance(#[from] provenance::ProvenanceError),
    #[error("database: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl RunnerError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        RunnerError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| RunnerError::Io { context, source }
    }

    pub fn io_path(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        Self::io(format!("{what} {}", path.display()))
    }
}

pub type Result<T, E = RunnerError> = std::result::Result<T, E>;

impl RunnerError {
    /// Failures of Kiln or the host, as opposed to answers about the request.
    fn is_internal(&self) -> bool {
        matches!(
            self,
            RunnerError::Sandbox(_)
                | RunnerError::Provenance(_)
                | RunnerError::Database(_)
                | RunnerError::Io { .. }
                | RunnerError::Internal(_)
        )
    }

    /// The disk (or a quota) is full: the client may try again later.
    fn out_of_space(&self) -> bool {
        match self {
            RunnerError::Io { source, .. } => {
                matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
            }
            RunnerError::Database(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DiskFull
            }
            _ => false,
        }
    }

    /// The message a client may see. An internal error's text can hold the daemon's host
    /// paths and state: it goes to the daemon's log under a reference, the client gets the
    /// reference.
    pub fn client_message(&self) -> String {
        if self.out_of_space() {
            tracing::error!(error = %self, "out of disk space");
            return OUT_OF_SPACE.into();
        }
        if !self.is_internal() {
            return self.to_string();
        }
        let reference = uuid::Uuid::new_v4().simple().to_string();
        let reference = &reference[..12];
        tracing::error!(error = %self, reference, "internal error");
        format!(
            "internal error in Kiln (the daemon's log has the details under reference {reference})"
        )
    }
}

const OUT_OF_SPACE: &str = "the runner's state disk is full; try again later";

impl From<RunnerError> for tonic::Status {
    fn from(err: RunnerError) -> Self {
        let message = err.client_message();
        if err.out_of_space() {
            return tonic::Status::resource_exhausted(message);
        }
        match err {
            RunnerError::InvalidArgument { .. } | RunnerError::DigestMismatch(_) => {
                tonic::Status::invalid_argument(message)
            }
            RunnerError::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            RunnerError::PermissionDenied(_) => tonic::Status::permission_denied(message),
            RunnerError::AlreadyExists(_) => tonic::Status::already_exists(message),
            RunnerError::Corrupt(_) => tonic::Status::data_loss(message),
            RunnerError::NotFound(_) => tonic::Status::not_found(message),
            RunnerError::Unavailable(_) => tonic::Status::unavailable(message),
            RunnerError::ResourceExhausted(_) => tonic::Status::resource_exhausted(message),
            RunnerError::Sandbox(_)
            | RunnerError::Provenance(_)
            | RunnerError::Database(_)
            | RunnerError::Io { .. }
            | RunnerError::Internal(_) => tonic::Status::internal(message),
        }
    }
}
