//! Verification of a layout and its links: the subset of `in-toto-verify`
//! (in-toto 3.1) that Kiln uses, in the same order and with the same rule
//! semantics. Anything outside that subset (sublayouts, keys other than
//! ed25519 and ECDSA P-256, GPG keys, parameter substitution fields, unknown rule types or metadata
//! fields) is an "unsupported" error, never a silent pass.
//!
//! Inspections: the reference runs each inspection's `run` command in its
//! cwd and records the cwd before and after as the inspection's materials
//! and products. Kiln never runs a command taken from a layout. It evaluates
//! only no-op inspections (`run` exactly `["true"]`, `["/bin/true"]` or
//! `["/usr/bin/true"]`), whose materials and products are both the given
//! artifacts directory, recorded by [`hash::hash_tree_as_in_toto`]; any other
//! command is an "unsupported" error.
//!
//! Deliberate differences from the reference, all stricter:
//! - a verified link whose `name` differs from its step is an error;
//! - a link file that exists but cannot be read is an error (not skipped);
//! - metadata with fields the in-toto model does not have is rejected (the
//!   reference drops them, which breaks metablock signatures anyway).

mod layout;
mod links;
mod metadata;
pub mod provenance;
mod rules;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use self::layout::{parse_layout, Layout};
use self::links::{
    accept_links, check_threshold_agreement, warn_command_mismatches, AcceptedLinks, ParsedLink,
};
use self::metadata::Signed;
use self::rules::{verify_item_rules, Item};
use crate::keys::PublicKey;
use crate::layout::{parse_expires, ArtifactKind};
use crate::{hash, ProvenanceError};

/// Artifact path -> {algorithm -> hex digest}, as in link metadata.
pub type Artifacts = BTreeMap<String, BTreeMap<String, String>>;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: malformed metadata: {detail}")]
    Format { file: String, detail: String },
    #[error("{file}: unsupported: {feature}")]
    Unsupported { file: String, feature: String },
    #[error("layout signature verification failed: {0}")]
    LayoutSignature(String),
    #[error("layout expired at {expires} (now {now})")]
    LayoutExpired { expires: String, now: String },
    #[error(
        "step '{step}' requires {required} link file(s), found {found} (looked for {tried:?})"
    )]
    LinkNotFound {
        step: String,
        required: u64,
        found: usize,
        tried: Vec<String>,
    },
    #[error("step '{step}' requires {required} link(s) validly signed by distinct authorized functionaries, found {found}; rejected: {rejected:?}")]
    Threshold {
        step: String,
        required: u64,
        found: usize,
        rejected: Vec<String>,
    },
    #[error("{file}: link name '{found}' does not match step '{step}'")]
    LinkName {
        file: String,
        step: String,
        found: String,
    },
    #[error("step '{step}': links {first} and {other} record different artifacts")]
    ThresholdArtifacts {
        step: String,
        first: String,
        other: String,
    },
    #[error("step '{step}' expected_{kind} rule #{index} '{rule}' failed: {detail}")]
    Rule {
        step: String,
        kind: &'static str,
        index: usize,
        rule: String,
        detail: String,
    },
    #[error("inspection '{inspection}' expected_{kind} rule #{index} '{rule}' failed: {detail}")]
    InspectionRule {
        inspection: String,
        kind: &'static str,
        index: usize,
        rule: String,
        detail: String,
    },
    #[error("the layout has inspection(s) {inspections:?}, which check an artifacts directory; none was given (`kiln verify --artifacts DIR`)")]
    ArtifactsDirRequired { inspections: Vec<String> },
    #[error("artifact {path}: {detail}")]
    Artifact { path: String, detail: String },
}

