//! The streaming exchange: our blinded points go out batch by batch as they are computed, the
//! peer's points are re-blinded as they arrive, and our points coming back are compared with the
//! peer's sorted set as they arrive. No phase waits for another to finish on the whole set.
//!
//! ```text
//! ReadyToBlind::stream ─▶ Streaming ──on_peer_end──▶ Matching ──on_returned_end──▶ PsiOutput
//!                          blind_next                 blind_next
//!                          on_peer_batch              next_return (when shuffled)
//!                                                     on_returned_batch (compared at once)
//! ```
//!
//! Our own batches come out of `blind_next` in both states: a fast peer may finish sending its
//! points before we have sent all of ours. A returned point is never accepted before we have
//! sent the point it answers.
//!
//! **The wire keeps its order.** Each party's stream still carries all its own points and their
//! end marker first, then what it returns: a driver holds the batches that
//! [`Streaming::on_peer_batch`] gives it (returning in order) until its own end marker is out,
//! and asks [`Matching::next_return`] (returning shuffled) only after it. Nothing is lost by that: the peer can compare a returned point only once it has all
//! of our points, which is when our end marker arrives. So returned points reach
//! [`Matching`] only, and are compared there the moment they arrive.
//!
//! # The send order, and what it protects
//!
//! **What the shuffle protects.** The peer re-blinds each of our points itself, so it knows
//! `k_peer·k·H(x)` for the `j`-th point we sent; and for every item we share it sees the same
//! value among its own points coming back from us. So for each shared item it learns *where in
//! our stream* that item travelled. Our set is deduplicated into byte order, so without a
//! shuffle those positions would tell the peer the rank of each shared identifier among ours:
//! how many of our identifiers sort below it, and so, across shared items, the distribution of
//! our identifiers it does not hold. The shuffle makes the stream's order a uniformly random
//! permutation, independent of our items: the positions of shared items then carry nothing.
//!
//! **Why the new order keeps it.** [`ReadyToBlind::blind`] blinds every item in set order, then
//! sends `blinded[π(0)], blinded[π(1)], …` for a uniformly random permutation `π`.
//! [`ReadyToBlind::stream`] draws the same kind of `π` (Fisher–Yates over the OS-seeded CSPRNG)
//! *first*, before any point is computed, and blinds the items in the order `π(0), π(1), …`.
//! The `j`-th point on the wire is `k·H(item π(j))` in both, so the sequence the peer receives is
//! the same function of (items, `k`, `π`), with `π` drawn from the same distribution and
//! independently of the items. What changes is only *when* each batch leaves. The time to blind
//! a batch depends on the number of hash blocks its items need (one more per 128 bytes of
//! identifier), summed over a random subset of our items; the old order leaked the same sum over
//! the whole set.
//!
//! **What is not streamed.** When the peer may learn only the count, the points we return to it
//! must be shuffled as a whole ([`Matching::next_return`]): a batch returned before the peer's
//! last point arrived would tell the peer which of its batches the points in it answer, and so
//! narrow down which of its items matched. So those go out after the peer's last point, as
//! before; only their comparison at the peer is streamed.
//!
//! # Memory
//!
//! Per party: the identifiers until the last of our points is blinded, the send order (4 bytes
//! an item, kept only to learn membership), the peer's points re-blinded (32 bytes an item,
//! sorted once complete), the order of a shuffled return (4 bytes a peer item: the points go
//! out of the sorted set in that order, without a shuffled copy), and 16 bytes per returned
//! point to detect a point returned twice. Returned points themselves are not kept.

use rand::seq::SliceRandom;
use rayon::prelude::*;

use super::merge::{BucketMatches, Merge, MergeResult, combine, merge_buckets};
use super::spill::{
    BUCKETS, BucketReader, PointSet, PointStore, append_by_bucket, append_records_by_bucket,
    bucket_cap, matches_at, placed, sort_bucket_distinct, spill_error,
};
use super::{
    Common, ReadyToBlind, Stream, append_reblinded, blind_into, check_total, reblind_checked,
    reblind_peer_batch, returned_points, sort_and_check_distinct,
};
use crate::{EncodedPoint, ItemSet, POINT_LEN, PsiError, PsiOutput};

