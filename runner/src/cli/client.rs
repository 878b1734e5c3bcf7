//! The client side of the `kiln` CLI: connects to the daemon (its Unix socket, or a
//! remote daemon over TLS with a client certificate), uploads inputs, submits a job,
//! streams its output and downloads links and outputs.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agent_proto::v1::attestations_client::AttestationsClient;
use agent_proto::v1::content_store_client::ContentStoreClient;
use agent_proto::v1::jobs_client::JobsClient;
use agent_proto::v1::{
    job_event, write_request, FindMissingRequest, GetPublicKeyRequest, Input, Job, JobSpec,
    JobState, ListLinksRequest, OutputStream, ReadRequest, StepState, SubmitRequest, WatchRequest,
    WriteHeader, WriteRequest,
};
use anyhow::{bail, Context};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint, Uri};

pub const EXIT_KILN_ERROR: i32 = 125;

/// How `--attest-dir` writes each step's link (same file name either way).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LinkFormat {
    /// An in-toto metablock (`signed` + `signatures`).
    Metablock,
    /// A DSSE envelope (payloadType application/vnd.in-toto+json).
    Dsse,
}

/// A gRPC channel to the daemon whose every connection is one that `connect` opens: to
/// the socket (or, in tests, to the socket with another uid's credentials).
pub async fn channel_over<F, Fut>(connect: F) -> Result<Channel, tonic::transport::Error>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = std::io::Result<tokio::net::UnixStream>> + Send + 'static,
{
    // The URI is required by the API but unused: every connection goes to the socket.
    Endpoint::from_static("http://kiln.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connect = connect.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(connect().await?)) }
        }))
        .await
}

/// Where the client finds the daemon.
#[derive(Debug, Clone)]
pub enum Target {
    /// The daemon's Unix socket.
    Socket(PathBuf),
    /// A daemon's TLS listener: `https://HOST:PORT`, with the client's certificate
    /// chain and key and the CA the daemon's certificate must chain to (PEM files).
    Remote {
        server: String,
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
    },
}

/// Reads a PEM file of the client's, naming it in the error.
fn read_client_file(what: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

/// The TLS configuration of a client: TLS 1.3, the daemon's certificate checked against
/// `ca_pem`, and the client certificate (`cert_pem`, leaf first) with its key.
pub fn client_tls_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    ca_pem: &[u8],
) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .context("the client certificate is not PEM")?;
    if chain.is_empty() {
        bail!("the client certificate file holds no CERTIFICATE block");
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .context("the client key file holds no private key")?;
    let roots = ca_roots(ca_pem)?;
    rustls::ClientConfig::builder_with_provider(crate::daemon::tls::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("the TLS configuration")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("the client certificate and key do not go together")
}

/// The CA certificates of a PEM file, as trust anchors.
pub fn ca_roots(ca_pem: &[u8]) -> anyhow::Result<rustls::RootCertStore> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(ca.context("the CA file is not PEM")?)
            .context("a CA certificate")?;
    }
    if roots.is_empty() {
        bail!("the CA file holds no CERTIFICATE block");
    }
    Ok(roots)
}

/// A gRPC channel to a daemon's TLS listener at `server` (`https://HOST:PORT`), every
/// connection made with `tls`; the daemon's certificate must name HOST.
pub async fn channel_over_tls(
    server: &str,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<Channel> {
    let uri: Uri = server
        .parse()
        .with_context(|| format!("--server {server:?} is not a URL"))?;
    if uri.scheme_str() != Some("https") {
        bail!("--server {server:?}: the daemon is reached over TLS: https://HOST:PORT");
    }
    let Some(host) = uri.host() else {
        bail!("--server {server:?} names no host");
    };
    // An IPv6 literal is written in brackets in a URL, bare in a certificate.
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let server_name = rustls::pki_types::ServerName::try_from(host.clone())
        .with_context(|| format!("--server {server:?}: {host:?} is not a host name"))?;
    let mut tls = (*tls).clone();
    // gRPC is HTTP/2, chosen in the handshake.
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    Endpoint::from_shared(server.to_string())
        .with_context(|| format!("--server {server:?}"))?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (connector, server_name, host) =
                (connector.clone(), server_name.clone(), host.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                TLS_USED.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok::<_, std::io::Error>(TokioIo::new(ReadFailureKept(tls)))
            }
        }))
        .await
        .with_context(|| format!("connecting to the kiln daemon at {server}"))
}

