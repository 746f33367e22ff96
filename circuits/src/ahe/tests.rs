//! Correctness tests and the (ignored) release-build measurement of the ElGamal scheme.

use std::time::Instant;

use rand::RngExt;

use super::elgamal::encrypt_limbs;
use super::*;

type S = ExpElGamal;

fn rng() -> rand::rngs::ThreadRng {
    rand::rng()
}

#[test]
fn ahe_round_trip_and_encoding() {
    let (sk, pk) = S::keygen();
    for v in [0u64, 1, 0xffff, 0x1_0000, 0xdead_beef, u64::MAX, 1 << 63] {
        let ct = S::encrypt(&pk, v);
        assert_eq!(S::decrypt(&sk, &ct), Ok(i128::from(v)));
        let bytes = S::encode(&ct);
        assert_eq!(bytes.len(), CIPHERTEXT_LEN);
        let back = S::decode(&bytes).unwrap();
        assert_eq!(back, ct);
        assert_eq!(S::decrypt(&sk, &back), Ok(i128::from(v)));
    }
    let pk2 = PublicKey::from_bytes(&pk.to_bytes()).unwrap();
    assert_eq!(pk2.to_bytes(), pk.to_bytes());
    assert_eq!(format!("{sk:?}"), "SecretKey(<redacted>)");
}

#[test]
fn ahe_homomorphic_sum_of_random_values() {
    let (sk, pk) = S::keygen();
    let mut r = rng();
    let values: Vec<u64> = (0..300).map(|_| r.random()).collect();
    let batch = encrypt_batch(&pk, &values);
    assert_eq!(batch.len(), values.len() * CIPHERTEXT_LEN);
    // Batch encodings decode to encryptions of the right values.
    for (i, &v) in values.iter().enumerate().take(5) {
        let ct = S::decode(&batch[i * CIPHERTEXT_LEN..(i + 1) * CIPHERTEXT_LEN]).unwrap();
        assert_eq!(S::decrypt(&sk, &ct), Ok(i128::from(v)));
    }
    let indices: Vec<u32> = (0..values.len() as u32).filter(|i| i % 3 != 1).collect();
    let expected: i128 = indices
        .iter()
        .map(|&i| i128::from(values[i as usize]))
        .sum();
    let sum = sum_selected(&batch, &indices).unwrap();
    assert_eq!(S::decrypt(&sk, &sum), Ok(expected));
    // The same through the trait's add.
    let mut acc = Ciphertext::zero();
    for &i in &indices {
        acc = S::add(&acc, &S::encrypt(&pk, values[i as usize]));
    }
    assert_eq!(S::decrypt(&sk, &acc), Ok(expected));
    assert_eq!(S::decrypt(&sk, &sum_selected(&batch, &[]).unwrap()), Ok(0));
}

#[test]
fn ahe_worst_case_cell_does_not_overflow() {
    let (sk, pk) = S::keygen();
    // 2^24 rows of 2^32 - 1: limbs 0 and 1 each sum to 2^24·(2^16 - 1).
    let rows: i64 = 1 << 24;
    let limb_sum = rows * 0xffff;
    let ct = encrypt_limbs(&pk, [limb_sum, limb_sum, 0, 0]);
    let total = i128::from(rows) * i128::from(u32::MAX);
    assert_eq!(S::decrypt(&sk, &ct), Ok(total));
    // Plus noise of either sign.
    let noised = S::add_plain(&ct, -123_456_789_012);
    assert_eq!(S::decrypt(&sk, &noised), Ok(total - 123_456_789_012));
    // 2^24 rows of u64::MAX: every limb at its maximum, total ≈ 2^88, exact in i128.
    let full = encrypt_limbs(&pk, [limb_sum; LIMBS]);
    let noised = S::add_plain(&full, i64::MAX);
    assert_eq!(
        S::decrypt(&sk, &noised),
        Ok(i128::from(rows) * i128::from(u64::MAX) + i128::from(i64::MAX))
    );
    // A few real ciphertexts whose sum exceeds u64.
    let three = [u64::MAX, u64::MAX, u64::MAX - 5]
        .map(|v| S::encrypt(&pk, v))
        .iter()
        .fold(Ciphertext::zero(), |a, b| S::add(&a, b));
    assert_eq!(S::decrypt(&sk, &three), Ok(3 * i128::from(u64::MAX) - 5));
}

#[test]
fn ahe_negative_noise_and_negative_totals() {
    let (sk, pk) = S::keygen();
    let ct = S::encrypt(&pk, 1000);
    for n in [-1i64, -999, -1000, -1001, -70_000, i64::MIN, 5, i64::MAX] {
        assert_eq!(
            S::decrypt(&sk, &S::add_plain(&ct, n)),
            Ok(1000 + i128::from(n)),
            "noise {n}"
        );
    }
    // Several noise additions accumulate exactly.
    let twice = S::add_plain(&S::add_plain(&ct, -40_000), -40_000);
    assert_eq!(S::decrypt(&sk, &twice), Ok(1000 - 80_000));
}

