//! Durable job records in SQLite. A job is committed (WAL, synchronous=FULL) before
//! Submit answers, and every state change is committed before it is announced.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use agent_proto::v1::{Job, JobState};
use prost::Message;
use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{Result, RunnerError};

#[derive(Clone)]
pub struct Database {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    /// (device, inode) of the file opened: a file by that name that is another one, or
    /// none, means the records went elsewhere than where a restart will look.
    file: (u64, u64),
    /// Queued jobs beyond which a new job is refused (none: no limit).
    max_queued: Option<u64>,
}

/// Whether [`Database::open`] may create a database where there is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creation {
    /// Only in a state directory that holds no Kiln data yet.
    FreshStateOnly,
    /// Also beside existing data (the operator said so: its job records are gone).
    Allowed,
}

impl Database {
    /// Opens the job database of the state directory `state`. A missing database where
    /// the state directory already holds Kiln data (blobs, or the marker a database
    /// leaves) is refused unless `creation` allows it: silently starting empty would
    /// lose every job record.
    pub fn open(state: &Path, creation: Creation) -> Result<Self> {
        let path = state.join(DB_FILE);
        let marker = state.join(MARKER_FILE);
        if !path.exists()
            && creation == Creation::FreshStateOnly
            && (marker.exists() || holds_blobs(&state.join("cas")))
        {
            return Err(RunnerError::FailedPrecondition(format!(
                "the state directory {} holds Kiln data but no job database ({DB_FILE}): \
                 it was lost or moved. Restore it, or start with --new-database to begin \
                 an empty one (every earlier job record stays lost)",
                state.display()
            )));
        }
        // An older daemon left the files readable by every host user. Root only, before
        // SQLite opens them: it creates the WAL with the database file's mode.
        let exposed = std::fs::metadata(&path).is_ok_and(|m| m.mode() & 0o077 != 0);
        for file in [DB_FILE, "kiln.db-wal", "kiln.db-shm"] {
            let file = state.join(file);
            if file.exists() {
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                    .map_err(RunnerError::io_path("chmod", &file))?;
            }
        }
        let mut conn = connect(&path)?;
        migrate(&mut conn)?;
        if exposed {
            // A host user may still hold the old file open: the records move to a new
            // file, and the old one (with what it held) is all such a reader keeps.
            let private = state.join("kiln.db.private");
            let _ = std::fs::remove_file(&private);
            conn.execute("VACUUM INTO ?1", params![private.to_string_lossy()])?;
            drop(conn);
            std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600))
                .map_err(RunnerError::io_path("chmod", &private))?;
            std::fs::rename(&private, &path).map_err(RunnerError::io_path("replacing", &path))?;
            for file in ["kiln.db-wal", "kiln.db-shm"] {
                let _ = std::fs::remove_file(state.join(file));
            }
            tracing::warn!(
                "the job database was readable by other host users: moved to a private file"
            );
            conn = connect(&path)?;
        }
        std::fs::write(
            &marker,
            b"this state directory has a Kiln job database (kiln.db)\n",
        )
        .map_err(RunnerError::io_path("writing", &marker))?;
        let meta = std::fs::metadata(&path).map_err(RunnerError::io_path("reading", &path))?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path,
            file: (meta.dev(), meta.ino()),
            max_queued: None,
        })
    }

    /// Fails if the database file was removed or replaced since it was opened: what
    /// the daemon records then would not be found after a restart.
    pub fn check_file(&self) -> Result<()> {
        match std::fs::metadata(&self.path) {
            Ok(meta) if (meta.dev(), meta.ino()) == self.file => Ok(()),
            _ => Err(RunnerError::Unavailable(format!(
                "the job database ({DB_FILE}) was removed or replaced while the daemon ran; \
                 no job is accepted until an operator restores it and restarts the daemon"
            ))),
        }
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

    /// Records a new job owned by `owner`. With an idempotency key the owner already
    /// used, answers with that job if it has the same spec, and refuses otherwise; keys
    /// of other owners are never seen.
    pub fn insert_job(
        &self,
        job: &Job,
        owner: &str,
        idempotency_key: Option<&str>,
        peer_uid: Option<u32>,
    ) -> Result<Inserted> {
        self.insert_job_within(job, owner, idempotency_key, peer_uid, OwnerQueue::default())
    }

    /// [`Self::insert_job`], with the owner's queue bounded as `queue` says (its jobs
    /// counted under the same lock as the insert).
    pub fn insert_job_within(
        &self,
        job: &Job,
        owner: &str,
        idempotency_key: Option<&str>,
        peer_uid: Option<u32>,
        queue: OwnerQueue<'_>,
    ) -> Result<Inserted> {
        // A job recorded in a file nobody will read again would be lost while answered.
        self.check_file()?;
        let conn = self.lock()?;
        if let Some(key) = idempotency_key {
            let existing: Option<(String, Vec<u8>)> = conn
                .query_row(
                    "SELECT id, record FROM jobs WHERE owner = ?1 AND idempotency_key = ?2",
                    params![owner, key],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?;
            if let Some((id, record)) = existing {
                let first = decode(&id, &record)?;
                if first.spec != job.spec {
                    return Err(RunnerError::AlreadyExists(format!(
                        "idempotency key {key:?} was used for job {id} with another spec; \
                         a retry must send the same spec, a new job a new key"
                    )));
                }
                return Ok(Inserted::Existing(id));
            }
        }
        let owner_queued = || -> Result<u64> {
            Ok(conn.query_row(
                "SELECT COUNT(*) FROM jobs WHERE owner = ?1 AND state = ?2",
                params![owner, JobState::Queued as i32],
                |row| row.get(0),
            )?)
        };
        let owner_queued = match (queue.cap, queue.reserved) {
            (None, 0) => None,
            _ => Some(owner_queued()?),
        };
        if let Some(max) = self.max_queued {
            let queued: u64 = conn.query_row(
                "SELECT COUNT(*) FROM jobs WHERE state = ?1",
                params![JobState::Queued as i32],
                |row| row.get(0),
            )?;
            let within_reserve = owner_queued.is_some_and(|own| own < queue.reserved);
            if queued >= max && !within_reserve {
                return Err(RunnerError::ResourceExhausted(format!(
                    "the queue is full: {queued} jobs are waiting, the runner's max_queued_jobs is {max}; submit again later"
                )));
            }
        }
        if let Some((cap, queued)) = queue.cap.zip(owner_queued) {
            if queued >= cap.max {
                return Err(RunnerError::ResourceExhausted(format!(
                    "{queued} of your jobs are waiting, {} is {}; submit again later",
                    cap.key, cap.max
                )));
            }
        }
        conn.execute(
            "INSERT INTO jobs (id, owner, idempotency_key, peer_uid, state, created_ms, record)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                job.job_id,
                owner,
                idempotency_key,
                peer_uid,
                job.state,
                job.created_unix_ms,
                job.encode_to_vec()
            ],
        )?;
        Ok(Inserted::New(job.job_id.clone()))
    }

    pub fn update_job(&self, job: &Job) -> Result<()> {
        let mut conn = self.lock()?;
        if !write_record(&mut conn, job, None)? {
            return Err(RunnerError::NotFound(format!("job {}", job.job_id)));
        }
        Ok(())
    }

    /// A step's progress within a running job, committed without waiting for the disk
    /// (WAL with synchronous=NORMAL for this one transaction). A process crash loses
    /// nothing; a power loss can lose only these progress records, which the job's next
    /// state change (synchronous=FULL, which syncs every earlier commit of the WAL)
    /// would have made durable. A job interrupted that way is marked interrupted at the
    /// restart either way, since its state says running.
    pub fn update_progress(&self, job: &Job) -> Result<()> {
        let mut conn = self.lock()?;
        if !unsynced(&mut conn, |conn| write_record(conn, job, None))? {
            return Err(RunnerError::NotFound(format!("job {}", job.job_id)));
        }
        Ok(())
    }

    /// Writes the record only if the stored state is still `expected`; the
    /// compare-and-set keeps a cancel and the scheduler from both claiming a job.
    pub fn update_job_if_state(&self, job: &Job, expected: JobState) -> Result<bool> {
        let mut conn = self.lock()?;
        write_record(&mut conn, job, Some(expected))
    }

    /// The owner key of a job, without decoding its record.
    pub fn owner_of(&self, id: &str) -> Result<Option<String>> {
        let conn = self.lock()?;
        Ok(conn
            .query_row("SELECT owner FROM jobs WHERE id = ?1", params![id], |row| {
                row.get(0)
            })
            .optional()?)
    }

    /// How many jobs each owner has in each state (the metrics' starting point).
    pub fn count_by_owner_and_state(&self) -> Result<Vec<(String, JobState, u64)>> {
        let conn = self.lock()?;
        let mut stmt =
            conn.prepare("SELECT owner, state, COUNT(*) FROM jobs GROUP BY owner, state")?;
        let rows = stmt.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i32>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })?;
        let mut counts = Vec::new();
        for row in rows {
            let (owner, state, count) = row?;
            let state = JobState::try_from(state).unwrap_or(JobState::Unspecified);
            counts.push((owner, state, u64::try_from(count).unwrap_or(0)));
        }
        Ok(counts)
    }

    pub fn get_job(&self, id: &str) -> Result<Option<Job>> {
        Ok(self.get_job_and_owner(id)?.map(|(job, _)| job))
    }

    /// A job's record and the owner key of the principal that submitted it.
    pub fn get_job_and_owner(&self, id: &str) -> Result<Option<(Job, String)>> {
        let conn = self.lock()?;
        let row: Option<(Vec<u8>, String)> = conn
            .query_row(
                "SELECT record, owner FROM jobs WHERE id = ?1",
                params![id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        row.map(|(bytes, owner)| Ok((decode(id, &bytes)?, owner)))
            .transpose()
    }

    /// Jobs in the given state, oldest first.
    pub fn jobs_in_state(&self, state: JobState) -> Result<Vec<Job>> {
        Ok(self
            .owned_jobs_in_state(state)?
            .into_iter()
            .map(|(job, _)| job)
            .collect())
    }

    /// Jobs in the given state with their owners, oldest first.
    pub fn owned_jobs_in_state(&self, state: JobState) -> Result<Vec<(Job, String)>> {
        let conn = self.lock()?;
        let mut stmt = conn
            .prepare("SELECT id, record, owner FROM jobs WHERE state = ?1 ORDER BY created_ms")?;
        let rows = stmt.query_map(params![state as i32], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, Vec<u8>>(1)?,
                row.get::<_, String>(2)?,
            ))
        })?;
        let mut jobs = Vec::new();
        for row in rows {
            let (id, bytes, owner) = row?;
            jobs.push((decode(&id, &bytes)?, owner));
        }
        Ok(jobs)
    }

    /// A page of jobs, newest first (by creation time, then id), after `after` (the
    /// last job of the previous page), of the given `owners` (None: every owner's) and
    /// `state`. Each record is decoded and handed to `summarize` with its owner in
    /// turn, so only one full record is in memory at a time.
    ///
    /// The page's keys are read from an index per owner (each in order, at most
    /// `limit`), merged, and only then are the page's records read: the cost of a page
    /// does not grow with the number of jobs an owner has. Nor with the size of their
    /// records: the page ends early (`cut`) once it read [`LIST_RECORD_BYTES`] of them,
    /// since every other use of the database waits meanwhile.
    pub fn list_jobs<T>(
        &self,
        owners: Option<&[&str]>,
        state: Option<JobState>,
        after: Option<(i64, &str)>,
        limit: u32,
        mut summarize: impl FnMut(Job, &str) -> T,
    ) -> Result<JobPage<T>> {
        let conn = self.lock()?;
        let mut keys = match owners {
            None => page_keys(&conn, None, state, after, limit)?,
            Some(owners) => {
                let mut keys = Vec::new();
                for owner in owners {
                    keys.extend(page_keys(&conn, Some(owner), state, after, limit)?);
                }
                keys
            }
        };
        keys.sort_unstable_by(|a, b| b.cmp(a));
        keys.dedup();
        keys.truncate(limit as usize);
        let mut record = conn.prepare_cached("SELECT owner, record FROM jobs WHERE id = ?1")?;
        let mut jobs = Vec::with_capacity(keys.len());
        let mut read = 0;
        for (_, id) in keys {
            if read >= LIST_RECORD_BYTES {
                return Ok(JobPage { jobs, cut: true });
            }
            let (owner, bytes): (String, Vec<u8>) =
                record.query_row(params![id], |row| Ok((row.get(0)?, row.get(1)?)))?;
            read += bytes.len();
            jobs.push(summarize(decode(&id, &bytes)?, &owner));
        }
        Ok(JobPage { jobs, cut: false })
    }

    /// Records that `owner` may read `digest`: it uploaded the content (the store
    /// hashed every byte it sent), so it has it.
    pub fn grant_blob(&self, owner: &str, digest: &str) -> Result<()> {
        let conn = self.lock()?;
        conn.execute(
            "INSERT OR IGNORE INTO blob_access (owner, digest) VALUES (?1, ?2)",
            params![owner, digest],
        )?;
        Ok(())
    }

    /// Which of `digests` any of `owners` may read. Asked in batches, each under the
    /// lock on its own, so a client asking for many digests does not hold up others.
    pub fn readable_blobs<'a>(
        &self,
        owners: &[&str],
        digests: impl IntoIterator<Item = &'a str>,
    ) -> Result<std::collections::HashSet<String>> {
        const BATCH: usize = 500;
        let digests: Vec<&str> = digests.into_iter().collect();
        let mut readable = std::collections::HashSet::new();
        let owner_marks = vec!["?"; owners.len()].join(",");
        for batch in digests.chunks(BATCH) {
            let marks = vec!["?"; batch.len()].join(",");
            let sql = format!(
                "SELECT DISTINCT digest FROM blob_access
                 WHERE owner IN ({owner_marks}) AND digest IN ({marks})"
            );
            let conn = self.lock()?;
            let mut stmt = conn.prepare_cached(&sql)?;
            let params = owners
                .iter()
                .map(|o| o as &dyn rusqlite::ToSql)
                .chain(batch.iter().map(|d| d as &dyn rusqlite::ToSql));
            let rows = stmt.query_map(rusqlite::params_from_iter(params), |row| {
                row.get::<_, String>(0)
            })?;
            for row in rows {
                readable.insert(row?);
            }
        }
        Ok(readable)
    }
}

