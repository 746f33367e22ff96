//! QUIC endpoints with mutual TLS on every connection.
//!
//! Servers require a client certificate issued by the consortium CA (rustls'
//! `WebPkiClientVerifier`); clients verify the server's certificate against the same CA and for
//! the DNS name of the identity they meant to reach. Only TLS 1.3 (QUIC requires it), ALPN
//! `cleanroom/1`, and the ring crypto provider passed explicitly to every config: no process-wide
//! default provider has to be installed.
//!
//! Note on TLS 1.3: the server checks the client certificate after the client considers its
//! side of the handshake done, so a refused client may see `connect` succeed and the connection
//! close immediately afterwards with the server's reason.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, IdleTimeout, TransportConfig, VarInt};

use crate::credentials::provider;
use crate::{Credentials, Identity, TransportError, peer_identity};

/// The ALPN protocol of cleanroom v1.
pub const ALPN: &[u8] = b"cleanroom/1";

/// Application close code: the peer's certificate names no acceptable identity.
pub const CLOSE_BAD_IDENTITY: VarInt = VarInt::from_u32(1);
/// Application close code: a reload (a new CRL or CA) made the peer's certificate untrusted.
pub const CLOSE_UNTRUSTED: VarInt = VarInt::from_u32(2);

/// Timing knobs of every connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportTuning {
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Ping interval keeping an idle-but-wanted connection alive (well below `idle_timeout`).
    pub keep_alive: Duration,
}

impl Default for TransportTuning {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            // Also how soon a node notices that the coordinator restarted: its next ping gets
            // the new process's stateless reset (see `server_endpoint`).
            keep_alive: Duration::from_secs(1),
        }
    }
}

/// Transport parameters tuned for bulk transfer on fast links.
fn transport_config(tuning: &TransportTuning) -> Result<Arc<TransportConfig>, TransportError> {
    let idle = IdleTimeout::try_from(tuning.idle_timeout).map_err(|e| {
        TransportError::Tls(format!(
            "idle timeout {:?} out of range: {e}",
            tuning.idle_timeout
        ))
    })?;
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(16 << 20))
        .receive_window(VarInt::from_u32(32 << 20))
        .send_window(32 << 20)
        .max_concurrent_bidi_streams(VarInt::from_u32(256))
        .max_concurrent_uni_streams(VarInt::from_u32(64))
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(tuning.keep_alive));
    Ok(Arc::new(t))
}

fn tls_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(e.to_string())
}

fn client_config(
    creds: &Credentials,
    tuning: &TransportTuning,
) -> Result<quinn::ClientConfig, TransportError> {
    let live = creds.live();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(live.clone())
        .with_client_cert_resolver(live);
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption: a resumed session skips certificate verification, so a peer revoked since
    // could come back on an old ticket.
    tls.resumption = rustls::client::Resumption::disabled();
    let quic = QuicClientConfig::try_from(tls).map_err(tls_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport_config(tuning)?);
    Ok(config)
}

fn server_config(
    creds: &Credentials,
    tuning: &TransportTuning,
) -> Result<quinn::ServerConfig, TransportError> {
    let live = creds.live();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(live.clone())
        .with_cert_resolver(live);
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption (see `client_config`): every handshake verifies the client's certificate
    // under the current CA and CRL.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(tls_err)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport_config(tuning)?);
    Ok(config)
}

