//! A partner's Ballista cluster on loopback: `cleanroom scheduler` and `cleanroom executor`
//! processes, started as an operator starts them.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Process, bins};

/// Starts `cleanroom ARGS --stop-on-stdin-eof` in `dir`, its log in `dir/logs/NAME.log`.
fn spawn(dir: &Path, name: &str, args: &[&str], stdout: Stdio) -> Process {
    let log = dir.join(format!("logs/{name}.log"));
    let mut child = Command::new(&bins().0)
        .args(args)
        .arg("--stop-on-stdin-eof")
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("starting the {name}: {e}"));
    let stdin = child.stdin.take();
    Process {
        name: name.into(),
        child,
        stdin,
        log,
    }
}

/// A running scheduler and its executors; stopped when dropped.
#[derive(Debug)]
pub struct Ballista {
    pub scheduler: Process,
    pub executors: Vec<Process>,
    pub addr: SocketAddr,
    /// The key file the executors hold (`--sealing-key`).
    pub sealing_key: std::path::PathBuf,
}

impl Ballista {
    /// Starts a scheduler and `executors` executors of one task slot each (logs in
    /// `dir/logs`, work directories `dir/executor-N`), and waits until all have registered.
    /// `keep_results_secs`: the scheduler's `--keep-results-secs`.
    pub fn start(dir: &Path, executors: usize, keep_results_secs: u64) -> Ballista {
        let keep = keep_results_secs.to_string();
        let mut scheduler = spawn(
            dir,
            "scheduler",
            &[
                "scheduler",
                "--listen",
                "127.0.0.1:0",
                "--keep-results-secs",
                &keep,
            ],
            Stdio::piped(),
        );
        let mut line = String::new();
        BufReader::new(scheduler.child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr: SocketAddr = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("scheduler said {line:?}; log: {}", scheduler.log_text()))
            .parse()
            .unwrap();
        let scheduler_arg = addr.to_string();
        let sealing_key = dir.join("executors.key");
        let out = Command::new(&bins().0)
            .args(["sealing-key", "--out"])
            .arg(&sealing_key)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let key_arg = sealing_key.to_str().unwrap().to_owned();
        let executors = (1..=executors)
            .map(|i| {
                let work = dir.join(format!("executor-{i}"));
                let work = work.to_str().unwrap();
                let args = [
                    "executor",
                    "--scheduler",
                    &scheduler_arg,
                    "--slots",
                    "1",
                    "--sealing-key",
                    &key_arg,
                ];
                let args = [&args[..], &["--work-dir", work]].concat();
                spawn(dir, &format!("executor-{i}"), &args, Stdio::null())
            })
            .collect::<Vec<_>>();
        let deadline = Instant::now() + Duration::from_secs(60);
        for e in &executors {
            while !e.log_text().contains(cleanroom_scale::executor::REGISTERED) {
                assert!(
                    Instant::now() < deadline,
                    "{} did not register: {}",
                    e.name,
                    e.log_text()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ballista {
            scheduler,
            executors,
            addr,
            sealing_key,
        }
    }

    /// The node config line that sends a node's reads to this cluster; `sealed`: its
    /// overlaps' blinding too.
    pub fn engine_line(&self, sealed: bool) -> String {
        let key = sealed.then_some(self.sealing_key.as_path());
        cleanroom_scale::scheduler::engine_line(self.addr, key, None)
    }

    /// [`engine_line`](Self::engine_line) sealed, with `shared` as the directory the node and
    /// the executors share: the node keeps a job's point buckets there and its final
    /// comparison runs on the executors.
    pub fn engine_line_shared(&self, shared: &Path) -> String {
        let key = Some(self.sealing_key.as_path());
        cleanroom_scale::scheduler::engine_line(self.addr, key, Some(shared))
    }

    /// Each executor's `(tasks, rows)`, from the last count it logged.
    pub fn shares(&self) -> Vec<(u64, u64)> {
        self.executors
            .iter()
            .map(|e| cleanroom_scale::executor::counts_in_log(&e.log_text()))
            .collect()
    }
}
