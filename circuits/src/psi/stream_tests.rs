//! The streaming exchange driven against itself under every interleaving a network allows, and
//! its rejections.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::{Matching, Streaming};
use crate::pair::{check_outputs, emails, modes, one_valid_point, params};
use crate::spill::{
    BUCKETS, ItemTag, MemoryStore, OwnSetBuilder, PointSet, PointStore, SpilledMatches, SpilledOwn,
    TagKey, bucket_cap, bucket_of, merge_bucket,
};
use crate::*;

/// What travels on one party's stream, in the order the wire allows: its own points and their
/// end marker, then what it returns and that end marker.
#[derive(Debug)]
enum Msg {
    Points(Vec<u8>),
    End(u64),
    Returned(Vec<u8>),
    ReturnedEnd(u64),
}

enum State {
    Streaming(Streaming),
    Matching(Matching),
    Done(PsiOutput),
}

/// One party and the driver rules of the module docs: returns are held until our own end
/// marker is out.
struct Party {
    state: Option<State>,
    own_size: u64,
    end_sent: bool,
    held: Vec<Msg>,
    /// A copy of the session's key when the peer's points are re-blinded off the session (as
    /// a node's executors do), and how many of them have been.
    elsewhere: Option<(JobKey, u64)>,
    /// Spilled pieces re-blinded off the session come back in the order they went out (a
    /// session that returns in order needs that); otherwise last first.
    pieces_in_order: bool,
    peer_size: u64,
    /// The session's store, when its buckets are merged outside the session (as a node's
    /// executors merge its bucket files).
    merged_outside: Option<SharedStore>,
}

impl Party {
    fn new(p: PsiParams, items: ItemSet, peer_size: u64) -> Result<Party, PsiError> {
        Party::with(PsiSession::start(p, JobKey::generate(), items), peer_size)
    }

    /// A party whose set is blinded as it is read, in chunks, and spilled to a store.
    fn spilled(p: PsiParams, items: ItemSet, peer_size: u64) -> Result<Party, PsiError> {
        let key = JobKey::generate();
        let own = spill_with(&key, &items);
        Party::with(PsiSession::start_spilled(p, key, own), peer_size)
    }

    /// [`new`](Self::new) or [`spilled`](Self::spilled), re-blinding the peer's points off the
    /// session: in memory as they come, spilled in pieces that come back in reverse order.
    fn elsewhere(
        p: PsiParams,
        items: ItemSet,
        peer_size: u64,
        spilled: bool,
    ) -> Result<Party, PsiError> {
        let key = JobKey::generate();
        let copy = copy_of(&key);
        let start = if spilled {
            let own = spill_with(&key, &items);
            PsiSession::start_spilled(p, key, own)
        } else {
            PsiSession::start(p, key, items)
        };
        let mut party = Party::with(start, peer_size)?;
        party.elsewhere = Some((copy, 0));
        Ok(party)
    }

    fn with(
        (own_size, s): (u64, crate::AwaitingPeerSize),
        peer_size: u64,
    ) -> Result<Party, PsiError> {
        Ok(Party {
            state: Some(State::Streaming(s.on_peer_size(peer_size)?.stream())),
            own_size,
            end_sent: false,
            held: Vec::new(),
            elsewhere: None,
            pieces_in_order: false,
            peer_size,
            merged_outside: None,
        })
    }

    /// The peer's batch re-blinded off the session, if this party does that in memory; what
    /// to return, in batches.
    fn reblind_elsewhere(
        &mut self,
        s: Streaming,
        batch: &[u8],
    ) -> Result<(Streaming, Vec<Vec<u8>>), PsiError> {
        match &mut self.elsewhere {
            Some((key, taken)) if !s.reblinds_after_peer_end() => {
                let points = check_peer_batch(self.peer_size, *taken, batch)?;
                let reblinded = reblind_points(key, batch).map_err(|e| e.at_offset(*taken))?;
                *taken += points;
                s.on_peer_reblinded(&reblinded)
            }
            _ => s
                .on_peer_batch(batch)
                .map(|(s, out)| (s, out.into_iter().collect())),
        }
    }

    /// A spilled session's stored points, re-blinded off the session in pieces of 5 that come
    /// back last first.
    fn reblind_pieces_elsewhere(&self, m: &mut Matching) -> Result<(), PsiError> {
        let Some((key, _)) = &self.elsewhere else {
            return Ok(());
        };
        let mut pieces = Vec::new();
        while let Some(piece) = m.take_reblind_piece(5)? {
            pieces.push(piece);
        }
        if !self.pieces_in_order {
            pieces.reverse();
        }
        for (offset, raw) in pieces {
            let reblinded = reblind_points(key, &raw).map_err(|e| e.at_offset(offset))?;
            m.on_reblinded_piece(&reblinded)?;
        }
        Ok(())
    }

    fn own_done(&self) -> bool {
        self.end_sent
    }

    /// Blinds and sends our next batch, and our end marker after the last one (then what we
    /// held back).
    fn blind(&mut self, out: &mut VecDeque<Msg>) {
        let batch = match self.state.as_mut() {
            Some(State::Streaming(s)) => s.blind_next().unwrap(),
            Some(State::Matching(m)) => m.blind_next().unwrap(),
            _ => None,
        };
        out.extend(batch.map(Msg::Points));
        let done = match self.state.as_ref() {
            Some(State::Streaming(s)) => s.own_done(),
            Some(State::Matching(m)) => m.own_done(),
            _ => true,
        };
        if done && !self.end_sent {
            self.end_sent = true;
            out.push_back(Msg::End(self.own_size));
            out.extend(self.held.drain(..));
        }
    }

    fn send_return(&mut self, msg: Msg, out: &mut VecDeque<Msg>) {
        if self.end_sent {
            out.push_back(msg);
        } else {
            self.held.push(msg);
        }
    }

