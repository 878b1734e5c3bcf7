//! The engine's event bus: what happened to jobs and steps, announced to observers (the
//! audit log, metrics) at the points where the engine commits it.
//!
//! Observers are called synchronously, on the thread that emits. Job state changes are
//! emitted from the blocking code that committed the job's record, right after the
//! commit, so an observer that writes durably (the audit log) is durable when the
//! state change is, before anyone is told of it.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use agent_proto::v1::{Job, JobState, StepResult, StepState};

use crate::engine::jobs::Runner;

/// One thing the engine did.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// A job was accepted (`from` is `None`) or changed state, committed.
    JobStateChanged {
        job_id: String,
        /// The owner key of the principal that submitted it.
        owner: String,
        /// The owner's tenant, where known.
        tenant: Option<String>,
        from: Option<JobState>,
        to: JobState,
        reason: String,
    },
    /// A step ended, whatever its state.
    StepFinished {
        job_id: String,
        step: String,
        state: StepState,
        duration: Duration,
        /// From the step's scheduling to its command's exec.
        start_latency: Duration,
    },
    /// A sandbox layer could not be set up for a step.
    SandboxSetupFailed { layer: String },
    /// System calls the step's seccomp filter denied (its total over the step).
    SeccompDenials { job_id: String, count: u64 },
    /// A step's network record: its egress proxy's decisions and the bytes relayed.
    Egress {
        job_id: String,
        allowed: u64,
        denied: u64,
        bytes_up: u64,
        bytes_down: u64,
    },
}

/// The name a job state has in labels.
pub fn state_label(state: JobState) -> &'static str {
    match state {
        JobState::Unspecified => "unspecified",
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::Error => "error",
    }
}

/// What observes the engine. Called on the emitting thread, which may be a blocking
/// thread holding a job's commit: observers do their work and return, and never call
/// back into the engine.
pub trait Observer: Send + Sync {
    fn observe(&self, event: &EngineEvent);
}

/// The observers of one runner.
#[derive(Default)]
pub struct Bus {
    observers: RwLock<Vec<Arc<dyn Observer>>>,
}

impl Bus {
    pub fn subscribe(&self, observer: Arc<dyn Observer>) {
        match self.observers.write() {
            Ok(mut observers) => observers.push(observer),
            Err(poisoned) => poisoned.into_inner().push(observer),
        }
    }

    pub fn emit(&self, event: &EngineEvent) {
        let observers = match self.observers.read() {
            Ok(o) => o.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        for observer in observers {
            observer.observe(event);
        }
    }

    /// The events a finished step's result reports: its timings, its seccomp denials
    /// and its network record.
    pub fn step_finished(&self, job_id: &str, result: &StepResult) {
        self.emit(&EngineEvent::StepFinished {
            job_id: job_id.to_string(),
            step: result.name.clone(),
            state: StepState::try_from(result.state).unwrap_or(StepState::Error),
            duration: Duration::from_millis(result.duration_ms),
            start_latency: Duration::from_micros(result.start_latency_us),
        });
        let denials: u64 = result.seccomp_denials.values().sum();
        if denials > 0 {
            self.emit(&EngineEvent::SeccompDenials {
                job_id: job_id.to_string(),
                count: denials,
            });
        }
        if !result.network.is_empty() || result.network_unrecorded > 0 {
            let allowed = result
                .network
                .iter()
                .filter(|a| a.decision == "allowed")
                .count() as u64;
            self.emit(&EngineEvent::Egress {
                job_id: job_id.to_string(),
                allowed,
                // Attempts beyond the record were not relayed: count them as denied.
                denied: result.network.len() as u64 - allowed + result.network_unrecorded,
                bytes_up: result.network.iter().map(|a| a.bytes_up).sum(),
                bytes_down: result.network.iter().map(|a| a.bytes_down).sum(),
            });
        }
    }
}

impl Runner {
    /// Announces the committed state of `job`, which was in state `from` (`None`: it was
    /// just accepted). Call it from the blocking code that committed the record.
    pub(crate) fn announce_state(&self, job: &Job, from: Option<JobState>) {
        let owner = match self.db.owner_of(&job.job_id) {
            Ok(Some(owner)) => owner,
            Ok(None) => "unknown".to_string(),
            Err(err) => {
                tracing::warn!(job = %job.job_id, error = %err, "could not read the job's owner");
                "unknown".to_string()
            }
        };
        self.bus.emit(&EngineEvent::JobStateChanged {
            job_id: job.job_id.clone(),
            tenant: crate::tenants::tenant_of_owner(&owner).map(str::to_string),
            owner,
            from,
            to: JobState::try_from(job.state).unwrap_or(JobState::Unspecified),
            reason: job.message.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Seen(Mutex<Vec<EngineEvent>>);
    impl Observer for Seen {
        fn observe(&self, event: &EngineEvent) {
            self.0.lock().unwrap().push(event.clone());
        }
    }

    #[test]
    fn a_step_result_is_told_as_timings_denials_and_egress() {
        let bus = Bus::default();
        let seen = Arc::new(Seen::default());
        bus.subscribe(seen.clone());
        let result = StepResult {
            name: "build".into(),
            state: StepState::Failed as i32,
            duration_ms: 1500,
            start_latency_us: 2500,
            seccomp_denials: [("mount".to_string(), 2), ("ptrace".to_string(), 1)].into(),
            network: vec![
                agent_proto::v1::NetworkAttempt {
                    decision: "allowed".into(),
                    bytes_up: 10,
                    bytes_down: 20,
                    ..Default::default()
                },
                agent_proto::v1::NetworkAttempt {
                    decision: "denied".into(),
                    ..Default::default()
                },
            ],
            network_unrecorded: 3,
            ..Default::default()
        };
        bus.step_finished("j", &result);
        let seen = seen.0.lock().unwrap();
        assert_eq!(
            seen[0],
            EngineEvent::StepFinished {
                job_id: "j".into(),
                step: "build".into(),
                state: StepState::Failed,
                duration: Duration::from_millis(1500),
                start_latency: Duration::from_micros(2500),
            }
        );
        assert_eq!(
            seen[1],
            EngineEvent::SeccompDenials {
                job_id: "j".into(),
                count: 3
            }
        );
        assert_eq!(
            seen[2],
            EngineEvent::Egress {
                job_id: "j".into(),
                allowed: 1,
                denied: 4,
                bytes_up: 10,
                bytes_down: 20
            }
        );
    }
}
