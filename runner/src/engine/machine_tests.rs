//! The job state machine, driven through the fake executor: no root, no sandbox. Each
//! test runs the real runner (database, content store, signing, scheduler) in a temp
//! state directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use agent_proto::v1::{Job, JobSpec, JobState, Step, StepState};
use sandbox::StepStatus;
use sha2::{Digest, Sha256};

use crate::api::auth::Principal;
use crate::config::Config;
use crate::engine::executor::fake::{FakeExecutor, Script};
use crate::engine::idranges::IdRanges;
use crate::engine::jobs::{Isolation, Runner};
use crate::engine::signer::Signer;
use crate::images::Images;
use crate::plan::ValidatedJob;
use crate::store::cas::ContentStore;
use crate::store::db::{Creation, Database};

struct Harness {
    runner: Arc<Runner>,
    executor: Arc<FakeExecutor>,
    state: tempfile::TempDir,
    _locks: tempfile::TempDir,
}

fn client() -> Principal {
    Principal::unix(1000, &[])
}

/// A runner over `state` (a fresh temp dir unless given), its scheduler running.
fn start_in(
    state: tempfile::TempDir,
    executor: FakeExecutor,
    tune: impl FnOnce(&mut Config),
) -> Harness {
    let mut config = Config {
        state_dir: state.path().to_path_buf(),
        max_concurrent_jobs: 1,
        ..Config::default()
    };
    tune(&mut config);
    config.validate().unwrap();
    let (key, _) = Signer::open(&state.path().join("keys")).unwrap();
    let db = Database::open(state.path(), Creation::Allowed).unwrap();
    let cas = ContentStore::open(state.path().join("cas")).unwrap();
    let images = Images::open(state.path()).unwrap();
    let locks = tempfile::tempdir().unwrap();
    let id_ranges = IdRanges::lease(
        locks.path(),
        config.uid_base,
        config.id_range,
        config.max_concurrent_jobs,
    )
    .unwrap();
    let executor = Arc::new(executor);
    let runner = Runner::new(
        config,
        db,
        cas,
        images,
        key,
        Isolation {
            executor: executor.clone(),
            id_ranges,
        },
        Arc::new(crate::engine::bus::Bus::default()),
    )
    .unwrap();
    tokio::spawn(runner.clone().schedule());
    Harness {
        runner,
        executor,
        state,
        _locks: locks,
    }
}

fn start(executor: FakeExecutor) -> Harness {
    start_in(tempfile::tempdir().unwrap(), executor, |_| {})
}

