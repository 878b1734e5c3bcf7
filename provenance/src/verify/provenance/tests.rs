#![allow(clippy::unwrap_used)]
use super::*;
use crate::hash::sha256_bytes;
use crate::keys::{KeyType, SigningKey};
use crate::slsa::{ProvenanceInput, ResourceDescriptor};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Map};
use time::macros::datetime;

fn input() -> ProvenanceInput {
    ProvenanceInput {
        subjects: vec![
            ResourceDescriptor::sha256("out/hello", sha256_bytes(b"hello")),
            ResourceDescriptor::sha256("out/lib.a", sha256_bytes(b"lib")),
        ],
        build_type: KILN_BUILD_TYPE.into(),
        external_parameters: json!({"image": "busybox",
            "steps": [{"name": "compile", "argv": ["cc"], "allow_net": []}]}),
        internal_parameters: Map::new(),
        network_destinations: vec![],
        resolved_dependencies: vec![ResourceDescriptor::image(
            "busybox",
            Some(&sha256_bytes(b"tree")),
        )],
        builder_id: "kiln://buildhost".into(),
        builder_version: Default::default(),
        invocation_id: "job-7".into(),
        started_on: datetime!(2026-03-01 10:00 UTC),
        finished_on: datetime!(2026-03-01 10:01 UTC),
        byproducts: vec![ResourceDescriptor::step_link(
            "compile",
            "compile.01234567.link",
            &sha256_bytes(b"link"),
        )],
    }
}

fn policy() -> Policy {
    Policy::from_toml(&format!(
        "allowed_builder_ids = [\"kiln://buildhost\"]\n\
         allowed_images = [\"sha256:{}\"]\n\
         required_steps = [\"compile\"]\n",
        sha256_bytes(b"tree")
    ))
    .unwrap()
}

fn setup() -> (SigningKey, Vec<TrustedKey>, Vec<u8>, Vec<Artifact>) {
    setup_of(KeyType::Ed25519)
}

fn setup_of(key_type: KeyType) -> (SigningKey, Vec<TrustedKey>, Vec<u8>, Vec<Artifact>) {
    let key = SigningKey::generate_of(key_type);
    let env = input().sign(&key).unwrap();
    let trusted = vec![TrustedKey::unbounded(key.public_key())];
    let arts = vec![Artifact::from_bytes("hello", b"hello")];
    (key, trusted, env, arts)
}

#[test]
fn passes_and_serializes() {
    let (key, keys, env, arts) = setup();
    let v = verify_provenance(&env, &keys, &arts, &policy());
    assert!(v.passed, "{v:?}");
    assert_eq!(v.signed_by, vec![key.keyid()]);
    // A P-256 runner key, alone or in a ring beside an ed25519 one.
    let (p256, p256_keys, p256_env, _) = setup_of(KeyType::EcdsaP256);
    let v = verify_provenance(&p256_env, &p256_keys, &arts, &policy());
    assert!(v.passed, "{v:?}");
    assert_eq!(v.signed_by, vec![p256.keyid()]);
    let both: Vec<TrustedKey> = keys.iter().chain(&p256_keys).cloned().collect();
    for envelope in [&env, &p256_env] {
        assert!(verify_provenance(envelope, &both, &arts, &policy()).passed);
    }
    // Each key vouches only for its own signature.
    assert!(!verify_provenance(&p256_env, &keys, &arts, &policy()).passed);
    assert!(!verify_provenance(&env, &p256_keys, &arts, &policy()).passed);
    assert_eq!(v.artifacts[0].subject.as_deref(), Some("out/hello"));
    let j = v.to_json();
    assert_eq!(j["passed"], true);
    assert_eq!(j["invocation_id"], "job-7");
    assert!(v.summary().starts_with("PASS"));
}

#[test]
fn tampering_fails() {
    for key_type in KeyType::ALL {
        tampering_fails_with(key_type);
    }
}

