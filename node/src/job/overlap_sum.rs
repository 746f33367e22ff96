//! The `overlap-sum` job (private intersection-sum with cardinality) as a sans-IO protocol:
//! [`KeyHolder`] and [`ValueHolder`] take the peer's frames, the results of CPU work and the
//! noise drawn for them, and hand out [`Step`]s (send, re-check, compute, charge, finish). They
//! never touch a socket, a task, the ledger or the clock; the job driver
//! ([`crate::job::driver::overlap_sum`]) does, and `overlap_sum_tests.rs` drives the two
//! against each other in memory.
//!
//! The cryptography is `cleanroom_circuits::intersection_sum`'s two by-value sessions; this
//! file adds the wire order around them and the agreement's terms: roles, the joint ε and
//! threshold ([`crate::policy::overlap_sum`]). The key holder (party 0) dials; each party opens
//! one unidirectional stream and writes, in order:
//!
//! ```text
//! key holder (A)                                value holder (B)
//! PsiHello(size, digest, SumTerms)             PsiHello(size, digest, SumTerms + layout, key,
//!                                                       sensitivities)      phase PSI_SIZE
//! PointBatch* BatchEnd   k_A·H(x), shuffled     PointBatch* BatchEnd   k_B·H(y)   PSI_BLINDED
//!                                               PointBatch* BatchEnd   A's points reblinded,
//!                                                                      shuffled   PSI_DOUBLE_BLINDED
//!                                               PointBatch* BatchEnd   Enc(rows)  SUM_ROWS
//! PointBatch             Enc(sums + noise)                                        SUM_RESULT
//! BatchEnd(0)                                   BatchEnd(0)                       PSI_DONE
//! ```
//!
//! The rows are packed Paillier ciphertexts (512 bytes, several cells per plaintext) under B's
//! fresh per-job key; B decrypts each cell whole.
//!
//! A learns `|A ∩ B|` exactly (the protocol cannot avoid it) and releases nothing. With a joint ε,
//! **both** add noise at it: A under encryption, B after decrypting (so neither B alone nor A
//! with the coordinator sees an exact total). B then applies the k-threshold to each group's
//! noised count and reports the release to the coordinator; its total count covers released
//! groups only. A node whose entry sets ε charges its ledger before any data is read; a release
//! key already charged is refused (the data under a repeated offer may have changed), and no
//! noise draw is ever stored.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use zeroize::Zeroizing;

use cleanroom_circuits::ahe::{SecretKey, SlotLayout};
use cleanroom_circuits::intersection_sum::{
    KeyHolderSession, KhAwaitingHello, KhAwaitingMerge, KhAwaitingReturn, KhReadyToBlind,
    KhReceivingPoints, KhSummed, KhSumming, MAX_CIPHERTEXT_BATCH_BYTES, SumError, SumParams,
    ValueHolderSession, VhAwaitingPeerSize, VhAwaitingSums, VhEncrypting, VhExchanging,
    VhReadyToBlind,
};
use cleanroom_circuits::spill::BucketMatches;
use cleanroom_circuits::{EncodedPoint, JobKey, PsiError};
use cleanroom_proto::v1::{
    Abort, BatchEnd, Envelope, NoiseTerm, Phase, PointBatch, PsiHello, SumRelease, SumTerms,
    envelope::Body,
};

use crate::data::cluster_merge::MergeFailure;
use crate::data::cluster_reblind::ReblindFailure;
use crate::data::dataset;
use crate::data::sum_input::{SumInput, SumKeys};
use crate::error::{JobError, Party, Violation};
use crate::job::protocol::{NoiseRequest, Protocol, Step};
use crate::job::psi::{BATCHES_PER_PIECE, MergePlace, MergeRequest, ReblindPlace};
use crate::job::reblind_queue::{InOrderPoints, PeerNext, piece_points};
use crate::job::wire::{self, Outbox, STALL_BASE, stall_deadline};
use crate::ledger::Loss;
use crate::policy::overlap_sum::{self as sum_policy, JointTerms, SumShape};
use crate::policy::{Permit, Veto};

/// Silence allowed per row while the value holder encrypts (≈ 0.9 ms a Paillier row on one
/// loaded core), on top of the PSI allowance.
const STALL_PER_ROW: Duration = Duration::from_micros(2000);

/// Where a value holder encrypts its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncryptPlace {
    /// On this node's CPU pool, as the session's own work.
    Node,
    /// Off the node (on its own executors): in pieces of `piece_rows` rows handed out as
    /// [`Step::Encrypt`], at most `in_flight` out at once; their ciphertexts go to the key
    /// holder in our order, whatever order they come back in.
    Elsewhere {
        /// Pieces out at once at most.
        in_flight: usize,
        /// Rows in a piece at most.
        piece_rows: usize,
    },
}

/// Rows of ours to encrypt off the node (on this node's own executors).
pub struct EncryptPiece {
    /// The first row's place among ours, in the order our points went out.
    pub offset: u64,
    /// Rows in the piece.
    pub row_count: u64,
    /// Their values, row-major, the job's cells to a row (zeroized when dropped).
    pub rows: Zeroizing<Vec<u64>>,
}

impl std::fmt::Debug for EncryptPiece {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptPiece")
            .field("offset", &self.offset)
            .field("row_count", &self.row_count)
            .finish_non_exhaustive()
    }
}

/// What an overlap-sum job is, for the protocol: who, under which terms, of which shape.
#[derive(Debug, Clone)]
pub struct SumConfig {
    /// The job's id.
    pub job_id: String,
    /// This node's name.
    pub me: String,
    /// What the agreement permits for this job.
    pub permit: Permit,
    /// The spec digest both parties must share ([`crate::spec::spec_digest`]).
    pub digest: [u8; 32],
    /// The spec's groups and columns.
    pub shape: SumShape,
    /// Whether the spec shows the count.
    pub show_count: bool,
    /// Where the partner's points are re-blinded: here, or on this node's own executors.
    pub reblind: ReblindPlace,
    /// Where a value holder's rows are encrypted: here, or on this node's own executors.
    pub encrypt: EncryptPlace,
    /// Where a spilled key holder merges its buckets (which of the value holder's rows
    /// matched): here, or on this node's own executors.
    pub merge: MergePlace,
    /// Points per batch frame ([`BATCH_POINTS`](crate::job::psi::BATCH_POINTS); tests use
    /// small ones).
    pub batch_points: usize,
}

impl SumConfig {
    /// The partner's points while they are re-blinded off the node (`None` on the node).
    fn off_node(&self) -> Option<InOrderPoints> {
        match self.reblind {
            ReblindPlace::Node => None,
            ReblindPlace::Elsewhere { in_flight } => Some(InOrderPoints::new(
                in_flight,
                BATCHES_PER_PIECE * self.batch_points,
            )),
        }
    }

    /// The session parameters of this job.
    pub fn params(&self) -> SumParams {
        SumParams {
            key_name: dataset::key_name(&self.permit.keys),
            min_peer_set: self.permit.min_peer_set,
            max_peer_set: self.permit.max_peer_set,
            batch_size: self.batch_points,
            cells: self.shape.cells(),
        }
    }

    fn partner(&self) -> &str {
        &self.permit.partner
    }

