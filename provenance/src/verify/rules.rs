//! Artifact rules (in-toto `verify_item_rules`) of steps and inspections.

use std::collections::{BTreeMap, BTreeSet};

use super::links::ParsedLink;
use super::{Artifacts, VerifyError};
use crate::fnmatch;
use crate::layout::{ArtifactKind, Rule};

/// in-toto's prefix join: `os.path.join(prefix, path).replace("\\", "/")` when
/// there is a prefix, the path unchanged when there is none.
fn join(prefix: &str, path: &str) -> String {
    if prefix.is_empty() {
        return path.to_owned();
    }
    let joined = if path.starts_with('/') {
        path.to_owned()
    } else if prefix.ends_with('/') {
        format!("{prefix}{path}")
    } else {
        format!("{prefix}/{path}")
    };
    joined.replace('\\', "/")
}

fn show_list(items: &BTreeSet<&str>) -> String {
    const MAX: usize = 20;
    let mut s: Vec<String> = items.iter().take(MAX).map(|p| format!("{p:?}")).collect();
    if items.len() > MAX {
        s.push(format!("... ({} more)", items.len() - MAX));
    }
    format!("[{}]", s.join(", "))
}

/// Whose rules [`verify_item_rules`] applies (for the error it reports).
#[derive(Clone, Copy)]
pub(super) enum Item {
    Step,
    Inspection,
}

fn artifacts_of(link: &ParsedLink, kind: ArtifactKind) -> &Artifacts {
    match kind {
        ArtifactKind::Materials => &link.materials,
        ArtifactKind::Products => &link.products,
    }
}

/// Apply one step's material or product rules (in-toto `verify_item_rules`):
/// the artifacts start in a queue, each rule consumes what it authorises,
/// DISALLOW fails on anything left that matches, REQUIRE fails if its path
/// is no longer (or never was) in the queue.
pub(super) fn verify_item_rules(
    item: Item,
    step: &str,
    kind: ArtifactKind,
    rules: &[(Vec<String>, Rule)],
    links: &BTreeMap<&str, &ParsedLink>,
) -> Result<(), VerifyError> {
    let Some(link) = links.get(step) else {
        return Ok(());
    };
    let mut queue: BTreeSet<&str> = artifacts_of(link, kind)
        .keys()
        .map(String::as_str)
        .collect();
    for (index, (raw, rule)) in rules.iter().enumerate() {
        let consumed = consumed_by(rule, kind, link, links, &queue).map_err(|detail| {
            let detail = match rule {
                Rule::Disallow(pattern) => {
                    let hit = queue
                        .iter()
                        .copied()
                        .filter(|p| fnmatch::fnmatch(pattern, p));
                    let why = explain_unmatched(hit, &rules[..index], kind, link, links);
                    why.into_iter().fold(detail, |d, w| format!("{d}; {w}"))
                }
                _ => detail,
            };
            rule_error(item, step, kind, index, raw, detail)
        })?;
        queue.retain(|a| !consumed.contains(a));
    }
    Ok(())
}

/// Why artifacts that reach a DISALLOW were not consumed by an earlier MATCH that
/// selects them: the step (and the path there) each should have matched, and the two
/// hashes or what is missing. A reader of the failure learns which file differs from
/// which step's artifact, not only that something was left over.
fn explain_unmatched<'a>(
    hit: impl Iterator<Item = &'a str>,
    earlier: &[(Vec<String>, Rule)],
    kind: ArtifactKind,
    link: &ParsedLink,
    links: &BTreeMap<&str, &ParsedLink>,
) -> Vec<String> {
    const MAX: usize = 10;
    let sha256 = |hashes: &BTreeMap<String, String>| {
        hashes
            .get("sha256")
            .cloned()
            .unwrap_or_else(|| format!("{hashes:?}"))
    };
    let mut out = Vec::new();
    for full in hit.take(MAX) {
        let explanation = earlier.iter().find_map(|(_, rule)| {
            let Rule::Match {
                pattern,
                source_prefix,
                dest_kind,
                dest_prefix,
                dest_step,
            } = rule
            else {
                return None;
            };
            let prefix = if source_prefix.is_empty() {
                String::new()
            } else {
                join(source_prefix, "")
            };
            let rel = full.strip_prefix(prefix.as_str())?;
            if !fnmatch::fnmatch(pattern, rel) {
                return None;
            }
            let what = dest_kind.as_str();
            let dest_path = join(dest_prefix, rel);
            Some(match links.get(dest_step.as_str()) {
                None => format!(
                    "{full:?} should match the {what} of step '{dest_step}', which has no link"
                ),
                Some(dest) => match artifacts_of(dest, *dest_kind).get(&dest_path) {
                    None => format!(
                        "{full:?} should match {dest_path:?} among the {what} of step \
                         '{dest_step}', which has no such file"
                    ),
                    Some(expected) => {
                        let found = artifacts_of(link, kind)
                            .get(full)
                            .map(sha256)
                            .unwrap_or_default();
                        format!(
                            "{full:?} (sha256 {found}) does not match {dest_path:?} among the \
                             {what} of step '{dest_step}' (sha256 {})",
                            sha256(expected)
                        )
                    }
                },
            })
        });
        out.extend(explanation);
    }
    out
}

