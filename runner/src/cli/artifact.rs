//! `kiln push`, `kiln verify --image` and `kiln pull-artifact`: a job's outputs and
//! attestations in an OCI registry, published by the daemon and checked by whoever
//! deploys them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use provenance::verify::provenance::Policy;

use crate::cli::client::Client;
use crate::registry::fetch::{check_layers, download, fetch_artifact, FetchedArtifact};
use crate::registry::verify::{judge, ImageVerdict};
use crate::registry::{registry_auth, Operation, Session, Target};

/// How the client reaches a registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Registries spoken to over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// A docker-style config.json [default: $DOCKER_CONFIG/config.json or
    /// ~/.docker/config.json when present].
    pub auth_file: Option<PathBuf>,
}

/// What to trust: runner keys and the policy.
pub struct Trust<'a> {
    pub keys: &'a [PathBuf],
    pub policy: &'a Path,
}

/// `kiln push JOB_ID REGISTRY/REPO[:TAG]`: the daemon pushes; prints `REPO@sha256:DIGEST`.
pub async fn push(client: &Client, job_id: &str, repository: &str) -> anyhow::Result<i32> {
    let published = client.publish(job_id, repository).await?;
    eprintln!(
        "published job {job_id} with {} attestation(s)",
        published.attestations
    );
    println!("{}", published.reference);
    Ok(0)
}

/// `kiln verify --image REF`: the verdict, exit code 0 only when it passed.
pub async fn verify_image(
    reference: &str,
    trust: &Trust<'_>,
    options: &RegistryOptions,
    json: bool,
) -> anyhow::Result<i32> {
    let (_, _, verdict) = fetch_and_judge(reference, trust, options, Layers::Checked).await?;
    print_verdict(&verdict, json)?;
    Ok(if verdict.passed { 0 } else { 1 })
}

/// `kiln pull-artifact REF --out DIR`: verifies, then downloads the outputs into DIR
/// (which must not exist or be empty); nothing is left in DIR unless all of it checked out.
pub async fn pull_artifact(
    reference: &str,
    out: &Path,
    trust: &Trust<'_>,
    options: &RegistryOptions,
) -> anyhow::Result<i32> {
    let fresh = match std::fs::read_dir(out) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
    };
    if !fresh {
        anyhow::bail!(
            "{} is not empty: pull-artifact writes into a new or empty directory",
            out.display()
        );
    }
    // The layers' bytes are checked as they are downloaded, not read a first time before.
    let (session, fetched, mut verdict) =
        fetch_and_judge(reference, trust, options, Layers::Unread).await?;
    if !verdict.passed {
        print_verdict(&verdict, false)?;
        return Ok(1);
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    if let Err(err) = download(&session, &fetched.outputs, out).await {
        remove_contents(out);
        verdict.passed = false;
        verdict.reasons.push(err.client_message());
        print_verdict(&verdict, false)?;
        return Ok(1);
    }
    print_verdict(&verdict, false)?;
    println!(
        "{} output(s) written to {}",
        fetched.outputs.len(),
        out.display()
    );
    Ok(0)
}

/// Fetches the artifact by digest with its attestations, checks every layer's bytes, and
/// judges it.
/// Whether [`fetch_and_judge`] reads every layer to check its bytes.
#[derive(PartialEq, Eq)]
enum Layers {
    Checked,
    /// The caller checks them as it downloads them.
    Unread,
}

async fn fetch_and_judge(
    reference: &str,
    trust: &Trust<'_>,
    options: &RegistryOptions,
    layers: Layers,
) -> anyhow::Result<(Session, FetchedArtifact, ImageVerdict)> {
    let target = Target::parse(reference, &options.insecure_registries)?;
    if !target.pinned {
        anyhow::bail!(
            "{reference}: name the artifact by digest (REGISTRY/REPO@sha256:DIGEST); a tag can be moved"
        );
    }
    let keys = crate::cli::verify::trusted_keys(trust.keys)?;
    if keys.is_empty() {
        anyhow::bail!("no runner keys to trust: give --key");
    }
    let policy_text = std::fs::read_to_string(trust.policy)
        .with_context(|| format!("reading {}", trust.policy.display()))?;
    let policy = Policy::from_toml(&policy_text)
        .with_context(|| format!("policy {}", trust.policy.display()))?;
    let auth = registry_auth(options.auth_file.as_deref(), &target.registry)?;
    let digest_hex = target.reference.trim_start_matches("sha256:").to_string();
    let pinned = format!("{}@sha256:{digest_hex}", target.repository_name());
    let session = Session::open(target, auth, Operation::Pull).await?;
    let fetched = fetch_artifact(&session, &digest_hex).await?;
    let mut verdict = judge(&pinned, &fetched, &keys, &policy);
    if layers == Layers::Checked {
        if let Err(err) = check_layers(&session, &fetched.outputs).await {
            verdict.passed = false;
            verdict.reasons.push(err.client_message());
        }
    }
    Ok((session, fetched, verdict))
}

fn print_verdict(verdict: &ImageVerdict, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&verdict.to_json())?);
    } else {
        println!("{}", verdict.summary());
    }
    Ok(())
}

/// Empties a directory pull-artifact filled partly.
fn remove_contents(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            let _ = match entry.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                _ => std::fs::remove_file(&path),
            };
        }
    }
}