/// The store of a spilled session (`Some` whenever a spilled reader or tally exists).
fn store(common: &mut Common) -> Result<&mut dyn PointStore, PsiError> {
    match common.store.as_mut() {
        Some(store) => Ok(store.as_mut()),
        None => Err(PsiError::Spill("the session has no store".into())),
    }
}

impl ReadyToBlind {
    /// Starts the streaming exchange: draws the order in which our points will travel (a
    /// uniformly random permutation from the OS-seeded CSPRNG) and computes nothing yet. Call
    /// [`Streaming::blind_next`] for each batch to send; see the [module docs](self) for why
    /// blinding in this order protects what [`blind`](Self::blind)'s shuffle protects.
    pub fn stream(self) -> Streaming {
        let Self {
            common,
            items,
            blinded,
            peer_size,
        } = self;
        let spilled = common.store.is_some();
        // A spilled set goes out sorted by its encodings (see spill.rs for why that order is
        // as good as a drawn one); an in-memory set in a drawn order.
        let order = if spilled {
            Vec::new()
        } else {
            // Fits: on_peer_size refused sets over u32::MAX items.
            let mut order: Vec<u32> = (0..common.own_size as u32).collect();
            order.shuffle(&mut rand::rng());
            order
        };
        let own = OwnStream {
            total: common.own_size as usize,
            items,
            blinded,
            order,
            spilled: spilled.then(|| BucketReader::new(PointSet::Own)),
            sent: 0,
            batch_size: common.params.batch_size.max(1),
            keep_order: common.params.learn_membership,
        };
        // The peer's size is bounded by policy but still only a claim: cap the reservation.
        let reserve = if spilled {
            0
        } else {
            peer_size.min(1 << 20) as usize
        };
        Streaming {
            common,
            peer_size,
            own,
            peer_double: Vec::with_capacity(reserve),
            peer_raw: spilled.then_some(0),
        }
    }
}

/// Our items not yet blinded, in the order they will travel.
struct OwnStream {
    /// Our identifiers; emptied once the last of them is blinded.
    items: ItemSet,
    /// Our points instead, when the session began blinded (`items` is then empty).
    blinded: Vec<EncodedPoint>,
    /// `order[j]` is the index in the `ItemSet` (or in `blinded`) of the `j`-th point we send.
    /// Kept after the last batch only when we learn membership.
    order: Vec<u32>,
    /// A spilled set: read from its buckets instead (`items` and `order` stay empty).
    spilled: Option<BucketReader>,
    /// Points handed out so far.
    sent: usize,
    total: usize,
    batch_size: usize,
    keep_order: bool,
}

impl OwnStream {
    fn next(&mut self, common: &mut Common) -> Result<Option<Vec<u8>>, PsiError> {
        if self.sent == self.total {
            return Ok(None);
        }
        if let Some(reader) = &mut self.spilled {
            let mut sent = self.sent as u64;
            let batch = reader.next_counted(
                store(common)?,
                self.batch_size,
                &mut sent,
                self.total as u64,
            );
            self.sent = sent as usize;
            return batch;
        }
        let end = self.sent.saturating_add(self.batch_size).min(self.total);
        let order = &self.order[self.sent..end];
        let out = if self.blinded.is_empty() {
            let mut out = vec![[0u8; POINT_LEN]; order.len()];
            blind_into(
                &common.key,
                &common.params.key_name,
                &self.items,
                |j| order[j] as usize,
                &mut out,
            );
            out.into_flattened()
        } else {
            // `order` is a permutation of the indices of `blinded`.
            let mut out = Vec::with_capacity(order.len() * POINT_LEN);
            for &i in order {
                out.extend_from_slice(&self.blinded[i as usize]);
            }
            out
        };
        self.sent = end;
        if self.sent == self.total {
            // The identifiers are no longer needed: drop them as early as possible.
            self.items = ItemSet::new();
            self.blinded = Vec::new();
            if !self.keep_order {
                self.order = Vec::new();
            }
        }
        Ok(Some(out))
    }
}

