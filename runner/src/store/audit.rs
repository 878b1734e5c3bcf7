//! The audit log: who did what, and what the engine did to jobs, as a hash chain of JSON
//! lines with signed checkpoints.
//!
//! `<state>/audit/audit.jsonl` holds one entry per line. Each entry carries `prev`, the
//! SHA-256 of the previous line's exact bytes (without its newline; the first entry's is
//! all zeros), and `seq`, its position from 0: an edited, deleted, inserted or reordered
//! entry breaks the chain or the numbering at the next line. Every
//! `audit_checkpoint_entries` entries or `audit_checkpoint_seconds` seconds a checkpoint
//! entry signs the count of the entries before it and the hash of the last one with the
//! runner's current key (named by key id, so it verifies after a rotation). The last
//! checkpoint line is also kept in `head.json`, replaced atomically: a log cut before its
//! last checkpoint no longer holds that line.
//!
//! One file rather than segments: a verification reads the whole chain anyway, and one
//! file has no boundary for an attacker to cut at unnoticed. Each append is fsync'd before
//! the call it records answers; one that cannot be written fails that call.
//!
//! What verification cannot see (README, "Audit log"): entries after the last checkpoint
//! can be removed or rewritten by someone who can write the files (the daemon checkpoints
//! within `audit_checkpoint_seconds` and when it stops, so this tail is short), and a
//! writer who replaces both the log and `head.json` by an older, consistent pair rolls the
//! log back. Checkpoints are also written to the daemon's log and counted in its metrics,
//! off the host's disk, to catch the latter.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use provenance::keyring::fmt_time;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::engine::signer::Signer;
use crate::error::{Result, RunnerError};
use crate::store::cas::sync_dir;

pub const AUDIT_DIR: &str = "audit";
pub const LOG_FILE: &str = "audit.jsonl";
pub const HEAD_FILE: &str = "head.json";
/// The `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
pub const CHECKPOINT_ACTION: &str = "audit.checkpoint";
/// The object of every checkpoint entry (its other fields are fixed too).
const CHECKPOINT_OBJECT: &str = "audit";
/// The principal of what the daemon does on its own (job state changes, checkpoints).
pub const DAEMON_PRINCIPAL: &str = "kiln";
/// Longest `reason` kept, and longest other text field: an entry stays a short line.
const MAX_REASON: usize = 1024;
const MAX_FIELD: usize = 512;
/// How much of the log's end is read at start to find its last entry: far more than the
/// longest line the bounds above allow.
const TAIL_READ: u64 = 1 << 20;

/// Whether an append waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    Now,
    Deferred,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Deny,
}

/// What an entry records, before the log numbers and chains it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub principal: String,
    pub tenant: Option<String>,
    pub action: String,
    pub object: String,
    pub decision: Decision,
    pub reason: String,
}

impl Record {
    /// Something the daemon did on its own.
    pub fn daemon(action: &str, object: &str, reason: &str) -> Self {
        Record {
            principal: DAEMON_PRINCIPAL.into(),
            tenant: None,
            action: action.into(),
            object: object.into(),
            decision: Decision::Allow,
            reason: reason.into(),
        }
    }
}

/// One line of the log. Field order is the line's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub seq: u64,
    /// RFC 3339, UTC.
    pub time: String,
    pub principal: String,
    pub tenant: Option<String>,
    pub action: String,
    pub object: String,
    pub decision: Decision,
    pub reason: String,
    /// SHA-256 (hex) of the previous line's bytes; [`GENESIS`] for the first.
    pub prev: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
}

/// A signature over the log up to (not including) the checkpoint entry itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Entries before this one (so, this entry's `seq`).
    pub count: u64,
    /// SHA-256 of the line before this one (so, this entry's `prev`).
    pub head: String,
    pub keyid: String,
    /// Ed25519 over [`checkpoint_message`], hex.
    pub signature: String,
}

/// The bytes a checkpoint signs.
pub fn checkpoint_message(count: u64, head: &str, time: &str) -> Vec<u8> {
    format!("kiln audit checkpoint v1\ncount {count}\nhead {head}\ntime {time}\n").into_bytes()
}

pub fn line_hash(line: &[u8]) -> String {
    hex::encode(Sha256::digest(line))
}

