//! A Ballista executor: runs the tasks the scheduler pushes to it, and counts them.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use ballista_core::JobId;
use ballista_core::config::TaskSchedulingPolicy;
use ballista_core::registry::BallistaFunctionRegistry;
use ballista_core::serde::protobuf::ShuffleWritePartition;
use ballista_executor::execution_engine::{
    DefaultExecutionEngine, ExecutionEngine, QueryStageExecutor,
};
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use datafusion::error::Result as EngineResult;
use datafusion::execution::context::TaskContext;
use datafusion::logical_expr::ScalarUDF;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::metrics::MetricsSet;
use datafusion::prelude::SessionConfig;

/// How an executor runs.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// The scheduler's host (a name or an IP address) and port.
    pub scheduler: (String, u16),
    /// The address this executor listens on (its data and task ports are picked free).
    pub bind: IpAddr,
    /// Where it keeps the stage outputs other executors and the node fetch.
    pub work_dir: PathBuf,
    /// Tasks it runs at once.
    pub slots: usize,
    /// The most memory its tasks' buffers may take, in bytes; `None`: Ballista's default share
    /// of the machine.
    pub memory_pool: Option<u64>,
    /// Functions the node's plans call, beyond DataFusion's (the node's executor pass).
    pub functions: Vec<Arc<ScalarUDF>>,
}

/// What one executor has run since it started.
#[derive(Debug, Default)]
pub struct Counters {
    tasks: AtomicU64,
    rows: AtomicU64,
}

impl Counters {
    /// Tasks finished.
    pub fn tasks(&self) -> u64 {
        self.tasks.load(Ordering::Relaxed)
    }

    /// Rows the finished tasks wrote out.
    pub fn rows(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }
}

/// What Ballista's executor logs once the scheduler has taken it in (ballista-executor 55):
/// supervisors wait for it before they send work.
pub const REGISTERED: &str = "Executor registration succeed";

/// What every finished task logs, with the executor's running `tasks=` and `rows=`.
pub const TASK_DONE: &str = "executor: task done";

/// The `(tasks, rows)` of the last [`TASK_DONE`] line of an executor's log; `(0, 0)` if none.
pub fn counts_in_log(log: &str) -> (u64, u64) {
    let field = |line: &str, key: &str| -> u64 {
        line.split(key)
            .nth(1)
            .map(|rest| {
                rest.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            })
            .and_then(|digits| digits.parse().ok())
            .unwrap_or(0)
    };
    log.lines()
        .rfind(|l| l.contains(TASK_DONE))
        .map_or((0, 0), |l| (field(l, " tasks="), field(l, " rows=")))
}

/// Registers with the scheduler and runs tasks until the process stops or the executor fails;
/// dropping the future (at a stop signal) removes the run's work directory.
pub async fn run(options: ExecutorOptions, counters: Arc<Counters>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&options.work_dir)
        .with_context(|| format!("cannot create {}", options.work_dir.display()))?;
    // The outputs are rows of the partner's dataset: they live in a directory of this run's
    // own, removed when the executor stops (the scheduler forgets them on a restart anyway).
    let own = tempfile::Builder::new()
        .prefix("executor-")
        .tempdir_in(&options.work_dir)
        .with_context(|| {
            format!(
                "cannot create a directory in {}",
                options.work_dir.display()
            )
        })?;
    let work_dir = own
        .path()
        .to_str()
        .context("the work directory's path is not UTF-8")?
        .to_owned();
    let mut config = ExecutorProcessConfig {
        bind_host: options.bind.to_string(),
        external_host: Some(options.bind.to_string()),
        port: free_port(options.bind)?,
        grpc_port: free_port(options.bind)?,
        scheduler_host: options.scheduler.0.clone(),
        scheduler_port: options.scheduler.1,
        scheduler_connect_timeout_seconds: 30,
        vcores: options.slots.max(1),
        task_scheduling_policy: TaskSchedulingPolicy::PushStaged,
        work_dir: Some(work_dir),
        print_thread_info: false,
        memory_pool_size: options.memory_pool,
        ..ExecutorProcessConfig::default()
    };
    let mut registry = BallistaFunctionRegistry::default();
    for f in &options.functions {
        registry
            .scalar_functions
            .insert(f.name().to_owned(), Arc::clone(f));
    }
    config.override_function_registry = Some(Arc::new(registry));
    config.override_execution_engine = Some(Arc::new(CountingEngine {
        inner: DefaultExecutionEngine::new(),
        counters,
    }));
    start_executor_process(Arc::new(config))
        .await
        .context("the executor stopped")
}

