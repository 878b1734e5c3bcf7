//! SHA-256 of files and whole trees, as recorded in link materials/products.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::ProvenanceError;

/// Read buffer per hashing thread: large enough to amortise syscalls,
/// small enough that memory stays bounded whatever the file sizes.
const BUF_SIZE: usize = 256 * 1024;

/// Upper bound on hashing threads; hashing is I/O and memory-bandwidth bound
/// beyond a handful of cores.
const MAX_THREADS: usize = 8;

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
    // O_NONBLOCK so that a fifo swapped in after the walk cannot block the
    // open; the fstat below then rejects it.
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| ProvenanceError::io(path, e))?;
    let meta = f.metadata().map_err(|e| ProvenanceError::io(path, e))?;
    if !meta.is_file() {
        return Err(special(path, meta.file_type()));
    }
    let mut hasher = Sha256::new();
    loop {
        match f.read(buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ProvenanceError::io(path, e)),
        }
    }
    Ok(hex::encode(hasher.finalize()))
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
/// files only). A fifo, socket or device node anywhere in the tree is an
/// error naming its path, as is a name that is not UTF-8.
///
/// The tree must be quiescent (Kiln hashes a workspace only when every
/// process of the step is dead); files are still opened with O_NOFOLLOW and
/// re-checked so a concurrent swap yields an error, not a followed link.
pub fn hash_tree(root: &Path) -> Result<BTreeMap<String, String>, ProvenanceError> {
    hash_tree_with(root, Mode::Kiln)
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
    hash_tree_with(root, Mode::InToto { root: &canonical })
}

/// How the walk treats excludes and symlinks.
#[derive(Clone, Copy)]
enum Mode<'a> {
    /// Kiln's link recording: everything, symlinks recorded by target path.
    Kiln,
    /// in-toto inspection recording; `root` is the canonical root.
    InToto { root: &'a Path },
}

fn hash_tree_with(
    root: &Path,
    mode: Mode<'_>,
) -> Result<BTreeMap<String, String>, ProvenanceError> {
    let meta = fs::symlink_metadata(root).map_err(|e| ProvenanceError::io(root, e))?;
    if !meta.is_dir() {
        return Err(ProvenanceError::NotADirectory {
            path: root.to_path_buf(),
        });
    }
    let mut out = BTreeMap::new();
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    walk(root, "", mode, &mut out, &mut files)?;
    for (rel, digest) in hash_files(files)? {
        out.insert(rel, digest);
    }
    Ok(out)
}

/// Collect regular files into `files` and hash symlinks directly into `out`
/// (or, in in-toto mode, queue the file a symlink resolves to).
fn walk(
    dir: &Path,
    prefix: &str,
    mode: Mode<'_>,
    out: &mut BTreeMap<String, String>,
    files: &mut Vec<(String, PathBuf)>,
) -> Result<(), ProvenanceError> {
    let entries = fs::read_dir(dir).map_err(|e| ProvenanceError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ProvenanceError::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name
            .to_str()
            .ok_or_else(|| ProvenanceError::NonUtf8Path { path: path.clone() })?;
        // Parents were checked on the way down, so the name is enough.
        if matches!(mode, Mode::InToto { .. }) && excluded_name(name) {
            continue;
        }
        let rel = if prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{prefix}/{name}")
        };
        // DirEntry::file_type does not follow symlinks.
        let ft = entry
            .file_type()
            .map_err(|e| ProvenanceError::io(&path, e))?;
        if ft.is_symlink() {
            match mode {
                Mode::Kiln => {
                    let target = fs::read_link(&path).map_err(|e| ProvenanceError::io(&path, e))?;
                    out.insert(rel, sha256_bytes(target.as_os_str().as_bytes()));
                }
                Mode::InToto { root } => files.push((rel, resolve_inside(&path, root)?)),
            }
        } else if ft.is_dir() {
            walk(&path, &rel, mode, out, files)?;
        } else if ft.is_file() {
            files.push((rel, path));
        } else {
            return Err(special(&path, ft));
        }
    }
    Ok(())
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

