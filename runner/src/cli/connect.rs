//! How the client reaches the daemon: its Unix socket, or a remote daemon's TLS
//! listener (TLS 1.3 with a client certificate), as tonic channels the tests reuse.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// A gRPC channel to the daemon whose every connection is one that `connect` opens: to
/// the socket (or, in tests, to the socket with another uid's credentials).
pub async fn channel_over<F, Fut>(connect: F) -> Result<Channel, tonic::transport::Error>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = std::io::Result<tokio::net::UnixStream>> + Send + 'static,
{
    // The URI is required by the API but unused: every connection goes to the socket.
    Endpoint::from_static("http://kiln.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connect = connect.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(connect().await?)) }
        }))
        .await
}

/// Where the client finds the daemon.
#[derive(Debug, Clone)]
pub enum Target {
    /// The daemon's Unix socket.
    Socket(PathBuf),
    /// A daemon's TLS listener: `https://HOST:PORT`, with the client's certificate
    /// chain and key and the CA the daemon's certificate must chain to (PEM files).
    Remote {
        server: String,
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
    },
}

/// Reads a PEM file of the client's, naming it in the error.
pub(crate) fn read_client_file(what: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

/// The TLS configuration of a client: TLS 1.3, the daemon's certificate checked against
/// `ca_pem`, and the client certificate (`cert_pem`, leaf first) with its key.
pub fn client_tls_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    ca_pem: &[u8],
) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .context("the client certificate is not PEM")?;
    if chain.is_empty() {
        bail!("the client certificate file holds no CERTIFICATE block");
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .context("the client key file holds no private key")?;
    let roots = ca_roots(ca_pem)?;
    rustls::ClientConfig::builder_with_provider(crate::daemon::tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("the TLS configuration")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("the client certificate and key do not go together")
}

/// The CA certificates of a PEM file, as trust anchors.
pub fn ca_roots(ca_pem: &[u8]) -> anyhow::Result<rustls::RootCertStore> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(ca.context("the CA file is not PEM")?)
            .context("a CA certificate")?;
    }
    if roots.is_empty() {
        bail!("the CA file holds no CERTIFICATE block");
    }
    Ok(roots)
}

/// A gRPC channel to a daemon's TLS listener at `server` (`https://HOST:PORT`), every
/// connection made with `tls`; the daemon's certificate must name HOST.
pub async fn channel_over_tls(
    server: &str,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<Channel> {
    let uri: Uri = server
        .parse()
        .with_context(|| format!("--server {server:?} is not a URL"))?;
    if uri.scheme_str() != Some("https") {
        bail!("--server {server:?}: the daemon is reached over TLS: https://HOST:PORT");
    }
    let Some(host) = uri.host() else {
        bail!("--server {server:?} names no host");
    };
    // An IPv6 literal is written in brackets in a URL, bare in a certificate.
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let server_name = rustls::pki_types::ServerName::try_from(host.clone())
        .with_context(|| format!("--server {server:?}: {host:?} is not a host name"))?;
    let mut tls = (*tls).clone();
    // gRPC is HTTP/2, chosen in the handshake.
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    Endpoint::from_shared(server.to_string())
        .with_context(|| format!("--server {server:?}"))?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (connector, server_name, host) =
                (connector.clone(), server_name.clone(), host.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                TLS_USED.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok::<_, std::io::Error>(TokioIo::new(ReadFailureKept(tls)))
            }
        }))
        .await
        .with_context(|| format!("connecting to the kiln daemon at {server}"))
}

/// The last error reading from a TLS connection to the daemon, e.g. the alert with which
/// it refused the client certificate: in TLS 1.3 that arrives after the client's side
/// of the handshake, and the HTTP/2 layer reports only a closed connection.
static TLS_READ_FAILURE: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Whether this process opened a TLS connection to a daemon.
static TLS_USED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What is known of why a TLS connection to the daemon ended: the alert it sent, when
/// it was read before the call failed, or else a hint where to look. None without TLS.
pub fn tls_failure_hint() -> Option<String> {
    if !TLS_USED.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let failure = match TLS_READ_FAILURE.lock() {
        Ok(failure) => failure.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    Some(match failure {
        Some(failure) => format!("the daemon's TLS connection: {failure}"),
        None => "the daemon closed the TLS connection; if it refused this client's certificate, \
                 the daemon's log says why"
            .to_string(),
    })
}

/// A client TLS stream that keeps its read errors for [`tls_read_failure`].
struct ReadFailureKept(tokio_rustls::client::TlsStream<tokio::net::TcpStream>);

impl tokio::io::AsyncRead for ReadFailureKept {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let poll = std::pin::Pin::new(&mut self.0).poll_read(cx, buf);
        if let std::task::Poll::Ready(Err(err)) = &poll {
            let mut failure = match TLS_READ_FAILURE.lock() {
                Ok(failure) => failure,
                Err(poisoned) => poisoned.into_inner(),
            };
            *failure = Some(err.to_string());
        }
        poll
    }
}

impl tokio::io::AsyncWrite for ReadFailureKept {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}
