//! Key lifecycle end to end: the daemon's key ring (creation, migration of a
//! pre-ring `runner.pem`, rotation picked up by a running daemon, refusal of
//! unsafe key files) and step links as DSSE envelopes checked by the reference
//! `in-toto-verify`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};
use support::*;

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The key id the daemon signs with now, as GetPublicKey reports it.
fn daemon_keyid(daemon: &Daemon) -> String {
    let out = daemon.kiln(&["keys", "public", "--format", "securesystemslib"]);
    assert!(out.status.success(), "{}", describe(&out));
    let key: Value = serde_json::from_slice(&out.stdout).unwrap();
    key["keyid"].as_str().unwrap().to_string()
}

/// The one file of `dir` whose name ends with `suffix`.
fn only_file(dir: &Path, suffix: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_str().unwrap().ends_with(suffix))
        .collect();
    assert_eq!(found.len(), 1, "{suffix} in {}: {found:?}", dir.display());
    found.into_iter().next().unwrap()
}

/// Decoded payload and signature key ids of a DSSE envelope.
fn open_envelope(envelope: &Value) -> (Value, Vec<String>) {
    let payload = STANDARD
        .decode(envelope["payload"].as_str().unwrap())
        .unwrap();
    let keyids = envelope["signatures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["keyid"].as_str().unwrap().to_string())
        .collect();
    (serde_json::from_slice(&payload).unwrap(), keyids)
}

/// Starts `kiln serve` on the daemon's state directory and expects it to
/// refuse to start; returns its stderr.
fn serve_must_fail(daemon: &Daemon) -> String {
    let mut child = Command::new(KILN)
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("serve")
        .arg("--state-dir")
        .arg(&daemon.state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            assert!(!status.success(), "kiln serve exited 0");
            return text(&out.stderr);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kiln serve started although its key file is unsafe");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn current_keyid_on_disk(state: &Path) -> String {
    read_json(&state.join("keys/keyring.json"))["current"]
        .as_str()
        .unwrap()
        .to_string()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn dsse_links_of_a_real_run_pass_in_toto_verify_and_a_tampered_payload_fails() {
    let test = "dsse_links_of_a_real_run_pass_in_toto_verify_and_a_tampered_payload_fails";
    if !require_root(test) {
        return;
    }
    let daemon = Daemon::start();
    let out = run_hello(&daemon, &["--link-format", "dsse"]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());

    let keyid = daemon_keyid(&daemon);
    let links = daemon.path("links");
    // The same file name as a metablock: in-toto finds links by it.
    let link_path = only_file(&links, ".link");
    assert_eq!(
        link_path.file_name().unwrap().to_str().unwrap(),
        format!("run.{}.link", &keyid[..8])
    );
    let envelope = read_json(&link_path);
    assert_eq!(envelope["payloadType"], "application/vnd.in-toto+json");
    assert!(envelope.get("signed").is_none(), "{envelope}");
    let (payload, signers) = open_envelope(&envelope);
    assert_eq!(signers, vec![keyid.clone()]);
    assert_eq!(payload["_type"], "link");
    assert_eq!(payload["name"], "run");
    assert_eq!(payload["byproducts"]["stdout"], "hello, kiln\n");
    assert!(payload["products"]["hello"]["sha256"].is_string());

    let (Some(python), Some(verifier)) = (python(test), in_toto_verify(test)) else {
        return;
    };
    let pem = daemon.kiln(&["keys", "public"]);
    assert!(pem.status.success(), "{}", describe(&pem));
    let runner_pub = daemon.path("runner.pub");
    std::fs::write(&runner_pub, &pem.stdout).unwrap();
    let (layout, owner) = hello_layout(&python, daemon.dir.path(), &runner_pub);
    let out_dir = daemon.path("out");
    let verdict = run_in_toto_verify(&verifier, &layout, &owner, &links, &out_dir);
    assert!(
        verdict.status.success(),
        "in-toto-verify: {}",
        describe(&verdict)
    );
    let verify_with_kiln = || kiln_verify(&daemon, &layout, &owner, &links, &out_dir);
    let ours = verify_with_kiln();
    assert!(ours.status.success(), "kiln verify: {}", describe(&ours));

    // A payload edit no rule would notice (the recorded stdout), signature
    // kept: only the signature check can refuse it.
    let mut forged = payload.clone();
    forged["byproducts"]["stdout"] = json!("hello, mallory\n");
    let mut tampered = envelope.clone();
    tampered["payload"] = json!(STANDARD.encode(serde_json::to_vec(&forged).unwrap()));
    std::fs::write(&link_path, serde_json::to_vec_pretty(&tampered).unwrap()).unwrap();
    let verdict = run_in_toto_verify(&verifier, &layout, &owner, &links, &out_dir);
    assert!(
        !verdict.status.success(),
        "in-toto-verify accepted a tampered DSSE payload: {}",
        describe(&verdict)
    );
    // Refused for want of a validly signed link, not for anything else.
    assert!(
        text(&verdict.stderr).contains("validly signed"),
        "{}",
        describe(&verdict)
    );
    let ours = verify_with_kiln();
    assert!(
        !ours.status.success(),
        "kiln verify accepted a tampered DSSE payload"
    );
    // The untouched envelope, rewritten: accepted again (the edit was the cause).
    std::fs::write(&link_path, serde_json::to_vec_pretty(&envelope).unwrap()).unwrap();
    let verdict = run_in_toto_verify(&verifier, &layout, &owner, &links, &out_dir);
    assert!(verdict.status.success(), "{}", describe(&verdict));
}

#[test]
fn rotation_while_the_daemon_runs_switches_keys_and_the_ring_verifies_both_builds() {
    let test = "rotation_while_the_daemon_runs_switches_keys_and_the_ring_verifies_both_builds";
    if !require_root(test) {
        return;
    }
    let daemon = Daemon::start();
    let state = daemon.state.to_str().unwrap().to_string();
    let keys = daemon.state.join("keys");

    // The daemon created the ring; generate finds it and changes nothing.
    let old = daemon_keyid(&daemon);
    let out = daemon.kiln(&["keys", "generate", "--state-dir", &state]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout).trim(), old);
    assert!(
        text(&out.stderr).contains("already exists"),
        "{}",
        describe(&out)
    );
    assert_eq!(current_keyid_on_disk(&daemon.state), old);

    let build = |name: &str, format: &str| -> PathBuf {
        let dir = daemon.path(name);
        let out = daemon.kiln(&[
            "run",
            "--output",
            "out.txt",
            "--attest-dir",
            dir.to_str().unwrap(),
            "--link-format",
            format,
            "--out",
            dir.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            &format!("echo {name} > out.txt"),
        ]);
        assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
        dir
    };
    let before = build("before", "metablock");
    // Kept to forge with later: after the rotation no copy is left on disk.
    let old_private = std::fs::read_to_string(keys.join(format!("{old}.pem"))).unwrap();

    let out = daemon.kiln(&["keys", "rotate", "--state-dir", &state]);
    assert!(out.status.success(), "{}", describe(&out));
    let new = text(&out.stdout).trim().to_string();
    assert_eq!(new.len(), 64, "{}", describe(&out));
    assert_ne!(new, old);
    assert!(
        !keys.join(format!("{old}.pem")).exists(),
        "retired key left"
    );
    assert_eq!(mode(&keys.join(format!("{new}.pem"))), 0o600);
    // The running daemon answers with the new key at once.
    assert_eq!(daemon_keyid(&daemon), new);

    let after = build("after", "dsse");
    // Links: named and signed by the key current at their signing.
    let link = read_json(&only_file(&before, ".link"));
    assert_eq!(link["signatures"][0]["keyid"], old.as_str());
    assert!(only_file(&before, ".link").ends_with(format!("run.{}.link", &old[..8])));
    let link_path = only_file(&after, ".link");
    assert!(link_path.ends_with(format!("run.{}.link", &new[..8])));
    let (_, signers) = open_envelope(&read_json(&link_path));
    assert_eq!(signers, vec![new.clone()]);
    // Provenance likewise.
    let prov_before = only_file(&before, ".provenance.json");
    let prov_after = only_file(&after, ".provenance.json");
    let (statement, signers) = open_envelope(&read_json(&prov_before));
    assert_eq!(signers, vec![old.clone()]);
    let (_, signers) = open_envelope(&read_json(&prov_after));
    assert_eq!(signers, vec![new.clone()]);
    assert!(
        daemon.log().contains("key ring changed"),
        "{}",
        daemon.log()
    );

    // The ring export: both keys, the old one's window closed.
    let out = daemon.kiln(&["keys", "public", "--format", "ring"]);
    assert!(out.status.success(), "{}", describe(&out));
    let ring_path = daemon.path("ring.json");
    std::fs::write(&ring_path, &out.stdout).unwrap();
    let ring: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ring["current"], new.as_str());
    assert_eq!(ring["keys"][0]["keyid"], old.as_str());
    assert!(ring["keys"][0]["not_after"].is_string(), "{ring}");
    assert!(ring["keys"][1]["not_after"].is_null(), "{ring}");

    let policy = provenance_policy(&daemon, &before);
    let verify = |envelope: &Path, key: &Path, artifact: &Path| {
        daemon.kiln(&[
            "verify",
            "--provenance",
            envelope.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--policy",
            policy.to_str().unwrap(),
            artifact.to_str().unwrap(),
        ])
    };
    for (envelope, dir) in [(&prov_before, &before), (&prov_after, &after)] {
        let out = verify(envelope, &ring_path, &dir.join("out.txt"));
        assert!(out.status.success(), "{}", describe(&out));
        assert!(text(&out.stdout).starts_with("PASS"), "{}", describe(&out));
    }

    // The retired key signs a statement claiming a finish after the
    // rotation: refused. The same statement with its true finish, signed by
    // the same key, passes, so the claimed time is what is refused.
    let old_key = provenance::SigningKey::from_pkcs8_pem(&old_private).unwrap();
    let resign = |statement: &Value, name: &str| -> PathBuf {
        let envelope = provenance::dsse::sign_envelope(
            provenance::dsse::IN_TOTO_PAYLOAD_TYPE,
            &serde_json::to_vec(statement).unwrap(),
            &old_key,
        );
        let path = daemon.path(name);
        std::fs::write(&path, serde_json::to_vec_pretty(&envelope).unwrap()).unwrap();
        path
    };
    let artifact = before.join("out.txt");
    let honest = resign(&statement, "honest.json");
    let out = verify(&honest, &ring_path, &artifact);
    assert!(out.status.success(), "{}", describe(&out));
    let mut late = statement.clone();
    // Now: after the rotation (the old window's end is inclusive, so not that).
    let rfc3339 = &time::format_description::well_known::Rfc3339;
    let rotated =
        time::OffsetDateTime::parse(ring["keys"][0]["not_after"].as_str().unwrap(), rfc3339)
            .unwrap();
    let now = time::OffsetDateTime::now_utc();
    assert!(now > rotated);
    late["predicate"]["runDetails"]["metadata"]["finishedOn"] = json!(now.format(rfc3339).unwrap());
    let forged = resign(&late, "forged.json");
    let out = verify(&forged, &ring_path, &artifact);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("not valid at finishedOn"),
        "{}",
        describe(&out)
    );
}

