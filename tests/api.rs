//! The kiln.v1 gRPC API driven directly, as an orchestrator would: status codes
//! for bad requests, the content store's digest check, idempotent submission and
//! the event stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use agent_proto::v1::attestations_client::AttestationsClient;
use agent_proto::v1::content_store_client::ContentStoreClient;
use agent_proto::v1::jobs_client::JobsClient;
use agent_proto::v1::{
    job_event, write_request, GetProvenanceRequest, GetRequest, JobSpec, JobState, ReadRequest,
    Step, SubmitRequest, WatchRequest, WriteHeader, WriteRequest,
};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use support::*;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Code;

async fn channel(daemon: &Daemon) -> Channel {
    let socket = daemon.socket.clone();
    Endpoint::try_from("http://kiln.invalid")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

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
