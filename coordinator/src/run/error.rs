//! Why a job ended other than in success, typed to the edge: the runner stores
//! [`JobError::state`] and the error's text as the job's reason, and that text is the only place
//! it becomes prose (what `cleanroom job status` shows). Everything a node sent that appears in
//! a reason went through [`crate::untrusted::node_text`] first.

use std::time::Duration;

use cleanroom_proto::v1::JobState;

use crate::store::StoreError;

/// Why a job failed or was vetoed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// A party is not connected to the coordinator, so nothing was offered.
    #[error(
        "node '{node}' is not connected to the coordinator (connected: {}); start it or check its config",
        list_or_none(connected)
    )]
    NotConnected {
        /// The missing party.
        node: String,
        /// The nodes connected at the time, sorted.
        connected: Vec<String>,
    },
    /// One or more nodes refused the offer.
    #[error("{}", join(.0))]
    Vetoed(Vec<Veto>),
    /// Offers that could not be made or answered (and no veto).
    #[error("{}", join(.0))]
    Unreached(Vec<PartyError>),
    /// A party accepted but did not start.
    #[error("{0}")]
    NotStarted(PartyError),
    /// One or more parties failed once the job ran (the nodes' own reasons first).
    #[error("{}", failed_text(.failures, .partials_dropped))]
    Failed {
        /// What each failing party did or said.
        failures: Vec<PartyError>,
        /// Whether the coordinator held partial results (an aggregate's partial sums) and
        /// dropped them.
        partials_dropped: bool,
    },
    /// The reports do not fit together; nothing is released.
    #[error(transparent)]
    Settle(#[from] SettleError),
    /// The job store failed.
    #[error("{step}: {source}")]
    Store {
        /// What was being stored.
        step: StoreStep,
        /// The store's error.
        source: StoreError,
    },
    /// The stored spec cannot run (validation at submission should have refused it).
    #[error("{0}")]
    Spec(String),
}

impl JobError {
    /// The state the job ends in: vetoed when a node refused, failed otherwise.
    pub fn state(&self) -> JobState {
        match self {
            JobError::Vetoed(_) => JobState::Vetoed,
            _ => JobState::Failed,
        }
    }

    /// A job store failure while recording the job's state.
    pub fn store(source: StoreError) -> JobError {
        JobError::Store {
            step: StoreStep::Record,
            source,
        }
    }

    /// A job store failure while storing the result.
    pub fn storing_result(source: StoreError) -> JobError {
        JobError::Store {
            step: StoreStep::Result,
            source,
        }
    }
}

/// What the store was doing when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StoreStep {
    /// Recording a state change.
    #[error("job store")]
    Record,
    /// Storing the result.
    #[error("storing the result")]
    Result,
}

/// A node's refusal of an offer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node '{node}' refused: {reason}")]
pub struct Veto {
    /// The node.
    pub node: String,
    /// Its reason, bounded and defused.
    pub reason: String,
}

/// What went wrong with one party.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PartyError {
    /// Its control connection would not open a stream.
    #[error("node '{node}' is unreachable: {error}")]
    Unreachable {
        /// The node.
        node: String,
        /// The transport's error.
        error: String,
    },
    /// Writing to or reading from its job stream failed.
    #[error("node '{node}': {error}")]
    Stream {
        /// The node.
        node: String,
        /// The transport's error.
        error: String,
    },
    /// Its answer to the offer could not be read.
    #[error("node '{node}' did not answer the offer: {error}")]
    NoAnswer {
        /// The node.
        node: String,
        /// The transport's error.
        error: String,
    },
    /// It went away while the job ran.
    #[error("node '{node}' lost: {error}")]
    Lost {
        /// The node.
        node: String,
        /// How it went.
        error: String,
    },
    /// It did not answer in time.
    #[error("node '{node}' {}", timeout_text(.stage, .after))]
    Timeout {
        /// The node.
        node: String,
        /// What it did not answer.
        stage: Stage,
        /// How long it had.
        after: Duration,
    },
    /// It reports that the job failed on its side.
    #[error("{node}: {reason}")]
    Failed {
        /// The node.
        node: String,
        /// Its reason, bounded and defused.
        reason: String,
    },
    /// It broke the protocol.
    #[error("node '{node}' {violation}")]
    Violation {
        /// The node.
        node: String,
        /// What it did.
        violation: Violation,
    },
    /// A task of the coordinator's failed (a panic): the job cannot go on.
    #[error("internal error: {0}")]
    Internal(String),
}

impl PartyError {
    /// A protocol violation by `node`.
    pub fn violation(node: &str, violation: Violation) -> PartyError {
        PartyError::Violation {
            node: node.to_owned(),
            violation,
        }
    }

    /// Whether this only says that the party went away (its own report, if it sent one, says
    /// more, so it is listed first).
    pub fn is_lost(&self) -> bool {
        matches!(self, PartyError::Lost { .. })
    }
}

/// The step a party did not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The offer (`offer_timeout_secs`).
    Offer,
    /// The start (its `Ready`).
    Start,
    /// The report (`job_timeout_secs`).
    Report,
}

fn timeout_text(stage: &Stage, after: &Duration) -> String {
    match stage {
        Stage::Offer => format!("did not answer the offer within {after:?}"),
        Stage::Start => "did not confirm the start".to_owned(),
        Stage::Report => format!("did not report within {after:?}"),
    }
}

