//! The node's data-plane endpoint: accepts connections from other nodes and hands each to the
//! job that waits for it.
//!
//! A connection is accepted only from a certificate of role *node*; its first stream must open
//! with a `PsiHello` naming a job that this node accepted, as responder, with exactly that peer
//! (or an `AggregateHello` naming an aggregate job that waits for exactly that peer).
//! Anything else is refused with a log line naming the peer and the reason, and the connection is
//! closed: a stranger cannot make the node read a single row.
//!
//! A refusal also ends, at once and with the same reason, the wait of the jobs that the refused
//! frame proves broken: the job the first frame names, if it waits for exactly that peer (a
//! frame of the wrong kind or phase); every job waiting for that peer if its first frame could
//! not be read or never came (an honest node never sends an undecodable, truncated or oversized
//! frame, nor sits on a connection without a hello). A frame naming a job this node does not wait
//! for ends nothing: it may be an honest peer's late connection for a job that is already over,
//! and the peer's other jobs must not pay for it (a replay of another job's hello is such a frame:
//! the job it was meant to disrupt still waits for its peer's real connection, until its
//! deadline). A connection lost before its hello ends nothing either: that is the network.

use std::sync::Arc;
use std::time::Duration;

use cleanroom_proto::v1::{Envelope, Phase, envelope::Body};
use cleanroom_transport::{FramedRecv, Identity, PeerRole, TransportError};
use tokio::sync::watch;

use crate::state::NodeState;

/// How long a new data-plane connection may take to say which job it is for.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// QUIC application error code for a refused data-plane connection.
pub const CLOSE_REFUSED: u32 = 2;

/// What a job waiting for a peer's connection receives: the connection, or the reason the
/// peer's connection was refused.
pub type Delivery = Result<Handover, String>;

/// The error of a job whose peer's data-plane connection was refused: the peer broke the
/// protocol, and the refusal's reason says how.
pub fn refused(peer: &str, reason: &str) -> crate::NodeError {
    crate::NodeError::Protocol {
        peer: peer.to_owned(),
        reason: format!("its data-plane connection was refused: {reason}"),
    }
}

/// Which waiting jobs a refused connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ends {
    /// None: the refusal says nothing about the peer's jobs.
    Nothing,
    /// The job the (readable) first frame names, if it waits for this peer.
    Job(String),
    /// Every job that waits for this peer: its first frame was unreadable or never came.
    EveryJobOfPeer,
}

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
            if let Err((reason, ends)) = route(&state, conn.clone(), &peer).await {
                tracing::warn!(peer = %peer, remote = %conn.remote_address(), %reason, "refused data-plane connection");
                conn.close(CLOSE_REFUSED.into(), reason.as_bytes());
                let job_id = match &ends {
                    Ends::Nothing => return,
                    Ends::Job(job_id) => Some(job_id.as_str()),
                    Ends::EveryJobOfPeer => None,
                };
                let ended = state.refuse(&peer.name, job_id, &reason);
                if ended > 0 {
                    tracing::warn!(peer = %peer, jobs = ended, %reason, "ended the jobs waiting for this peer's connection");
                }
            }
        });
    }
}

