//! The only module with `unsafe`: thin wrappers over syscalls that nix does not wrap (or wraps
//! as `unsafe`). Each wrapper returns `Errno` and never panics, so it is usable between clone
//! and exec.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::unistd::{ForkResult, Pid};

// Constants of the new mount API (linux/mount.h), not all exported by libc.
pub(crate) const OPEN_TREE_CLONE: u32 = 1;
pub(crate) const AT_RECURSIVE: u32 = 0x8000;
const AT_EMPTY_PATH: u32 = 0x1000;
const MOVE_MOUNT_F_EMPTY_PATH: u32 = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: u32 = 0x40;
pub(crate) const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub(crate) const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub(crate) const MOUNT_ATTR_NODEV: u64 = 0x4;
pub(crate) const MOUNT_ATTR_NOEXEC: u64 = 0x8;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn check(ret: libc::c_long) -> Result<libc::c_long, Errno> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

fn owned_fd(ret: libc::c_long) -> Result<OwnedFd, Errno> {
    let fd = RawFd::try_from(check(ret)?).map_err(|_| Errno::EBADF)?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Takes ownership of an fd inherited at exec (the control socket on 0), if it is open.
pub(crate) fn take_inherited_fd(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the fd is open, was inherited at exec and is taken exactly once, at startup,
    // before any other code of this process could have claimed it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) enum Cloned {
    Child,
    Parent(Pid),
}

/// clone(2) in fork mode (no new stack: the child continues on a copy of this stack) with
/// namespace flags, so the user namespace and the others are created in one step.
pub(crate) fn clone_with_namespaces(ns_flags: libc::c_int) -> Result<Cloned, Errno> {
    let flags = libc::c_ulong::from((ns_flags | libc::SIGCHLD).unsigned_abs());
    // SAFETY: with a null stack clone behaves like fork: the child gets a copy of the address
    // space. Callers are the single-threaded init (so no lock can be held by a vanished
    // thread) or `probe_namespaces`, whose child only calls _exit.
    let ret = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
    match check(ret)? {
        0 => Ok(Cloned::Child),
        pid => Ok(Cloned::Parent(Pid::from_raw(
            i32::try_from(pid).map_err(|_| Errno::EINVAL)?,
        ))),
    }
}

/// Creates the namespaces in a throw-away child that exits at once: a real test, usable from
/// the multi-threaded daemon because the child runs no code but `_exit`.
pub(crate) fn probe_namespaces(ns_flags: libc::c_int) -> Result<(), Errno> {
    match clone_with_namespaces(ns_flags)? {
        Cloned::Child => exit_now(0),
        Cloned::Parent(pid) => loop {
            match nix::sys::wait::waitpid(pid, None) {
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
                Ok(_) => return Ok(()),
            }
        },
    }
}

/// fork(2) from the single-threaded sandbox init.
pub(crate) fn fork() -> Result<ForkResult, Errno> {
    // SAFETY: only called in the sandbox's pid 1, a single-threaded process, so the child
    // cannot inherit a lock held by another thread.
    unsafe { nix::unistd::fork() }
}

/// Exits at once, without running atexit handlers or unwinding (between clone and exec).
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit is always safe to call; it does not return.
    unsafe { libc::_exit(code) }
}

pub(crate) fn pidfd_open(pid: Pid) -> Result<OwnedFd, Errno> {
    // SAFETY: plain syscall with integer arguments.
    owned_fd(unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0u32) })
}

/// open_tree(2): with OPEN_TREE_CLONE, a detached copy of the mount tree at `dirfd`/`path`.
pub(crate) fn open_tree(
    dirfd: Option<BorrowedFd<'_>>,
    path: &CStr,
    flags: u32,
) -> Result<OwnedFd, Errno> {
    let (dfd, extra) = match dirfd {
        Some(fd) => (fd.as_raw_fd(), AT_EMPTY_PATH),
        None => (libc::AT_FDCWD, 0),
    };
    let flags = flags | extra | libc::O_CLOEXEC.unsigned_abs();
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
    owned_fd(unsafe { libc::syscall(libc::SYS_open_tree, dfd, path.as_ptr(), flags) })
}

