//! End-to-end: a real `kiln serve` driven by the `kiln` CLI and by reference
//! clients (in-toto-verify, grpcio's health and reflection stubs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::fs::PermissionsExt;

use serde_json::json;
use support::*;

fn write_runner_pub(daemon: &Daemon) -> std::path::PathBuf {
    let out = daemon.kiln(&["keys", "public"]);
    assert!(out.status.success(), "{}", describe(&out));
    let path = daemon.path("runner.pub");
    std::fs::write(&path, &out.stdout).unwrap();
    assert!(text(&out.stdout).starts_with("-----BEGIN PUBLIC KEY-----"));
    path
}

#[test]
fn run_streams_output_writes_link_and_outputs_that_in_toto_verify_accepts() {
    if !require_root("run_streams_output_writes_link_and_outputs_that_in_toto_verify_accepts") {
        return;
    }
    let daemon = Daemon::start();
    let out = run_hello(&daemon, &[]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    assert_eq!(text(&out.stdout), "hello, kiln\n");
    let hello = daemon.path("out/hello");
    assert!(std::fs::metadata(&hello).unwrap().permissions().mode() & 0o111 != 0);
    let program = std::process::Command::new(&hello).output().unwrap();
    assert_eq!(text(&program.stdout), "hello, kiln\n");

    let (links, others): (Vec<_>, Vec<_>) = std::fs::read_dir(daemon.path("links"))
        .unwrap()
        .flatten()
        .partition(|e| e.file_name().to_str().unwrap().ends_with(".link"));
    assert_eq!(links.len(), 1);
    // Besides the link: the job's SLSA provenance, and the same as a Sigstore bundle.
    let mut others: Vec<String> = others
        .iter()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    others.sort();
    assert_eq!(others.len(), 2, "{others:?}");
    let job_id = others[0].strip_suffix(".provenance.json").unwrap();
    assert_eq!(others[1], format!("{job_id}.provenance.sigstore.json"));
    let name = links[0].file_name().into_string().unwrap();
    assert!(
        name.starts_with("run.") && name.ends_with(".link"),
        "{name}"
    );
    let link: serde_json::Value =
        serde_json::from_slice(&std::fs::read(links[0].path()).unwrap()).unwrap();
    let signed = &link["signed"];
    assert_eq!(signed["_type"], "link");
    assert!(signed["environment"].is_object());
    assert!(signed["environment"]["sandbox_profile"]["sha256"].is_string());
    // Every layer applied on this host: nothing waived.
    assert_eq!(
        signed["environment"]["waived_layers"],
        serde_json::json!([])
    );
    assert!(signed["byproducts"]["kiln"]["seccomp_denials"].is_object());
    assert_eq!(signed["environment"]["image"]["pinned"], false);
    assert_eq!(signed["byproducts"]["return-value"], 0);
    assert_eq!(signed["byproducts"]["stdout"], "hello, kiln\n");
    assert!(signed["materials"]["hello.c"]["sha256"].is_string());
    assert!(signed["products"]["hello"]["sha256"].is_string());

    let (Some(python), Some(verifier)) = (python("run/in-toto"), in_toto_verify("run/in-toto"))
    else {
        return;
    };
    let runner_pub = write_runner_pub(&daemon);
    let (layout, owner) = hello_layout(&python, daemon.dir.path(), &runner_pub);
    let links_dir = daemon.path("links");
    let out_dir = daemon.path("out");
    let verdict = run_in_toto_verify(&verifier, &layout, &owner, &links_dir, &out_dir);
    assert!(
        verdict.status.success(),
        "in-toto-verify: {}",
        describe(&verdict)
    );
    let ours = kiln_verify(&daemon, &layout, &owner, &links_dir, &out_dir);
    assert!(ours.status.success(), "kiln verify: {}", describe(&ours));

    flip_byte(&hello);
    let verdict = run_in_toto_verify(&verifier, &layout, &owner, &links_dir, &out_dir);
    assert!(
        !verdict.status.success(),
        "in-toto-verify accepted a tampered output"
    );
    let ours = kiln_verify(&daemon, &layout, &owner, &links_dir, &out_dir);
    assert!(
        !ours.status.success(),
        "kiln verify accepted a tampered output"
    );
}

#[test]
fn submit_runs_a_multi_step_job_and_tampering_fails_every_verifier() {
    if !require_root("submit_runs_a_multi_step_job_and_tampering_fails_every_verifier") {
        return;
    }
    let daemon = Daemon::start();
    let job_dir = daemon.path("job");
    std::fs::create_dir_all(job_dir.join("src")).unwrap();
    std::fs::write(job_dir.join("src/hello.c"), HELLO_C).unwrap();
    std::fs::write(
        job_dir.join("job.toml"),
        r#"
name = "hello"
image = "host"
[[inputs]]
path = "hello.c"
from = "./src/hello.c"
[[steps]]
name = "compile"
run = ["cc", "-O2", "-o", "hello", "hello.c"]
[[steps]]
name = "test"
run = ["/bin/sh", "-c", "./hello > result.txt"]
timeout = 60
[[outputs]]
path = "hello"
[[outputs]]
path = "result.txt"
"#,
    )
    .unwrap();
    let out = daemon.kiln(&[
        "submit",
        job_dir.join("job.toml").to_str().unwrap(),
        "--attest-dir",
        "links",
        "--out",
        "out",
    ]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    assert_eq!(
        std::fs::read_to_string(daemon.path("out/result.txt")).unwrap(),
        "hello, kiln\n"
    );
    let summary = text(&out.stderr);
    assert!(
        summary.contains("compile") && summary.contains("succeeded"),
        "{summary}"
    );

    let (Some(python), Some(verifier)) =
        (python("submit/in-toto"), in_toto_verify("submit/in-toto"))
    else {
        return;
    };
    let runner_pub = write_runner_pub(&daemon);
    let (layout, owner) = make_layout(
        &python,
        daemon.dir.path(),
        &runner_pub,
        json!({
            "steps": [
                {
                    "name": "compile",
                    "expected_command": ["cc", "-O2", "-o", "hello", "hello.c"],
                    "expected_materials": [["ALLOW", "hello.c"], ["DISALLOW", "*"]],
                    "expected_products": [["MATCH", "hello.c", "WITH", "MATERIALS", "FROM", "compile"], ["CREATE", "hello"], ["DISALLOW", "*"]],
                },
                {
                    "name": "test",
                    "expected_command": ["/bin/sh", "-c", "./hello > result.txt"],
                    "expected_materials": [["MATCH", "*", "WITH", "PRODUCTS", "FROM", "compile"], ["DISALLOW", "*"]],
                    "expected_products": [["CREATE", "result.txt"], ["MATCH", "*", "WITH", "PRODUCTS", "FROM", "compile"], ["DISALLOW", "*"]],
                },
            ],
            "inspect": [{
                "name": "outputs",
                "run": ["true"],
                "expected_materials": [
                    ["MATCH", "hello", "WITH", "PRODUCTS", "FROM", "compile"],
                    ["MATCH", "result.txt", "WITH", "PRODUCTS", "FROM", "test"],
                    ["DISALLOW", "*"],
                ],
            }],
        }),
    );
    let links = daemon.path("links");
    let artifacts = daemon.path("out");
    let verdict = run_in_toto_verify(&verifier, &layout, &owner, &links, &artifacts);
    assert!(
        verdict.status.success(),
        "in-toto-verify: {}",
        describe(&verdict)
    );
    let ours = kiln_verify(&daemon, &layout, &owner, &links, &artifacts);
    assert!(ours.status.success(), "kiln verify: {}", describe(&ours));

    // The job's SLSA provenance, checked by independent code: signature by the
    // runner key, types, and both outputs as subjects.
    let envelope = std::fs::read_dir(&links)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_str().unwrap().ends_with(".provenance.json"))
        .expect("kiln submit --attest-dir wrote no provenance");
    let check_slsa = |artifacts: &[&std::path::Path]| {
        let mut cmd = std::process::Command::new(&python);
        cmd.arg(repo_root().join("tests/py/check_slsa.py"))
            .arg(&envelope)
            .arg(&runner_pub)
            .args(artifacts);
        cmd.output().unwrap()
    };
    let hello = artifacts.join("hello");
    let result = artifacts.join("result.txt");
    let out = check_slsa(&[&hello, &result]);
    assert!(out.status.success(), "SLSA check: {}", describe(&out));
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["subjects"], json!(["hello", "result.txt"]), "{seen}");
    assert_eq!(seen["build_type"], "https://kiln.dev/buildtypes/job/v1");
    assert!(
        seen["builder"].as_str().unwrap().starts_with("kiln://"),
        "{seen}"
    );
    assert!(
        seen["dependencies"]
            .as_array()
            .unwrap()
            .contains(&json!("hello.c")),
        "{seen}"
    );
    assert_eq!(seen["byproducts"].as_array().unwrap().len(), 2, "{seen}");

    // kiln verify's provenance mode gives the same verdict, under a policy.
    let policy = daemon.path("policy.toml");
    let write_policy = |unpinned: bool| {
        std::fs::write(
            &policy,
            format!(
                "allowed_builder_ids = [{:?}]\nallow_unpinned_images = {unpinned}\nrequired_steps = [\"compile\", \"test\"]\n",
                seen["builder"].as_str().unwrap()
            ),
        )
        .unwrap();
    };
    let kiln_verify_provenance = |json: bool| {
        let mut args = vec![
            "verify",
            "--provenance",
            envelope.to_str().unwrap(),
            "--key",
            runner_pub.to_str().unwrap(),
            "--policy",
            policy.to_str().unwrap(),
        ];
        if json {
            args.push("--json");
        }
        args.extend([hello.to_str().unwrap(), result.to_str().unwrap()]);
        daemon.kiln(&args)
    };
    write_policy(true);
    let ours = kiln_verify_provenance(false);
    assert!(ours.status.success(), "{}", describe(&ours));
    assert!(
        text(&ours.stdout).starts_with("PASS"),
        "{}",
        describe(&ours)
    );
    // The host image is unpinned: a policy that forbids that fails the build.
    write_policy(false);
    let ours = kiln_verify_provenance(true);
    assert_eq!(ours.status.code(), Some(1), "{}", describe(&ours));
    let verdict: serde_json::Value = serde_json::from_slice(&ours.stdout).unwrap();
    assert_eq!(verdict["passed"], false, "{verdict}");
    write_policy(true);

    // One flipped byte of an output.
    let original = std::fs::read(&result).unwrap();
    flip_byte(&result);
    let verdict = run_in_toto_verify(&verifier, &layout, &owner, &links, &artifacts);
    assert!(
        !verdict.status.success(),
        "in-toto-verify accepted a tampered output"
    );
    let ours = kiln_verify(&daemon, &layout, &owner, &links, &artifacts);
    assert!(
        !ours.status.success(),
        "kiln verify accepted a tampered output"
    );
    let ours = kiln_verify_provenance(false);
    assert_eq!(
        ours.status.code(),
        Some(1),
        "kiln verify accepted a tampered output"
    );
    let slsa = check_slsa(&[&hello, &result]);
    assert!(
        !slsa.status.success(),
        "the SLSA check accepted a tampered output"
    );
    std::fs::write(&result, original).unwrap();

    // A link whose recorded product was edited no longer carries a valid signature.
    let link_path = std::fs::read_dir(&links)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("compile.")
        })
        .unwrap();
    let mut link: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&link_path).unwrap()).unwrap();
    let digest = link["signed"]["products"]["hello"]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let forged = format!(
        "{}{}",
        if digest.starts_with('0') { "1" } else { "0" },
        &digest[1..]
    );
    link["signed"]["products"]["hello"]["sha256"] = json!(forged);
    std::fs::write(&link_path, serde_json::to_vec(&link).unwrap()).unwrap();
    let verdict = run_in_toto_verify(&verifier, &layout, &owner, &links, &artifacts);
    assert!(
        !verdict.status.success(),
        "in-toto-verify accepted a forged link"
    );
    let ours = kiln_verify(&daemon, &layout, &owner, &links, &artifacts);
    assert!(!ours.status.success(), "kiln verify accepted a forged link");
}

