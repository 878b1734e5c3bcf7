//! Linux isolation for one Kiln build step.
//!
//! The multi-threaded daemon never sets up namespaces itself: [`Sandbox::spawn`] re-executes
//! the Kiln binary (which calls [`init_main`] when its argv[1] is [`INIT_ARG`]). That fresh,
//! single-threaded process (the *supervisor*) stays in the host namespaces, reads the
//! [`StepSpec`] from its stdin (the control socket), prepares every fd and the seccomp program,
//! clones the sandbox's pid 1 into new user/mount/pid/net/ipc/uts/cgroup namespaces, enforces
//! the timeout and cancellation, and reports one [`StepOutcome`] as JSON on the same socket.
//!
//! Layers are never skipped: a layer that cannot be set up makes the step `SetupFailed`
//! naming the layer.
//!
//! Every `unsafe` block of the crate lives in its one `sys` module, each with a
//! `// SAFETY:` comment; the compiler holds the rest of the crate to that.
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub mod cgroup;
mod child;
mod egress;
mod failure;
mod landlock_rules;
mod notify;
mod plan;
mod protocol;
pub mod seccomp;
mod supervisor;
#[allow(unsafe_code)]
mod sys;

/// argv[1] of the re-executed Kiln binary that runs the sandbox supervisor.
pub const INIT_ARG: &str = "__kiln-sandbox-init";

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

/// Errors of the daemon-side API.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid step spec: {0}")]
    InvalidSpec(String),
    #[error("host cannot provide sandbox layer {layer}: {reason}")]
    Unsupported { layer: String, reason: String },
    #[error("seccomp policy: {0}")]
    Seccomp(String),
    #[error("starting the sandbox supervisor {exe}: {source}")]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("sandbox supervisor: {0}")]
    Supervisor(String),
    #[error("I/O with the sandbox supervisor: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding the step spec: {0}")]
    Json(#[from] serde_json::Error),
}

/// What the host offers, as found by [`Sandbox::probe`].
#[derive(Debug, Clone, Serialize)]
pub struct HostSupport {
    /// Landlock ABI version of the running kernel (>= 1).
    pub landlock_abi: i32,
    /// Namespaces created together in one clone (probed for real).
    pub namespaces: Vec<String>,
    /// seccomp return actions the kernel offers.
    pub seccomp_actions: Vec<String>,
    /// `uname -r`.
    pub kernel_release: String,
    /// SHA-256 of the seccomp program, compiled once by the probe (see [`seccomp::compiled`]).
    pub seccomp_policy_sha256: String,
    /// Layers the host lacks and the operator's config waived; recorded in provenance.
    pub waived_layers: Vec<String>,
    /// The cgroup interface used for the limits (probed for real).
    pub cgroup: cgroup::CgroupSupport,
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

/// The namespaces of a sandbox, created in one clone.
pub(crate) const NAMESPACES: [(&str, libc::c_int); 7] = [
    ("user", libc::CLONE_NEWUSER),
    ("mount", libc::CLONE_NEWNS),
    ("pid", libc::CLONE_NEWPID),
    ("net", libc::CLONE_NEWNET),
    ("ipc", libc::CLONE_NEWIPC),
    ("uts", libc::CLONE_NEWUTS),
    ("cgroup", libc::CLONE_NEWCGROUP),
];

pub(crate) fn namespace_flags() -> libc::c_int {
    NAMESPACES.iter().fold(0, |acc, (_, f)| acc | f)
}

/// Paths the sandbox itself mounts; root entries must stay clear of them.
pub(crate) const RESERVED: [&str; 4] = ["/proc", "/dev", "/tmp", "/workspace"];

/// Layers an operator may waive (config `waive`) for a host that lacks them; every other
/// layer is mandatory.
pub const WAIVABLE_LAYERS: [&str; 1] = ["landlock"];

/// The layers steps run without: those the host lacks (`landlock_abi` < 1) and `waive` names.
/// A waived layer the host has is still applied (a waiver permits running without a layer,
/// it never weakens a host that has it). Unknown or repeated names are errors, as is a
/// missing layer that is not waived.
pub fn decide_waivers(landlock_abi: i32, waive: &[String]) -> Result<Vec<String>, SandboxError> {
    for (i, w) in waive.iter().enumerate() {
        if !WAIVABLE_LAYERS.contains(&w.as_str()) {
            return Err(SandboxError::InvalidSpec(format!(
                "layer {w:?} cannot be waived (waivable: {})",
                WAIVABLE_LAYERS.join(", ")
            )));
        }
        if waive[..i].contains(w) {
            return Err(SandboxError::InvalidSpec(format!(
                "layer {w:?} waived twice"
            )));
        }
    }
    let mut waived = Vec::new();
    if landlock_abi < 1 {
        if !waive.iter().any(|w| w == "landlock") {
            return Err(SandboxError::Unsupported {
                layer: "landlock".to_string(),
                reason: "the kernel does not support Landlock or it is not enabled (lsm=); \
                         `waive = [\"landlock\"]` in the config runs steps without it"
                    .to_string(),
            });
        }
        waived.push("landlock".to_string());
    }
    Ok(waived)
}

/// Starts sandboxed steps by re-executing the Kiln binary as the supervisor.
#[derive(Debug, Clone)]
pub struct Sandbox {
    init_exe: PathBuf,
}

impl Sandbox {
    pub fn new(init_exe: PathBuf) -> Self {
        Self { init_exe }
    }

