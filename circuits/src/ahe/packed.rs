//! Row ciphertexts: all the cells of one row under one shared randomness, each cell only as
//! wide as its values need.
//!
//! [`super::ExpElGamal`] spends four 16-bit limbs (five fixed-base multiplications) on every
//! value, whatever its range. An intersection-sum row is typically a count (always 1: one limb)
//! and a few amounts clipped to policy bounds (below 2^32: two limbs). A [`RowLayout`] gives each
//! cell its width in limbs, and one row is encrypted as
//!
//! ```text
//! (r·G, m_0·G + r·PK_0, …, m_{L-1}·G + r·PK_{L-1})      L = total limbs of the row
//! ```
//!
//! with one key per limb position — the same multi-recipient ElGamal as the four-limb scheme
//! (one `r` across independent keys is IND-CPA under DDH), stretched to `L` keys. A row of a
//! count and two 32-bit amounts costs 6 fixed-base multiplications instead of 15 and 192 bytes
//! instead of 480.
//!
//! Limbs never carry, so decryption recovers every limb's sum as in the four-limb scheme and
//! recombines each cell from its own limbs: cells never mix. DP noise is added to a cell's lowest
//! limb as one signed integer (`|noise| ≤ MAX_NOISE`), which the limb's decryption window
//! covers.

use curve25519_dalek::constants::RISTRETTO_BASEPOINT_TABLE;
use curve25519_dalek::ristretto::RistrettoBasepointTable;
use curve25519_dalek::traits::{Identity, IsIdentity};
use curve25519_dalek::{RistrettoPoint, Scalar};
use rayon::prelude::*;
use subtle::{Choice, ConditionallySelectable};
use zeroize::Zeroize;

use super::elgamal::{decompress, half_limb_point, random_nonzero_scalar};
use super::{AheError, LIMB_BITS, LIMB_MAX, LIMB_NEG_MARGIN, LIMBS, MAX_SUMMANDS, dlog};

/// Most limbs in one row (all cells together).
pub const MAX_ROW_LIMBS: usize = 256;

/// Largest noise magnitude [`RowCiphertext::add_noise`] accepts: far above any calibrated DP
/// noise, and small enough that the noised lowest limb stays inside its decryption window.
pub const MAX_NOISE: u64 = 1 << 31;

/// Rows per rayon task in [`encrypt_rows`] and [`sum_selected_rows`].
const ROW_CHUNK: usize = 256;

/// The width, in 16-bit limbs (1 to 4), of every cell of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowLayout {
    widths: Vec<u8>,
    /// `offsets[c]`: index of cell `c`'s lowest limb within the row.
    offsets: Vec<usize>,
    limbs: usize,
}

impl RowLayout {
    /// A layout from per-cell widths; each must be 1 to 4 limbs, and the row at most
    /// [`MAX_ROW_LIMBS`] limbs.
    pub fn new(widths: &[u8]) -> Result<RowLayout, AheError> {
        if widths.is_empty() {
            return Err(AheError::BadLayout("a row needs at least one cell".into()));
        }
        let mut offsets = Vec::with_capacity(widths.len());
        let mut limbs = 0usize;
        for (cell, &w) in widths.iter().enumerate() {
            if !(1..=LIMBS as u8).contains(&w) {
                return Err(AheError::BadLayout(format!(
                    "cell {cell} is {w} limbs wide; cells are 1 to {LIMBS} limbs"
                )));
            }
            offsets.push(limbs);
            limbs += usize::from(w);
        }
        if limbs > MAX_ROW_LIMBS {
            return Err(AheError::BadLayout(format!(
                "{limbs} limbs per row, more than {MAX_ROW_LIMBS}"
            )));
        }
        Ok(RowLayout {
            widths: widths.to_vec(),
            offsets,
            limbs,
        })
    }

    /// The narrowest layout for cells whose values never exceed `maxima`.
    pub fn for_maxima(maxima: &[u64]) -> Result<RowLayout, AheError> {
        let widths: Vec<u8> = maxima
            .iter()
            .map(|&m| {
                let bits = 64 - m.leading_zeros();
                bits.div_ceil(LIMB_BITS).max(1) as u8
            })
            .collect();
        RowLayout::new(&widths)
    }

