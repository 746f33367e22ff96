//! What a peer may make the data-plane reader buffer.
//!
//! The reader drains the peer's stream into memory as fast as it arrives (so flow control can
//! never deadlock the two sides), while the job may be busy for seconds loading and blinding its
//! own set. Without a budget, a peer could fill that buffer with points it never declared (it
//! was capped only by the policy's maximum set size, 10^8 points by default), with empty
//! batches, or with endless end markers. The budget admits, per job: blinded points up to what
//! the peer declared in its hello (never above the policy maximum), returned points up to what
//! we sent, point batches in no other phase, no empty batch, and a handful of frames that carry
//! no points (an honest peer sends four: three end markers and perhaps an abort; its hello is
//! counted apart).
//!
//! An `overlap-sum` adds two phases: the value holder's encrypted rows (`SUM_ROWS`), admitted up
//! to its declared set size times the row length its hello's layout implies, and the key
//! holder's one result ciphertext (`SUM_RESULT`), admitted once.

use cleanroom_circuits::POINT_LEN;
use cleanroom_proto::v1::{Envelope, Phase, envelope::Body};

/// Frames without points an honest peer never exceeds.
pub const MAX_OTHER_FRAMES: u32 = 8;

/// Running totals of one peer stream against its limits.
#[derive(Debug)]
pub struct FrameBudget {
    max_blinded: u64,
    own_size: u64,
    blinded: u64,
    returned: u64,
    other_frames: u32,
    hello_seen: bool,
    /// Most bytes of encrypted rows (declared rows × row length; 0 until a value holder's hello).
    max_row_bytes: u64,
    row_bytes: u64,
    result_batches: u32,
}

impl FrameBudget {
    /// A budget for a peer whose set may be at most `max_peer_set` (the policy's bound) and to
    /// whom we send `own_size` points to be returned.
    pub fn new(max_peer_set: u64, own_size: u64) -> Self {
        Self {
            max_blinded: max_peer_set,
            own_size,
            blinded: 0,
            returned: 0,
            other_frames: 0,
            hello_seen: false,
            max_row_bytes: 0,
            row_bytes: 0,
            result_batches: 0,
        }
    }

