//! Messages from the sandbox (pid 1 and the step before exec) to the supervisor, one JSON
//! document per line on the CLOEXEC error pipe. A successful exec closes the step's copy, so
//! the pipe carries nothing from the untrusted program.

use std::os::fd::{AsFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::seccomp::CompiledPolicy;
use crate::StepSpec;

/// What the daemon sends the supervisor on the control socket (one JSON line): the spec and
/// the seccomp program the daemon compiled once at start-up, so no step compiles it.
#[derive(Debug, Deserialize)]
pub(crate) struct ControlMessage {
    pub spec: StepSpec,
    /// The program, one packed instruction per element (see `CompiledPolicy::encoded`).
    pub seccomp_bpf: Vec<u64>,
}

/// Encodes a [`ControlMessage`], newline-terminated.
pub(crate) fn control_message(
    spec: &StepSpec,
    policy: &CompiledPolicy,
) -> Result<Vec<u8>, serde_json::Error> {
    #[derive(Serialize)]
    struct Out<'a> {
        spec: &'a StepSpec,
        seccomp_bpf: Vec<u64>,
    }
    let mut line = serde_json::to_vec(&Out {
        spec,
        seccomp_bpf: policy.encoded(),
    })?;
    line.push(b'\n');
    Ok(line)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Report {
    /// A layer could not be set up.
    Setup { layer: String, message: String },
    /// The step is about to execve (CLOCK_MONOTONIC, ns): the end of the sandbox's
    /// start-up, for the daemon's step-start latency.
    Execing { monotonic_ns: u64 },
    /// execve failed.
    Exec { errno: i32, message: String },
    /// pid 1 saw the step exit with this code.
    Exited { code: i32 },
    /// pid 1 saw the step killed by this signal.
    Signaled { signal: i32 },
}

/// Writes one report in a single write (under PIPE_BUF, so never interleaved).
pub(crate) fn send(pipe: &OwnedFd, report: &Report) {
    let shorten = |m: &str| m.chars().take(1500).collect::<String>();
    let report = match report {
        Report::Setup { layer, message } => Report::Setup {
            layer: layer.clone(),
            message: shorten(message),
        },
        Report::Exec { errno, message } => Report::Exec {
            errno: *errno,
            message: shorten(message),
        },
        other => other.clone(),
    };
    if let Ok(mut line) = serde_json::to_vec(&report) {
        line.push(b'\n');
        // Nothing to do if the supervisor is gone: it is then killing us anyway.
        let _ = nix::unistd::write(pipe.as_fd(), &line);
    }
}

/// Parses every complete report; junk lines are ignored (they can only come from a bug).
pub(crate) fn parse(bytes: &[u8]) -> Vec<Report> {
    bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect()
}
