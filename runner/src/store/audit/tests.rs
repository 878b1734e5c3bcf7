#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;
use provenance::keyring::TrustedKey;

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
fn checkpoints_of_a_p256_key_verify_and_a_forged_one_does_not() {
    let fixture = Fixture::new();
    let keys = fixture.dir.path().join("keys");
    let (signer, _) = Signer::open_with(&keys, provenance::KeyType::EcdsaP256).unwrap();
    let log = AuditLog::open(fixture.dir.path(), signer, 2, Duration::from_secs(3600)).unwrap();
    for i in 0..4 {
        log.append(record(i)).unwrap();
    }
    log.checkpoint().unwrap();
    assert_eq!(
        fixture.keys()[0].key.key_type(),
        provenance::KeyType::EcdsaP256
    );
    let verified = fixture.verify(&fixture.log()).unwrap();
    assert!(verified.checkpoints >= 2, "{verified:?}");
    // The first checkpoint's signature with one byte changed inside its DER.
    let mut lines = lines(&fixture.log());
    let first = lines
        .iter()
        .position(|l| {
            serde_json::from_slice::<serde_json::Value>(l).unwrap()["checkpoint"].is_object()
        })
        .unwrap();
    let mut entry: serde_json::Value = serde_json::from_slice(&lines[first]).unwrap();
    let mut sig = hex::decode(entry["checkpoint"]["signature"].as_str().unwrap()).unwrap();
    let mid = sig.len() / 2;
    sig[mid] ^= 1;
    entry["checkpoint"]["signature"] = hex::encode(sig).into();
    lines[first] = [serde_json::to_vec(&entry).unwrap(), b"\n".to_vec()].concat();
    let problem = fixture.verify(&lines.concat()).unwrap_err();
    assert!(
        problem.message.contains("bad checkpoint signature"),
        "{problem:?}"
    );
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
    let problem = verify(&fixture.log()[..], Some(&fixture.head()), &foreign).unwrap_err();
    assert!(
        problem.message.contains("not among the trusted keys"),
        "{problem}"
    );
}

#[test]
fn a_checkpoint_carries_nothing_its_signature_does_not_cover() {
    // The last checkpoint is covered only by its signature (over count, head and
    // time) and head.json: text put in its other fields, in both files, must not
    // pass for a signed record.
    let fixture = written();
    let mut lines = lines(&fixture.log());
    let last = lines.len() - 1;
    let mut entry: Entry =
        serde_json::from_slice(lines[last].strip_suffix(b"\n").unwrap()).unwrap();
    entry.reason = "uid:1001 cancelled job:42 by mistake; nothing else happened".into();
    let line = serde_json::to_vec(&entry).unwrap();
    lines[last] = [line.as_slice(), b"\n"].concat();
    let problem = verify(&lines.concat()[..], Some(&lines[last]), &fixture.keys())
        .expect_err("an unsigned reason passed for signed");
    assert_eq!(problem.line, Some(last as u64 + 1), "{problem}");
}

