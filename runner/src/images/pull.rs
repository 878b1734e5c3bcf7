//! `kiln image pull REGISTRY/REPO@sha256:HEX` (or `:TAG`, resolved once to a digest).
//!
//! A registry is untrusted. The pull fetches the image into a temporary OCI layout and
//! hands it to [`Images::import_from`], so a pulled image is checked (every blob against
//! its descriptor's size and SHA-256, documents bounded, the config's diff_ids) and
//! unpacked by exactly the code that imports a layout from disk. Before that, the pull
//! itself never holds more than it must: a manifest, index or config is read only up to
//! [`oci::MAX_DOCUMENT_BYTES`] (oci-client buffers a whole manifest, so manifests are
//! fetched here with reqwest), a blob only up to its descriptor's size, the layers only up
//! to the unpack limit together, and a manifest pulled by digest must hash to it.
//!
//! HTTPS by default; plain HTTP only for a loopback registry or one the operator lists
//! with `--insecure-registry` (Docker's convention), decided before any connection.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;

use super::import::Imported;
use super::oci::{self, Source, MAX_DOCUMENT_BYTES, MAX_INDEX_DEPTH};
use super::unpack::Limits;
use super::Images;
use crate::error::{Result, RunnerError};

/// The largest docker-style config.json read for credentials.
const MAX_AUTH_FILE_BYTES: u64 = 1 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A registry that stops sending for this long fails the pull.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
const MANIFEST_TYPES: [&str; 4] = [
    oci::OCI_MANIFEST,
    oci::OCI_INDEX,
    oci::DOCKER_MANIFEST,
    oci::DOCKER_LIST,
];

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

/// Where to pull from, decided before any connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// As the reference names it (and records keep it).
    pub registry: String,
    /// The host spoken to: `registry` but Docker Hub's API host for `docker.io`.
    endpoint: String,
    pub repository: String,
    /// `sha256:HEX` or a tag.
    pub reference: String,
    pub pinned: bool,
    pub plain_http: bool,
}

impl Target {
    /// `[http://|https://]REGISTRY/REPO@sha256:HEX` or `...REPO:TAG`. The registry must be
    /// named (no implicit Docker Hub). Plain HTTP only for loopback or listed registries.
    pub fn parse(text: &str, insecure_registries: &[String]) -> Result<Self> {
        let bad = |reason: String| RunnerError::invalid("reference", format!("{text:?}: {reason}"));
        let (scheme, rest) = match text.split_once("://") {
            Some((scheme @ ("http" | "https"), rest)) => (Some(scheme), rest),
            Some(_) => return Err(bad("the scheme may only be http:// or https://".into())),
            None => (None, text),
        };
        let (first, _) = rest.split_once('/').ok_or_else(|| {
            bad("expected REGISTRY/REPO@sha256:DIGEST or REGISTRY/REPO:TAG".into())
        })?;
        if !(first.contains('.') || first.contains(':') || first == "localhost") {
            return Err(bad(format!(
                "{first:?} is not a registry: name one (REGISTRY/REPO@sha256:DIGEST)"
            )));
        }
        let parsed = Reference::from_str(rest).map_err(|e| bad(e.to_string()))?;
        let (reference, pinned) = match (parsed.digest(), parsed.tag()) {
            (Some(digest), _) => {
                let hex = digest.strip_prefix("sha256:").unwrap_or_default();
                crate::store::cas::check_digest("reference", hex)
                    .map_err(|_| bad("a digest is sha256: and 64 lower-case hex digits".into()))?;
                (digest.to_string(), true)
            }
            (None, Some(tag)) => (tag.to_string(), false),
            (None, None) => return Err(bad("name a digest (@sha256:...) or a tag (:TAG)".into())),
        };
        let registry = parsed.registry().to_string();
        let listed = insecure_registries.iter().any(|r| {
            r.eq_ignore_ascii_case(&registry) || r.eq_ignore_ascii_case(host_of(&registry))
        });
        let may_be_plain = is_loopback(&registry) || listed;
        let plain_http = match scheme {
            Some("https") => false,
            Some(_) if !may_be_plain => {
                return Err(bad(format!(
                    "{registry} is neither on loopback nor an insecure registry: plain HTTP \
                     is refused (list it with --insecure-registry {registry} to allow it)"
                )))
            }
            _ => may_be_plain,
        };
        Ok(Target {
            endpoint: parsed.resolve_registry().to_string(),
            registry,
            repository: parsed.repository().to_string(),
            reference,
            pinned,
            plain_http,
        })
    }

