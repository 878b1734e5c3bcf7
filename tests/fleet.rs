//! A fleet, real peers only: BuildGrid (on its own PostgreSQL cluster) schedules Bazel's
//! actions (genrules, and gcc compiling and linking a C program) onto two `kiln worker`
//! processes; each action runs in the sandbox, and its result carries the statement its
//! worker signed, which `kiln verify --action-cache` checks against that worker's public
//! key, and `kiln verify --bazel-grpc-log` for every action Bazel's own log names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::buildgrid::{digest_of, Bazel, BuildGrid};
use support::{describe, require_root, text, KILN};

/// A `kiln worker` process with a state directory of its own, stopped (SIGTERM) on drop.
struct Worker {
    child: Child,
    state: tempfile::TempDir,
    log: PathBuf,
}

impl Worker {
    fn start(grid: &BuildGrid, bots: u32) -> Worker {
        Worker::start_with(grid, bots, "")
    }

    /// A worker with `config` (TOML) as its configuration file.
    fn start_with(grid: &BuildGrid, bots: u32, config: &str) -> Worker {
        let state = tempfile::Builder::new()
            .prefix("kiln-fleet-worker-")
            .tempdir()
            .unwrap();
        let log = state.path().join("worker.log");
        let file = std::fs::File::create(&log).unwrap();
        let config_path = state.path().join("kiln.toml");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new(KILN)
            .args(["worker", "--scheduler", &grid.url, "--bots"])
            .arg(bots.to_string())
            .arg("--state-dir")
            .arg(state.path().join("state"))
            .arg("--config")
            .arg(&config_path)
            .env("KILN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let worker = Worker { child, state, log };
        worker.wait_for_sessions(bots);
        worker
    }

    /// Started once its bots have sessions.
    fn wait_for_sessions(&self, bots: u32) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.log().matches("bot session created").count() < bots as usize {
            assert!(
                Instant::now() < deadline,
                "worker did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The worker's current public key (SPKI PEM), read from its key ring.
    fn public_key(&self, into: &Path) -> PathBuf {
        let (ring, _) = runner::engine::signer::Signer::open_with(
            &self.state.path().join("state/keys"),
            provenance::keys::KeyType::Ed25519,
        )
        .unwrap();
        let pem = ring.current().unwrap().key.public_key().to_spki_pem();
        std::fs::write(into, pem).unwrap();
        into.to_path_buf()
    }

    /// The action digests (HEX/SIZE) this worker ran.
    fn actions(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|line| line.contains("running an action"))
            .filter_map(|line| line.split("action=").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(|digest| digest.to_string())
            .collect()
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.stop();
        }
    }
}

/// Ten genrules (each its own action) and one that concatenates them.
fn genrules() -> String {
    let mut build = String::new();
    for i in 0..10 {
        build.push_str(&format!(
            "genrule(name = \"part{i}\", outs = [\"part{i}.txt\"], cmd = \"echo part {i} > $@ && uname -s >> $@\")\n"
        ));
    }
    build.push_str("genrule(name = \"all\", srcs = [");
    for i in 0..10 {
        build.push_str(&format!("\":part{i}\", "));
    }
    build.push_str("], outs = [\"all.txt\"], cmd = \"cat $(SRCS) > $@\")\n");
    build
}

/// A C program compiled and linked in one gcc action, and another compiled in two
/// actions and linked in a third; a fourth action runs the latter.
const GCC_RULES: &str = r#"
genrule(name = "hello", srcs = ["hello.c"], outs = ["hello"], cmd = "gcc -O2 -o $@ $(location hello.c)")
genrule(name = "main_o", srcs = ["main.c", "greet.h"], outs = ["main.o"], cmd = "gcc -O2 -c -o $@ $(location main.c)")
genrule(name = "greet_o", srcs = ["greet.c", "greet.h"], outs = ["greet.o"], cmd = "gcc -O2 -c -o $@ $(location greet.c)")
genrule(name = "greeter", srcs = [":main_o", ":greet_o"], outs = ["greeter"], cmd = "gcc -o $@ $(SRCS)")
genrule(name = "greeting", srcs = [":greeter"], outs = ["greeting.txt"], cmd = "./$(location :greeter) kiln > $@")
"#;
const GCC_TARGETS: [&str; 5] = [
    "//:hello",
    "//:main_o",
    "//:greet_o",
    "//:greeter",
    "//:greeting",
];
const GCC_OUTPUTS: [&str; 5] = ["hello", "main.o", "greet.o", "greeter", "greeting.txt"];

fn write_c_sources(bazel: &Bazel) {
    bazel.write(
        "hello.c",
        "#include <stdio.h>\nint main(void) { puts(\"hello from kiln\"); return 0; }\n",
    );
    bazel.write("greet.h", "void greet(const char *name);\n");
    bazel.write(
        "greet.c",
        "#include <stdio.h>\n#include \"greet.h\"\nvoid greet(const char *name) { printf(\"hello, %s\\n\", name); }\n",
    );
    bazel.write(
        "main.c",
        "#include \"greet.h\"\nint main(int argc, char **argv) { greet(argc > 1 ? argv[1] : \"world\"); return 0; }\n",
    );
}

/// The actions (HEX/SIZE) Bazel's log of its remote calls says it had executed, each
/// with the result Bazel received.
fn executed_by_bazel(grpc_log: &Path) -> Vec<String> {
    received_by_bazel(grpc_log, runner::cli::bazel_grpc_log::Source::Executed)
}

/// The actions (HEX/SIZE) in Bazel's log of its remote calls, each of whose results
/// Bazel received as `expected` says (executed, or a cache hit).
fn received_by_bazel(
    grpc_log: &Path,
    expected: runner::cli::bazel_grpc_log::Source,
) -> Vec<String> {
    let actions =
        runner::cli::bazel_grpc_log::remote_actions(std::fs::File::open(grpc_log).unwrap())
            .unwrap();
    actions
        .iter()
        .map(|action| {
            let digest = format!("{}/{}", action.digest.hash, action.digest.size_bytes);
            let source = action.received.as_ref().map(|(source, _)| *source);
            assert_eq!(
                source,
                Some(expected),
                "{digest}: {:?}",
                action.missing_because
            );
            digest
        })
        .collect()
}

fn verify(grid: &BuildGrid, key: &Path, digest: &str) -> std::process::Output {
    Command::new(KILN)
        .args(["verify", "--action-cache", &grid.url, "--key"])
        .arg(key)
        .arg(digest)
        .output()
        .unwrap()
}

#[test]
fn bazel_builds_remotely_on_two_kiln_workers_and_every_action_verifies() {
    let test = "bazel_builds_remotely_on_two_kiln_workers_and_every_action_verifies";
    if !require_root(test) {
        return;
    }
    let Some(bazel) = Bazel::new(test) else {
        return;
    };
    let Some(grid) = BuildGrid::start(test) else {
        return;
    };
    let workers = [Worker::start(&grid, 2), Worker::start(&grid, 2)];
    bazel.write("BUILD", &genrules());

    // The same build locally (Bazel's own sandbox), for the outputs to compare with.
    let local_root = tempfile::tempdir().unwrap();
    let local = bazel.build_in(local_root.path(), &["//:all"]);
    assert!(local.status.success(), "{}", describe(&local));
    let local_all = bazel.output("all.txt");

    let executor = format!("--remote_executor={}", grid.url);
    // Bazel's own record of its remote calls: which actions it had executed.
    let grpc_logs = tempfile::tempdir().unwrap();
    let genrule_log = grpc_logs.path().join("genrules.log");
    let began = Instant::now();
    let remote = bazel.build(&[
        &executor,
        "--spawn_strategy=remote",
        &format!("--experimental_remote_grpc_log={}", genrule_log.display()),
        "//:all",
    ]);
    let took = began.elapsed();
    let logs = || {
        format!(
            "worker 1:\n{}\nworker 2:\n{}\nBuildGrid:\n{}",
            workers[0].log(),
            workers[1].log(),
            grid.log()
        )
    };
    assert!(remote.status.success(), "{}\n{}", describe(&remote), logs());
    let stderr = text(&remote.stderr);
    assert!(
        stderr.contains("11 remote"),
        "Bazel did not run the actions remotely:\n{stderr}\n{}",
        logs()
    );
    assert_eq!(bazel.output("all.txt"), local_all);
    for i in 0..10 {
        assert_eq!(
            bazel.output(&format!("part{i}.txt")),
            format!("part {i}\nLinux\n").as_bytes()
        );
    }
    eprintln!("{test}: 11 remote actions on 2 workers in {took:.2?}");

    // What each action took on its worker (fetch, sandbox, upload, sign) against the
    // same command run directly (the genrules' 11 actions).
    let seconds: Vec<f64> = workers
        .iter()
        .flat_map(|w| {
            w.log()
                .lines()
                .filter(|line| line.contains("action done"))
                .filter_map(|line| line.split("seconds=").nth(1))
                .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
                .collect::<Vec<f64>>()
        })
        .collect();
    let direct = Instant::now();
    let scratch = tempfile::tempdir().unwrap();
    for i in 0..10 {
        let status = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("echo part {i} > out && uname -s >> out"))
            .current_dir(scratch.path())
            .status()
            .unwrap();
        assert!(status.success());
    }
    eprintln!(
        "{test}: per action on a worker {:.3} s (mean of {}), the command run directly {:.4} s",
        seconds.iter().sum::<f64>() / seconds.len().max(1) as f64,
        seconds.len(),
        direct.elapsed().as_secs_f64() / 10.0
    );

    // A C program, compiled and linked by gcc on the workers. The default image `host`
    // is the host's system, read-only: the workers run the very gcc, binutils and libc
    // that Bazel's local build runs, and gcc without -g writes neither paths, times nor
    // random names into its output, so the outputs are the same bytes.
    write_c_sources(&bazel);
    bazel.write("BUILD", &format!("{}{GCC_RULES}", genrules()));
    let local_root = tempfile::tempdir().unwrap();
    // Bazel's execution logs: every spawn with the outputs it produced.
    let local_exec_log = grpc_logs.path().join("gcc-local.json");
    let exec_log_flag = format!("--execution_log_json_file={}", local_exec_log.display());
    let mut args = vec![exec_log_flag.as_str()];
    args.extend(GCC_TARGETS);
    let local = bazel.build_in(local_root.path(), &args);
    assert!(local.status.success(), "{}", describe(&local));
    let local_outputs: Vec<Vec<u8>> = GCC_OUTPUTS.iter().map(|o| bazel.output(o)).collect();
    let gcc_log = grpc_logs.path().join("gcc.log");
    let gcc_exec_log = grpc_logs.path().join("gcc.json");
    let mut args = vec![
        executor.clone(),
        "--spawn_strategy=remote".to_string(),
        format!("--experimental_remote_grpc_log={}", gcc_log.display()),
        format!("--execution_log_json_file={}", gcc_exec_log.display()),
    ];
    args.extend(GCC_TARGETS.iter().map(|t| t.to_string()));
    let remote = bazel.build(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(remote.status.success(), "{}\n{}", describe(&remote), logs());
    let stderr = text(&remote.stderr);
    assert!(
        stderr.contains("5 remote"),
        "Bazel did not run the gcc actions remotely:\n{stderr}\n{}",
        logs()
    );
    for (output, local) in GCC_OUTPUTS.iter().zip(&local_outputs) {
        assert!(
            bazel.output(output) == *local,
            "{output} built remotely differs from the local build"
        );
    }
    let hello = Command::new(bazel.workspace.join("bazel-bin/hello"))
        .output()
        .unwrap();
    assert!(hello.status.success(), "{}", describe(&hello));
    assert_eq!(hello.stdout, b"hello from kiln\n");
    // What the remotely linked program printed when a worker ran it.
    assert_eq!(bazel.output("greeting.txt"), b"hello, kiln\n");

    // The actions Bazel had executed remotely, from Bazel's own log, are the ones the
    // workers ran.
    let by_bazel: Vec<String> = [&genrule_log, &gcc_log]
        .into_iter()
        .flat_map(|log| executed_by_bazel(log))
        .collect();
    let by_workers: std::collections::BTreeSet<String> =
        workers.iter().flat_map(Worker::actions).collect();
    assert_eq!(by_bazel.len(), 16, "{by_bazel:?}\n{}", logs());
    assert_eq!(
        by_bazel
            .iter()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        by_workers,
        "{}",
        logs()
    );

    // The workers' public keys.
    let keys = tempfile::tempdir().unwrap();
    let worker_keys: Vec<PathBuf> = workers
        .iter()
        .enumerate()
        .map(|(n, w)| w.public_key(&keys.path().join(format!("worker{n}.pub"))))
        .collect();

    // Every output of the gcc build is an output of a verified action; so is every output
    // of the local build, which has the same bytes; the genrules' actions vouch for none.
    let verify_outputs = |grpc_log: &Path, exec_log: &Path| {
        let mut command = Command::new(KILN);
        command
            .arg("verify")
            .arg("--bazel-grpc-log")
            .arg(grpc_log)
            .arg("--bazel-exec-log")
            .arg(exec_log);
        for key in &worker_keys {
            command.arg("--key").arg(key);
        }
        command.output().unwrap()
    };
    for exec_log in [&gcc_exec_log, &local_exec_log] {
        let out = verify_outputs(&gcc_log, exec_log);
        assert!(out.status.success(), "{}", describe(&out));
        assert!(
            text(&out.stdout).ends_with("PASS (5 actions, 5 outputs)\n"),
            "{}",
            describe(&out)
        );
    }
    let out = verify_outputs(&genrule_log, &local_exec_log);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains("the spawn's runner: linux-sandbox"),
        "{}",
        describe(&out)
    );

    // Every one verifies with the key of the worker that ran it, and only with that.
    for digest in &by_bazel {
        let n = workers
            .iter()
            .position(|w| w.actions().contains(digest))
            .unwrap();
        let out = verify(&grid, &worker_keys[n], digest);
        assert!(out.status.success(), "{digest}: {}", describe(&out));
        assert!(text(&out.stdout).contains("PASS"), "{}", describe(&out));
        let out = verify(&grid, &worker_keys[1 - n], digest);
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    }

    // The whole build at once: every action in Bazel's logs, as Bazel received its
    // result, then as the action cache holds it.
    let verify_build = |keys: &[&PathBuf], cache: Option<&str>| {
        let mut command = Command::new(KILN);
        command.arg("verify");
        if let Some(url) = cache {
            command.args(["--action-cache", url]);
        }
        for log in [&genrule_log, &gcc_log] {
            command.arg("--bazel-grpc-log").arg(log);
        }
        for key in keys {
            command.arg("--key").arg(key);
        }
        command.output().unwrap()
    };
    let both = [&worker_keys[0], &worker_keys[1]];
    for cache in [None, Some(grid.url.as_str())] {
        let out = verify_build(&both, cache);
        assert!(out.status.success(), "{}", describe(&out));
        assert!(
            text(&out.stdout).ends_with("PASS (16 actions)\n"),
            "{}",
            describe(&out)
        );
        // One worker's key vouches for its own actions only.
        let out = verify_build(&both[..1], cache);
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    }

    // The gcc build again from a fresh output tree: Bazel takes every result from the
    // remote cache, and those are the results the workers signed.
    let cached_root = tempfile::tempdir().unwrap();
    let hits_log = grpc_logs.path().join("hits.log");
    let mut args = vec![
        executor.clone(),
        "--spawn_strategy=remote".to_string(),
        format!("--experimental_remote_grpc_log={}", hits_log.display()),
    ];
    args.extend(GCC_TARGETS.iter().map(|t| t.to_string()));
    let cached = bazel.build_in(
        cached_root.path(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(cached.status.success(), "{}", describe(&cached));
    assert!(
        text(&cached.stderr).contains("5 remote cache hit"),
        "{}",
        describe(&cached)
    );
    let hits = received_by_bazel(&hits_log, runner::cli::bazel_grpc_log::Source::CacheHit);
    assert_eq!(hits.len(), 5);
    assert!(hits.iter().all(|digest| by_bazel.contains(digest)));
    let out = Command::new(KILN)
        .arg("verify")
        .arg("--bazel-grpc-log")
        .arg(&hits_log)
        .args(["--key", &both[0].display().to_string()])
        .args(["--key", &both[1].display().to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        text(&out.stdout)
            .matches("(Bazel took it from the remote cache)")
            .count(),
        5,
        "{}",
        describe(&out)
    );

    // A cache entry changed after the fact: its output is another blob now, under the
    // same signed statement. It no longer verifies.
    let digest = workers[0].actions().into_iter().next().unwrap();
    let key = workers[0].public_key(&keys.path().join("tamper.pub"));
    tamper(&grid, &digest);
    let out = verify(&grid, &key, &digest);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    // The build as the cache holds it now fails; as Bazel received it, it still passes.
    let out = verify_build(&both, Some(grid.url.as_str()));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stdout).contains(&format!("action {digest}: FAIL")),
        "{}",
        describe(&out)
    );
    let out = verify_build(&both, None);
    assert!(out.status.success(), "{}", describe(&out));

    // SIGTERM: each bot closes its session and the worker exits cleanly.
    for mut worker in workers {
        let status = worker.stop();
        assert!(status.success(), "{status}:\n{}", worker.log());
        assert_eq!(
            worker.log().matches("bot session closed").count(),
            2,
            "{}",
            worker.log()
        );
    }
}

/// Points the first output file of `digest`'s cached result at another blob.
fn tamper(grid: &BuildGrid, digest: &str) {
    use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
    let (hash, size) = digest.split_once('/').unwrap();
    let action_digest = reapi::Digest {
        hash: hash.to_string(),
        size_bytes: size.parse().unwrap(),
    };
    let forged = b"what an attacker put in the cache\n".to_vec();
    let forged_digest = reapi::Digest {
        hash: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&forged)),
        size_bytes: i64::try_from(forged.len()).unwrap(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let channel = grid.channel().await;
        reapi::content_addressable_storage_client::ContentAddressableStorageClient::new(
            channel.clone(),
        )
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            instance_name: grid.instance.clone(),
            requests: vec![reapi::batch_update_blobs_request::Request {
                digest: Some(forged_digest.clone()),
                data: forged,
                compressor: 0,
            }],
            digest_function: 0,
        })
        .await
        .unwrap();
        let mut cache = reapi::action_cache_client::ActionCacheClient::new(channel);
        let mut result = cache
            .get_action_result(reapi::GetActionResultRequest {
                instance_name: grid.instance.clone(),
                action_digest: Some(action_digest.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        result.output_files[0].digest = Some(forged_digest);
        cache
            .update_action_result(reapi::UpdateActionResultRequest {
                instance_name: grid.instance.clone(),
                action_digest: Some(action_digest),
                action_result: Some(result),
                ..Default::default()
            })
            .await
            .unwrap();
    });
}

/// A worker killed while it runs an action: BuildGrid takes the lease back when the
/// worker's session goes silent, another worker runs it, and the build succeeds.
#[test]
fn a_worker_killed_mid_action_does_not_fail_the_build() {
    let test = "a_worker_killed_mid_action_does_not_fail_the_build";
    if !require_root(test) {
        return;
    }
    let Some(bazel) = Bazel::new(test) else {
        return;
    };
    let Some(grid) = BuildGrid::start(test) else {
        return;
    };
    let mut doomed = Worker::start(&grid, 1);
    bazel.write(
        "BUILD",
        "genrule(name = \"slow\", outs = [\"slow.txt\"], cmd = \"sleep 8 && echo survived > $@\")\n",
    );
    let executor = format!("--remote_executor={}", grid.url);
    let scratch = tempfile::tempdir().unwrap();
    let grpc_log = scratch.path().join("grpc.log");
    let grpc_log_flag = format!("--experimental_remote_grpc_log={}", grpc_log.display());
    let build = std::thread::scope(|scope| {
        let build = scope.spawn(|| {
            bazel.build(&[
                &executor,
                "--spawn_strategy=remote",
                &grpc_log_flag,
                "//:slow",
            ])
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        while doomed.actions().is_empty() {
            assert!(
                Instant::now() < deadline,
                "no action came:\n{}",
                doomed.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        doomed.child.kill().unwrap();
        doomed.child.wait().unwrap();
        let survivor = Worker::start(&grid, 1);
        let output = build.join().unwrap();
        let key = survivor.public_key(&scratch.path().join("survivor.pub"));
        (output, survivor.log(), key)
    });
    let (output, survivor_log, survivor_key) = build;
    assert!(
        output.status.success(),
        "{}\nkilled worker:\n{}\nsurvivor:\n{survivor_log}\nBuildGrid:\n{}",
        describe(&output),
        doomed.log(),
        grid.log()
    );
    assert!(survivor_log.contains("running an action"), "{survivor_log}");
    assert_eq!(bazel.output("slow.txt"), b"survived\n");
    // The result Bazel took is the one the survivor signed.
    let out = Command::new(KILN)
        .arg("verify")
        .arg("--bazel-grpc-log")
        .arg(&grpc_log)
        .arg("--key")
        .arg(&survivor_key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stdout).ends_with("PASS (1 action)\n"),
        "{}",
        describe(&out)
    );
}

/// Actions a client forged (bad input root names, clashes, a symlink, an output path or a
/// working directory out of the workspace) each fail with INVALID_ARGUMENT reported
/// through BuildGrid, and the same worker then runs a good one.
#[test]
fn a_bad_action_fails_with_its_status_and_the_worker_stays_up() {
    use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
    use prost::Message as _;
    let test = "a_bad_action_fails_with_its_status_and_the_worker_stays_up";
    if !require_root(test) {
        return;
    }
    let Some(grid) = BuildGrid::start(test) else {
        return;
    };
    let worker = Worker::start(&grid, 1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let empty_dir = reapi::Directory::default().encode_to_vec();
    let execute = |root: reapi::Directory, command: reapi::Command| {
        let command = command.encode_to_vec();
        let root = root.encode_to_vec();
        let action = reapi::Action {
            command_digest: Some(digest_of(&command)),
            input_root_digest: Some(digest_of(&root)),
            ..Default::default()
        }
        .encode_to_vec();
        let stream = runtime.block_on(grid.execute(&action, &[&command, &root, b"x", &empty_dir]));
        response_of(&runtime, stream, &|| worker.log())
    };
    let argv = |argv: &[&str]| reapi::Command {
        arguments: argv.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    };
    let file = |name: &str| reapi::FileNode {
        name: name.into(),
        digest: Some(digest_of(b"x")),
        ..Default::default()
    };
    let files = |names: &[&str]| reapi::Directory {
        files: names.iter().map(|name| file(name)).collect(),
        ..Default::default()
    };
    // What a client may send through the engine that must not reach the sandbox.
    let attacks: Vec<(&str, reapi::Directory, reapi::Command)> = vec![
        ("a file named ..", files(&[".."]), argv(&["/bin/true"])),
        ("a name with a slash", files(&["a/b"]), argv(&["/bin/true"])),
        ("an empty name", files(&[""]), argv(&["/bin/true"])),
        ("a name twice", files(&["x", "x"]), argv(&["/bin/true"])),
        (
            "a file and a directory of one name",
            reapi::Directory {
                files: vec![file("x")],
                directories: vec![reapi::DirectoryNode {
                    name: "x".into(),
                    digest: Some(digest_of(&empty_dir)),
                }],
                ..Default::default()
            },
            argv(&["/bin/true"]),
        ),
        (
            "a symlink out of the workspace",
            reapi::Directory {
                symlinks: vec![reapi::SymlinkNode {
                    name: "s".into(),
                    target: "../../etc/passwd".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            argv(&["/bin/true"]),
        ),
        (
            "an output path out of the workspace",
            reapi::Directory::default(),
            reapi::Command {
                output_paths: vec!["../escape".into()],
                ..argv(&["/bin/true"])
            },
        ),
        (
            "a working directory out of the workspace",
            reapi::Directory::default(),
            reapi::Command {
                working_directory: "../".into(),
                ..argv(&["/bin/true"])
            },
        ),
    ];
    let attempted = attacks.len();
    for (what, root, command) in attacks {
        let response = execute(root, command);
        let status = response.status.unwrap_or_default();
        assert_eq!(
            status.code,
            tonic::Code::InvalidArgument as i32,
            "{what}: {status:?}\n{}",
            worker.log()
        );
        assert!(
            response
                .result
                .is_none_or(|r| r.exit_code == 0 && r.output_files.is_empty()),
            "{what}"
        );
    }
    let response = execute(
        reapi::Directory::default(),
        argv(&["/bin/sh", "-c", "echo still up"]),
    );
    assert_eq!(
        response.status.unwrap_or_default().code,
        0,
        "{}",
        worker.log()
    );
    let result = response.result.unwrap();
    assert_eq!(result.exit_code, 0, "{}", worker.log());
    assert_eq!(worker.actions().len(), attempted + 1, "{}", worker.log());
}

/// A client cancels a running action (BuildGrid then drops the lease from the bot's
/// session): the worker stops it, and its one slot runs the next action.
#[test]
fn a_cancelled_operation_stops_its_action_on_the_worker() {
    use bazel_remote_apis::google::longrunning;
    let test = "a_cancelled_operation_stops_its_action_on_the_worker";
    if !require_root(test) {
        return;
    }
    let Some(grid) = BuildGrid::start(test) else {
        return;
    };
    let worker = Worker::start(&grid, 1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let channel = runtime.block_on(grid.channel());
    let start = |script: &str| submit(&grid, &runtime, script);
    let mut slow = start("sleep 3600");
    let name = runtime.block_on(slow.message()).unwrap().unwrap().name;
    let deadline = Instant::now() + Duration::from_secs(60);
    while worker.actions().is_empty() {
        assert!(
            Instant::now() < deadline,
            "no action came:\n{}",
            worker.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    runtime
        .block_on(
            longrunning::operations_client::OperationsClient::new(channel.clone())
                .cancel_operation(longrunning::CancelOperationRequest { name }),
        )
        .unwrap();
    drop(slow);
    // The one slot is free again: the next action runs and completes.
    let mut next = start("echo after the cancel");
    let done = runtime.block_on(async {
        let mut last = None;
        while let Some(operation) = next.message().await.unwrap() {
            last = Some(operation);
        }
        last.unwrap()
    });
    assert!(done.done, "{done:?}\n{}", worker.log());
    let log = worker.log();
    assert!(
        log.contains("the engine dropped a running lease"),
        "{log}\nBuildGrid:\n{}",
        grid.log()
    );
    assert_eq!(worker.actions().len(), 2, "{log}");
}

/// Uploads an action running `script` (no inputs) and starts it, skipping the cache; answers
/// the operation stream.
fn submit(
    grid: &BuildGrid,
    runtime: &tokio::runtime::Runtime,
    script: &str,
) -> tonic::Streaming<bazel_remote_apis::google::longrunning::Operation> {
    use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
    use prost::Message as _;
    let command = reapi::Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
    .encode_to_vec();
    let root = reapi::Directory::default().encode_to_vec();
    let action = reapi::Action {
        command_digest: Some(digest_of(&command)),
        input_root_digest: Some(digest_of(&root)),
        ..Default::default()
    }
    .encode_to_vec();
    runtime.block_on(grid.execute(&action, &[&command, &root]))
}

/// The ExecuteResponse an operation stream ends with, waiting at most two minutes.
fn response_of(
    runtime: &tokio::runtime::Runtime,
    mut stream: tonic::Streaming<bazel_remote_apis::google::longrunning::Operation>,
    logs: &dyn Fn() -> String,
) -> bazel_remote_apis::build::bazel::remote::execution::v2::ExecuteResponse {
    use bazel_remote_apis::google::longrunning::operation;
    use prost::Message as _;
    let last = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), async {
            let mut last = None;
            while let Some(operation) = stream.message().await.unwrap() {
                last = Some(operation);
            }
            last
        })
        .await
    });
    match last {
        Ok(Some(done)) if done.done => match done.result {
            Some(operation::Result::Response(any)) => {
                bazel_remote_apis::build::bazel::remote::execution::v2::ExecuteResponse::decode(
                    any.value.as_slice(),
                )
                .unwrap()
            }
            other => panic!("{other:?}\n{}", logs()),
        },
        other => panic!("the action did not finish ({other:?}):\n{}", logs()),
    }
}

/// A worker stopped (SIGSTOP) past its keepalive loses its session: BuildGrid reaps it.
/// An action queued meanwhile runs on it once it resumes with a new session (BuildGrid
/// hands it over in the answer to CreateBotSession).
#[test]
fn a_worker_whose_session_lapsed_takes_actions_again() {
    use nix::sys::signal::{kill, Signal};
    let test = "a_worker_whose_session_lapsed_takes_actions_again";
    if !require_root(test) {
        return;
    }
    let Some(grid) = BuildGrid::start(test) else {
        return;
    };
    let worker = Worker::start(&grid, 1);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(worker.child.id()).unwrap());
    kill(pid, Signal::SIGSTOP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !grid.log().contains("BotSession has expired") {
        if Instant::now() > deadline {
            let _ = kill(pid, Signal::SIGCONT);
            panic!("BuildGrid did not reap the session:\n{}", grid.log());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let queued = submit(&grid, &runtime, "echo after the lapse");
    kill(pid, Signal::SIGCONT).unwrap();
    let response = response_of(&runtime, queued, &|| {
        format!("{}\nBuildGrid:\n{}", worker.log(), grid.log())
    });
    assert_eq!(response.status.unwrap_or_default().code, 0);
    assert_eq!(response.result.unwrap().exit_code, 0);
    assert_eq!(
        worker.log().matches("bot session created").count(),
        2,
        "{}",
        worker.log()
    );
    assert_eq!(worker.actions().len(), 1, "{}", worker.log());
}

/// An action still running when its worker's shutdown grace ends is stopped and handed
/// back: BuildGrid runs it again on another worker, and the client sees it succeed.
#[test]
fn an_action_outliving_the_shutdown_grace_runs_on_another_worker() {
    let test = "an_action_outliving_the_shutdown_grace_runs_on_another_worker";
    if !require_root(test) {
        return;
    }
    let Some(grid) = BuildGrid::start(test) else {
        return;
    };
    let mut first = Worker::start_with(&grid, 1, "shutdown_grace_seconds = 1\n");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let running = submit(&grid, &runtime, "sleep 5; echo done");
    let deadline = Instant::now() + Duration::from_secs(60);
    while first.actions().is_empty() {
        assert!(
            Instant::now() < deadline,
            "no action came:\n{}",
            first.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Stopped a second into the action: its grace ends before the action does.
    let status = first.stop();
    assert!(status.success(), "{status}\n{}", first.log());
    assert!(first.log().contains("handing it back"), "{}", first.log());
    let second = Worker::start(&grid, 1);
    let response = response_of(&runtime, running, &|| {
        format!(
            "{}\n{}\nBuildGrid:\n{}",
            first.log(),
            second.log(),
            grid.log()
        )
    });
    assert_eq!(response.status.unwrap_or_default().code, 0);
    assert_eq!(response.result.unwrap().exit_code, 0);
    assert_eq!(second.actions(), first.actions(), "{}", second.log());
}
