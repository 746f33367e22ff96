//! `cleanroom-node budget`: privacy loss spent and remaining per partner and purpose, in the
//! current window and over the ledger's whole life, and node-wide, read from the ledger against
//! the policy's caps.
//!
//! "Spent" is ε at the node's `dp_delta`: the pure ε of discrete Laplace releases plus the
//! (ε, δ) reading of the zCDP ρ of discrete Gaussian ones, composed as [`crate::ledger`]
//! documents; the ρ part is shown on its own too.

use serde::Serialize;

use crate::ledger::{Budget, Period};
use crate::ledger::{Ledger, LedgerError, Spend, show, show_time};
use crate::policy::NodeConfig;

/// One line of the report: a (partner, purpose) budget, or the node-wide one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetLine {
    /// The partner, or `*` for the node-wide budget.
    pub partner: String,
    /// The purpose, or `*` for the node-wide budget.
    pub purpose: String,
    /// The window the figures are for (`hour`, `day`, `week`; a sliding window ending now).
    pub period: &'static str,
    /// ε allowed per period; `None` = no window cap.
    pub cap: Option<f64>,
    /// ε (at `delta`) charged in the window.
    pub spent: f64,
    /// ε left in the window; `None` = no window cap.
    pub remaining: Option<f64>,
    /// Charges in the window.
    pub charges: u64,
    /// When the oldest charge leaves the window (RFC 3339 UTC); `None` if nothing was spent.
    pub next_refresh: Option<String>,
    /// zCDP ρ charged in the window (discrete Gaussian releases), part of `spent`.
    pub rho: f64,
    /// ε allowed over the ledger's whole life; `None` = no lifetime cap.
    pub lifetime_cap: Option<f64>,
    /// ε (at `delta`) charged over the ledger's whole life.
    pub lifetime_spent: f64,
    /// ε left for ever; `None` = no lifetime cap.
    pub lifetime_remaining: Option<f64>,
    /// The δ at which the figures are read (the node's `dp_delta`).
    pub delta: f64,
}

/// Builds the report at `now_ms`: every (partner, purpose) of the policy's agreements, then any
/// other pair the ledger has charged (a removed agreement, an aggregate's peer set), then the
/// node-wide line. A pair without a window cap is shown over the node-wide period (a day if
/// there is none).
pub fn report(
    cfg: &NodeConfig,
    ledger: &Ledger,
    now_ms: i64,
) -> Result<Vec<BudgetLine>, LedgerError> {
    let uncapped = cfg.budget.as_ref().map_or(Period::Day, |b| b.period);
    let delta = cfg.delta();
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
        let scope = Some((partner.as_str(), purpose.as_str()));
        let window = ledger.spent(scope, Some(period), now_ms, delta)?;
        let life = ledger.spent(scope, None, now_ms, delta)?;
        lines.push(line(partner, purpose, period, cap, window, life, delta));
    }
    let node = cfg.budget.as_ref();
    let window = ledger.spent(None, Some(uncapped), now_ms, delta)?;
    let life = ledger.spent(None, None, now_ms, delta)?;
    lines.push(line(
        "*".into(),
        "*".into(),
        uncapped,
        node,
        window,
        life,
        delta,
    ));
    Ok(lines)
}

fn line(
    partner: String,
    purpose: String,
    period: Period,
    cap: Option<&Budget>,
    window: Spend,
    life: Spend,
    delta: f64,
) -> BudgetLine {
    let per_period = cap.and_then(|c| c.epsilon_per_period).map(|e| e.get());
    let lifetime = cap.and_then(|c| c.epsilon_lifetime).map(|e| e.get());
    BudgetLine {
        partner,
        purpose,
        period: period.as_str(),
        cap: per_period,
        spent: tidy(window.spent),
        remaining: per_period.map(|c| tidy((c - window.spent).max(0.0))),
        charges: window.charges,
        next_refresh: window.next_refresh_ms.map(show_time),
        rho: tidy(window.rho),
        lifetime_cap: lifetime,
        lifetime_spent: tidy(life.spent),
        lifetime_remaining: lifetime.map(|c| tidy((c - life.spent).max(0.0))),
        delta,
    }
}

/// Sums of decimal ε carry binary rounding (ten charges of 0.1 are 0.9999999999999999): round
/// to 1e-9, the ledger's comparison slack, so JSON says 1 and 0 rather than 1 − 2^-53 and 1e-16.
fn tidy(epsilon: f64) -> f64 {
    // `+ 0.0` turns a negative zero (which rounding keeps) into zero.
    (epsilon * 1e9).round() / 1e9 + 0.0
}

const HEADER: [&str; 12] = [
    "partner",
    "purpose",
    "period",
    "cap",
    "spent",
    "remaining",
    "charges",
    "next refresh (UTC)",
    "rho",
    "lifetime cap",
    "lifetime spent",
    "lifetime remaining",
];