    fn oci_reference(&self, reference: &str) -> Reference {
        match reference.strip_prefix("sha256:") {
            Some(_) => Reference::with_digest(
                self.registry.clone(),
                self.repository.clone(),
                reference.to_string(),
            ),
            None => Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                reference.to_string(),
            ),
        }
    }

    fn manifest_url(&self, reference: &str) -> String {
        format!(
            "{}://{}/v2/{}/manifests/{reference}",
            if self.plain_http { "http" } else { "https" },
            self.endpoint,
            self.repository
        )
    }
}

/// `HOST` of `HOST:PORT`, `[V6]:PORT` or `HOST`.
fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(host, _)| host);
    }
    match registry.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => registry,
    }
}

fn is_loopback(registry: &str) -> bool {
    let host = host_of(registry);
    host.eq_ignore_ascii_case("localhost")
        || IpAddr::from_str(host).is_ok_and(|ip| ip.is_loopback())
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
}

#[derive(Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// The registry a docker config.json key names: `https://HOST[:PORT]/v1/` -> `HOST[:PORT]`.
fn auth_key_registry(key: &str) -> &str {
    let key = key.split_once("://").map_or(key, |(_, rest)| rest);
    key.split('/').next().unwrap_or(key)
}

fn same_registry(a: &str, b: &str) -> bool {
    const DOCKER_HUB: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];
    a.eq_ignore_ascii_case(b)
        || (DOCKER_HUB.iter().any(|h| h.eq_ignore_ascii_case(a))
            && DOCKER_HUB.iter().any(|h| h.eq_ignore_ascii_case(b)))
}

/// The credentials for `registry` from a docker-style config.json (`auths.REGISTRY.auth`,
/// base64 `user:password`, or `username` and `password`). Messages never hold them.
pub fn registry_auth(file: Option<&Path>, registry: &str) -> Result<RegistryAuth> {
    let path = match file {
        Some(path) => path.to_path_buf(),
        None => {
            let default = std::env::var_os("DOCKER_CONFIG")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))
                .map(|dir| dir.join("config.json"));
            match default {
                Some(path) if path.is_file() => path,
                _ => return Ok(RegistryAuth::Anonymous),
            }
        }
    };
    let mut bytes = Vec::new();
    fs::File::open(&path)
        .and_then(|f| f.take(MAX_AUTH_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(RunnerError::io_path("reading", &path))?;
    let unreadable = |why: &str| {
        RunnerError::FailedPrecondition(format!("registry credentials {}: {why}", path.display()))
    };
    if bytes.len() as u64 > MAX_AUTH_FILE_BYTES {
        return Err(unreadable("larger than 1 MiB"));
    }
    // serde_json's errors quote no input, only positions.
    let config: DockerConfig =
        serde_json::from_slice(&bytes).map_err(|e| unreadable(&e.to_string()))?;
    let Some(entry) = config
        .auths
        .iter()
        .find(|(key, _)| same_registry(auth_key_registry(key), registry))
        .map(|(_, entry)| entry)
    else {
        return Ok(RegistryAuth::Anonymous);
    };
    let bad_entry = || unreadable(&format!("auths entry for {registry} is not user:password"));
    match (&entry.auth, &entry.username, &entry.password) {
        (Some(auth), _, _) if !auth.is_empty() => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| bad_entry())?;
            let decoded = String::from_utf8(decoded).map_err(|_| bad_entry())?;
            let (user, password) = decoded.split_once(':').ok_or_else(bad_entry)?;
            Ok(RegistryAuth::Basic(user.to_string(), password.to_string()))
        }
        (_, Some(user), Some(password)) => Ok(RegistryAuth::Basic(user.clone(), password.clone())),
        _ => Ok(RegistryAuth::Anonymous),
    }
}

