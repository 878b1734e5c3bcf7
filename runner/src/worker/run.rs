//! One remote action run as a Kiln step: a workspace made by the engine's [`Executor`]
//! (the same enclosure, tmpfs quota and ownership as a job's), the input root written
//! into it, the command run in the same sandbox, limits and profile as any step, with no
//! network, then the outputs collected and uploaded and a statement of the action signed
//! by the runner key and attached to the ActionResult.

use std::fs;
use std::future::Future;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::protobuf::{Any, Timestamp};
use bazel_remote_apis::google::rpc;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use provenance::action::{ActionDigest, ActionStatementInput};
use sandbox::{StepOutcome, StepSpec, StepStatus};
use time::OffsetDateTime;

use super::cas::{CasClient, Digest, UploadSource};
use super::image::{requested_image, select_image, OfferedImage};
use super::inputs::FetchedAction;
use super::outputs::{collect_outputs, message_blob, upload_outputs};
use super::ActionLimits;
use crate::config::Config;
use crate::engine::executor::Executor;
use crate::engine::idranges::IdRanges;
use crate::engine::signer::Signer;
use crate::error::{Result, RunnerError};
use crate::images::{ResolvedImage, BUILD_UID};
use crate::limits::Effective;
use crate::plan::StepPlan;

/// The type URL of a signed statement in `auxiliary_metadata` (`kiln.v1.SignedLink`), one
/// constant for the worker that attaches it and `kiln verify --action-cache`.
pub use crate::cli::action_cache::SIGNED_LINK_TYPE_URL;

/// The workspace's name inside its enclosure (as a job's).
const WORKSPACE_DIR: &str = "ws";

/// What runs remote actions on this host: the engine's executor, the host id ranges of
/// its slots (one action per slot at a time), the signing key, the default image and the
/// images an action may ask for.
pub struct ActionRunner {
    config: Config,
    executor: Arc<dyn Executor>,
    id_ranges: IdRanges,
    free_slots: Mutex<Vec<u32>>,
    work_dir: PathBuf,
    key: Signer,
    image: ResolvedImage,
    /// `[worker] images`: what an action's `container-image` may name.
    offered: Vec<OfferedImage>,
    limits: ActionLimits,
    /// The worker's name, as results and statements record it.
    worker: String,
}

/// What the sandbox runs an action with (the daemon's isolation, shared).
pub struct ActionIsolation {
    pub executor: Arc<dyn Executor>,
    pub id_ranges: IdRanges,
}

/// An action that ran: its ActionResult (outputs uploaded, statement attached) and the
/// status to report with it: OK, or DEADLINE_EXCEEDED for one that ran past its timeout
/// (the result then holds what it left, as REAPI asks).
#[derive(Debug, Clone)]
pub struct ExecutedAction {
    pub result: reapi::ActionResult,
    pub status: rpc::Status,
    /// The signed statement's blob in the CAS (a `kiln.v1.SignedLink`).
    pub statement_digest: Digest,
}

/// A slot's id range, given back when the action ends.
struct SlotLease<'a> {
    runner: &'a ActionRunner,
    slot: u32,
}

impl Drop for SlotLease<'_> {
    fn drop(&mut self) {
        if let Ok(mut free) = self.runner.free_slots.lock() {
            free.push(self.slot);
        }
    }
}

/// The enclosure of one action's workspace, removed whatever the action's end.
struct WorkspaceGuard<'a> {
    executor: &'a dyn Executor,
    enclosure: PathBuf,
    workspace: PathBuf,
}

impl Drop for WorkspaceGuard<'_> {
    fn drop(&mut self) {
        if self.workspace.exists() {
            match self.executor.release_workspace(&self.workspace) {
                Ok(()) | Err(Errno::EINVAL) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "could not unmount an action's workspace quota")
                }
            }
        }
        match fs::remove_dir_all(&self.enclosure) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!(error = %err, "could not remove an action's workspace"),
        }
    }
}

