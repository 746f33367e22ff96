//! The ECDH-PSI job (`overlap` and `match`) as a sans-IO protocol: [`PsiProtocol`] takes the
//! peer's frames ([`PsiProtocol::handle`]) and the results of CPU work
//! ([`PsiProtocol::handle_done`]), and hands out what to do next ([`PsiProtocol::poll`]): send a
//! frame, re-check the policy, audit, run CPU work, finish our stream. It never touches a socket,
//! a task or the clock; the job driver ([`crate::job::driver`]) does, and the tests below drive
//! two of them against each other in memory.
//!
//! The cryptography is `cleanroom_circuits::psi`'s by-value session; this file adds the wire
//! order around it. Each party writes, in order:
//!
//! ```text
//! PsiHello(set size, spec digest,     phase PSI_SIZE
//!          release terms,
//!          [noise term, commitment])
//! PointBatch* BatchEnd(total)          phase PSI_BLINDED          our items, k·H(x), shuffled
//! PointBatch* BatchEnd(total)          phase PSI_DOUBLE_BLINDED   the peer's items, re-blinded
//! BatchEnd(intersection)               phase PSI_DONE
//! [NoiseReveal(noise, nonce)]          phase PSI_DONE             if the hello committed
//! ```
//!
//! The hello is checked before any work on the peer's data: its sender, the spec digest, its
//! noise announcement (an `overlap` only), its release terms and its declared size. Batches must
//! come in their phase and in sequence; the counts must agree; a revealed noise must open the
//! hello's commitment. Anything else is a [`Violation`] by the partner.
//!
//! **No phase waits for another** (`cleanroom_circuits::Streaming`): our points go out batch by
//! batch as they are blinded, in a send order drawn before the first one; the peer's batches are
//! re-blinded as they come, taking turns with our own; our points coming back are compared as
//! they arrive. The peer's frames are checked against the wire order when they arrive and queue
//! until the session is free ([`PsiProtocol::handle`] takes them while CPU work is out). The
//! order on the wire is unchanged: what we return waits until our own end marker is out.

use std::collections::VecDeque;
use std::time::Duration;

use cleanroom_circuits::spill::{BucketMatches, Merge, SpilledOwn};
use cleanroom_circuits::{
    AwaitingMerge, AwaitingPeerSize, EncodedPoint, ItemSet, JobKey, Matching, POINT_LEN, PsiError,
    PsiOutput, PsiParams, PsiSession, Streaming,
};
use cleanroom_proto::v1::{
    Abort, BatchEnd, Envelope, JobKind, NoiseReveal, NoiseTerm, Phase, PointBatch, PsiHello,
    ReleaseTerms, envelope::Body,
};

use crate::audit::AuditEvent;
use crate::data::cluster_merge::MergeFailure;
use crate::data::cluster_reblind::ReblindFailure;
use crate::data::dataset;
use crate::error::{JobError, Party, Violation};
use crate::job::noise::{self, NONCE_LEN};
use crate::job::reblind_queue::{ReblindQueue, piece_points};
use crate::job::wire::{self, Outbox, stall_deadline};
use crate::policy::{Permit, Recipient, Veto};

/// Points per batch frame: 128 KiB, well under the frame cap.
pub const BATCH_POINTS: usize = 4096;

/// Batches one piece re-blinded off the node holds at most: 32 768 points of [`BATCH_POINTS`],
/// 1 MiB of points (2 MiB of hex in its plan), well under the cluster's 16 MiB messages, and
/// about a second of one core's curve work.
pub const BATCHES_PER_PIECE: usize = 8;

/// Points in a full piece at [`BATCH_POINTS`].
pub const PIECE_POINTS: usize = BATCHES_PER_PIECE * BATCH_POINTS;

/// Where the partner's points are re-blinded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReblindPlace {
    /// On this node's CPU pool, as the session's own work.
    Node,
    /// Off the node (on its own executors): in pieces handed out as [`Action::Reblind`], at
    /// most `in_flight` out at once.
    Elsewhere {
        /// Pieces out at once at most.
        in_flight: usize,
    },
}

/// Where a spilled session's final comparison (its buckets' merge) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergePlace {
    /// On this node's CPU pool, as the session's own work.
    Node,
    /// Off the node (on its own executors, which read the job's bucket files): handed out as
    /// [`Action::Merge`]. Only a spilled session's buckets can be.
    Elsewhere,
}

/// What a PSI job is, for the protocol: who, which kind, under which terms.
#[derive(Debug, Clone)]
pub struct PsiConfig {
    /// The job's id.
    pub job_id: String,
    /// This node's name.
    pub me: String,
    /// `overlap` or `match`.
    pub kind: JobKind,
    /// What the agreement permits for this job.
    pub permit: Permit,
    /// The spec digest both parties must share ([`crate::spec::spec_digest`]).
    pub digest: [u8; 32],
    /// This node's noise, if its allow entry sets ε (charged before the protocol starts).
    pub noise: Option<NoiseCommit>,
    /// Where the partner's points are re-blinded.
    pub reblind: ReblindPlace,
    /// Where a spilled session's buckets are merged.
    pub merge: MergePlace,
}

/// This node's noise for the job, committed to in its hello and opened after the count.
#[derive(Clone, PartialEq)]
pub struct NoiseCommit {
    /// How the noise was drawn, as the hello announces it.
    pub term: NoiseTerm,
    /// The noise value (secret until the reveal).
    pub noise: i64,
    /// The commitment nonce (secret until the reveal).
    pub nonce: [u8; NONCE_LEN],
}

impl std::fmt::Debug for NoiseCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseCommit")
            .field("term", &self.term)
            .finish_non_exhaustive()
    }
}

