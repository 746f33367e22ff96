use super::*;
use crate::job::spill::FileStore;
use cleanroom_circuits::spill::PointStore;
use datafusion::arrow::array::{Array, BinaryArray};

/// Bucket `bucket`'s spec for the job in `dir`, sealed as the node seals it.
fn seal_spec(
    sealing: &SealingKey,
    merge: Merge,
    bucket: usize,
    dir: &Path,
) -> Result<Vec<u8>, String> {
    BucketSpec::of(merge, bucket, dir)?.seal(sealing)
}

fn sealing() -> Arc<SealingKey> {
    Arc::new(SealingKey::from_bytes(&[9; 32]).expect("a key"))
}

/// A point of bucket `bucket`, told apart by `i`.
fn point(bucket: u8, i: u16) -> [u8; 32] {
    let mut p = [0u8; 32];
    p[1] = bucket;
    p[2..4].copy_from_slice(&i.to_le_bytes());
    p
}

/// Runs the executor's function on sealed specs, one row each, as a task would.
fn run(udf: &ScalarUDF, specs: &[Vec<u8>]) -> datafusion::error::Result<Vec<Vec<u8>>> {
    use datafusion::arrow::array::StringArray;
    use datafusion::arrow::datatypes::Field;
    let texts: StringArray = specs.iter().map(|s| Some(hex::encode(s))).collect();
    let args = ScalarFunctionArgs {
        args: vec![ColumnarValue::Array(Arc::new(texts))],
        arg_fields: vec![Arc::new(Field::new("s", DataType::Utf8, true))],
        number_rows: specs.len(),
        return_field: Arc::new(Field::new("out", DataType::Binary, true)),
        config_options: Arc::new(datafusion::config::ConfigOptions::default()),
    };
    let ColumnarValue::Array(out) = udf.invoke_with_args(args)? else {
        panic!("an array");
    };
    let out = out.as_any().downcast_ref::<BinaryArray>().expect("binary");
    Ok((0..out.len()).map(|i| out.value(i).to_vec()).collect())
}

/// A job's store with buckets 0, 7 and 255 filled: the peer's points 0..50 of each, ours
/// returned 30..80 of each (placed at `bucket * 100 + i` when `placed`).
fn filled_store(root: &Path, placed: bool) -> FileStore {
    let mut store = FileStore::create(root, "job-merge").expect("a store");
    for b in [0u8, 7, 255] {
        let peer: Vec<u8> = (0..50).flat_map(|i| point(b, i)).collect();
        store.put(PointSet::Peer, b.into(), &peer).expect("written");
        // Appended in pieces, as a session does: some of it sits in the write buffer.
        for chunk in (30..80).collect::<Vec<u16>>().chunks(7) {
            let mut bytes = Vec::new();
            for &i in chunk {
                bytes.extend_from_slice(&point(b, i));
                if placed {
                    bytes.extend_from_slice(&(u32::from(b) * 100 + u32::from(i)).to_le_bytes());
                }
            }
            let set = if placed {
                PointSet::ReturnedPlaced
            } else {
                PointSet::Returned
            };
            store.append(set, b.into(), &bytes).expect("written");
        }
    }
    store
}

#[test]
fn an_executor_merges_a_jobs_bucket_files_as_the_node_would() {
    let root = tempfile::tempdir().expect("a directory");
    let sealing = sealing();
    let udf = MergeUdf::executor(Arc::clone(&sealing));
    for (merge, placed) in [(Merge::Count, false), (Merge::OurPlaces, true)] {
        let mut store = filled_store(root.path(), placed);
        store.flush().expect("flushed");
        let dir = store.dir().to_path_buf();
        let specs: Vec<Vec<u8>> = (0..BUCKETS)
            .map(|b| seal_spec(&sealing, merge, b, &dir).expect("sealed"))
            .collect();
        let answers = run(&udf, &specs).expect("runs");
        let (first_set, second_set) = merge.sets();
        for (b, answer) in answers.iter().enumerate() {
            let got = decode_answer(merge, b, answer).expect("an answer");
            let mut first = store.read(first_set, b).expect("read");
            let mut second = store.read(second_set, b).expect("read");
            let want = merge_bucket(merge, &mut first, &mut second).expect("merged");
            let got = match got {
                BucketMatches::Places(mut p) => {
                    p.sort_unstable();
                    BucketMatches::Places(p)
                }
                count => count,
            };
            assert_eq!(got, want, "bucket {b}");
            let filled = [0, 7, 255].contains(&b);
            match got {
                BucketMatches::Count(n) => assert_eq!(n, if filled { 20 } else { 0 }),
                BucketMatches::Places(p) => assert_eq!(p.len(), if filled { 20 } else { 0 }),
            }
        }
    }
}

