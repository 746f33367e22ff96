//! Announcing ended runs: the run's JSON in the schedule's notify directory and its `--on-done`
//! command, at most once each; and the checks of both when a schedule is added.

use std::time::Duration;

use cleanroom_proto::v1::{JobInfo, JobState};

use crate::store::{EndedRun, JobStore, ScheduleNotify, StoreError, releases_nothing, state_name};

/// The environment variable that lets analysts give schedules an `--on-done` command: the
/// coordinator runs it on its own host, so the operator must opt in (`1`).
pub const ALLOW_ON_DONE_ENV: &str = "CLEANROOM_ALLOW_ON_DONE";

/// Longest `--on-done` command or `--notify-dir` path accepted.
const MAX_NOTIFY_LEN: usize = 4096;

/// Checks a schedule's notifications: the command only if the operator allows commands
/// ([`ALLOW_ON_DONE_ENV`]), the directory an absolute path.
pub fn check_notify(notify: &ScheduleNotify) -> Result<(), String> {
    if notify.on_done.len() > MAX_NOTIFY_LEN || notify.notify_dir.len() > MAX_NOTIFY_LEN {
        return Err(format!(
            "--on-done and --notify-dir are limited to {MAX_NOTIFY_LEN} bytes"
        ));
    }
    if notify.on_done.contains('\0') || notify.notify_dir.contains('\0') {
        return Err("--on-done and --notify-dir may not contain NUL".into());
    }
    if !notify.on_done.is_empty() && std::env::var(ALLOW_ON_DONE_ENV).as_deref() != Ok("1") {
        return Err(format!(
            "this coordinator does not run --on-done commands (they run on its host); its operator can allow them with {ALLOW_ON_DONE_ENV}=1, or use --notify-dir"
        ));
    }
    if !notify.notify_dir.is_empty() && !std::path::Path::new(&notify.notify_dir).is_absolute() {
        return Err(format!(
            "--notify-dir must be an absolute path on the coordinator's host, not '{}'",
            notify.notify_dir
        ));
    }
    Ok(())
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
        .filter(|o| !releases_nothing(o))
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
    if std::env::var(ALLOW_ON_DONE_ENV).as_deref() != Ok("1") {
        tracing::warn!(schedule = %run.schedule, job_id = %job.job_id, "on-done command not run: this coordinator no longer allows them ({}=1)", ALLOW_ON_DONE_ENV);
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
