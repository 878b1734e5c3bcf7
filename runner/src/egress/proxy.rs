//! The egress proxy of a step with an allow-list: HTTP `CONNECT` tunnels and
//! plain HTTP forward requests, each checked against the step's allow-list, with
//! names resolved here (never by the step) and every attempt recorded.
//!
//! The listener is created by the caller inside the step's network namespace (a
//! socket belongs to the namespace it was created in), so the step reaches the
//! proxy on its own loopback while the proxy's outgoing connections leave from
//! the host's network.
//!
//! hyper parses and frames the step's HTTP: every request on a client connection
//! (kept alive or pipelined) is checked and recorded on its own and forwarded on an
//! upstream connection of its own, with the Host header naming the checked
//! authority. A tunnel is opened to the checked addresses only after its TLS
//! ClientHello has named the host the CONNECT named.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::egress::netpolicy::{AllowList, Decision, HostAddresses};

/// Request line and headers together.
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// Attempts kept in full for the link; later ones are only counted.
const MAX_RECORDS: usize = 1000;
/// Real ClientHellos are a few KiB (post-quantum key shares included).
const MAX_CLIENT_HELLO: usize = 32 * 1024;
/// Large reads: a bulk transfer moves in few syscalls.
const RELAY_BUFFER: usize = 256 * 1024;

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
    /// For a tunnel: the server name its TLS ClientHello sent (SNI), if any.
    pub sni: String,
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
            sni: a.sni.clone(),
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
        // Reported to the client; saturates rather than wraps.
        a.duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        a
    }

    fn update(&self, change: impl FnOnce(&mut Attempt)) {
        match self.attempt.lock() {
            Ok(mut a) => change(&mut a),
            Err(poisoned) => change(&mut poisoned.into_inner()),
        }
    }

    /// Fixes the duration the first time the attempt's connection ends.
    fn end(&self) {
        if let Ok(mut ended) = self.ended.lock() {
            ended.get_or_insert_with(|| self.started.elapsed());
        }
    }
}

struct Shared {
    allow: AllowList,
    limits: ProxyLimits,
    resolver: Resolver,
    /// The host's interface addresses when the proxy started.
    own: HostAddresses,
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
                sni = %attempt.sni,
                decision = %attempt.decision,
                reason = %attempt.reason,
                "step network attempt"
            );
        }
        // A refusal is over when it is recorded.
        let ended = (attempt.decision == "denied").then_some(Duration::ZERO);
        let live = Arc::new(Live {
            attempt: Mutex::new(attempt),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            started: Instant::now(),
            ended: Mutex::new(ended),
        });
        match records.as_mut() {
            Some(records) if keep => records.push(live.clone()),
            _ => {
                self.unrecorded.fetch_add(1, Ordering::Relaxed);
            }
        }
        live
    }

    fn budget_spent(&self) -> bool {
        self.total_bytes.load(Ordering::Relaxed) > self.limits.max_bytes
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
    /// Serves on `listener` (already bound, e.g. inside the step's namespace). Call it
    /// from the host's network namespace: it takes the host's interface addresses.
    pub fn start(
        listener: std::net::TcpListener,
        allow: AllowList,
        limits: ProxyLimits,
        resolver: Resolver,
    ) -> std::io::Result<Proxy> {
        let own = HostAddresses::of_this_host()?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = TcpListener::from_std(listener)?;
        let shared = Arc::new(Shared {
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            allow,
            limits,
            resolver,
            own,
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
    // The step is over: nothing it opened may outlive it (dropping a connection's
    // task drops its upstream connections too).
    connections.shutdown().await;
}

fn attempt(method: &str, host: &str, port: u16, decision: &str, reason: String) -> Attempt {
    Attempt {
        method: method.to_string(),
        host: host.to_string(),
        port,
        resolved: Vec::new(),
        address: String::new(),
        decision: decision.into(),
        reason,
        sni: String::new(),
        bytes_up: 0,
        bytes_down: 0,
        duration_ms: 0,
    }
}

fn denied(method: &str, host: &str, port: u16, reason: String) -> Attempt {
    attempt(method, host, port, "denied", reason)
}

/// One client connection of the step.
struct ClientConnection {
    shared: Arc<Shared>,
    requests: AtomicUsize,
    /// A CONNECT that passed the list, opened once hyper hands over the connection.
    tunnel: Mutex<Option<Tunnel>>,
    /// The upstream connections of forwarded requests; dropping the set (with this
    /// connection) closes them.
    upstreams: Mutex<JoinSet<()>>,
}

type ProxyBody = Either<Incoming, Full<Bytes>>;

async fn handle(client: TcpStream, shared: Arc<Shared>) {
    let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
        shared.record(denied(
            "?",
            "",
            0,
            "too many connections for this step".into(),
        ));
        refuse_raw(client, "503 Service Unavailable", "too many connections").await;
        return;
    };
    let connection = Arc::new(ClientConnection {
        shared: shared.clone(),
        requests: AtomicUsize::new(0),
        tunnel: Mutex::new(None),
        upstreams: Mutex::new(JoinSet::new()),
    });
    let service = {
        let connection = connection.clone();
        hyper::service::service_fn(move |request| {
            let connection = connection.clone();
            async move { Ok::<_, Infallible>(connection.serve(request).await) }
        })
    };
    let io = TokioIo::new(Metered::new(client, shared.clone(), None));
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.head_timeout)
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEAD_BYTES)
        // A client may send its requests and shut its side before reading answers.
        .half_close(true)
        .serve_connection(io, service)
        .with_upgrades()
        .await;
    if let Err(err) = served {
        if connection.requests.load(Ordering::Relaxed) == 0 {
            let reason = if err.is_timeout() {
                "no request before the timeout".to_string()
            } else if err.is_parse() || err.is_parse_too_large() {
                format!("malformed request: {err}")
            } else {
                format!("the connection failed before a request: {err}")
            };
            shared.record(denied("?", "", 0, reason));
        }
    }
    let tunnel = connection.tunnel.lock().ok().and_then(|mut t| t.take());
    if let Some(tunnel) = tunnel {
        tunnel.run(&shared, permit).await;
    }
}

