//! The node's control session with the coordinator.
//!
//! The node dials out (it never accepts control connections), says hello, then serves one
//! bidirectional stream per job that the coordinator opens: `Offer` → `OfferReply`, and if every
//! party accepted, `Start` → `Ready` … `Report`. Every frame on a job stream must name that job
//! and the phase the node expects; anything else ends the job with a protocol error.

use std::sync::Arc;
use std::time::Duration;

use cleanroom_proto::v1::{
    Envelope, HelloAck, NodeHello, Phase, Ready, Report, Role, envelope::Body,
};
use cleanroom_transport::{FramedRecv, FramedSend, Identity};
use tokio::sync::watch;
use tracing::Instrument;

use crate::audit::AuditEvent;
use crate::error::{JobError, NodeError};
use crate::job::Side;
use crate::kind::Kind;
use crate::state::NodeState;

/// How long the node waits for `Start` after accepting an offer.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest pause between reconnection attempts to the coordinator.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How long one connection attempt to the coordinator may take. Well under the QUIC idle
/// timeout (30 s): an attempt made while a restarting coordinator is not yet listening would
/// otherwise wait out QUIC's growing retransmission intervals, and the node would come back
/// tens of seconds after the coordinator did. A fresh attempt starts at once instead.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
        let mut registered = false;
        let session = session(&endpoint, &state, &mut registered);
        tokio::select! {
            result = session => match result {
                Ok(()) => {
                    state.metrics.control_lost();
                    tracing::warn!("coordinator closed the control session; reconnecting");
                    backoff = Duration::from_millis(200);
                }
                Err(e) => {
                    if registered {
                        state.metrics.control_lost();
                    }
                    // A session that had registered starts the back-off afresh: the first
                    // attempt after losing a working coordinator comes at once.
                    if registered {
                        backoff = Duration::from_millis(200);
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "control session with the coordinator failed")
                }
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
async fn session(
    endpoint: &quinn::Endpoint,
    state: &Arc<NodeState>,
    registered: &mut bool,
) -> Result<(), NodeError> {
    let coordinator = state.cfg().coordinator.clone();
    let local = endpoint.local_addr().map_err(|e| NodeError::Io {
        what: "reading the endpoint's address".into(),
        source: e,
    })?;
    // Resolved at every connection: a coordinator that moved keeps its name. The TLS server
    // name stays the coordinator's consortium identity, whatever the host name.
    let addr = coordinator
        .resolve_for(local)
        .await
        .map_err(|e| NodeError::Io {
            what: format!("resolving the coordinator's address {coordinator}"),
            source: e,
        })?;
    let conn = tokio::time::timeout(
        CONNECT_TIMEOUT,
        cleanroom_transport::connect(endpoint, addr, &Identity::coordinator()),
    )
    .await
    .map_err(|_| NodeError::Lost {
        peer: "coordinator".into(),
        reason: format!(
            "no answer from {addr} within {}s; is the coordinator running there?",
            CONNECT_TIMEOUT.as_secs()
        ),
    })??;
    let (mut send, mut recv) = cleanroom_transport::open_bi(&conn).await?;
    send.send(&Envelope {
        job_id: String::new(),
        phase: Phase::Hello as i32,
        body: Some(Body::NodeHello(NodeHello {
            node_name: state.cfg().name.clone(),
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
    tracing::info!(coordinator = %coordinator, address = %addr, "registered with the coordinator");
    *registered = true;
    state.metrics.control_registered();
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok((s, r)) => (FramedSend::new(s), FramedRecv::new(r)),
            Err(quinn::ConnectionError::ApplicationClosed(_)) => return Ok(()),
            // A crash or restart of the coordinator (a stateless reset), or a network that
            // dropped the connection: nothing the coordinator did wrong.
            Err(e) => {
                return Err(NodeError::Lost {
                    peer: "coordinator".into(),
                    reason: e.to_string(),
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
    let my_name = state.cfg().name.clone();
    let partner = match &offer.body {
        Some(Body::Offer(o)) => o.spec.as_ref().map(|s| {
            // Every other party (one for PSI jobs, N − 1 for an aggregate), for the audit log.
            let others: Vec<&str> = s
                .parties
                .iter()
                .filter(|p| p.node != my_name)
                .map(|p| p.node.as_str())
                .collect();
            others.join(",")
        }),
        _ => None,
    }
    .unwrap_or_default();
    let span = tracing::info_span!("job", job_id = %job_id);
    async move {
        if let Err(e) = run_offer(endpoint, &state, offer, &mut send, &mut recv).await {
            tracing::warn!(error = %e, "job ended with an error");
            let report = Envelope {
                job_id: job_id.clone(),
                phase: Phase::Report as i32,
                body: Some(Body::Report(Report {
                    outcome: Some(cleanroom_proto::v1::report::Outcome::Failure(e.to_string())),
                    signed_head: state.signed_head(),
                })),
            };
            let _ = send.send(&report).await;
            let event = AuditEvent::JobError {
                job_id: job_id.clone(),
                partner,
                reason: e.to_string(),
            };
            if let Err(audit) = state.audit.append(event, crate::clock::now_ms()) {
                tracing::error!(error = %audit, "could not audit the job's failure");
            }
        }
        state.waiting.forget_pending(&job_id);
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
    let kind = Kind::of(&spec);
    if kind.is_some_and(Kind::is_multiparty) {
        return crate::job::driver::aggregate::serve_offer(
            endpoint, state, job_id, spec, send, recv,
        )
        .await;
    }
    let role = Role::try_from(offer.role).unwrap_or(Role::Unspecified);
    let me = match role {
        Role::Initiator => 0,
        Role::Responder => 1,
        Role::Unspecified | Role::Peer => {
            return Err(protocol("coordinator", "offer without a two-party role"));
        }
    };
    let decision = state.decide(&job_id, &spec, me, crate::clock::now_ms());
    let reply = |accept: bool, reason: String| state.offer_reply(&job_id, accept, reason);
    let (generation, permit) = match decision {
        Ok((generation, permit)) => {
            tracing::info!(partner = %permit.partner, purpose = %spec.purpose, "offer accepted");
            send.send(&reply(true, String::new())).await?;
            (generation, permit)
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
            return Err(crate::error::Timeout::NoStart.into());
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
    let cfg = state.cfg();
    let job = crate::job::driver::JobContext {
        job_id: job_id.clone(),
        spec,
        me,
        permit,
        generation,
        state_dir: cfg.state_dir.clone(),
        my_name: cfg.name.clone(),
        state: state.clone(),
    };
    // The policy vetoes a kind this node does not run, so an accepted offer has one.
    let kind =
        kind.ok_or_else(|| JobError::Internal("an offer of no known kind was accepted".into()))?;
    let spec_kind = job.spec.kind;
    let side = if role == Role::Responder {
        let incoming = state
            .waiting
            .expect_connection(&job_id, &job.permit.partner);
        send.send(&ready).await?;
        Side::Accept(incoming)
    } else {
        let peer_addr = crate::dataplane::resolve_peer(&endpoint, &start.peer_addr).await?;
        send.send(&ready).await?;
        Side::Dial(&endpoint, peer_addr)
    };
    // The job runs until it is done, or until the coordinator drops the job's stream (the
    // other party failed, the job timed out, the coordinator went away): nobody would collect
    // the result, so the job stops here too, and the peer's connection with it.
    let outcome = tokio::select! {
        outcome = crate::job::run_two_party(kind, job, side) => outcome,
        () = crate::job::driver::wait_for_withdrawal(recv) => Err(JobError::Withdrawn.into()),
    }?;
    tracing::info!(
        intersection = outcome.intersection,
        own = outcome.own_set_size,
        peer = outcome.peer_set_size,
        "job finished"
    );
    state.metrics.bytes_sent(spec_kind, outcome.bytes_to_peer);
    send.send(&Envelope {
        job_id: job_id.clone(),
        phase: Phase::Report as i32,
        body: Some(Body::Report(Report {
            outcome: Some(cleanroom_proto::v1::report::Outcome::Psi(outcome)),
            signed_head: state.signed_head(),
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
