//! The boundaries around the sandbox, attacked as a second local client (another uid on
//! the daemon's socket) and as another host user: a client sees, cancels and reads only
//! what is its own; nothing of the state directory is readable by other host users.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::os::unix::fs::PermissionsExt;

use agent_proto::v1::{
    CancelRequest, FindMissingRequest, GetProvenanceRequest, Input, JobSpec, JobState,
    ListLinksRequest, Step, WatchRequest,
};
use support::*;

/// The daemon's services as one client; `new` connects as a host uid.
type Client = ApiClient;
use tonic::Code;

/// The socket's group; both clients are in it.
const CLIENTS_GID: u32 = 47_000;
const ALICE: u32 = 47_001;
const BOB: u32 = 47_002;
const OPERATOR: u32 = 47_003;
/// A host user with no access to the socket.
const OUTSIDER: u32 = 47_004;

impl Client {
    async fn new(daemon: &Daemon, uid: u32) -> Client {
        Client::over(channel_as(&daemon.socket, uid, CLIENTS_GID).await)
    }

    async fn missing(&mut self, digests: &[&str]) -> Vec<String> {
        self.store
            .find_missing(FindMissingRequest {
                digests: digests.iter().map(|d| d.to_string()).collect(),
            })
            .await
            .unwrap()
            .into_inner()
            .missing
    }
}

fn spec(name: &str, input_digest: &str, script: &str) -> JobSpec {
    JobSpec {
        name: name.into(),
        image: "host".into(),
        inputs: vec![Input {
            path: "secret.txt".into(),
            digest: input_digest.into(),
            executable: false,
        }],
        steps: vec![Step {
            name: "build".into(),
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: [("API_TOKEN".to_string(), "tok-alice-123".to_string())].into(),
            ..Default::default()
        }],
        outputs: vec!["out.txt".into()],
        publish_repository: String::new(),
    }
}

/// A daemon whose socket the clients' group may use, with one operator uid, in a
/// directory other host users may traverse (as /var/lib is).
fn shared_daemon() -> Daemon {
    let config = config_file(&format!(
        "socket_gid = {CLIENTS_GID}\nadmin_uids = [{OPERATOR}]\n"
    ));
    let daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    daemon
}

