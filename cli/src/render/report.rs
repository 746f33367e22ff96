//! A schedule's report, rendered from the coordinator's JSON ([`ScheduleReport`]):
//! - [`render_html`]: one self-contained page with a header (schedule, cron, parties, purpose),
//!   a summary (runs, succeeded, last value, trend), a line chart of the released intersection
//!   over time (failed and vetoed runs marked on the time axis) and a table of every run;
//! - [`render_csv`]: one row per run, RFC 4180 quoting; text cells that a spreadsheet would take
//!   for a formula are defused ([`crate::text::csv_text`]).
//!
//! All text from the store (reasons, names, purposes) is escaped.

use std::fmt::Write as _;

use cleanroom_coordinator::api::web::chart::fitted_axis;
use cleanroom_coordinator::report::{ReportRun, ScheduleReport, format_time, format_with, zone};
use jiff::tz::TimeZone;

use super::page::{escape_html, group_digits, page_end, page_start};
use crate::text::csv_text;

/// The runs as CSV, one row per run, with a header row.
pub fn render_csv(report: &ScheduleReport) -> String {
    let mut out = String::from(
        "schedule,scheduled_for,scheduled_for_ms,attempt,job_id,status,intersection,noise_scale,reason,note,smaller_set,overlap_rate\r\n",
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
            run.smaller_set.map(|v| v.to_string()).unwrap_or_default(),
            overlap_rate(run)
                .map(|r| format!("{r:.4}"))
                .unwrap_or_default(),
        ];
        out.push_str(&fields.join(","));
        out.push_str("\r\n");
    }
    out
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
        "<p class=\"sub\">Recurring {} between {} · {}</p>",
        escape_html(&report.kind),
        escape_html(
            &report
                .parties
                .iter()
                .map(|p| p.node.as_str())
                .collect::<Vec<_>>()
                .join(" and ")
        ),
        escape_html(&run_range(report, &tz))
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
    let last_released = report.runs.iter().rev().find(|r| r.intersection.is_some());
    card(
        &mut out,
        "Last overlap rate",
        &last_released
            .and_then(overlap_rate)
            .map_or_else(|| "—".to_owned(), percent),
        "",
    );
    card(
        &mut out,
        "Last smaller set",
        &last_released
            .and_then(|r| r.smaller_set)
            .map_or_else(|| "—".to_owned(), group_digits),
        "",
    );
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
             <th class=\"num\">Smaller set</th><th class=\"num\">Overlap rate</th>\
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
                 <td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"reason\">{}</td></tr>",
                escape_html(&run.scheduled_for),
                run.attempt,
                escape_html(run.job_id.as_deref().unwrap_or("—")),
                status_class,
                escape_html(&run.status),
                run.intersection.map_or_else(String::new, group_digits),
                run.smaller_set.map_or_else(String::new, group_digits),
                overlap_rate(run).map_or_else(String::new, percent),
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

/// A run's overlap rate: its released intersection over the smaller of the two set sizes
/// (0 to 1); `None` without both, or with an empty smaller set.
fn overlap_rate(run: &ReportRun) -> Option<f64> {
    let (i, n) = (run.intersection?, run.smaller_set?);
    (n > 0).then(|| i as f64 / n as f64)
}

