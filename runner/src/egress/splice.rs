//! Zero-copy relaying between two sockets: splice(2) moves a direction's bytes from
//! one socket into a pipe and from the pipe into the other socket, so they never pass
//! through the proxy's memory. The step's byte budget, the idle timeout and the
//! attempt's counters hold exactly as `metered` holds them on the buffered path: the
//! bytes read from the origin count down, the bytes written to it count up, a byte past
//! the budget is never passed on, and nothing moving either way for the idle timeout
//! ends the relay.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::sys::socket::{shutdown, Shutdown};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::record::Live;
use super::state::Shared;

/// Bytes a pipe holds: one splice in and one out move this much at most. The kernel
/// keeps its default (64 KiB) if it refuses more. No larger than the buffered relay's
/// buffers were: a step's stalled tunnels pin this much kernel memory each way.
const PIPE_BYTES: i32 = 256 << 10;

/// A pipe between the two splices of one direction; `held` bytes are in it.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    held: usize,
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let capacity = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES))
            .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))?;
        Ok(Pipe {
            read,
            write,
            held: 0,
            capacity: usize::try_from(capacity).unwrap_or(64 * 1024),
        })
    }
}

/// Which way the bytes go: from the client to the origin (`Up`) or back (`Down`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Up,
    Down,
}

/// The budget, the counters and the idle clock one relay's two directions share.
struct Meter<'a> {
    shared: &'a Shared,
    live: &'a Live,
    last_moved: Mutex<Instant>,
}

fn spent() -> io::Error {
    io::Error::other("the step's network byte budget is spent")
}

impl Meter<'_> {
    fn moved(&self) {
        if let Ok(mut last) = self.last_moved.lock() {
            *last = Instant::now();
        }
    }

    fn idle_deadline(&self) -> Instant {
        let last = self
            .last_moved
            .lock()
            .map(|l| *l)
            .unwrap_or_else(|_| Instant::now());
        last + self.shared.limits.idle_timeout
    }

    fn left(&self) -> u64 {
        let used = self.shared.total_bytes.load(Ordering::Relaxed);
        self.shared.limits.max_bytes.saturating_sub(used)
    }

    /// Takes up to `want` bytes out of what the budget has left (0: it is spent).
    fn reserve(&self, want: usize) -> usize {
        let max = self.shared.limits.max_bytes;
        let want = u64::try_from(want).unwrap_or(u64::MAX);
        let mut taken = 0;
        let _ =
            self.shared
                .total_bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                    taken = max.saturating_sub(used).min(want);
                    (taken > 0).then_some(used + taken)
                });
        usize::try_from(taken).unwrap_or(0)
    }

    /// Gives back reserved bytes that were not passed on.
    fn refund(&self, n: usize) {
        if n > 0 {
            self.shared
                .total_bytes
                .fetch_sub(n as u64, Ordering::Relaxed);
        }
    }

    /// Adds `n` bytes to the budget and to the attempt's counter; an error if that
    /// spends the budget (the bytes are then not passed on).
    fn count(&self, n: usize, counter: &AtomicU64) -> io::Result<()> {
        let n = n as u64;
        let total = self.shared.total_bytes.fetch_add(n, Ordering::Relaxed) + n;
        if total > self.shared.limits.max_bytes {
            return Err(spent());
        }
        counter.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

/// Relays between the client and the origin until both have closed their side (each
/// close passes on as a half-close), either side fails, the budget is spent, or
/// nothing moves for the idle timeout. Dropping the future (the step ended) stops it.
/// An error only if the pipes could not be made, before any byte moved: the caller
/// then relays the buffered way.
pub(super) async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    shared: &Arc<Shared>,
    live: &Arc<Live>,
) -> io::Result<()> {
    let (mut up, mut down) = (Pipe::new()?, Pipe::new()?);
    let meter = Meter {
        shared,
        live,
        last_moved: Mutex::new(Instant::now()),
    };
    let both = async {
        tokio::try_join!(
            one_way(client, upstream, &mut up, &meter, Way::Up),
            one_way(upstream, client, &mut down, &meter, Way::Down),
        )
    };
    tokio::pin!(both);
    loop {
        tokio::select! {
            ended = &mut both => {
                if let Err(err) = ended {
                    tracing::debug!(error = %err, "tunnel relay ended");
                }
                return Ok(());
            }
            () = tokio::time::sleep_until(meter.idle_deadline()) => {
                if Instant::now() >= meter.idle_deadline() {
                    tracing::debug!("tunnel idle for too long");
                    return Ok(());
                }
            }
        }
    }
}

/// Moves one direction's bytes until its source closes (then shuts the destination's
/// write side) or fails.
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &mut Pipe,
    meter: &Meter<'_>,
    way: Way,
) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        if meter.shared.budget_spent() {
            return Err(spent());
        }
        // From the origin, never more than one byte past the budget: that byte
        // spends it and is not passed on.
        let want = match way {
            Way::Down => pipe
                .capacity
                .min(usize::try_from(meter.left().saturating_add(1)).unwrap_or(usize::MAX)),
            Way::Up => pipe.capacity,
        };
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                Ok(splice(from, None, &pipe.write, None, want, flags)?)
            }) {
                Ok(n) => break n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Err(err),
            }
        };
        if n == 0 {
            // The source closed its side: the destination learns it, the other
            // direction goes on.
            let _ = shutdown(to.as_raw_fd(), Shutdown::Write);
            return Ok(());
        }
        meter.moved();
        if way == Way::Down {
            meter.count(n, &meter.live.down)?;
        }
        pipe.held = n;
        while pipe.held > 0 {
            to.writable().await?;
            // To the origin, never more than the budget allows: the bytes are taken out of
            // it before they are passed on, so no other connection can spend them
            // meanwhile, and what was not written is given back.
            let give = match way {
                Way::Up => match meter.reserve(pipe.held) {
                    0 => return Err(spent()),
                    taken => taken,
                },
                Way::Down => pipe.held,
            };
            let spliced = to.try_io(Interest::WRITABLE, || {
                Ok(splice(&pipe.read, None, to, None, give, flags)?)
            });
            let written = match &spliced {
                Ok(written) => *written,
                Err(_) => 0,
            };
            if way == Way::Up {
                meter.refund(give - written);
                meter.live.up.fetch_add(written as u64, Ordering::Relaxed);
            }
            match spliced {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Err(err),
            }
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            pipe.held -= written;
            meter.moved();
        }
    }
}
