//! Errors of the node: [`NodeError`] for the node as a whole, and [`JobError`] for one job at this
//! node, typed to the edge (the failure report and the audit log render it to prose).

use cleanroom_transport::TransportError;

pub mod job;
pub use job::{JobError, Party, Timeout, Violation};

/// Why the node (or one of its jobs) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The node's configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// A transport failure (TLS, QUIC, framing).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A local I/O failure.
    #[error("{what}: {source}")]
    Io {
        /// What the node was doing.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The peer or the coordinator broke the protocol.
    #[error("protocol violation by {peer}: {reason}")]
    Protocol {
        /// Who misbehaved.
        peer: String,
        /// What they did.
        reason: String,
    },
    /// A connection ended without a violation: the peer crashed, restarted, or the network
    /// dropped it (reset, idle timeout).
    #[error("lost the connection to the {peer}: {reason}")]
    Lost {
        /// Whom the connection was with.
        peer: String,
        /// What QUIC reported.
        reason: String,
    },
    /// A job failed; the error renders as the sentence the analyst reads.
    #[error(transparent)]
    Job(#[from] JobError),
}

impl From<Timeout> for NodeError {
    fn from(t: Timeout) -> Self {
        NodeError::Job(JobError::Timeout(t))
    }
}
