//! Where a registry reference points, and whether it may be spoken to in plain HTTP.

use std::net::IpAddr;
use std::str::FromStr;

use oci_client::Reference;

use crate::error::{Result, RunnerError};

/// Where to push or pull, decided before any connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// As the reference names it (and records keep it).
    pub registry: String,
    /// The host spoken to: `registry` but Docker Hub's API host for `docker.io`.
    pub(super) endpoint: String,
    pub repository: String,
    /// `sha256:HEX` or a tag.
    pub reference: String,
    pub pinned: bool,
    pub plain_http: bool,
}

impl Target {
    /// `[http://|https://]REGISTRY/REPO@sha256:HEX` or `...REPO:TAG`. The registry must be
    /// named (no implicit Docker Hub). Plain HTTP only for loopback or listed registries.
    pub fn parse(text: &str, insecure_registries: &[String]) -> Result<Self> {
        let bad = |reason: String| RunnerError::invalid("reference", format!("{text:?}: {reason}"));
        let (scheme, rest) = match text.split_once("://") {
            Some((scheme @ ("http" | "https"), rest)) => (Some(scheme), rest),
            Some(_) => return Err(bad("the scheme may only be http:// or https://".into())),
            None => (None, text),
        };
        let (first, _) = rest.split_once('/').ok_or_else(|| {
            bad("expected REGISTRY/REPO@sha256:DIGEST or REGISTRY/REPO:TAG".into())
        })?;
        if !(first.contains('.') || first.contains(':') || first == "localhost") {
            return Err(bad(format!(
                "{first:?} is not a registry: name one (REGISTRY/REPO@sha256:DIGEST)"
            )));
        }
        let parsed = Reference::from_str(rest).map_err(|e| bad(e.to_string()))?;
        let (reference, pinned) = match (parsed.digest(), parsed.tag()) {
            (Some(digest), _) => {
                let hex = digest.strip_prefix("sha256:").unwrap_or_default();
                crate::store::cas::check_digest("reference", hex)
                    .map_err(|_| bad("a digest is sha256: and 64 lower-case hex digits".into()))?;
                (digest.to_string(), true)
            }
            (None, Some(tag)) => (tag.to_string(), false),
            (None, None) => return Err(bad("name a digest (@sha256:...) or a tag (:TAG)".into())),
        };
        let registry = parsed.registry().to_string();
        let listed = insecure_registries.iter().any(|r| {
            r.eq_ignore_ascii_case(&registry) || r.eq_ignore_ascii_case(host_of(&registry))
        });
        let may_be_plain = is_loopback(&registry) || listed;
        let plain_http = match scheme {
            Some("https") => false,
            Some(_) if !may_be_plain => {
                return Err(bad(format!(
                    "{registry} is neither on loopback nor an insecure registry: plain HTTP \
                     is refused (list it with --insecure-registry {registry} to allow it)"
                )))
            }
            _ => may_be_plain,
        };
        Ok(Target {
            endpoint: parsed.resolve_registry().to_string(),
            registry,
            repository: parsed.repository().to_string(),
            reference,
            pinned,
            plain_http,
        })
    }

    /// Where a push goes: `[http://|https://]REGISTRY/REPO[:TAG]` (no digest: a push makes
    /// one). Answers the target and the tag, if one was named.
    pub fn parse_push(
        text: &str,
        insecure_registries: &[String],
    ) -> Result<(Self, Option<String>)> {
        if text.contains('@') {
            return Err(RunnerError::invalid(
                "repository",
                format!("{text:?}: name a repository and optionally a tag, not a digest"),
            ));
        }
        // Parsed with a placeholder digest, the tag read separately: `REPO:TAG` and a
        // registry's `HOST:PORT` are told apart by the last path component alone.
        let (base, tag) = match text.rsplit_once('/') {
            Some((head, last)) => match last.split_once(':') {
                Some((name, tag)) => (format!("{head}/{name}"), Some(tag.to_string())),
                None => (text.to_string(), None),
            },
            None => (text.to_string(), None),
        };
        if let Some(tag) = &tag {
            let valid = !tag.is_empty()
                && tag.len() <= 128
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && tag
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid || tag.starts_with("sha256-") {
                return Err(RunnerError::invalid(
                    "repository",
                    format!("{text:?}: tag {tag:?} is not a valid tag (and sha256-* tags are the registry's referrers)"),
                ));
            }
        }
        let placeholder = format!("{base}@sha256:{}", super::artifact::EMPTY_DIGEST_HEX);
        let target = Target::parse(&placeholder, insecure_registries)?;
        Ok((target, tag))
    }

    pub fn manifest_url(&self, reference: &str) -> String {
        format!(
            "{}://{}/v2/{}/manifests/{reference}",
            if self.plain_http { "http" } else { "https" },
            self.endpoint,
            self.repository
        )
    }

    /// The referrers API's URL for a subject (OCI distribution 1.1).
    pub fn referrers_url(&self, subject_hex: &str) -> String {
        format!(
            "{}://{}/v2/{}/referrers/sha256:{subject_hex}",
            if self.plain_http { "http" } else { "https" },
            self.endpoint,
            self.repository
        )
    }

    /// `REGISTRY/REPO`, as references and patterns name a repository.
    pub fn repository_name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

/// `HOST` of `HOST:PORT`, `[V6]:PORT` or `HOST`.
fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(host, _)| host);
    }
    match registry.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => registry,
    }
}

fn is_loopback(registry: &str) -> bool {
    let host = host_of(registry);
    host.eq_ignore_ascii_case("localhost")
        || IpAddr::from_str(host).is_ok_and(|ip| ip.is_loopback())
}
