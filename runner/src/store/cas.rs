//! Content-addressed store: blobs named by their SHA-256, sharded by the first two
//! hex digits, written atomically (temp file, fsync, rename, fsync dir) so a crash
//! never leaves a blob whose content differs from its name.
//!
//! The disk can still change a blob under its name (bit rot, a truncation, an operator's
//! mistake). So nothing is served unchecked: reads hash what they return and fail on a
//! mismatch, presence checks hash a blob unless its file is unchanged since it was last
//! found intact, and a blob found corrupt is moved to `quarantine/` (and so is missing,
//! which makes clients upload it again, repairing it).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::error::{Result, RunnerError};

pub const CHUNK_SIZE: usize = 256 * 1024;

/// Blobs remembered as found intact; past this many the memory is dropped and blobs are
/// hashed again on their next presence check.
const MAX_VERIFIED: usize = 200_000;

#[derive(Debug, Clone)]
pub struct ContentStore {
    root: PathBuf,
    /// Blobs whose content was hashed and matched, with their file as it was then: the
    /// same file later (inode, size, times) holds the same bytes.
    verified: Arc<Mutex<HashMap<[u8; 32], FileStamp>>>,
    /// Serialises putting a file in place and moving one to quarantine, so a quarantine
    /// never moves away a blob just committed under the same name. Holds the blobs put
    /// in place whose directory is not synced yet: a writer of the same bytes meanwhile
    /// must sync it too before its caller relies on the blob.
    placing: Arc<Mutex<HashSet<String>>>,
    /// Free bytes of the state filesystem no blob may take: room left for the job
    /// database to record every state change and failure when the disk fills up.
    reserve: u64,
}

/// What identifies one version of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime().saturating_mul(1_000_000_000) + meta.mtime_nsec(),
            ctime_ns: meta.ctime().saturating_mul(1_000_000_000) + meta.ctime_nsec(),
        }
    }
}

/// What `verify_all` found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub intact: u64,
    pub bytes: u64,
    /// Blobs whose content did not match their name, now in quarantine.
    pub quarantined: Vec<String>,
    /// Files in the store that are not blobs (left alone).
    pub stray: u64,
}

/// A lower-case 64-hex-digit SHA-256; anything else is refused before it reaches a path.
pub fn check_digest(field: &str, digest: &str) -> Result<()> {
    if digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(RunnerError::invalid(
            field,
            format!("{digest:?} is not a lower-case hex SHA-256"),
        ))
    }
}

