//! Drives one `overlap-sum` job (private intersection-sum with cardinality) over the data plane.
//!
//! The protocol is `cleanroom_circuits::intersection_sum`'s two sans-IO sessions; this module
//! moves their batches between QUIC streams and the CPU, like [`crate::job::driver`] does for PSI, and
//! applies the agreement: roles, clipping, the joint ε and threshold ([`crate::policy::overlap_sum`]), the
//! ledger, the audit log. The key holder (party 0) dials; each party opens one unidirectional
//! stream and writes, in order:
//!
//! ```text
//! key holder (A)                                value holder (B)
//! PsiHello(size, digest, SumTerms)             PsiHello(size, digest, SumTerms + layout, key,
//!                                                       sensitivities)      phase PSI_SIZE
//! PointBatch* BatchEnd   k_A·H(x), shuffled     PointBatch* BatchEnd   k_B·H(y)   PSI_BLINDED
//!                                               PointBatch* BatchEnd   A's points reblinded,
//!                                                                      shuffled   PSI_DOUBLE_BLINDED
//!                                               PointBatch* BatchEnd   Enc(rows)  SUM_ROWS
//! PointBatch             Enc(sums + noise)                                        SUM_RESULT
//! BatchEnd(0)                                   BatchEnd(0)                       PSI_DONE
//! ```
//!
//! The rows are packed Paillier ciphertexts (512 bytes, several cells per plaintext) under B's
//! fresh per-job key; B decrypts each cell whole.
//!
//! A learns `|A ∩ B|` exactly (the protocol cannot avoid it) and releases nothing. With a joint ε,
//! **both** add noise at it: A under encryption, B after decrypting (so neither B alone nor A
//! with the coordinator sees an exact total). B then applies the k-threshold to each group's
//! noised count and reports the release to the coordinator; its total count covers released
//! groups only. A node whose entry sets ε charges its ledger before any data is read; a release
//! key already charged is refused (the data under a repeated offer may have changed), and no
//! noise draw is ever stored.

use std::net::SocketAddr;
use std::time::Duration;

use cleanroom_circuits::JobKey;
use cleanroom_circuits::ahe::{self, SlotLayout};
use cleanroom_circuits::intersection_sum::{
    KeyHolderSession, KhAwaitingReturn, KhReceivingPoints, KhSumming, SumParams,
    ValueHolderSession, VhExchanging,
};
use cleanroom_proto::v1::{
    AggregateGroup, Envelope, NoiseTerm, Phase, PsiHello, PsiOutcome, SumRelease, SumTerms,
    envelope::Body,
};
use cleanroom_transport::{FramedRecv, FramedSend};
use tokio::sync::oneshot;

use crate::audit::AuditEvent;
use crate::clock::now_ms;
use crate::data::dataset::{self, RowFilter};
use crate::data::sum_input::{self, SumInput};
use crate::dataplane::Delivery;
use crate::error::{JobError, NodeError};
use crate::job::driver::{
    BATCH_POINTS, JOB_TIMEOUT, JobContext, MAX_ROWS, Outgoing, STALL_BASE, accept, blocking, dial,
    expect_body, finish_connection, key_columns, load_input, next_frame, receive_batches,
    spawn_reader, stall_deadline, violation,
};
use crate::job::frame_budget::FrameBudget;
use crate::policy::Veto;
use crate::policy::overlap_sum::{self as sum_policy, JointTerms, SumShape};
use crate::spec::spec_digest;

/// Silence allowed per row while the value holder encrypts (≈ 0.9 ms a Paillier row on one
/// loaded core), on top of the PSI allowance.
const STALL_PER_ROW: Duration = Duration::from_micros(2000);

/// Key holder: load, dial the value holder, run the exchange.
pub async fn run_key_holder(
    job: JobContext,
    endpoint: &quinn::Endpoint,
    peer_addr: SocketAddr,
) -> Result<PsiOutcome, NodeError> {
    let loaded = load_input(&job).await?;
    let (conn, send) = dial(&job, endpoint, peer_addr).await?;
    let result = tokio::time::timeout(JOB_TIMEOUT, key_holder(&job, &conn, send, loaded)).await;
    finish_connection(&conn, result)
}

