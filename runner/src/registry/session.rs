//! One authenticated conversation with a registry: oci-client for authentication and blob
//! transfers, reqwest for bounded document reads and writes with the same credentials.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use oci_spec::image::Descriptor;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;

use super::{check_bytes, Target, MAX_DOCUMENT_BYTES};
use crate::error::{Result, RunnerError};
use crate::images::oci;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A registry that stops sending for this long fails the transfer.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
const MANIFEST_TYPES: [&str; 4] = [
    oci::OCI_MANIFEST,
    oci::OCI_INDEX,
    oci::DOCKER_MANIFEST,
    oci::DOCKER_LIST,
];

/// What a session's credentials are asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Pull,
    Push,
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

/// One registry session.
pub struct Session {
    pub(super) target: Target,
    client: Client,
    http: reqwest::Client,
    authorization: Option<String>,
}

impl Session {
    pub async fn open(target: Target, auth: RegistryAuth, operation: Operation) -> Result<Self> {
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
            // A blob goes up in one request of known size: the fastest way to a registry.
            use_monolithic_push: operation == Operation::Push,
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
        // A registry that asks for no authentication is spoken to without any: oci-client
        // would otherwise ask it again before every request (nothing to cache).
        let version_url = format!(
            "{}://{}/v2/",
            if target.plain_http { "http" } else { "https" },
            target.endpoint
        );
        let open =
            http.get(&version_url).send().await.map_err(|e| {
                RunnerError::Unavailable(format!("registry {}: {e}", target.registry))
            })?;
        if open.status().is_success()
            && !open
                .headers()
                .contains_key(reqwest::header::WWW_AUTHENTICATE)
        {
            return Ok(Session {
                target,
                client,
                http,
                authorization: None,
            });
        }
        let any = target.oci_reference(&target.reference);
        let token = client
            .auth(
                &any,
                &auth,
                match operation {
                    Operation::Pull => RegistryOperation::Pull,
                    Operation::Push => RegistryOperation::Push,
                },
            )
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
    pub async fn fetch_document(&self, reference: &str) -> Result<(Vec<u8>, String)> {
        let url = self.target.manifest_url(reference);
        self.get_document(&url, reference).await?.ok_or_else(|| {
            RunnerError::FailedPrecondition(format!(
                "registry {} has no manifest {}/{reference}",
                self.target.registry, self.target.repository
            ))
        })
    }

    /// As [`Self::fetch_document`], None when the registry has no such manifest.
    pub async fn fetch_optional_document(
        &self,
        reference: &str,
    ) -> Result<Option<(Vec<u8>, String)>> {
        let url = self.target.manifest_url(reference);
        self.get_document(&url, reference).await
    }

    /// The referrers API's index for a subject; None when the registry has no referrers API
    /// (it answers 404, and the referrers tag schema is the way).
    pub async fn fetch_referrers_index(&self, subject_hex: &str) -> Result<Option<Vec<u8>>> {
        let url = self.target.referrers_url(subject_hex);
        let what = format!("referrers of sha256:{subject_hex}");
        Ok(self
            .get_document(&url, &what)
            .await?
            .map(|(bytes, _)| bytes))
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.authorization {
            Some(authorization) => request.header(reqwest::header::AUTHORIZATION, authorization),
            None => request,
        }
    }

    /// A JSON document at `url`, at most [`MAX_DOCUMENT_BYTES`]; None on 404.
    async fn get_document(&self, url: &str, what: &str) -> Result<Option<(Vec<u8>, String)>> {
        let registry = &self.target.registry;
        let request = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, MANIFEST_TYPES.join(", "));
        let failed = |e: reqwest::Error| {
            RunnerError::Unavailable(format!("registry {registry}: manifest {what}: {e}"))
        };
        let mut response = self.authorized(request).send().await.map_err(failed)?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !response.status().is_success() {
            return Err(RunnerError::FailedPrecondition(format!(
                "registry {registry} answered {} for manifest {}/{what}",
                response.status(),
                self.target.repository
            )));
        }
        let too_large = || {
            RunnerError::FailedPrecondition(format!(
                "registry {registry}: manifest {what} is larger than the \
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
                "registry {registry}: manifest {what} is not JSON: {e}"
            ))
        })?;
        let media_type = typed.media_type.or(header_type).ok_or_else(|| {
            RunnerError::FailedPrecondition(format!(
                "registry {registry}: manifest {what} has no media type"
            ))
        })?;
        Ok(Some((bytes, media_type)))
    }

    /// A manifest or index a descriptor names, checked against its size and digest.
    pub async fn fetch_described(&self, descriptor: &Descriptor) -> Result<Vec<u8>> {
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
    pub async fn fetch_blob(&self, descriptor: &Descriptor, dest: &Path) -> Result<()> {
        let mut file = tokio::fs::File::create(dest)
            .await
            .map_err(RunnerError::io_path("creating", dest))?;
        self.fetch_blob_into(descriptor, &mut file).await?;
        file.sync_all()
            .await
            .map_err(RunnerError::io_path("syncing", dest))
    }

    /// A blob small enough to hold (at most `max` bytes), checked against its descriptor.
    pub async fn read_blob(&self, descriptor: &Descriptor, max: u64) -> Result<Vec<u8>> {
        if descriptor.size() > max {
            return Err(RunnerError::FailedPrecondition(format!(
                "blob {} is {} bytes, more than the {max} it may have",
                descriptor.digest(),
                descriptor.size()
            )));
        }
        let mut bytes = Vec::new();
        self.fetch_blob_into(descriptor, &mut bytes).await?;
        Ok(bytes)
    }

    /// A blob streamed into `out`, no more than its descriptor's size; an error unless
    /// what came hashes to the descriptor's digest (what was written may then be partial).
    pub async fn fetch_blob_into<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        descriptor: &Descriptor,
        out: &mut W,
    ) -> Result<()> {
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
            out.write_all(&chunk)
                .await
                .map_err(RunnerError::io("writing a blob"))?;
        }
        let actual = hex::encode(hasher.finalize());
        if received != size || actual != hex {
            return Err(RunnerError::FailedPrecondition(format!(
                "registry {registry} sent {received} bytes hashing to sha256:{actual} for blob \
                 sha256:{hex} of {size} bytes"
            )));
        }
        Ok(())
    }

    /// Whether the registry holds blob `hex` in this repository.
    pub async fn has_blob(&self, hex: &str) -> Result<bool> {
        let reference = self.target.oci_reference(&self.target.reference);
        self.client
            .blob_exists(&reference, &format!("sha256:{hex}"))
            .await
            .map_err(unavailable(&self.target.registry))
    }

    /// Uploads a blob of `size` bytes from `chunks` in one request; the registry checks it
    /// against `hex` before it keeps it.
    pub async fn push_blob<S>(&self, chunks: S, hex: &str, size: u64) -> Result<()>
    where
        S: tokio_stream::Stream<Item = oci_client::errors::Result<bytes::Bytes>> + Send + 'static,
    {
        let reference = self.target.oci_reference(&self.target.reference);
        self.client
            .push_blob_stream(&reference, chunks, &format!("sha256:{hex}"), Some(size))
            .await
            .map_err(unavailable(&self.target.registry))?;
        Ok(())
    }

    /// Uploads a small blob held in memory, unless the registry has it; answers its digest.
    pub async fn push_bytes(&self, bytes: &[u8]) -> Result<String> {
        let hex = hex::encode(Sha256::digest(bytes));
        if !self.has_blob(&hex).await? {
            let chunk = bytes::Bytes::copy_from_slice(bytes);
            let size = bytes.len() as u64;
            self.push_blob(tokio_stream::once(Ok(chunk)), &hex, size)
                .await?;
        }
        Ok(hex)
    }

    /// Stores a manifest or index under `reference` (a tag or its own digest).
    pub async fn push_manifest(
        &self,
        bytes: &[u8],
        media_type: &str,
        reference: &str,
    ) -> Result<()> {
        let target = self.target.oci_reference(reference);
        let content_type = reqwest::header::HeaderValue::from_str(media_type)
            .map_err(|_| RunnerError::Internal(format!("a media type {media_type:?}")))?;
        self.client
            .push_manifest_raw(&target, bytes.to_vec(), content_type)
            .await
            .map_err(unavailable(&self.target.registry))?;
        Ok(())
    }
}
