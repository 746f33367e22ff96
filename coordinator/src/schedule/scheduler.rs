//! The scheduler loop: a tick every second carries out the planner's decisions — records skips,
//! submits jobs (submit first, record second), moves schedules on — and then announces the runs
//! that ended. Also `schedule run-now`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cleanroom_proto::v1::JobSpec;

use super::notify::{Confinement, notify_ended};
use super::planner::{RunAction, idempotency_key, plan};
use crate::clock::Clock;
use crate::store::{JobStore, ScheduleRecord, StoreError};

/// How often [`run_scheduler`] looks at the clock.
pub const TICK: Duration = Duration::from_secs(1);

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

impl ScheduledJob {
    /// Attempt `attempt` of `schedule`'s occurrence `scheduled_for_ms`, in its owner's name and
    /// under its [`idempotency_key`].
    pub fn run_of(schedule: &ScheduleRecord, scheduled_for_ms: i64, attempt: u32) -> ScheduledJob {
        ScheduledJob {
            schedule: schedule.name.clone(),
            owner: schedule.owner.clone(),
            spec: schedule.spec.clone(),
            idempotency_key: idempotency_key(&schedule.name, scheduled_for_ms, attempt),
            scheduled_for_ms,
            attempt,
        }
    }
}

/// How the scheduler submits a job: it answers the job's id, or why the submission was refused.
/// Any `Fn(ScheduledJob) -> impl Future<Output = Result<String, String>>` is one.
pub trait Submit {
    /// Submits `job`.
    fn submit(&self, job: ScheduledJob) -> impl Future<Output = Result<String, String>>;
}

impl<F, Fut> Submit for F
where
    F: Fn(ScheduledJob) -> Fut,
    Fut: Future<Output = Result<String, String>>,
{
    fn submit(&self, job: ScheduledJob) -> impl Future<Output = Result<String, String>> {
        self(job)
    }
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
pub async fn tick(
    store: &JobStore,
    now_ms: i64,
    submit: &impl Submit,
) -> Result<TickSummary, StoreError> {
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
                let job = ScheduledJob::run_of(schedule, run.scheduled_for_ms, run.attempt);
                match submit.submit(job).await {
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
pub async fn run_scheduler(
    clock: Arc<dyn Clock>,
    store: &JobStore,
    confinement: &Confinement,
    submit: impl Submit,
    shutdown: impl Future<Output = ()>,
) {
    run_scheduler_every(clock, store, confinement, submit, shutdown, TICK).await;
}

/// [`run_scheduler`] with another interval between ticks (tests use a few milliseconds).
pub async fn run_scheduler_every(
    clock: Arc<dyn Clock>,
    store: &JobStore,
    confinement: &Confinement,
    submit: impl Submit,
    shutdown: impl Future<Output = ()>,
    every: Duration,
) {
    tokio::pin!(shutdown);
    loop {
        if let Err(err) = tick(store, clock.now_ms(), &submit).await {
            tracing::warn!(error = %err, "scheduler tick failed");
        }
        if let Err(err) = notify_ended(store, confinement, clock.now_ms()) {
            tracing::warn!(error = %err, "could not look for ended scheduled runs to notify");
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
pub async fn run_now(
    store: &JobStore,
    name: &str,
    now_ms: i64,
    submit: &impl Submit,
) -> Result<RunNow, ScheduleError> {
    let schedule = store
        .get_schedule(name)?
        .ok_or_else(|| StoreError::UnknownSchedule(name.to_owned()))?;
    let job = ScheduledJob::run_of(&schedule, now_ms, 0);
    let job_id = submit
        .submit(job)
        .await
        .map_err(|reason| ScheduleError::Submit {
            schedule: name.to_owned(),
            reason,
        })?;
    store.record_run(name, now_ms, 0, &job_id, "run-now", now_ms)?;
    Ok(RunNow {
        job_id,
        scheduled_for_ms: now_ms,
    })
}
