//! Validation of a submitted JobSpec. Everything a client sends is checked here,
//! before the job is recorded, and a bad field is named in the error.

use std::collections::BTreeSet;

use agent_proto::v1::JobSpec;

use crate::api::auth::Principal;
use crate::config::Config;
use crate::egress::netpolicy::AllowList;
use crate::error::{Result, RunnerError};
use crate::store::cas::check_digest;

pub const MAX_NAME_BYTES: usize = 256;
pub const MAX_PATH_BYTES: usize = 4096;
pub const MAX_OUTPUTS: usize = 10_000;
pub const MAX_STEPS: usize = 256;
pub const MAX_ARG_BYTES: usize = 128 * 1024;
pub const MAX_ARGV_TOTAL_BYTES: usize = 1024 * 1024;
pub const MAX_ENV_VARS: usize = 1024;
/// Names and values of a step's variables together, like argv (execve takes both
/// from one budget).
pub const MAX_ENV_TOTAL_BYTES: usize = 1024 * 1024;
pub const MAX_ALLOW_NET: usize = 256;

/// Limits the operator's config sets on what a job may ask for.
#[derive(Debug, Clone)]
pub struct SpecLimits {
    pub max_timeout_seconds: u32,
    pub max_memory_bytes: u64,
    pub max_pids: u32,
    pub max_cpu_millis: u32,
    pub max_disk_bytes: u64,
    /// What this client's allow-lists may name.
    pub network_ceiling: crate::egress::netpolicy::Ceiling,
    pub max_inputs: usize,
    /// The spec's encoded (protobuf) size.
    pub max_spec_bytes: u64,
    /// The caller's tenant, and which of the caps above (by config key, e.g.
    /// `max_memory`, `network_ceiling`) are its own: a refusal names that tenant's key.
    pub tenant: Option<String>,
    pub tenant_caps: BTreeSet<&'static str>,
    /// Where its jobs may publish, the key that says so, and the registries spoken to
    /// in plain HTTP.
    pub publish: crate::registry::policy::RepositoryPatterns,
    pub publish_key: String,
    pub insecure_registries: Vec<String>,
}

impl SpecLimits {
    /// The tenant's key that set `cap`, if the tenant set it.
    fn tenant_key(&self, cap: &str) -> Option<String> {
        let tenant = self.tenant.as_deref()?;
        self.tenant_caps
            .contains(cap)
            .then(|| format!("tenants.{tenant}.{cap}"))
    }

    /// The words of a refusal for exceeding `cap`.
    fn maximum_of(&self, cap: &str) -> String {
        match self.tenant_key(cap) {
            Some(key) => format!("{key}, which is"),
            None => "the runner's maximum of".into(),
        }
    }
}

impl SpecLimits {
    /// The ceilings a caller's job is held to: its tenant's where it sets them, the
    /// runner's otherwise.
    pub fn of(config: &Config, caller: &Principal) -> SpecLimits {
        let tenant = caller
            .tenant
            .as_deref()
            .and_then(|name| config.tenants.get(name));
        let mut tenant_caps = std::collections::BTreeSet::new();
        let mut own = |cap: &'static str, set: bool| {
            if set {
                tenant_caps.insert(cap);
            }
        };
        if let Some(t) = tenant {
            own("max_memory", t.max_memory.is_some());
            own("max_pids", t.max_pids.is_some());
            own("max_cpus", t.max_cpus.is_some());
            own("max_disk", t.max_disk.is_some());
            own("max_timeout_seconds", t.max_timeout_seconds.is_some());
            own("network_ceiling", t.network_ceiling.is_some());
        }
        SpecLimits {
            max_timeout_seconds: tenant
                .and_then(|t| t.max_timeout_seconds)
                .unwrap_or(config.max_timeout_seconds),
            max_memory_bytes: tenant
                .and_then(|t| t.max_memory)
                .unwrap_or(config.max_memory)
                .0,
            max_pids: tenant.and_then(|t| t.max_pids).unwrap_or(config.max_pids),
            max_cpu_millis: tenant.and_then(|t| t.max_cpus).unwrap_or(config.max_cpus).0,
            max_disk_bytes: tenant.and_then(|t| t.max_disk).unwrap_or(config.max_disk).0,
            network_ceiling: config.network_ceiling_of(caller),
            max_inputs: config.max_inputs,
            max_spec_bytes: config.max_spec_bytes.0,
            tenant: caller.tenant.clone(),
            tenant_caps,
            publish: config.publish_scope(caller).0.clone(),
            publish_key: config.publish_scope(caller).1,
            insecure_registries: config.images.insecure_registries.clone(),
        }
    }
}

