//! Verification of SLSA v1 provenance in a DSSE envelope against the
//! runner's public keys, the artifacts at hand and a policy.
//!
//! Checks, in order (a failed signature stops there: nothing in an
//! unauthenticated payload is worth reporting):
//! 1. the envelope's payloadType is `application/vnd.in-toto+json` and a
//!    signature over the DSSE PAE is valid for one of the trusted keys;
//! 2. the payload is an in-toto Statement v1 (`_type`) with predicateType
//!    `https://slsa.dev/provenance/v1`;
//! 3. a key that made a valid signature was inside its validity window at
//!    the statement's `runDetails.metadata.finishedOn` (a key rotated out
//!    before the build finished cannot vouch for it);
//! 4. every artifact's sha256 is the sha256 of a subject (by digest; the
//!    subject's name is reported);
//! 5. the policy.
//!
//! # Policy file (TOML)
//!
//! ```toml
//! # Required: builder ids (runDetails.builder.id) accepted, exactly.
//! allowed_builder_ids = ["kiln://buildhost"]
//! # Optional: images accepted, by digest (a built image's tree digest, an
//! # imported image's manifest digest) or by name and digest. Absent = any
//! # pinned image.
//! allowed_images = ["sha256:3b0c...64 hex", "debian@sha256:9f2a...64 hex"]
//! # Default false: an unpinned image (the `host` image) fails.
//! allow_unpinned_images = false
//! # Default false: a build that had network access fails. Network access
//! # is read from internalParameters.network (Kiln's buildType) and from
//! # every externalParameters.steps[].allow_net; if the statement does not
//! # say, that counts as network access.
//! allow_network = false
//! # Default []: steps that must have a link among runDetails.byproducts.
//! required_steps = ["compile", "test"]
//! ```
//!
//! Unknown keys are errors. Image and network rules are defined for Kiln's
//! buildType only; a statement of another buildType fails them.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::dsse::{self, IN_TOTO_PAYLOAD_TYPE};
use crate::keyring::{parse_time, TrustedKey};
use crate::slsa::{Statement, KILN_BUILD_TYPE, SLSA_PROVENANCE_V1, STATEMENT_TYPE};
use crate::{hash, ProvenanceError};

/// A verification policy; see the module docs for the file format.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Policy {
    /// `None` only when built in code without a policy file: any builder.
    pub allowed_builder_ids: Option<Vec<String>>,
    /// `sha256:<hex>` or `<name>@sha256:<hex>` image digests; `None` = any pinned image.
    pub allowed_images: Option<Vec<String>>,
    pub allow_unpinned_images: bool,
    pub allow_network: bool,
    pub required_steps: Vec<String>,
}

/// The file form: `allowed_builder_ids` is required there.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    allowed_builder_ids: Vec<String>,
    #[serde(default)]
    allowed_images: Option<Vec<String>>,
    #[serde(default)]
    allow_unpinned_images: bool,
    #[serde(default)]
    allow_network: bool,
    #[serde(default)]
    required_steps: Vec<String>,
}

impl Policy {
    /// Parse a policy file. Unknown keys, wrong types, an empty
    /// `allowed_builder_ids` and malformed image digests are errors.
    pub fn from_toml(text: &str) -> Result<Self, ProvenanceError> {
        let f: PolicyFile =
            toml::from_str(text).map_err(|e| ProvenanceError::Format(format!("policy: {e}")))?;
        if f.allowed_builder_ids.is_empty() {
            return Err(ProvenanceError::Format(
                "policy: allowed_builder_ids is empty: no provenance could pass".into(),
            ));
        }
        for img in f.allowed_images.iter().flatten() {
            let digest =
                img.split_once('@').map_or(
                    img.as_str(),
                    |(name, digest)| {
                        if name.is_empty() {
                            ""
                        } else {
                            digest
                        }
                    },
                );
            let ok = digest
                .strip_prefix("sha256:")
                .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            if !ok {
                return Err(ProvenanceError::Format(format!(
                    "policy: allowed_images entry {img:?} is not sha256:<64 hex digits> or NAME@sha256:<64 hex digits>"
                )));
            }
        }
        Ok(Policy {
            allowed_builder_ids: Some(f.allowed_builder_ids),
            allowed_images: f
                .allowed_images
                .map(|v| v.into_iter().map(|s| s.to_ascii_lowercase()).collect()),
            allow_unpinned_images: f.allow_unpinned_images,
            allow_network: f.allow_network,
            required_steps: f.required_steps,
        })
    }
}

/// An artifact to check against the subjects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Artifact {
    /// For messages (usually the path given on the command line).
    pub name: String,
    pub sha256: String,
}

impl Artifact {
    pub fn from_bytes(name: impl Into<String>, bytes: &[u8]) -> Self {
        Artifact {
            name: name.into(),
            sha256: hash::sha256_bytes(bytes),
        }
    }

