//! An executor without isolation, for the state machine's unit tests: a step is a
//! script (what it writes into the workspace, prints, and how it ends), run without
//! root, namespaces or mounts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use sandbox::{ResourceUsage, StepOutcome, StepSpec, StepStatus};

use super::{Cancel, Execution, Executor};
use crate::error::{Result, RunnerError};

/// What one fake step does.
#[derive(Debug, Clone)]
pub struct Script {
    /// Files written into the workspace, relative path -> content.
    pub writes: Vec<(String, Vec<u8>)>,
    pub stdout: Vec<u8>,
    pub status: StepStatus,
    /// Runs until cancelled, or until its timeout (then it ends as timed out).
    pub hold: bool,
}

impl Script {
    pub fn exits(code: i32) -> Self {
        Self {
            writes: Vec::new(),
            stdout: Vec::new(),
            status: StepStatus::Exited { code },
            hold: false,
        }
    }

    pub fn holds() -> Self {
        Self {
            hold: true,
            ..Self::exits(0)
        }
    }

    pub fn writing(mut self, path: &str, content: &[u8]) -> Self {
        self.writes.push((path.to_string(), content.to_vec()));
        self
    }

    pub fn printing(mut self, text: &[u8]) -> Self {
        self.stdout = text.to_vec();
        self
    }
}

type Choose = dyn Fn(&StepSpec) -> Result<Script> + Send + Sync;

/// Runs each step by the script `choose` picks for it (by argv, say).
pub struct FakeExecutor {
    choose: Box<Choose>,
    /// The specs of the steps started, in order.
    pub started: Mutex<Vec<StepSpec>>,
    /// Cancels of the steps that hold, so a test can wait until a step is running.
    pub running: Mutex<Vec<Cancel>>,
    running_changed: Condvar,
}

impl FakeExecutor {
    pub fn new(choose: impl Fn(&StepSpec) -> Result<Script> + Send + Sync + 'static) -> Self {
        Self {
            choose: Box::new(choose),
            started: Mutex::new(Vec::new()),
            running: Mutex::new(Vec::new()),
            running_changed: Condvar::new(),
        }
    }

    /// Waits until `n` holding steps have started.
    pub fn wait_running(&self, n: usize) {
        let mut running = self.running.lock().unwrap();
        while running.len() < n {
            running = self.running_changed.wait(running).unwrap();
        }
    }
}

impl Executor for FakeExecutor {
    fn waived_layers(&self) -> &[String] {
        &[]
    }

    fn profile_digest(&self, _spec: &StepSpec) -> Result<String> {
        Ok("f".repeat(64))
    }

    fn create_workspace(
        &self,
        enclosure: &Path,
        _enclosure_owner: u32,
        workspace: &Path,
        _quota: u64,
        _step_owner: u32,
    ) -> Result<()> {
        std::fs::create_dir(enclosure).map_err(RunnerError::io_path("creating", enclosure))?;
        std::fs::create_dir(workspace).map_err(RunnerError::io_path("creating", workspace))
    }

    fn give_workspace(&self, _workspace: &Path, _owner: u32) -> Result<()> {
        Ok(())
    }

    fn resize_workspace(&self, _workspace: &Path, _bytes: u64) -> Result<(), nix::Error> {
        Ok(())
    }

    fn workspace_usage(&self, _workspace: &Path) -> Option<(u64, bool)> {
        Some((0, false))
    }

    fn release_workspace(&self, _workspace: &Path) -> Result<(), nix::Error> {
        Err(nix::errno::Errno::EINVAL)
    }

    fn start(&self, spec: &StepSpec) -> Result<Box<dyn Execution>> {
        self.started.lock().unwrap().push(spec.clone());
        let script = (self.choose)(spec)?;
        for (path, content) in &script.writes {
            let dest = spec.workspace.join(path);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).unwrap();
            }
            std::fs::write(dest, content).unwrap();
        }
        let cancelled = Arc::new((Mutex::new(false), Condvar::new()));
        let execution = FakeExecution {
            stdout: Some(pipe_with(&script.stdout)),
            stderr: Some(pipe_with(b"")),
            timeout: Duration::from_millis(spec.timeout_ms),
            script,
            cancelled,
        };
        if execution.script.hold {
            self.running.lock().unwrap().push(execution.canceller());
            self.running_changed.notify_all();
        }
        Ok(Box::new(execution))
    }

    fn replenish(&self) {}
}

/// The read end of a pipe that yields `bytes`, then EOF.
fn pipe_with(bytes: &[u8]) -> OwnedFd {
    let (read, write) = nix::unistd::pipe().unwrap();
    let bytes = bytes.to_vec();
    std::thread::spawn(move || {
        let mut file = std::fs::File::from(write);
        let _ = file.write_all(&bytes);
    });
    read
}

struct FakeExecution {
    script: Script,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    timeout: Duration,
    cancelled: Arc<(Mutex<bool>, Condvar)>,
}

impl Execution for FakeExecution {
    fn canceller(&self) -> Cancel {
        let cancelled = self.cancelled.clone();
        Arc::new(move || {
            *cancelled.0.lock().unwrap() = true;
            cancelled.1.notify_all();
        })
    }

    fn take_stdout(&mut self) -> Option<OwnedFd> {
        self.stdout.take()
    }

    fn take_stderr(&mut self) -> Option<OwnedFd> {
        self.stderr.take()
    }

    fn take_egress_listener(&mut self) -> Result<Option<OwnedFd>> {
        Ok(None)
    }

    fn wait(self: Box<Self>) -> Result<StepOutcome> {
        let (lock, changed) = &*self.cancelled;
        let cancelled = lock.lock().unwrap();
        let status = if self.script.hold {
            let (cancelled, waited) = changed
                .wait_timeout_while(cancelled, self.timeout, |c| !*c)
                .unwrap();
            if *cancelled {
                StepStatus::Cancelled
            } else if waited.timed_out() {
                StepStatus::TimedOut
            } else {
                self.script.status.clone()
            }
        } else if *cancelled {
            StepStatus::Cancelled
        } else {
            self.script.status.clone()
        };
        Ok(StepOutcome {
            status,
            duration_ms: 1,
            seccomp_denials: BTreeMap::new(),
            usage: ResourceUsage::default(),
            exec_monotonic_ns: Some(sandbox::monotonic_now_ns()),
        })
    }
}
