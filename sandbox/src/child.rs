//! Code that runs inside the new namespaces: the sandbox's pid 1 (root filesystem, then
//! reaper) and the step process (credentials, capabilities, no_new_privs, Landlock,
//! seccomp, exec). Runs in a copy of the single-threaded supervisor, so allocating is fine;
//! it never returns or unwinds into the supervisor's code: every path ends in `_exit`.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{fstat, mkdirat, Mode};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{ForkResult, Gid, Pid, Uid};

use crate::failure::{fail, Failure, OrLayer};
use crate::plan::{Plan, Prepared};
use crate::protocol::{self, Report};
use crate::sys;
use crate::{landlock_rules, notify};

mod kernel_fs;
use kernel_fs::{build_dev, mask_proc};
pub(crate) use kernel_fs::{DEV_NODES, PROC_MASKED, PROC_READ_ONLY};

/// Where pid 1 assembles the new root before pivot_root. Any directory of the (private)
/// mount namespace will do; everything mounted there comes from fds, not host paths.
const STAGING: &str = "/tmp";

/// Entry of the cloned child; never returns.
pub(crate) fn sandbox_init(plan: &Plan, err: OwnedFd, sync: OwnedFd, notify: OwnedFd) -> ! {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pid1(plan, &err, sync, &notify)
    }));
    let code = match outcome {
        Ok(Ok(report)) => {
            let code = match report {
                Report::Exited { code } => code,
                Report::Signaled { signal } => 128 + signal,
                _ => 1,
            };
            protocol::send(&err, &report);
            code
        }
        Ok(Err(f)) => {
            protocol::send(
                &err,
                &Report::Setup {
                    layer: f.layer.to_string(),
                    message: f.message,
                },
            );
            1
        }
        Err(_) => {
            protocol::send(
                &err,
                &Report::Setup {
                    layer: "init".to_string(),
                    message: "sandbox init panicked".to_string(),
                },
            );
            1
        }
    };
    sys::exit_now(code)
}

fn pid1(plan: &Plan, err: &OwnedFd, sync: OwnedFd, notify: &OwnedFd) -> Result<Report, Failure> {
    // The control socket (0) is the supervisor's alone: the step must neither see cancel
    // requests nor forge an outcome.
    let _ = nix::unistd::close(0);
    // A session of our own, without a controlling terminal: the daemon's terminal (if it
    // has one) must not be reachable as /dev/tty (TIOCSTI, job-control signals).
    nix::unistd::setsid().layer("dev", "setsid (dropping the controlling terminal)")?;
    // Wait until the supervisor has written our id maps.
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(sync.as_fd(), &mut byte) {
            Err(Errno::EINTR) => continue,
            Ok(1) => break,
            _ => return Err(fail("uid-map", "supervisor did not release the sandbox")),
        }
    }
    drop(sync);
    // Until now our ids are the host's root ids; become sandbox root (host_uid_base).
    let root_g = Gid::from_raw(0);
    let root_u = Uid::from_raw(0);
    nix::unistd::setresgid(root_g, root_g, root_g).layer("uid-map", "setresgid to sandbox root")?;
    nix::unistd::setresuid(root_u, root_u, root_u).layer("uid-map", "setresuid to sandbox root")?;

    build_root(plan)?;
    nix::unistd::sethostname(&plan.spec.hostname).layer("uts", "sethostname")?;
    // Nobody in the sandbox may ptrace pid 1 or read its memory.
    nix::sys::prctl::set_dumpable(false).layer("credentials", "PR_SET_DUMPABLE")?;

    let step = match sys::fork().layer("exec", "fork of the step process")? {
        ForkResult::Child => {
            let f = match step(plan, err, notify) {
                Err(f) => f,
                Ok(never) => match never {},
            };
            protocol::send(
                err,
                &Report::Setup {
                    layer: f.layer.to_string(),
                    message: f.message,
                },
            );
            sys::exit_now(126)
        }
        ForkResult::Parent { child } => child,
    };
    // pid 1 keeps only the report pipe: no tree fds, no stdio of the step.
    let e = u32::try_from(err.as_raw_fd()).unwrap_or(u32::MAX);
    if e > 0 {
        let _ = sys::close_range(0, e - 1);
    }
    let _ = sys::close_range(e.saturating_add(1), u32::MAX);
    reap_until(step)
}

