//! Accepting connections on the Unix sockets and TLS listeners without letting one
//! client take the daemon down: a cap on connections in all (every listener together)
//! and per client (peer uid on a socket, peer address on TCP), a deadline for a new
//! connection to finish its TLS handshake and start speaking, and backoff when accept
//! fails (out of file descriptors), each limit logged when hit, at most once a second
//! per kind.
//!
//! Connections that went quiet are closed by HTTP/2 keepalive (see `server.rs`): a peer
//! that stops answering pings is gone.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, UdsConnectInfo};

use crate::api::auth::TlsIdentities;
use crate::daemon::tls::{self, ReloadingConfig};

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once, all clients of every listener together.
    pub max_connections: usize,
    /// Connections open at once from one client: a peer uid on a socket, a peer address
    /// on TCP.
    pub max_per_client: usize,
    /// Time a new connection has to finish its TLS handshake (on TCP) and send the
    /// HTTP/2 preface.
    pub handshake_timeout: Duration,
}

/// The bytes every HTTP/2 connection starts with: a connection that has not sent them
/// by the deadline is not a client.
const PREFACE_LEN: usize = 24;
const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Who a connection counts against in `max_connections_per_client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClientKey {
    Uid(u32),
    Address(IpAddr),
}

/// The accept loops of every listener, sharing one count of open connections.
#[derive(Clone)]
pub struct Listeners {
    limits: ConnectionLimits,
    counts: Arc<Mutex<Counts>>,
    said: Arc<Mutex<RateLimitedLog>>,
}

type Incoming<S, I> = ReceiverStream<io::Result<Connection<S, I>>>;

impl Listeners {
    pub fn new(limits: ConnectionLimits) -> Self {
        Self {
            limits,
            counts: Arc::default(),
            said: Arc::default(),
        }
    }

    /// Accepts on a Unix socket for as long as the returned stream is polled, handing
    /// over connections within the limits and closing the others at once.
    pub fn unix(&self, listener: UnixListener) -> Incoming<UnixStream, UdsConnectInfo> {
        let (tx, rx) = mpsc::channel(16);
        let accept = move |cx: &mut Context<'_>| {
            listener.poll_accept(cx).map_ok(|(stream, _)| {
                let uid = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
                (stream, ClientKey::Uid(uid))
            })
        };
        let hand_over = |stream: UnixStream, slot, deadline, tx: &mpsc::Sender<_>| {
            let tx = tx.clone();
            async move {
                let info = stream.connect_info();
                tx.send(Ok(Connection::new(stream, info, slot, deadline)))
                    .await
                    .is_ok()
            }
        };
        tokio::spawn(self.clone().accept_loop(accept, hand_over, tx));
        ReceiverStream::new(rx)
    }

    /// Accepts on TCP for as long as the returned stream is polled; each connection
    /// within the limits is handed over once its TLS handshake succeeded, within the
    /// handshake deadline.
    pub fn tls(
        &self,
        listener: TcpListener,
        config: Arc<ReloadingConfig>,
    ) -> Incoming<TlsStream<TcpStream>, TlsIdentities> {
        let (tx, rx) = mpsc::channel(16);
        let accept = move |cx: &mut Context<'_>| {
            listener.poll_accept(cx).map_ok(|(stream, peer)| {
                // Small gRPC frames go out at once, not after Nagle's delay.
                let _ = stream.set_nodelay(true);
                (stream, ClientKey::Address(peer.ip()))
            })
        };
        let said = self.said.clone();
        let hand_over = move |stream, slot: Slot, deadline, tx: &mpsc::Sender<_>| {
            let open = !tx.is_closed();
            let tx = tx.clone();
            let acceptor = tokio_rustls::TlsAcceptor::from(config.current());
            let listener = config.name().to_string();
            let said = said.clone();
            // Handshakes run side by side: a slow client holds only its own slot.
            tokio::spawn(async move {
                let peer = slot.client;
                let failure = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await
                {
                    Ok(Ok(stream)) => {
                        let identities = tls::peer_identities(&stream);
                        let connection = Connection::new(stream, identities, slot, deadline);
                        let _ = tx.send(Ok(connection)).await;
                        return;
                    }
                    Ok(Err(err)) => err.to_string(),
                    Err(_) => "no TLS handshake before the handshake deadline".to_string(),
                };
                tls::count_handshake_failure();
                lock(&said).log("tls_handshake", || {
                    tracing::info!(listener, ?peer, reason = %failure, "TLS handshake failed; connection closed");
                });
            });
            std::future::ready(open)
        };
        tokio::spawn(self.clone().accept_loop(accept, hand_over, tx));
        ReceiverStream::new(rx)
    }

    /// Accepts with `accept`, admits each connection within the caps, and gives it with
    /// its place in the counts and its deadline to `hand_over` (false: no one is
    /// listening any more).
    async fn accept_loop<S, T, I, A, H, HF>(
        self,
        mut accept: A,
        mut hand_over: H,
        tx: mpsc::Sender<io::Result<Connection<T, I>>>,
    ) where
        A: FnMut(&mut Context<'_>) -> Poll<io::Result<(S, ClientKey)>>,
        H: FnMut(S, Slot, tokio::time::Instant, &mpsc::Sender<io::Result<Connection<T, I>>>) -> HF,
        HF: Future<Output = bool>,
    {
        let mut backoff = MIN_BACKOFF;
        loop {
            let accepted = tokio::select! {
                accepted = std::future::poll_fn(&mut accept) => accepted,
                _ = tx.closed() => return,
            };
            let (stream, client) = match accepted {
                Ok(accepted) => {
                    backoff = MIN_BACKOFF;
                    accepted
                }
                Err(err) => {
                    // EMFILE/ENFILE and the like: the pending connection stays in the backlog,
                    // so accepting again at once would spin. Wait, longer each time.
                    lock(&self.said).log("accept", || {
                        tracing::warn!(error = %err, backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX), "cannot accept connections; backing off");
                    });
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            let admitted = {
                let mut counts = lock(&self.counts);
                let mine = counts.by_client.get(&client).copied().unwrap_or(0);
                if counts.total >= self.limits.max_connections {
                    Err("max_connections")
                } else if mine >= self.limits.max_per_client {
                    Err("max_connections_per_client")
                } else {
                    counts.total += 1;
                    *counts.by_client.entry(client).or_default() += 1;
                    Ok(())
                }
            };
            if let Err(limit) = admitted {
                lock(&self.said).log(limit, || {
                    tracing::warn!(
                        ?client,
                        limit,
                        "connection refused: the daemon's connection limit is reached"
                    );
                });
                drop(stream);
                continue;
            }
            let slot = Slot {
                counts: self.counts.clone(),
                client,
            };
            // One deadline for the TLS handshake and the HTTP/2 preface together.
            let deadline = tokio::time::Instant::now() + self.limits.handshake_timeout;
            if !hand_over(stream, slot, deadline, &tx).await {
                return;
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Open connections per client; an entry goes when its count reaches zero.
#[derive(Default)]
struct Counts {
    total: usize,
    by_client: HashMap<ClientKey, usize>,
}

/// Logs each kind of event at most once a second.
#[derive(Default)]
struct RateLimitedLog {
    last: HashMap<&'static str, Instant>,
}

impl RateLimitedLog {
    fn log(&mut self, kind: &'static str, log: impl FnOnce()) {
        let now = Instant::now();
        if self
            .last
            .get(kind)
            .is_none_or(|at| now.duration_since(*at) >= Duration::from_secs(1))
        {
            self.last.insert(kind, now);
            log();
        }
    }
}

/// A connection's place in the counts, given back when the connection is dropped.
struct Slot {
    counts: Arc<Mutex<Counts>>,
    client: ClientKey,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.by_client.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.by_client.remove(&self.client);
            }
        }
    }
}

/// An accepted connection: the stream (a Unix stream, or TLS over TCP after its
/// handshake), who the transport proved the caller is, its place in the counts, and the
/// deadline for its preface.
pub struct Connection<S, I> {
    stream: S,
    info: I,
    slot: Option<Slot>,
    received: usize,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S, I> Connection<S, I> {
    fn new(stream: S, info: I, slot: Slot, deadline: tokio::time::Instant) -> Self {
        Self {
            stream,
            info,
            slot: Some(slot),
            received: 0,
            deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }
}

/// The caller's identity goes with the connection: the peer credentials of a Unix
/// stream, the certificate's identities of a TLS one.
impl<S, I: Clone + Send + Sync + 'static> Connected for Connection<S, I> {
    type ConnectInfo = I;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl<S: AsyncRead + Unpin, I: Unpin> AsyncRead for Connection<S, I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            this.received += buf.filled().len() - before;
            if this.received >= PREFACE_LEN {
                this.deadline = None;
            }
            return poll;
        }
        if let (Poll::Pending, Some(deadline)) = (&poll, this.deadline.as_mut()) {
            if deadline.as_mut().poll(cx).is_ready() {
                this.slot.take();
                tracing::info!("closed a connection that sent no HTTP/2 preface in time");
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface before the handshake deadline",
                )));
            }
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin, I: Unpin> AsyncWrite for Connection<S, I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::TlsListen;
    use tokio::io::AsyncWriteExt;

    /// A TLS listener's files: a self-signed server certificate, its key, and a CA.
    fn tls_listen(dir: &std::path::Path) -> TlsListen {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        TlsListen {
            name: "listen[0]".into(),
            address: "127.0.0.1:0".parse().unwrap(),
            cert: write("server.pem", cert.pem()),
            key: write("server.key", key.serialize_pem()),
            client_ca: write("ca.pem", cert.pem()),
        }
    }

    #[tokio::test]
    async fn failed_tls_handshakes_are_counted_and_free_their_place() {
        let dir = tempfile::tempdir().unwrap();
        let config = ReloadingConfig::load(&tls_listen(dir.path())).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = tcp.local_addr().unwrap();
        let listeners = Listeners::new(ConnectionLimits {
            max_connections: 1,
            max_per_client: 1,
            handshake_timeout: Duration::from_secs(30),
        });
        let incoming = listeners.tls(tcp, config);
        let before = tls::tls_handshake_failures();
        // Not TLS at all: the handshake fails at once.
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest).await;
        // Counted, and its place in the caps (one connection in all) given back; a
        // broken count or slot never gets there.
        let settled = async {
            while tls::tls_handshake_failures() == before || lock(&listeners.counts).total != 0 {
                tokio::task::yield_now().await;
            }
        };
        assert!(
            tokio::time::timeout(Duration::from_secs(30), settled)
                .await
                .is_ok(),
            "the failure was not counted or its place not given back"
        );
        drop(incoming);
    }
}
