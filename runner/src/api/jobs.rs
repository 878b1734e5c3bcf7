//! The Jobs service: submit, watch, get, cancel and list, each for the caller's own
//! jobs (its tenant's), and who the caller is.

use std::pin::Pin;

use agent_proto::v1::jobs_server::Jobs;
use agent_proto::v1::{
    CancelRequest, CancelResponse, GetRequest, Job, JobEvent, JobState, JobSummary,
    ListJobsRequest, ListJobsResponse, PublishRequest, PublishResponse, SubmitRequest,
    SubmitResponse, WatchRequest, WhoAmIRequest, WhoAmIResponse,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::api::audit::audited;
use crate::api::auth::principal;
use crate::api::service::{blocking, check_job_id, Service};
use crate::engine::watch;
use crate::error::RunnerError;
use crate::plan::ValidatedJob;
use crate::spec::SpecLimits;

/// Jobs per ListJobs page when the request names no size, and at most.
const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;

/// A ListJobs page token: where the previous page ended (its last job's creation time
/// and id). Opaque to clients; it only positions the listing, which is owner-scoped
/// whatever it says.
fn page_token(created_ms: i64, id: &str) -> String {
    hex::encode(format!("1:{created_ms}:{id}"))
}

fn parse_page_token(token: &str) -> Result<(i64, String), RunnerError> {
    let bad = || RunnerError::invalid("page_token", "not a token this daemon made");
    let bytes = hex::decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let mut parts = text.splitn(3, ':');
    let (Some("1"), Some(created_ms), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let created_ms = created_ms.parse().map_err(|_| bad())?;
    check_job_id(id).map_err(|_| bad())?;
    Ok((created_ms, id.to_string()))
}

fn summary(job: Job, owner: &str) -> JobSummary {
    let (name, image) = job
        .spec
        .map(|spec| (spec.name, spec.image))
        .unwrap_or_default();
    JobSummary {
        job_id: job.job_id,
        name,
        image,
        state: job.state,
        message: job.message,
        created_unix_ms: job.created_unix_ms,
        started_unix_ms: job.started_unix_ms,
        finished_unix_ms: job.finished_unix_ms,
        step_count: u32::try_from(job.steps.len()).unwrap_or(u32::MAX),
        owner: owner.to_string(),
        tenant: crate::tenants::tenant_of_owner(owner)
            .unwrap_or_default()
            .to_string(),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Jobs for Service {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let caller = principal(&request)?;
        let req = request.into_inner();
        let spec = req
            .spec
            .ok_or_else(|| RunnerError::invalid("spec", "missing"))?;
        let key = (!req.idempotency_key.is_empty()).then_some(req.idempotency_key);
        if key.as_ref().is_some_and(|k| k.len() > 256) {
            return Err(RunnerError::invalid("idempotency_key", "longer than 256 bytes").into());
        }
        if key.as_ref().is_some_and(|k| k.contains('\0')) {
            return Err(RunnerError::invalid("idempotency_key", "contains a NUL byte").into());
        }
        let (runner, audit) = (self.runner.clone(), self.audit.clone());
        let job_id = blocking(move || {
            // A spec refused by the caller's ceilings is audited like any other refusal
            // (one beyond its network ceiling is PERMISSION_DENIED: a denial).
            let config = &runner.config;
            let submitted = ValidatedJob::validate(spec, &SpecLimits::of(config, &caller), config)
                .and_then(|plan| runner.submit(plan, key.as_deref(), &caller));
            let object = submitted
                .as_ref()
                .map_or_else(|_| "job".to_string(), |id| format!("job:{id}"));
            audited(&audit, &caller, "job.submit", object, submitted)
        })
        .await?;
        Ok(Response::new(SubmitResponse { job_id }))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = principal(&request)?;
        let id = request.into_inner().job_id;
        check_job_id(&id)?;
        // Whose job it is comes from its record, for a running job as for a finished one.
        self.visible_job(&id, caller.clone()).await?;
        let runner = self.runner.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(watch::STREAM_BUFFER);
        let out = watch::Sender::new(tx, id.clone());
        let cas = runner.cas.clone();
        match runner.existing_handle(&id) {
            Some(handle) => {
                tokio::spawn(watch::follow(
                    handle.events.clone(),
                    cas,
                    out,
                    runner.shutdown_signal(),
                ));
            }
            None => {
                // Finished: replayed from its record and stored logs, nothing in memory.
                let job = self.visible_job(&id, caller).await?;
                match runner.existing_handle(&id) {
                    // Submitted just now, its handle made after the first look.
                    Some(handle) if job.finished_unix_ms == 0 => {
                        tokio::spawn(watch::follow(
                            handle.events.clone(),
                            cas,
                            out,
                            runner.shutdown_signal(),
                        ));
                    }
                    _ => {
                        tokio::spawn(watch::replay(job, cas, out));
                    }
                }
            }
        }
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<Job>, Status> {
        let caller = principal(&request)?;
        let id = request.into_inner().job_id;
        check_job_id(&id)?;
        Ok(Response::new(self.visible_job(&id, caller).await?))
    }

    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let caller = principal(&request)?;
        let id = request.into_inner().job_id;
        check_job_id(&id)?;
        let (runner, audit) = (self.runner.clone(), self.audit.clone());
        let state = blocking(move || {
            let cancelled = runner.cancel(&id, &caller);
            audited(
                &audit,
                &caller,
                "job.cancel",
                format!("job:{id}"),
                cancelled,
            )
        })
        .await?;
        Ok(Response::new(CancelResponse {
            state: state as i32,
        }))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let caller = principal(&request)?;
        let req = request.into_inner();
        if req.all && !caller.admin {
            return Err(Status::permission_denied(
                "listing every client's jobs (all) is for operators only",
            ));
        }
        let state = match req.state {
            None => None,
            Some(n) => Some(
                JobState::try_from(n)
                    .ok()
                    .filter(|s| *s != JobState::Unspecified)
                    .ok_or_else(|| {
                        RunnerError::invalid("state", format!("{n} is not a job state"))
                    })?,
            ),
        };
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let after = match req.page_token.as_str() {
            "" => None,
            token => Some(parse_page_token(token)?),
        };
        let runner = self.runner.clone();
        let page = blocking(move || {
            let owners = caller.owner_keys();
            runner.db.list_jobs(
                (!req.all).then_some(owners.as_slice()),
                state,
                after.as_ref().map(|(ms, id)| (*ms, id.as_str())),
                // One more than the page: whether another page follows.
                page_size + 1,
                summary,
            )
        })
        .await?;
        let mut jobs = page.jobs;
        // More follow when the page was cut short by its records' size, or when the one
        // more asked for exists.
        let next_page_token = if page.cut || jobs.len() > page_size as usize {
            jobs.truncate(page_size as usize);
            jobs.last()
                .map(|last| page_token(last.created_unix_ms, &last.job_id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListJobsResponse {
            jobs,
            next_page_token,
        }))
    }

    async fn who_am_i(
        &self,
        request: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        let caller = principal(&request)?;
        Ok(Response::new(WhoAmIResponse {
            principal: caller.owner,
            tenant: caller.tenant.unwrap_or_default(),
            admin: caller.admin,
            uid: caller.uid,
        }))
    }

    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let caller = principal(&request)?;
        let req = request.into_inner();
        check_job_id(&req.job_id)?;
        if req.repository.len() > MAX_REPOSITORY_BYTES {
            return Err(RunnerError::invalid("repository", "longer than 1024 bytes").into());
        }
        let published = self
            .runner
            .publish(&req.job_id, &req.repository, &caller)
            .await;
        let audit = self.audit.clone();
        let object = format!("job:{}", req.job_id);
        let published =
            blocking(move || audited(&audit, &caller, "job.publish", object, published)).await?;
        Ok(Response::new(PublishResponse {
            reference: published.reference,
            attestations: u32::try_from(published.attestations).unwrap_or(u32::MAX),
        }))
    }
}

/// The longest repository a Publish may name.
const MAX_REPOSITORY_BYTES: usize = 1024;