/// Checks a step's resource limits against the smallest workable values and the
/// operator's caps (0 = the daemon's default, always within the caps).
fn check_resource_limits(
    i: usize,
    l: &agent_proto::v1::ResourceLimits,
    caps: &SpecLimits,
) -> Result<()> {
    use crate::units::{format_cpus, format_size};
    let field = |f: &str| format!("steps[{i}].limits.{f}");
    let check =
        |name: &str, cap: &str, value: u64, min: u64, max: u64, show: &dyn Fn(u64) -> String| {
            if value == 0 {
                return Ok(());
            }
            if value < min {
                return Err(RunnerError::invalid(
                    field(name),
                    format!(
                        "{} is below the smallest workable {}",
                        show(value),
                        show(min)
                    ),
                ));
            }
            if value > max {
                return Err(RunnerError::invalid(
                    field(name),
                    format!(
                        "{} exceeds {} {}",
                        show(value),
                        caps.maximum_of(cap),
                        show(max)
                    ),
                ));
            }
            Ok(())
        };
    let size = |v: u64| format_size(v);
    let plain = |v: u64| v.to_string();
    let cpus = |v: u64| format!("{} CPUs", format_cpus(u32::try_from(v).unwrap_or(u32::MAX)));
    check(
        "memory_bytes",
        "max_memory",
        l.memory_bytes,
        sandbox::MIN_MEMORY_BYTES,
        caps.max_memory_bytes,
        &size,
    )?;
    check(
        "pids",
        "max_pids",
        u64::from(l.pids),
        u64::from(sandbox::MIN_PIDS),
        u64::from(caps.max_pids),
        &plain,
    )?;
    check(
        "cpu_millis",
        "max_cpus",
        u64::from(l.cpu_millis),
        u64::from(sandbox::MIN_CPU_MILLIS),
        u64::from(caps.max_cpu_millis),
        &cpus,
    )?;
    check(
        "disk_bytes",
        "max_disk",
        l.disk_bytes,
        crate::units::MIN_DISK_BYTES,
        caps.max_disk_bytes,
        &size,
    )
}

/// Whether the caller may publish to `repository`; answers where it goes and its tag.
pub fn check_publish(
    repository: &str,
    limits: &SpecLimits,
) -> Result<(crate::registry::Target, Option<String>)> {
    let (target, tag) =
        crate::registry::Target::parse_push(repository, &limits.insecure_registries)?;
    if !limits.publish.allows(&target) {
        return Err(RunnerError::PermissionDenied(format!(
            "publishing to {} is not allowed: {} does not list it",
            target.repository_name(),
            limits.publish_key
        )));
    }
    Ok((target, tag))
}

/// A relative, '/'-separated path inside the workspace, without "." or ".."
/// components: the only shape that cannot name anything outside the workspace.
pub fn check_workspace_path(field: &str, path: &str) -> Result<()> {
    let bad = |reason: &str| Err(RunnerError::invalid(field, format!("{path:?}: {reason}")));
    if path.is_empty() {
        return bad("empty path");
    }
    if path.len() > MAX_PATH_BYTES {
        return bad("path too long");
    }
    if path.contains('\0') {
        return bad("contains a NUL byte");
    }
    // in-toto 3.1 rewrites a backslash to '/' in artifact paths: such a name would
    // verify differently with in-toto-verify than with Kiln.
    if path.contains('\\') {
        return bad("contains a backslash, which in-toto reads as '/'");
    }
    if path.starts_with('/') {
        return bad("absolute paths are not allowed");
    }
    for component in path.split('/') {
        match component {
            "" => return bad("empty path component"),
            "." | ".." => return bad("\".\" and \"..\" components are not allowed"),
            c if c.len() > 255 => return bad("path component longer than 255 bytes"),
            _ => {}
        }
    }
    Ok(())
}

