//! Applies image layers (tar streams, already decompressed) in order onto a fresh tree that
//! no entry can leave.
//!
//! - Every name is cleaned lexically (`.` dropped, `..` never above the root, a leading
//!   `/` ignored), and its parent directory is opened with openat2 `RESOLVE_IN_ROOT |
//!   RESOLVE_NO_MAGICLINKS` from the tree's root: a symlink in a parent, absolute or with
//!   `..`, resolves inside the tree, never through the host. The last component is then
//!   created relative to that directory fd and never followed (`O_NOFOLLOW`, `O_EXCL`).
//! - Whiteouts (`.wh.NAME`) remove NAME of lower layers, opaque markers (`.wh..wh..opq`)
//!   every lower-layer entry of their directory, as the OCI layer spec says; removal walks
//!   directory fds and never follows a symlink.
//! - A hard link must name an existing non-directory entry of the tree (resolved inside
//!   it): a tree can never hold a host file's inode.
//! - Device nodes, FIFOs and other special entries are skipped and reported; setuid,
//!   setgid and sticky bits are dropped, and so is write permission for group and other
//!   (the stored tree is reachable by every host user); owners are not kept (the tree
//!   belongs to root, and steps read it through the "other" permission bits); extended
//!   attributes (file capabilities included) are never written.
//! - [`Limits`] bound the bytes written, the entries and the metadata read between two
//!   entries (long names, PAX records), so a decompression bomb fails quickly with a
//!   clear error; [`MAX_PATH_BYTES`] bounds every name and link target, and the path
//!   where each entry lies in the tree, whatever symlinks its name went through.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::rc::Rc;

use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{linkat, symlinkat};

/// The longest entry name or link target, in bytes (Linux's PATH_MAX).
pub const MAX_PATH_BYTES: usize = 4096;
/// Metadata a layer may hold for one entry (headers, long names, PAX records): beyond it
/// the layer is refused before the tar reader buffers more.
pub const MAX_ENTRY_METADATA_BYTES: u64 = 1 << 20;
/// The paths of all entries together, per entry the import may hold (256 MiB at the
/// default entry limit; real images average well under 128 bytes).
const PATH_BYTES_PER_ENTRY: u64 = 512;
/// Skipped entries named in the report; more are only counted.
const MAX_REPORTED: usize = 100;
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const WHITEOUT_PREFIX: &[u8] = b".wh.";

/// What one import may unpack, over all its layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of file content written.
    pub max_bytes: u64,
    /// Entries of every layer together (files, directories, links, whiteouts, skipped).
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 8 << 30,
            max_entries: 500_000,
        }
    }
}

impl Limits {
    /// The bytes the paths of all entries may add up to: the per-job re-hash of the
    /// tree holds every path, so this bounds what it holds.
    pub fn max_path_bytes(&self) -> u64 {
        self.max_entries.saturating_mul(PATH_BYTES_PER_ENTRY)
    }

    /// The decompressed bytes all layers may add up to: the content, and per entry its
    /// metadata and padding.
    pub fn max_stream_bytes(&self) -> u64 {
        self.max_bytes
            .saturating_add(self.max_entries.saturating_mul(4096))
            .saturating_add(MAX_ENTRY_METADATA_BYTES)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("{path}: {reason}")]
    Entry { path: String, reason: String },
    #[error("more than {0} entries (the import's entry limit)")]
    TooManyEntries(u64),
    #[error("{path}: the layers hold more than {limit} bytes of files (the import's size limit)")]
    TooLarge { path: String, limit: u64 },
    #[error("the paths of the tree's entries add up to more than {0} bytes")]
    PathsTooLarge(u64),
    #[error("the layers decompress to more than {0} bytes")]
    StreamTooLarge(u64),
    #[error("an entry's metadata (long name or PAX records) is larger than {MAX_ENTRY_METADATA_BYTES} bytes")]
    MetadataTooLarge,
    #[error("reading the layer: {0}")]
    Read(io::Error),
}

/// What was unpacked, and what was left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub bytes: u64,
    pub entries: u64,
    /// `path (kind)` of skipped entries, the first [`MAX_REPORTED`].
    pub skipped: Vec<String>,
    pub skipped_count: u64,
}

/// The budget a layer's reader draws on: the whole stream, and the metadata before the
/// next entry.
#[derive(Debug)]
struct Meter {
    stream_left: Cell<u64>,
    stream_limit: u64,
    entry_left: Cell<u64>,
    /// Which budget ran out, for the error message (the tar reader wraps the io error).
    exceeded: Cell<Option<Budget>>,
}

