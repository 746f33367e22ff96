//! The coordinator's QUIC endpoint: node control sessions and analyst requests.
//!
//! Who a peer is comes from its certificate alone. Nodes open one stream with a `NodeHello` whose
//! name must equal their certificate's; analysts open one stream per request. Any other role is
//! refused with a log line naming it.

use std::net::SocketAddr;
use std::sync::Arc;

use cleanroom_proto::v1::{
    AnalystResponse, Envelope, HelloAck, JobList, JobState, NodeInfo, NodeList, Phase,
    analyst_request::Request, analyst_response::Response, envelope::Body,
};
use cleanroom_transport::{
    Credentials, FramedRecv, FramedSend, Identity, PeerRole, TransportTuning,
};
use tokio::sync::watch;

use crate::registry::{NodeHandle, Registry};
use crate::store::JobStore;
use crate::{CoordinatorConfig, CoordinatorError, now_ms, runner, spec};

/// QUIC application error code for a refused connection.
const CLOSE_REFUSED: u32 = 2;
/// Most jobs one list request returns.
const MAX_LIST: u32 = 1000;

/// What the coordinator's tasks share.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub cfg: CoordinatorConfig,
    /// The job store.
    pub store: JobStore,
    /// Connected nodes.
    pub registry: Registry,
}

/// Runs the coordinator until `shutdown` turns true. `on_bound` is called once with the bound
/// address (the CLI prints it, so tests and the demo can use port 0).
pub async fn serve(
    cfg: CoordinatorConfig,
    mut shutdown: watch::Receiver<bool>,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<(), CoordinatorError> {
    let creds = Credentials::load(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?;
    let me = creds.identity()?;
    if me.role != PeerRole::Coordinator {
        return Err(CoordinatorError::Config(format!(
            "{} is a certificate for {me}, not the coordinator; issue one with `cleanroom pki issue coordinator`",
            cfg.tls.cert.display()
        )));
    }
    let store = JobStore::open(&cfg.database)?;
    // A job that was under way when the coordinator stopped cannot be resumed yet: fail it
    // cleanly so it is never left hanging and never runs twice.
    for job_id in store.unfinished()? {
        let reason = "the coordinator restarted while the job was in progress; submit it again";
        if let Err(e) = store.transition(&job_id, JobState::Failed, reason, now_ms()) {
            tracing::warn!(job_id = %job_id, error = %e, "could not fail an unfinished job");
        }
    }
    let endpoint =
        cleanroom_transport::server_endpoint(cfg.listen, &creds, &TransportTuning::default())?;
    let bound = endpoint.local_addr().map_err(|e| {
        CoordinatorError::Config(format!(
            "cannot read the bound address of {}: {e}",
            cfg.listen
        ))
    })?;
    tracing::info!(listen = %bound, database = %cfg.database.display(), "coordinator listening");
    on_bound(bound);
    let shared = Arc::new(Shared {
        cfg,
        store,
        registry: Registry::default(),
    });
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.changed() => break,
        };
        let Some(incoming) = incoming else { break };
        let shared = shared.clone();
        // Handshakes run concurrently, so one slow client cannot hold up the others.
        tokio::spawn(async move {
            // A failed handshake has been logged with the remote address and the reason.
            let Ok((conn, peer)) = cleanroom_transport::handshake(incoming).await else {
                return;
            };
            match peer.role {
                PeerRole::Node => node_session(shared, conn, peer).await,
                PeerRole::Analyst => analyst_session(shared, conn, peer).await,
                PeerRole::Coordinator => {
                    tracing::warn!(peer = %peer, remote = %conn.remote_address(), "refused: a coordinator certificate cannot connect as a client");
                    conn.close(
                        CLOSE_REFUSED.into(),
                        b"coordinator certificates cannot connect here",
                    );
                }
            }
        });
    }
    endpoint.close(0u32.into(), b"coordinator shutting down");
    endpoint.wait_idle().await;
    tracing::info!("coordinator stopped");
    Ok(())
}

