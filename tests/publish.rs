//! Publishing to an OCI registry and verifying before deployment, against Debian's
//! `docker-registry` on loopback and `skopeo`: the daemon pushes a job's outputs and
//! attestations (on `kiln push` and for a job file's `[publish]`), a second client verifies
//! by digest and downloads; a tampered layer, a tampered or forged attestation, and a
//! repository the caller may not publish to all fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::registry::{http, Registry};
use support::*;

const SKOPEO: &str = "/usr/bin/skopeo";
const BUNDLE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A daemon that may publish below `REGISTRY/builds/` only, signing with keys of
/// `key_type`.
fn daemon_publishing_to(registry: &Registry, key_type: &str) -> (Daemon, tempfile::NamedTempFile) {
    let config = config_file(&format!(
        "socket_gid = 65534\nkey_type = \"{key_type}\"\n[publish]\nrepositories = [\"{}/builds/*\"]\ntimeout_seconds = 120\n",
        registry.addr
    ));
    let daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    (daemon, config)
}

/// The registry and a daemon publishing to it, for `test`; None when the test skips.
fn setup(test: &str, key_type: &str) -> Option<(Registry, Daemon, tempfile::NamedTempFile)> {
    if !require_root(test) {
        return None;
    }
    let registry = Registry::start(test)?;
    let (daemon, config) = daemon_publishing_to(&registry, key_type);
    Some((registry, daemon, config))
}

/// A two-step job with two outputs, one of them executable; answers its id once it is done.
fn build(daemon: &Daemon, publish: Option<&str>) -> String {
    let publish = publish
        .map(|r| format!("[publish]\nrepository = \"{r}\"\n"))
        .unwrap_or_default();
    std::fs::write(
        daemon.path("job.toml"),
        format!(
            r#"name = "publish"
{publish}
[[steps]]
name = "make"
run = ["/bin/sh", "-c", "mkdir -p bin && printf '#!/bin/sh\necho hi\n' > bin/tool && chmod 755 bin/tool"]
[[steps]]
name = "report"
run = ["/bin/sh", "-c", "head -c 300000 /dev/urandom > report.bin"]
[[outputs]]
path = "bin/tool"
[[outputs]]
path = "report.bin"
"#
        ),
    )
    .unwrap();
    let out = daemon.kiln(&["submit", "--detach", "job.toml"]);
    assert!(out.status.success(), "{}", describe(&out));
    let id = text(&out.stdout).trim().to_string();
    wait_for_end(daemon, &id);
    id
}

