//! The fleet's peers, real: BuildGrid (the engine Kiln workers run under) on a PostgreSQL
//! cluster of the test's own, and Debian's Bazel as its client. These tests hold the
//! fixture to what the worker tests rely on: the services answer, an ActionResult's
//! auxiliary metadata (where a worker's signed statement travels) comes back intact from
//! the action cache, Bazel builds a genrule offline, and Bazel reuses a result through
//! BuildGrid.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    action_cache_client::ActionCacheClient, batch_update_blobs_request,
    content_addressable_storage_client::ContentAddressableStorageClient, digest_function,
    ActionResult, BatchUpdateBlobsRequest, Digest, ExecutedActionMetadata, FindMissingBlobsRequest,
    GetActionResultRequest, OutputFile, UpdateActionResultRequest,
};
use bazel_remote_apis::google::bytestream::{byte_stream_client::ByteStreamClient, ReadRequest};
use bazel_remote_apis::google::protobuf::Any;
use support::buildgrid::{digest_of, Bazel, BuildGrid};
use support::{describe, require_root, text};

#[tokio::test]
async fn buildgrid_serves_cas_bytestream_and_action_cache() {
    let Some(grid) = BuildGrid::start("buildgrid_serves_cas_bytestream_and_action_cache") else {
        return;
    };
    let execution = grid.capabilities.execution_capabilities.clone().unwrap();
    assert!(execution.exec_enabled, "{:?}", grid.capabilities);
    assert_eq!(
        execution.digest_function,
        digest_function::Value::Sha256 as i32
    );
    let cache = grid.capabilities.cache_capabilities.clone().unwrap();
    assert!(
        cache
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled,
        "workers must be able to store results"
    );

    let channel = grid.channel().await;
    let mut cas = ContentAddressableStorageClient::new(channel.clone());
    let blob = b"an input file of some action\n".to_vec();
    let stored = digest_of(&blob);
    let absent = digest_of(b"never uploaded");
    let answer = cas
        .batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: grid.instance.clone(),
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(stored.clone()),
                data: blob.clone(),
                compressor: 0,
            }],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.responses.len(), 1);
    assert_eq!(
        answer.responses[0].status.clone().unwrap_or_default().code,
        0
    );

    let missing = cas
        .find_missing_blobs(FindMissingBlobsRequest {
            instance_name: grid.instance.clone(),
            blob_digests: vec![stored.clone(), absent.clone()],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing, vec![absent]);

    let mut bytestream = ByteStreamClient::new(channel.clone());
    let mut stream = bytestream
        .read(ReadRequest {
            resource_name: format!("blobs/{}/{}", stored.hash, stored.size_bytes),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut read = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        read.extend_from_slice(&chunk.data);
    }
    assert_eq!(read, blob);

    // What a worker will store: a result whose execution metadata carries a signed
    // statement as an Any. The engine must hand it back byte for byte.
    let action = digest_of(b"an Action message");
    let statement = Any {
        type_url: "type.googleapis.com/kiln.v1.SignedLink".to_string(),
        value: b"\x0a\x05bytes of a DSSE envelope".to_vec(),
    };
    let result = ActionResult {
        output_files: vec![OutputFile {
            path: "out/hello.txt".to_string(),
            digest: Some(stored.clone()),
            ..Default::default()
        }],
        exit_code: 0,
        execution_metadata: Some(ExecutedActionMetadata {
            worker: "kiln-worker-test".to_string(),
            auxiliary_metadata: vec![statement.clone()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut action_cache = ActionCacheClient::new(channel);
    action_cache
        .update_action_result(UpdateActionResultRequest {
            instance_name: grid.instance.clone(),
            action_digest: Some(action.clone()),
            action_result: Some(result.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let cached = action_cache
        .get_action_result(GetActionResultRequest {
            instance_name: grid.instance.clone(),
            action_digest: Some(action),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let metadata = cached.execution_metadata.clone().unwrap();
    assert_eq!(metadata.auxiliary_metadata, vec![statement]);
    assert_eq!(cached.output_files, result.output_files);

    let unknown = action_cache
        .get_action_result(GetActionResultRequest {
            instance_name: grid.instance.clone(),
            action_digest: Some(digest_of(b"an action nobody ran")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
}

const GENRULE: &str = r#"genrule(
    name = "hello",
    outs = ["hello.txt"],
    cmd = "echo hello from a genrule > $@",
)
"#;

#[test]
fn bazel_builds_a_genrule_locally_offline() {
    let test = "bazel_builds_a_genrule_locally_offline";
    if !require_root(test) {
        return;
    }
    let Some(bazel) = Bazel::new(test) else {
        return;
    };
    bazel.write("BUILD", GENRULE);
    let output = bazel.build_without_network(&["//:hello"]);
    assert!(output.status.success(), "{}", describe(&output));
    // Run on this machine (Bazel's own sandbox), not taken from any cache.
    assert!(
        text(&output.stderr).contains("1 linux-sandbox"),
        "{}",
        describe(&output)
    );
    assert_eq!(bazel.output("hello.txt"), b"hello from a genrule\n");
}

#[test]
fn bazel_reuses_a_result_through_buildgrid() {
    let test = "bazel_reuses_a_result_through_buildgrid";
    let Some(bazel) = Bazel::new(test) else {
        return;
    };
    let Some(grid) = BuildGrid::start(test) else {
        return;
    };
    bazel.write("BUILD", GENRULE);
    let remote_cache = format!("--remote_cache={}", grid.url);

    let first = bazel.build(&[&remote_cache, "//:hello"]);
    assert!(first.status.success(), "{}", describe(&first));
    let first_stderr = text(&first.stderr);
    assert!(
        !first_stderr.contains("remote cache hit"),
        "an empty cache cannot hit:\n{first_stderr}"
    );
    let built = bazel.output("hello.txt");
    assert_eq!(built, b"hello from a genrule\n");

    // A second build that shares no local state: the action's result comes from BuildGrid.
    let elsewhere = tempfile::tempdir().unwrap();
    let second = bazel.build_in(elsewhere.path(), &[&remote_cache, "//:hello"]);
    assert!(second.status.success(), "{}", describe(&second));
    let second_stderr = text(&second.stderr);
    assert!(
        second_stderr.contains("1 remote cache hit"),
        "the second build did not use BuildGrid's action cache:\n{second_stderr}\nBuildGrid:\n{}",
        grid.log()
    );
    assert_eq!(bazel.output("hello.txt"), built);
}

/// BuildGrid's Python, from the venv `bgd` runs in (it has BuildGrid's protos).
fn buildgrid_python() -> std::path::PathBuf {
    let bgd = std::path::PathBuf::from(std::env::var_os("KILN_BGD").unwrap());
    bgd.parent().unwrap().join("python")
}

#[test]
fn a_bot_takes_a_lease_and_its_result_reaches_the_client_intact() {
    let test = "a_bot_takes_a_lease_and_its_result_reaches_the_client_intact";
    let Some(grid) = BuildGrid::start(test) else {
        return;
    };
    let output = std::process::Command::new(buildgrid_python())
        .arg(support::repo_root().join("tests/py/buildgrid_bot.py"))
        .arg(&grid.addr)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\nBuildGrid:\n{}",
        describe(&output),
        grid.log()
    );
    let seen: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    // BuildGrid hands a new lease out already ACTIVE (the API has it PENDING until the
    // bot accepts it): a worker must take both as new.
    assert_eq!(seen["lease_state"], "ACTIVE", "{seen}");
    assert_eq!(seen["leases"], 1, "{seen}");
    assert_eq!(
        seen["payload_type"], "type.googleapis.com/build.bazel.remote.execution.v2.Action",
        "{seen}"
    );
    assert_eq!(seen["execute_exit_code"], 0, "{seen}");
    assert_eq!(
        seen["execute_metadata"], seen["expected_metadata"],
        "{seen}"
    );
    assert_eq!(seen["cached_metadata"], seen["expected_metadata"], "{seen}");
}

/// `kiln verify --action-cache` against BuildGrid's action cache: a result with its
/// worker's statement passes; a result changed in the cache, a statement replayed onto
/// another action, a result with no statement and a key that is not the worker's fail.
#[tokio::test]
async fn action_results_verify_against_their_worker_s_signed_statement() {
    use prost::Message as _;
    use provenance::action::{ActionDigest, ActionStatementInput};
    let test = "action_results_verify_against_their_worker_s_signed_statement";
    let Some(grid) = BuildGrid::start(test) else {
        return;
    };
    let channel = grid.channel().await;
    let mut cas = ContentAddressableStorageClient::new(channel.clone());
    let output = b"hello from a remote action\n".to_vec();
    let other = b"what an attacker put in the cache\n".to_vec();
    for blob in [&output, &other] {
        cas.batch_update_blobs(BatchUpdateBlobsRequest {
            instance_name: grid.instance.clone(),
            requests: vec![batch_update_blobs_request::Request {
                digest: Some(digest_of(blob)),
                data: blob.clone(),
                compressor: 0,
            }],
            digest_function: 0,
        })
        .await
        .unwrap();
    }
    let key = provenance::SigningKey::generate();
    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("worker.pub");
    std::fs::write(&public, key.public_key().to_spki_pem()).unwrap();
    let stranger = dir.path().join("stranger.pub");
    std::fs::write(
        &stranger,
        provenance::SigningKey::generate()
            .public_key()
            .to_spki_pem(),
    )
    .unwrap();

    let action = digest_of(b"the Action message of a genrule");
    let now = time::OffsetDateTime::now_utc();
    let envelope = ActionStatementInput {
        action: ActionDigest {
            sha256: action.hash.clone(),
            size_bytes: action.size_bytes,
        },
        input_root: ActionDigest {
            sha256: "ab".repeat(32),
            size_bytes: 0,
        },
        command: vec!["/bin/sh".into(), "-c".into(), "echo hello > out.txt".into()],
        environment: Default::default(),
        working_directory: String::new(),
        exit_code: 0,
        output_files: vec![("out.txt".into(), digest_of(&output).hash)],
        output_directories: vec![],
        sandbox_profile: "cd".repeat(32),
        image: serde_json::json!({"name": "host", "pinned": false}),
        network: serde_json::json!([]),
        worker: "kiln-worker-test/bot-0".into(),
        started_on: now,
        finished_on: now,
    }
    .sign(&key)
    .unwrap();
    let signed = Any {
        type_url: "type.googleapis.com/kiln.v1.SignedLink".into(),
        value: agent_proto::v1::SignedLink {
            dsse_envelope: envelope,
        }
        .encode_to_vec(),
    };
    let result = |blob: &[u8], statement: Option<&Any>| ActionResult {
        output_files: vec![OutputFile {
            path: "out.txt".into(),
            digest: Some(digest_of(blob)),
            ..Default::default()
        }],
        exit_code: 0,
        execution_metadata: Some(ExecutedActionMetadata {
            worker: "kiln-worker-test".into(),
            auxiliary_metadata: statement.into_iter().cloned().collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let action_cache = ActionCacheClient::new(channel);
    let store = |digest: Digest, result: ActionResult| {
        let instance_name = grid.instance.clone();
        let mut client = action_cache.clone();
        async move {
            client
                .update_action_result(UpdateActionResultRequest {
                    instance_name,
                    action_digest: Some(digest),
                    action_result: Some(result),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    };
    let replayed = digest_of(b"another action");
    let bare = digest_of(b"an action run by no Kiln worker");
    store(action.clone(), result(&output, Some(&signed))).await;
    store(replayed.clone(), result(&output, Some(&signed))).await;
    store(bare.clone(), result(&output, None)).await;

    let verify = |key: &std::path::Path, action: &Digest| {
        std::process::Command::new(support::KILN)
            .args(["verify", "--action-cache", &grid.url, "--key"])
            .arg(key)
            .arg(format!("{}/{}", action.hash, action.size_bytes))
            .output()
            .unwrap()
    };
    let out = verify(&public, &action);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("PASS, run by kiln-worker-test/bot-0"),
        "{}",
        describe(&out)
    );
    let out = verify(&stranger, &action);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let out = verify(&public, &replayed);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("is about action"),
        "{}",
        describe(&out)
    );
    let out = verify(&public, &bare);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("unattested"),
        "{}",
        describe(&out)
    );
    let out = verify(&public, &digest_of(b"never run"));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));

    // The cache entry changed: the output is another blob, the statement the same.
    store(action.clone(), result(&other, Some(&signed))).await;
    let out = verify(&public, &action);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(text(&out.stdout).contains("out.txt"), "{}", describe(&out));
}