impl ContentStore {
    pub fn open(root: PathBuf) -> Result<Self> {
        fs::create_dir_all(root.join("tmp")).map_err(RunnerError::io_path("creating", &root))?;
        // Blobs are clients' sources and outputs: root only. Older stores were 0755 down
        // to the shards, where a host user's open directory would outlive the root's chmod.
        for dir in std::iter::once(root.clone()).chain(
            fs::read_dir(&root)
                .map_err(RunnerError::io_path("listing", &root))?
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        ) {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                .map_err(RunnerError::io_path("chmod", &dir))?;
        }
        // Leftovers of uploads interrupted by a crash are never named blobs: drop them.
        if let Ok(entries) = fs::read_dir(root.join("tmp")) {
            for entry in entries.flatten() {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(Self::attach(root))
    }

    /// The store at `root` as it is, for a check beside a running daemon: its uploads in
    /// progress are left alone.
    pub fn attach(root: PathBuf) -> Self {
        Self {
            root,
            verified: Default::default(),
            placing: Default::default(),
            reserve: 0,
        }
    }

    /// Keeps `bytes` of the filesystem free of blobs (see `reserve`).
    pub fn with_reserve(mut self, bytes: u64) -> Self {
        self.reserve = bytes;
        self
    }

    /// Refuses, as RESOURCE_EXHAUSTED, what would leave less than the reserve free.
    pub fn check_room(&self, incoming: u64) -> Result<()> {
        let Ok(stat) = nix::sys::statvfs::statvfs(&self.root) else {
            return Ok(());
        };
        let free = stat.blocks_available().saturating_mul(stat.fragment_size());
        if free < self.reserve.saturating_add(incoming) {
            return Err(RunnerError::ResourceExhausted(format!(
                "the runner's state disk is full: {} free, {} needed beyond the {} kept for job \
                 records; try again later",
                crate::units::format_size(free),
                crate::units::format_size(incoming),
                crate::units::format_size(self.reserve)
            )));
        }
        Ok(())
    }

    pub fn path(&self, digest: &str) -> Result<PathBuf> {
        check_digest("digest", digest)?;
        Ok(self.root.join(&digest[..2]).join(digest))
    }

    /// Whether the store holds the blob intact. A blob not known intact since its file
    /// last changed is hashed; one that does not match is quarantined and reported absent.
    pub fn contains(&self, digest: &str) -> Result<bool> {
        let path = self.path(digest)?;
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => meta,
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(RunnerError::io(format!("checking blob {digest}"))(e)),
        };
        if self.known_intact(digest, &FileStamp::of(&meta)) {
            return Ok(true);
        }
        let mut file = match self.open_blob(digest) {
            Ok(file) => file,
            Err(RunnerError::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK_SIZE];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(RunnerError::io(format!("reading blob {digest}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        match self.check(digest, &file, hasher) {
            Ok(()) => Ok(true),
            Err(RunnerError::Corrupt(_)) => Ok(false),
            Err(other) => Err(other),
        }
    }

    fn known_intact(&self, digest: &str, stamp: &FileStamp) -> bool {
        let Some(key) = digest_key(digest) else {
            return false;
        };
        self.verified
            .lock()
            .map(|v| v.get(&key) == Some(stamp))
            .unwrap_or(false)
    }

    fn remember_intact(&self, digest: &str, file: &File) {
        let (Some(key), Ok(meta)) = (digest_key(digest), file.metadata()) else {
            return;
        };
        if let Ok(mut verified) = self.verified.lock() {
            if verified.len() >= MAX_VERIFIED {
                verified.clear();
            }
            verified.insert(key, FileStamp::of(&meta));
        }
    }

    /// Compares what was read from `file` (hashed into `hasher`) with the blob's name:
    /// on a match the file is remembered intact; otherwise it is quarantined and the
    /// answer is `Corrupt`.
    fn check(&self, digest: &str, file: &File, hasher: Sha256) -> Result<()> {
        let actual = hex::encode(hasher.finalize());
        if actual == digest {
            self.remember_intact(digest, file);
            return Ok(());
        }
        self.quarantine(digest, file, &actual);
        Err(RunnerError::Corrupt(format!(
            "blob {digest} was corrupt in the content store; it was set aside and is missing \
             now (upload it again)"
        )))
    }

    /// Moves a corrupt blob out of the way (to `quarantine/`, for the operator to look
    /// at), if the file under its name is still the one found corrupt.
    fn quarantine(&self, digest: &str, file: &File, actual: &str) {
        let Ok(path) = self.path(digest) else {
            return;
        };
        let _placing = self.placing.lock();
        if let Some(key) = digest_key(digest) {
            if let Ok(mut verified) = self.verified.lock() {
                verified.remove(&key);
            }
        }
        let same_file = match (file.metadata(), fs::symlink_metadata(&path)) {
            (Ok(read), Ok(now)) => read.dev() == now.dev() && read.ino() == now.ino(),
            _ => false,
        };
        if !same_file {
            return;
        }
        let dir = self.root.join("quarantine");
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let target = dir.join(format!("{digest}.{stamp}"));
        match fs::create_dir_all(&dir).and_then(|()| fs::rename(&path, &target)) {
            Ok(()) => tracing::error!(
                blob = digest,
                content_hashes_to = actual,
                moved_to = %target.display(),
                "content store blob is corrupt; quarantined"
            ),
            Err(err) => tracing::error!(
                blob = digest,
                content_hashes_to = actual,
                error = %err,
                "content store blob is corrupt and could not be quarantined"
            ),
        }
    }

    /// Hashes every blob of the store, quarantining those that do not match their name.
    pub fn verify_all(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut shards: Vec<_> = fs::read_dir(&self.root)
            .map_err(RunnerError::io("listing the content store"))?
            .flatten()
            .collect();
        shards.sort_by_key(|e| e.file_name());
        for shard in shards {
            let name = shard.file_name();
            let name = name.to_string_lossy();
            if name == "tmp" || name == "quarantine" {
                continue;
            }
            let is_shard = name.len() == 2 && check_digest("", &format!("{name:0<64}")).is_ok();
            if !is_shard || !shard.file_type().is_ok_and(|t| t.is_dir()) {
                report.stray += 1;
                continue;
            }
            let mut blobs: Vec<_> = fs::read_dir(shard.path())
                .map_err(RunnerError::io("listing the content store"))?
                .flatten()
                .collect();
            blobs.sort_by_key(|e| e.file_name());
            for blob in blobs {
                let digest = blob.file_name().to_string_lossy().into_owned();
                if check_digest("", &digest).is_err()
                    || !digest.starts_with(name.as_ref())
                    || !blob.file_type().is_ok_and(|t| t.is_file())
                {
                    report.stray += 1;
                    continue;
                }
                match self.read_verified(&digest, |_| Ok(())) {
                    Ok(size) => {
                        report.intact += 1;
                        report.bytes += size;
                    }
                    Err(RunnerError::Corrupt(_)) => report.quarantined.push(digest),
                    Err(RunnerError::NotFound(_)) => {}
                    Err(other) => return Err(other),
                }
            }
        }
        Ok(report)
    }

    /// Reads a whole blob, handing each chunk to `sink`, and checks it at the end:
    /// a sink must not act on the data before this returns Ok.
    pub fn read_verified(
        &self,
        digest: &str,
        mut sink: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<u64> {
        let mut reader = self.reader(digest)?;
        while let Some(chunk) = reader.next_chunk()? {
            sink(&chunk)?;
        }
        Ok(reader.size)
    }

    /// A reader that hashes the blob as it goes and fails at the end on a mismatch.
    pub fn reader(&self, digest: &str) -> Result<VerifyingReader> {
        Ok(VerifyingReader {
            file: self.open_blob(digest)?,
            store: self.clone(),
            digest: digest.to_string(),
            hasher: Some(Sha256::new()),
            size: 0,
        })
    }

    /// Starts a blob whose digest is checked when it is committed.
    pub fn writer(&self) -> Result<BlobWriter> {
        self.check_room(0)?;
        let tmp = tempfile::Builder::new()
            .prefix("upload-")
            .tempfile_in(self.root.join("tmp"))
            .map_err(RunnerError::io("creating an upload file"))?;
        Ok(BlobWriter {
            store: self.clone(),
            tmp,
            hasher: Sha256::new(),
            size: 0,
            unchecked: 0,
        })
    }

    pub fn put_bytes(&self, data: &[u8]) -> Result<String> {
        let mut w = self.writer()?;
        w.write(data)?;
        w.commit(None)
    }

    /// Stores several blobs at once, each as [`Self::put_bytes`] does, with the
    /// directories synced after every rename: the first sync commits them all, so the
    /// disk is waited for about twice in all rather than twice per blob.
    pub fn put_all(&self, blobs: &[&[u8]]) -> Result<Vec<String>> {
        let mut writers = Vec::with_capacity(blobs.len());
        for data in blobs {
            let mut w = self.writer()?;
            w.write(data)?;
            writers.push(w);
        }
        let mut digests = Vec::with_capacity(writers.len());
        let mut shards = BTreeSet::new();
        for w in writers {
            let (digest, shard) = w.place(None)?;
            digests.push(digest);
            shards.extend(shard);
        }
        for shard in &shards {
            sync_dir(shard)?;
        }
        self.named_durably(&digests);
        Ok(digests)
    }

    /// Forgets blobs whose directory was synced since they were put in place.
    fn named_durably<D: AsRef<str>>(&self, digests: impl IntoIterator<Item = D>) {
        let mut placing = lock(&self.placing);
        for digest in digests {
            placing.remove(digest.as_ref());
        }
    }

    /// Copies a host file into the store, hashing what is read (never a second read).
    pub fn put_file(&self, path: &Path) -> Result<(String, u64)> {
        let mut file = open_no_follow(path)?;
        let mut w = self.writer()?;
        let mut buf = vec![0u8; CHUNK_SIZE];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(RunnerError::io_path("reading", path))?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n])?;
        }
        let size = w.size;
        Ok((w.commit(None)?, size))
    }

    /// A whole blob, checked against its digest.
    pub fn read_all(&self, digest: &str) -> Result<Vec<u8>> {
        let mut data = Vec::new();
        self.read_verified(digest, |chunk| {
            data.extend_from_slice(chunk);
            Ok(())
        })?;
        Ok(data)
    }

    fn open_blob(&self, digest: &str) -> Result<File> {
        let path = self.path(digest)?;
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => RunnerError::NotFound(format!("blob {digest}")),
                _ => RunnerError::io(format!("opening blob {digest}"))(e),
            })
    }

