//! ECDH-PSI: the batch operations and one party's sans-IO session.

use curve25519_dalek::ristretto::CompressedRistretto;
use curve25519_dalek::traits::IsIdentity;
use curve25519_dalek::{RistrettoPoint, Scalar};
use rand::seq::SliceRandom;
use rayon::prelude::*;

use crate::{EncodedPoint, ItemSet, JobKey, POINT_LEN, PsiError, hash_to_group};

pub(crate) mod merge;
pub mod spill;
mod stream;

use spill::{PointSet, PointStore, SpilledOwn};
pub use stream::{AwaitingMerge, Matching, Streaming};

/// Points per rayon task: large enough to amortise the batch inversion of
/// `double_and_compress_batch`, small enough to balance across cores.
const CHUNK: usize = 1024;

/// Writes `2·P` for each `P` in `points`, compressed, into `out` (same length).
fn double_and_compress_into(points: &[RistrettoPoint], out: &mut [EncodedPoint]) {
    let compressed = RistrettoPoint::double_and_compress_batch(points);
    for (o, c) in out.iter_mut().zip(compressed) {
        *o = c.to_bytes();
    }
}

/// `k·H(item)` for each item, compressed, in the set's order.
///
/// Computed as `2·((k/2)·H(item))` so that the doubling and the encoding share one batched
/// inversion (`RistrettoPoint::double_and_compress_batch`), in rayon chunks of 1024 items with
/// one scratch vector per chunk and no per-item allocation.
pub fn blind_items(key: &JobKey, key_name: &str, items: &ItemSet) -> Vec<EncodedPoint> {
    let mut out = vec![[0u8; POINT_LEN]; items.len()];
    blind_into(key, key_name, items, |i| i, &mut out);
    out
}

/// `k·H(items[index(j)])` into `out[j]` for every `j`, with the halved-scalar batch encoding of
/// [`blind_items`], in rayon chunks of 1024.
pub(crate) fn blind_into(
    key: &JobKey,
    key_name: &str,
    items: &ItemSet,
    index: impl Fn(usize) -> usize + Sync,
    out: &mut [EncodedPoint],
) {
    let half: &Scalar = &key.half();
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, out_chunk)| {
            let start = c * CHUNK;
            let points: Vec<RistrettoPoint> = (start..start + out_chunk.len())
                .map(|j| half * hash_to_group(key_name, items.get(index(j)).unwrap_or_default()))
                .collect();
            double_and_compress_into(&points, out_chunk);
        });
}

/// Multiplies the peer's blinded points (concatenated 32-byte encodings) by our key.
///
/// Rejects a length that is not a multiple of [`POINT_LEN`], any encoding that does not
/// decompress to a ristretto255 element, and the identity; the error names the lowest offending
/// index in `points`. Uses the same halved-scalar batch encoding as [`blind_items`].
pub fn reblind_points(key: &JobKey, points: &[u8]) -> Result<Vec<EncodedPoint>, PsiError> {
    let (encodings, rest) = points.as_chunks::<POINT_LEN>();
    if !rest.is_empty() {
        return Err(PsiError::BatchNotMultipleOfPointLen { len: points.len() });
    }
    let half: &Scalar = &key.half();
    let mut out = vec![[0u8; POINT_LEN]; encodings.len()];
    let results: Vec<Result<(), PsiError>> = out
        .par_chunks_mut(CHUNK)
        .zip(encodings.par_chunks(CHUNK))
        .enumerate()
        .map(|(c, (out_chunk, in_chunk))| {
            let mut pts = Vec::with_capacity(in_chunk.len());
            for (j, enc) in in_chunk.iter().enumerate() {
                let index = (c * CHUNK + j) as u64;
                let p = CompressedRistretto(*enc)
                    .decompress()
                    .ok_or(PsiError::InvalidPoint { index })?;
                if p.is_identity() {
                    return Err(PsiError::IdentityPoint { index });
                }
                pts.push(half * p);
            }
            double_and_compress_into(&pts, out_chunk);
            Ok(())
        })
        .collect();
    // The first error in index order, so the report does not depend on scheduling.
    results.into_iter().collect::<Result<(), _>>()?;
    Ok(out)
}