/// What a successful verification established.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// keyids of the layout keys whose signatures were verified.
    pub layout_keyids: Vec<String>,
    pub expires: String,
    /// Steps in layout order.
    pub steps: Vec<StepReport>,
    /// Inspections in layout order (empty when the layout has none).
    pub inspections: Vec<InspectionReport>,
    /// Non-fatal findings: command mismatches, skipped links.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct StepReport {
    pub name: String,
    /// Accepted link files (valid signature by an authorized key).
    pub link_files: Vec<PathBuf>,
    /// keyids of the functionaries whose links were accepted.
    pub functionaries: Vec<String>,
    /// The command recorded by the link the rules were applied to.
    pub command: Vec<String>,
    pub materials: Artifacts,
    pub products: Artifacts,
}

/// An evaluated no-op inspection.
#[derive(Debug, Clone)]
pub struct InspectionReport {
    pub name: String,
    /// The layout's `run` (a no-op; never executed).
    pub run: Vec<String>,
    /// The artifacts directory the rules were applied to.
    pub artifacts_dir: PathBuf,
    /// Its recorded files: the inspection's materials and also its products.
    pub artifacts: Artifacts,
}

impl VerifyReport {
    /// The last step of the layout (the one whose products are the outputs).
    pub fn final_step(&self) -> Option<&StepReport> {
        self.steps.last()
    }
}

fn fmt_err(file: &str, detail: impl Into<String>) -> VerifyError {
    VerifyError::Format {
        file: file.to_owned(),
        detail: detail.into(),
    }
}

fn unsupported(file: &str, feature: impl Into<String>) -> VerifyError {
    VerifyError::Unsupported {
        file: file.to_owned(),
        feature: feature.into(),
    }
}

/// Verify a layout metablock (or DSSE envelope) and the links in `links_dir`.
///
/// Order and semantics follow `in_toto.verifylib.in_toto_verify`:
/// 1. every key in `layout_keys` (at least one) must have a valid signature
///    on the layout, as `in-toto-verify --verification-keys` requires;
/// 2. the layout must not be expired at `now`;
/// 3. per step, `<step>.<keyid8>.link` is loaded for each authorized keyid;
///    links with a bad signature are skipped (with a warning) and the step
///    needs `threshold` valid links from distinct keys;
/// 4. command mismatches are warnings;
/// 5. with threshold > 1 all accepted links must agree on artifacts;
/// 6. material then product rules of each step, in order, with in-toto's
///    artifact queue semantics.
///
/// A layout with inspections fails here with
/// [`VerifyError::ArtifactsDirRequired`]; see
/// [`verify_layout_with_artifacts`].
pub fn verify_layout(
    layout_metablock: &[u8],
    layout_keys: &[PublicKey],
    links_dir: &Path,
    now: OffsetDateTime,
) -> Result<VerifyReport, VerifyError> {
    verify_layout_with_artifacts(layout_metablock, layout_keys, links_dir, None, now)
}

