//! SHA-256 of files and whole trees, as recorded in link materials/products.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use nix::sys::stat::FileStat;

use crate::walk::{self, Entry, FileRef, Flow, Kind, WalkError, WalkOptions};
use crate::ProvenanceError;

/// Read buffer per hashing thread: large enough to amortise syscalls,
/// small enough that memory stays bounded whatever the file sizes.
const BUF_SIZE: usize = 256 * 1024;

/// Upper bound on hashing threads; hashing is I/O and memory-bandwidth bound
/// beyond a handful of cores.
const MAX_THREADS: usize = 8;

/// A batch of files for a hashing thread closes at this many bytes (by the
/// sizes the walk saw): hand-overs then cost a few wake-ups per megabyte,
/// not one per file, and the threads still finish within a millisecond or
/// so of each other.
const BATCH_BYTES: u64 = 1 << 20;

/// ... or at this many files ...
const BATCH_FILES: usize = 64;

/// ... or when it holds this many descriptors (directories its files are
/// named in, files already open), so that queued work holds few
/// descriptors whatever the shape of the tree.
const BATCH_FDS: usize = 4;

pub fn sha256_bytes(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// SHA-256 (hex) of the regular file at `path`, streamed. Refuses symlinks
/// (O_NOFOLLOW) and anything that is not a regular file.
pub fn sha256_file(path: &Path) -> Result<String, ProvenanceError> {
    let mut buf = vec![0u8; BUF_SIZE];
    hash_regular_file(path, &mut buf)
}

fn hash_regular_file(path: &Path, buf: &mut [u8]) -> Result<String, ProvenanceError> {
    let (mut f, meta) = open_regular(path)?;
    hash_open_file(&mut f, meta.len(), path, buf).map(hex::encode)
}

/// Open a regular file for hashing, refusing symlinks and special files.
fn open_regular(path: &Path) -> Result<(File, fs::Metadata), ProvenanceError> {
    // O_NONBLOCK so that a fifo swapped in after the walk cannot block the
    // open; the fstat below then rejects it.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| ProvenanceError::io(path, e))?;
    let meta = f.metadata().map_err(|e| ProvenanceError::io(path, e))?;
    if !meta.is_file() {
        return Err(special(path, meta.file_type()));
    }
    Ok((f, meta))
}

/// Stream `f` through SHA-256 with the caller's buffer (bounded memory).
/// `expected` is the size fstat reported: each read asks for one byte more
/// than is left, so a read returning less has reached the end and most files
/// take one read, not a second one to see EOF. A file that grew meanwhile
/// fills the request and is read on to its real end.
fn hash_open_file(
    f: &mut File,
    expected: u64,
    path: &Path,
    buf: &mut [u8],
) -> Result<[u8; 32], ProvenanceError> {
    let mut hasher = Sha256::new();
    let mut left = expected;
    let mut grew = false;
    loop {
        let want = if grew {
            buf.len()
        } else {
            usize::try_from(left.saturating_add(1))
                .unwrap_or(usize::MAX)
                .min(buf.len())
        };
        match f.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                if n < want {
                    break;
                }
                grew = grew || n as u64 > left;
                left = left.saturating_sub(n as u64);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ProvenanceError::io(path, e)),
        }
    }
    Ok(hasher.finalize().into())
}

fn special(path: &Path, ft: fs::FileType) -> ProvenanceError {
    let kind = if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_symlink() {
        "symlink"
    } else {
        "unknown type"
    };
    ProvenanceError::SpecialFile {
        path: path.to_path_buf(),
        kind,
    }
}

/// Map every regular file and symlink under `root` to its SHA-256 (hex).
///
/// Keys are paths relative to `root`, '/'-separated, without "./". Symlinks
/// are never followed: a symlink is recorded as an artifact whose digest is
/// the SHA-256 of its target path bytes. Directories are walked without
/// following symlinks; empty directories are not recorded (in-toto records
/// files only). What Kiln cannot record is an error naming its path (a
/// [`crate::walk::WalkError`]): a fifo, socket or device node, a name that is
/// not UTF-8 or holds a backslash, a path longer than PATH_MAX.
///
/// The tree must be quiescent (Kiln hashes a workspace only when every
/// process of the step is dead); files are still opened relative to their
/// directory with O_NOFOLLOW and checked to be the inode the walk saw, so a
/// concurrent swap yields an error, not a followed link.
pub fn hash_tree(root: &Path) -> Result<BTreeMap<String, String>, ProvenanceError> {
    hash_tree_within(root, WalkOptions::default())
}