    /// Handles one message from the peer.
    fn receive(&mut self, msg: Msg, out: &mut VecDeque<Msg>) -> Result<(), PsiError> {
        let state = self.state.take().expect("a state");
        self.state = Some(match (state, msg) {
            (State::Streaming(s), Msg::Points(b)) => {
                let (s, replies) = self.reblind_elsewhere(s, &b)?;
                for r in replies {
                    self.send_return(Msg::Returned(r), out);
                }
                State::Streaming(s)
            }
            (State::Streaming(s), Msg::End(total)) => {
                let mut m = s.on_peer_end(total)?;
                self.reblind_pieces_elsewhere(&mut m)?;
                while m.reblind_pending() {
                    m.reblind_next(5)?;
                }
                while let Some(r) = m.next_return() {
                    self.send_return(Msg::Returned(r), out);
                }
                self.send_return(Msg::ReturnedEnd(total), out);
                State::Matching(m)
            }
            (State::Matching(m), Msg::Returned(b)) => State::Matching(m.on_returned_batch(&b)?),
            (State::Matching(m), Msg::ReturnedEnd(total)) => {
                assert!(m.own_done(), "all returned before we sent all");
                match &self.merged_outside {
                    Some(store) => {
                        let waiting = m.merged_elsewhere(total)?;
                        let merge = waiting.merge();
                        let (first, second) = merge.sets();
                        let answers = (0..BUCKETS)
                            .map(|b| {
                                let (mut x, mut y) =
                                    (store.outside(first, b), store.outside(second, b));
                                merge_bucket(merge, &mut x, &mut y)
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        State::Done(waiting.finish(answers)?)
                    }
                    None => State::Done(m.on_returned_end(total)?),
                }
            }
            (_, msg) => panic!("the wire order was broken: {msg:?}"),
        });
        Ok(())
    }

    fn output(self) -> Option<PsiOutput> {
        match self.state {
            Some(State::Done(o)) => Some(o),
            _ => None,
        }
    }
}

/// Drives A and B to completion; `schedule` picks, step by step, which party acts and whether
/// it blinds or reads (so every interleaving of computing and arriving is reachable).
fn run_stream_pair(
    pa: PsiParams,
    pb: PsiParams,
    a: ItemSet,
    b: ItemSet,
    schedule: impl FnMut() -> u8,
) -> Result<(PsiOutput, PsiOutput), PsiError> {
    let (na, nb) = (a.len() as u64, b.len() as u64);
    let parties = [Party::new(pa, a, nb)?, Party::new(pb, b, na)?];
    drive(parties, schedule)
}

/// Drives two parties built by the caller to completion (see [`run_stream_pair`]).
fn drive(
    mut parties: [Party; 2],
    mut schedule: impl FnMut() -> u8,
) -> Result<(PsiOutput, PsiOutput), PsiError> {
    // wires[i]: what party i sent, not yet read by the other.
    let mut wires: [VecDeque<Msg>; 2] = [VecDeque::new(), VecDeque::new()];
    loop {
        let done = |p: &Party| matches!(p.state, Some(State::Done(_)));
        if done(&parties[0]) && done(&parties[1]) {
            break;
        }
        let pick = schedule();
        let me = usize::from(pick & 1);
        let peer = 1 - me;
        let can_blind = !parties[me].own_done();
        let can_read = !wires[peer].is_empty();
        let [w0, w1] = &mut wires;
        let (inbox, outbox) = if me == 0 { (w1, w0) } else { (w0, w1) };
        if can_blind && (pick & 2 == 0 || !can_read) {
            parties[me].blind(outbox);
        } else if can_read {
            let msg = inbox.pop_front().expect("a message");
            parties[me].receive(msg, outbox)?;
        } else if !parties[peer].own_done() || !wires[me].is_empty() {
            // This party waits; the other one has something to do.
            continue;
        } else {
            panic!("deadlock");
        }
    }
    let [a, b] = parties;
    Ok((a.output().expect("A done"), b.output().expect("B done")))
}

/// Our set as [`OwnSetBuilder`] makes it while a dataset is read: blinded in chunks with the
/// session's key, spilled to a store in memory.
fn spill_with(key: &JobKey, items: &ItemSet) -> SpilledOwn {
    let mut builder = OwnSetBuilder::new(Box::new(MemoryStore::default()));
    let all: Vec<&[u8]> = items.iter().collect();
    for chunk in all.chunks(17) {
        builder
            .add(key, "email", &chunk.iter().copied().collect())
            .unwrap();
    }
    builder.finish().unwrap()
}

/// A store that something outside the session reads too (as a node's executors read its bucket
/// files). Like a file behind a write buffer, what is appended shows outside only once flushed;
/// the session itself reads its own appends.
#[derive(Debug, Clone, Default)]
struct SharedStore(Arc<Mutex<SharedBuckets>>);

#[derive(Debug, Default)]
struct SharedBuckets {
    visible: MemoryStore,
    buffered: Vec<(PointSet, usize, Vec<u8>)>,
}

impl SharedBuckets {
    fn flush(&mut self) -> std::io::Result<()> {
        for (set, b, bytes) in std::mem::take(&mut self.buffered) {
            self.visible.append(set, b, &bytes)?;
        }
        Ok(())
    }
}

impl SharedStore {
    /// A bucket as the outside reads it.
    fn outside(&self, set: PointSet, bucket: usize) -> Vec<u8> {
        self.0.lock().unwrap().visible.read(set, bucket).unwrap()
    }
}

impl PointStore for SharedStore {
    fn append(&mut self, set: PointSet, bucket: usize, points: &[u8]) -> std::io::Result<()> {
        let mut b = self.0.lock().unwrap();
        b.buffered.push((set, bucket, points.to_vec()));
        Ok(())
    }

    fn read(&mut self, set: PointSet, bucket: usize) -> std::io::Result<Vec<u8>> {
        let mut b = self.0.lock().unwrap();
        b.flush()?;
        b.visible.read(set, bucket)
    }

    fn read_at(
        &mut self,
        set: PointSet,
        bucket: usize,
        offset: u64,
        len: usize,
    ) -> std::io::Result<Vec<u8>> {
        let mut b = self.0.lock().unwrap();
        b.flush()?;
        b.visible.read_at(set, bucket, offset, len)
    }

    fn put(&mut self, set: PointSet, bucket: usize, points: &[u8]) -> std::io::Result<()> {
        let mut b = self.0.lock().unwrap();
        b.flush()?;
        b.visible.put(set, bucket, points)
    }

    fn bytes_written(&self) -> u64 {
        let b = self.0.lock().unwrap();
        b.visible.bytes_written()
            + b.buffered
                .iter()
                .map(|(_, _, p)| p.len() as u64)
                .sum::<u64>()
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap().flush()
    }
}

/// A small xorshift generator for schedules.
fn schedule_from(seed: u64) -> impl FnMut() -> u8 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    }
}

