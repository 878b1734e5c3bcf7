//! A client of a remote-execution scheduler's content-addressable storage for one instance
//! name. Everything the server sends is checked: a blob is read only up to its digest's size
//! and must hash to its digest, a batch answer must answer exactly what was asked.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::google::bytestream;
use bytestream::byte_stream_client::ByteStreamClient;
use prost::Message;
use reapi::capabilities_client::CapabilitiesClient;
use reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;

use crate::error::{Result, RunnerError};

/// SHA-256 of the empty blob: never fetched, never uploaded.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// The batch size used when the server states none: well below gRPC's usual 4 MiB message
/// limit, leaving room for the request's other fields.
pub const DEFAULT_MAX_BATCH_BYTES: u64 = 3 * 1024 * 1024;
/// Per-blob framing in a batch request (digest, status), counted against the batch size.
const BATCH_ENTRY_OVERHEAD: u64 = 256;
/// Chunk size of ByteStream writes.
const WRITE_CHUNK_BYTES: usize = 1024 * 1024;
/// Digests per FindMissingBlobs request (keeps each request far below the message limit).
const FIND_MISSING_CHUNK: usize = 4096;
/// The largest gRPC message accepted from the server: a batch answer, plus framing.
const MAX_DECODING_BYTES: usize = 8 * 1024 * 1024;

/// A validated SHA-256 digest: 64 lowercase hex digits and a non-negative size.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hash: String,
    size: u64,
}

impl Digest {
    /// Validates a digest received from a client or the scheduler.
    pub fn from_proto(digest: &reapi::Digest) -> Result<Self> {
        let hash = &digest.hash;
        if hash.len() != 64
            || !hash
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(RunnerError::invalid(
                "digest",
                "the hash is not 64 lowercase hexadecimal digits (SHA-256)",
            ));
        }
        let size = u64::try_from(digest.size_bytes)
            .map_err(|_| RunnerError::invalid("digest", "negative size"))?;
        if size == 0 && hash != EMPTY_SHA256 {
            return Err(RunnerError::invalid(
                "digest",
                "size 0 but not the empty blob's hash",
            ));
        }
        Ok(Digest {
            hash: hash.clone(),
            size,
        })
    }

    /// Like [`Digest::from_proto`] for an optional field, naming the field when it is absent.
    pub fn from_field(digest: Option<&reapi::Digest>, field: &str) -> Result<Self> {
        let digest = digest.ok_or_else(|| RunnerError::invalid(field, "missing digest"))?;
        Self::from_proto(digest).map_err(|e| match e {
            RunnerError::InvalidArgument { reason, .. } => RunnerError::invalid(field, reason),
            other => other,
        })
    }

    /// The digest of some bytes.
    pub fn of(bytes: &[u8]) -> Self {
        Digest {
            hash: hex::encode(Sha256::digest(bytes)),
            size: bytes.len() as u64,
        }
    }

    /// The digest of an encoded protobuf message, and its bytes.
    pub fn of_message(message: &impl Message) -> (Self, Vec<u8>) {
        let bytes = message.encode_to_vec();
        (Self::of(&bytes), bytes)
    }

    pub(crate) fn from_parts(hash: String, size: u64) -> Self {
        Digest { hash, size }
    }

    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_empty_blob(&self) -> bool {
        self.size == 0
    }

    pub fn to_proto(&self) -> reapi::Digest {
        reapi::Digest {
            hash: self.hash.clone(),
            // Sizes come from an i64 or from a bounded local file.
            size_bytes: i64::try_from(self.size).unwrap_or(i64::MAX),
        }
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.hash, self.size)
    }
}

/// Hashes data as it arrives and refuses more than the expected size.
struct BoundedHasher<'a> {
    expected: &'a Digest,
    hasher: Sha256,
    received: u64,
}

impl<'a> BoundedHasher<'a> {
    fn new(expected: &'a Digest) -> Self {
        BoundedHasher {
            expected,
            hasher: Sha256::new(),
            received: 0,
        }
    }

    fn update(&mut self, chunk: &[u8]) -> Result<()> {
        self.received = self.received.saturating_add(chunk.len() as u64);
        if self.received > self.expected.size {
            return Err(RunnerError::DigestMismatch(format!(
                "the CAS sent more than the {} bytes of blob {}",
                self.expected.size, self.expected.hash
            )));
        }
        self.hasher.update(chunk);
        Ok(())
    }

