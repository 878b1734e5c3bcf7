//! TLS on the TCP listeners: TLS 1.3 only, a client certificate required and verified
//! against the listener's client CA, the caller's identities taken from it, and the
//! certificate, key and CA reloaded without a restart (on SIGHUP, and when the files
//! change). A new file that does not load leaves the listener on the files it had.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use tokio::net::TcpStream;

use crate::api::auth::TlsIdentities;
use crate::config::TlsListen;

/// TLS handshakes that failed or ran past the handshake deadline, on every listener.
static HANDSHAKE_FAILURES: AtomicU64 = AtomicU64::new(0);

/// TLS handshakes that failed (a client refused: no certificate, another CA, expired,
/// an older protocol) or timed out, since the daemon started.
pub fn tls_handshake_failures() -> u64 {
    HANDSHAKE_FAILURES.load(Ordering::Relaxed)
}

pub(crate) fn count_handshake_failure() {
    HANDSHAKE_FAILURES.fetch_add(1, Ordering::Relaxed);
}

/// How often the certificate files are checked for changes.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum TlsFilesError {
    #[error("reading {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} {path}: {reason}")]
    Content {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client_ca {path}: {reason}")]
    ClientCa { path: PathBuf, reason: String },
}

/// The ring provider, the one crypto the daemon and the client use.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM file; the path names the file for the operator (never for a client).
fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsFilesError> {
    std::fs::read(path).map_err(|source| TlsFilesError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The certificates of a PEM file, at least one.
pub fn pem_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsFilesError> {
    let bytes = read_pem(what, path)?;
    let content = |reason: String| TlsFilesError::Content {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| content(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(content("holds no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn pem_private_key(
    what: &'static str,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, TlsFilesError> {
    let bytes = read_pem(what, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsFilesError::Content {
        what,
        path: path.to_path_buf(),
        reason: format!("no private key: {e}"),
    })
}

/// The server side of one TCP listener, from its files.
pub fn server_config(listen: &TlsListen) -> Result<Arc<ServerConfig>, TlsFilesError> {
    let chain = pem_certificates("tls_cert", &listen.cert)?;
    let key = pem_private_key("tls_key", &listen.key)?;
    warn_if_others_read(listen);
    let mut roots = RootCertStore::empty();
    for ca in pem_certificates("client_ca", &listen.client_ca)? {
        roots.add(ca).map_err(|e| TlsFilesError::ClientCa {
            path: listen.client_ca.clone(),
            reason: e.to_string(),
        })?;
    }
    let provider = crypto_provider();
    // Required: a client without a certificate that chains to the CA is refused in the
    // handshake (there is no anonymous access over TCP).
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsFilesError::ClientCa {
            path: listen.client_ca.clone(),
            reason: e.to_string(),
        })?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        // Checks that the key is the leaf certificate's.
        .with_single_cert(chain, key)?;
    // gRPC clients (grpcio among them) insist on HTTP/2 chosen by ALPN.
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No session resumption: every connection proves its certificate anew, so one that
    // has expired since, or that the reloaded client CA no longer trusts, gets nowhere.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The server's key is as secret as the signing key: say so when other users may read it.
fn warn_if_others_read(listen: &TlsListen) {
    use std::os::unix::fs::MetadataExt;
    if let Ok(meta) = std::fs::metadata(&listen.key) {
        if meta.mode() & 0o004 != 0 || (meta.mode() & 0o040 != 0 && meta.gid() != 0) {
            tracing::warn!(
                listener = %listen.name,
                key = %listen.key.display(),
                mode = format!("{:o}", meta.mode() & 0o777),
                "the TLS key is readable by users other than root: anyone who reads it can pose as this daemon"
            );
        }
    }
}

/// What a file looked like when last loaded: a change of any of these is a new file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    changed: i64,
    inode: u64,
    len: u64,
}

fn stamps(listen: &TlsListen) -> Vec<Option<Stamp>> {
    use std::os::unix::fs::MetadataExt;
    [&listen.cert, &listen.key, &listen.client_ca]
        .into_iter()
        // Followed through symlinks: a Kubernetes secret swaps the target, not the link.
        .map(|path| {
            std::fs::metadata(path).ok().map(|m| Stamp {
                modified: m.modified().ok(),
                changed: m.ctime_nsec() + m.ctime() * 1_000_000_000,
                inode: m.ino(),
                len: m.len(),
            })
        })
        .collect()
}

/// A TCP listener's TLS configuration, swapped whole when its files change.
pub struct ReloadingConfig {
    listen: TlsListen,
    current: RwLock<Arc<ServerConfig>>,
    /// The files' stamps at the last attempt to load them, good or bad: a bad file is
    /// reported once, not at every poll.
    tried: Mutex<Vec<Option<Stamp>>>,
}

impl ReloadingConfig {
    /// Loads the listener's files; at start-up a bad file is an error.
    pub fn load(listen: &TlsListen) -> Result<Arc<Self>, TlsFilesError> {
        let tried = stamps(listen);
        let config = server_config(listen)?;
        Ok(Arc::new(Self {
            listen: listen.clone(),
            current: RwLock::new(config),
            tried: Mutex::new(tried),
        }))
    }

    /// The configuration a new connection gets.
    pub fn current(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(config) => config.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn name(&self) -> &str {
        &self.listen.name
    }

    /// Loads the files again if `forced` or they changed since the last attempt; a bad
    /// file keeps the configuration in use and is logged naming the listener. Answers
    /// what happened, if it tried.
    fn reload(&self, forced: bool) -> Option<Result<(), String>> {
        let now = stamps(&self.listen);
        {
            let mut tried = match self.tried.lock() {
                Ok(t) => t,
                Err(poisoned) => poisoned.into_inner(),
            };
            if !forced && *tried == now {
                return None;
            }
            *tried = now;
        }
        match server_config(&self.listen) {
            Ok(config) => {
                match self.current.write() {
                    Ok(mut current) => *current = config,
                    Err(poisoned) => *poisoned.into_inner() = config,
                }
                tracing::info!(
                    listener = %self.listen.name,
                    address = %self.listen.address,
                    "reloaded the TLS certificate, key and client CA; new connections use them"
                );
                Some(Ok(()))
            }
            Err(err) => {
                tracing::error!(
                    listener = %self.listen.name,
                    error = %err,
                    "could not reload the TLS files; the listener keeps the ones it had"
                );
                Some(Err(err.to_string()))
            }
        }
    }
}

/// Reloads every TCP listener's files at SIGHUP, and each one whose files changed
/// within a couple of seconds. Runs until the daemon stops.
/// Told of every reload attempt: the listener's name, and the outcome.
pub type OnReload = Arc<dyn Fn(&str, Result<(), String>) + Send + Sync>;

pub fn watch(
    configs: Vec<Arc<ReloadingConfig>>,
    on_reload: OnReload,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    // Installed even without TCP listeners: SIGHUP would otherwise kill the daemon.
    let mut hangup =
        signal(SignalKind::hangup()).map_err(|e| anyhow::anyhow!("watching SIGHUP: {e}"))?;
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = hangup.recv() => {
                    tracing::info!(listeners = configs.len(), "SIGHUP: reloading the TLS files");
                    true
                }
                _ = tick.tick() => false,
            };
            for config in &configs {
                let (config, on_reload) = (config.clone(), on_reload.clone());
                // File reads, key parsing and the audit entry are blocking work.
                let _ = tokio::task::spawn_blocking(move || {
                    if let Some(outcome) = config.reload(forced) {
                        on_reload(config.name(), outcome);
                    }
                })
                .await;
            }
        }
    }))
}

/// The identities a verified client certificate names: SAN URIs as written, SAN DNS
/// names as `dns:NAME`. A certificate that does not parse names none.
/// Whether a URI has the `dns` scheme (case-insensitive, as URI schemes are).
fn is_dns_scheme(uri: &str) -> bool {
    uri.get(..4)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("dns:"))
}