/// Value holder: wait for the key holder's connection, load, run the exchange.
pub async fn run_value_holder(
    job: JobContext,
    incoming: oneshot::Receiver<Delivery>,
) -> Result<PsiOutcome, NodeError> {
    let (conn, send, recv, hello) = accept(&job, incoming).await?;
    let result = tokio::time::timeout(JOB_TIMEOUT, async {
        let input = load_values(&job).await?;
        value_holder(&job, send, recv, hello, input).await
    })
    .await;
    finish_connection(&conn, result)
}

/// The spec's shape and the session parameters, checked again at the start of the job.
fn shape_and_params(job: &JobContext) -> Result<(SumShape, SumParams), NodeError> {
    let sum = sum_policy::sum_spec(&job.spec).map_err(|v| NodeError::from(JobError::Refused(v)))?;
    let shape = SumShape::of(sum);
    let params = SumParams {
        key_name: dataset::key_name(&job.permit.keys),
        min_peer_set: job.permit.min_peer_set,
        max_peer_set: job.permit.max_peer_set,
        batch_size: BATCH_POINTS,
        cells: shape.cells(),
    };
    Ok((shape, params))
}

/// Loads the value holder's keys and clipped values; audits the access; checks the input size.
async fn load_values(job: &JobContext) -> Result<SumInput, NodeError> {
    job.recheck()?;
    let sum = sum_policy::sum_spec(&job.spec)
        .map_err(|v| NodeError::from(JobError::Refused(v)))?
        .clone();
    let bounds = sum_policy::column_bounds(&job.permit, &sum)
        .map_err(|v| NodeError::from(JobError::Refused(v)))?;
    let shape = SumShape::of(&sum);
    let dataset = job.permit.dataset.clone();
    let keys = job.permit.keys.clone();
    let consent = job.permit.consent_column.clone();
    let forgotten = job.forgotten()?;
    let group_by = (!sum.group_by.is_empty()).then(|| sum.group_by.clone());
    let read_bounds = bounds.clone();
    let input = blocking(move || {
        let filter = RowFilter {
            consent_column: consent.as_deref(),
            forgotten: forgotten.as_ref(),
        };
        sum_input::load(
            &dataset,
            &keys,
            group_by.as_deref(),
            &shape,
            &read_bounds,
            filter,
            MAX_ROWS,
        )
    })
    .await?
    .map_err(|e| NodeError::from(JobError::Dataset(e.to_string())))?;
    tracing::info!(
        rows = input.counts.rows_read,
        rejected = input.counts.rows_rejected,
        bad_values = input.rows_bad_value,
        distinct = input.items.len(),
        "dataset loaded"
    );
    let mut columns = key_columns(&job.permit);
    columns.extend(bounds.iter().map(|b| b.column.clone()));
    if !sum.group_by.is_empty() {
        columns.push(sum.group_by.clone());
    }
    job.audit(AuditEvent::Access {
        job_id: job.job_id.clone(),
        dataset: job.permit.dataset.name.clone(),
        columns,
        rows_read: input.counts.rows_read,
        rows_rejected: input.counts.rows_rejected + input.rows_bad_value,
        rows_excluded_consent: input.counts.rows_excluded_consent,
        rows_excluded_deleted: input.counts.rows_excluded_deleted,
        rows_other: None,
        persons: None,
        rejected: input.counts.rejections.clone(),
    })?;
    job.permit
        .check_input_size(input.items.len() as u64)
        .map_err(|v| NodeError::from(JobError::Refused(v)))?;
    Ok(input)
}

/// The peer's hello: sender, spec digest, terms present; its size within the agreement.
fn check_hello(
    job: &JobContext,
    env: &Envelope,
    digest: &[u8; 32],
) -> Result<(u64, SumTerms), NodeError> {
    let partner = &job.permit.partner;
    let hello = expect_body(env, Phase::PsiSize, partner, |b| match b {
        Body::PsiHello(h) => Some(h.clone()),
        _ => None,
    })?;
    if hello.sender != *partner {
        return Err(violation(
            partner,
            format!("hello names sender '{}'", hello.sender),
        ));
    }
    if hello.spec_digest != digest {
        return Err(violation(partner, "it was given a different job spec"));
    }
    if hello.noise.is_some() || !hello.noise_commitment.is_empty() {
        return Err(violation(
            partner,
            "it announced overlap noise for an overlap-sum",
        ));
    }
    let terms = hello
        .sum
        .ok_or_else(|| violation(partner, "its hello carries no overlap-sum terms"))?;
    job.permit
        .check_peer_size(hello.set_size)
        .map_err(|v| NodeError::from(JobError::Refused(v)))?;
    Ok((hello.set_size, terms))
}

