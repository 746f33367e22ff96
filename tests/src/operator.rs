//! What a node's operator runs (`cleanroom-node audit show`, `budget`, `forget`), and the node's
//! audit file read straight from `state-<node>/audit.log` with the node crate's reader.

use std::process::Output;
use std::time::{Duration, Instant};

use cleanroom_node::audit::{AuditEvent, read_entries};
use serde_json::Value;

use crate::{Consortium, cleanroom_node, cleanroom_node_ok, stdout_of_success};

impl Consortium {
    /// `cleanroom-node forget --config <node>.toml --dataset DATASET --key KEY`: a deletion
    /// request at `node` (`key` is `identifier=value`).
    pub fn forget(&self, node: &str, dataset: &str, key: &str) -> Output {
        let cfg = format!("{node}.toml");
        cleanroom_node(
            self.path(),
            &[
                "forget",
                "--config",
                &cfg,
                "--dataset",
                dataset,
                "--key",
                key,
            ],
        )
    }

    /// Like [`Consortium::forget`] but asserts success; its standard output.
    pub fn forget_ok(&self, node: &str, dataset: &str, key: &str) -> String {
        let out = self.forget(node, dataset, key);
        stdout_of_success("cleanroom-node forget", &[node, dataset], out)
    }

    /// `cleanroom-node budget --config <node>.toml --format json`: one line per partner and
    /// purpose.
    pub fn budget_json(&self, node: &str) -> Value {
        let cfg = format!("{node}.toml");
        let text = cleanroom_node_ok(
            self.path(),
            &["budget", "--config", &cfg, "--format", "json"],
        );
        serde_json::from_str(&text).expect("budget --format json prints JSON")
    }

    /// `cleanroom-node audit show --config <node>.toml --json [--job JOB]`: one entry a line.
    pub fn audit_entries(&self, node: &str, job: Option<&str>) -> Vec<Value> {
        let cfg = format!("{node}.toml");
        let mut args = vec!["audit", "show", "--config", &cfg, "--json"];
        if let Some(j) = job {
            args.extend(["--job", j]);
        }
        cleanroom_node_ok(self.path(), &args)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("audit show --json prints JSON lines"))
            .collect()
    }

    /// The `Access` entry `node` audited for `job_id` (the entry's `event` object).
    pub fn audited_access(&self, node: &str, job_id: &str) -> Value {
        self.audit_entries(node, Some(job_id))
            .into_iter()
            .find(|e| e["event"]["kind"] == "Access")
            .unwrap_or_else(|| panic!("{node} audited no access of {job_id}"))["event"]
            .clone()
    }

    /// The `JobError` reason `node` has audited for `job_id`, if any, read once from its audit
    /// file. A line being appended may be read half-written, so a caller that expects one
    /// polls (or calls [`Consortium::audited_error`]).
    pub fn audited_error_now(&self, node: &str, job_id: &str) -> Option<String> {
        let log = self.path().join(format!("state-{node}/audit.log"));
        let entries = read_entries(&log).unwrap_or_default();
        entries.into_iter().find_map(|e| match e.event {
            AuditEvent::JobError {
                job_id: j, reason, ..
            } if j == job_id => Some(reason),
            _ => None,
        })
    }

    /// Like [`Consortium::audited_error_now`], waiting up to 10 s for the entry: a node reports
    /// a failure to the coordinator before it appends the entry.
    pub fn audited_error(&self, node: &str, job_id: &str) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self.audited_error_now(node, job_id);
            if found.is_some() || Instant::now() > deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
