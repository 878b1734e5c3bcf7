//! A remote action run as a Kiln step, against BuildGrid's CAS: the real sandbox (the
//! daemon's executor), the input root written into the workspace, the outputs uploaded
//! and the signed statement attached. Attacks: an action that reads the host's files, an
//! input symlink out of the workspace, an output below an input symlink, an action
//! past its timeout; the runner stays usable after each.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::protobuf;
use prost::Message;
use provenance::action::{verify_action_statement, ActionOutcome};
use provenance::keyring::TrustedKey;
use runner::config::Config;
use runner::engine::executor::SandboxExecutor;
use runner::engine::idranges::{IdRanges, LOCK_DIR};
use runner::engine::signer::Signer;
use runner::error::RunnerError;
use runner::images::Images;
use runner::worker::cas::{CasClient, Digest, UploadSource};
use runner::worker::inputs::fetch_action;
use runner::worker::run::{ActionIsolation, ActionRunner, ExecutedAction, SIGNED_LINK_TYPE_URL};
use runner::worker::ActionLimits;
use support::buildgrid::BuildGrid;
use support::require_root;

/// A host file no action may read.
const SECRET: &str = "kiln-host-secret-7f3a";

struct Worker {
    runner: ActionRunner,
    trusted: Vec<TrustedKey>,
    secret_path: PathBuf,
    _state: tempfile::TempDir,
}

