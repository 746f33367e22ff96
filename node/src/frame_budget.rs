//! What a peer may make the data-plane reader buffer.
//!
//! The reader drains the peer's stream into memory as fast as it arrives (so flow control can
//! never deadlock the two sides), while the job may be busy blinding its own set. Without a
//! budget, a peer could fill that buffer with points it never declared, with empty batches, or
//! with endless end markers. The budget admits, per job: points up to what the peer declared in
//! its hello (never above the policy maximum) plus our own points coming back, no empty batch,
//! and a handful of frames that carry no points (an honest peer sends four: three end markers
//! and perhaps an abort; its hello is counted apart).

use cleanroom_circuits::POINT_LEN;
use cleanroom_proto::v1::{Envelope, envelope::Body};

/// Frames without points an honest peer never exceeds.
pub const MAX_OTHER_FRAMES: u32 = 8;

/// Running totals of one peer stream against its limits.
#[derive(Debug)]
pub struct FrameBudget {
    max_points: u64,
    own_size: u64,
    points: u64,
    other_frames: u32,
    hello_seen: bool,
}

impl FrameBudget {
    /// A budget for a peer whose set may be at most `max_peer_set` (the policy's bound) and to
    /// whom we send `own_size` points to be returned.
    pub fn new(max_peer_set: u64, own_size: u64) -> Self {
        Self {
            max_points: max_peer_set.saturating_add(own_size),
            own_size,
            points: 0,
            other_frames: 0,
            hello_seen: false,
        }
    }

    /// Admits the next frame, or says why the peer has exceeded what it may send.
    pub fn admit(&mut self, env: &Envelope) -> Result<(), String> {
        match &env.body {
            Some(Body::Points(batch)) => {
                if batch.points.is_empty() {
                    return Err("sent an empty point batch".into());
                }
                self.points = self
                    .points
                    .saturating_add((batch.points.len() / POINT_LEN) as u64);
                if self.points > self.max_points {
                    return Err(format!(
                        "sent more than the {} points it may",
                        self.max_points
                    ));
                }
            }
            // Its first hello lowers the cap to what it declared (the job itself checks the
            // declaration against the policy, and any later hello is a protocol error).
            Some(Body::PsiHello(hello)) if !self.hello_seen => {
                self.hello_seen = true;
                self.max_points = self
                    .max_points
                    .min(hello.set_size.saturating_add(self.own_size));
            }
            _ => {
                self.other_frames += 1;
                if self.other_frames > MAX_OTHER_FRAMES {
                    return Err(format!(
                        "sent more than {MAX_OTHER_FRAMES} frames that carry no points"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use cleanroom_proto::v1::{BatchEnd, PointBatch, PsiHello};

    use super::*;

    fn env(body: Body) -> Envelope {
        Envelope {
            job_id: "j".into(),
            phase: 0,
            body: Some(body),
        }
    }

    fn points(n: usize) -> Envelope {
        env(Body::Points(PointBatch {
            seq: 0,
            points: vec![1; n * POINT_LEN],
        }))
    }

    fn hello(set_size: u64) -> Envelope {
        env(Body::PsiHello(PsiHello {
            sender: "p".into(),
            set_size,
            spec_digest: Vec::new(),
        }))
    }

    #[test]
    fn the_hello_lowers_the_cap_to_the_declared_size_plus_ours() {
        let mut b = FrameBudget::new(1_000_000, 3);
        b.admit(&hello(4)).unwrap();
        b.admit(&points(7)).unwrap();
        let err = b.admit(&points(1)).unwrap_err();
        assert_eq!(err, "sent more than the 7 points it may");
    }

    #[test]
    fn a_hello_cannot_raise_the_policy_cap() {
        let mut b = FrameBudget::new(5, 1);
        b.admit(&hello(u64::MAX)).unwrap();
        b.admit(&points(6)).unwrap();
        assert!(b.admit(&points(1)).is_err());
    }

    #[test]
    fn empty_batches_are_refused() {
        let mut b = FrameBudget::new(10, 10);
        assert_eq!(
            b.admit(&points(0)).unwrap_err(),
            "sent an empty point batch"
        );
    }

    #[test]
    fn frames_without_points_are_capped() {
        let mut b = FrameBudget::new(10, 10);
        b.admit(&hello(4)).unwrap();
        let end = env(Body::BatchEnd(BatchEnd { total: 0 }));
        for _ in 0..MAX_OTHER_FRAMES {
            b.admit(&end).unwrap();
        }
        assert!(
            b.admit(&end)
                .unwrap_err()
                .contains("frames that carry no points")
        );
        // A second hello counts as such a frame.
        let mut b = FrameBudget::new(10, 10);
        for _ in 0..=MAX_OTHER_FRAMES {
            b.admit(&hello(4)).unwrap();
        }
        assert!(b.admit(&hello(4)).is_err());
    }
}