    fn finish(self) -> Result<()> {
        if self.received != self.expected.size {
            return Err(RunnerError::DigestMismatch(format!(
                "the CAS sent {} bytes for blob {} of {} bytes",
                self.received, self.expected.hash, self.expected.size
            )));
        }
        if hex::encode(self.hasher.finalize()) != self.expected.hash {
            return Err(RunnerError::DigestMismatch(format!(
                "the CAS sent content that does not hash to {}",
                self.expected.hash
            )));
        }
        Ok(())
    }
}

/// Checks a whole blob against its digest.
pub fn verify_blob(digest: &Digest, data: &[u8]) -> Result<()> {
    let mut hasher = BoundedHasher::new(digest);
    hasher.update(data)?;
    hasher.finish()
}

/// A blob to upload: in memory, an open local file, or a file of a workspace opened when it
/// is uploaded. A file's content is re-hashed as it is sent.
#[derive(Debug)]
pub enum UploadSource {
    Bytes(Vec<u8>),
    File(std::fs::File),
    Workspace(WorkspaceFile),
}

/// A regular file below a directory descriptor, opened only when it is uploaded (so that a
/// large output holds no descriptor until then), one component at a time with `O_NOFOLLOW`.
#[derive(Debug)]
pub struct WorkspaceFile {
    pub root: std::sync::Arc<std::os::fd::OwnedFd>,
    pub components: Vec<String>,
}

impl WorkspaceFile {
    pub fn open(&self) -> Result<std::fs::File> {
        use nix::fcntl::OFlag;
        use nix::sys::stat::Mode;
        let failed = |e: nix::errno::Errno| {
            RunnerError::FailedPrecondition(format!(
                "an output changed while it was uploaded ({}): {e}",
                self.components.join("/")
            ))
        };
        let (name, parents) = self
            .components
            .split_last()
            .ok_or_else(|| RunnerError::Internal("an output file without a name".into()))?;
        let mut dir: Option<std::os::fd::OwnedFd> = None;
        for component in parents {
            let next = match &dir {
                Some(fd) => {
                    nix::fcntl::openat(fd, component.as_str(), DIRECTORY_FLAGS, Mode::empty())
                }
                None => nix::fcntl::openat(
                    &*self.root,
                    component.as_str(),
                    DIRECTORY_FLAGS,
                    Mode::empty(),
                ),
            }
            .map_err(failed)?;
            dir = Some(next);
        }
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let fd = match &dir {
            Some(fd) => nix::fcntl::openat(fd, name.as_str(), flags, Mode::empty()),
            None => nix::fcntl::openat(&*self.root, name.as_str(), flags, Mode::empty()),
        }
        .map_err(failed)?;
        let stat = nix::sys::stat::fstat(&fd).map_err(failed)?;
        let kind =
            nix::sys::stat::SFlag::from_bits_truncate(stat.st_mode) & nix::sys::stat::SFlag::S_IFMT;
        if kind != nix::sys::stat::SFlag::S_IFREG {
            return Err(failed(nix::errno::Errno::EINVAL));
        }
        Ok(std::fs::File::from(fd))
    }
}

const DIRECTORY_FLAGS: nix::fcntl::OFlag = nix::fcntl::OFlag::O_RDONLY
    .union(nix::fcntl::OFlag::O_DIRECTORY)
    .union(nix::fcntl::OFlag::O_NOFOLLOW)
    .union(nix::fcntl::OFlag::O_CLOEXEC);

/// The content-addressable storage of one instance of a scheduler.
#[derive(Clone, Debug)]
pub struct CasClient {
    instance: String,
    cas: ContentAddressableStorageClient<Channel>,
    bytestream: ByteStreamClient<Channel>,
    max_batch_bytes: u64,
}

fn status_error(what: &str, status: tonic::Status) -> RunnerError {
    RunnerError::Unavailable(format!(
        "{what}: {} ({:?})",
        status.message(),
        status.code()
    ))
}