/// reqwest's and oci-client's TLS is rustls with the ring provider, as everywhere in Kiln.
fn install_tls_provider() {
    // Err: a provider is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn unavailable(
    registry: &str,
) -> impl Fn(oci_client::errors::OciDistributionError) -> RunnerError + '_ {
    move |e| RunnerError::Unavailable(format!("registry {registry}: {e}"))
}

/// One registry session: oci-client for authentication and blobs, reqwest for bounded
/// manifest reads with the same credentials.
struct Session {
    target: Target,
    client: Client,
    http: reqwest::Client,
    authorization: Option<String>,
}

impl Session {
    async fn open(target: Target, auth: RegistryAuth) -> Result<Self> {
        install_tls_provider();
        let protocol = if target.plain_http {
            // oci-client compares the host it speaks to.
            ClientProtocol::HttpsExcept(vec![target.endpoint.clone()])
        } else {
            ClientProtocol::Https
        };
        let client = Client::new(ClientConfig {
            protocol,
            // The platform is chosen as an import chooses it ([`oci::choose_platform`]).
            platform_resolver: None,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            user_agent: concat!("kiln/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        });
        let http = reqwest::Client::builder()
            // Registries answer manifests themselves; a redirect could lead anywhere.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| RunnerError::Internal(format!("an HTTP client: {e}")))?;
        let any = target.oci_reference(&target.reference);
        let token = client
            .auth(&any, &auth, RegistryOperation::Pull)
            .await
            .map_err(unavailable(&target.registry))?;
        let authorization = match (token, &auth) {
            (Some(token), _) => Some(format!("Bearer {token}")),
            (None, RegistryAuth::Basic(user, password)) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )),
            (None, _) => None,
        };
        Ok(Session {
            target,
            client,
            http,
            authorization,
        })
    }

    /// A manifest or index by tag or digest, at most [`MAX_DOCUMENT_BYTES`]: its bytes and
    /// media type.
    async fn fetch_document(&self, reference: &str) -> Result<(Vec<u8>, String)> {
        let registry = &self.target.registry;
        let url = self.target.manifest_url(reference);
        let mut request = self
            .http
            .get(&url)
            .header(reqwest::header::ACCEPT, MANIFEST_TYPES.join(", "));
        if let Some(authorization) = &self.authorization {
            request = request.header(reqwest::header::AUTHORIZATION, authorization);
        }
        let failed = |e: reqwest::Error| {
            RunnerError::Unavailable(format!("registry {registry}: manifest {reference}: {e}"))
        };
        let mut response = request.send().await.map_err(failed)?;
        if !response.status().is_success() {
            return Err(RunnerError::FailedPrecondition(format!(
                "registry {registry} answered {} for manifest {}/{reference}",
                response.status(),
                self.target.repository
            )));
        }
        let too_large = || {
            RunnerError::FailedPrecondition(format!(
                "registry {registry}: manifest {reference} is larger than the \
                 {MAX_DOCUMENT_BYTES} bytes a document may have"
            ))
        };
        if response
            .content_length()
            .is_some_and(|n| n > MAX_DOCUMENT_BYTES)
        {
            return Err(too_large());
        }
        let header_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_string());
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(failed)? {
            if (bytes.len() + chunk.len()) as u64 > MAX_DOCUMENT_BYTES {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        #[derive(Deserialize)]
        struct Typed {
            #[serde(rename = "mediaType")]
            media_type: Option<String>,
        }
        let typed: Typed = serde_json::from_slice(&bytes).map_err(|e| {
            RunnerError::FailedPrecondition(format!(
                "registry {registry}: manifest {reference} is not JSON: {e}"
            ))
        })?;
        let media_type = typed.media_type.or(header_type).ok_or_else(|| {
            RunnerError::FailedPrecondition(format!(
                "registry {registry}: manifest {reference} has no media type"
            ))
        })?;
        Ok((bytes, media_type))
    }

    /// A manifest or index a descriptor names, checked against its size and digest.
    async fn fetch_described(&self, descriptor: &Descriptor) -> Result<Vec<u8>> {
        let hex = oci::sha256_hex(descriptor)?;
        if descriptor.size() > MAX_DOCUMENT_BYTES {
            return Err(RunnerError::FailedPrecondition(format!(
                "{} is {} bytes, more than the {MAX_DOCUMENT_BYTES} a document may have",
                descriptor.digest(),
                descriptor.size()
            )));
        }
        let (bytes, _) = self.fetch_document(&format!("sha256:{hex}")).await?;
        check_bytes(&bytes, hex, descriptor.size())?;
        Ok(bytes)
    }

    /// A blob streamed into `dest`, no more than its descriptor's size, checked against it.
    async fn fetch_blob(&self, descriptor: &Descriptor, dest: &Path) -> Result<()> {
        let hex = oci::sha256_hex(descriptor)?.to_string();
        let size = descriptor.size();
        let registry = &self.target.registry;
        let wanted = OciDescriptor {
            media_type: descriptor.media_type().to_string(),
            digest: format!("sha256:{hex}"),
            size: i64::try_from(size).map_err(|_| {
                RunnerError::FailedPrecondition(format!("blob sha256:{hex} is too large"))
            })?,
            ..Default::default()
        };
        let reference = self.target.oci_reference(&self.target.reference);
        let mut stream = self
            .client
            .pull_blob_stream(&reference, &wanted)
            .await
            .map_err(unavailable(registry))?;
        let oversized = || {
            RunnerError::FailedPrecondition(format!(
                "registry {registry} sent more than the {size} bytes of blob sha256:{hex}"
            ))
        };
        if stream.content_length.is_some_and(|n| n > size) {
            return Err(oversized());
        }
        let mut file = tokio::fs::File::create(dest)
            .await
            .map_err(RunnerError::io_path("creating", dest))?;
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                RunnerError::Unavailable(format!("registry {registry}: blob sha256:{hex}: {e}"))
            })?;
            received += chunk.len() as u64;
            if received > size {
                return Err(oversized());
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(RunnerError::io_path("writing", dest))?;
        }
        file.sync_all()
            .await
            .map_err(RunnerError::io_path("syncing", dest))?;
        let actual = hex::encode(hasher.finalize());
        if received != size || actual != hex {
            return Err(RunnerError::FailedPrecondition(format!(
                "registry {registry} sent {received} bytes hashing to sha256:{actual} for blob \
                 sha256:{hex} of {size} bytes"
            )));
        }
        Ok(())
    }

    /// Image manifests behind these descriptors, nested indexes fetched (and stored).
    async fn flatten(
        &self,
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
                        let bytes = self.fetch_described(&descriptor).await?;
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
}

fn check_bytes(bytes: &[u8], hex: &str, size: u64) -> Result<()> {
    let actual = hex::encode(Sha256::digest(bytes));
    if actual != hex || bytes.len() as u64 != size {
        return Err(RunnerError::FailedPrecondition(format!(
            "the registry answered {} bytes hashing to sha256:{actual} for sha256:{hex} \
             ({size} bytes): its digest does not match",
            bytes.len()
        )));
    }
    Ok(())
}

fn parse_document<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| RunnerError::FailedPrecondition(format!("{what} is not valid: {e}")))
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
        let session = Session::open(target.clone(), auth).await?;

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
                let manifests = session
                    .flatten(&blobs, index.manifests().clone(), 1)
                    .await?;
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
