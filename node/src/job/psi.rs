//! Drives one ECDH-PSI job (`overlap` or `match`) over the data plane.
//!
//! The protocol logic lives in `cleanroom_circuits::psi` as a sans-IO state machine; this module
//! only moves its batches between QUIC streams and the CPU. Each party opens one unidirectional
//! stream to the other and writes, in order:
//!
//! ```text
//! PsiHello(set size, spec digest,     phase PSI_SIZE
//!          release terms,
//!          [noise term, commitment])
//! PointBatch* BatchEnd(total)          phase PSI_BLINDED          our items, k·H(x), shuffled
//! PointBatch* BatchEnd(total)          phase PSI_DOUBLE_BLINDED   the peer's items, re-blinded
//! BatchEnd(intersection)               phase PSI_DONE
//! [NoiseReveal(noise, nonce)]          phase PSI_DONE             if the hello committed
//! ```
//!
//! An `overlap` whose allow entry sets `epsilon` releases a noised count (see
//! [`crate::job::noise`]): the node charges its ledger and draws its noise before its hello,
//! commits to it there, and opens it after the count.
//!
//! Each hello carries the sender's release terms (its `min_result` and whether its agreement
//! lets counts go to the coordinator). Both nodes apply the stricter of the two themselves, so a
//! count under either threshold, or one either agreement keeps from the coordinator, never
//! leaves either node, whatever the coordinator does; and a `match` whose count is under the
//! joint threshold writes no membership. What a node reports of its own data is the released
//! count only: its rows read, rejected and excluded stay in its audit log.
//!
//! A reader task drains the peer's stream into memory as fast as it arrives, so neither side can
//! stall the other through flow control while it computes; it caps what it buffers at what the
//! policy and the declared sizes allow. CPU work runs on the blocking pool (rayon inside).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cleanroom_circuits::{JobKey, PsiParams, PsiSession};
use cleanroom_proto::v1::{
    Abort, BatchEnd, Envelope, JobKind, JobSpec, NoiseReveal, NoiseTerm, Phase, PointBatch,
    PsiHello, PsiOutcome, ReleaseTerms, envelope::Body,
};
use cleanroom_transport::{FramedRecv, FramedSend, Identity, TransportError};
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use crate::audit::{AuditEvent, AuditHead};
use crate::clock::now_ms;
use crate::data::dataset::{self, RowFilter};
use crate::data::forget::ForgetStore;
use crate::dataplane::{Delivery, refused};
use crate::error::NodeError;
use crate::job::frame_budget::FrameBudget;
use crate::job::noise::{self as noised_release, OwnNoise};
use crate::policy::Permit;
use crate::policy::Recipient;
use crate::spec::spec_digest;
use crate::state::NodeState;

/// How long the responder waits for the initiator to connect. The initiator loads its dataset
/// before it dials (up to [`MAX_ROWS`] rows), so this covers that load, not just a handshake; a
/// dead initiator fails the job at the coordinator long before.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(600);
/// Upper bound on one job's data-plane exchange.
pub(crate) const JOB_TIMEOUT: Duration = Duration::from_secs(3600);
/// Points per batch frame: 128 KiB, well under the frame cap.
pub(crate) const BATCH_POINTS: usize = 4096;
/// Most rows a dataset may have for one job.
pub(crate) const MAX_ROWS: u64 = 100_000_000;
/// Longest silence from the peer before its hello, and the base of the silence allowed later.
pub(crate) const STALL_BASE: Duration = Duration::from_secs(60);
/// Silence allowed per item of both sets on top of [`STALL_BASE`]: generous against the
/// ~100 µs per item per party that a 2-core machine needs, so a slow but honest peer is never
/// cut off while it blinds its set.
const STALL_PER_ITEM: Duration = Duration::from_micros(400);

/// How long the peer may stay silent once both set sizes are known.
pub(crate) fn stall_deadline(own: u64, peer: u64) -> Duration {
    let items = u32::try_from(own.saturating_add(peer)).unwrap_or(u32::MAX);
    STALL_BASE.saturating_add(STALL_PER_ITEM.saturating_mul(items))
}

/// QUIC application error code when a job fails.
const CLOSE_FAILED: u32 = 3;
/// QUIC application error code when a job finished.
const CLOSE_DONE: u32 = 0;

/// Everything a job needs from the control plane.
#[derive(Debug)]
pub struct JobContext {
    /// The job's id.
    pub job_id: String,
    /// The job as the coordinator described it.
    pub spec: JobSpec,
    /// This node's index in `spec.parties` (0 = initiator).
    pub me: usize,
    /// What the agreement permits for this job.
    pub permit: Permit,
    /// The policy generation the offer was accepted under (re-checked at each phase).
    pub generation: u64,
    /// Where membership files go.
    pub state_dir: PathBuf,
    /// This node's name.
    pub my_name: String,
    /// The node's shared state: policy, audit log.
    pub state: Arc<NodeState>,
}

