//! `kiln serve`: start-up, the listeners and their accept loops, TLS, signals and drain.

pub mod listener;
pub mod server;
pub mod tls;
