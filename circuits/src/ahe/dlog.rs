//! Bounded discrete logarithms base `G` by baby-step giant-step.
//!
//! The baby-step table holds `2^BABY_BITS` entries, one `u64` each: the top 43 bits of a 64-bit
//! fingerprint of the encoding of `2·(i·G)` with `i` in the low 21 bits, sorted, plus an index of
//! `2^16` bucket offsets over the fingerprint's top 16 bits (16 MiB + 256 KiB in all). It is built
//! once per process on first use ([`warm_up`]), in rayon chunks.
//!
//! A giant step subtracts `M·G` (`M = 2^BABY_BITS`) and looks the point up. Giant steps go in
//! batches through `double_and_compress_batch` (one shared field inversion per batch), which
//! encodes `2·Q` rather than `Q`; the table stores `2·(i·G)` to match, and since the group has
//! prime order `2·Q = 2·(i·G)` exactly when `Q = i·G`. Every fingerprint hit is confirmed by a
//! fixed-base multiplication before it is returned, so a collision can cost time but never a
//! wrong answer. The number of giant steps is capped by the caller's bound: a point whose
//! logarithm lies outside `[0, bound)` is reported as `None` after at most `bound / M + 1` steps.

use std::sync::OnceLock;

use curve25519_dalek::constants::RISTRETTO_BASEPOINT_POINT as G;
use curve25519_dalek::{RistrettoPoint, Scalar};
use rayon::prelude::*;

/// log2 of the number of baby steps.
pub(crate) const BABY_BITS: u32 = 21;
const BABY: u64 = 1 << BABY_BITS;
const LOW_MASK: u64 = BABY - 1;
const HIGH_MASK: u64 = !LOW_MASK;
const BUCKET_BITS: u32 = 16;
/// Points per `double_and_compress_batch` call, for both the table and the giant steps.
const BATCH: usize = 1024;

struct BabyTable {
    /// `(fingerprint & HIGH_MASK) | i`, sorted.
    entries: Vec<u64>,
    /// `buckets[b]..buckets[b + 1]` are the entries whose fingerprint's top bits are `b`.
    buckets: Vec<u32>,
}

static TABLE: OnceLock<BabyTable> = OnceLock::new();

/// A 64-bit fingerprint of a ristretto255 encoding. Byte 0 is skipped: its low bit is always 0.
fn fingerprint(enc: &[u8; 32]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&enc[1..9]);
    u64::from_le_bytes(b)
}

fn build() -> BabyTable {
    let chunks = (BABY as usize).div_ceil(BATCH);
    let mut entries: Vec<u64> = (0..chunks)
        .into_par_iter()
        .flat_map_iter(|c| {
            let start = (c * BATCH) as u64;
            let mut p = RistrettoPoint::mul_base(&Scalar::from(start));
            let mut pts = Vec::with_capacity(BATCH);
            for _ in 0..BATCH {
                pts.push(p);
                p += G;
            }
            RistrettoPoint::double_and_compress_batch(&pts)
                .into_iter()
                .enumerate()
                .map(move |(k, enc)| {
                    (fingerprint(&enc.to_bytes()) & HIGH_MASK) | (start + k as u64)
                })
        })
        .collect();
    entries.par_sort_unstable();
    let mut buckets = vec![0u32; (1 << BUCKET_BITS) + 1];
    for e in &entries {
        buckets[(e >> (64 - BUCKET_BITS)) as usize + 1] += 1;
    }
    for b in 1..buckets.len() {
        buckets[b] += buckets[b - 1];
    }
    BabyTable { entries, buckets }
}

/// Builds the baby-step table now (about a second on two cores) rather than on the first
/// decryption. Idempotent and thread-safe.
pub fn warm_up() {
    TABLE.get_or_init(build);
}

impl BabyTable {
    /// Baby-step indices `i` whose fingerprint matches that of the encoding of `2·Q`.
    fn candidates(&self, doubled_enc: &[u8; 32]) -> impl Iterator<Item = u64> + '_ {
        let f = fingerprint(doubled_enc) & HIGH_MASK;
        let b = (f >> (64 - BUCKET_BITS)) as usize;
        let (lo, hi) = (self.buckets[b] as usize, self.buckets[b + 1] as usize);
        self.entries[lo..hi]
            .iter()
            .filter(move |e| *e & HIGH_MASK == f)
            .map(|e| e & LOW_MASK)
    }
}

/// The `m` in `[0, bound)` with `m·G = q`, or `None` if there is none. `bound ≤ 2^62`.
///
/// Runs at most `bound / 2^21 + 1` giant steps, in batches spread over rayon's threads.
pub(crate) fn solve(q: &RistrettoPoint, bound: u64) -> Option<u64> {
    let table = TABLE.get_or_init(build);
    let giants = bound.div_ceil(BABY);
    let batches = giants.div_ceil(BATCH as u64);
    let step = RistrettoPoint::mul_base(&Scalar::from(BABY));
    (0..batches).into_par_iter().find_map_first(|b| {
        let first = b * BATCH as u64;
        let n = (giants - first).min(BATCH as u64) as usize;
        // q - first·M·G, then one subtraction of M·G per giant step.
        let mut p = q - RistrettoPoint::mul_base(&Scalar::from(first * BABY));
        let mut pts = Vec::with_capacity(n);
        for _ in 0..n {
            pts.push(p);
            p -= step;
        }
        let encs = RistrettoPoint::double_and_compress_batch(&pts);
        for (k, enc) in encs.iter().enumerate() {
            for i in table.candidates(&enc.to_bytes()) {
                let m = (first + k as u64) * BABY + i;
                if m < bound && RistrettoPoint::mul_base(&Scalar::from(m)) == *q {
                    return Some(m);
                }
            }
        }
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ahe_dlog_small_large_and_out_of_bound() {
        for m in [
            0u64,
            1,
            2,
            BABY - 1,
            BABY,
            BABY + 1,
            5 * BABY + 12345,
            (1 << 30) + 7,
        ] {
            let q = RistrettoPoint::mul_base(&Scalar::from(m));
            assert_eq!(solve(&q, 1 << 31), Some(m), "m = {m}");
        }
        let q = RistrettoPoint::mul_base(&Scalar::from(1u64 << 31));
        assert_eq!(solve(&q, 1 << 31), None);
        assert_eq!(solve(&-G, 1 << 31), None);
    }
}
