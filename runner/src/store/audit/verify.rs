//! Verifying an audit log offline: the hash chain, each checkpoint's signature, and
//! that the log still holds the checkpoint its head file names.

use std::io::{BufRead, Read};

use provenance::keyring::{parse_time, TrustedKey};

use super::{
    checkpoint_message, line_hash, Checkpoint, Entry, Record, CHECKPOINT_ACTION, CHECKPOINT_OBJECT,
    GENESIS, HEAD_FILE,
};

/// Where verification found the log broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line of the log, if the problem is at one.
    pub line: Option<u64>,
    pub seq: Option<u64>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.line, self.seq) {
            (Some(line), Some(seq)) => write!(f, "line {line} (seq {seq}): {}", self.message),
            (Some(line), None) => write!(f, "line {line}: {}", self.message),
            _ => write!(f, "{}", self.message),
        }
    }
}

/// What a log that verified holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub entries: u64,
    pub checkpoints: u64,
    /// Seq of the last checkpoint in the log.
    pub last_checkpoint: Option<u64>,
    /// Entries after the last checkpoint: chained, but not yet signed.
    pub unsigned_tail: u64,
}

/// Longest line verification reads: far more than the bounds on an entry's fields let
/// the daemon write, so that a log of any size is verified in bounded memory.
pub const MAX_LINE: usize = 64 << 10;

/// Verifies a log, read a line at a time, and its head file against the runner's public
/// keys. Memory does not grow with the log: only the line `head.json` names is compared,
/// as it passes.
pub fn verify(
    mut log: impl BufRead,
    head: Option<&[u8]>,
    keys: &[TrustedKey],
) -> std::result::Result<Verified, Problem> {
    let head = head.map(|head| head.strip_suffix(b"\n").unwrap_or(head));
    // Parsed first, to know which line to compare; its problems are told after the
    // chain's, which say more.
    let head_entry = head.map(serde_json::from_slice::<Entry>);
    let head_seq = match &head_entry {
        Some(Ok(entry)) => Some(entry.seq),
        _ => None,
    };
    let mut head_line_matches = None;
    let mut prev = GENESIS.to_string();
    let mut entries = 0u64;
    let mut checkpoints = 0;
    let mut last_checkpoint = None;
    let mut raw = Vec::new();
    loop {
        let line_no = entries + 1;
        let expected = entries;
        let at = |seq: Option<u64>, message: String| Problem {
            line: Some(line_no),
            seq,
            message,
        };
        raw.clear();
        let read = (&mut log)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut raw)
            .map_err(|e| at(None, format!("cannot be read: {e}")))?;
        if read == 0 {
            break;
        }
        let Some(line) = raw.strip_suffix(b"\n") else {
            if raw.len() > MAX_LINE {
                return Err(at(
                    None,
                    format!("longer than {MAX_LINE} bytes: not an audit entry"),
                ));
            }
            return Err(at(None, "the last line is incomplete (no newline)".into()));
        };
        let entry: Entry = serde_json::from_slice(line)
            .map_err(|e| at(None, format!("not an audit entry: {e}")))?;
        let seq = Some(entry.seq);
        if entry.seq > expected {
            return Err(at(
                seq,
                format!(
                    "seq {} where {expected} was expected: entries {expected}..{} are missing (deleted)",
                    entry.seq,
                    entry.seq - 1
                ),
            ));
        }
        if entry.seq < expected {
            return Err(at(
                seq,
                format!("seq {} where {expected} was expected: an entry was inserted, repeated or moved here", entry.seq),
            ));
        }
        if entry.prev != prev {
            let message = if expected == 0 {
                "the first entry does not start the chain (prev is not all zeros)".to_string()
            } else {
                format!(
                    "prev does not match line {expected}: line {expected} (seq {}) was edited, or an entry was inserted or removed before this one",
                    expected - 1
                )
            };
            return Err(at(seq, message));
        }
        if let Some(checkpoint) = &entry.checkpoint {
            check_checkpoint(&entry, checkpoint, keys).map_err(|m| at(seq, m))?;
            checkpoints += 1;
            last_checkpoint = Some(entry.seq);
        } else if entry.action == CHECKPOINT_ACTION {
            return Err(at(seq, "a checkpoint entry without its signature".into()));
        }
        if head_seq == Some(entry.seq) {
            head_line_matches = Some(Some(line) == head);
        }
        prev = line_hash(line);
        entries += 1;
    }
    check_head_file(head_entry, head_line_matches, entries, keys)?;
    Ok(Verified {
        entries,
        checkpoints,
        last_checkpoint,
        unsigned_tail: last_checkpoint.map_or(entries, |seq| entries - seq - 1),
    })
}