/// The last error reading from a TLS connection to the daemon, e.g. the alert with which
/// it refused the client certificate: in TLS 1.3 that arrives after the client's side
/// of the handshake, and the HTTP/2 layer reports only a closed connection.
static TLS_READ_FAILURE: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Whether this process opened a TLS connection to a daemon.
static TLS_USED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What is known of why a TLS connection to the daemon ended: the alert it sent, when
/// it was read before the call failed, or else a hint where to look. None without TLS.
pub fn tls_failure_hint() -> Option<String> {
    if !TLS_USED.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let failure = match TLS_READ_FAILURE.lock() {
        Ok(failure) => failure.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    Some(match failure {
        Some(failure) => format!("the daemon's TLS connection: {failure}"),
        None => "the daemon closed the TLS connection; if it refused this client's certificate, \
                 the daemon's log says why"
            .to_string(),
    })
}

/// A client TLS stream that keeps its read errors for [`tls_read_failure`].
struct ReadFailureKept(tokio_rustls::client::TlsStream<tokio::net::TcpStream>);

impl tokio::io::AsyncRead for ReadFailureKept {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let poll = std::pin::Pin::new(&mut self.0).poll_read(cx, buf);
        if let std::task::Poll::Ready(Err(err)) = &poll {
            let mut failure = match TLS_READ_FAILURE.lock() {
                Ok(failure) => failure,
                Err(poisoned) => poisoned.into_inner(),
            };
            *failure = Some(err.to_string());
        }
        poll
    }
}

impl tokio::io::AsyncWrite for ReadFailureKept {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

#[derive(Clone)]
pub struct Client {
    channel: Channel,
}

/// Uploads in flight at once.
const PARALLEL_UPLOADS: usize = 16;

async fn upload_one(
    mut store: ContentStoreClient<Channel>,
    source: PathBuf,
    digest: String,
) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(&source)
        .await
        .with_context(|| format!("reading {}", source.display()))?;
    let size = file.metadata().await?.len();
    // Streamed from the file a chunk at a time: uploads in parallel hold a few chunks
    // each, never whole files.
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let header = WriteRequest {
        part: Some(write_request::Part::Header(WriteHeader { digest, size })),
    };
    let reader = tokio::spawn(async move {
        if tx.send(header).await.is_err() {
            return Ok(());
        }
        loop {
            let mut chunk = vec![0u8; 1024 * 1024];
            let n = file.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            chunk.truncate(n);
            let data = WriteRequest {
                part: Some(write_request::Part::Data(chunk)),
            };
            if tx.send(data).await.is_err() {
                return Ok(());
            }
        }
    });
    let written = store
        .write(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    reader
        .await?
        .with_context(|| format!("reading {}", source.display()))?;
    written.with_context(|| format!("uploading {}", source.display()))?;
    Ok(())
}

impl Client {
    pub async fn connect(socket: &Path) -> anyhow::Result<Self> {
        let socket = socket.to_path_buf();
        let display = socket.display().to_string();
        let channel = channel_over(move || tokio::net::UnixStream::connect(socket.clone()))
            .await
            .with_context(|| format!("connecting to the kiln daemon at {display}"))?;
        Ok(Self { channel })
    }

