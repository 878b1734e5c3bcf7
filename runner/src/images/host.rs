//! The `host` image: the host's /usr (with the /bin, /lib... links) and a small synthetic
//! /etc. It is not pinned: provenance records it as unpinned.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sandbox::RootEntry;

use super::{tree_digest, Images, ResolvedImage, HOST_IMAGE};
use crate::error::{Result, RunnerError};

impl Images {
    pub(super) fn host_etc(&self) -> PathBuf {
        self.dir.join(HOST_IMAGE).join("etc")
    }

    /// The synthetic /etc of the host image: the build user, loopback names, and
    /// what the host's toolchain needs to run (the dynamic linker cache and the
    /// alternatives links that /usr/bin points into). Nothing else of the host's /etc.
    pub(super) fn write_host_etc(&self) -> Result<()> {
        let etc = self.host_etc();
        if etc.exists() {
            fs::remove_dir_all(&etc).map_err(RunnerError::io_path("removing", &etc))?;
        }
        fs::create_dir_all(&etc).map_err(RunnerError::io_path("creating", &etc))?;
        let files = [
            (
                "passwd",
                "root:x:0:0:root:/root:/bin/sh\nbuild:x:1000:1000:Kiln build user:/workspace:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
            ),
            ("group", "root:x:0:\nbuild:x:1000:\nnogroup:x:65534:\n"),
            ("hosts", "127.0.0.1 localhost\n::1 localhost\n"),
            ("nsswitch.conf", "passwd: files\ngroup: files\nhosts: files\n"),
            ("hostname", "kiln\n"),
        ];
        for (name, content) in files {
            let path = etc.join(name);
            fs::write(&path, content).map_err(RunnerError::io_path("writing", &path))?;
        }
        for name in ["ld.so.cache", "ld.so.conf"] {
            let src = Path::new("/etc").join(name);
            if src.is_file() {
                let dest = etc.join(name);
                fs::copy(&src, &dest).map_err(RunnerError::io_path("copying", &src))?;
            }
        }
        copy_symlinks(Path::new("/etc/alternatives"), &etc.join("alternatives"))?;
        copy_ca_certificates(Path::new(HOST_CA_CERTIFICATES), &etc.join("ssl/certs"))?;
        let ld_conf_d = Path::new("/etc/ld.so.conf.d");
        if ld_conf_d.is_dir() {
            let dest = etc.join("ld.so.conf.d");
            fs::create_dir_all(&dest).map_err(RunnerError::io_path("creating", &dest))?;
            for entry in fs::read_dir(ld_conf_d)
                .map_err(RunnerError::io_path("reading", ld_conf_d))?
                .flatten()
            {
                if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
                    let _ = fs::copy(entry.path(), dest.join(entry.file_name()));
                }
            }
        }
        // The daemon's umask (077) keeps what it writes from other users, but the step's
        // unprivileged uid must read its /etc and reach it through the images directory.
        for dir in [&self.dir, &self.dir.join(HOST_IMAGE)] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o711))
                .map_err(RunnerError::io_path("chmod", dir))?;
        }
        make_world_readable(&etc)
    }

    /// What the steps' /etc/ssl/certs holds, hashed as they see it (once per daemon).
    pub(super) fn host_ca_certificates(&self) -> Option<String> {
        self.host_ca_certificates
            .get_or_init(|| self.hash_host_ca_certificates().ok().flatten())
            .clone()
    }

    /// Hashes the host image's CA certificates now, for every job of this daemon: one it
    /// cannot hash fails the start rather than leaving every link without their digest.
    pub(super) fn take_host_ca_certificates(&self) -> Result<()> {
        let digest = self.hash_host_ca_certificates()?;
        let _ = self.host_ca_certificates.set(digest);
        Ok(())
    }

    fn hash_host_ca_certificates(&self) -> Result<Option<String>> {
        let certs = self.host_etc().join("ssl/certs");
        if !certs.is_dir() {
            return Ok(None);
        }
        tree_digest(&certs).map(Some)
    }

    pub(super) fn host_image(&self) -> ResolvedImage {
        let mut root = vec![RootEntry::Bind {
            source: "/usr".into(),
            target: "/usr".into(),
        }];
        for name in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
            let host = Path::new("/").join(name);
            match fs::symlink_metadata(&host) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    if let Ok(points_to) = fs::read_link(&host) {
                        root.push(RootEntry::Symlink {
                            path: host,
                            points_to,
                        });
                    }
                }
                Ok(meta) if meta.is_dir() => root.push(RootEntry::Bind {
                    source: host.clone(),
                    target: host,
                }),
                _ => {}
            }
        }
        root.push(RootEntry::Bind {
            source: self.host_etc(),
            target: "/etc".into(),
        });
        ResolvedImage {
            ca_certificates: self.host_ca_certificates(),
            name: HOST_IMAGE.into(),
            named: true,
            digest: None,
            tree_digest: None,
            imported: None,
            env: Vec::new(),
            root,
        }
    }
}