#[test]
fn ahe_rerandomize_changes_bytes_not_plaintext() {
    let (sk, pk) = S::keygen();
    let ct = S::add_plain(&S::encrypt(&pk, 42), -7);
    let re = S::rerandomize(&pk, &ct);
    let (a, b) = (S::encode(&ct), S::encode(&re));
    for k in 0..=LIMBS {
        assert_ne!(
            a[32 * k..32 * (k + 1)],
            b[32 * k..32 * (k + 1)],
            "point {k}"
        );
    }
    assert_eq!(S::decrypt(&sk, &re), Ok(35));
    // Two encryptions of the same value differ too.
    assert_ne!(
        S::encode(&S::encrypt(&pk, 42)),
        S::encode(&S::encrypt(&pk, 42))
    );
}

#[test]
fn ahe_invalid_encodings_rejected() {
    let (_sk, pk) = S::keygen();
    let good = S::encode(&S::encrypt(&pk, 9));
    assert_eq!(
        S::decode(&good[..CIPHERTEXT_LEN - 1]),
        Err(AheError::WrongLength {
            len: CIPHERTEXT_LEN - 1,
            expected: CIPHERTEXT_LEN
        })
    );
    assert!(matches!(S::decode(&[]), Err(AheError::WrongLength { .. })));
    let mut long = good.clone();
    long.push(0);
    assert!(matches!(
        S::decode(&long),
        Err(AheError::WrongLength { .. })
    ));
    // A non-canonical encoding (all 0xff) in each position.
    for k in 0..=LIMBS {
        let mut bad = good.clone();
        bad[32 * k..32 * (k + 1)].fill(0xff);
        assert_eq!(S::decode(&bad), Err(AheError::InvalidPoint { index: k }));
    }
    // Identity r·G.
    let mut id = good.clone();
    id[..32].fill(0);
    assert_eq!(S::decode(&id), Err(AheError::IdentityPoint { index: 0 }));
    // Batches: bad length, bad index, bad row, too many.
    let mut batch = encrypt_batch(&pk, &[1, 2, 3]);
    assert!(matches!(
        sum_selected(&batch[1..], &[0]),
        Err(AheError::WrongLength { .. })
    ));
    assert_eq!(
        sum_selected(&batch, &[0, 3]),
        Err(AheError::IndexOutOfRange { index: 3, rows: 3 })
    );
    // A non-canonical point (all 0xff) in row 1 (flipping a byte may give another valid point).
    batch[CIPHERTEXT_LEN + 32..CIPHERTEXT_LEN + 64].fill(0xff);
    assert!(matches!(
        sum_selected(&batch, &[0, 1]),
        Err(AheError::InvalidCiphertext { row: 1, .. })
    ));
    assert!(sum_selected(&batch, &[0, 2]).is_ok());
    let many = vec![0u32; MAX_SUMMANDS + 1];
    assert!(matches!(
        sum_selected(&batch, &many),
        Err(AheError::TooManySummands { .. })
    ));
    // Public keys.
    assert!(matches!(
        PublicKey::from_bytes(&[0u8; 5]),
        Err(AheError::WrongLength { .. })
    ));
    assert_eq!(
        PublicKey::from_bytes(&[0u8; PUBLIC_KEY_LEN]).err(),
        Some(AheError::IdentityPoint { index: 0 })
    );
    assert_eq!(
        PublicKey::from_bytes(&[0xffu8; PUBLIC_KEY_LEN]).err(),
        Some(AheError::InvalidPoint { index: 0 })
    );
    // Random bytes never panic.
    let mut r = rng();
    for _ in 0..200 {
        let len = r.random_range(0..2 * CIPHERTEXT_LEN);
        let bytes: Vec<u8> = (0..len).map(|_| r.random()).collect();
        let _ = S::decode(&bytes);
    }
}

#[test]
fn ahe_out_of_range_is_an_error_not_a_hang() {
    let (sk, pk) = S::keygen();
    let too_big = encrypt_limbs(&pk, [LIMB_MAX as i64, 0, 0, 0]);
    assert_eq!(
        S::decrypt(&sk, &too_big),
        Err(AheError::LimbOutOfRange { limb: 0 })
    );
    let too_small = encrypt_limbs(&pk, [0, -(LIMB_NEG_MARGIN as i64) - 1, 0, 0]);
    assert_eq!(
        S::decrypt(&sk, &too_small),
        Err(AheError::LimbOutOfRange { limb: 1 })
    );
    // The edges themselves decrypt.
    let edge = encrypt_limbs(&pk, [LIMB_MAX as i64 - 1, -(LIMB_NEG_MARGIN as i64), 0, 0]);
    assert_eq!(
        S::decrypt(&sk, &edge),
        Ok(i128::from(LIMB_MAX - 1) - (i128::from(LIMB_NEG_MARGIN) << 16))
    );
    // Under the wrong key: an error (or, with negligible probability, garbage), never a hang.
    let (sk2, _) = S::keygen();
    assert!(S::decrypt(&sk2, &S::encrypt(&pk, 5)).is_err());
}

