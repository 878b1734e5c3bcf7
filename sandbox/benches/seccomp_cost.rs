//! Per-syscall cost of the step's seccomp filter: the same getppid(2) loop run unsandboxed
//! and inside a real sandboxed step, in one run. Also: the filter alone (no sandbox) with
//! the denials as USER_NOTIF (as shipped) and as plain ERRNO, to show USER_NOTIF costs
//! nothing for allowed syscalls; and the round trip of one counted denial.
//!
//! `cargo bench -p sandbox --bench seccomp_cost` (needs root; prints SKIPPED otherwise).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench: a panic is the report

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use sandbox::{RootEntry, Sandbox, StepSpec, StepStatus};

const ITERATIONS: u64 = 1_000_000;
const ROUNDS: usize = 7;
const DENIALS: u64 = 20_000;
const PASSES: usize = 3;

/// Fastest ns per getppid over `ROUNDS` rounds of `n` calls (the minimum: the machine is
/// shared, and noise only ever adds time).
fn getppid_loop(n: u64) -> f64 {
    let mut per_round: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                std::hint::black_box(nix::unistd::getppid());
            }
            t.elapsed().as_nanos() as f64 / n as f64
        })
        .collect();
    per_round.sort_by(f64::total_cmp);
    per_round[0]
}

/// ns per denied keyctl(2) (EPERM from the supervisor, counted).
fn denied_loop(n: u64) -> f64 {
    // setns(2) is denied and nix wraps it safely (keyctl has no safe wrapper).
    let fd = std::fs::File::open("/dev/null").unwrap();
    let t = Instant::now();
    for _ in 0..n {
        let r = nix::sched::setns(&fd, nix::sched::CloneFlags::empty());
        assert_eq!(std::hint::black_box(r), Err(nix::errno::Errno::EPERM));
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn filtered_child(mode: &str) -> f64 {
    let mut program = sandbox::seccomp::compiled()
        .unwrap()
        .instructions()
        .to_vec();
    if mode == "errno" {
        for i in &mut program {
            if i.code == 0x06 && i.k == libc::SECCOMP_RET_USER_NOTIF {
                i.k = libc::SECCOMP_RET_ERRNO | libc::EPERM.unsigned_abs();
            }
        }
    }
    seccompiler::apply_filter(&program).unwrap();
    getppid_loop(ITERATIONS)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--loop") => {
            println!("{}", getppid_loop(ITERATIONS));
            return;
        }
        Some("--denied") => {
            println!("{}", denied_loop(DENIALS));
            return;
        }
        Some("--filtered") => {
            println!(
                "{}",
                filtered_child(args.get(2).map_or("notif", String::as_str))
            );
            return;
        }
        _ => {}
    }
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "seccomp_cost needs root"
        );
        println!("SKIPPED: seccomp_cost needs root");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let child = |mode: &str| -> f64 {
        let out = std::process::Command::new(&exe)
            .args(["--filtered", mode])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };

    // Interleaved passes, best of each, so drift in the machine's load hits all alike.
    let (mut bare, mut sandboxed, mut filter_notif, mut filter_errno) =
        (f64::MAX, f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..PASSES {
        bare = bare.min(getppid_loop(ITERATIONS));
        sandboxed = sandboxed.min(in_sandbox(&exe, "--loop", 600_000).0);
        filter_notif = filter_notif.min(child("notif"));
        filter_errno = filter_errno.min(child("errno"));
    }
    let (per_denial, denials) = in_sandbox(&exe, "--denied", 610_000);

    println!("seccomp_cost: getppid(2) x {ITERATIONS}, best of {ROUNDS} rounds x {PASSES} passes");
    println!("  unsandboxed                      {bare:7.1} ns/syscall");
    println!(
        "  sandboxed step (kiln)            {sandboxed:7.1} ns/syscall  ({:+.1} ns, target <= +40)",
        sandboxed - bare
    );
    println!(
        "  filter only, USER_NOTIF denials  {filter_notif:7.1} ns/syscall  ({:+.1} ns)",
        filter_notif - bare
    );
    println!(
        "  filter only, ERRNO denials       {filter_errno:7.1} ns/syscall  ({:+.1} ns)",
        filter_errno - bare
    );
    println!(
        "  one denied syscall, answered and counted by the supervisor: {per_denial:.0} ns \
         ({denials} counted)"
    );
}

/// Runs this binary with `mode` in a sandboxed step; (its number, denials counted).
fn in_sandbox(exe: &std::path::Path, mode: &str, base: u32) -> (f64, u64) {
    let ws = tempfile::tempdir().unwrap();
    nix::unistd::chown(
        ws.path(),
        Some(nix::unistd::Uid::from_raw(base + 1000)),
        Some(nix::unistd::Gid::from_raw(base + 1000)),
    )
    .unwrap();
    let mut root = vec![RootEntry::Bind {
        source: "/usr".into(),
        target: "/usr".into(),
    }];
    for name in ["bin", "lib", "lib64"] {
        let host = PathBuf::from("/").join(name);
        if let Ok(to) = std::fs::read_link(&host) {
            root.push(RootEntry::Symlink {
                path: host,
                points_to: to,
            });
        }
    }
    root.push(RootEntry::Bind {
        source: exe.to_path_buf(),
        target: "/opt/seccomp_cost".into(),
    });
    let spec = StepSpec {
        argv: vec!["/opt/seccomp_cost".into(), mode.into()],
        env: vec![("PATH".into(), "/usr/bin".into())],
        root,
        workspace: ws.path().to_path_buf(),
        working_directory: Vec::new(),
        host_uid_base: base,
        id_range: 65536,
        step_uid: 1000,
        timeout_ms: 120_000,
        hostname: "bench".into(),
        tmp_size_bytes: 16 << 20,
        limits: sandbox::Limits::default(),
        tcp_connect_ports: vec![],
        egress_proxy_port: None,
        waived_layers: vec![],
    };
    let sb = Sandbox::new(PathBuf::from(env!("CARGO_BIN_EXE_kiln-sandbox-init")));
    let mut step = sb.spawn(&spec).unwrap();
    let out = step.take_stdout().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::fs::File::from(out).read_to_string(&mut s).unwrap();
        s
    });
    let outcome = step.wait().unwrap();
    let text = reader.join().unwrap();
    assert_eq!(outcome.status, StepStatus::Exited { code: 0 }, "{text}");
    let denials = outcome.seccomp_denials.values().sum();
    (text.trim().parse().unwrap(), denials)
}