const DB_FILE: &str = "kiln.db";
/// Left beside the database: its presence without the database means it was lost.
const MARKER_FILE: &str = "kiln.db.present";

/// Whether a content store holds any blob (a shard directory).
fn holds_blobs(cas: &Path) -> bool {
    std::fs::read_dir(cas)
        .map(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                name.len() == 2 && e.file_type().is_ok_and(|t| t.is_dir())
            })
        })
        .unwrap_or(false)
}

/// The (created_ms, id) keys of up to `limit` jobs of one owner (or of all), newest
/// first, after `after`, read from an index in order.
fn page_keys(
    conn: &Connection,
    owner: Option<&str>,
    state: Option<JobState>,
    after: Option<(i64, &str)>,
    limit: u32,
) -> Result<Vec<(i64, String)>> {
    let mut sql = String::from("SELECT created_ms, id FROM jobs WHERE 1 = 1");
    let mut args: Vec<&dyn rusqlite::ToSql> = Vec::new();
    if let Some(owner) = &owner {
        sql.push_str(" AND owner = ?");
        args.push(owner);
    }
    let state = state.map(|s| s as i32);
    if let Some(state) = &state {
        sql.push_str(" AND state = ?");
        args.push(state);
    }
    if let Some((created_ms, id)) = &after {
        sql.push_str(" AND (created_ms, id) < (?, ?)");
        args.push(created_ms);
        args.push(id);
    }
    sql.push_str(" ORDER BY created_ms DESC, id DESC LIMIT ?");
    args.push(&limit);
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(rusqlite::params_from_iter(args), |row| {
        Ok((row.get(0)?, row.get(1)?))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Bytes of job records one [`Database::list_jobs`] page reads at most (past the first
/// record): far more than a page of ordinary jobs, and a short hold of the database.
pub const LIST_RECORD_BYTES: usize = 16 << 20;

/// A page of [`Database::list_jobs`].
#[derive(Debug)]
pub struct JobPage<T> {
    pub jobs: Vec<T>,
    /// Ended before `limit` jobs because of the bytes their records took: more may follow.
    pub cut: bool,
}

/// A cap on one owner's queued jobs, and the configuration key that sets it.
#[derive(Debug, Clone, Copy)]
pub struct QueueCap<'a> {
    pub max: u64,
    pub key: &'a str,
}

/// How one owner's queued jobs are bounded at Submit.
#[derive(Debug, Clone, Copy, Default)]
pub struct OwnerQueue<'a> {
    /// The owner's own cap, if it has one.
    pub cap: Option<QueueCap<'a>>,
    /// The owner's share of the runner's `max_queued_jobs`: while fewer of its jobs
    /// wait, a queue full of other owners' jobs does not refuse it (so the queue holds at
    /// most `max_queued_jobs` plus every owner's reserve).
    pub reserved: u64,
}

/// The outcome of [`Database::insert_job`].
#[derive(Debug, PartialEq, Eq)]
pub enum Inserted {
    New(String),
    /// The owner submitted the same spec with the same idempotency key before.
    Existing(String),
}

fn decode(id: &str, bytes: &[u8]) -> Result<Job> {
    Job::decode(bytes)
        .map_err(|e| RunnerError::Internal(format!("job record {id} is corrupt: {e}")))
}

/// The content-store blobs a job record names as its own products (links, logs,
/// outputs, provenance, the image's SBOM): they become
/// readable by the job's owner in the same transaction as the record.
fn job_blobs(job: &Job) -> impl Iterator<Item = &str> {
    let steps = job.steps.iter().flat_map(|s| {
        [
            s.link_digest.as_str(),
            s.link_dsse_digest.as_str(),
            s.stdout_digest.as_str(),
            s.stderr_digest.as_str(),
        ]
    });
    let outputs = job.outputs.iter().map(|o| o.digest.as_str());
    steps
        .chain(outputs)
        .chain([job.provenance_digest.as_str(), job.sbom_digest.as_str()])
        .filter(|d| !d.is_empty())
}

/// Writes a job's record (only while its state is `expected`, if given) and grants its
/// owner the blobs it names, in one transaction. False if no record was written.
/// Runs `write` with synchronous=NORMAL: its commit reaches the WAL, not the disk; the
/// next synchronous=FULL commit syncs it with its own.
fn unsynced<T>(
    conn: &mut Connection,
    write: impl FnOnce(&mut Connection) -> Result<T>,
) -> Result<T> {
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let written = write(conn);
    // Back to FULL before anything else can commit on this connection.
    conn.pragma_update(None, "synchronous", "FULL")?;
    written
}

fn write_record(conn: &mut Connection, job: &Job, expected: Option<JobState>) -> Result<bool> {
    let tx = conn.transaction()?;
    let changed = match expected {
        Some(expected) => tx.execute(
            "UPDATE jobs SET state = ?2, record = ?3 WHERE id = ?1 AND state = ?4",
            params![job.job_id, job.state, job.encode_to_vec(), expected as i32],
        )?,
        None => tx.execute(
            "UPDATE jobs SET state = ?2, record = ?3 WHERE id = ?1",
            params![job.job_id, job.state, job.encode_to_vec()],
        )?,
    };
    if changed == 0 {
        return Ok(false);
    }
    {
        let mut grant = tx.prepare_cached(
            "INSERT OR IGNORE INTO blob_access (owner, digest)
             SELECT owner, ?2 FROM jobs WHERE id = ?1",
        )?;
        for digest in job_blobs(job) {
            grant.execute(params![job.job_id, digest])?;
        }
    }
    tx.commit()?;
    Ok(true)
}

fn connect(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// The schema version this daemon writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 2;

/// Version 2: the indexes that keep job listings and per-owner queue counts from
/// reading every record: an owner's jobs (in a state) newest first, every job (in a
/// state) newest first.
fn add_listing_indexes(tx: &rusqlite::Transaction<'_>) -> Result<()> {
    tx.execute_batch(
        "CREATE INDEX IF NOT EXISTS jobs_owner_state_created
             ON jobs(owner, state, created_ms, id);
         CREATE INDEX IF NOT EXISTS jobs_owner_created ON jobs(owner, created_ms, id);
         CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_ms, id);
         CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs(state, created_ms, id);",
    )?;
    Ok(())
}

/// Creates the schema, or brings an older one up to date in one transaction.
///
/// Version 1 adds owners: a job belongs to the principal that submitted it, idempotency
/// keys are unique per owner (they were global), and `blob_access` says which owner may
/// read which blob. Jobs of version 0 get the owner of their recorded peer uid; their
/// blobs stay readable by that owner.
fn migrate(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(RunnerError::FailedPrecondition(format!(
            "the job database has schema version {version}, newer than this daemon's {SCHEMA_VERSION}"
        )));
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    if version == 1 {
        let tx = conn.transaction()?;
        add_listing_indexes(&tx)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
        return Ok(());
    }
    let tx = conn.transaction()?;
    let had_v0: bool = tx
        .prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'")?
        .exists([])?;
    if had_v0 {
        tx.execute_batch("ALTER TABLE jobs RENAME TO jobs_v0; DROP INDEX IF EXISTS jobs_state;")?;
    }
    tx.execute_batch(
        "CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            idempotency_key TEXT,
            peer_uid INTEGER,
            state INTEGER NOT NULL,
            created_ms INTEGER NOT NULL,
            record BLOB NOT NULL,
            UNIQUE (owner, idempotency_key)
        );
        CREATE INDEX jobs_state ON jobs(state);
        CREATE TABLE blob_access (
            owner TEXT NOT NULL,
            digest TEXT NOT NULL,
            PRIMARY KEY (owner, digest)
        ) WITHOUT ROWID;",
    )?;
    if had_v0 {
        // A job recorded without a peer uid belongs to no client: only operators see it.
        tx.execute_batch(
            "INSERT INTO jobs (id, owner, idempotency_key, peer_uid, state, created_ms, record)
             SELECT id, CASE WHEN peer_uid IS NULL THEN 'unknown' ELSE 'uid:' || peer_uid END,
                    idempotency_key, peer_uid, state, created_ms, record
             FROM jobs_v0;
             DROP TABLE jobs_v0;",
        )?;
        let jobs: Vec<(String, String, Vec<u8>)> = {
            let mut stmt = tx.prepare("SELECT id, owner, record FROM jobs")?;
            let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut grant =
            tx.prepare("INSERT OR IGNORE INTO blob_access (owner, digest) VALUES (?1, ?2)")?;
        for (id, owner, record) in jobs {
            let job = decode(&id, &record)?;
            for digest in job_blobs(&job) {
                grant.execute(params![owner, digest])?;
            }
        }
        drop(grant);
    }
    add_listing_indexes(&tx)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests;