/// Concatenates encodings into outgoing batches of at most `batch_size` points each.
pub(crate) fn to_batches<'a>(
    points: impl ExactSizeIterator<Item = &'a EncodedPoint>,
    batch_size: usize,
) -> Vec<Vec<u8>> {
    // A batch size from configuration may be absurd; never let it overflow or over-reserve.
    let batch_size = batch_size.clamp(1, usize::MAX / POINT_LEN);
    let mut remaining = points.len();
    let mut batches = Vec::with_capacity(remaining.div_ceil(batch_size));
    let mut current = Vec::new();
    for p in points {
        if current.is_empty() {
            current.reserve_exact(batch_size.min(remaining) * POINT_LEN);
        }
        current.extend_from_slice(p);
        remaining = remaining.saturating_sub(1);
        if current.len() == batch_size * POINT_LEN {
            batches.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// Whether the set holds no item twice. `O(n)` for a set that went through
/// [`ItemSet::dedup`] (strictly ascending); otherwise sorts indices.
pub(crate) fn items_distinct(items: &ItemSet) -> bool {
    let get = |i: usize| items.get(i).unwrap_or_default();
    if (1..items.len()).all(|i| get(i - 1) < get(i)) {
        return true;
    }
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.par_sort_unstable_by(|&a, &b| get(a).cmp(get(b)));
    order.windows(2).all(|w| get(w[0]) != get(w[1]))
}

/// Sorted, and with no point twice.
pub(crate) fn sort_and_check_distinct(points: &mut [EncodedPoint]) -> bool {
    points.par_sort_unstable();
    points.par_windows(2).all(|w| w[0] != w[1])
}

/// Hashes and blinds `items` (dropping them once blinded), shuffles the points (OS-seeded
/// CSPRNG, Fisher–Yates) and returns them as outgoing batches of at most `batch_size` points,
/// with the shuffle: `perm[j]` is the index in `items` of the `j`-th point sent.
pub(crate) fn blind_shuffled(
    key: &JobKey,
    key_name: &str,
    items: ItemSet,
    batch_size: usize,
) -> (Vec<Vec<u8>>, Vec<u32>) {
    let blinded = blind_items(key, key_name, &items);
    drop(items);
    shuffled(&blinded, batch_size)
}

/// `blinded` shuffled (OS-seeded CSPRNG, Fisher–Yates) into outgoing batches of at most
/// `batch_size` points, with the shuffle: `perm[j]` is the index of the `j`-th point sent.
pub(crate) fn shuffled(blinded: &[EncodedPoint], batch_size: usize) -> (Vec<Vec<u8>>, Vec<u32>) {
    // Fits: every session refuses sets over u32::MAX items before blinding.
    let mut perm: Vec<u32> = (0..blinded.len() as u32).collect();
    perm.shuffle(&mut rand::rng());
    let batches = to_batches(perm.iter().map(|&i| &blinded[i as usize]), batch_size);
    (batches, perm)
}

/// Whether no point is in `points` twice (in any order).
pub(crate) fn points_distinct(points: &[EncodedPoint]) -> bool {
    if points.windows(2).all(|w| w[0] < w[1]) {
        return true;
    }
    let mut sorted = points.to_vec();
    sort_and_check_distinct(&mut sorted)
}

/// Re-blinds one batch of the peer's points and appends them to `peer_double`, after checking
/// that the batch is whole points and does not take the peer past its `declared` size. Point
/// errors name the index in the peer's whole stream.
pub(crate) fn reblind_into(
    key: &JobKey,
    declared: u64,
    peer_double: &mut Vec<EncodedPoint>,
    batch: &[u8],
) -> Result<(), PsiError> {
    let reblinded = reblind_checked(key, declared, peer_double.len() as u64, batch)?;
    peer_double.extend_from_slice(&reblinded);
    Ok(())
}

/// Appends the peer's next points, re-blinded elsewhere (a node's own executors) after
/// [`check_peer_batch`] passed the batch they came in, in the peer's order: they must not take
/// it past its `declared` size.
pub(crate) fn append_reblinded(
    declared: u64,
    peer_double: &mut Vec<EncodedPoint>,
    reblinded: &[EncodedPoint],
) -> Result<(), PsiError> {
    received_within(declared, peer_double.len() as u64, reblinded.len())?;
    peer_double.extend_from_slice(reblinded);
    Ok(())
}

/// How many of the peer's points have come once `more` follow the `before` it sent already;
/// fails if that takes it past its `declared` size.
pub(crate) fn received_within(declared: u64, before: u64, more: usize) -> Result<u64, PsiError> {
    let received = before + more as u64;
    if received > declared {
        return Err(PsiError::TooManyPoints { declared, received });
    }
    Ok(received)
}

/// Re-blinds one batch of the peer's points that follows `offset` earlier ones, after checking
/// that the batch is whole points and does not take the peer past its `declared` size. Point
/// errors name the index in the peer's whole stream.
pub(crate) fn reblind_checked(
    key: &JobKey,
    declared: u64,
    offset: u64,
    batch: &[u8],
) -> Result<Vec<EncodedPoint>, PsiError> {
    check_peer_batch(declared, offset, batch)?;
    reblind_points(key, batch).map_err(|e| e.at_offset(offset))
}

/// Checks one batch of the peer's points that follows `offset` earlier ones before anything is
/// done with it: whole points, and not past the peer's `declared` size. Returns how many points
/// it holds. A driver that has the points re-blinded elsewhere (on its own executors) checks
/// them with this first, as [`Streaming::on_peer_batch`] does.
pub fn check_peer_batch(declared: u64, offset: u64, batch: &[u8]) -> Result<u64, PsiError> {
    if !batch.len().is_multiple_of(POINT_LEN) {
        return Err(PsiError::BatchNotMultipleOfPointLen { len: batch.len() });
    }
    let points = (batch.len() / POINT_LEN) as u64;
    let received = offset + points;
    if received > declared {
        return Err(PsiError::TooManyPoints { declared, received });
    }
    Ok(points)
}

/// Re-blinds one batch of the peer's points into `peer_double` ([`reblind_into`]); returns it
/// for sending at once when returning in order.
fn reblind_peer_batch(
    common: &Common,
    peer_size: u64,
    peer_double: &mut Vec<EncodedPoint>,
    batch: &[u8],
) -> Result<Option<Vec<u8>>, PsiError> {
    let start = peer_double.len();
    reblind_into(&common.key, peer_size, peer_double, batch)?;
    let out = common
        .params
        .return_in_order
        .then(|| peer_double[start..].as_flattened().to_vec());
    Ok(out)
}

/// The stream an end message closes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Stream {
    /// The peer's blinded points.
    Peer,
    /// Our own points, which the peer returns re-blinded.
    Returned,
}

/// The peer's end message says `announced` points: that must equal both the `expected` count
/// (the peer's declared size, or our own size for our returned points) and the number
/// `received`.
pub(crate) fn check_total(
    stream: Stream,
    expected: u64,
    announced: u64,
    received: u64,
) -> Result<(), PsiError> {
    if announced == expected && received == expected {
        return Ok(());
    }
    Err(match stream {
        Stream::Peer => PsiError::TotalMismatch {
            declared: expected,
            announced,
            received,
        },
        Stream::Returned => PsiError::ReturnedTotalMismatch {
            own: expected,
            announced,
            received,
        },
    })
}

/// Checks a batch of our points coming back against how many we `sent` and how many had come
/// back before (`received`), and splits it into encodings.
pub(crate) fn returned_points(
    batch: &[u8],
    sent: u64,
    received: u64,
) -> Result<&[EncodedPoint], PsiError> {
    let (encodings, rest) = batch.as_chunks::<POINT_LEN>();
    if !rest.is_empty() {
        return Err(PsiError::BatchNotMultipleOfPointLen { len: batch.len() });
    }
    let received = received + encodings.len() as u64;
    if received > sent {
        return Err(PsiError::TooManyReturnedPoints {
            own: sent,
            received,
        });
    }
    Ok(encodings)
}

/// Appends a batch of our returned points to `returned`, refusing more than `own_size` in all.
pub(crate) fn push_returned(
    returned: &mut Vec<EncodedPoint>,
    batch: &[u8],
    own_size: u64,
) -> Result<(), PsiError> {
    let encodings = returned_points(batch, own_size, returned.len() as u64)?;
    if returned.is_empty() {
        returned.reserve_exact(own_size as usize - encodings.len());
    }
    returned.extend_from_slice(encodings);
    Ok(())
}

/// The policy and the shape of one party's PSI session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsiParams {
    /// Domain for [`hash_to_group`] (e.g. `"email"` or `"email+dob"`); both parties must agree.
    pub key_name: String,
    /// The smallest set size the peer may declare.
    pub min_peer_set: u64,
    /// The largest set size the peer may declare.
    pub max_peer_set: u64,
    /// `true`: the peer may learn which of ITS items matched, so its points are returned in the
    /// order received; `false`: returned shuffled (the peer learns only the count).
    pub return_in_order: bool,
    /// `true`: compute which of OUR items matched. Needs the peer to return our points in order
    /// (its `return_in_order`); the two settings are agreed out of band, and a peer that
    /// shuffles anyway yields a wrong membership list (never a wrong count).
    pub learn_membership: bool,
    /// Points per outgoing batch (e.g. 4096); 0 is treated as 1.
    pub batch_size: usize,
}

/// What every state carries.
struct Common {
    params: PsiParams,
    key: JobKey,
    own_size: u64,
    /// Where a spilled session keeps its sets ([`PsiSession::start_spilled`]); `None` in memory.
    store: Option<Box<dyn PointStore>>,
    /// The store holds our points' tags ([`spill::OwnSetBuilder::with_tags`]).
    tagged: bool,
}

impl Common {
    fn debug_fields<'a, 'b>(
        &self,
        d: &'a mut std::fmt::DebugStruct<'a, 'b>,
    ) -> &'a mut std::fmt::DebugStruct<'a, 'b> {
        d.field("params", &self.params)
            .field("own_size", &self.own_size)
    }
}

