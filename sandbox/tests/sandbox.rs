//! Real sandboxes, driven as the runner drives them. They need root; without it they print
//! "SKIPPED" (and fail when CI=true, so CI can never pass by skipping).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use sandbox::{RootEntry, Sandbox, StepSpec, StepStatus};

mod common;
use common::*;

fn run_script(base: u32, script: &str) -> Ran {
    let f = fixture(base, script);
    let r = run(&f.spec);
    println!(
        "outcome {:?}\n--- stdout\n{}--- stderr\n{}",
        r.outcome, r.stdout, r.stderr
    );
    r
}

fn exited(r: &Ran, code: i32) {
    assert_eq!(
        r.outcome.status,
        StepStatus::Exited { code },
        "stderr: {}",
        r.stderr
    );
}

#[test]
fn echo_stdout_stderr_and_exit_code() {
    if !is_root("echo_stdout_stderr_and_exit_code") {
        return;
    }
    let r = run_script(210_000, "echo hello; echo oops >&2; exit 7");
    exited(&r, 7);
    assert_eq!(r.stdout, "hello\n");
    assert_eq!(r.stderr, "oops\n");
}

#[test]
fn signal_is_reported() {
    if !is_root("signal_is_reported") {
        return;
    }
    let r = run_script(220_000, "kill -TERM $$");
    assert_eq!(r.outcome.status, StepStatus::Signaled { signal: 15 });
}

#[test]
fn cannot_read_host_files_outside_image_and_workspace() {
    if !is_root("cannot_read_host_files_outside_image_and_workspace") {
        return;
    }
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("secret");
    std::fs::write(&secret, "TOPSECRET").unwrap();
    let script = format!(
        "for p in {} /root /var/lib /home /etc/shadow /run; do \
           if cat \"$p\" 2>/dev/null || ls \"$p\" 2>/dev/null; then echo LEAK \"$p\"; fi; \
         done; echo checked",
        secret.display()
    );
    let r = run_script(230_000, &script);
    exited(&r, 0);
    assert_eq!(r.stdout, "checked\n");
    assert!(!r.stdout.contains("TOPSECRET"));
}

#[test]
fn no_capabilities_no_new_privs_seccomp_and_ids() {
    if !is_root("no_capabilities_no_new_privs_seccomp_and_ids") {
        return;
    }
    let r = run_script(
        240_000,
        "cat /proc/self/status; id -u; id -g; id -G; hostname",
    );
    exited(&r, 0);
    let field = |name: &str| {
        r.stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name}:")))
            .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(cap), "0000000000000000", "{cap}");
    }
    assert_eq!(field("NoNewPrivs"), "1");
    // nothing ignored or blocked is inherited from the Rust supervisor (SIGPIPE!)
    assert_eq!(field("SigIgn"), "0000000000000000");
    assert_eq!(field("SigBlk"), "0000000000000000");
    assert_eq!(field("Seccomp"), "2");
    assert_eq!(field("Uid"), "1000 1000 1000 1000");
    assert_eq!(field("Gid"), "1000 1000 1000 1000");
    assert_eq!(field("Groups"), "");
    let tail: Vec<&str> = r.stdout.lines().rev().take(4).collect();
    assert_eq!(tail, vec!["kiln-test", "1000", "1000", "1000"]);
}

#[test]
fn only_loopback_and_no_host_tcp() {
    if !is_root("only_loopback_and_no_host_tcp") {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        "tail -n +3 /proc/self/net/dev | cut -d: -f1 | tr -d ' '; \
         if bash -c 'echo x > /dev/tcp/127.0.0.1/{port}' 2>/dev/null; then echo CONNECTED; fi"
    );
    let r = run_script(250_000, &script);
    exited(&r, 0);
    assert_eq!(r.stdout, "lo\n");
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("host listener got a connection: {other:?}"),
    }
}

