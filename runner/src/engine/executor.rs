//! The seam between the job state machine and what isolates a step: the engine asks an
//! [`Executor`] for a job's workspace and for each step's run, and never touches
//! namespaces, mounts or supervisors itself. [`SandboxExecutor`] is the real one (the
//! `sandbox` crate, a tmpfs quota per workspace, supervisors started ahead); the unit
//! tests of the state machine drive the same engine through a fake (`fake.rs`),
//! without root.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use sandbox::{HostSupport, RunningStep, Sandbox, StepOutcome, StepSpec};

use crate::engine::profile::ProfileDigests;
use crate::error::{Result, RunnerError};

#[cfg(test)]
pub(crate) mod fake;

/// Stops a running step (kills every process of it); callable from any thread, more
/// than once.
pub type Cancel = Arc<dyn Fn() + Send + Sync>;

/// What runs a job's steps in isolation.
pub trait Executor: Send + Sync {
    /// The sandbox layers this host runs without, by the operator's waiver (every link
    /// names them).
    fn waived_layers(&self) -> &[String];

    /// The digest of the sandbox profile a step with `spec` runs under.
    fn profile_digest(&self, spec: &StepSpec) -> Result<String>;

    /// Makes the job's enclosure (`enclosure`, 0700, owned by `enclosure_owner`) and the
    /// empty workspace inside it, limited to `quota` bytes and owned by `step_owner`.
    fn create_workspace(
        &self,
        enclosure: &Path,
        enclosure_owner: u32,
        workspace: &Path,
        quota: u64,
        step_owner: u32,
    ) -> Result<()>;

    /// Gives every entry of the workspace to `owner` (after the inputs were copied in).
    fn give_workspace(&self, workspace: &Path, owner: u32) -> Result<()>;

    /// Sets the workspace's quota for the next step; fails when it holds more.
    fn resize_workspace(&self, workspace: &Path, bytes: u64) -> Result<(), nix::Error>;

    /// Bytes used in the workspace, and whether its quota was reached.
    fn workspace_usage(&self, workspace: &Path) -> Option<(u64, bool)>;

    /// Releases the workspace's quota (EINVAL: there was none). The caller removes the
    /// directories.
    fn release_workspace(&self, workspace: &Path) -> Result<(), nix::Error>;

    /// Starts a step. Blocks for as long as handing the step over takes.
    fn start(&self, spec: &StepSpec) -> Result<Box<dyn Execution>>;

    /// Gets ready for the next steps (off the path of any step).
    fn replenish(&self);
}

/// A step that runs.
pub trait Execution: Send {
    fn canceller(&self) -> Cancel;
    fn take_stdout(&mut self) -> Option<OwnedFd>;
    fn take_stderr(&mut self) -> Option<OwnedFd>;
    /// For a step with an egress proxy port: blocks until the listener made in the
    /// step's network namespace is handed over (`None`: the sandbox failed before).
    fn take_egress_listener(&mut self) -> Result<Option<OwnedFd>>;
    /// Blocks until the step ended.
    fn wait(self: Box<Self>) -> Result<StepOutcome>;
}

/// Idle supervisors kept waiting at most: each is a few MB, and steps starting at the
/// same moment beyond this many spawn their own.
const MAX_STANDBY: usize = 4;

/// Steps in the `sandbox` crate's namespaces, with supervisors started ahead.
pub struct SandboxExecutor {
    inner: Arc<SandboxInner>,
}

struct SandboxInner {
    sandbox: Sandbox,
    host: HostSupport,
    profiles: ProfileDigests,
    /// Supervisors started ahead of their steps.
    standby: Mutex<Vec<sandbox::Standby>>,
    /// How many to keep waiting: one per job slot, at most [`MAX_STANDBY`].
    standby_wanted: usize,
}

impl SandboxExecutor {
    pub fn new(sandbox: Sandbox, host: HostSupport, job_slots: u32) -> Self {
        Self {
            inner: Arc::new(SandboxInner {
                sandbox,
                host,
                profiles: ProfileDigests::default(),
                standby: Mutex::new(Vec::new()),
                standby_wanted: (job_slots as usize).min(MAX_STANDBY),
            }),
        }
    }
}

