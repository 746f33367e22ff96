//! The node's config file (TOML): identity, addresses, TLS files, datasets and the agreements
//! (the allow-list of what this node computes with which partner).
//!
//! Every table rejects unknown keys, so a misspelt setting is an error rather than a silently
//! ignored default. Relative paths are resolved against the directory of the config file.
//! `node/testdata/node.example.toml` is a complete, commented example.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;

use cleanroom_transport::HostPort;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use toml::Spanned;

use crate::normalise::{NormaliseOptions, Normaliser, parse_region};

/// Longest name (node, partner, dataset, identifier, purpose) the config accepts.
pub const MAX_NAME_LEN: usize = 63;

/// Default lower bound on the partner's declared set size.
pub const DEFAULT_MIN_SET_SIZE: u64 = 1;
/// Default upper bound on the partner's declared set size.
pub const DEFAULT_MAX_SET_SIZE: u64 = 100_000_000;

/// The whole config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's name; must equal the identity in its certificate (checked by the engine).
    pub name: String,
    /// The coordinator's QUIC address (`host:port`: a DNS name, resolved at each connection,
    /// or an IP address).
    pub coordinator: HostPort,
    /// Data-plane bind address (port 0 = ephemeral).
    pub listen: SocketAddr,
    /// Data-plane address other nodes dial (`host:port`: a DNS name they resolve, or an IP
    /// address); `None` means the bound address.
    #[serde(default)]
    pub advertise: Option<HostPort>,
    /// Where the node writes membership files and other state.
    pub state_dir: PathBuf,
    /// Certificate files.
    pub tls: TlsConfig,
    /// Datasets this node serves (`[[dataset]]`).
    #[serde(default, rename = "dataset")]
    pub datasets: Vec<DatasetConfig>,
    /// One agreement per partner (`[[agreement]]`); no entry denies everything with a partner.
    #[serde(default, rename = "agreement")]
    pub agreements: Vec<Agreement>,
    /// The node-wide privacy budget (`[budget]`); `None` = no node-wide cap.
    #[serde(default)]
    pub budget: Option<Budget>,
    /// The privacy-budget ledger (SQLite): every ε charged and every noised release stored.
    /// Default `<state_dir>/ledger.sqlite`, beside the audit log; read it with [`Self::ledger_path`].
    #[serde(default)]
    pub ledger: Option<PathBuf>,
    /// Days to keep job results (membership files) in the state directory; older ones are
    /// purged at start and hourly. `None` = keep until an operator runs `cleanroom-node purge`.
    #[serde(default)]
    pub retention_days: Option<u64>,
    /// The δ at which this node's ε caps are read once a zCDP release (an aggregate's discrete
    /// Gaussian) is in the ledger; default [`DEFAULT_DP_DELTA`]. Read it with
    /// [`Self::delta`].
    #[serde(default)]
    pub dp_delta: Option<Delta>,
}

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

    fn validate(&self, name: &str) -> Result<(), String> {
        if self.epsilon_per_period.is_none() && self.epsilon_lifetime.is_none() {
            return Err(format!(
                "{name} sets neither epsilon_per_period nor epsilon_lifetime; give at least one"
            ));
        }
        Ok(())
    }

    /// The smallest of its caps (what one run must fit).
    fn tightest(&self) -> f64 {
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

/// Paths of the node's PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The CA certificate that signs every party.
    pub ca: PathBuf,
    /// This node's certificate (chain).
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// A dataset: one CSV file with a header row, and its identifier columns.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// The name jobs use for this dataset.
    pub name: String,
    /// The CSV file.
    pub path: PathBuf,
    /// Identifier columns (`[[dataset.identifier]]`).
    #[serde(default, rename = "identifier")]
    pub identifiers: Vec<IdentifierConfig>,
    /// Value columns (`[[dataset.value]]`): integers with declared bounds.
    #[serde(default, rename = "value")]
    pub values: Vec<ValueColumn>,
    /// Consent columns: purpose → boolean column (`true`, `1`, `yes` = consent, any case;
    /// anything else, empty included, = no consent). Rows without consent for a job's purpose
    /// are excluded and counted.
    #[serde(default)]
    pub consent: BTreeMap<String, String>,
    /// If true, a job whose purpose has no consent column here is refused; if false (default),
    /// such a job uses all rows.
    #[serde(default)]
    pub consent_required: bool,
}

/// An integer column with bounds (declared on a dataset, or the clipping bounds an allow entry
/// grants on one).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueColumn {
    /// The CSV header of the column.
    pub column: Spanned<String>,
    /// Smallest value (values below are clipped).
    pub min: i64,
    /// Largest value (values above are clipped).
    pub max: i64,
}

/// One identifier (join-key) column of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentifierConfig {
    /// The key name jobs use (`--on email`).
    pub name: String,
    /// The CSV header of the column.
    pub column: String,
    /// How values are normalised before matching.
    pub normaliser: Normaliser,
    /// Email only: apply the Gmail dot/plus rule (default false).
    #[serde(default)]
    pub gmail_rule: bool,
    /// Generic only: fold case (default false).
    #[serde(default)]
    pub case_fold: bool,
    /// Phone only: region (ISO 3166 alpha-2, e.g. `"GB"`) of numbers written without a
    /// country code (default `"US"`).
    #[serde(default)]
    pub default_region: Option<String>,
}

impl IdentifierConfig {
    /// The normaliser options this identifier sets (validated by the config).
    pub fn options(&self) -> NormaliseOptions {
        let mut o = NormaliseOptions {
            gmail_rule: self.gmail_rule,
            case_fold: self.case_fold,
            ..NormaliseOptions::default()
        };
        if let Some(region) = self.default_region.as_deref().and_then(parse_region) {
            o.default_region = region;
        }
        o
    }
}

/// The agreement with one partner.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agreement {
    /// The partner's node name (its certificate identity).
    pub partner: String,
    /// Purposes jobs with this partner may declare.
    pub purposes: Vec<String>,
    /// Last day (UTC, inclusive) the agreement is in force; `None` = no expiry.
    #[serde(default)]
    pub expires: Option<PolicyDate>,
    /// Allowed computations (`[[agreement.allow]]`); none allows nothing.
    #[serde(default)]
    pub allow: Vec<AllowEntry>,
    /// The ε this partner's jobs may spend per period **for each purpose** (`budget_per_purpose
    /// = { epsilon_per_period = 1.0, period = "week" }`), charged in the ledger; `None` = no cap
    /// beyond the node-wide `[budget]`.
    #[serde(default)]
    pub budget_per_purpose: Option<Budget>,
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

/// One allowed computation on one of this node's datasets.
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
    /// Match only: who learns membership (default `self`). Read it with
    /// [`AllowEntry::membership`].
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

fn default_threshold() -> Threshold {
    Threshold(1)
}

fn default_counts_to() -> Vec<Recipient> {
    vec![Recipient::Partner, Recipient::Coordinator]
}

