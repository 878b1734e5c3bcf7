//! End-to-end step start: `kiln run -- /bin/true` through a real daemon (CLI start,
//! gRPC, durable record, sandbox, hashing, signing) against bubblewrap running the
//! same program with a comparable isolation, measured in the same run.
//!
//!     cargo bench -p runner --bench step_start [-- RUNS]
//!
//! Also the in-daemon step start: from the daemon scheduling the step to the step's execve
//! (`start_latency_us` of the daemon's "step finished" log lines).
//!
//! Then the throughput a shared runner's users see: tiny jobs per second with 2 clients
//! submitting at once (each running `kiln run -- /bin/true` in a loop) against 2 loops of
//! the bwrap command, and the p99 of the in-daemon step start under that load.
//!
//! Needs root and bwrap. Prints medians, the p99 and the ratios.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::Daemon;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn percentile(mut samples: Vec<Duration>, pct: usize) -> Duration {
    samples.sort();
    let rank = (samples.len() * pct).div_ceil(100).max(1);
    samples[rank - 1]
}

/// Runs `per_client` commands in each of `clients` threads at once; answers commands
/// per second over the whole run.
fn throughput(clients: usize, per_client: usize, command: impl Fn() -> Command + Sync) -> f64 {
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..clients {
            scope.spawn(|| {
                for _ in 0..per_client {
                    let status = command().stdout(Stdio::null()).status().unwrap();
                    assert!(status.success(), "run failed: {status}");
                }
            });
        }
    });
    (clients * per_client) as f64 / start.elapsed().as_secs_f64()
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

    let bwrap_command = || {
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
    };
    let kiln_command = || daemon.kiln(&["run", "--", "/bin/true"]);
    let true_alone = time_runs(runs, || Command::new("/bin/true"));
    let bwrap = time_runs(runs, bwrap_command);
    let kiln = time_runs(runs, kiln_command);
    let sequential_log = std::fs::read_to_string(&daemon.log).unwrap_or_default();
    let in_daemon = start_latencies(&sequential_log);
    assert!(
        in_daemon.len() > runs,
        "expected a start latency per kiln run in the daemon log, found {}",
        in_daemon.len()
    );
    let sequential_starts = in_daemon.len();
    let in_daemon = median(in_daemon);

    const CLIENTS: usize = 2;
    let bwrap_rate = throughput(CLIENTS, runs, bwrap_command);
    let kiln_rate = throughput(CLIENTS, runs, kiln_command);
    let log = daemon.stop();
    let under_load: Vec<Duration> = start_latencies(&log)
        .into_iter()
        .skip(sequential_starts)
        .collect();
    assert_eq!(
        under_load.len(),
        CLIENTS * runs,
        "expected a start latency per concurrent kiln run in the daemon log"
    );
    let (load_median, load_p99) = (median(under_load.clone()), percentile(under_load, 99));

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
    println!("throughput, {CLIENTS} clients at once, {runs} runs each:");
    println!("  bwrap loops                {bwrap_rate:8.1} runs/s");
    println!("  kiln run                   {kiln_rate:8.1} jobs/s");
    println!(
        "  ratio bwrap / kiln         {:8.2}x",
        bwrap_rate / kiln_rate
    );
    println!(
        "  in the daemon under load: step start median {:.2} ms, p99 {:.2} ms",
        ms(load_median),
        ms(load_p99)
    );
}
