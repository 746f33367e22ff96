//! Errors of the node.

use cleanroom_transport::TransportError;

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
    /// The job failed; the reason is meant for the analyst.
    #[error("{0}")]
    Job(String),
}
