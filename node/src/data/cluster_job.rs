//! A one-row job on this node's own cluster, as re-blinding and encrypting send their pieces:
//! a session with the scheduler, and the one binary value a piece's plan answers.

use datafusion::arrow::array::{Array, BinaryArray};
use datafusion::common::DataFusionError;
use datafusion::execution::session_state::SessionStateBuilder;
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
    // Submitted as built: the scheduler plans it anyway.
    let frame = DataFrame::new(ctx.state(), plan);
    let (stream, _) = part_order::read_as_built_in_part_order(frame, url).await?;
    let batches: Vec<_> = stream.try_collect().await?;
    let mut outputs = batches.iter().flat_map(|b| {
        b.column(0)
            .as_any()
            .downcast_ref::<BinaryArray>()
            .into_iter()
            .flat_map(|a| (0..a.len()).map(move |i| (!a.is_null(i)).then(|| a.value(i))))
    });
    Ok(match (outputs.next(), outputs.next()) {
        (Some(Some(output)), None) => Some(output.to_vec()),
        _ => None,
    })
}
