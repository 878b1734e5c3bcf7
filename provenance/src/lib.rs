//! Provenance for Kiln: tree hashing, securesystemslib canonical JSON, ed25519
//! and ECDSA P-256 keys, in-toto v0.9 links and layouts, DSSE envelopes,
//! Sigstore bundles, and a verifier that implements the subset of
//! `in-toto-verify` Kiln relies on.
//!
//! Pure library: no sandbox, no gRPC, no async runtime.
#![forbid(unsafe_code)]

pub mod action;
pub mod bundle;
pub mod cjson;
pub mod dsse;
mod error;
pub mod fnmatch;
pub mod hash;
mod keyfile;
pub mod keyring;
pub mod keys;
pub mod layout;
pub mod link;
pub mod slsa;
pub mod verify;
pub mod walk;

pub use error::ProvenanceError;
pub use keys::{KeyType, PublicKey, SigningKey};
pub use link::Link;
