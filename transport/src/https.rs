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

use rustls::DistinguishedName;
use rustls::SignatureScheme;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};

use crate::credentials::{Live, provider};
use crate::{Credentials, TransportError};

fn tls_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(e.to_string())
}

/// The endpoints' verifier with one difference: a client may present no certificate.
#[derive(Debug)]
struct OptionalClientCert(Arc<Live>);

impl ClientCertVerifier for OptionalClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ClientCertVerifier::verify_tls12_signature(self.0.as_ref(), message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ClientCertVerifier::verify_tls13_signature(self.0.as_ref(), message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ClientCertVerifier::supported_verify_schemes(self.0.as_ref())
    }
}

/// A rustls server config for HTTPS (HTTP/1.1, TLS 1.2 and 1.3) serving `creds`' current
/// certificate, verifying client certificates against the consortium CA and CRL and allowing
/// clients without one.
pub fn https_server_config(creds: &Credentials) -> Result<rustls::ServerConfig, TransportError> {
    let live = creds.live();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_client_cert_verifier(Arc::new(OptionalClientCert(live.clone())))
        .with_cert_resolver(live);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    Ok(tls)
}

/// A rustls client config for HTTPS that trusts the consortium CA and presents `creds`'
/// certificate (tests and scripts talking to the web console).
pub fn https_client_config(creds: &Credentials) -> Result<rustls::ClientConfig, TransportError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_root_certificates(creds.roots())
        .with_client_cert_resolver(creds.live());
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
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
        .with_root_certificates(creds.roots())
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    Ok(tls)
}
