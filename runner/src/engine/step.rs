//! One step in its sandbox, phase by phase: its spec and limits, the sandbox and the
//! egress proxy, waiting and collecting its logs, the verdict and the limits it ran
//! into, recording the workspace it left, and the signed link.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use agent_proto::v1::{OutputStream, StepResult, StepState};
use provenance::walk::WalkOptions;
use sandbox::{StepOutcome, StepSpec, StepStatus};

use crate::egress::process::EgressProcess;
use crate::engine::end::{blocking, JobEnd};
use crate::engine::executor::Execution;
use crate::engine::jobs::Runner;
use crate::engine::logs::CapturedLog;
use crate::engine::outcome::{LimitsHit, Verdict};
use crate::engine::workspace::{hash_workspace, survey_workspace, unrecordable, workspace_walk};
use crate::engine::RUNNER_VERSION;
use crate::error::{Result, RunnerError};
use crate::images::{ResolvedImage, BUILD_UID};
use crate::plan::StepPlan;

/// A tree as hashed: each path under the workspace and its digest.
type Tree = BTreeMap<String, String>;

/// The egress proxy's port on a step's loopback (each step has its own namespace).
const EGRESS_PROXY_PORT: u16 = 3128;

/// A sandboxed command's environment: Kiln's defaults, then the image config's Env, then
/// the command's own variables (a job step's, a remote action's).
pub(crate) fn sandbox_env(
    image: &ResolvedImage,
    own: impl IntoIterator<Item = (String, String)>,
) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = [
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
    for var in &image.env {
        if let Some((k, v)) = var.split_once('=') {
            env.insert(k.to_string(), v.to_string());
        }
    }
    env.extend(own);
    env.into_iter().collect()
}

impl Runner {
    /// Kiln's defaults, then the image config's Env, then the job's own.
    fn step_env(step: &agent_proto::v1::Step, image: &ResolvedImage) -> Vec<(String, String)> {
        sandbox_env(image, step.env.iter().map(|(k, v)| (k.clone(), v.clone())))
    }

    /// Runs one step in its own sandbox and signs its link. Answers the step's result
    /// and the workspace it left (the next step's materials), unless that could not be
    /// recorded.
    pub(super) async fn run_step(
        self: Arc<Self>,
        id: &str,
        (step, plan): (&agent_proto::v1::Step, &StepPlan),
        image: &ResolvedImage,
        workspace: &Path,
        host_uid_base: u32,
        materials: Option<Tree>,
    ) -> Result<(StepResult, Option<Tree>), JobEnd> {
        let started = Instant::now();
        let scheduled_ns = sandbox::monotonic_now_ns();
        let limits = plan.limits;
        if let Some(refused) = self.resize_quota(step, workspace, &limits) {
            return Ok((refused, None));
        }
        let walk_options = workspace_walk(&self.config);
        let materials = match materials {
            Some(known) => known,
            None => match hash_materials(step, workspace, walk_options).await? {
                Ok(materials) => materials,
                Err(refused) => return Ok((refused, None)),
            },
        };
        let timeout_seconds = plan.timeout_seconds;
        let (spec, profile_digest) =
            self.prepare_step(step, plan, image, workspace, host_uid_base)?;
        let ran = self
            .clone()
            .run_sandbox(id, step, &spec, plan.allow_list.is_some())
            .await?;
        let mut result = ran.result(step, started, scheduled_ns);
        let Some(verdict) =
            crate::engine::outcome::verdict(&ran.outcome.status, timeout_seconds, &step.argv[0])
        else {
            // The step never ran: nothing to attest.
            return Ok((
                self.setup_failed(result, &ran.outcome.status, workspace)?,
                None,
            ));
        };
        let quota_hit = self
            .executor
            .workspace_usage(workspace)
            .is_some_and(|(_, full)| full);
        let hit = apply_verdict(&mut result, &verdict, &ran.outcome, quota_hit, &limits);
        let (products, unrecorded) =
            match record_products(workspace, walk_options, limits.disk_bytes).await? {
                Ok(products) => (products, None),
                Err(refusal) => (
                    Default::default(),
                    Some(refuse_products(&mut result, verdict.state, refusal)),
                ),
            };
        let link = provenance::link::Link {
            name: step.name.clone(),
            command: step.argv.clone(),
            materials,
            products,
            byproducts: byproducts(&result, &ran, &verdict, &hit, unrecorded.as_deref()),
            environment: self.environment(image, &profile_digest, timeout_seconds, &limits),
        };
        let (link, signed, digests) = {
            let runner = self.clone();
            blocking(move || {
                let signed = crate::engine::attest::sign_link(&link, &runner.key)?;
                let stored = runner.cas.put_all(&[&signed.metablock, &signed.dsse])?;
                let [metablock, dsse] = <[String; 2]>::try_from(stored).map_err(|_| {
                    RunnerError::Internal("the content store answered no digest pair".into())
                })?;
                Ok((link, signed, (metablock, dsse)))
            })
            .await?
        };
        (result.link_digest, result.link_dsse_digest) = digests;
        result.link_name = signed.file_name;
        let products = unrecorded.is_none().then_some(link.products);
        Ok((result, products))
    }

