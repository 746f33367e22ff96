//! Secure aggregation: per-group vectors summed across N parties by additive secret sharing over
//! `Z_2^64`, with distributed discrete Gaussian noise.
//!
//! Sans-IO, like the rest of the crate: the node loads its rows, calls these functions and moves
//! the bytes they produce.
//!
//! # The protocol
//!
//! Each of `n ≥ 3` parties holds a vector `x` of `groups × columns` cells (one row per public
//! group label, one column per summed value column plus, optionally, the row count), already
//! clipped to the policy's bounds ([`clip`], [`GroupVector::add`]). It
//!
//! 1. draws one fresh 32-byte seed `s_j` per peer `j` and sets its own share to
//!    `x − Σ_j PRG(s_j)` (wrapping, [`split`]): the shares sum to `x`;
//! 2. sends `s_j` to peer `j` (seed-compressed shares: 32 bytes on the wire instead of
//!    `8·groups·columns`; [`ShareSeed::to_bytes`] / [`ShareSeed::decode`]);
//! 3. sums its own share and the expansions of the seeds it received ([`accumulate`]), adds its
//!    share of the noise ([`add_noise`], [`NoisePlan`]) and sends that **partial** to the
//!    coordinator ([`encode_cells`] / [`decode_cells`], in bounded batches);
//! 4. the coordinator adds the `n` partials ([`reconstruct`]) and obtains `Σ x + Σ noise`,
//!    interpreted as signed `i64`.
//!
//! `PRG` is ChaCha20 keyed by the seed ([`expand_seed`]); its output is computationally
//! indistinguishable from uniform on `Z_2^64`.
//!
//! # What each party sees
//!
//! A peer receives only seeds, which are independent of the sender's data. The coordinator
//! receives partials; party `i`'s partial is its own share `x_i − Σ_j PRG(s_ij)` plus
//! `Σ_j PRG(s_ji)` from every peer — uniformly distributed unless the coordinator knows every
//! seed sent to `i`, i.e. colludes with all `n − 1` peers. Any `n − 1` of the `n` additive shares
//! of a party's vector are jointly uniform and independent of its input (the tests check this
//! statistically); only the sum of all `n` partials, which carries the noise of every party, is
//! meaningful.
//!
//! # Overflow
//!
//! All arithmetic is wrapping in `Z_2^64`, and the reconstructed total is read as a two's
//! complement `i64`. It is exact as long as the true noised total lies in `[−2^63, 2^63)`:
//! cells are clipped to policy bounds (at most `|2^63|` each), and a dataset has at most
//! [`MAX_ROWS_PER_PARTY`] rows, so a node refuses inputs for which `rows × max|bound| × parties`
//! could leave that range ([`check_no_overflow`]).
//!
//! # Noise
//!
//! See `docs/AGGREGATE.md` for the accounting. Each party adds to every cell of column `c` a draw
//! from `N_Z(0, σ_c²)` with `σ_c ≥ Δ_c·√k / (ε·√(n − t))`, `k` the number of noised columns, `t`
//! the number of parties that may collude and subtract their own noise ([`NoisePlan::new`]).

use std::fmt;

use dashu::base::SquareRoot;
use dashu::integer::UBig;
use dashu::rational::RBig;
use rand::rngs::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::dp::{self, DpError, Scale};

/// Bytes in a share seed.
pub const SEED_LEN: usize = 32;

/// Bytes per cell on the wire (little-endian `u64`).
pub const CELL_LEN: usize = 8;

/// Most cells (groups × columns) one aggregate may have: 2^24 (128 MiB per vector).
pub const MAX_CELLS: usize = 1 << 24;

/// Most rows one party may contribute (checked against overflow of the signed total).
pub const MAX_ROWS_PER_PARTY: u64 = 1 << 32;

/// Most parties in one aggregate.
pub const MAX_PARTIES: usize = 64;

/// Denominator of the rational to which a share's σ is rounded up.
const SIGMA_DENOMINATOR: u64 = 1 << 20;

/// What can go wrong in secure aggregation. Messages carry sizes and indices, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AggregateError {
    /// A vector shape with no cells, or more than [`MAX_CELLS`].
    #[error("an aggregate has 1 to {max} cells (groups × columns); got {groups} × {columns}")]
    BadShape {
        /// Groups asked for.
        groups: usize,
        /// Columns asked for.
        columns: usize,
        /// The cap.
        max: usize,
    },
    /// A group or column index outside the vector.
    #[error("cell ({group}, {column}) is outside the {groups} × {columns} vector")]
    OutOfRange {
        /// Group index.
        group: usize,
        /// Column index.
        column: usize,
        /// Groups in the vector.
        groups: usize,
        /// Columns in the vector.
        columns: usize,
    },
    /// A seed of the wrong length.
    #[error("a share seed is {SEED_LEN} bytes, got {0}")]
    SeedLength(usize),
    /// A batch of cells whose length is not a multiple of [`CELL_LEN`].
    #[error("a cell batch of {0} bytes is not a whole number of 8-byte cells")]
    RaggedBatch(usize),
    /// More cells than the vector has.
    #[error("received {got} cells, the vector has {expected}")]
    TooManyCells {
        /// Cells received so far, this batch included.
        got: usize,
        /// Cells expected in all.
        expected: usize,
    },
    /// Vectors of different lengths were combined.
    #[error("vectors of {a} and {b} cells cannot be combined")]
    LengthMismatch {
        /// One length.
        a: usize,
        /// The other.
        b: usize,
    },
    /// Fewer parties than an aggregate needs, or more than [`MAX_PARTIES`].
    #[error("an aggregate needs 3 to {MAX_PARTIES} parties, got {0}")]
    Parties(usize),
    /// Inputs so large that the signed total could overflow.
    #[error(
        "{rows} rows with values up to {max_abs} across {parties} parties could overflow a 64-bit total"
    )]
    Overflow {
        /// Rows of this party.
        rows: u64,
        /// Largest absolute bound.
        max_abs: u64,
        /// Parties.
        parties: usize,
    },
    /// The operating system gave no randomness.
    #[error("random source failed: {0}")]
    Entropy(String),
    /// Noise could not be configured or drawn.
    #[error("noise: {0}")]
    Noise(#[from] DpError),
}

