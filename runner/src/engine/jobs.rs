//! The job scheduler and executor: queues accepted jobs, runs their steps in
//! sandboxes one after another in a fresh workspace, hashes materials and products,
//! signs a link per step, collects outputs, and keeps every state change durable
//! before announcing it.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use agent_proto::v1::{
    job_event, Job, JobSpec, JobState, OutputFile, OutputStream, StepOutput, StepResult,
    StepStarted, StepState,
};
use sandbox::{Canceller, HostSupport, Sandbox, StepSpec, StepStatus};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::api::auth::Principal;
use crate::config::Config;
use crate::engine::idranges::IdRanges;
use crate::engine::signer::Signer;
use crate::engine::watch::EventRing;
use crate::error::{Result, RunnerError};
use crate::images::{Images, ResolvedImage, BUILD_UID};
use crate::store::cas::ContentStore;
use crate::store::db::{Database, Inserted};
use provenance::walk::{
    Entry as WalkEntry, Flow, Kind as WalkKind, Problem as WalkProblem, WalkError, WalkOptions,
};

pub const RUNNER_VERSION: &str = env!("CARGO_PKG_VERSION");
const EVENT_CHUNK: usize = 32 * 1024;
/// Idle supervisors kept waiting at most: each is a few MB, and steps starting at the
/// same moment beyond this many spawn their own.
const MAX_STANDBY: usize = 4;
/// The egress proxy's port on a step's loopback (each step has its own namespace).
const EGRESS_PROXY_PORT: u16 = 3128;
/// Where a step sees its workspace: messages name files under it, never by host path.
const WORKSPACE_IN_SANDBOX: &str = "/workspace";

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        // Saturates, some 292 million years from now.
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What the runner starts sandboxes with: the sandbox launcher, what the host supports,
/// and the host id ranges leased for the job slots.
pub struct Isolation {
    pub sandbox: Sandbox,
    pub host: HostSupport,
    pub id_ranges: IdRanges,
}

/// The in-memory side of a queued or running job: its recent events for Watch, the
/// log bytes it has stored, and cancellation. Dropped from the map when the job ends.
pub struct JobHandle {
    pub events: Arc<EventRing>,
    /// Bytes of step logs stored for the job so far (at most `max_job_log_bytes`).
    log_bytes: AtomicU64,
    cancelled: AtomicBool,
    canceller: Mutex<Option<Canceller>>,
    /// Why the job was cancelled, when not by a client.
    cancel_reason: Mutex<Option<String>>,
    /// Set once the scheduler started the job.
    running: AtomicBool,
}

impl JobHandle {
    fn new(output_cap: usize) -> Self {
        Self {
            events: Arc::new(EventRing::new(output_cap)),
            log_bytes: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            canceller: Mutex::new(None),
            cancel_reason: Mutex::new(None),
            running: AtomicBool::new(false),
        }
    }

    /// Claims up to `want` bytes of the job's log allowance; answers how many it got.
    fn claim_log_bytes(&self, want: u64, job_cap: u64) -> u64 {
        let mut granted = 0;
        let _ = self
            .log_bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                granted = want.min(job_cap.saturating_sub(used));
                Some(used + granted)
            });
        granted
    }
}

pub struct Runner {
    pub config: Config,
    pub db: Database,
    pub cas: ContentStore,
    pub images: Images,
    pub key: Signer,
    sandbox: Sandbox,
    host: HostSupport,
    profiles: crate::engine::profile::ProfileDigests,
    /// Supervisors started ahead of their steps.
    standby: Mutex<Vec<sandbox::Standby>>,
    handles: Mutex<HashMap<String, Arc<JobHandle>>>,
    queue: mpsc::UnboundedSender<String>,
    slots: Mutex<Vec<u32>>,
    permits: Arc<Semaphore>,
    draining: AtomicBool,
    /// Turns true when the daemon stops starting jobs (SIGTERM).
    shutdown: watch::Sender<bool>,
    work_dir: PathBuf,
    /// The host id range of each job slot, leased host-wide.
    id_ranges: IdRanges,
}

impl Runner {
    pub fn new(
        config: Config,
        db: Database,
        cas: ContentStore,
        images: Images,
        key: Signer,
        isolation: Isolation,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<String>)> {
        let Isolation {
            sandbox,
            host,
            id_ranges,
        } = isolation;
        let work_dir = config.state_dir.join("work");
        if work_dir.exists() {
            // Workspaces of jobs interrupted by a crash: their jobs are failed below. Each
            // may still have its quota tmpfs mounted.
            if let Ok(entries) = fs::read_dir(&work_dir) {
                for entry in entries.flatten() {
                    let _ = crate::limits::unmount_workspace(&entry.path().join(WORKSPACE_DIR));
                    // Daemons before enclosures mounted the workspace here.
                    let _ = crate::limits::unmount_workspace(&entry.path());
                }
            }
            fs::remove_dir_all(&work_dir).map_err(RunnerError::io_path("cleaning", &work_dir))?;
        }
        fs::create_dir_all(&work_dir).map_err(RunnerError::io_path("creating", &work_dir))?;
        fs::set_permissions(&work_dir, fs::Permissions::from_mode(0o711))
            .map_err(RunnerError::io_path("chmod", &work_dir))?;
        let (queue, rx) = mpsc::unbounded_channel();
        let slots = (0..config.max_concurrent_jobs).rev().collect();
        let permits = Arc::new(Semaphore::new(config.max_concurrent_jobs as usize));
        let runner = Arc::new(Self {
            config,
            db,
            cas,
            images,
            key,
            sandbox,
            host,
            profiles: Default::default(),
            standby: Mutex::new(Vec::new()),
            handles: Mutex::new(HashMap::new()),
            queue,
            slots: Mutex::new(slots),
            permits,
            draining: AtomicBool::new(false),
            shutdown: watch::channel(false).0,
            work_dir,
            id_ranges,
        });
        runner.recover()?;
        Ok((runner, rx))
    }

    /// After a restart: a job that was running cannot be resumed halfway (its
    /// workspace is gone), so it fails with a clear message; queued jobs run again.
    fn recover(&self) -> Result<()> {
        for mut job in self.db.jobs_in_state(JobState::Running)? {
            job.state = JobState::Error as i32;
            job.message = "interrupted: the daemon stopped while the job was running".into();
            job.finished_unix_ms = now_ms();
            self.db.update_job(&job)?;
            tracing::warn!(job = %job.job_id, "job interrupted by a daemon restart");
        }
        for job in self.db.jobs_in_state(JobState::Queued)? {
            tracing::info!(job = %job.job_id, "requeueing job accepted before a restart");
            self.handle(&job.job_id);
            self.enqueue(&job.job_id)?;
        }
        Ok(())
    }

