//! `cleanroom scheduler` and `cleanroom executor`: a partner's own Ballista cluster.

use std::process::ExitCode;
use std::sync::Arc;

use crate::args::{ExecutorArgs, SchedulerArgs};
use cleanroom_node::data::cluster_aggregate::AggregateUdf;
use cleanroom_node::data::cluster_encrypt::EncryptUdf;
use cleanroom_node::data::cluster_merge::MergeUdf;
use cleanroom_node::data::cluster_outcome;
use cleanroom_node::data::cluster_pass::{PassUdf, SealingKey};
use cleanroom_node::data::cluster_reblind::ReblindUdf;
use cleanroom_node::data::source::line_table;
use cleanroom_scale::executor::{Counters, ExecutorOptions};

/// Serves until a stop signal (or standard input's end, for supervisors).
pub async fn scheduler(args: SchedulerArgs) -> anyhow::Result<ExitCode> {
    let keep = std::time::Duration::from_secs(args.keep_results_secs);
    let mut functions = vec![
        Arc::new(PassUdf::planner()),
        Arc::new(ReblindUdf::planner()),
        Arc::new(EncryptUdf::planner()),
        Arc::new(MergeUdf::planner()),
    ];
    functions.extend(AggregateUdf::planners().map(Arc::new));
    functions.extend(line_table::functions().map(Arc::new));
    functions.extend(cluster_outcome::functions().map(Arc::new));
    let (addr, serve) = cleanroom_scale::scheduler::start(args.listen, keep, functions).await?;
    {
        // Supervisors (the demo, the tests) read this line to learn a port-0 address.
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = writeln!(out, "listening {addr}").and_then(|()| out.flush());
    }
    tracing::info!(%addr, "scheduler listening");
    tokio::select! {
        result = serve => result?,
        () = cleanroom_node::cli::wait_for_stop(args.stop_on_stdin_eof) => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs tasks until a stop signal (or standard input's end).
pub async fn executor(args: ExecutorArgs) -> anyhow::Result<ExitCode> {
    let options = ExecutorOptions {
        scheduler: (args.scheduler.host().to_owned(), args.scheduler.port()),
        bind: args.bind,
        work_dir: args.work_dir,
        slots: args.slots.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        }),
        memory_pool: args.memory_pool.map(|b| b.as_u64()),
        // Without a key the functions still decode, and refuse to run with a message that says
        // so.
        functions: {
            let mut functions = match &args.sealing_key {
                Some(path) => {
                    let key = Arc::new(SealingKey::read(path).map_err(anyhow::Error::msg)?);
                    let mut functions = vec![
                        Arc::new(PassUdf::executor(Arc::clone(&key))),
                        Arc::new(ReblindUdf::executor(Arc::clone(&key))),
                        Arc::new(EncryptUdf::executor(Arc::clone(&key))),
                        Arc::new(MergeUdf::executor(Arc::clone(&key))),
                    ];
                    functions.extend(AggregateUdf::executors(&key).map(Arc::new));
                    functions
                }
                None => {
                    let mut functions = vec![
                        Arc::new(PassUdf::planner()),
                        Arc::new(ReblindUdf::planner()),
                        Arc::new(EncryptUdf::planner()),
                        Arc::new(MergeUdf::planner()),
                    ];
                    functions.extend(AggregateUdf::planners().map(Arc::new));
                    functions
                }
            };
            // A view's CSV tables read strictly, and an overlap-sum's outcomes grouped by point
            // (no key: they read only the line or the outcome given).
            functions.extend(line_table::functions().map(Arc::new));
            functions.extend(cluster_outcome::functions().map(Arc::new));
            functions
        },
    };
    let counters = Arc::new(Counters::default());
    tokio::select! {
        result = cleanroom_scale::executor::run(options, counters.clone()) => result?,
        () = cleanroom_node::cli::wait_for_stop(args.stop_on_stdin_eof) => {}
    }
    tracing::info!(
        tasks = counters.tasks(),
        rows = counters.rows(),
        "executor stopped"
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes a new sealing key file (mode 0600, never over an existing file).
pub fn sealing_key(args: &crate::args::SealingKeyArgs) -> anyhow::Result<ExitCode> {
    write_sealing_key(&args.out)?;
    println!("wrote {}", args.out.display());
    Ok(ExitCode::SUCCESS)
}

fn write_sealing_key(path: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let text = SealingKey::generate_hex().map_err(anyhow::Error::msg)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("cannot write a new key to {}", path.display()))
}

/// A Ballista cluster on loopback for `cleanroom demo --engine ballista`: a scheduler and
/// executor processes started from this binary, as an operator would start them.
#[derive(Debug)]
pub struct LocalCluster {
    scheduler: tokio::process::Child,
    executors: Vec<(std::path::PathBuf, tokio::process::Child)>,
    /// The scheduler's address.
    pub addr: std::net::SocketAddr,
    /// The key file the executors and the nodes share.
    sealing_key: std::path::PathBuf,
    /// Where each node keeps its jobs' point buckets for the executors to merge:
    /// `shared/<node>` (one machine here; a shared mount in a deployment).
    shared: std::path::PathBuf,
}

impl LocalCluster {
    /// Starts the scheduler and `executors` executors of one task slot each (logs and work
    /// directories under `dir`), and waits until every executor has registered.
    pub async fn start(dir: &std::path::Path, executors: usize) -> anyhow::Result<LocalCluster> {
        use anyhow::Context;
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let mut scheduler = crate::cluster::spawn(
            &["scheduler", "--listen"],
            std::path::Path::new("127.0.0.1:0"),
            &logs.join("scheduler.log"),
            true,
            &[],
        )?;
        let (addr, _) = crate::cluster::read_listen_lines(&mut scheduler, false)
            .await
            .context("the Ballista scheduler did not start; see logs/scheduler.log")?;
        let scheduler_arg = addr.to_string();
        let sealing_key = dir.join("executors.key");
        write_sealing_key(&sealing_key)?;
        let key_arg = sealing_key.to_string_lossy().into_owned();
        let mut started = Vec::new();
        for i in 1..=executors {
            let log = logs.join(format!("executor-{i}.log"));
            let child = crate::cluster::spawn(
                &[
                    "executor",
                    "--scheduler",
                    &scheduler_arg,
                    "--slots",
                    "1",
                    "--sealing-key",
                    &key_arg,
                    "--work-dir",
                ],
                &dir.join(format!("executor-{i}")),
                &log,
                false,
                &[],
            )?;
            started.push((log, child));
        }
        let cluster = LocalCluster {
            scheduler,
            executors: started,
            addr,
            sealing_key,
            shared: dir.join("shared"),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        for (log, _) in &cluster.executors {
            while !std::fs::read_to_string(log)
                .is_ok_and(|t| t.contains(cleanroom_scale::executor::REGISTERED))
            {
                if std::time::Instant::now() > deadline {
                    anyhow::bail!(
                        "a Ballista executor did not register; see {}",
                        log.display()
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        Ok(cluster)
    }

    /// The config line that sends `node`'s reads here, its blinding, re-blinding and
    /// encrypting (the sealing key), and its final comparisons (a directory of its own that the
    /// executors read).
    pub fn engine_line(&self, node: &str) -> String {
        cleanroom_scale::scheduler::engine_line(
            self.addr,
            Some(&self.sealing_key),
            Some(&self.shared.join(node)),
        )
    }

    /// Each executor's tasks and rows so far, from the last count it logged.
    pub fn shares(&self) -> Vec<(u64, u64)> {
        self.executors
            .iter()
            .map(|(log, _)| {
                cleanroom_scale::executor::counts_in_log(
                    &std::fs::read_to_string(log).unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Stops the executors, then the scheduler.
    pub async fn stop(self) {
        let mut executors: Vec<(String, tokio::process::Child)> = self
            .executors
            .into_iter()
            .enumerate()
            .map(|(i, (_, child))| (format!("executor-{}", i + 1), child))
            .collect();
        crate::cluster::stop_all(&mut executors).await;
        crate::cluster::stop_all(&mut [("scheduler".to_owned(), self.scheduler)]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealing_key_is_private_readable_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("executors.key");
        write_sealing_key(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        SealingKey::read(&path).unwrap();
        let before = std::fs::read(&path).unwrap();
        assert!(write_sealing_key(&path).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }
}