impl JobContext {
    /// Stops the job if a policy reload since the offer changed its terms.
    pub(crate) fn recheck(&self) -> Result<(), NodeError> {
        self.state
            .recheck(self.generation, &self.spec, self.me, &self.permit, now_ms())
            .map_err(|v| NodeError::Job(format!("refused: {v}")))
    }

    /// Appends to the audit log; an access or release that cannot be audited does not happen.
    pub(crate) fn audit(&self, event: AuditEvent) -> Result<AuditHead, NodeError> {
        self.state.audit.append(event, now_ms()).map_err(|e| {
            tracing::error!(error = %e, "audit log write failed; stopping the job");
            NodeError::Job(format!(
                "node '{}' could not write its audit log; the job was stopped",
                self.my_name
            ))
        })
    }

    /// The row filter for this job: consent for its purpose, and forgotten subjects.
    pub(crate) fn forgotten(&self) -> Result<Option<dataset::Forgotten>, NodeError> {
        let store = ForgetStore::open(&self.state_dir)
            .map_err(|e| NodeError::Job(format!("deletion list: {e}")))?;
        let forgotten = store
            .load(&self.permit.dataset.name)
            .map_err(|e| NodeError::Job(format!("deletion list: {e}")))?;
        Ok(Some(forgotten))
    }
}

/// Initiator: dial the responder, then run the exchange.
pub async fn run_initiator(
    job: JobContext,
    endpoint: &quinn::Endpoint,
    peer_addr: SocketAddr,
) -> Result<PsiOutcome, NodeError> {
    // Load before dialing: the responder's data plane expects our hello soon after we connect,
    // and loading a large dataset takes longer than that.
    let loaded = load_input(&job).await?;
    let (conn, send) = dial(&job, endpoint, peer_addr).await?;
    let result = tokio::time::timeout(JOB_TIMEOUT, exchange(&job, &conn, send, None, loaded)).await;
    finish_connection(&conn, result)
}

/// Responder: wait for the initiator's connection (routed by [`crate::dataplane`]), then run the
/// exchange.
pub async fn run_responder(
    job: JobContext,
    incoming: oneshot::Receiver<Delivery>,
) -> Result<PsiOutcome, NodeError> {
    let (conn, send, recv, hello) = accept(&job, incoming).await?;
    let result = tokio::time::timeout(JOB_TIMEOUT, async {
        let loaded = load_input(&job).await?;
        exchange(&job, &conn, send, Some((recv, hello)), loaded).await
    })
    .await;
    finish_connection(&conn, result)
}

/// Dials the partner's data plane (its certificate must name it) and opens our stream.
pub(crate) async fn dial(
    job: &JobContext,
    endpoint: &quinn::Endpoint,
    peer_addr: SocketAddr,
) -> Result<(quinn::Connection, FramedSend), NodeError> {
    let peer = Identity::node(&job.permit.partner)?;
    let conn = cleanroom_transport::connect(endpoint, peer_addr, &peer).await?;
    let send = conn
        .open_uni()
        .await
        .map_err(|e| NodeError::Job(format!("data plane to {peer}: {e}")))?;
    Ok((conn, FramedSend::new(send)))
}

/// Waits (at most [`CONNECT_TIMEOUT`]) for the partner's connection, routed by
/// [`crate::dataplane`], and opens our stream on it. Returns the connection, our stream, the
/// partner's stream and its first frame.
pub(crate) async fn accept(
    job: &JobContext,
    incoming: oneshot::Receiver<Delivery>,
) -> Result<(quinn::Connection, FramedSend, FramedRecv, Envelope), NodeError> {
    let handover = tokio::time::timeout(CONNECT_TIMEOUT, incoming)
        .await
        .map_err(|_| {
            NodeError::Job(format!(
                "node '{}' did not connect in time",
                job.permit.partner
            ))
        })?
        .map_err(|_| NodeError::Job("job cancelled while waiting for the peer".into()))?
        .map_err(|reason| refused(&format!("node '{}'", job.permit.partner), &reason))?;
    let conn = handover.conn;
    let send = conn
        .open_uni()
        .await
        .map_err(|e| NodeError::Job(format!("data plane: {e}")))?;
    Ok((conn, FramedSend::new(send), handover.recv, handover.hello))
}

