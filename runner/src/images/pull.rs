//! `kiln image pull REGISTRY/REPO@sha256:HEX` (or `:TAG`, resolved once to a digest).
//!
//! The pull fetches the image into a temporary OCI layout and hands it to
//! [`Images::import_from`], so a pulled image is checked (every blob against its
//! descriptor's size and SHA-256, documents bounded, the config's diff_ids) and unpacked by
//! exactly the code that imports a layout from disk. Before that, the pull itself never
//! holds more than it must (see [`crate::registry`]): the layers are read only up to the
//! unpack limit together, and a manifest pulled by digest must hash to it.

use std::fs;
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use sha2::{Digest, Sha256};

use super::import::Imported;
use super::oci::{self, Source, MAX_DOCUMENT_BYTES, MAX_INDEX_DEPTH};
use super::unpack::Limits;
use super::Images;
use crate::error::{Result, RunnerError};
use crate::registry::{check_bytes, parse_document, registry_auth, Operation, Session, Target};

#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    pub name: Option<String>,
    /// Registries (`HOST:PORT` or `HOST`) spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// A docker-style config.json; None: `$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json` when present.
    pub auth_file: Option<PathBuf>,
    pub limits: Limits,
}

/// What a pull did.
#[derive(Debug)]
pub struct Pulled {
    pub imported: Imported,
    /// `REGISTRY/REPO@sha256:HEX`, the manifest that was unpacked.
    pub reference: String,
    /// The tag the reference was resolved from, if it named one.
    pub tag: Option<String>,
}

/// Image manifests behind these descriptors, nested indexes fetched (and stored).
/// Image manifests behind these descriptors, nested indexes fetched (and stored).
async fn flatten(
    session: &Session,
    blobs: &Path,
    descriptors: Vec<Descriptor>,
    depth: usize,
) -> Result<Vec<Descriptor>> {
    let mut manifests = Vec::new();
    let mut budget = oci::IndexBudget::default();
    let mut pending = vec![(descriptors, depth)];
    while let Some((descriptors, depth)) = pending.pop() {
        budget.spend(descriptors.len())?;
        for descriptor in descriptors {
            match descriptor.media_type().as_ref() {
                oci::OCI_MANIFEST | oci::DOCKER_MANIFEST => manifests.push(descriptor),
                oci::OCI_INDEX | oci::DOCKER_LIST if depth < MAX_INDEX_DEPTH => {
                    let bytes = session.fetch_described(&descriptor).await?;
                    let nested: ImageIndex = parse_document("an image index", &bytes)?;
                    store_blob(blobs, &bytes)?;
                    pending.push((nested.manifests().clone(), depth + 1));
                }
                oci::OCI_INDEX | oci::DOCKER_LIST => {
                    return Err(RunnerError::FailedPrecondition(
                        "image indexes nest too deep".into(),
                    ))
                }
                _ => {}
            }
        }
    }
    Ok(manifests)
}

/// Writes a document blob under its SHA-256; answers its hex digest.
fn store_blob(blobs: &Path, bytes: &[u8]) -> Result<String> {
    let hex = hex::encode(Sha256::digest(bytes));
    let path = blobs.join(&hex);
    fs::write(&path, bytes).map_err(RunnerError::io_path("writing", &path))?;
    Ok(hex)
}

fn descriptor(media_type: &str, hex: &str, size: usize) -> Result<Descriptor> {
    serde_json::from_value(serde_json::json!({
        "mediaType": media_type,
        "digest": format!("sha256:{hex}"),
        "size": size,
    }))
    .map_err(|e| RunnerError::Internal(format!("a descriptor: {e}")))
}

