//! The supervisor: the re-executed, single-threaded Kiln process that stays in the host
//! namespaces (out of the step's reach), prepares the sandbox, clones its pid 1, enforces the
//! timeout and cancellation, and reports the outcome on its control socket (stdin).

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::stat::{fstat, SFlag};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::cgroup::StepCgroup;
use crate::child::{self, DEV_NODES};
use crate::failure::{fail, Failure, OrLayer};
use crate::notify::Denials;
use crate::plan::{Plan, Prepared};
use crate::protocol::{self, ControlMessage, Report};
use crate::seccomp::CompiledPolicy;
use crate::sys::{self, Cloned};
use crate::{RootEntry, StepOutcome, StepSpec, StepStatus};

/// The largest spec accepted on the control socket.
const MAX_SPEC_BYTES: usize = 64 << 20;

pub(crate) fn run() -> i32 {
    // A panic message would land in the step's stderr log; the outcome report says enough.
    std::panic::set_hook(Box::new(|_| {}));
    // stdin is the control socket: the spec and cancel come in, the outcome goes out.
    let Some(control) = sys::take_inherited_fd(0) else {
        return 2;
    };
    let outcome = supervise(&control);
    let mut report = match serde_json::to_vec(&outcome) {
        Ok(r) => r,
        Err(_) => return 3,
    };
    report.push(b'\n');
    // Unread bytes (a cancel) would make closing the socket reset the connection, and the
    // daemon would read an error instead of the outcome: drain them first.
    drain_nonblocking(&control);
    // The step's output pipes end here, not at this process's exit: the daemon has the
    // whole log once it has the outcome, and does not wait for the exit.
    release_output_pipes();
    let mut socket = std::fs::File::from(control);
    if socket.write_all(&report).is_err() {
        return 4;
    }
    0
}

/// Points stdout and stderr (the step's log pipes) at /dev/null, closing our ends.
fn release_output_pipes() {
    if let Ok(null) = nix::fcntl::open(
        "/dev/null",
        OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) {
        let _ = nix::unistd::dup2_stdout(&null);
        let _ = nix::unistd::dup2_stderr(&null);
    }
}

fn setup_failed(f: Failure, duration_ms: u64) -> StepOutcome {
    StepOutcome {
        status: StepStatus::SetupFailed {
            layer: f.layer.to_string(),
            message: f.message,
        },
        duration_ms,
        usage: Default::default(),
        seccomp_denials: Default::default(),
        exec_monotonic_ns: None,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Reads the control message line; `true` when more bytes followed it (a cancel already
/// arrived).
fn drain_nonblocking(fd: &OwnedFd) {
    if nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).is_err() {
        return;
    }
    let mut chunk = [0u8; 256];
    while let Ok(1..) = nix::unistd::read(fd.as_fd(), &mut chunk) {}
    let _ = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()));
}

fn read_spec(control: &OwnedFd) -> Result<(ControlMessage, bool), Failure> {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 16384];
    loop {
        let n = match nix::unistd::read(control.as_fd(), &mut chunk) {
            Err(Errno::EINTR) => continue,
            r => r.layer("spec", "reading the control socket")?,
        };
        if n == 0 {
            return Err(fail(
                "spec",
                "control socket closed before the spec was complete",
            ));
        }
        let start = buf.len();
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf[start..].iter().position(|b| *b == b'\n') {
            let end = start + pos;
            let extra = buf.len() > end + 1;
            let msg =
                serde_json::from_slice(&buf[..end]).layer("spec", "decoding the step spec")?;
            return Ok((msg, extra));
        }
        if buf.len() > MAX_SPEC_BYTES {
            return Err(fail("spec", "step spec too large"));
        }
    }
}

fn cstring(layer: &'static str, s: impl Into<Vec<u8>>) -> Result<CString, Failure> {
    CString::new(s).layer(layer, "string with a NUL byte")
}

fn detached_tree(
    layer: &'static str,
    source: &std::path::Path,
    recursive: bool,
    set: u64,
) -> Result<(OwnedFd, nix::sys::stat::FileStat), Failure> {
    let path = cstring(layer, source.as_os_str().as_bytes())?;
    let flags = sys::OPEN_TREE_CLONE | if recursive { sys::AT_RECURSIVE } else { 0 };
    let what = format!("open_tree {}", source.display());
    let tree = sys::open_tree(None, &path, flags).layer(layer, &what)?;
    // Flags are only ever added, so the source mount's own restrictions (e.g. noexec) stay.
    sys::mount_setattr(tree.as_fd(), set, 0, recursive)
        .layer(layer, &format!("mount_setattr {}", source.display()))?;
    let st = fstat(tree.as_fd()).layer(layer, &format!("stat {}", source.display()))?;
    Ok((tree, st))
}

