//! The gRPC services of `kiln.v1`, thin adapters over the Runner.

use std::pin::Pin;
use std::sync::Arc;

use agent_proto::v1::attestations_server::Attestations;
use agent_proto::v1::content_store_server::ContentStore as ContentStoreApi;
use agent_proto::v1::jobs_server::Jobs;
use agent_proto::v1::{
    write_request, CancelRequest, CancelResponse, FindMissingRequest, FindMissingResponse,
    GetProvenanceRequest, GetPublicKeyRequest, GetRequest, Job, JobEvent, Link, ListLinksRequest,
    ListLinksResponse, Provenance, PublicKey, ReadRequest, ReadResponse, SubmitRequest,
    SubmitResponse, WatchRequest, WriteRequest, WriteResponse,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{principal, Principal};
use crate::cas::check_digest;
use crate::error::RunnerError;
use crate::jobs::Runner;
use crate::spec::{validate, SpecLimits};
use crate::watch;

/// Bytes of link content one ListLinks answer carries at most, below the 4 MiB that
/// gRPC clients decode by default; the rest is read by digest.
const LIST_LINKS_CONTENT_BUDGET: usize = 3 << 20;

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;
type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadResponse, Status>> + Send>>;

#[derive(Clone)]
pub struct Service {
    pub runner: Arc<Runner>,
}

fn check_job_id(id: &str) -> Result<(), RunnerError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Err(RunnerError::invalid(
            "job_id",
            format!("{id:?} is not a job id"),
        ));
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RunnerError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker: {e}")))?
        .map_err(Status::from)
}

impl Service {
    /// The job, if the caller may see it; NOT_FOUND otherwise, as for no such job.
    async fn visible_job(&self, id: &str, caller: Principal) -> Result<Job, Status> {
        let runner = self.runner.clone();
        let id = id.to_string();
        blocking(move || runner.get(&id, &caller)).await
    }
}

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
        let runner = self.runner.clone();
        let job_id = blocking(move || runner.submit(spec, key.as_deref(), &caller)).await?;
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
        let runner = self.runner.clone();
        let state = blocking(move || runner.cancel(&id, &caller)).await?;
        Ok(Response::new(CancelResponse {
            state: state as i32,
        }))
    }
}

