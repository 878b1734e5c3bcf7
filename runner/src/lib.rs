//! Kiln's daemon and client, as a library: the `kiln` binary (`src/main.rs`) is its
//! command line, and the end-to-end tests drive the daemon with its client. The design
//! is described in docs/ARCHITECTURE.md.
#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod egress;
pub mod engine;
pub mod error;
pub mod images;
pub mod limits;
pub mod plan;
pub mod registry;
pub mod spec;
pub mod store;
pub mod tenants;
pub mod units;
pub mod worker;
