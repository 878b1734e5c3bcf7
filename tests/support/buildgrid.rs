//! BuildGrid, the remote-execution engine Kiln workers run under, on loopback for the
//! fleet tests: a PostgreSQL cluster of the test's own for its scheduler, then `bgd`
//! serving CAS, ByteStream, ActionCache, Execution, Bots and Capabilities. And Bazel, the
//! client, in a workspace of the test's own.
//!
//! The tools come from the test command (scripts/test): `KILN_BGD` (BuildGrid's `bgd` in
//! its venv), `KILN_PG_BIN` (the directory of PostgreSQL's `initdb` and `postgres`),
//! `KILN_BAZEL`. Outside CI a missing one skips the test, saying so; in CI it fails.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use bazel_remote_apis::build::bazel::remote::execution::v2::{
    capabilities_client::CapabilitiesClient, GetCapabilitiesRequest, ServerCapabilities,
};
use nix::sys::signal::{self, Signal};
use nix::unistd::{Pid, User};

use super::in_ci;

/// How long a cold start may take on a loaded machine before the fixture gives up
/// (BuildGrid imports a great deal of Python before it listens).
const START_DEADLINE: Duration = Duration::from_secs(180);

/// A tool the fixture needs: the file an environment variable names, or a fallback.
fn tool(test: &str, var: &str, fallback: Option<&str>, what: &str) -> Option<PathBuf> {
    let found = std::env::var_os(var)
        .map(PathBuf::from)
        .or_else(|| fallback.map(PathBuf::from))
        .filter(|path| path.exists());
    if found.is_none() {
        assert!(!in_ci(), "{test}: CI=true but {var} ({what}) is missing");
        eprintln!("SKIPPED: {test} needs {var}: {what} (run scripts/test)");
    }
    found
}

/// A free loopback port: taken from the kernel, released just before the server binds it.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Who runs PostgreSQL: it refuses to run as root, so as root the cluster belongs to an
/// unprivileged system user (Debian's `postgres`, or `nobody`); otherwise to the caller.
fn postgres_owner() -> Option<User> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    ["postgres", "nobody"]
        .into_iter()
        .find_map(|name| User::from_name(name).ok().flatten())
}

/// A command run as `owner` (through util-linux's setpriv), or as the caller.
fn command_as(owner: Option<&User>, program: &Path) -> Command {
    match owner {
        Some(user) => {
            let mut command = Command::new("setpriv");
            command
                .arg(format!("--reuid={}", user.uid))
                .arg(format!("--regid={}", user.gid))
                .arg("--clear-groups")
                .arg("--")
                .arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// A PostgreSQL cluster on 127.0.0.1 that exists for one test: its data directory and
/// socket directory in a temporary directory, one superuser `bgd` with a random password.
pub struct Postgres {
    pub port: u16,
    /// `postgresql://bgd:PASSWORD@127.0.0.1:PORT/postgres`, for SQLAlchemy.
    pub url: String,
    /// How long the server took from spawn to accepting connections (initdb not counted).
    pub started_in: Duration,
    root: PathBuf,
    child: Child,
}

impl Postgres {
    /// Initialises and starts a cluster under `dir` (which must exist and be traversable
    /// by the cluster's owner).
    fn start(test: &str, dir: &Path) -> Option<Postgres> {
        let bin = tool(
            test,
            "KILN_PG_BIN",
            Some("/usr/lib/postgresql/15/bin"),
            "the directory of PostgreSQL 15's initdb and postgres",
        )?;
        let owner = postgres_owner();
        let root = dir.join("postgres");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
        let password = hex::encode(rand_bytes());
        let password_file = root.join("password");
        std::fs::write(&password_file, format!("{password}\n")).unwrap();
        if let Some(user) = &owner {
            nix::unistd::chown(&root, Some(user.uid), Some(user.gid)).unwrap();
            nix::unistd::chown(&password_file, Some(user.uid), Some(user.gid)).unwrap();
        }
        let data = root.join("data");
        let init_log = root.join("initdb.log");
        let initdb = command_as(owner.as_ref(), &bin.join("initdb"))
            .arg("--pgdata")
            .arg(&data)
            .args(["--username=bgd", "--auth=scram-sha-256", "--encoding=UTF8"])
            .args(["--locale=C", "--no-sync"])
            .arg(format!("--pwfile={}", password_file.display()))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        std::fs::write(&init_log, [&initdb.stdout[..], &initdb.stderr[..]].concat()).unwrap();
        assert!(
            initdb.status.success(),
            "initdb failed ({}):\n{}",
            initdb.status,
            read_log(&init_log)
        );

        let port = free_port();
        let log = std::fs::File::create(root.join("postgres.log")).unwrap();
        let began = Instant::now();
        // Durability is not wanted of a cluster that lives for one test.
        let mut child = command_as(owner.as_ref(), &bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-k"])
            .arg(&root)
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = began + START_DEADLINE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "postgres exited ({status}):\n{}",
                    read_log(&root.join("postgres.log"))
                );
            }
            let ready = Command::new(bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                .status()
                .is_ok_and(|status| status.success());
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not accept connections:\n{}",
                read_log(&root.join("postgres.log"))
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Postgres {
            port,
            url: format!("postgresql://bgd:{password}@127.0.0.1:{port}/postgres"),
            started_in: began.elapsed(),
            root,
            child,
        })
    }

    pub fn log(&self) -> String {
        read_log(&self.root.join("postgres.log"))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT: PostgreSQL's fast shutdown, which ends its backends too.
        let _ = signal::kill(pid_of(&self.child), Signal::SIGINT);
        let _ = self.child.wait();
    }
}

fn pid_of(child: &Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).expect("pid fits pid_t"))
}