    pub fn handle(&self, id: &str) -> Arc<JobHandle> {
        // Running jobs share max_event_memory; a queued job holds no output.
        let output_cap = usize::try_from(
            self.config.max_event_memory.0 / u64::from(self.config.max_concurrent_jobs.max(1)),
        )
        .unwrap_or(usize::MAX);
        let mut handles = match self.handles.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        };
        handles
            .entry(id.to_string())
            .or_insert_with(|| Arc::new(JobHandle::new(output_cap)))
            .clone()
    }

    pub fn existing_handle(&self, id: &str) -> Option<Arc<JobHandle>> {
        self.handles.lock().ok().and_then(|h| h.get(id).cloned())
    }

    fn enqueue(&self, id: &str) -> Result<()> {
        self.queue
            .send(id.to_string())
            .map_err(|_| RunnerError::Unavailable("the daemon is shutting down".into()))
    }

    fn emit(&self, id: &str, event: job_event::Event) {
        self.handle(id).events.push(id, event);
    }

    /// Records and queues a validated job for `caller`; answers with its id. Every
    /// input must be a blob the caller may read (see [`crate::api::auth`]).
    pub fn submit(
        &self,
        spec: JobSpec,
        idempotency_key: Option<&str>,
        caller: &Principal,
    ) -> Result<String> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(RunnerError::Unavailable(
                "the daemon is shutting down".into(),
            ));
        }
        // A job whose records and results cannot be kept is not accepted.
        self.cas.check_room(0)?;
        self.check_inputs_readable(&spec, caller)?;
        let steps = spec
            .steps
            .iter()
            .map(|s| StepResult {
                name: s.name.clone(),
                state: StepState::Pending as i32,
                ..Default::default()
            })
            .collect();
        let job = Job {
            job_id: uuid::Uuid::new_v4().to_string(),
            spec: Some(spec),
            state: JobState::Queued as i32,
            steps,
            created_unix_ms: now_ms(),
            ..Default::default()
        };
        match self
            .db
            .insert_job(&job, &caller.owner, idempotency_key, caller.uid)?
        {
            Inserted::New(id) => {
                self.emit(&id, job_event::Event::Queued(Default::default()));
                self.enqueue(&id)?;
                tracing::info!(job = %id, owner = %caller.owner, "job accepted");
                Ok(id)
            }
            Inserted::Existing(id) => Ok(id),
        }
    }

    /// An input the caller may not read is answered like one the store does not hold,
    /// so Submit tells nothing about other clients' blobs.
    fn check_inputs_readable(&self, spec: &JobSpec, caller: &Principal) -> Result<()> {
        let readable = if caller.admin {
            None
        } else {
            Some(
                self.db
                    .readable_blobs(&caller.owner, spec.inputs.iter().map(|i| i.digest.as_str()))?,
            )
        };
        for input in &spec.inputs {
            let known = match &readable {
                Some(readable) => readable.contains(&input.digest),
                None => self.cas.contains(&input.digest)?,
            };
            if !known {
                return Err(RunnerError::FailedPrecondition(format!(
                    "input {:?}: blob {} is not in the content store (upload it first)",
                    input.path, input.digest
                )));
            }
        }
        Ok(())
    }

    /// The record of a job the caller may see; any other job is "not found", exactly
    /// as one that does not exist.
    pub fn get(&self, id: &str, caller: &Principal) -> Result<Job> {
        match self.db.get_job_and_owner(id)? {
            Some((job, owner)) if caller.may_see(&owner) => Ok(job),
            _ => Err(RunnerError::NotFound(format!("job {id}"))),
        }
    }

    fn get_any(&self, id: &str) -> Result<Job> {
        self.db
            .get_job(id)?
            .ok_or_else(|| RunnerError::NotFound(format!("job {id}")))
    }

    pub fn cancel(&self, id: &str, caller: &Principal) -> Result<JobState> {
        let mut job = self.get(id, caller)?;
        tracing::info!(job = %id, by = %caller.owner, "cancel requested");
        let state = JobState::try_from(job.state).unwrap_or(JobState::Unspecified);
        match state {
            JobState::Queued => {
                // The scheduler skips a job that is no longer queued.
                job.state = JobState::Cancelled as i32;
                job.message = "cancelled before it started".into();
                job.finished_unix_ms = now_ms();
                if self.db.update_job_if_state(&job, JobState::Queued)? {
                    self.finish_handle(id, job);
                    return Ok(JobState::Cancelled);
                }
                // The scheduler started it meanwhile: cancel it as a running job.
                self.cancel_running(id);
                Ok(JobState::Running)
            }
            JobState::Running => {
                self.cancel_running(id);
                Ok(JobState::Running)
            }
            other => Ok(other),
        }
    }

    fn cancel_running(&self, id: &str) {
        // A job that ended meanwhile has no handle left, and needs none.
        let Some(handle) = self.existing_handle(id) else {
            return;
        };
        Self::cancel_handle(&handle);
    }

    fn cancel_handle(handle: &JobHandle) {
        handle.cancelled.store(true, Ordering::SeqCst);
        let canceller = handle.canceller.lock().ok().and_then(|c| c.clone());
        if let Some(canceller) = canceller {
            canceller.cancel();
        }
    }

    /// Ends the job's in-memory side: Watch streams still following it finish from the
    /// stored logs, later ones replay the job from its record.
    fn finish_handle(&self, id: &str, job: Job) {
        let handle = match self.handles.lock() {
            Ok(mut handles) => handles.remove(id),
            Err(poisoned) => poisoned.into_inner().remove(id),
        };
        if let Some(handle) = handle {
            handle.events.finish(id, job);
        }
    }

    /// Runs queued jobs, at most `max_concurrent_jobs` at a time, until the queue
    /// closes or the daemon drains.
    pub async fn schedule(self: Arc<Self>, mut queue: mpsc::UnboundedReceiver<String>) {
        for _ in 0..(self.config.max_concurrent_jobs as usize).min(MAX_STANDBY) {
            self.refill_standby();
        }
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let id = tokio::select! {
                id = queue.recv() => match id {
                    Some(id) => id,
                    None => break,
                },
                _ = async { shutdown.wait_for(|stop| *stop).await.is_ok() } => break,
            };
            if self.draining.load(Ordering::SeqCst) {
                break;
            }
            let Ok(permit) = self.permits.clone().acquire_owned().await else {
                break;
            };
            if self.draining.load(Ordering::SeqCst) {
                break;
            }
            let slot = match self.slots.lock().ok().and_then(|mut s| s.pop()) {
                Some(slot) => slot,
                None => {
                    tracing::error!("no free id slot although a permit was granted");
                    continue;
                }
            };
            let runner = self.clone();
            tokio::spawn(async move {
                if let Err(err) = runner.clone().run_job(&id, slot).await {
                    tracing::error!(job = %id, error = %err, "job failed in Kiln");
                    runner.fail_job(&id, &err.client_message());
                }
                if let Ok(mut slots) = runner.slots.lock() {
                    slots.push(slot);
                }
                drop(permit);
            });
        }
    }

    /// Starts no job from now on: queued jobs stay recorded as queued and run after the
    /// next start, and Watch streams of jobs that have not started end (see `watch`).
    pub fn stop_starting(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.shutdown.send_replace(true);
    }

    /// A receiver that turns true when the daemon stops starting jobs.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Cancels every running job, recording `reason` as its message.
    pub fn cancel_all_running(&self, reason: &str) {
        let handles: Vec<(String, Arc<JobHandle>)> = match self.handles.lock() {
            Ok(h) => h
                .iter()
                .filter(|(_, h)| h.running.load(Ordering::SeqCst))
                .map(|(id, h)| (id.clone(), h.clone()))
                .collect(),
            Err(_) => return,
        };
        for (id, handle) in handles {
            if let Ok(mut r) = handle.cancel_reason.lock() {
                *r = Some(reason.to_string());
            }
            tracing::warn!(job = %id, reason, "cancelling a running job");
            Self::cancel_handle(&handle);
        }
    }

    /// Stops starting jobs and waits for running ones to finish.
    pub async fn drain(&self) {
        self.stop_starting();
        let _all = self
            .permits
            .acquire_many(self.config.max_concurrent_jobs)
            .await;
    }

    /// Records a job Kiln could not run as `error`. A record that cannot be written now
    /// (the disk is full) is retried until it can: an accepted job always ends.
    fn fail_job(self: &Arc<Self>, id: &str, message: &str) {
        let Ok(Some(mut job)) = self.db.get_job(id) else {
            return;
        };
        job.state = JobState::Error as i32;
        job.message = message.to_string();
        job.finished_unix_ms = now_ms();
        if let Err(err) = self.db.update_job(&job) {
            tracing::error!(job = %id, error = %err, "could not record the job's failure; retrying");
            let runner = self.clone();
            let job = job.clone();
            tokio::spawn(async move {
                let mut wait = std::time::Duration::from_millis(200);
                loop {
                    tokio::time::sleep(wait).await;
                    let (db, record) = (runner.db.clone(), job.clone());
                    match tokio::task::spawn_blocking(move || db.update_job(&record)).await {
                        Ok(Ok(())) => {
                            tracing::info!(job = %job.job_id, "recorded the job's failure");
                            return;
                        }
                        _ => wait = (wait * 2).min(std::time::Duration::from_secs(10)),
                    }
                }
            });
        }
        self.finish_handle(id, job);
    }

    async fn run_job(self: Arc<Self>, id: &str, slot: u32) -> Result<()> {
        let mut job = self.get_any(id)?;
        let spec = job
            .spec
            .clone()
            .ok_or_else(|| RunnerError::Internal(format!("job {id} has no spec")))?;
        job.state = JobState::Running as i32;
        job.started_unix_ms = now_ms();
        if !self.db.update_job_if_state(&job, JobState::Queued)? {
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
        make_enclosure(&enclosure, host_uid_base)?;
        tracing::debug!(job = %id, workspace = %workspace.display(), "workspace");
        let mut image_digest = None;
        let outcome = self
            .clone()
            .run_steps(
                id,
                &mut job,
                &spec,
                &workspace,
                host_uid_base,
                &mut image_digest,
            )
            .await;
        if workspace.exists() {
            // EINVAL: the quota was never mounted (the job failed before).
            match crate::limits::unmount_workspace(&workspace) {
                Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
                Err(err) => {
                    tracing::warn!(job = %id, error = %err, "could not unmount the workspace quota")
                }
            }
        }
        if let Err(err) = fs::remove_dir_all(&enclosure) {
            tracing::warn!(job = %id, error = %err, "could not remove workspace");
        }
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
        if state == JobState::Succeeded {
            let builder_id = self
                .config
                .builder_id
                .clone()
                .unwrap_or_else(provenance::slsa::default_builder_id);
            match crate::engine::attest::job_provenance(
                &job,
                &spec,
                image_digest.as_deref(),
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
        }
        self.db.update_job(&job)?;
        let state = JobState::try_from(job.state).unwrap_or(state);
        tracing::info!(job = %id, state = ?state, "job finished");
        self.finish_handle(id, job);
        Ok(())
    }

    async fn run_steps(
        self: Arc<Self>,
        id: &str,
        job: &mut Job,
        spec: &JobSpec,
        workspace: &Path,
        host_uid_base: u32,
        image_digest: &mut Option<String>,
    ) -> Result<(), JobEnd> {
        let step_host_id = host_uid_base + BUILD_UID;
        let image = {
            let runner = self.clone();
            let name = spec.image.clone();
            blocking(move || runner.images.resolve(&name)).await?
        };
        image_digest.clone_from(&image.digest);
        {
            let runner = self.clone();
            let spec = spec.clone();
            let workspace = workspace.to_path_buf();
            blocking(move || runner.prepare_workspace(&spec, &workspace, step_host_id)).await?;
        }
        // What the previous step left: nothing runs between two steps (the previous
        // one's every process died with its pid namespace, and the daemon does not touch
        // the files), so it is exactly what the next step starts from, without a re-read.
        let mut previous_products = None;
        for (index, step) in spec.steps.iter().enumerate() {
            if self.handle(id).cancelled.load(Ordering::SeqCst) {
                return Err(JobEnd::Cancelled);
            }
            if let Some(result) = job.steps.get_mut(index) {
                result.state = StepState::Running as i32;
            }
            self.db.update_progress(job)?;
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
                    step,
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
            self.db.update_progress(job)?;
            self.emit(id, job_event::Event::StepFinished(result));
            match state {
                StepState::Succeeded => {}
                StepState::Cancelled => return Err(JobEnd::Cancelled),
                _ => {
                    return Err(JobEnd::StepFailed(format!(
                        "step {:?} did not succeed: {message}",
                        step.name
                    )))
                }
            }
        }
        let outputs = {
            let runner = self.clone();
            let outputs = spec.outputs.clone();
            let workspace = workspace.to_path_buf();
            blocking(move || runner.collect_outputs(&workspace, &outputs)).await
        };
        match outputs {
            Ok(outputs) => job.outputs = outputs,
            Err(JobEnd::Error(RunnerError::InvalidArgument { field, reason })) => {
                return Err(JobEnd::StepFailed(format!("{field}: {reason}")))
            }
            Err(other) => return Err(other),
        }
        Ok(())
    }

    /// A fresh workspace owned by the step's host uid, holding the inputs copied out
    /// of the content store (each copy hash-checked).
    fn prepare_workspace(&self, spec: &JobSpec, workspace: &Path, owner: u32) -> Result<()> {
        fs::create_dir(workspace).map_err(RunnerError::io_path("creating", workspace))?;
        // The job's quota is its largest step's; each step then gets its own (run_steps).
        let quota = spec
            .steps
            .iter()
            .map(|s| crate::limits::Effective::of(&self.config, s.limits.as_ref()).disk_bytes)
            .max()
            .unwrap_or(self.config.default_disk.0);
        crate::limits::mount_workspace(workspace, quota, owner)?;
        for input in &spec.inputs {
            let dest = workspace.join(&input.path);
            if let Some(parent) = dest.parent() {
                create_dirs_0755(workspace, parent)?;
            }
            let mode = if input.executable { 0o755 } else { 0o644 };
            self.cas
                .copy_out(&input.digest, &dest, mode)
                .map_err(|e| match e {
                    RunnerError::NotFound(_) => RunnerError::FailedPrecondition(format!(
                        "input {:?}: blob {} is not in the content store (upload it first)",
                        input.path, input.digest
                    )),
                    other if crate::limits::workspace_usage(workspace).is_some_and(|u| u.1) => {
                        // The error names host paths: the daemon's log gets it, not the client.
                        tracing::info!(error = %other, "inputs exceed the workspace quota");
                        RunnerError::FailedPrecondition(format!(
                            "the inputs do not fit in the workspace quota of {}",
                            crate::limits::format_size(quota)
                        ))
                    }
                    other => other,
                })?;
        }
        chown_tree(workspace, owner)?;
        Ok(())
    }

    fn step_env(step: &agent_proto::v1::Step) -> Vec<(String, String)> {
        let mut env: std::collections::BTreeMap<String, String> = [
            ("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"),
            ("HOME", "/workspace"),
            ("TMPDIR", "/tmp"),
            ("LANG", "C.UTF-8"),
            ("USER", "build"),
            ("LOGNAME", "build"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in &step.env {
            env.insert(k.clone(), v.clone());
        }
        env.into_iter().collect()
    }

    /// A supervisor for the next step: one already waiting, else a fresh one.
    fn take_standby(&self) -> Result<sandbox::Standby> {
        match self.standby.lock().ok().and_then(|mut pool| pool.pop()) {
            Some(waiting) => Ok(waiting),
            None => Ok(self.sandbox.standby()?),
        }
    }

    /// Keeps up to one supervisor per job slot (at most [`MAX_STANDBY`]) exec'd and
    /// waiting, started off the path of any step (see `sandbox::Standby`).
    fn refill_standby(self: &Arc<Self>) {
        let runner = self.clone();
        tokio::task::spawn_blocking(move || {
            let want = (runner.config.max_concurrent_jobs as usize).min(MAX_STANDBY);
            let full = |runner: &Runner| runner.standby.lock().map_or(true, |p| p.len() >= want);
            if full(&runner) {
                return;
            }
            match runner.sandbox.standby() {
                Ok(standby) => {
                    if let Ok(mut pool) = runner.standby.lock() {
                        if pool.len() < want {
                            pool.push(standby);
                        }
                    }
                }
                Err(err) => tracing::warn!(error = %err, "could not start a standby supervisor"),
            }
        });
    }

    async fn run_step(
        self: Arc<Self>,
        id: &str,
        step: &agent_proto::v1::Step,
        image: &ResolvedImage,
        workspace: &Path,
        host_uid_base: u32,
        materials: Option<std::collections::BTreeMap<String, String>>,
    ) -> Result<
        (
            StepResult,
            Option<std::collections::BTreeMap<String, String>>,
        ),
        JobEnd,
    > {
        let started = Instant::now();
        let scheduled_ns = sandbox::monotonic_now_ns();
        let limits = crate::limits::Effective::of(&self.config, step.limits.as_ref());
        // This step's workspace quota; the tmpfs refuses to shrink below what it holds.
        if let Err(err) = crate::limits::resize_workspace(workspace, limits.disk_bytes) {
            let held = crate::limits::workspace_usage(workspace)
                .map(|(used, _)| crate::limits::format_size(used))
                .unwrap_or_else(|| "?".into());
            let result = StepResult {
                name: step.name.clone(),
                state: StepState::Error as i32,
                exit_code: 125,
                message: format!(
                    "the workspace already holds {held}, more than this step's disk limit of {} ({err})",
                    crate::limits::format_size(limits.disk_bytes)
                ),
                ..Default::default()
            };
            return Ok((result, None));
        }
        let walk_options = workspace_walk(&self.config);
        let materials = match materials {
            Some(known) => known,
            None => match hash_workspace(workspace.to_path_buf(), walk_options).await? {
                Ok(materials) => materials,
                // The inputs alone cannot be recorded: the step does not run.
                Err(err) => {
                    let (message, limit_reason) = unrecordable(&err);
                    let result = StepResult {
                        name: step.name.clone(),
                        state: StepState::Failed as i32,
                        exit_code: 1,
                        message: format!("before the step: {message}"),
                        limit_reason: limit_reason.into(),
                        ..Default::default()
                    };
                    return Ok((result, None));
                }
            },
        };
        let timeout_seconds = if step.timeout_seconds == 0 {
            self.config.default_timeout_seconds
        } else {
            step.timeout_seconds
        };
        // A step with an allow-list gets the egress proxy on its loopback, and TCP only to
        // it; a step without one has neither.
        let allow_list = if step.allow_net.is_empty() {
            None
        } else {
            Some(
                crate::egress::netpolicy::AllowList::parse(&step.allow_net)
                    .map_err(|e| RunnerError::invalid("allow_net", e.to_string()))?,
            )
        };
        let mut env = Self::step_env(step);
        if allow_list.is_some() {
            crate::egress::proxy::set_proxy_env(&mut env, EGRESS_PROXY_PORT);
        }
        let step_spec = StepSpec {
            argv: step.argv.clone(),
            env,
            root: image.root.clone(),
            workspace: workspace.to_path_buf(),
            host_uid_base,
            id_range: self.config.id_range,
            step_uid: BUILD_UID,
            timeout_ms: u64::from(timeout_seconds) * 1000,
            hostname: "kiln".into(),
            tmp_size_bytes: self.config.tmp_size_mib * 1024 * 1024,
            limits: limits.sandbox(),
            tcp_connect_ports: allow_list
                .as_ref()
                .map(|_| vec![EGRESS_PROXY_PORT])
                .unwrap_or_default(),
            egress_proxy_port: allow_list.as_ref().map(|_| EGRESS_PROXY_PORT),
            waived_layers: self.host.waived_layers.clone(),
        };
        let profile_digest = self.profiles.digest(&step_spec, &self.host)?;

        let mut running = match self.take_standby()?.start(&step_spec) {
            Ok(running) => running,
            // A waiting supervisor that died meanwhile: once more, with a fresh one.
            Err(sandbox::SandboxError::Supervisor(reason)) => {
                tracing::warn!(%reason, "standby supervisor unusable; starting another");
                self.sandbox.spawn(&step_spec).map_err(RunnerError::from)?
            }
            Err(other) => return Err(RunnerError::from(other).into()),
        };
        let handle = self.handle(id);
        if let Ok(mut c) = handle.canceller.lock() {
            *c = Some(running.canceller());
        }
        // A cancel that arrived between the check and the spawn still counts.
        if handle.cancelled.load(Ordering::SeqCst) {
            running.canceller().cancel();
        }
        let readers: Vec<_> = [
            (running.take_stdout(), OutputStream::Stdout),
            (running.take_stderr(), OutputStream::Stderr),
        ]
        .into_iter()
        .filter_map(|(fd, stream)| fd.map(|fd| (fd, stream)))
        .map(|(fd, stream)| {
            let runner = self.clone();
            let id = id.to_string();
            let step_name = step.name.clone();
            std::thread::spawn(move || runner.pump_log(fd, &id, &step_name, stream))
        })
        .collect();
        // The proxy serves the listener the supervisor made in the step's namespace; the
        // step is released only after handing it over, so no connection is missed.
        let proxy = match allow_list {
            None => None,
            Some(allow) => {
                let (back, listener) = tokio::task::spawn_blocking(move || {
                    let listener = running.take_egress_listener();
                    (running, listener)
                })
                .await
                .map_err(|e| RunnerError::Internal(format!("waiting for the sandbox: {e}")))?;
                running = back;
                match listener.map_err(RunnerError::from)? {
                    // The sandbox failed before: its outcome says why.
                    None => None,
                    Some(fd) => {
                        let proxy = crate::egress::proxy::Proxy::start(
                            std::net::TcpListener::from(fd),
                            allow,
                            self.config.proxy_limits(),
                            crate::egress::proxy::system_resolver(),
                        )
                        .map_err(RunnerError::io("starting the egress proxy"))?;
                        tracing::info!(
                            job = %id,
                            step = %step.name,
                            listen = %proxy.local_addr(),
                            "egress proxy serving the step's namespace"
                        );
                        Some(proxy)
                    }
                }
            }
        };
        let outcome = tokio::task::spawn_blocking(move || running.wait())
            .await
            .map_err(|e| RunnerError::Internal(format!("waiting for the sandbox: {e}")))?
            .map_err(RunnerError::from);
        // Replace the supervisor this step took now, not while its sandbox was being set
        // up: on a small host the exec would compete with that for the CPU.
        self.refill_standby();
        // Every process of the step is gone: close what is still open, keep the record.
        let network = match proxy {
            Some(proxy) => Some(proxy.finish().await),
            None => None,
        };
        if let Some(n) = network.as_ref().filter(|n| n.unrecorded > 0) {
            tracing::warn!(
                job = %id,
                step = %step.name,
                unrecorded = n.unrecorded,
                "more network attempts than recorded; the link counts them"
            );
        }
        let mut logs = Vec::new();
        for reader in readers {
            let log = tokio::task::spawn_blocking(move || reader.join())
                .await
                .map_err(|e| RunnerError::Internal(format!("log reader: {e}")))?
                .map_err(|_| RunnerError::Internal("log reader panicked".into()))?;
            logs.push(log);
        }
        if let Ok(mut c) = handle.canceller.lock() {
            *c = None;
        }
        let outcome = outcome?;
        let stdout = logs.first().cloned().unwrap_or_default();
        let stderr = logs.get(1).cloned().unwrap_or_default();

        let mut result = StepResult {
            name: step.name.clone(),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            start_latency_us: outcome
                .exec_monotonic_ns
                .map(|exec| exec.saturating_sub(scheduled_ns) / 1000)
                .unwrap_or(0),
            network: network
                .as_ref()
                .map(|n| n.attempts.iter().map(Into::into).collect())
                .unwrap_or_default(),
            network_unrecorded: network.as_ref().map(|n| n.unrecorded).unwrap_or_default(),
            stdout_digest: stdout.stored_digest.clone(),
            stdout_size: stdout.stored,
            stdout_bytes: stdout.total,
            stderr_digest: stderr.stored_digest.clone(),
            stderr_size: stderr.stored,
            stderr_bytes: stderr.total,
            ..Default::default()
        };
        let Some(verdict) =
            crate::engine::outcome::verdict(&outcome.status, timeout_seconds, &step.argv[0])
        else {
            let StepStatus::SetupFailed { layer, message } = &outcome.status else {
                return Err(RunnerError::Internal("a step status without a verdict".into()).into());
            };
            // The step never ran: nothing to attest.
            result.state = StepState::Error as i32;
            result.exit_code = 125;
            // The supervisor's text may name the host's side of a mount.
            let message = message
                .replace(&workspace.display().to_string(), "/workspace")
                .replace(&self.config.state_dir.display().to_string(), "<state>");
            result.message = format!("sandbox layer {layer:?} could not be set up: {message}");
            return Ok((result, None));
        };
        let (state, exit_code, signal) = (verdict.state, verdict.exit_code, verdict.signal);
        // Which limits the step ran into; the first one named is the reason reported.
        let usage = &outcome.usage;
        let hit = crate::engine::outcome::LimitsHit {
            timed_out: outcome.status == StepStatus::TimedOut,
            oom_killed: usage.oom_killed,
            pids_limit_hit: usage.pids_limit_hit,
            quota_hit: crate::limits::workspace_usage(workspace).is_some_and(|(_, full)| full),
        };
        let (timed_out, quota_hit) = (hit.timed_out, hit.quota_hit);
        let limit_reason = hit.reason();
        let size = crate::limits::format_size;
        let message = hit.message(&verdict.message, &limits);
        result.state = state as i32;
        result.exit_code = exit_code;
        result.signal = signal;
        result.message = message.clone();
        result.cpu_time_ms = usage.cpu_time_ms;
        result.peak_memory_bytes = usage.peak_memory_bytes;
        result.limit_reason = limit_reason.to_string();
        result.seccomp_denials = outcome
            .seccomp_denials
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();

        // What the step left is recorded only if every entry can be (the walk names the
        // first that cannot) and its apparent size is within the disk limit: the quota
        // bounds real data, but sparse files are read by hashing at their apparent size.
        // A tree that cannot be recorded fails the step; its link records no products
        // and says why in byproducts (`kiln.unrecorded_products`).
        let survey = {
            let workspace = workspace.to_path_buf();
            blocking(move || Ok(survey_workspace(&workspace, walk_options))).await?
        };
        let refused = match survey {
            Err(err) => Some(unrecordable(&err)),
            Ok(apparent) if apparent > limits.disk_bytes => Some((
                format!(
                    "the workspace's files add up to {} (sparse files count at their apparent size), more than the disk limit of {}; they are not hashed or attested",
                    size(apparent),
                    size(limits.disk_bytes)
                ),
                "disk-quota",
            )),
            Ok(_) => None,
        };
        let refused = match refused {
            Some(refused) => Err(refused),
            None => match hash_workspace(workspace.to_path_buf(), walk_options).await? {
                Ok(products) => Ok(products),
                Err(err) => Err(unrecordable(&err)),
            },
        };
        let (products, unrecorded) = match refused {
            Ok(products) => (products, None),
            Err((reason, limit)) => {
                // A step that timed out or was cancelled keeps that state.
                if state == StepState::Succeeded {
                    result.state = StepState::Failed as i32;
                    result.exit_code = 1;
                }
                // A limit the step ran into first stays the reported one.
                if result.limit_reason.is_empty() {
                    result.limit_reason = limit.into();
                }
                result.message = if message.is_empty() {
                    reason.clone()
                } else {
                    format!("{message}; {reason}")
                };
                (Default::default(), Some(reason))
            }
        };
        let byproducts = serde_json::json!({
            "return-value": exit_code,
            "stdout": stdout.text(),
            "stderr": stderr.text(),
            "kiln": {
                "status": status_name(&outcome.status),
                "message": result.message,
                "signal": signal,
                "duration_ms": outcome.duration_ms,
                "stdout_bytes": stdout.total,
                "stdout_sha256": stdout.digest,
                "stdout_truncated": stdout.truncated_in_link(),
                "stderr_bytes": stderr.total,
                "stderr_sha256": stderr.digest,
                "stderr_truncated": stderr.truncated_in_link(),
                // every request to the step's egress proxy, allowed or denied
                "network": network.as_ref().map(|n| n.attempts.clone()).unwrap_or_default(),
                "network_unrecorded": network.as_ref().map(|n| n.unrecorded).unwrap_or_default(),
                "limit_reason": result.limit_reason,
                // why the products are empty: the workspace could not be recorded
                "unrecorded_products": unrecorded,
                "timed_out": timed_out,
                "oom_killed": usage.oom_killed,
                "pids_limit_hit": usage.pids_limit_hit,
                "disk_quota_hit": quota_hit,
                "cpu_time_ms": usage.cpu_time_ms,
                "peak_memory_bytes": usage.peak_memory_bytes,
                // syscall name -> times the seccomp filter denied it (EPERM)
                "seccomp_denials": outcome.seccomp_denials,
            },
        });
        let environment = serde_json::json!({
            "image": image.describe(),
            "sandbox_profile": {"sha256": profile_digest},
            "runner": {"name": "kiln", "version": RUNNER_VERSION},
            "timeout_seconds": timeout_seconds,
            "limits": limits.describe(),
            // sandbox layers skipped on this host by the operator's explicit waiver
            "waived_layers": self.host.waived_layers,
        });
        let link = provenance::link::Link {
            name: step.name.clone(),
            command: step.argv.clone(),
            materials,
            products,
            byproducts,
            environment,
        };
        let signed = crate::engine::attest::sign_link(&link, &self.key)?;
        result.link_digest = self.cas.put_bytes(&signed.metablock)?;
        result.link_dsse_digest = self.cas.put_bytes(&signed.dsse)?;
        result.link_name = signed.file_name;
        let products = unrecorded.is_none().then_some(link.products);
        Ok((result, products))
    }

    /// Drains one of the step's output pipes: stores it in the content store and
    /// streams it to Watch subscribers up to the caps (max_log_bytes for the stream,
    /// max_job_log_bytes for the job), keeps the head for the link and hashes the whole
    /// stream. Past the caps the pipe is still drained, so the step never blocks on it.
    fn pump_log(&self, fd: OwnedFd, id: &str, step: &str, stream: OutputStream) -> CapturedLog {
        let mut file = fs::File::from(fd);
        let mut log = CapturedLog::new(self.config.link_log_bytes);
        let mut hasher = Sha256::new();
        let handle = self.handle(id);
        let mut store = match self.cas.writer() {
            Ok(writer) => Some(writer),
            Err(err) => {
                tracing::warn!(job = %id, error = %err, "cannot store step output");
                None
            }
        };
        let mut buf = vec![0u8; EVENT_CHUNK];
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "reading step output");
                    break;
                }
            };
            let chunk = &buf[..n];
            hasher.update(chunk);
            log.push(chunk);
            let Some(writer) = store.as_mut() else {
                continue;
            };
            let room = self.config.max_log_bytes.saturating_sub(log.stored);
            let keep = handle.claim_log_bytes(
                room.min(chunk.len() as u64),
                self.config.max_job_log_bytes.0,
            );
            if keep == 0 {
                continue;
            }
            // What subscribers get is always a prefix of what is stored, so one who
            // fell behind can take the rest from the store.
            // `keep` is at most `chunk.len()` (claimed from `room.min(chunk.len())`).
            let kept = &chunk[..usize::try_from(keep).map_or(chunk.len(), |k| k.min(chunk.len()))];
            if let Err(err) = writer.write(kept) {
                tracing::warn!(job = %id, error = %err, "storing step output; the log is not stored");
                store = None;
                continue;
            }
            log.stored += keep;
            self.emit(
                id,
                job_event::Event::Output(StepOutput {
                    step: step.to_string(),
                    stream: stream as i32,
                    data: kept.to_vec(),
                }),
            );
        }
        log.digest = hex::encode(hasher.finalize());
        if let Some(writer) = store {
            match writer.commit(None) {
                Ok(digest) => log.stored_digest = digest,
                Err(err) => tracing::warn!(job = %id, error = %err, "storing step output"),
            }
        }
        if log.stored_digest.is_empty() {
            // Nothing in the store to point to, whatever was streamed.
            log.stored = 0;
        }
        log
    }

    /// Stores the declared outputs. The step is over (every process of its sandbox
    /// is dead), so the tree cannot change under us; still, no symlink is followed
    /// and only regular files are taken, each opened relative to its directory.
    fn collect_outputs(&self, workspace: &Path, outputs: &[String]) -> Result<Vec<OutputFile>> {
        let options = workspace_walk(&self.config);
        // Everything is counted and checked before anything is stored.
        let mut budget = OutputBudget {
            config: &self.config,
            files: 0,
            bytes: 0,
            listing: 0,
        };
        let mut found = Vec::with_capacity(outputs.len());
        for output in outputs {
            let path = resolve_in_workspace(workspace, output)?;
            let meta = fs::symlink_metadata(&path).map_err(|_| {
                RunnerError::invalid(
                    format!("output {output:?}"),
                    "was not produced by the steps",
                )
            })?;
            if meta.is_dir() {
                provenance::walk::walk(&path, options, |entry: &WalkEntry<'_>| {
                    match entry.kind() {
                        WalkKind::Dir => {}
                        WalkKind::File => {
                            budget.add(output.len() + 1 + entry.path().len(), entry.size())?
                        }
                        WalkKind::Symlink => {
                            return Err(Collect::Runner(not_regular(
                                &format!("{output}/{}", entry.path()),
                                true,
                            )))
                        }
                    }
                    Ok(Flow::Continue)
                })
                .map_err(|e| e.for_output(output))?;
            } else if meta.is_file() {
                budget.add(output.len(), meta.len())?;
            } else {
                return Err(not_regular(output, meta.file_type().is_symlink()));
            }
            found.push((output, path, meta));
        }
        let cap = self.config.max_outputs_size.0;
        if budget.bytes > cap {
            return Err(RunnerError::invalid(
                "outputs",
                format!(
                    "the declared outputs total {}, more than the runner's max_outputs_size of {}; nothing was stored",
                    crate::limits::format_size(budget.bytes),
                    crate::limits::format_size(cap)
                ),
            ));
        }
        let mut files = Vec::new();
        for (output, path, meta) in found {
            if meta.is_dir() {
                provenance::walk::walk(&path, options, |entry: &WalkEntry<'_>| {
                    if entry.kind() == WalkKind::File {
                        let rel = format!("{output}/{}", entry.path());
                        let file = entry.open_file()?;
                        let stored = store_output(&self.cas, file, rel.clone(), entry.mode());
                        files.push(without_host_path(stored, &rel)?);
                    }
                    Ok::<_, Collect>(Flow::Continue)
                })
                .map_err(|e| e.for_output(output))?;
            } else {
                // A declared path is short (checked at submit): by name is fine here.
                let (digest, size) = without_host_path(self.cas.put_file(&path), output)?;
                files.push(OutputFile {
                    path: output.clone(),
                    digest,
                    size,
                    executable: meta.mode() & 0o111 != 0,
                });
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        files.dedup_by(|a, b| a.path == b.path);
        Ok(files)
    }
}

