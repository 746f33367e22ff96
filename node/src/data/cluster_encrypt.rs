//! An overlap-sum value holder's rows encrypted on this node's own Ballista executors.
//!
//! The value holder encrypts each of its rows under the job's Paillier key: about 0.5 ms a row on
//! one core, over ten times the curve's cost, and so the heaviest step a value holder has. With a
//! `sealing_key` on the cluster, the node hands its rows to its executors in pieces
//! ([`ClusterEncryptor::encrypt`]), in the order its points went out, and sends the
//! ciphertexts on in that order. Each piece is one job whose plan is one row:
//! `cleanroom_encrypt(sealed key, sealed rows)` over `VALUES ('<sealed rows in hex>')`.
//!
//! Encrypting fast needs the key's primes (each prime's fixed-base table; with the public key
//! alone each row would take a full-length exponentiation modulo `n²`), so they travel sealed,
//! as the job key does for re-blinding, under their own associated data; the rows travel sealed
//! too (they are the partner's own values, and the plan goes through the scheduler). An
//! executor opens both for each piece and rebuilds the key's tables: 65 536 multiplications
//! modulo `p²` or `q²`, against about 2 million for a piece's 8 192 rows. Then it
//! encrypts, and drops them. The output is the piece's ciphertexts, concatenated.

use std::sync::Arc;

use cleanroom_circuits::ahe::{SecretKey, SlotLayout, encrypt_rows};
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
pub const UDF_NAME: &str = "cleanroom_encrypt";

/// Binds the sealed key to this use: no other function's spec opens here, nor this one there.
const KEY_AAD: &[u8] = b"cleanroom executor encrypt key v1";
/// Binds a piece's sealed rows to this use, apart from the key.
const ROWS_AAD: &[u8] = b"cleanroom executor encrypt rows v1";

/// The sealed key's encoding version.
const SPEC_VERSION: u8 = 1;

/// A piece's ciphertexts at most: one Flight message, well under its 16 MiB cap.
const PIECE_OUTPUT_BYTES: usize = 4 << 20;

/// Rows in one piece under `layout`: as many as fit 4 MiB of ciphertexts.
pub fn piece_rows(layout: &SlotLayout) -> usize {
    (PIECE_OUTPUT_BYTES / layout.ciphertext_len().max(1)).max(1)
}

/// Pieces out at once within a node's `memory_limit` (bytes): their ciphertexts wait on the
/// node until every piece before them is back, so they take at most a sixteenth of it.
pub fn pieces_within(memory_limit: u64) -> usize {
    usize::try_from(memory_limit / 16 / PIECE_OUTPUT_BYTES as u64)
        .unwrap_or(usize::MAX)
        .max(1)
}

/// One job's encryption on the cluster: its scheduler, its sealed key and its layout.
pub struct ClusterEncryptor {
    url: String,
    ctx: SessionContext,
    sealing: Arc<SealingKey>,
    /// `version ‖ cells ‖ widths ‖ p ‖ q`, sealed under the cluster's [`SealingKey`].
    sealed_key: Vec<u8>,
    cells: usize,
    ciphertext_len: usize,
    /// Pieces the node may have out at once: the cluster's `partitions`.
    pub pieces_in_flight: usize,
}

impl std::fmt::Debug for ClusterEncryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterEncryptor")
            .field("url", &self.url)
            .field("cells", &self.cells)
            .finish_non_exhaustive()
    }
}

impl ClusterEncryptor {
    /// Seals the job's Paillier key and `layout` for `cluster`'s executors. Nothing is sent yet.
    pub async fn new(
        cluster: &Cluster,
        sealing: Arc<SealingKey>,
        key: &SecretKey,
        layout: &SlotLayout,
    ) -> Result<ClusterEncryptor, String> {
        let sealed_key = seal_key(&sealing, key, layout)?;
        let ctx = cluster_job::session(cluster).await?;
        Ok(ClusterEncryptor {
            url: cluster.url.clone(),
            ctx,
            sealing,
            sealed_key,
            cells: layout.cells(),
            ciphertext_len: layout.ciphertext_len(),
            pieces_in_flight: cluster.partitions.max(1),
        })
    }

    /// The ciphertexts of `rows` (whole rows of the layout's cells, row-major), concatenated in
    /// their order, computed by one executor task. The error is the cluster's, redacted.
    pub async fn encrypt(&self, rows: Zeroizing<Vec<u64>>) -> Result<Vec<u8>, String> {
        let count = rows.len() / self.cells.max(1);
        if count * self.cells != rows.len() || count == 0 {
            return Err(format!(
                "{} values are not whole rows of {} cells",
                rows.len(),
                self.cells
            ));
        }
        let sealed_rows = seal_rows(&self.sealing, &rows)?;
        drop(rows);
        let cluster = |e: DataFusionError| redact(&e.to_string());
        let plan = piece_plan(self.sealed_key.clone(), &sealed_rows).map_err(cluster)?;
        drop(sealed_rows);
        let Some(output) = cluster_job::one_value(&self.ctx, &self.url, plan)
            .await
            .map_err(cluster)?
        else {
            return Err("the cluster did not answer one encrypted piece".into());
        };
        if output.len() != count * self.ciphertext_len {
            return Err(format!(
                "an executor answered {} bytes for {count} rows of {} bytes",
                output.len(),
                self.ciphertext_len
            ));
        }
        Ok(output)
    }
}

