//! How a job is laid out in a registry (see docs/REGISTRY.md):
//!
//! - the **artifact**: one OCI image manifest, `artifactType`
//!   `application/vnd.kiln.artifact.v1`, the empty config, one layer per output (sorted by
//!   path; the path in `org.opencontainers.image.title`, the executable bit in
//!   `dev.kiln.output.executable`);
//! - one **referrer** per attestation (the SLSA provenance, each step's link, the image's
//!   SBOM): an OCI 1.1 manifest whose `subject` is the artifact, `artifactType` the
//!   Sigstore bundle type and one layer, the bundle around the attestation's DSSE
//!   envelope; listed in the referrers tag schema's index (`sha256-<hex>`) for registries
//!   without the referrers API;
//! - cosign's attestation tag `sha256-<hex>.att`: one manifest whose layers are the DSSE
//!   envelopes themselves (`application/vnd.dsse.envelope.v1+json`, annotated with their
//!   `predicateType`).

use std::collections::BTreeMap;

use oci_spec::image::{Descriptor, ImageManifest};
use serde_json::{json, Value};

use crate::error::{Result, RunnerError};

pub const ARTIFACT_TYPE: &str = "application/vnd.kiln.artifact.v1";
pub const OUTPUT_MEDIA_TYPE: &str = "application/vnd.kiln.output.v1";
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// `{}`, the OCI empty descriptor's content.
pub const EMPTY_JSON: &[u8] = b"{}";
pub const EMPTY_DIGEST_HEX: &str =
    "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
pub const DSSE_MEDIA_TYPE: &str = "application/vnd.dsse.envelope.v1+json";
pub use provenance::bundle::BUNDLE_MEDIA_TYPE;

pub const TITLE: &str = "org.opencontainers.image.title";
pub const CREATED: &str = "org.opencontainers.image.created";
pub const EXECUTABLE: &str = "dev.kiln.output.executable";
pub const JOB: &str = "dev.kiln.job";
/// What an attestation is: `provenance`, `link` or `sbom`.
pub const ATTESTATION_KIND: &str = "dev.kiln.attestation";
/// Which one: the step of a link, the image of an SBOM.
pub const ATTESTATION_NAME: &str = "dev.kiln.attestation.name";
/// The statement's predicate type, as cosign and Sigstore annotate it.
pub const PREDICATE_TYPE: &str = "dev.sigstore.bundle.predicateType";
pub const COSIGN_PREDICATE_TYPE: &str = "predicateType";

/// The most layers (outputs) and referrers an artifact read back may have.
pub const MAX_LAYERS: usize = 4096;
pub const MAX_REFERRERS: usize = 1024;

/// One output as a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLayer {
    pub path: String,
    pub sha256: String,
    pub size: u64,
    pub executable: bool,
}

/// What an attestation is, as its referrer is annotated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttestationKind {
    Provenance,
    Link,
    Sbom,
}

impl AttestationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AttestationKind::Provenance => "provenance",
            AttestationKind::Link => "link",
            AttestationKind::Sbom => "sbom",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "provenance" => Some(AttestationKind::Provenance),
            "link" => Some(AttestationKind::Link),
            "sbom" => Some(AttestationKind::Sbom),
            _ => None,
        }
    }
}

pub fn descriptor_json(media_type: &str, hex: &str, size: u64) -> Value {
    json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": size})
}

fn empty_config() -> Value {
    let mut config = descriptor_json(EMPTY_MEDIA_TYPE, EMPTY_DIGEST_HEX, 2);
    config["data"] = json!("e30=");
    config
}

/// The artifact manifest's bytes for `outputs` (sorted here, so a job always gives the
/// same manifest and so the same digest).
pub fn artifact_manifest(
    outputs: &[OutputLayer],
    annotations: &BTreeMap<String, String>,
) -> Vec<u8> {
    let mut sorted: Vec<&OutputLayer> = outputs.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let layers: Vec<Value> = sorted
        .iter()
        .map(|o| {
            let mut layer = descriptor_json(OUTPUT_MEDIA_TYPE, &o.sha256, o.size);
            let mut notes = serde_json::Map::new();
            notes.insert(TITLE.into(), json!(o.path));
            if o.executable {
                notes.insert(EXECUTABLE.into(), json!("true"));
            }
            layer["annotations"] = Value::Object(notes);
            layer
        })
        .collect();
    document(json!({
        "schemaVersion": 2,
        "mediaType": crate::images::oci::OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": empty_config(),
        "layers": layers,
        "annotations": annotations,
    }))
}

/// A referrer manifest: one layer (`media_type`, the blob `hex`/`size`) about `subject`.
pub fn referrer_manifest(
    artifact_type: &str,
    layer: Value,
    subject: Value,
    annotations: &BTreeMap<String, String>,
) -> Vec<u8> {
    document(json!({
        "schemaVersion": 2,
        "mediaType": crate::images::oci::OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": empty_config(),
        "layers": [layer],
        "subject": subject,
        "annotations": annotations,
    }))
}

/// cosign's `.att` manifest: the envelopes as layers. Its config is a minimal image config
/// listing them, as cosign writes it.
pub fn cosign_manifest(config: Value, layers: Vec<Value>) -> Vec<u8> {
    document(json!({
        "schemaVersion": 2,
        "mediaType": crate::images::oci::OCI_MANIFEST,
        "config": config,
        "layers": layers,
    }))
}

