//! Runs one job: offer it to both nodes, start it if both accept, collect their reports.
//!
//! The coordinator asks, it never orders: each node decides against its own agreement. Every
//! state change is stored with its reason, so `cleanroom job status` can tell the analyst what
//! happened and what to do about it.

use std::sync::Arc;
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
const FAILURE_GRACE: Duration = Duration::from_secs(3);

/// How long a node has to confirm `Start`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One party's open job stream.
struct PartyStream {
    node: String,
    role: Role,
    data_addr: String,
    send: FramedSend,
    recv: FramedRecv,
}

/// Runs a job to a terminal state. Never panics; every failure becomes a stored reason.
pub async fn run_job(shared: Arc<Shared>, job_id: String, spec: JobSpec) {
    let span = tracing::info_span!("job", job_id = %job_id);
    let outcome = drive(&shared, &job_id, &spec)
        .instrument(span.clone())
        .await;
    let _enter = span.enter();
    let (state, reason) = match outcome {
        Ok(summary) => (JobState::Succeeded, summary),
        Err((state, reason)) => (state, reason),
    };
    tracing::info!(state = state.as_str_name(), %reason, "job ended");
    if let Err(e) = shared.store.transition(&job_id, state, &reason, now_ms()) {
        tracing::warn!(error = %e, "could not record the job's end");
    }
}

type Failure = (JobState, String);

fn failed(reason: impl Into<String>) -> Failure {
    (JobState::Failed, reason.into())
}

async fn drive(shared: &Arc<Shared>, job_id: &str, spec: &JobSpec) -> Result<String, Failure> {
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
                    Some(Body::OfferReply(r)) => {
                        Ok(Err(format!("node '{node}' refused: {}", r.reason)))
                    }
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
                    Some(Outcome::Failure(reason)) => Err(format!("{node}: {reason}")),
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
        return Err(failed(format!(
            "the nodes disagree on the result ({} vs {}); nothing is released",
            a.intersection, b.intersection
        )));
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
    Ok(format!("intersection {count}"))
}

fn record(
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
