//! The kiln.v1 gRPC API driven directly, as an orchestrator would: status codes
//! for bad requests, the content store's digest check, idempotent submission and
//! the event stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use agent_proto::v1::attestations_client::AttestationsClient;
use agent_proto::v1::content_store_client::ContentStoreClient;
use agent_proto::v1::jobs_client::JobsClient;
use std::collections::BTreeMap;

use agent_proto::v1::{
    job_event, write_request, CancelRequest, GetProvenanceRequest, GetRequest, Input, Job, JobSpec,
    JobState, ListLinksRequest, OutputStream, ReadRequest, Step, SubmitRequest, WatchRequest,
    WriteHeader, WriteRequest,
};
use sha2::{Digest, Sha256};
use support::*;
use tonic::transport::Channel;
use tonic::Code;

fn write_messages(digest: &str, data: &[u8]) -> Vec<WriteRequest> {
    vec![
        WriteRequest {
            part: Some(write_request::Part::Header(WriteHeader {
                digest: digest.to_string(),
                size: data.len() as u64,
            })),
        },
        WriteRequest {
            part: Some(write_request::Part::Data(data.to_vec())),
        },
    ]
}

fn true_job() -> JobSpec {
    JobSpec {
        name: "api".into(),
        image: "host".into(),
        steps: vec![Step {
            name: "t".into(),
            argv: vec!["/bin/sh".into(), "-c".into(), "echo streamed".into()],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_store_checks_digests_and_status_codes_are_precise() {
    if !require_root("content_store_checks_digests_and_status_codes_are_precise") {
        return;
    }
    let daemon = Daemon::start();
    let channel = channel(&daemon).await;
    let mut store = ContentStoreClient::new(channel.clone());

    let data = b"kiln content".to_vec();
    let digest = hex::encode(Sha256::digest(&data));
    let reply = store
        .write(tokio_stream::iter(write_messages(&digest, &data)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.digest, digest);
    let mut read = store
        .read(ReadRequest {
            digest: digest.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut back = Vec::new();
    while let Some(chunk) = read.message().await.unwrap() {
        back.extend(chunk.data);
    }
    assert_eq!(back, data);

    // Content that does not hash to the declared digest is refused.
    let wrong = hex::encode(Sha256::digest(b"something else"));
    let err = store
        .write(tokio_stream::iter(write_messages(&wrong, &data)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("declared"), "{err}");

    let err = store
        .read(ReadRequest {
            digest: "../../etc/passwd".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = store
        .read(ReadRequest {
            digest: "0".repeat(64),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let mut jobs = JobsClient::new(channel);
    let mut bad = true_job();
    bad.steps[0].argv.clear();
    let err = jobs
        .submit(SubmitRequest {
            spec: Some(bad),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("steps[0].argv"), "{err}");
    let err = jobs
        .get(GetRequest {
            job_id: "00000000-0000-0000-0000-000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = jobs
        .get(GetRequest {
            job_id: "../x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submission_is_idempotent_and_watch_streams_every_event() {
    if !require_root("submission_is_idempotent_and_watch_streams_every_event") {
        return;
    }
    let daemon = Daemon::start();
    let mut jobs = JobsClient::new(channel(&daemon).await);
    let submit = |key: &str| SubmitRequest {
        spec: Some(true_job()),
        idempotency_key: key.to_string(),
    };
    let first = jobs
        .submit(submit("build-42"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let again = jobs
        .submit(submit("build-42"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    assert_eq!(first, again, "same idempotency key, different jobs");
    let other = jobs
        .submit(submit("build-43"))
        .await
        .unwrap()
        .into_inner()
        .job_id;
    assert_ne!(first, other);

    let mut stream = jobs
        .watch(WatchRequest {
            job_id: first.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut kinds = Vec::new();
    let mut output = Vec::new();
    let mut sequence = 0;
    while let Some(event) = stream.message().await.unwrap() {
        assert_eq!(event.sequence, sequence, "events out of order");
        sequence += 1;
        match event.event.unwrap() {
            job_event::Event::Queued(_) => kinds.push("queued"),
            job_event::Event::Started(_) => kinds.push("started"),
            job_event::Event::StepStarted(_) => kinds.push("step-started"),
            job_event::Event::Output(o) => output.extend(o.data),
            job_event::Event::StepFinished(s) => {
                assert!(!s.link_digest.is_empty());
                kinds.push("step-finished")
            }
            job_event::Event::JobFinished(job) => {
                assert_eq!(job.state, JobState::Succeeded as i32);
                kinds.push("job-finished")
            }
            job_event::Event::OutputDropped(d) => panic!("output dropped: {d:?}"),
        }
    }
    assert_eq!(
        kinds,
        [
            "queued",
            "started",
            "step-started",
            "step-finished",
            "job-finished"
        ]
    );
    assert_eq!(output, b"streamed\n");

    // A job without outputs has nothing to attest in SLSA provenance.
    let mut attestations = AttestationsClient::new(channel(&daemon).await);
    let err = attestations
        .get_provenance(GetProvenanceRequest { job_id: first })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
}

/// A daemon with these config lines (and a uid range of its own).
fn daemon_with(config: &str) -> (Daemon, tempfile::NamedTempFile) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), config).unwrap();
    let daemon = Daemon::start_with(&["--config", file.path().to_str().unwrap()]);
    (daemon, file)
}

fn shell_step(name: &str, script: &str) -> Step {
    Step {
        name: name.into(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

async fn submit(
    jobs: &mut JobsClient<Channel>,
    spec: JobSpec,
    key: &str,
) -> Result<String, tonic::Status> {
    Ok(jobs
        .submit(SubmitRequest {
            spec: Some(spec),
            idempotency_key: key.into(),
        })
        .await?
        .into_inner()
        .job_id)
}

/// Everything one Watch stream carries: output per (step, stream), and the final job.
struct Watched {
    output: BTreeMap<(String, i32), Vec<u8>>,
    dropped: usize,
    job: Option<Job>,
}

async fn read_watch(stream: &mut tonic::Streaming<agent_proto::v1::JobEvent>) -> Watched {
    let mut watched = Watched {
        output: BTreeMap::new(),
        dropped: 0,
        job: None,
    };
    let mut sequence = 0;
    while let Some(event) = stream.message().await.unwrap() {
        assert_eq!(event.sequence, sequence, "events out of order");
        sequence += 1;
        match event.event.unwrap() {
            job_event::Event::Output(o) => watched
                .output
                .entry((o.step, o.stream))
                .or_default()
                .extend(o.data),
            job_event::Event::OutputDropped(_) => watched.dropped += 1,
            job_event::Event::JobFinished(job) => watched.job = Some(job),
            _ => {}
        }
    }
    watched
}

async fn read_blob(store: &mut ContentStoreClient<Channel>, digest: &str) -> Vec<u8> {
    let mut read = store
        .read(ReadRequest {
            digest: digest.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = read.message().await.unwrap() {
        data.extend(chunk.data);
    }
    data
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Step logs go to the content store, up to the per-stream and per-job caps, and Watch
/// carries exactly what was stored: live, to a client that stalls behind the daemon's
/// bounded in-memory window, and replayed after the job ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_logs_are_stored_capped_and_watched_whole() {
    if !require_root("step_logs_are_stored_capped_and_watched_whole") {
        return;
    }
    let (daemon, _config) = daemon_with(
        "uid_base = 350000000\nmax_log_bytes = 2097152\nmax_job_log_bytes = \"5M\"\n\
         max_event_memory = \"256K\"\n",
    );
    let channel = channel(&daemon).await;
    let mut jobs = JobsClient::new(channel.clone());
    let mut store = ContentStoreClient::new(channel.clone());
    const MIB: usize = 1 << 20;
    // Each step: 3 MiB of zeros to stdout, then 1 MiB of 'e' to stderr.
    let flood = "head -c 3145728 /dev/zero; head -c 1048576 /dev/zero | tr '\\0' e >&2";
    let spec = JobSpec {
        name: "log-flood".into(),
        image: "host".into(),
        steps: (1..=3)
            .map(|i| shell_step(&format!("s{i}"), flood))
            .collect(),
        ..Default::default()
    };
    let id = submit(&mut jobs, spec, "").await.unwrap();
    // A client that subscribes at once and reads nothing until the job has ended.
    let mut stalled = jobs
        .watch(WatchRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let live = read_watch(
        &mut jobs
            .watch(WatchRequest { job_id: id.clone() })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let job = live.job.clone().expect("the live stream ends with the job");
    assert_eq!(job.state, JobState::Succeeded as i32, "{}", job.message);

    // What is stored: each stream up to 2 MiB, and 5 MiB over the job.
    let zeros = |n: usize| vec![0u8; n];
    let es = |n: usize| vec![b'e'; n];
    let expected: BTreeMap<(String, i32), Vec<u8>> = [
        (("s1", OutputStream::Stdout), zeros(2 * MIB)),
        (("s1", OutputStream::Stderr), es(MIB)),
        (("s2", OutputStream::Stdout), zeros(2 * MIB)),
    ]
    .into_iter()
    .map(|((step, stream), data)| ((step.to_string(), stream as i32), data))
    .collect();
    for step in &job.steps {
        assert_eq!(step.stdout_bytes, 3 * MIB as u64, "{step:?}");
        assert_eq!(step.stderr_bytes, MIB as u64, "{step:?}");
        for (stream, digest, size) in [
            (OutputStream::Stdout, &step.stdout_digest, step.stdout_size),
            (OutputStream::Stderr, &step.stderr_digest, step.stderr_size),
        ] {
            let want = expected
                .get(&(step.name.clone(), stream as i32))
                .cloned()
                .unwrap_or_default();
            assert_eq!(size, want.len() as u64, "{} {stream:?}", step.name);
            assert_eq!(*digest, sha256(&want), "{} {stream:?}", step.name);
            assert_eq!(read_blob(&mut store, digest).await, want);
        }
    }
    // The link still hashes each whole stream.
    let links = AttestationsClient::new(channel.clone())
        .list_links(ListLinksRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner()
        .links;
    let link: serde_json::Value = serde_json::from_slice(&links[0].content).unwrap();
    let kiln = &link["signed"]["byproducts"]["kiln"];
    assert_eq!(kiln["stdout_sha256"], sha256(&zeros(3 * MIB)), "{kiln}");

    let equal = |what: &str, watched: &Watched| {
        assert_eq!(watched.dropped, 0, "{what}: output dropped");
        assert_eq!(
            watched.output.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{what}"
        );
        for (key, data) in &watched.output {
            assert!(
                expected[key] == *data,
                "{what}: {key:?} differs from the stored log"
            );
        }
        assert!(watched.job.is_some(), "{what}: no JobFinished");
    };
    equal("live", &live);
    // The stalled client fell behind the 128 KiB window of the job: it gets the rest of
    // each stream from the store, whole and in order.
    equal("stalled", &read_watch(&mut stalled).await);
    // After the end, from the record and the store.
    let replay = read_watch(
        &mut jobs
            .watch(WatchRequest { job_id: id.clone() })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    equal("replayed", &replay);
}

fn memory_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim_start_matches(':').split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap()
}

/// A job flooding its logs (256 MiB here) leaves the daemon's memory where it was, give
/// or take the bounded window: logs go to disk, and a finished job holds no output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_flood_does_not_grow_the_daemon() {
    if !require_root("a_log_flood_does_not_grow_the_daemon") {
        return;
    }
    let (daemon, _config) = daemon_with(
        "uid_base = 351000000\nmax_job_log_bytes = \"1G\"\nmax_event_memory = \"4M\"\n",
    );
    let pid = daemon.pid().unwrap();
    let channel = channel(&daemon).await;
    let mut jobs = JobsClient::new(channel);
    let before = memory_kib(pid, "VmRSS");
    let flood = "head -c 33554432 /dev/zero; head -c 33554432 /dev/zero >&2";
    let spec = JobSpec {
        name: "log-flood".into(),
        image: "host".into(),
        steps: (1..=4)
            .map(|i| shell_step(&format!("s{i}"), flood))
            .collect(),
        ..Default::default()
    };
    let id = submit(&mut jobs, spec, "").await.unwrap();
    let watched = read_watch(
        &mut jobs
            .watch(WatchRequest { job_id: id })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let job = watched.job.unwrap();
    assert_eq!(job.state, JobState::Succeeded as i32, "{}", job.message);
    let stored: u64 = job
        .steps
        .iter()
        .map(|s| s.stdout_size + s.stderr_size)
        .sum();
    assert_eq!(stored, 256 << 20);
    let (after, peak) = (memory_kib(pid, "VmRSS"), memory_kib(pid, "VmHWM"));
    // Holding the output would take 256 MiB; the daemon may use 128 MiB more at most.
    assert!(
        after < before + (128 << 10) && peak < before + (128 << 10),
        "the daemon grew from {before} KiB to {after} KiB (peak {peak} KiB) over a job that wrote 256 MiB of logs"
    );
}

/// The spec's size and inputs are bounded by the config, with errors naming the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_and_upload_sizes_are_bounded() {
    if !require_root("submit_and_upload_sizes_are_bounded") {
        return;
    }
    let (daemon, _config) = daemon_with(
        "uid_base = 352000000\nmax_inputs = 100\nmax_spec_bytes = \"64K\"\nmax_blob_size = \"1M\"\n",
    );
    let channel = channel(&daemon).await;
    let mut jobs = JobsClient::new(channel.clone());
    let mut store = ContentStoreClient::new(channel);

    // Uploads: a declared size above max_blob_size is refused on the header.
    let err = store
        .write(tokio_stream::iter(vec![WriteRequest {
            part: Some(write_request::Part::Header(WriteHeader {
                digest: "0".repeat(64),
                size: 1 << 40,
            })),
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(
        err.message()
            .contains("1099511627776 bytes declared, more than the runner's max_blob_size"),
        "{err}"
    );
    let data = vec![7u8; 1 << 20];
    let digest = sha256(&data);
    let reply = store
        .write(tokio_stream::iter(write_messages(&digest, &data)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.size, 1 << 20);

    let inputs = |n: usize| -> Vec<Input> {
        (0..n)
            .map(|i| Input {
                path: format!("src/d{}/f{i}", i % 7),
                digest: digest.clone(),
                executable: false,
            })
            .collect()
    };
    let mut spec = true_job();
    spec.inputs = inputs(101);
    let err = submit(&mut jobs, spec.clone(), "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(
        err.message()
            .contains("101 inputs, more than the runner's max_inputs of 100"),
        "{err}"
    );
    spec.steps[0].argv.push("x".repeat(70_000));
    spec.inputs = inputs(100);
    let err = submit(&mut jobs, spec.clone(), "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("max_spec_bytes"), "{err}");
    // At the limits: accepted, and runs.
    spec.steps[0].argv.pop();
    let id = submit(&mut jobs, spec, "").await.unwrap();
    let watched = read_watch(
        &mut jobs
            .watch(WatchRequest { job_id: id })
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    let job = watched.job.unwrap();
    assert_eq!(job.state, JobState::Succeeded as i32, "{}", job.message);
}

/// The queue holds at most max_queued_jobs: counted from the database, so cancelled and
/// started jobs make room and resubmitting an accepted job is not a new job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_is_bounded() {
    if !require_root("the_queue_is_bounded") {
        return;
    }
    let (daemon, _config) =
        daemon_with("uid_base = 353000000\nmax_concurrent_jobs = 1\nmax_queued_jobs = 2\n");
    let mut jobs = JobsClient::new(channel(&daemon).await);
    let sleeper = |name: &str| JobSpec {
        name: name.into(),
        image: "host".into(),
        steps: vec![shell_step("wait", "sleep 600")],
        ..Default::default()
    };
    // The only slot: running once its step started.
    let running = submit(&mut jobs, sleeper("running"), "").await.unwrap();
    let mut stream = jobs
        .watch(WatchRequest {
            job_id: running.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(event) = stream.message().await.unwrap() {
        if matches!(event.event, Some(job_event::Event::StepStarted(_))) {
            break;
        }
    }
    let first = submit(&mut jobs, sleeper("q1"), "q1").await.unwrap();
    let second = submit(&mut jobs, sleeper("q2"), "").await.unwrap();
    let err = submit(&mut jobs, sleeper("q3"), "").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("max_queued_jobs is 2"), "{err}");
    // The same submission again answers with the job it made.
    assert_eq!(submit(&mut jobs, sleeper("q1"), "q1").await.unwrap(), first);
    // A cancelled job leaves the queue.
    jobs.cancel(CancelRequest {
        job_id: second.clone(),
    })
    .await
    .unwrap();
    let third = submit(&mut jobs, sleeper("q3"), "").await.unwrap();
    for id in [first, third, running] {
        jobs.cancel(CancelRequest { job_id: id }).await.unwrap();
    }
}
