//! Denial counting, in the supervisor: the step installs its seccomp filter with a
//! notification listener and hands the listener over a socketpair (SCM_RIGHTS) before it
//! execs; the supervisor polls it with the pidfd and the control socket, answers every denied
//! syscall with EPERM and counts it per syscall name. The step keeps no copy of the
//! listener, so nothing in the sandbox can answer a notification itself.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::poll::PollFlags;

use crate::{seccomp, sys};

enum State {
    /// Our end of the socketpair, until the step sends its listener.
    AwaitingListener(OwnedFd),
    Listening(OwnedFd),
    /// The listener hung up (no process uses the filter any more) or the step ended
    /// before installing it.
    Done,
}

pub(crate) struct Denials {
    state: State,
    counts: BTreeMap<String, u64>,
    /// Why the listener could not be served (the step then fails under "seccomp").
    pub(crate) failure: Option<String>,
}

impl Denials {
    pub(crate) fn new(socket: OwnedFd) -> Self {
        Self {
            state: State::AwaitingListener(socket),
            counts: BTreeMap::new(),
            failure: None,
        }
    }

    /// The fd to poll (for POLLIN), if any.
    pub(crate) fn fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.state {
            State::AwaitingListener(fd) | State::Listening(fd) => Some(fd.as_fd()),
            State::Done => None,
        }
    }

    /// Handles readiness of [`Denials::fd`]. `false` means the listener cannot be served
    /// (see `failure`): the caller kills the sandbox and fails the step under "seccomp".
    pub(crate) fn ready(&mut self, revents: PollFlags) -> bool {
        match self.serve(revents) {
            Ok(()) => true,
            Err(m) => {
                self.failure = Some(m);
                self.state = State::Done;
                false
            }
        }
    }

    fn serve(&mut self, revents: PollFlags) -> Result<(), String> {
        match &self.state {
            State::AwaitingListener(sock) => match sys::recv_fd(sock.as_fd()) {
                Ok(Some(listener)) => self.state = State::Listening(listener),
                // The step ended before its filter was installed; its own setup report
                // says why (and no untrusted code ran).
                Ok(None) => self.state = State::Done,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(format!("receiving the notification listener: {e}")),
            },
            State::Listening(listener) => {
                if revents.contains(PollFlags::POLLIN) {
                    match sys::notif_recv(listener.as_fd()) {
                        Ok(n) => {
                            let name = if n.data.arch == seccomp::AUDIT_ARCH {
                                seccomp::syscall_name(n.data.nr)
                            } else {
                                // Unreachable: the prefix kills foreign ABIs first.
                                format!("arch:{:#x}:nr:{}", n.data.arch, n.data.nr)
                            };
                            *self.counts.entry(name).or_default() += 1;
                            // ENOENT: the task was killed meanwhile; its syscall never ran.
                            match sys::notif_deny(listener.as_fd(), n.id, Errno::EPERM) {
                                Ok(()) | Err(Errno::ENOENT) => {}
                                Err(e) => return Err(format!("answering a denial: {e}")),
                            }
                        }
                        // The notifying task went away, or a signal: nothing to answer.
                        Err(Errno::ENOENT) | Err(Errno::EINTR) => {}
                        Err(e) => return Err(format!("receiving a notification: {e}")),
                    }
                } else if revents.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                    self.state = State::Done;
                }
            }
            State::Done => {}
        }
        Ok(())
    }

    pub(crate) fn into_counts(self) -> BTreeMap<String, u64> {
        self.counts
    }
}

/// The step's side: hands the listener to the supervisor.
pub(crate) fn send_listener(sock: &OwnedFd, listener: &OwnedFd) -> Result<(), Errno> {
    sys::send_byte_with_fd(sock.as_fd(), b'L', listener.as_fd())
}
