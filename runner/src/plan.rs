//! The domain model of a job the runner accepted: a [`ValidatedJob`] is made only by
//! validating a submitted spec (`spec::validate`, against the caller's caps) and holds,
//! computed once, what the engine runs each step with: its limits after defaults, its
//! timeout and its parsed network allow-list. Nothing downstream re-parses the spec.

use agent_proto::v1::{JobSpec, Step};

use crate::config::Config;
use crate::egress::netpolicy::AllowList;
use crate::error::{Result, RunnerError};
use crate::limits::Effective;
use crate::spec::SpecLimits;

/// A job spec that passed validation, with its steps' plans.
#[derive(Debug, Clone)]
pub struct ValidatedJob {
    spec: JobSpec,
    steps: Vec<StepPlan>,
}

/// How one step runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepPlan {
    /// The step's limits, the operator's defaults filling what the job left out.
    pub limits: Effective,
    pub timeout_seconds: u32,
    /// `None`: the step has no network at all.
    pub allow_list: Option<AllowList>,
}

impl ValidatedJob {
    /// Validates a submitted spec against `caps` (the caller's) and plans its steps with
    /// the operator's defaults.
    pub fn validate(spec: JobSpec, caps: &SpecLimits, config: &Config) -> Result<Self> {
        let allow_lists = crate::spec::validate(&spec, caps)?;
        Ok(Self::plan(spec, allow_lists, config))
    }

    /// A job accepted before the daemon restarted, from its record. It was validated
    /// when it was accepted; its allow-lists are decoded from the record again, with the
    /// current defaults. A record that no longer decodes is an error of that job only.
    pub fn from_record(spec: JobSpec, config: &Config) -> Result<Self> {
        let allow_lists = spec
            .steps
            .iter()
            .map(|step| {
                if step.allow_net.is_empty() {
                    return Ok(None);
                }
                AllowList::parse(&step.allow_net)
                    .map(Some)
                    .map_err(|e| RunnerError::invalid("allow_net", e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::plan(spec, allow_lists, config))
    }

    fn plan(spec: JobSpec, allow_lists: Vec<Option<AllowList>>, config: &Config) -> Self {
        let steps = spec
            .steps
            .iter()
            .zip(allow_lists)
            .map(|(step, allow_list)| StepPlan::of(step, allow_list, config))
            .collect();
        Self { spec, steps }
    }

    /// The spec as the client submitted it (the job's record keeps it).
    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }

    /// Each step with its plan, in order.
    pub fn steps(&self) -> impl Iterator<Item = (&Step, &StepPlan)> {
        self.spec.steps.iter().zip(&self.steps)
    }

    /// The workspace quota of the job: its largest step's (each step then gets its own).
    pub fn workspace_quota(&self, config: &Config) -> u64 {
        self.steps
            .iter()
            .map(|plan| plan.limits.disk_bytes)
            .max()
            .unwrap_or(config.default_disk.0)
    }
}

impl StepPlan {
    fn of(step: &Step, allow_list: Option<AllowList>, config: &Config) -> Self {
        Self {
            limits: Effective::of(config, step.limits.as_ref()),
            timeout_seconds: if step.timeout_seconds == 0 {
                config.default_timeout_seconds
            } else {
                step.timeout_seconds
            },
            allow_list,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use agent_proto::v1::ResourceLimits;

    fn caps(config: &Config) -> SpecLimits {
        SpecLimits {
            max_timeout_seconds: config.max_timeout_seconds,
            max_memory_bytes: config.max_memory.0,
            max_pids: config.max_pids,
            max_cpu_millis: config.max_cpus.0,
            max_disk_bytes: config.max_disk.0,
            network_ceiling: crate::egress::netpolicy::Ceiling::parse(&["*:*"]).unwrap(),
            max_inputs: config.max_inputs,
            max_spec_bytes: config.max_spec_bytes.0,
            tenant: None,
            tenant_caps: Default::default(),
            publish: crate::registry::policy::RepositoryPatterns::parse(&["127.0.0.1:5000/ok/*"])
                .unwrap(),
            publish_key: "[publish] repositories".into(),
            insecure_registries: Vec::new(),
        }
    }

    fn spec() -> JobSpec {
        JobSpec {
            image: "host".into(),
            steps: vec![
                Step {
                    name: "fetch".into(),
                    argv: vec!["curl".into()],
                    allow_net: vec!["example.org:443".into()],
                    timeout_seconds: 30,
                    limits: Some(ResourceLimits {
                        disk_bytes: 2 << 30,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Step {
                    name: "build".into(),
                    argv: vec!["make".into()],
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn steps_are_planned_once_with_the_defaults() {
        let config = Config::default();
        let job = ValidatedJob::validate(spec(), &caps(&config), &config).unwrap();
        let plans: Vec<&StepPlan> = job.steps().map(|(_, plan)| plan).collect();
        assert_eq!(plans[0].timeout_seconds, 30);
        assert_eq!(plans[1].timeout_seconds, config.default_timeout_seconds);
        assert!(plans[0]
            .allow_list
            .as_ref()
            .unwrap()
            .allows_name("example.org", 443));
        assert!(plans[1].allow_list.is_none());
        assert_eq!(plans[1].limits.memory_bytes, config.default_memory.0);
        assert_eq!(
            job.workspace_quota(&config),
            (2 << 30).max(config.default_disk.0)
        );
    }

    #[test]
    fn a_record_plans_as_its_submission_did() {
        let config = Config::default();
        let submitted = ValidatedJob::validate(spec(), &caps(&config), &config).unwrap();
        let loaded = ValidatedJob::from_record(spec(), &config).unwrap();
        assert_eq!(submitted.steps, loaded.steps);
    }

    #[test]
    fn an_invalid_spec_is_no_validated_job() {
        let config = Config::default();
        let mut bad = spec();
        bad.steps[0].allow_net = vec!["not a host:port".into()];
        assert!(ValidatedJob::validate(bad, &caps(&config), &config).is_err());
    }
}
