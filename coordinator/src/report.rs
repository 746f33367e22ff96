//! A schedule's history as a report: an HTML page, CSV and JSON (DESIGN §7).
//!
//! [`ScheduleReport::build`] gathers a schedule and its runs ([`JobStore::runs`]) into a plain,
//! serialisable value; the renderers are pure functions of it:
//! - [`render_html`]: one self-contained page (inline CSS and SVG; no script, font, image or
//!   link to fetch; readable offline) with a header (schedule, cron, parties, purpose), a
//!   summary (runs, succeeded, last value, trend), a line chart of the released intersection
//!   over time (failed and vetoed runs marked on the time axis) and a table of every run;
//! - [`render_csv`]: one row per run, RFC 4180 quoting; text cells that a spreadsheet would take
//!   for a formula (starting with `=`, `+`, `-`, `@`) are prefixed with `'`;
//! - [`render_json`]: the [`ScheduleReport`] itself ([`ScheduleReport::from_json`] reads it back,
//!   so the coordinator can send JSON and the CLI render any format locally);
//! - [`render_matrix_html`]: an overlap matrix of N partners as a heat-map table.
//!
//! All text from the store (reasons, names, purposes) is escaped.
//!
//! [`JobStore::runs`]: crate::store::JobStore::runs

use std::fmt::Write as _;

#[cfg(test)]
use cleanroom_proto::v1::JobSpec;
use cleanroom_proto::v1::{JobKind, JobState};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use crate::store::{RunStatus, ScheduleRecord, ScheduleRun, state_name};

/// One party of the scheduled job, as the report shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportParty {
    /// The node.
    pub node: String,
    /// Its dataset.
    pub dataset: String,
    /// Join keys.
    pub keys: Vec<String>,
}

/// One run in a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportRun {
    /// The occurrence, Unix milliseconds.
    pub scheduled_for_ms: i64,
    /// The occurrence in the schedule's time zone, `YYYY-MM-DD HH:MM TZ`.
    pub scheduled_for: String,
    /// 0 for the first attempt.
    pub attempt: u32,
    /// The job, if one was submitted.
    pub job_id: Option<String>,
    /// `succeeded`, `failed`, `vetoed`, `cancelled`, `pending`, `offered`, `running`, `skipped`
    /// or `not-submitted`.
    pub status: String,
    /// The released intersection size (succeeded runs).
    pub intersection: Option<u64>,
    /// Scale of the noise added to the released figure; none is added yet.
    pub noise_scale: Option<f64>,
    /// Why it ended as it did (the job's last reason, or why it was skipped or refused).
    pub reason: String,
    /// Why it was run ("cron", "run-now", "retry 1 of 3 …").
    pub note: String,
}

/// A schedule's history over a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleReport {
    /// The schedule's name.
    pub schedule: String,
    /// Its cron expression.
    pub cron: String,
    /// Its time zone.
    pub timezone: String,
    /// `overlap` or `match`.
    pub kind: String,
    /// The parties, initiator first.
    pub parties: Vec<ReportParty>,
    /// The declared purpose.
    pub purpose: String,
    /// Whether the schedule is paused.
    pub paused: bool,
    /// Whether the schedule was removed (its history is kept).
    pub removed: bool,
    /// Its next occurrence.
    pub next_run_ms: Option<i64>,
    /// Start of the window, Unix milliseconds.
    pub since_ms: i64,
    /// When the report was made.
    pub generated_ms: i64,
    /// The runs in the window, oldest first.
    pub runs: Vec<ReportRun>,
}

/// Figures of a report at a glance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportSummary {
    /// Runs that submitted a job (retries included).
    pub jobs: usize,
    /// Of which succeeded.
    pub succeeded: usize,
    /// Of which failed or were vetoed.
    pub failed_or_vetoed: usize,
    /// Occurrences skipped (missed while the coordinator was down).
    pub skipped: usize,
    /// The latest released value.
    pub last_value: Option<u64>,
    /// The one before it.
    pub previous_value: Option<u64>,
}

