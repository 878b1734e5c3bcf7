//! End-to-end step start: `kiln run -- /bin/true` through a real daemon (CLI start,
//! gRPC, durable record, sandbox, hashing, signing) against bubblewrap running the
//! same program with a comparable isolation, measured in the same run.
//!
//!     cargo bench -p runner --bench step_start [-- RUNS]
//!
//! Also the in-daemon step start: from the daemon scheduling the step to the step's execve
//! (`start_latency_us` of the daemon's "step finished" log lines).
//!
//! Needs root and bwrap. Prints medians and the ratio.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::Daemon;

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

/// `start_latency_us=N` of every "step finished" line.
fn start_latencies(log: &str) -> Vec<Duration> {
    log.lines()
        .filter(|l| l.contains("step finished"))
        .filter_map(|l| l.split("start_latency_us=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .map(Duration::from_micros)
        .collect()
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
    let daemon = Daemon::start();

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
    let kiln = time_runs(runs, || daemon.kiln(&["run", "--", "/bin/true"]));
    let log = daemon.stop();
    let in_daemon = start_latencies(&log);
    assert!(
        in_daemon.len() > runs,
        "expected a start latency per kiln run in the daemon log, found {}",
        in_daemon.len()
    );
    let in_daemon = median(in_daemon);

    println!("medians of {runs} runs each, same run:");
    println!("  /bin/true                  {:8.2} ms", ms(true_alone));
    println!("  bwrap --unshare-all ...    {:8.2} ms", ms(bwrap));
    println!("  kiln run -- /bin/true      {:8.2} ms", ms(kiln));
    println!(
        "  in the daemon: step scheduled -> execve {:8.2} ms   (target: under 2 ms)",
        ms(in_daemon)
    );
    println!(
        "  ratio kiln / bwrap         {:8.2}x   (target: at most 2x)",
        kiln.as_secs_f64() / bwrap.as_secs_f64()
    );
}
