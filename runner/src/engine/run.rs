//! One job from start to end: its workspace, its steps one after another, its outputs,
//! its final state and its signed provenance.

use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use agent_proto::v1::{job_event, Job, JobSpec, JobState, OutputFile, StepStarted, StepState};

use crate::engine::enclosure::WORKSPACE_DIR;
use crate::engine::end::{blocking, off_runtime, JobEnd};
use crate::engine::jobs::Runner;
use crate::engine::now_ms;
use crate::error::{Result, RunnerError};
use crate::images::sbom::ImageSbom;
use crate::images::BUILD_UID;
use crate::plan::ValidatedJob;
use provenance::slsa::ResourceDescriptor;

impl Runner {
    pub(super) async fn run_job(self: Arc<Self>, id: &str, slot: u32) -> Result<()> {
        let mut job = {
            let (runner, id) = (self.clone(), id.to_string());
            off_runtime(move || runner.get_any(&id)).await?
        };
        let plan = match self.existing_handle(id).and_then(|h| h.plan()) {
            Some(plan) => plan,
            None => {
                let spec = job
                    .spec
                    .clone()
                    .ok_or_else(|| RunnerError::Internal(format!("job {id} has no spec")))?;
                Arc::new(ValidatedJob::from_record(spec, &self.config)?)
            }
        };
        job.state = JobState::Running as i32;
        job.started_unix_ms = now_ms();
        let claimed = {
            let (runner, record) = (self.clone(), job.clone());
            off_runtime(move || {
                let claimed = runner.db.update_job_if_state(&record, JobState::Queued)?;
                if claimed {
                    runner.announce_state(&record, Some(JobState::Queued));
                }
                Ok(claimed)
            })
            .await?
        };
        if !claimed {
            return Ok(()); // cancelled while queued
        }
        if let Some(handle) = self.existing_handle(id) {
            handle.running.store(true, Ordering::SeqCst);
        }
        self.emit(id, job_event::Event::Started(Default::default()));

        let host_uid_base = self.id_ranges.base(slot).ok_or_else(|| {
            RunnerError::Internal(format!("job slot {slot} has no host id range"))
        })?;
        // The workspace is the step's own (its uid owns the tmpfs root and may chmod it),
        // so it sits in an enclosure the step cannot open up: 0700, owned by the slot's
        // mapped root, which binds the workspace into the sandbox. Named at random, not
        // by the job id: the mount table is world-readable.
        let enclosure = self
            .work_dir
            .join(uuid::Uuid::new_v4().simple().to_string());
        let workspace = enclosure.join(WORKSPACE_DIR);
        tracing::debug!(job = %id, workspace = %workspace.display(), "workspace");
        let mut image_used = None;
        let outcome = self
            .clone()
            .run_steps(
                id,
                &mut job,
                &plan,
                &enclosure,
                host_uid_base,
                &mut image_used,
            )
            .await;
        // Off the job's end: its outputs are in the content store by now, so the
        // workspace goes while the end is signed and committed (the slot is freed once
        // both are done).
        let removal = {
            let (runner, id) = (self.clone(), id.to_string());
            tokio::task::spawn_blocking(move || {
                runner.remove_workspace(&id, &enclosure, &workspace)
            })
        };
        let (state, message) = match outcome {
            Ok(()) => (JobState::Succeeded, String::new()),
            Err(JobEnd::StepFailed(message)) => (JobState::Failed, message),
            Err(JobEnd::Cancelled) => {
                let reason = self
                    .existing_handle(id)
                    .and_then(|h| h.cancel_reason.lock().ok().and_then(|r| r.clone()));
                (
                    JobState::Cancelled,
                    reason.unwrap_or_else(|| "cancelled".into()),
                )
            }
            Err(JobEnd::Error(err)) => (JobState::Error, err.client_message()),
        };
        job.state = state as i32;
        job.message = message;
        job.finished_unix_ms = now_ms();
        let finished = self.finish_job(id, job, &plan, image_used).await;
        if let Err(err) = removal.await {
            tracing::warn!(job = %id, error = %err, "could not remove the workspace");
        }
        finished
    }

