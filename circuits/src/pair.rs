//! In-memory pair harness: two [`PsiSession`]s driven against each other with no network, and
//! the protocol's tests (correctness against the plaintext intersection, and every rejection).

use std::collections::BTreeSet;

use curve25519_dalek::RistrettoPoint;
use proptest::prelude::*;

use crate::*;

pub(crate) fn params(
    return_in_order: bool,
    learn_membership: bool,
    batch_size: usize,
) -> PsiParams {
    PsiParams {
        key_name: "email".into(),
        min_peer_set: 0,
        max_peer_set: 1 << 20,
        return_in_order,
        learn_membership,
        batch_size,
    }
}

fn set(items: &[&[u8]]) -> ItemSet {
    let mut s: ItemSet = items.iter().copied().collect();
    s.dedup();
    s
}

/// Drives A and B to completion, interleaving their messages the way a network might (each
/// side's points reach the other before its own have all been reblinded).
pub(crate) fn run_pair(
    pa: PsiParams,
    pb: PsiParams,
    a: ItemSet,
    b: ItemSet,
) -> Result<(PsiOutput, PsiOutput), PsiError> {
    let (size_a, a) = PsiSession::start(pa, JobKey::generate(), a);
    let (size_b, b) = PsiSession::start(pb, JobKey::generate(), b);
    let (out_a, mut a) = a.on_peer_size(size_b)?.blind();
    let (out_b, mut b) = b.on_peer_size(size_a)?.blind();

    // B's points reach A; A's in-order returns reach B while B is still exchanging.
    let mut to_b_returns = Vec::new();
    for batch in &out_b {
        let (next, ret) = a.on_peer_batch(batch)?;
        a = next;
        to_b_returns.extend(ret);
    }
    for ret in &to_b_returns {
        b = b.on_returned_batch(ret)?;
    }
    let mut to_a_returns = Vec::new();
    for batch in &out_a {
        let (next, ret) = b.on_peer_batch(batch)?;
        b = next;
        to_a_returns.extend(ret);
    }
    let (rest_a, a) = a.on_peer_end(size_b)?;
    let (rest_b, b) = b.on_peer_end(size_a)?;
    let mut b = b;
    for ret in &rest_a {
        b = b.on_returned_batch(ret)?;
    }
    let mut a = a;
    for ret in to_a_returns.iter().chain(&rest_b) {
        a = a.on_returned_batch(ret)?;
    }
    Ok((a.on_returned_end(size_a)?, b.on_returned_end(size_b)?))
}

/// Indices (into the deduplicated `own`) of items that `other` also holds.
pub(crate) fn plain_membership(own: &ItemSet, other: &ItemSet) -> Vec<u32> {
    let other: BTreeSet<&[u8]> = other.iter().collect();
    own.iter()
        .enumerate()
        .filter(|(_, x)| other.contains(x))
        .map(|(i, _)| i as u32)
        .collect()
}

/// Every `(return_in_order_a, learn_membership_a, return_in_order_b, learn_membership_b)` a job
/// may ask for: a party may learn membership only if the peer returns in order.
pub(crate) fn modes() -> impl Iterator<Item = (bool, bool, bool, bool)> {
    let both = [false, true];
    both.into_iter()
        .flat_map(move |rio_a| both.map(|rio_b| (rio_a, rio_b)))
        .flat_map(move |(rio_a, rio_b)| both.map(|lm_a| (rio_a, lm_a, rio_b)))
        .flat_map(move |(rio_a, lm_a, rio_b)| both.map(|lm_b| (rio_a, lm_a, rio_b, lm_b)))
        .filter(|&(rio_a, lm_a, rio_b, lm_b)| (!lm_a || rio_b) && (!lm_b || rio_a))
}

/// Checks the outputs of a run over `a` and `b` (A learning membership when `lm_a`, B when
/// `lm_b`) against the plaintext intersection.
pub(crate) fn check_outputs(
    (a, b): (&ItemSet, &ItemSet),
    (lm_a, lm_b): (bool, bool),
    (oa, ob): (PsiOutput, PsiOutput),
) {
    let expect_a = plain_membership(a, b);
    let expect_b = plain_membership(b, a);
    assert_eq!(oa.intersection, expect_a.len() as u64);
    assert_eq!(ob.intersection, expect_a.len() as u64);
    assert_eq!(
        (oa.own_set_size, oa.peer_set_size),
        (a.len() as u64, b.len() as u64)
    );
    assert_eq!(
        (ob.own_set_size, ob.peer_set_size),
        (b.len() as u64, a.len() as u64)
    );
    assert_eq!(oa.membership, lm_a.then_some(expect_a));
    assert_eq!(ob.membership, lm_b.then_some(expect_b));
}