/// An aligned text table, with a note of the δ the figures are read at.
pub fn to_table(lines: &[BudgetLine]) -> String {
    let rows: Vec<[String; 12]> = lines.iter().map(cells).collect();
    let header = HEADER.map(str::to_owned);
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
    if let Some(l) = lines.first() {
        out.push_str(&format!(
            "epsilon is read at delta {:e}: pure-epsilon (Laplace) charges add up as epsilon, \
             zCDP (Gaussian) charges as rho, spent = epsilon + rho + 2*sqrt(rho*ln(1/delta))\n",
            l.delta
        ));
    }
    out
}

/// CSV with a header row; empty cells where there is no cap or no refresh.
pub fn to_csv(lines: &[BudgetLine]) -> String {
    let mut out = String::from(
        "partner,purpose,period,cap,spent,remaining,charges,next_refresh,rho,lifetime_cap,\
         lifetime_spent,lifetime_remaining,delta\n",
    );
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
            show(l.rho),
            l.lifetime_cap.map(show).unwrap_or_default(),
            show(l.lifetime_spent),
            l.lifetime_remaining.map(show).unwrap_or_default(),
            format!("{:e}", l.delta),
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

fn cells(l: &BudgetLine) -> [String; 12] {
    [
        l.partner.clone(),
        l.purpose.clone(),
        l.period.to_owned(),
        l.cap.map_or("none".to_owned(), show),
        show(l.spent),
        l.remaining.map_or("none".to_owned(), show),
        l.charges.to_string(),
        l.next_refresh.clone().unwrap_or_else(|| "-".to_owned()),
        show(l.rho),
        l.lifetime_cap.map_or("none".to_owned(), show),
        show(l.lifetime_spent),
        l.lifetime_remaining.map_or("none".to_owned(), show),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::{NOW, customers, epsilon_charge, node_head};
    use std::path::Path;

    fn config_text() -> String {
        node_head("acme")
            + "budget = { epsilon_per_period = 5, period = \"week\" }\n"
            + &customers("acme.csv")
            + r#"
[[agreement]]
partner = "globex"
purposes = ["reporting", "fraud"]
budget_per_purpose = { epsilon_per_period = 1, period = "day", epsilon_lifetime = 3 }
  [[agreement.allow]]
  computation = "overlap"
  dataset = "customers"
  keys = ["email"]
  epsilon = 0.25
"#
    }

    fn charge(partner: &str, purpose: &str, epsilon: f64) -> crate::ledger::Charge {
        epsilon_charge("job", partner, purpose, epsilon)
    }

    #[test]
    fn report_lists_policy_pairs_ledger_pairs_and_node_wide() {
        let cfg = NodeConfig::parse(&config_text(), Path::new("/srv/acme/node.toml")).unwrap();
        let ledger = Ledger::open(Path::new(":memory:")).unwrap();
        ledger
            .charge_and_draw(
                "1",
                &charge("globex", "reporting", 0.25),
                NOW - 1000,
                || Ok::<i64, String>(0),
            )
            .unwrap();
        ledger
            .charge_and_draw("2", &charge("hooli", "old", 0.5), NOW - 2000, || {
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
        // Nothing spent is zero, not negative zero (which JSON prints as -0.0).
        assert!(lines[1].spent.is_sign_positive());
        assert_eq!(lines[1].next_refresh, None);
        assert!(!to_json(&lines).contains(": -0"), "{}", to_json(&lines));
        assert_eq!((lines[2].cap, lines[2].period), (None, "week"));
        assert_eq!(lines[3].spent, 0.75);
        assert_eq!(lines[3].remaining, Some(4.25));
        assert_eq!(lines[3].charges, 2);
        assert_eq!(lines[0].lifetime_cap, Some(3.0));
        assert_eq!(lines[0].lifetime_spent, 0.25);
        assert_eq!(lines[0].lifetime_remaining, Some(2.75));
        assert_eq!(
            (lines[3].lifetime_cap, lines[3].lifetime_spent),
            (None, 0.75)
        );

        let table = to_table(&lines);
        assert!(table.starts_with("partner  purpose"), "{table}");
        assert!(
            table.contains("globex   reporting  day     1     0.25   0.75       1"),
            "{table}"
        );
        let csv = to_csv(&lines);
        assert!(
            csv.contains("\nglobex,fraud,day,1,0,1,0,,0,3,0,3,1e-9\n"),
            "{csv}"
        );
        assert!(csv.contains("\nhooli,old,week,,0.5,,1,"), "{csv}");
        let json: serde_json::Value = serde_json::from_str(&to_json(&lines)).unwrap();
        assert_eq!(json[3]["remaining"], 4.25);
        assert_eq!(json[2]["cap"], serde_json::Value::Null);
        // Ten charges of 0.1 read as 1 spent, 0 remaining.
        for i in 0..10 {
            ledger
                .charge_and_draw(
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
