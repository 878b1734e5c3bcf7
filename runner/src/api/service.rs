//! What the gRPC services share: the service state over the runner, job ids, the one
//! blocking boundary, and the job lookup that authorizes.

use std::sync::Arc;

use agent_proto::v1::Job;
use tonic::Status;

use crate::api::audit::audited_denial;
use crate::api::auth::Principal;
use crate::engine::end::off_runtime;
use crate::engine::jobs::Runner;
use crate::error::RunnerError;
use crate::store::audit::AuditLog;

/// Bytes of link content one ListLinks answer carries at most, below the 4 MiB that
/// gRPC clients decode by default; the rest is read by digest.
pub(crate) const LIST_LINKS_CONTENT_BUDGET: usize = 3 << 20;

#[derive(Clone)]
pub struct Service {
    pub runner: Arc<Runner>,
    /// Where the calls that act on jobs and read their results are recorded.
    pub audit: Arc<AuditLog>,
}

pub(crate) fn check_job_id(id: &str) -> Result<(), RunnerError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Err(RunnerError::invalid(
            "job_id",
            format!("{id:?} is not a job id"),
        ));
    }
    Ok(())
}

/// [`off_runtime`], answering the client with the one error conversion.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RunnerError> + Send + 'static,
) -> Result<T, Status> {
    off_runtime(f).await.map_err(Status::from)
}

impl Service {
    /// The job, if the caller may see it; NOT_FOUND otherwise, as for no such job.
    pub(crate) async fn visible_job(&self, id: &str, caller: Principal) -> Result<Job, Status> {
        let (runner, audit) = (self.runner.clone(), self.audit.clone());
        let id = id.to_string();
        blocking(move || {
            let found = runner.get(&id, &caller);
            audited_denial(&audit, &caller, "job.read", format!("job:{id}"), found)
        })
        .await
    }
}
