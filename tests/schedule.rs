//! End to end: schedules, reports, retries and restart safety, with a real coordinator and two
//! real nodes driven through the `cleanroom` command line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cleanroom_e2e::{
    Consortium, OVERLAP, bins, cleanroom, cleanroom_ok, free_udp_port, reason_of, stop_gracefully,
};
use serde_json::Value;

/// `cleanroom WORD <analyst flags> REST…` (connection flags right after the first word, so that
/// they come before the job words of `schedule add`).
fn analyst_cmd(c: &Consortium, args: &[&str]) -> Vec<String> {
    let mut all = vec![args[0].to_owned()];
    all.extend(c.analyst_args());
    all.extend(args[1..].iter().map(|s| s.to_string()));
    all
}

/// `schedule run-now nightly`, waiting for the run, as JSON.
const RUN_NIGHTLY_NOW: [&str; 8] = [
    "schedule",
    "run-now",
    "nightly",
    "--wait",
    "--timeout",
    "120",
    "--format",
    "json",
];

fn analyst(c: &Consortium, args: &[&str]) -> std::process::Output {
    let all = analyst_cmd(c, args);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    cleanroom(c.path(), &all)
}

fn analyst_ok(c: &Consortium, args: &[&str]) -> String {
    let all = analyst_cmd(c, args);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    cleanroom_ok(c.path(), &all)
}