/// What a spilled session does after the peer's last point: re-blind the peer's stored points
/// in pieces into their buckets, sort each bucket, return them bucket by bucket; meanwhile our
/// returned points go to their own buckets as they arrive, and are counted at the end.
#[derive(Debug, Default)]
struct SpilledMatching {
    /// The peer's stored points handed out to be re-blinded so far (here, or elsewhere through
    /// [`Matching::take_reblind_piece`]).
    taken: u64,
    /// The peer's points re-blinded so far.
    reblinded: u64,
    /// Per bucket, the peer's re-blinded points.
    peer: SpillTally,
    /// Buckets of the peer's points sorted so far (one per piece, once all are re-blinded).
    buckets_sorted: usize,
    /// Every bucket of the peer's points is sorted and free of duplicates.
    sorted: bool,
    /// Reads the sorted buckets back to return them (set once sorted).
    return_reader: Option<BucketReader>,
    /// Our returned points, per bucket.
    returned: SpillTally,
    /// A store failure while returning, reported by the next step that can fail.
    deferred: Option<PsiError>,
}

impl SpilledMatching {
    /// The peer's next points re-blinded: into their buckets, and when returning in order also
    /// after the last ones in [`PointSet::PeerInOrder`].
    fn store_reblinded(
        &mut self,
        store: &mut dyn PointStore,
        peer_size: u64,
        in_order: bool,
        reblinded: &[EncodedPoint],
    ) -> Result<(), PsiError> {
        let cap = (bucket_cap(peer_size), "points");
        append_by_bucket(
            store,
            PointSet::Peer,
            reblinded,
            &mut self.peer.counts,
            Some(cap),
        )?;
        if in_order {
            store
                .append(PointSet::PeerInOrder, 0, reblinded.as_flattened())
                .map_err(spill_error)?;
        }
        self.reblinded += reblinded.len() as u64;
        Ok(())
    }
}

/// How many points a spilled set has in each bucket, and in all.
#[derive(Debug)]
struct SpillTally {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
}

impl Default for SpillTally {
    fn default() -> Self {
        SpillTally {
            counts: Box::new([0; BUCKETS]),
            total: 0,
        }
    }
}

/// Our points go out as they are blinded; the peer's arrive and are re-blinded.
pub struct Streaming {
    common: Common,
    peer_size: u64,
    own: OwnStream,
    /// `k·k_peer·H(y)` for the peer's items, in received order (in memory).
    peer_double: Vec<EncodedPoint>,
    /// A spilled session: how many of the peer's points went to the store as they came
    /// (re-blinded only after its last one, in pieces: [`Matching::reblind_next`]).
    peer_raw: Option<u64>,
}

impl std::fmt::Debug for Streaming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.common
            .debug_fields(&mut f.debug_struct("Streaming"))
            .field("peer_size", &self.peer_size)
            .field("sent", &self.own.sent)
            .field("received", &self.peer_received())
            .finish_non_exhaustive()
    }
}

impl Streaming {
    fn peer_received(&self) -> u64 {
        self.peer_raw.unwrap_or(self.peer_double.len() as u64)
    }

    /// Blinds the next batch of our points (at most `batch_size`, in rayon chunks) and returns it
    /// to send; `None` once all our points are out. A spilled session reads them instead (they
    /// were blinded as the dataset was read); only its store can fail.
    pub fn blind_next(&mut self) -> Result<Option<Vec<u8>>, PsiError> {
        self.own.next(&mut self.common)
    }

    /// How many of our points have been handed out by [`blind_next`](Self::blind_next).
    pub fn own_sent(&self) -> u64 {
        self.own.sent as u64
    }

    /// The most points a batch holds.
    pub fn batch_size(&self) -> usize {
        self.own.batch_size
    }

    /// Whether every one of our points has been handed out.
    pub fn own_done(&self) -> bool {
        self.own.sent == self.own.total
    }