/// Most groups of an integer group domain ([`GroupDomain::Range`]): 2^21, so that a vector of
/// the count and up to six sums stays within [`MAX_CELLS`] and a 10^6-group domain fits with
/// room to spare.
pub const MAX_RANGE_GROUPS: u64 = 1 << 21;

/// The label of the group that collects rows outside the domain: unlisted labels, integers out of
/// range. Always the last group.
pub const OTHER_GROUP: &str = "(other)";

/// The public group domain of an aggregate: every party builds its vector over the same groups
/// in the same order, then one more, "(other)", for rows outside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupDomain {
    /// Listed labels: group `i` is `labels[i]`.
    Labels(Vec<String>),
    /// The integers `lo ≤ v < hi`: group `i` is `lo + i`. Only the bounds travel.
    Range {
        /// Smallest integer of the domain.
        lo: i64,
        /// One past the largest.
        hi: i64,
    },
}

/// Why an integer group domain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DomainError {
    /// `hi ≤ lo`.
    #[error("the group range {lo}..{hi} is empty (it is lo..hi with lo < hi, hi excluded)")]
    Empty {
        /// Lower bound.
        lo: i64,
        /// Upper bound (excluded).
        hi: i64,
    },
    /// More than [`MAX_RANGE_GROUPS`] integers.
    #[error("the group range {lo}..{hi} has {size} groups; at most {MAX_RANGE_GROUPS}")]
    TooLarge {
        /// Lower bound.
        lo: i64,
        /// Upper bound (excluded).
        hi: i64,
        /// Integers in the range.
        size: u128,
    },
}

impl GroupDomain {
    /// An integer domain `[lo, hi)`, refused if empty or larger than [`MAX_RANGE_GROUPS`].
    pub fn range(lo: i64, hi: i64) -> Result<GroupDomain, DomainError> {
        if hi <= lo {
            return Err(DomainError::Empty { lo, hi });
        }
        let size = (i128::from(hi) - i128::from(lo)) as u128;
        if size > u128::from(MAX_RANGE_GROUPS) {
            return Err(DomainError::TooLarge { lo, hi, size });
        }
        Ok(GroupDomain::Range { lo, hi })
    }

    /// Groups in the vector: the domain's, plus "(other)".
    pub fn groups(&self) -> usize {
        match self {
            GroupDomain::Labels(l) => l.len() + 1,
            // At most MAX_RANGE_GROUPS (checked by `range`); saturating for a hand-built value.
            GroupDomain::Range { lo, hi } => {
                usize::try_from((i128::from(*hi) - i128::from(*lo)).max(0))
                    .unwrap_or(usize::MAX)
                    .saturating_add(1)
            }
        }
    }

    /// The index of "(other)": the last group.
    pub fn other(&self) -> usize {
        self.groups() - 1
    }

    /// The label of group `index` ("(other)" for the last, and for anything past it).
    pub fn label(&self, index: usize) -> String {
        match self {
            GroupDomain::Labels(l) => l
                .get(index)
                .cloned()
                .unwrap_or_else(|| OTHER_GROUP.to_owned()),
            GroupDomain::Range { lo, .. } => {
                if index >= self.other() {
                    OTHER_GROUP.to_owned()
                } else {
                    (i128::from(*lo) + index as i128).to_string()
                }
            }
        }
    }

    /// The group of an integer value of an integer domain: `value − lo` if in range, else
    /// "(other)". For a label domain, always "(other)" (use the label index instead).
    pub fn group_of_integer(&self, value: i64) -> usize {
        match self {
            GroupDomain::Range { lo, hi } if (*lo..*hi).contains(&value) => {
                (i128::from(value) - i128::from(*lo)) as usize
            }
            _ => self.other(),
        }
    }
}

/// Parses one field of an integer group-by column: optional surrounding ASCII spaces, an
/// optional sign and decimal digits that fit an `i64`. `None` for anything else (the row is
/// rejected, like a non-integer summed value).
pub fn parse_group_integer(field: &[u8]) -> Option<i64> {
    std::str::from_utf8(field.trim_ascii()).ok()?.parse().ok()
}

/// Clips `value` into `[min, max]` (the policy's bounds for a summed column).
pub fn clip(value: i64, min: i64, max: i64) -> i64 {
    value.clamp(min, max.max(min))
}