    fn violation(&self, v: impl Into<Violation>) -> JobError {
        JobError::violation(Party::Node(self.permit.partner.clone()), v)
    }

    /// A session's error: the partner's violation, except a failure of our own spill files.
    fn session_error(&self, e: SumError) -> JobError {
        match e {
            SumError::Psi(PsiError::Spill(_)) => self.internal(&e.to_string()),
            e => self.violation(e),
        }
    }

    fn terms_violation(&self, what: impl Into<String>) -> JobError {
        self.violation(Violation::Terms(what.into()))
    }

    fn internal(&self, what: &str) -> JobError {
        JobError::Internal(format!(
            "overlap-sum protocol of job '{}': {what}",
            self.job_id
        ))
    }

    fn hello(&self, set_size: u64, terms: SumTerms) -> Body {
        Body::PsiHello(PsiHello {
            sender: self.me.clone(),
            set_size,
            spec_digest: self.digest.to_vec(),
            noise: None,
            noise_commitment: Vec::new(),
            sum: Some(terms),
            release: None,
        })
    }

    /// The peer's hello: sender, spec digest, no overlap noise, terms present; its size within
    /// the agreement.
    fn check_hello(&self, env: &Envelope) -> Result<(u64, SumTerms), JobError> {
        let hello = wire::expect_body(env, Phase::PsiSize, |b| match b {
            Body::PsiHello(h) => Some(h.clone()),
            _ => None,
        })
        .map_err(|v| self.violation(v))?;
        if hello.sender != self.partner() {
            return Err(self.violation(Violation::WrongSender(hello.sender)));
        }
        if hello.spec_digest != self.digest {
            return Err(self.violation(Violation::SpecMismatch));
        }
        if hello.noise.is_some() || !hello.noise_commitment.is_empty() {
            return Err(self.terms_violation("it announced overlap noise for an overlap-sum"));
        }
        let terms = hello
            .sum
            .ok_or_else(|| self.terms_violation("its hello carries no overlap-sum terms"))?;
        self.permit
            .check_peer_size(hello.set_size)
            .map_err(JobError::Refused)?;
        Ok((hello.set_size, terms))
    }

    fn joint(
        &self,
        key_holder: &SumTerms,
        value_holder: &SumTerms,
    ) -> Result<JointTerms, JobError> {
        sum_policy::joint_terms(key_holder, value_holder, self.shape.columns.len())
            .map_err(|e| self.terms_violation(format!("its overlap-sum terms: {e}")))
    }

    /// The release's description, the same at both parties (the coordinator compares them).
    fn release(
        &self,
        joint: &JointTerms,
        key_holder: &str,
        value_holder: &str,
    ) -> Result<SumRelease, JobError> {
        let noise: Vec<NoiseTerm> =
            sum_policy::noise_terms(joint, key_holder, value_holder).map_err(JobError::Noise)?;
        Ok(SumRelease {
            columns: self.shape.columns.clone(),
            groups: Vec::new(),
            noise,
            epsilon: joint.epsilon.unwrap_or(0.0),
            min_result: joint.min_result,
            show_count: self.show_count,
            intersection: 0,
            withheld: !joint.release_to_coordinator,
        })
    }

    /// This node's noise for the joint ε (one value per cell, zeros for an exact release), and
    /// the release's loss the ledger is charged with if this node's entry sets ε.
    fn noise_request(&self, joint: &JointTerms) -> Step<Never> {
        let draw_joint = joint.clone();
        let cells = self.shape.cells();
        Step::Charge(NoiseRequest {
            loss: joint.epsilon.map(Loss::Epsilon),
            draw: Box::new(move || sum_policy::draw_noise(&draw_joint, cells)),
        })
    }

    /// The silence allowed once both sizes are known: PSI's allowance, plus the value holder's
    /// encryption of `rows`.
    fn stall(own: u64, peer: u64, rows: u64) -> Duration {
        stall_deadline(own, peer)
            .saturating_add(STALL_PER_ROW.saturating_mul(rows.min(u32::MAX.into()) as u32))
    }
}

/// No work (a [`Step`] that carries none).
#[derive(Debug)]
pub enum Never {}

fn widen<W>(step: Step<Never>) -> Step<W> {
    match step {
        Step::Send(e) => Step::Send(e),
        Step::Recheck => Step::Recheck,
        Step::Audit(a) => Step::Audit(a),
        Step::Charge(c) => Step::Charge(c),
        Step::Finish => Step::Finish,
        Step::Reblind(piece) => Step::Reblind(piece),
        Step::Encrypt(piece) => Step::Encrypt(piece),
        Step::Merge(request) => Step::Merge(request),
        Step::Compute(never) => match never {},
    }
}

/// The slot layout the value holder's sensitivities imply (each cell as wide as its column's
/// bound needs): its hello must announce exactly this one.
pub fn expected_layout(joint: &JointTerms, shape: &SumShape) -> Result<SlotLayout, JobError> {
    let columns = joint.sensitivities.len().max(1);
    let maxima: Vec<u64> = (0..shape.cells())
        .map(|c| joint.sensitivities[c % columns])
        .collect();
    SlotLayout::for_maxima(&maxima).map_err(|e| JobError::Refused(Veto(e.to_string())))
}

/// Takes a frame of a batch phase: a point batch in sequence, or the end marker.
enum Batch {
    Points(Vec<u8>),
    End(u64),
}

fn batch(
    cfg: &SumConfig,
    env: Envelope,
    phase: Phase,
    seq_in: &mut u64,
) -> Result<Batch, JobError> {
    wire::check_phase(&env, phase).map_err(|v| cfg.violation(v))?;
    match env.body {
        Some(Body::Points(PointBatch { seq, points })) => {
            wire::check_seq(seq, seq_in).map_err(|v| cfg.violation(v))?;
            Ok(Batch::Points(points))
        }
        Some(Body::BatchEnd(BatchEnd { total })) => Ok(Batch::End(total)),
        other => Err(cfg.violation(wire::unexpected(phase, other.as_ref()))),
    }
}

/// Off the node, a frame of the partner's points goes to the pieces (checked first: nothing
/// that is not whole points within its `declared` size leaves the node) and its end marker
/// waits for them.
fn off_node_frame(
    cfg: &SumConfig,
    off: &mut InOrderPoints,
    declared: u64,
    b: Batch,
) -> Result<(), JobError> {
    match b {
        Batch::Points(p) => off
            .pieces
            .arrive(declared, p)
            .map_err(|e| cfg.violation(Violation::Psi(e))),
        Batch::End(total) => {
            off.ended(total);
            Ok(())
        }
    }
}

/// Off the node: hands out the pieces that may go (as steps), and says what the session can
/// take now.
fn off_node_next<W>(
    off: Option<&mut InOrderPoints>,
    steps: &mut VecDeque<Step<W>>,
) -> Option<PeerNext> {
    let (pieces, next) = off?.next();
    steps.extend(pieces.into_iter().map(Step::Reblind));
    next
}

/// A piece back from the cluster, for a protocol whose `off` is re-blinding off the node.
fn piece_back(
    cfg: &SumConfig,
    off: Option<&mut InOrderPoints>,
    offset: u64,
    result: Result<Vec<EncodedPoint>, ReblindFailure>,
) -> Result<(), JobError> {
    let points = piece_points(cfg.partner(), offset, result)?;
    if off.is_some_and(|off| off.pieces.came_back(offset, points)) {
        Ok(())
    } else {
        Err(cfg.internal("a re-blinded piece came back that was not out"))
    }
}