    /// Copies a blob to `dest` (a new file), checking its content against the digest
    /// on the way so a corrupted store never reaches a workspace unnoticed.
    pub fn copy_out(&self, digest: &str, dest: &Path, mode: u32) -> Result<u64> {
        let mut src = self.open_blob(digest)?;
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(dest)
            .map_err(RunnerError::io_path("creating", dest))?;
        // Exactly the asked mode, whatever the daemon's umask.
        out.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(RunnerError::io_path("chmod", dest))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK_SIZE];
        let mut size = 0u64;
        loop {
            let n = src
                .read(&mut buf)
                .map_err(RunnerError::io(format!("reading blob {digest}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(RunnerError::io_path("writing", dest))?;
            size += n as u64;
        }
        self.check(digest, &src, hasher)?;
        Ok(size)
    }
}

/// The 32 bytes of a hex digest, as the key of the intact-blob memory.
fn digest_key(digest: &str) -> Option<[u8; 32]> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(digest, &mut key).ok()?;
    Some(key)
}

/// Reads a blob in chunks, hashing them; after the last chunk, checks the digest.
pub struct VerifyingReader {
    file: File,
    store: ContentStore,
    digest: String,
    hasher: Option<Sha256>,
    size: u64,
}

impl VerifyingReader {
    /// The next chunk; `None` at the end, once the content matched its digest. On a
    /// mismatch the blob is quarantined and the end is a `Corrupt` error instead, so a
    /// caller that forwards chunks must keep the last one back until this says `None`.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>> {
        let Some(hasher) = self.hasher.as_mut() else {
            return Ok(None);
        };
        let mut buf = vec![0u8; CHUNK_SIZE];
        let n = loop {
            match self.file.read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(RunnerError::io(format!("reading blob {}", self.digest))(e)),
            }
        };
        if n > 0 {
            hasher.update(&buf[..n]);
            self.size += n as u64;
            buf.truncate(n);
            return Ok(Some(buf));
        }
        let Some(hasher) = self.hasher.take() else {
            return Ok(None);
        };
        self.store.check(&self.digest, &self.file, hasher)?;
        Ok(None)
    }
}

