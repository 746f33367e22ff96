//! Row ciphertexts: the cells of one row packed as slots of as few Paillier plaintexts as fit
//! (usually one), each slot wide enough that sums never carry into the next.
//!
//! A [`SlotLayout`] gives each cell a slot of `W` bits in some plaintext (2047 bits each, cells
//! packed greedily in order). A cell holds values below `2^(W − 33)`; the sum of at most
//! [`MAX_SUMMANDS`] `= 2^32 − 1` of them stays below `2^(W − 1)`. DP noise is added once per cell
//! by the summing party together with a public bias of `2^63` ([`NOISE_BIAS`]): `bias + noise`
//! is in `[0, 2^64)` for every `i64` noise, so nothing is ever subtracted from a slot and no slot
//! borrows from its neighbour; with `W ≥ 65` the slot holds `sum + bias + noise < 2^W`. The key
//! owner decrypts each plaintext **whole**, reads each slot and subtracts the bias: per cell it
//! learns `sum + noise` and nothing else (no limb of a cell is ever decrypted on its own).
//!
//! Noise wider than `i64` cannot be added; the exact samplers refuse scales above `2^48`
//! (`crate::dp::MAX_SCALE`), for which a draw beyond `2^63` has probability below `e^{−2^15}`.

use crypto_bigint::{U2048, U4096};
use rayon::prelude::*;

use super::AheError;
use super::paillier::{CIPHERTEXT_LEN, Ciphertext, PLAINTEXT_BITS, PublicKey, SecretKey};

/// Most rows one sum may add up (so a slot's sum has at most 32 more bits than a value).
pub const MAX_SUMMANDS: usize = u32::MAX as usize;
/// Bits a sum of [`MAX_SUMMANDS`] values adds to a value's width.
const SUMMAND_BITS: u32 = 32;
/// The public bias added with the noise to every slot: `bias + noise ≥ 0` for every `i64` noise.
pub const NOISE_BIAS: u128 = 1 << 63;
/// Narrowest slot: a 64-bit sum, plus the bias and noise, without carry.
pub const MIN_SLOT_BITS: u8 = 65;
/// Widest slot: sums of full 64-bit values.
pub const MAX_SLOT_BITS: u8 = 64 + SUMMAND_BITS as u8 + 1;
/// Most cells in one row.
pub const MAX_ROW_CELLS: usize = 256;

/// Rows per rayon task in [`encrypt_rows`] and [`sum_selected_rows`].
const ROW_CHUNK: usize = 64;

/// Where each cell of a row lives: its slot width, and which plaintext and bit offset hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotLayout {
    widths: Vec<u8>,
    /// `(plaintext, bit offset)` of each cell's slot.
    place: Vec<(usize, u32)>,
    /// Bits used in each plaintext (the rest must decrypt to zero).
    used: Vec<u32>,
}

impl SlotLayout {
    /// A layout from per-cell slot widths in bits, each in
    /// `[MIN_SLOT_BITS, MAX_SLOT_BITS]`, at most [`MAX_ROW_CELLS`] cells.
    pub fn new(widths: &[u8]) -> Result<SlotLayout, AheError> {
        if widths.is_empty() || widths.len() > MAX_ROW_CELLS {
            return Err(AheError::BadLayout(format!(
                "{} cells per row; 1 to {MAX_ROW_CELLS} are supported",
                widths.len()
            )));
        }
        let mut place = Vec::with_capacity(widths.len());
        let mut used = vec![0u32];
        for (cell, &w) in widths.iter().enumerate() {
            if !(MIN_SLOT_BITS..=MAX_SLOT_BITS).contains(&w) {
                return Err(AheError::BadLayout(format!(
                    "cell {cell} has a {w}-bit slot; slots are {MIN_SLOT_BITS} to \
                     {MAX_SLOT_BITS} bits"
                )));
            }
            let w = u32::from(w);
            let last = used.len() - 1;
            if used[last] + w > PLAINTEXT_BITS {
                used.push(0);
            }
            let k = used.len() - 1;
            place.push((k, used[k]));
            used[k] += w;
        }
        Ok(SlotLayout {
            widths: widths.to_vec(),
            place,
            used,
        })
    }

