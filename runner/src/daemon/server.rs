//! `kiln serve`: the daemon. Checks the host can sandbox, opens the state
//! directory, and serves kiln.v1 (plus health and reflection) on every listener: Unix
//! sockets, and TCP with mutual TLS.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use agent_proto::v1::attestations_server::AttestationsServer;
use agent_proto::v1::content_store_server::ContentStoreServer;
use agent_proto::v1::jobs_server::JobsServer;
use anyhow::{bail, Context};
use sandbox::{HostSupport, Sandbox};
use tokio::net::{TcpListener, UnixListener};

use crate::api::audit::AuditedAuthenticator;
use crate::api::auth::Authenticator;
use crate::api::service::Service;
use crate::config::{Config, Listener, UnixListen};
use crate::daemon::listener::{ConnectionLimits, Listeners};
use crate::daemon::metrics::Metrics;
use crate::daemon::tls::{self, ReloadingConfig};
use crate::engine::bus::Bus;
use crate::engine::executor::SandboxExecutor;
use crate::engine::idranges::{self, IdRanges};
use crate::engine::jobs::{Isolation, Runner};
use crate::engine::signer::{RingOrigin, Signer};
use crate::images::Images;
use crate::store::audit::{AuditLog, Record};
use crate::store::cas::ContentStore;
use crate::store::db::{Creation, Database};

pub async fn serve(config: Config, creation: Creation) -> anyhow::Result<()> {
    config.validate()?;
    let listeners = config.listeners()?;
    if !nix::unistd::geteuid().is_root() {
        bail!("kiln serve must run as root: it creates user namespaces with mapped id ranges and mounts");
    }
    let (host, sandbox) = check_host(&config)?;
    raise_fd_limit(config.max_connections);
    let State {
        key,
        keyid,
        db,
        cas,
        images,
    } = open_state(&config, creation)?;
    let id_ranges = lease_id_ranges(&config)?;
    let bus = Arc::new(Bus::default());
    let audit = open_audit(&config)?;
    bus.subscribe(audit.clone());
    // Counted from the database before the runner's recovery changes any job's state.
    let metrics = start_metrics(&config, &db, &audit, &bus).await?;
    let runner = Runner::new(
        config.clone(),
        db,
        cas,
        images,
        key,
        Isolation {
            executor: Arc::new(SandboxExecutor::new(
                sandbox,
                host.clone(),
                config.max_concurrent_jobs,
            )),
            id_ranges,
        },
        bus,
    )?;
    tracing::info!(
        %keyid,
        landlock_abi = host.landlock_abi,
        cgroup = %host.cgroup.mode,
        state_dir = %config.state_dir.display(),
        "kiln daemon starting"
    );
    let scheduler = tokio::spawn(runner.clone().schedule());

    // Watch for SIGTERM before the socket exists: a supervisor that sees the socket may
    // stop the daemon at once, and that must drain, not kill.
    let shutdown = stop_at_signal(runner.clone(), config.shutdown_grace_seconds)?;
    let bound = bind_all(&listeners).await?;
    let reloads = tls::watch(
        bound
            .iter()
            .filter_map(|b| match b {
                Bound::Tls(_, config) => Some(config.clone()),
                Bound::Unix(..) => None,
            })
            .collect(),
        audit_reloads(audit.clone()),
    )?;
    if let Some((metrics, listener)) = metrics {
        metrics.set_tls_handshake_failures_source(Box::new(tls::tls_handshake_failures));
        tokio::spawn(crate::daemon::metrics::serve(listener, metrics));
    }
    let checkpoints = tokio::spawn(checkpoint_audit(
        audit.clone(),
        config.audit_checkpoint_seconds,
    ));
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let database_watch = tokio::spawn(watch_database(runner.db.clone(), health_reporter.clone()));
    let result = serve_grpc(
        &config,
        &runner,
        &audit,
        bound,
        &health_reporter,
        health_service,
        shutdown,
    )
    .await;
    reloads.abort();
    health_reporter
        .set_not_serving::<JobsServer<Service>>()
        .await;
    tracing::info!("draining: waiting for running jobs to finish");
    runner.drain().await;
    scheduler.abort();
    database_watch.abort();
    checkpoints.abort();
    // What the drain recorded is signed before the daemon exits.
    let closing = audit.clone();
    if let Ok(Err(err)) = tokio::task::spawn_blocking(move || closing.checkpoint()).await {
        tracing::error!(error = %err, "could not write the closing audit checkpoint");
    }
    for listener in &listeners {
        if let Listener::Unix(unix) = listener {
            let _ = fs::remove_file(&unix.path);
        }
    }
    tracing::info!("stopped");
    result
}