/// [`hash_tree`] within the walk's limits (e.g. an entry budget), checked
/// while the tree is read.
pub fn hash_tree_within(
    root: &Path,
    options: WalkOptions,
) -> Result<BTreeMap<String, String>, ProvenanceError> {
    Ok(hash_tree_with(root, Mode::Kiln, options, None)?.tree)
}

/// The exclude patterns in-toto 3.1 applies when it records artifacts
/// without explicit excludes (`in_toto.settings.ARTIFACT_EXCLUDE_PATTERNS`),
/// as it does for an inspection's cwd.
pub const IN_TOTO_EXCLUDE_PATTERNS: [&str; 4] = ["*.link*", ".git", "*.pyc", "*~"];

/// True when a path component matches [`IN_TOTO_EXCLUDE_PATTERNS`]. The
/// patterns contain no '/', so under gitignore semantics each matches any
/// single component, and a matching directory excludes everything below it.
fn excluded_name(name: &str) -> bool {
    IN_TOTO_EXCLUDE_PATTERNS
        .iter()
        .any(|p| crate::fnmatch::fnmatch(p, name))
}

/// Record a directory the way `in-toto-verify` records an inspection's cwd
/// (`record_artifacts_as_dict(["."])` with the default excludes and
/// `follow_symlink_dirs=True`), as far as that is safe for downloaded,
/// untrusted files:
/// - paths matching [`IN_TOTO_EXCLUDE_PATTERNS`] are left out, excluded
///   directories are not descended into (as in-toto);
/// - a symlink to a regular file inside `root` is recorded under the
///   symlink's path with the digest of the file's content (as in-toto);
/// - in-toto follows every other symlink too (out of the directory, into
///   directories) and silently skips dangling symlinks and special files.
///   Here those are errors: an artifact outside the directory, or one that
///   cannot be hashed by content, is not something a verdict should cover.
///
/// The root itself must be a real directory, not a symlink.
pub fn hash_tree_as_in_toto(root: &Path) -> Result<BTreeMap<String, String>, ProvenanceError> {
    let canonical = fs::canonicalize(root).map_err(|e| ProvenanceError::io(root, e))?;
    Ok(hash_tree_with(
        root,
        Mode::InToto { root: &canonical },
        WalkOptions::default(),
        None,
    )?
    .tree)
}

/// How the walk treats excludes and symlinks.
#[derive(Clone, Copy)]
enum Mode<'a> {
    /// Kiln's link recording: everything, symlinks recorded by target path.
    Kiln,
    /// in-toto inspection recording; `root` is the canonical root.
    InToto { root: &'a Path },
}

/// A tree's hashes, with what a [`TreeHasher`] keeps for the next hash.
struct Hashed {
    tree: BTreeMap<String, String>,
    fresh: HashMap<FileKey, [u8; 32]>,
    stats: CacheStats,
}

/// Which digests a hash may take from a [`TreeHasher`]'s cache, and which of
/// the files it reads it may cache.
struct CachePolicy<'a> {
    cache: &'a HashMap<FileKey, [u8; 32]>,
    /// Files whose ctime is later than this (ns) are not cached (racy margin).
    cutoff: i128,
    cacheable: &'a (dyn Fn(u64) -> bool + Sync),
}

/// A regular file for a hashing thread.
enum Job {
    /// A file the walk saw, opened by the hashing thread relative to its
    /// directory (checked to be the inode the walk saw).
    Walked { file: FileRef, key: FileKey },
    /// A file already open: in in-toto mode, a symlink's target.
    Opened {
        rel: String,
        file: File,
        key: FileKey,
    },
}

/// Files handed to a hashing thread in one go.
#[derive(Default)]
struct Batch {
    jobs: Vec<Job>,
    bytes: u64,
    /// Descriptors the jobs hold (counted high: a directory seen again
    /// after another one counts twice).
    fds: usize,
}