    /// Connects to the daemon where `target` says: its socket, or a remote daemon over
    /// TLS (the certificate files are read now, and named if they cannot be).
    pub async fn connect_to(target: &Target) -> anyhow::Result<Self> {
        match target {
            Target::Socket(socket) => Self::connect(socket).await,
            Target::Remote {
                server,
                cert,
                key,
                ca,
            } => {
                let tls = client_tls_config(
                    &read_client_file("client certificate (--tls-cert)", cert)?,
                    &read_client_file("client key (--tls-key)", key)?,
                    &read_client_file("CA certificate (--tls-ca)", ca)?,
                )?;
                let channel = channel_over_tls(server, Arc::new(tls)).await?;
                Ok(Self { channel })
            }
        }
    }

    /// The gRPC channel, for calls the client has no method for.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn jobs(&self) -> JobsClient<Channel> {
        JobsClient::new(self.channel.clone())
    }

    pub fn store(&self) -> ContentStoreClient<Channel> {
        ContentStoreClient::new(self.channel.clone()).max_decoding_message_size(8 * 1024 * 1024)
    }

    pub fn attestations(&self) -> AttestationsClient<Channel> {
        AttestationsClient::new(self.channel.clone()).max_decoding_message_size(256 * 1024 * 1024)
    }

    /// Uploads the files the store does not have yet.
    pub async fn upload(&self, files: &[LocalInput]) -> anyhow::Result<()> {
        if files.is_empty() {
            return Ok(());
        }
        let digests: Vec<String> = files.iter().map(|f| f.digest.clone()).collect();
        let missing = self
            .store()
            .find_missing(FindMissingRequest { digests })
            .await?
            .into_inner()
            .missing;
        let missing: std::collections::BTreeSet<String> = missing.into_iter().collect();
        let mut done = std::collections::BTreeSet::new();
        // Several uploads at once: the daemon makes each blob durable (fsync) before it
        // answers, and one at a time, a tree of many small files waits on the disk for
        // each in turn (minutes for 40,000 files).
        let mut uploads = tokio::task::JoinSet::new();
        for file in files {
            if !missing.contains(&file.digest) || !done.insert(file.digest.clone()) {
                continue;
            }
            if uploads.len() >= PARALLEL_UPLOADS {
                if let Some(finished) = uploads.join_next().await {
                    finished??;
                }
            }
            let store = self.store();
            let (source, digest) = (file.source.clone(), file.digest.clone());
            uploads.spawn(async move { upload_one(store, source, digest).await });
        }
        while let Some(finished) = uploads.join_next().await {
            finished??;
        }
        Ok(())
    }

    pub async fn submit(&self, spec: JobSpec) -> anyhow::Result<String> {
        Ok(self
            .jobs()
            .submit(SubmitRequest {
                spec: Some(spec),
                idempotency_key: String::new(),
            })
            .await?
            .into_inner()
            .job_id)
    }

    /// Follows a job to its end, copying step output to our stdout/stderr as it comes.
    pub async fn follow(&self, job_id: &str, quiet: bool) -> anyhow::Result<Job> {
        let mut stream = self
            .jobs()
            .watch(WatchRequest {
                job_id: job_id.to_string(),
            })
            .await?
            .into_inner();
        while let Some(event) = stream.message().await? {
            match event.event {
                Some(job_event::Event::Output(out)) if !quiet => {
                    if out.stream == OutputStream::Stderr as i32 {
                        let mut err = std::io::stderr().lock();
                        err.write_all(&out.data)?;
                        err.flush()?;
                    } else {
                        let mut o = std::io::stdout().lock();
                        o.write_all(&out.data)?;
                        o.flush()?;
                    }
                }
                Some(job_event::Event::StepStarted(s)) => {
                    tracing::info!(step = %s.name, "step started");
                }
                Some(job_event::Event::OutputDropped(d)) if !quiet => {
                    eprintln!(
                        "kiln: output of step {} is missing here: {}",
                        d.step, d.reason
                    );
                }
                Some(job_event::Event::JobFinished(job)) => return Ok(job),
                _ => {}
            }
        }
        // The stream ended without a final event: ask for the record.
        self.get(job_id).await
    }

