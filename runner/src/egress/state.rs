//! What every connection of one step's proxy shares: the limits, the allow-list
//! decision (names resolved here, never by the step), the outgoing connections to
//! checked addresses only, the byte budget and the record.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::netpolicy::{AllowList, Decision};
use super::record::{Attempt, Live, Report};
use super::special::HostAddresses;

/// Attempts kept in full for the link; later ones are only counted.
const MAX_RECORDS: usize = 1000;

/// Resolves a host name to addresses. The daemon uses the system resolver; tests
/// substitute a fixed table.
pub type Resolver = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>>
        + Send
        + Sync,
>;

pub fn system_resolver() -> Resolver {
    Arc::new(|host: String| {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    })
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProxyLimits {
    pub max_connections: usize,
    /// Bytes in both directions over all connections of the step.
    pub max_bytes: u64,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// For a request head, and for a tunnel's ClientHello.
    pub head_timeout: Duration,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            max_bytes: 4 << 30,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            head_timeout: Duration::from_secs(10),
        }
    }
}

/// What every connection of one step's proxy shares.
pub(super) struct Shared {
    allow: AllowList,
    pub(super) limits: ProxyLimits,
    resolver: Resolver,
    /// The host's interface addresses when the proxy started.
    own: HostAddresses,
    records: Mutex<Vec<Arc<Live>>>,
    unrecorded: AtomicU64,
    /// Bytes in both directions over all the step's connections.
    pub(super) total_bytes: AtomicU64,
    connections: Arc<Semaphore>,
}

impl Shared {
    pub(super) fn new(
        allow: AllowList,
        limits: ProxyLimits,
        resolver: Resolver,
        own: HostAddresses,
    ) -> Shared {
        Shared {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            allow,
            limits,
            resolver,
            own,
            records: Mutex::new(Vec::new()),
            unrecorded: AtomicU64::new(0),
            total_bytes: AtomicU64::new(0),
        }
    }

    /// A place among the step's open connections, if one is free.
    pub(super) fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    pub(super) fn record(&self, attempt: Attempt) -> Arc<Live> {
        let mut records = self.records.lock().ok();
        let keep = records.as_ref().is_some_and(|r| r.len() < MAX_RECORDS);
        if keep {
            // The log gets what the link gets: a flooding step cannot flood the log.
            tracing::info!(
                method = %attempt.method,
                host = %attempt.host,
                port = attempt.port,
                sni = %attempt.sni,
                decision = %attempt.decision,
                reason = %attempt.reason,
                "step network attempt"
            );
        }
        let live = Arc::new(Live::new(attempt));
        match records.as_mut() {
            Some(records) if keep => records.push(live.clone()),
            _ => {
                self.unrecorded.fetch_add(1, Ordering::Relaxed);
            }
        }
        live
    }

    pub(super) fn budget_spent(&self) -> bool {
        self.total_bytes.load(Ordering::Relaxed) > self.limits.max_bytes
    }

    /// Every attempt so far, as it stands now.
    pub(super) fn report(&self) -> Report {
        let attempts = self
            .records
            .lock()
            .map(|r| r.iter().map(|l| l.snapshot()).collect())
            .unwrap_or_default();
        Report {
            attempts,
            unrecorded: self.unrecorded.load(Ordering::Relaxed),
        }
    }
}

/// The address a host of a URL or CONNECT names literally (an IPv6 one in brackets).
pub(super) fn literal_ip(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Checks the destination and returns the addresses that may be connected to
/// (and, for a name, everything it resolved to); a refusal carries its reason and what
/// the name resolved to, for the record.
pub(super) async fn decide(
    shared: &Shared,
    host: &str,
    port: u16,
) -> Result<(Vec<IpAddr>, Vec<IpAddr>), (String, Vec<IpAddr>)> {
    if let Some(ip) = literal_ip(host) {
        return match shared.allow.decide_address(ip, port) {
            Decision::Allow => Ok((vec![ip], Vec::new())),
            Decision::Deny(reason) => Err((reason, Vec::new())),
        };
    }
    if !shared.allow.allows_name(host, port) {
        let reason = format!("{host} port {port} is not on the step's allow-list");
        return Err((reason, Vec::new()));
    }
    let resolved = tokio::time::timeout(
        shared.limits.connect_timeout,
        (shared.resolver)(host.to_string()),
    )
    .await
    .map_err(|_| (format!("resolving {host} timed out"), Vec::new()))?
    .map_err(|e| (format!("resolving {host}: {e}"), Vec::new()))?;
    let mut allowed = Vec::new();
    let mut first_refusal = None;
    for ip in &resolved {
        match shared.allow.decide_resolved(host, *ip, port, &shared.own) {
            Decision::Allow => allowed.push(*ip),
            Decision::Deny(reason) => {
                first_refusal.get_or_insert(reason);
            }
        }
    }
    if allowed.is_empty() {
        let reason = first_refusal.unwrap_or_else(|| format!("{host} has no address"));
        return Err((reason, resolved));
    }
    // Connect only to the addresses checked here: the step's own lookups never matter.
    Ok((allowed, resolved))
}

/// Connects to the first of the checked addresses that answers.
pub(super) async fn connect(
    shared: &Shared,
    addresses: &[IpAddr],
    port: u16,
) -> Result<(TcpStream, SocketAddr), String> {
    let mut last_error = String::from("no address to connect to");
    for ip in addresses {
        let addr = SocketAddr::new(*ip, port);
        match tokio::time::timeout(shared.limits.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok((stream, addr)),
            Ok(Err(err)) => last_error = format!("connecting to {addr}: {err}"),
            Err(_) => last_error = format!("connecting to {addr}: timed out"),
        }
    }
    Err(last_error)
}
