//! One walker for every tree Kiln reads: iterative (an explicit stack, never
//! recursion) and relative to directory file descriptors (`openat` with
//! `O_NOFOLLOW | O_DIRECTORY`, `fstatat` with `AT_SYMLINK_NOFOLLOW`), so that
//! no symlink is ever followed and no absolute path is ever formed: a tree
//! deeper than `PATH_MAX` is walked like any other.
//!
//! Memory and descriptors stay bounded whatever the tree: one descriptor for
//! the directory being read (the walk climbs back with `..`, checked against
//! the device and inode it came down from), and per directory on the current
//! path the sorted names still to visit. The entry budget is counted while
//! directories are read, so a tree over budget stops the walk before its
//! listing is built.
//!
//! The walker also decides what Kiln can record as an in-toto artifact and
//! refuses the rest with a [`WalkError`] naming the entry relative to the
//! root: names that are not UTF-8 or that contain a backslash (in-toto 3.1
//! rewrites `\` to `/` when it joins rule prefixes, so `in-toto-verify` and
//! Kiln would read such a name differently), paths longer than
//! [`MAX_PATH_BYTES`], and special files (fifos, sockets, devices).

use std::ffi::{CStr, CString, OsString};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};
use nix::unistd::{fchownat, Gid, Uid};

/// The longest relative path recorded: `PATH_MAX` less its NUL. A longer path
/// cannot be opened by name on Linux, so no consumer of the link could use it.
pub const MAX_PATH_BYTES: usize = 4095;

/// Messages show at most this much of a path (its head and tail).
const SHOWN_PATH_BYTES: usize = 200;

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// Limits of one walk.
#[derive(Debug, Clone, Copy, Default)]
pub struct WalkOptions {
    /// Most entries (files, directories, symlinks; the root not counted)
    /// the tree may hold; `None` for no limit.
    pub max_entries: Option<u64>,
    /// Most bytes the relative paths of all entries may add up to; `None` for
    /// no limit. A link lists every path, so this bounds its size.
    pub max_total_path_bytes: Option<u64>,
}

/// What an entry is. Special files never reach a visitor: they are errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

/// What the visitor wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on (into the entry, if it is a directory).
    Continue,
    /// Do not descend into this directory (ignored for other kinds).
    Skip,
}

/// One entry of the tree, as the visitor sees it.
pub struct Entry<'a> {
    path: &'a str,
    name: &'a CStr,
    parent: &'a Arc<OwnedFd>,
    kind: Kind,
    stat: &'a FileStat,
}

