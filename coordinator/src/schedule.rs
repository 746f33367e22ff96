//! Recurring jobs: the sans-IO planner ([`plan`]) and the scheduler loop ([`run_scheduler`]).
//!
//! Every run of a schedule is an ordinary job, submitted with the idempotency key
//! `schedule:<name>:<scheduled_for_ms>:<attempt>` ([`idempotency_key`]) and recorded in
//! `schedule_runs` (unique on schedule, occurrence and attempt). The loop always submits first and
//! records second, so a crash in between is repaired on the next tick: the same key gives back
//! the same job, and the record is written once. A restarted coordinator never submits a run
//! twice.
//!
//! **Catch-up rule.** When occurrences were missed (the coordinator was down, or busy for longer
//! than a period), only the most recent missed occurrence is run, once; each earlier one is
//! recorded as *skipped* with the reason, so reports show the gap (at most
//! [`MAX_SKIPPED_RECORDED`] of them are recorded per catch-up; older ones are only counted in the
//! fired run's note). Occurrences during a pause are not missed: they are not run and not
//! recorded (see [`JobStore::resume_schedule`]).
//!
//! **Retry rule.** When the latest occurrence's latest attempt ended *failed* or *vetoed*, it is
//! retried as a new job for the same occurrence, attempt `n + 1`, once
//! `backoff_base_secs × 2^n` seconds have passed since that job ended, up to `max_retries`
//! retries. A cancelled job is not retried (someone meant it), nor is an attempt whose
//! submission was refused. Only the latest occurrence is retried: once the next occurrence is
//! due, it supersedes pending retries of the previous one. Paused schedules do not retry.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cleanroom_proto::v1::{JobSpec, JobState};

use crate::clock::Clock;
use crate::cron::CronSchedule;
use crate::store::{JobStore, RunStatus, ScheduleRecord, ScheduleRun, StoreError};

/// Most skipped occurrences recorded individually in one catch-up.
pub const MAX_SKIPPED_RECORDED: usize = 100;

/// How often [`run_scheduler`] looks at the clock.
pub const TICK: Duration = Duration::from_secs(1);

/// The idempotency key of one run: `schedule:<name>:<scheduled_for_ms>:<attempt>`.
pub fn idempotency_key(schedule: &str, scheduled_for_ms: i64, attempt: u32) -> String {
    format!("schedule:{schedule}:{scheduled_for_ms}:{attempt}")
}

/// What the planner decided for one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunAction {
    /// Submit the first attempt of a due occurrence, then move the schedule to `next_run_ms`.
    Fire,
    /// Submit a retry (a new job for the same occurrence).
    Retry,
    /// Record a missed occurrence as skipped; no job.
    Skip,
}

/// One decision of [`plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRun {
    /// The schedule's name.
    pub schedule: String,
    /// The occurrence.
    pub scheduled_for_ms: i64,
    /// 0 for the first attempt.
    pub attempt: u32,
    /// What to do.
    pub action: RunAction,
    /// Why, for the run's record ("cron", "retry 1 of 3 after vetoed: …", "missed: …").
    pub note: String,
    /// For [`RunAction::Fire`]: the schedule's next occurrence after this one (`None`: never).
    pub next_run_ms: Option<i64>,
}

impl PlannedRun {
    /// This run's idempotency key.
    pub fn idempotency_key(&self) -> String {
        idempotency_key(&self.schedule, self.scheduled_for_ms, self.attempt)
    }
}

/// Decides what to do at `now_ms`, given the live schedules and, for each, the recorded attempts
/// of its latest occurrence ([`JobStore::latest_runs`]; other runs are ignored). Pure: same input,
/// same output. For each schedule, in order: the skips of a catch-up, then its fire; or a retry.
pub fn plan(now_ms: i64, schedules: &[ScheduleRecord], runs: &[ScheduleRun]) -> Vec<PlannedRun> {
    // The latest attempt of the latest occurrence, per schedule.
    let mut latest: HashMap<&str, &ScheduleRun> = HashMap::new();
    for run in runs {
        let entry = latest.entry(run.schedule.as_str()).or_insert(run);
        if (run.scheduled_for_ms, run.attempt) > (entry.scheduled_for_ms, entry.attempt) {
            *entry = run;
        }
    }

    let mut planned = Vec::new();
    for schedule in schedules {
        if schedule.paused || schedule.removed_ms.is_some() {
            continue;
        }
        if let Some(next) = schedule.next_run_ms.filter(|&next| next <= now_ms) {
            let cron = match CronSchedule::parse(&schedule.cron, &schedule.timezone) {
                Ok(cron) => cron,
                Err(err) => {
                    tracing::warn!(schedule = %schedule.name, error = %err, "stored cron expression no longer parses; schedule not run");
                    continue;
                }
            };
            plan_due(&mut planned, schedule, &cron, next, now_ms);
            continue;
        }
        if let Some(run) = latest.get(schedule.name.as_str()) {
            if let Some(retry) = plan_retry(schedule, run, now_ms) {
                planned.push(retry);
            }
        }
    }
    planned
}

