//! Verification of a layout and its links: the subset of `in-toto-verify`
//! (in-toto 3.1) that Kiln uses, in the same order and with the same rule
//! semantics. Anything outside that subset (sublayouts, non-ed25519 or GPG
//! keys, parameter substitution fields, unknown rule types or metadata
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

pub mod provenance;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::dsse::{self, IN_TOTO_PAYLOAD_TYPE};
use crate::fnmatch;
use crate::keys::PublicKey;
use crate::layout::{parse_expires, ArtifactKind, Rule};
use crate::link::link_file_name;
use crate::{cjson, hash, ProvenanceError};

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

/// Metadata as loaded from a file: a metablock or a DSSE envelope.
enum Signed {
    Metablock {
        signed: Value,
        /// (keyid, sig hex) in file order.
        signatures: Vec<(String, String)>,
    },
    Dsse {
        envelope: Value,
        payload: Value,
    },
}

impl Signed {
    fn parse(bytes: &[u8], file: &str) -> Result<Signed, VerifyError> {
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| fmt_err(file, format!("not JSON: {e}")))?;
        let o = v
            .as_object()
            .ok_or_else(|| fmt_err(file, "not a JSON object"))?;
        if o.contains_key("payload") {
            let pt = o.get("payloadType").and_then(Value::as_str).unwrap_or("");
            if pt != IN_TOTO_PAYLOAD_TYPE {
                return Err(unsupported(file, format!("DSSE payloadType {pt:?}")));
            }
            // Decoding without verifying only to read the payload; signatures
            // are checked by `verify_with` before anything in it is trusted.
            let raw = o
                .get("payload")
                .and_then(Value::as_str)
                .and_then(|p| {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD.decode(p).ok()
                })
                .ok_or_else(|| fmt_err(file, "DSSE payload is not base64"))?;
            let payload: Value = serde_json::from_slice(&raw)
                .map_err(|e| fmt_err(file, format!("DSSE payload is not JSON: {e}")))?;
            if payload.get("predicateType").is_some() || payload.get("subject").is_some() {
                return Err(unsupported(
                    file,
                    "in-toto Statements are not links or layouts",
                ));
            }
            return Ok(Signed::Dsse {
                envelope: v,
                payload,
            });
        }
        let signed = o
            .get("signed")
            .cloned()
            .ok_or_else(|| fmt_err(file, "no `signed` field"))?;
        let sigs = o
            .get("signatures")
            .and_then(Value::as_array)
            .ok_or_else(|| fmt_err(file, "no `signatures` list"))?;
        let mut signatures = Vec::new();
        for s in sigs {
            let keyid = s.get("keyid").and_then(Value::as_str);
            let sig = s.get("sig").and_then(Value::as_str);
            match (keyid, sig) {
                (Some(k), Some(g)) => signatures.push((k.to_owned(), g.to_owned())),
                _ => {
                    return Err(unsupported(
                        file,
                        "signature without keyid/sig (GPG signatures are not supported)",
                    ))
                }
            }
        }
        Ok(Signed::Metablock { signed, signatures })
    }

    fn payload(&self) -> &Value {
        match self {
            Signed::Metablock { signed, .. } => signed,
            Signed::Dsse { payload, .. } => payload,
        }
    }

    /// As in-toto: only the first signature whose keyid is the key's is checked.
    fn verify_with(&self, key: &PublicKey) -> Result<(), String> {
        let keyid = key.keyid();
        match self {
            Signed::Metablock { signed, signatures } => {
                let (_, sig) = signatures
                    .iter()
                    .find(|(k, _)| *k == keyid)
                    .ok_or_else(|| format!("no signature by key {keyid}"))?;
                let sig =
                    hex::decode(sig).map_err(|_| format!("signature by key {keyid} is not hex"))?;
                let canonical = cjson::to_canonical(signed).map_err(|e| e.to_string())?;
                if key.verify(&canonical, &sig) {
                    Ok(())
                } else {
                    Err(format!("invalid signature by key {keyid}"))
                }
            }
            Signed::Dsse { envelope, .. } => {
                let has_keyid = envelope
                    .get("signatures")
                    .and_then(Value::as_array)
                    .is_some_and(|a| {
                        a.iter()
                            .any(|s| s.get("keyid").and_then(Value::as_str) == Some(keyid.as_str()))
                    });
                if !has_keyid {
                    return Err(format!("no signature by key {keyid}"));
                }
                dsse::verify_envelope(envelope, std::slice::from_ref(key))
                    .map(|_| ())
                    .map_err(|_| format!("invalid DSSE signature by key {keyid}"))
            }
        }
    }
}