/// What the driver does next for the protocol.
#[derive(Debug)]
pub enum Action {
    /// Write this frame to the peer.
    Send(Box<Envelope>),
    /// Stop unless the policy in force still permits the job.
    Recheck,
    /// Append this to the audit log before going on; stop if it cannot be written.
    Audit(AuditEvent),
    /// Run this on the CPU pool and hand the result to [`PsiProtocol::handle_done`].
    Compute(Box<Work>),
    /// Have these points of the partner's re-blinded off the node and hand the result to
    /// [`PsiProtocol::handle_reblinded`] (only under [`ReblindPlace::Elsewhere`]). Pieces may
    /// come back in any order.
    Reblind(ReblindPiece),
    /// Have every bucket of the session merged off the node and hand the answers to
    /// [`PsiProtocol::handle_merged`] (only under [`MergePlace::Elsewhere`]).
    Merge(MergeRequest),
    /// Close our stream: everything has been written.
    Finish,
}

/// A spilled session's buckets, to merge off the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeRequest {
    /// Which merge each bucket needs.
    pub merge: Merge,
    /// How many records the merge's first set may hold (its stream's size): it bounds a
    /// bucket's answer.
    pub first_size: u64,
}

/// Points of the partner's to re-blind off the node.
pub struct ReblindPiece {
    /// Where they start in the partner's stream.
    pub offset: u64,
    /// The points as the partner sent them (concatenated encodings, whole points).
    pub points: Vec<u8>,
}

impl std::fmt::Debug for ReblindPiece {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReblindPiece")
            .field("offset", &self.offset)
            .field("points", &(self.points.len() / POINT_LEN))
            .finish()
    }
}

/// Our session while the exchange runs: before the peer's points are all in, and after.
#[derive(Debug)]
pub enum Session {
    /// Our points go out; the peer's come in.
    Streaming(Streaming),
    /// The peer's points are all in and sorted; ours come back.
    Matching(Matching),
}

impl Session {
    fn own_done(&self) -> bool {
        match self {
            Session::Streaming(s) => s.own_done(),
            Session::Matching(m) => m.own_done(),
        }
    }
}

/// Batches one piece of CPU work takes at most: 16 384 points, a few tenths of a second. Each
/// piece is one round trip to the CPU pool, and rayon's workers spin between pieces; fewer,
/// larger pieces keep that overhead small while our batches still leave every piece.
pub const BATCHES_PER_WORK: usize = 4;

/// CPU work of the protocol; [`Work::run`] is pure.
#[derive(Debug)]
pub enum Work {
    /// Blind the next batches of our items (at most [`BATCHES_PER_WORK`]); a spilled session
    /// reads them.
    BlindNext(Session),
    /// Re-blind batches of the peer's items, in order.
    PeerBatches(Streaming, Vec<Vec<u8>>),
    /// The peer's items are all in: check and sort them.
    PeerEnd(Streaming, u64),
    /// Batches of our items, returned double-blinded: compare them.
    Returned(Matching, Vec<Vec<u8>>),
    /// All of our items are back: count.
    ReturnedEnd(Matching, u64),
    /// All of our items are back: check the total, and ready the buckets to be merged off the
    /// node.
    MergeElsewhere(Matching, u64),
    /// A spilled session: re-blind the next piece of the peer's stored points.
    Reblind(Matching),
    /// Re-blinding off the node, in memory: the peer's next points, re-blinded, in order.
    PeerReblinded(Streaming, Vec<Vec<EncodedPoint>>),
    /// Re-blinding off the node, spilled: take up to this many pieces of the peer's stored
    /// points, of at most this many points each, to hand out.
    TakePieces(Matching, usize, usize),
    /// Re-blinding off the node, spilled: pieces back, into their buckets (in the order they
    /// went out when the session returns in order).
    PiecesBack(Matching, Vec<Vec<EncodedPoint>>),
}

/// The result of a [`Work`].
#[derive(Debug)]
pub enum Done {
    /// The session, and our next blinded batches (none once all are out).
    BlindNext(Result<(Session, Vec<Vec<u8>>), PsiError>),
    /// The re-blinded batches to return, if due (returning in order).
    PeerBatches(Result<(Streaming, Vec<Vec<u8>>), PsiError>),
    /// The peer's total, and the session that compares our returned points.
    PeerEnd(u64, Result<Matching, PsiError>),
    /// Returned batches compared.
    Returned(Result<Matching, PsiError>),
    /// The count.
    ReturnedEnd(Result<PsiOutput, PsiError>),
    /// The session, its buckets ready to be merged off the node.
    MergeElsewhere(Result<AwaitingMerge, PsiError>),
    /// A piece of the peer's stored points re-blinded (here, or pieces back from elsewhere).
    Reblind(Result<Matching, PsiError>),
    /// Pieces of the peer's stored points to hand out.
    Pieces(Result<(Matching, Vec<ReblindPiece>), PsiError>),
}

