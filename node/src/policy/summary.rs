//! What `cleanroom-node policy check` prints: the checked policy, one block per partner, with
//! the expiry warnings and, under every allow entry, what a partner that **deviates** from the
//! protocol can learn ([`deviating_partner_learns`]): the cryptography is secure against
//! semi-honest parties only, and the agreement is what bounds the rest.

use std::path::PathBuf;
use std::sync::Arc;

use super::allow::{AggregateAllow, Allow};
use super::schema::NodeConfig;
use super::values::{Computation, PolicyDate, SumRole};

/// What `policy check` prints: the validated config, one block per partner.
#[derive(Debug, Clone)]
pub struct PolicySummary {
    /// The file checked.
    pub path: PathBuf,
    /// The validated config.
    pub config: Arc<NodeConfig>,
    /// Agreements that have expired or expire soon, as of the check ([`expiry_warnings`]).
    pub warnings: Vec<String>,
}

/// How many days ahead `policy check` warns of an agreement's expiry.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// A warning per agreement that expired before `today` (every job with that partner is refused)
/// or expires within [`EXPIRY_WARNING_DAYS`] days of it (its last day in force included).
pub fn expiry_warnings(cfg: &NodeConfig, today: PolicyDate) -> Vec<String> {
    let mut out = Vec::new();
    for a in &cfg.agreements {
        let Some(expires) = a.expires else { continue };
        let days = (expires.0 - today.0).whole_days();
        if days < 0 {
            out.push(format!(
                "warning: the agreement with {} expired {expires} ({} day{} ago): every job with {} \
                 is refused",
                a.partner,
                -days,
                if days == -1 { "" } else { "s" },
                a.partner
            ));
        } else if days < EXPIRY_WARNING_DAYS {
            out.push(format!(
                "warning: the agreement with {} expires {expires} (its last day in force; {}): \
                 renew it before then",
                a.partner,
                match days {
                    0 => "today".to_owned(),
                    1 => "tomorrow".to_owned(),
                    n => format!("in {n} days"),
                }
            ));
        }
    }
    out
}

impl std::fmt::Display for PolicySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = &self.config;
        writeln!(f, "policy {} (node {}): OK", self.path.display(), c.name)?;
        for w in &self.warnings {
            writeln!(f, "{w}")?;
        }
        match &c.budget {
            Some(b) => writeln!(f, "budget: {}", b.describe())?,
            None => writeln!(f, "budget: none (no node-wide epsilon cap)")?,
        }
        writeln!(
            f,
            "dp_delta: {:e} (caps are epsilon at this delta once a zCDP release is charged)",
            c.delta()
        )?;
        for d in &c.datasets {
            let consent: Vec<String> = d
                .consent
                .iter()
                .map(|(p, col)| format!("{p}={col}"))
                .collect();
            writeln!(
                f,
                "dataset {}: identifiers {}; values {}; consent {}{}",
                d.name,
                d.identifier_names(),
                d.value_names(),
                if consent.is_empty() {
                    "none".to_owned()
                } else {
                    consent.join(", ")
                },
                if d.consent_required {
                    " (required)"
                } else {
                    ""
                }
            )?;
        }
        if c.agreements.is_empty() {
            writeln!(f, "no agreements: every job is refused")?;
        }
        for a in &c.agreements {
            writeln!(f, "partner {}", a.partner)?;
            writeln!(f, "  purposes: {}", a.purposes.join(", "))?;
            match a.expires {
                Some(d) => writeln!(f, "  expires: {d} (end of day, UTC)")?,
                None => writeln!(f, "  expires: never")?,
            }
            match &a.partner_key {
                Some(pin) => writeln!(
                    f,
                    "  partner key: {pin} (pinned: a certificate for {} with another key is refused)",
                    a.partner
                )?,
                None => writeln!(
                    f,
                    "  partner key: not pinned (any certificate the consortium CA signs for {} is accepted)",
                    a.partner
                )?,
            }
            if a.analysts.is_empty() {
                writeln!(f, "  analysts: any")?;
            } else {
                writeln!(f, "  analysts: {}", a.analysts.join(", "))?;
            }
            match &a.budget_per_purpose {
                Some(b) => writeln!(f, "  budget per purpose: {}", b.describe())?,
                None => writeln!(f, "  budget per purpose: none (only the node-wide cap)")?,
            }
            if a.allow.is_empty() {
                writeln!(f, "  allows nothing (empty allow-list)")?;
            }
            for e in &a.allow {
                let t = e.terms();
                // An aggregate joins nothing: it is allowed by its group-by columns.
                let by = if e.keys().is_empty() {
                    e.group_by().join(" | ")
                } else {
                    e.keys().join(" | ")
                };
                writeln!(f, "  allow {} on {} by {by}", e.computation(), e.dataset())?;
                let counts: Vec<&str> = t.counts_to.iter().map(|r| r.as_str()).collect();
                writeln!(
                    f,
                    "    membership {}; counts to {}; min_input {}; min_result {}; peer set {}..={}",
                    e.membership(),
                    if counts.is_empty() {
                        "nobody".to_owned()
                    } else {
                        counts.join(", ")
                    },
                    t.min_input_size,
                    t.min_result,
                    t.min_set_size,
                    t.max_set_size
                )?;
                let runs = t
                    .runs_per_period
                    .map_or("unlimited".to_owned(), |n| format!("{n} per {}", t.period));
                let eps = match t.epsilon {
                    None => "none".to_owned(),
                    Some(x) if e.computation() == Computation::Aggregate => format!(
                        "{x} (zCDP: rho {} per run, costs epsilon {} at dp_delta {:e} on its own)",
                        crate::ledger::show(x.get() * x.get() / 2.0),
                        crate::ledger::show(super::values::run_cost(e.computation(), x, c.delta())),
                        c.delta()
                    ),
                    Some(x) => format!("{x} (pure, discrete Laplace)"),
                };
                writeln!(f, "    runs {runs}; epsilon per run {eps}")?;
                if let Allow::Aggregate(AggregateAllow {
                    person: Some(p), ..
                }) = e
                {
                    writeln!(
                        f,
                        "    per person on column {p}: a person's rows are summed, then clipped"
                    )?;
                }
                for v in &t.value_columns {
                    writeln!(
                        f,
                        "    value {} clipped to [{}, {}]",
                        v.column.get_ref(),
                        v.min,
                        v.max
                    )?;
                }
                if !e.group_by().is_empty() {
                    writeln!(f, "    group by {}", e.group_by().join(" | "))?;
                }
                if let Allow::OverlapSum(sum) = e {
                    match &sum.roles {
                        Some(roles) => {
                            let roles: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
                            writeln!(f, "    roles {}", roles.join(", "))?;
                        }
                        None => {
                            writeln!(f, "    roles key-holder, value-holder (both: the default)")?
                        }
                    }
                }
                for line in deviating_partner_learns(e, &a.partner) {
                    writeln!(f, "    if {} deviates from the protocol: {line}", a.partner)?;
                }
            }
        }
        Ok(())
    }
}

