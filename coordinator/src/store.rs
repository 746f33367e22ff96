//! The coordinator's job store: jobs, their state history, per-party results and the node
//! registry, in one SQLite database (DESIGN §7).
//!
//! What is stored:
//! - each job's [`JobSpec`] as its protobuf encoding, next to a few columns to query and order by
//!   (kind, state, submitter, idempotency key, times);
//! - every state a job entered, with the time and the reason, in order — the first entry is the
//!   submission itself;
//! - what each party reported ([`PsiOutcome`], protobuf bytes), one per node;
//! - the last hello of each node;
//! - recurring jobs ([`ScheduleRecord`]) and every run of them ([`ScheduleRun`]): which
//!   occurrence, which attempt, which job — or that the occurrence was skipped;
//! - the lease of every job a coordinator process is executing (see [`lease`]).
//!
//! Jobs follow the state machine `pending → offered → running → succeeded | failed | vetoed |
//! cancelled` (see [`transition_allowed`]); every change is one transaction that reads the
//! current state, updates it and appends to the history, so a crash never leaves a state without
//! its history row. Write transactions are `BEGIN IMMEDIATE`, so two processes sharing the file
//! serialise (with a busy timeout) instead of failing mid-transaction.
//!
//! Time is never read here: callers pass `now_ms` (Unix milliseconds), so tests and the server's
//! clock decide. Stored bytes are treated like bytes from a peer: a blob that does not decode,
//! or a state number outside the enum, is [`StoreError::Corrupt`], never a panic.
//!
//! Every operation is a short, blocking SQLite call behind a mutex; from async code call it from
//! `tokio::task::spawn_blocking` (or accept the brief block).

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use cleanroom_proto::v1::{JobInfo, JobSpec, JobState, PartyResult, PsiOutcome, StateChange};
use prost::Message;
use rand::TryRng;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

mod lease;

pub use lease::{LeaseHolder, OrphanedJob};

/// Version 7's migration: decodes every stored PSI outcome and aggregate result and writes it
/// back, so the fields the protocol now reserves (a party's rows read, rejected, excluded and in
/// "(other)", which it used to report) are dropped: protobuf decoding skips them. A blob that
/// does not decode is left as it is (it could not be shown anyway).
fn scrub_party_figures(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    use cleanroom_proto::v1::{AggregateResult, PsiOutcome};
    let outcomes: Vec<(String, String, Vec<u8>)> = tx
        .prepare("SELECT job_id, node, outcome FROM job_results")?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (job_id, node, bytes) in outcomes {
        if let Ok(outcome) = PsiOutcome::decode(bytes.as_slice()) {
            tx.execute(
                "UPDATE job_results SET outcome = ?3 WHERE job_id = ?1 AND node = ?2",
                params![job_id, node, outcome.encode_to_vec()],
            )?;
        }
    }
    let results: Vec<(String, Vec<u8>)> = tx
        .prepare("SELECT job_id, result FROM aggregate_results")?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (job_id, bytes) in results {
        if let Ok(result) = AggregateResult::decode(bytes.as_slice()) {
            tx.execute(
                "UPDATE aggregate_results SET result = ?2 WHERE job_id = ?1",
                params![job_id, result.encode_to_vec()],
            )?;
        }
    }
    Ok(())
}

/// The schema applied to a new database, version [`SCHEMA_VERSION`].
const SCHEMA: &str = include_str!("schema.sql");

/// Version of [`SCHEMA`]; recorded in the `schema_version` table.
pub const SCHEMA_VERSION: i64 = 7;

/// Most jobs one [`JobStore::list`] call returns, whatever limit is asked for.
pub const MAX_LIST_LIMIT: u32 = 1000;

/// How long a statement waits for another connection's write lock before failing with "busy".
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a job store operation failed. Messages are written for the analyst who will read them.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database itself failed (I/O, lock timeout, constraint, …).
    #[error("job store database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The analyst reused an idempotency key for a different spec.
    #[error(
        "idempotency key '{key}' was already used for job {job_id} with a different spec; \
         use a new key"
    )]
    IdempotencyConflict {
        /// The key the analyst sent.
        key: String,
        /// The job the key already belongs to.
        job_id: String,
    },
    /// The state machine does not allow this move; nothing was changed.
    #[error(
        "job {job_id} is {} and cannot move to {}",
        state_name(.from),
        state_name(.to)
    )]
    IllegalTransition {
        /// The job.
        job_id: String,
        /// Its current state.
        from: JobState,
        /// The state that was asked for.
        to: JobState,
    },
    /// No job has this id.
    #[error("no job with id '{0}'")]
    UnknownJob(String),
    /// A result was reported for a node that is not one of the job's parties; nothing was stored.
    #[error("node '{node}' is not a party of job {job_id}; its result was not stored")]
    NotAParty {
        /// The job.
        job_id: String,
        /// The node that is not in the job's spec.
        node: String,
    },
    /// Stored data of a job does not decode (a blob, or a state number outside the enum).
    #[error("stored data of job {job_id} is corrupt: {reason}")]
    Corrupt {
        /// The job whose row is corrupt.
        job_id: String,
        /// What failed to decode.
        reason: String,
    },
    /// The database was written by a coordinator with another schema version.
    #[error(
        "the job store database has schema version {found}, this coordinator supports only \
         version {supported}; use a matching coordinator version"
    )]
    UnsupportedSchema {
        /// Version recorded in the database.
        found: i64,
        /// Version this code writes and reads.
        supported: i64,
    },
    /// No live schedule has this name.
    #[error("no schedule named '{0}'; `cleanroom schedule list` shows the schedules")]
    UnknownSchedule(String),
    /// A live schedule already has this name.
    #[error("a schedule named '{0}' already exists; remove it first or choose another name")]
    ScheduleExists(String),
    /// The schedule asked for is not valid (name, cron expression, time zone, spec, policy).
    #[error("invalid schedule: {0}")]
    InvalidSchedule(String),
    /// Stored data of a schedule does not decode.
    #[error("stored data of schedule '{name}' is corrupt: {reason}")]
    CorruptSchedule {
        /// The schedule.
        name: String,
        /// What failed to decode.
        reason: String,
    },
    /// The operating system's random number generator failed while drawing a job id.
    #[error("could not draw a job id from the operating system's random number generator: {0}")]
    Randomness(String),
}

/// The outcome of [`JobStore::submit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    /// The job's id, `job-` followed by 16 lowercase hex digits.
    pub job_id: String,
    /// `false` when the idempotency key had already created this job.
    pub created: bool,
}

/// A node as last seen by the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// The node's name (its certificate identity).
    pub name: String,
    /// `host:port` of its data-plane endpoint, from its last hello.
    pub data_addr: String,
    /// When that hello arrived, Unix milliseconds.
    pub last_seen_ms: i64,
}

/// Lower-case name of a state, as analysts read it ("pending", "running", …).
pub fn state_name(state: &JobState) -> &'static str {
    match state {
        JobState::Unspecified => "unspecified",
        JobState::Pending => "pending",
        JobState::Offered => "offered",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Vetoed => "vetoed",
        JobState::Cancelled => "cancelled",
    }
}

/// Whether a report carries no released figure by design: an overlap-sum key holder's, which
/// only repeats the release's terms (the value holder's report carries the figures).
pub fn releases_nothing(outcome: &PsiOutcome) -> bool {
    outcome.sum.as_ref().is_some_and(|s| s.groups.is_empty())
}

/// Whether `state` is final (succeeded, failed, vetoed or cancelled): such a job never moves again.
pub fn is_terminal(state: JobState) -> bool {
    matches!(
        state,
        JobState::Succeeded | JobState::Failed | JobState::Vetoed | JobState::Cancelled
    )
}

/// Whether the job state machine allows moving from `from` to `to`:
/// pending → offered | failed | cancelled | vetoed; offered → running | vetoed | failed |
/// cancelled; running → succeeded | failed | cancelled. Terminal states never move, and no state
/// moves to itself.
pub fn transition_allowed(from: JobState, to: JobState) -> bool {
    use JobState::*;
    matches!(
        (from, to),
        (Pending, Offered | Failed | Cancelled | Vetoed)
            | (Offered, Running | Vetoed | Failed | Cancelled)
            | (Running, Succeeded | Failed | Cancelled)
    )
}

/// The job store. Cheap operations on one SQLite connection behind a mutex; share it in an `Arc`.
#[derive(Debug)]
pub struct JobStore {
    conn: Mutex<Connection>,
}

