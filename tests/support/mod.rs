//! Helpers for the end-to-end tests: a real `kiln serve` on a private socket and
//! state directory, the `kiln` CLI as a client, and the reference in-toto tools.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const KILN: &str = env!("CARGO_BIN_EXE_kiln");

pub mod buildgrid;
pub mod registry;

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Root is needed to run the daemon. Outside CI a test without it is skipped
/// (and says so); in CI a missing privilege is a failure.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(!in_ci(), "{test}: CI=true but not running as root");
    eprintln!("SKIPPED: {test} needs root");
    false
}

/// The reference verifier from the venv the test command creates.
pub fn in_toto_verify(test: &str) -> Option<PathBuf> {
    reference_tool(test, "KILN_IN_TOTO_VERIFY")
}

/// Python of that venv (in-toto, securesystemslib, grpcio).
pub fn python(test: &str) -> Option<PathBuf> {
    reference_tool(test, "KILN_PYTHON")
}

/// npm's `@sigstore/verify` package directory (KILN_SIGSTORE_VERIFY, installed by
/// scripts/test), with `node` to run it. Outside CI a missing one skips the test
/// (saying so); in CI it fails.
pub fn sigstore_verify(test: &str) -> Option<PathBuf> {
    let package = std::env::var_os("KILN_SIGSTORE_VERIFY")
        .map(PathBuf::from)
        .filter(|dir| dir.join("package.json").is_file());
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    match package {
        Some(dir) if node => Some(dir),
        _ => {
            assert!(
                !in_ci(),
                "{test}: CI=true but node or KILN_SIGSTORE_VERIFY (the @sigstore/verify package) is missing"
            );
            eprintln!("SKIPPED: {test} needs node and KILN_SIGSTORE_VERIFY (run scripts/test)");
            None
        }
    }
}

/// Verifies a Sigstore bundle offline with `@sigstore/verify` (tests/node/verify-bundle.js),
/// trusting only `public_pem` under the key id `keyid`.
pub fn run_sigstore_verify(
    package: &Path,
    bundle: &Path,
    public_pem: &Path,
    keyid: &str,
) -> Output {
    Command::new("node")
        .arg(repo_root().join("tests/node/verify-bundle.js"))
        .arg(bundle)
        .arg(public_pem)
        .arg(keyid)
        .env("KILN_SIGSTORE_VERIFY", package)
        .output()
        .unwrap()
}

fn reference_tool(test: &str, var: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(path) if Path::new(&path).is_file() => Some(path.into()),
        _ => {
            assert!(
                !in_ci(),
                "{test}: CI=true but {var} is not set to an existing file"
            );
            eprintln!("SKIPPED: {test} needs {var} (run scripts/test)");
            None
        }
    }
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state: PathBuf,
    child: Option<Child>,
    /// A command that runs the daemon (e.g. `prlimit --nofile=...`), if any.
    wrapper: Vec<String>,
}

impl Daemon {
    pub fn start() -> Daemon {
        Self::start_with(&[])
    }

    /// Like `start_with`, with the daemon run by `wrapper` (which execs its argument).
    pub fn start_wrapped(wrapper: &[&str], extra: &[&str]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("kiln-e2e-")
            .tempdir()
            .unwrap();
        let mut daemon = Daemon {
            socket: dir.path().join("kiln.sock"),
            state: dir.path().join("state"),
            child: None,
            dir,
            wrapper: wrapper.iter().map(|w| w.to_string()).collect(),
        };
        daemon.spawn(extra);
        daemon
    }

    pub fn start_with(extra: &[&str]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("kiln-e2e-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("kiln.sock");
        let state = dir.path().join("state");
        let mut daemon = Daemon {
            socket,
            state,
            child: None,
            dir,
            wrapper: Vec::new(),
        };
        daemon.spawn(extra);
        daemon
    }

    pub fn spawn(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(KILN);
                command
            }
            None => Command::new(KILN),
        };
        let child = command
            .arg("--socket")
            .arg(&self.socket)
            .arg("serve")
            .arg("--state-dir")
            .arg(&self.state)
            .args(extra)
            .env("KILN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited early ({status}):\n{}", self.log());
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs the `kiln` CLI against this daemon.
    pub fn kiln(&self, args: &[&str]) -> Output {
        self.kiln_in(args, self.dir.path())
    }

