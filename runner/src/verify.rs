//! `kiln verify`: in-toto layout verification with Kiln's own verifier.

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