impl SandboxInner {
    /// A supervisor for the next step: one already waiting, else a fresh one.
    fn take_standby(&self) -> Result<sandbox::Standby> {
        match self.standby.lock().ok().and_then(|mut pool| pool.pop()) {
            Some(waiting) => Ok(waiting),
            None => Ok(self.sandbox.standby()?),
        }
    }

    fn fill_standby(&self) {
        let full = || {
            self.standby
                .lock()
                .map_or(true, |p| p.len() >= self.standby_wanted)
        };
        while !full() {
            match self.sandbox.standby() {
                Ok(standby) => {
                    if let Ok(mut pool) = self.standby.lock() {
                        if pool.len() < self.standby_wanted {
                            pool.push(standby);
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "could not start a standby supervisor");
                    return;
                }
            }
        }
    }
}

impl Executor for SandboxExecutor {
    fn waived_layers(&self) -> &[String] {
        &self.inner.host.waived_layers
    }

    fn profile_digest(&self, spec: &StepSpec) -> Result<String> {
        self.inner.profiles.digest(spec, &self.inner.host)
    }

    fn create_workspace(
        &self,
        enclosure: &Path,
        enclosure_owner: u32,
        workspace: &Path,
        quota: u64,
        step_owner: u32,
    ) -> Result<()> {
        crate::engine::enclosure::make_enclosure(enclosure, enclosure_owner)?;
        std::fs::create_dir(workspace).map_err(RunnerError::io_path("creating", workspace))?;
        crate::limits::mount_workspace(workspace, quota, step_owner)
    }

    fn give_workspace(&self, workspace: &Path, owner: u32) -> Result<()> {
        crate::engine::workspace::chown_tree(workspace, owner)
    }

    fn resize_workspace(&self, workspace: &Path, bytes: u64) -> Result<(), nix::Error> {
        crate::limits::resize_workspace(workspace, bytes)
    }

    fn workspace_usage(&self, workspace: &Path) -> Option<(u64, bool)> {
        crate::limits::workspace_usage(workspace)
    }

    fn release_workspace(&self, workspace: &Path) -> Result<(), nix::Error> {
        crate::limits::unmount_workspace(workspace)
    }

    fn start(&self, spec: &StepSpec) -> Result<Box<dyn Execution>> {
        let running = match self.inner.take_standby()?.start(spec) {
            Ok(running) => running,
            // A waiting supervisor that died meanwhile: once more, with a fresh one.
            Err(sandbox::SandboxError::Supervisor(reason)) => {
                tracing::warn!(%reason, "standby supervisor unusable; starting another");
                self.inner.sandbox.spawn(spec)?
            }
            Err(other) => return Err(RunnerError::from(other)),
        };
        Ok(Box::new(SandboxExecution(running)))
    }

    /// Keeps the supervisors' pool full, on a blocking thread: replacing the one a step
    /// took is done after that step's sandbox is set up, so that the exec does not
    /// compete with it for a small host's CPU.
    fn replenish(&self) {
        let inner = self.inner.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || inner.fill_standby());
            }
            Err(_) => inner.fill_standby(),
        }
    }
}

struct SandboxExecution(RunningStep);

impl Execution for SandboxExecution {
    fn canceller(&self) -> Cancel {
        let canceller = self.0.canceller();
        Arc::new(move || canceller.cancel())
    }

    fn take_stdout(&mut self) -> Option<OwnedFd> {
        self.0.take_stdout()
    }

    fn take_stderr(&mut self) -> Option<OwnedFd> {
        self.0.take_stderr()
    }

    fn take_egress_listener(&mut self) -> Result<Option<OwnedFd>> {
        Ok(self.0.take_egress_listener()?)
    }

    fn wait(self: Box<Self>) -> Result<StepOutcome> {
        Ok(self.0.wait()?)
    }
}
