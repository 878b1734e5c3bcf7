//! Messages from the sandbox (pid 1 and the step before exec) to the supervisor, one JSON
//! document per line on the CLOEXEC error pipe. A successful exec closes the step's copy, so
//! the pipe carries nothing from the untrusted program.

use std::os::fd::{AsFd, OwnedFd};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Report {
    /// A layer could not be set up.
    Setup { layer: String, message: String },
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