/// [`verify_layout`], then the layout's inspections against `artifacts_dir`
/// (in-toto's steps 10-11, after all step rules, as the reference does).
///
/// Every inspection must be a no-op (`run` `["true"]`, `["/bin/true"]` or
/// `["/usr/bin/true"]`; anything else is [`VerifyError::Unsupported`], since
/// Kiln never runs layout commands). Each inspection's materials and products
/// are `artifacts_dir` as [`hash::hash_tree_as_in_toto`] records it, which
/// is what `in-toto-verify` records when run with that directory as its
/// cwd. Inspection rules may MATCH against any step and any inspection
/// (including later ones and itself), as in-toto. Inspections without an
/// `artifacts_dir` are [`VerifyError::ArtifactsDirRequired`].
pub fn verify_layout_with_artifacts(
    layout_metablock: &[u8],
    layout_keys: &[PublicKey],
    links_dir: &Path,
    artifacts_dir: Option<&Path>,
    now: OffsetDateTime,
) -> Result<VerifyReport, VerifyError> {
    let lfile = "layout";
    let meta = Signed::parse(layout_metablock, lfile)?;
    // 1. Layout signatures, before anything in the payload is trusted.
    verify_layout_signatures(&meta, layout_keys)?;
    let layout = parse_layout(meta.payload(), lfile)?;
    // 2. Expiry.
    check_expiry(&layout, lfile, now)?;

    // Fail before reading any link: without a directory the inspections
    // cannot be evaluated, and skipping them would be a silent pass.
    if !layout.inspect.is_empty() && artifacts_dir.is_none() {
        return Err(VerifyError::ArtifactsDirRequired {
            inspections: layout.inspect.iter().map(|i| i.name.clone()).collect(),
        });
    }

    let mut warnings = Vec::new();
    // 3. Links and signature thresholds.
    let accepted = accept_links(&layout, links_dir, &mut warnings)?;
    // 4. Command alignment.
    warn_command_mismatches(&layout, &accepted, &mut warnings);
    // 5. Threshold constraints.
    check_threshold_agreement(&layout, &accepted)?;

    // Reduce to one link per step (the first accepted, in pubkeys order).
    let reduced: BTreeMap<&str, &ParsedLink> = accepted
        .iter()
        .filter_map(|(name, v)| v.first().map(|a| (name.as_str(), &a.link)))
        .collect();

    // 6. Artifact rules.
    for step in &layout.steps {
        for (kind, rules) in [
            (ArtifactKind::Materials, &step.materials),
            (ArtifactKind::Products, &step.products),
        ] {
            verify_item_rules(Item::Step, &step.name, kind, rules, &reduced)?;
        }
    }

    // 7. Inspections.
    let inspections = match (artifacts_dir, layout.inspect.is_empty()) {
        (Some(dir), false) => verify_inspections(&layout, dir, &reduced)?,
        _ => Vec::new(),
    };

    Ok(VerifyReport {
        layout_keyids: layout_keys.iter().map(PublicKey::keyid).collect(),
        steps: step_reports(&layout, &accepted),
        expires: layout.expires,
        inspections,
        warnings,
    })
}

/// In-toto step 1: every given layout key (at least one) has a valid
/// signature on the layout.
fn verify_layout_signatures(meta: &Signed, layout_keys: &[PublicKey]) -> Result<(), VerifyError> {
    if layout_keys.is_empty() {
        return Err(VerifyError::LayoutSignature(
            "at least one layout key is required".into(),
        ));
    }
    for key in layout_keys {
        meta.verify_with(key)
            .map_err(VerifyError::LayoutSignature)?;
    }
    Ok(())
}

/// In-toto step 2, expiry: in-toto fails when expires <= now.
fn check_expiry(layout: &Layout, lfile: &str, now: OffsetDateTime) -> Result<(), VerifyError> {
    let expires_at = parse_expires(&layout.expires).map_err(|e| fmt_err(lfile, e))?;
    if expires_at <= now {
        return Err(VerifyError::LayoutExpired {
            expires: layout.expires.clone(),
            now: crate::layout::format_expires(now),
        });
    }
    Ok(())
}

/// Inspections: all are "run" (recorded) first, then their rules are
/// checked against step and inspection links together, as in-toto. A
/// no-op leaves the directory unchanged, so one recording serves all.
fn verify_inspections(
    layout: &Layout,
    dir: &Path,
    reduced: &BTreeMap<&str, &ParsedLink>,
) -> Result<Vec<InspectionReport>, VerifyError> {
    let tree = hash::hash_tree_as_in_toto(dir).map_err(|e| tree_error(dir, e))?;
    let artifacts: Artifacts = tree
        .into_iter()
        .map(|(p, d)| (p, BTreeMap::from([("sha256".to_owned(), d)])))
        .collect();
    let inspection_links: Vec<ParsedLink> = layout
        .inspect
        .iter()
        .map(|i| ParsedLink {
            name: i.name.clone(),
            command: i.run.clone(),
            materials: artifacts.clone(),
            products: artifacts.clone(),
        })
        .collect();
    let mut combined = reduced.clone();
    for l in &inspection_links {
        combined.insert(l.name.as_str(), l);
    }
    for insp in &layout.inspect {
        for (kind, rules) in [
            (ArtifactKind::Materials, &insp.materials),
            (ArtifactKind::Products, &insp.products),
        ] {
            verify_item_rules(Item::Inspection, &insp.name, kind, rules, &combined)?;
        }
    }
    Ok(layout
        .inspect
        .iter()
        .map(|i| InspectionReport {
            name: i.name.clone(),
            run: i.run.clone(),
            artifacts_dir: dir.to_path_buf(),
            artifacts: artifacts.clone(),
        })
        .collect())
}

