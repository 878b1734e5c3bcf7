//! The image of a remote action, real peers only: a `kiln worker` offers one of two
//! installed images in `[worker] images` and advertises it as its `container-image`
//! property. With BuildGrid matching on `container-image`, an action naming the offered
//! image runs in it (and its signed statement names its digest), while one naming the
//! other image is never handed to the worker. With `container-image` a wildcard key the
//! worker itself refuses what it does not offer (a tag, another digest, an offered name
//! with another digest, two images) with a clear status, and stays up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::longrunning;
use prost::Message;
use sha2::{Digest, Sha256};
use support::buildgrid::{digest_of, BuildGrid, BuildGridOptions};
use support::{describe, require_root, text, KILN};

/// What the offered image's marker file says (the host has no such file).
const OFFERED_MARKER: &str = "kiln offered image";

/// The longest a test waits for an action that should complete.
const ACTION_DEADLINE: Duration = Duration::from_secs(120);

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One layer: busybox as /bin/sh and /bin/cat, and /etc/kiln-marker saying `marker`.
fn layer(marker: &str) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for dir in ["bin", "etc"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        tar.append_data(&mut h, dir, std::io::empty()).unwrap();
    }
    let mut file = |path: &str, mode: u32, bytes: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_size(bytes.len() as u64);
        tar.append_data(&mut h, path, bytes).unwrap();
    };
    file(
        "bin/busybox",
        0o755,
        &std::fs::read("/bin/busybox").unwrap(),
    );
    file("etc/kiln-marker", 0o644, format!("{marker}\n").as_bytes());
    for applet in ["sh", "cat"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    tar.into_inner().unwrap()
}

/// An OCI image layout tagged `latest` whose marker says `marker`; answers its manifest
/// digest (hex).
fn write_layout(dir: &Path, marker: &str) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8], media_type: &str| {
        let hex = sha256(bytes);
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        serde_json::json!({"digest": format!("sha256:{hex}"), "size": bytes.len(), "mediaType": media_type})
    };
    let layer = layer(marker);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer).unwrap();
    let layer_desc = put(
        &gz.finish().unwrap(),
        "application/vnd.oci.image.layer.v1.tar+gzip",
    );
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256(&layer))]},
    }))
    .unwrap();
    let config_desc = put(&config, "application/vnd.oci.image.config.v1+json");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_desc],
    }))
    .unwrap();
    let mut manifest_desc = put(&manifest, "application/vnd.oci.image.manifest.v1+json");
    manifest_desc["annotations"] =
        serde_json::json!({"org.opencontainers.image.ref.name": "latest"});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [manifest_desc]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    sha256(&manifest)
}

/// Two images installed in a worker's state directory, the first offered.
struct Images {
    /// Manifest digests (hex).
    offered: String,
    other: String,
}

/// A `kiln worker` with one bot offering `tiny` (one of two installed images).
struct Worker {
    child: Child,
    log: PathBuf,
    state: PathBuf,
    _dir: tempfile::TempDir,
}

