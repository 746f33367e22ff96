//! Drives one party's `PsiSession` through an arbitrary sequence of peer events.
//!
//! The session starts over at most 8 fixed items (a subset chosen by the input, sometimes with a
//! duplicate), with a policy chosen by the input. Then each operation is applied if the current
//! state accepts it and skipped otherwise. Any `PsiError` ends the session (as it ends the job);
//! a panic is a bug. Peer batches are either raw bytes (mostly invalid encodings) or built from
//! valid points — an honest peer's blinded items and our own points blinded by that peer — so
//! that the distinctness checks and the final matching are reachable too.
//!
//! Invariants checked on a successful end: the intersection is at most both set sizes, and the
//! membership list (when asked for) is strictly increasing, in range, and as long as the count.
#![no_main]

mod common;

use std::sync::LazyLock;

use arbitrary::Arbitrary;
use cleanroom_circuits::{
    AwaitingPeerSize, AwaitingReturn, EncodedPoint, ExchangingPoints, JobKey, POINT_LEN, PsiParams,
    PsiSession, ReadyToBlind, reblind_points,
};
use common::{KEY_NAME, PEER_KEY, cap, counted, our_items, peer_points, pick, record_sent};
use libfuzzer_sys::fuzz_target;

const OUR_ITEMS: [&[u8]; 8] = [b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h"];
const PEER_ITEMS: [&[u8]; 8] = [b"a", b"c", b"e", b"x", b"y", b"z", b"h", b"q"];
/// Largest batch (in points) an operation may carry: every point costs ~50 µs.
const MAX_BATCH_POINTS: usize = 12;
/// Longest raw batch an operation may carry: one byte short of a point more than the largest.
const MAX_RAW: usize = MAX_BATCH_POINTS * POINT_LEN + POINT_LEN - 1;

/// The peer's items blinded by the peer: valid points it would send us.
static PEER_POINTS: LazyLock<Vec<EncodedPoint>> = LazyLock::new(|| peer_points(&PEER_ITEMS));

#[derive(Debug, Arbitrary)]
enum Op {
    PeerSize(u64),
    Blind,
    /// Raw bytes as a peer batch.
    PeerBatchRaw(Vec<u8>),
    /// A peer batch of valid points: indices into the peer's blinded items.
    PeerBatchValid(Vec<u8>),
    /// The peer's end of batches with an arbitrary total.
    PeerEnd(u64),
    /// The peer's end with the number of points it actually sent.
    PeerEndHonest,
    /// Raw bytes as a batch of our returned points.
    ReturnedBatchRaw(Vec<u8>),
    /// Our own sent points, blinded by the peer: indices into what we sent.
    ReturnedBatchValid(Vec<u8>),
    ReturnedEnd(u64),
    ReturnedEndHonest,
}

#[derive(Debug, Arbitrary)]
struct Input {
    /// Bit i set: our item i is in the set.
    item_mask: u8,
    /// Push item 0 twice (a set that skipped `dedup`).
    duplicate: bool,
    min_peer_set: u8,
    /// 0..=8 as is; anything above means "no upper bound" (u64::MAX).
    max_peer_set: u8,
    return_in_order: bool,
    learn_membership: bool,
    batch_size: u8,
    ops: Vec<Op>,
}

enum State {
    Size(AwaitingPeerSize),
    Ready(ReadyToBlind),
    Exchanging(ExchangingPoints),
    Returning(AwaitingReturn),
}

fuzz_target!(|input: Input| {
    let mut items = our_items(&OUR_ITEMS, input.item_mask);
    if input.duplicate {
        items.push(OUR_ITEMS[0]).expect("tiny set");
    }
    let max_peer_set = match input.max_peer_set {
        m @ 0..=8 => u64::from(m),
        _ => u64::MAX,
    };
    let params = PsiParams {
        key_name: KEY_NAME.to_owned(),
        min_peer_set: u64::from(input.min_peer_set % 10),
        max_peer_set,
        return_in_order: input.return_in_order,
        learn_membership: input.learn_membership,
        batch_size: usize::from(input.batch_size % 10),
    };
    let key = JobKey::generate();
    let (own_size, first) = PsiSession::start(params, key, items);
    let input_learn = input.learn_membership;

    let mut state = State::Size(first);
    // What we sent (concatenated encodings, in send order) and how many peer points arrived.
    let mut sent: Vec<EncodedPoint> = Vec::new();
    let mut peer_points_sent: u64 = 0;
    let mut returned_sent: u64 = 0;
    // Our sent points blinded by the peer, computed once when needed.
    let mut ours_double: Option<Vec<EncodedPoint>> = None;

    for op in input.ops.into_iter().take(32) {
        state = match (state, op) {
            (State::Size(s), Op::PeerSize(n)) => match s.on_peer_size(n) {
                Ok(next) => State::Ready(next),
                Err(_) => return,
            },
            (State::Ready(s), Op::Blind) => {
                let (batches, next) = s.blind();
                record_sent(&mut sent, &batches);
                assert_eq!(sent.len() as u64, own_size, "blind sent the wrong number of points");
                State::Exchanging(next)
            }
            (State::Exchanging(s), op @ (Op::PeerBatchRaw(_) | Op::PeerBatchValid(_))) => {
                let batch = match &op {
                    Op::PeerBatchRaw(b) => cap(b, MAX_RAW).to_vec(),
                    Op::PeerBatchValid(ix) => pick(&PEER_POINTS, ix, MAX_BATCH_POINTS),
                    _ => unreachable!(),
                };
                match s.on_peer_batch(&batch) {
                    Ok((next, out)) => {
                        peer_points_sent += (batch.len() / POINT_LEN) as u64;
                        if let Some(out) = out {
                            assert_eq!(out.len(), batch.len(), "returned batch of another size");
                        }
                        State::Exchanging(next)
                    }
                    Err(_) => return,
                }
            }
            (State::Exchanging(s), op @ (Op::PeerEnd(_) | Op::PeerEndHonest)) => {
                let total = match op {
                    Op::PeerEnd(t) => t,
                    _ => peer_points_sent,
                };
                match s.on_peer_end(total) {
                    Ok((_batches, next)) => State::Returning(next),
                    Err(_) => return,
                }
            }
            (State::Exchanging(s), op @ (Op::ReturnedBatchRaw(_) | Op::ReturnedBatchValid(_))) => {
                let batch = returned_batch(&op, &sent, &mut ours_double);
                let taken = s.on_returned_batch(&batch);
                let Some(next) = counted(taken, &batch, POINT_LEN, &mut returned_sent) else {
                    return;
                };
                State::Exchanging(next)
            }
            (State::Returning(s), op @ (Op::ReturnedBatchRaw(_) | Op::ReturnedBatchValid(_))) => {
                let batch = returned_batch(&op, &sent, &mut ours_double);
                let taken = s.on_returned_batch(&batch);
                let Some(next) = counted(taken, &batch, POINT_LEN, &mut returned_sent) else {
                    return;
                };
                State::Returning(next)
            }
            (State::Returning(s), op @ (Op::ReturnedEnd(_) | Op::ReturnedEndHonest)) => {
                let total = match op {
                    Op::ReturnedEnd(t) => t,
                    _ => returned_sent,
                };
                match s.on_returned_end(total) {
                    Ok(out) => {
                        assert_eq!(out.own_set_size, own_size);
                        assert!(out.intersection <= out.own_set_size, "{out:?}");
                        assert!(out.intersection <= out.peer_set_size, "{out:?}");
                        match &out.membership {
                            Some(m) => {
                                assert!(input_learn, "membership without learn_membership");
                                assert_eq!(m.len() as u64, out.intersection, "{out:?}");
                                assert!(m.windows(2).all(|w| w[0] < w[1]), "{out:?}");
                                assert!(m.iter().all(|&i| u64::from(i) < own_size), "{out:?}");
                            }
                            None => assert!(!input_learn, "no membership although asked"),
                        }
                    }
                    Err(_) => {}
                }
                return;
            }
            // Not valid in this state: skip.
            (s, _) => s,
        };
    }
});

fn returned_batch(
    op: &Op,
    sent: &[EncodedPoint],
    ours_double: &mut Option<Vec<EncodedPoint>>,
) -> Vec<u8> {
    match op {
        Op::ReturnedBatchRaw(b) => cap(b, MAX_RAW).to_vec(),
        Op::ReturnedBatchValid(ix) => {
            let pool = ours_double.get_or_insert_with(|| {
                reblind_points(&PEER_KEY, sent.as_flattened()).expect("our own points are valid")
            });
            pick(pool, ix, MAX_BATCH_POINTS)
        }
        _ => Vec::new(),
    }
}
