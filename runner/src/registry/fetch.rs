//! The client's side: a published artifact and its attestations read back from a
//! registry, which is untrusted. The artifact is fetched by digest and must hash to it;
//! every referrer, bundle, envelope and layer is checked against the digest that names it,
//! with bounded sizes and counts. Which attestations are genuine is for the caller's
//! verifier to decide (their signatures); this module only guarantees they are what the
//! registry's digests say.

use std::collections::HashSet;
use std::path::Path;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use super::artifact::{self, AttestationKind, OutputLayer};
use super::{check_bytes, parse_document, Session, MAX_DOCUMENT_BYTES};
use crate::error::{Result, RunnerError};

/// The most attestation bytes (bundles, envelopes) read for one artifact: each is at
/// most [`MAX_DOCUMENT_BYTES`], and a registry listing a thousand of them must not have
/// the client read and hold gigabytes.
pub const MAX_ATTESTATION_BYTES: u64 = 64 << 20;

fn over_budget() -> RunnerError {
    RunnerError::FailedPrecondition(format!(
        "the artifact's attestations are larger than the {MAX_ATTESTATION_BYTES} bytes read \
         for one artifact"
    ))
}

/// A blob of at most what is left of `budget`, which it then uses up.
async fn read_attestation_blob(
    session: &Session,
    layer: &Descriptor,
    budget: &mut u64,
) -> Result<Vec<u8>> {
    if layer.size() > *budget {
        return Err(over_budget());
    }
    let bytes = session
        .read_blob(layer, MAX_DOCUMENT_BYTES.min(*budget))
        .await?;
    *budget -= bytes.len() as u64;
    Ok(bytes)
}

/// One attestation found for the artifact.
#[derive(Debug, Clone)]
pub struct FetchedAttestation {
    pub kind: AttestationKind,
    /// The step of a link, the image of an SBOM, the job of a provenance.
    pub name: String,
    /// The DSSE envelope (JSON).
    pub envelope: Vec<u8>,
    /// Where it was found: `referrer sha256:HEX` or `cosign sha256-HEX.att`.
    pub source: String,
}

/// An artifact's outputs and attestations as the registry holds them.
#[derive(Debug, Clone)]
pub struct FetchedArtifact {
    pub digest_hex: String,
    pub outputs: Vec<OutputLayer>,
    pub attestations: Vec<FetchedAttestation>,
}

/// Reads the artifact `digest_hex` of the session's repository and its attestations: the
/// OCI 1.1 referrers (the referrers API, or the referrers tag schema without one), or, when
/// there are none, cosign's `.att` tag.
pub async fn fetch_artifact(session: &Session, digest_hex: &str) -> Result<FetchedArtifact> {
    let (bytes, _) = session
        .fetch_document(&format!("sha256:{digest_hex}"))
        .await?;
    check_bytes(&bytes, digest_hex, bytes.len() as u64)?;
    let manifest: ImageManifest = parse_document("the artifact manifest", &bytes)?;
    let outputs = artifact::read_artifact(&manifest)?;
    if let Some((parent, child)) = artifact::clashing_paths(&outputs) {
        return Err(RunnerError::FailedPrecondition(format!(
            "the artifact names both {parent:?} and {child:?} below it"
        )));
    }
    let mut attestations = Vec::new();
    let mut budget = MAX_ATTESTATION_BYTES;
    for descriptor in referrers(session, digest_hex).await? {
        if let Some(found) = read_referrer(session, &descriptor, digest_hex, &mut budget).await? {
            attestations.push(found);
        }
    }
    if attestations.is_empty() {
        attestations = cosign_attestations(session, digest_hex, &mut budget).await?;
    }
    Ok(FetchedArtifact {
        digest_hex: digest_hex.to_string(),
        outputs,
        attestations,
    })
}

/// The subject's referrers that are Sigstore bundles (others are another tool's business),
/// each once, at most [`artifact::MAX_REFERRERS`].
async fn referrers(session: &Session, subject_hex: &str) -> Result<Vec<Descriptor>> {
    let index = match session.fetch_referrers_index(subject_hex).await? {
        Some(index) => index,
        None => match session
            .fetch_optional_document(&artifact::referrers_tag(subject_hex))
            .await?
        {
            Some((index, _)) => index,
            None => return Ok(Vec::new()),
        },
    };
    let index: ImageIndex = parse_document("the referrers index", &index)?;
    if index.manifests().len() > artifact::MAX_REFERRERS {
        return Err(RunnerError::FailedPrecondition(format!(
            "the artifact has more than {} referrers",
            artifact::MAX_REFERRERS
        )));
    }
    let mut seen = HashSet::new();
    Ok(index
        .manifests()
        .iter()
        .filter(|d| {
            d.artifact_type()
                .as_ref()
                .map(ToString::to_string)
                .as_deref()
                == Some(artifact::BUNDLE_MEDIA_TYPE)
        })
        .filter(|d| seen.insert(d.digest().to_string()))
        .cloned()
        .collect())
}

