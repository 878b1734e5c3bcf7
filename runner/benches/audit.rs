//! What the audit log costs a job.
//!
//!     cargo bench -p runner --bench audit [-- APPENDS RUNS]
//!
//! 1. One append (a line written and fsync'd, with a signed checkpoint every 1000 entries,
//!    the default), APPENDS times (default 2000) into a log in the temporary directory
//!    (put it on the state directory's filesystem with TMPDIR).
//! 2. How many entries one `kiln run -- /bin/true` adds (a real daemon; needs root), and
//!    so the audit's share of a job.
//! 3. With KILN_BASELINE=PATH, a `kiln` binary without the audit log: RUNS (default 30)
//!    `kiln run -- /bin/true` against each daemon, alternating, medians of the same run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use runner::engine::signer::Signer;
use runner::store::audit::{AuditLog, Decision, Record};

mod common;
use common::Daemon;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn record(i: usize) -> Record {
    Record {
        principal: "uid:1000".into(),
        tenant: None,
        action: "job.submit".into(),
        object: format!("job:{:036}", i),
        decision: Decision::Allow,
        reason: String::new(),
    }
}

fn time_run(daemon: &Daemon) -> Duration {
    let start = Instant::now();
    let status = daemon
        .kiln(&["run", "--", "/bin/true"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "kiln run failed: {status}");
    start.elapsed()
}

fn audit_lines(daemon: &Daemon) -> usize {
    std::fs::read_to_string(daemon.state.join("audit/audit.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let appends = args.first().copied().unwrap_or(2000);
    let runs = args.get(1).copied().unwrap_or(30);

    let dir = tempfile::tempdir().unwrap();
    let (signer, _) = Signer::open(&dir.path().join("keys")).unwrap();
    let log = AuditLog::open(dir.path(), signer, 1000, Duration::from_secs(3600)).unwrap();
    let mut samples = Vec::with_capacity(appends);
    let start = Instant::now();
    for i in 0..appends {
        let one = Instant::now();
        log.append(record(i)).unwrap();
        samples.push(one.elapsed());
    }
    let mean = start.elapsed() / u32::try_from(appends).unwrap();
    let append = median(samples);
    println!(
        "append (write + fsync, checkpoint every 1000) in {}: median {append:?}, mean {mean:?} over {appends}",
        dir.path().display()
    );

    if !nix::unistd::geteuid().is_root() {
        println!("(not root: no daemon, so no per-job figures)");
        return;
    }
    // The baseline's daemon, if any, starts first: a same-binary comparison showed the
    // first daemon started slower by a few ms, a bias now against the baseline.
    let old = std::env::var("KILN_BASELINE")
        .ok()
        .map(|b| Daemon::start_binary(&b));
    let daemon = Daemon::start();
    time_run(&daemon); // warm-up
    let before = audit_lines(&daemon);
    time_run(&daemon);
    let per_job = audit_lines(&daemon) - before;
    println!(
        "`kiln run -- /bin/true` adds {per_job} entries: about {:?} of audit per job (mean append)",
        mean * u32::try_from(per_job).unwrap()
    );

    let Some(old) = old else {
        println!("(set KILN_BASELINE to a kiln binary without the audit log to compare jobs)");
        daemon.stop();
        return;
    };
    time_run(&old);
    let (mut with, mut without) = (Vec::new(), Vec::new());
    // Which goes first alternates: a job runs beside the background work (the standby
    // supervisor's start) that the one before it left.
    for i in 0..runs {
        if i % 2 == 0 {
            with.push(time_run(&daemon));
            without.push(time_run(&old));
        } else {
            without.push(time_run(&old));
            with.push(time_run(&daemon));
        }
    }
    let (with, without) = (median(with), median(without));
    println!(
        "`kiln run -- /bin/true`, medians of {runs}: {with:?} with the audit log, {without:?} without ({:+.2} ms)",
        (with.as_secs_f64() - without.as_secs_f64()) * 1000.0
    );
    daemon.stop();
    old.stop();
}