    /// Hash the regular file at `path` (streamed; symlinks refused).
    pub fn from_path(path: &Path) -> Result<Self, ProvenanceError> {
        Ok(Artifact {
            name: path.display().to_string(),
            sha256: hash::sha256_file(path)?,
        })
    }
}

/// One artifact's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArtifactMatch {
    pub name: String,
    pub sha256: String,
    /// Name of the subject with this digest, if any.
    pub subject: Option<String>,
}

/// The outcome of [`verify_provenance`]; `--json` prints [`Verdict::to_json`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub passed: bool,
    /// Why it failed; empty when it passed.
    pub reasons: Vec<String>,
    /// keyids of the trusted keys with a valid signature.
    pub signed_by: Vec<String>,
    pub builder_id: Option<String>,
    pub build_type: Option<String>,
    pub invocation_id: Option<String>,
    pub finished_on: Option<String>,
    pub artifacts: Vec<ArtifactMatch>,
}

impl Verdict {
    fn new() -> Self {
        Verdict {
            passed: false,
            reasons: Vec::new(),
            signed_by: Vec::new(),
            builder_id: None,
            build_type: None,
            invocation_id: None,
            finished_on: None,
            artifacts: Vec::new(),
        }
    }

    fn fail(mut self, reason: impl Into<String>) -> Self {
        self.reasons.push(reason.into());
        self.passed = false;
        self
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// A short human verdict: "PASS ..." or "FAIL: reason; reason".
    pub fn summary(&self) -> String {
        if self.passed {
            format!(
                "PASS: {} artifact(s) built by {} (invocation {}), signed by {}",
                self.artifacts.len(),
                self.builder_id.as_deref().unwrap_or("?"),
                self.invocation_id.as_deref().unwrap_or("?"),
                self.signed_by.join(", ")
            )
        } else {
            format!("FAIL: {}", self.reasons.join("; "))
        }
    }
}

/// Verify DSSE provenance `envelope` (JSON bytes). Never panics or errors:
/// every problem is a reason in a failing verdict.
pub fn verify_provenance(
    envelope: &[u8],
    keys: &[TrustedKey],
    artifacts: &[Artifact],
    policy: &Policy,
) -> Verdict {
    let mut v = Verdict::new();
    let env: Value = match serde_json::from_slice(envelope) {
        Ok(e) => e,
        Err(e) => return v.fail(format!("envelope is not JSON: {e}")),
    };
    // 1. Signature (PAE over the envelope's own payloadType) and type.
    let public: Vec<_> = keys.iter().map(|k| k.key).collect();
    let verified = match dsse::verify_envelope(&env, &public) {
        Ok(x) => x,
        Err(e) => return v.fail(format!("signature: {e}")),
    };
    v.signed_by = verified.signed_by.clone();
    if verified.payload_type != IN_TOTO_PAYLOAD_TYPE {
        return v.fail(format!(
            "payloadType is {:?}, expected {IN_TOTO_PAYLOAD_TYPE:?}",
            verified.payload_type
        ));
    }
    // 2. Statement shape.
    let raw: Value = match serde_json::from_slice(&verified.payload) {
        Ok(x) => x,
        Err(e) => return v.fail(format!("payload is not JSON: {e}")),
    };
    if raw.get("_type").and_then(Value::as_str) != Some(STATEMENT_TYPE) {
        return v.fail(format!("statement _type is not {STATEMENT_TYPE:?}"));
    }
    if raw.get("predicateType").and_then(Value::as_str) != Some(SLSA_PROVENANCE_V1) {
        return v.fail(format!("predicateType is not {SLSA_PROVENANCE_V1:?}"));
    }
    let st: Statement = match serde_json::from_value(raw) {
        Ok(x) => x,
        Err(e) => return v.fail(format!("not SLSA v1 provenance: {e}")),
    };
    let rd = &st.predicate.run_details;
    let bd = &st.predicate.build_definition;
    v.builder_id = Some(rd.builder.id.clone());
    v.build_type = Some(bd.build_type.clone());
    let meta = rd.metadata.as_ref();
    v.invocation_id = meta.and_then(|m| m.invocation_id.clone());
    v.finished_on = meta.and_then(|m| m.finished_on.clone());

    // 3. Key validity window at finishedOn.
    match v.finished_on.as_deref().map(parse_time) {
        None => {
            v = v.fail(
                "no runDetails.metadata.finishedOn: the signing key's validity cannot be checked",
            );
        }
        Some(Err(e)) => v = v.fail(format!("finishedOn: {e}")),
        Some(Ok(t)) => {
            let in_window = keys
                .iter()
                .filter(|k| verified.signed_by.contains(&k.keyid()))
                .any(|k| k.valid_at(t));
            if !in_window {
                v = v.fail(format!(
                    "signed by key(s) {} that were not valid at finishedOn {}",
                    verified.signed_by.join(", "),
                    crate::keyring::fmt_time(t)
                ));
            }
        }
    }

    // 4. Artifacts are subjects.
    if artifacts.is_empty() {
        v = v.fail("no artifacts given to check against the subjects");
    }
    for a in artifacts {
        let subject = st
            .subject
            .iter()
            .find(|s| s.digest.get("sha256") == Some(&a.sha256.to_ascii_lowercase()))
            .map(|s| s.name.clone().unwrap_or_else(|| "_".into()));
        if subject.is_none() {
            v.reasons.push(format!(
                "artifact {} (sha256 {}) is not a subject of the provenance",
                a.name, a.sha256
            ));
        }
        v.artifacts.push(ArtifactMatch {
            name: a.name.clone(),
            sha256: a.sha256.clone(),
            subject,
        });
    }

    // 5. Policy.
    let policy_reasons = check_policy(&st, policy);
    v.reasons.extend(policy_reasons);
    v.passed = v.reasons.is_empty();
    v
}

fn check_policy(st: &Statement, policy: &Policy) -> Vec<String> {
    let mut reasons = Vec::new();
    let bd = &st.predicate.build_definition;
    let rd = &st.predicate.run_details;
    if let Some(allowed) = &policy.allowed_builder_ids {
        if !allowed.contains(&rd.builder.id) {
            reasons.push(format!(
                "builder id {:?} is not in allowed_builder_ids",
                rd.builder.id
            ));
        }
    }
    if bd.build_type != KILN_BUILD_TYPE {
        reasons.push(format!(
            "buildType {:?} is not Kiln's {KILN_BUILD_TYPE:?}: image and network rules cannot be evaluated",
            bd.build_type
        ));
        return reasons;
    }

    // Images.
    let images: Vec<_> = bd
        .resolved_dependencies
        .iter()
        .filter(|d| d.annotation_str("kind") == Some("image"))
        .collect();
    if images.is_empty() {
        reasons.push("no image among resolvedDependencies".into());
    }
    for img in images {
        let name = img.name.as_deref().unwrap_or("?");
        let pinned = img
            .annotations
            .as_ref()
            .and_then(|a| a.get("pinned"))
            .and_then(Value::as_bool)
            == Some(true);
        match img.digest.get("sha256").filter(|_| pinned) {
            None => {
                if !policy.allow_unpinned_images {
                    reasons.push(format!(
                        "image {name:?} is not pinned by digest and allow_unpinned_images is false"
                    ));
                }
            }
            Some(d) => {
                let id = format!("sha256:{}", d.to_ascii_lowercase());
                if let Some(allowed) = &policy.allowed_images {
                    let pinned_name = format!("{}@{id}", name.to_ascii_lowercase());
                    if !allowed.contains(&id) && !allowed.contains(&pinned_name) {
                        reasons.push(format!("image {name:?} ({id}) is not in allowed_images"));
                    }
                }
            }
        }
    }

    // Network.
    if !policy.allow_network {
        match network_use(st) {
            Some(false) => {}
            Some(true) => reasons.push("the build had network access and allow_network is false".into()),
            None => reasons.push(
                "the statement does not record network access (internalParameters.network) and allow_network is false"
                    .into(),
            ),
        }
    }

    // Required steps.
    for step in &policy.required_steps {
        let present = rd.byproducts.iter().any(|b| {
            b.annotation_str("kind") == Some("link") && b.annotation_str("step") == Some(step)
        });
        if !present {
            reasons.push(format!(
                "required step {step:?} has no link among byproducts"
            ));
        }
    }
    reasons
}

/// Some(true) if any record says the build could reach the network,
/// Some(false) if Kiln's record says it could not, None if unrecorded.
fn network_use(st: &Statement) -> Option<bool> {
    let bd = &st.predicate.build_definition;
    let nonempty = |v: Option<&Value>| match v {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        // Anything else (a bool true, a string) is taken as "allowed".
        Some(Value::Bool(b)) => *b,
        Some(_) => true,
    };
    let steps_allow = bd
        .external_parameters
        .get("steps")
        .and_then(Value::as_array)
        .is_some_and(|steps| {
            steps
                .iter()
                .any(|s| nonempty(s.get("allow_net")) || nonempty(s.get("allowNet")))
        });
    let recorded = bd
        .internal_parameters
        .as_ref()
        .and_then(|ip| ip.get("network"))?;
    let allowed = match recorded.get("allowed") {
        Some(Value::Bool(b)) => *b,
        // A record of another shape is not understood: assume access.
        _ => true,
    };
    Some(allowed || nonempty(recorded.get("destinations")) || steps_allow)
}

#[cfg(test)]
mod tests;