/// A refusal before hyper has the connection (the connection limit).
async fn refuse_raw(mut stream: TcpStream, status: &str, reason: &str) {
    let body = format!("kiln proxy: {reason}\n");
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// An answer of the proxy itself; it closes the client connection, so a refused
/// client starts afresh.
fn answer(status: StatusCode, reason: &str) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from(format!("kiln proxy: {reason}\n")));
    let mut response = Response::new(Either::Right(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

impl ClientConnection {
    async fn serve(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if request.method() == Method::CONNECT {
            self.open_tunnel(request).await
        } else {
            self.forward(request).await
        }
    }

    /// Checks a CONNECT's authority; the tunnel itself runs once hyper has sent the
    /// 200 and handed the connection over.
    async fn open_tunnel(&self, mut request: Request<Incoming>) -> Response<ProxyBody> {
        let shared = &self.shared;
        let uri = request.uri();
        let target = uri
            .authority()
            .filter(|_| uri.scheme().is_none())
            .and_then(|a| Some((a.host().to_string(), a.port_u16().filter(|p| *p > 0)?)))
            .filter(|_| !uri.to_string().contains('@'));
        let Some((host, port)) = target else {
            let reason = format!("{uri:?} is not HOST:PORT");
            shared.record(denied("CONNECT", "", 0, reason.clone()));
            return answer(StatusCode::BAD_REQUEST, &reason);
        };
        let (addresses, resolved) = match decide(shared, &host, port).await {
            Ok(found) => found,
            Err((reason, resolved)) => {
                let mut refused = denied("CONNECT", &host, port, reason.clone());
                refused.resolved = resolved.iter().map(ToString::to_string).collect();
                shared.record(refused);
                return answer(StatusCode::FORBIDDEN, &reason);
            }
        };
        let mut opened = attempt(
            "CONNECT",
            &host,
            port,
            "allowed",
            "on the allow-list".into(),
        );
        opened.resolved = resolved.iter().map(ToString::to_string).collect();
        // Recorded now: a tunnel still waiting for its ClientHello when the step ends
        // is in the link too.
        let live = shared.record(opened);
        let literal = literal_ip(&host).is_some();
        let Ok(mut tunnel) = self.tunnel.lock() else {
            live.update(|a| a.reason = "internal error: the tunnel was not opened".into());
            live.end();
            return answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the tunnel was not opened",
            );
        };
        *tunnel = Some(Tunnel {
            upgrade: hyper::upgrade::on(&mut request),
            host,
            port,
            literal,
            addresses,
            live,
        });
        drop(tunnel);
        let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
        response
            .extensions_mut()
            .insert(hyper::ext::ReasonPhrase::from_static(
                b"Connection Established",
            ));
        response
    }

    /// A plain HTTP request: checked, recorded, and sent on an upstream connection
    /// of its own with a Host header naming the checked authority.
    async fn forward(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        let shared = &self.shared;
        let method = request.method().to_string();
        let target = match HttpTarget::of(request.uri()) {
            Ok(target) => target,
            Err(reason) => {
                shared.record(denied(&method, "", 0, reason.clone()));
                return answer(StatusCode::BAD_REQUEST, &reason);
            }
        };
        let (host, port) = (target.host.as_str(), target.port);
        if let Err(reason) = check_host_header(request.headers(), host, port) {
            shared.record(denied(&method, host, port, reason.clone()));
            return answer(StatusCode::FORBIDDEN, &reason);
        }
        let (addresses, resolved) = match decide(shared, host, port).await {
            Ok(found) => found,
            Err((reason, resolved)) => {
                let mut refused = denied(&method, host, port, reason.clone());
                refused.resolved = resolved.iter().map(ToString::to_string).collect();
                shared.record(refused);
                return answer(StatusCode::FORBIDDEN, &reason);
            }
        };
        let mut allowed = attempt(&method, host, port, "allowed", "on the allow-list".into());
        allowed.resolved = resolved.iter().map(ToString::to_string).collect();
        let (stream, address) = match connect(shared, &addresses, port).await {
            Ok(connected) => connected,
            Err(reason) => {
                allowed.reason = reason.clone();
                shared.record(allowed).end();
                return answer(StatusCode::BAD_GATEWAY, &reason);
            }
        };
        allowed.address = address.to_string();
        let live = shared.record(allowed);
        let io = TokioIo::new(Metered::new(stream, shared.clone(), Some(live.clone())));
        let (mut sender, upstream) = match hyper::client::conn::http1::handshake(io).await {
            Ok(handshake) => handshake,
            Err(err) => {
                let reason = format!("connecting to {address}: {err}");
                live.update(|a| a.reason = reason.clone());
                live.end();
                return answer(StatusCode::BAD_GATEWAY, &reason);
            }
        };
        if let Ok(mut upstreams) = self.upstreams.lock() {
            while upstreams.try_join_next().is_some() {}
            let live = live.clone();
            upstreams.spawn(async move {
                let _ = upstream.await;
                live.end();
            });
        }
        match sender.send_request(target.origin_request(request)).await {
            Ok(response) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                let reason = "the server switched protocols, which the proxy does not forward";
                live.update(|a| a.reason = reason.into());
                answer(StatusCode::BAD_GATEWAY, reason)
            }
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                parts.extensions = Default::default();
                Response::from_parts(parts, Either::Left(body))
            }
            Err(err) => {
                let reason = format!("forwarding to {address}: {err}");
                live.update(|a| a.reason = reason.clone());
                answer(StatusCode::BAD_GATEWAY, &reason)
            }
        }
    }
}

