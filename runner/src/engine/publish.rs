//! Publishing a job's outputs and attestations to an OCI registry: on request (the
//! Publish call) or as the last part of a job whose spec names a repository.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use agent_proto::v1::{Job, JobState};
use oci_client::secrets::RegistryAuth;

use super::end::off_runtime;
use super::jobs::Runner;
use crate::api::auth::Principal;
use crate::error::{Result, RunnerError};
use crate::registry::publish::{publish_job, Published};
use crate::registry::{registry_auth, Target};
use crate::spec::{check_publish, SpecLimits};

/// How often a publishing job looks whether it was cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(200);

impl Runner {
    /// Publishes job `id`, which `caller` must be able to see, to `repository`, which
    /// the caller must be allowed to publish to.
    pub async fn publish(
        self: &Arc<Self>,
        id: &str,
        repository: &str,
        caller: &Principal,
    ) -> Result<Published> {
        let job = {
            let (runner, id, caller) = (self.clone(), id.to_string(), caller.clone());
            off_runtime(move || runner.get(&id, &caller)).await?
        };
        let limits = SpecLimits::of(&self.config, caller);
        let (target, tag) = check_publish(repository, &limits)?;
        self.publish_to(&job, target, tag.as_deref()).await
    }

    async fn publish_to(&self, job: &Job, target: Target, tag: Option<&str>) -> Result<Published> {
        let auth = match &self.config.publish.auth_file {
            Some(file) => registry_auth(Some(file), &target.registry).map_err(|err| {
                // The message names a file of the daemon's host: the log keeps it.
                tracing::error!(error = %err, "registry credentials");
                RunnerError::FailedPrecondition(
                    "the daemon's registry credentials ([publish] auth_file) cannot be read".into(),
                )
            })?,
            None => RegistryAuth::Anonymous,
        };
        let limit = Duration::from_secs(self.config.publish.timeout_seconds);
        let registry = target.registry.clone();
        let publish = async {
            let _turn = self
                .publishing
                .acquire()
                .await
                .map_err(|_| RunnerError::Unavailable("the daemon is stopping".into()))?;
            publish_job(&self.cas, job, target, tag, auth).await
        };
        tokio::time::timeout(limit, publish)
            .await
            .map_err(|_| {
                RunnerError::Unavailable(format!(
                    "publishing to {registry} did not finish within the {}s of [publish] timeout_seconds",
                    limit.as_secs()
                ))
            })?
    }

    /// The last part of a succeeded job whose spec names a repository: publish, as its
    /// owner may now, and end the job failed (saying why) if that cannot be done, or
    /// cancelled if it is cancelled meanwhile.
    pub(super) async fn publish_finished_job(
        self: &Arc<Self>,
        id: &str,
        job: &mut Job,
        repository: &str,
    ) {
        let published = async {
            let owner = {
                let (runner, id) = (self.clone(), id.to_string());
                off_runtime(move || runner.db.owner_of(&id)).await?
            }
            .ok_or_else(|| RunnerError::Internal(format!("job {id} has no owner")))?;
            let caller = self.current_principal(&owner)?;
            let limits = SpecLimits::of(&self.config, &caller);
            let (target, tag) = check_publish(repository, &limits)?;
            self.publish_to(job, target, tag.as_deref()).await
        };
        let handle = self.handle(id);
        let cancelled = async {
            while !handle.cancelled.load(Ordering::SeqCst) {
                tokio::time::sleep(CANCEL_POLL).await;
            }
        };
        let outcome = tokio::select! {
            published = published => Some(published),
            () = cancelled => None,
        };
        match outcome {
            Some(Ok(published)) => {
                tracing::info!(job = %id, artifact = %published.reference, "job published");
                job.published = published.reference;
            }
            Some(Err(err)) => {
                tracing::warn!(job = %id, error = %err, "publishing failed");
                job.state = JobState::Failed as i32;
                job.message = format!("publishing to {repository}: {}", err.client_message());
            }
            None => {
                let reason = handle
                    .cancel_reason
                    .lock()
                    .ok()
                    .and_then(|r| r.clone())
                    .unwrap_or_else(|| "cancelled".into());
                job.state = JobState::Cancelled as i32;
                job.message = format!("{reason} (while publishing)");
            }
        }
    }
}
