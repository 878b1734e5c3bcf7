//! Reading what skopeo, umoci, buildah and `docker save` write: an OCI image layout (a
//! directory, or a tar of one) and a Docker archive. Every blob is checked against its
//! descriptor (size, then SHA-256) before it is used; JSON documents are read only up to
//! [`MAX_DOCUMENT_BYTES`].

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Result, RunnerError};
use crate::store::cas::check_digest;

/// The largest index, manifest or config an import reads.
pub const MAX_DOCUMENT_BYTES: u64 = 4 << 20;
/// Members of an archive (an OCI layout's blobs, a Docker archive's files).
const MAX_ARCHIVE_MEMBERS: usize = 100_000;
/// How deep an index may nest indexes.
pub(super) const MAX_INDEX_DEPTH: usize = 3;
/// Entries of an index and the indexes it nests, together: nesting multiplies them (an
/// index naming one nested index a thousand times, each naming a thousand manifests).
pub const MAX_INDEX_ENTRIES: usize = 4096;

/// Counts index entries against [`MAX_INDEX_ENTRIES`].
#[derive(Debug, Default)]
pub(super) struct IndexBudget(usize);

impl IndexBudget {
    pub(super) fn spend(&mut self, entries: usize) -> Result<()> {
        self.0 = self.0.saturating_add(entries);
        if self.0 > MAX_INDEX_ENTRIES {
            return Err(RunnerError::FailedPrecondition(format!(
                "the image indexes have more than {MAX_INDEX_ENTRIES} entries together"
            )));
        }
        Ok(())
    }
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_IMAGE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const CONFIG_TYPES: [&str; 2] = [
    OCI_IMAGE_CONFIG,
    "application/vnd.docker.container.image.v1+json",
];
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Where an import reads from, as `kiln image import` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    OciDir {
        dir: PathBuf,
        tag: Option<String>,
    },
    OciArchive {
        file: PathBuf,
        tag: Option<String>,
    },
    DockerArchive {
        file: PathBuf,
    },
    /// An image `kiln image pull` fetched into a layout of its own (never parsed from
    /// text): `reference` is `REGISTRY/REPO@sha256:HEX`.
    Pulled {
        layout: PathBuf,
        reference: String,
    },
}

impl Source {
    /// `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]` or `docker-archive:FILE`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |reason: &str| RunnerError::invalid("source", format!("{text:?}: {reason}"));
        let (transport, rest) = text.split_once(':').ok_or_else(|| {
            bad("expected oci:DIR[:TAG], oci-archive:FILE[:TAG] or docker-archive:FILE")
        })?;
        // A tag follows the last ':' unless that part holds a '/' (then it is the path's).
        let path_and_tag = |rest: &str| -> (PathBuf, Option<String>) {
            match rest.rsplit_once(':') {
                Some((path, tag)) if !tag.contains('/') && !path.is_empty() => {
                    (PathBuf::from(path), Some(tag.to_string()))
                }
                _ => (PathBuf::from(rest), None),
            }
        };
        if rest.is_empty() {
            return Err(bad("no path"));
        }
        let source = match transport {
            "oci" => {
                let (dir, tag) = path_and_tag(rest);
                Source::OciDir { dir, tag }
            }
            "oci-archive" => {
                let (file, tag) = path_and_tag(rest);
                Source::OciArchive { file, tag }
            }
            "docker-archive" => Source::DockerArchive {
                file: PathBuf::from(rest),
            },
            _ => {
                return Err(bad(
                    "the transport must be oci, oci-archive or docker-archive",
                ))
            }
        };
        if let Source::OciDir { tag: Some(tag), .. } | Source::OciArchive { tag: Some(tag), .. } =
            &source
        {
            if tag.is_empty() || tag.len() > 128 || tag.contains(char::is_control) {
                return Err(bad("bad tag"));
            }
        }
        Ok(source)
    }

    /// The source as recorded in provenance: the transport, the file or directory's own
    /// name (not where it was on the importing host) and the tag.
    pub fn public(&self) -> String {
        let base = |path: &Path| {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| ".".into())
        };
        match self {
            Source::OciDir { dir, tag } => with_tag(&format!("oci:{}", base(dir)), tag),
            Source::OciArchive { file, tag } => {
                with_tag(&format!("oci-archive:{}", base(file)), tag)
            }
            Source::DockerArchive { file } => format!("docker-archive:{}", base(file)),
            Source::Pulled { reference, .. } => reference.clone(),
        }
    }

    /// A name for the image when the operator gives none: the tag's repository, else the
    /// file's name without extension, made an image name if it can be.
    pub fn default_name(&self, repo_tag: Option<&str>) -> String {
        let from = match (self, repo_tag) {
            (Source::Pulled { reference, .. }, _) => {
                let repo = reference.split('@').next().unwrap_or(reference);
                repo.rsplit('/').next().unwrap_or(repo).to_string()
            }
            (_, Some(repo_tag)) => {
                let repo = repo_tag.rsplit_once(':').map_or(repo_tag, |(r, _)| r);
                repo.rsplit('/').next().unwrap_or(repo).to_string()
            }
            (Source::OciDir { dir: path, .. }, None)
            | (Source::OciArchive { file: path, .. }, None)
            | (Source::DockerArchive { file: path }, None) => path
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        from.to_ascii_lowercase()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '-'
                }
            })
            .collect::<String>()
            .trim_start_matches('.')
            .to_string()
    }
}

