//! Directory operations through fds for the unpacker: listing a directory and removing
//! a tree below a parent fd, never following a symlink.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{unlinkat, UnlinkatFlags};

/// A readable fd of a directory opened O_PATH.
pub(super) fn reopen_dir(dir: &OwnedFd) -> Result<OwnedFd, Errno> {
    openat(
        dir.as_fd(),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

pub(super) fn child_names(dir: &OwnedFd) -> Result<Vec<std::ffi::OsString>, Errno> {
    let mut listing = nix::dir::Dir::from_fd(reopen_dir(dir)?)?;
    let mut names = Vec::new();
    for entry in listing.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
}

/// Removes `name` of `parent` and, for a directory, everything below it, through
/// directory fds: a symlink is removed, never followed.
pub(super) fn remove_all(parent: &OwnedFd, name: &OsStr) -> Result<(), Errno> {
    match unlinkat(parent.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR) => {}
        Err(e) => return Err(e),
    }
    let dir = openat(
        parent.as_fd(),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    for child in child_names(&dir)? {
        remove_all(&dir, &child)?;
    }
    unlinkat(parent.as_fd(), name, UnlinkatFlags::RemoveDir)
}
