//! The planner and the scheduler loop against a real store and a test clock.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cleanroom_proto::v1::{JobSpec, JobState, PsiOutcome};
use jiff::civil::DateTime;
use tempfile::TempDir;

use super::*;
use crate::clock::{Clock, TestClock};
use crate::store::{JobStore, NewSchedule, RunStatus, ScheduleRecord, StoreError};

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
    crate::test_support::overlap_job("overlap-reporting")
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

/// Adds `schedules` (name, cron, max_retries) to `store` at `at`.
fn add_schedules(store: &JobStore, at: i64, schedules: &[(&str, &str, u32)]) {
    for &(name, cron, max_retries) in schedules {
        store
            .add_schedule(&new_schedule(name, cron, max_retries), at)
            .unwrap();
    }
}

/// A temporary store holding `schedules` added at `start`, and a test clock set to `start`.
fn scheduled(start: i64, schedules: &[(&str, &str, u32)]) -> (TempDir, Arc<JobStore>, TestClock) {
    let (dir, store) = open_temp();
    add_schedules(&store, start, schedules);
    (dir, store, TestClock::new(start))
}

/// One tick at the clock's time.
async fn tick_now(store: &JobStore, clock: &TestClock, submit: &impl Submit) -> TickSummary {
    tick(store, clock.now_ms(), submit).await.unwrap()
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
    let (_dir, store, clock) = scheduled(
        start,
        &[
            ("nightly", "0 2 * * *", 0),
            ("weekday", "30 9 * * MON-FRI", 0),
        ],
    );
    let (submit, keys) = fake_submit(&store, &clock, Ending::Succeed);
    let mut fired = 0;
    while clock.now_ms() < start + 7 * DAY {
        let summary = tick_now(&store, &clock, &submit).await;
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
    let (_dir, store, clock) = scheduled(start, &[("hourly", "0 * * * *", 0)]);
    let (submit, _) = fake_submit(&store, &clock, Ending::Succeed);
    clock.set(utc(2025, 1, 6, 1, 0));
    assert_eq!(tick_now(&store, &clock, &submit).await.fired.len(), 1);
    // Down from 01:00 to 05:30: 02:00, 03:00, 04:00 and 05:00 were missed.
    clock.set(utc(2025, 1, 6, 5, 30));
    let summary = tick_now(&store, &clock, &submit).await;
    assert_eq!(summary.fired.len(), 1);
    assert_eq!(summary.skipped, 3);
    // The next tick has nothing to do; 06:00 fires normally.
    clock.set(utc(2025, 1, 6, 5, 31));
    assert_eq!(
        tick_now(&store, &clock, &submit).await,
        TickSummary::default()
    );
    clock.set(utc(2025, 1, 6, 6, 0));
    assert_eq!(tick_now(&store, &clock, &submit).await.fired.len(), 1);

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
    let (_dir, store, clock) = scheduled(start, &[("nightly", "0 2 * * *", 2)]);
    let (submit, keys) = fake_submit(&store, &clock, Ending::Veto);
    let t = utc(2025, 1, 6, 2, 0);
    let at = |offset_ms: i64| {
        clock.set(t + offset_ms);
        clock.now_ms()
    };
    // Attempt 0 at 02:00, vetoed at once.
    let s = tick(&store, at(0), &submit).await.unwrap();
    assert_eq!((s.fired.len(), s.retried.len()), (1, 0));
    // Retry 1 after 60 s × 2^0; retry 2 after a further 60 s × 2^1 (from the end of attempt 1).
    for (offset, retried) in [
        (59_999, 0),
        (60_000, 1),
        (60_000 + 119_999, 0),
        (180_000, 1),
    ] {
        let s = tick(&store, at(offset), &submit).await.unwrap();
        assert_eq!(s.retried.len(), retried, "at +{offset} ms");
    }
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
        add_schedules(
            &store,
            start,
            &[("nightly", "0 2 * * *", 0), ("other", "0 3 * * *", 0)],
        );
        let (submit, _) = fake_submit(&store, &clock, Ending::Succeed);
        clock.set(utc(2025, 1, 6, 2, 0));
        assert_eq!(tick_now(&store, &clock, &submit).await.fired.len(), 1);
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
    let s = tick_now(&store, &clock, &submit).await;
    assert_eq!(s.fired.len(), 1);
    // The half-done submission was completed, not repeated: 2 jobs in all.
    assert_eq!(store.list(100).unwrap().len(), 2);
    assert_eq!(store.runs("other", 0).unwrap().len(), 1);
    assert_eq!(store.runs("nightly", 0).unwrap().len(), 1);
}

#[tokio::test]
async fn the_loop_ticks_by_the_clock_and_stops_on_shutdown() {
    let start = utc(2025, 1, 6, 0, 0);
    let (_dir, store, clock) = scheduled(start, &[("nightly", "0 2 * * *", 0)]);
    let (submit, _) = fake_submit(&store, &clock, Ending::Succeed);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shared_clock: Arc<dyn Clock> = Arc::new(clock.clone());
    let confinement = super::Confinement::default();
    let scheduler = run_scheduler_every(
        shared_clock,
        &store,
        &confinement,
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
    let (_dir, store, clock) = scheduled(start, &[("nightly", "0 2 * * *", 3)]);
    let (submit, _) = fake_submit(&store, &clock, Ending::Succeed);
    assert!(store.pause_schedule("nightly").unwrap().paused);
    clock.set(utc(2025, 1, 8, 12, 0));
    assert_eq!(
        tick_now(&store, &clock, &submit).await,
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
        tick_now(&store, &clock, &submit).await,
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
        tick_now(&store, &clock, &submit).await,
        TickSummary::default()
    );
    assert!(matches!(
        run_now(&store, "nope", 0, &submit).await,
        Err(ScheduleError::Store(StoreError::UnknownSchedule(_)))
    ));
}
