//! Images: read-only root filesystems for steps.
//!
//! - `host` ([`host`]): the host's /usr and a small synthetic /etc; unpinned.
//! - built images ([`build`], e.g. `busybox`): a file tree built by `kiln image build`
//!   from a recipe pinned by the SHA-256 of its source package, stored as
//!   `NAME/TREE_DIGEST/rootfs`. Their digest is the tree digest.
//! - imported images ([`import`]): an OCI image (an OCI layout, a tar of one, or a Docker
//!   archive) read by [`oci`], unpacked by [`unpack`] into `.oci/MANIFEST_DIGEST/rootfs`.
//!   Their digest is the manifest digest; their config's Env is the steps' default
//!   environment. [`pull`] fetches one from a registry into a layout and imports that.
//!
//! `NAME/image.json` names an image ([`ImageRecord`]). The daemon re-hashes an image's tree
//! before each job and refuses it when the digest differs from the record. Jobs name an
//! image as [`reference::ImageRef`] says; [`allow`] holds the allow-lists.

pub mod allow;
mod build;
mod host;
pub mod import;
pub mod oci;
pub mod pull;
pub mod reference;
pub mod sbom;
pub mod unpack;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use provenance::slsa::ResourceDescriptor;
use sandbox::RootEntry;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use self::allow::ImageIdentity;
use self::reference::ImageRef;
use crate::error::{Result, RunnerError};

pub const HOST_IMAGE: &str = "host";
/// The build user's uid and gid inside every sandbox.
pub const BUILD_UID: u32 = 1000;
/// Where imported trees live, by manifest digest (not an image name: names never start
/// with '.').
const OCI_DIR: &str = ".oci";
/// Top-level names of an image the sandbox provides itself.
const SANDBOX_OWNED: [&str; 4] = ["proc", "dev", "tmp", "workspace"];

#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub name: String,
    /// Whether `name` names this image now (false for an imported tree reached by digest
    /// after its name was imported again): only then do allow-lists see the name.
    pub named: bool,
    /// The image's digest: the manifest digest of an imported image, the tree digest of a
    /// built one; None for the unpinned host image.
    pub digest: Option<String>,
    pub tree_digest: Option<String>,
    /// Where an imported image came from (transport, file name, tag).
    pub imported: Option<String>,
    /// The image config's Env, `KEY=VALUE` each: the steps' default environment.
    pub env: Vec<String>,
    pub root: Vec<RootEntry>,
    /// The tree digest of the host image's /etc/ssl/certs (the host's CA certificates),
    /// if the host has any.
    pub ca_certificates: Option<String>,
}

impl ResolvedImage {
    /// What a link's `environment.image` says.
    pub fn describe(&self) -> serde_json::Value {
        match (&self.digest, &self.imported) {
            (Some(digest), Some(source)) => serde_json::json!({
                "name": self.name,
                "digest": {"sha256": digest},
                "manifest_digest": {"sha256": digest},
                "tree_digest": {"sha256": self.tree_digest},
                "source": source,
            }),
            (Some(digest), None) => {
                serde_json::json!({"name": self.name, "digest": {"sha256": digest}})
            }
            (None, _) => {
                let mut described = serde_json::json!({"name": self.name, "pinned": false});
                if let Some(digest) = &self.ca_certificates {
                    described["ca_certificates"] = serde_json::json!({
                        "path": host::HOST_CA_CERTIFICATES,
                        "tree_digest": {"sha256": digest},
                    });
                }
                described
            }
        }
    }

    /// The image among the provenance's resolvedDependencies.
    pub fn provenance(&self) -> ResourceDescriptor {
        match (&self.digest, &self.imported, &self.tree_digest) {
            (Some(manifest), Some(source), Some(tree)) if pull::is_registry_source(source) => {
                ResourceDescriptor::pulled_oci_image(
                    &self.name,
                    manifest,
                    oci::host_arch(),
                    tree,
                    source,
                )
            }
            (Some(manifest), Some(source), Some(tree)) => {
                ResourceDescriptor::oci_image(&self.name, manifest, oci::host_arch(), tree, source)
            }
            (digest, _, _) => ResourceDescriptor::image(&self.name, digest.as_deref()),
        }
    }