impl ActionRunner {
    /// `work_dir` holds the workspaces (made 0711 and emptied here); `image` is the
    /// configured default image, already resolved.
    pub fn new(
        config: Config,
        isolation: ActionIsolation,
        key: Signer,
        image: ResolvedImage,
        work_dir: PathBuf,
        worker: String,
    ) -> Result<Self> {
        let ActionIsolation {
            executor,
            id_ranges,
        } = isolation;
        crate::engine::enclosure::reset_work_dir(&work_dir, executor.as_ref())?;
        let slots = (0..u32::try_from(id_ranges.bases().len()).unwrap_or(u32::MAX))
            .rev()
            .collect();
        Ok(Self {
            config,
            executor,
            id_ranges,
            free_slots: Mutex::new(slots),
            work_dir,
            key,
            image,
            offered: Vec::new(),
            limits: ActionLimits::default(),
            worker,
        })
    }

    /// Bounds on the actions' inputs and outputs other than the defaults.
    pub fn with_limits(mut self, limits: ActionLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The images (resolved, verified) an action may name with `container-image`.
    pub fn with_offered_images(mut self, offered: Vec<OfferedImage>) -> Self {
        self.offered = offered;
        self
    }

    pub fn limits(&self) -> &ActionLimits {
        &self.limits
    }

    /// How an action runs: the operator's default limits, the action's timeout capped by
    /// `max_timeout_seconds` (none: `default_timeout_seconds`), and no network.
    pub fn plan(&self, action: &reapi::Action) -> StepPlan {
        let asked = action
            .timeout
            .as_ref()
            .map(|t| {
                // Part of a second counts as a whole one.
                let whole = u64::try_from(t.seconds).unwrap_or(0);
                whole + u64::from(t.nanos > 0)
            })
            .unwrap_or(0);
        let cap = u64::from(self.config.max_timeout_seconds);
        let timeout_seconds = if asked == 0 {
            self.config.default_timeout_seconds
        } else {
            u32::try_from(asked.min(cap)).unwrap_or(self.config.max_timeout_seconds)
        };
        StepPlan {
            limits: Effective::of(&self.config, None),
            timeout_seconds,
            allow_list: None,
        }
    }

    /// Runs `fetched` (validated by `fetch_action`) in a fresh workspace with its inputs
    /// from `cas`, uploads its outputs there and answers its result. `cancel` resolving
    /// stops the action (its every process killed) and answers a cancelled error. An
    /// action that cannot run (inputs over the quota, an output below an input symlink,
    /// a sandbox that cannot be set up) is an error; the runner stays usable either way.
    /// The command starts in its working directory (validated by `fetch_action` as a
    /// directory of the input root), which the sandbox enters without following links.
    pub async fn run(
        &self,
        fetched: &FetchedAction,
        cas: &CasClient,
        cancel: impl Future<Output = ()> + Send,
    ) -> Result<ExecutedAction> {
        let plan = self.plan(&fetched.action);
        // Before anything is set up: the image the sandbox gets and the statement names
        // is this one value.
        let requested = requested_image(&fetched.action, &fetched.command)?;
        let image = select_image(requested.as_ref(), &self.offered, &self.image)?;
        if fetched.input_root.file_bytes() > plan.limits.disk_bytes {
            return Err(RunnerError::FailedPrecondition(format!(
                "the input root's files ({}) do not fit in the workspace quota of {}",
                crate::units::format_size(fetched.input_root.file_bytes()),
                crate::units::format_size(plan.limits.disk_bytes)
            )));
        }
        let slot = self.take_slot()?;
        let host_uid_base = self.id_ranges.base(slot.slot).ok_or_else(|| {
            RunnerError::Internal(format!("slot {} has no host id range", slot.slot))
        })?;
        // Named at random: the mount table is world-readable.
        let enclosure = self
            .work_dir
            .join(uuid::Uuid::new_v4().simple().to_string());
        let workspace = enclosure.join(WORKSPACE_DIR);
        let guard = WorkspaceGuard {
            executor: self.executor.as_ref(),
            enclosure: enclosure.clone(),
            workspace: workspace.clone(),
        };
        let step_owner = host_uid_base + BUILD_UID;
        self.executor.create_workspace(
            &enclosure,
            host_uid_base,
            &workspace,
            plan.limits.disk_bytes,
            step_owner,
        )?;
        let mut cancel = std::pin::pin!(cancel);
        let started_on = OffsetDateTime::now_utc();
        tokio::select! {
            written = self.write_inputs(fetched, cas, &workspace, step_owner, &plan) => written?,
            () = &mut cancel => return Err(cancelled()),
        }
        let spec = self.step_spec(fetched, image, &plan, &workspace, host_uid_base);
        let profile_digest = self.executor.profile_digest(&spec)?;
        let inputs_written = OffsetDateTime::now_utc();
        let ran = self.run_sandbox(spec, cancel.as_mut()).await?;
        let executed_on = OffsetDateTime::now_utc();
        let (exit_code, status) = self.verdict(&ran.outcome, &plan, &workspace)?;
        // Stopped, if only as it ended on its own: nothing of it is reported (and the
        // cancel, spent, is not waited on again below).
        if ran.cancelled {
            return Err(cancelled());
        }
        let collected = {
            let (workspace, paths, limits) = (
                workspace.clone(),
                fetched.paths.clone(),
                self.limits.clone(),
            );
            tokio::task::spawn_blocking(move || collect_outputs(&workspace, &paths, &limits))
                .await
                .map_err(|e| RunnerError::Internal(format!("collecting outputs: {e}")))??
        };
        // The engine's CAS may hold an upload forever: a cancel still ends the action.
        let mut result = tokio::select! {
            uploaded = upload_outputs(
                cas,
                collected,
                exit_code,
                ran.stdout,
                ran.stderr,
                &self.limits,
            ) => uploaded?,
            () = &mut cancel => return Err(cancelled()),
        };
        // Every output is read (or held) by now: the workspace may go.
        drop(guard);
        drop(slot);
        let finished_on = OffsetDateTime::now_utc();
        let statement = self.statement(
            fetched,
            image,
            &result,
            &profile_digest,
            started_on,
            finished_on,
        );
        let envelope = statement.sign(&self.key.current()?.key)?;
        let link = agent_proto::v1::SignedLink {
            dsse_envelope: envelope,
        };
        let (statement_digest, statement_bytes) = message_blob(&link);
        tokio::select! {
            uploaded = cas.upload_missing(vec![(
                statement_digest.clone(),
                UploadSource::Bytes(statement_bytes.clone()),
            )]) => uploaded?,
            () = &mut cancel => return Err(cancelled()),
        }
        let metadata = result
            .execution_metadata
            .get_or_insert_with(Default::default);
        metadata.worker = self.worker.clone();
        // When each phase ended, for the engine's and the client's accounting.
        metadata.worker_start_timestamp = Some(timestamp(started_on));
        metadata.input_fetch_start_timestamp = Some(timestamp(started_on));
        metadata.input_fetch_completed_timestamp = Some(timestamp(inputs_written));
        metadata.execution_start_timestamp = Some(timestamp(inputs_written));
        metadata.execution_completed_timestamp = Some(timestamp(executed_on));
        metadata.output_upload_start_timestamp = Some(timestamp(executed_on));
        metadata.output_upload_completed_timestamp = Some(timestamp(finished_on));
        metadata.worker_completed_timestamp = Some(timestamp(finished_on));
        metadata.auxiliary_metadata.push(Any {
            type_url: SIGNED_LINK_TYPE_URL.into(),
            value: statement_bytes,
        });
        Ok(ExecutedAction {
            result,
            status,
            statement_digest,
        })
    }

    fn take_slot(&self) -> Result<SlotLease<'_>> {
        let slot = self
            .free_slots
            .lock()
            .map_err(|_| RunnerError::Internal("the slots' lock is poisoned".into()))?
            .pop()
            .ok_or_else(|| {
                RunnerError::ResourceExhausted(
                    "every slot of this worker is running an action".into(),
                )
            })?;
        Ok(SlotLease { runner: self, slot })
    }

