//! The cryptographic cost floor of each job kind, measured on this machine.
//!
//! A floor is what the job's cryptography costs with nothing else in the way: each primitive the
//! protocol performs, timed on one thread with the backend the job runs on and exactly as the
//! protocol calls it, times how often the job performs it, spread perfectly over the cores.
//! The benchmarks divide their wall time by it. This is the only code in the crate that reads a
//! clock, and it is not protocol code. The clock is the caller's: a benchmark on a shared machine
//! passes the thread's CPU time, so that time other processes take from the measuring thread is
//! not counted as the primitives' cost (that would raise the floor and flatter the ratio).

use std::hint::black_box;
use std::time::{Duration, Instant};

use curve25519_dalek::ristretto::CompressedRistretto;
use curve25519_dalek::{RistrettoPoint, Scalar};

use crate::aggregate::{AggregateError, GroupVector, NoisePlan, accumulate_seed, split};
use crate::ahe::{AheError, SlotLayout, decrypt_cells, encrypt_rows, keygen, sum_selected_rows};
use crate::hash_to_group;

/// Rounds per operation; the median is reported.
const ROUNDS: usize = 5;

/// Points per call of the batched encode, as the protocol's rayon chunks hand them over.
const ENCODE_BATCH: usize = 1024;

/// Single-thread cost of each ECDH-PSI primitive, nanoseconds per operation (median of a few
/// rounds), and the curve backend they ran on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FloorCosts {
    /// The curve25519-dalek backend the costs were measured with ([`crate::curve_backend`]).
    pub backend: &'static str,
    /// One [`hash_to_group`].
    pub hash_to_group_ns: f64,
    /// One variable-base scalar multiplication.
    pub scalar_mul_ns: f64,
    /// One point's share of `RistrettoPoint::double_and_compress_batch` over 1024 points: the
    /// encode the protocol performs (one field inversion shared by the whole batch).
    pub encode_ns: f64,
    /// One `CompressedRistretto::decompress`.
    pub decode_ns: f64,
}

/// A clock for the measurements: any monotonic reading of the current thread's time (wall time,
/// or the thread's CPU time).
pub type Clock = dyn Fn() -> Duration + Sync;

/// Nanoseconds `f` took on `clock`, and its result.
fn timed<T>(clock: &Clock, f: impl FnOnce() -> T) -> (f64, T) {
    let start = clock();
    let out = f();
    (clock().saturating_sub(start).as_nanos() as f64, out)
}

/// The median of a few measurements.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Median over [`ROUNDS`] of the per-op time of `samples` calls of `op(i)`.
fn per_op_ns<T>(clock: &Clock, samples: usize, mut op: impl FnMut(usize) -> T) -> f64 {
    median(
        (0..ROUNDS)
            .map(|_| {
                let (ns, ()) = timed(clock, || {
                    for i in 0..samples {
                        black_box(op(black_box(i)));
                    }
                });
                ns / samples as f64
            })
            .collect(),
    )
}

/// Wall time since the first call in this process.
fn wall_clock() -> Duration {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}

/// Runs `f` on a rayon pool of one thread, so that parallel library code is timed on one core.
fn one_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    match rayon::ThreadPoolBuilder::new().num_threads(1).build() {
        Ok(pool) => pool.install(f),
        // No thread could be started: time on this thread (the figure is the same when the
        // code inside does not fan out, and this is a measurement, not protocol code).
        Err(_) => f(),
    }
}

/// Measures the per-operation costs on the current thread in wall time, `samples` operations per
/// round (at least 1; rounded up to whole batches of 1024 for the encode). Takes about
/// `samples × 0.1 ms` in a release build.
pub fn measure_floor(samples: usize) -> FloorCosts {
    measure_floor_with(samples, &wall_clock)
}