/// Entry point of one party's ECDH-PSI session.
///
/// The flow, for each party (both run the same machine against each other):
/// [`start`](Self::start) → send our declared size → [`AwaitingPeerSize::on_peer_size`] →
/// [`ReadyToBlind::blind`] → send our batches → [`ExchangingPoints::on_peer_batch`] for each
/// peer batch (send what it returns) → [`ExchangingPoints::on_peer_end`] (send what it returns,
/// then our end-of-return total) → [`AwaitingReturn::on_returned_batch`] for each of our
/// points coming back → [`AwaitingReturn::on_returned_end`] → [`PsiOutput`].
#[derive(Debug)]
pub struct PsiSession;

impl PsiSession {
    /// Begins a session over `items`, which must be distinct (call [`ItemSet::dedup`] first; a
    /// set with duplicates is refused at [`AwaitingPeerSize::on_peer_size`] with
    /// [`PsiError::DuplicateOwnItems`]). Returns our declared size, to send first, and the first
    /// state.
    pub fn start(params: PsiParams, key: JobKey, items: ItemSet) -> (u64, AwaitingPeerSize) {
        let own_size = items.len() as u64;
        let distinct = items_distinct(&items);
        let state = AwaitingPeerSize {
            common: Common {
                params,
                key,
                own_size,
                store: None,
                tagged: false,
            },
            items,
            blinded: Vec::new(),
            distinct,
        };
        (own_size, state)
    }