/// The head file's checkpoint: present, signed, and the very line of the log at its seq
/// (`head_line_matches`: `None` when the log ended before that seq).
fn check_head_file(
    head_entry: Option<serde_json::Result<Entry>>,
    head_line_matches: Option<bool>,
    entries: u64,
    keys: &[TrustedKey],
) -> std::result::Result<(), Problem> {
    let Some(head_entry) = head_entry else {
        return Err(Problem {
            line: None,
            seq: None,
            message: format!(
                "{HEAD_FILE} is missing: cannot tell whether the log ({entries} entries) was truncated"
            ),
        });
    };
    let head_problem = |message: String| Problem {
        line: None,
        seq: None,
        message: format!("{HEAD_FILE}: {message}"),
    };
    let head_entry = head_entry.map_err(|e| head_problem(format!("not an audit entry: {e}")))?;
    let checkpoint = head_entry
        .checkpoint
        .as_ref()
        .ok_or_else(|| head_problem("not a checkpoint".into()))?;
    check_checkpoint(&head_entry, checkpoint, keys).map_err(head_problem)?;
    match head_line_matches {
        None => {
            return Err(Problem {
                line: None,
                seq: Some(head_entry.seq),
                message: format!(
                    "the log was truncated: it ends after {entries} entries, but {HEAD_FILE} holds a signed checkpoint at seq {}",
                    head_entry.seq
                ),
            })
        }
        Some(false) => {
            return Err(Problem {
                line: Some(head_entry.seq + 1),
                seq: Some(head_entry.seq),
                message: format!("differs from the signed checkpoint in {HEAD_FILE}"),
            })
        }
        Some(true) => {}
    }
    Ok(())
}

fn check_checkpoint(
    entry: &Entry,
    checkpoint: &Checkpoint,
    keys: &[TrustedKey],
) -> std::result::Result<(), String> {
    if entry.action != CHECKPOINT_ACTION {
        return Err(format!("a checkpoint in a {:?} entry", entry.action));
    }
    if checkpoint.count != entry.seq || checkpoint.head != entry.prev {
        return Err("the checkpoint's count or head is not the entry's own seq and prev".into());
    }
    // The signature covers count, head and time only: every other field must be what
    // the daemon writes, or it would read as signed text nobody signed.
    let fixed = Record::daemon(CHECKPOINT_ACTION, CHECKPOINT_OBJECT, "");
    if entry.principal != fixed.principal
        || entry.tenant != fixed.tenant
        || entry.object != fixed.object
        || entry.decision != fixed.decision
        || entry.reason != fixed.reason
    {
        return Err("a checkpoint entry with fields its signature does not cover".into());
    }
    let key = keys
        .iter()
        .find(|k| k.keyid() == checkpoint.keyid)
        .ok_or_else(|| {
            format!(
                "checkpoint signed by key {}, which is not among the trusted keys",
                checkpoint.keyid
            )
        })?;
    let time = parse_time(&entry.time).map_err(|e| format!("checkpoint time: {e}"))?;
    if !key.valid_at(time) {
        return Err(format!(
            "checkpoint signed by key {} outside its validity window",
            checkpoint.keyid
        ));
    }
    let signature = hex::decode(&checkpoint.signature)
        .map_err(|_| "the checkpoint signature is not hex".to_string())?;
    if !key.key.verify(
        &checkpoint_message(checkpoint.count, &checkpoint.head, &entry.time),
        &signature,
    ) {
        return Err("bad checkpoint signature".into());
    }
    Ok(())
}
