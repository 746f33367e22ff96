//! What an accepted offer lets this node do: the [`Permit`] a kind's offer check grants, the
//! [`RunCounter`] of its allow entry, and the [`Veto`] that refuses.
//!
//! The permit carries the limits the job enforces at later phases:
//! [`Permit::check_peer_size`] (before any exponentiation), [`Permit::check_input_size`] (after
//! loading, before sending), [`Permit::release_count`] (the k-threshold), [`RunCounter`] (runs
//! per period, fed from the audit log) and [`Permit::charge`] (what a noised release charges to
//! the ε budgets in [`crate::ledger`]).

use crate::data::{DatasetConfig, KeySpec, ValueColumn};
use crate::ledger::{Budget, Epsilon, Period};

use super::schema::NodeConfig;
use super::values::{Computation, Membership, PolicyDate, Recipient, SumRole};

/// What the agreement lets this node do in one accepted job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permit {
    /// The other party's node name.
    pub partner: String,
    /// The computation.
    pub computation: Computation,
    /// The job's purpose (one of the agreement's).
    pub purpose: String,
    /// This node's dataset for the job.
    pub dataset: DatasetConfig,
    /// This node's join key (identifier names in order).
    pub keys: KeySpec,
    /// Smallest set size the partner may declare.
    pub min_peer_set: u64,
    /// Largest set size the partner may declare.
    pub max_peer_set: u64,
    /// Match only: the partner learns which of its rows we share (so we return its items in
    /// order). Always false for overlap.
    pub partner_learns_membership: bool,
    /// Match only: this node learns which of its rows the partner shares. Always false for
    /// overlap.
    pub i_learn_membership: bool,
    /// Who the entry lets learn membership (`none` for overlap).
    pub membership: Membership,
    /// Fewest distinct keys of ours (after consent and deletion filtering) the job may use.
    pub min_input_size: u64,
    /// k-threshold: a count below it is suppressed.
    pub min_result: u64,
    /// Who may receive counts.
    pub counts_to: Vec<Recipient>,
    /// ε per run, if the entry allows DP releases.
    pub epsilon: Option<Epsilon>,
    /// The agreement's ε caps per purpose with this partner (`budget_per_purpose`): at most one
    /// for a two-party job, one per agreement involved for an aggregate.
    pub purpose_budgets: Vec<Budget>,
    /// Runs allowed per period for this partner and entry (`None` = unlimited).
    pub runs: Option<RunCounter>,
    /// Value columns the job may use, with clipping bounds.
    pub value_columns: Vec<ValueColumn>,
    /// The consent column that filters rows for the job's purpose (`None` = all rows).
    pub consent_column: Option<String>,
    /// The agreement's expiry (last valid UTC day), if any.
    pub expires: Option<PolicyDate>,
    /// Overlap-sum and aggregate: the columns a job may group by.
    pub group_by: Vec<String>,
    /// Overlap-sum: the roles this node may take (the entry's `roles`, both if absent).
    pub sum_roles: Vec<SumRole>,
}

impl Permit {
    /// Checks the size the partner declares against the entry's bounds; call it before any
    /// exponentiation on the partner's data.
    pub fn check_peer_size(&self, declared: u64) -> Result<(), Veto> {
        if declared < self.min_peer_set {
            return Err(veto(format!(
                "{} declares {declared} keys < min_set_size {}",
                self.partner, self.min_peer_set
            )));
        }
        if declared > self.max_peer_set {
            return Err(veto(format!(
                "{} declares {declared} keys > max_set_size {}",
                self.partner, self.max_peer_set
            )));
        }
        Ok(())
    }

    /// Checks our own input (distinct keys after consent and deletion filtering) against
    /// `min_input_size`; call it after loading, before anything is sent.
    pub fn check_input_size(&self, distinct_keys: u64) -> Result<(), Veto> {
        if distinct_keys < self.min_input_size {
            return Err(veto(format!(
                "input {distinct_keys} rows < min_input {}",
                self.min_input_size
            )));
        }
        Ok(())
    }

    /// The k-threshold: `Some(count)` when it may be released, `None` when it is below
    /// `min_result` and must be suppressed.
    pub fn release_count(&self, count: u64) -> Option<u64> {
        (count >= self.min_result).then_some(count)
    }

    /// The privacy loss of one release under this permit, if its entry sets ε: pure ε for the
    /// discrete Laplace releases, ρ = ε²/2 for an aggregate (whose ε is a zCDP ε; the job
    /// charges the ρ its noise actually gives, which is at most this up to KLS21's slack).
    pub fn loss(&self) -> Option<crate::ledger::Loss> {
        let e = self.epsilon?.get();
        Some(match self.computation {
            Computation::Aggregate => crate::ledger::Loss::Rho(e * e / 2.0),
            _ => crate::ledger::Loss::Epsilon(e),
        })
    }

    /// What a noised release under this permit charges to the ledger: its loss against the
    /// agreements' per-purpose caps and the node-wide `[budget]` of `cfg`, read at its
    /// `dp_delta`. `None` when the entry sets no ε (an exact release, which charges nothing).
    pub fn charge(&self, job_id: &str, cfg: &NodeConfig) -> Option<crate::ledger::Charge> {
        Some(crate::ledger::Charge {
            job_id: job_id.to_owned(),
            partner: self.partner.clone(),
            purpose: self.purpose.clone(),
            loss: self.loss()?,
            purpose_caps: self.purpose_budgets.clone(),
            node_cap: cfg.budget.clone(),
            delta: cfg.delta(),
        })
    }

    /// Whether `to` may receive the job's counts.
    pub fn counts_allowed_to(&self, to: Recipient) -> bool {
        self.counts_to.contains(&to)
    }
}

/// The runs-per-period limit of one (partner, allow entry): pure, fed with the timestamps of
/// past accepted runs (from the audit log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunCounter {
    /// Accepted runs allowed per period.
    pub limit: u64,
    /// The period (a sliding window ending now).
    pub period: Period,
}

impl RunCounter {
    /// Refuses a new run if `limit` runs were accepted in the window `(now - period, now]`:
    /// `runs per day exceeded (2/2)`. Timestamps in the future count (clock skew must not free
    /// runs).
    pub fn check(&self, past_runs_ms: &[i64], now_ms: i64) -> Result<(), Veto> {
        let since = now_ms.saturating_sub(self.period.millis());
        let used = past_runs_ms.iter().filter(|&&t| t > since).count() as u64;
        if used >= self.limit {
            return Err(veto(format!(
                "runs per {} exceeded ({used}/{})",
                self.period, self.limit
            )));
        }
        Ok(())
    }
}

/// Why this node refuses a job: one line for the analyst, naming the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Veto(pub String);

pub(crate) fn veto(reason: impl Into<String>) -> Veto {
    Veto(reason.into())
}
