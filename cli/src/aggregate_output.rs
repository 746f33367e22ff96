//! Rendering an `aggregate` job: per-group noised totals with their noise scale, suppressed
//! groups marked, as a table, JSON or CSV.
//!
//! A result may have more groups than one answer of the coordinator carries (10^6 integer
//! groups): [`print_result`] then streams them page by page ([`Renderer`] writes the head, each
//! page's rows as it arrives, and the tail), so the whole result is never held in memory.

use std::io::Write;

use anyhow::Context;
use cleanroom_coordinator::AnalystClient;
use cleanroom_coordinator::client::state_name;
use cleanroom_proto::v1::{AggregateGroup, AggregateResult, JobInfo, JobKind};
use serde_json::{Value, json};

use crate::args::Format;

/// Marks where the groups go in the JSON document while its other fields are rendered.
const GROUPS_PLACEHOLDER: &str = "\u{1}groups\u{1}";

fn is_aggregate(job: &JobInfo) -> bool {
    job.spec
        .as_ref()
        .is_some_and(|s| s.kind == JobKind::Aggregate as i32)
}

/// Prints `job` if it is an aggregate job and returns true; false for other kinds. Prints the
/// groups the job carries (all of them, unless the result is too large for one answer: then
/// none, and the table says how to read them).
pub fn print_job(job: &JobInfo, format: Format) -> bool {
    if !is_aggregate(job) {
        return false;
    }
    let groups = job
        .aggregate
        .as_ref()
        .map(|r| r.groups.as_slice())
        .unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let mut r = Renderer::new(job, format, &mut out);
    let _ = r
        .head()
        .and_then(|()| r.rows(groups))
        .and_then(|()| r.tail());
    true
}

/// Prints an aggregate job with the groups `offset .. offset + limit` of its result (clamped
/// to the result), reading from the coordinator page by page those the job does not carry.
/// Returns false (printing nothing) for other job kinds.
pub async fn print_result(
    client: &AnalystClient,
    job: &JobInfo,
    format: Format,
    offset: u64,
    limit: Option<u64>,
) -> anyhow::Result<bool> {
    if !is_aggregate(job) {
        return Ok(false);
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut r = Renderer::new(job, format, &mut out);
    r.offset = offset;
    r.head()?;
    if let Some(result) = job.aggregate.as_ref() {
        let total = result.total_groups.max(result.groups.len() as u64);
        let start = offset.min(total);
        let count = limit.unwrap_or(u64::MAX).min(total - start);
        if result.groups.len() as u64 >= total {
            r.rows(&result.groups[start as usize..(start + count) as usize])?;
        } else {
            let mut failed = None;
            client
                .aggregate_groups(&job.job_id, start, count, |page| {
                    if failed.is_none()
                        && let Err(e) = r.rows(&page.groups)
                    {
                        failed = Some(e);
                    }
                })
                .await
                .context("reading the result's groups from the coordinator")?;
            if let Some(e) = failed {
                return Err(e.into());
            }
        }
    }
    r.tail()?;
    out.flush()?;
    Ok(true)
}

/// Standard deviation of the noise in `column`'s totals (0 when exact).
fn noise_sd(result: &AggregateResult, column: &str) -> f64 {
    result
        .noise
        .iter()
        .find(|n| n.column == column)
        .filter(|n| n.noised)
        .map_or(0.0, |n| n.total_sd)
}

/// Groups in the whole result.
fn total_groups(r: &AggregateResult) -> u64 {
    r.total_groups.max(r.groups.len() as u64)
}

/// The job as JSON: the common job fields and an `aggregate` object, its groups those of the
/// result the job carries (what [`Renderer`] writes in pieces; the tests compare the two).
#[cfg(test)]
fn job_json(job: &JobInfo) -> Value {
    let mut v = job_json_without_groups(job);
    if let (Some(r), Some(slot)) = (job.aggregate.as_ref(), v["result"].get_mut("groups")) {
        *slot = Value::Array(r.groups.iter().map(|g| group_json(r, g)).collect());
    }
    v
}

fn group_json(r: &AggregateResult, g: &AggregateGroup) -> Value {
    crate::group_table::group_json(&r.columns, g)
}

/// [`job_json`] with [`GROUPS_PLACEHOLDER`] where the groups go.
fn job_json_without_groups(job: &JobInfo) -> Value {
    let spec = job.spec.clone().unwrap_or_default();
    let agg = spec.aggregate.clone().unwrap_or_default();
    let result = job.aggregate.as_ref().map(|r| {
        json!({
            "columns": r.columns,
            "min_result": r.min_result,
            "max_colluders": r.max_colluders,
            "zcdp_epsilon": r.zcdp_epsilon,
            "total_groups": total_groups(r),
            "noise": r.noise.iter().map(|n| json!({
                "column": n.column,
                "noised": n.noised,
                "mechanism": if n.noised { "distributed_discrete_gaussian" } else { "none" },
                "share_sigma": n.share_sigma,
                "total_sd": n.total_sd,
                "zcdp_epsilon": n.zcdp_epsilon,
                "sensitivity": n.sensitivity,
            })).collect::<Vec<_>>(),
            "groups": GROUPS_PLACEHOLDER,
            "parties": r.parties.iter().map(|p| json!({
                "node": p.node,
                "audit_head": p.audit_head,
                "bytes_to_peers": p.bytes_to_peers,
                "bytes_to_coordinator": p.bytes_to_coordinator,
            })).collect::<Vec<_>>(),
        })
    });
    let range = agg
        .group_range
        .as_ref()
        .map(|r| json!({ "lo": r.lo, "hi": r.hi }));
    json!({
        "job_id": job.job_id,
        "kind": "aggregate",
        "state": state_name(job.state),
        "reason": job.reason,
        "purpose": spec.purpose,
        "parties": spec.parties.iter().map(|p| json!({ "node": p.node, "dataset": p.dataset }))
            .collect::<Vec<_>>(),
        "group_by": agg.group_by,
        "group_range": range,
        "per_person": (!agg.person.is_empty()).then_some(&agg.person),
        "sums": agg.sums,
        "count": agg.count,
        "submitted_by": job.submitted_by,
        "analyst": spec.analyst,
        "created_ms": job.created_ms,
        "updated_ms": job.updated_ms,
        "result": result,
        "history": crate::text::history_json(job),
    })
}

/// Writes one aggregate job in one format: [`Renderer::head`], then [`Renderer::rows`] once per
/// page of groups, then [`Renderer::tail`].
pub struct Renderer<'a, W: Write> {
    job: &'a JobInfo,
    format: Format,
    out: &'a mut W,
    /// JSON: what follows the groups; whether a group was written yet.
    json_tail: String,
    rows_written: u64,
    /// Table: label and value column widths, fixed by the first page.
    widths: Option<crate::group_table::Widths>,
    /// Index of the first group printed (for the table's note on partial output).
    offset: u64,
}