/// An endpoint bound to `bind` that accepts connections (client certificate required) and can
/// also dial out with `creds`. Must be called inside a tokio runtime.
///
/// Its stateless-reset key is derived from the certificate's private key, so it survives a
/// restart: a restarted coordinator (or node) that receives a packet of a connection its
/// predecessor held answers with a stateless reset the peer accepts (RFC 9000 §10.3), and the
/// peer learns at its next packet (a keep-alive at most [`TransportTuning::keep_alive`] later)
/// that the connection is gone, instead of waiting for the idle timeout. A random key per
/// process (quinn's default) made nodes wait 30 s to notice a restarted coordinator.
pub fn server_endpoint(
    bind: SocketAddr,
    creds: &Credentials,
    tuning: &TransportTuning,
) -> Result<quinn::Endpoint, TransportError> {
    let bind_err = |e: std::io::Error| TransportError::Bind {
        addr: bind,
        reason: e.to_string(),
    };
    let socket = std::net::UdpSocket::bind(bind).map_err(bind_err)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| bind_err(std::io::Error::other("no async runtime found")))?;
    let (reset_key, cid_key) = restart_keys(creds);
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
    // Connection IDs are checked against a keyed hash before a reset is sent; with a random key
    // per process, the restarted endpoint would drop its predecessor's IDs silently.
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let mut endpoint = quinn::Endpoint::new(
        endpoint_config,
        Some(server_config(creds, tuning)?),
        socket,
        runtime,
    )
    .map_err(bind_err)?;
    endpoint.set_default_client_config(client_config(creds, tuning)?);
    Ok(endpoint)
}

/// The keys of an endpoint serving with `creds` that must survive its restarts: the
/// stateless-reset key (HMAC-SHA256) and the key of its connection-ID hash, each derived from
/// SHA-256(domain ‖ private key). Learning them needs the private key, and would only let an
/// attacker reset this endpoint's connections.
///
/// They are derived from the key loaded when the endpoint was made; a renewal with a new key
/// takes effect for them at the next restart.
fn restart_keys(creds: &Credentials) -> (ring::hmac::Key, u64) {
    let key = zeroize::Zeroizing::new(creds.secret_key_der());
    let derive = |domain: &[u8]| {
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        digest.update(domain);
        digest.update(key.as_slice());
        digest.finish()
    };
    let reset = derive(b"cleanroom/1 QUIC stateless reset key\0");
    let cid = derive(b"cleanroom/1 QUIC connection ID key\0");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    (
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset.as_ref()),
        u64::from_le_bytes(cid_key),
    )
}

/// A dial-only endpoint on an ephemeral port of the address family of `for_addr`. Must be
/// called inside a tokio runtime.
pub fn client_endpoint(
    creds: &Credentials,
    tuning: &TransportTuning,
    for_addr: SocketAddr,
) -> Result<quinn::Endpoint, TransportError> {
    let bind: SocketAddr = if for_addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| TransportError::Bind {
        addr: bind,
        reason: e.to_string(),
    })?;
    endpoint.set_default_client_config(client_config(creds, tuning)?);
    Ok(endpoint)
}

/// The TLS alert a handshake failure carries (QUIC CRYPTO_ERROR 0x100 + alert), if any.
fn tls_alert(e: &ConnectionError) -> Option<u64> {
    let code: u64 = match e {
        ConnectionError::TransportError(t) => t.code.into(),
        ConnectionError::ConnectionClosed(c) => c.error_code.into(),
        _ => return None,
    };
    // `then`, not `then_some`: the subtraction must not run for codes below 0x100 (a plain
    // transport error such as a timeout), where it underflows.
    (0x100..0x200).contains(&code).then(|| code - 0x100)
}

/// Why a connection ended, in words: a refusal of our own certificate says so.
pub(crate) fn closed_reason(e: &ConnectionError) -> String {
    match tls_alert(e) {
        // certificate_revoked
        Some(44) => {
            format!("the peer refused our certificate: it is revoked by the consortium CA ({e})")
        }
        // certificate_expired
        Some(45) => format!("the peer refused our certificate: it has expired ({e})"),
        _ => e.to_string(),
    }
}

fn is_tls_failure(e: &ConnectionError) -> bool {
    match e {
        ConnectionError::TransportError(t) => (0x100..0x200).contains(&u64::from(t.code)),
        ConnectionError::ConnectionClosed(c) => {
            let code: u64 = c.error_code.into();
            (0x100..0x200).contains(&code)
        }
        _ => false,
    }
}