impl Work {
    /// Does the work.
    pub fn run(self) -> Done {
        match self {
            Work::BlindNext(mut s) => {
                let mut run = || {
                    let mut batches = Vec::new();
                    while batches.len() < BATCHES_PER_WORK {
                        let batch = match &mut s {
                            Session::Streaming(x) => x.blind_next()?,
                            Session::Matching(x) => x.blind_next()?,
                        };
                        match batch {
                            Some(b) => batches.push(b),
                            None => break,
                        }
                    }
                    Ok(batches)
                };
                let batches = run();
                Done::BlindNext(batches.map(|b| (s, b)))
            }
            Work::PeerBatches(s, batches) => Done::PeerBatches(batches.iter().try_fold(
                (s, Vec::new()),
                |(s, mut replies), points| {
                    let (s, reply) = s.on_peer_batch(points)?;
                    replies.extend(reply);
                    Ok((s, replies))
                },
            )),
            Work::PeerEnd(s, total) => Done::PeerEnd(total, s.on_peer_end(total)),
            Work::Returned(s, batches) => Done::Returned(
                batches
                    .iter()
                    .try_fold(s, |s, points| s.on_returned_batch(points)),
            ),
            Work::ReturnedEnd(s, total) => Done::ReturnedEnd(s.on_returned_end(total)),
            Work::MergeElsewhere(s, total) => Done::MergeElsewhere(s.merged_elsewhere(total)),
            Work::Reblind(mut s) => {
                Done::Reblind(s.reblind_next(BATCHES_PER_WORK * BATCH_POINTS).map(|()| s))
            }
            Work::PeerReblinded(s, pieces) => Done::PeerBatches(pieces.iter().try_fold(
                (s, Vec::new()),
                |(s, mut replies), points| {
                    let (s, reply) = s.on_peer_reblinded(points)?;
                    replies.extend(reply);
                    Ok((s, replies))
                },
            )),
            Work::TakePieces(mut s, count, piece_points) => {
                let mut run = || {
                    let mut pieces = Vec::new();
                    while pieces.len() < count {
                        match s.take_reblind_piece(piece_points)? {
                            Some((offset, points)) => pieces.push(ReblindPiece { offset, points }),
                            None => break,
                        }
                    }
                    Ok(pieces)
                };
                let pieces = run();
                Done::Pieces(pieces.map(|p| (s, p)))
            }
            Work::PiecesBack(mut s, pieces) => Done::Reblind(
                pieces
                    .iter()
                    .try_for_each(|points| s.on_reblinded_piece(points))
                    .map(|()| s),
            ),
        }
    }
}

/// What the exchange produced: the count (and membership) from the session, the peer's noise
/// (its term and opened value) and the stricter of both parties' release terms.
#[derive(Debug)]
pub struct PsiExchange {
    /// The session's output.
    pub output: PsiOutput,
    /// The peer's noise, if its hello committed to some.
    pub peer_noise: Option<(NoiseTerm, i64)>,
    /// The joint release terms.
    pub joint: ReleaseTerms,
}

/// Where the protocol is.
enum Stage {
    /// Our hello is out; the peer's is due.
    Hello(AwaitingPeerSize),
    /// Points travel both ways.
    Exchange(Box<Exchange>),
    /// Our points are all back; the buckets are merged off the node. The peer's final frames
    /// that come meanwhile wait.
    Merging(Box<(AwaitingMerge, VecDeque<Envelope>)>),
    /// Our count is out; the peer's is due.
    Count(PsiOutput),
    /// The counts agree; the peer's noise reveal is due.
    Reveal(PsiOutput),
    /// Done.
    Finished(PsiExchange),
    /// Failed or taken.
    Over,
}

/// A frame of the peer's that passed the wire checks and waits for the session.
#[derive(Debug)]
enum Input {
    Points(Vec<u8>),
    End(u64),
    Returned(Vec<u8>),
    ReturnedEnd(u64),
}

impl Input {
    /// The peer's batch of its own points, if this is one (else this, back).
    fn into_points(self) -> Result<Vec<u8>, Input> {
        match self {
            Input::Points(p) => Ok(p),
            other => Err(other),
        }
    }

    /// A batch of our points returned by the peer, if this is one (else this, back).
    fn into_returned(self) -> Result<Vec<u8>, Input> {
        match self {
            Input::Returned(p) => Ok(p),
            other => Err(other),
        }
    }
}

/// `first` and the batches of the same kind waiting right behind it in `inputs` (`same` says
/// which), at most [`BATCHES_PER_WORK`] in all: one piece of work.
fn gather(
    first: Vec<u8>,
    inputs: &mut VecDeque<Input>,
    same: fn(Input) -> Result<Vec<u8>, Input>,
) -> Vec<Vec<u8>> {
    let mut batches = vec![first];
    while batches.len() < BATCHES_PER_WORK {
        let Some(next) = inputs.pop_front() else {
            break;
        };
        match same(next) {
            Ok(batch) => batches.push(batch),
            Err(other) => {
                inputs.push_front(other);
                break;
            }
        }
    }
    batches
}

/// Which phase the peer's stream is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerPhase {
    Blinded,
    DoubleBlinded,
    Done,
}

/// The exchange of points.
struct Exchange {
    /// `None` while its CPU work is out.
    session: Option<Session>,
    /// The peer's frames, checked on the wire, in order.
    inputs: VecDeque<Input>,
    /// Where the peer's stream is, and its next batch number there.
    peer_phase: PeerPhase,
    seq_in: u64,
    /// The peer's frames of the final phase, kept until our count is out.
    later: VecDeque<Envelope>,
    /// Our end marker of the blinded phase is out.
    own_end_sent: bool,
    /// Returns (in order) computed before our end marker was out.
    held: Vec<Vec<u8>>,
    /// The peer's total, once all its points are in (our returns end with it).
    peer_total: Option<u64>,
    /// Our return end marker is out.
    returns_closed: bool,
    /// Our own blinding takes the next turn when both it and the peer's work could.
    own_turn: bool,
    /// Re-blinding off the node; `None` when the node re-blinds.
    off_node: Option<OffNode>,
}

/// The peer's points re-blinded off the node.
#[derive(Debug)]
struct OffNode {
    /// The session re-blinds after the peer's last point (spilled): pieces come from its store
    /// then. Otherwise they are the peer's batches as they arrive.
    spilled: bool,
    pieces: ReblindQueue,
}

