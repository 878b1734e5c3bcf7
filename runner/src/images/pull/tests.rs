#![allow(clippy::unwrap_used)]
use super::*;

#[test]
fn only_registry_references_are_registry_sources() {
    let hex = "ab".repeat(32);
    assert!(is_registry_source(&format!(
        "127.0.0.1:5000/cc@sha256:{hex}"
    )));
    for imported in [
        "oci:bb-oci:latest",
        "oci-archive:a@sha256:x.tar",
        "docker-archive:x.tar",
    ] {
        assert!(!is_registry_source(imported), "{imported}");
    }
}
