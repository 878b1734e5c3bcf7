//! The daemon's configuration: a TOML file with strict validation (unknown keys are
//! errors), overridden by command-line flags.

use std::path::{Path, PathBuf};

use provenance::keys::KeyType;
use serde::Deserialize;
use sha2::Digest;

use crate::error::{Result, RunnerError};

mod listen;
pub use crate::tenants::{TenantConfig, Tenants};
use crate::units::{format_cpus, host_cpu_millis, Cpus, Size};
pub use listen::{Listen, Listener, SocketMode, TlsListen, UnixListen};

pub const DEFAULT_SOCKET: &str = "/run/kiln/kiln.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kiln";
/// Highest `max_outputs`: the listing of that many short paths still fits the 4 MiB a
/// client decodes (longer listings are refused by size as well, see engine/workspace.rs).
const MAX_OUTPUTS_CEILING: u64 = 20_000;
/// Highest `max_workspace_entries`: the link of a step lists every file twice
/// (materials and products), and its size grows with them.
const MAX_WORKSPACE_ENTRIES_CEILING: u64 = 1_000_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Unix socket the daemon listens on (mode 0660) when no `[[listen]]` is given.
    pub socket: PathBuf,
    /// Where the daemon listens: Unix sockets and TLS listeners on TCP. Empty: the one
    /// Unix socket `socket`.
    pub listen: Vec<Listen>,
    /// Content store, job database, images, workspaces and the signing key.
    pub state_dir: PathBuf,
    /// A read-only signing key ring in this directory instead of `<state_dir>/keys`,
    /// such as a Kubernetes Secret volume: never created, migrated or rotated by Kiln
    /// (a missing ring is an error), its symlinks followed only inside it, its files
    /// root's (see `provenance::keyring::KeyRing::open_read_only`).
    pub keys_dir: Option<PathBuf>,
    /// Jobs that run at the same time; more are queued.
    pub max_concurrent_jobs: u32,
    /// Step timeout when the job gives none.
    pub default_timeout_seconds: u32,
    /// The longest timeout a job may ask for.
    pub max_timeout_seconds: u32,
    /// First host uid/gid of the sandboxes' id ranges. Concurrent sandboxes get
    /// disjoint ranges of `id_range` ids each, the first free ones from here on: a
    /// range another Kiln daemon on the host holds is skipped (see `idranges`).
    pub uid_base: u32,
    /// Size of one sandbox's id range.
    pub id_range: u32,
    /// Size of each step's /tmp, in MiB.
    pub tmp_size_mib: u64,
    /// Bytes of stdout and of stderr kept in a step's link (the full log is hashed).
    pub link_log_bytes: usize,
    /// Bytes of each of a step's stdout and stderr stored (content store) and streamed
    /// to clients; beyond it the stream is drained and hashed, not kept.
    pub max_log_bytes: u64,
    /// The same over all the streams of all the steps of a job.
    pub max_job_log_bytes: Size,
    /// Bytes of step output the daemon holds in memory for Watch, shared by the running
    /// jobs; a client further behind gets the rest from the stored logs.
    pub max_event_memory: Size,
    /// Jobs waiting to run; a Submit beyond it is refused (RESOURCE_EXHAUSTED).
    pub max_queued_jobs: u64,
    /// Inputs of one job.
    pub max_inputs: usize,
    /// A job spec's encoded size; also sets the largest gRPC message the daemon reads.
    pub max_spec_bytes: Size,
    /// The largest blob a client may upload (ContentStore.Write).
    pub max_blob_size: Size,
    /// Group allowed to use the socket (numeric gid); none keeps it root-only.
    pub socket_gid: Option<u32>,
    /// After SIGTERM, how long running jobs may go on before they are cancelled (the
    /// reason is recorded). Queued jobs never start after SIGTERM; they run after the
    /// next start.
    pub shutdown_grace_seconds: u64,
    /// Connections to the socket open at once, all clients together ...
    pub max_connections: usize,
    /// ... and from one client (peer uid): a client flooding the socket cannot lock
    /// others out.
    pub max_connections_per_client: usize,
    /// Seconds a new connection has to start speaking HTTP/2 before it is closed.
    pub connection_handshake_timeout_seconds: u64,
    /// Seconds between HTTP/2 pings on a connection; a peer that does not answer one
    /// within 20 s is gone and its connection is closed.
    pub connection_keepalive_seconds: u64,
    /// Free space of the state directory's filesystem that uploads, logs and outputs
    /// may not take: kept so that job records and failures can always be written when
    /// the disk fills up (below it: RESOURCE_EXHAUSTED, and jobs fail with the reason).
    pub state_reserve: Size,
    /// Uids of operators: like root, they see and may cancel every client's jobs and
    /// read every blob. Any other client sees only its own.
    pub admin_uids: Vec<u32>,
    /// The builder id in SLSA provenance (default: `kiln://<hostname>`).
    pub builder_id: Option<String>,
    /// The type of the signing keys the daemon creates (a new ring) and `kiln keys
    /// rotate --config` rotates to: "ed25519" or "ecdsa-p256". A ring keeps the public
    /// keys of both types across rotations.
    #[serde(deserialize_with = "deserialize_key_type")]
    pub key_type: KeyType,
    /// The daemon's log lines on stderr: "text" (for people) or "json" (one JSON object
    /// a line, for log collectors).
    pub log_format: LogFormat,
    /// Address of the Prometheus endpoint (`GET /metrics`, unauthenticated: keep it on
    /// loopback or a monitoring network); none serves no metrics.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The audit log is checkpointed (signed) after this many entries ...
    pub audit_checkpoint_entries: u64,
    /// ... or this many seconds after the last checkpoint, whichever comes first.
    pub audit_checkpoint_seconds: u64,
    /// SHA-256 of the configuration file as read (none: the defaults), for the audit log.
    #[serde(skip)]
    pub source_sha256: Option<String>,
    /// Memory of a step when the job gives none (cgroup limit, no swap), e.g. "4G".
    pub default_memory: Size,
    /// The most memory a job may ask for.
    pub max_memory: Size,
    /// Tasks (processes and threads) of a step when the job gives none.
    pub default_pids: u32,
    pub max_pids: u32,
    /// CPUs of a step when the job gives none (e.g. 1.5); default: the host's CPU count.
    pub default_cpus: Cpus,
    pub max_cpus: Cpus,
    /// Workspace quota while a step runs when the job gives none, e.g. "4G". The
    /// workspace is a tmpfs: it lives in RAM (and swap).
    pub default_disk: Size,
    pub max_disk: Size,
    /// RLIMIT_NOFILE of every step.
    pub nofile: u64,
    /// RLIMIT_FSIZE of every step: the largest file a step may write.
    pub max_file_size: Size,
    /// Total bytes of a job's declared outputs; a job producing more fails.
    pub max_outputs_size: Size,
    /// Files a job's declared outputs may hold; a job producing more fails (the list of
    /// outputs is part of every answer about the job).
    pub max_outputs: u64,
    /// Entries (files, directories, symlinks) a workspace may hold after a step; a step
    /// leaving more fails with limit reason `files` (its link records no products).
    pub max_workspace_entries: u64,
    /// Sandbox layers steps may run without when this host lacks them (only
    /// `"landlock"`). Without a waiver such a host makes `kiln serve` refuse to start; a
    /// waived layer is skipped only where missing and named in every signed link.
    pub waive: Vec<String>,
    /// Turn on the cgroup2 mount option `favordynmods` at start-up (host-wide, Linux
    /// 6.0+): moving a process between cgroups then no longer waits for an RCU grace
    /// period, which otherwise adds 7-17 ms to a step's start on an idle host.
    pub cgroup_favordynmods: bool,
    /// What steps' network allow-lists may name: each entry of a step's list must fall
    /// within one of these (allow-list syntax, plus `*:PORT` / `*:*` for anything).
    pub network_ceiling: Vec<String>,
    /// Per client (its uid on the socket, as a string key): a ceiling replacing
    /// `network_ceiling` for that client.
    pub network_ceiling_by_uid: std::collections::BTreeMap<String, Vec<String>>,
    /// Egress proxy limits per step: open connections at once ...
    pub proxy_max_connections: usize,
    /// ... bytes in both directions over the whole step ...
    pub proxy_max_bytes: Size,
    /// ... and seconds a connection may sit idle.
    pub proxy_idle_timeout_seconds: u64,
    /// `[tenants.NAME]`: groups of callers sharing their jobs and blobs, under their own
    /// ceilings. With none, every uid on the socket is a client of its own.
    pub tenants: Tenants,
    /// `[images]`: which images jobs may use.
    pub images: ImagesConfig,
    /// `[publish]`: where job outputs may be pushed, and with which credentials.
    pub publish: PublishConfig,
    /// `[worker]`: how `kiln worker` runs remote actions.
    pub worker: WorkerConfig,
}