#[tonic::async_trait]
impl ContentStoreApi for Service {
    async fn find_missing(
        &self,
        request: Request<FindMissingRequest>,
    ) -> Result<Response<FindMissingResponse>, Status> {
        let caller = principal(&request)?;
        let digests = request.into_inner().digests;
        if digests.len() > 100_000 {
            return Err(RunnerError::invalid("digests", "too many").into());
        }
        let runner = self.runner.clone();
        let missing = blocking(move || {
            for (i, digest) in digests.iter().enumerate() {
                check_digest(&format!("digests[{i}]"), digest)?;
            }
            // A blob the caller may not read counts as missing: it proves it holds the
            // content by uploading it, and learns nothing of other clients' files.
            let readable = if caller.admin {
                None
            } else {
                Some(
                    runner
                        .db
                        .readable_blobs(&caller.owner, digests.iter().map(String::as_str))?,
                )
            };
            let mut missing = Vec::new();
            for digest in digests {
                let may_read = readable.as_ref().is_none_or(|r| r.contains(&digest));
                if !may_read || !runner.cas.contains(&digest)? {
                    missing.push(digest);
                }
            }
            Ok(missing)
        })
        .await?;
        Ok(Response::new(FindMissingResponse { missing }))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let caller = principal(&request)?;
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(WriteRequest {
                part: Some(write_request::Part::Header(header)),
            }) => header,
            _ => {
                return Err(
                    RunnerError::invalid("header", "the first message must be a header").into(),
                )
            }
        };
        check_digest("header.digest", &header.digest)?;
        let max_blob_size = self.runner.config.max_blob_size.0;
        if header.size > max_blob_size {
            return Err(RunnerError::invalid(
                "header.size",
                format!(
                    "{} bytes declared, more than the runner's max_blob_size of {}",
                    header.size,
                    crate::limits::format_size(max_blob_size)
                ),
            )
            .into());
        }
        // Refused before a byte is received when the disk cannot take it.
        self.runner.cas.check_room(header.size)?;
        let mut writer = self.runner.cas.writer()?;
        while let Some(message) = stream.message().await? {
            match message.part {
                Some(write_request::Part::Data(data)) => {
                    if writer.size() + data.len() as u64 > header.size {
                        return Err(RunnerError::invalid(
                            "data",
                            format!("more than the declared {} bytes", header.size),
                        )
                        .into());
                    }
                    writer = tokio::task::spawn_blocking(move || -> Result<_, RunnerError> {
                        writer.write(&data)?;
                        Ok(writer)
                    })
                    .await
                    .map_err(|e| Status::internal(format!("worker: {e}")))??;
                }
                _ => return Err(RunnerError::invalid("data", "a second header").into()),
            }
        }
        if writer.size() != header.size {
            return Err(RunnerError::invalid(
                "data",
                format!("{} bytes received, {} declared", writer.size(), header.size),
            )
            .into());
        }
        let size = writer.size();
        let expected = header.digest.clone();
        let runner = self.runner.clone();
        let digest = blocking(move || {
            let digest = writer.commit(Some(&expected))?;
            runner.db.grant_blob(&caller.owner, &digest)?;
            Ok(digest)
        })
        .await?;
        Ok(Response::new(WriteResponse { digest, size }))
    }

    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let caller = principal(&request)?;
        let digest = request.into_inner().digest;
        check_digest("digest", &digest)?;
        let runner = self.runner.clone();
        let mut reader = blocking(move || {
            let may_read = caller.admin
                || runner
                    .db
                    .readable_blobs(&caller.owner, [digest.as_str()])?
                    .contains(&digest);
            if !may_read {
                return Err(RunnerError::NotFound(format!("blob {digest}")));
            }
            runner.cas.reader(&digest)
        })
        .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            // One chunk is held back until the next read: the last one goes out only after
            // the whole content matched its digest, so a corrupt blob ends in an error, and
            // a client that checks the status never takes it for the real content.
            let mut held: Option<Vec<u8>> = None;
            loop {
                match reader.next_chunk() {
                    Ok(next) => {
                        let done = next.is_none();
                        if let Some(data) = std::mem::replace(&mut held, next) {
                            if tx.blocking_send(Ok(ReadResponse { data })).is_err() {
                                return;
                            }
                        }
                        if done {
                            return;
                        }
                    }
                    Err(err) => {
                        let _ = tx.blocking_send(Err(Status::from(err)));
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[tonic::async_trait]
impl Attestations for Service {
    async fn list_links(
        &self,
        request: Request<ListLinksRequest>,
    ) -> Result<Response<ListLinksResponse>, Status> {
        let caller = principal(&request)?;
        let id = request.into_inner().job_id;
        check_job_id(&id)?;
        let runner = self.runner.clone();
        let links = blocking(move || {
            let job = runner.get(&id, &caller)?;
            let mut links = Vec::new();
            let mut budget = LIST_LINKS_CONTENT_BUDGET;
            for step in job.steps {
                if step.link_digest.is_empty() {
                    continue;
                }
                let mut link = Link {
                    step: step.name,
                    file_name: step.link_name,
                    digest: step.link_digest,
                    dsse_digest: step.link_dsse_digest,
                    ..Default::default()
                };
                let content = runner.cas.read_all(&link.digest)?;
                let dsse_content = if link.dsse_digest.is_empty() {
                    Vec::new()
                } else {
                    runner.cas.read_all(&link.dsse_digest)?
                };
                let size = content.len() + dsse_content.len();
                if size <= budget {
                    budget -= size;
                    link.content = content;
                    link.dsse_content = dsse_content;
                } else {
                    // Every later link goes without content too: the client reads them.
                    budget = 0;
                    link.content_omitted = true;
                }
                links.push(link);
            }
            Ok(links)
        })
        .await?;
        Ok(Response::new(ListLinksResponse { links }))
    }

    async fn get_provenance(
        &self,
        request: Request<GetProvenanceRequest>,
    ) -> Result<Response<Provenance>, Status> {
        let caller = principal(&request)?;
        let id = request.into_inner().job_id;
        check_job_id(&id)?;
        let runner = self.runner.clone();
        let provenance = blocking(move || {
            let job = runner.get(&id, &caller)?;
            if job.provenance_digest.is_empty() {
                return Err(RunnerError::NotFound(format!(
                    "provenance of job {id} (written when a job succeeds with outputs)"
                )));
            }
            Ok(Provenance {
                envelope: runner.cas.read_all(&job.provenance_digest)?,
                digest: job.provenance_digest,
            })
        })
        .await?;
        Ok(Response::new(provenance))
    }

    async fn get_public_key(
        &self,
        _request: Request<GetPublicKeyRequest>,
    ) -> Result<Response<PublicKey>, Status> {
        let runner = self.runner.clone();
        // Both from one look at the ring, so the key is the ring's current one.
        let (current, ring) = blocking(move || Ok(runner.key.current_and_ring()?)).await?;
        let public = current.key.public_key();
        let json = serde_json::to_string(&public.to_securesystemslib())
            .map_err(|e| Status::internal(format!("encoding key: {e}")))?;
        let keyring_json = String::from_utf8(ring.to_json_bytes())
            .map_err(|e| Status::internal(format!("encoding key ring: {e}")))?;
        Ok(Response::new(PublicKey {
            keyid: public.keyid(),
            pem: public.to_spki_pem(),
            securesystemslib_json: json,
            keyring_json,
        }))
    }
}