    /// Per-cell widths, in limbs.
    pub fn widths(&self) -> &[u8] {
        &self.widths
    }

    /// Cells per row.
    pub fn cells(&self) -> usize {
        self.widths.len()
    }

    /// Limbs per row (keys needed).
    pub fn limbs(&self) -> usize {
        self.limbs
    }

    /// Bytes of one encoded row ciphertext.
    pub fn ciphertext_len(&self) -> usize {
        32 * (self.limbs + 1)
    }

    /// Largest value cell `cell` can hold.
    fn max_value(&self, cell: usize) -> u64 {
        match self.widths[cell] {
            4 => u64::MAX,
            w => (1u64 << (LIMB_BITS * u32::from(w))) - 1,
        }
    }
}

/// The secret key of a row layout: one scalar per limb. Move-only, zeroized, redacted.
pub struct RowSecretKey(Vec<Scalar>);

impl Drop for RowSecretKey {
    fn drop(&mut self) {
        for x in &mut self.0 {
            x.zeroize();
        }
    }
}

impl std::fmt::Debug for RowSecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RowSecretKey(<redacted>)")
    }
}

/// The public key: `x_i·G` per limb, each with a fixed-base table.
#[derive(Clone)]
pub struct RowPublicKey {
    points: Vec<RistrettoPoint>,
    tables: Vec<RistrettoBasepointTable>,
}

impl std::fmt::Debug for RowPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowPublicKey")
            .field("limbs", &self.points.len())
            .finish_non_exhaustive()
    }
}

impl RowPublicKey {
    fn from_points(points: Vec<RistrettoPoint>) -> RowPublicKey {
        let tables = points
            .par_iter()
            .map(RistrettoBasepointTable::create)
            .collect();
        RowPublicKey { points, tables }
    }

    /// The limb keys' encodings, concatenated (32 bytes per limb).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.points
            .iter()
            .flat_map(|p| p.compress().to_bytes())
            .collect()
    }

    /// Parses [`to_bytes`](Self::to_bytes) for `layout`: exactly one valid, non-identity point
    /// per limb. Never panics.
    pub fn from_bytes(layout: &RowLayout, bytes: &[u8]) -> Result<RowPublicKey, AheError> {
        if bytes.len() != 32 * layout.limbs() {
            return Err(AheError::WrongLength {
                len: bytes.len(),
                expected: 32 * layout.limbs(),
            });
        }
        let mut points = Vec::with_capacity(layout.limbs());
        for (k, enc) in bytes.chunks_exact(32).enumerate() {
            let p = decompress(enc, k)?;
            if p.is_identity() {
                return Err(AheError::IdentityPoint { index: k });
            }
            points.push(p);
        }
        Ok(RowPublicKey::from_points(points))
    }
}

/// A fresh key pair for `layout`, from the operating system's CSPRNG.
pub fn row_keygen(layout: &RowLayout) -> (RowSecretKey, RowPublicKey) {
    let xs: Vec<Scalar> = (0..layout.limbs())
        .map(|_| random_nonzero_scalar())
        .collect();
    let points = xs.iter().map(|x| x * RISTRETTO_BASEPOINT_TABLE).collect();
    (RowSecretKey(xs), RowPublicKey::from_points(points))
}

/// A row ciphertext, held decompressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowCiphertext {
    r: RistrettoPoint,
    c: Vec<RistrettoPoint>,
}

impl RowCiphertext {
    /// The encryption of an all-zero row with no randomness: the neutral element of
    /// [`add`](Self::add). Re-randomise before it leaves the process.
    pub fn zero(layout: &RowLayout) -> RowCiphertext {
        RowCiphertext {
            r: RistrettoPoint::identity(),
            c: vec![RistrettoPoint::identity(); layout.limbs()],
        }
    }

    /// Adds another row ciphertext of the same layout (cell by cell, limb by limb).
    pub fn add(&mut self, other: &RowCiphertext) {
        self.r += other.r;
        for (a, b) in self.c.iter_mut().zip(&other.c) {
            *a += b;
        }
    }

