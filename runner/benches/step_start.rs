//! End-to-end step start: `kiln run -- /bin/true` through a real daemon (CLI start,
//! gRPC, durable record, sandbox, hashing, signing) against bubblewrap running the
//! same program with a comparable isolation, measured in the same run.
//!
//!     cargo bench -p runner --bench step_start [-- RUNS]
//!
//! Needs root and bwrap. Prints medians and the ratio.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time_runs(runs: usize, mut command: impl FnMut() -> Command) -> Duration {
    // One warm-up run, not counted.
    let status = command().stdout(Stdio::null()).status().unwrap();
    assert!(status.success(), "warm-up run failed: {status}");
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let status = command().stdout(Stdio::null()).status().unwrap();
        samples.push(start.elapsed());
        assert!(status.success(), "run failed: {status}");
    }
    median(samples)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(50);
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: the step_start benchmark needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kiln.sock");
    let mut daemon = Command::new(KILN)
        .arg("--socket")
        .arg(&socket)
        .arg("serve")
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(10));
    }

    let true_alone = time_runs(runs, || Command::new("/bin/true"));
    let bwrap = time_runs(runs, || {
        let mut c = Command::new("bwrap");
        c.args([
            "--unshare-all",
            "--ro-bind",
            "/usr",
            "/usr",
            "--symlink",
            "usr/bin",
            "/bin",
            "--symlink",
            "usr/lib",
            "/lib",
            "--symlink",
            "usr/lib64",
            "/lib64",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--tmpfs",
            "/tmp",
            "/bin/true",
        ]);
        c
    });
    let kiln = time_runs(runs, || {
        let mut c = Command::new(KILN);
        c.arg("--socket")
            .arg(&socket)
            .args(["run", "--", "/bin/true"]);
        c
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = daemon.wait();

    println!("medians of {runs} runs each, same run:");
    println!("  /bin/true                  {:8.2} ms", ms(true_alone));
    println!("  bwrap --unshare-all ...    {:8.2} ms", ms(bwrap));
    println!("  kiln run -- /bin/true      {:8.2} ms", ms(kiln));
    println!(
        "  ratio kiln / bwrap         {:8.2}x   (target: at most 2x)",
        kiln.as_secs_f64() / bwrap.as_secs_f64()
    );
}
