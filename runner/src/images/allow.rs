//! Image allow-lists: the operator's `[images] allowed` and a tenant's `images`. An entry
//! is a name (`debian`), a name held to a digest (`debian@sha256:HEX`) or a digest alone
//! (`sha256:HEX`, matching an image's digest or its tree digest).

use std::collections::BTreeSet;

use serde::{Deserialize, Deserializer};

use super::reference::ImageRef;

/// Who an image is, as far as an allow-list asks: its name (none for a digest nobody
/// installed) and its digests (manifest digest and tree digest of an imported image, the
/// tree digest of a built one, none for `host` or an image not installed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageIdentity {
    pub name: Option<String>,
    pub digests: Vec<String>,
}

/// The images an allow-list admits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageAllowList {
    names: BTreeSet<String>,
    /// (name, digest hex) from `NAME@sha256:HEX` entries.
    pinned: BTreeSet<(String, String)>,
    /// Digests (hex), from `sha256:HEX` entries.
    digests: BTreeSet<String>,
}

impl<'de> Deserialize<'de> for ImageAllowList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut list = ImageAllowList::default();
        for entry in Vec::<String>::deserialize(d)? {
            match ImageRef::parse(&entry).map_err(|e| serde::de::Error::custom(e.to_string()))? {
                ImageRef::Name(name) => {
                    list.names.insert(name);
                }
                ImageRef::Pinned { name, digest } => {
                    list.pinned.insert((name, digest));
                }
                ImageRef::Digest(digest) => {
                    list.digests.insert(digest);
                }
            }
        }
        Ok(list)
    }
}

impl ImageAllowList {
    /// Whether the list admits the image.
    pub fn allows(&self, image: &ImageIdentity) -> bool {
        let named = |name: &str| self.names.contains(name);
        if image.name.as_deref().is_some_and(named) {
            return true;
        }
        image.digests.iter().any(|digest| {
            self.digests.contains(digest)
                || image
                    .name
                    .as_ref()
                    .is_some_and(|name| self.pinned.contains(&(name.clone(), digest.clone())))
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn list(entries: &[&str]) -> ImageAllowList {
        let toml = format!("allowed = {entries:?}\n");
        #[derive(Deserialize)]
        struct T {
            allowed: ImageAllowList,
        }
        toml::from_str::<T>(&toml).unwrap().allowed
    }

    fn image(name: Option<&str>, digests: &[&str]) -> ImageIdentity {
        ImageIdentity {
            name: name.map(String::from),
            digests: digests.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn names_pinned_names_and_digests_admit_what_they_name() {
        let (a, b, c) = ("aa".repeat(32), "bb".repeat(32), "cc".repeat(32));
        let allowed = list(&[
            "busybox",
            &format!("debian@sha256:{a}"),
            &format!("sha256:{b}"),
        ]);
        assert!(allowed.allows(&image(Some("busybox"), &[])));
        assert!(allowed.allows(&image(Some("busybox"), &[&c])));
        assert!(allowed.allows(&image(Some("debian"), &[&a, &c])));
        assert!(!allowed.allows(&image(Some("debian"), &[&c])));
        assert!(!allowed.allows(&image(Some("other"), &[&a])));
        assert!(allowed.allows(&image(Some("other"), &[&c, &b])));
        assert!(allowed.allows(&image(None, &[&b])));
        assert!(!allowed.allows(&image(None, &[&a])));
        assert!(!allowed.allows(&image(Some("host"), &[])));
    }

    #[test]
    fn malformed_entries_are_refused() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct T {
            allowed: ImageAllowList,
        }
        for bad in [
            "\"../x\"",
            "\"sha256:xyz\"",
            "\"debian:12\"",
            "\"a@sha256:1\"",
        ] {
            let err = toml::from_str::<T>(&format!("allowed = [{bad}]\n")).unwrap_err();
            assert!(err.to_string().contains("image"), "{bad}: {err}");
        }
    }
}
