//! A real compile in the sandbox against the same compile on the host, bare: gcc -O2 on
//! a generated C file of many functions, as a `kiln run` job (its input uploaded, its
//! object file an output) and as a plain process in a temporary directory, interleaved,
//! in the same run.
//!
//!     cargo bench -p runner --bench compile [-- RUNS]
//!
//! With KILN_BASELINE=PATH, another `kiln` binary (an earlier build) runs the same job in
//! the same rounds.
//!
//! Needs root and gcc. Prints medians and the ratio (the job's whole time, its start
//! and its signed link included, against the bare compile).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::Daemon;

/// Functions in the generated unit: about three seconds of gcc -O2 here.
const FUNCTIONS: usize = 500;

fn source() -> String {
    let mut c = String::from("#include <stdio.h>\n");
    for i in 0..FUNCTIONS {
        c.push_str(&format!(
            "int f{i}(int x) {{ int s = 0; for (int k = 0; k < x; k++) s += (k * {i}) ^ (s >> 3); return s; }}\n"
        ));
    }
    c.push_str("int main(void) { int s = 0;\n");
    for i in 0..FUNCTIONS {
        c.push_str(&format!("  s += f{i}({i});\n"));
    }
    c.push_str("  printf(\"%d\\n\", s); return 0; }\n");
    c
}

fn timed(mut command: Command) -> Duration {
    let start = Instant::now();
    let status = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    let took = start.elapsed();
    assert!(status.success(), "{command:?} failed: {status}");
    took
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(7);
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: the compile benchmark needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("unit.c");
    std::fs::write(&unit, source()).unwrap();
    let mut daemons = vec![("kiln", Daemon::start())];
    if let Ok(baseline) = std::env::var("KILN_BASELINE") {
        daemons.push(("baseline", Daemon::start_binary(&baseline)));
    }
    let input = format!("--input={}:unit.c", unit.display());
    let kiln = |daemon: &Daemon| {
        daemon.kiln(&[
            "run",
            &input,
            "--output=unit.o",
            "--",
            "gcc",
            "-O2",
            "-c",
            "unit.c",
            "-o",
            "unit.o",
        ])
    };
    let bare = || {
        let mut c = Command::new("gcc");
        c.args(["-O2", "-c", "unit.c", "-o", "unit.o"])
            .current_dir(dir.path());
        c
    };
    // One of each first, not counted (page cache, the daemons' standbys).
    timed(bare());
    for (_, daemon) in &daemons {
        timed(kiln(daemon));
    }
    let mut on_host = Vec::new();
    let mut in_kiln: Vec<Vec<Duration>> = vec![Vec::new(); daemons.len()];
    for _ in 0..runs {
        on_host.push(timed(bare()));
        for ((_, daemon), samples) in daemons.iter().zip(&mut in_kiln) {
            samples.push(timed(kiln(daemon)));
        }
    }
    let on_host = median(on_host);
    println!("gcc -O2 -c of {FUNCTIONS} functions, medians of {runs} interleaved runs:");
    println!(
        "  bare, on the host            {:8.1} ms",
        on_host.as_secs_f64() * 1000.0
    );
    for ((name, daemon), samples) in daemons.into_iter().zip(in_kiln) {
        let job = median(samples);
        println!(
            "  {name:<9} run (the whole job) {:8.1} ms   {:6.3}x bare (target: stay at 1.00-1.01x)",
            job.as_secs_f64() * 1000.0,
            job.as_secs_f64() / on_host.as_secs_f64()
        );
        daemon.stop();
    }
}
