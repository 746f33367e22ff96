//! Transport of cleanroom: the consortium PKI, QUIC endpoints with mutual TLS, and framed
//! streams carrying one `cleanroom_proto::v1::Envelope` per frame.
//!
//! - [`pki`]: create the CA, issue certificates (identity in the SAN DNS name), load
//!   [`Credentials`].
//! - [`identity`]: [`Identity`] = role + name, read from a CA-verified certificate
//!   ([`peer_identity`]).
//! - [`addr`]: [`HostPort`], a `host:port` address with a DNS name or an IP literal, resolved
//!   when dialled.
//! - [`endpoint`]: [`server_endpoint`], [`client_endpoint`], [`connect`], [`accept`] — TLS 1.3,
//!   ALPN `cleanroom/1`, client certificates required everywhere.
//! - [`framed`]: [`FramedSend`] / [`FramedRecv`] over quinn streams, length cap checked before
//!   any body byte is buffered.
//!
//! Every rustls config is built with the ring provider passed explicitly, so callers need not
//! install a process-wide default crypto provider.
#![warn(missing_docs)]

pub mod addr;
pub mod endpoint;
pub mod error;
pub mod framed;
pub mod https;
pub mod identity;
pub mod pki;
#[cfg(feature = "transcript")]
pub mod transcript;

pub use addr::{BadHostPort, HostPort};
pub use endpoint::{
    ALPN, TransportTuning, accept, client_endpoint, connect, handshake, server_endpoint,
};
pub use error::TransportError;
pub use framed::{FramedRecv, FramedSend, accept_bi, open_bi};
pub use https::{https_client_config, https_client_config_anonymous, https_server_config};
pub use identity::{Identity, PeerRole, peer_identity};
pub use pki::{CaPaths, CertPaths, Credentials, init_ca, issue, issue_with_validity};

#[cfg(test)]
mod tests;
