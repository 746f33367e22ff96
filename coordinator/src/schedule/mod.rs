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
//!
//! The rooms: [`planner`] (sans-IO: what to fire, retry or skip), [`scheduler`] (the loop and
//! `run-now`), [`notify`] (announcing ended runs). Cron expressions are [`crate::cron`], a leaf
//! the store also uses to check a schedule when it is added.

pub mod notify;
pub mod planner;
pub mod scheduler;
#[cfg(test)]
mod tests;

pub use notify::{Confinement, NOTIFY_TIMEOUT, check_notify, notify_ended, run_json};
pub use planner::{MAX_SKIPPED_RECORDED, PlannedRun, RunAction, backoff_ms, idempotency_key, plan};
pub use scheduler::{
    RunNow, ScheduleError, ScheduledJob, Submit, TICK, TickSummary, run_now, run_scheduler,
    run_scheduler_every, tick,
};
