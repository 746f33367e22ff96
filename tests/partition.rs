//! End to end with a network partition between two nodes' data planes: a UDP proxy on loopback
//! (`cleanroom_e2e::proxy`) sits between the initiator (acme) and the responder (globex), which
//! advertises the proxy's address, so the coordinator's `Start` sends acme through it. The test
//! cuts the proxy mid-job (every datagram dropped, both ways) and heals it.
//!
//! - Shorter than the QUIC idle timeout: QUIC retransmits, the job succeeds with the right count.
//! - Longer than the idle timeout: both nodes fail the job with a readable reason, audit it,
//!   release nothing; after healing, the pair serves the next job.
//!
//! The second test puts the proxy on the control plane instead, between acme and the
//! coordinator (acme's config names the proxy as its coordinator): a short cut while a job runs
//! is survived; a long one fails the job with a readable reason and no result, and acme
//! reconnects by itself once healed and serves the next job.
//!
//! The idle timeout is the transport's default (30 s, `TransportTuning`); nodes have no setting
//! for it, so the long cases wait that long.

// Test-only code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cleanroom_e2e::proxy::UdpProxy;
use cleanroom_e2e::{Consortium, OVERLAP, open_agreement, reason_of};
use serde_json::Value;

/// Rows per side: enough that the exchange is still under way when the cut comes.
const ROWS: u64 = 20_000;
/// The short partition, well under the idle timeout.
const SHORT: Duration = Duration::from_secs(5);

/// The data-plane address a node logged at start (`node listening … data_plane=ADDR`).
pub(crate) fn bound_data_plane(c: &Consortium, name: &str) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = c.node(name).log_text();
        let addr = log
            .lines()
            .filter(|l| l.contains("node listening"))
            .find_map(|l| {
                let rest = &l[l.find("data_plane")? + "data_plane".len()..];
                let start = rest.find(|ch: char| ch.is_ascii_digit())?;
                let addr: String = rest[start..]
                    .chars()
                    .take_while(|ch| ch.is_ascii_digit() || *ch == '.' || *ch == ':')
                    .collect();
                addr.parse().ok()
            });
        if let Some(addr) = addr {
            return addr;
        }
        assert!(Instant::now() < deadline, "{name} never logged its address");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn job_log_has(c: &Consortium, name: &str, job_id: &str, needle: &str) -> bool {
    c.node(name)
        .log_text()
        .lines()
        .any(|l| l.contains(job_id) && l.contains(needle))
}

/// Submits the overlap and waits until both nodes have loaded their data for it and the
/// data-plane connection between them is up.
fn submit_and_wait_for_exchange(c: &Consortium) -> String {
    let job_id = c.submit_nowait(&OVERLAP);
    let t0 = Instant::now();
    // Both loaded and connected to each other: the exchange is under way. (Waiting for the loads
    // alone raced the initiator's dial, which follows its load: a cut before it made the job fail
    // at connecting instead of mid-exchange.)
    while !["acme", "globex"].iter().all(|n| {
        job_log_has(c, n, &job_id, "dataset loaded")
            && job_log_has(c, n, &job_id, "data plane connected")
    }) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "job {job_id} never got to its exchange: {}",
            c.job_status(&job_id)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    job_id
}

fn assert_count(job: &Value, expected: u64, what: &str) {
    assert_eq!(job["state"], "succeeded", "{what}: {job}");
    assert_eq!(
        job["intersection"].as_u64(),
        Some(expected),
        "{what}: {job}"
    );
}

