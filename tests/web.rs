//! End to end: the coordinator's web console over HTTPS with mutual TLS — who is refused, the
//! JSON API against the CLI, `/metrics` against the jobs actually run — and a real headless
//! Chromium submitting a job from the console and watching it succeed (screenshots in
//! `target/browser-screenshots/`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use cleanroom_e2e::web::{Browser, COORDINATOR_HOST, Https, http_get};
use cleanroom_e2e::{Consortium, cleanroom_ok};
use fantoccini::Locator;
use serde_json::{Value, json};

/// A consortium serving the console, with acme and globex connected, and the expected
/// acme ∩ globex.
fn consortium() -> (Consortium, u64) {
    let mut c = Consortium::new();
    c.serve_web = true;
    c.log_json = true;
    let truth = c.synth("acme,globex", 300, 0.4, 5);
    let expected = truth["pairwise_overlap"]["acme,globex"].as_u64().unwrap();
    c.start_coordinator();
    c.start_open_pair();
    (c, expected)
}

fn overlap_spec(purpose: &str) -> Value {
    json!({
        "kind": "JOB_KIND_OVERLAP",
        "parties": [
            { "node": "acme", "dataset": "customers", "keys": ["email"] },
            { "node": "globex", "dataset": "customers", "keys": ["email"] },
        ],
        "purpose": purpose,
    })
}

