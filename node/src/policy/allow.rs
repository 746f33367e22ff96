//! A checked allow entry, typed by its computation: [`Allow`].
//!
//! The file has one flat `[[agreement.allow]]` table for every computation ([`AllowEntry`]);
//! [`Allow::check`] applies the rules of the entry's computation (in `policy::psi`,
//! `policy::overlap_sum` and `policy::aggregate`, beside each kind's offer check) and keeps only
//! what that computation takes: join keys and membership for `overlap` and `match`, keys, roles
//! and group-by columns for `overlap-sum`, group-by columns, party counts and the person column
//! for `aggregate`. What every computation takes is in [`AllowTerms`].

use std::collections::HashSet;

use serde::Deserialize;
use toml::Spanned;

use crate::data::{DatasetConfig, ValueColumn};
use crate::ledger::{Epsilon, Period};

use super::values::{
    Computation, DEFAULT_MAX_SET_SIZE, DEFAULT_MIN_SET_SIZE, Membership, Recipient, SumRole,
    Threshold, default_threshold, line_of,
};

/// One allowed computation on one of this node's datasets, as checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allow {
    /// `overlap`: |A ∩ B| only (its membership is always [`Membership::None`]).
    Overlap(PsiAllow),
    /// `match`: membership of each side's own records, to the sides the entry names.
    Match(PsiAllow),
    /// `overlap-sum`: the shared count and sums of the value holder's columns.
    OverlapSum(OverlapSumAllow),
    /// `aggregate`: per-group totals over N ≥ 3 parties.
    Aggregate(AggregateAllow),
}

/// What an allow entry says whatever its computation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowTerms {
    /// Which of this node's datasets.
    pub dataset: String,
    /// Value columns the computation may use, with clipping bounds (each declared on the
    /// dataset, bounds inside the declared ones). `overlap` and `match` accept them and use none.
    pub value_columns: Vec<ValueColumn>,
    /// Who may receive counts.
    pub counts_to: Vec<Recipient>,
    /// Fewest distinct keys of ours (after consent and deletion filtering) a job may use.
    pub min_input_size: Threshold,
    /// k-threshold: a count below it is suppressed, not released.
    pub min_result: Threshold,
    /// Accepted runs allowed per period per partner and entry; `None` = no limit.
    pub runs_per_period: Option<Threshold>,
    /// The period of `runs_per_period`.
    pub period: Period,
    /// ε per run; `None` = no DP release.
    pub epsilon: Option<Epsilon>,
    /// Smallest set size the partner may declare.
    pub min_set_size: u64,
    /// Largest set size the partner may declare.
    pub max_set_size: u64,
}

/// An `overlap` or `match` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsiAllow {
    /// The common terms.
    pub terms: AllowTerms,
    /// Allowed join keys, each a key set with composite keys joined by `+` (`"email+phone"`).
    pub keys: Vec<String>,
    /// Who learns membership (`none` for overlap).
    pub membership: Membership,
}

/// An `overlap-sum` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlapSumAllow {
    /// The common terms (`value_columns` bound the summed columns per identifier, `0 ≤ min`).
    pub terms: AllowTerms,
    /// Allowed join keys.
    pub keys: Vec<String>,
    /// The roles this node may take; `None` (absent) = both.
    pub roles: Option<Vec<SumRole>>,
    /// Columns a job may group by (none: ungrouped jobs only).
    pub group_by: Vec<String>,
}

/// An `aggregate` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateAllow {
    /// The common terms.
    pub terms: AllowTerms,
    /// Categorical columns a job may group by (at least one).
    pub group_by: Vec<String>,
    /// Fewest parties a job must have (`None` = 3).
    pub min_parties: Option<u32>,
    /// Parties that may collude and subtract their own noise share (`None` = all but one).
    pub max_colluders: Option<u32>,
    /// The person column a job must clip on; `None` = per-row clipping.
    pub person: Option<String>,
}