/// The destination of a plain HTTP request: its absolute-form target.
struct HttpTarget {
    /// As in the URL (an IPv6 address in brackets).
    host: String,
    port: u16,
    path: PathAndQuery,
}

impl HttpTarget {
    fn of(uri: &Uri) -> Result<HttpTarget, String> {
        match uri.scheme_str() {
            Some("http") => {}
            Some(_) => {
                return Err(format!(
                    "{uri}: only http:// URLs are forwarded; use CONNECT for TLS"
                ))
            }
            None => {
                return Err(format!(
                    "{uri}: not a proxy request (the target must be an absolute http:// URL)"
                ))
            }
        }
        let authority = uri.authority().ok_or_else(|| format!("{uri}: no host"))?;
        if authority.as_str().contains('@') {
            return Err("credentials in proxy URLs are not forwarded".into());
        }
        let port = authority.port_u16().unwrap_or(80);
        if authority.host().is_empty() || port == 0 {
            return Err(format!("{uri}: not HOST:PORT"));
        }
        let path = match uri.path_and_query() {
            Some(p) if p.as_str().starts_with('/') => p.clone(),
            Some(p) => format!("/{}", p.as_str())
                .parse()
                .map_err(|_| format!("{uri}: bad path"))?,
            None => PathAndQuery::from_static("/"),
        };
        Ok(HttpTarget {
            host: authority.host().to_string(),
            port,
            path,
        })
    }

    /// The Host header the origin gets: the checked authority, nothing the client said.
    fn host_header(&self) -> Result<HeaderValue, String> {
        let text = if self.port == 80 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        };
        HeaderValue::from_str(&text).map_err(|_| format!("{text:?} is not a Host value"))
    }

    /// The request in origin form, without hop-by-hop and proxy headers; hyper frames
    /// the body again (so no framing header of the client reaches the origin).
    fn origin_request(&self, request: Request<Incoming>) -> Request<Incoming> {
        let (mut parts, body) = request.into_parts();
        let mut uri = hyper::http::uri::Parts::default();
        uri.path_and_query = Some(self.path.clone());
        parts.uri = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
        parts.version = Version::HTTP_11;
        parts.extensions = Default::default();
        strip_hop_by_hop(&mut parts.headers);
        for name in [header::HOST, header::CONTENT_LENGTH, header::EXPECT] {
            parts.headers.remove(name);
        }
        // `of` parsed the host from a URI; the header value is valid.
        if let Ok(host) = self.host_header() {
            parts.headers.insert(header::HOST, host);
        }
        // One request per upstream connection.
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        Request::from_parts(parts, body)
    }
}

/// The Host header may be absent (the proxy sets it) or name the request's own
/// authority; two Host headers, or one naming anything else, are refused.
fn check_host_header(headers: &HeaderMap, host: &str, port: u16) -> Result<(), String> {
    let mut values = headers.get_all(header::HOST).iter();
    let Some(value) = values.next() else {
        return Ok(());
    };
    if values.next().is_some() {
        return Err("more than one Host header".into());
    }
    let named = value
        .to_str()
        .ok()
        .and_then(|v| v.parse::<Authority>().ok())
        .filter(|a| !a.as_str().contains('@'));
    match named {
        Some(a) if a.host().eq_ignore_ascii_case(host) && a.port_u16().unwrap_or(80) == port => {
            Ok(())
        }
        _ => Err(format!(
            "the Host header {:?} does not name the request's target {host}:{port}",
            String::from_utf8_lossy(value.as_bytes())
        )),
    }
}

/// Removes the headers that concern only one hop: those `Connection` lists, and the
/// standard ones. A response with `Transfer-Encoding` loses its `Content-Length` too:
/// hyper frames the body again.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

