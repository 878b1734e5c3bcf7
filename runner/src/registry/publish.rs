//! The daemon's side of publishing: a job's outputs as one OCI artifact and its
//! attestations as referrers of it (see [`super::artifact`] for the layout), read from the
//! daemon's own content store, so what is pushed is what the job made and signed.
//!
//! Order matters to a reader who looks while a push is under way: the blobs first, then
//! the artifact, then the attestations, then the tags that lead to them, the caller's tag
//! last; a tag never names an artifact whose attestations are not there yet.

use std::collections::BTreeMap;
use std::sync::Arc;

use agent_proto::v1::{Job, JobState};
use base64::Engine;
use oci_client::secrets::RegistryAuth;
use oci_spec::image::ImageIndex;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::artifact::{self, AttestationKind, OutputLayer};
use super::{Operation, Session, Target};
use crate::error::{Result, RunnerError};
use crate::images::oci;
use crate::store::cas::ContentStore;

/// How many chunks of a blob may wait between the content store and the upload.
const UPLOAD_QUEUE: usize = 4;

/// What a publish did.
#[derive(Debug, Clone)]
pub struct Published {
    /// `REGISTRY/REPO@sha256:HEX`: the artifact.
    pub reference: String,
    /// Attestations attached as referrers.
    pub attestations: usize,
}

/// One of the job's signed statements, as its referrer describes it.
struct Attestation {
    kind: AttestationKind,
    name: String,
    envelope: Vec<u8>,
}

/// Pushes `job` (a job that succeeded, with outputs and provenance) to `target`'s
/// repository, tagged `tag` if given.
pub async fn publish_job(
    cas: &ContentStore,
    job: &Job,
    target: Target,
    tag: Option<&str>,
    auth: RegistryAuth,
) -> Result<Published> {
    let outputs = publishable_outputs(job)?;
    let attestations = {
        let (cas, job) = (cas.clone(), job.clone());
        crate::engine::end::off_runtime(move || attestations_of(&cas, &job)).await?
    };
    let session = Arc::new(Session::open(target.clone(), auth, Operation::Push).await?);

    let mut sent = std::collections::HashSet::new();
    for output in &outputs {
        if sent.insert(output.sha256.clone()) && !session.has_blob(&output.sha256).await? {
            upload_from_store(&session, cas, output).await?;
        }
    }
    let mut annotations = BTreeMap::new();
    annotations.insert(artifact::JOB.to_string(), job.job_id.clone());
    annotations.insert(artifact::CREATED.to_string(), rfc3339(job.finished_unix_ms));
    let manifest = artifact::artifact_manifest(&outputs, &annotations);
    let digest_hex = hex::encode(Sha256::digest(&manifest));
    let subject = artifact::descriptor_json(oci::OCI_MANIFEST, &digest_hex, manifest.len() as u64);
    let documents = AttestationDocuments::of(&attestations, &subject)?;

    // The small blobs at once, then the artifact, then its referrers at once.
    let mut blobs = vec![
        artifact::EMPTY_JSON.to_vec(),
        documents.cosign_config.clone(),
    ];
    blobs.extend(documents.blobs.iter().cloned());
    all_at_once(&session, blobs, |session, blob| async move {
        session.push_bytes(&blob).await.map(drop)
    })
    .await?;
    session
        .push_manifest(
            &manifest,
            oci::OCI_MANIFEST,
            &format!("sha256:{digest_hex}"),
        )
        .await?;
    all_at_once(
        &session,
        documents.referrers.clone(),
        |session, referrer| async move {
            let reference = format!("sha256:{}", hex::encode(Sha256::digest(&referrer)));
            session
                .push_manifest(&referrer, oci::OCI_MANIFEST, &reference)
                .await
        },
    )
    .await?;
    if session.fetch_referrers_index(&digest_hex).await?.is_none() {
        update_referrers_tag(&session, &digest_hex, documents.index_entries).await?;
    }
    session
        .push_manifest(
            &documents.cosign_manifest,
            oci::OCI_MANIFEST,
            &artifact::cosign_tag(&digest_hex),
        )
        .await?;
    if let Some(tag) = tag {
        session
            .push_manifest(&manifest, oci::OCI_MANIFEST, tag)
            .await?;
    }
    Ok(Published {
        reference: format!("{}@sha256:{digest_hex}", target.repository_name()),
        attestations: attestations.len(),
    })
}

/// How many uploads of small documents run at once.
const UPLOADS_AT_ONCE: usize = 8;

