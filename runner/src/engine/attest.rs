//! SLSA v1 provenance for a finished job: the outputs as subjects, the job spec
//! as submitted as external parameters, the image and inputs as resolved
//! dependencies, the step links as byproducts; signed as a DSSE envelope with
//! the runner key. The SBOM of the job's image, signed by the same key. And the two
//! forms of a step's link, signed by one key.

use std::collections::BTreeMap;

use agent_proto::v1::{Job, JobSpec};
use provenance::slsa::{ProvenanceInput, ResourceDescriptor, KILN_BUILD_TYPE};
use serde_json::{json, Value};

use crate::engine::signer::Signer;
use crate::engine::RUNNER_VERSION;
use crate::error::{Result, RunnerError};
use crate::images::sbom::ImageSbom;
use provenance::dsse::IN_TOTO_PAYLOAD_TYPE;

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
    image: Option<&ResourceDescriptor>,
    builder_id: &str,
    signer: &Signer,
) -> Result<Option<Vec<u8>>> {
    if job.outputs.is_empty() {
        return Ok(None);
    }
    let current = signer.current()?;
    // After a rotation between the job's end and now, the current key's
    // window opens after that end, and verifiers check finishedOn against the
    // signing key's window: the claim moves to the window's start, later than
    // the record by no more than that race lasted.
    let finished_on = time_of(job.finished_unix_ms)?.max(current.not_before);
    // The image as resolved for the run (a job that never resolved it has no outputs).
    let image = image
        .cloned()
        .unwrap_or_else(|| ResourceDescriptor::image(&spec.image, None));
    let mut resolved_dependencies = vec![image];
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
        finished_on,
        byproducts: job
            .steps
            .iter()
            .filter(|s| !s.link_digest.is_empty())
            .map(|s| ResourceDescriptor::step_link(&s.name, &s.link_name, &s.link_digest))
            .collect(),
    };
    Ok(Some(input.sign(&current.key)?))
}

/// The image's SBOM as an in-toto Statement (predicateType
/// `https://cyclonedx.org/bom`) in a DSSE envelope signed by the current key, as the
/// provenance is.
pub fn image_sbom(sbom: &ImageSbom, signer: &Signer) -> Result<Vec<u8>> {
    let key = signer.current()?.key;
    let payload = serde_json::to_vec(&sbom.statement())
        .map_err(|e| RunnerError::Internal(format!("encoding the SBOM statement: {e}")))?;
    let envelope = provenance::dsse::sign_envelope(IN_TOTO_PAYLOAD_TYPE, &payload, &key);
    let mut out = serde_json::to_vec_pretty(&envelope)
        .map_err(|e| RunnerError::Internal(format!("encoding the SBOM envelope: {e}")))?;
    out.push(b'\n');
    Ok(out)
}

/// A step's link in both forms, signed by the same (current) key.
pub struct SignedLink {
    /// `<step>.<first 8 hex of keyid>.link`: in-toto looks both forms up by it.
    pub file_name: String,
    pub metablock: Vec<u8>,
    pub dsse: Vec<u8>,
}

pub fn sign_link(link: &provenance::Link, signer: &Signer) -> Result<SignedLink> {
    let key = signer.current()?.key;
    Ok(SignedLink {
        file_name: provenance::link::link_file_name(&link.name, &key.keyid()),
        metablock: link.sign(&key)?,
        dsse: link.sign_dsse(&key)?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use agent_proto::v1::OutputFile;
    use provenance::keyring::{parse_time, KeyRing};
    use provenance::verify::provenance::{verify_provenance, Artifact, Policy};

    #[test]
    fn provenance_signed_after_a_rotation_claims_no_finish_before_the_new_window() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("keys");
        let (signer, _) = Signer::open(&dir).unwrap();
        let artifact = Artifact::from_bytes("out.txt", b"built\n");
        let spec = JobSpec {
            name: "j".into(),
            image: "host".into(),
            outputs: vec!["out.txt".into()],
            ..Default::default()
        };
        let finished = crate::engine::now_ms();
        let job = Job {
            job_id: "job-1".into(),
            spec: Some(spec.clone()),
            outputs: vec![OutputFile {
                path: "out.txt".into(),
                digest: provenance::hash::sha256_bytes(b"built\n"),
                size: 6,
                executable: false,
            }],
            started_unix_ms: finished - 5,
            finished_unix_ms: finished,
            ..Default::default()
        };
        // The job ended, then the ring was rotated before its provenance was signed.
        std::thread::sleep(std::time::Duration::from_millis(5));
        let mut ring = KeyRing::open(&dir).unwrap();
        ring.rotate().unwrap();
        let envelope = job_provenance(&job, &spec, None, "kiln://t", &signer)
            .unwrap()
            .unwrap();
        let policy = Policy::from_toml(
            "allowed_builder_ids = [\"kiln://t\"]\nallow_unpinned_images = true\n",
        )
        .unwrap();
        let verdict = verify_provenance(&envelope, &ring.public().keys, &[artifact], &policy);
        assert!(verdict.passed, "{}", verdict.summary());
        assert_eq!(verdict.signed_by, vec![ring.public().current.clone()]);
        let claimed = parse_time(verdict.finished_on.as_deref().unwrap()).unwrap();
        assert_eq!(claimed, ring.public().current_key().unwrap().not_before);
    }
}