pub(crate) fn finish_connection(
    conn: &quinn::Connection,
    result: Result<Result<PsiOutcome, NodeError>, tokio::time::error::Elapsed>,
) -> Result<PsiOutcome, NodeError> {
    let result = result.unwrap_or_else(|_| Err(NodeError::Job("job timed out".into())));
    match &result {
        Ok(_) => conn.close(CLOSE_DONE.into(), b"done"),
        Err(e) => conn.close(CLOSE_FAILED.into(), e.to_string().as_bytes()),
    }
    result
}

/// What the reader task passes on.
pub(crate) enum Incoming {
    Frame(Box<Envelope>),
    Failed(String),
    /// The connection itself went away (timed out, closed): no fault of the peer's bytes.
    Lost(String),
}

/// Loads our side of the job: it is ours, the agreement allows this job, and sizes must be
/// declared. Rows without consent for the purpose and forgotten subjects never get in. The
/// access is audited and our input size checked against the agreement before anything is sent.
pub(crate) async fn load_input(job: &JobContext) -> Result<dataset::LoadedKeys, NodeError> {
    job.recheck()?;
    let dataset = job.permit.dataset.clone();
    let keys = job.permit.keys.clone();
    let consent = job.permit.consent_column.clone();
    let forgotten = job.forgotten()?;
    let loaded = blocking(move || {
        let filter = RowFilter {
            consent_column: consent.as_deref(),
            forgotten: forgotten.as_ref(),
        };
        dataset::load_keys_for(&dataset, &keys, filter, MAX_ROWS)
    })
    .await?
    .map_err(|e| NodeError::Job(format!("dataset: {e}")))?;
    let (rows_read, rows_rejected) = (loaded.rows_read, loaded.rows_rejected);
    let (excluded_consent, excluded_deleted) =
        (loaded.rows_excluded_consent, loaded.rows_excluded_deleted);
    tracing::info!(
        rows = rows_read,
        rejected = rows_rejected,
        excluded_consent,
        excluded_deleted,
        distinct = loaded.items.len(),
        "dataset loaded"
    );
    job.audit(AuditEvent::Access {
        job_id: job.job_id.clone(),
        dataset: job.permit.dataset.name.clone(),
        columns: key_columns(&job.permit),
        rows_read,
        rows_rejected,
        rows_excluded_consent: excluded_consent,
        rows_excluded_deleted: excluded_deleted,
        rows_other: None,
        persons: None,
    })?;
    job.permit
        .check_input_size(loaded.items.len() as u64)
        .map_err(|v| NodeError::Job(format!("refused: {v}")))?;
    Ok(loaded)
}