/// Reaps every orphan of the namespace until the step itself exits.
fn reap_until(step: Pid) -> Result<Report, Failure> {
    loop {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == step => return Ok(Report::Exited { code }),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == step => {
                return Ok(Report::Signaled { signal: sig as i32 })
            }
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(fail("init", format!("waiting for the step: {e}"))),
        }
    }
}

/// Opens (creating as needed) each directory of `rel` below `dir`, never following a symlink,
/// so no root entry can redirect a later mount outside the new root.
fn walk_dirs(dir: &OwnedFd, rel: &[&std::ffi::OsStr]) -> Result<OwnedFd, Errno> {
    let mut cur = nix::unistd::dup(dir)?;
    for c in rel {
        match mkdirat(cur.as_fd(), *c, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e),
        }
        cur = openat(
            cur.as_fd(),
            *c,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
    }
    Ok(cur)
}

fn components(p: &Path) -> Vec<&std::ffi::OsStr> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s),
            _ => None,
        })
        .collect()
}

enum Leaf<'a> {
    Dir,
    File,
    Symlink(&'a Path),
}

/// Creates `path` (absolute in the sandbox) below `root`; returns an O_PATH fd of it
/// (None for a symlink).
fn create(root: &OwnedFd, path: &Path, leaf: Leaf<'_>) -> Result<Option<OwnedFd>, Errno> {
    let comps = components(path);
    let Some((last, parents)) = comps.split_last() else {
        return Err(Errno::EINVAL);
    };
    let parent = walk_dirs(root, parents)?;
    let path_flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    match leaf {
        Leaf::Dir => {
            match mkdirat(parent.as_fd(), *last, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(e),
            }
            openat(
                parent.as_fd(),
                *last,
                path_flags | OFlag::O_DIRECTORY,
                Mode::empty(),
            )
            .map(Some)
        }
        Leaf::File => {
            match openat(
                parent.as_fd(),
                *last,
                OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o644),
            ) {
                // Read-only (e.g. inside an earlier bind): it must already exist.
                Ok(_) | Err(Errno::EROFS) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(e),
            }
            openat(parent.as_fd(), *last, path_flags, Mode::empty()).map(Some)
        }
        Leaf::Symlink(to) => {
            nix::unistd::symlinkat(to, parent.as_fd(), *last)?;
            Ok(None)
        }
    }
}

fn mount_fs(fstype: &str, target: &str, flags: MsFlags, data: &str) -> Result<(), Errno> {
    mount(Some(fstype), target, Some(fstype), flags, Some(data))
}

/// Steps 5-8 of the sandbox setup order (docs/ARCHITECTURE.md): private propagation,
/// the new root, pivot_root, the workspace as cwd.
fn build_root(plan: &Plan) -> Result<(), Failure> {
    let root = stage_skeleton()?;
    place_root_entries(plan, &root)?;
    // Open, like `root`, until the root is built.
    let _workspace_point = mount_workspace(plan, &root)?;
    mount_proc(&root)?;
    build_dev(plan, &root)?;
    // Needs the sandbox's /dev/null, which masks files.
    mask_proc()?;
    mount_tmp(plan, &root)?;
    remount_root_read_only()?;
    pivot_into_root()?;
    enter_workspace(plan)
}

/// Step 5, then the start of step 6: private propagation, and the tmpfs skeleton the new
/// root is assembled in, entered as cwd. Returns an O_PATH fd of the skeleton.
fn stage_skeleton() -> Result<OwnedFd, Failure> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .layer("mount", "making mount propagation private")?;
    mount_fs(
        "tmpfs",
        STAGING,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        "size=1m,mode=0755",
    )
    .layer("mount", "mounting the root skeleton")?;
    // Relative paths below resolve inside the skeleton from here on.
    nix::unistd::chdir(STAGING).layer("mount", "entering the root skeleton")?;
    openat(
        nix::fcntl::AT_FDCWD,
        ".",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .layer("mount", "opening the root skeleton")
}

