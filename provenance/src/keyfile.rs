//! Files of the key ring on disk: read only when the effective uid owns them (never
//! through a symlink), written atomically with the mode asked. Shared by the keys and
//! the key ring, which both keep private keys in files.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::ProvenanceError;

/// The effective uid, read without `unsafe` (no `geteuid` binding): the
/// second field of the `Uid:` line of `/proc/self/status`.
pub fn effective_uid() -> Result<u32, ProvenanceError> {
    let status = fs::read_to_string("/proc/self/status")
        .map_err(|e| ProvenanceError::io("/proc/self/status", e))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ProvenanceError::Key("cannot read the effective uid".into()))
}

/// The key directory: a real directory owned by us, writable by nobody else
/// (otherwise another user could swap the ring or the key file).
pub(crate) fn check_dir(dir: &Path) -> Result<(), ProvenanceError> {
    let meta = fs::symlink_metadata(dir).map_err(|e| ProvenanceError::io(dir, e))?;
    if !meta.is_dir() {
        return Err(ProvenanceError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    check_owner(dir, &meta)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(ProvenanceError::Key(format!(
            "{}: key directory mode {mode:04o} lets others write (fix with `chmod 700 {}`)",
            dir.display(),
            dir.display()
        )));
    }
    Ok(())
}

pub(crate) fn check_owner(path: &Path, meta: &fs::Metadata) -> Result<(), ProvenanceError> {
    let euid = effective_uid()?;
    if meta.uid() != euid {
        return Err(ProvenanceError::KeyFileOwner {
            path: path.to_path_buf(),
            uid: meta.uid(),
            euid,
        });
    }
    Ok(())
}

/// Reads a regular file, never through a symlink, that the effective uid owns;
/// returns its content and permission bits for the caller's mode rule.
pub(crate) fn read_owned_file(path: &Path) -> Result<(Vec<u8>, u32), ProvenanceError> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| ProvenanceError::io(path, e))?;
    let meta = f.metadata().map_err(|e| ProvenanceError::io(path, e))?;
    if !meta.is_file() {
        return Err(ProvenanceError::Key(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    // Another user's file could have been planted or read by them.
    check_owner(path, &meta)?;
    let mut out = Vec::new();
    f.read_to_end(&mut out)
        .map_err(|e| ProvenanceError::io(path, e))?;
    Ok((out, meta.permissions().mode() & 0o7777))
}

/// Write `dir/name` atomically: a temporary file created with `mode`,
/// fsynced, renamed over the target, then the directory fsynced.
pub(crate) fn write_atomic(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    mode: u32,
) -> Result<(), ProvenanceError> {
    let mut nonce = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        hex::encode(nonce)
    ));
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        // The umask may have narrowed `mode`; a public file should still be
        // readable, and a private one never gets wider than asked.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(ProvenanceError::io(&tmp, e));
    }
    let target = dir.join(name);
    if let Err(e) = fs::rename(&tmp, &target) {
        let _ = fs::remove_file(&tmp);
        return Err(ProvenanceError::io(target, e));
    }
    sync_dir(dir);
    Ok(())
}

/// Persist directory entries; best effort on filesystems that refuse it.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}
