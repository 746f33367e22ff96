//! The driver's `aggregate` part: the offer, Start, the share connections with every peer, the
//! load, the ledger and the report on the job's control stream, around the sans-IO
//! [`AggregateSession`] ([`crate::job::aggregate`], whose docs give the protocol's order).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cleanroom_circuits::aggregate::ShareSeed;
use cleanroom_proto::v1::{
    AggregateTerms, Envelope, JobSpec, Phase, Ready, Report, envelope::Body, report::Outcome,
};
use cleanroom_transport::{FramedRecv, FramedSend, Identity, TransportError};
use tokio::sync::oneshot;

// The data plane's close codes and job deadline are the pairwise driver's: a peer reads our
// `CLOSE_FAILED` as "its job ended" whichever kind of job it was.
use super::{
    CLOSE_DONE, CLOSE_FAILED, JOB_TIMEOUT, blocking, charge_and_draw, wait_for_withdrawal,
};
use crate::audit::{AuditEvent, AuditHead};
use crate::clock::now_ms;
use crate::data::aggregate_input::{Loaded, load_vector, load_vector_on_cluster};
use crate::data::dataset::RowFilter;
use crate::data::forget::ForgetStore;
use crate::dataplane::{Delivery, pending_key, refused};
use crate::error::{JobError, NodeError, Party, Timeout};
use crate::job::aggregate::{AggConfig, AggStep, AggregateSession, PeerShare, check_hello};
use crate::job::protocol::NoiseRequest;
use crate::policy::Veto;
use crate::policy::aggregate::{self as aggregate_policy, AggregatePermit};
use crate::state::NodeState;

/// How long the node waits for `Start` after accepting.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a peer has to connect and send its hello.
const PEER_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves an aggregate offer on the job's control stream, to the end of the job. Errors are
/// reported and audited by the caller (the control session).
pub async fn serve_offer(
    endpoint: quinn::Endpoint,
    state: &Arc<NodeState>,
    job_id: String,
    spec: JobSpec,
    send: &mut FramedSend,
    recv: &mut FramedRecv,
) -> Result<(), NodeError> {
    let reply = |accept: bool, reason: String| state.offer_reply(&job_id, accept, reason);
    let my_name = state.cfg().name.clone();
    let Some(me) = aggregate_policy::my_index(&spec, &my_name) else {
        let reason = format!("node '{my_name}' is not a party of this aggregate (exactly once)");
        send.send(&reply(false, reason)).await?;
        return Ok(());
    };
    let (generation, permit) = match state.decide(&job_id, &spec, me, now_ms()) {
        Ok(d) => d,
        Err(veto) => {
            tracing::info!(reason = %veto, "offer vetoed");
            send.send(&reply(false, veto.to_string())).await?;
            return Ok(());
        }
    };
    // The full terms (peers, group column, colluders), from the same policy generation.
    let terms = aggregate_policy::check_offer_at(&state.cfg(), &spec, me, now_ms())
        .map_err(|v| NodeError::from(JobError::Refused(v)))?;
    if terms.permit != permit {
        return Err(JobError::PolicyChangedDuringOffer.into());
    }
    let mut incoming = Vec::new();
    for peer in &terms.peers {
        incoming.push((
            peer.clone(),
            state
                .waiting
                .expect_connection(&pending_key(&job_id, peer), peer),
        ));
    }
    let job = AggregateJob {
        job_id: job_id.clone(),
        spec,
        terms,
        generation,
        state: state.clone(),
    };
    let result = async {
        tracing::info!(partner = %job.terms.permit.partner, purpose = %job.spec.purpose, "aggregate offer accepted");
        send.send(&reply(true, String::new())).await?;
        let peers = job.await_start(&endpoint, recv).await?;
        let Some(peers) = peers else {
            tracing::info!("job withdrawn by the coordinator before it started");
            return Ok(());
        };
        send.send(&Envelope {
            job_id: job_id.clone(),
            phase: Phase::Start as i32,
            body: Some(Body::Ready(Ready {})),
        })
        .await?;
        // The job runs until done, its deadline, or the coordinator dropping the stream.
        let conns = JobConnections::default();
        let run = tokio::time::timeout(
            JOB_TIMEOUT,
            job.run(&endpoint, peers, incoming, send, &conns),
        );
        let result = tokio::select! {
            r = run => r.unwrap_or_else(|_| Err(Timeout::Job.into())),
            _ = wait_for_withdrawal(recv) => Err(JobError::Withdrawn.into()),
        };
        if let Err(e) = &result {
            conns.fail_all(&e.to_string());
        }
        result
    }
    .await;
    for peer in &job.terms.peers {
        state.waiting.forget_pending(&pending_key(&job_id, peer));
    }
    result
}