/// The error for rule number `index` (from 0; reported from 1) of `step`.
fn rule_error(
    item: Item,
    step: &str,
    kind: ArtifactKind,
    index: usize,
    raw: &[String],
    detail: String,
) -> VerifyError {
    match item {
        Item::Step => VerifyError::Rule {
            step: step.to_owned(),
            kind: kind.as_str(),
            index: index + 1,
            rule: raw.join(" "),
            detail,
        },
        Item::Inspection => VerifyError::InspectionRule {
            inspection: step.to_owned(),
            kind: kind.as_str(),
            index: index + 1,
            rule: raw.join(" "),
            detail,
        },
    }
}

/// What one rule consumes from `queue`, or why it fails (the error's detail).
fn consumed_by<'a>(
    rule: &Rule,
    kind: ArtifactKind,
    link: &ParsedLink,
    links: &BTreeMap<&str, &ParsedLink>,
    queue: &BTreeSet<&'a str>,
) -> Result<BTreeSet<&'a str>, String> {
    let filtered = |pattern: &str| -> BTreeSet<&'a str> {
        queue
            .iter()
            .copied()
            .filter(|p| fnmatch::fnmatch(pattern, p))
            .collect()
    };
    let in_materials = |a: &&str| link.materials.contains_key(*a);
    let in_products = |a: &&str| link.products.contains_key(*a);
    let consumed = match rule {
        Rule::Create(p) => filtered(p)
            .into_iter()
            .filter(|a| in_products(a) && !in_materials(a))
            .collect(),
        Rule::Delete(p) => filtered(p)
            .into_iter()
            .filter(|a| in_materials(a) && !in_products(a))
            .collect(),
        Rule::Modify(p) => filtered(p)
            .into_iter()
            .filter(|a| match (link.materials.get(*a), link.products.get(*a)) {
                (Some(m), Some(pr)) => m != pr,
                _ => false,
            })
            .collect(),
        Rule::Allow(p) => filtered(p),
        Rule::Disallow(p) => {
            let hit = filtered(p);
            if !hit.is_empty() {
                return Err(format!("disallowed artifacts remain: {}", show_list(&hit)));
            }
            BTreeSet::new()
        }
        Rule::Require(path) => {
            if !queue.contains(path.as_str()) {
                return Err(format!(
                    "required artifact {path:?} is not among the unconsumed {}",
                    kind.as_str()
                ));
            }
            BTreeSet::new()
        }
        Rule::Match {
            pattern,
            source_prefix,
            dest_kind,
            dest_prefix,
            dest_step,
        } => match links.get(dest_step.as_str()) {
            // As in-toto: a MATCH against a step without a link consumes nothing.
            None => BTreeSet::new(),
            Some(dest_link) => match_consumed(
                pattern,
                source_prefix,
                artifacts_of(link, kind),
                dest_prefix,
                artifacts_of(dest_link, *dest_kind),
                queue,
            ),
        },
    };
    Ok(consumed)
}

/// MATCH: the queued artifacts under `source_prefix` matching `pattern`
/// whose hashes equal those of the same relative path under `dest_prefix`
/// in the destination.
fn match_consumed<'a>(
    pattern: &str,
    source_prefix: &str,
    source: &Artifacts,
    dest_prefix: &str,
    dest: &Artifacts,
    queue: &BTreeSet<&'a str>,
) -> BTreeSet<&'a str> {
    let norm_prefix = if source_prefix.is_empty() {
        String::new()
    } else {
        join(source_prefix, "")
    };
    let mut out = BTreeSet::new();
    for &full in queue {
        let Some(rel) = full.strip_prefix(norm_prefix.as_str()) else {
            continue;
        };
        if !fnmatch::fnmatch(pattern, rel) {
            continue;
        }
        let full_source = join(source_prefix, rel);
        let full_dest = join(dest_prefix, rel);
        if let (Some(s), Some(d)) = (source.get(&full_source), dest.get(&full_dest)) {
            if s == d {
                // `full` may differ from `full_source` only for odd
                // paths like "p//x"; consume what in-toto consumes.
                if let Some(q) = queue.get(full_source.as_str()) {
                    out.insert(*q);
                }
            }
        }
    }
    out
}