fn hello_frame(job: &JobContext, set_size: u64, digest: &[u8; 32], terms: SumTerms) -> Body {
    Body::PsiHello(PsiHello {
        sender: job.my_name.clone(),
        set_size,
        spec_digest: digest.to_vec(),
        noise: None,
        noise_commitment: Vec::new(),
        sum: Some(terms),
        release: None,
    })
}

fn joint(
    partner: &str,
    key_holder: &SumTerms,
    value_holder: &SumTerms,
    shape: &SumShape,
) -> Result<JointTerms, NodeError> {
    sum_policy::joint_terms(key_holder, value_holder, shape.columns.len())
        .map_err(|e| violation(partner, format!("its overlap-sum terms: {e}")))
}

/// The release's description, the same at both parties (the coordinator compares them).
fn release_terms(
    job: &JobContext,
    joint: &JointTerms,
    shape: &SumShape,
    key_holder: &str,
    value_holder: &str,
) -> Result<SumRelease, NodeError> {
    let noise: Vec<NoiseTerm> = sum_policy::noise_terms(joint, key_holder, value_holder)
        .map_err(|e| NodeError::from(JobError::Noise(e)))?;
    Ok(SumRelease {
        columns: shape.columns.clone(),
        groups: Vec::new(),
        noise,
        epsilon: joint.epsilon.unwrap_or(0.0),
        min_result: joint.min_result,
        show_count: job.spec.overlap_sum.as_ref().is_some_and(|s| s.count),
        intersection: 0,
        withheld: !joint.release_to_coordinator,
    })
}

/// The slot layout the value holder's sensitivities imply (each cell as wide as its column's
/// bound needs): its hello must announce exactly this one.
fn expected_layout(joint: &JointTerms, shape: &SumShape) -> Result<SlotLayout, NodeError> {
    let columns = joint.sensitivities.len().max(1);
    let maxima: Vec<u64> = (0..shape.cells())
        .map(|c| joint.sensitivities[c % columns])
        .collect();
    SlotLayout::for_maxima(&maxima)
        .map_err(|e| NodeError::from(JobError::Refused(Veto(e.to_string()))))
}

/// Charges this node's ledger for the release, if its own entry sets ε, and draws this node's
/// noise for the joint ε: one value per cell, zeros for an exact release. With a charge, the
/// draw happens inside the ledger's transaction (`Ledger::charge_and_draw`), which refuses a
/// release key charged before (a release is never repeated: the data under a repeated offer may
/// have changed). The draw is kept in memory only, never stored.
async fn charge_and_draw_noise(
    job: &JobContext,
    joint: &JointTerms,
    cells: usize,
) -> Result<Vec<i64>, NodeError> {
    let fresh = {
        let joint = joint.clone();
        move || sum_policy::draw_noise(&joint, cells)
    };
    let Some(charge) = charge(job, joint) else {
        return blocking(fresh)
            .await?
            .map_err(|e| NodeError::from(JobError::Noise(e)));
    };
    let state = job.state.clone();
    let key = crate::spec::release_key(&job.job_id, &job.spec);
    let loss = charge.loss;
    let drawn = blocking(move || state.ledger.charge_and_draw(&key, &charge, now_ms(), fresh))
        .await?
        .map_err(|e| budget_refused(job, e))?;
    tracing::info!(%loss, "privacy budget charged for an overlap-sum");
    Ok(drawn)
}

/// The ledger charge for this node, if its own entry sets ε: the release's (joint) ε.
fn charge(job: &JobContext, joint: &JointTerms) -> Option<crate::ledger::Charge> {
    let cfg = job.state.cfg();
    let mut charge = job.permit.charge(&job.job_id, &cfg)?;
    charge.loss = crate::ledger::Loss::Epsilon(joint.epsilon?);
    Some(charge)
}

fn budget_refused(job: &JobContext, e: crate::ledger::LedgerError) -> NodeError {
    NodeError::from(JobError::Refused(crate::state::budget_veto(
        &job.state.cfg().name,
        e,
    )))
}