    /// The input root, then the parents of the outputs (REAPI: the worker creates them),
    /// all given to the step's uid as a job's inputs are.
    async fn write_inputs(
        &self,
        fetched: &FetchedAction,
        cas: &CasClient,
        workspace: &Path,
        step_owner: u32,
        plan: &StepPlan,
    ) -> Result<()> {
        if let Err(err) = fetched.input_root.materialize(cas, workspace, true).await {
            if self
                .executor
                .workspace_usage(workspace)
                .is_some_and(|(_, full)| full)
            {
                tracing::info!(error = %err, "an action's inputs exceed the workspace quota");
                return Err(RunnerError::FailedPrecondition(format!(
                    "the input root does not fit in the workspace quota of {}",
                    crate::units::format_size(plan.limits.disk_bytes)
                )));
            }
            return Err(err);
        }
        for output in &fetched.paths.outputs {
            if let Some((_, parents)) = output.components.split_last() {
                create_output_parents(workspace, parents, &output.path)?;
            }
        }
        self.executor.give_workspace(workspace, step_owner)
    }

    fn step_spec(
        &self,
        fetched: &FetchedAction,
        image: &ResolvedImage,
        plan: &StepPlan,
        workspace: &Path,
        host_uid_base: u32,
    ) -> StepSpec {
        StepSpec {
            argv: fetched.command.arguments.clone(),
            env: action_env(&fetched.command, image),
            root: image.root.clone(),
            workspace: workspace.to_path_buf(),
            working_directory: fetched.paths.working_directory.clone(),
            host_uid_base,
            id_range: self.config.id_range,
            step_uid: BUILD_UID,
            timeout_ms: u64::from(plan.timeout_seconds) * 1000,
            hostname: "kiln".into(),
            tmp_size_bytes: self.config.tmp_size_mib * 1024 * 1024,
            limits: plan.limits.sandbox(),
            // No network: no egress proxy, no TCP.
            tcp_connect_ports: Vec::new(),
            egress_proxy_port: None,
            waived_layers: self.executor.waived_layers().to_vec(),
        }
    }