/// An error while walking a declared output: the walker's, or storing's.
enum Collect {
    Walk(WalkError),
    Runner(RunnerError),
}

impl From<WalkError> for Collect {
    fn from(err: WalkError) -> Self {
        Collect::Walk(err)
    }
}

impl From<RunnerError> for Collect {
    fn from(err: RunnerError) -> Self {
        Collect::Runner(err)
    }
}

impl Collect {
    fn for_output(self, output: &str) -> RunnerError {
        match self {
            Collect::Walk(err) => output_walk_error(output, &err),
            Collect::Runner(err) => err,
        }
    }
}

/// Why a job stopped early.
enum JobEnd {
    StepFailed(String),
    Cancelled,
    Error(RunnerError),
}

impl From<RunnerError> for JobEnd {
    fn from(err: RunnerError) -> Self {
        JobEnd::Error(err)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T, JobEnd> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| JobEnd::Error(RunnerError::Internal(format!("worker: {e}"))))?
        .map_err(JobEnd::Error)
}

/// The workspace's name inside its enclosure.
const WORKSPACE_DIR: &str = "ws";

/// A directory only `owner` (the slot's mapped root) may enter.
fn make_enclosure(dir: &Path, owner: u32) -> Result<()> {
    fs::create_dir(dir).map_err(RunnerError::io_path("creating", dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(RunnerError::io_path("chmod", dir))?;
    std::os::unix::fs::chown(dir, Some(owner), Some(owner))
        .map_err(RunnerError::io_path("chown", dir))
}

/// Creates `dir` and its missing parents below `workspace` as 0755, as a build expects
/// them, whatever the daemon's umask (the workspace root itself is 0700).
fn create_dirs_0755(workspace: &Path, dir: &Path) -> Result<()> {
    let Ok(relative) = dir.strip_prefix(workspace) else {
        return Err(RunnerError::Internal(
            "input directory outside the workspace".into(),
        ));
    };
    let mut path = workspace.to_path_buf();
    for component in relative.components() {
        path.push(component);
        match fs::create_dir(&path) {
            Ok(()) => fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                .map_err(RunnerError::io_path("chmod", &path))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(RunnerError::io_path("creating", &path)(e)),
        }
    }
    Ok(())
}

/// The options every walk of a workspace uses: the entry budget is checked while the
/// tree is read, so a workspace over it costs the daemon no more than the budget.
fn workspace_walk(config: &Config) -> WalkOptions {
    WalkOptions {
        max_entries: Some(config.max_workspace_entries),
        max_total_path_bytes: Some(MAX_WORKSPACE_PATH_BYTES),
    }
}

/// The most bytes a workspace's paths may add up to: a link lists each path (twice,
/// as a material of the next step too), and a client must be able to read it.
const MAX_WORKSPACE_PATH_BYTES: u64 = 16 << 20;

/// Why a step's workspace cannot be recorded: (message for the step, limit reason).
/// Paths are named as the step saw them, under /workspace, never by a host path.
fn unrecordable(err: &WalkError) -> (String, &'static str) {
    match err.problem {
        WalkProblem::TooManyEntries { limit } => (
            format!(
                "the workspace holds more than {limit} entries (files, directories and symlinks), the runner's max_workspace_entries; they are not hashed or attested"
            ),
            "files",
        ),
        WalkProblem::PathsTooLong { limit } => (
            format!(
                "the paths of the workspace's files add up to more than {}; they are not hashed or attested",
                crate::limits::format_size(limit)
            ),
            "files",
        ),
        _ => (
            format!(
                "the workspace cannot be attested: {}",
                err.under(WORKSPACE_IN_SANDBOX)
            ),
            "",
        ),
    }
}

/// The sum of the apparent sizes of the workspace's regular files, after checking
/// that every entry can be recorded (the same walk the hashing does, without reading
/// a byte): what hashing would refuse is found before anything is read.
fn survey_workspace(workspace: &Path, options: WalkOptions) -> Result<u64, WalkError> {
    let mut total = 0u64;
    provenance::walk::walk(workspace, options, |entry: &WalkEntry<'_>| {
        if entry.kind() == WalkKind::File {
            total = total.saturating_add(entry.size());
        }
        Ok::<_, WalkError>(Flow::Continue)
    })?;
    Ok(total)
}

/// Hashes the workspace; a tree that cannot be recorded is the walk's error (naming
/// the entry relative to the workspace), anything else is the daemon's.
async fn hash_workspace(
    workspace: PathBuf,
    options: WalkOptions,
) -> Result<Result<std::collections::BTreeMap<String, String>, WalkError>, JobEnd> {
    blocking(
        move || match provenance::hash::hash_tree_within(&workspace, options) {
            Ok(tree) => Ok(Ok(tree)),
            Err(provenance::ProvenanceError::Walk(err)) => Ok(Err(err)),
            Err(other) => Err(other.into()),
        },
    )
    .await
}

fn status_name(status: &StepStatus) -> &'static str {
    match status {
        StepStatus::Exited { .. } => "exited",
        StepStatus::Signaled { .. } => "signaled",
        StepStatus::TimedOut => "timed-out",
        StepStatus::Cancelled => "cancelled",
        StepStatus::ExecFailed { .. } => "exec-failed",
        StepStatus::SetupFailed { .. } => "setup-failed",
    }
}

