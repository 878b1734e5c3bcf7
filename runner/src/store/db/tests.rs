#![allow(clippy::unwrap_used)]
use super::*;
use agent_proto::v1::{JobSpec, OutputFile};

fn job(id: &str, name: &str) -> Job {
    Job {
        job_id: id.into(),
        state: JobState::Queued as i32,
        spec: Some(JobSpec {
            name: name.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn records_survive_reopen_and_idempotency_is_per_owner() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    {
        let db = Database::open(path, Creation::FreshStateOnly).unwrap();
        let first = job("j1", "a");
        assert_eq!(
            db.insert_job(&first, "uid:1", Some("k"), Some(1)).unwrap(),
            Inserted::New("j1".into())
        );
        // The same owner, key and spec: the first job.
        assert_eq!(
            db.insert_job(&job("j2", "a"), "uid:1", Some("k"), Some(1))
                .unwrap(),
            Inserted::Existing("j1".into())
        );
        // The same key with another spec is refused, never answered with a job.
        let err = db
            .insert_job(&job("j3", "b"), "uid:1", Some("k"), Some(1))
            .unwrap_err();
        assert!(matches!(err, RunnerError::AlreadyExists(_)), "{err}");
        assert!(err.to_string().contains("\"k\""), "{err}");
        // Another owner's key is its own.
        assert_eq!(
            db.insert_job(&job("j4", "a"), "uid:2", Some("k"), Some(2))
                .unwrap(),
            Inserted::New("j4".into())
        );
    }
    let db = Database::open(path, Creation::FreshStateOnly).unwrap();
    let (found, owner) = db.get_job_and_owner("j1").unwrap().unwrap();
    assert_eq!((found.job_id.as_str(), owner.as_str()), ("j1", "uid:1"));
    assert!(db.get_job("j2").unwrap().is_none());
    assert_eq!(db.jobs_in_state(JobState::Queued).unwrap().len(), 2);
}

#[test]
fn a_job_record_grants_its_owner_its_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path(), Creation::FreshStateOnly).unwrap();
    let mut j = job("j1", "a");
    db.insert_job(&j, "uid:1", None, Some(1)).unwrap();
    j.outputs.push(OutputFile {
        path: "out".into(),
        digest: "ab".repeat(32),
        ..Default::default()
    });
    db.update_job(&j).unwrap();
    db.grant_blob("uid:2", &"cd".repeat(32)).unwrap();
    let asked = ["ab".repeat(32), "cd".repeat(32)];
    let asked = asked.iter().map(String::as_str);
    let one = db.readable_blobs(&["uid:1"], asked.clone()).unwrap();
    let two = db.readable_blobs(&["uid:2"], asked).unwrap();
    assert_eq!(one.into_iter().collect::<Vec<_>>(), vec!["ab".repeat(32)]);
    assert_eq!(two.into_iter().collect::<Vec<_>>(), vec!["cd".repeat(32)]);
}

#[test]
fn a_version_0_database_is_migrated_with_owners() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE jobs (
                id TEXT PRIMARY KEY,
                idempotency_key TEXT UNIQUE,
                peer_uid INTEGER,
                state INTEGER NOT NULL,
                created_ms INTEGER NOT NULL,
                record BLOB NOT NULL
            );",
        )
        .unwrap();
        let mut old = job("old", "a");
        old.provenance_digest = "ef".repeat(32);
        conn.execute(
            "INSERT INTO jobs VALUES ('old', 'k', 1000, 3, 1, ?1)",
            params![old.encode_to_vec()],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO jobs VALUES ('anon', NULL, NULL, 3, 2, ?1)",
            params![job("anon", "a").encode_to_vec()],
        )
        .unwrap();
    }
    let db = Database::open(dir.path(), Creation::FreshStateOnly).unwrap();
    assert_eq!(db.get_job_and_owner("old").unwrap().unwrap().1, "uid:1000");
    assert_eq!(db.get_job_and_owner("anon").unwrap().unwrap().1, "unknown");
    let digest = "ef".repeat(32);
    assert_eq!(
        db.readable_blobs(&["uid:1000"], [digest.as_str()])
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        db.insert_job(&job("new", "a"), "uid:1000", Some("k"), Some(1000))
            .unwrap(),
        Inserted::Existing("old".into())
    );
    drop(db);
    // Opening again is a no-op.
    Database::open(dir.path(), Creation::FreshStateOnly).unwrap();
}

