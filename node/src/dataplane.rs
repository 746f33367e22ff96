//! The node's data-plane endpoint: accepts connections from other nodes and hands each to the
//! job that waits for it.
//!
//! A connection is accepted only from a certificate of role *node*; its first stream must open
//! with a `PsiHello` naming a job that this node accepted, as responder, with exactly that peer
//! (or an `AggregateHello` naming an aggregate job that waits for exactly that peer).
//! Anything else is refused with a log line naming the peer and the reason, and the connection is
//! closed: a stranger cannot make the node read a single row.

use std::sync::Arc;
use std::time::Duration;

use cleanroom_proto::v1::{Envelope, Phase, envelope::Body};
use cleanroom_transport::{FramedRecv, Identity, PeerRole};
use tokio::sync::watch;

use crate::state::NodeState;

/// How long a new data-plane connection may take to say which job it is for.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// QUIC application error code for a refused data-plane connection.
pub const CLOSE_REFUSED: u32 = 2;

/// An accepted data-plane connection, handed to its job.
#[derive(Debug)]
pub struct Handover {
    /// The connection to the initiator.
    pub conn: quinn::Connection,
    /// The initiator's stream to us, after its first frame.
    pub recv: FramedRecv,
    /// The first frame (the initiator's `PsiHello`).
    pub hello: Envelope,
}

/// Accepts data-plane connections until shutdown.
pub async fn serve(
    endpoint: quinn::Endpoint,
    state: Arc<NodeState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.changed() => return,
        };
        let Some(incoming) = incoming else { return };
        let state = state.clone();
        // Handshakes run concurrently, so one slow peer cannot hold up the others.
        tokio::spawn(async move {
            // A failed handshake has been logged with the remote address and the reason.
            let Ok((conn, peer)) = cleanroom_transport::handshake(incoming).await else {
                return;
            };
            if let Err(reason) = route(&state, conn.clone(), &peer).await {
                tracing::warn!(peer = %peer, remote = %conn.remote_address(), %reason, "refused data-plane connection");
                conn.close(CLOSE_REFUSED.into(), reason.as_bytes());
            }
        });
    }
}

async fn route(state: &NodeState, conn: quinn::Connection, peer: &Identity) -> Result<(), String> {
    if peer.role != PeerRole::Node {
        return Err(format!("{peer} is not a node certificate"));
    }
    let stream = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_uni())
        .await
        .map_err(|_| "no stream opened in time".to_owned())?
        .map_err(|e| format!("connection failed before its first stream: {e}"))?;
    let mut recv = FramedRecv::new(stream);
    let hello = tokio::time::timeout(HELLO_TIMEOUT, recv.recv())
        .await
        .map_err(|_| "no hello in time".to_owned())?
        .map_err(|e| format!("unreadable hello: {e}"))?
        .ok_or_else(|| "stream ended before its hello".to_owned())?;
    let job_id = hello.job_id.clone();
    if hello.phase == Phase::AggShare as i32 && matches!(hello.body, Some(Body::AggHello(_))) {
        // Aggregate: one connection per peer and job, each waiting under its own key.
        let key = crate::aggregate_job::pending_key(&job_id, &peer.name);
        return state.deliver(&key, peer, Handover { conn, recv, hello });
    }
    if hello.phase != Phase::PsiSize as i32 || !matches!(hello.body, Some(Body::PsiHello(_))) {
        return Err("first frame is not a PsiHello or an AggregateHello".to_owned());
    }
    state.deliver(&job_id, peer, Handover { conn, recv, hello })
}
