#![allow(clippy::unwrap_used)]
use std::fs;

use base64::Engine;
use oci_client::secrets::RegistryAuth;

use super::*;

#[test]
fn plain_http_only_for_loopback_or_listed_registries() {
    let hex = "ab".repeat(32);
    let target = |text: &str, insecure: &[&str]| {
        let insecure: Vec<String> = insecure.iter().map(|s| s.to_string()).collect();
        Target::parse(text, &insecure)
    };
    for loopback in ["127.0.0.1:5000", "localhost:5000", "127.9.9.9"] {
        let t = target(&format!("{loopback}/tools/cc@sha256:{hex}"), &[]).unwrap();
        assert!(t.plain_http, "{loopback}");
        assert!(t.pinned);
    }
    let t = target(&format!("registry.example:5000/cc@sha256:{hex}"), &[]).unwrap();
    assert!(!t.plain_http);
    let err = target(
        &format!("http://registry.example:5000/cc@sha256:{hex}"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("plain HTTP"), "{err}");
    let t = target(
        &format!("http://registry.example:5000/cc@sha256:{hex}"),
        &["registry.example:5000"],
    )
    .unwrap();
    assert!(t.plain_http);
    let t = target("https://127.0.0.1:5000/cc:1", &[]).unwrap();
    assert!(!t.plain_http && !t.pinned);
    assert_eq!(t.reference, "1");
    // Docker Hub is named, and spoken to at its API host.
    let hub = target("docker.io/library/debian:12", &[]).unwrap();
    assert_eq!(hub.registry, "docker.io");
    assert_eq!(
        hub.manifest_url(&hub.reference),
        "https://index.docker.io/v2/library/debian/manifests/12"
    );
    // No implicit Docker Hub, no other scheme, no other digest.
    for bad in [
        format!("busybox@sha256:{hex}"),
        format!("library/busybox@sha256:{hex}"),
        format!("ftp://r.example/cc@sha256:{hex}"),
        format!("r.example/cc@sha512:{hex}{hex}"),
    ] {
        assert!(target(&bad, &[]).is_err(), "{bad}");
    }
}

#[test]
fn the_daemon_config_lists_insecure_registries() {
    let config: crate::config::Config =
        toml::from_str("[images]\ninsecure_registries = [\"registry.example:5000\"]\n").unwrap();
    let text = format!("http://registry.example:5000/cc@sha256:{}", "ab".repeat(32));
    assert!(
        Target::parse(&text, &config.images.insecure_registries)
            .unwrap()
            .plain_http
    );
    assert!(Target::parse(&text, &[]).is_err());
}

#[test]
fn credentials_come_from_the_registry_s_auths_entry() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode("kiln:s3cret");
    fs::write(
        &file,
        format!(
            r#"{{"auths": {{"https://registry.example:5000/v1/": {{"auth": "{auth}"}},
                "other.example": {{"username": "u", "password": "p"}}}},
                "credsStore": "none"}}"#
        ),
    )
    .unwrap();
    match registry_auth(Some(&file), "registry.example:5000").unwrap() {
        RegistryAuth::Basic(user, password) => {
            assert_eq!((user.as_str(), password.as_str()), ("kiln", "s3cret"))
        }
        _ => panic!("no credentials"),
    }
    assert!(matches!(
        registry_auth(Some(&file), "third.example").unwrap(),
        RegistryAuth::Anonymous
    ));
    fs::write(
        &file,
        r#"{"auths": {"r.example": {"auth": "bm9jb2xvbg=="}}}"#,
    )
    .unwrap();
    let err = registry_auth(Some(&file), "r.example")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not user:password") && !err.contains("nocolon"),
        "{err}"
    );
}

#[test]
fn a_push_names_a_repository_and_perhaps_a_tag_but_no_digest() {
    let (t, tag) = Target::parse_push("localhost:5000/team/app", &[]).unwrap();
    assert_eq!(
        (t.registry.as_str(), t.repository.as_str()),
        ("localhost:5000", "team/app")
    );
    assert_eq!(tag, None);
    assert!(t.plain_http);
    let (t, tag) = Target::parse_push("registry.example/app:v1.2", &[]).unwrap();
    assert_eq!(t.repository_name(), "registry.example/app");
    assert_eq!(tag.as_deref(), Some("v1.2"));
    assert!(!t.plain_http);
    for bad in [
        "app",
        "registry.example/app@sha256:00",
        "registry.example/app:",
        "registry.example/app:-x",
        "registry.example/app:sha256-abc",
        "registry.example/App",
        "ftp://registry.example/app",
    ] {
        assert!(Target::parse_push(bad, &[]).is_err(), "{bad}");
    }
}