fn assert_hidden<T: std::fmt::Debug>(what: &str, result: Result<T, tonic::Status>) {
    let err = result.expect_err(what);
    assert_eq!(err.code(), Code::NotFound, "{what}: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sees_cancels_and_reads_only_its_own() {
    if !require_root("a_client_sees_cancels_and_reads_only_its_own") {
        return;
    }
    let daemon = shared_daemon();
    let mut alice = Client::new(&daemon, ALICE).await;
    let mut bob = Client::new(&daemon, BOB).await;

    // Alice's sources: only she can tell they are in the store, or read them.
    let secret = b"alice's unreleased source\n";
    let input = alice.upload(secret).await.unwrap();
    assert!(alice.missing(&[&input]).await.is_empty());
    assert_eq!(
        bob.missing(&[&input]).await,
        std::slice::from_ref(&input),
        "FindMissing is an existence oracle for another client's blob"
    );
    assert_hidden("bob reads alice's blob", bob.read(&input).await);

    let job_spec = spec(
        "alice",
        &input,
        "tr a-z A-Z < secret.txt > out.txt; echo \"token $API_TOKEN\"",
    );
    let job_id = alice.submit(job_spec.clone(), "release-1").await.unwrap();
    let job = alice.wait(&job_id).await;
    assert_eq!(job.state, JobState::Succeeded as i32, "{job:?}");
    let output = job.outputs[0].digest.clone();
    let link = job.steps[0].link_digest.clone();
    let built = secret.to_ascii_uppercase();
    assert_eq!(alice.read(&output).await.unwrap(), built);

    // Bob cannot see the job in any way, and is told exactly what a made-up id gets.
    let nonexistent = "00000000-0000-4000-8000-000000000000";
    let unknown = bob.get(nonexistent).await.unwrap_err();
    let hidden = bob.get(&job_id).await.unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound, "{hidden}");
    assert_eq!(
        hidden.message().replace(&job_id, "ID"),
        unknown.message().replace(nonexistent, "ID"),
        "another client's job answers differently from no job"
    );
    assert_hidden(
        "bob watches alice's job",
        bob.jobs
            .watch(WatchRequest {
                job_id: job_id.clone(),
            })
            .await,
    );
    assert_hidden(
        "bob lists alice's links",
        bob.attestations
            .list_links(ListLinksRequest {
                job_id: job_id.clone(),
            })
            .await,
    );
    assert_hidden(
        "bob gets alice's provenance",
        bob.attestations
            .get_provenance(GetProvenanceRequest {
                job_id: job_id.clone(),
            })
            .await,
    );
    assert_hidden("bob reads alice's output", bob.read(&output).await);
    assert_hidden("bob reads alice's link", bob.read(&link).await);
    let log = job.steps[0].stdout_digest.clone();
    assert_eq!(alice.read(&log).await.unwrap(), b"token tok-alice-123\n");
    assert_hidden("bob reads alice's build log", bob.read(&log).await);
    assert_hidden(
        "bob reads alice's provenance blob",
        bob.read(&job.provenance_digest).await,
    );

    // Naming alice's blob as an input is answered as for a blob nobody uploaded.
    let stolen = bob
        .submit(spec("bob", &input, "cp secret.txt out.txt"), "")
        .await
        .unwrap_err();
    let absent = bob
        .submit(spec("bob", &"0".repeat(64), "true"), "")
        .await
        .unwrap_err();
    assert_eq!(stolen.code(), Code::FailedPrecondition, "{stolen}");
    assert_eq!(stolen.code(), absent.code());

    // Idempotency keys are per client; the same key with another spec is refused.
    let bobs_input = bob.upload(b"bob's").await.unwrap();
    let bobs = bob
        .submit(spec("bob", &bobs_input, "true"), "release-1")
        .await
        .unwrap();
    assert_ne!(bobs, job_id, "bob's key returned alice's job");
    assert_eq!(
        alice.submit(job_spec.clone(), "release-1").await.unwrap(),
        job_id
    );
    let mut changed = job_spec.clone();
    changed.steps[0].argv[2] = "echo other > out.txt".into();
    let err = alice.submit(changed, "release-1").await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    assert!(err.message().contains("release-1"), "{err}");

    // Uploading the same bytes proves possession: then bob has them too.
    assert_eq!(bob.upload(secret).await.unwrap(), input);
    assert!(bob.missing(&[&input]).await.is_empty());
    assert_eq!(bob.read(&input).await.unwrap(), secret);
    // ... which gives him nothing of alice's job.
    assert_hidden("bob reads alice's output after", bob.read(&output).await);

    // Operators see everything.
    let mut operator = Client::new(&daemon, OPERATOR).await;
    assert_eq!(operator.get(&job_id).await.unwrap().job_id, job_id);
    assert_eq!(operator.read(&output).await.unwrap(), built);

    // Cancel: only the owner (or an operator) stops a running job.
    let long = alice
        .submit(spec("long", &input, "sleep 60; cp secret.txt out.txt"), "")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while alice.get(&long).await.unwrap().state != JobState::Running as i32 {
        assert!(std::time::Instant::now() < deadline, "job never started");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_hidden(
        "bob cancels alice's job",
        bob.jobs
            .cancel(CancelRequest {
                job_id: long.clone(),
            })
            .await,
    );
    assert_eq!(
        alice.get(&long).await.unwrap().state,
        JobState::Running as i32
    );
    operator
        .jobs
        .cancel(CancelRequest {
            job_id: long.clone(),
        })
        .await
        .unwrap();
    assert_eq!(alice.wait(&long).await.state, JobState::Cancelled as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_host_users_read_nothing_of_the_state_directory() {
    if !require_root("other_host_users_read_nothing_of_the_state_directory") {
        return;
    }
    let daemon = shared_daemon();
    let mut alice = Client::new(&daemon, ALICE).await;
    let marker = "TOPSECRET-7f3a";
    let input = alice
        .upload(format!("{marker}\n").as_bytes())
        .await
        .unwrap();
    let job_id = alice
        .submit(
            // The step itself tries to open its workspace to host users, and to talk to
            // them through a fifo: a way out of a sandbox without network.
            spec(
                "running",
                &input,
                "cp secret.txt out.txt; chmod 0777 /workspace; chmod 0666 secret.txt out.txt; \
                 mkfifo pipe; chmod 0666 pipe; touch started; cat secret.txt > pipe; sleep 60",
            ),
            "",
        )
        .await
        .unwrap();
    let state = daemon.state.clone();
    let work = state.join("work");
    // The workspace is the tmpfs mounted below work/ while the job runs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let workspace = loop {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(&job_id),
            "the world-readable mount table names the job: {mounts}"
        );
        let found = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .find(|mount| mount.starts_with(work.to_str().unwrap()))
            .map(std::path::PathBuf::from);
        if let Some(ws) = found.filter(|ws| ws.join("started").exists()) {
            break ws;
        }
        assert!(std::time::Instant::now() < deadline, "job never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let blob = state.join("cas").join(&input[..2]).join(&input);
    assert!(blob.is_file());

    let attempts: Vec<Vec<String>> = vec![
        vec!["/bin/ls".into(), state.display().to_string()],
        vec!["/bin/ls".into(), work.display().to_string()],
        vec!["/bin/ls".into(), workspace.display().to_string()],
        vec![
            "/bin/cat".into(),
            workspace.join("secret.txt").display().to_string(),
        ],
        vec![
            "/bin/cat".into(),
            workspace.join("out.txt").display().to_string(),
        ],
        vec![
            "/bin/cat".into(),
            workspace.join("pipe").display().to_string(),
        ],
        vec![
            "/bin/ls".into(),
            workspace.parent().unwrap().display().to_string(),
        ],
        vec![
            "/bin/cat".into(),
            state.join("kiln.db").display().to_string(),
        ],
        vec![
            "/bin/cat".into(),
            state.join("kiln.db-wal").display().to_string(),
        ],
        vec!["/bin/ls".into(), state.join("cas").display().to_string()],
        vec!["/bin/cat".into(), blob.display().to_string()],
    ];
    for argv in &attempts {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let output = run_as(OUTSIDER, &argv);
        assert!(
            !output.status.success() && !text(&output.stdout).contains(marker),
            "another host user could run {argv:?}: {}",
            describe(&output)
        );
    }
    // The database holds the job's environment: root only.
    for name in ["kiln.db", "kiln.db-wal"] {
        let mode = std::fs::metadata(state.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{name} is mode {mode:o}");
    }
    alice.jobs.cancel(CancelRequest { job_id }).await.unwrap();
}

#[test]
fn two_daemons_on_one_host_never_share_host_ids() {
    if !require_root("two_daemons_on_one_host_never_share_host_ids") {
        return;
    }
    // The same configuration twice, as two instances on one host would have it.
    let config = config_file("uid_base = 350000000\nmax_concurrent_jobs = 2\n");
    let args = ["--config", config.path().to_str().unwrap()];
    let (first, second) = (Daemon::start_with(&args), Daemon::start_with(&args));
    let run = |daemon: &Daemon| {
        daemon.kiln_spawn(&[
            "run",
            "--",
            "/bin/sh",
            "-c",
            "cat /proc/self/uid_map; sleep 1",
        ])
    };
    let (a, b) = (run(&first), run(&second));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success());
    let host_range = |out: &std::process::Output| -> (u64, u64) {
        let fields: Vec<u64> = text(&out.stdout)
            .split_whitespace()
            .map(|f| f.parse().unwrap())
            .collect();
        (fields[1], fields[1] + fields[2])
    };
    let ((a0, a1), (b0, b1)) = (host_range(&a), host_range(&b));
    assert!(
        a1 <= b0 || b1 <= a0,
        "two daemons' sandboxes share host ids: {a0}..{a1} and {b0}..{b1}"
    );
    assert!(
        second.log().contains("host id ranges leased"),
        "{}",
        second.log()
    );
}

/// The egress proxy, which parses what a step sends, runs in a process of its own
/// without privileges: not root, no capabilities, no_new_privs, a seccomp filter, and
/// its uid can read nothing of the state directory, the signing key included.
#[test]
fn the_egress_proxy_runs_unprivileged_and_cannot_read_the_state_directory() {
    if !require_root("the_egress_proxy_runs_unprivileged_and_cannot_read_the_state_directory") {
        return;
    }
    let daemon = Daemon::start();
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let step = daemon.kiln_spawn(&[
        "run",
        "--allow-net",
        "127.0.0.1:9",
        "--",
        "/bin/sh",
        "-c",
        "sleep 5",
    ]);
    let find = || {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains("__kiln-egress-proxy")
                .then(|| std::fs::read_to_string(e.path().join("status")).ok())
                .flatten()
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        // Read once it dropped its privileges (before that it is root for a moment).
        if let Some(status) = find().filter(|s| s.contains("Seccomp:\t2")) {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no egress proxy process\n{}",
            daemon.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_default()
            .to_string()
    };
    let uid: u32 = field("Uid:").parse().unwrap();
    assert_ne!(uid, 0, "{status}");
    assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
    assert_eq!(field("CapPrm:"), "0000000000000000", "{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    assert_eq!(field("Seccomp:"), "2", "{status}");
    let keys = daemon.state.join("keys");
    for argv in [
        vec!["/bin/ls".to_string(), daemon.state.display().to_string()],
        vec!["/bin/ls".to_string(), keys.display().to_string()],
        vec![
            "/bin/cat".to_string(),
            keys.join("keyring.json").display().to_string(),
        ],
        vec![
            "/bin/cat".to_string(),
            daemon.state.join("kiln.db").display().to_string(),
        ],
    ] {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let output = run_as(uid, &argv);
        assert!(
            !output.status.success(),
            "the proxy's uid could run {argv:?}: {}",
            describe(&output)
        );
    }
    let out = step.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
}