#[test]
fn a_lost_database_is_noticed_and_not_silently_recreated() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path(), Creation::FreshStateOnly).unwrap();
    db.check_file().unwrap();
    db.insert_job(&job("j1", "a"), "uid:1", None, None).unwrap();
    std::fs::remove_file(dir.path().join("kiln.db")).unwrap();
    let err = db.check_file().unwrap_err();
    assert!(matches!(err, RunnerError::Unavailable(_)), "{err}");
    assert!(
        !err.to_string().contains(dir.path().to_str().unwrap()),
        "{err}"
    );
    assert!(db.insert_job(&job("j2", "a"), "uid:1", None, None).is_err());
    drop(db);
    let err = Database::open(dir.path(), Creation::FreshStateOnly)
        .err()
        .unwrap();
    assert!(err.to_string().contains("--new-database"), "{err}");
    let db = Database::open(dir.path(), Creation::Allowed).unwrap();
    assert!(db.get_job("j1").unwrap().is_none());
}

#[test]
fn the_queue_limit_counts_queued_jobs_only() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path(), Creation::FreshStateOnly)
        .unwrap()
        .with_queue_limit(2);
    let queued = |id: &str| job(id, "same");
    db.insert_job(&queued("a"), "uid:1", Some("ka"), None)
        .unwrap();
    db.insert_job(&queued("b"), "uid:1", None, None).unwrap();
    let err = db
        .insert_job(&queued("c"), "uid:1", None, None)
        .unwrap_err();
    assert!(matches!(err, RunnerError::ResourceExhausted(_)), "{err}");
    assert!(err.to_string().contains("max_queued_jobs is 2"), "{err}");
    // Resubmitting an accepted job is not a new job.
    assert_eq!(
        db.insert_job(&queued("a2"), "uid:1", Some("ka"), None)
            .unwrap(),
        Inserted::Existing("a".into())
    );
    // A job that leaves the queue makes room.
    let mut started = queued("a");
    started.state = JobState::Running as i32;
    db.update_job(&started).unwrap();
    db.insert_job(&queued("c"), "uid:1", None, None).unwrap();
}

#[test]
fn a_database_others_could_read_moves_to_a_private_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    {
        let db = Database::open(dir.path(), Creation::FreshStateOnly).unwrap();
        db.insert_job(&job("j1", "a"), "uid:1", None, None).unwrap();
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    // A host user's descriptor, opened while the file was readable.
    let held = std::fs::File::open(&path).unwrap();
    let db = Database::open(dir.path(), Creation::FreshStateOnly).unwrap();
    db.insert_job(&job("j2", "later-secret"), "uid:1", None, None)
        .unwrap();
    assert!(db.get_job("j1").unwrap().is_some(), "records were lost");
    let new = std::fs::metadata(&path).unwrap();
    assert_eq!(new.mode() & 0o077, 0);
    assert_ne!(held.metadata().unwrap().ino(), new.ino());
    for name in ["kiln.db-wal", "kiln.db-shm"] {
        if let Ok(meta) = std::fs::metadata(dir.path().join(name)) {
            assert_eq!(meta.mode() & 0o077, 0, "{name}");
        }
    }
}

#[test]
fn an_owners_queue_cap_counts_its_own_queued_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path(), Creation::FreshStateOnly)
        .unwrap()
        .with_queue_limit(10);
    let cap = OwnerQueue {
        cap: Some(QueueCap {
            max: 1,
            key: "tenants.ci.max_queued_jobs",
        }),
        reserved: 0,
    };
    db.insert_job_within(&job("a", "a"), "tenant:ci", Some("k"), None, cap)
        .unwrap();
    let err = db
        .insert_job_within(&job("b", "b"), "tenant:ci", None, None, cap)
        .unwrap_err();
    assert!(matches!(err, RunnerError::ResourceExhausted(_)), "{err}");
    assert!(
        err.to_string().contains("tenants.ci.max_queued_jobs is 1"),
        "{err}"
    );
    // A retry of the accepted job is not a new one; another owner's queue is its own.
    assert_eq!(
        db.insert_job_within(&job("a2", "a"), "tenant:ci", Some("k"), None, cap)
            .unwrap(),
        Inserted::Existing("a".into())
    );
    db.insert_job_within(&job("c", "c"), "tenant:web", None, None, cap)
        .unwrap();
}

