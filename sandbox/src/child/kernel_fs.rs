//! The kernel's file systems in the new root: a minimal /dev of host device nodes and
//! the pseudo-terminals, and the step's /proc with kernel tunables read-only and
//! host-wide internals masked. Runs in the sandbox's pid 1, like the rest of `child`.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{Mode, SFlag};

use super::{create, mount_fs, Leaf};
use crate::failure::{fail, Failure, OrLayer};
use crate::plan::Plan;
use crate::sys;

/// Host device nodes bound into the sandbox's /dev (mknod is not allowed in a user namespace).
pub(crate) const DEV_NODES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Entries of the step's /proc made read-only: kernel tunables and triggers. (The user
/// namespace already refuses most writes there, and Landlock all of them; this holds
/// without either.)
pub(crate) const PROC_READ_ONLY: [&str; 5] = ["sys", "sysrq-trigger", "irq", "bus", "fs"];

/// Entries of the step's /proc hidden: files get /dev/null bound over them, directories an
/// empty read-only tmpfs. Kernel memory and symbols, keyrings, timers and scheduler
/// internals (host-wide, and useful to attackers), hardware details, the kernel config.
pub(crate) const PROC_MASKED: [&str; 9] = [
    "kcore",
    "keys",
    "timer_list",
    "sched_debug",
    "kallsyms",
    "acpi",
    "scsi",
    "latency_stats",
    "config.gz",
];

/// `Some(is_dir)` when `path` exists (not following symlinks).
fn existing(path: &str) -> Result<Option<bool>, Failure> {
    match nix::sys::stat::lstat(path) {
        Ok(st) => Ok(Some(
            SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR,
        )),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(fail("proc", format!("stat /{path}: {e}"))),
    }
}

/// Applies [`PROC_READ_ONLY`] and [`PROC_MASKED`] to the new /proc (cwd: the staged root).
/// Entries this kernel does not have are skipped; any other failure fails the setup.
pub(super) fn mask_proc() -> Result<(), Failure> {
    let hardening = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for name in PROC_READ_ONLY {
        let path = format!("proc/{name}");
        if existing(&path)?.is_none() {
            continue;
        }
        // A bind ignores MS_RDONLY on the first call: bind, then remount.
        mount(
            Some(path.as_str()),
            path.as_str(),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .layer("proc", &format!("binding /{path}"))?;
        mount(
            None::<&str>,
            path.as_str(),
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | hardening,
            None::<&str>,
        )
        .layer("proc", &format!("remounting /{path} read-only"))?;
    }
    for name in PROC_MASKED {
        let path = format!("proc/{name}");
        let masked = match existing(&path)? {
            None => continue,
            Some(true) => mount_fs(
                "tmpfs",
                &path,
                MsFlags::MS_RDONLY | hardening,
                "size=4k,mode=0555",
            ),
            Some(false) => mount(
                Some("dev/null"),
                path.as_str(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ),
        };
        masked.layer("proc", &format!("masking /{path}"))?;
    }
    Ok(())
}

pub(super) fn build_dev(plan: &Plan, root: &OwnedFd) -> Result<(), Failure> {
    create(root, Path::new("/dev"), Leaf::Dir).layer("dev", "creating /dev")?;
    mount_fs(
        "tmpfs",
        "dev",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "mode=0755,size=64k",
    )
    .layer("dev", "mounting /dev")?;
    let dev = openat(
        root.as_fd(),
        "dev",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .layer("dev", "opening /dev")?;
    for (name, tree) in &plan.dev_nodes {
        let point = create(&dev, Path::new("/").join(name).as_path(), Leaf::File)
            .layer("dev", &format!("creating /dev/{name}"))?
            .ok_or_else(|| fail("dev", "no mount point"))?;
        sys::move_mount(tree.as_fd(), point.as_fd())
            .layer("dev", &format!("binding /dev/{name}"))?;
    }
    create(&dev, Path::new("/pts"), Leaf::Dir).layer("dev", "creating /dev/pts")?;
    mount_fs(
        "devpts",
        "dev/pts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )
    .layer("dev", "mounting /dev/pts")?;
    create(&dev, Path::new("/shm"), Leaf::Dir).layer("dev", "creating /dev/shm")?;
    mount_fs(
        "tmpfs",
        "dev/shm",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        &format!("mode=1777,size={}", plan.spec.tmp_size_bytes),
    )
    .layer("dev", "mounting /dev/shm")?;
    for (link, to) in [
        ("/ptmx", "pts/ptmx"),
        ("/fd", "/proc/self/fd"),
        ("/stdin", "/proc/self/fd/0"),
        ("/stdout", "/proc/self/fd/1"),
        ("/stderr", "/proc/self/fd/2"),
    ] {
        create(&dev, Path::new(link), Leaf::Symlink(Path::new(to)))
            .layer("dev", &format!("symlink /dev{link}"))?;
    }
    mount(
        None::<&str>,
        "dev",
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .layer("dev", "remounting /dev read-only")?;
    Ok(())
}
