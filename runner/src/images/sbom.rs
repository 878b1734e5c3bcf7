//! An imported image's software bill of materials: the packages its package databases
//! list, as a CycloneDX 1.5 JSON document stored beside the image's record
//! (`.oci/HEX/sbom.json`), printed by `kiln image sbom` and attested for every job that
//! runs on the image.
//!
//! The databases are image content, so untrusted: each file is opened from the tree's
//! root with openat2 `RESOLVE_IN_ROOT` (a symlink, absolute or with `..`, resolves inside
//! the tree, never through the host), must be a regular file, and is read up to a limit.
//! They are parsed strictly: a malformed database fails the import rather than giving a
//! bill of materials that leaves packages out.
//!
//! - dpkg: `var/lib/dpkg/status` and, as distroless images have them, the files of
//!   `var/lib/dpkg/status.d/` (deb822 paragraphs). Packages whose Status says they are
//!   not installed (or only their config files are) are left out.
//! - apk: `lib/apk/db/installed` (`K:value` lines, a blank line between packages); its
//!   `C:` checksum (`Q1` + base64 SHA-1) becomes the component's SHA-1 hash.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use base64::Engine;
use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, Mode, SFlag};
use packageurl::PackageUrl;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;

use super::{oci, write_json_atomically, Images};
use crate::error::{Result, RunnerError};

/// `predicateType` of an in-toto Statement carrying a CycloneDX document.
pub const CYCLONEDX_PREDICATE: &str = "https://cyclonedx.org/bom";
/// The document beside an imported image's record.
pub const SBOM_FILE: &str = "sbom.json";
/// One database file.
pub const MAX_DATABASE_BYTES: u64 = 64 << 20;
/// All database files of one image together.
pub const MAX_TOTAL_BYTES: u64 = 256 << 20;
/// Files in `var/lib/dpkg/status.d`.
pub const MAX_STATUS_D_FILES: usize = 100_000;
/// Packages of one image.
pub const MAX_PACKAGES: usize = 200_000;
/// A package's name, version or architecture.
const MAX_FIELD_BYTES: usize = 256;
/// A deb822 field name.
const MAX_FIELD_NAME_BYTES: usize = 128;

const DPKG_STATUS: &str = "var/lib/dpkg/status";
const DPKG_STATUS_D: &str = "var/lib/dpkg/status.d";
const APK_INSTALLED: &str = "lib/apk/db/installed";
const OS_RELEASE: &str = "etc/os-release";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SbomError {
    #[error("{path}: {reason}")]
    Database { path: String, reason: String },
    #[error("{path}: larger than {limit} bytes")]
    TooLarge { path: String, limit: u64 },
    #[error("the package databases are larger than {MAX_TOTAL_BYTES} bytes together")]
    TotalTooLarge,
    #[error("{DPKG_STATUS_D} holds more than {MAX_STATUS_D_FILES} files")]
    TooManyFiles,
    #[error("the package databases list more than {MAX_PACKAGES} packages")]
    TooManyPackages,
}

fn database_error(path: &str, reason: impl Into<String>) -> SbomError {
    SbomError::Database {
        path: path.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ecosystem {
    Deb,
    Apk,
}

/// One installed package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub ecosystem: Ecosystem,
    pub name: String,
    pub version: String,
    pub arch: String,
    /// Hex SHA-1 the database records for the package (apk's `C:`).
    pub sha1: Option<String>,
}

/// What the tree's databases hold.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Inventory {
    pub packages: Vec<Package>,
    /// The database files read, relative to the root.
    pub databases: Vec<String>,
    /// `ID` of the image's os-release, when it is a plain word: the purls' namespace.
    pub distro: Option<String>,
}

/// Reads files of an image tree, never outside it, within one budget.
struct TreeReader {
    root: OwnedFd,
    budget: u64,
}

