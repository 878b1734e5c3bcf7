//! Built images: `kiln image build RECIPE`, a file tree made from a recipe pinned by the
//! SHA-256 of its source package (see images/busybox/recipe.toml).

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde::Deserialize;

use super::{tree_digest, write_json_atomically, ImageRecord, Images, HOST_IMAGE};
use crate::error::{Result, RunnerError};
use crate::spec::check_image_name;

impl Images {
    /// Builds an image from a recipe directory (see images/busybox/recipe.toml).
    pub fn build(&self, recipe_dir: &Path) -> Result<ImageRecord> {
        let recipe_path = recipe_dir.join("recipe.toml");
        let text = fs::read_to_string(&recipe_path)
            .map_err(RunnerError::io_path("reading", &recipe_path))?;
        let recipe: Recipe = toml::from_str(&text)
            .map_err(|e| RunnerError::invalid(recipe_path.display().to_string(), e.to_string()))?;
        check_image_name(&recipe.name)?;
        if recipe.name == HOST_IMAGE {
            return Err(RunnerError::invalid("name", "\"host\" is built in"));
        }
        crate::store::cas::check_digest("deb.sha256", &recipe.deb.sha256)?;
        let deb = fetch_deb(recipe_dir, &recipe.deb)?;
        let binary = extract_from_deb(&deb, &recipe.deb.binary)?;

        let staging_parent = self.dir.join(&recipe.name);
        fs::create_dir_all(&staging_parent)
            .map_err(RunnerError::io_path("creating", &staging_parent))?;
        let staging = tempfile::Builder::new()
            .prefix(".build-")
            .tempdir_in(&staging_parent)
            .map_err(RunnerError::io("creating a build directory"))?;
        let rootfs = staging.path().join("rootfs");
        let bin = rootfs.join("bin");
        let etc = rootfs.join("etc");
        for dir in [&bin, &etc] {
            fs::create_dir_all(dir).map_err(RunnerError::io_path("creating", dir))?;
        }
        let busybox = bin.join("busybox");
        fs::write(&busybox, &binary).map_err(RunnerError::io_path("writing", &busybox))?;
        fs::set_permissions(&busybox, fs::Permissions::from_mode(0o755))
            .map_err(RunnerError::io_path("chmod", &busybox))?;
        for applet in &recipe.applets {
            if applet.is_empty() || applet.contains('/') || applet == "busybox" || applet == ".." {
                return Err(RunnerError::invalid("applets", format!("{applet:?}")));
            }
            let link = bin.join(applet);
            std::os::unix::fs::symlink("busybox", &link)
                .map_err(RunnerError::io_path("linking", &link))?;
        }
        fs::write(
            etc.join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\nbuild:x:1000:1000:Kiln build user:/workspace:/bin/sh\n",
        )
        .map_err(RunnerError::io("writing passwd"))?;
        fs::write(etc.join("group"), "root:x:0:\nbuild:x:1000:\n")
            .map_err(RunnerError::io("writing group"))?;
        fs::write(etc.join("hosts"), "127.0.0.1 localhost\n")
            .map_err(RunnerError::io("writing hosts"))?;
        for dir in [&rootfs, &bin, &etc] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
                .map_err(RunnerError::io_path("chmod", dir))?;
        }

