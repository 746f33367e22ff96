//! `cleanroom job …` and `cleanroom nodes`: the analyst's commands.

use std::process::ExitCode;

use anyhow::bail;

use crate::analyst::{connect, exit_for, wait};
use crate::args::{ConnArgs, Format, JobCommand, KindArg};
use crate::output;
use crate::submit::spec_from_args;

/// Runs a `job` subcommand.
pub async fn run(conn: ConnArgs, command: JobCommand) -> anyhow::Result<ExitCode> {
    match command {
        JobCommand::Submit(args) if args.kind == KindArg::OverlapMatrix => {
            crate::matrix::run(&conn, &args).await
        }
        JobCommand::Submit(args) => {
            let Some(format) = args.format.for_job() else {
                bail!("--format html is for overlap-matrix; a job prints as table, json or csv");
            };
            if args.out.is_some() {
                bail!("--out is for overlap-matrix; a job prints to standard output");
            }
            let spec = spec_from_args(&args)?;
            let client = connect(&conn).await?;
            let job = client.submit(spec, &args.idempotency_key).await?;
            let job = if args.wait {
                let waiting = format!("job {} submitted; waiting for it to finish", job.job_id);
                wait(&client, &job.job_id, args.timeout, waiting).await?
            } else {
                job
            };
            if !crate::aggregate_output::print_result(&client, &job, format, 0, None).await? {
                output::print_job(&job, format);
            }
            client.close().await;
            Ok(exit_for(job.state))
        }
        JobCommand::Status { job_id, format } => {
            let client = connect(&conn).await?;
            let job = client.get(&job_id).await?;
            output::print_job(&job, format);
            client.close().await;
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Result {
            job_id,
            format,
            timeout,
            offset,
            limit,
        } => {
            let client = connect(&conn).await?;
            let job = wait(
                &client,
                &job_id,
                timeout,
                format!("waiting for job {job_id}"),
            )
            .await?;
            if !crate::aggregate_output::print_result(&client, &job, format, offset, limit).await? {
                output::print_job(&job, format);
            }
            client.close().await;
            Ok(exit_for(job.state))
        }
        JobCommand::List { limit, format } => {
            let client = connect(&conn).await?;
            let jobs = client.list(limit).await?;
            output::print_jobs(&jobs, format);
            client.close().await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `cleanroom nodes`.
pub async fn nodes(conn: ConnArgs, format: Format) -> anyhow::Result<ExitCode> {
    let client = connect(&conn).await?;
    let nodes = client.nodes().await?;
    output::print_nodes(&nodes, format);
    client.close().await;
    Ok(ExitCode::SUCCESS)
}