impl Batch {
    fn push(&mut self, job: Job, size: u64) {
        let new_fd = match (&job, self.jobs.last()) {
            (Job::Walked { file, .. }, Some(Job::Walked { file: last, .. })) => {
                !file.same_dir(last)
            }
            _ => true,
        };
        self.fds += usize::from(new_fd);
        self.bytes = self.bytes.saturating_add(size);
        self.jobs.push(job);
    }

    fn is_full(&self) -> bool {
        self.bytes >= BATCH_BYTES || self.jobs.len() >= BATCH_FILES || self.fds >= BATCH_FDS
    }
}

/// Batches from the walk to the hashing threads. The walk waits while
/// `cap` batches are queued, so queued work (and the descriptors it holds)
/// stays bounded. Each side is woken only when it waits, the walk only once
/// half the queue has drained.
struct Queue {
    state: Mutex<QueueState>,
    /// Hashing threads wait here for a batch.
    work: Condvar,
    /// The walk waits here for room.
    room: Condvar,
    cap: usize,
}

struct QueueState {
    batches: VecDeque<Batch>,
    /// The walk is over: no batch will come.
    closed: bool,
    /// Hashing threads waiting on `work`.
    idle: usize,
    walk_waiting: bool,
    /// Hashing threads still running.
    workers: usize,
}

impl Queue {
    fn new(workers: usize) -> Self {
        Queue {
            state: Mutex::new(QueueState {
                batches: VecDeque::new(),
                closed: false,
                idle: 0,
                walk_waiting: false,
                workers,
            }),
            work: Condvar::new(),
            room: Condvar::new(),
            cap: workers * 2,
        }
    }

    /// Nothing is left inconsistent by a panic under the lock (each
    /// critical section is a few field updates), so a poisoned lock is
    /// used as it is.
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a batch, waiting for room; false when no hashing thread is
    /// left to take it.
    fn push(&self, batch: Batch) -> bool {
        let mut st = self.lock();
        while st.batches.len() >= self.cap && st.workers > 0 {
            st.walk_waiting = true;
            st = self.room.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        st.walk_waiting = false;
        if st.workers == 0 {
            return false;
        }
        st.batches.push_back(batch);
        if st.idle > 0 {
            self.work.notify_one();
        }
        true
    }

    /// The next batch, waiting for one; `None` once the walk is over and
    /// every batch taken.
    fn pop(&self) -> Option<Batch> {
        let mut st = self.lock();
        loop {
            if let Some(batch) = st.batches.pop_front() {
                if st.walk_waiting && st.batches.len() <= self.cap / 2 {
                    st.walk_waiting = false;
                    self.room.notify_one();
                }
                return Some(batch);
            }
            if st.closed {
                return None;
            }
            st.idle += 1;
            st = self.work.wait(st).unwrap_or_else(PoisonError::into_inner);
            st.idle -= 1;
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.work.notify_all();
    }

    fn worker_gone(&self) {
        self.lock().workers -= 1;
        self.room.notify_one();
    }
}

/// Closes the queue when the walk ends, however it ends (a panic too), so
/// that no hashing thread waits forever.
struct CloseOnDrop<'a>(&'a Queue);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Counts a hashing thread out when it ends, however it ends, so that the
/// walk never waits for room no thread will make.
struct WorkerGuard<'a>(&'a Queue);

impl Drop for WorkerGuard<'_> {
    fn drop(&mut self) {
        self.0.worker_gone();
    }
}

/// Threads a tree is hashed on: the CPUs this process may use, at most `MAX_THREADS`.
/// Asked once: std reads the cgroup's CPU quota files on every call.
fn hashing_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, MAX_THREADS)
    })
}

/// What a hashing thread found: the digest, and the key to cache it under.
type Done = (String, [u8; 32], Option<FileKey>);