/// One accepted aggregate job.
#[derive(Debug)]
struct AggregateJob {
    job_id: String,
    spec: JobSpec,
    terms: AggregatePermit,
    generation: u64,
    state: Arc<NodeState>,
}

impl AggregateJob {
    fn my_name(&self) -> String {
        self.state.cfg().name.clone()
    }

    /// Waits for Start and checks that it names exactly our peers. `None`: withdrawn.
    async fn await_start(
        &self,
        endpoint: &quinn::Endpoint,
        recv: &mut FramedRecv,
    ) -> Result<Option<Vec<(String, SocketAddr)>>, NodeError> {
        let start = match tokio::time::timeout(START_TIMEOUT, recv.recv()).await {
            Err(_) => {
                return Err(Timeout::NoStart.into());
            }
            Ok(Ok(None)) | Ok(Err(_)) => return Ok(None),
            Ok(Ok(Some(e))) => e,
        };
        cleanroom_proto::frame::check_envelope(&start, &self.job_id, Phase::Start)
            .map_err(|e| protocol("coordinator", e))?;
        let Some(Body::Start(start)) = start.body else {
            return Err(protocol("coordinator", "expected Start"));
        };
        let mut addrs: HashMap<&str, &str> = HashMap::new();
        for p in &start.peers {
            if addrs.insert(&p.node, &p.data_addr).is_some() {
                return Err(protocol("coordinator", "Start names a peer twice"));
            }
        }
        if addrs.len() != self.terms.peers.len() {
            return Err(protocol(
                "coordinator",
                "Start does not name exactly the job's other parties",
            ));
        }
        let mut peers = Vec::new();
        for peer in &self.terms.peers {
            let Some(addr) = addrs.get(peer.as_str()) else {
                return Err(protocol(
                    "coordinator",
                    format!("Start gives no address for party '{peer}'"),
                ));
            };
            let addr = crate::dataplane::resolve_peer(endpoint, addr).await?;
            peers.push((peer.clone(), addr));
        }
        Ok(Some(peers))
    }

    /// Appends to the audit log; what cannot be audited does not happen.
    fn audit(&self, event: AuditEvent) -> Result<AuditHead, NodeError> {
        self.state.audit.append(event, now_ms()).map_err(|e| {
            tracing::error!(error = %e, "audit log write failed; stopping the job");
            NodeError::from(JobError::Audit {
                node: self.my_name().to_owned(),
            })
        })
    }

    /// Draws this node's noise share for a [`NoiseRequest`]. When the release is noised and
    /// our agreements set ε, its zCDP ρ (what the honest parties' noise gives, KLS21:
    /// `ρ = Σ_c ε_c²/2`) is charged to the ledger in the transaction that draws the noise,
    /// under the key `aggregate:<spec digest>`; the draw is not kept, and a job whose release was
    /// charged before is refused. Exact runs charge nothing.
    async fn charge(&self, request: NoiseRequest) -> Result<(Vec<i64>, bool), NodeError> {
        charge_and_draw(
            &self.state,
            &self.terms.permit,
            &self.job_id,
            &self.spec,
            request,
            |e| compute("noise", e),
        )
        .await
    }

    fn recheck(&self) -> Result<(), NodeError> {
        self.state
            .recheck(
                self.generation,
                &self.spec,
                self.terms.me,
                &self.terms.permit,
                now_ms(),
            )
            .map_err(|v| NodeError::from(JobError::Refused(v)))
    }

    /// Column names in vector order: the count, then the sums.
    fn columns(&self) -> Vec<String> {
        let mut c = vec!["count".to_owned()];
        c.extend(
            self.terms
                .permit
                .value_columns
                .iter()
                .map(|v| v.column.get_ref().clone()),
        );
        c
    }

    /// Our terms as we send them to every peer.
    fn own_terms(&self) -> AggregateTerms {
        let mut sensitivities = vec![1u64];
        sensitivities.extend(
            self.terms
                .permit
                .value_columns
                .iter()
                .map(|v| v.min.unsigned_abs().max(v.max.unsigned_abs()).max(1)),
        );
        AggregateTerms {
            epsilon: self.terms.permit.epsilon.map_or(0.0, |e| e.get()),
            max_colluders: self.terms.max_colluders,
            min_result: self.terms.permit.min_result,
            sensitivities,
        }
    }