/// Polls `GET /api/v1/jobs/ID` until the job has finished.
fn wait_finished(client: &Https, job_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let job = client.get(&format!("/api/v1/jobs/{job_id}")).json();
        let state = job["state"].as_str().unwrap().to_owned();
        if ["SUCCEEDED", "FAILED", "VETOED", "CANCELLED"]
            .iter()
            .any(|s| state.ends_with(s))
        {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {job_id} did not finish: {job}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The value of the metric line `name{labels}` in a Prometheus exposition.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

#[test]
fn the_console_refuses_strangers_answers_like_the_cli_and_counts_what_ran() {
    let (c, expected) = consortium();
    let web = c.web.unwrap();
    cleanroom_ok(
        c.path(),
        &["pki", "issue", "--dir", "pki", "analyst", "bob"],
    );
    let alice = Https::new(c.path(), web, Some("analyst-alice"));
    let bob = Https::new(c.path(), web, Some("analyst-bob"));
    let acme = Https::new(c.path(), web, Some("node-acme"));
    let nobody = Https::new(c.path(), web, None);

    // Without a certificate: 401 everywhere but /healthz. A node's certificate: 403 on the
    // analysts' pages and API, but it may scrape /metrics.
    for path in ["/jobs", "/api/v1/jobs", "/metrics", "/schedules", "/nodes"] {
        assert_eq!(nobody.get(path).status, 401, "{path}");
    }
    let health = nobody.get("/healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    for path in ["/jobs", "/api/v1/jobs", "/api/v1/nodes"] {
        assert_eq!(acme.get(path).status, 403, "{path}");
    }
    assert_eq!(acme.get("/metrics").status, 200);

    // A job submitted through the JSON API runs like one from the CLI.
    let submitted = alice.post_json(
        "/api/v1/jobs",
        &json!({ "spec": overlap_spec("overlap-reporting") }),
    );
    assert_eq!(submitted.status, 200, "{}", submitted.body);
    let job_id = submitted.json()["job_id"].as_str().unwrap().to_owned();
    let job = wait_finished(&alice, &job_id);
    assert_eq!(job["state"], "JOB_STATE_SUCCEEDED", "{job}");
    assert_eq!(job["submitted_by"], "alice");
    for r in job["results"].as_array().unwrap() {
        assert_eq!(
            r["outcome"]["intersection"].as_u64(),
            Some(expected),
            "{job}"
        );
    }
    let cli = c.job_status(&job_id);
    assert_eq!(cli["state"], "succeeded");
    assert_eq!(cli["intersection"].as_u64(), Some(expected), "{cli}");

    // A purpose no agreement allows: vetoed by the nodes.
    let vetoed = alice.post_json("/api/v1/jobs", &json!({ "spec": overlap_spec("resale") }));
    let vetoed_id = vetoed.json()["job_id"].as_str().unwrap().to_owned();
    assert_eq!(
        wait_finished(&alice, &vetoed_id)["state"],
        "JOB_STATE_VETOED"
    );

    // Refusals: a cross-site request (the browser would send the certificate with it), an
    // unknown field, an unknown job.
    let cross = alice.request(
        "POST",
        "/api/v1/jobs",
        &[
            ("Content-Type", "application/json"),
            ("Origin", "https://evil.example"),
        ],
        Some(&json!({ "spec": overlap_spec("overlap-reporting") }).to_string()),
    );
    assert_eq!(cross.status, 403, "{}", cross.body);
    let form = alice.request(
        "POST",
        "/jobs/new",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Sec-Fetch-Site", "cross-site"),
        ],
        Some("kind=overlap&node_a=acme&dataset_a=customers&node_b=globex&dataset_b=customers&keys=email&purpose=overlap-reporting"),
    );
    assert_eq!(form.status, 403);
    let typo = alice.post_json(
        "/api/v1/jobs",
        &json!({ "spec": overlap_spec("x"), "idempotency": "k" }),
    );
    assert_eq!(typo.status, 400);
    assert!(
        typo.json()["error"]
            .as_str()
            .unwrap()
            .contains("idempotency"),
        "{}",
        typo.body
    );
    assert_eq!(alice.get("/api/v1/jobs/no-such-job").status, 404);

    // An analyst sees over HTTPS exactly what the QUIC API shows it, as `api::authz` decides
    // for both: alice's listing holds her two jobs, bob's none (he holds no grant), and bob is
    // refused alice's job with the grant that would allow it.
    let listing = |who: &str, client: &Https| {
        let listed = client.get("/api/v1/jobs?limit=50").json();
        let mut over_https: Vec<String> = listed["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["job_id"].as_str().unwrap().to_owned())
            .collect();
        let (cert, key) = (
            format!("pki/analyst-{who}.pem"),
            format!("pki/analyst-{who}.key"),
        );
        let args = [
            "job",
            "list",
            "--limit",
            "50",
            "--format",
            "json",
            "--coordinator",
            &c.addr.unwrap().to_string(),
            "--ca",
            "pki/ca.pem",
            "--cert",
            &cert,
            "--key",
            &key,
        ];
        let cli: Value = serde_json::from_str(&cleanroom_ok(c.path(), &args)).unwrap();
        let mut over_quic: Vec<String> = cli
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["job_id"].as_str().unwrap().to_owned())
            .collect();
        over_https.sort();
        over_quic.sort();
        assert_eq!(over_https, over_quic, "{who}");
        over_https
    };
    assert_eq!(
        listing("alice", &alice).len(),
        2,
        "exactly the two jobs were created"
    );
    assert!(listing("bob", &bob).is_empty());
    for path in [format!("/jobs/{job_id}"), format!("/api/v1/jobs/{job_id}")] {
        let refused = bob.get(&path);
        assert_eq!(refused.status, 403, "{path}: {}", refused.body);
        assert!(
            refused.body.contains("read-all") && !refused.body.contains("intersection"),
            "{path}: {}",
            refused.body
        );
    }
    let page = alice.get(&format!("/jobs/{job_id}"));
    assert_eq!(page.status, 200);
    assert!(page.body.contains(&job_id) && page.body.contains("succeeded"));
    // Pages load nothing: no script, no image, style or icon from elsewhere.
    for path in [
        "/jobs",
        &format!("/jobs/{job_id}"),
        "/nodes",
        "/matrix",
        "/jobs/new",
    ] {
        let body = alice.get(path).body;
        for loads in ["<script", "src=", "href=\"http", "url("] {
            assert!(!body.contains(loads), "{path} has {loads}");
        }
    }

    // JSON logs: every line is an object, and the job's lines name it.
    let log = c.coordinator.as_ref().unwrap().log_text();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let ended = lines
        .iter()
        .find(|l| l["fields"]["message"] == "job ended" && l["span"]["job_id"] == job_id.as_str());
    assert!(
        ended.is_some(),
        "no JSON line 'job ended' with span.job_id {job_id}:\n{log}"
    );

    // /metrics agrees with the jobs run.
    let m = alice.get("/metrics").body;
    let jobs = |state: &str| {
        metric(
            &m,
            &format!("cleanroom_coordinator_jobs{{kind=\"overlap\",state=\"{state}\"}}"),
        )
    };
    assert_eq!(jobs("succeeded"), Some(1.0), "{m}");
    assert_eq!(jobs("vetoed"), Some(1.0), "{m}");
    assert_eq!(
        metric(
            &m,
            "cleanroom_coordinator_jobs_ended_total{kind=\"overlap\",state=\"succeeded\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "cleanroom_coordinator_job_duration_seconds_count{kind=\"overlap\",state=\"vetoed\"}"
        ),
        Some(1.0)
    );
    let own_sets: u64 = job["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"]["own_set_size"].as_u64().unwrap())
        .sum();
    assert_eq!(
        metric(
            &m,
            "cleanroom_coordinator_items_processed_total{kind=\"overlap\"}"
        ),
        Some(own_sets as f64)
    );
    let vetoes = metric(&m, "cleanroom_coordinator_vetoes_total{node=\"acme\"}").unwrap_or(0.0)
        + metric(&m, "cleanroom_coordinator_vetoes_total{node=\"globex\"}").unwrap_or(0.0);
    assert!(vetoes >= 1.0, "{m}");
    assert_eq!(
        metric(&m, "cleanroom_coordinator_connected_nodes"),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &m,
            "cleanroom_coordinator_node_connections_total{node=\"acme\"}"
        ),
        Some(1.0)
    );
}

