//! How a job names its image: `NAME`, `NAME@sha256:HEX` (the name, held to that digest)
//! or `sha256:HEX` (the digest alone). The digest of an imported image is its manifest
//! digest; of a built image, its tree digest.

use std::fmt;

use crate::error::{Result, RunnerError};
use crate::spec::check_image_name;
use crate::store::cas::check_digest;

/// The longest reference: a 64-character name, `@sha256:` and 64 hex digits.
pub const MAX_REFERENCE_BYTES: usize = 64 + 8 + 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    Name(String),
    Pinned { name: String, digest: String },
    Digest(String),
}

impl ImageRef {
    /// Parses a reference; anything but the three forms is INVALID_ARGUMENT on `image`.
    pub fn parse(text: &str) -> Result<Self> {
        if text.is_empty() || text.len() > MAX_REFERENCE_BYTES {
            return Err(RunnerError::invalid(
                "image",
                format!("must be 1 to {MAX_REFERENCE_BYTES} characters"),
            ));
        }
        let digest_of = |hex: &str| {
            check_digest("image", hex).map_err(|_| {
                RunnerError::invalid(
                    "image",
                    format!("{text:?}: a digest is sha256: and 64 lower-case hex digits"),
                )
            })
        };
        if let Some(hex) = text.strip_prefix("sha256:") {
            digest_of(hex)?;
            return Ok(ImageRef::Digest(hex.to_string()));
        }
        match text.split_once('@') {
            Some((name, pin)) => {
                check_image_name(name)?;
                let hex = pin.strip_prefix("sha256:").ok_or_else(|| {
                    RunnerError::invalid(
                        "image",
                        format!("{text:?}: a pinned image is NAME@sha256:HEX"),
                    )
                })?;
                digest_of(hex)?;
                Ok(ImageRef::Pinned {
                    name: name.to_string(),
                    digest: hex.to_string(),
                })
            }
            None => {
                check_image_name(text)?;
                Ok(ImageRef::Name(text.to_string()))
            }
        }
    }

    pub fn name(&self) -> Option<&str> {
        match self {
            ImageRef::Name(name) | ImageRef::Pinned { name, .. } => Some(name),
            ImageRef::Digest(_) => None,
        }
    }

    /// The digest the reference pins, if any.
    pub fn digest(&self) -> Option<&str> {
        match self {
            ImageRef::Name(_) => None,
            ImageRef::Pinned { digest, .. } | ImageRef::Digest(digest) => Some(digest),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Name(name) => f.write_str(name),
            ImageRef::Pinned { name, digest } => write!(f, "{name}@sha256:{digest}"),
            ImageRef::Digest(digest) => write!(f, "sha256:{digest}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_three_forms_parse_and_nothing_else() {
        let hex = "ab".repeat(32);
        assert_eq!(
            ImageRef::parse("busybox").unwrap(),
            ImageRef::Name("busybox".into())
        );
        assert_eq!(
            ImageRef::parse(&format!("tool-chain.1@sha256:{hex}")).unwrap(),
            ImageRef::Pinned {
                name: "tool-chain.1".into(),
                digest: hex.clone()
            }
        );
        assert_eq!(
            ImageRef::parse(&format!("sha256:{hex}")).unwrap(),
            ImageRef::Digest(hex.clone())
        );
        for bad in [
            String::new(),
            "../etc".into(),
            "Busybox".into(),
            ".hidden".into(),
            "busybox:latest".into(),
            "docker.io/library/busybox".into(),
            format!("busybox@sha512:{hex}"),
            format!("busybox@{hex}"),
            format!("sha256:{}", "AB".repeat(32)),
            format!("sha256:{}", "ab".repeat(31)),
            format!("@sha256:{hex}"),
            format!("a@b@sha256:{hex}"),
            format!("busybox@sha256:{hex}/x"),
            "x".repeat(65),
        ] {
            let err = ImageRef::parse(&bad).unwrap_err().to_string();
            assert!(err.contains("image"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_reference_prints_as_it_parsed() {
        let text = format!("busybox@sha256:{}", "0f".repeat(32));
        assert_eq!(ImageRef::parse(&text).unwrap().to_string(), text);
    }
}
