//! `cleanroom job submit overlap-matrix --parties a,b,c …`: the overlaps of every pair of N
//! partners, as a matrix.
//!
//! A composition on the analyst's side: one ordinary overlap job per pair (N(N−1)/2 of them,
//! the partner listed first as initiator) is submitted through the analyst API, each decided by
//! the two nodes' agreements as usual; then all are awaited and the matrix is built:
//! succeeded → the released count; vetoed → `forbidden` (with the node's reason); succeeded but
//! withheld by an agreement (`suppressed`) → `suppressed`; failed or cancelled → `failed` (with
//! the reason). Rendered as a table, JSON, CSV or an HTML page
//! ([`crate::render::matrix::render_matrix_html`]).
//!
//! With `--idempotency-key K`, pair (a, b) is submitted with the key `K:a,b`, so running the
//! same command again gives the same jobs.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cleanroom_coordinator::client::state_name;
use cleanroom_proto::v1::{JobInfo, JobState};
use serde_json::{Value, json};

use crate::analyst::connect;
use crate::args::{ConnArgs, KindArg, SubmitArgs, SubmitFormat};
use crate::render::matrix::{MatrixCell, OverlapMatrix, render_matrix_html};
use crate::submit::spec_for_pair;
use crate::text::csv_text;

/// One pair of the matrix and what became of its job.
#[derive(Debug, Clone)]
pub struct PairResult {
    /// Row (initiator) and column party indices, `i < j`.
    pub i: usize,
    /// See `i`.
    pub j: usize,
    /// The job, if it was submitted.
    pub job_id: Option<String>,
    /// The job's final state name, or `not-submitted` / `unfinished`.
    pub state: String,
    /// The cell.
    pub cell: MatrixCell,
}

/// The cell of a finished overlap job.
pub fn cell_of(job: &JobInfo) -> MatrixCell {
    match JobState::try_from(job.state) {
        Ok(JobState::Succeeded) => {
            let outcomes: Vec<_> = job
                .results
                .iter()
                .filter_map(|r| r.outcome.as_ref())
                .collect();
            if outcomes.iter().any(|o| o.suppressed) {
                MatrixCell::Suppressed
            } else if let Some(o) = outcomes.first() {
                MatrixCell::Value(o.intersection)
            } else {
                MatrixCell::Failed("the job succeeded without a result".into())
            }
        }
        Ok(JobState::Vetoed) => MatrixCell::Forbidden(job.reason.clone()),
        Ok(JobState::Failed | JobState::Cancelled) => {
            MatrixCell::Failed(format!("{}: {}", state_name(job.state), job.reason))
        }
        _ => MatrixCell::Failed(format!("the job is still {}", state_name(job.state))),
    }
}

/// The N×N matrix of `parties` from the pair results (symmetric; the diagonal is empty).
pub fn build_matrix(title: &str, parties: &[String], pairs: &[PairResult]) -> OverlapMatrix {
    let n = parties.len();
    let mut cells = vec![vec![MatrixCell::Empty; n]; n];
    for pair in pairs {
        if pair.i < n && pair.j < n {
            cells[pair.i][pair.j] = pair.cell.clone();
            cells[pair.j][pair.i] = pair.cell.clone();
        }
    }
    OverlapMatrix {
        title: title.to_owned(),
        parties: parties.to_vec(),
        cells,
    }
}

fn cell_text(cell: &MatrixCell) -> String {
    match cell {
        MatrixCell::Value(v) => v.to_string(),
        MatrixCell::Forbidden(_) => "forbidden".into(),
        MatrixCell::Suppressed => "suppressed".into(),
        MatrixCell::Failed(_) => "failed".into(),
        MatrixCell::Empty => "-".into(),
    }
}

fn cell_json(cell: &MatrixCell) -> Value {
    match cell {
        MatrixCell::Value(v) => json!({"status": "value", "value": v}),
        MatrixCell::Forbidden(reason) => json!({"status": "forbidden", "reason": reason}),
        MatrixCell::Suppressed => json!({"status": "suppressed"}),
        MatrixCell::Failed(reason) => json!({"status": "failed", "reason": reason}),
        MatrixCell::Empty => json!({"status": "self"}),
    }
}