#[test]
fn a_partition_shorter_than_the_idle_timeout_is_survived_and_a_longer_one_fails_cleanly() {
    let idle = cleanroom_transport::TransportTuning::default().idle_timeout;
    let (mut c, truth) = Consortium::with_coordinator("acme,globex", ROWS, 0.3, 41);
    let expected = truth["pairwise_overlap"]["acme,globex"].as_u64().unwrap();
    for (me, other) in [("acme", "globex"), ("globex", "acme")] {
        c.issue_node(me);
        c.write_node_config(me, me, &open_agreement(other));
    }
    // globex advertises the proxy, so acme (the initiator) dials it; the proxy forwards to the
    // port globex actually bound, which is known once it has started.
    let proxy = UdpProxy::start();
    c.advertise("globex", proxy.addr());
    c.start_node("globex");
    proxy.set_upstream(bound_data_plane(&c, "globex"));
    c.start_node("acme");
    c.wait_connected(&["acme", "globex"]);

    // Through the proxy, undisturbed.
    let t0 = Instant::now();
    let job = c.wait_job(&c.submit_nowait(&OVERLAP), Duration::from_secs(300));
    assert_count(&job, expected, "baseline");
    let (forwarded, _) = proxy.counts();
    assert!(forwarded > 0, "the data plane did not go through the proxy");
    eprintln!(
        "baseline through the proxy: {:?}, {forwarded} datagrams",
        t0.elapsed()
    );

    // A: cut for SHORT mid-exchange, then heal.
    let job_id = submit_and_wait_for_exchange(&c);
    proxy.cut();
    let at_cut = c.job_status(&job_id);
    std::thread::sleep(SHORT);
    proxy.heal();
    let (_, dropped) = proxy.counts();
    assert_eq!(
        at_cut["state"], "running",
        "the job ended before the cut; make it longer: {at_cut}"
    );
    let job = c.wait_job(&job_id, Duration::from_secs(300));
    eprintln!(
        "A: {SHORT:?} partition mid-exchange ({dropped} datagrams dropped): {} with {}",
        job["state"], job["intersection"]
    );
    assert!(dropped > 0, "nothing was dropped during the cut");
    assert_count(&job, expected, "after a short partition");

    // B: cut mid-exchange for longer than the idle timeout.
    let job_id = submit_and_wait_for_exchange(&c);
    proxy.cut();
    let cut_at = Instant::now();
    let at_cut = c.job_status(&job_id);
    assert_eq!(at_cut["state"], "running", "{at_cut}");
    let job = c.wait_job(&job_id, idle + Duration::from_secs(90));
    let took = cut_at.elapsed();
    // Both sides must give up on their own while the partition lasts: the side whose idle timer
    // fires second would otherwise see the first side's stateless reset after healing.
    let deadline = cut_at + idle + Duration::from_secs(90);
    let audited = loop {
        let audited: Vec<Option<String>> = ["acme", "globex"]
            .iter()
            .map(|n| c.audited_error_now(n, &job_id))
            .collect();
        if audited.iter().all(Option::is_some) || Instant::now() > deadline {
            break audited;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let partition = cut_at.elapsed();
    proxy.heal();
    eprintln!(
        "B: partition of {partition:?} (idle timeout {idle:?}): {} after {took:?}: {}",
        job["state"], job["reason"]
    );
    assert!(partition > idle, "{partition:?}");
    let reason = reason_of(&job, "failed");
    assert!(
        reason.contains("timed out") && (reason.contains("acme") || reason.contains("globex")),
        "the reason says what happened: {reason}"
    );
    // A partition is nobody's misbehaviour: neither node may be blamed for a violation.
    assert!(!reason.contains("protocol violation"), "{reason}");
    assert!(job["intersection"].is_null(), "{job}");
    assert!(
        job["results"].as_array().is_none_or(Vec::is_empty),
        "a failed job has results: {job}"
    );
    for (node, audited) in ["acme", "globex"].iter().zip(audited) {
        let audited = audited.unwrap_or_else(|| panic!("{node} audited no JobError for {job_id}"));
        eprintln!("B: {node} audited: {audited}");
        assert!(
            audited.contains("timed out") && !audited.contains("protocol violation"),
            "{node} audited: {audited}"
        );
        let log = c.node(node).log_text();
        assert!(!log.contains("panicked"), "{node} panicked:\n{log}");
    }

    // Healed: the pair serves the next job, through the proxy again.
    let job = c.wait_job(&c.submit_nowait(&OVERLAP), Duration::from_secs(300));
    assert_count(&job, expected, "after healing");
}

/// How many lines of `name`'s log contain `needle`.
fn count_lines(c: &Consortium, name: &str, needle: &str) -> usize {
    c.node(name)
        .log_text()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// A partition of the control plane: the UDP proxy sits between acme and the coordinator (acme's
/// config names the proxy as its coordinator), the data plane between the nodes is direct.
///
/// - Shorter than the idle timeout while a job runs: QUIC retransmits the reports once healed;
///   the job succeeds with the right count.
/// - Longer than the idle timeout: the coordinator loses acme's control connection and fails
///   the job with a readable reason, releasing nothing; acme's session times out too, and once
///   healed acme reconnects by itself (its backoff is at most 5 s) and serves the next job.
#[test]
fn a_control_plane_partition_shorter_than_the_idle_timeout_is_survived_and_a_longer_one_fails_cleanly()
 {
    let idle = cleanroom_transport::TransportTuning::default().idle_timeout;
    let (mut c, truth) = Consortium::with_coordinator("acme,globex", ROWS, 0.3, 43);
    let coordinator = c.addr.unwrap();
    let expected = truth["pairwise_overlap"]["acme,globex"].as_u64().unwrap();
    let proxy = UdpProxy::start();
    proxy.set_upstream(coordinator);
    for (me, other) in [("acme", "globex"), ("globex", "acme")] {
        c.issue_node(me);
        c.write_node_config(me, me, &open_agreement(other));
    }
    // acme dials the coordinator through the proxy.
    let cfg = c.path().join("acme.toml");
    let text = std::fs::read_to_string(&cfg).unwrap().replacen(
        &format!("coordinator = \"{coordinator}\"\n"),
        &format!("coordinator = \"{}\"\n", proxy.addr()),
        1,
    );
    assert!(text.contains(&proxy.addr().to_string()), "{text}");
    std::fs::write(&cfg, text).unwrap();
    c.start_node("globex");
    c.start_node("acme");
    c.wait_connected(&["acme", "globex"]);
    assert!(
        proxy.counts().0 > 0,
        "acme's control plane is not on the proxy"
    );

    // Through the proxy, undisturbed.
    let job = c.wait_job(&c.submit_nowait(&OVERLAP), Duration::from_secs(300));
    assert_count(&job, expected, "control-plane baseline");

    // A: cut for SHORT once both nodes have loaded their data, then heal.
    let job_id = submit_and_wait_for_exchange(&c);
    proxy.cut();
    let (_, dropped_before) = proxy.counts();
    let at_cut = c.job_status(&job_id);
    std::thread::sleep(SHORT);
    proxy.heal();
    let (_, dropped) = proxy.counts();
    assert_eq!(at_cut["state"], "running", "{at_cut}");
    let job = c.wait_job(&job_id, Duration::from_secs(300));
    eprintln!(
        "control A: {SHORT:?} partition mid-job ({} datagrams dropped): {} with {}",
        dropped - dropped_before,
        job["state"],
        job["intersection"]
    );
    assert!(
        dropped > dropped_before,
        "nothing was dropped during the cut"
    );
    assert_count(&job, expected, "after a short control-plane partition");

    // B: cut for longer than the idle timeout; keep it until the coordinator has failed the job
    // and acme has noticed that its session is gone.
    let sessions_failed = count_lines(&c, "acme", "control session with the coordinator failed");
    let registered = count_lines(&c, "acme", "registered with the coordinator");
    let job_id = submit_and_wait_for_exchange(&c);
    proxy.cut();
    let cut_at = Instant::now();
    assert_eq!(c.job_status(&job_id)["state"], "running");
    let job = c.wait_job(&job_id, idle + Duration::from_secs(90));
    let took = cut_at.elapsed();
    let deadline = cut_at + idle + Duration::from_secs(60);
    while count_lines(&c, "acme", "control session with the coordinator failed") == sessions_failed
    {
        assert!(
            Instant::now() < deadline,
            "acme never noticed that its control session was gone"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let partition = cut_at.elapsed();
    proxy.heal();
    eprintln!(
        "control B: partition of {partition:?} (idle timeout {idle:?}): {} after {took:?}: {}",
        job["state"], job["reason"]
    );
    assert!(partition > idle, "{partition:?}");
    let reason = reason_of(&job, "failed");
    assert!(
        reason.contains("acme") && reason.contains("timed out"),
        "the reason says what happened: {reason}"
    );
    assert!(job["intersection"].is_null(), "{job}");
    assert!(
        job["results"].as_array().is_none_or(Vec::is_empty),
        "a failed job has results: {job}"
    );
    // The data plane was up, so the nodes may have finished their exchange: what each did with
    // the job it could not report (for the record; the coordinator released nothing either way).
    for node in ["acme", "globex"] {
        eprintln!(
            "control B: {node} audited for the job: {:?}",
            c.audited_error_now(node, &job_id)
        );
    }

    // Healed: acme reconnects by itself and the pair serves the next job.
    let healed_at = Instant::now();
    c.wait_connected(&["acme"]);
    while count_lines(&c, "acme", "registered with the coordinator") == registered {
        assert!(
            healed_at.elapsed() < Duration::from_secs(30),
            "acme did not register again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "control B: acme registered again {:?} after healing",
        healed_at.elapsed()
    );
    let job = c.wait_job(&c.submit_nowait(&OVERLAP), Duration::from_secs(300));
    assert_count(&job, expected, "after the control plane healed");
    for node in ["acme", "globex"] {
        let log = c.node(node).log_text();
        assert!(!log.contains("panicked"), "{node} panicked:\n{log}");
    }
}
