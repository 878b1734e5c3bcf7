//! SLSA v1 provenance: an in-toto Statement v1 whose predicate is
//! `https://slsa.dev/provenance/v1`, signed as a DSSE envelope with payload
//! type `application/vnd.in-toto+json`.
//!
//! Field names follow the SLSA v1.0 provenance spec and the in-toto
//! attestation v1 Statement / ResourceDescriptor specs exactly.
//!
//! # Kiln's buildType, [`KILN_BUILD_TYPE`] (`https://kiln.dev/buildtypes/job/v1`)
//!
//! - `externalParameters`: the job spec as submitted (secrets never
//!   included; the caller removes them). Steps, if present, are under
//!   `steps`, each with its `allow_net` list of destinations.
//! - `internalParameters.network`: `{"allowed": bool, "destinations": [..]}`,
//!   the network access the runner actually granted to any step. Always
//!   written by [`ProvenanceInput::statement`]; a verifier treats its
//!   absence as "unknown" (see [`crate::verify::provenance`]).
//! - `resolvedDependencies`: the image, with `annotations.kind = "image"`,
//!   `annotations.pinned` and, when pinned, `digest.sha256` = the image tree
//!   digest ([`ResourceDescriptor::image`]; the `host` image is unpinned); an
//!   imported OCI image has `uri` = its package URL
//!   (`pkg:oci/NAME@sha256%3AHEX?arch=ARCH`), `digest.sha256` = its manifest
//!   digest, and `annotations.treeDigest` and `annotations.source` (how it
//!   was imported: `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]` or
//!   `docker-archive:FILE`, with the file's own name only)
//!   ([`ResourceDescriptor::oci_image`]); a pulled one has `uri` =
//!   `oci://REGISTRY/REPO@sha256:HEX` (where it was pulled from, by the manifest
//!   digest it runs) and `annotations.source` = `REGISTRY/REPO@sha256:HEX`
//!   ([`ResourceDescriptor::pulled_oci_image`]); the runner adds
//!   `annotations.sbom = {"sha256": ..}`, the digest of the image's signed SBOM
//!   attestation (predicateType `https://cyclonedx.org/bom`);
//!   every input with `annotations.kind = "input"`
//!   ([`ResourceDescriptor::input`]).
//! - `runDetails.byproducts`: one entry per step link, `name` = the link
//!   file name, `digest.sha256` = digest of the link file,
//!   `annotations = {"kind": "link", "step": <step name>}`
//!   ([`ResourceDescriptor::step_link`]).
//! - `runDetails.metadata`: `invocationId` (the job id), `startedOn`,
//!   `finishedOn` (RFC 3339, UTC).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use time::OffsetDateTime;

use crate::dsse::{sign_envelope, IN_TOTO_PAYLOAD_TYPE};
use crate::keyring::fmt_time;
use crate::keys::SigningKey;
use crate::ProvenanceError;

/// `_type` of an in-toto Statement v1.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// `predicateType` of SLSA provenance v1.
pub const SLSA_PROVENANCE_V1: &str = "https://slsa.dev/provenance/v1";
/// Kiln's buildType: a job of steps run by the Kiln runner (module docs).
pub const KILN_BUILD_TYPE: &str = "https://kiln.dev/buildtypes/job/v1";

/// An in-toto ResourceDescriptor. At least one of `uri`, `digest`, `content`
/// is set; unset fields are omitted from the JSON.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceDescriptor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub digest: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// base64 in JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<Map<String, Value>>,
}

impl ResourceDescriptor {
    /// `{"name", "digest": {"sha256"}}`: a subject or any file.
    pub fn sha256(name: impl Into<String>, sha256_hex: impl Into<String>) -> Self {
        ResourceDescriptor {
            name: Some(name.into()),
            digest: [("sha256".to_string(), sha256_hex.into())].into(),
            ..Default::default()
        }
    }

    /// The job's image: pinned with its tree digest, or unpinned (`host`).
    pub fn image(name: &str, tree_sha256: Option<&str>) -> Self {
        let mut annotations = Map::new();
        annotations.insert("kind".into(), "image".into());
        annotations.insert("pinned".into(), tree_sha256.is_some().into());
        ResourceDescriptor {
            uri: Some(format!("kiln-image:{name}")),
            digest: tree_sha256
                .map(|d| [("sha256".to_string(), d.to_string())].into())
                .unwrap_or_default(),
            name: Some(name.to_string()),
            annotations: Some(annotations),
            ..Default::default()
        }
    }