/// The host's CA certificates (Debian's layout, which Alpine and the OpenSSL default
/// share; on Fedora it is a link to /etc/pki/tls/certs, followed).
pub const HOST_CA_CERTIFICATES: &str = "/etc/ssl/certs";
/// Files and bytes copied from it: far above any real store.
const MAX_CA_FILES: usize = 10_000;
const MAX_CA_BYTES: u64 = 256 << 20;

/// Copies the host's CA certificates with every symlink resolved (the hash links and
/// the links into /usr/share/ca-certificates become files): unmodified TLS clients in a
/// step find their usual bundle, and its digest covers every byte they can read. A
/// snapshot taken when the daemon starts, like the rest of the host image's /etc.
fn copy_ca_certificates(src: &Path, dest: &Path) -> Result<()> {
    if !src.is_dir() {
        return Ok(());
    }
    let (mut files, mut bytes) = (0usize, 0u64);
    let mut dirs = vec![(src.to_path_buf(), dest.to_path_buf())];
    while let Some((from, to)) = dirs.pop() {
        fs::create_dir_all(&to).map_err(RunnerError::io_path("creating", &to))?;
        for entry in fs::read_dir(&from)
            .map_err(RunnerError::io_path("reading", &from))?
            .flatten()
        {
            // Dangling links and unreadable entries are not certificates a client could use.
            let Ok(meta) = fs::metadata(entry.path()) else {
                continue;
            };
            let target = to.join(entry.file_name());
            if meta.is_dir() && entry.file_type().is_ok_and(|t| !t.is_symlink()) {
                dirs.push((entry.path(), target));
            } else if meta.is_file() {
                files += 1;
                bytes += meta.len();
                if files > MAX_CA_FILES || bytes > MAX_CA_BYTES {
                    return Err(RunnerError::FailedPrecondition(format!(
                        "{HOST_CA_CERTIFICATES} holds more than {MAX_CA_FILES} files or {MAX_CA_BYTES} bytes"
                    )));
                }
                fs::copy(entry.path(), &target)
                    .map_err(RunnerError::io_path("copying", &entry.path()))?;
            }
        }
    }
    Ok(())
}

fn copy_symlinks(src: &Path, dest: &Path) -> Result<()> {
    if !src.is_dir() {
        return Ok(());
    }
    fs::create_dir_all(dest).map_err(RunnerError::io_path("creating", dest))?;
    for entry in fs::read_dir(src)
        .map_err(RunnerError::io_path("reading", src))?
        .flatten()
    {
        if let Ok(target) = fs::read_link(entry.path()) {
            let link = dest.join(entry.file_name());
            std::os::unix::fs::symlink(&target, &link)
                .map_err(RunnerError::io_path("linking", &link))?;
        }
    }
    Ok(())
}

/// Directories 0755 and files 0644 below `root` (symlinks are left alone): for trees a
/// step reads, which hold nothing secret.
pub(super) fn make_world_readable(root: &Path) -> Result<()> {
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
            .map_err(RunnerError::io_path("chmod", &dir))?;
        for entry in fs::read_dir(&dir).map_err(RunnerError::io_path("reading", &dir))? {
            let entry = entry.map_err(RunnerError::io_path("reading", &dir))?;
            let kind = entry
                .file_type()
                .map_err(RunnerError::io_path("reading", &entry.path()))?;
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file() {
                fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o644))
                    .map_err(RunnerError::io_path("chmod", &entry.path()))?;
            }
        }
    }
    Ok(())
}
