//! `kiln worker`: a bot of a remote-execution scheduler. Checks the host can sandbox as
//! `kiln serve` does, opens the key ring and images of its state directory, and runs one
//! bot session per slot (see [`crate::worker::bots`]) until SIGTERM or SIGINT.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::watch;

use crate::cli::args::WorkerArgs;
use crate::config::Config;
use crate::daemon::server::{check_host, lease_id_ranges, shutdown_signal};
use crate::engine::executor::SandboxExecutor;
use crate::engine::signer::Signer;
use crate::images::Images;
use crate::worker::bots::Bot;
use crate::worker::cas::{validate_instance_name, CasClient};
use crate::worker::image::{resolve_offered, CONTAINER_IMAGE};
use crate::worker::run::{ActionIsolation, ActionRunner};

/// The ISA name BuildGrid and Bazel's platforms use for this host.
fn isa() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "x86-64",
        other => other,
    }
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(dir) = args.state_dir {
        config.state_dir = if dir.is_absolute() {
            dir
        } else {
            std::env::current_dir()?.join(dir)
        };
    }
    if let Some(bots) = args.bots {
        config.max_concurrent_jobs = bots;
    }
    config.validate()?;
    validate_instance_name(&args.instance)?;
    if !nix::unistd::geteuid().is_root() {
        bail!("kiln worker must run as root: it creates user namespaces with mapped id ranges and mounts");
    }
    let (host, sandbox) = check_host(&config)?;
    // Nothing the worker writes is for other host users (as the daemon's state).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let state = &config.state_dir;
    fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
    // Traversable but not listable: sandbox bind sources (images, workspaces) live below.
    fs::set_permissions(state, fs::Permissions::from_mode(0o711))?;
    let keys_dir = config.signing_keys_dir();
    let (key, _) = Signer::open_configured(&config)
        .with_context(|| format!("opening the signing key ring in {}", keys_dir.display()))?;
    let keyid = key.current().context("the signing key")?.key.keyid();
    let images = Images::open(state).context("preparing images")?;
    let image = images
        .resolve(&config.worker.image)
        .with_context(|| format!("the worker's image {:?}", config.worker.image))?;
    // Each tree is hashed and checked against its record now, as the default image's.
    let offered = resolve_offered(&images, &config.worker.images)?;
    // What the engine matches actions against: an action that names one of these
    // images goes to a worker that offers it (when the engine matches on the key).
    let mut properties = vec![
        ("OSFamily".to_string(), "linux".to_string()),
        ("ISA".to_string(), isa().to_string()),
    ];
    properties.extend(
        offered
            .iter()
            .map(|o| (CONTAINER_IMAGE.to_string(), o.entry.clone())),
    );
    let id_ranges = lease_id_ranges(&config)?;
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    // The key id tells apart two workers on one host, and names who signs.
    let worker_name = format!("{hostname}/{}", keyid.chars().take(16).collect::<String>());
    let bots = config.max_concurrent_jobs;
    let runner = Arc::new(
        ActionRunner::new(
            config.clone(),
            ActionIsolation {
                executor: Arc::new(SandboxExecutor::new(sandbox, host, bots)),
                id_ranges,
            },
            key,
            image,
            state.join("actions"),
            worker_name.clone(),
        )?
        .with_offered_images(offered),
    );
    let shutdown = shutdown_signal()?;
    let channel = crate::cli::action_cache::connect(&args.scheduler).await?;
    let cas = CasClient::connect(channel.clone(), &args.instance).await?;
    tracing::info!(worker = %worker_name, %keyid, bots, scheduler = %args.scheduler, "kiln worker starting");
    let (stop_tx, stop_rx) = watch::channel(false);
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for slot in 0..bots {
        let bot = Bot {
            bot_id: format!("{worker_name}/bot-{slot}"),
            instance: args.instance.clone(),
            properties: properties.clone(),
            runner: runner.clone(),
            cas: cas.clone(),
            channel: channel.clone(),
        };
        tasks.spawn(bot.run(stop_rx.clone(), cancel_rx.clone()));
    }
    let grace = Duration::from_secs(config.shutdown_grace_seconds);
    let mut failed = None;
    tokio::select! {
        () = shutdown => {}
        Some(ended) = tasks.join_next() => {
            failed = Some(match ended {
                Ok(Ok(())) => anyhow::anyhow!("a bot stopped"),
                Ok(Err(err)) => anyhow::Error::from(err),
                Err(err) => anyhow::anyhow!("a bot failed: {err}"),
            });
        }
    }
    tracing::info!(
        grace_seconds = grace.as_secs(),
        "stopping: no new action starts; running ones may finish within the grace period"
    );
    let _ = stop_tx.send(true);
    let cancel_later = tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        let _ = cancel_tx.send(true);
        // Kept until the bots end: a dropped sender reads as a cancel.
        std::future::pending::<()>().await;
    });
    while let Some(ended) = tasks.join_next().await {
        match ended {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(error = %err, "a bot ended with an error"),
            Err(err) => tracing::warn!(error = %err, "a bot failed"),
        }
    }
    cancel_later.abort();
    tracing::info!("stopped");
    match failed {
        Some(err) => Err(err),
        None => Ok(()),
    }
}
