//! `kiln verify`: in-toto layout verification, and SLSA provenance checked
//! against artifacts and a policy, with Kiln's own verifiers.

use std::path::{Path, PathBuf};

use anyhow::Context;
use provenance::keys::PublicKey;
use provenance::verify::{check_artifacts, verify_layout_with_artifacts};

/// Verifies and prints a verdict; the exit code is 0 only when everything passed.
pub fn run(
    layout: &Path,
    layout_keys: &[PathBuf],
    links: &Path,
    artifacts: Option<&Path>,
) -> anyhow::Result<i32> {
    let layout_bytes =
        std::fs::read(layout).with_context(|| format!("reading {}", layout.display()))?;
    let mut keys = Vec::new();
    for path in layout_keys {
        let pem =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        keys.push(
            PublicKey::from_spki_pem(&pem).with_context(|| format!("key {}", path.display()))?,
        );
    }
    let now = time::OffsetDateTime::now_utc();
    let report = match verify_layout_with_artifacts(&layout_bytes, &keys, links, artifacts, now) {
        Ok(report) => report,
        Err(err) => {
            println!("FAILED: {err}");
            return Ok(1);
        }
    };
    for warning in &report.warnings {
        println!("warning: {warning}");
    }
    for step in &report.steps {
        println!(
            "step {}: {} link(s) accepted, signed by {}",
            step.name,
            step.link_files.len(),
            step.functionaries.join(", ")
        );
    }
    for inspection in &report.inspections {
        println!(
            "inspection {}: {} artifact(s) of {} satisfy its rules (its command is never run)",
            inspection.name,
            inspection.artifacts.len(),
            inspection.artifacts_dir.display()
        );
    }
    // A layout with inspections already checked the artifacts, as in-toto-verify
    // does; without any, compare them with the final step's products.
    if let (Some(dir), true) = (artifacts, report.inspections.is_empty()) {
        match check_artifacts(&report, dir) {
            Ok(check) => println!(
                "artifacts: {} file(s) match the products of step {}",
                check.checked.len(),
                check.step
            ),
            Err(err) => {
                println!("FAILED: {err}");
                return Ok(1);
            }
        }
    }
    println!("PASSED: the links satisfy the layout");
    Ok(0)
}

/// Checks SLSA provenance: signature by one of `keys` (valid at the build's
/// finish), every file a subject, and the policy. `envelope` is the DSSE envelope
/// or a Sigstore bundle holding it. Exit code 0 only on a pass.
pub fn run_provenance(
    envelope: &Path,
    keys: &[PathBuf],
    policy: &Path,
    files: &[PathBuf],
    json: bool,
) -> anyhow::Result<i32> {
    use provenance::verify::provenance::{verify_provenance, Artifact, Policy};

    let envelope_bytes = read_envelope(envelope)?;
    let trusted = trusted_keys(keys)?;
    let policy_text =
        std::fs::read_to_string(policy).with_context(|| format!("reading {}", policy.display()))?;
    let policy =
        Policy::from_toml(&policy_text).with_context(|| format!("policy {}", policy.display()))?;
    let mut artifacts = Vec::new();
    for file in files {
        artifacts.push(
            Artifact::from_path(file).with_context(|| format!("artifact {}", file.display()))?,
        );
    }
    let verdict = verify_provenance(&envelope_bytes, &trusted, &artifacts, &policy);
    if json {
        println!("{}", serde_json::to_string_pretty(&verdict.to_json())?);
    } else {
        println!("{}", verdict.summary());
    }
    Ok(if verdict.passed { 0 } else { 1 })
}

/// The DSSE envelope in `path`: the file itself, or the envelope inside a Sigstore
/// bundle (the same signature is checked either way).
pub fn read_envelope(path: &Path) -> anyhow::Result<Vec<u8>> {
    use provenance::bundle;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bundle::is_bundle(&bytes) {
        return bundle::bundle_to_envelope(&bytes)
            .with_context(|| format!("Sigstore bundle {}", path.display()));
    }
    Ok(bytes)
}

/// The runner keys in `paths`: SPKI PEM files of ed25519 or ECDSA P-256 keys (trusted
/// at any time) or key ring exports (each key within its validity window).
pub fn trusted_keys(paths: &[PathBuf]) -> anyhow::Result<Vec<provenance::keyring::TrustedKey>> {
    use provenance::keyring::{PublicKeyRing, TrustedKey};
    let mut trusted = Vec::new();
    for path in paths {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if bytes.starts_with(b"-----BEGIN") {
            let pem = String::from_utf8_lossy(&bytes);
            trusted.push(TrustedKey::unbounded(
                PublicKey::from_spki_pem(&pem)
                    .with_context(|| format!("key {}", path.display()))?,
            ));
        } else {
            let ring = PublicKeyRing::from_json_bytes(&bytes)
                .with_context(|| format!("key ring {}", path.display()))?;
            trusted.extend(ring.keys);
        }
    }
    Ok(trusted)
}
