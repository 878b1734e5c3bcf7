//! `kiln image import`: an OCI layout or a Docker archive, unpacked safely into a tree
//! stored by manifest digest (`<state>/images/.oci/HEX/rootfs`, with its record beside it)
//! and named by a record `<state>/images/NAME/image.json`.
//!
//! Everything happens in a staging directory under the images directory; only a complete,
//! hashed tree is renamed into place, so a failed import leaves nothing half-installed.

use std::cell::RefCell;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::rc::Rc;

use sha2::{Digest, Sha256};

use super::oci::{self, Compression, Layout, Source};
use super::unpack::{Limits, Report, Unpacker};
use super::{tree_digest, write_json_atomically, ImageRecord, Images, HOST_IMAGE};
use crate::error::{Result, RunnerError};
use crate::spec::check_image_name;

/// Variables an image's config may set, and their total bytes.
const MAX_ENV_VARS: usize = 1024;
const MAX_ENV_BYTES: usize = 1 << 20;

/// What an import did.
#[derive(Debug)]
pub struct Imported {
    pub record: ImageRecord,
    pub report: Report,
    /// The same manifest was already installed: its tree was kept.
    pub already_installed: bool,
    /// The digest the name had before, if it named another image.
    pub replaced: Option<String>,
}

impl Images {
    /// Imports the image at `source` (see [`Source::parse`]) as `name` (or a name derived
    /// from its tag or file name).
    pub fn import(&self, source: &str, name: Option<&str>, limits: Limits) -> Result<Imported> {
        self.import_from(Source::parse(source)?, name, limits)
    }

    /// [`Images::import`] of a parsed source; `kiln image pull` hands over its layout here
    /// so that pulled and imported images are checked and unpacked by the same code.
    pub(super) fn import_from(
        &self,
        source: Source,
        name: Option<&str>,
        limits: Limits,
    ) -> Result<Imported> {
        let staging = tempfile::Builder::new()
            .prefix(".import-")
            .tempdir_in(&self.dir)
            .map_err(RunnerError::io("creating a staging directory"))?;
        let (layout, tag, archive_tag) = match &source {
            Source::OciDir { dir, tag } => (Layout::at(dir), tag.as_deref(), None),
            Source::OciArchive { file, tag } => (
                oci::unpack_oci_archive(file, staging.path())?,
                tag.as_deref(),
                None,
            ),
            Source::DockerArchive { file } => {
                let (layout, repo_tag) = oci::unpack_docker_archive(file, staging.path())?;
                (layout, None, repo_tag)
            }
            Source::Pulled { layout, .. } => (Layout::at(layout), None, None),
        };
        let chosen = layout.choose(tag)?;
        let repo_tag = archive_tag.as_deref().or(chosen.repo_tag.as_deref());
        let name = self.import_name(&source, name, repo_tag, &chosen.manifest_digest)?;
        let env = image_env(&chosen.config)?;
        let manifest = chosen.manifest_digest.clone();
        let content = self.oci_dir().join(&manifest);
        let existing = self.read_content_record(&manifest)?;

        // An installed tree that still matches its record is only named again.
        let intact = existing.filter(|record| {
            tree_digest(&content.join("rootfs")).is_ok_and(|d| d == record.tree_digest)
        });
        let (tree, report, already_installed) = match intact {
            Some(record) => (record.tree_digest, Report::default(), true),
            _ => {
                let unpacked = staging.path().join("content");
                let rootfs = unpacked.join("rootfs");
                fs::create_dir_all(&rootfs).map_err(RunnerError::io_path("creating", &rootfs))?;
                let report = unpack_layers(&layout, &chosen, &rootfs, limits)?;
                let tree = tree_digest(&rootfs)?;
                // The step's uid reads the tree through the "other" bits.
                fs::set_permissions(&rootfs, fs::Permissions::from_mode(0o755))
                    .map_err(RunnerError::io_path("chmod", &rootfs))?;
                fs::set_permissions(&unpacked, fs::Permissions::from_mode(0o711))
                    .map_err(RunnerError::io_path("chmod", &unpacked))?;
                let record = ImageRecord {
                    name: name.clone(),
                    tree_digest: tree.clone(),
                    source: source.public(),
                    source_sha256: manifest.clone(),
                    manifest_digest: Some(manifest.clone()),
                    env: env.clone(),
                    platform: Some(format!("linux/{}", oci::host_arch())),
                    skipped: report.skipped.clone(),
                };
                self.ensure_sbom(&unpacked, &name, &manifest)?;
                write_json_atomically(&unpacked.join("image.json"), &record)?;
                fs::create_dir_all(self.oci_dir())
                    .map_err(RunnerError::io_path("creating", &self.oci_dir()))?;
                fs::set_permissions(self.oci_dir(), fs::Permissions::from_mode(0o711))
                    .map_err(RunnerError::io_path("chmod", &self.oci_dir()))?;
                if content.exists() {
                    // A tree that no longer matches its record, or one without a record.
                    fs::remove_dir_all(&content)
                        .map_err(RunnerError::io_path("removing", &content))?;
                }
                fs::rename(&unpacked, &content)
                    .map_err(RunnerError::io_path("storing", &content))?;
                (tree, report, false)
            }
        };
        // A tree imported before Kiln recorded SBOMs gets one now.
        self.ensure_sbom(&content, &name, &manifest)?;
        let record = ImageRecord {
            name: name.clone(),
            tree_digest: tree,
            source: source.public(),
            source_sha256: manifest.clone(),
            manifest_digest: Some(manifest),
            env,
            platform: Some(format!("linux/{}", oci::host_arch())),
            skipped: report.skipped.clone(),
        };
        let replaced = self
            .read_record(&name)?
            .map(|old| old.digest().to_string())
            .filter(|old| old != record.digest());
        let name_dir = self.dir.join(&name);
        fs::create_dir_all(&name_dir).map_err(RunnerError::io_path("creating", &name_dir))?;
        write_json_atomically(&self.record_path(&name), &record)?;
        Ok(Imported {
            record,
            report,
            already_installed,
            replaced,
        })
    }