/// An instance name is part of ByteStream resource names: no empty or dot segments, and
/// none of the words that structure a resource name.
pub fn validate_instance_name(instance: &str) -> Result<()> {
    if instance.is_empty() {
        return Ok(());
    }
    for segment in instance.split('/') {
        if segment.is_empty()
            || segment == "."
            || segment == ".."
            || matches!(
                segment,
                "blobs" | "uploads" | "compressed-blobs" | "actions" | "operations"
            )
            || segment.chars().any(|c| c.is_control())
        {
            return Err(RunnerError::invalid(
                "instance name",
                format!("bad segment {segment:?}"),
            ));
        }
    }
    Ok(())
}

impl CasClient {
    /// A client with an explicit batch size (0: [`DEFAULT_MAX_BATCH_BYTES`]).
    pub fn new(channel: Channel, instance: &str, max_batch_bytes: u64) -> Result<Self> {
        validate_instance_name(instance)?;
        let max_batch_bytes = if max_batch_bytes == 0 {
            DEFAULT_MAX_BATCH_BYTES
        } else {
            // A server may state more than a gRPC message can carry.
            max_batch_bytes.min(DEFAULT_MAX_BATCH_BYTES)
        };
        Ok(CasClient {
            instance: instance.to_string(),
            cas: ContentAddressableStorageClient::new(channel.clone())
                .max_decoding_message_size(MAX_DECODING_BYTES),
            bytestream: ByteStreamClient::new(channel)
                .max_decoding_message_size(MAX_DECODING_BYTES),
            max_batch_bytes,
        })
    }

    /// A client whose batch size is the one the server states in GetCapabilities (bounded by
    /// [`DEFAULT_MAX_BATCH_BYTES`]). The server must offer SHA-256.
    pub async fn connect(channel: Channel, instance: &str) -> Result<Self> {
        validate_instance_name(instance)?;
        let capabilities = CapabilitiesClient::new(channel.clone())
            .get_capabilities(reapi::GetCapabilitiesRequest {
                instance_name: instance.to_string(),
            })
            .await
            .map_err(|s| status_error("GetCapabilities", s))?
            .into_inner();
        let cache = capabilities.cache_capabilities.unwrap_or_default();
        let sha256 = reapi::digest_function::Value::Sha256 as i32;
        if !cache.digest_functions.is_empty() && !cache.digest_functions.contains(&sha256) {
            return Err(RunnerError::FailedPrecondition(
                "the scheduler's CAS does not offer SHA-256".into(),
            ));
        }
        let max_batch = u64::try_from(cache.max_batch_total_size_bytes).unwrap_or(0);
        Self::new(channel, instance, max_batch)
    }

    pub fn instance_name(&self) -> &str {
        &self.instance
    }

    /// The largest batch (sum of blob sizes plus framing) this client sends or asks for.
    pub fn max_batch_bytes(&self) -> u64 {
        self.max_batch_bytes
    }

    fn fits_batch(&self, digest: &Digest) -> bool {
        digest.size.saturating_add(BATCH_ENTRY_OVERHEAD) <= self.max_batch_bytes
    }

    fn resource_prefix(&self) -> String {
        if self.instance.is_empty() {
            String::new()
        } else {
            format!("{}/", self.instance)
        }
    }

    /// The digests among `digests` that the CAS lacks (each asked once). An answer naming a
    /// digest that was not asked is an error.
    pub async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>> {
        let unique: Vec<&Digest> = {
            let mut seen = HashSet::new();
            digests
                .iter()
                .filter(|d| !d.is_empty_blob() && seen.insert(*d))
                .collect()
        };
        let mut missing = Vec::new();
        for chunk in unique.chunks(FIND_MISSING_CHUNK) {
            let asked: HashSet<&Digest> = chunk.iter().copied().collect();
            let response = self
                .cas
                .clone()
                .find_missing_blobs(reapi::FindMissingBlobsRequest {
                    instance_name: self.instance.clone(),
                    blob_digests: chunk.iter().map(|d| d.to_proto()).collect(),
                    digest_function: reapi::digest_function::Value::Sha256 as i32,
                })
                .await
                .map_err(|s| status_error("FindMissingBlobs", s))?
                .into_inner();
            let mut answered = HashSet::new();
            for digest in &response.missing_blob_digests {
                let digest = Digest::from_proto(digest)?;
                if !asked.contains(&digest) {
                    return Err(RunnerError::Unavailable(format!(
                        "FindMissingBlobs answered a digest that was not asked: {digest}"
                    )));
                }
                if answered.insert(digest.clone()) {
                    missing.push(digest);
                }
            }
        }
        Ok(missing)
    }