impl Worker {
    fn start(grid: &BuildGrid) -> (Worker, Images) {
        let dir = tempfile::Builder::new()
            .prefix("kiln-fleet-images-")
            .tempdir()
            .unwrap();
        // Traversable, as a daemon's state directory's parent would be.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .unwrap();
        let state = dir.path().join("state");
        let mut digests = Vec::new();
        for (name, marker) in [("tiny", OFFERED_MARKER), ("other", "kiln other image")] {
            let layout = dir.path().join(format!("{name}-layout"));
            let digest = write_layout(&layout, marker);
            let out = Command::new(KILN)
                .args(["image", "import", "--state-dir"])
                .arg(&state)
                .arg(format!("oci:{}:latest", layout.display()))
                .args(["--name", name])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", describe(&out));
            assert_eq!(text(&out.stdout).trim(), format!("{name}@sha256:{digest}"));
            digests.push(digest);
        }
        let images = Images {
            offered: digests[0].clone(),
            other: digests[1].clone(),
        };
        let config = dir.path().join("kiln.toml");
        std::fs::write(
            &config,
            format!(
                "[worker]\nimages = [\"docker://registry.example/kiln/tiny@sha256:{}\"]\n",
                images.offered
            ),
        )
        .unwrap();
        let log = dir.path().join("worker.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(KILN)
            .args([
                "worker",
                "--scheduler",
                &grid.url,
                "--bots",
                "1",
                "--config",
            ])
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .env("KILN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let worker = Worker {
            child,
            log,
            state,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !worker.log().contains("bot session created") {
            assert!(
                Instant::now() < deadline,
                "worker did not start:\n{}",
                worker.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        (worker, images)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The action digests (HEX/SIZE) this worker started.
    fn actions(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|line| line.contains("running an action"))
            .filter_map(|line| line.split("action=").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(|digest| digest.to_string())
            .collect()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap()),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.child.wait();
        }
    }
}

/// A client of the grid's REAPI services.
struct Client<'a> {
    grid: &'a BuildGrid,
    runtime: tokio::runtime::Runtime,
}

impl Client<'_> {
    fn new(grid: &BuildGrid) -> Client<'_> {
        Client {
            grid,
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    /// Uploads an action writing what `/etc/kiln-marker` holds to `out.txt`, whose
    /// Action platform has one `container-image` property per entry of `images`; answers
    /// its digest (HEX/SIZE) and the operation stream.
    fn start(
        &self,
        images: &[&str],
        salt: &str,
    ) -> (String, tonic::Streaming<longrunning::Operation>) {
        let command = reapi::Command {
            arguments: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("cat /etc/kiln-marker > out.txt # {salt}"),
            ],
            output_paths: vec!["out.txt".into()],
            ..Default::default()
        }
        .encode_to_vec();
        let root = reapi::Directory::default().encode_to_vec();
        let platform = reapi::Platform {
            properties: images
                .iter()
                .map(|image| reapi::platform::Property {
                    name: "container-image".into(),
                    value: image.to_string(),
                })
                .collect(),
        };
        let action = reapi::Action {
            command_digest: Some(digest_of(&command)),
            input_root_digest: Some(digest_of(&root)),
            platform: (!images.is_empty()).then_some(platform),
            ..Default::default()
        }
        .encode_to_vec();
        let digest = digest_of(&action);
        let stream = self
            .runtime
            .block_on(self.grid.execute(&action, &[&command, &root]));
        (format!("{}/{}", digest.hash, digest.size_bytes), stream)
    }

    /// The operation's first message (its name, while it waits).
    fn first(&self, stream: &mut tonic::Streaming<longrunning::Operation>) -> String {
        self.runtime
            .block_on(stream.message())
            .unwrap()
            .unwrap()
            .name
    }

    /// Follows the stream to its end; panics past ACTION_DEADLINE (a lost action).
    fn response(
        &self,
        mut stream: tonic::Streaming<longrunning::Operation>,
        worker: &Worker,
    ) -> reapi::ExecuteResponse {
        let last = self.runtime.block_on(async {
            tokio::time::timeout(ACTION_DEADLINE, async {
                let mut last = None;
                while let Some(operation) = stream.message().await.unwrap() {
                    last = Some(operation);
                }
                last
            })
            .await
        });
        let operation = last
            .unwrap_or_else(|_| {
                panic!(
                    "the action did not complete:\n{}\nBuildGrid:\n{}",
                    worker.log(),
                    self.grid.log()
                )
            })
            .unwrap();
        assert!(operation.done, "{operation:?}");
        match operation.result.unwrap() {
            longrunning::operation::Result::Response(any) => {
                reapi::ExecuteResponse::decode(any.value.as_slice()).unwrap()
            }
            other => panic!("{other:?}"),
        }
    }

    /// A blob of the grid's CAS.
    fn blob(&self, digest: &reapi::Digest) -> Vec<u8> {
        self.runtime.block_on(async {
            let channel = self.grid.channel().await;
            let answer =
                reapi::content_addressable_storage_client::ContentAddressableStorageClient::new(
                    channel,
                )
                .batch_read_blobs(reapi::BatchReadBlobsRequest {
                    instance_name: self.grid.instance.clone(),
                    digests: vec![digest.clone()],
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            answer.responses.into_iter().next().unwrap().data
        })
    }

    fn operation(&self, name: &str) -> longrunning::Operation {
        self.runtime.block_on(async {
            longrunning::operations_client::OperationsClient::new(self.grid.channel().await)
                .get_operation(longrunning::GetOperationRequest { name: name.into() })
                .await
                .unwrap()
                .into_inner()
        })
    }

    fn cancel(&self, name: &str) {
        self.runtime.block_on(async {
            longrunning::operations_client::OperationsClient::new(self.grid.channel().await)
                .cancel_operation(longrunning::CancelOperationRequest { name: name.into() })
                .await
                .unwrap()
        });
    }
}

/// The predicate of the statement the worker signed into `result`.
fn statement_predicate(result: &reapi::ActionResult) -> serde_json::Value {
    let metadata = result.execution_metadata.as_ref().unwrap();
    let signed = metadata
        .auxiliary_metadata
        .iter()
        .find(|any| any.type_url == "type.googleapis.com/kiln.v1.SignedLink")
        .unwrap();
    let link = agent_proto::v1::SignedLink::decode(signed.value.as_slice()).unwrap();
    let envelope: serde_json::Value = serde_json::from_slice(&link.dsse_envelope).unwrap();
    let payload = base64::engine::general_purpose::STANDARD
        .decode(envelope["payload"].as_str().unwrap())
        .unwrap();
    let statement: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    statement["predicate"].clone()
}

#[test]
fn buildgrid_routes_an_action_by_its_image_to_a_worker_that_offers_it() {
    let test = "buildgrid_routes_an_action_by_its_image_to_a_worker_that_offers_it";
    if !require_root(test) {
        return;
    }
    let Some(grid) = BuildGrid::start_with(
        test,
        BuildGridOptions {
            match_property_keys: vec!["container-image".into()],
            wildcard_property_keys: Vec::new(),
            ..Default::default()
        },
    ) else {
        return;
    };
    let (worker, images) = Worker::start(&grid);
    let client = Client::new(&grid);

    // First in the queue: an image the worker has installed but does not offer.
    let (unoffered, mut waiting) = client.start(
        &[&format!(
            "docker://registry.example/kiln/tiny@sha256:{}",
            images.other
        )],
        "unoffered",
    );
    let waiting_name = client.first(&mut waiting);
    // Then the image it offers, in the form it advertises: the idle bot takes this one,
    // so the engine did not give it the first.
    let (offered, stream) = client.start(
        &[&format!(
            "docker://registry.example/kiln/tiny@sha256:{}",
            images.offered
        )],
        "offered",
    );
    let response = client.response(stream, &worker);
    let status = response.status.unwrap_or_default();
    assert_eq!(status.code, 0, "{status:?}\n{}", worker.log());
    let result = response.result.unwrap();
    assert_eq!(result.exit_code, 0, "{}", worker.log());
    let out = client.blob(result.output_files[0].digest.as_ref().unwrap());
    assert_eq!(text(&out), format!("{OFFERED_MARKER}\n"));
    let predicate = statement_predicate(&result);
    assert_eq!(
        predicate["image"]["digest"]["sha256"], images.offered,
        "{predicate}"
    );
    assert_eq!(predicate["image"]["name"], "tiny", "{predicate}");

    assert_eq!(worker.actions(), vec![offered], "{}", worker.log());
    assert!(!worker.actions().contains(&unoffered));
    assert!(!client.operation(&waiting_name).done);
    client.cancel(&waiting_name);
    drop(waiting);
    // A last action shows the cancelled one was not handed over meanwhile either.
    let (after, stream) = client.start(&[], "after");
    let response = client.response(stream, &worker);
    assert_eq!(response.status.unwrap_or_default().code, 0);
    // No image named: the default (`host`), which has no marker file.
    assert_ne!(response.result.unwrap().exit_code, 0);
    assert_eq!(worker.actions().last(), Some(&after), "{}", worker.log());
    assert!(!worker.actions().contains(&unoffered), "{}", worker.log());
}

#[test]
fn a_worker_refuses_an_image_it_does_not_offer_and_stays_up() {
    let test = "a_worker_refuses_an_image_it_does_not_offer_and_stays_up";
    if !require_root(test) {
        return;
    }
    // `container-image` a wildcard key: BuildGrid hands any action to any bot.
    let Some(grid) = BuildGrid::start(test) else {
        return;
    };
    let (worker, images) = Worker::start(&grid);
    let client = Client::new(&grid);
    let (offered, other) = (&images.offered, &images.other);
    let state = worker.state.display().to_string();
    for (refs, code, needle) in [
        // Installed, but not in `[worker] images`.
        (
            vec![format!("sha256:{other}")],
            tonic::Code::FailedPrecondition,
            "does not offer",
        ),
        (
            vec![format!(
                "docker://registry.example/kiln/other@sha256:{other}"
            )],
            tonic::Code::FailedPrecondition,
            "does not offer",
        ),
        // The offered name held to another digest.
        (
            vec![format!("tiny@sha256:{other}")],
            tonic::Code::FailedPrecondition,
            "does not offer",
        ),
        // A tag names whatever it points to now.
        (
            vec!["docker://registry.example/kiln/tiny:latest".to_string()],
            tonic::Code::InvalidArgument,
            "not pinned by digest",
        ),
        (
            vec![format!(
                "docker://registry.example/kiln/tiny@sha256:{}",
                "A".repeat(64)
            )],
            tonic::Code::InvalidArgument,
            "digest",
        ),
        // Two images.
        (
            vec![format!("sha256:{offered}"), format!("sha256:{other}")],
            tonic::Code::InvalidArgument,
            "more than one image",
        ),
    ] {
        let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        let (_, stream) = client.start(&refs, "refused");
        let response = client.response(stream, &worker);
        let status = response.status.unwrap_or_default();
        assert_eq!(
            status.code,
            code as i32,
            "{refs:?}: {status:?}\n{}",
            worker.log()
        );
        assert!(status.message.contains(needle), "{refs:?}: {status:?}");
        assert!(!status.message.contains(&state), "{refs:?}: {status:?}");
        // Nothing ran: no result, and nothing in another image.
        assert!(
            response.result.is_none_or(|r| r.output_files.is_empty()),
            "{refs:?}"
        );
    }
    // Still up: the offered image, in Kiln's own form, runs.
    let (_, stream) = client.start(&[&format!("tiny@sha256:{offered}")], "offered");
    let response = client.response(stream, &worker);
    assert_eq!(
        response.status.unwrap_or_default().code,
        0,
        "{}",
        worker.log()
    );
    let result = response.result.unwrap();
    assert_eq!(result.exit_code, 0, "{}", worker.log());
    let out = client.blob(result.output_files[0].digest.as_ref().unwrap());
    assert_eq!(text(&out), format!("{OFFERED_MARKER}\n"));
    assert_eq!(
        statement_predicate(&result)["image"]["digest"]["sha256"],
        offered.as_str()
    );
    assert_eq!(worker.actions().len(), 7, "{}", worker.log());
}
