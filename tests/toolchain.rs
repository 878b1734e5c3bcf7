//! A real toolchain: the Debian bookworm gcc image of `images/debian-gcc` (built with
//! mmdebstrap and umoci from Debian's packages, cached under `target/images/`), imported
//! with `kiln image import`, compiles a multi-file C program in a job pinned to its digest;
//! the provenance passes a policy that forbids unpinned images and allows exactly that
//! digest, and the same job on the unpinned `host` image fails it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use support::*;

const TAG: &str = "bookworm";
const BUILDER: &str = "kiln://toolchain-test";

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// In CI a missing tool or a failed build is a failure; elsewhere the test skips.
fn unavailable(test: &str, why: &str) -> Option<PathBuf> {
    assert!(!in_ci(), "{test}: CI=true but {why}");
    eprintln!("SKIPPED: {test}: {why}");
    None
}

/// The image's OCI layout, built once per recipe: the cache is keyed on the SHA-256 of
/// the build script, which holds every input of the build (suite, packages, timestamp).
fn debian_gcc_layout(test: &str) -> Option<PathBuf> {
    let recipe = repo_root().join("images/debian-gcc/build");
    let key = hex::encode(Sha256::digest(std::fs::read(&recipe).unwrap()));
    let cache = repo_root().join("target/images");
    let layout = cache.join("debian-gcc-oci");
    let stamp = cache.join("debian-gcc-oci.stamp");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == key)
        && layout.join("index.json").is_file()
    {
        return Some(layout);
    }
    for tool in ["mmdebstrap", "umoci"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap()
            .status
            .success();
        if !found {
            return unavailable(
                test,
                &format!("{tool} is not installed (apt-get install {tool})"),
            );
        }
    }
    std::fs::create_dir_all(&cache).unwrap();
    let _ = std::fs::remove_file(&stamp);
    let _ = std::fs::remove_dir_all(&layout);
    let staging = cache.join(format!("debian-gcc-oci.build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let out = Command::new(&recipe).arg(&staging).output().unwrap();
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&staging);
        return unavailable(test, &format!("the image build failed: {}", describe(&out)));
    }
    std::fs::rename(&staging, &layout).unwrap();
    std::fs::write(&stamp, format!("{key}\n")).unwrap();
    Some(layout)
}

/// The manifest digest the layout's index names (one manifest).
fn manifest_digest(layout: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{index}");
    manifests[0]["digest"].as_str().unwrap().to_string()
}

/// Two translation units, a header and a Makefile.
fn write_sources(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let files = [
        (
            "greet.h",
            "#ifndef GREET_H\n#define GREET_H\nvoid greet(const char *who);\n#endif\n",
        ),
        (
            "greet.c",
            "#include <stdio.h>\n#include \"greet.h\"\n\
             void greet(const char *who) {\n\
             \tprintf(\"hello, %s, from gcc %d\\n\", who, __GNUC__);\n}\n",
        ),
        (
            "main.c",
            "#include \"greet.h\"\nint main(void) {\n\tgreet(\"kiln\");\n\treturn 0;\n}\n",
        ),
        (
            "Makefile",
            "hello: main.o greet.o\n\t$(CC) -o $@ main.o greet.o\n\n\
             %.o: %.c greet.h\n\t$(CC) -O2 -Wall -Werror -c -o $@ $<\n",
        ),
    ];
    for (name, content) in files {
        std::fs::write(dir.join(name), content).unwrap();
    }
}

fn write_job(dir: &Path, image: &str) -> PathBuf {
    let job = dir.join(format!("job-{}.toml", image.split('@').next().unwrap()));
    std::fs::write(
        &job,
        format!(
            r#"name = "c-program"
image = "{image}"

[[inputs]]
path = "."
from = "src"

[[steps]]
name = "build"
run = ["make", "CC=gcc"]

[[steps]]
name = "run"
run = ["/bin/sh", "-c", "./hello > greeting.txt"]

[[outputs]]
path = "hello"

[[outputs]]
path = "greeting.txt"
"#
        ),
    )
    .unwrap();
    job
}