#[derive(Debug, Clone, Copy)]
enum Budget {
    Stream,
    EntryMetadata,
}

/// A reader that fails once the meter's budget is spent.
pub struct Metered<R> {
    inner: R,
    meter: Rc<Meter>,
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (stream, entry) = (self.meter.stream_left.get(), self.meter.entry_left.get());
        if stream == 0 || entry == 0 {
            // One byte more than the budget tells a stream that ends exactly at it (all
            // fine) from one that goes on.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            self.meter.exceeded.set(Some(if stream == 0 {
                Budget::Stream
            } else {
                Budget::EntryMetadata
            }));
            return Err(io::Error::other("unpack limit reached"));
        }
        let cap = usize::try_from(stream.min(entry)).unwrap_or(usize::MAX);
        let len = buf.len().min(cap);
        let n = self.inner.read(&mut buf[..len])?;
        let n64 = n as u64;
        self.meter.stream_left.set(stream - n64);
        self.meter.entry_left.set(entry - n64);
        Ok(n)
    }
}

/// An entry's kind, for the skip report.
fn kind_name(kind: tar::EntryType) -> String {
    match kind {
        tar::EntryType::Char => "character device".into(),
        tar::EntryType::Block => "block device".into(),
        tar::EntryType::Fifo => "FIFO".into(),
        other => format!("entry type {:?}", char::from(other.as_byte())),
    }
}

/// Layers applied in order onto one tree.
pub struct Unpacker {
    root: OwnedFd,
    limits: Limits,
    meter: Rc<Meter>,
    report: Report,
    /// Inodes the current layer created: an opaque marker or whiteout removes only
    /// entries of lower layers.
    this_layer: HashSet<(u64, u64)>,
    /// The length of each directory's path in the tree (the root's is 0), by inode.
    /// Names through symlinks to deep directories could otherwise build paths far longer
    /// than any name: a tree too deep for whatever walks it recursively (removing it,
    /// for one) and too large for the per-job re-hash, which holds every path.
    dir_paths: HashMap<(u64, u64), usize>,
    /// The lengths of the paths of every entry made so far, added up.
    path_bytes: u64,
}