    /// The narrowest layout for cells whose values never exceed `maxima`.
    pub fn for_maxima(maxima: &[u64]) -> Result<SlotLayout, AheError> {
        let widths: Vec<u8> = maxima
            .iter()
            .map(|&m| {
                let bits = (64 - m.leading_zeros()).max(1);
                (bits + SUMMAND_BITS).max(64) as u8 + 1
            })
            .collect();
        SlotLayout::new(&widths)
    }

    /// Per-cell slot widths, in bits.
    pub fn widths(&self) -> &[u8] {
        &self.widths
    }

    /// Cells per row.
    pub fn cells(&self) -> usize {
        self.widths.len()
    }

    /// Paillier ciphertexts per row.
    pub fn ciphertexts(&self) -> usize {
        self.used.len()
    }

    /// Bytes of one encoded row ciphertext.
    pub fn ciphertext_len(&self) -> usize {
        CIPHERTEXT_LEN * self.ciphertexts()
    }

    /// Largest value cell `cell` can hold: `2^(W − 33) − 1`.
    pub fn max_value(&self, cell: usize) -> u64 {
        let bits = u32::from(self.widths[cell]) - 1 - SUMMAND_BITS;
        if bits >= 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        }
    }

    /// The plaintexts of one row: each cell's value (or `bias + noise`) at its slot.
    fn pack(&self, values: impl Iterator<Item = u64>) -> Vec<U2048> {
        let mut plain = vec![U2048::ZERO; self.ciphertexts()];
        for (&(k, offset), v) in self.place.iter().zip(values) {
            plain[k] = plain[k].wrapping_add(&U2048::from_u64(v).shl_vartime(offset));
        }
        plain
    }
}

/// One row's ciphertexts (one per plaintext of its layout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowCiphertext {
    c: Vec<Ciphertext>,
}

impl RowCiphertext {
    /// The wire encoding: the ciphertexts in order, [`SlotLayout::ciphertext_len`] bytes.
    pub fn encode(&self) -> Vec<u8> {
        self.c.iter().flat_map(Ciphertext::to_bytes).collect()
    }

    /// Parses one row ciphertext of `layout` under the public key: exact length, every
    /// ciphertext below `n²` and sharing no factor with `n`. Never panics.
    pub fn decode(
        pk: &PublicKey,
        layout: &SlotLayout,
        bytes: &[u8],
    ) -> Result<RowCiphertext, AheError> {
        Self::decode_with(layout, bytes, |b| pk.decode(b))
    }

    /// The same, by the key owner (which checks units modulo each prime).
    pub fn decode_own(
        sk: &SecretKey,
        layout: &SlotLayout,
        bytes: &[u8],
    ) -> Result<RowCiphertext, AheError> {
        Self::decode_with(layout, bytes, |b| sk.decode(b))
    }

    fn decode_with(
        layout: &SlotLayout,
        bytes: &[u8],
        decode: impl Fn(&[u8]) -> Result<Ciphertext, AheError>,
    ) -> Result<RowCiphertext, AheError> {
        if bytes.len() != layout.ciphertext_len() {
            return Err(AheError::WrongLength {
                len: bytes.len(),
                expected: layout.ciphertext_len(),
            });
        }
        let c = bytes
            .chunks_exact(CIPHERTEXT_LEN)
            .map(decode)
            .collect::<Result<_, _>>()?;
        Ok(RowCiphertext { c })
    }