/// Dials `addr`, expecting the server to prove it is `expected` with a certificate from the
/// consortium CA.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    expected: &Identity,
) -> Result<quinn::Connection, TransportError> {
    let fail = |reason: String| TransportError::Connect {
        addr,
        expected: expected.to_string(),
        reason,
    };
    let connecting = endpoint
        .connect(addr, &expected.dns_name())
        .map_err(|e| fail(e.to_string()))?;
    let conn = connecting.await.map_err(|e| {
        let hint = match &e {
            ConnectionError::TimedOut => {
                format!("no answer; is {expected} running and listening at {addr}?")
            }
            e if matches!(tls_alert(e), Some(44 | 45)) => closed_reason(e),
            e if is_tls_failure(e) => format!(
                "TLS handshake failed ({e}); check that both sides have certificates from the \
                 same consortium CA, that they are not expired, and that {addr} is really {expected}"
            ),
            e => format!("{e}; is {expected} running at {addr}?"),
        };
        fail(hint)
    })?;
    // The TLS layer already checked the server name; this also rejects certificates that carry
    // several cleanroom names.
    let got = peer_identity(&conn)?;
    if got != *expected {
        conn.close(CLOSE_BAD_IDENTITY, b"unexpected identity");
        return Err(TransportError::WrongPeer {
            expected: expected.to_string(),
            got: got.to_string(),
        });
    }
    Ok(conn)
}

/// Accepts the next incoming connection and completes its handshake (see [`handshake`]).
/// Returns `None` once the endpoint is closed. A slow handshake delays the next accept; servers
/// that care call `endpoint.accept()` themselves and spawn [`handshake`].
pub async fn accept(
    endpoint: &quinn::Endpoint,
) -> Option<Result<(quinn::Connection, Identity), TransportError>> {
    let incoming = endpoint.accept().await?;
    Some(handshake(incoming).await)
}

/// Completes the handshake of an incoming connection and returns it with the peer's identity.
/// Failures (no client certificate, unknown issuer, expired…) are logged at warn with the remote
/// address and the reason, and returned.
pub async fn handshake(
    incoming: quinn::Incoming,
) -> Result<(quinn::Connection, Identity), TransportError> {
    let remote = incoming.remote_address();
    let result = async {
        let conn = incoming
            .accept()
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        match peer_identity(&conn) {
            Ok(id) => Ok((conn, id)),
            Err(e) => {
                conn.close(CLOSE_BAD_IDENTITY, b"no cleanroom identity in certificate");
                Err(e.to_string())
            }
        }
    }
    .await;
    result.map_err(|reason| {
        tracing::warn!(%remote, %reason, "refused incoming connection");
        TransportError::Handshake { remote, reason }
    })
}

#[cfg(test)]
mod tests {
    use quinn::ConnectionError;
    use quinn_proto::{ConnectionClose, TransportErrorCode};

    use super::tls_alert;

    /// A connection closed with a transport error below the TLS range (here NO_ERROR and
    /// PROTOCOL_VIOLATION) has no alert, and asking must not panic (it underflowed once, in
    /// debug builds, and killed a node that lost its coordinator).
    #[test]
    fn a_closed_connection_without_a_tls_alert_has_none() {
        for code in [
            TransportErrorCode::NO_ERROR,
            TransportErrorCode::PROTOCOL_VIOLATION,
        ] {
            let e = ConnectionError::ConnectionClosed(ConnectionClose {
                error_code: code,
                frame_type: None,
                reason: Default::default(),
            });
            assert_eq!(tls_alert(&e), None);
        }
        let revoked = ConnectionError::ConnectionClosed(ConnectionClose {
            error_code: TransportErrorCode::crypto(44),
            frame_type: None,
            reason: Default::default(),
        });
        assert_eq!(tls_alert(&revoked), Some(44));
        assert_eq!(tls_alert(&ConnectionError::TimedOut), None);
    }
}
