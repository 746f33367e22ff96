//! TLS over TCP for HTTPS (the coordinator's web console), with the same consortium CA,
//! certificates and revocation list as the QUIC endpoints.
//!
//! The server asks every client for a certificate and verifies any it gets against the CA and
//! its CRL, but also lets a client without one finish the handshake, so that the application
//! can answer it with a readable 401 instead of a bare TLS alert. Who the client is comes from
//! its verified certificate alone ([`crate::Identity::from_cert`]).
//!
//! Like the QUIC endpoints, every handshake reads the current [`Credentials`] (a reloaded
//! certificate or CRL applies at the next connection) and sessions are never resumed (a resumed
//! session skips certificate verification, so a client revoked since could come back on an old
//! ticket).

use std::sync::Arc;

use crate::credentials::provider;
use crate::{Credentials, TransportError};

fn tls_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(e.to_string())
}

/// A rustls server config for HTTPS (HTTP/1.1, TLS 1.2 and 1.3) serving `creds`' current
/// certificate, verifying client certificates against the consortium CA and CRL and allowing
/// clients without one.
pub fn https_server_config(creds: &Credentials) -> Result<rustls::ServerConfig, TransportError> {
    let live = creds.live();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_client_cert_verifier(creds.live_client_cert_optional())
        .with_cert_resolver(live);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    Ok(tls)
}

/// A rustls client config for HTTPS that trusts the consortium CA and presents `creds`'
/// certificate (tests and scripts talking to the web console).
pub fn https_client_config(creds: &Credentials) -> Result<rustls::ClientConfig, TransportError> {
    client_config(creds, true)
}

/// Like [`https_client_config`] without a client certificate (to check that the server
/// refuses such a client).
pub fn https_client_config_anonymous(
    creds: &Credentials,
) -> Result<rustls::ClientConfig, TransportError> {
    client_config(creds, false)
}

fn client_config(
    creds: &Credentials,
    present_cert: bool,
) -> Result<rustls::ClientConfig, TransportError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_root_certificates(creds.roots());
    let mut tls = if present_cert {
        builder.with_client_cert_resolver(creds.live())
    } else {
        builder.with_no_client_auth()
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    Ok(tls)
}