/// The peer's closing end marker.
fn closing(cfg: &SumConfig, env: &Envelope) -> Result<(), JobError> {
    wire::expect_body(env, Phase::PsiDone, |b| match b {
        Body::BatchEnd(_) => Some(()),
        _ => None,
    })
    .map_err(|v| cfg.violation(v))
}

fn aborted(cfg: &SumConfig, env: &Envelope) -> Result<(), JobError> {
    if let Some(Body::Abort(Abort { reason })) = &env.body {
        return Err(JobError::Aborted {
            peer: Party::Node(cfg.partner().to_owned()),
            reason: reason.clone(),
        });
    }
    Ok(())
}

/// The key holder's CPU work; [`Protocol::run`] does it.
#[derive(Debug)]
pub enum KhWork {
    /// Blind our items.
    Blind(KhReadyToBlind),
    /// Read our next spilled batch (none in memory: [`KhWork::Blind`] gave them all).
    OwnNext(KhReceivingPoints),
    /// Re-blind one batch of the value holder's points.
    PeerBatch(KhReceivingPoints, Vec<u8>),
    /// Take the value holder's next points, re-blinded off the node, in its order.
    PeerReblinded(KhReceivingPoints, Vec<Vec<EncodedPoint>>),
    /// The value holder's points are all in.
    PeerEnd(KhReceivingPoints, u64),
    /// One batch of our points, returned.
    Returned(KhAwaitingReturn, Vec<u8>),
    /// All our points are back.
    ReturnedEnd(KhAwaitingReturn, u64),
    /// All our points are back: check the total, and ready the buckets to be merged off the
    /// node.
    MergeElsewhere(KhAwaitingReturn, u64),
    /// One batch of encrypted rows.
    Rows(KhSumming, Vec<u8>),
    /// All rows are in.
    RowsEnd(KhSumming, u64),
    /// Add our noise under encryption.
    Noise(KhSummed, Vec<i64>),
}

/// The result of a [`KhWork`].
#[derive(Debug)]
pub enum KhDone {
    /// Our blinded batches.
    Blinded(Vec<Vec<u8>>, KhReceivingPoints),
    /// Our next spilled batch, `None` once all are out.
    OwnNext(Result<Option<Vec<u8>>, SumError>, KhReceivingPoints),
    /// A peer batch taken in.
    PeerBatch(Result<KhReceivingPoints, SumError>),
    /// The peer's points are in.
    PeerEnd(Result<KhAwaitingReturn, SumError>),
    /// A returned batch taken in.
    Returned(Result<KhAwaitingReturn, SumError>),
    /// Our points are back.
    ReturnedEnd(Result<KhSumming, SumError>),
    /// Our points are back, the buckets ready to be merged off the node.
    MergeElsewhere(Result<KhAwaitingMerge, SumError>),
    /// A batch of rows added.
    Rows(Result<KhSumming, SumError>),
    /// The rows are summed.
    RowsEnd(Result<KhSummed, SumError>),
    /// The noised sums, and both sizes.
    Noise((u64, u64), Result<Vec<u8>, SumError>),
}

enum KhStage {
    Hello(KhAwaitingHello),
    Charging(KhReadyToBlind, JointTerms),
    Busy,
    PeerPoints(KhReceivingPoints),
    Returning(KhAwaitingReturn),
    /// The buckets are merged off the node; no frame is taken meanwhile.
    Merging(KhAwaitingMerge),
    Summing(KhSumming),
    Closing((u64, u64)),
    Finished((u64, u64)),
    Over,
}

/// What the key holder's exchange produced.
#[derive(Debug)]
pub struct KhExchange {
    /// Our set size and the value holder's.
    pub sizes: (u64, u64),
    /// The release both parties describe (the value holder fills in its figures).
    pub release: SumRelease,
    /// Bytes a spilled session wrote to its spill files (0 in memory).
    pub spilled_bytes: u64,
}

/// The key holder's protocol (party 0).
pub struct KeyHolder {
    cfg: SumConfig,
    own_terms: SumTerms,
    out: Outbox,
    steps: VecDeque<Step<KhWork>>,
    stage: KhStage,
    own_size: u64,
    peer_size: Option<u64>,
    seq_in: u64,
    noise: Vec<i64>,
    release: Option<SumRelease>,
    /// Bytes our spilled session wrote, once our points are back.
    spilled_bytes: u64,
    /// The value holder's points while they are re-blinded off the node.
    off_node: Option<InOrderPoints>,
}

impl std::fmt::Debug for KeyHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyHolder")
            .field("job_id", &self.cfg.job_id)
            .field("own_size", &self.own_size)
            .finish_non_exhaustive()
    }
}

impl KeyHolder {
    /// Starts over our loaded keys with a fresh key: our hello is the first step.
    pub fn start(
        cfg: SumConfig,
        key: JobKey,
        items: cleanroom_circuits::ItemSet,
    ) -> Result<Self, JobError> {
        let started = KeyHolderSession::start(cfg.params(), key, items);
        KeyHolder::started(cfg, started)
    }

    /// Starts over our keys blinded with `key` as they were read and spilled (under a
    /// `memory_limit`, or on the partner's executors): the same exchange, with its sets in
    /// `own`'s store instead of memory.
    pub fn start_spilled(
        cfg: SumConfig,
        key: JobKey,
        own: cleanroom_circuits::spill::SpilledOwn,
    ) -> Result<Self, JobError> {
        let started = KeyHolderSession::start_spilled(cfg.params(), key, own);
        KeyHolder::started(cfg, started)
    }

    fn started(
        cfg: SumConfig,
        started: Result<(u64, KhAwaitingHello), SumError>,
    ) -> Result<Self, JobError> {
        let own_terms = sum_policy::own_terms(&cfg.permit);
        let (own_size, session) = started.map_err(|e| JobError::Refused(Veto(e.to_string())))?;
        let mut out = Outbox::new(&cfg.job_id, Phase::PsiSize);
        let hello = out.frame(Phase::PsiSize, cfg.hello(own_size, own_terms.clone()));
        Ok(KeyHolder {
            off_node: cfg.off_node(),
            cfg,
            own_terms,
            out,
            steps: VecDeque::from([Step::Send(Box::new(hello))]),
            stage: KhStage::Hello(session),
            own_size,
            peer_size: None,
            seq_in: 0,
            noise: Vec::new(),
            release: None,
            spilled_bytes: 0,
        })
    }

    /// Our set size, as the hello declares it.
    pub fn own_size(&self) -> u64 {
        self.own_size
    }

    /// The finished exchange; `None` before it is finished.
    pub fn into_exchange(self) -> Option<KhExchange> {
        match (self.stage, self.release) {
            (KhStage::Finished(sizes), Some(release)) if self.steps.is_empty() => {
                Some(KhExchange {
                    sizes,
                    release,
                    spilled_bytes: self.spilled_bytes,
                })
            }
            _ => None,
        }
    }

    fn send(&mut self, env: Envelope) {
        self.steps.push_back(Step::Send(Box::new(env)));
    }