/// One report per layout step, from its accepted links; the recorded
/// command and artifacts are those of the first (the one the rules saw).
fn step_reports(layout: &Layout, accepted: &AcceptedLinks) -> Vec<StepReport> {
    layout
        .steps
        .iter()
        .map(|s| {
            let links = accepted.get(&s.name).map(Vec::as_slice).unwrap_or_default();
            let first = links.first().map(|a| &a.link);
            StepReport {
                name: s.name.clone(),
                link_files: links.iter().map(|a| a.path.clone()).collect(),
                functionaries: links.iter().map(|a| a.keyid.clone()).collect(),
                command: first.map(|l| l.command.clone()).unwrap_or_default(),
                materials: first.map(|l| l.materials.clone()).unwrap_or_default(),
                products: first.map(|l| l.products.clone()).unwrap_or_default(),
            }
        })
        .collect()
}

fn tree_error(dir: &Path, e: ProvenanceError) -> VerifyError {
    match e {
        ProvenanceError::Io { path, source } => VerifyError::Io { path, source },
        other => VerifyError::Artifact {
            path: dir.display().to_string(),
            detail: other.to_string(),
        },
    }
}

/// Result of [`check_artifacts`].
#[derive(Debug, Clone, Default)]
pub struct ArtifactCheck {
    /// The step whose products were compared (the layout's last step).
    pub step: String,
    /// Files in the directory whose sha256 equals the recorded product.
    pub checked: Vec<String>,
    /// Recorded products not present in the directory (not an error).
    pub missing: Vec<String>,
    /// Files in the directory that are not among the products (not an error).
    pub unrecorded: Vec<String>,
}

/// Check downloaded outputs against a verified layout: every file (or
/// symlink) in `dir` whose relative path is a product of the final step
/// must have the recorded sha256. A mismatch, or a directory in which no
/// file corresponds to a recorded product (nothing would be checked), is an
/// error. Products absent from `dir` and extra files are only reported.
pub fn check_artifacts(report: &VerifyReport, dir: &Path) -> Result<ArtifactCheck, VerifyError> {
    let step = report.final_step().ok_or_else(|| VerifyError::Artifact {
        path: dir.display().to_string(),
        detail: "the layout has no steps".into(),
    })?;
    let tree = hash::hash_tree(dir).map_err(|e| tree_error(dir, e))?;
    let mut out = ArtifactCheck {
        step: step.name.clone(),
        ..ArtifactCheck::default()
    };
    for (path, digest) in &tree {
        match step.products.get(path) {
            None => out.unrecorded.push(path.clone()),
            Some(h) => {
                let recorded = h.get("sha256").ok_or_else(|| VerifyError::Artifact {
                    path: path.clone(),
                    detail: format!("step '{}' recorded no sha256 for it", step.name),
                })?;
                if !recorded.eq_ignore_ascii_case(digest) {
                    return Err(VerifyError::Artifact {
                        path: path.clone(),
                        detail: format!(
                            "sha256 {digest} differs from {recorded} recorded by step '{}'",
                            step.name
                        ),
                    });
                }
                out.checked.push(path.clone());
            }
        }
    }
    out.missing = step
        .products
        .keys()
        .filter(|p| !tree.contains_key(*p))
        .cloned()
        .collect();
    if out.checked.is_empty() {
        return Err(VerifyError::Artifact {
            path: dir.display().to_string(),
            detail: format!(
                "no file corresponds to a product of step '{}'; nothing was checked",
                step.name
            ),
        });
    }
    Ok(out)
}