impl TreeReader {
    fn open(root: &Path) -> std::result::Result<Self, SbomError> {
        let root = nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| database_error("/", format!("opening the tree: {}", e.desc())))?;
        Ok(Self {
            root,
            budget: MAX_TOTAL_BYTES,
        })
    }

    /// openat2 from the root with the root as `/`: nothing resolves outside.
    fn open_in_root(&self, path: &str, flags: OFlag) -> std::result::Result<OwnedFd, Errno> {
        openat2(
            self.root.as_fd(),
            path,
            OpenHow::new()
                .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOCTTY)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS),
        )
    }

    /// The file's bytes; None when the tree has no such file. A FIFO or device never
    /// blocks the read (O_NONBLOCK, and only regular files are read).
    fn read(&mut self, path: &str, limit: u64) -> std::result::Result<Option<Vec<u8>>, SbomError> {
        let fd = match self.open_in_root(path, OFlag::O_RDONLY | OFlag::O_NONBLOCK) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR) => return Ok(None),
            Err(e) => return Err(database_error(path, format!("opening: {}", e.desc()))),
        };
        let stat = fstat(&fd).map_err(|e| database_error(path, e.desc()))?;
        if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(database_error(path, "not a regular file"));
        }
        // Which limit binds: this file's, or what is left of all files' together.
        let by_budget = self.budget < limit;
        let limit = limit.min(self.budget);
        let mut bytes = Vec::new();
        File::from(fd)
            .take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| database_error(path, format!("reading: {e}")))?;
        let read = bytes.len() as u64;
        if read > limit {
            return Err(if by_budget {
                SbomError::TotalTooLarge
            } else {
                SbomError::TooLarge {
                    path: path.into(),
                    limit,
                }
            });
        }
        self.budget -= read;
        Ok(Some(bytes))
    }

    /// The names in a directory of the tree, sorted; None when there is none.
    fn list(&self, path: &str) -> std::result::Result<Option<Vec<String>>, SbomError> {
        let fd = match self.open_in_root(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENOTDIR) => return Ok(None),
            Err(e) => return Err(database_error(path, format!("opening: {}", e.desc()))),
        };
        let mut dir = nix::dir::Dir::from_fd(fd).map_err(|e| database_error(path, e.desc()))?;
        let mut names = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(|e| database_error(path, e.desc()))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            if names.len() == MAX_STATUS_D_FILES {
                return Err(SbomError::TooManyFiles);
            }
            let name = std::str::from_utf8(name)
                .map_err(|_| database_error(path, "a file name is not UTF-8"))?;
            names.push(name.to_string());
        }
        names.sort();
        Ok(Some(names))
    }
}

/// Reads every package database the tree at `root` has.
pub fn inventory(root: &Path) -> std::result::Result<Inventory, SbomError> {
    let mut reader = TreeReader::open(root)?;
    let mut inventory = Inventory::default();
    if let Some(bytes) = reader.read(DPKG_STATUS, MAX_DATABASE_BYTES)? {
        inventory
            .packages
            .extend(parse_dpkg_status(DPKG_STATUS, &bytes)?);
        inventory.databases.push(DPKG_STATUS.into());
    }
    if let Some(names) = reader.list(DPKG_STATUS_D)? {
        for name in names {
            // Distroless keeps each package's file list beside its paragraph.
            if name.ends_with(".md5sums") || name.starts_with('.') {
                continue;
            }
            let path = format!("{DPKG_STATUS_D}/{name}");
            if let Some(bytes) = reader.read(&path, MAX_DATABASE_BYTES)? {
                inventory.packages.extend(parse_dpkg_status(&path, &bytes)?);
                inventory.databases.push(path);
            }
            check_count(&inventory)?;
        }
    }
    if let Some(bytes) = reader.read(APK_INSTALLED, MAX_DATABASE_BYTES)? {
        inventory
            .packages
            .extend(parse_apk_installed(APK_INSTALLED, &bytes)?);
        inventory.databases.push(APK_INSTALLED.into());
    }
    check_count(&inventory)?;
    // os-release only names the distribution; an odd one is not an error.
    if let Ok(Some(bytes)) = reader.read(OS_RELEASE, 64 << 10) {
        inventory.distro = os_release_id(&bytes);
    }
    Ok(inventory)
}

fn check_count(inventory: &Inventory) -> std::result::Result<(), SbomError> {
    if inventory.packages.len() > MAX_PACKAGES {
        return Err(SbomError::TooManyPackages);
    }
    Ok(())
}

/// `ID=` of an os-release file, if it is a plain lowercase word.
fn os_release_id(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    let value = text.lines().find_map(|l| l.strip_prefix("ID="))?;
    let value = value.trim().trim_matches('"');
    let plain = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    plain.then(|| value.to_string())
}

/// A deb822 paragraph: field names (as written) and values (continuation lines joined
/// with newlines).
pub type Paragraph = BTreeMap<String, String>;