    /// The sandbox's spec for the step: its command, environment, limits and network,
    /// with the digest of the sandbox profile it makes.
    fn prepare_step(
        &self,
        step: &agent_proto::v1::Step,
        plan: &StepPlan,
        image: &ResolvedImage,
        workspace: &Path,
        host_uid_base: u32,
    ) -> Result<(StepSpec, String)> {
        // A step with an allow-list gets the egress proxy on its loopback, and TCP only to
        // it; a step without one has neither.
        let proxy_port = plan.allow_list.as_ref().map(|_| EGRESS_PROXY_PORT);
        let mut env = Self::step_env(step, image);
        if let Some(port) = proxy_port {
            crate::egress::proxy::set_proxy_env(&mut env, port);
        }
        let spec = StepSpec {
            argv: step.argv.clone(),
            env,
            root: image.root.clone(),
            workspace: workspace.to_path_buf(),
            working_directory: Vec::new(),
            host_uid_base,
            id_range: self.config.id_range,
            step_uid: BUILD_UID,
            timeout_ms: u64::from(plan.timeout_seconds) * 1000,
            hostname: "kiln".into(),
            tmp_size_bytes: self.config.tmp_size_mib * 1024 * 1024,
            limits: plan.limits.sandbox(),
            tcp_connect_ports: proxy_port.into_iter().collect(),
            egress_proxy_port: proxy_port,
            waived_layers: self.executor.waived_layers().to_vec(),
        };
        let profile_digest = self.executor.profile_digest(&spec)?;
        Ok((spec, profile_digest))
    }

    /// Runs the sandbox to its end, with the egress proxy when the step has an
    /// allow-list, draining its output pipes meanwhile; cancellable throughout.
    async fn run_sandbox(
        self: Arc<Self>,
        id: &str,
        step: &agent_proto::v1::Step,
        spec: &StepSpec,
        with_proxy: bool,
    ) -> Result<Ran, JobEnd> {
        let mut running = self.executor.start(spec)?;
        let handle = self.handle(id);
        if let Ok(mut c) = handle.canceller.lock() {
            *c = Some(running.canceller());
        }
        // A cancel that arrived between the check and the spawn still counts.
        if handle.cancelled.load(Ordering::SeqCst) {
            (running.canceller())();
        }
        let readers = self.read_logs(&mut running, id, &step.name);
        let (running, proxy) = match with_proxy {
            false => (running, None),
            // The proxy process runs as the top uid of the slot's range: no other job's,
            // and none the step has. It decodes the step's list (validated at Submit)
            // from its assignment: it trusts nothing across the process boundary.
            true => {
                let uid = spec.host_uid_base + (spec.id_range - 1);
                self.start_proxy(running, &step.allow_net, uid, id, &step.name)
                    .await?
            }
        };
        let outcome = tokio::task::spawn_blocking(move || running.wait())
            .await
            .map_err(|e| RunnerError::Internal(format!("waiting for the sandbox: {e}")))?;
        // Replace the supervisor this step took now, not while its sandbox was being set
        // up: on a small host the exec would compete with that for the CPU.
        self.executor.replenish();
        // Every process of the step is gone: close what is still open, keep the record.
        let network = match proxy {
            // A step whose network cannot be accounted for is not attested.
            Some(proxy) => Some(
                proxy
                    .finish()
                    .await
                    .map_err(|e| RunnerError::FailedPrecondition(e.to_string()))?,
            ),
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
            let log = reader
                .await
                .map_err(|e| RunnerError::Internal(format!("log reader: {e}")))?;
            logs.push(log);
        }
        if let Ok(mut c) = handle.canceller.lock() {
            *c = None;
        }
        Ok(Ran {
            outcome: outcome?,
            network,
            stdout: logs.first().cloned().unwrap_or_default(),
            stderr: logs.get(1).cloned().unwrap_or_default(),
        })
    }

