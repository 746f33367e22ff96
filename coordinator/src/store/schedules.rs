//! Schedules: recurring jobs, their cron expressions and retry policies.

use cleanroom_proto::v1::JobSpec;
use prost::Message;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::error::StoreError;
use super::schema::JobStore;
use crate::cron::CronSchedule;

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
        let cron = CronSchedule::parse(&new.cron, &new.timezone)
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
        let cron = CronSchedule::parse(&record.cron, &record.timezone).map_err(|err| {
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
}

/// A schedule's row as stored: the record with its spec still encoded and its retry policy
/// still as stored (both checked by [`decode_schedule`]).
struct ScheduleRow {
    record: ScheduleRecord,
    spec: Vec<u8>,
    max_retries: i64,
    backoff_base_secs: i64,
}

/// Reads the columns of [`SCHEDULE_COLUMNS`], in order.
fn schedule_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<ScheduleRow> {
    Ok(ScheduleRow {
        record: ScheduleRecord {
            id: row.get(0)?,
            name: row.get(1)?,
            cron: row.get(2)?,
            timezone: row.get(3)?,
            spec: JobSpec::default(),
            owner: row.get(5)?,
            paused: row.get(6)?,
            created_ms: row.get(7)?,
            next_run_ms: row.get(8)?,
            last_fired_ms: row.get(9)?,
            max_retries: 0,
            backoff_base_secs: 0,
            removed_ms: row.get(12)?,
        },
        spec: row.get(4)?,
        max_retries: row.get(10)?,
        backoff_base_secs: row.get(11)?,
    })
}

fn decode_schedule(row: ScheduleRow) -> Result<ScheduleRecord, StoreError> {
    let ScheduleRow {
        record,
        spec,
        max_retries,
        backoff_base_secs,
    } = row;
    let corrupt = |reason: String| StoreError::CorruptSchedule {
        name: record.name.clone(),
        reason,
    };
    let spec = JobSpec::decode(spec.as_slice())
        .map_err(|err| corrupt(format!("job spec does not decode: {err}")))?;
    let max_retries = u32::try_from(max_retries)
        .map_err(|_| corrupt(format!("max_retries {max_retries} out of range")))?;
    let backoff_base_secs = u32::try_from(backoff_base_secs)
        .map_err(|_| corrupt(format!("backoff {backoff_base_secs} out of range")))?;
    Ok(ScheduleRecord {
        spec,
        max_retries,
        backoff_base_secs,
        ..record
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

pub(super) fn live_schedule_id(conn: &Connection, name: &str) -> Result<i64, StoreError> {
    conn.query_row(
        "SELECT id FROM schedules WHERE name = ?1 AND removed_ms IS NULL",
        [name],
        |row| row.get(0),
    )
    .optional()?
    .ok_or_else(|| StoreError::UnknownSchedule(name.to_owned()))
}
