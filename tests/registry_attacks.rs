//! A registry that misbehaves on purpose, served by the test itself on 127.0.0.1 (Debian's
//! docker-registry cannot be made to): endless token and error answers, uploads sent
//! elsewhere, output paths that hold terminal escapes. Neither the daemon nor the client
//! may read without bound, send a job's outputs to another host, or print what a registry
//! chose as raw control characters.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::*;

/// What an endless answer sends before it gives up: far more than any bound.
const ENDLESS: u64 = 256 << 20;
/// What a bounded reader may have let through (socket buffers included).
const READ_AT_MOST: u64 = 32 << 20;

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

struct Request {
    method: String,
    path: String,
    authorization: Option<String>,
}

enum Body {
    Bytes(Vec<u8>),
    /// `ENDLESS` bytes of the filler, without a length: read until the connection ends.
    Endless(&'static [u8]),
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Body,
}

fn reply(status: u16, headers: &[(&str, &str)], body: Body) -> Reply {
    Reply {
        status,
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        body,
    }
}

/// A registry of the test's own: one request per connection, answered by `handler`.
struct FakeRegistry {
    addr: String,
    /// Body bytes the registry managed to send.
    sent: Arc<AtomicU64>,
    requests: Arc<AtomicUsize>,
}

impl FakeRegistry {
    fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> FakeRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let sent = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let (counter, count) = (sent.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (handler, counter, count) = (handler.clone(), counter.clone(), count.clone());
                std::thread::spawn(move || serve_one(stream, &*handler, &counter, &count));
            }
        });
        FakeRegistry {
            addr,
            sent,
            requests,
        }
    }
}

fn serve_one(
    stream: TcpStream,
    handler: &(dyn Fn(&Request) -> Reply + Send + Sync),
    sent: &AtomicU64,
    requests: &AtomicUsize,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut length = 0u64;
    let mut authorization = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 {
            return;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
            if name.eq_ignore_ascii_case("authorization") {
                authorization = Some(value.trim().to_string());
            }
        }
    }
    let _ = std::io::copy(&mut (&mut reader).take(length), &mut std::io::sink());
    requests.fetch_add(1, Ordering::SeqCst);
    let answer = handler(&Request {
        method,
        path,
        authorization,
    });
    let mut head = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", answer.status);
    for (name, value) in &answer.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Body::Bytes(bytes) = &answer.body {
        head.push_str(&format!("Content-Length: {}\r\n", bytes.len()));
    }
    head.push_str("\r\n");
    let mut stream = stream;
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    match answer.body {
        Body::Bytes(bytes) => {
            if stream.write_all(&bytes).is_ok() {
                sent.fetch_add(bytes.len() as u64, Ordering::SeqCst);
            }
        }
        Body::Endless(filler) => {
            let chunk = filler.repeat((64 << 10) / filler.len().max(1) + 1);
            let mut written = 0;
            while written < ENDLESS {
                match stream.write(&chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        written += n as u64;
                        sent.fetch_add(n as u64, Ordering::SeqCst);
                    }
                }
            }
        }
    }
}

/// A daemon that may publish below `REGISTRY/builds/`, and a job of it that succeeded.
fn daemon_with_job(registry: &str) -> (Daemon, tempfile::NamedTempFile, String) {
    let config = config_file(&format!(
        "[publish]\nrepositories = [\"{registry}/builds/*\"]\ntimeout_seconds = 120\n"
    ));
    let daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    let id = succeeded_job(&daemon);
    (daemon, config, id)
}

/// A job of `daemon`'s that succeeded, with one output.
fn succeeded_job(daemon: &Daemon) -> String {
    std::fs::write(
        daemon.path("job.toml"),
        "[[steps]]\nname = \"make\"\nrun = [\"/bin/sh\", \"-c\", \"echo hi > out.txt\"]\n\
         [[outputs]]\npath = \"out.txt\"\n",
    )
    .unwrap();
    let out = daemon.kiln(&["submit", "--detach", "job.toml"]);
    assert!(out.status.success(), "{}", describe(&out));
    let id = text(&out.stdout).trim().to_string();
    loop {
        let out = daemon.kiln(&["status", "--json", &id]);
        let job: Value = serde_json::from_slice(&out.stdout).unwrap();
        match job["state"].as_str() {
            Some("queued" | "running") => std::thread::sleep(Duration::from_millis(100)),
            Some("succeeded") => break,
            _ => panic!("the job did not succeed: {job}"),
        }
    }
    id
}