/// Each step's script by its first argument.
fn by_argv(scripts: Vec<(&'static str, Script)>) -> FakeExecutor {
    FakeExecutor::new(move |spec| {
        let name = spec.argv.first().map(String::as_str).unwrap_or_default();
        Ok(scripts
            .iter()
            .find(|(argv0, _)| *argv0 == name)
            .map(|(_, script)| script.clone())
            .unwrap_or_else(|| Script::exits(0)))
    })
}

fn job(steps: &[&str], outputs: &[&str]) -> JobSpec {
    JobSpec {
        name: "t".into(),
        image: "host".into(),
        steps: steps
            .iter()
            .map(|argv0| Step {
                name: format!("step-{argv0}"),
                argv: vec![argv0.to_string()],
                ..Default::default()
            })
            .collect(),
        outputs: outputs.iter().map(|o| o.to_string()).collect(),
        ..Default::default()
    }
}

impl Harness {
    fn submit(&self, spec: JobSpec) -> String {
        self.runner
            .submit(self.plan(spec), None, &client())
            .unwrap()
    }

    fn plan(&self, spec: JobSpec) -> ValidatedJob {
        ValidatedJob::from_record(spec, &self.runner.config).unwrap()
    }

    /// The record, as an operator sees it.
    fn get(&self, id: &str) -> Job {
        self.runner.get(id, &Principal::unix(0, &[])).unwrap()
    }

    /// The job's record once it is terminal. The deadline only keeps a hang from
    /// blocking the suite; no test asserts on time.
    async fn finished(&self, id: &str) -> Job {
        for _ in 0..3000 {
            let job = self.get(id);
            let state = JobState::try_from(job.state).unwrap();
            if !matches!(state, JobState::Queued | JobState::Running) {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("job {id} did not end");
    }
}

fn state_of(job: &Job) -> JobState {
    JobState::try_from(job.state).unwrap()
}

fn step_state(job: &Job, i: usize) -> StepState {
    StepState::try_from(job.steps[i].state).unwrap()
}

#[tokio::test]
async fn a_job_runs_its_steps_in_order_and_signs_what_it_made() {
    let h = start(by_argv(vec![
        ("make", Script::exits(0).writing("out/a.txt", b"made")),
        ("check", Script::exits(0).printing(b"ok\n")),
    ]));
    let id = h.submit(job(&["make", "check"], &["out/a.txt"]));
    let done = h.finished(&id).await;
    assert_eq!(state_of(&done), JobState::Succeeded, "{}", done.message);
    let started = h.executor.started.lock().unwrap();
    let argv: Vec<&str> = started.iter().map(|s| s.argv[0].as_str()).collect();
    assert_eq!(argv, ["make", "check"]);
    assert!(done
        .steps
        .iter()
        .all(|s| s.state == StepState::Succeeded as i32 && !s.link_digest.is_empty()));
    assert_eq!(done.outputs.len(), 1);
    assert_eq!(done.outputs[0].path, "out/a.txt");
    assert_eq!(done.outputs[0].digest, hex::encode(Sha256::digest(b"made")));
    assert!(h.runner.cas.contains(&done.outputs[0].digest).unwrap());
    assert_eq!(
        done.steps[1].stdout_digest,
        hex::encode(Sha256::digest(b"ok\n"))
    );
    assert!(!done.provenance_digest.is_empty(), "no provenance");
    let envelope = h.runner.cas.read_all(&done.provenance_digest).unwrap();
    assert!(String::from_utf8_lossy(&envelope).contains("payloadType"));
    // The second step's materials are what the first one left.
    let link = h.runner.cas.read_all(&done.steps[1].link_digest).unwrap();
    assert!(String::from_utf8_lossy(&link).contains("out/a.txt"));
}

#[tokio::test]
async fn a_failing_step_fails_the_job_and_no_later_step_runs() {
    let h = start(by_argv(vec![("bad", Script::exits(3))]));
    let id = h.submit(job(&["bad", "never"], &[]));
    let done = h.finished(&id).await;
    assert_eq!(state_of(&done), JobState::Failed);
    assert!(done.message.contains("step-bad"), "{}", done.message);
    assert_eq!(done.steps[0].exit_code, 3);
    assert_eq!(step_state(&done, 0), StepState::Failed);
    assert_eq!(step_state(&done, 1), StepState::Pending);
    assert_eq!(h.executor.started.lock().unwrap().len(), 1);
    assert!(done.provenance_digest.is_empty());
    assert!(
        !done.steps[0].link_digest.is_empty(),
        "a failed step is attested"
    );
}

#[tokio::test]
async fn a_step_that_times_out_is_killed_and_fails_the_job() {
    let h = start(by_argv(vec![("slow", Script::holds())]));
    let mut spec = job(&["slow"], &[]);
    spec.steps[0].timeout_seconds = 1;
    let id = h.submit(spec);
    let done = h.finished(&id).await;
    assert_eq!(state_of(&done), JobState::Failed);
    assert_eq!(step_state(&done, 0), StepState::TimedOut);
    assert_eq!(done.steps[0].limit_reason, "timeout");
    assert_eq!(done.steps[0].exit_code, 137);
    assert_eq!(h.executor.started.lock().unwrap()[0].timeout_ms, 1000);
}

#[tokio::test]
async fn cancelling_a_running_job_kills_its_step() {
    let h = start(by_argv(vec![("slow", Script::holds())]));
    let id = h.submit(job(&["slow", "after"], &[]));
    let executor = h.executor.clone();
    tokio::task::spawn_blocking(move || executor.wait_running(1))
        .await
        .unwrap();
    assert_eq!(state_of(&h.get(&id)), JobState::Running);
    assert_eq!(
        h.runner.cancel(&id, &client()).unwrap(),
        JobState::Running,
        "a running job is cancelled asynchronously"
    );
    let done = h.finished(&id).await;
    assert_eq!(state_of(&done), JobState::Cancelled);
    assert_eq!(step_state(&done, 0), StepState::Cancelled);
    assert_eq!(step_state(&done, 1), StepState::Pending);
    assert_eq!(h.executor.started.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_job_cancelled_while_queued_never_starts() {
    let h = start(by_argv(vec![("slow", Script::holds())]));
    let first = h.submit(job(&["slow"], &[]));
    let executor = h.executor.clone();
    tokio::task::spawn_blocking(move || executor.wait_running(1))
        .await
        .unwrap();
    let queued = h.submit(job(&["quick"], &[]));
    assert_eq!(state_of(&h.get(&queued)), JobState::Queued);
    assert_eq!(
        h.runner.cancel(&queued, &client()).unwrap(),
        JobState::Cancelled
    );
    let done = h.finished(&queued).await;
    assert_eq!(done.message, "cancelled before it started");
    h.runner.cancel(&first, &client()).unwrap();
    assert_eq!(state_of(&h.finished(&first).await), JobState::Cancelled);
    // The freed slot does not run the cancelled job.
    let later = h.submit(job(&["quick"], &[]));
    assert_eq!(state_of(&h.finished(&later).await), JobState::Succeeded);
    let started = h.executor.started.lock().unwrap();
    let argv: Vec<&str> = started.iter().map(|s| s.argv[0].as_str()).collect();
    assert_eq!(argv, ["slow", "quick"]);
}

#[tokio::test]
async fn a_cancel_racing_the_start_always_ends_the_job_cancelled() {
    let h = start(by_argv(vec![("slow", Script::holds())]));
    for _ in 0..20 {
        let id = h.submit(job(&["slow"], &[]));
        // At any point: before the scheduler claims it, as it starts, or while it runs.
        tokio::task::yield_now().await;
        h.runner.cancel(&id, &client()).unwrap();
        let done = h.finished(&id).await;
        assert_eq!(state_of(&done), JobState::Cancelled, "{}", done.message);
        assert!(done
            .steps
            .iter()
            .all(|s| s.state != StepState::Running as i32));
    }
}

#[tokio::test]
async fn a_missing_or_unsafe_output_fails_the_job_naming_it() {
    let h = start(by_argv(vec![(
        "make",
        Script::exits(0).writing("real.txt", b"x"),
    )]));
    let missing = h.submit(job(&["make"], &["absent.txt"]));
    let done = h.finished(&missing).await;
    assert_eq!(state_of(&done), JobState::Failed);
    assert!(done.message.contains("absent.txt"), "{}", done.message);
    assert!(done.provenance_digest.is_empty());
    assert!(done.outputs.is_empty());

    let dir = h.submit(job(&["make"], &["."]));
    let done = h.finished(&dir).await;
    assert_ne!(state_of(&done), JobState::Succeeded);
}

#[tokio::test]
async fn a_layer_that_cannot_be_set_up_is_an_error_naming_it() {
    let h = start(FakeExecutor::new(|_| {
        Ok(Script {
            status: StepStatus::SetupFailed {
                layer: "landlock".into(),
                message: "not supported".into(),
            },
            ..Script::exits(0)
        })
    }));
    let id = h.submit(job(&["x"], &[]));
    let done = h.finished(&id).await;
    assert_eq!(state_of(&done), JobState::Failed);
    assert_eq!(step_state(&done, 0), StepState::Error);
    assert_eq!(done.steps[0].exit_code, 125);
    assert!(
        done.steps[0].message.contains("landlock"),
        "{}",
        done.steps[0].message
    );
    assert!(
        done.steps[0].link_digest.is_empty(),
        "a step that never ran is not attested"
    );
}

#[tokio::test]
async fn an_executor_that_cannot_start_the_step_ends_the_job_in_error() {
    let h = start(FakeExecutor::new(|_| {
        Err(crate::error::RunnerError::Internal("no supervisor".into()))
    }));
    let id = h.submit(job(&["x"], &[]));
    let done = h.finished(&id).await;
    assert_eq!(state_of(&done), JobState::Error);
    assert_eq!(step_state(&done, 0), StepState::Error);
    // The client sees a reference to the daemon's log, not the internal text.
    assert!(!done.message.contains("no supervisor"), "{}", done.message);
    // The slot is free again.
    let h2 = h.submit(job(&["y"], &[]));
    assert_eq!(state_of(&h.finished(&h2).await), JobState::Error);
}

#[tokio::test]
async fn a_restart_ends_running_jobs_as_interrupted_and_runs_queued_ones() {
    let state = tempfile::tempdir().unwrap();
    let (running, queued) = {
        let db = Database::open(state.path(), Creation::Allowed).unwrap();
        let record = |id: &str, state: JobState| Job {
            job_id: id.into(),
            spec: Some(job(&["again"], &[])),
            state: state as i32,
            steps: vec![Default::default()],
            ..Default::default()
        };
        let owner = client().owner;
        for (id, state) in [("run-1", JobState::Queued), ("queue-1", JobState::Queued)] {
            db.insert_job(&record(id, state), &owner, None, Some(1000))
                .unwrap();
        }
        // A job the daemon was running when it died.
        db.update_job(&record("run-1", JobState::Running)).unwrap();
        ("run-1", "queue-1")
    };
    let h = start_in(state, by_argv(vec![]), |_| {});
    let interrupted = h.finished(running).await;
    assert_eq!(state_of(&interrupted), JobState::Error);
    assert!(interrupted.message.contains("interrupted"));
    let requeued = h.finished(queued).await;
    assert_eq!(
        state_of(&requeued),
        JobState::Succeeded,
        "{}",
        requeued.message
    );
    assert_eq!(h.executor.started.lock().unwrap().len(), 1);
    assert!(h.state.path().join("kiln.db").exists());
}

#[tokio::test]
async fn after_stop_starting_a_queued_job_stays_queued() {
    let h = start(by_argv(vec![("slow", Script::holds())]));
    let first = h.submit(job(&["slow"], &[]));
    let executor = h.executor.clone();
    tokio::task::spawn_blocking(move || executor.wait_running(1))
        .await
        .unwrap();
    let waiting = h.submit(job(&["quick"], &[]));
    h.runner.stop_starting();
    h.runner.cancel_all_running("the daemon is stopping");
    let done = h.finished(&first).await;
    assert_eq!(state_of(&done), JobState::Cancelled);
    assert_eq!(done.message, "the daemon is stopping");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(state_of(&h.get(&waiting)), JobState::Queued);
    assert!(h
        .runner
        .submit(h.plan(job(&["quick"], &[])), None, &client())
        .is_err());
}

#[tokio::test]
async fn another_client_sees_no_job_of_this_one() {
    let h = start(by_argv(vec![]));
    let id = h.submit(job(&["x"], &[]));
    h.finished(&id).await;
    let other = Principal::unix(1001, &[]);
    assert!(matches!(
        h.runner.get(&id, &other),
        Err(crate::error::RunnerError::NotFound(_))
    ));
    assert!(h.runner.cancel(&id, &other).is_err());
    assert!(h.runner.get(&id, &Principal::unix(0, &[])).is_ok());
}

#[tokio::test]
async fn each_step_runs_with_its_own_plan() {
    let h = start(by_argv(vec![]));
    let mut spec = job(&["fetch", "build"], &[]);
    spec.steps[0].allow_net = vec!["example.org:443".into()];
    spec.steps[0].limits = Some(agent_proto::v1::ResourceLimits {
        pids: 77,
        ..Default::default()
    });
    let id = h.submit(spec);
    assert_eq!(state_of(&h.finished(&id).await), JobState::Succeeded);
    let started = h.executor.started.lock().unwrap();
    assert_eq!(started[0].egress_proxy_port, Some(3128));
    assert_eq!(started[0].tcp_connect_ports, [3128]);
    assert!(started[0].env.iter().any(|(k, _)| k == "HTTPS_PROXY"));
    assert_eq!(started[0].limits.pids, 77);
    assert_eq!(started[1].egress_proxy_port, None);
    assert!(started[1].tcp_connect_ports.is_empty());
    assert_eq!(started[1].limits.pids, h.runner.config.default_pids);
}

#[tokio::test]
async fn one_clients_flood_delays_anothers_job_by_at_most_one_slot_turnover() {
    let h = start(by_argv(vec![("slow", Script::holds())]));
    let (flooder, other) = (Principal::unix(2001, &[]), Principal::unix(2002, &[]));
    let blocker = h
        .runner
        .submit(h.plan(job(&["slow"], &[])), None, &flooder)
        .unwrap();
    let executor = h.executor.clone();
    tokio::task::spawn_blocking(move || executor.wait_running(1))
        .await
        .unwrap();
    for _ in 0..30 {
        h.runner
            .submit(h.plan(job(&["quick"], &[])), None, &flooder)
            .unwrap();
    }
    let single = h
        .runner
        .submit(h.plan(job(&["single"], &[])), None, &other)
        .unwrap();
    h.runner.cancel(&blocker, &flooder).unwrap();
    let single_done = h.finished(&single).await;
    let started = h.executor.started.lock().unwrap().clone();
    let argv: Vec<&str> = started.iter().map(|s| s.argv[0].as_str()).collect();
    // One slot: after the flooder's running job, the other client's job is next.
    assert_eq!(argv[..2], ["slow", "single"], "{argv:?}");
    assert_eq!(state_of(&single_done), JobState::Succeeded);
}

#[tokio::test]
async fn a_queued_job_is_held_to_a_ceiling_lowered_across_a_restart() {
    let state = tempfile::tempdir().unwrap();
    {
        let db = Database::open(state.path(), Creation::Allowed).unwrap();
        let mut spec = job(&["fetch"], &[]);
        spec.steps[0].allow_net = vec!["example.org:443".into()];
        let record = Job {
            job_id: "wide".into(),
            spec: Some(spec),
            state: JobState::Queued as i32,
            steps: vec![Default::default()],
            ..Default::default()
        };
        db.insert_job(&record, &client().owner, None, Some(1000))
            .unwrap();
    }
    // Accepted under a ceiling that allowed it; the runner now allows only its mirror.
    let h = start_in(state, by_argv(vec![]), |config| {
        config.network_ceiling = vec!["mirror.internal:443".into()];
    });
    let done = h.finished("wide").await;
    assert_eq!(state_of(&done), JobState::Error);
    assert!(
        done.message.contains("could not be queued again") && done.message.contains("allow_net"),
        "{}",
        done.message
    );
    assert!(h.executor.started.lock().unwrap().is_empty());
}

#[tokio::test]
async fn jobs_cancelled_while_queued_leave_the_queue() {
    let h = start(by_argv(vec![("slow", Script::holds())]));
    let first = h.submit(job(&["slow"], &[]));
    let executor = h.executor.clone();
    tokio::task::spawn_blocking(move || executor.wait_running(1))
        .await
        .unwrap();
    // Submitted and cancelled while every slot is busy: nothing of them may stay in
    // memory, or a client doing this in a loop grows the daemon without bound (its
    // queue cap counts only jobs still queued).
    for _ in 0..50 {
        let id = h.submit(job(&["quick"], &[]));
        h.runner.cancel(&id, &client()).unwrap();
    }
    assert_eq!(h.runner.queue.lock().unwrap().len(), 0);
    h.runner.cancel(&first, &client()).unwrap();
    assert_eq!(state_of(&h.finished(&first).await), JobState::Cancelled);
}

#[tokio::test]
async fn a_uids_jobs_requeued_into_its_tenant_are_held_to_its_running_cap() {
    let state = tempfile::tempdir().unwrap();
    {
        // Queued by uid 1000 before it joined tenant t.
        let db = Database::open(state.path(), Creation::Allowed).unwrap();
        for id in ["a", "b"] {
            let record = Job {
                job_id: id.into(),
                spec: Some(job(&["slow"], &[])),
                state: JobState::Queued as i32,
                steps: vec![Default::default()],
                ..Default::default()
            };
            db.insert_job(&record, &client().owner, None, Some(1000))
                .unwrap();
        }
    }
    let h = start_in(state, by_argv(vec![("slow", Script::holds())]), |config| {
        config.max_concurrent_jobs = 2;
        config.tenants = toml::from_str("[t]\nuids = [1000]\nmax_running_jobs = 1\n").unwrap();
    });
    let executor = h.executor.clone();
    tokio::task::spawn_blocking(move || executor.wait_running(1))
        .await
        .unwrap();
    // Two slots, but the tenant runs one job at a time: the other waits, as its own.
    let depths = h.runner.queue.lock().unwrap().depths();
    let operator = Principal::unix(0, &[]);
    for id in ["a", "b"] {
        h.runner.cancel(id, &operator).unwrap();
        h.finished(id).await;
    }
    assert_eq!(depths, [("tenant:t".to_string(), 1)]);
}
