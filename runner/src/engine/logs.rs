//! A step's output pipes: stored, streamed to Watch within the caps, hashed whole,
//! with the head kept for the link.

use std::fs;
use std::io::Read;
use std::os::fd::OwnedFd;

use agent_proto::v1::{job_event, OutputStream, StepOutput};
use sha2::{Digest, Sha256};

use crate::engine::jobs::Runner;

const EVENT_CHUNK: usize = 32 * 1024;

impl Runner {
    /// Drains one of the step's output pipes: stores it in the content store and
    /// streams it to Watch subscribers up to the caps (max_log_bytes for the stream,
    /// max_job_log_bytes for the job), keeps the head for the link and hashes the whole
    /// stream. Past the caps the pipe is still drained, so the step never blocks on it.
    pub(super) fn pump_log(
        &self,
        fd: OwnedFd,
        id: &str,
        step: &str,
        stream: OutputStream,
    ) -> CapturedLog {
        let mut file = fs::File::from(fd);
        let mut log = CapturedLog::new(self.config.link_log_bytes);
        let mut hasher = Sha256::new();
        let handle = self.handle(id);
        let mut store = match self.cas.writer() {
            Ok(writer) => Some(writer),
            Err(err) => {
                tracing::warn!(job = %id, error = %err, "cannot store step output");
                None
            }
        };
        let mut buf = vec![0u8; EVENT_CHUNK];
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "reading step output");
                    break;
                }
            };
            let chunk = &buf[..n];
            hasher.update(chunk);
            log.push(chunk);
            let Some(writer) = store.as_mut() else {
                continue;
            };
            let room = self.config.max_log_bytes.saturating_sub(log.stored);
            let keep = handle.claim_log_bytes(
                room.min(chunk.len() as u64),
                self.config.max_job_log_bytes.0,
            );
            if keep == 0 {
                continue;
            }
            // What subscribers get is always a prefix of what is stored, so one who
            // fell behind can take the rest from the store.
            // `keep` is at most `chunk.len()` (claimed from `room.min(chunk.len())`).
            let kept = &chunk[..usize::try_from(keep).map_or(chunk.len(), |k| k.min(chunk.len()))];
            if let Err(err) = writer.write(kept) {
                tracing::warn!(job = %id, error = %err, "storing step output; the log is not stored");
                store = None;
                continue;
            }
            log.stored += keep;
            self.emit(
                id,
                job_event::Event::Output(StepOutput {
                    step: step.to_string(),
                    stream: stream as i32,
                    data: kept.to_vec(),
                }),
            );
        }
        log.digest = hex::encode(hasher.finalize());
        if let Some(writer) = store {
            match writer.commit(None) {
                Ok(digest) => log.stored_digest = digest,
                Err(err) => tracing::warn!(job = %id, error = %err, "storing step output"),
            }
        }
        if log.stored_digest.is_empty() {
            // Nothing in the store to point to, whatever was streamed.
            log.stored = 0;
        }
        log
    }
}

#[derive(Debug, Clone, Default)]
pub(super) struct CapturedLog {
    pub(super) head: Vec<u8>,
    pub(super) cap: usize,
    pub(super) total: u64,
    pub(super) digest: String,
    /// Bytes in the content store, and their digest (empty if nothing could be stored).
    pub(super) stored: u64,
    pub(super) stored_digest: String,
}

impl CapturedLog {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            cap,
            ..Default::default()
        }
    }

    pub(super) fn push(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        let room = self.cap.saturating_sub(self.head.len());
        self.head.extend_from_slice(&chunk[..room.min(chunk.len())]);
    }

    pub(super) fn truncated_in_link(&self) -> bool {
        self.total > self.head.len() as u64
    }

    pub(super) fn text(&self) -> String {
        String::from_utf8_lossy(&self.head).into_owned()
    }
}