impl Exchange {
    fn new(session: Streaming, reblind: ReblindPlace, return_in_order: bool) -> Exchange {
        let spilled = session.reblinds_after_peer_end();
        let off_node = match reblind {
            ReblindPlace::Node => None,
            ReblindPlace::Elsewhere { in_flight } => Some(OffNode {
                spilled,
                // Spilled and returning shuffled, the session buckets the pieces: any order.
                pieces: ReblindQueue::new(
                    in_flight,
                    BATCHES_PER_PIECE * session.batch_size(),
                    spilled && !return_in_order,
                ),
            }),
        };
        Exchange {
            session: Some(Session::Streaming(session)),
            inputs: VecDeque::new(),
            peer_phase: PeerPhase::Blinded,
            seq_in: 0,
            later: VecDeque::new(),
            own_end_sent: false,
            held: Vec::new(),
            peer_total: None,
            returns_closed: false,
            own_turn: true,
            off_node,
        }
    }

    /// Whether the peer's points wait to go out, are out, or are back and not yet taken.
    fn pieces_pending(&self) -> bool {
        self.off_node
            .as_ref()
            .is_some_and(|off| off.pieces.pending())
    }

    /// In memory, off the node: the peer's batches that wait, handed out in pieces while
    /// fewer than `in_flight` are out.
    fn hand_out_pieces(&mut self, actions: &mut VecDeque<Action>) {
        if let Some(off) = self.off_node.as_mut().filter(|off| !off.spilled) {
            actions.extend(off.pieces.hand_out().into_iter().map(Action::Reblind));
        }
    }

    /// Whether the next input can be worked on by `session` now.
    fn input_ready(&self, session: &Session) -> bool {
        match (self.inputs.front(), session) {
            // Off the node, the peer's batches go to the pieces instead, never in here.
            (Some(Input::Points(_)), Session::Streaming(_)) => true,
            // The peer's end waits for every piece of its points to be back and taken.
            (Some(Input::End(_)), Session::Streaming(_)) => !self.pieces_pending(),
            (Some(Input::Returned(_)), Session::Matching(_)) => true,
            (Some(Input::ReturnedEnd(_)), Session::Matching(_)) => self.returns_closed,
            _ => false,
        }
    }
}

/// What the peer's hello settled.
struct PeerTerms {
    size: u64,
    noise: Option<NoiseTerm>,
    commitment: Vec<u8>,
    joint: ReleaseTerms,
}

/// One party's PSI protocol.
pub struct PsiProtocol {
    cfg: PsiConfig,
    partner: String,
    out: Outbox,
    actions: VecDeque<Action>,
    stage: Stage,
    own_size: u64,
    peer: Option<PeerTerms>,
}

impl std::fmt::Debug for PsiProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PsiProtocol")
            .field("job_id", &self.cfg.job_id)
            .field("partner", &self.partner)
            .field("own_size", &self.own_size)
            .finish_non_exhaustive()
    }
}

/// This node's release terms, as its hello announces them.
pub fn release_terms(permit: &Permit) -> ReleaseTerms {
    ReleaseTerms {
        min_result: permit.min_result.max(1),
        counts_to_coordinator: permit.counts_allowed_to(Recipient::Coordinator),
    }
}

/// The stricter of both parties' release terms: the larger threshold, and counts to the
/// coordinator only if both agreements allow it. A hello without terms, or with a threshold
/// of 0 (an honest node sends at least 1), is the peer's violation.
pub fn joint_release(
    own: &ReleaseTerms,
    peer: Option<&ReleaseTerms>,
) -> Result<ReleaseTerms, String> {
    let peer = peer.ok_or("its hello carries no release terms")?;
    if peer.min_result == 0 {
        return Err("its hello declares a minimum result of 0 (at least 1)".into());
    }
    Ok(ReleaseTerms {
        min_result: own.min_result.max(peer.min_result),
        counts_to_coordinator: own.counts_to_coordinator && peer.counts_to_coordinator,
    })
}

impl PsiProtocol {
    /// Starts the protocol over our loaded items with a fresh key: our hello is the first
    /// action.
    pub fn start(cfg: PsiConfig, key: JobKey, items: ItemSet) -> PsiProtocol {
        Self::start_batched(cfg, key, items, BATCH_POINTS)
    }

    /// [`start`](Self::start) with `batch_points` points per batch frame (tests use small ones).
    pub(crate) fn start_batched(
        cfg: PsiConfig,
        key: JobKey,
        items: ItemSet,
        batch_points: usize,
    ) -> PsiProtocol {
        let params = Self::params(&cfg.permit, batch_points);
        Self::with_session(cfg, PsiSession::start(params, key, items))
    }

    /// Starts the protocol over our set blinded with `key` on the executors (`k·H(x)` for
    /// each distinct key): the in-memory exchange, membership included; its indices then
    /// refer to the points in sorted order.
    pub fn start_blinded(cfg: PsiConfig, key: JobKey, points: Vec<EncodedPoint>) -> PsiProtocol {
        let params = Self::params(&cfg.permit, BATCH_POINTS);
        Self::with_session(cfg, PsiSession::start_blinded(params, key, points))
    }

    /// Starts the protocol over our set blinded with `key` as it was read and spilled
    /// ([`cleanroom_circuits::spill`]): the same wire, with memory that does not grow with the
    /// sets. What it matched comes as tags or points (`PsiOutput::spilled_matches`).
    pub fn start_spilled(cfg: PsiConfig, key: JobKey, own: SpilledOwn) -> PsiProtocol {
        Self::start_spilled_batched(cfg, key, own, BATCH_POINTS)
    }