/// Walk `root` with [`crate::walk`] and hash its regular files on up to
/// `MAX_THREADS` threads. The walk hands files over in batches of about a
/// megabyte ([`Batch`]) through a bounded queue; each hashing thread opens
/// a file relative to the directory the walk read it in, reads it into its
/// own buffer (one read for a file smaller than the buffer) and hashes it.
/// Open files and buffers stay bounded whatever the tree; what grows with
/// the tree is only the map of results. The first error stops the walk and
/// every thread.
fn hash_tree_with(
    root: &Path,
    mode: Mode<'_>,
    options: WalkOptions,
    policy: Option<&CachePolicy<'_>>,
) -> Result<Hashed, ProvenanceError> {
    let threads = hashing_threads();
    let queue = Queue::new(threads);
    let stop = AtomicBool::new(false);
    let first_error: Mutex<Option<ProvenanceError>> = Mutex::new(None);
    let fail = |e: ProvenanceError| {
        stop.store(true, Ordering::Relaxed);
        if let Ok(mut slot) = first_error.lock() {
            slot.get_or_insert(e);
        }
    };
    let mut tree = BTreeMap::new();
    let mut hits: Vec<(String, FileKey, [u8; 32])> = Vec::new();
    let mut done: Vec<Done> = Vec::new();
    let work = || {
        let _guard = WorkerGuard(&queue);
        let mut buf = vec![0u8; BUF_SIZE];
        let mut local = Vec::new();
        while let Some(batch) = queue.pop() {
            for job in batch.jobs {
                if stop.load(Ordering::Relaxed) {
                    break; // drain: the tree fails anyway
                }
                match hash_job(job, &mut buf, policy) {
                    Ok(d) => local.push(d),
                    Err(e) => fail(e),
                }
            }
        }
        local
    };
    std::thread::scope(|s| {
        // Threads start with the first full batch: a tree that fits in one batch (an
        // empty workspace, a step's few small files) is hashed here, without a spawn.
        let mut workers = Vec::new();
        let walked = {
            let _close = CloseOnDrop(&queue);
            let mut batch = Batch::default();
            crate::walk::walk(root, options, |entry: &Entry<'_>| {
                if stop.load(Ordering::Relaxed) {
                    return Err(ProvenanceError::Format("hashing stopped".into()));
                }
                let flow = visit(entry, root, mode, policy, &mut batch, &mut tree, &mut hits)?;
                if batch.is_full() {
                    if workers.is_empty() {
                        workers = (0..threads).map(|_| s.spawn(work)).collect();
                    }
                    if !queue.push(std::mem::take(&mut batch)) {
                        return Err(ProvenanceError::Format("hashing threads stopped".into()));
                    }
                }
                Ok(flow)
            })
            .and_then(|_| {
                if batch.jobs.is_empty() {
                    return Ok(());
                }
                if workers.is_empty() {
                    let mut buf = vec![0u8; BUF_SIZE];
                    for job in batch.jobs {
                        done.push(hash_job(job, &mut buf, policy)?);
                    }
                    return Ok(());
                }
                if !queue.push(batch) {
                    return Err(ProvenanceError::Format("hashing threads stopped".into()));
                }
                Ok(())
            })
        };
        if let Err(e) = walked {
            fail(e);
        }
        for worker in workers {
            match worker.join() {
                Ok(local) => done.extend(local),
                Err(_) => fail(ProvenanceError::Format("hashing thread panicked".into())),
            }
        }
    });
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    let mut stats = CacheStats {
        hits: hits.len(),
        ..Default::default()
    };
    let mut fresh = HashMap::with_capacity(hits.len() + done.len());
    for (rel, key, digest) in hits {
        fresh.insert(key, digest);
        tree.insert(rel, hex::encode(digest));
    }
    for (rel, digest, key) in done {
        stats.misses += 1;
        match key {
            Some(k) => {
                fresh.insert(k, digest);
            }
            None => stats.not_cached += 1,
        }
        tree.insert(rel, hex::encode(digest));
    }
    Ok(Hashed { tree, fresh, stats })
}

