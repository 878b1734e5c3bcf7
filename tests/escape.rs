//! The escape suite: real attacks made from inside a step through `kiln run`.
//!
//! The attacker is tests/attacks/attack.c, compiled once per run (`cc -O2 -static`) and
//! handed to each step as an input. Each subcommand exits 0 and prints `CONTAINED NAME` when
//! every attempt failed as it must, 66 with `ESCAPED NAME: ...` lines when one got through,
//! 67 with `INCONCLUSIVE` when a call failed for a reason that shows nothing. Where the
//! evidence is on the host (a file that must not appear, a process that must not survive, a
//! listener that must not be reached, a terminal that must not receive input) the test
//! checks it from outside. After every attack the daemon must still be healthy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use support::*;

/// The attack program, built once per test run.
fn attack_binary() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kiln-escape");
        std::fs::create_dir_all(&dir).unwrap();
        let bin = dir.join(format!("attack-{}", std::process::id()));
        let out = std::process::Command::new("cc")
            .args(["-O2", "-static", "-w", "-o"])
            .arg(&bin)
            .arg(repo_root().join("tests/attacks/attack.c"))
            .output()
            .expect("running cc (the escape suite needs a C compiler and libc.a)");
        assert!(
            out.status.success(),
            "compiling attack.c: {}",
            describe(&out)
        );
        bin
    })
}

/// A daemon of its own for one test, with an optional config.
struct Lab {
    daemon: Daemon,
    _config: Option<tempfile::NamedTempFile>,
}

impl Lab {
    fn start(test: &str, config: &str) -> Option<Lab> {
        if !require_root(test) {
            return None;
        }
        attack_binary();
        if config.is_empty() {
            return Some(Lab {
                daemon: Daemon::start(),
                _config: None,
            });
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), config).unwrap();
        let daemon = Daemon::start_with(&["--config", file.path().to_str().unwrap()]);
        Some(Lab {
            daemon,
            _config: Some(file),
        })
    }

    fn input(&self) -> String {
        format!("{}:attack", attack_binary().display())
    }

    /// `kiln run [extra] --input attack -- ./attack ARGS`.
    fn attack(&self, extra: &[&str], args: &[&str]) -> Output {
        let input = self.input();
        let mut argv: Vec<&str> = vec!["run", "--input", &input];
        argv.extend_from_slice(extra);
        argv.push("--");
        argv.push("./attack");
        argv.extend_from_slice(args);
        self.daemon.kiln(&argv)
    }

    /// Runs the attack and asserts it was contained, then that the daemon is healthy.
    fn contained(&mut self, args: &[&str]) -> Output {
        let out = self.attack(&[], args);
        self.assert_contained(&out, args);
        self.assert_healthy();
        out
    }

    fn assert_contained(&self, out: &Output, args: &[&str]) {
        let name = if args[0] == "sys" { args[1] } else { args[0] };
        let stdout = text(&out.stdout);
        assert!(
            !stdout.contains("ESCAPED"),
            "ATTACK GOT THROUGH: {args:?}\n{}\n--- daemon log\n{}",
            describe(out),
            self.daemon.log()
        );
        assert!(
            out.status.success() && stdout.contains(&format!("CONTAINED {name}")),
            "attack {args:?} not shown contained\n{}\n--- daemon log\n{}",
            describe(out),
            self.daemon.log()
        );
    }

    /// The daemon is alive, answers, and runs a step.
    fn assert_healthy(&mut self) {
        assert!(
            self.daemon.is_running(),
            "the daemon died:\n{}",
            self.daemon.log()
        );
        let out = self.daemon.kiln(&["run", "--", "/bin/true"]);
        assert!(
            out.status.success(),
            "the daemon no longer runs steps: {}\n{}",
            describe(&out),
            self.daemon.log()
        );
    }

    /// The gRPC health probe of the reference client, when the venv is there.
    fn assert_grpc_serving(&self, test: &str) {
        let Some(python) = python(test) else { return };
        let out = std::process::Command::new(python)
            .arg(repo_root().join("tests/py/grpc_probe.py"))
            .arg(&self.daemon.socket)
            .output()
            .unwrap();
        assert!(out.status.success(), "health probe: {}", describe(&out));
        let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(seen["health"][""], "SERVING", "{seen}");
    }

    fn only_link(&self, dir: &str) -> serde_json::Value {
        let entry = std::fs::read_dir(self.daemon.path(dir))
            .unwrap()
            .flatten()
            .next()
            .expect("a link was written");
        serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap()
    }
}

