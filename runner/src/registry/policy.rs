//! Where callers may publish: `[publish] repositories` for callers in no tenant and
//! `[tenants.NAME] publish` for a tenant's. An entry names one repository
//! (`REGISTRY/REPO`) or every repository under a prefix (`REGISTRY/PREFIX/*`); nothing
//! else matches, and no entry means no publishing.

use serde::{Deserialize, Deserializer};

use super::Target;

#[derive(Debug, Clone, PartialEq, Eq)]
struct RepositoryPattern {
    /// As written, for messages.
    text: String,
    registry: String,
    path: String,
    /// `path/*`: any repository below `path`.
    below: bool,
}

/// A checked list of repository patterns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepositoryPatterns(Vec<RepositoryPattern>);

impl RepositoryPatterns {
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        entries
            .iter()
            .map(|entry| parse_pattern(entry.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map(RepositoryPatterns)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `target`'s repository is one the patterns name.
    pub fn allows(&self, target: &Target) -> bool {
        self.0.iter().any(|p| {
            p.registry.eq_ignore_ascii_case(&target.registry)
                && ((!p.below && target.repository == p.path)
                    || (p.below
                        && target
                            .repository
                            .strip_prefix(p.path.as_str())
                            .is_some_and(|rest| rest.starts_with('/'))))
        })
    }
}

fn parse_pattern(text: &str) -> Result<RepositoryPattern, String> {
    let bad = |why: &str| Err(format!("repository pattern {text:?}: {why}"));
    let (body, below) = match text.strip_suffix("/*") {
        Some(body) => (body, true),
        None => (text, false),
    };
    if body.contains('*') || body.contains('@') {
        return bad("only a trailing /* is a wildcard, and a pattern names no digest");
    }
    let Some((registry, path)) = body.split_once('/') else {
        return bad("expected REGISTRY/REPO or REGISTRY/PREFIX/*");
    };
    if !(registry.contains('.') || registry.contains(':') || registry == "localhost") {
        return bad("the first part must be a registry (HOST[:PORT])");
    }
    let valid_component = |c: &str| {
        !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
    };
    if !path.split('/').all(valid_component) {
        return bad("repository path components are lower-case letters, digits and . _ -");
    }
    Ok(RepositoryPattern {
        text: text.to_string(),
        registry: registry.to_ascii_lowercase(),
        path: path.to_string(),
        below,
    })
}

impl<'de> Deserialize<'de> for RepositoryPatterns {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let entries = Vec::<String>::deserialize(d)?;
        RepositoryPatterns::parse(&entries).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn target(text: &str) -> Target {
        Target::parse_push(text, &[]).unwrap().0
    }

    #[test]
    fn a_pattern_names_one_repository_or_those_below_a_prefix() {
        let p =
            RepositoryPatterns::parse(&["127.0.0.1:5000/team/*", "registry.example/app"]).unwrap();
        assert!(p.allows(&target("127.0.0.1:5000/team/app")));
        assert!(p.allows(&target("127.0.0.1:5000/team/a/b:v1")));
        assert!(p.allows(&target("REGISTRY.example/app:1")));
        for refused in [
            "127.0.0.1:5000/team",
            "127.0.0.1:5000/team2/app",
            "127.0.0.1:5001/team/app",
            "registry.example/app2",
            "registry.example/app/sub",
            "other.example/team/app",
        ] {
            assert!(!p.allows(&target(refused)), "{refused}");
        }
        assert!(!RepositoryPatterns::default().allows(&target("127.0.0.1:5000/team/app")));
    }

    #[test]
    fn a_repository_spelled_otherwise_does_not_slip_past_a_pattern() {
        let p = RepositoryPatterns::parse(&["127.0.0.1:5000/team/*", "[::1]:5000/team/*"]).unwrap();
        // Spellings that must not parse, or that parse to a repository no pattern names.
        for attempt in [
            "127.0.0.1:5000/Team/app",
            "127.0.0.1:5000/team%2fapp",
            "127.0.0.1:5000/team/%2e%2e/other",
            "127.0.0.1:5000/team/../other",
            "127.0.0.1:5000/team/./app",
            "127.0.0.1:5000/team/app/",
            "127.0.0.1:5000//team/app",
            "127.0.0.1:5000/team//app",
            "user@127.0.0.1:5000/team/app",
            "127.0.0.1:5000@evil.example/team/app",
            "127.0.0.1:5000/team/app:sha256-abc",
            "127.0.0.1:5000/team/app:sha256-abc.att",
            "127.0.0.1:5000/team/app ",
            "127.0.0.1:5000/team/app\n",
            "127.0.0.1/team/app",
            "127.0.0.1:443/team/app",
            "127.0.0.1:05000/team/app",
            "localhost:5000/team/app",
            "evil.example/127.0.0.1:5000/team/app",
            // IPv6 literals: the reference grammar has none, so none is published to.
            "[::1]:5000/team/app",
            "[::1]:5001/team/app",
            "HTTP://127.0.0.1:5000/team/app",
            "ftp://127.0.0.1:5000/team/app",
        ] {
            let allowed = Target::parse_push(attempt, &[]).is_ok_and(|(t, _)| p.allows(&t));
            assert!(!allowed, "{attempt}");
        }
        for allowed in [
            "127.0.0.1:5000/team/app",
            "http://127.0.0.1:5000/team/app:v1",
        ] {
            assert!(p.allows(&target(allowed)), "{allowed}");
        }
    }

    #[test]
    fn malformed_patterns_are_refused_at_load() {
        for bad in [
            "team/*",
            "127.0.0.1:5000/*",
            "127.0.0.1:5000/te*m",
            "127.0.0.1:5000/Team",
            "127.0.0.1:5000/a//b",
            "127.0.0.1:5000/../x",
            "127.0.0.1:5000/app@sha256:00",
            "127.0.0.1:5000",
        ] {
            assert!(RepositoryPatterns::parse(&[bad]).is_err(), "{bad}");
        }
    }
}
