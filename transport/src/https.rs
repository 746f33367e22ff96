//! TLS over TCP for HTTPS (the coordinator's web console), with the same consortium CA and
//! certificates as the QUIC endpoints.
//!
//! The server asks every client for a certificate and verifies any it gets against the CA, but
//! also lets a client without one finish the handshake, so that the application can answer it
//! with a readable 401 instead of a bare TLS alert. Who the client is comes from its verified
//! certificate alone ([`crate::Identity::from_cert`]).

use rustls::server::WebPkiClientVerifier;

use crate::pki::provider;
use crate::{Credentials, TransportError};

fn tls_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(e.to_string())
}

/// A rustls server config for HTTPS (HTTP/1.1, TLS 1.2 and 1.3) serving `creds`' certificate,
/// verifying client certificates against the consortium CA and allowing clients without one.
pub fn https_server_config(creds: &Credentials) -> Result<rustls::ServerConfig, TransportError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(creds.roots.clone(), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(tls_err)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// A rustls client config for HTTPS that trusts the consortium CA and presents `creds`'
/// certificate (tests and scripts talking to the web console).
pub fn https_client_config(creds: &Credentials) -> Result<rustls::ClientConfig, TransportError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_root_certificates(creds.roots.clone())
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// Like [`https_client_config`] without a client certificate (to check that the server
/// refuses such a client).
pub fn https_client_config_anonymous(
    creds: &Credentials,
) -> Result<rustls::ClientConfig, TransportError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_root_certificates(creds.roots.clone())
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}