    pub async fn read_blob(&self, digest: &str) -> anyhow::Result<Vec<u8>> {
        let mut stream = self
            .store()
            .read(ReadRequest {
                digest: digest.to_string(),
            })
            .await?
            .into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await? {
            data.extend_from_slice(&chunk.data);
        }
        let actual = hex::encode(Sha256::digest(&data));
        if actual != digest {
            bail!("blob {digest} arrived with content hashing to {actual}");
        }
        Ok(data)
    }

    /// Writes the job's links into `dir` in `format`, named as in-toto expects.
    pub async fn download_links(
        &self,
        job_id: &str,
        dir: &Path,
        format: LinkFormat,
    ) -> anyhow::Result<Vec<PathBuf>> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let links = self
            .attestations()
            .list_links(ListLinksRequest {
                job_id: job_id.to_string(),
            })
            .await?
            .into_inner()
            .links;
        let mut written = Vec::new();
        for link in links {
            let name = Path::new(&link.file_name);
            if name.components().count() != 1 || link.file_name.starts_with('.') {
                bail!(
                    "the daemon sent a link with a bad file name {:?}",
                    link.file_name
                );
            }
            let (content, digest) = match format {
                LinkFormat::Metablock => (link.content, link.digest),
                LinkFormat::Dsse if link.dsse_digest.is_empty() => bail!(
                    "link {} has no DSSE form (the step was recorded before the daemon wrote envelopes); use --link-format metablock",
                    link.file_name
                ),
                LinkFormat::Dsse => (link.dsse_content, link.dsse_digest),
            };
            // A large job's later links come without content: read them by digest
            // (read_blob checks the digest).
            let content = if link.content_omitted {
                self.read_blob(&digest).await?
            } else {
                content
            };
            if hex::encode(Sha256::digest(&content)) != digest {
                bail!("link {} does not match its digest", link.file_name);
            }
            let path = dir.join(name);
            fs::write(&path, &content).with_context(|| format!("writing {}", path.display()))?;
            written.push(path);
        }
        Ok(written)
    }

    /// Writes the job's SLSA provenance (a DSSE envelope) into `dir` as
    /// `<job id>.provenance.json`, if the job has one.
    pub async fn download_provenance(
        &self,
        job: &Job,
        dir: &Path,
    ) -> anyhow::Result<Option<PathBuf>> {
        if job.provenance_digest.is_empty() {
            return Ok(None);
        }
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let envelope = self.read_blob(&job.provenance_digest).await?;
        let path = dir.join(format!("{}.provenance.json", job.job_id));
        fs::write(&path, envelope).with_context(|| format!("writing {}", path.display()))?;
        Ok(Some(path))
    }

    /// Writes the job's outputs into `dir`, each hash-checked.
    pub async fn download_outputs(&self, job: &Job, dir: &Path) -> anyhow::Result<()> {
        for output in &job.outputs {
            if output
                .path
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
                || output.path.starts_with('/')
            {
                bail!(
                    "the daemon sent an output with a bad path {:?}",
                    output.path
                );
            }
            let data = self.read_blob(&output.digest).await?;
            let path = dir.join(&output.path);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            let mode = if output.executable { 0o755 } else { 0o644 };
            let _ = fs::remove_file(&path);
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)
                .with_context(|| format!("writing {}", path.display()))?;
            file.write_all(&data)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    }

    pub async fn get(&self, job_id: &str) -> anyhow::Result<Job> {
        Ok(self
            .jobs()
            .get(agent_proto::v1::GetRequest {
                job_id: job_id.to_string(),
            })
            .await?
            .into_inner())
    }

    pub async fn cancel(&self, job_id: &str) -> anyhow::Result<i32> {
        Ok(self
            .jobs()
            .cancel(agent_proto::v1::CancelRequest {
                job_id: job_id.to_string(),
            })
            .await?
            .into_inner()
            .state)
    }

    /// One page of ListJobs.
    pub async fn list_jobs(
        &self,
        request: agent_proto::v1::ListJobsRequest,
    ) -> anyhow::Result<agent_proto::v1::ListJobsResponse> {
        Ok(self.jobs().list_jobs(request).await?.into_inner())
    }

    pub async fn who_am_i(&self) -> anyhow::Result<agent_proto::v1::WhoAmIResponse> {
        Ok(self
            .jobs()
            .who_am_i(agent_proto::v1::WhoAmIRequest {})
            .await?
            .into_inner())
    }

    pub async fn public_key(&self) -> anyhow::Result<agent_proto::v1::PublicKey> {
        Ok(self
            .attestations()
            .get_public_key(GetPublicKeyRequest {})
            .await?
            .into_inner())
    }
}