fn only_file(dir: &Path, suffix: &str) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_str().unwrap().ends_with(suffix))
        .unwrap_or_else(|| panic!("no {suffix} in {}", dir.display()))
}

/// Submits `job`, writing attestations to `dir/links` and outputs to `dir/out`.
fn submit(daemon: &Daemon, job: &Path, dir: &Path) -> PathBuf {
    let (links, out_dir) = (dir.join("links"), dir.join("out"));
    let out = daemon.kiln(&[
        "submit",
        job.to_str().unwrap(),
        "--attest-dir",
        links.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    dir.to_path_buf()
}

fn verify(daemon: &Daemon, run: &Path, policy: &Path, key: &Path) -> std::process::Output {
    let envelope = only_file(&run.join("links"), ".provenance.json");
    daemon.kiln(&[
        "verify",
        "--provenance",
        envelope.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
        run.join("out/hello").to_str().unwrap(),
        run.join("out/greeting.txt").to_str().unwrap(),
    ])
}

#[test]
fn a_c_program_builds_in_the_pinned_debian_gcc_image_and_its_provenance_passes_policy() {
    let test = "a_c_program_builds_in_the_pinned_debian_gcc_image_and_its_provenance_passes_policy";
    if !require_root(test) {
        return;
    }
    let Some(layout) = debian_gcc_layout(test) else {
        return;
    };
    let digest = manifest_digest(&layout);

    let config = config_file(&format!("builder_id = {BUILDER:?}\n"));
    let daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    let state = daemon.state.to_str().unwrap();
    let source = format!("oci:{}:{TAG}", layout.display());
    let out = daemon.kiln(&[
        "image",
        "import",
        "--state-dir",
        state,
        &source,
        "--name",
        "debian-gcc",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let pinned = format!("debian-gcc@{digest}");
    assert_eq!(text(&out.stdout).trim(), pinned);

    // The SBOM lists the toolchain's Debian packages.
    let out = daemon.kiln(&["image", "sbom", "--state-dir", state, "debian-gcc"]);
    assert!(out.status.success(), "{}", describe(&out));
    let sbom: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for package in ["gcc-12", "make", "libc6-dev"] {
        assert!(
            sbom["components"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == package),
            "{package} not in the SBOM"
        );
    }

    let work = daemon.path("c");
    write_sources(&work.join("src"));
    let in_image = submit(&daemon, &write_job(&work, &pinned), &work.join("image"));
    // The program was compiled by the image's gcc 12 and ran in a later step.
    assert_eq!(
        std::fs::read_to_string(in_image.join("out/greeting.txt")).unwrap(),
        "hello, kiln, from gcc 12\n"
    );
    let link = signed_link(&in_image.join("links"), "build");
    assert_eq!(
        link["environment"]["image"]["manifest_digest"]["sha256"],
        digest.strip_prefix("sha256:").unwrap(),
        "{link}"
    );

    let key = daemon.path("runner.pub");
    std::fs::write(&key, daemon.kiln(&["keys", "public"]).stdout).unwrap();
    let policy = daemon.path("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "allowed_builder_ids = [{BUILDER:?}]\nallowed_images = [{digest:?}]\n\
             allow_unpinned_images = false\nrequired_steps = [\"build\", \"run\"]\n"
        ),
    )
    .unwrap();
    let out = verify(&daemon, &in_image, &policy, &key);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(text(&out.stdout).starts_with("PASS"), "{}", describe(&out));

    // The same build on the host's unpinned /usr fails the same policy.
    let on_host = submit(&daemon, &write_job(&work, "host"), &work.join("host"));
    let out = verify(&daemon, &on_host, &policy, &key);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("not pinned by digest"),
        "{}",
        describe(&out)
    );
}
