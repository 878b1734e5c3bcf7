//! SBOMs end to end: an image built here with a dpkg status file listing two packages
//! beside the busybox binary is imported; `kiln image sbom` prints a CycloneDX 1.5
//! document that the reference library validates strictly and that lists both packages
//! with their purls; a job on the image gets the SBOM as an in-toto Statement signed by
//! the runner key, written beside the provenance, which names it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::path::Path;

use base64::Engine;
use sha2::{Digest, Sha256};
use support::*;

const BUSYBOX: &str = "/bin/busybox";
const STATUS: &str = "Package: busybox
Status: install ok installed
Architecture: amd64
Version: 1:1.36.1-9
Description: Tiny utilities for small and embedded systems

Package: old-tool
Status: deinstall ok config-files
Architecture: amd64
Version: 0.1

Package: libc6
Status: install ok installed
Architecture: amd64
Multi-Arch: same
Version: 2.36-9+deb12u7
";

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn layer(with_status: bool) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut dirs = vec!["bin"];
    if with_status {
        dirs.extend(["var", "var/lib", "var/lib/dpkg"]);
    }
    for path in dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        tar.append_data(&mut h, path, std::io::empty()).unwrap();
    }
    let mut file = |path: &str, bytes: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_size(bytes.len() as u64);
        tar.append_data(&mut h, path, bytes).unwrap();
    };
    file("bin/busybox", &std::fs::read(BUSYBOX).unwrap(), 0o755);
    if with_status {
        file("var/lib/dpkg/status", STATUS.as_bytes(), 0o644);
    }
    for applet in ["sh", "echo", "cat", "true"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    tar.into_inner().unwrap()
}

/// An OCI layout of one gzip layer; answers the manifest digest.
fn write_oci_layout(dir: &Path, with_status: bool) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8], media_type: &str| {
        let hex = sha256(bytes);
        std::fs::write(blobs.join(&hex), bytes).unwrap();
        serde_json::json!({
            "mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len(),
        })
    };
    let layer = layer(with_status);
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
    let manifest_desc = put(&manifest, "application/vnd.oci.image.manifest.v1+json");
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [manifest_desc]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    sha256(&manifest)
}