/// Reject unknown fields and require known ones, so that what we check is
/// exactly what the reference verifier reconstructs and signs over.
fn exact_fields<'a>(
    v: &'a Value,
    fields: &[&str],
    what: &str,
    file: &str,
) -> Result<&'a Map<String, Value>, VerifyError> {
    let o = v
        .as_object()
        .ok_or_else(|| fmt_err(file, format!("{what} is not an object")))?;
    for k in o.keys() {
        if !fields.contains(&k.as_str()) {
            return Err(unsupported(file, format!("field `{k}` in {what}")));
        }
    }
    for f in fields {
        if !o.contains_key(*f) {
            return Err(fmt_err(file, format!("{what} has no `{f}` field")));
        }
    }
    Ok(o)
}

fn str_list(v: &Value, what: &str, file: &str) -> Result<Vec<String>, VerifyError> {
    v.as_array()
        .and_then(|a| {
            a.iter()
                .map(|x| x.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| fmt_err(file, format!("{what} must be a list of strings")))
}

struct LayoutStep {
    name: String,
    expected_command: Vec<String>,
    pubkeys: Vec<String>,
    threshold: u64,
    materials: Vec<(Vec<String>, Rule)>,
    products: Vec<(Vec<String>, Rule)>,
}

struct LayoutInspection {
    name: String,
    run: Vec<String>,
    materials: Vec<(Vec<String>, Rule)>,
    products: Vec<(Vec<String>, Rule)>,
}

struct Layout {
    expires: String,
    keys: BTreeMap<String, PublicKey>,
    steps: Vec<LayoutStep>,
    inspect: Vec<LayoutInspection>,
}

/// Inspection commands Kiln evaluates without running: they change nothing,
/// so the cwd recorded before and after is the same tree.
const NOOP_COMMANDS: [&str; 3] = ["true", "/bin/true", "/usr/bin/true"];

fn is_noop(run: &[String]) -> bool {
    matches!(run, [cmd] if NOOP_COMMANDS.contains(&cmd.as_str()))
}

fn parse_rules(v: &Value, what: &str, file: &str) -> Result<Vec<(Vec<String>, Rule)>, VerifyError> {
    let list = v
        .as_array()
        .ok_or_else(|| fmt_err(file, format!("{what} must be a list")))?;
    list.iter()
        .map(|r| {
            let parts = str_list(r, what, file)?;
            let rule = Rule::parse(&parts).map_err(|e| {
                if e.starts_with("unsupported") {
                    unsupported(file, format!("{what}: {e}"))
                } else {
                    fmt_err(file, format!("{what}: {e}"))
                }
            })?;
            Ok((parts, rule))
        })
        .collect()
}

fn parse_layout(v: &Value, file: &str) -> Result<Layout, VerifyError> {
    if v.get("_type").and_then(Value::as_str) != Some("layout") {
        return Err(fmt_err(file, "`_type` is not \"layout\""));
    }
    let o = exact_fields(
        v,
        &["_type", "expires", "readme", "keys", "steps", "inspect"],
        "layout",
        file,
    )?;
    if !o.get("readme").is_some_and(Value::is_string) {
        return Err(fmt_err(file, "`readme` must be a string"));
    }
    let expires = o
        .get("expires")
        .and_then(Value::as_str)
        .ok_or_else(|| fmt_err(file, "`expires` must be a string"))?
        .to_owned();
    let mut keys = BTreeMap::new();
    let key_map = o
        .get("keys")
        .and_then(Value::as_object)
        .ok_or_else(|| fmt_err(file, "`keys` must be an object"))?;
    for (id, kv) in key_map {
        let key = PublicKey::from_securesystemslib(kv)
            .map_err(|e| unsupported(file, format!("layout key {id}: {e}")))?;
        if *id != key.keyid() {
            return Err(unsupported(
                file,
                format!("layout key listed as {id} has keyid {}", key.keyid()),
            ));
        }
        keys.insert(id.clone(), key);
    }
    let steps_v = o
        .get("steps")
        .and_then(Value::as_array)
        .ok_or_else(|| fmt_err(file, "`steps` must be a list"))?;
    let mut steps = Vec::new();
    let mut names = BTreeSet::new();
    for s in steps_v {
        if s.get("_type").and_then(Value::as_str) != Some("step") {
            return Err(fmt_err(file, "a step's `_type` is not \"step\""));
        }
        let so = exact_fields(
            s,
            &[
                "_type",
                "name",
                "expected_command",
                "pubkeys",
                "threshold",
                "expected_materials",
                "expected_products",
            ],
            "step",
            file,
        )?;
        let name = so
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| fmt_err(file, "step `name` must be a string"))?
            .to_owned();
        if !names.insert(name.clone()) {
            return Err(fmt_err(file, format!("step name '{name}' is repeated")));
        }
        let threshold = so
            .get("threshold")
            .and_then(Value::as_u64)
            .filter(|t| *t >= 1)
            .ok_or_else(|| {
                fmt_err(
                    file,
                    format!("step '{name}': threshold must be an integer >= 1"),
                )
            })?;
        let field = |f: &str| so.get(f).unwrap_or(&Value::Null);
        steps.push(LayoutStep {
            expected_command: str_list(
                field("expected_command"),
                &format!("step '{name}' expected_command"),
                file,
            )?,
            pubkeys: str_list(field("pubkeys"), &format!("step '{name}' pubkeys"), file)?,
            threshold,
            materials: parse_rules(
                field("expected_materials"),
                &format!("step '{name}' expected_materials"),
                file,
            )?,
            products: parse_rules(
                field("expected_products"),
                &format!("step '{name}' expected_products"),
                file,
            )?,
            name,
        });
    }
    let inspect_v = o
        .get("inspect")
        .and_then(Value::as_array)
        .ok_or_else(|| fmt_err(file, "`inspect` must be a list"))?;
    let mut inspect = Vec::new();
    for i in inspect_v {
        if i.get("_type").and_then(Value::as_str) != Some("inspection") {
            return Err(fmt_err(
                file,
                "an inspection's `_type` is not \"inspection\"",
            ));
        }
        let io = exact_fields(
            i,
            &[
                "_type",
                "name",
                "run",
                "expected_materials",
                "expected_products",
            ],
            "inspection",
            file,
        )?;
        let name = io
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| fmt_err(file, "inspection `name` must be a string"))?
            .to_owned();
        // One namespace for steps and inspections, as in-toto's layout
        // validation: MATCH rules name either.
        if !names.insert(name.clone()) {
            return Err(fmt_err(
                file,
                format!("inspection name '{name}' repeats a step or inspection name"),
            ));
        }
        let field = |f: &str| io.get(f).unwrap_or(&Value::Null);
        let run = str_list(field("run"), &format!("inspection '{name}' run"), file)?;
        if !is_noop(&run) {
            return Err(unsupported(
                file,
                format!(
                    "inspection '{name}' runs {run:?}: Kiln's verifier never runs commands \
                     from a layout and only evaluates no-op inspections (run [\"true\"]) \
                     against an artifacts directory"
                ),
            ));
        }
        inspect.push(LayoutInspection {
            run,
            materials: parse_rules(
                field("expected_materials"),
                &format!("inspection '{name}' expected_materials"),
                file,
            )?,
            products: parse_rules(
                field("expected_products"),
                &format!("inspection '{name}' expected_products"),
                file,
            )?,
            name,
        });
    }
    Ok(Layout {
        expires,
        keys,
        steps,
        inspect,
    })
}

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