/// What a store buffers is not on disk: a spec made before the flush sees none of it (and
/// fails once the files grow past the sizes it carries); one made after sees everything.
#[test]
fn an_executor_reads_what_the_store_flushed_not_what_it_buffers() {
    let root = tempfile::tempdir().expect("a directory");
    let sealing = sealing();
    let store = filled_store(root.path(), false);
    let early = seal_spec(&sealing, Merge::Count, 7, store.dir()).expect("sealed");
    let udf = MergeUdf::executor(Arc::clone(&sealing));
    let before = run(&udf, std::slice::from_ref(&early)).expect("runs");
    // Not flushed: the returned points' writes are still buffered.
    assert_eq!(
        decode_answer(Merge::Count, 7, &before[0]).expect("an answer"),
        BucketMatches::Count(0)
    );
    let mut store = store;
    store.flush().expect("flushed");
    let err = run(&udf, &[early]).unwrap_err().to_string();
    assert!(err.contains("where the node wrote"), "{err}");
    let spec = seal_spec(&sealing, Merge::Count, 7, store.dir()).expect("sealed");
    let after = run(&udf, &[spec]).expect("runs");
    assert_eq!(
        decode_answer(Merge::Count, 7, &after[0]).expect("an answer"),
        BucketMatches::Count(20)
    );
}

#[test]
fn a_spec_opens_only_with_the_executors_key_for_a_jobs_directory() {
    let root = tempfile::tempdir().expect("a directory");
    let sealing = sealing();
    let store = filled_store(root.path(), false);
    let spec = seal_spec(&sealing, Merge::Count, 0, store.dir()).expect("sealed");
    let other = Arc::new(SealingKey::from_bytes(&[1; 32]).expect("a key"));
    let err = run(&MergeUdf::executor(other), std::slice::from_ref(&spec)).unwrap_err();
    assert!(err.to_string().contains("sealing key"), "{err}");
    let err = run(&MergeUdf::planner(), &[spec]).unwrap_err();
    assert!(err.to_string().contains("holds no sealing key"), "{err}");

    let udf = MergeUdf::executor(Arc::clone(&sealing));
    for dir in [Path::new("/etc"), Path::new("psi-relative"), root.path()] {
        let spec = seal_spec(&sealing, Merge::Count, 0, dir).expect("sealed");
        let err = run(&udf, &[spec]).unwrap_err();
        assert!(
            err.to_string().contains("not a job's bucket directory"),
            "{dir:?}: {err}"
        );
    }
    // Sealed for another function (re-blinding's key): refused.
    let foreign = sealing
        .seal(b"cleanroom executor reblind v1", &[1, 1, 0, 0])
        .expect("sealed");
    assert!(run(&udf, &[foreign]).is_err());
    // A bucket past the sets, or an unknown merge: refused before any file is read.
    let mut plain = vec![SPEC_VERSION, Merge::Count.code(), 0, 1];
    plain.extend_from_slice(&[0; 16]);
    plain.extend_from_slice(store.dir().to_str().expect("UTF-8").as_bytes());
    let past = sealing.seal(AAD, &plain).expect("sealed");
    let err = run(&udf, &[past]).unwrap_err();
    assert!(err.to_string().contains("past the sets"), "{err}");
    plain[1] = 9;
    plain[3] = 0;
    let unknown = sealing.seal(AAD, &plain).expect("sealed");
    let err = run(&udf, &[unknown]).unwrap_err();
    assert!(err.to_string().contains("no merge"), "{err}");
}

