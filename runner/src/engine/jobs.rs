//! The runner: accepts jobs (Submit, Get, Cancel), keeps each queued or running job's
//! in-memory handle and announces its events. The scheduler (`scheduler`) starts jobs,
//! `run` runs a job's steps in a fresh workspace (`workspace`), one sandbox per step
//! (`step`), with its output pipes drained by `logs`. Every state change is durable
//! before it is announced.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use agent_proto::v1::{job_event, Job, JobSpec, JobState, StepResult, StepState};
use tokio::sync::{watch, Notify, Semaphore};

use crate::api::auth::{current_principal, Principal};
use crate::config::Config;
use crate::engine::enclosure::reset_work_dir;
use crate::engine::executor::{Cancel, Executor};
use crate::engine::fairqueue::FairQueue;
use crate::engine::idranges::IdRanges;
use crate::engine::now_ms;
use crate::engine::signer::Signer;
use crate::engine::watch::EventRing;
use crate::error::{Result, RunnerError};
use crate::images::Images;
use crate::plan::ValidatedJob;
use crate::store::cas::ContentStore;
use crate::store::db::{Database, Inserted, OwnerQueue, QueueCap};

/// What the runner isolates steps with: the executor (see `executor`), and the host id
/// ranges leased for the job slots.
pub struct Isolation {
    pub executor: Arc<dyn Executor>,
    pub id_ranges: IdRanges,
}

/// The in-memory side of a queued or running job: its recent events for Watch, the
/// log bytes it has stored, and cancellation. Dropped from the map when the job ends.
pub struct JobHandle {
    pub events: Arc<EventRing>,
    /// Bytes of step logs stored for the job so far (at most `max_job_log_bytes`).
    pub(super) log_bytes: AtomicU64,
    pub(super) cancelled: AtomicBool,
    pub(super) canceller: Mutex<Option<Cancel>>,
    /// Why the job was cancelled, when not by a client.
    pub(super) cancel_reason: Mutex<Option<String>>,
    /// Set once the scheduler started the job.
    pub(super) running: AtomicBool,
    /// What the job runs, validated once (at Submit, or when the record was loaded).
    pub(super) plan: Mutex<Option<Arc<ValidatedJob>>>,
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
            plan: Mutex::new(None),
        }
    }

    pub(super) fn set_plan(&self, plan: Arc<ValidatedJob>) {
        if let Ok(mut slot) = self.plan.lock() {
            *slot = Some(plan);
        }
    }

    pub(super) fn plan(&self) -> Option<Arc<ValidatedJob>> {
        self.plan.lock().ok().and_then(|p| p.clone())
    }

    /// Claims up to `want` bytes of the job's log allowance; answers how many it got.
    pub(super) fn claim_log_bytes(&self, want: u64, job_cap: u64) -> u64 {
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
    /// Observers of job and step events (the audit log, metrics).
    pub bus: Arc<crate::engine::bus::Bus>,
    pub(super) executor: Arc<dyn Executor>,
    pub(super) handles: Mutex<HashMap<String, Arc<JobHandle>>>,
    /// Queued jobs by owner, in the order they start (see `fairqueue`).
    pub(super) queue: Mutex<FairQueue>,
    /// Signalled when a job is queued or a slot's job ends.
    pub(super) queue_changed: Notify,
    pub(super) slots: Mutex<Vec<u32>>,
    pub(super) permits: Arc<Semaphore>,
    pub(super) draining: AtomicBool,
    /// Turns true when the daemon stops starting jobs (SIGTERM).
    pub(super) shutdown: watch::Sender<bool>,
    pub(super) work_dir: PathBuf,
    /// The host id range of each job slot, leased host-wide.
    pub(super) id_ranges: IdRanges,
    /// Publishes under way at once ([publish] max_concurrent); more wait their turn.
    pub(super) publishing: Arc<Semaphore>,
}

impl Runner {
    pub fn new(
        config: Config,
        db: Database,
        cas: ContentStore,
        images: Images,
        key: Signer,
        isolation: Isolation,
        bus: Arc<crate::engine::bus::Bus>,
    ) -> Result<Arc<Self>> {
        let Isolation {
            executor,
            id_ranges,
        } = isolation;
        let work_dir = config.state_dir.join("work");
        reset_work_dir(&work_dir, executor.as_ref())?;
        let slots = (0..config.max_concurrent_jobs).rev().collect();
        let permits = Arc::new(Semaphore::new(config.max_concurrent_jobs as usize));
        let publishing = Arc::new(Semaphore::new(config.publish.max_concurrent.max(1) as usize));
        let runner = Arc::new(Self {
            config,
            db,
            cas,
            images,
            key,
            bus,
            executor,
            handles: Mutex::new(HashMap::new()),
            queue: Mutex::new(FairQueue::default()),
            queue_changed: Notify::new(),
            slots: Mutex::new(slots),
            permits,
            draining: AtomicBool::new(false),
            shutdown: watch::channel(false).0,
            work_dir,
            id_ranges,
            publishing,
        });
        runner.recover()?;
        Ok(runner)
    }