pub fn open_no_follow(path: &Path) -> Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(RunnerError::io_path("opening", path))
}

pub struct BlobWriter {
    store: ContentStore,
    tmp: tempfile::NamedTempFile,
    hasher: Sha256,
    size: u64,
    /// Bytes written since the disk's room was last checked.
    unchecked: u64,
}

/// How much a writer may write between two checks of the disk's room (a statvfs each):
/// a step's log arrives in small chunks, and the reserve is far larger than this.
const ROOM_CHECK_BYTES: u64 = 1 << 20;

impl BlobWriter {
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.unchecked += data.len() as u64;
        if self.unchecked >= ROOM_CHECK_BYTES {
            self.store.check_room(self.unchecked)?;
            self.unchecked = 0;
        }
        self.hasher.update(data);
        self.size += data.len() as u64;
        self.tmp
            .write_all(data)
            .map_err(RunnerError::io("writing an upload"))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Names the blob by the digest of what was written; refuses it if the caller
    /// declared another digest.
    pub fn commit(self, expected: Option<&str>) -> Result<String> {
        let store = self.store.clone();
        let (digest, shard) = self.place(expected)?;
        if let Some(shard) = shard {
            sync_dir(&shard)?;
            store.named_durably([&digest]);
        }
        Ok(digest)
    }