fn with_tag(base: &str, tag: &Option<String>) -> String {
    match tag {
        Some(tag) => format!("{base}:{tag}"),
        None => base.to_string(),
    }
}

/// An OCI image layout on disk: `oci-layout`, `index.json`, `blobs/sha256/HEX`.
pub struct Layout {
    dir: PathBuf,
}

/// The image an import settled on.
pub struct Chosen {
    pub manifest_digest: String,
    pub manifest: ImageManifest,
    pub config: ImageConfiguration,
    /// `org.opencontainers.image.ref.name` or the Docker archive's first RepoTags entry.
    pub repo_tag: Option<String>,
}

impl Layout {
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn blob_path(&self, hex: &str) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(hex)
    }

    /// Opens a blob, checked against its descriptor (size and SHA-256), at its start.
    pub fn open_blob(&self, descriptor: &Descriptor) -> Result<File> {
        let what = descriptor.digest().to_string();
        let hex = sha256_hex(descriptor)?;
        let path = self.blob_path(hex);
        let mut file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| {
                RunnerError::FailedPrecondition(format!(
                    "blob {what} is missing from the image: {e}"
                ))
            })?;
        let meta = file
            .metadata()
            .map_err(RunnerError::io_path("reading", &path))?;
        if !meta.is_file() {
            return Err(RunnerError::FailedPrecondition(format!(
                "blob {what} is not a regular file"
            )));
        }
        if meta.len() != descriptor.size() {
            return Err(RunnerError::FailedPrecondition(format!(
                "blob {what} is {} bytes, its descriptor says {}",
                meta.len(),
                descriptor.size()
            )));
        }
        let actual = hash_reader(&mut (&file).take(descriptor.size()))
            .map_err(RunnerError::io_path("reading", &path))?;
        if actual != hex {
            return Err(RunnerError::FailedPrecondition(format!(
                "blob {what} hashes to sha256:{actual}: its digest does not match"
            )));
        }
        file.rewind()
            .map_err(RunnerError::io_path("reading", &path))?;
        Ok(file)
    }

    /// A JSON document blob, checked and bounded.
    fn read_document(&self, descriptor: &Descriptor) -> Result<Vec<u8>> {
        if descriptor.size() > MAX_DOCUMENT_BYTES {
            return Err(RunnerError::FailedPrecondition(format!(
                "{} is {} bytes, more than the {MAX_DOCUMENT_BYTES} a document may have",
                descriptor.digest(),
                descriptor.size()
            )));
        }
        let mut bytes = Vec::new();
        self.open_blob(descriptor)?
            .take(MAX_DOCUMENT_BYTES)
            .read_to_end(&mut bytes)
            .map_err(RunnerError::io("reading a blob"))?;
        Ok(bytes)
    }

    /// The image of the layout's index.json that the tag names (or the only one) for this
    /// host's platform.
    pub fn choose(&self, tag: Option<&str>) -> Result<Chosen> {
        let layout: serde_json::Value =
            serde_json::from_slice(&read_bounded(&self.dir.join("oci-layout"))?)
                .map_err(|e| bad_document("oci-layout", e))?;
        if layout.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
            return Err(RunnerError::FailedPrecondition(
                "not an OCI image layout (oci-layout must say imageLayoutVersion 1.0.0)".into(),
            ));
        }
        let index: ImageIndex =
            serde_json::from_slice(&read_bounded(&self.dir.join("index.json"))?)
                .map_err(|e| bad_document("index.json", e))?;
        let mut candidates: Vec<Descriptor> = index.manifests().clone();
        if let Some(tag) = tag {
            candidates.retain(|d| ref_name(d) == Some(tag));
            if candidates.is_empty() {
                let tags: Vec<&str> = index.manifests().iter().filter_map(ref_name).collect();
                return Err(RunnerError::FailedPrecondition(format!(
                    "index.json names no image {tag:?} (it has: {})",
                    if tags.is_empty() {
                        "no tags".into()
                    } else {
                        tags.join(", ")
                    }
                )));
            }
        }
        let repo_tag = candidates.iter().find_map(ref_name).map(String::from);
        let manifests = self.flatten(candidates, 0, &mut IndexBudget::default())?;
        let descriptor = choose_platform(manifests)?;
        let (manifest_digest, manifest) = self.manifest(&descriptor)?;
        let config = self.config(&manifest)?;
        Ok(Chosen {
            manifest_digest,
            manifest,
            config,
            repo_tag,
        })
    }

    /// Image manifests behind these descriptors, nested indexes opened.
    fn flatten(
        &self,
        descriptors: Vec<Descriptor>,
        depth: usize,
        budget: &mut IndexBudget,
    ) -> Result<Vec<Descriptor>> {
        budget.spend(descriptors.len())?;
        let mut manifests = Vec::new();
        for descriptor in descriptors {
            match descriptor.media_type().as_ref() {
                OCI_MANIFEST | DOCKER_MANIFEST => manifests.push(descriptor),
                OCI_INDEX | DOCKER_LIST if depth < MAX_INDEX_DEPTH => {
                    let bytes = self.read_document(&descriptor)?;
                    let nested: ImageIndex = serde_json::from_slice(&bytes)
                        .map_err(|e| bad_document("an image index", e))?;
                    manifests.extend(self.flatten(
                        nested.manifests().clone(),
                        depth + 1,
                        budget,
                    )?);
                }
                OCI_INDEX | DOCKER_LIST => {
                    return Err(RunnerError::FailedPrecondition(
                        "image indexes nest too deep".into(),
                    ))
                }
                // Attestations, signatures and other artifacts are not images.
                _ => {}
            }
        }
        Ok(manifests)
    }

    /// A manifest blob, checked, and its digest.
    pub fn manifest(&self, descriptor: &Descriptor) -> Result<(String, ImageManifest)> {
        let bytes = self.read_document(descriptor)?;
        let manifest: ImageManifest =
            serde_json::from_slice(&bytes).map_err(|e| bad_document("the image manifest", e))?;
        Ok((sha256_hex(descriptor)?.to_string(), manifest))
    }

    fn config(&self, manifest: &ImageManifest) -> Result<ImageConfiguration> {
        let descriptor = manifest.config();
        if !CONFIG_TYPES.contains(&descriptor.media_type().as_ref()) {
            return Err(RunnerError::FailedPrecondition(format!(
                "the manifest's config is a {}, not an image config: not a container image",
                descriptor.media_type()
            )));
        }
        let bytes = self.read_document(descriptor)?;
        let config: ImageConfiguration =
            serde_json::from_slice(&bytes).map_err(|e| bad_document("the image config", e))?;
        let (os, arch) = (config.os().to_string(), config.architecture().to_string());
        if os != "linux" || arch != host_arch() {
            return Err(RunnerError::FailedPrecondition(format!(
                "the image is for {os}/{arch}; this host runs linux/{}",
                host_arch()
            )));
        }
        if config.rootfs().diff_ids().len() != manifest.layers().len() {
            return Err(RunnerError::FailedPrecondition(format!(
                "the config lists {} layer digests for the manifest's {} layers",
                config.rootfs().diff_ids().len(),
                manifest.layers().len()
            )));
        }
        Ok(config)
    }
}