    /// After a restart: a job that was running cannot be resumed halfway (its
    /// workspace is gone), so it fails with a clear message; queued jobs run again.
    fn recover(&self) -> Result<()> {
        for mut job in self.db.jobs_in_state(JobState::Running)? {
            job.state = JobState::Error as i32;
            job.message = "interrupted: the daemon stopped while the job was running".into();
            job.finished_unix_ms = now_ms();
            self.db.update_job(&job)?;
            self.announce_state(&job, Some(JobState::Running));
            tracing::warn!(job = %job.job_id, "job interrupted by a daemon restart");
        }
        for (mut job, owner) in self.db.owned_jobs_in_state(JobState::Queued)? {
            let loaded = job
                .spec
                .clone()
                .ok_or_else(|| RunnerError::Internal("the record has no spec".into()))
                .and_then(|spec| self.revalidate(spec, &owner));
            match loaded {
                Ok(plan) => {
                    tracing::info!(job = %job.job_id, "requeueing job accepted before a restart");
                    self.handle(&job.job_id).set_plan(Arc::new(plan));
                    self.enqueue(&job.job_id, &owner);
                }
                Err(err) => {
                    tracing::error!(job = %job.job_id, error = %err, "a queued job's record does not load");
                    job.state = JobState::Error as i32;
                    job.message = format!(
                        "the job could not be queued again after a restart: {}",
                        err.client_message()
                    );
                    job.finished_unix_ms = now_ms();
                    self.db.update_job(&job)?;
                }
            }
        }
        Ok(())
    }

    /// A queued job's spec from its record, validated again against its owner's limits
    /// as configured now: since it was accepted the operator may have narrowed them, or
    /// moved the owner's uid into a tenant.
    fn revalidate(&self, spec: JobSpec, owner: &str) -> Result<ValidatedJob> {
        let caller = self.current_principal(owner)?;
        let limits = crate::spec::SpecLimits::of(&self.config, &caller);
        ValidatedJob::validate(spec, &limits, &self.config)
    }

    /// Who answers now for what `owner` recorded (see [`current_principal`]).
    pub(super) fn current_principal(&self, owner: &str) -> Result<Principal> {
        current_principal(owner, &self.config.admin_uids, &self.config.tenants).ok_or_else(|| {
            RunnerError::FailedPrecondition(format!(
                "the job's owner ({owner}) is a tenant that is no longer configured"
            ))
        })
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

    fn enqueue(&self, id: &str, owner: &str) {
        let owner = self.queue_owner(owner);
        let share = self.share_of(&owner);
        match self.queue.lock() {
            Ok(mut queue) => queue.push(&owner, share, id.to_string()),
            Err(poisoned) => poisoned.into_inner().push(&owner, share, id.to_string()),
        }
        self.queue_changed.notify_one();
    }

    /// Whose share of the slots a job of `owner` takes: its tenant's today, also for a
    /// uid's job from before the uid joined it (held to the tenant's running cap).
    fn queue_owner(&self, owner: &str) -> String {
        self.current_principal(owner)
            .map_or_else(|_| owner.to_string(), |caller| caller.owner)
    }

    pub(super) fn emit(&self, id: &str, event: job_event::Event) {
        self.handle(id).events.push(id, event);
    }

    /// Records and queues a validated job for `caller`; answers with its id. Every
    /// input must be a blob the caller may read (see [`crate::api::auth`]).
    pub fn submit(
        &self,
        plan: ValidatedJob,
        idempotency_key: Option<&str>,
        caller: &Principal,
    ) -> Result<String> {
        let spec = plan.spec();
        if self.draining.load(Ordering::SeqCst) {
            return Err(RunnerError::Unavailable(
                "the daemon is shutting down".into(),
            ));
        }
        // A job whose records and results cannot be kept is not accepted.
        self.cas.check_room(0)?;
        self.check_inputs_readable(spec, caller)?;
        let tenant = caller
            .tenant
            .as_deref()
            .and_then(|name| self.config.tenants.get(name).map(|t| (name, t)));
        self.check_image_at_submit(&spec.image, tenant)?;
        let queue_key = tenant.map(|(name, _)| format!("tenants.{name}.max_queued_jobs"));
        let queue = OwnerQueue {
            cap: tenant
                .and_then(|(_, t)| t.max_queued_jobs)
                .zip(queue_key.as_deref())
                .map(|(max, key)| QueueCap { max, key }),
            // One tenant filling the runner's queue must not lock the others out.
            reserved: tenant.map_or(0, |(_, t)| {
                self.config
                    .tenants
                    .queue_share(t.weight, self.config.max_queued_jobs)
            }),
        };
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
            spec: Some(spec.clone()),
            state: JobState::Queued as i32,
            steps,
            created_unix_ms: now_ms(),
            ..Default::default()
        };
        match self
            .db
            .insert_job_within(&job, &caller.owner, idempotency_key, caller.uid, queue)?
        {
            Inserted::New(id) => {
                self.handle(&id).set_plan(Arc::new(plan));
                self.announce_state(&job, None);
                self.emit(&id, job_event::Event::Queued(Default::default()));
                self.enqueue(&id, &caller.owner);
                tracing::info!(job = %id, owner = %caller.owner, "job accepted");
                Ok(id)
            }
            Inserted::Existing(id) => Ok(id),
        }
    }

