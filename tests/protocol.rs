//! kiln.v1 at the wire level: bytes that are not a valid message are the client's
//! error (INVALID_ARGUMENT), never Kiln's (INTERNAL).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use prost::bytes::{Buf, BufMut};
use support::*;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

/// Sends and receives message bodies as they are, unparsed.
#[derive(Default)]
struct RawCodec;

struct Raw;

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_invalid_arguments() {
    if !require_root("malformed_messages_are_invalid_arguments") {
        return;
    }
    let daemon = Daemon::start();
    let channel = channel_as(&daemon.socket, 0, 0).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    let cases: [(&str, Vec<u8>); 3] = [
        // A field tag whose varint never ends.
        ("/kiln.v1.Jobs/Get", vec![0xff, 0xff, 0xff]),
        // job_id (field 1, length-delimited) holding bytes that are not UTF-8.
        ("/kiln.v1.Jobs/Get", vec![0x0a, 0x02, 0xc3, 0x28]),
        // A Submit whose spec claims more bytes than follow.
        ("/kiln.v1.Jobs/Submit", vec![0x0a, 0x40, 0x0a]),
    ];
    for (method, body) in cases {
        grpc.ready().await.unwrap();
        let err = grpc
            .unary(
                tonic::Request::new(body.clone()),
                tonic::codegen::http::uri::PathAndQuery::from_static(method),
                RawCodec,
            )
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{method} {body:?}: {err}"
        );
    }

    // NUL is refused in the idempotency key as everywhere else.
    let mut jobs =
        agent_proto::v1::jobs_client::JobsClient::new(channel_as(&daemon.socket, 0, 0).await);
    let err = jobs
        .submit(agent_proto::v1::SubmitRequest {
            spec: Some(agent_proto::v1::JobSpec {
                name: "nul".into(),
                image: "host".into(),
                steps: vec![agent_proto::v1::Step {
                    name: "t".into(),
                    argv: vec!["/bin/true".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            idempotency_key: "key\0with-nul".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("idempotency_key"), "{err}");
}
