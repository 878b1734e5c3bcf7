//! The step's only way out when its spec has an allow-list: a TCP listener on the loopback
//! of the step's own network namespace, created here by the supervisor (which is in that
//! namespace, see `supervisor::make_network_namespace`) and handed to the daemon, which serves the egress proxy on it from the host's namespace. A socket belongs
//! to the namespace it was created in, so the step reaches the proxy at 127.0.0.1 while the
//! proxy's own connections leave from the host; the namespace has no other interface and
//! no route.
//!
//! The supervisor does this between writing the id maps and releasing pid 1, so nothing of
//! the step runs yet and the port cannot be taken first.

use std::os::fd::OwnedFd;

use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType};
use nix::sys::socket::{setsockopt, sockopt, SockaddrIn};

use crate::failure::{Failure, OrLayer};
use crate::sys;

/// Pending connections the kernel queues before the daemon accepts them.
const BACKLOG: i32 = 128;

/// Brings up the loopback of the step's network namespace, which the supervisor is in
/// (see `make_network_namespace`), and listens on 127.0.0.1:`port` there.
pub(crate) fn open_listener(port: u16) -> Result<OwnedFd, Failure> {
    listen_here(port)
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