pub fn identities(leaf: &CertificateDer<'_>) -> TlsIdentities {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
        return TlsIdentities::default();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return TlsIdentities::default();
    };
    TlsIdentities(
        san.value
            .general_names
            .iter()
            .filter_map(|name| match name {
                // A URI SAN `dns:...` would pass for a DNS name: such URIs name nobody.
                GeneralName::URI(uri) if is_dns_scheme(uri) => None,
                GeneralName::URI(uri) => Some((*uri).to_string()),
                GeneralName::DNSName(dns) => Some(format!("dns:{dns}")),
                _ => None,
            })
            .collect(),
    )
}

/// The identities of the client of a TLS connection whose handshake succeeded (its
/// verified leaf certificate's).
pub fn peer_identities(stream: &tokio_rustls::server::TlsStream<TcpStream>) -> TlsIdentities {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(identities)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn certificate(sans: Vec<rcgen::SanType>) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn identities_are_san_uris_as_written_and_dns_names_marked() {
        use rcgen::SanType;
        let cert = certificate(vec![
            SanType::URI("spiffe://example.org/ci".try_into().unwrap()),
            SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            SanType::DnsName("orchestrator.example.org".try_into().unwrap()),
            SanType::Rfc822Name("ci@example.org".try_into().unwrap()),
        ]);
        assert_eq!(
            identities(&cert).0,
            ["spiffe://example.org/ci", "dns:orchestrator.example.org"]
        );
        assert!(identities(&certificate(Vec::new())).0.is_empty());
        assert!(
            identities(&CertificateDer::from(b"not a certificate".to_vec()))
                .0
                .is_empty()
        );
    }

    #[test]
    fn a_uri_san_cannot_pass_for_a_dns_name() {
        use rcgen::SanType;
        let forged = certificate(vec![
            SanType::URI("dns:ci.example.org".try_into().unwrap()),
            SanType::URI("DNS:ops.example.org".try_into().unwrap()),
        ]);
        assert!(
            identities(&forged).0.is_empty(),
            "{:?}",
            identities(&forged).0
        );
    }
}
