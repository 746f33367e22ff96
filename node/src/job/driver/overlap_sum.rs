//! The driver's `overlap-sum` part: what each role loads before the protocol
//! ([`crate::job::overlap_sum`]) runs, and what it releases and audits after.
//!
//! A learns `|A ∩ B|` exactly (the protocol cannot avoid it) and releases nothing. With a joint ε,
//! **both** add noise at it: A under encryption, B after decrypting (so neither B alone nor A
//! with the coordinator sees an exact total). B then applies the k-threshold to each group's
//! noised count and reports the release to the coordinator; its total count covers released
//! groups only. A node whose entry sets ε charges its ledger before any data is read; a release
//! key already charged is refused (the data under a repeated offer may have changed), and no
//! noise draw is ever stored.

use std::net::SocketAddr;

use cleanroom_circuits::JobKey;
use cleanroom_circuits::ahe::{self, SlotLayout};
use cleanroom_proto::v1::{AggregateGroup, Envelope, NoiseTerm, PsiOutcome, SumRelease};
use cleanroom_transport::{FramedRecv, FramedSend};
use tokio::sync::oneshot;

use super::pieces::ClusterPieces;
use super::{
    JOB_TIMEOUT, JobContext, MAX_ROWS, PsiInput, accept, blocking, copy_key, dial,
    finish_connection, key_columns, load_input, merges_on, reblinds_for, run_exchange,
    sealed_cluster, sealing_key, spill_store,
};
use crate::audit::AuditEvent;
use crate::data::cluster_encrypt::{ClusterEncryptor, piece_rows, pieces_within};
use crate::data::dataset::{self, RowFilter};
use crate::data::sum_input::{self, SumInput};
use crate::dataplane::Delivery;
use crate::error::{JobError, NodeError};
use crate::job::overlap_sum::{
    EncryptPlace, KeyHolder, KhExchange, SumConfig, ValueHolder, VhExchange,
};
use crate::job::psi::{BATCH_POINTS, MergePlace, ReblindPlace};
use crate::policy::overlap_sum::{self as sum_policy, SumShape};
use crate::spec::spec_digest;

/// Key holder: load, dial the value holder, run the exchange.
pub async fn run_key_holder(
    job: JobContext,
    endpoint: &quinn::Endpoint,
    peer_addr: SocketAddr,
) -> Result<PsiOutcome, NodeError> {
    // Under a memory_limit the key holder's keys are blinded as they are read and spilled, as
    // an overlap's are; with a sealing key they are blinded on the partner's executors and
    // kept the same way.
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
        value_holder(&job, &conn, send, recv, hello, input).await
    })
    .await;
    finish_connection(&conn, result)
}

/// The protocol's view of the job, its shape checked again at the start of the job.
fn config(job: &JobContext) -> Result<SumConfig, NodeError> {
    let sum = sum_policy::sum_spec(&job.spec).map_err(|v| NodeError::from(JobError::Refused(v)))?;
    Ok(SumConfig {
        job_id: job.job_id.clone(),
        me: job.my_name.clone(),
        permit: job.permit.clone(),
        digest: spec_digest(&job.job_id, &job.spec),
        shape: SumShape::of(sum),
        show_count: sum.count,
        reblind: ReblindPlace::Node,
        encrypt: EncryptPlace::Node,
        merge: MergePlace::Node,
        batch_points: BATCH_POINTS,
    })
}

/// With a sealing key on the dataset's cluster, the partner's points are re-blinded there:
/// `key` (a copy of the one the executors blinded our set with) goes to them sealed once more,
/// and `cfg` says so.
async fn reblinds_on_cluster(
    job: &JobContext,
    cfg: &mut SumConfig,
    key: &JobKey,
) -> Result<Option<ClusterPieces>, NodeError> {
    let on_cluster = reblinds_for(job, Some(copy_key(key)?)).await?;
    if let Some(r) = &on_cluster {
        cfg.reblind = ReblindPlace::Elsewhere {
            in_flight: r.in_flight(),
        };
    }
    Ok(on_cluster)
}