    /// The image as allow-lists see it.
    pub fn identity(&self) -> ImageIdentity {
        ImageIdentity {
            name: self.named.then(|| self.name.clone()),
            digests: self
                .digest
                .iter()
                .chain(self.tree_digest.iter())
                .cloned()
                .collect(),
        }
    }
}

/// A named image (`NAME/image.json`), and for an imported one also the record beside its
/// tree (`.oci/HEX/image.json`, with the name it was first imported as).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    pub name: String,
    pub tree_digest: String,
    /// What it was made from: `deb:PACKAGE=VERSION (ARCH)` for a built image, the import
    /// source (transport, file name, tag) for an imported one.
    pub source: String,
    /// The .deb's SHA-256, or the manifest digest.
    pub source_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<String>,
    /// The image config's Env.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Entries the import left out (device nodes, FIFOs...), the first hundred.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

impl ImageRecord {
    /// The digest a reference pins: the manifest digest, else the tree digest.
    pub fn digest(&self) -> &str {
        self.manifest_digest.as_deref().unwrap_or(&self.tree_digest)
    }
}

#[derive(Debug, Clone)]
pub struct Images {
    dir: PathBuf,
    /// The digest of the host image's CA certificates, taken once after the daemon wrote
    /// them: they are the daemon's own root-only copy, bound read-only into steps, so a
    /// per-job re-hash (7 ms of CPU) would only re-read what it wrote.
    host_ca_certificates: Arc<OnceLock<Option<String>>>,
}

/// Digest of a file tree: SHA-256 of the canonical JSON of its path -> sha256 map.
pub fn tree_digest(root: &Path) -> Result<String> {
    let tree = provenance::hash::hash_tree(root)?;
    let value = serde_json::to_value(&tree)
        .map_err(|e| RunnerError::Internal(format!("encoding tree: {e}")))?;
    let bytes = provenance::cjson::to_canonical(&value)?;
    Ok(hex::encode(Sha256::digest(bytes)))
}

/// Writes JSON through a synced temporary file renamed into place.
fn write_json_atomically(path: &Path, value: &impl Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| RunnerError::Internal(format!("encoding {}: {e}", path.display())))?;
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, bytes).map_err(RunnerError::io_path("writing", &tmp))?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(RunnerError::io_path("syncing", &tmp))?;
    fs::rename(&tmp, path).map_err(RunnerError::io_path("storing", path))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            RunnerError::Internal(format!("image record {} is corrupt: {e}", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RunnerError::io_path("reading", path)(e)),
    }
}

impl Images {
    /// The daemon's images: the host image's /etc is written afresh.
    pub fn open(state_dir: &Path) -> Result<Self> {
        let images = Self::attach(state_dir)?;
        images.write_host_etc()?;
        images.take_host_ca_certificates()?;
        Ok(images)
    }

    /// The images of a state directory, for `kiln image`: beside a running daemon, whose
    /// jobs bind the host image's /etc, that is left alone.
    pub fn attach(state_dir: &Path) -> Result<Self> {
        let dir = state_dir.join("images");
        fs::create_dir_all(&dir).map_err(RunnerError::io_path("creating", &dir))?;
        Ok(Self {
            dir,
            host_ca_certificates: Arc::default(),
        })
    }

    fn oci_dir(&self) -> PathBuf {
        self.dir.join(OCI_DIR)
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.dir.join(name).join("image.json")
    }

    pub fn read_record(&self, name: &str) -> Result<Option<ImageRecord>> {
        crate::spec::check_image_name(name)?;
        read_json(&self.record_path(name))
    }

    /// The record beside an imported tree.
    fn read_content_record(&self, manifest: &str) -> Result<Option<ImageRecord>> {
        crate::store::cas::check_digest("image", manifest)?;
        read_json(&self.oci_dir().join(manifest).join("image.json"))
    }