/// Parses deb822 text strictly: every line is a `Name: value` field, a continuation
/// (starting with a space or tab) of the previous field, or an empty line ending a
/// paragraph; a field may appear once per paragraph. Field names are matched
/// case-insensitively by dpkg, so they are kept as written and looked up with
/// [`field`].
pub fn parse_deb822(path: &str, bytes: &[u8]) -> std::result::Result<Vec<Paragraph>, SbomError> {
    // Old Descriptions may be Latin-1: values other than those checked below are only
    // carried, never interpreted.
    let text = String::from_utf8_lossy(bytes);
    let mut paragraphs = Vec::new();
    let mut current = Paragraph::new();
    let mut last: Option<String> = None;
    for (index, line) in text.split('\n').enumerate() {
        let at = |reason: &str| database_error(path, format!("line {}: {reason}", index + 1));
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            if !current.is_empty() {
                paragraphs.push(std::mem::take(&mut current));
            }
            last = None;
            continue;
        }
        if line.starts_with([' ', '\t']) {
            let Some(value) = last.as_ref().and_then(|name| current.get_mut(name)) else {
                return Err(at("a continuation line outside a field"));
            };
            value.push('\n');
            value.push_str(line.trim_start_matches([' ', '\t']));
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(at("neither a field nor a continuation"));
        };
        let name_ok = !name.is_empty()
            && name.len() <= MAX_FIELD_NAME_BYTES
            && !name.starts_with(['#', '-'])
            && name.bytes().all(|b| b.is_ascii_graphic());
        if !name_ok {
            return Err(at("a malformed field name"));
        }
        if current.keys().any(|k| k.eq_ignore_ascii_case(name)) {
            return Err(at(&format!(
                "field {name:?} appears twice in one paragraph"
            )));
        }
        current.insert(name.to_string(), value.trim().to_string());
        last = Some(name.to_string());
    }
    if !current.is_empty() {
        paragraphs.push(current);
    }
    Ok(paragraphs)
}

/// A field of a paragraph, by its name in any case.
pub fn field<'a>(paragraph: &'a Paragraph, name: &str) -> Option<&'a str> {
    paragraph
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A name, version or architecture: printable ASCII without spaces or slashes.
fn checked_token(path: &str, what: &str, value: &str) -> std::result::Result<String, SbomError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_FIELD_BYTES
        && value.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
    if !ok {
        return Err(database_error(
            path,
            format!("{what} {value:?} is not a plain token"),
        ));
    }
    Ok(value.to_string())
}

/// The installed packages of a dpkg status file (or one file of `status.d`).
pub fn parse_dpkg_status(path: &str, bytes: &[u8]) -> std::result::Result<Vec<Package>, SbomError> {
    let mut packages = Vec::new();
    for paragraph in parse_deb822(path, bytes)? {
        let Some(name) = field(&paragraph, "Package") else {
            return Err(database_error(path, "a paragraph without a Package field"));
        };
        let name = checked_token(path, "package name", name)?;
        // `want flag state`: only a package whose files are on disk is in the image.
        if let Some(status) = field(&paragraph, "Status") {
            let words: Vec<&str> = status.split_ascii_whitespace().collect();
            let [_, _, state] = words.as_slice() else {
                return Err(database_error(
                    path,
                    format!("package {name}: Status {status:?} is not three words"),
                ));
            };
            if matches!(*state, "not-installed" | "config-files") {
                continue;
            }
        }
        let version = field(&paragraph, "Version").ok_or_else(|| {
            database_error(path, format!("installed package {name} has no Version"))
        })?;
        let arch = field(&paragraph, "Architecture").ok_or_else(|| {
            database_error(
                path,
                format!("installed package {name} has no Architecture"),
            )
        })?;
        packages.push(Package {
            ecosystem: Ecosystem::Deb,
            version: checked_token(path, "version", version)?,
            arch: checked_token(path, "architecture", arch)?,
            name,
            sha1: None,
        });
        if packages.len() > MAX_PACKAGES {
            return Err(SbomError::TooManyPackages);
        }
    }
    Ok(packages)
}

