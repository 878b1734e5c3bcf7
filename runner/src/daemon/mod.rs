//! `kiln serve`: start-up, the socket and its accept loop, signals and drain, the
//! metrics endpoint, and readiness for systemd.

pub mod listener;
pub mod metrics;
pub mod server;
pub mod systemd;
