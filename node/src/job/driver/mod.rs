//! The job driver: the async shell around the job protocols. It owns what every job does
//! whatever its kind — dial or accept the peer's connection, read the peer's stream as fast as it
//! arrives ([`peer_stream`]: capped by [`FrameBudget`], and under a `memory_limit` held in memory
//! only up to a bound), time out a silent peer, load the dataset and audit the access, re-check
//! the policy, charge the ledger, run CPU work on the blocking pool, and release — and runs the
//! kind's protocol, which does none of that.
//!
//! `overlap` and `match` run [`crate::job::psi::PsiProtocol`] through `run_protocol`; an
//! `overlap` whose allow entry sets `epsilon` releases a noised count (see
//! [`crate::job::noise`]): the node charges its ledger and draws its noise before its hello,
//! commits to it there, and opens it after the count.
//!
//! Each hello carries the sender's release terms (its `min_result` and whether its agreement
//! lets counts go to the coordinator). Both nodes apply the stricter of the two themselves, so a
//! count under either threshold, or one either agreement keeps from the coordinator, never
//! leaves either node, whatever the coordinator does; and a `match` whose count is under the
//! joint threshold writes no membership. What a node reports of its own data is the released
//! count only: its rows read, rejected and excluded stay in its audit log.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cleanroom_circuits::spill::{
    ItemTag, MemoryStore, OwnSetBuilder, PointStore, SpilledMatches, SpilledOwn, TagKey,
};
use cleanroom_circuits::{EncodedPoint, ItemSet, JobKey};
use cleanroom_proto::v1::{
    Abort, Envelope, JobKind, JobSpec, NoiseTerm, Phase, PsiOutcome, ReleaseTerms, envelope::Body,
};
use cleanroom_transport::{FramedRecv, FramedSend, Identity};
use prost::Message;
use rayon::slice::ParallelSliceMut;
use tokio::sync::oneshot;

use crate::audit::{AuditEvent, AuditHead};
use crate::clock::now_ms;
use crate::data::cluster_merge::ClusterMerger;
use crate::data::cluster_pass::SealingKey;
use crate::data::cluster_reblind::ClusterReblinder;
use crate::data::dataset::{self, KeyedRowCounts, RowFilter};
use crate::data::forget::ForgetStore;
use crate::dataplane::{Delivery, refused};
use crate::error::{JobError, NodeError, Timeout};
use crate::job::frame_budget::FrameBudget;
use crate::job::noise::{self as noised_release, OwnNoise};
use crate::job::protocol::{NoiseRequest, Protocol, Step};
use crate::job::psi::{MergePlace, NoiseCommit, PsiConfig, PsiExchange, PsiProtocol, ReblindPlace};
use crate::job::spill::FileStore;
use crate::job::wire::Outbox;
use crate::policy::Permit;
use crate::spec::spec_digest;
use crate::state::NodeState;

pub mod aggregate;
pub mod overlap_sum;
mod peer_stream;
mod pieces;

use peer_stream::{FRAMES_BETWEEN_WORK, PeerFrames, ReadAhead};
use pieces::{ClusterPieces, PieceBack};