/// A party's per-group vector, `groups × columns` cells in `Z_2^64`, row-major (group `g`,
/// column `c` at `g·columns + c`).
#[derive(Clone, PartialEq, Eq)]
pub struct GroupVector {
    groups: usize,
    columns: usize,
    cells: Vec<u64>,
}

impl fmt::Debug for GroupVector {
    // The cells are a party's private figures (or a share of them): never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GroupVector({} × {})", self.groups, self.columns)
    }
}

impl GroupVector {
    /// A zero vector of the given shape.
    pub fn zeros(groups: usize, columns: usize) -> Result<GroupVector, AggregateError> {
        let cells = groups.saturating_mul(columns);
        if cells == 0 || cells > MAX_CELLS {
            return Err(AggregateError::BadShape {
                groups,
                columns,
                max: MAX_CELLS,
            });
        }
        Ok(GroupVector {
            groups,
            columns,
            cells: vec![0; cells],
        })
    }

    /// Adds `value` (already clipped) to cell `(group, column)`, wrapping in `Z_2^64`.
    pub fn add(&mut self, group: usize, column: usize, value: i64) -> Result<(), AggregateError> {
        if group >= self.groups || column >= self.columns {
            return Err(AggregateError::OutOfRange {
                group,
                column,
                groups: self.groups,
                columns: self.columns,
            });
        }
        let cell = &mut self.cells[group * self.columns + column];
        *cell = cell.wrapping_add(value as u64);
        Ok(())
    }

    /// Number of groups.
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// Number of columns.
    pub fn columns(&self) -> usize {
        self.columns
    }

    /// The cells, row-major.
    pub fn cells(&self) -> &[u64] {
        &self.cells
    }

    /// Consumes the vector into its cells.
    pub fn into_cells(self) -> Vec<u64> {
        self.cells
    }
}

/// Refuses inputs whose honest total could leave the `i64` range: `rows` rows per party, each
/// adding at most `max_abs` to a cell, `parties` parties (noise adds far less than the margin
/// of 2^62 this leaves when `rows·max_abs·parties ≤ 2^62`).
pub fn check_no_overflow(rows: u64, max_abs: u64, parties: usize) -> Result<(), AggregateError> {
    let total = u128::from(rows) * u128::from(max_abs.max(1)) * parties as u128;
    if rows > MAX_ROWS_PER_PARTY || total > 1u128 << 62 {
        return Err(AggregateError::Overflow {
            rows,
            max_abs,
            parties,
        });
    }
    Ok(())
}

/// A 32-byte seed from which a peer expands its additive share. Secret: move-only, zeroized on
/// drop, redacted in `Debug`.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct ShareSeed([u8; SEED_LEN]);

impl fmt::Debug for ShareSeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ShareSeed(..)")
    }
}

impl ShareSeed {
    /// A fresh seed from the operating system's CSPRNG.
    pub fn generate() -> Result<ShareSeed, AggregateError> {
        use rand::TryRng;
        let mut bytes = [0u8; SEED_LEN];
        rand::rngs::SysRng
            .try_fill_bytes(&mut bytes)
            .map_err(|e| AggregateError::Entropy(e.to_string()))?;
        Ok(ShareSeed(bytes))
    }

    /// A seed from known bytes (tests and test vectors).
    pub fn from_bytes(bytes: [u8; SEED_LEN]) -> ShareSeed {
        ShareSeed(bytes)
    }

    /// Decodes a seed received from a peer: exactly [`SEED_LEN`] bytes.
    pub fn decode(bytes: &[u8]) -> Result<ShareSeed, AggregateError> {
        let arr: [u8; SEED_LEN] = bytes
            .try_into()
            .map_err(|_| AggregateError::SeedLength(bytes.len()))?;
        Ok(ShareSeed(arr))
    }

    /// The bytes to send to the peer (over the mTLS data plane only).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_vec()
    }
}

/// Expands a seed into `len` pseudo-random cells (ChaCha20 keyed by the seed, little-endian
/// 64-bit words).
pub fn expand_seed(seed: &ShareSeed, len: usize) -> Vec<u64> {
    let mut rng = ChaCha20Rng::from_seed(seed.0);
    (0..len).map(|_| rng.next_u64()).collect()
}

/// Adds the expansion of `seed` to `acc` (wrapping) without materialising it.
pub fn accumulate_seed(acc: &mut [u64], seed: &ShareSeed) {
    let mut rng = ChaCha20Rng::from_seed(seed.0);
    for cell in acc.iter_mut() {
        *cell = cell.wrapping_add(rng.next_u64());
    }
}

/// One party's vector split into additive shares: its own share, and one seed per peer.
#[derive(Debug)]
pub struct Split {
    /// The share this party keeps: `x − Σ_j PRG(seed_j)`.
    pub own: Vec<u64>,
    /// One seed per peer, in the order the peers were given.
    pub seeds: Vec<ShareSeed>,
}

/// Splits `input` into `peers + 1` additive shares with fresh seeds from the OS CSPRNG.
pub fn split(input: &GroupVector, peers: usize) -> Result<Split, AggregateError> {
    let seeds = (0..peers)
        .map(|_| ShareSeed::generate())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(split_with_seeds(input, seeds))
}

