//! Link metadata: parsing, loading a step's link files, and the signature,
//! threshold, command and agreement checks of in-toto's steps 3 to 5.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::layout::{Layout, LayoutStep};
use super::metadata::{exact_fields, str_list, Signed};
use super::{fmt_err, unsupported, Artifacts, VerifyError};
use crate::keys::PublicKey;
use crate::link::link_file_name;

fn parse_artifacts(v: Option<&Value>, what: &str, file: &str) -> Result<Artifacts, VerifyError> {
    let m = v
        .and_then(Value::as_object)
        .ok_or_else(|| fmt_err(file, format!("link `{what}` must be an object")))?;
    let mut out = Artifacts::new();
    for (path, hashes) in m {
        // in-toto 3.1 turns a backslash into '/' when it joins a rule's prefix, and
        // then looks up a path that is not there: refused, so that Kiln never passes a
        // link in-toto-verify reads differently.
        if path.contains('\\') {
            return Err(fmt_err(
                file,
                format!("{what} {path:?}: a backslash in an artifact path is read as '/' by in-toto; Kiln refuses it"),
            ));
        }
        let h = hashes
            .as_object()
            .ok_or_else(|| fmt_err(file, format!("{what} {path:?}: hashes must be an object")))?;
        let mut dict = BTreeMap::new();
        for (alg, d) in h {
            let d = d
                .as_str()
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| {
                    fmt_err(file, format!("{what} {path:?}: {alg} digest is not hex"))
                })?;
            dict.insert(alg.clone(), d.to_owned());
        }
        out.insert(path.clone(), dict);
    }
    Ok(out)
}

pub(super) struct ParsedLink {
    pub(super) name: String,
    pub(super) command: Vec<String>,
    pub(super) materials: Artifacts,
    pub(super) products: Artifacts,
}

fn parse_link(v: &Value, file: &str) -> Result<ParsedLink, VerifyError> {
    match v.get("_type").and_then(Value::as_str) {
        Some("link") => {}
        Some("layout") => return Err(unsupported(file, "sublayouts")),
        _ => return Err(fmt_err(file, "`_type` is not \"link\"")),
    }
    let o = exact_fields(
        v,
        &[
            "_type",
            "name",
            "command",
            "materials",
            "products",
            "byproducts",
            "environment",
        ],
        "link",
        file,
    )?;
    let name = o
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| fmt_err(file, "link `name` must be a string"))?
        .to_owned();
    if !o.get("byproducts").is_some_and(Value::is_object) {
        return Err(fmt_err(file, "link `byproducts` must be an object"));
    }
    if !o.get("environment").is_some_and(Value::is_object) {
        return Err(fmt_err(file, "link `environment` must be an object"));
    }
    Ok(ParsedLink {
        command: str_list(
            o.get("command").unwrap_or(&Value::Null),
            "link `command`",
            file,
        )?,
        materials: parse_artifacts(o.get("materials"), "materials", file)?,
        products: parse_artifacts(o.get("products"), "products", file)?,
        name,
    })
}

/// A link that passed signature and name checks for its step.
pub(super) struct AcceptedLink {
    pub(super) path: PathBuf,
    /// The authorized functionary's keyid that signed it.
    pub(super) keyid: String,
    pub(super) link: ParsedLink,
}

/// Step name -> its accepted links, in the step's `pubkeys` order.
pub(super) type AcceptedLinks = BTreeMap<String, Vec<AcceptedLink>>;

/// A link file as read, before its signature is checked.
struct LoadedLink {
    path: PathBuf,
    file_name: String,
    keyid: String,
    bytes: Vec<u8>,
}

/// In-toto step 3 for every step, in layout order: load the links and
/// require `threshold` validly signed ones from distinct authorized keys.
/// Links with a bad signature are skipped with a warning.
pub(super) fn accept_links(
    layout: &Layout,
    links_dir: &Path,
    warnings: &mut Vec<String>,
) -> Result<AcceptedLinks, VerifyError> {
    let mut accepted = AcceptedLinks::new();
    for step in &layout.steps {
        let loaded = load_step_links(step, links_dir)?;
        let good = accept_step_links(step, loaded, &layout.keys, warnings)?;
        accepted.insert(step.name.clone(), good);
    }
    Ok(accepted)
}