#[test]
fn each_step_has_its_own_network_namespace_made_ahead_by_its_standby() {
    if !is_root("each_step_has_its_own_network_namespace_made_ahead_by_its_standby") {
        return;
    }
    let sb = sandbox();
    // Both standbys made their namespaces while waiting; neither may be the other's or
    // the caller's.
    let (first, second) = (sb.standby().unwrap(), sb.standby().unwrap());
    let script =
        "readlink /proc/self/ns/net; tail -n +3 /proc/self/net/dev | cut -d: -f1 | tr -d ' '";
    let mut namespaces = Vec::new();
    for (waiting, base) in [(first, 251_000), (second, 252_000)] {
        let f = fixture(base, script);
        let mut step = waiting.start(&f.spec).unwrap();
        let out = drain(step.take_stdout());
        let _err = drain(step.take_stderr());
        assert_eq!(step.wait().unwrap().status, StepStatus::Exited { code: 0 });
        let out = out.join().unwrap();
        let mut lines = out.lines();
        namespaces.push(lines.next().unwrap_or_default().to_string());
        assert_eq!(lines.collect::<Vec<_>>(), vec!["lo"], "{out}");
    }
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    for ns in &namespaces {
        assert!(ns.starts_with("net:["), "{namespaces:?}");
        assert_ne!(
            Path::new(ns),
            ours,
            "a step ran in the caller's network namespace"
        );
    }
    assert_ne!(
        namespaces[0], namespaces[1],
        "two steps shared a network namespace"
    );
}

/// The host's device events (uevents) reach netlink sockets in network namespaces the
/// host's user namespace owns; the step's namespace is not one of them, and the step may
/// not open a netlink socket anyway.
#[test]
fn a_step_cannot_listen_for_the_hosts_device_events() {
    if !is_root("a_step_cannot_listen_for_the_hosts_device_events") {
        return;
    }
    python3("a_step_cannot_listen_for_the_hosts_device_events");
    let probe = r#"
import socket
try:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 15)
    s.bind((0, 1))
    print("OPENED")
except OSError as e:
    print("refused", e.errno)
"#;
    let r = run_script(253_000, &format!("python3 -c '{probe}'"));
    exited(&r, 0);
    assert!(r.stdout.starts_with("refused"), "{}", r.stdout);
}

#[test]
fn cannot_mount_or_unshare() {
    if !is_root("cannot_mount_or_unshare") {
        return;
    }
    let r = run_script(
        260_000,
        "if mount -t tmpfs none /tmp 2>/dev/null; then echo MOUNTED; fi; \
         if unshare -r true 2>/dev/null; then echo UNSHARED; fi; \
         if chroot / true 2>/dev/null; then echo CHROOTED; fi; \
         echo done",
    );
    exited(&r, 0);
    assert_eq!(r.stdout, "done\n");
}

/// `unshare -U` needs no privilege (nested user namespaces are allowed to uid 1000), so only
/// the seccomp filter makes it fail with EPERM.
#[test]
fn seccomp_denies_unshare_and_namespace_clone() {
    if !is_root("seccomp_denies_unshare_and_namespace_clone") {
        return;
    }
    let r = run_script(270_000, "unshare -U true; echo rc=$?");
    exited(&r, 0);
    assert!(r.stdout.contains("rc=1"), "{}", r.stdout);
    assert!(r.stderr.contains("Operation not permitted"), "{}", r.stderr);
    // The argument-checking rules and the hand-written prefix, probed with raw syscalls.
    if Path::new("/usr/bin/python3").exists() {
        let r = run_script(270_100, &format!("python3 -c '{SECCOMP_PROBE}'"));
        exited(&r, 0);
        assert_eq!(
            r.stdout,
            "packet 1\nnetlink 1\nunix+inet6 ok\nclone newuser 1\nfork ok\nclone3 38\npersonality 1\nquery ok\n"
        );
        // The x32 ABI (syscall number | 0x40000000) kills the process.
        #[cfg(target_arch = "x86_64")]
        {
            let r = run_script(
                270_200,
                "exec python3 -c 'import ctypes; ctypes.CDLL(None).syscall(0x40000000 + 39); print(\"alive\")'",
            );
            assert_eq!(
                r.outcome.status,
                StepStatus::Signaled {
                    signal: libc::SIGSYS
                }
            );
            assert_eq!(r.stdout, "");
        }
    }
}