fn unique(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
            % 1_000_000_000
    )
}

fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        if Instant::now() > deadline {
            eprintln!("timed out waiting for {what}");
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

// ------------------------------------------------------------------ the deny list, one
// test per family: each call is made with arguments the kernel would accept (outside the
// sandbox, as an unprivileged user, most of them succeed), so only the sandbox stops it.

macro_rules! deny_list {
    ($($test:ident => $family:expr;)+) => {$(
        #[test]
        fn $test() {
            let Some(mut lab) = Lab::start(stringify!($test), "") else { return };
            lab.contained(&["sys", $family]);
        }
    )+};
}

deny_list! {
    syscall_mount_and_new_mount_api => "mount";
    syscall_umount2 => "umount2";
    syscall_pivot_root => "pivot_root";
    syscall_chroot => "chroot";
    syscall_ptrace => "ptrace";
    syscall_bpf => "bpf";
    syscall_perf_event_open => "perf_event_open";
    syscall_keyctl => "keyctl";
    syscall_add_key => "add_key";
    syscall_request_key => "request_key";
    syscall_kexec_load_and_kexec_file_load => "kexec_load";
    syscall_init_finit_delete_module => "modules";
    syscall_userfaultfd => "userfaultfd";
    syscall_io_uring => "io_uring_setup";
    syscall_open_by_handle_at => "open_by_handle_at";
    syscall_name_to_handle_at => "name_to_handle_at";
    syscall_setns => "setns";
    syscall_unshare => "unshare";
    syscall_clone_newuser => "clone-newuser";
    syscall_clone_newns => "clone-newns";
    syscall_clone_newnet => "clone-newnet";
    syscall_clone_other_namespaces => "clone-other-ns";
    syscall_clone3 => "clone3";
    syscall_personality_read_implies_exec => "personality";
    syscall_acct => "acct";
    syscall_swapon_swapoff => "swapon";
    syscall_reboot => "reboot";
    syscall_settimeofday_clock_settime_adjtimex => "clock";
    syscall_iopl_ioperm => "io-ports";
    foreign_abi_x32 => "x32";
    foreign_abi_int80_ia32 => "ia32";
}

// ------------------------------------------------------------------ sockets

macro_rules! simple_attacks {
    ($($test:ident => [$($arg:expr),+];)+) => {$(
        #[test]
        fn $test() {
            let Some(mut lab) = Lab::start(stringify!($test), "") else { return };
            lab.contained(&[$($arg),+]);
        }
    )+};
}

simple_attacks! {
    socket_af_packet => ["sock-packet"];
    socket_raw_inet => ["sock-raw"];
    socket_af_netlink => ["sock-netlink"];
    socket_other_families => ["sock-other"];
    ptrace_of_the_init => ["ptrace-init"];
    ptrace_of_a_sibling => ["ptrace-sibling"];
    no_privilege_back => ["privs"];
    device_nodes => ["devices"];
    sys_absent_or_read_only => ["sys-fs"];
    no_inherited_fds => ["fd-leak"];
    links_out_of_the_workspace => ["links"];
    tiocsti_on_the_step_fds => ["tiocsti"];
}

// ------------------------------------------------------------------ host files

#[test]
fn read_etc_shadow() {
    let Some(mut lab) = Lab::start("read_etc_shadow", "") else {
        return;
    };
    // The host's /etc/shadow starts with root's entry.
    lab.contained(&["read-host", "root:", "/etc/shadow", "/etc/gshadow"]);
}

#[test]
fn read_a_host_file_and_directory_by_every_spelling() {
    let Some(mut lab) = Lab::start("read_a_host_file_and_directory_by_every_spelling", "") else {
        return;
    };
    let secret = unique("host-secret");
    let dir = lab.daemon.path("hostdir");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("secret.txt");
    std::fs::write(&file, &secret).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let daemon_dir = lab.daemon.dir.path().to_str().unwrap().to_string();
    lab.contained(&[
        "read-host",
        &secret,
        file.to_str().unwrap(),
        dir.to_str().unwrap(),
        &daemon_dir,
        "/root",
    ]);
}

#[test]
fn read_the_daemon_state_dir() {
    let Some(mut lab) = Lab::start("read_the_daemon_state_dir", "") else {
        return;
    };
    let state = lab.daemon.state.clone();
    lab.contained(&[
        "read-host",
        "SQLite format 3",
        state.join("kiln.db").to_str().unwrap(),
        state.to_str().unwrap(),
        state.join("cas").to_str().unwrap(),
        state.join("work").to_str().unwrap(),
    ]);
}

#[test]
fn read_the_signing_key() {
    let Some(mut lab) = Lab::start("read_the_signing_key", "") else {
        return;
    };
    // The ring's current private key, keys/<keyid>.pem.
    let ring: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lab.daemon.state.join("keys/keyring.json")).unwrap())
            .unwrap();
    let key = lab
        .daemon
        .state
        .join(format!("keys/{}.pem", ring["current"].as_str().unwrap()));
    let pem = std::fs::read_to_string(&key).unwrap();
    let body = pem.lines().nth(1).unwrap().to_string();
    lab.contained(&[
        "read-host",
        &body,
        key.to_str().unwrap(),
        key.parent().unwrap().to_str().unwrap(),
    ]);
}