impl JobStore {
    /// Opens (creating on first start) the SQLite database at `path`: WAL journal, foreign keys
    /// on, a busy timeout, and the schema of `schema.sql` applied if the database has none yet.
    /// A database with another schema version is refused ([`StoreError::UnsupportedSchema`]).
    pub fn open(path: &Path) -> Result<JobStore, StoreError> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // `journal_mode` answers with the mode in effect; WAL is a request, not a requirement
        // (some file systems cannot do it, and the store is correct without it).
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", true)?;

        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let has_version_table: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master \
             WHERE type = 'table' AND name = 'schema_version')",
            [],
            |row| row.get(0),
        )?;
        let mut migrated = false;
        let found: Option<i64> = if has_version_table {
            tx.query_row("SELECT MAX(version) FROM schema_version", [], |row| {
                row.get(0)
            })?
        } else {
            None
        };
        match found {
            None => {
                tx.execute_batch(SCHEMA)?;
                tx.execute(
                    "INSERT INTO schema_version (version) VALUES (?1)",
                    [SCHEMA_VERSION],
                )?;
            }
            Some(SCHEMA_VERSION) => {}
            // Versions 2 to 6 only added tables (schedules, schedule_runs; schedule_notify,
            // schedule_run_notified; job_leases; aggregate_results; aggregate_result_pages); the
            // schema script creates what is missing and leaves the rest untouched. Version 7
            // scrubs the parties' own row counts from what was stored before.
            Some(1..=6) => {
                tx.execute_batch(SCHEMA)?;
                scrub_party_figures(&tx)?;
                tx.execute(
                    "INSERT INTO schema_version (version) VALUES (?1)",
                    [SCHEMA_VERSION],
                )?;
                migrated = true;
            }
            Some(found) => {
                return Err(StoreError::UnsupportedSchema {
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
        }
        tx.commit()?;
        if migrated {
            // The scrubbed bytes must not linger in free pages.
            conn.execute_batch("VACUUM")?;
        }
        Ok(JobStore {
            conn: Mutex::new(conn),
        })
    }

    /// Submits a job: a new job in state pending with a fresh id, its first history row reading
    /// "submitted by analyst `submitted_by`".
    ///
    /// Idempotent: if `idempotency_key` is non-empty and `submitted_by` already used it, the
    /// answer is that job (`created: false`) when the spec is identical (compared as encoded
    /// bytes), and [`StoreError::IdempotencyConflict`] otherwise. Keys are scoped to the
    /// submitting analyst. An empty key always creates a new job.
    pub fn submit(
        &self,
        spec: &JobSpec,
        idempotency_key: &str,
        submitted_by: &str,
        now_ms: i64,
    ) -> Result<Submitted, StoreError> {
        self.submit_noted(spec, idempotency_key, submitted_by, "", now_ms)
    }

    /// [`JobStore::submit`], with `note` (e.g. "retry of job …", "schedule nightly") appended to
    /// the reason of the job's first history entry, so the job says where it came from.
    pub fn submit_noted(
        &self,
        spec: &JobSpec,
        idempotency_key: &str,
        submitted_by: &str,
        note: &str,
        now_ms: i64,
    ) -> Result<Submitted, StoreError> {
        let spec_bytes = spec.encode_to_vec();
        let key = (!idempotency_key.is_empty()).then_some(idempotency_key);

        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(key) = key {
            let existing: Option<(String, Vec<u8>)> = tx
                .query_row(
                    "SELECT job_id, spec FROM jobs \
                     WHERE submitted_by = ?1 AND idempotency_key = ?2",
                    params![submitted_by, key],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?;
            if let Some((job_id, stored)) = existing {
                return if stored == spec_bytes {
                    Ok(Submitted {
                        job_id,
                        created: false,
                    })
                } else {
                    Err(StoreError::IdempotencyConflict {
                        key: key.to_owned(),
                        job_id,
                    })
                };
            }
        }

        let job_id = loop {
            let candidate = new_job_id()?;
            let taken: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE job_id = ?1)",
                [&candidate],
                |row| row.get(0),
            )?;
            if !taken {
                break candidate;
            }
        };
        let reason = if note.is_empty() {
            format!("submitted by analyst {submitted_by}")
        } else {
            format!("submitted by analyst {submitted_by} ({note})")
        };
        let pending = JobState::Pending as i32;
        tx.execute(
            "INSERT INTO jobs (job_id, idempotency_key, submitted_by, spec, kind, state, reason, \
             created_ms, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
            params![
                job_id,
                key,
                submitted_by,
                spec_bytes,
                spec.kind,
                pending,
                reason,
                now_ms
            ],
        )?;
        tx.execute(
            "INSERT INTO job_history (job_id, state, at_ms, reason) VALUES (?1, ?2, ?3, ?4)",
            params![job_id, pending, now_ms, reason],
        )?;
        tx.commit()?;
        Ok(Submitted {
            job_id,
            created: true,
        })
    }

    /// Moves a job to `to`, recording `now_ms` and `reason` in its history, in one transaction.
    /// A move the state machine forbids ([`transition_allowed`]) is
    /// [`StoreError::IllegalTransition`] and changes nothing; an unknown job is
    /// [`StoreError::UnknownJob`].
    pub fn transition(
        &self,
        job_id: &str,
        to: JobState,
        reason: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let stored: Option<i32> = tx
            .query_row(
                "SELECT state FROM jobs WHERE job_id = ?1",
                [job_id],
                |row| row.get(0),
            )
            .optional()?;
        let Some(stored) = stored else {
            return Err(StoreError::UnknownJob(job_id.to_owned()));
        };
        let from = decode_state(job_id, stored)?;
        if !transition_allowed(from, to) {
            return Err(StoreError::IllegalTransition {
                job_id: job_id.to_owned(),
                from,
                to,
            });
        }
        tx.execute(
            "UPDATE jobs SET state = ?2, reason = ?3, updated_ms = ?4 WHERE job_id = ?1",
            params![job_id, to as i32, reason, now_ms],
        )?;
        tx.execute(
            "INSERT INTO job_history (job_id, state, at_ms, reason) VALUES (?1, ?2, ?3, ?4)",
            params![job_id, to as i32, now_ms, reason],
        )?;
        // A finished job needs no runner: its lease goes with the same commit.
        if is_terminal(to) {
            tx.execute("DELETE FROM job_leases WHERE job_id = ?1", [job_id])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Stores what `node` reported for a job, replacing an earlier report of the same node.
    /// The node must be one of the job's parties ([`StoreError::NotAParty`] otherwise).
    pub fn put_result(
        &self,
        job_id: &str,
        node: &str,
        outcome: &PsiOutcome,
    ) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let spec: Option<Vec<u8>> = tx
            .query_row("SELECT spec FROM jobs WHERE job_id = ?1", [job_id], |row| {
                row.get(0)
            })
            .optional()?;
        let Some(spec) = spec else {
            return Err(StoreError::UnknownJob(job_id.to_owned()));
        };
        let spec = decode_spec(job_id, &spec)?;
        if !spec.parties.iter().any(|party| party.node == node) {
            return Err(StoreError::NotAParty {
                job_id: job_id.to_owned(),
                node: node.to_owned(),
            });
        }
        tx.execute(
            "INSERT INTO job_results (job_id, node, outcome) VALUES (?1, ?2, ?3) \
             ON CONFLICT (job_id, node) DO UPDATE SET outcome = excluded.outcome",
            params![job_id, node, outcome.encode_to_vec()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The full view of a job for the analyst API: spec, state, reason of the last transition,
    /// created/updated times, submitter, results (by node name) and history (in order).
    /// `None` if no job has this id.
    pub fn get(&self, job_id: &str) -> Result<Option<JobInfo>, StoreError> {
        let mut conn = self.lock();
        // One read transaction: the job, its results and its history come from one snapshot.
        let tx = conn.transaction()?;
        let info = load_job(&tx, job_id)?;
        tx.commit()?;
        Ok(info)
    }

    /// The most recently created jobs, newest first, at most `limit` of them (and never more
    /// than [`MAX_LIST_LIMIT`]). A limit of 0 returns no jobs: choosing a default is the API's
    /// business.
    pub fn list(&self, limit: u32) -> Result<Vec<JobInfo>, StoreError> {
        let limit = limit.min(MAX_LIST_LIMIT);
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let ids = {
            let mut stmt =
                tx.prepare("SELECT job_id FROM jobs ORDER BY created_ms DESC, seq DESC LIMIT ?1")?;
            stmt.query_map([limit], |row| row.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?
        };
        let mut jobs = Vec::with_capacity(ids.len());
        for job_id in ids {
            // The job cannot vanish inside this read transaction; skip it if it somehow did.
            if let Some(info) = load_job(&tx, &job_id)? {
                jobs.push(info);
            }
        }
        tx.commit()?;
        Ok(jobs)
    }

    /// Ids of the jobs not yet in a terminal state (pending, offered or running), oldest first:
    /// at start-up the server fails them with a reason, so no job is left hanging or run twice.
    pub fn unfinished(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached("SELECT job_id FROM jobs WHERE state IN (?1, ?2, ?3) ORDER BY seq")?;
        let ids = stmt
            .query_map(
                params![
                    JobState::Pending as i32,
                    JobState::Offered as i32,
                    JobState::Running as i32
                ],
                |row| row.get(0),
            )?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(ids)
    }

    /// Remembers the last hello of a node: its data-plane address and when it was seen.
    pub fn record_node(&self, name: &str, data_addr: &str, now_ms: i64) -> Result<(), StoreError> {
        let conn = self.lock();
        conn.execute(
            "INSERT INTO nodes (name, data_addr, last_seen_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (name) DO UPDATE SET data_addr = excluded.data_addr, \
             last_seen_ms = excluded.last_seen_ms",
            params![name, data_addr, now_ms],
        )?;
        Ok(())
    }

    /// Records that `name` was seen at `now_ms` (when its connection ends); never moves the
    /// time back.
    pub fn node_seen(&self, name: &str, now_ms: i64) -> Result<(), StoreError> {
        let conn = self.lock();
        conn.execute(
            "UPDATE nodes SET last_seen_ms = MAX(last_seen_ms, ?2) WHERE name = ?1",
            params![name, now_ms],
        )?;
        Ok(())
    }

    /// Every node that ever said hello, by name.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare_cached("SELECT name, data_addr, last_seen_ms FROM nodes ORDER BY name")?;
        let nodes = stmt
            .query_map([], |row| {
                Ok(NodeRecord {
                    name: row.get(0)?,
                    data_addr: row.get(1)?,
                    last_seen_ms: row.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(nodes)
    }

    /// The connection. A panic while it was held leaves nothing half-done (an open transaction
    /// rolls back when dropped), so a poisoned lock is taken over rather than propagated.
    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Longest schedule name accepted.
pub const MAX_SCHEDULE_NAME: usize = 64;

/// Most retries a schedule may ask for.
pub const MAX_RETRIES_LIMIT: u32 = 20;

/// What an analyst asks for when adding a schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSchedule {
    /// Unique among live schedules: letters, digits, `.`, `_`, `-`; at most
    /// [`MAX_SCHEDULE_NAME`] bytes.
    pub name: String,
    /// Five-field cron expression (see [`crate::cron`]).
    pub cron: String,
    /// IANA time zone of the cron expression; empty means UTC.
    pub timezone: String,
    /// The job every run submits.
    pub spec: JobSpec,
    /// The analyst adding it; runs are submitted in that name.
    pub owner: String,
    /// How often a failed or vetoed run is retried (0: never), at most [`MAX_RETRIES_LIMIT`].
    pub max_retries: u32,
    /// Wait before retry `n` (1-based) is `backoff_base_secs × 2^(n-1)`; at least 1.
    pub backoff_base_secs: u32,
}

/// A stored schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleRecord {
    /// Row id; runs refer to it (a removed schedule's name may be reused, its id is not).
    pub id: i64,
    /// The schedule's name.
    pub name: String,
    /// Cron expression.
    pub cron: String,
    /// IANA time zone name (`UTC` if none was given).
    pub timezone: String,
    /// The job every run submits.
    pub spec: JobSpec,
    /// The analyst who added it.
    pub owner: String,
    /// Paused schedules neither fire nor retry.
    pub paused: bool,
    /// When it was added.
    pub created_ms: i64,
    /// The next occurrence not yet handled; `None` if the expression never fires again.
    pub next_run_ms: Option<i64>,
    /// The latest occurrence that was fired.
    pub last_fired_ms: Option<i64>,
    /// Retry policy: how many retries of a failed or vetoed run.
    pub max_retries: u32,
    /// Retry policy: base of the exponential backoff, seconds.
    pub backoff_base_secs: u32,
    /// When it was removed (`None` while live).
    pub removed_ms: Option<i64>,
}

/// What became of one (occurrence, attempt) of a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    /// A job was submitted; its state tells the rest.
    Submitted,
    /// The occurrence was missed while the coordinator was down and not run (catch-up rule).
    Skipped,
    /// The submission itself was refused (the note says why); not retried.
    NotSubmitted,
}

impl RunStatus {
    /// The name stored in the database (and shown in reports).
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Submitted => "submitted",
            RunStatus::Skipped => "skipped",
            RunStatus::NotSubmitted => "not-submitted",
        }
    }

    /// The status of a stored name.
    pub fn parse(name: &str) -> Option<RunStatus> {
        match name {
            "submitted" => Some(RunStatus::Submitted),
            "skipped" => Some(RunStatus::Skipped),
            "not-submitted" => Some(RunStatus::NotSubmitted),
            _ => None,
        }
    }
}

/// One run of a schedule, with the state of its job (for the planner and for reports).
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleRun {
    /// The schedule's name.
    pub schedule: String,
    /// The cron occurrence (or run-now time) this run is for.
    pub scheduled_for_ms: i64,
    /// 0 for the first attempt, then 1, 2, … for retries.
    pub attempt: u32,
    /// The job; `None` for a skipped occurrence.
    pub job_id: Option<String>,
    /// Whether a job was submitted, the occurrence skipped, or the submission refused.
    pub status: RunStatus,
    /// Why it was submitted or skipped ("cron", "retry 1 of 3", "run-now", "missed …").
    pub note: String,
    /// When the run was recorded.
    pub recorded_ms: i64,
    /// The job's state (`None` when skipped).
    pub job_state: Option<JobState>,
    /// The reason of the job's latest transition (empty when skipped).
    pub job_reason: String,
    /// When the job last changed state (its end time once terminal).
    pub job_updated_ms: Option<i64>,
    /// The released intersection size, if the parties reported one.
    pub intersection: Option<u64>,
}

/// Checks a schedule name: non-empty, short, letters, digits, `.`, `_` and `-` only (it appears
/// in idempotency keys and file names).
pub fn validate_schedule_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_SCHEDULE_NAME {
        return Err(format!(
            "schedule name must be 1 to {MAX_SCHEDULE_NAME} characters"
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "schedule name '{name}' may contain only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

const SCHEDULE_COLUMNS: &str = "id, name, cron, timezone, spec, owner, paused, created_ms, \
     next_run_ms, last_fired_ms, max_retries, backoff_base_secs, removed_ms";

impl JobStore {
    /// Adds a schedule. The name, the cron expression and time zone, the job spec
    /// ([`crate::spec::validate`]) and the retry policy are checked
    /// ([`StoreError::InvalidSchedule`]); a live schedule of the same name is
    /// [`StoreError::ScheduleExists`]. Its first occurrence is the first cron time after `now_ms`.
    pub fn add_schedule(
        &self,
        new: &NewSchedule,
        now_ms: i64,
    ) -> Result<ScheduleRecord, StoreError> {
        validate_schedule_name(&new.name).map_err(StoreError::InvalidSchedule)?;
        let cron = crate::cron::CronSchedule::parse(&new.cron, &new.timezone)
            .map_err(|err| StoreError::InvalidSchedule(err.to_string()))?;
        crate::spec::validate(&new.spec).map_err(StoreError::InvalidSchedule)?;
        if new.max_retries > MAX_RETRIES_LIMIT {
            return Err(StoreError::InvalidSchedule(format!(
                "at most {MAX_RETRIES_LIMIT} retries, not {}",
                new.max_retries
            )));
        }
        if new.backoff_base_secs == 0 {
            return Err(StoreError::InvalidSchedule(
                "the retry backoff must be at least 1 second".into(),
            ));
        }
        let next_run_ms = cron.next_after(now_ms);

        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM schedules WHERE name = ?1 AND removed_ms IS NULL)",
            [&new.name],
            |row| row.get(0),
        )?;
        if exists {
            return Err(StoreError::ScheduleExists(new.name.clone()));
        }
        tx.execute(
            "INSERT INTO schedules (name, cron, timezone, spec, owner, paused, created_ms, \
             next_run_ms, max_retries, backoff_base_secs) \
             VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7, ?8, ?9)",
            params![
                new.name,
                cron.expression(),
                cron.timezone(),
                new.spec.encode_to_vec(),
                new.owner,
                now_ms,
                next_run_ms,
                new.max_retries,
                new.backoff_base_secs
            ],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(ScheduleRecord {
            id,
            name: new.name.clone(),
            cron: cron.expression().to_owned(),
            timezone: cron.timezone().to_owned(),
            spec: new.spec.clone(),
            owner: new.owner.clone(),
            paused: false,
            created_ms: now_ms,
            next_run_ms,
            last_fired_ms: None,
            max_retries: new.max_retries,
            backoff_base_secs: new.backoff_base_secs,
            removed_ms: None,
        })
    }

    /// The live (not removed) schedules, by name, paused ones included.
    pub fn list_schedules(&self) -> Result<Vec<ScheduleRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE removed_ms IS NULL ORDER BY name"
        ))?;
        let rows = stmt
            .query_map([], schedule_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(decode_schedule).collect()
    }

    /// The live schedule named `name`, if any.
    pub fn get_schedule(&self, name: &str) -> Result<Option<ScheduleRecord>, StoreError> {
        let conn = self.lock();
        live_schedule(&conn, name)
    }

    /// The schedule whose history a report of `name` shows: the live one, else the most recently
    /// removed one of that name.
    pub fn schedule_for_report(&self, name: &str) -> Result<Option<ScheduleRecord>, StoreError> {
        let conn = self.lock();
        let row = conn
            .prepare_cached(&format!(
                "SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE name = ?1 \
                 ORDER BY removed_ms IS NULL DESC, id DESC LIMIT 1"
            ))?
            .query_row([name], schedule_row)
            .optional()?;
        row.map(decode_schedule).transpose()
    }

    /// Pauses a schedule: it neither fires nor retries until resumed. Pausing a paused schedule
    /// changes nothing.
    pub fn pause_schedule(&self, name: &str) -> Result<ScheduleRecord, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let changed = tx.execute(
            "UPDATE schedules SET paused = 1 WHERE name = ?1 AND removed_ms IS NULL",
            [name],
        )?;
        if changed == 0 {
            return Err(StoreError::UnknownSchedule(name.to_owned()));
        }
        let record = live_schedule(&tx, name)?;
        tx.commit()?;
        record.ok_or_else(|| StoreError::UnknownSchedule(name.to_owned()))
    }

    /// Resumes a paused schedule. Occurrences that fell in the pause are not run (pausing means
    /// "do not run"): the next occurrence is the first cron time after `now_ms`. Resuming a
    /// running schedule changes nothing.
    pub fn resume_schedule(&self, name: &str, now_ms: i64) -> Result<ScheduleRecord, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let Some(record) = live_schedule(&tx, name)? else {
            return Err(StoreError::UnknownSchedule(name.to_owned()));
        };
        if !record.paused {
            return Ok(record);
        }
        let cron =
            crate::cron::CronSchedule::parse(&record.cron, &record.timezone).map_err(|err| {
                StoreError::CorruptSchedule {
                    name: name.to_owned(),
                    reason: err.to_string(),
                }
            })?;
        let next_run_ms = cron.next_after(now_ms);
        tx.execute(
            "UPDATE schedules SET paused = 0, next_run_ms = ?2 WHERE id = ?1",
            params![record.id, next_run_ms],
        )?;
        tx.commit()?;
        Ok(ScheduleRecord {
            paused: false,
            next_run_ms,
            ..record
        })
    }

    /// Removes a schedule: it stops firing and its name becomes free, but the row and all its
    /// runs are kept, so the history (and its jobs) stay reportable
    /// ([`JobStore::schedule_for_report`]).
    pub fn remove_schedule(&self, name: &str, now_ms: i64) -> Result<(), StoreError> {
        let conn = self.lock();
        let changed = conn.execute(
            "UPDATE schedules SET removed_ms = ?2 WHERE name = ?1 AND removed_ms IS NULL",
            params![name, now_ms],
        )?;
        if changed == 0 {
            return Err(StoreError::UnknownSchedule(name.to_owned()));
        }
        Ok(())
    }

    /// Live, unpaused schedules whose next occurrence is at or before `now_ms`.
    pub fn due_schedules(&self, now_ms: i64) -> Result<Vec<ScheduleRecord>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE removed_ms IS NULL AND paused = 0 \
             AND next_run_ms IS NOT NULL AND next_run_ms <= ?1 ORDER BY name"
        ))?;
        let rows = stmt
            .query_map([now_ms], schedule_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(decode_schedule).collect()
    }

    /// Records that attempt `attempt` of the occurrence `scheduled_for_ms` of schedule `name` was
    /// submitted as job `job_id`. Returns `false` (and changes nothing) if that (occurrence,
    /// attempt) was already recorded: a run is recorded once, whatever happens.
    pub fn record_run(
        &self,
        name: &str,
        scheduled_for_ms: i64,
        attempt: u32,
        job_id: &str,
        note: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let conn = self.lock();
        let id = live_schedule_id(&conn, name)?;
        let inserted = conn.execute(
            "INSERT INTO schedule_runs (schedule_id, scheduled_for_ms, attempt, job_id, status, \
             note, recorded_ms) VALUES (?1, ?2, ?3, ?4, 'submitted', ?5, ?6) \
             ON CONFLICT (schedule_id, scheduled_for_ms, attempt) DO NOTHING",
            params![id, scheduled_for_ms, attempt, job_id, note, now_ms],
        )?;
        Ok(inserted == 1)
    }

    /// Records that the occurrence `scheduled_for_ms` was skipped (with why); `false` if the
    /// occurrence already has a first attempt recorded.
    pub fn record_skipped(
        &self,
        name: &str,
        scheduled_for_ms: i64,
        note: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.record_without_job(name, scheduled_for_ms, 0, RunStatus::Skipped, note, now_ms)
    }

    /// Records that attempt `attempt` of an occurrence could not be submitted at all (the
    /// submission itself was refused: `reason`); it is not retried. `false` if that attempt was
    /// already recorded.
    pub fn record_not_submitted(
        &self,
        name: &str,
        scheduled_for_ms: i64,
        attempt: u32,
        reason: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.record_without_job(
            name,
            scheduled_for_ms,
            attempt,
            RunStatus::NotSubmitted,
            reason,
            now_ms,
        )
    }

    fn record_without_job(
        &self,
        name: &str,
        scheduled_for_ms: i64,
        attempt: u32,
        status: RunStatus,
        note: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let conn = self.lock();
        let id = live_schedule_id(&conn, name)?;
        let inserted = conn.execute(
            "INSERT INTO schedule_runs (schedule_id, scheduled_for_ms, attempt, job_id, status, \
             note, recorded_ms) VALUES (?1, ?2, ?3, NULL, ?4, ?5, ?6) \
             ON CONFLICT (schedule_id, scheduled_for_ms, attempt) DO NOTHING",
            params![id, scheduled_for_ms, attempt, status.as_str(), note, now_ms],
        )?;
        Ok(inserted == 1)
    }

    /// Moves a schedule past the occurrences it handled: `next_run_ms` is its next occurrence
    /// (`None`: never again) and `fired_ms`, if given, the occurrence just fired.
    pub fn advance_schedule(
        &self,
        name: &str,
        next_run_ms: Option<i64>,
        fired_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        let conn = self.lock();
        let changed = conn.execute(
            "UPDATE schedules SET next_run_ms = ?2, \
             last_fired_ms = COALESCE(?3, last_fired_ms) \
             WHERE name = ?1 AND removed_ms IS NULL",
            params![name, next_run_ms, fired_ms],
        )?;
        if changed == 0 {
            return Err(StoreError::UnknownSchedule(name.to_owned()));
        }
        Ok(())
    }

    /// The runs of schedule `name` (the live one, else the latest removed one) scheduled at or
    /// after `since_ms`, oldest first (by occurrence, then attempt), each with its job's state,
    /// reason and released intersection.
    pub fn runs(&self, name: &str, since_ms: i64) -> Result<Vec<ScheduleRun>, StoreError> {
        let conn = self.lock();
        let id: Option<i64> = conn
            .query_row(
                "SELECT id FROM schedules WHERE name = ?1 \
                 ORDER BY removed_ms IS NULL DESC, id DESC LIMIT 1",
                [name],
                |row| row.get(0),
            )
            .optional()?;
        let Some(id) = id else {
            return Err(StoreError::UnknownSchedule(name.to_owned()));
        };
        load_runs(
            &conn,
            "r.schedule_id = ?1 AND r.scheduled_for_ms >= ?2",
            params![id, since_ms],
        )
    }

    /// For every live schedule, every recorded attempt of its latest recorded occurrence (what
    /// the planner needs to decide on retries).
    pub fn latest_runs(&self) -> Result<Vec<ScheduleRun>, StoreError> {
        let conn = self.lock();
        load_runs(
            &conn,
            "s.removed_ms IS NULL AND r.scheduled_for_ms = \
             (SELECT MAX(r2.scheduled_for_ms) FROM schedule_runs r2 \
              WHERE r2.schedule_id = r.schedule_id)",
            params![],
        )
    }
}

