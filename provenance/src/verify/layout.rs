//! The layout's payload, parsed into what verification needs. Only the
//! fields of the in-toto layout model are accepted (see the parent module).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use super::metadata::{exact_fields, str_list};
use super::{fmt_err, unsupported, VerifyError};
use crate::keys::PublicKey;
use crate::layout::Rule;

pub(super) struct LayoutStep {
    pub(super) name: String,
    pub(super) expected_command: Vec<String>,
    pub(super) pubkeys: Vec<String>,
    pub(super) threshold: u64,
    pub(super) materials: Vec<(Vec<String>, Rule)>,
    pub(super) products: Vec<(Vec<String>, Rule)>,
}

pub(super) struct LayoutInspection {
    pub(super) name: String,
    pub(super) run: Vec<String>,
    pub(super) materials: Vec<(Vec<String>, Rule)>,
    pub(super) products: Vec<(Vec<String>, Rule)>,
}

pub(super) struct Layout {
    pub(super) expires: String,
    pub(super) keys: BTreeMap<String, PublicKey>,
    pub(super) steps: Vec<LayoutStep>,
    pub(super) inspect: Vec<LayoutInspection>,
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

pub(super) fn parse_layout(v: &Value, file: &str) -> Result<Layout, VerifyError> {
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
    let keys = parse_layout_keys(o, file)?;
    let steps_v = o
        .get("steps")
        .and_then(Value::as_array)
        .ok_or_else(|| fmt_err(file, "`steps` must be a list"))?;
    // One namespace for steps and inspections, as in-toto's layout
    // validation: MATCH rules name either.
    let mut names = BTreeSet::new();
    let steps = steps_v
        .iter()
        .map(|s| parse_step(s, &mut names, file))
        .collect::<Result<Vec<_>, _>>()?;
    let inspect_v = o
        .get("inspect")
        .and_then(Value::as_array)
        .ok_or_else(|| fmt_err(file, "`inspect` must be a list"))?;
    let inspect = inspect_v
        .iter()
        .map(|i| parse_inspection(i, &mut names, file))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Layout {
        expires,
        keys,
        steps,
        inspect,
    })
}

/// The layout's `keys`: each must be a supported key listed under its own keyid.
fn parse_layout_keys(
    layout: &Map<String, Value>,
    file: &str,
) -> Result<BTreeMap<String, PublicKey>, VerifyError> {
    let mut keys = BTreeMap::new();
    let key_map = layout
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
    Ok(keys)
}

/// One entry of `steps`; its name joins `names`, which must not have it yet.
fn parse_step(
    s: &Value,
    names: &mut BTreeSet<String>,
    file: &str,
) -> Result<LayoutStep, VerifyError> {
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
    Ok(LayoutStep {
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
    })
}

/// One entry of `inspect`; only no-op inspections are accepted, since Kiln
/// never runs a command taken from a layout.
fn parse_inspection(
    i: &Value,
    names: &mut BTreeSet<String>,
    file: &str,
) -> Result<LayoutInspection, VerifyError> {
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
    Ok(LayoutInspection {
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
    })
}