fn check_pair(rio_a: bool, lm_a: bool, rio_b: bool, lm_b: bool, a: ItemSet, b: ItemSet, bs: usize) {
    let out = run_pair(
        params(rio_a, lm_a, bs),
        params(rio_b, lm_b, bs),
        a.clone(),
        b.clone(),
    )
    .unwrap();
    check_outputs((&a, &b), (lm_a, lm_b), out);
}

pub(crate) fn emails(range: std::ops::Range<u32>) -> ItemSet {
    let mut s = ItemSet::new();
    for i in range {
        s.push(format!("user{i}@example.com").as_bytes()).unwrap();
    }
    s.dedup();
    s
}

#[test]
fn all_combinations_of_order_and_membership() {
    for (rio_a, lm_a, rio_b, lm_b) in modes() {
        check_pair(rio_a, lm_a, rio_b, lm_b, emails(0..40), emails(25..90), 7);
    }
}

#[test]
fn batches_larger_than_a_chunk() {
    // Crosses the 1024-point rayon chunk and uneven batch boundaries.
    check_pair(
        true,
        true,
        true,
        true,
        emails(0..1500),
        emails(1000..1300),
        500,
    );
}

#[test]
fn blind_and_reblind_match_plain_scalar_multiplication() {
    let k1 = JobKey::generate();
    let k2 = JobKey::generate();
    let items = emails(0..5);
    let once = blind_items(&k1, "email", &items);
    let twice = reblind_points(&k2, once.as_flattened()).unwrap();
    for (i, item) in items.iter().enumerate() {
        let h: RistrettoPoint = hash_to_group("email", item);
        assert_eq!(once[i], (k1.scalar() * h).compress().to_bytes());
        assert_eq!(
            twice[i],
            (k2.scalar() * (k1.scalar() * h)).compress().to_bytes()
        );
    }
    // Commutes: k2·k1·H = k1·k2·H.
    let other = reblind_points(&k1, blind_items(&k2, "email", &items).as_flattened()).unwrap();
    assert_eq!(twice, other);
    // Another key name is another domain.
    assert_ne!(blind_items(&k1, "phone", &items), once);
}

pub(crate) fn one_valid_point() -> EncodedPoint {
    hash_to_group("email", b"x").compress().to_bytes()
}

#[test]
fn reblind_rejects_bad_input() {
    let k = JobKey::generate();
    let good = one_valid_point();
    assert_eq!(
        reblind_points(&k, &[0u8; 33]),
        Err(PsiError::BatchNotMultipleOfPointLen { len: 33 })
    );
    // Not canonical: all 0xff is above the field prime.
    let mut batch = [good, good, [0xff; 32]].concat();
    assert_eq!(
        reblind_points(&k, &batch),
        Err(PsiError::InvalidPoint { index: 2 })
    );
    batch[64..].copy_from_slice(&[0u8; 32]);
    assert_eq!(
        reblind_points(&k, &batch),
        Err(PsiError::IdentityPoint { index: 2 })
    );
    // The lowest index is reported, across chunk boundaries.
    let mut many = vec![good; 3000];
    many[2500] = [0xff; 32];
    many[1100] = [0u8; 32];
    assert_eq!(
        reblind_points(&k, many.as_flattened()),
        Err(PsiError::IdentityPoint { index: 1100 })
    );
    assert_eq!(reblind_points(&k, &[]), Ok(vec![]));
}

/// Both sides started and blinded; returns A (exchanging) and B's outgoing batches.
fn exchanging(pa: PsiParams, a: ItemSet, b_size: u64) -> ExchangingPoints {
    let (_, a) = PsiSession::start(pa, JobKey::generate(), a);
    a.on_peer_size(b_size).unwrap().blind().1
}