    /// Checks the host can set up every layer (user namespaces, seccomp, Landlock ABI);
    /// the error names the missing layer.
    pub fn probe() -> Result<HostSupport, SandboxError> {
        Self::probe_with_waivers(&[])
    }

    /// [`Sandbox::probe`], except that a layer the host lacks is accepted when `waive`
    /// (the operator's config) names it; see [`decide_waivers`].
    pub fn probe_with_waivers(waive: &[String]) -> Result<HostSupport, SandboxError> {
        let unsupported = |layer: &str, reason: String| SandboxError::Unsupported {
            layer: layer.to_string(),
            reason,
        };
        sys::probe_namespaces(namespace_flags()).map_err(|e| {
            unsupported(
                "user-namespace",
                format!(
                    "clone with user, mount, pid, net, ipc, uts and cgroup namespaces failed: {e}"
                ),
            )
        })?;
        let actions = std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail")
            .map_err(|e| unsupported("seccomp", format!("seccomp filters unavailable: {e}")))?;
        let seccomp_actions: Vec<String> = actions.split_whitespace().map(String::from).collect();
        for needed in ["allow", "errno", "kill_process", "user_notif"] {
            if !seccomp_actions.iter().any(|a| a == needed) {
                return Err(unsupported(
                    "seccomp",
                    format!("kernel lacks seccomp action {needed}"),
                ));
            }
        }
        // Compiled here, once per process; every step reuses it.
        let seccomp_policy_sha256 = seccomp::compiled()?.sha256().to_string();
        let landlock_abi = sys::landlock_abi_version().max(0);
        let waived_layers = decide_waivers(landlock_abi, waive)?;
        sys::open_tree(None, c"/", 0).map_err(|e| {
            unsupported(
                "mount",
                format!("new mount API (open_tree) unavailable: {e}"),
            )
        })?;
        let cgroup = cgroup::probe().map_err(|(controller, reason)| {
            unsupported(
                "cgroup",
                format!("cannot enforce limits with the {controller} controller: {reason}"),
            )
        })?;
        let kernel_release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(HostSupport {
            landlock_abi,
            namespaces: NAMESPACES.iter().map(|(n, _)| n.to_string()).collect(),
            seccomp_actions,
            kernel_release,
            seccomp_policy_sha256,
            waived_layers,
            cgroup,
        })
    }

    /// Starts the step; returns once the supervisor has the spec.
    pub fn spawn(&self, spec: &StepSpec) -> Result<RunningStep, SandboxError> {
        self.standby()?.start(spec)
    }

    /// A supervisor started ahead of its step: exec'd and initialised, waiting on its
    /// control socket for a spec ([`Standby::start`]), so a step's start does not wait for
    /// the exec. It holds nothing of any step until then.
    pub fn standby(&self) -> Result<Standby, SandboxError> {
        let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
        let (out_r, out_w) = nix::unistd::pipe2(cloexec).map_err(std::io::Error::from)?;
        let (err_r, err_w) = nix::unistd::pipe2(cloexec).map_err(std::io::Error::from)?;
        // One socket is the supervisor's stdin for both directions (spec and cancel in,
        // outcome out): with nothing to set up between fork and exec, Command uses
        // posix_spawn instead of forking the whole daemon (about 1-3 ms per step).
        let (control, supervisor_end) = UnixStream::pair()?;

        let mut cmd = Command::new(&self.init_exe);
        cmd.arg(INIT_ARG)
            .env_clear()
            .stdin(Stdio::from(OwnedFd::from(supervisor_end)))
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(err_w));
        let spawned = cmd.spawn();
        // The Command holds our copies of the supervisor's ends: close them now so the
        // readers see EOF when the sandbox is gone.
        drop(cmd);
        let mut child = spawned.map_err(|source| SandboxError::Spawn {
            exe: self.init_exe.clone(),
            source,
        })?;
        let status = match control.try_clone() {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e.into());
            }
        };
        Ok(Standby {
            parts: Some(StandbyParts {
                child,
                control,
                status,
                stdout: out_r,
                stderr: err_r,
            }),
        })
    }
}