/// How long the responder waits for the initiator to connect. The initiator loads its dataset
/// before it dials (up to [`MAX_ROWS`] rows; under a `memory_limit` it also blinds them then:
/// about 8 minutes for 2^24 on a shared 2-core machine), so this covers that load, not just a
/// handshake; a dead initiator fails the job at the coordinator long before.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(1800);
/// Upper bound on one job's data-plane exchange.
pub(crate) const JOB_TIMEOUT: Duration = Duration::from_secs(3600);
/// Most rows a dataset may have for one job.
pub(crate) const MAX_ROWS: u64 = 100_000_000;
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
            .map_err(|v| NodeError::from(JobError::Refused(v)))
    }

    /// Appends to the audit log; an access or release that cannot be audited does not happen.
    pub(crate) fn audit(&self, event: AuditEvent) -> Result<AuditHead, NodeError> {
        self.state.audit.append(event, now_ms()).map_err(|e| {
            tracing::error!(error = %e, "audit log write failed; stopping the job");
            JobError::Audit {
                node: self.my_name.clone(),
            }
            .into()
        })
    }

    /// Audits the access to our dataset (the `columns` read, the reader's `counts`, and
    /// `bad_values` rows it accepted but whose values the job then rejected) and checks our
    /// input's size (`distinct` items) against the agreement, before anything is sent.
    pub(crate) fn admit(
        &self,
        columns: Vec<String>,
        counts: &KeyedRowCounts,
        bad_values: u64,
        distinct: usize,
    ) -> Result<(), NodeError> {
        self.audit(AuditEvent::Access {
            job_id: self.job_id.clone(),
            dataset: self.permit.dataset.name.clone(),
            columns,
            rows_read: counts.rows_read,
            rows_rejected: counts.rows_rejected + bad_values,
            rows_excluded_consent: counts.rows_excluded_consent,
            rows_excluded_deleted: counts.rows_excluded_deleted,
            rows_other: None,
            persons: None,
            rejected: counts.rejections.clone(),
        })?;
        self.permit
            .check_input_size(distinct as u64)
            .map_err(|v| NodeError::from(JobError::Refused(v)))
    }

    /// The row filter for this job: consent for its purpose, and forgotten subjects.
    pub(crate) fn forgotten(&self) -> Result<Option<dataset::Forgotten>, NodeError> {
        let store = ForgetStore::open(&self.state_dir)
            .map_err(|e| NodeError::from(JobError::DeletionList(e.to_string())))?;
        let forgotten = store
            .load(&self.permit.dataset.name)
            .map_err(|e| NodeError::from(JobError::DeletionList(e.to_string())))?;
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

/// Responder: load our input while we wait for the initiator's connection (routed by
/// [`crate::dataplane`]; the initiator loads its own before it dials, so the two loads overlap),
/// then run the exchange.
pub async fn run_responder(
    job: JobContext,
    incoming: oneshot::Receiver<Delivery>,
) -> Result<PsiOutcome, NodeError> {
    let ((conn, send, recv, hello), loaded) =
        tokio::try_join!(accept(&job, incoming), load_input(&job))?;
    let result = tokio::time::timeout(
        JOB_TIMEOUT,
        exchange(&job, &conn, send, Some((recv, hello)), loaded),
    )
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
    if let Err(reason) = crate::pin::check(&job.state, &job.permit.partner, &conn) {
        conn.close(crate::dataplane::CLOSE_REFUSED.into(), reason.as_bytes());
        return Err(NodeError::from(JobError::DataPlane {
            what: format!("data plane to {peer}"),
            reason,
        }));
    }
    let send = conn.open_uni().await.map_err(|e| {
        NodeError::from(JobError::DataPlane {
            what: format!("data plane to {peer}"),
            reason: e.to_string(),
        })
    })?;
    tracing::info!(%peer, "data plane connected");
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
        .map_err(|_| NodeError::from(Timeout::NodeDidNotConnect(job.permit.partner.clone())))?
        .map_err(|_| {
            NodeError::from(JobError::Cancelled {
                waiting_for: "peer",
            })
        })?
        .map_err(|reason| refused(&format!("node '{}'", job.permit.partner), &reason))?;
    let conn = handover.conn;
    let send = conn.open_uni().await.map_err(|e| {
        NodeError::from(JobError::DataPlane {
            what: "data plane".into(),
            reason: e.to_string(),
        })
    })?;
    tracing::info!(peer = %job.permit.partner, "data plane connected");
    Ok((conn, FramedSend::new(send), handover.recv, handover.hello))
}

pub(crate) fn finish_connection(
    conn: &quinn::Connection,
    result: Result<Result<PsiOutcome, NodeError>, tokio::time::error::Elapsed>,
) -> Result<PsiOutcome, NodeError> {
    let result = result.unwrap_or_else(|_| Err(Timeout::Job.into()));
    match &result {
        Ok(_) => conn.close(CLOSE_DONE.into(), b"done"),
        Err(e) => conn.close(CLOSE_FAILED.into(), e.to_string().as_bytes()),
    }
    result
}

/// Our input to a PSI exchange.
pub(crate) enum PsiInput {
    /// The distinct identifiers, in memory.
    Items(ItemSet),
    /// Our points, blinded with the job's key as the dataset was read (here, with tags when we
    /// learn membership, or on the executors), in the job's spill files under a `memory_limit`
    /// (in a store in memory on a cluster without one). Third: the job's bucket directory when
    /// it is under the cluster's `shared_dir` (the executors can merge its buckets).
    Spilled(JobKey, SpilledOwn, Option<PathBuf>),
    /// Our points, blinded on the executors, in memory (a `match` without a `memory_limit`, on
    /// a node whose cluster has a sealing key).
    Blinded(Box<BlindedOnExecutors>),
}

/// A `match`'s own set as the executors blinded it, and what its membership pass needs: the
/// same key and sealing key, and the first pass's row count to tell a changed dataset.
pub(crate) struct BlindedOnExecutors {
    key: JobKey,
    /// `k·H(x)` for each distinct key, sorted: the session's membership indices refer to them.
    points: Vec<EncodedPoint>,
    sealing: SealingKey,
    rows_read: u64,
}

impl PsiInput {
    fn distinct(&self) -> usize {
        match self {
            PsiInput::Items(items) => items.len(),
            // Fits: a spilled set comes from at most MAX_ROWS rows.
            PsiInput::Spilled(_, own, _) => own.size() as usize,
            PsiInput::Blinded(own) => own.points.len(),
        }
    }
}

/// How a `match` finds the rows of its matched keys.
enum MembershipPass {
    /// Read the dataset again in this process (or through the cluster) and compare keys. The
    /// digest of the first read's items ([`items_digest`]) tells whether the second read gives
    /// the same set: the protocol's indices refer to its sorted order.
    Reread(ItemsDigest),
    /// A count-only job (its keys blinded as they were read): no membership to find.
    CountOnly,
    /// A spilled set with tags (a `match` under a `memory_limit`): read the dataset again, tag
    /// each key with this key and keep the rows whose tag the session matched. The first
    /// read's row count tells a changed dataset, as a matched tag not found again does.
    ByTags(TagKey, u64),
    /// Run the executors' pass again with the job's key and compare points.
    OnExecutors(Box<BlindedOnExecutors>),
    /// A spilled set blinded on the executors (a `match` on a cluster, under a
    /// `memory_limit`): the session gives the matched points; run the pass again as above.
    PointsOnExecutors(Box<PassAgain>),
}

/// What running the executors' pass again needs: the job's key, the sealing key, and the first
/// pass's row count to tell a changed dataset.
struct PassAgain {
    key: JobKey,
    sealing: SealingKey,
    rows_read: u64,
}

/// Loads our side of the job: it is ours, the agreement allows this job, and sizes must be
/// declared. Rows without consent for the purpose and forgotten subjects never get in. The
/// access is audited and our input size checked against the agreement before anything is sent.
///
/// Under a `memory_limit`, the keys of an overlap, a match or an overlap-sum's key holder are
/// blinded as they are read and spilled ([`PsiInput::Spilled`]): the node then never holds its
/// identifiers as a set.
pub(crate) async fn load_input(
    job: &JobContext,
) -> Result<(dataset::LoadedKeys, PsiInput), NodeError> {
    job.recheck()?;
    let dataset = job.permit.dataset.clone();
    let keys = job.permit.keys.clone();
    let consent = job.permit.consent_column.clone();
    let forgotten = job.forgotten()?;
    let cfg = job.state.cfg();
    let counts_only = !job.permit.i_learn_membership && !job.permit.partner_learns_membership;
    // With a sealing key, the pass (blinding included) runs on the partner's executors. The
    // points of a count-only job (an overlap, an overlap-sum's key holder) are then kept like
    // a limited node's, in buckets; without a limit, a match's in memory, sorted, for the
    // membership it learns.
    let sealing = sealing_key(&dataset)?;
    let on_executors = sealing.is_some();
    // Under a memory_limit a match spills too. In this process its points keep their
    // identifiers' tags when it learns membership, to find the matched rows again; on the
    // executors the session gives the matched points, and their pass runs again.
    let limited = cfg.memory_limit.is_some();
    // With a shared directory on its cluster, every session keeps its buckets there, so that
    // the executors can merge them: the final comparison runs there too.
    let shared_dir = shared_dir(&dataset, sealing.as_ref());
    let spilled_form = counts_only || limited || shared_dir.is_some();
    let spill_dir = match &shared_dir {
        Some(shared) => Some(shared.clone()),
        None => (spilled_form && limited).then(|| cfg.spill_dir()),
    };
    let in_memory = !spilled_form;
    let shared = shared_dir.is_some();
    let tagged = job.permit.i_learn_membership;
    let job_id = job.job_id.clone();
    let (loaded, input) = blocking(move || {
        let filter = RowFilter {
            consent_column: consent.as_deref(),
            forgotten: forgotten.as_ref(),
        };
        let spill_failed = |e: &dyn std::fmt::Display| dataset::DatasetError::Spill(e.to_string());
        let sealing = match sealing {
            Some(sealing) if in_memory => {
                let key = JobKey::generate();
                let mut points: Vec<EncodedPoint> = Vec::new();
                let mut loaded = dataset::blind_keys_on_cluster(
                    &dataset,
                    &keys,
                    filter,
                    MAX_ROWS,
                    &key,
                    &sealing,
                    |chunk| {
                        points.extend_from_slice(chunk);
                        Ok(())
                    },
                )?;
                points.par_sort_unstable();
                let rows = points.len();
                points.dedup();
                loaded.duplicate_rows = (rows - points.len()) as u64;
                let rows_read = loaded.rows_read;
                let own = BlindedOnExecutors {
                    key,
                    points,
                    sealing,
                    rows_read,
                };
                return Ok((loaded, PsiInput::Blinded(Box::new(own))));
            }
            other => other,
        };
        let (store, job_dir): (Box<dyn PointStore>, _) = match (spill_dir, &sealing) {
            (None, None) => {
                let mut loaded = dataset::load_keys_for(&dataset, &keys, filter, MAX_ROWS)?;
                let items = std::mem::take(&mut loaded.items);
                return Ok((loaded, PsiInput::Items(items)));
            }
            (Some(spill_dir), _) => {
                let (store, dir) = spill_store(&spill_dir, &job_id)?;
                (store, Some(dir))
            }
            (None, Some(_)) => (Box::new(MemoryStore::default()), None),
        };
        let shared_buckets = job_dir.filter(|_| shared);
        let key = JobKey::generate();
        let key_name = dataset::key_name(&keys);
        let mut own = if tagged && sealing.is_none() {
            OwnSetBuilder::with_tags(store, TagKey::generate())
        } else {
            OwnSetBuilder::new(store)
        };
        let mut loaded = match &sealing {
            Some(sealing) => dataset::blind_keys_on_cluster(
                &dataset,
                &keys,
                filter,
                MAX_ROWS,
                &key,
                sealing,
                |points| own.add_points(points).map_err(|e| spill_failed(&e)),
            )?,
            None => dataset::load_keys_chunked(&dataset, &keys, filter, MAX_ROWS, |chunk| {
                own.add(&key, &key_name, chunk)
                    .map_err(|e| spill_failed(&e))
            })?,
        };
        let own = own.finish().map_err(|e| spill_failed(&e))?;
        loaded.duplicate_rows = own.duplicates();
        Ok((loaded, PsiInput::Spilled(key, own, shared_buckets)))
    })
    .await?
    .map_err(|e: dataset::DatasetError| NodeError::from(JobError::Dataset(e.to_string())))?;
    let distinct = input.distinct();
    tracing::info!(
        rows = loaded.rows_read,
        rejected = loaded.rows_rejected,
        excluded_consent = loaded.rows_excluded_consent,
        excluded_deleted = loaded.rows_excluded_deleted,
        distinct,
        spilled = matches!(input, PsiInput::Spilled(..)),
        on_executors,
        "dataset loaded"
    );
    job.admit(key_columns(&job.permit), &loaded.counts(), 0, distinct)?;
    Ok((loaded, input))
}

/// A job's spill files in a fresh directory of its own under `spill_dir`, and that directory.
pub(crate) fn spill_store(
    spill_dir: &std::path::Path,
    job_id: &str,
) -> Result<(Box<dyn PointStore>, PathBuf), dataset::DatasetError> {
    let store = FileStore::create(spill_dir, job_id).map_err(|e| {
        dataset::DatasetError::Spill(format!(
            "cannot create them in {}: {e}",
            spill_dir.display()
        ))
    })?;
    // Absolute (a relative spill_dir is read from the node's working directory): the
    // executors are told this path.
    let dir = std::path::absolute(store.dir()).map_err(|e| {
        dataset::DatasetError::Spill(format!("cannot name {}: {e}", store.dir().display()))
    })?;
    Ok((Box::new(store), dir))
}

/// The directory the dataset's cluster shares with its executors, if it has one and the
/// sealing key that lets the executors work there.
fn shared_dir(
    dataset: &crate::data::schema::DatasetConfig,
    sealing: Option<&SealingKey>,
) -> Option<PathBuf> {
    sealing?;
    dataset.engine.cluster.as_ref()?.shared_dir.clone()
}

/// The dataset's cluster and its sealing key, when it has both: what a job's sealed pieces
/// (merging, encrypting) go to.
pub(crate) fn sealed_cluster(
    job: &JobContext,
) -> Result<Option<(&crate::data::schema::Cluster, SealingKey)>, NodeError> {
    let Some(cluster) = job.permit.dataset.engine.cluster.as_ref() else {
        return Ok(None);
    };
    Ok(sealing_key(&job.permit.dataset)?.map(|sealing| (cluster, sealing)))
}

/// The sealing key of the dataset's cluster, read from its file: with it, the dataset's pass
/// runs on the executors. `None` in process, or on a cluster without one.
pub(crate) fn sealing_key(
    dataset: &crate::data::schema::DatasetConfig,
) -> Result<Option<SealingKey>, NodeError> {
    match dataset
        .engine
        .cluster
        .as_ref()
        .and_then(|c| c.sealing_key.as_ref())
    {
        Some(path) => Ok(Some(
            SealingKey::read(path).map_err(|e| NodeError::from(JobError::Dataset(e)))?,
        )),
        None => Ok(None),
    }
}

/// The symmetric part of the job, identical for both roles, over our loaded input: the
/// protocol's exchange, then the release.
async fn exchange(
    job: &JobContext,
    conn: &quinn::Connection,
    send: FramedSend,
    first: Option<(FramedRecv, Envelope)>,
    (loaded, input): (dataset::LoadedKeys, PsiInput),
) -> Result<PsiOutcome, NodeError> {
    // Charge the budget and draw our noise before anything is sent, so that the hello can
    // commit to it.
    let own_noise = charge_noise(job).await?;
    let noise = match &own_noise {
        Some(own) => Some(NoiseCommit {
            term: own.term(&job.my_name),
            noise: own.noise,
            nonce: own.nonce_bytes().map_err(JobError::Noise)?,
        }),
        None => None,
    };
    let kind = JobKind::try_from(job.spec.kind).unwrap_or(JobKind::Overlap);
    let on_cluster = reblinds_for(job, key_before_session(&input)?).await?;
    let shared_buckets = match &input {
        PsiInput::Spilled(_, _, dir) => dir.clone(),
        _ => None,
    };
    let on_cluster = match (on_cluster, shared_buckets) {
        (Some(pieces), Some(dir)) => Some(merges_on(job, pieces, dir).await?),
        (other, _) => other,
    };
    let cfg = PsiConfig {
        job_id: job.job_id.clone(),
        me: job.my_name.clone(),
        kind,
        permit: job.permit.clone(),
        digest: spec_digest(&job.job_id, &job.spec),
        noise,
        reblind: match &on_cluster {
            Some(r) => ReblindPlace::Elsewhere {
                in_flight: r.in_flight(),
            },
            None => ReblindPlace::Node,
        },
        merge: if on_cluster.as_ref().is_some_and(ClusterPieces::merges) {
            MergePlace::Elsewhere
        } else {
            MergePlace::Node
        },
    };
    let (mut proto, membership_pass) = match input {
        PsiInput::Items(items) => {
            let digest = items_digest(&items);
            (
                PsiProtocol::start(cfg, JobKey::generate(), items),
                MembershipPass::Reread(digest),
            )
        }
        PsiInput::Spilled(key, mut own, _) => {
            let pass = match (own.take_tag_key(), sealing_key(&job.permit.dataset)?) {
                (Some(tag_key), _) => MembershipPass::ByTags(tag_key, loaded.rows_read),
                (None, Some(sealing)) if job.permit.i_learn_membership => {
                    MembershipPass::PointsOnExecutors(Box::new(PassAgain {
                        key: copy_key(&key)?,
                        sealing,
                        rows_read: loaded.rows_read,
                    }))
                }
                (None, _) => MembershipPass::CountOnly,
            };
            (PsiProtocol::start_spilled(cfg, key, own), pass)
        }
        PsiInput::Blinded(own) => {
            // The session gets a copy of the key and points; the membership pass keeps these.
            let key = copy_key(&own.key)?;
            let proto = PsiProtocol::start_blinded(cfg, key, own.points.clone());
            (proto, MembershipPass::OnExecutors(own))
        }
    };
    let own_size = proto.own_size();
    let bytes = run_exchange(job, conn, send, first, &mut proto, own_size, on_cluster).await?;
    let PsiExchange {
        output,
        peer_noise,
        joint,
    } = proto
        .into_exchange()
        .ok_or_else(|| JobError::Internal("the protocol stopped early".into()))?;
    if output.spilled_bytes > 0 {
        tracing::info!(spilled_bytes = output.spilled_bytes, "spill files written");
    }
    let inputs = ReleaseInputs {
        own_noise,
        peer_noise,
        joint,
        own_size,
        bytes_to_peer: bytes,
    };
    release(job, output, inputs, membership_pass).await
}

/// With a sealing key on the dataset's cluster, the partner's points are re-blinded there too:
/// the job key the executors blinded our set with goes to them sealed once more.
async fn reblinds_for(
    job: &JobContext,
    key: Option<JobKey>,
) -> Result<Option<ClusterPieces>, NodeError> {
    let (Some(cluster), Some(key)) = (job.permit.dataset.engine.cluster.as_ref(), key) else {
        return Ok(None);
    };
    let Some(sealing) = sealing_key(&job.permit.dataset)? else {
        return Ok(None);
    };
    let reblinder = ClusterReblinder::new(cluster, &sealing, &key)
        .await
        .map_err(|reason| JobError::Compute {
            step: "re-blinding the partner's points on this node's cluster",
            reason,
        })?;
    Ok(Some(ClusterPieces::new(reblinder)))
}

/// With the job's buckets in the cluster's `shared_dir` (at `dir`), the final comparison runs
/// on the executors too.
pub(crate) async fn merges_on(
    job: &JobContext,
    pieces: ClusterPieces,
    dir: PathBuf,
) -> Result<ClusterPieces, NodeError> {
    let Some((cluster, sealing)) = sealed_cluster(job)? else {
        return Ok(pieces);
    };
    let merger = ClusterMerger::new(cluster, Arc::new(sealing), dir)
        .await
        .map_err(|reason| JobError::Compute {
            step: "comparing the points on this node's cluster",
            reason,
        })?;
    Ok(pieces.with_merger(merger))
}

/// A copy of the job key our points were blinded with before the session starts (on the
/// executors, or as they were read under a `memory_limit`): the partner's points can be
/// re-blinded off the node with it. `None` for identifiers the session blinds itself.
fn key_before_session(input: &PsiInput) -> Result<Option<JobKey>, NodeError> {
    match input {
        PsiInput::Blinded(own) => copy_key(&own.key).map(Some),
        PsiInput::Spilled(key, _, _) => copy_key(key).map(Some),
        PsiInput::Items(_) => Ok(None),
    }
}

/// A copy of a job key, for a second holder (the session and a later pass).
fn copy_key(key: &JobKey) -> Result<JobKey, NodeError> {
    JobKey::from_secret_bytes(&key.to_secret_bytes())
        .ok_or_else(|| JobError::Internal("the job key cannot be copied".into()).into())
}

/// What the release needs besides the protocol's output.
struct ReleaseInputs {
    own_noise: Option<OwnNoise>,
    peer_noise: Option<(NoiseTerm, i64)>,
    joint: ReleaseTerms,
    own_size: u64,
    bytes_to_peer: u64,
}

/// Runs a protocol's exchange over our stream and the peer's, for either role: our first
/// frames (the hello) go out before we read anything; then the peer's stream is read (the
/// responder got it with the connection, the initiator accepts it) until the protocol is
/// finished. A failure is sent to the peer as an abort (best effort, so its analyst sees the
/// same reason). Returns the bytes sent, once the peer has them all.
pub(crate) async fn run_exchange<P: Protocol>(
    job: &JobContext,
    conn: &quinn::Connection,
    send: FramedSend,
    first: Option<(FramedRecv, Envelope)>,
    proto: &mut P,
    own_size: u64,
    mut on_cluster: Option<ClusterPieces>,
) -> Result<u64, NodeError> {
    let partner = job.permit.partner.clone();
    let mut out = Outgoing::new(send, &job.job_id, Phase::PsiSize);
    let result = async {
        do_steps(job, proto, &mut out, None, on_cluster.as_mut()).await?;
        let (recv, hello) = match first {
            Some((recv, hello)) => (recv, Some(hello)),
            None => {
                let stream = conn.accept_uni().await.map_err(|e| {
                    NodeError::from(JobError::DataPlane {
                        what: format!("node '{partner}' did not open its stream"),
                        reason: e.to_string(),
                    })
                })?;
                (FramedRecv::new(stream), None)
            }
        };
        // Cap what the reader may buffer: the peer's points (as declared, within policy), ours
        // returned, and a few frames without points.
        let budget = FrameBudget::new(job.permit.max_peer_set, own_size);
        // Under a memory_limit, what waits for the protocol is bounded in memory too.
        let bound = {
            let cfg = job.state.cfg();
            cfg.memory_limit_bytes()
                .map(|limit| (ReadAhead::for_limit(limit), cfg.spill_dir()))
        };
        let mut incoming = peer_stream::read_peer(
            recv,
            job.job_id.clone(),
            hello,
            budget,
            &partner,
            bound.as_ref().map(|(ahead, dir)| (*ahead, dir.as_path())),
        )?;
        run_protocol(job, proto, &mut out, &mut incoming, on_cluster.as_mut()).await?;
        if let Some((pieces, points)) = on_cluster.as_ref().map(ClusterPieces::sent) {
            tracing::info!(
                pieces,
                points,
                "re-blinded the partner's points on the cluster, in pieces"
            );
        }
        if let Some((pieces, rows)) = on_cluster.as_ref().map(ClusterPieces::encrypted)
            && pieces > 0
        {
            tracing::info!(pieces, rows, "encrypted our rows on the cluster, in pieces");
        }
        if on_cluster.as_ref().is_some_and(ClusterPieces::merged) {
            tracing::info!("compared the points on the cluster, bucket by bucket");
        }
        if incoming.read_back() > 0 {
            tracing::info!(
                read_ahead_bytes = incoming.read_back(),
                "the peer's frames waited in a spill file"
            );
        }
        Ok::<(), NodeError>(())
    }
    .await;
    if let Err(e) = &result {
        let _ = out
            .frame(
                Phase::PsiDone,
                Body::Abort(Abort {
                    reason: e.to_string(),
                }),
            )
            .await;
    }
    result?;
    // Wait until the peer has everything we sent before the connection is closed.
    let _ = tokio::time::timeout(Duration::from_secs(10), out.send.stopped()).await;
    Ok(out.bytes)
}

/// Does what the protocol asks until it asks for nothing more: sends, re-checks, audits, CPU
/// work (its result handed back), charges.
async fn do_steps<P: Protocol>(
    job: &JobContext,
    proto: &mut P,
    out: &mut Outgoing,
    mut incoming: Option<&mut PeerFrames>,
    mut on_cluster: Option<&mut ClusterPieces>,
) -> Result<(), NodeError> {
    while let Some(step) = proto.next_step() {
        match step {
            Step::Send(env) => out.send_env(&env).await?,
            Step::Reblind(piece) => match on_cluster.as_deref_mut() {
                Some(on_cluster) => on_cluster.start(piece),
                None => {
                    return Err(JobError::Internal(
                        "the protocol handed out points to re-blind, and this job has no cluster"
                            .into(),
                    )
                    .into());
                }
            },
            Step::Encrypt(piece) => match on_cluster.as_deref_mut() {
                Some(pieces) => pieces.start_encrypt(piece)?,
                None => {
                    return Err(JobError::Internal(
                        "the protocol handed out rows to encrypt, and this job has no cluster"
                            .into(),
                    )
                    .into());
                }
            },
            Step::Merge(request) => match on_cluster.as_deref_mut() {
                Some(pieces) => pieces.start_merge(request)?,
                None => {
                    return Err(JobError::Internal(
                        "the protocol handed out its buckets to merge, and this job has no \
                         cluster"
                            .into(),
                    )
                    .into());
                }
            },
            Step::Recheck => job.recheck()?,
            Step::Audit(event) => {
                job.audit(event)?;
            }
            Step::Compute(work) => {
                let done = blocking(move || P::run(work)).await?;
                proto.handle_done(done)?;
                // Pieces that came back from the cluster meanwhile.
                if let Some(on_cluster) = on_cluster.as_deref_mut() {
                    while let Some(back) = on_cluster.try_next() {
                        take_back(proto, back?)?;
                    }
                }
                // What arrived meanwhile, so a protocol that can choose its next work from it
                // does (PSI's streaming exchange). Only up to a short backlog: the rest waits
                // in the queue, whose memory is bounded.
                if P::TAKES_FRAMES_BETWEEN_WORK
                    && !proto.waits_for_pieces()
                    && let Some(incoming) = incoming.as_deref_mut()
                {
                    while proto.backlog() < FRAMES_BETWEEN_WORK {
                        let Some(env) = incoming.try_next()? else {
                            break;
                        };
                        proto.handle(env)?;
                    }
                }
            }
            Step::Charge(request) => {
                let (noise, charged) = charge_and_draw(
                    &job.state,
                    &job.permit,
                    &job.job_id,
                    &job.spec,
                    request,
                    |e| JobError::Noise(e).into(),
                )
                .await?;
                proto.handle_noise(noise, charged)?;
            }
            Step::Finish => out.send.finish()?,
        }
    }
    Ok(())
}

/// Runs a protocol to its end: does what it asks, and feeds it the peer's frames (each within
/// the silence it allows) and the results of its CPU work.
async fn run_protocol<P: Protocol>(
    job: &JobContext,
    proto: &mut P,
    out: &mut Outgoing,
    incoming: &mut PeerFrames,
    mut on_cluster: Option<&mut ClusterPieces>,
) -> Result<(), NodeError> {
    loop {
        do_steps(
            job,
            proto,
            out,
            Some(&mut *incoming),
            on_cluster.as_deref_mut(),
        )
        .await?;
        if proto.is_finished() {
            return Ok(());
        }
        let silence = proto.silence_allowed();
        match on_cluster.as_deref_mut().filter(|r| r.busy()) {
            Some(on_cluster) if proto.waits_for_pieces() => {
                take_back(proto, on_cluster.next().await?)?
            }
            // The peer's next frame or a piece back from the cluster, whichever comes first.
            Some(on_cluster) => tokio::select! {
                env = incoming.next(silence) => proto.handle(env?)?,
                back = on_cluster.next() => take_back(proto, back?)?,
            },
            None => {
                let env = incoming.next(silence).await?;
                proto.handle(env)?;
            }
        }
    }
}

/// Hands a piece back from the cluster to the protocol that handed it out.
fn take_back<P: Protocol>(proto: &mut P, back: PieceBack) -> Result<(), JobError> {
    match back {
        PieceBack::Reblinded(offset, result) => proto.handle_reblinded(offset, result),
        PieceBack::Encrypted(offset, result) => proto.handle_encrypted(offset, result),
        PieceBack::Merged(answers) => proto.handle_merged(answers),
    }
}

/// Draws this node's noise for a [`NoiseRequest`], charging the ledger first in the same
/// transaction if the release is noised and this node's own entry sets ε (the draw is not
/// kept; a release key charged before is refused: the data under a repeated offer may have
/// changed). Returns the draw and whether the ledger was charged; a draw that fails outside a
/// charge is `draw_failed`'s error.
pub(crate) async fn charge_and_draw(
    state: &Arc<NodeState>,
    permit: &Permit,
    job_id: &str,
    spec: &JobSpec,
    request: NoiseRequest,
    draw_failed: fn(String) -> NodeError,
) -> Result<(Vec<i64>, bool), NodeError> {
    let cfg = state.cfg();
    let NoiseRequest { loss, draw } = request;
    let charge = match (loss, permit.charge(job_id, &cfg)) {
        (Some(loss), Some(mut charge)) => {
            charge.loss = loss;
            Some(charge)
        }
        _ => None,
    };
    let Some(charge) = charge else {
        return blocking(draw)
            .await?
            .map(|noise| (noise, false))
            .map_err(draw_failed);
    };
    let state = state.clone();
    let key = crate::spec::release_key(job_id, spec);
    let loss = charge.loss;
    let drawn = blocking(move || state.ledger.charge_and_draw(&key, &charge, now_ms(), draw))
        .await?
        .map_err(|e| NodeError::from(JobError::Refused(crate::state::budget_veto(&cfg.name, e))))?;
    tracing::info!(%loss, "privacy budget charged for a noised release");
    Ok((drawn, true))
}

/// What may be released to the coordinator: the count (with both parties' noise, if any),
/// unless either agreement withholds it (below the joint minimum result, or counts not allowed
/// to the coordinator). Audited, and settled in the ledger if it was charged; a `match` writes
/// its membership file.
async fn release(
    job: &JobContext,
    output: cleanroom_circuits::PsiOutput,
    inputs: ReleaseInputs,
    membership_pass: MembershipPass,
) -> Result<PsiOutcome, NodeError> {
    let ReleaseInputs {
        own_noise,
        peer_noise,
        joint,
        own_size,
        bytes_to_peer,
    } = inputs;
    let partner = job.permit.partner.clone();
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
        bytes_to_peer,
    };
    // Membership is the result itself: under the joint threshold it is withheld here too (an
    // honest node writes none; a deviating one could compute it, see docs/SECURITY.md). Its row
    // count gives the count away, so only a released count lets it be reported.
    if let (true, Some(indices)) = (job.spec.kind == JobKind::Match as i32, output.membership) {
        if output.intersection >= joint.min_result {
            let matched = Matched {
                indices,
                spilled: output.spilled_matches,
            };
            let (rows, path) = write_membership(job, matched, own_size, membership_pass).await?;
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
    .map_err(|e| NodeError::from(JobError::Refused(crate::state::budget_veto(&cfg.name, e))))?;
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
            NodeError::from(JobError::Ledger {
                node: job.my_name.clone(),
            })
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

/// What the session matched: its indices, and a spilled session's tags or points.
struct Matched {
    indices: Vec<u32>,
    spilled: Option<SpilledMatches>,
}

/// Maps matched item indices back to row numbers and writes them to the node's state dir.
/// Row numbers, never identifiers: the file is safe to hand to the partner's own systems.
async fn write_membership(
    job: &JobContext,
    Matched { indices, spilled }: Matched,
    own_size: u64,
    pass: MembershipPass,
) -> Result<(u64, PathBuf), NodeError> {
    let dataset = job.permit.dataset.clone();
    let keys = job.permit.keys.clone();
    let consent = job.permit.consent_column.clone();
    let forgotten = job.forgotten()?;
    let dir = job.state_dir.join("results");
    let path = dir.join(format!("{}-membership.csv", job.job_id));
    let out = path.clone();
    blocking(move || -> Result<u64, NodeError> {
        let filter = RowFilter {
            consent_column: consent.as_deref(),
            forgotten: forgotten.as_ref(),
        };
        let rows = match (pass, spilled) {
            (MembershipPass::OnExecutors(own), _) => {
                let mut matched = Vec::with_capacity(indices.len());
                for i in indices {
                    let point = own.points.get(i as usize).ok_or_else(|| {
                        JobError::Internal("membership index out of range".into())
                    })?;
                    matched.push(*point);
                }
                // Sorted already: sorted indices into sorted points.
                let pass = PassAgain {
                    key: own.key,
                    sealing: own.sealing,
                    rows_read: own.rows_read,
                };
                rows_on_executors(&dataset, &keys, filter, &matched, &pass)?
            }
            (MembershipPass::PointsOnExecutors(pass), Some(SpilledMatches::Points(matched))) => {
                rows_on_executors(&dataset, &keys, filter, &matched, &pass)?
            }
            (MembershipPass::Reread(digest), _) => {
                reread_rows(&dataset, &keys, filter, indices, (own_size, digest))?
            }
            (MembershipPass::ByTags(tag_key, rows_read), Some(SpilledMatches::Tags(tags))) => {
                rows_by_tags(&dataset, &keys, filter, &tags, &tag_key, rows_read)?
            }
            (MembershipPass::CountOnly, _) => {
                return Err(JobError::Internal("a count-only job has no membership".into()).into());
            }
            (MembershipPass::ByTags(..) | MembershipPass::PointsOnExecutors(_), _) => {
                return Err(JobError::Internal(
                    "a spilled session gave no tags or points of its matches".into(),
                )
                .into());
            }
        };
        write_rows(&dir, &out, &rows)?;
        Ok(rows.len() as u64)
    })
    .await?
    .map(|rows| (rows, path))
}

/// The rows of the matched points (sorted): the executors' pass again, with the job's key. A
/// dataset whose row count changed, or in which a matched point is no longer found, changed.
fn rows_on_executors(
    dataset: &crate::data::schema::DatasetConfig,
    keys: &dataset::KeySpec,
    filter: RowFilter<'_>,
    matched: &[EncodedPoint],
    pass: &PassAgain,
) -> Result<Vec<u64>, NodeError> {
    // Row numbers need the rows in file order.
    let (rows, counts, found) = dataset::matching_rows_on_cluster(
        &dataset.in_file_order(),
        keys,
        filter,
        MAX_ROWS,
        &pass.key,
        &pass.sealing,
        matched,
    )
    .map_err(|e| NodeError::from(JobError::Dataset(e.to_string())))?;
    if counts.rows_read != pass.rows_read || found != matched.len() {
        return Err(JobError::DatasetChanged.into());
    }
    Ok(rows)
}

/// The rows of the matched tags: the dataset read again in file order, each key tagged. A
/// dataset whose row count changed, or in which a matched tag is no longer found, changed.
fn rows_by_tags(
    dataset: &crate::data::schema::DatasetConfig,
    keys: &dataset::KeySpec,
    filter: RowFilter<'_>,
    tags: &[ItemTag],
    tag_key: &TagKey,
    rows_read: u64,
) -> Result<Vec<u64>, NodeError> {
    let mut found = vec![false; tags.len()];
    let (rows, counts) =
        dataset::matching_rows_where(&dataset.in_file_order(), keys, filter, |key| {
            match tags.binary_search(&tag_key.tag(key)) {
                Ok(i) => {
                    found[i] = true;
                    true
                }
                Err(_) => false,
            }
        })
        .map_err(|e| NodeError::from(JobError::Dataset(e.to_string())))?;
    if counts.rows_read != rows_read || found.contains(&false) {
        return Err(JobError::DatasetChanged.into());
    }
    Ok(rows)
}

/// A digest of a deduplicated, sorted item set: each item with its length, in order. Kept in
/// memory for the job only (it is a function of raw identifiers).
type ItemsDigest = [u8; 32];

fn items_digest(items: &ItemSet) -> ItemsDigest {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update((items.len() as u64).to_le_bytes());
    for item in items.iter() {
        hash.update((item.len() as u64).to_le_bytes());
        hash.update(item);
    }
    hash.finalize().into()
}

/// The rows of the matched keys: the dataset read again. The same data dedups to the same
/// sorted order, so the indices the protocol returned map to the same keys. A changed dataset
/// is detected by its set: its size, then its digest (`first`: both from the first read). A
/// record replaced by another keeps the size but not the digest.
fn reread_rows(
    dataset: &crate::data::schema::DatasetConfig,
    keys: &dataset::KeySpec,
    filter: RowFilter<'_>,
    indices: Vec<u32>,
    first: (u64, ItemsDigest),
) -> Result<Vec<u64>, NodeError> {
    let loaded = dataset::load_keys_for(dataset, keys, filter, MAX_ROWS)
        .map_err(|e| NodeError::from(JobError::Dataset(e.to_string())))?;
    if (loaded.items.len() as u64, items_digest(&loaded.items)) != first {
        return Err(JobError::DatasetChanged.into());
    }
    let mut matched = cleanroom_circuits::ItemSet::new();
    for i in indices {
        let item = loaded
            .items
            .get(i as usize)
            .ok_or_else(|| JobError::Internal("membership index out of range".into()))?;
        matched
            .push(item)
            .map_err(|e| JobError::Internal(e.to_string()))?;
    }
    matched.dedup();
    // Row numbers need the rows in file order.
    dataset::matching_rows_for(&dataset.in_file_order(), keys, filter, &matched)
        .map_err(|e| NodeError::from(JobError::Dataset(e.to_string())))
}

/// Writes the membership file: a header, then one row number a line.
fn write_rows(dir: &std::path::Path, out: &std::path::Path, rows: &[u64]) -> Result<(), NodeError> {
    std::fs::create_dir_all(dir).map_err(|e| NodeError::Io {
        what: format!("creating {}", dir.display()),
        source: e,
    })?;
    let mut text = String::from("row\n");
    for r in rows {
        text.push_str(&r.to_string());
        text.push('\n');
    }
    std::fs::write(out, text).map_err(|e| NodeError::Io {
        what: format!("writing {}", out.display()),
        source: e,
    })
}

pub(crate) fn violation(partner: &str, reason: impl std::fmt::Display) -> NodeError {
    NodeError::Protocol {
        peer: format!("node '{partner}'"),
        reason: reason.to_string(),
    }
}

/// Our stream to the peer: frames stamped and numbered by an [`Outbox`], and the bytes sent.
pub(crate) struct Outgoing {
    pub(crate) send: FramedSend,
    outbox: Outbox,
    /// Bytes sent so far (framed).
    pub(crate) bytes: u64,
}

impl Outgoing {
    /// A stream to the peer for `job_id`, starting in `phase`.
    pub(crate) fn new(send: FramedSend, job_id: &str, phase: Phase) -> Outgoing {
        Outgoing {
            send,
            outbox: Outbox::new(job_id, phase),
            bytes: 0,
        }
    }

    /// Sends a frame as it is.
    pub(crate) async fn send_env(&mut self, env: &Envelope) -> Result<(), NodeError> {
        // The frame's length prefix and body.
        self.bytes += 4 + env.encoded_len() as u64;
        Ok(self.send.send(env).await?)
    }

    pub(crate) async fn frame(&mut self, phase: Phase, body: Body) -> Result<(), NodeError> {
        let env = self.outbox.frame(phase, body);
        self.send_env(&env).await
    }
}

/// Resolves when the coordinator's side of a job stream ends or sends anything: it sends
/// nothing after Start, so either means it has given the job up.
pub(crate) async fn wait_for_withdrawal(recv: &mut FramedRecv) {
    let _ = recv.recv().await;
}

/// Runs CPU work on the blocking pool, turning a panic into a job error.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| JobError::Internal(e.to_string()).into())
}
