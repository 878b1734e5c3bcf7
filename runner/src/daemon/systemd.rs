//! Readiness and stopping, told to systemd (`Type=notify`, see `runner/systemd/`). Without
//! `NOTIFY_SOCKET` in the environment (not started by systemd) these do nothing.

use sd_notify::NotifyState;

/// Tells systemd the daemon serves: call it once every listener is bound.
pub fn ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// Tells systemd the daemon is stopping (draining running jobs).
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(err) = sd_notify::notify(states) {
        tracing::warn!(error = %err, "could not notify systemd");
    }
}