    fn compute(&mut self, work: KhWork) {
        self.stage = KhStage::Busy;
        self.steps.push_back(Step::Compute(work));
    }

    fn fail<T>(&mut self, r: Result<T, JobError>) -> Result<T, JobError> {
        if r.is_err() {
            self.stage = KhStage::Over;
            self.steps.clear();
        }
        r
    }

    fn on_frame(&mut self, stage: KhStage, env: Envelope) -> Result<(), JobError> {
        aborted(&self.cfg, &env)?;
        match stage {
            KhStage::Hello(session) => {
                let (peer_size, peer_terms) = self.cfg.check_hello(&env)?;
                let joint = self.cfg.joint(&self.own_terms, &peer_terms)?;
                if expected_layout(&joint, &self.cfg.shape)?.widths()
                    != peer_terms.widths.as_slice()
                {
                    return Err(self
                        .cfg
                        .terms_violation("its slot layout does not match the bounds it declared"));
                }
                let ready = session
                    .on_peer_hello(peer_size, &peer_terms.widths, &peer_terms.public_key)
                    .map_err(|e| self.cfg.violation(e))?;
                self.peer_size = Some(peer_size);
                // Charged (if this node's entry sets ε) before anything is computed; the noise
                // for the joint ε is drawn fresh and never stored.
                self.steps.push_back(widen(self.cfg.noise_request(&joint)));
                self.stage = KhStage::Charging(ready, joint);
                Ok(())
            }
            KhStage::PeerPoints(s) => {
                let b = batch(&self.cfg, env, Phase::PsiBlinded, &mut self.seq_in)?;
                let declared = self.peer_size.unwrap_or(0);
                match (self.off_node.as_mut(), b) {
                    (Some(off), b) => {
                        off_node_frame(&self.cfg, off, declared, b)?;
                        self.stage = KhStage::PeerPoints(s);
                        self.advance_off_node();
                    }
                    (None, Batch::Points(p)) => self.compute(KhWork::PeerBatch(s, p)),
                    (None, Batch::End(total)) => self.compute(KhWork::PeerEnd(s, total)),
                }
                Ok(())
            }
            KhStage::Returning(s) => {
                match batch(&self.cfg, env, Phase::PsiDoubleBlinded, &mut self.seq_in)? {
                    Batch::Points(p) => self.compute(KhWork::Returned(s, p)),
                    Batch::End(total) => self.compute(match self.cfg.merge {
                        MergePlace::Node => KhWork::ReturnedEnd(s, total),
                        MergePlace::Elsewhere => KhWork::MergeElsewhere(s, total),
                    }),
                }
                Ok(())
            }
            KhStage::Summing(s) => {
                match batch(&self.cfg, env, Phase::SumRows, &mut self.seq_in)? {
                    Batch::Points(p) => self.compute(KhWork::Rows(s, p)),
                    Batch::End(total) => self.compute(KhWork::RowsEnd(s, total)),
                }
                Ok(())
            }
            KhStage::Closing(sizes) => {
                closing(&self.cfg, &env)?;
                self.stage = KhStage::Finished(sizes);
                Ok(())
            }
            KhStage::Charging(..)
            | KhStage::Busy
            | KhStage::Merging(_)
            | KhStage::Finished(_)
            | KhStage::Over => Err(self
                .cfg
                .internal("a frame was handed over while the protocol takes none")),
        }
    }

    /// Off the node: pieces of the value holder's points to hand out, and what the session
    /// can take of them (while it waits for them and is free).
    fn advance_off_node(&mut self) {
        if !matches!(self.stage, KhStage::PeerPoints(_)) {
            return;
        }
        let Some(next) = off_node_next(self.off_node.as_mut(), &mut self.steps) else {
            return;
        };
        match std::mem::replace(&mut self.stage, KhStage::Busy) {
            KhStage::PeerPoints(s) => self.compute(match next {
                PeerNext::Reblinded(pieces) => KhWork::PeerReblinded(s, pieces),
                PeerNext::End(total) => KhWork::PeerEnd(s, total),
            }),
            other => self.stage = other,
        }
    }

    /// The buckets' answers from off the node: which of the value holder's rows matched, then
    /// summing, as after [`KhWork::ReturnedEnd`].
    fn on_merged(
        &mut self,
        answers: Result<Vec<BucketMatches>, MergeFailure>,
    ) -> Result<(), JobError> {
        let KhStage::Merging(waiting) = std::mem::replace(&mut self.stage, KhStage::Over) else {
            return Err(self
                .cfg
                .internal("the buckets' merge came back while none was out"));
        };
        let answers = answers.map_err(|e| match e {
            MergeFailure::Peer(e) => self.cfg.violation(SumError::from(e)),
            MergeFailure::Cluster(reason) => JobError::Compute {
                step: "comparing the points on this node's cluster",
                reason,
            },
        })?;
        let summing = waiting
            .finish(answers)
            .map_err(|e| self.cfg.session_error(e))?;
        self.spilled_bytes = summing.spilled_bytes();
        self.stage = KhStage::Summing(summing);
        self.seq_in = 0;
        Ok(())
    }

    fn on_done(&mut self, done: KhDone) -> Result<(), JobError> {
        if !matches!(self.stage, KhStage::Busy) {
            return Err(self.cfg.internal("work came back that was not out"));
        }
        let cfg = &self.cfg;
        let v = |e: SumError| cfg.session_error(e);
        match done {
            KhDone::Blinded(batches, next) => {
                for env in self.out.points(Phase::PsiBlinded, batches) {
                    self.send(env);
                }
                // A spilled session's points come one batch at a time, before the end marker.
                self.compute(KhWork::OwnNext(next));
            }
            KhDone::OwnNext(r, next) => match r.map_err(v)? {
                Some(batch) => {
                    for env in self.out.points(Phase::PsiBlinded, vec![batch]) {
                        self.send(env);
                    }
                    self.compute(KhWork::OwnNext(next));
                }
                None => {
                    let end = self.out.end(Phase::PsiBlinded, self.own_size);
                    self.send(end);
                    self.seq_in = 0;
                    self.stage = KhStage::PeerPoints(next);
                    self.advance_off_node();
                }
            },
            KhDone::PeerBatch(r) => {
                self.stage = KhStage::PeerPoints(r.map_err(v)?);
                self.advance_off_node();
            }
            KhDone::PeerEnd(r) => {
                // B's points, reblinded and kept in B's order; our own come back shuffled.
                self.stage = KhStage::Returning(r.map_err(v)?);
                self.seq_in = 0;
            }
            KhDone::Returned(r) => self.stage = KhStage::Returning(r.map_err(v)?),
            KhDone::ReturnedEnd(r) => {
                // B's encrypted rows: matched ones added as they arrive.
                let summing = r.map_err(v)?;
                self.spilled_bytes = summing.spilled_bytes();
                self.stage = KhStage::Summing(summing);
                self.seq_in = 0;
            }
            KhDone::MergeElsewhere(r) => {
                let waiting = r.map_err(v)?;
                self.steps.push_back(Step::Merge(MergeRequest {
                    merge: waiting.merge(),
                    first_size: self.peer_size.unwrap_or(0),
                }));
                self.stage = KhStage::Merging(waiting);
            }
            KhDone::Rows(r) => self.stage = KhStage::Summing(r.map_err(v)?),
            KhDone::RowsEnd(r) => {
                let summed = r.map_err(v)?;
                let noise = std::mem::take(&mut self.noise);
                self.compute(KhWork::Noise(summed, noise));
            }
            KhDone::Noise(sizes, r) => {
                let result = r.map_err(|e| JobError::Compute {
                    step: "adding the noise",
                    reason: e.to_string(),
                })?;
                self.steps.push_back(Step::Recheck);
                for env in self.out.points(Phase::SumResult, vec![result]) {
                    self.send(env);
                }
                let end = self.out.end(Phase::PsiDone, 0);
                self.send(end);
                self.steps.push_back(Step::Finish);
                self.stage = KhStage::Closing(sizes);
            }
        }
        Ok(())
    }
}

