//! Announcing ended runs: the run's JSON in the schedule's notify directory and its `--on-done`
//! command, at most once each; and the checks of both when a schedule is added.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cleanroom_proto::v1::{JobInfo, JobState};

use crate::config::CoordinatorConfig;
pub use crate::config::is_plain_absolute;
use crate::store::{EndedRun, JobStore, ScheduleNotify, StoreError, releases_nothing, state_name};

/// Longest `--on-done` program path or `--notify-dir` path accepted.
const MAX_NOTIFY_LEN: usize = 4096;

/// Where the operator lets schedules write and run things on the coordinator's host
/// (`notify_dirs` and `on_done_dirs` in its config). Empty lists allow nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Confinement {
    /// A `--notify-dir` must be one of these or inside one.
    pub notify_dirs: Vec<PathBuf>,
    /// An `--on-done` program must be inside one of these.
    pub on_done_dirs: Vec<PathBuf>,
}

impl Confinement {
    /// The confinement the coordinator's config sets.
    pub fn from_config(cfg: &CoordinatorConfig) -> Confinement {
        Confinement {
            notify_dirs: cfg.notify_dirs.clone(),
            on_done_dirs: cfg.on_done_dirs.clone(),
        }
    }
}

fn listed(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `path`, with symbolic links resolved as far as it exists, is inside one of `dirs`
/// (resolved too). Catches a link inside an allowed directory that points out of it.
fn resolved_inside(path: &Path, dirs: &[PathBuf]) -> bool {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    let real = loop {
        match existing.canonicalize() {
            Ok(real) => break real,
            Err(_) => match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_owned());
                    existing = parent.to_path_buf();
                }
                _ => return false,
            },
        }
    };
    let real = rest.iter().rev().fold(real, |p, n| p.join(n));
    dirs.iter().any(|d| {
        let d = d.canonicalize().unwrap_or_else(|_| d.clone());
        real.starts_with(&d)
    })
}

/// Checks a schedule's notifications against the operator's [`Confinement`]: `--notify-dir` an
/// absolute path inside a listed notify directory; `--on-done` the absolute path of a program
/// inside a listed on-done directory (it is run directly, with no shell and no arguments).
pub fn check_notify(notify: &ScheduleNotify, confinement: &Confinement) -> Result<(), String> {
    if notify.on_done.len() > MAX_NOTIFY_LEN || notify.notify_dir.len() > MAX_NOTIFY_LEN {
        return Err(format!(
            "--on-done and --notify-dir are limited to {MAX_NOTIFY_LEN} bytes"
        ));
    }
    if notify.on_done.contains('\0') || notify.notify_dir.contains('\0') {
        return Err("--on-done and --notify-dir may not contain NUL".into());
    }
    if !notify.notify_dir.is_empty() {
        let dir = Path::new(&notify.notify_dir);
        if !is_plain_absolute(dir) {
            return Err(format!(
                "--notify-dir must be an absolute path on the coordinator's host without '..', \
                 not '{}'",
                notify.notify_dir
            ));
        }
        if confinement.notify_dirs.is_empty() {
            return Err(
                "this coordinator writes no --notify-dir files: its operator lists the \
                 directories schedules may use in `notify_dirs`"
                    .into(),
            );
        }
        if !confinement.notify_dirs.iter().any(|d| dir.starts_with(d))
            || !resolved_inside(dir, &confinement.notify_dirs)
        {
            return Err(format!(
                "--notify-dir '{}' is outside the directories this coordinator's operator allows: {}",
                notify.notify_dir,
                listed(&confinement.notify_dirs)
            ));
        }
    }
    if !notify.on_done.is_empty() {
        let program = Path::new(&notify.on_done);
        if !is_plain_absolute(program) {
            return Err(format!(
                "--on-done must be the absolute path of a program on the coordinator's host, \
                 without '..' (it is run directly, without a shell or arguments), not '{}'",
                notify.on_done
            ));
        }
        if confinement.on_done_dirs.is_empty() {
            return Err(
                "this coordinator runs no --on-done programs (they run on its host): its \
                 operator lists the directories they may come from in `on_done_dirs`; or use \
                 --notify-dir"
                    .into(),
            );
        }
        if !confinement
            .on_done_dirs
            .iter()
            .any(|d| program.starts_with(d))
            || !resolved_inside(program, &confinement.on_done_dirs)
        {
            return Err(format!(
                "--on-done '{}' is outside the directories this coordinator's operator allows: {}",
                notify.on_done,
                listed(&confinement.on_done_dirs)
            ));
        }
        if !program.is_file() {
            return Err(format!(
                "--on-done '{}' is not a file on the coordinator's host",
                notify.on_done
            ));
        }
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
pub fn notify_ended(
    store: &JobStore,
    confinement: &Confinement,
    now_ms: i64,
) -> Result<usize, StoreError> {
    let mut count = 0;
    for run in store.ended_unnotified_runs()? {
        if !store.mark_notified(run.run_id, now_ms)? {
            continue;
        }
        let Some(job) = store.get(&run.job_id)? else {
            continue;
        };
        count += 1;
        tokio::spawn(announce(run, job, confinement.clone()));
    }
    Ok(count)
}

/// Writes the run's JSON into the notify directory and runs the command, as configured.
async fn announce(run: EndedRun, job: JobInfo, confinement: Confinement) {
    let json = run_json(&run, &job);
    // Checked again: the operator may have narrowed the lists since the schedule was added, and
    // a link may have appeared.
    if let Err(e) = check_notify(&run.notify, &confinement) {
        tracing::warn!(schedule = %run.schedule, job_id = %job.job_id, reason = %e, "run not notified");
        return;
    }
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

/// Runs the `--on-done` program directly (no shell, no arguments), with the run's facts in the
/// environment only: CLEANROOM_SCHEDULE, CLEANROOM_JOB_ID, CLEANROOM_STATE, CLEANROOM_RESULT
/// (the released count; empty if none), CLEANROOM_REASON, CLEANROOM_RUN_JSON.
async fn run_on_done(run: &EndedRun, job: &JobInfo, json: &serde_json::Value) {
    let (result, _) = released(job);
    let mut cmd = tokio::process::Command::new(&run.notify.on_done);
    cmd.env("CLEANROOM_SCHEDULE", &run.schedule)
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