/// The symmetric part of the protocol, identical for both roles, over our loaded input.
async fn exchange(
    job: &JobContext,
    conn: &quinn::Connection,
    send: FramedSend,
    first: Option<(FramedRecv, Envelope)>,
    loaded: dataset::LoadedKeys,
) -> Result<PsiOutcome, NodeError> {
    let partner = job.permit.partner.clone();
    let digest = spec_digest(&job.job_id, &job.spec);
    let mut out = Outgoing::new(send, &job.job_id, Phase::PsiSize);
    let own_release = release_terms(&job.permit);

    let params = PsiParams {
        key_name: dataset::key_name(&job.permit.keys),
        min_peer_set: job.permit.min_peer_set,
        max_peer_set: job.permit.max_peer_set,
        return_in_order: job.permit.partner_learns_membership,
        learn_membership: job.permit.i_learn_membership,
        batch_size: BATCH_POINTS,
    };
    // Charge the budget and draw our noise before anything is sent, so that the hello can
    // commit to it.
    let own_noise = charge_noise(job).await?;
    let (noise, noise_commitment) = match &own_noise {
        Some(own) => {
            let nonce = own.nonce_bytes().map_err(NodeError::Job)?;
            let c = noised_release::commitment(&job.job_id, &job.my_name, own.noise, &nonce);
            (Some(own.term(&job.my_name)), c.to_vec())
        }
        None => (None, Vec::new()),
    };
    let (own_size, session) = PsiSession::start(params, JobKey::generate(), loaded.items);
    out.frame(
        Phase::PsiSize,
        Body::PsiHello(PsiHello {
            sender: job.my_name.clone(),
            set_size: own_size,
            spec_digest: digest.to_vec(),
            noise,
            noise_commitment,
            sum: None,
            release: Some(own_release),
        }),
    )
    .await?;

    // The peer's stream: the responder got it with the connection, the initiator accepts it.
    let (recv, hello) = match first {
        Some((recv, hello)) => (recv, Some(hello)),
        None => {
            let stream = conn.accept_uni().await.map_err(|e| {
                NodeError::Job(format!("node '{partner}' did not open its stream: {e}"))
            })?;
            (FramedRecv::new(stream), None)
        }
    };
    // Cap what the reader may buffer: the peer's points (as declared, within policy), ours
    // returned, and a few frames without points.
    let budget = FrameBudget::new(job.permit.max_peer_set, own_size);
    let mut incoming = spawn_reader(recv, job.job_id.clone(), hello, budget);

    let result = async {
        let hello = next_frame(&mut incoming, &partner, STALL_BASE).await?;
        let peer_hello = expect_body(&hello, Phase::PsiSize, &partner, |b| match b {
            Body::PsiHello(h) => Some(h.clone()),
            _ => None,
        })?;
        if peer_hello.sender != partner {
            return Err(violation(
                &partner,
                format!("hello names sender '{}'", peer_hello.sender),
            ));
        }
        if peer_hello.spec_digest != digest {
            return Err(violation(&partner, "it was given a different job spec"));
        }
        let peer_noise = noised_release::check_peer_announcement(
            &partner,
            peer_hello.noise.as_ref(),
            &peer_hello.noise_commitment,
        )
        .map_err(|e| violation(&partner, e))?;
        if peer_noise.is_some() && job.spec.kind != JobKind::Overlap as i32 {
            return Err(violation(&partner, "it announced noise for a match job"));
        }
        let joint = joint_release(&own_release, peer_hello.release.as_ref())
            .map_err(|e| violation(&partner, e))?;
        job.permit
            .check_peer_size(peer_hello.set_size)
            .map_err(|v| NodeError::Job(format!("refused: {v}")))?;
        // A peer that stops sending (while QUIC keep-alives hold the connection open) is cut
        // off once it has been silent longer than its share of the work could take.
        let stall = stall_deadline(own_size, peer_hello.set_size);
        let session = session
            .on_peer_size(peer_hello.set_size)
            .map_err(|e| NodeError::Job(format!("refused: {e}")))?;
        job.recheck()?;
        if job.permit.partner_learns_membership {
            job.audit(AuditEvent::Release {
                job_id: job.job_id.clone(),
                partner: partner.clone(),
                what: "which of the partner's records we hold (its membership)".into(),
                to: vec![partner.clone()],
                value: None,
                epsilon: 0.0,
                rho: None,
            })?;
        }

        // Blind our items (the heavy step) and send them.
        let (batches, mut exchanging) = blocking(move || session.blind()).await?;
        out.points(Phase::PsiBlinded, batches).await?;
        out.end(Phase::PsiBlinded, own_size).await?;

        // Re-blind the peer's items as they arrive.
        let mut seq_in = 0u64;
        let awaiting = loop {
            let env = next_frame(&mut incoming, &partner, stall).await?;
            check_phase(&env, Phase::PsiBlinded, &partner)?;
            match env.body {
                Some(Body::Points(PointBatch { seq, points })) => {
                    check_seq(seq, &mut seq_in, &partner)?;
                    let (next, reply) = blocking(move || exchanging.on_peer_batch(&points))
                        .await?
                        .map_err(|e| violation(&partner, e))?;
                    exchanging = next;
                    if let Some(reply) = reply {
                        out.points(Phase::PsiDoubleBlinded, vec![reply]).await?;
                    }
                }
                Some(Body::BatchEnd(BatchEnd { total })) => {
                    let (rest, awaiting) = blocking(move || exchanging.on_peer_end(total))
                        .await?
                        .map_err(|e| violation(&partner, e))?;
                    out.points(Phase::PsiDoubleBlinded, rest).await?;
                    out.end(Phase::PsiDoubleBlinded, total).await?;
                    break awaiting;
                }
                other => return Err(unexpected(&partner, Phase::PsiBlinded, other.as_ref())),
            }
        };

        // Our items, returned double-blinded by the peer.
        let output = receive_batches(
            &mut incoming,
            &partner,
            stall,
            Phase::PsiDoubleBlinded,
            awaiting,
            cleanroom_circuits::AwaitingReturn::on_returned_batch,
            cleanroom_circuits::AwaitingReturn::on_returned_end,
        )
        .await?;

        // Tell the peer we are done, with our count (which must equal theirs) and the opening
        // of our noise commitment; wait for theirs.
        out.end(Phase::PsiDone, output.intersection).await?;
        if let Some(own) = &own_noise {
            let nonce = own.nonce_bytes().map_err(NodeError::Job)?;
            out.frame(
                Phase::PsiDone,
                Body::NoiseReveal(NoiseReveal {
                    noise: own.noise,
                    nonce: nonce.to_vec(),
                }),
            )
            .await?;
        }
        out.send.finish()?;
        let done = next_frame(&mut incoming, &partner, stall).await?;
        let peer_count = expect_body(&done, Phase::PsiDone, &partner, |b| match b {
            Body::BatchEnd(e) => Some(e.total),
            _ => None,
        })?;
        if peer_count != output.intersection {
            return Err(violation(
                &partner,
                format!(
                    "it counted {peer_count} shared items, we counted {}",
                    output.intersection
                ),
            ));
        }
        let peer_noise = match peer_noise {
            None => None,
            Some(term) => {
                let reveal = next_frame(&mut incoming, &partner, stall).await?;
                let (noise, nonce) = expect_body(&reveal, Phase::PsiDone, &partner, |b| match b {
                    Body::NoiseReveal(r) => Some((r.noise, r.nonce.clone())),
                    _ => None,
                })?;
                noised_release::check_reveal(
                    &job.job_id,
                    &partner,
                    &peer_hello.noise_commitment,
                    noise,
                    &nonce,
                )
                .map_err(|e| violation(&partner, e))?;
                Some((term, noise))
            }
        };
        Ok((output, peer_noise, joint))
    }
    .await;

    let (output, peer_noise, joint) = match result {
        Ok(o) => o,
        Err(e) => {
            // Best effort: tell the peer why, so its analyst sees the same reason.
            let _ = out
                .frame(
                    Phase::PsiDone,
                    Body::Abort(Abort {
                        reason: e.to_string(),
                    }),
                )
                .await;
            return Err(e);
        }
    };
    // Wait until the peer has everything we sent before the connection is closed.
    let _ = tokio::time::timeout(Duration::from_secs(10), out.send.stopped()).await;

    // What may be released to the coordinator: the count (with both parties' noise, if any),
    // unless either agreement withholds it (below the joint minimum result, or counts not
    // allowed to the coordinator).
    job.recheck()?;
    let mut noise_terms: Vec<NoiseTerm> = Vec::new();
    let released = if own_noise.is_none() && peer_noise.is_none() {
        (output.intersection >= joint.min_result)
            .then_some(output.intersection)
            .filter(|_| joint.counts_to_coordinator)
    } else {
        let own = own_noise.as_ref().map_or(0, |o| o.noise);
        let peer = peer_noise.as_ref().map_or(0, |(_, n)| *n);
        if let Some(o) = &own_noise {
            noise_terms.push(o.term(&job.my_name));
        }
        if let Some((t, _)) = &peer_noise {
            noise_terms.push(t.clone());
        }
        noise_terms.sort_by(|a, b| a.node.cmp(&b.node));
        let noised = noised_release::noised_count(output.intersection, own, peer);
        let released = noised_release::threshold(noised, joint.min_result)
            .filter(|_| joint.counts_to_coordinator);
        settle(job, own_noise.is_some(), released).await?
    };
    let noise_note = if noise_terms.is_empty() {
        String::new()
    } else {
        format!(" with {}", noised_release::describe(&noise_terms))
    };
    let head = job.audit(AuditEvent::Release {
        job_id: job.job_id.clone(),
        partner: partner.clone(),
        what: if released.is_some() {
            format!("intersection count{noise_note}")
        } else {
            format!(
                "intersection count{noise_note} withheld (below the joint minimum result {} or \
                 not allowed to the coordinator by either agreement)",
                joint.min_result
            )
        },
        to: vec!["coordinator".into(), partner.clone()],
        value: released,
        epsilon: own_noise.as_ref().map_or(0.0, |o| o.epsilon),
        rho: None,
    })?;
    let mut outcome = PsiOutcome {
        intersection: released.unwrap_or(0),
        own_set_size: output.own_set_size,
        peer_set_size: output.peer_set_size,
        learned_membership: false,
        matched_rows: 0,
        membership_file: String::new(),
        suppressed: released.is_none(),
        audit_head: head.to_string(),
        noise: noise_terms,
        sum: None,
        bytes_to_peer: out.bytes,
    };
    // Membership is the result itself: under the joint threshold it is withheld here too (an
    // honest node writes none; a deviating one could compute it, see docs/SECURITY.md). Its row
    // count gives the count away, so only a released count lets it be reported.
    if let (true, Some(indices)) = (job.spec.kind == JobKind::Match as i32, output.membership) {
        if output.intersection >= joint.min_result {
            let (rows, path) = write_membership(job, indices, own_size).await?;
            if released.is_some() {
                outcome.learned_membership = true;
                outcome.matched_rows = rows;
                outcome.membership_file = path.display().to_string();
            }
        } else {
            tracing::info!(
                min_result = joint.min_result,
                "membership withheld: the count is below the joint minimum result"
            );
        }
    }
    Ok(outcome)
}

