//! Starting jobs: the queue, the job slots and their permits, stopping and draining
//! for a shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use agent_proto::v1::JobState;
use tokio::sync::watch;

use crate::engine::fairqueue::Share;
use crate::engine::jobs::{JobHandle, Runner};
use crate::engine::now_ms;
use crate::error::Result;

impl Runner {
    /// Runs queued jobs, at most `max_concurrent_jobs` at a time, the slots shared
    /// among owners by `fairqueue`, until the daemon stops starting jobs.
    pub async fn schedule(self: Arc<Self>) {
        self.executor.replenish();
        let mut shutdown = self.shutdown.subscribe();
        loop {
            let permit = tokio::select! {
                permit = self.permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                _ = async { shutdown.wait_for(|stop| *stop).await.is_ok() } => break,
            };
            let next = tokio::select! {
                next = self.next_startable() => next,
                _ = async { shutdown.wait_for(|stop| *stop).await.is_ok() } => break,
            };
            let (owner, id) = next;
            if self.draining.load(Ordering::SeqCst) {
                break;
            }
            let slot = match self.slots.lock().ok().and_then(|mut s| s.pop()) {
                Some(slot) => slot,
                None => {
                    tracing::error!("no free id slot although a permit was granted");
                    self.slot_done(&owner);
                    continue;
                }
            };
            let runner = self.clone();
            tokio::spawn(async move {
                if let Err(err) = runner.clone().run_job(&id, slot).await {
                    tracing::error!(job = %id, error = %err, "job failed in Kiln");
                    let (failed, id, message) = (runner.clone(), id.clone(), err.client_message());
                    let _ =
                        tokio::task::spawn_blocking(move || failed.fail_job(&id, &message)).await;
                }
                if let Ok(mut slots) = runner.slots.lock() {
                    slots.push(slot);
                }
                runner.slot_done(&owner);
                drop(permit);
            });
        }
    }

    /// Waits until a queued job may start (its owner below its running cap); answers it
    /// and its owner.
    async fn next_startable(&self) -> (String, String) {
        loop {
            if let Some(next) = self.queue.lock().ok().and_then(|mut q| q.pop()) {
                return next;
            }
            // A notification sent since the check is kept for this wait.
            self.queue_changed.notified().await;
        }
    }

    /// A job of `owner` no longer holds a slot: its owner may start another.
    fn slot_done(&self, owner: &str) {
        if let Ok(mut queue) = self.queue.lock() {
            queue.finished(owner);
        }
        self.queue_changed.notify_one();
    }

    /// The share of the job slots of an owner: its tenant's weight and running cap, or
    /// weight 1 and no cap for an owner outside the tenants.
    pub(super) fn share_of(&self, owner: &str) -> Share {
        crate::tenants::tenant_of_owner(owner)
            .and_then(|name| self.config.tenants.get(name))
            .map(|tenant| Share {
                weight: tenant.weight.max(1),
                max_running: tenant.max_running_jobs,
            })
            .unwrap_or_default()
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
        let from = JobState::try_from(job.state).ok();
        job.state = JobState::Error as i32;
        job.message = message.to_string();
        job.finished_unix_ms = now_ms();
        if let Err(err) = self.commit_failure(&job, from) {
            tracing::error!(job = %id, error = %err, "could not record the job's failure; retrying");
            let runner = self.clone();
            let job = job.clone();
            tokio::spawn(async move {
                let mut wait = std::time::Duration::from_millis(200);
                loop {
                    tokio::time::sleep(wait).await;
                    let (failed, record) = (runner.clone(), job.clone());
                    match tokio::task::spawn_blocking(move || failed.commit_failure(&record, from))
                        .await
                    {
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

    /// Commits a job's failure and announces it (on the calling, blocking thread).
    fn commit_failure(&self, job: &agent_proto::v1::Job, from: Option<JobState>) -> Result<()> {
        self.db.update_job(job)?;
        self.announce_state(job, from);
        Ok(())
    }
}