/// Step names name link files (`<step>.<keyid>.link`), so they must be plain file names.
pub fn check_step_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 64 {
        return Err(RunnerError::invalid(field, "must be 1 to 64 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(RunnerError::invalid(
            field,
            format!("{name:?} may contain only ASCII letters, digits, '-' and '_'"),
        ));
    }
    Ok(())
}

/// An image's name (a-z, 0-9, '-', '_', '.'; not starting with '.'), as installed.
pub fn check_image_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 64 {
        return Err(RunnerError::invalid("image", "must be 1 to 64 characters"));
    }
    if !name.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
    }) || name.starts_with('.')
    {
        return Err(RunnerError::invalid(
            "image",
            format!("{name:?} is not an image name (a-z, 0-9, '-', '_', '.')"),
        ));
    }
    Ok(())
}

/// A job's image: `NAME`, `NAME@sha256:HEX` or `sha256:HEX`, and nothing else.
pub fn check_image_reference(reference: &str) -> Result<()> {
    crate::images::reference::ImageRef::parse(reference).map(drop)
}

/// Checks a submitted spec against the caps; answers each step's allow-list, parsed
/// (see [`crate::plan::ValidatedJob`], which the engine runs).
pub fn validate(spec: &JobSpec, limits: &SpecLimits) -> Result<Vec<Option<AllowList>>> {
    use prost::Message;
    let encoded = spec.encoded_len() as u64;
    if encoded > limits.max_spec_bytes {
        return Err(RunnerError::invalid(
            "spec",
            format!(
                "encodes to {encoded} bytes, more than the runner's max_spec_bytes of {}",
                limits.max_spec_bytes
            ),
        ));
    }
    if spec.name.len() > MAX_NAME_BYTES || spec.name.contains('\0') {
        return Err(RunnerError::invalid(
            "name",
            "must be at most 256 bytes without NUL",
        ));
    }
    check_image_reference(&spec.image)?;
    if !spec.publish_repository.is_empty() {
        check_publish(&spec.publish_repository, limits)?;
    }

    check_inputs(spec, limits)?;
    if spec.steps.is_empty() {
        return Err(RunnerError::invalid(
            "steps",
            "a job needs at least one step",
        ));
    }
    if spec.steps.len() > MAX_STEPS {
        return Err(RunnerError::invalid("steps", "too many steps"));
    }
    let mut step_names = BTreeSet::new();
    let mut allow_lists = Vec::with_capacity(spec.steps.len());
    for (i, step) in spec.steps.iter().enumerate() {
        let field = |f: &str| format!("steps[{i}].{f}");
        check_step_name(&field("name"), &step.name)?;
        if !step_names.insert(step.name.as_str()) {
            return Err(RunnerError::invalid(
                field("name"),
                format!("duplicate step name {:?}", step.name),
            ));
        }
        allow_lists.push(check_step(i, step, limits)?);
    }
    check_outputs(spec)?;
    Ok(allow_lists)
}

fn check_inputs(spec: &JobSpec, limits: &SpecLimits) -> Result<()> {
    if spec.inputs.len() > limits.max_inputs {
        return Err(RunnerError::invalid(
            "inputs",
            format!(
                "{} inputs, more than the runner's max_inputs of {}",
                spec.inputs.len(),
                limits.max_inputs
            ),
        ));
    }
    let mut input_paths = BTreeSet::new();
    for (i, input) in spec.inputs.iter().enumerate() {
        let field = format!("inputs[{i}].path");
        check_workspace_path(&field, &input.path)?;
        check_digest(&format!("inputs[{i}].digest"), &input.digest)?;
        if !input_paths.insert(input.path.as_str()) {
            return Err(RunnerError::invalid(
                field,
                format!("{:?} is given twice", input.path),
            ));
        }
    }
    // A path that is both a file and a directory prefix of another input cannot exist.
    // The paths below `p/` sort between `p/` and `p0` ('0' follows '/'): one range
    // look-up per input, not one per component.
    for path in &input_paths {
        let (below, after) = (format!("{path}/"), format!("{path}0"));
        if let Some(inner) = input_paths
            .range::<str, _>((
                std::ops::Bound::Included(below.as_str()),
                std::ops::Bound::Excluded(after.as_str()),
            ))
            .next()
        {
            return Err(RunnerError::invalid(
                "inputs",
                format!("{path:?} is a file but {inner:?} needs it to be a directory"),
            ));
        }
    }
    Ok(())
}

