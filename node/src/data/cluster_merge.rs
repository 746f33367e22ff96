//! A spilled session's final comparison on this node's own Ballista executors.
//!
//! A spilled session keeps the sets it compares in 256 buckets by one byte of each point
//! ([`cleanroom_circuits::spill`]); the comparison is one independent merge per bucket
//! ([`merge_bucket`]). When the job's bucket files are in a directory every executor sees at the
//! same path (the cluster's `shared_dir`), the node hands the merges to its executors
//! ([`ClusterMerger::merge`]) instead of running them itself. Each piece is one job whose plan
//! has one row per bucket: `cleanroom_merge(sealed bucket spec)` over
//! `VALUES ('<sealed spec in hex>'), …`. An executor opens a spec, reads the bucket's two files
//! from the job's directory, merges them and answers the bucket's count or the places of its
//! matches (4 bytes a match).
//!
//! What travels: the job directory's path, the merge's kind and the bucket, sealed (only a
//! holder of the sealing key makes an executor read a job's files, and only a job's: a
//! directory not named like one is refused). The files hold blinded points and places, never an
//! identifier or a key (see [`crate::job::spill`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cleanroom_circuits::PsiError;
use cleanroom_circuits::spill::{
    BUCKETS, BucketMatches, Merge, PointSet, bucket_cap, merge_bucket,
};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder};
use datafusion::prelude::{Expr, SessionContext, col, lit};
use futures::{StreamExt, TryStreamExt};

use super::cluster_job;
use super::cluster_pass::{OpenerRef, SealingKey};
use super::schema::Cluster;
use super::source::frame::redact;
use crate::job::spill::{bucket_path, is_job_dir};

/// The function's name in plans (the executors' and the scheduler's registries).
pub const UDF_NAME: &str = "cleanroom_merge";

/// Binds a sealed spec to this use: no other function's spec opens here, nor this one there.
const AAD: &[u8] = b"cleanroom executor merge v1";

/// The spec's encoding version.
const SPEC_VERSION: u8 = 1;

/// A piece's answers at most, by the buckets' caps: one Flight message, well under its 16 MiB.
const PIECE_OUTPUT_BYTES: u64 = 4 << 20;

/// An answer's status byte.
const COUNT: u8 = 0;
const PLACES: u8 = 1;
const PEER_POINT_TWICE: u8 = 2;
const RETURNED_POINT_TWICE: u8 = 3;

/// Why the merge on the cluster gave no answer.
#[derive(Debug)]
pub enum MergeFailure {
    /// A bucket held a point twice: the partner's doing.
    Peer(PsiError),
    /// The cluster's error (redacted), or an answer this node cannot use.
    Cluster(String),
}

/// One job's merges on the cluster: its scheduler, and the job's bucket directory.
pub struct ClusterMerger {
    url: String,
    ctx: SessionContext,
    sealing: Arc<SealingKey>,
    dir: PathBuf,
    /// Pieces the node has out at once: the cluster's `partitions`.
    pieces_in_flight: usize,
}

impl std::fmt::Debug for ClusterMerger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterMerger")
            .field("url", &self.url)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl ClusterMerger {
    /// Merges for the job whose bucket files are in `dir` (under the cluster's `shared_dir`).
    /// Nothing is sent yet.
    pub async fn new(
        cluster: &Cluster,
        sealing: Arc<SealingKey>,
        dir: PathBuf,
    ) -> Result<ClusterMerger, String> {
        if !dir.is_absolute() || !is_job_dir(&dir) {
            return Err(format!(
                "{} is not a job's bucket directory under the cluster's shared_dir",
                dir.display()
            ));
        }
        let ctx = cluster_job::session(cluster).await?;
        Ok(ClusterMerger {
            url: cluster.url.clone(),
            ctx,
            sealing,
            dir,
            pieces_in_flight: cluster.partitions.max(1),
        })
    }

    /// Every bucket's answer to `merge`, in bucket order. `first_size`: how many records the
    /// merge's first set may hold (its stream's size), which bounds a bucket's answer.
    pub async fn merge(
        &self,
        merge: Merge,
        first_size: u64,
    ) -> Result<Vec<BucketMatches>, MergeFailure> {
        let per_piece = buckets_per_piece(merge, first_size, self.pieces_in_flight);
        let starts: Vec<usize> = (0..BUCKETS).step_by(per_piece).collect();
        let pieces = futures::stream::iter(starts)
            .map(|start| self.piece(merge, start..(start + per_piece).min(BUCKETS)))
            .buffered(self.pieces_in_flight);
        let answers: Vec<Vec<BucketMatches>> = pieces.try_collect().await?;
        Ok(answers.into_iter().flatten().collect())
    }

    /// The answers for `buckets`, from one job on the cluster.
    async fn piece(
        &self,
        merge: Merge,
        buckets: std::ops::Range<usize>,
    ) -> Result<Vec<BucketMatches>, MergeFailure> {
        let cluster = |e: DataFusionError| MergeFailure::Cluster(redact(&e.to_string()));
        let specs = buckets
            .clone()
            .map(|b| seal_spec(&self.sealing, merge, b, &self.dir))
            .collect::<Result<Vec<_>, _>>()
            .map_err(MergeFailure::Cluster)?;
        let plan = piece_plan(&specs).map_err(cluster)?;
        let values = cluster_job::values(&self.ctx, &self.url, plan)
            .await
            .map_err(cluster)?;
        if values.len() != buckets.len() {
            return Err(MergeFailure::Cluster(format!(
                "the cluster answered {} of {} buckets",
                values.len(),
                buckets.len()
            )));
        }
        buckets
            .zip(values)
            .map(|(b, value)| match value {
                Some(bytes) => decode_answer(merge, b, &bytes),
                None => Err(MergeFailure::Cluster(format!(
                    "the cluster answered nothing for bucket {b}"
                ))),
            })
            .collect()
    }
}