    /// Starts the `kiln` CLI against this daemon without waiting for it (output piped).
    pub fn kiln_spawn(&self, args: &[&str]) -> Child {
        Command::new(KILN)
            .args(args)
            .env("KILN_SOCKET", &self.socket)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    pub fn kiln_in(&self, args: &[&str], cwd: &Path) -> Output {
        Command::new(KILN)
            .args(args)
            .env("KILN_SOCKET", &self.socket)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// SIGTERM, then wait: the daemon must drain and exit 0.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits pid_t")),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("daemon did not stop after SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A daemon killed mid-job leaves its workspace quotas (tmpfs) mounted; a restarted
        // daemon would unmount them, a test's temporary directory would leak them.
        if let Ok(entries) = std::fs::read_dir(self.state.join("work")) {
            for entry in entries.flatten() {
                let workspace = entry.path().join("ws");
                let _ = nix::mount::umount2(&workspace, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn describe(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr)
    )
}

/// Writes a layout with the reference implementation (a fresh owner key) and
/// returns (layout path, owner public key path).
pub fn make_layout(
    python: &Path,
    dir: &Path,
    runner_pub: &Path,
    spec: serde_json::Value,
) -> (PathBuf, PathBuf) {
    let mut spec = spec;
    spec["functionary_pub"] = serde_json::json!(runner_pub);
    let spec_path = dir.join("layout-spec.json");
    std::fs::write(&spec_path, serde_json::to_vec(&spec).unwrap()).unwrap();
    let layout = dir.join("root.layout");
    let owner_pub = dir.join("owner.pub");
    let output = Command::new(python)
        .arg(repo_root().join("tests/py/make_layout.py"))
        .arg(&spec_path)
        .arg(&layout)
        .arg(&owner_pub)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "make_layout: {}",
        describe(&output)
    );
    (layout, owner_pub)
}

pub const HELLO_C: &str =
    "#include <stdio.h>\nint main(void) { printf(\"hello, kiln\\n\"); return 0; }\n";

/// `kiln run` of the one-step hello job: hello.c in, `cc` and run it, `hello` out to
/// `out/`, the link to `links/`; `extra` goes before the `--`.
pub fn run_hello(daemon: &Daemon, extra: &[&str]) -> Output {
    std::fs::create_dir_all(daemon.path("src")).unwrap();
    std::fs::write(daemon.path("src/hello.c"), HELLO_C).unwrap();
    let mut args = vec![
        "run",
        "--input",
        "src/hello.c",
        "--output",
        "hello",
        "--attest-dir",
        "links",
        "--out",
        "out",
    ];
    args.extend_from_slice(extra);
    args.extend(["--", "/bin/sh", "-c", "cc -O2 -o hello hello.c && ./hello"]);
    daemon.kiln(&args)
}

/// The layout of the one-step "compile and run hello.c" job (`kiln run` of
/// `cc -O2 -o hello hello.c && ./hello`), with the runner key as functionary and an
/// inspection matching the downloaded `hello` with the step's product.
pub fn hello_layout(python: &Path, dir: &Path, runner_pub: &Path) -> (PathBuf, PathBuf) {
    make_layout(python, dir, runner_pub, hello_layout_spec())
}

/// The spec `make_layout` turns into [`hello_layout`].
pub fn hello_layout_spec() -> serde_json::Value {
    serde_json::json!({
        "steps": [{
            "name": "run",
            "expected_command": ["/bin/sh", "-c", "cc -O2 -o hello hello.c && ./hello"],
            "expected_materials": [["ALLOW", "hello.c"], ["DISALLOW", "*"]],
            "expected_products": [["CREATE", "hello"], ["ALLOW", "hello.c"], ["DISALLOW", "*"]],
        }],
        "inspect": [{
            "name": "outputs",
            "run": ["true"],
            "expected_materials": [["MATCH", "hello", "WITH", "PRODUCTS", "FROM", "run"], ["DISALLOW", "*"]],
        }],
    })
}

/// Runs the reference `in-toto-verify`; `cwd` is where inspections run.
pub fn run_in_toto_verify(
    tool: &Path,
    layout: &Path,
    owner_pub: &Path,
    links: &Path,
    cwd: &Path,
) -> Output {
    Command::new(tool)
        .arg("--layout")
        .arg(layout)
        .arg("--verification-keys")
        .arg(owner_pub)
        .arg("--link-dir")
        .arg(links)
        .current_dir(cwd)
        .output()
        .unwrap()
}

/// Flips one bit of the file's first byte.
pub fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[0] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

// ---- Added for the escape suite (tests/escape.rs).

impl Daemon {
    /// Whether the daemon process is still alive (not exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }

    /// The daemon's host pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Like `start_with`, but the daemon runs in a session of its own whose controlling
    /// terminal is a fresh pseudo-terminal, as when an operator starts `kiln serve` (or
    /// `kiln demo`) in a terminal. Returns the daemon and the terminal's master side.
    pub fn start_in_terminal(extra: &[&str]) -> (Daemon, std::os::fd::OwnedFd) {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let pty = nix::pty::openpty(None, None).unwrap();
        let dir = tempfile::Builder::new()
            .prefix("kiln-e2e-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("kiln.sock");
        let state = dir.path().join("state");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("daemon.log"))
            .unwrap();
        let slave = pty.slave.as_raw_fd();
        let mut command = Command::new(KILN);
        command
            .arg("--socket")
            .arg(&socket)
            .arg("serve")
            .arg("--state-dir")
            .arg(&state)
            .args(extra)
            .env("KILN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::setsid() < 0 || libc::ioctl(slave, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        drop(pty.slave);
        let mut daemon = Daemon {
            dir,
            socket,
            state,
            child: Some(child),
            wrapper: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&daemon.socket).is_err() {
            assert!(
                daemon.is_running(),
                "daemon exited early:\n{}",
                daemon.log()
            );
            assert!(
                Instant::now() < deadline,
                "daemon did not start:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        (daemon, pty.master)
    }
}

/// Host processes whose real uid is in `[first, first + count)`, as "pid uid comm".
pub fn host_processes_in_uid_range(first: u32, count: u32) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let real = status
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|u| u.parse::<u32>().ok());
        if let Some(uid) = real {
            if uid >= first && uid - first < count {
                let name = status
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim_start_matches("Name:")
                    .trim()
                    .to_string();
                found.push(format!(
                    "{} {uid} {name}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    found
}

/// The `signed` part of the link a job wrote for `step` into `dir`.
pub fn signed_link(dir: &Path, step: &str) -> serde_json::Value {
    let entry = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .find(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&format!("{step}.")) && name.ends_with(".link")
        })
        .unwrap_or_else(|| panic!("no link for step {step} in {}", dir.display()));
    let link: serde_json::Value =
        serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap();
    link["signed"].clone()
}

/// `kiln verify` in layout mode, as `in-toto-verify` is run.
pub fn kiln_verify(
    daemon: &Daemon,
    layout: &Path,
    owner: &Path,
    links: &Path,
    artifacts: &Path,
) -> std::process::Output {
    daemon.kiln(&[
        "verify",
        "--layout",
        layout.to_str().unwrap(),
        "--layout-key",
        owner.to_str().unwrap(),
        "--links",
        links.to_str().unwrap(),
        "--artifacts",
        artifacts.to_str().unwrap(),
    ])
}

// ---- Other local clients and host users (tests/boundaries.rs).

/// A connection to `socket` made with the credentials `uid`/`gid` (no supplementary
/// groups), as a second local client, another host user, makes it: the daemon reads the
/// peer's identity from the socket (SO_PEERCRED, taken at connect time). Only the
/// connecting thread switches credentials: the raw syscalls act per thread (libc's
/// wrappers would switch every thread of the test process), and the thread ends right
/// after the connect, so the test process stays root.
pub fn connect_as(
    socket: &Path,
    uid: u32,
    gid: u32,
) -> std::io::Result<std::os::unix::net::UnixStream> {
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        let keep = libc::c_long::from(-1i32);
        // SAFETY: plain integer arguments; these syscalls change only the calling
        // thread's credentials, and this thread ends after the connect below.
        let switched = unsafe {
            libc::syscall(
                libc::SYS_setgroups,
                0 as libc::c_long,
                std::ptr::null::<libc::gid_t>(),
            ) == 0
                && libc::syscall(libc::SYS_setresgid, keep, libc::c_long::from(gid), keep) == 0
                && libc::syscall(libc::SYS_setresuid, keep, libc::c_long::from(uid), keep) == 0
        };
        if !switched {
            return Err(std::io::Error::last_os_error());
        }
        std::os::unix::net::UnixStream::connect(&socket)
    })
    .join()
    .map_err(|_| std::io::Error::other("connecting thread panicked"))?
}

/// A gRPC channel to the daemon whose every connection is made as `uid`/`gid`, built
/// with the CLI's own connector.
pub async fn channel_as(socket: &Path, uid: u32, gid: u32) -> tonic::transport::Channel {
    let socket = socket.to_path_buf();
    runner::cli::client::channel_over(move || {
        let socket = socket.clone();
        async move {
            let stream = tokio::task::spawn_blocking(move || connect_as(&socket, uid, gid))
                .await
                .map_err(std::io::Error::other)??;
            stream.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(stream)
        }
    })
    .await
    .unwrap()
}

/// A gRPC channel to the daemon, as the `kiln` CLI opens it.
pub async fn channel(daemon: &Daemon) -> tonic::transport::Channel {
    runner::cli::client::Client::connect(&daemon.socket)
        .await
        .unwrap()
        .channel()
}

/// Runs `argv` as host user `uid` (group `uid`, no supplementary groups).
pub fn run_as(uid: u32, argv: &[&str]) -> Output {
    use std::os::unix::process::CommandExt;
    Command::new(argv[0])
        .args(&argv[1..])
        // As root, std also drops the supplementary groups.
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A daemon configuration file holding `text`, removed when dropped.
pub fn config_file(text: &str) -> tempfile::NamedTempFile {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), text).unwrap();
    config
}

/// The digest of `data` and the ContentStore.Write messages that upload it.
pub fn write_messages(data: &[u8]) -> (String, Vec<agent_proto::v1::WriteRequest>) {
    use agent_proto::v1::{write_request, WriteHeader, WriteRequest};
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(data));
    let messages = vec![
        WriteRequest {
            part: Some(write_request::Part::Header(WriteHeader {
                digest: digest.clone(),
                size: data.len() as u64,
            })),
        },
        WriteRequest {
            part: Some(write_request::Part::Data(data.to_vec())),
        },
    ];
    (digest, messages)
}

/// Unmounts a test's filesystem when dropped.
pub struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

impl Daemon {
    /// Stops the daemon, gives it an empty state directory on a 64 MiB tmpfs of its own
    /// (a disk that fills up), and starts it again with `args`; the tmpfs goes with the
    /// returned guard.
    pub fn restart_on_small_state_disk(&mut self, args: &[&str]) -> Unmount {
        self.stop();
        std::fs::remove_dir_all(&self.state).unwrap();
        std::fs::create_dir(&self.state).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &self.state,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=64m,mode=0711"),
        )
        .unwrap();
        let unmount = Unmount(self.state.clone());
        self.spawn(args);
        unmount
    }
}

/// A gRPC client of the daemon's three services over one channel, with the calls the
/// ownership tests make.
pub struct ApiClient {
    pub jobs: agent_proto::v1::jobs_client::JobsClient<tonic::transport::Channel>,
    pub store: agent_proto::v1::content_store_client::ContentStoreClient<tonic::transport::Channel>,
    pub attestations:
        agent_proto::v1::attestations_client::AttestationsClient<tonic::transport::Channel>,
}

impl ApiClient {
    pub fn over(channel: tonic::transport::Channel) -> ApiClient {
        ApiClient {
            jobs: agent_proto::v1::jobs_client::JobsClient::new(channel.clone()),
            store: agent_proto::v1::content_store_client::ContentStoreClient::new(channel.clone()),
            attestations: agent_proto::v1::attestations_client::AttestationsClient::new(channel),
        }
    }

