//! End to end: overlap jobs under policies that set ε release noised counts, charge each node's
//! persistent ledger, and stop with a readable veto when a budget runs out — also after a node
//! restart. `cleanroom-node budget` shows the spend.
//!
//! acme allows ε = 0.25 per run (discrete Laplace scale 4) with a budget of 1 per purpose per
//! day with globex: four jobs, then vetoes. globex allows ε = 0.5 (scale 2) with no cap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use cleanroom_e2e::{Consortium, bins, cleanroom_ok};
use cleanroom_proto::v1::{
    Envelope, HelloAck, JobKind, JobSpec, Offer, PartySpec, Phase, PsiOutcome, Report, Role, Start,
    envelope::Body, report::Outcome,
};
use cleanroom_transport::{
    Credentials, FramedRecv, FramedSend, TransportTuning, accept, accept_bi, open_bi,
    server_endpoint,
};
use serde_json::Value;

const ROWS: u64 = 500;
/// acme's ε per run and its per-purpose budget: exactly four runs fit.
const ACME_EPSILON: f64 = 0.25;
const RUNS_THAT_FIT: usize = 4;
/// |noise| above this has probability below e^-25 for each party (scales 4 and 2), so the
/// released count is within this bound of the truth.
const NOISE_BOUND: i64 = 150;

fn agreement(partner: &str, agreement_extra: &str, epsilon: f64) -> String {
    format!(
        "[[agreement]]\npartner = \"{partner}\"\npurposes = [\"overlap-reporting\"]\n{agreement_extra}\n\n\
         [[agreement.allow]]\ncomputation = \"overlap\"\ndataset = \"customers\"\nkeys = [\"email\"]\nepsilon = {epsilon}\n\n"
    )
}

fn overlap(c: &Consortium) -> Value {
    c.submit(&[
        "overlap",
        "--between",
        "acme,globex",
        "--dataset",
        "customers",
        "--on",
        "email",
        "--purpose",
        "overlap-reporting",
    ])
    .0
}

