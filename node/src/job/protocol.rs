//! What a two-party job protocol looks like to the driver: a sans-IO state machine that takes the
//! peer's frames and the results of the work it asked for, and hands out [`Step`]s. The driver
//! ([`crate::job::driver::run_protocol`]) does each step — the socket, the CPU pool, the policy,
//! the audit log, the ledger — and feeds the results back; the protocol never touches any of
//! them, so its order is tested in memory (see `psi_tests.rs` and `overlap_sum_tests.rs`).

use std::time::Duration;

use cleanroom_proto::v1::Envelope;

use cleanroom_circuits::EncodedPoint;
use cleanroom_circuits::spill::BucketMatches;

use crate::audit::AuditEvent;
use crate::data::cluster_merge::MergeFailure;
use crate::data::cluster_reblind::ReblindFailure;
use crate::error::JobError;
pub use crate::job::overlap_sum::EncryptPiece;
pub use crate::job::psi::{MergeRequest, ReblindPiece};
use crate::ledger::Loss;

/// What the driver does next for a protocol.
#[derive(Debug)]
pub enum Step<W> {
    /// Write this frame to the peer.
    Send(Box<Envelope>),
    /// Stop unless the policy in force still permits the job.
    Recheck,
    /// Append this to the audit log before going on; stop if it cannot be written.
    Audit(AuditEvent),
    /// Run this on the CPU pool and hand the result to [`Protocol::handle_done`].
    Compute(W),
    /// Have these points of the partner's re-blinded on this node's cluster, alongside
    /// everything else, and hand the result to [`Protocol::handle_reblinded`].
    Reblind(ReblindPiece),
    /// Have these rows of ours encrypted on this node's cluster, alongside everything else, and
    /// hand the result to [`Protocol::handle_encrypted`].
    Encrypt(EncryptPiece),
    /// Have a spilled session's buckets merged on this node's cluster (the final comparison)
    /// and hand the answers to [`Protocol::handle_merged`].
    Merge(MergeRequest),
    /// Charge the ledger (if this node's entry sets ε) and draw this node's noise in the same
    /// transaction; hand the draw to [`Protocol::handle_noise`].
    Charge(NoiseRequest),
    /// Close our stream: everything has been written.
    Finish,
}

/// A noise draw the protocol needs, and the loss to charge for it.
pub struct NoiseRequest {
    /// The release's loss, if it is noised (`None`: an exact release, nothing to charge).
    pub loss: Option<Loss>,
    /// Draws the noise (pure; run on the CPU pool, inside the ledger's transaction if charged).
    pub draw: Box<dyn FnOnce() -> Result<Vec<i64>, String> + Send>,
}

impl std::fmt::Debug for NoiseRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseRequest")
            .field("loss", &self.loss)
            .finish_non_exhaustive()
    }
}

/// A two-party job protocol, as the driver runs it.
pub trait Protocol {
    /// CPU work the protocol hands out.
    type Work: Send + 'static;
    /// The result of a [`Protocol::Work`].
    type Done: Send + 'static;
    /// Whether the protocol takes the peer's frames that arrived while its work ran, right
    /// after the work (PSI streams: it picks its next work from them); otherwise frames are
    /// handed over only once it asks for nothing more.
    const TAKES_FRAMES_BETWEEN_WORK: bool = false;

    /// The peer's frames it has taken and not used yet. Between pieces of work the driver
    /// hands it more only while this is short, so that what the peer sends faster than the
    /// work goes waits in the driver's queue, whose memory is bounded.
    fn backlog(&self) -> usize {
        0
    }

