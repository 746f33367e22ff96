//! Drives the key holder's intersection-sum session through an arbitrary sequence of peer
//! events: the value holder's hello (sizes, row layout, key — valid or raw), point batches,
//! returned points and ciphertext rows, each either raw bytes or built from valid values so that
//! the matching and summing are reachable. Any `SumError` ends the session (as it ends the job);
//! a panic is a bug. On a successful end the intersection is at most both set sizes, and the
//! noised sums are one row ciphertext of the peer's layout.
#![no_main]

mod common;

use std::sync::LazyLock;

use arbitrary::Arbitrary;
use cleanroom_circuits::ahe::{self, SecretKey, SlotLayout, encrypt_rows};
use cleanroom_circuits::intersection_sum::{
    KeyHolderSession, KhAwaitingHello, KhAwaitingReturn, KhReadyToBlind, KhReceivingPoints,
    KhSumming, SumParams,
};
use cleanroom_circuits::{EncodedPoint, JobKey, POINT_LEN, reblind_points};
use common::{KEY_NAME, PEER_KEY, cap, counted, our_items, peer_points, pick, record_sent};
use libfuzzer_sys::fuzz_target;

const OUR_ITEMS: [&[u8]; 6] = [b"a", b"b", b"c", b"d", b"e", b"f"];
const PEER_ITEMS: [&[u8]; 6] = [b"a", b"c", b"e", b"x", b"y", b"z"];
const MAX_BATCH: usize = 8;
/// Longest raw batch (or key) an operation may carry.
const MAX_RAW: usize = MAX_BATCH * POINT_LEN * 8;
/// The honest value holder's slot layout: a count and a 32-bit amount.
const WIDTHS: [u8; 2] = [65, 65];

static PEER_POINTS: LazyLock<Vec<EncodedPoint>> = LazyLock::new(|| peer_points(&PEER_ITEMS));
/// The honest value holder's Paillier key, one for the whole run (about a second to make).
static PEER_SK: LazyLock<SecretKey> = LazyLock::new(|| ahe::keygen().expect("key generation"));

#[derive(Debug, Arbitrary)]
enum Op {
    /// The honest hello: its size, layout and key.
    HelloValid(u8),
    /// A hello with arbitrary widths and key bytes.
    HelloRaw(u8, Vec<u8>, Vec<u8>),
    Blind,
    PeerBatchRaw(Vec<u8>),
    PeerBatchValid(Vec<u8>),
    PeerEnd(u64),
    PeerEndHonest,
    ReturnedBatchRaw(Vec<u8>),
    ReturnedBatchValid(Vec<u8>),
    ReturnedEnd(u64),
    ReturnedEndHonest,
    CiphertextsRaw(Vec<u8>),
    /// Rows of valid ciphertexts under the honest key: (count, amount) per row.
    CiphertextsValid(Vec<(u8, u16)>),
    CiphertextEnd(u64),
    CiphertextEndHonest,
    Finish,
}

#[derive(Debug, Arbitrary)]
struct Input {
    item_mask: u8,
    min_peer_set: u8,
    max_peer_set: u8,
    batch_size: u8,
    ops: Vec<Op>,
}

enum State {
    Hello(KhAwaitingHello),
    Ready(KhReadyToBlind),
    Points(KhReceivingPoints),
    Return(KhAwaitingReturn),
    Summing(KhSumming),
}