        let digest = tree_digest(&rootfs)?;
        let final_dir = staging_parent.join(&digest);
        if !final_dir.exists() {
            let kept = staging.keep();
            fs::rename(&kept, &final_dir).map_err(RunnerError::io_path("storing", &final_dir))?;
        }
        let record = ImageRecord {
            name: recipe.name.clone(),
            tree_digest: digest,
            source: format!(
                "deb:{}={} ({})",
                recipe.deb.package, recipe.deb.version, recipe.deb.architecture
            ),
            source_sha256: recipe.deb.sha256.clone(),
            ..Default::default()
        };
        write_json_atomically(&self.record_path(&recipe.name), &record)?;
        Ok(record)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Recipe {
    name: String,
    deb: DebSource,
    applets: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DebSource {
    package: String,
    version: String,
    architecture: String,
    sha256: String,
    binary: String,
}

fn deb_file_name(deb: &DebSource) -> String {
    // Debian's archive names encode the epoch colon as %3a.
    format!(
        "{}_{}_{}.deb",
        deb.package,
        deb.version.replace(':', "%3a"),
        deb.architecture
    )
}

fn sha256_of(path: &Path) -> Result<String> {
    Ok(provenance::hash::sha256_file(path)?)
}

/// Finds the pinned .deb (recipe folder, apt cache, or `apt-get download`) and
/// returns its bytes once its SHA-256 matches the recipe.
fn fetch_deb(recipe_dir: &Path, deb: &DebSource) -> Result<Vec<u8>> {
    let name = deb_file_name(deb);
    let candidates = [
        recipe_dir.join(&name),
        Path::new("/var/cache/apt/archives").join(&name),
    ];
    let mut found = candidates.iter().find(|p| p.is_file()).cloned();
    let download_dir = tempfile::tempdir().map_err(RunnerError::io("creating a temp dir"))?;
    if found.is_none() {
        let spec = format!("{}={}", deb.package, deb.version);
        let status = std::process::Command::new("apt-get")
            .arg("download")
            .arg(&spec)
            .current_dir(download_dir.path())
            .status()
            .map_err(RunnerError::io("running apt-get download"))?;
        if !status.success() {
            return Err(RunnerError::FailedPrecondition(format!(
                "`apt-get download {spec}` failed ({status}); put {name} in {}",
                recipe_dir.display()
            )));
        }
        found = Some(download_dir.path().join(&name));
    }
    let path = found.ok_or_else(|| RunnerError::Internal("no .deb found".into()))?;
    let actual = sha256_of(&path)?;
    if actual != deb.sha256 {
        return Err(RunnerError::FailedPrecondition(format!(
            "{} hashes to {actual}, but the recipe pins {}",
            path.display(),
            deb.sha256
        )));
    }
    fs::read(&path).map_err(RunnerError::io_path("reading", &path))
}

/// Takes one file out of a .deb's data.tar.{xz,gz,zst} without running anything of it.
fn extract_from_deb(deb: &[u8], member: &str) -> Result<Vec<u8>> {
    let mut archive = ar::Archive::new(deb);
    while let Some(entry) = archive.next_entry() {
        let mut entry = entry.map_err(RunnerError::io("reading the .deb"))?;
        let name = String::from_utf8_lossy(entry.header().identifier()).to_string();
        if !name.starts_with("data.tar") {
            continue;
        }
        let mut compressed = Vec::new();
        entry
            .read_to_end(&mut compressed)
            .map_err(RunnerError::io("reading data.tar"))?;
        let reader: Box<dyn Read> = match name.as_str() {
            "data.tar.xz" => Box::new(xz2::read::XzDecoder::new(compressed.as_slice())),
            "data.tar" => Box::new(compressed.as_slice()),
            other => {
                return Err(RunnerError::FailedPrecondition(format!(
                    "unsupported .deb member {other}"
                )))
            }
        };
        let mut tar = tar::Archive::new(reader);
        for file in tar.entries().map_err(RunnerError::io("reading data.tar"))? {
            let mut file = file.map_err(RunnerError::io("reading data.tar"))?;
            let path = file
                .path()
                .map_err(RunnerError::io("reading data.tar"))?
                .to_string_lossy()
                .trim_start_matches("./")
                .to_string();
            if path == member && file.header().entry_type().is_file() {
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes)
                    .map_err(RunnerError::io("reading data.tar"))?;
                return Ok(bytes);
            }
        }
        return Err(RunnerError::FailedPrecondition(format!(
            "the .deb has no regular file {member}"
        )));
    }
    Err(RunnerError::FailedPrecondition(
        "the .deb has no data.tar member".into(),
    ))
}