fn percent(rate: f64) -> String {
    format!("{:.1}%", rate * 100.0)
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

/// The window the report covers, in words: the dates of its first and last runs (not the
/// start of a window that defaults to 1970).
fn run_range(report: &ScheduleReport, tz: &TimeZone) -> String {
    let day = |ms: i64| format_with(ms, tz, "%Y-%m-%d");
    match (report.runs.first(), report.runs.last()) {
        (Some(a), Some(b)) => format!(
            "runs from {} to {}",
            day(a.scheduled_for_ms),
            day(b.scheduled_for_ms)
        ),
        _ if report.since_ms > 0 => format!("no runs since {}", day(report.since_ms)),
        _ => "no runs yet".to_owned(),
    }
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

    // The y-axis is fitted to the data, not started at 0: a fall from 2,468 to 2,408 shows.
    let lo = points.iter().map(|&(_, v)| v).min().unwrap_or(0) as f64;
    let hi = points.iter().map(|&(_, v)| v).max().unwrap_or(0) as f64;
    let (y_min, y_max, y_step) = fitted_axis(lo, hi);
    let yf = |v: f64| base_y - (v - y_min) / (y_max - y_min) * plot_h;
    let y = |v: u64| yf(v as f64);

    // Grid and y labels.
    let mut tick = 0.0;
    while y_min + tick * y_step <= y_max + y_step / 1000.0 {
        let v = (y_min + tick * y_step).round() as u64;
        tick += 1.0;
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

#[cfg(test)]
mod tests {
    use cleanroom_coordinator::report::render_json;
    use cleanroom_coordinator::store::{JobStore, NewSchedule};
    use cleanroom_proto::v1::{JobKind, JobState, PsiOutcome};

    use super::super::page::check_well_formed;
    use super::*;

    const DAY: i64 = 86_400_000;
    /// 2025-01-06 02:00 UTC.
    const T0: i64 = 1_736_128_800_000;

    fn schedule_with_history() -> (tempfile::TempDir, ScheduleReport) {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(&dir.path().join("jobs.sqlite")).unwrap();
        let spec = crate::cluster::customers_spec(
            &["acme", "globex"],
            JobKind::Overlap,
            "overlap-reporting",
        );
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
        // A run at `at` whose job (idempotency key `key`) ended at once in `state`, for `reason`.
        let ended_run = |key: &str, attempt, state, reason: &str, note: &str, at| {
            let job = store.submit(&spec, key, "alice", at).unwrap();
            store.transition(&job.job_id, state, reason, at).unwrap();
            store
                .record_run("acme-globex", at, attempt, &job.job_id, note, at)
                .unwrap();
        };
        let hostile = "<script>alert('x')</script>, \"quoted\"\nline";
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
                        own_set_size: 4000,
                        peer_set_size: 5000,
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
                ended_run("f", 0, JobState::Failed, hostile, "cron", at);
                ended_run(
                    "v",
                    1,
                    JobState::Vetoed,
                    "=cmd|' /C calc'!A0",
                    "retry 1 of 1",
                    at,
                );
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
        // Rates and set sizes as well as counts: 1,342 of the smaller set of 4,000.
        assert!(html.contains("Last overlap rate"));
        assert!(html.contains(">33.6%<"), "no rate of the last run");
        assert!(html.contains(">4,000<"), "no set size");
        assert_eq!(
            html.matches(">30.0%<").count(),
            1,
            "1,200 of 4,000 in the runs table"
        );
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
        let last = rows.iter().rev().find(|r| &r[5] == "succeeded").unwrap();
        assert_eq!((&last[10], &last[11]), ("4000", "0.3355"));
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
    fn the_axis_is_fitted_and_the_window_has_real_dates() {
        // Released values 1,190 to 1,342: the axis starts near them, not at 0 (which made a
        // fall look flat), and the subtitle names the runs' dates, not 1970.
        let (_dir, report) = schedule_with_history();
        let html = render_html(&report);
        assert!(
            !html.contains("text-anchor=\"end\">0<"),
            "the y-axis starts at 0"
        );
        let ticks: Vec<u64> = html
            .split("text-anchor=\"end\">")
            .skip(1)
            .filter_map(|t| t.split('<').next()?.replace(',', "").parse().ok())
            .collect();
        let lowest = *ticks.iter().min().unwrap();
        assert!((1100..=1190).contains(&lowest), "{ticks:?}");
        assert!(!html.contains("1970"));
        assert!(html.contains("runs from 20"), "no date range");
        assert_eq!(group_digits(1_234_567), "1,234,567");
    }
}
