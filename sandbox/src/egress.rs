//! The step's only way out when its spec has an allow-list: a TCP listener on the loopback
//! of the step's own network namespace, created here by the supervisor and handed to the
//! daemon, which serves the egress proxy on it from the host's namespace. A socket belongs
//! to the namespace it was created in, so the step reaches the proxy at 127.0.0.1 while the
//! proxy's own connections leave from the host; the namespace has no other interface and
//! no route.
//!
//! The supervisor does this between writing the id maps and releasing pid 1, so nothing of
//! the step runs yet and the port cannot be taken first.

use std::fs::File;
use std::os::fd::OwnedFd;

use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType};
use nix::sys::socket::{setsockopt, sockopt, SockaddrIn};
use nix::unistd::Pid;

use crate::failure::{fail, Failure, OrLayer};
use crate::sys;

/// Pending connections the kernel queues before the daemon accepts them.
const BACKLOG: i32 = 128;

/// Brings up the loopback of `pid`'s network namespace and listens on 127.0.0.1:`port`
/// there. The calling (single-threaded) supervisor is back in its own namespace on return,
/// or the error says it could not get back.
pub(crate) fn open_listener(pid: Pid, port: u16) -> Result<OwnedFd, Failure> {
    let own = File::open("/proc/self/ns/net")
        .layer("network", "opening the supervisor's network namespace")?;
    let step = File::open(format!("/proc/{pid}/ns/net"))
        .layer("network", "opening the step's network namespace")?;
    setns(&step, CloneFlags::CLONE_NEWNET)
        .layer("network", "entering the step's network namespace")?;
    let made = listen_here(port);
    // Back before anything else happens: the supervisor's own sockets must be the host's.
    if let Err(e) = setns(&own, CloneFlags::CLONE_NEWNET) {
        return Err(fail(
            "network",
            format!("returning to the host's network namespace: {e}"),
        ));
    }
    made
}

fn listen_here(port: u16) -> Result<OwnedFd, Failure> {
    sys::loopback_up().layer("network", "bringing up the step's loopback")?;
    let sock = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .layer("network", "creating the egress proxy's socket")?;
    setsockopt(&sock, sockopt::ReuseAddr, &true).layer("network", "SO_REUSEADDR")?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&sock),
        &SockaddrIn::new(127, 0, 0, 1, port),
    )
    .layer(
        "network",
        &format!("binding 127.0.0.1:{port} for the egress proxy"),
    )?;
    listen(
        &sock,
        Backlog::new(BACKLOG).layer("network", "listen backlog")?,
    )
    .layer("network", "listening for the egress proxy")?;
    Ok(sock)
}