    /// The name an import installs under: `name` if given, else one from the image's
    /// own metadata or file name, which may not take over a name that names another
    /// image.
    fn import_name(
        &self,
        source: &Source,
        name: Option<&str>,
        repo_tag: Option<&str>,
        manifest_digest: &str,
    ) -> Result<String> {
        let given = name.is_some();
        let name = match name {
            Some(name) => name.to_string(),
            None => source.default_name(repo_tag),
        };
        check_image_name(&name)
            .map_err(|e| RunnerError::invalid("name", format!("{e} (give one with --name)")))?;
        if name == HOST_IMAGE {
            return Err(RunnerError::invalid("name", "\"host\" is built in"));
        }
        // A name from the image's own metadata (its ref.name or RepoTags) or its file
        // name never re-points one jobs and allow-lists already use; a pull's name is the
        // repository the operator typed.
        if !given && !matches!(source, Source::Pulled { .. }) {
            if let Some(old) = self.read_record(&name)? {
                if old.digest() != manifest_digest {
                    return Err(RunnerError::FailedPrecondition(format!(
                        "{name:?} names sha256:{} already, and this image would take that \
                         name from its own tag or file name: give --name {name} to replace it",
                        old.digest()
                    )));
                }
            }
        }
        Ok(name)
    }
}

/// The config's `Env` (`KEY=VALUE` each), checked. WorkingDir, User, Entrypoint and Cmd
/// are not used: a step runs its own argv as the build user in /workspace.
fn image_env(config: &oci_spec::image::ImageConfiguration) -> Result<Vec<String>> {
    let env = config
        .config()
        .as_ref()
        .and_then(|c| c.env().clone())
        .unwrap_or_default();
    let bytes: usize = env.iter().map(String::len).sum();
    if env.len() > MAX_ENV_VARS || bytes > MAX_ENV_BYTES {
        return Err(RunnerError::FailedPrecondition(format!(
            "the image config's Env is larger than {MAX_ENV_VARS} variables or {MAX_ENV_BYTES} bytes"
        )));
    }
    for var in &env {
        match var.split_once('=') {
            Some((key, _)) if !key.is_empty() && !var.contains('\0') => {}
            _ => {
                return Err(RunnerError::FailedPrecondition(format!(
                    "the image config's Env has {var:?}, not KEY=VALUE"
                )))
            }
        }
    }
    Ok(env)
}

/// Hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// [`Hashing`] into a hasher held elsewhere too.
struct SharedHashing<R> {
    inner: R,
    hasher: Rc<RefCell<Sha256>>,
}

impl<R: Read> Read for SharedHashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.borrow_mut().update(&buf[..n]);
        Ok(n)
    }
}

