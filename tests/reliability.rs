//! Nothing served corrupt, nothing lost, nothing hanging, each driven for real: a blob
//! corrupted or truncated on disk fails Read and ListLinks (DATA_LOSS), is quarantined,
//! reported missing and repaired by an upload (`kiln store verify` finds the rest); a
//! lost job database stops submissions and is never silently recreated; SIGTERM starts
//! no queued job; a connection flood leaves other clients served.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use agent_proto::v1::attestations_client::AttestationsClient;
use agent_proto::v1::content_store_client::ContentStoreClient;
use agent_proto::v1::jobs_client::JobsClient;
use agent_proto::v1::{
    FindMissingRequest, GetRequest, JobSpec, JobState, ListLinksRequest, ReadRequest, Step,
    SubmitRequest,
};
use support::*;
use tonic::transport::Channel;
use tonic::Code;

async fn upload(store: &mut ContentStoreClient<Channel>, data: &[u8]) -> String {
    let (digest, messages) = write_messages(data);
    store.write(tokio_stream::iter(messages)).await.unwrap();
    digest
}

/// What a Read stream delivered, and how it ended.
async fn read(store: &mut ContentStoreClient<Channel>, digest: &str) -> (Vec<u8>, Option<Code>) {
    let mut stream = match store
        .read(ReadRequest {
            digest: digest.to_string(),
        })
        .await
    {
        Ok(stream) => stream.into_inner(),
        Err(status) => return (Vec::new(), Some(status.code())),
    };
    let mut data = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(chunk)) => data.extend(chunk.data),
            Ok(None) => return (data, None),
            Err(status) => return (data, Some(status.code())),
        }
    }
}