/// Records every TLS reload in the audit log: a certificate or CA change decides who
/// may connect.
fn audit_reloads(audit: Arc<AuditLog>) -> tls::OnReload {
    Arc::new(move |listener, outcome| {
        let reason = match outcome {
            Ok(()) => "reloaded the TLS certificate, key and client CA".to_string(),
            Err(err) => format!("failed, the listener keeps its files: {err}"),
        };
        let record = Record::daemon("config.reload", &format!("listener:{listener}"), &reason);
        if let Err(err) = audit.append(record) {
            tracing::error!(error = %err, "could not audit a TLS reload");
        }
    })
}

/// Checks the host can set up every sandbox layer (failing closed unless the config
/// waives a layer), tunes what only speeds steps up, and makes the sandbox launcher.
pub(crate) fn check_host(config: &Config) -> anyhow::Result<(HostSupport, Sandbox)> {
    // Fail closed: a host that cannot set up every sandbox layer runs no job, unless the
    // config explicitly waives that layer. This also compiles the seccomp policy, once.
    let host =
        Sandbox::probe_with_waivers(&config.waive).context("this host cannot sandbox steps")?;
    for layer in &host.waived_layers {
        tracing::warn!(layer = %layer, "host lacks a sandbox layer; waived by the config, recorded in every link");
    }
    for layer in config
        .waive
        .iter()
        .filter(|l| !host.waived_layers.contains(l))
    {
        tracing::info!(layer = %layer, "waiver not needed: the host has this layer, which is applied");
    }
    if config.cgroup_favordynmods {
        // Speed only, not isolation: a host where it cannot be set still runs steps.
        match sandbox::cgroup::favor_dynamic_migrations() {
            Ok(sandbox::cgroup::Favordynmods::Enabled(at)) => tracing::info!(
                mount = %at.display(),
                "turned on the cgroup2 option favordynmods (cgroup_favordynmods in the config)"
            ),
            Ok(sandbox::cgroup::Favordynmods::AlreadyOn) => {}
            Ok(sandbox::cgroup::Favordynmods::NoCgroup2) => tracing::warn!(
                "no cgroup2 mount to set favordynmods on: each step start may wait for an RCU grace period"
            ),
            Err(err) => tracing::warn!(
                error = %err,
                "could not turn on favordynmods: each step start may wait for an RCU grace period"
            ),
        }
    }
    if !proc_hides_pids() {
        tracing::warn!(
            "/proc is mounted without hidepid: every host user can read each step's command \
             line (and the sandbox's mount table); on a shared host remount /proc with \
             hidepid=invisible, and pass secrets in a step's environment, never its argv"
        );
    }
    if let Some(leaf) = &host.cgroup.moved_to {
        tracing::info!(
            leaf = %leaf.display(),
            "at the root of a cgroup namespace (a container): moved its processes into a leaf, so that steps' cgroups get controllers"
        );
    }
    let stale = host.cgroup.remove_stale();
    if stale > 0 {
        tracing::info!(
            removed = stale,
            "removed step cgroups left by killed supervisors"
        );
    }
    // Re-executing /proc/self/exe runs this daemon's own binary even after the
    // file on disk is replaced by an upgrade, so steps never run a newer init
    // that speaks another protocol.
    let init_exe = std::path::PathBuf::from("/proc/self/exe");
    if !init_exe.exists() {
        bail!("/proc/self/exe is missing: /proc must be mounted to start sandboxes");
    }
    let sandbox = Sandbox::new(init_exe);
    Ok((host, sandbox))
}

/// The daemon's durable state, opened.
struct State {
    key: Signer,
    keyid: String,
    db: Database,
    cas: ContentStore,
    images: Images,
}