/// One step, `steps[i]`, apart from its name's uniqueness (checked by the caller).
fn check_step(
    i: usize,
    step: &agent_proto::v1::Step,
    limits: &SpecLimits,
) -> Result<Option<AllowList>> {
    let field = |f: &str| format!("steps[{i}].{f}");
    if step.argv.is_empty() || step.argv[0].is_empty() {
        return Err(RunnerError::invalid(
            field("argv"),
            "argv must not be empty",
        ));
    }
    let mut total = 0;
    for (j, arg) in step.argv.iter().enumerate() {
        if arg.contains('\0') {
            return Err(RunnerError::invalid(
                format!("steps[{i}].argv[{j}]"),
                "contains a NUL byte",
            ));
        }
        if arg.len() > MAX_ARG_BYTES {
            return Err(RunnerError::invalid(
                format!("steps[{i}].argv[{j}]"),
                "argument too long",
            ));
        }
        total += arg.len();
    }
    if total > MAX_ARGV_TOTAL_BYTES {
        return Err(RunnerError::invalid(
            field("argv"),
            "arguments too long in total",
        ));
    }
    check_env(i, step)?;
    if step.timeout_seconds > limits.max_timeout_seconds {
        return Err(RunnerError::invalid(
            field("timeout_seconds"),
            format!(
                "{} exceeds {} {}",
                step.timeout_seconds,
                limits.maximum_of("max_timeout_seconds"),
                limits.max_timeout_seconds
            ),
        ));
    }
    if let Some(l) = &step.limits {
        check_resource_limits(i, l, limits)?;
    }
    if step.allow_net.len() > MAX_ALLOW_NET {
        return Err(RunnerError::invalid(field("allow_net"), "too many entries"));
    }
    let mut entries = Vec::with_capacity(step.allow_net.len());
    for (j, text) in step.allow_net.iter().enumerate() {
        let entry = crate::egress::netpolicy::Entry::parse(text).map_err(|e| {
            RunnerError::invalid(format!("steps[{i}].allow_net[{j}]"), e.to_string())
        })?;
        if !limits.network_ceiling.covers(&entry) {
            let ceiling = match limits.tenant_key("network_ceiling") {
                Some(key) => key,
                None => "the network ceiling the runner's operator set for this client".into(),
            };
            return Err(RunnerError::PermissionDenied(format!(
                "steps[{i}].allow_net[{j}]: {text:?} is outside {ceiling}"
            )));
        }
        entries.push(entry);
    }
    // No list: no network at all (not an empty proxy).
    Ok((!entries.is_empty()).then_some(AllowList { entries }))
}

fn check_env(i: usize, step: &agent_proto::v1::Step) -> Result<()> {
    let field = |f: &str| format!("steps[{i}].{f}");
    if step.env.len() > MAX_ENV_VARS {
        return Err(RunnerError::invalid(field("env"), "too many variables"));
    }
    let env_bytes: usize = step.env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    if env_bytes > MAX_ENV_TOTAL_BYTES {
        return Err(RunnerError::invalid(
            field("env"),
            format!("{env_bytes} bytes of names and values, more than {MAX_ENV_TOTAL_BYTES}"),
        ));
    }
    for (key, value) in &step.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') || key.len() > 1024 {
            return Err(RunnerError::invalid(
                field("env"),
                format!("{key:?} is not a variable name"),
            ));
        }
        if value.contains('\0') || value.len() > MAX_ARG_BYTES {
            return Err(RunnerError::invalid(
                field("env"),
                format!("value of {key:?} contains NUL or is too long"),
            ));
        }
    }
    Ok(())
}

fn check_outputs(spec: &JobSpec) -> Result<()> {
    if spec.outputs.len() > MAX_OUTPUTS {
        return Err(RunnerError::invalid("outputs", "too many outputs"));
    }
    let mut outputs = BTreeSet::new();
    for (i, output) in spec.outputs.iter().enumerate() {
        let field = format!("outputs[{i}]");
        check_workspace_path(&field, output)?;
        if !outputs.insert(output.as_str()) {
            return Err(RunnerError::invalid(
                field,
                format!("{output:?} is given twice"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