    /// [`Self::commit`] up to the directory's sync: answers the digest and the directory
    /// to sync before the blob is durable (none: it already is).
    fn place(self, expected: Option<&str>) -> Result<(String, Option<PathBuf>)> {
        let digest = hex::encode(self.hasher.finalize());
        if let Some(expected) = expected {
            if expected != digest {
                return Err(RunnerError::DigestMismatch(format!(
                    "uploaded content hashes to {digest}, not the declared {expected}"
                )));
            }
        }
        // A blob already stored is kept only if it is intact; a corrupt one is
        // quarantined by the check and replaced by these bytes, which repairs it.
        let dest = self.store.path(&digest)?;
        let shard = dest
            .parent()
            .ok_or_else(|| RunnerError::Internal("blob path has no parent".into()))?;
        if self.store.contains(&digest)? {
            // Its writer synced the file before naming it, but may not have synced the
            // name yet: then it is durable only once its directory is.
            let pending = lock(&self.store.placing).contains(&digest);
            return Ok((digest, pending.then(|| shard.to_path_buf())));
        }
        fs::create_dir_all(shard).map_err(RunnerError::io_path("creating", shard))?;
        self.tmp
            .as_file()
            .sync_all()
            .map_err(RunnerError::io("syncing an upload"))?;
        // Not remembered as intact here: most blobs (logs, links, outputs) are never
        // asked for again, and remembering each would grow the daemon with every job.
        let mut placing = lock(&self.store.placing);
        self.tmp
            .persist(&dest)
            .map_err(|e| RunnerError::io_path("storing", &dest)(e.error))?;
        placing.insert(digest.clone());
        drop(placing);
        Ok((digest, Some(shard.to_path_buf())))
    }
}