fn worker() -> Worker {
    let state = tempfile::Builder::new()
        .prefix("kiln-worker-run-")
        .tempdir()
        .unwrap();
    // Traversable, as the daemon's state directory: the sandbox binds from below it.
    std::fs::set_permissions(
        state.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let secret_path = state.path().join("secret");
    std::fs::write(&secret_path, SECRET).unwrap();
    let config = Config {
        state_dir: state.path().to_path_buf(),
        max_concurrent_jobs: 1,
        max_timeout_seconds: 2,
        ..Default::default()
    };
    let host = sandbox::Sandbox::probe_with_waivers(&config.waive).unwrap();
    let sandbox = sandbox::Sandbox::new(PathBuf::from(env!("CARGO_BIN_EXE_kiln")));
    let id_ranges = IdRanges::lease(
        std::path::Path::new(LOCK_DIR),
        config.uid_base,
        config.id_range,
        1,
    )
    .unwrap();
    let (key, _) = Signer::open_with(&state.path().join("keys"), config.key_type).unwrap();
    let trusted = vec![TrustedKey::unbounded(
        key.current().unwrap().key.public_key(),
    )];
    let image = Images::open(state.path()).unwrap().resolve("host").unwrap();
    let runner = ActionRunner::new(
        config.clone(),
        ActionIsolation {
            executor: Arc::new(SandboxExecutor::new(sandbox, host, 1)),
            id_ranges,
        },
        key,
        image,
        state.path().join("work"),
        "test-bot".into(),
    )
    .unwrap();
    Worker {
        runner,
        trusted,
        secret_path,
        _state: state,
    }
}

async fn put(cas: &CasClient, data: Vec<u8>) -> Digest {
    let digest = Digest::of(&data);
    cas.upload_missing(vec![(digest.clone(), UploadSource::Bytes(data))])
        .await
        .unwrap();
    digest
}

/// Uploads an action running `argv` on `root`, with `outputs` (output_paths).
async fn action(
    cas: &CasClient,
    argv: &[&str],
    root: &reapi::Directory,
    outputs: &[&str],
    timeout_seconds: i64,
) -> Digest {
    let command = reapi::Command {
        arguments: argv.iter().map(|a| a.to_string()).collect(),
        output_paths: outputs.iter().map(|o| o.to_string()).collect(),
        ..Default::default()
    };
    let command_digest = put(cas, command.encode_to_vec()).await;
    let root_digest = put(cas, root.encode_to_vec()).await;
    let action = reapi::Action {
        command_digest: Some(command_digest.to_proto()),
        input_root_digest: Some(root_digest.to_proto()),
        timeout: (timeout_seconds > 0).then_some(protobuf::Duration {
            seconds: timeout_seconds,
            nanos: 0,
        }),
        ..Default::default()
    };
    put(cas, action.encode_to_vec()).await
}

async fn run(
    worker: &Worker,
    cas: &CasClient,
    digest: &Digest,
) -> Result<ExecutedAction, RunnerError> {
    let fetched = fetch_action(cas, digest, &ActionLimits::default()).await?;
    worker
        .runner
        .run(&fetched, cas, std::future::pending())
        .await
}

/// The result's statement verifies against the worker's key for this action.
fn assert_attested(worker: &Worker, digest: &Digest, executed: &ExecutedAction) {
    let result = &executed.result;
    let attached: Vec<_> = result
        .execution_metadata
        .iter()
        .flat_map(|m| m.auxiliary_metadata.iter())
        .filter(|a| a.type_url == SIGNED_LINK_TYPE_URL)
        .collect();
    assert_eq!(attached.len(), 1, "{result:?}");
    assert_eq!(
        Digest::of(&attached[0].value),
        executed.statement_digest,
        "the statement in the CAS is the one attached"
    );
    let envelope = agent_proto::v1::SignedLink::decode(attached[0].value.as_slice())
        .unwrap()
        .dsse_envelope;
    let hash = |d: &Option<reapi::Digest>| d.as_ref().unwrap().hash.clone();
    let outcome = ActionOutcome {
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
        exit_code: result.exit_code,
    };
    let verdict = verify_action_statement(&envelope, &worker.trusted, digest.hash(), &outcome);
    assert!(verdict.passed, "{verdict:?}");
    assert_eq!(verdict.worker.as_deref(), Some("test-bot"));
}

async fn blob(cas: &CasClient, digest: &Option<reapi::Digest>) -> Vec<u8> {
    let digest = Digest::from_field(digest.as_ref(), "digest").unwrap();
    cas.read_blob(&digest, 1 << 20).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_action_runs_as_a_sandboxed_step_and_is_attested() {
    let test = "a_remote_action_runs_as_a_sandboxed_step_and_is_attested";
    if !require_root(test) {
        return;
    }
    let Some(grid) = BuildGrid::start(test) else {
        return;
    };
    let cas = CasClient::connect(grid.channel().await, &grid.instance)
        .await
        .unwrap();
    let worker = worker();
    let empty = reapi::Directory::default();

    // The output's parent directory is made for the action, which writes its output there.
    let hello = action(
        &cas,
        &["sh", "-c", "echo hi > out/a; echo to-stderr >&2"],
        &empty,
        &["out/a"],
        0,
    )
    .await;
    let executed = run(&worker, &cas, &hello).await.unwrap();
    assert_eq!(executed.status.code, 0, "{:?}", executed.status);
    assert_eq!(executed.result.exit_code, 0);
    let [file] = executed.result.output_files.as_slice() else {
        panic!("{:?}", executed.result);
    };
    assert_eq!(file.path, "out/a");
    assert_eq!(blob(&cas, &file.digest).await, b"hi\n");
    assert_eq!(
        blob(&cas, &executed.result.stderr_digest).await,
        b"to-stderr\n"
    );
    assert_attested(&worker, &hello, &executed);
    let metadata = executed.result.execution_metadata.as_ref().unwrap();
    let seconds = |t: &Option<protobuf::Timestamp>| t.as_ref().unwrap().seconds;
    assert!(
        seconds(&metadata.worker_start_timestamp) > 0
            && seconds(&metadata.execution_start_timestamp)
                <= seconds(&metadata.execution_completed_timestamp)
            && seconds(&metadata.execution_completed_timestamp)
                <= seconds(&metadata.worker_completed_timestamp),
        "{metadata:?}"
    );

    // An action that reads the host's files, by absolute path and up from its workspace,
    // sees none of them.
    let secret = worker.secret_path.display().to_string();
    let script = format!(
        "cat {secret} ../secret ../../secret ../../../secret /proc/1/root{secret} > out/leak 2>&1; \
         ls -la / .. >> out/leak 2>&1; true"
    );
    let reader = action(&cas, &["sh", "-c", &script], &empty, &["out/leak"], 0).await;
    let executed = run(&worker, &cas, &reader).await.unwrap();
    let [leak] = executed.result.output_files.as_slice() else {
        panic!("{:?}", executed.result);
    };
    let leaked = String::from_utf8_lossy(&blob(&cas, &leak.digest).await).into_owned();
    assert!(!leaked.contains(SECRET), "{leaked}");
    assert!(leaked.contains("No such file"), "{leaked}");
    assert_attested(&worker, &reader, &executed);

    // An input symlink out of the workspace is refused before anything runs.
    let escape = reapi::Directory {
        symlinks: vec![reapi::SymlinkNode {
            name: "up".into(),
            target: "../../..".into(),
            node_properties: None,
        }],
        ..Default::default()
    };
    let through_link = action(
        &cas,
        &["sh", "-c", &format!("cat up{secret} > out/leak")],
        &escape,
        &["out/leak"],
        0,
    )
    .await;
    let refused = run(&worker, &cas, &through_link).await;
    assert!(
        matches!(&refused, Err(RunnerError::InvalidArgument { field, .. }) if field == "input symlink"),
        "{refused:?}"
    );

    // An output below an input symlink: refused, the link is not followed to make it.
    let inside_link = reapi::Directory {
        directories: vec![reapi::DirectoryNode {
            name: "real".into(),
            digest: Some(put(&cas, empty.encode_to_vec()).await.to_proto()),
        }],
        symlinks: vec![reapi::SymlinkNode {
            name: "out".into(),
            target: "real".into(),
            node_properties: None,
        }],
        ..Default::default()
    };
    let below_link = action(&cas, &["true"], &inside_link, &["out/x/a"], 0).await;
    let refused = run(&worker, &cas, &below_link).await;
    assert!(
        matches!(&refused, Err(RunnerError::InvalidArgument { reason, .. }) if reason.contains("symlink")),
        "{refused:?}"
    );

    // Past its timeout (capped at max_timeout_seconds = 2) the action is killed, reported
    // as DEADLINE_EXCEEDED with what it left, and still attested.
    let slow = action(
        &cas,
        &["sh", "-c", "echo started > out/partial; exec sleep 60"],
        &empty,
        &["out/partial"],
        3600,
    )
    .await;
    let executed = run(&worker, &cas, &slow).await.unwrap();
    assert_eq!(
        executed.status.code,
        tonic::Code::DeadlineExceeded as i32,
        "{:?}",
        executed.status
    );
    assert_eq!(executed.result.exit_code, 137);
    assert_eq!(executed.result.output_files.len(), 1);
    assert_attested(&worker, &slow, &executed);

    // A cancelled action is stopped and answers an error.
    let fetched = fetch_action(&cas, &slow, &ActionLimits::default())
        .await
        .unwrap();
    let cancelled = worker
        .runner
        .run(
            &fetched,
            &cas,
            tokio::time::sleep(Duration::from_millis(300)),
        )
        .await;
    assert!(
        matches!(&cancelled, Err(RunnerError::Unavailable(m)) if m.contains("cancelled")),
        "{cancelled:?}"
    );

    // The command runs in its working directory; its outputs are relative to it.
    let command = reapi::Command {
        arguments: vec!["sh".into(), "-c".into(), "pwd > o; cat input >> o".into()],
        working_directory: "sub".into(),
        output_paths: vec!["o".into()],
        ..Default::default()
    };
    let sub = reapi::Directory {
        files: vec![reapi::FileNode {
            name: "input".into(),
            digest: Some(put(&cas, b"from-input\n".to_vec()).await.to_proto()),
            is_executable: false,
            node_properties: None,
        }],
        ..Default::default()
    };
    let root = reapi::Directory {
        directories: vec![reapi::DirectoryNode {
            name: "sub".into(),
            digest: Some(put(&cas, sub.encode_to_vec()).await.to_proto()),
        }],
        ..Default::default()
    };
    let with_cwd = reapi::Action {
        command_digest: Some(put(&cas, command.encode_to_vec()).await.to_proto()),
        input_root_digest: Some(put(&cas, root.encode_to_vec()).await.to_proto()),
        ..Default::default()
    };
    let with_cwd = put(&cas, with_cwd.encode_to_vec()).await;
    let executed = run(&worker, &cas, &with_cwd).await.unwrap();
    let [o] = executed.result.output_files.as_slice() else {
        panic!("{:?}", executed.result);
    };
    assert_eq!(o.path, "o");
    assert_eq!(blob(&cas, &o.digest).await, b"/workspace/sub\nfrom-input\n");
    assert_attested(&worker, &with_cwd, &executed);

    // After all of that, the worker runs the next action as the first.
    let executed = run(&worker, &cas, &hello).await.unwrap();
    assert_eq!(executed.result.exit_code, 0);
    assert_eq!(
        blob(&cas, &executed.result.output_files[0].digest).await,
        b"hi\n"
    );
    assert_attested(&worker, &hello, &executed);
}
