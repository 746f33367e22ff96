//! End to end: a node's privacy dashboard, `/metrics` and `/healthz` after real jobs.
//!
//! acme serves its dashboard on loopback. Two noised overlaps (ε 0.25 each at acme), one match
//! (acme learns membership and writes a membership file), one offer acme vetoes (a purpose its
//! agreement lacks) and one deletion request run first. Then: every page answers and shows
//! none of the identifiers of either partner's file (nor the forgotten key's hash); `/metrics`
//! counts exactly those jobs, ε charged equals the ledger's, rows read equal the audit log's;
//! a request for another host name is refused; and a headless Chromium loads every page with
//! no console error (screenshots in `target/browser-screenshots/dashboard-*.png`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;

use cleanroom_e2e::web::{Browser, http_get};
use cleanroom_e2e::{Consortium, free_tcp_port, psi_job};
use fantoccini::Locator;
use serde_json::Value;

/// acme's ε per noised overlap.
const EPSILON: f64 = 0.25;

/// Every page of the dashboard.
const PAGES: [&str; 8] = [
    "/",
    "/budget",
    "/decisions",
    "/forget",
    "/audit",
    "/transparency",
    "/transparency.md",
    "/transparency.json",
];

fn agreement(partner: &str, purposes: &str) -> String {
    format!(
        "[[agreement]]\npartner = \"{partner}\"\npurposes = [{purposes}]\n\
         budget_per_purpose = {{ epsilon_lifetime = 100.0 }}\n\n\
         [[agreement.allow]]\ncomputation = \"overlap\"\ndataset = \"customers\"\nkeys = [\"email\"]\nepsilon = {EPSILON}\n\n\
         [[agreement.allow]]\ncomputation = \"match\"\ndataset = \"customers\"\nkeys = [\"email\"]\nreveal_membership_to_partner = true\n\n"
    )
}

fn node_cli(c: &Consortium, args: &[&str]) -> String {
    cleanroom_e2e::cleanroom_node_ok(c.path(), args)
}

fn job(c: &Consortium, kind: &str, purpose: &str) -> Value {
    c.submit(&psi_job(kind, "acme,globex", "email", purpose)).0
}

/// Every identifier in a partner's synthetic file: each email and phone as written, lower-cased,
/// and (phones) as its digits alone.
fn identifiers(c: &Consortium, name: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(c.path().join(format!("data/{name}.csv"))).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let cols: Vec<usize> = ["email", "phone"]
        .iter()
        .map(|h| header.iter().position(|x| x == h).unwrap())
        .collect();
    let mut out = BTreeSet::new();
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        for &col in &cols {
            let v = fields[col].trim();
            if v.is_empty() {
                continue;
            }
            out.insert(v.to_owned());
            out.insert(v.to_lowercase());
            let digits: String = v.chars().filter(char::is_ascii_digit).collect();
            if digits.len() >= 7 && !v.contains('@') {
                out.insert(digits);
            }
        }
    }
    out
}

