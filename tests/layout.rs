//! `kiln layout init`: the layout it writes for a real job's steps is accepted by the
//! reference `in-toto-verify` 3.1 and by `kiln verify --layout` for the job's links and
//! outputs, and rejected by both for a tampered or planted output, another owner's
//! signature and an expired layout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use provenance::SigningKey;
use support::*;

/// Two steps (the second reads the first's product), a file and a directory output.
const JOB: &str = r#"
name = "hello"
image = "host"
[[inputs]]
path = "hello.c"
from = "./src/hello.c"
[[inputs]]
path = "docs"
from = "./docs"
[[steps]]
name = "compile"
run = ["cc", "-O2", "-o", "hello", "hello.c"]
[[steps]]
name = "test"
run = ["/bin/sh", "-c", "mkdir -p report && ./hello > report/result.txt"]
timeout = 60
[[outputs]]
path = "hello"
[[outputs]]
path = "report"
"#;

/// A fresh owner key written as `kiln layout init --owner-key` reads it (0600);
/// returns the private and public key files.
fn owner_key(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = SigningKey::generate();
    let private = dir.join(format!("{name}.pem"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&private)
        .unwrap();
    std::io::Write::write_all(&mut file, key.to_pkcs8_pem().as_bytes()).unwrap();
    let public = dir.join(format!("{name}.pub"));
    std::fs::write(&public, key.public_key().to_spki_pem()).unwrap();
    (private, public)
}

fn write_job(daemon: &Daemon) -> PathBuf {
    let job_dir = daemon.path("job");
    std::fs::create_dir_all(job_dir.join("src")).unwrap();
    std::fs::create_dir_all(job_dir.join("docs")).unwrap();
    std::fs::write(job_dir.join("src/hello.c"), HELLO_C).unwrap();
    std::fs::write(job_dir.join("docs/README"), "how to say hello\n").unwrap();
    let job = job_dir.join("job.toml");
    std::fs::write(&job, JOB).unwrap();
    job
}

#[test]
fn a_generated_layout_verifies_the_job_and_rejects_tampering() {
    if !require_root("a_generated_layout_verifies_the_job_and_rejects_tampering") {
        return;
    }
    let daemon = Daemon::start();
    let job = write_job(&daemon);
    let out = daemon.kiln(&[
        "submit",
        job.to_str().unwrap(),
        "--attest-dir",
        "links",
        "--out",
        "out",
    ]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    let result = daemon.path("out/report/result.txt");
    assert_eq!(std::fs::read_to_string(&result).unwrap(), "hello, kiln\n");

    // The runner key from the daemon (no --runner-key), the layout on stdout.
    let (owner, owner_pub) = owner_key(daemon.dir.path(), "owner");
    let init = daemon.kiln(&[
        "layout",
        "init",
        job.to_str().unwrap(),
        "--owner-key",
        owner.to_str().unwrap(),
    ]);
    assert!(init.status.success(), "{}", describe(&init));
    let layout = daemon.path("root.layout");
    std::fs::write(&layout, &init.stdout).unwrap();
    let signed: serde_json::Value = serde_json::from_slice(&init.stdout).unwrap();
    let steps: Vec<&str> = signed["signed"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["compile", "test"]);

    let links = daemon.path("links");
    let artifacts = daemon.path("out");
    let verifier = in_toto_verify("layout/in-toto");
    let reference = |layout: &Path, owner_pub: &Path| {
        verifier
            .as_ref()
            .map(|tool| run_in_toto_verify(tool, layout, owner_pub, &links, &artifacts))
    };
    if let Some(verdict) = reference(&layout, &owner_pub) {
        assert!(
            verdict.status.success(),
            "in-toto-verify: {}",
            describe(&verdict)
        );
    }
    let ours = kiln_verify(&daemon, &layout, &owner_pub, &links, &artifacts);
    assert!(ours.status.success(), "kiln verify: {}", describe(&ours));
    assert!(text(&ours.stdout).contains("PASSED"), "{}", describe(&ours));

    // One flipped bit of an output in the directory output.
    let original = std::fs::read(&result).unwrap();
    flip_byte(&result);
    if let Some(verdict) = reference(&layout, &owner_pub) {
        assert!(
            !verdict.status.success(),
            "in-toto-verify accepted a tampered output"
        );
    }
    let ours = kiln_verify(&daemon, &layout, &owner_pub, &links, &artifacts);
    assert_eq!(ours.status.code(), Some(1), "{}", describe(&ours));
    let said = text(&ours.stdout);
    assert!(
        said.contains("\"report/result.txt\"") && said.contains("step 'test'"),
        "the failure names neither the file nor the step: {said}"
    );
    std::fs::write(&result, original).unwrap();

    // A file among the outputs that the final step never made.
    let planted = daemon.path("out/report/extra.sh");
    std::fs::write(&planted, "#!/bin/sh\n").unwrap();
    if let Some(verdict) = reference(&layout, &owner_pub) {
        assert!(
            !verdict.status.success(),
            "in-toto-verify accepted a planted output"
        );
    }
    let ours = kiln_verify(&daemon, &layout, &owner_pub, &links, &artifacts);
    assert_eq!(ours.status.code(), Some(1), "{}", describe(&ours));
    let said = text(&ours.stdout);
    assert!(
        said.contains("\"report/extra.sh\"") && said.contains("step 'test'"),
        "{said}"
    );
    std::fs::remove_file(&planted).unwrap();

    // A layout signed by another owner than the key the verifiers are given. The runner
    // key comes from a file this time, and the layout goes to --out.
    let runner_pub = daemon.path("runner.pub");
    let public = daemon.kiln(&["keys", "public"]);
    assert!(public.status.success(), "{}", describe(&public));
    std::fs::write(&runner_pub, &public.stdout).unwrap();
    let (intruder, _) = owner_key(daemon.dir.path(), "intruder");
    let forged = daemon.path("forged.layout");
    let init = daemon.kiln(&[
        "layout",
        "init",
        job.to_str().unwrap(),
        "--owner-key",
        intruder.to_str().unwrap(),
        "--runner-key",
        runner_pub.to_str().unwrap(),
        "--out",
        forged.to_str().unwrap(),
    ]);
    assert!(init.status.success(), "{}", describe(&init));
    if let Some(verdict) = reference(&forged, &owner_pub) {
        assert!(
            !verdict.status.success(),
            "in-toto-verify accepted another owner's layout"
        );
    }
    let ours = kiln_verify(&daemon, &forged, &owner_pub, &links, &artifacts);
    assert_eq!(ours.status.code(), Some(1), "{}", describe(&ours));
    assert!(
        text(&ours.stdout).contains("signature"),
        "{}",
        describe(&ours)
    );

    // The same layout, expired (re-signed by the owner: init refuses a past expiry).
    let mut expired = signed["signed"].clone();
    expired["expires"] = serde_json::json!("2020-01-01T00:00:00Z");
    let owner_key = SigningKey::load(&owner).unwrap();
    let expired_path = daemon.path("expired.layout");
    std::fs::write(
        &expired_path,
        provenance::layout::sign_layout(&expired, &owner_key).unwrap(),
    )
    .unwrap();
    if let Some(verdict) = reference(&expired_path, &owner_pub) {
        assert!(
            !verdict.status.success(),
            "in-toto-verify accepted an expired layout"
        );
    }
    let ours = kiln_verify(&daemon, &expired_path, &owner_pub, &links, &artifacts);
    assert_eq!(ours.status.code(), Some(1), "{}", describe(&ours));
    assert!(
        text(&ours.stdout).contains("expired"),
        "{}",
        describe(&ours)
    );

    // The untouched layout still passes: each rejection above was the change's doing.
    let ours = kiln_verify(&daemon, &layout, &owner_pub, &links, &artifacts);
    assert!(ours.status.success(), "kiln verify: {}", describe(&ours));
}

/// Bad input is refused before anything is written, with the input named; no daemon
/// is needed when the runner key is given.
#[test]
fn layout_init_names_the_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let (owner, _) = owner_key(dir.path(), "owner");
    let runner_pub = dir.path().join("runner.pub");
    std::fs::write(
        &runner_pub,
        SigningKey::generate().public_key().to_spki_pem(),
    )
    .unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(&job, "[[steps]]\nname = 'build'\nrun = ['make']\n").unwrap();
    let init = |extra: &[&str]| {
        let mut args = vec![
            "layout",
            "init",
            job.to_str().unwrap(),
            "--owner-key",
            owner.to_str().unwrap(),
            "--runner-key",
            runner_pub.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        std::process::Command::new(KILN)
            .args(&args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let ok = init(&["--expires", "12h"]);
    assert!(ok.status.success(), "{}", describe(&ok));

    for (args, named) in [
        (
            &["--expires", "2020-01-01T00:00:00Z"][..],
            "--expires \"2020-01-01T00:00:00Z\"",
        ),
        (&["--expires", "soon"][..], "--expires \"soon\""),
    ] {
        let out = init(args);
        assert!(!out.status.success(), "{args:?}: {}", describe(&out));
        assert!(text(&out.stderr).contains(named), "{}", describe(&out));
        assert!(out.stdout.is_empty(), "{}", describe(&out));
    }

    // An owner key others may read is refused, naming the file.
    std::fs::set_permissions(&owner, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = init(&[]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("--owner-key") && text(&out.stderr).contains("owner.pem"),
        "{}",
        describe(&out)
    );
    std::fs::set_permissions(&owner, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    std::fs::write(&runner_pub, "not a key").unwrap();
    let out = init(&[]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("--runner-key"),
        "{}",
        describe(&out)
    );
}
