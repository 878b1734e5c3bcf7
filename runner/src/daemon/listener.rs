//! Accepting connections on the Unix socket without letting one client take the daemon
//! down: a cap on connections in all and per client (peer uid), a deadline for a new
//! connection to start speaking, and backoff when accept fails (out of file
//! descriptors), each limit logged when hit, at most once a second per kind.
//!
//! Connections that went quiet are closed by HTTP/2 keepalive (see `server.rs`): a peer
//! that stops answering pings is gone.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tonic::transport::server::{Connected, UdsConnectInfo};

#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once, all clients together.
    pub max_connections: usize,
    /// Connections open at once from one peer uid.
    pub max_per_client: usize,
    /// Time a new connection has to send the HTTP/2 preface.
    pub handshake_timeout: Duration,
}

/// The bytes every HTTP/2 connection starts with: a connection that has not sent them
/// by the deadline is not a client.
const PREFACE_LEN: usize = 24;
const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts on `listener` for as long as the returned stream is polled, handing over
/// connections within the limits and closing the others at once.
pub fn incoming(
    listener: UnixListener,
    limits: ConnectionLimits,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Connection>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(accept_loop(listener, limits, tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Open connections per peer uid; an entry goes when its count reaches zero.
#[derive(Default)]
struct Counts {
    total: usize,
    by_uid: HashMap<u32, usize>,
}

async fn accept_loop(
    listener: UnixListener,
    limits: ConnectionLimits,
    tx: mpsc::Sender<io::Result<Connection>>,
) {
    let counts = Arc::new(Mutex::new(Counts::default()));
    let mut backoff = MIN_BACKOFF;
    let mut said = RateLimitedLog::default();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = tx.closed() => return,
        };
        let stream = match stream {
            Ok((stream, _)) => {
                backoff = MIN_BACKOFF;
                stream
            }
            Err(err) => {
                // EMFILE/ENFILE and the like: the pending connection stays in the backlog,
                // so accepting again at once would spin. Wait, longer each time.
                said.warn("accept", || {
                    tracing::warn!(error = %err, backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX), "cannot accept connections; backing off");
                });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let uid = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
        let admitted = {
            let mut counts = match counts.lock() {
                Ok(c) => c,
                Err(poisoned) => poisoned.into_inner(),
            };
            let mine = counts.by_uid.get(&uid).copied().unwrap_or(0);
            if counts.total >= limits.max_connections {
                Err("max_connections")
            } else if mine >= limits.max_per_client {
                Err("max_connections_per_client")
            } else {
                counts.total += 1;
                *counts.by_uid.entry(uid).or_default() += 1;
                Ok(())
            }
        };
        if let Err(limit) = admitted {
            said.warn(limit, || {
                tracing::warn!(
                    uid,
                    limit,
                    "connection refused: the daemon's connection limit is reached"
                );
            });
            drop(stream);
            continue;
        }
        let connection = Connection {
            stream,
            slot: Some(Slot {
                counts: counts.clone(),
                uid,
            }),
            received: 0,
            deadline: Some(Box::pin(tokio::time::sleep(limits.handshake_timeout))),
        };
        if tx.send(Ok(connection)).await.is_err() {
            return;
        }
    }
}

/// Logs each kind of event at most once a second.
#[derive(Default)]
struct RateLimitedLog {
    last: HashMap<&'static str, Instant>,
}

impl RateLimitedLog {
    fn warn(&mut self, kind: &'static str, log: impl FnOnce()) {
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
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = match self.counts.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.by_uid.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.by_uid.remove(&self.uid);
            }
        }
    }
}

/// An accepted connection: the Unix stream, its place in the counts, and the deadline
/// for its preface.
pub struct Connection {
    stream: UnixStream,
    slot: Option<Slot>,
    received: usize,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Connected for Connection {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Connection {
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

impl AsyncWrite for Connection {
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
