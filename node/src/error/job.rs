//! Why a job failed at this node: [`JobError`], typed to the edge and rendered to prose only where
//! a person reads it (the failure report the analyst sees, the audit log's `JobError` entry, the
//! node's log). A peer's misbehaviour is a [`Violation`] naming the peer ([`Party`]).

use std::fmt;

use cleanroom_circuits::PsiError;
use cleanroom_circuits::intersection_sum::SumError;
use cleanroom_proto::v1::Phase;
use cleanroom_transport::TransportError;

use crate::policy::Veto;

/// Who a job deals with, as its errors name them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Party {
    /// The partner node of a two-party job: `node 'globex'`.
    Node(String),
    /// A party of an aggregate: its bare name, `globex`.
    Peer(String),
    /// The coordinator.
    Coordinator,
}

impl Party {
    /// The party's node name (empty for the coordinator).
    pub fn name(&self) -> &str {
        match self {
            Party::Node(n) | Party::Peer(n) => n,
            Party::Coordinator => "",
        }
    }
}

impl fmt::Display for Party {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Party::Node(n) => write!(f, "node '{n}'"),
            Party::Peer(n) => f.write_str(n),
            Party::Coordinator => f.write_str("coordinator"),
        }
    }
}

/// What a peer (or the coordinator) did that an honest party never does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// A frame that names another job.
    #[error("frame for job '{got}' on the stream of job '{expected}'")]
    WrongJob {
        /// The job the frame names.
        got: String,
        /// This job.
        expected: String,
    },
    /// A frame of a phase other than the one the protocol is in.
    #[error("frame for phase {got} while in phase {}", expected.as_str_name())]
    WrongPhase {
        /// The frame's phase number.
        got: i32,
        /// The phase the protocol is in.
        expected: Phase,
    },
    /// A message the phase does not take (`what`: "a hello", "an end marker", …).
    #[error("sent {what} in phase {}", phase.as_str_name())]
    Unexpected {
        /// What kind of message it was.
        what: &'static str,
        /// The phase the protocol is in.
        phase: Phase,
    },
    /// A point batch out of sequence.
    #[error("batch {got} out of order (expected {expected})")]
    OutOfOrder {
        /// The batch's number.
        got: u64,
        /// The number due.
        expected: u64,
    },
    /// Bytes that are not a frame: truncated, oversized, or not an envelope.
    #[error("{0}")]
    Unreadable(String),
    /// More than it may make us buffer (the job wing's frame budget).
    #[error("{0}")]
    OverBudget(String),
    /// A hello that names someone else as its sender.
    #[error("hello names sender '{0}'")]
    WrongSender(String),
    /// A hello whose spec digest differs from ours: the coordinator told the parties different
    /// things.
    #[error("it was given a different job spec")]
    SpecMismatch,
    /// A final count that differs from ours.
    #[error("it counted {theirs} shared items, we counted {ours}")]
    CountMismatch {
        /// Its count.
        theirs: u64,
        /// Ours.
        ours: u64,
    },
    /// Its data-plane connection was refused by the data plane (the reason says how).
    #[error("its data-plane connection was refused: {0}")]
    ConnectionRefused(String),
    /// Points or batches the PSI session refuses.
    #[error(transparent)]
    Psi(#[from] PsiError),
    /// Points, rows or ciphertexts the intersection-sum session refuses.
    #[error(transparent)]
    Sum(#[from] SumError),
    /// A hello's terms, noise announcement or reveal that an honest party does not send (the
    /// text says which).
    #[error("{0}")]
    Terms(String),
}

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// This node's agreement refuses the job after all (a policy reload, the input or the peer's
    /// declared size, the budget).
    #[error("refused: {0}")]
    Refused(Veto),
    /// A peer or the coordinator broke the protocol.
    #[error("protocol violation by {by}: {violation}")]
    Violation {
        /// Who.
        by: Party,
        /// What.
        violation: Violation,
    },
    /// A peer's connection went away (timed out, closed, reset): no fault of its bytes.
    #[error("lost the connection to {peer}: {reason}")]
    Lost {
        /// Whom the connection was with.
        peer: Party,
        /// What QUIC reported.
        reason: String,
    },
    /// A peer's stream ended before the protocol did.
    #[error("{peer} closed its stream early")]
    ClosedEarly {
        /// Whose stream.
        peer: Party,
    },
    /// A peer stopped the job and said why.
    #[error("{peer} aborted the job: {reason}")]
    Aborted {
        /// Who.
        peer: Party,
        /// Its reason (its own words).
        reason: String,
    },
    /// Something did not happen in time.
    #[error(transparent)]
    Timeout(#[from] Timeout),
    /// The job stopped waiting for its peers' connections (it was ended meanwhile).
    #[error("job cancelled while waiting for the {waiting_for}")]
    Cancelled {
        /// "peer" or "peers".
        waiting_for: &'static str,
    },
    /// The coordinator dropped the job's stream (another party failed, or it shut down).
    #[error("the coordinator stopped the job (another party failed or it shut down)")]
    Withdrawn,
    /// An access or release could not be audited, so it did not happen.
    #[error("node '{node}' could not write its audit log; the job was stopped")]
    Audit {
        /// This node.
        node: String,
    },
    /// The release could not be recorded in the ledger.
    #[error("node '{node}' could not store the release in its privacy-budget ledger")]
    Ledger {
        /// This node.
        node: String,
    },
    /// The dataset could not be read for the job's keys.
    #[error("dataset: {0}")]
    Dataset(String),
    /// The dataset changed between the two reads of a `match` (its size differs).
    #[error("the dataset changed during the job")]
    DatasetChanged,
    /// This node's noise could not be drawn or opened (the reason says why).
    #[error("{0}")]
    Noise(String),
    /// The policy was reloaded while an aggregate offer was being decided.
    #[error("the policy changed while the offer was decided; try again")]
    PolicyChangedDuringOffer,
    /// The dataset could not be read into an aggregate's vector (the reader's own words).
    #[error("{0}")]
    Rows(String),
    /// The deletion list could not be read.
    #[error("deletion list: {0}")]
    DeletionList(String),
    /// A peer could not be reached or its stream opened (`what` says which step).
    #[error("{what}: {reason}")]
    DataPlane {
        /// The step: "cannot reach party 'x'", "data plane to …".
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// A local computation failed (`step` names it: "noise", "partial sum", …).
    #[error("{step}: {reason}")]
    Compute {
        /// The step.
        step: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// A transport failure on one of the job's streams.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A defect in this node (a task panicked, an index the protocol guarantees was missing).
    #[error("internal error: {0}")]
    Internal(String),
}

/// What did not happen in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Timeout {
    /// The coordinator sent no `Start` after the offer was accepted.
    #[error("no Start from the coordinator in time")]
    NoStart,
    /// The partner of a two-party job never connected.
    #[error("node '{0}' did not connect in time")]
    NodeDidNotConnect(String),
    /// A party of an aggregate never connected.
    #[error("party '{0}' did not connect in time")]
    PartyDidNotConnect(String),
    /// A peer sent nothing for longer than its share of the work could take.
    #[error("{peer} sent nothing for {secs}s; the job was stopped")]
    Silent {
        /// Who.
        peer: Party,
        /// How long, in whole seconds.
        secs: u64,
    },
    /// The job ran past its deadline.
    #[error("job timed out")]
    Job,
}

impl JobError {
    /// A violation by `by`.
    pub fn violation(by: Party, violation: impl Into<Violation>) -> JobError {
        JobError::Violation {
            by,
            violation: violation.into(),
        }
    }

    /// The veto inside a refusal.
    pub fn refused(veto: impl Into<Veto>) -> JobError {
        JobError::Refused(veto.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::NodeError;

    /// What the analyst reads stays as the node wrote it before the errors were typed (the e2e
    /// tests match these words); the variant is what code matches.
    #[test]
    fn errors_render_to_the_sentences_analysts_read() {
        let cases: Vec<(NodeError, &str)> = vec![
            (Timeout::Job.into(), "job timed out"),
            (
                Timeout::NodeDidNotConnect("globex".into()).into(),
                "node 'globex' did not connect in time",
            ),
            (
                Timeout::Silent {
                    peer: Party::Node("globex".into()),
                    secs: 60,
                }
                .into(),
                "node 'globex' sent nothing for 60s; the job was stopped",
            ),
            (
                JobError::Refused(Veto("input 3 rows < min_input 10".into())).into(),
                "refused: input 3 rows < min_input 10",
            ),
            (
                JobError::Audit {
                    node: "acme".into(),
                }
                .into(),
                "node 'acme' could not write its audit log; the job was stopped",
            ),
            (
                JobError::violation(
                    Party::Node("globex".into()),
                    Violation::OutOfOrder {
                        got: 3,
                        expected: 0,
                    },
                )
                .into(),
                "protocol violation by node 'globex': batch 3 out of order (expected 0)",
            ),
            (
                JobError::Lost {
                    peer: Party::Node("globex".into()),
                    reason: "closed".into(),
                }
                .into(),
                "lost the connection to node 'globex': closed",
            ),
            (
                JobError::Withdrawn.into(),
                "the coordinator stopped the job (another party failed or it shut down)",
            ),
        ];
        for (error, text) in cases {
            assert!(matches!(error, NodeError::Job(_)), "{error:?}");
            assert_eq!(error.to_string(), text);
        }
    }
}
