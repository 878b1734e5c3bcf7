//! SLSA v1 provenance for a finished job: the outputs as subjects, the job spec
//! as submitted as external parameters, the image and inputs as resolved
//! dependencies, the step links as byproducts; signed as a DSSE envelope with
//! the runner key.

use std::collections::BTreeMap;

use agent_proto::v1::{Job, JobSpec};
use provenance::keys::SigningKey;
use provenance::slsa::{ProvenanceInput, ResourceDescriptor, KILN_BUILD_TYPE};
use serde_json::{json, Value};

use crate::error::{Result, RunnerError};
use crate::jobs::RUNNER_VERSION;

/// The job spec as the client submitted it. Kiln has no secret inputs: every
/// field here came from the client and is part of what was built.
pub fn spec_json(spec: &JobSpec) -> Value {
    json!({
        "name": spec.name,
        "image": spec.image,
        "inputs": spec.inputs.iter().map(|i| json!({
            "path": i.path, "digest": {"sha256": i.digest}, "executable": i.executable,
        })).collect::<Vec<_>>(),
        "steps": spec.steps.iter().map(|s| {
            let env: BTreeMap<&String, &String> = s.env.iter().collect();
            let limits = s.limits.as_ref().map(|l| json!({
                "memory_bytes": l.memory_bytes, "pids": l.pids,
                "cpu_millis": l.cpu_millis, "disk_bytes": l.disk_bytes,
            }));
            json!({
                "name": s.name, "argv": s.argv, "env": env,
                "timeout_seconds": s.timeout_seconds, "limits": limits, "allow_net": s.allow_net,
            })
        }).collect::<Vec<_>>(),
        "outputs": spec.outputs,
    })
}

fn time_of(ms: i64) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| RunnerError::Internal(format!("timestamp {ms}: {e}")))
}

/// The signed envelope, or None for a job without outputs (SLSA provenance
/// needs at least one subject).
pub fn job_provenance(
    job: &Job,
    spec: &JobSpec,
    image_digest: Option<&str>,
    builder_id: &str,
    key: &SigningKey,
) -> Result<Option<Vec<u8>>> {
    if job.outputs.is_empty() {
        return Ok(None);
    }
    let mut resolved_dependencies = vec![ResourceDescriptor::image(&spec.image, image_digest)];
    resolved_dependencies.extend(
        spec.inputs
            .iter()
            .map(|i| ResourceDescriptor::input(&i.path, &i.digest)),
    );
    let input = ProvenanceInput {
        subjects: job
            .outputs
            .iter()
            .map(|o| ResourceDescriptor::sha256(o.path.clone(), o.digest.clone()))
            .collect(),
        build_type: KILN_BUILD_TYPE.to_string(),
        external_parameters: spec_json(spec),
        internal_parameters: Default::default(),
        network_destinations: spec
            .steps
            .iter()
            .flat_map(|s| s.allow_net.iter().cloned())
            .collect(),
        resolved_dependencies,
        builder_id: builder_id.to_string(),
        builder_version: [("kiln".to_string(), RUNNER_VERSION.to_string())].into(),
        invocation_id: job.job_id.clone(),
        started_on: time_of(job.started_unix_ms)?,
        finished_on: time_of(job.finished_unix_ms)?,
        byproducts: job
            .steps
            .iter()
            .filter(|s| !s.link_digest.is_empty())
            .map(|s| ResourceDescriptor::step_link(&s.name, &s.link_name, &s.link_digest))
            .collect(),
    };
    Ok(Some(input.sign(key)?))
}
