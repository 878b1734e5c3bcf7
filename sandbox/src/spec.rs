//! What one step is (its spec, limits and root), what it ended as (outcome, status,
//! resource usage), and the checks a spec passes before anything is set up.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::SandboxError;

/// Everything the sandbox needs to run one step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepSpec {
    pub argv: Vec<String>,
    /// The step's complete environment.
    pub env: Vec<(String, String)>,
    /// Composes the read-only root filesystem, applied in order.
    pub root: Vec<RootEntry>,
    /// Host directory, bound read-write at /workspace, the cwd.
    pub workspace: PathBuf,
    /// A directory below /workspace to start in instead, as names one level each (none:
    /// /workspace). Entered component by component without following a symlink.
    #[serde(default)]
    pub working_directory: Vec<String>,
    /// First host uid (and gid) of this sandbox's id range.
    pub host_uid_base: u32,
    /// Size of the range, e.g. 65536.
    pub id_range: u32,
    /// uid = gid inside the sandbox the step runs as, e.g. 1000.
    pub step_uid: u32,
    pub timeout_ms: u64,
    pub hostname: String,
    pub tmp_size_bytes: u64,
    /// TCP ports on the step's loopback it may connect to (the hook for the egress proxy,
    /// which listens there). Empty: no TCP connect and no TCP bind at all where Landlock
    /// has network rules (ABI >= 4), so loopback TCP is unavailable; AF_UNIX works.
    #[serde(default)]
    pub tcp_connect_ports: Vec<u16>,
    /// With an allow-list: the port of the egress proxy on the step's loopback. The
    /// supervisor brings the loopback up, listens on 127.0.0.1:PORT inside the step's
    /// network namespace and hands the listener to the caller
    /// ([`RunningStep::take_egress_listener`]). None: loopback down, no listener.
    #[serde(default)]
    pub egress_proxy_port: Option<u16>,
    /// Layers the operator's config waived and this host lacks (see [`decide_waivers`]);
    /// only these are skipped, every other layer stays mandatory.
    #[serde(default)]
    pub waived_layers: Vec<String>,
    /// cgroup limits and rlimits of the step; every one is enforced.
    pub limits: Limits,
}

/// Resource limits of one step. All are required: a limit is never "off".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// cgroup memory limit (swap included where the host accounts it).
    pub memory_bytes: u64,
    /// Tasks (processes and threads) in the sandbox, its init (pid 1) included.
    pub pids: u32,
    /// CPU bandwidth in thousandths of a CPU (1500 = 1.5 CPUs), over a 100 ms period.
    pub cpu_millis: u32,
    /// RLIMIT_NOFILE of the step.
    pub nofile: u64,
    /// RLIMIT_FSIZE of the step: the largest file it may write.
    pub fsize_bytes: u64,
}

impl Default for Limits {
    /// Conservative values for callers (tests, probes) that do not choose.
    fn default() -> Self {
        Self {
            memory_bytes: 1 << 30,
            pids: 512,
            cpu_millis: 1000,
            nofile: 1024,
            fsize_bytes: 1 << 30,
        }
    }
}

/// Smallest limits that still let a step start (init + step, a libc program).
pub const MIN_MEMORY_BYTES: u64 = 8 << 20;
pub const MIN_PIDS: u32 = 2;
/// 1% of a CPU: the kernel's smallest quota is 1 ms per 100 ms period.
pub const MIN_CPU_MILLIS: u32 = 10;
pub const MIN_NOFILE: u64 = 16;

/// What a step used, read from its cgroup after it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceUsage {
    pub peak_memory_bytes: u64,
    /// User + system CPU time of every process of the sandbox.
    pub cpu_time_ms: u64,
    /// The kernel's OOM killer killed a process of the sandbox (memory limit reached).
    pub oom_killed: bool,
    /// A fork or clone failed because the pids limit was reached.
    pub pids_limit_hit: bool,
}