/// One `[[agreement.allow]]` table as written: the same keys for every computation. Which keys a
/// computation takes, and what they mean for it, is decided when it is checked into an [`Allow`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowEntry {
    /// Which computation.
    pub computation: Computation,
    /// Which of this node's datasets (spanned, so errors name its line).
    pub dataset: Spanned<String>,
    /// Allowed join keys: each entry is one key set, composite keys joined with `+`
    /// (`"email+phone"`); a job's key set must equal one entry, order included. Required for
    /// overlap and match; must be absent for aggregate (which joins nothing).
    #[serde(default)]
    pub keys: Vec<String>,
    /// Match only: who learns membership (default `self`).
    #[serde(default)]
    pub membership: Option<Membership>,
    /// Old spelling (match only): `true` = `membership = "both"`, `false` = `"self"`. Refused
    /// together with `membership`.
    #[serde(default)]
    pub reveal_membership_to_partner: Option<bool>,
    /// Value columns the computation may use, with clipping bounds (each declared on the
    /// dataset, bounds inside the declared ones).
    #[serde(default)]
    pub value_columns: Vec<ValueColumn>,
    /// Who may receive counts (default both).
    #[serde(default = "default_counts_to")]
    pub counts_to: Vec<Recipient>,
    /// Fewest distinct keys of ours (after consent and deletion filtering) a job may use.
    #[serde(default = "default_threshold")]
    pub min_input_size: Threshold,
    /// k-threshold: a count below it is suppressed, not released.
    #[serde(default = "default_threshold")]
    pub min_result: Threshold,
    /// Accepted runs allowed per period per partner and computation entry; `None` = no limit.
    #[serde(default)]
    pub runs_per_period: Option<Threshold>,
    /// The period of `runs_per_period` (default day).
    #[serde(default)]
    pub period: Period,
    /// ε per run (for differentially private releases); `None` = no DP release allowed.
    #[serde(default)]
    pub epsilon: Option<Epsilon>,
    /// Smallest set size the partner may declare.
    #[serde(default = "default_min_set_size")]
    pub min_set_size: u64,
    /// Largest set size the partner may declare.
    #[serde(default = "default_max_set_size")]
    pub max_set_size: u64,
    // What an `aggregate` entry adds (validation refuses these keys on other computations).
    /// Aggregate only: categorical columns (CSV headers) a job may group by; at least one.
    #[serde(default)]
    pub group_by: Vec<String>,
    /// Aggregate only: fewest parties a job must have (default and minimum 3).
    #[serde(default)]
    pub min_parties: Option<u32>,
    /// Aggregate only: parties that may collude and subtract their own noise share (default:
    /// all but one, so one honest party's noise alone gives the stated ε).
    #[serde(default)]
    pub max_colluders: Option<u32>,
    /// Overlap-sum only: the roles this node may take (`"key-holder"`, `"value-holder"`);
    /// absent = both. Taking the value-holder role lets the partner learn the exact number of
    /// shared identifiers; a policy that must not reveal it lists only `"key-holder"`.
    #[serde(default)]
    pub roles: Option<Vec<SumRole>>,
    /// Aggregate only: the column (CSV header) that names the person each row belongs to.
    /// When set, a job must clip per person on exactly this column (`--per-person COLUMN`):
    /// a person's rows are summed, then clipped, and the person is counted once, so ε protects
    /// a person rather than a row. Absent: jobs clip per row and must not name a person column.
    #[serde(default)]
    pub person: Option<String>,
}

fn default_counts_to() -> Vec<Recipient> {
    vec![Recipient::Partner, Recipient::Coordinator]
}

fn default_min_set_size() -> u64 {
    DEFAULT_MIN_SET_SIZE
}

fn default_max_set_size() -> u64 {
    DEFAULT_MAX_SET_SIZE
}

impl Allow {
    /// The computation.
    pub fn computation(&self) -> Computation {
        match self {
            Allow::Overlap(_) => Computation::Overlap,
            Allow::Match(_) => Computation::Match,
            Allow::OverlapSum(_) => Computation::OverlapSum,
            Allow::Aggregate(_) => Computation::Aggregate,
        }
    }

    /// The common terms.
    pub fn terms(&self) -> &AllowTerms {
        match self {
            Allow::Overlap(a) | Allow::Match(a) => &a.terms,
            Allow::OverlapSum(a) => &a.terms,
            Allow::Aggregate(a) => &a.terms,
        }
    }

    /// The common terms, to change (tests, and tools that derive a policy).
    pub fn terms_mut(&mut self) -> &mut AllowTerms {
        match self {
            Allow::Overlap(a) | Allow::Match(a) => &mut a.terms,
            Allow::OverlapSum(a) => &mut a.terms,
            Allow::Aggregate(a) => &mut a.terms,
        }
    }

    /// The dataset.
    pub fn dataset(&self) -> &str {
        &self.terms().dataset
    }

    /// The allowed join keys (none for an aggregate, which joins nothing).
    pub fn keys(&self) -> &[String] {
        match self {
            Allow::Overlap(a) | Allow::Match(a) => &a.keys,
            Allow::OverlapSum(a) => &a.keys,
            Allow::Aggregate(_) => &[],
        }
    }

    /// Who learns membership: only a `match` releases it.
    pub fn membership(&self) -> Membership {
        match self {
            Allow::Match(a) => a.membership,
            _ => Membership::None,
        }
    }

    /// The columns a job may group by (none for `overlap` and `match`).
    pub fn group_by(&self) -> &[String] {
        match self {
            Allow::OverlapSum(a) => &a.group_by,
            Allow::Aggregate(a) => &a.group_by,
            Allow::Overlap(_) | Allow::Match(_) => &[],
        }
    }
}