fn prepare(spec: StepSpec, seccomp_bpf: &[u64]) -> Result<Plan, Failure> {
    // Compiled once by the daemon; here only decoded.
    let seccomp = CompiledPolicy::decode(seccomp_bpf)
        .layer("seccomp", "the program from the daemon")?
        .instructions()
        .to_vec();
    // 0 only when the host lacks Landlock and the operator waived it: then the step runs
    // without that one layer (recorded in its link), never silently.
    let landlock_abi = sys::landlock_abi_version().max(0);
    if landlock_abi < 1 && !spec.waived_layers.iter().any(|l| l == "landlock") {
        return Err(fail(
            "landlock",
            "the kernel does not support Landlock or it is disabled",
        ));
    }
    let cap_last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .layer("capabilities", "reading cap_last_cap")?
        .trim()
        .parse::<u32>()
        .layer("capabilities", "parsing cap_last_cap")?;

    let ro = sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;
    let mut entries = Vec::with_capacity(spec.root.len());
    for e in &spec.root {
        entries.push(match e {
            RootEntry::Bind { source, target } => {
                let (tree, st) = detached_tree("mount", source, true, ro)?;
                let is_dir =
                    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
                Prepared::Bind {
                    target: target.clone(),
                    tree,
                    is_dir,
                }
            }
            RootEntry::Symlink { path, points_to } => Prepared::Symlink {
                path: path.clone(),
                points_to: points_to.clone(),
            },
            RootEntry::Dir { path } => Prepared::Dir { path: path.clone() },
        });
    }

    let (workspace, st) = detached_tree(
        "workspace",
        &spec.workspace,
        false,
        sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV,
    )?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
        return Err(fail(
            "workspace",
            format!("{} is not a directory", spec.workspace.display()),
        ));
    }
    let workspace_id = (st.st_dev, st.st_ino);

    let mut dev_nodes = Vec::with_capacity(DEV_NODES.len());
    for name in DEV_NODES {
        let host = PathBuf::from("/dev").join(name);
        let (tree, st) = detached_tree(
            "dev",
            &host,
            false,
            sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NOEXEC,
        )?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFCHR {
            return Err(fail(
                "dev",
                format!("{} is not a character device", host.display()),
            ));
        }
        dev_nodes.push((name, tree));
    }

    let argv = spec
        .argv
        .iter()
        .map(|a| cstring("exec", a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let env = spec
        .env
        .iter()
        .map(|(k, v)| cstring("exec", format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()?;
    let exec_candidates = exec_candidates(&spec)?;
    Ok(Plan {
        spec,
        entries,
        workspace,
        workspace_id,
        dev_nodes,
        seccomp,
        landlock_abi,
        cap_last,
        argv,
        env,
        exec_candidates,
    })
}

/// argv[0] itself when it has a '/', else each PATH entry of the step's environment joined
/// with it (glibc's default PATH when the environment has none), as execvp would try them.
fn exec_candidates(spec: &StepSpec) -> Result<Vec<CString>, Failure> {
    let arg0 = spec.argv.first().map(String::as_str).unwrap_or_default();
    if arg0.contains('/') {
        return Ok(vec![cstring("exec", arg0)?]);
    }
    let path = crate::spec::env_get(&spec.env, "PATH").unwrap_or("/bin:/usr/bin");
    path.split(':')
        .map(|dir| {
            let dir = if dir.is_empty() { "." } else { dir };
            cstring("exec", format!("{}/{arg0}", dir.trim_end_matches('/')))
        })
        .collect()
}

/// Writes setgroups=deny, then the uid and gid maps of the sandbox's user namespace.
fn write_id_maps(pid: Pid, spec: &StepSpec) -> Result<(), Failure> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let map = format!("0 {} {}\n", spec.host_uid_base, spec.id_range);
    std::fs::write(dir.join("setgroups"), "deny").layer("uid-map", "writing setgroups")?;
    std::fs::write(dir.join("uid_map"), &map).layer("uid-map", "writing uid_map")?;
    std::fs::write(dir.join("gid_map"), &map).layer("uid-map", "writing gid_map")?;
    Ok(())
}

fn reap(pid: Pid) -> Result<WaitStatus, Errno> {
    loop {
        match waitpid(pid, None) {
            Err(Errno::EINTR) => continue,
            r => return r,
        }
    }
}

fn kill_and_reap(pid: Pid) -> Result<WaitStatus, Errno> {
    // pid 1 of the pid namespace: the kernel kills every process of the sandbox with it.
    let _ = kill(pid, Signal::SIGKILL);
    reap(pid)
}

enum Ended {
    Exited,
    TimedOut,
    Cancelled,
}

fn supervise(control: &OwnedFd) -> StepOutcome {
    // What needs no spec is done while the supervisor waits for one, off the step's start:
    // the step's network namespace (about half of the namespaces' cost) and where its
    // cgroup goes. A failure here fails the step once its spec is read, naming the layer.
    let network = make_network_namespace();
    let placement = StepCgroup::locate();
    let (ControlMessage { spec, seccomp_bpf }, cancel_queued) = match read_spec(control) {
        Ok(s) => s,
        Err(f) => return setup_failed(f, 0),
    };
    if cancel_queued {
        return StepOutcome {
            status: StepStatus::Cancelled,
            duration_ms: 0,
            usage: Default::default(),
            seccomp_denials: Default::default(),
            exec_monotonic_ns: None,
        };
    }
    if let Err(e) = crate::validate(&spec) {
        return setup_failed(fail("spec", e.to_string()), 0);
    }
    // The daemon's supplementary groups would follow the step into the sandbox, and
    // setgroups=deny makes them impossible to drop there: drop them here, as host root.
    if let Err(e) = nix::unistd::setgroups(&[]) {
        return setup_failed(
            fail("credentials", format!("clearing supplementary groups: {e}")),
            0,
        );
    }
    let plan = match prepare(spec, &seccomp_bpf) {
        Ok(p) => p,
        Err(f) => return setup_failed(f, 0),
    };
    if let Err(f) = raise_hard_nofile(plan.spec.limits.nofile) {
        return setup_failed(f, 0);
    }
    if let Err(f) = network {
        return setup_failed(f, 0);
    }
    let placement = match placement {
        Ok(p) => p,
        Err(f) => return setup_failed(f, 0),
    };
    // Dropped (removed) when the step is over, on every path.
    let mut cgroup = match StepCgroup::create(&placement, &plan.spec.limits) {
        Ok(c) => c,
        Err(f) => return setup_failed(f, 0),
    };
    match launch(&plan, control, &mut cgroup) {
        Ok(o) => o,
        Err(f) => setup_failed(f, 0),
    }
}

/// Moves the (single-threaded) supervisor into a new network namespace, the step's: pid 1
/// is cloned into it. The namespace belongs to a user namespace of its own, made with it
/// by a holder child that only waits to be let go: not the host's (the kernel broadcasts
/// the host's device events into namespaces the host's user namespace owns) and not the
/// step's, so the step, root only in its own, holds no capability in it (no interface,
/// route or raw socket). The supervisor, host root, may enter it and bring its loopback
/// up when the step has an egress proxy. It needs no network itself: it talks on
/// inherited sockets.
fn make_network_namespace() -> Result<(), Failure> {
    let (hold_r, hold_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .layer("network", "pipe for the network namespace's holder")?;
    let holder = sys::clone_with_namespaces(libc::CLONE_NEWUSER | libc::CLONE_NEWNET)
        .layer("network", "clone of a new user and network namespace")?;
    let pid = match holder {
        Cloned::Child => {
            // Until the supervisor closes its end: it has entered the namespace by then.
            drop(hold_w);
            let mut byte = [0u8; 1];
            let _ = nix::unistd::read(hold_r.as_fd(), &mut byte);
            sys::exit_now(0)
        }
        Cloned::Parent(pid) => pid,
    };
    drop(hold_r);
    let entered = std::fs::File::open(format!("/proc/{pid}/ns/net"))
        .layer("network", "opening the new network namespace")
        .and_then(|ns| {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .layer("network", "entering the new network namespace")
        });
    drop(hold_w);
    let reaped = reap(pid).layer("network", "reaping the network namespace's holder");
    entered.and(reaped.map(drop))
}

/// The step sets RLIMIT_NOFILE itself, but inside its user namespace it cannot raise the
/// hard limit above the one it inherits: raise it here, as host root, when the daemon's is
/// lower than the step's limit.
fn raise_hard_nofile(want: u64) -> Result<(), Failure> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).layer("rlimits", "reading RLIMIT_NOFILE")?;
    if hard < want {
        setrlimit(Resource::RLIMIT_NOFILE, soft, want).layer(
            "rlimits",
            &format!("raising the RLIMIT_NOFILE hard limit to {want}"),
        )?;
    }
    Ok(())
}

fn launch(plan: &Plan, control: &OwnedFd, cgroup: &mut StepCgroup) -> Result<StepOutcome, Failure> {
    let Launched {
        pid,
        err_r,
        sync_w,
        notify_r,
    } = clone_sandbox(plan, cgroup)?;
    let mut denials = Denials::new(notify_r);
    let pidfd = set_up_from_outside(pid, plan, control, cgroup)?;
    // Release pid 1: its ids now map.
    let started = Instant::now();
    if let Err(e) = nix::unistd::write(sync_w.as_fd(), b"1") {
        let _ = kill_and_reap(pid);
        return Err(fail(
            "user-namespace",
            format!("releasing the sandbox: {e}"),
        ));
    }
    drop(sync_w);

    let deadline = started.checked_add(Duration::from_millis(plan.spec.timeout_ms));
    let ended = wait_for_end(&pidfd, control, deadline, &mut denials);
    let status = match ended {
        Ended::Exited => reap(pid),
        Ended::TimedOut | Ended::Cancelled => kill_and_reap(pid),
    };
    if let Some(m) = denials.failure.take() {
        return Err(fail("seccomp", m));
    }
    let duration_ms = millis(started.elapsed());

    let reports = read_reports(&err_r);
    // Every process of the sandbox is gone: the counters are final.
    let usage = cgroup.usage();
    let exec_monotonic_ns = reports.iter().find_map(|r| match r {
        Report::Execing { monotonic_ns } => Some(*monotonic_ns),
        _ => None,
    });
    Ok(StepOutcome {
        status: decide(&reports, ended, status, usage.oom_killed),
        duration_ms,
        usage,
        seccomp_denials: denials.into_counts(),
        exec_monotonic_ns,
    })
}

/// The supervisor's side of a freshly cloned sandbox, whose pid 1 waits for `sync_w`.
struct Launched {
    pid: Pid,
    /// Reports of pid 1 and the step (see protocol.rs).
    err_r: OwnedFd,
    /// Releases pid 1 once its ids map.
    sync_w: OwnedFd,
    /// Receives the step's seccomp notification listener.
    notify_r: OwnedFd,
}

/// Setup steps 1 and 2 (docs/ARCHITECTURE.md): joins the step cgroup, then one clone
/// creates every namespace with pid 1 in them; the child ends in `child::sandbox_init`.
fn clone_sandbox(plan: &Plan, cgroup: &mut StepCgroup) -> Result<Launched, Failure> {
    let (err_r, err_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).layer("user-namespace", "error pipe")?;
    let (sync_r, sync_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).layer("user-namespace", "sync pipe")?;

    // Setup step 1 (docs/ARCHITECTURE.md): in the step cgroup before the cgroup
    // namespace is created, so pid 1 is born inside and the namespace is rooted there.
    // The step sends its seccomp notification listener on this pair (see notify.rs).
    let (notify_r, notify_w) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .layer("seccomp", "socketpair for the notification listener")?;
    cgroup.join()?;
    // The network namespace is the supervisor's own by now (make_network_namespace).
    let pid = match sys::clone_with_namespaces(crate::namespace_flags() & !libc::CLONE_NEWNET)
        .layer("user-namespace", "clone")?
    {
        Cloned::Child => {
            drop(sync_w);
            drop(err_r);
            drop(notify_r);
            child::sandbox_init(plan, err_w, sync_r, notify_w)
        }
        Cloned::Parent(pid) => pid,
    };
    drop(sync_r);
    drop(err_w);
    drop(notify_w);
    Ok(Launched {
        pid,
        err_r,
        sync_w,
        notify_r,
    })
}

/// What the supervisor does to the sandbox from outside while pid 1 waits: leaves the step
/// cgroup, writes the id maps (setup step 3), hands over the egress listener; returns a
/// pidfd of pid 1. On failure pid 1 (and with it the sandbox) is killed and reaped.
fn set_up_from_outside(
    pid: Pid,
    plan: &Plan,
    control: &OwnedFd,
    cgroup: &mut StepCgroup,
) -> Result<OwnedFd, Failure> {
    // Out again before pid 1 runs: the supervisor must count neither against the step's
    // limits nor be a candidate for its OOM killer.
    if let Err(f) = cgroup.leave() {
        let _ = kill_and_reap(pid);
        return Err(f);
    }

    if let Err(f) = write_id_maps(pid, &plan.spec) {
        let _ = kill_and_reap(pid);
        return Err(f);
    }
    if let Some(port) = plan.spec.egress_proxy_port {
        let handed = crate::egress::open_listener(port).and_then(|listener| {
            sys::send_byte_with_fd(control.as_fd(), b'L', listener.as_fd())
                .layer("network", "handing the egress listener to the daemon")
        });
        if let Err(f) = handed {
            let _ = kill_and_reap(pid);
            return Err(f);
        }
    }
    match sys::pidfd_open(pid) {
        Ok(fd) => Ok(fd),
        Err(e) => {
            let _ = kill_and_reap(pid);
            Err(fail("user-namespace", format!("pidfd_open: {e}")))
        }
    }
}

/// Everything pid 1 and the step reported on the error pipe, once the sandbox is gone.
fn read_reports(err_r: &OwnedFd) -> Vec<Report> {
    // Every write end is closed now (the kernel has killed the namespace with its pid 1),
    // so reading cannot block; non-blocking anyway, to be sure.
    let mut bytes = Vec::new();
    let _ = nix::fcntl::fcntl(
        err_r.as_fd(),
        nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
    );
    let mut chunk = [0u8; 4096];
    loop {
        match nix::unistd::read(err_r.as_fd(), &mut chunk) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    protocol::parse(&bytes)
}

/// Waits for pid 1 to exit, the deadline, or anything on the control socket (cancel), while
/// answering (and counting) the step's seccomp denials.
fn wait_for_end(
    pidfd: &OwnedFd,
    control: &OwnedFd,
    deadline: Option<Instant>,
    denials: &mut Denials,
) -> Ended {
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ended::TimedOut;
                }
                // Round up so we never wake just before the deadline and spin.
                let ms = left.as_millis().saturating_add(1).min(i32::MAX as u128);
                PollTimeout::try_from(i32::try_from(ms).unwrap_or(i32::MAX))
                    .unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = vec![
            PollFd::new(pidfd.as_fd(), PollFlags::POLLIN),
            PollFd::new(control.as_fd(), PollFlags::POLLIN),
        ];
        if let Some(fd) = denials.fd() {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
        }
        match nix::poll::poll(&mut fds, timeout) {
            Err(Errno::EINTR) | Ok(0) => continue,
            // poll on valid fds cannot fail otherwise; if it does, do not leave the
            // sandbox running unobserved.
            Err(_) => return Ended::Cancelled,
            Ok(_) => {}
        }
        // Denials first: a step blocked in a denied syscall waits for this answer.
        let notify = fds
            .get(2)
            .and_then(|f| f.revents())
            .unwrap_or(PollFlags::empty());
        let (pid1, ctl) = (fds[0].revents(), fds[1].revents());
        drop(fds);
        if !notify.is_empty() && !denials.ready(notify) {
            return Ended::Cancelled;
        }
        let fds = [pid1, ctl];
        if fds[0].is_some_and(|r| !r.is_empty()) {
            return Ended::Exited;
        }
        if fds[1].is_some_and(|r| !r.is_empty()) {
            // A byte, EOF or an error on the control socket all mean "cancel".
            return Ended::Cancelled;
        }
    }
}