struct ParsedLink {
    name: String,
    command: Vec<String>,
    materials: Artifacts,
    products: Artifacts,
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

    // 1. Layout signatures.
    if layout_keys.is_empty() {
        return Err(VerifyError::LayoutSignature(
            "at least one layout key is required".into(),
        ));
    }
    for key in layout_keys {
        meta.verify_with(key)
            .map_err(VerifyError::LayoutSignature)?;
    }
    let layout = parse_layout(meta.payload(), lfile)?;

    // 2. Expiry: in-toto fails when expires <= now.
    let expires_at = parse_expires(&layout.expires).map_err(|e| fmt_err(lfile, e))?;
    if expires_at <= now {
        return Err(VerifyError::LayoutExpired {
            expires: layout.expires.clone(),
            now: crate::layout::format_expires(now),
        });
    }

    // Fail before reading any link: without a directory the inspections
    // cannot be evaluated, and skipping them would be a silent pass.
    if !layout.inspect.is_empty() && artifacts_dir.is_none() {
        return Err(VerifyError::ArtifactsDirRequired {
            inspections: layout.inspect.iter().map(|i| i.name.clone()).collect(),
        });
    }

    let mut warnings = Vec::new();
    let mut accepted: BTreeMap<String, Vec<(PathBuf, String, ParsedLink)>> = BTreeMap::new();