    /// [`start_spilled`](Self::start_spilled) with `batch_points` points per batch frame.
    pub(crate) fn start_spilled_batched(
        cfg: PsiConfig,
        key: JobKey,
        own: SpilledOwn,
        batch_points: usize,
    ) -> PsiProtocol {
        let params = Self::params(&cfg.permit, batch_points);
        Self::with_session(cfg, PsiSession::start_spilled(params, key, own))
    }

    fn params(permit: &Permit, batch_points: usize) -> PsiParams {
        PsiParams {
            key_name: dataset::key_name(&permit.keys),
            min_peer_set: permit.min_peer_set,
            max_peer_set: permit.max_peer_set,
            return_in_order: permit.partner_learns_membership,
            learn_membership: permit.i_learn_membership,
            batch_size: batch_points,
        }
    }

    fn with_session(cfg: PsiConfig, (own_size, session): (u64, AwaitingPeerSize)) -> PsiProtocol {
        let permit = &cfg.permit;
        let (noise_term, noise_commitment) = match &cfg.noise {
            Some(n) => (
                Some(n.term.clone()),
                noise::commitment(&cfg.job_id, &cfg.me, n.noise, &n.nonce).to_vec(),
            ),
            None => (None, Vec::new()),
        };
        let mut out = Outbox::new(&cfg.job_id, Phase::PsiSize);
        let hello = out.frame(
            Phase::PsiSize,
            Body::PsiHello(PsiHello {
                sender: cfg.me.clone(),
                set_size: own_size,
                spec_digest: cfg.digest.to_vec(),
                noise: noise_term,
                noise_commitment,
                sum: None,
                release: Some(release_terms(permit)),
            }),
        );
        PsiProtocol {
            partner: permit.partner.clone(),
            cfg,
            out,
            actions: VecDeque::from([Action::Send(Box::new(hello))]),
            stage: Stage::Hello(session),
            own_size,
            peer: None,
        }
    }

    /// Our set size (distinct items), as the hello declares it.
    pub fn own_size(&self) -> u64 {
        self.own_size
    }

    /// The next thing to do, if any.
    pub fn poll(&mut self) -> Option<Action> {
        if self.actions.is_empty() {
            self.advance();
        }
        self.actions.pop_front()
    }

    /// Whether the exchange is complete ([`PsiProtocol::into_exchange`] returns it).
    pub fn is_finished(&self) -> bool {
        matches!(self.stage, Stage::Finished(_)) && self.actions.is_empty()
    }

    /// Whether it waits for its buckets' merge and takes no frame meanwhile: the peer's final
    /// frames, and the end of its stream after them, stay with the driver until our count is
    /// out.
    pub fn waits_for_merge(&self) -> bool {
        matches!(self.stage, Stage::Merging(_))
    }

    /// The peer's frames taken and not yet worked on.
    pub fn backlog(&self) -> usize {
        match &self.stage {
            Stage::Exchange(x) => x.inputs.len(),
            _ => 0,
        }
    }

    /// The finished exchange; `None` before it is finished.
    pub fn into_exchange(self) -> Option<PsiExchange> {
        match self.stage {
            Stage::Finished(x) if self.actions.is_empty() => Some(x),
            _ => None,
        }
    }

    /// How long the peer may stay silent now: before its hello, what reading and blinding the
    /// largest set the agreement accepts may take (a peer under a `memory_limit` blinds its set
    /// while it reads it, before it can say its size); then in proportion to both set sizes.
    pub fn silence_allowed(&self) -> Duration {
        self.peer.as_ref().map_or_else(
            || stall_deadline(0, self.cfg.permit.max_peer_set),
            |p| stall_deadline(self.own_size, p.size),
        )
    }

    fn violation(&self, v: impl Into<Violation>) -> JobError {
        JobError::violation(Party::Node(self.partner.clone()), v)
    }

    fn send(&mut self, env: Envelope) {
        self.actions.push_back(Action::Send(Box::new(env)));
    }

    /// Takes the peer's next frame (the driver has checked its job id and size).
    pub fn handle(&mut self, env: Envelope) -> Result<(), JobError> {
        let stage = std::mem::replace(&mut self.stage, Stage::Over);
        let result = self.on_frame(stage, env);
        if result.is_err() {
            self.stage = Stage::Over;
            self.actions.clear();
        }
        result
    }

    /// Takes the result of the last [`Action::Compute`].
    pub fn handle_done(&mut self, done: Done) -> Result<(), JobError> {
        let result = self.on_done(done);
        if result.is_err() {
            self.stage = Stage::Over;
            self.actions.clear();
        }
        result
    }

    /// Takes a piece handed out by [`Action::Reblind`], re-blinded off the node (or why not):
    /// a bad point of the partner's is its violation, named by its place in its stream.
    pub fn handle_reblinded(
        &mut self,
        offset: u64,
        result: Result<Vec<EncodedPoint>, ReblindFailure>,
    ) -> Result<(), JobError> {
        let taken = self.on_reblinded(offset, result);
        if taken.is_err() {
            self.stage = Stage::Over;
            self.actions.clear();
        }
        taken
    }

    /// Takes the answers of an [`Action::Merge`], every bucket in order (or why there are
    /// none): a point twice in a bucket is the partner's violation.
    pub fn handle_merged(
        &mut self,
        answers: Result<Vec<BucketMatches>, MergeFailure>,
    ) -> Result<(), JobError> {
        let taken = self.on_merged(answers);
        if taken.is_err() {
            self.stage = Stage::Over;
            self.actions.clear();
        }
        taken
    }