impl<'a, W: Write> Renderer<'a, W> {
    pub fn new(job: &'a JobInfo, format: Format, out: &'a mut W) -> Self {
        Renderer {
            job,
            format,
            out,
            json_tail: String::new(),
            rows_written: 0,
            widths: None,
            offset: 0,
        }
    }

    /// Everything before the groups.
    pub fn head(&mut self) -> std::io::Result<()> {
        let job = self.job;
        match self.format {
            Format::Json => {
                let text =
                    serde_json::to_string_pretty(&job_json_without_groups(job)).unwrap_or_default();
                let marker = format!("\"{}\"", GROUPS_PLACEHOLDER.replace('\u{1}', "\\u0001"));
                match text.split_once(&marker) {
                    Some((before, after)) => {
                        write!(self.out, "{before}[")?;
                        self.json_tail = format!("]{after}\n");
                    }
                    None => self.json_tail = format!("{text}\n"),
                }
                Ok(())
            }
            Format::Csv => match job.aggregate.as_ref() {
                None => write!(self.out, "{}", crate::text::csv_without_result(job)),
                Some(r) => {
                    let mut head = String::from("group,suppressed");
                    for c in &r.columns {
                        head.push_str(&format!(
                            ",{},{}_noise_sd",
                            crate::text::csv_field(c),
                            crate::text::csv_field(c)
                        ));
                    }
                    writeln!(self.out, "{head}")
                }
            },
            Format::Table => write!(self.out, "{}", table_head(job)),
        }
    }