    /// One batch of the peer's blinded points: checked against its declared size, then
    /// re-blinded. Returns the re-blinded batch to send at once when `return_in_order`, `None`
    /// when returning shuffled (then everything comes out of
    /// [`on_peer_end`](Self::on_peer_end)). Point errors name the index in the peer's stream.
    ///
    /// A spilled session only stores the batch as it came (its points are checked when they
    /// are re-blinded): the peer's points then never wait in memory for our CPU.
    pub fn on_peer_batch(mut self, batch: &[u8]) -> Result<(Streaming, Option<Vec<u8>>), PsiError> {
        let Some(received) = self.peer_raw else {
            let out =
                reblind_peer_batch(&self.common, self.peer_size, &mut self.peer_double, batch)?;
            return Ok((self, out));
        };
        if !batch.len().is_multiple_of(POINT_LEN) {
            return Err(PsiError::BatchNotMultipleOfPointLen { len: batch.len() });
        }
        let now = received + (batch.len() / POINT_LEN) as u64;
        if now > self.peer_size {
            return Err(PsiError::TooManyPoints {
                declared: self.peer_size,
                received: now,
            });
        }
        store(&mut self.common)?
            .append(PointSet::PeerRaw, 0, batch)
            .map_err(spill_error)?;
        self.peer_raw = Some(now);
        Ok((self, None))
    }

    /// Whether this session keeps the peer's points as they come and re-blinds them only after
    /// the last one (a spilled session): its peer batches then go to
    /// [`on_peer_batch`](Self::on_peer_batch), which only stores them, and the re-blinding is
    /// [`Matching`]'s.
    pub fn reblinds_after_peer_end(&self) -> bool {
        self.peer_raw.is_some()
    }

    /// The peer's next points, re-blinded elsewhere (on this node's own executors) after
    /// [`check_peer_batch`](super::check_peer_batch) passed the batch they came in: the same as
    /// [`on_peer_batch`](Self::on_peer_batch) once its re-blinding is done. They must come in
    /// the peer's stream order. Returns them to send at once when returning in order, in
    /// batches of at most `batch_size` points (none otherwise). A spilled session refuses them:
    /// its points come back through [`Matching::on_reblinded_piece`].
    pub fn on_peer_reblinded(
        mut self,
        reblinded: &[EncodedPoint],
    ) -> Result<(Streaming, Vec<Vec<u8>>), PsiError> {
        if self.peer_raw.is_some() {
            return Err(PsiError::Spill(
                "a spilled session re-blinds the peer's points after its last one".into(),
            ));
        }
        append_reblinded(self.peer_size, &mut self.peer_double, reblinded)?;
        let out = if self.common.params.return_in_order {
            let batch = self.common.params.batch_size.max(1);
            reblinded
                .chunks(batch)
                .map(|c| c.as_flattened().to_vec())
                .collect()
        } else {
            Vec::new()
        };
        Ok((self, out))
    }

    /// The peer says it sent `total` points: that must equal both its declared size and what
    /// arrived, and the points must be distinct. Sorts them for matching. When returning
    /// shuffled, the points to return then come out of [`Matching::next_return`].
    pub fn on_peer_end(self, total: u64) -> Result<Matching, PsiError> {
        let received = self.peer_received();
        let Self {
            common,
            peer_size,
            own,
            mut peer_double,
            peer_raw,
        } = self;
        check_total(Stream::Peer, peer_size, total, received)?;
        let spilled = peer_raw.is_some();
        if !spilled && !sort_and_check_distinct(&mut peer_double) {
            return Err(PsiError::DuplicatePeerPoint);
        }
        // A uniform order over the sorted points is a uniform order over the points: the return
        // is as shuffled as shuffling the received order, for 4 bytes a point instead of a
        // shuffled copy of 32.
        let return_order = (!common.params.return_in_order && !spilled).then(|| {
            // Fits: the peer's size is within its declaration, checked against u32 by policy
            // bounds; a larger set could not have been received into memory anyway.
            let mut order: Vec<u32> = (0..peer_double.len() as u32).collect();
            order.shuffle(&mut rand::rng());
            order
        });
        let own_size = common.own_size as usize;
        Ok(Matching {
            hits: common.params.learn_membership.then(Vec::new),
            common,
            peer_size,
            own,
            peer_sorted: peer_double,
            return_order,
            spilled: spilled.then(|| Box::new(SpilledMatching::default())),
            returned_out: 0,
            received: 0,
            count: 0,
            fingerprints: Vec::with_capacity(if spilled { 0 } else { own_size }),
        })
    }
}