    /// Whether the operator's `[images] allowed` and the caller's tenant's `images` admit
    /// the image, as its records name it now (by name, by digest, or both). The run checks
    /// the image it resolves again: a record may change before the job starts.
    fn check_image_at_submit(
        &self,
        image: &str,
        tenant: Option<(&str, &crate::tenants::TenantConfig)>,
    ) -> Result<()> {
        let global = self.config.images.allowed.as_ref();
        let tenant_list = tenant.and_then(|(name, t)| t.images.as_ref().map(|l| (name, l)));
        if global.is_none() && tenant_list.is_none() {
            return Ok(());
        }
        let identity = self.images.identity_of(image)?;
        if let Some(list) = global {
            if !list.allows(&identity) {
                return Err(RunnerError::PermissionDenied(format!(
                    "image {image:?} is not among the images [images] allowed lists"
                )));
            }
        }
        if let Some((name, list)) = tenant_list {
            if !list.allows(&identity) {
                return Err(RunnerError::PermissionDenied(format!(
                    "image {image:?} is not among the images tenants.{name}.images allows"
                )));
            }
        }
        Ok(())
    }

    /// An input the caller may not read is answered like one the store does not hold,
    /// so Submit tells nothing about other clients' blobs.
    fn check_inputs_readable(&self, spec: &JobSpec, caller: &Principal) -> Result<()> {
        let readable = if caller.admin {
            None
        } else {
            Some(self.db.readable_blobs(
                &caller.owner_keys(),
                spec.inputs.iter().map(|i| i.digest.as_str()),
            )?)
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

    /// Whether the job may run `image` as resolved for its run: `[images] allowed` and
    /// its owner's tenant's allow-list are checked again on the image actually used.
    pub(super) fn check_image_for_owner(
        &self,
        id: &str,
        image: &crate::images::ResolvedImage,
    ) -> Result<()> {
        let identity = image.identity();
        if let Some(list) = &self.config.images.allowed {
            if !list.allows(&identity) {
                return Err(RunnerError::FailedPrecondition(format!(
                    "image {:?} (as it is now) is not among the images [images] allowed lists",
                    image.name
                )));
            }
        }
        let Some(owner) = self.db.owner_of(id)? else {
            return Ok(());
        };
        // A uid's job from before it joined a tenant is held to that tenant's list too.
        let Some(name) = self.current_principal(&owner)?.tenant else {
            return Ok(());
        };
        let allowed = match self
            .config
            .tenants
            .get(&name)
            .and_then(|t| t.images.as_ref())
        {
            None => true,
            Some(images) => images.allows(&identity),
        };
        if !allowed {
            return Err(RunnerError::FailedPrecondition(format!(
                "image {:?} (as it is now) is not among the images tenants.{name}.images allows",
                image.name
            )));
        }
        Ok(())
    }

    pub(super) fn get_any(&self, id: &str) -> Result<Job> {
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
                    self.announce_state(&job, Some(JobState::Queued));
                    self.finish_handle(id, job);
                    // Nothing of it stays in memory: submitting and cancelling in a
                    // loop, within any queue cap, would grow the queue without bound.
                    if let Some(owner) = self.db.owner_of(id)? {
                        let owner = self.queue_owner(&owner);
                        match self.queue.lock() {
                            Ok(mut queue) => queue.remove(&owner, id),
                            Err(poisoned) => poisoned.into_inner().remove(&owner, id),
                        }
                    }
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

    pub(super) fn cancel_handle(handle: &JobHandle) {
        handle.cancelled.store(true, Ordering::SeqCst);
        let canceller = handle.canceller.lock().ok().and_then(|c| c.clone());
        if let Some(cancel) = canceller {
            cancel();
        }
    }

    /// Ends the job's in-memory side: Watch streams still following it finish from the
    /// stored logs, later ones replay the job from its record.
    pub(super) fn finish_handle(&self, id: &str, job: Job) {
        let handle = match self.handles.lock() {
            Ok(mut handles) => handles.remove(id),
            Err(poisoned) => poisoned.into_inner().remove(id),
        };
        if let Some(handle) = handle {
            handle.events.finish(id, job);
        }
    }
}
