//! Re-blinding the partner's points on this node's own Ballista executors.
//!
//! In an overlap or a match, the partner's points `k_peer·H(y)` reach the node in the exchange,
//! and each must be multiplied by the job key: about half of the job's curve work. With a
//! `sealing_key` on the cluster, the node hands them to its executors in pieces
//! ([`ClusterReblinder::reblind`]). Each piece is one job whose plan is one row:
//! `cleanroom_reblind(sealed key, points)` over `VALUES ('<points in hex>')`. The points travel
//! in the plan (they are in no file the executors could read), as hex text: DataFusion names an
//! expression by formatting it, several times while it plans, and text formats much faster
//! than a binary literal, whose bytes it writes out one by one in decimal. The job
//! key travels sealed, as in the dataset pass, under its own associated data, so a spec sealed
//! for one function does not open in the other.
//!
//! An executor checks each point as the node would (a ristretto255 encoding, not the identity)
//! and multiplies it by the key ([`cleanroom_circuits::reblind_points`]). The output is one
//! binary value: a status byte, then the re-blinded points, or the first bad point's index
//! within the piece ([`decode_output`]). So a partner's bad point fails its job with the same
//! reason as on the node, naming its place in the partner's stream.

use std::sync::Arc;

use cleanroom_circuits::{EncodedPoint, JobKey, POINT_LEN, PsiError, reblind_points};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::logical_expr::{LogicalPlan, LogicalPlanBuilder};
use datafusion::prelude::{Expr, SessionContext, col, lit};
use zeroize::Zeroizing;

use super::cluster_job;
use super::cluster_pass::{OpenerRef, SealingKey};
use super::schema::Cluster;
use super::source::frame::redact;

/// The function's name in plans (the executors' and the scheduler's registries).
pub const UDF_NAME: &str = "cleanroom_reblind";

/// Binds a sealed key to this use: the pass's spec does not open here, nor this one there.
const AAD: &[u8] = b"cleanroom executor reblind v1";

/// The sealed spec's encoding version.
const SPEC_VERSION: u8 = 1;

/// The output's first byte.
const OK: u8 = 0;
const INVALID_POINT: u8 = 1;
const IDENTITY_POINT: u8 = 2;

/// Why a piece could not be re-blinded.
#[derive(Debug)]
pub enum ReblindFailure {
    /// A point of the partner's is not one, or is the identity: the index is within the
    /// piece ([`PsiError::at_offset`] places it in the partner's stream).
    Peer(PsiError),
    /// The cluster failed (its message redacted) or answered what no executor writes.
    Cluster(String),
}

/// One job's re-blinding on the cluster: its scheduler and its sealed key.
pub struct ClusterReblinder {
    url: String,
    ctx: SessionContext,
    /// `version ‖ job key`, sealed under the cluster's [`SealingKey`].
    sealed: Vec<u8>,
    /// Pieces the node may have out at once: the cluster's `partitions`.
    pub pieces_in_flight: usize,
}

impl std::fmt::Debug for ClusterReblinder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterReblinder")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl ClusterReblinder {
    /// Seals the job `key` for `cluster`'s executors. Nothing is sent yet.
    pub async fn new(
        cluster: &Cluster,
        sealing: &SealingKey,
        key: &JobKey,
    ) -> Result<ClusterReblinder, String> {
        let mut plain = Zeroizing::new(Vec::with_capacity(1 + 32));
        plain.push(SPEC_VERSION);
        plain.extend_from_slice(key.to_secret_bytes().as_ref());
        let sealed = sealing.seal(AAD, &plain)?;
        let ctx = cluster_job::session(cluster).await?;
        Ok(ClusterReblinder {
            url: cluster.url.clone(),
            ctx,
            sealed,
            pieces_in_flight: cluster.partitions.max(1),
        })
    }

    /// `k·P` for each of the partner's points in `points` (concatenated encodings), computed by
    /// one executor task.
    pub async fn reblind(&self, points: Vec<u8>) -> Result<Vec<EncodedPoint>, ReblindFailure> {
        let expected = points.len() / POINT_LEN;
        let cluster = |e: DataFusionError| ReblindFailure::Cluster(redact(&e.to_string()));
        let plan = piece_plan(self.sealed.clone(), &points).map_err(cluster)?;
        drop(points);
        let Some(output) = cluster_job::one_value(&self.ctx, &self.url, plan)
            .await
            .map_err(cluster)?
        else {
            return Err(ReblindFailure::Cluster(
                "the cluster did not answer one re-blinded piece".into(),
            ));
        };
        decode_output(&output, expected)
    }
}