/// [`measure_floor`] on the caller's clock.
pub fn measure_floor_with(samples: usize, clock: &Clock) -> FloorCosts {
    let samples = samples.max(1);
    let items: Vec<[u8; 8]> = (0..samples as u64).map(u64::to_le_bytes).collect();
    let points: Vec<RistrettoPoint> = items.iter().map(|i| hash_to_group("floor", i)).collect();
    let encodings: Vec<CompressedRistretto> = points.iter().map(|p| p.compress()).collect();
    let scalar = Scalar::from_bytes_mod_order([0x5a; 32]);
    // Whole batches of 1024 points, drawn from the measured ones.
    let batches = samples.div_ceil(ENCODE_BATCH);
    let batch: Vec<RistrettoPoint> = (0..ENCODE_BATCH).map(|i| points[i % samples]).collect();

    FloorCosts {
        backend: crate::curve_backend(),
        hash_to_group_ns: per_op_ns(clock, samples, |i| hash_to_group("floor", &items[i])),
        scalar_mul_ns: per_op_ns(clock, samples, |i| black_box(scalar) * points[i]),
        encode_ns: per_op_ns(clock, batches, |_| {
            RistrettoPoint::double_and_compress_batch(black_box(&batch))
        }) / ENCODE_BATCH as f64,
        decode_ns: per_op_ns(clock, samples, |i| encodings[i].decompress()),
    }
}

impl FloorCosts {
    /// Each primitive's median over several measurements of the same backend (`None` for none).
    /// A benchmark measures the floor before, between and after its jobs: one measurement moves
    /// by several per cent with the machine's state, and the median of a few does not.
    pub fn median_of(measurements: &[FloorCosts]) -> Option<FloorCosts> {
        let first = measurements.first()?;
        let of = |f: fn(&FloorCosts) -> f64| median(measurements.iter().map(f).collect());
        Some(FloorCosts {
            backend: first.backend,
            hash_to_group_ns: of(|c| c.hash_to_group_ns),
            scalar_mul_ns: of(|c| c.scalar_mul_ns),
            encode_ns: of(|c| c.encode_ns),
            decode_ns: of(|c| c.decode_ns),
        })
    }

    /// Per item per party, the protocol needs one hash-to-group, two variable-base scalar
    /// multiplications and two batched encodes (blinding its own item, re-blinding the peer's)
    /// and one decode (the peer's point).
    pub fn per_item_ns(&self) -> f64 {
        self.hash_to_group_ns + 2.0 * self.scalar_mul_ns + 2.0 * self.encode_ns + self.decode_ns
    }

    /// Seconds of pure crypto for an `n_a × n_b` job with both parties on this machine:
    /// `(n_a + n_b) × per_item / cores` (`cores` of 0 counts as 1).
    pub fn psi_floor_seconds(&self, n_a: u64, n_b: u64, cores: usize) -> f64 {
        (n_a as f64 + n_b as f64) * self.per_item_ns() / cores.max(1) as f64 / 1e9
    }

    /// Items per second per side that one core can carry at this floor when both parties share
    /// the machine (every item costs each party [`per_item_ns`](Self::per_item_ns)). A party
    /// on a machine of its own carries twice that per core.
    pub fn items_per_second_per_core(&self) -> f64 {
        1e9 / (2.0 * self.per_item_ns())
    }
}

/// Single-thread costs of an `overlap-sum` job's primitives beyond its ECDH-PSI: the value
/// holder's Paillier key and row encryptions, the key holder's additions of matched rows and
/// its finishing step, and the value holder's decryption.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SumFloorCosts {
    /// The PSI part (the same per item as an `overlap`).
    pub psi: FloorCosts,
    /// One Paillier key generation (median of three; the safe-prime search has a long tail).
    pub keygen_ns: f64,
    /// Encrypting one row of the measured layout (all its plaintexts).
    pub encrypt_row_ns: f64,
    /// Decoding and adding one matched row at the key holder.
    pub add_row_ns: f64,
    /// Once per job: noise and bias under encryption, re-randomising and decrypting the result.
    pub finish_ns: f64,
}