impl ScheduleReport {
    /// The report of `schedule` from its `runs` (as [`crate::store::JobStore::runs`] gives them)
    /// since `since_ms`, made at `now_ms`.
    pub fn build(
        schedule: &ScheduleRecord,
        runs: &[ScheduleRun],
        since_ms: i64,
        now_ms: i64,
    ) -> ScheduleReport {
        let tz = zone(&schedule.timezone);
        let kind = match JobKind::try_from(schedule.spec.kind) {
            Ok(JobKind::Overlap) => "overlap",
            Ok(JobKind::Match) => "match",
            _ => "unknown",
        };
        let runs = runs
            .iter()
            .filter(|run| run.scheduled_for_ms >= since_ms)
            .map(|run| {
                let (status, reason) = match run.status {
                    RunStatus::Skipped => ("skipped".to_owned(), run.note.clone()),
                    RunStatus::NotSubmitted => ("not-submitted".to_owned(), run.note.clone()),
                    RunStatus::Submitted => (
                        run.job_state
                            .map_or("unknown", |state| state_name(&state))
                            .to_owned(),
                        run.job_reason.clone(),
                    ),
                };
                let released = run.job_state == Some(JobState::Succeeded);
                ReportRun {
                    scheduled_for_ms: run.scheduled_for_ms,
                    scheduled_for: format_time(run.scheduled_for_ms, &tz),
                    attempt: run.attempt,
                    job_id: run.job_id.clone(),
                    status,
                    intersection: if released { run.intersection } else { None },
                    noise_scale: None,
                    reason,
                    note: run.note.clone(),
                }
            })
            .collect();
        ScheduleReport {
            schedule: schedule.name.clone(),
            cron: schedule.cron.clone(),
            timezone: schedule.timezone.clone(),
            kind: kind.to_owned(),
            parties: schedule
                .spec
                .parties
                .iter()
                .map(|p| ReportParty {
                    node: p.node.clone(),
                    dataset: p.dataset.clone(),
                    keys: p.keys.clone(),
                })
                .collect(),
            purpose: schedule.spec.purpose.clone(),
            paused: schedule.paused,
            removed: schedule.removed_ms.is_some(),
            next_run_ms: schedule.next_run_ms,
            since_ms,
            generated_ms: now_ms,
            runs,
        }
    }

    /// Reads a report written by [`render_json`].
    pub fn from_json(json: &str) -> Result<ScheduleReport, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// The figures of the summary.
    pub fn summary(&self) -> ReportSummary {
        let values: Vec<u64> = self.released().map(|(_, v)| v).collect();
        ReportSummary {
            jobs: self.runs.iter().filter(|r| r.job_id.is_some()).count(),
            succeeded: self.runs.iter().filter(|r| r.status == "succeeded").count(),
            failed_or_vetoed: self
                .runs
                .iter()
                .filter(|r| r.status == "failed" || r.status == "vetoed")
                .count(),
            skipped: self.runs.iter().filter(|r| r.status == "skipped").count(),
            last_value: values.last().copied(),
            previous_value: values.len().checked_sub(2).map(|i| values[i]),
        }
    }

    /// (time, value) of each succeeded run with a released figure, in time order.
    fn released(&self) -> impl Iterator<Item = (i64, u64)> + '_ {
        self.runs.iter().filter_map(|r| {
            (r.status == "succeeded")
                .then_some(r.intersection)
                .flatten()
                .map(|v| (r.scheduled_for_ms, v))
        })
    }
}

/// Parses a look-back window such as `90d`, `12h`, `2w`, `30m` or `45s` into milliseconds.
pub fn parse_since(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("'{text}' has no unit; write e.g. 90d, 12h, 2w, 30m"))?;
    let (number, unit) = text.split_at(split);
    let n: i64 = number
        .parse()
        .map_err(|_| format!("'{text}' does not start with a number; write e.g. 90d"))?;
    let unit_ms: i64 = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        _ => {
            return Err(format!(
                "unknown unit '{unit}' in '{text}'; use s, m, h, d or w"
            ));
        }
    };
    n.checked_mul(unit_ms)
        .ok_or_else(|| format!("'{text}' is too long a window"))
}

/// The time zone of a report; an unknown name falls back to UTC (the report still renders).
fn zone(name: &str) -> TimeZone {
    if name.eq_ignore_ascii_case("UTC") || name.is_empty() {
        return TimeZone::UTC;
    }
    TimeZone::get(name).unwrap_or(TimeZone::UTC)
}

fn format_time(ms: i64, tz: &TimeZone) -> String {
    format_with(ms, tz, "%Y-%m-%d %H:%M %Z")
}

fn format_with(ms: i64, tz: &TimeZone, fmt: &str) -> String {
    match Timestamp::from_millisecond(ms) {
        Ok(ts) => ts.to_zoned(tz.clone()).strftime(fmt).to_string(),
        Err(_) => ms.to_string(),
    }
}

/// Escapes text for HTML element content and attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The runs as CSV, one row per run, with a header row.
pub fn render_csv(report: &ScheduleReport) -> String {
    let mut out = String::from(
        "schedule,scheduled_for,scheduled_for_ms,attempt,job_id,status,intersection,noise_scale,reason,note\r\n",
    );
    for run in &report.runs {
        let fields = [
            csv_text(&report.schedule),
            csv_text(&run.scheduled_for),
            run.scheduled_for_ms.to_string(),
            run.attempt.to_string(),
            csv_text(run.job_id.as_deref().unwrap_or("")),
            csv_text(&run.status),
            run.intersection.map(|v| v.to_string()).unwrap_or_default(),
            run.noise_scale.map(|v| v.to_string()).unwrap_or_default(),
            csv_text(&run.reason),
            csv_text(&run.note),
        ];
        out.push_str(&fields.join(","));
        out.push_str("\r\n");
    }
    out
}