fn tampering_fails_with(key_type: KeyType) {
    let (_key, keys, env, arts) = setup_of(key_type);
    // Artifact not a subject.
    let v = verify_provenance(
        &env,
        &keys,
        &[Artifact::from_bytes("x", b"hellO")],
        &policy(),
    );
    assert!(!v.passed);
    assert!(v.reasons[0].contains("not a subject"), "{:?}", v.reasons);
    // Payload changed.
    let mut e: Value = serde_json::from_slice(&env).unwrap();
    let mut payload = STANDARD.decode(e["payload"].as_str().unwrap()).unwrap();
    let pos = payload.windows(4).position(|w| w == b"job-").unwrap();
    payload[pos + 4] = b'8';
    e["payload"] = STANDARD.encode(&payload).into();
    let v = verify_provenance(&serde_json::to_vec(&e).unwrap(), &keys, &arts, &policy());
    assert!(!v.passed && v.reasons[0].starts_with("signature"), "{v:?}");
    // Signature changed.
    let mut e: Value = serde_json::from_slice(&env).unwrap();
    let mut sig = STANDARD
        .decode(e["signatures"][0]["sig"].as_str().unwrap())
        .unwrap();
    sig[10] ^= 1;
    e["signatures"][0]["sig"] = STANDARD.encode(&sig).into();
    let v = verify_provenance(&serde_json::to_vec(&e).unwrap(), &keys, &arts, &policy());
    assert!(!v.passed && v.reasons[0].starts_with("signature"), "{v:?}");
    // Another key.
    let other = vec![TrustedKey::unbounded(
        SigningKey::generate_of(key_type).public_key(),
    )];
    assert!(!verify_provenance(&env, &other, &arts, &policy()).passed);
    // Garbage and no artifacts.
    assert!(!verify_provenance(b"{", &keys, &arts, &policy()).passed);
    assert!(!verify_provenance(&env, &keys, &[], &policy()).passed);
}

#[test]
fn wrong_payload_type_or_statement_type_fails() {
    let key = SigningKey::generate();
    let keys = vec![TrustedKey::unbounded(key.public_key())];
    let arts = vec![Artifact::from_bytes("hello", b"hello")];
    let st = input().statement().unwrap();
    let payload = serde_json::to_vec(&st).unwrap();
    let env = dsse::sign_envelope("application/json", &payload, &key);
    let v = verify_provenance(&serde_json::to_vec(&env).unwrap(), &keys, &arts, &policy());
    assert!(v.reasons[0].contains("payloadType"), "{v:?}");
    for (field, val) in [
        ("_type", "https://in-toto.io/Statement/v0.1"),
        ("predicateType", "https://slsa.dev/provenance/v0.2"),
    ] {
        let mut s = serde_json::to_value(&st).unwrap();
        s[field] = val.into();
        let env = dsse::sign_envelope(IN_TOTO_PAYLOAD_TYPE, &serde_json::to_vec(&s).unwrap(), &key);
        let v = verify_provenance(&serde_json::to_vec(&env).unwrap(), &keys, &arts, &policy());
        assert!(!v.passed && v.reasons[0].contains(field), "{v:?}");
    }
}

#[test]
fn key_validity_window() {
    let key = SigningKey::generate();
    let env = input().sign(&key).unwrap();
    let arts = vec![Artifact::from_bytes("hello", b"hello")];
    let window = |nb, na| {
        vec![TrustedKey {
            key: key.public_key(),
            not_before: nb,
            not_after: na,
        }]
    };
    // finishedOn is 2026-03-01 10:01.
    let ok = window(
        datetime!(2026-01-01 0:00 UTC),
        Some(datetime!(2026-03-01 10:01 UTC)),
    );
    assert!(verify_provenance(&env, &ok, &arts, &policy()).passed);
    let retired = window(
        datetime!(2026-01-01 0:00 UTC),
        Some(datetime!(2026-03-01 10:00 UTC)),
    );
    let v = verify_provenance(&env, &retired, &arts, &policy());
    assert!(
        !v.passed && v.reasons[0].contains("not valid at finishedOn"),
        "{v:?}"
    );
    let future = window(datetime!(2026-04-01 0:00 UTC), None);
    assert!(!verify_provenance(&env, &future, &arts, &policy()).passed);
}