#[allow(clippy::too_many_arguments)]
fn check_stream_pair(
    rio_a: bool,
    lm_a: bool,
    rio_b: bool,
    lm_b: bool,
    a: ItemSet,
    b: ItemSet,
    bs: usize,
    seed: u64,
) {
    let out = run_stream_pair(
        params(rio_a, lm_a, bs),
        params(rio_b, lm_b, bs),
        a.clone(),
        b.clone(),
        schedule_from(seed),
    )
    .unwrap();
    check_outputs((&a, &b), (lm_a, lm_b), out);
}

#[test]
fn streaming_equals_plaintext_intersection_in_every_mode() {
    for seed in 0..6 {
        for (rio_a, lm_a, rio_b, lm_b) in modes() {
            let (a, b) = (emails(0..40), emails(25..90));
            check_stream_pair(rio_a, lm_a, rio_b, lm_b, a, b, 7, seed);
        }
    }
}

#[test]
fn streaming_edge_sets_and_batch_sizes() {
    let e = || emails(0..0);
    check_stream_pair(true, true, true, true, e(), e(), 4, 1);
    check_stream_pair(true, true, true, true, e(), emails(0..5), 4, 2);
    check_stream_pair(false, false, false, false, emails(0..5), emails(0..5), 4, 3);
    check_stream_pair(true, true, true, true, emails(0..5), emails(5..9), 1, 4);
    check_stream_pair(
        false,
        true,
        true,
        false,
        emails(0..20),
        emails(10..30),
        usize::MAX,
        5,
    );
    check_stream_pair(
        true,
        false,
        false,
        true,
        emails(0..20),
        emails(10..30),
        0,
        6,
    );
    // Crosses the 1024-point rayon chunk inside a batch.
    check_stream_pair(
        true,
        true,
        true,
        true,
        emails(0..1500),
        emails(1000..1300),
        1500,
        7,
    );
}

/// The points on the wire are the points [`ReadyToBlind::blind`] would send: every item's
/// `k·H(x)` exactly once.
#[test]
fn the_stream_carries_each_blinded_item_once() {
    let items = emails(0..300);
    let (_, s) = PsiSession::start(params(false, false, 64), JobKey::generate(), items.clone());
    let mut s = s.on_peer_size(1).unwrap().stream();
    let expected = blind_items(&s.common.key, "email", &items);
    let mut sent = Vec::new();
    let mut sizes = Vec::new();
    while let Some(batch) = s.blind_next().unwrap() {
        sizes.push(batch.len() / POINT_LEN);
        let (points, rest) = batch.as_chunks::<POINT_LEN>();
        assert!(rest.is_empty());
        sent.extend_from_slice(points);
    }
    assert_eq!(sizes, [64, 64, 64, 64, 44]);
    assert!(s.own_done() && s.blind_next().unwrap().is_none());
    assert_ne!(sent, expected, "the stream is not in set order");
    sent.sort_unstable();
    let mut expected = expected;
    expected.sort_unstable();
    assert_eq!(sent, expected);
}

/// The send order is a uniform permutation: over many sessions every item lands in every
/// position about equally often (the bounds fail with probability far below 10⁻⁶).
#[test]
fn the_send_order_is_uniform() {
    const ITEMS: usize = 4;
    const RUNS: usize = 800;
    let items = emails(0..ITEMS as u32);
    let mut counts = [[0usize; ITEMS]; ITEMS];
    for _ in 0..RUNS {
        let (_, s) = PsiSession::start(params(false, false, 1), JobKey::generate(), items.clone());
        let mut s = s.on_peer_size(1).unwrap().stream();
        let blinded = blind_items(&s.common.key, "email", &items);
        let mut position = 0;
        while let Some(batch) = s.blind_next().unwrap() {
            let item = blinded.iter().position(|p| p[..] == batch[..]).unwrap();
            counts[item][position] += 1;
            position += 1;
        }
    }
    // Expected 200 each; sd ≈ 12.2; ±90 is over 7 sd.
    for row in counts {
        for c in row {
            assert!((110..=290).contains(&c), "{counts:?}");
        }
    }
}