/// One CSV text cell: formula-looking text defused with `'`, quoted when needed.
fn csv_text(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@']) {
        format!("'{text}")
    } else {
        text.to_owned()
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

/// The report as pretty-printed JSON (the [`ScheduleReport`] itself).
pub fn render_json(report: &ScheduleReport) -> String {
    // A struct of strings, numbers and vectors always serialises.
    serde_json::to_string_pretty(report).unwrap_or_else(|err| format!("{{\"error\":\"{err}\"}}"))
}

const STYLE: &str = r#"
:root{--ink:#1f2933;--muted:#616e7c;--line:#e4e7eb;--bg:#f7f8fa;--card:#fff;--accent:#2563eb;--ok:#15803d;--bad:#b91c1c;--warn:#b45309}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:15px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1040px;margin:0 auto;padding:32px 24px 48px}
header h1{margin:0 0 4px;font-size:26px;letter-spacing:-.01em}
header .sub{color:var(--muted);margin:0 0 20px}
.badge{display:inline-block;font-size:12px;font-weight:600;padding:2px 8px;border-radius:999px;vertical-align:middle;margin-left:8px;background:#e0e7ff;color:#3730a3}
.badge.paused{background:#fef3c7;color:var(--warn)}.badge.removed{background:#fee2e2;color:var(--bad)}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0 0 24px;padding:16px 20px;background:var(--card);border:1px solid var(--line);border-radius:10px}
dl.meta dt{color:var(--muted)}dl.meta dd{margin:0}
code{font:13px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#eef2f7;padding:1px 6px;border-radius:4px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:12px;margin:0 0 24px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 16px}
.card .label{color:var(--muted);font-size:13px}.card .value{font-size:24px;font-weight:650;font-variant-numeric:tabular-nums}
.up{color:var(--ok)}.down{color:var(--bad)}.flat{color:var(--muted)}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px 20px;margin:0 0 24px}
section h2{margin:0 0 12px;font-size:17px}
svg{display:block;width:100%;height:auto}
svg text{font:12px -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Arial,sans-serif;fill:var(--muted)}
.legend{color:var(--muted);font-size:13px;margin-top:6px}
.legend span{margin-right:16px;white-space:nowrap}
table{width:100%;border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:7px 10px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted);font-weight:600}
td.num,th.num{text-align:right}
td.reason{color:var(--muted);max-width:420px;overflow-wrap:anywhere}
.pill{display:inline-block;font-size:12px;font-weight:600;padding:1px 8px;border-radius:999px;background:#eef2f7;color:var(--muted)}
.pill.succeeded{background:#dcfce7;color:var(--ok)}.pill.failed,.pill.not-submitted{background:#fee2e2;color:var(--bad)}
.pill.vetoed{background:#ffedd5;color:var(--warn)}.pill.running,.pill.offered,.pill.pending{background:#e0e7ff;color:#3730a3}
footer{color:var(--muted);font-size:12px;text-align:center}
.empty{color:var(--muted);font-style:italic}
table.matrix td,table.matrix th{text-align:center;min-width:88px}
table.matrix th.row{text-align:right}
td.cell{font-weight:600;border:2px solid var(--card)}
td.forbidden{background:repeating-linear-gradient(45deg,#f1f5f9,#f1f5f9 6px,#e2e8f0 6px,#e2e8f0 12px);color:var(--muted);font-weight:400}
td.suppressed{background:#fef9c3;color:var(--warn);font-weight:400}
td.failed{background:#fee2e2;color:var(--bad);font-weight:400}
td.self{background:#f8fafc;color:#cbd5e1}
"#;

fn page_start(out: &mut String, title: &str) {
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\" />\n");
    out.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\" />\n");
    let _ = writeln!(out, "<title>{}</title>", escape_html(title));
    let _ = writeln!(out, "<style>{STYLE}</style>\n</head>\n<body>\n<main>");
}

fn page_end(out: &mut String, generated: Option<&str>) {
    let when = generated.map_or_else(String::new, |g| format!(" on {}", escape_html(g)));
    let _ = writeln!(
        out,
        "<footer>Generated by the cleanroom coordinator{when}. This page is self-contained: it \
         needs no network and runs no script.</footer>\n</main>\n</body>\n</html>"
    );
}

/// The report as one self-contained HTML page.
pub fn render_html(report: &ScheduleReport) -> String {
    let tz = zone(&report.timezone);
    let summary = report.summary();
    let mut out = String::with_capacity(16 * 1024);
    page_start(
        &mut out,
        &format!("{} · cleanroom schedule report", report.schedule),
    );

    // Header.
    out.push_str("<header>\n");
    let _ = write!(out, "<h1>{}", escape_html(&report.schedule));
    if report.paused {
        out.push_str("<span class=\"badge paused\">paused</span>");
    }
    if report.removed {
        out.push_str("<span class=\"badge removed\">removed</span>");
    }
    let _ = writeln!(
        out,
        "<span class=\"badge\">{}</span></h1>",
        escape_html(&report.kind)
    );
    let _ = writeln!(
        out,
        "<p class=\"sub\">Recurring {} between {} · runs since {}</p>",
        escape_html(&report.kind),
        escape_html(
            &report
                .parties
                .iter()
                .map(|p| p.node.as_str())
                .collect::<Vec<_>>()
                .join(" and ")
        ),
        escape_html(&format_with(report.since_ms, &tz, "%Y-%m-%d"))
    );
    out.push_str("</header>\n<dl class=\"meta\">\n");
    let _ = writeln!(
        out,
        "<dt>Schedule</dt><dd><code>{}</code> in {}</dd>",
        escape_html(&report.cron),
        escape_html(&report.timezone)
    );
    for (i, party) in report.parties.iter().enumerate() {
        let _ = writeln!(
            out,
            "<dt>{}</dt><dd><strong>{}</strong> · dataset <code>{}</code> · keys {}</dd>",
            if i == 0 { "Initiator" } else { "Responder" },
            escape_html(&party.node),
            escape_html(&party.dataset),
            escape_html(&party.keys.join(", "))
        );
    }
    let _ = writeln!(
        out,
        "<dt>Purpose</dt><dd>{}</dd>",
        escape_html(&report.purpose)
    );
    let next = match report.next_run_ms {
        Some(ms) if !report.paused && !report.removed => format_time(ms, &tz),
        _ => "—".to_owned(),
    };
    let _ = writeln!(
        out,
        "<dt>Next run</dt><dd>{}</dd>\n</dl>",
        escape_html(&next)
    );

    // Summary cards.
    out.push_str("<div class=\"cards\">\n");
    card(&mut out, "Jobs run", &summary.jobs.to_string(), "");
    card(&mut out, "Succeeded", &summary.succeeded.to_string(), "");
    card(
        &mut out,
        "Failed or vetoed",
        &summary.failed_or_vetoed.to_string(),
        if summary.failed_or_vetoed > 0 {
            "down"
        } else {
            ""
        },
    );
    card(&mut out, "Skipped", &summary.skipped.to_string(), "");
    card(
        &mut out,
        "Last intersection",
        &summary
            .last_value
            .map_or_else(|| "—".to_owned(), group_digits),
        "",
    );
    let (trend, class) = trend(summary.last_value, summary.previous_value);
    card(&mut out, "Trend vs previous", &trend, class);
    out.push_str("</div>\n");

    // Chart.
    out.push_str("<section>\n<h2>Released intersection over time</h2>\n");
    chart(&mut out, report, &tz);
    out.push_str(
        "<div class=\"legend\"><span><svg width=\"12\" height=\"12\" viewBox=\"0 0 12 12\" \
         aria-hidden=\"true\" style=\"display:inline;width:12px\"><circle cx=\"6\" cy=\"6\" \
         r=\"4\" fill=\"#2563eb\" /></svg> succeeded run</span><span><svg width=\"12\" \
         height=\"12\" viewBox=\"0 0 12 12\" aria-hidden=\"true\" style=\"display:inline;\
         width:12px\"><path d=\"M2 2L10 10M10 2L2 10\" stroke=\"#b91c1c\" stroke-width=\"2\" \
         /></svg> failed or vetoed</span><span>Noise: none is added to released figures yet.\
         </span></div>\n",
    );
    out.push_str("</section>\n");

    // Table of runs.
    out.push_str("<section>\n<h2>Runs</h2>\n");
    if report.runs.is_empty() {
        out.push_str("<p class=\"empty\">No runs in this window.</p>\n");
    } else {
        out.push_str(
            "<table>\n<thead><tr><th>Scheduled for</th><th class=\"num\">Attempt</th>\
             <th>Job</th><th>Status</th><th class=\"num\">Intersection</th>\
             <th class=\"num\">Noise scale</th><th>Reason</th></tr></thead>\n<tbody>\n",
        );
        for run in report.runs.iter().rev() {
            let status_class: String = run
                .status
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td class=\"num\">{}</td><td><code>{}</code></td>\
                 <td><span class=\"pill {}\">{}</span></td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"reason\">{}</td></tr>",
                escape_html(&run.scheduled_for),
                run.attempt,
                escape_html(run.job_id.as_deref().unwrap_or("—")),
                status_class,
                escape_html(&run.status),
                run.intersection.map_or_else(String::new, group_digits),
                run.noise_scale.map_or_else(String::new, |v| v.to_string()),
                escape_html(&run.reason)
            );
        }
        out.push_str("</tbody>\n</table>\n");
    }
    out.push_str("</section>\n");
    page_end(&mut out, Some(&format_time(report.generated_ms, &tz)));
    out
}

fn card(out: &mut String, label: &str, value: &str, class: &str) {
    let _ = writeln!(
        out,
        "<div class=\"card\"><div class=\"label\">{}</div><div class=\"value {}\">{}</div></div>",
        escape_html(label),
        class,
        escape_html(value)
    );
}

fn trend(last: Option<u64>, previous: Option<u64>) -> (String, &'static str) {
    match (last, previous) {
        (Some(last), Some(prev)) => {
            let delta = last as i128 - prev as i128;
            let pct = if prev == 0 {
                String::new()
            } else {
                format!(" ({:+.1}%)", delta as f64 * 100.0 / prev as f64)
            };
            match delta.cmp(&0) {
                std::cmp::Ordering::Greater => (format!("▲ +{delta}{pct}"), "up"),
                std::cmp::Ordering::Less => (format!("▼ {delta}{pct}"), "down"),
                std::cmp::Ordering::Equal => ("= unchanged".to_owned(), "flat"),
            }
        }
        _ => ("—".to_owned(), "flat"),
    }
}

/// `1234567` → `1,234,567`.
fn group_digits(v: u64) -> String {
    let digits = v.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A "nice" upper bound and step for an axis from 0 to `max` with about `ticks` ticks.
fn nice_axis(max: u64, ticks: u64) -> (u64, u64) {
    let max = max.max(1);
    let raw = max.div_ceil(ticks).max(1);
    let mut magnitude = 1u64;
    while magnitude.saturating_mul(10) <= raw {
        magnitude *= 10;
    }
    let step = [1, 2, 5, 10]
        .iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10 * magnitude);
    (max.div_ceil(step) * step, step)
}

const CHART_W: f64 = 960.0;
const CHART_H: f64 = 320.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 44.0;

fn chart(out: &mut String, report: &ScheduleReport, tz: &TimeZone) {
    let points: Vec<(i64, u64)> = report.released().collect();
    let failures: Vec<&ReportRun> = report
        .runs
        .iter()
        .filter(|r| r.status == "failed" || r.status == "vetoed")
        .collect();
    let _ = writeln!(
        out,
        "<svg class=\"chart\" viewBox=\"0 0 {CHART_W} {CHART_H}\" role=\"img\" \
         aria-label=\"Released intersection of {} over time\" xmlns=\"http://www.w3.org/2000/svg\">",
        escape_html(&report.schedule)
    );
    let plot_w = CHART_W - LEFT - RIGHT;
    let plot_h = CHART_H - TOP - BOTTOM;
    let base_y = TOP + plot_h;

    // Time axis: all runs with a job or a failure, padded when there is only one instant.
    let times: Vec<i64> = report.runs.iter().map(|r| r.scheduled_for_ms).collect();
    let (mut t0, mut t1) = match (times.iter().min(), times.iter().max()) {
        (Some(&a), Some(&b)) => (a, b),
        _ => (report.since_ms, report.generated_ms),
    };
    if t1 <= t0 {
        t0 -= 43_200_000;
        t1 += 43_200_000;
    }
    let x = |t: i64| LEFT + (t - t0) as f64 / (t1 - t0) as f64 * plot_w;

    let max_value = points.iter().map(|&(_, v)| v).max().unwrap_or(0);
    let (y_max, y_step) = nice_axis(max_value, 5);
    let y = |v: u64| base_y - v as f64 / y_max as f64 * plot_h;

    // Grid and y labels.
    let mut v = 0;
    while v <= y_max {
        let yy = y(v);
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#e4e7eb\" />\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + plot_w,
            LEFT - 8.0,
            yy + 4.0,
            group_digits(v)
        );
        v += y_step;
    }
    // Axes.
    let _ = writeln!(
        out,
        "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{base_y}\" stroke=\"#9aa5b1\" />\
         <line x1=\"{LEFT}\" y1=\"{base_y}\" x2=\"{:.1}\" y2=\"{base_y}\" stroke=\"#9aa5b1\" />",
        LEFT + plot_w
    );
    // Time labels: up to 6, evenly spaced.
    let labels = 6;
    for i in 0..labels {
        let t = t0 + (t1 - t0) * i / (labels - 1);
        let xx = x(t);
        let anchor = match i {
            0 => "start",
            i if i == labels - 1 => "end",
            _ => "middle",
        };
        let _ = writeln!(
            out,
            "<line x1=\"{xx:.1}\" y1=\"{base_y}\" x2=\"{xx:.1}\" y2=\"{:.1}\" stroke=\"#9aa5b1\" />\
             <text x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\">{}</text>",
            base_y + 5.0,
            base_y + 20.0,
            escape_html(&format_with(t, tz, "%b %d %H:%M"))
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\" text-anchor=\"middle\">\
         intersection</text>",
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );

    if points.is_empty() {
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">No released figures in this \
             window yet</text>",
            LEFT + plot_w / 2.0,
            TOP + plot_h / 2.0
        );
    } else {
        // Area and line.
        let line: Vec<String> = points
            .iter()
            .map(|&(t, v)| format!("{:.1},{:.1}", x(t), y(v)))
            .collect();
        if points.len() > 1 {
            let first_x = x(points[0].0);
            let last_x = x(points[points.len() - 1].0);
            let _ = writeln!(
                out,
                "<polygon points=\"{first_x:.1},{base_y} {} {last_x:.1},{base_y}\" \
                 fill=\"#2563eb\" fill-opacity=\"0.08\" />",
                line.join(" ")
            );
            let _ = writeln!(
                out,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"#2563eb\" stroke-width=\"2.5\" \
                 stroke-linejoin=\"round\" stroke-linecap=\"round\" />",
                line.join(" ")
            );
        }
        for &(t, v) in &points {
            let _ = writeln!(
                out,
                "<circle class=\"point\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"4.5\" fill=\"#fff\" \
                 stroke=\"#2563eb\" stroke-width=\"2.5\"><title>{}: {}</title></circle>",
                x(t),
                y(v),
                escape_html(&format_time(t, tz)),
                group_digits(v)
            );
        }
    }
    for run in failures {
        let xx = x(run.scheduled_for_ms);
        let yy = base_y - 10.0;
        let _ = writeln!(
            out,
            "<g class=\"failure-mark\"><title>{} {}: {}</title><path d=\"M{:.1} {:.1}L{:.1} \
             {:.1}M{:.1} {:.1}L{:.1} {:.1}\" stroke=\"#b91c1c\" stroke-width=\"2.5\" \
             stroke-linecap=\"round\" /></g>",
            escape_html(&run.scheduled_for),
            escape_html(&run.status),
            escape_html(&run.reason),
            xx - 5.0,
            yy - 5.0,
            xx + 5.0,
            yy + 5.0,
            xx + 5.0,
            yy - 5.0,
            xx - 5.0,
            yy + 5.0
        );
    }
    out.push_str("</svg>\n");
}

/// One cell of an overlap matrix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "detail")]
pub enum MatrixCell {
    /// The released intersection of the pair.
    Value(u64),
    /// The partners' agreements do not allow this pair (a node vetoed it); the reason.
    Forbidden(String),
    /// Computed but not released (below the release threshold).
    Suppressed,
    /// The job failed or was vetoed; the reason.
    Failed(String),
    /// The diagonal or a pair not computed.
    Empty,
}

/// Overlaps between N partners: `cells[i][j]` is the pair (parties[i], parties[j]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlapMatrix {
    /// Page title.
    pub title: String,
    /// Partner names, in row/column order.
    pub parties: Vec<String>,
    /// N×N cells; missing cells render empty.
    pub cells: Vec<Vec<MatrixCell>>,
}

/// An overlap matrix as a self-contained HTML page: a heat-map table whose colour is scaled to
/// the largest released value; forbidden, suppressed and failed pairs are shown as such.
pub fn render_matrix_html(matrix: &OverlapMatrix) -> String {
    let mut out = String::with_capacity(8 * 1024);
    page_start(&mut out, &matrix.title);
    let _ = writeln!(
        out,
        "<header><h1>{}</h1><p class=\"sub\">Overlap between {} partners</p></header>",
        escape_html(&matrix.title),
        matrix.parties.len()
    );
    out.push_str("<section>\n<table class=\"matrix\">\n<thead><tr><th></th>");
    for party in &matrix.parties {
        let _ = write!(out, "<th>{}</th>", escape_html(party));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    let max = matrix
        .cells
        .iter()
        .flatten()
        .filter_map(|c| match c {
            MatrixCell::Value(v) => Some(*v),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    for (i, party) in matrix.parties.iter().enumerate() {
        let _ = write!(out, "<tr><th class=\"row\">{}</th>", escape_html(party));
        for j in 0..matrix.parties.len() {
            let cell = matrix
                .cells
                .get(i)
                .and_then(|row| row.get(j))
                .unwrap_or(&MatrixCell::Empty);
            match cell {
                MatrixCell::Value(v) => {
                    let share = if max == 0 {
                        0.0
                    } else {
                        *v as f64 / max as f64
                    };
                    let (bg, fg) = heat(share);
                    let _ = write!(
                        out,
                        "<td class=\"cell value\" style=\"background:{bg};color:{fg}\" \
                         title=\"{} ∩ {}: {}\">{}</td>",
                        escape_html(party),
                        escape_html(&matrix.parties[j]),
                        group_digits(*v),
                        group_digits(*v)
                    );
                }
                MatrixCell::Forbidden(reason) => {
                    let title = if reason.is_empty() {
                        "not allowed by the agreements"
                    } else {
                        reason.as_str()
                    };
                    let _ = write!(
                        out,
                        "<td class=\"cell forbidden\" title=\"{}\">forbidden</td>",
                        escape_html(title)
                    );
                }
                MatrixCell::Suppressed => out.push_str(
                    "<td class=\"cell suppressed\" title=\"below the release threshold\">\
                     suppressed</td>",
                ),
                MatrixCell::Failed(reason) => {
                    let _ = write!(
                        out,
                        "<td class=\"cell failed\" title=\"{}\">failed</td>",
                        escape_html(reason)
                    );
                }
                MatrixCell::Empty => out.push_str("<td class=\"cell self\">·</td>"),
            }
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table>\n</section>\n");
    page_end(&mut out, None);
    out
}

/// Background and text colour for a share (0..=1) of the largest value: light to deep blue.
fn heat(share: f64) -> (String, &'static str) {
    let share = share.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * share).round() as u8;
    // #eff6ff → #1e40af
    let (r, g, b) = (lerp(239.0, 30.0), lerp(246.0, 64.0), lerp(255.0, 175.0));
    let fg = if share > 0.55 { "#ffffff" } else { "#1f2933" };
    (format!("#{r:02x}{g:02x}{b:02x}"), fg)
}

#[cfg(test)]
mod tests {
    use cleanroom_proto::v1::{PartySpec, PsiOutcome};

    use super::*;
    use crate::store::{JobStore, NewSchedule};

    const DAY: i64 = 86_400_000;
    /// 2025-01-06 02:00 UTC.
    const T0: i64 = 1_736_128_800_000;

    /// Checks that every element is closed in order (void elements excepted), attributes are
    /// quoted evenly, and no `<script` appears: a small well-formedness check for our output.
    fn check_well_formed(html: &str) -> Result<(), String> {
        const VOID: [&str; 4] = ["meta", "br", "hr", "img"];
        let mut stack: Vec<String> = Vec::new();
        let mut rest = html;
        if !rest.starts_with("<!DOCTYPE html>") {
            return Err("no doctype".into());
        }
        while let Some(start) = rest.find('<') {
            rest = &rest[start..];
            if rest.starts_with("<!") {
                let end = rest.find('>').ok_or("unterminated declaration")?;
                rest = &rest[end + 1..];
                continue;
            }
            let end = rest.find('>').ok_or("unterminated tag")?;
            let tag = &rest[1..end];
            rest = &rest[end + 1..];
            if !tag.matches('"').count().is_multiple_of(2) {
                return Err(format!("unbalanced quotes in <{tag}>"));
            }
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack.pop().ok_or(format!("</{name}> closes nothing"))?;
                if open != name.trim() {
                    return Err(format!("</{name}> closes <{open}>"));
                }
                continue;
            }
            let name: String = tag
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            if name.is_empty() {
                return Err(format!("bad tag <{tag}>"));
            }
            if name == "script" {
                return Err("a script element".into());
            }
            if tag.ends_with('/') || VOID.contains(&name.as_str()) {
                continue;
            }
            if name == "style" {
                let close = rest.find("</style>").ok_or("unclosed style")?;
                rest = &rest[close + "</style>".len()..];
                continue;
            }
            stack.push(name);
        }
        if stack.is_empty() {
            Ok(())
        } else {
            Err(format!("unclosed: {stack:?}"))
        }
    }

    fn schedule_with_history() -> (tempfile::TempDir, ScheduleReport) {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(&dir.path().join("jobs.sqlite")).unwrap();
        let party = |node: &str| PartySpec {
            node: node.into(),
            dataset: "customers".into(),
            keys: vec!["email".into()],
            learns_membership: false,
        };
        let spec = JobSpec {
            kind: JobKind::Overlap as i32,
            parties: vec![party("acme"), party("globex")],
            purpose: "overlap-reporting".into(),
            aggregate: None,
            overlap_sum: None,
        };
        store
            .add_schedule(
                &NewSchedule {
                    name: "acme-globex".into(),
                    cron: "0 2 * * *".into(),
                    timezone: "UTC".into(),
                    spec: spec.clone(),
                    owner: "alice".into(),
                    max_retries: 1,
                    backoff_base_secs: 60,
                },
                T0 - DAY,
            )
            .unwrap();
        let values = [1200u64, 1250, 1190, 1300, 1342];
        let mut day = 0;
        for (i, value) in values.iter().enumerate() {
            let at = T0 + day * DAY;
            day += 1;
            let job = store.submit(&spec, &format!("k{i}"), "alice", at).unwrap();
            for state in [JobState::Offered, JobState::Running] {
                store.transition(&job.job_id, state, "", at).unwrap();
            }
            store
                .put_result(
                    &job.job_id,
                    "acme",
                    &PsiOutcome {
                        intersection: *value,
                        ..PsiOutcome::default()
                    },
                )
                .unwrap();
            store
                .transition(&job.job_id, JobState::Succeeded, "both agreed", at)
                .unwrap();
            store
                .record_run("acme-globex", at, 0, &job.job_id, "cron", at)
                .unwrap();
            if i == 2 {
                // A failed night with a hostile reason, and its vetoed retry.
                let at = T0 + day * DAY;
                day += 1;
                let failed = store.submit(&spec, "f", "alice", at).unwrap();
                store
                    .transition(
                        &failed.job_id,
                        JobState::Failed,
                        "<script>alert('x')</script>, \"quoted\"\nline",
                        at,
                    )
                    .unwrap();
                store
                    .record_run("acme-globex", at, 0, &failed.job_id, "cron", at)
                    .unwrap();
                let vetoed = store.submit(&spec, "v", "alice", at).unwrap();
                store
                    .transition(&vetoed.job_id, JobState::Vetoed, "=cmd|' /C calc'!A0", at)
                    .unwrap();
                store
                    .record_run("acme-globex", at, 1, &vetoed.job_id, "retry 1 of 1", at)
                    .unwrap();
                store
                    .record_skipped("acme-globex", T0 + day * DAY, "missed: down", at)
                    .unwrap();
                day += 1;
            }
        }
        let schedule = store.schedule_for_report("acme-globex").unwrap().unwrap();
        let runs = store.runs("acme-globex", 0).unwrap();
        let report = ScheduleReport::build(&schedule, &runs, T0 - DAY, T0 + 30 * DAY);
        (dir, report)
    }

    #[test]
    fn html_report_is_well_formed_with_a_point_per_success() {
        let (_dir, mut report) = schedule_with_history();
        assert_eq!(report.runs.len(), 8);
        // Text the store would never accept is escaped all the same.
        report.purpose = "overlap-reporting & <audit>".into();
        let html = render_html(&report);
        check_well_formed(&html).unwrap();
        assert_eq!(html.matches("<svg class=\"chart\"").count(), 1);
        assert_eq!(html.matches("<circle class=\"point\"").count(), 5);
        assert_eq!(html.matches("<g class=\"failure-mark\"").count(), 2);
        assert!(html.contains("<polyline"));
        // Escaped, never raw.
        assert!(!html.contains("<script"));
        assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
        assert!(html.contains("overlap-reporting &amp; &lt;audit&gt;"));
        // No external assets.
        for needle in ["http://", "https://", "src=", "href=", "@import", "url("] {
            let outside_ns = html.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
            assert!(!outside_ns.contains(needle), "{needle}");
        }
        // Header and summary.
        assert!(html.contains("<code>0 2 * * *</code> in UTC"));
        assert!(html.contains("1,342"));
        assert!(html.contains("▲ +42 (+3.2%)"));
        let summary = report.summary();
        assert_eq!(
            (
                summary.jobs,
                summary.succeeded,
                summary.failed_or_vetoed,
                summary.skipped
            ),
            (7, 5, 2, 1)
        );
    }

    #[test]
    fn html_report_without_runs_still_renders() {
        let (_dir, mut report) = schedule_with_history();
        report.runs.clear();
        let html = render_html(&report);
        check_well_formed(&html).unwrap();
        assert!(html.contains("No released figures"));
        assert!(html.contains("No runs in this window"));
        assert_eq!(html.matches("class=\"point\"").count(), 0);
    }

    #[test]
    fn csv_parses_back() {
        let (_dir, report) = schedule_with_history();
        let csv = render_csv(&report);
        let mut reader = csv::Reader::from_reader(csv.as_bytes());
        let headers = reader.headers().unwrap().clone();
        assert_eq!(&headers[5], "status");
        let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
        assert_eq!(rows.len(), report.runs.len());
        for (row, run) in rows.iter().zip(&report.runs) {
            assert_eq!(row[2].parse::<i64>().unwrap(), run.scheduled_for_ms);
            assert_eq!(&row[5], run.status);
            assert_eq!(row[6].parse::<u64>().ok(), run.intersection, "{row:?}");
        }
        let failed = rows.iter().find(|r| &r[5] == "failed").unwrap();
        assert_eq!(&failed[8], "<script>alert('x')</script>, \"quoted\"\nline");
        // Formula-looking text is defused.
        let vetoed = rows.iter().find(|r| &r[5] == "vetoed").unwrap();
        assert_eq!(&vetoed[8], "'=cmd|' /C calc'!A0");
    }

    #[test]
    fn json_round_trips() {
        let (_dir, report) = schedule_with_history();
        let json = render_json(&report);
        assert_eq!(ScheduleReport::from_json(&json).unwrap(), report);
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["runs"].as_array().unwrap().len(), 8);
        assert_eq!(value["runs"][0]["intersection"], 1200);
    }

    #[test]
    fn matrix_is_a_heat_map() {
        let m = OverlapMatrix {
            title: "Q3 <overlaps>".into(),
            parties: vec!["acme".into(), "globex".into(), "initech".into()],
            cells: vec![
                vec![
                    MatrixCell::Empty,
                    MatrixCell::Value(1000),
                    MatrixCell::Forbidden("initech: <no agreement>".into()),
                ],
                vec![
                    MatrixCell::Value(1000),
                    MatrixCell::Empty,
                    MatrixCell::Value(100),
                ],
                vec![
                    MatrixCell::Suppressed,
                    MatrixCell::Failed("<b>timeout</b>".into()),
                ],
            ],
        };
        let html = render_matrix_html(&m);
        check_well_formed(&html).unwrap();
        assert!(html.contains("Q3 &lt;overlaps&gt;"));
        assert_eq!(html.matches("class=\"cell value\"").count(), 3);
        // The largest value gets the darkest colour.
        assert!(html.contains("background:#1e40af;color:#ffffff\""));
        assert!(html.contains(">forbidden</td>") && html.contains(">suppressed</td>"));
        assert!(html.contains("title=\"initech: &lt;no agreement&gt;\">forbidden</td>"));
        assert!(html.contains("title=\"&lt;b&gt;timeout&lt;/b&gt;\">failed</td>"));
        // The missing cell renders empty.
        assert_eq!(html.matches("class=\"cell self\"").count(), 3);
    }

    #[test]
    fn since_windows_parse() {
        assert_eq!(parse_since("90d"), Ok(90 * DAY));
        assert_eq!(parse_since("2w"), Ok(14 * DAY));
        assert_eq!(parse_since("12h"), Ok(12 * 3_600_000));
        assert!(parse_since("90").unwrap_err().contains("no unit"));
        assert!(parse_since("d").unwrap_err().contains("number"));
        assert!(parse_since("5y").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn axis_steps_are_nice() {
        assert_eq!(nice_axis(1342, 5), (1500, 500));
        assert_eq!(nice_axis(0, 5), (1, 1));
        assert_eq!(nice_axis(97, 5), (100, 20));
        assert_eq!(group_digits(1_234_567), "1,234,567");
    }
}
