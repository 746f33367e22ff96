//! `cleanroom-node budget`: ε spent and remaining per partner and purpose in the current
//! window, and node-wide, read from the ledger against the policy's caps.

use serde::Serialize;

use crate::NodeConfig;
use crate::config::{Budget, Period};
use crate::ledger::{Ledger, LedgerError, show, show_time};

/// One line of the report: a (partner, purpose) budget, or the node-wide one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetLine {
    /// The partner, or `*` for the node-wide budget.
    pub partner: String,
    /// The purpose, or `*` for the node-wide budget.
    pub purpose: String,
    /// The window the figures are for (`hour`, `day`, `week`; a sliding window ending now).
    pub period: &'static str,
    /// ε allowed per period; `None` = no cap.
    pub cap: Option<f64>,
    /// ε charged in the window.
    pub spent: f64,
    /// ε left in the window; `None` = no cap.
    pub remaining: Option<f64>,
    /// Charges in the window.
    pub charges: u64,
    /// When the oldest charge leaves the window (RFC 3339 UTC); `None` if nothing was spent.
    pub next_refresh: Option<String>,
}

/// Builds the report at `now_ms`: every (partner, purpose) of the policy's agreements, then any
/// other pair the ledger has charged (a removed agreement), then the node-wide line. A pair
/// without a cap is shown over the node-wide period (a day if there is none).
pub fn report(
    cfg: &NodeConfig,
    ledger: &Ledger,
    now_ms: i64,
) -> Result<Vec<BudgetLine>, LedgerError> {
    let uncapped = cfg.budget.as_ref().map_or(Period::Day, |b| b.period);
    let mut scopes: Vec<(String, String, Option<&Budget>)> = Vec::new();
    for a in &cfg.agreements {
        for p in &a.purposes {
            scopes.push((a.partner.clone(), p.clone(), a.budget_per_purpose.as_ref()));
        }
    }
    for (partner, purpose) in ledger.scopes()? {
        if !scopes
            .iter()
            .any(|(a, p, _)| *a == partner && *p == purpose)
        {
            scopes.push((partner, purpose, None));
        }
    }
    let mut lines = Vec::new();
    for (partner, purpose, cap) in scopes {
        let period = cap.map_or(uncapped, |c| c.period);
        let spend = ledger.spent(Some((&partner, &purpose)), period, now_ms)?;
        lines.push(line(partner, purpose, period, cap, spend));
    }
    let node = cfg.budget.as_ref();
    let spend = ledger.spent(None, uncapped, now_ms)?;
    lines.push(line("*".into(), "*".into(), uncapped, node, spend));
    Ok(lines)
}

fn line(
    partner: String,
    purpose: String,
    period: Period,
    cap: Option<&Budget>,
    spend: crate::ledger::Spend,
) -> BudgetLine {
    let cap = cap.map(|c| c.epsilon_per_period.get());
    BudgetLine {
        partner,
        purpose,
        period: period.as_str(),
        cap,
        spent: tidy(spend.spent),
        remaining: cap.map(|c| tidy((c - spend.spent).max(0.0))),
        charges: spend.charges,
        next_refresh: spend.next_refresh_ms.map(show_time),
    }
}

/// Sums of decimal ε carry binary rounding (ten charges of 0.1 are 0.9999999999999999): round
/// to 1e-9, the ledger's comparison slack, so JSON says 1 and 0 rather than 1 − 2^-53 and 1e-16.
fn tidy(epsilon: f64) -> f64 {
    (epsilon * 1e9).round() / 1e9
}

