//! A Ballista scheduler: accepts the node's plans and hands their tasks to the executors.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use ballista_core::config::TaskSchedulingPolicy;
use ballista_core::utils::default_session_builder;
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::{create_scheduler, start_grpc_service_with_listener};
use ballista_scheduler::scheduler_server::SchedulerServer;
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::ScalarUDF;
use datafusion::prelude::SessionConfig;
use datafusion_proto::protobuf::{LogicalPlanNode, PhysicalPlanNode};

/// Binds `bind` (port 0: any free port) and returns the bound address and the future that
/// serves until it fails. Tasks are pushed to executors (not pulled), so a stage with as many
/// tasks as the cluster has slots runs on every executor at once.
///
/// A read's output waits in the executors' work directories until the node has fetched it;
/// `keep_results` after the job's last task the scheduler tells the executors to delete it.
/// Those files are rows of the partner's own dataset (the columns the job reads), so the
/// shorter the better, but a node must fetch every part within it.
///
/// `functions`: the functions the node's plans call beyond DataFusion's; the scheduler plans
/// with them (it never runs them).
pub async fn start(
    bind: SocketAddr,
    keep_results: std::time::Duration,
    functions: Vec<Arc<ScalarUDF>>,
) -> anyhow::Result<(
    SocketAddr,
    impl std::future::Future<Output = anyhow::Result<()>>,
)> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("cannot listen on {bind}"))?;
    let addr = listener.local_addr()?;
    let mut config = SchedulerConfig::default()
        .with_scheduler_policy(TaskSchedulingPolicy::PushStaged)
        .with_port(addr.port())
        .with_finished_job_data_clean_up_interval_seconds(keep_results.as_secs().max(1));
    config.override_session_builder = Some(Arc::new(move |session: SessionConfig| {
        let mut state = default_session_builder(session)?;
        for f in &functions {
            state.register_udf(Arc::clone(f))?;
        }
        Ok(state)
    }));
    config.bind_host = addr.ip().to_string();
    config.external_host = addr.ip().to_string();
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .context("cannot set up the scheduler's state")?;
    let server: SchedulerServer<LogicalPlanNode, PhysicalPlanNode> =
        create_scheduler(cluster, Arc::new(config))
            .await
            .context("cannot start the scheduler")?;
    let serve = async move {
        start_grpc_service_with_listener(listener, server)
            .await
            .context("the scheduler stopped")
    };
    Ok((addr, serve))
}

/// The node config line that sends a node's reads to the scheduler at `addr`; with the
/// executors' `sealing_key` file, its overlaps' blinding too; with a `shared_dir` as well (a
/// directory the executors read), its final comparisons.
pub fn engine_line(
    addr: SocketAddr,
    sealing_key: Option<&std::path::Path>,
    shared_dir: Option<&std::path::Path>,
) -> String {
    let mut line = format!("engine = {{ ballista = \"df://{addr}\"");
    for (name, path) in [("sealing_key", sealing_key), ("shared_dir", shared_dir)] {
        if let Some(path) = path {
            line.push_str(&format!(", {name} = {:?}", path.display().to_string()));
        }
    }
    line.push_str(" }\n");
    line
}