/// The `[worker]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// The image a remote action runs in (an installed image's name or digest; `host`:
    /// the host's own system, read-only).
    #[serde(default = "default_worker_image")]
    pub image: String,
    /// The images an action may ask for with its `container-image` platform property,
    /// each pinned by digest (`docker://REPO@sha256:HEX`, `NAME@sha256:HEX` or
    /// `sha256:HEX`) and installed; each is advertised to the engine as written here.
    #[serde(default)]
    pub images: Vec<String>,
}

fn default_worker_image() -> String {
    "host".into()
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            image: default_worker_image(),
            images: Vec::new(),
        }
    }
}

/// The `[images]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesConfig {
    /// Images every job may use: names, `NAME@sha256:HEX`, or `sha256:HEX` digests (a
    /// manifest or tree digest). Absent: any installed image. A job naming another is
    /// refused at Submit (PERMISSION_DENIED); a tenant's `images` narrows it further.
    pub allowed: Option<crate::images::allow::ImageAllowList>,
    /// Registries (`HOST:PORT` or `HOST`) `kiln image pull --config` speaks to over plain
    /// HTTP, as Docker's `insecure-registries`; loopback ones always may.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
}

/// The `[publish]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishConfig {
    /// Repositories callers in no tenant may publish to (`REGISTRY/REPO` or
    /// `REGISTRY/PREFIX/*`); a tenant's own are its `publish`. None: no publishing.
    #[serde(default)]
    pub repositories: crate::registry::policy::RepositoryPatterns,
    /// A docker-style config.json with the daemon's registry credentials.
    pub auth_file: Option<PathBuf>,
    /// A publish that has not finished by then fails (and fails its job); the time spent
    /// waiting for a turn counts.
    #[serde(default = "default_publish_timeout")]
    pub timeout_seconds: u64,
    /// Publishes under way at once, over every client: each holds connections to a
    /// registry and streams from the content store; more wait their turn.
    #[serde(default = "default_publish_concurrency")]
    pub max_concurrent: u32,
}