/// The set of names not yet synced; a panic while it was held leaves it usable (at
/// worst a name is synced again).
fn lock(placing: &Mutex<HashSet<String>>) -> std::sync::MutexGuard<'_, HashSet<String>> {
    placing.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(RunnerError::io_path("syncing", dir))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn put_all_stores_each_blob_and_leaves_no_name_unsynced() {
        let dir = tempfile::tempdir().unwrap();
        let cas = ContentStore::open(dir.path().join("cas")).unwrap();
        let earlier = cas.put_bytes(b"stored before").unwrap();
        let blobs: [&[u8]; 4] = [b"link", b"envelope", b"stored before", b"link"];
        let digests = cas.put_all(&blobs).unwrap();
        assert_eq!(digests.len(), 4);
        assert_eq!(digests[2], earlier);
        assert_eq!(digests[0], digests[3]);
        for (digest, data) in digests.iter().zip(blobs) {
            assert_eq!(cas.read_all(digest).unwrap(), data);
        }
        assert!(lock(&cas.placing).is_empty(), "every name was synced");
        // Nothing left in tmp/: every temporary file was renamed or removed.
        assert_eq!(fs::read_dir(cas.root.join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn a_writer_of_bytes_whose_name_is_not_synced_yet_syncs_it_too() {
        let dir = tempfile::tempdir().unwrap();
        let cas = ContentStore::open(dir.path().join("cas")).unwrap();
        let mut first = cas.writer().unwrap();
        first.write(b"same bytes").unwrap();
        // Put in place, its directory not synced yet (as between put_all's renames and
        // its syncs).
        let (digest, shard) = first.place(None).unwrap();
        assert!(shard.is_some());
        let mut second = cas.writer().unwrap();
        second.write(b"same bytes").unwrap();
        let (again, pending) = second.place(None).unwrap();
        assert_eq!(again, digest);
        assert_eq!(pending, shard, "the second writer must sync the name too");
        cas.named_durably([&digest]);
        let mut third = cas.writer().unwrap();
        third.write(b"same bytes").unwrap();
        assert_eq!(third.place(None).unwrap(), (digest, None));
    }

    #[test]
    fn stores_by_digest_and_refuses_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let cas = ContentStore::open(dir.path().join("cas")).unwrap();
        let digest = cas.put_bytes(b"hello").unwrap();
        assert_eq!(
            digest,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(cas.read_all(&digest).unwrap(), b"hello");
        let mut w = cas.writer().unwrap();
        w.write(b"hello!").unwrap();
        assert!(matches!(
            w.commit(Some(&digest)),
            Err(RunnerError::DigestMismatch(_))
        ));
        assert!(cas.path("../../etc/passwd").is_err());
        assert!(cas.path(&digest.to_uppercase()).is_err());
    }

    #[test]
    fn copy_out_detects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let cas = ContentStore::open(dir.path().join("cas")).unwrap();
        let digest = cas.put_bytes(b"payload").unwrap();
        fs::write(cas.path(&digest).unwrap(), b"tampered").unwrap();
        let err = cas
            .copy_out(&digest, &dir.path().join("out"), 0o644)
            .unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[test]
    fn a_corrupt_blob_is_quarantined_reported_missing_and_repaired_by_an_upload() {
        let dir = tempfile::tempdir().unwrap();
        let cas = ContentStore::open(dir.path().join("cas")).unwrap();
        let digest = cas.put_bytes(b"the real content").unwrap();
        assert!(cas.contains(&digest).unwrap());
        // Same length, other bytes: only hashing tells.
        fs::write(cas.path(&digest).unwrap(), b"the fake content").unwrap();
        let err = cas.read_all(&digest).unwrap_err();
        assert!(matches!(err, RunnerError::Corrupt(_)), "{err}");
        assert!(
            !err.to_string().contains(dir.path().to_str().unwrap()),
            "{err}"
        );
        assert!(!cas.contains(&digest).unwrap());
        assert_eq!(
            fs::read_dir(dir.path().join("cas/quarantine"))
                .unwrap()
                .count(),
            1
        );
        assert_eq!(cas.put_bytes(b"the real content").unwrap(), digest);
        assert_eq!(cas.read_all(&digest).unwrap(), b"the real content");
    }

    #[test]
    fn a_blob_changed_since_it_was_checked_is_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let cas = ContentStore::open(dir.path().join("cas")).unwrap();
        let digest = cas.put_bytes(b"0123456789").unwrap();
        assert!(cas.contains(&digest).unwrap());
        let file = fs::OpenOptions::new()
            .write(true)
            .open(cas.path(&digest).unwrap())
            .unwrap();
        file.set_len(3).unwrap();
        assert!(
            !cas.contains(&digest).unwrap(),
            "a truncated blob is present"
        );
        // An existing corrupt blob is replaced by a correct upload, not kept.
        fs::create_dir_all(cas.path(&digest).unwrap().parent().unwrap()).unwrap();
        fs::write(cas.path(&digest).unwrap(), b"012").unwrap();
        assert_eq!(cas.put_bytes(b"0123456789").unwrap(), digest);
        assert_eq!(fs::read(cas.path(&digest).unwrap()).unwrap(), b"0123456789");
    }

    #[test]
    fn the_reader_fails_at_the_end_and_verify_all_counts() {
        let dir = tempfile::tempdir().unwrap();
        let cas = ContentStore::open(dir.path().join("cas")).unwrap();
        let good = cas.put_bytes(&vec![7u8; CHUNK_SIZE + 10]).unwrap();
        let bad = cas.put_bytes(&vec![8u8; CHUNK_SIZE + 10]).unwrap();
        let mut tampered = vec![8u8; CHUNK_SIZE + 10];
        tampered[CHUNK_SIZE + 5] = 9;
        fs::write(cas.path(&bad).unwrap(), &tampered).unwrap();
        fs::write(dir.path().join("cas/stray.txt"), b"x").unwrap();
        let mut reader = cas.reader(&bad).unwrap();
        assert_eq!(reader.next_chunk().unwrap().unwrap().len(), CHUNK_SIZE);
        assert_eq!(reader.next_chunk().unwrap().unwrap().len(), 10);
        assert!(matches!(reader.next_chunk(), Err(RunnerError::Corrupt(_))));
        fs::write(cas.path(&bad).unwrap(), &tampered).unwrap();
        let report = cas.verify_all().unwrap();
        assert_eq!(report.intact, 1);
        assert_eq!(report.quarantined, vec![bad]);
        assert_eq!(report.stray, 1);
        assert!(cas.contains(&good).unwrap());
    }
}
