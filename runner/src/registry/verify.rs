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
            let checked = verify_provenance(&attestation.envelope, keys, &artifacts, policy);
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