    /// One page of groups.
    pub fn rows(&mut self, groups: &[AggregateGroup]) -> std::io::Result<()> {
        let Some(r) = self.job.aggregate.as_ref() else {
            return Ok(());
        };
        match self.format {
            Format::Json => {
                for g in groups {
                    let sep = if self.rows_written == 0 { "" } else { "," };
                    write!(
                        self.out,
                        "{sep}\n      {}",
                        serde_json::to_string(&group_json(r, g)).unwrap_or_default()
                    )?;
                    self.rows_written += 1;
                }
            }
            Format::Csv => {
                for g in groups {
                    let mut line = format!("{},{}", crate::text::csv_field(&g.label), g.suppressed);
                    for (i, c) in r.columns.iter().enumerate() {
                        let value = g.values.get(i).map(i64::to_string).unwrap_or_default();
                        line.push_str(&format!(",{value},{:.2}", noise_sd(r, c)));
                    }
                    writeln!(self.out, "{line}")?;
                    self.rows_written += 1;
                }
            }
            Format::Table => {
                if self.widths.is_none() {
                    let headers = table_headers(r);
                    let widths = crate::group_table::widths(&headers, groups);
                    write!(
                        self.out,
                        "{}",
                        crate::group_table::header_line(&headers, &widths)
                    )?;
                    self.widths = Some(widths);
                }
                let Some(widths) = self.widths.as_ref() else {
                    return Ok(());
                };
                for g in groups {
                    let line = crate::group_table::group_line(g, widths);
                    writeln!(self.out, "{line}")?;
                    self.rows_written += 1;
                }
            }
        }
        Ok(())
    }

    /// Everything after the groups.
    pub fn tail(&mut self) -> std::io::Result<()> {
        match self.format {
            Format::Json => {
                if self.rows_written > 0 {
                    write!(self.out, "\n    ")?;
                }
                let tail = std::mem::take(&mut self.json_tail);
                write!(self.out, "{tail}")
            }
            Format::Csv => Ok(()),
            Format::Table => {
                let job = self.job;
                if let Some(r) = job.aggregate.as_ref() {
                    if self.widths.is_none() {
                        let headers = table_headers(r);
                        let widths = crate::group_table::widths(&headers, &[]);
                        write!(
                            self.out,
                            "{}",
                            crate::group_table::header_line(&headers, &widths)
                        )?;
                    }
                    let total = total_groups(r);
                    if self.rows_written < total {
                        writeln!(
                            self.out,
                            "  … {} of {total} groups shown (from group {}); `cleanroom job result {} \
                             --offset N --limit M` prints any of them",
                            self.rows_written, self.offset, job.job_id
                        )?;
                    }
                }
                write!(self.out, "{}", table_tail(job))
            }
        }
    }
}

/// The table above the groups: job, kind, purpose, state, noise and suppression.
fn table_head(job: &JobInfo) -> String {
    let spec = job.spec.clone().unwrap_or_default();
    let agg = spec.aggregate.clone().unwrap_or_default();
    let parties = crate::text::parties(&spec);
    let mut out = String::new();
    out.push_str(&format!("job        {}\n", job.job_id));
    let domain = match agg.group_range.as_ref() {
        Some(r) => format!(" in {}..{}", r.lo, r.hi),
        None => String::new(),
    };
    out.push_str(&format!(
        "kind       aggregate by {}{domain} over {} parties ({}){}\n",
        agg.group_by,
        parties.len(),
        parties.join(", "),
        if agg.person.is_empty() {
            String::new()
        } else {
            format!(", clipped per person ({})", agg.person)
        }
    ));
    out.push_str(&format!("purpose    {}\n", spec.purpose));
    out.push_str(&crate::text::state_line(job));
    out.push('\n');
    if let Some(r) = job.aggregate.as_ref() {
        if r.noise.iter().any(|n| n.noised) {
            out.push_str(&format!(
                "noise      distributed discrete Gaussian, zCDP ε ≈ {:.3} even if {} parties collude; \
                 ± is one standard deviation\n",
                r.zcdp_epsilon, r.max_colluders
            ));
        } else {
            out.push_str("noise      none (no agreement asks for it): totals are exact\n");
        }
        out.push_str(&format!(
            "suppressed groups whose noised count is below {}\n",
            r.min_result
        ));
    }
    out
}

fn table_headers(r: &AggregateResult) -> Vec<String> {
    r.columns
        .iter()
        .map(|c| crate::group_table::column_header(c, noise_sd(r, c)))
        .collect()
}