#[test]
fn session_rejects_peer_misbehaviour() {
    let p = params(true, true, 4);
    let good = one_valid_point();

    // Declared size outside the policy.
    let bounded = PsiParams {
        min_peer_set: 2,
        max_peer_set: 10,
        ..p.clone()
    };
    let start = || PsiSession::start(bounded.clone(), JobKey::generate(), emails(0..3)).1;
    assert_eq!(
        start().on_peer_size(1).unwrap_err(),
        PsiError::PeerSetTooSmall {
            declared: 1,
            min: 2
        }
    );
    assert_eq!(
        start().on_peer_size(11).unwrap_err(),
        PsiError::PeerSetTooLarge {
            declared: 11,
            max: 10
        }
    );
    assert!(start().on_peer_size(2).is_ok() && start().on_peer_size(10).is_ok());

    // Batch of 33 bytes; invalid encoding and identity, indexed in the peer's stream.
    let e = exchanging(p.clone(), emails(0..3), 5);
    assert_eq!(
        e.on_peer_batch(&[1u8; 33]).unwrap_err(),
        PsiError::BatchNotMultipleOfPointLen { len: 33 }
    );
    let (e, _) = exchanging(p.clone(), emails(0..3), 5)
        .on_peer_batch(&[good; 2].concat())
        .unwrap();
    assert_eq!(
        e.on_peer_batch(&[[0xff; 32], good].concat()).unwrap_err(),
        PsiError::InvalidPoint { index: 2 }
    );
    let (e, _) = exchanging(p.clone(), emails(0..3), 5)
        .on_peer_batch(&good)
        .unwrap();
    assert_eq!(
        e.on_peer_batch(&[good, [0; 32]].concat()).unwrap_err(),
        PsiError::IdentityPoint { index: 2 }
    );

    // More points than declared.
    let (e, _) = exchanging(p.clone(), emails(0..3), 2)
        .on_peer_batch(&good)
        .unwrap();
    assert_eq!(
        e.on_peer_batch(&[good; 2].concat()).unwrap_err(),
        PsiError::TooManyPoints {
            declared: 2,
            received: 3
        }
    );

    // End total disagreeing with the declaration or with what arrived.
    let (e, _) = exchanging(p.clone(), emails(0..3), 2)
        .on_peer_batch(&good)
        .unwrap();
    assert_eq!(
        e.on_peer_end(2).unwrap_err(),
        PsiError::TotalMismatch {
            declared: 2,
            announced: 2,
            received: 1
        }
    );
    let (e, _) = exchanging(p.clone(), emails(0..3), 1)
        .on_peer_batch(&good)
        .unwrap();
    assert_eq!(
        e.on_peer_end(7).unwrap_err(),
        PsiError::TotalMismatch {
            declared: 1,
            announced: 7,
            received: 1
        }
    );

    // The same point twice from the peer.
    let (e, _) = exchanging(p.clone(), emails(0..3), 2)
        .on_peer_batch(&[good; 2].concat())
        .unwrap();
    assert_eq!(e.on_peer_end(2).unwrap_err(), PsiError::DuplicatePeerPoint);
}

#[test]
fn session_rejects_bad_returns() {
    let p = params(true, true, 4);
    let good = one_valid_point();
    let ready = || {
        let (e, _) = exchanging(p.clone(), emails(0..3), 1)
            .on_peer_batch(&good)
            .unwrap();
        e.on_peer_end(1).unwrap().1
    };
    assert_eq!(
        ready().on_returned_batch(&[0u8; 33]).unwrap_err(),
        PsiError::BatchNotMultipleOfPointLen { len: 33 }
    );
    assert_eq!(
        ready().on_returned_batch(&[good; 4].concat()).unwrap_err(),
        PsiError::TooManyReturnedPoints {
            own: 3,
            received: 4
        }
    );
    let r = ready().on_returned_batch(&[good; 2].concat()).unwrap();
    assert_eq!(
        r.on_returned_end(3).unwrap_err(),
        PsiError::ReturnedTotalMismatch {
            own: 3,
            announced: 3,
            received: 2
        }
    );
    let r = ready().on_returned_batch(&[good; 2].concat()).unwrap();
    let r = r.on_returned_batch(&[7u8; 32]).unwrap();
    assert_eq!(
        r.on_returned_end(3).unwrap_err(),
        PsiError::DuplicateReturnedPoint
    );
    let r = ready()
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
    // Early returns count towards the same limit.
    let e = exchanging(p.clone(), emails(0..3), 1);
    let e = e.on_returned_batch(&[good; 2].concat()).unwrap();
    assert_eq!(
        e.on_returned_batch(&[good; 2].concat()).unwrap_err(),
        PsiError::TooManyReturnedPoints {
            own: 3,
            received: 4
        }
    );
}