    /// The session's configuration for this job.
    fn session_config(&self) -> AggConfig {
        AggConfig {
            job_id: self.job_id.clone(),
            me: self.my_name(),
            peers: self.terms.peers.clone(),
            digest: crate::spec::spec_digest(&self.job_id, &self.spec),
            permit: self.terms.permit.clone(),
            own_terms: self.own_terms(),
            columns: self.columns(),
            per_person: self.terms.person.is_some(),
            delta: self.state.cfg().delta(),
        }
    }

    /// Runs the session: does what it asks and hands it each peer's checked hello as it comes.
    async fn run(
        &self,
        endpoint: &quinn::Endpoint,
        peers: Vec<(String, SocketAddr)>,
        incoming: Vec<(String, oneshot::Receiver<Delivery>)>,
        control: &mut FramedSend,
        conns: &JobConnections,
    ) -> Result<(), NodeError> {
        self.recheck()?;
        let n = self.spec.parties.len();
        let digest = crate::spec::spec_digest(&self.job_id, &self.spec);
        let seeds = (1..n)
            .map(|_| ShareSeed::generate())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| compute("secret sharing", e))?;
        let mut session = AggregateSession::start(self.session_config(), seeds);
        let addrs: HashMap<String, SocketAddr> = peers.into_iter().collect();
        let mut sends = tokio::task::JoinSet::new();
        let mut receives = tokio::task::JoinSet::new();
        for (peer, rx) in incoming {
            let job_id = self.job_id.clone();
            let digest = digest.to_vec();
            let conns = conns.clone();
            receives.spawn(async move { receive_share(job_id, peer, rx, digest, conns).await });
        }
        // Kept open until we have reported, so no frame of ours or theirs is cut off.
        let mut out_conns: Vec<(quinn::Connection, FramedSend)> = Vec::new();
        let mut in_conns = Vec::new();
        loop {
            while let Some(step) = session.next_step() {
                match step {
                    AggStep::Hello { peer, hello } => {
                        let addr = *addrs.get(&peer).ok_or_else(|| {
                            JobError::Internal(format!("no address for party '{peer}'"))
                        })?;
                        let endpoint = endpoint.clone();
                        let conns = conns.clone();
                        sends.spawn(async move {
                            send_share(endpoint, peer, addr, *hello, conns).await
                        });
                    }
                    AggStep::Load => {
                        let loaded = self.load().await?;
                        session.on_loaded(loaded.rows_used, loaded.vector)?;
                    }
                    AggStep::Compute(work) => {
                        let done = blocking(move || work.run()).await?;
                        session.handle_done(done)?;
                    }
                    AggStep::AwaitDelivery => {
                        while let Some(r) = sends.join_next().await {
                            match r {
                                Ok(Ok(c)) => out_conns.push(c),
                                Ok(Err(e)) => return Err(e),
                                Err(e) => return Err(JobError::Internal(e.to_string()).into()),
                            }
                        }
                        session.on_delivered()?;
                    }
                    AggStep::Charge(request) => {
                        let (noise, charged) = self.charge(request).await?;
                        session.handle_noise(noise, charged)?;
                    }
                    AggStep::Recheck => self.recheck()?,
                    AggStep::Audit(event) => {
                        let head = self.audit(event)?;
                        session.on_audited(head.to_string())?;
                    }
                    AggStep::Partial(frame) => control.send(&frame).await?,
                    AggStep::Report(outcome) => {
                        let cells = outcome.cells;
                        control
                            .send(&Envelope {
                                job_id: self.job_id.clone(),
                                phase: Phase::Report as i32,
                                body: Some(Body::Report(Report {
                                    outcome: Some(Outcome::Aggregate(*outcome)),
                                    signed_head: self.state.signed_head(),
                                })),
                            })
                            .await?;
                        tracing::info!(cells, "aggregate partial reported");
                    }
                }
            }
            if session.is_finished() {
                break;
            }
            match receives.join_next().await {
                Some(Ok(Ok((peer, share, conn)))) => {
                    in_conns.push(conn);
                    session.on_peer_share(&peer, share)?;
                }
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(e)) => return Err(JobError::Internal(e.to_string()).into()),
                None => {
                    return Err(JobError::Internal(format!(
                        "the aggregate session waits for {:?}, and no share is coming",
                        session.waiting_for()
                    ))
                    .into());
                }
            }
        }
        for (conn, mut send) in out_conns {
            // The peer has long read our hello (it could not have reported otherwise); wait
            // briefly for the acknowledgement so closing cannot race it.
            let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
            conn.close(CLOSE_DONE.into(), b"done");
        }
        drop(in_conns);
        Ok(())
    }

    /// Reads the dataset into the clipped per-group vector.
    async fn load(&self) -> Result<Loaded, NodeError> {
        let dataset = self.terms.permit.dataset.clone();
        let forgotten = {
            let store = ForgetStore::open(&self.state.cfg().state_dir)
                .map_err(|e| NodeError::from(JobError::DeletionList(e.to_string())))?;
            store
                .load(&dataset.name)
                .map_err(|e| NodeError::from(JobError::DeletionList(e.to_string())))?
        };
        let consent = self.terms.permit.consent_column.clone();
        let group_by = self.terms.group_by.clone();
        let bounds: Vec<(String, i64, i64)> = self
            .terms
            .permit
            .value_columns
            .iter()
            .map(|v| (v.column.get_ref().clone(), v.min, v.max))
            .collect();
        let domain = self.terms.domain.clone();
        let person = self.terms.person.clone();
        // Per person, a person counts in the first of the job's groups its rows carry, whatever
        // their order. With a sealing key the pass and the grouping (per person too) run on
        // the executors.
        let ds = dataset.clone();
        let sealing = super::sealing_key(&ds)?;
        tracing::info!(on_executors = sealing.is_some(), "reading the dataset");
        let loaded = blocking(move || {
            let filter = RowFilter {
                consent_column: consent.as_deref(),
                forgotten: Some(&forgotten),
            };
            match &sealing {
                Some(sealing) => load_vector_on_cluster(
                    &ds,
                    &group_by,
                    &domain,
                    &bounds,
                    person.as_deref(),
                    filter,
                    sealing,
                ),
                None => load_vector(&ds, &group_by, &domain, &bounds, person.as_deref(), filter),
            }
        })
        .await?
        .map_err(|e| match e {
            crate::data::aggregate_input::AggregateInputError::Vector(reason) => {
                NodeError::from(JobError::Refused(Veto(reason)))
            }
            other => JobError::Rows(other.to_string()).into(),
        })?;
        let mut columns = vec![self.terms.group_by.clone()];
        columns.extend(self.columns().into_iter().skip(1));
        columns.extend(self.terms.person.clone());
        self.audit(AuditEvent::Access {
            job_id: self.job_id.clone(),
            dataset: dataset.name.clone(),
            columns,
            rows_read: loaded.counts.rows_read,
            rows_rejected: loaded.rows_rejected,
            rows_excluded_consent: loaded.counts.rows_excluded_consent,
            rows_excluded_deleted: loaded.counts.rows_excluded_deleted,
            rows_other: Some(loaded.rows_other),
            persons: loaded.persons,
            rejected: loaded.counts.rejections.clone(),
        })?;
        Ok(loaded)
    }
}