fn status(daemon: &Daemon, id: &str) -> Value {
    let out = daemon.kiln(&["status", "--json", id]);
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn wait_for_end(daemon: &Daemon, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let job = status(daemon, id);
        if !matches!(job["state"].as_str(), Some("queued" | "running")) {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} did not end: {job}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The runner's public key and a policy for the job, in the daemon's directory.
fn trust(daemon: &Daemon) -> (PathBuf, PathBuf) {
    let key = daemon.kiln(&["keys", "public"]);
    assert!(key.status.success(), "{}", describe(&key));
    let runner_pub = daemon.path("runner.pub");
    std::fs::write(&runner_pub, &key.stdout).unwrap();
    let policy = daemon.path("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "allowed_builder_ids = [{:?}]\nallow_unpinned_images = true\nrequired_steps = [\"make\", \"report\"]\n",
            provenance::slsa::default_builder_id()
        ),
    )
    .unwrap();
    (runner_pub, policy)
}

/// `kiln` as a deployer runs it: no daemon, its own (empty) docker config.
fn deployer(args: &[&str]) -> Output {
    let docker_config = tempfile::tempdir().unwrap();
    Command::new(KILN)
        .args(args)
        .env("DOCKER_CONFIG", docker_config.path())
        .output()
        .unwrap()
}

fn verify_image(reference: &str, runner_pub: &Path, policy: &Path) -> Output {
    deployer(&[
        "verify",
        "--image",
        reference,
        "--key",
        runner_pub.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
        "--json",
    ])
}

fn verdict(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", describe(out)))
}

/// A manifest or blob as the registry answers it.
fn get(registry: &Registry, path: &str, accept: &str) -> Vec<u8> {
    let answer = http(&registry.addr, "GET", path, &[("Accept", accept)], b"");
    assert_eq!(answer.status, 200, "{path}: {}", text(&answer.body));
    answer.body
}

/// Where the registry keeps blob `hex`.
fn blob_file(registry: &Registry, hex: &str) -> PathBuf {
    registry
        .storage
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

fn artifact_hex(reference: &str) -> String {
    reference.rsplit_once("@sha256:").unwrap().1.to_string()
}

#[test]
fn a_pushed_job_verifies_by_digest_and_downloads_for_a_second_client() {
    let test = "a_pushed_job_verifies_by_digest_and_downloads_for_a_second_client";
    let Some((registry, daemon, _config)) = setup(test, "ed25519") else {
        return;
    };
    let id = build(&daemon, None);
    let job = status(&daemon, &id);
    assert_eq!(job["state"], "succeeded", "{job}");

    let repository = format!("{}/builds/app", registry.addr);
    let out = daemon.kiln(&["push", &id, &format!("{repository}:v1")]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    let reference = text(&out.stdout).trim().to_string();
    assert!(
        reference.starts_with(&format!("{repository}@sha256:")),
        "{reference}"
    );
    let hex = artifact_hex(&reference);

    // The artifact: one layer per output, its path as the title, the tag on it.
    let manifest: Value =
        serde_json::from_slice(&get(&registry, "/v2/builds/app/manifests/v1", OCI_MANIFEST))
            .unwrap();
    assert_eq!(manifest["artifactType"], "application/vnd.kiln.artifact.v1");
    let titles: Vec<&str> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l["annotations"]["org.opencontainers.image.title"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(titles, ["bin/tool", "report.bin"]);
    // The referrers tag schema lists the bundles: provenance, two links.
    let index: Value = serde_json::from_slice(&get(
        &registry,
        &format!("/v2/builds/app/manifests/sha256-{hex}"),
        "application/vnd.oci.image.index.v1+json",
    ))
    .unwrap();
    let kinds: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .inspect(|m| assert_eq!(m["artifactType"], BUNDLE, "{m}"))
        .map(|m| m["annotations"]["dev.kiln.attestation"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["provenance", "link", "link"], "{index}");
    // cosign's tag holds the DSSE envelopes.
    let cosign: Value = serde_json::from_slice(&get(
        &registry,
        &format!("/v2/builds/app/manifests/sha256-{hex}.att"),
        OCI_MANIFEST,
    ))
    .unwrap();
    assert_eq!(cosign["layers"].as_array().unwrap().len(), 3, "{cosign}");
    assert_eq!(
        cosign["layers"][0]["annotations"]["predicateType"],
        "https://slsa.dev/provenance/v1"
    );

    // npm's @sigstore/verify accepts the provenance bundle as the registry serves it.
    if let Some(package) = sigstore_verify(test) {
        let referrer: Value = serde_json::from_slice(&get(
            &registry,
            &format!(
                "/v2/builds/app/manifests/{}",
                index["manifests"][0]["digest"].as_str().unwrap()
            ),
            OCI_MANIFEST,
        ))
        .unwrap();
        let bundle = get(
            &registry,
            &format!(
                "/v2/builds/app/blobs/{}",
                referrer["layers"][0]["digest"].as_str().unwrap()
            ),
            BUNDLE,
        );
        let bundle_file = daemon.path("provenance.sigstore.json");
        std::fs::write(&bundle_file, &bundle).unwrap();
        let keyid = serde_json::from_slice::<Value>(&bundle).unwrap()["verificationMaterial"]
            ["publicKey"]["hint"]
            .as_str()
            .unwrap()
            .to_string();
        let (runner_pub, _) = trust(&daemon);
        let out = run_sigstore_verify(&package, &bundle_file, &runner_pub, &keyid);
        assert!(out.status.success(), "{}", describe(&out));
    }

    // skopeo reads the artifact as the registry serves it.
    if Path::new(SKOPEO).is_file() {
        let out = Command::new(SKOPEO)
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{reference}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        assert_eq!(sha256(&out.stdout), hex, "skopeo read other bytes");
    } else {
        assert!(!in_ci(), "CI=true but {SKOPEO} is missing");
    }

    // A second client: verify by digest, then download.
    let (runner_pub, policy) = trust(&daemon);
    let out = verify_image(&reference, &runner_pub, &policy);
    assert!(out.status.success(), "{}", describe(&out));
    let seen = verdict(&out);
    assert_eq!(seen["passed"], true, "{seen}");
    assert_eq!(seen["outputs"], json!(["bin/tool", "report.bin"]));
    let dest = daemon.path("deployed");
    let out = deployer(&[
        "pull-artifact",
        &reference,
        "--out",
        dest.to_str().unwrap(),
        "--key",
        runner_pub.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    for output in job["outputs"].as_array().unwrap() {
        let path = dest.join(output["path"].as_str().unwrap());
        assert_eq!(sha256(&std::fs::read(&path).unwrap()), output["digest"]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        let executable = output["executable"].as_bool().unwrap_or(false);
        assert_eq!(mode, if executable { 0o755 } else { 0o644 }, "{output}");
    }
    // A tag is not a deployable name: it can be moved.
    let out = verify_image(&format!("{repository}:v1"), &runner_pub, &policy);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("by digest"),
        "{}",
        describe(&out)
    );
    // Another key is not the runner's.
    let other = daemon.path("other.pub");
    std::fs::write(&other, OTHER_PUB).unwrap();
    let out = verify_image(&reference, &other, &policy);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(verdict(&out)["passed"], false);
}

/// An ed25519 key that signed nothing here.
const OTHER_PUB: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";

#[test]
fn tampered_layers_and_attestations_in_the_registry_fail_verification() {
    let test = "tampered_layers_and_attestations_in_the_registry_fail_verification";
    // Signed with a P-256 key: the verdict does not depend on the key type.
    let Some((registry, daemon, _config)) = setup(test, "ecdsa-p256") else {
        return;
    };
    let key = daemon.kiln(&["keys", "public", "--format", "securesystemslib"]);
    let key: Value = serde_json::from_slice(&key.stdout).unwrap();
    assert_eq!(key["keytype"], "ecdsa", "{key}");
    let id = build(&daemon, None);
    let (runner_pub, policy) = trust(&daemon);
    let push = |repo: &str| {
        let out = daemon.kiln(&["push", &id, &format!("{}/builds/{repo}", registry.addr)]);
        assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
        text(&out.stdout).trim().to_string()
    };
    let reference = push("layer");
    let manifest: Value = serde_json::from_slice(&get(
        &registry,
        &format!(
            "/v2/builds/layer/manifests/sha256:{}",
            artifact_hex(&reference)
        ),
        OCI_MANIFEST,
    ))
    .unwrap();
    assert!(verify_image(&reference, &runner_pub, &policy)
        .status
        .success());

    // A layer's bytes changed in the registry's storage.
    let layer_hex = manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    flip_byte(&blob_file(&registry, &layer_hex));
    let out = verify_image(&reference, &runner_pub, &policy);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let seen = verdict(&out);
    let reasons = seen["reasons"].to_string();
    assert!(reasons.contains("report.bin"), "{seen}");
    let dest = daemon.path("tampered");
    let out = deployer(&[
        "pull-artifact",
        &reference,
        "--out",
        dest.to_str().unwrap(),
        "--key",
        runner_pub.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        !dest.exists() || std::fs::read_dir(&dest).unwrap().next().is_none(),
        "a tampered artifact left files behind"
    );
    flip_byte(&blob_file(&registry, &layer_hex));
    assert!(verify_image(&reference, &runner_pub, &policy)
        .status
        .success());

    // The provenance bundle's bytes changed.
    let hex = artifact_hex(&reference);
    let index: Value = serde_json::from_slice(&get(
        &registry,
        &format!("/v2/builds/layer/manifests/sha256-{hex}"),
        "application/vnd.oci.image.index.v1+json",
    ))
    .unwrap();
    let referrer: Value = serde_json::from_slice(&get(
        &registry,
        &format!(
            "/v2/builds/layer/manifests/{}",
            index["manifests"][0]["digest"].as_str().unwrap()
        ),
        OCI_MANIFEST,
    ))
    .unwrap();
    let bundle_hex = referrer["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let bundle_file = blob_file(&registry, &bundle_hex);
    let original = std::fs::read(&bundle_file).unwrap();
    let mut forged: Value = serde_json::from_slice(&original).unwrap();
    forged["dsseEnvelope"]["payload"] = json!("e30=");
    std::fs::write(&bundle_file, serde_json::to_vec(&forged).unwrap()).unwrap();
    let out = verify_image(&reference, &runner_pub, &policy);
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        describe(&out).contains(&bundle_hex),
        "the failure names the bundle: {}",
        describe(&out)
    );
    std::fs::write(&bundle_file, &original).unwrap();

    // A forged provenance pushed as a new referrer, its bundle consistent with its digest
    // but its signature not the runner's: the verdict fails, it does not pick the good one.
    let forged_bundle = serde_json::to_vec(&forged).unwrap();
    registry.push_blob("builds/layer", &forged_bundle);
    let mut forged_referrer = referrer.clone();
    forged_referrer["layers"][0]["digest"] = json!(format!("sha256:{}", sha256(&forged_bundle)));
    forged_referrer["layers"][0]["size"] = json!(forged_bundle.len());
    let forged_referrer = serde_json::to_vec(&forged_referrer).unwrap();
    let forged_hex = sha256(&forged_referrer);
    registry.push_manifest(
        "builds/layer",
        &format!("sha256:{forged_hex}"),
        OCI_MANIFEST,
        &forged_referrer,
    );
    let mut index = index.clone();
    let mut entry = index["manifests"][0].clone();
    entry["digest"] = json!(format!("sha256:{forged_hex}"));
    entry["size"] = json!(forged_referrer.len());
    index["manifests"].as_array_mut().unwrap().push(entry);
    registry.push_manifest(
        "builds/layer",
        &format!("sha256-{hex}"),
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&index).unwrap(),
    );
    let out = verify_image(&reference, &runner_pub, &policy);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let seen = verdict(&out);
    assert!(seen["reasons"].to_string().contains("provenance"), "{seen}");
}

#[test]
fn publishing_is_only_where_the_configuration_allows_and_a_job_file_publishes_on_success() {
    let test =
        "publishing_is_only_where_the_configuration_allows_and_a_job_file_publishes_on_success";
    let Some((registry, daemon, _config)) = setup(test, "ed25519") else {
        return;
    };
    let id = build(&daemon, None);
    for (repository, words) in [
        (format!("{}/elsewhere/app", registry.addr), "does not list"),
        (format!("{}/builds", registry.addr), "does not list"),
        (
            format!("{}/builds/app@sha256:{}", registry.addr, "0".repeat(64)),
            "not a digest",
        ),
        ("registry.example/builds/app".to_string(), "does not list"),
    ] {
        let out = daemon.kiln(&["push", &id, &repository]);
        assert!(!out.status.success(), "{repository}");
        assert!(
            describe(&out).contains(words),
            "{repository}: {}",
            describe(&out)
        );
    }
    // Another client's job is not there for it.
    let out = run_as(
        65534,
        &[
            KILN,
            "--socket",
            daemon.socket.to_str().unwrap(),
            "push",
            &id,
            &format!("{}/builds/theirs", registry.addr),
        ],
    );
    assert!(!out.status.success(), "{}", describe(&out));

    // A job file's [publish]: the daemon publishes when the job succeeds.
    let repository = format!("{}/builds/auto:latest-build", registry.addr);
    let id = build(&daemon, Some(&repository));
    let job = status(&daemon, &id);
    assert_eq!(job["state"], "succeeded", "{job}\n{}", daemon.log());
    let published = job["published"].as_str().unwrap().to_string();
    assert!(
        published.starts_with(&format!("{}/builds/auto@sha256:", registry.addr)),
        "{job}"
    );
    let (runner_pub, policy) = trust(&daemon);
    assert!(verify_image(&published, &runner_pub, &policy)
        .status
        .success());
    // One that may not publish there is refused at submit.
    std::fs::write(
        daemon.path("bad.toml"),
        format!(
            "[publish]\nrepository = \"{}/elsewhere/x\"\n[[steps]]\nname = \"s\"\nrun = [\"/bin/true\"]\n",
            registry.addr
        ),
    )
    .unwrap();
    let out = daemon.kiln(&["submit", "--detach", "bad.toml"]);
    assert!(!out.status.success());
    assert!(
        describe(&out).contains("[publish] repositories"),
        "{}",
        describe(&out)
    );
    // A registry that is down fails the job, saying why.
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = down.local_addr().unwrap().port();
    drop(down);
    let config = config_file(&format!(
        "[publish]\nrepositories = [\"127.0.0.1:{port}/builds/*\"]\ntimeout_seconds = 30\n"
    ));
    let mut daemon = daemon;
    daemon.stop();
    daemon.spawn(&["--config", config.path().to_str().unwrap()]);
    let id = build(&daemon, Some(&format!("127.0.0.1:{port}/builds/x")));
    let job = status(&daemon, &id);
    assert_eq!(job["state"], "failed", "{job}");
    assert!(
        job["message"].as_str().unwrap().contains("publishing to"),
        "{job}"
    );
}

/// `kiln:s3cret`, as docker-registry's htpasswd holds it (bcrypt at its lowest cost: the
/// registry checks it on every request).
const HTPASSWD: &str = "kiln:$2b$04$BPyEXh419hajnKxY7pL1aemw39UpkG.Yz.AXRSBOANlfh6DPPjbl6\n";

#[test]
fn credentials_come_from_the_daemon_s_auth_file_and_the_deployer_s_docker_config() {
    let test = "credentials_come_from_the_daemon_s_auth_file_and_the_deployer_s_docker_config";
    if !require_root(test) {
        return;
    }
    let Some(registry) = Registry::start_with_users(test, Some(HTPASSWD)) else {
        return;
    };
    let docker_config = tempfile::tempdir().unwrap();
    let auth = docker_config.path().join("config.json");
    std::fs::write(
        &auth,
        json!({"auths": {registry.addr.clone(): {"auth": "a2lsbjpzM2NyZXQ="}}}).to_string(),
    )
    .unwrap();
    let publish = format!(
        "[publish]\nrepositories = [\"{}/builds/*\"]\ntimeout_seconds = 60\n",
        registry.addr
    );
    // Without credentials the registry refuses the daemon, and the job says so.
    let anonymous = config_file(&publish);
    let mut daemon = Daemon::start_with(&["--config", anonymous.path().to_str().unwrap()]);
    let id = build(&daemon, None);
    let repository = format!("{}/builds/private", registry.addr);
    let out = daemon.kiln(&["push", &id, &repository]);
    assert!(!out.status.success());
    assert!(
        describe(&out).contains("401") || describe(&out).to_lowercase().contains("unauthorized"),
        "{}",
        describe(&out)
    );

    let with_auth = config_file(&format!(
        "{publish}auth_file = {:?}\n",
        auth.display().to_string()
    ));
    daemon.stop();
    daemon.spawn(&["--config", with_auth.path().to_str().unwrap()]);
    let out = daemon.kiln(&["push", &id, &repository]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    let reference = text(&out.stdout).trim().to_string();
    let (runner_pub, policy) = trust(&daemon);
    // The deployer without credentials is refused; with its docker config it verifies.
    let out = verify_image(&reference, &runner_pub, &policy);
    assert!(!out.status.success(), "{}", describe(&out));
    let out = deployer(&[
        "verify",
        "--image",
        &reference,
        "--key",
        runner_pub.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
        "--registry-auth",
        auth.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    // The daemon's credentials file is its own: a client never sees its path.
    std::fs::write(&auth, "not json").unwrap();
    let out = daemon.kiln(&["push", &id, &repository]);
    assert!(!out.status.success());
    assert!(
        describe(&out).contains("[publish] auth_file"),
        "{}",
        describe(&out)
    );
    assert!(
        !describe(&out).contains(&auth.display().to_string()),
        "{}",
        describe(&out)
    );
}