/// The packages of apk's `installed` database.
pub fn parse_apk_installed(
    path: &str,
    bytes: &[u8],
) -> std::result::Result<Vec<Package>, SbomError> {
    let text = std::str::from_utf8(bytes).map_err(|_| database_error(path, "not UTF-8"))?;
    let mut packages = Vec::new();
    let mut fields: BTreeMap<char, String> = BTreeMap::new();
    let mut finish = |fields: &mut BTreeMap<char, String>, line: usize| {
        if fields.is_empty() {
            return Ok(());
        }
        let at = |reason: String| {
            database_error(path, format!("package ending on line {line}: {reason}"))
        };
        let get = |key: char, what: &str| {
            fields
                .get(&key)
                .ok_or_else(|| at(format!("no {key}: ({what})")))
                .and_then(|v| checked_token(path, what, v))
        };
        let package = Package {
            ecosystem: Ecosystem::Apk,
            name: get('P', "package name")?,
            version: get('V', "version")?,
            arch: get('A', "architecture")?,
            sha1: fields
                .get(&'C')
                .map(|c| apk_checksum(path, c))
                .transpose()?
                .flatten(),
        };
        fields.clear();
        packages.push(package);
        if packages.len() > MAX_PACKAGES {
            return Err(SbomError::TooManyPackages);
        }
        Ok(())
    };
    let mut line_no = 0;
    for (index, line) in text.split('\n').enumerate() {
        line_no = index + 1;
        if line.is_empty() {
            finish(&mut fields, line_no)?;
            continue;
        }
        let mut chars = line.chars();
        let (Some(key), Some(':')) = (chars.next(), chars.next()) else {
            return Err(database_error(
                path,
                format!("line {line_no}: not a K:value line"),
            ));
        };
        if !key.is_ascii_alphanumeric() {
            return Err(database_error(
                path,
                format!("line {line_no}: bad key {key:?}"),
            ));
        }
        // File entries (F:, R:, a:, Z:...) repeat; the package's own fields may not.
        if "PVAC".contains(key) && fields.insert(key, chars.as_str().to_string()).is_some() {
            return Err(database_error(
                path,
                format!("line {line_no}: {key}: appears twice for one package"),
            ));
        }
    }
    finish(&mut fields, line_no)?;
    Ok(packages)
}

/// apk's checksum: `Q1` + base64 of a SHA-1, as hex; other (older) forms carry no hash.
fn apk_checksum(path: &str, value: &str) -> std::result::Result<Option<String>, SbomError> {
    let Some(encoded) = value.strip_prefix("Q1") else {
        return Ok(None);
    };
    match base64::engine::general_purpose::STANDARD.decode(encoded) {
        Ok(bytes) if bytes.len() == 20 => Ok(Some(hex::encode(bytes))),
        _ => Err(database_error(
            path,
            format!("checksum {value:?} is not Q1 + base64 of a SHA-1"),
        )),
    }
}

impl Package {
    /// `pkg:deb/DISTRO/NAME@VERSION?arch=ARCH` or `pkg:apk/DISTRO/...`.
    pub fn purl(&self, distro: Option<&str>) -> std::result::Result<String, SbomError> {
        let (ty, default_distro) = match self.ecosystem {
            Ecosystem::Deb => ("deb", "debian"),
            Ecosystem::Apk => ("apk", "alpine"),
        };
        let bad = |e: packageurl::Error| {
            database_error(&self.name, format!("no package URL for it: {e}"))
        };
        let mut purl = PackageUrl::new(ty, self.name.as_str()).map_err(bad)?;
        purl.with_namespace(distro.unwrap_or(default_distro))
            .map_err(bad)?
            .with_version(self.version.as_str())
            .map_err(bad)?
            .add_qualifier("arch", self.arch.as_str())
            .map_err(bad)?;
        Ok(purl.to_string())
    }
}

/// The image as the SBOM's subject: `pkg:oci/NAME@sha256%3AHEX?arch=ARCH`, as the
/// provenance names it.
fn image_purl(name: &str, manifest: &str) -> String {
    format!(
        "pkg:oci/{name}@sha256%3A{manifest}?arch={}",
        oci::host_arch()
    )
}