/// Hash regular files on up to `MAX_THREADS` threads; each thread pulls the
/// next index from a shared counter, so big and small files balance out.
fn hash_files(files: Vec<(String, PathBuf)>) -> Result<Vec<(String, String)>, ProvenanceError> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, MAX_THREADS)
        .min(files.len().max(1));
    if threads <= 1 {
        let mut buf = vec![0u8; BUF_SIZE];
        return files
            .into_iter()
            .map(|(rel, path)| hash_regular_file(&path, &mut buf).map(|d| (rel, d)))
            .collect();
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(String, String)>> = Mutex::new(Vec::with_capacity(files.len()));
    let first_error: Mutex<Option<ProvenanceError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; BUF_SIZE];
                let mut local = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((rel, path)) = files.get(i) else {
                        break;
                    };
                    match hash_regular_file(path, &mut buf) {
                        Ok(d) => local.push((rel.clone(), d)),
                        Err(e) => {
                            // Stop every worker early: the whole tree fails anyway.
                            next.store(files.len(), Ordering::Relaxed);
                            if let Ok(mut slot) = first_error.lock() {
                                slot.get_or_insert(e);
                            }
                            break;
                        }
                    }
                }
                if let Ok(mut r) = results.lock() {
                    r.extend(local);
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    let results = results
        .into_inner()
        .map_err(|_| ProvenanceError::Format("hashing thread panicked".into()))?;
    if results.len() != files.len() {
        return Err(ProvenanceError::Format(
            "hashing threads lost results".into(),
        ));
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::symlink;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn bytes_and_file() {
        assert_eq!(sha256_bytes(b""), EMPTY);
        assert_eq!(
            sha256_bytes(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("big");
        // Larger than one buffer, to exercise streaming.
        let data: Vec<u8> = (0..(BUF_SIZE * 3 + 17)).map(|i| (i % 251) as u8).collect();
        fs::write(&p, &data).unwrap();
        assert_eq!(sha256_file(&p).unwrap(), sha256_bytes(&data));
    }

    #[test]
    fn tree_nested_symlinks_empty() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().join("ws");
        fs::create_dir_all(r.join("a/b/c")).unwrap();
        fs::create_dir(r.join("emptydir")).unwrap();
        fs::write(r.join("top.txt"), b"top").unwrap();
        fs::write(r.join("a/b/c/deep"), b"deep").unwrap();
        fs::write(r.join("empty"), b"").unwrap();
        fs::write(d.path().join("outside"), b"secret").unwrap();
        symlink("../outside", r.join("out-link")).unwrap();
        symlink("/nonexistent/dangling", r.join("a/dangling")).unwrap();
        symlink("b", r.join("a/dirlink")).unwrap();
        let t = hash_tree(&r).unwrap();
        let keys: Vec<&str> = t.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "a/b/c/deep",
                "a/dangling",
                "a/dirlink",
                "empty",
                "out-link",
                "top.txt"
            ]
        );
        assert_eq!(t["top.txt"], sha256_bytes(b"top"));
        assert_eq!(t["a/b/c/deep"], sha256_bytes(b"deep"));
        assert_eq!(t["empty"], EMPTY);
        // Symlinks: digest of the target path, never of the target's content.
        assert_eq!(t["out-link"], sha256_bytes(b"../outside"));
        assert_eq!(t["a/dangling"], sha256_bytes(b"/nonexistent/dangling"));
        assert_eq!(t["a/dirlink"], sha256_bytes(b"b"));
    }

    #[test]
    fn tree_many_files_parallel() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..300 {
            let sub = d.path().join(format!("d{}", i % 7));
            fs::create_dir_all(&sub).unwrap();
            fs::write(sub.join(format!("f{i}")), format!("content {i}")).unwrap();
        }
        let t = hash_tree(d.path()).unwrap();
        assert_eq!(t.len(), 300);
        assert_eq!(t["d3/f10"], sha256_bytes(b"content 10"));
    }

    #[test]
    fn fifo_is_an_error_naming_the_path() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        fs::write(d.path().join("ok"), b"x").unwrap();
        let fifo = d.path().join("sub/pipe");
        let st = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(st.success());
        let e = hash_tree(d.path()).unwrap_err();
        assert!(
            matches!(e, ProvenanceError::SpecialFile { kind: "fifo", .. }),
            "{e}"
        );
        assert!(e.to_string().contains("sub/pipe"), "{e}");
        // sha256_file refuses it without blocking.
        assert!(sha256_file(&fifo).is_err());
    }

    #[test]
    fn socket_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let _l = std::os::unix::net::UnixListener::bind(d.path().join("sock")).unwrap();
        let e = hash_tree(d.path()).unwrap_err();
        assert!(e.to_string().contains("socket"), "{e}");
    }

    #[test]
    fn root_must_be_a_real_directory() {
        let d = tempfile::tempdir().unwrap();
        symlink(d.path(), d.path().join("self")).unwrap();
        assert!(hash_tree(&d.path().join("self")).is_err());
        assert!(sha256_file(&d.path().join("self")).is_err());
        assert!(hash_tree(&d.path().join("missing")).is_err());
    }
}