/// One entry of the walk: symlinks are recorded here, regular files are
/// taken from the cache or opened and queued for a hashing thread.
fn visit(
    entry: &Entry<'_>,
    root: &Path,
    mode: Mode<'_>,
    policy: Option<&CachePolicy<'_>>,
    batch: &mut Batch,
    tree: &mut BTreeMap<String, String>,
    hits: &mut Vec<(String, FileKey, [u8; 32])>,
) -> Result<Flow, ProvenanceError> {
    let rel = entry.path();
    if let Mode::InToto { .. } = mode {
        // Parents were checked on the way down, so the name is enough.
        let name = rel.rsplit('/').next().unwrap_or(rel);
        if excluded_name(name) {
            return Ok(Flow::Skip);
        }
    }
    match entry.kind() {
        Kind::Dir => {}
        Kind::Symlink => match mode {
            Mode::Kiln => {
                let target = entry.read_link()?;
                tree.insert(rel.to_string(), sha256_bytes(target.as_bytes()));
            }
            Mode::InToto { root: canonical } => {
                let target = resolve_inside(&root.join(rel), canonical)?;
                let (file, meta) = open_regular(&target)?;
                let job = Job::Opened {
                    rel: rel.to_string(),
                    file,
                    key: FileKey::of(&meta),
                };
                batch.push(job, meta.len());
            }
        },
        Kind::File => {
            let key = FileKey::from_stat(entry.stat());
            if let Some(digest) = policy.and_then(|p| p.cache.get(&key)) {
                hits.push((rel.to_string(), key, *digest));
                return Ok(Flow::Continue);
            }
            let job = Job::Walked {
                file: entry.file_ref(),
                key,
            };
            batch.push(job, key.size);
        }
    }
    Ok(Flow::Continue)
}

/// Open (if the walk did not) and hash one file; with a cache policy, say
/// whether its digest may be cached: only when it provably did not change
/// while it was read.
fn hash_job(
    job: Job,
    buf: &mut [u8],
    policy: Option<&CachePolicy<'_>>,
) -> Result<Done, ProvenanceError> {
    let (rel, mut file, size, key) = match job {
        Job::Walked { file: seen, key } => {
            let (file, st) = seen.open()?;
            let size = u64::try_from(st.st_size).unwrap_or(0);
            (seen.into_path(), file, size, key)
        }
        Job::Opened { rel, file, key } => (rel, file, key.size, key),
    };
    let read_error = |rel: &str, e: std::io::Error| -> ProvenanceError {
        WalkError::new(rel, walk::Problem::Read(e)).into()
    };
    let digest = hash_open_file(&mut file, size, Path::new(&rel), buf).map_err(|e| match e {
        ProvenanceError::Io { source, .. } => read_error(&rel, source),
        other => other,
    })?;
    let keep = match policy {
        None => None,
        Some(p) => {
            let after = file.metadata().map_err(|e| read_error(&rel, e))?;
            (key == FileKey::of(&after) && key.ctime_ns <= p.cutoff && (p.cacheable)(key.dev))
                .then_some(key)
        }
    };
    Ok((rel, digest, keep))
}

/// The regular file a symlink resolves to, which must be inside `root`
/// (canonical). The returned path is canonical, so hashing it with
/// O_NOFOLLOW cannot be redirected by a symlink in its last component.
fn resolve_inside(link: &Path, root: &Path) -> Result<PathBuf, ProvenanceError> {
    let refuse = |detail: String| ProvenanceError::Symlink {
        path: link.to_path_buf(),
        detail,
    };
    let target = fs::canonicalize(link).map_err(|e| {
        refuse(format!(
            "cannot be resolved ({e}); in-toto would skip it, Kiln refuses what it cannot hash"
        ))
    })?;
    if !target.starts_with(root) {
        return Err(refuse(format!(
            "points outside the directory (to {}); Kiln does not follow it",
            target.display()
        )));
    }
    let meta = fs::metadata(&target).map_err(|e| ProvenanceError::io(&target, e))?;
    if !meta.is_file() {
        return Err(refuse(format!(
            "points to {}, which is not a regular file; Kiln only follows symlinks to files",
            target.display()
        )));
    }
    Ok(target)
}

/// Identity of a file's content as the kernel reports it, without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileKey {
    fn from_stat(st: &FileStat) -> Self {
        FileKey {
            dev: st.st_dev,
            ino: st.st_ino,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime_ns: i128::from(st.st_mtime) * 1_000_000_000 + i128::from(st.st_mtime_nsec),
            ctime_ns: i128::from(st.st_ctime) * 1_000_000_000 + i128::from(st.st_ctime_nsec),
        }
    }

    fn of(meta: &fs::Metadata) -> Self {
        FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }
}