#[test]
fn an_owner_within_its_reserve_is_queued_past_a_full_runner_queue() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path(), Creation::FreshStateOnly)
        .unwrap()
        .with_queue_limit(2);
    let reserve = OwnerQueue {
        cap: None,
        reserved: 1,
    };
    for id in ["a1", "a2"] {
        db.insert_job_within(&job(id, id), "tenant:a", None, None, reserve)
            .unwrap();
    }
    let full = db
        .insert_job_within(&job("a3", "a3"), "tenant:a", None, None, reserve)
        .unwrap_err();
    assert!(matches!(full, RunnerError::ResourceExhausted(_)), "{full}");
    db.insert_job_within(&job("b1", "b1"), "tenant:b", None, None, reserve)
        .unwrap();
    let err = db
        .insert_job_within(&job("b2", "b2"), "tenant:b", None, None, reserve)
        .unwrap_err();
    assert!(err.to_string().contains("max_queued_jobs is 2"), "{err}");
    // Without a reserve the runner's cap holds as before.
    assert!(db.insert_job(&job("c", "c"), "uid:0", None, None).is_err());
}

#[test]
fn listing_pages_newest_first_per_owner() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path(), Creation::FreshStateOnly).unwrap();
    for (i, owner) in ["uid:1", "uid:1", "uid:2", "uid:1", "uid:1"]
        .iter()
        .enumerate()
    {
        let mut j = job(&format!("j{i}"), "a");
        // Two jobs in the same millisecond: ordered by id.
        j.created_unix_ms = [10, 20, 20, 20, 30][i];
        db.insert_job(&j, owner, None, None).unwrap();
    }
    let ids = |owners: Option<&[&str]>, after: Option<(i64, &str)>, limit| {
        db.list_jobs(owners, None, after, limit, |job, _| job.job_id)
            .unwrap()
            .jobs
    };
    assert_eq!(ids(Some(&["uid:1"]), None, 10), ["j4", "j3", "j1", "j0"]);
    assert_eq!(ids(Some(&["uid:1"]), None, 2), ["j4", "j3"]);
    assert_eq!(ids(Some(&["uid:1"]), Some((20, "j3")), 2), ["j1", "j0"]);
    assert_eq!(ids(None, Some((20, "j3")), 10), ["j2", "j1", "j0"]);
    assert_eq!(ids(Some(&["uid:1", "uid:2"]), None, 10).len(), 5);
    assert!(ids(Some(&["uid:3"]), None, 10).is_empty());
    let running = db
        .list_jobs(None, Some(JobState::Running), None, 10, |job, owner| {
            (job.job_id, owner.to_string())
        })
        .unwrap();
    assert!(running.jobs.is_empty() && !running.cut);
}

#[test]
fn a_version_1_database_gets_the_listing_indexes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Database::open(dir.path(), Creation::FreshStateOnly).unwrap();
        db.insert_job(&job("j1", "a"), "uid:1", Some("k"), Some(1))
            .unwrap();
    }
    {
        // As a version 1 daemon left it.
        let conn = Connection::open(dir.path().join("kiln.db")).unwrap();
        conn.execute_batch(
            "DROP INDEX jobs_owner_state_created; DROP INDEX jobs_owner_created;
             DROP INDEX jobs_created; DROP INDEX jobs_state_created;
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let db = Database::open(dir.path(), Creation::FreshStateOnly).unwrap();
    assert_eq!(db.get_job_and_owner("j1").unwrap().unwrap().1, "uid:1");
    let conn = db.lock().unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .unwrap();
    assert_eq!(version, 2);
    // An owner's page is read from the index in order: no scan, no sort.
    let mut explain = conn
        .prepare(
            "EXPLAIN QUERY PLAN SELECT created_ms, id FROM jobs WHERE owner = 'uid:1'
             AND (created_ms, id) < (5, 'x') ORDER BY created_ms DESC, id DESC LIMIT 5",
        )
        .unwrap();
    let plan: Vec<String> = explain
        .query_map([], |row| row.get(3))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    let plan = plan.join("; ");
    assert!(plan.contains("INDEX jobs_owner_created"), "{plan}");
    assert!(!plan.contains("TEMP B-TREE"), "{plan}");
}