fn per_op_us(n: usize, f: impl FnMut(usize)) -> f64 {
    let t = Instant::now();
    (0..n).for_each(f);
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// `cargo test --release -p cleanroom-circuits ahe_measure -- --ignored --nocapture`
#[test]
#[ignore = "measurement; run in release with --nocapture"]
fn ahe_measure() {
    let t = Instant::now();
    warm_up();
    println!(
        "baby-step table build (2^21 entries, rayon): {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    let (sk, pk) = S::keygen();
    println!(
        "keygen (incl. 4 fixed-base tables): {:.0} us",
        t.elapsed().as_secs_f64() * 1e6
    );

    let n = 2000;
    let mut r = rng();
    let values: Vec<u64> = (0..n).map(|_| r.random()).collect();
    let cts: Vec<Ciphertext> = values.iter().map(|&v| S::encrypt(&pk, v)).collect();
    let enc1 = per_op_us(n, |i| {
        std::hint::black_box(S::encrypt(&pk, values[i]));
    });
    println!("encrypt, 1 value, 1 thread (points, not encoded): {enc1:.1} us");
    let enc1e = per_op_us(n, |i| {
        std::hint::black_box(S::encode(&S::encrypt(&pk, values[i])));
    });
    println!("encrypt + encode (5 single compressions), 1 thread: {enc1e:.1} us");
    let pool1 = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let big: Vec<u64> = (0..16384).map(|_| r.random()).collect();
    let t = Instant::now();
    let batch1 = pool1.install(|| encrypt_batch(&pk, &big));
    let b1 = t.elapsed().as_secs_f64() * 1e6 / big.len() as f64;
    println!("encrypt_batch per value, 1 thread (batched encoding): {b1:.1} us");
    let t = Instant::now();
    let batch = encrypt_batch(&pk, &big);
    let b2 = t.elapsed().as_secs_f64() * 1e6 / big.len() as f64;
    println!("encrypt_batch per value, all threads: {b2:.1} us (wall)");
    assert_eq!(batch.len(), batch1.len());

    let add = per_op_us(n - 1, |i| {
        std::hint::black_box(S::add(&cts[i], &cts[i + 1]));
    });
    println!("add (5 point additions): {add:.2} us");
    let encs: Vec<Vec<u8>> = cts.iter().map(S::encode).collect();
    let dec = per_op_us(n, |i| {
        std::hint::black_box(S::decode(&encs[i]).unwrap());
    });
    println!("decode (5 decompressions): {dec:.1} us");
    let idx: Vec<u32> = (0..big.len() as u32).collect();
    let t = Instant::now();
    pool1.install(|| sum_selected(&batch, &idx).unwrap());
    let s1 = t.elapsed().as_secs_f64() * 1e6 / idx.len() as f64;
    println!("sum_selected per row, 1 thread (decode + add): {s1:.1} us");
    let t = Instant::now();
    let sum = sum_selected(&batch, &idx).unwrap();
    println!(
        "sum_selected per row, all threads: {:.1} us (wall)",
        t.elapsed().as_secs_f64() * 1e6 / idx.len() as f64
    );
    let rr = per_op_us(200, |i| {
        std::hint::black_box(S::rerandomize(&pk, &cts[i]));
    });
    println!("rerandomize: {rr:.1} us");
    let ap = per_op_us(200, |i| {
        std::hint::black_box(S::add_plain(&cts[i], -(i as i64) * 77_777));
    });
    println!("add_plain (noise): {ap:.1} us");
    let t = Instant::now();
    let d = S::decrypt(&sk, &S::rerandomize(&pk, &sum)).unwrap();
    println!(
        "decrypt, 16384 random u64 summed: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(d, big.iter().map(|&v| i128::from(v)).sum::<i128>());

    let rows: i64 = 1 << 24;
    let limb_sum = rows * 0xffff;
    let worst = S::add_plain(&encrypt_limbs(&pk, [limb_sum, limb_sum, 0, 0]), -1_234_567);
    let total = i128::from(rows) * i128::from(u32::MAX) - 1_234_567;
    for threads in [1, 0] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let t = Instant::now();
        let got = pool.install(|| S::decrypt(&sk, &worst)).unwrap();
        println!(
            "decrypt worst-case cell (2^24 rows x (2^32-1) - noise), threads={}: {:.0} ms",
            pool.current_num_threads(),
            t.elapsed().as_secs_f64() * 1e3
        );
        assert_eq!(got, total);
    }
    let full = encrypt_limbs(&pk, [limb_sum; LIMBS]);
    let t = Instant::now();
    S::decrypt(&sk, &full).unwrap();
    println!(
        "decrypt worst-case cell, 2^24 rows x u64::MAX (all limbs full), all threads: {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    let e = S::decrypt(&sk, &encrypt_limbs(&pk, [LIMB_MAX as i64, 0, 0, 0]));
    println!(
        "decrypt out-of-range (error after capped search): {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert!(e.is_err());
}
