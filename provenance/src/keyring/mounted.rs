//! A key ring mounted read-only from elsewhere, such as a Kubernetes Secret volume.
//!
//! The kubelet writes a Secret volume with its atomic writer: the files lie in a
//! timestamped directory (`..2026_11_27_22_19_53.1234567890/`), `..data` is a symlink to
//! it, and each name of the Secret is a symlink `NAME -> ..data/NAME`. An update writes a
//! new timestamped directory, renames a new `..data` link over the old one, then removes
//! the old directory. Such a ring is read, never written, and its links are followed only
//! as that layout needs:
//! - a link's target is relative and never climbs above the mounted directory (`..`),
//!   and a name is resolved through at most [`MAX_LINKS`] links;
//! - every directory on the way, the mounted one included, is owned by root and not
//!   writable by group or others, unless its mount is read-only (the kubelet's Secret
//!   volume is a tmpfs of mode 1777, which a container sees read-only);
//! - the file reached is a regular file owned by root and not writable by group or
//!   others; a private key is not readable by them either (a pod with an `fsGroup` gets
//!   group-readable files, which are refused).
//!
//! Everything is opened relative to the directories' descriptors with `O_NOFOLLOW`, so
//! the checks hold for the file actually read. The private key is read from the
//! directory where `keyring.json`'s links end, so both files come from one version of the
//! Secret even while the kubelet swaps `..data`.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, OFlag};
use nix::sys::stat::{fstat, Mode};
use nix::sys::statvfs::{fstatvfs, FsFlags};

use crate::ProvenanceError;

/// Links followed to resolve one name (the kubelet's layout needs two).
pub const MAX_LINKS: usize = 8;
/// The largest file of a ring read (a ring of thousands of keys is far below it).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// What a file of the ring must allow others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Secrecy {
    /// Readable by anyone, writable by its owner only (`keyring.json`).
    Public,
    /// Neither readable nor writable by group or others (the private key).
    Private,
}

/// A file read from a mounted ring.
pub(crate) struct MountedFile {
    pub bytes: Vec<u8>,
    /// Where the file lies, as names below the mounted directory (no links in it).
    pub dir: Vec<String>,
}

/// The mounted directory, held open.
pub(crate) struct MountedDir {
    path: PathBuf,
    root: OwnedFd,
}

fn key_err(path: &Path, what: impl std::fmt::Display) -> ProvenanceError {
    ProvenanceError::Key(format!("{}: {what}", path.display()))
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// A directory of the ring: root's, and writable by nobody else unless sticky and mounted
/// read-only.
fn check_dir(fd: &OwnedFd, path: &Path) -> Result<(), ProvenanceError> {
    let stat = fstat(fd.as_fd()).map_err(|e| ProvenanceError::io(path, e.into()))?;
    if stat.st_uid != 0 {
        return Err(key_err(
            path,
            format!(
                "directory of a read-only key ring is owned by uid {}, not root",
                stat.st_uid
            ),
        ));
    }
    let mode = stat.st_mode & 0o7777;
    // A directory others may write is only admitted as the kubelet's volume: sticky (so
    // nobody else can rename or remove root's entries) and mounted read-only.
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(key_err(
            path,
            format!("directory mode {mode:04o} lets others write it without the sticky bit"),
        ));
    }
    if mode & 0o022 != 0 {
        let vfs = fstatvfs(fd.as_fd()).map_err(|e| ProvenanceError::io(path, e.into()))?;
        if !vfs.flags().contains(FsFlags::ST_RDONLY) {
            return Err(key_err(
                path,
                format!(
                    "directory mode {mode:04o} lets others write it, and it is not mounted read-only"
                ),
            ));
        }
    }
    Ok(())
}

impl MountedDir {
    /// Opens the directory itself (never through a symlink) and checks it.
    pub(crate) fn open(path: &Path) -> Result<Self, ProvenanceError> {
        let root = nix::fcntl::open(path, dir_flags(), Mode::empty()).map_err(|e| match e {
            Errno::ENOENT => key_err(
                path,
                "no such directory: a read-only key ring is never created (make it with `kiln keys generate` elsewhere and mount it here)",
            ),
            Errno::ELOOP | Errno::ENOTDIR => key_err(path, "not a directory (a symlink is not followed here)"),
            other => ProvenanceError::io(path, other.into()),
        })?;
        check_dir(&root, path)?;
        Ok(MountedDir {
            path: path.to_path_buf(),
            root,
        })
    }

    fn shown(&self, dir: &[String], name: Option<&str>) -> PathBuf {
        let mut p = self.path.clone();
        p.extend(dir);
        if let Some(name) = name {
            p.push(name);
        }
        p
    }

