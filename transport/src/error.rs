//! The one error type of this crate.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why a transport operation failed. Carries what a reader needs to act (the file, the address,
/// the identity expected and the one presented) and never any key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A PKI file could not be read, parsed, written, or does not fit with the others.
    #[error("{}: {reason}", path.display())]
    Pki {
        /// The file (or directory) concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Building a TLS or QUIC configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// An endpoint could not be created or bound.
    #[error("cannot open a QUIC endpoint on {addr}: {reason}")]
    Bind {
        /// Address to bind.
        addr: SocketAddr,
        /// Why it failed.
        reason: String,
    },
    /// Dialing a peer failed.
    #[error("cannot connect to {expected} at {addr}: {reason}")]
    Connect {
        /// Address dialed.
        addr: SocketAddr,
        /// The identity the peer was expected to prove.
        expected: String,
        /// Why, and what to check.
        reason: String,
    },
    /// An incoming connection's handshake failed (unknown CA, expired or missing client cert…).
    #[error("handshake with {remote} failed: {reason}")]
    Handshake {
        /// Remote address of the peer.
        remote: SocketAddr,
        /// Why it failed.
        reason: String,
    },
    /// The peer's certificate is valid but names another identity than the one expected.
    #[error("expected peer {expected}, but its certificate says {got}")]
    WrongPeer {
        /// Identity expected.
        expected: String,
        /// Identity presented.
        got: String,
    },
    /// A reload (a new CRL or CA) made the certificate of a connected peer untrusted.
    #[error("{peer} is no longer trusted: {reason}")]
    Untrusted {
        /// The peer's identity.
        peer: String,
        /// Why (revoked, expired…).
        reason: String,
    },
    /// The peer (or our own certificate) carries no cleanroom identity.
    #[error("no cleanroom identity in certificate: {reason}")]
    NoIdentity {
        /// What was missing or ambiguous.
        reason: String,
    },
    /// A name that cannot be a cleanroom identity name.
    #[error(
        "invalid name '{name}': names are 1-63 characters of a-z, 0-9 and '-', \
         not starting or ending with '-'"
    )]
    BadName {
        /// The rejected name.
        name: String,
    },
    /// A frame could not be decoded or was not the one expected.
    #[error(transparent)]
    Frame(#[from] cleanroom_proto::FrameError),
    /// A stream failed (reset or stopped by the peer, or closed locally).
    #[error("stream error: {0}")]
    Stream(String),
    /// The connection is gone.
    #[error("connection closed: {reason}")]
    Closed {
        /// Why, as reported by QUIC.
        reason: String,
    },
}
