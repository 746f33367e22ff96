//! Runs of schedules: which occurrence and attempt submitted which job (or was skipped), and
//! the notification of ended runs.

use cleanroom_proto::v1::JobState;
use rusqlite::{Connection, OptionalExtension, params};

use super::error::StoreError;
use super::jobs::{decode_state, job_outcomes};
use super::results::releases_nothing;
use super::schedules::live_schedule_id;
use super::schema::JobStore;

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
    /// The smaller of the two parties' set sizes in the same report (the largest the
    /// intersection could be): the base of the overlap rate.
    pub smaller_set: Option<u64>,
}

impl JobStore {
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
        let run = (scheduled_for_ms, attempt, Some(job_id));
        self.insert_run(name, run, RunStatus::Submitted, note, now_ms)
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
        let run = (scheduled_for_ms, 0, None);
        self.insert_run(name, run, RunStatus::Skipped, note, now_ms)
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
        let run = (scheduled_for_ms, attempt, None);
        self.insert_run(name, run, RunStatus::NotSubmitted, reason, now_ms)
    }

    /// Records one run (occurrence, attempt, job) of schedule `name`, unless that occurrence
    /// and attempt already has one; returns whether it was recorded.
    fn insert_run(
        &self,
        name: &str,
        (scheduled_for_ms, attempt, job_id): (i64, u32, Option<&str>),
        status: RunStatus,
        note: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let conn = self.lock();
        let id = live_schedule_id(&conn, name)?;
        let inserted = conn.execute(
            "INSERT INTO schedule_runs (schedule_id, scheduled_for_ms, attempt, job_id, status, \
             note, recorded_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT (schedule_id, scheduled_for_ms, attempt) DO NOTHING",
            params![
                id,
                scheduled_for_ms,
                attempt,
                job_id,
                status.as_str(),
                note,
                now_ms
            ],
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
    /// A program (absolute path, run directly) with the run's facts in `CLEANROOM_*` environment variables.
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
        stmt.query_map(params, |row| RunRow::try_from(row))?
            .collect::<Result<Vec<_>, _>>()?
    };
    let mut runs = Vec::with_capacity(rows.len());
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
        let released = match &job_id {
            Some(job_id) => job_outcomes(conn, job_id)?
                .into_iter()
                .find(|(_, outcome)| !releases_nothing(outcome)),
            None => None,
        };
        let intersection = released.as_ref().map(|(_, o)| o.intersection);
        let smaller_set = released
            .as_ref()
            .map(|(_, o)| o.own_set_size.min(o.peer_set_size));
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
            smaller_set,
        });
    }
    Ok(runs)
}