fn default_publish_concurrency() -> u32 {
    4
}

fn default_publish_timeout() -> u64 {
    1800
}

impl Default for PublishConfig {
    fn default() -> Self {
        PublishConfig {
            repositories: Default::default(),
            auth_file: None,
            timeout_seconds: default_publish_timeout(),
            max_concurrent: default_publish_concurrency(),
        }
    }
}

/// `key_type = "..."`: an unknown name is an error naming the key and the choices.
fn deserialize_key_type<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<KeyType, D::Error> {
    let name = String::deserialize(deserializer)?;
    name.parse().map_err(|e: provenance::keys::UnknownKeyType| {
        serde::de::Error::custom(format!("key_type: {e}"))
    })
}

/// How the daemon writes its log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            listen: Vec::new(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            keys_dir: None,
            max_concurrent_jobs: 2,
            default_timeout_seconds: 600,
            max_timeout_seconds: 6 * 3600,
            uid_base: 200_000_000,
            id_range: 65_536,
            tmp_size_mib: 512,
            link_log_bytes: 64 * 1024,
            max_log_bytes: 64 * 1024 * 1024,
            max_job_log_bytes: Size(256 << 20),
            max_event_memory: Size(16 << 20),
            max_queued_jobs: 1000,
            max_inputs: 50_000,
            max_spec_bytes: Size(4 << 20),
            max_blob_size: Size(10 << 30),
            socket_gid: None,
            admin_uids: Vec::new(),
            state_reserve: Size(256 << 20),
            max_connections: 1024,
            max_connections_per_client: 128,
            connection_handshake_timeout_seconds: 10,
            connection_keepalive_seconds: 60,
            shutdown_grace_seconds: 600,
            builder_id: None,
            key_type: KeyType::Ed25519,
            log_format: LogFormat::Text,
            metrics_listen: None,
            audit_checkpoint_entries: 1000,
            audit_checkpoint_seconds: 60,
            source_sha256: None,
            default_memory: Size(4 << 30),
            max_memory: Size(8 << 30),
            default_pids: 1024,
            max_pids: 4096,
            default_cpus: Cpus(host_cpu_millis()),
            max_cpus: Cpus(host_cpu_millis()),
            default_disk: Size(4 << 30),
            max_disk: Size(10 << 30),
            nofile: 4096,
            max_file_size: Size(10 << 30),
            max_outputs_size: Size(2 << 30),
            max_outputs: 10_000,
            max_workspace_entries: 100_000,
            cgroup_favordynmods: true,
            network_ceiling: vec!["*:*".into()],
            network_ceiling_by_uid: Default::default(),
            proxy_max_connections: 64,
            proxy_max_bytes: Size(4 << 30),
            proxy_idle_timeout_seconds: 60,
            waive: Vec::new(),
            tenants: Tenants::default(),
            images: ImagesConfig::default(),
            publish: PublishConfig::default(),
            worker: WorkerConfig::default(),
        }
    }
}