impl Protocol for KeyHolder {
    type Work = KhWork;
    type Done = KhDone;

    fn next_step(&mut self) -> Option<Step<KhWork>> {
        self.steps.pop_front()
    }

    fn run(work: KhWork) -> KhDone {
        match work {
            KhWork::Blind(s) => {
                let (batches, next) = s.blind();
                KhDone::Blinded(batches, next)
            }
            KhWork::OwnNext(mut s) => KhDone::OwnNext(s.next_own_batch(), s),
            KhWork::PeerBatch(s, p) => KhDone::PeerBatch(s.on_peer_batch(&p)),
            KhWork::PeerReblinded(s, pieces) => KhDone::PeerBatch(
                pieces
                    .iter()
                    .try_fold(s, |s, points| s.on_peer_reblinded(points)),
            ),
            KhWork::PeerEnd(s, t) => KhDone::PeerEnd(s.on_peer_end(t)),
            KhWork::Returned(s, p) => KhDone::Returned(s.on_returned_batch(&p)),
            KhWork::ReturnedEnd(s, t) => KhDone::ReturnedEnd(s.on_returned_end(t)),
            KhWork::MergeElsewhere(s, t) => KhDone::MergeElsewhere(s.merged_elsewhere(t)),
            KhWork::Rows(s, p) => KhDone::Rows(s.on_ciphertext_batch(&p)),
            KhWork::RowsEnd(s, t) => KhDone::RowsEnd(s.on_ciphertext_end(t)),
            KhWork::Noise(s, noise) => {
                let sizes = s.sizes();
                KhDone::Noise(sizes, s.noised_sums(&noise))
            }
        }
    }

    fn handle(&mut self, env: Envelope) -> Result<(), JobError> {
        let stage = std::mem::replace(&mut self.stage, KhStage::Over);
        let r = self.on_frame(stage, env);
        self.fail(r)
    }

    fn handle_done(&mut self, done: KhDone) -> Result<(), JobError> {
        let r = self.on_done(done);
        self.fail(r)
    }

    fn waits_for_pieces(&self) -> bool {
        matches!(self.stage, KhStage::Merging(_))
            || self.off_node.as_ref().is_some_and(InOrderPoints::holds_end)
    }

    fn handle_merged(
        &mut self,
        answers: Result<Vec<BucketMatches>, MergeFailure>,
    ) -> Result<(), JobError> {
        let r = self.on_merged(answers);
        self.fail(r)
    }

    fn handle_reblinded(
        &mut self,
        offset: u64,
        result: Result<Vec<EncodedPoint>, ReblindFailure>,
    ) -> Result<(), JobError> {
        let r = piece_back(&self.cfg, self.off_node.as_mut(), offset, result);
        let r = self.fail(r);
        self.advance_off_node();
        r
    }

    fn handle_noise(&mut self, noise: Vec<i64>, _charged: bool) -> Result<(), JobError> {
        let r = match std::mem::replace(&mut self.stage, KhStage::Over) {
            KhStage::Charging(ready, joint) => {
                let me = self.cfg.me.clone();
                match self.cfg.release(&joint, &me, self.cfg.partner()) {
                    Ok(release) => {
                        self.release = Some(release);
                        self.noise = noise;
                        self.steps.push_back(Step::Recheck);
                        self.compute(KhWork::Blind(ready));
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            _ => Err(self.cfg.internal("noise came back that was not asked for")),
        };
        self.fail(r)
    }

    fn is_finished(&self) -> bool {
        matches!(self.stage, KhStage::Finished(_)) && self.steps.is_empty()
    }

    fn silence_allowed(&self) -> Duration {
        self.peer_size.map_or(STALL_BASE, |peer| {
            SumConfig::stall(self.own_size, peer, peer)
        })
    }
}

/// The value holder's CPU work; [`Protocol::run`] does it.
#[derive(Debug)]
pub enum VhWork {
    /// Blind our items.
    Blind(VhReadyToBlind),
    /// Read our next spilled batch (none in memory: [`VhWork::Blind`] gave them all).
    OwnNext(VhExchanging),
    /// Re-blind one batch of the key holder's points.
    PeerBatch(VhExchanging, Vec<u8>),
    /// Take the key holder's next points, re-blinded off the node, in its order.
    PeerReblinded(VhExchanging, Vec<Vec<EncodedPoint>>),
    /// The key holder's points are all in: shuffle them for return.
    PeerEnd(VhExchanging, u64),
    /// Read the next spilled batch of the key holder's points to return (none in memory:
    /// [`VhWork::PeerEnd`] gave them all); the total to announce after them.
    ReturnNext(VhEncrypting, u64),
    /// Encrypt the next batch of our rows (the heavy step).
    Encrypt(VhEncrypting),
    /// Read our next rows in the clear, at most this many, to encrypt off the node.
    Rows(VhEncrypting, usize),
    /// Decrypt the key holder's noised sums.
    Decrypt(VhAwaitingSums, Vec<u8>),
}

/// The result of a [`VhWork`].
#[derive(Debug)]
pub enum VhDone {
    /// Our blinded batches.
    Blinded(Vec<Vec<u8>>, VhExchanging),
    /// Our next spilled batch, `None` once all are out.
    OwnNext(Result<Option<Vec<u8>>, SumError>, VhExchanging),
    /// A peer batch taken in.
    PeerBatch(Result<VhExchanging, SumError>),
    /// The key holder's points to return, and the encryption to run.
    PeerEnd(u64, Result<(Vec<Vec<u8>>, VhEncrypting), SumError>),
    /// The next spilled batch of the key holder's points to return, `None` once all are out,
    /// and the total to announce after them.
    ReturnNext(u64, Result<Option<Vec<u8>>, SumError>, VhEncrypting),
    /// The next batch of encrypted rows (`None`: all sent).
    Encrypted(VhEncrypting, Result<Option<Vec<u8>>, SumError>),
    /// Our next rows in the clear (`None`: all handed out).
    Rows(VhEncrypting, Result<Option<Vec<u64>>, SumError>),
    /// The decrypted cells.
    Decrypted(Result<Vec<i128>, SumError>),
}

enum VhStage {
    Hello(VhAwaitingPeerSize),
    Charging(VhAwaitingPeerSize, u64),
    Busy,
    PeerPoints(VhExchanging),
    /// Waiting for pieces of our rows encrypted off the node.
    Encrypting(VhEncrypting),
    Sums(VhAwaitingSums),
    Closing(Vec<i128>),
    Finished(Vec<i128>),
    Over,
}

/// What the value holder's exchange produced.
#[derive(Debug)]
pub struct VhExchange {
    /// Our set size and the key holder's.
    pub sizes: (u64, u64),
    /// The decrypted cells, our own noise added.
    pub cells: Vec<i128>,
    /// The release's description (figures still to fill in).
    pub release: SumRelease,
    /// Whether this node's ledger was charged.
    pub charged: bool,
    /// Bytes a spilled session wrote to its spill files (0 in memory).
    pub spilled_bytes: u64,
}

/// The value holder's protocol (party 1).
pub struct ValueHolder {
    cfg: SumConfig,
    own_terms: SumTerms,
    out: Outbox,
    steps: VecDeque<Step<VhWork>>,
    stage: VhStage,
    own_size: u64,
    peer_size: Option<u64>,
    seq_in: u64,
    noise: Vec<i64>,
    charged: bool,
    release: Option<SumRelease>,
    /// The key holder's points while they are re-blinded off the node.
    off_node: Option<InOrderPoints>,
    /// Our rows while they are encrypted off the node.
    encrypt_off_node: Option<OffNodeRows>,
    /// Bytes a spilled session wrote to its spill files (0 in memory).
    spilled_bytes: u64,
}

impl std::fmt::Debug for ValueHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValueHolder")
            .field("job_id", &self.cfg.job_id)
            .field("own_size", &self.own_size)
            .finish_non_exhaustive()
    }
}

impl ValueHolder {
    /// Starts over our loaded input and this job's fresh Paillier key: our hello is the first
    /// step. Identifiers are blinded with a fresh PSI key; points blinded on the executors come
    /// with theirs.
    pub fn start(cfg: SumConfig, input: SumInput, paillier: SecretKey) -> Result<Self, JobError> {
        let SumInput {
            keys,
            values,
            layout,
            sensitivities,
            ..
        } = input;
        let mut own_terms = sum_policy::own_terms(&cfg.permit);
        own_terms.sensitivities = sensitivities;
        let params = cfg.params();
        let (hello, session) = match keys {
            SumKeys::Items(items) => ValueHolderSession::start(
                params,
                JobKey::generate(),
                items,
                layout,
                values,
                paillier,
            ),
            SumKeys::Blinded(key, points) => {
                ValueHolderSession::start_blinded(params, key, points, layout, values, paillier)
            }
            SumKeys::Spilled(key, own) => {
                ValueHolderSession::start_spilled(params, key, own, layout, paillier)
            }
        }
        .map_err(|e| JobError::Refused(Veto(e.to_string())))?;
        let own_size = hello.set_size;
        own_terms.widths = hello.widths;
        own_terms.public_key = hello.public_key;
        let mut out = Outbox::new(&cfg.job_id, Phase::PsiSize);
        let hello = out.frame(Phase::PsiSize, cfg.hello(own_size, own_terms.clone()));
        Ok(ValueHolder {
            off_node: cfg.off_node(),
            encrypt_off_node: match cfg.encrypt {
                EncryptPlace::Node => None,
                EncryptPlace::Elsewhere {
                    in_flight,
                    piece_rows,
                } => Some(OffNodeRows::new(in_flight, piece_rows)),
            },
            cfg,
            own_terms,
            out,
            steps: VecDeque::from([Step::Send(Box::new(hello))]),
            stage: VhStage::Hello(session),
            own_size,
            peer_size: None,
            seq_in: 0,
            noise: Vec::new(),
            charged: false,
            release: None,
            spilled_bytes: 0,
        })
    }