/// A supervisor waiting for its step (see [`Sandbox::standby`]). Dropped unused, it sees
/// its control socket close and exits; it is reaped off-thread.
pub struct Standby {
    parts: Option<StandbyParts>,
}

struct StandbyParts {
    child: Child,
    control: UnixStream,
    status: UnixStream,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

impl std::fmt::Debug for Standby {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standby")
            .field("supervisor_pid", &self.parts.as_ref().map(|p| p.child.id()))
            .finish_non_exhaustive()
    }
}

impl Standby {
    /// Hands the supervisor its step. Fails without side effects on the step's workspace
    /// if the supervisor is gone (the caller may take another).
    pub fn start(mut self, spec: &StepSpec) -> Result<RunningStep, SandboxError> {
        validate(spec)?;
        let payload = protocol::control_message(spec, seccomp::compiled()?)?;
        let Some(mut parts) = self.parts.take() else {
            return Err(SandboxError::Supervisor("standby already used".into()));
        };
        if let Err(e) = (&parts.control).write_all(&payload) {
            let _ = parts.child.kill();
            let _ = parts.child.wait();
            return Err(SandboxError::Supervisor(format!(
                "writing the step spec: {e}"
            )));
        }
        Ok(RunningStep {
            child: Some(parts.child),
            control: Arc::new(Mutex::new(Some(parts.control))),
            stdout: Some(parts.stdout),
            stderr: Some(parts.stderr),
            status: Some(parts.status),
            pending: Vec::new(),
        })
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        if let Some(parts) = self.parts.take() {
            let StandbyParts {
                mut child, control, ..
            } = parts;
            // EOF before a spec: the supervisor reports a spec failure and exits.
            let _ = control.shutdown(std::net::Shutdown::Both);
            let _ = std::thread::Builder::new()
                .name("kiln-sandbox-reap".to_string())
                .spawn(move || {
                    let _ = child.wait();
                });
        }
    }
}

/// A started step.
pub struct RunningStep {
    child: Option<Child>,
    /// Our end of the control socket, for writing (cancel).
    control: Arc<Mutex<Option<UnixStream>>>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    /// The same socket, for reading the outcome.
    status: Option<UnixStream>,
    /// Outcome bytes read while looking for the egress listener.
    pending: Vec<u8>,
}

impl std::fmt::Debug for RunningStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningStep")
            .field("supervisor_pid", &self.child.as_ref().map(Child::id))
            .finish_non_exhaustive()
    }
}

/// Cancels a running step from any thread: kills every process of the sandbox.
#[derive(Clone)]
pub struct Canceller {
    control: Arc<Mutex<Option<UnixStream>>>,
}

impl std::fmt::Debug for Canceller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Canceller").finish_non_exhaustive()
    }
}

fn cancel_control(control: &Mutex<Option<UnixStream>>) {
    // A poisoned lock still holds a usable socket; cancelling must always work.
    let mut guard = match control.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(mut socket) = guard.take() {
        // Any byte, or EOF (our write side shut down; the read side stays open for the
        // outcome), means "cancel".
        let _ = socket.write_all(b"c");
        let _ = socket.shutdown(std::net::Shutdown::Write);
    }
}

impl Canceller {
    pub fn cancel(&self) {
        cancel_control(&self.control);
    }
}

impl RunningStep {
    pub fn take_stdout(&mut self) -> Option<OwnedFd> {
        self.stdout.take()
    }

    pub fn take_stderr(&mut self) -> Option<OwnedFd> {
        self.stderr.take()
    }

    /// A handle the caller can clone to another thread to cancel the step (kills every
    /// process of the sandbox).
    pub fn canceller(&self) -> Canceller {
        Canceller {
            control: Arc::clone(&self.control),
        }
    }

    /// For a spec with `egress_proxy_port`: blocks until the supervisor hands over the
    /// listener it made in the step's network namespace. `None` when the sandbox failed
    /// before (the outcome then says why). The step does not run until this was sent.
    pub fn take_egress_listener(&mut self) -> Result<Option<OwnedFd>, SandboxError> {
        let Some(status) = &self.status else {
            return Ok(None);
        };
        match sys::recv_byte_with_fd(std::os::fd::AsFd::as_fd(status)) {
            Ok((Some(b'L'), Some(fd))) => Ok(Some(fd)),
            // The first byte of the outcome: keep it for `wait`.
            Ok((Some(byte), None)) => {
                self.pending.push(byte);
                Ok(None)
            }
            Ok((None, None)) => Ok(None),
            Ok(_) => Err(SandboxError::Supervisor(
                "unexpected message on the control socket".into(),
            )),
            Err(e) => Err(SandboxError::Supervisor(format!(
                "receiving the egress listener: {e}"
            ))),
        }
    }