fn node_cli(c: &Consortium, args: &[&str]) -> String {
    let out = Command::new(&bins().1)
        .args(args)
        .current_dir(c.path())
        .output()
        .expect("running cleanroom-node");
    assert!(
        out.status.success(),
        "cleanroom-node {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// acme's budget line for globex / overlap-reporting, from `budget --format json`.
fn acme_budget(c: &Consortium) -> Value {
    let cfg = c.path().join("acme.toml");
    let text = node_cli(
        c,
        &[
            "budget",
            "--config",
            cfg.to_str().unwrap(),
            "--format",
            "json",
        ],
    );
    let lines: Value = serde_json::from_str(&text).expect("budget --format json prints JSON");
    lines
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["partner"] == "globex" && l["purpose"] == "overlap-reporting")
        .cloned()
        .unwrap_or_else(|| panic!("no globex line in {text}"))
}

#[test]
fn noised_overlaps_spend_the_budget_until_a_readable_veto_even_after_restart() {
    let mut c = Consortium::new();
    let truth = c.synth("acme,globex", ROWS, 0.5, 7);
    let expected = truth["pairwise_overlap"]["acme,globex"].as_u64().unwrap() as i64;
    c.start_coordinator();
    c.issue_node("acme");
    c.issue_node("globex");
    c.write_node_config(
        "acme",
        "acme",
        &agreement(
            "globex",
            "budget_per_purpose = { epsilon_per_period = 1.0, period = \"day\" }",
            ACME_EPSILON,
        ),
    );
    c.write_node_config("globex", "globex", &agreement("acme", "", 0.5));
    c.start_node("acme");
    c.start_node("globex");
    c.wait_connected(&["acme", "globex"]);

    let mut released = Vec::new();
    for run in 0..RUNS_THAT_FIT {
        let job = overlap(&c);
        assert_eq!(job["state"], "succeeded", "run {run}: {job}");
        let value = job["intersection"].as_i64().unwrap();
        assert!(
            (value - expected).abs() <= NOISE_BOUND,
            "run {run}: released {value}, truth {expected}"
        );
        // Both nodes report the same noised value and the same noise terms.
        let results = job["results"].as_array().unwrap();
        assert_eq!(results.len(), 2);
        for r in results {
            assert_eq!(r["intersection"].as_i64(), Some(value), "{job}");
        }
        let noise = job["noise"].as_array().unwrap();
        assert_eq!(noise.len(), 2, "{job}");
        assert_eq!(noise[0]["node"], "acme");
        assert_eq!(noise[0]["mechanism"], "discrete_laplace");
        assert_eq!(noise[0]["epsilon"], ACME_EPSILON);
        assert_eq!(noise[0]["scale"], "4");
        assert_eq!(noise[0]["sensitivity"], 1);
        assert_eq!(noise[1]["node"], "globex");
        assert_eq!(noise[1]["scale"], "2");
        let reason = job["reason"].as_str().unwrap();
        assert!(reason.contains("noised: discrete_laplace"), "{reason}");

        // acme's audit log records the release with its mechanism, ε and sensitivity; the value
        // it records is the noised one.
        let cfg = c.path().join("acme.toml");
        let audit = node_cli(
            &c,
            &[
                "audit",
                "show",
                "--config",
                cfg.to_str().unwrap(),
                "--json",
                "--job",
                job["job_id"].as_str().unwrap(),
            ],
        );
        let release: Value = audit
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|e| e["event"]["kind"] == "Release")
            .expect("a Release entry");
        assert_eq!(release["event"]["epsilon"], ACME_EPSILON);
        assert_eq!(release["event"]["value"].as_i64(), Some(value));
        let what = release["event"]["what"].as_str().unwrap();
        assert!(
            what.contains("discrete_laplace noise, sensitivity 1")
                && what.contains("acme: ε 0.25 scale 4")
                && what.contains("globex: ε 0.5 scale 2"),
            "{what}"
        );
        if run == 0 {
            // The analyst's table says the count is noised, and how.
            let mut args = vec![
                "job".to_owned(),
                "status".into(),
                job["job_id"].as_str().unwrap().into(),
            ];
            args.extend(c.analyst_args());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let table = cleanroom_ok(c.path(), &args);
            eprintln!("{table}");
            assert!(
                table.contains(&format!("result     {value} shared (noised)")),
                "{table}"
            );
            assert!(
                table.contains(
                    "noise      discrete_laplace, sensitivity 1: acme ε 0.25 (scale 4), globex ε \
                     0.5 (scale 2)"
                ),
                "{table}"
            );
        }
        released.push(value);
    }
    eprintln!("released {released:?}, truth {expected}");
    // Noise is fresh per job: four releases all equal to the truth would mean no noise
    // (probability below 10^-4 with these scales).
    assert!(
        released.iter().any(|&v| v != expected),
        "released {released:?}, truth {expected}: no noise?"
    );

    let spend = acme_budget(&c);
    assert_eq!(spend["charges"], RUNS_THAT_FIT);
    assert!(
        (spend["spent"].as_f64().unwrap() - 1.0).abs() < 1e-9,
        "{spend}"
    );
    assert_eq!(spend["remaining"].as_f64(), Some(0.0), "{spend}");
    assert_eq!(spend["cap"].as_f64(), Some(1.0));
    assert_eq!(spend["period"], "day");
    let cfg = c.path().join("acme.toml");
    let table = node_cli(&c, &["budget", "--config", cfg.to_str().unwrap()]);
    eprintln!("{table}");
    assert!(
        table.lines().any(|l| l.starts_with("globex")
            && l.contains("overlap-reporting")
            && l.contains(" 1 ")),
        "{table}"
    );

    // The fifth is vetoed by acme with a reason that says what was spent and when it refreshes.
    let job = overlap(&c);
    assert_budget_veto(&job);

    // The spend survives a restart of acme.
    c.nodes.retain(|p| p.name != "acme");
    c.start_node("acme");
    let t0 = Instant::now();
    let job = loop {
        c.wait_connected(&["acme"]);
        let job = overlap(&c);
        // The coordinator may briefly hold the old control connection.
        if job["state"] != "failed" || t0.elapsed() > Duration::from_secs(60) {
            break job;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_budget_veto(&job);
    assert_eq!(acme_budget(&c)["charges"], RUNS_THAT_FIT);
    // Vetoed jobs charged nothing at globex either: its ledger holds the four runs.
    let cfg = c.path().join("globex.toml");
    let text = node_cli(
        &c,
        &[
            "budget",
            "--config",
            cfg.to_str().unwrap(),
            "--format",
            "csv",
        ],
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("acme,overlap-reporting,day,,2,,4,")),
        "{text}"
    );
}

fn assert_budget_veto(job: &Value) {
    assert_eq!(job["state"], "vetoed", "{job}");
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains("node 'acme' refused")
            && reason.contains(
                "privacy budget for purpose 'overlap-reporting' with globex exhausted: 1 of 1 per \
                 day spent, 0 remains, this job needs 0.25; enough refreshes at"
            ),
        "{reason}"
    );
    assert!(job["intersection"].is_null(), "{job}");
}