/// Where a schedule's ended runs are announced (empty: not at all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScheduleNotify {
    /// A command run by `sh -c` with the run's facts in `CLEANROOM_*` environment variables.
    pub on_done: String,
    /// A directory where the run's JSON is written, one file per run.
    pub notify_dir: String,
}

impl ScheduleNotify {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.on_done.is_empty() && self.notify_dir.is_empty()
    }
}

/// A scheduled run that has ended and whose end is not yet notified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedRun {
    /// The run's row id.
    pub run_id: i64,
    /// The schedule's name.
    pub schedule: String,
    /// The occurrence.
    pub scheduled_for_ms: i64,
    /// The attempt.
    pub attempt: u32,
    /// Why it was run.
    pub note: String,
    /// Its job.
    pub job_id: String,
    /// What to do.
    pub notify: ScheduleNotify,
}

impl JobStore {
    /// Sets the notifications of schedule `schedule_id` (empty strings: none).
    pub fn set_schedule_notify(
        &self,
        schedule_id: i64,
        notify: &ScheduleNotify,
    ) -> Result<(), StoreError> {
        let conn = self.lock();
        conn.execute(
            "INSERT INTO schedule_notify (schedule_id, on_done, notify_dir) VALUES (?1, ?2, ?3) \
             ON CONFLICT (schedule_id) DO UPDATE SET on_done = ?2, notify_dir = ?3",
            params![schedule_id, notify.on_done, notify.notify_dir],
        )?;
        Ok(())
    }