    /// Our set size, as the hello declares it.
    pub fn own_size(&self) -> u64 {
        self.own_size
    }

    /// The finished exchange; `None` before it is finished.
    pub fn into_exchange(self) -> Option<VhExchange> {
        match (self.stage, self.release, self.peer_size) {
            (VhStage::Finished(cells), Some(release), Some(peer)) if self.steps.is_empty() => {
                Some(VhExchange {
                    sizes: (self.own_size, peer),
                    cells,
                    release,
                    charged: self.charged,
                    spilled_bytes: self.spilled_bytes,
                })
            }
            _ => None,
        }
    }

    fn send(&mut self, env: Envelope) {
        self.steps.push_back(Step::Send(Box::new(env)));
    }

    fn compute(&mut self, work: VhWork) {
        self.stage = VhStage::Busy;
        self.steps.push_back(Step::Compute(work));
    }

    fn fail<T>(&mut self, r: Result<T, JobError>) -> Result<T, JobError> {
        if r.is_err() {
            self.stage = VhStage::Over;
            self.steps.clear();
        }
        r
    }

    fn on_frame(&mut self, stage: VhStage, env: Envelope) -> Result<(), JobError> {
        aborted(&self.cfg, &env)?;
        match stage {
            VhStage::Hello(session) => {
                let (peer_size, peer_terms) = self.cfg.check_hello(&env)?;
                if !peer_terms.widths.is_empty()
                    || !peer_terms.public_key.is_empty()
                    || !peer_terms.sensitivities.is_empty()
                {
                    return Err(self.cfg.terms_violation(
                        "the key holder's hello carries a value holder's layout or key",
                    ));
                }
                let joint = self.cfg.joint(&peer_terms, &self.own_terms)?;
                let me = self.cfg.me.clone();
                self.release = Some(self.cfg.release(&joint, self.cfg.partner(), &me)?);
                self.peer_size = Some(peer_size);
                // Charge our own ledger now, before any work, if our entry sets ε, and draw our
                // own noise (added once the sums are decrypted; held in memory only).
                self.steps.push_back(widen(self.cfg.noise_request(&joint)));
                self.stage = VhStage::Charging(session, peer_size);
                Ok(())
            }
            VhStage::PeerPoints(s) => {
                let b = batch(&self.cfg, env, Phase::PsiBlinded, &mut self.seq_in)?;
                let declared = self.peer_size.unwrap_or(0);
                match (self.off_node.as_mut(), b) {
                    (Some(off), b) => {
                        off_node_frame(&self.cfg, off, declared, b)?;
                        self.stage = VhStage::PeerPoints(s);
                        self.advance_off_node();
                    }
                    (None, Batch::Points(p)) => self.compute(VhWork::PeerBatch(s, p)),
                    (None, Batch::End(total)) => self.compute(VhWork::PeerEnd(s, total)),
                }
                Ok(())
            }
            VhStage::Sums(awaiting) => {
                let sums = wire::expect_body(&env, Phase::SumResult, |b| match b {
                    Body::Points(p) => Some(p.points.clone()),
                    _ => None,
                })
                .map_err(|v| self.cfg.violation(v))?;
                self.compute(VhWork::Decrypt(awaiting, sums));
                Ok(())
            }
            VhStage::Closing(cells) => {
                closing(&self.cfg, &env)?;
                let end = self.out.end(Phase::PsiDone, 0);
                self.send(end);
                self.steps.push_back(Step::Finish);
                self.stage = VhStage::Finished(cells);
                Ok(())
            }
            VhStage::Charging(..)
            | VhStage::Busy
            | VhStage::Encrypting(_)
            | VhStage::Finished(_)
            | VhStage::Over => Err(self
                .cfg
                .internal("a frame was handed over while the protocol takes none")),
        }
    }

