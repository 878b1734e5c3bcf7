//! Speaking to OCI registries (the distribution API), shared by `kiln image pull`, the
//! daemon's publishing of a job's artifact and the client's `kiln verify --image` and
//! `kiln pull-artifact`.
//!
//! A registry is untrusted: every manifest and blob read back is bounded while it is read
//! and checked against the digest that named it; a wrong or oversized answer is an error.
//! HTTPS by default; plain HTTP only for a loopback registry or one the operator lists as
//! insecure (Docker's convention), decided before any connection.

pub mod artifact;
mod auth;
pub mod fetch;
pub mod policy;
pub mod publish;
mod session;
mod target;
pub mod verify;

pub use auth::registry_auth;
pub use session::{Operation, Session};
pub use target::Target;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Result, RunnerError};

/// The largest manifest, index or other JSON document read from a registry.
pub use crate::images::oci::MAX_DOCUMENT_BYTES;

pub fn check_bytes(bytes: &[u8], hex: &str, size: u64) -> Result<()> {
    let actual = hex::encode(Sha256::digest(bytes));
    if actual != hex || bytes.len() as u64 != size {
        return Err(RunnerError::FailedPrecondition(format!(
            "the registry answered {} bytes hashing to sha256:{actual} for sha256:{hex} \
             ({size} bytes): its digest does not match",
            bytes.len()
        )));
    }
    Ok(())
}

pub fn parse_document<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| RunnerError::FailedPrecondition(format!("{what} is not valid: {e}")))
}

#[cfg(test)]
mod tests;