/// The table below the groups: per-party statistics and the history.
fn table_tail(job: &JobInfo) -> String {
    let mut out = String::new();
    if let Some(r) = job.aggregate.as_ref() {
        for p in &r.parties {
            out.push_str(&format!(
                "  {:<10} sent {} B to peers, {} B to the coordinator; audit head {}\n",
                p.node, p.bytes_to_peers, p.bytes_to_coordinator, p.audit_head
            ));
        }
    }
    out.push_str(&crate::text::history_text(job));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleanroom_proto::v1::{AggregateGroup, AggregateSpec, ColumnNoise, JobSpec};

    fn job() -> JobInfo {
        let spec = JobSpec {
            kind: JobKind::Aggregate as i32,
            aggregate: Some(AggregateSpec {
                group_by: "category".into(),
                groups: vec!["home".into()],
                sums: vec!["amount".into()],
                count: true,
                ..AggregateSpec::default()
            }),
            ..JobSpec::default()
        };
        JobInfo {
            aggregate: Some(AggregateResult {
                columns: vec!["count".into(), "amount".into()],
                groups: crate::group_table::sample_groups("home"),
                noise: vec![ColumnNoise {
                    column: "amount".into(),
                    noised: true,
                    total_sd: 12.5,
                    ..ColumnNoise::default()
                }],
                min_result: 5,
                max_colluders: 2,
                zcdp_epsilon: 1.0,
                show_count: true,
                parties: vec![],
                total_groups: 2,
            }),
            ..crate::group_table::succeeded_job(spec)
        }
    }

    /// Renders `job` with its groups delivered in `pages`.
    fn render(job: &JobInfo, format: Format, pages: &[&[AggregateGroup]]) -> String {
        let mut out = Vec::new();
        let mut r = Renderer::new(job, format, &mut out);
        r.head().unwrap();
        for p in pages {
            r.rows(p).unwrap();
        }
        r.tail().unwrap();
        String::from_utf8(out).unwrap()
    }

    fn all(job: &JobInfo) -> Vec<AggregateGroup> {
        job.aggregate.as_ref().unwrap().groups.clone()
    }

    #[test]
    fn csv_marks_suppressed_groups_and_noise() {
        let j = job();
        assert_eq!(
            render(&j, Format::Csv, &[&all(&j)]),
            "group,suppressed,count,count_noise_sd,amount,amount_noise_sd\n\
             home,false,42,0.00,12345,12.50\n\
             (other),true,,0.00,,12.50\n"
        );
        // Page by page: the same text.
        let g = all(&j);
        assert_eq!(
            render(&j, Format::Csv, &[&g[..1], &[], &g[1..]]),
            render(&j, Format::Csv, &[&g])
        );
    }

    #[test]
    fn table_and_json() {
        let j = job();
        let t = render(&j, Format::Table, &[&all(&j)]);
        assert!(t.contains("amount (±12.5)"), "{t}");
        assert!(t.contains("(other)  suppressed"), "{t}");
        assert!(!t.contains("groups shown"), "{t}");
        let v = job_json(&j);
        assert_eq!(v["result"]["groups"][0]["values"]["amount"], 12345);
        assert_eq!(v["result"]["groups"][1]["suppressed"], true);
        assert_eq!(v["result"]["total_groups"], 2);
        assert!(!print_job(&JobInfo::default(), Format::Json));
    }

    #[test]
    fn streamed_json_is_the_same_document() {
        let j = job();
        let g = all(&j);
        for pages in [&[&g[..]][..], &[&g[..1], &g[1..]], &[], &[&g[..0]]] {
            let text = render(&j, Format::Json, pages);
            let parsed: Value = serde_json::from_str(&text).unwrap();
            let shown: usize = pages.iter().map(|p| p.len()).sum();
            let mut expected = job_json(&j);
            expected["result"]["groups"] =
                Value::Array(expected["result"]["groups"].as_array().unwrap()[..shown].to_vec());
            assert_eq!(parsed, expected, "{text}");
        }
        // A job without a result.
        let mut pending = job();
        pending.aggregate = None;
        let parsed: Value = serde_json::from_str(&render(&pending, Format::Json, &[])).unwrap();
        assert_eq!(parsed["result"], Value::Null);
    }

    #[test]
    fn a_partial_table_says_how_to_read_the_rest() {
        let mut j = job();
        j.aggregate.as_mut().unwrap().total_groups = 1_000_001;
        j.aggregate.as_mut().unwrap().groups.clear();
        j.spec
            .as_mut()
            .unwrap()
            .aggregate
            .as_mut()
            .unwrap()
            .group_range = Some(cleanroom_proto::v1::IntegerRange {
            lo: 0,
            hi: 1_000_000,
        });
        let t = render(&j, Format::Table, &[]);
        assert!(t.contains("by category in 0..1000000"), "{t}");
        assert!(t.contains("0 of 1000001 groups shown"), "{t}");
        assert!(t.contains("--offset N --limit M"), "{t}");
    }
}