/// Python run in the sandbox; prints one line per probe (errno numbers where denied).
const SECCOMP_PROBE: &str = r#"
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
for name, fam in (("packet", socket.AF_PACKET), ("netlink", socket.AF_NETLINK)):
    try:
        socket.socket(fam, socket.SOCK_RAW); print(name, "ALLOWED")
    except OSError as e:
        print(name, e.errno)
socket.socket(socket.AF_UNIX).close(); socket.socket(socket.AF_INET6).close(); print("unix+inet6 ok")
r = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)
if r == 0:
    os._exit(0)
print("clone newuser", ctypes.get_errno() if r < 0 else "ALLOWED")
if r > 0:
    os.waitpid(r, 0)
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0); print("fork ok")
r = libc.syscall(435, 0, 0)
print("clone3", ctypes.get_errno() if r < 0 else "ALLOWED")
r = libc.personality(0x0040000)
print("personality", ctypes.get_errno() if r < 0 else "ALLOWED")
print("query", "ok" if libc.personality(0xffffffff) >= 0 else "FAILED")
"#;

#[test]
fn files_created_belong_to_the_step_host_uid() {
    if !is_root("files_created_belong_to_the_step_host_uid") {
        return;
    }
    let base = 280_000;
    let f = fixture(
        base,
        "echo data > /workspace/made && mkdir sub && touch sub/x",
    );
    let r = run(&f.spec);
    exited(&r, 0);
    for p in ["made", "sub", "sub/x"] {
        let md = std::fs::metadata(f.spec.workspace.join(p)).unwrap();
        assert_eq!(md.uid(), base + STEP_UID, "{p}");
        assert_eq!(md.gid(), base + STEP_UID, "{p}");
    }
}

#[test]
fn root_and_usr_are_read_only_tmp_and_workspace_writable() {
    if !is_root("root_and_usr_are_read_only_tmp_and_workspace_writable") {
        return;
    }
    let r = run_script(
        290_000,
        "for p in /newfile /usr/newfile /etc/newfile /var/empty/x /dev/newfile; do \
           if touch $p 2>/dev/null; then echo WROTE $p; fi; done; \
         touch /tmp/ok /workspace/ok /dev/shm/ok && echo writable; \
         echo x > /dev/null && head -c 4 /dev/urandom | wc -c; \
         pwd; grep -E ' / | /usr ' /proc/self/mounts | cut -d' ' -f2,4 | cut -d, -f1 | sort",
    );
    exited(&r, 0);
    assert_eq!(r.stdout, "writable\n4\n/workspace\n/ ro\n/usr ro\n");
}

#[test]
fn pid_namespace_shows_only_the_sandbox() {
    if !is_root("pid_namespace_shows_only_the_sandbox") {
        return;
    }
    let r = run_script(
        300_000,
        "echo $$; ls /proc | grep -c '^[0-9]'; kill -9 1; echo kill=$?",
    );
    exited(&r, 0);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], "2", "the step is the first child of pid 1");
    let n: u32 = lines[1].parse().unwrap();
    assert!(n <= 4, "step sees {n} processes");
    assert_eq!(
        lines[2], "kill=1",
        "the step must not be able to kill pid 1"
    );
}

#[test]
fn landlock_denies_writes_the_mounts_would_allow() {
    if !is_root("landlock_denies_writes_the_mounts_would_allow") {
        return;
    }
    // /proc is mounted read-write and a process may rename itself, so only Landlock stops
    // this write; the control write to /workspace shows writes work at all.
    let r = run_script(
        310_000,
        "echo renamed > /proc/self/comm; echo rc=$?; echo ok > /workspace/f; echo ws=$?",
    );
    exited(&r, 0);
    assert_eq!(r.stdout, "rc=2\nws=0\n"); // dash: 2 = redirection failed
    assert!(r.stderr.contains("Permission denied"), "{}", r.stderr);
}