#[test]
fn connect_to_the_daemon_socket() {
    let Some(mut lab) = Lab::start("connect_to_the_daemon_socket", "") else {
        return;
    };
    let socket = lab.daemon.socket.clone();
    lab.contained(&[
        "connect-unix",
        socket.to_str().unwrap(),
        "/run/kiln/kiln.sock",
    ]);
}

// ------------------------------------------------------------------ writing

#[test]
fn write_the_image_or_outside_the_workspace() {
    let Some(mut lab) = Lab::start("write_the_image_or_outside_the_workspace", "") else {
        return;
    };
    let tag = unique("kiln-escape");
    lab.contained(&["write-image", &tag]);
    for dir in ["/", "/usr", "/usr/bin", "/usr/lib", "/etc", "/tmp"] {
        let path = Path::new(dir).join(&tag);
        assert!(
            !path.exists(),
            "ATTACK GOT THROUGH: {} exists on the host",
            path.display()
        );
    }
}

#[test]
fn proc_sys_and_kernel_knobs() {
    let Some(mut lab) = Lab::start("proc_sys_and_kernel_knobs", "") else {
        return;
    };
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let before = (
        read("/proc/sys/kernel/core_pattern"),
        read("/proc/sys/kernel/modprobe"),
        read("/proc/sys/kernel/hostname"),
    );
    lab.contained(&["proc-sys"]);
    let after = (
        read("/proc/sys/kernel/core_pattern"),
        read("/proc/sys/kernel/modprobe"),
        read("/proc/sys/kernel/hostname"),
    );
    assert_eq!(
        before, after,
        "ATTACK GOT THROUGH: host kernel knobs changed"
    );
}

#[test]
fn init_exe_is_not_reachable_and_unchanged() {
    let Some(mut lab) = Lab::start("init_exe_is_not_reachable_and_unchanged", "") else {
        return;
    };
    let before = std::fs::read(KILN).unwrap();
    lab.contained(&["ptrace-init"]);
    assert!(
        std::fs::read(KILN).unwrap() == before,
        "ATTACK GOT THROUGH: the kiln binary changed"
    );
}

// ------------------------------------------------------------------ outputs

/// Runs a step that prepares `script`, declaring `outputs`; the collector must refuse or
/// skip every link and never write through or copy what a link points at.
fn output_attack(lab: &mut Lab, script: &str, outputs: &[&str], forbidden: &[&str]) -> Output {
    let out_dir = lab.daemon.path("out");
    let _ = std::fs::remove_dir_all(&out_dir);
    let mut argv: Vec<&str> = vec!["run", "--out", "out", "--attest-dir", "links"];
    for o in outputs {
        argv.push("--output");
        argv.push(o);
    }
    argv.extend_from_slice(&["--", "/bin/sh", "-c", script]);
    let started = Instant::now();
    let out = lab.daemon.kiln(&argv);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "collecting outputs took {:?}",
        started.elapsed()
    );
    // Nothing under --out may be a symlink or hold forbidden content.
    if out_dir.exists() {
        for entry in walk(&out_dir) {
            let meta = std::fs::symlink_metadata(&entry).unwrap();
            assert!(
                !meta.file_type().is_symlink(),
                "ATTACK GOT THROUGH: output {} is a symlink",
                entry.display()
            );
            if meta.is_file() {
                let content = String::from_utf8_lossy(&std::fs::read(&entry).unwrap()).into_owned();
                for f in forbidden {
                    assert!(
                        !content.contains(f),
                        "ATTACK GOT THROUGH: output {} holds {f:?} from outside the workspace",
                        entry.display()
                    );
                }
            }
        }
    }
    lab.assert_healthy();
    out
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found
}