fn rand_bytes() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut file| std::io::Read::read_exact(&mut file, &mut bytes))
        .unwrap();
    bytes
}

/// BuildGrid's `bgd` on 127.0.0.1 with one instance, named "" (what Bazel and
/// `kiln worker` use without `--remote_instance_name`/`--instance`), whose scheduler keeps
/// its jobs and bot sessions in a [`Postgres`] of its own and whose CAS and action cache
/// live in memory.
pub struct BuildGrid {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// `grpc://127.0.0.1:PORT`: for Bazel's `--remote_cache`/`--remote_executor` and
    /// `kiln worker --scheduler`.
    pub url: String,
    /// The instance name served.
    pub instance: String,
    /// How long `bgd` took from spawn to answering GetCapabilities.
    pub started_in: Duration,
    /// What the server answered then.
    pub capabilities: ServerCapabilities,
    child: Child,
    // Dropped after the server: the scheduler's database, then the directory.
    postgres: Postgres,
    dir: tempfile::TempDir,
}

impl BuildGrid {
    /// None (and says so) outside CI when BuildGrid or PostgreSQL is not installed.
    pub fn start(test: &str) -> Option<BuildGrid> {
        Self::start_with(test, BuildGridOptions::default())
    }

    /// As [`BuildGrid::start`], with some of the scheduler's settings.
    pub fn start_with(test: &str, options: BuildGridOptions) -> Option<BuildGrid> {
        let bgd = tool(test, "KILN_BGD", None, "BuildGrid's bgd in its venv")?;
        let dir = tempfile::Builder::new()
            .prefix("kiln-buildgrid-")
            .tempdir()
            .unwrap();
        // Traversable (not listable) for the cluster's owner to reach its own directory.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let postgres = Postgres::start(test, dir.path())?;
        let state = dir.path().join("bgd");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        let log_path = state.join("bgd.log");

        // The scheduler's tables, as BuildGrid's own migrations make them.
        let migrate = Command::new(&bgd)
            .args(["migrate", "apply", &postgres.url])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            migrate.status.success(),
            "bgd migrate apply failed ({}):\n{}{}",
            migrate.status,
            super::text(&migrate.stdout),
            super::text(&migrate.stderr)
        );

        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = state.join("bgd.yml");
        std::fs::write(&config, config_yaml(&addr, &postgres.url, &options)).unwrap();
        let log = std::fs::File::create(&log_path).unwrap();
        let began = Instant::now();
        // Its own process group, so that Drop ends whatever it starts.
        let mut child = Command::new(&bgd)
            .arg("server")
            .arg("start")
            // INFO: sessions created, expired and closed, leases retried.
            .arg("-vv")
            .arg(&config)
            // Its log as it happens, not when a buffer fills.
            .env("PYTHONUNBUFFERED", "1")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let url = format!("grpc://{addr}");
        let deadline = began + START_DEADLINE;
        let capabilities = loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("bgd exited ({status}):\n{}", read_log(&log_path));
            }
            if let Ok(capabilities) = get_capabilities_blocking(&addr, "") {
                break capabilities;
            }
            assert!(
                Instant::now() < deadline,
                "bgd did not answer GetCapabilities:\n{}",
                read_log(&log_path)
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let started_in = began.elapsed();
        eprintln!(
            "{test}: PostgreSQL accepted connections after {:.2?}, BuildGrid answered after {:.2?}",
            postgres.started_in, started_in
        );
        Some(BuildGrid {
            addr,
            url,
            instance: String::new(),
            started_in,
            capabilities,
            child,
            postgres,
            dir,
        })
    }

    /// `http://127.0.0.1:PORT`, for a tonic channel.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.endpoint())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Uploads `blobs` (the action's Command, input root and files) and `action` to the
    /// CAS, then starts the action, skipping the cache: answers the operation stream.
    pub async fn execute(
        &self,
        action: &[u8],
        blobs: &[&[u8]],
    ) -> tonic::Streaming<bazel_remote_apis::google::longrunning::Operation> {
        use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
        let channel = self.channel().await;
        reapi::content_addressable_storage_client::ContentAddressableStorageClient::new(
            channel.clone(),
        )
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            instance_name: self.instance.clone(),
            requests: blobs
                .iter()
                .copied()
                .chain([action])
                .map(|blob| reapi::batch_update_blobs_request::Request {
                    digest: Some(digest_of(blob)),
                    data: blob.to_vec(),
                    compressor: 0,
                })
                .collect(),
            digest_function: 0,
        })
        .await
        .unwrap();
        reapi::execution_client::ExecutionClient::new(channel)
            .execute(reapi::ExecuteRequest {
                instance_name: self.instance.clone(),
                action_digest: Some(digest_of(action)),
                skip_cache_lookup: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// BuildGrid's log so far.
    pub fn log(&self) -> String {
        read_log(&self.dir.path().join("bgd/bgd.log"))
    }

    pub fn postgres(&self) -> &Postgres {
        &self.postgres
    }

    /// Whether `bgd` is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for BuildGrid {
    fn drop(&mut self) {
        let group = pid_of(&self.child);
        let _ = signal::killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// The scheduler settings a test may change.
#[derive(Clone, Debug)]
pub struct BuildGridOptions {
    /// How long a bot may stay silent before BuildGrid takes its leases back.
    pub bot_session_keepalive_timeout_secs: u32,
    /// Platform property keys an action may set that decide which worker takes it
    /// (BuildGrid always matches on OSFamily and ISA as well).
    pub match_property_keys: Vec<String>,
    /// Platform property keys an action may set that do not decide the worker.
    pub wildcard_property_keys: Vec<String>,
}

impl Default for BuildGridOptions {
    fn default() -> Self {
        BuildGridOptions {
            bot_session_keepalive_timeout_secs: 10,
            match_property_keys: Vec::new(),
            // The image a Kiln worker runs an action in.
            wildcard_property_keys: vec!["container-image".to_string()],
        }
    }
}

fn yaml_list(items: &[String]) -> String {
    serde_json::to_string(items).unwrap()
}

/// BuildGrid's server configuration (its reference: `buildgrid/server/app/settings/
/// reference.yml` in the package). The `!execution` service includes the Bots service.
fn config_yaml(addr: &str, database: &str, options: &BuildGridOptions) -> String {
    let address = serde_json::to_string(addr).unwrap();
    let database = serde_json::to_string(database).unwrap();
    let keepalive = options.bot_session_keepalive_timeout_secs;
    let match_keys = yaml_list(&options.match_property_keys);
    let wildcard_keys = yaml_list(&options.wildcard_property_keys);
    format!(
        r#"server:
  - !channel
    address: {address}
    insecure-mode: true
authorization:
  method: none
connections:
  - !sql-connection &database
    connection-string: {database}
    pool-size: 10
    max-overflow: 20
storages:
  - !lru-storage &cas
    size: 512MB
caches:
  - !lru-action-cache &action-cache
    storage: *cas
    max-cached-refs: 65536
    allow-updates: true
    cache-failed-actions: true
schedulers:
  - !sql-scheduler &scheduler
    sql: *database
    storage: *cas
    action-cache: *action-cache
    bot-session-keepalive-timeout: {keepalive}
    property-set: !dynamic-property-set
      match-property-keys: {match_keys}
      wildcard-property-keys: {wildcard_keys}
instances:
  - name: ""
    services:
      - !cas
        storage: *cas
      - !bytestream
        storage: *cas
      - !action-cache
        cache: *action-cache
      - !execution
        scheduler: *scheduler
"#
    )
}

/// One GetCapabilities call on a runtime of its own (on a thread of its own, so that it
/// may be called from inside a test's runtime too).
fn get_capabilities_blocking(
    addr: &str,
    instance: &str,
) -> Result<ServerCapabilities, tonic::Status> {
    let endpoint = format!("http://{addr}");
    let instance = instance.to_string();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let channel = tonic::transport::Endpoint::from_shared(endpoint)
                .unwrap()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(10))
                .connect()
                .await
                .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
            let answer = CapabilitiesClient::new(channel)
                .get_capabilities(GetCapabilitiesRequest {
                    instance_name: instance,
                })
                .await?;
            Ok(answer.into_inner())
        })
    })
    .join()
    .unwrap()
}

