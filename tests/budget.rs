//! End to end: overlap jobs under policies that set ε release noised counts, charge each node's
//! persistent ledger, and stop with a readable veto when a budget runs out — also after a node
//! restart. `cleanroom-node budget` shows the spend.
//!
//! acme allows ε = 0.25 per run (discrete Laplace scale 4) with a budget of 1 per purpose per
//! day with globex: four jobs, then vetoes. globex allows ε = 0.5 (scale 2) under a lifetime cap
//! that never binds. A repeated offer of a charged job is refused; a lifetime cap never
//! refreshes; an ε no budget caps is refused when the policy is read.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use cleanroom_e2e::raw_coordinator::RawCoordinator;
use cleanroom_e2e::{Consortium, OVERLAP, bins, cleanroom_ok, reason_of};
use cleanroom_proto::v1::{JobKind, JobSpec, PartySpec, PsiOutcome, report::Outcome};
use serde_json::Value;

const ROWS: u64 = 500;
/// acme's ε per run and its per-purpose budget: exactly four runs fit.
const ACME_EPSILON: f64 = 0.25;
const RUNS_THAT_FIT: usize = 4;
/// |noise| above this has probability below e^-25 for each party (scales 4 and 2), so the
/// released count is within this bound of the truth.
const NOISE_BOUND: i64 = 150;
/// globex's cap: an ε must be capped, and this one never binds in these tests.
const GLOBEX_CAP: &str = "budget_per_purpose = { epsilon_lifetime = 1000.0 }";

fn agreement(partner: &str, agreement_extra: &str, epsilon: f64) -> String {
    format!(
        "[[agreement]]\npartner = \"{partner}\"\npurposes = [\"overlap-reporting\"]\n{agreement_extra}\n\n\
         [[agreement.allow]]\ncomputation = \"overlap\"\ndataset = \"customers\"\nkeys = [\"email\"]\nepsilon = {epsilon}\n\n"
    )
}

/// acme's agreement with globex: ε `epsilon` per run under a budget of 1 per purpose per day.
fn acme_daily_budget(epsilon: f64) -> String {
    agreement(
        "globex",
        "budget_per_purpose = { epsilon_per_period = 1.0, period = \"day\" }",
        epsilon,
    )
}

/// globex's agreement with acme when it releases exactly (no ε): the noise is acme's alone.
const GLOBEX_EXACT: &str = "[[agreement]]\npartner = \"acme\"\npurposes = [\"overlap-reporting\"]\n\n\
     [[agreement.allow]]\ncomputation = \"overlap\"\ndataset = \"customers\"\nkeys = [\"email\"]\n";

/// Issues, configures and starts acme (under [`acme_daily_budget`] of `acme_epsilon`) and
/// globex (under `globex_agreements`).
fn start_nodes(c: &mut Consortium, acme_epsilon: f64, globex_agreements: &str) {
    c.issue_node("acme");
    c.issue_node("globex");
    c.write_node_config("acme", "acme", &acme_daily_budget(acme_epsilon));
    c.write_node_config("globex", "globex", globex_agreements);
    c.start_node("acme");
    c.start_node("globex");
}

fn overlap(c: &Consortium) -> Value {
    c.submit(&OVERLAP).0
}

fn node_cli(c: &Consortium, args: &[&str]) -> String {
    cleanroom_e2e::cleanroom_node_ok(c.path(), args)
}

/// acme's budget line for globex / overlap-reporting, from `budget --format json`.
fn acme_budget(c: &Consortium) -> Value {
    let lines = c.budget_json("acme");
    lines
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["partner"] == "globex" && l["purpose"] == "overlap-reporting")
        .cloned()
        .unwrap_or_else(|| panic!("no globex line in {lines}"))
}

