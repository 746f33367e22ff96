//! Transport of cleanroom: the consortium PKI, QUIC endpoints with mutual TLS, and framed
//! streams carrying one `cleanroom_proto::v1::Envelope` per frame.
//!
//! - [`pki`]: the CA's side: create the CA, certificate requests generated where the key lives,
//!   signing them, revocation and the CRL (identity in the SAN DNS name).
//! - [`credentials`]: [`Credentials`], a process's CA, certificate, key and CRL, reloaded on
//!   change or SIGHUP and consulted at every handshake.
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
pub mod credentials;
pub mod endpoint;
pub mod error;
pub mod framed;
pub mod https;
pub mod identity;
pub mod pki;
#[cfg(feature = "transcript")]
pub mod transcript;

pub use addr::{BadHostPort, HostPort};
pub use credentials::{Credentials, RELOAD_POLL, TlsFiles};
pub use endpoint::{
    ALPN, CLOSE_BAD_IDENTITY, CLOSE_UNTRUSTED, TransportTuning, accept, client_endpoint, connect,
    handshake, server_endpoint,
};
pub use error::TransportError;
pub use framed::{FramedRecv, FramedSend, accept_bi, open_bi};
pub use https::{https_client_config, https_client_config_anonymous, https_server_config};
pub use identity::{Identity, PeerRole, peer_identity, peer_key_fingerprint};
pub use pki::{CaPaths, CertPaths, init_ca, issue, issue_with_validity, key_fingerprint};

#[cfg(test)]
mod tests;
