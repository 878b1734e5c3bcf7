//! Kiln's daemon and client, as a library: the `kiln` binary (`src/main.rs`) is its
//! command line, and the end-to-end tests drive the daemon with its client. The design
//! is described in docs/ARCHITECTURE.md.
#![forbid(unsafe_code)]

pub mod attest;
pub mod auth;
pub mod cas;
pub mod client;
pub mod config;
pub mod db;
pub mod demo;
pub mod error;
pub mod idranges;
pub mod images;
pub mod jobfile;
pub mod jobs;
pub mod limits;
pub mod listener;
pub mod netpolicy;
pub mod outcome;
pub mod profile;
pub mod proxy;
pub mod server;
pub mod service;
pub mod signer;
pub mod spec;
pub mod verify;
pub mod watch;