/// One piece's plan: one row of the points in hex, and the function over the sealed key and
/// that row.
fn piece_plan(sealed: Vec<u8>, points: &[u8]) -> datafusion::error::Result<LogicalPlan> {
    let row = lit(ScalarValue::Utf8(Some(hex::encode(points))));
    let call = Expr::ScalarFunction(ScalarFunction::new_udf(
        Arc::new(ReblindUdf::planner()),
        vec![lit(ScalarValue::Binary(Some(sealed))), col("column1")],
    ));
    LogicalPlanBuilder::values(vec![vec![row]])?
        .project(vec![call.alias("points")])?
        .build()
}

/// The points an executor's output holds (`expected` of them), or the error it reports.
pub fn decode_output(output: &[u8], expected: usize) -> Result<Vec<EncodedPoint>, ReblindFailure> {
    let malformed = || ReblindFailure::Cluster("an executor answered a piece malformed".into());
    let (&status, rest) = output.split_first().ok_or_else(malformed)?;
    let index = || -> Result<u64, ReblindFailure> {
        Ok(u64::from_le_bytes(
            rest.try_into().map_err(|_| malformed())?,
        ))
    };
    match status {
        OK => {
            let (points, tail) = rest.as_chunks::<POINT_LEN>();
            if !tail.is_empty() || points.len() != expected {
                return Err(malformed());
            }
            Ok(points.to_vec())
        }
        INVALID_POINT => Err(ReblindFailure::Peer(PsiError::InvalidPoint {
            index: index()?,
        })),
        IDENTITY_POINT => Err(ReblindFailure::Peer(PsiError::IdentityPoint {
            index: index()?,
        })),
        _ => Err(malformed()),
    }
}

/// What an executor answers for `points` under `key`: see [`decode_output`].
fn encode_output(key: &JobKey, points: &[u8]) -> Result<Vec<u8>, String> {
    match reblind_points(key, points) {
        Ok(reblinded) => {
            let mut out = Vec::with_capacity(1 + reblinded.len() * POINT_LEN);
            out.push(OK);
            out.extend_from_slice(reblinded.as_flattened());
            Ok(out)
        }
        Err(PsiError::InvalidPoint { index }) => {
            Ok([&[INVALID_POINT][..], &index.to_le_bytes()].concat())
        }
        Err(PsiError::IdentityPoint { index }) => {
            Ok([&[IDENTITY_POINT][..], &index.to_le_bytes()].concat())
        }
        Err(other) => Err(other.to_string()),
    }
}

/// The re-blinding function. The node and the scheduler hold it without a key (to plan and to
/// decode plans); an executor holds the [`SealingKey`] and runs it.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ReblindUdf {
    signature: Signature,
    key: Option<OpenerRef>,
}

impl ReblindUdf {
    /// The function as the node and the scheduler hold it: it plans, it never runs.
    pub fn planner() -> ScalarUDF {
        Self::with(None)
    }

    /// The function as an executor holds it, with the key it opens specs with.
    pub fn executor(key: Arc<SealingKey>) -> ScalarUDF {
        Self::with(Some(key))
    }

    fn with(key: Option<Arc<SealingKey>>) -> ScalarUDF {
        // Volatile: a call on two literals must not be folded into a constant where it is
        // planned (the node and the scheduler hold no key).
        ScalarUDF::new_from_impl(ReblindUdf {
            signature: Signature::variadic_any(Volatility::Volatile),
            key: key.map(OpenerRef),
        })
    }
}