/// [`split`] with the peers' seeds given (deterministic; tests).
pub fn split_with_seeds(input: &GroupVector, seeds: Vec<ShareSeed>) -> Split {
    let mut own = input.cells.clone();
    for seed in &seeds {
        let mut rng = ChaCha20Rng::from_seed(seed.0);
        for cell in own.iter_mut() {
            *cell = cell.wrapping_sub(rng.next_u64());
        }
    }
    Split { own, seeds }
}

/// `acc += share`, wrapping.
pub fn accumulate(acc: &mut [u64], share: &[u64]) -> Result<(), AggregateError> {
    if acc.len() != share.len() {
        return Err(AggregateError::LengthMismatch {
            a: acc.len(),
            b: share.len(),
        });
    }
    for (a, s) in acc.iter_mut().zip(share) {
        *a = a.wrapping_add(*s);
    }
    Ok(())
}

/// Adds signed noise to every cell, wrapping.
pub fn add_noise(acc: &mut [u64], noise: &[i64]) -> Result<(), AggregateError> {
    if acc.len() != noise.len() {
        return Err(AggregateError::LengthMismatch {
            a: acc.len(),
            b: noise.len(),
        });
    }
    for (a, n) in acc.iter_mut().zip(noise) {
        *a = a.wrapping_add(*n as u64);
    }
    Ok(())
}

/// Sums the partials of all parties (wrapping) and reads each cell as a signed `i64`.
pub fn reconstruct(partials: &[Vec<u64>]) -> Result<Vec<i64>, AggregateError> {
    let Some(first) = partials.first() else {
        return Err(AggregateError::Parties(0));
    };
    let mut total = first.clone();
    for p in &partials[1..] {
        accumulate(&mut total, p)?;
    }
    Ok(total.into_iter().map(|c| c as i64).collect())
}

/// Encodes cells for the wire: 8 bytes each, little-endian.
pub fn encode_cells(cells: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(cells.len() * CELL_LEN);
    for c in cells {
        out.extend_from_slice(&c.to_le_bytes());
    }
    out
}

/// Decodes one batch of cells and appends it to `into`, refusing a ragged batch or more cells
/// than `expected` in all (checked before anything is appended).
pub fn decode_cells(
    bytes: &[u8],
    into: &mut Vec<u64>,
    expected: usize,
) -> Result<(), AggregateError> {
    if !bytes.len().is_multiple_of(CELL_LEN) {
        return Err(AggregateError::RaggedBatch(bytes.len()));
    }
    let got = into.len() + bytes.len() / CELL_LEN;
    if got > expected {
        return Err(AggregateError::TooManyCells { got, expected });
    }
    into.extend(bytes.chunks_exact(CELL_LEN).map(|c| {
        let mut w = [0u8; CELL_LEN];
        w.copy_from_slice(c);
        u64::from_le_bytes(w)
    }));
    Ok(())
}

/// How much noise each party adds to each column, so that the released total is
/// `½ε²`-zCDP (per record of any one party) even if `max_colluders` parties remove their own
/// noise. `None` columns get no noise (the agreement asked for none).
#[derive(Debug, Clone, PartialEq)]
pub struct NoisePlan {
    /// Per column: σ of each party's share, exact.
    pub share_sigma: Vec<Option<Scale>>,
    /// Parties.
    pub parties: usize,
    /// Parties assumed honest (`parties − max_colluders`).
    pub honest: usize,
}

/// One column's noise, for reports.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnNoise {
    /// Each party's σ, exact.
    pub share_sigma: String,
    /// Standard deviation of the noise in the released total when every party adds its share:
    /// `σ_share·√parties` (approximate, for display and error bars).
    pub total_sd: f64,
    /// The KLS21 zCDP ε this column alone gets from the honest parties' noise.
    pub zcdp_epsilon: f64,
}

impl NoisePlan {
    /// No noise at all (no agreement asked for differential privacy).
    pub fn none(columns: usize, parties: usize) -> NoisePlan {
        NoisePlan {
            share_sigma: vec![None; columns],
            parties,
            honest: parties,
        }
    }