    /// Begins a session over our own set already blinded with `key`: `k·H(x)` for each of our
    /// distinct items, as the executors' pass computes them. The points are sorted here; a
    /// point twice is refused at [`AwaitingPeerSize::on_peer_size`] with
    /// [`PsiError::DuplicateOwnItems`]. Everything else is the in-memory session, membership
    /// included: [`PsiOutput::membership`] then holds indices into the sorted points.
    pub fn start_blinded(
        params: PsiParams,
        key: JobKey,
        mut points: Vec<EncodedPoint>,
    ) -> (u64, AwaitingPeerSize) {
        let own_size = points.len() as u64;
        let distinct = sort_and_check_distinct(&mut points);
        let state = AwaitingPeerSize {
            common: Common {
                params,
                key,
                own_size,
                store: None,
                tagged: false,
            },
            items: ItemSet::new(),
            blinded: points,
            distinct,
        };
        (own_size, state)
    }

    /// Begins a session over our own set already blinded with `key` and spilled
    /// ([`OwnSetBuilder`]): the session's memory then holds a bucket, not a set (see
    /// `spill.rs`). Learning membership, its indices are places in the order the set goes out
    /// (bucket by bucket, each sorted), and what it matched comes in
    /// [`PsiOutput::spilled_matches`]: tags for a set built
    /// [`with_tags`](spill::OwnSetBuilder::with_tags), points otherwise.
    pub fn start_spilled(
        params: PsiParams,
        key: JobKey,
        own: SpilledOwn,
    ) -> (u64, AwaitingPeerSize) {
        let own_size = own.size();
        let state = AwaitingPeerSize {
            common: Common {
                params,
                key,
                own_size,
                tagged: own.tagged,
                store: Some(own.store),
            },
            items: ItemSet::new(),
            blinded: Vec::new(),
            distinct: true,
        };
        (own_size, state)
    }
}