    /// The next step, if any.
    fn next_step(&mut self) -> Option<Step<Self::Work>>;
    /// Does the work (pure).
    fn run(work: Self::Work) -> Self::Done;
    /// Takes the peer's next frame (the driver has checked its job id and size).
    fn handle(&mut self, env: Envelope) -> Result<(), JobError>;
    /// Takes the result of the last [`Step::Compute`].
    fn handle_done(&mut self, done: Self::Done) -> Result<(), JobError>;
    /// Takes the noise drawn for the last [`Step::Charge`]; `charged`: the ledger was charged.
    fn handle_noise(&mut self, noise: Vec<i64>, charged: bool) -> Result<(), JobError>;
    /// Whether it takes only pieces back now, no frame: it holds the peer's end marker until
    /// every piece of the points before it is back (an overlap-sum's sessions take the next
    /// phase's frames only after that end).
    fn waits_for_pieces(&self) -> bool {
        false
    }
    /// Takes a piece of a [`Step::Reblind`] back: the points of the piece that starts at
    /// `offset`, re-blinded, or why not. Only PSI and overlap-sum hand pieces out.
    fn handle_reblinded(
        &mut self,
        _offset: u64,
        _result: Result<Vec<EncodedPoint>, ReblindFailure>,
    ) -> Result<(), JobError> {
        Err(JobError::Internal(
            "a re-blinded piece came back to a protocol that hands none out".into(),
        ))
    }
    /// Takes a piece of a [`Step::Encrypt`] back: the ciphertexts of the rows that start at
    /// `offset`, or the cluster's reason. Only an overlap-sum's value holder hands rows out.
    fn handle_encrypted(
        &mut self,
        _offset: u64,
        _result: Result<Vec<u8>, String>,
    ) -> Result<(), JobError> {
        Err(JobError::Internal(
            "an encrypted piece came back to a protocol that hands none out".into(),
        ))
    }
    /// Takes the answers of a [`Step::Merge`]: every bucket's, in bucket order, or why there
    /// are none. Only a spilled PSI session or key holder hands its buckets out.
    fn handle_merged(
        &mut self,
        _answers: Result<Vec<BucketMatches>, MergeFailure>,
    ) -> Result<(), JobError> {
        Err(JobError::Internal(
            "a merge came back to a protocol that hands none out".into(),
        ))
    }
    /// Whether the exchange is complete.
    fn is_finished(&self) -> bool;
    /// How long the peer may stay silent now.
    fn silence_allowed(&self) -> Duration;
}

impl Protocol for crate::job::psi::PsiProtocol {
    type Work = crate::job::psi::Work;
    type Done = crate::job::psi::Done;
    const TAKES_FRAMES_BETWEEN_WORK: bool = true;

    fn next_step(&mut self) -> Option<Step<Self::Work>> {
        use crate::job::psi::Action;
        Some(match self.poll()? {
            Action::Send(env) => Step::Send(env),
            Action::Recheck => Step::Recheck,
            Action::Audit(event) => Step::Audit(event),
            Action::Compute(work) => Step::Compute(*work),
            Action::Reblind(piece) => Step::Reblind(piece),
            Action::Merge(request) => Step::Merge(request),
            Action::Finish => Step::Finish,
        })
    }

    fn run(work: Self::Work) -> Self::Done {
        work.run()
    }

    fn handle(&mut self, env: Envelope) -> Result<(), JobError> {
        crate::job::psi::PsiProtocol::handle(self, env)
    }

    fn handle_done(&mut self, done: Self::Done) -> Result<(), JobError> {
        crate::job::psi::PsiProtocol::handle_done(self, done)
    }

    fn handle_noise(&mut self, _: Vec<i64>, _: bool) -> Result<(), JobError> {
        // PSI's noise is drawn before its hello (it commits to it there): it asks for none.
        Err(JobError::Internal(
            "noise handed to the PSI protocol, which asks for none".into(),
        ))
    }

    fn handle_reblinded(
        &mut self,
        offset: u64,
        result: Result<Vec<EncodedPoint>, ReblindFailure>,
    ) -> Result<(), JobError> {
        crate::job::psi::PsiProtocol::handle_reblinded(self, offset, result)
    }

    fn handle_merged(
        &mut self,
        answers: Result<Vec<BucketMatches>, MergeFailure>,
    ) -> Result<(), JobError> {
        crate::job::psi::PsiProtocol::handle_merged(self, answers)
    }

    fn is_finished(&self) -> bool {
        crate::job::psi::PsiProtocol::is_finished(self)
    }

    fn backlog(&self) -> usize {
        crate::job::psi::PsiProtocol::backlog(self)
    }

    fn waits_for_pieces(&self) -> bool {
        self.waits_for_merge()
    }

    fn silence_allowed(&self) -> Duration {
        crate::job::psi::PsiProtocol::silence_allowed(self)
    }
}