#[derive(Debug, Clone, Default)]
struct CapturedLog {
    head: Vec<u8>,
    cap: usize,
    total: u64,
    digest: String,
    /// Bytes in the content store, and their digest (empty if nothing could be stored).
    stored: u64,
    stored_digest: String,
}

impl CapturedLog {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            ..Default::default()
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        let room = self.cap.saturating_sub(self.head.len());
        self.head.extend_from_slice(&chunk[..room.min(chunk.len())]);
    }

    fn truncated_in_link(&self) -> bool {
        self.total > self.head.len() as u64
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.head).into_owned()
    }
}

/// Joins a validated workspace path to the workspace, refusing any symlink on the way.
fn resolve_in_workspace(workspace: &Path, relative: &str) -> Result<PathBuf> {
    crate::spec::check_workspace_path("output", relative)?;
    let mut path = workspace.to_path_buf();
    let components: Vec<&str> = relative.split('/').collect();
    for (i, component) in components.iter().enumerate() {
        path.push(component);
        if i + 1 < components.len() {
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(RunnerError::invalid(
                        format!("output {relative:?}"),
                        "a directory on its path is a symlink; outputs never follow links",
                    ))
                }
                _ => {}
            }
        }
    }
    Ok(path)
}

/// Encoded bytes of one output in the job's outputs list, besides its path: the digest
/// and the field tags, lengths and varints.
const OUTPUT_ENTRY_OVERHEAD: usize = 80;
/// The most the outputs list may take in a `Job` message: every answer about the job
/// carries it, and a client decodes at most 4 MiB.
const MAX_OUTPUT_LISTING_BYTES: usize = 2 << 20;