    fn on_merged(
        &mut self,
        answers: Result<Vec<BucketMatches>, MergeFailure>,
    ) -> Result<(), JobError> {
        let Stage::Merging(merging) = std::mem::replace(&mut self.stage, Stage::Over) else {
            return Err(self.internal("the buckets' merge came back while none was out"));
        };
        let (waiting, later) = *merging;
        let answers = answers.map_err(|e| match e {
            MergeFailure::Peer(e) => self.violation(Violation::Psi(e)),
            MergeFailure::Cluster(reason) => JobError::Compute {
                step: "comparing the points on this node's cluster",
                reason,
            },
        })?;
        let output = waiting.finish(answers).map_err(|e| match e {
            PsiError::Spill(_) => self.internal(&e.to_string()),
            e => self.violation(Violation::Psi(e)),
        })?;
        self.counted(output, later)
    }

    fn on_reblinded(
        &mut self,
        offset: u64,
        result: Result<Vec<EncodedPoint>, ReblindFailure>,
    ) -> Result<(), JobError> {
        let points = piece_points(&self.partner, offset, result)?;
        let Stage::Exchange(x) = &mut self.stage else {
            return Err(self.internal("a re-blinded piece came back outside the exchange"));
        };
        let taken = x
            .off_node
            .as_mut()
            .is_some_and(|off| off.pieces.came_back(offset, points));
        if taken {
            Ok(())
        } else {
            Err(self.internal("a re-blinded piece came back that was not out"))
        }
    }

    fn on_frame(&mut self, stage: Stage, env: Envelope) -> Result<(), JobError> {
        if let Some(Body::Abort(Abort { reason })) = &env.body {
            return Err(JobError::Aborted {
                peer: Party::Node(self.partner.clone()),
                reason: reason.clone(),
            });
        }
        match stage {
            Stage::Hello(session) => self.on_hello(session, &env),
            Stage::Exchange(mut x) => {
                let taken = self.on_exchange_frame(&mut x, env);
                self.stage = Stage::Exchange(x);
                taken
            }
            Stage::Merging(mut merging) => {
                wire::check_phase(&env, Phase::PsiDone).map_err(|v| self.violation(v))?;
                merging.1.push_back(env);
                self.stage = Stage::Merging(merging);
                Ok(())
            }
            Stage::Count(output) => {
                let peer_count = wire::expect_body(&env, Phase::PsiDone, |b| match b {
                    Body::BatchEnd(e) => Some(e.total),
                    _ => None,
                })
                .map_err(|v| self.violation(v))?;
                if peer_count != output.intersection {
                    return Err(self.violation(Violation::CountMismatch {
                        theirs: peer_count,
                        ours: output.intersection,
                    }));
                }
                let awaits_reveal = self.peer.as_ref().is_some_and(|p| p.noise.is_some());
                self.stage = if awaits_reveal {
                    Stage::Reveal(output)
                } else {
                    self.finished(output, None)
                };
                Ok(())
            }
            Stage::Reveal(output) => {
                let (value, nonce) = wire::expect_body(&env, Phase::PsiDone, |b| match b {
                    Body::NoiseReveal(r) => Some((r.noise, r.nonce.clone())),
                    _ => None,
                })
                .map_err(|v| self.violation(v))?;
                let peer = self
                    .peer
                    .as_ref()
                    .ok_or_else(|| self.internal("no peer terms"))?;
                noise::check_reveal(
                    &self.cfg.job_id,
                    &self.partner,
                    &peer.commitment,
                    value,
                    &nonce,
                )
                .map_err(|e| self.violation(Violation::Terms(e)))?;
                let term = peer
                    .noise
                    .clone()
                    .ok_or_else(|| self.internal("no peer noise"))?;
                self.stage = self.finished(output, Some((term, value)));
                Ok(())
            }
            Stage::Finished(_) | Stage::Over => {
                Err(self.internal("a frame was handed over while the protocol takes none"))
            }
        }
    }

    fn internal(&self, what: &str) -> JobError {
        JobError::Internal(format!("PSI protocol of job '{}': {what}", self.cfg.job_id))
    }

    /// Checks one of the peer's frames against the wire order of the exchange and queues it for
    /// the session (its content is the session's to check).
    fn on_exchange_frame(&mut self, x: &mut Exchange, env: Envelope) -> Result<(), JobError> {
        let phase = match x.peer_phase {
            PeerPhase::Blinded => Phase::PsiBlinded,
            PeerPhase::DoubleBlinded => Phase::PsiDoubleBlinded,
            PeerPhase::Done => {
                wire::check_phase(&env, Phase::PsiDone).map_err(|v| self.violation(v))?;
                x.later.push_back(env);
                return Ok(());
            }
        };
        wire::check_phase(&env, phase).map_err(|v| self.violation(v))?;
        let returned = x.peer_phase == PeerPhase::DoubleBlinded;
        match env.body {
            Some(Body::Points(PointBatch { seq, points })) => {
                wire::check_seq(seq, &mut x.seq_in).map_err(|v| self.violation(v))?;
                if returned {
                    x.inputs.push_back(Input::Returned(points));
                } else if let Some(off) = x.off_node.as_mut().filter(|off| !off.spilled) {
                    // Checked now and handed out in pieces (the session would check them on
                    // the node): nothing that is not whole points within the peer's declared
                    // size leaves the node.
                    let declared = self.peer.as_ref().map_or(0, |p| p.size);
                    off.pieces
                        .arrive(declared, points)
                        .map_err(|e| self.violation(Violation::Psi(e)))?;
                } else {
                    x.inputs.push_back(Input::Points(points));
                }
            }
            Some(Body::BatchEnd(BatchEnd { total })) => {
                x.inputs.push_back(if returned {
                    Input::ReturnedEnd(total)
                } else {
                    Input::End(total)
                });
                x.peer_phase = if returned {
                    PeerPhase::Done
                } else {
                    PeerPhase::DoubleBlinded
                };
                x.seq_in = 0;
            }
            other => return Err(self.violation(wire::unexpected(phase, other.as_ref()))),
        }
        Ok(())
    }