/// The log of one state directory, open for appending.
pub struct AuditLog {
    dir: PathBuf,
    /// Held while the log is open: it has one writer (see [`lock_writer`]).
    _writer_lock: Flock<File>,
    signer: Signer,
    checkpoint_entries: u64,
    checkpoint_interval: Duration,
    inner: Mutex<Inner>,
    /// Entries in the log (for metrics).
    entries: AtomicU64,
    /// Unix seconds of the last checkpoint written by this daemon; 0 before the first.
    last_checkpoint_unix: AtomicI64,
}

struct Inner {
    file: File,
    /// Bytes of the log that hold whole entries.
    len: u64,
    next_seq: u64,
    prev: String,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    /// The key id of the last checkpoint, to notice a rotation.
    last_keyid: Option<String>,
}

impl AuditLog {
    /// Opens (creating) `<state>/audit/`, signing checkpoints with the ring in `keys_dir`.
    /// A last line cut short by a crash (its call never answered) is removed; a last line
    /// that is whole but unreadable stops the start: the chain cannot be continued.
    pub fn open(
        state_dir: &Path,
        signer: Signer,
        checkpoint_entries: u64,
        checkpoint_interval: Duration,
    ) -> Result<Self> {
        let dir = state_dir.join(AUDIT_DIR);
        fs::create_dir_all(&dir).map_err(RunnerError::io_path("creating", &dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(RunnerError::io_path("chmod", &dir))?;
        let path = dir.join(LOG_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(RunnerError::io_path("opening", &path))?;
        let writer_lock = lock_writer(&path, &dir)?;
        let (len, last) = last_line(&mut file).map_err(RunnerError::io_path("reading", &path))?;
        let file_len = file
            .metadata()
            .map_err(RunnerError::io_path("reading", &path))?
            .len();
        if file_len > len {
            tracing::warn!(
                bytes = file_len - len,
                "the audit log ends in a partial entry (a crash while appending); removing it"
            );
            file.set_len(len)
                .map_err(RunnerError::io_path("truncating", &path))?;
            file.sync_all()
                .map_err(RunnerError::io_path("syncing", &path))?;
        }
        let (next_seq, prev) = match last {
            None => (0, GENESIS.to_string()),
            Some(line) => {
                let entry: Entry = serde_json::from_slice(&line).map_err(|e| {
                    RunnerError::Internal(format!(
                        "the audit log's last entry is unreadable ({e}); check it with `kiln audit verify`"
                    ))
                })?;
                (entry.seq + 1, line_hash(&line))
            }
        };
        let head = check_head(&dir, &mut file, len, next_seq)?;
        let last_keyid = head.and_then(|entry| entry.checkpoint).map(|c| c.keyid);
        Ok(AuditLog {
            dir,
            _writer_lock: writer_lock,
            signer,
            checkpoint_entries: checkpoint_entries.max(1),
            checkpoint_interval,
            inner: Mutex::new(Inner {
                file,
                len,
                next_seq,
                prev,
                since_checkpoint: 0,
                last_checkpoint: Instant::now(),
                last_keyid,
            }),
            entries: AtomicU64::new(next_seq),
            last_checkpoint_unix: AtomicI64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic mid-append leaves `len` at the last whole entry: still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `record`, durably, and a checkpoint when one is due. Answers its seq. A
    /// write that fails leaves the log as it was and answers RESOURCE_EXHAUSTED.
    pub fn append(&self, record: Record) -> Result<u64> {
        self.append_with(record, Durability::Now)
    }

    /// Appends `record` without waiting for the disk: it becomes durable with the next
    /// synced entry (every audited call's own, a checkpoint), which syncs every line
    /// before it. For what the engine records on the way to a synced entry: a job's
    /// acceptance, which its Submit call's entry follows before the answer.
    pub fn append_deferred(&self, record: Record) -> Result<u64> {
        self.append_with(record, Durability::Deferred)
    }

    fn append_with(&self, record: Record, sync: Durability) -> Result<u64> {
        let mut inner = self.lock();
        let (seq, _) = self.write_entry(&mut inner, record, None, now(), sync)?;
        if inner.since_checkpoint >= self.checkpoint_entries
            || inner.last_checkpoint.elapsed() >= self.checkpoint_interval
        {
            // The entry is recorded; a checkpoint that fails now is tried again later.
            if let Err(err) = self.checkpoint_locked(&mut inner) {
                tracing::error!(error = %err, "could not write an audit checkpoint");
            }
        }
        Ok(seq)
    }

    /// Writes a checkpoint if entries were added since the last one and it is due by
    /// time (the daemon calls this every `audit_checkpoint_seconds`).
    pub fn checkpoint_if_due(&self) -> Result<()> {
        let mut inner = self.lock();
        if inner.since_checkpoint > 0 && inner.last_checkpoint.elapsed() >= self.checkpoint_interval
        {
            self.checkpoint_locked(&mut inner)?;
        }
        Ok(())
    }

    /// Writes a checkpoint now if any entry is not covered by one (at start and stop).
    pub fn checkpoint(&self) -> Result<()> {
        let mut inner = self.lock();
        if inner.since_checkpoint > 0 || inner.next_seq == 0 || inner.last_keyid.is_none() {
            self.checkpoint_locked(&mut inner)?;
        }
        Ok(())
    }

    /// Entries in the log.
    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    /// Unix seconds of the last checkpoint this daemon wrote (0: none yet).
    pub fn last_checkpoint_unix(&self) -> i64 {
        self.last_checkpoint_unix.load(Ordering::Relaxed)
    }

    fn checkpoint_locked(&self, inner: &mut Inner) -> Result<()> {
        let current = self.signer.current()?;
        let keyid = current.key.keyid();
        if let Some(previous) = inner.last_keyid.clone().filter(|k| *k != keyid) {
            // The ring was rotated (`kiln keys rotate`) since the last checkpoint.
            self.write_entry(
                inner,
                Record::daemon(
                    "key.rotate",
                    &format!("key:{keyid}"),
                    &format!("the runner's signing key changed from {previous}"),
                ),
                None,
                now(),
                Durability::Now,
            )?;
        }
        let time = now();
        let (count, head) = (inner.next_seq, inner.prev.clone());
        let signature = current.key.sign(&checkpoint_message(count, &head, &time));
        let checkpoint = Checkpoint {
            count,
            head: head.clone(),
            keyid: keyid.clone(),
            signature: hex::encode(signature),
        };
        let (_, line) = self.write_entry(
            inner,
            Record::daemon(CHECKPOINT_ACTION, CHECKPOINT_OBJECT, ""),
            Some(checkpoint),
            time,
            Durability::Now,
        )?;
        self.write_head(&line)?;
        inner.since_checkpoint = 0;
        inner.last_checkpoint = Instant::now();
        inner.last_keyid = Some(keyid.clone());
        self.last_checkpoint_unix.store(
            OffsetDateTime::now_utc().unix_timestamp(),
            Ordering::Relaxed,
        );
        // A copy off this disk (the journal): a log and head file both rolled back to an
        // older, consistent pair disagree with it.
        tracing::info!(seq = count, head = %head, %keyid, "audit checkpoint");
        Ok(())
    }

    /// Appends one entry and syncs it (unless deferred); answers its seq and line
    /// (without newline).
    fn write_entry(
        &self,
        inner: &mut Inner,
        record: Record,
        checkpoint: Option<Checkpoint>,
        time: String,
        sync: Durability,
    ) -> Result<(u64, Vec<u8>)> {
        let entry = Entry {
            seq: inner.next_seq,
            time,
            principal: bounded(record.principal, MAX_FIELD),
            tenant: record.tenant.map(|t| bounded(t, MAX_FIELD)),
            action: bounded(record.action, MAX_FIELD),
            object: bounded(record.object, MAX_FIELD),
            decision: record.decision,
            reason: bounded(record.reason, MAX_REASON),
            prev: inner.prev.clone(),
            checkpoint,
        };
        let is_checkpoint = entry.checkpoint.is_some();
        let mut line = serde_json::to_vec(&entry)
            .map_err(|e| RunnerError::Internal(format!("encoding an audit entry: {e}")))?;
        line.push(b'\n');
        let written = inner.file.write_all(&line).and_then(|()| match sync {
            Durability::Now => inner.file.sync_data(),
            Durability::Deferred => Ok(()),
        });
        if let Err(err) = written {
            // Nothing half-written may stay: the next entry chains onto the last whole one.
            let _ = inner.file.set_len(inner.len);
            tracing::error!(error = %err, action = %entry.action, "could not write the audit log");
            return Err(RunnerError::ResourceExhausted(format!(
                "the audit log cannot be written ({}); the call is refused rather than left unaudited",
                err.kind()
            )));
        }
        line.pop();
        inner.len += line.len() as u64 + 1;
        inner.prev = line_hash(&line);
        inner.next_seq += 1;
        if !is_checkpoint {
            inner.since_checkpoint += 1;
        }
        self.entries.store(inner.next_seq, Ordering::Relaxed);
        Ok((entry.seq, line))
    }

    /// Replaces `head.json` with the checkpoint line, atomically and durably.
    fn write_head(&self, line: &[u8]) -> Result<()> {
        let tmp = self.dir.join(format!("{HEAD_FILE}.tmp"));
        let head = self.dir.join(HEAD_FILE);
        let write = || -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            file.write_all(line)?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            fs::rename(&tmp, &head)
        };
        write().map_err(|e| {
            RunnerError::ResourceExhausted(format!(
                "the audit head file cannot be written ({})",
                e.kind()
            ))
        })?;
        sync_dir(&self.dir)
    }
}

/// Job state changes, as the engine commits them (from its blocking code, before the
/// change is announced to anyone else), each synced, but for a job's acceptance: the
/// Submit call's own entry, synced before its answer, makes that one durable.
impl crate::engine::bus::Observer for AuditLog {
    fn observe(&self, event: &crate::engine::bus::EngineEvent) {
        let crate::engine::bus::EngineEvent::JobStateChanged {
            job_id,
            owner,
            tenant,
            from,
            to,
            reason,
        } = event
        else {
            return;
        };
        let state = crate::engine::bus::state_label;
        let change = match from {
            None => format!("owner {owner}: accepted, {}", state(*to)),
            Some(from) => format!("owner {owner}: {} -> {}", state(*from), state(*to)),
        };
        let record = Record {
            // Accepting is the submitter's doing; every later change is the daemon's.
            principal: if from.is_none() {
                owner.clone()
            } else {
                DAEMON_PRINCIPAL.into()
            },
            tenant: tenant.clone(),
            action: "job.state".into(),
            object: format!("job:{job_id}"),
            decision: Decision::Allow,
            reason: if reason.is_empty() {
                change
            } else {
                format!("{change}: {reason}")
            },
        };
        // Accepting is followed by the Submit call's synced entry before its answer;
        // every other change is synced now.
        let appended = if from.is_none() {
            self.append_deferred(record)
        } else {
            self.append(record)
        };
        if let Err(err) = appended {
            tracing::error!(job = %job_id, error = %err, "JOB STATE CHANGE NOT AUDITED");
        }
    }
}

fn now() -> String {
    fmt_time(OffsetDateTime::now_utc())
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn bounded(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max.saturating_sub(3);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// An exclusive lock on the log, for as long as it is open for appending: a second
/// daemon on the same state directory would chain its entries onto its own idea of the
/// last one, and the log would never verify again.
fn lock_writer(path: &Path, dir: &Path) -> Result<Flock<File>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(RunnerError::io_path("opening", path))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            RunnerError::FailedPrecondition(format!(
                "the audit log in {} is open in another daemon: one state directory \
                 serves one daemon",
                dir.display()
            ))
        } else {
            RunnerError::io_path("locking", path)(std::io::Error::from(errno))
        }
    })
}

/// Entries a first start writes before its first checkpoint reaches `head.json` (the
/// configuration it loads, the checkpoint): a log of more has had a head file.
const FIRST_START_ENTRIES: u64 = 2;

/// The checkpoint in `head.json`, checked against the log (its whole lines end at
/// `len`, the next entry is `next_seq`). Continuing a log that does not hold that
/// checkpoint line would sign whatever it holds instead and replace the head file, the
/// evidence: a log cut before its last checkpoint, one whose signed entries were
/// rewritten (however long it is now), or one whose head file is gone, is refused, as
/// a lost job database is.
fn check_head(dir: &Path, file: &mut File, len: u64, next_seq: u64) -> Result<Option<Entry>> {
    let refuse = |what: String| {
        RunnerError::FailedPrecondition(format!(
            "the audit log in {} {what}. Check it with `kiln audit verify`; to start a new \
             log, move the audit directory aside",
            dir.display()
        ))
    };
    let path = dir.join(HEAD_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            if next_seq > FIRST_START_ENTRIES {
                return Err(refuse(format!(
                    "has {next_seq} entries but no {HEAD_FILE}: it was removed, and with it \
                     what tells whether the log was cut"
                )));
            }
            return Ok(None);
        }
        Err(err) => return Err(RunnerError::io_path("reading", &path)(err)),
    };
    let line = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    let head: Entry = serde_json::from_slice(line)
        .map_err(|e| refuse(format!("has an unreadable {HEAD_FILE} ({e})")))?;
    if head.seq >= next_seq {
        return Err(refuse(format!(
            "ends before its last signed checkpoint (seq {}): it was truncated or lost",
            head.seq
        )));
    }
    let signed = line_from_end(file, len, next_seq - 1 - head.seq)
        .map_err(RunnerError::io_path("reading", &dir.join(LOG_FILE)))?;
    if signed.as_deref() != Some(line) {
        return Err(refuse(format!(
            "holds an entry at seq {} that differs from the signed checkpoint in \
             {HEAD_FILE}: it was rewritten",
            head.seq
        )));
    }
    Ok(Some(head))
}

/// The whole line `back` lines before the last one (0: the last) of a file whose whole
/// lines end at `len`, without its newline. Read backwards in blocks: the head
/// checkpoint is among the last few lines of a log the daemon wrote.
fn line_from_end(file: &mut File, len: u64, back: u64) -> std::io::Result<Option<Vec<u8>>> {
    const BLOCK: u64 = 64 << 10;
    // Position of the newline that ends the line looked at.
    let Some(mut end) = len.checked_sub(1) else {
        return Ok(None);
    };
    let mut wanted = back;
    let mut pos = end;
    let mut block = Vec::new();
    loop {
        // The newline before `end`, searched backwards from `pos`.
        let start = pos.saturating_sub(BLOCK);
        block.resize(usize::try_from(pos - start).unwrap_or(0), 0);
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut block)?;
        let found = block.iter().rposition(|&b| b == b'\n');
        let line_start = match found {
            Some(i) => Some(start + i as u64 + 1),
            None if start == 0 => Some(0),
            None => None,
        };
        let Some(line_start) = line_start else {
            pos = start;
            continue;
        };
        if wanted == 0 {
            if end - line_start > MAX_LINE as u64 {
                return Ok(None); // no entry: not the checkpoint looked for
            }
            let mut line = vec![0; usize::try_from(end - line_start).unwrap_or(0)];
            file.seek(SeekFrom::Start(line_start))?;
            file.read_exact(&mut line)?;
            return Ok(Some(line));
        }
        if line_start == 0 {
            return Ok(None);
        }
        wanted -= 1;
        end = line_start - 1;
        pos = end;
    }
}

/// The length of the file's whole lines and its last whole line (without newline).
fn last_line(file: &mut File) -> std::io::Result<(u64, Option<Vec<u8>>)> {
    let len = file.metadata()?.len();
    let start = len.saturating_sub(TAIL_READ);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.take(len - start).read_to_end(&mut tail)?;
    let Some(end) = tail.iter().rposition(|&b| b == b'\n') else {
        if start > 0 {
            return Err(std::io::Error::other(
                "the audit log's last line is too long",
            ));
        }
        return Ok((0, None));
    };
    let body = &tail[..end];
    let begin = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if begin == 0 && start > 0 {
        return Err(std::io::Error::other(
            "the audit log's last line is too long",
        ));
    }
    Ok((start + end as u64 + 1, Some(body[begin..].to_vec())))
}

/// The log's last `n` lines, as stored.
pub fn tail(state_dir: &Path, n: usize) -> std::io::Result<Vec<String>> {
    const BLOCK: u64 = 64 << 10;
    let path = state_dir.join(AUDIT_DIR).join(LOG_FILE);
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    // Read back from the end a block at a time until the last n lines are in: memory
    // follows what is printed, however long the lines or the log.
    let (mut start, mut newlines) = (len, 0);
    let mut tail: Vec<u8> = Vec::new();
    while start > 0 && newlines <= n {
        let from = start.saturating_sub(BLOCK);
        let mut block = vec![0; usize::try_from(start - from).unwrap_or(0)];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut block)?;
        newlines += block.iter().filter(|&&b| b == b'\n').count();
        block.extend_from_slice(&tail);
        tail = block;
        start = from;
    }
    let text = String::from_utf8_lossy(&tail);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0); // cut in the middle
    }
    let skip = lines.len().saturating_sub(n);
    Ok(lines[skip..].iter().map(|l| l.to_string()).collect())
}

mod verify;
pub use verify::{verify, Problem, Verified, MAX_LINE};

#[cfg(test)]
mod tests;
