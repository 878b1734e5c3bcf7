//! The bot side of the Remote Workers API (`google.devtools.remoteworkers.v1test2`): one
//! bot session per slot of the worker. Each bot creates its session, then heartbeats with
//! UpdateBotSession (about every second, and at once when an action ends); each new lease
//! (BuildGrid hands them out ACTIVE, the API PENDING: both are new) runs once (once more
//! only if the engine dropped it, which stopped it, and then offers it anew), and is
//! reported ACTIVE while it runs, then COMPLETED with its ActionResult and status. A
//! lease the engine cancels has its action stopped. An action that cannot run reports its
//! error status; the bot carries on. One still running when the worker's shutdown grace
//! ends is stopped and reported UNAVAILABLE, which the engine retries on another bot.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use agent_proto::remoteworkers::v1test2::{
    bots_client::BotsClient, device, worker, BotSession, BotStatus, CreateBotSessionRequest,
    Device, Lease, LeaseState, UpdateBotSessionRequest, Worker,
};
use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::protobuf::Any;
use bazel_remote_apis::google::rpc;
use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::Channel;

use super::cas::{CasClient, Digest};
use super::inputs::fetch_action;
use super::run::{cancelled, ActionRunner};
use crate::error::{Result, RunnerError};

const ACTION_TYPE_URL: &str = "type.googleapis.com/build.bazel.remote.execution.v2.Action";
const DIGEST_TYPE_URL: &str = "type.googleapis.com/build.bazel.remote.execution.v2.Digest";
const ACTION_RESULT_TYPE_URL: &str =
    "type.googleapis.com/build.bazel.remote.execution.v2.ActionResult";

/// How often a bot reports to the engine when nothing happens.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// The longest a session call may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// One bot: its id (unique per worker and slot), what it offers the engine, and where.
pub struct Bot {
    pub bot_id: String,
    pub instance: String,
    /// Worker properties the engine matches actions against (OSFamily, ISA, ...).
    pub properties: Vec<(String, String)>,
    pub runner: Arc<ActionRunner>,
    pub cas: CasClient,
    pub channel: Channel,
}

/// What a running lease's task answers.
struct Finished {
    lease_id: String,
    result: Option<reapi::ActionResult>,
    status: rpc::Status,
}

struct Running {
    cancel: Option<oneshot::Sender<()>>,
    lease: Lease,
    /// The engine dropped the lease (its way of cancelling, or it gave the lease to
    /// another bot): the action is stopped and its end not reported.
    abandoned: bool,
    /// The worker stopped the action (its shutdown grace ran out): reported UNAVAILABLE,
    /// which the engine retries on another bot.
    handed_back: bool,
}

fn unavailable(what: &str, status: tonic::Status) -> RunnerError {
    RunnerError::Unavailable(format!(
        "{what}: {} ({:?})",
        status.message(),
        status.code()
    ))
}

/// The google.rpc.Status a failed action reports.
fn error_status(err: RunnerError) -> rpc::Status {
    let status = tonic::Status::from(err);
    rpc::Status {
        code: status.code() as i32,
        message: status.message().to_string(),
        details: Vec::new(),
    }
}

/// What a lease the worker gives back reports: UNAVAILABLE, which BuildGrid retries on
/// another bot (up to its attempt limit).
fn handed_back_status() -> rpc::Status {
    rpc::Status {
        code: tonic::Code::Unavailable as i32,
        message: "the worker stopped before running the action to its end; the engine may run it on another worker".into(),
        details: Vec::new(),
    }
}

/// The action a lease names: its payload is the Action itself (BuildGrid) or its Digest.
/// An Action payload is hashed as sent: the engine forwards the bytes it stored.
fn action_digest_of(lease: &Lease) -> Result<Digest> {
    let payload = lease
        .payload
        .as_ref()
        .ok_or_else(|| RunnerError::invalid("lease", "no payload"))?;
    match payload.type_url.as_str() {
        ACTION_TYPE_URL => Ok(Digest::of(&payload.value)),
        DIGEST_TYPE_URL => {
            let digest = reapi::Digest::decode(payload.value.as_slice())
                .map_err(|e| RunnerError::invalid("lease payload", e.to_string()))?;
            Digest::from_proto(&digest)
        }
        other => Err(RunnerError::invalid(
            "lease payload",
            format!("unexpected type {:?}", crate::cli::printable(other)),
        )),
    }
}

