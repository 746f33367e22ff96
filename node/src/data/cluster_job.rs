//! A small job on this node's own cluster, as re-blinding, encrypting and merging send their
//! pieces: a session with the scheduler, the binary values a piece's plan answers, and, on an
//! executor, the piece's column of hex text read row by row.

use std::sync::Arc;

use datafusion::arrow::array::{Array, BinaryArray, BinaryBuilder, StringArray, StringViewArray};
use datafusion::common::DataFusionError;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::ColumnarValue;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{DataFrame, SessionConfig, SessionContext};
use futures::TryStreamExt;

use super::schema::Cluster;
use super::source::frame::redact;
use super::source::part_order;
use ballista::prelude::SessionContextExt;

/// A session with `cluster`'s scheduler for one job's pieces (each plan is one row: one part).
pub(crate) async fn session(cluster: &Cluster) -> Result<SessionContext, String> {
    let state = SessionStateBuilder::new()
        .with_config(SessionConfig::new().with_target_partitions(1))
        .with_default_features()
        .build();
    SessionContext::remote_with_state(&cluster.url, state)
        .await
        .map_err(|e| {
            format!(
                "the Ballista cluster at {}: {}",
                cluster.url,
                redact(&e.to_string())
            )
        })
}

/// Runs `plan` on the cluster at `url` and returns its one value, if it answered exactly one
/// binary value that is not null.
pub(crate) async fn one_value(
    ctx: &SessionContext,
    url: &str,
    plan: LogicalPlan,
) -> Result<Option<Vec<u8>>, DataFusionError> {
    let mut outputs = values(ctx, url, plan).await?.into_iter();
    Ok(match (outputs.next(), outputs.next()) {
        (Some(Some(output)), None) => Some(output),
        _ => None,
    })
}

/// Runs `plan` on the cluster at `url` and returns the binary values of its first column, in
/// order (`None` for a null, or for a column that is not binary).
pub(crate) async fn values(
    ctx: &SessionContext,
    url: &str,
    plan: LogicalPlan,
) -> Result<Vec<Option<Vec<u8>>>, DataFusionError> {
    // Submitted as built: the scheduler plans it anyway.
    let frame = DataFrame::new(ctx.state(), plan);
    let (stream, _) = part_order::read_as_built_in_part_order(frame, url).await?;
    let batches: Vec<_> = stream.try_collect().await?;
    let mut out = Vec::new();
    for batch in &batches {
        match batch.column(0).as_any().downcast_ref::<BinaryArray>() {
            Some(a) => {
                out.extend((0..a.len()).map(|i| (!a.is_null(i)).then(|| a.value(i).to_vec())))
            }
            None => out.extend(std::iter::repeat_n(None, batch.num_rows())),
        }
    }
    Ok(out)
}

/// Applies `each` to the bytes of every row of a piece function's `column` of hex text
/// (`noun`: what it holds, for the errors `fail` makes): a null stays null, the output is
/// binary.
pub(crate) fn map_hex_rows(
    column: &ColumnarValue,
    number_rows: usize,
    noun: &str,
    fail: impl Fn(&str) -> DataFusionError,
    mut each: impl FnMut(&[u8]) -> Result<Vec<u8>, DataFusionError>,
) -> datafusion::error::Result<ColumnarValue> {
    let arrays = ColumnarValue::values_to_arrays(std::slice::from_ref(column))?;
    let texts = arrays
        .first()
        .and_then(|a| HexRows::of(a.as_ref()))
        .ok_or_else(|| fail(&format!("the {noun} are not text")))?;
    let mut out = BinaryBuilder::new();
    for row in 0..number_rows {
        let Some(text) = texts.get(row) else {
            out.append_null();
            continue;
        };
        let bytes = hex::decode(text)
            .map_err(|_| fail(&format!("the {noun} are not hex (a node's defect)")))?;
        out.append_value(each(&bytes)?);
    }
    Ok(ColumnarValue::Array(Arc::new(out.finish())))
}

/// A piece's column of hex text, as either string array DataFusion may hand over.
enum HexRows<'a> {
    Plain(&'a StringArray),
    View(&'a StringViewArray),
}

impl<'a> HexRows<'a> {
    fn of(array: &'a dyn Array) -> Option<HexRows<'a>> {
        let any = array.as_any();
        any.downcast_ref::<StringArray>()
            .map(HexRows::Plain)
            .or_else(|| any.downcast_ref::<StringViewArray>().map(HexRows::View))
    }

    /// Row `i`'s text; `None` past the end or for a null.
    fn get(&self, i: usize) -> Option<&'a str> {
        match self {
            HexRows::Plain(a) => (i < a.len() && !a.is_null(i)).then(|| a.value(i)),
            HexRows::View(a) => (i < a.len() && !a.is_null(i)).then(|| a.value(i)),
        }
    }
}