/// The key holder's side, over its loaded keys.
async fn key_holder(
    job: &JobContext,
    conn: &quinn::Connection,
    send: FramedSend,
    loaded: dataset::LoadedKeys,
) -> Result<PsiOutcome, NodeError> {
    let partner = job.permit.partner.clone();
    let digest = spec_digest(&job.job_id, &job.spec);
    let (shape, params) = shape_and_params(job)?;
    let mut out = Outgoing::new(send, &job.job_id, Phase::PsiSize);
    let own_terms = sum_policy::own_terms(&job.permit);
    let (own_size, session) = KeyHolderSession::start(params, JobKey::generate(), loaded.items)
        .map_err(|e| NodeError::from(JobError::Refused(Veto(e.to_string()))))?;
    out.frame(
        Phase::PsiSize,
        hello_frame(job, own_size, &digest, own_terms.clone()),
    )
    .await?;
    let stream = conn.accept_uni().await.map_err(|e| {
        NodeError::from(JobError::DataPlane {
            what: format!("node '{partner}' did not open its stream"),
            reason: e.to_string(),
        })
    })?;
    let budget = FrameBudget::new(job.permit.max_peer_set, own_size);
    let mut incoming = spawn_reader(FramedRecv::new(stream), job.job_id.clone(), None, budget);

    let result = async {
        let hello = next_frame(&mut incoming, &partner, STALL_BASE).await?;
        let (peer_size, peer_terms) = check_hello(job, &hello, &digest)?;
        let joint = joint(&partner, &own_terms, &peer_terms, &shape)?;
        if expected_layout(&joint, &shape)?.widths() != peer_terms.widths.as_slice() {
            return Err(violation(
                &partner,
                "its slot layout does not match the bounds it declared",
            ));
        }
        let stall = stall_deadline(own_size, peer_size)
            .saturating_add(STALL_PER_ROW.saturating_mul(peer_size.min(u32::MAX.into()) as u32));
        let session = session
            .on_peer_hello(peer_size, &peer_terms.widths, &peer_terms.public_key)
            .map_err(|e| violation(&partner, e))?;
        // Charged (if this node's entry sets ε) before anything is computed; the noise for the
        // joint ε is drawn fresh and never stored.
        let noise = charge_and_draw_noise(job, &joint, shape.cells()).await?;
        let release = release_terms(job, &joint, &shape, &job.my_name, &partner)?;
        job.recheck()?;

        let (batches, receiving) = blocking(move || session.blind()).await?;
        out.points(Phase::PsiBlinded, batches).await?;
        out.end(Phase::PsiBlinded, own_size).await?;

        // B's points, reblinded and kept in B's order.
        let awaiting = receive_batches(
            &mut incoming,
            &partner,
            stall,
            Phase::PsiBlinded,
            receiving,
            KhReceivingPoints::on_peer_batch,
            KhReceivingPoints::on_peer_end,
        )
        .await?;
        // Our own points, returned shuffled: which of B's positions match.
        let summing = receive_batches(
            &mut incoming,
            &partner,
            stall,
            Phase::PsiDoubleBlinded,
            awaiting,
            KhAwaitingReturn::on_returned_batch,
            KhAwaitingReturn::on_returned_end,
        )
        .await?;
        // B's encrypted rows: matched ones added as they arrive.
        let summed = receive_batches(
            &mut incoming,
            &partner,
            stall,
            Phase::SumRows,
            summing,
            KhSumming::on_ciphertext_batch,
            KhSumming::on_ciphertext_end,
        )
        .await?;
        let sizes = summed.sizes();
        let result = blocking(move || summed.noised_sums(&noise))
            .await?
            .map_err(|e| {
                NodeError::from(JobError::Compute {
                    step: "adding the noise",
                    reason: e.to_string(),
                })
            })?;
        job.recheck()?;
        out.points(Phase::SumResult, vec![result]).await?;
        out.end(Phase::PsiDone, 0).await?;
        out.send.finish()?;
        let done = next_frame(&mut incoming, &partner, stall).await?;
        expect_body(&done, Phase::PsiDone, &partner, |b| match b {
            Body::BatchEnd(_) => Some(()),
            _ => None,
        })?;
        Ok((sizes, release))
    }
    .await;
    let ((own, peer), release) = abort_on_error(&mut out, result).await?;
    let _ = tokio::time::timeout(Duration::from_secs(10), out.send.stopped()).await;

    let head = job.audit(AuditEvent::Release {
        job_id: job.job_id.clone(),
        partner: partner.clone(),
        what: format!(
            "overlap-sum as key holder: encrypted sums{} returned to the value holder, which \
             decrypts them; nothing released by this node",
            if release.noise.is_empty() {
                " (exact: no policy asks for noise)".to_owned()
            } else {
                format!(" with {}", describe(&release.noise))
            }
        ),
        to: vec![partner.clone()],
        value: None,
        epsilon: release.epsilon,
        rho: None,
    })?;
    Ok(PsiOutcome {
        intersection: 0,
        own_set_size: own,
        peer_set_size: peer,
        learned_membership: false,
        matched_rows: 0,
        membership_file: String::new(),
        // This node releases no figure.
        suppressed: true,
        audit_head: head.to_string(),
        noise: Vec::new(),
        sum: Some(release),
        bytes_to_peer: out.bytes,
    })
}

