//! The node's control session with the coordinator.
//!
//! The node dials out (it never accepts control connections), says hello, then serves one
//! bidirectional stream per job that the coordinator opens: `Offer` → `OfferReply`, and if every
//! party accepted, `Start` → `Ready` … `Report`. Every frame on a job stream must name that job
//! and the phase the node expects; anything else ends the job with a protocol error.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use cleanroom_proto::v1::{
    Envelope, HelloAck, NodeHello, OfferReply, Phase, Ready, Report, Role, envelope::Body,
};
use cleanroom_transport::{FramedRecv, FramedSend, Identity};
use tokio::sync::{oneshot, watch};
use tracing::Instrument;

use crate::NodeError;
use crate::agreement::{self, Permit};
use crate::config::NodeConfig;
use crate::dataplane::Handover;
use crate::psi_job;

/// How long the node waits for `Start` after accepting an offer.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest pause between reconnection attempts to the coordinator.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the node's tasks share.
#[derive(Debug)]
pub struct NodeState {
    /// The node's configuration.
    pub cfg: NodeConfig,
    /// The data-plane address other nodes dial.
    pub advertise: SocketAddr,
    /// Jobs in which this node is the responder and waits for the initiator's connection.
    pending: Mutex<HashMap<String, PendingJob>>,
}

#[derive(Debug)]
struct PendingJob {
    partner: String,
    deliver: oneshot::Sender<Handover>,
}

impl NodeState {
    /// State for a node that advertises `advertise` as its data plane.
    pub fn new(cfg: NodeConfig, advertise: SocketAddr) -> Self {
        Self {
            cfg,
            advertise,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Registers a job whose initiator will dial us; the returned receiver yields its connection.
    fn expect_connection(&self, job_id: &str, partner: &str) -> oneshot::Receiver<Handover> {
        let (tx, rx) = oneshot::channel();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
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
    fn forget(&self, job_id: &str) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.remove(job_id);
    }

    /// Hands an incoming data-plane connection to the job it names, if that job waits for
    /// exactly this peer. Returns why not otherwise.
    pub fn deliver(&self, job_id: &str, peer: &Identity, handover: Handover) -> Result<(), String> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
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
            .send(handover)
            .map_err(|_| format!("job '{job_id}' is no longer running"))
    }
}

/// Keeps a control session with the coordinator until shutdown, reconnecting with backoff.
pub async fn run(
    endpoint: quinn::Endpoint,
    state: Arc<NodeState>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), NodeError> {
    let mut backoff = Duration::from_millis(200);
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let session = session(&endpoint, &state);
        tokio::select! {
            result = session => match result {
                Ok(()) => {
                    tracing::warn!("coordinator closed the control session; reconnecting");
                    backoff = Duration::from_millis(200);
                }
                Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "control session with the coordinator failed"),
            },
            _ = shutdown.changed() => return Ok(()),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return Ok(()),
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One control session: connect, hello, then serve job streams until the connection ends.
async fn session(endpoint: &quinn::Endpoint, state: &Arc<NodeState>) -> Result<(), NodeError> {
    let addr = state.cfg.coordinator;
    let conn = cleanroom_transport::connect(endpoint, addr, &Identity::coordinator()).await?;
    let (mut send, mut recv) = cleanroom_transport::open_bi(&conn).await?;
    send.send(&Envelope {
        job_id: String::new(),
        phase: Phase::Hello as i32,
        body: Some(Body::NodeHello(NodeHello {
            node_name: state.cfg.name.clone(),
            data_addr: state.advertise.to_string(),
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
        })),
    })
    .await?;
    let ack = recv.recv_expect("", Phase::Hello).await?;
    let Some(Body::HelloAck(HelloAck { .. })) = ack.body else {
        return Err(NodeError::Protocol {
            peer: "coordinator".into(),
            reason: "expected HelloAck".into(),
        });
    };
    tracing::info!(coordinator = %addr, "registered with the coordinator");
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok((s, r)) => (FramedSend::new(s), FramedRecv::new(r)),
            Err(quinn::ConnectionError::ApplicationClosed(_)) => return Ok(()),
            Err(e) => {
                return Err(NodeError::Protocol {
                    peer: "coordinator".into(),
                    reason: format!("control connection lost: {e}"),
                });
            }
        };
        let state = state.clone();
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            job_stream(endpoint, state, send, recv).await;
        });
    }
}

