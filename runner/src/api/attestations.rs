//! The Attestations service: a job's links and provenance for the caller, and the
//! runner's public keys for anyone.

use agent_proto::v1::attestations_server::Attestations;
use agent_proto::v1::{
    GetProvenanceRequest, GetPublicKeyRequest, Link, ListLinksRequest, ListLinksResponse,
    Provenance, PublicKey,
};
use tonic::{Request, Response, Status};

use crate::api::audit::audited;
use crate::api::auth::{principal, Principal};
use crate::api::service::{blocking, check_job_id, Service, LIST_LINKS_CONTENT_BUDGET};
use crate::engine::jobs::Runner;
use crate::error::RunnerError;

#[tonic::async_trait]
impl Attestations for Service {
    async fn list_links(
        &self,
        request: Request<ListLinksRequest>,
    ) -> Result<Response<ListLinksResponse>, Status> {
        let caller = principal(&request)?;
        let id = request.into_inner().job_id;
        check_job_id(&id)?;
        let (runner, audit) = (self.runner.clone(), self.audit.clone());
        let links = blocking(move || {
            let listed = list_links(&runner, &id, &caller);
            audited(&audit, &caller, "job.links", format!("job:{id}"), listed)
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
        let (runner, audit) = (self.runner.clone(), self.audit.clone());
        let provenance = blocking(move || {
            let read = || {
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
            };
            let read = read();
            audited(&audit, &caller, "job.provenance", format!("job:{id}"), read)
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

/// The job's links, their content within the answer's budget.
fn list_links(runner: &Runner, id: &str, caller: &Principal) -> Result<Vec<Link>, RunnerError> {
    let job = runner.get(id, caller)?;
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
}
