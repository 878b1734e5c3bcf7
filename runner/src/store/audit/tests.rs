#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn open(&self, every: u64) -> AuditLog {
        let (signer, _) = Signer::open(&self.dir.path().join("keys")).unwrap();
        AuditLog::open(self.dir.path(), signer, every, Duration::from_secs(3600)).unwrap()
    }
    fn keys(&self) -> Vec<TrustedKey> {
        let bytes = fs::read(
            self.dir
                .path()
                .join("keys")
                .join(provenance::keyring::KEYRING_FILE),
        )
        .unwrap();
        provenance::keyring::PublicKeyRing::from_json_bytes(&bytes)
            .unwrap()
            .keys
    }
    fn log(&self) -> Vec<u8> {
        fs::read(self.dir.path().join(AUDIT_DIR).join(LOG_FILE)).unwrap()
    }
    fn head(&self) -> Vec<u8> {
        fs::read(self.dir.path().join(AUDIT_DIR).join(HEAD_FILE)).unwrap()
    }
    fn verify(&self, log: &[u8]) -> std::result::Result<Verified, Problem> {
        verify(log, Some(&self.head()), &self.keys())
    }
}

fn record(i: usize) -> Record {
    Record {
        principal: "uid:1000".into(),
        tenant: None,
        action: "job.submit".into(),
        object: format!("job:{i}"),
        decision: Decision::Allow,
        reason: String::new(),
    }
}

/// A log of 10 entries with a checkpoint after every 3 (and one at the end).
fn written() -> Fixture {
    let fixture = Fixture::new();
    let log = fixture.open(3);
    for i in 0..10 {
        log.append(record(i)).unwrap();
    }
    log.checkpoint().unwrap();
    fixture
}