    /// The supervisor's pid (for logs and tests).
    pub fn supervisor_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Blocks until the supervisor reports.
    pub fn wait(mut self) -> Result<StepOutcome, SandboxError> {
        let mut report = std::mem::take(&mut self.pending);
        if let Some(mut status) = self.status.take() {
            match status.read_to_end(&mut report) {
                // A cancel written just as the supervisor closed the socket resets it; the
                // kernel still hands over everything the supervisor wrote first.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                other => {
                    other?;
                }
            }
        }
        let Some(mut child) = self.child.take() else {
            return Err(SandboxError::Supervisor("already waited".to_string()));
        };
        let exit = child.wait()?;
        // The supervisor is gone; closing the control socket now cancels nothing.
        drop(self.control.lock().map(|mut g| g.take()));
        if report.is_empty() {
            return Err(SandboxError::Supervisor(format!(
                "exited ({exit}) without reporting an outcome"
            )));
        }
        serde_json::from_slice(&report).map_err(|e| {
            SandboxError::Supervisor(format!("unreadable outcome report ({exit}): {e}"))
        })
    }
}

impl Drop for RunningStep {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Dropped without wait: cancel, and reap the supervisor off-thread so no zombie
            // stays behind and the caller is not blocked.
            cancel_control(&self.control);
            if !matches!(child.try_wait(), Ok(Some(_))) {
                let _ = std::thread::Builder::new()
                    .name("kiln-sandbox-reap".to_string())
                    .spawn(move || {
                        let _ = child.wait();
                    });
            }
        }
    }
}

/// Entry point of the re-executed init; never returns.
pub fn init_main() -> ! {
    let code = supervisor::run();
    std::process::exit(code)
}

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

/// A canonical JSON description of the isolation applied to a step with this spec
/// (namespaces, mounts, seccomp policy, Landlock ABI and rules, ids, timeout), to be hashed
/// into the profile digest recorded in provenance. Object keys are sorted (serde_json's
/// default map). The host path of the workspace is left out: it differs per job while the
/// isolation does not.
pub fn profile(spec: &StepSpec, host: &HostSupport) -> Value {
    let ro = ["ro", "nosuid", "nodev"];
    let root: Vec<Value> = spec
        .root
        .iter()
        .map(|e| match e {
            RootEntry::Bind { source, target } => json!({"bind": {
                "source": source, "target": target, "recursive": true, "flags": ro}}),
            RootEntry::Symlink { path, points_to } => {
                json!({"symlink": {"path": path, "points_to": points_to}})
            }
            RootEntry::Dir { path } => json!({"dir": {"path": path}}),
        })
        .collect();
    json!({
        "profile_version": 2,
        "namespaces": NAMESPACES.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        "ids": {
            "uid_map": [0, spec.host_uid_base, spec.id_range],
            "gid_map": [0, spec.host_uid_base, spec.id_range],
            "setgroups": "deny",
            "supplementary_groups": [],
            "init_uid": 0,
            "step_uid": spec.step_uid,
            "step_gid": spec.step_uid,
        },
        "filesystem": {
            "root": {"fs": "tmpfs", "flags": ro, "pivot_root": true, "old_root": "detached"},
            "entries": root,
            "workspace": {"target": "/workspace", "flags": ["rw", "nosuid", "nodev"], "cwd": true},
            "proc": {
                "target": "/proc", "fresh": true, "pid_namespace": "the step's own",
                "flags": ["nosuid", "nodev", "noexec"],
                "read_only": {"paths": child::PROC_READ_ONLY, "flags": ["ro", "nosuid", "nodev", "noexec"]},
                "masked": {
                    "paths": child::PROC_MASKED,
                    "files": "bind of /dev/null", "directories": "empty tmpfs, ro",
                    "absent_entries": "skipped",
                },
            },
            "sys": "absent",
            "dev": {
                "fs": "tmpfs", "flags": ["ro", "nosuid", "noexec"],
                "host_nodes": child::DEV_NODES,
                "host_node_flags": ["nosuid", "noexec"],
                "symlinks": {"ptmx": "pts/ptmx", "fd": "/proc/self/fd", "stdin": "/proc/self/fd/0",
                             "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"},
                "pts": {"fs": "devpts", "options": "newinstance,ptmxmode=0666,mode=0620", "flags": ["nosuid", "noexec"]},
                "shm": {"fs": "tmpfs", "flags": ["nosuid", "nodev"], "mode": "1777", "size_bytes": spec.tmp_size_bytes},
            },
            "tmp": {"fs": "tmpfs", "flags": ["nosuid", "nodev"], "mode": "1777", "size_bytes": spec.tmp_size_bytes},
        },
        "hostname": spec.hostname,
        "capabilities": {"bounding": [], "permitted": [], "effective": [], "inheritable": [], "ambient": []},
        "no_new_privs": true,
        "landlock": landlock_rules::describe(
            host.landlock_abi,
            &spec.tcp_connect_ports,
            spec.waived_layers.iter().any(|l| l == "landlock"),
        ),
        "network": {
            "namespace": "new, no interface but loopback, no route",
            "loopback": if spec.egress_proxy_port.is_some() { "up" } else { "down" },
            "egress_proxy": spec.egress_proxy_port.map(|port| format!("127.0.0.1:{port}")),
            "tcp_connect_ports": spec.tcp_connect_ports,
        },
        "waived_layers": spec.waived_layers,
        "seccomp": seccomp::describe(&host.seccomp_policy_sha256),
        "rlimits": {"core": 0, "nofile": spec.limits.nofile, "fsize": spec.limits.fsize_bytes},
        "cgroup": {
            "mode": host.cgroup.mode,
            "controllers": host.cgroup.controllers,
            "namespace": "rooted at the step's own cgroup",
            "memory_bytes": spec.limits.memory_bytes,
            "swap": "none",
            "pids": spec.limits.pids,
            "cpu_millis": spec.limits.cpu_millis,
            "cpu_period_us": 100_000,
        },
        "umask": "0022",
        "signals": "default dispositions, none blocked",
        "parent_death_signal": "SIGKILL",
        "init": {"pid": 1, "dumpable": false, "kills_namespace_on_step_exit": true,
                 "session": "new, no controlling terminal"},
        "timeout_ms": spec.timeout_ms,
    })
}