/// The peer's set is complete and sorted; our returned points are compared as they arrive.
pub struct Matching {
    common: Common,
    peer_size: u64,
    own: OwnStream,
    /// `k·k_peer·H(y)` for the peer's items, sorted.
    peer_sorted: Vec<EncodedPoint>,
    /// When returning shuffled: the order in which `peer_sorted` goes back to the peer.
    return_order: Option<Vec<u32>>,
    /// A spilled session's state (see [`SpilledMatching`]).
    spilled: Option<Box<SpilledMatching>>,
    /// Points handed out by [`Matching::next_return`] so far.
    returned_out: usize,
    /// Our points returned so far.
    received: u64,
    /// Returned points found in `peer_sorted` (when not learning membership).
    count: u64,
    /// Indices into our `ItemSet` of matched items (when learning membership).
    hits: Option<Vec<u32>>,
    /// The first 16 bytes of every returned point, to find one returned twice at the end.
    fingerprints: Vec<u128>,
}

impl std::fmt::Debug for Matching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.common
            .debug_fields(&mut f.debug_struct("Matching"))
            .field("peer_size", &self.peer_size)
            .field("sent", &self.own.sent)
            .field("returned", &self.received)
            .finish_non_exhaustive()
    }
}

/// The first 16 bytes of an encoding. Two distinct honest points agree there with probability
/// about `n²/2^129`; a peer would need some 2^64 work to make two differ only after them, and
/// then only gets its own job refused.
fn fingerprint(p: &EncodedPoint) -> u128 {
    let mut b = [0u8; 16];
    b.copy_from_slice(&p[..16]);
    u128::from_le_bytes(b)
}

impl Matching {
    /// Blinds the next batch of our points, as [`Streaming::blind_next`]; the peer may have sent
    /// all of its points before we have sent all of ours.
    pub fn blind_next(&mut self) -> Result<Option<Vec<u8>>, PsiError> {
        self.own.next(&mut self.common)
    }

    /// How many of our points have been handed out.
    pub fn own_sent(&self) -> u64 {
        self.own.sent as u64
    }

    /// Whether every one of our points has been handed out.
    pub fn own_done(&self) -> bool {
        self.own.sent == self.own.total
    }

    /// Whether a spilled session still has the peer's stored points to re-blind and sort
    /// ([`reblind_next`](Self::reblind_next)); nothing is returned before. Always `false` in
    /// memory.
    pub fn reblind_pending(&self) -> bool {
        self.spilled.as_ref().is_some_and(|sp| !sp.sorted)
    }

    /// A spilled session: re-blinds up to `points` more of the peer's stored points into their
    /// buckets; once all are, sorts one bucket per call and checks that no point came twice in
    /// it. Pieces stay small so that what arrives meanwhile (our returned points) is taken
    /// between them rather than held. Point errors name the index in the peer's stream.
    pub fn reblind_next(&mut self, points: usize) -> Result<(), PsiError> {
        let Some(sp) = self.spilled.as_mut() else {
            return Ok(());
        };
        if sp.sorted {
            return Ok(());
        }
        let store = match self.common.store.as_mut() {
            Some(store) => store.as_mut(),
            None => return Err(PsiError::Spill("the session has no store".into())),
        };
        if sp.reblinded < self.peer_size {
            if sp.taken != sp.reblinded {
                return Err(PsiError::Spill(
                    "re-blinded here while pieces were out elsewhere".into(),
                ));
            }
            let raw = read_raw_piece(store, sp.taken, self.peer_size, points)?;
            let reblinded = reblind_checked(&self.common.key, self.peer_size, sp.taken, &raw)?;
            sp.taken += reblinded.len() as u64;
            let in_order = self.common.params.return_in_order;
            return sp.store_reblinded(store, self.peer_size, in_order, &reblinded);
        }
        if sp.buckets_sorted < BUCKETS {
            if !sort_bucket_distinct(store, PointSet::Peer, sp.buckets_sorted)? {
                return Err(PsiError::DuplicatePeerPoint);
            }
            sp.buckets_sorted += 1;
            if sp.buckets_sorted < BUCKETS {
                return Ok(());
            }
        }
        // The points as they came are no longer needed.
        store.put(PointSet::PeerRaw, 0, &[]).map_err(spill_error)?;
        sp.sorted = true;
        sp.return_reader = Some(BucketReader::new(PointSet::Peer));
        Ok(())
    }