    /// The notifications of schedule `schedule_id` (empty if none).
    pub fn schedule_notify(&self, schedule_id: i64) -> Result<ScheduleNotify, StoreError> {
        let conn = self.lock();
        let found = conn
            .query_row(
                "SELECT on_done, notify_dir FROM schedule_notify WHERE schedule_id = ?1",
                [schedule_id],
                |row| {
                    Ok(ScheduleNotify {
                        on_done: row.get(0)?,
                        notify_dir: row.get(1)?,
                    })
                },
            )
            .optional()?;
        Ok(found.unwrap_or_default())
    }

    /// Runs of schedules with notifications whose job has ended (succeeded, failed or vetoed;
    /// not cancelled) and that are not yet marked notified, oldest first.
    pub fn ended_unnotified_runs(&self) -> Result<Vec<EndedRun>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT r.id, s.name, r.scheduled_for_ms, r.attempt, r.note, r.job_id, \
                    n.on_done, n.notify_dir \
             FROM schedule_runs r \
             JOIN schedules s ON s.id = r.schedule_id \
             JOIN schedule_notify n ON n.schedule_id = r.schedule_id \
             JOIN jobs j ON j.job_id = r.job_id \
             WHERE r.status = 'submitted' AND j.state IN (?1, ?2, ?3) \
               AND (n.on_done != '' OR n.notify_dir != '') \
               AND NOT EXISTS (SELECT 1 FROM schedule_run_notified d WHERE d.run_id = r.id) \
             ORDER BY r.id",
        )?;
        let rows = stmt
            .query_map(
                params![
                    JobState::Succeeded as i32,
                    JobState::Failed as i32,
                    JobState::Vetoed as i32
                ],
                |row| {
                    Ok(EndedRun {
                        run_id: row.get(0)?,
                        schedule: row.get(1)?,
                        scheduled_for_ms: row.get(2)?,
                        attempt: row.get(3)?,
                        note: row.get(4)?,
                        job_id: row.get(5)?,
                        notify: ScheduleNotify {
                            on_done: row.get(6)?,
                            notify_dir: row.get(7)?,
                        },
                    })
                },
            )?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Marks run `run_id` notified; false if it already was (someone else notifies it).
    pub fn mark_notified(&self, run_id: i64, now_ms: i64) -> Result<bool, StoreError> {
        let conn = self.lock();
        let changed = conn.execute(
            "INSERT OR IGNORE INTO schedule_run_notified (run_id, notified_ms) VALUES (?1, ?2)",
            params![run_id, now_ms],
        )?;
        Ok(changed > 0)
    }
}

type ScheduleRow = (
    i64,
    String,
    String,
    String,
    Vec<u8>,
    String,
    bool,
    i64,
    Option<i64>,
    Option<i64>,
    i64,
    i64,
    Option<i64>,
);

fn schedule_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ScheduleRow> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(7)?,
        row.get(8)?,
        row.get(9)?,
        row.get(10)?,
        row.get(11)?,
        row.get(12)?,
    ))
}

fn decode_schedule(row: ScheduleRow) -> Result<ScheduleRecord, StoreError> {
    let (
        id,
        name,
        cron,
        timezone,
        spec,
        owner,
        paused,
        created_ms,
        next_run_ms,
        last_fired_ms,
        max_retries,
        backoff_base_secs,
        removed_ms,
    ) = row;
    let corrupt = |reason: String| StoreError::CorruptSchedule {
        name: name.clone(),
        reason,
    };
    let spec = JobSpec::decode(spec.as_slice())
        .map_err(|err| corrupt(format!("job spec does not decode: {err}")))?;
    let max_retries = u32::try_from(max_retries)
        .map_err(|_| corrupt(format!("max_retries {max_retries} out of range")))?;
    let backoff_base_secs = u32::try_from(backoff_base_secs)
        .map_err(|_| corrupt(format!("backoff {backoff_base_secs} out of range")))?;
    Ok(ScheduleRecord {
        id,
        name,
        cron,
        timezone,
        spec,
        owner,
        paused,
        created_ms,
        next_run_ms,
        last_fired_ms,
        max_retries,
        backoff_base_secs,
        removed_ms,
    })
}

fn live_schedule(conn: &Connection, name: &str) -> Result<Option<ScheduleRecord>, StoreError> {
    let row = conn
        .prepare_cached(&format!(
            "SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE name = ?1 AND removed_ms IS NULL"
        ))?
        .query_row([name], schedule_row)
        .optional()?;
    row.map(decode_schedule).transpose()
}

fn live_schedule_id(conn: &Connection, name: &str) -> Result<i64, StoreError> {
    conn.query_row(
        "SELECT id FROM schedules WHERE name = ?1 AND removed_ms IS NULL",
        [name],
        |row| row.get(0),
    )
    .optional()?
    .ok_or_else(|| StoreError::UnknownSchedule(name.to_owned()))
}

/// Runs matching `filter` (over `schedule_runs r` joined with `schedules s`), with their jobs.
fn load_runs(
    conn: &Connection,
    filter: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<Vec<ScheduleRun>, StoreError> {
    type RunRow = (
        String,
        i64,
        i64,
        Option<String>,
        String,
        String,
        i64,
        Option<i32>,
        Option<String>,
        Option<i64>,
    );
    let rows: Vec<RunRow> = {
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT s.name, r.scheduled_for_ms, r.attempt, r.job_id, r.status, r.note, \
             r.recorded_ms, j.state, j.reason, j.updated_ms \
             FROM schedule_runs r JOIN schedules s ON s.id = r.schedule_id \
             LEFT JOIN jobs j ON j.job_id = r.job_id \
             WHERE {filter} ORDER BY s.name, r.scheduled_for_ms, r.attempt"
        ))?;
        stmt.query_map(params, |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
                row.get(6)?,
                row.get(7)?,
                row.get(8)?,
                row.get(9)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?
    };
    let mut runs = Vec::with_capacity(rows.len());
    let mut results = conn
        .prepare_cached("SELECT node, outcome FROM job_results WHERE job_id = ?1 ORDER BY node")?;
    for (
        schedule,
        scheduled_for_ms,
        attempt,
        job_id,
        status,
        note,
        recorded_ms,
        state,
        reason,
        updated_ms,
    ) in rows
    {
        let attempt = u32::try_from(attempt).map_err(|_| StoreError::CorruptSchedule {
            name: schedule.clone(),
            reason: format!("attempt number {attempt} out of range"),
        })?;
        let run_status = RunStatus::parse(&status).ok_or_else(|| StoreError::CorruptSchedule {
            name: schedule.clone(),
            reason: format!("run status '{status}' is unknown"),
        })?;
        let job_state = match (&job_id, state) {
            (Some(job_id), Some(state)) => Some(decode_state(job_id, state)?),
            _ => None,
        };
        let mut intersection = None;
        if let Some(job_id) = &job_id {
            let mut rows = results.query([job_id])?;
            while let Some(row) = rows.next()? {
                let node: String = row.get(0)?;
                let bytes: Vec<u8> = row.get(1)?;
                let outcome =
                    PsiOutcome::decode(bytes.as_slice()).map_err(|err| StoreError::Corrupt {
                        job_id: job_id.clone(),
                        reason: format!("result of node '{node}' does not decode: {err}"),
                    })?;
                if releases_nothing(&outcome) {
                    continue;
                }
                intersection = Some(outcome.intersection);
                break;
            }
        }
        runs.push(ScheduleRun {
            schedule,
            scheduled_for_ms,
            attempt,
            job_id,
            status: run_status,
            note,
            recorded_ms,
            job_state,
            job_reason: reason.unwrap_or_default(),
            job_updated_ms: updated_ms,
            intersection,
        });
    }
    Ok(runs)
}

/// A fresh job id: `job-` and 16 lowercase hex digits from the operating system's RNG.
fn new_job_id() -> Result<String, StoreError> {
    let mut bytes = [0u8; 8];
    rand::rngs::SysRng
        .try_fill_bytes(&mut bytes)
        .map_err(|err| StoreError::Randomness(err.to_string()))?;
    let mut id = String::with_capacity(4 + 16);
    id.push_str("job-");
    for byte in bytes {
        id.push_str(&format!("{byte:02x}"));
    }
    Ok(id)
}

/// A state number read from the database, which must name a real state.
fn decode_state(job_id: &str, stored: i32) -> Result<JobState, StoreError> {
    match JobState::try_from(stored) {
        Ok(JobState::Unspecified) | Err(_) => Err(StoreError::Corrupt {
            job_id: job_id.to_owned(),
            reason: format!("state number {stored} is not a job state"),
        }),
        Ok(state) => Ok(state),
    }
}

fn decode_spec(job_id: &str, bytes: &[u8]) -> Result<JobSpec, StoreError> {
    JobSpec::decode(bytes).map_err(|err| StoreError::Corrupt {
        job_id: job_id.to_owned(),
        reason: format!("job spec does not decode: {err}"),
    })
}

/// Builds the analyst view of one job from the rows of `conn` (`None` if the job is unknown).
fn load_job(conn: &Connection, job_id: &str) -> Result<Option<JobInfo>, StoreError> {
    type JobRow = (Vec<u8>, i32, String, i64, i64, String);
    let row: Option<JobRow> = conn
        .prepare_cached(
            "SELECT spec, state, reason, created_ms, updated_ms, submitted_by \
             FROM jobs WHERE job_id = ?1",
        )?
        .query_row([job_id], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
            ))
        })
        .optional()?;
    let Some((spec, state, reason, created_ms, updated_ms, submitted_by)) = row else {
        return Ok(None);
    };
    let spec = decode_spec(job_id, &spec)?;
    let state = decode_state(job_id, state)?;

    let mut results = Vec::new();
    {
        let mut stmt = conn.prepare_cached(
            "SELECT node, outcome FROM job_results WHERE job_id = ?1 ORDER BY node",
        )?;
        let mut rows = stmt.query([job_id])?;
        while let Some(row) = rows.next()? {
            let node: String = row.get(0)?;
            let bytes: Vec<u8> = row.get(1)?;
            let outcome =
                PsiOutcome::decode(bytes.as_slice()).map_err(|err| StoreError::Corrupt {
                    job_id: job_id.to_owned(),
                    reason: format!("result of node '{node}' does not decode: {err}"),
                })?;
            results.push(PartyResult {
                node,
                outcome: Some(outcome),
            });
        }
    }

    let mut history = Vec::new();
    {
        let mut stmt = conn.prepare_cached(
            "SELECT state, at_ms, reason FROM job_history WHERE job_id = ?1 ORDER BY id",
        )?;
        let mut rows = stmt.query([job_id])?;
        while let Some(row) = rows.next()? {
            let state = decode_state(job_id, row.get(0)?)?;
            history.push(StateChange {
                state: state as i32,
                at_ms: row.get(1)?,
                reason: row.get(2)?,
            });
        }
    }

    Ok(Some(JobInfo {
        job_id: job_id.to_owned(),
        spec: Some(spec),
        state: state as i32,
        reason,
        created_ms,
        updated_ms,
        submitted_by,
        results,
        history,
        aggregate: None,
    }))
}