fn host_secret_file(lab: &Lab) -> (String, PathBuf) {
    let secret = unique("host-only");
    let dir = lab.daemon.path("hostonly");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("secret.txt");
    std::fs::write(&file, &secret).unwrap();
    (secret, file)
}

#[test]
fn output_symlink_to_etc_passwd_is_refused() {
    let Some(mut lab) = Lab::start("output_symlink_to_etc_passwd_is_refused", "") else {
        return;
    };
    let out = output_attack(
        &mut lab,
        "ln -s /etc/passwd passwd",
        &["passwd"],
        &["root:x:0:0"],
    );
    assert!(
        !out.status.success(),
        "a symlink output was accepted: {}",
        describe(&out)
    );
    assert!(
        !lab.daemon.path("out/passwd").exists(),
        "{}",
        describe(&out)
    );
}

#[test]
fn output_symlink_to_a_host_path_is_refused() {
    let Some(mut lab) = Lab::start("output_symlink_to_a_host_path_is_refused", "") else {
        return;
    };
    let (secret, file) = host_secret_file(&lab);
    let script = format!("ln -s {} leak", file.display());
    let out = output_attack(&mut lab, &script, &["leak"], &[&secret]);
    assert!(
        !out.status.success(),
        "a symlink output was accepted: {}",
        describe(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        secret,
        "host file changed"
    );
}

#[test]
fn output_through_a_symlinked_directory_is_refused() {
    let Some(mut lab) = Lab::start("output_through_a_symlinked_directory_is_refused", "") else {
        return;
    };
    let (secret, file) = host_secret_file(&lab);
    let script = format!(
        "ln -s / root && ln -s {} hostdir",
        file.parent().unwrap().display()
    );
    for output in ["root/etc/passwd", "hostdir/secret.txt", "hostdir"] {
        let out = output_attack(&mut lab, &script, &[output], &[&secret, "root:x:0:0"]);
        assert!(
            !out.status.success(),
            "output {output} through a symlinked directory was accepted: {}",
            describe(&out)
        );
    }
}

#[test]
fn output_directory_with_links_inside_never_follows_them() {
    let Some(mut lab) = Lab::start("output_directory_with_links_inside_never_follows_them", "")
    else {
        return;
    };
    let (secret, file) = host_secret_file(&lab);
    let script = format!(
        "mkdir -p d/sub && echo fine > d/ok && ln -s /etc/passwd d/p && ln -s {} d/m && ln -s / d/sub/root && ln -s {} d/hostdir",
        file.display(),
        file.parent().unwrap().display()
    );
    output_attack(&mut lab, &script, &["d"], &[&secret, "root:x:0:0"]);
}

#[test]
fn output_paths_cannot_climb_out_of_the_out_dir() {
    let Some(mut lab) = Lab::start("output_paths_cannot_climb_out_of_the_out_dir", "") else {
        return;
    };
    let victim = lab.daemon.path("victim");
    for output in [
        "../victim",
        "../../victim",
        "x/../../victim",
        "/etc/passwd",
        "/tmp/victim",
    ] {
        let out = output_attack(&mut lab, "mkdir -p x; echo pwned > victim", &[output], &[]);
        assert!(
            !out.status.success(),
            "output {output:?} was accepted: {}",
            describe(&out)
        );
        assert!(
            !victim.exists(),
            "ATTACK GOT THROUGH: {output:?} wrote {}",
            victim.display()
        );
    }
    assert!(!std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .contains("pwned"));
}

#[test]
fn special_files_as_outputs_do_not_hang_the_daemon() {
    let Some(mut lab) = Lab::start("special_files_as_outputs_do_not_hang_the_daemon", "") else {
        return;
    };
    // A FIFO would block a collector that opens it; a socket cannot be read.
    for (script, output) in [
        ("mkfifo f", "f"),
        ("mkdir d && mkfifo d/f && echo x > d/ok", "d"),
    ] {
        let out = output_attack(&mut lab, script, &[output], &[]);
        assert!(!out.status.success(), "{output}: {}", describe(&out));
    }
}

#[test]
fn products_never_follow_symlinked_directories() {
    let Some(mut lab) = Lab::start("products_never_follow_symlinked_directories", "") else {
        return;
    };
    let out = lab.daemon.kiln(&[
        "run",
        "--attest-dir",
        "links",
        "--",
        "/bin/sh",
        "-c",
        "ln -s / root && ln -s /proc/1/root init && ln -s /etc etc",
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let link = lab.only_link("links");
    let products = link["signed"]["products"].as_object().unwrap();
    for name in products.keys() {
        assert!(
            !name.contains('/'),
            "ATTACK GOT THROUGH: the products walked into a link: {name}"
        );
    }
    lab.assert_healthy();
}

// ------------------------------------------------------------------ network and ipc

#[test]
fn host_loopback_tcp_service_is_unreachable() {
    let Some(mut lab) = Lab::start("host_loopback_tcp_service_is_unreachable", "") else {
        return;
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    // Also the host's other addresses, where it has any.
    let mut args = vec!["tcp-connect".to_string(), port];
    if let Ok(out) = std::process::Command::new("hostname").arg("-I").output() {
        args.extend(
            text(&out.stdout)
                .split_whitespace()
                .filter(|a| a.contains('.'))
                .map(String::from),
        );
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.contained(&args);
    match listener.accept() {
        Ok((_, peer)) => panic!("ATTACK GOT THROUGH: the host listener accepted {peer}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}"),
    }
}

#[test]
fn with_an_allow_list_nothing_but_the_proxy_is_reachable() {
    let Some(mut lab) = Lab::start("with_an_allow_list_nothing_but_the_proxy_is_reachable", "")
    else {
        return;
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    // The list names the host's listener by name only: the name resolves to loopback,
    // which the proxy refuses, and around the proxy nothing else answers.
    let allow = format!("localhost:{port}");
    let args = ["egress-bypass", port.as_str(), "3128"];
    let out = lab.attack(&["--allow-net", &allow], &args);
    lab.assert_contained(&out, &args);
    lab.assert_healthy();
    match listener.accept() {
        Ok((_, peer)) => panic!("ATTACK GOT THROUGH: the host listener accepted {peer}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}"),
    }
}

#[test]
fn host_abstract_unix_socket_is_unreachable() {
    use std::os::linux::net::SocketAddrExt;
    let Some(mut lab) = Lab::start("host_abstract_unix_socket_is_unreachable", "") else {
        return;
    };
    let name = unique("kiln-escape-abstract");
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    listener.set_nonblocking(true).unwrap();
    lab.contained(&["abstract-unix", &name]);
    match listener.accept() {
        Ok(_) => panic!("ATTACK GOT THROUGH: the host abstract socket @{name} accepted a peer"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}"),
    }
}

#[test]
fn host_sysv_shared_memory_is_invisible() {
    let Some(mut lab) = Lab::start("host_sysv_shared_memory_is_invisible", "") else {
        return;
    };
    let key: libc::key_t =
        0x4b49_0000 | libc::key_t::try_from(std::process::id() & 0xffff).unwrap();
    // SAFETY: plain SysV calls on a segment this test owns.
    let id = unsafe { libc::shmget(key, 4096, libc::IPC_CREAT | 0o666) };
    assert!(id >= 0, "shmget: {}", std::io::Error::last_os_error());
    let out = lab.attack(&[], &["sysv-ipc", &key.to_string()]);
    // SAFETY: removes the segment created above.
    unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
    lab.assert_contained(&out, &["sysv-ipc"]);
    lab.assert_healthy();
}

// ------------------------------------------------------------------ privileges

#[test]
fn setuid_files_gain_nothing() {
    let Some(mut lab) = Lab::start("setuid_files_gain_nothing", "") else {
        return;
    };
    // A setuid-root program uploaded as an input.
    let smuggled = lab.daemon.path("suidroot");
    std::fs::copy(attack_binary(), &smuggled).unwrap();
    std::fs::set_permissions(&smuggled, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let input = format!("{}:suidroot", smuggled.display());
    let out = lab.attack(&["--input", &input], &["setuid", "/workspace/suidroot"]);
    lab.assert_contained(&out, &["setuid"]);
    lab.assert_healthy();
}

// ------------------------------------------------------------------ signals, terminals

#[test]
fn kill_of_everything_and_of_the_init_hurts_only_the_step() {
    let Some(mut lab) = Lab::start(
        "kill_of_everything_and_of_the_init_hurts_only_the_step",
        "max_concurrent_jobs = 2\n",
    ) else {
        return;
    };
    // A neighbour job that must survive.
    let neighbour = std::process::Command::new(KILN)
        .env("KILN_SOCKET", &lab.daemon.socket)
        .args(["run", "--", "/bin/sh", "-c", "sleep 3; echo survived"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let daemon_pid = lab.daemon.pid().unwrap().to_string();
    let me = std::process::id().to_string();
    let out = lab.contained(&["kill", &daemon_pid, &me]);
    assert!(out.status.success());
    let neighbour = neighbour.wait_with_output().unwrap();
    assert!(
        neighbour.status.success() && text(&neighbour.stdout) == "survived\n",
        "ATTACK GOT THROUGH: the neighbour job was hurt: {}",
        describe(&neighbour)
    );
}

#[test]
fn tiocsti_into_the_daemon_terminal() {
    if !require_root("tiocsti_into_the_daemon_terminal") {
        return;
    }
    attack_binary();
    // The daemon runs in a terminal, as `kiln serve` or `kiln demo` started by an operator.
    let (daemon, master) = Daemon::start_in_terminal(&[]);
    let mut lab = Lab {
        daemon,
        _config: None,
    };
    let out = lab.attack(&[], &["tiocsti"]);
    // Whatever the step pushed into the terminal's input queue is echoed to the master.
    let mut echoed = Vec::new();
    let mut master = std::fs::File::from(master);
    nix::fcntl::fcntl(
        &master,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    while let Ok(n) = master.read(&mut buf) {
        if n == 0 {
            break;
        }
        echoed.extend_from_slice(&buf[..n]);
    }
    assert!(
        !text(&echoed).contains("KILN-TIOCSTI-INJECTED"),
        "ATTACK GOT THROUGH: the step typed into the daemon's terminal: {:?}\n{}",
        text(&echoed),
        describe(&out)
    );
    lab.assert_contained(&out, &["tiocsti"]);
    lab.assert_healthy();
}

// ------------------------------------------------------------------ outliving the step

#[test]
fn a_daemonized_process_does_not_outlive_its_step() {
    let uid_base = 340_000_000u32;
    let Some(mut lab) = Lab::start(
        "a_daemonized_process_does_not_outlive_its_step",
        &format!("uid_base = {uid_base}\nmax_concurrent_jobs = 1\n"),
    ) else {
        return;
    };
    lab.contained(&["daemonize"]);
    let gone = wait_for("the step's processes to die", 5, || {
        host_processes_in_uid_range(uid_base, 65536).is_empty()
    });
    assert!(
        gone,
        "ATTACK GOT THROUGH: processes of the step outlived it: {:?}",
        host_processes_in_uid_range(uid_base, 65536)
    );
}

#[test]
fn sleeping_past_the_timeout_is_killed_with_every_process() {
    let uid_base = 341_000_000u32;
    let Some(mut lab) = Lab::start(
        "sleeping_past_the_timeout_is_killed_with_every_process",
        &format!("uid_base = {uid_base}\nmax_concurrent_jobs = 1\n"),
    ) else {
        return;
    };
    let started = Instant::now();
    let out = lab.attack(
        &["--timeout", "2", "--attest-dir", "links"],
        &["sleep-forever"],
    );
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(137), "{}", describe(&out));
    assert!(took < Duration::from_secs(15), "the timeout took {took:?}");
    let gone = wait_for("the step's processes to die", 5, || {
        host_processes_in_uid_range(uid_base, 65536).is_empty()
    });
    assert!(
        gone,
        "ATTACK GOT THROUGH: processes survived the timeout: {:?}",
        host_processes_in_uid_range(uid_base, 65536)
    );
    let link = lab.only_link("links");
    assert_eq!(
        link["signed"]["byproducts"]["kiln"]["timed_out"], true,
        "{link}"
    );
    lab.assert_healthy();
}

// ------------------------------------------------------------------ another job

#[test]
fn a_job_cannot_find_a_concurrent_jobs_secrets() {
    let Some(mut lab) = Lab::start(
        "a_job_cannot_find_a_concurrent_jobs_secrets",
        "max_concurrent_jobs = 2\n",
    ) else {
        return;
    };
    let secret = unique("neighbour-secret");
    let job = format!(
        "[[inputs]]\npath = \"attack\"\nfrom = \"{}\"\n\n[[steps]]\nname = \"plant\"\nrun = [\"./attack\", \"plant\", \"{secret}\", \"20\"]\n",
        attack_binary().display()
    );
    std::fs::write(lab.daemon.path("plant.toml"), job).unwrap();
    let out = lab.daemon.kiln(&["submit", "--detach", "plant.toml"]);
    assert!(out.status.success(), "{}", describe(&out));
    let id = text(&out.stdout).trim().to_string();
    // Workspaces are named at random; the planting job's is the one holding the secret.
    let work = lab.daemon.state.join("work");
    let planted_in = || {
        std::fs::read_dir(&work)
            .ok()?
            .flatten()
            .map(|e| e.path().join("ws"))
            .find(|ws| {
                std::fs::read_dir(ws)
                    .map(|d| d.flatten().any(|e| e.file_name() == "secret"))
                    .unwrap_or(false)
            })
    };
    let planted = wait_for("the secret to be planted", 30, || planted_in().is_some());
    assert!(
        planted,
        "the planting job did not start:\n{}",
        lab.daemon.log()
    );
    let workspace = planted_in().unwrap();
    // The hunter knows the neighbour's workspace by its host path, too.
    let secret_file = workspace.join("secret");
    lab.contained(&[
        "hunt",
        &secret,
        workspace.to_str().unwrap(),
        secret_file.to_str().unwrap(),
    ]);
    let _ = lab.daemon.kiln(&["cancel", &id]);
}

// ------------------------------------------------------------------ exhaustion (these need
// the resource limits: `kiln run --pids/--memory/--disk`)

#[test]
fn fork_bomb_is_stopped_by_the_pids_limit() {
    let uid_base = 342_000_000u32;
    let Some(mut lab) = Lab::start(
        "fork_bomb_is_stopped_by_the_pids_limit",
        &format!("uid_base = {uid_base}\nmax_concurrent_jobs = 1\n"),
    ) else {
        return;
    };
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sampler = {
        let (sampling, peak) = (sampling.clone(), peak.clone());
        std::thread::spawn(move || {
            while sampling.load(std::sync::atomic::Ordering::SeqCst) {
                let n = host_processes_in_uid_range(uid_base, 65536).len();
                peak.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let out = lab.attack(
        &["--pids", "64", "--timeout", "30", "--attest-dir", "links"],
        &["fork-bomb"],
    );
    sampling.store(false, std::sync::atomic::Ordering::SeqCst);
    sampler.join().unwrap();
    assert!(
        !text(&out.stdout).contains("ESCAPED"),
        "ATTACK GOT THROUGH: {}",
        describe(&out)
    );
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        peak <= 66,
        "ATTACK GOT THROUGH: {peak} host processes of the step"
    );
    let link = lab.only_link("links");
    let kiln = &link["signed"]["byproducts"]["kiln"];
    assert_eq!(kiln["pids_limit_hit"], true, "{}\n{kiln}", describe(&out));
    assert!(wait_for("the bomb to be gone", 10, || {
        host_processes_in_uid_range(uid_base, 65536).is_empty()
    }));
    lab.assert_healthy();
    lab.assert_grpc_serving("fork_bomb");
}

#[test]
fn memory_bomb_is_stopped_by_the_memory_limit() {
    let Some(mut lab) = Lab::start("memory_bomb_is_stopped_by_the_memory_limit", "") else {
        return;
    };
    let out = lab.attack(
        &[
            "--memory",
            "128M",
            "--timeout",
            "60",
            "--attest-dir",
            "links",
        ],
        &["memory-bomb"],
    );
    assert!(
        !text(&out.stdout).contains("ESCAPED"),
        "ATTACK GOT THROUGH: {}",
        describe(&out)
    );
    assert!(!out.status.success(), "{}", describe(&out));
    let link = lab.only_link("links");
    let kiln = &link["signed"]["byproducts"]["kiln"];
    assert_eq!(kiln["oom_killed"], true, "{}\n{kiln}", describe(&out));
    assert_eq!(kiln["limit_reason"], "oom", "{kiln}");
    lab.assert_healthy();
    lab.assert_grpc_serving("memory_bomb");
}

#[test]
fn disk_fill_is_stopped_by_the_workspace_quota() {
    let Some(mut lab) = Lab::start(
        "disk_fill_is_stopped_by_the_workspace_quota",
        "tmp_size_mib = 16\n",
    ) else {
        return;
    };
    let out = lab.attack(
        &["--disk", "16M", "--timeout", "60", "--attest-dir", "links"],
        &["disk-fill", "/workspace"],
    );
    lab.assert_contained(&out, &["disk-fill"]);
    let link = lab.only_link("links");
    let kiln = &link["signed"]["byproducts"]["kiln"];
    assert_eq!(kiln["disk_quota_hit"], true, "{}\n{kiln}", describe(&out));
    // /tmp and /dev/shm are size-limited too.
    for dir in ["/tmp", "/dev/shm"] {
        let out = lab.attack(&["--timeout", "60"], &["disk-fill", dir]);
        lab.assert_contained(&out, &["disk-fill"]);
        let filled: u64 = text(&out.stdout)
            .lines()
            .find_map(|l| l.trim().strip_prefix("filled "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert!(
            filled <= 16,
            "ATTACK GOT THROUGH: {filled} MiB written to {dir}"
        );
    }
    lab.assert_healthy();
    lab.assert_grpc_serving("disk_fill");
}

#[test]
fn a_huge_sparse_file_does_not_stall_the_daemon() {
    let Some(mut lab) = Lab::start("a_huge_sparse_file_does_not_stall_the_daemon", "") else {
        return;
    };
    // Holes cost no disk (and no quota); hashing a huge sparse file byte by byte would hold
    // a job slot and a daemon thread for many minutes, past any step timeout. Defaults only:
    // the attacker chooses its own flags.
    let mut child = std::process::Command::new(KILN)
        .env("KILN_SOCKET", &lab.daemon.socket)
        .args([
            "run",
            "--timeout",
            "30",
            "--input",
            &lab.input(),
            "--",
            "./attack",
            "sparse",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The step's timeout (30 s) must bound the job; 30 s more for the bookkeeping.
    let finished = wait_for("the sparse-file job", 60, || {
        child.try_wait().unwrap().is_some()
    });
    if !finished {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        finished,
        "ATTACK GOT THROUGH: a step with a huge sparse file kept its job running (the daemon hashing) for more than 60 s, past its 30 s timeout\n{}",
        describe(&out)
    );
    lab.assert_healthy();
}

#[test]
fn log_flood_is_capped_and_the_daemon_stays_healthy() {
    let max_log = 1024 * 1024;
    let Some(mut lab) = Lab::start(
        "log_flood_is_capped_and_the_daemon_stays_healthy",
        &format!("max_log_bytes = {max_log}\nlink_log_bytes = 65536\n"),
    ) else {
        return;
    };
    let flood: u64 = 64 * 1024 * 1024;
    let out = lab.attack(
        &["--timeout", "120", "--attest-dir", "links"],
        &["log-flood", &flood.to_string()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        (out.stdout.len() as u64) <= max_log + 128 * 1024,
        "ATTACK GOT THROUGH: {} bytes streamed to the client, cap {max_log}",
        out.stdout.len()
    );
    let link = lab.only_link("links");
    let kiln = &link["signed"]["byproducts"]["kiln"];
    assert_eq!(kiln["stdout_truncated"], true, "{kiln}");
    // The whole stream was drained and counted (the attack's own lines come on top).
    assert!(kiln["stdout_bytes"].as_u64().unwrap() >= flood, "{kiln}");
    assert!(
        link["signed"]["byproducts"]["stdout"]
            .as_str()
            .unwrap()
            .len()
            <= 65536,
        "the link holds more than link_log_bytes"
    );
    lab.assert_healthy();
    lab.assert_grpc_serving("log_flood");
}
