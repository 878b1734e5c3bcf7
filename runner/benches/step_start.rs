//! End-to-end step start: `kiln run -- /bin/true` through a real daemon (CLI start,
//! gRPC, durable record, sandbox, hashing, signing) against bubblewrap running the
//! same program with a comparable isolation, measured in the same run, the runs of each
//! interleaved.
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
//! With KILN_BASELINE=PATH, another `kiln` binary (an earlier build) is measured the same
//! way in the same run, interleaved with the others: before and after side by side.
//!
//! Needs root and bwrap. Prints medians, the p99 and the ratios.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::Daemon;

/// Clients submitting at once in the throughput run.
const CLIENTS: usize = 2;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn percentile(mut samples: Vec<Duration>, pct: usize) -> Duration {
    samples.sort();
    let rank = (samples.len() * pct).div_ceil(100).max(1);
    samples[rank - 1]
}

fn run(mut command: Command) -> Duration {
    let start = Instant::now();
    let status = command.stdout(Stdio::null()).status().unwrap();
    let took = start.elapsed();
    assert!(status.success(), "run failed: {status}");
    took
}

/// Runs `per_client` commands in each of [`CLIENTS`] threads at once; answers commands
/// per second over the whole run.
fn throughput(per_client: usize, command: &(dyn Fn() -> Command + Sync)) -> f64 {
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..CLIENTS {
            scope.spawn(|| {
                for _ in 0..per_client {
                    run(command());
                }
            });
        }
    });
    (CLIENTS * per_client) as f64 / start.elapsed().as_secs_f64()
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

fn bwrap() -> Command {
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
}

/// One `kiln` binary's daemon and what was measured of it.
struct Subject {
    name: String,
    daemon: Daemon,
    sequential: Vec<Duration>,
}

impl Subject {
    fn start(name: &str, daemon: Daemon) -> Self {
        // One warm-up job, not counted.
        run(daemon.kiln(&["run", "--", "/bin/true"]));
        Subject {
            name: name.into(),
            daemon,
            sequential: Vec::new(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.daemon.log).unwrap_or_default()
    }
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
    let mut subjects = vec![Subject::start("kiln", Daemon::start())];
    if let Ok(baseline) = std::env::var("KILN_BASELINE") {
        subjects.push(Subject::start("baseline", Daemon::start_binary(&baseline)));
    }
    run(bwrap());
    let (mut bwrap_runs, mut true_runs) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        true_runs.push(run(Command::new("/bin/true")));
        bwrap_runs.push(run(bwrap()));
        for s in &mut subjects {
            s.sequential
                .push(run(s.daemon.kiln(&["run", "--", "/bin/true"])));
        }
    }
    let bwrap_median = median(bwrap_runs);
    println!("medians of {runs} runs each, interleaved, same run:");
    println!(
        "  /bin/true                  {:8.2} ms",
        ms(median(true_runs))
    );
    println!("  bwrap --unshare-all ...    {:8.2} ms", ms(bwrap_median));
    let mut sequential_starts = Vec::new();
    for s in &subjects {
        let kiln = median(s.sequential.clone());
        let in_daemon = start_latencies(&s.log());
        assert!(
            in_daemon.len() > runs,
            "expected a start latency per kiln run in the daemon log, found {}",
            in_daemon.len()
        );
        sequential_starts.push(in_daemon.len());
        println!(
            "  {:<9} run -- /bin/true {:8.2} ms   {:5.2}x bwrap (target: at most 2x); in the daemon, step scheduled -> execve {:6.2} ms (target: under 2 ms)",
            s.name,
            ms(kiln),
            kiln.as_secs_f64() / bwrap_median.as_secs_f64(),
            ms(median(in_daemon)),
        );
    }

    println!("throughput, {CLIENTS} clients at once, {runs} runs each:");
    let bwrap_rate = throughput(runs, &bwrap);
    println!("  bwrap loops                {bwrap_rate:8.1} runs/s");
    for (s, skip) in subjects.iter().zip(sequential_starts) {
        let rate = throughput(runs, &|| s.daemon.kiln(&["run", "--", "/bin/true"]));
        let under_load: Vec<Duration> = start_latencies(&s.log()).into_iter().skip(skip).collect();
        assert_eq!(
            under_load.len(),
            CLIENTS * runs,
            "expected a start latency per concurrent kiln run in the daemon log"
        );
        println!(
            "  {:<9} run              {rate:8.1} jobs/s   bwrap {:5.2}x as many; in the daemon under load, step start median {:.2} ms, p99 {:.2} ms",
            s.name,
            bwrap_rate / rate,
            ms(median(under_load.clone())),
            ms(percentile(under_load, 99)),
        );
    }
    for s in subjects {
        s.daemon.stop();
    }
}
