//! A publishable transparency summary of the audit log (`cleanroom-node transparency`).
//!
//! Only aggregates: partners, purposes, jobs by computation and outcome, ε released per
//! partner and purpose, releases per recipient, counts of policy loads and deletion requests.
//! No job ids, no released values, no row counts, no key hashes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use serde::Serialize;

use crate::clock::format_ms;

use super::{AuditEntry, AuditEvent, AuditHead};

/// The summary.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Transparency {
    /// The node.
    pub node: String,
    /// Entries from this time on (Unix ms), if limited.
    pub since_ms: Option<i64>,
    /// First and last entry time in the period (Unix ms).
    pub first_ms: Option<i64>,
    /// See `first_ms`.
    pub last_ms: Option<i64>,
    /// The log head the summary was made from (`SEQ:HEX`), so readers can match it.
    pub log_head: String,
    /// Partners that jobs were offered with.
    pub partners: Vec<String>,
    /// Purposes jobs were offered for.
    pub purposes: Vec<String>,
    /// Jobs by partner, purpose, computation and outcome.
    pub jobs: Vec<JobCount>,
    /// ε released by partner and purpose.
    pub epsilon: Vec<EpsilonSpent>,
    /// Releases by recipient and what was released.
    pub releases: Vec<ReleaseCount>,
    /// How often the policy was (re)loaded.
    pub policy_loads: u64,
    /// Deletion requests honoured.
    pub deletion_requests: u64,
}

/// A count of jobs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JobCount {
    /// The partner.
    pub partner: String,
    /// The purpose.
    pub purpose: String,
    /// The computation.
    pub computation: String,
    /// `vetoed`, `completed`, `failed`, or `accepted` (no result recorded yet).
    pub outcome: String,
    /// How many.
    pub jobs: u64,
}

/// ε spent.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EpsilonSpent {
    /// The partner.
    pub partner: String,
    /// The purpose (`unknown` if the job's decision is outside the period).
    pub purpose: String,
    /// Releases counted.
    pub releases: u64,
    /// Total pure ε (discrete Laplace releases).
    pub epsilon: f64,
    /// Total zCDP ρ (aggregate releases; their ε is a zCDP parameter, not added to `epsilon`).
    pub rho: f64,
}

/// A count of releases.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReleaseCount {
    /// Who received it.
    pub recipient: String,
    /// What was released.
    pub what: String,
    /// How many times.
    pub releases: u64,
}

#[derive(Default)]
struct Job {
    partner: String,
    purpose: String,
    computation: String,
    accepted: Option<bool>,
    released: bool,
    failed: bool,
}

