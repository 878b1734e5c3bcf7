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

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T, JobEnd> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| JobEnd::Error(RunnerError::Internal(format!("worker: {e}"))))?
        .map_err(JobEnd::Error)
}