    /// The end of a job that ran: its SBOM and provenance, its publishing if the spec
    /// asks for it, and its final record committed.
    async fn finish_job(
        self: Arc<Self>,
        id: &str,
        job: Job,
        plan: &Arc<ValidatedJob>,
        image_used: Option<(ResourceDescriptor, Option<ImageSbom>)>,
    ) -> Result<()> {
        let state = JobState::try_from(job.state).unwrap_or(JobState::Error);
        let mut job = {
            let (runner, plan) = (self.clone(), plan.clone());
            off_runtime(move || {
                let mut job = job;
                let (image, sbom) = match image_used {
                    Some((image, sbom)) => (Some(image), sbom),
                    None => (None, None),
                };
                // Whatever its end, a job that ran on an imported image gets its SBOM.
                if let Some(sbom) = &sbom {
                    runner.attest_image_sbom(&mut job, sbom);
                }
                if state == JobState::Succeeded {
                    runner.attest_job(&mut job, plan.spec(), image.as_ref())?;
                }
                Ok(job)
            })
            .await?
        };
        let repository = &plan.spec().publish_repository;
        if job.state == JobState::Succeeded as i32 && !repository.is_empty() {
            self.publish_finished_job(id, &mut job, repository).await;
        }
        let job = {
            let runner = self.clone();
            off_runtime(move || {
                runner.db.update_job(&job)?;
                runner.announce_state(&job, Some(JobState::Running));
                Ok(job)
            })
            .await?
        };
        let state = JobState::try_from(job.state).unwrap_or(state);
        tracing::info!(job = %id, state = ?state, "job finished");
        self.finish_handle(id, job);
        Ok(())
    }

    async fn run_steps(
        self: Arc<Self>,
        id: &str,
        job: &mut Job,
        plan: &Arc<ValidatedJob>,
        enclosure: &Path,
        host_uid_base: u32,
        image_used: &mut Option<(ResourceDescriptor, Option<ImageSbom>)>,
    ) -> Result<(), JobEnd> {
        let workspace = &enclosure.join(WORKSPACE_DIR);
        let spec = plan.spec();
        let image = {
            let (runner, plan) = (self.clone(), plan.clone());
            let (enclosure, workspace) = (enclosure.to_path_buf(), workspace.to_path_buf());
            let id = id.to_string();
            blocking(move || {
                let image = runner.images.resolve(&plan.spec().image)?;
                runner.check_image_for_owner(&id, &image)?;
                let step_host_id = host_uid_base + BUILD_UID;
                let enclosure = (enclosure.as_path(), host_uid_base);
                runner.prepare_workspace(&plan, enclosure, &workspace, step_host_id)?;
                let sbom = runner.images.sbom_of(&image)?;
                Ok((image, sbom))
            })
            .await?
        };
        let (image, sbom) = image;
        *image_used = Some((image.provenance(), sbom));
        // What the previous step left: nothing runs between two steps (the previous
        // one's every process died with its pid namespace, and the daemon does not touch
        // the files), so it is exactly what the next step starts from, without a re-read.
        let mut previous_products = None;
        for (index, (step, step_plan)) in plan.steps().enumerate() {
            if self.handle(id).cancelled.load(Ordering::SeqCst) {
                return Err(JobEnd::Cancelled);
            }
            if let Some(result) = job.steps.get_mut(index) {
                result.state = StepState::Running as i32;
            }
            self.save_progress(job).await?;
            self.emit(
                id,
                job_event::Event::StepStarted(StepStarted {
                    name: step.name.clone(),
                }),
            );
            let ran = self
                .clone()
                .run_step(
                    id,
                    (step, step_plan),
                    &image,
                    workspace,
                    host_uid_base,
                    previous_products.take(),
                )
                .await;
            let (result, products) = match ran {
                Ok(ran) => ran,
                Err(end) => {
                    // The job ends here: its record must not show the step running.
                    if let Some(result) = job.steps.get_mut(index) {
                        result.state = match end {
                            JobEnd::Cancelled => StepState::Cancelled,
                            _ => StepState::Error,
                        } as i32;
                    }
                    return Err(end);
                }
            };
            previous_products = products;
            let state = StepState::try_from(result.state).unwrap_or(StepState::Error);
            let message = result.message.clone();
            tracing::info!(
                job = %id,
                step = %step.name,
                state = ?state,
                start_latency_us = result.start_latency_us,
                duration_ms = result.duration_ms,
                "step finished"
            );
            if let Some(slot) = job.steps.get_mut(index) {
                *slot = result.clone();
            }
            self.save_progress(job).await?;
            self.bus.step_finished(id, &result);
            self.emit(id, job_event::Event::StepFinished(result));
            match state {
                StepState::Succeeded => {}
                StepState::Cancelled => return Err(JobEnd::Cancelled),
                _ => {
                    let failed = format!("step {:?} did not succeed: {message}", step.name);
                    return Err(JobEnd::StepFailed(failed));
                }
            }
        }
        job.outputs = self.collect_job_outputs(spec, workspace).await?;
        Ok(())
    }