/// One party's control session as the test's coordinator holds it.
struct Registered {
    conn: quinn::Connection,
    data_addr: String,
    _hello: (FramedSend, FramedRecv),
}

/// Offers `spec` as job `job_id` to both registered nodes (acme initiates), starts it and
/// returns each node's report.
async fn offer_and_run(
    nodes: &HashMap<String, Registered>,
    job_id: &str,
    spec: &JobSpec,
) -> Vec<(String, PsiOutcome)> {
    let env = |phase: Phase, body: Body| Envelope {
        job_id: job_id.to_owned(),
        phase: phase as i32,
        body: Some(body),
    };
    let mut streams = Vec::new();
    for (i, party) in spec.parties.iter().enumerate() {
        let role = if i == 0 {
            Role::Initiator
        } else {
            Role::Responder
        };
        let (mut send, mut recv) = open_bi(&nodes[&party.node].conn).await.unwrap();
        send.send(&env(
            Phase::Offer,
            Body::Offer(Offer {
                spec: Some(spec.clone()),
                role: role as i32,
            }),
        ))
        .await
        .unwrap();
        let reply = recv.recv_expect(job_id, Phase::Offer).await.unwrap();
        match reply.body {
            Some(Body::OfferReply(r)) => assert!(r.accept, "{} refused: {}", party.node, r.reason),
            other => panic!("expected an offer reply, got {other:?}"),
        }
        streams.push((party.node.clone(), role, send, recv));
    }
    // The responder first, so it waits for the initiator's connection.
    streams.reverse();
    let responder_addr = nodes[&streams[0].0].data_addr.clone();
    for (_, role, send, recv) in &mut streams {
        let peer_addr = if *role == Role::Initiator {
            responder_addr.clone()
        } else {
            String::new()
        };
        send.send(&env(
            Phase::Start,
            Body::Start(Start {
                role: *role as i32,
                peer_addr,
                ..Start::default()
            }),
        ))
        .await
        .unwrap();
        recv.recv_expect(job_id, Phase::Start).await.unwrap();
    }
    let mut reports = Vec::new();
    for (node, _, _send, recv) in &mut streams {
        let report = recv.recv_expect(job_id, Phase::Report).await.unwrap();
        match report.body {
            Some(Body::Report(Report {
                outcome: Some(Outcome::Psi(outcome)),
            })) => reports.push((node.clone(), outcome)),
            other => panic!("{node} reported {other:?}"),
        }
    }
    reports.sort_by(|a, b| a.0.cmp(&b.0));
    reports
}