fn push(daemon: &Daemon, id: &str, registry: &str) -> Output {
    let out = daemon.kiln(&["push", id, &format!("{registry}/builds/app")]);
    assert!(!out.status.success(), "{}", describe(&out));
    out
}

/// What a client was told, checked for what a registry may not put there.
fn assert_tame(out: &Output) {
    let said = describe(out);
    assert!(
        said.len() < 16 << 10,
        "{} bytes of message: the registry's answer was passed on whole",
        said.len()
    );
    assert!(
        !said.contains('\u{1b}') && !said.contains('\u{7}'),
        "the registry's control characters reached the terminal: {said:?}"
    );
}

#[test]
fn an_endless_token_answer_is_not_read_whole_by_the_daemon() {
    let test = "an_endless_token_answer_is_not_read_whole_by_the_daemon";
    if !require_root(test) {
        return;
    }
    let realm = Arc::new(std::sync::OnceLock::<String>::new());
    let realm_of = realm.clone();
    let registry = FakeRegistry::start(move |request| match request.path.as_str() {
        "/v2/" => {
            let challenge = format!(
                "Bearer realm=\"{}\",service=\"fake\"",
                realm_of.get().unwrap()
            );
            reply(
                401,
                &[("WWW-Authenticate", &challenge)],
                Body::Bytes(vec![]),
            )
        }
        p if p.starts_with("/token") => reply(
            200,
            &[("Content-Type", "application/json")],
            Body::Endless(b"{\"token\": \"aaaaaaaa"),
        ),
        _ => reply(404, &[], Body::Bytes(vec![])),
    });
    realm
        .set(format!("http://{}/token", registry.addr))
        .unwrap();
    let (daemon, _config, id) = daemon_with_job(&registry.addr);
    let out = push(&daemon, &id, &registry.addr);
    assert_tame(&out);
    let sent = registry.sent.load(Ordering::SeqCst);
    assert!(
        sent < READ_AT_MOST,
        "the daemon read {sent} bytes of a token answer"
    );
}

#[test]
fn an_endless_error_answer_is_not_read_whole_nor_passed_on() {
    let test = "an_endless_error_answer_is_not_read_whole_nor_passed_on";
    if !require_root(test) {
        return;
    }
    let registry =
        FakeRegistry::start(
            |request| match (request.method.as_str(), request.path.as_str()) {
                ("GET", "/v2/") => reply(200, &[], Body::Bytes(vec![])),
                ("HEAD", _) => reply(404, &[], Body::Bytes(vec![])),
                _ => reply(
                    400,
                    &[("Content-Type", "text/plain")],
                    Body::Endless(b"\x1b]0;owned\x07 no "),
                ),
            },
        );
    let (daemon, _config, id) = daemon_with_job(&registry.addr);
    let out = push(&daemon, &id, &registry.addr);
    assert_tame(&out);
    let sent = registry.sent.load(Ordering::SeqCst);
    assert!(
        sent < READ_AT_MOST,
        "the daemon read {sent} bytes of an error answer"
    );
}

#[test]
fn an_upload_sent_to_another_host_is_refused() {
    let test = "an_upload_sent_to_another_host_is_refused";
    if !require_root(test) {
        return;
    }
    let elsewhere = FakeRegistry::start(|_| reply(201, &[], Body::Bytes(vec![])));
    let location = format!("http://{}/steal?upload=1", elsewhere.addr);
    let registry = FakeRegistry::start(move |request| {
        match (request.method.as_str(), request.path.as_str()) {
            ("GET", "/v2/") => reply(200, &[], Body::Bytes(vec![])),
            ("HEAD", _) => reply(404, &[], Body::Bytes(vec![])),
            ("POST", _) => reply(202, &[("Location", &location)], Body::Bytes(vec![])),
            _ => reply(404, &[], Body::Bytes(vec![])),
        }
    });
    let (daemon, _config, id) = daemon_with_job(&registry.addr);
    let out = push(&daemon, &id, &registry.addr);
    assert_eq!(
        elsewhere.requests.load(Ordering::SeqCst),
        0,
        "the daemon uploaded to the host the registry named: {}",
        describe(&out)
    );
    assert!(describe(&out).contains("upload"), "{}", describe(&out));
}

