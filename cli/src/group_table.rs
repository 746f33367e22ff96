//! A per-group result as aligned text: one row per group, one column per value, suppressed
//! groups marked. Shared by the `aggregate` and `overlap-sum` renderings.

use cleanroom_proto::v1::AggregateGroup;

/// The table: a header line (`group` and `headers`), then one line per group, each indented by
/// two spaces and ending in a newline.
pub fn render(headers: &[String], groups: &[AggregateGroup]) -> String {
    let label_width = groups
        .iter()
        .map(|g| g.label.chars().count())
        .chain(std::iter::once(5))
        .max()
        .unwrap_or(5);
    let widths: Vec<usize> = headers
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
    let mut out = format!("  {:<label_width$}", "group");
    for (h, w) in headers.iter().zip(&widths) {
        out.push_str(&format!("  {h:>w$}"));
    }
    out.push('\n');
    for g in groups {
        out.push_str(&format!("  {:<label_width$}", g.label));
        if g.suppressed {
            out.push_str("  suppressed (below the minimum result)");
        } else {
            for (v, w) in g.values.iter().zip(&widths) {
                out.push_str(&format!("  {v:>w$}"));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_suppressed_groups_are_marked() {
        let groups = [
            AggregateGroup {
                label: "home".into(),
                suppressed: false,
                values: vec![42, 12345],
            },
            AggregateGroup {
                label: "(other)".into(),
                suppressed: true,
                values: vec![],
            },
        ];
        let t = render(&["count".into(), "amount".into()], &groups);
        assert_eq!(
            t,
            "  group    count  amount\n  home        42   12345\n  (other)  suppressed (below the minimum result)\n"
        );
    }
}