    /// Adds signed `noise` to cell `cell`, in its lowest limb. Constant-time in the noise.
    pub fn add_noise(
        &mut self,
        layout: &RowLayout,
        cell: usize,
        noise: i64,
    ) -> Result<(), AheError> {
        let Some(&limb) = layout.offsets.get(cell) else {
            return Err(AheError::BadLayout(format!(
                "cell {cell} of a {}-cell row",
                layout.cells()
            )));
        };
        if noise.unsigned_abs() > MAX_NOISE {
            return Err(AheError::NoiseTooLarge { max: MAX_NOISE });
        }
        let s = Scalar::from(noise.unsigned_abs());
        let s = Scalar::conditional_select(&s, &-s, Choice::from(u8::from(noise < 0)));
        self.c[limb] += &s * RISTRETTO_BASEPOINT_TABLE;
        Ok(())
    }

    /// Fresh randomness: the result decrypts to the same cells and is unlinkable to `self`
    /// (a sum's `r·G` would otherwise tell the key owner which rows were added).
    pub fn rerandomize(&mut self, pk: &RowPublicKey) {
        let s = random_nonzero_scalar();
        self.r += &s * RISTRETTO_BASEPOINT_TABLE;
        for (c, t) in self.c.iter_mut().zip(&pk.tables) {
            *c += &s * t;
        }
    }

    /// The wire encoding: `r·G` then one point per limb.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 * (self.c.len() + 1));
        out.extend_from_slice(self.r.compress().as_bytes());
        for c in &self.c {
            out.extend_from_slice(c.compress().as_bytes());
        }
        out
    }

    /// Parses one row ciphertext of `layout`: exact length, canonical points, no identity
    /// `r·G`. Never panics.
    pub fn decode(layout: &RowLayout, bytes: &[u8]) -> Result<RowCiphertext, AheError> {
        if bytes.len() != layout.ciphertext_len() {
            return Err(AheError::WrongLength {
                len: bytes.len(),
                expected: layout.ciphertext_len(),
            });
        }
        let r = decompress(&bytes[..32], 0)?;
        if r.is_identity() {
            return Err(AheError::IdentityPoint { index: 0 });
        }
        let c = bytes[32..]
            .chunks_exact(32)
            .enumerate()
            .map(|(k, enc)| decompress(enc, k + 1))
            .collect::<Result<_, _>>()?;
        Ok(RowCiphertext { r, c })
    }
}

/// Encrypts rows of `layout.cells()` values each (row-major) and returns the concatenated
/// encodings, [`RowLayout::ciphertext_len`] bytes per row, in order. A value wider than its cell
/// is [`AheError::ValueTooWide`] (clip to the policy's bounds first). rayon chunks of 256 rows,
/// each chunk's points encoded with one shared inversion.
pub fn encrypt_rows(
    pk: &RowPublicKey,
    layout: &RowLayout,
    values: &[u64],
) -> Result<Vec<u8>, AheError> {
    let cells = layout.cells();
    if pk.points.len() != layout.limbs() || !values.len().is_multiple_of(cells) {
        return Err(AheError::BadLayout(format!(
            "{} values for {cells}-cell rows under a {}-limb key",
            values.len(),
            pk.points.len()
        )));
    }
    for (i, &v) in values.iter().enumerate() {
        if v > layout.max_value(i % cells) {
            return Err(AheError::ValueTooWide {
                row: u32::try_from(i / cells).unwrap_or(u32::MAX),
                cell: i % cells,
            });
        }
    }
    let row_len = layout.ciphertext_len();
    let mut out = vec![0u8; values.len() / cells * row_len];
    out.par_chunks_mut(ROW_CHUNK * row_len)
        .zip(values.par_chunks(ROW_CHUNK * cells))
        .for_each(|(out_chunk, rows)| {
            let mut pts = Vec::with_capacity(rows.len() / cells * (layout.limbs() + 1));
            for row in rows.chunks_exact(cells) {
                encrypt_row_half(pk, layout, row, &mut pts);
            }
            let encs = RistrettoPoint::double_and_compress_batch(&pts);
            for (o, e) in out_chunk.chunks_exact_mut(32).zip(encs) {
                o.copy_from_slice(e.as_bytes());
            }
        });
    Ok(out)
}

