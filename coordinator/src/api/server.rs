//! The coordinator's QUIC endpoint: it accepts connections, tells nodes from analysts by their
//! certificates, keeps the node registry, runs the scheduler and the orphan sweep, and settles
//! this process's jobs at a graceful stop.
//!
//! Who a peer is comes from its certificate alone. Nodes open one stream with a `NodeHello` whose
//! name must equal their certificate's; analysts open one stream per request (`super::analyst`).
//! Any other role is refused with a log line naming it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use cleanroom_proto::v1::{Envelope, HelloAck, JobInfo, JobState, Phase, envelope::Body};
use cleanroom_transport::{Credentials, Identity, PeerRole, TransportTuning};
use tokio::sync::watch;

use super::analyst::{analyst_session, submit_scheduled};
use super::authz::Roles;
use super::web::WebServer;
use crate::clock::{SystemClock, now_ms};
use crate::config::CoordinatorConfig;
use crate::error::CoordinatorError;
use crate::registry::NodeHandle;
use crate::run::{self, Launch};
use crate::schedule::{self, Confinement, ScheduledJob};
use crate::shared::Shared;
use crate::store::{JobStore, LeaseHolder};

/// Why a job under way at a graceful stop (SIGTERM/SIGINT) is failed.
pub const SHUTDOWN_REASON: &str =
    "the coordinator shut down while the job was in progress; retry it with `cleanroom job retry`";

/// QUIC application error code for a refused connection.
const CLOSE_REFUSED: u32 = 2;

/// Runs the coordinator until `shutdown` turns true. `on_bound` is called once with the bound
/// QUIC address and the web console's, if `[web]` is set (the CLI prints them, so tests and the
/// demo can use port 0).
pub async fn serve(
    cfg: CoordinatorConfig,
    mut shutdown: watch::Receiver<bool>,
    on_bound: impl FnOnce(SocketAddr, Option<SocketAddr>),
) -> Result<(), CoordinatorError> {
    let creds = Arc::new(Credentials::load_files(cfg.tls_files())?);
    let me = creds.identity()?;
    if me.role != PeerRole::Coordinator {
        return Err(CoordinatorError::Config(format!(
            "{} is a certificate for {me}, not the coordinator; request one with `cleanroom pki request --role coordinator` and have the CA sign it",
            cfg.tls.cert.display()
        )));
    }
    let store = JobStore::open(&cfg.database)?;
    let holder = LeaseHolder::generate()?;
    let endpoint =
        cleanroom_transport::server_endpoint(cfg.listen, &creds, &TransportTuning::default())?;
    let bound = endpoint.local_addr().map_err(|e| {
        CoordinatorError::Config(format!(
            "cannot read the bound address of {}: {e}",
            cfg.listen
        ))
    })?;
    let web = match &cfg.web {
        Some(web) => Some(WebServer::bind(web.listen, &creds).await?),
        None => None,
    };
    tracing::info!(listen = %bound, database = %cfg.database.display(), revoked_entries = creds.revoked_entries(), "coordinator listening");
    // The CA, certificate, key and CRL are reloaded on change or SIGHUP; the next handshake
    // uses them, and open connections of peers they no longer trust are closed (below).
    let reloader = creds.spawn_reloader(cleanroom_transport::RELOAD_POLL);
    on_bound(bound, web.as_ref().map(WebServer::addr));
    let roles = Arc::new(Roles::new(&cfg.roles));
    let confinement = Confinement::from_config(&cfg);
    let shared = Arc::new(Shared::new(cfg, store, holder));
    let web =
        web.map(|web| tokio::spawn(web.serve(shared.clone(), roles.clone(), shutdown.clone())));
    // Jobs left unfinished by an earlier coordinator are resumed or failed by the orphan sweep,
    // once their leases have expired — at once if it stopped gracefully.
    let sweeper = {
        let shared = shared.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                sweep_orphans(&shared);
                tokio::select! {
                    _ = tokio::time::sleep(run::LEASE_RENEW) => {}
                    _ = stop.wait_for(|stop| *stop) => break,
                }
            }
        })
    };
    let scheduler = {
        let shared = shared.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let submitter = shared.clone();
            let submit = move |job: ScheduledJob| submit_scheduled(submitter.clone(), job);
            schedule::run_scheduler(
                Arc::new(SystemClock),
                &shared.store,
                &confinement,
                submit,
                async move {
                    // A dropped sender also means stop.
                    let _ = stop.wait_for(|stop| *stop).await;
                },
            )
            .await;
        })
    };
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.changed() => break,
        };
        let Some(incoming) = incoming else { break };
        let shared = shared.clone();
        let creds = creds.clone();
        let roles = roles.clone();
        // Handshakes run concurrently, so one slow client cannot hold up the others.
        tokio::spawn(async move {
            // A failed handshake has been logged with the remote address and the reason.
            let Ok((conn, peer)) = cleanroom_transport::handshake(incoming).await else {
                return;
            };
            let watched = conn.clone();
            let session = async {
                match peer.role {
                    PeerRole::Node => node_session(shared, conn, peer.clone()).await,
                    PeerRole::Analyst => analyst_session(shared, roles, conn, peer.clone()).await,
                    PeerRole::Coordinator => {
                        tracing::warn!(peer = %peer, remote = %conn.remote_address(), "refused: a coordinator certificate cannot connect as a client");
                        conn.close(
                            CLOSE_REFUSED.into(),
                            b"coordinator certificates cannot connect here",
                        );
                    }
                }
            };
            tokio::pin!(session);
            // A reload that revokes the peer (or no longer trusts its CA) closes its open
            // connection; the session then ends as for any closed connection.
            tokio::select! {
                () = &mut session => return,
                why = creds.until_untrusted(&watched) => {
                    tracing::warn!(remote = %watched.remote_address(), reason = %why, "closing the connection of a peer no longer trusted");
                    watched.close(cleanroom_transport::CLOSE_UNTRUSTED, b"certificate no longer trusted");
                }
            }
            session.await;
        });
    }
    tracing::info!("coordinator shutting down");
    shared.stopping.store(true, Ordering::SeqCst);
    if let Err(e) = scheduler.await {
        tracing::warn!(error = %e, "the scheduler task failed");
    }
    if let Err(e) = sweeper.await {
        tracing::warn!(error = %e, "the orphan sweep task failed");
    }
    if let Some(Err(e)) = match web {
        Some(web) => Some(web.await),
        None => None,
    } {
        tracing::warn!(error = %e, "the web console task failed");
    }
    // Settle this process's jobs *before* closing the connections: closing them makes the
    // runners fail their jobs with "node lost", which would hide why. A runner's later
    // transition of a failed job is refused by the state machine. Jobs submitted on a still-open
    // analyst connection meanwhile are caught by the second pass.
    settle_own_jobs(&shared)?;
    endpoint.close(0u32.into(), b"coordinator shutting down");
    endpoint.wait_idle().await;
    settle_own_jobs(&shared)?;
    reloader.abort();
    tracing::info!("coordinator stopped");
    Ok(())
}

