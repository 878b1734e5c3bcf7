//! Durable job records in SQLite. A job is committed (WAL, synchronous=FULL) before
//! Submit answers, and every state change is committed before it is announced.

use std::path::Path;
use std::sync::{Arc, Mutex};

use agent_proto::v1::{Job, JobState};
use prost::Message;
use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{Result, RunnerError};

#[derive(Clone)]
pub struct Database {
    conn: Arc<Mutex<Connection>>,
    /// Queued jobs beyond which a new job is refused (none: no limit).
    max_queued: Option<u64>,
}

impl Database {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS jobs (
                id TEXT PRIMARY KEY,
                idempotency_key TEXT UNIQUE,
                peer_uid INTEGER,
                state INTEGER NOT NULL,
                created_ms INTEGER NOT NULL,
                record BLOB NOT NULL
            );
            CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);",
        )?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            max_queued: None,
        })
    }

    /// Refuses new jobs while `max` are queued. Counted in the database, under the
    /// same lock as the insert: right across restarts, cancels and concurrent submits.
    pub fn with_queue_limit(mut self, max: u64) -> Self {
        self.max_queued = Some(max);
        self
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.conn
            .lock()
            .map_err(|_| RunnerError::Internal("database lock poisoned".into()))
    }

    /// Records a new job, or returns the id of the job already submitted with the
    /// same idempotency key.
    pub fn insert_job(
        &self,
        job: &Job,
        idempotency_key: Option<&str>,
        peer_uid: Option<u32>,
    ) -> Result<String> {
        let conn = self.lock()?;
        if let Some(key) = idempotency_key {
            let existing: Option<String> = conn
                .query_row(
                    "SELECT id FROM jobs WHERE idempotency_key = ?1",
                    params![key],
                    |row| row.get(0),
                )
                .optional()?;
            if let Some(id) = existing {
                return Ok(id);
            }
        }
        if let Some(max) = self.max_queued {
            let queued: u64 = conn.query_row(
                "SELECT COUNT(*) FROM jobs WHERE state = ?1",
                params![JobState::Queued as i32],
                |row| row.get(0),
            )?;
            if queued >= max {
                return Err(RunnerError::ResourceExhausted(format!(
                    "the queue is full: {queued} jobs are waiting, the runner's max_queued_jobs is {max}; submit again later"
                )));
            }
        }
        conn.execute(
            "INSERT INTO jobs (id, idempotency_key, peer_uid, state, created_ms, record)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                job.job_id,
                idempotency_key,
                peer_uid,
                job.state,
                job.created_unix_ms,
                job.encode_to_vec()
            ],
        )?;
        Ok(job.job_id.clone())
    }

    pub fn update_job(&self, job: &Job) -> Result<()> {
        let conn = self.lock()?;
        let changed = conn.execute(
            "UPDATE jobs SET state = ?2, record = ?3 WHERE id = ?1",
            params![job.job_id, job.state, job.encode_to_vec()],
        )?;
        if changed == 0 {
            return Err(RunnerError::NotFound(format!("job {}", job.job_id)));
        }
        Ok(())
    }

    /// Writes the record only if the stored state is still `expected`; the
    /// compare-and-set keeps a cancel and the scheduler from both claiming a job.
    /// A step's progress within a running job, committed without waiting for the disk
    /// (WAL with synchronous=NORMAL for this one transaction). A process crash loses
    /// nothing; a power loss can lose only these progress records, which the job's next
    /// state change (synchronous=FULL, which syncs every earlier commit of the WAL)
    /// would have made durable. A job interrupted that way is marked interrupted at the
    /// restart either way, since its state says running.
    pub fn update_progress(&self, job: &Job) -> Result<()> {
        let conn = self.lock()?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let changed = conn.execute(
            "UPDATE jobs SET state = ?2, record = ?3 WHERE id = ?1",
            params![job.job_id, job.state, job.encode_to_vec()],
        );
        // Back to FULL before anything else can commit on this connection.
        conn.pragma_update(None, "synchronous", "FULL")?;
        if changed? == 0 {
            return Err(RunnerError::NotFound(format!("job {}", job.job_id)));
        }
        Ok(())
    }

    pub fn update_job_if_state(&self, job: &Job, expected: JobState) -> Result<bool> {
        let conn = self.lock()?;
        let changed = conn.execute(
            "UPDATE jobs SET state = ?2, record = ?3 WHERE id = ?1 AND state = ?4",
            params![job.job_id, job.state, job.encode_to_vec(), expected as i32],
        )?;
        Ok(changed == 1)
    }

    pub fn get_job(&self, id: &str) -> Result<Option<Job>> {
        let conn = self.lock()?;
        let record: Option<Vec<u8>> = conn
            .query_row(
                "SELECT record FROM jobs WHERE id = ?1",
                params![id],
                |row| row.get(0),
            )
            .optional()?;
        record
            .map(|bytes| {
                Job::decode(bytes.as_slice())
                    .map_err(|e| RunnerError::Internal(format!("job record {id} is corrupt: {e}")))
            })
            .transpose()
    }

    /// Jobs in the given state, oldest first.
    pub fn jobs_in_state(&self, state: JobState) -> Result<Vec<Job>> {
        let conn = self.lock()?;
        let mut stmt =
            conn.prepare("SELECT id, record FROM jobs WHERE state = ?1 ORDER BY created_ms")?;
        let rows = stmt.query_map(params![state as i32], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, Vec<u8>>(1)?))
        })?;
        let mut jobs = Vec::new();
        for row in rows {
            let (id, bytes) = row?;
            jobs.push(
                Job::decode(bytes.as_slice()).map_err(|e| {
                    RunnerError::Internal(format!("job record {id} is corrupt: {e}"))
                })?,
            );
        }
        Ok(jobs)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_survive_reopen_and_idempotency_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        let job = Job {
            job_id: "j1".into(),
            state: JobState::Queued as i32,
            ..Default::default()
        };
        {
            let db = Database::open(&path).unwrap();
            assert_eq!(db.insert_job(&job, Some("k"), Some(0)).unwrap(), "j1");
            let again = Job {
                job_id: "j2".into(),
                ..job.clone()
            };
            assert_eq!(db.insert_job(&again, Some("k"), Some(0)).unwrap(), "j1");
        }
        let db = Database::open(&path).unwrap();
        assert_eq!(db.get_job("j1").unwrap().unwrap().job_id, "j1");
        assert!(db.get_job("j2").unwrap().is_none());
        assert_eq!(db.jobs_in_state(JobState::Queued).unwrap().len(), 1);
    }

    #[test]
    fn the_queue_limit_counts_queued_jobs_only() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(&dir.path().join("kiln.db"))
            .unwrap()
            .with_queue_limit(2);
        let job = |id: &str| Job {
            job_id: id.into(),
            state: JobState::Queued as i32,
            ..Default::default()
        };
        db.insert_job(&job("a"), Some("ka"), None).unwrap();
        db.insert_job(&job("b"), None, None).unwrap();
        let err = db.insert_job(&job("c"), None, None).unwrap_err();
        assert!(matches!(err, RunnerError::ResourceExhausted(_)), "{err}");
        assert!(err.to_string().contains("max_queued_jobs is 2"), "{err}");
        // Resubmitting an accepted job is not a new job.
        assert_eq!(db.insert_job(&job("a2"), Some("ka"), None).unwrap(), "a");
        // A job that leaves the queue makes room.
        let mut started = job("a");
        started.state = JobState::Running as i32;
        db.update_job(&started).unwrap();
        db.insert_job(&job("c"), None, None).unwrap();
    }
}