/// Pushes the halved points of one row: `(r'·G, r'·PK_i + m_i·G/2)`, whose doubles are a fresh
/// encryption with `r = 2r'`.
fn encrypt_row_half(
    pk: &RowPublicKey,
    layout: &RowLayout,
    row: &[u64],
    out: &mut Vec<RistrettoPoint>,
) {
    let r = random_nonzero_scalar();
    out.push(&r * RISTRETTO_BASEPOINT_TABLE);
    let mut table = pk.tables.iter();
    for (&value, &width) in row.iter().zip(&layout.widths) {
        for i in 0..usize::from(width) {
            let limb = (value >> (LIMB_BITS as usize * i)) & 0xffff;
            // Keys and layout were checked to have the same number of limbs.
            if let Some(t) = table.next() {
                out.push(&r * t + half_limb_point(limb));
            }
        }
    }
}

/// Decodes the rows at `rows` of `ciphertexts` (as from [`encrypt_rows`]) and adds them up.
/// Errors name the bad row; more than [`MAX_SUMMANDS`] rows, a length that is not whole rows, or
/// an index past the end are refused before any work.
pub fn sum_selected_rows(
    layout: &RowLayout,
    ciphertexts: &[u8],
    rows: &[u32],
) -> Result<RowCiphertext, AheError> {
    let row_len = layout.ciphertext_len();
    if !ciphertexts.len().is_multiple_of(row_len) {
        return Err(AheError::WrongLength {
            len: ciphertexts.len(),
            expected: row_len,
        });
    }
    if rows.len() > MAX_SUMMANDS {
        return Err(AheError::TooManySummands {
            count: rows.len(),
            max: MAX_SUMMANDS,
        });
    }
    let count = ciphertexts.len() / row_len;
    if let Some(&index) = rows.iter().find(|&&i| i as usize >= count) {
        return Err(AheError::IndexOutOfRange { index, rows: count });
    }
    rows.par_chunks(ROW_CHUNK)
        .map(|chunk| {
            let mut acc = RowCiphertext::zero(layout);
            for &i in chunk {
                let start = i as usize * row_len;
                let ct = RowCiphertext::decode(layout, &ciphertexts[start..start + row_len])
                    .map_err(|e| AheError::InvalidCiphertext {
                        row: i,
                        source: Box::new(e),
                    })?;
                acc.add(&ct);
            }
            Ok(acc)
        })
        .try_reduce(
            || RowCiphertext::zero(layout),
            |mut a, b| {
                a.add(&b);
                Ok(a)
            },
        )
}

