//! The verdict on an artifact read back from a registry: `kiln verify --image` and
//! `kiln pull-artifact`. The SLSA provenance is judged exactly as `kiln verify
//! --provenance` judges it (signature, key validity, policy), with every layer of the
//! artifact as an artifact that must be a subject. Every provenance attached must pass (a
//! forged one makes the verdict fail, never pass), and every other attestation (links,
//! SBOM) must carry a trusted signature.

use provenance::keyring::TrustedKey;
use provenance::verify::provenance::{verify_provenance, Artifact, Policy, Verdict};
use serde::Serialize;
use serde_json::Value;

use super::artifact::AttestationKind;
use super::fetch::FetchedArtifact;

/// What was found and decided.
#[derive(Debug, Clone, Serialize)]
pub struct ImageVerdict {
    pub passed: bool,
    pub reasons: Vec<String>,
    /// `REGISTRY/REPO@sha256:HEX`.
    pub artifact: String,
    pub outputs: Vec<String>,
    /// One verdict per provenance attached.
    pub provenance: Vec<Verdict>,
    /// Each attestation, as `KIND NAME (SOURCE): ok` or `...: why not`.
    pub attestations: Vec<String>,
}

impl ImageVerdict {
    /// Lines for a person: what was checked, then PASS or FAIL with the reasons.
    pub fn summary(&self) -> String {
        let mut lines = vec![format!(
            "artifact {}: {} output(s)",
            self.artifact,
            self.outputs.len()
        )];
        lines.extend(self.attestations.iter().map(|a| format!("  {a}")));
        for verdict in &self.provenance {
            lines.push(format!("provenance: {}", verdict.summary()));
        }
        if self.passed {
            lines.push("PASS".into());
        } else {
            lines.push(format!("FAIL: {}", self.reasons.join("; ")));
        }
        // Output paths and reasons quote what the registry chose: no raw control
        // characters for the terminal.
        lines
            .iter()
            .map(|line| crate::cli::printable(line))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// Judges `fetched` (of `artifact`, `REGISTRY/REPO@sha256:HEX`) against the trusted keys and
/// the policy. The layers' bytes are checked against their digests separately.
pub fn judge(
    artifact: &str,
    fetched: &FetchedArtifact,
    keys: &[TrustedKey],
    policy: &Policy,
) -> ImageVerdict {
    let artifacts: Vec<Artifact> = fetched
        .outputs
        .iter()
        .map(|o| Artifact {
            name: o.path.clone(),
            sha256: o.sha256.clone(),
        })
        .collect();
    let public: Vec<_> = keys.iter().map(|k| k.key).collect();
    let mut verdict = ImageVerdict {
        passed: false,
        reasons: Vec::new(),
        artifact: artifact.to_string(),
        outputs: fetched.outputs.iter().map(|o| o.path.clone()).collect(),
        provenance: Vec::new(),
        attestations: Vec::new(),
    };
    for attestation in &fetched.attestations {
        let label = format!(
            "{} {} ({})",
            attestation.kind.as_str(),
            crate::cli::printable(&attestation.name),
            attestation.source
        );
        if attestation.kind == AttestationKind::Provenance {
            let mut checked = verify_provenance(&attestation.envelope, keys, &artifacts, policy);
            if checked.passed {
                // verify_provenance matches contents only; a layer's path is what the
                // artifact claims too, and a registry's manifest could rename outputs.
                let subjects = signed_subjects(&attestation.envelope, &public);
                for output in &fetched.outputs {
                    let named = subjects.iter().any(|(name, sha256)| {
                        *name == output.path && sha256.eq_ignore_ascii_case(&output.sha256)
                    });
                    if !named {
                        checked.passed = false;
                        checked.reasons.push(format!(
                            "output {:?} (sha256 {}) is not a subject of that name",
                            output.path, output.sha256
                        ));
                    }
                }
            }
            if checked.passed {
                verdict.attestations.push(format!("{label}: ok"));
            } else {
                verdict.attestations.push(format!("{label}: FAIL"));
                verdict.reasons.push(format!(
                    "provenance ({}): {}",
                    attestation.source,
                    checked.reasons.join("; ")
                ));
            }
            verdict.provenance.push(checked);
            continue;
        }
        let signed = serde_json::from_slice::<Value>(&attestation.envelope)
            .map_err(|e| e.to_string())
            .and_then(|envelope| {
                provenance::dsse::verify_envelope(&envelope, &public).map_err(|e| e.to_string())
            });
        match signed {
            Ok(_) => verdict.attestations.push(format!("{label}: ok")),
            Err(why) => {
                verdict.attestations.push(format!("{label}: FAIL"));
                verdict.reasons.push(format!("{label}: signature: {why}"));
            }
        }
    }
    if verdict.provenance.is_empty() {
        verdict
            .reasons
            .push("no SLSA provenance is attached to the artifact".into());
    }
    verdict.passed = verdict.reasons.is_empty();
    verdict
}

/// The `(name, sha256)` of each subject of a signed in-toto Statement (none if it is not
/// one, or not signed by `public`).
fn signed_subjects(envelope: &[u8], public: &[provenance::PublicKey]) -> Vec<(String, String)> {
    let Some(payload) = serde_json::from_slice::<Value>(envelope)
        .ok()
        .and_then(|e| provenance::dsse::verify_envelope(&e, public).ok())
        .map(|verified| verified.payload)
    else {
        return Vec::new();
    };
    let Ok(statement) = serde_json::from_slice::<provenance::slsa::Statement>(&payload) else {
        return Vec::new();
    };
    statement
        .subject
        .into_iter()
        .filter_map(|s| Some((s.name?, s.digest.get("sha256")?.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::registry::artifact::OutputLayer;
    use crate::registry::fetch::FetchedAttestation;
    use provenance::keys::SigningKey;
    use provenance::slsa::{ProvenanceInput, ResourceDescriptor, KILN_BUILD_TYPE};
    use serde_json::json;

    fn hex_of(byte: &str) -> String {
        byte.repeat(32)
    }

    /// A provenance signed by `key` whose subjects are `(path, sha256)`.
    fn provenance(key: &SigningKey, subjects: &[(&str, String)]) -> Vec<u8> {
        let now = time::OffsetDateTime::now_utc();
        ProvenanceInput {
            subjects: subjects
                .iter()
                .map(|(path, hex)| ResourceDescriptor::sha256(*path, hex.clone()))
                .collect(),
            build_type: KILN_BUILD_TYPE.into(),
            external_parameters: json!({"name": "demo", "image": "busybox",
                "steps": [{"name": "make", "argv": ["make"], "allow_net": []}]}),
            internal_parameters: Default::default(),
            network_destinations: vec![],
            resolved_dependencies: vec![ResourceDescriptor::image("busybox", None)],
            builder_id: "kiln://buildhost".into(),
            builder_version: Default::default(),
            invocation_id: "job-1".into(),
            started_on: now,
            finished_on: now,
            byproducts: vec![],
        }
        .sign(key)
        .unwrap()
    }

    fn artifact(outputs: &[(&str, String)], envelope: &[u8]) -> FetchedArtifact {
        FetchedArtifact {
            digest_hex: hex_of("cc"),
            outputs: outputs
                .iter()
                .map(|(path, hex)| OutputLayer {
                    path: path.to_string(),
                    sha256: hex.clone(),
                    size: 1,
                    executable: false,
                })
                .collect(),
            attestations: vec![FetchedAttestation {
                kind: AttestationKind::Provenance,
                name: "job-1".into(),
                envelope: envelope.to_vec(),
                source: "referrer".into(),
            }],
        }
    }

    #[test]
    fn a_layer_must_carry_the_path_its_subject_names() {
        let key = SigningKey::generate();
        let keys = [TrustedKey::unbounded(key.public_key())];
        let policy = Policy::from_toml(
            "allowed_builder_ids = [\"kiln://buildhost\"]\nallow_unpinned_images = true\n",
        )
        .unwrap();
        let (tool, config) = (hex_of("aa"), hex_of("bb"));
        let signed = provenance(
            &key,
            &[("bin/tool", tool.clone()), ("etc/config", config.clone())],
        );
        let honest = artifact(
            &[("bin/tool", tool.clone()), ("etc/config", config.clone())],
            &signed,
        );
        let verdict = judge("r/a@sha256:cc", &honest, &keys, &policy);
        assert!(verdict.passed, "{:?}", verdict.reasons);
        // The same genuine outputs and provenance, their paths swapped by the registry's
        // manifest: the config would be deployed as the tool.
        let swapped = artifact(
            &[("bin/tool", config.clone()), ("etc/config", tool.clone())],
            &signed,
        );
        let verdict = judge("r/a@sha256:dd", &swapped, &keys, &policy);
        assert!(!verdict.passed, "a renamed output passed");
        assert!(
            verdict.reasons.join(";").contains("bin/tool"),
            "{:?}",
            verdict.reasons
        );
        // One content under two paths, both named by the provenance, is fine.
        let twice = provenance(&key, &[("a", tool.clone()), ("b", tool.clone())]);
        let verdict = judge(
            "r/a@sha256:ee",
            &artifact(&[("a", tool.clone()), ("b", tool.clone())], &twice),
            &keys,
            &policy,
        );
        assert!(verdict.passed, "{:?}", verdict.reasons);
    }
}
