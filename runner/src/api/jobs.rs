//! The Jobs service: submit, watch, get and cancel, each for the caller's own jobs.

use std::pin::Pin;

use agent_proto::v1::jobs_server::Jobs;
use agent_proto::v1::{
    CancelRequest, CancelResponse, GetRequest, Job, JobEvent, SubmitRequest, SubmitResponse,
    WatchRequest,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::api::audit::audited;
use crate::api::auth::principal;
use crate::api::service::{blocking, check_job_id, Service};
use crate::engine::watch;
use crate::error::RunnerError;
use crate::spec::{validate, SpecLimits};

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
        let config = &self.runner.config;
        let limits = SpecLimits {
            max_timeout_seconds: config.max_timeout_seconds,
            max_memory_bytes: config.max_memory.0,
            max_pids: config.max_pids,
            max_cpu_millis: config.max_cpus.0,
            max_disk_bytes: config.max_disk.0,
            network_ceiling: config.network_ceiling_for(caller.uid),
            max_inputs: config.max_inputs,
            max_spec_bytes: config.max_spec_bytes.0,
        };
        validate(&spec, &limits)?;
        let key = (!req.idempotency_key.is_empty()).then_some(req.idempotency_key);
        if key.as_ref().is_some_and(|k| k.len() > 256) {
            return Err(RunnerError::invalid("idempotency_key", "longer than 256 bytes").into());
        }
        if key.as_ref().is_some_and(|k| k.contains('\0')) {
            return Err(RunnerError::invalid("idempotency_key", "contains a NUL byte").into());
        }
        let (runner, audit) = (self.runner.clone(), self.audit.clone());
        let job_id = blocking(move || {
            let submitted = runner.submit(spec, key.as_deref(), &caller);
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
}
