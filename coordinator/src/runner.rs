//! Runs one job: offer it to both nodes, start it if both accept, collect their reports.
//!
//! The coordinator asks, it never orders: each node decides against its own agreement. Every
//! state change is stored with its reason, so `cleanroom job status` can tell the analyst what
//! happened and what to do about it.
//!
//! A runner executes its job under the job's lease (see `store::lease`): it takes the lease
//! before anything else, renews it while it lives, and stops at once if it ever loses it. At most
//! `max_running_jobs` runners get past the pending state at a time; the others wait, renewing.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cleanroom_proto::v1::{
    Envelope, JobSpec, JobState, Offer, Phase, PsiOutcome, Role, Start, envelope::Body,
    report::Outcome,
};
use cleanroom_transport::{FramedRecv, FramedSend};

use tracing::Instrument;

use crate::now_ms;
use crate::server::Shared;

/// After the first failed report, how long to wait for the other parties' reasons.
pub(crate) const FAILURE_GRACE: Duration = Duration::from_secs(3);

/// How long a node has to confirm `Start`.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a job lease lasts without renewal. A SIGKILLed coordinator's jobs are taken over
/// (pending) or failed (under way) this long after its last renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(10);

/// How often a runner renews its lease (and how often the server looks for orphaned jobs):
/// a third of the TTL, so two renewals may fail (a busy database) before the lease is lost.
pub const LEASE_RENEW: Duration = Duration::from_secs(3);

/// How long a resumed job waits for its parties to reconnect to a restarted coordinator (nodes
/// retry with a backoff of at most 5 s).
const RESUME_CONNECT_WAIT: Duration = Duration::from_secs(60);

/// Why a runner is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// A job just submitted: its parties are connected or the job fails at once.
    New,
    /// A pending job taken over from a coordinator that stopped: its parties may still be
    /// reconnecting, so it waits for them (up to a minute) before it fails.
    Resumed,
}

/// One party's open job stream.
struct PartyStream {
    node: String,
    role: Role,
    data_addr: String,
    send: FramedSend,
    recv: FramedRecv,
}

/// Takes the job's lease and, if this process got it, spawns the job's runner. Returns whether
/// a runner was started: false when another runner holds the job, or it has ended.
pub fn start(shared: &Arc<Shared>, job_id: &str, spec: JobSpec, launch: Launch) -> bool {
    let ttl = lease_ttl_ms();
    match shared
        .store
        .try_lease(job_id, &shared.holder, now_ms(), ttl)
    {
        Ok(true) => {
            let shared = shared.clone();
            let job_id = job_id.to_owned();
            tokio::spawn(async move { run_job(shared, job_id, spec, launch).await });
            true
        }
        Ok(false) => false,
        Err(e) => {
            tracing::warn!(job_id = %job_id, error = %e, "could not take the job's lease; it will be picked up by the orphan sweep");
            false
        }
    }
}

fn lease_ttl_ms() -> i64 {
    i64::try_from(LEASE_TTL.as_millis()).unwrap_or(i64::MAX)
}

/// Runs a job to a terminal state, under a lease this process has taken (see [`start`]).
/// Never panics; every failure becomes a stored reason. If the lease is lost, the runner stops
/// without recording anything: the job belongs to whoever took it over.
async fn run_job(shared: Arc<Shared>, job_id: String, spec: JobSpec, launch: Launch) {
    let span = tracing::info_span!("job", job_id = %job_id);
    let run = async {
        // Wait for a slot, then run; the lease is renewed meanwhile by the select below.
        let _slot = match shared.slots.acquire().await {
            Ok(permit) => permit,
            Err(_) => return None,
        };
        if shared.stopping.load(Ordering::SeqCst) {
            // A graceful stop hands pending jobs to the next start.
            return None;
        }
        Some(drive(&shared, &job_id, &spec, launch).await)
    };
    let outcome = tokio::select! {
        outcome = run.instrument(span.clone()) => outcome,
        lost = keep_lease(&shared, &job_id) => {
            let _enter = span.enter();
            tracing::warn!(reason = %lost, "job lease lost; this runner stops");
            return;
        }
    };
    let _enter = span.enter();
    let Some(outcome) = outcome else {
        tracing::info!("coordinator stopping; job left pending for the next start");
        return;
    };
    let (state, reason) = match outcome {
        Ok(summary) => (JobState::Succeeded, summary),
        Err((state, reason)) => (state, reason),
    };
    tracing::info!(state = state.as_str_name(), %reason, "job ended");
    if let Err(e) = shared.store.transition(&job_id, state, &reason, now_ms()) {
        tracing::warn!(error = %e, "could not record the job's end");
    }
}