/// Read `<step>.<keyid8>.link` for each authorized keyid. A missing file is
/// skipped; one that exists but cannot be read is an error.
fn load_step_links(step: &LayoutStep, links_dir: &Path) -> Result<Vec<LoadedLink>, VerifyError> {
    let mut loaded = Vec::new();
    let mut tried = Vec::new();
    for keyid in &step.pubkeys {
        let file_name = link_file_name(&step.name, keyid);
        let path = links_dir.join(&file_name);
        tried.push(file_name.clone());
        match std::fs::read(&path) {
            Ok(bytes) => loaded.push(LoadedLink {
                path,
                file_name,
                keyid: keyid.clone(),
                bytes,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(VerifyError::Io { path, source: e }),
        }
    }
    if (loaded.len() as u64) < step.threshold {
        return Err(VerifyError::LinkNotFound {
            step: step.name.clone(),
            required: step.threshold,
            found: loaded.len(),
            tried,
        });
    }
    Ok(loaded)
}

/// Keep the loaded links validly signed by their layout key; a valid link
/// named for another step is an error, not a skip.
fn accept_step_links(
    step: &LayoutStep,
    loaded: Vec<LoadedLink>,
    keys: &BTreeMap<String, PublicKey>,
    warnings: &mut Vec<String>,
) -> Result<Vec<AcceptedLink>, VerifyError> {
    let mut good = Vec::new();
    let mut rejected = Vec::new();
    for LoadedLink {
        path,
        file_name,
        keyid,
        bytes,
    } in loaded
    {
        let Some(key) = keys.get(&keyid) else {
            rejected.push(format!(
                "{file_name}: keyid {keyid} is not among the layout keys"
            ));
            continue;
        };
        let m = Signed::parse(&bytes, &file_name)?;
        if let Err(e) = m.verify_with(key) {
            rejected.push(format!("{file_name}: {e}"));
            continue;
        }
        let link = parse_link(m.payload(), &file_name)?;
        if link.name != step.name {
            return Err(VerifyError::LinkName {
                file: file_name,
                step: step.name.clone(),
                found: link.name,
            });
        }
        good.push(AcceptedLink { path, keyid, link });
    }
    for r in &rejected {
        warnings.push(format!("step '{}': skipped link {r}", step.name));
    }
    if (good.len() as u64) < step.threshold {
        return Err(VerifyError::Threshold {
            step: step.name.clone(),
            required: step.threshold,
            found: good.len(),
            rejected,
        });
    }
    Ok(good)
}

/// In-toto step 4, command alignment: a warning only, as the in-toto spec says.
pub(super) fn warn_command_mismatches(
    layout: &Layout,
    accepted: &AcceptedLinks,
    warnings: &mut Vec<String>,
) {
    for step in &layout.steps {
        for AcceptedLink { path, link, .. } in accepted.get(&step.name).into_iter().flatten() {
            if link.command != step.expected_command {
                warnings.push(format!(
                    "step '{}': {} ran command {:?}, layout expects {:?}",
                    step.name,
                    path.display(),
                    link.command,
                    step.expected_command
                ));
            }
        }
    }
}

/// In-toto step 5, threshold constraints: all links of a step must agree.
pub(super) fn check_threshold_agreement(
    layout: &Layout,
    accepted: &AcceptedLinks,
) -> Result<(), VerifyError> {
    for step in layout.steps.iter().filter(|s| s.threshold > 1) {
        let links = accepted
            .get(&step.name)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if let Some(first) = links.first() {
            for other in &links[1..] {
                if other.link.materials != first.link.materials
                    || other.link.products != first.link.products
                {
                    return Err(VerifyError::ThresholdArtifacts {
                        step: step.name.clone(),
                        first: first.path.display().to_string(),
                        other: other.path.display().to_string(),
                    });
                }
            }
        }
    }
    Ok(())
}
