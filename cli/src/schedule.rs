//! `cleanroom schedule …` and `cleanroom job retry`: recurring jobs and retries, through the
//! analyst API.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use cleanroom_coordinator::AnalystClient;
use cleanroom_coordinator::client::state_name;
use cleanroom_proto::v1::{AddSchedule, JobInfo, JobState};
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::{ConnArgs, Format, ScheduleAddArgs, ScheduleCommand, ScheduledJobWords};
use crate::{job, output};

/// Connects with the analyst's certificate (as every analyst command does).
pub async fn connect(conn: &ConnArgs) -> anyhow::Result<AnalystClient> {
    job::connect(conn).await
}

/// Exit code for a job: 0 if it succeeded or is still under way, 2 if vetoed, 1 otherwise.
fn exit_for(state: i32) -> ExitCode {
    match JobState::try_from(state) {
        Ok(JobState::Succeeded) => ExitCode::SUCCESS,
        Ok(JobState::Vetoed) => ExitCode::from(2),
        Ok(JobState::Pending | JobState::Offered | JobState::Running) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

/// Waits for `job` if asked to, with a spinner on a terminal.
async fn maybe_wait(
    client: &AnalystClient,
    job: JobInfo,
    wait: bool,
    timeout: u64,
) -> anyhow::Result<JobInfo> {
    if !wait {
        return Ok(job);
    }
    let progress = if std::io::stderr().is_terminal() {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    progress.set_message(format!(
        "job {} submitted; waiting for it to finish",
        job.job_id
    ));
    progress.enable_steady_tick(Duration::from_millis(100));
    let done = client
        .wait(&job.job_id, Duration::from_secs(timeout), |info| {
            progress.set_message(format!("job {} is {}", info.job_id, state_name(info.state)));
        })
        .await;
    progress.finish_and_clear();
    Ok(done?)
}

/// The AddSchedule request of `schedule add`.
pub fn add_request(args: &ScheduleAddArgs) -> anyhow::Result<AddSchedule> {
    let words = ScheduledJobWords::try_parse_from(
        std::iter::once("schedule add NAME --cron CRON --".to_owned()).chain(args.job.clone()),
    )
    .map_err(|e| anyhow::anyhow!("the job of the schedule: {e}"))?;
    if words.submit.wait || !words.submit.idempotency_key.is_empty() {
        bail!(
            "--wait and --idempotency-key do not apply to a schedule's job (each run gets its own key); give connection and output flags before `--`"
        );
    }
    let spec = job::spec_from_args(&words.submit)?;
    Ok(AddSchedule {
        name: args.name.clone(),
        cron: args.cron.clone(),
        timezone: args.timezone.clone(),
        spec: Some(spec),
        max_retries: args.max_retries,
        backoff_base_secs: args.backoff,
        on_done: args.on_done.clone().unwrap_or_default(),
        notify_dir: args.notify_dir.clone().unwrap_or_default(),
    })
}

/// Runs a `schedule` subcommand.
pub async fn run(conn: ConnArgs, command: ScheduleCommand) -> anyhow::Result<ExitCode> {
    if let ScheduleCommand::Add(args) = &command {
        // Check the job words before connecting.
        add_request(args)?;
    }
    let client = connect(&conn).await?;
    let code = match command {
        ScheduleCommand::Add(args) => {
            let info = client.add_schedule(add_request(&args)?).await?;
            output::print_schedule(&info, args.format);
            ExitCode::SUCCESS
        }
        ScheduleCommand::List { format } => {
            let list = client.list_schedules().await?;
            output::print_schedules(&list, format);
            ExitCode::SUCCESS
        }
        ScheduleCommand::Show {
            name,
            since,
            format,
        } => {
            let since_ms = since_ms(since.as_deref())?;
            let info = client.show_schedule(&name, since_ms).await?;
            output::print_schedule(&info, format);
            ExitCode::SUCCESS
        }
        ScheduleCommand::Pause { name, format } => {
            output::print_schedule(&client.pause_schedule(&name).await?, format);
            ExitCode::SUCCESS
        }
        ScheduleCommand::Resume { name, format } => {
            output::print_schedule(&client.resume_schedule(&name).await?, format);
            ExitCode::SUCCESS
        }
        ScheduleCommand::Remove { name, format } => {
            output::print_schedule(&client.remove_schedule(&name).await?, format);
            ExitCode::SUCCESS
        }
        ScheduleCommand::RunNow {
            name,
            wait,
            timeout,
            format,
        } => {
            let job = client.run_schedule_now(&name).await?;
            let job = maybe_wait(&client, job, wait, timeout).await?;
            output::print_job(&job, format);
            exit_for(job.state)
        }
    };
    client.close().await;
    Ok(code)
}

/// `cleanroom job retry`.
pub async fn retry(
    conn: ConnArgs,
    job_id: &str,
    idempotency_key: &str,
    wait: bool,
    timeout: u64,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let client = connect(&conn).await?;
    let job = client.retry(job_id, idempotency_key).await?;
    let job = maybe_wait(&client, job, wait, timeout).await?;
    output::print_job(&job, format);
    client.close().await;
    Ok(exit_for(job.state))
}

/// The start of a `--since` window, Unix ms (0 without one).
pub fn since_ms(since: Option<&str>) -> anyhow::Result<i64> {
    match since {
        None => Ok(0),
        Some(text) => {
            let window = cleanroom_coordinator::report::parse_since(text)
                .map_err(|e| anyhow::anyhow!("--since: {e}"))?;
            Ok(cleanroom_coordinator::now_ms()
                .saturating_sub(window)
                .max(0))
        }
    }
}
