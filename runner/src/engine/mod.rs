//! Running jobs: the scheduler and job state machine, a step in the sandbox, Watch
//! events, outcomes and limits, attestation and signing, host id ranges.

pub mod attest;
pub mod idranges;
pub mod jobs;
pub mod outcome;
pub mod profile;
pub mod signer;
pub mod watch;
