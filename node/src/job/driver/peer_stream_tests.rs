use std::path::Path;
use std::sync::atomic::Ordering;

use cleanroom_proto::v1::{Abort, BatchEnd, Envelope, Phase, PointBatch, envelope::Body};

use super::{PeerFrames, QueueIn, ReadAhead, queue};
use crate::error::{JobError, NodeError};

/// One batch as the peer would send it: 4096 points of 32 bytes, each byte telling the batch.
fn batch(seq: u64) -> Envelope {
    Envelope {
        job_id: "job-1".into(),
        phase: Phase::PsiDoubleBlinded as i32,
        body: Some(Body::Points(PointBatch {
            seq,
            points: vec![(seq % 251) as u8; 4096 * 32],
        })),
    }
}

const BATCH_BYTES: u64 = 4096 * 32;

fn end_marker() -> Envelope {
    Envelope {
        job_id: "job-1".into(),
        phase: Phase::PsiDoubleBlinded as i32,
        body: Some(Body::BatchEnd(BatchEnd { total: 7 })),
    }
}

fn bounded(dir: &Path, cap: u64) -> (QueueIn, PeerFrames) {
    queue("globex", Some((ReadAhead { cap }, dir))).expect("queue")
}

fn held(frames: &PeerFrames) -> u64 {
    frames.held.load(Ordering::Acquire)
}

#[test]
fn the_bound_is_a_thirty_second_of_the_limit_within_1_and_64_mib() {
    assert_eq!(ReadAhead::for_limit(1 << 30).cap, 32 << 20);
    assert_eq!(ReadAhead::for_limit(16 << 20).cap, 1 << 20);
    assert_eq!(ReadAhead::for_limit(8 << 30).cap, 64 << 20);
}

#[test]
fn beyond_the_cap_points_wait_in_a_file_and_come_back_whole_and_in_order() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut tx, mut frames) = bounded(dir.path(), 2 * BATCH_BYTES);
    for seq in 0..10 {
        assert!(tx.push(Box::new(batch(seq))));
        assert!(held(&frames) <= 2 * BATCH_BYTES, "memory over the cap");
    }
    assert!(tx.push(Box::new(end_marker())));
    // Two batches in memory, eight in the file.
    assert_eq!(held(&frames), 2 * BATCH_BYTES);
    assert_eq!(tx.written, 8 * BATCH_BYTES);
    for seq in 0..10 {
        let env = frames.try_next().expect("frame").expect("queued");
        assert_eq!(env, batch(seq), "batch {seq} changed on its way");
    }
    assert_eq!(frames.try_next().expect("frame"), Some(end_marker()));
    assert_eq!(held(&frames), 0);
    assert_eq!(frames.read_back(), 8 * BATCH_BYTES);
    assert_eq!(frames.try_next().expect("empty"), None);
}

#[test]
fn memory_is_used_again_once_the_protocol_takes_frames() {
    let dir = tempfile::tempdir().expect("dir");
    let (mut tx, mut frames) = bounded(dir.path(), BATCH_BYTES);
    for seq in 0..3 {
        assert!(tx.push(Box::new(batch(seq))));
    }
    assert_eq!(tx.written, 2 * BATCH_BYTES);
    // Taking the one in memory frees room: the next batch stays in memory, behind the two in
    // the file, and the order holds.
    assert_eq!(frames.try_next().expect("frame"), Some(batch(0)));
    assert!(tx.push(Box::new(batch(3))));
    assert_eq!(tx.written, 2 * BATCH_BYTES);
    assert_eq!(held(&frames), BATCH_BYTES);
    for seq in 1..4 {
        assert_eq!(frames.try_next().expect("frame"), Some(batch(seq)));
    }
}

#[test]
fn the_file_has_no_name_so_nothing_is_left_in_the_spill_directory() {
    let dir = tempfile::tempdir().expect("dir");
    let spill = dir.path().join("spill");
    let (mut tx, frames) = bounded(&spill, BATCH_BYTES);
    for seq in 0..4 {
        assert!(tx.push(Box::new(batch(seq))));
    }
    assert_eq!(tx.written, 3 * BATCH_BYTES);
    let names: Vec<_> = std::fs::read_dir(&spill).expect("spill dir").collect();
    assert!(names.is_empty(), "a named file in the spill directory");
    drop((tx, frames));
}

#[test]
fn without_a_limit_everything_waits_in_memory() {
    let (mut tx, mut frames) = queue("globex", None).expect("queue");
    for seq in 0..5 {
        assert!(tx.push(Box::new(batch(seq))));
    }
    assert_eq!(tx.written, 0);
    assert_eq!(held(&frames), 5 * BATCH_BYTES);
    for seq in 0..5 {
        assert_eq!(frames.try_next().expect("frame"), Some(batch(seq)));
    }
}

#[test]
fn an_abort_and_a_failed_file_end_the_job_with_their_reason() {
    let (mut tx, mut frames) = queue("globex", None).expect("queue");
    let abort = Envelope {
        job_id: "job-1".into(),
        phase: Phase::PsiDone as i32,
        body: Some(Body::Abort(Abort {
            reason: "policy changed".into(),
        })),
    };
    assert!(tx.push(Box::new(abort)));
    match frames.try_next() {
        Err(NodeError::Job(JobError::Aborted { reason, .. })) => {
            assert_eq!(reason, "policy changed")
        }
        other => panic!("expected the peer's abort, got {other:?}"),
    }
    tx.end(super::Incoming::Local(
        "could not write the peer's frames to the spill directory: disk full".into(),
    ));
    let err = frames.try_next().expect_err("a local failure");
    let text = err.to_string();
    assert!(
        text.contains("read-ahead") && text.contains("disk full"),
        "{text}"
    );
    // The reader is gone: the stream ended early.
    drop(tx);
    assert!(matches!(frames.try_next(), Ok(None)));
}

#[test]
fn a_spill_directory_that_cannot_be_created_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("file");
    let err = match queue("globex", Some((ReadAhead { cap: 1 }, &file))) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a file is not a spill directory"),
    };
    assert!(err.contains("spill directory"), "{err}");
}