    /// The plan for ε (the strictest of the agreements), each column's L2 sensitivity `Δ_c`
    /// (the largest absolute clipping bound, 1 for a count), `parties` parties of which up to
    /// `max_colluders` may collude.
    ///
    /// The ε is split over the `k` columns in zCDP (`ρ = ε²/2` in all, `ρ/k` each), so column
    /// `c` needs total honest σ `Δ_c·√k/ε`; with `m = parties − max_colluders` honest parties each
    /// adds `σ_share ≥ Δ_c·√k / (ε·√m)`, rounded **up** to a multiple of 2^-20 and raised to 1
    /// if smaller (the KLS21 bound needs `σ_share ≥ 1`; more noise never weakens the guarantee).
    pub fn new(
        epsilon: f64,
        sensitivities: &[u64],
        parties: usize,
        max_colluders: usize,
    ) -> Result<NoisePlan, AggregateError> {
        if !(3..=MAX_PARTIES).contains(&parties) {
            return Err(AggregateError::Parties(parties));
        }
        if max_colluders >= parties {
            return Err(DpError::NoHonestParty {
                parties: parties as u32,
                max_colluders: max_colluders as u32,
            }
            .into());
        }
        if !epsilon.is_finite() || epsilon <= 0.0 {
            return Err(DpError::InvalidEpsilon(epsilon.to_string()).into());
        }
        let eps =
            RBig::try_from(epsilon).map_err(|_| DpError::InvalidEpsilon(epsilon.to_string()))?;
        let honest = parties - max_colluders;
        let k = sensitivities.len().max(1);
        let share_sigma = sensitivities
            .iter()
            .map(|&delta| {
                if delta == 0 {
                    return Err(AggregateError::Noise(DpError::ZeroSensitivity));
                }
                share_sigma(delta, k, &eps, honest).map(Some)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NoisePlan {
            share_sigma,
            parties,
            honest,
        })
    }

    /// Whether any column is noised.
    pub fn is_noised(&self) -> bool {
        self.share_sigma.iter().any(Option::is_some)
    }

    /// This party's noise for a `groups × columns` vector: an independent draw per cell (the
    /// exact sampler costs tens of µs a draw, so cells are drawn in parallel on rayon; each
    /// thread's generator is keyed from the OS CSPRNG).
    pub fn draw(&self, groups: usize) -> Result<Vec<i64>, AggregateError> {
        use rayon::prelude::*;
        let columns = self.share_sigma.len().max(1);
        let out: Result<Vec<i64>, DpError> = (0..groups * self.share_sigma.len())
            .into_par_iter()
            .map(|i| match &self.share_sigma[i % columns] {
                Some(s) => dp::sample_discrete_gaussian(s),
                None => Ok(0),
            })
            .collect();
        Ok(out?)
    }

    /// Per column, what the release carries (for the job result and the audit log).
    pub fn describe(&self, sensitivities: &[u64]) -> Vec<Option<ColumnNoise>> {
        self.share_sigma
            .iter()
            .zip(sensitivities)
            .map(|(sigma, &delta)| {
                let s = sigma.as_ref()?;
                let s_f = s.approx_f64();
                Some(ColumnNoise {
                    share_sigma: s.to_string(),
                    total_sd: s_f * (self.parties as f64).sqrt(),
                    zcdp_epsilon: kls21_epsilon(delta, s_f, self.honest),
                })
            })
            .collect()
    }
}

/// `σ_share = ⌈Δ·√k/(ε·√m) · D⌉ / D` with `D` = 2^20, at least 1: the square root is taken
/// of the exact rational `Δ²·k/(ε²·m)` with integer arithmetic, rounded up.
fn share_sigma(delta: u64, k: usize, eps: &RBig, honest: usize) -> Result<Scale, AggregateError> {
    let d = UBig::from(SIGMA_DENOMINATOR);
    let (ep, eq) = eps.clone().into_parts();
    let ep = dashu::base::UnsignedAbs::unsigned_abs(ep);
    // σ² = Δ²·k·eq² / (ep²·m); scaled by D² and rounded up.
    let num = &d * &d * UBig::from(delta) * UBig::from(delta) * UBig::from(k) * &eq * &eq;
    let den = &ep * &ep * UBig::from(honest);
    let target = (&num + &den - UBig::ONE) / &den;
    let mut root = target.sqrt();
    if &root * &root < target {
        root += UBig::ONE;
    }
    let root = root.max(d.clone());
    let root = u64::try_from(root).map_err(|_| DpError::ScaleTooLarge("share sigma".into()))?;
    Ok(Scale::from_ratio(root, SIGMA_DENOMINATOR)?)
}

/// KLS21 (Theorem 3 as restated in `dp`): the sum of `m` independent `N_Z(0, σ²)` on a query of
/// sensitivity `Δ` is `½ε²`-zCDP with `ε = min(sqrt(Δ²/(mσ²) + τ/2), Δ/(√m σ) + τ)`.
fn kls21_epsilon(delta: u64, sigma: f64, m: usize) -> f64 {
    let s2 = sigma * sigma;
    let pi2 = std::f64::consts::PI * std::f64::consts::PI;
    let tau = 10.0
        * (1..m)
            .map(|k| {
                let k = k as f64;
                (-2.0 * pi2 * s2 * k / (k + 1.0)).exp()
            })
            .sum::<f64>();
    let delta = delta as f64;
    let m = m as f64;
    let a = (delta * delta / (m * s2) + tau / 2.0).sqrt();
    let b = delta / (m.sqrt() * sigma) + tau;
    a.min(b)
}

/// The zCDP ε of several columns together (ρ adds up: `ε = sqrt(Σ ε_c²)`).
pub fn composed_epsilon(columns: &[Option<ColumnNoise>]) -> f64 {
    columns
        .iter()
        .flatten()
        .map(|c| c.zcdp_epsilon * c.zcdp_epsilon)
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vector(groups: usize, columns: usize, values: &[i64]) -> GroupVector {
        let mut v = GroupVector::zeros(groups, columns).unwrap();
        for (i, &x) in values.iter().enumerate() {
            v.add(i / columns % groups, i % columns, x).unwrap();
        }
        v
    }

    /// All parties' shares: party i keeps `own_i`, peer j gets `expand(seed_ij)`.
    fn run(inputs: &[GroupVector], noise: &[Vec<i64>]) -> Vec<i64> {
        let n = inputs.len();
        let splits: Vec<Split> = inputs.iter().map(|x| split(x, n - 1).unwrap()).collect();
        let len = inputs[0].cells().len();
        let mut partials = Vec::new();
        for i in 0..n {
            let mut acc = splits[i].own.clone();
            for (j, s) in splits.iter().enumerate() {
                if j == i {
                    continue;
                }
                // Party j's peers in order, skipping j itself: i's position among them.
                let pos = if i < j { i } else { i - 1 };
                accumulate_seed(&mut acc, &s.seeds[pos]);
            }
            assert_eq!(acc.len(), len);
            add_noise(&mut acc, &noise[i]).unwrap();
            partials.push(acc);
        }
        reconstruct(&partials).unwrap()
    }

    proptest! {
        #[test]
        fn shares_sum_to_the_input(
            values in proptest::collection::vec(any::<i64>(), 1..40),
            peers in 1usize..6,
        ) {
            let columns = 2;
            let groups = values.len().div_ceil(columns);
            let x = vector(groups, columns, &values);
            let split = split(&x, peers).unwrap();
            let mut total = split.own.clone();
            for seed in &split.seeds {
                let share = expand_seed(seed, total.len());
                accumulate(&mut total, &share).unwrap();
            }
            prop_assert_eq!(&total[..], x.cells());
        }

        #[test]
        fn n_parties_reconstruct_the_sum(
            a in proptest::collection::vec(-1_000_000i64..1_000_000, 6),
            b in proptest::collection::vec(-1_000_000i64..1_000_000, 6),
            c in proptest::collection::vec(-1_000_000i64..1_000_000, 6),
            d in proptest::collection::vec(-1_000_000i64..1_000_000, 6),
        ) {
            let inputs = [&a, &b, &c, &d].map(|v| vector(3, 2, v));
            let zero = vec![vec![0i64; 6]; 4];
            let total = run(&inputs, &zero);
            let expected: Vec<i64> = (0..6).map(|i| a[i] + b[i] + c[i] + d[i]).collect();
            prop_assert_eq!(total, expected);
        }

        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100), expected in 0usize..20) {
            let mut into = Vec::new();
            let r = decode_cells(&bytes, &mut into, expected);
            if r.is_ok() {
                prop_assert_eq!(into.len() * CELL_LEN, bytes.len());
                prop_assert!(into.len() <= expected);
            } else {
                prop_assert!(into.is_empty());
            }
            let _ = ShareSeed::decode(&bytes);
        }
    }

    #[test]
    fn integer_domains() {
        let d = GroupDomain::range(-2, 3).unwrap();
        assert_eq!(d.groups(), 6);
        assert_eq!(d.other(), 5);
        assert_eq!(
            (0..7).map(|i| d.label(i)).collect::<Vec<_>>(),
            ["-2", "-1", "0", "1", "2", "(other)", "(other)"]
        );
        // Bounds: lo is in, hi is out; outside goes to "(other)".
        assert_eq!(d.group_of_integer(-2), 0);
        assert_eq!(d.group_of_integer(2), 4);
        assert_eq!(d.group_of_integer(3), 5);
        assert_eq!(d.group_of_integer(-3), 5);
        assert_eq!(d.group_of_integer(i64::MIN), 5);
        assert_eq!(d.group_of_integer(i64::MAX), 5);
        // Extremes of i64 do not overflow.
        let top = GroupDomain::range(i64::MAX - 2, i64::MAX).unwrap();
        assert_eq!(top.groups(), 3);
        assert_eq!(top.label(1), (i64::MAX - 1).to_string());
        assert_eq!(top.group_of_integer(i64::MAX - 1), 1);
        assert_eq!(top.group_of_integer(i64::MAX), 2);
        let bottom = GroupDomain::range(i64::MIN, i64::MIN + 1).unwrap();
        assert_eq!(bottom.label(0), i64::MIN.to_string());
        // Empty and oversized ranges are refused before anything is allocated.
        assert!(matches!(
            GroupDomain::range(5, 5),
            Err(DomainError::Empty { .. })
        ));
        assert!(matches!(
            GroupDomain::range(5, -5),
            Err(DomainError::Empty { .. })
        ));
        assert!(GroupDomain::range(0, MAX_RANGE_GROUPS as i64).is_ok());
        assert!(matches!(
            GroupDomain::range(0, MAX_RANGE_GROUPS as i64 + 1),
            Err(DomainError::TooLarge { .. })
        ));
        let e = GroupDomain::range(i64::MIN, i64::MAX).unwrap_err();
        assert!(e.to_string().contains("at most 2097152"), "{e}");
        // Label domains: "(other)" after the labels.
        let l = GroupDomain::Labels(vec!["a".into(), "b".into()]);
        assert_eq!(
            (l.groups(), l.label(1), l.label(2)),
            (3, "b".into(), "(other)".into())
        );
        assert_eq!(l.group_of_integer(0), 2);
    }

    #[test]
    fn group_integers_parse_strictly() {
        assert_eq!(parse_group_integer(b"42"), Some(42));
        assert_eq!(parse_group_integer(b" -7 "), Some(-7));
        assert_eq!(parse_group_integer(b"+3"), Some(3));
        assert_eq!(parse_group_integer(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b" ",
            b"1.5",
            b"1e3",
            b"0x10",
            b"12a",
            b"9223372036854775808",
            b"\xff\xfe",
            b"1 2",
        ] {
            assert_eq!(parse_group_integer(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn noise_is_added_and_negative_totals_read_back_signed() {
        let inputs = [
            vector(2, 1, &[-5, 7]),
            vector(2, 1, &[-6, 0]),
            vector(2, 1, &[1, 0]),
        ];
        let noise = vec![vec![1, -1], vec![2, 0], vec![-10, 0]];
        assert_eq!(run(&inputs, &noise), vec![-10 - 7, 6]);
    }

    #[test]
    fn clipping() {
        assert_eq!(clip(5, 0, 10), 5);
        assert_eq!(clip(-5, 0, 10), 0);
        assert_eq!(clip(50, 0, 10), 10);
        assert_eq!(clip(i64::MIN, -3, 3), -3);
        assert_eq!(clip(i64::MAX, -3, 3), 3);
        // Inverted bounds (refused by config validation) collapse to `min`, never panic.
        assert_eq!(clip(7, 4, 2), 4);
    }

    #[test]
    fn shapes_and_indices_are_checked() {
        assert!(matches!(
            GroupVector::zeros(0, 3),
            Err(AggregateError::BadShape { .. })
        ));
        assert!(matches!(
            GroupVector::zeros(MAX_CELLS, 2),
            Err(AggregateError::BadShape { .. })
        ));
        assert!(GroupVector::zeros(usize::MAX, 2).is_err());
        let mut v = GroupVector::zeros(2, 2).unwrap();
        assert!(matches!(
            v.add(2, 0, 1),
            Err(AggregateError::OutOfRange { .. })
        ));
        assert!(matches!(
            v.add(0, 2, 1),
            Err(AggregateError::OutOfRange { .. })
        ));
        assert_eq!(format!("{v:?}"), "GroupVector(2 × 2)");
    }

    #[test]
    fn wire_decoders_reject_bad_lengths() {
        assert_eq!(
            ShareSeed::decode(&[0u8; 31]).unwrap_err(),
            AggregateError::SeedLength(31)
        );
        assert!(ShareSeed::decode(&[0u8; 33]).is_err());
        let seed = ShareSeed::decode(&[9u8; 32]).unwrap();
        assert_eq!(seed.to_bytes(), vec![9u8; 32]);
        assert_eq!(format!("{seed:?}"), "ShareSeed(..)");

        let mut into = Vec::new();
        assert_eq!(
            decode_cells(&[0u8; 12], &mut into, 10).unwrap_err(),
            AggregateError::RaggedBatch(12)
        );
        decode_cells(&encode_cells(&[1, 2, 3]), &mut into, 4).unwrap();
        assert_eq!(into, vec![1, 2, 3]);
        assert_eq!(
            decode_cells(&encode_cells(&[4, 5]), &mut into, 4).unwrap_err(),
            AggregateError::TooManyCells {
                got: 5,
                expected: 4
            }
        );
        assert_eq!(into, vec![1, 2, 3], "nothing appended on error");
        assert!(matches!(
            accumulate(&mut [0u64; 2], &[1]),
            Err(AggregateError::LengthMismatch { .. })
        ));
        assert!(matches!(reconstruct(&[]), Err(AggregateError::Parties(0))));
    }

    #[test]
    fn overflow_guard() {
        check_no_overflow(1_000_000, 1_000_000, 5).unwrap();
        assert!(check_no_overflow(1 << 31, 1 << 31, 3).is_err());
        assert!(check_no_overflow(MAX_ROWS_PER_PARTY + 1, 1, 3).is_err());
    }

    /// Any n − 1 shares of a party's vector are independent of its input: the seeded shares do
    /// not depend on it at all, and the kept share, seen with all but one of the seeded shares,
    /// is uniform. Statistical check: the kept share of the input 0 and of the input
    /// 0x7fff…, over many fresh splits, are both uniform in each of 16 top-nibble bins (χ²,
    /// df 15) and have the same bin counts within χ² of a two-sample test. The critical value
    /// is 73.7, p < 1e-9 per test: the shares are fresh randomness at every run, and at
    /// p = 0.001 three tests failed about one run in 330 (CI hit it). A share that depended on
    /// the input would still fail: its top nibble would be skewed by thousands, not tens.
    #[test]
    fn any_n_minus_one_shares_are_independent_of_the_input() {
        const DRAWS: usize = 8_000;
        let bins_of = |input: i64| -> [u64; 16] {
            let x = vector(1, 1, &[input]);
            let mut bins = [0u64; 16];
            for _ in 0..DRAWS {
                // 3 parties: the party keeps `own`, peers 1 and 2 get seeds. The view of
                // {own, peer 1's share} must not depend on the input: look at own + share1
                // (what a coalition of this party's kept share and peer 1 could combine) and at
                // own alone.
                let s = split(&x, 2).unwrap();
                let own = s.own[0];
                let with_peer = own.wrapping_add(expand_seed(&s.seeds[0], 1)[0]);
                bins[(own >> 60) as usize] += 1;
                bins[(with_peer >> 60) as usize] += 1;
            }
            bins
        };
        // χ²(df 15) upper quantile at p = 9.7e-10.
        let critical_df15 = 73.7;
        let expected = (2 * DRAWS) as f64 / 16.0;
        let uniform_chi2 = |bins: &[u64; 16]| -> f64 {
            bins.iter()
                .map(|&o| (o as f64 - expected).powi(2) / expected)
                .sum()
        };
        let zero = bins_of(0);
        let big = bins_of(i64::MAX);
        assert!(uniform_chi2(&zero) < critical_df15, "{zero:?}");
        assert!(uniform_chi2(&big) < critical_df15, "{big:?}");
        // Two-sample χ² (equal sizes): Σ (a − b)² / (a + b), df 15.
        let two_sample: f64 = zero
            .iter()
            .zip(&big)
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2) / (a + b) as f64)
            .sum();
        assert!(two_sample < critical_df15, "{zero:?} vs {big:?}");
        // The seeded shares are a function of the seed alone.
        let seed = || ShareSeed::from_bytes([7; SEED_LEN]);
        let a = split_with_seeds(&vector(1, 1, &[0]), vec![seed()]);
        let b = split_with_seeds(&vector(1, 1, &[i64::MAX]), vec![seed()]);
        assert_eq!(
            expand_seed(&a.seeds[0], 1),
            expand_seed(&b.seeds[0], 1),
            "a peer's share does not depend on the input"
        );
        assert_ne!(a.own, b.own);
    }

    #[test]
    fn seeds_are_fresh_and_expansion_deterministic() {
        let a = ShareSeed::generate().unwrap();
        let b = ShareSeed::generate().unwrap();
        assert_ne!(a.to_bytes(), b.to_bytes());
        assert_eq!(expand_seed(&a, 5), expand_seed(&a, 5));
        assert_eq!(expand_seed(&a, 3)[..], expand_seed(&a, 5)[..3]);
        let mut acc = vec![0u64; 5];
        accumulate_seed(&mut acc, &a);
        assert_eq!(acc, expand_seed(&a, 5));
        // Test vector: ChaCha20 with the all-zero key, nonce 0: the RFC 8439 §2.3.2-style
        // keystream begins 76 b8 e0 ad a0 f1 3d 90.
        let zero = ShareSeed::from_bytes([0; SEED_LEN]);
        assert_eq!(
            expand_seed(&zero, 1)[0],
            u64::from_le_bytes([0x76, 0xb8, 0xe0, 0xad, 0xa0, 0xf1, 0x3d, 0x90])
        );
    }

    #[test]
    fn noise_plan_calibration() {
        // ε = 1, two columns (Δ 100 and 1), 5 parties, 2 colluders: m = 3 honest.
        let plan = NoisePlan::new(1.0, &[100, 1], 5, 2).unwrap();
        assert_eq!(plan.honest, 3);
        let s0 = plan.share_sigma[0].as_ref().unwrap().approx_f64();
        let s1 = plan.share_sigma[1].as_ref().unwrap().approx_f64();
        // Δ·√k/(ε·√m) = 100·√2/√3 ≈ 81.65; the count column ≈ 0.816 → raised to 1.
        assert!((s0 - 100.0 * (2.0f64 / 3.0).sqrt()).abs() < 1e-5, "{s0}");
        assert!(s0 >= 100.0 * (2.0f64 / 3.0).sqrt());
        assert_eq!(s1, 1.0);
        let described = plan.describe(&[100, 1]);
        let eps = composed_epsilon(&described);
        assert!(eps <= 1.0 + 1e-3, "composed ε {eps}");
        assert!(eps > 0.5, "composed ε {eps}");
        let c0 = described[0].as_ref().unwrap();
        assert!((c0.total_sd - s0 * 5f64.sqrt()).abs() < 1e-9);

        assert!(matches!(
            NoisePlan::new(1.0, &[1], 2, 0),
            Err(AggregateError::Parties(2))
        ));
        assert!(matches!(
            NoisePlan::new(1.0, &[1], 3, 3),
            Err(AggregateError::Noise(DpError::NoHonestParty { .. }))
        ));
        assert!(NoisePlan::new(0.0, &[1], 3, 1).is_err());
        assert!(NoisePlan::new(f64::NAN, &[1], 3, 1).is_err());
        assert!(NoisePlan::new(1.0, &[0], 3, 1).is_err());
        assert!(!NoisePlan::none(2, 3).is_noised());
        assert_eq!(NoisePlan::none(2, 3).draw(2).unwrap(), vec![0; 4]);
    }

    /// The total noise of n parties has variance n·σ_share² (and its honest part at least the
    /// target): checked on draws.
    #[test]
    fn drawn_noise_has_the_planned_variance() {
        let plan = NoisePlan::new(0.5, &[10], 3, 1).unwrap();
        let s = plan.share_sigma[0].as_ref().unwrap().approx_f64();
        // Δ·√1/(ε·√2) = 10/(0.5·1.414) ≈ 14.14.
        assert!((s - 20.0 / 2f64.sqrt()).abs() < 1e-4, "{s}");
        let n = 4_000;
        let draws = plan.draw(n).unwrap();
        let var = draws.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n as f64;
        let tol = 5.0 * (2.0f64).sqrt() * s * s / (n as f64).sqrt();
        assert!((var - s * s).abs() < tol, "var {var} vs {}", s * s);
    }
}