/// This node's release terms, as its hello announces them.
pub(crate) fn release_terms(permit: &Permit) -> ReleaseTerms {
    ReleaseTerms {
        min_result: permit.min_result.max(1),
        counts_to_coordinator: permit.counts_allowed_to(Recipient::Coordinator),
    }
}

/// The stricter of both parties' release terms: the larger threshold, and counts to the
/// coordinator only if both agreements allow it. A hello without terms, or with a threshold
/// of 0 (an honest node sends at least 1), is the peer's violation.
pub(crate) fn joint_release(
    own: &ReleaseTerms,
    peer: Option<&ReleaseTerms>,
) -> Result<ReleaseTerms, String> {
    let peer = peer.ok_or("its hello carries no release terms")?;
    if peer.min_result == 0 {
        return Err("its hello declares a minimum result of 0 (at least 1)".into());
    }
    Ok(ReleaseTerms {
        min_result: own.min_result.max(peer.min_result),
        counts_to_coordinator: own.counts_to_coordinator && peer.counts_to_coordinator,
    })
}

/// For an overlap whose allow entry sets ε: charges the ledger and draws this node's noise in
/// one transaction (the draw is not kept; a job whose release was charged before is refused).
/// `None` for exact releases.
async fn charge_noise(job: &JobContext) -> Result<Option<OwnNoise>, NodeError> {
    if job.spec.kind != JobKind::Overlap as i32 {
        return Ok(None);
    }
    let cfg = job.state.cfg();
    let Some(charge) = job.permit.charge(&job.job_id, &cfg) else {
        return Ok(None);
    };
    let Some(epsilon) = job.permit.epsilon.map(|e| e.get()) else {
        return Ok(None);
    };
    let state = job.state.clone();
    let key = crate::spec::release_key(&job.job_id, &job.spec);
    let drawn = blocking(move || {
        state
            .ledger
            .charge_and_draw(&key, &charge, now_ms(), || noised_release::draw(epsilon))
    })
    .await?
    .map_err(|e| {
        NodeError::Job(format!(
            "refused: {}",
            crate::state::budget_veto(&cfg.name, e)
        ))
    })?;
    tracing::info!(epsilon, "privacy budget charged for a noised release");
    Ok(Some(drawn))
}

