//! A read on a Ballista cluster, its parts taken in part order.
//!
//! Ballista's own client (`DistributedQueryExec`) hands back a job's result parts in the order
//! the executors finished them, so a read split into parts does not come back in file order.
//! A pass that numbers rows (a match's membership, a dry run's places) needs file order. This client
//! submits the same plan the same way, waits for the job as Ballista's does, then fetches the
//! parts by their number: part `i` of a file read is the `i`-th byte range (or row groups) of
//! the files in path order, so the rows come in file order while the executors read all parts at
//! once.
//!
//! That holds only when no operator moves rows between parts: the session turns off round-robin
//! repartitioning, and a plan that could move rows ([`moves_rows`]: a join, an aggregate, a
//! sort, a limit, a union, …) runs in one part. A file dataset's own plan (a projection over the
//! scan, with the node's functions) and a view that only filters and projects one table keep
//! all their parts.

use std::sync::Arc;
use std::time::Duration;

use ballista::prelude::SessionConfigExt;
use ballista_core::client::BallistaClient;
use ballista_core::serde::protobuf::{
    ExecuteQueryParams, GetJobStatusParams, KeyValuePair, PartitionLocation, SuccessfulJob,
    execute_query_params::Query, execute_query_result, job_status,
    scheduler_grpc_client::SchedulerGrpcClient,
};
use ballista_core::utils::{GrpcClientConfig, create_grpc_client_endpoint};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::prelude::DataFrame;
use datafusion_proto::logical_plan::AsLogicalPlan;
use datafusion_proto::protobuf::LogicalPlanNode;
use futures::{StreamExt, TryStreamExt};

/// How often the job's state is asked for while it runs (as Ballista's client does).
const POLL: Duration = Duration::from_millis(50);

fn engine(message: impl std::fmt::Display) -> DataFusionError {
    DataFusionError::Execution(message.to_string())
}

/// The scheduler's port when the cluster URL names none (Ballista's default).
const DEFAULT_SCHEDULER_PORT: u16 = 50050;

/// The gRPC address of the scheduler at `url` (`df://HOST[:PORT]`), as Ballista forms it.
fn scheduler_address(url: &str) -> Result<String, DataFusionError> {
    let parsed = url::Url::parse(url).map_err(|e| engine(format!("the cluster URL {url}: {e}")))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| engine(format!("the cluster URL {url} names no host")))?;
    let port = parsed.port().unwrap_or(DEFAULT_SCHEDULER_PORT);
    Ok(format!("http://{host}:{port}"))
}

/// Whether `plan` could put a row in another part than the one its file range was read in, or
/// reads more than one table: anything but projections and filters over one table scan.
pub(crate) fn moves_rows(plan: &LogicalPlan) -> bool {
    let mut scans = 0;
    let mut other = false;
    // Subqueries too: an `IN (SELECT …)` not yet rewritten into a join reads another table.
    let walked = plan.apply_with_subqueries(|node| {
        match node {
            LogicalPlan::TableScan(_) => scans += 1,
            LogicalPlan::Projection(_) | LogicalPlan::Filter(_) | LogicalPlan::SubqueryAlias(_) => {
            }
            _ => other = true,
        }
        Ok(TreeNodeRecursion::Continue)
    });
    // A walk that stopped early saw only part of the plan: assume the worst.
    walked.is_err() || other || scans != 1
}

/// Runs `frame` on the cluster at `url` and streams its parts' rows in part order; also says
/// how many parts the read had. A plan that [`moves_rows`] runs in one part.
pub(crate) async fn read_in_part_order(
    frame: DataFrame,
    url: &str,
) -> Result<(SendableRecordBatchStream, usize), DataFusionError> {
    let (state, plan) = frame.into_parts();
    let plan = state.optimize(&plan)?;
    read_as_built_in_part_order(DataFrame::new(state, plan), url).await
}