/// Waiting for the peer's declared set size.
pub struct AwaitingPeerSize {
    common: Common,
    items: ItemSet,
    /// Our points, when the session began blinded ([`PsiSession::start_blinded`]).
    blinded: Vec<EncodedPoint>,
    distinct: bool,
}

impl std::fmt::Debug for AwaitingPeerSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.common
            .debug_fields(&mut f.debug_struct("AwaitingPeerSize"))
            .finish_non_exhaustive()
    }
}

impl AwaitingPeerSize {
    /// Checks the peer's declared size against the policy (before any exponentiation), and our
    /// own inputs (distinct items, key name length).
    pub fn on_peer_size(self, declared: u64) -> Result<ReadyToBlind, PsiError> {
        let p = &self.common.params;
        if declared < p.min_peer_set {
            return Err(PsiError::PeerSetTooSmall {
                declared,
                min: p.min_peer_set,
            });
        }
        if declared > p.max_peer_set {
            return Err(PsiError::PeerSetTooLarge {
                declared,
                max: p.max_peer_set,
            });
        }
        if p.key_name.len() > usize::from(u16::MAX) {
            return Err(PsiError::KeyNameTooLong {
                len: p.key_name.len(),
            });
        }
        if self.common.own_size > u64::from(u32::MAX) {
            return Err(PsiError::OwnSetTooLarge {
                size: self.common.own_size,
            });
        }
        if !self.distinct {
            return Err(PsiError::DuplicateOwnItems);
        }
        Ok(ReadyToBlind {
            common: self.common,
            items: self.items,
            blinded: self.blinded,
            peer_size: declared,
        })
    }
}

/// Sizes agreed; ready for the heavy step.
pub struct ReadyToBlind {
    common: Common,
    items: ItemSet,
    /// Our points, when the session began blinded (`items` is then empty).
    blinded: Vec<EncodedPoint>,
    peer_size: u64,
}

impl std::fmt::Debug for ReadyToBlind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.common
            .debug_fields(&mut f.debug_struct("ReadyToBlind"))
            .field("peer_size", &self.peer_size)
            .finish_non_exhaustive()
    }
}

