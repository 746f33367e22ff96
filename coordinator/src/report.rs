//! A schedule's history as a report (DESIGN §7): the data, and its JSON.
//!
//! [`ScheduleReport::build`] gathers a schedule and its runs ([`JobStore::runs`]) into a plain,
//! serialisable value; [`render_json`] is the value itself ([`ScheduleReport::from_json`] reads
//! it back). The coordinator sends JSON; the CLI renders the HTML file (trend chart, runs table)
//! and the CSV from it, and the web console (`api::web::pages`) its report page.
//!
//! [`JobStore::runs`]: crate::store::JobStore::runs

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
    /// The smaller of the two set sizes the parties reported with it (succeeded runs): the
    /// overlap rate is `intersection / smaller_set`. Absent in reports of older versions.
    #[serde(default)]
    pub smaller_set: Option<u64>,
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
                    smaller_set: if released { run.smaller_set } else { None },
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
    pub fn released(&self) -> impl Iterator<Item = (i64, u64)> + '_ {
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
pub fn zone(name: &str) -> TimeZone {
    if name.eq_ignore_ascii_case("UTC") || name.is_empty() {
        return TimeZone::UTC;
    }
    TimeZone::get(name).unwrap_or(TimeZone::UTC)
}

/// `ms` as `YYYY-MM-DD HH:MM TZ` in `tz` (the bare number if it is out of range).
pub fn format_time(ms: i64, tz: &TimeZone) -> String {
    format_with(ms, tz, "%Y-%m-%d %H:%M %Z")
}

/// `ms` in `tz` with a `strftime` format (the bare number if it is out of range).
pub fn format_with(ms: i64, tz: &TimeZone, fmt: &str) -> String {
    match Timestamp::from_millisecond(ms) {
        Ok(ts) => ts.to_zoned(tz.clone()).strftime(fmt).to_string(),
        Err(_) => ms.to_string(),
    }
}

/// The report as pretty-printed JSON (the [`ScheduleReport`] itself).
pub fn render_json(report: &ScheduleReport) -> String {
    // A struct of strings, numbers and vectors always serialises.
    serde_json::to_string_pretty(report).unwrap_or_else(|err| format!("{{\"error\":\"{err}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    #[test]
    fn since_windows_parse() {
        assert_eq!(parse_since("90d"), Ok(90 * DAY));
        assert_eq!(parse_since("2w"), Ok(14 * DAY));
        assert_eq!(parse_since("12h"), Ok(12 * 3_600_000));
        assert!(parse_since("90").unwrap_err().contains("no unit"));
        assert!(parse_since("d").unwrap_err().contains("number"));
        assert!(parse_since("5y").unwrap_err().contains("unknown unit"));
    }
}