/// Runs `upload` for every item, [`UPLOADS_AT_ONCE`] at a time; the first error wins.
async fn all_at_once<T, F, Fut>(session: &Arc<Session>, items: Vec<T>, upload: F) -> Result<()>
where
    T: Send + 'static,
    F: Fn(Arc<Session>, T) -> Fut,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let mut running = tokio::task::JoinSet::new();
    for item in items {
        if running.len() >= UPLOADS_AT_ONCE {
            joined(running.join_next().await)?;
        }
        running.spawn(upload(session.clone(), item));
    }
    while let Some(done) = running.join_next().await {
        joined(Some(done))?;
    }
    Ok(())
}

fn joined(done: Option<std::result::Result<Result<()>, tokio::task::JoinError>>) -> Result<()> {
    match done {
        Some(Ok(result)) => result,
        Some(Err(e)) => Err(RunnerError::Internal(format!("an upload: {e}"))),
        None => Ok(()),
    }
}

/// Everything the attestations become in the registry, made before anything is sent.
struct AttestationDocuments {
    /// Each attestation's bundle and envelope.
    blobs: Vec<Vec<u8>>,
    /// One referrer manifest per attestation (about the artifact).
    referrers: Vec<Vec<u8>>,
    /// The referrers' entries for the referrers tag schema's index.
    index_entries: Vec<Value>,
    cosign_config: Vec<u8>,
    cosign_manifest: Vec<u8>,
}