/// One element of the sandbox's root filesystem.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RootEntry {
    /// read-only, nosuid, nodev bind of a host path (file or dir) at an absolute path in the sandbox
    Bind { source: PathBuf, target: PathBuf },
    /// a symlink at `path` in the sandbox pointing to `points_to`
    Symlink { path: PathBuf, points_to: PathBuf },
    /// an empty directory
    Dir { path: PathBuf },
}

/// How a step ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepOutcome {
    pub status: StepStatus,
    pub duration_ms: u64,
    /// Syscalls the seccomp filter denied (EPERM), per syscall name, over every process of
    /// the step.
    #[serde(default)]
    pub seccomp_denials: BTreeMap<String, u64>,
    /// Zero when the step never started.
    #[serde(default)]
    pub usage: ResourceUsage,
    /// When the step called execve ([`monotonic_now_ns`]), if it got that far.
    #[serde(default)]
    pub exec_monotonic_ns: Option<u64>,
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for the daemon and the sandbox (Kiln uses no
/// time namespace), so their instants can be subtracted.
pub fn monotonic_now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec())
                .unwrap_or(0)
                .saturating_mul(1_000_000_000)
                .saturating_add(u64::try_from(t.tv_nsec()).unwrap_or(0))
        })
        .unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepStatus {
    Exited {
        code: i32,
    },
    Signaled {
        signal: i32,
    },
    TimedOut,
    Cancelled,
    /// The runner maps ENOENT -> 127, else 126.
    ExecFailed {
        errno: i32,
        message: String,
    },
    SetupFailed {
        layer: String,
        message: String,
    },
}

/// Paths the sandbox itself mounts; root entries must stay clear of them.
pub(crate) const RESERVED: [&str; 4] = ["/proc", "/dev", "/tmp", "/workspace"];

fn invalid(msg: impl Into<String>) -> SandboxError {
    SandboxError::InvalidSpec(msg.into())
}

/// An absolute path made only of normal components (no `.`, `..`, `//` tricks).
fn check_sandbox_path(what: &str, p: &Path) -> Result<(), SandboxError> {
    let s = p.as_os_str().as_encoded_bytes();
    if !p.is_absolute() || s.contains(&0) {
        return Err(invalid(format!(
            "{what} {} must be an absolute path",
            p.display()
        )));
    }
    let normal = p
        .components()
        .skip(1)
        .all(|c| matches!(c, Component::Normal(_)));
    let clean = PathBuf::from("/").join(p.components().skip(1).collect::<PathBuf>());
    if !normal || clean.as_os_str() != p.as_os_str() {
        return Err(invalid(format!(
            "{what} {} must be normalised (no '.', '..', repeated or trailing '/')",
            p.display()
        )));
    }
    Ok(())
}

fn under_reserved(p: &Path) -> Option<&'static str> {
    RESERVED.iter().copied().find(|r| p.starts_with(r))
}

/// Checks a spec before anything is started; the supervisor checks again.
pub fn validate(spec: &StepSpec) -> Result<(), SandboxError> {
    validate_command(spec)?;
    validate_egress(spec)?;
    for entry in &spec.root {
        validate_root_entry(entry)?;
    }
    validate_ids_and_sizes(spec)?;
    validate_limits(&spec.limits)
}

/// argv and the environment: what execve receives.
fn validate_command(spec: &StepSpec) -> Result<(), SandboxError> {
    for name in &spec.working_directory {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(invalid(format!(
                "working_directory: {name:?} is not a single directory name"
            )));
        }
    }
    if spec.argv.is_empty() || spec.argv[0].is_empty() {
        return Err(invalid("argv must not be empty"));
    }
    if spec.argv.iter().any(|a| a.contains('\0')) {
        return Err(invalid("argv must not contain NUL bytes"));
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(invalid(format!(
                "bad environment variable name or value: {k:?}"
            )));
        }
    }
    Ok(())
}

