//! What `psi_tests.rs` and `overlap_sum_tests.rs` share to drive a two-party protocol in memory:
//! a [`Side`] does each [`Step`] its protocol hands out (CPU work inline, noise drawn at once)
//! and keeps what it sent, audited, re-checked and was charged, so a test wires two sides back to
//! back and checks the wire order without sockets; the tampers ([`nth`], [`hello`],
//! [`first_of`], [`on_points`]) play a hostile peer by rewriting the frames one side sends.

use std::collections::VecDeque;

use cleanroom_proto::v1::envelope::Body;
use cleanroom_proto::v1::{Abort, Envelope, Phase, PsiHello};

use cleanroom_circuits::ahe::{SecretKey, SlotLayout, encrypt_rows};
use cleanroom_circuits::{JobKey, reblind_points};

use crate::audit::AuditEvent;
use crate::data::cluster_merge::merge_in_process;
use crate::data::cluster_pass::SealingKey;
use crate::data::cluster_reblind::ReblindFailure;
use crate::error::JobError;
use crate::job::protocol::{EncryptPiece, NoiseRequest, Protocol, ReblindPiece, Step};
use crate::ledger::Loss;

/// One side: its protocol and what it did besides sending.
pub(super) struct Side<P: Protocol> {
    pub(super) proto: P,
    pub(super) inbox: VecDeque<Envelope>,
    pub(super) audited: Vec<AuditEvent>,
    pub(super) rechecks: usize,
    /// The losses it asked to be charged, and the noise drawn for it.
    pub(super) charges: Vec<(Option<Loss>, Vec<i64>)>,
    pub(super) finished_stream: bool,
    pub(super) error: Option<JobError>,
    /// A copy of the side's job key, when its protocol hands out pieces to re-blind (its
    /// "cluster"); the pieces out, and how many were.
    pub(super) cluster_key: Option<JobKey>,
    pub(super) pieces: Vec<ReblindPiece>,
    pub(super) pieces_handed_out: usize,
    /// A copy of a value holder's Paillier key and its layout, when its protocol hands out rows
    /// to encrypt; the pieces out, and how many were.
    pub(super) cluster_paillier: Option<(SecretKey, SlotLayout)>,
    pub(super) rows_to_encrypt: Vec<EncryptPiece>,
    pub(super) encrypt_pieces_handed_out: usize,
    /// The most points one frame it sent held.
    pub(super) most_points_in_a_frame: usize,
    /// When its protocol hands its buckets out to merge: the sealing key and the job's bucket
    /// directory its "executors" read; and how many merges it handed out.
    pub(super) merge_dir: Option<(SealingKey, std::path::PathBuf)>,
    pub(super) merges_handed_out: usize,
}

impl<P: Protocol> Side<P> {
    pub(super) fn new(proto: P) -> Self {
        Side {
            proto,
            inbox: VecDeque::new(),
            audited: Vec::new(),
            rechecks: 0,
            charges: Vec::new(),
            finished_stream: false,
            error: None,
            cluster_key: None,
            pieces: Vec::new(),
            pieces_handed_out: 0,
            cluster_paillier: None,
            rows_to_encrypt: Vec::new(),
            encrypt_pieces_handed_out: 0,
            most_points_in_a_frame: 0,
            merge_dir: None,
            merges_handed_out: 0,
        }
    }

    /// A side whose protocol re-blinds the partner's points off the node with `key` (a copy of
    /// its job key), as its executors would.
    pub(super) fn with_cluster(proto: P, key: JobKey) -> Self {
        let mut side = Side::new(proto);
        side.cluster_key = Some(key);
        side
    }

    /// Re-blinds the last piece handed out and hands it back (a cluster finishes pieces in any
    /// order: here the latest first, so a later piece comes back before an earlier one
    /// whenever two are out). Whether there was one.
    pub(super) fn finish_pieces(&mut self) -> bool {
        if self.error.is_some() {
            return false;
        }
        if let Some(piece) = self.rows_to_encrypt.pop() {
            let Some((key, layout)) = &self.cluster_paillier else {
                panic!("rows to encrypt from a side without a cluster");
            };
            let result = encrypt_rows(key, layout, &piece.rows).map_err(|e| e.to_string());
            if let Err(e) = self.proto.handle_encrypted(piece.offset, result) {
                self.error = Some(e);
            }
            return true;
        }
        let Some(piece) = self.pieces.pop() else {
            return false;
        };
        let Some(key) = &self.cluster_key else {
            panic!("a piece to re-blind from a side without a cluster");
        };
        let result = reblind_points(key, &piece.points).map_err(ReblindFailure::Peer);
        if let Err(e) = self.proto.handle_reblinded(piece.offset, result) {
            self.error = Some(e);
        }
        true
    }