#[test]
fn serve_refuses_a_key_file_with_loose_mode_or_foreign_owner_naming_it() {
    let test = "serve_refuses_a_key_file_with_loose_mode_or_foreign_owner_naming_it";
    if !require_root(test) {
        return;
    }
    let mut daemon = Daemon::start();
    let keyid = daemon_keyid(&daemon);
    let status = daemon.stop();
    assert!(status.success(), "{}", daemon.log());
    let key = daemon.state.join(format!("keys/{keyid}.pem"));
    assert_eq!(mode(&key), 0o600);
    let name = key.display().to_string();

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = serve_must_fail(&daemon);
    assert!(
        err.contains(&name) && err.contains("mode 0644") && err.contains("too permissive"),
        "{err}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    std::os::unix::fs::chown(&key, Some(65534), None).unwrap();
    let err = serve_must_fail(&daemon);
    assert!(
        err.contains(&name) && err.contains("owned by uid 65534"),
        "{err}"
    );
    std::os::unix::fs::chown(&key, Some(0), None).unwrap();

    // Fixed: it starts, with the same key.
    daemon.spawn(&[]);
    assert_eq!(daemon_keyid(&daemon), keyid);
}

#[test]
fn a_pre_ring_runner_pem_is_migrated_keeping_its_key_id() {
    let test = "a_pre_ring_runner_pem_is_migrated_keeping_its_key_id";
    if !require_root(test) {
        return;
    }
    let mut daemon = Daemon::start();
    // An RPC first: the daemon installs its SIGTERM handler only once it serves.
    let fresh = daemon_keyid(&daemon);
    let status = daemon.stop();
    assert!(status.success(), "{}", daemon.log());
    // The state of an older Kiln: keys/runner.pem only.
    let keys = daemon.state.join("keys");
    std::fs::remove_dir_all(&keys).unwrap();
    std::fs::create_dir(&keys).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700)).unwrap();
    let legacy_path = keys.join("runner.pem");
    let legacy = provenance::SigningKey::load_or_create(&legacy_path).unwrap();

    // A legacy key others can read is refused by name, and nothing is migrated.
    std::fs::set_permissions(&legacy_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = serve_must_fail(&daemon);
    assert!(
        err.contains(&legacy_path.display().to_string()) && err.contains("0644"),
        "{err}"
    );
    assert!(!keys.join("keyring.json").exists());
    std::fs::set_permissions(&legacy_path, std::fs::Permissions::from_mode(0o600)).unwrap();

    daemon.spawn(&[]);
    assert_ne!(fresh, legacy.keyid());
    assert_eq!(daemon_keyid(&daemon), legacy.keyid());
    assert_eq!(current_keyid_on_disk(&daemon.state), legacy.keyid());
    assert_eq!(mode(&keys.join(format!("{}.pem", legacy.keyid()))), 0o600);
    // No second copy of the private key: a rotation must be able to retire it.
    assert!(!legacy_path.exists());
    let out = daemon.kiln(&["run", "--attest-dir", "links", "--", "true"]);
    assert!(out.status.success(), "{}", describe(&out));
    let link = read_json(&only_file(&daemon.path("links"), ".link"));
    assert_eq!(link["signatures"][0]["keyid"], legacy.keyid().as_str());
}

