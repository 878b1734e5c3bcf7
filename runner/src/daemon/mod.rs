//! `kiln serve`: start-up, the listeners and their accept loops, TLS, signals and drain,
//! the metrics endpoint, and readiness for systemd.

pub mod listener;
pub mod metrics;
pub mod server;
pub mod systemd;
pub mod tls;
