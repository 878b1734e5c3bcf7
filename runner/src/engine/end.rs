//! How a job stops early, and the engine's one way onto a blocking thread.

use crate::error::{Result, RunnerError};

/// Why a job stopped early.
pub(super) enum JobEnd {
    StepFailed(String),
    Cancelled,
    Error(RunnerError),
}

impl From<RunnerError> for JobEnd {
    fn from(err: RunnerError) -> Self {
        JobEnd::Error(err)
    }
}

/// Runs database, content-store (fsync) and signing work on a blocking thread: the
/// daemon's one way off the async runtime's workers (the API's calls use it too).
pub(crate) async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RunnerError::Internal(format!("worker: {e}")))?
}

/// [`off_runtime`], for a step or job that ends early on an error.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T, JobEnd> {
    off_runtime(f).await.map_err(JobEnd::Error)
}