// ---------------------------------------------------------------- aggregate results
//
// One row per succeeded aggregate job in `aggregate_results` (schema version 5): the
// reconstructed, noised, thresholded result (prost-encoded `AggregateResult`). A result whose
// encoding exceeds [`MAX_INLINE_RESULT_BYTES`] keeps its groups apart, in
// `aggregate_result_pages` (version 6), [`STORE_PAGE_GROUPS`] to a row, so that GetJob stays
// under the frame cap and a page is read without decoding the whole result. Partials are never
// stored.

/// Largest encoded result stored with its groups in one row (and so answered whole by GetJob):
/// 768 KiB, which leaves room in the 1 MiB frame for the spec (a label spec is at most ~170 KiB),
/// the history and the rest of `JobInfo`.
pub const MAX_INLINE_RESULT_BYTES: usize = 768 * 1024;

/// Groups per stored page row of a large result.
pub const STORE_PAGE_GROUPS: usize = 4096;

/// Most groups one GetAggregatePage answer carries.
pub const MAX_PAGE_GROUPS: usize = 16_384;

/// Most encoded bytes of groups in one GetAggregatePage answer: well under the 1 MiB frame cap
/// whatever the labels (a group is at most ~170 bytes: a 64-byte label and 9 values).
pub const MAX_PAGE_BYTES: usize = 896 * 1024;

impl JobStore {
    /// Stores the result of an aggregate job (replacing an earlier one for the same job), in one
    /// transaction: whole if its encoding fits [`MAX_INLINE_RESULT_BYTES`], otherwise its groups
    /// in pages. Either way `total_groups` is set.
    pub fn put_aggregate_result(
        &self,
        job_id: &str,
        result: cleanroom_proto::v1::AggregateResult,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut meta = result;
        let groups = std::mem::take(&mut meta.groups);
        self.put_aggregate_result_streamed(job_id, meta, groups.into_iter(), now_ms)
    }

    /// [`JobStore::put_aggregate_result`] with the groups given one at a time: they are held
    /// only until their encoding passes [`MAX_INLINE_RESULT_BYTES`], then written in pages of
    /// [`STORE_PAGE_GROUPS`] as they come, so a result of 10^6 groups is never whole in memory.
    /// `meta`'s own groups and `total_groups` are replaced.
    pub fn put_aggregate_result_streamed(
        &self,
        job_id: &str,
        mut meta: cleanroom_proto::v1::AggregateResult,
        groups: impl Iterator<Item = cleanroom_proto::v1::AggregateGroup>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        use cleanroom_proto::v1::{AggregateGroup, AggregatePage};
        meta.groups.clear();
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE job_id = ?1)",
            [job_id],
            |row| row.get(0),
        )?;
        if !exists {
            return Err(StoreError::UnknownJob(job_id.to_owned()));
        }
        tx.execute(
            "DELETE FROM aggregate_result_pages WHERE job_id = ?1",
            [job_id],
        )?;
        // The row first (the pages reference it), completed below.
        let upsert = "INSERT INTO aggregate_results (job_id, result, stored_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (job_id) DO UPDATE SET result = excluded.result, \
             stored_ms = excluded.stored_ms";
        tx.execute(upsert, params![job_id, meta.encode_to_vec(), now_ms])?;
        // The encoding of the whole result as far as known: the rest, `total_groups` (at most
        // 11 bytes) and the groups so far (each a length-delimited field).
        let mut inline_len = meta.encoded_len() + 11;
        let mut held: Vec<AggregateGroup> = Vec::new();
        let mut paged = false;
        let mut total = 0u64;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO aggregate_result_pages (job_id, first_group, page) VALUES (?1, ?2, ?3)",
            )?;
            let mut first = 0u64;
            // Writes `page` as the stored page starting at group `first` (the total lives in
            // the `aggregate_results` row, not in the pages).
            let mut write = |page: Vec<AggregateGroup>| -> Result<(), StoreError> {
                let page = AggregatePage {
                    offset: first,
                    total_groups: 0,
                    groups: page,
                };
                insert.execute(params![
                    job_id,
                    i64::try_from(first).unwrap_or(i64::MAX),
                    page.encode_to_vec()
                ])?;
                first += page.groups.len() as u64;
                Ok(())
            };
            for g in groups {
                total += 1;
                if !paged {
                    let len = g.encoded_len();
                    inline_len += 1 + prost::encoding::encoded_len_varint(len as u64) + len;
                    held.push(g);
                    if inline_len > MAX_INLINE_RESULT_BYTES {
                        // Too large to answer whole: what is held goes to full pages, the
                        // rest waits for the next groups.
                        paged = true;
                        let mut rest = std::mem::take(&mut held);
                        while rest.len() >= STORE_PAGE_GROUPS {
                            let tail = rest.split_off(STORE_PAGE_GROUPS);
                            write(std::mem::replace(&mut rest, tail))?;
                        }
                        held = rest;
                    }
                } else {
                    held.push(g);
                    if held.len() == STORE_PAGE_GROUPS {
                        write(std::mem::take(&mut held))?;
                    }
                }
            }
            if paged && !held.is_empty() {
                write(std::mem::take(&mut held))?;
            }
        }
        meta.total_groups = total;
        if !paged {
            meta.groups = held;
        }
        tx.execute(upsert, params![job_id, meta.encode_to_vec(), now_ms])?;
        tx.commit()?;
        Ok(())
    }

    /// The stored result of an aggregate job, if any: whole when it fits one frame, otherwise
    /// without its groups (`total_groups` says how many to read with
    /// [`JobStore::get_aggregate_page`]).
    pub fn get_aggregate_result(
        &self,
        job_id: &str,
    ) -> Result<Option<cleanroom_proto::v1::AggregateResult>, StoreError> {
        let conn = self.lock();
        let blob: Option<Vec<u8>> = conn
            .query_row(
                "SELECT result FROM aggregate_results WHERE job_id = ?1",
                [job_id],
                |row| row.get(0),
            )
            .optional()?;
        let Some(blob) = blob else {
            return Ok(None);
        };
        let mut result = cleanroom_proto::v1::AggregateResult::decode(blob.as_slice())
            .map_err(|e| corrupt(job_id, format!("aggregate result: {e}")))?;
        // Results stored before `total_groups` existed hold all their groups.
        if result.total_groups == 0 {
            result.total_groups = result.groups.len() as u64;
        }
        Ok(Some(result))
    }

    /// Groups `offset`, `offset + 1`, … of an aggregate result: at most `limit` (0 or more than
    /// [`MAX_PAGE_GROUPS`]: that cap), and fewer if their encoding would pass
    /// [`MAX_PAGE_BYTES`] (always at least one while any remain). Past the end: no groups.
    /// `None` if the job has no stored result.
    pub fn get_aggregate_page(
        &self,
        job_id: &str,
        offset: u64,
        limit: u32,
    ) -> Result<Option<cleanroom_proto::v1::AggregatePage>, StoreError> {
        let Some(meta) = self.get_aggregate_result(job_id)? else {
            return Ok(None);
        };
        let total = meta.total_groups;
        let limit = match limit as usize {
            0 => MAX_PAGE_GROUPS,
            l => l.min(MAX_PAGE_GROUPS),
        };
        let end = total.min(offset.saturating_add(limit as u64));
        let mut page = cleanroom_proto::v1::AggregatePage {
            offset,
            total_groups: total,
            groups: Vec::new(),
        };
        if offset >= end {
            return Ok(Some(page));
        }
        let mut bytes = 0usize;
        let mut take = |page: &mut cleanroom_proto::v1::AggregatePage,
                        g: cleanroom_proto::v1::AggregateGroup|
         -> bool {
            // Field tag and length prefix of a repeated message: at most 1 + 10 bytes.
            let len = g.encoded_len() + 11;
            if !page.groups.is_empty() && bytes + len > MAX_PAGE_BYTES {
                return false;
            }
            bytes += len;
            page.groups.push(g);
            true
        };
        if !meta.groups.is_empty() || total == 0 {
            for g in meta
                .groups
                .into_iter()
                .skip(usize::try_from(offset).unwrap_or(usize::MAX))
                .take((end - offset) as usize)
            {
                if !take(&mut page, g) {
                    break;
                }
            }
            return Ok(Some(page));
        }
        let first_row = offset - offset % STORE_PAGE_GROUPS as u64;
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT first_group, page FROM aggregate_result_pages \
             WHERE job_id = ?1 AND first_group >= ?2 AND first_group < ?3 ORDER BY first_group",
        )?;
        let mut rows = stmt.query(params![
            job_id,
            i64::try_from(first_row).unwrap_or(i64::MAX),
            i64::try_from(end).unwrap_or(i64::MAX)
        ])?;
        let mut next = offset;
        'rows: while let Some(row) = rows.next()? {
            let first: i64 = row.get(0)?;
            let blob: Vec<u8> = row.get(1)?;
            let stored = cleanroom_proto::v1::AggregatePage::decode(blob.as_slice())
                .map_err(|e| corrupt(job_id, format!("aggregate page {first}: {e}")))?;
            let first = u64::try_from(first).map_err(|_| corrupt(job_id, "negative page"))?;
            if first > next {
                return Err(corrupt(job_id, format!("aggregate page {next} is missing")));
            }
            for g in stored
                .groups
                .into_iter()
                .skip((next - first) as usize)
                .take((end - next) as usize)
            {
                if !take(&mut page, g) {
                    break 'rows;
                }
                next += 1;
            }
        }
        if page.groups.is_empty() {
            return Err(corrupt(
                job_id,
                format!("aggregate page {offset} is missing"),
            ));
        }
        Ok(Some(page))
    }
}

