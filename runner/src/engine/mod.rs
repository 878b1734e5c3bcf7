//! Running jobs: the runner and its scheduler, a job's run, its workspace, a step in
//! the sandbox and its logs, Watch events, outcomes and limits, attestation and
//! signing, host id ranges.

pub mod attest;
pub mod bus;
pub(crate) mod enclosure;
pub(crate) mod end;
pub mod executor;
pub mod fairqueue;
pub mod idranges;
pub mod jobs;
mod logs;
#[cfg(test)]
mod machine_tests;
pub mod outcome;
pub mod profile;
mod publish;
mod run;
mod scheduler;
pub mod signer;
pub(crate) mod step;
pub mod watch;
mod workspace;

use std::time::{SystemTime, UNIX_EPOCH};

/// The runner's version, as links and provenance record it.
pub const RUNNER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Milliseconds since the epoch, as job records keep times.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        // Saturates, some 292 million years from now.
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