/// The env value of `key` in a spec environment (last one wins, as in execve users).
pub(crate) fn env_get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiver_decision() {
        let none: Vec<String> = vec![];
        let landlock = vec!["landlock".to_string()];
        // Host with Landlock: nothing waived, whatever the config says.
        assert_eq!(decide_waivers(7, &none).ok(), Some(vec![]));
        assert_eq!(decide_waivers(1, &landlock).ok(), Some(vec![]));
        // Host without: refused unless waived, and then exactly that layer.
        match decide_waivers(0, &none) {
            Err(SandboxError::Unsupported { layer, .. }) => assert_eq!(layer, "landlock"),
            other => panic!("{other:?}"),
        }
        assert!(decide_waivers(-1, &none).is_err());
        assert_eq!(decide_waivers(0, &landlock).ok(), Some(landlock.clone()));
        // Only known layers, once each.
        for bad in [
            vec!["seccomp".to_string()],
            vec!["Landlock".to_string()],
            vec!["landlock".to_string(), "landlock".to_string()],
        ] {
            assert!(matches!(
                decide_waivers(0, &bad),
                Err(SandboxError::InvalidSpec(_))
            ));
            assert!(decide_waivers(7, &bad).is_err());
        }
    }

    #[test]
    fn control_message_carries_the_compiled_program() -> Result<(), SandboxError> {
        let spec = StepSpec {
            argv: vec!["true".into()],
            env: vec![],
            root: vec![],
            workspace: "/w".into(),
            host_uid_base: 100_000,
            id_range: 65536,
            step_uid: 1000,
            timeout_ms: 1000,
            hostname: "h".into(),
            tmp_size_bytes: 1 << 20,
            limits: Limits::default(),
            tcp_connect_ports: vec![],
            egress_proxy_port: None,
            waived_layers: vec![],
        };
        let policy = seccomp::compiled()?;
        let line = protocol::control_message(&spec, policy)?;
        assert_eq!(line.last(), Some(&b'\n'));
        let msg: protocol::ControlMessage = serde_json::from_slice(&line)?;
        assert_eq!(msg.spec.argv, spec.argv);
        let received =
            seccomp::CompiledPolicy::decode(&msg.seccomp_bpf).map_err(SandboxError::Seccomp)?;
        assert_eq!(&received, policy);
        Ok(())
    }

    #[test]
    fn canceller_is_send_sync_clone() {
        fn is<T: Send + Sync + Clone>() {}
        is::<Canceller>();
    }
}
