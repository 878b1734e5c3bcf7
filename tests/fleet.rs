//! A fleet, real peers only: BuildGrid (on its own PostgreSQL cluster) schedules Bazel's
//! actions onto two `kiln worker` processes; each action runs in the sandbox, and its
//! result in BuildGrid's action cache carries the statement its worker signed, which
//! `kiln verify --action-cache` checks against that worker's public key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::buildgrid::{Bazel, BuildGrid};
use support::{describe, require_root, text, KILN};

/// A `kiln worker` process with a state directory of its own, stopped (SIGTERM) on drop.
struct Worker {
    child: Child,
    state: tempfile::TempDir,
    log: PathBuf,
}

impl Worker {
    fn start(grid: &BuildGrid, bots: u32) -> Worker {
        let state = tempfile::Builder::new()
            .prefix("kiln-fleet-worker-")
            .tempdir()
            .unwrap();
        let log = state.path().join("worker.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(KILN)
            .args(["worker", "--scheduler", &grid.url, "--bots"])
            .arg(bots.to_string())
            .arg("--state-dir")
            .arg(state.path().join("state"))
            .env("KILN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let worker = Worker { child, state, log };
        // Started once its bots have sessions.
        let deadline = Instant::now() + Duration::from_secs(60);
        while worker.log().matches("bot session created").count() < bots as usize {
            assert!(
                Instant::now() < deadline,
                "worker did not start:\n{}",
                worker.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        worker
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
            nix::unistd::Pid::from_raw(self.child.id() as i32),
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
    let began = Instant::now();
    let remote = bazel.build(&[&executor, "--spawn_strategy=remote", "//:all"]);
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

    // Every action ran once, on one of the workers, and verifies with its key only.
    let keys = tempfile::tempdir().unwrap();
    let mut ran = 0;
    for (n, worker) in workers.iter().enumerate() {
        let key = worker.public_key(&keys.path().join(format!("worker{n}.pub")));
        let other = workers[1 - n].public_key(&keys.path().join(format!("other{n}.pub")));
        for digest in worker.actions() {
            ran += 1;
            let out = verify(&grid, &key, &digest);
            assert!(out.status.success(), "{digest}: {}", describe(&out));
            assert!(text(&out.stdout).contains("PASS"), "{}", describe(&out));
            let out = verify(&grid, &other, &digest);
            assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        }
    }
    assert_eq!(ran, 11, "{}", logs());
}
