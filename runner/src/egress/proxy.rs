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
//!
//! This file holds the proxy itself: the listener and each client connection up to
//! its requests. `state.rs` holds what the connections share (the limits, the
//! allow-list decision, the record), `http.rs` forwards plain HTTP, `tunnel.rs` runs
//! tunnels (their ClientHello is read in `tls.rs`), and `metered.rs` enforces the
//! byte budget and the idle timeout on every connection.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::http::{forward, ProxyBody};
use super::metered::Metered;
use super::netpolicy::AllowList;
use super::record::denied;
pub use super::record::{Attempt, Report};
use super::special::HostAddresses;
use super::state::Shared;
pub use super::state::{system_resolver, ProxyLimits, Resolver};
use super::tunnel::{open_tunnel, Tunnel};

/// Request line and headers together.
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;

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
        let shared = Arc::new(Shared::new(allow, limits, resolver, own));
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
        self.shared.report()
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

async fn handle(client: TcpStream, shared: Arc<Shared>) {
    let Some(permit) = shared.admit() else {
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

impl ClientConnection {
    async fn serve(&self, request: Request<Incoming>) -> Response<ProxyBody> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if request.method() == Method::CONNECT {
            open_tunnel(&self.shared, &self.tunnel, request).await
        } else {
            forward(&self.shared, &self.upstreams, request).await
        }
    }
}

#[cfg(test)]
mod tests;
