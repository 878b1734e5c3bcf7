//! The daemon's side of publishing: a job's outputs as one OCI artifact and its
//! attestations as referrers of it (see [`super::artifact`] for the layout), read from the
//! daemon's own content store, so what is pushed is what the job made and signed.
//!
//! Order matters to a reader who looks while a push is under way: the blobs first, then
//! the artifact, then the attestations, then the tags that lead to them, the caller's tag
//! last; a tag never names an artifact whose attestations are not there yet.

use std::collections::BTreeMap;

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
    pub digest_hex: String,
    /// Attestations attached as referrers.
    pub attestations: usize,
    /// Output bytes uploaded (blobs the registry already held are not sent again).
    pub uploaded_bytes: u64,
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
    let session = Session::open(target.clone(), auth, Operation::Push).await?;

    let mut uploaded_bytes = 0;
    session.push_bytes(artifact::EMPTY_JSON).await?;
    let mut sent = std::collections::HashSet::new();
    for output in &outputs {
        if sent.insert(output.sha256.clone()) && !session.has_blob(&output.sha256).await? {
            upload_from_store(&session, cas, output).await?;
            uploaded_bytes += output.size;
        }
    }
    let mut annotations = BTreeMap::new();
    annotations.insert(artifact::JOB.to_string(), job.job_id.clone());
    annotations.insert(artifact::CREATED.to_string(), rfc3339(job.finished_unix_ms));
    let manifest = artifact::artifact_manifest(&outputs, &annotations);
    let digest_hex = hex::encode(Sha256::digest(&manifest));
    session
        .push_manifest(
            &manifest,
            oci::OCI_MANIFEST,
            &format!("sha256:{digest_hex}"),
        )
        .await?;
    let subject = artifact::descriptor_json(oci::OCI_MANIFEST, &digest_hex, manifest.len() as u64);

    let mut referrers = Vec::new();
    let mut cosign_layers = Vec::new();
    for attestation in &attestations {
        let bundle = provenance::bundle::envelope_keyid(&attestation.envelope)
            .and_then(|keyid| provenance::bundle::envelope_to_bundle(&attestation.envelope, &keyid))
            .map_err(|e| RunnerError::Internal(format!("a Sigstore bundle: {e}")))?;
        let bundle_hex = session.push_bytes(&bundle).await?;
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
        session
            .push_manifest(
                &referrer,
                oci::OCI_MANIFEST,
                &format!("sha256:{referrer_hex}"),
            )
            .await?;
        let mut entry =
            artifact::descriptor_json(oci::OCI_MANIFEST, &referrer_hex, referrer.len() as u64);
        entry["artifactType"] = json!(artifact::BUNDLE_MEDIA_TYPE);
        entry["annotations"] = json!(notes);
        referrers.push(entry);

        let envelope_hex = session.push_bytes(&attestation.envelope).await?;
        let mut layer = artifact::descriptor_json(
            artifact::DSSE_MEDIA_TYPE,
            &envelope_hex,
            attestation.envelope.len() as u64,
        );
        let mut cosign_notes = notes.clone();
        cosign_notes.remove(artifact::PREDICATE_TYPE);
        if let Some(predicate_type) = predicate_type {
            cosign_notes.insert(artifact::COSIGN_PREDICATE_TYPE.to_string(), predicate_type);
        }
        layer["annotations"] = json!(cosign_notes);
        cosign_layers.push((layer, envelope_hex));
    }
    if session.fetch_referrers_index(&digest_hex).await?.is_none() {
        update_referrers_tag(&session, &digest_hex, referrers).await?;
    }
    push_cosign_attestations(&session, &digest_hex, cosign_layers).await?;
    if let Some(tag) = tag {
        session
            .push_manifest(&manifest, oci::OCI_MANIFEST, tag)
            .await?;
    }
    Ok(Published {
        reference: format!("{}@sha256:{digest_hex}", target.repository_name()),
        digest_hex,
        attestations: attestations.len(),
        uploaded_bytes,
    })
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

/// cosign's `sha256-<hex>.att`: one manifest holding the DSSE envelopes as layers.
async fn push_cosign_attestations(
    session: &Session,
    subject_hex: &str,
    layers: Vec<(Value, String)>,
) -> Result<()> {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|(_, hex)| format!("sha256:{hex}"))
        .collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "",
        "os": "",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .map_err(|e| RunnerError::Internal(format!("a config: {e}")))?;
    let config_hex = session.push_bytes(&config).await?;
    let config = artifact::descriptor_json(oci::OCI_IMAGE_CONFIG, &config_hex, config.len() as u64);
    let manifest = artifact::cosign_manifest(config, layers.into_iter().map(|(l, _)| l).collect());
    session
        .push_manifest(
            &manifest,
            oci::OCI_MANIFEST,
            &artifact::cosign_tag(subject_hex),
        )
        .await
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
