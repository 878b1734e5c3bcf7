//! Running jobs: the runner and its scheduler, a job's run, its workspace, a step in
//! the sandbox and its logs, Watch events, outcomes and limits, attestation and
//! signing, host id ranges.

pub mod attest;
pub mod idranges;
pub mod jobs;
mod logs;
pub mod outcome;
pub mod profile;
mod run;
mod scheduler;
pub mod signer;
mod step;
pub mod watch;
mod workspace;