impl Images {
    /// Pulls `reference` (see [`Target::parse`]) and imports it.
    pub async fn pull(&self, reference: &str, options: &PullOptions) -> Result<Pulled> {
        let target = Target::parse(reference, &options.insecure_registries)?;
        let auth = registry_auth(options.auth_file.as_deref(), &target.registry)?;
        let session = Session::open(target.clone(), auth, Operation::Pull).await?;

        let staging = tempfile::Builder::new()
            .prefix(".pull-")
            .tempdir_in(&self.dir)
            .map_err(RunnerError::io("creating a staging directory"))?;
        let layout = staging.path().join("layout");
        let blobs = layout.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(RunnerError::io_path("creating", &blobs))?;

        let (top, media_type) = session.fetch_document(&target.reference).await?;
        let top_hex = hex::encode(Sha256::digest(&top));
        if target.pinned {
            check_bytes(
                &top,
                target.reference.trim_start_matches("sha256:"),
                top.len() as u64,
            )?;
        }
        store_blob(&blobs, &top)?;
        let top_descriptor = descriptor(&media_type, &top_hex, top.len())?;

        // The image manifest for this host, chosen as an import chooses it.
        let (manifest_hex, manifest_bytes) = match media_type.as_str() {
            oci::OCI_INDEX | oci::DOCKER_LIST => {
                let index: ImageIndex = parse_document("the image index", &top)?;
                let manifests = flatten(&session, &blobs, index.manifests().clone(), 1).await?;
                let chosen = oci::choose_platform(manifests)?;
                let bytes = session.fetch_described(&chosen).await?;
                (store_blob(&blobs, &bytes)?, bytes)
            }
            oci::OCI_MANIFEST | oci::DOCKER_MANIFEST => (top_hex.clone(), top.clone()),
            other => {
                return Err(RunnerError::FailedPrecondition(format!(
                    "{reference} is a {other}, not an image"
                )))
            }
        };
        let manifest: ImageManifest = parse_document("the image manifest", &manifest_bytes)?;

        let config = manifest.config();
        if config.size() > MAX_DOCUMENT_BYTES {
            return Err(RunnerError::FailedPrecondition(format!(
                "the config is {} bytes, more than the {MAX_DOCUMENT_BYTES} a document may have",
                config.size()
            )));
        }
        let layer_bytes = manifest
            .layers()
            .iter()
            .try_fold(0u64, |sum, layer| sum.checked_add(layer.size()))
            .unwrap_or(u64::MAX);
        if layer_bytes > options.limits.max_bytes {
            return Err(RunnerError::FailedPrecondition(format!(
                "the layers are {layer_bytes} bytes, more than the {} an image may unpack to",
                options.limits.max_bytes
            )));
        }
        for blob in std::iter::once(config).chain(manifest.layers()) {
            let dest = blobs.join(oci::sha256_hex(blob)?);
            // A layer listed twice is one blob.
            if !dest.exists() {
                session.fetch_blob(blob, &dest).await?;
            }
        }
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [top_descriptor]});
        fs::write(layout.join("index.json"), index.to_string())
            .map_err(RunnerError::io("writing index.json"))?;
        fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .map_err(RunnerError::io("writing oci-layout"))?;

        let pinned = format!(
            "{}/{}@sha256:{manifest_hex}",
            target.registry, target.repository
        );
        let source = Source::Pulled {
            layout,
            reference: pinned.clone(),
        };
        let imported = self.import_from(source, options.name.as_deref(), options.limits)?;
        if imported.record.manifest_digest.as_deref() != Some(manifest_hex.as_str()) {
            return Err(RunnerError::Internal(format!(
                "the import chose sha256:{}, the pull sha256:{manifest_hex}",
                imported.record.digest()
            )));
        }
        Ok(Pulled {
            imported,
            reference: pinned,
            tag: (!target.pinned).then(|| target.reference.clone()),
        })
    }
}

/// Whether an image record's source is a registry reference (`REGISTRY/REPO@sha256:HEX`)
/// rather than an import's (`oci:NAME[:TAG]`, ...: a file's own name, never with a '/').
pub fn is_registry_source(source: &str) -> bool {
    source.contains('/') && source.contains("@sha256:")
}

#[cfg(test)]
mod tests;