/// `kiln verify --image` and `pull-artifact` as a deployer runs them.
fn deployer(args: &[&str]) -> Output {
    let home = tempfile::tempdir().unwrap();
    Command::new(KILN)
        .args(args)
        .env("DOCKER_CONFIG", home.path())
        .output()
        .unwrap()
}

/// `kiln verify --image REFERENCE` trusting a key that signed nothing here, under a
/// policy any Kiln provenance would meet: what the client does before any verdict.
fn verify_with_a_stranger_s_key(reference: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("runner.pub");
    std::fs::write(
        &key,
        provenance::SigningKey::generate()
            .public_key()
            .to_spki_pem(),
    )
    .unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "allowed_builder_ids = [\"kiln://buildhost\"]\nallow_unpinned_images = true\n",
    )
    .unwrap();
    deployer(&[
        "verify",
        "--image",
        reference,
        "--key",
        key.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
    ])
}

#[test]
fn a_registry_s_output_paths_and_errors_reach_the_terminal_tamed() {
    // An artifact whose layer title holds terminal escapes, whose blob answers an endless
    // error: what the client prints holds neither the escapes nor the whole answer.
    let layer = b"payload".to_vec();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.kiln.artifact.v1",
        "config": {
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
            "size": 2
        },
        "layers": [{
            "mediaType": "application/vnd.kiln.output.v1",
            "digest": format!("sha256:{}", sha256(&layer)),
            "size": layer.len(),
            "annotations": {"org.opencontainers.image.title": "bin/\u{1b}]0;owned\u{7}tool"}
        }]
    }))
    .unwrap();
    let hex = sha256(&manifest);
    let served = manifest.clone();
    let manifest_path = format!("/v2/app/manifests/sha256:{hex}");
    let registry = FakeRegistry::start(move |request| match request.path.as_str() {
        "/v2/" => reply(200, &[], Body::Bytes(vec![])),
        p if p == manifest_path => reply(
            200,
            &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
            Body::Bytes(served.clone()),
        ),
        p if p.contains("/blobs/") => reply(
            500,
            &[("Content-Type", "text/plain")],
            Body::Endless(b"\x1b]0;owned\x07 broken "),
        ),
        _ => reply(404, &[], Body::Bytes(vec![])),
    });
    let reference = format!("{}/app@sha256:{hex}", registry.addr);
    let out = verify_with_a_stranger_s_key(&reference);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_tame(&out);
    let sent = registry.sent.load(Ordering::SeqCst);
    assert!(
        sent < READ_AT_MOST,
        "the client read {sent} bytes of an error answer"
    );
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const BUNDLE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";

fn empty_config() -> Value {
    json!({
        "mediaType": "application/vnd.oci.empty.v1+json",
        "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
        "size": 2
    })
}