/// [`read_in_part_order`] without planning `frame` here first: the scheduler plans it in any
/// case, and a plan that holds a large literal costs time at each planning.
pub(crate) async fn read_as_built_in_part_order(
    frame: DataFrame,
    url: &str,
) -> Result<(SendableRecordBatchStream, usize), DataFusionError> {
    let (state, plan) = frame.into_parts();
    let one_part = moves_rows(&plan);
    let schema = Arc::new(plan.schema().as_arrow().clone());
    let config = state.config();
    let ballista = config.ballista_config();
    let codec = config.ballista_logical_extension_codec();
    let mut encoded = Vec::new();
    LogicalPlanNode::try_from_logical_plan(&plan, codec.as_ref())?
        .try_encode(&mut encoded)
        .map_err(|e| engine(format!("the plan could not be encoded: {e}")))?;
    let settings = config
        .options()
        .entries()
        .into_iter()
        .map(|entry| {
            let value = if one_part && entry.key == "datafusion.execution.target_partitions" {
                Some("1".to_owned())
            } else {
                entry.value
            };
            KeyValuePair {
                key: entry.key,
                value,
            }
        })
        .collect();
    let query = ExecuteQueryParams {
        query: Some(Query::LogicalPlan(encoded)),
        settings,
        session_id: state.session_id().to_owned(),
        // Only the scheduler's log shows it.
        operation_id: format!("{:032x}", rand::random::<u128>()),
    };

    let grpc = GrpcClientConfig::from(&ballista);
    let address = scheduler_address(url)?;
    let channel = create_grpc_client_endpoint(address.clone(), Some(&grpc))
        .map_err(|e| engine(format!("the scheduler at {url}: {e}")))?
        .connect()
        .await
        .map_err(|e| engine(format!("cannot reach the scheduler at {url}: {e}")))?;
    let mut scheduler = SchedulerGrpcClient::new(channel)
        .max_encoding_message_size(grpc.max_message_size)
        .max_decoding_message_size(grpc.max_message_size);
    let mut request = tonic::Request::new(query);
    ballista_core::version::insert_version_header(request.metadata_mut());
    let accepted = scheduler
        .execute_query(request)
        .await
        .map_err(|e| engine(format!("the scheduler refused the read: {}", e.message())))?
        .into_inner();
    let job_id = match accepted.result {
        Some(execute_query_result::Result::Success(success)) => success.job_id,
        Some(execute_query_result::Result::Failure(failure)) => {
            return Err(engine(format!(
                "the scheduler could not run the read: {failure:?}"
            )));
        }
        None => return Err(engine("the scheduler answered the read with nothing")),
    };

    let mut parts = loop {
        let status = scheduler
            .get_job_status(GetJobStatusParams {
                job_id: job_id.clone(),
            })
            .await
            .map_err(|e| engine(format!("the scheduler lost the read: {}", e.message())))?
            .into_inner()
            .status
            .and_then(|s| s.status);
        match status {
            Some(job_status::Status::Successful(SuccessfulJob {
                partition_location, ..
            })) => break partition_location,
            Some(job_status::Status::Failed(failed)) => {
                return Err(engine(format!("Job {job_id} failed: {}", failed.error)));
            }
            None | Some(job_status::Status::Queued(_) | job_status::Status::Running(_)) => {
                tokio::time::sleep(POLL).await;
            }
        }
    };
    parts.sort_by_key(part_number);
    let count = parts.len();
    let max_message = grpc.max_message_size;
    let retries = (grpc.io_retries_times, grpc.io_retry_wait_time_ms);
    let rows = futures::stream::iter(parts)
        .then(move |part| fetch(part, max_message, retries))
        .try_flatten();
    Ok((Box::pin(RecordBatchStreamAdapter::new(schema, rows)), count))
}

/// Where a part sits in the read: its output partition, then the task that wrote it.
fn part_number(part: &PartitionLocation) -> (u32, u32) {
    let partition = part
        .partition_id
        .as_ref()
        .map_or(u32::MAX, |p| p.partition_id);
    (partition, part.map_partition_id)
}