/// Buckets in one piece: all of them spread over the pieces out at once, and for places no
/// more than the buckets' caps let fit in [`PIECE_OUTPUT_BYTES`].
fn buckets_per_piece(merge: Merge, first_size: u64, in_flight: usize) -> usize {
    let spread = BUCKETS.div_ceil(in_flight.max(1));
    let fit = match merge {
        Merge::Count => BUCKETS,
        Merge::OurPlaces | Merge::PeerPlaces => {
            let bucket_bytes = bucket_cap(first_size).saturating_mul(4).max(1);
            usize::try_from(PIECE_OUTPUT_BYTES / bucket_bytes).unwrap_or(BUCKETS)
        }
    };
    spread.min(fit).max(1)
}

/// `version ‖ merge ‖ bucket (u16) ‖ directory`, sealed.
fn seal_spec(
    sealing: &SealingKey,
    merge: Merge,
    bucket: usize,
    dir: &Path,
) -> Result<Vec<u8>, String> {
    let dir = dir
        .to_str()
        .ok_or_else(|| format!("{} is not UTF-8", dir.display()))?;
    let bucket = u16::try_from(bucket).map_err(|_| "a bucket past the sets".to_owned())?;
    let mut plain = Vec::with_capacity(4 + dir.len());
    plain.push(SPEC_VERSION);
    plain.push(merge.code());
    plain.extend_from_slice(&bucket.to_le_bytes());
    plain.extend_from_slice(dir.as_bytes());
    sealing.seal(AAD, &plain)
}

/// The merge, bucket and directory sealed in `sealed`. Errors say what to fix.
fn open_spec(sealing: &SealingKey, sealed: &[u8]) -> Result<(Merge, usize, PathBuf), String> {
    let plain = sealing.open(AAD, sealed).ok_or(
        "the spec does not open with this executor's sealing key (the node's \
         engine.sealing_key and the executor's --sealing-key must be the same key)",
    )?;
    let [version, code, b0, b1, dir @ ..] = plain.as_slice() else {
        return Err("the spec is too short".into());
    };
    if *version != SPEC_VERSION {
        return Err("the spec is not one this executor reads (a node of another version?)".into());
    }
    let merge = Merge::from_code(*code).ok_or("the spec names no merge this executor knows")?;
    let bucket = usize::from(u16::from_le_bytes([*b0, *b1]));
    if bucket >= BUCKETS {
        return Err("the spec names a bucket past the sets".into());
    }
    let dir =
        PathBuf::from(std::str::from_utf8(dir).map_err(|_| "the spec's directory is not UTF-8")?);
    if !dir.is_absolute() || !is_job_dir(&dir) {
        return Err(format!(
            "{} is not a job's bucket directory (is the node's engine.shared_dir mounted at the \
             same path here?)",
            dir.display()
        ));
    }
    Ok((merge, bucket, dir))
}

/// A bucket file's bytes; a file never written is an empty bucket.
fn read_bucket(dir: &Path, set: PointSet, bucket: usize) -> Result<Vec<u8>, String> {
    let path = bucket_path(dir, set, bucket);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!(
            "cannot read {} (is the node's engine.shared_dir mounted at the same path here?): {e}",
            path.display()
        )),
    }
}

/// An executor's answer for one sealed spec: `bucket (u16) ‖ status ‖ payload`.
fn merge_row(sealing: &SealingKey, sealed: &[u8]) -> Result<Vec<u8>, String> {
    let (merge, bucket, dir) = open_spec(sealing, sealed)?;
    let (first_set, second_set) = merge.sets();
    let mut first = read_bucket(&dir, first_set, bucket)?;
    let mut second = read_bucket(&dir, second_set, bucket)?;
    // Fits: checked under BUCKETS.
    let mut out = (bucket as u16).to_le_bytes().to_vec();
    match merge_bucket(merge, &mut first, &mut second) {
        Ok(BucketMatches::Count(n)) => {
            out.push(COUNT);
            out.extend_from_slice(&n.to_le_bytes());
        }
        Ok(BucketMatches::Places(places)) => {
            out.push(PLACES);
            out.reserve(places.len() * 4);
            for p in places {
                out.extend_from_slice(&p.to_le_bytes());
            }
        }
        Err(PsiError::DuplicatePeerPoint) => out.push(PEER_POINT_TWICE),
        Err(PsiError::DuplicateReturnedPoint) => out.push(RETURNED_POINT_TWICE),
        Err(e) => return Err(format!("bucket {bucket}: {e}")),
    }
    Ok(out)
}

