//! Images: read-only root filesystems for steps.
//!
//! - `host`: the host's /usr (with the /bin, /lib... links) and a small synthetic /etc.
//!   It is not pinned: provenance records it as unpinned.
//! - built images (e.g. `busybox`): a file tree built by `kiln image build` from a
//!   recipe pinned by the SHA-256 of its source package, stored under the state dir
//!   with the digest of the tree; the daemon re-hashes the tree before each job and
//!   refuses it when the digest differs from the record.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sandbox::RootEntry;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Result, RunnerError};
use crate::spec::check_image_name;

pub const HOST_IMAGE: &str = "host";
/// The build user's uid and gid inside every sandbox.
pub const BUILD_UID: u32 = 1000;

#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub name: String,
    /// Digest of the image's file tree; None for the unpinned host image.
    pub digest: Option<String>,
    pub root: Vec<RootEntry>,
}

impl ResolvedImage {
    pub fn describe(&self) -> serde_json::Value {
        match &self.digest {
            Some(digest) => serde_json::json!({"name": self.name, "digest": {"sha256": digest}}),
            None => serde_json::json!({"name": self.name, "pinned": false}),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    pub name: String,
    pub tree_digest: String,
    pub source: String,
    pub source_sha256: String,
}

#[derive(Debug, Clone)]
pub struct Images {
    dir: PathBuf,
}

/// Digest of a file tree: SHA-256 of the canonical JSON of its path -> sha256 map.
pub fn tree_digest(root: &Path) -> Result<String> {
    let tree = provenance::hash::hash_tree(root)?;
    let value = serde_json::to_value(&tree)
        .map_err(|e| RunnerError::Internal(format!("encoding tree: {e}")))?;
    let bytes = provenance::cjson::to_canonical(&value)?;
    Ok(hex::encode(Sha256::digest(bytes)))
}

impl Images {
    pub fn open(state_dir: &Path) -> Result<Self> {
        let dir = state_dir.join("images");
        fs::create_dir_all(&dir).map_err(RunnerError::io_path("creating", &dir))?;
        let images = Self { dir };
        images.write_host_etc()?;
        Ok(images)
    }

    fn host_etc(&self) -> PathBuf {
        self.dir.join(HOST_IMAGE).join("etc")
    }

    /// The synthetic /etc of the host image: the build user, loopback names, and
    /// what the host's toolchain needs to run (the dynamic linker cache and the
    /// alternatives links that /usr/bin points into). Nothing else of the host's /etc.
    fn write_host_etc(&self) -> Result<()> {
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

    fn host_image(&self) -> ResolvedImage {
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
            name: HOST_IMAGE.into(),
            digest: None,
            root,
        }
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.dir.join(name).join("image.json")
    }

    pub fn read_record(&self, name: &str) -> Result<Option<ImageRecord>> {
        let path = self.record_path(name);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                RunnerError::Internal(format!("image record {} is corrupt: {e}", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RunnerError::io_path("reading", &path)(e)),
        }
    }

    fn rootfs(&self, record: &ImageRecord) -> PathBuf {
        self.dir
            .join(&record.name)
            .join(&record.tree_digest)
            .join("rootfs")
    }

    /// Resolves an image name to a verified root; a built image whose tree no longer
    /// matches its recorded digest is refused.
    pub fn resolve(&self, name: &str) -> Result<ResolvedImage> {
        check_image_name(name)?;
        if name == HOST_IMAGE {
            return Ok(self.host_image());
        }
        let record = self.read_record(name)?.ok_or_else(|| {
            RunnerError::FailedPrecondition(format!(
                "image {name:?} is not installed (build it with `kiln image build`)"
            ))
        })?;
        let rootfs = self.rootfs(&record);
        let actual = tree_digest(&rootfs)?;
        if actual != record.tree_digest {
            return Err(RunnerError::FailedPrecondition(format!(
                "image {name:?} was modified: its tree hashes to {actual}, the record says {}",
                record.tree_digest
            )));
        }
        let mut root = Vec::new();
        for entry in fs::read_dir(&rootfs)
            .map_err(RunnerError::io_path("reading", &rootfs))?
            .flatten()
        {
            let target = Path::new("/").join(entry.file_name());
            let meta = fs::symlink_metadata(entry.path())
                .map_err(RunnerError::io_path("reading", &entry.path()))?;
            if meta.file_type().is_symlink() {
                let points_to = fs::read_link(entry.path())
                    .map_err(RunnerError::io_path("reading", &entry.path()))?;
                root.push(RootEntry::Symlink {
                    path: target,
                    points_to,
                });
            } else {
                root.push(RootEntry::Bind {
                    source: entry.path(),
                    target,
                });
            }
        }
        Ok(ResolvedImage {
            name: name.into(),
            digest: Some(record.tree_digest),
            root,
        })
    }

    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        let mut records = Vec::new();
        for entry in fs::read_dir(&self.dir)
            .map_err(RunnerError::io_path("reading", &self.dir))?
            .flatten()
        {
            if let Some(name) = entry.file_name().to_str() {
                if let Some(record) = self.read_record(name)? {
                    records.push(record);
                }
            }
        }
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(records)
    }

    /// Builds an image from a recipe directory (see images/busybox/recipe.toml).
    pub fn build(&self, recipe_dir: &Path) -> Result<ImageRecord> {
        let recipe_path = recipe_dir.join("recipe.toml");
        let text = fs::read_to_string(&recipe_path)
            .map_err(RunnerError::io_path("reading", &recipe_path))?;
        let recipe: Recipe = toml::from_str(&text)
            .map_err(|e| RunnerError::invalid(recipe_path.display().to_string(), e.to_string()))?;
        check_image_name(&recipe.name)?;
        if recipe.name == HOST_IMAGE {
            return Err(RunnerError::invalid("name", "\"host\" is built in"));
        }
        crate::store::cas::check_digest("deb.sha256", &recipe.deb.sha256)?;
        let deb = fetch_deb(recipe_dir, &recipe.deb)?;
        let binary = extract_from_deb(&deb, &recipe.deb.binary)?;

        let staging_parent = self.dir.join(&recipe.name);
        fs::create_dir_all(&staging_parent)
            .map_err(RunnerError::io_path("creating", &staging_parent))?;
        let staging = tempfile::Builder::new()
            .prefix(".build-")
            .tempdir_in(&staging_parent)
            .map_err(RunnerError::io("creating a build directory"))?;
        let rootfs = staging.path().join("rootfs");
        let bin = rootfs.join("bin");
        let etc = rootfs.join("etc");
        for dir in [&bin, &etc] {
            fs::create_dir_all(dir).map_err(RunnerError::io_path("creating", dir))?;
        }
        let busybox = bin.join("busybox");
        fs::write(&busybox, &binary).map_err(RunnerError::io_path("writing", &busybox))?;
        fs::set_permissions(&busybox, fs::Permissions::from_mode(0o755))
            .map_err(RunnerError::io_path("chmod", &busybox))?;
        for applet in &recipe.applets {
            if applet.is_empty() || applet.contains('/') || applet == "busybox" || applet == ".." {
                return Err(RunnerError::invalid("applets", format!("{applet:?}")));
            }
            let link = bin.join(applet);
            std::os::unix::fs::symlink("busybox", &link)
                .map_err(RunnerError::io_path("linking", &link))?;
        }
        fs::write(
            etc.join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\nbuild:x:1000:1000:Kiln build user:/workspace:/bin/sh\n",
        )
        .map_err(RunnerError::io("writing passwd"))?;
        fs::write(etc.join("group"), "root:x:0:\nbuild:x:1000:\n")
            .map_err(RunnerError::io("writing group"))?;
        fs::write(etc.join("hosts"), "127.0.0.1 localhost\n")
            .map_err(RunnerError::io("writing hosts"))?;
        for dir in [&rootfs, &bin, &etc] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
                .map_err(RunnerError::io_path("chmod", dir))?;
        }

        let digest = tree_digest(&rootfs)?;
        let final_dir = staging_parent.join(&digest);
        if !final_dir.exists() {
            let kept = staging.keep();
            fs::rename(&kept, &final_dir).map_err(RunnerError::io_path("storing", &final_dir))?;
        }
        let record = ImageRecord {
            name: recipe.name.clone(),
            tree_digest: digest,
            source: format!(
                "deb:{}={} ({})",
                recipe.deb.package, recipe.deb.version, recipe.deb.architecture
            ),
            source_sha256: recipe.deb.sha256.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&record)
            .map_err(|e| RunnerError::Internal(format!("encoding image record: {e}")))?;
        let record_path = self.record_path(&recipe.name);
        let tmp = record_path.with_extension("json.tmp");
        fs::write(&tmp, bytes).map_err(RunnerError::io_path("writing", &tmp))?;
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(RunnerError::io_path("syncing", &tmp))?;
        fs::rename(&tmp, &record_path).map_err(RunnerError::io_path("storing", &record_path))?;
        Ok(record)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Recipe {
    name: String,
    deb: DebSource,
    applets: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DebSource {
    package: String,
    version: String,
    architecture: String,
    sha256: String,
    binary: String,
}

fn deb_file_name(deb: &DebSource) -> String {
    // Debian's archive names encode the epoch colon as %3a.
    format!(
        "{}_{}_{}.deb",
        deb.package,
        deb.version.replace(':', "%3a"),
        deb.architecture
    )
}

fn sha256_of(path: &Path) -> Result<String> {
    Ok(provenance::hash::sha256_file(path)?)
}

/// Finds the pinned .deb (recipe folder, apt cache, or `apt-get download`) and
/// returns its bytes once its SHA-256 matches the recipe.
fn fetch_deb(recipe_dir: &Path, deb: &DebSource) -> Result<Vec<u8>> {
    let name = deb_file_name(deb);
    let candidates = [
        recipe_dir.join(&name),
        Path::new("/var/cache/apt/archives").join(&name),
    ];
    let mut found = candidates.iter().find(|p| p.is_file()).cloned();
    let download_dir = tempfile::tempdir().map_err(RunnerError::io("creating a temp dir"))?;
    if found.is_none() {
        let spec = format!("{}={}", deb.package, deb.version);
        let status = std::process::Command::new("apt-get")
            .arg("download")
            .arg(&spec)
            .current_dir(download_dir.path())
            .status()
            .map_err(RunnerError::io("running apt-get download"))?;
        if !status.success() {
            return Err(RunnerError::FailedPrecondition(format!(
                "`apt-get download {spec}` failed ({status}); put {name} in {}",
                recipe_dir.display()
            )));
        }
        found = Some(download_dir.path().join(&name));
    }
    let path = found.ok_or_else(|| RunnerError::Internal("no .deb found".into()))?;
    let actual = sha256_of(&path)?;
    if actual != deb.sha256 {
        return Err(RunnerError::FailedPrecondition(format!(
            "{} hashes to {actual}, but the recipe pins {}",
            path.display(),
            deb.sha256
        )));
    }
    fs::read(&path).map_err(RunnerError::io_path("reading", &path))
}

/// Takes one file out of a .deb's data.tar.{xz,gz,zst} without running anything of it.
fn extract_from_deb(deb: &[u8], member: &str) -> Result<Vec<u8>> {
    let mut archive = ar::Archive::new(deb);
    while let Some(entry) = archive.next_entry() {
        let mut entry = entry.map_err(RunnerError::io("reading the .deb"))?;
        let name = String::from_utf8_lossy(entry.header().identifier()).to_string();
        if !name.starts_with("data.tar") {
            continue;
        }
        let mut compressed = Vec::new();
        entry
            .read_to_end(&mut compressed)
            .map_err(RunnerError::io("reading data.tar"))?;
        let reader: Box<dyn Read> = match name.as_str() {
            "data.tar.xz" => Box::new(xz2::read::XzDecoder::new(compressed.as_slice())),
            "data.tar" => Box::new(compressed.as_slice()),
            other => {
                return Err(RunnerError::FailedPrecondition(format!(
                    "unsupported .deb member {other}"
                )))
            }
        };
        let mut tar = tar::Archive::new(reader);
        for file in tar.entries().map_err(RunnerError::io("reading data.tar"))? {
            let mut file = file.map_err(RunnerError::io("reading data.tar"))?;
            let path = file
                .path()
                .map_err(RunnerError::io("reading data.tar"))?
                .to_string_lossy()
                .trim_start_matches("./")
                .to_string();
            if path == member && file.header().entry_type().is_file() {
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes)
                    .map_err(RunnerError::io("reading data.tar"))?;
                return Ok(bytes);
            }
        }
        return Err(RunnerError::FailedPrecondition(format!(
            "the .deb has no regular file {member}"
        )));
    }
    Err(RunnerError::FailedPrecondition(
        "the .deb has no data.tar member".into(),
    ))
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
fn make_world_readable(root: &Path) -> Result<()> {
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
