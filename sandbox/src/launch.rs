//! Starting steps: the sandbox launcher, supervisors started ahead of their step, and
//! a running step (its output pipes, the egress listener, cancellation, its outcome).

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::spec::{validate, StepOutcome, StepSpec};
use crate::{cgroup, protocol, seccomp, sys};
use crate::{decide_waivers, namespace_flags, HostSupport, SandboxError, INIT_ARG, NAMESPACES};

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
        if let Some(status) = self.status.take() {
            read_report(status, &mut report)?;
        }
        let Some(mut child) = self.child.take() else {
            return Err(SandboxError::Supervisor("already waited".to_string()));
        };
        if let Some(line) = report.strip_suffix(b"\n") {
            // The report is the supervisor's last act: the step's every process is gone
            // and its cgroup removed by then. Its own exit (its memory, its network
            // namespace) is not waited for; it is reaped later.
            let outcome = serde_json::from_slice(line)
                .map_err(|e| SandboxError::Supervisor(format!("unreadable outcome report: {e}")));
            reap_later(child);
            return outcome;
        }
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

/// The longest outcome report read: its text fields are bounded far below this.
const MAX_REPORT_BYTES: usize = 16 << 20;

/// Reads the supervisor's outcome report up to its newline, or to EOF.
fn read_report(mut status: UnixStream, report: &mut Vec<u8>) -> Result<(), SandboxError> {
    let mut chunk = [0u8; 4096];
    while !report.ends_with(b"\n") {
        if report.len() > MAX_REPORT_BYTES {
            return Err(SandboxError::Supervisor("outcome report too large".into()));
        }
        match status.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => report.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A cancel written just as the supervisor closed the socket resets it; the
            // kernel still handed over everything the supervisor wrote first.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Supervisors that reported and are exiting: reaped by the next call, so none stays a
/// zombie for longer than the next step's end and no thread waits for them.
static EXITING: Mutex<Vec<Child>> = Mutex::new(Vec::new());

fn reap_later(child: Child) {
    let mut exiting = EXITING.lock().unwrap_or_else(|p| p.into_inner());
    // Kept only while still running: reaped, or not ours to wait for any more, it goes.
    exiting.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
    exiting.push(child);
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