    /// A thread per output pipe of the step, draining it (see `pump_log`).
    fn read_logs(
        self: &Arc<Self>,
        running: &mut Box<dyn Execution>,
        id: &str,
        step_name: &str,
    ) -> Vec<tokio::task::JoinHandle<CapturedLog>> {
        [
            (running.take_stdout(), OutputStream::Stdout),
            (running.take_stderr(), OutputStream::Stderr),
        ]
        .into_iter()
        .filter_map(|(fd, stream)| fd.map(|fd| (fd, stream)))
        .map(|(fd, stream)| {
            let runner = self.clone();
            let id = id.to_string();
            let step_name = step_name.to_string();
            // On the runtime's blocking pool: its threads outlive a step, so a step's
            // start does not wait for two thread spawns.
            tokio::task::spawn_blocking(move || runner.pump_log(fd, &id, &step_name, stream))
        })
        .collect()
    }

    /// The proxy serves the listener the supervisor made in the step's namespace; the
    /// step is released only after handing it over, so no connection is missed.
    async fn start_proxy(
        &self,
        mut running: Box<dyn Execution>,
        allow_net: &[String],
        uid: u32,
        id: &str,
        step_name: &str,
    ) -> Result<(Box<dyn Execution>, Option<EgressProcess>)> {
        let (back, listener) = tokio::task::spawn_blocking(move || {
            let listener = running.take_egress_listener();
            (running, listener)
        })
        .await
        .map_err(|e| RunnerError::Internal(format!("waiting for the sandbox: {e}")))?;
        running = back;
        let Some(fd) = listener? else {
            // The sandbox failed before: its outcome says why.
            return Ok((running, None));
        };
        let proxy = EgressProcess::start(fd, allow_net, self.config.proxy_limits(), uid)
            .await
            .map_err(|e| RunnerError::Internal(e.to_string()))?;
        tracing::info!(
            job = %id,
            step = %step_name,
            uid,
            "egress proxy process serving the step's namespace"
        );
        Ok((running, Some(proxy)))
    }

    /// The result of a step whose sandbox could not be set up.
    fn setup_failed(
        &self,
        mut result: StepResult,
        status: &StepStatus,
        workspace: &Path,
    ) -> Result<StepResult> {
        let StepStatus::SetupFailed { layer, message } = status else {
            return Err(RunnerError::Internal(
                "a step status without a verdict".into(),
            ));
        };
        self.bus
            .emit(&crate::engine::bus::EngineEvent::SandboxSetupFailed {
                layer: layer.clone(),
            });
        result.state = StepState::Error as i32;
        result.exit_code = 125;
        // The supervisor's text may name the host's side of a mount.
        let message = message
            .replace(&workspace.display().to_string(), "/workspace")
            .replace(&self.config.state_dir.display().to_string(), "<state>");
        result.message = format!("sandbox layer {layer:?} could not be set up: {message}");
        Ok(result)
    }

    /// This step's workspace quota; the tmpfs refuses to shrink below what it holds, and
    /// then the step does not run (the answer is its result).
    fn resize_quota(
        &self,
        step: &agent_proto::v1::Step,
        workspace: &Path,
        limits: &crate::limits::Effective,
    ) -> Option<StepResult> {
        let err = self
            .executor
            .resize_workspace(workspace, limits.disk_bytes)
            .err()?;
        let held = self
            .executor
            .workspace_usage(workspace)
            .map(|(used, _)| crate::units::format_size(used))
            .unwrap_or_else(|| "?".into());
        Some(StepResult {
            name: step.name.clone(),
            state: StepState::Error as i32,
            exit_code: 125,
            message: format!(
                "the workspace already holds {held}, more than this step's disk limit of {} ({err})",
                crate::units::format_size(limits.disk_bytes)
            ),
            ..Default::default()
        })
    }

    /// What the link says the step ran in.
    fn environment(
        &self,
        image: &ResolvedImage,
        profile_digest: &str,
        timeout_seconds: u32,
        limits: &crate::limits::Effective,
    ) -> serde_json::Value {
        serde_json::json!({
            "image": image.describe(),
            "sandbox_profile": {"sha256": profile_digest},
            "runner": {"name": "kiln", "version": RUNNER_VERSION},
            "timeout_seconds": timeout_seconds,
            "limits": limits.describe(),
            // sandbox layers skipped on this host by the operator's explicit waiver
            "waived_layers": self.executor.waived_layers(),
        })
    }
}

/// What a finished sandbox left: how it ended, the network attempts, the logs.
struct Ran {
    outcome: StepOutcome,
    network: Option<crate::egress::proxy::Report>,
    stdout: CapturedLog,
    stderr: CapturedLog,
}