/// A shuffled return carries each of the peer's re-blinded points once, and every point lands
/// in every position about equally often.
#[test]
fn the_shuffled_return_is_uniform() {
    const ITEMS: usize = 4;
    const RUNS: usize = 800;
    let peer = emails(0..ITEMS as u32);
    let peer_key = JobKey::generate();
    let from_peer = blind_items(&peer_key, "email", &peer);
    let mut counts = [[0usize; ITEMS]; ITEMS];
    for _ in 0..RUNS {
        let s = streaming(params(false, false, 1), emails(0..1), ITEMS as u64, 1);
        let expected = reblind_points(&s.common.key, from_peer.as_flattened()).unwrap();
        let (s, reply) = s.on_peer_batch(from_peer.as_flattened()).unwrap();
        assert!(reply.is_none());
        let mut m = s.on_peer_end(ITEMS as u64).unwrap();
        let mut position = 0;
        while let Some(batch) = m.next_return() {
            let item = expected.iter().position(|p| p[..] == batch[..]).unwrap();
            counts[item][position] += 1;
            position += 1;
        }
        assert_eq!(position, ITEMS);
    }
    for row in counts {
        for c in row {
            assert!((110..=290).contains(&c), "{counts:?}");
        }
    }
    // In order: nothing comes out of next_return (the replies went out batch by batch).
    let s = streaming(params(true, false, 2), emails(0..1), 2, 1);
    let (s, reply) = s.on_peer_batch(from_peer[..2].as_flattened()).unwrap();
    assert_eq!(reply.map(|r| r.len()), Some(64));
    assert!(s.on_peer_end(2).unwrap().next_return().is_none());
}

/// The identifiers are dropped with the last batch, and the order too unless we learn
/// membership.
#[test]
fn identifiers_leave_memory_with_the_last_batch() {
    for learn in [false, true] {
        let (_, s) = PsiSession::start(params(true, learn, 8), JobKey::generate(), emails(0..20));
        let mut s = s.on_peer_size(1).unwrap().stream();
        while s.own.sent < 16 {
            s.blind_next().unwrap();
        }
        assert_eq!(s.own.items.len(), 20);
        s.blind_next().unwrap();
        assert_eq!(s.own.items.len(), 0);
        assert_eq!(s.own.order.len(), if learn { 20 } else { 0 });
    }
}

/// A streaming session that has received nothing yet, after `sent` of our points went out.
fn streaming(p: PsiParams, items: ItemSet, peer_size: u64, sent: u64) -> Streaming {
    let (_, s) = PsiSession::start(p, JobKey::generate(), items);
    let mut s = s.on_peer_size(peer_size).unwrap().stream();
    while s.own_sent() < sent {
        s.blind_next().unwrap();
    }
    s
}

#[test]
fn streaming_rejects_peer_misbehaviour() {
    let p = params(true, true, 4);
    let good = one_valid_point();
    let s = || streaming(p.clone(), emails(0..3), 2, 0);
    assert_eq!(
        s().on_peer_batch(&[1u8; 33]).unwrap_err(),
        PsiError::BatchNotMultipleOfPointLen { len: 33 }
    );
    let (e, _) = streaming(p.clone(), emails(0..3), 5, 0)
        .on_peer_batch(&good)
        .unwrap();
    assert_eq!(
        e.on_peer_batch(&[good, [0xff; 32]].concat()).unwrap_err(),
        PsiError::InvalidPoint { index: 2 }
    );
    let (e, _) = s().on_peer_batch(&good).unwrap();
    assert_eq!(
        e.on_peer_batch(&[good; 2].concat()).unwrap_err(),
        PsiError::TooManyPoints {
            declared: 2,
            received: 3
        }
    );
    let (e, _) = s().on_peer_batch(&good).unwrap();
    assert_eq!(
        e.on_peer_end(2).unwrap_err(),
        PsiError::TotalMismatch {
            declared: 2,
            announced: 2,
            received: 1
        }
    );
    let (e, _) = s().on_peer_batch(&[good; 2].concat()).unwrap();
    assert_eq!(e.on_peer_end(2).unwrap_err(), PsiError::DuplicatePeerPoint);
}

#[test]
fn matching_rejects_bad_returns() {
    let p = params(true, true, 2);
    let good = one_valid_point();
    // We sent `sent` of our 3 points; the peer's one point is in.
    let ready = |sent| {
        let (e, _) = streaming(p.clone(), emails(0..3), 1, sent)
            .on_peer_batch(&good)
            .unwrap();
        e.on_peer_end(1).unwrap()
    };
    assert_eq!(
        ready(3).on_returned_batch(&[0u8; 33]).unwrap_err(),
        PsiError::BatchNotMultipleOfPointLen { len: 33 }
    );
    assert_eq!(
        ready(3).on_returned_batch(&[good; 4].concat()).unwrap_err(),
        PsiError::TooManyReturnedPoints {
            own: 3,
            received: 4
        }
    );
    // Nothing comes back before we sent it.
    assert_eq!(
        ready(0).on_returned_batch(&good).unwrap_err(),
        PsiError::TooManyReturnedPoints {
            own: 0,
            received: 1
        }
    );
    let r = ready(2).on_returned_batch(&[good; 2].concat()).unwrap();
    assert_eq!(
        r.on_returned_batch(&good).unwrap_err(),
        PsiError::TooManyReturnedPoints {
            own: 2,
            received: 3
        }
    );
    let r = ready(3).on_returned_batch(&[good; 2].concat()).unwrap();
    assert_eq!(
        r.on_returned_end(3).unwrap_err(),
        PsiError::ReturnedTotalMismatch {
            own: 3,
            announced: 3,
            received: 2
        }
    );
    // The same point twice, whether or not it matches.
    let r = ready(3).on_returned_batch(&[good; 2].concat()).unwrap();
    let r = r.on_returned_batch(&[7u8; 32]).unwrap();
    assert_eq!(
        r.on_returned_end(3).unwrap_err(),
        PsiError::DuplicateReturnedPoint
    );
    let r = ready(3)
        .on_returned_batch(&[[1u8; 32], [2; 32], [3; 32]].concat())
        .unwrap();
    assert_eq!(
        r.on_returned_end(2).unwrap_err(),
        PsiError::ReturnedTotalMismatch {
            own: 3,
            announced: 2,
            received: 3
        }
    );
    let r = ready(3)
        .on_returned_batch(&[[1u8; 32], [2; 32], [3; 32]].concat())
        .unwrap();
    assert_eq!(r.on_returned_end(3).unwrap().intersection, 0);
}