/// The due occurrences of `schedule` from `next` to `now_ms`: fire the latest, skip the others.
fn plan_due(
    planned: &mut Vec<PlannedRun>,
    schedule: &ScheduleRecord,
    cron: &CronSchedule,
    next: i64,
    now_ms: i64,
) {
    let mut missed: VecDeque<i64> = VecDeque::new();
    let mut missed_total: u64 = 0;
    let mut latest = next;
    let mut following = cron.next_after(next);
    while let Some(t) = following.filter(|&t| t <= now_ms) {
        missed.push_back(latest);
        missed_total += 1;
        if missed.len() > MAX_SKIPPED_RECORDED {
            missed.pop_front();
        }
        latest = t;
        following = cron.next_after(t);
    }
    for &t in &missed {
        planned.push(PlannedRun {
            schedule: schedule.name.clone(),
            scheduled_for_ms: t,
            attempt: 0,
            action: RunAction::Skip,
            note: format!(
                "missed: the coordinator was not running at that time; only the latest missed \
                 occurrence ({latest}) was run"
            ),
            next_run_ms: None,
        });
    }
    let note = if missed_total == 0 {
        "cron".to_owned()
    } else {
        format!("cron, catching up: {missed_total} earlier missed occurrence(s) skipped")
    };
    planned.push(PlannedRun {
        schedule: schedule.name.clone(),
        scheduled_for_ms: latest,
        attempt: 0,
        action: RunAction::Fire,
        note,
        next_run_ms: following,
    });
}

/// A retry of `run` if its job failed or was vetoed, retries are left and the backoff has passed.
fn plan_retry(schedule: &ScheduleRecord, run: &ScheduleRun, now_ms: i64) -> Option<PlannedRun> {
    if run.status != RunStatus::Submitted || run.attempt >= schedule.max_retries {
        return None;
    }
    let state = run.job_state?;
    if !matches!(state, JobState::Failed | JobState::Vetoed) {
        return None;
    }
    let ended = run.job_updated_ms?;
    let due = ended.saturating_add(backoff_ms(schedule.backoff_base_secs, run.attempt));
    if now_ms < due {
        return None;
    }
    let attempt = run.attempt + 1;
    let state_name = crate::store::state_name(&state);
    Some(PlannedRun {
        schedule: schedule.name.clone(),
        scheduled_for_ms: run.scheduled_for_ms,
        attempt,
        action: RunAction::Retry,
        note: format!(
            "retry {attempt} of {} after attempt {} was {state_name}: {}",
            schedule.max_retries, run.attempt, run.job_reason
        ),
        next_run_ms: None,
    })
}

/// The wait after attempt `attempt` failed: `base × 2^attempt` seconds, in milliseconds.
pub fn backoff_ms(base_secs: u32, attempt: u32) -> i64 {
    let factor = 1i64.checked_shl(attempt.min(40)).unwrap_or(i64::MAX);
    i64::from(base_secs)
        .saturating_mul(1000)
        .saturating_mul(factor)
}

/// One job the scheduler asks to be submitted.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledJob {
    /// The schedule's name.
    pub schedule: String,
    /// The analyst who owns the schedule: submit in that name.
    pub owner: String,
    /// The job.
    pub spec: JobSpec,
    /// Submit with this key, so a repeated submission returns the same job.
    pub idempotency_key: String,
    /// The occurrence.
    pub scheduled_for_ms: i64,
    /// The attempt (0 first).
    pub attempt: u32,
}

/// Why a scheduler operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The submission of a scheduled job was refused.
    #[error("could not submit the job of schedule '{schedule}': {reason}")]
    Submit {
        /// The schedule.
        schedule: String,
        /// The refusal.
        reason: String,
    },
}

/// What one [`tick`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickSummary {
    /// Jobs submitted for due occurrences (schedule, job id).
    pub fired: Vec<(String, String)>,
    /// Jobs submitted as retries (schedule, job id).
    pub retried: Vec<(String, String)>,
    /// Occurrences recorded as skipped.
    pub skipped: usize,
    /// Submissions refused (recorded as not submitted).
    pub refused: usize,
}