#[test]
fn a_symlink_planted_in_out_while_verifying_is_not_followed() {
    // A genuine artifact with a genuine provenance; while the client verifies it, a
    // symlink appears in --out (planted here by the registry's handler, as a local
    // attacker racing the client could): the download must not write through it.
    let key = provenance::SigningKey::generate();
    let layer = b"#!/bin/sh\necho genuine\n".to_vec();
    let layer_hex = sha256(&layer);
    let now = time::OffsetDateTime::now_utc();
    let envelope = provenance::slsa::ProvenanceInput {
        subjects: vec![provenance::slsa::ResourceDescriptor::sha256(
            "bin/tool",
            layer_hex.clone(),
        )],
        build_type: provenance::slsa::KILN_BUILD_TYPE.into(),
        external_parameters: json!({"name": "demo", "image": "busybox",
            "steps": [{"name": "make", "argv": ["make"], "allow_net": []}]}),
        internal_parameters: Default::default(),
        network_destinations: vec![],
        resolved_dependencies: vec![provenance::slsa::ResourceDescriptor::image("busybox", None)],
        builder_id: "kiln://buildhost".into(),
        builder_version: Default::default(),
        invocation_id: "job-1".into(),
        started_on: now,
        finished_on: now,
        byproducts: vec![],
    }
    .sign(&key)
    .unwrap();
    let bundle = provenance::bundle::envelope_to_bundle(&envelope, &key.keyid()).unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.kiln.artifact.v1",
        "config": empty_config(),
        "layers": [{
            "mediaType": "application/vnd.kiln.output.v1",
            "digest": format!("sha256:{layer_hex}"),
            "size": layer.len(),
            "annotations": {"org.opencontainers.image.title": "bin/tool"}
        }]
    }))
    .unwrap();
    let hex = sha256(&manifest);
    let referrer = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": BUNDLE,
        "config": empty_config(),
        "layers": [{"mediaType": BUNDLE, "digest": format!("sha256:{}", sha256(&bundle)),
                    "size": bundle.len()}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": format!("sha256:{hex}"),
                    "size": manifest.len()},
        "annotations": {"dev.kiln.attestation": "provenance",
                        "dev.kiln.attestation.name": "job-1"}
    }))
    .unwrap();
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": OCI_MANIFEST, "artifactType": BUNDLE,
                       "digest": format!("sha256:{}", sha256(&referrer)),
                       "size": referrer.len()}]
    }))
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let victim = dir.path().join("victim");
    std::fs::create_dir(&out).unwrap();
    std::fs::create_dir(&victim).unwrap();
    let (plant_out, plant_victim) = (out.clone(), victim.clone());
    let mut documents = std::collections::HashMap::new();
    documents.insert(format!("/v2/app/manifests/sha256:{hex}"), manifest.clone());
    documents.insert(format!("/v2/app/referrers/sha256:{hex}"), index);
    documents.insert(
        format!("/v2/app/manifests/sha256:{}", sha256(&referrer)),
        referrer,
    );
    let bundle_path = format!("/v2/app/blobs/sha256:{}", sha256(&bundle));
    let layer_path = format!("/v2/app/blobs/sha256:{layer_hex}");
    let registry = FakeRegistry::start(move |request| {
        if request.path == "/v2/" {
            return reply(200, &[], Body::Bytes(vec![]));
        }
        if request.path == bundle_path {
            // While the client verifies the attestations, before it downloads.
            let _ = std::os::unix::fs::symlink(&plant_victim, plant_out.join("bin"));
            return reply(200, &[], Body::Bytes(bundle.clone()));
        }
        if request.path == layer_path {
            return reply(200, &[], Body::Bytes(layer.clone()));
        }
        match documents.get(&request.path) {
            Some(body) => {
                let media_type = if request.path.contains("/referrers/") {
                    "application/vnd.oci.image.index.v1+json"
                } else {
                    OCI_MANIFEST
                };
                reply(
                    200,
                    &[("Content-Type", media_type)],
                    Body::Bytes(body.clone()),
                )
            }
            None => reply(404, &[], Body::Bytes(vec![])),
        }
    });
    let key_file = dir.path().join("runner.pub");
    std::fs::write(&key_file, key.public_key().to_spki_pem()).unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "allowed_builder_ids = [\"kiln://buildhost\"]\nallow_unpinned_images = true\n",
    )
    .unwrap();
    let out_arg = out.to_str().unwrap().to_string();
    let out = deployer(&[
        "pull-artifact",
        &format!("{}/app@sha256:{hex}", registry.addr),
        "--out",
        &out_arg,
        "--key",
        key_file.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
    ]);
    assert!(
        text(&out.stdout).contains("PASS"),
        "the genuine artifact did not verify: {}",
        describe(&out)
    );
    assert!(
        std::fs::read_dir(&victim).unwrap().next().is_none(),
        "pull-artifact wrote through a symlink in --out: {}",
        describe(&out)
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
}