/// The spec's root entries (image binds, symlinks, directories), in order, below `root`.
fn place_root_entries(plan: &Plan, root: &OwnedFd) -> Result<(), Failure> {
    for entry in &plan.entries {
        match entry {
            Prepared::Bind {
                target,
                tree,
                is_dir,
            } => {
                let what = format!("bind at {}", target.display());
                let leaf = if *is_dir { Leaf::Dir } else { Leaf::File };
                let point = create(root, target, leaf).layer("mount", &what)?;
                let point =
                    point.ok_or_else(|| fail("mount", format!("{what}: no mount point")))?;
                sys::move_mount(tree.as_fd(), point.as_fd()).layer("mount", &what)?;
            }
            Prepared::Symlink { path, points_to } => {
                create(root, path, Leaf::Symlink(points_to))
                    .layer("mount", &format!("symlink {}", path.display()))?;
            }
            Prepared::Dir { path } => {
                create(root, path, Leaf::Dir)
                    .layer("mount", &format!("directory {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// Binds the workspace at /workspace; returns the O_PATH fd of its mount point.
fn mount_workspace(plan: &Plan, root: &OwnedFd) -> Result<OwnedFd, Failure> {
    let ws = create(root, Path::new("/workspace"), Leaf::Dir)
        .layer("workspace", "creating /workspace")?
        .ok_or_else(|| fail("workspace", "no mount point"))?;
    sys::move_mount(plan.workspace.as_fd(), ws.as_fd())
        .layer("workspace", "mounting the workspace")?;
    Ok(ws)
}

fn mount_proc(root: &OwnedFd) -> Result<(), Failure> {
    create(root, Path::new("/proc"), Leaf::Dir).layer("proc", "creating /proc")?;
    mount_fs(
        "proc",
        "proc",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        "",
    )
    .layer("proc", "mounting proc")?;
    Ok(())
}

fn mount_tmp(plan: &Plan, root: &OwnedFd) -> Result<(), Failure> {
    create(root, Path::new("/tmp"), Leaf::Dir).layer("mount", "creating /tmp")?;
    mount_fs(
        "tmpfs",
        "tmp",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        &format!("mode=1777,size={}", plan.spec.tmp_size_bytes),
    )
    .layer("mount", "mounting /tmp")?;
    Ok(())
}

/// The skeleton (cwd) itself read-only, nosuid, nodev.
fn remount_root_read_only() -> Result<(), Failure> {
    mount(
        None::<&str>,
        ".",
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None::<&str>,
    )
    .layer("mount", "remounting the root read-only")?;
    Ok(())
}

/// Step 7.
fn pivot_into_root() -> Result<(), Failure> {
    // pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves
    // only the new root (never a bare chroot, which can be escaped).
    nix::unistd::pivot_root(".", ".").layer("pivot-root", "pivot_root")?;
    umount2(".", MntFlags::MNT_DETACH).layer("pivot-root", "detaching the old root")?;
    nix::unistd::chdir("/").layer("pivot-root", "chdir /")?;
    Ok(())
}

/// Step 8: cwd is the workspace, checked to be the very directory mounted inside the new
/// root.
fn enter_workspace(plan: &Plan) -> Result<(), Failure> {
    nix::unistd::chdir("/workspace").layer("workspace", "chdir /workspace")?;
    let cwd = nix::unistd::getcwd().layer("workspace", "getcwd")?;
    let here = fstat(
        openat(
            nix::fcntl::AT_FDCWD,
            ".",
            OFlag::O_PATH | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .layer("workspace", "opening cwd")?
        .as_fd(),
    )
    .layer("workspace", "stat cwd")?;
    if cwd != Path::new("/workspace") || (here.st_dev, here.st_ino) != plan.workspace_id {
        return Err(fail(
            "workspace",
            format!(
                "cwd {} is not the workspace inside the new root",
                cwd.display()
            ),
        ));
    }
    enter_working_directory(&plan.spec.working_directory)
}

/// Moves the cwd down to the step's working directory, one name at a time below the
/// workspace, refusing a symlink (`O_NOFOLLOW`) and anything on another filesystem.
fn enter_working_directory(names: &[String]) -> Result<(), Failure> {
    if names.is_empty() {
        return Ok(());
    }
    let mut dir = openat(
        nix::fcntl::AT_FDCWD,
        ".",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .layer("workspace", "opening the workspace")?;
    let device = fstat(dir.as_fd())
        .layer("workspace", "stat the workspace")?
        .st_dev;
    for name in names {
        dir = openat(
            dir.as_fd(),
            name.as_str(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .layer(
            "workspace",
            "entering the working directory (it must be a directory, not a symlink)",
        )?;
        if fstat(dir.as_fd())
            .layer("workspace", "stat the working directory")?
            .st_dev
            != device
        {
            return Err(fail(
                "workspace",
                "the working directory is not on the workspace's filesystem",
            ));
        }
    }
    nix::unistd::fchdir(dir.as_fd()).layer("workspace", "entering the working directory")?;
    Ok(())
}

/// Steps 9-15 of the sandbox setup order (docs/ARCHITECTURE.md), then exec. Returns
/// only on failure.
fn step(plan: &Plan, err: &OwnedFd, notify: &OwnedFd) -> Result<std::convert::Infallible, Failure> {
    let spec = &plan.spec;
    let id = spec.step_uid;
    let (uid, gid) = (Uid::from_raw(id), Gid::from_raw(id));

    // 9. credentials. Keep the permitted set across the uid change so step 11 can still drop
    // the bounding set (that needs CAP_SETPCAP); everything is cleared there.
    nix::sys::prctl::set_keepcaps(true).layer("credentials", "PR_SET_KEEPCAPS")?;
    // setgroups(2) is denied in this user namespace (setgroups=deny); the supervisor cleared
    // the list before clone, so check it is empty rather than trusting it.
    let groups = nix::unistd::getgroups().layer("credentials", "getgroups")?;
    if !groups.is_empty() {
        return Err(fail(
            "credentials",
            format!("supplementary groups present: {groups:?}"),
        ));
    }
    nix::unistd::setresgid(gid, gid, gid).layer("credentials", "setresgid")?;
    nix::unistd::setresuid(uid, uid, uid).layer("credentials", "setresuid")?;

    // 10. only stdio, the error pipe and the listener socket (both CLOEXEC) survive; stdin
    // is /dev/null.
    close_fds_except(&[err.as_raw_fd(), notify.as_raw_fd()]).layer("fds", "close_range")?;
    let null = nix::fcntl::open("/dev/null", OFlag::O_RDONLY, Mode::empty())
        .layer("fds", "opening /dev/null")?;
    if null.as_raw_fd() != 0 {
        nix::unistd::dup2_stdin(&null).layer("fds", "stdin = /dev/null")?;
    } else {
        // It already is fd 0: keep it open past this scope.
        std::mem::forget(null);
    }

    // 11. capabilities: bounding set first (needs CAP_SETPCAP), then the other sets.
    drop_capabilities(plan.cap_last)?;

    // 12.
    nix::sys::prctl::set_no_new_privs().layer("no-new-privs", "PR_SET_NO_NEW_PRIVS")?;

    // 13. Landlock after the last mount. ABI 0 only reaches here when the operator waived
    // Landlock for a host without it (checked again: never skipped silently).
    if plan.landlock_abi >= 1 {
        landlock_rules::enforce(plan.landlock_abi, &spec.tcp_connect_ports)
            .map_err(|m| fail("landlock", m))?;
    } else if !spec.waived_layers.iter().any(|l| l == "landlock") {
        return Err(fail("landlock", "Landlock unavailable and not waived"));
    }

    // 14. after the last credential change; and pid 1 must still be there to reap us.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .layer("credentials", "PR_SET_PDEATHSIG")?;
    if nix::unistd::getppid() != Pid::from_raw(1) {
        return Err(fail("credentials", "sandbox init died during setup"));
    }
    set_rlimits(&spec.limits)?;

    // A clean start: default signal actions (the supervisor ignores SIGPIPE, which execve
    // would pass on) and a fixed umask, so builds do not depend on the daemon's.
    sys::reset_signals().layer("exec", "resetting signal dispositions")?;
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));

    // 15. seccomp last, then exec. The listener goes to the supervisor, which answers and
    // counts every denial; our copy is closed before exec so nothing in the sandbox can
    // answer a notification. Without a working listener the step does not run.
    let listener = sys::seccomp_filter_with_listener(&plan.seccomp)
        .layer("seccomp", "installing the filter")?;
    notify::send_listener(notify, &listener).layer(
        "seccomp",
        "handing the notification listener to the supervisor",
    )?;
    drop(listener);
    protocol::send(
        err,
        &Report::Execing {
            monotonic_ns: crate::monotonic_now_ns(),
        },
    );
    exec(plan, err)
}

/// rlimits of the step: no core dumps (they could hold secrets and fill the workspace),
/// bounded open files, and the largest file it may write (SIGXFSZ / EFBIG beyond).
/// Soft = hard, so the step cannot raise them.
fn set_rlimits(limits: &crate::Limits) -> Result<(), Failure> {
    use nix::sys::resource::{setrlimit, Resource};
    setrlimit(Resource::RLIMIT_CORE, 0, 0).layer("rlimits", "RLIMIT_CORE")?;
    setrlimit(Resource::RLIMIT_NOFILE, limits.nofile, limits.nofile)
        .layer("rlimits", "RLIMIT_NOFILE")?;
    setrlimit(
        Resource::RLIMIT_FSIZE,
        limits.fsize_bytes,
        limits.fsize_bytes,
    )
    .layer("rlimits", "RLIMIT_FSIZE")?;
    Ok(())
}

/// Closes every fd from 3 up except `keep`.
fn close_fds_except(keep: &[std::os::fd::RawFd]) -> Result<(), Errno> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|f| u32::try_from(*f).ok())
        .filter(|f| *f >= 3)
        .collect();
    keep.sort_unstable();
    let mut from = 3u32;
    for k in keep {
        if k > from {
            sys::close_range(from, k - 1)?;
        }
        from = from.max(k.saturating_add(1));
    }
    sys::close_range(from, u32::MAX)
}

fn drop_capabilities(cap_last: u32) -> Result<(), Failure> {
    use caps::{CapSet, Capability};
    caps::raise(None, CapSet::Effective, Capability::CAP_SETPCAP).layer(
        "capabilities",
        "raising CAP_SETPCAP to drop the bounding set",
    )?;
    for cap in 0..=cap_last {
        sys::capbset_drop(cap).layer(
            "capabilities",
            &format!("dropping capability {cap} from the bounding set"),
        )?;
    }
    for cap in 0..64u32 {
        match sys::capbset_read(cap) {
            Ok(false) | Err(Errno::EINVAL) => {}
            Ok(true) => {
                return Err(fail(
                    "capabilities",
                    format!("capability {cap} still in the bounding set"),
                ))
            }
            Err(e) => {
                return Err(fail(
                    "capabilities",
                    format!("reading the bounding set: {e}"),
                ))
            }
        }
    }
    sys::ambient_clear_all().layer("capabilities", "clearing the ambient set")?;
    for set in [CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        caps::clear(None, set).layer("capabilities", &format!("clearing {set:?}"))?;
        let left = caps::read(None, set).layer("capabilities", &format!("reading {set:?}"))?;
        if !left.is_empty() {
            return Err(fail("capabilities", format!("{set:?} not empty: {left:?}")));
        }
    }
    nix::sys::prctl::set_keepcaps(false).layer("capabilities", "PR_SET_KEEPCAPS off")?;
    Ok(())
}

/// execve each candidate like execvp: go on past ENOENT/ENOTDIR/EACCES, report the most
/// telling error (EACCES over ENOENT) when none works.
fn exec(plan: &Plan, err: &OwnedFd) -> Result<std::convert::Infallible, Failure> {
    let mut saw_eacces = false;
    let mut last = Errno::ENOENT;
    for path in &plan.exec_candidates {
        let Err(e) = nix::unistd::execve(path.as_c_str(), &plan.argv, &plan.env);
        last = e;
        match e {
            Errno::EACCES => saw_eacces = true,
            Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP | Errno::ENAMETOOLONG => {}
            _ => break,
        }
    }
    let errno = if saw_eacces && last == Errno::ENOENT {
        Errno::EACCES
    } else {
        last
    };
    let arg0 = plan
        .spec
        .argv
        .first()
        .map(String::as_str)
        .unwrap_or_default();
    protocol::send(
        err,
        &Report::Exec {
            errno: errno as i32,
            message: format!("{arg0}: {}", errno.desc()),
        },
    );
    sys::exit_now(127)
}
