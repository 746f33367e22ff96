//! The value types an agreement is written in: dates, thresholds, computations, roles, who
//! learns what, and the names the config accepts.

use serde::Deserialize;

use crate::ledger::Epsilon;

/// Longest name (node, partner, dataset, identifier, purpose) the config accepts.
pub const MAX_NAME_LEN: usize = 63;

/// Default lower bound on the partner's declared set size.
pub const DEFAULT_MIN_SET_SIZE: u64 = 1;
/// Default upper bound on the partner's declared set size.
pub const DEFAULT_MAX_SET_SIZE: u64 = 100_000_000;

/// A calendar date written `"YYYY-MM-DD"` (an agreement's expiry; days are UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct PolicyDate(pub time::Date);

impl PolicyDate {
    /// Parses `YYYY-MM-DD`.
    pub fn parse(text: &str) -> Option<PolicyDate> {
        let b = text.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return None;
        }
        let digits = |r: std::ops::Range<usize>| -> Option<u32> {
            let part = text.get(r)?;
            if part.bytes().all(|c| c.is_ascii_digit()) {
                part.parse().ok()
            } else {
                None
            }
        };
        let year = i32::try_from(digits(0..4)?).ok()?;
        let month = time::Month::try_from(u8::try_from(digits(5..7)?).ok()?).ok()?;
        let day = u8::try_from(digits(8..10)?).ok()?;
        time::Date::from_calendar_date(year, month, day)
            .ok()
            .map(PolicyDate)
    }

    /// The UTC date of a Unix time in milliseconds (`None` out of range).
    pub fn from_unix_ms(ms: i64) -> Option<PolicyDate> {
        time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
            .ok()
            .map(|t| PolicyDate(t.date()))
    }
}

impl TryFrom<String> for PolicyDate {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        PolicyDate::parse(&value).ok_or_else(|| {
            format!(
                "'{}' is not a date written YYYY-MM-DD",
                value.escape_default()
            )
        })
    }
}

impl std::fmt::Display for PolicyDate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self.0;
        write!(
            f,
            "{:04}-{:02}-{:02}",
            d.year(),
            u8::from(d.month()),
            d.day()
        )
    }
}

/// A computation the agreement allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Computation {
    /// |A ∩ B| only.
    Overlap,
    /// Membership of each side's own records, to the sides allowed to learn it.
    Match,
    /// Per-group sums and counts over N ≥ 3 parties by secret sharing (no keys).
    Aggregate,
    /// Intersection-sum with cardinality: the number of shared identifiers and sums of the
    /// value holder's columns over them, noised under encryption (two parties, keys).
    #[serde(rename = "overlap-sum")]
    OverlapSum,
}

/// The part a node plays in an `overlap-sum` job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SumRole {
    /// Party A: identifiers only. It learns the exact number of shared identifiers (inherent
    /// in the protocol) and sees only ciphertexts of the partner's values.
    KeyHolder,
    /// Party B: identifiers and values. It learns the noised totals only; the partner learns
    /// how many identifiers are shared.
    ValueHolder,
}

impl SumRole {
    /// The name used in config files and vetoes.
    pub fn as_str(&self) -> &'static str {
        match self {
            SumRole::KeyHolder => "key-holder",
            SumRole::ValueHolder => "value-holder",
        }
    }
}

impl Computation {
    /// The name used in config files and vetoes.
    pub fn as_str(&self) -> &'static str {
        match self {
            Computation::Overlap => "overlap",
            Computation::Match => "match",
            Computation::Aggregate => "aggregate",
            Computation::OverlapSum => "overlap-sum",
        }
    }
}

impl std::fmt::Display for Computation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who learns `match` membership (which of one's own rows the other side shares).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Membership {
    /// Neither side.
    None,
    /// This node only (the default, as before).
    #[serde(rename = "self")]
    SelfOnly,
    /// The partner only.
    Partner,
    /// Both sides.
    Both,
}

impl Membership {
    /// The name used in config files.
    pub fn as_str(&self) -> &'static str {
        match self {
            Membership::None => "none",
            Membership::SelfOnly => "self",
            Membership::Partner => "partner",
            Membership::Both => "both",
        }
    }

    /// Whether this node may learn its own rows' membership.
    pub fn to_self(&self) -> bool {
        matches!(self, Membership::SelfOnly | Membership::Both)
    }

    /// Whether the partner may learn its rows' membership.
    pub fn to_partner(&self) -> bool {
        matches!(self, Membership::Partner | Membership::Both)
    }
}

impl std::fmt::Display for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who may receive a job's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recipient {
    /// The partner node.
    Partner,
    /// The coordinator (and so the analyst).
    Coordinator,
}

impl Recipient {
    /// The name used in config files.
    pub fn as_str(&self) -> &'static str {
        match self {
            Recipient::Partner => "partner",
            Recipient::Coordinator => "coordinator",
        }
    }
}

/// What one run of an allow entry with `epsilon` costs against a cap, as ε at `delta`: ε itself
/// for a discrete Laplace release, and for an aggregate (whose `epsilon` is a zCDP ε, ρ = ε²/2)
/// the (ε, δ) conversion of that ρ alone (see [`crate::ledger::epsilon_at`]).
pub fn run_cost(computation: Computation, epsilon: Epsilon, delta: f64) -> f64 {
    let e = epsilon.get();
    match computation {
        Computation::Aggregate => crate::ledger::epsilon_at(0.0, e * e / 2.0, delta),
        _ => e,
    }
}

/// Smallest number of parties of an aggregate job: with two, each learns the other's figures
/// from the total.
pub const MIN_AGGREGATE_PARTIES: u32 = 3;

/// A count threshold: at least 1 (0 is refused when the config is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "i64")]
pub struct Threshold(u64);

impl Threshold {
    /// A threshold of `n` ≥ 1.
    pub fn new(n: u64) -> Option<Threshold> {
        (n >= 1).then_some(Threshold(n))
    }

    /// The value (≥ 1).
    pub fn get(self) -> u64 {
        self.0
    }
}

impl TryFrom<i64> for Threshold {
    type Error = String;

    fn try_from(value: i64) -> Result<Self, Self::Error> {
        u64::try_from(value)
            .ok()
            .and_then(Threshold::new)
            .ok_or_else(|| format!("threshold must be at least 1, not {value}"))
    }
}

impl std::fmt::Display for Threshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The threshold of 1 (the default of every count threshold).
pub(crate) fn default_threshold() -> Threshold {
    Threshold(1)
}

/// Whether `name` is 1 to 63 characters of `a-z`, `0-9` and `-`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The 1-based line of a byte offset's span in `text`.
pub(crate) fn line_of(text: &str, span: std::ops::Range<usize>) -> usize {
    let end = span.start.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

pub(crate) fn check_name(what: &str, name: &str) -> Result<(), String> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{what} '{}' is not 1 to {MAX_NAME_LEN} characters of a-z, 0-9 and '-'",
            name.escape_default()
        ))
    }
}