    /// Reads one blob into memory; at most `max_bytes` (its declared size is checked first).
    pub async fn read_blob(&self, digest: &Digest, max_bytes: u64) -> Result<Vec<u8>> {
        if digest.size > max_bytes {
            return Err(RunnerError::ResourceExhausted(format!(
                "blob {} of {} bytes is larger than the limit of {max_bytes} bytes",
                digest.hash, digest.size
            )));
        }
        if digest.is_empty_blob() {
            return Ok(Vec::new());
        }
        if self.fits_batch(digest) {
            let mut blobs = self.batch_read(std::slice::from_ref(digest)).await?;
            return blobs
                .remove(digest)
                .ok_or_else(|| RunnerError::Internal("a verified batch lost its blob".into()));
        }
        let mut data = Vec::new();
        self.stream_read(digest, &mut data).await?;
        Ok(data)
    }

    /// Reads a protobuf message stored as a blob (an Action, Command or Directory).
    pub async fn read_message<M: Message + Default>(
        &self,
        digest: &Digest,
        max_bytes: u64,
        what: &str,
    ) -> Result<M> {
        let bytes = self.read_blob(digest, max_bytes).await?;
        M::decode(bytes.as_slice()).map_err(|e| {
            RunnerError::invalid(what, format!("{digest} is not a valid message: {e}"))
        })
    }

    /// Reads many small blobs (each must fit a batch) with as few BatchReadBlobs as the
    /// batch size allows. Every answer is checked against its digest.
    pub async fn read_blobs(&self, digests: &[Digest]) -> Result<HashMap<Digest, Vec<u8>>> {
        let mut unique: Vec<Digest> = digests.to_vec();
        unique.sort();
        unique.dedup();
        let mut out = HashMap::new();
        let mut batch: Vec<Digest> = Vec::new();
        let mut batch_bytes = 0u64;
        for digest in unique {
            if digest.is_empty_blob() {
                out.insert(digest, Vec::new());
                continue;
            }
            if !self.fits_batch(&digest) {
                let mut data = Vec::new();
                self.stream_read(&digest, &mut data).await?;
                out.insert(digest, data);
                continue;
            }
            let cost = digest.size + BATCH_ENTRY_OVERHEAD;
            if batch_bytes + cost > self.max_batch_bytes {
                out.extend(self.batch_read(&batch).await?);
                batch.clear();
                batch_bytes = 0;
            }
            batch_bytes += cost;
            batch.push(digest);
        }
        if !batch.is_empty() {
            out.extend(self.batch_read(&batch).await?);
        }
        Ok(out)
    }

    async fn batch_read(&self, digests: &[Digest]) -> Result<HashMap<Digest, Vec<u8>>> {
        let response = self
            .cas
            .clone()
            .batch_read_blobs(reapi::BatchReadBlobsRequest {
                instance_name: self.instance.clone(),
                digests: digests.iter().map(|d| d.to_proto()).collect(),
                acceptable_compressors: Vec::new(),
                digest_function: reapi::digest_function::Value::Sha256 as i32,
            })
            .await
            .map_err(|s| status_error("BatchReadBlobs", s))?
            .into_inner();
        let asked: HashSet<&Digest> = digests.iter().collect();
        let mut out = HashMap::new();
        for answer in response.responses {
            let digest = Digest::from_field(answer.digest.as_ref(), "BatchReadBlobs answer")?;
            if !asked.contains(&digest) {
                return Err(RunnerError::Unavailable(format!(
                    "BatchReadBlobs answered a blob that was not asked: {digest}"
                )));
            }
            let code = answer.status.as_ref().map_or(0, |s| s.code);
            if code == tonic::Code::NotFound as i32 {
                return Err(RunnerError::NotFound(format!("blob {digest} in the CAS")));
            }
            if code != 0 {
                let message = answer.status.map(|s| s.message).unwrap_or_default();
                return Err(RunnerError::Unavailable(format!(
                    "BatchReadBlobs {digest}: {message} (code {code})"
                )));
            }
            if answer.compressor != 0 {
                return Err(RunnerError::Unavailable(format!(
                    "BatchReadBlobs {digest}: compressed although no compressor was accepted"
                )));
            }
            verify_blob(&digest, &answer.data)?;
            out.insert(digest, answer.data);
        }
        if let Some(missing) = digests.iter().find(|d| !out.contains_key(*d)) {
            return Err(RunnerError::Unavailable(format!(
                "BatchReadBlobs did not answer for {missing}"
            )));
        }
        Ok(out)
    }