#[test]
fn noised_overlaps_spend_the_budget_until_a_readable_veto_even_after_restart() {
    let (mut c, truth) = Consortium::with_coordinator("acme,globex", ROWS, 0.5, 7);
    let expected = truth["pairwise_overlap"]["acme,globex"].as_u64().unwrap() as i64;
    start_nodes(&mut c, ACME_EPSILON, &agreement("acme", GLOBEX_CAP, 0.5));
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
        let release: Value = c
            .audit_entries("acme", Some(job["job_id"].as_str().unwrap()))
            .into_iter()
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
    let reason = reason_of(job, "vetoed");
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

/// Repeated offers (issue 12): a confused or hostile coordinator offers the very same job
/// twice, and the data changes in between (a subject forgotten at globex). acme, whose ε
/// noises the count, used to answer the repeat with its stored noise over the new data, so the
/// two releases differed by exactly the change, with no ε charged for the second. Now acme
/// refuses the repeat at the offer with what the analyst can do, the second release never
/// happens, a new job id is a new charged release, and acme's ledger holds no noise draw.
#[test]
fn a_repeated_offer_of_a_charged_job_is_refused_and_no_noise_is_kept() {
    let mut c = Consortium::new();
    c.synth("acme,globex", ROWS, 0.5, 9);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut coordinator, addr) = rt.block_on(async { RawCoordinator::bind(c.path()) });
    c.addr = Some(addr);
    // globex releases exactly: the only noise is acme's.
    start_nodes(&mut c, ACME_EPSILON, GLOBEX_EXACT);
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
    rt.block_on(coordinator.register(2));
    let first = rt.block_on(coordinator.run("job-dup", &spec)).unwrap();
    let released: Vec<&PsiOutcome> = first
        .iter()
        .map(|(node, o)| match o {
            Outcome::Psi(p) => p,
            other => panic!("{node}: {other:?}"),
        })
        .collect();
    assert!(!released[0].suppressed && !released[0].noise.is_empty());
    assert_eq!(released[0].intersection, released[1].intersection);

    // globex forgets a subject both hold: the data under the job has changed.
    let shared = shared_email(&c);
    c.forget_ok("globex", "customers", &format!("email={shared}"));
    // The same job again: refused by acme before anything is read, with what to do.
    let (node, reason) = rt.block_on(coordinator.run("job-dup", &spec)).unwrap_err();
    assert_eq!(node, "acme");
    assert!(
        reason.starts_with("job job-dup's release was already charged (at ")
            && reason
                .contains("a release is never repeated, since the data under it may have changed")
            && reason.ends_with("retry it as a new job with `cleanroom job retry job-dup`"),
        "{reason}"
    );
    // A new job over the new data is a new release, charged again.
    let again = rt.block_on(coordinator.run("job-new", &spec)).unwrap();
    for (node, o) in &again {
        let Outcome::Psi(o) = o else {
            panic!("{node}: {o:?}")
        };
        assert!(!o.suppressed, "{node}: {o:?}");
    }
    let spend = acme_budget(&c);
    assert_eq!(spend["charges"], 2, "{spend}");
    assert!(
        (spend["spent"].as_f64().unwrap() - 0.5).abs() < 1e-9,
        "{spend}"
    );
    // acme's audit log has the refusal; its ledger holds charges and released values only
    // (a version-1 ledger kept each draw as {"noise":…,"nonce":…}).
    let audit = c.audit_entries("acme", None);
    assert!(
        audit.iter().any(|e| e["event"]["accepted"] == false
            && e["event"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("job job-dup's release was already charged"))),
        "{audit:?}"
    );
    let mut ledger = std::fs::read(c.path().join("state-acme/ledger.sqlite")).unwrap();
    ledger.extend(std::fs::read(c.path().join("state-acme/ledger.sqlite-wal")).unwrap_or_default());
    for needle in [&b"nonce"[..], b"\"noise\""] {
        assert!(
            !ledger.windows(needle.len()).any(|w| w == needle),
            "acme's ledger stores its noise"
        );
    }
}