fn literal_ip(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Checks the destination and returns the addresses that may be connected to
/// (and, for a name, everything it resolved to); a refusal carries its reason and what
/// the name resolved to, for the record.
async fn decide(
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
async fn connect(
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

/// A CONNECT that passed the allow-list.
struct Tunnel {
    upgrade: hyper::upgrade::OnUpgrade,
    host: String,
    port: u16,
    /// The CONNECT named an address, not a name.
    literal: bool,
    addresses: Vec<IpAddr>,
    live: Arc<Live>,
}

impl Tunnel {
    /// Reads the ClientHello, checks its server name against the CONNECT's host, and
    /// only then connects and relays. The permit keeps the tunnel counted.
    async fn run(self, shared: &Arc<Shared>, _permit: OwnedSemaphorePermit) {
        let live = self.live.clone();
        self.relay(shared).await;
        live.end();
    }

    async fn relay(self, shared: &Arc<Shared>) {
        let live = &self.live;
        let Ok(upgraded) = self.upgrade.await else {
            live.update(|a| a.reason = "the client left before the tunnel opened".into());
            return;
        };
        let mut client = TokioIo::new(upgraded);
        let mut hello = Vec::new();
        let read = tokio::time::timeout(
            shared.limits.head_timeout,
            read_client_hello(&mut client, &mut hello),
        )
        .await;
        let seen = match read {
            Ok(seen) => seen,
            Err(_) if hello.is_empty() => Hello::Silent,
            Err(_) => Hello::Refused(format!(
                "the ClientHello did not arrive within {} s",
                shared.limits.head_timeout.as_secs()
            )),
        };
        if let Hello::Tls {
            sni: Some(name), ..
        } = &seen
        {
            live.update(|a| a.sni = name.clone());
        }
        let verdict = match seen {
            Hello::Closed => {
                live.update(|a| {
                    a.reason = "the client closed the tunnel before sending anything".into()
                });
                return;
            }
            Hello::Tls { sni, ech } => match (sni, self.literal) {
                (Some(name), false) if same_name(&name, &self.host) => Ok(ech),
                (Some(name), false) => Err(format!(
                    "the TLS ClientHello names {name}, not {}, the host of the CONNECT",
                    self.host
                )),
                (None, false) => Err(format!(
                    "the TLS ClientHello names no server (SNI); a tunnel to {} must name it",
                    self.host
                )),
                (Some(name), true) => Err(format!(
                    "the TLS ClientHello names {name}, but the CONNECT named the address {}",
                    self.host
                )),
                (None, true) => Ok(ech),
            },
            // A tunnel to a listed address may carry any protocol: there is no name
            // to check.
            Hello::NotTls | Hello::Silent if self.literal => Ok(false),
            Hello::NotTls => Err(format!(
                "the tunnel does not start with a TLS ClientHello; a tunnel to a name ({}) must carry TLS",
                self.host
            )),
            Hello::Silent => Err(format!(
                "no TLS ClientHello within {} s; a tunnel to a name ({}) must carry TLS",
                shared.limits.head_timeout.as_secs(),
                self.host
            )),
            Hello::Refused(reason) => Err(reason),
        };
        let ech = match verdict {
            Ok(ech) => ech,
            Err(reason) => {
                live.update(|a| {
                    a.decision = "denied".into();
                    a.reason = reason;
                });
                return;
            }
        };
        if ech {
            live.update(|a| {
                a.reason =
                    "on the allow-list; the ClientHello is encrypted (ECH): the server name above is its outer one"
                        .into()
            });
        }
        let (stream, address) = match connect(shared, &self.addresses, self.port).await {
            Ok(connected) => connected,
            Err(reason) => {
                live.update(|a| a.reason = reason);
                return;
            }
        };
        live.update(|a| a.address = address.to_string());
        let mut upstream = Metered::new(stream, shared.clone(), Some(live.clone()));
        if upstream.write_all(&hello).await.is_err() {
            return;
        }
        // Ends on EOF both ways (each side's close passes on as a half-close), on an
        // error, on idleness or on a spent byte budget (the metered sides fail).
        let _ = tokio::io::copy_bidirectional_with_sizes(
            &mut client,
            &mut upstream,
            RELAY_BUFFER,
            RELAY_BUFFER,
        )
        .await;
    }
}

fn same_name(a: &str, b: &str) -> bool {
    a.trim_end_matches('.')
        .eq_ignore_ascii_case(b.trim_end_matches('.'))
}

/// What a tunnel's first bytes showed.
#[derive(Debug, PartialEq, Eq)]
enum Hello {
    /// A complete, well-formed ClientHello.
    Tls {
        sni: Option<String>,
        /// It carries an encrypted ClientHello (ECH): the real server name is inside.
        ech: bool,
    },
    /// The first byte is not a TLS handshake record.
    NotTls,
    /// Nothing arrived in time.
    Silent,
    /// The client closed before sending a byte.
    Closed,
    /// A broken, truncated or oversized ClientHello.
    Refused(String),
}

/// Reads from the client until its first bytes are a complete ClientHello or show
/// that they are none; every byte read stays in `buf`, to be forwarded.
async fn read_client_hello(client: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) -> Hello {
    let mut chunk = vec![0u8; 4096];
    loop {
        if let Some(seen) = parse_client_hello(buf) {
            return seen;
        }
        if buf.len() >= MAX_CLIENT_HELLO {
            return Hello::Refused(format!(
                "the ClientHello is larger than {} KiB",
                MAX_CLIENT_HELLO / 1024
            ));
        }
        let room = chunk.len().min(MAX_CLIENT_HELLO - buf.len());
        match client.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) if buf.is_empty() => return Hello::Closed,
            Ok(0) | Err(_) => {
                return Hello::Refused("the client closed the tunnel inside its ClientHello".into())
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Judges the bytes so far; `None` while a ClientHello is incomplete. Every length in
/// the hello must add up exactly: what this parser reads is what a server reads.
fn parse_client_hello(buf: &[u8]) -> Option<Hello> {
    use tls_parser::nom::Err as NomErr;
    use tls_parser::{parse_tls_handshake_client_hello, parse_tls_raw_record, TlsRecordType};
    const CLIENT_HELLO: u8 = 1;

    let first = *buf.first()?;
    if first != TlsRecordType::Handshake.0 {
        return Some(Hello::NotTls);
    }
    let refused = |why: &str| Some(Hello::Refused(format!("malformed TLS ClientHello: {why}")));
    // A ClientHello may span several handshake records.
    let mut handshake = Vec::new();
    let mut rest = buf;
    loop {
        let record = match parse_tls_raw_record(rest) {
            Ok((after, record)) => {
                rest = after;
                record
            }
            Err(NomErr::Incomplete(_)) => return None,
            Err(_) => return refused("bad record"),
        };
        if record.hdr.record_type != TlsRecordType::Handshake {
            return refused("a record other than a handshake inside it");
        }
        handshake.extend_from_slice(record.data);
        let Some(header) = handshake.get(..4) else {
            continue;
        };
        if header[0] != CLIENT_HELLO {
            return refused("the first handshake message is not a ClientHello");
        }
        let length =
            usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
        if length + 4 > MAX_CLIENT_HELLO {
            return Some(Hello::Refused(format!(
                "the ClientHello is larger than {} KiB",
                MAX_CLIENT_HELLO / 1024
            )));
        }
        if handshake.len() < length + 4 {
            continue;
        }
        if handshake.len() > length + 4 {
            return refused("more than the ClientHello in its records");
        }
        let hello = match parse_tls_handshake_client_hello(&handshake[4..]) {
            Ok(([], hello)) => hello,
            _ => return refused("bad or trailing fields"),
        };
        return Some(match hello.ext {
            None => Hello::Tls {
                sni: None,
                ech: false,
            },
            Some(extensions) => examine_extensions(extensions)
                .unwrap_or_else(|why| Hello::Refused(format!("malformed TLS ClientHello: {why}"))),
        });
    }
}

/// The server name and ECH of a ClientHello's extension block. Every extension's
/// length must fit and the lengths must add up to the block exactly, so no server name
/// can hide past a malformed one; at most one server name extension.
fn examine_extensions(block: &[u8]) -> Result<Hello, &'static str> {
    use tls_parser::{parse_tls_extension_sni_content, SNIType, TlsExtension};
    const SERVER_NAME: u16 = 0;
    const ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;

    let mut server_names = Vec::new();
    let mut ech = false;
    let mut rest = block;
    while !rest.is_empty() {
        let [a, b, c, d, after_header @ ..] = rest else {
            return Err("bad extensions");
        };
        let kind = u16::from_be_bytes([*a, *b]);
        let length = usize::from(u16::from_be_bytes([*c, *d]));
        let (data, after) = after_header
            .split_at_checked(length)
            .ok_or("bad extensions")?;
        match kind {
            SERVER_NAME => server_names.push(data),
            ENCRYPTED_CLIENT_HELLO => ech = true,
            _ => {}
        }
        rest = after;
    }
    let sni = match server_names.as_slice() {
        [] => None,
        [data] => {
            let name = match parse_tls_extension_sni_content(data) {
                Ok(([], TlsExtension::SNI(names))) => match names.as_slice() {
                    [(SNIType::HostName, name)] if data.len() == name.len() + 5 => *name,
                    _ => return Err("the server name list is not one host name"),
                },
                _ => return Err("bad server name"),
            };
            let name = std::str::from_utf8(name)
                .ok()
                .filter(|n| is_host_name(n))
                .ok_or("the server name is not a host name")?;
            Some(name.to_ascii_lowercase())
        }
        _ => return Err("more than one server name extension"),
    };
    Ok(Hello::Tls { sni, ech })
}

/// ASCII letters, digits, '-', '_' and dots, at most 253 bytes: what a DNS name in SNI
/// can be.
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// A side of a relay that fails once the step's byte budget is spent or nothing has
/// moved either way for the idle timeout. The upstream side counts its bytes for its
/// attempt and the budget (written: up; read: down).
struct Metered<T> {
    inner: T,
    shared: Arc<Shared>,
    live: Option<Arc<Live>>,
    idle: Pin<Box<tokio::time::Sleep>>,
}

impl<T> Metered<T> {
    fn new(inner: T, shared: Arc<Shared>, live: Option<Arc<Live>>) -> Self {
        let idle = Box::pin(tokio::time::sleep(shared.limits.idle_timeout));
        Metered {
            inner,
            shared,
            live,
            idle,
        }
    }

    fn moved(&mut self) {
        let deadline = tokio::time::Instant::now() + self.shared.limits.idle_timeout;
        self.idle.as_mut().reset(deadline);
    }

    /// Adds `n` bytes to the budget; `false` if that spends it.
    fn count(&self, n: usize, counter: impl Fn(&Live) -> &AtomicU64) -> bool {
        let Some(live) = &self.live else {
            return !self.shared.budget_spent();
        };
        let total = self
            .shared
            .total_bytes
            .fetch_add(n as u64, Ordering::Relaxed)
            + n as u64;
        if total > self.shared.limits.max_bytes {
            return false;
        }
        counter(live).fetch_add(n as u64, Ordering::Relaxed);
        true
    }

    fn idle_over(&mut self, cx: &mut Context<'_>) -> bool {
        self.idle.as_mut().poll(cx).is_ready()
    }
}

fn spent() -> std::io::Error {
    std::io::Error::other("the step's network byte budget is spent")
}

fn idle() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "idle for too long")
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.shared.budget_spent() {
            return Poll::Ready(Err(spent()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    this.moved();
                    if !this.count(n, |l| &l.down) {
                        // Bytes past the budget are not passed on.
                        buf.set_filled(before);
                        return Poll::Ready(Err(spent()));
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.idle_over(cx) => Poll::Ready(Err(idle())),
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let used = this.shared.total_bytes.load(Ordering::Relaxed);
        let left = this.shared.limits.max_bytes.saturating_sub(used);
        if this.shared.budget_spent() || (this.live.is_some() && left == 0 && !buf.is_empty()) {
            return Poll::Ready(Err(spent()));
        }
        // Upstream, never more than the budget allows.
        let len = match this.live {
            Some(_) => buf.len().min(usize::try_from(left).unwrap_or(usize::MAX)),
            None => buf.len(),
        };
        match Pin::new(&mut this.inner).poll_write(cx, &buf[..len]) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.moved();
                    if !this.count(n, |l| &l.up) {
                        return Poll::Ready(Err(spent()));
                    }
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending if this.idle_over(cx) => Poll::Ready(Err(idle())),
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
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

    /// An origin on loopback. An HTTP request (up to its blank line, then as many
    /// body bytes as its Content-Length says) is answered with "hello" for a GET and
    /// with the request itself for anything else; bytes that do not start like an
    /// HTTP request are echoed. Counts the connections it accepted.
    async fn origin() -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    got.extend_from_slice(&buf[..n]);
                    let is_http = [&b"GET "[..], b"POST ", b"PUT "]
                        .iter()
                        .any(|m| got.starts_with(m));
                    if !is_http {
                        let _ = s.write_all(&got).await;
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        return;
                    }
                    let head_end = loop {
                        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        got.extend_from_slice(&buf[..n]);
                    };
                    let head = String::from_utf8_lossy(&got[..head_end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while got.len() < head_end + length {
                        let n = s.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                    }
                    let body = if got.starts_with(b"GET ") {
                        b"hello".to_vec()
                    } else {
                        got
                    };
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(&body).await;
                });
            }
        });
        (port, accepted)
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

    fn opened(out: &[u8]) -> bool {
        out.starts_with(b"HTTP/1.1 200 Connection Established\r\n")
            && out.windows(4).any(|w| w == b"\r\n\r\n")
    }

    /// Reads until the proxy closes, or an opened tunnel's answer is complete.
    async fn read_answer(s: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
            match read {
                Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
                _ => break,
            }
            if opened(&out) {
                break;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Sends a request and reads the answer: to the end, or for an opened tunnel
    /// just its head.
    async fn exchange(proxy: &Proxy, request: &str) -> String {
        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        read_answer(&mut s).await
    }

    /// Opens a tunnel, sends `first` through it and returns what comes back before
    /// the tunnel closes (or 5 s pass).
    async fn through_tunnel(proxy: &Proxy, target: &str, first: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let head = read_answer(&mut s).await;
        assert!(opened(head.as_bytes()), "{head}");
        s.write_all(first).await.unwrap();
        let mut back = Vec::new();
        let mut buf = [0u8; 4096];
        while back.len() < first.len() {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => back.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        back
    }

    /// A TLS length field of two bytes.
    fn be16(len: usize) -> [u8; 2] {
        u16::try_from(len)
            .expect("test length fits 16 bits")
            .to_be_bytes()
    }

    /// A TLS length field of three bytes (a handshake message's).
    fn be24(len: usize) -> [u8; 3] {
        let [high, a, b, c] = u32::try_from(len).expect("test length fits").to_be_bytes();
        assert_eq!(high, 0, "test length fits 24 bits");
        [a, b, c]
    }

    /// A TLS 1.2-framed ClientHello record with these extensions.
    fn hello_with(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend([7u8; 32]);
        body.push(0);
        body.extend([0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
        let mut block = Vec::new();
        for (kind, data) in extensions {
            block.extend(kind.to_be_bytes());
            block.extend(be16(data.len()));
            block.extend(data);
        }
        body.extend(be16(block.len()));
        body.extend(block);
        let mut handshake = vec![1];
        handshake.extend(be24(body.len()));
        handshake.extend(body);
        records(&[&handshake])
    }

    fn records(fragments: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for fragment in fragments {
            out.extend([0x16, 0x03, 0x01]);
            out.extend(be16(fragment.len()));
            out.extend(*fragment);
        }
        out
    }

    fn server_name(name: &str) -> (u16, Vec<u8>) {
        let name = name.as_bytes();
        let mut data = be16(name.len() + 3).to_vec();
        data.push(0);
        data.extend(be16(name.len()));
        data.extend(name);
        (0, data)
    }

    fn client_hello(name: Option<&str>) -> Vec<u8> {
        let supported_versions = (43, vec![2, 0x03, 0x04]);
        match name {
            Some(name) => hello_with(&[server_name(name), supported_versions]),
            None => hello_with(&[supported_versions]),
        }
    }

    #[tokio::test]
    async fn forwards_allowed_http_and_records_it() {
        let (port, _) = origin().await;
        let p = proxy(&[&format!("127.0.0.1:{port}")], &[], ProxyLimits::default()).await;
        let reply = exchange(
            &p,
            &format!("GET http://127.0.0.1:{port}/x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nProxy-Connection: keep-alive\r\nConnection: close\r\n\r\n"),
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
    async fn the_origin_gets_the_checked_authority_as_host_and_no_proxy_headers() {
        let (port, _) = origin().await;
        let p = proxy(&[&format!("127.0.0.1:{port}")], &[], ProxyLimits::default()).await;
        // No Host at all, a hop-by-hop header named by Connection, and a body.
        let reply = exchange(
            &p,
            &format!(
                "POST http://127.0.0.1:{port}/submit?q=1 HTTP/1.1\r\nProxy-Authorization: Basic eA==\r\nX-Hop: 1\r\nConnection: close, X-Hop\r\nContent-Length: 3\r\n\r\nabc"
            ),
        )
        .await;
        let echoed = reply.to_lowercase();
        assert!(echoed.starts_with("http/1.1 200 ok"), "{reply}");
        assert!(echoed.contains("post /submit?q=1 http/1.1\r\n"), "{reply}");
        assert!(
            echoed.contains(&format!("host: 127.0.0.1:{port}\r\n")),
            "{reply}"
        );
        assert!(echoed.contains("content-length: 3\r\n"), "{reply}");
        assert!(echoed.ends_with("\r\n\r\nabc"), "{reply}");
        for gone in ["proxy-authorization", "x-hop"] {
            assert!(!echoed.contains(gone), "{gone} forwarded: {reply}");
        }
        p.finish().await;
    }

    #[tokio::test]
    async fn a_host_header_naming_another_authority_is_refused_and_recorded() {
        let (port, accepted) = origin().await;
        let p = proxy(&[&format!("127.0.0.1:{port}")], &[], ProxyLimits::default()).await;
        for host_lines in [
            "Host: admin.internal\r\n".to_string(),
            format!("Host: 127.0.0.1:{port}\r\nHost: admin.internal\r\n"),
            format!("Host: 127.0.0.1:{}\r\n", port.wrapping_add(1)),
            "Host: 127.0.0.1\r\n".to_string(),
            format!("Host: user@127.0.0.1:{port}\r\n"),
        ] {
            let r = exchange(
                &p,
                &format!("GET http://127.0.0.1:{port}/ HTTP/1.1\r\n{host_lines}\r\n"),
            )
            .await;
            assert!(r.starts_with("HTTP/1.1 403"), "{host_lines}: {r}");
            assert!(r.contains("Host header"), "{host_lines}: {r}");
        }
        // Case does not matter; the default port may be left out.
        let r = exchange(
            &p,
            &format!(
                "GET http://LOCALHOST.test:{port}/ HTTP/1.1\r\nHost: localhost.TEST:{port}\r\n\r\n"
            ),
        )
        .await;
        assert!(
            r.starts_with("HTTP/1.1 403") && r.contains("allow-list"),
            "{r}"
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            0,
            "a refused request reached the origin"
        );
        let report = p.finish().await;
        assert_eq!(report.attempts.len(), 6);
        assert!(report.attempts.iter().all(|a| a.decision == "denied"));
        assert!(report.attempts[..5]
            .iter()
            .all(|a| a.reason.contains("Host header") && a.port == port));
    }

    #[tokio::test]
    async fn every_request_on_a_connection_is_checked_and_recorded() {
        let (port, accepted) = origin().await;
        let unlisted = port.wrapping_add(1);
        let p = proxy(&[&format!("127.0.0.1:{port}")], &[], ProxyLimits::default()).await;
        // Two allowed requests kept alive, then one the list does not name, pipelined.
        let r = exchange(
            &p,
            &format!(
                "GET http://127.0.0.1:{port}/a HTTP/1.1\r\n\r\n\
                 GET http://127.0.0.1:{port}/b HTTP/1.1\r\n\r\n\
                 GET http://127.0.0.1:{unlisted}/c HTTP/1.1\r\n\r\n\
                 GET http://127.0.0.1:{port}/d HTTP/1.1\r\n\r\n"
            ),
        )
        .await;
        let statuses: Vec<&str> = r.split("HTTP/1.1 ").skip(1).collect();
        assert_eq!(statuses.len(), 3, "{r}");
        assert!(
            statuses[0].starts_with("200") && statuses[1].starts_with("200"),
            "{r}"
        );
        assert!(statuses[2].starts_with("403"), "{r}");
        // Each allowed request had an upstream connection of its own; nothing after
        // the refusal was read.
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        let report = p.finish().await;
        let seen: Vec<(&str, u16)> = report
            .attempts
            .iter()
            .map(|a| (a.decision.as_str(), a.port))
            .collect();
        assert_eq!(
            seen,
            [("allowed", port), ("allowed", port), ("denied", unlisted)]
        );
        assert!(report.attempts[..2].iter().all(|a| a.bytes_down > 0));
    }

    #[tokio::test]
    async fn tunnels_allowed_connect() {
        let (port, _) = origin().await;
        let p = proxy(&[&format!("127.0.0.1:{port}")], &[], ProxyLimits::default()).await;
        // A tunnel to a listed address may carry something other than TLS.
        let back = through_tunnel(&p, &format!("127.0.0.1:{port}"), b"ping").await;
        assert_eq!(back, b"ping");
        let report = p.finish().await;
        assert_eq!(report.attempts[0].decision, "allowed");
        assert_eq!(report.attempts[0].bytes_up, 4);
    }

    #[tokio::test]
    async fn a_tunnel_opens_only_for_a_client_hello_naming_its_host() {
        let (port, accepted) = origin().await;
        let p = proxy(
            &[&format!("origin.test:{port}"), &format!("127.0.0.1:{port}")],
            &[("origin.test", "127.0.0.1")],
            ProxyLimits::default(),
        )
        .await;
        let target = format!("origin.test:{port}");
        // The right name, in any case: the hello reaches the origin unchanged.
        let hello = client_hello(Some("Origin.Test"));
        assert_eq!(through_tunnel(&p, &target, &hello).await, hello);
        // The hello split over two records and written in pieces.
        let whole = client_hello(Some("origin.test"));
        let handshake = &whole[5..];
        let split = records(&[&handshake[..10], &handshake[10..]]);
        assert_eq!(through_tunnel(&p, &target, &split).await, split);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // Another name, no name, no TLS at all, or a name in a tunnel to an address:
        // closed before anything is connected.
        for (target, first) in [
            (target.clone(), client_hello(Some("admin.internal"))),
            (target.clone(), client_hello(None)),
            (target.clone(), b"GET / HTTP/1.1\r\n\r\n".to_vec()),
            (
                format!("127.0.0.1:{port}"),
                client_hello(Some("origin.test")),
            ),
        ] {
            let back = through_tunnel(&p, &target, &first).await;
            assert!(back.is_empty(), "{target}: {back:?}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // A tunnel to an address may carry TLS without a name.
        let nameless = client_hello(None);
        let back = through_tunnel(&p, &format!("127.0.0.1:{port}"), &nameless).await;
        assert_eq!(back, nameless);
        let report = p.finish().await;
        let seen: Vec<(&str, &str, &str)> = report
            .attempts
            .iter()
            .map(|a| (a.host.as_str(), a.sni.as_str(), a.decision.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                ("origin.test", "origin.test", "allowed"),
                ("origin.test", "origin.test", "allowed"),
                ("origin.test", "admin.internal", "denied"),
                ("origin.test", "", "denied"),
                ("origin.test", "", "denied"),
                ("127.0.0.1", "origin.test", "denied"),
                ("127.0.0.1", "", "allowed"),
            ]
        );
        let reasons: Vec<&str> = report.attempts.iter().map(|a| a.reason.as_str()).collect();
        assert!(
            reasons[2].contains("names admin.internal, not origin.test"),
            "{reasons:?}"
        );
        assert!(reasons[3].contains("no server (SNI)"), "{reasons:?}");
        assert!(reasons[4].contains("must carry TLS"), "{reasons:?}");
        assert!(report.attempts[2..6].iter().all(|a| a.address.is_empty()));
    }

    #[test]
    fn client_hellos_are_read_strictly() {
        let tls = |sni: Option<&str>| {
            Some(Hello::Tls {
                sni: sni.map(String::from),
                ech: false,
            })
        };
        let hello = client_hello(Some("a.example.org"));
        assert_eq!(parse_client_hello(&hello), tls(Some("a.example.org")));
        assert_eq!(parse_client_hello(&client_hello(None)), tls(None));
        // Every prefix is incomplete, not wrong.
        for cut in 1..hello.len() {
            assert_eq!(parse_client_hello(&hello[..cut]), None, "cut at {cut}");
        }
        assert_eq!(parse_client_hello(b""), None);
        assert_eq!(parse_client_hello(b"SSH-2.0-x\r\n"), Some(Hello::NotTls));
        assert_eq!(
            parse_client_hello(&hello_with(&[
                server_name("a.example.org"),
                (0xfe0d, vec![0; 8])
            ])),
            Some(Hello::Tls {
                sni: Some("a.example.org".into()),
                ech: true
            })
        );
        let refused = |bytes: &[u8]| matches!(parse_client_hello(bytes), Some(Hello::Refused(_)));
        // Two server names, a name list with trailing bytes, a non-host-name type, a
        // name that is not a host name.
        assert!(refused(&hello_with(&[
            server_name("a.org"),
            server_name("b.org")
        ])));
        let (_, mut data) = server_name("a.org");
        data.push(0);
        assert!(refused(&hello_with(&[(0, data)])));
        let (_, mut data) = server_name("a.org");
        data[2] = 1;
        assert!(refused(&hello_with(&[(0, data)])));
        assert!(refused(&hello_with(&[server_name("a.org\0b.org")])));
        // One byte more in the hello: past the extension block (a trailing field), or
        // inside it (an extension that does not fit).
        let grown = |extension_block_too: bool| {
            let mut hello = client_hello(Some("a.org"));
            hello.push(0x13);
            let n = hello.len();
            hello[3..5].copy_from_slice(&be16(n - 5));
            hello[6..9].copy_from_slice(&be24(n - 9));
            if extension_block_too {
                // After the record and handshake headers, version, random, an empty
                // session id, one cipher suite and one compression method.
                let at = 5 + 4 + 41;
                let block = u16::from_be_bytes([hello[at], hello[at + 1]]) + 1;
                hello[at..at + 2].copy_from_slice(&block.to_be_bytes());
            }
            hello
        };
        let reason = |bytes: &[u8]| match parse_client_hello(bytes) {
            Some(Hello::Refused(reason)) => reason,
            other => panic!("{other:?}"),
        };
        assert!(reason(&grown(false)).contains("trailing"));
        assert!(reason(&grown(true)).contains("bad extensions"));
        // Not a ClientHello, or another record type inside it.
        let mut server_hello = client_hello(None);
        server_hello[5] = 2;
        assert!(refused(&server_hello));
        let mut alert = client_hello(None);
        alert[0] = 0x15;
        assert_eq!(parse_client_hello(&alert), Some(Hello::NotTls));
        let mut mixed = records(&[&hello[5..12]]);
        mixed.extend([0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x28]);
        assert!(refused(&mixed));
        // More than a ClientHello's worth of handshake.
        let mut huge = vec![1, 0x01, 0x00, 0x00];
        huge.extend([0u8; 100]);
        assert!(refused(&records(&[&huge])));
    }

    #[tokio::test]
    async fn refuses_what_the_list_does_not_name() {
        let (port, _) = origin().await;
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
        // https:// URLs must use CONNECT; origin-form requests are no proxy requests;
        // malformed requests are refused.
        let r = exchange(&p, "GET https://example.org/ HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        let r = exchange(&p, "GET /x HTTP/1.1\r\nHost: example.org\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        let r = exchange(&p, "GET\x01 nonsense\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        let report = p.finish().await;
        let decisions: Vec<&str> = report
            .attempts
            .iter()
            .map(|a| a.decision.as_str())
            .collect();
        assert_eq!(
            decisions,
            ["denied", "denied", "allowed", "denied", "denied", "denied"]
        );
        assert!(report.attempts[5].reason.contains("malformed request"));
    }

    #[tokio::test]
    async fn enforces_connection_and_byte_limits_and_closes_on_finish() {
        let (port, _) = origin().await;
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
        let head = read_answer(&mut tunnel).await;
        assert!(opened(head.as_bytes()), "{head}");
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
        let tunnelled = &report.attempts[0];
        assert!(
            tunnelled.bytes_up + tunnelled.bytes_down <= 8,
            "{tunnelled:?}"
        );
    }

    #[tokio::test]
    async fn finish_closes_open_tunnels() {
        let (port, _) = origin().await;
        let p = proxy(&[&format!("127.0.0.1:{port}")], &[], ProxyLimits::default()).await;
        let mut tunnel = TcpStream::connect(p.local_addr()).await.unwrap();
        tunnel
            .write_all(format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let head = read_answer(&mut tunnel).await;
        assert!(opened(head.as_bytes()), "{head}");
        let report = p.finish().await;
        assert_eq!(report.attempts.len(), 1);
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), tunnel.read(&mut buf))
            .await
            .expect("tunnel still open after the step ended")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
}