    /// Commits the job's step states (not its end: that is `update_job`).
    async fn save_progress(&self, job: &Job) -> Result<(), JobEnd> {
        let (db, record) = (self.db.clone(), job.clone());
        blocking(move || db.update_progress(&record)).await
    }

    /// Signs the SBOM of the job's image and stores it. A job that succeeded but whose
    /// SBOM cannot be signed ends in error (its provenance would name no SBOM).
    fn attest_image_sbom(&self, job: &mut Job, sbom: &ImageSbom) {
        let signed = crate::engine::attest::image_sbom(sbom, &self.key)
            .and_then(|envelope| self.cas.put_bytes(&envelope));
        match signed {
            Ok(digest) => job.sbom_digest = digest,
            Err(err) if job.state == JobState::Succeeded as i32 => {
                job.state = JobState::Error as i32;
                job.message = format!("could not sign the image's SBOM: {}", err.client_message());
            }
            Err(err) => {
                tracing::warn!(job = %job.job_id, error = %err, "could not sign the image's SBOM")
            }
        }
    }

    /// Signs the provenance of a job that succeeded and stores it; a job whose outputs
    /// cannot be attested ends in error instead.
    fn attest_job(
        &self,
        job: &mut Job,
        spec: &JobSpec,
        image: Option<&ResourceDescriptor>,
    ) -> Result<()> {
        let builder_id = self
            .config
            .builder_id
            .clone()
            .unwrap_or_else(provenance::slsa::default_builder_id);
        // The image's entry names its SBOM attestation.
        let image = image.map(|image| {
            let mut image = image.clone();
            if !job.sbom_digest.is_empty() {
                image
                    .annotations
                    .get_or_insert_with(Default::default)
                    .insert(
                        "sbom".into(),
                        serde_json::json!({"sha256": job.sbom_digest}),
                    );
            }
            image
        });
        match crate::engine::attest::job_provenance(
            job,
            spec,
            image.as_ref(),
            &builder_id,
            &self.key,
        ) {
            Ok(Some(envelope)) => job.provenance_digest = self.cas.put_bytes(&envelope)?,
            Ok(None) => {}
            Err(err) => {
                // Unattested outputs are not a success.
                job.state = JobState::Error as i32;
                job.message = format!(
                    "could not sign the job's provenance: {}",
                    err.client_message()
                );
            }
        }
        Ok(())
    }

    /// Stores the job's declared outputs; outputs that cannot be taken fail the job
    /// as a step would.
    async fn collect_job_outputs(
        self: Arc<Self>,
        spec: &JobSpec,
        workspace: &Path,
    ) -> Result<Vec<OutputFile>, JobEnd> {
        let outputs = {
            let runner = self.clone();
            let outputs = spec.outputs.clone();
            let workspace = workspace.to_path_buf();
            blocking(move || runner.collect_outputs(&workspace, &outputs)).await
        };
        match outputs {
            Ok(outputs) => Ok(outputs),
            Err(JobEnd::Error(RunnerError::InvalidArgument { field, reason })) => {
                Err(JobEnd::StepFailed(format!("{field}: {reason}")))
            }
            Err(other) => Err(other),
        }
    }
}

impl Runner {
    /// Releases the job's workspace quota and removes its enclosure; what cannot be is
    /// logged (the next start cleans the work directory).
    fn remove_workspace(&self, id: &str, enclosure: &Path, workspace: &Path) {
        if workspace.exists() {
            // EINVAL: the quota was never mounted (the job failed before).
            match self.executor.release_workspace(workspace) {
                Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
                Err(err) => {
                    tracing::warn!(job = %id, error = %err, "could not unmount the workspace quota")
                }
            }
        }
        match fs::remove_dir_all(enclosure) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!(job = %id, error = %err, "could not remove workspace"),
        }
    }
}