/// An email both acme's and globex's customers files hold.
fn shared_email(c: &Consortium) -> String {
    let emails = |name: &str| -> std::collections::HashSet<String> {
        let text = std::fs::read_to_string(c.path().join(format!("data/{name}.csv"))).unwrap();
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap().split(',').collect();
        let col = header.iter().position(|h| *h == "email").unwrap();
        lines
            .filter_map(|l| l.split(',').nth(col))
            .map(|e| e.trim().to_lowercase())
            .collect()
    };
    let acme = emails("acme");
    let mut shared: Vec<String> = emails("globex").intersection(&acme).cloned().collect();
    shared.sort();
    shared
        .into_iter()
        .next()
        .expect("acme and globex share a customer")
}

/// A lifetime cap never refreshes: two runs fit, the third is vetoed with a reason that says
/// so, and `budget` shows the lifetime spend. An ε no budget caps is refused when the policy is
/// read.
#[test]
fn a_lifetime_cap_stops_releases_for_good_and_uncapped_epsilon_is_refused() {
    let (mut c, _) = Consortium::with_coordinator("acme,globex", 200, 0.5, 4);
    c.issue_node("acme");
    c.issue_node("globex");
    let uncapped = c.write_node_config("acme", "acme", &agreement("globex", "", ACME_EPSILON));
    let out = Command::new(&bins().1)
        .args(["policy", "check"])
        .arg(&uncapped)
        .current_dir(c.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("allow overlap on 'customers' sets epsilon 0.25 but no budget caps it"),
        "{stderr}"
    );
    c.write_node_config(
        "acme",
        "acme",
        &agreement(
            "globex",
            "budget_per_purpose = { epsilon_per_period = 10.0, period = \"hour\", epsilon_lifetime = 0.5 }",
            ACME_EPSILON,
        ),
    );
    c.write_node_config("globex", "globex", &agreement("acme", GLOBEX_CAP, 0.5));
    c.start_node("acme");
    c.start_node("globex");
    c.wait_connected(&["acme", "globex"]);
    for run in 0..2 {
        assert_eq!(overlap(&c)["state"], "succeeded", "run {run}");
    }
    let job = overlap(&c);
    let reason = reason_of(&job, "vetoed");
    assert!(
        reason.contains(
            "lifetime privacy budget for purpose 'overlap-reporting' with globex exhausted: 0.5 \
             of 0.5 in all spent, 0 remains, this job needs 0.25; a lifetime budget never \
             refreshes"
        ),
        "{reason}"
    );
    let spend = acme_budget(&c);
    assert_eq!(spend["lifetime_cap"].as_f64(), Some(0.5), "{spend}");
    assert_eq!(spend["lifetime_spent"].as_f64(), Some(0.5), "{spend}");
    assert_eq!(spend["lifetime_remaining"].as_f64(), Some(0.0), "{spend}");
    assert_eq!(spend["remaining"].as_f64(), Some(9.5), "{spend}");
}

/// Fifty overlap jobs at once, each costing acme ε = 0.1 against a budget of 1: exactly ten are
/// charged and release a count; every other one is refused for budget (vetoed at the offer, or
/// refused at the charge when it lost the race), never released.
#[test]
fn fifty_concurrent_jobs_of_a_tenth_against_a_budget_of_one_run_exactly_ten() {
    let (mut c, truth) = Consortium::with_coordinator("acme,globex", 200, 0.5, 3);
    let expected = truth["pairwise_overlap"]["acme,globex"].as_u64().unwrap() as i64;
    start_nodes(&mut c, 0.1, GLOBEX_EXACT);
    c.wait_connected(&["acme", "globex"]);

    let mut args: Vec<String> = [
        &["job", "submit"][..],
        &OVERLAP,
        &["--wait", "--timeout", "300", "--format", "json"],
    ]
    .concat()
    .iter()
    .map(|s| s.to_string())
    .collect();
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