/// The matrix as JSON: parties, the N×N cells (`status`: value, forbidden, suppressed, failed
/// or self; `value`; `reason`) and the pairs with their jobs.
pub fn matrix_json(matrix: &OverlapMatrix, pairs: &[PairResult], args: &SubmitArgs) -> Value {
    json!({
        "title": matrix.title,
        "parties": matrix.parties,
        "dataset": args.dataset,
        "on": args.keys(),
        "purpose": args.purpose,
        "cells": matrix.cells.iter().map(|row| row.iter().map(cell_json).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "pairs": pairs.iter().map(|p| {
            let mut v = cell_json(&p.cell);
            v["a"] = json!(matrix.parties[p.i]);
            v["b"] = json!(matrix.parties[p.j]);
            v["job_id"] = json!(p.job_id);
            v["state"] = json!(p.state);
            v
        }).collect::<Vec<_>>(),
    })
}

/// The matrix as CSV: a header row of the parties, then one row per party.
pub fn matrix_csv(matrix: &OverlapMatrix) -> String {
    let mut out = String::from("party");
    for p in &matrix.parties {
        out.push(',');
        out.push_str(&csv_text(p));
    }
    out.push('\n');
    for (i, p) in matrix.parties.iter().enumerate() {
        out.push_str(&csv_text(p));
        for cell in &matrix.cells[i] {
            out.push(',');
            out.push_str(&csv_text(&cell_text(cell)));
        }
        out.push('\n');
    }
    out
}

/// The matrix as aligned columns, then one line per pair that has no value, with the reason.
pub fn matrix_table(matrix: &OverlapMatrix, pairs: &[PairResult]) -> String {
    let mut rows: Vec<Vec<String>> = vec![
        std::iter::once(String::new())
            .chain(matrix.parties.iter().cloned())
            .collect(),
    ];
    for (i, p) in matrix.parties.iter().enumerate() {
        rows.push(
            std::iter::once(p.clone())
                .chain(matrix.cells[i].iter().map(cell_text))
                .collect(),
        );
    }
    let widths: Vec<usize> = (0..=matrix.parties.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (text, w))| {
                if c == 0 {
                    format!("{text:<w$}")
                } else {
                    format!("{text:>w$}")
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    for pair in pairs {
        let why = match &pair.cell {
            MatrixCell::Value(_) | MatrixCell::Empty => continue,
            MatrixCell::Forbidden(reason) => format!("forbidden: {reason}"),
            MatrixCell::Suppressed => "suppressed: an agreement withholds the count".into(),
            MatrixCell::Failed(reason) => format!("failed: {reason}"),
        };
        let job = pair
            .job_id
            .as_deref()
            .map_or(String::new(), |id| format!(" (job {id})"));
        out.push_str(&format!(
            "{} × {}{job}: {why}\n",
            matrix.parties[pair.i], matrix.parties[pair.j]
        ));
    }
    out
}

/// Runs `job submit overlap-matrix`.
pub async fn run(conn: &ConnArgs, args: &SubmitArgs) -> anyhow::Result<ExitCode> {
    debug_assert_eq!(args.kind, KindArg::OverlapMatrix);
    let parties = &args.parties;
    if parties.len() < 2 {
        bail!(
            "overlap-matrix needs --parties with at least two partners, e.g. --parties acme,globex,initech"
        );
    }
    let distinct: BTreeSet<&String> = parties.iter().collect();
    if distinct.len() != parties.len() {
        bail!("--parties names a partner twice");
    }
    if args.reveal_to.is_some() {
        bail!("--reveal-to applies to match jobs only");
    }
    // Check every pair's spec before submitting any.
    let mut planned = Vec::new();
    for i in 0..parties.len() {
        for j in i + 1..parties.len() {
            let between = [parties[i].clone(), parties[j].clone()];
            let spec = spec_for_pair(args, KindArg::Overlap, &between)?;
            planned.push((i, j, spec));
        }
    }

    let client = connect(conn).await?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let mut submitted = Vec::new();
    for (i, j, spec) in planned {
        let key = if args.idempotency_key.is_empty() {
            String::new()
        } else {
            format!("{}:{},{}", args.idempotency_key, parties[i], parties[j])
        };
        match client.submit(spec, &key).await {
            Ok(info) => {
                eprintln!("{} × {}: job {}", parties[i], parties[j], info.job_id);
                submitted.push((i, j, Ok(info.job_id)));
            }
            Err(e) => submitted.push((i, j, Err(e.to_string()))),
        }
    }
    let mut pairs = Vec::new();
    for (i, j, job_id) in submitted {
        let pair = match job_id {
            Err(reason) => PairResult {
                i,
                j,
                job_id: None,
                state: "not-submitted".into(),
                cell: MatrixCell::Failed(format!("not submitted: {reason}")),
            },
            Ok(job_id) => {
                let left = deadline.saturating_duration_since(Instant::now());
                match client.wait(&job_id, left, |_| {}).await {
                    Ok(info) => PairResult {
                        i,
                        j,
                        job_id: Some(job_id),
                        state: state_name(info.state).to_owned(),
                        cell: cell_of(&info),
                    },
                    Err(e) => PairResult {
                        i,
                        j,
                        job_id: Some(job_id),
                        state: "unfinished".into(),
                        cell: MatrixCell::Failed(e.to_string()),
                    },
                }
            }
        };
        pairs.push(pair);
    }
    client.close().await;

    let title = format!(
        "Overlap of {} on {} ({})",
        args.dataset.join(", "),
        args.keys().join("+"),
        args.purpose
    );
    let matrix = build_matrix(&title, parties, &pairs);
    let text = match args.format {
        SubmitFormat::Html => render_matrix_html(&matrix),
        SubmitFormat::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(&matrix_json(&matrix, &pairs, args))?
        ),
        SubmitFormat::Csv => matrix_csv(&matrix),
        SubmitFormat::Table => matrix_table(&matrix, &pairs),
    };
    match &args.out {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("overlap matrix written to {}", path.display());
        }
        None => cleanroom_node::out!("{text}"),
    }
    // Forbidden and suppressed pairs are answers; a failed pair is not.
    let failed = pairs
        .iter()
        .any(|p| matches!(p.cell, MatrixCell::Failed(_)));
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use cleanroom_proto::v1::{PartyResult, PsiOutcome};

    use super::*;

    fn job(state: JobState, reason: &str, outcome: Option<PsiOutcome>) -> JobInfo {
        JobInfo {
            job_id: "j".into(),
            state: state as i32,
            reason: reason.into(),
            results: outcome
                .into_iter()
                .map(|o| PartyResult {
                    node: "acme".into(),
                    outcome: Some(o),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn cells_follow_the_job() {
        let ok = PsiOutcome {
            intersection: 42,
            ..Default::default()
        };
        assert_eq!(
            cell_of(&job(JobState::Succeeded, "", Some(ok))),
            MatrixCell::Value(42)
        );
        let withheld = PsiOutcome {
            suppressed: true,
            ..Default::default()
        };
        assert_eq!(
            cell_of(&job(JobState::Succeeded, "", Some(withheld))),
            MatrixCell::Suppressed
        );
        assert_eq!(
            cell_of(&job(JobState::Vetoed, "initech: no agreement", None)),
            MatrixCell::Forbidden("initech: no agreement".into())
        );
        assert!(matches!(
            cell_of(&job(JobState::Failed, "timeout", None)),
            MatrixCell::Failed(r) if r.contains("timeout")
        ));
    }

    #[test]
    fn matrix_is_symmetric_and_renders() {
        let parties: Vec<String> = ["acme", "globex", "initech"].map(String::from).to_vec();
        let pairs = vec![
            PairResult {
                i: 0,
                j: 1,
                job_id: Some("a".into()),
                state: "succeeded".into(),
                cell: MatrixCell::Value(7),
            },
            PairResult {
                i: 1,
                j: 2,
                job_id: Some("b".into()),
                state: "vetoed".into(),
                cell: MatrixCell::Forbidden("no".into()),
            },
        ];
        let m = build_matrix("t", &parties, &pairs);
        assert_eq!(m.cells[1][0], MatrixCell::Value(7));
        assert_eq!(m.cells[2][1], MatrixCell::Forbidden("no".into()));
        assert_eq!(m.cells[0][2], MatrixCell::Empty);
        let csv = matrix_csv(&m);
        assert_eq!(csv.lines().next(), Some("party,acme,globex,initech"));
        assert!(csv.contains("globex,7,-,forbidden"), "{csv}");
        let table = matrix_table(&m, &pairs);
        assert!(
            table.contains("globex × initech (job b): forbidden: no"),
            "{table}"
        );
    }
}
