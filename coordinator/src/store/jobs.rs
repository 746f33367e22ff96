//! Jobs: submission (idempotent), state transitions with their history, the analyst's view of
//! a job, and the node registry.

use cleanroom_proto::v1::{JobInfo, JobSpec, JobState, PartyResult, PsiOutcome, StateChange};
use prost::Message;
use rand::TryRng;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::error::StoreError;
use super::schema::JobStore;
use super::state::{is_terminal, transition_allowed};

/// Most jobs one [`JobStore::list`] call returns, whatever limit is asked for.
pub const MAX_LIST_LIMIT: u32 = 1000;

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

impl JobStore {
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
        let from = stored_state(&tx, job_id)?;
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

    /// How many jobs the store holds per (kind, state), as stored (`cleanroom.v1.JobKind` and
    /// `JobState` numbers): the `/metrics` gauge of jobs by kind and state.
    pub fn count_by_kind_and_state(&self) -> Result<Vec<(i32, i32, u64)>, StoreError> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare_cached("SELECT kind, state, COUNT(*) FROM jobs GROUP BY kind, state")?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, i32>(0)?,
                    row.get::<_, i32>(1)?,
                    row.get::<_, i64>(2)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows
            .into_iter()
            .map(|(k, s, n)| (k, s, u64::try_from(n).unwrap_or(0)))
            .collect())
    }

    /// The most recently created jobs, newest first, at most `limit` of them (and never more
    /// than [`MAX_LIST_LIMIT`]). A limit of 0 returns no jobs: choosing a default is the API's
    /// business.
    pub fn list(&self, limit: u32) -> Result<Vec<JobInfo>, StoreError> {
        self.load_listed(
            "SELECT job_id FROM jobs ORDER BY created_ms DESC, seq DESC LIMIT ?1",
            [limit.min(MAX_LIST_LIMIT)],
        )
    }

    /// Like [`JobStore::list`], restricted to what `filter` lets an analyst see (the API
    /// decides the filter with `api::authz`).
    pub fn list_visible(&self, limit: u32, filter: &JobFilter) -> Result<Vec<JobInfo>, StoreError> {
        let (owner, scheduled) = match filter {
            JobFilter::All => return self.list(limit),
            JobFilter::OwnedBy(o) => (o.as_str(), false),
            JobFilter::OwnedByOrScheduled(o) => (o.as_str(), true),
        };
        self.load_listed(
            "SELECT job_id FROM jobs WHERE submitted_by = ?2 \
               OR (?3 AND job_id IN (SELECT job_id FROM schedule_runs WHERE job_id IS NOT NULL)) \
             ORDER BY created_ms DESC, seq DESC LIMIT ?1",
            params![limit.min(MAX_LIST_LIMIT), owner, scheduled],
        )
    }

    /// The jobs whose ids the query `sql` selects, in its order, loaded in one read transaction.
    fn load_listed(
        &self,
        sql: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<JobInfo>, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let ids = {
            let mut stmt = tx.prepare(sql)?;
            stmt.query_map(params, |row| row.get::<_, String>(0))?
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

    /// Whether `job_id` is a run of a schedule.
    pub fn is_scheduled_run(&self, job_id: &str) -> Result<bool, StoreError> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM schedule_runs WHERE job_id = ?1)")?;
        Ok(stmt.query_row([job_id], |row| row.get::<_, bool>(0))?)
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
}

/// A fresh job id: `job-` and 16 lowercase hex digits from the operating system's RNG.
pub(super) fn new_job_id() -> Result<String, StoreError> {
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

/// The stored state of a job ([`StoreError::UnknownJob`] if there is none).
pub(super) fn stored_state(conn: &Connection, job_id: &str) -> Result<JobState, StoreError> {
    let stored: Option<i32> = conn
        .query_row(
            "SELECT state FROM jobs WHERE job_id = ?1",
            [job_id],
            |row| row.get(0),
        )
        .optional()?;
    match stored {
        Some(stored) => decode_state(job_id, stored),
        None => Err(StoreError::UnknownJob(job_id.to_owned())),
    }
}

/// What each party reported for a job (`job_results`), by node name.
pub(super) fn job_outcomes(
    conn: &Connection,
    job_id: &str,
) -> Result<Vec<(String, PsiOutcome)>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT node, outcome FROM job_results WHERE job_id = ?1 ORDER BY node")?;
    let mut rows = stmt.query([job_id])?;
    let mut outcomes = Vec::new();
    while let Some(row) = rows.next()? {
        let node: String = row.get(0)?;
        let bytes: Vec<u8> = row.get(1)?;
        let outcome = PsiOutcome::decode(bytes.as_slice()).map_err(|err| StoreError::Corrupt {
            job_id: job_id.to_owned(),
            reason: format!("result of node '{node}' does not decode: {err}"),
        })?;
        outcomes.push((node, outcome));
    }
    Ok(outcomes)
}

/// A state number read from the database, which must name a real state.
pub(super) fn decode_state(job_id: &str, stored: i32) -> Result<JobState, StoreError> {
    match JobState::try_from(stored) {
        Ok(JobState::Unspecified) | Err(_) => Err(StoreError::Corrupt {
            job_id: job_id.to_owned(),
            reason: format!("state number {stored} is not a job state"),
        }),
        Ok(state) => Ok(state),
    }
}

pub(super) fn decode_spec(job_id: &str, bytes: &[u8]) -> Result<JobSpec, StoreError> {
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
        .query_row([job_id], |row| JobRow::try_from(row))
        .optional()?;
    let Some((spec, state, reason, created_ms, updated_ms, submitted_by)) = row else {
        return Ok(None);
    };
    let spec = decode_spec(job_id, &spec)?;
    let state = decode_state(job_id, state)?;

    let results = job_outcomes(conn, job_id)?
        .into_iter()
        .map(|(node, outcome)| PartyResult {
            node,
            outcome: Some(outcome),
        })
        .collect();

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

/// Which jobs a listing shows (see [`JobStore::list_visible`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobFilter {
    /// Every job.
    All,
    /// The jobs this analyst submitted (a scheduled run counts as its schedule owner's).
    OwnedBy(String),
    /// Those, and every run of a schedule.
    OwnedByOrScheduled(String),
}
