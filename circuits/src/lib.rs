//! Sans-IO cryptographic protocols of cleanroom: hash to group, ECDH-PSI and secure aggregation
//! ([`aggregate`]: additive secret sharing over `Z_2^64` with distributed noise).
//!
//! Nothing here touches a socket, a runtime or a clock (except [`floor`], the benchmark's
//! measuring stick): the node feeds bytes in and sends what comes out. Batch work runs on rayon.
//!
//! # The protocol (ECDH-PSI)
//!
//! Meadows 1986 / Huberman–Franklin–Hogg 1999, as deployed in Google's PJC and OpenMined. Each
//! party holds a deduplicated set of normalised identifiers ([`ItemSet`]) and a fresh secret
//! scalar `k` for this job ([`JobKey`]). `H` is RFC 9380 `hash_to_ristretto255`
//! ([`hash_to_group`]) under a versioned domain tag, with the key's name (`"email"`, …) in the
//! message, so different keys never collide.
//!
//! 1. Each party sends its declared set size; the other checks it against the policy's
//!    `[min, max]` before doing any exponentiation ([`AwaitingPeerSize::on_peer_size`]).
//! 2. Each sends `k·H(x)` for its items, shuffled, compressed, in bounded batches
//!    ([`ReadyToBlind::blind`]).
//! 3. Each receives the peer's points, rejects any that do not decompress or are the identity,
//!    multiplies them by its own `k` and sends them back — in received order when the policy lets
//!    the peer learn which of its rows matched, shuffled otherwise
//!    ([`ExchangingPoints::on_peer_batch`], [`ExchangingPoints::on_peer_end`]).
//! 4. Each now holds `k·k_peer·H(y)` for the peer's items (computed itself) and receives
//!    `k_peer·k·H(x)` for its own; the scalars commute, so equal encodings are equal items.
//!    Matches are found by sort and binary search on 32-byte encodings
//!    ([`AwaitingReturn::on_returned_end`]), and mapped back to our rows through the shuffle
//!    permutation when membership is wanted.
//!
//! The node runs the streaming form of steps 2–4 ([`ReadyToBlind::stream`] → [`Streaming`] →
//! [`Matching`]): the send order is drawn first and points are blinded and sent batch by batch,
//! the peer's are re-blinded as they come, and returned points are compared as they arrive
//! (`psi/stream.rs` explains why the pre-drawn order protects what the shuffle protects).
//!
//! Each state is consumed by the one input it expects ([`PsiSession::start`] →
//! [`AwaitingPeerSize`] → [`ReadyToBlind`] → [`ExchangingPoints`] → [`AwaitingReturn`] →
//! [`PsiOutput`]), so a message out of order does not type-check in the driver.
//!
//! # Trust model
//!
//! The cryptography is secure against **semi-honest** parties (under the decisional
//! Diffie–Hellman assumption in ristretto255 with `H` a random oracle): each side learns the
//! intersection size (and, when the peer allows it, which of its own rows matched) and the
//! other's set size, nothing more. A malicious party can still choose its input set freely (as in
//! any PSI) and lie about membership by returning wrong points; that is outside this model.
//!
//! The code is nonetheless **robust against malicious input**: every byte from the peer is
//! checked (batch lengths, point encodings, the identity, declared vs. sent vs. announced counts,
//! duplicates an honest peer cannot produce) and a violation is a typed [`PsiError`] naming it,
//! never a panic and never an unbounded allocation (declared sizes are bounded by policy).
//! Secrets are move-only, zeroized and never printed; errors carry only counts and indices.
//!
//! # The halved-scalar trick
//!
//! Compressing a ristretto255 point costs a field inversion (~4.4 µs on serial field code), as
//! much as a fifth of the per-item work. `RistrettoPoint::double_and_compress_batch` computes
//! the encodings of `2·P_i` for a whole batch with one shared inversion (~0.6 µs a point). We
//! want `k·P`, so we compute `P' = (k/2)·P` with `k/2 = k·2⁻¹ mod ℓ` and encode `2·P'`.
//! This is exact, not an approximation: ristretto255 is a group of prime order `ℓ` (odd), so 2
//! is invertible mod `ℓ` and `2·((k·2⁻¹)·P) = k·P` for every element `P`. The output is the
//! canonical encoding of `k·P`, bit for bit what `(k·P).compress()` gives, so the peer need not
//! know which method we used (the tests check this against plain multiplication).
//!
//! # Performance and build options
//!
//! Per item and party the floor is one hash-to-group, two variable-base scalar
//! multiplications, two batched encodings (`double_and_compress_batch`, as above) and one
//! decoding ([`FloorCosts::per_item_ns`]), each measured with the curve backend the process runs
//! on; everything else (sorting, batching) is kept small next to it: rayon chunks of 1024 points, no per-item
//! allocation, `sort_unstable` and binary search for matching. The workspace builds
//! curve25519-dalek with its AVX-512 IFMA backend compiled in, and dalek picks it at run time on
//! CPUs that have it (else AVX2, else serial): see [`curve_backend`].
#![warn(missing_docs)]

pub mod aggregate;
pub mod ahe;
pub mod audit_head;
pub mod backend;
pub mod dp;
mod error;
pub mod floor;
mod hash_to_group;
pub mod intersection_sum;
pub mod items;
mod key;
#[cfg(test)]
mod pair;
mod psi;

pub use backend::curve_backend;
pub use dp::{DpError, Mechanism, Scale};
pub use error::PsiError;
pub use floor::{
    AggregateFloorCosts, FloorCosts, SumFloorCosts, measure_aggregate_floor, measure_floor,
    measure_floor_with, measure_sum_floor,
};
pub use hash_to_group::{
    HASH_TO_GROUP_DST, MAX_EXPAND_LEN, expand_message_xmd_sha512, hash_to_group,
};
pub use items::ItemSet;
pub use key::JobKey;
pub use psi::spill;
pub use psi::{
    AwaitingMerge, AwaitingPeerSize, AwaitingReturn, ExchangingPoints, Matching, PsiOutput,
    PsiParams, PsiSession, ReadyToBlind, Streaming, blind_items, check_peer_batch, reblind_points,
};

/// Bytes in one compressed ristretto255 element.
pub const POINT_LEN: usize = 32;

/// A compressed ristretto255 element as it travels between parties.
pub type EncodedPoint = [u8; POINT_LEN];

pub use curve25519_dalek::RistrettoPoint;