    /// An imported OCI image, pinned by its manifest digest.
    pub fn oci_image(
        name: &str,
        manifest_sha256: &str,
        arch: &str,
        tree_sha256: &str,
        source: &str,
    ) -> Self {
        let mut annotations = Map::new();
        annotations.insert("kind".into(), "image".into());
        annotations.insert("pinned".into(), true.into());
        annotations.insert("treeDigest".into(), json!({"sha256": tree_sha256}));
        annotations.insert("source".into(), source.into());
        ResourceDescriptor {
            // The package URL of an OCI image (purl's `oci` type): no registry for an
            // imported one, so no repository_url qualifier.
            uri: Some(format!(
                "pkg:oci/{name}@sha256%3A{manifest_sha256}?arch={arch}"
            )),
            digest: [("sha256".to_string(), manifest_sha256.to_string())].into(),
            name: Some(name.to_string()),
            annotations: Some(annotations),
            ..Default::default()
        }
    }

    /// An OCI image pulled from a registry (`source` = `REGISTRY/REPO@sha256:HEX`): as
    /// [`Self::oci_image`], but its `uri` says where it came from, `oci://` and the source.
    pub fn pulled_oci_image(
        name: &str,
        manifest_sha256: &str,
        arch: &str,
        tree_sha256: &str,
        source: &str,
    ) -> Self {
        let mut descriptor = Self::oci_image(name, manifest_sha256, arch, tree_sha256, source);
        descriptor.uri = Some(format!("oci://{source}"));
        descriptor
    }

    /// An input file placed in the workspace.
    pub fn input(path: &str, sha256_hex: &str) -> Self {
        let mut d = Self::sha256(path, sha256_hex);
        d.annotations = Some(Map::from_iter([("kind".to_string(), json!("input"))]));
        d
    }

    /// A step's link, as a byproduct.
    pub fn step_link(step: &str, link_file_name: &str, link_sha256: &str) -> Self {
        let mut d = Self::sha256(link_file_name, link_sha256);
        d.media_type = Some(IN_TOTO_PAYLOAD_TYPE.to_string());
        d.annotations = Some(Map::from_iter([
            ("kind".to_string(), json!("link")),
            ("step".to_string(), json!(step)),
        ]));
        d
    }

    /// `annotations[key]` as a string, if it is one.
    pub fn annotation_str(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key)?.as_str()
    }
}