/// Waits until `css` is on the page (reloading it, as the page itself does) and holds `text`.
async fn wait_for_text(browser: &Browser, css: &str, text: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(e) = browser.client.find(Locator::Css(css)).await
            && let Ok(t) = e.text().await
            && t.contains(text)
        {
            return t;
        }
        assert!(Instant::now() < deadline, "{css} never showed {text:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = browser.client.refresh().await;
    }
}

/// Fails on any error the browser's console logged.
#[test]
fn a_browser_submits_a_job_from_the_console_and_sees_it_succeed() {
    let (c, expected) = consortium();
    let web = c.web.unwrap();
    let base = format!("https://{COORDINATOR_HOST}:{}", web.port());
    // A schedule with two runs, for the report page.
    let alice = Https::new(c.path(), web, Some("analyst-alice"));
    let added = alice.post_json(
        "/api/v1/schedules",
        &json!({ "name": "weekly", "cron": "0 6 * * MON", "timezone": "Europe/Berlin",
                 "spec": overlap_spec("overlap-reporting") }),
    );
    assert_eq!(added.status, 200, "{}", added.body);
    for _ in 0..2 {
        let run = alice.post_json("/api/v1/schedules/weekly/run-now", &json!({}));
        assert_eq!(run.status, 200, "{}", run.body);
        wait_finished(&alice, run.json()["job_id"].as_str().unwrap());
    }

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let browser = Browser::start(c.path(), web, "analyst-alice").await;
        let b = &browser.client;

        b.goto(&format!("{base}/jobs/new")).await.unwrap();
        for (name, value) in [
            ("node_a", "acme"),
            ("dataset_a", "customers"),
            ("node_b", "globex"),
            ("dataset_b", "customers"),
            ("purpose", "overlap-reporting"),
        ] {
            b.find(Locator::Id(name))
                .await
                .unwrap()
                .send_keys(value)
                .await
                .unwrap();
        }
        browser.screenshot("console-submit").await;
        b.find(Locator::Id("submit"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let state = wait_for_text(&browser, "#state", "succeeded").await;
        assert!(state.contains("succeeded"));
        let url = b.current_url().await.unwrap();
        assert!(url.path().starts_with("/jobs/"), "{url}");
        let result = wait_for_text(&browser, "#result", "acme").await;
        assert!(result.contains(&expected.to_string()), "{result}");
        assert!(result.contains('%'), "the rate is shown: {result}");
        browser.screenshot("console-job").await;
        browser.assert_no_console_errors("the job page").await;

        for (path, shot, marker) in [
            ("/jobs", "console-jobs", "succeeded"),
            ("/schedules/weekly", "console-schedule-report", "weekly"),
            ("/matrix", "console-matrix", "acme"),
            ("/nodes", "console-nodes", "connected"),
        ] {
            b.goto(&format!("{base}{path}")).await.unwrap();
            let body = browser.text_of(Locator::Css("main")).await;
            assert!(body.contains(marker), "{path}: {body}");
            browser.screenshot(shot).await;
            browser.assert_no_console_errors(path).await;
        }
        // The report page's chart is inline SVG, with its y-axis fitted and dates.
        b.goto(&format!("{base}/schedules/weekly")).await.unwrap();
        let chart = b.find(Locator::Css("#count-chart svg")).await.unwrap();
        let svg = chart.html(false).await.unwrap();
        assert!(svg.contains("<circle"), "no points in the chart");
        let range = browser.text_of(Locator::Id("range")).await;
        assert!(!range.contains("1970"), "{range}");
        browser.stop().await;
    });
}