/// What a node sent that no honest node sends, one variant per violation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Violation {
    /// The answer to an offer was something else.
    #[error("sent something other than an offer reply")]
    NotAnOfferReply,
    /// The answer to `Start` was not `Ready`.
    #[error("did not confirm the start")]
    NotReady,
    /// Where its report was due, something else came.
    #[error("sent something other than a report")]
    NotAReport,
    /// A report without an outcome.
    #[error("sent an empty report")]
    EmptyReport,
    /// An aggregate's report for a two-party job.
    #[error("sent an aggregate report for a PSI job")]
    AggregateReportForPsi,
    /// A two-party report for an aggregate.
    #[error("sent a report of another job kind")]
    ReportOfAnotherKind,
    /// Bytes that do not decode as a frame.
    #[error("sent an unreadable frame: {0}")]
    UnreadableFrame(String),
    /// A frame naming another job.
    #[error("sent a frame for another job")]
    FrameForAnotherJob,
    /// A frame of the wrong phase or body.
    #[error("sent an unexpected frame")]
    UnexpectedFrame,
    /// A partial batch out of sequence.
    #[error("sent partial batch {got} where {due} was due")]
    PartialOutOfOrder {
        /// The batch's sequence number.
        got: u64,
        /// The one expected.
        due: u64,
    },
    /// A partial batch that does not decode or overruns the vector.
    #[error("sent a bad partial (after {after} cells): {error}")]
    BadPartial {
        /// Cells received before it.
        after: usize,
        /// The decoder's error.
        error: String,
    },
    /// A report before all its partial cells.
    #[error("sent {sent} of {expected} partial cells")]
    MissingCells {
        /// Cells received.
        sent: usize,
        /// Cells the job's vector has.
        expected: usize,
    },
}

/// Why the parties' reports, each well-formed, do not make a result together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettleError {
    /// Two parties counted different intersections (exact counts).
    #[error("the nodes disagree on the result ({a} vs {b}); nothing is released")]
    CountsDisagree {
        /// The first party's count.
        a: u64,
        /// The second's.
        b: u64,
    },
    /// Two parties released different noised counts (the figures are not repeated: nothing is
    /// released).
    #[error("the nodes disagree on the noised result; nothing is released")]
    NoisedCountsDisagree,
    /// Two parties describe the noise differently.
    #[error("the nodes disagree on the noise in the result; nothing is released")]
    NoiseDisagrees,
    /// A party's report is missing.
    #[error("node '{node}' sent no report")]
    MissingReport {
        /// The node.
        node: String,
    },
    /// An overlap-sum report without its release.
    #[error("a node sent a report without the overlap-sum release; nothing is released")]
    NoSumRelease,
    /// The overlap-sum key holder reported figures (it may only repeat the terms).
    #[error("the key holder '{node}' reported figures it must not release; nothing is released")]
    KeyHolderReleased {
        /// The key holder.
        node: String,
    },
    /// The two overlap-sum reports describe different terms.
    #[error(
        "the nodes disagree on the terms of the release (columns, noise, threshold); nothing is \
         released"
    )]
    SumTermsDisagree,
    /// The overlap-sum value holder's release has the wrong number of groups or cells.
    #[error("the value holder '{node}' reported a release of the wrong shape; nothing is released")]
    WrongShape {
        /// The value holder.
        node: String,
    },
    /// No aggregate party reported.
    #[error("no party reported")]
    NoPartyReported,
    /// Two aggregate parties built their partials under different terms.
    #[error("nodes '{a}' and '{b}' applied different terms; nothing is released")]
    TermsDisagree {
        /// The first party.
        a: String,
        /// One that differs from it.
        b: String,
    },
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn failed_text(failures: &[PartyError], partials_dropped: &bool) -> String {
    let mut text = join(failures);
    if *partials_dropped {
        text.push_str("; no partial result is released");
    }
    text
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored reasons read as they did when they were strings (e2e tests match them).
    #[test]
    fn reasons_read_as_before() {
        let lost = PartyError::Lost {
            node: "acme".into(),
            error: "connection closed".into(),
        };
        let failed = PartyError::Failed {
            node: "globex".into(),
            reason: "audit log unwritable".into(),
        };
        let err = JobError::Failed {
            failures: vec![failed.clone(), lost.clone()],
            partials_dropped: true,
        };
        assert_eq!(err.state(), JobState::Failed);
        assert_eq!(
            err.to_string(),
            "globex: audit log unwritable; node 'acme' lost: connection closed; no partial \
             result is released"
        );
        let vetoed = JobError::Vetoed(vec![Veto {
            node: "acme".into(),
            reason: "purpose not allowed".into(),
        }]);
        assert_eq!(vetoed.state(), JobState::Vetoed);
        assert_eq!(
            vetoed.to_string(),
            "node 'acme' refused: purpose not allowed"
        );
        assert_eq!(
            JobError::NotConnected {
                node: "initech".into(),
                connected: vec![]
            }
            .to_string(),
            "node 'initech' is not connected to the coordinator (connected: none); start it or \
             check its config"
        );
        let timeout = PartyError::Timeout {
            node: "acme".into(),
            stage: Stage::Report,
            after: Duration::from_secs(5),
        };
        assert_eq!(timeout.to_string(), "node 'acme' did not report within 5s");
        assert_eq!(
            PartyError::violation("mallory", Violation::PartialOutOfOrder { got: 1, due: 0 })
                .to_string(),
            "node 'mallory' sent partial batch 1 where 0 was due"
        );
        assert!(lost.is_lost() && !failed.is_lost() && !timeout.is_lost());
    }
}
