//! Errors of the coordinator.

use cleanroom_transport::TransportError;

use crate::store::StoreError;

/// Why the coordinator or an analyst request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// A transport failure.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The job store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The coordinator refused an analyst's request (unknown job, bad spec, ...).
    #[error("{0}")]
    Refused(String),
    /// The analyst may not see or do this (`api::authz` decided; the message names the grant
    /// that would allow it).
    #[error("{0}")]
    Forbidden(String),
    /// A peer broke the protocol.
    #[error("protocol violation by {peer}: {reason}")]
    Protocol {
        /// Who.
        peer: String,
        /// What.
        reason: String,
    },
}