impl Unpacker {
    /// Starts on `root`, an empty directory the caller made.
    pub fn new(root: &Path, limits: Limits) -> Result<Self, UnpackError> {
        let root = nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| entry_error("/", "opening the tree", e))?;
        let stream_limit = limits.max_stream_bytes();
        let stat = fstat(root.as_fd()).map_err(|e| entry_error("/", "reading the tree", e))?;
        Ok(Self {
            root,
            limits,
            meter: Rc::new(Meter {
                stream_left: Cell::new(stream_limit),
                stream_limit,
                entry_left: Cell::new(MAX_ENTRY_METADATA_BYTES),
                exceeded: Cell::new(None),
            }),
            report: Report::default(),
            this_layer: HashSet::new(),
            dir_paths: HashMap::from([((stat.st_dev, stat.st_ino), 0)]),
            path_bytes: 0,
        })
    }

    /// Wraps a layer's decompressed stream in this import's budget; pass the result to
    /// [`Unpacker::apply_layer`].
    pub fn meter<R: Read>(&self, layer: R) -> Metered<R> {
        self.meter.entry_left.set(MAX_ENTRY_METADATA_BYTES);
        Metered {
            inner: layer,
            meter: self.meter.clone(),
        }
    }

    pub fn report(&self) -> &Report {
        &self.report
    }

    /// Applies one layer. Reads until the tar stream's end marker; the caller drains the
    /// rest (it hashes the whole stream).
    pub fn apply_layer<R: Read>(&mut self, layer: &mut Metered<R>) -> Result<(), UnpackError> {
        self.this_layer.clear();
        let mut archive = tar::Archive::new(layer);
        let entries = archive.entries().map_err(|e| self.read_error(e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| self.read_error(e))?;
            self.report.entries += 1;
            if self.report.entries > self.limits.max_entries {
                return Err(UnpackError::TooManyEntries(self.limits.max_entries));
            }
            // Its data, then the next entry's metadata.
            self.meter.entry_left.set(
                entry
                    .size()
                    .saturating_add(1023)
                    .saturating_add(MAX_ENTRY_METADATA_BYTES),
            );
            let raw = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw).into_owned();
            if raw.len() > MAX_PATH_BYTES {
                return Err(entry_error(&shown, "name too long", Errno::ENAMETOOLONG));
            }
            self.apply_entry(&mut entry, &raw, &shown)?;
        }
        Ok(())
    }

    fn read_error(&self, err: io::Error) -> UnpackError {
        match self.meter.exceeded.take() {
            Some(Budget::Stream) => UnpackError::StreamTooLarge(self.meter.stream_limit),
            Some(Budget::EntryMetadata) => UnpackError::MetadataTooLarge,
            None => UnpackError::Read(err),
        }
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw: &[u8],
        shown: &str,
    ) -> Result<(), UnpackError> {
        let components = clean(raw);
        let Some((name, parents)) = components.split_last() else {
            // The root itself ("./"): it stays as made.
            return Ok(());
        };
        let name = OsStr::from_bytes(name);
        let kind = entry.header().entry_type();
        if let Some(target) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX) {
            return self.whiteout(parents, target, shown);
        }
        // No special bits, and no write bits for group or other: the stored tree is
        // reachable by every host user (steps read it through "other"), and a
        // world-writable directory there would let one change the image under a job.
        let mode = entry.header().mode().map_err(|e| self.read_error(e))? & 0o755;
        match kind {
            tar::EntryType::Directory => {
                let parent = self.parent(parents, shown)?;
                self.make_dir(&parent, name, mode, shown)
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let size = entry.size();
                if self.report.bytes.saturating_add(size) > self.limits.max_bytes {
                    return Err(UnpackError::TooLarge {
                        path: shown.into(),
                        limit: self.limits.max_bytes,
                    });
                }
                let parent = self.parent(parents, shown)?;
                self.path_len_in(&parent, name, shown)?;
                self.make_file(&parent, name, mode, entry, shown)
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| entry_error(shown, "symlink without a target", Errno::EINVAL))?
                    .into_owned();
                if target.is_empty() || target.len() > MAX_PATH_BYTES || target.contains(&0) {
                    return Err(entry_error(shown, "bad symlink target", Errno::EINVAL));
                }
                let parent = self.parent(parents, shown)?;
                self.path_len_in(&parent, name, shown)?;
                self.replace(&parent, name, false, shown)?;
                // The target is stored as it is: it is only ever resolved inside the
                // sandbox's root, and by this unpacker inside the tree.
                symlinkat(OsStr::from_bytes(&target), parent.as_fd(), name)
                    .map_err(|e| entry_error(shown, "creating the symlink", e))?;
                self.mark(&parent, name, shown)
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| entry_error(shown, "hard link without a target", Errno::EINVAL))?
                    .into_owned();
                self.hard_link(parents, name, &target, shown)
            }
            tar::EntryType::XGlobalHeader => Ok(()),
            other => {
                self.skip(shown, &kind_name(other));
                Ok(())
            }
        }
    }

    fn skip(&mut self, shown: &str, kind: &str) {
        self.report.skipped_count += 1;
        if self.report.skipped.len() < MAX_REPORTED {
            self.report.skipped.push(format!("{shown} ({kind})"));
        }
    }

    /// The directory of `components`, opened inside the tree (symlinks resolved within
    /// it); missing directories are created.
    fn parent(&mut self, components: &[&[u8]], shown: &str) -> Result<OwnedFd, UnpackError> {
        match self.open_in_root(components) {
            Err(Errno::ENOENT) => {}
            other => return other.map_err(|e| entry_error(shown, "opening its directory", e)),
        }
        let mut dir = self
            .root
            .try_clone()
            .map_err(|e| entry_error(shown, "opening the tree", errno_of(&e)))?;
        for i in 0..components.len() {
            match self.open_in_root(&components[..=i]) {
                Ok(next) => dir = next,
                Err(Errno::ENOENT) => {
                    let name = OsStr::from_bytes(components[i]);
                    let path_len = self.path_len_in(&dir, name, shown)?;
                    match mkdirat(dir.as_fd(), name, Mode::from_bits_truncate(0o755)) {
                        // EEXIST: a dangling symlink, which the next open refuses.
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(entry_error(shown, "creating its directory", e)),
                    }
                    dir = self
                        .open_in_root(&components[..=i])
                        .map_err(|e| entry_error(shown, "opening its directory", e))?;
                    self.record_dir(&dir, path_len, shown)?;
                }
                Err(e) => return Err(entry_error(shown, "opening its directory", e)),
            }
        }
        Ok(dir)
    }

    /// openat2 from the root with the root as `/`: nothing resolves outside.
    fn open_in_root(&self, components: &[&[u8]]) -> Result<OwnedFd, Errno> {
        if components.is_empty() {
            return self.root.try_clone().map_err(|e| errno_of(&e));
        }
        let path = components.join(&b'/');
        openat2(
            self.root.as_fd(),
            OsStr::from_bytes(&path),
            OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS),
        )
    }

    /// Clears the way for a new entry `name`: anything there goes, but a directory stays
    /// when the new entry is one too (their contents merge).
    fn replace(
        &self,
        parent: &OwnedFd,
        name: &OsStr,
        keep_dir: bool,
        shown: &str,
    ) -> Result<bool, UnpackError> {
        match fstatat(parent.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Err(Errno::ENOENT) => Ok(false),
            Err(e) => Err(entry_error(shown, "reading the entry it replaces", e)),
            Ok(stat) if keep_dir && is_dir(stat.st_mode) => Ok(true),
            Ok(_) => {
                remove_all(parent, name).map_err(|e| entry_error(shown, "replacing", e))?;
                Ok(false)
            }
        }
    }

    fn make_dir(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        mode: u32,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let path_len = self.path_len_in(parent, name, shown)?;
        let created = !self.replace(parent, name, true, shown)?;
        if created {
            mkdirat(parent.as_fd(), name, Mode::from_bits_truncate(0o700))
                .map_err(|e| entry_error(shown, "creating the directory", e))?;
        }
        let dir = openat(
            parent.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| entry_error(shown, "opening the directory", e))?;
        if created {
            self.record_dir(&dir, path_len, shown)?;
        }
        fchmod(dir.as_fd(), Mode::from_bits_truncate(mode))
            .map_err(|e| entry_error(shown, "setting its mode", e))?;
        self.mark_fd(&dir, shown)
    }

    fn make_file<R: Read>(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        mode: u32,
        entry: &mut tar::Entry<'_, R>,
        shown: &str,
    ) -> Result<(), UnpackError> {
        self.replace(parent, name, false, shown)?;
        let fd = openat(
            parent.as_fd(),
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| entry_error(shown, "creating the file", e))?;
        let mut file = File::from(fd);
        let left = self.limits.max_bytes - self.report.bytes;
        // One byte past the limit tells a lying header from an honest one.
        let written = io::copy(&mut entry.by_ref().take(left.saturating_add(1)), &mut file)
            .map_err(|e| self.read_error(e))?;
        if written > left {
            return Err(UnpackError::TooLarge {
                path: shown.into(),
                limit: self.limits.max_bytes,
            });
        }
        self.report.bytes += written;
        file.flush().map_err(|e| self.read_error(e))?;
        fchmod(file.as_fd(), Mode::from_bits_truncate(mode))
            .map_err(|e| entry_error(shown, "setting its mode", e))?;
        self.mark_fd(&OwnedFd::from(file), shown)
    }

    fn hard_link(
        &mut self,
        parents: &[&[u8]],
        name: &OsStr,
        target: &[u8],
        shown: &str,
    ) -> Result<(), UnpackError> {
        if target.len() > MAX_PATH_BYTES {
            return Err(entry_error(
                shown,
                "hard link target too long",
                Errno::ENAMETOOLONG,
            ));
        }
        let target_components = clean(target);
        let Some((target_name, target_parents)) = target_components.split_last() else {
            return Err(entry_error(shown, "hard link to the root", Errno::EPERM));
        };
        let mut own = parents.to_vec();
        own.push(name.as_bytes());
        if own == target_components {
            return Ok(());
        }
        let shown_target = String::from_utf8_lossy(target);
        let not_in_tree = |e| {
            entry_error(
                shown,
                &format!("hard link target {shown_target:?} is not an entry of the image"),
                e,
            )
        };
        let target_dir = self.open_in_root(target_parents).map_err(not_in_tree)?;
        let target_name = OsStr::from_bytes(target_name);
        let stat = fstatat(
            target_dir.as_fd(),
            target_name,
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(not_in_tree)?;
        if is_dir(stat.st_mode) {
            return Err(entry_error(shown, "hard link to a directory", Errno::EPERM));
        }
        let parent = self.parent(parents, shown)?;
        self.path_len_in(&parent, name, shown)?;
        self.replace(&parent, name, false, shown)?;
        // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
        linkat(
            target_dir.as_fd(),
            target_name,
            parent.as_fd(),
            name,
            AtFlags::empty(),
        )
        .map_err(not_in_tree)?;
        Ok(())
    }

    /// `.wh.NAME` removes NAME of a lower layer; `.wh..wh..opq` every lower-layer entry of
    /// its directory.
    fn whiteout(
        &mut self,
        parents: &[&[u8]],
        target: &[u8],
        shown: &str,
    ) -> Result<(), UnpackError> {
        let opaque = [WHITEOUT_PREFIX, target].concat() == OPAQUE_MARKER;
        if !opaque && target.starts_with(WHITEOUT_PREFIX) {
            // Other `.wh..wh.` names are aufs bookkeeping, not whiteouts.
            self.skip(shown, "aufs metadata");
            return Ok(());
        }
        if target.is_empty() || target == b"." || target == b".." {
            return Err(entry_error(
                shown,
                "not a whiteout of an entry",
                Errno::EINVAL,
            ));
        }
        let dir = match self.open_in_root(parents) {
            Ok(dir) => dir,
            // Nothing below to hide.
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(entry_error(shown, "opening its directory", e)),
        };
        if opaque {
            let dir =
                reopen_dir(&dir).map_err(|e| entry_error(shown, "opening its directory", e))?;
            return self
                .clear_lower(dir)
                .map_err(|e| entry_error(shown, "applying the opaque marker", e));
        }
        let name = OsStr::from_bytes(target);
        match fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(entry_error(shown, "reading what it hides", e)),
            Ok(stat) if self.this_layer.contains(&(stat.st_dev, stat.st_ino)) => Ok(()),
            Ok(_) => {
                remove_all(&dir, name).map_err(|e| entry_error(shown, "removing what it hides", e))
            }
        }
    }

    /// Removes what lower layers left in `dir`, keeping (and descending into) what this
    /// layer made.
    fn clear_lower(&self, dir: OwnedFd) -> Result<(), Errno> {
        for name in child_names(&dir)? {
            let stat = fstatat(dir.as_fd(), name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
            if !self.this_layer.contains(&(stat.st_dev, stat.st_ino)) {
                remove_all(&dir, &name)?;
            } else if is_dir(stat.st_mode) {
                let child = openat(
                    dir.as_fd(),
                    name.as_os_str(),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )?;
                self.clear_lower(child)?;
            }
        }
        Ok(())
    }

    /// The length of the path `name` in `parent` has in the tree; refused beyond
    /// [`MAX_PATH_BYTES`], and once all paths add up to more than the limits allow.
    fn path_len_in(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        shown: &str,
    ) -> Result<usize, UnpackError> {
        let stat =
            fstat(parent.as_fd()).map_err(|e| entry_error(shown, "reading its directory", e))?;
        // Every directory of the tree was made here and recorded; one that was not is
        // taken as too deep rather than guessed.
        let len = match self.dir_paths.get(&(stat.st_dev, stat.st_ino)) {
            Some(0) => name.len(),
            Some(parent_len) => parent_len.saturating_add(1 + name.len()),
            None => usize::MAX,
        };
        if len > MAX_PATH_BYTES {
            return Err(entry_error(
                shown,
                &format!("its path in the tree is longer than {MAX_PATH_BYTES} bytes"),
                Errno::ENAMETOOLONG,
            ));
        }
        self.path_bytes = self.path_bytes.saturating_add(len as u64);
        if self.path_bytes > self.limits.max_path_bytes() {
            return Err(UnpackError::PathsTooLarge(self.limits.max_path_bytes()));
        }
        Ok(len)
    }

    fn record_dir(
        &mut self,
        dir: &OwnedFd,
        path_len: usize,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let stat =
            fstat(dir.as_fd()).map_err(|e| entry_error(shown, "reading the directory", e))?;
        self.dir_paths.insert((stat.st_dev, stat.st_ino), path_len);
        Ok(())
    }

    fn mark(&mut self, parent: &OwnedFd, name: &OsStr, shown: &str) -> Result<(), UnpackError> {
        let stat = fstatat(parent.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| entry_error(shown, "reading the new entry", e))?;
        self.this_layer.insert((stat.st_dev, stat.st_ino));
        Ok(())
    }

    fn mark_fd(&mut self, fd: &OwnedFd, shown: &str) -> Result<(), UnpackError> {
        let stat = fstat(fd.as_fd()).map_err(|e| entry_error(shown, "reading the new entry", e))?;
        self.this_layer.insert((stat.st_dev, stat.st_ino));
        Ok(())
    }
}

/// A name's components: empty and `.` dropped, `..` going up but never above the root,
/// so `/x`, `../x` and `a/../../x` are all `x` of the tree.
fn clean(path: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    for component in path.split(|b| *b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn is_dir(mode: u32) -> bool {
    SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR
}

fn errno_of(err: &io::Error) -> Errno {
    Errno::from_raw(err.raw_os_error().unwrap_or(libc::EIO))
}

fn entry_error(path: &str, what: &str, err: Errno) -> UnpackError {
    UnpackError::Entry {
        path: path.into(),
        reason: format!("{what}: {}", err.desc()),
    }
}

mod dirfd;
use dirfd::{child_names, remove_all, reopen_dir};

#[cfg(test)]
mod tests;
