//! Both parties of an intersection-sum session run against each other in memory.

use super::*;
use crate::ahe::PUBLIC_KEY_LEN;

const KEY: &str = "email";

fn params(cells: usize) -> SumParams {
    SumParams {
        key_name: KEY.into(),
        min_peer_set: 1,
        max_peer_set: 1 << 20,
        batch_size: 64,
        cells,
    }
}

/// `n` distinct items `prefix{i}`, in the sorted order `ItemSet::dedup` gives.
fn items(range: std::ops::Range<u32>) -> ItemSet {
    let mut set = ItemSet::new();
    for i in range {
        set.push(format!("user{i:06}@example.com").as_bytes())
            .unwrap();
    }
    set.dedup();
    set
}

/// The value holder's cells for item `i`: its value and a count of 1.
fn cells_of(i: u32) -> [u64; 2] {
    [u64::from(i) * 1_000 + 7, 1]
}

/// Values of `set` (items made by [`items`]) laid out row-major.
fn values_for(set: &ItemSet) -> Vec<u64> {
    set.iter()
        .flat_map(|item| {
            let text = std::str::from_utf8(item).unwrap();
            let i: u32 = text[4..10].parse().unwrap();
            cells_of(i)
        })
        .collect()
}

/// Runs the key holder's session up to its sums, in the order the node drives it, and returns
/// it with the value holder waiting for the sums.
fn run(a: ItemSet, b: ItemSet, values: Vec<u64>, cells: usize) -> (KhSummed, VhAwaitingSums) {
    let (a_size, a) = KeyHolderSession::start(params(cells), JobKey::generate(), a).unwrap();
    let (hello, b) =
        ValueHolderSession::start(params(cells), JobKey::generate(), b, values).unwrap();
    let a = a.on_peer_hello(hello.set_size, &hello.public_key).unwrap();
    let b = b.on_peer_size(a_size).unwrap();
    let (a_batches, a) = a.blind();
    let (b_batches, mut b) = b.blind();
    for batch in &a_batches {
        b = b.on_peer_batch(batch).unwrap();
    }
    let (returned, mut encrypting) = b.on_peer_end(a_size).unwrap();
    let mut a = a;
    for batch in &b_batches {
        a = a.on_peer_batch(batch).unwrap();
    }
    let mut a = a.on_peer_end(hello.set_size).unwrap();
    for batch in &returned {
        a = a.on_returned_batch(batch).unwrap();
    }
    let mut a = a.on_returned_end(a_size).unwrap();
    while let Some(batch) = encrypting.next_batch() {
        a = a.on_ciphertext_batch(&batch).unwrap();
    }
    let rows = encrypting.rows_sent();
    let a = a.on_ciphertext_end(rows).unwrap();
    (a, encrypting.finish())
}

#[test]
fn sums_over_the_intersection_equal_the_plaintext_truth() {
    // A holds 0..300, B holds 200..500 with values: 100 shared rows.
    let a = items(0..300);
    let b = items(200..500);
    let values = values_for(&b);
    let (summed, awaiting) = run(a, b, values, 2);
    assert_eq!(summed.intersection(), 100);
    assert_eq!(summed.sizes(), (300, 300));
    let sums = summed.noised_sums(&[0, 0]).unwrap();
    let totals = awaiting.on_sums(&sums).unwrap();
    let truth: u64 = (200..300).map(|i| cells_of(i)[0]).sum();
    assert_eq!(totals, vec![i128::from(truth), 100]);
}

#[test]
fn noise_is_added_under_encryption_exactly() {
    let (summed, awaiting) = run(items(0..40), items(30..60), values_for(&items(30..60)), 2);
    let sums = summed.noised_sums(&[-12_345, 3]).unwrap();
    let totals = awaiting.on_sums(&sums).unwrap();
    let truth: u64 = (30..40).map(|i| cells_of(i)[0]).sum();
    assert_eq!(totals, vec![i128::from(truth) - 12_345, 13]);
}