    /// Whether a spilled session still has stored points of the peer's to hand out through
    /// [`take_reblind_piece`](Self::take_reblind_piece). Always `false` in memory.
    pub fn reblind_pieces_left(&self) -> bool {
        self.spilled
            .as_ref()
            .is_some_and(|sp| sp.taken < self.peer_size)
    }

    /// Whether every piece handed out by [`take_reblind_piece`](Self::take_reblind_piece) has
    /// come back.
    pub fn reblind_pieces_back(&self) -> bool {
        self.spilled
            .as_ref()
            .is_none_or(|sp| sp.taken == sp.reblinded)
    }

    /// A spilled session whose re-blinding runs elsewhere (on this node's own executors): the
    /// next piece of the peer's stored points as they came (at most `points`), and where it
    /// starts in the peer's stream; `None` once all are out. Each piece comes back, re-blinded
    /// and checked as [`reblind_points`](super::reblind_points) checks, through
    /// [`on_reblinded_piece`](Self::on_reblinded_piece), in any order; then
    /// [`reblind_next`](Self::reblind_next) sorts the buckets.
    pub fn take_reblind_piece(
        &mut self,
        points: usize,
    ) -> Result<Option<(u64, Vec<u8>)>, PsiError> {
        let Some(sp) = self.spilled.as_mut() else {
            return Ok(None);
        };
        if sp.taken >= self.peer_size {
            return Ok(None);
        }
        let store = store(&mut self.common)?;
        let raw = read_raw_piece(store, sp.taken, self.peer_size, points)?;
        let offset = sp.taken;
        sp.taken += (raw.len() / POINT_LEN) as u64;
        Ok(Some((offset, raw)))
    }

    /// A piece from [`take_reblind_piece`](Self::take_reblind_piece), re-blinded: its points
    /// go to their buckets. More points than were handed out are refused. A session that
    /// returns in order must get its pieces back in the order they went out.
    pub fn on_reblinded_piece(&mut self, reblinded: &[EncodedPoint]) -> Result<(), PsiError> {
        let Some(sp) = self.spilled.as_mut() else {
            return Err(PsiError::Spill(
                "a piece came back to a session that holds the peer's points in memory".into(),
            ));
        };
        let back = sp.reblinded + reblinded.len() as u64;
        if back > sp.taken {
            return Err(PsiError::Spill(format!(
                "{back} of the peer's points came back re-blinded where {} went out",
                sp.taken
            )));
        }
        let store = match self.common.store.as_mut() {
            Some(store) => store.as_mut(),
            None => return Err(PsiError::Spill("the session has no store".into())),
        };
        let in_order = self.common.params.return_in_order;
        sp.store_reblinded(store, self.peer_size, in_order, reblinded)
    }

    /// When returning shuffled: the next batch of the peer's points, re-blinded, in a uniformly
    /// random order drawn at [`Streaming::on_peer_end`] (at most `batch_size` points); `None`
    /// once all are out. In memory, always `None` when returning in order (those went out batch
    /// by batch from [`Streaming::on_peer_batch`]); a spilled session returns them here in the
    /// peer's order, once its buckets are sorted. The total to announce after them is the
    /// peer's size.
    pub fn next_return(&mut self) -> Option<Vec<u8>> {
        if let Some(sp) = &mut self.spilled {
            // Nothing before every bucket is sorted (the driver waits for reblind_pending).
            let reader = sp.return_reader.as_mut()?;
            let batch_size = self.own.batch_size;
            let in_order = self.common.params.return_in_order;
            let batch = match store(&mut self.common) {
                // In the peer's order: the points as they were re-blinded.
                Ok(store) if in_order => store
                    .read_at(
                        PointSet::PeerInOrder,
                        0,
                        (self.returned_out * POINT_LEN) as u64,
                        batch_size * POINT_LEN,
                    )
                    .map(|b| (!b.is_empty()).then_some(b))
                    .map_err(spill_error),
                Ok(store) => reader.next(store, batch_size),
                Err(e) => Err(e),
            };
            return match batch {
                Ok(Some(batch)) => {
                    self.returned_out += batch.len() / POINT_LEN;
                    Some(batch)
                }
                Ok(None) => {
                    sp.return_reader = None;
                    None
                }
                Err(e) => {
                    // Our return ends short (the peer will see its total fall short); this
                    // node's own next step reports the cause.
                    sp.deferred = Some(e);
                    sp.return_reader = None;
                    None
                }
            };
        }
        let order = self.return_order.as_ref()?;
        if self.returned_out == order.len() {
            self.return_order = None;
            return None;
        }
        let end = self
            .returned_out
            .saturating_add(self.own.batch_size)
            .min(order.len());
        let mut out = Vec::with_capacity((end - self.returned_out) * POINT_LEN);
        for &i in &order[self.returned_out..end] {
            out.extend_from_slice(&self.peer_sorted[i as usize]);
        }
        self.returned_out = end;
        Some(out)
    }

