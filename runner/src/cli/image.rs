//! `kiln image`: build, import, pull, list, inspect, print the SBOM of and remove
//! images, locally as root in the state directory.

use std::path::Path;

use anyhow::Context;

use crate::cli::args::ImageCommand;
use crate::images::{self, import::Imported, unpack::Limits, Images};
use crate::{config, units};

pub async fn command(state_dir: &Path, command: ImageCommand) -> anyhow::Result<i32> {
    let images = Images::attach(state_dir)?;
    match command {
        ImageCommand::Build { recipe } => {
            let record = images.build(&recipe)?;
            println!(
                "built image {} tree sha256:{} from {}",
                record.name, record.tree_digest, record.source
            );
        }
        ImageCommand::Import {
            source,
            name,
            max_size,
            max_entries,
        } => {
            let imported =
                images.import(&source, name.as_deref(), limits(max_size, max_entries))?;
            report(&images, &imported)?;
        }
        ImageCommand::Pull {
            reference,
            name,
            mut insecure_registries,
            config,
            registry_auth,
            max_size,
            max_entries,
        } => {
            if let Some(path) = &config {
                let config = config::Config::load(Some(path))?;
                insecure_registries.extend(config.images.insecure_registries);
            }
            let options = images::pull::PullOptions {
                name,
                insecure_registries,
                auth_file: registry_auth,
                limits: limits(max_size, max_entries),
            };
            let pulled = images.pull(&reference, &options).await?;
            if let Some(tag) = &pulled.tag {
                eprintln!("tag {tag} is {}: pinned by that digest", pulled.reference);
            }
            report(&images, &pulled.imported)?;
        }
        ImageCommand::List => list(&images)?,
        ImageCommand::Inspect { image } => {
            let record = lookup(&images, &image)?;
            println!("{}", serde_json::to_string_pretty(&record)?);
        }
        ImageCommand::Sbom { image } => sbom(&images, &image)?,
        ImageCommand::Rm { name } => {
            let record = images.remove(&name)?;
            println!("removed {}@sha256:{}", record.name, record.digest());
        }
    }
    Ok(0)
}

/// The unpacking limits, the flags overriding the defaults.
fn limits(max_size: Option<u64>, max_entries: Option<u64>) -> Limits {
    let defaults = Limits::default();
    Limits {
        max_bytes: max_size.unwrap_or(defaults.max_bytes),
        max_entries: max_entries.unwrap_or(defaults.max_entries),
    }
}

/// What an import or pull installed (stderr), then `NAME@sha256:DIGEST` (stdout).
fn report(images: &Images, imported: &Imported) -> anyhow::Result<()> {
    let report = &imported.report;
    if imported.already_installed {
        eprintln!("the image's tree was already installed; named it");
    } else {
        eprintln!(
            "unpacked {} entries, {}, tree sha256:{}",
            report.entries,
            units::format_size(report.bytes),
            imported.record.tree_digest
        );
    }
    if let Some(old) = &imported.replaced {
        eprintln!(
            "{} named sha256:{old} before; that tree stays for jobs that pin its digest",
            imported.record.name
        );
    }
    if report.skipped_count > 0 {
        eprintln!(
            "skipped {} special entries (device nodes, FIFOs...): {}",
            report.skipped_count,
            report.skipped.join(", ")
        );
    }
    if let Some(sbom) = images.sbom(imported.record.digest())? {
        match images::sbom::summary(&sbom.document) {
            (_, databases) if databases.is_empty() => eprintln!(
                "the image has no package database (dpkg, apk): its SBOM lists no packages"
            ),
            (components, databases) => {
                eprintln!("SBOM: {components} packages from {}", databases.join(", "))
            }
        }
    }
    println!(
        "{}@sha256:{}",
        imported.record.name,
        imported.record.digest()
    );
    Ok(())
}

fn list(images: &Images) -> anyhow::Result<()> {
    println!("{:<16} {:<72} SOURCE", "NAME", "DIGEST");
    println!(
        "{:<16} {:<72} host /usr (unpinned)",
        images::HOST_IMAGE,
        "-"
    );
    for record in images.list()? {
        println!(
            "{:<16} sha256:{:<65} {}",
            record.name,
            record.digest(),
            record.source
        );
    }
    for record in images.unnamed()? {
        println!(
            "{:<16} sha256:{:<65} {} (was {}; no name now)",
            "-",
            record.digest(),
            record.source,
            record.name
        );
    }
    Ok(())
}

fn lookup(images: &Images, image: &str) -> anyhow::Result<images::ImageRecord> {
    let reference = images::reference::ImageRef::parse(image)?;
    images
        .lookup(&reference)?
        .with_context(|| format!("image {image:?} is not installed"))
}

fn sbom(images: &Images, image: &str) -> anyhow::Result<()> {
    let record = lookup(images, image)?;
    let Some(manifest) = &record.manifest_digest else {
        anyhow::bail!("image {image:?} was built, not imported: only imported images have an SBOM");
    };
    let sbom = images.sbom(manifest)?.with_context(|| {
        format!("image {image:?} has no SBOM (it was imported before Kiln recorded them: import it again)")
    })?;
    let (components, databases) = images::sbom::summary(&sbom.document);
    if databases.is_empty() {
        eprintln!("the image has no package database (dpkg, apk): the SBOM lists no packages");
    } else {
        eprintln!("{components} packages from {}", databases.join(", "));
    }
    println!("{}", serde_json::to_string_pretty(&sbom.document)?);
    Ok(())
}
