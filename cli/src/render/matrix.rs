//! An overlap matrix of N partners: its data and its HTML page, a heat-map table.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::page::{escape_html, group_digits, page_end, page_start};

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
    use super::super::page::check_well_formed;
    use super::*;

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
}
