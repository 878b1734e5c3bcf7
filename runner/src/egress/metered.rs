//! The step's byte budget and the idle timeout, enforced on every connection the
//! proxy serves or opens.

use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::record::Live;
use super::state::Shared;

/// A side of a relay that fails once the step's byte budget is spent or nothing has
/// moved either way for the idle timeout. The upstream side counts its bytes for its
/// attempt and the budget (written: up; read: down).
pub(super) struct Metered<T> {
    inner: T,
    shared: Arc<Shared>,
    live: Option<Arc<Live>>,
    idle: Pin<Box<tokio::time::Sleep>>,
}

impl<T> Metered<T> {
    pub(super) fn new(inner: T, shared: Arc<Shared>, live: Option<Arc<Live>>) -> Self {
        let idle = Box::pin(tokio::time::sleep(shared.limits.idle_timeout));
        Metered {
            inner,
            shared,
            live,
            idle,
        }
    }

    /// The connection itself, for a relay that meters on its own (`splice`).
    pub(super) fn into_inner(self) -> T {
        self.inner
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

    /// What a write toward the origin came to: bytes written are counted up (past the
    /// budget, the write fails), nothing written for the idle timeout fails it.
    fn wrote_up(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>> {
        match written {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.moved();
                    if !self.count(n, |l| &l.up) {
                        return Poll::Ready(Err(spent()));
                    }
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending if self.idle_over(cx) => Poll::Ready(Err(idle())),
            other => other,
        }
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
        let written = Pin::new(&mut this.inner).poll_write(cx, &buf[..len]);
        this.wrote_up(cx, written)
    }

    /// Several buffers in one write: hyper then sends a body's chunks as they came
    /// instead of copying each one into a buffer of its own.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let used = this.shared.total_bytes.load(Ordering::Relaxed);
        let left = this.shared.limits.max_bytes.saturating_sub(used);
        // Upstream, a write the budget may cut goes one buffer at a time through
        // `poll_write`, which writes no more than the budget allows.
        if this.live.is_some() && total as u64 > left {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &**b);
            return Pin::new(this).poll_write(cx, first);
        }
        if this.shared.budget_spent() {
            return Poll::Ready(Err(spent()));
        }
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.wrote_up(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