impl Ran {
    /// The step's result before its verdict: timings, network and logs.
    fn result(
        &self,
        step: &agent_proto::v1::Step,
        started: Instant,
        scheduled_ns: u64,
    ) -> StepResult {
        let (stdout, stderr, network) = (&self.stdout, &self.stderr, &self.network);
        StepResult {
            name: step.name.clone(),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            start_latency_us: self
                .outcome
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
        }
    }
}

/// The workspace before the first step, hashed; if the inputs alone cannot be
/// recorded, the step does not run (the error is its result).
async fn hash_materials(
    step: &agent_proto::v1::Step,
    workspace: &Path,
    options: WalkOptions,
) -> Result<Result<Tree, StepResult>, JobEnd> {
    Ok(hash_workspace(workspace.to_path_buf(), options)
        .await?
        .map_err(|err| {
            let (message, limit_reason) = unrecordable(&err);
            StepResult {
                name: step.name.clone(),
                state: StepState::Failed as i32,
                exit_code: 1,
                message: format!("before the step: {message}"),
                limit_reason: limit_reason.into(),
                ..Default::default()
            }
        }))
}

/// Fills in the step's verdict, the limits it ran into (the first one named is the
/// reason reported) and what it used; answers the limits hit.
fn apply_verdict(
    result: &mut StepResult,
    verdict: &Verdict,
    outcome: &StepOutcome,
    quota_hit: bool,
    limits: &crate::limits::Effective,
) -> LimitsHit {
    let usage = &outcome.usage;
    let hit = LimitsHit {
        timed_out: outcome.status == StepStatus::TimedOut,
        oom_killed: usage.oom_killed,
        pids_limit_hit: usage.pids_limit_hit,
        quota_hit,
    };
    result.state = verdict.state as i32;
    result.exit_code = verdict.exit_code;
    result.signal = verdict.signal;
    result.message = hit.message(&verdict.message, limits);
    result.cpu_time_ms = usage.cpu_time_ms;
    result.peak_memory_bytes = usage.peak_memory_bytes;
    result.limit_reason = hit.reason().to_string();
    result.seccomp_denials = outcome
        .seccomp_denials
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    hit
}

/// What the step left, hashed, or why it cannot be recorded (message, limit reason).
/// It is recorded only if every entry can be (the walk names the first that cannot)
/// and its apparent size is within the disk limit: the quota bounds real data, but
/// sparse files are read by hashing at their apparent size.
async fn record_products(
    workspace: &Path,
    options: WalkOptions,
    disk_bytes: u64,
) -> Result<Result<Tree, (String, &'static str)>, JobEnd> {
    let survey = {
        let workspace = workspace.to_path_buf();
        blocking(move || Ok(survey_workspace(&workspace, options))).await?
    };
    let size = crate::units::format_size;
    let refused = match survey {
        Err(err) => Some(unrecordable(&err)),
        Ok(apparent) if apparent > disk_bytes => Some((
            format!(
                "the workspace's files add up to {} (sparse files count at their apparent size), more than the disk limit of {}; they are not hashed or attested",
                size(apparent),
                size(disk_bytes)
            ),
            "disk-quota",
        )),
        Ok(_) => None,
    };
    if let Some(refused) = refused {
        return Ok(Err(refused));
    }
    Ok(hash_workspace(workspace.to_path_buf(), options)
        .await?
        .map_err(|err| unrecordable(&err)))
}

/// A tree that cannot be recorded fails the step; its link records no products and
/// says why in byproducts (`kiln.unrecorded_products`). Answers that reason.
fn refuse_products(
    result: &mut StepResult,
    state: StepState,
    (reason, limit): (String, &'static str),
) -> String {
    // A step that timed out or was cancelled keeps that state.
    if state == StepState::Succeeded {
        result.state = StepState::Failed as i32;
        result.exit_code = 1;
    }
    // A limit the step ran into first stays the reported one.
    if result.limit_reason.is_empty() {
        result.limit_reason = limit.into();
    }
    result.message = if result.message.is_empty() {
        reason.clone()
    } else {
        format!("{}; {reason}", result.message)
    };
    reason
}

/// The link's byproducts: the step's return value, the heads of its logs, and what
/// Kiln saw of it (status, limits, network, seccomp denials).
fn byproducts(
    result: &StepResult,
    ran: &Ran,
    verdict: &Verdict,
    hit: &LimitsHit,
    unrecorded: Option<&str>,
) -> serde_json::Value {
    let (outcome, usage, network) = (&ran.outcome, &ran.outcome.usage, &ran.network);
    let (stdout, stderr) = (&ran.stdout, &ran.stderr);
    let (exit_code, signal) = (verdict.exit_code, verdict.signal);
    let (timed_out, quota_hit) = (hit.timed_out, hit.quota_hit);
    serde_json::json!({
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
    })
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