/// Records what this job released in the ledger (if it charged there): the value the
/// coordinator receives, beside the charge, for the node's own records.
pub(crate) async fn settle(
    job: &JobContext,
    charged: bool,
    released: Option<u64>,
) -> Result<Option<u64>, NodeError> {
    if !charged {
        return Ok(released);
    }
    let state = job.state.clone();
    let key = crate::spec::release_key(&job.job_id, &job.spec);
    blocking(move || state.ledger.settle(&key, &released))
        .await?
        .map_err(|e| {
            tracing::error!(error = %e, "could not store the release in the ledger");
            NodeError::Job(format!(
                "node '{}' could not store the release in its privacy-budget ledger",
                job.my_name
            ))
        })
}

/// The CSV columns a job's join keys read.
pub(crate) fn key_columns(permit: &Permit) -> Vec<String> {
    permit
        .keys
        .names
        .iter()
        .filter_map(|name| permit.dataset.identifier(name).map(|i| i.column.clone()))
        .collect()
}

pub(crate) fn check_seq(seq: u64, expected: &mut u64, partner: &str) -> Result<(), NodeError> {
    if seq != *expected {
        return Err(violation(
            partner,
            format!("batch {seq} out of order (expected {expected})"),
        ));
    }
    *expected += 1;
    Ok(())
}

