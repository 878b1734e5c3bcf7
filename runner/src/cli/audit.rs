//! `kiln audit verify` and `kiln audit tail`: offline, on the state directory's files.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::store::audit::{self, AUDIT_DIR, HEAD_FILE, LOG_FILE};

/// Verifies the audit log against `key` (a PEM key or key ring export), or the state
/// directory's key ring. Answers the exit status: 0 intact, 1 broken (said where).
pub fn verify(state_dir: &Path, key: Option<&Path>) -> anyhow::Result<i32> {
    let dir = state_dir.join(AUDIT_DIR);
    let log_path = dir.join(LOG_FILE);
    // Read a line at a time: the log grows for as long as the daemon runs.
    let log = std::fs::File::open(&log_path)
        .map(std::io::BufReader::new)
        .with_context(|| format!("reading {}", log_path.display()))?;
    let head_path = dir.join(HEAD_FILE);
    // One line: anything longer is no head file the daemon wrote (and is refused as such).
    let head = match std::fs::File::open(&head_path) {
        Ok(file) => {
            let mut bytes = Vec::new();
            file.take(audit::MAX_LINE as u64 + 1)
                .read_to_end(&mut bytes)
                .with_context(|| format!("reading {}", head_path.display()))?;
            Some(bytes)
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(err).with_context(|| format!("reading {}", head_path.display())),
    };
    let key_file = match key {
        Some(key) => key.to_path_buf(),
        None => state_dir
            .join("keys")
            .join(provenance::keyring::KEYRING_FILE),
    };
    let keys = crate::cli::verify::trusted_keys(&[PathBuf::from(&key_file)])?;
    match audit::verify(log, head.as_deref(), &keys) {
        Ok(verified) => {
            println!(
                "audit log intact: {} entries, {} signed checkpoints{}",
                verified.entries,
                verified.checkpoints,
                match verified.last_checkpoint {
                    Some(seq) => format!(", the last at seq {seq}"),
                    None => String::new(),
                }
            );
            if verified.unsigned_tail > 0 {
                println!(
                    "{} entries after the last checkpoint are chained but not yet signed",
                    verified.unsigned_tail
                );
            }
            Ok(0)
        }
        Err(problem) => {
            eprintln!("kiln: audit log {}: {problem}", log_path.display());
            Ok(1)
        }
    }
}

/// Prints the last `n` entries, one JSON line each.
pub fn tail(state_dir: &Path, n: usize) -> anyhow::Result<i32> {
    let lines = audit::tail(state_dir, n).with_context(|| {
        format!(
            "reading the audit log in {}",
            state_dir.join(AUDIT_DIR).display()
        )
    })?;
    for line in lines {
        println!("{line}");
    }
    Ok(0)
}