fuzz_target!(|input: Input| {
    let items = our_items(&OUR_ITEMS, input.item_mask);
    let params = SumParams {
        key_name: KEY_NAME.into(),
        min_peer_set: u64::from(input.min_peer_set % 8),
        max_peer_set: u64::from(input.max_peer_set % 8),
        batch_size: usize::from(input.batch_size % 8),
        cells: WIDTHS.len(),
    };
    let Ok((own_size, first)) = KeyHolderSession::start(params, JobKey::generate(), items) else {
        return;
    };
    let layout = SlotLayout::new(&WIDTHS).expect("valid layout");
    let mut state = State::Hello(first);
    let mut sent: Vec<EncodedPoint> = Vec::new();
    let (mut points_in, mut returned_in, mut rows_in) = (0u64, 0u64, 0u64);

    for op in input.ops.into_iter().take(24) {
        state = match (state, op) {
            (State::Hello(s), Op::HelloValid(size)) => {
                match s.on_peer_hello(u64::from(size % 8), &WIDTHS, &PEER_SK.public().to_bytes()) {
                    Ok(next) => State::Ready(next),
                    Err(_) => return,
                }
            }
            (State::Hello(s), Op::HelloRaw(size, widths, key)) => {
                let widths: Vec<u8> = widths.into_iter().take(4).collect();
                match s.on_peer_hello(u64::from(size % 8), &widths, cap(&key, MAX_RAW)) {
                    Ok(next) => State::Ready(next),
                    Err(_) => return,
                }
            }
            (State::Ready(s), Op::Blind) => {
                let (batches, next) = s.blind();
                record_sent(&mut sent, &batches);
                assert_eq!(sent.len() as u64, own_size);
                State::Points(next)
            }
            (State::Points(s), op @ (Op::PeerBatchRaw(_) | Op::PeerBatchValid(_))) => {
                let batch = match &op {
                    Op::PeerBatchRaw(b) => cap(b, MAX_RAW).to_vec(),
                    Op::PeerBatchValid(ix) => pick(&PEER_POINTS, ix, MAX_BATCH),
                    _ => unreachable!(),
                };
                let taken = s.on_peer_batch(&batch);
                let Some(next) = counted(taken, &batch, POINT_LEN, &mut points_in) else {
                    return;
                };
                State::Points(next)
            }
            (State::Points(s), op @ (Op::PeerEnd(_) | Op::PeerEndHonest)) => {
                let total = if let Op::PeerEnd(t) = op { t } else { points_in };
                match s.on_peer_end(total) {
                    Ok(next) => State::Return(next),
                    Err(_) => return,
                }
            }
            (State::Return(s), op @ (Op::ReturnedBatchRaw(_) | Op::ReturnedBatchValid(_))) => {
                let batch = match &op {
                    Op::ReturnedBatchRaw(b) => cap(b, MAX_RAW).to_vec(),
                    Op::ReturnedBatchValid(ix) => {
                        let ours = reblind_points(&PEER_KEY, sent.as_flattened())
                            .expect("our own points are valid");
                        pick(&ours, ix, MAX_BATCH)
                    }
                    _ => unreachable!(),
                };
                let taken = s.on_returned_batch(&batch);
                let Some(next) = counted(taken, &batch, POINT_LEN, &mut returned_in) else {
                    return;
                };
                State::Return(next)
            }
            (State::Return(s), op @ (Op::ReturnedEnd(_) | Op::ReturnedEndHonest)) => {
                let total = if let Op::ReturnedEnd(t) = op { t } else { returned_in };
                match s.on_returned_end(total) {
                    Ok(next) => {
                        assert!(next.intersection() <= own_size);
                        State::Summing(next)
                    }
                    Err(_) => return,
                }
            }
            (State::Summing(s), op @ (Op::CiphertextsRaw(_) | Op::CiphertextsValid(_))) => {
                let batch = match op {
                    Op::CiphertextsRaw(b) => cap(&b, MAX_RAW).to_vec(),
                    Op::CiphertextsValid(rows) => {
                        let values: Vec<u64> = rows
                            .iter()
                            .take(MAX_BATCH)
                            .flat_map(|&(c, v)| [u64::from(c), u64::from(v)])
                            .collect();
                        encrypt_rows(&PEER_SK, &layout, &values).expect("values fit")
                    }
                    _ => unreachable!(),
                };
                let taken = s.on_ciphertext_batch(&batch);
                let Some(next) = counted(taken, &batch, layout.ciphertext_len(), &mut rows_in)
                else {
                    return;
                };
                State::Summing(next)
            }
            (State::Summing(s), op @ (Op::CiphertextEnd(_) | Op::CiphertextEndHonest)) => {
                let total = if let Op::CiphertextEnd(t) = op { t } else { rows_in };
                let Ok(summed) = s.on_ciphertext_end(total) else {
                    return;
                };
                let (own, peer) = summed.sizes();
                assert!(summed.intersection() <= own.min(peer));
                let cells = summed.layout().cells();
                let out = summed.noised_sums(&vec![3; cells]).expect("noise of the right length");
                assert_eq!(out.len(), layout.ciphertext_len());
                return;
            }
            (s, Op::Finish) => {
                drop(s);
                return;
            }
            (s, _) => s,
        };
    }
});
