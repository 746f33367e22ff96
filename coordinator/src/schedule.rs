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

use cleanroom_proto::v1::{JobInfo, JobSpec, JobState};

use crate::clock::Clock;
use crate::cron::CronSchedule;
use crate::store::{
    EndedRun, JobStore, RunStatus, ScheduleRecord, ScheduleRun, StoreError, state_name,
};

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
        if let Err(err) = notify_ended(store, clock.now_ms()) {
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

/// How long an `--on-done` command may run before it is killed.
pub const NOTIFY_TIMEOUT: Duration = Duration::from_secs(30);

/// The facts of an ended run, as written to the notify directory and passed to the command.
pub fn run_json(run: &EndedRun, job: &JobInfo) -> serde_json::Value {
    let state = JobState::try_from(job.state).map_or("unknown", |s| state_name(&s));
    let (result, suppressed) = released(job);
    serde_json::json!({
        "schedule": run.schedule,
        "scheduled_for_ms": run.scheduled_for_ms,
        "attempt": run.attempt,
        "note": run.note,
        "job_id": job.job_id,
        "state": state,
        "reason": job.reason,
        "result": result,
        "suppressed": suppressed,
        "ended_ms": job.updated_ms,
    })
}

/// The released intersection of a succeeded job (none if withheld), and whether it was withheld.
fn released(job: &JobInfo) -> (Option<u64>, bool) {
    if job.state != JobState::Succeeded as i32 {
        return (None, false);
    }
    let outcomes: Vec<_> = job
        .results
        .iter()
        .filter_map(|r| r.outcome.as_ref())
        .filter(|o| !crate::store::releases_nothing(o))
        .collect();
    if outcomes.iter().any(|o| o.suppressed) {
        return (None, true);
    }
    (outcomes.first().map(|o| o.intersection), false)
}

/// Announces every scheduled run that has ended (succeeded, failed or vetoed) and is not yet
/// announced: marks it notified (so it is announced at most once, even across a restart), then
/// spawns the announcement — the JSON file in the notify directory and the `--on-done` command
/// ([`NOTIFY_TIMEOUT`]). Their failures are logged, never fatal. Needs a Tokio runtime.
pub fn notify_ended(store: &JobStore, now_ms: i64) -> Result<usize, StoreError> {
    let mut count = 0;
    for run in store.ended_unnotified_runs()? {
        if !store.mark_notified(run.run_id, now_ms)? {
            continue;
        }
        let Some(job) = store.get(&run.job_id)? else {
            continue;
        };
        count += 1;
        tokio::spawn(announce(run, job));
    }
    Ok(count)
}

/// Writes the run's JSON into the notify directory and runs the command, as configured.
async fn announce(run: EndedRun, job: JobInfo) {
    let json = run_json(&run, &job);
    if !run.notify.notify_dir.is_empty() {
        let dir = std::path::PathBuf::from(&run.notify.notify_dir);
        // Names are safe: schedule names are letters, digits, '.', '_', '-'; job ids are hex.
        let name = format!(
            "{}-{}-{}-{}.json",
            run.schedule, run.scheduled_for_ms, run.attempt, job.job_id
        );
        let text = format!(
            "{}\n",
            serde_json::to_string_pretty(&json).unwrap_or_default()
        );
        let write = async {
            tokio::fs::create_dir_all(&dir).await?;
            let tmp = dir.join(format!(".{name}.tmp"));
            tokio::fs::write(&tmp, text).await?;
            tokio::fs::rename(&tmp, dir.join(&name)).await
        };
        match write.await {
            Ok(()) => {
                tracing::info!(schedule = %run.schedule, job_id = %job.job_id, file = %dir.join(&name).display(), "run notified (file)")
            }
            Err(e) => {
                tracing::warn!(schedule = %run.schedule, job_id = %job.job_id, dir = %dir.display(), error = %e, "could not write the run's notification")
            }
        }
    }
    if !run.notify.on_done.is_empty() {
        run_on_done(&run, &job, &json).await;
    }
}

/// Runs the `--on-done` command by `sh -c`, with the run's facts in the environment only (never
/// spliced into the command text): CLEANROOM_SCHEDULE, CLEANROOM_JOB_ID, CLEANROOM_STATE,
/// CLEANROOM_RESULT (the released count; empty if none), CLEANROOM_REASON, CLEANROOM_RUN_JSON.
async fn run_on_done(run: &EndedRun, job: &JobInfo, json: &serde_json::Value) {
    if std::env::var(crate::server::ALLOW_ON_DONE_ENV).as_deref() != Ok("1") {
        tracing::warn!(schedule = %run.schedule, job_id = %job.job_id, "on-done command not run: this coordinator no longer allows them ({}=1)", crate::server::ALLOW_ON_DONE_ENV);
        return;
    }
    let (result, _) = released(job);
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(&run.notify.on_done)
        .env("CLEANROOM_SCHEDULE", &run.schedule)
        .env("CLEANROOM_JOB_ID", &job.job_id)
        .env(
            "CLEANROOM_STATE",
            json["state"].as_str().unwrap_or("unknown"),
        )
        .env(
            "CLEANROOM_RESULT",
            result.map(|v| v.to_string()).unwrap_or_default(),
        )
        .env("CLEANROOM_REASON", &job.reason)
        .env("CLEANROOM_RUN_JSON", json.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            tracing::warn!(schedule = %run.schedule, job_id = %job.job_id, error = %e, "could not start the on-done command");
            return;
        }
    };
    match tokio::time::timeout(NOTIFY_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => {
            tracing::info!(schedule = %run.schedule, job_id = %job.job_id, "on-done command ran");
        }
        Ok(Ok(out)) => tracing::warn!(
            schedule = %run.schedule,
            job_id = %job.job_id,
            status = %out.status,
            stderr = %String::from_utf8_lossy(&out.stderr).chars().take(2000).collect::<String>(),
            "the on-done command failed"
        ),
        Ok(Err(e)) => {
            tracing::warn!(schedule = %run.schedule, job_id = %job.job_id, error = %e, "the on-done command failed")
        }
        // Dropping the child on timeout kills it (kill_on_drop).
        Err(_) => {
            tracing::warn!(schedule = %run.schedule, job_id = %job.job_id, timeout = ?NOTIFY_TIMEOUT, "the on-done command timed out and was killed")
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use cleanroom_proto::v1::{JobKind, PartySpec, PsiOutcome};
    use jiff::civil::DateTime;
    use tempfile::TempDir;

    use super::*;
    use crate::clock::TestClock;
    use crate::store::NewSchedule;

    const MIN: i64 = 60_000;
    const HOUR: i64 = 60 * MIN;
    const DAY: i64 = 24 * HOUR;

    fn utc(y: i16, mo: i8, d: i8, h: i8, mi: i8) -> i64 {
        jiff::tz::TimeZone::UTC
            .to_ambiguous_zoned(DateTime::new(y, mo, d, h, mi, 0, 0).unwrap())
            .compatible()
            .unwrap()
            .timestamp()
            .as_millisecond()
    }

    fn spec() -> JobSpec {
        let party = |node: &str, dataset: &str| PartySpec {
            node: node.into(),
            dataset: dataset.into(),
            keys: vec!["email".into()],
            learns_membership: false,
        };
        JobSpec {
            kind: JobKind::Overlap as i32,
            parties: vec![party("acme", "customers"), party("globex", "subscribers")],
            purpose: "overlap-reporting".into(),
            aggregate: None,
            overlap_sum: None,
        }
    }

    fn new_schedule(name: &str, cron: &str, max_retries: u32) -> NewSchedule {
        NewSchedule {
            name: name.into(),
            cron: cron.into(),
            timezone: String::new(),
            spec: spec(),
            owner: "alice".into(),
            max_retries,
            backoff_base_secs: 60,
        }
    }

    fn open_temp() -> (TempDir, Arc<JobStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(&dir.path().join("jobs.sqlite")).unwrap();
        (dir, Arc::new(store))
    }

    /// How the fake coordinator ends each submitted job.
    #[derive(Clone, Copy)]
    enum Ending {
        Succeed,
        Veto,
    }

    /// A submit function that stores the job (idempotently, like the server) and ends it at
    /// once, at the clock's time; it logs every key it was called with.
    #[allow(clippy::type_complexity)]
    fn fake_submit(
        store: &Arc<JobStore>,
        clock: &TestClock,
        ending: Ending,
    ) -> (
        impl Fn(ScheduledJob) -> std::future::Ready<Result<String, String>>,
        Arc<Mutex<Vec<String>>>,
    ) {
        let store = Arc::clone(store);
        let clock = clock.clone();
        let keys = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&keys);
        let submit = move |job: ScheduledJob| {
            log.lock().unwrap().push(job.idempotency_key.clone());
            let now = clock.now_ms();
            let result = (|| {
                let s = store.submit(&job.spec, &job.idempotency_key, &job.owner, now)?;
                if s.created {
                    match ending {
                        Ending::Succeed => {
                            store.transition(&s.job_id, JobState::Offered, "offered", now)?;
                            store.transition(&s.job_id, JobState::Running, "running", now)?;
                            let outcome = PsiOutcome {
                                intersection: 1000 + (job.scheduled_for_ms / DAY) as u64 % 100,
                                ..PsiOutcome::default()
                            };
                            store.put_result(&s.job_id, "acme", &outcome)?;
                            store.transition(&s.job_id, JobState::Succeeded, "done", now)?;
                        }
                        Ending::Veto => {
                            store.transition(&s.job_id, JobState::Offered, "offered", now)?;
                            store.transition(
                                &s.job_id,
                                JobState::Vetoed,
                                "node 'globex' refused: purpose not allowed",
                                now,
                            )?;
                        }
                    }
                }
                Ok::<_, StoreError>(s.job_id)
            })()
            .map_err(|e| e.to_string());
            std::future::ready(result)
        };
        (submit, keys)
    }

    #[test]
    fn plan_fires_due_and_nothing_early() {
        let now = utc(2025, 1, 6, 0, 0);
        let (_dir, store) = open_temp();
        let record = store
            .add_schedule(&new_schedule("nightly", "0 2 * * *", 0), now)
            .unwrap();
        assert_eq!(record.next_run_ms, Some(utc(2025, 1, 6, 2, 0)));
        assert!(plan(utc(2025, 1, 6, 1, 59), std::slice::from_ref(&record), &[]).is_empty());
        let planned = plan(utc(2025, 1, 6, 2, 0), std::slice::from_ref(&record), &[]);
        assert_eq!(
            planned,
            vec![PlannedRun {
                schedule: "nightly".into(),
                scheduled_for_ms: utc(2025, 1, 6, 2, 0),
                attempt: 0,
                action: RunAction::Fire,
                note: "cron".into(),
                next_run_ms: Some(utc(2025, 1, 7, 2, 0)),
            }]
        );
        assert_eq!(
            planned[0].idempotency_key(),
            format!("schedule:nightly:{}:0", utc(2025, 1, 6, 2, 0))
        );
        // Paused schedules do nothing.
        let paused = ScheduleRecord {
            paused: true,
            ..record
        };
        assert!(plan(utc(2025, 1, 9, 0, 0), &[paused], &[]).is_empty());
    }

    #[tokio::test]
    async fn a_simulated_week_fires_exactly_the_expected_jobs() {
        let start = utc(2025, 1, 6, 0, 0); // a Monday
        let (_dir, store) = open_temp();
        let clock = TestClock::new(start);
        store
            .add_schedule(&new_schedule("nightly", "0 2 * * *", 0), start)
            .unwrap();
        store
            .add_schedule(&new_schedule("weekday", "30 9 * * MON-FRI", 0), start)
            .unwrap();
        let (submit, keys) = fake_submit(&store, &clock, Ending::Succeed);
        let mut fired = 0;
        while clock.now_ms() < start + 7 * DAY {
            let summary = tick(&store, clock.now_ms(), &submit).await.unwrap();
            fired += summary.fired.len();
            assert!(summary.retried.is_empty() && summary.skipped == 0);
            clock.advance(5 * MIN);
        }
        assert_eq!(fired, 12);
        assert_eq!(store.list(100).unwrap().len(), 12);

        let nightly: Vec<(i64, u32, Option<JobState>)> = store
            .runs("nightly", 0)
            .unwrap()
            .iter()
            .map(|r| (r.scheduled_for_ms, r.attempt, r.job_state))
            .collect();
        let want: Vec<_> = (0..7)
            .map(|d| {
                (
                    utc(2025, 1, 6, 2, 0) + d * DAY,
                    0,
                    Some(JobState::Succeeded),
                )
            })
            .collect();
        assert_eq!(nightly, want);
        let weekday: Vec<i64> = store
            .runs("weekday", 0)
            .unwrap()
            .iter()
            .map(|r| r.scheduled_for_ms)
            .collect();
        assert_eq!(
            weekday,
            (0..5)
                .map(|d| utc(2025, 1, 6, 9, 30) + d * DAY)
                .collect::<Vec<_>>()
        );
        // Each run was submitted once, under its key.
        let keys = keys.lock().unwrap().clone();
        assert_eq!(keys.len(), 12);
        assert!(keys.contains(&format!("schedule:nightly:{}:0", utc(2025, 1, 12, 2, 0))));
        let runs = store.runs("nightly", 0).unwrap();
        assert!(runs.iter().all(|r| r.intersection.is_some()));
        let record = store.get_schedule("nightly").unwrap().unwrap();
        assert_eq!(record.last_fired_ms, Some(utc(2025, 1, 12, 2, 0)));
        assert_eq!(record.next_run_ms, Some(utc(2025, 1, 13, 2, 0)));
    }

    #[tokio::test]
    async fn catch_up_after_downtime_fires_the_latest_once_and_records_skips() {
        let start = utc(2025, 1, 6, 0, 0);
        let (_dir, store) = open_temp();
        let clock = TestClock::new(start);
        store
            .add_schedule(&new_schedule("hourly", "0 * * * *", 0), start)
            .unwrap();
        let (submit, _) = fake_submit(&store, &clock, Ending::Succeed);
        clock.set(utc(2025, 1, 6, 1, 0));
        assert_eq!(
            tick(&store, clock.now_ms(), &submit)
                .await
                .unwrap()
                .fired
                .len(),
            1
        );
        // Down from 01:00 to 05:30: 02:00, 03:00, 04:00 and 05:00 were missed.
        clock.set(utc(2025, 1, 6, 5, 30));
        let summary = tick(&store, clock.now_ms(), &submit).await.unwrap();
        assert_eq!(summary.fired.len(), 1);
        assert_eq!(summary.skipped, 3);
        // The next tick has nothing to do; 06:00 fires normally.
        clock.set(utc(2025, 1, 6, 5, 31));
        assert_eq!(
            tick(&store, clock.now_ms(), &submit).await.unwrap(),
            TickSummary::default()
        );
        clock.set(utc(2025, 1, 6, 6, 0));
        assert_eq!(
            tick(&store, clock.now_ms(), &submit)
                .await
                .unwrap()
                .fired
                .len(),
            1
        );

        let runs: Vec<(i64, RunStatus)> = store
            .runs("hourly", 0)
            .unwrap()
            .iter()
            .map(|r| (r.scheduled_for_ms, r.status))
            .collect();
        assert_eq!(
            runs,
            vec![
                (utc(2025, 1, 6, 1, 0), RunStatus::Submitted),
                (utc(2025, 1, 6, 2, 0), RunStatus::Skipped),
                (utc(2025, 1, 6, 3, 0), RunStatus::Skipped),
                (utc(2025, 1, 6, 4, 0), RunStatus::Skipped),
                (utc(2025, 1, 6, 5, 0), RunStatus::Submitted),
                (utc(2025, 1, 6, 6, 0), RunStatus::Submitted),
            ]
        );
        let caught_up = &store.runs("hourly", utc(2025, 1, 6, 5, 0)).unwrap()[0];
        assert!(
            caught_up.note.contains("3 earlier missed"),
            "{}",
            caught_up.note
        );
        assert_eq!(store.list(100).unwrap().len(), 3);
    }

    #[tokio::test]
    async fn vetoed_runs_are_retried_with_backoff_then_given_up() {
        let start = utc(2025, 1, 6, 0, 0);
        let (_dir, store) = open_temp();
        let clock = TestClock::new(start);
        store
            .add_schedule(&new_schedule("nightly", "0 2 * * *", 2), start)
            .unwrap();
        let (submit, keys) = fake_submit(&store, &clock, Ending::Veto);
        let t = utc(2025, 1, 6, 2, 0);
        let at = |offset_ms: i64| {
            clock.set(t + offset_ms);
            clock.now_ms()
        };
        // Attempt 0 at 02:00, vetoed at once.
        let s = tick(&store, at(0), &submit).await.unwrap();
        assert_eq!((s.fired.len(), s.retried.len()), (1, 0));
        // Retry 1 after 60 s × 2^0.
        assert!(
            tick(&store, at(59_999), &submit)
                .await
                .unwrap()
                .retried
                .is_empty()
        );
        assert_eq!(
            tick(&store, at(60_000), &submit)
                .await
                .unwrap()
                .retried
                .len(),
            1
        );
        // Retry 2 after a further 60 s × 2^1 (from the end of attempt 1).
        assert!(
            tick(&store, at(60_000 + 119_999), &submit)
                .await
                .unwrap()
                .retried
                .is_empty()
        );
        assert_eq!(
            tick(&store, at(180_000), &submit)
                .await
                .unwrap()
                .retried
                .len(),
            1
        );
        // max_retries = 2: no more, however long we wait (before the next occurrence).
        for offset in [240_000, HOUR, 20 * HOUR] {
            assert_eq!(
                tick(&store, at(offset), &submit).await.unwrap(),
                TickSummary::default()
            );
        }
        let runs = store.runs("nightly", 0).unwrap();
        assert_eq!(
            runs.iter().map(|r| r.attempt).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(runs.iter().all(|r| r.scheduled_for_ms == t
            && r.job_state == Some(JobState::Vetoed)
            && r.job_reason.contains("purpose not allowed")));
        assert!(
            runs[2]
                .note
                .starts_with("retry 2 of 2 after attempt 1 was vetoed"),
            "{}",
            runs[2].note
        );
        assert_eq!(
            keys.lock().unwrap().clone(),
            (0..3)
                .map(|a| format!("schedule:nightly:{t}:{a}"))
                .collect::<Vec<_>>()
        );
        // The next night starts afresh at attempt 0.
        let s = tick(&store, at(DAY), &submit).await.unwrap();
        assert_eq!(s.fired.len(), 1);
        assert_eq!(backoff_ms(60, 3), 480_000);
        assert_eq!(backoff_ms(u32::MAX, 60), i64::MAX);
    }

    #[tokio::test]
    async fn a_restarted_scheduler_does_not_fire_twice() {
        let start = utc(2025, 1, 6, 0, 0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.sqlite");
        let clock = TestClock::new(start);
        {
            let store = Arc::new(JobStore::open(&path).unwrap());
            store
                .add_schedule(&new_schedule("nightly", "0 2 * * *", 0), start)
                .unwrap();
            store
                .add_schedule(&new_schedule("other", "0 3 * * *", 0), start)
                .unwrap();
            let (submit, _) = fake_submit(&store, &clock, Ending::Succeed);
            clock.set(utc(2025, 1, 6, 2, 0));
            assert_eq!(
                tick(&store, clock.now_ms(), &submit)
                    .await
                    .unwrap()
                    .fired
                    .len(),
                1
            );
            // A crash between submitting and recording: the job exists, the run row does not.
            let key = idempotency_key("other", utc(2025, 1, 6, 3, 0), 0);
            store
                .submit(&spec(), &key, "alice", utc(2025, 1, 6, 3, 0))
                .unwrap();
        }
        let store = Arc::new(JobStore::open(&path).unwrap());
        let (submit, _) = fake_submit(&store, &clock, Ending::Succeed);
        for at in [utc(2025, 1, 6, 2, 0), utc(2025, 1, 6, 2, 30)] {
            clock.set(at);
            assert_eq!(
                tick(&store, at, &submit).await.unwrap(),
                TickSummary::default()
            );
        }
        clock.set(utc(2025, 1, 6, 3, 0));
        let s = tick(&store, clock.now_ms(), &submit).await.unwrap();
        assert_eq!(s.fired.len(), 1);
        // The half-done submission was completed, not repeated: 2 jobs in all.
        assert_eq!(store.list(100).unwrap().len(), 2);
        assert_eq!(store.runs("other", 0).unwrap().len(), 1);
        assert_eq!(store.runs("nightly", 0).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn the_loop_ticks_by_the_clock_and_stops_on_shutdown() {
        let start = utc(2025, 1, 6, 0, 0);
        let (_dir, store) = open_temp();
        let clock = TestClock::new(start);
        store
            .add_schedule(&new_schedule("nightly", "0 2 * * *", 0), start)
            .unwrap();
        let (submit, _) = fake_submit(&store, &clock, Ending::Succeed);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shared_clock: Arc<dyn Clock> = Arc::new(clock.clone());
        let scheduler = run_scheduler_every(
            shared_clock,
            &store,
            submit,
            async {
                let _ = stopped.await;
            },
            Duration::from_millis(2),
        );
        let driver = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(store.runs("nightly", 0).unwrap().is_empty());
            clock.set(utc(2025, 1, 6, 2, 0) + 500);
            for _ in 0..1000 {
                if !store.runs("nightly", 0).unwrap().is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // Let it tick a few more times: still one run.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = stop.send(());
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(scheduler, driver)
        })
        .await
        .unwrap();
        assert_eq!(store.runs("nightly", 0).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn pause_resume_run_now_and_refused_submissions() {
        let start = utc(2025, 1, 6, 0, 0);
        let (_dir, store) = open_temp();
        let clock = TestClock::new(start);
        store
            .add_schedule(&new_schedule("nightly", "0 2 * * *", 3), start)
            .unwrap();
        let (submit, _) = fake_submit(&store, &clock, Ending::Succeed);
        assert!(store.pause_schedule("nightly").unwrap().paused);
        clock.set(utc(2025, 1, 8, 12, 0));
        assert_eq!(
            tick(&store, clock.now_ms(), &submit).await.unwrap(),
            TickSummary::default()
        );
        // Run-now works while paused.
        let now = run_now(&store, "nightly", clock.now_ms(), &submit)
            .await
            .unwrap();
        assert_eq!(now.scheduled_for_ms, utc(2025, 1, 8, 12, 0));
        let runs = store.runs("nightly", 0).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].note, "run-now");
        assert_eq!(runs[0].job_id.as_deref(), Some(now.job_id.as_str()));
        // Resume: the paused occurrences are not caught up.
        let resumed = store.resume_schedule("nightly", clock.now_ms()).unwrap();
        assert_eq!(resumed.next_run_ms, Some(utc(2025, 1, 9, 2, 0)));
        assert_eq!(
            tick(&store, clock.now_ms(), &submit).await.unwrap(),
            TickSummary::default()
        );
        // A refused submission is recorded with its reason and the schedule moves on.
        let refuse = |_job: ScheduledJob| {
            std::future::ready(Err::<String, String>("node 'acme' is unknown".into()))
        };
        clock.set(utc(2025, 1, 9, 2, 0));
        let s = tick(&store, clock.now_ms(), &refuse).await.unwrap();
        assert_eq!(s.refused, 1);
        let last = store.runs("nightly", utc(2025, 1, 9, 0, 0)).unwrap();
        assert_eq!(last[0].status, RunStatus::NotSubmitted);
        assert_eq!(last[0].note, "node 'acme' is unknown");
        clock.set(utc(2025, 1, 9, 3, 0));
        assert_eq!(
            tick(&store, clock.now_ms(), &submit).await.unwrap(),
            TickSummary::default()
        );
        assert!(matches!(
            run_now(&store, "nope", 0, &submit).await,
            Err(ScheduleError::Store(StoreError::UnknownSchedule(_)))
        ));
    }
}