#[test]
fn exit_codes_follow_the_process_convention() {
    if !require_root("exit_codes_follow_the_process_convention") {
        return;
    }
    let daemon = Daemon::start();
    let out = daemon.kiln(&[
        "run",
        "--",
        "/bin/sh",
        "-c",
        "echo to-out; echo to-err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(text(&out.stdout).contains("to-out"));
    assert!(text(&out.stderr).contains("to-err"));

    let out = daemon.kiln(&["run", "--", "/no/such/program"]);
    assert_eq!(out.status.code(), Some(127), "{}", describe(&out));

    let out = daemon.kiln(&["run", "--", "/etc/passwd"]);
    assert_eq!(out.status.code(), Some(126), "{}", describe(&out));

    let out = daemon.kiln(&["run", "--", "/bin/sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(128 + 15), "{}", describe(&out));

    let out = daemon.kiln(&["run", "--timeout", "1", "--", "/bin/sh", "-c", "sleep 60"]);
    assert_eq!(out.status.code(), Some(128 + 9), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("timed out"),
        "{}",
        describe(&out)
    );
}

#[test]
fn bad_specs_are_refused_with_the_field_named() {
    if !require_root("bad_specs_are_refused_with_the_field_named") {
        return;
    }
    let daemon = Daemon::start();
    let out = daemon.kiln(&["run", "--output", "../escape", "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("outputs[0]") && err.contains("\"..\""),
        "{err}"
    );

    let out = daemon.kiln(&["run", "--step", "a/b", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("steps[0].name"),
        "{}",
        describe(&out)
    );

    let out = daemon.kiln(&["run", "--image", "nonexistent", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("not installed"),
        "{}",
        describe(&out)
    );

    std::fs::write(
        daemon.path("net.toml"),
        "[[steps]]\nname = \"fetch\"\nrun = [\"true\"]\nnetwork = [\"example.org\"]\n",
    )
    .unwrap();
    let out = daemon.kiln(&["submit", "net.toml"]);
    assert_eq!(out.status.code(), Some(125));
    let err = text(&out.stderr);
    assert!(
        err.contains("steps[0].allow_net[0]") && err.contains("a port is required"),
        "{err}"
    );

    // A fifo left in the workspace cannot be attested: the step fails, and the
    // message names it as the step saw it, not by the daemon's state path.
    let out = daemon.kiln(&["run", "--", "/bin/sh", "-c", "mkfifo pipe"]);
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));
    let err = text(&out.stderr);
    assert!(err.contains("/workspace/pipe"), "{err}");
    assert!(!err.contains(daemon.state.to_str().unwrap()), "{err}");

    // A declared output that is a symlink is never followed.
    let out = daemon.kiln(&[
        "run",
        "--output",
        "link",
        "--",
        "/bin/sh",
        "-c",
        "ln -s /etc/shadow link",
    ]);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(text(&out.stderr).contains("symlink"), "{}", describe(&out));
}

#[test]
fn demo_builds_runs_and_verifies() {
    if !require_root("demo_builds_runs_and_verifies") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(KILN);
    cmd.arg("demo").current_dir(dir.path());
    if let Some(verifier) = in_toto_verify("demo/in-toto") {
        cmd.env("KILN_IN_TOTO_VERIFY", verifier);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("PASSED"), "{stdout}");
    assert!(stdout.contains("Hello from a Kiln sandbox."), "{stdout}");
    if std::env::var_os("KILN_IN_TOTO_VERIFY").is_some() {
        assert!(
            stdout.contains("in-toto-verify") && !stdout.contains("FAILED"),
            "{stdout}"
        );
    }
}

#[test]
fn health_and_reflection_answer_reference_clients() {
    if !require_root("health_and_reflection_answer_reference_clients") {
        return;
    }
    let Some(python) = python("health_and_reflection") else {
        return;
    };
    let daemon = Daemon::start();
    let out = std::process::Command::new(python)
        .arg(repo_root().join("tests/py/grpc_probe.py"))
        .arg(&daemon.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for service in [
        "",
        "kiln.v1.Jobs",
        "kiln.v1.ContentStore",
        "kiln.v1.Attestations",
    ] {
        assert_eq!(seen["health"][service], "SERVING", "{seen}");
    }
    let services: Vec<&str> = seen["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    for service in [
        "kiln.v1.Jobs",
        "kiln.v1.ContentStore",
        "kiln.v1.Attestations",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(&service), "{services:?}");
    }
}

#[test]
fn busybox_image_is_pinned_and_a_modified_tree_is_refused() {
    if !require_root("busybox_image_is_pinned_and_a_modified_tree_is_refused") {
        return;
    }
    let daemon = Daemon::start();
    let state = daemon.state.to_str().unwrap().to_string();
    let recipe = repo_root().join("images/busybox");
    let out = daemon.kiln(&[
        "image",
        "build",
        "--state-dir",
        &state,
        recipe.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = daemon.kiln(&["image", "list", "--state-dir", &state]);
    assert!(text(&out.stdout).contains("busybox"), "{}", describe(&out));

    let out = daemon.kiln(&[
        "run",
        "--image",
        "busybox",
        "--attest-dir",
        "links",
        "--",
        "sh",
        "-c",
        "echo from busybox; test ! -e /usr/bin/cc && echo no-host-usr",
    ]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    assert_eq!(text(&out.stdout), "from busybox\nno-host-usr\n");
    let link = std::fs::read_dir(daemon.path("links"))
        .unwrap()
        .flatten()
        .next()
        .unwrap();
    let link: serde_json::Value =
        serde_json::from_slice(&std::fs::read(link.path()).unwrap()).unwrap();
    let image = &link["signed"]["environment"]["image"];
    assert_eq!(image["name"], "busybox");
    assert!(
        image["digest"]["sha256"].as_str().unwrap().len() == 64,
        "{image}"
    );

    // Modify the stored tree behind the record's back: the daemon refuses the image.
    let images = daemon.state.join("images/busybox");
    let tree = std::fs::read_dir(&images)
        .unwrap()
        .flatten()
        .find(|e| e.path().join("rootfs").is_dir())
        .unwrap()
        .path();
    std::fs::write(tree.join("rootfs/etc/hosts"), "10.0.0.1 evil\n").unwrap();
    let out = daemon.kiln(&["run", "--image", "busybox", "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(text(&out.stderr).contains("modified"), "{}", describe(&out));
}

#[test]
fn queued_jobs_survive_a_restart_and_sigterm_drains() {
    if !require_root("queued_jobs_survive_a_restart_and_sigterm_drains") {
        return;
    }
    let mut daemon = Daemon::start();
    let out = daemon.kiln(&["run", "--", "/bin/sh", "-c", "echo first"]);
    assert!(out.status.success(), "{}", describe(&out));
    let status = daemon.stop();
    assert!(status.success(), "daemon exit {status:?}\n{}", daemon.log());
    assert!(!daemon.socket.exists(), "socket left behind");
    daemon.spawn(&[]);
    let out = daemon.kiln(&["run", "--", "/bin/sh", "-c", "echo second"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "second\n");
    assert!(daemon.state.join("kiln.db").is_file());
    // The ring's current private key, keys/<keyid>.pem.
    let ring: serde_json::Value =
        serde_json::from_slice(&std::fs::read(daemon.state.join("keys/keyring.json")).unwrap())
            .unwrap();
    let key = daemon
        .state
        .join(format!("keys/{}.pem", ring["current"].as_str().unwrap()));
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "signing key mode {mode:o}");
}

#[test]
fn step_start_latency_is_reported_and_cgroup_moves_are_made_cheap() {
    if !require_root("step_start_latency_is_reported_and_cgroup_moves_are_made_cheap") {
        return;
    }
    let cgroup2 = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .find(|l| l.contains(" - cgroup2 "))
            .map(|l| {
                let (left, right) = l.split_once(" - ").unwrap();
                let mount_options = left.split(' ').nth(5).unwrap().to_string();
                let super_options: Vec<String> = right
                    .split(' ')
                    .nth(2)
                    .unwrap()
                    .split(',')
                    .map(String::from)
                    .collect();
                (mount_options, super_options)
            })
    };
    let before = cgroup2();
    let daemon = Daemon::start();
    let out = daemon.kiln(&["run", "--", "/bin/true"]);
    assert!(out.status.success(), "{}", describe(&out));
    let log = daemon.log();
    let id = log
        .lines()
        .find(|l| l.contains("job accepted"))
        .and_then(|l| l.split("job=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(String::from)
        .unwrap_or_else(|| panic!("job id in the daemon log:\n{log}"));
    let job = status_json(&daemon, &id);
    let latency = job["steps"][0]["start_latency_us"].as_u64().unwrap();
    // Measured from the daemon scheduling the step to the step's own execve: it cannot be
    // zero, and a step that started must have started within its duration.
    assert!(latency > 0, "{job}");
    assert!(
        latency <= job["steps"][0]["duration_ms"].as_u64().unwrap() * 1000 + 1000,
        "{job}"
    );
    assert!(
        daemon.log().contains("start_latency_us="),
        "{}",
        daemon.log()
    );

    // The daemon turns on favordynmods (default config) and changes nothing else of the
    // host's cgroup2 mount.
    if let (Some((mount_before, super_before)), Some((mount_after, super_after))) =
        (before, cgroup2())
    {
        if daemon.log().contains("could not turn on favordynmods") {
            eprintln!("this kernel refuses favordynmods: {}", daemon.log());
        } else {
            assert!(
                super_after.iter().any(|o| o == "favordynmods"),
                "{super_after:?}"
            );
        }
        assert_eq!(mount_before, mount_after);
        for option in super_before {
            assert!(
                super_after.contains(&option),
                "{option} lost: {super_after:?}"
            );
        }
    }
}

#[test]
fn sigterm_as_soon_as_the_socket_answers_drains_and_exits_zero() {
    if !require_root("sigterm_as_soon_as_the_socket_answers_drains_and_exits_zero") {
        return;
    }
    for _ in 0..5 {
        let mut daemon = Daemon::start();
        let status = daemon.stop();
        assert!(status.success(), "{status}:\n{}", daemon.log());
    }
}

fn status_json(daemon: &Daemon, id: &str) -> serde_json::Value {
    let out = daemon.kiln(&["status", "--json", id]);
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn cancel_kills_every_process_of_the_running_step() {
    if !require_root("cancel_kills_every_process_of_the_running_step") {
        return;
    }
    // A uid range of its own, so no other test's sandbox shares it.
    let uid_base = 310_000_000u32;
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), format!("uid_base = {uid_base}\n")).unwrap();
    let daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    std::fs::write(
        daemon.path("sleepy.toml"),
        "[[steps]]\nname = \"sleepy\"\nrun = [\"/bin/sh\", \"-c\", \"setsid sleep 300 & sleep 300\"]\n",
    )
    .unwrap();
    let out = daemon.kiln(&["submit", "--detach", "sleepy.toml"]);
    assert!(out.status.success(), "{}", describe(&out));
    let id = text(&out.stdout).trim().to_string();
    let step_uid = uid_base + 1000;
    wait_until("the step's processes", || {
        host_processes_in_uid_range(step_uid, 1).len() >= 2
    });

    let out = daemon.kiln(&["cancel", &id]);
    assert!(out.status.success(), "{}", describe(&out));
    wait_until("the job to be cancelled", || {
        status_json(&daemon, &id)["state"] == "cancelled"
    });
    let job = status_json(&daemon, &id);
    assert_eq!(job["steps"][0]["state"], "cancelled", "{job}");
    wait_until("every process of the step to die", || {
        host_processes_in_uid_range(step_uid, 1).is_empty()
    });
}

#[test]
fn concurrent_sandboxes_get_disjoint_host_id_ranges() {
    if !require_root("concurrent_sandboxes_get_disjoint_host_id_ranges") {
        return;
    }
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "uid_base = 320000000\nmax_concurrent_jobs = 2\n",
    )
    .unwrap();
    let daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    let spawn = || {
        daemon.kiln_spawn(&[
            "run",
            "--",
            "/bin/sh",
            "-c",
            "cat /proc/self/uid_map; sleep 2",
        ])
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success());
    let host_base = |out: &std::process::Output| -> u32 {
        text(&out.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };
    let (base_a, base_b) = (host_base(&a), host_base(&b));
    assert_ne!(base_a, base_b, "two concurrent sandboxes share host ids");
    assert!(base_a.abs_diff(base_b) >= 65536, "{base_a} {base_b}");
    for base in [base_a, base_b] {
        assert!(
            base >= 320_000_000,
            "host id base {base} is not from the configured range"
        );
    }
}

/// The link `kiln run --attest-dir` wrote for `step` (its `signed` part).
#[test]
fn resource_limits_are_enforced_capped_and_reported() {
    if !require_root("resource_limits_are_enforced_capped_and_reported") {
        return;
    }
    // A uid range of its own: the fork bomb's host processes are looked for below.
    let uid_base = 330_000_000u32;
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        format!(
            "uid_base = {uid_base}\n\
             default_memory = \"512M\"\nmax_memory = \"1G\"\n\
             default_pids = 256\nmax_pids = 512\n\
             default_cpus = 1\nmax_cpus = 2\n\
             default_disk = \"64M\"\nmax_disk = \"256M\"\n\
             max_outputs_size = \"1M\"\n"
        ),
    )
    .unwrap();
    let daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    let links = daemon.path("links");

    // Memory: dd's 256 MiB buffer against a 64 MiB limit.
    let out = daemon.kiln(&[
        "run",
        "--memory",
        "64M",
        "--step",
        "hog",
        "--attest-dir",
        links.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        "dd if=/dev/zero of=/dev/null bs=256M count=1",
    ]);
    assert_eq!(out.status.code(), Some(137), "{}", describe(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("[oom]") && err.contains("memory limit of 64 MiB"),
        "{err}"
    );
    let link = signed_link(&links, "hog");
    let kiln = &link["byproducts"]["kiln"];
    assert_eq!(kiln["limit_reason"], "oom", "{kiln}");
    assert_eq!(kiln["oom_killed"], true, "{kiln}");
    assert!(
        kiln["peak_memory_bytes"].as_u64().unwrap() > 32 << 20,
        "{kiln}"
    );
    assert!(kiln["cpu_time_ms"].is_u64(), "{kiln}");
    let limits = &link["environment"]["limits"];
    assert_eq!(limits["memory_bytes"], 64u64 << 20, "{link}");
    assert_eq!(limits["pids"], 256, "{link}");
    assert_eq!(limits["cpu_millis"], 1000, "{link}");

    // Disk: 20 MiB written into an 8 MiB workspace quota.
    let out = daemon.kiln(&[
        "run",
        "--disk",
        "8M",
        "--",
        "/bin/sh",
        "-c",
        "dd if=/dev/zero of=big bs=1M count=20",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("No space left on device")
            && err.contains("[disk-quota]")
            && err.contains("workspace quota of 8 MiB"),
        "{err}"
    );

    // pids: a fork bomb under --pids 32; the host is unaffected and nothing survives.
    let out = daemon.kiln(&[
        "run",
        "--pids",
        "32",
        "--",
        "/bin/sh",
        "-c",
        "sleep 2 & s=$!; b() { while :; do b & done; }; b 2>/dev/null & wait $s; kill -9 -1; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("[pids]") && err.contains("pids limit of 32"),
        "{err}"
    );
    wait_until("every process of the bomb to die", || {
        host_processes_in_uid_range(uid_base + 1000, 1).is_empty()
    });
    let out = daemon.kiln(&["run", "--", "/bin/sh", "-c", "echo alive"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout).trim(), "alive");

    // Above the operator's caps: refused before anything runs, the field named.
    for (flag, value, field) in [
        ("--memory", "2G", "steps[0].limits.memory_bytes"),
        ("--pids", "1000", "steps[0].limits.pids"),
        ("--cpus", "2.5", "steps[0].limits.cpu_millis"),
        ("--disk", "1G", "steps[0].limits.disk_bytes"),
    ] {
        let out = daemon.kiln(&["run", flag, value, "--", "true"]);
        assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
        let err = text(&out.stderr);
        assert!(
            err.contains("InvalidArgument") && err.contains(field) && err.contains("maximum"),
            "{err}"
        );
    }
    let out = daemon.kiln(&["run", "--memory", "lots", "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));

    // Outputs above max_outputs_size are refused, nothing stored.
    let out = daemon.kiln(&[
        "run",
        "--output",
        "big",
        "--",
        "/bin/sh",
        "-c",
        "head -c 2000000 /dev/zero > big",
    ]);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("max_outputs_size"),
        "{}",
        describe(&out)
    );

    // A job file with limits per step; a timeout is reported as such too.
    std::fs::write(
        daemon.path("limits.toml"),
        "[[steps]]\nname = \"small\"\nrun = [\"/bin/sh\", \"-c\", \"ulimit -n\"]\n\
         memory = \"96M\"\npids = 16\ncpus = 0.5\ndisk = \"4M\"\n\
         [[steps]]\nname = \"slow\"\nrun = [\"sleep\", \"30\"]\ntimeout = 1\n",
    )
    .unwrap();
    let job_links = daemon.path("job-links");
    let out = daemon.kiln(&[
        "submit",
        "limits.toml",
        "--attest-dir",
        job_links.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(137), "{}", describe(&out));
    let err = text(&out.stderr);
    assert!(err.contains("[timeout]"), "{err}");
    let small = signed_link(&job_links, "small");
    assert_eq!(
        small["environment"]["limits"],
        json!({
            "memory_bytes": 96u64 << 20, "pids": 16, "cpu_millis": 500,
            "disk_bytes": 4u64 << 20, "nofile": 4096,
            // The larger of the workspace quota and /tmp (512 MiB), below max_file_size.
            "fsize_bytes": 512u64 << 20,
        }),
        "{small}"
    );
    assert_eq!(small["byproducts"]["kiln"]["limit_reason"], "");
    let slow = signed_link(&job_links, "slow");
    assert_eq!(
        slow["byproducts"]["kiln"]["limit_reason"], "timeout",
        "{slow}"
    );
    assert_eq!(slow["byproducts"]["kiln"]["timed_out"], true, "{slow}");
}

#[test]
fn seccomp_denials_are_counted_in_the_signed_link() {
    if !require_root("seccomp_denials_are_counted_in_the_signed_link") {
        return;
    }
    let daemon = Daemon::start();
    let links = daemon.path("links");
    // unshare(2) is denied (EPERM) by the filter; each attempt is counted.
    let out = daemon.kiln(&[
        "run",
        "--step",
        "deny",
        "--attest-dir",
        links.to_str().unwrap(),
        "--",
        "/bin/sh",
        "-c",
        "unshare -U true; unshare -U true; exit 0",
    ]);
    assert!(out.status.success(), "{}\n{}", describe(&out), daemon.log());
    assert!(text(&out.stderr).contains("Operation not permitted"));
    let signed = signed_link(&links, "deny");
    assert_eq!(
        signed["byproducts"]["kiln"]["seccomp_denials"],
        serde_json::json!({"unshare": 2})
    );
    assert_eq!(
        signed["environment"]["waived_layers"],
        serde_json::json!([])
    );
}

#[test]
fn a_directory_input_lands_at_the_workspace_root_with_dot() {
    if !require_root("a_directory_input_lands_at_the_workspace_root_with_dot") {
        return;
    }
    let daemon = Daemon::start();
    let src = daemon.path("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("top.txt"), "top\n").unwrap();
    std::fs::write(src.join("sub/inner.txt"), "inner\n").unwrap();
    let input = format!("{}:.", src.display());
    let out = daemon.kiln(&[
        "run",
        "--input",
        &input,
        "--",
        "/bin/sh",
        "-c",
        "cat top.txt sub/inner.txt; test ! -e src",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(text(&out.stdout), "top\ninner\n");

    // A file has no name at the root.
    let file_input = format!("{}:.", src.join("top.txt").display());
    let out = daemon.kiln(&["run", "--input", &file_input, "--", "true"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("only a directory can land at the workspace root"),
        "{}",
        describe(&out)
    );
}