/// Opens the state directory private to root: the key ring, the job database, the
/// content store and the images.
fn open_state(config: &Config, creation: Creation) -> anyhow::Result<State> {
    // Nothing the daemon creates is for other host users: job records, blobs and logs
    // hold clients' sources, environments and outputs. What a sandbox must reach is
    // opened up explicitly, and each step sets its own umask.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let state = &config.state_dir;
    fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
    // Traversable but not listable: sandbox bind sources (images, workspaces) live below.
    fs::set_permissions(state, fs::Permissions::from_mode(0o711))?;
    let keys_dir = config.signing_keys_dir();
    // The ring refuses key files another user owns or could read, naming the file.
    let (key, origin) = Signer::open_configured(config)
        .with_context(|| format!("opening the signing key ring in {}", keys_dir.display()))?;
    let current = key.current().context("the signing key")?.key;
    let keyid = current.keyid();
    if current.key_type() != config.key_type {
        // key_type only chooses new keys: an existing ring keeps signing as it is.
        tracing::warn!(
            %keyid,
            current_type = %current.key_type(),
            key_type = %config.key_type,
            "the ring's current key is not of the configured key_type; `kiln keys rotate --config` makes one that is"
        );
    }
    match origin {
        RingOrigin::Created => {
            tracing::info!(%keyid, key_type = %config.key_type, "created a key ring")
        }
        RingOrigin::Migrated => {
            tracing::info!(%keyid, "moved keys/runner.pem into a key ring, keeping its key id")
        }
        RingOrigin::Existing => {}
    }
    let db = Database::open(state, creation)
        .context("opening the job database")?
        .with_queue_limit(config.max_queued_jobs);
    let cas = ContentStore::open(state.join("cas"))
        .context("opening the content store")?
        .with_reserve(config.state_reserve.0);
    let images = Images::open(state).context("preparing images")?;
    Ok(State {
        key,
        keyid,
        db,
        cas,
        images,
    })
}

pub(crate) fn lease_id_ranges(config: &Config) -> anyhow::Result<IdRanges> {
    // Host ids no other Kiln daemon on this host uses while this one runs.
    let id_ranges = IdRanges::lease(
        Path::new(idranges::LOCK_DIR),
        config.uid_base,
        config.id_range,
        config.max_concurrent_jobs,
    )
    .context("leasing host id ranges for the sandboxes")?;
    tracing::info!(
        first = id_ranges.bases().first().copied().unwrap_or_default(),
        last = id_ranges.bases().last().copied().unwrap_or_default() + (config.id_range - 1),
        slots = id_ranges.bases().len(),
        "host id ranges leased"
    );
    Ok(id_ranges)
}

/// Resolves at SIGTERM or SIGINT, having stopped the start of queued jobs; running
/// ones get `grace_seconds`, then are cancelled with the reason recorded. The signal
/// handlers are installed when this is called.
fn stop_at_signal(
    runner: Arc<Runner>,
    grace_seconds: u64,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let signal = shutdown_signal()?;
    let grace = std::time::Duration::from_secs(grace_seconds);
    Ok(async move {
        signal.await;
        runner.stop_starting();
        crate::daemon::systemd::stopping();
        tracing::info!(
            grace_seconds = grace.as_secs(),
            "stopping: no queued job starts; running jobs may finish within the grace period"
        );
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            runner.cancel_all_running(&format!(
                "cancelled: the daemon shut down, and the job ran past the {} s grace period",
                grace.as_secs()
            ));
        });
    })
}

/// A listener, bound.
enum Bound {
    Unix(UnixListen, UnixListener),
    Tls(TcpListener, Arc<ReloadingConfig>),
}

/// Binds every listener, loading each TCP listener's certificate, key and client CA; a
/// listener that cannot be set up stops the start, naming it.
async fn bind_all(listeners: &[Listener]) -> anyhow::Result<Vec<Bound>> {
    let mut bound = Vec::with_capacity(listeners.len());
    for listener in listeners {
        bound.push(match listener {
            Listener::Unix(unix) => Bound::Unix(
                unix.clone(),
                bind_socket(unix).with_context(|| format!("listener {}", unix.name))?,
            ),
            Listener::Tls(listen) => {
                let config = ReloadingConfig::load(listen)
                    .with_context(|| format!("listener {}: TLS files", listen.name))?;
                let tcp = TcpListener::bind(listen.address).await.with_context(|| {
                    format!("listener {}: binding {}", listen.name, listen.address)
                })?;
                Bound::Tls(tcp, config)
            }
        });
    }
    Ok(bound)
}

