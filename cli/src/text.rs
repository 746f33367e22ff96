//! Small text helpers every output of the CLI shares: times, job kinds, CSV cells, the state
//! history that table renderings end with.

pub use cleanroom_coordinator::client::kind_name;
use cleanroom_coordinator::client::state_name;
use cleanroom_proto::v1::{JobInfo, JobSpec};
use serde_json::{Value, json};

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SSZ` (UTC, to the second); the bare number if out of
/// range.
pub fn time(ms: i64) -> String {
    match jiff::Timestamp::from_second(ms.div_euclid(1000)) {
        Ok(t) => t.strftime("%Y-%m-%d %H:%M:%SZ").to_string(),
        Err(_) => ms.to_string(),
    }
}

/// A spec's parties as `node:dataset`, in order.
pub fn parties(spec: &JobSpec) -> Vec<String> {
    spec.parties
        .iter()
        .map(|p| format!("{}:{}", p.node, p.dataset))
        .collect()
}

/// The join keys of a spec (its first party's), as the tables print them.
pub fn keys(spec: &JobSpec) -> String {
    spec.parties
        .first()
        .map(|p| p.keys.join("+"))
        .unwrap_or_default()
}

/// The `state` line of a job's table: its state, then its reason after a dash.
pub fn state_line(job: &JobInfo) -> String {
    let state = state_name(job.state);
    if job.reason.is_empty() {
        format!("state      {state}")
    } else {
        format!("state      {state} — {}", job.reason)
    }
}

/// A job's state history as every table rendering ends with: a `history` line, then one line
/// per change (time, state, reason).
pub fn history_text(job: &JobInfo) -> String {
    let mut out = String::from("history\n");
    for h in &job.history {
        out.push_str(&format!(
            "  {}  {:<10} {}\n",
            time(h.at_ms),
            state_name(h.state),
            h.reason
        ));
    }
    out
}

/// Prints `value` as pretty JSON on standard output.
pub fn print_json(value: &impl serde::Serialize) {
    cleanroom_node::outln!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// A job's state history as JSON: one object per change (state, Unix ms, reason).
pub fn history_json(job: &JobInfo) -> Vec<Value> {
    job.history
        .iter()
        .map(|h| json!({ "state": state_name(h.state), "at_ms": h.at_ms, "reason": h.reason }))
        .collect()
}

/// The CSV of a job that has no result (yet): its id, state and reason.
pub fn csv_without_result(job: &JobInfo) -> String {
    format!(
        "job_id,state,reason\n{},{},{}\n",
        job.job_id,
        state_name(job.state),
        csv_field(&job.reason)
    )
}

/// `s` as one CSV field: quoted when it holds a comma, a quote or a line break.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// One CSV text cell that a spreadsheet will open: text it would take for a formula (starting
/// with `=`, `+`, `-` or `@`; a lone `-` is a dash) is prefixed with `'`, then quoted as
/// [`csv_field`].
pub fn csv_text(s: &str) -> String {
    if s.starts_with(['=', '+', '-', '@']) && s != "-" {
        csv_field(&format!("'{s}"))
    } else {
        csv_field(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_quoted_and_formulas_defused() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\r\nlines"), "\"two\r\nlines\"");
        assert_eq!(csv_text("=1+1"), "'=1+1");
        assert_eq!(csv_text("@SUM(A1),x"), "\"'@SUM(A1),x\"");
        assert_eq!(csv_text("-"), "-");
        assert_eq!(csv_text("-3"), "'-3");
        assert_eq!(time(1_736_128_800_123), "2025-01-06 02:00:00Z");
        assert_eq!(time(i64::MAX), i64::MAX.to_string());
    }
}
