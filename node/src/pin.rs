//! Pinned partners: an agreement may name its partner's key (`partner_key = "sha256:…"`, the
//! fingerprint of the certificate's SubjectPublicKeyInfo). A data-plane connection with that
//! partner whose certificate carries another key is refused and audited, whoever signed it, so
//! the consortium CA alone cannot stand in for a pinned partner.

use cleanroom_transport::peer_key_fingerprint;

use crate::audit::AuditEvent;
use crate::state::NodeState;

/// Checks the peer of `conn`, which certifies node `partner`, against the key the agreement
/// with `partner` pins (nothing to check without a pin or an agreement: the offer check decides
/// those). A refusal is written to the audit log (a failed write is logged; the connection is
/// refused either way) and returned with its reason.
pub fn check(state: &NodeState, partner: &str, conn: &quinn::Connection) -> Result<(), String> {
    let cfg = state.cfg();
    let Some(pin) = cfg
        .agreement_with(partner)
        .and_then(|a| a.partner_key.as_ref())
    else {
        return Ok(());
    };
    let presented = peer_key_fingerprint(conn).map_err(|e| e.to_string())?;
    if &presented == pin {
        return Ok(());
    }
    let reason = format!(
        "its certificate's key {presented} is not the key {pin} the agreement with {partner} pins \
         (partner_key); a certificate for node {partner} with another key is refused even when \
         the consortium CA signed it"
    );
    let event = AuditEvent::ConnectionRefused {
        peer: format!("node {partner}"),
        reason: reason.clone(),
    };
    if let Err(e) = state.audit.append(event, crate::clock::now_ms()) {
        tracing::warn!(partner = %partner, error = %e, "could not audit a refused connection");
    }
    Err(reason)
}