/// A confused or hostile coordinator offers the very same job twice: the second run reports the
/// stored noised value, draws nothing new and charges nothing — acme's budget fits exactly one
/// run, and the duplicate is still accepted and answered.
#[test]
fn a_duplicated_offer_reports_the_stored_value_and_charges_once() {
    let mut c = Consortium::new();
    c.synth("acme,globex", ROWS, 0.5, 9);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let creds = Credentials::load(
        &c.path().join("pki/ca.pem"),
        &c.path().join("pki/coordinator.pem"),
        &c.path().join("pki/coordinator.key"),
    )
    .unwrap();
    let endpoint = rt.block_on(async {
        server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &creds,
            &TransportTuning::default(),
        )
        .unwrap()
    });
    c.addr = Some(endpoint.local_addr().unwrap());
    c.issue_node("acme");
    c.issue_node("globex");
    c.write_node_config(
        "acme",
        "acme",
        &agreement(
            "globex",
            "budget_per_purpose = { epsilon_per_period = 0.25, period = \"day\" }",
            ACME_EPSILON,
        ),
    );
    c.write_node_config("globex", "globex", &agreement("acme", "", 0.5));
    c.start_node("acme");
    c.start_node("globex");

    let spec = JobSpec {
        kind: JobKind::Overlap as i32,
        parties: ["acme", "globex"]
            .map(|node| PartySpec {
                node: node.into(),
                dataset: "customers".into(),
                keys: vec!["email".into()],
                learns_membership: false,
            })
            .to_vec(),
        purpose: "overlap-reporting".into(),
        ..JobSpec::default()
    };
    let (first, second, other) = rt.block_on(async {
        let mut nodes = HashMap::new();
        while nodes.len() < 2 {
            let (conn, _) = tokio::time::timeout(Duration::from_secs(30), accept(&endpoint))
                .await
                .expect("the nodes register")
                .unwrap()
                .unwrap();
            let (mut send, mut recv) = accept_bi(&conn).await.unwrap();
            let hello = recv.recv_expect("", Phase::Hello).await.unwrap();
            let Some(Body::NodeHello(hello)) = hello.body else {
                panic!("expected a node hello")
            };
            send.send(&Envelope {
                job_id: String::new(),
                phase: Phase::Hello as i32,
                body: Some(Body::HelloAck(HelloAck {
                    coordinator_name: "test".into(),
                })),
            })
            .await
            .unwrap();
            nodes.insert(
                hello.node_name.clone(),
                Registered {
                    conn,
                    data_addr: hello.data_addr,
                    _hello: (send, recv),
                },
            );
        }
        let first = offer_and_run(&nodes, "job-dup", &spec).await;
        let second = offer_and_run(&nodes, "job-dup", &spec).await;
        // A new job id is a new release: acme's budget (one run) is spent, so acme refuses.
        let (mut send, mut recv) = open_bi(&nodes["acme"].conn).await.unwrap();
        send.send(&Envelope {
            job_id: "job-new".into(),
            phase: Phase::Offer as i32,
            body: Some(Body::Offer(Offer {
                spec: Some(spec.clone()),
                role: Role::Initiator as i32,
            })),
        })
        .await
        .unwrap();
        let other = recv.recv_expect("job-new", Phase::Offer).await.unwrap();
        (first, second, other)
    });
    eprintln!("first {first:?}\nsecond {second:?}");
    assert_eq!(first.len(), 2);
    for ((node, a), (_, b)) in first.iter().zip(&second) {
        assert!(!a.suppressed && !a.noise.is_empty(), "{node}: {a:?}");
        assert_eq!(
            a.intersection, b.intersection,
            "{node}: the duplicate released another value"
        );
        assert_eq!(a.noise, b.noise, "{node}");
    }
    assert_eq!(first[0].1.intersection, first[1].1.intersection);
    match other.body {
        Some(Body::OfferReply(r)) => {
            assert!(!r.accept);
            assert!(r.reason.contains("exhausted"), "{}", r.reason);
        }
        other => panic!("expected an offer reply, got {other:?}"),
    }
    let spend = acme_budget(&c);
    assert_eq!(spend["charges"], 1, "{spend}");
    // globex (no cap) also charged once.
    let cfg = c.path().join("globex.toml");
    let text = node_cli(
        &c,
        &[
            "budget",
            "--config",
            cfg.to_str().unwrap(),
            "--format",
            "csv",
        ],
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("acme,overlap-reporting,day,,0.5,,1,")),
        "{text}"
    );
}