    /// Off the node: pieces of the key holder's points to hand out, and what the session can
    /// take of them (while it waits for them and is free).
    fn advance_off_node(&mut self) {
        if !matches!(self.stage, VhStage::PeerPoints(_)) {
            return;
        }
        let Some(next) = off_node_next(self.off_node.as_mut(), &mut self.steps) else {
            return;
        };
        match std::mem::replace(&mut self.stage, VhStage::Busy) {
            VhStage::PeerPoints(s) => self.compute(match next {
                PeerNext::Reblinded(pieces) => VhWork::PeerReblinded(s, pieces),
                PeerNext::End(total) => VhWork::PeerEnd(s, total),
            }),
            other => self.stage = other,
        }
    }

    fn on_done(&mut self, done: VhDone) -> Result<(), JobError> {
        if !matches!(self.stage, VhStage::Busy) {
            return Err(self.cfg.internal("work came back that was not out"));
        }
        let cfg = &self.cfg;
        let v = |e: SumError| cfg.session_error(e);
        match done {
            VhDone::Blinded(batches, next) => {
                for env in self.out.points(Phase::PsiBlinded, batches) {
                    self.send(env);
                }
                // A spilled session's points come one batch at a time, before the end marker.
                self.compute(VhWork::OwnNext(next));
            }
            VhDone::OwnNext(r, next) => match r.map_err(v)? {
                Some(batch) => {
                    for env in self.out.points(Phase::PsiBlinded, vec![batch]) {
                        self.send(env);
                    }
                    self.compute(VhWork::OwnNext(next));
                }
                None => {
                    let end = self.out.end(Phase::PsiBlinded, self.own_size);
                    self.send(end);
                    self.seq_in = 0;
                    self.stage = VhStage::PeerPoints(next);
                    self.advance_off_node();
                }
            },
            VhDone::PeerBatch(r) => {
                self.stage = VhStage::PeerPoints(r.map_err(v)?);
                self.advance_off_node();
            }
            VhDone::PeerEnd(total, r) => {
                // The session checked that A's end total equals its declared size.
                let (returned, encrypting) = r.map_err(v)?;
                for env in self.out.points(Phase::PsiDoubleBlinded, returned) {
                    self.send(env);
                }
                // A spilled session returns them one batch at a time, before the end marker.
                self.compute(VhWork::ReturnNext(encrypting, total));
            }
            VhDone::ReturnNext(total, r, encrypting) => match r.map_err(v)? {
                Some(batch) => {
                    for env in self.out.points(Phase::PsiDoubleBlinded, vec![batch]) {
                        self.send(env);
                    }
                    self.compute(VhWork::ReturnNext(encrypting, total));
                }
                None => {
                    let end = self.out.end(Phase::PsiDoubleBlinded, total);
                    self.send(end);
                    // Our rows, encrypted batch by batch, in the order our points went: here,
                    // or in pieces off the node.
                    if self.encrypt_off_node.is_some() {
                        self.hand_out_rows(encrypting)?;
                    } else {
                        self.compute(VhWork::Encrypt(encrypting));
                    }
                }
            },
            VhDone::Encrypted(encrypting, r) => {
                let batch = r.map_err(|e| JobError::Compute {
                    step: "encrypting our rows",
                    reason: e.to_string(),
                })?;
                match batch {
                    Some(batch) => {
                        for env in self.out.points(Phase::SumRows, vec![batch]) {
                            self.send(env);
                        }
                        self.compute(VhWork::Encrypt(encrypting));
                    }
                    None => self.rows_sent(encrypting),
                }
            }
            VhDone::Rows(encrypting, r) => {
                let rows = r.map_err(|e| JobError::Compute {
                    step: "reading our rows to encrypt",
                    reason: e.to_string(),
                })?;
                let Some(off) = self.encrypt_off_node.as_mut() else {
                    return Err(self
                        .cfg
                        .internal("rows read to encrypt off a node that does not"));
                };
                match rows {
                    Some(rows) => {
                        let piece = off.hand_out(rows, self.cfg.shape.cells())?;
                        self.steps.push_back(Step::Encrypt(piece));
                    }
                    None => off.all_handed_out = true,
                }
                self.hand_out_rows(encrypting)?;
            }
            VhDone::Decrypted(r) => {
                let mut cells = r.map_err(v)?;
                // Our own noise for the joint ε, added before anything leaves this node: the
                // key holder's noise alone would not protect our totals from a key holder that
                // colludes with the coordinator.
                let noise = std::mem::take(&mut self.noise);
                if noise.len() != cells.len() {
                    return Err(JobError::Internal(format!(
                        "{} noise values for {} cells",
                        noise.len(),
                        cells.len()
                    )));
                }
                for (c, n) in cells.iter_mut().zip(noise) {
                    *c += i128::from(n);
                }
                self.stage = VhStage::Closing(cells);
            }
        }
        Ok(())
    }
}

impl ValueHolder {
    /// Every row's ciphertexts are out: the end marker, then the noised sums to wait for.
    fn rows_sent(&mut self, encrypting: VhEncrypting) {
        let end = self.out.end(Phase::SumRows, encrypting.rows_sent());
        self.send(end);
        self.spilled_bytes = encrypting.spilled_bytes();
        self.stage = VhStage::Sums(encrypting.finish());
    }

    /// Off the node: reads the next piece of rows while fewer than the cluster takes are out,
    /// waits for pieces when that many are, and ends once every piece is back and sent.
    fn hand_out_rows(&mut self, encrypting: VhEncrypting) -> Result<(), JobError> {
        let Some(off) = self.encrypt_off_node.as_mut() else {
            return Err(self
                .cfg
                .internal("rows to encrypt off a node that does not"));
        };
        off.row_bytes = encrypting.layout().ciphertext_len();
        if !off.all_handed_out && off.pending.len() < off.in_flight {
            let piece_rows = off.piece_rows;
            self.compute(VhWork::Rows(encrypting, piece_rows));
        } else if off.all_handed_out && off.pending.is_empty() {
            self.rows_sent(encrypting);
        } else {
            self.stage = VhStage::Encrypting(encrypting);
        }
        Ok(())
    }

    /// A piece's ciphertexts back: kept until every piece before it is back, then sent in
    /// our order, cut in the batches the key holder takes.
    fn on_encrypted(
        &mut self,
        offset: u64,
        result: Result<Vec<u8>, String>,
    ) -> Result<(), JobError> {
        let ciphertexts = result.map_err(|reason| JobError::Compute {
            step: "encrypting our rows on this node's cluster",
            reason,
        })?;
        let Some(off) = self.encrypt_off_node.as_mut() else {
            return Err(self
                .cfg
                .internal("an encrypted piece came back to a node that sent none"));
        };
        off.take_back(offset, ciphertexts)?;
        let ready = off.ready();
        for batch in ready {
            for env in self.out.points(Phase::SumRows, vec![batch]) {
                self.send(env);
            }
        }
        // Waiting for pieces: go on. Still reading the next piece: its result goes on.
        match std::mem::replace(&mut self.stage, VhStage::Busy) {
            VhStage::Encrypting(encrypting) => self.hand_out_rows(encrypting)?,
            other => self.stage = other,
        }
        Ok(())
    }
}

/// Our rows while they are encrypted off the node: the pieces out, and the ciphertexts back
/// before an earlier piece.
#[derive(Debug)]
struct OffNodeRows {
    in_flight: usize,
    piece_rows: usize,
    /// Rows handed out so far: the next piece's offset.
    handed_out: u64,
    all_handed_out: bool,
    /// Each piece out or back but not sent, by offset: its rows and, once back, its
    /// ciphertexts.
    pending: BTreeMap<u64, (u64, Option<Vec<u8>>)>,
    /// Bytes of one row's ciphertexts (the layout's).
    row_bytes: usize,
}

impl OffNodeRows {
    fn new(in_flight: usize, piece_rows: usize) -> OffNodeRows {
        OffNodeRows {
            in_flight: in_flight.max(1),
            piece_rows: piece_rows.max(1),
            handed_out: 0,
            all_handed_out: false,
            pending: BTreeMap::new(),
            row_bytes: 0,
        }
    }

