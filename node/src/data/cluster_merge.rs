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
//! What travels: the job directory's path, the merge's kind, the bucket and the sizes of its
//! two files as the node sees them, sealed (only a holder of the sealing key makes an executor
//! read a job's files, and only a job's: a directory not named like one is refused). An
//! executor that reads other sizes (another directory at that path, or writes not yet visible
//! there) fails the piece rather than answer wrong. The files hold blinded points and places, never an
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
            .map(|b| BucketSpec::of(merge, b, &self.dir)?.seal(&self.sealing))
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

/// Records a piece merges at least, when the set has that many: a cluster job costs a fixed
/// part of a second, so a small set is merged in one piece.
const PIECE_RECORDS: u64 = 1 << 20;

/// Buckets in one piece: enough for [`PIECE_RECORDS`] records, or all of them spread over the
/// pieces out at once if that is more; and for places no more than the buckets' caps let fit
/// in [`PIECE_OUTPUT_BYTES`].
fn buckets_per_piece(merge: Merge, first_size: u64, in_flight: usize) -> usize {
    let spread = BUCKETS.div_ceil(in_flight.max(1));
    let enough = PIECE_RECORDS
        .saturating_mul(BUCKETS as u64)
        .div_ceil(first_size.max(1));
    let enough = usize::try_from(enough).unwrap_or(BUCKETS).min(BUCKETS);
    let fit = match merge {
        Merge::Count => BUCKETS,
        // Every place of the set fits at once.
        Merge::OurPlaces | Merge::PeerPlaces
            if first_size.saturating_mul(4) <= PIECE_OUTPUT_BYTES =>
        {
            BUCKETS
        }
        Merge::OurPlaces | Merge::PeerPlaces => {
            let bucket_bytes = bucket_cap(first_size).saturating_mul(4).max(1);
            usize::try_from(PIECE_OUTPUT_BYTES / bucket_bytes).unwrap_or(BUCKETS)
        }
    };
    spread.max(enough).min(fit).max(1)
}

/// What an executor merges: one bucket of one job, and how many bytes the node wrote to each
/// of its two files.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BucketSpec {
    merge: Merge,
    bucket: usize,
    /// The bytes of the bucket's files of [`Merge::sets`], in that order, as the node sees them.
    sizes: [u64; 2],
    dir: PathBuf,
}

impl BucketSpec {
    /// Bucket `bucket` of the job whose files are in `dir`, the files' sizes read here.
    fn of(merge: Merge, bucket: usize, dir: &Path) -> Result<BucketSpec, String> {
        let (first, second) = merge.sets();
        let size = |set| match std::fs::metadata(bucket_path(dir, set, bucket)) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(format!("cannot read the size of a bucket file: {e}")),
        };
        Ok(BucketSpec {
            merge,
            bucket,
            sizes: [size(first)?, size(second)?],
            dir: dir.to_path_buf(),
        })
    }

    /// `version ‖ merge ‖ bucket (u16) ‖ sizes (2 × u64) ‖ directory`, sealed.
    fn seal(&self, sealing: &SealingKey) -> Result<Vec<u8>, String> {
        let dir = self
            .dir
            .to_str()
            .ok_or_else(|| format!("{} is not UTF-8", self.dir.display()))?;
        let bucket = u16::try_from(self.bucket).map_err(|_| "a bucket past the sets".to_owned())?;
        let mut plain = Vec::with_capacity(20 + dir.len());
        plain.push(SPEC_VERSION);
        plain.push(self.merge.code());
        plain.extend_from_slice(&bucket.to_le_bytes());
        for size in self.sizes {
            plain.extend_from_slice(&size.to_le_bytes());
        }
        plain.extend_from_slice(dir.as_bytes());
        sealing.seal(AAD, &plain)
    }

    /// The spec sealed in `sealed`. Errors say what to fix.
    fn open(sealing: &SealingKey, sealed: &[u8]) -> Result<BucketSpec, String> {
        let plain = sealing.open(AAD, sealed).ok_or(
            "the spec does not open with this executor's sealing key (the node's \
             engine.sealing_key and the executor's --sealing-key must be the same key)",
        )?;
        let [version, code, rest @ ..] = plain.as_slice() else {
            return Err("the spec is too short".into());
        };
        if *version != SPEC_VERSION {
            return Err(
                "the spec is not one this executor reads (a node of another version?)".into(),
            );
        }
        let merge = Merge::from_code(*code).ok_or("the spec names no merge this executor knows")?;
        let (bucket, rest) = rest
            .split_first_chunk::<2>()
            .ok_or("the spec is too short")?;
        let bucket = usize::from(u16::from_le_bytes(*bucket));
        if bucket >= BUCKETS {
            return Err("the spec names a bucket past the sets".into());
        }
        let (first, rest) = rest
            .split_first_chunk::<8>()
            .ok_or("the spec is too short")?;
        let (second, dir) = rest
            .split_first_chunk::<8>()
            .ok_or("the spec is too short")?;
        let dir = PathBuf::from(
            std::str::from_utf8(dir).map_err(|_| "the spec's directory is not UTF-8")?,
        );
        if !dir.is_absolute() || !is_job_dir(&dir) {
            return Err(format!(
                "{} is not a job's bucket directory (is the node's engine.shared_dir mounted at \
                 the same path here?)",
                dir.display()
            ));
        }
        Ok(BucketSpec {
            merge,
            bucket,
            sizes: [u64::from_le_bytes(*first), u64::from_le_bytes(*second)],
            dir,
        })
    }

    /// The bytes of the bucket's file of `set`, which must be as many as the node wrote: fewer
    /// or more would mean this executor sees another directory, or not all of the node's
    /// writes, and would give a wrong answer.
    fn read(&self, set: PointSet, expected: u64) -> Result<Vec<u8>, String> {
        let path = bucket_path(&self.dir, set, self.bucket);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(format!(
                    "cannot read {} (is the node's engine.shared_dir mounted at the same path \
                     here?): {e}",
                    path.display()
                ));
            }
        };
        if bytes.len() as u64 != expected {
            return Err(format!(
                "{} holds {} bytes here where the node wrote {expected} (is the node's \
                 engine.shared_dir the same directory on this executor, and are the node's \
                 writes visible here?)",
                path.display(),
                bytes.len()
            ));
        }
        Ok(bytes)
    }
}

/// An executor's answer for one sealed spec: `bucket (u16) ‖ status ‖ payload`.
fn merge_row(sealing: &SealingKey, sealed: &[u8]) -> Result<Vec<u8>, String> {
    let spec = BucketSpec::open(sealing, sealed)?;
    let (merge, bucket) = (spec.merge, spec.bucket);
    let (first_set, second_set) = merge.sets();
    let mut first = spec.read(first_set, spec.sizes[0])?;
    let mut second = spec.read(second_set, spec.sizes[1])?;
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
            let spec = BucketSpec::of(merge, b, dir)
                .and_then(|spec| spec.seal(sealing))
                .map_err(MergeFailure::Cluster)?;
            let answer = merge_row(sealing, &spec).map_err(MergeFailure::Cluster)?;
            decode_answer(merge, b, &answer)
        })
        .collect()
}

#[cfg(test)]
#[path = "cluster_merge_tests.rs"]
mod tests;
