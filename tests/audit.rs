//! The audit log of a real daemon: jobs and a refused call are recorded, `kiln audit
//! verify` passes on the log as written, and fails, naming where, on each kind of
//! tampering (on copies of the state directory's audit files).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;

use agent_proto::v1::jobs_client::JobsClient;
use agent_proto::v1::GetRequest;
use support::*;

const CLIENTS_GID: u32 = 47_100;
const OTHER: u32 = 47_101;

/// A change to the log's lines.
type Tamper = Box<dyn FnOnce(&mut Vec<String>)>;

fn entries(state: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(state.join("audit/audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A state directory holding a copy of `state`'s keys and audit files, with its log's
/// lines changed by `tamper`.
fn tampered(
    state: &Path,
    tamper: impl FnOnce(&mut Vec<String>),
) -> (tempfile::TempDir, std::path::PathBuf) {
    let copy = tempfile::tempdir().unwrap();
    for dir in ["keys", "audit"] {
        std::fs::create_dir_all(copy.path().join(dir)).unwrap();
        for entry in std::fs::read_dir(state.join(dir)).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), copy.path().join(dir).join(entry.file_name())).unwrap();
            }
        }
    }
    let log = copy.path().join("audit/audit.jsonl");
    let mut lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    tamper(&mut lines);
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(&log, text).unwrap();
    let path = copy.path().to_path_buf();
    (copy, path)
}

fn verify(daemon: &Daemon, state: &Path) -> std::process::Output {
    daemon.kiln(&["audit", "verify", "--state-dir", state.to_str().unwrap()])
}