    /// Streams one blob with ByteStream Read into `sink`, never more than its size, and
    /// checks its hash at the end (the caller discards `sink` on error).
    pub async fn stream_read(&self, digest: &Digest, sink: &mut impl Write) -> Result<()> {
        if digest.is_empty_blob() {
            return Ok(());
        }
        let request = bytestream::ReadRequest {
            resource_name: format!(
                "{}blobs/{}/{}",
                self.resource_prefix(),
                digest.hash,
                digest.size
            ),
            read_offset: 0,
            read_limit: digest.to_proto().size_bytes,
        };
        let mut stream = self
            .bytestream
            .clone()
            .read(request)
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => RunnerError::NotFound(format!("blob {digest} in the CAS")),
                _ => status_error("ByteStream Read", s),
            })?
            .into_inner();
        let mut hasher = BoundedHasher::new(digest);
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| status_error("ByteStream Read", s))?
        {
            hasher.update(&chunk.data)?;
            sink.write_all(&chunk.data)
                .map_err(RunnerError::io(format!("writing blob {digest}")))?;
        }
        hasher.finish()
    }

    /// Uploads the blobs the CAS lacks: small ones in batches, large ones with ByteStream
    /// Write. Each source must hold exactly its digest's content (it is not re-hashed).
    pub async fn upload_missing(&self, blobs: Vec<(Digest, UploadSource)>) -> Result<()> {
        let digests: Vec<Digest> = blobs.iter().map(|(d, _)| d.clone()).collect();
        let missing: HashSet<Digest> = self.find_missing(&digests).await?.into_iter().collect();
        let mut done = HashSet::new();
        let mut batch: Vec<reapi::batch_update_blobs_request::Request> = Vec::new();
        let mut batch_bytes = 0u64;
        for (digest, source) in blobs {
            if !missing.contains(&digest) || !done.insert(digest.clone()) {
                continue;
            }
            if !self.fits_batch(&digest) {
                self.stream_write(&digest, source).await?;
                continue;
            }
            let data = match source {
                UploadSource::Bytes(bytes) => bytes,
                UploadSource::File(mut file) => read_exact_size(&mut file, &digest)?,
                UploadSource::Workspace(source) => read_exact_size(&mut source.open()?, &digest)?,
            };
            let cost = digest.size + BATCH_ENTRY_OVERHEAD;
            if batch_bytes + cost > self.max_batch_bytes {
                self.batch_update(std::mem::take(&mut batch)).await?;
                batch_bytes = 0;
            }
            batch_bytes += cost;
            batch.push(reapi::batch_update_blobs_request::Request {
                digest: Some(digest.to_proto()),
                data,
                compressor: 0,
            });
        }
        if !batch.is_empty() {
            self.batch_update(batch).await?;
        }
        Ok(())
    }

    async fn batch_update(
        &self,
        requests: Vec<reapi::batch_update_blobs_request::Request>,
    ) -> Result<()> {
        let count = requests.len();
        let response = self
            .cas
            .clone()
            .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
                instance_name: self.instance.clone(),
                requests,
                digest_function: reapi::digest_function::Value::Sha256 as i32,
            })
            .await
            .map_err(|s| status_error("BatchUpdateBlobs", s))?
            .into_inner();
        if response.responses.len() != count {
            return Err(RunnerError::Unavailable(format!(
                "BatchUpdateBlobs answered {} of {count} blobs",
                response.responses.len()
            )));
        }
        for answer in response.responses {
            let code = answer.status.as_ref().map_or(0, |s| s.code);
            if code != 0 {
                let message = answer.status.map(|s| s.message).unwrap_or_default();
                return Err(RunnerError::Unavailable(format!(
                    "BatchUpdateBlobs: {message} (code {code})"
                )));
            }
        }
        Ok(())
    }

    /// Uploads one blob with ByteStream Write, read and re-hashed chunk by chunk as it is
    /// sent (a file changed since it was hashed is not committed under the old digest: the
    /// stream ends without `finish_write`).
    pub async fn stream_write(&self, digest: &Digest, source: UploadSource) -> Result<()> {
        let resource_name = format!(
            "{}uploads/{}/blobs/{}/{}",
            self.resource_prefix(),
            uuid::Uuid::new_v4(),
            digest.hash,
            digest.size
        );
        let reader: Box<dyn Read + Send> = match source {
            UploadSource::Bytes(bytes) => Box::new(std::io::Cursor::new(bytes)),
            UploadSource::File(mut file) => {
                file.seek(SeekFrom::Start(0))
                    .map_err(RunnerError::io("rewinding an output"))?;
                Box::new(file)
            }
            UploadSource::Workspace(source) => Box::new(source.open()?),
        };
        let failure = std::sync::Arc::new(std::sync::Mutex::new(None));
        let chunks = WriteChunks {
            reader,
            resource_name: Some(resource_name),
            expected: digest.clone(),
            offset: 0,
            hasher: Sha256::new(),
            done: false,
            failure: failure.clone(),
        };
        let answer = self
            .bytestream
            .clone()
            .write(tokio_stream::iter(chunks))
            .await;
        let failure = failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(failure) = failure {
            return Err(failure);
        }
        let response = answer
            .map_err(|s| status_error("ByteStream Write", s))?
            .into_inner();
        if u64::try_from(response.committed_size).ok() != Some(digest.size) {
            return Err(RunnerError::Unavailable(format!(
                "ByteStream Write of {digest} committed {} bytes",
                response.committed_size
            )));
        }
        Ok(())
    }
}