    /// Adds, to every cell, the public bias and that cell's noise (`noise[c]`, any `i64`):
    /// one plaintext addition per ciphertext. Call it exactly once per sum (the key owner
    /// subtracts one bias per cell).
    pub fn add_noise(
        &mut self,
        pk: &PublicKey,
        layout: &SlotLayout,
        noise: &[i64],
    ) -> Result<(), AheError> {
        if noise.len() != layout.cells() || self.c.len() != layout.ciphertexts() {
            return Err(AheError::BadLayout(format!(
                "noise for {} cells added to {} ciphertexts of a {}-cell layout",
                noise.len(),
                self.c.len(),
                layout.cells()
            )));
        }
        // bias + noise = noise + 2^63 in [0, 2^64): flipping the sign bit of the two's
        // complement is exactly that.
        let biased = noise.iter().map(|&n| (n as u64) ^ (1 << 63));
        for (c, m) in self.c.iter_mut().zip(layout.pack(biased)) {
            *c = pk.add_plain(c, &m);
        }
        Ok(())
    }

    /// Fresh randomness for every ciphertext (mandatory before a sum leaves the summing party:
    /// the key owner could otherwise recover the product of the summed rows' randomness).
    pub fn rerandomize(&mut self, pk: &PublicKey) {
        for c in &mut self.c {
            *c = pk.rerandomize(c);
        }
    }
}

/// A running product of row ciphertexts (a homomorphic sum) in a form that costs one
/// Montgomery multiplication per row: the true product is `v · R^deficit mod n²`.
#[derive(Clone, Debug)]
pub struct RowSum {
    v: Vec<U4096>,
    deficit: u64,
    rows: u64,
}

impl RowSum {
    /// The sum of no rows.
    pub fn empty(layout: &SlotLayout) -> RowSum {
        RowSum {
            v: vec![U4096::ONE; layout.ciphertexts()],
            deficit: 0,
            rows: 0,
        }
    }

    /// Rows added so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Adds another sum of the same layout.
    pub fn add(&mut self, pk: &PublicKey, other: &RowSum) {
        for (a, b) in self.v.iter_mut().zip(&other.v) {
            *a = pk.mont_mul(a, b);
        }
        self.deficit = self.deficit.saturating_add(other.deficit).saturating_add(1);
        self.rows = self.rows.saturating_add(other.rows);
    }

    /// The encrypted sum. Add the noise and re-randomise before it leaves the process.
    pub fn finish(self, pk: &PublicKey) -> RowCiphertext {
        RowCiphertext {
            c: self
                .v
                .iter()
                .map(|v| Ciphertext(pk.unscale(v, self.deficit)))
                .collect(),
        }
    }
}