/// Maps matched item indices back to row numbers and writes them to the node's state dir.
/// Row numbers, never identifiers: the file is safe to hand to the partner's own systems.
async fn write_membership(
    job: &JobContext,
    indices: Vec<u32>,
    own_size: u64,
) -> Result<(u64, PathBuf), NodeError> {
    let dataset = job.permit.dataset.clone();
    let keys = job.permit.keys.clone();
    let consent = job.permit.consent_column.clone();
    let forgotten = job.forgotten()?;
    let dir = job.state_dir.join("results");
    let path = dir.join(format!("{}-membership.csv", job.job_id));
    let out = path.clone();
    blocking(move || -> Result<u64, NodeError> {
        // Re-read the dataset: the same data dedups to the same sorted order, so the indices the
        // protocol returned map to the same keys. A changed file is detected by its size.
        let filter = RowFilter {
            consent_column: consent.as_deref(),
            forgotten: forgotten.as_ref(),
        };
        let loaded = dataset::load_keys_for(&dataset, &keys, filter, MAX_ROWS)
            .map_err(|e| NodeError::Job(format!("dataset: {e}")))?;
        if loaded.items.len() as u64 != own_size {
            return Err(NodeError::Job("the dataset changed during the job".into()));
        }
        let mut matched = cleanroom_circuits::ItemSet::new();
        for i in indices {
            let item = loaded
                .items
                .get(i as usize)
                .ok_or_else(|| NodeError::Job("membership index out of range".into()))?;
            matched
                .push(item)
                .map_err(|e| NodeError::Job(e.to_string()))?;
        }
        matched.dedup();
        let rows = dataset::matching_rows_for(&dataset, &keys, filter, &matched)
            .map_err(|e| NodeError::Job(format!("dataset: {e}")))?;
        std::fs::create_dir_all(&dir).map_err(|e| NodeError::Io {
            what: format!("creating {}", dir.display()),
            source: e,
        })?;
        let mut text = String::from("row\n");
        for r in &rows {
            text.push_str(&r.to_string());
            text.push('\n');
        }
        std::fs::write(&out, text).map_err(|e| NodeError::Io {
            what: format!("writing {}", out.display()),
            source: e,
        })?;
        Ok(rows.len() as u64)
    })
    .await?
    .map(|rows| (rows, path))
}

/// Reads the peer's stream into a channel as fast as it arrives, checking job ids and what the
/// peer may make us buffer ([`FrameBudget`]).
pub(crate) fn spawn_reader(
    mut recv: FramedRecv,
    job_id: String,
    mut first: Option<Envelope>,
    mut budget: FrameBudget,
) -> mpsc::UnboundedReceiver<Incoming> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let env = match first.take() {
                Some(env) => env,
                None => match recv.recv().await {
                    Ok(Some(env)) => env,
                    Ok(None) => return,
                    Err(TransportError::Closed { reason }) => {
                        let _ = tx.send(Incoming::Lost(reason));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Incoming::Failed(e.to_string()));
                        return;
                    }
                },
            };
            if env.job_id != job_id {
                let _ = tx.send(Incoming::Failed(format!(
                    "frame for job '{}' on the stream of job '{job_id}'",
                    env.job_id
                )));
                return;
            }
            if let Err(reason) = budget.admit(&env) {
                let _ = tx.send(Incoming::Failed(reason));
                return;
            }
            if tx.send(Incoming::Frame(Box::new(env))).is_err() {
                return;
            }
        }
    });
    rx
}

pub(crate) async fn next_frame(
    incoming: &mut mpsc::UnboundedReceiver<Incoming>,
    partner: &str,
    stall: Duration,
) -> Result<Envelope, NodeError> {
    let next = tokio::time::timeout(stall, incoming.recv())
        .await
        .map_err(|_| {
            NodeError::Job(format!(
                "node '{partner}' sent nothing for {}s; the job was stopped",
                stall.as_secs()
            ))
        })?;
    match next {
        Some(Incoming::Frame(env)) => {
            if let Some(Body::Abort(Abort { reason })) = &env.body {
                return Err(NodeError::Job(format!(
                    "node '{partner}' aborted the job: {reason}"
                )));
            }
            Ok(*env)
        }
        Some(Incoming::Failed(reason)) => Err(violation(partner, reason)),
        Some(Incoming::Lost(reason)) => Err(NodeError::Job(format!(
            "lost the connection to node '{partner}': {reason}"
        ))),
        None => Err(NodeError::Job(format!(
            "node '{partner}' closed its stream early"
        ))),
    }
}

/// Receives one phase of the peer's point batches and its end marker: each batch goes, in
/// sequence, to `on_batch` and the end marker's total to `on_end` (both on the blocking pool,
/// their errors the peer's violations). A frame of another phase or kind, or a batch out of
/// sequence, is a violation too.
pub(crate) async fn receive_batches<S, T, E>(
    incoming: &mut mpsc::UnboundedReceiver<Incoming>,
    partner: &str,
    stall: Duration,
    phase: Phase,
    mut state: S,
    on_batch: fn(S, &[u8]) -> Result<S, E>,
    on_end: fn(S, u64) -> Result<T, E>,
) -> Result<T, NodeError>
where
    S: Send + 'static,
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let mut seq_in = 0u64;
    loop {
        let env = next_frame(incoming, partner, stall).await?;
        check_phase(&env, phase, partner)?;
        match env.body {
            Some(Body::Points(PointBatch { seq, points })) => {
                check_seq(seq, &mut seq_in, partner)?;
                state = blocking(move || on_batch(state, &points))
                    .await?
                    .map_err(|e| violation(partner, e))?;
            }
            Some(Body::BatchEnd(BatchEnd { total })) => {
                return blocking(move || on_end(state, total))
                    .await?
                    .map_err(|e| violation(partner, e));
            }
            other => return Err(unexpected(partner, phase, other.as_ref())),
        }
    }
}