/// With a sealing key on the dataset's cluster (the one its pieces go to), the value holder's
/// rows are encrypted there: the job's Paillier key goes to the executors sealed, and `cfg`
/// says so.
async fn encrypt_on_cluster(
    job: &JobContext,
    cfg: &mut SumConfig,
    pieces: ClusterPieces,
    paillier: &ahe::SecretKey,
    layout: &SlotLayout,
) -> Result<ClusterPieces, NodeError> {
    let Some((cluster, sealing)) = sealed_cluster(job)? else {
        return Ok(pieces);
    };
    let encryptor = ClusterEncryptor::new(cluster, std::sync::Arc::new(sealing), paillier, layout)
        .await
        .map_err(|reason| JobError::Compute {
            step: "encrypting our rows on this node's cluster",
            reason,
        })?;
    let in_flight = match job.state.cfg().memory_limit_bytes() {
        Some(limit) => encryptor.pieces_in_flight.min(pieces_within(limit)),
        None => encryptor.pieces_in_flight,
    };
    cfg.encrypt = EncryptPlace::Elsewhere {
        in_flight,
        piece_rows: piece_rows(layout),
    };
    Ok(pieces.with_encryptor(encryptor))
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
    // Each identifier counts in the first of the job's groups its rows carry, whatever their
    // order: the rows may come in any order, grouped on the executors or not.
    let dataset = job.permit.dataset.clone();
    let keys = job.permit.keys.clone();
    let consent = job.permit.consent_column.clone();
    let forgotten = job.forgotten()?;
    let group_by = (!sum.group_by.is_empty()).then(|| sum.group_by.clone());
    let read_bounds = bounds.clone();
    // With a sealing key, the pass (values and groups included) runs on the executors, and
    // the rows are combined there by point. Under a memory_limit the rows (or, from the
    // executors, the points) go to spill files as they are read, and are combined there.
    let sealing = sealing_key(&dataset)?;
    let on_executors = sealing.is_some();
    let cfg = job.state.cfg();
    let spill_dir = cfg.memory_limit.map(|_| cfg.spill_dir());
    let job_id = job.job_id.clone();
    let input = blocking(move || {
        let filter = RowFilter {
            consent_column: consent.as_deref(),
            forgotten: forgotten.as_ref(),
        };
        let store = spill_dir
            .map(|dir| spill_store(&dir, &job_id).map(|(store, _)| store))
            .transpose()
            .map_err(|e| e.to_string())?;
        let group_by = group_by.as_deref();
        match (&sealing, store) {
            (Some(sealing), store) => sum_input::load_on_cluster(
                &dataset,
                &keys,
                group_by,
                &shape,
                &read_bounds,
                filter,
                MAX_ROWS,
                (JobKey::generate(), sealing),
                store,
            ),
            (None, Some(store)) => sum_input::load_spilled(
                &dataset,
                &keys,
                group_by,
                &shape,
                &read_bounds,
                filter,
                MAX_ROWS,
                (JobKey::generate(), store),
            ),
            (None, None) => sum_input::load(
                &dataset,
                &keys,
                group_by,
                &shape,
                &read_bounds,
                filter,
                MAX_ROWS,
            ),
        }
    })
    .await?
    .map_err(|e| NodeError::from(JobError::Dataset(e.to_string())))?;
    tracing::info!(
        rows = input.counts.rows_read,
        rejected = input.counts.rows_rejected,
        bad_values = input.rows_bad_value,
        distinct = input.keys.len(),
        on_executors,
        spilled = matches!(input.keys, sum_input::SumKeys::Spilled(..)),
        "dataset loaded"
    );
    let mut columns = key_columns(&job.permit);
    columns.extend(bounds.iter().map(|b| b.column.clone()));
    if !sum.group_by.is_empty() {
        columns.push(sum.group_by.clone());
    }
    job.admit(
        columns,
        &input.counts,
        input.rows_bad_value,
        input.keys.len(),
    )?;
    Ok(input)
}