/// Renews the job's lease every [`LEASE_RENEW`]; returns (why) once it is lost. A renewal that
/// fails on a database error is retried until the lease would have expired.
async fn keep_lease(shared: &Shared, job_id: &str) -> String {
    let ttl = lease_ttl_ms();
    let mut held_until = now_ms().saturating_add(ttl);
    loop {
        tokio::time::sleep(LEASE_RENEW).await;
        let now = now_ms();
        match shared.store.renew_lease(job_id, &shared.holder, now, ttl) {
            Ok(true) => held_until = now.saturating_add(ttl),
            Ok(false) => return "another runner holds it, or the job has ended".to_owned(),
            Err(e) if now >= held_until => return format!("it could not be renewed: {e}"),
            Err(e) => {
                tracing::warn!(job_id = %job_id, error = %e, "lease renewal failed; retrying")
            }
        }
    }
}

/// Why a job ended other than in success: its state and the reason.
pub(crate) type Failure = (JobState, String);

pub(crate) fn failed(reason: impl Into<String>) -> Failure {
    (JobState::Failed, reason.into())
}

async fn drive(
    shared: &Arc<Shared>,
    job_id: &str,
    spec: &JobSpec,
    launch: Launch,
) -> Result<String, Failure> {
    if launch == Launch::Resumed {
        wait_for_parties(shared, spec).await;
    }
    if spec.kind == cleanroom_proto::v1::JobKind::Aggregate as i32 {
        return crate::aggregate_runner::drive(shared, job_id, spec).await;
    }
    // Every party must be connected before anything is offered.
    let mut handles = Vec::new();
    for (i, party) in spec.parties.iter().enumerate() {
        let Some(handle) = shared.registry.get(&party.node) else {
            let connected = shared.registry.names();
            return Err(failed(format!(
                "node '{}' is not connected to the coordinator (connected: {}); start it or check its config",
                party.node,
                if connected.is_empty() {
                    "none".to_owned()
                } else {
                    connected.join(", ")
                }
            )));
        };
        let role = if i == 0 {
            Role::Initiator
        } else {
            Role::Responder
        };
        handles.push((party.node.clone(), role, handle));
    }

    record(shared, job_id, JobState::Offered, "offered to both nodes")?;
    let offer_timeout = shared.cfg.offer_timeout();
    let mut offers = Vec::new();
    for (node, role, handle) in handles {
        let spec = spec.clone();
        let job_id = job_id.to_owned();
        offers.push(async move {
            let result = tokio::time::timeout(offer_timeout, async {
                let (mut send, mut recv) = cleanroom_transport::open_bi(&handle.conn)
                    .await
                    .map_err(|e| format!("node '{node}' is unreachable: {e}"))?;
                send.send(&Envelope {
                    job_id: job_id.clone(),
                    phase: Phase::Offer as i32,
                    body: Some(Body::Offer(Offer {
                        spec: Some(spec),
                        role: role as i32,
                    })),
                })
                .await
                .map_err(|e| format!("node '{node}': {e}"))?;
                let reply = recv
                    .recv_expect(&job_id, Phase::Offer)
                    .await
                    .map_err(|e| format!("node '{node}' did not answer the offer: {e}"))?;
                match reply.body {
                    Some(Body::OfferReply(r)) if r.accept => Ok(Ok(PartyStream {
                        node: node.clone(),
                        role,
                        data_addr: handle.data_addr.clone(),
                        send,
                        recv,
                    })),
                    Some(Body::OfferReply(r)) => Ok(Err(format!(
                        "node '{node}' refused: {}",
                        crate::untrusted::node_text(&r.reason)
                    ))),
                    _ => Err(format!(
                        "node '{node}' sent something other than an offer reply"
                    )),
                }
            })
            .await;
            match result {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "node '{}' did not answer the offer within {offer_timeout:?}",
                    node
                )),
            }
        });
    }
    let answers = futures_join_all(offers).await;
    let mut streams = Vec::new();
    let mut vetoes = Vec::new();
    let mut errors = Vec::new();
    for answer in answers {
        match answer {
            Ok(Ok(stream)) => streams.push(stream),
            Ok(Err(veto)) => vetoes.push(veto),
            Err(error) => errors.push(error),
        }
    }
    if !vetoes.is_empty() {
        return Err((JobState::Vetoed, vetoes.join("; ")));
    }
    if !errors.is_empty() {
        return Err(failed(errors.join("; ")));
    }

    // Start the responder first, so it waits for the initiator before the initiator dials.
    streams.sort_by_key(|s| if s.role == Role::Responder { 0 } else { 1 });
    let responder_addr = streams
        .iter()
        .find(|s| s.role == Role::Responder)
        .map(|s| s.data_addr.clone())
        .unwrap_or_default();
    record(
        shared,
        job_id,
        JobState::Running,
        "both nodes accepted; running",
    )?;
    for stream in &mut streams {
        let peer_addr = if stream.role == Role::Initiator {
            responder_addr.clone()
        } else {
            String::new()
        };
        let start = Envelope {
            job_id: job_id.to_owned(),
            phase: Phase::Start as i32,
            body: Some(Body::Start(Start {
                role: stream.role as i32,
                peer_addr,
                peers: Vec::new(),
            })),
        };
        let node = stream.node.clone();
        stream
            .send
            .send(&start)
            .await
            .map_err(|e| failed(format!("node '{node}': {e}")))?;
        let ready =
            tokio::time::timeout(READY_TIMEOUT, stream.recv.recv_expect(job_id, Phase::Start))
                .await
                .map_err(|_| failed(format!("node '{node}' did not confirm the start")))?
                .map_err(|e| failed(format!("node '{node}': {e}")))?;
        if !matches!(ready.body, Some(Body::Ready(_))) {
            return Err(failed(format!("node '{node}' did not confirm the start")));
        }
    }

    // Collect both reports. The first failure fails the job at once: a node that has given up
    // must not leave the job waiting for its peer's deadline.
    let job_timeout = shared.cfg.job_timeout();
    let mut reports = tokio::task::JoinSet::new();
    for stream in streams {
        let node = stream.node.clone();
        let mut recv = stream.recv;
        let job_id = job_id.to_owned();
        reports.spawn(async move {
            let env = tokio::time::timeout(job_timeout, recv.recv_expect(&job_id, Phase::Report))
                .await
                .map_err(|_| format!("node '{node}' did not report within {job_timeout:?}"))?
                .map_err(|e| format!("node '{node}' lost: {e}"))?;
            match env.body {
                Some(Body::Report(r)) => match r.outcome {
                    Some(Outcome::Psi(outcome)) => Ok((node, outcome)),
                    Some(Outcome::Failure(reason)) => {
                        Err(format!("{node}: {}", crate::untrusted::node_text(&reason)))
                    }
                    Some(Outcome::Aggregate(_)) => Err(format!(
                        "node '{node}' sent an aggregate report for a PSI job"
                    )),
                    None => Err(format!("node '{node}' sent an empty report")),
                },
                _ => Err(format!("node '{node}' sent something other than a report")),
            }
        });
    }
    let mut outcomes: Vec<(String, PsiOutcome)> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    loop {
        // Once one party has failed, give the others a moment to say why (a node that saw a
        // protocol violation reports it just after its misbehaving peer drops), then stop.
        let next = if failures.is_empty() {
            reports.join_next().await
        } else {
            tokio::time::timeout(FAILURE_GRACE, reports.join_next())
                .await
                .unwrap_or_default()
        };
        match next {
            None => break,
            Some(Ok(Ok(outcome))) => outcomes.push(outcome),
            Some(Ok(Err(reason))) => failures.push(reason),
            Some(Err(e)) => failures.push(format!("internal error collecting reports: {e}")),
        }
    }
    reports.abort_all();
    if !failures.is_empty() {
        // Reports from the nodes themselves first: they say what went wrong, "lost" says only
        // that a party went away.
        failures.sort_by_key(|f| f.contains(" lost: "));
        return Err(failed(failures.join("; ")));
    }
    if spec.kind == cleanroom_proto::v1::JobKind::OverlapSum as i32 {
        return crate::sum_result::settle(shared, job_id, spec, outcomes);
    }
    outcomes.sort_by(|a, b| a.0.cmp(&b.0));
    // A count is released only if every node released it (the stricter agreement wins); a
    // node that withholds it reports `suppressed`, and the others' figures are blanked too.
    let withheld: Vec<String> = outcomes
        .iter()
        .filter(|(_, o)| o.suppressed)
        .map(|(n, _)| n.clone())
        .collect();
    if withheld.is_empty()
        && let [(_, a), (_, b)] = outcomes.as_slice()
        && a.intersection != b.intersection
    {
        // Noised figures are not repeated here: the job failed, so nothing is released.
        return Err(failed(if a.noise.is_empty() && b.noise.is_empty() {
            format!(
                "the nodes disagree on the result ({} vs {}); nothing is released",
                a.intersection, b.intersection
            )
        } else {
            "the nodes disagree on the noised result; nothing is released".to_owned()
        }));
    }
    // Both nodes must describe the same noise (each adds its own and reports both terms).
    if let [(_, a), (_, b)] = outcomes.as_slice()
        && a.noise != b.noise
    {
        return Err(failed(
            "the nodes disagree on the noise in the result; nothing is released",
        ));
    }
    for (node, outcome) in &mut outcomes {
        if !withheld.is_empty() {
            outcome.intersection = 0;
            outcome.suppressed = true;
        }
        shared
            .store
            .put_result(job_id, node, outcome)
            .map_err(|e| failed(format!("storing the result: {e}")))?;
    }
    if !withheld.is_empty() {
        return Ok(format!(
            "count withheld by the agreement of {} (below its minimum result, or not releasable to the coordinator)",
            withheld.join(", ")
        ));
    }
    let count = outcomes.first().map(|(_, o)| o.intersection).unwrap_or(0);
    let noise = outcomes
        .first()
        .map(|(_, o)| o.noise.as_slice())
        .unwrap_or(&[]);
    if noise.is_empty() {
        return Ok(format!("intersection {count}"));
    }
    let parts: Vec<String> = noise
        .iter()
        .map(|t| format!("{} ε {} scale {}", t.node, t.epsilon, t.scale))
        .collect();
    Ok(format!(
        "intersection {count} (noised: {}, sensitivity 1; {})",
        noise
            .first()
            .map(|t| t.mechanism.as_str())
            .unwrap_or_default(),
        parts.join(", ")
    ))
}

/// Waits (at most [`RESUME_CONNECT_WAIT`]) until every party of `spec` is connected.
async fn wait_for_parties(shared: &Shared, spec: &JobSpec) {
    let deadline = tokio::time::Instant::now() + RESUME_CONNECT_WAIT;
    while tokio::time::Instant::now() < deadline
        && !spec
            .parties
            .iter()
            .all(|p| shared.registry.get(&p.node).is_some())
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stores a state change of the job, or fails the job if the store cannot.
pub(crate) fn record(
    shared: &Arc<Shared>,
    job_id: &str,
    state: JobState,
    reason: &str,
) -> Result<(), Failure> {
    shared
        .store
        .transition(job_id, state, reason, now_ms())
        .map_err(|e| failed(format!("job store: {e}")))
}

/// Awaits all futures concurrently, in order.
async fn futures_join_all<F>(futures: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(v) => out.push(v),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => std::panic::resume_unwind(Box::new("job task cancelled")),
        }
    }
    out
}