impl AllowTerms {
    /// The common terms of an entry as written (checked by its computation's rules first).
    pub(crate) fn of(e: &AllowEntry) -> AllowTerms {
        AllowTerms {
            dataset: e.dataset.get_ref().clone(),
            value_columns: e.value_columns.clone(),
            counts_to: e.counts_to.clone(),
            min_input_size: e.min_input_size,
            min_result: e.min_result,
            runs_per_period: e.runs_per_period,
            period: e.period,
            epsilon: e.epsilon,
            min_set_size: e.min_set_size,
            max_set_size: e.max_set_size,
        }
    }
}

/// The rules of an entry that joins on keys (`overlap`, `match`, `overlap-sum`), before its
/// membership rules: no aggregate keys, at least one key, each part an identifier of the
/// dataset, none repeated, and `membership` not set twice.
pub(crate) fn check_keys(ctx: &str, e: &AllowEntry, d: &DatasetConfig) -> Result<(), String> {
    if e.min_parties.is_some() || e.max_colluders.is_some() || e.person.is_some() {
        return Err(format!(
            "{ctx}: allow {} on '{}': keys min_parties, max_colluders and person apply to \
             aggregate only",
            e.computation,
            e.dataset.get_ref()
        ));
    }
    if e.keys.is_empty() {
        return Err(format!(
            "{ctx}: allow {} on '{}' lists no keys",
            e.computation,
            e.dataset.get_ref()
        ));
    }
    for key in &e.keys {
        if key.is_empty() {
            return Err(format!(
                "{ctx}: allow {} on '{}' has an empty key",
                e.computation,
                e.dataset.get_ref()
            ));
        }
        let mut parts = HashSet::new();
        for part in key.split('+') {
            if d.identifier(part).is_none() {
                return Err(format!(
                    "{ctx}: allow {} on '{}' uses key '{part}', which dataset '{}' does not \
                     declare as an identifier (declared: {})",
                    e.computation,
                    e.dataset.get_ref(),
                    d.name,
                    d.identifier_names()
                ));
            }
            if !parts.insert(part) {
                return Err(format!(
                    "{ctx}: allow {} on '{}': key '{key}' repeats '{part}'",
                    e.computation,
                    e.dataset.get_ref()
                ));
            }
        }
    }
    if e.membership.is_some() && e.reveal_membership_to_partner.is_some() {
        return Err(format!(
            "{ctx}: allow {} on '{}': set key membership or its old spelling \
             reveal_membership_to_partner, not both",
            e.computation,
            e.dataset.get_ref()
        ));
    }
    Ok(())
}

/// The rules of a keyed entry after its membership rules: `counts_to` without repeats, value
/// columns declared on the dataset (once each, bounds inside the declared ones), and the set-size
/// bounds in order.
pub(crate) fn check_keyed_terms(
    ctx: &str,
    e: &AllowEntry,
    d: &DatasetConfig,
    text: &str,
) -> Result<(), String> {
    let mut seen = HashSet::new();
    for r in &e.counts_to {
        if !seen.insert(*r) {
            return Err(format!(
                "{ctx}: allow {} on '{}': key counts_to lists '{}' twice",
                e.computation,
                e.dataset.get_ref(),
                r.as_str()
            ));
        }
    }
    let mut seen = HashSet::new();
    for v in &e.value_columns {
        let col = v.column.get_ref();
        let at = line_of(text, v.column.span());
        let Some(declared) = d.value(col) else {
            return Err(format!(
                "{ctx}: allow {} on '{}': key value_columns (line {at}) names column \
                 '{col}', which dataset '{}' does not declare as a value column (declared: \
                 {})",
                e.computation,
                e.dataset.get_ref(),
                d.name,
                d.value_names()
            ));
        };
        if !seen.insert(col.as_str()) {
            return Err(format!(
                "{ctx}: allow {} on '{}': key value_columns lists '{col}' twice",
                e.computation,
                e.dataset.get_ref()
            ));
        }
        if v.min > v.max || v.min < declared.min || v.max > declared.max {
            return Err(format!(
                "{ctx}: allow {} on '{}': key value_columns (line {at}): bounds [{}, {}] of \
                 '{col}' must be ordered and inside the dataset's [{}, {}]",
                e.computation,
                e.dataset.get_ref(),
                v.min,
                v.max,
                declared.min,
                declared.max
            ));
        }
    }
    if e.min_set_size > e.max_set_size {
        return Err(format!(
            "{ctx}: allow {} on '{}': min_set_size {} is above max_set_size {}",
            e.computation,
            e.dataset.get_ref(),
            e.min_set_size,
            e.max_set_size
        ));
    }
    Ok(())
}