#[test]
fn a_log_truncated_before_its_last_checkpoint_is_found() {
    let fixture = written();
    let lines = lines(&fixture.log());
    let problem = fixture.verify(&lines[..10].concat()).unwrap_err();
    assert!(problem.message.contains("truncated"), "{problem}");
    // Without the head file, nothing tells a truncation apart: refused.
    let problem = verify(&fixture.log()[..], None, &fixture.keys()).unwrap_err();
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

/// `lines` followed by `extra` entries chained onto them, as someone without the
/// signing key can write them.
fn extended(lines: &[Vec<u8>], extra: u64) -> Vec<u8> {
    let mut log = lines.concat();
    let last = lines.last().unwrap().strip_suffix(b"\n").unwrap();
    let mut prev = line_hash(last);
    let first = lines.len() as u64;
    for seq in first..first + extra {
        let entry = Entry {
            seq,
            time: now(),
            principal: "uid:1000".into(),
            tenant: None,
            action: "job.submit".into(),
            object: "job:innocent".into(),
            decision: Decision::Allow,
            reason: String::new(),
            prev: prev.clone(),
            checkpoint: None,
        };
        let line = serde_json::to_vec(&entry).unwrap();
        prev = line_hash(&line);
        log.extend(line);
        log.push(b'\n');
    }
    log
}

fn reopen(fixture: &Fixture) -> Result<AuditLog> {
    let (signer, _) = Signer::open(&fixture.dir.path().join("keys")).unwrap();
    AuditLog::open(fixture.dir.path(), signer, 3, Duration::from_secs(60))
}

#[test]
fn a_log_rewritten_past_its_head_is_not_continued() {
    let fixture = written();
    let path = fixture.dir.path().join(AUDIT_DIR).join(LOG_FILE);
    // Signed entries replaced by as many and more unsigned ones: the log is longer
    // than head.json's checkpoint again, but that line is not the one it signed.
    // Continuing would sign the rewritten chain and replace head.json.
    let rewritten = extended(&lines(&fixture.log())[..5], 20);
    fs::write(&path, &rewritten).unwrap();
    let err = reopen(&fixture)
        .err()
        .expect("a rewritten log was continued");
    assert!(err.to_string().contains("differs from"), "{err}");
    assert_eq!(fixture.log(), rewritten, "the evidence was changed");
    assert!(fixture.verify(&rewritten).is_err());
}

#[test]
fn a_log_without_its_head_is_not_continued() {
    let fixture = written();
    let head = fixture.dir.path().join(AUDIT_DIR).join(HEAD_FILE);
    fs::write(&head, b"not a checkpoint\n").unwrap();
    let err = reopen(&fixture)
        .err()
        .expect("continued past a broken head");
    assert!(err.to_string().contains(HEAD_FILE), "{err}");
    fs::remove_file(&head).unwrap();
    let err = reopen(&fixture).err().expect("continued without a head");
    assert!(err.to_string().contains(HEAD_FILE), "{err}");
    // A first start that stopped before its first checkpoint reached head.json
    // (its entry, the checkpoint line) is continued.
    let fresh = Fixture::new();
    {
        let log = fresh.open(100);
        log.append(record(0)).unwrap();
    }
    let log = reopen(&fresh).unwrap();
    log.checkpoint().unwrap();
    fresh.verify(&fresh.log()).unwrap();
}

#[test]
fn a_second_writer_of_the_same_log_is_refused() {
    let fixture = Fixture::new();
    let first = fixture.open(100);
    first.append(record(0)).unwrap();
    // A second daemon on the same state directory would chain its entries onto its
    // own idea of the last one: two entries of each seq, and a log that never
    // verifies again.
    let (signer, _) = Signer::open(&fixture.dir.path().join("keys")).unwrap();
    let second = AuditLog::open(fixture.dir.path(), signer, 100, Duration::from_secs(60));
    if let Ok(second) = &second {
        second.append(record(1)).unwrap();
    }
    let err = second.err().expect("a second writer was let in");
    assert!(err.to_string().contains("another"), "{err}");
    first.append(record(2)).unwrap();
    first.checkpoint().unwrap();
    fixture.verify(&fixture.log()).unwrap();
}

#[test]
fn lines_are_found_from_the_end_across_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let long = "x".repeat(150 << 10);
    fs::write(&path, format!("first\n{long}\n\nlast\n")).unwrap();
    let mut file = File::open(&path).unwrap();
    let len = file.metadata().unwrap().len();
    let at = |file: &mut File, back| line_from_end(file, len, back).unwrap();
    assert_eq!(at(&mut file, 0).unwrap(), b"last");
    assert_eq!(at(&mut file, 1).unwrap(), b"");
    // Longer than any entry: never taken for one.
    assert_eq!(at(&mut file, 2), None);
    assert_eq!(at(&mut file, 3).unwrap(), b"first");
    assert_eq!(at(&mut file, 4), None);
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

#[test]
fn tail_answers_the_last_lines_however_long() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join(AUDIT_DIR)).unwrap();
    let lines: Vec<String> = (0..5)
        .map(|i| format!("{{\"seq\":{i},\"reason\":\"{}\"}}", "x".repeat(100_000)))
        .collect();
    fs::write(
        dir.path().join(AUDIT_DIR).join(LOG_FILE),
        lines.join("\n") + "\n",
    )
    .unwrap();
    assert_eq!(tail(dir.path(), 2).unwrap(), lines[3..]);
    assert_eq!(tail(dir.path(), 9).unwrap(), lines);
    assert!(tail(dir.path(), 0).unwrap().is_empty());
}

#[test]
fn deferred_entries_chain_like_any_other_and_a_reopened_log_continues_after_them() {
    let fixture = Fixture::new();
    {
        let log = fixture.open(1000);
        log.append_deferred(record(0)).unwrap();
        log.append_deferred(record(1)).unwrap();
        // The synced entry makes the deferred ones before it durable with it.
        log.append(record(2)).unwrap();
        log.append_deferred(record(3)).unwrap();
        log.checkpoint().unwrap();
    }
    let verified = fixture.verify(&fixture.log()).unwrap();
    // Four records and the checkpoint, all chained and signed.
    assert_eq!(verified.entries, 5, "{verified:?}");
    assert_eq!(verified.unsigned_tail, 0, "{verified:?}");
    let log = fixture.open(1000);
    assert_eq!(log.append(record(4)).unwrap(), 5);
}

#[test]
fn a_jobs_acceptance_is_deferred_and_its_start_and_end_synced_in_order() {
    use crate::engine::bus::{EngineEvent, Observer};
    use agent_proto::v1::JobState;
    let fixture = Fixture::new();
    let log = fixture.open(1000);
    let change = |from: Option<JobState>, to: JobState| EngineEvent::JobStateChanged {
        job_id: "j".into(),
        owner: "uid:1000".into(),
        tenant: None,
        from,
        to,
        reason: String::new(),
    };
    log.observe(&change(None, JobState::Queued));
    log.observe(&change(Some(JobState::Queued), JobState::Running));
    log.observe(&change(Some(JobState::Running), JobState::Succeeded));
    log.checkpoint().unwrap();
    let text = String::from_utf8(fixture.log()).unwrap();
    let reasons: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("\"job.state\""))
        .filter_map(|l| l.split("\"reason\":\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(
        reasons,
        [
            "owner uid:1000: accepted, queued",
            "owner uid:1000: queued -> running",
            "owner uid:1000: running -> succeeded"
        ]
    );
    fixture.verify(&fixture.log()).unwrap();
}