fn corrupt(job_id: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        job_id: job_id.to_owned(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod aggregate_result_tests {
    use super::*;
    use cleanroom_proto::v1::{AggregateGroup, AggregateResult, JobKind, PartySpec};

    #[test]
    fn aggregate_results_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let store = JobStore::open(&path).unwrap();
        let spec = JobSpec {
            kind: JobKind::Aggregate as i32,
            parties: ["a", "b", "c"]
                .iter()
                .map(|n| PartySpec {
                    node: (*n).into(),
                    dataset: "d".into(),
                    ..PartySpec::default()
                })
                .collect(),
            purpose: "p".into(),
            aggregate: None,
            overlap_sum: None,
        };
        let job = store.submit(&spec, "", "alice", 1).unwrap();
        assert_eq!(store.get_aggregate_result(&job.job_id).unwrap(), None);
        let result = AggregateResult {
            columns: vec!["count".into(), "amount".into()],
            groups: vec![AggregateGroup {
                label: "x".into(),
                suppressed: false,
                values: vec![12, -3],
            }],
            min_result: 5,
            ..AggregateResult::default()
        };
        store
            .put_aggregate_result(&job.job_id, result.clone(), 2)
            .unwrap();
        assert!(matches!(
            store.put_aggregate_result("job-nope", result.clone(), 2),
            Err(StoreError::UnknownJob(_))
        ));
        drop(store);
        let store = JobStore::open(&path).unwrap();
        // Stored whole (it fits one frame), with the number of its groups.
        assert_eq!(
            store.get_aggregate_result(&job.job_id).unwrap(),
            Some(AggregateResult {
                total_groups: 1,
                ..result
            })
        );
    }
}

#[cfg(test)]
mod aggregate_page_tests {
    use super::*;
    use cleanroom_proto::frame::MAX_FRAME_LEN;
    use cleanroom_proto::v1::{
        AggregateGroup, AggregatePage, AggregateResult, AnalystResponse, Envelope, JobKind,
        PartySpec, analyst_response::Response, envelope::Body,
    };

    fn store_with_job() -> (tempfile::TempDir, JobStore, String) {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(&dir.path().join("jobs.db")).unwrap();
        let spec = JobSpec {
            kind: JobKind::Aggregate as i32,
            parties: ["a", "b", "c"]
                .iter()
                .map(|n| PartySpec {
                    node: (*n).into(),
                    dataset: "d".into(),
                    ..PartySpec::default()
                })
                .collect(),
            purpose: "p".into(),
            aggregate: None,
            overlap_sum: None,
        };
        let job = store.submit(&spec, "", "alice", 1).unwrap();
        (dir, store, job.job_id)
    }

    fn result(groups: usize, label: impl Fn(usize) -> String, columns: usize) -> AggregateResult {
        AggregateResult {
            columns: (0..columns).map(|c| format!("c{c}")).collect(),
            groups: (0..groups)
                .map(|i| AggregateGroup {
                    label: label(i),
                    suppressed: i % 7 == 3,
                    values: if i % 7 == 3 {
                        vec![]
                    } else {
                        (0..columns as i64)
                            .map(|c| -(i as i64) * 1_000_003 - c)
                            .collect()
                    },
                })
                .collect(),
            min_result: 5,
            ..AggregateResult::default()
        }
    }

    /// The page as the coordinator frames it: must fit the frame cap.
    fn framed_len(page: &AggregatePage) -> usize {
        Envelope {
            job_id: "j".repeat(40),
            phase: 20,
            body: Some(Body::AnalystResponse(AnalystResponse {
                response: Some(Response::AggregatePage(page.clone())),
            })),
        }
        .encoded_len()
    }

    fn read_all(store: &JobStore, job: &str, limit: u32) -> (Vec<AggregateGroup>, usize) {
        let (mut all, mut pages) = (Vec::new(), 0);
        loop {
            let page = store
                .get_aggregate_page(job, all.len() as u64, limit)
                .unwrap()
                .unwrap();
            assert_eq!(page.offset, all.len() as u64);
            assert!(framed_len(&page) < MAX_FRAME_LEN);
            if page.groups.is_empty() {
                return (all, pages);
            }
            pages += 1;
            all.extend(page.groups);
        }
    }

    #[test]
    fn small_results_are_inline_and_paged_from_the_row() {
        let (_dir, store, job) = store_with_job();
        assert_eq!(store.get_aggregate_page(&job, 0, 0).unwrap(), None);
        let r = result(10, |i| format!("g{i}"), 2);
        store.put_aggregate_result(&job, r.clone(), 2).unwrap();
        let got = store.get_aggregate_result(&job).unwrap().unwrap();
        assert_eq!(got.groups, r.groups);
        assert_eq!(got.total_groups, 10);
        let p = store.get_aggregate_page(&job, 8, 5).unwrap().unwrap();
        assert_eq!((p.offset, p.total_groups), (8, 10));
        assert_eq!(p.groups, r.groups[8..]);
        let p = store.get_aggregate_page(&job, 10, 5).unwrap().unwrap();
        assert!(p.groups.is_empty());
        let p = store
            .get_aggregate_page(&job, u64::MAX, 5)
            .unwrap()
            .unwrap();
        assert!(p.groups.is_empty());
        assert_eq!(read_all(&store, &job, 3), (r.groups.clone(), 4));
    }

    #[test]
    fn large_results_are_stored_and_read_in_pages() {
        let (dir, store, job) = store_with_job();
        // 10^5 integer groups and "(other)", two columns: ~2.5 MB, paged.
        let n = 100_001;
        let r = result(
            n,
            |i| {
                if i + 1 == n {
                    "(other)".into()
                } else {
                    i.to_string()
                }
            },
            2,
        );
        store.put_aggregate_result(&job, r.clone(), 2).unwrap();
        let meta = store.get_aggregate_result(&job).unwrap().unwrap();
        assert!(
            meta.groups.is_empty(),
            "GetJob carries no groups of a paged result"
        );
        assert_eq!(meta.total_groups, n as u64);
        assert_eq!(meta.columns, r.columns);
        // Default and oversized limits are capped.
        let p = store.get_aggregate_page(&job, 0, 0).unwrap().unwrap();
        assert_eq!(p.groups.len(), MAX_PAGE_GROUPS);
        let p = store
            .get_aggregate_page(&job, 0, u32::MAX)
            .unwrap()
            .unwrap();
        assert_eq!(p.groups.len(), MAX_PAGE_GROUPS);
        // A page across a stored row's boundary.
        let from = STORE_PAGE_GROUPS as u64 - 3;
        let p = store.get_aggregate_page(&job, from, 10).unwrap().unwrap();
        assert_eq!(p.groups, r.groups[from as usize..from as usize + 10]);
        // Exactly at a boundary, and the last page (shorter than asked).
        let at = 2 * STORE_PAGE_GROUPS as u64;
        let p = store.get_aggregate_page(&job, at, 1).unwrap().unwrap();
        assert_eq!(p.groups, r.groups[at as usize..at as usize + 1]);
        let p = store
            .get_aggregate_page(&job, n as u64 - 4, 100)
            .unwrap()
            .unwrap();
        assert_eq!(p.groups, r.groups[n - 4..]);
        assert_eq!(p.groups.last().unwrap().label, "(other)");
        // Past the end: nothing.
        let p = store
            .get_aggregate_page(&job, n as u64, 100)
            .unwrap()
            .unwrap();
        assert!(p.groups.is_empty());
        assert_eq!(p.total_groups, n as u64);
        // Everything, in order, survives a reopen.
        drop(store);
        let store = JobStore::open(&dir.path().join("jobs.db")).unwrap();
        let (all, pages) = read_all(&store, &job, 0);
        assert_eq!(pages, n.div_ceil(MAX_PAGE_GROUPS));
        assert_eq!(all, r.groups);
        // Replacing the result replaces its pages.
        let small = result(3, |i| format!("x{i}"), 1);
        store.put_aggregate_result(&job, small.clone(), 3).unwrap();
        assert_eq!(read_all(&store, &job, 0).0, small.groups);
    }

    #[test]
    fn pages_stay_under_the_frame_cap_whatever_the_labels() {
        let (_dir, store, job) = store_with_job();
        // 64-byte labels and 9 large negative values: ~170 bytes a group.
        let n = 20_000;
        let r = result(n, |i| format!("{i:0>64}"), 9);
        store.put_aggregate_result(&job, r.clone(), 2).unwrap();
        let p = store.get_aggregate_page(&job, 0, 0).unwrap().unwrap();
        assert!(p.groups.len() < MAX_PAGE_GROUPS, "cut by bytes");
        assert!(!p.groups.is_empty());
        assert!(framed_len(&p) < MAX_FRAME_LEN);
        assert_eq!(read_all(&store, &job, 0).0, r.groups);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use cleanroom_proto::v1::{JobKind, PartySpec};
    use tempfile::TempDir;

    use super::*;

    pub(super) fn spec(purpose: &str) -> JobSpec {
        JobSpec {
            kind: JobKind::Overlap as i32,
            parties: vec![
                PartySpec {
                    node: "acme".into(),
                    dataset: "customers".into(),
                    keys: vec!["email".into()],
                    learns_membership: false,
                },
                PartySpec {
                    node: "globex".into(),
                    dataset: "subscribers".into(),
                    keys: vec!["email".into()],
                    learns_membership: false,
                },
            ],
            purpose: purpose.into(),
            aggregate: None,
            overlap_sum: None,
        }
    }

    fn outcome(intersection: u64) -> PsiOutcome {
        PsiOutcome {
            intersection,
            own_set_size: 1000,
            peer_set_size: 2000,
            learned_membership: false,
            matched_rows: 0,
            membership_file: String::new(),
            ..PsiOutcome::default()
        }
    }

    pub(super) fn open_temp() -> (TempDir, JobStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(&dir.path().join("jobs.sqlite")).unwrap();
        (dir, store)
    }

    fn state_of(store: &JobStore, job_id: &str) -> JobState {
        let info = store.get(job_id).unwrap().unwrap();
        JobState::try_from(info.state).unwrap()
    }

    /// Runs raw SQL on the store's connection, as a disk fault or a careless operator would.
    fn tamper(store: &JobStore, sql: &str, job_id: &str) {
        store.lock().execute(sql, [job_id]).unwrap();
    }

    #[test]
    fn creates_on_first_open_and_reopen_keeps_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.sqlite");
        assert!(!path.exists());
        let job_id = {
            let store = JobStore::open(&path).unwrap();
            let journal: String = store
                .lock()
                .query_row("PRAGMA journal_mode", [], |row| row.get(0))
                .unwrap();
            assert_eq!(journal, "wal");
            let foreign_keys: bool = store
                .lock()
                .query_row("PRAGMA foreign_keys", [], |row| row.get(0))
                .unwrap();
            assert!(foreign_keys);
            let job = store.submit(&spec("q3"), "", "alice", 1_000).unwrap();
            store
                .transition(
                    &job.job_id,
                    JobState::Offered,
                    "offered to acme and globex",
                    1_001,
                )
                .unwrap();
            store.record_node("acme", "10.0.0.1:7000", 900).unwrap();
            job.job_id
        };
        assert!(path.exists());

        let store = JobStore::open(&path).unwrap();
        let info = store.get(&job_id).unwrap().unwrap();
        assert_eq!(info.spec, Some(spec("q3")));
        assert_eq!(info.state, JobState::Offered as i32);
        assert_eq!(info.history.len(), 2);
        assert_eq!(store.nodes().unwrap().len(), 1);
        let versions: Vec<i64> = store
            .lock()
            .prepare("SELECT version FROM schema_version")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(versions, vec![SCHEMA_VERSION]);
    }

    #[test]
    fn newer_schema_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.sqlite");
        drop(JobStore::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .execute(
                "UPDATE schema_version SET version = ?1",
                [SCHEMA_VERSION + 1],
            )
            .unwrap();
        let err = JobStore::open(&path).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::UnsupportedSchema { found, supported }
                    if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION
            ),
            "{err:?}"
        );
    }

    #[test]
    fn submit_creates_pending_job_with_fresh_id() {
        let (_dir, store) = open_temp();
        let job = store.submit(&spec("q3"), "", "alice", 1_000).unwrap();
        assert!(job.created);
        let hex = job.job_id.strip_prefix("job-").unwrap();
        assert_eq!(hex.len(), 16);
        assert!(
            hex.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        );

        let info = store.get(&job.job_id).unwrap().unwrap();
        assert_eq!(info.job_id, job.job_id);
        assert_eq!(info.state, JobState::Pending as i32);
        assert_eq!(info.reason, "submitted by analyst alice");
        assert_eq!(info.submitted_by, "alice");
        assert_eq!((info.created_ms, info.updated_ms), (1_000, 1_000));
        assert!(info.results.is_empty());
        assert_eq!(
            info.history,
            vec![StateChange {
                state: JobState::Pending as i32,
                at_ms: 1_000,
                reason: "submitted by analyst alice".into(),
            }]
        );
        assert_eq!(store.get("job-0000000000000000").unwrap(), None);
    }

    #[test]
    fn idempotent_submit() {
        let (_dir, store) = open_temp();
        let first = store
            .submit(&spec("q3"), "nightly-1", "alice", 1_000)
            .unwrap();
        assert!(first.created);

        // Same key, same spec: the same job, not a new one.
        let again = store
            .submit(&spec("q3"), "nightly-1", "alice", 2_000)
            .unwrap();
        assert_eq!(
            again,
            Submitted {
                job_id: first.job_id.clone(),
                created: false
            }
        );

        // Same key, other spec: refused, naming the key and the job.
        let err = store
            .submit(&spec("q4"), "nightly-1", "alice", 3_000)
            .unwrap_err();
        match &err {
            StoreError::IdempotencyConflict { key, job_id } => {
                assert_eq!(key, "nightly-1");
                assert_eq!(job_id, &first.job_id);
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            format!(
                "idempotency key 'nightly-1' was already used for job {} with a different spec; \
                 use a new key",
                first.job_id
            )
        );

        // Empty key: always a new job.
        let a = store.submit(&spec("q3"), "", "alice", 4_000).unwrap();
        let b = store.submit(&spec("q3"), "", "alice", 4_000).unwrap();
        assert!(a.created && b.created);
        assert_ne!(a.job_id, b.job_id);
        assert_ne!(a.job_id, first.job_id);

        // Keys are scoped to the analyst: bob's "nightly-1" is his own.
        let bob = store
            .submit(&spec("q4"), "nightly-1", "bob", 5_000)
            .unwrap();
        assert!(bob.created);
        assert_ne!(bob.job_id, first.job_id);

        assert_eq!(store.list(100).unwrap().len(), 4);
        // The replayed submission did not touch the original job.
        let info = store.get(&first.job_id).unwrap().unwrap();
        assert_eq!(info.created_ms, 1_000);
        assert_eq!(info.history.len(), 1);
    }

    #[test]
    fn legal_transitions_follow_the_state_machine() {
        let (_dir, store) = open_temp();
        let paths: &[&[JobState]] = &[
            &[JobState::Offered, JobState::Running, JobState::Succeeded],
            &[JobState::Offered, JobState::Running, JobState::Failed],
            &[JobState::Offered, JobState::Running, JobState::Cancelled],
            &[JobState::Offered, JobState::Vetoed],
            &[JobState::Offered, JobState::Failed],
            &[JobState::Offered, JobState::Cancelled],
            &[JobState::Failed],
            &[JobState::Cancelled],
            &[JobState::Vetoed],
        ];
        for path in paths {
            let job = store.submit(&spec("q3"), "", "alice", 0).unwrap();
            for (i, &to) in path.iter().enumerate() {
                store
                    .transition(&job.job_id, to, "step", i as i64 + 1)
                    .unwrap();
                assert_eq!(state_of(&store, &job.job_id), to);
            }
            assert!(is_terminal(*path.last().unwrap()));
        }
    }

    #[test]
    fn illegal_transitions_change_nothing() {
        let (_dir, store) = open_temp();
        let all = [
            JobState::Unspecified,
            JobState::Pending,
            JobState::Offered,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Vetoed,
            JobState::Cancelled,
        ];
        // Reach each state, then try every move the state machine forbids from it.
        let reach: &[(JobState, &[JobState])] = &[
            (JobState::Pending, &[]),
            (JobState::Offered, &[JobState::Offered]),
            (JobState::Running, &[JobState::Offered, JobState::Running]),
            (
                JobState::Succeeded,
                &[JobState::Offered, JobState::Running, JobState::Succeeded],
            ),
            (JobState::Failed, &[JobState::Failed]),
            (JobState::Vetoed, &[JobState::Vetoed]),
            (JobState::Cancelled, &[JobState::Cancelled]),
        ];
        let mut illegal_tried = 0;
        for &(state, steps) in reach {
            let job = store.submit(&spec("q3"), "", "alice", 0).unwrap();
            for &step in steps {
                store.transition(&job.job_id, step, "step", 1).unwrap();
            }
            let before = store.get(&job.job_id).unwrap().unwrap();
            assert_eq!(before.state, state as i32);
            for to in all {
                if transition_allowed(state, to) {
                    continue;
                }
                illegal_tried += 1;
                let err = store
                    .transition(&job.job_id, to, "should not happen", 99)
                    .unwrap_err();
                match err {
                    StoreError::IllegalTransition {
                        ref job_id,
                        from,
                        to: got_to,
                    } => {
                        assert_eq!(job_id, &job.job_id);
                        assert_eq!((from, got_to), (state, to));
                    }
                    other => panic!("expected an illegal transition, got {other:?}"),
                }
                assert_eq!(store.get(&job.job_id).unwrap().unwrap(), before);
            }
        }
        // 4 terminal states × 8 targets + pending 4 + offered 4 + running 5.
        assert_eq!(illegal_tried, 4 * 8 + 4 + 4 + 5);

        let job = store.submit(&spec("q3"), "", "alice", 0).unwrap();
        let err = store
            .transition(&job.job_id, JobState::Succeeded, "", 1)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("job {} is pending and cannot move to succeeded", job.job_id)
        );
        assert!(matches!(
            store.transition("job-ffffffffffffffff", JobState::Offered, "", 1),
            Err(StoreError::UnknownJob(id)) if id == "job-ffffffffffffffff"
        ));
    }

    #[test]
    fn history_keeps_order_times_and_reasons() {
        let (_dir, store) = open_temp();
        let job = store.submit(&spec("q3"), "k", "alice", 100).unwrap();
        store
            .transition(
                &job.job_id,
                JobState::Offered,
                "offered to acme, globex",
                200,
            )
            .unwrap();
        store
            .transition(&job.job_id, JobState::Running, "both nodes accepted", 300)
            .unwrap();
        // Illegal attempts leave no trace in the history.
        store
            .transition(&job.job_id, JobState::Pending, "no", 350)
            .unwrap_err();
        // Times as the caller gives them, even out of order: the history order is insertion.
        store
            .transition(
                &job.job_id,
                JobState::Failed,
                "globex: connection lost",
                250,
            )
            .unwrap();

        let info = store.get(&job.job_id).unwrap().unwrap();
        let history: Vec<(JobState, i64, &str)> = info
            .history
            .iter()
            .map(|c| {
                (
                    JobState::try_from(c.state).unwrap(),
                    c.at_ms,
                    c.reason.as_str(),
                )
            })
            .collect();
        assert_eq!(
            history,
            vec![
                (JobState::Pending, 100, "submitted by analyst alice"),
                (JobState::Offered, 200, "offered to acme, globex"),
                (JobState::Running, 300, "both nodes accepted"),
                (JobState::Failed, 250, "globex: connection lost"),
            ]
        );
        assert_eq!(info.state, JobState::Failed as i32);
        assert_eq!(info.reason, "globex: connection lost");
        assert_eq!((info.created_ms, info.updated_ms), (100, 250));
    }

    #[test]
    fn results_round_trip_and_replace() {
        let (_dir, store) = open_temp();
        let job = store.submit(&spec("q3"), "", "alice", 0).unwrap();
        store
            .put_result(&job.job_id, "globex", &outcome(7))
            .unwrap();
        store.put_result(&job.job_id, "acme", &outcome(41)).unwrap();
        // A second report from acme replaces the first.
        store.put_result(&job.job_id, "acme", &outcome(42)).unwrap();

        let info = store.get(&job.job_id).unwrap().unwrap();
        assert_eq!(
            info.results,
            vec![
                PartyResult {
                    node: "acme".into(),
                    outcome: Some(outcome(42)),
                },
                PartyResult {
                    node: "globex".into(),
                    outcome: Some(outcome(7)),
                },
            ]
        );

        let err = store
            .put_result(&job.job_id, "initech", &outcome(1))
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::NotAParty { node, .. } if node == "initech"),
            "{err:?}"
        );
        assert!(matches!(
            store.put_result("job-ffffffffffffffff", "acme", &outcome(1)),
            Err(StoreError::UnknownJob(_))
        ));
        assert_eq!(store.get(&job.job_id).unwrap().unwrap().results.len(), 2);
    }

    #[test]
    fn list_is_newest_first_and_limited() {
        let (_dir, store) = open_temp();
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(
                store
                    .submit(&spec("q3"), "", "alice", 1_000 + i)
                    .unwrap()
                    .job_id,
            );
        }
        // Same creation time as the newest: insertion order breaks the tie.
        ids.push(
            store
                .submit(&spec("q3"), "", "alice", 1_004)
                .unwrap()
                .job_id,
        );
        // A transition does not make a job "newer".
        store
            .transition(&ids[0], JobState::Cancelled, "analyst cancelled", 9_999)
            .unwrap();

        let listed: Vec<String> = store
            .list(100)
            .unwrap()
            .into_iter()
            .map(|info| info.job_id)
            .collect();
        let mut expected = ids.clone();
        expected.reverse();
        assert_eq!(listed, expected);

        let two: Vec<String> = store
            .list(2)
            .unwrap()
            .into_iter()
            .map(|info| info.job_id)
            .collect();
        assert_eq!(two, expected[..2]);
        assert!(store.list(0).unwrap().is_empty());
        assert_eq!(store.list(u32::MAX).unwrap().len(), 6);
        // Listed jobs are full views.
        let oldest = store.list(100).unwrap().pop().unwrap();
        assert_eq!(oldest.history.len(), 2);
        assert_eq!(oldest.spec, Some(spec("q3")));
    }

    #[test]
    fn list_caps_the_limit() {
        let (_dir, store) = open_temp();
        for i in 0..(MAX_LIST_LIMIT as i64 + 5) {
            store.submit(&spec("q3"), "", "alice", i).unwrap();
        }
        assert_eq!(store.list(u32::MAX).unwrap().len(), MAX_LIST_LIMIT as usize);
    }

    #[test]
    fn unfinished_lists_non_terminal_jobs() {
        let (_dir, store) = open_temp();
        let submit = || store.submit(&spec("q3"), "", "alice", 0).unwrap().job_id;
        let pending = submit();
        let offered = submit();
        let running = submit();
        let done = submit();
        let vetoed = submit();
        store
            .transition(&offered, JobState::Offered, "", 1)
            .unwrap();
        store
            .transition(&running, JobState::Offered, "", 1)
            .unwrap();
        store
            .transition(&running, JobState::Running, "", 2)
            .unwrap();
        store.transition(&done, JobState::Offered, "", 1).unwrap();
        store.transition(&done, JobState::Running, "", 2).unwrap();
        store.transition(&done, JobState::Succeeded, "", 3).unwrap();
        store
            .transition(&vetoed, JobState::Vetoed, "acme: policy", 1)
            .unwrap();

        assert_eq!(
            store.unfinished().unwrap(),
            vec![pending.clone(), offered.clone(), running.clone()]
        );
        for id in [&pending, &offered, &running] {
            store
                .transition(id, JobState::Failed, "coordinator restarted", 10)
                .unwrap();
        }
        assert!(store.unfinished().unwrap().is_empty());
    }

    #[test]
    fn a_node_is_last_seen_when_it_leaves() {
        let (_dir, store) = open_temp();
        store.record_node("acme", "10.0.0.1:7000", 100).unwrap();
        store.node_seen("acme", 5_000).unwrap();
        store.node_seen("acme", 4_000).unwrap();
        store.node_seen("nobody", 6_000).unwrap();
        let nodes = store.nodes().unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].last_seen_ms, 5_000);
    }

    #[test]
    fn node_registry_upserts() {
        let (_dir, store) = open_temp();
        assert!(store.nodes().unwrap().is_empty());
        store.record_node("globex", "10.0.0.2:7000", 100).unwrap();
        store.record_node("acme", "10.0.0.1:7000", 200).unwrap();
        store.record_node("acme", "10.0.0.9:7001", 300).unwrap();
        assert_eq!(
            store.nodes().unwrap(),
            vec![
                NodeRecord {
                    name: "acme".into(),
                    data_addr: "10.0.0.9:7001".into(),
                    last_seen_ms: 300,
                },
                NodeRecord {
                    name: "globex".into(),
                    data_addr: "10.0.0.2:7000".into(),
                    last_seen_ms: 100,
                },
            ]
        );
    }

    #[test]
    fn corrupt_stored_spec_is_an_error_not_a_panic() {
        let (_dir, store) = open_temp();
        let job = store.submit(&spec("q3"), "", "alice", 0).unwrap();
        // 0xff starts a varint that never ends.
        tamper(
            &store,
            "UPDATE jobs SET spec = x'ffffff' WHERE job_id = ?1",
            &job.job_id,
        );

        for err in [
            store.get(&job.job_id).unwrap_err(),
            store.list(10).unwrap_err(),
            store
                .put_result(&job.job_id, "acme", &outcome(1))
                .unwrap_err(),
        ] {
            match err {
                StoreError::Corrupt { job_id, reason } => {
                    assert_eq!(job_id, job.job_id);
                    assert!(reason.contains("job spec"), "{reason}");
                }
                other => panic!("expected Corrupt, got {other:?}"),
            }
        }
    }

    #[test]
    fn corrupt_state_and_result_are_errors_not_panics() {
        let (_dir, store) = open_temp();
        let job = store.submit(&spec("q3"), "", "alice", 0).unwrap();
        store.put_result(&job.job_id, "acme", &outcome(1)).unwrap();
        tamper(
            &store,
            "UPDATE job_results SET outcome = x'ff' WHERE job_id = ?1",
            &job.job_id,
        );
        assert!(matches!(
            store.get(&job.job_id),
            Err(StoreError::Corrupt { .. })
        ));

        tamper(
            &store,
            "UPDATE jobs SET state = 99 WHERE job_id = ?1",
            &job.job_id,
        );
        assert!(matches!(
            store.transition(&job.job_id, JobState::Offered, "", 1),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            store.get(&job.job_id),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn concurrent_submits_with_one_key_create_one_job() {
        let (_dir, store) = open_temp();
        let store = Arc::new(store);
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let store = Arc::clone(&store);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    store.submit(&spec("q3"), "nightly-1", "alice", i).unwrap()
                })
            })
            .collect();
        let results: Vec<Submitted> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(results.iter().filter(|s| s.created).count(), 1);
        assert!(results.iter().all(|s| s.job_id == results[0].job_id));
        assert_eq!(store.list(100).unwrap().len(), 1);
    }

    #[test]
    fn concurrent_submits_from_separate_connections_create_one_job() {
        // As if several coordinator processes shared the file: SQLite's locks, not the mutex,
        // must keep the key unique.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.sqlite");
        drop(JobStore::open(&path).unwrap());
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let path = path.clone();
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    let store = JobStore::open(&path).unwrap();
                    barrier.wait();
                    store.submit(&spec("q3"), "nightly-1", "alice", i).unwrap()
                })
            })
            .collect();
        let results: Vec<Submitted> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(results.iter().filter(|s| s.created).count(), 1);
        assert!(results.iter().all(|s| s.job_id == results[0].job_id));
        assert_eq!(JobStore::open(&path).unwrap().list(100).unwrap().len(), 1);
    }

    fn new_schedule(name: &str) -> NewSchedule {
        NewSchedule {
            name: name.into(),
            cron: "0 2 * * *".into(),
            timezone: "Europe/Berlin".into(),
            spec: spec("overlap-reporting"),
            owner: "alice".into(),
            max_retries: 2,
            backoff_base_secs: 60,
        }
    }

    /// A version-6 store holds outcomes and aggregate results that carried each party's row
    /// counts (fields since reserved): opening it rewrites them without, and keeps the rest.
    #[test]
    fn version_6_results_lose_the_parties_row_counts() {
        use cleanroom_proto::v1::{AggregatePartyStats, AggregateResult};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.sqlite");
        // Field 7 (rows_read) = 918273 as an old node reported it; field 2 (rows_read) of a
        // party's stats inside field 8 of an aggregate result = 564738.
        let mut old_outcome = outcome(5).encode_to_vec();
        old_outcome.extend([0x38, 0x81, 0x86, 0x38]);
        assert_eq!(
            PsiOutcome::decode(old_outcome.as_slice()).unwrap(),
            outcome(5)
        );
        let mut party = AggregatePartyStats {
            node: "acme".into(),
            audit_head: "3:ab".into(),
            ..AggregatePartyStats::default()
        }
        .encode_to_vec();
        party.extend([0x10, 0x82, 0xbc, 0x22]);
        let mut old_result = AggregateResult {
            columns: vec!["count".into()],
            min_result: 10,
            ..AggregateResult::default()
        }
        .encode_to_vec();
        old_result.push(0x42);
        old_result.push(party.len() as u8);
        old_result.extend(&party);
        let job_id = {
            let store = JobStore::open(&path).unwrap();
            let job = store.submit(&spec("q3"), "k1", "alice", 1_000).unwrap();
            store
                .put_aggregate_result(&job.job_id, AggregateResult::default(), 2_000)
                .unwrap();
            let conn = store.lock();
            conn.execute(
                "INSERT INTO job_results (job_id, node, outcome) VALUES (?1, 'acme', ?2)",
                params![job.job_id, old_outcome],
            )
            .unwrap();
            conn.execute(
                "UPDATE aggregate_results SET result = ?2 WHERE job_id = ?1",
                params![job.job_id, old_result],
            )
            .unwrap();
            conn.execute_batch(
                "DELETE FROM schema_version; INSERT INTO schema_version VALUES (6);",
            )
            .unwrap();
            job.job_id
        };
        let store = JobStore::open(&path).unwrap();
        let (outcome_bytes, result_bytes): (Vec<u8>, Vec<u8>) = store
            .lock()
            .query_row(
                "SELECT o.outcome, a.result FROM job_results o JOIN aggregate_results a \
                 USING (job_id) WHERE job_id = ?1",
                [&job_id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .unwrap();
        assert_eq!(outcome_bytes, outcome(5).encode_to_vec());
        let result = AggregateResult::decode(result_bytes.as_slice()).unwrap();
        assert_eq!(result.parties[0].node, "acme");
        assert_eq!(result.parties[0].audit_head, "3:ab");
        assert_eq!(result_bytes, result.encode_to_vec());
        assert!(
            !result_bytes
                .windows(4)
                .any(|w| w == [0x10, 0x82, 0xbc, 0x22])
        );
        drop(store);
        // Nor do the old bytes linger in the file.
        let file = std::fs::read(&path).unwrap();
        for needle in [[0x38u8, 0x81, 0x86, 0x38], [0x10, 0x82, 0xbc, 0x22]] {
            assert!(
                !file.windows(4).any(|w| w == needle),
                "{needle:x?} survived"
            );
        }
    }

    #[test]
    fn version_1_database_is_migrated_and_keeps_its_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.sqlite");
        // A version-1 database: the v1 tables only.
        let job_id = {
            let store = JobStore::open(&path).unwrap();
            let job = store.submit(&spec("q3"), "k1", "alice", 1_000).unwrap();
            store
                .lock()
                .execute_batch(
                    "DROP TABLE schedule_runs; DROP TABLE schedules; \
                     DELETE FROM schema_version; INSERT INTO schema_version VALUES (1);",
                )
                .unwrap();
            job.job_id
        };
        let store = JobStore::open(&path).unwrap();
        let versions: Vec<i64> = store
            .lock()
            .prepare("SELECT version FROM schema_version ORDER BY version")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(versions, vec![1, SCHEMA_VERSION]);
        assert_eq!(store.get(&job_id).unwrap().unwrap().spec, Some(spec("q3")));
        store.add_schedule(&new_schedule("nightly"), 0).unwrap();
        drop(store);
        // And it opens again as the current version.
        let store = JobStore::open(&path).unwrap();
        assert_eq!(store.list_schedules().unwrap().len(), 1);
    }

    #[test]
    fn schedules_add_list_pause_resume_remove() {
        let (_dir, store) = open_temp();
        // 2025-01-06 00:00 UTC; 02:00 in Berlin is 01:00 UTC.
        let now = 1_736_121_600_000;
        let added = store.add_schedule(&new_schedule("nightly"), now).unwrap();
        assert_eq!(added.next_run_ms, Some(now + 3_600_000));
        assert_eq!(added.timezone, "Europe/Berlin");
        assert_eq!(store.get_schedule("nightly").unwrap(), Some(added.clone()));
        assert!(matches!(
            store.add_schedule(&new_schedule("nightly"), now),
            Err(StoreError::ScheduleExists(_))
        ));
        let bad = |edit: fn(&mut NewSchedule)| {
            let mut new = new_schedule("x");
            edit(&mut new);
            match store.add_schedule(&new, now) {
                Err(StoreError::InvalidSchedule(msg)) => msg,
                other => panic!("expected invalid, got {other:?}"),
            }
        };
        assert!(bad(|n| n.cron = "0 25 * * *".into()).contains("hour"));
        assert!(bad(|n| n.timezone = "Nowhere/Land".into()).contains("time zone"));
        assert!(bad(|n| n.name = "a b".into()).contains("may contain only"));
        assert!(bad(|n| n.backoff_base_secs = 0).contains("at least 1 second"));
        assert!(bad(|n| n.max_retries = 99).contains("at most"));
        assert!(bad(|n| n.spec.parties.clear()).len() > 3);

        assert!(store.pause_schedule("nightly").unwrap().paused);
        assert!(
            store
                .due_schedules(now + 10 * 86_400_000)
                .unwrap()
                .is_empty()
        );
        let resumed = store.resume_schedule("nightly", now + 86_400_000).unwrap();
        assert!(!resumed.paused);
        assert_eq!(resumed.next_run_ms, Some(now + 86_400_000 + 3_600_000));
        assert_eq!(store.due_schedules(now + 2 * 86_400_000).unwrap().len(), 1);

        // Runs are recorded once per (occurrence, attempt).
        let job = store
            .submit(&spec("overlap-reporting"), "", "alice", now)
            .unwrap();
        assert!(
            store
                .record_run("nightly", 5, 0, &job.job_id, "cron", now)
                .unwrap()
        );
        assert!(
            !store
                .record_run("nightly", 5, 0, &job.job_id, "cron", now)
                .unwrap()
        );
        assert!(!store.record_skipped("nightly", 5, "missed", now).unwrap());
        assert!(matches!(
            store.record_run("nope", 5, 0, &job.job_id, "cron", now),
            Err(StoreError::UnknownSchedule(_))
        ));
        // A run must name a real job.
        assert!(
            store
                .record_run("nightly", 6, 0, "job-nope", "cron", now)
                .is_err()
        );

        // Remove keeps the history; the name is free again.
        store.remove_schedule("nightly", now).unwrap();
        assert!(store.get_schedule("nightly").unwrap().is_none());
        assert!(store.list_schedules().unwrap().is_empty());
        assert_eq!(store.runs("nightly", 0).unwrap().len(), 1);
        assert!(
            store
                .schedule_for_report("nightly")
                .unwrap()
                .unwrap()
                .removed_ms
                .is_some()
        );
        let again = store.add_schedule(&new_schedule("nightly"), now).unwrap();
        assert_ne!(again.id, added.id);
        assert!(store.runs("nightly", 0).unwrap().is_empty());
        assert!(matches!(
            store.remove_schedule("nope", now),
            Err(StoreError::UnknownSchedule(_))
        ));
    }

    #[test]
    fn corrupt_schedule_spec_is_an_error() {
        let (_dir, store) = open_temp();
        store.add_schedule(&new_schedule("nightly"), 0).unwrap();
        store
            .lock()
            .execute("UPDATE schedules SET spec = x'ffffff'", [])
            .unwrap();
        assert!(matches!(
            store.list_schedules(),
            Err(StoreError::CorruptSchedule { .. })
        ));
    }

    #[test]
    fn errors_read_well() {
        let err = StoreError::IllegalTransition {
            job_id: "job-0123456789abcdef".into(),
            from: JobState::Succeeded,
            to: JobState::Running,
        };
        assert_eq!(
            err.to_string(),
            "job job-0123456789abcdef is succeeded and cannot move to running"
        );
        assert_eq!(
            StoreError::UnknownJob("job-x".into()).to_string(),
            "no job with id 'job-x'"
        );
    }
}