/// Counts what a job's declared outputs would store, refusing what cannot be stored
/// before anything is: more files than `max_outputs`, a listing too long for a client,
/// or more bytes than `max_outputs_size`.
struct OutputBudget<'a> {
    config: &'a Config,
    files: u64,
    bytes: u64,
    listing: usize,
}

impl OutputBudget<'_> {
    fn add(&mut self, path_len: usize, size: u64) -> Result<()> {
        self.files += 1;
        self.bytes = self.bytes.saturating_add(size);
        self.listing = self
            .listing
            .saturating_add(path_len + OUTPUT_ENTRY_OVERHEAD);
        let max = self.config.max_outputs;
        if self.files > max {
            return Err(RunnerError::invalid(
                "outputs",
                format!("the declared outputs hold more than {max} files, the runner's max_outputs; nothing was stored"),
            ));
        }
        if self.listing > MAX_OUTPUT_LISTING_BYTES {
            return Err(RunnerError::invalid(
                "outputs",
                format!(
                    "the declared outputs' list of {} files and their paths takes more than {}, more than a client can read with the job; nothing was stored",
                    self.files,
                    crate::limits::format_size(MAX_OUTPUT_LISTING_BYTES as u64)
                ),
            ));
        }
        Ok(())
    }
}

/// A failure to store an output, told to the client without the daemon's paths (the
/// content store's or the workspace's); the log keeps the details.
fn without_host_path<T>(stored: Result<T>, rel: &str) -> Result<T> {
    stored.map_err(|err| match err {
        RunnerError::InvalidArgument { .. } => err,
        other => {
            tracing::error!(output = %rel, error = %other, "could not store an output");
            RunnerError::Internal(format!(
                "could not store output {rel:?} in the content store"
            ))
        }
    })
}