/// A matched point returned twice would count one item twice: refused.
#[test]
fn a_matched_point_returned_twice_is_refused() {
    let p = params(true, false, 4);
    // The same two items on both sides; B returns A's points in order.
    let (_, a) = PsiSession::start(p.clone(), JobKey::generate(), emails(0..2));
    let (_, b) = PsiSession::start(p.clone(), JobKey::generate(), emails(0..2));
    let mut a = a.on_peer_size(2).unwrap().stream();
    let mut b = b.on_peer_size(2).unwrap().stream();
    let from_a = a.blind_next().unwrap().unwrap();
    let from_b = b.blind_next().unwrap().unwrap();
    let (a, _) = a.on_peer_batch(&from_b).unwrap();
    let (_, back) = b.on_peer_batch(&from_a).unwrap();
    let back = back.unwrap();
    let a = a.on_peer_end(2).unwrap();
    let first = &back[..POINT_LEN];
    let a = a.on_returned_batch(&[first, first].concat()).unwrap();
    assert_eq!(
        a.on_returned_end(2).unwrap_err(),
        PsiError::DuplicateReturnedPoint
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn streaming_psi_equals_plaintext_intersection(
        a in prop::collection::vec(prop::collection::vec(0u8..4, 0..3), 0..40),
        b in prop::collection::vec(prop::collection::vec(0u8..4, 0..3), 0..40),
        shared in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..8), 0..24),
        rio_a: bool,
        rio_b: bool,
        bs in 1usize..9,
        seed: u64,
    ) {
        let mut sa: ItemSet = a.iter().chain(&shared).map(Vec::as_slice).collect();
        let mut sb: ItemSet = b.iter().chain(&shared).map(Vec::as_slice).collect();
        sa.dedup();
        sb.dedup();
        check_stream_pair(rio_a, rio_b, rio_b, rio_a, sa, sb, bs, seed);
    }
}

/// Spilled sessions count what in-memory ones count, against each other and against an
/// in-memory peer (the wire is the same), under many interleavings and batch sizes.
#[test]
fn spilled_sessions_count_like_in_memory_ones() {
    for seed in 0..4 {
        for (spill_a, spill_b) in [(true, true), (true, false), (false, true)] {
            for bs in [1, 7, 4096] {
                let (a, b) = (emails(0..300), emails(200..700));
                let party = |spilled: bool, items: &ItemSet, peer: u64| {
                    let p = params(false, false, bs);
                    if spilled {
                        Party::spilled(p, items.clone(), peer).unwrap()
                    } else {
                        Party::new(p, items.clone(), peer).unwrap()
                    }
                };
                let parties = [party(spill_a, &a, 500), party(spill_b, &b, 300)];
                let out = drive(parties, schedule_from(seed)).unwrap();
                assert_eq!(out_count(&out), 100);
                check_outputs((&a, &b), (false, false), out);
            }
        }
    }
}

/// The peer's points re-blinded off the session (a node's executors) give what re-blinding
/// them in it gives, in memory in every mode and spilled, against either kind of peer.
#[test]
fn reblinding_off_the_session_gives_the_same_results() {
    for seed in 0..3 {
        for (rio_a, lm_a, rio_b, lm_b) in modes() {
            let (a, b) = (emails(0..40), emails(25..90));
            let parties = [
                Party::elsewhere(params(rio_a, lm_a, 7), a.clone(), 65, false).unwrap(),
                Party::new(params(rio_b, lm_b, 7), b.clone(), 40).unwrap(),
            ];
            let out = drive(parties, schedule_from(seed)).unwrap();
            check_outputs((&a, &b), (lm_a, lm_b), out);
        }
        for spill_b in [false, true] {
            let (a, b) = (emails(0..300), emails(200..700));
            let p = || params(false, false, 7);
            let b_party = if spill_b {
                Party::elsewhere(p(), b.clone(), 300, true).unwrap()
            } else {
                Party::new(p(), b.clone(), 300).unwrap()
            };
            let parties = [
                Party::elsewhere(p(), a.clone(), 500, true).unwrap(),
                b_party,
            ];
            let out = drive(parties, schedule_from(seed)).unwrap();
            assert_eq!(out_count(&out), 100);
            check_outputs((&a, &b), (false, false), out);
        }
    }
}

/// Our set as [`OwnSetBuilder::with_tags`] makes it, and the key of its tags.
fn spill_tagged(key: &JobKey, items: &ItemSet) -> (SpilledOwn, TagKey) {
    let mut builder =
        OwnSetBuilder::with_tags(Box::new(MemoryStore::default()), TagKey::generate());
    let all: Vec<&[u8]> = items.iter().collect();
    for chunk in all.chunks(17) {
        builder
            .add(key, "email", &chunk.iter().copied().collect())
            .unwrap();
    }
    let mut own = builder.finish().unwrap();
    let tags = own.take_tag_key().unwrap();
    assert!(
        own.take_tag_key().is_none(),
        "the tag key is handed out once"
    );
    (own, tags)
}

/// A spilled party over `items`, with tags or without (as a set blinded on the executors),
/// and what reading its output needs: a copy of its key and its tag key.
fn spilled_party(
    p: PsiParams,
    items: &ItemSet,
    peer_size: u64,
    (tagged, elsewhere): (bool, bool),
) -> (Party, JobKey, Option<TagKey>) {
    let key = JobKey::generate();
    let copy = copy_of(&key);
    let (own, tags) = if tagged {
        let (own, tags) = spill_tagged(&key, items);
        (own, Some(tags))
    } else {
        (spill_with(&key, items), None)
    };
    let in_order = p.return_in_order;
    let mut party = Party::with(PsiSession::start_spilled(p, key, own), peer_size).unwrap();
    if elsewhere {
        party.elsewhere = Some((copy_of(&copy), 0));
        party.pieces_in_order = in_order;
    }
    (party, copy, tags)
}

