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
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

pub const EXIT_KILN_ERROR: i32 = 125;

/// How `--attest-dir` writes each step's link (same file name either way).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LinkFormat {
    /// An in-toto metablock (`signed` + `signatures`).
    Metablock,
    /// A DSSE envelope (payloadType application/vnd.in-toto+json), with the same
    /// envelope as a Sigstore bundle beside it.
    Dsse,
}

/// Writes the Sigstore bundle v0.3 of the DSSE envelope written at `path` beside
/// it, as `<path's stem>.sigstore.json`: the same envelope, its signature's key id as
/// the key hint, for verifiers such as `@sigstore/verify` (see README).
fn write_bundle_beside(path: &Path, envelope: &[u8]) -> anyhow::Result<PathBuf> {
    use provenance::bundle;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("{}: no file name to put a bundle beside", path.display()))?;
    let keyid = bundle::envelope_keyid(envelope)
        .with_context(|| format!("making the Sigstore bundle of {}", path.display()))?;
    let bytes = bundle::envelope_to_bundle(envelope, &keyid)
        .with_context(|| format!("making the Sigstore bundle of {}", path.display()))?;
    let bundle_path = path.with_file_name(format!("{stem}{}", bundle::BUNDLE_FILE_SUFFIX));
    fs::write(&bundle_path, bytes).with_context(|| format!("writing {}", bundle_path.display()))?;
    Ok(bundle_path)
}

use crate::cli::connect::read_client_file;
pub use crate::cli::connect::{
    ca_roots, channel_over, channel_over_tls, client_tls_config, tls_failure_hint, Target,
};
use crate::cli::printable;

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
            if format == LinkFormat::Dsse {
                write_bundle_beside(&path, &content)?;
            }
            written.push(path);
        }
        Ok(written)
    }

    /// Writes the job's SLSA provenance (a DSSE envelope) into `dir` as
    /// `<job id>.provenance.json`, and as a Sigstore bundle as
    /// `<job id>.provenance.sigstore.json`, if the job has one.
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
        fs::write(&path, &envelope).with_context(|| format!("writing {}", path.display()))?;
        write_bundle_beside(&path, &envelope)?;
        Ok(Some(path))
    }

    /// Writes the signed SBOM of the job's image (a DSSE envelope) into `dir` as
    /// `<job id>.sbom.intoto.json`, and as a Sigstore bundle as
    /// `<job id>.sbom.intoto.sigstore.json`, if the job has one.
    pub async fn download_sbom(&self, job: &Job, dir: &Path) -> anyhow::Result<Option<PathBuf>> {
        if job.sbom_digest.is_empty() {
            return Ok(None);
        }
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let envelope = self.read_blob(&job.sbom_digest).await?;
        let path = dir.join(format!("{}.sbom.intoto.json", job.job_id));
        fs::write(&path, &envelope).with_context(|| format!("writing {}", path.display()))?;
        write_bundle_beside(&path, &envelope)?;
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

    /// Asks the daemon to push a job's outputs and attestations to a registry.
    pub async fn publish(
        &self,
        job_id: &str,
        repository: &str,
    ) -> anyhow::Result<agent_proto::v1::PublishResponse> {
        Ok(self
            .jobs()
            .publish(agent_proto::v1::PublishRequest {
                job_id: job_id.to_string(),
                repository: repository.to_string(),
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

/// `path = "."`: a directory input whose files land at the workspace root.
pub const WORKSPACE_ROOT: &str = ".";

/// Expands a host file or directory into workspace inputs under `workspace_path`
/// ([`WORKSPACE_ROOT`] for a directory's files at the root).
pub fn collect_inputs(source: &Path, workspace_path: &str) -> anyhow::Result<Vec<LocalInput>> {
    let meta = fs::metadata(source).with_context(|| format!("reading {}", source.display()))?;
    let mut found = BTreeMap::new();
    let at_root = workspace_path == WORKSPACE_ROOT;
    if meta.is_dir() {
        walk(
            source,
            if at_root { "" } else { workspace_path },
            &mut found,
        )?;
    } else if at_root {
        bail!(
            "{}: only a directory can land at the workspace root (\".\"); name the file",
            source.display()
        );
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
        let path = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
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
        "published": job.published,
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
            printable(&step.name),
            state,
            step.exit_code,
            step.duration_ms,
            step.cpu_time_ms,
            crate::units::format_size(step.peak_memory_bytes),
            printable(if step.message.is_empty() {
                &step.link_name
            } else {
                &step.message
            })
        ));
        for a in &step.network {
            let via = if a.address.is_empty() {
                String::new()
            } else {
                format!(" via {}", printable(&a.address))
            };
            let sni = if a.sni.is_empty() {
                String::new()
            } else {
                format!(" sni {}", printable(&a.sni))
            };
            out.push_str(&format!(
                "    net {} {}:{}{sni}{via} {}: {}  up {} B down {} B {} ms\n",
                printable(&a.method),
                printable(&a.host),
                a.port,
                printable(&a.decision),
                printable(&a.reason),
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
        out.push_str(&format!(": {}", printable(&job.message)));
    }
    if !job.published.is_empty() {
        out.push_str(&format!("\n  published {}", printable(&job.published)));
    }
    out
}