#[test]
fn timeout_kills_every_process_including_daemonized() {
    if !is_root("timeout_kills_every_process_including_daemonized") {
        return;
    }
    let base = 320_000;
    let mut f = fixture(
        base,
        "setsid sh -c 'sleep 1000' </dev/null >/dev/null 2>&1 & sleep 1000",
    );
    f.spec.timeout_ms = 1500;
    let start = Instant::now();
    let r = run(&f.spec);
    assert_eq!(r.outcome.status, StepStatus::TimedOut);
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(r.outcome.duration_ms >= 1500);
    assert_eq!(host_processes_of(base + STEP_UID), Vec::<u32>::new());
    assert_eq!(host_processes_of(base), Vec::<u32>::new());
}

#[test]
fn step_exit_kills_daemonized_leftovers() {
    if !is_root("step_exit_kills_daemonized_leftovers") {
        return;
    }
    let base = 330_000;
    let f = fixture(
        base,
        "setsid sh -c 'sleep 1000' </dev/null >/dev/null 2>&1 & exit 0",
    );
    let r = run(&f.spec);
    exited(&r, 0);
    assert_eq!(host_processes_of(base + STEP_UID), Vec::<u32>::new());
}

#[test]
fn cancel_kills_the_sandbox() {
    if !is_root("cancel_kills_the_sandbox") {
        return;
    }
    let base = 340_000;
    let f = fixture(base, "echo started; sleep 1000");
    let mut step = sandbox().spawn(&f.spec).unwrap();
    let out = drain(step.take_stdout());
    let _err = drain(step.take_stderr());
    let canceller = step.canceller();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        canceller.cancel();
    });
    let start = Instant::now();
    let outcome = step.wait().unwrap();
    t.join().unwrap();
    assert_eq!(outcome.status, StepStatus::Cancelled);
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(out.join().unwrap(), "started\n");
    assert_eq!(host_processes_of(base + STEP_UID), Vec::<u32>::new());
}

#[test]
fn dropping_the_step_cancels_it() {
    if !is_root("dropping_the_step_cancels_it") {
        return;
    }
    let base = 350_000;
    let f = fixture(base, "sleep 1000");
    let mut step = sandbox().spawn(&f.spec).unwrap();
    let out = drain(step.take_stdout());
    std::thread::sleep(Duration::from_millis(300));
    drop(step);
    // The log pipe reaches EOF once every process of the sandbox is gone.
    out.join().unwrap();
    assert_eq!(host_processes_of(base + STEP_UID), Vec::<u32>::new());
}

#[test]
fn missing_command_is_exec_failed_enoent() {
    if !is_root("missing_command_is_exec_failed_enoent") {
        return;
    }
    let mut f = fixture(360_000, "");
    f.spec.argv = vec!["no-such-command-kiln".into()];
    let r = run(&f.spec);
    match r.outcome.status {
        StepStatus::ExecFailed { errno, .. } => assert_eq!(errno, libc::ENOENT),
        other => panic!("{other:?}"),
    }
    f.spec.argv = vec!["/etc/passwd".into()];
    let r = run(&f.spec);
    match r.outcome.status {
        StepStatus::ExecFailed { errno, .. } => assert_eq!(errno, libc::EACCES),
        other => panic!("{other:?}"),
    }
    // PATH lookup happens in the sandbox's view with the step's PATH.
    f.spec.argv = vec!["true".into()];
    let r = run(&f.spec);
    exited(&r, 0);
}

