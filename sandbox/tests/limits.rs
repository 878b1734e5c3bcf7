//! Resource limits of real sandboxes: cgroup memory, pids and CPU, and rlimits. They need
//! root; without it they print "SKIPPED" (and fail when CI=true). Each test uses its own
//! host uid base so parallel tests never share host uids.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use sandbox::{Limits, Sandbox, StepSpec, StepStatus};

mod common;
use common::*;

/// The common fixture with `limits`, and the workspace kept for inspection.
struct Limited {
    ran: Ran,
    fixture: Fixture,
}

impl std::ops::Deref for Limited {
    type Target = Ran;
    fn deref(&self) -> &Ran {
        &self.ran
    }
}

impl Limited {
    fn ws(&self) -> &std::path::Path {
        &self.fixture.spec.workspace
    }
}

fn run_limited(base: u32, script: &str, limits: Limits) -> Limited {
    let mut fixture = fixture(base, script);
    fixture.spec.limits = limits;
    fixture.spec.timeout_ms = 60_000;
    let ran = run(&fixture.spec);
    println!(
        "outcome {:?}\n--- stdout\n{}--- stderr\n{}",
        ran.outcome, ran.stdout, ran.stderr
    );
    Limited { ran, fixture }
}

#[test]
fn memory_bomb_is_oom_killed_and_reported() {
    if !is_root("memory_bomb_is_oom_killed_and_reported") {
        return;
    }
    let limits = Limits {
        memory_bytes: 32 << 20,
        ..Limits::default()
    };
    // dd's 256 MiB buffer is filled by the read from /dev/zero: far above the limit.
    let r = run_limited(
        600_000,
        "dd if=/dev/zero of=/dev/null bs=256M count=1; echo dd=$?",
        limits,
    );
    assert!(r.outcome.usage.oom_killed, "{:?}", r.outcome);
    // dd was killed (SIGKILL) and the shell went on to report it.
    assert!(r.stdout.contains("dd=137"), "{}", r.stdout);
    assert!(r.outcome.usage.peak_memory_bytes > 16 << 20);
    assert!(r.outcome.usage.peak_memory_bytes <= 33 << 20);
}

#[test]
fn fork_bomb_hits_the_pids_limit_and_the_host_is_unaffected() {
    if !is_root("fork_bomb_hits_the_pids_limit_and_the_host_is_unaffected") {
        return;
    }
    let base = 610_000;
    let limits = Limits {
        pids: 16,
        ..Limits::default()
    };
    // sleep is forked before the bomb (later forks may all fail); every bomb process forks
    // forever. After 2 s the step counts the namespace's processes with builtins only,
    // kills the bomb and exits; pid 1's exit would kill whatever is left anyway.
    let r = run_limited(
        base,
        "sleep 2 & s=$!\n\
         b() { while :; do b & done; }\n\
         b 2>/dev/null &\n\
         wait $s\n\
         n=0; for p in /proc/[0-9]*; do n=$((n+1)); done\n\
         echo $n\n\
         kill -9 -1 2>/dev/null\n\
         exit 0",
        limits,
    );
    assert_eq!(r.outcome.status, StepStatus::Exited { code: 0 });
    assert!(r.outcome.usage.pids_limit_hit, "{:?}", r.outcome);
    // At most the limit: init, the step, the bomb (the ls pipeline's processes included).
    let seen: u32 = r.stdout.trim().parse().unwrap();
    assert!(seen <= 16, "{seen} processes seen in the sandbox");
    // The host still forks, and nothing of the step survived it.
    assert!(std::process::Command::new("/bin/true")
        .status()
        .unwrap()
        .success());
    assert!(host_processes_of(base + STEP_UID).is_empty());
}

#[test]
fn cpu_time_is_reported_and_the_quota_throttles() {
    if !is_root("cpu_time_is_reported_and_the_quota_throttles") {
        return;
    }
    let limits = Limits {
        cpu_millis: 250,
        ..Limits::default()
    };
    // A busy loop for 1.2 s of wall time at a quarter CPU.
    let r = run_limited(
        620_000,
        "end=$(( $(date +%s%N) + 1200000000 )); while [ $(date +%s%N) -lt $end ]; do :; done",
        limits,
    );
    assert_eq!(r.outcome.status, StepStatus::Exited { code: 0 });
    let cpu = r.outcome.usage.cpu_time_ms;
    assert!(cpu >= 100, "cpu time {cpu} ms");
    // 0.25 CPU over ~1.2 s is ~300 ms; allow slack for period boundaries.
    assert!(cpu <= 600, "cpu time {cpu} ms over a 0.25 CPU quota");
}