/// An image index (the referrers tag schema's list).
pub fn index(manifests: &[Value]) -> Vec<u8> {
    document(json!({
        "schemaVersion": 2,
        "mediaType": crate::images::oci::OCI_INDEX,
        "manifests": manifests,
    }))
}

fn document(value: Value) -> Vec<u8> {
    // serde_json writes a Value's maps in key order: the same document every time.
    value.to_string().into_bytes()
}

/// The referrers tag schema's tag for a subject: `sha256-<hex>`.
pub fn referrers_tag(subject_hex: &str) -> String {
    format!("sha256-{subject_hex}")
}

/// cosign's attestation tag for a subject: `sha256-<hex>.att`.
pub fn cosign_tag(subject_hex: &str) -> String {
    format!("sha256-{subject_hex}.att")
}

/// The outputs an artifact manifest read back from a registry lists, checked: it is a Kiln
/// artifact, its layers are bounded in number, each names a safe relative path, once.
pub fn read_artifact(manifest: &ImageManifest) -> Result<Vec<OutputLayer>> {
    let bad = |why: String| RunnerError::FailedPrecondition(format!("the artifact {why}"));
    let artifact_type = manifest.artifact_type().as_ref().map(ToString::to_string);
    if artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
        return Err(bad(format!(
            "is not a Kiln artifact: its artifactType is {artifact_type:?}, not {ARTIFACT_TYPE}"
        )));
    }
    if manifest.layers().len() > MAX_LAYERS {
        return Err(bad(format!("has more than {MAX_LAYERS} layers")));
    }
    let mut seen = std::collections::HashSet::new();
    let mut outputs = Vec::new();
    for layer in manifest.layers() {
        let hex = crate::images::oci::sha256_hex(layer)?.to_string();
        let annotations = layer.annotations().clone().unwrap_or_default();
        let path = annotations
            .get(TITLE)
            .ok_or_else(|| bad(format!("layer sha256:{hex} names no path ({TITLE})")))?;
        crate::spec::check_workspace_path("artifact layer", path)
            .map_err(|e| bad(e.to_string()))?;
        if !seen.insert(path.clone()) {
            return Err(bad(format!("names {path:?} twice")));
        }
        outputs.push(OutputLayer {
            path: path.clone(),
            sha256: hex,
            size: layer.size(),
            executable: annotations.get(EXECUTABLE).map(String::as_str) == Some("true"),
        });
    }
    if outputs.is_empty() {
        return Err(bad("has no layers".into()));
    }
    Ok(outputs)
}

/// Whether a path's layer leads to a file under another's: `a` and `a/b` cannot both be
/// files of one directory tree.
pub fn clashing_paths(outputs: &[OutputLayer]) -> Option<(String, String)> {
    let paths: std::collections::HashSet<&str> = outputs.iter().map(|o| o.path.as_str()).collect();
    for output in outputs {
        let mut parent = output.path.as_str();
        while let Some((head, _)) = parent.rsplit_once('/') {
            if paths.contains(head) {
                return Some((head.to_string(), output.path.clone()));
            }
            parent = head;
        }
    }
    None
}

/// A descriptor as JSON (for a subject or an index entry).
pub fn descriptor_value(descriptor: &Descriptor) -> Result<Value> {
    serde_json::to_value(descriptor)
        .map_err(|e| RunnerError::Internal(format!("a descriptor: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn the_empty_descriptor_is_the_hash_of_its_content() {
        assert_eq!(hex::encode(Sha256::digest(EMPTY_JSON)), EMPTY_DIGEST_HEX);
    }

    #[test]
    fn an_artifact_reads_back_as_its_outputs_sorted() {
        let outputs = vec![
            OutputLayer {
                path: "out/b".into(),
                sha256: "bb".repeat(32),
                size: 2,
                executable: true,
            },
            OutputLayer {
                path: "out/a".into(),
                sha256: "aa".repeat(32),
                size: 1,
                executable: false,
            },
        ];
        let bytes = artifact_manifest(&outputs, &BTreeMap::new());
        let manifest: ImageManifest = serde_json::from_slice(&bytes).unwrap();
        let read = read_artifact(&manifest).unwrap();
        assert_eq!(read, vec![outputs[1].clone(), outputs[0].clone()]);
        assert_eq!(bytes, artifact_manifest(&read, &BTreeMap::new()));
    }

    #[test]
    fn a_registry_s_artifact_with_unsafe_or_repeated_paths_is_refused() {
        for paths in [
            vec!["../etc/passwd"],
            vec!["/abs"],
            vec!["a", "a"],
            vec!["a/./b"],
            vec![""],
        ] {
            let outputs: Vec<OutputLayer> = paths
                .iter()
                .map(|p| OutputLayer {
                    path: p.to_string(),
                    sha256: "aa".repeat(32),
                    size: 1,
                    executable: false,
                })
                .collect();
            let manifest: ImageManifest =
                serde_json::from_slice(&artifact_manifest(&outputs, &BTreeMap::new())).unwrap();
            assert!(read_artifact(&manifest).is_err(), "{paths:?}");
        }
        let clash = vec![
            OutputLayer {
                path: "a".into(),
                sha256: "aa".repeat(32),
                size: 1,
                executable: false,
            },
            OutputLayer {
                path: "a/b".into(),
                sha256: "aa".repeat(32),
                size: 1,
                executable: false,
            },
        ];
        assert_eq!(clashing_paths(&clash), Some(("a".into(), "a/b".into())));
    }
}
