//! The wire order every job protocol shares, without I/O: frames stamped with the job id and
//! phase, point batches numbered from 0 within each phase ([`Outbox`]), and the checks on what a
//! peer sends (its phase, its batch numbers, the kind of message a phase takes). A failed check
//! is a [`Violation`]; the caller names the peer.

use std::time::Duration;

use cleanroom_proto::v1::{BatchEnd, Envelope, Phase, PointBatch, envelope::Body};

use crate::error::Violation;

/// Longest silence from the peer before its hello, and the base of the silence allowed later.
pub const STALL_BASE: Duration = Duration::from_secs(60);
/// Silence allowed per item of both sets on top of [`STALL_BASE`]: generous against the
/// ~100 µs per item per party that a 2-core machine needs, so a slow but honest peer is never
/// cut off while it blinds its set.
const STALL_PER_ITEM: Duration = Duration::from_micros(400);

/// How long the peer may stay silent once both set sizes are known.
pub fn stall_deadline(own: u64, peer: u64) -> Duration {
    let items = u32::try_from(own.saturating_add(peer)).unwrap_or(u32::MAX);
    STALL_BASE.saturating_add(STALL_PER_ITEM.saturating_mul(items))
}

/// Our side of a job's stream, as frames: each stamped with the job id and its phase, point
/// batches numbered from 0 within each phase.
#[derive(Debug)]
pub struct Outbox {
    job_id: String,
    phase: Phase,
    seq: u64,
}

impl Outbox {
    /// A stream for `job_id`, starting in `phase`.
    pub fn new(job_id: &str, phase: Phase) -> Outbox {
        Outbox {
            job_id: job_id.to_owned(),
            phase,
            seq: 0,
        }
    }

    fn enter(&mut self, phase: Phase) {
        if phase != self.phase {
            self.phase = phase;
            self.seq = 0;
        }
    }

    /// One frame of `phase`.
    pub fn frame(&mut self, phase: Phase, body: Body) -> Envelope {
        self.enter(phase);
        Envelope {
            job_id: self.job_id.clone(),
            phase: phase as i32,
            body: Some(body),
        }
    }

    /// Point batches of `phase`, numbered on from the last batch of the phase.
    pub fn points(&mut self, phase: Phase, batches: Vec<Vec<u8>>) -> Vec<Envelope> {
        self.enter(phase);
        batches
            .into_iter()
            .map(|points| {
                let seq = self.seq;
                self.seq += 1;
                self.frame(phase, Body::Points(PointBatch { seq, points }))
            })
            .collect()
    }

    /// The end marker of `phase`, with its total.
    pub fn end(&mut self, phase: Phase, total: u64) -> Envelope {
        self.frame(phase, Body::BatchEnd(BatchEnd { total }))
    }
}

/// The frame must be of `phase`.
pub fn check_phase(env: &Envelope, phase: Phase) -> Result<(), Violation> {
    if env.phase != phase as i32 {
        return Err(Violation::WrongPhase {
            got: env.phase,
            expected: phase,
        });
    }
    Ok(())
}

/// The batch must be the one due; moves the count on.
pub fn check_seq(seq: u64, expected: &mut u64) -> Result<(), Violation> {
    if seq != *expected {
        return Err(Violation::OutOfOrder {
            got: seq,
            expected: *expected,
        });
    }
    *expected += 1;
    Ok(())
}

/// The frame must be of `phase` and carry what `pick` takes.
pub fn expect_body<T>(
    env: &Envelope,
    phase: Phase,
    pick: impl Fn(&Body) -> Option<T>,
) -> Result<T, Violation> {
    check_phase(env, phase)?;
    env.body
        .as_ref()
        .and_then(pick)
        .ok_or_else(|| unexpected(phase, env.body.as_ref()))
}

/// A message `phase` does not take.
pub fn unexpected(phase: Phase, body: Option<&Body>) -> Violation {
    let what = match body {
        None => "an empty frame",
        Some(Body::PsiHello(_)) => "a hello",
        Some(Body::Points(_)) => "a point batch",
        Some(Body::BatchEnd(_)) => "an end marker",
        Some(Body::NoiseReveal(_)) => "a noise reveal",
        Some(_) => "a control-plane message",
    };
    Violation::Unexpected { what, phase }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_numbered_per_phase_and_any_frame_of_a_new_phase_restarts_them() {
        let mut out = Outbox::new("job-1", Phase::PsiSize);
        let seqs = |envs: Vec<Envelope>| -> Vec<u64> {
            envs.into_iter()
                .map(|e| match e.body {
                    Some(Body::Points(b)) => b.seq,
                    _ => u64::MAX,
                })
                .collect()
        };
        assert_eq!(
            seqs(out.points(Phase::PsiBlinded, vec![vec![1], vec![2]])),
            [0, 1]
        );
        assert_eq!(seqs(out.points(Phase::PsiBlinded, vec![vec![3]])), [2]);
        let end = out.end(Phase::PsiDoubleBlinded, 3);
        assert_eq!(end.phase, Phase::PsiDoubleBlinded as i32);
        assert_eq!(end.job_id, "job-1");
        assert_eq!(
            seqs(out.points(Phase::PsiDoubleBlinded, vec![vec![4]])),
            [0]
        );
    }

    #[test]
    fn checks_name_what_was_wrong() {
        let mut due = 0;
        assert_eq!(check_seq(0, &mut due), Ok(()));
        assert_eq!(
            check_seq(3, &mut due),
            Err(Violation::OutOfOrder {
                got: 3,
                expected: 1
            })
        );
        let env = Outbox::new("j", Phase::PsiDone).end(Phase::PsiDone, 1);
        assert_eq!(
            check_phase(&env, Phase::PsiBlinded),
            Err(Violation::WrongPhase {
                got: Phase::PsiDone as i32,
                expected: Phase::PsiBlinded
            })
        );
        let picked = expect_body(&env, Phase::PsiDone, |b| match b {
            Body::NoiseReveal(r) => Some(r.noise),
            _ => None,
        });
        assert_eq!(
            picked,
            Err(Violation::Unexpected {
                what: "an end marker",
                phase: Phase::PsiDone
            })
        );
    }
}