    /// Starts the sandbox, drains its output pipes and waits for its end; `cancel`
    /// kills it.
    async fn run_sandbox(
        &self,
        spec: StepSpec,
        mut cancel: std::pin::Pin<&mut (impl Future<Output = ()> + Send)>,
    ) -> Result<Ran> {
        let executor = self.executor.clone();
        let mut running = tokio::task::spawn_blocking(move || executor.start(&spec))
            .await
            .map_err(|e| RunnerError::Internal(format!("starting the sandbox: {e}")))??;
        let canceller = running.canceller();
        let cap = self.config.max_log_bytes;
        let readers: Vec<_> = [running.take_stdout(), running.take_stderr()]
            .into_iter()
            .map(|fd| {
                std::thread::spawn(move || fd.map(|fd| read_log(fd, cap)).unwrap_or_default())
            })
            .collect();
        let mut wait = tokio::task::spawn_blocking(move || running.wait());
        let mut cancelled = false;
        let outcome = tokio::select! {
            outcome = &mut wait => outcome,
            () = &mut cancel => {
                cancelled = true;
                canceller();
                wait.await
            }
        }
        .map_err(|e| RunnerError::Internal(format!("waiting for the sandbox: {e}")))??;
        self.executor.replenish();
        let mut logs = Vec::with_capacity(2);
        for reader in readers {
            let log = tokio::task::spawn_blocking(move || reader.join())
                .await
                .map_err(|e| RunnerError::Internal(format!("log reader: {e}")))?
                .map_err(|_| RunnerError::Internal("log reader panicked".into()))?;
            logs.push(log);
        }
        let stderr = logs.pop().unwrap_or_default();
        let stdout = logs.pop().unwrap_or_default();
        Ok(Ran {
            outcome,
            stdout,
            stderr,
            cancelled,
        })
    }

    /// The exit code and status of an action that ran; an error for one that did not
    /// (its sandbox not set up) or was cancelled.
    fn verdict(
        &self,
        outcome: &StepOutcome,
        plan: &StepPlan,
        workspace: &Path,
    ) -> Result<(i32, rpc::Status)> {
        let ok = rpc::Status {
            code: tonic::Code::Ok as i32,
            ..Default::default()
        };
        match &outcome.status {
            StepStatus::SetupFailed { layer, message } => {
                // The supervisor's text may name the host's side of a mount.
                let message = message
                    .replace(&workspace.display().to_string(), "/workspace")
                    .replace(&self.config.state_dir.display().to_string(), "<state>");
                Err(RunnerError::Internal(format!(
                    "sandbox layer {layer:?} could not be set up: {message}"
                )))
            }
            StepStatus::Cancelled => Err(cancelled()),
            status => {
                let program = "the action's program";
                let verdict =
                    crate::engine::outcome::verdict(status, plan.timeout_seconds, program)
                        .ok_or_else(|| {
                            RunnerError::Internal("a status without a verdict".into())
                        })?;
                let status = if *status == StepStatus::TimedOut {
                    rpc::Status {
                        code: tonic::Code::DeadlineExceeded as i32,
                        message: verdict.message,
                        details: Vec::new(),
                    }
                } else {
                    ok
                };
                Ok((verdict.exit_code, status))
            }
        }
    }

