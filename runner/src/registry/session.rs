//! One authenticated conversation with a registry, spoken with reqwest so that every
//! answer is bounded while it is read: a token answer, an error's body, a document. A
//! registry is untrusted; oci-client reads token and error answers whole, so it is not used
//! here.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use oci_spec::image::Descriptor;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{check_bytes, Target, MAX_DOCUMENT_BYTES};
use crate::error::{Result, RunnerError};
use crate::images::oci;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A registry that stops sending for this long fails the transfer.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// A document or token answer (a few MiB at most) that has not come whole by then
/// fails: a registry trickling a byte before each read timeout would hold a client
/// for days.
const DOCUMENT_TIMEOUT: Duration = Duration::from_secs(300);
/// The largest token answer read (real ones are a few KiB).
const MAX_TOKEN_BYTES: u64 = 64 << 10;
/// What is read of an error answer, and what of it a message quotes.
const MAX_ERROR_BYTES: u64 = 4 << 10;
const QUOTED_ERROR_CHARS: usize = 200;
/// Blobs may be served from elsewhere (a CDN): this many redirects, credentials dropped
/// at another host (reqwest's rule); what comes is checked against the digest anyway.
const BLOB_REDIRECTS: usize = 5;
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

/// reqwest's TLS is rustls with the ring provider, as everywhere in Kiln.
fn install_tls_provider() {
    // Err: a provider is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn http_client(redirects: reqwest::redirect::Policy) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(redirects)
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| RunnerError::Internal(format!("an HTTP client: {e}")))
}

/// Up to `max` bytes of an answer; None if it holds more (the rest is not read).
async fn read_bounded(
    response: &mut reqwest::Response,
    max: u64,
) -> reqwest::Result<Option<Vec<u8>>> {
    if response.content_length().is_some_and(|n| n > max) {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if (bytes.len() + chunk.len()) as u64 > max {
            return Ok(None);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Some(bytes))
}

/// A refusal as a message may quote it: its status, and the start of its body with
/// control characters escaped (the registry chose them, a terminal may show them).
async fn refusal(mut response: reqwest::Response) -> String {
    let status = response.status();
    let mut bytes = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        bytes.extend_from_slice(&chunk);
        if bytes.len() as u64 >= MAX_ERROR_BYTES {
            break;
        }
    }
    let text: String = String::from_utf8_lossy(&bytes)
        .chars()
        .take(QUOTED_ERROR_CHARS)
        .collect();
    let text = crate::cli::printable(text.trim());
    if text.is_empty() {
        format!("{status}")
    } else {
        format!("{status}: {text}")
    }
}

/// The Bearer challenge of a `WWW-Authenticate` header: its realm and service.
fn bearer_challenge(header: &str) -> Option<(String, Option<String>)> {
    http_auth::parser::ChallengeParser::new(header)
        .filter_map(std::result::Result::ok)
        .find(|c| c.scheme.eq_ignore_ascii_case("Bearer"))
        .and_then(|c| {
            let param = |name: &str| {
                c.params
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.to_unescaped())
            };
            Some((param("realm")?, param("service")))
        })
}

/// One registry session.
pub struct Session {
    pub(super) target: Target,
    /// `SCHEME://ENDPOINT`, which every request but a blob's redirect goes to.
    base: Url,
    http: reqwest::Client,
    blob_http: reqwest::Client,
    authorization: Option<String>,
}

