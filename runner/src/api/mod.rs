//! The gRPC API: who calls (authentication into a principal, in one layer in front of
//! every service), what they may see, and the services themselves.

pub mod attestations;
pub mod audit;
pub mod auth;
pub mod content_store;
pub mod jobs;
pub mod service;