/// The value of the series `name{labels}` in a Prometheus exposition.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// The sum of every series of `name` (with any labels).
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[test]
fn the_dashboard_shows_what_was_given_away_never_an_identifier_and_metrics_match_the_jobs() {
    let (mut c, _) = Consortium::with_coordinator("acme,globex", 300, 0.4, 17);
    let port = free_tcp_port();
    let both = "\"overlap-reporting\", \"fraud-detection\"";
    for (me, partner, purposes) in [
        ("acme", "globex", "\"overlap-reporting\""),
        ("globex", "acme", both),
    ] {
        c.issue_node(me);
        let cfg = c.write_node_config(me, me, &agreement(partner, purposes));
        if me == "acme" {
            let mut text = std::fs::read_to_string(&cfg).unwrap();
            text.push_str(&format!("\n[dashboard]\nlisten = \"127.0.0.1:{port}\"\n"));
            std::fs::write(&cfg, text).unwrap();
        }
        c.start_node(me);
    }
    c.wait_connected(&["acme", "globex"]);
    let dash = SocketAddr::from(([127, 0, 0, 1], port));

    // The jobs: two noised overlaps, a match, and a purpose acme never agreed to.
    for _ in 0..2 {
        let j = job(&c, "overlap", "overlap-reporting");
        assert_eq!(j["state"], "succeeded", "{j}");
    }
    let m = job(&c, "match", "overlap-reporting");
    assert_eq!(m["state"], "succeeded", "{m}");
    let v = job(&c, "overlap", "fraud-detection");
    assert_eq!(v["state"], "vetoed", "{v}");
    // A deletion request at acme, for a subject acme holds (another process appends to the log).
    let acme_ids = identifiers(&c, "acme");
    let forgotten = acme_ids.iter().find(|i| i.contains('@')).unwrap().clone();
    c.forget_ok("acme", "customers", &format!("email={forgotten}"));
    let cfg = c.path().join("acme.toml");
    assert!(
        std::fs::read_dir(c.path().join("state-acme/results"))
            .unwrap()
            .next()
            .is_some(),
        "the match wrote a membership file at acme"
    );

    // Every page answers, and none holds an identifier of either file.
    let mut ids = acme_ids;
    ids.extend(identifiers(&c, "globex"));
    let log = std::fs::read_to_string(c.path().join("state-acme/audit.log")).unwrap();
    let key_hash = log
        .split("\"key_hash\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a Forget entry")
        .to_owned();
    assert!(key_hash.len() >= 16, "{key_hash}");
    for page in PAGES {
        let r = http_get(dash, page, None);
        assert_eq!(r.status, 200, "{page}: {}", r.body);
        for id in &ids {
            assert!(
                !r.body.contains(id.as_str()),
                "{page} shows the identifier {id}"
            );
        }
        assert!(
            !r.body.contains(&key_hash[..16]),
            "{page} shows the forgotten key's hash"
        );
        for loads in ["<script", "src=", "href=\"http", "url("] {
            assert!(!r.body.contains(loads), "{page} has {loads}");
        }
    }
    let overview = http_get(dash, "/", None).body;
    assert!(
        overview.contains("globex") && overview.contains("in force"),
        "{overview}"
    );
    let budget = http_get(dash, "/budget", None).body;
    assert!(
        budget.contains("<svg") && budget.contains("<circle"),
        "no ε chart"
    );
    assert!(!budget.contains("1970"), "the chart's dates are real");
    let decisions = http_get(dash, "/decisions", None).body;
    assert!(decisions.contains("vetoed") && decisions.contains("fraud-detection"));
    let forget = http_get(dash, "/forget", None).body;
    assert!(forget.contains("customers"), "{forget}");
    let audit = http_get(dash, "/audit", None).body;
    assert!(audit.contains("verified"), "{audit}");
    let published = node_cli(&c, &["transparency", "--config", cfg.to_str().unwrap()]);
    assert_eq!(http_get(dash, "/transparency.md", None).body, published);

    // Health, and a page requested under another host name (DNS rebinding) is refused.
    let health = http_get(dash, "/healthz", None);
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    assert_eq!(http_get(dash, "/", Some("evil.example")).status, 403);
    assert_eq!(
        http_get(dash, "/", Some(&format!("localhost:{port}"))).status,
        200
    );

    // /metrics against the jobs actually run, the ledger and the audit log.
    let text = http_get(dash, "/metrics", None).body;
    let jobs = |kind: &str, outcome: &str| {
        metric(
            &text,
            &format!("cleanroom_node_jobs_total{{kind=\"{kind}\",outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(jobs("overlap", "completed"), Some(2.0), "{text}");
    assert_eq!(jobs("match", "completed"), Some(1.0), "{text}");
    assert_eq!(jobs("overlap", "vetoed"), Some(1.0), "{text}");
    assert_eq!(
        metric_sum(&text, "cleanroom_node_jobs_total"),
        4.0,
        "{text}"
    );
    assert_eq!(
        metric_sum(&text, "cleanroom_node_vetoes_total"),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "cleanroom_node_job_duration_seconds_count{kind=\"overlap\",outcome=\"completed\"}"
        ),
        Some(2.0)
    );
    let spend = c.budget_json("acme");
    let line = spend
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["partner"] == "globex" && l["purpose"] == "overlap-reporting")
        .unwrap();
    let charged = metric(
        &text,
        "cleanroom_node_epsilon_charged_total{partner=\"globex\",purpose=\"overlap-reporting\"}",
    )
    .unwrap();
    assert!(
        (charged - line["lifetime_spent"].as_f64().unwrap()).abs() < 1e-9,
        "metric ε {charged} vs ledger {line}"
    );
    assert!((charged - 2.0 * EPSILON).abs() < 1e-9, "{charged}");
    // Rows read, as the audit log's Access entries record them.
    let entries: Vec<&str> = log.lines().collect();
    let rows_read: f64 = log
        .split("\"rows_read\":")
        .skip(1)
        .map(|rest| {
            rest.split([',', '}'])
                .next()
                .unwrap()
                .parse::<f64>()
                .unwrap()
        })
        .sum();
    assert!(rows_read > 0.0);
    assert_eq!(
        metric_sum(&text, "cleanroom_node_items_processed_total"),
        rows_read
    );
    // Every entry but the deletion request (appended by `cleanroom-node forget`, another
    // process) was appended by the node.
    assert_eq!(
        metric_sum(&text, "cleanroom_node_audit_appends_total"),
        (entries.len() - 1) as f64
    );
    assert!(metric(&text, "cleanroom_node_bytes_sent_total{kind=\"overlap\"}").unwrap() > 0.0);
    assert_eq!(
        metric(&text, "cleanroom_node_control_reconnects_total"),
        Some(0.0)
    );
    assert_eq!(
        metric(&text, "cleanroom_node_coordinator_connected"),
        Some(1.0)
    );

    // A real browser: every page loads, with no console error.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let browser = Browser::start_plain().await;
        let b = &browser.client;
        for (page, shot) in [
            ("/", "dashboard-agreements"),
            ("/budget", "dashboard-budget"),
            ("/decisions", "dashboard-decisions"),
            ("/forget", "dashboard-forget"),
            ("/audit", "dashboard-audit"),
            ("/transparency", "dashboard-transparency"),
        ] {
            b.goto(&format!("http://127.0.0.1:{port}{page}"))
                .await
                .unwrap();
            let main = browser.text_of(Locator::Css("main h1")).await;
            assert!(!main.is_empty(), "{page}");
            browser.screenshot(shot).await;
            browser.assert_no_console_errors(page).await;
        }
        b.goto(&format!("http://127.0.0.1:{port}/budget"))
            .await
            .unwrap();
        let chart = b.find(Locator::Css(".chart svg")).await.unwrap();
        assert!(chart.html(false).await.unwrap().contains("<circle"));
        browser.stop().await;
    });
}