/// Serves one job stream: offer, start, report.
async fn job_stream(
    endpoint: quinn::Endpoint,
    state: Arc<NodeState>,
    mut send: FramedSend,
    mut recv: FramedRecv,
) {
    let offer = match recv.recv().await {
        Ok(Some(e)) => e,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "unreadable job offer from the coordinator");
            return;
        }
    };
    let job_id = offer.job_id.clone();
    let span = tracing::info_span!("job", job_id = %job_id);
    async move {
        if let Err(e) = run_offer(endpoint, &state, offer, &mut send, &mut recv).await {
            tracing::warn!(error = %e, "job ended with an error");
            let report = Envelope {
                job_id: job_id.clone(),
                phase: Phase::Report as i32,
                body: Some(Body::Report(Report {
                    outcome: Some(cleanroom_proto::v1::report::Outcome::Failure(e.to_string())),
                })),
            };
            let _ = send.send(&report).await;
        }
        state.forget(&job_id);
        let _ = send.finish();
    }
    .instrument(span)
    .await
}

async fn run_offer(
    endpoint: quinn::Endpoint,
    state: &Arc<NodeState>,
    offer: Envelope,
    send: &mut FramedSend,
    recv: &mut FramedRecv,
) -> Result<(), NodeError> {
    let job_id = offer.job_id.clone();
    cleanroom_proto::frame::check_envelope(&offer, &job_id, Phase::Offer)
        .map_err(|e| protocol("coordinator", e))?;
    let Some(Body::Offer(offer)) = offer.body else {
        return Err(protocol("coordinator", "expected an Offer"));
    };
    let spec = offer
        .spec
        .ok_or_else(|| protocol("coordinator", "offer without a job spec"))?;
    let role = Role::try_from(offer.role).unwrap_or(Role::Unspecified);
    let me = match role {
        Role::Initiator => 0,
        Role::Responder => 1,
        Role::Unspecified => return Err(protocol("coordinator", "offer without a role")),
    };
    let decision = agreement::check_offer(&state.cfg, &spec, me);
    let reply = |accept: bool, reason: String| Envelope {
        job_id: job_id.clone(),
        phase: Phase::Offer as i32,
        body: Some(Body::OfferReply(OfferReply { accept, reason })),
    };
    let permit: Permit = match decision {
        Ok(permit) => {
            tracing::info!(partner = %permit.partner, purpose = %spec.purpose, "offer accepted");
            send.send(&reply(true, String::new())).await?;
            permit
        }
        Err(veto) => {
            tracing::info!(reason = %veto, "offer vetoed");
            send.send(&reply(false, veto.to_string())).await?;
            return Ok(());
        }
    };

    // Wait for Start (or the coordinator dropping the stream because another party refused).
    let start = match tokio::time::timeout(START_TIMEOUT, recv.recv()).await {
        Err(_) => {
            return Err(NodeError::Job(
                "no Start from the coordinator in time".into(),
            ));
        }
        Ok(Ok(None)) | Ok(Err(_)) => {
            tracing::info!("job withdrawn by the coordinator before it started");
            return Ok(());
        }
        Ok(Ok(Some(e))) => e,
    };
    cleanroom_proto::frame::check_envelope(&start, &job_id, Phase::Start)
        .map_err(|e| protocol("coordinator", e))?;
    let Some(Body::Start(start)) = start.body else {
        return Err(protocol("coordinator", "expected Start"));
    };
    if start.role != offer.role {
        return Err(protocol(
            "coordinator",
            "Start names another role than the offer",
        ));
    }
    let ready = Envelope {
        job_id: job_id.clone(),
        phase: Phase::Start as i32,
        body: Some(Body::Ready(Ready {})),
    };
    let job = psi_job::JobContext {
        job_id: job_id.clone(),
        spec,
        me,
        permit,
        state_dir: state.cfg.state_dir.clone(),
        my_name: state.cfg.name.clone(),
    };
    let outcome = if role == Role::Responder {
        let incoming = state.expect_connection(&job_id, &job.permit.partner);
        send.send(&ready).await?;
        psi_job::run_responder(job, incoming).await
    } else {
        let peer_addr: SocketAddr = start.peer_addr.parse().map_err(|_| {
            protocol(
                "coordinator",
                format!("bad peer address '{}'", start.peer_addr),
            )
        })?;
        send.send(&ready).await?;
        psi_job::run_initiator(job, &endpoint, peer_addr).await
    }?;
    tracing::info!(
        intersection = outcome.intersection,
        own = outcome.own_set_size,
        peer = outcome.peer_set_size,
        "job finished"
    );
    send.send(&Envelope {
        job_id: job_id.clone(),
        phase: Phase::Report as i32,
        body: Some(Body::Report(Report {
            outcome: Some(cleanroom_proto::v1::report::Outcome::Psi(outcome)),
        })),
    })
    .await?;
    Ok(())
}

fn protocol(peer: &str, reason: impl std::fmt::Display) -> NodeError {
    NodeError::Protocol {
        peer: peer.to_owned(),
        reason: reason.to_string(),
    }
}