/// Debian's Bazel (bazel-bootstrap, 4.2.3) in a workspace of the test's own, run in batch
/// mode (no server left behind) with its output tree in a temporary directory. Offline:
/// only rules that need nothing fetched (genrules) build with it.
pub struct Bazel {
    pub bin: PathBuf,
    /// The workspace (with an empty WORKSPACE file).
    pub workspace: PathBuf,
    output_user_root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Bazel {
    /// None (and says so) outside CI when Bazel is not installed.
    pub fn new(test: &str) -> Option<Bazel> {
        let bin = tool(
            test,
            "KILN_BAZEL",
            Some("/usr/bin/bazel"),
            "Debian's bazel-bootstrap",
        )?;
        let dir = tempfile::Builder::new()
            .prefix("kiln-bazel-")
            .tempdir()
            .unwrap();
        let workspace = dir.path().join("workspace");
        std::fs::create_dir(&workspace).unwrap();
        std::fs::write(workspace.join("WORKSPACE"), "").unwrap();
        Some(Bazel {
            bin,
            workspace,
            output_user_root: dir.path().join("output"),
            _dir: dir,
        })
    }

    /// Writes a file of the workspace (a BUILD file, a source).
    pub fn write(&self, relative: &str, contents: &str) {
        let path = self.workspace.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(path, contents).unwrap();
    }

    /// `bazel build ARGS` in the workspace, with this workspace's own output tree.
    pub fn build(&self, args: &[&str]) -> Output {
        self.build_in(&self.output_user_root, args)
    }

    /// As [`Bazel::build`] with another output tree: a build that shares nothing local
    /// with the previous ones (what it reuses comes from a remote cache).
    pub fn build_in(&self, output_user_root: &Path, args: &[&str]) -> Output {
        self.command(Command::new(&self.bin), output_user_root, args)
    }

    /// As [`Bazel::build`] in a network namespace of its own with no interface up (not
    /// even loopback): a build that succeeds there fetched nothing. Needs root.
    pub fn build_without_network(&self, args: &[&str]) -> Output {
        let mut unshare = Command::new("unshare");
        unshare.arg("--net").arg("--").arg(&self.bin);
        self.command(unshare, &self.output_user_root, args)
    }

    fn command(&self, mut command: Command, output_user_root: &Path, args: &[&str]) -> Output {
        command
            .arg(format!("--output_user_root={}", output_user_root.display()))
            .arg("--batch")
            .arg("build")
            .args(args)
            .current_dir(&self.workspace)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// A file under bazel-bin, read.
    pub fn output(&self, relative: &str) -> Vec<u8> {
        std::fs::read(self.workspace.join("bazel-bin").join(relative)).unwrap()
    }
}

/// The REAPI digest of `data`.
pub fn digest_of(data: &[u8]) -> bazel_remote_apis::build::bazel::remote::execution::v2::Digest {
    use sha2::Digest as _;
    bazel_remote_apis::build::bazel::remote::execution::v2::Digest {
        hash: hex::encode(sha2::Sha256::digest(data)),
        size_bytes: i64::try_from(data.len()).unwrap(),
    }
}