    /// Compares returned points (already checked against what we sent) with the peer's sorted
    /// set, in parallel, and tallies them.
    fn compare(&mut self, points: &[EncodedPoint]) -> Result<(), PsiError> {
        if let Some(sp) = &mut self.spilled {
            let cap = Some((bucket_cap(self.common.own_size), "returned points"));
            let learn_membership = self.common.params.learn_membership;
            let store = store(&mut self.common)?;
            if learn_membership {
                // Each with its place in our stream: returned in order, the peer answers our
                // `j`-th point `j`-th. Fits: our size is at most u32::MAX.
                let records: Vec<_> = points
                    .iter()
                    .enumerate()
                    .map(|(t, p)| placed(p, (self.received + t as u64) as u32))
                    .collect();
                let set = PointSet::ReturnedPlaced;
                append_records_by_bucket(store, set, &records, &mut sp.returned.counts, cap)?;
            } else {
                append_by_bucket(
                    store,
                    PointSet::Returned,
                    points,
                    &mut sp.returned.counts,
                    cap,
                )?;
            }
            sp.returned.total += points.len() as u64;
            self.received += points.len() as u64;
            return Ok(());
        }
        let peer = &self.peer_sorted;
        let is_match = |p: &EncodedPoint| peer.binary_search(p).is_ok();
        match &mut self.hits {
            Some(hits) => {
                let base = self.received as usize;
                let order = &self.own.order;
                let found: Vec<u32> = points
                    .par_iter()
                    .enumerate()
                    .filter_map(|(t, p)| is_match(p).then(|| order[base + t]))
                    .collect();
                hits.extend(found);
            }
            None => self.count += points.par_iter().filter(|p| is_match(p)).count() as u64,
        }
        self.fingerprints.extend(points.iter().map(fingerprint));
        self.received += points.len() as u64;
        Ok(())
    }

    /// A batch of OUR points, double-blinded and returned by the peer: compared with the peer's
    /// set at once and not kept. Must not take the total past what we have sent.
    pub fn on_returned_batch(mut self, batch: &[u8]) -> Result<Matching, PsiError> {
        if let Some(e) = self.spilled.as_mut().and_then(|sp| sp.deferred.take()) {
            return Err(e);
        }
        let encodings = returned_points(batch, self.own.sent as u64, self.received)?;
        self.compare(encodings)?;
        Ok(self)
    }

    /// A spilled session whose store's files another process can read (a node's executors):
    /// the peer says it returned `total` points, checked as [`on_returned_end`] checks it, and
    /// the store is flushed. The buckets are then merged elsewhere, one
    /// [`merge_bucket`](super::spill::merge_bucket) per bucket, and
    /// [`AwaitingMerge::finish`] takes their answers. An in-memory session has no buckets.
    ///
    /// [`on_returned_end`]: Self::on_returned_end
    pub fn merged_elsewhere(mut self, total: u64) -> Result<AwaitingMerge, PsiError> {
        if self.spilled.is_none() {
            return Err(PsiError::Spill(
                "a session in memory has no buckets to merge elsewhere".into(),
            ));
        }
        let merge = self.spilled_end(total)?;
        store(&mut self.common)?.flush().map_err(spill_error)?;
        Ok(AwaitingMerge {
            matching: self,
            merge,
        })
    }

