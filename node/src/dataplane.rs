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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cleanroom_proto::v1::{Envelope, Phase, envelope::Body};
use cleanroom_transport::{FramedRecv, Identity, PeerRole, TransportError};
use tokio::sync::{oneshot, watch};

/// How long a new data-plane connection may take to say which job it is for.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// QUIC application error code for a refused data-plane connection.
pub const CLOSE_REFUSED: u32 = 2;

/// What a job waiting for a peer's connection receives: the connection, or the reason the
/// peer's connection was refused.
pub type Delivery = Result<Handover, String>;

/// The error of a job whose peer's data-plane connection was refused: the peer broke the
/// protocol, and the refusal's reason says how.
pub fn refused(peer: &str, reason: &str) -> crate::error::NodeError {
    crate::error::NodeError::Protocol {
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

/// The jobs waiting for a peer's data-plane connection, each under its key: a two-party job's
/// id, or [`pending_key`] for each peer of an aggregate.
#[derive(Debug, Default)]
pub struct Waiting {
    jobs: Mutex<HashMap<String, PendingJob>>,
}

#[derive(Debug)]
struct PendingJob {
    partner: String,
    deliver: oneshot::Sender<Delivery>,
}

/// The key under which the data plane hands over `peer`'s connection for the aggregate `job_id`
/// (one per peer, so N − 1 connections can wait for one job).
pub fn pending_key(job_id: &str, peer: &str) -> String {
    format!("{job_id}#aggregate#{peer}")
}

impl Waiting {
    /// Registers a job whose initiator will dial us; the returned receiver yields its connection.
    pub fn expect_connection(&self, job_id: &str, partner: &str) -> oneshot::Receiver<Delivery> {
        let (tx, rx) = oneshot::channel();
        let mut pending = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        pending.insert(
            job_id.to_owned(),
            PendingJob {
                partner: partner.to_owned(),
                deliver: tx,
            },
        );
        rx
    }

    /// Forgets a job that no longer waits for a connection.
    pub fn forget_pending(&self, job_id: &str) {
        let mut pending = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        pending.remove(job_id);
    }

    /// Hands an incoming data-plane connection to the job it names, if that job waits for
    /// exactly this peer. Returns why not otherwise.
    pub fn deliver(&self, job_id: &str, peer: &Identity, handover: Handover) -> Result<(), String> {
        let mut pending = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let Some(job) = pending.get(job_id) else {
            return Err(format!(
                "no job '{job_id}' is waiting for a data-plane connection"
            ));
        };
        if job.partner != peer.name {
            return Err(format!(
                "job '{job_id}' expects node '{}', but the connection is from {peer}",
                job.partner
            ));
        }
        let job = pending
            .remove(job_id)
            .ok_or_else(|| "job vanished".to_owned())?;
        job.deliver
            .send(Ok(handover))
            .map_err(|_| format!("job '{job_id}' is no longer running"))
    }

    /// Ends, with `reason`, the wait of the jobs expecting a connection from node `peer` whose
    /// data-plane connection was just refused: the job `job_id` (under either of its keys), or
    /// every job waiting for `peer` when `None`. Jobs waiting for another node are never
    /// touched. Returns how many waits it ended.
    pub fn refuse(&self, peer: &str, job_id: Option<&str>, reason: &str) -> usize {
        let mut pending = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let keys: Vec<String> = pending
            .iter()
            .filter(|(key, job)| {
                job.partner == peer
                    && job_id.is_none_or(|j| *key == j || **key == pending_key(j, peer))
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in &keys {
            if let Some(job) = pending.remove(key) {
                let _ = job.deliver.send(Err(reason.to_owned()));
            }
        }
        keys.len()
    }
}

/// A check of a connecting node's certificate before anything is read from it (the key its
/// agreement pins, `crate::pin`): `Err` refuses the connection with the reason.
pub type PeerCheck = Arc<dyn Fn(&Identity, &quinn::Connection) -> Result<(), String> + Send + Sync>;

/// Accepts data-plane connections until shutdown.
pub async fn serve(
    endpoint: quinn::Endpoint,
    state: Arc<Waiting>,
    check: PeerCheck,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.changed() => return,
        };
        let Some(incoming) = incoming else { return };
        let state = state.clone();
        let check = check.clone();
        // Handshakes run concurrently, so one slow peer cannot hold up the others.
        tokio::spawn(async move {
            // A failed handshake has been logged with the remote address and the reason.
            let Ok((conn, peer)) = cleanroom_transport::handshake(incoming).await else {
                return;
            };
            if peer.role == PeerRole::Node
                && let Err(reason) = check(&peer, &conn)
            {
                tracing::warn!(peer = %peer, remote = %conn.remote_address(), %reason, "refused data-plane connection");
                conn.close(CLOSE_REFUSED.into(), reason.as_bytes());
                return;
            }
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
    state: &Waiting,
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
        let key = pending_key(&job_id, &peer.name);
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

/// A peer's data-plane address as the coordinator relays it (`host:port`, as the peer
/// advertises it), resolved for our endpoint. A name that does not resolve fails the job with
/// the name; the TLS server name stays the peer's consortium identity.
pub(crate) async fn resolve_peer(
    endpoint: &quinn::Endpoint,
    text: &str,
) -> Result<std::net::SocketAddr, crate::error::NodeError> {
    let addr: cleanroom_transport::HostPort =
        text.parse()
            .map_err(|e| crate::error::NodeError::Protocol {
                peer: "coordinator".to_owned(),
                reason: format!("bad peer address: {e}"),
            })?;
    let local = endpoint
        .local_addr()
        .map_err(|e| crate::error::NodeError::Io {
            what: "reading the endpoint's address".into(),
            source: e,
        })?;
    addr.resolve_for(local).await.map_err(|e| {
        crate::error::JobError::DataPlane {
            what: format!("cannot reach the peer's data plane at {addr}"),
            reason: e.to_string(),
        }
        .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let state = Waiting::default();
        let agg = pending_key;
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