impl ReadyToBlind {
    /// Hashes and blinds our items, shuffles them (OS-seeded CSPRNG, Fisher–Yates), and returns
    /// them as outgoing batches (each at most `batch_size` points of concatenated encodings) with
    /// the next state. The item bytes are dropped here; only the shuffle permutation is kept,
    /// and only when `learn_membership`.
    pub fn blind(self) -> (Vec<Vec<u8>>, ExchangingPoints) {
        let Self {
            mut common,
            items,
            blinded,
            peer_size,
        } = self;
        let mut failed = None;
        let (batches, perm) = match common.store.as_mut() {
            // Blinded already: only the shuffle.
            None if !blinded.is_empty() => {
                // Fits: on_peer_size refused sets over u32::MAX items.
                let mut perm: Vec<u32> = (0..blinded.len() as u32).collect();
                perm.shuffle(&mut rand::rng());
                let batches = to_batches(
                    perm.iter().map(|&i| &blinded[i as usize]),
                    common.params.batch_size,
                );
                (batches, perm)
            }
            // Its membership indices are places in the sorted set: only the stream keeps that order.
            Some(_) if common.params.learn_membership => {
                failed = Some(PsiError::Spill(
                    "a spilled set that learns membership streams its points".into(),
                ));
                (Vec::new(), Vec::new())
            }
            // A spilled set is blinded already: read it whole (this path bounds nothing).
            Some(store) => match spill::read_all(store.as_mut(), PointSet::Own) {
                Ok(mut points) => {
                    points.shuffle(&mut rand::rng());
                    (
                        to_batches(points.iter(), common.params.batch_size),
                        Vec::new(),
                    )
                }
                Err(e) => {
                    failed = Some(e);
                    (Vec::new(), Vec::new())
                }
            },
            // on_peer_size refused sets over u32::MAX items.
            None => blind_shuffled(
                &common.key,
                &common.params.key_name,
                items,
                common.params.batch_size,
            ),
        };
        let perm = common.params.learn_membership.then_some(perm);
        // The peer's size is bounded by policy but still only a claim: cap the reservation.
        let reserve = peer_size.min(1 << 20) as usize;
        let next = ExchangingPoints {
            peer_double: Vec::with_capacity(reserve),
            returned: Returned {
                points: Vec::new(),
                own_size: common.own_size,
            },
            common,
            peer_size,
            perm,
            failed,
        };
        (batches, next)
    }
}

/// Our points as the peer returns them, `k_peer·k·H(x)`, in arrival order.
struct Returned {
    points: Vec<EncodedPoint>,
    own_size: u64,
}

impl Returned {
    fn push(&mut self, batch: &[u8]) -> Result<(), PsiError> {
        push_returned(&mut self.points, batch, self.own_size)
    }
}

/// Our batches are out; receiving the peer's blinded points and reblinding them.
pub struct ExchangingPoints {
    common: Common,
    peer_size: u64,
    /// `perm[j]` is the index in the original `ItemSet` of the `j`-th point we sent.
    perm: Option<Vec<u32>>,
    /// `k·k_peer·H(y)` for the peer's items, in received order.
    peer_double: Vec<EncodedPoint>,
    returned: Returned,
    /// Reading a spilled set failed in [`ReadyToBlind::blind`]: the next step returns it.
    failed: Option<PsiError>,
}

impl std::fmt::Debug for ExchangingPoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.common
            .debug_fields(&mut f.debug_struct("ExchangingPoints"))
            .field("peer_size", &self.peer_size)
            .field("received", &self.peer_double.len())
            .field("returned", &self.returned.points.len())
            .finish_non_exhaustive()
    }
}

impl ExchangingPoints {
    /// One batch of the peer's blinded points: checks that it does not take the peer past its
    /// declared size, then reblinds it. Returns the reblinded batch to send at once when
    /// `return_in_order`, or `None` when returning shuffled (everything then comes out of
    /// [`on_peer_end`](Self::on_peer_end)). Point errors name the index in the peer's stream.
    pub fn on_peer_batch(
        mut self,
        batch: &[u8],
    ) -> Result<(ExchangingPoints, Option<Vec<u8>>), PsiError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let out = reblind_peer_batch(&self.common, self.peer_size, &mut self.peer_double, batch)?;
        Ok((self, out))
    }

    /// A batch of our own points coming back before the peer's points have all arrived (the
    /// peer may be ahead of us). Same checks as [`AwaitingReturn::on_returned_batch`].
    pub fn on_returned_batch(mut self, batch: &[u8]) -> Result<ExchangingPoints, PsiError> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        self.returned.push(batch)?;
        Ok(self)
    }

    /// The peer says it sent `total` points: that must equal both its declared size and what
    /// arrived, and the points must be distinct. Returns the batches still to send (when
    /// returning shuffled: all reblinded points, shuffled; otherwise none) and the next state.
    pub fn on_peer_end(self, total: u64) -> Result<(Vec<Vec<u8>>, AwaitingReturn), PsiError> {
        let Self {
            common,
            peer_size,
            perm,
            mut peer_double,
            returned,
            failed,
        } = self;
        if let Some(e) = failed {
            return Err(e);
        }
        check_total(Stream::Peer, peer_size, total, peer_double.len() as u64)?;
        // Shuffled in place rather than a shuffled copy: the sort below fixes the order anyway,
        // and a copy would be one more encoding per peer item at this step's memory peak.
        let outgoing = if common.params.return_in_order {
            Vec::new()
        } else {
            peer_double.shuffle(&mut rand::rng());
            to_batches(peer_double.iter(), common.params.batch_size)
        };
        if !sort_and_check_distinct(&mut peer_double) {
            return Err(PsiError::DuplicatePeerPoint);
        }
        let next = AwaitingReturn {
            common,
            peer_size,
            perm,
            peer_sorted: peer_double,
            returned,
        };
        Ok((outgoing, next))
    }
}