impl Entry<'_> {
    /// Path relative to the root, '/'-separated, UTF-8, at most [`MAX_PATH_BYTES`].
    pub fn path(&self) -> &str {
        self.path
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// `fstatat(AT_SYMLINK_NOFOLLOW)` of the entry.
    pub fn stat(&self) -> &FileStat {
        self.stat
    }

    /// Apparent size in bytes.
    pub fn size(&self) -> u64 {
        u64::try_from(self.stat.st_size).unwrap_or(0)
    }

    /// Permission bits (and setuid/setgid/sticky).
    pub fn mode(&self) -> u32 {
        self.stat.st_mode & 0o7777
    }

    /// Opens a regular file for reading, never following a symlink and never
    /// blocking on a fifo swapped in since the entry was read; the file must
    /// still be the inode the walk saw.
    pub fn open_file(&self) -> Result<File, WalkError> {
        open_seen(
            self.parent.as_fd(),
            self.name,
            self.path,
            identity(self.stat),
        )
        .map(|(f, _)| f)
    }

    /// The entry as a regular file to open later, on any thread: see
    /// [`FileRef`].
    pub fn file_ref(&self) -> FileRef {
        FileRef {
            dir: Arc::clone(self.parent),
            name: self.name.to_owned(),
            path: self.path.to_string(),
            identity: identity(self.stat),
        }
    }

    /// The target of a symlink, as bytes (never resolved).
    pub fn read_link(&self) -> Result<OsString, WalkError> {
        readlinkat(self.parent.as_fd(), self.name)
            .map_err(|e| WalkError::at(self.path, Problem::Io(e)))
    }

    /// Changes the entry's owner and group, never following a symlink.
    pub fn chown(&self, uid: u32, gid: u32) -> Result<(), WalkError> {
        fchownat(
            self.parent.as_fd(),
            self.name,
            Some(Uid::from_raw(uid)),
            Some(Gid::from_raw(gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| WalkError::at(self.path, Problem::Io(e)))
    }
}

/// A regular file the walk saw, to be opened after the walk has moved on,
/// possibly on another thread. It holds its directory open, so the name is
/// resolved in the directory the walk read (never through a path, whatever
/// was renamed above it since), and [`FileRef::open`] makes the same checks
/// as [`Entry::open_file`]: no symlink followed, no fifo blocking, and the
/// file must still be the inode the walk saw.
#[derive(Debug)]
pub struct FileRef {
    dir: Arc<OwnedFd>,
    name: CString,
    path: String,
    identity: (u64, u64),
}

impl FileRef {
    /// Path relative to the root, as [`Entry::path`].
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn into_path(self) -> String {
        self.path
    }

    /// True when both files are named in the same open directory.
    pub fn same_dir(&self, other: &FileRef) -> bool {
        Arc::ptr_eq(&self.dir, &other.dir)
    }

    /// Opens the file for reading; also returns its `fstat`, taken on the
    /// open descriptor.
    pub fn open(&self) -> Result<(File, FileStat), WalkError> {
        open_seen(self.dir.as_fd(), &self.name, &self.path, self.identity)
    }
}

/// Opens `name` in `dir` for reading, never following a symlink and never
/// blocking on a fifo; the file must be a regular file with the identity
/// (device, inode) the walk saw.
fn open_seen(
    dir: BorrowedFd<'_>,
    name: &CStr,
    path: &str,
    seen: (u64, u64),
) -> Result<(File, FileStat), WalkError> {
    let flags = OFlag::O_RDONLY
        | OFlag::O_NOFOLLOW
        | OFlag::O_NONBLOCK
        | OFlag::O_NOCTTY
        | OFlag::O_CLOEXEC;
    let fd =
        openat(dir, name, flags, Mode::empty()).map_err(|e| WalkError::at(path, Problem::Io(e)))?;
    let st = fstat(&fd).map_err(|e| WalkError::at(path, Problem::Io(e)))?;
    if file_kind(&st) != Ok(Kind::File) || identity(&st) != seen {
        return Err(WalkError::at(path, Problem::Changed));
    }
    Ok((File::from(fd), st))
}

/// Why a tree cannot be walked or recorded, naming the entry relative to the root.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.under("."))]
pub struct WalkError {
    /// Relative path of the entry ("" for the root or the tree as a whole),
    /// shortened to its head and tail when long.
    pub path: String,
    #[source]
    pub problem: Problem,
}

#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("{0}")]
    Io(Errno),
    #[error("the tree holds more than {limit} entries (files, directories and symlinks)")]
    TooManyEntries { limit: u64 },
    #[error("the paths in the tree add up to more than {limit} bytes")]
    PathsTooLong { limit: u64 },
    #[error("its path is {len} bytes long, more than the {MAX_PATH_BYTES} bytes (PATH_MAX) Kiln records")]
    PathTooLong { len: usize },
    #[error("the file name is not valid UTF-8")]
    NonUtf8Name,
    #[error("the file name contains a backslash, which in-toto 3.1 reads as '/': Kiln records only names every verifier reads the same")]
    Backslash,
    #[error("special file ({kind}) cannot be recorded as an artifact")]
    SpecialFile { kind: &'static str },
    #[error("changed while it was being read")]
    Changed,
    #[error("{0}")]
    Read(std::io::Error),
    #[error("not a directory")]
    NotADirectory,
}

impl WalkError {
    pub(crate) fn new(path: &str, problem: Problem) -> Self {
        Self::at(path, problem)
    }

    fn at(path: &str, problem: Problem) -> Self {
        WalkError {
            path: shorten(path),
            problem,
        }
    }

    /// The message with the path shown under `base` (e.g. "/workspace"), so a
    /// caller names the entry as its user sees it, never by a host path.
    pub fn under(&self, base: &str) -> String {
        if self.path.is_empty() {
            format!("{base}: {}", self.problem)
        } else {
            format!("{base}/{}: {}", self.path, self.problem)
        }
    }
}

/// A path for a message: long ones keep their head and tail.
fn shorten(path: &str) -> String {
    if path.len() <= SHOWN_PATH_BYTES {
        return path.to_string();
    }
    let half = SHOWN_PATH_BYTES / 2;
    let mut head = half;
    while !path.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = path.len() - half;
    while !path.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{}...{}", &path[..head], &path[tail..])
}

fn identity(st: &FileStat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

fn file_kind(st: &FileStat) -> Result<Kind, &'static str> {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => Ok(Kind::Dir),
        SFlag::S_IFREG => Ok(Kind::File),
        SFlag::S_IFLNK => Ok(Kind::Symlink),
        SFlag::S_IFIFO => Err("fifo"),
        SFlag::S_IFSOCK => Err("socket"),
        SFlag::S_IFBLK => Err("block device"),
        SFlag::S_IFCHR => Err("character device"),
        _ => Err("unknown type"),
    }
}

/// A directory on the current path: what is left to visit in it.
struct Frame {
    names: std::vec::IntoIter<CString>,
    identity: (u64, u64),
    /// Length of the path string before this directory's name was appended.
    restore_len: usize,
}

/// Walks the tree under `root` (a real directory, not a symlink), calling
/// `visit` for every entry in a depth-first, name-sorted order; the root
/// itself is not visited. Returns the number of entries read.
pub fn walk<E: From<WalkError>>(
    root: &Path,
    options: WalkOptions,
    visit: impl FnMut(&Entry<'_>) -> Result<Flow, E>,
) -> Result<u64, E> {
    let fd = nix::fcntl::open(root, DIR_FLAGS, Mode::empty()).map_err(|e| {
        let problem = match e {
            Errno::ENOTDIR | Errno::ELOOP => Problem::NotADirectory,
            other => Problem::Io(other),
        };
        WalkError::at("", problem)
    })?;
    walk_fd(fd, options, visit)
}

/// [`walk`] from an open directory.
pub fn walk_fd<E: From<WalkError>>(
    root: OwnedFd,
    options: WalkOptions,
    mut visit: impl FnMut(&Entry<'_>) -> Result<Flow, E>,
) -> Result<u64, E> {
    let mut count = 0u64;
    let mut path_bytes = 0u64;
    let mut path = String::new();
    let root_stat = fstat(&root).map_err(|e| WalkError::at("", Problem::Io(e)))?;
    if file_kind(&root_stat) != Ok(Kind::Dir) {
        return Err(WalkError::at("", Problem::NotADirectory).into());
    }
    // Shared, so that a [`FileRef`] can keep the directory open after the
    // walk has left it.
    let mut current = Arc::new(root);
    let mut stack = vec![Frame {
        names: read_names(&current, "", &mut count, options)?,
        identity: identity(&root_stat),
        restore_len: 0,
    }];
    while let Some(frame) = stack.last_mut() {
        let Some(name) = frame.names.next() else {
            let done = stack.pop();
            if let (Some(done), Some(parent)) = (done, stack.last()) {
                // Climb back by "..", which must be the directory we came from.
                let up = openat(&current, c"..", DIR_FLAGS, Mode::empty())
                    .map_err(|e| WalkError::at(&path, Problem::Io(e)))?;
                let st = fstat(&up).map_err(|e| WalkError::at(&path, Problem::Io(e)))?;
                if identity(&st) != parent.identity {
                    return Err(WalkError::at(&path, Problem::Changed).into());
                }
                current = Arc::new(up);
                path.truncate(done.restore_len);
            }
            continue;
        };
        let restore_len = path.len();
        let Ok(name_str) = name.to_str() else {
            let shown = String::from_utf8_lossy(name.to_bytes());
            return Err(WalkError::at(&join(&path, &shown), Problem::NonUtf8Name).into());
        };
        if !path.is_empty() {
            path.push('/');
        }
        path.push_str(name_str);
        if name_str.contains('\\') {
            return Err(WalkError::at(&path, Problem::Backslash).into());
        }
        if path.len() > MAX_PATH_BYTES {
            let len = path.len();
            return Err(WalkError::at(&path, Problem::PathTooLong { len }).into());
        }
        path_bytes = path_bytes.saturating_add(path.len() as u64);
        if let Some(limit) = options.max_total_path_bytes {
            if path_bytes > limit {
                return Err(WalkError::at("", Problem::PathsTooLong { limit }).into());
            }
        }
        let st = fstatat(&current, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| {
            let problem = match e {
                Errno::ENOENT => Problem::Changed,
                other => Problem::Io(other),
            };
            WalkError::at(&path, problem)
        })?;
        let kind =
            file_kind(&st).map_err(|kind| WalkError::at(&path, Problem::SpecialFile { kind }))?;
        let flow = visit(&Entry {
            path: &path,
            name: &name,
            parent: &current,
            kind,
            stat: &st,
        })?;
        if kind == Kind::Dir && flow == Flow::Continue {
            let child = openat(&current, name.as_c_str(), DIR_FLAGS, Mode::empty())
                .map_err(|e| WalkError::at(&path, Problem::Io(e)))?;
            let child_stat = fstat(&child).map_err(|e| WalkError::at(&path, Problem::Io(e)))?;
            if identity(&child_stat) != identity(&st) {
                return Err(WalkError::at(&path, Problem::Changed).into());
            }
            let names = read_names(&child, &path, &mut count, options)?;
            stack.push(Frame {
                names,
                identity: identity(&st),
                restore_len,
            });
            current = Arc::new(child);
        } else {
            path.truncate(restore_len);
        }
    }
    Ok(count)
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}/{name}")
    }
}

/// The names in a directory (without "." and ".."), sorted by bytes, counted
/// against the entry budget as they are read.
fn read_names(
    dir: &OwnedFd,
    path: &str,
    count: &mut u64,
    options: WalkOptions,
) -> Result<std::vec::IntoIter<CString>, WalkError> {
    // A fresh open file description: the stream's offset is its own.
    let mut stream = Dir::openat(dir, c".", DIR_FLAGS, Mode::empty())
        .map_err(|e| WalkError::at(path, Problem::Io(e)))?;
    let mut names = Vec::new();
    for entry in stream.iter() {
        let entry = entry.map_err(|e| WalkError::at(path, Problem::Io(e)))?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        *count += 1;
        if let Some(limit) = options.max_entries {
            if *count > limit {
                return Err(WalkError::at("", Problem::TooManyEntries { limit }));
            }
        }
        names.push(name.to_owned());
    }
    names.sort_unstable();
    Ok(names.into_iter())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::fs;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::symlink;

    fn list(root: &Path, options: WalkOptions) -> Result<Vec<(String, Kind)>, WalkError> {
        let mut seen = Vec::new();
        walk(root, options, |e: &Entry<'_>| {
            seen.push((e.path().to_string(), e.kind()));
            Ok::<_, WalkError>(Flow::Continue)
        })?;
        Ok(seen)
    }

    #[test]
    fn sorted_depth_first_and_symlinks_never_followed() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().join("ws");
        fs::create_dir_all(r.join("b/c")).unwrap();
        fs::write(r.join("a"), b"a").unwrap();
        fs::write(r.join("b/c/f"), b"f").unwrap();
        fs::create_dir(d.path().join("outside")).unwrap();
        fs::write(d.path().join("outside/secret"), b"s").unwrap();
        symlink("../outside", r.join("to-outside")).unwrap();
        symlink("b", r.join("b-link")).unwrap();
        let seen = list(&r, WalkOptions::default()).unwrap();
        assert_eq!(
            seen,
            [
                ("a".to_string(), Kind::File),
                ("b".to_string(), Kind::Dir),
                ("b/c".to_string(), Kind::Dir),
                ("b/c/f".to_string(), Kind::File),
                ("b-link".to_string(), Kind::Symlink),
                ("to-outside".to_string(), Kind::Symlink),
            ]
        );
        // A root that is a symlink is refused, not followed.
        let e = list(&d.path().join("ws/b-link"), WalkOptions::default()).unwrap_err();
        assert!(matches!(e.problem, Problem::NotADirectory), "{e}");
        // Opening a symlink entry as a file is refused too.
        walk(&r, WalkOptions::default(), |e: &Entry<'_>| {
            if e.kind() == Kind::Symlink {
                assert!(e.open_file().is_err());
                assert!(!e.read_link().unwrap().is_empty());
            }
            Ok::<_, WalkError>(Flow::Continue)
        })
        .unwrap();
    }

    #[test]
    fn skip_does_not_descend() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("x/y")).unwrap();
        fs::write(d.path().join("x/y/z"), b"").unwrap();
        let mut seen = Vec::new();
        walk(d.path(), WalkOptions::default(), |e: &Entry<'_>| {
            seen.push(e.path().to_string());
            Ok::<_, WalkError>(if e.path() == "x/y" {
                Flow::Skip
            } else {
                Flow::Continue
            })
        })
        .unwrap();
        assert_eq!(seen, ["x", "x/y"]);
    }

    /// A chain of directories `a/a/a/...` of `depth` levels, made by
    /// descending with openat (an absolute path would not fit PATH_MAX).
    fn deep_tree(root: &Path, depth: usize) {
        let mut fd = nix::fcntl::open(root, DIR_FLAGS, Mode::empty()).unwrap();
        for _ in 0..depth {
            nix::sys::stat::mkdirat(&fd, c"a", Mode::from_bits_truncate(0o755)).unwrap();
            fd = openat(&fd, c"a", DIR_FLAGS, Mode::empty()).unwrap();
        }
        let f = openat(
            &fd,
            c"leaf",
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        drop(f);
    }

    #[test]
    fn deeper_than_path_max_is_an_error_naming_the_path() {
        let d = tempfile::tempdir().unwrap();
        // 3000 levels: "a/" x 3000 is 6000 bytes, beyond PATH_MAX; the walk stops
        // at level 2049, whose path is 4097 bytes.
        deep_tree(d.path(), 3000);
        let e = list(d.path(), WalkOptions::default()).unwrap_err();
        assert!(
            matches!(e.problem, Problem::PathTooLong { len: 4097 }),
            "{e}"
        );
        let shown = e.under("/workspace");
        assert!(shown.starts_with("/workspace/a/a/a/"), "{shown}");
        assert!(shown.len() < 500, "{shown}");
        // Just within the limit, the whole tree is walked, leaf included.
        let d = tempfile::tempdir().unwrap();
        deep_tree(d.path(), 2045);
        let seen = list(d.path(), WalkOptions::default()).unwrap();
        assert_eq!(seen.len(), 2046);
        let (leaf, kind) = seen.last().unwrap();
        assert_eq!(*kind, Kind::File);
        assert_eq!(leaf.len(), 2045 * 2 + 4);
    }

    #[test]
    fn deep_walk_uses_a_bounded_number_of_descriptors() {
        let d = tempfile::tempdir().unwrap();
        deep_tree(d.path(), 2000);
        let mut most = 0;
        walk(d.path(), WalkOptions::default(), |_: &Entry<'_>| {
            most = most.max(fs::read_dir("/proc/self/fd").unwrap().count());
            Ok::<_, WalkError>(Flow::Continue)
        })
        .unwrap();
        // Other test threads open files too; a walk holding one fd per level
        // would hold some 2000.
        assert!(most < 200, "{most} descriptors open during the walk");
    }

    #[test]
    fn fifo_socket_non_utf8_and_backslash_are_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        nix::unistd::mkfifo(&d.path().join("sub/pipe"), Mode::from_bits_truncate(0o644)).unwrap();
        let e = list(d.path(), WalkOptions::default()).unwrap_err();
        assert!(
            matches!(e.problem, Problem::SpecialFile { kind: "fifo" }),
            "{e}"
        );
        assert_eq!(
            e.under("/workspace"),
            "/workspace/sub/pipe: special file (fifo) cannot be recorded as an artifact"
        );

        let d = tempfile::tempdir().unwrap();
        let name = std::ffi::OsStr::from_bytes(b"bad\xffname");
        fs::write(d.path().join(name), b"").unwrap();
        let e = list(d.path(), WalkOptions::default()).unwrap_err();
        assert!(matches!(e.problem, Problem::NonUtf8Name), "{e}");
        assert!(e.path.starts_with("bad"), "{e}");

        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("dir")).unwrap();
        fs::write(d.path().join("dir/back\\slash"), b"").unwrap();
        let e = list(d.path(), WalkOptions::default()).unwrap_err();
        assert!(matches!(e.problem, Problem::Backslash), "{e}");
        assert_eq!(e.path, "dir/back\\slash");

        let d = tempfile::tempdir().unwrap();
        let _l = std::os::unix::net::UnixListener::bind(d.path().join("sock")).unwrap();
        let e = list(d.path(), WalkOptions::default()).unwrap_err();
        assert!(
            matches!(e.problem, Problem::SpecialFile { kind: "socket" }),
            "{e}"
        );
    }

    #[test]
    fn entry_budget_stops_the_walk_while_reading() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("many")).unwrap();
        for i in 0..50 {
            fs::write(d.path().join(format!("many/{i}")), b"").unwrap();
        }
        let limit = |n| WalkOptions {
            max_entries: Some(n),
            ..Default::default()
        };
        // 51 entries: the directory and its 50 files.
        assert_eq!(list(d.path(), limit(51)).unwrap().len(), 51);
        let mut visited = 0;
        let e = walk(d.path(), limit(50), |_: &Entry<'_>| {
            visited += 1;
            Ok::<_, WalkError>(Flow::Continue)
        })
        .unwrap_err();
        assert!(
            matches!(e.problem, Problem::TooManyEntries { limit: 50 }),
            "{e}"
        );
        // Only the directory was visited: its listing went over budget.
        assert_eq!(visited, 1);
        // Paths: "many" (4) + "many/0".."many/9" (6 each) = 64 bytes.
        let paths = |n| WalkOptions {
            max_total_path_bytes: Some(n),
            ..Default::default()
        };
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("many")).unwrap();
        for i in 0..10 {
            fs::write(d.path().join(format!("many/{i}")), b"").unwrap();
        }
        assert_eq!(list(d.path(), paths(64)).unwrap().len(), 11);
        let e = list(d.path(), paths(63)).unwrap_err();
        assert!(
            matches!(e.problem, Problem::PathsTooLong { limit: 63 }),
            "{e}"
        );
    }

    #[test]
    fn file_ref_opens_in_the_directory_walked_and_never_follows_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().join("ws");
        fs::create_dir_all(r.join("sub")).unwrap();
        fs::write(r.join("sub/f"), b"seen").unwrap();
        fs::write(r.join("sub/g"), b"g").unwrap();
        fs::create_dir(d.path().join("decoy")).unwrap();
        fs::write(d.path().join("decoy/f"), b"decoy").unwrap();
        fs::write(d.path().join("secret"), b"secret").unwrap();
        let mut refs = Vec::new();
        walk(&r, WalkOptions::default(), |e: &Entry<'_>| {
            if e.kind() == Kind::File {
                refs.push(e.file_ref());
            }
            Ok::<_, WalkError>(Flow::Continue)
        })
        .unwrap();
        let [f, g] = &refs[..] else {
            panic!("{refs:?}")
        };
        assert_eq!((f.path(), g.path()), ("sub/f", "sub/g"));
        assert!(f.same_dir(g));
        // The walk is over and its directory renamed, a symlink put in its
        // place: the file is still read in the directory the walk saw.
        fs::rename(r.join("sub"), r.join("moved")).unwrap();
        symlink(d.path().join("decoy"), r.join("sub")).unwrap();
        let (mut file, st) = f.open().unwrap();
        let mut content = String::new();
        std::io::Read::read_to_string(&mut file, &mut content).unwrap();
        assert_eq!(content, "seen");
        assert_eq!(st.st_size, 4);
        // The name now a symlink (to a file outside): refused, not followed.
        fs::remove_file(r.join("moved/g")).unwrap();
        symlink("../../secret", r.join("moved/g")).unwrap();
        let e = g.open().unwrap_err();
        assert!(matches!(e.problem, Problem::Io(Errno::ELOOP)), "{e}");
        assert_eq!(e.path, "sub/g");
        // A fifo in its place: refused without blocking.
        fs::remove_file(r.join("moved/g")).unwrap();
        nix::unistd::mkfifo(&r.join("moved/g"), Mode::from_bits_truncate(0o644)).unwrap();
        let e = g.open().unwrap_err();
        assert!(matches!(e.problem, Problem::Changed), "{e}");
    }

    #[test]
    fn open_file_checks_the_inode_seen() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("f"), b"one").unwrap();
        walk(d.path(), WalkOptions::default(), |e: &Entry<'_>| {
            // Swap the file after it was stat'ed: the open must notice. (The
            // old inode stays linked, so its number cannot be reused.)
            fs::hard_link(d.path().join("f"), d.path().join("keep")).unwrap();
            fs::write(d.path().join("g"), b"two").unwrap();
            fs::rename(d.path().join("g"), d.path().join("f")).unwrap();
            let err = e.open_file().unwrap_err();
            assert!(matches!(err.problem, Problem::Changed), "{err}");
            Ok::<_, WalkError>(Flow::Continue)
        })
        .unwrap();
    }
}