/// A file of the client to be placed in the workspace.
#[derive(Debug, Clone)]
pub struct LocalInput {
    pub source: PathBuf,
    pub workspace_path: String,
    pub digest: String,
    pub executable: bool,
}

impl LocalInput {
    pub fn to_input(&self) -> Input {
        Input {
            path: self.workspace_path.clone(),
            digest: self.digest.clone(),
            executable: self.executable,
        }
    }
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Expands a host file or directory into workspace inputs under `workspace_path`.
pub fn collect_inputs(source: &Path, workspace_path: &str) -> anyhow::Result<Vec<LocalInput>> {
    let meta = fs::metadata(source).with_context(|| format!("reading {}", source.display()))?;
    let mut found = BTreeMap::new();
    if meta.is_dir() {
        walk(source, workspace_path, &mut found)?;
    } else if meta.is_file() {
        found.insert(workspace_path.to_string(), source.to_path_buf());
    } else {
        bail!("{} is neither a file nor a directory", source.display());
    }
    let mut inputs = Vec::new();
    for (path, source) in found {
        let meta = fs::metadata(&source)?;
        inputs.push(LocalInput {
            digest: sha256_file(&source)?,
            executable: meta.permissions().mode() & 0o111 != 0,
            workspace_path: path,
            source,
        });
    }
    Ok(inputs)
}

fn walk(dir: &Path, prefix: &str, found: &mut BTreeMap<String, PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry
            .file_name()
            .into_string()
            .map_err(|n| anyhow::anyhow!("{n:?} in {} is not UTF-8", dir.display()))?;
        let path = format!("{prefix}/{name}");
        let meta = fs::metadata(entry.path())?;
        if meta.is_dir() {
            walk(&entry.path(), &path, found)?;
        } else if meta.is_file() {
            found.insert(path, entry.path());
        }
    }
    Ok(())
}

/// The process-style exit code for a finished job: that of its last step that ran.
pub fn exit_code(job: &Job) -> i32 {
    if job.state == JobState::Succeeded as i32 {
        return 0;
    }
    let last = job
        .steps
        .iter()
        .rev()
        .find(|s| s.state != StepState::Pending as i32);
    match last {
        Some(step) if step.state != StepState::Error as i32 && step.exit_code != 0 => {
            step.exit_code
        }
        _ => EXIT_KILN_ERROR,
    }
}