    /// The exchange's next step when nothing is queued: our end marker once our points are out
    /// (then the returns we held), one batch of our shuffled return, our return end marker, or
    /// the next CPU work — our next batch and the peer's next input taking turns.
    fn advance(&mut self) {
        let Stage::Exchange(x) = &mut self.stage else {
            return;
        };
        x.hand_out_pieces(&mut self.actions);
        let Some(mut session) = x.session.take() else {
            return;
        };
        if !x.own_end_sent && session.own_done() {
            x.own_end_sent = true;
            let end = self.out.end(Phase::PsiBlinded, self.own_size);
            self.actions.push_back(Action::Send(Box::new(end)));
            let held = std::mem::take(&mut x.held);
            for env in self.out.points(Phase::PsiDoubleBlinded, held) {
                self.actions.push_back(Action::Send(Box::new(env)));
            }
        }
        if let (true, false, Some(total), Session::Matching(m)) =
            (x.own_end_sent, x.returns_closed, x.peer_total, &mut session)
            && !m.reblind_pending()
        {
            let env = match m.next_return() {
                Some(batch) => self.out.points(Phase::PsiDoubleBlinded, vec![batch]),
                None => {
                    x.returns_closed = true;
                    vec![self.out.end(Phase::PsiDoubleBlinded, total)]
                }
            };
            self.actions
                .extend(env.into_iter().map(|e| Action::Send(Box::new(e))));
            x.session = Some(session);
            return;
        }
        let own_left = !session.own_done();
        let pieces_ready = x.off_node.as_ref().is_some_and(|off| off.pieces.ready());
        let input_ready = x.input_ready(&session) || pieces_ready;
        // A spilled session's heavy step, taken when nothing cheaper waits.
        let reblind =
            !input_ready && matches!(&session, Session::Matching(m) if m.reblind_pending());
        let work = if own_left && (x.own_turn || !input_ready) {
            x.own_turn = false;
            Work::BlindNext(session)
        } else if reblind {
            match (session, x.off_node.as_ref()) {
                (Session::Matching(m), None) => Work::Reblind(m),
                (Session::Matching(m), Some(off)) if m.reblind_pieces_left() => {
                    if off.pieces.room() > 0 {
                        Work::TakePieces(m, off.pieces.room(), off.pieces.piece_points())
                    } else {
                        x.session = Some(Session::Matching(m));
                        return;
                    }
                }
                // Every piece is back and taken: sort the buckets.
                (Session::Matching(m), Some(off))
                    if !off.pieces.any_out() && m.reblind_pieces_back() =>
                {
                    Work::Reblind(m)
                }
                (other, _) => {
                    x.session = Some(other);
                    return;
                }
            }
        } else if pieces_ready {
            x.own_turn = true;
            let pieces = x
                .off_node
                .as_mut()
                .map(|off| off.pieces.take_back())
                .unwrap_or_default();
            match session {
                Session::Streaming(s) => Work::PeerReblinded(s, pieces),
                Session::Matching(m) => Work::PiecesBack(m, pieces),
            }
        } else if input_ready {
            x.own_turn = true;
            match (x.inputs.pop_front(), session) {
                (Some(Input::Points(p)), Session::Streaming(s)) => {
                    Work::PeerBatches(s, gather(p, &mut x.inputs, Input::into_points))
                }
                (Some(Input::End(total)), Session::Streaming(s)) => Work::PeerEnd(s, total),
                (Some(Input::Returned(p)), Session::Matching(m)) => {
                    Work::Returned(m, gather(p, &mut x.inputs, Input::into_returned))
                }
                (Some(Input::ReturnedEnd(total)), Session::Matching(m)) => match self.cfg.merge {
                    MergePlace::Node => Work::ReturnedEnd(m, total),
                    MergePlace::Elsewhere => Work::MergeElsewhere(m, total),
                },
                // input_ready said otherwise.
                (_, session) => {
                    x.session = Some(session);
                    return;
                }
            }
        } else {
            x.session = Some(session);
            return;
        };
        self.actions.push_back(Action::Compute(Box::new(work)));
    }

    fn finished(&self, output: PsiOutput, peer_noise: Option<(NoiseTerm, i64)>) -> Stage {
        let joint = self.peer.as_ref().map(|p| p.joint).unwrap_or(ReleaseTerms {
            min_result: u64::MAX,
            counts_to_coordinator: false,
        });
        Stage::Finished(PsiExchange {
            output,
            peer_noise,
            joint,
        })
    }