#[test]
fn an_empty_intersection_sums_to_the_noise_alone() {
    let (summed, awaiting) = run(items(0..20), items(20..40), values_for(&items(20..40)), 2);
    assert_eq!(summed.intersection(), 0);
    let totals = awaiting
        .on_sums(&summed.noised_sums(&[5, -2]).unwrap())
        .unwrap();
    assert_eq!(totals, vec![5, -2]);
}

#[test]
fn sums_are_rerandomised_before_they_leave() {
    let (summed, _awaiting) = run(items(0..20), items(10..30), values_for(&items(10..30)), 2);
    let plain: Vec<u8> = summed.sums.iter().flat_map(ExpElGamal::encode).collect();
    let sent = summed.noised_sums(&[0, 0]).unwrap();
    // Same plaintexts, but no 32-byte point of the sent ciphertexts equals the raw sums'.
    for (p, s) in plain.chunks(32).zip(sent.chunks(32)) {
        assert_ne!(p, s);
    }
}

#[test]
fn the_value_holder_never_receives_its_own_points_back() {
    // Structural: the value holder's states offer no way to take returned points, and its
    // only input after the exchange is one ciphertext per cell; a longer input is refused.
    let (summed, awaiting) = run(items(0..20), items(10..30), values_for(&items(10..30)), 2);
    let mut sums = summed.noised_sums(&[0, 0]).unwrap();
    sums.extend_from_slice(&[0u8; CIPHERTEXT_LEN]);
    assert!(matches!(
        awaiting.on_sums(&sums),
        Err(SumError::SumsWrongLength { cells: 2, .. })
    ));
}

/// Drives A up to the ciphertext stage against an honest B; returns A summing, B encrypting.
fn up_to_ciphertexts(cells: usize) -> (KhSumming, VhEncrypting) {
    let b_items = items(10..30);
    let values: Vec<u64> = (0..b_items.len() * cells).map(|v| v as u64).collect();
    let (a_size, a) =
        KeyHolderSession::start(params(cells), JobKey::generate(), items(0..20)).unwrap();
    let (hello, b) =
        ValueHolderSession::start(params(cells), JobKey::generate(), b_items, values).unwrap();
    let (a_batches, a) = a
        .on_peer_hello(hello.set_size, &hello.public_key)
        .unwrap()
        .blind();
    let (b_batches, mut b) = b.on_peer_size(a_size).unwrap().blind();
    for batch in &a_batches {
        b = b.on_peer_batch(batch).unwrap();
    }
    let (returned, encrypting) = b.on_peer_end(a_size).unwrap();
    let mut a = a;
    for batch in &b_batches {
        a = a.on_peer_batch(batch).unwrap();
    }
    let mut a = a.on_peer_end(hello.set_size).unwrap();
    for batch in &returned {
        a = a.on_returned_batch(batch).unwrap();
    }
    (a.on_returned_end(a_size).unwrap(), encrypting)
}

