//! `kiln image pull` against registries on loopback: Debian's `docker-registry` holding an
//! image pushed here with the registry API (pulled by digest and run, by tag and pinned,
//! through an index), and a registry of the test's own that lies (a manifest that is not
//! the digest asked for, manifests larger than a document may be) or wants credentials.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use base64::Engine;
use sha2::{Digest, Sha256};
use support::registry::Registry;
use support::*;

const BUSYBOX: &str = "/bin/busybox";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One gzip layer: /bin/busybox, sh and echo.
fn busybox_layer() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    tar.append_data(&mut h, "bin", std::io::empty()).unwrap();
    let binary = std::fs::read(BUSYBOX).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(binary.len() as u64);
    tar.append_data(&mut h, "bin/busybox", binary.as_slice())
        .unwrap();
    for applet in ["sh", "echo", "cat"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    tar.into_inner().unwrap()
}

/// An image's blobs and manifest, as a registry holds them.
struct Image {
    config: Vec<u8>,
    layer: Vec<u8>,
    manifest: Vec<u8>,
}

fn image_for(arch: &str) -> Image {
    let tar = busybox_layer();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let layer = gz.finish().unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/bin", "GREETING=from-the-registry"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256(&tar))]},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{}", sha256(&config)),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{}", sha256(&layer)),
            "size": layer.len(),
        }],
    }))
    .unwrap();
    Image {
        config,
        layer,
        manifest,
    }
}

impl RegistryImage for Registry {
    fn push_image(&self, repo: &str, tag: &str, image: &Image) {
        self.push_blob(repo, &image.config);
        self.push_blob(repo, &image.layer);
        self.push_manifest(repo, tag, OCI_MANIFEST, &image.manifest);
    }
}

trait RegistryImage {
    fn push_image(&self, repo: &str, tag: &str, image: &Image);
}

/// `kiln image pull` with its own docker config directory (none of the host's).
fn pull(state: &Path, args: &[&str]) -> Output {
    let docker_config = tempfile::tempdir().unwrap();
    Command::new(KILN)
        .args(["image", "pull", "--state-dir"])
        .arg(state)
        .args(args)
        .env("DOCKER_CONFIG", docker_config.path())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn provenance_statement(links: &Path) -> serde_json::Value {
    let envelope = std::fs::read_dir(links)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".provenance.json"))
        .unwrap();
    let envelope: serde_json::Value =
        serde_json::from_slice(&std::fs::read(envelope).unwrap()).unwrap();
    let payload = base64::engine::general_purpose::STANDARD
        .decode(envelope["payload"].as_str().unwrap())
        .unwrap();
    serde_json::from_slice(&payload).unwrap()
}

#[test]
fn pulled_by_digest_tag_or_index_runs_pinned_and_is_recorded_with_its_registry() {
    let test = "pulled_by_digest_tag_or_index_runs_pinned_and_is_recorded_with_its_registry";
    if !require_root(test) {
        return;
    }
    let Some(registry) = Registry::start(test) else {
        return;
    };
    let image = image_for("amd64");
    let manifest = sha256(&image.manifest);
    registry.push_image("tools/bb", "1.0", &image);
    // An index for two platforms: the pull takes this host's, as an import does.
    let other = image_for("arm64");
    registry.push_image("tools/bb", "arm64", &other);
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": format!("sha256:{}", sha256(&other.manifest)),
             "size": other.manifest.len(), "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": OCI_MANIFEST, "digest": format!("sha256:{manifest}"),
             "size": image.manifest.len(), "platform": {"os": "linux", "architecture": "amd64"}},
        ],
    }))
    .unwrap();
    registry.push_manifest("tools/bb", "multi", OCI_INDEX, &index);

    let daemon = Daemon::start();
    let pinned_ref = format!("{}/tools/bb@sha256:{manifest}", registry.addr);
    let out = pull(&daemon.state, &[&pinned_ref]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), format!("bb@sha256:{manifest}\n"));

    let state = daemon.state.to_str().unwrap();
    let out = daemon.kiln(&["image", "inspect", "--state-dir", state, "bb"]);
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["source"], pinned_ref.as_str(), "{record}");
    assert_eq!(record["manifest_digest"], manifest.as_str());

    let out = daemon.kiln(&[
        "run",
        "--image",
        &format!("bb@sha256:{manifest}"),
        "--attest-dir",
        "links",
        "--output",
        "out.txt",
        "--out",
        "out",
        "--",
        "sh",
        "-c",
        "echo $GREETING | tee out.txt",
    ]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    assert_eq!(text(&out.stdout), "from-the-registry\n");
    let statement = provenance_statement(&daemon.path("links"));
    let deps = &statement["predicate"]["buildDefinition"]["resolvedDependencies"];
    let image_dep = deps
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["annotations"]["kind"] == "image")
        .unwrap();
    assert_eq!(image_dep["uri"], format!("oci://{pinned_ref}").as_str());
    assert_eq!(image_dep["digest"], serde_json::json!({"sha256": manifest}));
    assert_eq!(image_dep["annotations"]["source"], pinned_ref.as_str());

    // A tag is resolved once: the digest is printed and pinned.
    let tagged = format!("{}/tools/bb:1.0", registry.addr);
    let out = pull(&daemon.state, &[&tagged, "--name", "bbtag"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), format!("bbtag@sha256:{manifest}\n"));
    assert!(
        text(&out.stderr).contains(&format!("tag 1.0 is {pinned_ref}")),
        "{}",
        describe(&out)
    );
    let out = pull(
        &daemon.state,
        &[
            &format!("{}/tools/bb:multi", registry.addr),
            "--name",
            "bbmulti",
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), format!("bbmulti@sha256:{manifest}\n"));
    let out = daemon.kiln(&[
        "run",
        "--image",
        "bbmulti",
        "--",
        "sh",
        "-c",
        "echo $GREETING",
    ]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    assert_eq!(text(&out.stdout), "from-the-registry\n");
}