#[test]
fn setup_failure_names_the_layer() {
    if !is_root("setup_failure_names_the_layer") {
        return;
    }
    let mut f = fixture(370_000, "true");
    f.spec.root.push(RootEntry::Bind {
        source: "/nonexistent/kiln".into(),
        target: "/opt/x".into(),
    });
    let r = run(&f.spec);
    match r.outcome.status {
        StepStatus::SetupFailed { layer, message } => {
            assert_eq!(layer, "mount");
            assert!(message.contains("/nonexistent/kiln"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // A symlink in the root must not redirect a later mount point.
    let mut f = fixture(370_100, "true");
    f.spec.root.push(RootEntry::Bind {
        source: "/usr/share".into(),
        target: "/bin/escape".into(),
    });
    let r = run(&f.spec);
    assert!(
        matches!(&r.outcome.status, StepStatus::SetupFailed { layer, .. } if layer == "mount"),
        "{:?}",
        r.outcome.status
    );
}

#[test]
fn invalid_specs_are_refused_before_start() {
    let f = fixture_no_chown();
    let bad = |edit: &dyn Fn(&mut StepSpec)| {
        let mut s = f.clone();
        edit(&mut s);
        assert!(matches!(
            sandbox().spawn(&s),
            Err(sandbox::SandboxError::InvalidSpec(_))
        ));
    };
    bad(&|s| s.argv.clear());
    bad(&|s| s.host_uid_base = 0);
    bad(&|s| s.step_uid = 0);
    bad(&|s| s.step_uid = s.id_range);
    bad(&|s| s.timeout_ms = 0);
    bad(&|s| {
        s.root.push(RootEntry::Dir {
            path: "/proc/x".into(),
        })
    });
    bad(&|s| {
        s.root.push(RootEntry::Dir {
            path: "/a/../b".into(),
        })
    });
    bad(&|s| {
        s.root.push(RootEntry::Bind {
            source: "/usr".into(),
            target: "/".into(),
        })
    });
}

fn fixture_no_chown() -> StepSpec {
    StepSpec {
        argv: vec!["true".into()],
        env: vec![],
        root: vec![],
        workspace: "/nonexistent".into(),
        working_directory: Vec::new(),
        host_uid_base: 400_000,
        id_range: 65536,
        step_uid: 1000,
        timeout_ms: 1000,
        hostname: "h".into(),
        tmp_size_bytes: 1 << 20,
        limits: sandbox::Limits::default(),
        tcp_connect_ports: vec![],
        egress_proxy_port: None,
        waived_layers: vec![],
    }
}

#[test]
fn probe_and_profile() {
    if !is_root("probe_and_profile") {
        return;
    }
    let host = Sandbox::probe().unwrap();
    assert!(host.landlock_abi >= 1);
    let spec = fixture_no_chown();
    let p = sandbox::profile(&spec, &host);
    assert_eq!(p, sandbox::profile(&spec, &host));
    let text = serde_json::to_string(&p).unwrap();
    for needle in [
        "\"pivot_root\":true",
        "\"no_new_privs\":true",
        "\"syscall\":\"ptrace\"",
        "\"required_status\":\"fully_enforced\"",
        "\"handled_access_net\":[\"BindTcp\",\"ConnectTcp\"]",
        "\"masked\":",
        "\"sysrq-trigger\"",
        "\"sys\":\"absent\"",
        "\"waived_layers\":[]",
        "\"action\":\"user_notif:EPERM\"",
    ] {
        assert!(text.contains(needle), "{needle} missing from {text}");
    }
    assert!(
        !text.contains("/nonexistent"),
        "the workspace host path is not part of the profile"
    );
    // The seccomp program digest of the probe's compilation is in the profile.
    assert_eq!(host.seccomp_policy_sha256.len(), 64);
    assert_eq!(
        p["seccomp"]["program_sha256"],
        host.seccomp_policy_sha256.as_str()
    );
    assert_eq!(
        host.seccomp_policy_sha256,
        sandbox::seccomp::compiled().unwrap().sha256()
    );
}

fn python3(test: &str) {
    assert!(
        Path::new("/usr/bin/python3").exists(),
        "{test} needs /usr/bin/python3 on the host"
    );
}

/// Each denied syscall is answered EPERM by the supervisor and counted per name, across
/// every process of the step (here a forked child too).
#[test]
fn seccomp_denials_are_counted_per_syscall() {
    if !is_root("seccomp_denials_are_counted_per_syscall") {
        return;
    }
    python3("seccomp_denials_are_counted_per_syscall");
    let probe = r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def deny(nr, n, *args):
    for _ in range(n):
        r = libc.syscall(nr, *args)
        print(nr, r, ctypes.get_errno(), flush=True)
deny(250, 5, 0, 0)          # keyctl
deny(165, 2, 0, 0, 0, 0, 0) # mount
deny(272, 3, 0x10000000)    # unshare(CLONE_NEWUSER)
pid = os.fork()
if pid == 0:
    deny(101, 1, 0, 0, 0, 0) # ptrace
    os._exit(0)
os.waitpid(pid, 0)
"#;
    let r = run_script(500_000, &format!("python3 -c '{probe}'"));
    exited(&r, 0);
    // every call failed with EPERM (1)
    assert_eq!(r.stdout.lines().count(), 11, "{}", r.stdout);
    assert!(
        r.stdout.lines().all(|l| l.ends_with(" -1 1")),
        "{}",
        r.stdout
    );
    let want: std::collections::BTreeMap<String, u64> =
        [("keyctl", 5), ("mount", 2), ("unshare", 3), ("ptrace", 1)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
    assert_eq!(r.outcome.seccomp_denials, want);
    // A step with no denial reports none.
    let r = run_script(500_100, "true");
    exited(&r, 0);
    assert!(r.outcome.seccomp_denials.is_empty());
}

/// The 32-bit entry point (int 0x80, AUDIT_ARCH_I386) from a 64-bit process: killed by the
/// architecture check before any table lookup, even for getpid.
#[cfg(target_arch = "x86_64")]
#[test]
fn int80_from_a_64_bit_process_is_killed() {
    if !is_root("int80_from_a_64_bit_process_is_killed") {
        return;
    }
    python3("int80_from_a_64_bit_process_is_killed");
    // mov eax, 20 (i386 getpid); int 0x80; ret
    let probe = r#"
import ctypes, mmap, sys
code = bytes([0xb8, 20, 0, 0, 0, 0xcd, 0x80, 0xc3])
m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
m.write(code)
f = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))
print("calling", flush=True)
print("returned", f(), flush=True)
"#;
    let r = run_script(510_000, &format!("exec python3 -c '{probe}'"));
    assert_eq!(
        r.outcome.status,
        StepStatus::Signaled {
            signal: libc::SIGSYS
        }
    );
    assert_eq!(r.stdout, "calling\n");
}

const NET_PROBE: &str = r#"
import errno, socket, sys, os
port = int(sys.argv[1])
def tcp(what, fam, addr):
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        getattr(s, what)(addr); print(what, fam.name, "ok")
    except OSError as e:
        print(what, fam.name, errno.errorcode[e.errno])
tcp("bind", socket.AF_INET, ("127.0.0.1", 0))
tcp("bind", socket.AF_INET6, ("::1", 0))
tcp("connect", socket.AF_INET, ("127.0.0.1", port))
tcp("connect", socket.AF_INET6, ("::1", port))
a, b = socket.socketpair(); a.send(b"x"); print("unix", b.recv(1).decode())
u = socket.socket(socket.AF_UNIX); u.bind("/tmp/s"); u.listen(); print("unix bind ok")
"#;

/// Landlock's TCP rules: no bind, no connect, loopback included; AF_UNIX works. With the
/// proxy hook (`tcp_connect_ports`) a connect to that port passes Landlock and reaches the
/// network stack (which fails it: nothing listens, and the namespace's loopback is down)
/// while other ports stay denied.
#[test]
fn loopback_tcp_bind_and_connect_are_denied() {
    if !is_root("loopback_tcp_bind_and_connect_are_denied") {
        return;
    }
    python3("loopback_tcp_bind_and_connect_are_denied");
    let host = Sandbox::probe().unwrap();
    assert!(host.landlock_abi >= 4, "Landlock network rules need ABI 4");
    let script = format!("python3 -c '{NET_PROBE}' 8080");
    let r = run_script(520_000, &script);
    exited(&r, 0);
    assert_eq!(
        r.stdout,
        "bind AF_INET EACCES\nbind AF_INET6 EACCES\nconnect AF_INET EACCES\n\
         connect AF_INET6 EACCES\nunix x\nunix bind ok\n"
    );
    let mut f = fixture(520_100, &script);
    f.spec.tcp_connect_ports = vec![8080];
    let r = run(&f.spec);
    exited(&r, 0);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{}", r.stdout);
    assert_eq!(lines[..2], ["bind AF_INET EACCES", "bind AF_INET6 EACCES"]);
    for l in &lines[2..4] {
        assert!(l.starts_with("connect ") && !l.ends_with("EACCES"), "{l}");
    }
    let mut f = fixture(520_200, &format!("python3 -c '{NET_PROBE}' 8081"));
    f.spec.tcp_connect_ports = vec![8080];
    let r = run(&f.spec);
    exited(&r, 0);
    assert!(
        r.stdout.contains("connect AF_INET EACCES\n"),
        "{}",
        r.stdout
    );
}

/// Masked /proc entries read empty, read-only ones are mounted ro, /sys is absent and /dev
/// holds only the minimal set.
#[test]
fn proc_masks_sys_absent_and_minimal_dev() {
    if !is_root("proc_masks_sys_absent_and_minimal_dev") {
        return;
    }
    let masked_files = [
        "kcore",
        "keys",
        "timer_list",
        "sched_debug",
        "kallsyms",
        "latency_stats",
        "config.gz",
    ];
    let masked_dirs = ["acpi", "scsi"];
    let read_only = ["sys", "sysrq-trigger", "irq", "bus", "fs"];
    let script = "for f in kcore keys timer_list sched_debug kallsyms latency_stats config.gz; do \
           if [ -e /proc/$f ]; then echo \"$f $(cat /proc/$f | wc -c)\"; fi; done; \
         for d in acpi scsi; do if [ -e /proc/$d ]; then echo \"$d $(ls -A /proc/$d | wc -l)\"; fi; done; \
         if echo x > /proc/sys/kernel/hostname; then echo WROTE; fi 2>/dev/null; \
         if [ -e /sys ]; then echo SYS; fi; \
         echo dev $(ls -A /dev | sort); \
         echo pts $(ls -A /dev/pts | sort); \
         echo ---; cat /proc/self/mountinfo";
    let r = run_script(530_000, script);
    exited(&r, 0);
    let (head, mountinfo) = r.stdout.split_once("---\n").unwrap();
    let host_has = |name: &str| Path::new("/proc").join(name).exists();
    let mut want = String::new();
    for f in masked_files.iter().filter(|f| host_has(f)) {
        want.push_str(&format!("{f} 0\n"));
    }
    for d in masked_dirs.iter().filter(|d| host_has(d)) {
        want.push_str(&format!("{d} 0\n"));
    }
    want.push_str("dev fd full null ptmx pts random shm stderr stdin stdout tty urandom zero\n");
    want.push_str("pts ptmx\n");
    assert_eq!(head, want);
    // mountinfo: mount point is field 5, per-mount options field 6.
    let mounts: Vec<(&str, &str)> = mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some((*f.get(4)?, *f.get(5)?))
        })
        .collect();
    let opts =
        |p: &str| -> Option<&str> { mounts.iter().rev().find(|(m, _)| *m == p).map(|(_, o)| *o) };
    for name in read_only.iter().filter(|n| host_has(n)) {
        let o =
            opts(&format!("/proc/{name}")).unwrap_or_else(|| panic!("/proc/{name} not mounted"));
        assert!(o.split(',').any(|x| x == "ro"), "/proc/{name}: {o}");
    }
    for name in masked_files
        .iter()
        .chain(&masked_dirs)
        .filter(|n| host_has(n))
    {
        assert!(
            opts(&format!("/proc/{name}")).is_some(),
            "/proc/{name} not masked"
        );
    }
    assert!(!mounts.iter().any(|(m, _)| m.starts_with("/sys")));
}

/// A Landlock waiver only takes effect on a host without Landlock: here the layer still
/// applies.
#[test]
fn landlock_waiver_never_weakens_a_host_that_has_it() {
    if !is_root("landlock_waiver_never_weakens_a_host_that_has_it") {
        return;
    }
    let mut f = fixture(540_000, "echo renamed > /proc/self/comm; echo rc=$?");
    f.spec.waived_layers = vec!["landlock".into()];
    let r = run(&f.spec);
    exited(&r, 0);
    assert_eq!(r.stdout, "rc=2\n");
}

#[test]
fn egress_listener_lives_in_the_steps_namespace_and_is_its_only_tcp() {
    if !is_root("egress_listener_lives_in_the_steps_namespace_and_is_its_only_tcp") {
        return;
    }
    // A port nothing on the host listens on: the listener must not appear there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let other = if port == 65535 { port - 1 } else { port + 1 };
    let mut f = fixture(
        990_000,
        &format!(
            "echo ping | busybox nc 127.0.0.1 {port}; \
             echo x | busybox nc 127.0.0.1 {other} && echo other-port-reached; exit 0"
        ),
    );
    f.spec.egress_proxy_port = Some(port);
    f.spec.tcp_connect_ports = vec![port];
    let mut step = sandbox().spawn(&f.spec).unwrap();
    let out = drain(step.take_stdout());
    let err = drain(step.take_stderr());
    let listener: std::net::TcpListener = step
        .take_egress_listener()
        .unwrap()
        .expect("the supervisor hands over the listener")
        .into();
    assert_eq!(
        listener.local_addr().unwrap(),
        format!("127.0.0.1:{port}").parse().unwrap()
    );
    // From the host's namespace the port is closed: the socket is the step's.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).unwrap();
        conn.write_all(b"pong\n").unwrap();
        buf
    });
    let outcome = step.wait().unwrap();
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    assert_eq!(outcome.status, StepStatus::Exited { code: 0 }, "{stderr}");
    assert_eq!(&server.join().unwrap(), b"ping\n");
    assert!(stdout.contains("pong"), "{stdout}");
    assert!(!stdout.contains("other-port-reached"), "{stdout}");
}