/// Why a job whose runner died with its coordinator is failed: the nodes dropped it with the
/// runner's connections, so it cannot be resumed, and it is never run a second time.
pub const ORPHANED_REASON: &str = "the coordinator restarted (or stopped) while the job was in progress: its runner is gone and the nodes dropped the job; retry it with `cleanroom job retry`";

/// Resumes or fails the unfinished jobs that have no live runner (no lease, or an expired one):
/// a pending job was never offered, so it is taken over and run; an offered or running one is
/// failed with [`ORPHANED_REASON`].
fn sweep_orphans(shared: &Arc<Shared>) {
    let orphans = match shared.store.orphaned(now_ms()) {
        Ok(orphans) => orphans,
        Err(e) => {
            tracing::warn!(error = %e, "could not look for orphaned jobs");
            return;
        }
    };
    for orphan in orphans {
        let job_id = orphan.job_id;
        if orphan.state == JobState::Pending {
            let spec = match shared.store.get(&job_id) {
                Ok(Some(JobInfo {
                    spec: Some(spec), ..
                })) => spec,
                Ok(_) => continue,
                Err(e) => {
                    // A spec that no longer decodes cannot run: say so rather than retry forever.
                    let reason = format!("the stored job cannot be read ({e}); submit it again");
                    fail(&shared.store, &job_id, &reason);
                    continue;
                }
            };
            if run::start(shared, &job_id, spec, Launch::Resumed) {
                tracing::info!(job_id = %job_id, "pending job resumed");
            }
        } else {
            fail(&shared.store, &job_id, ORPHANED_REASON);
        }
    }
}

/// At a graceful stop: fails this process's jobs that are under way (their nodes are about to
/// lose them) with [`SHUTDOWN_REASON`], and releases its pending ones so that the next start
/// resumes them at once.
fn settle_own_jobs(shared: &Shared) -> Result<(), CoordinatorError> {
    for job in shared.store.leased_by(&shared.holder)? {
        if job.state == JobState::Pending {
            if let Err(e) = shared.store.release_lease(&job.job_id, &shared.holder) {
                tracing::warn!(job_id = %job.job_id, error = %e, "could not release a pending job");
            }
        } else {
            fail(&shared.store, &job.job_id, SHUTDOWN_REASON);
        }
    }
    Ok(())
}

/// Fails one unfinished job with `reason`, logging what happened.
fn fail(store: &JobStore, job_id: &str, reason: &str) {
    match store.transition(job_id, JobState::Failed, reason, now_ms()) {
        Ok(()) => tracing::warn!(job_id = %job_id, %reason, "unfinished job failed"),
        Err(e) => tracing::warn!(job_id = %job_id, error = %e, "could not fail an unfinished job"),
    }
}

async fn node_session(shared: Arc<Shared>, conn: quinn::Connection, peer: Identity) {
    let hello = async {
        let (send, mut recv) = cleanroom_transport::accept_bi(&conn).await?;
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
        Ok((send, recv, hello.data_addr))
    };
    // The hello stream stays open until the acknowledgement is sent, as before.
    let (mut send, recv, data_addr) = match hello.await {
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
    // Registered before it is acknowledged: once a node has its HelloAck, every offer goes to
    // this connection, never to the one it replaces (a node restarted within the idle timeout
    // would otherwise see its first job offered on its dead predecessor's connection).
    shared.registry.insert(
        &peer.name,
        NodeHandle {
            conn: conn.clone(),
            data_addr: data_addr.clone(),
        },
    );
    let ack = send
        .send(&Envelope {
            job_id: String::new(),
            phase: Phase::Hello as i32,
            body: Some(Body::HelloAck(HelloAck {
                coordinator_name: "coordinator".into(),
            })),
        })
        .await;
    drop((send, recv));
    if let Err(e) = ack {
        tracing::warn!(node = %peer.name, error = %e, "could not acknowledge the node");
        shared.registry.remove(&peer.name, &conn);
        return;
    }
    shared.metrics.node_connected(&peer.name);
    tracing::info!(node = %peer.name, data_plane = %data_addr, "node connected");
    let why = conn.closed().await;
    shared.registry.remove(&peer.name, &conn);
    // The last time it was seen is when it left (a reconnection moves it on again).
    if let Err(e) = shared.store.node_seen(&peer.name, now_ms()) {
        tracing::warn!(node = %peer.name, error = %e, "could not record when the node left");
    }
    tracing::info!(node = %peer.name, reason = %why, "node disconnected");
}
