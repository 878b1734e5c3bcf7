//! What the end of a step means for its record: the state, exit code, signal and message
//! that the sandbox's status maps to, and which resource limit the step ran into. Pure
//! functions: the process-style exit codes and the limit reasons are part of the API.

use agent_proto::v1::StepState;
use sandbox::StepStatus;

use crate::limits::Effective;
use crate::units::format_size;

/// A step's record, as its status decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub state: StepState,
    /// The step's own code; 128+N killed by signal N (a timeout or cancel kills with
    /// SIGKILL: 137); 126 not executable; 127 not found.
    pub exit_code: i32,
    /// The signal that killed the step, 0 if none.
    pub signal: i32,
    /// Empty for a step that succeeded.
    pub message: String,
}

/// The verdict for a step that ran (or failed to exec); `None` for a sandbox that could
/// not be set up, which the caller reports with the layer that failed.
pub fn verdict(status: &StepStatus, timeout_seconds: u32, program: &str) -> Option<Verdict> {
    let killed = |state, message: String| Verdict {
        state,
        exit_code: 128 + libc::SIGKILL,
        signal: libc::SIGKILL,
        message,
    };
    Some(match status {
        StepStatus::Exited { code: 0 } => Verdict {
            state: StepState::Succeeded,
            exit_code: 0,
            signal: 0,
            message: String::new(),
        },
        StepStatus::Exited { code } => Verdict {
            state: StepState::Failed,
            exit_code: *code,
            signal: 0,
            message: format!("exited with code {code}"),
        },
        StepStatus::Signaled { signal } => Verdict {
            state: StepState::Failed,
            exit_code: 128 + signal,
            signal: *signal,
            message: format!("killed by signal {signal}"),
        },
        StepStatus::TimedOut => killed(
            StepState::TimedOut,
            format!("timed out after {timeout_seconds} s; every process of the step was killed"),
        ),
        StepStatus::Cancelled => killed(
            StepState::Cancelled,
            "cancelled; every process of the step was killed".into(),
        ),
        StepStatus::ExecFailed { errno, message } => Verdict {
            state: StepState::Failed,
            exit_code: if *errno == libc::ENOENT { 127 } else { 126 },
            signal: 0,
            message: format!("cannot execute {program:?}: {message}"),
        },
        StepStatus::SetupFailed { .. } => return None,
    })
}

/// The limits a step ran into.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitsHit {
    pub timed_out: bool,
    /// The OOM killer killed a process of the step's cgroup.
    pub oom_killed: bool,
    /// A fork failed at the pids limit.
    pub pids_limit_hit: bool,
    /// The workspace quota was full when the step ended.
    pub quota_hit: bool,
}

impl LimitsHit {
    /// The reason reported (`StepResult.limit_reason`): the first limit hit in the order
    /// timeout, oom, pids, disk-quota; empty when none was.
    pub fn reason(&self) -> &'static str {
        [
            (self.timed_out, "timeout"),
            (self.oom_killed, "oom"),
            (self.pids_limit_hit, "pids"),
            (self.quota_hit, "disk-quota"),
        ]
        .iter()
        .find(|(hit, _)| *hit)
        .map(|(_, name)| *name)
        .unwrap_or_default()
    }

    /// The step's message: the verdict's, then a note per resource limit hit (the
    /// timeout is in the verdict already).
    pub fn message(&self, verdict: &str, limits: &Effective) -> String {
        let mut notes = vec![verdict.to_string()];
        if self.oom_killed {
            notes.push(format!(
                "the memory limit of {} was reached: the OOM killer killed a process of the step",
                format_size(limits.memory_bytes)
            ));
        }
        if self.pids_limit_hit {
            notes.push(format!(
                "the pids limit of {} was reached: a fork failed",
                limits.pids
            ));
        }
        if self.quota_hit {
            notes.push(format!(
                "the workspace quota of {} was reached: writes failed with ENOSPC",
                format_size(limits.disk_bytes)
            ));
        }
        notes.retain(|n| !n.is_empty());
        notes.join("; ")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn codes(status: StepStatus) -> (StepState, i32, i32) {
        let v = verdict(&status, 30, "cc").unwrap();
        (v.state, v.exit_code, v.signal)
    }

    #[test]
    fn statuses_map_to_process_style_exit_codes() {
        assert_eq!(
            codes(StepStatus::Exited { code: 0 }),
            (StepState::Succeeded, 0, 0)
        );
        assert_eq!(
            codes(StepStatus::Exited { code: 3 }),
            (StepState::Failed, 3, 0)
        );
        assert_eq!(
            codes(StepStatus::Signaled { signal: 11 }),
            (StepState::Failed, 139, 11)
        );
        assert_eq!(codes(StepStatus::TimedOut), (StepState::TimedOut, 137, 9));
        assert_eq!(codes(StepStatus::Cancelled), (StepState::Cancelled, 137, 9));
        let not_found = StepStatus::ExecFailed {
            errno: libc::ENOENT,
            message: "No such file or directory".into(),
        };
        assert_eq!(codes(not_found), (StepState::Failed, 127, 0));
        let not_executable = StepStatus::ExecFailed {
            errno: libc::EACCES,
            message: "Permission denied".into(),
        };
        let v = verdict(&not_executable, 30, "./build.sh").unwrap();
        assert_eq!(v.exit_code, 126);
        assert_eq!(
            v.message,
            "cannot execute \"./build.sh\": Permission denied"
        );
        let setup = StepStatus::SetupFailed {
            layer: "landlock".into(),
            message: "x".into(),
        };
        assert_eq!(verdict(&setup, 30, "cc"), None);
        assert_eq!(
            verdict(&StepStatus::TimedOut, 30, "cc").unwrap().message,
            "timed out after 30 s; every process of the step was killed"
        );
    }

    #[test]
    fn the_first_limit_hit_is_the_reason_and_each_gets_a_note() {
        let limits = Effective {
            memory_bytes: 512 << 20,
            pids: 64,
            cpu_millis: 1000,
            disk_bytes: 1 << 30,
            nofile: 1024,
            fsize_bytes: 1 << 30,
        };
        assert_eq!(LimitsHit::default().reason(), "");
        assert_eq!(LimitsHit::default().message("", &limits), "");
        let all = LimitsHit {
            timed_out: true,
            oom_killed: true,
            pids_limit_hit: true,
            quota_hit: true,
        };
        assert_eq!(all.reason(), "timeout");
        let memory_and_disk = LimitsHit {
            oom_killed: true,
            quota_hit: true,
            ..Default::default()
        };
        assert_eq!(memory_and_disk.reason(), "oom");
        assert_eq!(
            memory_and_disk.message("killed by signal 9", &limits),
            "killed by signal 9; the memory limit of 512 MiB was reached: the OOM killer killed \
             a process of the step; the workspace quota of 1 GiB was reached: writes failed \
             with ENOSPC"
        );
        let pids = LimitsHit {
            pids_limit_hit: true,
            ..Default::default()
        };
        assert_eq!(pids.reason(), "pids");
        assert_eq!(
            pids.message("", &limits),
            "the pids limit of 64 was reached: a fork failed"
        );
    }
}