/// Serves kiln.v1, health and reflection on every listener until `shutdown` resolves
/// and every stream has ended.
async fn serve_grpc(
    config: &Config,
    runner: &Arc<Runner>,
    audit: &Arc<AuditLog>,
    bound: Vec<Bound>,
    health_reporter: &tonic_health::server::HealthReporter,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let service = Service {
        runner: runner.clone(),
        audit: audit.clone(),
    };
    health_reporter.set_serving::<JobsServer<Service>>().await;
    health_reporter
        .set_serving::<ContentStoreServer<Service>>()
        .await;
    health_reporter
        .set_serving::<AttestationsServer<Service>>()
        .await;
    // Reflection in both versions clients speak today (grpcurl: v1; grpcio: v1alpha).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(agent_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection_v1, reflection_v1alpha) = (
        reflection().build_v1().context("building reflection")?,
        reflection()
            .build_v1alpha()
            .context("building reflection")?,
    );

    // The largest request the daemon decodes: a Submit of the largest spec allowed (its
    // own check names max_spec_bytes), and never less than gRPC's usual 4 MiB, which
    // clients' upload chunks are sized for.
    let max_request =
        usize::try_from(config.max_spec_bytes.0.max(4 << 20) + (64 << 10)).unwrap_or(usize::MAX);
    let router = tonic::transport::Server::builder()
        // A peer that stops answering pings is gone: its connection is closed.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(
            config.connection_keepalive_seconds,
        )))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        // One identity per request, resolved before any service sees it.
        .layer(tonic::service::InterceptorLayer::new(
            AuditedAuthenticator::new(
                Authenticator::new(&config.admin_uids, &config.tenants),
                audit.clone(),
            ),
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(JobsServer::new(service.clone()).max_decoding_message_size(max_request))
        .add_service(
            ContentStoreServer::new(service.clone()).max_decoding_message_size(max_request),
        )
        .add_service(AttestationsServer::new(service).max_decoding_message_size(max_request));

    // Every listener serves the same services, and all stop together.
    let listeners = Listeners::new(connection_limits(config));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stop_signal = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let mut servers = tokio::task::JoinSet::new();
    for listener in bound {
        let router = router.clone();
        let stop_signal = stop_signal();
        match listener {
            Bound::Unix(unix, socket) => {
                tracing::info!(listener = %unix.name, socket = %unix.path.display(), "listening");
                let incoming = listeners.unix(socket);
                servers.spawn(async move {
                    router
                        .serve_with_incoming_shutdown(incoming, stop_signal)
                        .await
                        .with_context(|| format!("serving gRPC on {}", unix.name))
                });
            }
            Bound::Tls(tcp, tls) => {
                let address = tcp.local_addr()?;
                tracing::info!(listener = %tls.name(), %address, "listening (TLS 1.3, client certificates required)");
                let name = tls.name().to_string();
                let incoming = listeners.tls(tcp, tls);
                servers.spawn(async move {
                    router
                        .serve_with_incoming_shutdown(incoming, stop_signal)
                        .await
                        .with_context(|| format!("serving gRPC on {name}"))
                });
            }
        }
    }
    // Every listener is bound (the sockets, TCP, the metrics endpoint): systemd may start
    // what depends on the daemon.
    crate::daemon::systemd::ready();
    until_stopped(servers, stop, shutdown).await
}

/// Serves until `shutdown`, or until one listener fails (then the daemon stops: it must
/// not run on a subset silently); then stops every listener and waits for them.
async fn until_stopped(
    mut servers: tokio::task::JoinSet<anyhow::Result<()>>,
    stop: tokio::sync::watch::Sender<bool>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let mut result = Ok(());
    tokio::select! {
        () = shutdown => {}
        Some(ended) = servers.join_next() => {
            result = ended.context("a listener's server task")?;
            if result.is_ok() {
                result = Err(anyhow::anyhow!("a listener stopped serving"));
            }
        }
    }
    let _ = stop.send(true);
    while let Some(ended) = servers.join_next().await {
        let ended = ended.context("a listener's server task")?;
        if result.is_ok() {
            result = ended;
        }
    }
    result
}

/// The caps on connections, shared by every listener.
fn connection_limits(config: &Config) -> ConnectionLimits {
    ConnectionLimits {
        max_connections: config.max_connections,
        max_per_client: config.max_connections_per_client,
        handshake_timeout: std::time::Duration::from_secs(
            config.connection_handshake_timeout_seconds,
        ),
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard one: every connection is a descriptor,
/// and running out of them makes accept fail. Warns when even that is short of room for
/// `max_connections` and the daemon's own files.
fn raise_fd_limit(max_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard {
        if let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!(error = %err, "could not raise RLIMIT_NOFILE");
        }
    }
    let limit = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(now, _)| now);
    let wanted = max_connections as u64 + 256;
    if limit < wanted {
        tracing::warn!(
            limit,
            max_connections,
            "RLIMIT_NOFILE leaves little room beside max_connections: accept may fail under load (it backs off)"
        );
    }
}

/// Whether the host's /proc hides other users' processes (hidepid=1/2/noaccess/invisible).
fn proc_hides_pids() -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|mounts| {
            mounts.lines().any(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                fields.get(4) == Some(&"/proc")
                    && line.contains("hidepid=")
                    && !line.contains("hidepid=0")
                    && !line.contains("hidepid=off")
            })
        })
        .unwrap_or(false)
}