/// Encrypts rows of `layout.cells()` values each (row-major) under the key owner's key and
/// returns the concatenated encodings, [`SlotLayout::ciphertext_len`] bytes per row, in order.
/// A value above its cell's [`SlotLayout::max_value`] is [`AheError::ValueTooWide`] (clip to the
/// policy's bounds first). Parallel over rows.
pub fn encrypt_rows(
    sk: &SecretKey,
    layout: &SlotLayout,
    values: &[u64],
) -> Result<Vec<u8>, AheError> {
    let cells = layout.cells();
    if !values.len().is_multiple_of(cells) {
        return Err(AheError::BadLayout(format!(
            "{} values for {cells}-cell rows",
            values.len()
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
            let mut rng = rand::rng();
            for (o, row) in out_chunk
                .chunks_exact_mut(row_len)
                .zip(rows.chunks_exact(cells))
            {
                for (o, m) in o
                    .chunks_exact_mut(CIPHERTEXT_LEN)
                    .zip(layout.pack(row.iter().copied()))
                {
                    o.copy_from_slice(&sk.encrypt(&m, &mut rng).to_bytes());
                }
            }
        });
    Ok(out)
}

/// Adds up the rows at `rows` of `ciphertexts` (as from [`encrypt_rows`]). Every added
/// ciphertext must be below `n²` and share no factor with `n`; errors name the bad row. More than
/// [`MAX_SUMMANDS`] rows, a length that is not whole rows, or an index past the end are refused
/// before any work. Rows not selected are not even parsed.
pub fn sum_selected_rows(
    pk: &PublicKey,
    layout: &SlotLayout,
    ciphertexts: &[u8],
    rows: &[u32],
) -> Result<RowSum, AheError> {
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
    let row = |i: u32| &ciphertexts[i as usize * row_len..(i as usize + 1) * row_len];
    let bad_row = |i: u32, e: AheError| AheError::InvalidCiphertext {
        row: i,
        source: Box::new(e),
    };
    rows.par_chunks(ROW_CHUNK)
        .map(|chunk| {
            let mut acc = RowSum::empty(layout);
            for &i in chunk {
                for (a, bytes) in acc.v.iter_mut().zip(row(i).chunks_exact(CIPHERTEXT_LEN)) {
                    let c = pk.decode_range(bytes).map_err(|e| bad_row(i, e))?;
                    *a = pk.mont_mul(a, &c);
                }
                acc.deficit += 1;
                acc.rows += 1;
            }
            // One unit check per chunk: the product is a unit iff every factor is (R is a power
            // of two, prime to n). Only if it fails are the rows checked one by one, to name one.
            if !acc.v.iter().all(|v| pk.is_unit(v)) {
                for &i in chunk {
                    RowCiphertext::decode(pk, layout, row(i)).map_err(|e| bad_row(i, e))?;
                }
            }
            Ok(acc)
        })
        .try_reduce(
            || RowSum::empty(layout),
            |mut a, b| {
                a.add(pk, &b);
                Ok(a)
            },
        )
}

/// Decrypts every plaintext of `ct` whole and reads each cell's slot minus the bias: per cell,
/// the sum plus the noise, exactly, in `i128`. A plaintext with bits above its last slot (not
/// something an honest summing party can produce) is [`AheError::StrayBits`].
pub fn decrypt_cells(
    sk: &SecretKey,
    layout: &SlotLayout,
    ct: &RowCiphertext,
) -> Result<Vec<i128>, AheError> {
    if ct.c.len() != layout.ciphertexts() {
        return Err(AheError::BadLayout(format!(
            "{} ciphertexts for a layout of {}",
            ct.c.len(),
            layout.ciphertexts()
        )));
    }
    let plain: Vec<U2048> = ct.c.iter().map(|c| sk.decrypt(c)).collect();
    for (k, (m, &used)) in plain.iter().zip(&layout.used).enumerate() {
        if m.bit_width() > used {
            return Err(AheError::StrayBits { ciphertext: k });
        }
    }
    Ok(layout
        .place
        .iter()
        .zip(&layout.widths)
        .map(|(&(k, offset), &w)| {
            let words = plain[k].shr_vartime(offset).to_words();
            let slot = (u128::from(words[0]) | (u128::from(words[1]) << 64)) & ((1u128 << w) - 1);
            slot as i128 - NOISE_BIAS as i128
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::paillier::tests::key;
    use super::*;
    use crypto_bigint::modular::FixedMontyForm;
    use proptest::prelude::*;

    /// `Enc(k·m)` from `Enc(m)`: the sum of `k` copies of a row, for sums too long to add up.
    fn times(pk: &PublicKey, ct: &RowCiphertext, k: u64) -> RowCiphertext {
        RowCiphertext {
            c: ct
                .c
                .iter()
                .map(|c| {
                    let x = FixedMontyForm::new(&c.0, &pk.n2_params_for_tests());
                    Ciphertext(x.pow_vartime(&crypto_bigint::U64::from_u64(k)).retrieve())
                })
                .collect(),
        }
    }

    #[test]
    fn layouts_are_checked_sized_and_packed() {
        let l = SlotLayout::for_maxima(&[1, 500_000, u32::MAX.into(), 1 << 32, u64::MAX]).unwrap();
        assert_eq!(l.widths(), &[65, 65, 65, 66, 97]);
        assert_eq!(l.ciphertexts(), 1);
        assert_eq!(l.max_value(0), u32::MAX.into());
        assert_eq!(l.max_value(4), u64::MAX);
        assert!(SlotLayout::new(&[]).is_err());
        assert!(SlotLayout::new(&[64]).is_err());
        assert!(SlotLayout::new(&[98]).is_err());
        assert!(SlotLayout::new(&[65; 257]).is_err());
        // 31 slots of 65 bits fill 2015 of 2047 bits; the 32nd opens a second plaintext.
        assert_eq!(SlotLayout::new(&[65; 31]).unwrap().ciphertexts(), 1);
        let two = SlotLayout::new(&[65; 32]).unwrap();
        assert_eq!(two.ciphertexts(), 2);
        assert_eq!(two.place[31], (1, 0));
        assert_eq!(two.ciphertext_len(), 1024);
    }

    #[test]
    fn sums_decrypt_cell_by_cell_across_plaintext_boundaries() {
        let sk = key();
        let pk = sk.public();
        // 40 cells of 65 and 97 bits: more than one plaintext holds.
        let maxima: Vec<u64> = (0..40u64)
            .map(|c| if c % 5 == 4 { u64::MAX } else { 1_000_000 })
            .collect();
        let l = SlotLayout::for_maxima(&maxima).unwrap();
        assert!(l.ciphertexts() >= 2);
        let rows: Vec<Vec<u64>> = (0..50u64)
            .map(|r| {
                maxima
                    .iter()
                    .map(|&m| if r % 7 == 0 { m } else { (r * 7919) % m })
                    .collect()
            })
            .collect();
        let flat: Vec<u64> = rows.iter().flatten().copied().collect();
        let bytes = encrypt_rows(sk, &l, &flat).unwrap();
        assert_eq!(bytes.len(), 50 * l.ciphertext_len());
        let picked: Vec<u32> = (0..50).filter(|i| i % 3 != 1).collect();
        let sum = sum_selected_rows(pk, &l, &bytes, &picked).unwrap();
        assert_eq!(sum.rows(), picked.len() as u64);
        let mut ct = sum.finish(pk);
        let noise: Vec<i64> = (0..40i64)
            .map(|c| match c {
                0 => i64::MIN,
                1 => i64::MAX,
                _ => (c - 20) * 1_000_003,
            })
            .collect();
        ct.add_noise(pk, &l, &noise).unwrap();
        ct.rerandomize(pk);
        let back = RowCiphertext::decode_own(sk, &l, &ct.encode()).unwrap();
        let cells = decrypt_cells(sk, &l, &back).unwrap();
        for c in 0..40 {
            let truth: i128 = picked
                .iter()
                .map(|&r| i128::from(rows[r as usize][c]))
                .sum();
            assert_eq!(cells[c], truth + i128::from(noise[c]), "cell {c}");
        }
    }

    #[test]
    fn a_slot_at_its_largest_sum_and_noise_does_not_touch_its_neighbours() {
        let sk = key();
        let pk = sk.public();
        // Three 65-bit cells (values < 2^32) and one 97-bit cell (any u64), all at their
        // maximum, summed MAX_SUMMANDS times, with the extreme noises.
        let l = SlotLayout::for_maxima(&[1, u32::MAX.into(), u64::MAX, 7]).unwrap();
        let max: Vec<u64> = (0..4).map(|c| l.max_value(c)).collect();
        let bytes = encrypt_rows(sk, &l, &max).unwrap();
        let one = RowCiphertext::decode(pk, &l, &bytes).unwrap();
        for noise in [[i64::MAX; 4], [i64::MIN; 4], [0, -1, 1, i64::MIN]] {
            let mut ct = times(pk, &one, MAX_SUMMANDS as u64);
            ct.add_noise(pk, &l, &noise).unwrap();
            let cells = decrypt_cells(sk, &l, &ct).unwrap();
            for c in 0..4 {
                let truth = i128::from(max[c]) * MAX_SUMMANDS as i128 + i128::from(noise[c]);
                assert_eq!(cells[c], truth, "cell {c}, noise {noise:?}");
            }
        }
    }

    #[test]
    fn negative_noise_on_an_empty_sum_comes_back_negative() {
        let sk = key();
        let pk = sk.public();
        let l = SlotLayout::for_maxima(&[1, 100]).unwrap();
        let mut ct = RowSum::empty(&l).finish(pk);
        ct.add_noise(pk, &l, &[-3, -250]).unwrap();
        ct.rerandomize(pk);
        assert_eq!(decrypt_cells(sk, &l, &ct).unwrap(), vec![-3, -250]);
    }

    #[test]
    fn values_wider_than_their_cell_and_bad_noise_are_refused() {
        let sk = key();
        let pk = sk.public();
        let l = SlotLayout::for_maxima(&[1, 5]).unwrap();
        assert_eq!(
            encrypt_rows(sk, &l, &[1, 5, 1 << 32, 5]),
            Err(AheError::ValueTooWide { row: 1, cell: 0 })
        );
        assert!(encrypt_rows(sk, &l, &[1, 5, 1]).is_err(), "not whole rows");
        let mut ct = RowSum::empty(&l).finish(pk);
        assert!(ct.add_noise(pk, &l, &[1]).is_err());
    }

    #[test]
    fn hostile_encodings_are_errors_not_panics() {
        let sk = key();
        let pk = sk.public();
        let l = SlotLayout::for_maxima(&[1, 100]).unwrap();
        let good = encrypt_rows(sk, &l, &[1, 2, 1, 3]).unwrap();
        let len = l.ciphertext_len();
        assert!(matches!(
            RowCiphertext::decode(pk, &l, &good[1..len]),
            Err(AheError::WrongLength { .. })
        ));
        let mut zero = good.clone();
        zero[len..].fill(0);
        let err = sum_selected_rows(pk, &l, &zero, &[0, 1]).unwrap_err();
        assert!(
            matches!(&err, AheError::InvalidCiphertext { row: 1, source } if **source == AheError::NotAUnit),
            "{err}"
        );
        let mut high = good.clone();
        high[..len].fill(0xff);
        let err = sum_selected_rows(pk, &l, &high, &[1, 0]).unwrap_err();
        assert!(
            matches!(&err, AheError::InvalidCiphertext { row: 0, source } if **source == AheError::OutOfRange),
            "{err}"
        );
        // An unselected bad row is never parsed.
        assert!(sum_selected_rows(pk, &l, &zero, &[0]).is_ok());
        assert!(matches!(
            sum_selected_rows(pk, &l, &good, &[2]),
            Err(AheError::IndexOutOfRange { index: 2, rows: 2 })
        ));
        assert!(matches!(
            sum_selected_rows(pk, &l, &good[1..], &[0]),
            Err(AheError::WrongLength { .. })
        ));
        // A result with bits above the last slot is refused by the key owner.
        let mut stray = RowSum::empty(&l).finish(pk);
        stray.c[0] = pk.add_plain(&stray.c[0], &U2048::ONE.shl_vartime(2000));
        assert_eq!(
            decrypt_cells(sk, &l, &stray),
            Err(AheError::StrayBits { ciphertext: 0 })
        );
        // Random bytes of the right length never panic.
        for seed in 0..50u32 {
            let junk: Vec<u8> = (0..len)
                .map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) as u8)
                .collect();
            let _ = RowCiphertext::decode(pk, &l, &junk);
            let _ = RowCiphertext::decode_own(sk, &l, &junk);
        }
    }

    /// Per-row primitive costs on this machine, one thread:
    /// `cargo test --release -p cleanroom-circuits paillier_measure -- --ignored --nocapture`.
    #[test]
    #[ignore = "measurement, run by hand in release mode"]
    fn paillier_measure() {
        use std::time::Instant;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let mut keygen = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            drop(crate::ahe::keygen().unwrap());
            keygen.push(t.elapsed().as_secs_f64());
        }
        keygen.sort_by(f64::total_cmp);
        let sk = key();
        let pk = sk.public();
        // The bench's row: a count and two amounts (one plaintext).
        let l = SlotLayout::for_maxima(&[1, 500_000, 100]).unwrap();
        let rows = 2000usize;
        let values: Vec<u64> = (0..rows as u64)
            .flat_map(|i| [1, i * 37 % 500_000, i % 100])
            .collect();
        let us = |t: Instant, n: usize| t.elapsed().as_secs_f64() / n as f64 * 1e6;
        let t = Instant::now();
        let bytes = pool.install(|| encrypt_rows(sk, &l, &values).unwrap());
        let encrypt = us(t, rows);
        let all: Vec<u32> = (0..rows as u32).collect();
        let t = Instant::now();
        let sum = pool.install(|| sum_selected_rows(pk, &l, &bytes, &all).unwrap());
        let add = us(t, rows);
        let mut ct = sum.finish(pk);
        let t = Instant::now();
        ct.add_noise(pk, &l, &[1, -2, 3]).unwrap();
        let noise = us(t, 1);
        let t = Instant::now();
        for _ in 0..10 {
            ct.rerandomize(pk);
        }
        let rerandomize = us(t, 10);
        let t = Instant::now();
        for _ in 0..10 {
            decrypt_cells(sk, &l, &ct).unwrap();
        }
        let decrypt = us(t, 10);
        println!(
            "Paillier 2048, one thread: keygen median {:.2} s (min {:.2}, max {:.2}); \
             encrypt {encrypt:.0} µs/row; decode + add {add:.1} µs/row; add noise (bias + noise, \
             one plaintext) {noise:.0} µs; rerandomize {rerandomize:.0} µs; decrypt one \
             plaintext {decrypt:.0} µs",
            keygen[2], keygen[0], keygen[4]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        /// Whatever the values, the subset and the noise, each cell decrypts to the subset's sum
        /// plus that cell's noise.
        #[test]
        fn the_sum_invariant_holds(
            maxima in prop::collection::vec(prop_oneof![Just(1u64), 1u64..1_000_000, Just(u64::MAX)], 1..6),
            seed in any::<u64>(),
            rows in 0usize..12,
            noise_seed in any::<i64>(),
        ) {
            let sk = key();
            let pk = sk.public();
            let l = SlotLayout::for_maxima(&maxima).unwrap();
            let cells = maxima.len();
            let mut x = seed | 1;
            let mut next = || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x };
            let values: Vec<u64> = (0..rows * cells).map(|i| next() % maxima[i % cells].saturating_add(1).max(1)).collect();
            let values: Vec<u64> = values.iter().enumerate().map(|(i, &v)| v.min(maxima[i % cells])).collect();
            let picked: Vec<u32> = (0..rows as u32).filter(|_| next() % 2 == 0).collect();
            let noise: Vec<i64> = (0..cells as i64).map(|c| noise_seed.wrapping_mul(c + 1)).collect();
            let bytes = encrypt_rows(sk, &l, &values).unwrap();
            let mut ct = sum_selected_rows(pk, &l, &bytes, &picked).unwrap().finish(pk);
            ct.add_noise(pk, &l, &noise).unwrap();
            ct.rerandomize(pk);
            let got = decrypt_cells(sk, &l, &ct).unwrap();
            for c in 0..cells {
                let truth: i128 = picked.iter().map(|&r| i128::from(values[r as usize * cells + c])).sum();
                prop_assert_eq!(got[c], truth + i128::from(noise[c]));
            }
        }
    }
}
