//! An in-process CAS on loopback for the worker's unit tests: a real tonic server, so the
//! client's requests and checks are exercised over gRPC. It can be told to lie.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::bytestream;
use bazel_remote_apis::google::rpc;
use bytestream::byte_stream_server::{ByteStream, ByteStreamServer};
use reapi::capabilities_server::{Capabilities, CapabilitiesServer};
use reapi::content_addressable_storage_server::{
    ContentAddressableStorage, ContentAddressableStorageServer,
};
use tonic::{Request, Response, Status};

use super::cas::{CasClient, Digest};

type Blobs = Arc<Mutex<HashMap<String, Vec<u8>>>>;
type Served<T> = tokio_stream::Iter<std::vec::IntoIter<Result<T, Status>>>;

#[derive(Clone, Default)]
struct FakeCas {
    /// What the server answers for a hash: normally the blob, or a lie.
    blobs: Blobs,
    max_batch: i64,
    stall: Stall,
}

/// A CAS that stops answering: each call holds forever, after telling the test.
#[derive(Clone, Default)]
struct Stall {
    on: Arc<std::sync::atomic::AtomicBool>,
    arrived: Arc<tokio::sync::Notify>,
}

/// Turns a [`Fake::stall_switch`] on.
pub fn stall_on(switch: &std::sync::atomic::AtomicBool) {
    switch.store(true, std::sync::atomic::Ordering::SeqCst);
}

impl Stall {
    async fn hold_if_on(&self) {
        if self.on.load(std::sync::atomic::Ordering::SeqCst) {
            self.arrived.notify_one();
            std::future::pending::<()>().await;
        }
    }
}