/// One referrer: its manifest (which must name the artifact as its subject) and its one
/// layer, a bundle, unwrapped to the envelope. None for a referrer Kiln did not write.
async fn read_referrer(
    session: &Session,
    descriptor: &Descriptor,
    subject_hex: &str,
    budget: &mut u64,
) -> Result<Option<FetchedAttestation>> {
    // Referrer manifests count too: each read is at most a document, and there are many.
    if descriptor.size() > *budget {
        return Err(over_budget());
    }
    let bytes = session.fetch_described(descriptor).await?;
    *budget -= bytes.len() as u64;
    let manifest: ImageManifest = parse_document("a referrer manifest", &bytes)?;
    let digest = descriptor.digest().to_string();
    let bad = |why: &str| RunnerError::FailedPrecondition(format!("referrer {digest} {why}"));
    let names_subject = manifest
        .subject()
        .as_ref()
        .is_some_and(|s| s.digest().to_string() == format!("sha256:{subject_hex}"));
    if !names_subject {
        return Err(bad("is not about this artifact (its subject differs)"));
    }
    let notes = manifest.annotations().clone().unwrap_or_default();
    let Some(kind) = notes
        .get(artifact::ATTESTATION_KIND)
        .and_then(|k| AttestationKind::parse(k))
    else {
        return Ok(None);
    };
    let [layer] = manifest.layers().as_slice() else {
        return Err(bad("does not hold exactly one layer"));
    };
    if layer.media_type().to_string() != artifact::BUNDLE_MEDIA_TYPE {
        return Err(bad("does not hold a Sigstore bundle"));
    }
    let bundle = read_attestation_blob(session, layer, budget).await?;
    let envelope = provenance::bundle::bundle_to_envelope(&bundle)
        .map_err(|e| bad(&format!("holds no usable bundle: {e}")))?;
    Ok(Some(FetchedAttestation {
        kind,
        name: notes
            .get(artifact::ATTESTATION_NAME)
            .cloned()
            .unwrap_or_default(),
        envelope,
        source: format!("referrer {digest}"),
    }))
}

/// The envelopes of cosign's `.att` tag, for registries where only that was kept.
async fn cosign_attestations(
    session: &Session,
    subject_hex: &str,
    budget: &mut u64,
) -> Result<Vec<FetchedAttestation>> {
    let tag = artifact::cosign_tag(subject_hex);
    let Some((bytes, _)) = session.fetch_optional_document(&tag).await? else {
        return Ok(Vec::new());
    };
    let manifest: ImageManifest = parse_document("the cosign attestation manifest", &bytes)?;
    if manifest.layers().len() > artifact::MAX_REFERRERS {
        return Err(RunnerError::FailedPrecondition(format!(
            "{tag} holds more than {} attestations",
            artifact::MAX_REFERRERS
        )));
    }
    let mut found = Vec::new();
    for layer in manifest.layers() {
        if layer.media_type().to_string() != artifact::DSSE_MEDIA_TYPE {
            continue;
        }
        let notes = layer.annotations().clone().unwrap_or_default();
        let Some(kind) = notes
            .get(artifact::ATTESTATION_KIND)
            .and_then(|k| AttestationKind::parse(k))
        else {
            continue;
        };
        found.push(FetchedAttestation {
            kind,
            name: notes
                .get(artifact::ATTESTATION_NAME)
                .cloned()
                .unwrap_or_default(),
            envelope: read_attestation_blob(session, layer, budget).await?,
            source: format!("cosign {tag}"),
        });
    }
    Ok(found)
}

fn layer_descriptor(output: &OutputLayer) -> Result<Descriptor> {
    serde_json::from_value(artifact::descriptor_json(
        artifact::OUTPUT_MEDIA_TYPE,
        &output.sha256,
        output.size,
    ))
    .map_err(|e| RunnerError::Internal(format!("a descriptor: {e}")))
}

/// Reads every output layer and checks it against its digest, keeping nothing: the bytes
/// the registry serves are the ones the manifest (and so the provenance) names.
pub async fn check_layers(session: &Session, outputs: &[OutputLayer]) -> Result<()> {
    let mut checked = HashSet::new();
    for output in outputs {
        if checked.insert(output.sha256.clone()) {
            session
                .fetch_blob_into(&layer_descriptor(output)?, &mut tokio::io::sink())
                .await
                .map_err(|e| layer_error(output, e))?;
        }
    }
    Ok(())
}

/// Downloads every output into `dir` (which the caller created empty), each checked
/// against its digest, with its executable bit. Nothing already in `dir` is followed or
/// overwritten: a directory on the way that is a symlink or a file, or a file that
/// exists, is an error (someone else wrote into `dir` meanwhile).
pub async fn download(session: &Session, outputs: &[OutputLayer], dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for output in outputs {
        let mut parent = dir.to_path_buf();
        let mut components: Vec<&str> = output.path.split('/').collect();
        let name = components.pop().unwrap_or_default();
        for component in components {
            parent.push(component);
            match std::fs::symlink_metadata(&parent) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => return Err(appeared(output)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir(&parent)
                    .map_err(RunnerError::io_path("creating", &parent))?,
                Err(e) => return Err(RunnerError::io_path("reading", &parent)(e)),
            }
        }
        let dest = parent.join(name);
        let mode = if output.executable { 0o755 } else { 0o644 };
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&dest)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => appeared(output),
                _ => RunnerError::io_path("creating", &dest)(e),
            })?;
        session
            .fetch_blob_into(&layer_descriptor(output)?, &mut file)
            .await
            .map_err(|e| layer_error(output, e))?;
        file.sync_all()
            .await
            .map_err(RunnerError::io_path("syncing", &dest))?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .await
            .map_err(RunnerError::io_path("setting the mode of", &dest))?;
    }
    Ok(())
}

fn appeared(output: &OutputLayer) -> RunnerError {
    RunnerError::FailedPrecondition(format!(
        "output {:?}: something else appeared on its path in the output directory",
        output.path
    ))
}

fn layer_error(output: &OutputLayer, err: RunnerError) -> RunnerError {
    match err {
        RunnerError::FailedPrecondition(message) => {
            RunnerError::FailedPrecondition(format!("output {}: {message}", output.path))
        }
        RunnerError::Unavailable(message) => {
            RunnerError::Unavailable(format!("output {}: {message}", output.path))
        }
        other => other,
    }
}