/// All the peer's points are in (and ours sent back); waiting for our own points to return.
pub struct AwaitingReturn {
    common: Common,
    peer_size: u64,
    perm: Option<Vec<u32>>,
    /// `k·k_peer·H(y)` for the peer's items, sorted.
    peer_sorted: Vec<EncodedPoint>,
    returned: Returned,
}

impl std::fmt::Debug for AwaitingReturn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.common
            .debug_fields(&mut f.debug_struct("AwaitingReturn"))
            .field("peer_size", &self.peer_size)
            .field("returned", &self.returned.points.len())
            .finish_non_exhaustive()
    }
}

impl AwaitingReturn {
    /// A batch of OUR points, double-blinded and returned by the peer. Must not take the total
    /// past our own size.
    pub fn on_returned_batch(mut self, batch: &[u8]) -> Result<AwaitingReturn, PsiError> {
        self.returned.push(batch)?;
        Ok(self)
    }

    /// The peer says it returned `total` points: that must equal our size and what arrived, and
    /// no point may come back twice. Compares our returned points with our reblinding of the
    /// peer's set and returns the result.
    pub fn on_returned_end(self, total: u64) -> Result<PsiOutput, PsiError> {
        let Self {
            common,
            peer_size,
            perm,
            peer_sorted,
            returned,
        } = self;
        let own = common.own_size;
        let mut points = returned.points;
        check_total(Stream::Returned, own, total, points.len() as u64)?;
        let is_match = |p: &EncodedPoint| peer_sorted.binary_search(p).is_ok();
        let membership = perm.map(|perm| {
            let mut hits: Vec<u32> = points
                .par_iter()
                .zip(perm.par_iter())
                .filter_map(|(p, &i)| is_match(p).then_some(i))
                .collect();
            hits.par_sort_unstable();
            hits
        });
        let intersection = match &membership {
            Some(hits) => hits.len() as u64,
            None => points.par_iter().filter(|p| is_match(p)).count() as u64,
        };
        if !sort_and_check_distinct(&mut points) {
            return Err(PsiError::DuplicateReturnedPoint);
        }
        Ok(PsiOutput {
            intersection,
            own_set_size: own,
            peer_set_size: peer_size,
            membership,
            spilled_bytes: 0,
            spilled_matches: None,
        })
    }
}

/// The result of one party's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsiOutput {
    /// How many of our items the peer also holds.
    pub intersection: u64,
    /// Our set size.
    pub own_set_size: u64,
    /// The peer's set size.
    pub peer_set_size: u64,
    /// Indices into the [`ItemSet`] given to [`PsiSession::start`] of our items in the
    /// intersection, sorted, when `learn_membership`; `None` otherwise. A session begun
    /// blinded or spilled gives places in its own order of points instead (see those).
    pub membership: Option<Vec<u32>>,
    /// Bytes a spilled session wrote to its store (0 in memory).
    pub spilled_bytes: u64,
    /// A spilled session that learns membership: the tags of our matched items, or their
    /// points for a set without tags; `None` otherwise.
    pub spilled_matches: Option<spill::SpilledMatches>,
}
