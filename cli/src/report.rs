//! `cleanroom report NAME --format html|csv|json [--since 90d] [--out FILE]`: the coordinator
//! sends the report's data as JSON; the page or the CSV is rendered here.

use std::process::ExitCode;

use anyhow::Context;
use cleanroom_coordinator::report::{ScheduleReport, render_json};

use crate::analyst::connect;
use crate::args::{ConnArgs, ReportArgs, ReportFormat};
use crate::render::report::{render_csv, render_html};
use crate::schedule::since_ms;

/// Runs `cleanroom report`.
pub async fn run(conn: ConnArgs, args: ReportArgs) -> anyhow::Result<ExitCode> {
    let since_ms = since_ms(args.since.as_deref())?;
    let client = connect(&conn).await?;
    let json = client.report(&args.name, since_ms).await?;
    client.close().await;
    let report = ScheduleReport::from_json(&json)
        .context("the coordinator sent a report that does not parse")?;
    let text = match args.format {
        ReportFormat::Html => render_html(&report),
        ReportFormat::Csv => render_csv(&report),
        ReportFormat::Json => render_json(&report),
    };
    match &args.out {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "report of schedule '{}' ({} runs) written to {}",
                report.schedule,
                report.runs.len(),
                path.display()
            );
        }
        None => cleanroom_node::out!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}