/// An executor that sees other bytes than the node wrote (another directory mounted at that
/// path, or writes not visible there yet) fails the piece instead of answering from them.
#[test]
fn an_executor_that_sees_other_files_than_the_node_fails_the_piece() {
    let root = tempfile::tempdir().expect("a directory");
    let sealing = sealing();
    let mut store = filled_store(root.path(), false);
    store.flush().expect("flushed");
    let spec = seal_spec(&sealing, Merge::Count, 7, store.dir()).expect("sealed");
    let udf = MergeUdf::executor(Arc::clone(&sealing));
    assert!(run(&udf, std::slice::from_ref(&spec)).is_ok());
    // The file grows (or another one stands there) after the node read its size.
    let path = bucket_path(store.dir(), PointSet::Returned, 7);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes.extend_from_slice(&point(7, 999));
    std::fs::write(&path, &bytes).expect("written");
    let err = run(&udf, std::slice::from_ref(&spec))
        .unwrap_err()
        .to_string();
    assert!(err.contains("where the node wrote"), "{err}");
    assert!(err.contains("shared_dir"), "{err}");
    // The executor sees an empty directory at the job's path (nothing mounted there): the node
    // wrote bytes it does not find.
    let node_sees = BucketSpec::of(Merge::Count, 0, store.dir()).expect("sizes");
    assert!(node_sees.sizes.iter().all(|&n| n > 0), "{node_sees:?}");
    let elsewhere = root.path().join("elsewhere/psi-job-merge-x");
    std::fs::create_dir_all(&elsewhere).expect("a directory");
    let unmounted = BucketSpec {
        dir: elsewhere,
        ..node_sees
    };
    let err = run(&udf, &[unmounted.seal(&sealing).expect("sealed")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("where the node wrote"), "{err}");
}

#[test]
fn a_point_twice_is_answered_as_the_partners_fault() {
    let root = tempfile::tempdir().expect("a directory");
    let sealing = sealing();
    let mut store = FileStore::create(root.path(), "job-twice").expect("a store");
    let p = point(3, 1);
    store.append(PointSet::Returned, 3, &p).expect("written");
    store.append(PointSet::Returned, 3, &p).expect("written");
    store.flush().expect("flushed");
    let spec = seal_spec(&sealing, Merge::Count, 3, store.dir()).expect("sealed");
    let answer = run(&MergeUdf::executor(sealing), &[spec]).expect("runs");
    assert!(matches!(
        decode_answer(Merge::Count, 3, &answer[0]),
        Err(MergeFailure::Peer(PsiError::DuplicateReturnedPoint))
    ));
}

#[test]
fn answers_the_node_cannot_use_are_refused() {
    let count = |b: u16, n: u64| {
        let mut a = b.to_le_bytes().to_vec();
        a.push(COUNT);
        a.extend_from_slice(&n.to_le_bytes());
        a
    };
    assert_eq!(
        decode_answer(Merge::Count, 4, &count(4, 9)).expect("an answer"),
        BucketMatches::Count(9)
    );
    let cluster =
        |r: Result<BucketMatches, MergeFailure>| matches!(r, Err(MergeFailure::Cluster(_)));
    assert!(cluster(decode_answer(Merge::Count, 5, &count(4, 9))));
    assert!(cluster(decode_answer(Merge::OurPlaces, 4, &count(4, 9))));
    assert!(cluster(decode_answer(Merge::Count, 4, &count(4, 9)[..10])));
    assert!(cluster(decode_answer(Merge::Count, 4, &[4])));
    let mut places = 4u16.to_le_bytes().to_vec();
    places.push(PLACES);
    places.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0]);
    assert!(cluster(decode_answer(Merge::PeerPlaces, 4, &places)));
    assert!(matches!(
        decode_answer(Merge::PeerPlaces, 4, &[4, 0, PEER_POINT_TWICE]),
        Err(MergeFailure::Peer(PsiError::DuplicatePeerPoint))
    ));
}

#[test]
fn a_plan_names_no_directory_and_pieces_fit_their_answers() {
    let sealing = sealing();
    let dir = Path::new("/shared/cleanroom/psi-job-secretive-name");
    let specs: Vec<Vec<u8>> = (0..3)
        .map(|b| seal_spec(&sealing, Merge::Count, b, dir).expect("sealed"))
        .collect();
    let plan = piece_plan(&specs).expect("a plan");
    let shown = format!("{}", plan.display_indent());
    assert!(shown.contains(UDF_NAME));
    assert!(!shown.contains("secretive"), "{shown}");

    // A small set: one piece (a cluster job costs a fixed part of a second).
    assert_eq!(buckets_per_piece(Merge::Count, 10, 16), 256);
    assert_eq!(buckets_per_piece(Merge::Count, 1 << 18, 16), 256);
    assert_eq!(buckets_per_piece(Merge::OurPlaces, 1_000, 2), 256);
    // A large one: spread over the pieces out at once, each of 2^20 records at least.
    assert_eq!(buckets_per_piece(Merge::Count, 1 << 24, 16), 16);
    assert_eq!(buckets_per_piece(Merge::Count, 1 << 30, 2), 128);
    assert_eq!(buckets_per_piece(Merge::Count, 1 << 30, 64), 4);
    // Places: no more buckets than their caps fit in a piece's answer.
    assert_eq!(buckets_per_piece(Merge::OurPlaces, 10_000_000, 2), 12);
    let at_limit = buckets_per_piece(Merge::PeerPlaces, 100_000_000, 16);
    assert_eq!(at_limit, 1);
    assert!(bucket_cap(100_000_000) * 4 <= PIECE_OUTPUT_BYTES);
}