#[test]
fn fsize_rlimit_stops_big_files() {
    if !is_root("fsize_rlimit_stops_big_files") {
        return;
    }
    let limits = Limits {
        fsize_bytes: 1 << 20,
        nofile: 64,
        ..Limits::default()
    };
    let r = run_limited(
        630_000,
        "dd if=/dev/zero of=big bs=64k count=64 2>/dev/null; echo dd=$?; ulimit -n; ulimit -c",
        limits,
    );
    assert_eq!(r.outcome.status, StepStatus::Exited { code: 0 });
    // SIGXFSZ (25) killed dd at the limit.
    assert!(r.stdout.contains("dd=153"), "{}", r.stdout);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.get(1).copied(), Some("64"), "{}", r.stdout);
    assert_eq!(lines.get(2).copied(), Some("0"), "{}", r.stdout);
    assert_eq!(
        std::fs::metadata(r.ws().join("big")).unwrap().len(),
        1 << 20
    );
}

#[test]
fn probe_reports_the_cgroup_mode_and_limits_are_in_the_profile() {
    if !is_root("probe_reports_the_cgroup_mode_and_limits_are_in_the_profile") {
        return;
    }
    let host = Sandbox::probe().unwrap();
    assert!(["v1", "v2"].contains(&host.cgroup.mode.as_str()));
    for c in ["memory", "pids", "cpu"] {
        assert!(host.cgroup.controllers.iter().any(|x| x == c), "{c}");
    }
    let limits = Limits {
        memory_bytes: 123 << 20,
        ..Limits::default()
    };
    let spec = StepSpec {
        argv: vec!["true".into()],
        env: vec![],
        root: vec![],
        workspace: "/nonexistent".into(),
        working_directory: Vec::new(),
        host_uid_base: 640_000,
        id_range: 65536,
        step_uid: 1000,
        timeout_ms: 1000,
        hostname: "h".into(),
        tmp_size_bytes: 1 << 20,
        limits,
        tcp_connect_ports: vec![],
        egress_proxy_port: None,
        waived_layers: vec![],
    };
    let text = serde_json::to_string(&sandbox::profile(&spec, &host)).unwrap();
    assert!(
        text.contains(&format!("\"memory_bytes\":{}", 123u64 << 20)),
        "{text}"
    );
    assert!(text.contains("\"fsize\":"), "{text}");
}

#[test]
fn limits_below_the_minimum_are_refused() {
    let ok = StepSpec {
        argv: vec!["true".into()],
        env: vec![],
        root: vec![],
        workspace: "/w".into(),
        working_directory: Vec::new(),
        host_uid_base: 650_000,
        id_range: 65536,
        step_uid: 1000,
        timeout_ms: 1000,
        hostname: "h".into(),
        tmp_size_bytes: 1 << 20,
        limits: Limits::default(),
        tcp_connect_ports: vec![],
        egress_proxy_port: None,
        waived_layers: vec![],
    };
    sandbox::validate(&ok).unwrap();
    for (f, what) in [
        (
            (|l: &mut Limits| l.memory_bytes = 1 << 20) as fn(&mut Limits),
            "memory",
        ),
        (|l: &mut Limits| l.pids = 1, "pids"),
        (|l: &mut Limits| l.cpu_millis = 1, "cpu"),
        (|l: &mut Limits| l.nofile = 3, "nofile"),
        (|l: &mut Limits| l.fsize_bytes = 0, "fsize"),
    ] {
        let mut spec = ok.clone();
        f(&mut spec.limits);
        let err = sandbox::validate(&spec).unwrap_err().to_string();
        assert!(err.contains(what), "{err}");
    }
}

#[test]
fn cgroups_left_by_killed_supervisors_are_removed_and_live_ones_kept() {
    if !is_root("cgroups_left_by_killed_supervisors_are_removed_and_live_ones_kept") {
        return;
    }
    let host = Sandbox::probe().unwrap();
    // A supervisor that is gone: the pid of a child already reaped.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    let dead = format!("step-{dead_pid}-0-1");
    let live = format!("step-{}-999-1", std::process::id());
    for parent in &host.cgroup.parents {
        std::fs::create_dir(parent.join(&dead)).unwrap();
        std::fs::create_dir(parent.join(&live)).unwrap();
    }
    let removed = host.cgroup.remove_stale();
    for parent in &host.cgroup.parents {
        assert!(!parent.join(&dead).exists(), "{}", parent.display());
        assert!(parent.join(&live).exists(), "{}", parent.display());
        std::fs::remove_dir(parent.join(&live)).unwrap();
    }
    assert!(removed >= host.cgroup.parents.len(), "{removed}");
}