    // 3. Links and signature thresholds.
    for step in &layout.steps {
        let mut loaded = Vec::new();
        let mut tried = Vec::new();
        for keyid in &step.pubkeys {
            let name = link_file_name(&step.name, keyid);
            let path = links_dir.join(&name);
            tried.push(name.clone());
            match std::fs::read(&path) {
                Ok(bytes) => loaded.push((path, name, keyid.clone(), bytes)),
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
        let mut good = Vec::new();
        let mut rejected = Vec::new();
        for (path, name, keyid, bytes) in loaded {
            let Some(key) = layout.keys.get(&keyid) else {
                rejected.push(format!(
                    "{name}: keyid {keyid} is not among the layout keys"
                ));
                continue;
            };
            let m = Signed::parse(&bytes, &name)?;
            if let Err(e) = m.verify_with(key) {
                rejected.push(format!("{name}: {e}"));
                continue;
            }
            let link = parse_link(m.payload(), &name)?;
            if link.name != step.name {
                return Err(VerifyError::LinkName {
                    file: name,
                    step: step.name.clone(),
                    found: link.name,
                });
            }
            good.push((path, keyid, link));
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
        accepted.insert(step.name.clone(), good);
    }

    // 4. Command alignment: a warning only, as the in-toto spec says.
    for step in &layout.steps {
        for (path, _, link) in accepted.get(&step.name).into_iter().flatten() {
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

    // 5. Threshold constraints: all links of a step must agree.
    for step in layout.steps.iter().filter(|s| s.threshold > 1) {
        let links = accepted
            .get(&step.name)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if let Some((first_path, _, first)) = links.first() {
            for (path, _, l) in &links[1..] {
                if l.materials != first.materials || l.products != first.products {
                    return Err(VerifyError::ThresholdArtifacts {
                        step: step.name.clone(),
                        first: first_path.display().to_string(),
                        other: path.display().to_string(),
                    });
                }
            }
        }
    }

    // Reduce to one link per step (the first accepted, in pubkeys order).
    let reduced: BTreeMap<&str, &ParsedLink> = accepted
        .iter()
        .filter_map(|(name, v)| v.first().map(|(_, _, l)| (name.as_str(), l)))
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

    // 7. Inspections: all are "run" (recorded) first, then their rules are
    // checked against step and inspection links together, as in-toto. A
    // no-op leaves the directory unchanged, so one recording serves all.
    let mut inspections = Vec::new();
    if let (Some(dir), false) = (artifacts_dir, layout.inspect.is_empty()) {
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
        inspections = layout
            .inspect
            .iter()
            .map(|i| InspectionReport {
                name: i.name.clone(),
                run: i.run.clone(),
                artifacts_dir: dir.to_path_buf(),
                artifacts: artifacts.clone(),
            })
            .collect();
    }

    let steps = layout
        .steps
        .iter()
        .map(|s| {
            let links = accepted.get(&s.name).map(Vec::as_slice).unwrap_or_default();
            let first = links.first().map(|(_, _, l)| l);
            StepReport {
                name: s.name.clone(),
                link_files: links.iter().map(|(p, _, _)| p.clone()).collect(),
                functionaries: links.iter().map(|(_, k, _)| k.clone()).collect(),
                command: first.map(|l| l.command.clone()).unwrap_or_default(),
                materials: first.map(|l| l.materials.clone()).unwrap_or_default(),
                products: first.map(|l| l.products.clone()).unwrap_or_default(),
            }
        })
        .collect();
    Ok(VerifyReport {
        layout_keyids: layout_keys.iter().map(PublicKey::keyid).collect(),
        expires: layout.expires,
        steps,
        inspections,
        warnings,
    })
}

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
enum Item {
    Step,
    Inspection,
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

/// Apply one step's material or product rules (in-toto `verify_item_rules`):
/// the artifacts start in a queue, each rule consumes what it authorises,
/// DISALLOW fails on anything left that matches, REQUIRE fails if its path
/// is no longer (or never was) in the queue.
fn verify_item_rules(
    item: Item,
    step: &str,
    kind: ArtifactKind,
    rules: &[(Vec<String>, Rule)],
    links: &BTreeMap<&str, &ParsedLink>,
) -> Result<(), VerifyError> {
    let Some(link) = links.get(step) else {
        return Ok(());
    };
    let source = match kind {
        ArtifactKind::Materials => &link.materials,
        ArtifactKind::Products => &link.products,
    };
    let mat_paths: BTreeSet<&str> = link.materials.keys().map(String::as_str).collect();
    let prod_paths: BTreeSet<&str> = link.products.keys().map(String::as_str).collect();
    let mut queue: BTreeSet<&str> = source.keys().map(String::as_str).collect();

    for (index, (raw, rule)) in rules.iter().enumerate() {
        let fail = |detail: String| match item {
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
        };
        let filtered = |pattern: &str| -> BTreeSet<&str> {
            queue
                .iter()
                .copied()
                .filter(|p| fnmatch::fnmatch(pattern, p))
                .collect()
        };
        let consumed: BTreeSet<&str> = match rule {
            Rule::Create(p) => filtered(p)
                .into_iter()
                .filter(|a| prod_paths.contains(a) && !mat_paths.contains(a))
                .collect(),
            Rule::Delete(p) => filtered(p)
                .into_iter()
                .filter(|a| mat_paths.contains(a) && !prod_paths.contains(a))
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
                    return Err(fail(format!(
                        "disallowed artifacts remain: {}",
                        show_list(&hit)
                    )));
                }
                BTreeSet::new()
            }
            Rule::Require(path) => {
                if !queue.contains(path.as_str()) {
                    return Err(fail(format!(
                        "required artifact {path:?} is not among the unconsumed {}",
                        kind.as_str()
                    )));
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
                Some(dest_link) => {
                    let dest = match dest_kind {
                        ArtifactKind::Materials => &dest_link.materials,
                        ArtifactKind::Products => &dest_link.products,
                    };
                    let norm_prefix = if source_prefix.is_empty() {
                        String::new()
                    } else {
                        join(source_prefix, "")
                    };
                    let mut out = BTreeSet::new();
                    for &full in &queue {
                        let Some(rel) = full.strip_prefix(norm_prefix.as_str()) else {
                            continue;
                        };
                        if !fnmatch::fnmatch(pattern, rel) {
                            continue;
                        }
                        let full_source = join(source_prefix, rel);
                        let full_dest = join(dest_prefix, rel);
                        if let (Some(s), Some(d)) = (source.get(&full_source), dest.get(&full_dest))
                        {
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
            },
        };
        queue.retain(|a| !consumed.contains(a));
    }
    Ok(())
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
