//! Small text helpers every output of the CLI shares: times, job kinds, CSV cells, the state
//! history that table renderings end with.

use cleanroom_coordinator::client::state_name;
use cleanroom_proto::v1::{JobInfo, JobKind};

/// A job kind as the CLI names it.
pub fn kind_name(kind: i32) -> &'static str {
    match JobKind::try_from(kind) {
        Ok(JobKind::Overlap) => "overlap",
        Ok(JobKind::Match) => "match",
        Ok(JobKind::Aggregate) => "aggregate",
        Ok(JobKind::OverlapSum) => "overlap-sum",
        _ => "unknown",
    }
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SSZ` (UTC, to the second); the bare number if out of
/// range.
pub fn time(ms: i64) -> String {
    match jiff::Timestamp::from_second(ms.div_euclid(1000)) {
        Ok(t) => t.strftime("%Y-%m-%d %H:%M:%SZ").to_string(),
        Err(_) => ms.to_string(),
    }
}

/// A job's state history as the table renderings end with: a `history` line, then one line per
/// change (Unix ms, state, reason).
pub fn history_text(job: &JobInfo) -> String {
    let mut out = String::from("history\n");
    for h in &job.history {
        out.push_str(&format!(
            "  {}  {:<10} {}\n",
            h.at_ms,
            state_name(h.state),
            h.reason
        ));
    }
    out
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