impl AttestationDocuments {
    fn of(attestations: &[Attestation], subject: &Value) -> Result<Self> {
        let mut documents = AttestationDocuments {
            blobs: Vec::new(),
            referrers: Vec::new(),
            index_entries: Vec::new(),
            cosign_config: Vec::new(),
            cosign_manifest: Vec::new(),
        };
        let mut cosign_layers = Vec::new();
        let mut diff_ids = Vec::new();
        for attestation in attestations {
            let bundle = provenance::bundle::envelope_keyid(&attestation.envelope)
                .and_then(|keyid| {
                    provenance::bundle::envelope_to_bundle(&attestation.envelope, &keyid)
                })
                .map_err(|e| RunnerError::Internal(format!("a Sigstore bundle: {e}")))?;
            let mut notes = BTreeMap::new();
            notes.insert(
                artifact::ATTESTATION_KIND.to_string(),
                attestation.kind.as_str().to_string(),
            );
            notes.insert(
                artifact::ATTESTATION_NAME.to_string(),
                attestation.name.clone(),
            );
            let predicate_type = predicate_type(&attestation.envelope);
            if let Some(predicate_type) = &predicate_type {
                notes.insert(artifact::PREDICATE_TYPE.to_string(), predicate_type.clone());
            }
            let bundle_hex = hex::encode(Sha256::digest(&bundle));
            let layer = artifact::descriptor_json(
                artifact::BUNDLE_MEDIA_TYPE,
                &bundle_hex,
                bundle.len() as u64,
            );
            let referrer = artifact::referrer_manifest(
                artifact::BUNDLE_MEDIA_TYPE,
                layer,
                subject.clone(),
                &notes,
            );
            let referrer_hex = hex::encode(Sha256::digest(&referrer));
            let mut entry =
                artifact::descriptor_json(oci::OCI_MANIFEST, &referrer_hex, referrer.len() as u64);
            entry["artifactType"] = json!(artifact::BUNDLE_MEDIA_TYPE);
            entry["annotations"] = json!(notes);
            documents.index_entries.push(entry);
            documents.referrers.push(referrer);

            let envelope_hex = hex::encode(Sha256::digest(&attestation.envelope));
            let mut layer = artifact::descriptor_json(
                artifact::DSSE_MEDIA_TYPE,
                &envelope_hex,
                attestation.envelope.len() as u64,
            );
            let mut cosign_notes = notes;
            cosign_notes.remove(artifact::PREDICATE_TYPE);
            if let Some(predicate_type) = predicate_type {
                cosign_notes.insert(artifact::COSIGN_PREDICATE_TYPE.to_string(), predicate_type);
            }
            layer["annotations"] = json!(cosign_notes);
            cosign_layers.push(layer);
            diff_ids.push(format!("sha256:{envelope_hex}"));
            documents.blobs.push(bundle);
            documents.blobs.push(attestation.envelope.clone());
        }
        // cosign's `.att` manifest: the envelopes as layers, under a minimal image config
        // listing them, as cosign writes it.
        documents.cosign_config = serde_json::to_vec(&json!({
            "architecture": "",
            "os": "",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .map_err(|e| RunnerError::Internal(format!("a config: {e}")))?;
        let config_hex = hex::encode(Sha256::digest(&documents.cosign_config));
        let config = artifact::descriptor_json(
            oci::OCI_IMAGE_CONFIG,
            &config_hex,
            documents.cosign_config.len() as u64,
        );
        documents.cosign_manifest = artifact::cosign_manifest(config, cosign_layers);
        Ok(documents)
    }
}

/// The outputs of a job that may be published: it succeeded, has outputs and provenance.
fn publishable_outputs(job: &Job) -> Result<Vec<OutputLayer>> {
    if job.state != JobState::Succeeded as i32 {
        return Err(RunnerError::FailedPrecondition(format!(
            "job {} has not succeeded: only a successful job's outputs are published",
            job.job_id
        )));
    }
    if job.outputs.is_empty() || job.provenance_digest.is_empty() {
        return Err(RunnerError::FailedPrecondition(format!(
            "job {} has no outputs with provenance to publish",
            job.job_id
        )));
    }
    Ok(job
        .outputs
        .iter()
        .map(|o| OutputLayer {
            path: o.path.clone(),
            sha256: o.digest.clone(),
            size: o.size,
            executable: o.executable,
        })
        .collect())
}

/// The job's provenance, each step's link (its DSSE form) and the image's SBOM.
fn attestations_of(cas: &ContentStore, job: &Job) -> Result<Vec<Attestation>> {
    let mut attestations = vec![Attestation {
        kind: AttestationKind::Provenance,
        name: job.job_id.clone(),
        envelope: cas.read_all(&job.provenance_digest)?,
    }];
    for step in &job.steps {
        if !step.link_dsse_digest.is_empty() {
            attestations.push(Attestation {
                kind: AttestationKind::Link,
                name: step.name.clone(),
                envelope: cas.read_all(&step.link_dsse_digest)?,
            });
        }
    }
    if !job.sbom_digest.is_empty() {
        let image = job
            .spec
            .as_ref()
            .map(|s| s.image.clone())
            .unwrap_or_default();
        attestations.push(Attestation {
            kind: AttestationKind::Sbom,
            name: image,
            envelope: cas.read_all(&job.sbom_digest)?,
        });
    }
    Ok(attestations)
}

/// The in-toto Statement's predicateType (links, which are not Statements, have none).
fn predicate_type(envelope: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(envelope).ok()?;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(value["payload"].as_str()?)
        .ok()?;
    let statement: Value = serde_json::from_slice(&payload).ok()?;
    statement["predicateType"].as_str().map(str::to_string)
}

/// Streams a blob from the content store (which checks it as it reads) to the registry
/// (which checks it against its digest before keeping it).
async fn upload_from_store(
    session: &Session,
    cas: &ContentStore,
    output: &OutputLayer,
) -> Result<()> {
    let (sender, receiver) =
        tokio::sync::mpsc::channel::<oci_client::errors::Result<bytes::Bytes>>(UPLOAD_QUEUE);
    let mut reader = cas.reader(&output.sha256)?;
    let path = output.path.clone();
    let feeder = tokio::task::spawn_blocking(move || loop {
        let chunk = match reader.next_chunk() {
            Ok(Some(chunk)) => Ok(bytes::Bytes::from(chunk)),
            Ok(None) => return,
            Err(err) => Err(oci_client::errors::OciDistributionError::GenericError(
                Some(format!("output {path}: {}", err.client_message())),
            )),
        };
        let failed = chunk.is_err();
        if sender.blocking_send(chunk).is_err() || failed {
            return;
        }
    });
    let pushed = session
        .push_blob(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
            &output.sha256,
            output.size,
        )
        .await;
    // The feeder ends when the upload stops reading.
    let _ = feeder.await;
    pushed.map_err(|e| match e {
        RunnerError::Unavailable(message) => {
            RunnerError::Unavailable(format!("uploading output {}: {message}", output.path))
        }
        other => other,
    })
}

/// The referrers tag schema: the index under `sha256-<hex>` lists every referrer of the
/// subject. Entries already there (from another push) are kept.
async fn update_referrers_tag(
    session: &Session,
    subject_hex: &str,
    ours: Vec<Value>,
) -> Result<()> {
    let tag = artifact::referrers_tag(subject_hex);
    let mut entries: Vec<Value> = Vec::new();
    if let Some((bytes, _)) = session.fetch_optional_document(&tag).await? {
        // A tag that does not hold an index is replaced: it is the schema's name.
        if let Ok(existing) = serde_json::from_slice::<ImageIndex>(&bytes) {
            for descriptor in existing.manifests().iter().take(artifact::MAX_REFERRERS) {
                entries.push(artifact::descriptor_value(descriptor)?);
            }
        }
    }
    for entry in ours {
        if !entries.iter().any(|e| e["digest"] == entry["digest"]) {
            entries.push(entry);
        }
    }
    let index = artifact::index(&entries);
    session.push_manifest(&index, oci::OCI_INDEX, &tag).await
}

fn rfc3339(unix_ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
