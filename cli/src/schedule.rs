//! `cleanroom schedule …` and `cleanroom job retry`: recurring jobs and retries, through the
//! analyst API.

use std::process::ExitCode;

use anyhow::bail;
use clap::Parser;
use cleanroom_coordinator::AnalystClient;
use cleanroom_proto::v1::{AddSchedule, JobInfo};

use crate::analyst::{connect, exit_for, wait};
use crate::args::{ConnArgs, ScheduleAddArgs, ScheduleCommand, ScheduledJobWords, WaitArgs};
use crate::output;
use crate::submit::spec_from_args;

/// Waits for `job` when `then` asks to (with a spinner on a terminal), prints it, and gives the
/// exit code its state means.
async fn then_print(
    client: &AnalystClient,
    job: JobInfo,
    then: &WaitArgs,
) -> anyhow::Result<ExitCode> {
    let job = if then.wait {
        let waiting = format!("job {} submitted; waiting for it to finish", job.job_id);
        wait(client, &job.job_id, then.timeout, waiting).await?
    } else {
        job
    };
    output::print_job(&job, then.format);
    Ok(exit_for(job.state))
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
    let spec = spec_from_args(&words.submit)?;
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
        ScheduleCommand::RunNow { name, then } => {
            let job = client.run_schedule_now(&name).await?;
            then_print(&client, job, &then).await?
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
    then: &WaitArgs,
) -> anyhow::Result<ExitCode> {
    let client = connect(&conn).await?;
    let job = client.retry(job_id, idempotency_key).await?;
    let code = then_print(&client, job, then).await?;
    client.close().await;
    Ok(code)
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