    fn statement(
        &self,
        fetched: &FetchedAction,
        image: &ResolvedImage,
        result: &reapi::ActionResult,
        profile_digest: &str,
        started_on: OffsetDateTime,
        finished_on: OffsetDateTime,
    ) -> ActionStatementInput {
        let digest = |d: &Digest| ActionDigest {
            sha256: d.hash().to_string(),
            size_bytes: i64::try_from(d.size()).unwrap_or(i64::MAX),
        };
        let hash =
            |d: &Option<reapi::Digest>| d.as_ref().map(|d| d.hash.clone()).unwrap_or_default();
        ActionStatementInput {
            action: digest(&fetched.action_digest),
            input_root: digest(fetched.input_root.root_digest()),
            command: fetched.command.arguments.clone(),
            environment: fetched
                .command
                .environment_variables
                .iter()
                .map(|v| (v.name.clone(), v.value.clone()))
                .collect(),
            working_directory: fetched.command.working_directory.clone(),
            exit_code: result.exit_code,
            output_files: result
                .output_files
                .iter()
                .map(|f| (f.path.clone(), hash(&f.digest)))
                .collect(),
            output_directories: result
                .output_directories
                .iter()
                .map(|d| (d.path.clone(), hash(&d.tree_digest)))
                .collect(),
            sandbox_profile: profile_digest.to_string(),
            image: image.describe(),
            // The action had no network: no attempt could be made.
            network: serde_json::json!([]),
            worker: self.worker.clone(),
            started_on,
            finished_on,
        }
    }
}

fn timestamp(at: OffsetDateTime) -> Timestamp {
    Timestamp {
        seconds: at.unix_timestamp(),
        // At most 999,999,999.
        nanos: i32::try_from(at.nanosecond()).unwrap_or(0),
    }
}

pub(crate) fn cancelled() -> RunnerError {
    RunnerError::Unavailable("the action was cancelled".into())
}

/// What a finished sandbox left.
struct Ran {
    outcome: StepOutcome,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// The cancel came while it ran (its future is spent).
    cancelled: bool,
}

/// Reads a pipe to its end, keeping at most `cap` bytes: past it the pipe is still
/// drained, so the action never blocks on it.
fn read_log(fd: OwnedFd, cap: u64) -> Vec<u8> {
    let mut file = fs::File::from(fd);
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let room =
                    usize::try_from(cap.saturating_sub(kept.len() as u64)).unwrap_or(usize::MAX);
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "reading an action's output");
                break;
            }
        }
    }
    kept
}

/// Kiln's defaults, then the image config's Env, then the Command's own variables.
fn action_env(command: &reapi::Command, image: &ResolvedImage) -> Vec<(String, String)> {
    crate::engine::step::sandbox_env(
        image,
        command
            .environment_variables
            .iter()
            .map(|v| (v.name.clone(), v.value.clone())),
    )
}

/// Creates the directories `parents` below the workspace, one at a time below a
/// descriptor, never through a symlink: one that is a symlink or a file refuses the action.
fn create_output_parents(workspace: &Path, parents: &[String], output: &str) -> Result<()> {
    let open = |dir: &OwnedFd, name: &str| {
        nix::fcntl::openat(
            dir,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
    };
    let mut dir = nix::fcntl::open(
        workspace,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| RunnerError::io_path("opening", workspace)(e.into()))?;
    for name in parents {
        match nix::sys::stat::mkdirat(&dir, name.as_str(), Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => {
                return Err(RunnerError::invalid(
                    "output path",
                    format!("{output}: cannot create its directory: {e}"),
                ))
            }
        }
        dir = open(&dir, name).map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => RunnerError::invalid(
                "output path",
                format!("{output}: lies below a symlink or a file of the input root"),
            ),
            other => RunnerError::invalid("output path", format!("{output}: {other}")),
        })?;
    }
    Ok(())
}

/// The bot loop spawns each action's run as a task: the runner is shared and its run is
/// `Send` (checked at compile time).
#[cfg(test)]
#[allow(dead_code)]
fn runs_on_any_thread(runner: &ActionRunner, fetched: &FetchedAction, cas: &CasClient) {
    fn shared<T: Send + Sync>(_: &T) {}
    fn sendable<T: Send>(_: T) {}
    shared(runner);
    sendable(runner.run(fetched, cas, std::future::pending()));
}
