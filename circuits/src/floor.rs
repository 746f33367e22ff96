//! The cryptographic cost floor of ECDH-PSI, measured on this machine.
//!
//! The benchmark divides its wall time by this floor; it is the only code in the crate that reads
//! a clock, and it is not protocol code.

use std::hint::black_box;
use std::time::Instant;

use curve25519_dalek::ristretto::CompressedRistretto;
use curve25519_dalek::{RistrettoPoint, Scalar};

use crate::hash_to_group;

/// Rounds per operation; the median is reported.
const ROUNDS: usize = 5;

/// Single-thread cost of each primitive, nanoseconds per operation (median of a few rounds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FloorCosts {
    /// One [`hash_to_group`].
    pub hash_to_group_ns: f64,
    /// One variable-base scalar multiplication.
    pub scalar_mul_ns: f64,
    /// One plain `RistrettoPoint::compress` (not the batched trick).
    pub compress_ns: f64,
    /// One `CompressedRistretto::decompress`.
    pub decompress_ns: f64,
}

/// Median over [`ROUNDS`] of the per-op time of `samples` calls of `op(i)`.
fn per_op_ns<T>(samples: usize, mut op: impl FnMut(usize) -> T) -> f64 {
    let mut rounds: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            for i in 0..samples {
                black_box(op(black_box(i)));
            }
            t.elapsed().as_nanos() as f64 / samples as f64
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[ROUNDS / 2]
}

/// Measures the per-operation costs on the current thread, `samples` operations per round
/// (at least 1). Takes about `samples × 0.1 ms` in a release build.
pub fn measure_floor(samples: usize) -> FloorCosts {
    let samples = samples.max(1);
    let items: Vec<[u8; 8]> = (0..samples as u64).map(u64::to_le_bytes).collect();
    let points: Vec<RistrettoPoint> = items.iter().map(|i| hash_to_group("floor", i)).collect();
    let encodings: Vec<CompressedRistretto> = points.iter().map(|p| p.compress()).collect();
    let scalar = Scalar::from_bytes_mod_order([0x5a; 32]);

    FloorCosts {
        hash_to_group_ns: per_op_ns(samples, |i| hash_to_group("floor", &items[i])),
        scalar_mul_ns: per_op_ns(samples, |i| black_box(scalar) * points[i]),
        compress_ns: per_op_ns(samples, |i| points[i].compress()),
        decompress_ns: per_op_ns(samples, |i| encodings[i].decompress()),
    }
}

impl FloorCosts {
    /// Per item per party, the protocol needs 1 hash-to-group + 2 variable-base scalar
    /// multiplications + 2 encodes + 1 decode.
    pub fn per_item_ns(&self) -> f64 {
        self.hash_to_group_ns
            + 2.0 * self.scalar_mul_ns
            + 2.0 * self.compress_ns
            + self.decompress_ns
    }

    /// Seconds of pure crypto for an `n_a × n_b` job with both parties on this machine:
    /// `(n_a + n_b) × per_item / cores` (`cores` of 0 counts as 1).
    pub fn psi_floor_seconds(&self, n_a: u64, n_b: u64, cores: usize) -> f64 {
        (n_a as f64 + n_b as f64) * self.per_item_ns() / cores.max(1) as f64 / 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_quick_run() {
        let f = measure_floor(200);
        println!(
            "floor per op: hash_to_group {:.0} ns, scalar_mul {:.0} ns, compress {:.0} ns, \
             decompress {:.0} ns; per item {:.0} ns; 1M x 1M on 2 cores: {:.1} s",
            f.hash_to_group_ns,
            f.scalar_mul_ns,
            f.compress_ns,
            f.decompress_ns,
            f.per_item_ns(),
            f.psi_floor_seconds(1_000_000, 1_000_000, 2)
        );
        assert!(f.per_item_ns() > 0.0);
        let g = FloorCosts {
            hash_to_group_ns: 1.0,
            scalar_mul_ns: 10.0,
            compress_ns: 100.0,
            decompress_ns: 1000.0,
        };
        assert_eq!(g.per_item_ns(), 1221.0);
        assert_eq!(g.psi_floor_seconds(1_000_000, 1_000_000, 2), 1.221);
    }
}