fn bind_socket(unix: &UnixListen) -> anyhow::Result<UnixListener> {
    let socket = &unix.path;
    if let Some(dir) = socket.parent() {
        if !dir.exists() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            // Created under the daemon's umask 077: the socket's group must get through.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o711))?;
        }
    }
    remove_stale_socket(socket)?;
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    // The group first: while the mode opens to the group it is already the right one.
    if let Some(gid) = unix.gid {
        std::os::unix::fs::chown(socket, None, Some(gid))?;
    }
    fs::set_permissions(socket, fs::Permissions::from_mode(unix.mode))?;
    Ok(listener)
}

/// A socket file left by a daemon that died is replaced; one that answers is not.
fn remove_stale_socket(socket: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match fs::symlink_metadata(socket) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                bail!("another daemon is listening on {}", socket.display());
            }
            fs::remove_file(socket)?;
            Ok(())
        }
        Ok(_) => bail!("{} exists and is not a socket", socket.display()),
        Err(_) => Ok(()),
    }
}

/// Notices, within seconds, that the job database file was removed or replaced: says so
/// loudly and reports the Jobs service not serving (Submit refuses on its own check).
async fn watch_database(db: Database, health: tonic_health::server::HealthReporter) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        tick.tick().await;
        let db = db.clone();
        if let Ok(Err(err)) = tokio::task::spawn_blocking(move || db.check_file()).await {
            tracing::error!(error = %err, "THE JOB DATABASE IS GONE: jobs are refused");
            health.set_not_serving::<JobsServer<Service>>().await;
            return;
        }
    }
}

/// Resolves at SIGTERM or SIGINT; the handlers are installed when this is called.
pub(crate) fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("watching SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("watching SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = interrupt.recv() => tracing::info!("interrupt received"),
        }
    })
}

/// Opens the audit log and records the configuration the daemon starts with, signed by a
/// checkpoint at once (which also records a key rotation made while it was stopped).
fn open_audit(config: &Config) -> anyhow::Result<Arc<AuditLog>> {
    let keys_dir = config.signing_keys_dir();
    let (signer, _) = Signer::open_configured(config).with_context(|| {
        format!(
            "opening the key ring in {} for the audit log",
            keys_dir.display()
        )
    })?;
    let audit = AuditLog::open(
        &config.state_dir,
        signer,
        config.audit_checkpoint_entries,
        std::time::Duration::from_secs(config.audit_checkpoint_seconds),
    )
    .context("opening the audit log")?;
    let reason = match &config.source_sha256 {
        Some(digest) => format!("configuration file sha256:{digest}"),
        None => "built-in defaults (no configuration file)".into(),
    };
    audit
        .append(Record::daemon("config.load", "config", &reason))
        .context("writing the audit log")?;
    audit.checkpoint().context("signing the audit log")?;
    Ok(Arc::new(audit))
}

/// Signs the audit log's recent entries every `seconds`, so that few stay unsigned.
async fn checkpoint_audit(audit: Arc<AuditLog>, seconds: u64) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(seconds));
    loop {
        tick.tick().await;
        let audit = audit.clone();
        if let Ok(Err(err)) = tokio::task::spawn_blocking(move || audit.checkpoint_if_due()).await {
            tracing::error!(error = %err, "could not write an audit checkpoint");
        }
    }
}

/// With `metrics_listen`: the metrics, observing the engine from the jobs the database
/// holds, and their endpoint, bound.
async fn start_metrics(
    config: &Config,
    db: &Database,
    audit: &Arc<AuditLog>,
    bus: &Bus,
) -> anyhow::Result<Option<(Arc<Metrics>, tokio::net::TcpListener)>> {
    let Some(addr) = config.metrics_listen else {
        return Ok(None);
    };
    let counts = db
        .count_by_owner_and_state()
        .context("counting jobs for the metrics")?;
    let metrics = Arc::new(Metrics::new(&counts));
    metrics.set_audit_source(audit.clone());
    metrics.set_cas_root(config.state_dir.join("cas"));
    bus.subscribe(metrics.clone());
    let listener = crate::daemon::metrics::bind(addr).await?;
    tracing::info!(%addr, "serving metrics at /metrics");
    Ok(Some((metrics, listener)))
}