/// A spilled output as an in-memory one reads: its places in the order the set went out as
/// indices into `items`. What it matched must be the tags (or, without tags, the points) of
/// the matched items.
fn read_spilled(
    mut out: PsiOutput,
    key: &JobKey,
    tags: Option<&TagKey>,
    items: &ItemSet,
) -> PsiOutput {
    let points = blind_items(key, "email", items);
    // The order a spilled set goes out in: bucket by bucket, each sorted.
    let mut sent = points.clone();
    sent.sort_unstable_by_key(|p| (bucket_of(p), *p));
    out.membership = to_item_indices(out.membership, &sent, "email", key, items);
    let expected = out.membership.as_ref().map(|m| match tags {
        Some(tags) => {
            let mut t: Vec<ItemTag> = m
                .iter()
                .map(|&i| tags.tag(items.get(i as usize).unwrap()))
                .collect();
            t.sort_unstable();
            SpilledMatches::Tags(t)
        }
        None => {
            let mut p: Vec<EncodedPoint> = m.iter().map(|&i| points[i as usize]).collect();
            p.sort_unstable();
            SpilledMatches::Points(p)
        }
    });
    assert_eq!(out.spilled_matches, expected);
    out.spilled_matches = None;
    out
}

/// Spilled sessions learn and give membership as in-memory ones do, in every mode, against
/// either kind of peer, with tags or without, re-blinding in the session or off it (pieces
/// back in order when the session returns in order, last first otherwise).
#[test]
fn spilled_sessions_learn_membership_like_in_memory_ones() {
    for seed in 0..3 {
        for (rio_a, lm_a, rio_b, lm_b) in modes() {
            for (elsewhere, spill_b, bs) in
                [(false, false, 7), (true, true, 1), (false, true, 4096)]
            {
                let (a, b) = (emails(0..300), emails(200..700));
                // Tags on every other seed, for A; B has them when A has not.
                let tagged = seed % 2 == 0;
                let pa = params(rio_a, lm_a, bs);
                let (pa, ka, ta) = spilled_party(pa, &a, 500, (tagged, elsewhere));
                let pb = params(rio_b, lm_b, bs);
                let (pb, kb) = if spill_b {
                    let (party, key, tags) = spilled_party(pb, &b, 300, (!tagged, !elsewhere));
                    (party, Some((key, tags)))
                } else {
                    (Party::new(pb, b.clone(), 300).unwrap(), None)
                };
                let (oa, ob) = drive([pa, pb], schedule_from(seed)).unwrap();
                let oa = read_spilled(oa, &ka, ta.as_ref(), &a);
                let ob = match &kb {
                    Some((key, tags)) => read_spilled(ob, key, tags.as_ref(), &b),
                    None => ob,
                };
                assert_eq!(oa.intersection, 100);
                check_outputs((&a, &b), (lm_a, lm_b), (oa, ob));
            }
        }
    }
}

/// A spilled session whose buckets are merged outside it, one bucket at a time from what it
/// flushed, counts and learns membership as one that merges them itself, in every mode and
/// against either kind of peer.
#[test]
fn buckets_merged_outside_the_session_give_what_merging_them_inside_gives() {
    for seed in 0..3 {
        for (rio_a, lm_a, rio_b, lm_b) in modes() {
            for (spill_b, bs) in [(false, 7), (true, 4096)] {
                let (a, b) = (emails(0..300), emails(200..700));
                let key = JobKey::generate();
                let copy = copy_of(&key);
                let store = SharedStore::default();
                let mut builder = OwnSetBuilder::new(Box::new(store.clone()));
                let all: Vec<&[u8]> = a.iter().collect();
                for chunk in all.chunks(17) {
                    builder
                        .add(&key, "email", &chunk.iter().copied().collect())
                        .unwrap();
                }
                let own = builder.finish().unwrap();
                let pa = params(rio_a, lm_a, bs);
                let mut party_a =
                    Party::with(PsiSession::start_spilled(pa, key, own), 500).unwrap();
                party_a.merged_outside = Some(store);
                let pb = params(rio_b, lm_b, bs);
                let (party_b, kb) = if spill_b {
                    let (party, key, tags) = spilled_party(pb, &b, 300, (false, false));
                    (party, Some((key, tags)))
                } else {
                    (Party::new(pb, b.clone(), 300).unwrap(), None)
                };
                let (oa, ob) = drive([party_a, party_b], schedule_from(seed)).unwrap();
                let oa = read_spilled(oa, &copy, None, &a);
                let ob = match &kb {
                    Some((key, tags)) => read_spilled(ob, key, tags.as_ref(), &b),
                    None => ob,
                };
                assert_eq!(oa.intersection, 100);
                check_outputs((&a, &b), (lm_a, lm_b), (oa, ob));
            }
        }
    }
}