/// Measures an `overlap-sum`'s primitives on one thread on `clock`, for rows of the given cell
/// maxima (the job's layout), `rows` rows per round (at least 1), with the PSI part from
/// [`measure_floor_with`] over `psi_samples`. Takes a few seconds (three key generations).
pub fn measure_sum_floor(
    maxima: &[u64],
    rows: usize,
    psi_samples: usize,
    clock: &Clock,
) -> Result<SumFloorCosts, AheError> {
    let psi = measure_floor_with(psi_samples, clock);
    let rows = rows.max(1);
    let layout = SlotLayout::for_maxima(maxima)?;
    one_thread(|| {
        let mut keygens = Vec::with_capacity(3);
        let mut sk = None;
        for _ in 0..3 {
            let (ns, key) = timed(clock, keygen);
            keygens.push(ns);
            sk = Some(key?);
        }
        let sk = sk.ok_or(AheError::KeyGeneration("no key"))?;
        let pk = sk.public();
        let values: Vec<u64> = (0..rows)
            .flat_map(|r| {
                maxima
                    .iter()
                    .map(move |&m| (r as u64).wrapping_mul(37) % m.max(1))
            })
            .collect();
        let all: Vec<u32> = (0..rows as u32).collect();
        let mut encrypt = Vec::with_capacity(ROUNDS);
        let mut add = Vec::with_capacity(ROUNDS);
        let mut ct = None;
        for _ in 0..ROUNDS {
            let (ns, bytes) = timed(clock, || encrypt_rows(&sk, &layout, &values));
            encrypt.push(ns / rows as f64);
            let bytes = bytes?;
            let (ns, sum) = timed(clock, || sum_selected_rows(pk, &layout, &bytes, &all));
            add.push(ns / rows as f64);
            ct = Some(sum?.finish(pk));
        }
        let mut ct = ct.ok_or(AheError::KeyGeneration("no rounds"))?;
        let (finish_ns, decrypted) = timed(clock, || -> Result<_, AheError> {
            ct.add_noise(pk, &layout, &vec![1; layout.cells()])?;
            ct.rerandomize(pk);
            decrypt_cells(&sk, &layout, &ct)
        });
        black_box(decrypted?);
        Ok(SumFloorCosts {
            psi,
            keygen_ns: median(keygens),
            encrypt_row_ns: median(encrypt),
            add_row_ns: median(add),
            finish_ns,
        })
    })
}

impl SumFloorCosts {
    /// Seconds of pure crypto for an overlap-sum of `n_key` key-holder items against `n_value`
    /// value-holder rows sharing `shared`, both parties on this machine: the PSI floor, plus
    /// one key, `n_value` row encryptions, `shared` additions and the finishing step, all
    /// divided by `cores` (0 counts as 1).
    pub fn sum_floor_seconds(&self, n_key: u64, n_value: u64, shared: u64, cores: usize) -> f64 {
        let extra = self.keygen_ns
            + n_value as f64 * self.encrypt_row_ns
            + shared as f64 * self.add_row_ns
            + self.finish_ns;
        self.psi.psi_floor_seconds(n_key, n_value, cores) + extra / cores.max(1) as f64 / 1e9
    }
}

/// Single-thread costs of an `aggregate` job's primitives, per cell of a party's vector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AggregateFloorCosts {
    /// Expanding one peer's seed over one cell (ChaCha20), as splitting and accumulating do.
    pub expand_ns: f64,
    /// Drawing one cell's exact discrete Gaussian noise with the job's plan (mean over the
    /// plan's columns).
    pub noise_ns: f64,
}

/// Measures an `aggregate`'s primitives on one thread on `clock`, over `groups` groups (at
/// least 1) with the job's noise plan (its columns and σ).
pub fn measure_aggregate_floor(
    plan: &NoisePlan,
    groups: usize,
    clock: &Clock,
) -> Result<AggregateFloorCosts, AggregateError> {
    let groups = groups.max(1);
    let columns = plan.share_sigma.len().max(1);
    let cells = (groups * columns) as f64;
    one_thread(|| {
        let vector = GroupVector::zeros(groups, columns)?;
        let mut expand = Vec::with_capacity(ROUNDS);
        let mut noise = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            // Splitting for one peer and accumulating its seed: two expansions per cell.
            let (ns, acc) = timed(clock, || -> Result<_, AggregateError> {
                let s = split(&vector, 1)?;
                let mut acc = s.own;
                for seed in &s.seeds {
                    accumulate_seed(&mut acc, seed);
                }
                Ok(acc)
            });
            black_box(acc?);
            expand.push(ns / (2.0 * cells));
            let (ns, drawn) = timed(clock, || plan.draw(groups));
            black_box(drawn?);
            noise.push(ns / cells);
        }
        Ok(AggregateFloorCosts {
            expand_ns: median(expand),
            noise_ns: median(noise),
        })
    })
}

impl AggregateFloorCosts {
    /// Work per cell of one party: its vector split against `parties − 1` seeds, each peer's
    /// seed expanded into its accumulator, and one noise draw.
    pub fn per_cell_ns(&self, parties: usize) -> f64 {
        2.0 * parties.saturating_sub(1) as f64 * self.expand_ns + self.noise_ns
    }