    /// Admits the next frame, or says why the peer has exceeded what it may send.
    pub fn admit(&mut self, env: &Envelope) -> Result<(), String> {
        match &env.body {
            Some(Body::Points(batch)) => {
                if batch.points.is_empty() {
                    return Err("sent an empty point batch".into());
                }
                let n = (batch.points.len() / POINT_LEN) as u64;
                if env.phase == Phase::PsiBlinded as i32 {
                    self.blinded = self.blinded.saturating_add(n);
                    if self.blinded > self.max_blinded {
                        return Err(format!(
                            "sent more blinded points than the {} it may",
                            self.max_blinded
                        ));
                    }
                } else if env.phase == Phase::PsiDoubleBlinded as i32 {
                    self.returned = self.returned.saturating_add(n);
                    if self.returned > self.own_size {
                        return Err(format!(
                            "returned more points than the {} we sent",
                            self.own_size
                        ));
                    }
                } else if env.phase == Phase::SumRows as i32 {
                    self.row_bytes = self.row_bytes.saturating_add(batch.points.len() as u64);
                    if self.row_bytes > self.max_row_bytes {
                        return Err(format!(
                            "sent more than the {} bytes of encrypted rows its hello declared",
                            self.max_row_bytes
                        ));
                    }
                } else if env.phase == Phase::SumResult as i32 {
                    self.result_batches += 1;
                    if self.result_batches > 1 {
                        return Err("sent more than one result ciphertext".into());
                    }
                } else {
                    let phase = Phase::try_from(env.phase)
                        .map_or_else(|_| env.phase.to_string(), |p| p.as_str_name().to_owned());
                    return Err(format!("sent a point batch in phase {phase}"));
                }
            }
            // Its first hello lowers the cap to what it declared (the job itself checks the
            // declaration against the policy, and any later hello is a protocol error).
            Some(Body::PsiHello(hello)) if !self.hello_seen => {
                self.hello_seen = true;
                self.max_blinded = self.max_blinded.min(hello.set_size);
                if let Some(sum) = &hello.sum {
                    // One 512-byte Paillier ciphertext per plaintext of the slot layout the
                    // widths describe; a layout the session would refuse allows no rows.
                    let row_len = cleanroom_circuits::ahe::SlotLayout::new(&sum.widths)
                        .map_or(0, |l| l.ciphertext_len() as u64);
                    self.max_row_bytes = self.max_blinded.saturating_mul(row_len);
                }
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

    fn env(phase: Phase, body: Body) -> Envelope {
        Envelope {
            job_id: "j".into(),
            phase: phase as i32,
            body: Some(body),
        }
    }

    fn points(phase: Phase, n: usize) -> Envelope {
        env(
            phase,
            Body::Points(PointBatch {
                seq: 0,
                points: vec![1; n * POINT_LEN],
            }),
        )
    }

    fn hello(set_size: u64) -> Envelope {
        env(
            Phase::PsiSize,
            Body::PsiHello(PsiHello {
                sender: "p".into(),
                set_size,
                ..PsiHello::default()
            }),
        )
    }

    #[test]
    fn the_hello_lowers_the_blinded_cap_to_the_declared_size() {
        let mut b = FrameBudget::new(1_000_000, 3);
        b.admit(&hello(4)).unwrap();
        b.admit(&points(Phase::PsiBlinded, 4)).unwrap();
        let err = b.admit(&points(Phase::PsiBlinded, 1)).unwrap_err();
        assert_eq!(err, "sent more blinded points than the 4 it may");
    }

    #[test]
    fn encrypted_rows_are_capped_at_what_the_value_holders_hello_declares() {
        let mut b = FrameBudget::new(1_000, 3);
        // Without a value holder's hello, no rows at all.
        assert!(b.admit(&points(Phase::SumRows, 1)).is_err());
        let mut b = FrameBudget::new(1_000, 3);
        let mut h = hello(2);
        if let Some(Body::PsiHello(hello)) = &mut h.body {
            hello.sum = Some(cleanroom_proto::v1::SumTerms {
                widths: vec![65, 65],
                ..Default::default()
            });
        }
        b.admit(&h).unwrap();
        // Two 65-bit slots fit one plaintext: 2 rows of 512 bytes = 1024 bytes = 32 "points".
        b.admit(&points(Phase::SumRows, 32)).unwrap();
        assert!(
            b.admit(&points(Phase::SumRows, 1))
                .unwrap_err()
                .contains("1024 bytes of encrypted rows")
        );
        b.admit(&points(Phase::SumResult, 4)).unwrap();
        assert_eq!(
            b.admit(&points(Phase::SumResult, 4)).unwrap_err(),
            "sent more than one result ciphertext"
        );
    }

    #[test]
    fn returned_points_are_capped_at_ours() {
        let mut b = FrameBudget::new(10, 3);
        b.admit(&hello(4)).unwrap();
        b.admit(&points(Phase::PsiDoubleBlinded, 3)).unwrap();
        let err = b.admit(&points(Phase::PsiDoubleBlinded, 1)).unwrap_err();
        assert_eq!(err, "returned more points than the 3 we sent");
    }

    #[test]
    fn a_hello_cannot_raise_the_policy_cap() {
        let mut b = FrameBudget::new(5, 1);
        b.admit(&hello(u64::MAX)).unwrap();
        b.admit(&points(Phase::PsiBlinded, 5)).unwrap();
        assert!(b.admit(&points(Phase::PsiBlinded, 1)).is_err());
    }

    #[test]
    fn empty_batches_and_points_in_other_phases_are_refused() {
        let mut b = FrameBudget::new(10, 10);
        assert_eq!(
            b.admit(&points(Phase::PsiBlinded, 0)).unwrap_err(),
            "sent an empty point batch"
        );
        assert_eq!(
            b.admit(&points(Phase::PsiDone, 1)).unwrap_err(),
            "sent a point batch in phase PHASE_PSI_DONE"
        );
        let mut odd = points(Phase::PsiBlinded, 1);
        odd.phase = 77;
        assert_eq!(b.admit(&odd).unwrap_err(), "sent a point batch in phase 77");
    }

    #[test]
    fn frames_without_points_are_capped() {
        let mut b = FrameBudget::new(10, 10);
        b.admit(&hello(4)).unwrap();
        let end = env(Phase::PsiDone, Body::BatchEnd(BatchEnd { total: 0 }));
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