/// The CycloneDX 1.5 document of an image's inventory.
pub fn cyclonedx(
    image_name: &str,
    manifest: &str,
    inventory: &Inventory,
) -> std::result::Result<Value, SbomError> {
    let mut components = BTreeMap::new();
    for package in &inventory.packages {
        let purl = package.purl(inventory.distro.as_deref())?;
        let mut component = json!({
            "type": "library",
            "bom-ref": purl,
            "name": package.name,
            "version": package.version,
            "purl": purl,
        });
        if let Some(sha1) = &package.sha1 {
            component["hashes"] = json!([{"alg": "SHA-1", "content": sha1}]);
        }
        // The same package in two databases is one component.
        components.entry(purl).or_insert(component);
    }
    let image = image_purl(image_name, manifest);
    let mut document = json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
        "version": 1,
        "metadata": {
            "tools": {"components": [{
                "type": "application",
                "name": "kiln",
                "version": crate::engine::RUNNER_VERSION,
            }]},
            "component": {
                "type": "container",
                "bom-ref": image,
                "name": image_name,
                "version": format!("sha256:{manifest}"),
                "purl": image,
                "hashes": [{"alg": "SHA-256", "content": manifest}],
            },
            "properties": inventory.databases.iter().map(|d| json!({
                "name": "kiln:package-database", "value": d,
            })).collect::<Vec<_>>(),
        },
        "components": components.into_values().collect::<Vec<_>>(),
    });
    let now = time::OffsetDateTime::now_utc().replace_nanosecond(0).ok();
    if let Some(now) = now.and_then(|t| t.format(&Rfc3339).ok()) {
        document["metadata"]["timestamp"] = now.into();
    }
    Ok(document)
}

/// An image's SBOM as a job records it.
#[derive(Debug, Clone)]
pub struct ImageSbom {
    pub name: String,
    pub manifest_digest: String,
    pub document: Value,
}

impl ImageSbom {
    /// The in-toto Statement v1 about the image (its manifest digest) whose predicate is
    /// the document.
    pub fn statement(&self) -> Value {
        json!({
            "_type": provenance::slsa::STATEMENT_TYPE,
            "subject": [{
                "name": self.name,
                "uri": image_purl(&self.name, &self.manifest_digest),
                "digest": {"sha256": self.manifest_digest},
            }],
            "predicateType": CYCLONEDX_PREDICATE,
            "predicate": self.document,
        })
    }
}

/// What `kiln image sbom` and the import report say about a document.
pub fn summary(document: &Value) -> (usize, Vec<String>) {
    let components = document["components"].as_array().map_or(0, Vec::len);
    let databases = document["metadata"]["properties"]
        .as_array()
        .map(|props| {
            props
                .iter()
                .filter(|p| p["name"] == "kiln:package-database")
                .filter_map(|p| p["value"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    (components, databases)
}

impl Images {
    /// Writes `dir/sbom.json` from `dir/rootfs` unless it is there already (an image
    /// imported before Kiln recorded SBOMs gets one when it is imported again).
    pub(super) fn ensure_sbom(&self, dir: &Path, name: &str, manifest: &str) -> Result<()> {
        let path = dir.join(SBOM_FILE);
        if path.exists() {
            return Ok(());
        }
        let inventory = inventory(&dir.join("rootfs")).map_err(|e| {
            RunnerError::FailedPrecondition(format!("the image's package database {e}"))
        })?;
        let document = cyclonedx(name, manifest, &inventory).map_err(|e| {
            RunnerError::FailedPrecondition(format!("the image's package database {e}"))
        })?;
        write_json_atomically(&path, &document)
    }

    /// The SBOM of an imported image, by manifest digest; None for an image without
    /// one (built images, and images imported before Kiln recorded SBOMs).
    pub fn sbom(&self, manifest: &str) -> Result<Option<ImageSbom>> {
        crate::store::cas::check_digest("image", manifest)?;
        let path = self.oci_dir().join(manifest).join(SBOM_FILE);
        let Some(document) = super::read_json::<Value>(&path)? else {
            return Ok(None);
        };
        let component = &document["metadata"]["component"];
        // The document must be about this image, whatever name it was imported as.
        if component["version"].as_str() != Some(&format!("sha256:{manifest}")) {
            return Err(RunnerError::Internal(format!(
                "the SBOM of image sha256:{manifest} describes another image"
            )));
        }
        let name = component["name"].as_str().unwrap_or_default().to_string();
        Ok(Some(ImageSbom {
            name,
            manifest_digest: manifest.to_string(),
            document,
        }))
    }

    /// The SBOM of the image a job resolved to, if it is an imported one that has one.
    pub fn sbom_of(&self, image: &super::ResolvedImage) -> Result<Option<ImageSbom>> {
        match (&image.imported, &image.digest) {
            (Some(_), Some(manifest)) => Ok(self.sbom(manifest)?.map(|mut sbom| {
                // Named as the job named it.
                sbom.name = image.name.clone();
                sbom
            })),
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests;