#[test]
fn malformed_ciphertext_streams_are_named_errors() {
    let (a, mut b) = up_to_ciphertexts(2);
    let batch = b.next_batch().unwrap();
    // Not a whole number of rows.
    let err = up_to_ciphertexts(2)
        .0
        .on_ciphertext_batch(&batch[..batch.len() - 1])
        .unwrap_err();
    assert!(
        matches!(err, SumError::CiphertextBatchNotWholeRows { .. }),
        "{err}"
    );
    // More rows than the peer declared.
    let a = a.on_ciphertext_batch(&batch).unwrap();
    let err = a.on_ciphertext_batch(&batch).unwrap_err();
    assert!(
        matches!(err, SumError::CiphertextRowsMismatch { .. }),
        "{err}"
    );
    // A total that disagrees with what came.
    let (a, mut b) = up_to_ciphertexts(2);
    let a = a.on_ciphertext_batch(&b.next_batch().unwrap()).unwrap();
    let err = a.on_ciphertext_end(19).unwrap_err();
    assert!(
        matches!(err, SumError::CiphertextRowsMismatch { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("announced 19"), "{err}");
}

#[test]
fn an_invalid_ciphertext_in_a_matched_row_names_the_row() {
    let (a, mut b) = up_to_ciphertexts(1);
    let mut batch = b.next_batch().unwrap();
    let matched = a.matched.iter().position(|&m| m).unwrap();
    // Corrupt every byte of that row's r·G: not a canonical encoding.
    for byte in &mut batch[matched * CIPHERTEXT_LEN..matched * CIPHERTEXT_LEN + 32] {
        *byte = 0xff;
    }
    let err = a.on_ciphertext_batch(&batch).unwrap_err();
    match err {
        SumError::Ahe(AheError::InvalidCiphertext { row, .. }) => {
            assert_eq!(row as usize, matched);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn sizes_keys_and_layouts_are_checked_before_any_work() {
    let err = KeyHolderSession::start(params(0), JobKey::generate(), items(0..3)).unwrap_err();
    assert!(matches!(err, SumError::BadCellCount { .. }));
    let err = KeyHolderSession::start(params(MAX_CELLS + 1), JobKey::generate(), items(0..3))
        .unwrap_err();
    assert!(matches!(err, SumError::BadCellCount { .. }));
    let err = ValueHolderSession::start(params(2), JobKey::generate(), items(0..3), vec![1; 5])
        .unwrap_err();
    assert!(matches!(err, SumError::ValuesNotAligned { values: 5, .. }));

    let (_, a) = KeyHolderSession::start(params(2), JobKey::generate(), items(0..3)).unwrap();
    let err = a.on_peer_hello(1 << 21, &[0; PUBLIC_KEY_LEN]).unwrap_err();
    assert!(matches!(
        err,
        SumError::Psi(PsiError::PeerSetTooLarge { .. })
    ));
    let (_, a) = KeyHolderSession::start(params(2), JobKey::generate(), items(0..3)).unwrap();
    let err = a.on_peer_hello(3, &[0; PUBLIC_KEY_LEN]).unwrap_err();
    assert!(
        matches!(err, SumError::Ahe(_)),
        "the identity is not a key: {err}"
    );
    let (_, a) = KeyHolderSession::start(params(2), JobKey::generate(), items(0..3)).unwrap();
    let err = a.on_peer_hello(3, &[1; 7]).unwrap_err();
    assert!(
        matches!(err, SumError::Ahe(AheError::WrongLength { .. })),
        "{err}"
    );

    let (_, b) =
        ValueHolderSession::start(params(2), JobKey::generate(), items(0..3), vec![1; 6]).unwrap();
    assert!(matches!(
        b.on_peer_size(0),
        Err(SumError::Psi(PsiError::PeerSetTooSmall { .. }))
    ));
}

#[test]
fn bad_points_from_either_side_are_refused() {
    let (hello, b) =
        ValueHolderSession::start(params(1), JobKey::generate(), items(0..4), vec![1; 4]).unwrap();
    let (_, b) = b.on_peer_size(4).unwrap().blind();
    let err = b.on_peer_batch(&[0u8; 32]).unwrap_err();
    assert!(
        matches!(err, SumError::Psi(PsiError::IdentityPoint { index: 0 })),
        "{err}"
    );

    let (_, a) = KeyHolderSession::start(params(1), JobKey::generate(), items(0..4)).unwrap();
    let (_, a) = a
        .on_peer_hello(hello.set_size, &hello.public_key)
        .unwrap()
        .blind();
    let err = a.on_peer_batch(&[0xffu8; 64]).unwrap_err();
    assert!(
        matches!(err, SumError::Psi(PsiError::InvalidPoint { index: 0 })),
        "{err}"
    );
}

#[test]
fn noise_must_match_the_layout() {
    let (summed, _) = run(items(0..5), items(0..5), values_for(&items(0..5)), 2);
    assert!(matches!(
        summed.noised_sums(&[1]),
        Err(SumError::NoiseWrongLength { given: 1, cells: 2 })
    ));
}

#[test]
fn ciphertext_batches_fit_a_frame() {
    for cells in [1, 2, 3, 16, MAX_CELLS] {
        let p = params(cells);
        assert!(p.rows_per_ciphertext_batch() * p.row_len() <= MAX_CIPHERTEXT_BATCH_BYTES);
        assert!(p.rows_per_ciphertext_batch() >= 1);
    }
}