/// Mode of a Unix socket whose entry gives none: owner and group read and write.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;

impl Config {
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let config = match path {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(RunnerError::io_path("reading config", path))?;
                let mut config: Config = toml::from_str(&text).map_err(|e| {
                    RunnerError::invalid(format!("config {}", path.display()), e.to_string())
                })?;
                config.source_sha256 = Some(hex::encode(sha2::Sha256::digest(text.as_bytes())));
                config
            }
        };
        Ok(config)
    }

    /// The directory of the signing key ring: `keys_dir` (read-only) or `<state_dir>/keys`.
    pub fn signing_keys_dir(&self) -> PathBuf {
        match &self.keys_dir {
            Some(dir) => dir.clone(),
            None => self.state_dir.join("keys"),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: &str| Err(RunnerError::invalid(field, reason));
        if self.max_concurrent_jobs == 0 || self.max_concurrent_jobs > 256 {
            return bad("max_concurrent_jobs", "must be 1 to 256");
        }
        if self.default_timeout_seconds == 0 {
            return bad("default_timeout_seconds", "must be positive");
        }
        if self.publish.max_concurrent == 0 || self.publish.max_concurrent > 64 {
            return bad("publish.max_concurrent", "must be 1 to 64");
        }
        if self.publish.timeout_seconds == 0 {
            return bad("publish.timeout_seconds", "must be positive");
        }
        if self.default_timeout_seconds > self.max_timeout_seconds {
            return bad(
                "default_timeout_seconds",
                "must not exceed max_timeout_seconds",
            );
        }
        if self.id_range < 2000 {
            return bad(
                "id_range",
                "must be at least 2000 (the build user is uid 1000)",
            );
        }
        if self.uid_base < 65_536 {
            return bad("uid_base", "must be at least 65536, away from host users");
        }
        let last = u64::from(self.uid_base)
            + u64::from(self.id_range) * u64::from(self.max_concurrent_jobs);
        if last >= u64::from(u32::MAX) {
            return bad("uid_base", "the id ranges run past the largest uid");
        }
        if self.tmp_size_mib == 0 {
            return bad("tmp_size_mib", "must be positive");
        }
        if self.audit_checkpoint_entries == 0 {
            return bad("audit_checkpoint_entries", "must be positive");
        }
        if self.audit_checkpoint_seconds == 0 {
            return bad("audit_checkpoint_seconds", "must be positive");
        }
        if !self.state_dir.is_absolute() {
            return bad("state_dir", "must be an absolute path");
        }
        for entry in &self.worker.images {
            crate::worker::image::ContainerImage::parse(entry).map_err(|e| {
                RunnerError::invalid(
                    "worker.images",
                    format!("entry {:?}: {e}", crate::cli::printable(entry)),
                )
            })?;
        }
        if self.keys_dir.as_ref().is_some_and(|d| !d.is_absolute()) {
            return bad("keys_dir", "must be an absolute path");
        }
        self.validate_waivers()?;
        self.validate_listeners()?;
        self.validate_network()?;
        self.validate_limits()?;
        self.validate_tenants()
    }

    /// A tenant's ceilings within the global ones (and at least what a job that names
    /// none gets), and no uid both a tenant's member and configured per uid elsewhere.
    fn validate_tenants(&self) -> Result<()> {
        for (name, tenant) in self.tenants.iter() {
            let key = |k: &str| format!("tenants.{name}.{k}");
            let caps: [(&str, Option<u64>, u64, &str, u64); 5] = [
                (
                    "max_memory",
                    tenant.max_memory.map(|s| s.0),
                    self.max_memory.0,
                    "default_memory",
                    self.default_memory.0,
                ),
                (
                    "max_pids",
                    tenant.max_pids.map(u64::from),
                    u64::from(self.max_pids),
                    "default_pids",
                    u64::from(self.default_pids),
                ),
                (
                    "max_cpus",
                    tenant.max_cpus.map(|c| u64::from(c.0)),
                    u64::from(self.max_cpus.0),
                    "default_cpus",
                    u64::from(self.default_cpus.0),
                ),
                (
                    "max_disk",
                    tenant.max_disk.map(|s| s.0),
                    self.max_disk.0,
                    "default_disk",
                    self.default_disk.0,
                ),
                (
                    "max_timeout_seconds",
                    tenant.max_timeout_seconds.map(u64::from),
                    u64::from(self.max_timeout_seconds),
                    "default_timeout_seconds",
                    u64::from(self.default_timeout_seconds),
                ),
            ];
            for (cap, value, global, default, default_value) in caps {
                let Some(value) = value else { continue };
                if value > global {
                    return Err(RunnerError::invalid(
                        key(cap),
                        format!("must not exceed the global {cap}"),
                    ));
                }
                // A step that names no limit gets the default, which must fit the cap.
                if value < default_value {
                    return Err(RunnerError::invalid(
                        key(cap),
                        format!("must be at least the global {default}"),
                    ));
                }
            }
            for uid in &tenant.uids {
                if self.network_ceiling_by_uid.contains_key(&uid.to_string()) {
                    return Err(RunnerError::invalid(
                        format!("network_ceiling_by_uid.{uid}"),
                        format!(
                            "uid {uid} is a member of tenant {name}: give its ceiling as \
                             tenants.{name}.network_ceiling instead"
                        ),
                    ));
                }
                if self.admin_uids.contains(uid) {
                    return Err(RunnerError::invalid(
                        "admin_uids",
                        format!(
                            "uid {uid} is also a member of tenant {name}: make the tenant \
                             an admin one (tenants.{name}.admin = true) or list the uid once"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_listeners(&self) -> Result<()> {
        if !self.listen.is_empty() && self.socket != Path::new(DEFAULT_SOCKET) {
            return Err(RunnerError::invalid(
                "socket",
                "is for a daemon without [[listen]]: with [[listen]], list the socket as a `unix` entry",
            ));
        }
        let listeners = self.listeners()?;
        for (i, listener) in listeners.iter().enumerate() {
            if listeners[..i]
                .iter()
                .any(|earlier| earlier.same_place(listener))
            {
                return Err(RunnerError::invalid(
                    format!("listen[{i}]"),
                    "listed twice: two listeners on the same socket or address",
                ));
            }
        }
        Ok(())
    }

    /// Every listener the daemon serves, validated: the `[[listen]]` entries, or else
    /// the one Unix socket `socket`.
    pub fn listeners(&self) -> Result<Vec<Listener>> {
        if self.listen.is_empty() {
            return Ok(vec![Listener::Unix(UnixListen {
                name: "socket".into(),
                path: self.socket.clone(),
                mode: DEFAULT_SOCKET_MODE,
                gid: self.socket_gid,
            })]);
        }
        self.listen
            .iter()
            .enumerate()
            .map(|(i, entry)| entry.validate(&format!("listen[{i}]")))
            .collect()
    }

    fn validate_network(&self) -> Result<()> {
        crate::egress::netpolicy::Ceiling::parse(&self.network_ceiling)
            .map_err(|e| RunnerError::invalid("network_ceiling", e.to_string()))?;
        for (uid, ceiling) in &self.network_ceiling_by_uid {
            if uid.parse::<u32>().is_err() {
                return Err(RunnerError::invalid(
                    "network_ceiling_by_uid",
                    format!("{uid:?} is not a numeric uid"),
                ));
            }
            crate::egress::netpolicy::Ceiling::parse(ceiling).map_err(|e| {
                RunnerError::invalid(format!("network_ceiling_by_uid.{uid}"), e.to_string())
            })?;
        }
        if self.proxy_max_connections == 0 || self.proxy_idle_timeout_seconds == 0 {
            return Err(RunnerError::invalid(
                "proxy_max_connections / proxy_idle_timeout_seconds",
                "must be positive",
            ));
        }
        Ok(())
    }

    /// The ceiling for a caller's allow-lists: its tenant's, else its uid's, else the
    /// global one.
    pub fn network_ceiling_of(
        &self,
        caller: &crate::api::auth::Principal,
    ) -> crate::egress::netpolicy::Ceiling {
        let tenant_ceiling = caller
            .tenant
            .as_deref()
            .and_then(|name| self.tenants.get(name))
            .and_then(|tenant| tenant.network_ceiling.clone());
        match tenant_ceiling {
            Some(ceiling) => ceiling,
            None => self.network_ceiling_for(caller.uid),
        }
    }

    /// Where `caller` may publish, and the configuration key that says so.
    pub fn publish_scope(
        &self,
        caller: &crate::api::auth::Principal,
    ) -> (&crate::registry::policy::RepositoryPatterns, String) {
        match caller
            .tenant
            .as_deref()
            .and_then(|name| self.tenants.get(name).map(|t| (name, t)))
        {
            Some((name, tenant)) => (&tenant.publish, format!("tenants.{name}.publish")),
            None => (&self.publish.repositories, "[publish] repositories".into()),
        }
    }

    /// The ceiling for a client's allow-lists (validated at start-up).
    pub fn network_ceiling_for(&self, peer_uid: Option<u32>) -> crate::egress::netpolicy::Ceiling {
        let entries = peer_uid
            .and_then(|uid| self.network_ceiling_by_uid.get(&uid.to_string()))
            .unwrap_or(&self.network_ceiling);
        // validate() parsed these at start-up; an unparsable list allows nothing.
        crate::egress::netpolicy::Ceiling::parse(entries).unwrap_or_default()
    }

    pub fn proxy_limits(&self) -> crate::egress::proxy::ProxyLimits {
        crate::egress::proxy::ProxyLimits {
            max_connections: self.proxy_max_connections,
            max_bytes: self.proxy_max_bytes.0,
            idle_timeout: std::time::Duration::from_secs(self.proxy_idle_timeout_seconds),
            ..Default::default()
        }
    }

    fn validate_waivers(&self) -> Result<()> {
        for (i, layer) in self.waive.iter().enumerate() {
            if !sandbox::WAIVABLE_LAYERS.contains(&layer.as_str()) {
                return Err(RunnerError::invalid(
                    "waive",
                    format!(
                        "{layer:?} is not a layer that can be waived (known: {})",
                        sandbox::WAIVABLE_LAYERS.join(", ")
                    ),
                ));
            }
            if self.waive[..i].contains(layer) {
                return Err(RunnerError::invalid(
                    "waive",
                    format!("{layer:?} listed twice"),
                ));
            }
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<()> {
        let bad = |field: &str, reason: String| Err(RunnerError::invalid(field, reason));
        let pairs: [(&str, &str, u64, u64, u64, String); 4] = [
            (
                "default_memory",
                "max_memory",
                self.default_memory.0,
                self.max_memory.0,
                sandbox::MIN_MEMORY_BYTES,
                crate::units::format_size(sandbox::MIN_MEMORY_BYTES),
            ),
            (
                "default_pids",
                "max_pids",
                u64::from(self.default_pids),
                u64::from(self.max_pids),
                u64::from(sandbox::MIN_PIDS),
                sandbox::MIN_PIDS.to_string(),
            ),
            (
                "default_cpus",
                "max_cpus",
                u64::from(self.default_cpus.0),
                u64::from(self.max_cpus.0),
                u64::from(sandbox::MIN_CPU_MILLIS),
                format_cpus(sandbox::MIN_CPU_MILLIS),
            ),
            (
                "default_disk",
                "max_disk",
                self.default_disk.0,
                self.max_disk.0,
                crate::units::MIN_DISK_BYTES,
                crate::units::format_size(crate::units::MIN_DISK_BYTES),
            ),
        ];
        for (default, max, d, m, min, min_text) in pairs {
            if d < min {
                return bad(default, format!("must be at least {min_text}"));
            }
            if d > m {
                return bad(default, format!("must not exceed {max}"));
            }
        }
        if self.nofile < sandbox::MIN_NOFILE {
            return bad(
                "nofile",
                format!("must be at least {}", sandbox::MIN_NOFILE),
            );
        }
        if self.max_file_size.0 == 0 {
            return bad("max_file_size", "must be positive".into());
        }
        if self.max_outputs_size.0 == 0 {
            return bad("max_outputs_size", "must be positive".into());
        }
        if !(1..=MAX_OUTPUTS_CEILING).contains(&self.max_outputs) {
            return bad("max_outputs", format!("must be 1 to {MAX_OUTPUTS_CEILING}"));
        }
        if !(1..=MAX_WORKSPACE_ENTRIES_CEILING).contains(&self.max_workspace_entries) {
            return bad(
                "max_workspace_entries",
                format!("must be 1 to {MAX_WORKSPACE_ENTRIES_CEILING}"),
            );
        }
        if self.max_connections == 0 || self.max_connections_per_client == 0 {
            return bad("max_connections", "must be positive".into());
        }
        if self.connection_handshake_timeout_seconds == 0 || self.connection_keepalive_seconds == 0
        {
            return bad(
                "connection_handshake_timeout_seconds",
                "timeouts must be positive".into(),
            );
        }
        if self.max_queued_jobs == 0 {
            return bad("max_queued_jobs", "must be positive".into());
        }
        if self.max_spec_bytes.0 < 64 << 10 || self.max_spec_bytes.0 > 256 << 20 {
            return bad("max_spec_bytes", "must be 64K to 256M".into());
        }
        if self.max_blob_size.0 == 0 {
            return bad("max_blob_size", "must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