fn validate_egress(spec: &StepSpec) -> Result<(), SandboxError> {
    if let Some(port) = spec.egress_proxy_port {
        // Landlock must let the step connect to its proxy, and only there is TCP allowed.
        if port == 0 || !spec.tcp_connect_ports.contains(&port) {
            return Err(invalid(format!(
                "egress proxy port {port} must be non-zero and in tcp_connect_ports"
            )));
        }
    }
    Ok(())
}

/// One root entry: a clean absolute target, not `/` and clear of [`RESERVED`].
fn validate_root_entry(entry: &RootEntry) -> Result<(), SandboxError> {
    let (what, target) = match entry {
        RootEntry::Bind { source, target } => {
            if !source.is_absolute() || source.as_os_str().as_encoded_bytes().contains(&0) {
                return Err(invalid(format!(
                    "bind source {} must be an absolute path",
                    source.display()
                )));
            }
            ("bind target", target)
        }
        RootEntry::Symlink { path, points_to } => {
            if points_to.as_os_str().is_empty()
                || points_to.as_os_str().as_encoded_bytes().contains(&0)
            {
                return Err(invalid(format!(
                    "bad symlink target for {}",
                    path.display()
                )));
            }
            ("symlink path", path)
        }
        RootEntry::Dir { path } => ("directory", path),
    };
    check_sandbox_path(what, target)?;
    if target == Path::new("/") {
        return Err(invalid(format!(
            "{what} / is not supported: the root is a read-only skeleton; bind the image's top-level directories"
        )));
    }
    if let Some(r) = under_reserved(target) {
        return Err(invalid(format!(
            "{what} {} is inside {r}, which the sandbox provides itself",
            target.display()
        )));
    }
    Ok(())
}

/// The workspace, the id mapping, the timeout, /tmp's size and the hostname.
fn validate_ids_and_sizes(spec: &StepSpec) -> Result<(), SandboxError> {
    if !spec.workspace.is_absolute() {
        return Err(invalid("workspace must be an absolute host path"));
    }
    if spec.host_uid_base == 0 {
        return Err(invalid(
            "host_uid_base must not be 0: host root is never mapped",
        ));
    }
    if spec.id_range == 0 || spec.host_uid_base.checked_add(spec.id_range).is_none() {
        return Err(invalid("id range is empty or overflows"));
    }
    if spec.step_uid == 0 || spec.step_uid >= spec.id_range {
        return Err(invalid(
            "step_uid must be non-zero (pid 1 runs as 0) and inside the id range",
        ));
    }
    if spec.timeout_ms == 0 {
        return Err(invalid("timeout_ms must be positive"));
    }
    if spec.tmp_size_bytes == 0 {
        return Err(invalid("tmp_size_bytes must be positive"));
    }
    if spec.hostname.is_empty() || spec.hostname.len() > 64 || spec.hostname.contains('\0') {
        return Err(invalid("hostname must be 1 to 64 bytes"));
    }
    Ok(())
}

fn validate_limits(l: &Limits) -> Result<(), SandboxError> {
    if l.memory_bytes < MIN_MEMORY_BYTES {
        return Err(invalid(format!(
            "memory limit must be at least {MIN_MEMORY_BYTES} bytes"
        )));
    }
    if l.pids < MIN_PIDS {
        return Err(invalid(format!(
            "pids limit must be at least {MIN_PIDS} (init and the step)"
        )));
    }
    if l.cpu_millis < MIN_CPU_MILLIS {
        return Err(invalid(format!(
            "cpu limit must be at least {MIN_CPU_MILLIS} millicpus"
        )));
    }
    if l.nofile < MIN_NOFILE {
        return Err(invalid(format!(
            "nofile limit must be at least {MIN_NOFILE}"
        )));
    }
    if l.fsize_bytes == 0 {
        return Err(invalid("fsize limit must be positive"));
    }
    Ok(())
}

/// The env value of `key` in a spec environment (last one wins, as in execve users).
pub(crate) fn env_get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}
