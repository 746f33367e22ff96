//! The caps a ledger enforces: ε per period and over its life, the δ at which they are read, and
//! the periods of windows. The policy names them (`[budget]`, `budget_per_purpose`); the ledger
//! checks every charge against them.

use serde::Deserialize;

/// A privacy budget: the ε that may be spent per period (sliding window), over the ledger's
/// whole life, or both (at least one). Used node-wide (`[budget]`, over all partners) and per
/// partner and purpose (`budget_per_purpose`). Caps are ε at the node's `dp_delta` (see
/// [`crate::ledger`]: pure-ε charges add up as ε, zCDP charges as ρ).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// ε allowed per period; `None` = no window cap (then `epsilon_lifetime` is set).
    #[serde(default)]
    pub epsilon_per_period: Option<Epsilon>,
    /// The period (default day).
    #[serde(default)]
    pub period: Period,
    /// ε allowed over the ledger's whole life (never refreshes); `None` = no lifetime cap.
    #[serde(default)]
    pub epsilon_lifetime: Option<Epsilon>,
}

impl Budget {
    /// `"epsilon 1 per day, 20 in all"` (what `policy check` and vetoes print).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(e) = self.epsilon_per_period {
            parts.push(format!("epsilon {e} per {}", self.period));
        }
        if let Some(e) = self.epsilon_lifetime {
            parts.push(format!("epsilon {e} in all (lifetime)"));
        }
        parts.join(", ")
    }

    pub(crate) fn validate(&self, name: &str) -> Result<(), String> {
        if self.epsilon_per_period.is_none() && self.epsilon_lifetime.is_none() {
            return Err(format!(
                "{name} sets neither epsilon_per_period nor epsilon_lifetime; give at least one"
            ));
        }
        Ok(())
    }

    /// The smallest of its caps (what one run must fit).
    pub(crate) fn tightest(&self) -> f64 {
        [self.epsilon_per_period, self.epsilon_lifetime]
            .into_iter()
            .flatten()
            .map(Epsilon::get)
            .fold(f64::INFINITY, f64::min)
    }
}

/// The default δ at which ε caps are read when a release is (ε, δ)-DP rather than pure ε-DP
/// (aggregate's discrete Gaussian): below one in a billion, far below one over the largest
/// dataset a job may read (10^8 rows).
pub const DEFAULT_DP_DELTA: f64 = 1e-9;

/// The largest `dp_delta` the config accepts.
pub const MAX_DP_DELTA: f64 = 1e-5;

/// The δ of (ε, δ)-DP at which a node reads its caps: greater than 0 and at most
/// [`MAX_DP_DELTA`] (checked when the config is read, so the TOML error names the line).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Deserialize)]
#[serde(try_from = "f64")]
pub struct Delta(f64);

// Sound: a Delta is never NaN.
impl Eq for Delta {}

impl Delta {
    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for Delta {
    type Error = String;

    fn try_from(value: f64) -> Result<Self, Self::Error> {
        if value > 0.0 && value <= MAX_DP_DELTA {
            Ok(Delta(value))
        } else {
            Err(format!(
                "dp_delta must be greater than 0 and at most {MAX_DP_DELTA:e}, not {value} (δ is \
                 the chance that a zCDP release exceeds its ε; keep it far below one over the \
                 number of people in a dataset)"
            ))
        }
    }
}

/// A privacy parameter ε: finite and greater than 0 (checked when the config is read, so the
/// TOML error names the line and key).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Deserialize)]
#[serde(try_from = "f64")]
pub struct Epsilon(f64);

// Sound: an Epsilon is never NaN.
impl Eq for Epsilon {}

impl Epsilon {
    /// ε, when finite and > 0.
    pub fn new(value: f64) -> Option<Epsilon> {
        (value.is_finite() && value > 0.0).then_some(Epsilon(value))
    }

    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for Epsilon {
    type Error = String;

    fn try_from(value: f64) -> Result<Self, Self::Error> {
        Epsilon::new(value)
            .ok_or_else(|| format!("epsilon must be a finite number greater than 0, not {value}"))
    }
}

impl std::fmt::Display for Epsilon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The period of a rate limit or budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// 3,600 seconds.
    Hour,
    /// 86,400 seconds (the default).
    #[default]
    Day,
    /// 7 days.
    Week,
}

impl Period {
    /// The name used in config files and vetoes (`hour`, `day`, `week`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Week => "week",
        }
    }

    /// The length in milliseconds (a sliding window ending now).
    pub fn millis(&self) -> i64 {
        match self {
            Period::Hour => 3_600_000,
            Period::Day => 86_400_000,
            Period::Week => 7 * 86_400_000,
        }
    }
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