impl AllowEntry {
    /// Who learns membership: `membership`, else the old `reveal_membership_to_partner`
    /// (`true` = both), else `self`. Always [`Membership::None`] for overlap.
    pub fn membership(&self) -> Membership {
        if self.computation == Computation::Overlap {
            return Membership::None;
        }
        match (self.membership, self.reveal_membership_to_partner) {
            (Some(m), _) => m,
            (None, Some(true)) => Membership::Both,
            (None, _) => Membership::SelfOnly,
        }
    }
}

fn default_min_set_size() -> u64 {
    DEFAULT_MIN_SET_SIZE
}

fn default_max_set_size() -> u64 {
    DEFAULT_MAX_SET_SIZE
}

/// The config file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    // The cause is part of the message, not a chained source: printed once, not twice.
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema (toml's message names the line,
    /// column and key).
    #[error("config file {}: {error}", path.display())]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The TOML error.
        error: toml::de::Error,
    },
    /// The file parses but breaks a rule.
    #[error("config file {}: {problem}", path.display())]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// Which setting and which rule, in words.
        problem: String,
    },
}

impl NodeConfig {
    /// Reads, parses and validates the config file at `path`, resolving relative paths against
    /// its directory.
    pub fn load(path: impl AsRef<Path>) -> Result<NodeConfig, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text` as if it were read from `path` (which names the file in
    /// errors and anchors relative paths); nothing is read from disk.
    pub fn parse(text: &str, path: &Path) -> Result<NodeConfig, ConfigError> {
        let mut cfg: NodeConfig = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            error,
        })?;
        // A composite key is written `email+phone` or `email,phone` (as on the command line);
        // it is kept, checked and printed as `email+phone`.
        for e in cfg.agreements.iter_mut().flat_map(|a| a.allow.iter_mut()) {
            for key in &mut e.keys {
                if key.contains(',') || key.contains(' ') {
                    *key = key
                        .split(['+', ','])
                        .map(str::trim)
                        .collect::<Vec<_>>()
                        .join("+");
                }
            }
        }
        cfg.validate(text).map_err(|problem| ConfigError::Invalid {
            path: path.to_owned(),
            problem,
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        cfg.resolve_paths(base);
        Ok(cfg)
    }

    /// The dataset called `name`.
    pub fn dataset(&self, name: &str) -> Option<&DatasetConfig> {
        self.datasets.iter().find(|d| d.name == name)
    }

    /// The agreement with `partner`.
    pub fn agreement_with(&self, partner: &str) -> Option<&Agreement> {
        self.agreements.iter().find(|a| a.partner == partner)
    }

    /// The δ at which ε caps are read (`dp_delta`, default [`DEFAULT_DP_DELTA`]).
    pub fn delta(&self) -> f64 {
        self.dp_delta.map_or(DEFAULT_DP_DELTA, |d| d.0)
    }

    /// The privacy-budget ledger's file: `ledger` if set, else `<state_dir>/ledger.sqlite`.
    pub fn ledger_path(&self) -> PathBuf {
        self.ledger
            .clone()
            .unwrap_or_else(|| self.state_dir.join("ledger.sqlite"))
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.state_dir);
        if let Some(ledger) = &mut self.ledger {
            resolve(ledger);
        }
        resolve(&mut self.tls.ca);
        resolve(&mut self.tls.cert);
        resolve(&mut self.tls.key);
        for d in &mut self.datasets {
            resolve(&mut d.path);
        }
    }

    fn validate(&self, text: &str) -> Result<(), String> {
        if self
            .ledger
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err("ledger is an empty path (omit it for <state_dir>/ledger.sqlite)".into());
        }
        if self.retention_days == Some(0) {
            return Err("retention_days must be at least 1 (omit it to keep results)".into());
        }
        if let Some(b) = &self.budget {
            b.validate("[budget]")?;
        }
        check_name("name", &self.name)?;
        let mut seen = HashSet::new();
        for d in &self.datasets {
            check_name("dataset name", &d.name)?;
            if !seen.insert(d.name.as_str()) {
                return Err(format!("dataset '{}' is declared twice", d.name));
            }
            if d.path.as_os_str().is_empty() {
                return Err(format!("dataset '{}' has an empty path", d.name));
            }
            let mut ids = HashSet::new();
            for id in &d.identifiers {
                check_name(&format!("dataset '{}': identifier name", d.name), &id.name)?;
                if !ids.insert(id.name.as_str()) {
                    return Err(format!(
                        "dataset '{}': identifier '{}' is declared twice",
                        d.name, id.name
                    ));
                }
                if id.column.is_empty() {
                    return Err(format!(
                        "dataset '{}': identifier '{}' has an empty column",
                        d.name, id.name
                    ));
                }
                let ctx = format!("dataset '{}': identifier '{}'", d.name, id.name);
                if id.gmail_rule && id.normaliser != Normaliser::Email {
                    return Err(format!(
                        "{ctx}: key gmail_rule applies to normaliser email only"
                    ));
                }
                if id.case_fold && id.normaliser != Normaliser::Generic {
                    return Err(format!(
                        "{ctx}: key case_fold applies to normaliser generic only"
                    ));
                }
                if let Some(region) = &id.default_region {
                    if id.normaliser != Normaliser::Phone {
                        return Err(format!(
                            "{ctx}: key default_region applies to normaliser phone only"
                        ));
                    }
                    if parse_region(region).is_none() {
                        return Err(format!(
                            "{ctx}: key default_region '{}' is not a region the phone library \
                             knows (two upper-case letters, e.g. US, GB)",
                            region.escape_default()
                        ));
                    }
                }
            }
            let mut cols = HashSet::new();
            for v in &d.values {
                let at = line_of(text, v.column.span());
                if v.column.get_ref().is_empty() {
                    return Err(format!(
                        "line {at}: dataset '{}': key value.column is empty",
                        d.name
                    ));
                }
                if !cols.insert(v.column.get_ref().as_str()) {
                    return Err(format!(
                        "line {at}: dataset '{}': value column '{}' is declared twice",
                        d.name,
                        v.column.get_ref()
                    ));
                }
                if v.min > v.max {
                    return Err(format!(
                        "line {at}: dataset '{}': value column '{}': min {} is above max {}",
                        d.name,
                        v.column.get_ref(),
                        v.min,
                        v.max
                    ));
                }
            }
            for (purpose, column) in &d.consent {
                check_name(
                    &format!("dataset '{}': key consent: purpose", d.name),
                    purpose,
                )?;
                if column.is_empty() {
                    return Err(format!(
                        "dataset '{}': key consent.{purpose} names an empty column",
                        d.name
                    ));
                }
            }
        }
        let mut partners = HashSet::new();
        for a in &self.agreements {
            check_name("agreement partner", &a.partner)?;
            if a.partner == self.name {
                return Err(format!(
                    "agreement with '{}', which is this node",
                    a.partner
                ));
            }
            if !partners.insert(a.partner.as_str()) {
                return Err(format!(
                    "two agreements with '{}' (one per partner)",
                    a.partner
                ));
            }
            let ctx = format!("agreement with '{}'", a.partner);
            if a.purposes.is_empty() {
                return Err(format!("{ctx}: no purposes (at least one is required)"));
            }
            for p in &a.purposes {
                check_name(&format!("{ctx}: purpose"), p)?;
            }
            if let Some(b) = &a.budget_per_purpose {
                b.validate(&format!("{ctx}: budget_per_purpose"))?;
            }
            for e in &a.allow {
                let at = line_of(text, e.dataset.span());
                self.validate_allow(&ctx, e, text)
                    .map_err(|problem| format!("line {at}: {problem}"))?;
                let Some(epsilon) = e.epsilon else { continue };
                // ε with no cap at all could be spent without end, and averaging enough noised
                // releases removes the noise: refuse it.
                if a.budget_per_purpose.is_none() && self.budget.is_none() {
                    return Err(format!(
                        "line {at}: {ctx}: allow {} on '{}' sets epsilon {epsilon} but no budget \
                         caps it: set budget_per_purpose on the agreement or a node-wide \
                         [budget] (epsilon_per_period and/or epsilon_lifetime); without one, \
                         every run spends epsilon without limit and averaging runs removes the \
                         noise",
                        e.computation,
                        e.dataset.get_ref(),
                    ));
                }
                // A run that costs more than a whole cap could never run: say so now rather
                // than veto every job later.
                let cost = run_cost(e.computation, epsilon, self.delta());
                let caps = [
                    ("budget_per_purpose", a.budget_per_purpose.as_ref()),
                    ("[budget]", self.budget.as_ref()),
                ];
                for (name, cap) in caps {
                    if let Some(cap) = cap.filter(|c| cost > c.tightest() + 1e-9) {
                        return Err(format!(
                            "line {at}: {ctx}: allow {} on '{}': one run costs epsilon {} \
                             (epsilon {epsilon}{}), above the {name} cap ({}), so no job could \
                             ever run",
                            e.computation,
                            e.dataset.get_ref(),
                            crate::ledger::show(cost),
                            if e.computation == Computation::Aggregate {
                                format!(
                                    " read as zCDP, rho {}, at dp_delta {:e}",
                                    crate::ledger::show(epsilon.get() * epsilon.get() / 2.0),
                                    self.delta()
                                )
                            } else {
                                String::new()
                            },
                            cap.describe()
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn validate_allow(&self, ctx: &str, e: &AllowEntry, text: &str) -> Result<(), String> {
        let Some(d) = self.dataset(e.dataset.get_ref()) else {
            return Err(format!(
                "{ctx}: allow {} references dataset '{}', which is not declared",
                e.computation,
                e.dataset.get_ref()
            ));
        };
        if e.computation == Computation::Aggregate {
            return validate_aggregate(ctx, e, d);
        }
        if e.computation == Computation::OverlapSum {
            validate_overlap_sum(ctx, e)?;
        } else if !e.group_by.is_empty() || e.roles.is_some() {
            return Err(format!(
                "{ctx}: allow {} on '{}': keys group_by and roles apply to overlap-sum and \
                 aggregate only",
                e.computation,
                e.dataset.get_ref()
            ));
        }
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
                        e.dataset,
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
        let overlap_membership = e.membership.is_some_and(|m| m != Membership::None)
            || e.reveal_membership_to_partner == Some(true);
        if e.computation == Computation::Overlap && overlap_membership {
            return Err(format!(
                "{ctx}: allow {} on '{}': key membership (reveal_membership_to_partner) applies \
                 to match only",
                e.computation,
                e.dataset.get_ref()
            ));
        }
        // A match reveals which records are shared to the sides the entry names, and its count
        // travels with that membership: noise on the count would protect nothing, so an ε here
        // would be a promise the node cannot keep.
        if e.computation == Computation::Match && e.epsilon.is_some() {
            return Err(format!(
                "{ctx}: allow {} on '{}': key epsilon does not apply to match (membership is released exactly); remove it, or allow overlap for a differentially private count",
                e.computation,
                e.dataset.get_ref()
            ));
        }
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
            let Some(declared) = d.values.iter().find(|dv| dv.column.get_ref() == col) else {
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
}

/// The checks an `overlap-sum` allow entry adds: roles listed once each (at least one), no
/// membership, group-by names not empty, and value bounds that are not negative (the values
/// are encrypted as unsigned integers; the key holder adds noise, not the values).
fn validate_overlap_sum(ctx: &str, e: &AllowEntry) -> Result<(), String> {
    let at = format!("{ctx}: allow overlap-sum on '{}'", e.dataset.get_ref());
    if let Some(roles) = &e.roles {
        if roles.is_empty() {
            return Err(format!(
                "{at}: roles lists no role; give \"key-holder\", \"value-holder\" or both"
            ));
        }
        let distinct: HashSet<_> = roles.iter().collect();
        if distinct.len() != roles.len() {
            return Err(format!("{at}: roles lists a role twice"));
        }
    }
    if e.membership.is_some() || e.reveal_membership_to_partner.is_some() {
        return Err(format!("{at}: membership applies to match only"));
    }
    if e.group_by.iter().any(String::is_empty) {
        return Err(format!("{at}: group_by has an empty column name"));
    }
    if let Some(v) = e.value_columns.iter().find(|v| v.min < 0) {
        return Err(format!(
            "{at}: value_columns '{}' has a negative lower bound {}; overlap-sum sums values \
             of 0 or more (shift the column, or raise min to 0)",
            v.column.get_ref(),
            v.min
        ));
    }
    Ok(())
}

/// The checks of an `aggregate` allow entry: no keys, no membership, at least one group-by
/// column, at least 3 parties, value columns declared and inside the dataset's bounds.
fn validate_aggregate(ctx: &str, e: &AllowEntry, d: &DatasetConfig) -> Result<(), String> {
    let at = format!("{ctx}: allow aggregate on '{}'", e.dataset.get_ref());
    if !e.keys.is_empty() {
        return Err(format!("{at}: aggregate joins nothing; remove keys"));
    }
    if e.membership.is_some() || e.reveal_membership_to_partner.is_some() {
        return Err(format!("{at}: membership applies to match only"));
    }
    if e.group_by.is_empty() {
        return Err(format!(
            "{at}: group_by must list the column(s) a job may group by"
        ));
    }
    if e.group_by.iter().any(String::is_empty) {
        return Err(format!("{at}: group_by has an empty column name"));
    }
    if e.person.as_ref().is_some_and(|p| p.is_empty()) {
        return Err(format!("{at}: person names an empty column"));
    }
    if e.person.as_ref().is_some_and(|p| e.group_by.contains(p)) {
        return Err(format!(
            "{at}: person column '{}' is also a group_by column",
            e.person.as_deref().unwrap_or_default()
        ));
    }
    if e.min_parties.is_some_and(|n| n < MIN_AGGREGATE_PARTIES) {
        return Err(format!(
            "{at}: min_parties must be at least {MIN_AGGREGATE_PARTIES}"
        ));
    }
    if !e.counts_to.contains(&Recipient::Coordinator) {
        return Err(format!(
            "{at}: an aggregate releases only to the coordinator; counts_to must include it"
        ));
    }
    let mut seen = HashSet::new();
    for v in &e.value_columns {
        let col = v.column.get_ref();
        let Some(declared) = d.value(col) else {
            return Err(format!(
                "{at}: value_columns names '{col}', which dataset '{}' does not declare \
                 (declared: {})",
                d.name,
                d.value_names()
            ));
        };
        if !seen.insert(col.as_str()) {
            return Err(format!("{at}: value_columns lists '{col}' twice"));
        }
        if v.min > v.max || v.min < declared.min || v.max > declared.max {
            return Err(format!(
                "{at}: bounds [{}, {}] of '{col}' must be ordered and inside the dataset's [{}, {}]",
                v.min, v.max, declared.min, declared.max
            ));
        }
    }
    Ok(())
}

impl DatasetConfig {
    /// The declared value column `column`.
    pub fn value(&self, column: &str) -> Option<&ValueColumn> {
        self.values.iter().find(|v| v.column.get_ref() == column)
    }

    /// The declared value column names, comma-separated (for messages).
    pub fn value_names(&self) -> String {
        let names: Vec<&str> = self
            .values
            .iter()
            .map(|v| v.column.get_ref().as_str())
            .collect();
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    }

    /// The consent column for `purpose`, if one is configured.
    pub fn consent_column(&self, purpose: &str) -> Option<&str> {
        self.consent.get(purpose).map(String::as_str)
    }

    /// The identifier called `name`.
    pub fn identifier(&self, name: &str) -> Option<&IdentifierConfig> {
        self.identifiers.iter().find(|i| i.name == name)
    }

    /// The declared identifier names, comma-separated (for messages).
    pub fn identifier_names(&self) -> String {
        let names: Vec<&str> = self.identifiers.iter().map(|i| i.name.as_str()).collect();
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    }
}

impl Agreement {
    /// Whether `purpose` is one of this agreement's purposes.
    pub fn allows_purpose(&self, purpose: &str) -> bool {
        self.purposes.iter().any(|p| p == purpose)
    }

    /// The allow entry for `computation` on `dataset` whose keys include `key` (`"email+phone"`).
    pub fn find_allow(
        &self,
        computation: Computation,
        dataset: &str,
        key: &str,
    ) -> Option<&AllowEntry> {
        self.allow.iter().find(|e| {
            e.computation == computation
                && e.dataset.get_ref() == dataset
                && e.keys.iter().any(|k| k == key)
        })
    }
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
fn line_of(text: &str, span: std::ops::Range<usize>) -> usize {
    let end = span.start.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{what} '{}' is not 1 to {MAX_NAME_LEN} characters of a-z, 0-9 and '-'",
            name.escape_default()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../testdata/node.example.toml");

    const MINIMAL: &str = r#"
name = "acme"
coordinator = "127.0.0.1:7400"
listen = "127.0.0.1:0"
state_dir = "state"
[tls]
ca = "pki/ca.pem"
cert = "pki/node-acme.pem"
key = "/etc/cleanroom/node-acme.key"
[[dataset]]
name = "customers"
path = "data/acme.csv"
  [[dataset.identifier]]
  name = "email"
  column = "email"
  normaliser = "email"
  [[dataset.identifier]]
  name = "phone"
  column = "phone"
  normaliser = "phone"
[[agreement]]
partner = "globex"
purposes = ["overlap-reporting"]
  [[agreement.allow]]
  computation = "match"
  dataset = "customers"
  keys = ["email", "email+phone"]
"#;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(text, Path::new("/etc/cleanroom/node.toml"))
    }

    fn invalid(text: &str) -> String {
        match parse(text) {
            Err(e @ (ConfigError::Invalid { .. } | ConfigError::Parse { .. })) => e.to_string(),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn example_file_parses() {
        let cfg = NodeConfig::parse(EXAMPLE, Path::new("node.example.toml")).unwrap();
        assert_eq!(cfg.name, "acme");
        assert!(cfg.dataset("customers").is_some());
        assert!(cfg.agreement_with("globex").is_some());
        assert!(cfg.agreement_with("hooli").is_none());
    }

    #[test]
    fn example_file_loads_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, EXAMPLE).unwrap();
        let cfg = NodeConfig::load(&file).unwrap();
        assert_eq!(cfg.tls.ca, dir.path().join("pki/ca.pem"));
    }

    #[test]
    fn minimal_parses_with_defaults_and_resolved_paths() {
        let cfg = parse(MINIMAL).unwrap();
        assert_eq!(cfg.advertise, None);
        assert_eq!(cfg.state_dir, Path::new("/etc/cleanroom/state"));
        assert_eq!(cfg.tls.ca, Path::new("/etc/cleanroom/pki/ca.pem"));
        assert_eq!(cfg.tls.key, Path::new("/etc/cleanroom/node-acme.key"));
        let d = cfg.dataset("customers").unwrap();
        assert_eq!(d.path, Path::new("/etc/cleanroom/data/acme.csv"));
        assert_eq!(d.identifier("phone").unwrap().normaliser, Normaliser::Phone);
        let a = cfg.agreement_with("globex").unwrap();
        let e = a
            .find_allow(Computation::Match, "customers", "email+phone")
            .unwrap();
        assert_eq!(e.membership(), Membership::SelfOnly);
        assert_eq!(
            (e.min_set_size, e.max_set_size),
            (DEFAULT_MIN_SET_SIZE, DEFAULT_MAX_SET_SIZE)
        );
        assert!(
            a.find_allow(Computation::Overlap, "customers", "email")
                .is_none()
        );
        assert!(
            a.find_allow(Computation::Match, "customers", "phone+email")
                .is_none()
        );
    }

    #[test]
    fn relative_config_path_keeps_relative_paths() {
        let cfg = NodeConfig::parse(MINIMAL, Path::new("node.toml")).unwrap();
        assert_eq!(cfg.tls.ca, Path::new("pki/ca.pem"));
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = MINIMAL.replace(
            "state_dir = \"state\"",
            "state_dir = \"state\"\nstate_dri = 1",
        );
        let msg = invalid(&text);
        assert!(msg.contains("/etc/cleanroom/node.toml"), "{msg}");
        assert!(msg.contains("state_dri"), "{msg}");
        assert!(msg.contains("line 6"), "{msg}");
        let text = MINIMAL.replace(
            "normaliser = \"phone\"",
            "normaliser = \"phone\"\nnormalizer = \"x\"",
        );
        assert!(invalid(&text).contains("normalizer"));
        let text = MINIMAL.replace("keys = [", "reveal = true\n  keys = [");
        assert!(invalid(&text).contains("reveal"));
    }

    #[test]
    fn unknown_normaliser_and_computation() {
        assert!(
            invalid(&MINIMAL.replace("normaliser = \"phone\"", "normaliser = \"sms\""))
                .contains("sms")
        );
        assert!(invalid(&MINIMAL.replace("\"match\"", "\"join\"")).contains("join"));
    }

    #[test]
    fn missing_file_names_it() {
        let e = NodeConfig::load("/nonexistent/cleanroom/node.toml").unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(e.to_string().contains("/nonexistent/cleanroom/node.toml"));
    }

    #[test]
    fn names_are_checked() {
        assert!(invalid(&MINIMAL.replace("name = \"acme\"", "name = \"Acme\"")).contains("'Acme'"));
        assert!(
            invalid(&MINIMAL.replace("name = \"customers\"", "name = \"cust omers\""))
                .contains("dataset name")
        );
        let long = "a".repeat(64);
        assert!(
            invalid(&MINIMAL.replace("partner = \"globex\"", &format!("partner = \"{long}\"")))
                .contains("partner")
        );
        assert!(
            invalid(&MINIMAL.replace("[\"overlap-reporting\"]", "[\"Overlap\"]"))
                .contains("purpose")
        );
        assert!(is_valid_name(&"a".repeat(63)));
        assert!(!is_valid_name(""));
    }

    #[test]
    fn composite_keys_are_written_either_way_and_kept_one_way() {
        let cfg = parse(&MINIMAL.replace(
            "keys = [\"email\", \"email+phone\"]",
            "keys = [\"email\", \"email, phone\"]",
        ))
        .unwrap();
        let a = cfg.agreement_with("globex").unwrap();
        assert!(
            a.find_allow(Computation::Match, "customers", "email+phone")
                .is_some()
        );
        assert!(
            a.allow
                .iter()
                .flat_map(|e| &e.keys)
                .all(|k| !k.contains(','))
        );
    }

    #[test]
    fn addresses_are_checked() {
        let msg = invalid(&MINIMAL.replace("\"127.0.0.1:7400\"", "\"coordinator\""));
        assert!(msg.contains("coordinator"), "{msg}");
        let msg = invalid(&MINIMAL.replace("listen = \"127.0.0.1:0\"", "listen = \"localhost\""));
        assert!(msg.contains("listen"), "{msg}");
        let cfg = parse(&MINIMAL.replace("state_dir", "advertise = \"10.0.0.7:7501\"\nstate_dir"))
            .unwrap();
        assert_eq!(cfg.advertise, Some("10.0.0.7:7501".parse().unwrap()));
        let msg = invalid(&MINIMAL.replace("state_dir", "advertise = \"10.0.0.7\"\nstate_dir"));
        assert!(msg.contains("advertise"), "{msg}"); // DNS names are addresses too (resolved when dialled).
        let cfg = parse(
            &MINIMAL
                .replace("\"127.0.0.1:7400\"", "\"localhost:7400\"")
                .replace(
                    "state_dir",
                    "advertise = \"acme-node.example.internal:7501\"\nstate_dir",
                ),
        )
        .unwrap();
        assert_eq!(cfg.coordinator.to_string(), "localhost:7400");
        assert_eq!(
            cfg.advertise.map(|a| a.to_string()).as_deref(),
            Some("acme-node.example.internal:7501")
        );
        let msg = invalid(&MINIMAL.replace("\"127.0.0.1:7400\"", "\"bad host:7400\""));
        assert!(
            msg.contains("coordinator") && msg.contains("host:port"),
            "{msg}"
        );
    }

    #[test]
    fn duplicate_dataset() {
        let dup = MINIMAL.replace(
            "[[agreement]]",
            "[[dataset]]\nname = \"customers\"\npath = \"x.csv\"\n[[agreement]]",
        );
        assert!(invalid(&dup).contains("dataset 'customers' is declared twice"));
    }

    #[test]
    fn duplicate_identifier() {
        let dup = MINIMAL.replace("name = \"phone\"", "name = \"email\"");
        let msg = invalid(&dup);
        assert!(
            msg.contains("identifier 'email' is declared twice"),
            "{msg}"
        );
    }

    #[test]
    fn agreement_rules() {
        let msg = invalid(&MINIMAL.replace("dataset = \"customers\"", "dataset = \"orders\""));
        assert!(
            msg.contains("dataset 'orders', which is not declared"),
            "{msg}"
        );
        let msg = invalid(&MINIMAL.replace(
            "keys = [\"email\", \"email+phone\"]",
            "keys = [\"email+ssn\"]",
        ));
        assert!(
            msg.contains("key 'ssn'") && msg.contains("declared: email, phone"),
            "{msg}"
        );
        let msg = invalid(&MINIMAL.replace("keys = [\"email\", \"email+phone\"]", "keys = []"));
        assert!(msg.contains("lists no keys"), "{msg}");
        let msg = invalid(&MINIMAL.replace("keys = [\"email\", \"email+phone\"]", "keys = [\"\"]"));
        assert!(msg.contains("empty key"), "{msg}");
        let msg =
            invalid(&MINIMAL.replace("keys = [\"email\", \"email+phone\"]", "keys = [\"email+\"]"));
        assert!(msg.contains("key ''"), "{msg}");
        let msg = invalid(&MINIMAL.replace(
            "keys = [\"email\", \"email+phone\"]",
            "keys = [\"email+email\"]",
        ));
        assert!(msg.contains("repeats"), "{msg}");
        let msg = invalid(&MINIMAL.replace("purposes = [\"overlap-reporting\"]", "purposes = []"));
        assert!(msg.contains("no purposes"), "{msg}");
        let msg = invalid(&MINIMAL.replace(
            "keys = [",
            "min_set_size = 10\n  max_set_size = 9\n  keys = [",
        ));
        assert!(
            msg.contains("min_set_size 10 is above max_set_size 9"),
            "{msg}"
        );
        let msg = invalid(&MINIMAL.replace(
            "computation = \"match\"",
            "computation = \"overlap\"\n  reveal_membership_to_partner = true",
        ));
        assert!(msg.contains("match only"), "{msg}");
        let msg = invalid(&MINIMAL.replace("partner = \"globex\"", "partner = \"acme\""));
        assert!(msg.contains("this node"), "{msg}");
        let twice = format!("{MINIMAL}\n[[agreement]]\npartner = \"globex\"\npurposes = [\"x\"]\n");
        assert!(invalid(&twice).contains("two agreements with 'globex'"));
    }

    fn with_allow(extra: &str) -> String {
        MINIMAL.replace(
            "keys = [\"email\", \"email+phone\"]",
            &format!("keys = [\"email\"]\n{extra}"),
        )
    }

    /// [`with_allow`] with MINIMAL's first entry made an overlap (ε applies to overlap only).
    fn with_overlap_allow(extra: &str) -> String {
        with_allow(extra).replacen("computation = \"match\"", "computation = \"overlap\"", 1)
    }

    #[test]
    fn policy_fields_parse() {
        let text = MINIMAL
            .replace(
                "purposes = [\"overlap-reporting\"]",
                "purposes = [\"overlap-reporting\"]\nexpires = \"2026-06-30\"",
            )
            .replace(
                "  normaliser = \"phone\"",
                "  normaliser = \"phone\"\n  default_region = \"GB\"\n  [[dataset.value]]\n  column = \"amount_cents\"\n  min = 0\n  max = 1000000",
            )
            .replace(
                "path = \"data/acme.csv\"",
                "path = \"data/acme.csv\"\nconsent = { fraud-detection = \"consent_fraud\" }",
            );
        let text = format!(
            "budget = {{ epsilon_per_period = 10, period = \"week\" }}\n{}",
            text.replace(
                "keys = [\"email\", \"email+phone\"]",
                "keys = [\"email\"]\n  membership = \"both\"\n  min_input_size = 1000\n  min_result = 10\n  runs_per_period = 2\n  period = \"hour\"\n  counts_to = [\"coordinator\"]\n  value_columns = [{ column = \"amount_cents\", min = 0, max = 50000 }]"
            )
        );
        let cfg = parse(&text).unwrap();
        let b = cfg.budget.as_ref().unwrap();
        assert_eq!(
            (b.epsilon_per_period.map(Epsilon::get), b.period),
            (Some(10.0), Period::Week)
        );
        assert_eq!(b.epsilon_lifetime, None);
        assert_eq!(cfg.delta(), DEFAULT_DP_DELTA);
        let a = cfg.agreement_with("globex").unwrap();
        assert_eq!(a.expires.unwrap().to_string(), "2026-06-30");
        let e = &a.allow[0];
        assert_eq!(e.membership(), Membership::Both);
        assert_eq!((e.min_input_size.get(), e.min_result.get()), (1000, 10));
        assert_eq!(e.runs_per_period.map(Threshold::get), Some(2));
        assert_eq!(e.period, Period::Hour);
        assert_eq!(e.epsilon, None);
        assert_eq!(e.counts_to, [Recipient::Coordinator]);
        assert_eq!(e.value_columns[0].max, 50000);
        let d = cfg.dataset("customers").unwrap();
        assert_eq!(d.consent_column("fraud-detection"), Some("consent_fraud"));
        assert_eq!(d.consent_column("overlap-reporting"), None);
        assert_eq!(
            d.identifier("phone").unwrap().options().default_region,
            crate::normalise::parse_region("GB").unwrap()
        );
        // Defaults.
        let e = &parse(MINIMAL).unwrap().agreements[0].allow[0];
        assert_eq!((e.min_input_size.get(), e.min_result.get()), (1, 1));
        assert_eq!(e.runs_per_period, None);
        assert_eq!(e.period, Period::Day);
        assert_eq!(e.epsilon, None);
        assert_eq!(e.counts_to, [Recipient::Partner, Recipient::Coordinator]);
    }

    #[test]
    fn epsilon_must_be_finite_and_positive() {
        for bad in ["0", "0.0", "-1.5", "nan", "inf", "-inf"] {
            let msg = invalid(&with_overlap_allow(&format!("  epsilon = {bad}")));
            assert!(msg.contains("epsilon"), "{bad}: {msg}");
            assert!(msg.contains("line "), "{bad}: {msg}");
            assert!(msg.contains("/etc/cleanroom/node.toml"), "{bad}: {msg}");
        }
        assert!(
            parse(&format!(
                "budget = {{ epsilon_lifetime = 5 }}\n{}",
                with_overlap_allow("  epsilon = 1")
            ))
            .is_ok()
        );
        // On a match, ε is refused: membership is released exactly, a noised count would
        // protect nothing.
        let msg = invalid(&with_allow("  epsilon = 1"));
        assert!(msg.contains("epsilon does not apply to match"), "{msg}");
        let msg = invalid(&format!(
            "budget = {{ epsilon_per_period = nan }}\n{MINIMAL}"
        ));
        assert!(msg.contains("epsilon"), "{msg}");
    }

    #[test]
    fn budget_per_purpose_and_ledger_path() {
        let text = MINIMAL.replace(
            "purposes = [\"overlap-reporting\"]",
            "purposes = [\"overlap-reporting\"]\nbudget_per_purpose = { epsilon_per_period = 1.5, period = \"week\" }",
        );
        let cfg = parse(&text).unwrap();
        let b = cfg.agreements[0].budget_per_purpose.as_ref().unwrap();
        assert_eq!(
            (b.epsilon_per_period.map(Epsilon::get), b.period),
            (Some(1.5), Period::Week)
        );
        // Default ledger beside the audit log; a relative setting is resolved like other paths.
        assert_eq!(
            cfg.ledger_path(),
            Path::new("/etc/cleanroom/state/ledger.sqlite")
        );
        let cfg = parse(&format!("ledger = \"db/budget.sqlite\"\n{text}")).unwrap();
        assert_eq!(
            cfg.ledger_path(),
            Path::new("/etc/cleanroom/db/budget.sqlite")
        );
        assert!(invalid(&format!("ledger = \"\"\n{text}")).contains("ledger is an empty path"));
        // Unknown keys inside the cap are errors, as everywhere.
        let msg = invalid(&MINIMAL.replace(
            "purposes = [\"overlap-reporting\"]",
            "purposes = [\"overlap-reporting\"]\nbudget_per_purpose = { epsilon = 1 }",
        ));
        assert!(msg.contains("epsilon"), "{msg}");
        let msg = invalid(&MINIMAL.replace(
            "purposes = [\"overlap-reporting\"]",
            "purposes = [\"overlap-reporting\"]\nbudget_per_purpose = { epsilon_per_period = 0 }",
        ));
        assert!(msg.contains("greater than 0"), "{msg}");
    }

    /// ε that no cap bounds could be spent without end (and averaging runs removes the
    /// noise): refused when the config is read, with what to add.
    #[test]
    fn epsilon_without_any_cap_is_refused() {
        let msg = invalid(&with_overlap_allow("  epsilon = 1"));
        assert!(
            msg.contains("allow overlap on 'customers' sets epsilon 1 but no budget caps it")
                && msg.contains("budget_per_purpose")
                && msg.contains("[budget]")
                && msg.contains("line "),
            "{msg}"
        );
        // Either cap is enough; so is a lifetime cap alone.
        let capped = with_overlap_allow("  epsilon = 1").replace(
            "purposes = [\"overlap-reporting\"]",
            "purposes = [\"overlap-reporting\"]\nbudget_per_purpose = { epsilon_lifetime = 10 }",
        );
        let cfg = parse(&capped).unwrap();
        let b = cfg.agreements[0].budget_per_purpose.as_ref().unwrap();
        assert_eq!(b.epsilon_per_period, None);
        assert_eq!(b.epsilon_lifetime.map(Epsilon::get), Some(10.0));
        // A budget must cap something.
        let msg = invalid(&format!("budget = {{ period = \"day\" }}\n{MINIMAL}"));
        assert!(
            msg.contains("[budget] sets neither epsilon_per_period nor epsilon_lifetime"),
            "{msg}"
        );
        // dp_delta: in (0, 1e-5].
        for bad in ["0", "-1e-9", "0.01", "nan"] {
            let msg = invalid(&format!("dp_delta = {bad}\n{MINIMAL}"));
            assert!(
                msg.contains("dp_delta must be greater than 0"),
                "{bad}: {msg}"
            );
        }
        assert_eq!(
            parse(&format!("dp_delta = 1e-7\n{MINIMAL}"))
                .unwrap()
                .delta(),
            1e-7
        );
    }

    #[test]
    fn epsilon_per_run_above_a_cap_is_an_error() {
        let text = with_overlap_allow("  epsilon = 2").replace(
            "purposes = [\"overlap-reporting\"]",
            "purposes = [\"overlap-reporting\"]\nbudget_per_purpose = { epsilon_per_period = 1 }",
        );
        let msg = invalid(&text);
        assert!(
            msg.contains(
                "one run costs epsilon 2 (epsilon 2), above the budget_per_purpose cap (epsilon 1 \
                 per day)"
            ),
            "{msg}"
        );
        let msg = invalid(&format!(
            "budget = {{ epsilon_per_period = 1, epsilon_lifetime = 1 }}\n{}",
            with_overlap_allow("  epsilon = 1.5")
        ));
        assert!(
            msg.contains("above the [budget] cap (epsilon 1 per day, epsilon 1 in all (lifetime))"),
            "{msg}"
        );
        assert!(
            parse(&format!(
                "budget = {{ epsilon_per_period = 1 }}\n{}",
                with_overlap_allow("  epsilon = 1")
            ))
            .is_ok()
        );
    }

    #[test]
    fn thresholds_of_zero_are_errors() {
        for key in ["min_input_size", "min_result", "runs_per_period"] {
            let msg = invalid(&with_allow(&format!("  {key} = 0")));
            assert!(
                msg.contains(key) && msg.contains("at least 1") && msg.contains("line "),
                "{msg}"
            );
            assert!(invalid(&with_allow(&format!("  {key} = -3"))).contains("at least 1"));
        }
    }

    #[test]
    fn unknown_policy_keys_and_values() {
        assert!(invalid(&with_allow("  epsilom = 1.0")).contains("epsilom"));
        assert!(invalid(&with_allow("  period = \"month\"")).contains("month"));
        assert!(invalid(&with_allow("  counts_to = [\"analyst\"]")).contains("analyst"));
        assert!(invalid(&with_allow("  membership = \"all\"")).contains("all"));
        assert!(
            invalid(&format!(
                "budget = {{ epsilon_per_period = 1, cap = 2 }}\n{MINIMAL}"
            ))
            .contains("cap")
        );
        let msg = invalid(&MINIMAL.replace(
            "purposes = [\"overlap-reporting\"]",
            "purposes = [\"overlap-reporting\"]\nexpires = \"2026-02-30\"",
        ));
        assert!(
            msg.contains("2026-02-30") && msg.contains("YYYY-MM-DD"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_value_column_and_bounds() {
        let msg = invalid(&with_allow(
            "  value_columns = [{ column = \"amount_cents\", min = 0, max = 1 }]",
        ));
        assert!(
            msg.contains("'amount_cents'")
                && msg.contains("declared: none")
                && msg.contains("line 26:")
                && msg.contains("(line 28)"),
            "{msg}"
        );
        let declared = MINIMAL.replace(
            "  normaliser = \"phone\"",
            "  normaliser = \"phone\"\n  [[dataset.value]]\n  column = \"amount_cents\"\n  min = 0\n  max = 100",
        );
        let wide = declared.replace(
            "keys = [\"email\", \"email+phone\"]",
            "keys = [\"email\"]\n  value_columns = [{ column = \"amount_cents\", min = 0, max = 101 }]",
        );
        assert!(invalid(&wide).contains("inside the dataset's [0, 100]"));
        let inverted = declared.replace("max = 100", "max = -1");
        assert!(invalid(&inverted).contains("min 0 is above max -1"));
    }

    #[test]
    fn membership_alias_and_rules() {
        let e = parse(&with_allow("  reveal_membership_to_partner = true"))
            .unwrap()
            .agreements[0]
            .allow[0]
            .clone();
        assert_eq!(e.membership(), Membership::Both);
        let e = parse(&with_allow("  reveal_membership_to_partner = false"))
            .unwrap()
            .agreements[0]
            .allow[0]
            .clone();
        assert_eq!(e.membership(), Membership::SelfOnly);
        let e = parse(&with_allow("  membership = \"none\""))
            .unwrap()
            .agreements[0]
            .allow[0]
            .clone();
        assert_eq!(e.membership(), Membership::None);
        let msg = invalid(&with_allow(
            "  membership = \"both\"\n  reveal_membership_to_partner = true",
        ));
        assert!(msg.contains("not both"), "{msg}");
        let msg =
            invalid(&with_allow("  membership = \"self\"").replace("\"match\"", "\"overlap\""));
        assert!(msg.contains("match only"), "{msg}");
        assert!(invalid(&with_allow("  counts_to = [\"partner\", \"partner\"]")).contains("twice"));
    }

    #[test]
    fn normaliser_options_apply_to_their_normaliser_only() {
        let msg = invalid(&MINIMAL.replace(
            "  normaliser = \"phone\"",
            "  normaliser = \"phone\"\n  gmail_rule = true",
        ));
        assert!(
            msg.contains("gmail_rule applies to normaliser email only"),
            "{msg}"
        );
        let msg = invalid(&MINIMAL.replace(
            "  normaliser = \"email\"",
            "  normaliser = \"email\"\n  case_fold = true",
        ));
        assert!(msg.contains("case_fold"), "{msg}");
        let msg = invalid(&MINIMAL.replace(
            "  normaliser = \"phone\"",
            "  normaliser = \"phone\"\n  default_region = \"ZZ\"",
        ));
        assert!(msg.contains("default_region 'ZZ'"), "{msg}");
        let cfg = parse(&MINIMAL.replace(
            "  normaliser = \"email\"",
            "  normaliser = \"email\"\n  gmail_rule = true",
        ))
        .unwrap();
        assert!(cfg.datasets[0].identifiers[0].options().gmail_rule);
    }

    #[test]
    fn dates_parse_strictly() {
        assert!(PolicyDate::parse("2026-06-30").is_some());
        for bad in [
            "2026-6-30",
            "2026-13-01",
            "2026-06-31",
            "26-06-30",
            "2026/06/30",
            "+026-06-30",
        ] {
            assert!(PolicyDate::parse(bad).is_none(), "{bad}");
        }
        let d = PolicyDate::from_unix_ms(1_782_864_000_000).unwrap();
        assert_eq!(d.to_string(), "2026-07-01");
    }

    // ---- aggregate entries (group_by, min_parties, max_colluders)

    fn with_aggregate(entry: &str) -> String {
        MINIMAL
            .replace(
                "  normaliser = \"phone\"",
                "  normaliser = \"phone\"\n  [[dataset.value]]\n  column = \"amount\"\n  min = 0\n  max = 100000",
            )
            .replace(
                "  computation = \"match\"\n  dataset = \"customers\"\n  keys = [\"email\", \"email+phone\"]",
                &format!("  computation = \"aggregate\"\n  dataset = \"customers\"\n{entry}"),
            )
    }

    #[test]
    fn aggregate_entry_parses() {
        let cfg = parse(&format!(
            "budget = {{ epsilon_per_period = 20 }}\n{}",
            with_aggregate(
                "  group_by = [\"category\"]\n  min_parties = 4\n  max_colluders = 2\n  value_columns = [{ column = \"amount\", min = 0, max = 5000 }]\n  epsilon = 1.0\n  person = \"customer\"",
            )
        ))
        .unwrap();
        let e = &cfg.agreement_with("globex").unwrap().allow[0];
        assert_eq!(e.computation, Computation::Aggregate);
        assert!(e.keys.is_empty());
        assert_eq!(e.group_by, vec!["category".to_owned()]);
        assert_eq!((e.min_parties, e.max_colluders), (Some(4), Some(2)));
        assert_eq!(e.person.as_deref(), Some("customer"));
        // Defaults: 3 parties minimum, colluders unset (all but one), per-row clipping.
        let cfg = parse(&with_aggregate("  group_by = [\"category\"]")).unwrap();
        let e = &cfg.agreement_with("globex").unwrap().allow[0];
        assert_eq!((e.min_parties, e.max_colluders), (None, None));
        assert_eq!(e.person, None);
        // An aggregate's ε is a zCDP ε: one run of ε 1 costs ρ 1/2, read at δ 1e-9 as
        // 0.5 + 2·√(0.5·ln 1e9) ≈ 6.94; a cap of 5 could never pay for it.
        let msg = invalid(&format!(
            "budget = {{ epsilon_per_period = 5 }}\n{}",
            with_aggregate("  group_by = [\"category\"]\n  epsilon = 1.0")
        ));
        assert!(
            msg.contains(
                "one run costs epsilon 6.937898 (epsilon 1 read as zCDP, rho 0.5, at dp_delta \
                 1e-9), above the [budget] cap (epsilon 5 per day)"
            ),
            "{msg}"
        );
        // person: aggregate only, not empty, not a group-by column.
        assert!(
            invalid(&with_aggregate(
                "  group_by = [\"category\"]\n  person = \"\""
            ))
            .contains("person names an empty column")
        );
        assert!(
            invalid(&with_aggregate(
                "  group_by = [\"category\"]\n  person = \"category\""
            ))
            .contains("person column 'category' is also a group_by column")
        );
        assert!(
            invalid(&with_overlap_allow("  person = \"customer\""))
                .contains("keys min_parties, max_colluders and person apply to aggregate only")
        );
    }

    fn with_overlap_sum(entry: &str) -> String {
        with_aggregate("").replace(
            "  computation = \"aggregate\"\n  dataset = \"customers\"\n",
            &format!(
                "  computation = \"overlap-sum\"\n  dataset = \"customers\"\n  keys = [\"email\"]\n{entry}\n"
            ),
        )
    }

    #[test]
    fn overlap_sum_entry_parses_and_its_rules_hold() {
        let cfg = parse(&format!(
            "budget = {{ epsilon_lifetime = 20 }}\n{}",
            with_overlap_sum(
                "  roles = [\"value-holder\"]\n  group_by = [\"category\"]\n  value_columns = [{ column = \"amount\", min = 0, max = 5000 }]\n  epsilon = 1.0",
            )
        ))
        .unwrap();
        let e = &cfg.agreement_with("globex").unwrap().allow[0];
        assert_eq!(e.computation, Computation::OverlapSum);
        assert_eq!(e.roles, Some(vec![SumRole::ValueHolder]));
        assert_eq!(e.group_by, vec!["category".to_owned()]);
        // Roles default to both (None).
        let cfg = parse(&with_overlap_sum("")).unwrap();
        assert_eq!(cfg.agreement_with("globex").unwrap().allow[0].roles, None);
        let msg = invalid(&with_overlap_sum("  roles = []"));
        assert!(msg.contains("roles lists no role"), "{msg}");
        let msg = invalid(&with_overlap_sum(
            "  roles = [\"key-holder\", \"key-holder\"]",
        ));
        assert!(msg.contains("a role twice"), "{msg}");
        assert!(invalid(&with_overlap_sum("  roles = [\"boss\"]")).contains("boss"));
        let msg = invalid(&with_overlap_sum(
            "  value_columns = [{ column = \"amount\", min = -1, max = 5 }]",
        ));
        assert!(msg.contains("negative lower bound"), "{msg}");
        let msg = invalid(&with_overlap_sum("  membership = \"both\""));
        assert!(msg.contains("match only"), "{msg}");
        let msg = invalid(&with_overlap_sum("  min_parties = 3"));
        assert!(msg.contains("aggregate only"), "{msg}");
        // roles belong to overlap-sum.
        assert!(invalid(&with_allow("  roles = [\"key-holder\"]")).contains("overlap-sum"));
    }

    #[test]
    fn aggregate_entry_rules() {
        assert!(invalid(&with_aggregate("")).contains("group_by must list"));
        assert!(
            invalid(&with_aggregate(
                "  group_by = [\"category\"]\n  keys = [\"email\"]"
            ))
            .contains("remove keys")
        );
        assert!(
            invalid(&with_aggregate(
                "  group_by = [\"category\"]\n  min_parties = 2"
            ))
            .contains("at least 3")
        );
        assert!(
            invalid(&with_aggregate(
                "  group_by = [\"category\"]\n  counts_to = [\"partner\"]"
            ))
            .contains("counts_to must include")
        );
        assert!(
            invalid(&with_aggregate(
                "  group_by = [\"category\"]\n  value_columns = [{ column = \"amount\", min = 0, max = 100001 }]"
            ))
            .contains("inside the dataset's")
        );
        assert!(
            invalid(&with_aggregate(
                "  group_by = [\"category\"]\n  value_columns = [{ column = \"nope\", min = 0, max = 1 }]"
            ))
            .contains("does not declare")
        );
        // The aggregate keys are refused on other computations.
        assert!(invalid(&with_allow("  group_by = [\"category\"]")).contains("aggregate only"));
        assert!(invalid(&with_allow("  max_colluders = 1")).contains("aggregate only"));
        // Overlap and match still need keys.
        assert!(
            invalid(&MINIMAL.replace("  keys = [\"email\", \"email+phone\"]\n", ""))
                .contains("lists no keys")
        );
    }
}