#[test]
fn keys_generate_creates_a_ring_once_and_rotate_needs_one() {
    // No daemon involved: the commands work on a state directory.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let kiln = |args: &[&str]| {
        Command::new(KILN)
            .args(args)
            .arg("--state-dir")
            .arg(&state)
            .output()
            .unwrap()
    };
    let out = kiln(&["keys", "rotate"]);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("no key ring"),
        "{}",
        describe(&out)
    );

    let out = kiln(&["keys", "generate"]);
    assert!(out.status.success(), "{}", describe(&out));
    let first = text(&out.stdout).trim().to_string();
    assert!(text(&out.stderr).contains("created"), "{}", describe(&out));
    assert_eq!(current_keyid_on_disk(&state), first);
    assert_eq!(mode(&state.join(format!("keys/{first}.pem"))), 0o600);
    assert_eq!(mode(&state.join("keys")), 0o700);

    let out = kiln(&["keys", "generate"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout).trim(), first);
    assert!(
        text(&out.stderr).contains("already exists"),
        "{}",
        describe(&out)
    );

    let out = kiln(&["keys", "rotate"]);
    assert!(out.status.success(), "{}", describe(&out));
    let second = text(&out.stdout).trim().to_string();
    assert_ne!(second, first);
    let ring = read_json(&state.join("keys/keyring.json"));
    assert_eq!(ring["current"], second.as_str());
    assert_eq!(ring["keys"].as_array().unwrap().len(), 2);
    let files: Vec<String> = std::fs::read_dir(state.join("keys"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(files.contains(&format!("{second}.pem")), "{files:?}");
}

// ---- ECDSA P-256 runner keys and Sigstore bundles, checked by the standard tools.

/// The daemon's current key: (key id, securesystemslib keytype), and its SPKI PEM
/// written to `name`.
fn export_current_key(daemon: &Daemon, name: &str) -> (String, String, PathBuf) {
    let out = daemon.kiln(&["keys", "public", "--format", "securesystemslib"]);
    assert!(out.status.success(), "{}", describe(&out));
    let key: Value = serde_json::from_slice(&out.stdout).unwrap();
    let pem = daemon.kiln(&["keys", "public"]);
    assert!(pem.status.success(), "{}", describe(&pem));
    let path = daemon.path(name);
    std::fs::write(&path, &pem.stdout).unwrap();
    (
        key["keyid"].as_str().unwrap().to_string(),
        key["keytype"].as_str().unwrap().to_string(),
        path,
    )
}

/// `kiln run` of one step writing out.txt, with DSSE links and the provenance in `dir`.
fn build_into(daemon: &Daemon, name: &str) -> PathBuf {
    let dir = daemon.path(name);
    let out = daemon.kiln(&[
        "run",
        "--output",
        "out.txt",
        "--attest-dir",
        dir.to_str().unwrap(),
        "--link-format",
        "dsse",
        "--out",
        dir.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        &format!("echo {name} > out.txt"),
    ]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    dir
}

/// Checks the bundle written beside `envelope_path`: named `<stem>.sigstore.json`,
/// the v0.3 media type, the key id as the hint, the very envelope inside.
fn bundle_beside(envelope_path: &Path, keyid: &str) -> PathBuf {
    let stem = envelope_path.file_stem().unwrap().to_str().unwrap();
    let bundle_path = envelope_path.with_file_name(format!("{stem}.sigstore.json"));
    let bundle = read_json(&bundle_path);
    assert_eq!(
        bundle["mediaType"],
        "application/vnd.dev.sigstore.bundle.v0.3+json"
    );
    assert_eq!(bundle["verificationMaterial"]["publicKey"]["hint"], keyid);
    assert_eq!(bundle["verificationMaterial"]["tlogEntries"], json!([]));
    assert_eq!(bundle["dsseEnvelope"], read_json(envelope_path));
    bundle_path
}

fn provenance_policy(daemon: &Daemon, statement_dir: &Path) -> PathBuf {
    let (statement, _) = open_envelope(&read_json(&only_file(statement_dir, ".provenance.json")));
    let policy = daemon.path("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "allowed_builder_ids = [{:?}]\nallow_unpinned_images = true\nrequired_steps = [\"run\"]\n",
            statement["predicate"]["runDetails"]["builder"]["id"]
                .as_str()
                .unwrap()
        ),
    )
    .unwrap();
    policy
}

fn kiln_verify_provenance(
    daemon: &Daemon,
    file: &Path,
    key: &Path,
    policy: &Path,
    artifact: &Path,
) -> std::process::Output {
    daemon.kiln(&[
        "verify",
        "--provenance",
        file.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
        artifact.to_str().unwrap(),
    ])
}

/// Changes one byte of the bundle's payload (out.txt becomes out.txu), its signature kept.
fn forge_payload(bundle: &mut Value) {
    let envelope = &mut bundle["dsseEnvelope"];
    let mut payload = STANDARD
        .decode(envelope["payload"].as_str().unwrap())
        .unwrap();
    let at = payload.windows(7).position(|w| w == b"out.txt").unwrap();
    payload[at + 6] = b'u';
    envelope["payload"] = json!(STANDARD.encode(&payload));
}

/// `@sigstore/verify` refuses the bundle, saying `why`.
fn assert_sigstore_refuses(package: &Path, bundle: &Path, key: &Path, keyid: &str, why: &str) {
    let out = run_sigstore_verify(package, bundle, key, keyid);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(text(&out.stderr).contains(why), "{}", describe(&out));
}

/// Writes `bundle` edited by `edit` as `name` beside it.
fn edited_bundle(bundle: &Path, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let mut v = read_json(bundle);
    edit(&mut v);
    let path = bundle.with_file_name(name);
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    path
}

#[test]
fn sigstore_bundles_of_p256_and_ed25519_runner_keys_verify_with_sigstore_js_and_tampered_ones_fail()
{
    let test = "sigstore_bundles_of_p256_and_ed25519_runner_keys_verify_with_sigstore_js_and_tampered_ones_fail";
    if !require_root(test) {
        return;
    }
    let config = config_file("key_type = \"ecdsa-p256\"\n");
    let mut daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    let state = daemon.state.to_str().unwrap().to_string();

    // The configured type made the ring's first key.
    let (p256_id, keytype, p256_pub) = export_current_key(&daemon, "p256.pub");
    assert_eq!(keytype, "ecdsa");
    let p256_build = build_into(&daemon, "p256");
    let p256_envelope = only_file(&p256_build, ".provenance.json");
    let (_, signers) = open_envelope(&read_json(&p256_envelope));
    assert_eq!(signers, vec![p256_id.clone()]);
    let p256_bundle = bundle_beside(&p256_envelope, &p256_id);
    let p256_link = only_file(&p256_build, ".link");
    let p256_link_bundle = bundle_beside(&p256_link, &p256_id);
    assert!(p256_link_bundle.ends_with(format!("run.{}.sigstore.json", &p256_id[..8])));

    // `kiln verify --provenance` takes the bundle as it takes the envelope.
    let policy = provenance_policy(&daemon, &p256_build);
    let artifact = p256_build.join("out.txt");
    for file in [&p256_envelope, &p256_bundle] {
        let out = kiln_verify_provenance(&daemon, file, &p256_pub, &policy, &artifact);
        assert!(out.status.success(), "{}", describe(&out));
        assert!(text(&out.stdout).starts_with("PASS"), "{}", describe(&out));
    }

    // Rotated by the configuration (P-256 again), then to ed25519 by the flag: one
    // ring, keys of both types.
    let config_arg = config.path().to_str().unwrap();
    let out = daemon.kiln(&[
        "keys",
        "rotate",
        "--config",
        config_arg,
        "--state-dir",
        &state,
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let (second_id, keytype, _) = export_current_key(&daemon, "second.pub");
    assert_eq!(
        (second_id.as_str(), keytype.as_str()),
        (text(&out.stdout).trim(), "ecdsa")
    );
    let out = daemon.kiln(&[
        "keys",
        "rotate",
        "--state-dir",
        &state,
        "--key-type",
        "ed25519",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let (ed_id, keytype, ed_pub) = export_current_key(&daemon, "ed25519.pub");
    assert_eq!(keytype, "ed25519");
    let ed_build = build_into(&daemon, "ed25519");
    let ed_envelope = only_file(&ed_build, ".provenance.json");
    let ed_bundle = bundle_beside(&ed_envelope, &ed_id);
    let ed_link_bundle = bundle_beside(&only_file(&ed_build, ".link"), &ed_id);

    let out = daemon.kiln(&["keys", "public", "--format", "ring"]);
    assert!(out.status.success(), "{}", describe(&out));
    let ring_path = daemon.path("ring.json");
    std::fs::write(&ring_path, &out.stdout).unwrap();
    let ring: Value = serde_json::from_slice(&out.stdout).unwrap();
    let types: Vec<&str> = ring["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["keytype"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["ecdsa", "ecdsa", "ed25519"]);
    // The ring vouches for both builds' bundles, each within its key's window.
    for (bundle, dir) in [(&p256_bundle, &p256_build), (&ed_bundle, &ed_build)] {
        let out =
            kiln_verify_provenance(&daemon, bundle, &ring_path, &policy, &dir.join("out.txt"));
        assert!(out.status.success(), "{}", describe(&out));
    }

    // Restarted with the same configuration, the daemon keeps the ring's ed25519 key
    // (key_type chooses new keys only) and says so.
    assert!(daemon.stop().success(), "{}", daemon.log());
    daemon.spawn(&["--config", config_arg]);
    assert_eq!(export_current_key(&daemon, "again.pub").0, ed_id);
    assert!(
        daemon.log().contains("not of the configured key_type"),
        "{}",
        daemon.log()
    );

    // A payload byte changed under the signature: Kiln refuses the bundle.
    let forged_payload = edited_bundle(&p256_bundle, "forged-payload.sigstore.json", forge_payload);
    let out = kiln_verify_provenance(&daemon, &forged_payload, &p256_pub, &policy, &artifact);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("signature"),
        "{}",
        describe(&out)
    );
    // A hint that is not the signature's key: refused as malformed.
    let rehinted = edited_bundle(&p256_bundle, "rehinted.sigstore.json", |v| {
        v["verificationMaterial"]["publicKey"]["hint"] = json!(ed_id);
    });
    let out = kiln_verify_provenance(&daemon, &rehinted, &ring_path, &policy, &artifact);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("Sigstore bundle"),
        "{}",
        describe(&out)
    );

    let Some(sigstore) = sigstore_verify(test) else {
        return;
    };
    // npm's verifier, offline, with only the runner's key: every bundle verifies.
    for (bundle, key, keyid) in [
        (&p256_bundle, &p256_pub, &p256_id),
        (&p256_link_bundle, &p256_pub, &p256_id),
        (&ed_bundle, &ed_pub, &ed_id),
        (&ed_link_bundle, &ed_pub, &ed_id),
    ] {
        let out = run_sigstore_verify(&sigstore, bundle, key, keyid);
        assert!(
            out.status.success(),
            "{}: {}",
            bundle.display(),
            describe(&out)
        );
        assert!(
            text(&out.stdout).starts_with("verified: application/vnd.in-toto+json"),
            "{}",
            describe(&out)
        );
    }
    for (bundle, key, keyid) in [
        (&p256_bundle, &p256_pub, &p256_id),
        (&ed_bundle, &ed_pub, &ed_id),
    ] {
        // A payload byte changed.
        let forged = edited_bundle(bundle, "forged.sigstore.json", forge_payload);
        assert_sigstore_refuses(&sigstore, &forged, key, keyid, "SIGNATURE_ERROR");
        // A signature byte changed (in the middle: inside an ECDSA signature's integers).
        let resigned = edited_bundle(bundle, "bad-signature.sigstore.json", |v| {
            let sig = &mut v["dsseEnvelope"]["signatures"][0]["sig"];
            let mut bytes = STANDARD.decode(sig.as_str().unwrap()).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x01;
            *sig = json!(STANDARD.encode(&bytes));
        });
        assert_sigstore_refuses(&sigstore, &resigned, key, keyid, "SIGNATURE_ERROR");
        // The right key id, the wrong key (of either type).
        for other_type in [provenance::KeyType::EcdsaP256, provenance::KeyType::Ed25519] {
            let stranger = daemon.path("stranger.pub");
            let other = provenance::SigningKey::generate_of(other_type);
            std::fs::write(&stranger, other.public_key().to_spki_pem()).unwrap();
            assert_sigstore_refuses(&sigstore, bundle, &stranger, keyid, "SIGNATURE_ERROR");
        }
        // A key the hint does not name is not used.
        assert_sigstore_refuses(&sigstore, bundle, key, &"0".repeat(64), "key not found");
        // The untouched bundle still verifies: the edits caused the refusals.
        assert!(run_sigstore_verify(&sigstore, bundle, key, keyid)
            .status
            .success());
    }
}

#[test]
fn in_toto_verify_accepts_links_of_a_p256_runner_key_under_a_p256_layout_key() {
    let test = "in_toto_verify_accepts_links_of_a_p256_runner_key_under_a_p256_layout_key";
    if !require_root(test) {
        return;
    }
    let config = config_file("key_type = \"ecdsa-p256\"\n");
    let daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    let (keyid, keytype, runner_pub) = export_current_key(&daemon, "runner.pub");
    assert_eq!(keytype, "ecdsa");
    let (Some(python), Some(verifier)) = (python(test), in_toto_verify(test)) else {
        return;
    };
    // The layout, written and signed by the reference implementation with a P-256 owner key.
    let mut spec = hello_layout_spec();
    spec["owner_key_type"] = json!("ecdsa");
    let (layout, owner) = make_layout(&python, daemon.dir.path(), &runner_pub, spec);
    let signed_layout = read_json(&layout);
    assert_eq!(signed_layout["signed"]["keys"][&keyid]["keytype"], "ecdsa");
    assert_eq!(
        signed_layout["signed"]["keys"][&keyid]["scheme"],
        "ecdsa-sha2-nistp256"
    );
    let owner_key =
        provenance::PublicKey::from_spki_pem(&std::fs::read_to_string(&owner).unwrap()).unwrap();
    assert_eq!(owner_key.key_type(), provenance::KeyType::EcdsaP256);

    let links = daemon.path("links");
    let out_dir = daemon.path("out");
    for format in ["metablock", "dsse"] {
        let out = run_hello(&daemon, &["--link-format", format]);
        assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
        let link_path = only_file(&links, ".link");
        assert!(link_path.ends_with(format!("run.{}.link", &keyid[..8])));
        let verdict = run_in_toto_verify(&verifier, &layout, &owner, &links, &out_dir);
        assert!(
            verdict.status.success(),
            "{format}: in-toto-verify: {}",
            describe(&verdict)
        );
        let ours = kiln_verify(&daemon, &layout, &owner, &links, &out_dir);
        assert!(
            ours.status.success(),
            "{format}: kiln verify: {}",
            describe(&ours)
        );

        // The stdout the link records, changed with its signature kept: both refuse.
        let good = std::fs::read(&link_path).unwrap();
        let mut link = read_json(&link_path);
        if format == "dsse" {
            let (mut payload, _) = open_envelope(&link);
            payload["byproducts"]["stdout"] = json!("hello, mallory\n");
            link["payload"] = json!(STANDARD.encode(serde_json::to_vec(&payload).unwrap()));
        } else {
            link["signed"]["byproducts"]["stdout"] = json!("hello, mallory\n");
        }
        std::fs::write(&link_path, serde_json::to_vec_pretty(&link).unwrap()).unwrap();
        let verdict = run_in_toto_verify(&verifier, &layout, &owner, &links, &out_dir);
        assert!(
            !verdict.status.success(),
            "{format}: in-toto-verify accepted a tampered link"
        );
        assert!(
            text(&verdict.stderr).contains("validly signed"),
            "{}",
            describe(&verdict)
        );
        let ours = kiln_verify(&daemon, &layout, &owner, &links, &out_dir);
        assert!(
            !ours.status.success(),
            "{format}: kiln verify accepted a tampered link"
        );
        std::fs::write(&link_path, good).unwrap();
        let verdict = run_in_toto_verify(&verifier, &layout, &owner, &links, &out_dir);
        assert!(verdict.status.success(), "{}", describe(&verdict));
        std::fs::remove_dir_all(&links).unwrap();
    }
}

#[test]
fn keys_generate_takes_the_key_type_from_the_config_or_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let kiln = |args: &[&str]| Command::new(KILN).args(args).output().unwrap();
    let state = dir.path().join("p256");
    let config = config_file(&format!(
        "state_dir = {:?}\nkey_type = \"ecdsa-p256\"\n",
        state.to_str().unwrap()
    ));
    let out = kiln(&[
        "keys",
        "generate",
        "--config",
        config.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("ecdsa-p256"),
        "{}",
        describe(&out)
    );
    let ring = read_json(&state.join("keys/keyring.json"));
    assert_eq!(ring["keys"][0]["keytype"], "ecdsa");
    assert_eq!(ring["current"].as_str().unwrap(), text(&out.stdout).trim());
    let private = std::fs::read_to_string(
        state.join(format!("keys/{}.pem", ring["current"].as_str().unwrap())),
    )
    .unwrap();
    assert!(
        private.starts_with("-----BEGIN PRIVATE KEY-----"),
        "{private}"
    );

    let state = dir.path().join("flag");
    let out = kiln(&[
        "keys",
        "generate",
        "--state-dir",
        state.to_str().unwrap(),
        "--key-type",
        "ecdsa-p256",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        read_json(&state.join("keys/keyring.json"))["keys"][0]["scheme"],
        "ecdsa-sha2-nistp256"
    );

    // An unknown type is refused, by the flag and in the config, naming it.
    let out = kiln(&[
        "keys",
        "generate",
        "--state-dir",
        state.to_str().unwrap(),
        "--key-type",
        "rsa",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("unknown key type \"rsa\""),
        "{}",
        describe(&out)
    );
    let bad = config_file("key_type = \"ecdsa-p384\"\n");
    for args in [
        vec![
            "keys",
            "rotate",
            "--config",
            bad.path().to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ],
        vec![
            "serve",
            "--config",
            bad.path().to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ],
    ] {
        let out = kiln(&args);
        assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
        assert!(
            text(&out.stderr).contains("key_type: unknown key type \"ecdsa-p384\""),
            "{}",
            describe(&out)
        );
    }
    // Nothing was rotated by the refused command.
    assert_eq!(
        read_json(&state.join("keys/keyring.json"))["keys"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// The key id of the one link `kiln run` wrote into `links` (then removed).
fn link_signer(links: &Path) -> String {
    let path = only_file(links, ".link");
    let link = read_json(&path);
    std::fs::remove_dir_all(links).unwrap();
    link["signatures"][0]["keyid"].as_str().unwrap().to_string()
}

/// A Secret volume as the kubelet makes one: a tmpfs of mode 1777 that the kubelet
/// writes through its own view, and that the container sees mounted read-only.
struct SecretVolume {
    kubelet_view: PathBuf,
    pod_view: PathBuf,
    /// The read-only view first, then the tmpfs.
    _mounts: [Unmount; 2],
}

impl SecretVolume {
    /// The volume in `parent`, holding the files of `ring`.
    fn new(parent: &Path, ring: &Path) -> SecretVolume {
        let kubelet_view = parent.join("kubelet-view");
        let pod_view = parent.join("etc-kiln-keys");
        std::fs::create_dir(&kubelet_view).unwrap();
        std::fs::create_dir(&pod_view).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &kubelet_view,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m,mode=1777"),
        )
        .unwrap();
        let tmpfs = unmount_on_drop(kubelet_view.clone());
        kubelet_update_secret(&kubelet_view, ring, 0o400, 1);
        use nix::mount::MsFlags;
        for flags in [
            MsFlags::MS_BIND,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        ] {
            nix::mount::mount(
                Some(&kubelet_view),
                &pod_view,
                None::<&str>,
                flags,
                None::<&str>,
            )
            .unwrap();
        }
        let view = unmount_on_drop(pod_view.clone());
        SecretVolume {
            kubelet_view,
            pod_view,
            _mounts: [view, tmpfs],
        }
    }

    /// The Secret updated to the files of `ring`, each of `mode`.
    fn update(&self, ring: &Path, mode: u32, serial: u32) {
        kubelet_update_secret(&self.kubelet_view, ring, mode, serial);
    }
}

#[test]
fn a_ring_from_a_kubernetes_secret_signs_and_follows_the_secrets_updates() {
    let test = "a_ring_from_a_kubernetes_secret_signs_and_follows_the_secrets_updates";
    if !require_root(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // The operator's ring, made away from the cluster.
    let made = tmp.path().join("pool-a");
    let generate = Command::new(KILN)
        .args(["keys", "generate", "--state-dir"])
        .arg(&made)
        .output()
        .unwrap();
    assert!(generate.status.success(), "{}", describe(&generate));
    let first = current_keyid_on_disk(&made);
    let secret = SecretVolume::new(tmp.path(), &made.join("keys"));
    let pod_view = secret.pod_view.clone();
    assert_eq!(
        mode(&pod_view),
        0o777,
        "the volume's own mode, as a pod sees it"
    );

    let config = config_file(&format!("keys_dir = {:?}\n", pod_view.to_str().unwrap()));
    let config_path = config.path().to_str().unwrap();
    let daemon = Daemon::start_with(&["--config", config_path]);
    assert_eq!(daemon_keyid(&daemon), first);
    let out = run_hello(&daemon, &[]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    assert_eq!(link_signer(&daemon.path("links")), first);

    // Rotation: `kiln keys rotate` on the operator's copy, then the Secret updated; the
    // running daemon signs with the new key from the next signature on.
    let rotate = Command::new(KILN)
        .args(["keys", "rotate", "--state-dir"])
        .arg(&made)
        .output()
        .unwrap();
    assert!(rotate.status.success(), "{}", describe(&rotate));
    let second = current_keyid_on_disk(&made);
    assert_ne!(second, first);
    secret.update(&made.join("keys"), 0o400, 2);
    assert_eq!(daemon_keyid(&daemon), second);
    let out = run_hello(&daemon, &[]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    assert_eq!(link_signer(&daemon.path("links")), second);
    // Kiln made no ring of its own, and `kiln keys` does not touch the mounted one.
    assert!(!daemon.state.join("keys").exists());
    let refused = Command::new(KILN)
        .args(["keys", "rotate", "--config", config_path])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "{}", describe(&refused));
    assert!(
        text(&refused.stderr).contains("read-only"),
        "{}",
        describe(&refused)
    );
    assert_eq!(current_keyid_on_disk(&made), second);
    drop(daemon);

    // A Secret update that lets the pod's group read the key (an fsGroup): the daemon
    // does not start on it, and the message names the file.
    secret.update(&made.join("keys"), 0o440, 3);
    let out = Command::new(KILN)
        .arg("--socket")
        .arg(tmp.path().join("kiln.sock"))
        .args(["serve", "--state-dir"])
        .arg(tmp.path().join("state"))
        .args(["--config", config_path])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("{second}.pem")) && stderr.contains("0440"),
        "{stderr}"
    );
    // No ring at all: an error naming the directory, never a fresh key.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let config = config_file(&format!("keys_dir = {:?}\n", empty.to_str().unwrap()));
    let out = Command::new(KILN)
        .arg("--socket")
        .arg(tmp.path().join("kiln.sock"))
        .args(["serve", "--state-dir"])
        .arg(tmp.path().join("state"))
        .args(["--config", config.path().to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(empty.to_str().unwrap()), "{stderr}");
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
    assert!(!tmp.path().join("state/keys").exists());
}

/// The action digests (HEX/SIZE) a worker's log says it ran.
fn actions_in(log: &str) -> Vec<String> {
    log.lines()
        .filter(|line| line.contains("running an action"))
        .filter_map(|line| line.split("action=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn a_worker_signs_with_the_secrets_ring_through_buildgrid_and_follows_its_update() {
    use support::buildgrid::{Bazel, BuildGrid};
    let test = "a_worker_signs_with_the_secrets_ring_through_buildgrid_and_follows_its_update";
    if !require_root(test) {
        return;
    }
    let Some(bazel) = Bazel::new(test) else {
        return;
    };
    let Some(grid) = BuildGrid::start(test) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let made = tmp.path().join("pool-a");
    let keys = |verb: &str| {
        let out = Command::new(KILN)
            .args(["keys", verb, "--state-dir"])
            .arg(&made)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
    };
    keys("generate");
    let first_ring = tmp.path().join("first-ring.json");
    std::fs::copy(made.join("keys/keyring.json"), &first_ring).unwrap();
    let secret = SecretVolume::new(tmp.path(), &made.join("keys"));
    let config = config_file(&format!(
        "keys_dir = {:?}\ncgroup_favordynmods = false\n",
        secret.pod_view.to_str().unwrap()
    ));
    let state = tmp.path().join("state");
    let log_path = tmp.path().join("worker.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let mut worker = Command::new(KILN)
        .args([
            "worker",
            "--scheduler",
            &grid.url,
            "--bots",
            "1",
            "--state-dir",
        ])
        .arg(&state)
        .args(["--config", config.path().to_str().unwrap()])
        .env("KILN_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !log().contains("bot session created") {
        if let Some(status) = worker.try_wait().unwrap() {
            panic!("worker exited ({status}):\n{}", log());
        }
        assert!(
            Instant::now() < deadline,
            "worker did not start:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let executor = format!("--remote_executor={}", grid.url);
    let build = |target: &str| {
        let out = bazel.build(&[&executor, "--spawn_strategy=remote", target]);
        assert!(out.status.success(), "{}\n{}", describe(&out), log());
    };
    let verify = |ring: &Path, digest: &str| {
        Command::new(KILN)
            .args(["verify", "--action-cache", &grid.url, "--key"])
            .arg(ring)
            .arg(digest)
            .output()
            .unwrap()
    };
    bazel.write(
        "BUILD",
        "genrule(name = \"before\", outs = [\"before.txt\"], cmd = \"echo before > $@\")\n\
         genrule(name = \"after\", outs = [\"after.txt\"], cmd = \"echo after > $@\")\n",
    );
    build("//:before");
    let ran = actions_in(&log());
    assert_eq!(ran.len(), 1, "{}", log());
    let out = verify(&first_ring, &ran[0]);
    assert!(out.status.success(), "{}", describe(&out));

    // The operator rotates its copy and updates the Secret; the running worker signs the
    // next action with the new key.
    keys("rotate");
    secret.update(&made.join("keys"), 0o400, 2);
    build("//:after");
    let ran = actions_in(&log());
    assert_eq!(ran.len(), 2, "{}", log());
    let out = verify(&made.join("keys/keyring.json"), &ran[1]);
    assert!(out.status.success(), "{}", describe(&out));
    // Not by the retired key: the ring from before the rotation does not vouch for it.
    let out = verify(&first_ring, &ran[1]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        !state.join("keys").exists(),
        "the worker made a ring of its own"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(worker.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(worker.wait().unwrap().success(), "{}", log());
}
