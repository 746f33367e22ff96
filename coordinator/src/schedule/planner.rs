//! The sans-IO planner: from the live schedules, their latest runs and the time, what to fire,
//! retry or skip (the catch-up and retry rules of `super`). Pure: same input, same output.

use std::collections::{HashMap, VecDeque};

use cleanroom_proto::v1::JobState;

use crate::cron::CronSchedule;
use crate::store::{RunStatus, ScheduleRecord, ScheduleRun, state_name};

/// Most skipped occurrences recorded individually in one catch-up.
pub const MAX_SKIPPED_RECORDED: usize = 100;

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
        if let Some(retry) = latest
            .get(schedule.name.as_str())
            .and_then(|run| plan_retry(schedule, run, now_ms))
        {
            planned.push(retry);
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
    let state_name = state_name(&state);
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