    /// The record a reference names, if that image is installed. A pinned name whose
    /// record has another digest is refused.
    pub fn lookup(&self, reference: &ImageRef) -> Result<Option<ImageRecord>> {
        match reference {
            ImageRef::Name(name) => self.read_record(name),
            ImageRef::Pinned { name, digest } => match self.read_record(name)? {
                Some(record) if record.digest() != digest => {
                    Err(RunnerError::FailedPrecondition(format!(
                        "image {name:?} is sha256:{} now, not the sha256:{digest} the job pins",
                        record.digest()
                    )))
                }
                other => Ok(other),
            },
            ImageRef::Digest(digest) => {
                // A name's record when a name points here now (an imported image by its
                // manifest digest, a built one by its tree digest); else the record
                // beside an imported tree, whose name has moved on.
                let content = self.read_content_record(digest)?;
                let mut named: Vec<ImageRecord> = self
                    .list()?
                    .into_iter()
                    .filter(|r| r.digest() == digest)
                    .collect();
                if let Some(own) = content.as_ref().and_then(|c| {
                    let at = named.iter().position(|r| r.name == c.name)?;
                    Some(named.swap_remove(at))
                }) {
                    return Ok(Some(own));
                }
                Ok(named.into_iter().next().or(content))
            }
        }
    }

    /// Whether the record's name names that image now: an imported tree reached by its
    /// digest after its name was imported again is no longer that name's, and an
    /// allow-list entry of the name must not admit it.
    fn named_now(&self, record: &ImageRecord) -> Result<bool> {
        Ok(self
            .read_record(&record.name)?
            .is_some_and(|current| current.digest() == record.digest()))
    }

    /// Who a job's image is for the allow-lists at Submit, from the records (the trees
    /// are checked when the job starts).
    pub fn identity_of(&self, reference: &str) -> Result<ImageIdentity> {
        let reference = ImageRef::parse(reference)?;
        if reference == ImageRef::Name(HOST_IMAGE.into()) {
            return Ok(ImageIdentity {
                name: Some(HOST_IMAGE.into()),
                digests: Vec::new(),
            });
        }
        let record = self.lookup(&reference).unwrap_or(None);
        let mut digests: Vec<String> = reference.digest().map(String::from).into_iter().collect();
        if let Some(record) = &record {
            for digest in [record.digest(), &record.tree_digest] {
                if !digests.iter().any(|d| d == digest) {
                    digests.push(digest.to_string());
                }
            }
        }
        let name = match (reference.name(), record) {
            (Some(name), _) => Some(name.to_string()),
            (None, Some(record)) if self.named_now(&record)? => Some(record.name),
            (None, _) => None,
        };
        Ok(ImageIdentity { name, digests })
    }

    fn rootfs(&self, record: &ImageRecord) -> PathBuf {
        match &record.manifest_digest {
            Some(manifest) => self.oci_dir().join(manifest).join("rootfs"),
            None => self
                .dir
                .join(&record.name)
                .join(&record.tree_digest)
                .join("rootfs"),
        }
    }