/// Index of the first line after `after` whose action is `action`.
fn find(lines: &[String], action: &str, after: usize) -> usize {
    lines
        .iter()
        .enumerate()
        .skip(after)
        .find(|(_, l)| l.contains(&format!("\"action\":\"{action}\"")))
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("no {action} entry after line {after}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_log_records_jobs_and_denials_and_verify_finds_each_tampering() {
    if !require_root("audit_log_records_jobs_and_denials_and_verify_finds_each_tampering") {
        return;
    }
    let config = config_file(&format!(
        "socket_gid = {CLIENTS_GID}\naudit_checkpoint_entries = 4\n"
    ));
    let mut daemon = Daemon::start_with(&["--config", config.path().to_str().unwrap()]);
    let ok = daemon.kiln(&["run", "--", "/bin/true"]);
    assert!(ok.status.success(), "{}", describe(&ok));
    let failed = daemon.kiln(&["run", "--", "/bin/false"]);
    assert_eq!(failed.status.code(), Some(1), "{}", describe(&failed));
    // Another client asks for root's job: answered NOT_FOUND, recorded as a denial.
    let job_id = entries(&daemon.state)
        .iter()
        .find(|e| e["action"] == "job.submit")
        .and_then(|e| e["object"].as_str())
        .and_then(|o| o.strip_prefix("job:"))
        .expect("a job.submit entry")
        .to_string();
    let mut other = JobsClient::new(channel_as(&daemon.socket, OTHER, CLIENTS_GID).await);
    let refused = other
        .get(GetRequest {
            job_id: job_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);
    assert!(daemon.stop().success());

    let log = entries(&daemon.state);
    let has = |pred: &dyn Fn(&serde_json::Value) -> bool| log.iter().any(pred);
    assert!(has(&|e| e["action"] == "config.load"));
    assert!(has(&|e| e["action"] == "job.submit"
        && e["principal"] == "uid:0"
        && e["decision"] == "allow"));
    assert!(has(&|e| e["action"] == "job.read"
        && e["principal"] == format!("uid:{OTHER}")
        && e["object"] == format!("job:{job_id}")
        && e["decision"] == "deny"));
    for change in [
        "accepted, queued",
        "queued -> running",
        "running -> succeeded",
        "running -> failed",
    ] {
        assert!(
            has(&|e| e["action"] == "job.state" && e["reason"].as_str().unwrap().contains(change)),
            "no job.state entry saying {change:?}"
        );
    }
    assert!(
        log.iter()
            .filter(|e| e["action"] == "audit.checkpoint")
            .count()
            >= 3
    );
    assert_eq!(log.last().unwrap()["action"], "audit.checkpoint");

    let intact = verify(&daemon, &daemon.state);
    assert!(intact.status.success(), "{}", describe(&intact));
    assert!(text(&intact.stdout).contains("audit log intact"));
    let tail = daemon.kiln(&[
        "audit",
        "tail",
        "-n",
        "2",
        "--state-dir",
        daemon.state.to_str().unwrap(),
    ]);
    assert!(tail.status.success(), "{}", describe(&tail));
    assert_eq!(text(&tail.stdout).lines().count(), 2);

    // Each tampering, on a copy; verify names the line where the log breaks.
    let submit = find(
        &std::fs::read_to_string(daemon.state.join("audit/audit.jsonl"))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>(),
        "job.submit",
        0,
    );
    let cases: Vec<(&str, Tamper, String)> = vec![
        (
            "edited",
            Box::new(move |l: &mut Vec<String>| l[submit] = l[submit].replace("uid:0", "uid:1")),
            format!("line {} (seq {}) was edited", submit + 1, submit),
        ),
        (
            "deleted",
            Box::new(move |l: &mut Vec<String>| {
                l.remove(submit);
            }),
            format!("line {}", submit + 1),
        ),
        (
            "reordered",
            Box::new(move |l: &mut Vec<String>| l.swap(submit, submit + 1)),
            format!("line {}", submit + 1),
        ),
        (
            "inserted",
            Box::new(move |l: &mut Vec<String>| {
                let copy = l[submit].clone();
                l.insert(submit + 1, copy);
            }),
            format!("line {}", submit + 2),
        ),
        (
            "bad checkpoint signature",
            Box::new(|l: &mut Vec<String>| {
                let at = find(l, "audit.checkpoint", 0);
                let mut entry: serde_json::Value = serde_json::from_str(&l[at]).unwrap();
                let sig = entry["checkpoint"]["signature"]
                    .as_str()
                    .unwrap()
                    .to_string();
                let flipped = if sig.starts_with('0') { "1" } else { "0" };
                entry["checkpoint"]["signature"] = format!("{flipped}{}", &sig[1..]).into();
                l[at] = serde_json::to_string(&entry).unwrap();
            }),
            "bad checkpoint signature".to_string(),
        ),
        (
            "truncated before the last checkpoint",
            Box::new(|l: &mut Vec<String>| {
                let keep = l.len() - 2;
                l.truncate(keep);
            }),
            "truncated".to_string(),
        ),
    ];
    for (kind, tamper, said) in cases {
        let (_copy, state) = tampered(&daemon.state, tamper);
        let out = verify(&daemon, &state);
        assert_eq!(out.status.code(), Some(1), "{kind}: {}", describe(&out));
        assert!(
            text(&out.stderr).contains(&said),
            "{kind}: expected {said:?} in {}",
            describe(&out)
        );
    }
    // The log verifies with the exported key ring too.
    let ring = daemon.state.join("keys/keyring.json");
    let with_key = daemon.kiln(&[
        "audit",
        "verify",
        "--state-dir",
        daemon.state.to_str().unwrap(),
        "--key",
        ring.to_str().unwrap(),
    ]);
    assert!(with_key.status.success(), "{}", describe(&with_key));
}

/// With the state disk full to the last block, a call that must be audited is refused
/// (RESOURCE_EXHAUSTED) rather than answered unaudited, and the log stays whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_cannot_be_audited_is_refused() {
    use agent_proto::v1::attestations_client::AttestationsClient;
    use agent_proto::v1::ListLinksRequest;
    if !require_root("a_call_that_cannot_be_audited_is_refused") {
        return;
    }
    let config = config_file("state_reserve = \"8M\"\n");
    let args = ["--config", config.path().to_str().unwrap()];
    let mut daemon = Daemon::start_with(&args);
    let _small_disk = daemon.restart_on_small_state_disk(&args);
    let ok = daemon.kiln(&["run", "--", "/bin/true"]);
    assert!(ok.status.success(), "{}", describe(&ok));
    let job_id = entries(&daemon.state)
        .iter()
        .find(|e| e["action"] == "job.submit")
        .and_then(|e| e["object"].as_str())
        .and_then(|o| o.strip_prefix("job:"))
        .unwrap()
        .to_string();
    let mut attestations = AttestationsClient::new(channel_as(&daemon.socket, 0, 0).await);
    let list = || ListLinksRequest {
        job_id: job_id.clone(),
    };
    attestations.list_links(list()).await.unwrap();

    let filler = daemon.state.join("filler");
    {
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 1 << 20];
        while std::io::Write::write_all(&mut file, &block).is_ok() {}
        while std::io::Write::write_all(&mut file, &[0u8; 512]).is_ok() {}
    }
    // An entry still fits in the log file's last allocated block: calls succeed, audited,
    // until one needs a block the disk no longer has.
    let mut answered = 1;
    let err = loop {
        match attestations.list_links(list()).await {
            Ok(_) => answered += 1,
            Err(err) => break err,
        }
        assert!(answered < 1000, "every ListLinks answered on a full disk");
    };
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("audit"), "{err}");
    assert!(
        !err.message().contains(daemon.state.to_str().unwrap()),
        "{err}"
    );

    std::fs::remove_file(&filler).unwrap();
    attestations.list_links(list()).await.unwrap();
    answered += 1;
    assert!(daemon.stop().success());
    let links = entries(&daemon.state)
        .iter()
        .filter(|e| e["action"] == "job.links")
        .count();
    assert_eq!(links, answered, "the refused call left no entry");
    let intact = verify(&daemon, &daemon.state);
    assert!(intact.status.success(), "{}", describe(&intact));
}

/// `kiln audit verify` reads the log a line at a time, in memory that does not grow with
/// the file: a log that goes on for a GiB past its entries, with no line end (a sparse
/// file here), is refused at that line, within a 256 MiB address space.
#[test]
fn verify_reads_a_log_of_any_size_in_bounded_memory() {
    if !require_root("verify_reads_a_log_of_any_size_in_bounded_memory") {
        return;
    }
    let mut daemon = Daemon::start();
    assert!(daemon.stop().success());
    let limited = |state: &Path| {
        std::process::Command::new("sh")
            .args(["-c", "ulimit -v 262144 && exec \"$0\" \"$@\"", KILN])
            .args(["audit", "verify", "--state-dir", state.to_str().unwrap()])
            .output()
            .unwrap()
    };
    // The limit leaves room for verifying a real log ...
    let intact = limited(&daemon.state);
    assert!(intact.status.success(), "{}", describe(&intact));
    // ... but not for reading a huge one whole.
    let (_copy, state) = tampered(&daemon.state, |_| {});
    let entries = entries(&state).len();
    let log = std::fs::OpenOptions::new()
        .write(true)
        .open(state.join("audit/audit.jsonl"))
        .unwrap();
    log.set_len(log.metadata().unwrap().len() + (1 << 30))
        .unwrap();
    let out = limited(&state);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains(&format!("line {}", entries + 1)),
        "{}",
        describe(&out)
    );
}
