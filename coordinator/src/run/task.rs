//! One runner task per job: it takes the job's lease, waits for a slot, runs the job through
//! the pipeline (`super::pipeline`) with its kind's settle, and stores the final state.
//!
//! A runner executes its job under the job's lease (see `store::lease`): it takes the lease
//! before anything else, renews it while it lives, and stops at once if it ever loses it. At most
//! `max_running_jobs` runners get past the pending state at a time; the others wait, renewing.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cleanroom_proto::v1::{JobKind, JobSpec, JobState};
use tracing::Instrument;

use super::aggregate::Aggregate;
use super::error::JobError;
use super::overlap_sum::OverlapSum;
use super::pairwise::Pairwise;
use super::pipeline::{self, TwoParty};
use crate::clock::now_ms;
use crate::shared::Shared;

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
    let started = std::time::Instant::now();
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
    // The one place a job's error becomes prose: the reason stored with its final state.
    let vetoed_by: Vec<String> = match &outcome {
        Err(JobError::Vetoed(vetoes)) => vetoes.iter().map(|v| v.node.clone()).collect(),
        _ => Vec::new(),
    };
    let (state, reason) = match outcome {
        Ok(summary) => (JobState::Succeeded, summary),
        Err(error) => (error.state(), error.to_string()),
    };
    tracing::info!(state = state.as_str_name(), %reason, "job ended");
    if let Err(e) = shared.store.transition(&job_id, state, &reason, now_ms()) {
        tracing::warn!(error = %e, "could not record the job's end");
    }
    // Items processed: the distinct identifiers each party reported for its own set.
    let items = match shared.store.get(&job_id) {
        Ok(Some(info)) if state == JobState::Succeeded => info
            .results
            .iter()
            .filter_map(|r| r.outcome.as_ref())
            .map(|o| o.own_set_size)
            .fold(0u64, u64::saturating_add),
        _ => 0,
    };
    shared
        .metrics
        .job_ended(spec.kind, state, started.elapsed(), items, &vetoed_by);
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

/// The job through the pipeline with its kind's settle. A new kind is one arm here.
async fn drive(
    shared: &Arc<Shared>,
    job_id: &str,
    spec: &JobSpec,
    launch: Launch,
) -> Result<String, JobError> {
    if launch == Launch::Resumed {
        wait_for_parties(shared, spec).await;
    }
    match JobKind::try_from(spec.kind) {
        Ok(JobKind::Aggregate) => pipeline::run(shared, job_id, spec, Aggregate::new(spec)?).await,
        Ok(JobKind::OverlapSum) => pipeline::run(shared, job_id, spec, TwoParty(OverlapSum)).await,
        // Overlap and match (validation refused every other kind at submission).
        _ => pipeline::run(shared, job_id, spec, TwoParty(Pairwise)).await,
    }
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