pub fn state_name(state: i32) -> String {
    JobState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("JOB_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| format!("unknown({state})"))
}

fn step_state_name(state: i32) -> String {
    StepState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("STEP_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| format!("unknown({state})"))
}

/// A job record as JSON, for scripts.
pub fn job_json(job: &Job) -> serde_json::Value {
    serde_json::json!({
        "job_id": job.job_id,
        "state": state_name(job.state),
        "message": job.message,
        "created_unix_ms": job.created_unix_ms,
        "started_unix_ms": job.started_unix_ms,
        "finished_unix_ms": job.finished_unix_ms,
        "steps": job.steps.iter().map(|s| serde_json::json!({
            "name": s.name,
            "state": step_state_name(s.state),
            "exit_code": s.exit_code,
            "signal": s.signal,
            "message": s.message,
            "duration_ms": s.duration_ms,
            "link_name": s.link_name,
            "link_digest": s.link_digest,
            "link_dsse_digest": s.link_dsse_digest,
            "cpu_time_ms": s.cpu_time_ms,
            "peak_memory_bytes": s.peak_memory_bytes,
            "limit_reason": s.limit_reason,
            "start_latency_us": s.start_latency_us,
            "seccomp_denials": s.seccomp_denials,
            "network": s.network.iter().map(|a| serde_json::json!({
                "method": a.method, "host": a.host, "port": a.port, "resolved": a.resolved,
                "address": a.address, "decision": a.decision, "reason": a.reason, "sni": a.sni,
                "bytes_up": a.bytes_up, "bytes_down": a.bytes_down, "duration_ms": a.duration_ms,
            })).collect::<Vec<_>>(),
            "network_unrecorded": s.network_unrecorded,
            "stdout": {"digest": s.stdout_digest, "size": s.stdout_size, "bytes": s.stdout_bytes},
            "stderr": {"digest": s.stderr_digest, "size": s.stderr_size, "bytes": s.stderr_bytes},
        })).collect::<Vec<_>>(),
        "outputs": job.outputs.iter().map(|o| serde_json::json!({
            "path": o.path, "digest": o.digest, "size": o.size, "executable": o.executable,
        })).collect::<Vec<_>>(),
    })
}

/// One line per step, for people.
pub fn summary(job: &Job) -> String {
    let mut out = String::new();
    for step in &job.steps {
        let state = step_state_name(step.state);
        // A limit the step ran into leads the message, as [oom], [pids], [timeout] or
        // [disk-quota].
        let reason = if step.limit_reason.is_empty() {
            String::new()
        } else {
            format!("[{}] ", step.limit_reason)
        };
        out.push_str(&format!(
            "  step {:<12} {:<10} exit {:<4} {:>6} ms  cpu {} ms  peak {}  {reason}{}\n",
            step.name,
            state,
            step.exit_code,
            step.duration_ms,
            step.cpu_time_ms,
            crate::units::format_size(step.peak_memory_bytes),
            if step.message.is_empty() {
                step.link_name.clone()
            } else {
                step.message.clone()
            }
        ));
        for a in &step.network {
            let via = if a.address.is_empty() {
                String::new()
            } else {
                format!(" via {}", a.address)
            };
            let sni = if a.sni.is_empty() {
                String::new()
            } else {
                format!(" sni {}", a.sni)
            };
            out.push_str(&format!(
                "    net {} {}:{}{sni}{via} {}: {}  up {} B down {} B {} ms\n",
                a.method,
                a.host,
                a.port,
                a.decision,
                a.reason,
                a.bytes_up,
                a.bytes_down,
                a.duration_ms
            ));
        }
        if step.network_unrecorded > 0 {
            out.push_str(&format!(
                "    net ... and {} more attempts, not recorded\n",
                step.network_unrecorded
            ));
        }
        for (name, size, bytes) in [
            ("stdout", step.stdout_size, step.stdout_bytes),
            ("stderr", step.stderr_size, step.stderr_bytes),
        ] {
            if bytes > size {
                out.push_str(&format!(
                    "    {name}: {} written, the first {} kept (the daemon's log caps)\n",
                    crate::units::format_size(bytes),
                    crate::units::format_size(size)
                ));
            }
        }
    }
    out.push_str(&format!("  job {} {}", job.job_id, state_name(job.state)));
    if !job.message.is_empty() {
        out.push_str(&format!(": {}", job.message));
    }
    out
}