/// mount_setattr(2) on the mount (tree) referred to by `fd`.
pub(crate) fn mount_setattr(
    fd: BorrowedFd<'_>,
    set: u64,
    clr: u64,
    recursive: bool,
) -> Result<(), Errno> {
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clr,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = AT_EMPTY_PATH | if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: `attr` is a valid mount_attr of the size we pass; the path is a static empty
    // string.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    check(ret).map(drop)
}

/// move_mount(2) of the detached tree `from` onto the mount point `to` (both fds).
pub(crate) fn move_mount(from: BorrowedFd<'_>, to: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: integer fds and static empty paths.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            from.as_raw_fd(),
            c"".as_ptr(),
            to.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    check(ret).map(drop)
}

pub(crate) fn close_range(first: u32, last: u32) -> Result<(), Errno> {
    // SAFETY: closing descriptors affects no memory; callers own every fd in the range.
    check(unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) }).map(drop)
}

pub(crate) fn capbset_drop(cap: u32) -> Result<(), Errno> {
    // SAFETY: prctl with integer arguments.
    check(libc::c_long::from(unsafe {
        libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0)
    }))
    .map(drop)
}

pub(crate) fn capbset_read(cap: u32) -> Result<bool, Errno> {
    // SAFETY: prctl with integer arguments.
    check(libc::c_long::from(unsafe {
        libc::prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(cap), 0, 0, 0)
    }))
    .map(|v| v == 1)
}

pub(crate) fn ambient_clear_all() -> Result<(), Errno> {
    // SAFETY: prctl with integer arguments.
    check(libc::c_long::from(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    }))
    .map(drop)
}

/// The kernel's Landlock ABI version (<= 0 when unsupported or disabled).
pub(crate) fn landlock_abi_version() -> i32 {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: with a null attr, size 0 and the VERSION flag the call only returns a number.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    i32::try_from(v).unwrap_or(-1)
}

/// Restores every signal (1..=64, real-time ones included) to its default action and
/// unblocks all: dispositions set to "ignore" survive execve (Rust runtimes ignore SIGPIPE,
/// and a caller may ignore others), and the step must start clean. The raw syscall is used
/// because glibc refuses to touch the two signals it reserves for itself (32, 33).
pub(crate) fn reset_signals() -> Result<(), Errno> {
    /// struct sigaction as the kernel takes it (not glibc's layout).
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: libc::c_ulong,
        restorer: usize,
        mask: u64,
    }
    let default = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: `default` is a valid kernel sigaction that installs SIG_DFL (no handler
        // code, so no restorer is needed); the old action is not requested.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &default as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                std::mem::size_of::<u64>(),
            )
        };
        check(ret)?;
    }
    nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    )
}

/// Installs `program` as the calling thread's seccomp filter and returns its notification
/// listener (SECCOMP_FILTER_FLAG_NEW_LISTENER; the kernel opens it O_CLOEXEC). Needs
/// no_new_privs (set before).
pub(crate) fn seccomp_filter_with_listener(
    program: &[seccompiler::sock_filter],
) -> Result<OwnedFd, Errno> {
    let mut insns: Vec<libc::sock_filter> = program
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let prog = libc::sock_fprog {
        len: u16::try_from(insns.len()).map_err(|_| Errno::E2BIG)?,
        filter: insns.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `insns`, which outlives the call; the kernel copies the
    // program and only reads it.
    owned_fd(unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &prog as *const libc::sock_fprog,
        )
    })
}

/// Receives one fd sent with SCM_RIGHTS on `sock` (CLOEXEC). `Ok(None)`: the peer closed
/// the socket without sending one.
pub(crate) fn recv_fd(sock: BorrowedFd<'_>) -> Result<Option<OwnedFd>, Errno> {
    match recv_byte_with_fd(sock)? {
        (_, Some(fd)) => Ok(Some(fd)),
        (None, None) => Ok(None),
        // A message without an fd is not from our step setup.
        (Some(_), None) => Err(Errno::EPROTO),
    }
}