fn hashing<R: Read>(inner: R) -> Hashing<R> {
    Hashing {
        inner,
        hasher: Sha256::new(),
    }
}

/// Every layer in order, each checked twice: the blob against its descriptor before it is
/// read, and while it is read (the file may not change in between), and the uncompressed
/// stream against the config's diff_id.
fn unpack_layers(
    layout: &Layout,
    chosen: &oci::Chosen,
    rootfs: &Path,
    limits: Limits,
) -> Result<Report> {
    // Each blob is read in full (twice: checked, then unpacked) whatever it decompresses
    // to, and data a decompressor skips (a zstd skippable frame) is never metered: the
    // blobs together are held to what the layers may decompress to.
    let blob_bytes = chosen
        .manifest
        .layers()
        .iter()
        .try_fold(0u64, |sum, layer| sum.checked_add(layer.size()))
        .unwrap_or(u64::MAX);
    if blob_bytes > limits.max_stream_bytes() {
        return Err(RunnerError::FailedPrecondition(format!(
            "the layers are {blob_bytes} bytes, more than the {} they may decompress to",
            limits.max_stream_bytes()
        )));
    }
    let mut unpacker = Unpacker::new(rootfs, limits).map_err(layer_error(0))?;
    let diff_ids = chosen.config.rootfs().diff_ids();
    for (i, (descriptor, diff_id)) in chosen.manifest.layers().iter().zip(diff_ids).enumerate() {
        let media_type = descriptor.media_type().to_string();
        if !(media_type.contains(".layer.") || media_type.contains(".rootfs.diff.")) {
            return Err(RunnerError::FailedPrecondition(format!(
                "layer {i} is a {media_type}, not a filesystem layer"
            )));
        }
        let expected_blob = oci::sha256_hex(descriptor)?.to_string();
        let mut file = layout.open_blob(descriptor)?;
        let compression = oci::compression_of(&mut file)
            .map_err(RunnerError::io(format!("reading layer {i}")))?;
        // Reads through `&File` share the file's offset: after the decompressor, the rest
        // of the blob is read on from where it stopped, and every byte is hashed once.
        let blob_hasher = Rc::new(RefCell::new(Sha256::new()));
        let compressed = SharedHashing {
            inner: &file,
            hasher: blob_hasher.clone(),
        };
        let uncompressed: Box<dyn Read + '_> = match compression {
            Compression::None => Box::new(compressed),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(compressed)),
            Compression::Zstd => Box::new(
                zstd::stream::read::Decoder::new(compressed)
                    .map_err(RunnerError::io(format!("reading layer {i}")))?,
            ),
        };
        let mut diff = hashing(uncompressed);
        let mut metered = unpacker.meter(&mut diff);
        unpacker.apply_layer(&mut metered).map_err(layer_error(i))?;
        // The rest of the stream (the tar's end blocks, padding) counts for the digests.
        io::copy(&mut metered, &mut io::sink())
            .map_err(|e| RunnerError::FailedPrecondition(format!("layer {i}: reading: {e}")))?;
        drop(metered);
        let Hashing { inner, hasher } = diff;
        drop(inner);
        let diff_hex = hex::encode(hasher.finalize());
        if diff_id.strip_prefix("sha256:") != Some(diff_hex.as_str()) {
            return Err(RunnerError::FailedPrecondition(format!(
                "layer {i}: its content hashes to sha256:{diff_hex}, the config's diff_id is {diff_id}"
            )));
        }
        // The decompressor may stop at its stream's end: the blob is hashed to its end.
        let mut rest = SharedHashing {
            inner: &file,
            hasher: blob_hasher.clone(),
        };
        io::copy(&mut rest, &mut io::sink())
            .map_err(RunnerError::io(format!("reading layer {i}")))?;
        drop(rest);
        let blob_hex = hex::encode(blob_hasher.take().finalize());
        if blob_hex != expected_blob {
            return Err(RunnerError::FailedPrecondition(format!(
                "layer {i}: the blob changed while it was read (sha256:{blob_hex})"
            )));
        }
    }
    Ok(unpacker.report().clone())
}

fn layer_error(i: usize) -> impl Fn(super::unpack::UnpackError) -> RunnerError {
    move |e| RunnerError::FailedPrecondition(format!("layer {i}: {e}"))
}

#[cfg(test)]
mod tests;