impl Bot {
    /// What the bot offers, on the worker and on its primary device (the one running
    /// the bot): BuildGrid matches actions against the primary device's properties only.
    fn worker(&self) -> Worker {
        Worker {
            devices: vec![Device {
                handle: self.bot_id.clone(),
                properties: self
                    .properties
                    .iter()
                    .map(|(key, value)| device::Property {
                        key: key.clone(),
                        value: value.clone(),
                    })
                    .collect(),
            }],
            properties: self
                .properties
                .iter()
                .map(|(key, value)| worker::Property {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
            configs: Vec::new(),
        }
    }

    /// Runs the bot until `stop` turns true: then no new lease starts, running actions
    /// finish (or are cancelled when `cancel_running` turns true) and are reported, and
    /// the session is closed (BOT_TERMINATING).
    pub async fn run(
        self,
        mut stop: watch::Receiver<bool>,
        mut cancel_running: watch::Receiver<bool>,
    ) -> Result<()> {
        let mut bots = BotsClient::new(self.channel.clone());
        let mut session = self.create_session(&mut bots).await?;
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Finished>();
        let mut running: BTreeMap<String, Running> = BTreeMap::new();
        // Completed leases not yet acknowledged (the engine still lists them).
        let mut completed: BTreeMap<String, Lease> = BTreeMap::new();
        // Every lease this bot took and did not give up: none runs twice (an engine lists
        // a lease again while it runs and until its completion is acknowledged).
        let mut taken: HashSet<String> = HashSet::new();
        let mut stopping = false;
        let mut cancelling = false;
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // CreateBotSession may answer with leases already (BuildGrid assigns while it
        // holds the call): they are taken like an update's, or the engine, which bumped
        // the session's version with them, would never list them again.
        let mut fresh: Option<BotSession> = Some(session.clone());
        loop {
            let answer = if let Some(created) = fresh.take() {
                created
            } else {
                // Wait for the next beat, an action's end or the stop.
                tokio::select! {
                    _ = heartbeat.tick() => {}
                    Some(finished) = done_rx.recv() => self.finish(finished, &mut running, &mut completed, &mut taken),
                    changed = stop.changed(), if !stopping => {
                        stopping = changed.is_err() || *stop.borrow();
                    }
                    changed = cancel_running.changed(), if !cancelling => {
                        cancelling = changed.is_err() || *cancel_running.borrow();
                        if cancelling {
                            for run in running.values_mut() {
                                if let Some(cancel) = run.cancel.take() {
                                    tracing::info!(bot = %self.bot_id, lease = %run.lease.id, "the shutdown grace ran out; stopping the action and handing it back");
                                    run.handed_back = true;
                                    let _ = cancel.send(());
                                }
                            }
                        }
                    }
                }
                while let Ok(finished) = done_rx.try_recv() {
                    self.finish(finished, &mut running, &mut completed, &mut taken);
                }
                let closing = stopping && running.is_empty();
                let mut leases: Vec<Lease> = completed.values().cloned().collect();
                leases.extend(running.values().filter(|run| !run.abandoned).map(|run| {
                    let mut lease = run.lease.clone();
                    // Never PENDING back: BuildGrid closes a session that reports one.
                    lease.state = LeaseState::Active as i32;
                    lease
                }));
                session.leases = leases;
                session.status = if closing {
                    BotStatus::BotTerminating
                } else {
                    BotStatus::Ok
                } as i32;
                let reported: Vec<String> = completed.keys().cloned().collect();
                let mut request = tonic::Request::new(UpdateBotSessionRequest {
                    name: session.name.clone(),
                    bot_session: Some(session.clone()),
                    update_mask: None,
                });
                // The engine may hold an idle bot's call (a long poll); one that never
                // answers must not stall the bot's heartbeats or its stop.
                request.set_timeout(RPC_TIMEOUT);
                let answer = bots.update_bot_session(request).await;
                let answer = match answer {
                    Ok(answer) => answer.into_inner(),
                    Err(status) => {
                        tracing::warn!(bot = %self.bot_id, error = %status.message(), code = ?status.code(), "UpdateBotSession failed");
                        if closing {
                            return Err(unavailable("UpdateBotSession", status));
                        }
                        // BuildGrid answers DATA_LOSS for a session it closed (the bot was
                        // silent too long) and INVALID_ARGUMENT for one it does not know: its
                        // leases went back to the queue, so their actions stop, unreported,
                        // and the bot starts over with a new session.
                        if matches!(
                            status.code(),
                            tonic::Code::DataLoss
                                | tonic::Code::InvalidArgument
                                | tonic::Code::NotFound
                        ) {
                            for run in running.values_mut() {
                                run.abandoned = true;
                                if let Some(cancel) = run.cancel.take() {
                                    let _ = cancel.send(());
                                }
                            }
                            completed.clear();
                            match self.create_session(&mut bots).await {
                                Ok(new) => {
                                    fresh = Some(new.clone());
                                    session = new;
                                }
                                Err(err) => {
                                    tracing::warn!(bot = %self.bot_id, error = %err, "could not create a new bot session; retrying")
                                }
                            }
                        }
                        continue;
                    }
                };
                // Reported complete: the engine has them.
                // An idle bot that just reported asks for work at once (BuildGrid holds
                // that call until it has some), not a heartbeat later.
                if !reported.is_empty() && running.is_empty() {
                    heartbeat.reset_immediately();
                }
                for id in reported {
                    completed.remove(&id);
                }
                if closing {
                    tracing::info!(bot = %self.bot_id, "bot session closed");
                    return Ok(());
                }
                answer
            };
            // BuildGrid cancels a lease by leaving it out of the session.
            for (id, run) in running.iter_mut() {
                if !run.abandoned && !answer.leases.iter().any(|l| &l.id == id) {
                    tracing::info!(bot = %self.bot_id, lease = %id, "the engine dropped a running lease; stopping its action");
                    run.abandoned = true;
                    if let Some(cancel) = run.cancel.take() {
                        let _ = cancel.send(());
                    }
                }
            }
            for lease in &answer.leases {
                let state = LeaseState::try_from(lease.state).unwrap_or(LeaseState::Unspecified);
                match state {
                    LeaseState::Cancelled => {
                        if let Some(run) = running.get_mut(&lease.id) {
                            tracing::info!(bot = %self.bot_id, lease = %lease.id, "lease cancelled by the engine");
                            if let Some(cancel) = run.cancel.take() {
                                let _ = cancel.send(());
                            }
                        }
                    }
                    // One action per bot: a lease given to a busy bot waits (the engine
                    // lists it again) until the bot is free.
                    LeaseState::Pending | LeaseState::Active
                        if !stopping && !taken.contains(&lease.id) && running.is_empty() =>
                    {
                        taken.insert(lease.id.clone());
                        let (cancel_tx, cancel_rx) = oneshot::channel();
                        running.insert(
                            lease.id.clone(),
                            Running {
                                cancel: Some(cancel_tx),
                                lease: lease.clone(),
                                abandoned: false,
                                handed_back: false,
                            },
                        );
                        self.start(lease, cancel_rx, done_tx.clone());
                    }
                    // Offered while stopping: handed back at once (UNAVAILABLE, which the
                    // engine retries elsewhere), not left assigned to a closing session.
                    LeaseState::Pending | LeaseState::Active
                        if stopping
                            && !taken.contains(&lease.id)
                            && !running.contains_key(&lease.id) =>
                    {
                        taken.insert(lease.id.clone());
                        tracing::info!(bot = %self.bot_id, lease = %lease.id, "offered a lease while stopping; handing it back");
                        let mut lease = lease.clone();
                        lease.state = LeaseState::Completed as i32;
                        lease.status = Some(handed_back_status());
                        lease.result = None;
                        completed.insert(lease.id.clone(), lease);
                    }
                    _ => {}
                }
            }
            let session_leases = answer.leases;
            session = BotSession {
                leases: session_leases,
                ..answer
            };
        }
    }

    async fn create_session(&self, bots: &mut BotsClient<Channel>) -> Result<BotSession> {
        let mut request = tonic::Request::new(CreateBotSessionRequest {
            parent: self.instance.clone(),
            bot_session: Some(BotSession {
                bot_id: self.bot_id.clone(),
                status: BotStatus::Ok as i32,
                worker: Some(self.worker()),
                ..Default::default()
            }),
        });
        request.set_timeout(RPC_TIMEOUT);
        let session = bots
            .create_bot_session(request)
            .await
            .map_err(|s| unavailable("CreateBotSession", s))?
            .into_inner();
        tracing::info!(bot = %self.bot_id, session = %session.name, "bot session created");
        Ok(session)
    }

    fn finish(
        &self,
        finished: Finished,
        running: &mut BTreeMap<String, Running>,
        completed: &mut BTreeMap<String, Lease>,
        taken: &mut HashSet<String>,
    ) {
        let Some(run) = running.remove(&finished.lease_id) else {
            return;
        };
        if run.abandoned {
            // Stopped and never reported: BuildGrid retries a job under the same lease id,
            // and may offer it to this bot again, which must then run it (else the job
            // sits assigned to an idle bot for good).
            taken.remove(&finished.lease_id);
            return;
        }
        let mut lease = run.lease;
        lease.state = LeaseState::Completed as i32;
        // An action stopped for the shutdown is not the action's failure: UNAVAILABLE,
        // which the engine retries elsewhere. One that finished first keeps its result.
        let (status, result) = if run.handed_back && finished.result.is_none() {
            (handed_back_status(), None)
        } else {
            (finished.status, finished.result)
        };
        lease.status = Some(status);
        lease.result = result.map(|result| Any {
            type_url: ACTION_RESULT_TYPE_URL.into(),
            value: result.encode_to_vec(),
        });
        completed.insert(finished.lease_id, lease);
    }

    /// Runs one lease's action on a task of its own.
    fn start(
        &self,
        lease: &Lease,
        cancel: oneshot::Receiver<()>,
        done: mpsc::UnboundedSender<Finished>,
    ) {
        let (runner, cas, bot, lease) = (
            self.runner.clone(),
            self.cas.clone(),
            self.bot_id.clone(),
            lease.clone(),
        );
        tokio::spawn(async move {
            let began = std::time::Instant::now();
            let outcome = async {
                let digest = action_digest_of(&lease)?;
                tracing::info!(%bot, lease = %lease.id, action = %digest, "running an action");
                let mut cancel = cancel;
                // The engine's CAS may hold a read forever: a cancel ends the fetch (it has
                // nothing to undo), or the bot's slot and the worker's shutdown wait on it.
                let fetched = tokio::select! {
                    fetched = fetch_action(&cas, &digest, runner.limits()) => fetched?,
                    _ = &mut cancel => return Err(cancelled()),
                };
                let cancelled = async {
                    // A dropped sender (the bot gone) stops the action too.
                    let _ = cancel.await;
                };
                runner.run(&fetched, &cas, cancelled).await
            }
            .await;
            let finished = match outcome {
                Ok(executed) => {
                    tracing::info!(%bot, lease = %lease.id, exit_code = executed.result.exit_code, seconds = began.elapsed().as_secs_f64(), "action done");
                    Finished {
                        lease_id: lease.id.clone(),
                        result: Some(executed.result),
                        status: executed.status,
                    }
                }
                Err(err) => {
                    tracing::warn!(%bot, lease = %lease.id, error = %err, "action failed");
                    Finished {
                        lease_id: lease.id.clone(),
                        result: None,
                        status: error_status(err),
                    }
                }
            };
            let _ = done.send(finished);
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use crate::config::Config;
    use crate::engine::executor::fake::{FakeExecutor, Script};
    use crate::engine::idranges::IdRanges;
    use crate::engine::signer::Signer;
    use crate::images::ResolvedImage;
    use crate::worker::fake_cas::{stall_on, Fake};
    use crate::worker::run::ActionIsolation;

    /// A bot whose actions run by `executor`, its CAS the fake's; no engine behind it
    /// (these tests hand the bot its leases themselves).
    fn bot(state: &std::path::Path, fake: &Fake, executor: FakeExecutor) -> Bot {
        let config = Config {
            state_dir: state.to_path_buf(),
            max_concurrent_jobs: 1,
            ..Config::default()
        };
        let id_ranges =
            IdRanges::lease(&state.join("locks"), config.uid_base, config.id_range, 1).unwrap();
        let (key, _) = Signer::open(&state.join("keys")).unwrap();
        let image = ResolvedImage {
            name: "host".into(),
            named: true,
            digest: None,
            tree_digest: None,
            imported: None,
            env: Vec::new(),
            root: Vec::new(),
            ca_certificates: None,
        };
        let runner = ActionRunner::new(
            config,
            ActionIsolation {
                executor: Arc::new(executor),
                id_ranges,
            },
            key,
            image,
            state.join("actions"),
            "test-worker".into(),
        )
        .unwrap();
        Bot {
            bot_id: "test-worker/bot-0".into(),
            instance: "main".into(),
            properties: Vec::new(),
            runner: Arc::new(runner),
            cas: fake.client.clone(),
            channel: tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy(),
        }
    }

    /// A lease for an action whose command writes `out`.
    fn lease(fake: &Fake) -> Lease {
        let command = reapi::Command {
            arguments: vec!["/bin/true".into()],
            output_paths: vec!["out".into()],
            ..Default::default()
        };
        let action = reapi::Action {
            command_digest: Some(fake.put_message(&command).to_proto()),
            input_root_digest: Some(fake.put_message(&reapi::Directory::default()).to_proto()),
            ..Default::default()
        };
        let digest = fake.put_message(&action);
        Lease {
            id: "lease-1".into(),
            payload: Some(Any {
                type_url: DIGEST_TYPE_URL.into(),
                value: digest.to_proto().encode_to_vec(),
            }),
            state: LeaseState::Active as i32,
            ..Default::default()
        }
    }

    /// What the lease's task reports once cancelled. The bound only turns a task that
    /// never ends (the bot's slot held for good, the worker's shutdown hung) into a
    /// failure instead of a hung test.
    async fn finished_after_cancel(
        bot: &Bot,
        fake: &Fake,
        lease: &Lease,
        cancel_when_stalled: bool,
    ) -> Finished {
        let (cancel_tx, cancel_rx) = oneshot::channel();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        bot.start(lease, cancel_rx, done_tx);
        if cancel_when_stalled {
            fake.stalled().await;
        }
        cancel_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(120), done_rx.recv())
            .await
            .expect("a cancelled lease's action never ended")
            .unwrap()
    }

    #[tokio::test]
    async fn a_lease_cancelled_while_its_inputs_never_arrive_ends() {
        let state = tempfile::tempdir().unwrap();
        let fake = Fake::start(1 << 20).await;
        let lease = lease(&fake);
        let bot = bot(
            state.path(),
            &fake,
            FakeExecutor::new(|_| Ok(Script::exits(0))),
        );
        // The engine's CAS holds the fetch of the Action: the engine then drops the
        // lease (or the shutdown grace ends).
        fake.stall();
        let finished = finished_after_cancel(&bot, &fake, &lease, true).await;
        assert_eq!(finished.lease_id, "lease-1");
        assert_eq!(finished.status.code, tonic::Code::Unavailable as i32);
        assert!(finished.result.is_none());
    }

    #[tokio::test]
    async fn a_lease_cancelled_while_its_outputs_never_upload_ends() {
        let state = tempfile::tempdir().unwrap();
        let fake = Fake::start(1 << 20).await;
        let lease = lease(&fake);
        // The CAS stops answering once the action runs: its outputs' upload holds.
        let switch = fake.stall_switch();
        let bot = bot(
            state.path(),
            &fake,
            FakeExecutor::new(move |_| {
                stall_on(&switch);
                Ok(Script::exits(0).writing("out", b"output"))
            }),
        );
        let finished = finished_after_cancel(&bot, &fake, &lease, true).await;
        assert_eq!(finished.status.code, tonic::Code::Unavailable as i32);
        assert!(finished.result.is_none());
    }

    /// An engine that hands out `lease` while `offering` is on, and tells the test every
    /// lease a bot reports.
    #[derive(Clone)]
    struct Engine {
        lease: Lease,
        offering: Arc<std::sync::atomic::AtomicBool>,
        reported: mpsc::UnboundedSender<Lease>,
        /// Told each time the engine answers without the lease.
        withheld: Arc<tokio::sync::Notify>,
    }

    #[tonic::async_trait]
    impl agent_proto::remoteworkers::v1test2::bots_server::Bots for Engine {
        async fn create_bot_session(
            &self,
            request: tonic::Request<CreateBotSessionRequest>,
        ) -> std::result::Result<tonic::Response<BotSession>, tonic::Status> {
            let mut session = request.into_inner().bot_session.unwrap_or_default();
            session.name = "main/session-1".into();
            session.leases = self.offered();
            Ok(tonic::Response::new(session))
        }

        async fn update_bot_session(
            &self,
            request: tonic::Request<UpdateBotSessionRequest>,
        ) -> std::result::Result<tonic::Response<BotSession>, tonic::Status> {
            let mut session = request.into_inner().bot_session.unwrap_or_default();
            for lease in &session.leases {
                let _ = self.reported.send(lease.clone());
            }
            session.leases = self.offered();
            Ok(tonic::Response::new(session))
        }
    }

    impl Engine {
        fn offered(&self) -> Vec<Lease> {
            if self.offering.load(std::sync::atomic::Ordering::SeqCst) {
                vec![self.lease.clone()]
            } else {
                self.withheld.notify_one();
                Vec::new()
            }
        }
    }

    #[tokio::test]
    async fn a_lease_the_engine_dropped_and_offers_again_runs_again() {
        let state = tempfile::tempdir().unwrap();
        let fake = Fake::start(1 << 20).await;
        let lease = lease(&fake);
        // The first run holds until stopped; a later one writes its output and ends.
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = runs.clone();
        let executor = FakeExecutor::new(move |_| {
            Ok(
                if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    Script::holds()
                } else {
                    Script::exits(0).writing("out", b"output")
                },
            )
        });
        let offering = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (reported_tx, mut reported) = mpsc::unbounded_channel();
        let withheld = Arc::new(tokio::sync::Notify::new());
        let engine = Engine {
            lease: lease.clone(),
            offering: offering.clone(),
            reported: reported_tx,
            withheld: withheld.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    agent_proto::remoteworkers::v1test2::bots_server::BotsServer::new(engine),
                )
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut bot = bot(state.path(), &fake, executor);
        bot.channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect_lazy();
        let (_stop_tx, stop) = watch::channel(false);
        let (_cancel_tx, cancel) = watch::channel(false);
        tokio::spawn(bot.run(stop, cancel));
        // The bot runs the lease and says so; then the engine drops it (BuildGrid does
        // when the bot's session lapsed and the job went back to the queue) ...
        loop {
            let seen = reported.recv().await.unwrap();
            if seen.id == lease.id && seen.state == LeaseState::Active as i32 {
                break;
            }
        }
        offering.store(false, std::sync::atomic::Ordering::SeqCst);
        withheld.notified().await;
        // ... and, the job retried under the same name, hands it to this bot again: it
        // must run and be reported, or the job sits on an idle bot for good. The bound
        // only turns that into a failure instead of a hung test.
        while reported.try_recv().is_ok() {}
        offering.store(true, std::sync::atomic::Ordering::SeqCst);
        let completed = tokio::time::timeout(Duration::from_secs(120), async {
            loop {
                let seen = reported.recv().await.unwrap();
                if seen.id == lease.id && seen.state == LeaseState::Completed as i32 {
                    return seen;
                }
            }
        })
        .await
        .expect("the lease offered again never ran");
        assert_eq!(completed.status.map(|s| s.code), Some(0));
        assert!(completed.result.is_some());
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