#[test]
fn own_inputs_are_checked() {
    let dup: ItemSet = [&b"a"[..], b"b", b"a"].into_iter().collect();
    let (n, s) = PsiSession::start(params(true, true, 4), JobKey::generate(), dup);
    assert_eq!(n, 3);
    assert_eq!(s.on_peer_size(1).unwrap_err(), PsiError::DuplicateOwnItems);
    // Distinct but not sorted is fine.
    let unsorted: ItemSet = [&b"b"[..], b"a"].into_iter().collect();
    let (_, s) = PsiSession::start(params(true, true, 4), JobKey::generate(), unsorted);
    assert!(s.on_peer_size(1).is_ok());
    let long = PsiParams {
        key_name: "k".repeat(70_000),
        ..params(true, true, 4)
    };
    let (_, s) = PsiSession::start(long, JobKey::generate(), emails(0..2));
    assert_eq!(
        s.on_peer_size(1).unwrap_err(),
        PsiError::KeyNameTooLong { len: 70_000 }
    );
}

#[test]
fn batches_are_bounded_and_debug_is_quiet() {
    let (n, s) = PsiSession::start(params(false, false, 3), JobKey::generate(), emails(0..10));
    assert_eq!(n, 10);
    let dbg = format!("{s:?}");
    assert!(!dbg.contains("user") && !dbg.contains("Scalar"), "{dbg}");
    let (batches, e) = s.on_peer_size(0).unwrap().blind();
    assert_eq!(
        batches.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![96, 96, 96, 32]
    );
    assert!(!format!("{e:?}").contains("Scalar"));
    // Empty peer set: no points, nothing matches.
    let (rest, r) = e.on_peer_end(0).unwrap();
    assert!(rest.is_empty());
    let r = r.on_returned_batch(&batches.concat()).unwrap();
    let out = r.on_returned_end(10).unwrap();
    assert_eq!((out.intersection, out.membership), (0, None));
}

#[test]
fn edge_sets() {
    let e = || emails(0..0);
    check_pair(true, true, true, true, e(), e(), 4);
    check_pair(true, true, true, true, e(), emails(0..5), 4);
    check_pair(false, false, false, false, emails(0..5), emails(0..5), 4);
    check_pair(true, true, true, true, emails(0..5), emails(5..9), 4);
    check_pair(true, true, true, true, set(&[b""]), set(&[b"", b"x"]), 1);
}

fn item_set() -> impl Strategy<Value = Vec<Vec<u8>>> {
    // Small alphabet and lengths, so the two sides overlap often and duplicates occur.
    prop::collection::vec(prop::collection::vec(0u8..4, 0..3), 0..40)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn psi_equals_plaintext_intersection(
        a in item_set(),
        b in item_set(),
        shared in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..8), 0..24),
        rio_a: bool,
        rio_b: bool,
        bs in 1usize..9,
    ) {
        let mut sa: ItemSet = a.iter().chain(&shared).map(Vec::as_slice).collect();
        let mut sb: ItemSet = b.iter().chain(&shared).map(Vec::as_slice).collect();
        sa.dedup();
        sb.dedup();
        check_pair(rio_a, rio_b, rio_b, rio_a, sa, sb, bs);
    }
}

#[test]
fn extreme_batch_sizes() {
    // A shuffles and learns its membership from B's in-order return, and vice versa.
    let (a, b) = (emails(0..20), emails(10..30));
    check_pair(false, true, true, false, a.clone(), b.clone(), usize::MAX);
    check_pair(true, false, false, true, a, b, 0);
}

/// A rough end-to-end timing against the floor (release: `cargo test -p cleanroom-circuits
/// --release -- --ignored --nocapture wall_vs_floor`); asserts nothing about speed.
#[test]
#[ignore]
fn wall_vs_floor() {
    let n = 4000;
    let floor = measure_floor(200);
    let t = std::time::Instant::now();
    check_pair(
        true,
        true,
        true,
        true,
        emails(0..n),
        emails(n / 2..n + n / 2),
        4096,
    );
    let wall = t.elapsed().as_secs_f64();
    let cores = rayon::current_num_threads();
    let floor_s = floor.psi_floor_seconds(n as u64, n as u64, cores);
    println!(
        "{n} x {n}: wall {wall:.3} s, floor {floor_s:.3} s, ratio {:.2}",
        wall / floor_s
    );
}