#[test]
fn many_large_attestations_are_not_all_read() {
    // A referrers index listing many distinct, well-formed bundles of nearly the largest
    // size a document may have: the client stops at a total, it does not hold them all.
    const COUNT: usize = 40;
    let artifact_layer = b"x".to_vec();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.kiln.artifact.v1",
        "config": empty_config(),
        "layers": [{
            "mediaType": "application/vnd.kiln.output.v1",
            "digest": format!("sha256:{}", sha256(&artifact_layer)),
            "size": 1,
            "annotations": {"org.opencontainers.image.title": "x"}
        }]
    }))
    .unwrap();
    let hex = sha256(&manifest);
    let mut documents = std::collections::HashMap::new();
    let mut entries = Vec::new();
    for i in 0..COUNT {
        let payload = format!("{i:08}").repeat(360_000);
        let envelope = serde_json::to_vec(&json!({
            "payloadType": "application/vnd.in-toto+json",
            "payload": payload,
            "signatures": [{"keyid": "k", "sig": "AA=="}]
        }))
        .unwrap();
        let bundle = provenance::bundle::envelope_to_bundle(&envelope, "k").unwrap();
        let referrer = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": BUNDLE,
            "config": empty_config(),
            "layers": [{"mediaType": BUNDLE, "digest": format!("sha256:{}", sha256(&bundle)),
                        "size": bundle.len()}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": format!("sha256:{hex}"),
                        "size": manifest.len()},
            "annotations": {"dev.kiln.attestation": "link",
                            "dev.kiln.attestation.name": format!("step{i}")}
        }))
        .unwrap();
        entries.push(json!({"mediaType": OCI_MANIFEST, "artifactType": BUNDLE,
            "digest": format!("sha256:{}", sha256(&referrer)), "size": referrer.len()}));
        documents.insert(
            format!("/v2/app/manifests/sha256:{}", sha256(&referrer)),
            referrer,
        );
        documents.insert(format!("/v2/app/blobs/sha256:{}", sha256(&bundle)), bundle);
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries
    }))
    .unwrap();
    documents.insert(format!("/v2/app/referrers/sha256:{hex}"), index);
    documents.insert(format!("/v2/app/manifests/sha256:{hex}"), manifest);
    documents.insert(
        format!("/v2/app/blobs/sha256:{}", sha256(&artifact_layer)),
        artifact_layer,
    );
    let registry = FakeRegistry::start(move |request| {
        if request.path == "/v2/" {
            return reply(200, &[], Body::Bytes(vec![]));
        }
        match documents.get(&request.path) {
            Some(body) => reply(
                200,
                &[("Content-Type", OCI_MANIFEST)],
                Body::Bytes(body.clone()),
            ),
            None => reply(404, &[], Body::Bytes(vec![])),
        }
    });
    let out = verify_with_a_stranger_s_key(&format!("{}/app@sha256:{hex}", registry.addr));
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    let sent = registry.sent.load(Ordering::SeqCst);
    assert!(
        sent < 100 << 20,
        "the client read {sent} bytes of attestations"
    );
}

#[test]
fn a_token_service_s_token_is_what_the_client_then_presents() {
    // The distribution API's token flow, as the client now speaks it itself: the token
    // answered for the repository's pull scope is presented on every later request.
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.kiln.artifact.v1",
        "config": empty_config(),
        "layers": [{
            "mediaType": "application/vnd.kiln.output.v1",
            "digest": format!("sha256:{}", sha256(b"x")),
            "size": 1,
            "annotations": {"org.opencontainers.image.title": "x"}
        }]
    }))
    .unwrap();
    let hex = sha256(&manifest);
    let realm = Arc::new(std::sync::OnceLock::<String>::new());
    let realm_of = realm.clone();
    let manifest_path = format!("/v2/team/app/manifests/sha256:{hex}");
    let registry = FakeRegistry::start(move |request| {
        if request.path.starts_with("/token?") {
            return if request
                .path
                .contains("scope=repository%3Ateam%2Fapp%3Apull")
                && request.path.contains("service=fake")
            {
                reply(200, &[], Body::Bytes(br#"{"token": "t0k3n"}"#.to_vec()))
            } else {
                reply(400, &[], Body::Bytes(vec![]))
            };
        }
        if request.authorization.as_deref() != Some("Bearer t0k3n") {
            let challenge = format!(
                "Bearer realm=\"{}\",service=\"fake\"",
                realm_of.get().unwrap()
            );
            return reply(
                401,
                &[("WWW-Authenticate", &challenge)],
                Body::Bytes(vec![]),
            );
        }
        match request.path.as_str() {
            p if p == manifest_path => reply(
                200,
                &[("Content-Type", OCI_MANIFEST)],
                Body::Bytes(manifest.clone()),
            ),
            p if p.contains("/blobs/") => reply(200, &[], Body::Bytes(b"x".to_vec())),
            _ => reply(404, &[], Body::Bytes(vec![])),
        }
    });
    realm
        .set(format!("http://{}/token", registry.addr))
        .unwrap();
    let out = verify_with_a_stranger_s_key(&format!("{}/team/app@sha256:{hex}", registry.addr));
    // Read with the token: the verdict is reached (and fails for want of a provenance).
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("no SLSA provenance"),
        "{}",
        describe(&out)
    );
}