#[test]
fn demo_web_keeps_the_consortium_running_with_the_console_until_interrupted() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    /// Kills the demo if the test fails before it stops it.
    struct Demo(std::process::Child);
    impl Drop for Demo {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let mut demo = Demo(
        Command::new(&cleanroom_e2e::bins().0)
            .args(["demo", "--rows", "500", "--web", "127.0.0.1:0", "--keep"])
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut out = BufReader::new(demo.0.stdout.take().unwrap());
    let mut printed = String::new();
    let port: u16 = loop {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "demo ended: {printed}"
        );
        printed.push_str(&line);
        if let Some(url) = line.strip_prefix("metrics   https://coordinator.cleanroom:") {
            break url.trim().trim_end_matches("/metrics").parse().unwrap();
        }
    };
    // The credentials follow the URLs; the last line is the curl example.
    while !printed.contains("  or: curl") {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "demo ended: {printed}"
        );
        printed.push_str(&line);
    }
    for wanted in [
        "console   https://",
        "health    https://",
        "analyst-demo.pem",
        "analyst-demo.key",
        "ca.pem",
    ] {
        assert!(printed.contains(wanted), "{wanted} not printed: {printed}");
    }
    // Each node's dashboard and its /metrics, printed and answering.
    let dashboards: Vec<std::net::SocketAddr> = printed
        .lines()
        .filter_map(|l| l.trim().split_once("  http://"))
        .map(|(_, rest)| rest.split('/').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(dashboards.len(), 2, "one dashboard per node: {printed}");
    for d in &dashboards {
        assert!(d.ip().is_loopback(), "{d}");
        assert!(
            printed.contains(&format!("metrics http://{d}/metrics")),
            "{printed}"
        );
        let page = http_get(*d, "/", None);
        assert_eq!(page.status, 200, "{}", page.body);
        let m = http_get(*d, "/metrics", None).body;
        assert_eq!(
            metric(&m, "cleanroom_node_coordinator_connected"),
            Some(1.0),
            "{m}"
        );
    }
    let web = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let analyst = Https::new(&dir, web, Some("analyst-demo"));
    let jobs = analyst.get("/api/v1/jobs").json();
    let states: Vec<&str> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["JOB_STATE_SUCCEEDED"; 3], "{jobs}");
    let metrics = analyst.get("/metrics").body;
    assert_eq!(
        metric(&metrics, "cleanroom_coordinator_connected_nodes"),
        Some(2.0),
        "{metrics}"
    );

    let status = Command::new("kill")
        .args(["-INT", &demo.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Some(code) = demo.0.try_wait().unwrap() {
            break code;
        }
        assert!(Instant::now() < deadline, "the demo did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(code.success(), "{code:?}");
}