/// The value holder's side, over its loaded input.
async fn value_holder(
    job: &JobContext,
    send: FramedSend,
    recv: FramedRecv,
    first: Envelope,
    input: SumInput,
) -> Result<PsiOutcome, NodeError> {
    let partner = job.permit.partner.clone();
    let digest = spec_digest(&job.job_id, &job.spec);
    let (shape, params) = shape_and_params(job)?;
    let mut out = Outgoing::new(send, &job.job_id, Phase::PsiSize);
    let SumInput {
        items,
        values,
        layout,
        sensitivities,
        keys_with_several_groups,
        ..
    } = input;
    let mut own_terms = sum_policy::own_terms(&job.permit);
    own_terms.sensitivities = sensitivities;
    // A fresh Paillier key for this job: two safe primes, about a second (off the runtime).
    let paillier = blocking(ahe::keygen).await?.map_err(|e| {
        NodeError::from(JobError::Compute {
            step: "generating this job's encryption key",
            reason: e.to_string(),
        })
    })?;
    let (hello, session) =
        ValueHolderSession::start(params, JobKey::generate(), items, layout, values, paillier)
            .map_err(|e| NodeError::from(JobError::Refused(Veto(e.to_string()))))?;
    let own_size = hello.set_size;
    own_terms.widths = hello.widths;
    own_terms.public_key = hello.public_key;
    out.frame(
        Phase::PsiSize,
        hello_frame(job, own_size, &digest, own_terms.clone()),
    )
    .await?;
    let budget = FrameBudget::new(job.permit.max_peer_set, own_size);
    let mut incoming = spawn_reader(recv, job.job_id.clone(), Some(first), budget);

    let result = async {
        let hello = next_frame(&mut incoming, &partner, STALL_BASE).await?;
        let (peer_size, peer_terms) = check_hello(job, &hello, &digest)?;
        if !peer_terms.widths.is_empty()
            || !peer_terms.public_key.is_empty()
            || !peer_terms.sensitivities.is_empty()
        {
            return Err(violation(
                &partner,
                "the key holder's hello carries a value holder's layout or key",
            ));
        }
        let joint = joint(&partner, &peer_terms, &own_terms, &shape)?;
        let release = release_terms(job, &joint, &shape, &partner, &job.my_name)?;
        // Charge our own ledger now, before any work, if our entry sets ε, and draw our own
        // noise (added once the sums are decrypted; held in memory only).
        let own_noise = charge_and_draw_noise(job, &joint, shape.cells()).await?;
        let charged = charge(job, &joint).is_some();
        let stall = stall_deadline(own_size, peer_size)
            .saturating_add(STALL_PER_ROW.saturating_mul(own_size.min(u32::MAX.into()) as u32));
        let session = session
            .on_peer_size(peer_size)
            .map_err(|e| NodeError::from(JobError::Refused(Veto(e.to_string()))))?;
        job.recheck()?;

        let (batches, exchanging) = blocking(move || session.blind()).await?;
        out.points(Phase::PsiBlinded, batches).await?;
        out.end(Phase::PsiBlinded, own_size).await?;

        // A's points: reblinded, then returned shuffled all at once.
        let (returned, mut encrypting) = receive_batches(
            &mut incoming,
            &partner,
            stall,
            Phase::PsiBlinded,
            exchanging,
            VhExchanging::on_peer_batch,
            VhExchanging::on_peer_end,
        )
        .await?;
        // The session checked that A's end total equals its declared size.
        out.points(Phase::PsiDoubleBlinded, returned).await?;
        out.end(Phase::PsiDoubleBlinded, peer_size).await?;
        // Our rows, encrypted batch by batch (the heavy step), in the order our points went.
        loop {
            let (next, batch) = blocking(move || {
                let batch = encrypting.next_batch();
                (encrypting, batch)
            })
            .await?;
            encrypting = next;
            match batch.map_err(|e| {
                NodeError::from(JobError::Compute {
                    step: "encrypting our rows",
                    reason: e.to_string(),
                })
            })? {
                Some(batch) => out.points(Phase::SumRows, vec![batch]).await?,
                None => break,
            }
        }
        out.end(Phase::SumRows, encrypting.rows_sent()).await?;
        let awaiting = encrypting.finish();

        // The noised sums, then A's end marker.
        let env = next_frame(&mut incoming, &partner, stall).await?;
        let sums = expect_body(&env, Phase::SumResult, &partner, |b| match b {
            Body::Points(p) => Some(p.points.clone()),
            _ => None,
        })?;
        let mut cells = blocking(move || awaiting.on_sums(&sums))
            .await?
            .map_err(|e| violation(&partner, e))?;
        // Our own noise for the joint ε, added before anything leaves this node: the key
        // holder's noise alone would not protect our totals from a key holder that colludes
        // with the coordinator.
        if own_noise.len() != cells.len() {
            return Err(JobError::Internal(format!(
                "{} noise values for {} cells",
                own_noise.len(),
                cells.len()
            ))
            .into());
        }
        for (c, n) in cells.iter_mut().zip(own_noise) {
            *c += i128::from(n);
        }
        let done = next_frame(&mut incoming, &partner, stall).await?;
        expect_body(&done, Phase::PsiDone, &partner, |b| match b {
            Body::BatchEnd(_) => Some(()),
            _ => None,
        })?;
        out.end(Phase::PsiDone, 0).await?;
        out.send.finish()?;
        Ok((peer_size, cells, release, charged))
    }
    .await;
    let (peer_size, cells, mut release, charged) = abort_on_error(&mut out, result).await?;
    let _ = tokio::time::timeout(Duration::from_secs(10), out.send.stopped()).await;

    // Threshold each group on its noised count; the total count covers released groups only
    // (a total over every group minus the shown ones would give a suppressed group away).
    // Withhold all if a policy does not allow the release to the coordinator or no group
    // reaches the threshold.
    release.groups = threshold(&shape, &cells, release.min_result);
    release.intersection = released_count(&release.groups);
    if release.withheld || release.groups.iter().all(|g| g.suppressed) {
        release.withheld = true;
        release.intersection = 0;
        for g in &mut release.groups {
            g.suppressed = true;
            g.values.clear();
        }
    }
    if charged {
        let state = job.state.clone();
        let key = crate::spec::release_key(&job.job_id, &job.spec);
        let stored = release.clone();
        release = blocking(move || state.ledger.settle(&key, &StoredRelease::from(&stored)))
            .await?
            .map_err(|e| {
                tracing::error!(error = %e, "could not store the release in the ledger");
                NodeError::from(JobError::Ledger {
                    node: job.my_name.clone(),
                })
            })?
            .apply(release);
    }
    let released = release.groups.iter().filter(|g| !g.suppressed).count();
    let head = job.audit(AuditEvent::Release {
        job_id: job.job_id.clone(),
        partner: partner.clone(),
        what: if release.withheld {
            "overlap-sum: noised per-group counts and sums withheld (below the minimum result \
             or not allowed to the coordinator)"
                .to_owned()
        } else {
            format!(
                "overlap-sum: noised counts and sums of {released} of {} groups{}",
                release.groups.len(),
                if release.noise.is_empty() {
                    " (exact: no policy asks for noise)".to_owned()
                } else {
                    format!(" with {}", describe(&release.noise))
                }
            )
        } + &format!(
            "; {keys_with_several_groups} identifiers had rows under several group labels (each \
             counted in its first row's group; this node's own figure, not released)"
        ),
        to: vec!["coordinator".into()],
        value: (!release.withheld).then(|| u64::try_from(release.intersection).unwrap_or(0)),
        epsilon: release.epsilon,
        rho: None,
    })?;
    Ok(PsiOutcome {
        intersection: u64::try_from(release.intersection).unwrap_or(0),
        own_set_size: own_size,
        peer_set_size: peer_size,
        learned_membership: false,
        matched_rows: 0,
        membership_file: String::new(),
        suppressed: release.withheld,
        audit_head: head.to_string(),
        noise: Vec::new(),
        sum: Some(release),
        bytes_to_peer: out.bytes,
    })
}

