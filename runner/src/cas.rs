//! Content-addressed store: blobs named by their SHA-256, sharded by the first two
//! hex digits, written atomically (temp file, fsync, rename, fsync dir) so a crash
//! never leaves a blob whose content differs from its name.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Result, RunnerError};

pub const CHUNK_SIZE: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub struct ContentStore {
    root: PathBuf,
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
        // Blobs are clients' sources and outputs: root only (older stores were 0755).
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
            .map_err(RunnerError::io_path("chmod", &root))?;
        // Leftovers of uploads interrupted by a crash are never named blobs: drop them.
        if let Ok(entries) = fs::read_dir(root.join("tmp")) {
            for entry in entries.flatten() {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(Self { root })
    }

    pub fn path(&self, digest: &str) -> Result<PathBuf> {
        check_digest("digest", digest)?;
        Ok(self.root.join(&digest[..2]).join(digest))
    }

    pub fn contains(&self, digest: &str) -> Result<bool> {
        Ok(self.path(digest)?.is_file())
    }

    /// Starts a blob whose digest is checked when it is committed.
    pub fn writer(&self) -> Result<BlobWriter> {
        let tmp = tempfile::Builder::new()
            .prefix("upload-")
            .tempfile_in(self.root.join("tmp"))
            .map_err(RunnerError::io("creating an upload file"))?;
        Ok(BlobWriter {
            store: self.clone(),
            tmp,
            hasher: Sha256::new(),
            size: 0,
        })
    }

    pub fn put_bytes(&self, data: &[u8]) -> Result<String> {
        let mut w = self.writer()?;
        w.write(data)?;
        w.commit(None)
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

    pub fn read_all(&self, digest: &str) -> Result<Vec<u8>> {
        let path = self.path(digest)?;
        fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => RunnerError::NotFound(format!("blob {digest}")),
            _ => RunnerError::io_path("reading", &path)(e),
        })
    }

    pub fn open_blob(&self, digest: &str) -> Result<File> {
        let path = self.path(digest)?;
        File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => RunnerError::NotFound(format!("blob {digest}")),
            _ => RunnerError::io_path("opening", &path)(e),
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
        let actual = hex::encode(hasher.finalize());
        if actual != digest {
            return Err(RunnerError::Internal(format!(
                "content store blob {digest} is corrupt (content hashes to {actual})"
            )));
        }
        Ok(size)
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
}

impl BlobWriter {
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
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
        let digest = hex::encode(self.hasher.finalize());
        if let Some(expected) = expected {
            if expected != digest {
                return Err(RunnerError::DigestMismatch(format!(
                    "uploaded content hashes to {digest}, not the declared {expected}"
                )));
            }
        }
        let dest = self.store.path(&digest)?;
        if dest.is_file() {
            return Ok(digest);
        }
        let shard = dest
            .parent()
            .ok_or_else(|| RunnerError::Internal("blob path has no parent".into()))?;
        fs::create_dir_all(shard).map_err(RunnerError::io_path("creating", shard))?;
        self.tmp
            .as_file()
            .sync_all()
            .map_err(RunnerError::io("syncing an upload"))?;
        self.tmp
            .persist(&dest)
            .map_err(|e| RunnerError::io_path("storing", &dest)(e.error))?;
        sync_dir(shard)?;
        Ok(digest)
    }
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
}
