//! What the session targets (`psi_session`, `sum_session`) share: the simulated peer's key, our
//! item set from the input's bit mask, peer batches built from valid points or capped raw bytes,
//! and the checks on what the session sends and takes.

use std::sync::LazyLock;

use cleanroom_circuits::{EncodedPoint, ItemSet, JobKey, POINT_LEN, blind_items};

/// The identifier name both sides blind under.
pub const KEY_NAME: &str = "email";

/// The simulated peer's key (one per process).
pub static PEER_KEY: LazyLock<JobKey> = LazyLock::new(JobKey::generate);

/// `items` blinded by the peer: valid points it would send us.
pub fn peer_points(items: &[&[u8]]) -> Vec<EncodedPoint> {
    let items: ItemSet = items.iter().copied().collect();
    blind_items(&PEER_KEY, KEY_NAME, &items)
}

/// Our set: item `i` of `items` for each bit `i` set in `mask`.
pub fn our_items(items: &[&[u8]], mask: u8) -> ItemSet {
    let mut set = ItemSet::new();
    for (i, item) in items.iter().enumerate() {
        if mask & (1 << i) != 0 {
            set.push(item).expect("tiny set");
        }
    }
    set
}

/// A batch of at most `max` points from indices into `pool`.
pub fn pick(pool: &[EncodedPoint], indices: &[u8], max: usize) -> Vec<u8> {
    if pool.is_empty() {
        return Vec::new();
    }
    indices.iter().take(max).flat_map(|&i| pool[usize::from(i) % pool.len()]).collect()
}

/// At most the first `max` bytes of `bytes`.
pub fn cap(bytes: &[u8], max: usize) -> &[u8] {
    &bytes[..bytes.len().min(max)]
}

/// Checks that our outgoing batches are whole points, none empty, and appends them to `sent`.
pub fn record_sent(sent: &mut Vec<EncodedPoint>, batches: &[Vec<u8>]) {
    for b in batches {
        assert!(!b.is_empty() && b.len() % POINT_LEN == 0, "bad outgoing batch");
        sent.extend_from_slice(b.as_chunks::<POINT_LEN>().0);
    }
}

/// The session's next state if it took `batch` (of `unit`-byte records), counting the records
/// in `count`; `None` if it refused the batch (which ends the session).
pub fn counted<S, E>(taken: Result<S, E>, batch: &[u8], unit: usize, count: &mut u64) -> Option<S> {
    let next = taken.ok()?;
    *count += (batch.len() / unit) as u64;
    Some(next)
}