/// A registry of the test's own on loopback: `answer(path, authorization)` answers each
/// request (status, content type, body, whether to send Content-Length); every request's
/// path and Authorization header are kept.
struct FakeRegistry {
    addr: String,
    requests: Arc<Mutex<Vec<Request>>>,
}

/// A request's path and Authorization header.
type Request = (String, Option<String>);

type Answerer = dyn Fn(&str) -> (u16, &'static str, Vec<u8>, bool) + Send + Sync;

impl FakeRegistry {
    fn start(answer: Box<Answerer>) -> FakeRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut authorization = None;
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                        break;
                    }
                    if let Some((name, value)) = header.trim_end().split_once(':') {
                        if name.eq_ignore_ascii_case("authorization") {
                            authorization = Some(value.trim().to_string());
                        }
                    }
                }
                seen.lock().unwrap().push((path.clone(), authorization));
                let (status, content_type, body, with_length) = answer(&path);
                let mut head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nConnection: close\r\n"
                );
                if with_length {
                    head.push_str(&format!("Content-Length: {}\r\n", body.len()));
                }
                head.push_str("\r\n");
                let mut stream = reader.into_inner();
                // The client may hang up once it has seen enough.
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            }
        });
        FakeRegistry { addr, requests }
    }
}

#[test]
fn a_registry_that_lies_about_a_manifest_or_sends_too_much_is_refused() {
    let image = image_for("amd64");
    let asked = sha256(b"the manifest that was pinned");
    let served = image.manifest.clone();
    let registry = FakeRegistry::start(Box::new(move |path: &str| {
        let huge = || {
            let mut body = b"{\"schemaVersion\": 2, \"x\": \"".to_vec();
            body.resize(5 << 20, b'a');
            body
        };
        if path == "/v2/" {
            (200, "application/json", b"{}".to_vec(), true)
        } else if path.ends_with("/manifests/big") {
            (200, OCI_MANIFEST, huge(), true)
        } else if path.ends_with("/manifests/endless") {
            (200, OCI_MANIFEST, huge(), false)
        } else if path.contains("/manifests/") {
            (200, OCI_MANIFEST, served.clone(), true)
        } else {
            (404, "application/json", b"{}".to_vec(), true)
        }
    }));
    let state = tempfile::tempdir().unwrap();
    let auth_dir = tempfile::tempdir().unwrap();
    let auth_file = auth_dir.path().join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode("kiln:s3cret-pass");
    std::fs::write(
        &auth_file,
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#,
            registry.addr
        ),
    )
    .unwrap();

    // Pinned to one digest, answered with another manifest: refused, nothing fetched on.
    let out = pull(
        state.path(),
        &[
            &format!("{}/tools/bb@sha256:{asked}", registry.addr),
            "--registry-auth",
            auth_file.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success(), "{}", describe(&out));
    let err = text(&out.stderr);
    assert!(err.contains("digest does not match"), "{err}");
    assert!(
        !err.contains("s3cret") && !text(&out.stdout).contains("s3cret"),
        "{err}"
    );
    let requests = registry.requests.lock().unwrap().clone();
    assert!(
        requests.iter().all(|(path, _)| !path.contains("/blobs/")),
        "{requests:?}"
    );
    // The credentials went to the registry, and only there.
    let manifest_request = requests
        .iter()
        .find(|(path, _)| path.contains("/manifests/"))
        .unwrap();
    assert_eq!(
        manifest_request.1.as_deref(),
        Some(format!("Basic {auth}").as_str())
    );

    // More than a document may have, with or without a Content-Length: refused.
    for tag in ["big", "endless"] {
        let out = pull(
            state.path(),
            &[&format!("{}/tools/bb:{tag}", registry.addr)],
        );
        assert!(!out.status.success(), "{}", describe(&out));
        let err = text(&out.stderr);
        assert!(
            err.contains("larger than the 4194304 bytes"),
            "{tag}: {err}"
        );
    }
    let installed: Vec<PathBuf> = std::fs::read_dir(state.path().join("images"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(installed.is_empty(), "{installed:?}");
}

#[test]
fn plain_http_to_a_registry_off_loopback_is_refused_before_any_connection() {
    let state = tempfile::tempdir().unwrap();
    let digest = "ab".repeat(32);
    // `.invalid` never resolves; the refusal comes before any lookup or connection.
    let out = pull(
        state.path(),
        &[&format!(
            "http://registry.invalid:5000/tools/bb@sha256:{digest}"
        )],
    );
    assert!(!out.status.success(), "{}", describe(&out));
    let err = text(&out.stderr);
    assert!(err.contains("plain HTTP is refused"), "{err}");
    assert!(
        err.contains("--insecure-registry registry.invalid:5000"),
        "{err}"
    );
    // No implicit registry either.
    let out = pull(state.path(), &[&format!("library/busybox@sha256:{digest}")]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("not a registry"),
        "{}",
        describe(&out)
    );
}