/// Receives one byte and the fd sent with it by SCM_RIGHTS, if any (CLOEXEC). `(None,
/// None)`: the peer closed the socket.
pub(crate) fn recv_byte_with_fd(
    sock: BorrowedFd<'_>,
) -> Result<(Option<u8>, Option<OwnedFd>), Errno> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = loop {
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(Errno::EINTR) => continue,
            other => break other?,
        }
    };
    let mut received = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            received.extend(fds);
        }
    }
    let got_byte = msg.bytes == 1;
    // SAFETY: SCM_RIGHTS just installed these fds in our table; nothing else owns them.
    let mut owned: Vec<OwnedFd> = received
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    let fd = owned.pop();
    // At most one fd per message: more is not from Kiln (the extra ones are closed).
    if !owned.is_empty() {
        return Err(Errno::EPROTO);
    }
    Ok((got_byte.then_some(byte[0]), fd))
}

/// Sends `byte` with `fd` attached (SCM_RIGHTS).
pub(crate) fn send_byte_with_fd(
    sock: BorrowedFd<'_>,
    byte: u8,
    fd: BorrowedFd<'_>,
) -> Result<(), Errno> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds = [fd.as_raw_fd()];
    let data = [byte];
    let iov = [std::io::IoSlice::new(&data)];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map(drop)
}

/// Sets the loopback interface of the calling thread's network namespace up.
pub(crate) fn loopback_up() -> Result<(), Errno> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain data (a name and a union of integers and addresses); all
    // zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        // "lo" is ASCII: every byte fits a c_char, signed or not.
        #[allow(clippy::cast_possible_wrap)]
        let byte = *src as libc::c_char;
        *dst = byte;
    }
    // SAFETY: SIOCGIFFLAGS reads the NUL-terminated name in `req` and writes the flags into
    // it; `req` is a valid, writable ifreq that outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(Errno::last());
    }
    // IFF_UP | IFF_RUNNING is 0x41, inside c_short; ifru_flags is a c_short.
    #[allow(clippy::cast_possible_truncation)]
    const UP_RUNNING: libc::c_short = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCGIFFLAGS just filled `ifru_flags`, the union member read and written.
    unsafe {
        req.ifr_ifru.ifru_flags |= UP_RUNNING;
    }
    // SAFETY: SIOCSIFFLAGS reads `req`, a valid ifreq naming the interface and its flags.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Receives one pending seccomp notification. Does not block after poll reported the
/// listener readable: a notification whose task went away meanwhile gives ENOENT.
pub(crate) fn notif_recv(listener: BorrowedFd<'_>) -> Result<libc::seccomp_notif, Errno> {
    // SAFETY: seccomp_notif is plain integers; all-zero is a valid value (and the kernel
    // requires the buffer zeroed).
    let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: the ioctl writes one seccomp_notif into `n`, which is that size.
    let ret = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_RECV,
            &mut n as *mut libc::seccomp_notif,
        )
    };
    check(libc::c_long::from(ret))?;
    Ok(n)
}

/// Fails the notified syscall `id` with `errno` (never "continue": the syscall never runs).
pub(crate) fn notif_deny(listener: BorrowedFd<'_>, id: u64, errno: Errno) -> Result<(), Errno> {
    let mut resp = libc::seccomp_notif_resp {
        id,
        val: 0,
        error: -(errno as i32),
        flags: 0,
    };
    // SAFETY: the ioctl reads one seccomp_notif_resp from `resp`, which is that size.
    let ret = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            libc::SECCOMP_IOCTL_NOTIF_SEND,
            &mut resp as *mut libc::seccomp_notif_resp,
        )
    };
    check(libc::c_long::from(ret)).map(drop)
}