/// What a partner that deviates from the protocol can learn through one allow entry, one line
/// per role it can take, in words for the operator who signs the agreement. The semi-honest
/// outputs are in docs/SECURITY.md; these lines are what the cryptography does not stop.
pub fn deviating_partner_learns(e: &Allow, partner: &str) -> Vec<String> {
    let dataset = e.dataset();
    let membership = format!(
        "{partner} can learn which of its own candidate identifiers are in {dataset} (up to \
         max_set_size {} per run), not only how many: it blinds each candidate with a key of its \
         own and tests what we return. No threshold or epsilon stops this; who the partner is, \
         the set-size bounds and runs_per_period limit it",
        e.terms().max_set_size
    );
    match e {
        Allow::Overlap(_) => vec![membership],
        Allow::Match(_) => vec![format!(
            "{membership}. This holds whatever the entry's membership setting (here: {}) lets \
             it learn honestly",
            e.membership()
        )],
        Allow::OverlapSum(sum) => {
            let roles = sum
                .roles
                .clone()
                .unwrap_or_else(|| vec![SumRole::KeyHolder, SumRole::ValueHolder]);
            let mut lines = Vec::new();
            if roles.contains(&SumRole::ValueHolder) {
                lines.push(format!(
                    "as key holder (we hold the values), {}",
                    membership.replacen(&format!("{partner} can"), "it can", 1)
                ));
            }
            if roles.contains(&SumRole::KeyHolder) {
                lines.push(
                    "as value holder (we are the key holder), it chooses the values it encrypts \
                     and can pick them to test which of its rows we share; only our noise on \
                     every total it decrypts (each cell whole) bounds such a test, and without \
                     epsilon the test is exact (docs/OVERLAP_SUM.md)"
                        .to_owned(),
                );
            }
            lines
        }
        Allow::Aggregate(_) => vec![
            "it receives only random seeds from us, so alone it learns nothing beyond the \
             released totals; it can send a partial of its choosing (no validity proofs) and so \
             distort or suppress the totals; together with the coordinator and every other \
             party it learns our noised figures"
                .to_owned(),
        ],
    }
}