/// What comes back from off the session is checked like what is re-blinded in it.
#[test]
fn points_reblinded_off_the_session_are_checked() {
    let good = one_valid_point();
    // In memory: not past the declared size, and never into a spilled session.
    let s = streaming(params(false, false, 4), emails(0..3), 2, 0);
    assert!(!s.reblinds_after_peer_end());
    assert_eq!(
        s.on_peer_reblinded(&[good; 3]).unwrap_err(),
        PsiError::TooManyPoints {
            declared: 2,
            received: 3
        }
    );
    assert_eq!(
        check_peer_batch(2, 1, &[good; 2].concat()).unwrap_err(),
        PsiError::TooManyPoints {
            declared: 2,
            received: 3
        }
    );
    assert_eq!(
        check_peer_batch(2, 0, &[0u8; 33]).unwrap_err(),
        PsiError::BatchNotMultipleOfPointLen { len: 33 }
    );
    let spilled = |peer: u64| {
        let key = JobKey::generate();
        let own = spill_with(&key, &emails(0..3));
        let (_, s) = PsiSession::start_spilled(params(false, false, 4), key, own);
        s.on_peer_size(peer).unwrap().stream()
    };
    // Returned in order: in batches of at most `batch_size`, however many come back at once.
    let good9: Vec<EncodedPoint> = (0..9u8)
        .map(|i| hash_to_group("email", &[i]).compress().to_bytes())
        .collect();
    let s = streaming(params(true, false, 4), emails(0..3), 9, 0);
    let (_, out) = s.on_peer_reblinded(&good9).unwrap();
    let sizes: Vec<usize> = out.iter().map(|b| b.len() / POINT_LEN).collect();
    assert_eq!(sizes, [4, 4, 1]);
    assert_eq!(out.concat(), good9.as_flattened());
    let s = spilled(3);
    assert!(s.reblinds_after_peer_end());
    assert!(matches!(
        s.on_peer_reblinded(&[good]),
        Err(PsiError::Spill(_))
    ));
    // Spilled: pieces cover the stored points once; no more may come back than went out, and
    // the session does not re-blind or count while a piece is out.
    let (s, _) = spilled(3).on_peer_batch(&[good; 3].concat()).unwrap();
    let mut m = s.on_peer_end(3).unwrap();
    assert!(m.reblind_pieces_left());
    let (offset, raw) = m.take_reblind_piece(2).unwrap().unwrap();
    assert_eq!((offset, raw.len()), (0, 64));
    assert!(!m.reblind_pieces_back());
    assert!(matches!(m.reblind_next(4), Err(PsiError::Spill(_))));
    assert!(matches!(
        m.on_reblinded_piece(&[good; 3]),
        Err(PsiError::Spill(_))
    ));
    let (offset, raw) = m.take_reblind_piece(2).unwrap().unwrap();
    assert_eq!((offset, raw.len()), (2, 32));
    assert!(!m.reblind_pieces_left());
    assert_eq!(m.take_reblind_piece(2).unwrap(), None);
    // A point that is not one is named by its place in the peer's stream.
    assert_eq!(
        reblind_points(&JobKey::generate(), &[good, [0xff; 32]].concat())
            .unwrap_err()
            .at_offset(5),
        PsiError::InvalidPoint { index: 6 }
    );
}

fn out_count(out: &(PsiOutput, PsiOutput)) -> u64 {
    assert_eq!(out.0.intersection, out.1.intersection);
    out.0.intersection
}

#[test]
fn a_spilled_set_is_deduplicated_and_goes_out_sorted() {
    let key = JobKey::generate();
    let items = emails(0..500);
    let mut builder = OwnSetBuilder::new(Box::new(MemoryStore::default()));
    builder.add(&key, "email", &items).unwrap();
    builder.add(&key, "email", &emails(100..200)).unwrap();
    let own = builder.finish().unwrap();
    assert_eq!((own.size(), own.duplicates()), (500, 100));
    let expected = blind_items(&key, "email", &items);
    let (n, s) = PsiSession::start_spilled(params(false, false, 64), key, own);
    assert_eq!(n, 500);
    let mut s = s.on_peer_size(1).unwrap().stream();
    let mut sent = Vec::new();
    while let Some(batch) = s.blind_next().unwrap() {
        sent.extend_from_slice(batch.as_chunks::<32>().0);
    }
    // Bucket by bucket, each sorted: sorted by (bucket, encoding).
    let key_of = |p: &[u8; 32]| (bucket_of(p), *p);
    assert!(sent.windows(2).all(|w| key_of(&w[0]) < key_of(&w[1])));
    let mut expected = expected;
    expected.sort_by_key(key_of);
    assert_eq!(sent, expected);
}

#[test]
fn a_spilled_session_refuses_duplicate_peer_points() {
    let key = JobKey::generate();
    let own = spill_with(&key, &emails(0..3));
    let (_, s) = PsiSession::start_spilled(params(false, false, 4), key, own);
    let s = s.on_peer_size(2).unwrap().stream();
    let good = one_valid_point();
    let (s, reply) = s.on_peer_batch(&[good; 2].concat()).unwrap();
    assert!(reply.is_none());
    // Stored as it came; found once re-blinded and sorted, before anything is returned.
    let mut m = s.on_peer_end(2).unwrap();
    assert!(m.reblind_pending() && m.next_return().is_none());
    let err = loop {
        if let Err(e) = m.reblind_next(64) {
            break e;
        }
        assert!(m.reblind_pending(), "the duplicate went unnoticed");
    };
    assert_eq!(err, PsiError::DuplicatePeerPoint);
}

/// A peer that returns the same point over and over fills one bucket: cut off at the cap, not
/// held until the end.
#[test]
fn a_spilled_session_cuts_off_returns_piled_into_one_bucket() {
    let n = 4200u32;
    let key = JobKey::generate();
    let own = spill_with(&key, &emails(0..n));
    let (_, s) = PsiSession::start_spilled(params(false, false, 8192), key, own);
    let mut s = s.on_peer_size(1).unwrap().stream();
    while s.blind_next().unwrap().is_some() {}
    let (s, _) = s.on_peer_batch(&one_valid_point()).unwrap();
    let mut m = s.on_peer_end(1).unwrap();
    // One piece re-blinds the point; then one piece per bucket sorts.
    let mut pieces = 0;
    while m.reblind_pending() {
        m.reblind_next(64).unwrap();
        pieces += 1;
    }
    assert_eq!(pieces, 1 + crate::spill::BUCKETS);
    let piled = vec![one_valid_point(); n as usize].concat();
    assert_eq!(
        m.on_returned_batch(&piled).unwrap_err(),
        PsiError::UnevenPoints {
            what: "returned points",
            cap: bucket_cap(u64::from(n))
        }
    );
}