    /// Does what the protocol asks until it waits for a frame; returns the frames it sent.
    pub(super) fn drain(&mut self) -> Vec<Envelope> {
        let mut sent = Vec::new();
        while let Some(step) = self.proto.next_step() {
            let r = match step {
                Step::Send(env) => {
                    assert!(
                        !self.finished_stream,
                        "a frame after the stream was finished"
                    );
                    if let Some(Body::Points(b)) = &env.body {
                        self.most_points_in_a_frame =
                            self.most_points_in_a_frame.max(b.points.len() / 32);
                    }
                    sent.push(*env);
                    Ok(())
                }
                Step::Recheck => {
                    self.rechecks += 1;
                    Ok(())
                }
                Step::Audit(event) => {
                    self.audited.push(event);
                    Ok(())
                }
                Step::Compute(work) => self.proto.handle_done(P::run(work)),
                Step::Reblind(piece) => {
                    self.pieces.push(piece);
                    self.pieces_handed_out += 1;
                    Ok(())
                }
                Step::Encrypt(piece) => {
                    self.rows_to_encrypt.push(piece);
                    self.encrypt_pieces_handed_out += 1;
                    Ok(())
                }
                Step::Merge(request) => {
                    let Some((sealing, dir)) = &self.merge_dir else {
                        panic!("buckets to merge from a side without a shared directory");
                    };
                    self.merges_handed_out += 1;
                    let answers = merge_in_process(sealing, dir, request.merge);
                    self.proto.handle_merged(answers)
                }
                Step::Charge(NoiseRequest { loss, draw }) => {
                    let noise = draw().expect("noise");
                    self.charges.push((loss, noise.clone()));
                    self.proto.handle_noise(noise, loss.is_some())
                }
                Step::Finish => {
                    self.finished_stream = true;
                    Ok(())
                }
            };
            if let Err(e) = r {
                self.error = Some(e);
                return sent;
            }
        }
        sent
    }

    /// Hands over one waiting frame, if the side is still going.
    pub(super) fn step(&mut self) -> bool {
        if self.error.is_some() || self.proto.is_finished() || self.proto.waits_for_pieces() {
            return false;
        }
        let Some(env) = self.inbox.pop_front() else {
            return false;
        };
        if let Err(e) = self.proto.handle(env) {
            self.error = Some(e);
        }
        true
    }
}

/// `f` applied to frame number `n` (0 = the hello), the others untouched.
pub(super) fn nth(
    n: usize,
    mut f: impl FnMut(Envelope) -> Vec<Envelope>,
) -> impl FnMut(Envelope) -> Vec<Envelope> {
    let mut i = 0;
    move |env| {
        let here = i;
        i += 1;
        if here == n { f(env) } else { vec![env] }
    }
}

/// Frame number `n`'s body replaced by an abort with `reason`.
pub(super) fn abort_at(n: usize, reason: &str) -> impl FnMut(Envelope) -> Vec<Envelope> + 'static {
    let reason = reason.to_owned();
    nth(n, move |env| {
        vec![Envelope {
            body: Some(Body::Abort(Abort {
                reason: reason.clone(),
            })),
            ..env
        }]
    })
}

/// `f` applied to the hello.
pub(super) fn hello(mut f: impl FnMut(&mut PsiHello)) -> impl FnMut(Envelope) -> Vec<Envelope> {
    nth(0, move |mut env| {
        if let Some(Body::PsiHello(h)) = &mut env.body {
            f(h);
        }
        vec![env]
    })
}

/// `f` applied to the first frame of `phase` whose body `is` picks.
pub(super) fn first_of(
    phase: Phase,
    is: fn(&Body) -> bool,
    mut f: impl FnMut(Envelope) -> Vec<Envelope>,
) -> impl FnMut(Envelope) -> Vec<Envelope> {
    let mut done = false;
    move |env| {
        if !done && env.phase == phase as i32 && env.body.as_ref().is_some_and(is) {
            done = true;
            f(env)
        } else {
            vec![env]
        }
    }
}

/// `f` applied to the points of the first batch of `phase`.
pub(super) fn on_points(
    phase: Phase,
    f: fn(&mut Vec<u8>),
) -> impl FnMut(Envelope) -> Vec<Envelope> {
    first_of(phase, is_points, move |mut env| {
        if let Some(Body::Points(b)) = &mut env.body {
            f(&mut b.points);
        }
        vec![env]
    })
}

pub(super) fn is_points(b: &Body) -> bool {
    matches!(b, Body::Points(_))
}

pub(super) fn is_end(b: &Body) -> bool {
    matches!(b, Body::BatchEnd(_))
}