    /// The next piece, of `rows` read in our order, `cells` values a row.
    fn hand_out(&mut self, rows: Vec<u64>, cells: usize) -> Result<EncryptPiece, JobError> {
        let row_count = (rows.len() / cells.max(1)) as u64;
        if row_count == 0 || row_count * cells as u64 != rows.len() as u64 {
            return Err(JobError::Internal(format!(
                "{} values read for rows of {cells} cells",
                rows.len()
            )));
        }
        let offset = self.handed_out;
        self.handed_out += row_count;
        self.pending.insert(offset, (row_count, None));
        Ok(EncryptPiece {
            offset,
            row_count,
            rows: Zeroizing::new(rows),
        })
    }

    /// A piece back: it must be one out, not back before, with whole rows' ciphertexts.
    fn take_back(&mut self, offset: u64, ciphertexts: Vec<u8>) -> Result<(), JobError> {
        let bad = |what: String| JobError::Compute {
            step: "encrypting our rows on this node's cluster",
            reason: what,
        };
        let Some((rows, slot @ None)) = self.pending.get_mut(&offset) else {
            return Err(bad(format!(
                "a piece at row {offset} came back that was not out"
            )));
        };
        let expected = usize::try_from(*rows)
            .ok()
            .and_then(|rows| rows.checked_mul(self.row_bytes));
        if expected != Some(ciphertexts.len()) || self.row_bytes == 0 {
            return Err(bad(format!(
                "{} bytes came back for {rows} rows of {} bytes",
                ciphertexts.len(),
                self.row_bytes
            )));
        }
        *slot = Some(ciphertexts);
        Ok(())
    }

    /// The batches to send now: those of every piece back in a row from the first.
    fn ready(&mut self) -> Vec<Vec<u8>> {
        let row_bytes = self.row_bytes.max(1);
        let batch_bytes = (MAX_CIPHERTEXT_BATCH_BYTES / row_bytes).max(1) * row_bytes;
        let mut batches = Vec::new();
        while let Some(entry) = self.pending.first_entry() {
            if entry.get().1.is_none() {
                break;
            }
            let (_, (_, ciphertexts)) = entry.remove_entry();
            let ciphertexts = ciphertexts.unwrap_or_default();
            batches.extend(ciphertexts.chunks(batch_bytes).map(<[u8]>::to_vec));
        }
        batches
    }

    /// Whether a piece is out on the cluster.
    fn waiting(&self) -> bool {
        self.pending.values().any(|(_, back)| back.is_none())
    }
}

impl Protocol for ValueHolder {
    type Work = VhWork;
    type Done = VhDone;

    fn next_step(&mut self) -> Option<Step<VhWork>> {
        self.steps.pop_front()
    }

    fn run(work: VhWork) -> VhDone {
        match work {
            VhWork::Blind(s) => {
                let (batches, next) = s.blind();
                VhDone::Blinded(batches, next)
            }
            VhWork::OwnNext(mut s) => VhDone::OwnNext(s.next_own_batch(), s),
            VhWork::PeerBatch(s, p) => VhDone::PeerBatch(s.on_peer_batch(&p)),
            VhWork::PeerReblinded(s, pieces) => VhDone::PeerBatch(
                pieces
                    .iter()
                    .try_fold(s, |s, points| s.on_peer_reblinded(points)),
            ),
            VhWork::PeerEnd(s, total) => VhDone::PeerEnd(total, s.on_peer_end(total)),
            VhWork::ReturnNext(mut s, total) => {
                VhDone::ReturnNext(total, s.next_returned_batch(), s)
            }
            VhWork::Encrypt(mut s) => {
                let batch = s.next_batch();
                VhDone::Encrypted(s, batch)
            }
            VhWork::Rows(mut s, max_rows) => {
                let rows = s.next_rows(max_rows);
                VhDone::Rows(s, rows)
            }
            VhWork::Decrypt(s, sums) => VhDone::Decrypted(s.on_sums(&sums)),
        }
    }

    fn handle(&mut self, env: Envelope) -> Result<(), JobError> {
        let stage = std::mem::replace(&mut self.stage, VhStage::Over);
        let r = self.on_frame(stage, env);
        self.fail(r)
    }

    fn handle_done(&mut self, done: VhDone) -> Result<(), JobError> {
        let r = self.on_done(done);
        self.fail(r)
    }

    fn waits_for_pieces(&self) -> bool {
        self.off_node.as_ref().is_some_and(InOrderPoints::holds_end)
            || self
                .encrypt_off_node
                .as_ref()
                .is_some_and(OffNodeRows::waiting)
    }

    fn handle_reblinded(
        &mut self,
        offset: u64,
        result: Result<Vec<EncodedPoint>, ReblindFailure>,
    ) -> Result<(), JobError> {
        let r = piece_back(&self.cfg, self.off_node.as_mut(), offset, result);
        let r = self.fail(r);
        self.advance_off_node();
        r
    }

    fn handle_encrypted(
        &mut self,
        offset: u64,
        result: Result<Vec<u8>, String>,
    ) -> Result<(), JobError> {
        let r = self.on_encrypted(offset, result);
        self.fail(r)
    }

    fn handle_noise(&mut self, noise: Vec<i64>, charged: bool) -> Result<(), JobError> {
        let r = match std::mem::replace(&mut self.stage, VhStage::Over) {
            VhStage::Charging(session, peer_size) => {
                self.noise = noise;
                self.charged = charged;
                match session.on_peer_size(peer_size) {
                    Ok(ready) => {
                        self.steps.push_back(Step::Recheck);
                        self.compute(VhWork::Blind(ready));
                        Ok(())
                    }
                    Err(e) => Err(JobError::Refused(Veto(e.to_string()))),
                }
            }
            _ => Err(self.cfg.internal("noise came back that was not asked for")),
        };
        self.fail(r)
    }

    fn is_finished(&self) -> bool {
        matches!(self.stage, VhStage::Finished(_)) && self.steps.is_empty()
    }

    fn silence_allowed(&self) -> Duration {
        self.peer_size.map_or(STALL_BASE, |peer| {
            SumConfig::stall(self.own_size, peer, self.own_size)
        })
    }
}

#[cfg(test)]
#[path = "overlap_sum_tests.rs"]
mod tests;