/// Sends the peer the reason a job failed (best effort) and passes the result on.
async fn abort_on_error<T>(
    out: &mut Outgoing,
    result: Result<T, NodeError>,
) -> Result<T, NodeError> {
    if let Err(e) = &result {
        let _ = out
            .frame(
                Phase::PsiDone,
                Body::Abort(cleanroom_proto::v1::Abort {
                    reason: e.to_string(),
                }),
            )
            .await;
    }
    result
}

/// The sum of the noised counts of the released (not suppressed) groups, saturating.
fn released_count(groups: &[AggregateGroup]) -> i64 {
    groups
        .iter()
        .filter(|g| !g.suppressed)
        .filter_map(|g| g.values.first())
        .fold(0i64, |t, &c| t.saturating_add(c))
}

/// Per group, the noised values; a group whose noised count is below `min_result` is
/// suppressed (no values).
fn threshold(shape: &SumShape, cells: &[i128], min_result: u64) -> Vec<AggregateGroup> {
    let columns = shape.columns.len();
    let min = i128::from(min_result);
    shape
        .labels
        .iter()
        .zip(cells.chunks(columns))
        .map(|(label, group)| {
            let suppressed = group.first().is_none_or(|&c| c < min);
            AggregateGroup {
                label: label.clone(),
                suppressed,
                values: if suppressed {
                    Vec::new()
                } else {
                    group
                        .iter()
                        .map(|&v| {
                            i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
                        })
                        .collect()
                },
            }
        })
        .collect()
}