/// Filesystems whose files may be cached by [`TreeHasher`]: local
/// filesystems that update mtime/ctime on every way of changing content,
/// including the first write through a shared mapping to each page
/// (`page_mkwrite` calls `file_update_time`). tmpfs is NOT one of them:
/// measured on Linux 6.18, a page read through a `MAP_SHARED` mapping and
/// then written changes the file with ctime and mtime unchanged. overlayfs,
/// FUSE and network filesystems report times their backend controls.
pub const CACHEABLE_FILESYSTEMS: [&str; 3] = ["ext4", "xfs", "btrfs"];

/// A file whose ctime is this close to (or after) the start of a hash is
/// not cached: the kernel stamps ctime from a coarse clock that lags the
/// fine clock by up to one tick (10 ms at HZ=100), so a write made after
/// the read could otherwise carry the same ctime as the cached entry (git's
/// "racy clean" problem). The margin also covers a backward clock step
/// smaller than [`CLOCK_STEP_TOLERANCE_NS`].
const RACY_MARGIN_NS: i128 = 20_000_000;

/// A backward step of the realtime clock (relative to the monotonic clock)
/// larger than this between two hashes empties the cache.
const CLOCK_STEP_TOLERANCE_NS: i128 = 1_000_000;

/// Counters of the last [`TreeHasher::hash_tree`] call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Regular files whose digest came from the cache (not read).
    pub hits: usize,
    /// Regular files read and hashed.
    pub misses: usize,
    /// Of the misses, files that were not cached afterwards (filesystem not
    /// in [`CACHEABLE_FILESYSTEMS`], changed while read, or too recent).
    pub not_cached: usize,
}

/// Tree hashing with a cache, for hashing one workspace before and after
/// every step: a regular file whose (device, inode, size, mtime ns, ctime ns)
/// is unchanged since the previous hash is not read again. Output is
/// identical to [`hash_tree`] (same walk, same errors, symlinks recorded by
/// target path); reading stays parallel and streaming with bounded memory.
///
/// Why the key is safe against a step that edits a file and resets its
/// mtime (e.g. `touch -d`, `utimensat`, `File::set_times`):
/// - ctime cannot be set from user space. Every content change (write,
///   truncate, fallocate, copy_file_range/clone, the first write through a
///   shared mapping on the filesystems in [`CACHEABLE_FILESYSTEMS`]) and
///   every `utimensat` sets ctime to the current time, so resetting mtime
///   itself moves ctime forward and the key misses.
/// - The only way to put ctime back is to move the clock back, and a step
///   cannot: `settimeofday`/`clock_settime`/`adjtimex` need CAP_SYS_TIME in
///   the initial user namespace, which a step (unprivileged uid, own user
///   namespace) never has, and Kiln's seccomp filter denies them anyway. A
///   backward step of the host clock itself is detected (the realtime clock
///   is compared with the monotonic one between hashes) and empties the
///   cache.
/// - Writes landing in the same coarse clock tick as the cached ctime are
///   excluded by not caching files whose ctime is within [`RACY_MARGIN_NS`]
///   of the start of the hash.
/// - Inode reuse (delete, recreate with the same inode number and size)
///   gets the creation time as ctime, later than the cached one; the device
///   number separates filesystems.
/// - Other ways around ctime need privileges a step lacks: writing the
///   block device, debugfs, XFS "invisible I/O" by handle (CAP_SYS_ADMIN).
/// - Filesystems where a write can leave ctime alone (tmpfs via mmap) or
///   whose times come from elsewhere are never cached: the filesystem type
///   of each device is read from `/proc/self/mountinfo`; when it cannot be
///   determined, nothing is cached.
///
/// Entries of files absent from the latest hash are dropped, so memory is
/// bounded by the size of the tree. Use one `TreeHasher` per workspace.
#[derive(Debug)]
pub struct TreeHasher {
    cache: HashMap<FileKey, [u8; 32]>,
    /// Monotonic origin for the clock-step check.
    origin: Instant,
    /// realtime - monotonic (ns) at the previous hash.
    clock_offset: Option<i128>,
    stats: CacheStats,
    /// Tests on a tmpfs /tmp still need to exercise the cache.
    trust_all_filesystems: bool,
}

