//! Which image an action runs in. An action may ask for one with the `container-image`
//! platform property; it must be pinned by digest and be one of the images the operator
//! lists in `[worker] images` (each installed, pinned by digest). An action that asks
//! for nothing runs in `[worker] image`. A reference that is not pinned, not offered, or
//! malformed fails the action: it never falls back to the default image.
//!
//! The forms of a reference (an action's property and a `[worker] images` entry alike):
//! - `docker://REPO[:TAG]@sha256:HEX`, as Bazel users write it: only the digest picks the
//!   image (REPO and TAG say where it came from, and are not checked);
//! - `NAME@sha256:HEX`: Kiln's own, the installed image NAME held to that digest;
//! - `sha256:HEX`: the digest alone.
//!
//! The digest is the image's manifest digest (imported or pulled images) or its tree
//! digest (built images), as `kiln image list` shows it.

use std::fmt;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;

use crate::error::{Result, RunnerError};
use crate::images::reference::ImageRef;
use crate::images::{Images, ResolvedImage};
use crate::store::cas::check_digest;

/// The platform property (and worker property) that names an action's image.
pub const CONTAINER_IMAGE: &str = "container-image";

const DOCKER_SCHEME: &str = "docker://";

/// The longest reference: a repository of 255 bytes (Docker's bound on a name), a tag of
/// 128, and the digest.
const MAX_REFERENCE_BYTES: usize = DOCKER_SCHEME.len() + 255 + 1 + 128 + 8 + 64;

/// An image reference pinned by digest (hex, lower case, without `sha256:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerImage {
    /// `docker://REPO[:TAG]@sha256:HEX`.
    Docker { repository: String, digest: String },
    /// `NAME@sha256:HEX`.
    Pinned { name: String, digest: String },
    /// `sha256:HEX`.
    Digest(String),
}

fn invalid(reason: String) -> RunnerError {
    RunnerError::invalid(CONTAINER_IMAGE, reason)
}

impl ContainerImage {
    /// Parses a reference; anything not pinned by a SHA-256 digest is INVALID_ARGUMENT.
    pub fn parse(text: &str) -> Result<Self> {
        if text.is_empty() || text.len() > MAX_REFERENCE_BYTES {
            return Err(invalid(format!(
                "must be 1 to {MAX_REFERENCE_BYTES} characters"
            )));
        }
        let shown = crate::cli::printable(text);
        let Some(rest) = text.strip_prefix(DOCKER_SCHEME) else {
            return match ImageRef::parse(text).map_err(|_| {
                invalid(format!(
                    "{shown:?} is none of docker://REPO@sha256:HEX, NAME@sha256:HEX, sha256:HEX"
                ))
            })? {
                ImageRef::Name(_) => Err(invalid(format!(
                    "{shown:?} is not pinned by digest: write NAME@sha256:HEX"
                ))),
                ImageRef::Pinned { name, digest } => Ok(ContainerImage::Pinned { name, digest }),
                ImageRef::Digest(digest) => Ok(ContainerImage::Digest(digest)),
            };
        };
        let Some((repository, pin)) = rest.rsplit_once('@') else {
            return Err(invalid(format!(
                "{shown:?} is not pinned by digest (a tag names whatever it points to now): \
                 write docker://REPO@sha256:HEX"
            )));
        };
        let repository_ok = !repository.is_empty()
            && repository.len() <= 255 + 1 + 128
            && repository
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/:".contains(&b))
            && !repository.starts_with(['/', ':', '.', '-'])
            && !repository.ends_with(['/', ':']);
        if !repository_ok {
            return Err(invalid(format!(
                "{shown:?}: the repository is not a registry path"
            )));
        }
        let digest = pin
            .strip_prefix("sha256:")
            .filter(|hex| check_digest(CONTAINER_IMAGE, hex).is_ok())
            .ok_or_else(|| {
                invalid(format!(
                    "{shown:?}: a digest is sha256: and 64 lower-case hex digits"
                ))
            })?;
        Ok(ContainerImage::Docker {
            repository: repository.to_string(),
            digest: digest.to_string(),
        })
    }

