//! End to end with faults in real processes: a node killed with SIGKILL at each phase of a
//! running job, a peer that accepts a job and then stalls, and one that leaves the coordinator
//! mid-job (the honest node must then stop at once). The job must end `failed` with a
//! reason naming the node within a deadline, nothing may be released for it, and the surviving
//! node must keep serving. And a node whose audit log cannot be written (a full disk, modelled
//! by a file-size limit) must refuse every job without reading data, and recover.

// Test-only code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use cleanroom_e2e::fake_node::{self, BASEPOINT};
use cleanroom_e2e::{Consortium, open_agreement, overlap_between};
use serde_json::Value;

/// How long after the kill the job must have ended: the QUIC idle timeout (30 s) plus slack for
/// two shared cores running debug builds.
const KILL_DEADLINE: Duration = Duration::from_secs(60);

/// How often a case is tried with an earlier kill when the job had already ended at the kill.
const KILL_ATTEMPTS: u32 = 6;

/// What we expect of a stalling peer: the honest node gives up within this.
const STALL_DEADLINE: Duration = Duration::from_secs(120);

fn match_args(pair: &str) -> Vec<String> {
    let (a, b) = pair.split_once(',').unwrap();
    [
        "match",
        "--between",
        pair,
        "--dataset",
        &format!("{a}:customers"),
        "--dataset",
        &format!("{b}:customers"),
        "--on",
        "email",
        "--purpose",
        "fraud-detection",
        "--reveal-to",
        a,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `cleanroom job submit ARGS --format json` without waiting: the job id.
fn submit_nowait(c: &Consortium, args: &[String]) -> String {
    c.submit_nowait(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn status(c: &Consortium, job_id: &str) -> Value {
    c.job_status(job_id)
}

fn finished(job: &Value) -> bool {
    ["succeeded", "failed", "vetoed", "cancelled"]
        .iter()
        .any(|s| job["state"] == *s)
}

/// Polls the job until it has finished or `limit` has passed; returns it and when it ended.
fn wait_job(c: &Consortium, job_id: &str, limit: Duration) -> (Value, Instant) {
    let job = c.wait_job(job_id, limit);
    (job, Instant::now())
}

fn log_of(c: &Consortium, name: &str) -> String {
    std::fs::read_to_string(c.path().join(format!("logs/{name}.log"))).unwrap_or_default()
}

/// Lines of `name`'s log that belong to `job_id` and contain `needle`.
fn job_log_has(c: &Consortium, name: &str, job_id: &str, needle: &str) -> bool {
    log_of(c, name)
        .lines()
        .any(|l| l.contains(job_id) && l.contains(needle))
}

fn sigkill(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Every file under `dir` whose name contains `needle`.
fn files_named(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().unwrap().to_string_lossy().contains(needle) {
                found.push(p.display().to_string());
            }
        }
    }
    found
}

fn pair(rows: u64, seed: u64) -> Consortium {
    let (c, _) = Consortium::open_pair(rows, 0.3, seed);
    c
}

/// When to kill, relative to the victim's progress in an uninterrupted job.
#[derive(Clone, Copy, Debug)]
enum When {
    /// As soon as the job is `running` (offers accepted; data plane being set up).
    Running,
    /// As soon as the victim logs "dataset loaded" (blinding starts).
    Loaded,
    /// Half way between "dataset loaded" and the end of a baseline job.
    MidExchange,
    /// At 90 % of the way to the end of a baseline job.
    NearEnd,
}

// A node killed at each phase: five cases over three tests, so that the idle timeouts they wait
// out run side by side (each case waits about 30 s for the QUIC idle timeout).

#[test]
fn a_node_killed_as_the_job_starts_or_once_loaded_fails_the_job_and_the_survivor_keeps_serving() {
    kill_cases(31, &[(When::Running, "globex"), (When::Loaded, "acme")]);
}

#[test]
fn a_node_killed_mid_exchange_fails_the_job_and_the_survivor_keeps_serving() {
    kill_cases(
        32,
        &[(When::MidExchange, "globex"), (When::MidExchange, "acme")],
    );
}

#[test]
fn a_node_killed_near_the_end_fails_the_job_or_both_results_are_whole() {
    kill_cases(33, &[(When::NearEnd, "acme")]);
}

/// Kills `victim` at `when` of a match job, for each case in turn; checks the job fails cleanly
/// (or, killed after both reports, succeeds whole) and the pair serves the next job.
fn kill_cases(seed: u64, cases: &[(When, &str)]) {
    let mut c = pair(30_000, seed);

    // Baseline: an uninterrupted match job, to know how long each phase lasts here.
    let t0 = Instant::now();
    let base = submit_nowait(&c, &match_args("acme,globex"));
    let mut loaded_at = None;
    let (job, done_at) = loop {
        if loaded_at.is_none()
            && job_log_has(&c, "acme", &base, "dataset loaded")
            && job_log_has(&c, "globex", &base, "dataset loaded")
        {
            loaded_at = Some(t0.elapsed());
        }
        let job = status(&c, &base);
        if finished(&job) {
            break (job, t0.elapsed());
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "baseline hung");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(job["state"], "succeeded", "{job}");
    let loaded_at = loaded_at.unwrap_or(done_at / 4);
    eprintln!("baseline: datasets loaded after {loaded_at:?}, done after {done_at:?}");

    let mut report = Vec::new();
    for &(when, victim) in cases {
        let survivor = if victim == "acme" { "globex" } else { "acme" };
        // Where in the baseline's exchange to kill. The baseline may have run under more load
        // than this job (other tests share the cores), so a job that ended before the kill is
        // run again with the kill earlier: every case must kill a job still running.
        let mut share = match when {
            When::NearEnd => 0.9,
            _ => 0.5,
        };
        for attempt in 1..=KILL_ATTEMPTS {
            let t0 = Instant::now();
            let job_id = submit_nowait(&c, &match_args("acme,globex"));
            // Wait for the moment.
            loop {
                let ready = match when {
                    When::Running => status(&c, &job_id)["state"] == "running",
                    When::Loaded => job_log_has(&c, victim, &job_id, "dataset loaded"),
                    When::MidExchange => {
                        job_log_has(&c, victim, &job_id, "dataset loaded")
                            && t0.elapsed() >= loaded_at + (done_at - loaded_at).mul_f64(share)
                    }
                    When::NearEnd => {
                        t0.elapsed() >= loaded_at + (done_at - loaded_at).mul_f64(share)
                    }
                };
                if ready {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(300),
                    "{when:?} never came"
                );
                std::thread::sleep(Duration::from_millis(if matches!(when, When::Running) {
                    5
                } else {
                    20
                }));
            }
            let pid = c.node(victim).pid();
            sigkill(pid);
            let killed_at = Instant::now();
            let at_kill = status(&c, &job_id);
            // Keep the killed process's log for the report, then forget the process.
            let victim_log = log_of(&c, victim);
            c.nodes.retain(|p| p.name != victim);

            let (job, ended) = wait_job(&c, &job_id, KILL_DEADLINE + Duration::from_secs(60));
            let took = ended.duration_since(killed_at);
            report.push(format!(
            "{when:?}, attempt {attempt} (killed {victim} at {:?}, job was {}): {} after {took:?}: {}",
            killed_at.duration_since(t0),
            at_kill["state"],
            job["state"],
            job["reason"]
        ));
            eprintln!("{}", report.last().unwrap());
            if job["state"] == "succeeded" {
                // The kill came after both reports: nothing to check but that the result is whole.
                assert_eq!(job["results"].as_array().unwrap().len(), 2, "{job}");
            } else {
                assert_eq!(job["state"], "failed", "{when:?}: {job}");
                assert!(
                    took <= KILL_DEADLINE,
                    "{when:?}: the job took {took:?} to fail after {victim} was killed"
                );
                let reason = job["reason"].as_str().unwrap();
                assert!(
                    reason.contains(victim),
                    "{when:?}: the reason names the killed node: {reason}"
                );
                // Nothing released for a failed job.
                assert!(job["intersection"].is_null(), "{when:?}: {job}");
                assert!(
                    job["results"].as_array().is_none_or(Vec::is_empty),
                    "{when:?}: a failed job has results: {job}"
                );
                // No membership or temporary file for it on the survivor.
                let leftovers = files_named(&c.path().join(format!("state-{survivor}")), &job_id);
                assert!(
                    leftovers.is_empty(),
                    "{when:?}: {survivor} kept files for the failed job: {leftovers:?}"
                );
                // The survivor audited the failure.
                let slog = log_of(&c, survivor);
                assert!(
                    !slog.contains("panicked"),
                    "{survivor} panicked:\n{slog}\n--- {victim}:\n{victim_log}"
                );
            }
            // The survivor is still up.
            assert!(
                c.nodes
                    .iter_mut()
                    .find(|p| p.name == survivor)
                    .unwrap()
                    .is_running(),
                "{survivor} died"
            );

            // Restart the victim (same config, same state dir): leftovers from the killed run are
            // named, then the pair serves the next job.
            let leftovers = files_named(&c.path().join(format!("state-{victim}")), &job_id);
            assert!(
                leftovers.is_empty() || job["state"] == "succeeded",
                "{when:?}: the killed {victim} left files for the failed job: {leftovers:?}"
            );
            c.start_node(victim);
            let t1 = Instant::now();
            let next = loop {
                c.wait_connected(&[victim]);
                let (next, _) = c.submit(&overlap_between("acme,globex"));
                // The coordinator may still hold the killed node's dead control connection until
                // the idle timeout; the first job may fail on it.
                if next["state"] == "succeeded" || t1.elapsed() > Duration::from_secs(90) {
                    break next;
                }
                eprintln!(
                    "after restarting {victim}: {} ({}) — retrying",
                    next["state"], next["reason"]
                );
                std::thread::sleep(Duration::from_secs(2));
            };
            assert_eq!(
                next["state"], "succeeded",
                "{when:?}: after the kill: {next}"
            );
            if at_kill["state"] != "succeeded" {
                break;
            }
            assert!(
                attempt < KILL_ATTEMPTS,
                "{when:?}: the job had ended before the kill in every attempt:\n{}",
                report.join("\n")
            );
            share *= 0.6;
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// Plays node "mallory" for one job: joins it as initiator, sends `send_points` of its 64
/// declared points, and then stalls (keeping the connection alive) for `stall`.
async fn stalling_mallory(
    dir: std::path::PathBuf,
    coordinator: SocketAddr,
    send_points: usize,
    stall: Duration,
) {
    let mut job = fake_node::join_next_job(&dir, coordinator, "mallory", "acme", 64).await;
    if send_points > 0 {
        // Valid points, fewer than declared (a stall never gets as far as duplicate checks).
        job.send_blinded(BASEPOINT.repeat(send_points), None).await;
    }
    // Stall: send nothing more, but keep the connection (and the control session) alive.
    let _ = tokio::time::timeout(stall, job.conn.closed()).await;
}

/// Plays node "mallory" for one job: joins it as initiator with its hello, then leaves the
/// coordinator but keeps its data-plane connection open and silent for up to `stay`.
async fn mallory_leaving_the_coordinator(
    dir: std::path::PathBuf,
    coordinator: SocketAddr,
    stay: Duration,
) -> Result<(), tokio::time::error::Elapsed> {
    let job = fake_node::join_next_job(&dir, coordinator, "mallory", "acme", 64).await;
    job.leave_the_coordinator();
    tokio::time::timeout(stay, job.conn.closed())
        .await
        .map(drop)
}

/// A peer leaves the coordinator mid-job and keeps its data-plane connection open and silent.
/// The coordinator fails the job and drops acme's job stream; acme stops at once instead of
/// waiting out its silence deadline (60 s): it audits the coordinator's stop and closes the
/// peer's connection.
#[test]
fn a_node_stops_a_job_the_coordinator_gave_up() {
    let (mut c, _) = Consortium::with_coordinator("acme,globex", 300, 0.5, 33);
    let coordinator = c.addr.unwrap();
    c.start_pair_open_to_mallory();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let evil = rt.spawn(mallory_leaving_the_coordinator(
        c.path().to_owned(),
        coordinator,
        Duration::from_secs(120),
    ));
    c.wait_connected(&["mallory"]);
    let t0 = Instant::now();
    let job_id = c.submit_nowait(&overlap_between("mallory,acme"));
    let (job, _) = wait_job(&c, &job_id, Duration::from_secs(60));
    assert_eq!(job["state"], "failed", "{job}");
    let reason = c
        .audited_error("acme", &job_id)
        .unwrap_or_else(|| panic!("acme audited no end of {job_id}:\n{}", log_of(&c, "acme")));
    let took = t0.elapsed();
    assert!(
        reason.contains("the coordinator stopped the job"),
        "acme's audited reason: {reason}"
    );
    assert!(
        took < Duration::from_secs(30),
        "acme stopped after {took:?}"
    );
    // acme closed mallory's data-plane connection as it stopped.
    let closed = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(20), evil).await })
        .expect("mallory's task ends")
        .unwrap();
    assert!(closed.is_ok(), "acme left mallory's connection open");
    // acme keeps serving.
    let (next, _) = c.submit(&overlap_between("globex,acme"));
    assert_eq!(next["state"], "succeeded", "{next}");
}

#[test]
fn a_peer_that_stalls_after_its_hello_fails_the_job_by_a_deadline() {
    stall_case(0);
}

#[test]
fn a_peer_that_stalls_mid_points_fails_the_job_by_a_deadline() {
    stall_case(1);
}

fn stall_case(send_points: usize) {
    let (mut c, _) = Consortium::with_coordinator("acme,globex", 300, 0.5, 32);
    let coordinator = c.addr.unwrap();
    c.start_pair_open_to_mallory();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let evil = rt.spawn(stalling_mallory(
        c.path().to_owned(),
        coordinator,
        send_points,
        STALL_DEADLINE + Duration::from_secs(60),
    ));
    c.wait_connected(&["mallory"]);
    let t0 = Instant::now();
    let job_id = c.submit_nowait(&overlap_between("mallory,acme"));
    let (job, ended) = wait_job(&c, &job_id, STALL_DEADLINE);
    let took = ended.duration_since(t0);
    eprintln!(
        "stalling peer ({send_points} points sent): {} after {took:?}: {}",
        job["state"], job["reason"]
    );
    evil.abort();
    assert_eq!(
        job["state"],
        "failed",
        "a stalling peer held the job for {took:?} (still {}): {job}\nacme:\n{}",
        job["state"],
        log_of(&c, "acme")
    );
    assert!(took <= STALL_DEADLINE, "{took:?}");
    assert!(job["reason"].as_str().unwrap().contains("mallory"), "{job}");
    assert!(job["intersection"].is_null(), "{job}");
    // acme keeps serving.
    let (next, _) = c.submit(&overlap_between("globex,acme"));
    assert_eq!(next["state"], "succeeded", "{next}");
}

/// `prlimit --pid PID --fsize=SOFT:unlimited`: from now on the process may not grow any file
/// past `soft` bytes (`None`: no limit).
fn limit_file_size(pid: u32, soft: Option<u64>) {
    let soft = soft.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    let out = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--fsize={soft}:unlimited"),
        ])
        .output()
        .expect("running prlimit (util-linux)");
    assert!(
        out.status.success(),
        "prlimit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_node_whose_audit_log_cannot_be_written_refuses_jobs_reads_nothing_and_recovers() {
    let (mut c, _) = Consortium::with_coordinator("acme,globex", 300, 0.3, 33);
    for (me, other) in [("acme", "globex"), ("globex", "acme")] {
        c.issue_node(me);
        c.write_node_config(me, me, &open_agreement(other));
    }
    c.start_node_limitable("acme");
    c.start_node("globex");
    c.wait_connected(&["acme", "globex"]);
    let overlap = |c: &Consortium, pair: &str| {
        let (job, _) = c.submit(&overlap_between(pair));
        job
    };
    let job = overlap(&c, "acme,globex");
    assert_eq!(job["state"], "succeeded", "{job}");

    // The disk is "full": acme may not grow any file past the audit log's present size, so its
    // next audit append fails (EFBIG, as ENOSPC would on a full disk).
    let audit = c.path().join("state-acme/audit.log");
    let size = std::fs::metadata(&audit).unwrap().len();
    let pid = c.node("acme").pid();
    limit_file_size(pid, Some(size));
    for pair in ["acme,globex", "globex,acme"] {
        let job = overlap(&c, pair);
        eprintln!(
            "audit log unwritable, {pair}: {} — {}",
            job["state"], job["reason"]
        );
        assert_eq!(job["state"], "vetoed", "{pair}: {job}");
        let reason = job["reason"].as_str().unwrap();
        assert!(
            reason.contains("node 'acme' cannot write its audit log"),
            "{pair}: the reason says why: {reason}"
        );
        // No data accessed: neither node loaded its dataset, and acme's log is unchanged (not
        // even the decision could be recorded, which is why the job was refused).
        let job_id = job["job_id"].as_str().unwrap();
        for node in ["acme", "globex"] {
            assert!(
                !job_log_has(&c, node, job_id, "dataset loaded"),
                "{pair}: {node} read its dataset for a refused job"
            );
        }
        assert_eq!(std::fs::metadata(&audit).unwrap().len(), size);
        assert!(
            log_of(&c, "acme").contains("audit log write failed; refusing the job"),
            "acme logs the failed write"
        );
    }
    assert!(
        c.nodes
            .iter_mut()
            .find(|p| p.name == "acme")
            .unwrap()
            .is_running(),
        "acme died"
    );

    // Space is back: the next job runs, and the log (with no torn line) verifies.
    limit_file_size(pid, None);
    let job = overlap(&c, "acme,globex");
    assert_eq!(job["state"], "succeeded", "after recovery: {job}");
    let verify = std::process::Command::new(&cleanroom_e2e::bins().1)
        .args(["audit", "verify", "--config"])
        .arg(c.path().join("acme.toml"))
        .current_dir(c.path())
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "acme's audit log verifies after the refused writes: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let log = log_of(&c, "acme");
    assert!(!log.contains("panicked"), "acme panicked:\n{log}");
}
