//! The egress proxy of a step with an allow-list: HTTP `CONNECT` tunnels and
//! plain HTTP forward requests, each checked against the step's allow-list, with
//! names resolved here (never by the step) and every attempt recorded.
//!
//! The listener is created by the caller inside the step's network namespace (a
//! socket belongs to the namespace it was created in), so the step reaches the
//! proxy on its own loopback while the proxy's outgoing connections leave from
//! the host's network.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::netpolicy::{AllowList, Decision};

const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;
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

#[derive(Debug, Clone)]
pub struct ProxyLimits {
    pub max_connections: usize,
    /// Bytes in both directions over all connections of the step.
    pub max_bytes: u64,
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
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

/// One attempt as it goes into the step's link.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Attempt {
    pub method: String,
    pub host: String,
    pub port: u16,
    /// What the daemon resolved the name to (empty for literal addresses).
    pub resolved: Vec<String>,
    /// The address actually connected to, if any.
    pub address: String,
    /// "allowed" or "denied".
    pub decision: String,
    pub reason: String,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
}

impl From<&Attempt> for agent_proto::v1::NetworkAttempt {
    fn from(a: &Attempt) -> Self {
        Self {
            method: a.method.clone(),
            host: a.host.clone(),
            port: u32::from(a.port),
            resolved: a.resolved.clone(),
            address: a.address.clone(),
            decision: a.decision.clone(),
            reason: a.reason.clone(),
            bytes_up: a.bytes_up,
            bytes_down: a.bytes_down,
            duration_ms: a.duration_ms,
        }
    }
}

/// Points every common HTTP client of the step at its proxy. Kiln's values replace any the
/// job set: the namespace has no other way out, so a bypass could only fail. NO_PROXY is
/// empty: nothing is exempt.
pub fn set_proxy_env(env: &mut Vec<(String, String)>, port: u16) {
    let url = format!("http://127.0.0.1:{port}");
    let vars = [
        ("HTTP_PROXY", url.as_str()),
        ("HTTPS_PROXY", url.as_str()),
        ("ALL_PROXY", url.as_str()),
        ("NO_PROXY", ""),
    ];
    let names: Vec<String> = vars
        .iter()
        .flat_map(|(name, _)| [name.to_string(), name.to_lowercase()])
        .collect();
    env.retain(|(k, _)| !names.contains(k));
    for (name, value) in vars {
        env.push((name.to_string(), value.to_string()));
        env.push((name.to_lowercase(), value.to_string()));
    }
    env.sort();
}

/// Everything the proxy saw during one step.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub attempts: Vec<Attempt>,
    /// Attempts beyond the recorded ones.
    pub unrecorded: u64,
}

struct Live {
    attempt: Mutex<Attempt>,
    up: AtomicU64,
    down: AtomicU64,
    started: Instant,
    ended: Mutex<Option<Duration>>,
}