fn analyst_json(c: &Consortium, args: &[&str]) -> Value {
    let out = analyst_ok(c, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {out}"))
}

fn start_nodes(c: &mut Consortium) {
    c.start_open_pair();
}

/// Adds schedule `name` (cron far from now: it fires only through run-now) and returns it.
fn add_schedule(c: &Consortium, name: &str, cron: &str, max_retries: &str) -> Value {
    let mut args = vec![
        "schedule",
        "add",
        name,
        "--cron",
        cron,
        "--max-retries",
        max_retries,
        "--backoff",
        "1",
        "--format",
        "json",
        "--",
    ];
    args.extend(OVERLAP);
    analyst_json(c, &args)
}

#[test]
fn schedule_runs_are_linked_jobs_and_reports_render() {
    let (mut c, truth) = Consortium::with_coordinator("acme,globex", 400, 0.5, 3);
    let expected = truth["pairwise_overlap"]["acme,globex"].as_u64().unwrap();
    start_nodes(&mut c);

    // Invalid schedules are refused with the reason.
    let mut bad = vec!["schedule", "add", "bad", "--cron", "61 * * * *", "--"];
    bad.extend(OVERLAP);
    let out = analyst(&c, &bad);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid schedule"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 02:00 on 1 January: far enough not to fire during the test.
    let added = add_schedule(&c, "nightly", "0 2 1 1 *", "0");
    assert_eq!(added["name"], "nightly", "{added}");
    assert_eq!(added["paused"], false);
    assert_eq!(added["owner"], "alice");
    assert!(added["next_run_ms"].as_i64().unwrap() > 0);
    // The same name again is refused.
    let mut again = vec!["schedule", "add", "nightly", "--cron", "0 3 * * *"];
    again.extend(OVERLAP); // without `--`: also accepted
    let out = analyst(&c, &again);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));

    let mut job_ids = Vec::new();
    for _ in 0..3 {
        let job = analyst_json(&c, &RUN_NIGHTLY_NOW);
        assert_eq!(job["state"], "succeeded", "{job}");
        assert_eq!(job["intersection"].as_u64(), Some(expected));
        assert!(
            job["history"][0]["reason"]
                .as_str()
                .unwrap()
                .contains("schedule nightly"),
            "{job}"
        );
        job_ids.push(job["job_id"].as_str().unwrap().to_owned());
        // run-now records the run at the request's millisecond: keep them apart.
        std::thread::sleep(Duration::from_millis(5));
    }

    let shown = analyst_json(&c, &["schedule", "show", "nightly", "--format", "json"]);
    let runs = shown["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3, "{shown}");
    for (run, id) in runs.iter().zip(&job_ids) {
        assert_eq!(run["job_id"], id.as_str());
        assert_eq!(run["state"], "succeeded");
        assert_eq!(run["note"], "run-now");
        assert_eq!(run["intersection"].as_u64(), Some(expected));
    }
    let table = analyst_ok(&c, &["schedule", "show", "nightly"]);
    for id in &job_ids {
        assert!(table.contains(id.as_str()), "{table}");
    }

    // Reports: HTML with a chart of three points, CSV and JSON.
    let html = nightly_html_report(&c, &["--since", "90d"]);
    assert!(html.starts_with("<!DOCTYPE html>") || html.starts_with("<!doctype html>"));
    assert_eq!(html.matches("<svg class=\"chart\"").count(), 1);
    assert_eq!(html.matches("<circle class=\"point\"").count(), 3);
    assert!(html.trim_end().ends_with("</html>"));
    check_renders_in_chromium(&c.path().join("nightly.html"));

    analyst_ok(
        &c,
        &[
            "report",
            "nightly",
            "--format",
            "csv",
            "--out",
            "nightly.csv",
        ],
    );
    let csv = std::fs::read_to_string(c.path().join("nightly.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 4, "{csv}");
    let columns = lines[0].split(',').count();
    for id in &job_ids {
        assert!(csv.contains(id.as_str()));
    }
    assert!(columns >= 4, "{csv}");

    let json = analyst_json(&c, &["report", "nightly", "--format", "json"]);
    assert_eq!(json["schedule"], "nightly");
    assert_eq!(json["runs"].as_array().unwrap().len(), 3, "{json}");

    // Pause, resume, remove.
    let paused = analyst_json(&c, &["schedule", "pause", "nightly", "--format", "json"]);
    assert_eq!(paused["paused"], true);
    let list = analyst_json(&c, &["schedule", "list", "--format", "json"]);
    assert_eq!(list[0]["paused"], true, "{list}");
    let resumed = analyst_json(&c, &["schedule", "resume", "nightly", "--format", "json"]);
    assert_eq!(resumed["paused"], false);
    assert!(resumed["next_run_ms"].as_i64().unwrap() > 0);
    let removed = analyst_json(&c, &["schedule", "remove", "nightly", "--format", "json"]);
    assert_eq!(removed["removed"], true);
    let list = analyst_json(&c, &["schedule", "list", "--format", "json"]);
    assert_eq!(list.as_array().unwrap().len(), 0, "{list}");
    let out = analyst(&c, &["schedule", "run-now", "nightly"]);
    assert!(!out.status.success(), "a removed schedule does not run");
    // Its history stays reportable.
    let json = analyst_json(&c, &["report", "nightly", "--format", "json"]);
    assert_eq!(json["removed"], true);
    assert_eq!(json["runs"].as_array().unwrap().len(), 3);

    // Idempotent submission: the same key and spec give the same job.
    let mut args: Vec<&str> = OVERLAP.to_vec();
    args.extend(["--idempotency-key", "quarterly-2025-q1"]);
    let (first, _) = c.submit(&args);
    let (second, _) = c.submit(&args);
    assert_eq!(first["job_id"], second["job_id"]);
    assert_eq!(first["state"], "succeeded");
}

/// Opens the page in headless Chromium (installing Debian's `chromium` if it is absent and we
/// may) and checks it renders: the DOM comes back with the chart and no error is logged.
fn check_renders_in_chromium(page: &Path) {
    let Some(chromium) = find_chromium() else {
        eprintln!("chromium is not installed and could not be installed: rendering not checked");
        return;
    };
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("running chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chromium failed: {log}");
    assert!(
        dom.contains("<svg class=\"chart\""),
        "rendered DOM: {dom}\n{log}"
    );
    assert_eq!(dom.matches("class=\"point\"").count(), 3);
    // Console errors from the page are logged as `CONSOLE(…)` / "Uncaught".
    for line in log.lines() {
        let console_error = line.contains("CONSOLE") && line.contains("rror");
        assert!(
            !console_error && !line.contains("Uncaught"),
            "the page logged an error: {line}"
        );
    }
}

fn find_chromium() -> Option<PathBuf> {
    let find = || {
        ["chromium", "chromium-browser"].iter().find_map(|name| {
            let out = Command::new("sh")
                .args(["-c", &format!("command -v {name}")])
                .output()
                .ok()?;
            let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            (out.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
        })
    };
    if let Some(p) = find() {
        return Some(p);
    }
    // Debian's package, when we are allowed to install it.
    let _ = Command::new("sh")
        .args([
            "-c",
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
             sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1",
        ])
        .status();
    find()
}

// ---------------------------------------------------------------- restart safety

/// A coordinator process started on a fixed address (so that nodes find it again after a
/// restart), which we may SIGKILL.
struct Coordinator {
    child: Child,
    _stdin: Option<std::process::ChildStdin>,
}

impl Coordinator {
    fn start(dir: &Path, addr: SocketAddr, log_name: &str) -> Coordinator {
        Coordinator::start_with(dir, addr, log_name, &[], "")
    }

    /// Starts a coordinator; `settings` are extra top-level config lines.
    fn start_with(
        dir: &Path,
        addr: SocketAddr,
        log_name: &str,
        env: &[(&str, &str)],
        settings: &str,
    ) -> Coordinator {
        let cfg = dir.join("coordinator-fixed.toml");
        std::fs::write(
            &cfg,
            format!(
                "listen = \"{addr}\"\ndatabase = \"coordinator.db\"\noffer_timeout_secs = 10\n{settings}\n[tls]\nca = \"pki/ca.pem\"\ncert = \"pki/coordinator.pem\"\nkey = \"pki/coordinator.key\"\n"
            ),
        )
        .unwrap();
        let log = dir.join(format!("logs/{log_name}.log"));
        let mut child = Command::new(&bins().0)
            .args(["coordinator", "serve", "--config"])
            .arg(&cfg)
            .arg("--stop-on-stdin-eof")
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting the coordinator");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            format!("listening {addr}"),
            "log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let stdin = child.stdin.take();
        Coordinator {
            child,
            _stdin: stdin,
        }
    }

    /// Sends SIGTERM and waits (at most 15 s) for the process to exit; returns its exit code
    /// and how long it took.
    fn term(&mut self) -> (Option<i32>, Duration) {
        let sent = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        while sent.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(exit)) = self.child.try_wait() {
                return (exit.code(), sent.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the coordinator did not exit within 15 s of SIGTERM");
    }

    fn kill9(&mut self) {
        let status = Command::new("kill")
            .args(["-9", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let _ = self.child.wait();
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        stop_gracefully(&mut self.child, self._stdin.take());
    }
}

/// `report nightly --format html ARGS`, written to a file as an operator would: the page.
fn nightly_html_report(c: &Consortium, args: &[&str]) -> String {
    let mut all = vec![
        "report",
        "nightly",
        "--format",
        "html",
        "--out",
        "nightly.html",
    ];
    all.extend(args);
    analyst_ok(c, &all);
    std::fs::read_to_string(c.path().join("nightly.html")).unwrap()
}

/// A free loopback address for a coordinator that must restart on the same one.
fn free_udp_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_udp_port()))
}

fn job_json(c: &Consortium, job_id: &str) -> Value {
    analyst_json(c, &["job", "status", job_id, "--format", "json"])
}

fn wait_connected(c: &Consortium, names: &[&str], within: Duration) {
    c.wait_connected_within(names, within);
}

/// Waits until the node's current process has logged its registration with the coordinator
/// (a restarted node's log file starts afresh).
fn wait_registered(c: &Consortium, name: &str, within: Duration) {
    let log = c.path().join(format!("logs/{name}.log"));
    let deadline = Instant::now() + within;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("registered with the coordinator") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not register again: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// acme and globex with `rows` synthetic customers each (`overlap`, `seed` as `synth` takes
/// them), under a coordinator on a fixed address (so that a restart keeps it) with `settings`,
/// logging as `log_name`. Returns them, the true overlap and the coordinator.
fn pair_at_a_fixed_address(
    (rows, overlap, seed): (u64, f64, u64),
    log_name: &str,
    settings: &str,
) -> (Consortium, u64, Coordinator) {
    let mut c = Consortium::new();
    let truth = c.synth("acme,globex", rows, overlap, seed);
    let expected = truth["pairwise_overlap"]["acme,globex"].as_u64().unwrap();
    let addr = free_udp_addr();
    let coordinator = Coordinator::start_with(c.path(), addr, log_name, &[], settings);
    c.addr = Some(addr);
    start_nodes(&mut c);
    (c, expected, coordinator)
}

#[test]
fn sigkill_mid_job_loses_nothing_and_runs_nothing_twice() {
    // Two jobs may run at once, so a third one waits, pending, when the coordinator is killed.
    let limit = "max_running_jobs = 2\n";
    let (c, expected, mut coordinator) =
        pair_at_a_fixed_address((20_000, 0.3, 5), "coordinator-1", limit);
    let addr = c.addr.unwrap();

    add_schedule(&c, "weekly", "0 2 * * 1", "0");

    // A plain job and a scheduled run, both under way when the coordinator is killed, and a
    // queued job that has not been offered yet.
    let mut args = vec!["job", "submit"];
    args.extend(OVERLAP);
    args.extend(["--format", "json"]);
    let plain = analyst_json(&c, &args);
    let plain_id = plain["job_id"].as_str().unwrap().to_owned();
    let scheduled = analyst_json(&c, &["schedule", "run-now", "weekly", "--format", "json"]);
    let scheduled_id = scheduled["job_id"].as_str().unwrap().to_owned();
    let queued = analyst_json(&c, &args);
    let queued_id = queued["job_id"].as_str().unwrap().to_owned();
    wait_running(&c, &[&plain_id, &scheduled_id]);
    assert_eq!(job_json(&c, &queued_id)["state"], "pending");
    coordinator.kill9();

    let _coordinator = Coordinator::start_with(c.path(), addr, "coordinator-2", &[], limit);
    // Nodes reconnect by themselves.
    wait_connected(&c, &["acme", "globex"], Duration::from_secs(60));

    // Nothing lost: the two jobs under way are failed with the restart as the reason once their
    // dead runner's leases expire, and never run twice (their history has exactly one terminal
    // entry and no second `running`); the queued one is resumed and succeeds, run once.
    let ended = wait_ended(&c, &[&plain_id, &scheduled_id, &queued_id]);
    for job in &ended[..2] {
        assert!(
            reason_of(job, "failed").contains("coordinator restarted"),
            "{job}"
        );
    }
    assert_eq!(ended[2]["state"], "succeeded", "{}", ended[2]);
    assert_eq!(ended[2]["intersection"].as_u64(), Some(expected));
    for job in &ended {
        let history = job["history"].as_array().unwrap();
        assert_eq!(
            history.iter().filter(|h| h["state"] == "running").count(),
            1,
            "{job}"
        );
        assert_eq!(
            history
                .iter()
                .filter(
                    |h| ["succeeded", "failed", "vetoed"].contains(&h["state"].as_str().unwrap())
                )
                .count(),
            1,
            "{job}"
        );
    }
    let log = std::fs::read_to_string(c.path().join("logs/coordinator-2.log")).unwrap();
    assert!(log.contains("pending job resumed"), "{log}");

    // The scheduled run is not fired again (max-retries 0), across several scheduler ticks.
    std::thread::sleep(Duration::from_secs(3));
    let shown = analyst_json(&c, &["schedule", "show", "weekly", "--format", "json"]);
    let runs = shown["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{shown}");
    assert_eq!(runs[0]["job_id"], scheduled_id.as_str());
    assert_eq!(runs[0]["state"], "failed");
    let jobs = analyst_json(&c, &["job", "list", "--limit", "100", "--format", "json"]);
    assert_eq!(jobs.as_array().unwrap().len(), 3, "{jobs}");

    // A failed job can be retried: a new job, same spec, linked to the old one.
    let retried = analyst_json(
        &c,
        &[
            "job",
            "retry",
            &plain_id,
            "--wait",
            "--timeout",
            "180",
            "--format",
            "json",
        ],
    );
    assert_eq!(retried["state"], "succeeded", "{retried}");
    assert_ne!(retried["job_id"], plain_id.as_str());
    assert_eq!(retried["intersection"].as_u64(), Some(expected));
    assert!(
        retried["history"][0]["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("retry of job {plain_id}")),
        "{retried}"
    );
    // Retrying again gives the same new job (idempotent); a succeeded job is not retried.
    let again = analyst_json(&c, &["job", "retry", &plain_id, "--format", "json"]);
    assert_eq!(again["job_id"], retried["job_id"]);
    let out = analyst(&c, &["job", "retry", retried["job_id"].as_str().unwrap()]);
    assert!(!out.status.success());
}

/// Waits (at most 120 s) until every job in `ids` has ended; returns them in order.
fn wait_ended(c: &Consortium, ids: &[&str]) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let jobs: Vec<Value> = ids.iter().map(|id| job_json(c, id)).collect();
        if jobs
            .iter()
            .all(|j| !["pending", "offered", "running"].contains(&j["state"].as_str().unwrap()))
        {
            return jobs;
        }
        assert!(Instant::now() < deadline, "jobs never ended: {jobs:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The operator's walkthrough of issue 6: a nightly schedule run by hand several times, with the
/// coordinator SIGKILLed and restarted and a node SIGKILLed and restarted in between; every run is
/// in the history and the report exactly once, the failure with its reason, and the page renders.
#[test]
fn operator_walkthrough_survives_coordinator_and_node_restarts() {
    let (mut c, expected, mut coordinator) =
        pair_at_a_fixed_address((400, 0.5, 21), "coordinator-op-1", "");
    let addr = c.addr.unwrap();
    add_schedule(&c, "nightly", "0 2 * * *", "0");
    let run_now = |c: &Consortium| {
        // run-now records the run at the request's millisecond: keep runs apart.
        std::thread::sleep(Duration::from_millis(5));
        // `--wait` exits non-zero for a job that did not succeed; the JSON is printed either way.
        let out = analyst(c, &RUN_NIGHTLY_NOW);
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "run-now printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };

    let first = run_now(&c);
    assert_eq!(first["state"], "succeeded", "{first}");

    coordinator.kill9();
    let _coordinator = Coordinator::start(c.path(), addr, "coordinator-op-2");
    wait_connected(&c, &["acme", "globex"], Duration::from_secs(60));
    let second = run_now(&c);
    assert_eq!(second["state"], "succeeded", "{second}");

    // A partner's node dies: the run fails with a reason that names it.
    let globex = c.node("globex").pid().to_string();
    let status = Command::new("kill").args(["-9", &globex]).status().unwrap();
    assert!(status.success());
    // Right away: the coordinator may not have noticed yet (that takes the QUIC idle timeout),
    // so the offer itself may find the node gone.
    let third = run_now(&c);
    assert_eq!(third["state"], "failed", "{third}");
    let reason = third["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("node 'globex'"), "{third}");

    // It comes back by itself once restarted, and the next run succeeds. The coordinator may
    // still list the dead process's connection as connected (until the QUIC idle timeout), so
    // wait for the new process to be registered: the coordinator acknowledges a node only
    // after it routes offers to the new connection.
    c.start_node("globex");
    wait_registered(&c, "globex", Duration::from_secs(60));
    wait_connected(&c, &["acme", "globex"], Duration::from_secs(60));
    let fourth = run_now(&c);
    assert_eq!(fourth["state"], "succeeded", "{fourth}");

    let ids: Vec<&str> = [&first, &second, &third, &fourth]
        .iter()
        .map(|j| j["job_id"].as_str().unwrap())
        .collect();
    let shown = analyst_json(&c, &["schedule", "show", "nightly", "--format", "json"]);
    let runs = shown["runs"].as_array().unwrap();
    let run_ids: Vec<&str> = runs.iter().map(|r| r["job_id"].as_str().unwrap()).collect();
    assert_eq!(run_ids, ids, "every run once, in order: {shown}");
    let states: Vec<&str> = runs.iter().map(|r| r["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["succeeded", "succeeded", "failed", "succeeded"]);
    for run in runs.iter().filter(|r| r["state"] == "succeeded") {
        assert_eq!(run["intersection"].as_u64(), Some(expected), "{run}");
    }
    let jobs = analyst_json(&c, &["job", "list", "--limit", "100", "--format", "json"]);
    assert_eq!(
        jobs.as_array().unwrap().len(),
        4,
        "no job run twice: {jobs}"
    );

    let html = nightly_html_report(&c, &[]);
    for id in &ids {
        assert!(html.contains(id), "{id} missing from the report");
    }
    let escaped = reason
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;");
    assert!(
        html.contains(&escaped),
        "the failure's reason is in the report"
    );
    assert_eq!(
        html.matches("<circle class=\"point\"").count(),
        3,
        "one point per released count"
    );
    check_renders_in_chromium(&c.path().join("nightly.html"));
    let json = analyst_json(&c, &["report", "nightly", "--format", "json"]);
    assert_eq!(json["runs"].as_array().unwrap().len(), 4, "{json}");
}

/// Waits until every job in `ids` is running.
fn wait_running(c: &Consortium, ids: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let states: Vec<Value> = ids
            .iter()
            .map(|id| job_json(c, id)["state"].clone())
            .collect();
        if states.iter().all(|s| s == "running") {
            return;
        }
        assert!(
            states
                .iter()
                .all(|s| s == "pending" || s == "offered" || s == "running"),
            "a job ended before the signal ({states:?}); make the dataset larger"
        );
        assert!(Instant::now() < deadline, "jobs never ran: {states:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_stops_gracefully_idle_and_mid_job() {
    let (c, _, mut coordinator) =
        pair_at_a_fixed_address((20_000, 0.3, 9), "coordinator-term-1", "");
    let addr = c.addr.unwrap();

    // Idle: exits 0 promptly.
    let (code, took) = coordinator.term();
    assert_eq!(code, Some(0), "exit after SIGTERM while idle");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let log = std::fs::read_to_string(c.path().join("logs/coordinator-term-1.log")).unwrap();
    assert!(log.contains("coordinator stopped"), "{log}");

    // Nodes keep retrying and reconnect to the restarted coordinator.
    // One job at a time, so a second job waits, pending, when the coordinator is stopped.
    let limit = "max_running_jobs = 1\n";
    let mut coordinator = Coordinator::start_with(c.path(), addr, "coordinator-term-2", &[], limit);
    wait_connected(&c, &["acme", "globex"], Duration::from_secs(60));

    // While a job runs: exits 0 promptly, and the job is failed with the graceful-stop reason.
    let mut args = vec!["job", "submit"];
    args.extend(OVERLAP);
    args.extend(["--format", "json"]);
    let job = analyst_json(&c, &args);
    let job_id = job["job_id"].as_str().unwrap().to_owned();
    let queued = analyst_json(&c, &args);
    let queued_id = queued["job_id"].as_str().unwrap().to_owned();
    wait_running(&c, &[&job_id]);
    assert_eq!(job_json(&c, &queued_id)["state"], "pending");
    let (code, took) = coordinator.term();
    assert_eq!(code, Some(0), "exit after SIGTERM mid-job");
    assert!(took < Duration::from_secs(10), "took {took:?}");

    let _coordinator = Coordinator::start_with(c.path(), addr, "coordinator-term-3", &[], limit);
    wait_connected(&c, &["acme", "globex"], Duration::from_secs(60));
    let job = job_json(&c, &job_id);
    assert_eq!(job["state"], "failed", "{job}");
    let history = job["history"].as_array().unwrap();
    assert!(
        history.iter().any(|h| h["reason"]
            .as_str()
            .unwrap()
            .contains("coordinator shut down while the job was in progress")),
        "the job is failed with the graceful-stop reason: {job}"
    );
    assert_eq!(
        history.iter().filter(|h| h["state"] == "running").count(),
        1,
        "{job}"
    );
    // The queued job was handed over, not failed: the next start resumes it at once.
    let queued = &wait_ended(&c, &[&queued_id])[0];
    assert_eq!(queued["state"], "succeeded", "{queued}");
    assert_eq!(
        queued["history"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["state"] == "running")
            .count(),
        1,
        "{queued}"
    );
    // And the nodes run jobs again.
    let (again, code) = c.submit(&OVERLAP);
    assert_eq!(code, Some(0), "{again}");
    assert_eq!(again["state"], "succeeded", "{again}");
}

// ---------------------------------------------------------------- notifications

#[test]
fn ended_runs_are_notified_by_file_and_command() {
    let mut c = Consortium::new();
    let truth = c.synth("acme,globex", 300, 0.5, 13);
    let expected = truth["pairwise_overlap"]["acme,globex"].as_u64().unwrap();
    // The operator lists where schedules may write files and which programs they may run.
    let notify_root = c.path().join("notify-root");
    let hooks = c.path().join("hooks");
    std::fs::create_dir_all(&notify_root).unwrap();
    std::fs::create_dir_all(&hooks).unwrap();
    let done_log = c.path().join("done.log");
    let write_hook = |name: &str, body: &str| {
        let path = hooks.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        path.to_str().unwrap().to_owned()
    };
    // The run's facts reach the program through the environment only.
    let on_done = write_hook(
        "record",
        &format!(
            "printf '%s %s %s %s\\n' \"$CLEANROOM_SCHEDULE\" \"$CLEANROOM_JOB_ID\" \"$CLEANROOM_STATE\" \"$CLEANROOM_RESULT\" >> '{}'",
            done_log.display()
        ),
    );
    let failing_hook = write_hook("fail", "echo oops >&2; exit 3");
    let addr = free_udp_addr();
    let settings = format!(
        "notify_dirs = [\"{}\"]\non_done_dirs = [\"{}\"]\n",
        notify_root.display(),
        hooks.display()
    );
    let _coordinator =
        Coordinator::start_with(c.path(), addr, "coordinator-notify", &[], &settings);
    c.addr = Some(addr);
    start_nodes(&mut c);

    let notify_dir = notify_root.join("nightly");
    let notify_arg = notify_dir.to_str().unwrap().to_owned();
    let mut args = vec![
        "schedule",
        "add",
        "notified",
        "--cron",
        "0 2 1 1 *",
        "--max-retries",
        "0",
        "--on-done",
        &on_done,
        "--notify-dir",
        &notify_arg,
        "--format",
        "json",
        "--",
    ];
    args.extend(OVERLAP);
    let added = analyst_json(&c, &args);
    assert_eq!(added["notify_dir"], notify_arg.as_str(), "{added}");
    assert_eq!(added["on_done"], on_done.as_str(), "{added}");

    // Refused, each with its reason: a relative notify directory, one outside the listed
    // directories (also by '..' or a link), a shell command, a program outside the hooks.
    let outside = c.path().join("elsewhere");
    std::fs::create_dir_all(&outside).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&outside, notify_root.join("link")).unwrap();
    let dotdot = format!("{}/../elsewhere", notify_root.display());
    let via_link = format!("{}/link/x", notify_root.display());
    let outside_arg = outside.to_str().unwrap().to_owned();
    let outside_program = write_hook("../elsewhere-hook", "true");
    for (flag, value, why) in [
        ("--notify-dir", "relative/dir", "absolute"),
        (
            "--notify-dir",
            outside_arg.as_str(),
            "outside the directories",
        ),
        ("--notify-dir", dotdot.as_str(), "without '..'"),
        ("--notify-dir", via_link.as_str(), "outside the directories"),
        (
            "--on-done",
            "echo hi >> /tmp/x",
            "absolute path of a program",
        ),
        ("--on-done", outside_program.as_str(), "without '..'"),
        ("--on-done", "/bin/sh", "outside the directories"),
    ] {
        let mut bad = vec![
            "schedule",
            "add",
            "bad",
            "--cron",
            "0 2 1 1 *",
            flag,
            value,
            "--",
        ];
        bad.extend(OVERLAP);
        let out = analyst(&c, &bad);
        assert!(!out.status.success(), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{flag} {value}: {err}");
    }

    // A failing program is logged, never fatal.
    let mut failing = vec![
        "schedule",
        "add",
        "failing",
        "--cron",
        "0 2 1 1 *",
        "--max-retries",
        "0",
        "--on-done",
        &failing_hook,
        "--",
    ];
    failing.extend(OVERLAP);
    analyst_ok(&c, &failing);

    let mut job_ids = Vec::new();
    for name in ["notified", "notified", "failing"] {
        let job = analyst_json(
            &c,
            &[
                "schedule",
                "run-now",
                name,
                "--wait",
                "--timeout",
                "120",
                "--format",
                "json",
            ],
        );
        assert_eq!(job["state"], "succeeded", "{job}");
        if name == "notified" {
            job_ids.push(job["job_id"].as_str().unwrap().to_owned());
        }
        std::thread::sleep(Duration::from_millis(5));
    }

    // One JSON file per run, and one line per run from the command.
    let deadline = Instant::now() + Duration::from_secs(20);
    let files = loop {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&notify_dir)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "json"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        let lines = std::fs::read_to_string(&done_log)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if files.len() >= 2 && lines >= 2 {
            break files;
        }
        assert!(
            Instant::now() < deadline,
            "notifications missing: {files:?}, {lines} command lines"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(files.len(), 2, "{files:?}");
    let mut seen = Vec::new();
    for file in &files {
        let run: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        assert_eq!(run["schedule"], "notified", "{run}");
        assert_eq!(run["state"], "succeeded", "{run}");
        assert_eq!(run["result"].as_u64(), Some(expected), "{run}");
        assert_eq!(run["note"], "run-now", "{run}");
        seen.push(run["job_id"].as_str().unwrap().to_owned());
    }
    seen.sort();
    let mut want = job_ids.clone();
    want.sort();
    assert_eq!(seen, want);
    let log = std::fs::read_to_string(&done_log).unwrap();
    for id in &job_ids {
        assert!(
            log.lines()
                .any(|l| l == format!("notified {id} succeeded {expected}")),
            "{log}"
        );
    }

    // The failing command was run and logged; the coordinator carries on; nothing is
    // notified twice across further scheduler ticks.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(c.path().join("logs/coordinator-notify.log")).unwrap();
        if log.contains("the on-done command failed") {
            break;
        }
        assert!(Instant::now() < deadline, "{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(std::fs::read_dir(&notify_dir).unwrap().count(), 2);
    assert_eq!(
        std::fs::read_to_string(&done_log).unwrap().lines().count(),
        2
    );
    let list = analyst_json(&c, &["schedule", "list", "--format", "json"]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
}