/// The key holder's side, over its loaded keys: the exchange, then the audit of what it
/// returned (it releases no figure).
async fn key_holder(
    job: &JobContext,
    conn: &quinn::Connection,
    send: FramedSend,
    (_, input): (dataset::LoadedKeys, PsiInput),
) -> Result<PsiOutcome, NodeError> {
    let partner = job.permit.partner.clone();
    let mut cfg = config(job)?;
    let (mut proto, on_cluster) = match input {
        PsiInput::Items(items) => (KeyHolder::start(cfg, JobKey::generate(), items)?, None),
        PsiInput::Spilled(key, own, shared_buckets) => {
            // On a cluster, the value holder's points are re-blinded there too; with a shared
            // directory, our buckets are merged there.
            let on_cluster = reblinds_on_cluster(job, &mut cfg, &key).await?;
            let on_cluster = match (on_cluster, shared_buckets) {
                (Some(pieces), Some(dir)) => {
                    let pieces = merges_on(job, pieces, dir).await?;
                    if pieces.merges() {
                        cfg.merge = MergePlace::Elsewhere;
                    }
                    Some(pieces)
                }
                (other, _) => other,
            };
            (KeyHolder::start_spilled(cfg, key, own)?, on_cluster)
        }
        PsiInput::Blinded(_) => {
            return Err(JobError::Internal(
                "the key holder's keys were blinded on the executors but not spilled".into(),
            )
            .into());
        }
    };
    let own_size = proto.own_size();
    let bytes = run_exchange(job, conn, send, None, &mut proto, own_size, on_cluster).await?;
    let KhExchange {
        sizes: (own, peer),
        release,
        spilled_bytes,
    } = proto
        .into_exchange()
        .ok_or_else(|| JobError::Internal("the protocol stopped early".into()))?;
    if spilled_bytes > 0 {
        tracing::info!(spilled_bytes, "spill files written");
    }
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
        bytes_to_peer: bytes,
    })
}

/// The value holder's side, over its loaded input: the exchange, then the thresholded release,
/// settled in the ledger if it was charged, and audited.
async fn value_holder(
    job: &JobContext,
    conn: &quinn::Connection,
    send: FramedSend,
    recv: FramedRecv,
    first: Envelope,
    input: SumInput,
) -> Result<PsiOutcome, NodeError> {
    let partner = job.permit.partner.clone();
    let mut cfg = config(job)?;
    let shape = cfg.shape.clone();
    let on_cluster = match &input.keys {
        // On a cluster (none without one), the key holder's points are re-blinded there too.
        sum_input::SumKeys::Blinded(key, _) | sum_input::SumKeys::Spilled(key, _) => {
            reblinds_on_cluster(job, &mut cfg, key).await?
        }
        sum_input::SumKeys::Items(_) => None,
    };
    let keys_with_several_groups = input.keys_with_several_groups;
    // A fresh Paillier key for this job: two safe primes, about a second (off the runtime).
    let paillier = blocking(ahe::keygen).await?.map_err(|e| {
        NodeError::from(JobError::Compute {
            step: "generating this job's encryption key",
            reason: e.to_string(),
        })
    })?;
    // On a cluster, our rows are encrypted there too.
    let on_cluster = match on_cluster {
        Some(pieces) => {
            let layout = input.layout.clone();
            Some(encrypt_on_cluster(job, &mut cfg, pieces, &paillier, &layout).await?)
        }
        None => None,
    };
    let mut proto = ValueHolder::start(cfg, input, paillier)?;
    let own_size = proto.own_size();
    let bytes = run_exchange(
        job,
        conn,
        send,
        Some((recv, first)),
        &mut proto,
        own_size,
        on_cluster,
    )
    .await?;
    let VhExchange {
        sizes: (_, peer_size),
        cells,
        mut release,
        charged,
        spilled_bytes,
    } = proto
        .into_exchange()
        .ok_or_else(|| JobError::Internal("the protocol stopped early".into()))?;
    if spilled_bytes > 0 {
        tracing::info!(spilled_bytes, "spill files written");
    }

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
             counted in the first of the job's groups among them; this node's own figure, not \
             released)"
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
        bytes_to_peer: bytes,
    })
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