async fn node_session(shared: Arc<Shared>, conn: quinn::Connection, peer: Identity) {
    let hello = async {
        let (mut send, mut recv) = cleanroom_transport::accept_bi(&conn).await?;
        let env = recv.recv_expect("", Phase::Hello).await?;
        let Some(Body::NodeHello(hello)) = env.body else {
            return Err(CoordinatorError::Protocol {
                peer: peer.to_string(),
                reason: "expected NodeHello".into(),
            });
        };
        if hello.node_name != peer.name {
            return Err(CoordinatorError::Protocol {
                peer: peer.to_string(),
                reason: format!("hello claims to be '{}'", hello.node_name),
            });
        }
        send.send(&Envelope {
            job_id: String::new(),
            phase: Phase::Hello as i32,
            body: Some(Body::HelloAck(HelloAck {
                coordinator_name: "coordinator".into(),
            })),
        })
        .await?;
        Ok(hello.data_addr)
    };
    let data_addr = match hello.await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(peer = %peer, error = %e, "refused node");
            conn.close(CLOSE_REFUSED.into(), e.to_string().as_bytes());
            return;
        }
    };
    if let Err(e) = shared.store.record_node(&peer.name, &data_addr, now_ms()) {
        tracing::warn!(node = %peer.name, error = %e, "could not record the node");
    }
    shared.registry.insert(
        &peer.name,
        NodeHandle {
            conn: conn.clone(),
            data_addr: data_addr.clone(),
        },
    );
    tracing::info!(node = %peer.name, data_plane = %data_addr, "node connected");
    let why = conn.closed().await;
    shared.registry.remove(&peer.name, &conn);
    tracing::info!(node = %peer.name, reason = %why, "node disconnected");
}

async fn analyst_session(shared: Arc<Shared>, conn: quinn::Connection, peer: Identity) {
    loop {
        let (send, recv) = match cleanroom_transport::accept_bi(&conn).await {
            Ok(s) => s,
            Err(_) => return,
        };
        let shared = shared.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            analyst_request(&shared, &peer, send, recv).await;
        });
    }
}

async fn analyst_request(
    shared: &Arc<Shared>,
    peer: &Identity,
    mut send: FramedSend,
    mut recv: FramedRecv,
) {
    let env = match recv.recv().await {
        Ok(Some(env)) => env,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(analyst = %peer.name, error = %e, "unreadable analyst request");
            return;
        }
    };
    let job_id = env.job_id.clone();
    let response = match handle(shared, peer, env) {
        Ok(r) => r,
        Err(e) => Response::Error(e.to_string()),
    };
    let reply = Envelope {
        job_id,
        phase: Phase::Analyst as i32,
        body: Some(Body::AnalystResponse(AnalystResponse {
            response: Some(response),
        })),
    };
    if let Err(e) = send.send(&reply).await {
        tracing::warn!(analyst = %peer.name, error = %e, "could not answer the analyst");
    }
    let _ = send.finish();
    let _ = send.stopped().await;
}

fn handle(
    shared: &Arc<Shared>,
    peer: &Identity,
    env: Envelope,
) -> Result<Response, CoordinatorError> {
    if env.phase != Phase::Analyst as i32 {
        return Err(CoordinatorError::Refused(
            "request is not in the analyst phase".into(),
        ));
    }
    let Some(Body::AnalystRequest(req)) = env.body else {
        return Err(CoordinatorError::Refused(
            "expected an analyst request".into(),
        ));
    };
    match req.request {
        Some(Request::Submit(submit)) => {
            let job_spec = submit
                .spec
                .ok_or_else(|| CoordinatorError::Refused("submit without a job spec".into()))?;
            spec::validate(&job_spec).map_err(CoordinatorError::Refused)?;
            if submit.idempotency_key.len() > 128 {
                return Err(CoordinatorError::Refused(
                    "idempotency key longer than 128 bytes".into(),
                ));
            }
            let submitted =
                shared
                    .store
                    .submit(&job_spec, &submit.idempotency_key, &peer.name, now_ms())?;
            if submitted.created {
                tracing::info!(job_id = %submitted.job_id, analyst = %peer.name, "job submitted");
                let shared = shared.clone();
                let job_id = submitted.job_id.clone();
                tokio::spawn(async move { runner::run_job(shared, job_id, job_spec).await });
            }
            let info = shared
                .store
                .get(&submitted.job_id)?
                .ok_or_else(|| CoordinatorError::Refused("job vanished".into()))?;
            Ok(Response::Job(info))
        }
        Some(Request::Get(_)) => match shared.store.get(&env.job_id)? {
            Some(info) => Ok(Response::Job(info)),
            None => Err(CoordinatorError::Refused(format!(
                "no job '{}'; `cleanroom job list` shows the known jobs",
                env.job_id
            ))),
        },
        Some(Request::List(list)) => {
            let limit = if list.limit == 0 {
                50
            } else {
                list.limit.min(MAX_LIST)
            };
            Ok(Response::Jobs(JobList {
                jobs: shared.store.list(limit)?,
            }))
        }
        Some(Request::Nodes(_)) => {
            let connected = shared.registry.names();
            let nodes = shared
                .store
                .nodes()?
                .into_iter()
                .map(|n| NodeInfo {
                    connected: connected.contains(&n.name),
                    name: n.name,
                    data_addr: n.data_addr,
                    last_seen_ms: n.last_seen_ms,
                })
                .collect();
            Ok(Response::Nodes(NodeList { nodes }))
        }
        None => Err(CoordinatorError::Refused("empty request".into())),
    }
}