/// A port that was free a moment ago on `ip`. Ballista binds the ports it is given, so they are
/// picked here; another process could take one in between, and then start-up fails with a
/// clear "address in use".
fn free_port(ip: IpAddr) -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind((ip, 0))
        .with_context(|| format!("cannot find a free port on {ip}"))?;
    Ok(listener.local_addr()?.port())
}

/// Ballista's own engine, with every finished task counted.
struct CountingEngine {
    inner: DefaultExecutionEngine,
    counters: Arc<Counters>,
}

impl ExecutionEngine for CountingEngine {
    fn create_query_stage_exec(
        &self,
        job_id: JobId,
        stage_id: usize,
        task_id: usize,
        global_output_partition_ids: Vec<usize>,
        plan: Arc<dyn ExecutionPlan>,
        work_dir: &str,
        config: &SessionConfig,
    ) -> EngineResult<Arc<dyn QueryStageExecutor>> {
        let inner = self.inner.create_query_stage_exec(
            job_id,
            stage_id,
            task_id,
            global_output_partition_ids,
            plan,
            work_dir,
            config,
        )?;
        Ok(Arc::new(CountedStage {
            inner,
            counters: self.counters.clone(),
        }))
    }
}

struct CountedStage {
    inner: Arc<dyn QueryStageExecutor>,
    counters: Arc<Counters>,
}

impl fmt::Debug for CountedStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountedStage").finish_non_exhaustive()
    }
}

impl fmt::Display for CountedStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

#[async_trait::async_trait]
impl QueryStageExecutor for CountedStage {
    async fn execute_query_stage(
        &self,
        task_id: usize,
        context: Arc<TaskContext>,
    ) -> EngineResult<Vec<ShuffleWritePartition>> {
        let written = self.inner.execute_query_stage(task_id, context).await?;
        let rows: u64 = written.iter().map(|p| p.num_rows).sum();
        let tasks = self.counters.tasks.fetch_add(1, Ordering::Relaxed) + 1;
        let total = self.counters.rows.fetch_add(rows, Ordering::Relaxed) + rows;
        tracing::info!(task_rows = rows, tasks, rows = total, "{TASK_DONE}");
        Ok(written)
    }

    fn collect_plan_metrics(&self) -> Vec<MetricsSet> {
        self.inner.collect_plan_metrics()
    }

    fn collect_runtime_stats_reports(
        &self,
    ) -> Vec<ballista_core::serde::protobuf::RuntimeStatsReport> {
        self.inner.collect_runtime_stats_reports()
    }

    fn collect_window_state_reports(
        &self,
    ) -> EngineResult<Vec<ballista_core::serde::protobuf::WindowStateReport>> {
        self.inner.collect_window_state_reports()
    }

    fn collect_column_stats(&self) -> Vec<ballista_core::serde::protobuf::TaskColumnStats> {
        self.inner.collect_column_stats()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_are_read_from_the_last_task_line() {
        let log = "x executor: task done task_rows=5 tasks=1 rows=5\n\
                   y executor: task done task_rows=7 tasks=2 rows=12\nz other\n";
        assert_eq!(super::counts_in_log(log), (2, 12));
        assert_eq!(super::counts_in_log("nothing"), (0, 0));
    }
}