/// Dials `peer` and sends it its share's seed; returns the connection and the finished stream
/// (closed when the job ends, so the frame is not cut off). Delivery is confirmed by the peer
/// itself: it cannot compute its partial without our hello.
async fn send_share(
    endpoint: quinn::Endpoint,
    peer: String,
    addr: SocketAddr,
    hello: Envelope,
    conns: JobConnections,
) -> Result<(quinn::Connection, FramedSend), NodeError> {
    let identity = Identity::node(&peer)?;
    let conn = cleanroom_transport::connect(&endpoint, addr, &identity)
        .await
        .map_err(|e| data_plane(format!("cannot reach party '{peer}'"), e))?;
    conns.add(&conn);
    let stream = conn
        .open_uni()
        .await
        .map_err(|e| data_plane(format!("data plane to '{peer}'"), e))?;
    let mut send = FramedSend::new(stream);
    send.send(&hello)
        .await
        .map_err(|e| data_plane(format!("sending the share to '{peer}'"), e))?;
    send.finish()?;
    Ok((conn, send))
}

/// Waits for `peer`'s connection (routed here by the data plane only if the peer's
/// certificate names it) and checks its hello.
async fn receive_share(
    job_id: String,
    peer: String,
    rx: oneshot::Receiver<Delivery>,
    digest: Vec<u8>,
    conns: JobConnections,
) -> Result<(String, PeerShare, quinn::Connection), NodeError> {
    let handover = tokio::time::timeout(PEER_TIMEOUT, rx)
        .await
        .map_err(|_| NodeError::from(Timeout::PartyDidNotConnect(peer.to_owned())))?
        .map_err(|_| {
            NodeError::from(JobError::Cancelled {
                waiting_for: "peers",
            })
        })?
        .map_err(|reason| refused(&peer, &reason))?;
    let conn = handover.conn;
    conns.add(&conn);
    let fail = |reason: String| {
        conn.close(CLOSE_FAILED.into(), reason.as_bytes());
        protocol(&peer, reason)
    };
    let share = check_hello(&job_id, &peer, &digest, handover.hello).map_err(fail)?;
    // The hello is all the peer sends: read its stream to the end (which also lets the peer
    // know it was delivered).
    let mut recv = handover.recv;
    match tokio::time::timeout(PEER_TIMEOUT, recv.recv()).await {
        Ok(Ok(None)) => {}
        Ok(Ok(Some(_))) => return Err(fail("sent more than its hello".into())),
        // The peer closed its connection before we read the end of its stream: its job ended
        // (it says why), which is not a violation of ours to report.
        Ok(Err(TransportError::Closed { .. })) => {
            return Err(peer_ended(&peer, conn.close_reason()));
        }
        Ok(Err(e)) => return Err(fail(format!("broken share stream: {e}"))),
        Err(_) => return Err(fail("did not end its share stream".into())),
    }
    Ok((peer, share, conn))
}