async fn missing(store: &mut ContentStoreClient<Channel>, digest: &str) -> bool {
    !store
        .find_missing(FindMissingRequest {
            digests: vec![digest.to_string()],
        })
        .await
        .unwrap()
        .into_inner()
        .missing
        .is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_blobs_are_never_served_and_an_upload_repairs_them() {
    if !require_root("corrupt_blobs_are_never_served_and_an_upload_repairs_them") {
        return;
    }
    let daemon = Daemon::start();
    let channel = channel_as(&daemon.socket, 0, 0).await;
    let mut store = ContentStoreClient::new(channel.clone());
    let blob_path = |digest: &str| daemon.state.join("cas").join(&digest[..2]).join(digest);

    // Several chunks, one byte flipped in the last: every chunk but the last could
    // already be on its way when the mismatch shows.
    let content: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    let digest = upload(&mut store, &content).await;
    let mut on_disk = std::fs::read(blob_path(&digest)).unwrap();
    on_disk[650_000] ^= 1;
    std::fs::write(blob_path(&digest), &on_disk).unwrap();
    let (served, end) = read(&mut store, &digest).await;
    assert_eq!(end, Some(Code::DataLoss), "a corrupt blob was served whole");
    assert!(served.len() < content.len());
    assert!(
        missing(&mut store, &digest).await,
        "a corrupt blob is reported present"
    );

    // The correct bytes again: stored, served.
    assert_eq!(upload(&mut store, &content).await, digest);
    let (served, end) = read(&mut store, &digest).await;
    assert_eq!((served == content, end), (true, None));

    // A truncated blob is missing, so clients upload it again.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(blob_path(&digest))
        .unwrap();
    file.set_len(1000).unwrap();
    assert!(
        missing(&mut store, &digest).await,
        "a truncated blob is reported present"
    );

    // A corrupt link is refused by ListLinks, not handed to a verifier.
    let mut jobs = JobsClient::new(channel.clone());
    let id = jobs
        .submit(SubmitRequest {
            spec: Some(JobSpec {
                name: "store".into(),
                image: "host".into(),
                steps: vec![Step {
                    name: "t".into(),
                    argv: vec!["/bin/true".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let job = loop {
        let job = jobs
            .get(GetRequest { job_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        if job.state == JobState::Succeeded as i32 {
            break job;
        }
        assert!(std::time::Instant::now() < deadline, "{job:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let link = &job.steps[0].link_digest;
    let mut link_bytes = std::fs::read(blob_path(link)).unwrap();
    link_bytes[10] = b'X';
    std::fs::write(blob_path(link), &link_bytes).unwrap();
    let err = AttestationsClient::new(channel)
        .list_links(ListLinksRequest { job_id: id })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err}");
    assert!(
        !err.message().contains(daemon.state.to_str().unwrap()),
        "{err}"
    );

    // `kiln store verify` finds what no client asked for, and sets it aside.
    let spare = upload(&mut store, b"spare blob").await;
    std::fs::write(blob_path(&spare), b"spare blub").unwrap();
    let out = daemon.kiln(&[
        "store",
        "verify",
        "--state-dir",
        daemon.state.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let report = text(&out.stdout);
    assert!(report.contains("1 corrupt (quarantined)"), "{report}");
    assert!(report.contains(&format!("corrupt: {spare}")), "{report}");
    assert!(!blob_path(&spare).exists());
    let out = daemon.kiln(&[
        "store",
        "verify",
        "--state-dir",
        daemon.state.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[test]
fn a_lost_database_stops_submissions_and_is_never_silently_recreated() {
    if !require_root("a_lost_database_stops_submissions_and_is_never_silently_recreated") {
        return;
    }
    let mut daemon = Daemon::start();
    let out = daemon.kiln(&["run", "--", "/bin/true"]);
    assert!(out.status.success(), "{}", describe(&out));
    for name in ["kiln.db", "kiln.db-wal", "kiln.db-shm"] {
        let _ = std::fs::remove_file(daemon.state.join(name));
    }
    let out = daemon.kiln(&["run", "--", "/bin/true"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{}", describe(&out));
    assert!(stderr.contains("job database"), "{stderr}");
    assert!(!stderr.contains(daemon.state.to_str().unwrap()), "{stderr}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !daemon.log().contains("THE JOB DATABASE IS GONE") {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    daemon.stop();

    // A restart does not start over with an empty database ...
    let mut serve = std::process::Command::new(KILN)
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("serve")
        .arg("--state-dir")
        .arg(&daemon.state)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = serve.kill();
            panic!("kiln serve started on a state directory whose database was lost");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut serve.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("--new-database"), "{stderr}");
    // ... unless the operator says so.
    daemon.spawn(&["--new-database"]);
    let out = daemon.kiln(&["run", "--", "/bin/true"]);
    assert!(out.status.success(), "{}", describe(&out));
}

/// SIGTERM: no queued job starts any more (a Watch on it ends instead of holding the
/// daemon up), and a running job past the grace period is cancelled with the reason.
#[test]
fn sigterm_starts_nothing_queued_and_cancels_past_the_grace_period() {
    if !require_root("sigterm_starts_nothing_queued_and_cancels_past_the_grace_period") {
        return;
    }
    let config = config_file("max_concurrent_jobs = 1\nshutdown_grace_seconds = 2\n");
    let mut daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    let follow =
        |daemon: &Daemon, argv: &[&str]| daemon.kiln_spawn(&[&["run", "--"], argv].concat());
    // Both clients follow their job with Watch.
    let running = follow(&daemon, &["/bin/sh", "-c", "echo begun; sleep 60"]);
    let accepted = |daemon: &Daemon| -> Vec<String> {
        daemon
            .log()
            .lines()
            .filter(|l| l.contains("job accepted"))
            .filter_map(|l| l.split("job=").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(String::from)
            .collect()
    };
    let state_of = |daemon: &Daemon, id: &str| -> serde_json::Value {
        let out = daemon.kiln(&["status", "--json", id]);
        assert!(out.status.success(), "{}", describe(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(id) = accepted(&daemon).first() {
            if state_of(&daemon, id)["state"] == "running" {
                break;
            }
        }
        assert!(std::time::Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let queued = follow(&daemon, &["/bin/true"]);
    while accepted(&daemon).len() < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = daemon.stop();
    let stopped_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    assert!(status.success(), "daemon exit {status:?}\n{}", daemon.log());
    let queued = queued.wait_with_output().unwrap();
    assert_eq!(queued.status.code(), Some(125), "{}", describe(&queued));
    assert!(
        text(&queued.stderr).contains("shutting down"),
        "{}",
        describe(&queued)
    );
    let running = running.wait_with_output().unwrap();
    assert_eq!(running.status.code(), Some(137), "{}", describe(&running));

    let ids = accepted(&daemon);
    daemon.spawn(&["--config", config.path().to_str().unwrap()]);
    let record = |id: &str| state_of(&daemon, id);
    let cancelled = record(&ids[0]);
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    assert!(
        cancelled["message"]
            .as_str()
            .unwrap()
            .contains("grace period"),
        "{cancelled}"
    );
    // The queued job runs only after the restart.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let later = loop {
        let job = record(&ids[1]);
        if job["state"] == "succeeded" {
            break job;
        }
        assert!(std::time::Instant::now() < deadline, "{job}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let started = later["started_unix_ms"].as_i64().unwrap_or_default();
    assert!(
        started >= stopped_ms,
        "the queued job started before the restart: {later}"
    );
}

/// Whether the peer closed the connection within `wait` (reads reach end of file; what
/// the server sends first, its HTTP/2 settings, is read past).
fn closed_by_peer(stream: &mut std::os::unix::net::UnixStream, wait: std::time::Duration) -> bool {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match std::io::Read::read(stream, &mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

fn flood_config(extra: &str) -> tempfile::NamedTempFile {
    config_file(&format!(
        "socket_gid = 47100\nconnection_handshake_timeout_seconds = 2\n{extra}"
    ))
}

/// One client opening hundreds of idle connections: past its own cap they are closed at
/// once, the rest when they send no HTTP/2 preface in time, and meanwhile a client that
/// was connected before and one that connects during the flood are both served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_from_one_client_leaves_the_others_served() {
    use agent_proto::v1::GetRequest;
    if !require_root("a_connection_flood_from_one_client_leaves_the_others_served") {
        return;
    }
    let config = flood_config("max_connections_per_client = 20\n");
    let daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    let mut before = JobsClient::new(channel_as(&daemon.socket, 0, 0).await);
    let unknown = || GetRequest {
        job_id: "00000000-0000-4000-8000-000000000000".into(),
    };
    assert_eq!(
        before.get(unknown()).await.unwrap_err().code(),
        Code::NotFound
    );

    let mut flood: Vec<_> = (0..300)
        .map(|_| connect_as(&daemon.socket, 47_101, 47_100).unwrap())
        .collect();
    // Served during the flood: the client connected before, and a new one.
    assert_eq!(
        before.get(unknown()).await.unwrap_err().code(),
        Code::NotFound
    );
    let mut during = JobsClient::new(channel_as(&daemon.socket, 47_102, 47_100).await);
    assert_eq!(
        during.get(unknown()).await.unwrap_err().code(),
        Code::NotFound
    );

    let wait = std::time::Duration::from_secs(15);
    let closed = flood
        .iter_mut()
        .map(|s| closed_by_peer(s, wait))
        .filter(|closed| *closed)
        .count();
    assert_eq!(closed, 300, "idle connections the daemon never closed");
    let log = daemon.log();
    assert!(log.contains("max_connections_per_client"), "{log}");
    assert!(log.contains("sent no HTTP/2 preface"), "{log}");
    assert_eq!(
        before.get(unknown()).await.unwrap_err().code(),
        Code::NotFound
    );
}

/// Out of file descriptors: accept fails, the daemon backs off (logging it, not for
/// every attempt) instead of spinning, and serves again once the flood is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_daemon_backs_off_and_recovers() {
    use agent_proto::v1::GetRequest;
    if !require_root("out_of_file_descriptors_the_daemon_backs_off_and_recovers") {
        return;
    }
    let config = flood_config("max_connections = 5000\nmax_connections_per_client = 5000\n");
    let daemon = Daemon::start_wrapped(
        &["prlimit", "--nofile=192:192", "--"],
        &["--config", config.path().to_str().unwrap()],
    );
    let flood: Vec<_> = (0..400)
        .filter_map(|_| connect_as(&daemon.socket, 47_101, 47_100).ok())
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !daemon.log().contains("backing off") {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(flood);
    // Once the flood's descriptors are freed (closed by the handshake deadline), a
    // client is served again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut jobs = JobsClient::new(channel_as(&daemon.socket, 0, 0).await);
        let answer = jobs
            .get(GetRequest {
                job_id: "00000000-0000-4000-8000-000000000000".into(),
            })
            .await;
        if answer.as_ref().err().map(tonic::Status::code) == Some(Code::NotFound) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{answer:?}\n{}",
            daemon.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let warnings = daemon.log().matches("backing off").count();
    assert!(
        warnings < 60,
        "{warnings} accept warnings: the log is flooded"
    );
}

/// The state disk fills up: uploads and new jobs are refused as RESOURCE_EXHAUSTED
/// (no host path), a job accepted before ends with the reason, and once space is back
/// jobs run again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_disk_refuses_clearly_and_recovers_without_a_restart() {
    if !require_root("a_full_state_disk_refuses_clearly_and_recovers_without_a_restart") {
        return;
    }
    let config = config_file("state_reserve = \"8M\"\n");
    let args = ["--config", config.path().to_str().unwrap()];
    // The daemon's state directory on a small filesystem of its own.
    let mut daemon = Daemon::start_with(&args);
    let _small_disk = daemon.restart_on_small_state_disk(&args);
    let channel = channel_as(&daemon.socket, 0, 0).await;
    let mut store = ContentStoreClient::new(channel.clone());
    let mut jobs = JobsClient::new(channel);
    let job = |name: &str| SubmitRequest {
        spec: Some(JobSpec {
            name: name.into(),
            image: "host".into(),
            steps: vec![Step {
                name: "t".into(),
                argv: vec!["/bin/sh".into(), "-c".into(), "echo ran".into()],
                ..Default::default()
            }],
            ..Default::default()
        }),
        idempotency_key: String::new(),
    };

    // Something else fills the disk to the last block.
    let filler = daemon.state.join("filler");
    {
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 1 << 20];
        while std::io::Write::write_all(&mut file, &block).is_ok() {}
    }
    let (_, messages) = write_messages(&[7u8; 300_000]);
    let err = store
        .write(tokio_stream::iter(messages.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(
        !err.message().contains(daemon.state.to_str().unwrap()),
        "{err}"
    );
    let err = jobs.submit(job("full")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");

    // Space comes back: everything works again, no restart.
    std::fs::remove_file(&filler).unwrap();
    store.write(tokio_stream::iter(messages)).await.unwrap();
    let id = jobs.submit(job("after")).await.unwrap().into_inner().job_id;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let record = jobs
            .get(GetRequest { job_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        if record.state == JobState::Succeeded as i32 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{record:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Filled while a job runs: the job still ends, with the reason.
    let filler_job = SubmitRequest {
        spec: Some(JobSpec {
            name: "fills".into(),
            image: "host".into(),
            steps: vec![Step {
                name: "t".into(),
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "sleep 1; head -c 20971520 /dev/zero".into(),
                ],
                ..Default::default()
            }],
            ..Default::default()
        }),
        idempotency_key: String::new(),
    };
    let id = jobs.submit(filler_job).await.unwrap().into_inner().job_id;
    // Filled below the reserve, not to the last block: the job's log and link no longer
    // fit, its record still does.
    {
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 1 << 20];
        while std::io::Write::write_all(&mut file, &block).is_ok() {}
        let full = file.metadata().unwrap().len();
        file.set_len(full - (4 << 20)).unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let record = loop {
        let record = jobs
            .get(GetRequest { job_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        if record.finished_unix_ms != 0 {
            break record;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never ended: {record:?}\n{}",
            daemon.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(record.state, JobState::Error as i32, "{record:?}");
    assert!(record.message.contains("disk is full"), "{record:?}");
    std::fs::remove_file(&filler).unwrap();
    daemon.stop();
}