/// An aligned text table.
pub fn to_table(lines: &[BudgetLine]) -> String {
    let rows: Vec<[String; 8]> = lines.iter().map(cells).collect();
    let header = [
        "partner",
        "purpose",
        "period",
        "cap",
        "spent",
        "remaining",
        "charges",
        "next refresh (UTC)",
    ]
    .map(str::to_owned);
    let mut widths = header.clone().map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// CSV with a header row; empty cells where there is no cap or no refresh.
pub fn to_csv(lines: &[BudgetLine]) -> String {
    let mut out = String::from("partner,purpose,period,cap,spent,remaining,charges,next_refresh\n");
    for l in lines {
        let row = [
            l.partner.clone(),
            l.purpose.clone(),
            l.period.to_owned(),
            l.cap.map(show).unwrap_or_default(),
            show(l.spent),
            l.remaining.map(show).unwrap_or_default(),
            l.charges.to_string(),
            l.next_refresh.clone().unwrap_or_default(),
        ];
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

/// Pretty JSON: an array of lines.
pub fn to_json(lines: &[BudgetLine]) -> String {
    serde_json::to_string_pretty(lines).unwrap_or_else(|_| "[]".to_owned())
}

fn cells(l: &BudgetLine) -> [String; 8] {
    [
        l.partner.clone(),
        l.purpose.clone(),
        l.period.to_owned(),
        l.cap.map_or("none".to_owned(), show),
        show(l.spent),
        l.remaining.map_or("none".to_owned(), show),
        l.charges.to_string(),
        l.next_refresh.clone().unwrap_or_else(|| "-".to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Charge;
    use std::path::Path;

    const NOW: i64 = 1_782_864_000_000;

    const CONFIG: &str = r#"
name = "acme"
coordinator = "127.0.0.1:7400"
listen = "127.0.0.1:0"
state_dir = "state"
budget = { epsilon_per_period = 5, period = "week" }
[tls]
ca = "ca.pem"
cert = "node.pem"
key = "node.key"
[[dataset]]
name = "customers"
path = "acme.csv"
  [[dataset.identifier]]
  name = "email"
  column = "email"
  normaliser = "email"
[[agreement]]
partner = "globex"
purposes = ["reporting", "fraud"]
budget_per_purpose = { epsilon_per_period = 1, period = "day" }
  [[agreement.allow]]
  computation = "overlap"
  dataset = "customers"
  keys = ["email"]
  epsilon = 0.25
"#;

    fn charge(partner: &str, purpose: &str, epsilon: f64) -> Charge {
        Charge {
            job_id: "job".into(),
            partner: partner.into(),
            purpose: purpose.into(),
            epsilon,
            purpose_cap: None,
            node_cap: None,
        }
    }

    #[test]
    fn report_lists_policy_pairs_ledger_pairs_and_node_wide() {
        let cfg = NodeConfig::parse(CONFIG, Path::new("/srv/acme/node.toml")).unwrap();
        let ledger = Ledger::open(Path::new(":memory:")).unwrap();
        ledger
            .charge_and_store(
                "1",
                &charge("globex", "reporting", 0.25),
                NOW - 1000,
                || Ok::<i64, String>(0),
            )
            .unwrap();
        ledger
            .charge_and_store("2", &charge("hooli", "old", 0.5), NOW - 2000, || {
                Ok::<i64, String>(0)
            })
            .unwrap();
        let lines = report(&cfg, &ledger, NOW).unwrap();
        let names: Vec<(&str, &str)> = lines
            .iter()
            .map(|l| (l.partner.as_str(), l.purpose.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("globex", "reporting"),
                ("globex", "fraud"),
                ("hooli", "old"),
                ("*", "*")
            ]
        );
        assert_eq!(lines[0].cap, Some(1.0));
        assert_eq!(lines[0].spent, 0.25);
        assert_eq!(lines[0].remaining, Some(0.75));
        assert_eq!(lines[0].period, "day");
        assert_eq!(lines[1].spent, 0.0);
        assert_eq!(lines[1].next_refresh, None);
        assert_eq!((lines[2].cap, lines[2].period), (None, "week"));
        assert_eq!(lines[3].spent, 0.75);
        assert_eq!(lines[3].remaining, Some(4.25));
        assert_eq!(lines[3].charges, 2);

        let table = to_table(&lines);
        assert!(table.starts_with("partner  purpose"), "{table}");
        assert!(
            table.contains("globex   reporting  day     1     0.25   0.75       1"),
            "{table}"
        );
        let csv = to_csv(&lines);
        assert!(csv.contains("\nglobex,fraud,day,1,0,1,0,\n"), "{csv}");
        assert!(csv.contains("\nhooli,old,week,,0.5,,1,"), "{csv}");
        let json: serde_json::Value = serde_json::from_str(&to_json(&lines)).unwrap();
        assert_eq!(json[3]["remaining"], 4.25);
        assert_eq!(json[2]["cap"], serde_json::Value::Null);
        // Ten charges of 0.1 read as 1 spent, 0 remaining.
        for i in 0..10 {
            ledger
                .charge_and_store(
                    &format!("t{i}"),
                    &charge("globex", "fraud", 0.1),
                    NOW,
                    || Ok::<i64, String>(0),
                )
                .unwrap();
        }
        let lines = report(&cfg, &ledger, NOW).unwrap();
        assert_eq!((lines[1].spent, lines[1].remaining), (1.0, Some(0.0)));
    }
}
