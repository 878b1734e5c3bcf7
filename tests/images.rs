//! Imported OCI images end to end: an image built here from the busybox binary, written
//! as an OCI layout and as a Docker archive, imported with `kiln image import`, run pinned
//! by digest with its config's Env, recorded in the link and the provenance, checked by
//! `kiln verify --provenance`, and held to the operator's `[images] allowed`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use sha2::{Digest, Sha256};
use support::*;

const BUSYBOX: &str = "/bin/busybox";

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One layer: /bin/busybox and its applets, a minimal /etc.
fn busybox_layer() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let dir = |path: &str, tar: &mut tar::Builder<Vec<u8>>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        tar.append_data(&mut h, path, std::io::empty()).unwrap();
    };
    dir("bin", &mut tar);
    dir("etc", &mut tar);
    let binary = std::fs::read(BUSYBOX).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(binary.len() as u64);
    tar.append_data(&mut h, "bin/busybox", binary.as_slice())
        .unwrap();
    for applet in ["sh", "echo", "cat", "env", "test", "true", "sleep"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    let passwd = b"root:x:0:0:root:/root:/bin/sh\nbuild:x:1000:1000::/workspace:/bin/sh\n";
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(passwd.len() as u64);
    tar.append_data(&mut h, "etc/passwd", passwd.as_slice())
        .unwrap();
    tar.into_inner().unwrap()
}

fn config_json(layer_tar: &[u8]) -> Vec<u8> {
    config_json_greeting(layer_tar, "from-image-config")
}

fn config_json_greeting(layer_tar: &[u8], greeting: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin", format!("GREETING={greeting}"), "OVERRIDE=image"],
            "WorkingDir": "/nonexistent",
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256(layer_tar))]},
    }))
    .unwrap()
}

/// An OCI image layout (gzip layer) tagged `latest`; answers its manifest digest.
fn write_oci_layout(dir: &Path) -> String {
    write_oci_layout_greeting(dir, "from-image-config")
}

fn write_oci_layout_greeting(dir: &Path, greeting: &str) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let hex = sha256(bytes);
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        serde_json::json!({"digest": format!("sha256:{hex}"), "size": bytes.len()})
    };
    let layer = busybox_layer();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer).unwrap();
    let gz = gz.finish().unwrap();
    let mut layer_desc = put(&gz);
    layer_desc["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip".into();
    let mut config_desc = put(&config_json_greeting(&layer, greeting));
    config_desc["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [layer_desc],
    }))
    .unwrap();
    let mut manifest_desc = put(&manifest);
    manifest_desc["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
    manifest_desc["annotations"] =
        serde_json::json!({"org.opencontainers.image.ref.name": "latest"});
    manifest_desc["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [manifest_desc]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    sha256(&manifest)
}

/// What `docker save` writes for the same image (an uncompressed layer).
fn write_docker_archive(path: &Path) {
    let layer = busybox_layer();
    let config = config_json(&layer);
    let (config_name, layer_name) = (
        format!("{}.json", sha256(&config)),
        format!("{}/layer.tar", sha256(&layer)),
    );
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name,
        "RepoTags": ["example.org/tools/bbdocker:1.36"],
        "Layers": [layer_name],
    }]))
    .unwrap();
    let mut tar = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, bytes) in [
        (config_name.as_str(), &config),
        (layer_name.as_str(), &layer),
        ("manifest.json", &manifest),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(bytes.len() as u64);
        tar.append_data(&mut h, name, bytes.as_slice()).unwrap();
    }
    tar.finish().unwrap();
}

fn import(daemon: &Daemon, args: &[&str]) -> String {
    let state = daemon.state.to_str().unwrap();
    let mut all = vec!["image", "import", "--state-dir", state];
    all.extend(args);
    let out = daemon.kiln(&all);
    assert!(out.status.success(), "{}", describe(&out));
    text(&out.stdout).trim().to_string()
}

fn only_file(dir: &Path, suffix: &str) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_str().unwrap().ends_with(suffix))
        .unwrap_or_else(|| panic!("no {suffix} in {}", dir.display()))
}