#[test]
fn egress_port_must_be_a_connect_port() {
    let mut f = fixture(991_000, "true");
    f.spec.egress_proxy_port = Some(3128);
    let err = sandbox().spawn(&f.spec).unwrap_err();
    assert!(err.to_string().contains("tcp_connect_ports"), "{err}");
}

#[test]
fn a_standby_supervisor_runs_a_step_given_later_and_exits_when_dropped_unused() {
    if !is_root("a_standby_supervisor_runs_a_step_given_later_and_exits_when_dropped_unused") {
        return;
    }
    let sb = sandbox();
    let waiting = sb.standby().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let f = fixture(992_000, "echo started late");
    let mut step = waiting.start(&f.spec).unwrap();
    let out = drain(step.take_stdout());
    let _err = drain(step.take_stderr());
    assert_eq!(step.wait().unwrap().status, StepStatus::Exited { code: 0 });
    assert_eq!(out.join().unwrap(), "started late\n");

    // Unused: its control socket closes and it exits, reaped by us.
    let unused = sb.standby().unwrap();
    let pid = format!("{:?}", unused)
        .split("supervisor_pid: Some(")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse::<i32>().ok())
        .expect("the standby's pid");
    drop(unused);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "standby supervisor {pid} still running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_working_directory_is_entered_below_the_workspace_never_through_a_symlink() {
    if !is_root("a_working_directory_is_entered_below_the_workspace_never_through_a_symlink") {
        return;
    }
    let mut f = fixture(993_000, "pwd; cat here");
    let ws = f.spec.workspace.clone();
    std::fs::create_dir_all(ws.join("a/b")).unwrap();
    std::fs::write(ws.join("a/b/here"), "inside\n").unwrap();
    f.spec.working_directory = vec!["a".into(), "b".into()];
    let r = run(&f.spec);
    exited(&r, 0);
    assert_eq!(r.stdout, "/workspace/a/b\ninside\n");

    // A symlink on the way, to a directory inside or outside the workspace, is not
    // followed: the sandbox is not set up.
    std::os::unix::fs::symlink("a", ws.join("inside")).unwrap();
    std::os::unix::fs::symlink("/etc", ws.join("outside")).unwrap();
    for link in ["inside", "outside"] {
        f.spec.working_directory = vec![link.into(), "b".into()];
        let r = run(&f.spec);
        assert!(
            matches!(&r.outcome.status, StepStatus::SetupFailed { layer, .. } if layer == "workspace"),
            "{link}: {:?}",
            r.outcome
        );
        assert_eq!(r.stdout, "", "{link}");
    }

    // `..`, `.`, `/` or an empty name is refused before anything starts.
    for bad in ["..", ".", "a/b", ""] {
        f.spec.working_directory = vec!["a".into(), bad.into()];
        assert!(sandbox().spawn(&f.spec).is_err(), "{bad:?} was accepted");
    }
}