fn import(daemon: &Daemon, layout: &Path, name: &str) -> (String, String) {
    let state = daemon.state.to_str().unwrap();
    let source = format!("oci:{}", layout.display());
    let out = daemon.kiln(&[
        "image",
        "import",
        "--state-dir",
        state,
        &source,
        "--name",
        name,
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    (text(&out.stdout).trim().to_string(), text(&out.stderr))
}

fn image_sbom(daemon: &Daemon, image: &str) -> (serde_json::Value, String, std::path::PathBuf) {
    let state = daemon.state.to_str().unwrap();
    let out = daemon.kiln(&["image", "sbom", "--state-dir", state, image]);
    assert!(out.status.success(), "{}", describe(&out));
    let file = daemon.path(&format!("{image}.cdx.json").replace(['@', ':'], "-"));
    std::fs::write(&file, &out.stdout).unwrap();
    (
        serde_json::from_slice(&out.stdout).unwrap(),
        text(&out.stderr),
        file,
    )
}

/// The reference library's strict 1.5 validator.
fn validate(python: &Path, file: &Path) {
    let out = std::process::Command::new(python)
        .arg(repo_root().join("tests/py/check_cyclonedx.py"))
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn imported_images_have_a_valid_sbom_and_jobs_get_it_signed_and_referenced() {
    let test = "imported_images_have_a_valid_sbom_and_jobs_get_it_signed_and_referenced";
    if !require_root(test) {
        return;
    }
    let python = python(test);
    let daemon = Daemon::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("deb-oci");
    let manifest = write_oci_layout(&layout, true);
    let (pinned, said) = import(&daemon, &layout, "debbb");
    assert_eq!(pinned, format!("debbb@sha256:{manifest}"));
    assert!(
        said.contains("SBOM: 2 packages from var/lib/dpkg/status"),
        "{said}"
    );

    let (sbom, _, file) = image_sbom(&daemon, "debbb");
    if let Some(python) = &python {
        validate(python, &file);
    }
    assert_eq!(sbom["bomFormat"], "CycloneDX");
    assert_eq!(sbom["specVersion"], "1.5");
    assert!(sbom["serialNumber"]
        .as_str()
        .unwrap()
        .starts_with("urn:uuid:"));
    let component = &sbom["metadata"]["component"];
    assert_eq!(component["name"], "debbb");
    assert_eq!(component["version"], format!("sha256:{manifest}").as_str());
    assert_eq!(
        component["hashes"],
        serde_json::json!([{"alg": "SHA-256", "content": manifest}])
    );
    let purls: Vec<&str> = sbom["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["type"], "library");
            c["purl"].as_str().unwrap()
        })
        .collect();
    // The package left as config files only is not in the image.
    assert_eq!(
        purls,
        [
            "pkg:deb/debian/busybox@1:1.36.1-9?arch=amd64",
            "pkg:deb/debian/libc6@2.36-9%2Bdeb12u7?arch=amd64",
        ]
    );

    // A job on the image: its SBOM, signed, beside the provenance.
    let out = daemon.kiln(&[
        "run",
        "--image",
        &pinned,
        "--attest-dir",
        "attest",
        "--output",
        "out.txt",
        "--",
        "sh",
        "-c",
        "echo built > out.txt",
    ]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    let attest = daemon.path("attest");
    let find = |suffix: &str| {
        std::fs::read_dir(&attest)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_str().unwrap().ends_with(suffix))
            .unwrap_or_else(|| panic!("no {suffix} in {}", attest.display()))
    };
    let sbom_envelope_bytes = std::fs::read(find(".sbom.intoto.json")).unwrap();
    let sbom_envelope: serde_json::Value = serde_json::from_slice(&sbom_envelope_bytes).unwrap();
    let key = daemon.kiln(&["keys", "public"]);
    assert!(key.status.success(), "{}", describe(&key));
    let public = provenance::PublicKey::from_spki_pem(&text(&key.stdout)).unwrap();
    let verified = provenance::dsse::verify_envelope(&sbom_envelope, &[public]).unwrap();
    assert_eq!(verified.signed_by, vec![public.keyid()]);
    assert_eq!(verified.payload_type, "application/vnd.in-toto+json");
    let statement: serde_json::Value = serde_json::from_slice(&verified.payload).unwrap();
    assert_eq!(statement["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(statement["predicateType"], "https://cyclonedx.org/bom");
    assert_eq!(statement["subject"][0]["name"], "debbb");
    assert_eq!(
        statement["subject"][0]["digest"],
        serde_json::json!({"sha256": manifest})
    );
    assert_eq!(statement["predicate"], sbom);

    // A tampered envelope does not verify.
    let mut forged = sbom_envelope.clone();
    let mut payload = verified.payload.clone();
    let at = payload.len() / 2;
    payload[at] ^= 1;
    forged["payload"] = base64::engine::general_purpose::STANDARD
        .encode(&payload)
        .into();
    assert!(provenance::dsse::verify_envelope(&forged, &[public]).is_err());

    // The provenance names the SBOM attestation in the image's entry.
    let provenance: serde_json::Value =
        serde_json::from_slice(&std::fs::read(find(".provenance.json")).unwrap()).unwrap();
    let payload = base64::engine::general_purpose::STANDARD
        .decode(provenance["payload"].as_str().unwrap())
        .unwrap();
    let statement: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    let image_dep = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["annotations"]["kind"] == "image")
        .unwrap()
        .clone();
    assert_eq!(
        image_dep["annotations"]["sbom"],
        serde_json::json!({"sha256": sha256(&sbom_envelope_bytes)})
    );

    // An image without package databases: an SBOM without components, and a word.
    let bare = work.path().join("bare-oci");
    write_oci_layout(&bare, false);
    let (_, said) = import(&daemon, &bare, "bare");
    assert!(said.contains("no package database"), "{said}");
    let (sbom, said, file) = image_sbom(&daemon, "bare");
    assert!(said.contains("no package database"), "{said}");
    assert_eq!(sbom["components"], serde_json::json!([]));
    if let Some(python) = &python {
        validate(python, &file);
    }
}