    pub async fn upload(&mut self, data: &[u8]) -> Result<String, tonic::Status> {
        let (digest, messages) = write_messages(data);
        self.store.write(tokio_stream::iter(messages)).await?;
        Ok(digest)
    }

    pub async fn read(&mut self, digest: &str) -> Result<Vec<u8>, tonic::Status> {
        let mut stream = self
            .store
            .read(agent_proto::v1::ReadRequest {
                digest: digest.to_string(),
            })
            .await?
            .into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await? {
            data.extend(chunk.data);
        }
        Ok(data)
    }

    pub async fn submit(
        &mut self,
        spec: agent_proto::v1::JobSpec,
        key: &str,
    ) -> Result<String, tonic::Status> {
        Ok(self
            .jobs
            .submit(agent_proto::v1::SubmitRequest {
                spec: Some(spec),
                idempotency_key: key.to_string(),
            })
            .await?
            .into_inner()
            .job_id)
    }

    pub async fn get(&mut self, id: &str) -> Result<agent_proto::v1::Job, tonic::Status> {
        Ok(self
            .jobs
            .get(agent_proto::v1::GetRequest {
                job_id: id.to_string(),
            })
            .await?
            .into_inner())
    }

    /// Follows the job with Watch to its end.
    pub async fn wait(&mut self, id: &str) -> agent_proto::v1::Job {
        let mut stream = self
            .jobs
            .watch(agent_proto::v1::WatchRequest {
                job_id: id.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        while let Some(event) = stream.message().await.unwrap() {
            if let Some(agent_proto::v1::job_event::Event::JobFinished(job)) = event.event {
                return job;
            }
        }
        panic!("watch ended without the job finishing");
    }
}

/// Unmounts `path` when the returned guard is dropped.
pub fn unmount_on_drop(path: PathBuf) -> Unmount {
    Unmount(path)
}

/// Updates the Secret volume `volume` (the kubelet's own, read-write view) with the
/// files of `source`, as the kubelet's atomic writer does: the files (mode `mode`) in a
/// new timestamped directory of mode 0755, a link `..data_tmp` to it renamed over
/// `..data`, a visible link `NAME -> ..data/NAME` for each new name, the visible links
/// of names no longer there removed, then the previous timestamped directory.
pub fn kubelet_update_secret(volume: &Path, source: &Path, mode: u32, serial: u32) {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let data = volume.join("..data");
    let old = std::fs::read_link(&data).ok();
    let ts_name = format!("..2026_11_27_23_00_00.{serial:010}");
    let ts = volume.join(&ts_name);
    std::fs::create_dir(&ts).unwrap();
    std::fs::set_permissions(&ts, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(source).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        std::fs::copy(entry.path(), ts.join(&name)).unwrap();
        std::fs::set_permissions(ts.join(&name), std::fs::Permissions::from_mode(mode)).unwrap();
        names.push(name);
    }
    symlink(&ts_name, volume.join("..data_tmp")).unwrap();
    std::fs::rename(volume.join("..data_tmp"), &data).unwrap();
    for name in &names {
        let visible = volume.join(name);
        if std::fs::symlink_metadata(&visible).is_err() {
            symlink(Path::new("..data").join(name), &visible).unwrap();
        }
    }
    for entry in std::fs::read_dir(volume).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !names.contains(&name) {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(volume.join(old)).unwrap();
    }
}