    /// Seconds of pure crypto for an aggregate over `cells` cells per party with every party on
    /// this machine: `parties × cells × per cell / cores` (0 counts as 1).
    pub fn aggregate_floor_seconds(&self, cells: u64, parties: usize, cores: usize) -> f64 {
        parties as f64 * cells as f64 * self.per_cell_ns(parties) / cores.max(1) as f64 / 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_floors_takes_each_primitive_s_middle_value() {
        let floor = |h, m, e, d| FloorCosts {
            backend: "serial",
            hash_to_group_ns: h,
            scalar_mul_ns: m,
            encode_ns: e,
            decode_ns: d,
        };
        let measured = [
            floor(10.0, 15.0, 0.5, 4.0),
            floor(12.0, 14.0, 0.7, 6.0),
            floor(11.0, 16.0, 0.6, 5.0),
        ];
        // Per primitive, not the whole measurement with the median per-item cost.
        assert_eq!(
            FloorCosts::median_of(&measured),
            Some(floor(11.0, 15.0, 0.6, 5.0))
        );
        assert_eq!(FloorCosts::median_of(&[]), None);
    }

    #[test]
    fn floor_quick_run() {
        let f = measure_floor(200);
        println!(
            "floor per op ({}): hash_to_group {:.0} ns, scalar_mul {:.0} ns, encode (batched) \
             {:.0} ns, decode {:.0} ns; per item {:.0} ns; 1M x 1M on 2 cores: {:.1} s",
            f.backend,
            f.hash_to_group_ns,
            f.scalar_mul_ns,
            f.encode_ns,
            f.decode_ns,
            f.per_item_ns(),
            f.psi_floor_seconds(1_000_000, 1_000_000, 2)
        );
        assert!(f.per_item_ns() > 0.0);
        assert_eq!(f.backend, crate::curve_backend());
        let g = FloorCosts {
            backend: "serial",
            hash_to_group_ns: 1.0,
            scalar_mul_ns: 10.0,
            encode_ns: 100.0,
            decode_ns: 1000.0,
        };
        assert_eq!(g.per_item_ns(), 1221.0);
        assert_eq!(g.psi_floor_seconds(1_000_000, 1_000_000, 2), 1.221);
        assert_eq!(g.items_per_second_per_core(), 1e9 / 2442.0);
    }

    /// The batched encode is what the protocol pays, and it is far cheaper than a plain
    /// compress (one inversion per 1024 points instead of one per point); the floor must not
    /// count the plain one.
    #[test]
    fn the_encode_is_the_batched_one() {
        let f = measure_floor(2048);
        let points: Vec<RistrettoPoint> = (0..2048u64)
            .map(|i| hash_to_group("floor", &i.to_le_bytes()))
            .collect();
        let compress_ns = per_op_ns(&wall_clock, points.len(), |i| points[i].compress());
        assert!(
            f.encode_ns < compress_ns / 2.0,
            "batched {} ns vs plain {compress_ns} ns",
            f.encode_ns
        );
    }

    #[test]
    fn sum_floor_adds_the_paillier_work() {
        let psi = FloorCosts {
            backend: "serial",
            hash_to_group_ns: 1.0,
            scalar_mul_ns: 1.0,
            encode_ns: 1.0,
            decode_ns: 1.0,
        };
        let s = SumFloorCosts {
            psi,
            keygen_ns: 1e9,
            encrypt_row_ns: 1000.0,
            add_row_ns: 10.0,
            finish_ns: 1e9,
        };
        // PSI: 2e6 items × 6 ns = 0.012 s; key + finish 2 s; 1e6 × 1 µs = 1 s; 5e5 × 10 ns.
        let secs = s.sum_floor_seconds(1_000_000, 1_000_000, 500_000, 2);
        assert!(
            (secs - (0.012 + 2.0 + 1.0 + 0.005) / 2.0).abs() < 1e-9,
            "{secs}"
        );
    }

    #[test]
    fn aggregate_floor_counts_every_party() {
        let a = AggregateFloorCosts {
            expand_ns: 2.0,
            noise_ns: 100.0,
        };
        // 3 parties: 2 × 2 expansions + one draw per cell.
        assert_eq!(a.per_cell_ns(3), 108.0);
        assert_eq!(
            a.aggregate_floor_seconds(1_000_000, 3, 2),
            3.0 * 1e6 * 108.0 / 2.0 / 1e9
        );
        let plan = NoisePlan::new(1.0, &[1, 200_000], 3, 2).unwrap();
        let m = measure_aggregate_floor(&plan, 64, &wall_clock).unwrap();
        assert!(m.expand_ns > 0.0 && m.noise_ns > m.expand_ns, "{m:?}");
    }
}