/// The longest part of a peer's own closing words we keep (they reach our audit log).
const PEER_REASON_MAX: usize = 512;

/// Why `peer`'s connection closed: its own reason when it ended the job (`CLOSE_FAILED`),
/// otherwise a lost connection.
fn peer_ended(peer: &str, close: Option<quinn::ConnectionError>) -> NodeError {
    let party = Party::Peer(peer.to_owned());
    match close {
        Some(quinn::ConnectionError::ApplicationClosed(close))
            if close.error_code == CLOSE_FAILED.into() =>
        {
            let words = String::from_utf8_lossy(&close.reason);
            let reason: String = words
                .chars()
                .take(PEER_REASON_MAX)
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            JobError::Aborted {
                peer: party,
                reason,
            }
            .into()
        }
        other => JobError::Lost {
            peer: party,
            reason: other.map_or_else(|| "closed".to_owned(), |e| e.to_string()),
        }
        .into(),
    }
}

/// Every data-plane connection of one job, both ways. When the job fails, each is closed with
/// `CLOSE_FAILED` and the reason, so a peer still reading from us learns that our job ended and
/// why; a connection merely dropped would close with code 0, and the peer would take it for a
/// broken stream of ours.
#[derive(Clone, Default)]
struct JobConnections(Arc<Mutex<Vec<quinn::Connection>>>);

impl JobConnections {
    fn add(&self, conn: &quinn::Connection) {
        if let Ok(mut conns) = self.0.lock() {
            conns.push(conn.clone());
        }
    }

    fn fail_all(&self, reason: &str) {
        let Ok(conns) = self.0.lock() else { return };
        let words: String = reason.chars().take(PEER_REASON_MAX).collect();
        for conn in conns.iter() {
            conn.close(CLOSE_FAILED.into(), words.as_bytes());
        }
    }
}

fn protocol(peer: &str, reason: impl std::fmt::Display) -> NodeError {
    NodeError::Protocol {
        peer: peer.to_owned(),
        reason: reason.to_string(),
    }
}

/// A local computation's failure, named by its step.
fn compute(step: &'static str, e: impl std::fmt::Display) -> NodeError {
    JobError::Compute {
        step,
        reason: e.to_string(),
    }
    .into()
}

/// A peer that could not be reached, or its stream not used (`what` says which step).
fn data_plane(what: String, e: impl std::fmt::Display) -> NodeError {
    JobError::DataPlane {
        what,
        reason: e.to_string(),
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(code: u32, reason: &str) -> Option<quinn::ConnectionError> {
        Some(quinn::ConnectionError::ApplicationClosed(
            quinn::ApplicationClose {
                error_code: code.into(),
                reason: reason.as_bytes().to_vec().into(),
            },
        ))
    }

    #[test]
    fn a_peer_that_ended_its_job_is_named_with_its_reason_not_as_a_violation() {
        let ended = peer_ended(
            "acme",
            closed(CLOSE_FAILED, "protocol violation by mallory: bad\u{1b}[2J"),
        );
        assert_eq!(
            ended.to_string(),
            "acme aborted the job: protocol violation by mallory: bad [2J"
        );
        let long = "x".repeat(5000);
        let ended = peer_ended("acme", closed(CLOSE_FAILED, &long)).to_string();
        assert!(ended.len() < PEER_REASON_MAX + 64, "{ended}");
        // A connection dropped without a word (code 0) or lost is the network's or the
        // peer's crash: a lost connection, never a violation.
        for close in [closed(CLOSE_DONE, ""), None] {
            let lost = peer_ended("acme", close);
            assert!(
                matches!(lost, NodeError::Job(JobError::Lost { .. })),
                "{lost}"
            );
        }
    }
}