fn lock(blobs: &Blobs) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
    blobs
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[tonic::async_trait]
impl Capabilities for FakeCas {
    async fn get_capabilities(
        &self,
        _: Request<reapi::GetCapabilitiesRequest>,
    ) -> Result<Response<reapi::ServerCapabilities>, Status> {
        Ok(Response::new(reapi::ServerCapabilities {
            cache_capabilities: Some(reapi::CacheCapabilities {
                digest_functions: vec![reapi::digest_function::Value::Sha256 as i32],
                max_batch_total_size_bytes: self.max_batch,
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl ContentAddressableStorage for FakeCas {
    async fn find_missing_blobs(
        &self,
        request: Request<reapi::FindMissingBlobsRequest>,
    ) -> Result<Response<reapi::FindMissingBlobsResponse>, Status> {
        self.stall.hold_if_on().await;
        let blobs = lock(&self.blobs);
        let missing = request
            .into_inner()
            .blob_digests
            .into_iter()
            .filter(|d| !blobs.contains_key(&d.hash))
            .collect();
        Ok(Response::new(reapi::FindMissingBlobsResponse {
            missing_blob_digests: missing,
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<reapi::BatchUpdateBlobsRequest>,
    ) -> Result<Response<reapi::BatchUpdateBlobsResponse>, Status> {
        self.stall.hold_if_on().await;
        let mut blobs = lock(&self.blobs);
        let mut responses = Vec::new();
        for entry in request.into_inner().requests {
            let digest = entry.digest.unwrap_or_default();
            let ok = Digest::of(&entry.data).hash() == digest.hash;
            if ok {
                blobs.insert(digest.hash.clone(), entry.data);
            }
            responses.push(reapi::batch_update_blobs_response::Response {
                digest: Some(digest),
                status: Some(rpc::Status {
                    code: if ok { 0 } else { 3 },
                    ..Default::default()
                }),
            });
        }
        Ok(Response::new(reapi::BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<reapi::BatchReadBlobsRequest>,
    ) -> Result<Response<reapi::BatchReadBlobsResponse>, Status> {
        self.stall.hold_if_on().await;
        let blobs = lock(&self.blobs);
        let responses = request
            .into_inner()
            .digests
            .into_iter()
            .map(|digest| {
                let (data, code) = match blobs.get(&digest.hash) {
                    Some(data) => (data.clone(), 0),
                    None => (Vec::new(), tonic::Code::NotFound as i32),
                };
                reapi::batch_read_blobs_response::Response {
                    digest: Some(digest),
                    data,
                    compressor: 0,
                    status: Some(rpc::Status {
                        code,
                        ..Default::default()
                    }),
                }
            })
            .collect();
        Ok(Response::new(reapi::BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = Served<reapi::GetTreeResponse>;
    async fn get_tree(
        &self,
        _: Request<reapi::GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        Err(Status::unimplemented("GetTree"))
    }

    async fn split_blob(
        &self,
        _: Request<reapi::SplitBlobRequest>,
    ) -> Result<Response<reapi::SplitBlobResponse>, Status> {
        Err(Status::unimplemented("SplitBlob"))
    }

    type GetChunkMappingStream = Served<reapi::GetChunkMappingResponse>;
    async fn get_chunk_mapping(
        &self,
        _: Request<reapi::GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented("GetChunkMapping"))
    }

    async fn splice_blob(
        &self,
        _: Request<reapi::SpliceBlobRequest>,
    ) -> Result<Response<reapi::SpliceBlobResponse>, Status> {
        Err(Status::unimplemented("SpliceBlob"))
    }

    async fn register_chunk_mapping(
        &self,
        _: Request<tonic::Streaming<reapi::RegisterChunkMappingRequest>>,
    ) -> Result<Response<reapi::RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented("RegisterChunkMapping"))
    }
}

#[tonic::async_trait]
impl ByteStream for FakeCas {
    type ReadStream = Served<bytestream::ReadResponse>;
    async fn read(
        &self,
        request: Request<bytestream::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        self.stall.hold_if_on().await;
        let name = request.into_inner().resource_name;
        let hash = name
            .split('/')
            .rev()
            .nth(1)
            .ok_or_else(|| Status::invalid_argument("resource name"))?
            .to_string();
        let data = lock(&self.blobs)
            .get(&hash)
            .cloned()
            .ok_or_else(|| Status::not_found(hash))?;
        // Small chunks, so that a reader must stop in the middle of a stream.
        let chunks: Vec<Result<bytestream::ReadResponse, Status>> = data
            .chunks(16 * 1024)
            .map(|c| Ok(bytestream::ReadResponse { data: c.to_vec() }))
            .collect();
        Ok(Response::new(tokio_stream::iter(chunks)))
    }

    async fn write(
        &self,
        request: Request<tonic::Streaming<bytestream::WriteRequest>>,
    ) -> Result<Response<bytestream::WriteResponse>, Status> {
        self.stall.hold_if_on().await;
        let mut stream = request.into_inner();
        let mut name = String::new();
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await? {
            if name.is_empty() {
                name = chunk.resource_name;
            }
            data.extend_from_slice(&chunk.data);
            if chunk.finish_write {
                break;
            }
        }
        let parts: Vec<&str> = name.split('/').collect();
        let uploads = parts
            .iter()
            .position(|p| *p == "uploads")
            .ok_or_else(|| Status::invalid_argument(name.clone()))?;
        let hash = parts
            .get(uploads + 3)
            .ok_or_else(|| Status::invalid_argument(name.clone()))?;
        if Digest::of(&data).hash() != *hash {
            return Err(Status::invalid_argument("digest mismatch"));
        }
        let committed_size = i64::try_from(data.len()).unwrap_or(i64::MAX);
        lock(&self.blobs).insert((*hash).to_string(), data);
        Ok(Response::new(bytestream::WriteResponse { committed_size }))
    }

    async fn query_write_status(
        &self,
        _: Request<bytestream::QueryWriteStatusRequest>,
    ) -> Result<Response<bytestream::QueryWriteStatusResponse>, Status> {
        Err(Status::unimplemented("QueryWriteStatus"))
    }
}

/// A running fake CAS and a client of it.
pub(crate) struct Fake {
    blobs: Blobs,
    stall: Stall,
    pub client: CasClient,
    _server: tokio::task::JoinHandle<()>,
}

impl Fake {
    /// Starts a server on loopback; `max_batch` is what GetCapabilities states (0: none).
    pub async fn start(max_batch: i64) -> Fake {
        let blobs = Blobs::default();
        let stall = Stall::default();
        let service = FakeCas {
            blobs: blobs.clone(),
            max_batch,
            stall: stall.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(CapabilitiesServer::new(service.clone()))
                .add_service(ContentAddressableStorageServer::new(service.clone()))
                .add_service(ByteStreamServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let client = CasClient::connect(channel, "main").await.unwrap();
        Fake {
            blobs,
            stall,
            client,
            _server: server,
        }
    }

    /// Stores a blob under its own digest.
    pub fn put(&self, data: &[u8]) -> Digest {
        let digest = Digest::of(data);
        lock(&self.blobs).insert(digest.hash().to_string(), data.to_vec());
        digest
    }

    /// Stores a message under its own digest.
    pub fn put_message(&self, message: &impl prost::Message) -> Digest {
        self.put(&message.encode_to_vec())
    }

    /// From now on every call holds without an answer (an engine that stopped serving).
    pub fn stall(&self) {
        stall_on(&self.stall.on);
    }

    /// A switch that does what [`Fake::stall`] does, for code that runs elsewhere.
    pub fn stall_switch(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.stall.on.clone()
    }

    /// Waits until a call is held by [`Fake::stall`].
    pub async fn stalled(&self) {
        self.stall.arrived.notified().await;
    }

    /// Makes the server answer `data` when asked for `digest` (a lie).
    pub fn lie(&self, digest: &Digest, data: &[u8]) {
        lock(&self.blobs).insert(digest.hash().to_string(), data.to_vec());
    }

    pub fn get(&self, digest: &Digest) -> Option<Vec<u8>> {
        lock(&self.blobs).get(digest.hash()).cloned()
    }
}