#[test]
fn policy_rules() {
    let key = SigningKey::generate();
    let keys = vec![TrustedKey::unbounded(key.public_key())];
    let arts = vec![Artifact::from_bytes("hello", b"hello")];
    let run =
        |i: ProvenanceInput, p: &Policy| verify_provenance(&i.sign(&key).unwrap(), &keys, &arts, p);
    let has = |v: &Verdict, s: &str| v.reasons.iter().any(|r| r.contains(s));

    let mut i = input();
    i.builder_id = "kiln://elsewhere".into();
    assert!(has(&run(i, &policy()), "builder id"));

    let mut i = input();
    i.resolved_dependencies = vec![ResourceDescriptor::image(
        "other",
        Some(&sha256_bytes(b"x")),
    )];
    assert!(has(&run(i, &policy()), "not in allowed_images"));

    let mut i = input();
    i.resolved_dependencies = vec![ResourceDescriptor::image("host", None)];
    assert!(has(&run(i.clone(), &policy()), "not pinned"));
    let mut p = policy();
    p.allow_unpinned_images = true;
    assert!(run(i, &p).passed);

    let mut i = input();
    i.resolved_dependencies.clear();
    assert!(has(&run(i, &policy()), "no image"));

    let mut i = input();
    i.network_destinations = vec!["example.org:443".into()];
    assert!(has(&run(i.clone(), &policy()), "network access"));
    let mut p = policy();
    p.allow_network = true;
    assert!(run(i, &p).passed);
    // allow_net in the job spec counts even if the runner's record says no.
    let mut i = input();
    i.external_parameters["steps"][0]["allow_net"] = json!(["10.0.0.1:80"]);
    assert!(has(&run(i, &policy()), "network access"));

    let mut i = input();
    i.byproducts.clear();
    assert!(has(&run(i, &policy()), "required step \"compile\""));

    let mut i = input();
    i.build_type = "https://example.com/other".into();
    assert!(has(&run(i, &policy()), "buildType"));
}

#[test]
fn unrecorded_network_fails_closed() {
    let key = SigningKey::generate();
    let keys = vec![TrustedKey::unbounded(key.public_key())];
    let arts = vec![Artifact::from_bytes("hello", b"hello")];
    let mut st = serde_json::to_value(input().statement().unwrap()).unwrap();
    st["predicate"]["buildDefinition"]
        .as_object_mut()
        .unwrap()
        .remove("internalParameters");
    let env = dsse::sign_envelope(
        IN_TOTO_PAYLOAD_TYPE,
        &serde_json::to_vec(&st).unwrap(),
        &key,
    );
    let v = verify_provenance(&serde_json::to_vec(&env).unwrap(), &keys, &arts, &policy());
    assert!(
        v.reasons
            .iter()
            .any(|r| r.contains("does not record network")),
        "{v:?}"
    );
}

#[test]
fn policy_file_errors() {
    assert!(Policy::from_toml("allowed_builder_ids = [\"a\"]\nallow_netwrk = true").is_err());
    assert!(Policy::from_toml("allow_network = true").is_err());
    assert!(Policy::from_toml("allowed_builder_ids = []").is_err());
    assert!(
        Policy::from_toml("allowed_builder_ids = [\"a\"]\nallowed_images = [\"busybox\"]").is_err()
    );
    assert!(Policy::from_toml("allowed_builder_ids = [\"a\"]\nallow_network = \"yes\"").is_err());
    let p = Policy::from_toml("allowed_builder_ids = [\"a\"]").unwrap();
    assert!(!p.allow_network && !p.allow_unpinned_images && p.allowed_images.is_none());
}

#[test]
fn an_imported_image_is_allowed_by_its_manifest_digest_or_its_name_and_digest() {
    let (key, keys, _, arts) = setup();
    let (manifest, tree) = (sha256_bytes(b"manifest"), sha256_bytes(b"tree"));
    let mut i = input();
    i.resolved_dependencies = vec![ResourceDescriptor::oci_image(
        "debian",
        &manifest,
        "amd64",
        &tree,
        "oci:debian:12",
    )];
    let env = i.sign(&key).unwrap();
    let with = |allowed: &str| {
        Policy::from_toml(&format!(
            "allowed_builder_ids = [\"kiln://buildhost\"]\nallowed_images = [\"{allowed}\"]\n"
        ))
        .unwrap()
    };
    for allowed in [
        format!("sha256:{manifest}"),
        format!("debian@sha256:{manifest}"),
    ] {
        let v = verify_provenance(&env, &keys, &arts, &with(&allowed));
        assert!(v.passed, "{allowed}: {}", v.summary());
    }
    for refused in [format!("other@sha256:{manifest}"), format!("sha256:{tree}")] {
        let v = verify_provenance(&env, &keys, &arts, &with(&refused));
        assert!(!v.passed, "{refused}");
        assert!(
            v.reasons
                .iter()
                .any(|r| r.contains("not in allowed_images")),
            "{refused}: {}",
            v.summary()
        );
    }
    for malformed in ["@sha256:00", "debian@", "debian@sha256:12"] {
        let text = format!("allowed_builder_ids = [\"a\"]\nallowed_images = [\"{malformed}\"]");
        assert!(Policy::from_toml(&text).is_err(), "{malformed}");
    }
}