    /// Opens the directory `dir` below the root, each step without following a link and
    /// checked.
    fn open_dir(&self, dir: &[String]) -> Result<OwnedFd, ProvenanceError> {
        let mut fd = self
            .root
            .try_clone()
            .map_err(|e| ProvenanceError::io(&self.path, e))?;
        for (i, name) in dir.iter().enumerate() {
            let shown = self.shown(&dir[..=i], None);
            fd = openat(fd.as_fd(), name.as_str(), dir_flags(), Mode::empty())
                .map_err(|e| ProvenanceError::io(&shown, e.into()))?;
            check_dir(&fd, &shown)?;
        }
        Ok(fd)
    }

    /// Reads the file `name` of the directory `start` (names below the root), following
    /// links only inside the mounted directory, and checks it as `secrecy` asks.
    pub(crate) fn read(
        &self,
        start: &[String],
        name: &str,
        secrecy: Secrecy,
    ) -> Result<MountedFile, ProvenanceError> {
        let mut dir: Vec<String> = start.to_vec();
        let mut pending: VecDeque<String> = VecDeque::from([name.to_string()]);
        let mut links = 0;
        while let Some(part) = pending.pop_front() {
            match part.as_str() {
                "" | "." => continue,
                ".." => {
                    if dir.pop().is_none() {
                        return Err(key_err(
                            &self.shown(start, Some(name)),
                            format!("a symlink leads above {}", self.path.display()),
                        ));
                    }
                    continue;
                }
                _ => {}
            }
            let here = self.open_dir(&dir)?;
            let shown = self.shown(&dir, Some(&part));
            match readlinkat(here.as_fd(), part.as_str()) {
                Ok(target) => {
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(key_err(&shown, format!("more than {MAX_LINKS} symlinks")));
                    }
                    let target = Path::new(&target);
                    let mut parts = Vec::new();
                    for component in target.components() {
                        match component {
                            Component::Normal(n) => parts.push(name_of(n, &shown)?),
                            Component::ParentDir => parts.push("..".to_string()),
                            Component::CurDir => {}
                            Component::RootDir | Component::Prefix(_) => {
                                return Err(key_err(
                                    &shown,
                                    format!(
                                        "symlink to the absolute path {} (only links inside {} are followed)",
                                        target.display(),
                                        self.path.display()
                                    ),
                                ))
                            }
                        }
                    }
                    for p in parts.into_iter().rev() {
                        pending.push_front(p);
                    }
                }
                // Not a link: a directory on the way, or the file.
                Err(Errno::EINVAL) => {
                    if pending.is_empty() {
                        let bytes = read_file(&here, &part, &shown, secrecy)?;
                        return Ok(MountedFile { bytes, dir });
                    }
                    dir.push(part);
                }
                Err(Errno::ENOENT) => return Err(key_err(&shown, "not found")),
                Err(e) => return Err(ProvenanceError::io(&shown, e.into())),
            }
        }
        // The name resolved to a directory (a link to `.` or to `..data` itself).
        Err(key_err(&self.shown(&dir, None), "not a regular file"))
    }
}

fn name_of(name: &OsStr, shown: &Path) -> Result<String, ProvenanceError> {
    std::str::from_utf8(name.as_bytes())
        .map(str::to_string)
        .map_err(|_| key_err(shown, "symlink target is not UTF-8"))
}

/// Opens `name` in `dir` without following a link, checks it and reads it, bounded.
fn read_file(
    dir: &OwnedFd,
    name: &str,
    shown: &Path,
    secrecy: Secrecy,
) -> Result<Vec<u8>, ProvenanceError> {
    // O_NONBLOCK: a fifo planted here must not hang the open.
    let fd = openat(
        dir.as_fd(),
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    )
    .map_err(|e| ProvenanceError::io(shown, e.into()))?;
    let stat = fstat(fd.as_fd()).map_err(|e| ProvenanceError::io(shown, e.into()))?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(key_err(shown, "not a regular file"));
    }
    if stat.st_uid != 0 {
        return Err(key_err(
            shown,
            format!("owned by uid {}, not root", stat.st_uid),
        ));
    }
    let mode = stat.st_mode & 0o7777;
    let (forbidden, what) = match secrecy {
        Secrecy::Public => (0o022, "lets others write it"),
        Secrecy::Private => (
            0o077,
            "lets others read the private key (a Secret volume needs defaultMode 0400 and no fsGroup)",
        ),
    };
    if mode & forbidden != 0 {
        return Err(key_err(shown, format!("mode {mode:04o} {what}")));
    }
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ProvenanceError::io(shown, e))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(key_err(
            shown,
            format!("larger than {MAX_FILE_BYTES} bytes"),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests;