impl Session {
    pub async fn open(target: Target, auth: RegistryAuth, operation: Operation) -> Result<Self> {
        install_tls_provider();
        let scheme = if target.plain_http { "http" } else { "https" };
        let base = Url::parse(&format!("{scheme}://{}/", target.endpoint)).map_err(|e| {
            RunnerError::invalid("reference", format!("registry {}: {e}", target.registry))
        })?;
        // Registries answer documents themselves; a redirect could lead anywhere.
        let http = http_client(reqwest::redirect::Policy::none())?;
        let plain_http = target.plain_http;
        let blob_http = http_client(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= BLOB_REDIRECTS {
                attempt.error("too many redirects")
            } else if attempt.url().scheme() != "https" && !plain_http {
                // An HTTPS registry's blobs come over HTTPS, as Docker fetches them.
                attempt.error("a redirect from HTTPS to another scheme")
            } else {
                attempt.follow()
            }
        }))?;
        let mut session = Session {
            target,
            base,
            http,
            blob_http,
            authorization: None,
        };
        session.authorization = session.authorize(&auth, operation).await?;
        Ok(session)
    }

    fn unavailable(&self, what: &str) -> impl Fn(reqwest::Error) -> RunnerError + '_ {
        let what = what.to_string();
        move |e| {
            RunnerError::Unavailable(format!(
                "registry {}: {what}: {}",
                self.target.registry,
                e.without_url()
            ))
        }
    }

    fn refused(&self, what: &str, why: String) -> RunnerError {
        RunnerError::Unavailable(format!(
            "registry {} refused {what}: {why}",
            self.target.registry
        ))
    }

    /// The Authorization header for the session: a token if the registry asks for one
    /// (the distribution API's token flow), else the credentials themselves, if any.
    async fn authorize(&self, auth: &RegistryAuth, operation: Operation) -> Result<Option<String>> {
        let basic = match auth {
            RegistryAuth::Basic(user, password) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            )),
            RegistryAuth::Bearer(token) => return Ok(Some(format!("Bearer {token}"))),
            RegistryAuth::Anonymous => None,
        };
        let ping = self
            .http
            .get(self.url("v2/")?)
            .send()
            .await
            .map_err(self.unavailable("the API version check"))?;
        let challenge = ping
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_challenge);
        drop(ping);
        let Some((realm, service)) = challenge else {
            return Ok(basic);
        };
        let mut realm = Url::parse(&realm)
            .map_err(|_| self.refused("a token", "its token service is not a URL".into()))?;
        // Credentials and tokens travel in the clear only where the registry itself does.
        if !(realm.scheme() == "https" || (realm.scheme() == "http" && self.target.plain_http)) {
            return Err(self.refused(
                "a token",
                format!("its token service is not HTTPS ({})", realm.scheme()),
            ));
        }
        let actions = match operation {
            Operation::Pull => "pull",
            Operation::Push => "pull,push",
        };
        realm.query_pairs_mut().append_pair(
            "scope",
            &format!("repository:{}:{actions}", self.target.repository),
        );
        if let Some(service) = &service {
            realm.query_pairs_mut().append_pair("service", service);
        }
        let mut request = self.http.get(realm).timeout(DOCUMENT_TIMEOUT);
        if let Some(basic) = &basic {
            request = request.header(AUTHORIZATION, basic);
        }
        let mut response = request
            .send()
            .await
            .map_err(self.unavailable("its token service"))?;
        if !response.status().is_success() {
            // The status only: the token service is any URL the registry names, and its
            // body is not for a client of the daemon to read.
            return Err(self.refused(
                "a token",
                format!("its token service answered {}", response.status()),
            ));
        }
        let bytes = read_bounded(&mut response, MAX_TOKEN_BYTES)
            .await
            .map_err(self.unavailable("its token service"))?
            .ok_or_else(|| {
                self.refused(
                    "a token",
                    format!("its answer is larger than {MAX_TOKEN_BYTES} bytes"),
                )
            })?;
        #[derive(Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
        }
        let answer: TokenAnswer = serde_json::from_slice(&bytes)
            .map_err(|_| self.refused("a token", "its answer is not a token".into()))?;
        let token = answer
            .token
            .or(answer.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.refused("a token", "its answer holds no token".into()))?;
        // A header cannot hold every string: checked here, not at each request.
        HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| self.refused("a token", "its token is not a header value".into()))?;
        Ok(Some(format!("Bearer {token}")))
    }

    /// `path` (relative, `v2/...`) at the registry.
    fn url(&self, path: &str) -> Result<Url> {
        self.base
            .join(path)
            .map_err(|e| RunnerError::Internal(format!("a registry URL {path:?}: {e}")))
    }

    fn blob_path(&self, hex: &str) -> String {
        format!("v2/{}/blobs/sha256:{hex}", self.target.repository)
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
            Some(authorization) => request.header(AUTHORIZATION, authorization),
            None => request,
        }
    }

    /// A JSON document at `url`, at most [`MAX_DOCUMENT_BYTES`]; None on 404.
    async fn get_document(&self, url: &str, what: &str) -> Result<Option<(Vec<u8>, String)>> {
        let registry = &self.target.registry;
        let request = self
            .http
            .get(url)
            .timeout(DOCUMENT_TIMEOUT)
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
        let what = format!("blob sha256:{hex}");
        let request = self.blob_http.get(self.url(&self.blob_path(&hex))?);
        let mut response = self
            .authorized(request)
            .send()
            .await
            .map_err(self.unavailable(&what))?;
        if !response.status().is_success() {
            // A redirect may have led anywhere: another host's body is not quoted.
            let why = if response.url().origin() == self.base.origin() {
                refusal(response).await
            } else {
                format!("{} from the host it redirected to", response.status())
            };
            return Err(self.refused(&what, why));
        }
        let oversized = || {
            RunnerError::FailedPrecondition(format!(
                "registry {registry} sent more than the {size} bytes of blob sha256:{hex}"
            ))
        };
        if response.content_length().is_some_and(|n| n > size) {
            return Err(oversized());
        }
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        while let Some(chunk) = response.chunk().await.map_err(self.unavailable(&what))? {
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
        let what = format!("blob sha256:{hex}");
        let request = self.http.head(self.url(&self.blob_path(hex))?);
        let response = self
            .authorized(request)
            .send()
            .await
            .map_err(self.unavailable(&what))?;
        match response.status() {
            status if status.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.refused(&what, refusal(response).await)),
        }
    }

    /// Uploads a blob of `size` bytes from `chunks` in one request (the fastest way to a
    /// registry); the registry checks it against `hex` before it keeps it. The upload goes
    /// where the registry says, but only to the registry itself: a `Location` on another
    /// host would have the daemon send a job's outputs to a host no one configured.
    pub async fn push_blob<S>(&self, chunks: S, hex: &str, size: u64) -> Result<()>
    where
        S: tokio_stream::Stream<Item = oci_client::errors::Result<bytes::Bytes>> + Send + 'static,
    {
        let what = format!("the upload of blob sha256:{hex}");
        let start = self
            .http
            .post(self.url(&format!("v2/{}/blobs/uploads/", self.target.repository))?)
            .header(CONTENT_LENGTH, 0);
        let response = self
            .authorized(start)
            .send()
            .await
            .map_err(self.unavailable(&what))?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(self.refused(&what, refusal(response).await));
        }
        let mut location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| self.base.join(v).ok())
            .ok_or_else(|| self.refused(&what, "it named no upload location".into()))?;
        if location.origin() != self.base.origin() {
            return Err(self.refused(&what, "it named an upload location on another host".into()));
        }
        drop(response);
        location
            .query_pairs_mut()
            .append_pair("digest", &format!("sha256:{hex}"));
        let request = self
            .http
            .put(location)
            .header(CONTENT_LENGTH, size)
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(chunks));
        let response = self
            .authorized(request)
            .send()
            .await
            .map_err(self.unavailable(&what))?;
        if !response.status().is_success() {
            return Err(self.refused(&what, refusal(response).await));
        }
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
        let what = format!("manifest {reference}");
        let content_type = HeaderValue::from_str(media_type)
            .map_err(|_| RunnerError::Internal(format!("a media type {media_type:?}")))?;
        let url = self.url(&format!(
            "v2/{}/manifests/{reference}",
            self.target.repository
        ))?;
        let request = self
            .http
            .put(url)
            .header(CONTENT_TYPE, content_type)
            .body(bytes.to_vec());
        let response = self
            .authorized(request)
            .send()
            .await
            .map_err(self.unavailable(&what))?;
        if !response.status().is_success() {
            return Err(self.refused(&what, refusal(response).await));
        }
        Ok(())
    }
}