/// An output that cannot be collected, named as the step saw it.
fn output_walk_error(output: &str, err: &WalkError) -> RunnerError {
    RunnerError::invalid(
        format!("output {output:?}"),
        err.under(&format!("{WORKSPACE_IN_SANDBOX}/{output}")),
    )
}

fn not_regular(rel: &str, symlink: bool) -> RunnerError {
    let kind = if symlink {
        "a symlink"
    } else {
        "not a regular file"
    };
    RunnerError::invalid(
        format!("output {rel:?}"),
        format!("is {kind}; outputs must be regular files"),
    )
}

/// Copies an open output file into the content store, hashing what is read.
fn store_output(
    cas: &ContentStore,
    mut file: fs::File,
    rel: String,
    mode: u32,
) -> Result<OutputFile> {
    let mut writer = cas.writer()?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(RunnerError::invalid(
                    format!("output {rel:?}"),
                    format!("cannot be read: {e}"),
                ))
            }
        };
        writer.write(&buf[..n])?;
    }
    let size = writer.size();
    let digest = writer.commit(None)?;
    Ok(OutputFile {
        path: rel,
        digest,
        size,
        executable: mode & 0o111 != 0,
    })
}

/// Gives every entry of the workspace (the root included) to `id`, never following
/// a symlink.
fn chown_tree(root: &Path, id: u32) -> Result<()> {
    std::os::unix::fs::lchown(root, Some(id), Some(id))
        .map_err(RunnerError::io_path("chown", root))?;
    provenance::walk::walk(root, WalkOptions::default(), |entry: &WalkEntry<'_>| {
        entry.chown(id, id)?;
        Ok::<_, WalkError>(Flow::Continue)
    })
    .map_err(|e| RunnerError::Internal(format!("chown of the workspace: {e}")))?;
    Ok(())
}