/// Decrypts every cell: each limb's sum by bounded baby-step giant-step (each search parallel),
/// then each cell recombined from its own limbs, exactly, in `i128`. A limb outside
/// `[-LIMB_NEG_MARGIN, LIMB_MAX)` is [`AheError::LimbOutOfRange`] after a capped search.
pub fn decrypt_cells(
    sk: &RowSecretKey,
    layout: &RowLayout,
    ct: &RowCiphertext,
) -> Result<Vec<i128>, AheError> {
    if ct.c.len() != layout.limbs() || sk.0.len() != layout.limbs() {
        return Err(AheError::BadLayout(format!(
            "a {}-limb ciphertext under a {}-limb key for a {}-limb layout",
            ct.c.len(),
            sk.0.len(),
            layout.limbs()
        )));
    }
    let shift = RistrettoPoint::mul_base(&Scalar::from(LIMB_NEG_MARGIN));
    // Limbs one after the other on the calling thread: each search is parallel inside, and the
    // baby-step table is built on first use by whichever thread gets there. Searching limbs on
    // rayon's workers could park every worker on that table's initialisation while another
    // thread's build waits for a worker: a deadlock (seen with 2 workers in the test suite).
    let limbs: Vec<i128> =
        ct.c.iter()
            .zip(&sk.0)
            .enumerate()
            .map(|(i, (c, x))| {
                let m = c - x * ct.r + shift;
                let shifted = dlog::solve(&m, LIMB_NEG_MARGIN + LIMB_MAX)
                    .ok_or(AheError::LimbOutOfRange { limb: i })?;
                Ok(i128::from(shifted) - i128::from(LIMB_NEG_MARGIN))
            })
            .collect::<Result<_, AheError>>()?;
    Ok(layout
        .offsets
        .iter()
        .zip(&layout.widths)
        .map(|(&offset, &width)| {
            (0..usize::from(width))
                .map(|i| limbs[offset + i] << (LIMB_BITS as usize * i))
                .sum()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> RowLayout {
        // A count, a 32-bit amount, a full 64-bit value.
        RowLayout::new(&[1, 2, 4]).unwrap()
    }

    #[test]
    fn layouts_are_checked_and_sized() {
        let l = layout();
        assert_eq!((l.cells(), l.limbs(), l.ciphertext_len()), (3, 7, 256));
        assert!(RowLayout::new(&[]).is_err());
        assert!(RowLayout::new(&[0]).is_err());
        assert!(RowLayout::new(&[5]).is_err());
        assert!(RowLayout::new(&[4; 65]).is_err());
        assert!(RowLayout::new(&[4; 64]).is_ok());
        let fitted =
            RowLayout::for_maxima(&[1, 0, 65_535, 65_536, u32::MAX.into(), u64::MAX]).unwrap();
        assert_eq!(fitted.widths(), &[1, 1, 1, 2, 2, 4]);
    }

    #[test]
    fn sums_of_selected_rows_decrypt_cell_by_cell() {
        let l = layout();
        let (sk, pk) = row_keygen(&l);
        let rows: Vec<[u64; 3]> = (0..600u64)
            .map(|i| [1, i * 7_000_003 % (1 << 32), u64::MAX - i])
            .collect();
        let flat: Vec<u64> = rows.iter().flatten().copied().collect();
        let bytes = encrypt_rows(&pk, &l, &flat).unwrap();
        assert_eq!(bytes.len(), 600 * l.ciphertext_len());
        let picked: Vec<u32> = (0..600).filter(|i| i % 3 == 1).collect();
        let mut sum = sum_selected_rows(&l, &bytes, &picked).unwrap();
        let mut truth = [0i128; 3];
        for &i in &picked {
            for (t, v) in truth.iter_mut().zip(rows[i as usize]) {
                *t += i128::from(v);
            }
        }
        sum.add_noise(&l, 0, -3).unwrap();
        sum.add_noise(&l, 1, 1_000_000).unwrap();
        sum.rerandomize(&pk);
        let decoded = RowCiphertext::decode(&l, &sum.encode()).unwrap();
        let cells = decrypt_cells(&sk, &l, &decoded).unwrap();
        assert_eq!(
            cells,
            vec![truth[0] - 3, truth[1] + 1_000_000, truth[2]],
            "cells never mix, noise lands in its cell"
        );
    }

    #[test]
    fn values_wider_than_their_cell_are_refused() {
        let l = RowLayout::new(&[1, 2]).unwrap();
        let (_, pk) = row_keygen(&l);
        assert_eq!(
            encrypt_rows(&pk, &l, &[1, 5, 65_536, 5]),
            Err(AheError::ValueTooWide { row: 1, cell: 0 })
        );
        assert!(encrypt_rows(&pk, &l, &[1, 5, 1]).is_err(), "not whole rows");
        let (_, other) = row_keygen(&layout());
        assert!(
            encrypt_rows(&other, &l, &[1, 5]).is_err(),
            "key of another layout"
        );
    }

    #[test]
    fn noise_is_bounded_and_targets_a_real_cell() {
        let l = layout();
        let mut ct = RowCiphertext::zero(&l);
        assert!(ct.add_noise(&l, 3, 1).is_err());
        assert_eq!(
            ct.add_noise(&l, 0, -(MAX_NOISE as i64) - 1),
            Err(AheError::NoiseTooLarge { max: MAX_NOISE })
        );
        assert!(ct.add_noise(&l, 0, i64::MIN).is_err());
        assert!(ct.add_noise(&l, 0, MAX_NOISE as i64).is_ok());
    }

    #[test]
    fn rerandomised_sums_share_no_point_with_the_original() {
        let l = layout();
        let (sk, pk) = row_keygen(&l);
        let bytes = encrypt_rows(&pk, &l, &[1, 2, 3]).unwrap();
        let mut ct = RowCiphertext::decode(&l, &bytes).unwrap();
        let before = ct.encode();
        ct.rerandomize(&pk);
        let after = ct.encode();
        for (a, b) in before.chunks(32).zip(after.chunks(32)) {
            assert_ne!(a, b);
        }
        assert_eq!(decrypt_cells(&sk, &l, &ct).unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn hostile_encodings_are_errors_not_panics() {
        let l = layout();
        let (_, pk) = row_keygen(&l);
        let good = encrypt_rows(&pk, &l, &[1, 2, 3]).unwrap();
        assert!(matches!(
            RowCiphertext::decode(&l, &good[1..]),
            Err(AheError::WrongLength { .. })
        ));
        let mut identity_r = good.clone();
        identity_r[..32].fill(0);
        assert_eq!(
            RowCiphertext::decode(&l, &identity_r),
            Err(AheError::IdentityPoint { index: 0 })
        );
        let mut bad_limb = good.clone();
        bad_limb[64..96].fill(0xff);
        assert_eq!(
            RowCiphertext::decode(&l, &bad_limb),
            Err(AheError::InvalidPoint { index: 2 })
        );
        let err = sum_selected_rows(&l, &[good.clone(), bad_limb].concat(), &[0, 1]).unwrap_err();
        assert!(
            matches!(err, AheError::InvalidCiphertext { row: 1, .. }),
            "{err}"
        );
        assert!(matches!(
            sum_selected_rows(&l, &good, &[1]),
            Err(AheError::IndexOutOfRange { index: 1, rows: 1 })
        ));
        assert!(RowPublicKey::from_bytes(&l, &pk.to_bytes()[32..]).is_err());
        assert!(RowPublicKey::from_bytes(&l, &vec![0u8; 32 * 7]).is_err());
        assert!(RowPublicKey::from_bytes(&l, &pk.to_bytes()).is_ok());
        // Random bytes of the right length never panic.
        for seed in 0..200u32 {
            let junk: Vec<u8> = (0..l.ciphertext_len())
                .map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) as u8)
                .collect();
            let _ = RowCiphertext::decode(&l, &junk);
        }
    }

    #[test]
    fn keys_are_redacted() {
        let (sk, pk) = row_keygen(&layout());
        assert_eq!(format!("{sk:?}"), "RowSecretKey(<redacted>)");
        assert!(!format!("{pk:?}").contains('['));
    }

    /// Per-row encryption cost of the packed layout against four-limb ciphertexts per cell
    /// (`cargo test --release -p cleanroom-circuits packed_measure -- --ignored --nocapture`).
    #[test]
    #[ignore = "measurement, run by hand in release mode"]
    fn packed_measure() {
        use std::time::Instant;
        let rows = 8192usize;
        let l = RowLayout::new(&[1, 2, 2]).unwrap();
        let (_, pk) = row_keygen(&l);
        let values: Vec<u64> = (0..rows as u64 * 3).map(|v| v % 1000).collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let t = Instant::now();
        pool.install(|| encrypt_rows(&pk, &l, &values).unwrap());
        let packed = t.elapsed().as_secs_f64() / rows as f64 * 1e6;
        let (_, pk4) = <super::super::ExpElGamal as super::super::AdditiveScheme>::keygen();
        let t = Instant::now();
        pool.install(|| super::super::encrypt_batch(&pk4, &values));
        let separate = t.elapsed().as_secs_f64() / rows as f64 * 1e6;
        println!(
            "count + two 32-bit amounts per row, 1 thread: packed {packed:.1} µs/row, \
             three 4-limb ciphertexts {separate:.1} µs/row, ratio {:.2}",
            separate / packed
        );
    }
}