impl Live {
    fn snapshot(&self) -> Attempt {
        let mut a = self
            .attempt
            .lock()
            .map(|a| a.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        a.bytes_up = self.up.load(Ordering::Relaxed);
        a.bytes_down = self.down.load(Ordering::Relaxed);
        let elapsed = self
            .ended
            .lock()
            .ok()
            .and_then(|e| *e)
            .unwrap_or_else(|| self.started.elapsed());
        a.duration_ms = elapsed.as_millis() as u64;
        a
    }
}

struct Shared {
    allow: AllowList,
    limits: ProxyLimits,
    resolver: Resolver,
    records: Mutex<Vec<Arc<Live>>>,
    unrecorded: AtomicU64,
    total_bytes: AtomicU64,
    connections: Arc<Semaphore>,
}

impl Shared {
    fn record(&self, attempt: Attempt) -> Arc<Live> {
        let mut records = self.records.lock().ok();
        let keep = records.as_ref().is_some_and(|r| r.len() < MAX_RECORDS);
        if keep {
            // The log gets what the link gets: a flooding step cannot flood the log.
            tracing::info!(
                method = %attempt.method,
                host = %attempt.host,
                port = attempt.port,
                decision = %attempt.decision,
                reason = %attempt.reason,
                "step network attempt"
            );
        }
        let live = Arc::new(Live {
            attempt: Mutex::new(attempt),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            started: Instant::now(),
            ended: Mutex::new(None),
        });
        match records.as_mut() {
            Some(records) if keep => records.push(live.clone()),
            _ => {
                self.unrecorded.fetch_add(1, Ordering::Relaxed);
            }
        }
        live
    }
}

/// A running proxy; `finish` stops it and closes every connection.
pub struct Proxy {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    addr: SocketAddr,
}

impl Proxy {
    /// Serves on `listener` (already bound, e.g. inside the step's namespace).
    pub fn start(
        listener: std::net::TcpListener,
        allow: AllowList,
        limits: ProxyLimits,
        resolver: Resolver,
    ) -> std::io::Result<Proxy> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = TcpListener::from_std(listener)?;
        let shared = Arc::new(Shared {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            allow,
            limits,
            resolver,
            records: Mutex::new(Vec::new()),
            unrecorded: AtomicU64::new(0),
            total_bytes: AtomicU64::new(0),
        });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(listener, shared.clone(), stopped));
        Ok(Proxy {
            shared,
            stop,
            task,
            addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes every open connection and returns the record.
    pub async fn finish(self) -> Report {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let attempts = self
            .shared
            .records
            .lock()
            .map(|r| r.iter().map(|l| l.snapshot()).collect())
            .unwrap_or_default();
        Report {
            attempts,
            unrecorded: self.shared.unrecorded.load(Ordering::Relaxed),
        }
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    connections.spawn(async move { handle(stream, shared).await });
                }
                Err(err) => {
                    tracing::warn!(error = %err, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // The step is over: nothing it opened may outlive it.
    connections.shutdown().await;
}

/// A parsed request head.
struct Head {
    method: String,
    host: String,
    port: u16,
    /// For plain HTTP: the request rewritten for the origin server.
    forward: Option<Vec<u8>>,
}

async fn respond(stream: &mut TcpStream, status: &str, reason: &str) {
    let body = format!("kiln proxy: {reason}\n");
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

fn denied(method: &str, host: &str, port: u16, reason: String) -> Attempt {
    Attempt {
        method: method.to_string(),
        host: host.to_string(),
        port,
        resolved: Vec::new(),
        address: String::new(),
        decision: "denied".into(),
        reason,
        bytes_up: 0,
        bytes_down: 0,
        duration_ms: 0,
    }
}

async fn handle(mut client: TcpStream, shared: Arc<Shared>) {
    let Ok(_permit) = shared.connections.clone().try_acquire_owned() else {
        shared.record(denied(
            "?",
            "",
            0,
            "too many connections for this step".into(),
        ));
        respond(
            &mut client,
            "503 Service Unavailable",
            "too many connections",
        )
        .await;
        return;
    };
    let head = tokio::time::timeout(shared.limits.head_timeout, read_head(&mut client)).await;
    let (head, rest) = match head {
        Ok(Ok(parsed)) => parsed,
        Ok(Err(reason)) => {
            shared.record(denied("?", "", 0, reason.clone()));
            respond(&mut client, "400 Bad Request", &reason).await;
            return;
        }
        Err(_) => {
            shared.record(denied("?", "", 0, "no request before the timeout".into()));
            return;
        }
    };
    let (addresses, resolved) = match decide(&shared, &head).await {
        Ok(found) => found,
        Err((reason, resolved)) => {
            let mut attempt = denied(&head.method, &head.host, head.port, reason.clone());
            attempt.resolved = resolved.iter().map(ToString::to_string).collect();
            shared.record(attempt);
            respond(&mut client, "403 Forbidden", &reason).await;
            return;
        }
    };
    let mut attempt = denied(&head.method, &head.host, head.port, String::new());
    attempt.resolved = resolved.iter().map(ToString::to_string).collect();
    let mut upstream = None;
    let mut last_error = String::from("no address to connect to");
    for ip in &addresses {
        let addr = SocketAddr::new(*ip, head.port);
        match tokio::time::timeout(shared.limits.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                attempt.address = addr.to_string();
                upstream = Some(stream);
                break;
            }
            Ok(Err(err)) => last_error = format!("connecting to {addr}: {err}"),
            Err(_) => last_error = format!("connecting to {addr}: timed out"),
        }
    }
    let Some(mut upstream) = upstream else {
        attempt.decision = "allowed".into();
        attempt.reason = last_error.clone();
        shared.record(attempt);
        respond(&mut client, "502 Bad Gateway", &last_error).await;
        return;
    };
    attempt.decision = "allowed".into();
    attempt.reason = "on the allow-list".into();
    let live = shared.record(attempt);

    let opened = match &head.forward {
        None => client
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await
            .is_ok(),
        Some(request) => {
            live.up.fetch_add(request.len() as u64, Ordering::Relaxed);
            upstream.write_all(request).await.is_ok()
        }
    };
    if opened && (rest.is_empty() || upstream.write_all(&rest).await.is_ok()) {
        live.up.fetch_add(rest.len() as u64, Ordering::Relaxed);
        relay(client, upstream, &shared, &live).await;
    }
    let elapsed = live.started.elapsed();
    if let Ok(mut ended) = live.ended.lock() {
        *ended = Some(elapsed);
    };
}

/// Checks the destination and returns the addresses that may be connected to
/// (and, for a name, everything it resolved to); a refusal carries its reason and what
/// the name resolved to, for the record.
async fn decide(
    shared: &Shared,
    head: &Head,
) -> Result<(Vec<IpAddr>, Vec<IpAddr>), (String, Vec<IpAddr>)> {
    let host = head.host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return match shared.allow.decide_address(ip, head.port) {
            Decision::Allow => Ok((vec![ip], Vec::new())),
            Decision::Deny(reason) => Err((reason, Vec::new())),
        };
    }
    if !shared.allow.allows_name(host, head.port) {
        let reason = format!("{host} port {} is not on the step's allow-list", head.port);
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
        match shared.allow.decide_resolved(host, *ip, head.port) {
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

/// Reads and parses the request head; returns it and any bytes read past it.
async fn read_head(client: &mut TcpStream) -> Result<(Head, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = client
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the request: {e}"))?;
        if n == 0 {
            return Err("the connection closed before a complete request".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let head = parse_request(&request)?;
                return Ok((head, buf[len..].to_vec()));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => continue,
            Ok(httparse::Status::Partial) => return Err("request head too large".into()),
            Err(e) => return Err(format!("malformed request: {e}")),
        }
    }
}

fn split_authority(authority: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let bad = || format!("{authority:?} is not HOST:PORT");
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or_else(bad)?;
        (format!("[{inside}]"), after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let port = match (port, default_port) {
        (Some(p), _) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?,
        (None, Some(d)) => d,
        (None, None) => return Err(bad()),
    };
    if host.is_empty() || host.len() > 255 {
        return Err(bad());
    }
    Ok((host, port))
}

fn parse_request(request: &httparse::Request<'_, '_>) -> Result<Head, String> {
    let method = request.method.unwrap_or_default().to_string();
    let target = request.path.unwrap_or_default();
    if method == "CONNECT" {
        let (host, port) = split_authority(target, None)?;
        return Ok(Head {
            method,
            host,
            port,
            forward: None,
        });
    }
    let rest = target.strip_prefix("http://").ok_or_else(|| {
        format!("{target:?}: only http:// URLs are forwarded; use CONNECT for TLS")
    })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err("credentials in proxy URLs are not forwarded".into());
    }
    let (host, port) = split_authority(authority, Some(80))?;
    // The origin gets an origin-form request; hop-by-hop and proxy headers stay here.
    let mut forward = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
    for header in request.headers.iter() {
        let name = header.name.to_ascii_lowercase();
        if matches!(
            name.as_str(),
            "proxy-connection" | "proxy-authorization" | "connection" | "keep-alive"
        ) {
            continue;
        }
        forward.extend_from_slice(header.name.as_bytes());
        forward.extend_from_slice(b": ");
        forward.extend_from_slice(header.value);
        forward.extend_from_slice(b"\r\n");
    }
    forward.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(Head {
        method,
        host,
        port,
        forward: Some(forward),
    })
}

async fn relay(client: TcpStream, upstream: TcpStream, shared: &Shared, live: &Live) {
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let up = pump(client_read, upstream_write, shared, &live.up);
    let down = pump(upstream_read, client_write, shared, &live.down);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    // Each direction ends on its own (half-close), but a spent byte budget ends
    // both at once: dropping the halves closes both connections.
    while !(up_done && down_done) {
        tokio::select! {
            over_budget = &mut up, if !up_done => {
                up_done = true;
                if over_budget { break }
            }
            over_budget = &mut down, if !down_done => {
                down_done = true;
                if over_budget { break }
            }
        }
    }
}

/// Copies one direction until EOF or the idle timeout; `true` when it stopped
/// because the step's byte budget is spent.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    shared: &Shared,
    counter: &AtomicU64,
) -> bool {
    // Large reads: a bulk download moves in few syscalls and timer resets.
    let mut buf = vec![0u8; 256 * 1024];
    let mut over_budget = false;
    loop {
        let n = match tokio::time::timeout(shared.limits.idle_timeout, from.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => n,
        };
        let total = shared.total_bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if total > shared.limits.max_bytes {
            over_budget = true;
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
    over_budget
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::collections::HashMap;

    fn resolver(table: &[(&str, &str)]) -> Resolver {
        let table: HashMap<String, IpAddr> = table
            .iter()
            .map(|(h, ip)| (h.to_string(), ip.parse().unwrap()))
            .collect();
        Arc::new(move |host: String| {
            let found = table.get(&host).copied();
            Box::pin(async move {
                found.map(|ip| vec![ip]).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such host")
                })
            })
        })
    }

    /// An origin on loopback: answers HTTP requests with "hello", and echoes
    /// anything that does not start like an HTTP request.
    async fn origin() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if buf[..n].starts_with(b"GET ") {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                            .await;
                    } else {
                        let _ = s.write_all(&buf[..n]).await;
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                });
            }
        });
        port
    }