impl Default for TreeHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl TreeHasher {
    pub fn new() -> Self {
        TreeHasher {
            cache: HashMap::new(),
            origin: Instant::now(),
            clock_offset: None,
            stats: CacheStats::default(),
            trust_all_filesystems: false,
        }
    }

    /// Counters of the last [`TreeHasher::hash_tree`] call.
    pub fn last_stats(&self) -> CacheStats {
        self.stats
    }

    /// Number of cached files.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    pub fn clear(&mut self) {
        self.cache.clear();
    }

    /// Same result as [`hash_tree`]; unchanged regular files come from the cache.
    pub fn hash_tree(&mut self, root: &Path) -> Result<BTreeMap<String, String>, ProvenanceError> {
        let (now_ns, offset) = self.clock_sample();
        if let Some(prev) = self.clock_offset {
            if offset < prev - CLOCK_STEP_TOLERANCE_NS {
                // The realtime clock stepped back: ctimes may repeat.
                self.cache.clear();
            }
        }
        self.clock_offset = Some(offset);
        let cutoff = now_ns - RACY_MARGIN_NS;

        let cacheable_devs = if self.trust_all_filesystems {
            None
        } else {
            Some(cacheable_devices())
        };
        let cacheable = |dev: u64| match &cacheable_devs {
            None => true,
            Some(devs) => devs.get(&dev).copied().unwrap_or(false),
        };
        let policy = CachePolicy {
            cache: &self.cache,
            cutoff,
            cacheable: &cacheable,
        };
        let hashed = hash_tree_with(root, Mode::Kiln, WalkOptions::default(), Some(&policy))?;
        // Only files seen in this tree stay cached: memory follows the tree.
        self.cache = hashed.fresh;
        self.stats = hashed.stats;
        Ok(hashed.tree)
    }

    /// (realtime ns since the epoch, realtime - monotonic ns).
    fn clock_sample(&self) -> (i128, i128) {
        let mono = nanos_i128(self.origin.elapsed());
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(nanos_i128)
            .unwrap_or(0);
        (real, real - mono)
    }
}

/// A duration in ns as `i128`. Every `Duration` is below 2^94 ns, so the
/// saturation is never reached; it only spares a cast.
fn nanos_i128(d: Duration) -> i128 {
    i128::try_from(d.as_nanos()).unwrap_or(i128::MAX)
}

/// Device numbers (as in `st_dev`) of mounted filesystems, mapped to whether
/// their type is in [`CACHEABLE_FILESYSTEMS`], from `/proc/self/mountinfo`.
/// Empty when it cannot be read: then nothing is cached.
fn cacheable_devices() -> HashMap<u64, bool> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return HashMap::new();
    };
    parse_mountinfo(&text)
}

fn parse_mountinfo(text: &str) -> HashMap<u64, bool> {
    let mut devs: HashMap<u64, bool> = HashMap::new();
    for line in text.lines() {
        // "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw"
        let mut fields = line.split(' ');
        let Some(majmin) = fields.nth(2) else {
            continue;
        };
        let Some(fstype) = line.split(" - ").nth(1).and_then(|r| r.split(' ').next()) else {
            continue;
        };
        let Some((maj, min)) = majmin.split_once(':') else {
            continue;
        };
        let (Ok(maj), Ok(min)) = (maj.parse::<u64>(), min.parse::<u64>()) else {
            continue;
        };
        let ok = CACHEABLE_FILESYSTEMS.contains(&fstype);
        // One device mounted twice with different types cannot happen; if a
        // parse ever says so, distrust it.
        let entry = devs.entry(makedev(maj, min)).or_insert(ok);
        *entry &= ok;
    }
    devs
}

/// glibc's `makedev`: the `st_dev` encoding of major:minor.
fn makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xffff_f000) << 32)
        | ((major & 0x0000_0fff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0x0000_00ff)
}
#[cfg(test)]
mod tests;