async fn route(
    state: &NodeState,
    conn: quinn::Connection,
    peer: &Identity,
) -> Result<(), (String, Ends)> {
    if peer.role != PeerRole::Node {
        return Err((format!("{peer} is not a node certificate"), Ends::Nothing));
    }
    let stream = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_uni())
        .await
        .map_err(|_| {
            (
                format!("opened no stream within {HELLO_TIMEOUT:?}"),
                Ends::EveryJobOfPeer,
            )
        })?
        .map_err(|e| {
            (
                format!("connection failed before its first stream: {e}"),
                Ends::Nothing,
            )
        })?;
    let mut recv = FramedRecv::new(stream);
    let hello = tokio::time::timeout(HELLO_TIMEOUT, recv.recv())
        .await
        .map_err(|_| {
            (
                format!("sent no hello within {HELLO_TIMEOUT:?}"),
                Ends::EveryJobOfPeer,
            )
        })?
        .map_err(|e| {
            // Bytes no honest encoder produces end the peer's jobs; a lost connection or a
            // reset stream is the network's doing, or the peer's job ending on its own.
            let ends = match e {
                TransportError::Frame(_) => Ends::EveryJobOfPeer,
                _ => Ends::Nothing,
            };
            (format!("unreadable hello: {e}"), ends)
        })?
        .ok_or_else(|| ("stream ended before its hello".to_owned(), Ends::Nothing))?;
    let job_id = hello.job_id.clone();
    let ends = || Ends::Job(job_id.clone());
    if hello.phase == Phase::AggShare as i32 && matches!(hello.body, Some(Body::AggHello(_))) {
        // Aggregate: one connection per peer and job, each waiting under its own key.
        let key = crate::aggregate_job::pending_key(&job_id, &peer.name);
        return state
            .deliver(&key, peer, Handover { conn, recv, hello })
            .map_err(|reason| (reason, ends()));
    }
    if hello.phase != Phase::PsiSize as i32 || !matches!(hello.body, Some(Body::PsiHello(_))) {
        return Err((
            format!(
                "first frame (phase {}) is not a PsiHello or an AggregateHello",
                hello.phase
            ),
            ends(),
        ));
    }
    state
        .deliver(&job_id, peer, Handover { conn, recv, hello })
        .map_err(|reason| (reason, ends()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const CONFIG: &str = r#"
name = "acme"
coordinator = "127.0.0.1:7400"
listen = "127.0.0.1:0"
state_dir = "state"
[tls]
ca = "pki/ca.pem"
cert = "pki/node-acme.pem"
key = "pki/node-acme.key"
"#;

    fn state(dir: &Path) -> NodeState {
        let cfg = crate::NodeConfig::parse(CONFIG, &dir.join("node.toml")).unwrap();
        NodeState::new(
            crate::policy::PolicyHolder::new(cfg),
            dir.join("node.toml"),
            crate::audit::AuditLog::open(&dir.join("audit.log")).unwrap(),
            crate::ledger::Ledger::open(&dir.join("ledger.sqlite")).unwrap(),
            "127.0.0.1:1".parse().unwrap(),
        )
        .unwrap()
    }

    /// The reason a waiting job was given, or `None` if it still waits.
    fn ended(rx: &mut tokio::sync::oneshot::Receiver<Delivery>) -> Option<String> {
        match rx.try_recv() {
            Ok(Err(reason)) => Some(reason),
            Ok(Ok(_)) => panic!("a connection was delivered"),
            Err(_) => None,
        }
    }

    #[test]
    fn a_refusal_ends_only_the_waits_it_proves_broken() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path());
        let agg = crate::aggregate_job::pending_key;
        let mut psi_mallory = state.expect_connection("job-1", "mallory");
        let mut agg_mallory = state.expect_connection(&agg("job-2", "mallory"), "mallory");
        let mut agg_globex = state.expect_connection(&agg("job-2", "globex"), "globex");
        let mut psi_globex = state.expect_connection("job-3", "globex");

        // A frame naming job-2 from globex ends globex's wait for job-2 only.
        assert_eq!(state.refuse("globex", Some("job-2"), "bad frame"), 1);
        assert_eq!(ended(&mut agg_globex).as_deref(), Some("bad frame"));
        assert_eq!(ended(&mut psi_globex), None);
        assert_eq!(ended(&mut agg_mallory), None);
        // A frame naming a job that waits for someone else, or no job, ends nothing.
        assert_eq!(state.refuse("mallory", Some("job-3"), "x"), 0);
        assert_eq!(state.refuse("mallory", Some("job-9"), "x"), 0);
        assert_eq!(ended(&mut psi_globex), None);
        // An unreadable frame from mallory ends every wait for mallory, and only those.
        assert_eq!(state.refuse("mallory", None, "unreadable"), 2);
        assert_eq!(ended(&mut psi_mallory).as_deref(), Some("unreadable"));
        assert_eq!(ended(&mut agg_mallory).as_deref(), Some("unreadable"));
        assert_eq!(ended(&mut psi_globex), None);
        // Ended waits are gone: a second refusal finds nothing.
        assert_eq!(state.refuse("mallory", None, "again"), 0);
    }
}