fn decide(
    reports: &[Report],
    ended: Ended,
    init_status: Result<WaitStatus, Errno>,
    oom_killed: bool,
) -> StepStatus {
    for r in reports {
        if let Report::Setup { layer, message } = r {
            return StepStatus::SetupFailed {
                layer: layer.clone(),
                message: message.clone(),
            };
        }
    }
    for r in reports {
        if let Report::Exec { errno, message } = r {
            return StepStatus::ExecFailed {
                errno: *errno,
                message: message.clone(),
            };
        }
    }
    match ended {
        Ended::TimedOut => return StepStatus::TimedOut,
        Ended::Cancelled => return StepStatus::Cancelled,
        Ended::Exited => {}
    }
    for r in reports {
        match r {
            Report::Exited { code } => return StepStatus::Exited { code: *code },
            Report::Signaled { signal } => return StepStatus::Signaled { signal: *signal },
            _ => {}
        }
    }
    // The OOM killer may pick pid 1 (rarely: it is small); then the step died with it.
    if oom_killed && matches!(init_status, Ok(WaitStatus::Signaled(_, Signal::SIGKILL, _))) {
        return StepStatus::Signaled {
            signal: libc::SIGKILL,
        };
    }
    // pid 1 always reports before exiting; anything else is a failure of the sandbox itself,
    // never passed off as the step's exit.
    StepStatus::SetupFailed {
        layer: "init".to_string(),
        message: format!(
            "sandbox init ended ({init_status:?}) without reporting the step's status"
        ),
    }
}