pub(crate) fn check_phase(env: &Envelope, phase: Phase, partner: &str) -> Result<(), NodeError> {
    if env.phase != phase as i32 {
        return Err(violation(
            partner,
            format!(
                "frame for phase {} while in phase {}",
                env.phase,
                phase.as_str_name()
            ),
        ));
    }
    Ok(())
}

pub(crate) fn expect_body<T>(
    env: &Envelope,
    phase: Phase,
    partner: &str,
    pick: impl Fn(&Body) -> Option<T>,
) -> Result<T, NodeError> {
    check_phase(env, phase, partner)?;
    env.body
        .as_ref()
        .and_then(pick)
        .ok_or_else(|| unexpected(partner, phase, env.body.as_ref()))
}

pub(crate) fn unexpected(partner: &str, phase: Phase, body: Option<&Body>) -> NodeError {
    let what = match body {
        None => "an empty frame",
        Some(Body::PsiHello(_)) => "a hello",
        Some(Body::Points(_)) => "a point batch",
        Some(Body::BatchEnd(_)) => "an end marker",
        Some(Body::NoiseReveal(_)) => "a noise reveal",
        Some(_) => "a control-plane message",
    };
    violation(
        partner,
        format!("sent {what} in phase {}", phase.as_str_name()),
    )
}

pub(crate) fn violation(partner: &str, reason: impl std::fmt::Display) -> NodeError {
    NodeError::Protocol {
        peer: format!("node '{partner}'"),
        reason: reason.to_string(),
    }
}

/// Our stream to the peer: frames stamped with the job id and phase, point batches numbered
/// from 0 within each phase.
pub(crate) struct Outgoing {
    pub(crate) send: FramedSend,
    job_id: String,
    phase: Phase,
    seq: u64,
    /// Bytes sent so far (framed).
    pub(crate) bytes: u64,
}

impl Outgoing {
    /// A stream to the peer for `job_id`, starting in `phase`.
    pub(crate) fn new(send: FramedSend, job_id: &str, phase: Phase) -> Outgoing {
        Outgoing {
            send,
            job_id: job_id.to_owned(),
            phase,
            seq: 0,
            bytes: 0,
        }
    }

    pub(crate) async fn frame(&mut self, phase: Phase, body: Body) -> Result<(), NodeError> {
        if phase != self.phase {
            self.phase = phase;
            self.seq = 0;
        }
        let env = Envelope {
            job_id: self.job_id.clone(),
            phase: phase as i32,
            body: Some(body),
        };
        // The frame's length prefix and body.
        self.bytes += 4 + env.encoded_len() as u64;
        Ok(self.send.send(&env).await?)
    }

    pub(crate) async fn points(
        &mut self,
        phase: Phase,
        batches: Vec<Vec<u8>>,
    ) -> Result<(), NodeError> {
        for points in batches {
            if phase != self.phase {
                self.phase = phase;
                self.seq = 0;
            }
            let seq = self.seq;
            self.frame(phase, Body::Points(PointBatch { seq, points }))
                .await?;
            self.seq += 1;
        }
        Ok(())
    }

    pub(crate) async fn end(&mut self, phase: Phase, total: u64) -> Result<(), NodeError> {
        self.frame(phase, Body::BatchEnd(BatchEnd { total })).await
    }
}

/// Runs CPU work on the blocking pool, turning a panic into a job error.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NodeError::Job(format!("internal error: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(min_result: u64, counts_to_coordinator: bool) -> ReleaseTerms {
        ReleaseTerms {
            min_result,
            counts_to_coordinator,
        }
    }

    /// Each node applies the stricter terms of both, so neither relies on the coordinator to
    /// enforce the other's threshold or its `counts_to`.
    #[test]
    fn joint_release_terms_are_the_stricter_of_both() {
        let joint = |own, peer| joint_release(&own, Some(&peer)).unwrap();
        assert_eq!(joint(terms(10, true), terms(50, true)), terms(50, true));
        assert_eq!(joint(terms(50, true), terms(10, true)), terms(50, true));
        assert_eq!(joint(terms(1, true), terms(1, false)), terms(1, false));
        assert_eq!(joint(terms(1, false), terms(1, true)), terms(1, false));
        assert_eq!(
            joint_release(&terms(1, true), None).unwrap_err(),
            "its hello carries no release terms"
        );
        assert!(
            joint_release(&terms(1, true), Some(&terms(0, true)))
                .unwrap_err()
                .contains("minimum result of 0")
        );
    }
}