/// Fifty overlap jobs at once, each costing acme ε = 0.1 against a budget of 1: exactly ten are
/// charged and release a count; every other one is refused for budget (vetoed at the offer, or
/// refused at the charge when it lost the race), never released.
#[test]
fn fifty_concurrent_jobs_of_a_tenth_against_a_budget_of_one_run_exactly_ten() {
    let mut c = Consortium::new();
    let truth = c.synth("acme,globex", 200, 0.5, 3);
    let expected = truth["pairwise_overlap"]["acme,globex"].as_u64().unwrap() as i64;
    c.start_coordinator();
    c.issue_node("acme");
    c.issue_node("globex");
    c.write_node_config(
        "acme",
        "acme",
        &agreement(
            "globex",
            "budget_per_purpose = { epsilon_per_period = 1.0, period = \"day\" }",
            0.1,
        ),
    );
    // globex releases exactly (no epsilon): the noise is acme's alone.
    c.write_node_config(
        "globex",
        "globex",
        "[[agreement]]\npartner = \"acme\"\npurposes = [\"overlap-reporting\"]\n\n\
         [[agreement.allow]]\ncomputation = \"overlap\"\ndataset = \"customers\"\nkeys = [\"email\"]\n",
    );
    c.start_node("acme");
    c.start_node("globex");
    c.wait_connected(&["acme", "globex"]);

    let mut args: Vec<String> = [
        "job",
        "submit",
        "overlap",
        "--between",
        "acme,globex",
        "--dataset",
        "customers",
        "--on",
        "email",
        "--purpose",
        "overlap-reporting",
        "--wait",
        "--timeout",
        "300",
        "--format",
        "json",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(c.analyst_args());
    let children: Vec<_> = (0..50)
        .map(|_| {
            Command::new(&bins().0)
                .args(&args)
                .current_dir(c.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let jobs: Vec<Value> = children
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().unwrap();
            serde_json::from_slice(&out.stdout).expect("job submit prints the job as JSON")
        })
        .collect();
    let succeeded: Vec<&Value> = jobs.iter().filter(|j| j["state"] == "succeeded").collect();
    for job in &jobs {
        if job["state"] == "succeeded" {
            let value = job["intersection"].as_i64().unwrap();
            // Scale 10: |noise| > 300 has probability below e^-30.
            assert!((value - expected).abs() <= 300, "{value} vs {expected}");
        } else {
            let reason = job["reason"].as_str().unwrap_or_default();
            assert!(
                reason.contains(
                    "privacy budget for purpose 'overlap-reporting' with globex exhausted"
                ),
                "{job}"
            );
            assert!(job["intersection"].is_null(), "{job}");
        }
    }
    let spend = acme_budget(&c);
    eprintln!(
        "{} succeeded, {} vetoed, {} failed; ledger {spend}",
        succeeded.len(),
        jobs.iter().filter(|j| j["state"] == "vetoed").count(),
        jobs.iter().filter(|j| j["state"] == "failed").count()
    );
    assert_eq!(succeeded.len(), 10);
    assert_eq!(spend["charges"], 10, "{spend}");
    assert!(
        (spend["spent"].as_f64().unwrap() - 1.0).abs() < 1e-9,
        "{spend}"
    );
}