    /// The digest (hex) the reference pins.
    pub fn digest(&self) -> &str {
        match self {
            ContainerImage::Docker { digest, .. }
            | ContainerImage::Pinned { digest, .. }
            | ContainerImage::Digest(digest) => digest,
        }
    }

    /// Whether `image` is the image this reference names: the same digest, and for
    /// `NAME@sha256:HEX` the name that names it now.
    fn names(&self, image: &ResolvedImage) -> bool {
        let same_digest = image.digest.as_deref() == Some(self.digest());
        match self {
            ContainerImage::Pinned { name, .. } => {
                same_digest && image.named && image.name == *name
            }
            ContainerImage::Docker { .. } | ContainerImage::Digest(_) => same_digest,
        }
    }
}

impl fmt::Display for ContainerImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContainerImage::Docker { repository, digest } => {
                write!(f, "{DOCKER_SCHEME}{repository}@sha256:{digest}")
            }
            ContainerImage::Pinned { name, digest } => write!(f, "{name}@sha256:{digest}"),
            ContainerImage::Digest(digest) => write!(f, "sha256:{digest}"),
        }
    }
}

/// One image of `[worker] images`: the entry as configured (what the worker advertises)
/// and the installed image it names, its tree verified.
#[derive(Debug, Clone)]
pub struct OfferedImage {
    pub entry: String,
    pub image: ResolvedImage,
}

/// Resolves every `[worker] images` entry to an installed image (its tree hashed and
/// checked against its record): an entry not pinned by digest, not installed, or listed
/// twice is refused, naming it.
pub fn resolve_offered(images: &Images, entries: &[String]) -> Result<Vec<OfferedImage>> {
    let mut offered: Vec<OfferedImage> = Vec::with_capacity(entries.len());
    for entry in entries {
        let refuse = |reason: String| {
            RunnerError::FailedPrecondition(format!("[worker] images entry {entry:?}: {reason}"))
        };
        let reference = ContainerImage::parse(entry).map_err(|e| refuse(e.to_string()))?;
        let local = match &reference {
            ContainerImage::Pinned { .. } => reference.to_string(),
            ContainerImage::Docker { digest, .. } | ContainerImage::Digest(digest) => {
                format!("sha256:{digest}")
            }
        };
        let image = images.resolve(&local).map_err(|e| refuse(e.to_string()))?;
        if !reference.names(&image) {
            return Err(refuse(format!(
                "the installed image is {}, not the image the entry pins",
                image.digest.as_deref().unwrap_or("unpinned")
            )));
        }
        if offered.iter().any(|o| o.image.digest == image.digest) {
            return Err(refuse("the image is listed twice".into()));
        }
        offered.push(OfferedImage {
            entry: entry.clone(),
            image,
        });
    }
    Ok(offered)
}

/// The `container-image` an action asks for, if any. The Action's platform (REAPI 2.2)
/// and the Command's (older clients) are both read: each may name at most one image, and
/// when both name one it must be the same.
pub fn requested_image(
    action: &reapi::Action,
    command: &reapi::Command,
) -> Result<Option<ContainerImage>> {
    fn one_of<'a>(platform: Option<&'a reapi::Platform>, which: &str) -> Result<Option<&'a str>> {
        let mut values = platform
            .into_iter()
            .flat_map(|p| p.properties.iter())
            .filter(|p| p.name == CONTAINER_IMAGE)
            .map(|p| p.value.as_str());
        let first = values.next();
        if values.next().is_some() {
            return Err(invalid(format!(
                "the {which}'s platform names more than one image"
            )));
        }
        Ok(first)
    }
    let in_action = one_of(action.platform.as_ref(), "action")?;
    #[allow(deprecated)]
    let in_command = one_of(command.platform.as_ref(), "command")?;
    let value = match (in_action, in_command) {
        (Some(a), Some(c)) if a != c => {
            return Err(invalid(
                "the action's and the command's platforms name different images".into(),
            ))
        }
        (Some(value), _) | (None, Some(value)) => value,
        (None, None) => return Ok(None),
    };
    ContainerImage::parse(value).map(Some)
}