/// `version ‖ cells ‖ widths ‖ primes`, sealed.
fn seal_key(sealing: &SealingKey, key: &SecretKey, layout: &SlotLayout) -> Result<Vec<u8>, String> {
    let widths = layout.widths();
    let cells = u8::try_from(widths.len()).map_err(|_| "too many cells to seal".to_owned())?;
    let primes = key.prime_bytes();
    let mut plain = Zeroizing::new(Vec::with_capacity(2 + widths.len() + primes.len()));
    plain.push(SPEC_VERSION);
    plain.push(cells);
    plain.extend_from_slice(widths);
    plain.extend_from_slice(&primes);
    sealing.seal(KEY_AAD, &plain)
}

/// The rows' values, little-endian, sealed.
fn seal_rows(sealing: &SealingKey, rows: &[u64]) -> Result<Vec<u8>, String> {
    let mut plain = Zeroizing::new(Vec::with_capacity(rows.len() * 8));
    for v in rows {
        plain.extend_from_slice(&v.to_le_bytes());
    }
    sealing.seal(ROWS_AAD, &plain)
}

/// One piece's plan: one row of the sealed rows in hex (text formats faster than a binary
/// literal where DataFusion names expressions), and the function over the sealed key and it.
fn piece_plan(sealed_key: Vec<u8>, sealed_rows: &[u8]) -> datafusion::error::Result<LogicalPlan> {
    let row = lit(ScalarValue::Utf8(Some(hex::encode(sealed_rows))));
    let call = Expr::ScalarFunction(ScalarFunction::new_udf(
        Arc::new(EncryptUdf::planner()),
        vec![lit(ScalarValue::Binary(Some(sealed_key))), col("column1")],
    ));
    LogicalPlanBuilder::values(vec![vec![row]])?
        .project(vec![call.alias("ciphertexts")])?
        .build()
}

/// The key and layout sealed in `sealed`. Errors say what to fix, never what the bytes hold.
fn open_key(sealing: &SealingKey, sealed: &[u8]) -> Result<(SecretKey, SlotLayout), String> {
    let plain = sealing.open(KEY_AAD, sealed).ok_or(
        "the key does not open with this executor's sealing key (the node's \
         engine.sealing_key and the executor's --sealing-key must be the same key)",
    )?;
    let [version, cells, rest @ ..] = plain.as_slice() else {
        return Err("the sealed key is too short".into());
    };
    if *version != SPEC_VERSION {
        return Err(
            "the sealed key is not one this executor reads (a node of another version?)".into(),
        );
    }
    let (widths, primes) = rest
        .split_at_checked(usize::from(*cells))
        .ok_or("the sealed key is too short")?;
    let layout = SlotLayout::new(widths).map_err(|e| format!("the sealed layout: {e}"))?;
    let key = SecretKey::from_prime_bytes(primes).map_err(|e| format!("the sealed key: {e}"))?;
    Ok((key, layout))
}

/// The values sealed in a piece's row, `cells` to a row.
fn open_rows(
    sealing: &SealingKey,
    sealed: &[u8],
    cells: usize,
) -> Result<Zeroizing<Vec<u64>>, String> {
    let plain = sealing
        .open(ROWS_AAD, sealed)
        .ok_or("the rows do not open with this executor's sealing key")?;
    let (values, tail) = plain.as_chunks::<8>();
    if !tail.is_empty() || values.is_empty() || !values.len().is_multiple_of(cells.max(1)) {
        return Err("the sealed rows are not whole rows of the layout".into());
    }
    Ok(Zeroizing::new(
        values.iter().map(|v| u64::from_le_bytes(*v)).collect(),
    ))
}

/// The encrypting function. The node and the scheduler hold it without a key (to plan and to
/// decode plans); an executor holds the [`SealingKey`] and runs it.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct EncryptUdf {
    signature: Signature,
    key: Option<OpenerRef>,
}

impl EncryptUdf {
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
        // planned (the node and the scheduler hold no key); and each call draws fresh
        // randomness.
        ScalarUDF::new_from_impl(EncryptUdf {
            signature: Signature::variadic_any(Volatility::Volatile),
            key: key.map(OpenerRef),
        })
    }
}

impl ScalarUDFImpl for EncryptUdf {
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
        let [sealed, rows] = args.args.as_slice() else {
            return Err(fail("it takes a sealed key and sealed rows"));
        };
        let ColumnarValue::Scalar(ScalarValue::Binary(Some(sealed))) = sealed else {
            return Err(fail("the first argument is not a sealed key"));
        };
        let (key, layout) = open_key(sealing, sealed).map_err(|m| fail(&m))?;
        cluster_job::map_hex_rows(rows, args.number_rows, "rows", fail, |sealed_rows| {
            let values = open_rows(sealing, sealed_rows, layout.cells()).map_err(|m| fail(&m))?;
            encrypt_rows(&key, &layout, &values).map_err(|e| fail(&e.to_string()))
        })
    }
}

#[cfg(test)]
#[path = "cluster_encrypt_tests.rs"]
mod tests;