/// The requests of one ByteStream Write, read from their source as they are sent.
struct WriteChunks {
    reader: Box<dyn Read + Send>,
    resource_name: Option<String>,
    expected: Digest,
    offset: u64,
    hasher: Sha256,
    done: bool,
    failure: std::sync::Arc<std::sync::Mutex<Option<RunnerError>>>,
}

impl WriteChunks {
    fn fail(&mut self, error: RunnerError) -> Option<bytestream::WriteRequest> {
        self.done = true;
        *self
            .failure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error);
        None
    }

    fn changed(&self) -> RunnerError {
        RunnerError::FailedPrecondition(format!(
            "an output changed while it was uploaded ({})",
            self.expected
        ))
    }
}

impl Iterator for WriteChunks {
    type Item = bytestream::WriteRequest;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let remaining = self.expected.size - self.offset;
        let want =
            usize::try_from(remaining.min(WRITE_CHUNK_BYTES as u64)).unwrap_or(WRITE_CHUNK_BYTES);
        let mut data = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            match self.reader.read(&mut data[filled..]) {
                Ok(0) => return self.fail(self.changed()),
                Ok(n) => filled += n,
                Err(e) => return self.fail(RunnerError::io("reading an output")(e)),
            }
        }
        self.hasher.update(&data);
        let write_offset = i64::try_from(self.offset).unwrap_or(i64::MAX);
        self.offset += want as u64;
        let finish_write = self.offset == self.expected.size;
        if finish_write {
            // Nothing may follow the declared size, and the whole must hash to the digest.
            let mut probe = [0u8; 1];
            let grown = !matches!(self.reader.read(&mut probe), Ok(0));
            let hash = hex::encode(std::mem::take(&mut self.hasher).finalize());
            if grown || hash != self.expected.hash {
                return self.fail(self.changed());
            }
            self.done = true;
        }
        Some(bytestream::WriteRequest {
            // Only the first request names the resource.
            resource_name: self.resource_name.take().unwrap_or_default(),
            write_offset,
            finish_write,
            data,
        })
    }
}

/// Reads a local file of a known size completely (outputs were measured when hashed).
fn read_exact_size(file: &mut std::fs::File, digest: &Digest) -> Result<Vec<u8>> {
    file.seek(SeekFrom::Start(0))
        .map_err(RunnerError::io("rewinding an output"))?;
    let mut data = Vec::new();
    file.take(digest.size.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(RunnerError::io("reading an output"))?;
    verify_blob(digest, &data).map_err(|_| {
        RunnerError::FailedPrecondition(format!(
            "an output changed while it was uploaded ({digest})"
        ))
    })?;
    Ok(data)
}