    fn on_hello(&mut self, session: AwaitingPeerSize, env: &Envelope) -> Result<(), JobError> {
        let hello = wire::expect_body(env, Phase::PsiSize, |b| match b {
            Body::PsiHello(h) => Some(h.clone()),
            _ => None,
        })
        .map_err(|v| self.violation(v))?;
        if hello.sender != self.partner {
            return Err(self.violation(Violation::WrongSender(hello.sender)));
        }
        if hello.spec_digest != self.cfg.digest {
            return Err(self.violation(Violation::SpecMismatch));
        }
        let peer_noise = noise::check_peer_announcement(
            &self.partner,
            hello.noise.as_ref(),
            &hello.noise_commitment,
        )
        .map_err(|e| self.violation(Violation::Terms(e)))?;
        if peer_noise.is_some() && self.cfg.kind != JobKind::Overlap {
            return Err(self.violation(Violation::Terms(
                "it announced noise for a match job".into(),
            )));
        }
        let joint = joint_release(&release_terms(&self.cfg.permit), hello.release.as_ref())
            .map_err(|e| self.violation(Violation::Terms(e)))?;
        self.cfg
            .permit
            .check_peer_size(hello.set_size)
            .map_err(JobError::Refused)?;
        let ready = session
            .on_peer_size(hello.set_size)
            .map_err(|e| JobError::Refused(Veto(e.to_string())))?;
        self.peer = Some(PeerTerms {
            size: hello.set_size,
            noise: peer_noise,
            commitment: hello.noise_commitment,
            joint,
        });
        self.actions.push_back(Action::Recheck);
        if self.cfg.permit.partner_learns_membership {
            self.actions.push_back(Action::Audit(AuditEvent::Release {
                job_id: self.cfg.job_id.clone(),
                partner: self.partner.clone(),
                what: "which of the partner's records we hold (its membership)".into(),
                to: vec![self.partner.clone()],
                value: None,
                epsilon: 0.0,
                rho: None,
            }));
        }
        self.stage = Stage::Exchange(Box::new(Exchange::new(
            ready.stream(),
            self.cfg.reblind,
            self.cfg.permit.partner_learns_membership,
        )));
        Ok(())
    }

    fn on_done(&mut self, done: Done) -> Result<(), JobError> {
        // The session's errors are the peer's, except a failure of our own spill files.
        let psi = |p: &Self, e: PsiError| match e {
            PsiError::Spill(_) => p.internal(&e.to_string()),
            e => p.violation(Violation::Psi(e)),
        };
        let Stage::Exchange(x) = &mut self.stage else {
            return Err(self.internal("work came back that was not out"));
        };
        if x.session.is_some() {
            return Err(self.internal("work came back that was not out"));
        }
        let session = match done {
            Done::BlindNext(r) => {
                let (session, batches) = r.map_err(|e| psi(self, e))?;
                for env in self.out.points(Phase::PsiBlinded, batches) {
                    self.actions.push_back(Action::Send(Box::new(env)));
                }
                session
            }
            Done::PeerBatches(r) => {
                let (next, replies) = r.map_err(|e| psi(self, e))?;
                let Stage::Exchange(x) = &mut self.stage else {
                    return Err(self.internal("the exchange went away"));
                };
                if x.own_end_sent {
                    for env in self.out.points(Phase::PsiDoubleBlinded, replies) {
                        self.actions.push_back(Action::Send(Box::new(env)));
                    }
                } else {
                    x.held.extend(replies);
                }
                Session::Streaming(next)
            }
            Done::PeerEnd(total, r) => {
                let next = r.map_err(|e| psi(self, e))?;
                if let Stage::Exchange(x) = &mut self.stage {
                    x.peer_total = Some(total);
                }
                Session::Matching(next)
            }
            Done::Returned(r) => Session::Matching(r.map_err(|e| psi(self, e))?),
            Done::Reblind(r) => Session::Matching(r.map_err(|e| psi(self, e))?),
            Done::Pieces(r) => {
                let (next, pieces) = r.map_err(|e| psi(self, e))?;
                let Stage::Exchange(x) = &mut self.stage else {
                    return Err(self.internal("the exchange went away"));
                };
                if let Some(off) = x.off_node.as_mut() {
                    off.pieces.went_out(pieces.len());
                }
                self.actions.extend(pieces.into_iter().map(Action::Reblind));
                Session::Matching(next)
            }
            Done::ReturnedEnd(r) => {
                let output = r.map_err(|e| psi(self, e))?;
                let later = match std::mem::replace(&mut self.stage, Stage::Over) {
                    Stage::Exchange(x) => x.later,
                    _ => return Err(self.internal("counted outside the exchange")),
                };
                return self.counted(output, later);
            }
            Done::MergeElsewhere(r) => {
                let waiting = r.map_err(|e| psi(self, e))?;
                let later = match std::mem::replace(&mut self.stage, Stage::Over) {
                    Stage::Exchange(x) => x.later,
                    _ => return Err(self.internal("merged outside the exchange")),
                };
                self.actions.push_back(Action::Merge(MergeRequest {
                    merge: waiting.merge(),
                    first_size: self.own_size,
                }));
                self.stage = Stage::Merging(Box::new((waiting, later)));
                return Ok(());
            }
        };
        match &mut self.stage {
            Stage::Exchange(x) => {
                x.session = Some(session);
                Ok(())
            }
            _ => Err(self.internal("the exchange went away")),
        }
    }

    /// Our points are all back and counted (our returns are out: see [`Exchange::input_ready`]):
    /// the count and our noise reveal go out, our stream ends, and the peer's final frames that
    /// came early are taken in order.
    fn counted(&mut self, output: PsiOutput, later: VecDeque<Envelope>) -> Result<(), JobError> {
        let count = self.out.end(Phase::PsiDone, output.intersection);
        self.send(count);
        if let Some(n) = &self.cfg.noise {
            let reveal = self.out.frame(
                Phase::PsiDone,
                Body::NoiseReveal(NoiseReveal {
                    noise: n.noise,
                    nonce: n.nonce.to_vec(),
                }),
            );
            self.send(reveal);
        }
        self.actions.push_back(Action::Finish);
        self.stage = Stage::Count(output);
        for env in later {
            if matches!(self.stage, Stage::Finished(_)) {
                // What an honest peer never sends after its last frame is not read.
                break;
            }
            let stage = std::mem::replace(&mut self.stage, Stage::Over);
            self.on_frame(stage, env)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "psi_tests.rs"]
mod tests;
