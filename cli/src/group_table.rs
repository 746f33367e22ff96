//! A per-group result as aligned text: one row per group, one column per value, suppressed
//! groups marked. Shared by the `aggregate` and `overlap-sum` renderings.

use cleanroom_proto::v1::AggregateGroup;
use serde_json::{Value, json};

/// One group as JSON: its label, whether it is suppressed, and its values by column name.
pub fn group_json(columns: &[String], g: &AggregateGroup) -> Value {
    let values: serde_json::Map<String, Value> = columns
        .iter()
        .zip(&g.values)
        .map(|(c, v)| (c.clone(), json!(v)))
        .collect();
    json!({ "group": g.label, "suppressed": g.suppressed, "values": values })
}

/// A value column's header: its name, with the standard deviation of its noise when it has any
/// (`amount (±12.5)`).
pub fn column_header(name: &str, sd: f64) -> String {
    if sd > 0.0 {
        format!("{name} (±{sd:.1})")
    } else {
        name.to_owned()
    }
}

/// Column widths of a group table: the label column's, then one per value column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Widths {
    label: usize,
    values: Vec<usize>,
}

/// Widths that fit `headers` and the labels and values of `groups` (a paged table sizes itself
/// on its first page).
pub fn widths(headers: &[String], groups: &[AggregateGroup]) -> Widths {
    let label = groups
        .iter()
        .map(|g| g.label.chars().count())
        .chain(std::iter::once(5))
        .max()
        .unwrap_or(5);
    let values = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            groups
                .iter()
                .filter_map(|g| g.values.get(i))
                .map(|v| v.to_string().len())
                .chain(std::iter::once(h.chars().count()))
                .max()
                .unwrap_or(1)
        })
        .collect();
    Widths { label, values }
}

/// The header line (`group` and `headers`), indented by two spaces, with its newline.
pub fn header_line(headers: &[String], w: &Widths) -> String {
    let label = w.label;
    let mut out = format!("  {:<label$}", "group");
    for (h, width) in headers.iter().zip(&w.values) {
        out.push_str(&format!("  {h:>width$}"));
    }
    out.push('\n');
    out
}

/// One group's line (values, or "suppressed"), indented by two spaces, without a newline.
pub fn group_line(g: &AggregateGroup, w: &Widths) -> String {
    let label = w.label;
    let mut line = format!("  {:<label$}", g.label);
    if g.suppressed {
        line.push_str("  suppressed (below the minimum result)");
    } else {
        for (v, width) in g.values.iter().zip(&w.values) {
            line.push_str(&format!("  {v:>width$}"));
        }
    }
    line
}

/// The whole table: the header line, then one line per group, each ending in a newline.
pub fn render(headers: &[String], groups: &[AggregateGroup]) -> String {
    let w = widths(headers, groups);
    let mut out = header_line(headers, &w);
    for g in groups {
        out.push_str(&group_line(g, &w));
        out.push('\n');
    }
    out
}

/// Two groups for the renderings' tests: `label` released with the values 42 and 12345, and
/// `(other)` suppressed.
#[cfg(test)]
pub(crate) fn sample_groups(label: &str) -> Vec<AggregateGroup> {
    vec![
        AggregateGroup {
            label: label.into(),
            suppressed: false,
            values: vec![42, 12345],
        },
        AggregateGroup {
            label: "(other)".into(),
            suppressed: true,
            values: vec![],
        },
    ]
}

/// A succeeded job `job-1` of `spec`, with nothing else, for the renderings' tests.
#[cfg(test)]
pub(crate) fn succeeded_job(spec: cleanroom_proto::v1::JobSpec) -> cleanroom_proto::v1::JobInfo {
    cleanroom_proto::v1::JobInfo {
        job_id: "job-1".into(),
        state: cleanroom_proto::v1::JobState::Succeeded as i32,
        spec: Some(spec),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_suppressed_groups_are_marked() {
        let groups = sample_groups("home");
        let t = render(&["count".into(), "amount".into()], &groups);
        assert_eq!(
            t,
            "  group    count  amount\n  home        42   12345\n  (other)  suppressed (below the minimum result)\n"
        );
    }
}