/// Builds the summary from entries (of a verified log), counting those at or after `since_ms`.
pub fn summarize(
    node: &str,
    entries: &[AuditEntry],
    head: &AuditHead,
    since_ms: Option<i64>,
) -> Transparency {
    let in_period: Vec<&AuditEntry> = entries
        .iter()
        .filter(|e| since_ms.is_none_or(|s| e.at_ms >= s))
        .collect();
    // Purposes of jobs are looked up over the whole log (a release may follow its decision
    // across the period boundary).
    let mut purpose_of: HashMap<&str, &str> = HashMap::new();
    for e in entries {
        if let AuditEvent::Decision {
            job_id, purpose, ..
        } = &e.event
        {
            purpose_of.insert(job_id, purpose);
        }
    }

    let mut partners = BTreeSet::new();
    let mut purposes = BTreeSet::new();
    let mut jobs: BTreeMap<&str, Job> = BTreeMap::new();
    let mut eps: BTreeMap<(String, String), (u64, f64, f64)> = BTreeMap::new();
    let mut rel: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut policy_loads = 0;
    let mut deletion_requests = 0;
    for e in &in_period {
        match &e.event {
            AuditEvent::PolicyLoaded { .. } => policy_loads += 1,
            AuditEvent::Forget { .. } => deletion_requests += 1,
            AuditEvent::ConnectionRefused { .. } => {}
            AuditEvent::Access { .. } => {}
            AuditEvent::Decision {
                job_id,
                partner,
                purpose,
                computation,
                accepted,
                ..
            } => {
                partners.insert(partner.clone());
                purposes.insert(purpose.clone());
                let j = jobs.entry(job_id).or_default();
                j.partner.clone_from(partner);
                j.purpose.clone_from(purpose);
                j.computation.clone_from(computation);
                // A veto by this node is final, whatever came before.
                j.accepted = Some(j.accepted.unwrap_or(true) && *accepted);
            }
            AuditEvent::Release {
                job_id,
                partner,
                what,
                to,
                epsilon,
                rho,
                ..
            } => {
                partners.insert(partner.clone());
                let purpose = purpose_of
                    .get(job_id.as_str())
                    .copied()
                    .unwrap_or("unknown");
                let slot = eps
                    .entry((partner.clone(), purpose.to_owned()))
                    .or_insert((0, 0.0, 0.0));
                slot.0 += 1;
                match rho {
                    Some(r) => slot.2 += r,
                    None => slot.1 += epsilon,
                }
                for r in to {
                    *rel.entry((r.clone(), what.clone())).or_insert(0) += 1;
                }
                jobs.entry(job_id).or_default().released = true;
            }
            AuditEvent::JobError {
                job_id, partner, ..
            } => {
                partners.insert(partner.clone());
                let j = jobs.entry(job_id).or_default();
                j.failed = true;
                if j.partner.is_empty() {
                    j.partner.clone_from(partner);
                }
            }
        }
    }

    let mut counts: BTreeMap<(String, String, String, &'static str), u64> = BTreeMap::new();
    for j in jobs.values() {
        let outcome = match (j.accepted, j.failed, j.released) {
            (Some(false), _, _) => "vetoed",
            (_, true, _) => "failed",
            (_, false, true) => "completed",
            _ => "accepted",
        };
        let or_unknown = |s: &str| {
            if s.is_empty() {
                "unknown".to_owned()
            } else {
                s.to_owned()
            }
        };
        *counts
            .entry((
                or_unknown(&j.partner),
                or_unknown(&j.purpose),
                or_unknown(&j.computation),
                outcome,
            ))
            .or_insert(0) += 1;
    }

    Transparency {
        node: node.to_owned(),
        since_ms,
        first_ms: in_period.first().map(|e| e.at_ms),
        last_ms: in_period.last().map(|e| e.at_ms),
        log_head: head.to_string(),
        partners: partners.into_iter().collect(),
        purposes: purposes.into_iter().collect(),
        jobs: counts
            .into_iter()
            .map(
                |((partner, purpose, computation, outcome), jobs)| JobCount {
                    partner,
                    purpose,
                    computation,
                    outcome: outcome.to_owned(),
                    jobs,
                },
            )
            .collect(),
        epsilon: eps
            .into_iter()
            .map(
                |((partner, purpose), (releases, epsilon, rho))| EpsilonSpent {
                    partner,
                    purpose,
                    releases,
                    epsilon,
                    rho,
                },
            )
            .collect(),
        releases: rel
            .into_iter()
            .map(|((recipient, what), releases)| ReleaseCount {
                recipient,
                what,
                releases,
            })
            .collect(),
        policy_loads,
        deletion_requests,
    }
}

/// Escapes text for a Markdown table cell.
fn cell(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace(['\n', '\r'], " ")
}

/// A section of the Markdown report: `## heading`, then `empty` if there are no `rows`, else a
/// table of `columns` (aligned by `align`, a Markdown alignment row) with a line per row.
fn section(
    s: &mut String,
    heading: &str,
    empty: &str,
    columns: &[&str],
    align: &str,
    rows: impl ExactSizeIterator<Item = Vec<String>>,
) {
    let _ = writeln!(s, "## {heading}\n");
    if rows.len() == 0 {
        let _ = writeln!(s, "{empty}");
        return;
    }
    let _ = writeln!(s, "| {} |", columns.join(" | "));
    let _ = writeln!(s, "{align}");
    for row in rows {
        let _ = writeln!(s, "| {} |", row.join(" | "));
    }
}

impl Transparency {
    /// The summary as JSON (pretty).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The summary as Markdown.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let date = |ms: Option<i64>| ms.map_or("—".to_owned(), |m| format_ms(m)[..10].to_owned());
        let _ = writeln!(s, "# Transparency report: node {}\n", cell(&self.node));
        let _ = writeln!(
            s,
            "Period: {} to {} (entries since {}). Audit log head: `{}`.\n",
            date(self.first_ms),
            date(self.last_ms),
            self.since_ms
                .map_or("the start of the log".to_owned(), |m| format_ms(m)[..10]
                    .to_owned()),
            self.log_head
        );
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.iter().map(|x| cell(x)).collect::<Vec<_>>().join(", ")
            }
        };
        let _ = writeln!(s, "- Partners: {}", list(&self.partners));
        let _ = writeln!(s, "- Purposes: {}", list(&self.purposes));
        let _ = writeln!(s, "- Policy loads: {}", self.policy_loads);
        let _ = writeln!(
            s,
            "- Deletion requests honoured: {}\n",
            self.deletion_requests
        );

        section(
            &mut s,
            "Jobs",
            "No jobs in this period.",
            &["partner", "purpose", "computation", "outcome", "jobs"],
            "|---|---|---|---|---:|",
            self.jobs.iter().map(|j| {
                vec![
                    cell(&j.partner),
                    cell(&j.purpose),
                    cell(&j.computation),
                    j.outcome.to_string(),
                    j.jobs.to_string(),
                ]
            }),
        );
        let _ = writeln!(s);
        section(
            &mut s,
            "Privacy budget (ε) released",
            "No releases in this period.",
            &[
                "partner",
                "purpose",
                "releases",
                "ε total (Laplace)",
                "ρ total (zCDP)",
            ],
            "|---|---|---:|---:|---:|",
            self.epsilon.iter().map(|e| {
                vec![
                    cell(&e.partner),
                    cell(&e.purpose),
                    e.releases.to_string(),
                    e.epsilon.to_string(),
                    e.rho.to_string(),
                ]
            }),
        );
        let _ = writeln!(s);
        section(
            &mut s,
            "Releases by recipient",
            "None.",
            &["recipient", "what", "releases"],
            "|---|---|---:|",
            self.releases
                .iter()
                .map(|r| vec![cell(&r.recipient), cell(&r.what), r.releases.to_string()]),
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::tests::make_log;
    use crate::audit::{read_entries, verify};
    use crate::clock::parse_date_ms;

    /// An aggregate's ε is a zCDP parameter: its releases add to the ρ total, never to the
    /// pure-ε total.
    #[test]
    fn zcdp_releases_are_summed_as_rho() {
        let dir = tempfile::tempdir().unwrap();
        let path = make_log(dir.path(), 8);
        let log = crate::audit::AuditLog::open(&path).unwrap();
        log.append(
            AuditEvent::Release {
                job_id: "j1".into(),
                partner: "globex".into(),
                what: "aggregate partial sum".into(),
                to: vec!["coordinator".into()],
                value: None,
                epsilon: 1.0,
                rho: Some(0.5),
            },
            1_700_000_100_000,
        )
        .unwrap();
        drop(log);
        let entries = read_entries(&path).unwrap();
        let head = verify(&path, None).unwrap().head;
        let t = summarize("acme", &entries, &head, None);
        let e = &t.epsilon[0];
        assert_eq!((e.epsilon, e.rho, e.releases), (0.5, 0.5, 2));
        assert!(
            t.to_markdown()
                .contains("| ε total (Laplace) | ρ total (zCDP) |")
        );
    }

    #[test]
    fn audit_transparency_on_a_small_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = make_log(dir.path(), 8);
        let entries = read_entries(&path).unwrap();
        let head = verify(&path, None).unwrap().head;
        let t = summarize("acme", &entries, &head, None);
        assert_eq!(t.partners, vec!["globex", "initech"]);
        assert_eq!(t.purposes, vec!["ad measurement", "fraud"]);
        assert_eq!(t.policy_loads, 1);
        assert_eq!(t.deletion_requests, 1);
        let find = |outcome: &str| {
            t.jobs
                .iter()
                .find(|j| j.outcome == outcome)
                .map(|j| (j.partner.as_str(), j.computation.as_str(), j.jobs))
        };
        assert_eq!(find("completed"), Some(("globex", "overlap", 1)));
        assert_eq!(find("failed"), Some(("globex", "overlap", 1)));
        assert_eq!(find("vetoed"), Some(("initech", "match", 1)));
        assert_eq!(t.epsilon.len(), 1);
        assert_eq!(t.epsilon[0].purpose, "ad measurement");
        assert_eq!(t.epsilon[0].epsilon, 0.5);
        assert_eq!(t.releases.len(), 2);

        let md = t.to_markdown();
        assert!(md.contains("globex"), "{md}");
        assert!(
            md.contains("| globex | ad measurement | overlap | completed | 1 |"),
            "{md}"
        );
        assert!(
            md.contains("| initech | fraud | match | vetoed | 1 |"),
            "{md}"
        );
        assert!(md.contains("| globex | ad measurement | 1 | 0.5 |"), "{md}");
        // Nothing job-specific or value-like is published.
        assert!(!t.to_json().contains("\"value\""));
        for secret in ["j1", "j2", "j3", "cdcdcd", "peer disconnected"] {
            assert!(!md.contains(secret), "{secret} in {md}");
            assert!(!t.to_json().contains(secret), "{secret} in json");
        }

        let json: serde_json::Value = serde_json::from_str(&t.to_json()).unwrap();
        assert_eq!(json["node"], "acme");
        assert_eq!(json["jobs"].as_array().unwrap().len(), 3);
        assert_eq!(json["epsilon"][0]["epsilon"], 0.5);

        // --since after every entry: an empty period.
        let later = summarize(
            "acme",
            &entries,
            &head,
            Some(parse_date_ms("2100-01-01").unwrap()),
        );
        assert!(later.jobs.is_empty() && later.partners.is_empty());
        assert!(later.to_markdown().contains("No jobs in this period."));
    }
}