/// The rows of one part, from the executor that holds them.
async fn fetch(
    part: PartitionLocation,
    max_message: usize,
    (retries, retry_wait_ms): (u8, u64),
) -> Result<SendableRecordBatchStream, DataFusionError> {
    let layout = part.layout();
    let executor = part
        .executor_meta
        .ok_or_else(|| engine("the scheduler named no executor for a part"))?;
    let id = part
        .partition_id
        .ok_or_else(|| engine("the scheduler named a part without its number"))?;
    let port = u16::try_from(executor.port)
        .map_err(|_| engine(format!("executor {} has no valid port", executor.id)))?;
    let mut client = BallistaClient::try_new(
        &executor.host,
        port,
        max_message,
        false,
        None,
        retries,
        retry_wait_ms,
        0,
        0,
    )
    .await
    .map_err(|e| engine(format!("cannot reach executor {}: {e}", executor.id)))?;
    client
        .fetch_partition(&executor.id, &id.into(), part.file_id, layout, true)
        .await
        .map_err(|e| {
            engine(format!(
                "executor {} could not send a part: {e}",
                executor.id
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ballista_core::serde::protobuf::PartitionId;

    fn part(partition: u32, task: u32) -> PartitionLocation {
        PartitionLocation {
            map_partition_id: task,
            partition_id: Some(PartitionId {
                job_id: "j".into(),
                stage_id: 1,
                partition_id: partition,
            }),
            ..PartitionLocation::default()
        }
    }

    /// The scheduler lists parts as they finished; they are fetched by number.
    #[test]
    fn parts_are_taken_by_their_number_not_as_they_finished() {
        let mut parts = [part(2, 2), part(0, 0), part(3, 3), part(1, 1)];
        parts.sort_by_key(part_number);
        let order: Vec<u32> = parts.iter().map(|p| p.map_partition_id).collect();
        assert_eq!(order, [0, 1, 2, 3]);
    }

    /// Part order is file order only for filters and projections over one table.
    #[tokio::test]
    async fn only_filters_and_projections_over_one_table_keep_their_parts() {
        use datafusion::arrow::array::{Int64Array, StringArray};
        use datafusion::arrow::datatypes::{DataType, Field, Schema};
        use datafusion::arrow::record_batch::RecordBatch;
        use datafusion::datasource::MemTable;
        use datafusion::prelude::SessionContext;

        let ctx = SessionContext::new();
        let schema = Arc::new(Schema::new(vec![
            Field::new("email", DataType::Utf8, true),
            Field::new("amount", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(StringArray::from(vec!["a@x.com", "b@x.com"])),
                Arc::new(Int64Array::from(vec![5, 50])),
            ],
        )
        .unwrap();
        for name in ["crm", "orders"] {
            let table = MemTable::try_new(Arc::clone(&schema), vec![vec![batch.clone()]]).unwrap();
            ctx.register_table(name, Arc::new(table)).unwrap();
        }
        let moves = async |sql: &str| {
            let frame = ctx.sql(sql).await.unwrap();
            let (state, plan) = frame.into_parts();
            moves_rows(&state.optimize(&plan).unwrap())
        };
        for sql in [
            "SELECT email FROM crm",
            "SELECT lower(email) AS email, amount FROM crm WHERE amount >= 10",
            "SELECT e FROM (SELECT email AS e, amount FROM crm WHERE amount > 1) AS t WHERE e <> ''",
        ] {
            assert!(!moves(sql).await, "{sql}");
        }
        for sql in [
            "SELECT c.email FROM crm c JOIN orders o ON c.email = o.email",
            "SELECT email FROM crm WHERE email IN (SELECT email FROM orders)",
            "SELECT email, sum(amount) FROM crm GROUP BY email",
            "SELECT DISTINCT email FROM crm",
            "SELECT email FROM crm ORDER BY amount",
            "SELECT email FROM crm LIMIT 1",
            "SELECT email FROM crm UNION ALL SELECT email FROM orders",
            "SELECT email, row_number() OVER (ORDER BY amount) FROM crm",
        ] {
            assert!(moves(sql).await, "{sql}");
        }
    }

    #[test]
    fn the_scheduler_address_is_its_grpc_url() {
        assert_eq!(
            scheduler_address("df://10.0.0.5:50050").unwrap(),
            "http://10.0.0.5:50050"
        );
        assert_eq!(
            scheduler_address("df://scheduler").unwrap(),
            "http://scheduler:50050"
        );
        assert!(scheduler_address("not a url").is_err());
    }
}