/// The image an action runs in: the offered image its `container-image` names, or
/// `default` when it names none. A pinned image this worker does not offer is
/// FAILED_PRECONDITION (the engine sent the action to a worker without it).
pub fn select_image<'a>(
    requested: Option<&ContainerImage>,
    offered: &'a [OfferedImage],
    default: &'a ResolvedImage,
) -> Result<&'a ResolvedImage> {
    let Some(requested) = requested else {
        return Ok(default);
    };
    offered
        .iter()
        .map(|o| &o.image)
        .find(|image| requested.names(image))
        .ok_or_else(|| {
            let offers = if offered.is_empty() {
                "none".to_string()
            } else {
                offered
                    .iter()
                    .map(|o| o.entry.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            RunnerError::FailedPrecondition(format!(
                "this worker does not offer the image {requested} (its {CONTAINER_IMAGE} \
                 images: {offers})"
            ))
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn image(name: &str, digest: &str, named: bool) -> ResolvedImage {
        ResolvedImage {
            name: name.into(),
            named,
            digest: Some(digest.into()),
            tree_digest: Some("ff".repeat(32)),
            imported: None,
            env: Vec::new(),
            root: Vec::new(),
            ca_certificates: None,
        }
    }

    fn platform(values: &[&str]) -> Option<reapi::Platform> {
        Some(reapi::Platform {
            properties: values
                .iter()
                .map(|v| reapi::platform::Property {
                    name: CONTAINER_IMAGE.into(),
                    value: v.to_string(),
                })
                .chain(std::iter::once(reapi::platform::Property {
                    name: "OSFamily".into(),
                    value: "linux".into(),
                }))
                .collect(),
        })
    }

    fn action(values: &[&str]) -> reapi::Action {
        reapi::Action {
            platform: platform(values),
            ..Default::default()
        }
    }

    #[allow(deprecated)]
    fn command(values: &[&str]) -> reapi::Command {
        reapi::Command {
            platform: platform(values),
            ..Default::default()
        }
    }

    fn invalid_reason(result: Result<impl fmt::Debug>) -> String {
        match result {
            Err(RunnerError::InvalidArgument { field, reason }) if field == CONTAINER_IMAGE => {
                reason
            }
            other => panic!("expected INVALID_ARGUMENT on {CONTAINER_IMAGE}, got {other:?}"),
        }
    }

    #[test]
    fn the_three_pinned_forms_parse() {
        let hex = "ab".repeat(32);
        assert_eq!(
            ContainerImage::parse(&format!("docker://gcr.io/team/gcc:12@sha256:{hex}")).unwrap(),
            ContainerImage::Docker {
                repository: "gcr.io/team/gcc:12".into(),
                digest: hex.clone()
            }
        );
        assert_eq!(
            ContainerImage::parse(&format!("localhost:5000/gcc@sha256:{hex}")).ok(),
            None,
            "a registry path without docker:// is not a Kiln name"
        );
        assert_eq!(
            ContainerImage::parse(&format!("gcc@sha256:{hex}")).unwrap(),
            ContainerImage::Pinned {
                name: "gcc".into(),
                digest: hex.clone()
            }
        );
        assert_eq!(
            ContainerImage::parse(&format!("sha256:{hex}")).unwrap(),
            ContainerImage::Digest(hex.clone())
        );
        for form in [
            format!("docker://gcr.io/team/gcc@sha256:{hex}"),
            format!("gcc@sha256:{hex}"),
            format!("sha256:{hex}"),
        ] {
            assert_eq!(ContainerImage::parse(&form).unwrap().to_string(), form);
        }
    }

    #[test]
    fn tag_only_unpinned_and_malformed_references_are_refused() {
        let hex = "ab".repeat(32);
        for bad in [
            String::new(),
            "gcc".into(),
            "gcc:12".into(),
            "host".into(),
            "docker://gcr.io/team/gcc:12".into(),
            "docker://gcr.io/team/gcc".into(),
            format!("docker://@sha256:{hex}"),
            format!("docker://gcr.io/team/gcc@sha256:{}", "AB".repeat(32)),
            format!("docker://gcr.io/team/gcc@sha256:{}", "ab".repeat(31)),
            format!("docker://gcr.io/team/gcc@sha512:{hex}"),
            format!("docker://gcr.io/team/gcc@{hex}"),
            format!("docker://gcr.io/te am/gcc@sha256:{hex}"),
            format!("docker://gcr.io/team/gcc\n@sha256:{hex}"),
            format!("docker:///etc/gcc@sha256:{hex}"),
            format!("docker://{}@sha256:{hex}", "a".repeat(400)),
            format!("gcc@sha256:{hex}x"),
            format!("../gcc@sha256:{hex}"),
            format!("sha256:{hex}\0"),
        ] {
            invalid_reason(ContainerImage::parse(&bad));
        }
        assert!(
            invalid_reason(ContainerImage::parse("docker://gcr.io/gcc:12"))
                .contains("not pinned by digest")
        );
        assert!(invalid_reason(ContainerImage::parse("gcc")).contains("not pinned by digest"));
    }

    #[test]
    fn an_action_asks_for_at_most_one_image() {
        let (a, b) = (
            format!("sha256:{}", "aa".repeat(32)),
            format!("sha256:{}", "bb".repeat(32)),
        );
        let none = reapi::Command::default();
        assert_eq!(
            requested_image(&reapi::Action::default(), &none).unwrap(),
            None
        );
        assert_eq!(requested_image(&action(&[]), &command(&[])).unwrap(), None);
        let wanted = Some(ContainerImage::parse(&a).unwrap());
        assert_eq!(requested_image(&action(&[&a]), &none).unwrap(), wanted);
        assert_eq!(
            requested_image(&reapi::Action::default(), &command(&[&a])).unwrap(),
            wanted
        );
        assert_eq!(
            requested_image(&action(&[&a]), &command(&[&a])).unwrap(),
            wanted
        );
        // Two properties, in one platform or across the two.
        invalid_reason(requested_image(&action(&[&a, &b]), &none));
        invalid_reason(requested_image(&action(&[&a, &a]), &none));
        invalid_reason(requested_image(
            &reapi::Action::default(),
            &command(&[&a, &b]),
        ));
        invalid_reason(requested_image(&action(&[&a]), &command(&[&b])));
        // A malformed one is refused, not ignored.
        invalid_reason(requested_image(&action(&["gcc:12"]), &none));
    }

    /// A built image NAME installed in `state` with one file; answers its digest.
    fn install(state: &std::path::Path, name: &str, content: &str) -> String {
        let dir = state.join("images").join(name);
        let rootfs = dir.join("staging/rootfs");
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::write(rootfs.join("etc/marker"), content).unwrap();
        let digest = crate::images::tree_digest(&rootfs).unwrap();
        std::fs::rename(dir.join("staging"), dir.join(&digest)).unwrap();
        let record = crate::images::ImageRecord {
            name: name.into(),
            tree_digest: digest.clone(),
            source: "test".into(),
            source_sha256: "00".repeat(32),
            ..Default::default()
        };
        std::fs::write(dir.join("image.json"), serde_json::to_vec(&record).unwrap()).unwrap();
        digest
    }

    #[test]
    fn offered_images_must_be_installed_and_pinned_each_once() {
        let state = tempfile::tempdir().unwrap();
        let images = Images::attach(state.path()).unwrap();
        let tiny = install(state.path(), "tiny", "tiny");
        let other = "cd".repeat(32);
        let entries = [
            format!("tiny@sha256:{tiny}"),
            format!("docker://registry.example/tiny@sha256:{tiny}"),
            format!("sha256:{tiny}"),
        ];
        for entry in &entries {
            let offered = resolve_offered(&images, std::slice::from_ref(entry)).unwrap();
            assert_eq!(offered[0].entry, *entry);
            assert_eq!(offered[0].image.digest.as_deref(), Some(tiny.as_str()));
        }
        assert!(resolve_offered(&images, &[]).unwrap().is_empty());
        for refused in [
            // Not pinned.
            "tiny".to_string(),
            "host".into(),
            "docker://registry.example/tiny:1".into(),
            // Not installed.
            format!("sha256:{other}"),
            format!("docker://registry.example/tiny@sha256:{other}"),
            format!("absent@sha256:{tiny}"),
            // The installed name is another image now.
            format!("tiny@sha256:{other}"),
        ] {
            match resolve_offered(&images, std::slice::from_ref(&refused)) {
                Err(RunnerError::FailedPrecondition(message)) => {
                    assert!(message.contains(&refused), "{refused}: {message}")
                }
                other => panic!("{refused}: {other:?}"),
            }
        }
        // The same image twice, in two forms.
        assert!(resolve_offered(&images, &entries[..2]).is_err());
        // A tree changed after it was installed is refused.
        let marker = state
            .path()
            .join("images/tiny")
            .join(&tiny)
            .join("rootfs/etc/marker");
        std::fs::write(marker, "changed").unwrap();
        assert!(resolve_offered(&images, &entries[..1]).is_err());
    }

    #[test]
    fn only_an_offered_image_is_selected_by_digest() {
        let (allowed, other) = ("aa".repeat(32), "bb".repeat(32));
        let default = image("host", "00", true);
        let offered = vec![OfferedImage {
            entry: format!("docker://gcr.io/team/gcc@sha256:{allowed}"),
            image: image("gcc", &allowed, true),
        }];
        let select = |text: &str| {
            let requested = ContainerImage::parse(text).unwrap();
            select_image(Some(&requested), &offered, &default).map(|i| i.name.clone())
        };
        assert_eq!(select_image(None, &offered, &default).unwrap().name, "host");
        for form in [
            format!("docker://gcr.io/team/gcc@sha256:{allowed}"),
            format!("docker://elsewhere.example/gcc@sha256:{allowed}"),
            format!("gcc@sha256:{allowed}"),
            format!("sha256:{allowed}"),
        ] {
            assert_eq!(select(&form).unwrap(), "gcc", "{form}");
        }
        for refused in [
            // The digest of an image not offered (installed or not).
            format!("sha256:{other}"),
            format!("docker://gcr.io/team/gcc@sha256:{other}"),
            // An offered name held to another digest.
            format!("gcc@sha256:{other}"),
            // Another name held to the offered digest.
            format!("clang@sha256:{allowed}"),
        ] {
            match select(&refused) {
                Err(RunnerError::FailedPrecondition(message)) => {
                    assert!(message.contains("does not offer"), "{message}")
                }
                other => panic!("{refused}: {other:?}"),
            }
        }
        // Nothing offered: a pinned request still never falls back to the default.
        assert!(select_image(
            Some(&ContainerImage::parse(&format!("sha256:{allowed}")).unwrap()),
            &[],
            &default
        )
        .is_err());
        // A name that no longer names the offered tree does not reach it.
        let moved = vec![OfferedImage {
            entry: format!("sha256:{allowed}"),
            image: image("gcc", &allowed, false),
        }];
        let by_name = ContainerImage::parse(&format!("gcc@sha256:{allowed}")).unwrap();
        assert!(select_image(Some(&by_name), &moved, &default).is_err());
    }
}