    /// A spilled session's end checks, and the merge it needs.
    fn spilled_end(&mut self, total: u64) -> Result<Merge, PsiError> {
        let sp = self
            .spilled
            .as_mut()
            .ok_or_else(|| PsiError::Spill("the session is not spilled".into()))?;
        if let Some(e) = sp.deferred.take() {
            return Err(e);
        }
        check_total(Stream::Returned, self.common.own_size, total, self.received)?;
        if !sp.sorted {
            return Err(PsiError::Spill(
                "counted before the peer's points were all re-blinded".into(),
            ));
        }
        Ok(if self.common.params.learn_membership {
            Merge::OurPlaces
        } else {
            Merge::Count
        })
    }

    /// The peer says it returned `total` points: that must equal our size and what arrived, and
    /// no point may have come back twice. Returns the result (a spilled session merges its
    /// buckets here, one at a time).
    pub fn on_returned_end(mut self, total: u64) -> Result<PsiOutput, PsiError> {
        if self.spilled.is_some() {
            let merge = self.spilled_end(total)?;
            let mut answers = Vec::with_capacity(BUCKETS);
            merge_buckets(store(&mut self.common)?, merge, |a| answers.push(a))?;
            return AwaitingMerge {
                matching: self,
                merge,
            }
            .finish(answers);
        }
        let own = self.common.own_size;
        check_total(Stream::Returned, own, total, self.received)?;
        let mut fingerprints = self.fingerprints;
        fingerprints.par_sort_unstable();
        if fingerprints.par_windows(2).any(|w| w[0] == w[1]) {
            return Err(PsiError::DuplicateReturnedPoint);
        }
        let membership = self.hits.map(|mut hits| {
            hits.par_sort_unstable();
            hits
        });
        Ok(PsiOutput {
            intersection: membership
                .as_ref()
                .map_or(self.count, |hits| hits.len() as u64),
            own_set_size: own,
            peer_set_size: self.peer_size,
            membership,
            spilled_bytes: 0,
            spilled_matches: None,
        })
    }
}

/// A spilled session whose every point is in, waiting for its buckets' merge
/// ([`Matching::merged_elsewhere`]).
pub struct AwaitingMerge {
    matching: Matching,
    merge: Merge,
}

impl std::fmt::Debug for AwaitingMerge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwaitingMerge")
            .field("merge", &self.merge)
            .field("matching", &self.matching)
            .finish()
    }
}

impl AwaitingMerge {
    /// Which merge each bucket needs.
    pub fn merge(&self) -> Merge {
        self.merge
    }

    /// The result, from every bucket's answer in bucket order: the count, or the places of
    /// our matched points and what they are (their tags, or the points). Answers that could
    /// not be one merge per bucket of this session are refused.
    pub fn finish(self, answers: Vec<BucketMatches>) -> Result<PsiOutput, PsiError> {
        let AwaitingMerge {
            mut matching,
            merge,
        } = self;
        let own = matching.common.own_size;
        let tagged = matching.common.tagged;
        let store = store(&mut matching.common)?;
        let (intersection, membership, spilled_matches) = match combine(merge, answers, own)? {
            MergeResult::Places(places) => {
                let matches = matches_at(store, &places, tagged)?;
                (places.len() as u64, Some(places), Some(matches))
            }
            MergeResult::Count(count) => (count, None, None),
        };
        Ok(PsiOutput {
            intersection,
            own_set_size: own,
            peer_set_size: matching.peer_size,
            membership,
            spilled_bytes: store.bytes_written(),
            spilled_matches,
        })
    }
}

/// At most `points` of the peer's stored points from `from` on (fewer at the end).
fn read_raw_piece(
    store: &mut dyn PointStore,
    from: u64,
    peer_size: u64,
    points: usize,
) -> Result<Vec<u8>, PsiError> {
    let raw = store
        .read_at(
            PointSet::PeerRaw,
            0,
            from * POINT_LEN as u64,
            points.max(1) * POINT_LEN,
        )
        .map_err(spill_error)?;
    if raw.is_empty() {
        return Err(PsiError::Spill(format!(
            "the peer's stored points end after {from} of {peer_size}"
        )));
    }
    Ok(raw)
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