/// A spilled session stores the peer's points as they come and checks them when it re-blinds
/// them, naming the index in the peer's stream; more points than declared are refused at once.
#[test]
fn a_spilled_session_checks_the_peers_points_when_it_reblinds_them() {
    let start = |peer: u64| {
        let key = JobKey::generate();
        let own = spill_with(&key, &emails(0..3));
        let (_, s) = PsiSession::start_spilled(params(false, false, 4), key, own);
        s.on_peer_size(peer).unwrap().stream()
    };
    let good = one_valid_point();
    let (s, _) = start(3)
        .on_peer_batch(&[good, [0xff; 32]].concat())
        .unwrap();
    let (s, _) = s.on_peer_batch(&good).unwrap();
    let mut m = s.on_peer_end(3).unwrap();
    m.reblind_next(1).unwrap();
    assert_eq!(
        m.reblind_next(1).unwrap_err(),
        PsiError::InvalidPoint { index: 1 }
    );
    let (s, _) = start(3).on_peer_batch(&good).unwrap();
    assert_eq!(
        s.on_peer_end(3).unwrap_err(),
        PsiError::TotalMismatch {
            declared: 3,
            announced: 3,
            received: 1
        }
    );
    assert_eq!(
        start(1).on_peer_batch(&[good; 2].concat()).unwrap_err(),
        PsiError::TooManyPoints {
            declared: 1,
            received: 2
        }
    );
    assert_eq!(
        start(1).on_peer_batch(&[0u8; 33]).unwrap_err(),
        PsiError::BatchNotMultipleOfPointLen { len: 33 }
    );
}

/// Membership indices into `sorted` (a blinded session's points) as indices into `items`, the
/// set they were blinded from, so that [`check_outputs`] can read them.
fn to_item_indices(
    membership: Option<Vec<u32>>,
    sorted: &[EncodedPoint],
    key_name: &str,
    key: &JobKey,
    items: &ItemSet,
) -> Option<Vec<u32>> {
    let of_item: std::collections::HashMap<EncodedPoint, u32> = blind_items(key, key_name, items)
        .into_iter()
        .enumerate()
        .map(|(i, p)| (p, i as u32))
        .collect();
    membership.map(|m| {
        let mut items: Vec<u32> = m.iter().map(|&i| of_item[&sorted[i as usize]]).collect();
        items.sort_unstable();
        items
    })
}

/// A session that begins with its points already blinded (the executors' pass computed them)
/// gives the count and, when it learns membership, the indices of its matched points: the same
/// items as the plaintext intersection, in every mode, against a session over items.
#[test]
fn a_session_begun_blinded_learns_the_same_membership_over_its_points() {
    for seed in 0..4 {
        for (rio_a, lm_a, rio_b, lm_b) in modes() {
            for bs in [1, 7, 4096] {
                let (a, b) = (emails(0..60), emails(35..120));
                let key = JobKey::generate();
                let pa = params(rio_a, lm_a, bs);
                let mut sorted = blind_items(&key, &pa.key_name, &a);
                let start = PsiSession::start_blinded(pa, copy_of(&key), sorted.clone());
                sorted.sort_unstable();
                let parties = [
                    Party::with(start, b.len() as u64).unwrap(),
                    Party::new(params(rio_b, lm_b, bs), b.clone(), a.len() as u64).unwrap(),
                ];
                let (mut oa, ob) = drive(parties, schedule_from(seed)).unwrap();
                oa.membership = to_item_indices(oa.membership, &sorted, "email", &key, &a);
                check_outputs((&a, &b), (lm_a, lm_b), (oa, ob));
            }
        }
    }
}

/// The same through [`ReadyToBlind::blind`], which sends the whole set at once.
#[test]
fn a_session_begun_blinded_learns_membership_when_it_sends_at_once() {
    let (a, b) = (emails(0..50), emails(20..90));
    let key = JobKey::generate();
    let mut sorted = blind_items(&key, "email", &a);
    let (size_a, sa) =
        PsiSession::start_blinded(params(true, true, 8), copy_of(&key), sorted.clone());
    sorted.sort_unstable();
    let (size_b, sb) = PsiSession::start(params(true, true, 8), JobKey::generate(), b.clone());
    let (out_a, mut sa) = sa.on_peer_size(size_b).unwrap().blind();
    let (out_b, mut sb) = sb.on_peer_size(size_a).unwrap().blind();
    let mut to_a = Vec::new();
    for batch in &out_a {
        let (next, ret) = sb.on_peer_batch(batch).unwrap();
        sb = next;
        to_a.extend(ret);
    }
    let mut to_b = Vec::new();
    for batch in &out_b {
        let (next, ret) = sa.on_peer_batch(batch).unwrap();
        sa = next;
        to_b.extend(ret);
    }
    let (rest_a, sa) = sa.on_peer_end(size_b).unwrap();
    let (rest_b, sb) = sb.on_peer_end(size_a).unwrap();
    let (mut sa, mut sb) = (sa, sb);
    for ret in to_a.iter().chain(&rest_b) {
        sa = sa.on_returned_batch(ret).unwrap();
    }
    for ret in to_b.iter().chain(&rest_a) {
        sb = sb.on_returned_batch(ret).unwrap();
    }
    let mut oa = sa.on_returned_end(size_a).unwrap();
    let ob = sb.on_returned_end(size_b).unwrap();
    oa.membership = to_item_indices(oa.membership, &sorted, "email", &key, &a);
    check_outputs((&a, &b), (true, true), (oa, ob));
}

/// A blinded set with a point twice is refused before anything is sent.
#[test]
fn a_blinded_set_with_a_point_twice_is_refused() {
    let key = JobKey::generate();
    let mut points = blind_items(&key, "email", &emails(0..5));
    points.push(points[2]);
    let (_, s) = PsiSession::start_blinded(params(false, false, 8), key, points);
    assert!(matches!(
        s.on_peer_size(5),
        Err(PsiError::DuplicateOwnItems)
    ));
}

fn copy_of(key: &JobKey) -> JobKey {
    JobKey::from_secret_bytes(&key.to_secret_bytes()).expect("a key")
}