/// A registry that takes any push, and the Authorization headers it was sent.
fn accepting_registry() -> (FakeRegistry, Arc<std::sync::Mutex<Vec<Option<String>>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let registry = FakeRegistry::start(move |request| {
        record.lock().unwrap().push(request.authorization.clone());
        match request.method.as_str() {
            "GET" if request.path == "/v2/" => reply(200, &[], Body::Bytes(vec![])),
            "POST" => reply(202, &[("Location", "/upload/1")], Body::Bytes(vec![])),
            "PUT" => reply(201, &[], Body::Bytes(vec![])),
            _ => reply(404, &[], Body::Bytes(vec![])),
        }
    });
    (registry, seen)
}

#[test]
fn the_daemon_presents_only_the_credentials_its_configuration_names() {
    let test = "the_daemon_presents_only_the_credentials_its_configuration_names";
    if !require_root(test) {
        return;
    }
    let (registry, seen) = accepting_registry();
    let docker = tempfile::tempdir().unwrap();
    let basic = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "kiln:s3cret");
    std::fs::write(
        docker.path().join("config.json"),
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{basic}"}}}}}}"#,
            registry.addr
        ),
    )
    .unwrap();
    // The daemon's own DOCKER_CONFIG names credentials for the registry; its configuration
    // names no auth_file: none is presented.
    let config = config_file(&format!(
        "[publish]\nrepositories = [\"{}/builds/*\"]\n",
        registry.addr
    ));
    let docker_env = format!("DOCKER_CONFIG={}", docker.path().display());
    let daemon = Daemon::start_wrapped(
        &["/usr/bin/env", &docker_env],
        &["--config", config.path().to_str().unwrap()],
    );
    let id = succeeded_job(&daemon);
    let out = daemon.kiln(&["push", &id, &format!("{}/builds/app", registry.addr)]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    let presented = std::mem::take(&mut *seen.lock().unwrap());
    assert!(!presented.is_empty());
    assert!(
        presented.iter().all(Option::is_none),
        "the daemon presented credentials of its environment: {presented:?}"
    );
    drop(daemon);
    // Named as [publish] auth_file, they are.
    let config = config_file(&format!(
        "[publish]\nrepositories = [\"{}/builds/*\"]\nauth_file = \"{}\"\n",
        registry.addr,
        docker.path().join("config.json").display()
    ));
    let daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    let id = succeeded_job(&daemon);
    let out = daemon.kiln(&["push", &id, &format!("{}/builds/app", registry.addr)]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    let presented = std::mem::take(&mut *seen.lock().unwrap());
    assert!(
        presented
            .iter()
            .skip(1)
            .all(|a| a.as_deref() == Some(&format!("Basic {basic}"))),
        "{presented:?}"
    );
}

#[test]
fn what_a_blob_redirect_leads_to_is_not_quoted_to_the_client() {
    // A registry redirects a blob to another host (as to a CDN, or to a service inside
    // the deployer's network); that host's error body is not the registry's to show.
    let internal = FakeRegistry::start(|_| {
        reply(
            500,
            &[("Content-Type", "text/plain")],
            Body::Bytes(b"SECRET-INTERNAL-ANSWER".to_vec()),
        )
    });
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.kiln.artifact.v1",
        "config": empty_config(),
        "layers": [{
            "mediaType": "application/vnd.kiln.output.v1",
            "digest": format!("sha256:{}", sha256(b"x")),
            "size": 1,
            "annotations": {"org.opencontainers.image.title": "x"}
        }]
    }))
    .unwrap();
    let hex = sha256(&manifest);
    let manifest_path = format!("/v2/app/manifests/sha256:{hex}");
    let elsewhere = format!("http://{}/metadata", internal.addr);
    let registry = FakeRegistry::start(move |request| match request.path.as_str() {
        "/v2/" => reply(200, &[], Body::Bytes(vec![])),
        p if p == manifest_path => reply(
            200,
            &[("Content-Type", OCI_MANIFEST)],
            Body::Bytes(manifest.clone()),
        ),
        p if p.contains("/blobs/") => reply(307, &[("Location", &elsewhere)], Body::Bytes(vec![])),
        _ => reply(404, &[], Body::Bytes(vec![])),
    });
    let out = verify_with_a_stranger_s_key(&format!("{}/app@sha256:{hex}", registry.addr));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(internal.requests.load(Ordering::SeqCst), 1);
    assert!(
        !describe(&out).contains("SECRET-INTERNAL"),
        "{}",
        describe(&out)
    );
}