#[test]
fn imported_images_run_pinned_with_their_env_and_are_recorded_and_allow_listed() {
    if !require_root("imported_images_run_pinned_with_their_env_and_are_recorded_and_allow_listed")
    {
        return;
    }
    let config = config_file("[images]\nallowed = [\"bb\", \"host\"]\n");
    let daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("bb-oci");
    let manifest = write_oci_layout(&layout);
    let archive = work.path().join("bb-docker.tar");
    write_docker_archive(&archive);

    let oci_source = format!("oci:{}:latest", layout.display());
    let pinned = import(&daemon, &[&oci_source, "--name", "bb"]);
    assert_eq!(pinned, format!("bb@sha256:{manifest}"));
    let docker_pinned = import(&daemon, &[&format!("docker-archive:{}", archive.display())]);
    let docker_digest = docker_pinned
        .strip_prefix("bbdocker@sha256:")
        .unwrap_or_else(|| panic!("{docker_pinned}"))
        .to_string();

    let state = daemon.state.to_str().unwrap();
    let out = daemon.kiln(&["image", "list", "--state-dir", state]);
    let listing = text(&out.stdout);
    assert!(
        listing.contains(&format!("bb               sha256:{manifest}")),
        "{listing}"
    );
    assert!(listing.contains("bbdocker"), "{listing}");
    let out = daemon.kiln(&["image", "inspect", "--state-dir", state, &pinned]);
    assert!(out.status.success(), "{}", describe(&out));
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["manifest_digest"], manifest.as_str());
    assert_eq!(record["source"], "oci:bb-oci:latest");
    let tree = record["tree_digest"].as_str().unwrap().to_string();

    // Pinned by digest; the image config's Env is the default, the job's env wins.
    let out = daemon.kiln(&[
        "run",
        "--image",
        &pinned,
        "--env",
        "OVERRIDE=job",
        "--attest-dir",
        "links",
        "--output",
        "out.txt",
        "--out",
        "out",
        "--",
        "sh",
        "-c",
        "echo \"$GREETING $OVERRIDE $PATH $(pwd)\" > out.txt; cat out.txt",
    ]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    assert_eq!(text(&out.stdout), "from-image-config job /bin /workspace\n");

    let link = signed_link(&daemon.path("links"), "run");
    let image = &link["environment"]["image"];
    assert_eq!(image["name"], "bb", "{image}");
    assert_eq!(image["digest"]["sha256"], manifest.as_str(), "{image}");
    assert_eq!(image["manifest_digest"]["sha256"], manifest.as_str());
    assert_eq!(image["tree_digest"]["sha256"], tree.as_str());

    let envelope = only_file(&daemon.path("links"), ".provenance.json");
    let envelope_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&envelope).unwrap()).unwrap();
    let payload = base64::engine::general_purpose::STANDARD
        .decode(envelope_json["payload"].as_str().unwrap())
        .unwrap();
    let statement: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    let deps = &statement["predicate"]["buildDefinition"]["resolvedDependencies"];
    let image_dep = deps
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["annotations"]["kind"] == "image")
        .unwrap();
    assert_eq!(
        image_dep["uri"],
        format!("pkg:oci/bb@sha256%3A{manifest}?arch=amd64").as_str()
    );
    assert_eq!(image_dep["digest"], serde_json::json!({"sha256": manifest}));
    assert_eq!(image_dep["annotations"]["source"], "oci:bb-oci:latest");
    assert_eq!(
        image_dep["annotations"]["treeDigest"]["sha256"],
        tree.as_str()
    );

    // A policy names the image by digest, or by name and digest.
    let runner_pub = daemon.path("runner.pub");
    let key = daemon.kiln(&["keys", "public"]);
    std::fs::write(&runner_pub, &key.stdout).unwrap();
    let builder = statement["predicate"]["runDetails"]["builder"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let verify = |allowed: &str| {
        let policy = daemon.path("policy.toml");
        std::fs::write(
            &policy,
            format!("allowed_builder_ids = [{builder:?}]\nallowed_images = [{allowed:?}]\n"),
        )
        .unwrap();
        daemon.kiln(&[
            "verify",
            "--provenance",
            envelope.to_str().unwrap(),
            "--key",
            runner_pub.to_str().unwrap(),
            "--policy",
            policy.to_str().unwrap(),
            daemon.path("out/out.txt").to_str().unwrap(),
        ])
    };
    for allowed in [
        format!("sha256:{manifest}"),
        format!("bb@sha256:{manifest}"),
    ] {
        let out = verify(&allowed);
        assert!(out.status.success(), "{allowed}: {}", describe(&out));
    }
    let out = verify(&format!("sha256:{tree}"));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("not in allowed_images"),
        "{}",
        describe(&out)
    );

    // Not in `[images] allowed`: refused at Submit, naming the image.
    for refused in ["bbdocker".to_string(), format!("sha256:{docker_digest}")] {
        let out = daemon.kiln(&["run", "--image", &refused, "--", "true"]);
        assert!(!out.status.success(), "{}", describe(&out));
        let err = text(&out.stderr);
        assert!(err.contains("PermissionDenied"), "{err}");
        assert!(err.contains(&format!("image {refused:?}")), "{err}");
        assert!(err.contains("[images] allowed"), "{err}");
    }
    // A name pinned to a digest it no longer has is not run.
    let out = daemon.kiln(&[
        "run",
        "--image",
        &format!("bb@sha256:{docker_digest}"),
        "--",
        "true",
    ]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("not the sha256"),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_docker_archive_runs_by_digest_and_rm_uninstalls_it() {
    if !require_root("a_docker_archive_runs_by_digest_and_rm_uninstalls_it") {
        return;
    }
    let daemon = Daemon::start();
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("tools.tar");
    write_docker_archive(&archive);
    let source = format!("docker-archive:{}", archive.display());
    let pinned = import(&daemon, &[&source, "--name", "tools"]);
    let digest = pinned.strip_prefix("tools@").unwrap().to_string();
    // The same archive always gives the same manifest digest.
    assert_eq!(
        import(&daemon, &[&source, "--name", "tools2"]),
        format!("tools2@{digest}")
    );

    let out = daemon.kiln(&[
        "run",
        "--image",
        &digest,
        "--",
        "sh",
        "-c",
        "echo $GREETING",
    ]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    assert_eq!(text(&out.stdout), "from-image-config\n");

    let state = daemon.state.to_str().unwrap();
    let out = daemon.kiln(&["image", "rm", "--state-dir", state, "tools"]);
    assert!(out.status.success(), "{}", describe(&out));
    // tools2 still names the tree.
    let out = daemon.kiln(&["run", "--image", "tools2", "--", "true"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = daemon.kiln(&["image", "rm", "--state-dir", state, "tools2"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = daemon.kiln(&["run", "--image", &digest, "--", "true"]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("not installed"),
        "{}",
        describe(&out)
    );
    let leftovers: Vec<_> = std::fs::read_dir(daemon.state.join("images/.oci"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn status_json(daemon: &Daemon, id: &str) -> serde_json::Value {
    let out = daemon.kiln(&["status", "--json", id]);
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn submit_detached(daemon: &Daemon, dir: &Path, name: &str, image: &str, argv: &str) -> String {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(
        &file,
        format!("name = \"{name}\"\nimage = \"{image}\"\n[[steps]]\nname = \"s\"\nrun = {argv}\n"),
    )
    .unwrap();
    let out = daemon.kiln(&["submit", "--detach", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
    text(&out.stdout).trim().to_string()
}

#[test]
fn an_image_swapped_after_submit_is_refused_when_the_job_starts() {
    if !require_root("an_image_swapped_after_submit_is_refused_when_the_job_starts") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (first, second) = (work.path().join("first"), work.path().join("second"));
    let allowed = write_oci_layout(&first);
    let swapped = write_oci_layout_greeting(&second, "swapped");
    assert_ne!(allowed, swapped);
    let config = config_file(&format!(
        "max_concurrent_jobs = 1\n[images]\nallowed = [\"bb@sha256:{allowed}\", \"host\"]\n"
    ));
    let daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    import(
        &daemon,
        &[&format!("oci:{}", first.display()), "--name", "bb"],
    );

    // The one job slot is taken; the job on `bb` is allowed when it is submitted ...
    let blocker = submit_detached(
        &daemon,
        work.path(),
        "blocker",
        "host",
        r#"["sleep", "60"]"#,
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while status_json(&daemon, &blocker)["state"] != "running" {
        assert!(
            std::time::Instant::now() < deadline,
            "the blocker never ran"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let queued = submit_detached(&daemon, work.path(), "queued", "bb", r#"["true"]"#);
    // ... then `bb` names another image: the job is refused when it starts.
    import(
        &daemon,
        &[&format!("oci:{}", second.display()), "--name", "bb"],
    );
    let out = daemon.kiln(&["cancel", &blocker]);
    assert!(out.status.success(), "{}", describe(&out));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let job = loop {
        let job = status_json(&daemon, &queued);
        if job["state"] != "queued" && job["state"] != "running" {
            break job;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the queued job never ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(job["state"], "error", "{job}");
    let message = job["message"].as_str().unwrap();
    assert!(
        message.contains("\"bb\" (as it is now)") && message.contains("[images] allowed"),
        "{message}"
    );
}

#[test]
fn the_host_image_has_the_hosts_ca_certificates_read_only_and_their_digest_in_the_link() {
    let test =
        "the_host_image_has_the_hosts_ca_certificates_read_only_and_their_digest_in_the_link";
    if !require_root(test) {
        return;
    }
    let host_bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if !host_bundle.is_file() {
        eprintln!("SKIPPED: {test}: the host has no {}", host_bundle.display());
        return;
    }
    let daemon = Daemon::start();
    let out = daemon.kiln(&[
        "run",
        "--attest-dir",
        "links",
        "--output",
        "bundle.crt",
        "--out",
        "out",
        "--",
        "/bin/sh",
        "-c",
        "cp /etc/ssl/certs/ca-certificates.crt bundle.crt && ! (echo x >> /etc/ssl/certs/ca-certificates.crt) 2>/dev/null",
    ]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    assert_eq!(
        std::fs::read(daemon.path("out/bundle.crt")).unwrap(),
        std::fs::read(host_bundle).unwrap()
    );
    // The link names the digest of exactly the tree the step saw.
    let link = signed_link(&daemon.path("links"), "run");
    let certs = &link["environment"]["image"]["ca_certificates"];
    assert_eq!(certs["path"], "/etc/ssl/certs", "{link}");
    let seen = daemon.state.join("images/host/etc/ssl/certs");
    assert_eq!(
        std::fs::read(seen.join("ca-certificates.crt")).unwrap(),
        std::fs::read(host_bundle).unwrap()
    );
    assert_eq!(
        certs["tree_digest"]["sha256"],
        runner::images::tree_digest(&seen).unwrap().as_str(),
        "{link}"
    );
}