/// One pass of the scheduler at `now_ms`: plans ([`plan`]) and carries out the plan — records
/// skips, submits through `submit` (which returns the job id, or why it was refused), records
/// each run, and moves fired schedules to their next occurrence.
pub async fn tick<F, Fut>(
    store: &JobStore,
    now_ms: i64,
    submit: &F,
) -> Result<TickSummary, StoreError>
where
    F: Fn(ScheduledJob) -> Fut,
    Fut: Future<Output = Result<String, String>>,
{
    let schedules = store.list_schedules()?;
    let runs = store.latest_runs()?;
    let planned = plan(now_ms, &schedules, &runs);
    let mut summary = TickSummary::default();
    for run in planned {
        let Some(schedule) = schedules.iter().find(|s| s.name == run.schedule) else {
            continue;
        };
        match run.action {
            RunAction::Skip => {
                if store.record_skipped(&run.schedule, run.scheduled_for_ms, &run.note, now_ms)? {
                    summary.skipped += 1;
                }
            }
            RunAction::Fire | RunAction::Retry => {
                let job = ScheduledJob {
                    schedule: run.schedule.clone(),
                    owner: schedule.owner.clone(),
                    spec: schedule.spec.clone(),
                    idempotency_key: run.idempotency_key(),
                    scheduled_for_ms: run.scheduled_for_ms,
                    attempt: run.attempt,
                };
                match submit(job).await {
                    Ok(job_id) => {
                        let recorded = store.record_run(
                            &run.schedule,
                            run.scheduled_for_ms,
                            run.attempt,
                            &job_id,
                            &run.note,
                            now_ms,
                        )?;
                        if recorded {
                            tracing::info!(schedule = %run.schedule, job_id = %job_id, attempt = run.attempt, "scheduled job submitted");
                            if run.action == RunAction::Fire {
                                summary.fired.push((run.schedule.clone(), job_id));
                            } else {
                                summary.retried.push((run.schedule.clone(), job_id));
                            }
                        }
                    }
                    Err(reason) => {
                        tracing::warn!(schedule = %run.schedule, %reason, "scheduled job refused");
                        if store.record_not_submitted(
                            &run.schedule,
                            run.scheduled_for_ms,
                            run.attempt,
                            &reason,
                            now_ms,
                        )? {
                            summary.refused += 1;
                        }
                    }
                }
                if run.action == RunAction::Fire {
                    store.advance_schedule(
                        &run.schedule,
                        run.next_run_ms,
                        Some(run.scheduled_for_ms),
                    )?;
                }
            }
        }
    }
    Ok(summary)
}

/// The scheduler: a [`tick`] every [`TICK`] (by `clock`), until `shutdown` completes. Store
/// errors are logged and the loop goes on.
pub async fn run_scheduler<F, Fut>(
    clock: Arc<dyn Clock>,
    store: &JobStore,
    submit: F,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn(ScheduledJob) -> Fut,
    Fut: Future<Output = Result<String, String>>,
{
    run_scheduler_every(clock, store, submit, shutdown, TICK).await;
}

/// [`run_scheduler`] with another interval between ticks (tests use a few milliseconds).
pub async fn run_scheduler_every<F, Fut>(
    clock: Arc<dyn Clock>,
    store: &JobStore,
    submit: F,
    shutdown: impl Future<Output = ()>,
    every: Duration,
) where
    F: Fn(ScheduledJob) -> Fut,
    Fut: Future<Output = Result<String, String>>,
{
    tokio::pin!(shutdown);
    loop {
        if let Err(err) = tick(store, clock.now_ms(), &submit).await {
            tracing::warn!(error = %err, "scheduler tick failed");
        }
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// What [`run_now`] submitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunNow {
    /// The job.
    pub job_id: String,
    /// The occurrence it is recorded for (the time of the request).
    pub scheduled_for_ms: i64,
}

/// `schedule run-now`: submits schedule `name`'s job at once, as an extra occurrence at `now_ms`
/// (attempt 0; failed or vetoed, it is retried like any run). Works on paused schedules too; does
/// not move the cron schedule.
pub async fn run_now<F, Fut>(
    store: &JobStore,
    name: &str,
    now_ms: i64,
    submit: &F,
) -> Result<RunNow, ScheduleError>
where
    F: Fn(ScheduledJob) -> Fut,
    Fut: Future<Output = Result<String, String>>,
{
    let schedule = store
        .get_schedule(name)?
        .ok_or_else(|| StoreError::UnknownSchedule(name.to_owned()))?;
    let job = ScheduledJob {
        schedule: schedule.name.clone(),
        owner: schedule.owner.clone(),
        spec: schedule.spec.clone(),
        idempotency_key: idempotency_key(&schedule.name, now_ms, 0),
        scheduled_for_ms: now_ms,
        attempt: 0,
    };
    let job_id = submit(job).await.map_err(|reason| ScheduleError::Submit {
        schedule: name.to_owned(),
        reason,
    })?;
    store.record_run(name, now_ms, 0, &job_id, "run-now", now_ms)?;
    Ok(RunNow {
        job_id,
        scheduled_for_ms: now_ms,
    })
}