fn lines(log: &[u8]) -> Vec<Vec<u8>> {
    log.split_inclusive(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

#[test]
fn a_written_log_verifies_with_its_checkpoints() {
    let fixture = written();
    let verified = fixture.verify(&fixture.log()).unwrap();
    // 10 entries, a checkpoint after every 3 (3 of them), one at the end.
    assert_eq!(verified.entries, 14);
    assert_eq!(verified.checkpoints, 4);
    assert_eq!(verified.unsigned_tail, 0);
    let first: Entry = serde_json::from_slice(&lines(&fixture.log())[0]).unwrap();
    assert_eq!(first.prev, GENESIS);
}

#[test]
fn an_edited_entry_is_found() {
    let fixture = written();
    let mut lines = lines(&fixture.log());
    let edited = String::from_utf8(lines[4].clone())
        .unwrap()
        .replace("uid:1000", "uid:1001");
    lines[4] = edited.into_bytes();
    let problem = fixture.verify(&lines.concat()).unwrap_err();
    assert_eq!(problem.line, Some(6));
    assert!(
        problem.message.contains("line 5 (seq 4) was edited"),
        "{problem}"
    );
}

#[test]
fn a_deleted_entry_is_found() {
    let fixture = written();
    let mut lines = lines(&fixture.log());
    lines.remove(5);
    let problem = fixture.verify(&lines.concat()).unwrap_err();
    assert_eq!((problem.line, problem.seq), (Some(6), Some(6)));
    assert!(problem.message.contains("missing"), "{problem}");
}

#[test]
fn reordered_entries_are_found() {
    let fixture = written();
    let mut lines = lines(&fixture.log());
    lines.swap(1, 2);
    let problem = fixture.verify(&lines.concat()).unwrap_err();
    assert_eq!(problem.line, Some(2));
}

#[test]
fn an_inserted_entry_is_found() {
    let fixture = written();
    let mut lines = lines(&fixture.log());
    let copy = lines[2].clone();
    lines.insert(3, copy);
    let problem = fixture.verify(&lines.concat()).unwrap_err();
    assert_eq!(problem.line, Some(4));
    assert!(problem.message.contains("inserted"), "{problem}");
}

#[test]
fn a_forged_checkpoint_signature_is_found() {
    let fixture = written();
    let mut lines = lines(&fixture.log());
    let mut entry: Entry = serde_json::from_slice(lines[3].strip_suffix(b"\n").unwrap()).unwrap();
    let checkpoint = entry.checkpoint.as_mut().expect("line 4 is a checkpoint");
    checkpoint.signature = hex::encode([7u8; 64]);
    let mut line = serde_json::to_vec(&entry).unwrap();
    line.push(b'\n');
    lines[3] = line;
    let problem = fixture.verify(&lines.concat()).unwrap_err();
    assert_eq!(problem.line, Some(4));
    assert!(
        problem.message.contains("bad checkpoint signature"),
        "{problem}"
    );
    // A checkpoint signed by a key the verifier does not trust is refused too.
    let other = tempfile::tempdir().unwrap();
    let (signer, _) = Signer::open(other.path()).unwrap();
    let _ = signer;
    let foreign = provenance::keyring::PublicKeyRing::from_json_bytes(
        &fs::read(other.path().join(provenance::keyring::KEYRING_FILE)).unwrap(),
    )
    .unwrap()
    .keys;
    let problem = verify(&fixture.log(), Some(&fixture.head()), &foreign).unwrap_err();
    assert!(
        problem.message.contains("not among the trusted keys"),
        "{problem}"
    );
}

#[test]
fn a_log_truncated_before_its_last_checkpoint_is_found() {
    let fixture = written();
    let lines = lines(&fixture.log());
    let problem = fixture.verify(&lines[..10].concat()).unwrap_err();
    assert!(problem.message.contains("truncated"), "{problem}");
    // Without the head file, nothing tells a truncation apart: refused.
    let problem = verify(&fixture.log(), None, &fixture.keys()).unwrap_err();
    assert!(problem.message.contains("missing"), "{problem}");
}

#[test]
fn the_chain_continues_across_reopen_and_rotation() {
    let fixture = Fixture::new();
    {
        let log = fixture.open(100);
        log.append(record(0)).unwrap();
        log.checkpoint().unwrap();
    }
    // A crash mid-append left half a line: removed at the next open.
    let path = fixture.dir.path().join(AUDIT_DIR).join(LOG_FILE);
    let mut file = OpenOptions::new().append(true).open(&path).unwrap();
    file.write_all(b"{\"seq\":2,\"ti").unwrap();
    drop(file);
    let mut ring = provenance::keyring::KeyRing::open(&fixture.dir.path().join("keys")).unwrap();
    ring.rotate().unwrap();
    let log = fixture.open(100);
    log.append(record(1)).unwrap();
    log.checkpoint().unwrap();
    let verified = fixture.verify(&fixture.log()).unwrap();
    assert_eq!(verified.entries, 5);
    let text = String::from_utf8(fixture.log()).unwrap();
    assert!(text.contains("\"action\":\"key.rotate\""), "{text}");
    assert_eq!(log.entries(), 5);
}

#[test]
fn a_log_cut_before_its_head_is_not_continued() {
    let fixture = written();
    let path = fixture.dir.path().join(AUDIT_DIR).join(LOG_FILE);
    let log = fixture.log();
    let cut: Vec<Vec<u8>> = lines(&log)[..5].to_vec();
    fs::write(&path, cut.concat()).unwrap();
    let (signer, _) = Signer::open(&fixture.dir.path().join("keys")).unwrap();
    let err = AuditLog::open(fixture.dir.path(), signer, 3, Duration::from_secs(60))
        .err()
        .expect("a truncated log was continued");
    assert!(
        err.to_string()
            .contains("before its last signed checkpoint"),
        "{err}"
    );
    // Nothing was written: the evidence stays.
    assert_eq!(fixture.log(), cut.concat());
    fs::remove_file(&path).unwrap();
    let (signer, _) = Signer::open(&fixture.dir.path().join("keys")).unwrap();
    assert!(AuditLog::open(fixture.dir.path(), signer, 3, Duration::from_secs(60)).is_err());
}

#[test]
fn a_failed_write_leaves_the_log_whole_and_answers_resource_exhausted() {
    let fixture = Fixture::new();
    let log = fixture.open(100);
    log.append(record(0)).unwrap();
    // A file that refuses writes stands in for a full disk.
    {
        let mut inner = log.lock();
        let path = fixture.dir.path().join(AUDIT_DIR).join(LOG_FILE);
        inner.file = File::open(&path).unwrap();
    }
    let err = log.append(record(1)).unwrap_err();
    assert!(matches!(err, RunnerError::ResourceExhausted(_)), "{err}");
    assert_eq!(log.entries(), 1);
}

#[test]
fn long_fields_are_cut_on_a_character_boundary() {
    let cut = bounded("é".repeat(600), 1024);
    assert!(cut.len() <= 1024 && cut.ends_with("..."));
}

#[test]
fn tail_answers_the_last_lines() {
    let fixture = written();
    let last = tail(fixture.dir.path(), 2).unwrap();
    assert_eq!(last.len(), 2);
    assert!(last[1].contains(CHECKPOINT_ACTION));
}