fn describe(noise: &[NoiseTerm]) -> String {
    let parts: Vec<String> = noise
        .iter()
        .map(|t| {
            format!(
                "{}: ε {} scale {} (Δ {})",
                t.node, t.epsilon, t.scale, t.sensitivity
            )
        })
        .collect();
    format!(
        "discrete Laplace noise per column from each party: {}",
        parts.join(", ")
    )
}

/// What the value holder's ledger keeps of a release (the released figures, never a noise
/// draw): the first one stored wins.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct StoredRelease {
    intersection: i64,
    withheld: bool,
    groups: Vec<(String, bool, Vec<i64>)>,
}

impl From<&SumRelease> for StoredRelease {
    fn from(r: &SumRelease) -> Self {
        StoredRelease {
            intersection: r.intersection,
            withheld: r.withheld,
            groups: r
                .groups
                .iter()
                .map(|g| (g.label.clone(), g.suppressed, g.values.clone()))
                .collect(),
        }
    }
}

impl StoredRelease {
    fn apply(self, mut release: SumRelease) -> SumRelease {
        release.intersection = self.intersection;
        release.withheld = self.withheld;
        release.groups = self
            .groups
            .into_iter()
            .map(|(label, suppressed, values)| AggregateGroup {
                label,
                suppressed,
                values,
            })
            .collect();
        release
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleanroom_proto::v1::OverlapSumSpec;

    #[test]
    fn groups_below_the_threshold_are_suppressed_and_the_count_sums_released_groups_only() {
        let shape = SumShape::of(&OverlapSumSpec {
            sums: vec!["amount".into()],
            group_by: "reason".into(),
            groups: vec!["fraud".into()],
            count: true,
        });
        let cells = [12i128, 3400, 2, 90];
        let groups = threshold(&shape, &cells, 5);
        assert_eq!(groups.len(), 2);
        assert!(!groups[0].suppressed);
        assert_eq!(groups[0].values, [12, 3400]);
        assert!(groups[1].suppressed);
        assert!(groups[1].values.is_empty());
        // 12, not 12 + 2: the suppressed group's count cannot be recomputed from the total.
        assert_eq!(released_count(&groups), 12);
    }
}