    async fn proxy(allow: &[&str], table: &[(&str, &str)], limits: ProxyLimits) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Proxy::start(
            listener,
            AllowList::parse(allow).unwrap(),
            limits,
            resolver(table),
        )
        .unwrap()
    }

    /// Sends a request and reads the answer: to the end, or for an opened tunnel
    /// just its status line.
    async fn exchange(proxy: &Proxy, request: &str) -> String {
        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
            match read {
                Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
                _ => break,
            }
            if out.starts_with(b"HTTP/1.1 200 Connection Established\r\n\r\n") {
                break;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn forwards_allowed_http_and_records_it() {
        let port = origin().await;
        let p = proxy(&[&format!("127.0.0.1:{port}")], &[], ProxyLimits::default()).await;
        let reply = exchange(
            &p,
            &format!("GET http://127.0.0.1:{port}/x HTTP/1.1\r\nHost: 127.0.0.1\r\nProxy-Connection: keep-alive\r\n\r\n"),
        )
        .await;
        assert!(
            reply.starts_with("HTTP/1.1 200 OK") && reply.ends_with("hello"),
            "{reply}"
        );
        let report = p.finish().await;
        assert_eq!(report.attempts.len(), 1);
        let a = &report.attempts[0];
        assert_eq!(
            (a.decision.as_str(), a.method.as_str(), a.port),
            ("allowed", "GET", port)
        );
        assert_eq!(a.address, format!("127.0.0.1:{port}"));
        assert!(a.bytes_down > 0 && a.bytes_up > 0, "{a:?}");
    }

    #[tokio::test]
    async fn tunnels_allowed_connect() {
        let port = origin().await;
        let p = proxy(&[&format!("127.0.0.1:{port}")], &[], ProxyLimits::default()).await;
        let mut s = TcpStream::connect(p.local_addr()).await.unwrap();
        s.write_all(format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        s.write_all(b"ping").await.unwrap();
        let n = s.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
        let report = p.finish().await;
        assert_eq!(report.attempts[0].decision, "allowed");
        assert_eq!(report.attempts[0].bytes_up, 4);
    }

    #[tokio::test]
    async fn refuses_what_the_list_does_not_name() {
        let port = origin().await;
        let p = proxy(
            &[
                &format!("127.0.0.1:{port}"),
                "example.org:443",
                &format!("internal.test:{port}"),
            ],
            &[
                ("example.org", "93.184.216.34"),
                ("internal.test", "127.0.0.1"),
            ],
            ProxyLimits::default(),
        )
        .await;
        // Not listed at all.
        let r = exchange(&p, "CONNECT other.org:443 HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 403") && r.contains("not on the step's allow-list"),
            "{r}"
        );
        // Listed host, other port.
        let r = exchange(&p, "CONNECT example.org:80 HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 403"), "{r}");
        // Listed name that resolves to loopback: the literal entry does not cover
        // names, and the name alone may not reach the host.
        let p2 = proxy(
            &[&format!("internal.test:{port}")],
            &[("internal.test", "127.0.0.1")],
            ProxyLimits::default(),
        )
        .await;
        let r = exchange(
            &p2,
            &format!("CONNECT internal.test:{port} HTTP/1.1\r\n\r\n"),
        )
        .await;
        assert!(
            r.starts_with("HTTP/1.1 403") && r.contains("loopback"),
            "{r}"
        );
        let report = p2.finish().await;
        assert_eq!(report.attempts[0].decision, "denied");
        // With the literal address also listed, the same name passes.
        let r = exchange(
            &p,
            &format!("CONNECT internal.test:{port} HTTP/1.1\r\n\r\n"),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        // https:// URLs must use CONNECT; malformed requests are refused.
        let r = exchange(&p, "GET https://example.org/ HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        let report = p.finish().await;
        let decisions: Vec<&str> = report
            .attempts
            .iter()
            .map(|a| a.decision.as_str())
            .collect();
        assert_eq!(decisions, ["denied", "denied", "allowed", "denied"]);
    }

    #[tokio::test]
    async fn enforces_connection_and_byte_limits_and_closes_on_finish() {
        let port = origin().await;
        let limits = ProxyLimits {
            max_connections: 1,
            max_bytes: 8,
            ..ProxyLimits::default()
        };
        let p = proxy(&[&format!("127.0.0.1:{port}")], &[], limits).await;
        let mut tunnel = TcpStream::connect(p.local_addr()).await.unwrap();
        tunnel
            .write_all(format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = tunnel.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        // A second connection while the first is open exceeds the limit.
        let r = exchange(&p, &format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n")).await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        // More than 8 bytes in total ends the tunnel.
        tunnel.write_all(b"0123456789abcdef").await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut rest)).await;
        assert!(
            rest.len() < 16,
            "byte limit not enforced: {} bytes",
            rest.len()
        );
        let report = p.finish().await;
        assert!(report
            .attempts
            .iter()
            .any(|a| a.reason.contains("too many connections")));
    }

    #[tokio::test]
    async fn finish_closes_open_tunnels() {
        let port = origin().await;
        let p = proxy(&[&format!("127.0.0.1:{port}")], &[], ProxyLimits::default()).await;
        let mut tunnel = TcpStream::connect(p.local_addr()).await.unwrap();
        tunnel
            .write_all(format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let _ = tunnel.read(&mut buf).await.unwrap();
        let report = p.finish().await;
        assert_eq!(report.attempts.len(), 1);
        let n = tokio::time::timeout(Duration::from_secs(5), tunnel.read(&mut buf))
            .await
            .expect("tunnel still open after the step ended")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
}