/// An answer for `bucket` decoded: what it found, or the partner's fault it found.
fn decode_answer(merge: Merge, bucket: usize, bytes: &[u8]) -> Result<BucketMatches, MergeFailure> {
    let wrong = |what: &str| {
        MergeFailure::Cluster(format!("an executor's answer for bucket {bucket} {what}"))
    };
    let [b0, b1, status, payload @ ..] = bytes else {
        return Err(wrong("is too short"));
    };
    if usize::from(u16::from_le_bytes([*b0, *b1])) != bucket {
        return Err(wrong("names another bucket"));
    }
    match (*status, merge) {
        (COUNT, Merge::Count) => {
            let n: [u8; 8] = payload.try_into().map_err(|_| wrong("is not one count"))?;
            Ok(BucketMatches::Count(u64::from_le_bytes(n)))
        }
        (PLACES, Merge::OurPlaces | Merge::PeerPlaces) => {
            let (places, rest) = payload.as_chunks::<4>();
            if !rest.is_empty() {
                return Err(wrong("is not whole places"));
            }
            Ok(BucketMatches::Places(
                places.iter().map(|p| u32::from_le_bytes(*p)).collect(),
            ))
        }
        (PEER_POINT_TWICE, _) => Err(MergeFailure::Peer(PsiError::DuplicatePeerPoint)),
        (RETURNED_POINT_TWICE, _) => Err(MergeFailure::Peer(PsiError::DuplicateReturnedPoint)),
        _ => Err(wrong("is not of the merge asked for")),
    }
}

/// One piece's plan: a row per bucket, its sealed spec in hex, and the function over it.
fn piece_plan(specs: &[Vec<u8>]) -> datafusion::error::Result<LogicalPlan> {
    let rows = specs
        .iter()
        .map(|s| vec![lit(ScalarValue::Utf8(Some(hex::encode(s))))])
        .collect();
    let call = Expr::ScalarFunction(ScalarFunction::new_udf(
        Arc::new(MergeUdf::planner()),
        vec![col("column1")],
    ));
    LogicalPlanBuilder::values(rows)?
        .project(vec![call.alias("answers")])?
        .build()
}

/// The merging function. The node and the scheduler hold it without a key (to plan and to
/// decode plans); an executor holds the [`SealingKey`] and runs it.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct MergeUdf {
    signature: Signature,
    key: Option<OpenerRef>,
}

impl MergeUdf {
    /// The function as the node and the scheduler hold it: it plans, it never runs.
    pub fn planner() -> ScalarUDF {
        Self::with(None)
    }

    /// The function as an executor holds it, with the key it opens specs with.
    pub fn executor(key: Arc<SealingKey>) -> ScalarUDF {
        Self::with(Some(key))
    }

    fn with(key: Option<Arc<SealingKey>>) -> ScalarUDF {
        // Volatile: a call on a literal must not be folded into a constant where it is planned
        // (the node and the scheduler hold no key), and the files change between jobs.
        ScalarUDF::new_from_impl(MergeUdf {
            signature: Signature::variadic_any(Volatility::Volatile),
            key: key.map(OpenerRef),
        })
    }
}

impl ScalarUDFImpl for MergeUdf {
    fn name(&self) -> &str {
        UDF_NAME
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Binary)
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let fail = |m: &str| DataFusionError::Execution(format!("{UDF_NAME}: {m}"));
        let Some(OpenerRef(sealing)) = &self.key else {
            return Err(fail(
                "this process holds no sealing key (run it on a `cleanroom executor` started \
                 with --sealing-key)",
            ));
        };
        let [specs] = args.args.as_slice() else {
            return Err(fail("it takes one sealed spec"));
        };
        cluster_job::map_hex_rows(specs, args.number_rows, "specs", fail, |sealed| {
            merge_row(sealing, sealed).map_err(|m| fail(&m))
        })
    }
}

/// Every bucket's answer to `merge` from the job directory `dir`, as the executors give them,
/// in this process (for the protocol tests).
#[cfg(test)]
pub(crate) fn merge_in_process(
    sealing: &SealingKey,
    dir: &Path,
    merge: Merge,
) -> Result<Vec<BucketMatches>, MergeFailure> {
    (0..BUCKETS)
        .map(|b| {
            let spec = seal_spec(sealing, merge, b, dir).map_err(MergeFailure::Cluster)?;
            let answer = merge_row(sealing, &spec).map_err(MergeFailure::Cluster)?;
            decode_answer(merge, b, &answer)
        })
        .collect()
}

#[cfg(test)]
#[path = "cluster_merge_tests.rs"]
mod tests;
