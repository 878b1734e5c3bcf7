//! `kiln serve`: start-up, the socket and its accept loop, signals and drain.

pub mod listener;
pub mod server;