fn ref_name(descriptor: &Descriptor) -> Option<&str> {
    descriptor
        .annotations()
        .as_ref()
        .and_then(|a| a.get(REF_NAME))
        .map(String::as_str)
}

/// The OCI name of this host's architecture (Go's GOARCH).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The manifest for linux on this host's architecture, or the only one (without a
/// platform, its config says).
pub(super) fn choose_platform(manifests: Vec<Descriptor>) -> Result<Descriptor> {
    let described = |d: &Descriptor| {
        d.platform()
            .as_ref()
            .map(|p| format!("{}/{}", p.os(), p.architecture()))
    };
    let wanted = format!("linux/{}", host_arch());
    let (with_platform, without): (Vec<_>, Vec<_>) =
        manifests.into_iter().partition(|d| described(d).is_some());
    let mut matching: Vec<Descriptor> = with_platform
        .iter()
        .filter(|d| described(d).as_deref() == Some(wanted.as_str()))
        .cloned()
        .collect();
    if matching.is_empty() {
        matching = without;
    }
    match matching.len() {
        1 => Ok(matching.remove(0)),
        0 if with_platform.is_empty() => Err(RunnerError::FailedPrecondition(
            "the layout holds no image manifest".into(),
        )),
        0 => Err(RunnerError::FailedPrecondition(format!(
            "no image for {wanted} (the index has: {})",
            with_platform
                .iter()
                .filter_map(described)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        n => Err(RunnerError::FailedPrecondition(format!(
            "the index holds {n} images for {wanted}; name one with :TAG"
        ))),
    }
}

/// The hex SHA-256 of a descriptor, refusing other algorithms.
pub fn sha256_hex(descriptor: &Descriptor) -> Result<&str> {
    let digest = descriptor.digest();
    match descriptor.as_digest_sha256() {
        Some(hex) if check_digest("digest", hex).is_ok() => Ok(hex),
        _ => Err(RunnerError::FailedPrecondition(format!(
            "digest {digest} is not a SHA-256 digest"
        ))),
    }
}

fn bad_document(what: &str, err: serde_json::Error) -> RunnerError {
    RunnerError::FailedPrecondition(format!("{what} is not valid: {err}"))
}

/// A small file (oci-layout, index.json, manifest.json), at most [`MAX_DOCUMENT_BYTES`].
fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            RunnerError::FailedPrecondition(format!(
                "{}: {e}",
                path.file_name().unwrap_or_default().to_string_lossy()
            ))
        })?;
    let mut bytes = Vec::new();
    file.take(MAX_DOCUMENT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(RunnerError::io_path("reading", path))?;
    if bytes.len() as u64 > MAX_DOCUMENT_BYTES {
        return Err(RunnerError::FailedPrecondition(format!(
            "{} is larger than {MAX_DOCUMENT_BYTES} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

pub fn hash_reader(reader: &mut impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    io::copy(reader, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// The regular-file members of an archive, copied into `dir` under names of Kiln's own
/// (member names are never used as paths): member name -> copy.
fn extract_members(archive: &Path, dir: &Path) -> Result<HashMap<String, PathBuf>> {
    let file = File::open(archive)
        .map_err(|e| RunnerError::FailedPrecondition(format!("{}: {e}", archive.display())))?;
    let mut tar = tar::Archive::new(io::BufReader::new(file));
    let mut members = HashMap::new();
    for entry in tar
        .entries()
        .map_err(RunnerError::io("reading the archive"))?
    {
        let mut entry = entry.map_err(RunnerError::io("reading the archive"))?;
        if !matches!(
            entry.header().entry_type(),
            tar::EntryType::Regular | tar::EntryType::Continuous
        ) {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes())
            .trim_start_matches("./")
            .to_string();
        if members.len() >= MAX_ARCHIVE_MEMBERS {
            return Err(RunnerError::FailedPrecondition(format!(
                "the archive has more than {MAX_ARCHIVE_MEMBERS} files"
            )));
        }
        let copy = dir.join(format!("member-{}", members.len()));
        let mut out = File::create(&copy).map_err(RunnerError::io_path("creating", &copy))?;
        io::copy(&mut entry, &mut out).map_err(RunnerError::io("reading the archive"))?;
        members.insert(name, copy);
    }
    Ok(members)
}

/// An OCI archive (a tar of a layout) laid out as a layout in `dir`.
pub fn unpack_oci_archive(archive: &Path, dir: &Path) -> Result<Layout> {
    let members_dir = dir.join("members");
    fs::create_dir(&members_dir).map_err(RunnerError::io_path("creating", &members_dir))?;
    let members = extract_members(archive, &members_dir)?;
    let blobs = dir.join("layout").join("blobs").join("sha256");
    fs::create_dir_all(&blobs).map_err(RunnerError::io_path("creating", &blobs))?;
    for (name, copy) in members {
        let dest = match name.as_str() {
            "oci-layout" | "index.json" => dir.join("layout").join(&name),
            _ => match name.strip_prefix("blobs/sha256/") {
                Some(hex) if check_digest("blob", hex).is_ok() => blobs.join(hex),
                _ => continue,
            },
        };
        fs::rename(&copy, &dest).map_err(RunnerError::io_path("storing", &dest))?;
    }
    Ok(Layout::at(&dir.join("layout")))
}

/// One image of a Docker archive's manifest.json.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerImage {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// A Docker archive (`docker save`) as an OCI layout in `dir`: its config and layers
/// become blobs, and Kiln writes the OCI manifest that lists them (the archive has none),
/// so the same archive always gives the same manifest digest. The config's layer digests
/// (rootfs.diff_ids) are checked against the layers when they are unpacked.
pub fn unpack_docker_archive(archive: &Path, dir: &Path) -> Result<(Layout, Option<String>)> {
    let members_dir = dir.join("members");
    fs::create_dir(&members_dir).map_err(RunnerError::io_path("creating", &members_dir))?;
    let members = extract_members(archive, &members_dir)?;
    let member = |name: &str| {
        members.get(name.trim_start_matches("./")).ok_or_else(|| {
            RunnerError::FailedPrecondition(format!("the archive has no file {name:?}"))
        })
    };
    let images: Vec<DockerImage> = serde_json::from_slice(&read_bounded(member("manifest.json")?)?)
        .map_err(|e| bad_document("manifest.json", e))?;
    let [image] = <[DockerImage; 1]>::try_from(images).map_err(|images| {
        RunnerError::FailedPrecondition(format!(
            "the archive holds {} images; save one image per archive",
            images.len()
        ))
    })?;
    let layout_dir = dir.join("layout");
    let blobs = layout_dir.join("blobs").join("sha256");
    fs::create_dir_all(&blobs).map_err(RunnerError::io_path("creating", &blobs))?;
    let store = |path: &Path| -> Result<(String, u64)> {
        let meta = fs::metadata(path).map_err(RunnerError::io_path("reading", path))?;
        let mut file = File::open(path).map_err(RunnerError::io_path("reading", path))?;
        let hex = hash_reader(&mut file).map_err(RunnerError::io_path("reading", path))?;
        let dest = blobs.join(&hex);
        // A layer listed twice is one blob.
        if !dest.exists() {
            fs::copy(path, &dest).map_err(RunnerError::io_path("storing", &dest))?;
        }
        Ok((hex, meta.len()))
    };
    let config_path = member(&image.config)?.clone();
    if fs::metadata(&config_path).map(|m| m.len()).unwrap_or(0) > MAX_DOCUMENT_BYTES {
        return Err(RunnerError::FailedPrecondition(format!(
            "the config is larger than {MAX_DOCUMENT_BYTES} bytes"
        )));
    }
    let (config_hex, config_size) = store(&config_path)?;
    let mut layers = Vec::new();
    // A member listed again is not read again: reading stays bounded by the archive.
    let mut stored: HashMap<PathBuf, (String, u64)> = HashMap::new();
    for layer in &image.layers {
        let path = member(layer)?.clone();
        let (hex, size) = match stored.get(&path) {
            Some(known) => known.clone(),
            None => {
                let known = store(&path)?;
                stored.insert(path.clone(), known.clone());
                known
            }
        };
        let media_type = match compression_of(
            &mut File::open(&path).map_err(RunnerError::io_path("reading", &path))?,
        )
        .map_err(RunnerError::io_path("reading", &path))?
        {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
        };
        layers.push(serde_json::json!({
            "mediaType": media_type, "digest": format!("sha256:{hex}"), "size": size,
        }));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": CONFIG_TYPES[0],
            "digest": format!("sha256:{config_hex}"),
            "size": config_size,
        },
        "layers": layers,
    });
    let bytes = serde_json::to_vec(&manifest)
        .map_err(|e| RunnerError::Internal(format!("encoding a manifest: {e}")))?;
    let manifest_hex = hex::encode(Sha256::digest(&bytes));
    let manifest_path = blobs.join(&manifest_hex);
    fs::write(&manifest_path, &bytes).map_err(RunnerError::io_path("writing", &manifest_path))?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": OCI_MANIFEST,
            "digest": format!("sha256:{manifest_hex}"),
            "size": bytes.len(),
        }],
    });
    fs::write(layout_dir.join("index.json"), index.to_string())
        .map_err(RunnerError::io("writing index.json"))?;
    fs::write(
        layout_dir.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .map_err(RunnerError::io("writing oci-layout"))?;
    let repo_tag = image.repo_tags.and_then(|tags| tags.into_iter().next());
    Ok((Layout::at(&layout_dir), repo_tag))
}

/// How a layer is compressed, by its first bytes (media types are not always honest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Reads the first bytes of `file` and rewinds it.
pub fn compression_of(file: &mut File) -> io::Result<Compression> {
    let mut magic = [0u8; 4];
    let mut read = 0;
    while read < magic.len() {
        match file.read(&mut magic[read..])? {
            0 => break,
            n => read += n,
        }
    }
    file.rewind()?;
    Ok(match &magic[..read] {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
        _ => Compression::None,
    })
}