impl ScalarUDFImpl for ReblindUdf {
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
        let [sealed, points] = args.args.as_slice() else {
            return Err(fail("it takes a sealed key and points"));
        };
        let ColumnarValue::Scalar(ScalarValue::Binary(Some(sealed))) = sealed else {
            return Err(fail("the first argument is not a sealed key"));
        };
        let key = open_key(sealing, sealed).map_err(|m| fail(&m))?;
        cluster_job::map_hex_rows(points, args.number_rows, "points", fail, |points| {
            encode_output(&key, points).map_err(|m| fail(&m))
        })
    }
}

/// The job key sealed in `sealed`. Errors say what to fix, never what the bytes hold.
fn open_key(sealing: &SealingKey, sealed: &[u8]) -> Result<JobKey, String> {
    let plain = sealing.open(AAD, sealed).ok_or(
        "the key does not open with this executor's sealing key (the node's \
         engine.sealing_key and the executor's --sealing-key must be the same key)",
    )?;
    let (&version, bytes) = plain.split_first().ok_or("the sealed key is empty")?;
    if version != SPEC_VERSION {
        return Err(
            "the sealed key is not one this executor reads (a node of another version?)".into(),
        );
    }
    let bytes: Zeroizing<[u8; 32]> = Zeroizing::new(
        bytes
            .try_into()
            .map_err(|_| "the sealed key has the wrong length".to_owned())?,
    );
    JobKey::from_secret_bytes(&bytes).ok_or_else(|| "the sealed key is not a key".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleanroom_circuits::hash_to_group;
    use datafusion::arrow::array::BinaryArray;

    fn sealing() -> Arc<SealingKey> {
        Arc::new(SealingKey::from_bytes(&[7; 32]).expect("a key"))
    }

    fn point(i: u32) -> EncodedPoint {
        hash_to_group("email", format!("p{i}").as_bytes())
            .compress()
            .to_bytes()
    }

    /// Runs the executor's function on one row of points, as a task would.
    fn run(
        udf: &ScalarUDF,
        sealed: Vec<u8>,
        points: Vec<u8>,
    ) -> datafusion::error::Result<Vec<u8>> {
        let args = ScalarFunctionArgs {
            args: vec![
                ColumnarValue::Scalar(ScalarValue::Binary(Some(sealed))),
                ColumnarValue::Scalar(ScalarValue::Utf8(Some(hex::encode(points)))),
            ],
            arg_fields: vec![
                Arc::new(datafusion::arrow::datatypes::Field::new(
                    "s",
                    DataType::Binary,
                    true,
                )),
                Arc::new(datafusion::arrow::datatypes::Field::new(
                    "p",
                    DataType::Utf8,
                    true,
                )),
            ],
            number_rows: 1,
            return_field: Arc::new(datafusion::arrow::datatypes::Field::new(
                "out",
                DataType::Binary,
                true,
            )),
            config_options: Arc::new(datafusion::config::ConfigOptions::default()),
        };
        let ColumnarValue::Array(out) = udf.invoke_with_args(args)? else {
            panic!("an array");
        };
        let out = out.as_any().downcast_ref::<BinaryArray>().expect("binary");
        Ok(out.value(0).to_vec())
    }

    fn sealed_key(sealing: &SealingKey, key: &JobKey) -> Vec<u8> {
        let mut plain = vec![SPEC_VERSION];
        plain.extend_from_slice(key.to_secret_bytes().as_ref());
        sealing.seal(AAD, &plain).expect("sealed")
    }

    #[test]
    fn an_executor_reblinds_as_the_node_does() {
        let sealing = sealing();
        let key = JobKey::generate();
        let points: Vec<u8> = (0..40).flat_map(point).collect();
        let out = run(
            &ReblindUdf::executor(Arc::clone(&sealing)),
            sealed_key(&sealing, &key),
            points.clone(),
        )
        .expect("runs");
        let reblinded = decode_output(&out, 40).expect("points");
        assert_eq!(reblinded, reblind_points(&key, &points).expect("valid"));
        // A different count than was sent is the cluster's error, not a result.
        assert!(matches!(
            decode_output(&out, 39),
            Err(ReblindFailure::Cluster(_))
        ));
    }

    #[test]
    fn a_bad_point_is_named_by_its_place_in_the_piece() {
        let sealing = sealing();
        let key = JobKey::generate();
        let udf = ReblindUdf::executor(Arc::clone(&sealing));
        let sealed = sealed_key(&sealing, &key);
        let bad = [point(0), point(1), [0xff; 32]].concat();
        let out = run(&udf, sealed.clone(), bad).expect("runs");
        assert!(matches!(
            decode_output(&out, 3),
            Err(ReblindFailure::Peer(PsiError::InvalidPoint { index: 2 }))
        ));
        let identity = [point(0), [0; 32]].concat();
        let out = run(&udf, sealed, identity).expect("runs");
        assert!(matches!(
            decode_output(&out, 2),
            Err(ReblindFailure::Peer(PsiError::IdentityPoint { index: 1 }))
        ));
        for malformed in [&[][..], &[OK, 1, 2][..], &[INVALID_POINT, 1][..], &[9][..]] {
            assert!(matches!(
                decode_output(malformed, 0),
                Err(ReblindFailure::Cluster(_))
            ));
        }
    }

    /// What the scheduler gets and shows: the plan holds the key sealed, never in the clear.
    #[test]
    fn a_pieces_plan_holds_the_key_only_sealed() {
        let sealing = sealing();
        let key = JobKey::generate();
        let ctx = SessionContext::new();
        let points: Vec<u8> = (0..4).flat_map(point).collect();
        let plan = piece_plan(sealed_key(&sealing, &key), &points).expect("a plan");
        let plan = ctx.state().optimize(&plan).expect("optimized");
        // Not folded into a constant where it is planned (no key there).
        assert!(
            format!("{}", plan.display_indent()).contains(UDF_NAME),
            "{}",
            plan.display_indent()
        );
        let bytes = datafusion_proto::bytes::logical_plan_to_bytes(&plan).expect("encoded");
        let secret = key.to_secret_bytes();
        let shown = format!("{}{:?}", plan.display_indent(), plan);
        assert!(!shown.contains(&hex::encode(secret.as_ref())));
        assert!(
            !bytes.windows(32).any(|w| w == secret.as_ref()),
            "the key in the plan's bytes"
        );
        // The physical plan, as the scheduler logs each job's: no key, and no points (a piece
        // would otherwise put 2 MiB of hex in its log).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let physical = runtime
            .block_on(ctx.state().create_physical_plan(&plan))
            .expect("a physical plan");
        let logged = datafusion::physical_plan::displayable(physical.as_ref())
            .indent(true)
            .to_string();
        assert!(logged.contains(UDF_NAME), "{logged}");
        assert!(!logged.contains(&hex::encode(secret.as_ref())), "{logged}");
        assert!(!logged.contains(&hex::encode(&points[..16])), "{logged}");
    }

    #[test]
    fn only_the_executors_key_opens_it_and_never_a_pass_spec() {
        let sealing = sealing();
        let key = JobKey::generate();
        let points = point(0).to_vec();
        // No key: the function plans but refuses to run.
        let err = run(
            &ReblindUdf::planner(),
            sealed_key(&sealing, &key),
            points.clone(),
        )
        .expect_err("no key");
        assert!(err.to_string().contains("no sealing key"), "{err}");
        // Another executor key.
        let other = Arc::new(SealingKey::from_bytes(&[8; 32]).expect("a key"));
        let err = run(
            &ReblindUdf::executor(other),
            sealed_key(&sealing, &key),
            points.clone(),
        )
        .expect_err("wrong key");
        assert!(err.to_string().contains("does not open"), "{err}");
        // The same bytes sealed for the pass do not open here.
        let mut plain = vec![SPEC_VERSION];
        plain.extend_from_slice(key.to_secret_bytes().as_ref());
        let for_pass = sealing
            .seal(b"cleanroom executor pass v1", &plain)
            .expect("sealed");
        let err = run(
            &ReblindUdf::executor(Arc::clone(&sealing)),
            for_pass,
            points,
        )
        .expect_err("another use");
        assert!(err.to_string().contains("does not open"), "{err}");
        // The error never quotes the key.
        let hex = hex::encode(key.to_secret_bytes().as_ref());
        assert!(!err.to_string().contains(&hex));
    }
}