/// An in-toto Statement v1 carrying SLSA provenance v1.
/// Deserialization ignores unknown fields, as both specs require of
/// consumers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub type_: String,
    pub subject: Vec<ResourceDescriptor>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub predicate: Provenance,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Provenance {
    pub build_definition: BuildDefinition,
    pub run_details: RunDetails,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildDefinition {
    pub build_type: String,
    pub external_parameters: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resolved_dependencies: Vec<ResourceDescriptor>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunDetails {
    pub builder: Builder,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BuildMetadata>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub byproducts: Vec<ResourceDescriptor>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Builder {
    pub id: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub version: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub builder_dependencies: Vec<ResourceDescriptor>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invocation_id: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_on: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_on: Option<String>,
}

/// What the runner knows about a finished job, in plain Rust.
#[derive(Debug, Clone)]
pub struct ProvenanceInput {
    /// Outputs: `ResourceDescriptor::sha256(path, hex)`; at least one.
    pub subjects: Vec<ResourceDescriptor>,
    /// Usually [`KILN_BUILD_TYPE`].
    pub build_type: String,
    /// The job spec as submitted, secrets removed.
    pub external_parameters: Value,
    /// Extra internal parameters; `network` is added from
    /// `network_destinations` (and must not be set here).
    pub internal_parameters: Map<String, Value>,
    /// Destinations any step was allowed to reach; empty = no network.
    pub network_destinations: Vec<String>,
    /// The image and every input.
    pub resolved_dependencies: Vec<ResourceDescriptor>,
    /// See [`default_builder_id`].
    pub builder_id: String,
    /// e.g. `{"kiln": "0.1.0"}`.
    pub builder_version: BTreeMap<String, String>,
    /// The job id.
    pub invocation_id: String,
    pub started_on: OffsetDateTime,
    pub finished_on: OffsetDateTime,
    /// Step links: [`ResourceDescriptor::step_link`].
    pub byproducts: Vec<ResourceDescriptor>,
}

/// `kiln://<hostname>`: names the runner host. The hostname is read from
/// `/proc/sys/kernel/hostname` ("localhost" when unreadable).
pub fn default_builder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string());
    format!("kiln://{host}")
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_descriptor(what: &str, d: &ResourceDescriptor) -> Result<(), ProvenanceError> {
    if d.uri.is_none() && d.digest.is_empty() && d.content.is_none() {
        return Err(ProvenanceError::Format(format!(
            "{what}: a ResourceDescriptor needs a uri, digest or content"
        )));
    }
    if let Some(h) = d.digest.get("sha256") {
        if !is_sha256_hex(h) {
            return Err(ProvenanceError::Format(format!(
                "{what}: sha256 digest {h:?} is not 64 lowercase hex digits"
            )));
        }
    }
    Ok(())
}

impl ProvenanceInput {
    /// The Statement, after checking the input is well formed.
    pub fn statement(&self) -> Result<Statement, ProvenanceError> {
        if self.subjects.is_empty() {
            return Err(ProvenanceError::Format(
                "provenance needs at least one subject (a job output)".into(),
            ));
        }
        for s in &self.subjects {
            check_descriptor("subject", s)?;
            if !s.digest.contains_key("sha256") {
                return Err(ProvenanceError::Format(format!(
                    "subject {:?} has no sha256 digest",
                    s.name
                )));
            }
        }
        for d in &self.resolved_dependencies {
            check_descriptor("resolvedDependency", d)?;
        }
        for d in &self.byproducts {
            check_descriptor("byproduct", d)?;
        }
        if self.builder_id.is_empty() || self.invocation_id.is_empty() {
            return Err(ProvenanceError::Format(
                "builder id and invocation id must not be empty".into(),
            ));
        }
        if self.finished_on < self.started_on {
            return Err(ProvenanceError::Format(
                "finishedOn is before startedOn".into(),
            ));
        }
        if self.internal_parameters.contains_key("network") {
            return Err(ProvenanceError::Format(
                "internal_parameters.network is set from network_destinations".into(),
            ));
        }
        let mut internal = self.internal_parameters.clone();
        internal.insert(
            "network".into(),
            json!({
                "allowed": !self.network_destinations.is_empty(),
                "destinations": self.network_destinations,
            }),
        );
        Ok(Statement {
            type_: STATEMENT_TYPE.into(),
            subject: self.subjects.clone(),
            predicate_type: SLSA_PROVENANCE_V1.into(),
            predicate: Provenance {
                build_definition: BuildDefinition {
                    build_type: self.build_type.clone(),
                    external_parameters: self.external_parameters.clone(),
                    internal_parameters: Some(Value::Object(internal)),
                    resolved_dependencies: self.resolved_dependencies.clone(),
                },
                run_details: RunDetails {
                    builder: Builder {
                        id: self.builder_id.clone(),
                        version: self.builder_version.clone(),
                        builder_dependencies: Vec::new(),
                    },
                    metadata: Some(BuildMetadata {
                        invocation_id: Some(self.invocation_id.clone()),
                        started_on: Some(fmt_time(self.started_on)),
                        finished_on: Some(fmt_time(self.finished_on)),
                    }),
                    byproducts: self.byproducts.clone(),
                },
            },
        })
    }

    /// The DSSE envelope (JSON bytes) of the Statement, signed by `key`.
    pub fn sign(&self, key: &SigningKey) -> Result<Vec<u8>, ProvenanceError> {
        sign_statement(&self.statement()?, key)
    }
}

/// Serialize `statement` as the DSSE payload (compact JSON) and sign it with
/// payloadType `application/vnd.in-toto+json`; the signature carries the
/// key's keyid. Returns the envelope as pretty JSON bytes.
pub fn sign_statement(statement: &Statement, key: &SigningKey) -> Result<Vec<u8>, ProvenanceError> {
    let payload = serde_json::to_vec(statement)?;
    let envelope = sign_envelope(IN_TOTO_PAYLOAD_TYPE, &payload, key);
    let mut out = serde_json::to_vec_pretty(&envelope)?;
    out.push(b'\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::dsse::verify_envelope;
    use crate::hash::sha256_bytes;
    use time::macros::datetime;

    pub(crate) fn sample_input() -> ProvenanceInput {
        ProvenanceInput {
            subjects: vec![ResourceDescriptor::sha256(
                "out/hello",
                sha256_bytes(b"hello"),
            )],
            build_type: KILN_BUILD_TYPE.into(),
            external_parameters: json!({"name": "demo", "image": "busybox",
                "steps": [{"name": "compile", "argv": ["cc"], "allow_net": []}]}),
            internal_parameters: Map::new(),
            network_destinations: vec![],
            resolved_dependencies: vec![
                ResourceDescriptor::image("busybox", Some(&sha256_bytes(b"tree"))),
                ResourceDescriptor::input("src/hello.c", &sha256_bytes(b"int main")),
            ],
            builder_id: "kiln://buildhost".into(),
            builder_version: [("kiln".to_string(), "0.1.0".to_string())].into(),
            invocation_id: "job-1".into(),
            started_on: datetime!(2026-03-01 10:00:00 UTC),
            finished_on: datetime!(2026-03-01 10:00:05.25 UTC),
            byproducts: vec![ResourceDescriptor::step_link(
                "compile",
                "compile.0123abcd.link",
                &sha256_bytes(b"link"),
            )],
        }
    }

    #[test]
    fn statement_has_spec_field_names() {
        let st = sample_input().statement().unwrap();
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["_type"], STATEMENT_TYPE);
        assert_eq!(v["predicateType"], SLSA_PROVENANCE_V1);
        assert_eq!(v["subject"][0]["name"], "out/hello");
        assert_eq!(v["subject"][0]["digest"]["sha256"], sha256_bytes(b"hello"));
        let bd = &v["predicate"]["buildDefinition"];
        assert_eq!(bd["buildType"], KILN_BUILD_TYPE);
        assert_eq!(bd["externalParameters"]["image"], "busybox");
        assert_eq!(bd["internalParameters"]["network"]["allowed"], false);
        assert_eq!(
            bd["resolvedDependencies"][0]["annotations"]["kind"],
            "image"
        );
        assert_eq!(bd["resolvedDependencies"][0]["uri"], "kiln-image:busybox");
        let rd = &v["predicate"]["runDetails"];
        assert_eq!(rd["builder"]["id"], "kiln://buildhost");
        assert_eq!(rd["builder"]["version"]["kiln"], "0.1.0");
        assert_eq!(rd["metadata"]["invocationId"], "job-1");
        assert_eq!(rd["metadata"]["startedOn"], "2026-03-01T10:00:00Z");
        assert_eq!(rd["metadata"]["finishedOn"], "2026-03-01T10:00:05.25Z");
        assert_eq!(rd["byproducts"][0]["mediaType"], IN_TOTO_PAYLOAD_TYPE);
        assert_eq!(rd["byproducts"][0]["annotations"]["step"], "compile");
        // No empty optional fields are emitted.
        assert!(v["subject"][0].get("uri").is_none());
        assert!(rd["builder"].get("builderDependencies").is_none());
        // Round trip.
        let back: Statement = serde_json::from_value(v).unwrap();
        assert_eq!(back, st);
    }

    #[test]
    fn imported_image_is_pinned_by_its_manifest_digest() {
        let (manifest, tree) = (sha256_bytes(b"manifest"), sha256_bytes(b"tree"));
        let d = ResourceDescriptor::oci_image("debian", &manifest, "amd64", &tree, "oci:debian:12");
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(
            v["uri"],
            format!("pkg:oci/debian@sha256%3A{manifest}?arch=amd64")
        );
        assert_eq!(v["digest"], json!({"sha256": manifest}));
        assert_eq!(v["annotations"]["pinned"], true);
        assert_eq!(v["annotations"]["treeDigest"]["sha256"], tree);
        assert_eq!(d.annotation_str("source"), Some("oci:debian:12"));
        assert_eq!(d.annotation_str("kind"), Some("image"));
    }

    #[test]
    fn pulled_image_names_its_registry_and_digest() {
        let (manifest, tree) = (sha256_bytes(b"manifest"), sha256_bytes(b"tree"));
        let source = format!("registry.example.org/tools/gcc@sha256:{manifest}");
        let d = ResourceDescriptor::pulled_oci_image("gcc", &manifest, "amd64", &tree, &source);
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["uri"], format!("oci://{source}"));
        assert_eq!(v["digest"], json!({"sha256": manifest}));
        assert_eq!(v["annotations"]["treeDigest"]["sha256"], tree);
        assert_eq!(d.annotation_str("source"), Some(source.as_str()));
        assert_eq!(d.annotation_str("kind"), Some("image"));
    }

    #[test]
    fn unpinned_host_image() {
        let d = ResourceDescriptor::image("host", None);
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["annotations"]["pinned"], false);
        assert!(v.get("digest").is_none());
        assert_eq!(d.annotation_str("kind"), Some("image"));
    }

    #[test]
    fn envelope_verifies_and_carries_keyid() {
        let key = SigningKey::generate();
        let bytes = sample_input().sign(&key).unwrap();
        let env: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(env["payloadType"], IN_TOTO_PAYLOAD_TYPE);
        assert_eq!(env["signatures"][0]["keyid"], key.keyid());
        let v = verify_envelope(&env, &[key.public_key()]).unwrap();
        let st: Statement = serde_json::from_slice(&v.payload).unwrap();
        assert_eq!(st, sample_input().statement().unwrap());
    }

    #[test]
    fn bad_inputs_are_refused() {
        let mut i = sample_input();
        i.subjects.clear();
        assert!(i.statement().is_err());
        let mut i = sample_input();
        i.subjects[0].digest.insert("sha256".into(), "ABC".into());
        assert!(i.statement().is_err());
        let mut i = sample_input();
        i.finished_on = datetime!(2026-01-01 0:00 UTC);
        assert!(i.statement().is_err());
        let mut i = sample_input();
        i.internal_parameters.insert("network".into(), json!(false));
        assert!(i.statement().is_err());
        let mut i = sample_input();
        i.resolved_dependencies.push(ResourceDescriptor::default());
        assert!(i.statement().is_err());
    }
}