    /// Resolves a job's image reference to a verified root; an image whose tree no longer
    /// matches its recorded digest is refused.
    pub fn resolve(&self, reference: &str) -> Result<ResolvedImage> {
        let parsed = ImageRef::parse(reference)?;
        if parsed == ImageRef::Name(HOST_IMAGE.into()) {
            return Ok(self.host_image());
        }
        let record = self.lookup(&parsed)?.ok_or_else(|| {
            RunnerError::FailedPrecondition(format!(
                "image {reference:?} is not installed (`kiln image import` or `kiln image build` it)"
            ))
        })?;
        let name = record.name.clone();
        let named = self.named_now(&record)?;
        let rootfs = self.rootfs(&record);
        // Every job reads the whole tree again: what it costs is worth seeing in the log.
        let started = std::time::Instant::now();
        let actual = tree_digest(&rootfs)?;
        tracing::debug!(
            image = %name,
            elapsed_ms = started.elapsed().as_millis(),
            "image tree re-hashed"
        );
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
            if SANDBOX_OWNED.iter().any(|n| entry.file_name() == **n) {
                continue;
            }
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
        let digest = record.digest().to_string();
        Ok(ResolvedImage {
            name,
            named,
            digest: Some(digest),
            tree_digest: Some(record.tree_digest.clone()),
            imported: record
                .manifest_digest
                .as_ref()
                .map(|_| record.source.clone()),
            env: record.env,
            root,
            ca_certificates: None,
        })
    }

    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        let mut records = Vec::new();
        for entry in fs::read_dir(&self.dir)
            .map_err(RunnerError::io_path("reading", &self.dir))?
            .flatten()
        {
            let Some(name) = entry.file_name().to_str().map(String::from) else {
                continue;
            };
            if crate::spec::check_image_name(&name).is_err() {
                continue;
            }
            if let Some(record) = self.read_record(&name)? {
                records.push(record);
            }
        }
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(records)
    }

    /// Removes a name, and its tree when no other name uses it (or, given `sha256:HEX`,
    /// an imported tree no name uses any more). A job that names it and
    /// has not started fails when it starts ("not installed"); do not remove an image a
    /// running job uses (its steps would see files vanish).
    pub fn remove(&self, name: &str) -> Result<ImageRecord> {
        if let Some(digest) = name.strip_prefix("sha256:") {
            return self.remove_unnamed(digest);
        }
        if name == HOST_IMAGE {
            return Err(RunnerError::invalid("name", "\"host\" is built in"));
        }
        let record = self
            .read_record(name)?
            .ok_or_else(|| RunnerError::NotFound(format!("image {name:?}")))?;
        let path = self.record_path(name);
        fs::remove_file(&path).map_err(RunnerError::io_path("removing", &path))?;
        let still_used = self
            .list()?
            .iter()
            .any(|r| r.manifest_digest.is_some() && r.digest() == record.digest());
        if record.manifest_digest.is_none() || !still_used {
            let tree = match &record.manifest_digest {
                Some(manifest) => self.oci_dir().join(manifest),
                None => self.dir.join(name).join(&record.tree_digest),
            };
            if tree.exists() {
                fs::remove_dir_all(&tree).map_err(RunnerError::io_path("removing", &tree))?;
            }
        }
        let name_dir = self.dir.join(name);
        // Only empty: a built image's other trees stay until removed by hand.
        let _ = fs::remove_dir(&name_dir);
        Ok(record)
    }

    /// Removes an imported tree no name uses any more (a name was imported again).
    fn remove_unnamed(&self, digest: &str) -> Result<ImageRecord> {
        let record = self
            .read_content_record(digest)?
            .ok_or_else(|| RunnerError::NotFound(format!("imported image sha256:{digest}")))?;
        let names: Vec<String> = self
            .list()?
            .into_iter()
            .filter(|r| r.manifest_digest.as_deref() == Some(digest))
            .map(|r| r.name)
            .collect();
        if !names.is_empty() {
            return Err(RunnerError::FailedPrecondition(format!(
                "sha256:{digest} is named {}: remove the name",
                names.join(", ")
            )));
        }
        let tree = self.oci_dir().join(digest);
        fs::remove_dir_all(&tree).map_err(RunnerError::io_path("removing", &tree))?;
        Ok(record)
    }

    /// Imported trees no name uses (a name was imported again since), by digest.
    pub fn unnamed(&self) -> Result<Vec<ImageRecord>> {
        let named: Vec<String> = self
            .list()?
            .into_iter()
            .filter_map(|r| r.manifest_digest)
            .collect();
        let mut unnamed = Vec::new();
        let Ok(entries) = fs::read_dir(self.oci_dir()) else {
            return Ok(unnamed);
        };
        for entry in entries.flatten() {
            let Some(digest) = entry.file_name().to_str().map(String::from) else {
                continue;
            };
            if named.contains(&digest) || crate::store::cas::check_digest("image", &digest).is_err()
            {
                continue;
            }
            if let Some(record) = self.read_content_record(&digest)? {
                unnamed.push(record);
            }
        }
        Ok(unnamed)
    }
}
