//! End to end: `aggregate` jobs over 3 and 5 real node processes and a coordinator on
//! loopback. Totals equal the plaintext truth of `cleanroom synth` exactly when no agreement
//! asks for noise, and within the stated noise bound when one does; groups below the minimum
//! result are suppressed; a node killed mid-job fails the job with a reason and no result; and
//! no process's files or logs hold a partner's own per-group figures.

// Test-only code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use cleanroom_e2e::{Consortium, aggregate_job, reason_of};
use serde_json::Value;

/// The categories `cleanroom synth` draws from.
const CATEGORIES: [&str; 5] = ["electronics", "fashion", "home", "grocery", "travel"];

/// Terms of each node's aggregate entries (appended to every `[[agreement.allow]]`) and
/// agreements (after `purposes`).
struct Terms {
    extra: &'static str,
    agreement: &'static str,
}

const EXACT: Terms = Terms {
    extra: "min_result = 1\n",
    agreement: "",
};
const NOISED: Terms = Terms {
    extra: "epsilon = 1.0\nmin_result = 10\n",
    agreement: "budget_per_purpose = { epsilon_per_period = 100.0, period = \"day\" }\n",
};

/// A node config with the synthetic `chargebacks` dataset (`data/<name>-chargebacks.csv`, or
/// `path`) and an aggregate agreement with every other partner.
fn write_config(c: &Consortium, name: &str, partners: &[&str], terms: &Terms, path: Option<&str>) {
    let path = path.map_or_else(|| format!("data/{name}-chargebacks.csv"), str::to_owned);
    let mut cfg = format!(
        "[[dataset]]\nname = \"chargebacks\"\npath = \"{path}\"\n\n\
         [[dataset.value]]\ncolumn = \"amount\"\nmin = 0\nmax = 10000000\n\n"
    );
    for other in partners.iter().filter(|p| **p != name) {
        cfg.push_str(&format!(
            "[[agreement]]\npartner = \"{other}\"\npurposes = [\"fraud-benchmark\"]\n{}\n\
             [[agreement.allow]]\ncomputation = \"aggregate\"\ndataset = \"chargebacks\"\n\
             group_by = [\"category\", \"bucket\"]\nvalue_columns = [{{ column = \"amount\", min = 0, max = 200000 }}]\n{}\n",
            terms.agreement, terms.extra
        ));
    }
    c.write_node_toml(name, &cfg);
}

/// A consortium of `partners` with synthetic data (`rows` customers each, a fifth of that in
/// chargebacks), all nodes running under `terms`. Returns it and the ground truth.
fn consortium(partners: &[&str], rows: u64, terms: &Terms) -> (Consortium, Value) {
    let mut c = Consortium::new();
    let truth = c.synth(&partners.join(","), rows, 0.3, 11);
    c.start_coordinator();
    for p in partners {
        c.issue_node(p);
        write_config(&c, p, partners, terms, None);
        c.start_node(p);
    }
    c.wait_connected(partners);
    (c, truth)
}

/// `job submit aggregate` over `partners`, grouping by the first four categories and a label
/// no row has ("luxury"); the fifth category ends up in "(other)".
fn submit(c: &Consortium, partners: &[&str]) -> (Value, Option<i32>) {
    let groups = format!("{},luxury", CATEGORIES[..4].join(","));
    c.submit(
        &[
            &aggregate_job(&partners.join(","), &groups)[..],
            &["--count"],
        ]
        .concat(),
    )
}

/// The plaintext (count, amount) of a group label in the truth; "(other)" is the fifth
/// category, "luxury" is empty.
fn truth_of(truth: &Value, label: &str) -> (i64, i64) {
    let key = if label == "(other)" {
        CATEGORIES[4]
    } else {
        label
    };
    let g = &truth["chargebacks_total"][key];
    (
        g["count"].as_i64().unwrap_or(0),
        g["amount"].as_i64().unwrap_or(0),
    )
}

fn groups(job: &Value) -> Vec<Value> {
    job["result"]["groups"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn noise_sd(job: &Value, column: &str) -> f64 {
    job["result"]["noise"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["column"] == column)
        .and_then(|n| n["total_sd"].as_f64())
        .unwrap()
}

#[test]
fn exact_totals_without_noise_and_nothing_of_a_partner_leaks() {
    let partners = ["acme", "globex", "initech"];
    let (c, truth) = consortium(&partners, 300, &EXACT);
    let (job, code) = submit(&c, &partners);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(code, Some(0));
    let gs = groups(&job);
    assert_eq!(gs.len(), 6, "{job}");
    for g in &gs {
        let label = g["group"].as_str().unwrap();
        let (count, amount) = truth_of(&truth, label);
        if label == "luxury" {
            // No row: count 0 < min_result 1, suppressed, no values.
            assert_eq!(g["suppressed"], true, "{g}");
            assert!(g["values"].as_object().unwrap().is_empty());
            continue;
        }
        assert_eq!(g["suppressed"], false, "{g}");
        assert_eq!(g["values"]["count"], count, "{label}");
        assert_eq!(g["values"]["amount"], amount, "{label}");
    }
    for n in job["result"]["noise"].as_array().unwrap() {
        assert_eq!(n["noised"], false, "{n}");
    }
    // Every party's audit head and byte counts come with the result, and nothing else of it:
    // its rows read, excluded and in "(other)" are its own figures (issue 12: with one group,
    // rows read minus the rest was its exact count, past the masks, the noise and the
    // threshold). They stay in its audit log.
    let stats = job["result"]["parties"].as_array().unwrap();
    assert_eq!(stats.len(), 3);
    for p in stats {
        let mut keys: Vec<&str> = p.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "audit_head",
                "bytes_to_coordinator",
                "bytes_to_peers",
                "node"
            ],
            "{p}"
        );
        let node = p["node"].as_str().unwrap();
        let own_rows: u64 = CATEGORIES
            .iter()
            .map(|k| truth["chargebacks"][node][k]["count"].as_u64().unwrap_or(0))
            .sum();
        let own_other = truth["chargebacks"][node][CATEGORIES[4]]["count"]
            .as_u64()
            .unwrap_or(0);
        // A partial's size is fixed by the spec: every party sent the coordinator as much.
        assert_eq!(
            p["bytes_to_coordinator"], stats[0]["bytes_to_coordinator"],
            "{p}"
        );
        let access = c.audited_access(node, job["job_id"].as_str().unwrap());
        assert_eq!(access["rows_read"], own_rows, "{node}: {access}");
        assert_eq!(access["rows_other"], own_other, "{node}: {access}");
        // Two hellos, each with a 32-byte seed and little else; the partial is 6 × 2 cells.
        let to_peers = p["bytes_to_peers"].as_u64().unwrap();
        assert!((2 * 32..2 * 200).contains(&to_peers), "{p}");
        assert!(p["bytes_to_coordinator"].as_u64().unwrap() >= 12 * 8, "{p}");
        assert!(!p["audit_head"].as_str().unwrap().is_empty(), "{p}");
    }

    // The table and CSV renderings of `job status`.
    let job_id = job["job_id"].as_str().unwrap();
    let show = |format: &str| {
        String::from_utf8(
            c.as_analyst(&["job", "status", job_id, "--format", format])
                .stdout,
        )
        .unwrap()
    };
    let table = show("table");
    assert!(
        table.contains("aggregate by category over 3 parties"),
        "{table}"
    );
    assert!(table.contains("noise      none"), "{table}");
    assert!(
        table.contains("luxury") && table.contains("suppressed (below the minimum result)"),
        "{table}"
    );
    let (count, amount) = truth_of(&truth, "home");
    let csv = show("csv");
    assert!(
        csv.starts_with("group,suppressed,count,count_noise_sd,amount,amount_noise_sd\n"),
        "{csv}"
    );
    assert!(
        csv.contains(&format!("home,false,{count},0.00,{amount},0.00\n")),
        "{csv}"
    );
    assert!(csv.contains("luxury,true,,0.00,,0.00\n"), "{csv}");

    // No log, audit log, state file or the coordinator's database holds one partner's own
    // per-group amount (as text, or as the little-endian cell a partial would carry), while
    // the released totals are in the database.
    let mut artefacts = Vec::new();
    let mut dirs = vec![c.path().to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if !path.ends_with("data") && !path.ends_with("pki") {
                    dirs.push(path);
                }
            } else {
                artefacts.push(path);
            }
        }
    }
    let db = std::fs::read(c.path().join("coordinator.db")).unwrap();
    assert!(!db.is_empty());
    for partner in partners {
        for category in CATEGORIES {
            let own = truth["chargebacks"][partner][category]["amount"]
                .as_u64()
                .unwrap();
            let cell = own.to_le_bytes();
            for file in &artefacts {
                let bytes = std::fs::read(file).unwrap_or_default();
                assert!(
                    !holds_number(&bytes, own) && !contains(&bytes, &cell),
                    "{} holds {partner}'s {category} figure",
                    file.display()
                );
            }
        }
    }
}

/// `cleanroom job result JOB ARGS` (as JSON unless ARGS give a format): stdout.
fn job_result(c: &Consortium, job_id: &str, args: &[&str]) -> String {
    c.as_analyst_ok(&[&["job", "result", job_id][..], args].concat())
}

/// An integer group domain of 100 000 buckets over 3 real nodes, no noise: only the range
/// travels, the result (~1 MB) is too large for one GetJob frame, so the CLI reads it page by
/// page, and every group equals the plaintext truth computed from the partners' files; a
/// bucket that is not an integer rejects its row, one outside the range lands in "(other)".
#[test]
fn integer_domain_result_is_paged_and_exact() {
    const GROUPS: usize = 100_000;
    let partners = ["acme", "globex", "initech"];
    let mut c = Consortium::new();
    c.synth(&partners.join(","), 60_000, 0.3, 5);
    // Hostile rows in acme's file: a bucket that is no integer (rejected), one below the range
    // and one far above it (both "(other)").
    let acme = c.path().join("data/acme-chargebacks.csv");
    let mut text = std::fs::read_to_string(&acme).unwrap();
    text.push_str("x-1,home,100,twelve\nx-2,home,100,1.5\nx-3,home,7,-1\nx-4,home,9,99999999999\n");
    std::fs::write(&acme, text).unwrap();
    // The truth, from the files as the nodes will read them.
    let mut truth = vec![(0i64, 0i64); GROUPS + 1];
    let mut acme_other = 0u64;
    for p in partners {
        // The synthetic files hold no quoted fields: plain splitting reads them.
        let text =
            std::fs::read_to_string(c.path().join(format!("data/{p}-chargebacks.csv"))).unwrap();
        for line in text.lines().skip(1) {
            let rec: Vec<&str> = line.split(',').collect();
            let Ok(bucket) = rec[3].parse::<i64>() else {
                continue;
            };
            let amount: i64 = rec[2].parse().unwrap();
            let g = usize::try_from(bucket)
                .ok()
                .filter(|b| *b < GROUPS)
                .unwrap_or(GROUPS);
            if g == GROUPS && p == "acme" {
                acme_other += 1;
            }
            truth[g].0 += 1;
            truth[g].1 += amount;
        }
    }
    assert!(truth[..GROUPS].iter().filter(|t| t.0 > 0).count() > 1000);
    c.start_coordinator();
    for p in partners {
        c.issue_node(p);
        write_config(&c, p, &partners, &EXACT, None);
        c.start_node(p);
    }
    c.wait_connected(&partners);

    let started = Instant::now();
    let (job, code) = c.submit(&[
        "aggregate",
        "--parties",
        &partners.join(","),
        "--dataset",
        "chargebacks",
        "--group-by",
        "bucket",
        "--group-range",
        &format!("0..{GROUPS}"),
        "--sum",
        "amount",
        "--count",
        "--purpose",
        "fraud-benchmark",
    ]);
    eprintln!("submit → streamed result: {:?}", started.elapsed());
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(code, Some(0));
    assert_eq!(job["group_range"]["hi"], GROUPS as i64);
    assert_eq!(job["result"]["total_groups"], GROUPS as u64 + 1);
    let check = |gs: &[Value], first: usize| {
        for (i, g) in gs.iter().enumerate() {
            let index = first + i;
            let label = if index == GROUPS {
                "(other)".to_owned()
            } else {
                index.to_string()
            };
            assert_eq!(g["group"], label.as_str(), "{g}");
            let (count, amount) = truth[index];
            if count == 0 {
                assert_eq!(g["suppressed"], true, "{g}");
            } else {
                assert_eq!(g["suppressed"], false, "{g}");
                assert_eq!(g["values"]["count"], count, "{g}");
                assert_eq!(g["values"]["amount"], amount, "{g}");
            }
        }
    };
    let all = groups(&job);
    assert_eq!(all.len(), GROUPS + 1);
    check(&all, 0);
    // The hostile lines: two rejected (in no group), two in "(other)" — counted in acme's audit
    // log, and in no report.
    let acme_stats = &job["result"]["parties"][0];
    assert_eq!(acme_stats["node"], "acme");
    assert!(acme_stats.get("rows_other").is_none(), "{acme_stats}");
    let access = c.audited_access("acme", job["job_id"].as_str().unwrap());
    assert_eq!(access["rows_other"], acme_other, "{access}");
    assert_eq!(access["rows_rejected"], 2, "{access}");

    // GetJob alone carries no groups of a result this large; it says how many there are.
    let job_id = job["job_id"].as_str().unwrap();
    let status = c.job_status(job_id);
    assert!(groups(&status).is_empty(), "{status}");
    assert_eq!(status["result"]["total_groups"], GROUPS as u64 + 1);

    // A window across the end, in JSON and CSV.
    let tail: Value = serde_json::from_str(&job_result(
        &c,
        job_id,
        &["--format", "json", "--offset", "99990", "--limit", "50"],
    ))
    .unwrap();
    let tail = groups(&tail);
    assert_eq!(tail.len(), 11);
    check(&tail, 99_990);
    let csv = job_result(
        &c,
        job_id,
        &["--format", "csv", "--offset", "16380", "--limit", "10"],
    );
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 11, "{csv}");
    assert!(lines[0].starts_with("group,suppressed,count"), "{csv}");
    for (i, line) in lines[1..].iter().enumerate() {
        let (count, amount) = truth[16_380 + i];
        let expected = if count == 0 {
            format!("{},true,,0.00,,0.00", 16_380 + i)
        } else {
            format!("{},false,{count},0.00,{amount},0.00", 16_380 + i)
        };
        assert_eq!(*line, expected);
    }
    // Past the end: the header and nothing else.
    let empty = job_result(&c, job_id, &["--format", "csv", "--offset", "200000"]);
    assert_eq!(empty.lines().count(), 1, "{empty}");
    // The table streams every group too, and ends with the parties and the history.
    let table = job_result(&c, job_id, &["--format", "table"]);
    assert!(
        table.contains("aggregate by bucket in 0..100000"),
        "{table}"
    );
    assert!(table.contains("\n  99999 "), "{table:.2000}");
    assert!(!table.contains("groups shown"));
    assert!(table.contains("history"));

    // A range beyond the cap, or labels and a range together, is refused at submission.
    for (range, why) in [
        ("0..3000000", "at most 2097152"),
        ("5..5", "is empty"),
        ("0..1e6", "two integers"),
    ] {
        let out = c.as_analyst(&[
            "job",
            "submit",
            "aggregate",
            "--parties",
            "acme,globex,initech",
            "--dataset",
            "chargebacks",
            "--group-by",
            "bucket",
            "--group-range",
            range,
            "--count",
            "--purpose",
            "fraud-benchmark",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{range}");
        assert!(stderr.contains(why), "{range}: {stderr}");
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether `haystack` holds `number` as a whole number: its digits with no letter, digit or
/// decimal point just before them and no letter or digit just after. A figure a process wrote
/// reads so (`"amount":31054`, `31054,`, `31054.0`); the same digits inside a hash's hex or a
/// timestamp's nanoseconds are chance, not a leak (a five-digit figure turned up in an audit
/// log's hex once and failed CI).
fn holds_number(haystack: &[u8], number: u64) -> bool {
    let text = number.to_string();
    let digits = text.as_bytes();
    haystack
        .windows(digits.len())
        .enumerate()
        .filter(|(_, w)| *w == digits)
        .any(|(at, _)| {
            let before = at.checked_sub(1).map(|i| haystack[i]);
            let after = haystack.get(at + digits.len()).copied();
            !before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'.')
                && !after.is_some_and(|a| a.is_ascii_alphanumeric())
        })
}

#[test]
fn holds_number_finds_a_written_figure_and_not_chance_digits() {
    assert!(holds_number(br#"{"amount":31054}"#, 31054));
    assert!(holds_number(b"fashion,31054.0\n", 31054));
    assert!(holds_number(b"31054", 31054));
    assert!(!holds_number(b"\"head\":\"9fa31054c2\"", 31054));
    assert!(!holds_number(b"17:33:50.123103154Z", 31054));
    assert!(!holds_number(b"310540 131054 0.31054", 31054));
}

#[test]
fn noised_totals_are_within_the_stated_bound_and_small_groups_suppressed() {
    let partners = ["acme", "globex", "initech"];
    let (c, truth) = consortium(&partners, 1500, &NOISED);
    let mut exact_everywhere = true;
    let mut rho = 0.0;
    for run in 0..3 {
        let (job, code) = submit(&c, &partners);
        assert_eq!(job["state"], "succeeded", "run {run}: {job}");
        assert_eq!(code, Some(0));
        let (sd_count, sd_amount) = (noise_sd(&job, "count"), noise_sd(&job, "amount"));
        // ε = 1 split over two columns, all but one party may collude: each party adds
        // σ = Δ·√2, so the total has sd Δ·√2·√3.
        assert!(
            (sd_count - 2f64.sqrt() * 3f64.sqrt()).abs() < 1e-3,
            "{sd_count}"
        );
        assert!(
            (sd_amount - 200_000.0 * 2f64.sqrt() * 3f64.sqrt()).abs() < 1.0,
            "{sd_amount}"
        );
        assert_eq!(job["result"]["max_colluders"], 2);
        let zcdp = job["result"]["zcdp_epsilon"].as_f64().unwrap();
        assert!(zcdp <= 1.0 + 1e-3);
        rho += zcdp * zcdp / 2.0;
        for g in groups(&job) {
            let label = g["group"].as_str().unwrap();
            let (count, amount) = truth_of(&truth, label);
            if label == "luxury" {
                assert_eq!(g["suppressed"], true, "run {run}: {g}");
                continue;
            }
            // Every real group has ≥ 10 rows by a wide margin (300 chargebacks per partner
            // over 5 categories, weights 1..5: the rarest ≈ 20 per partner).
            assert!(count >= 20, "{label}: {count}");
            assert_eq!(g["suppressed"], false, "run {run}: {g}");
            let got_count = g["values"]["count"].as_i64().unwrap();
            let got_amount = g["values"]["amount"].as_i64().unwrap();
            // Six standard deviations: a false alarm has probability ≈ 2·10⁻⁹ per value.
            assert!(
                ((got_count - count) as f64).abs() <= 6.0 * sd_count,
                "run {run} {label}: count {got_count} vs {count} ± {sd_count}"
            );
            assert!(
                ((got_amount - amount) as f64).abs() <= 6.0 * sd_amount,
                "run {run} {label}: amount {got_amount} vs {amount} ± {sd_amount}"
            );
            exact_everywhere &= got_count == count && got_amount == amount;
        }
    }
    assert!(!exact_everywhere, "noise was never added");
    // Each node audited a release with the ε its agreements set.
    for p in partners {
        let log = std::fs::read_to_string(c.path().join(format!("state-{p}/audit.log"))).unwrap();
        let releases = log
            .lines()
            .filter(|l| {
                l.contains("aggregate partial sum")
                    && l.contains("\"epsilon\":1")
                    && l.contains("\"rho\":")
                    && l.contains("zCDP rho")
            })
            .count();
        assert_eq!(releases, 3, "{p}: {log}");
    }
    // And charged its zCDP ρ per run (not ε as if it were pure: issue 12), once per job, under
    // the other parties as the partner scope; the budget reads the ρ composed over the three
    // runs at δ = 1e-9: ρ + 2·√(ρ·ln 1e9), which is what the caps hold.
    let at_delta = rho + 2.0 * (rho * 1e9f64.ln()).sqrt();
    assert!(at_delta > 3.0, "{at_delta}");
    for p in partners {
        let lines = c.budget_json(p);
        let others: Vec<&str> = partners.iter().copied().filter(|q| q != &p).collect();
        let scope = others.join(",");
        let line = lines
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["partner"] == scope.as_str())
            .unwrap_or_else(|| panic!("{p}: no ledger line for '{scope}' in {lines}"));
        assert!(
            (line["rho"].as_f64().unwrap() - rho).abs() < 1e-6,
            "{p}: ρ {rho}, {line}"
        );
        assert!(
            (line["spent"].as_f64().unwrap() - at_delta).abs() < 1e-6,
            "{p}: {at_delta}, {line}"
        );
        assert_eq!(line["charges"], 3, "{p}: {line}");
    }
}

#[test]
fn five_parties_exact() {
    let partners = ["acme", "globex", "initech", "hooli", "umbrella"];
    let (c, truth) = consortium(&partners, 100, &EXACT);
    let (job, _) = submit(&c, &partners);
    assert_eq!(job["state"], "succeeded", "{job}");
    for g in groups(&job) {
        let label = g["group"].as_str().unwrap();
        if label == "luxury" {
            continue;
        }
        let (count, amount) = truth_of(&truth, label);
        assert_eq!(g["values"]["count"], count, "{label}");
        assert_eq!(g["values"]["amount"], amount, "{label}");
    }
}

#[test]
fn a_policy_requiring_more_parties_vetoes() {
    let partners = ["acme", "globex", "initech"];
    let strict = Terms {
        extra: "min_parties = 4\n",
        agreement: "",
    };
    let mut c = Consortium::new();
    c.synth(&partners.join(","), 50, 0.3, 5);
    c.start_coordinator();
    for p in partners {
        c.issue_node(p);
        let terms = if p == "globex" { &strict } else { &EXACT };
        write_config(&c, p, &partners, terms, None);
        c.start_node(p);
    }
    c.wait_connected(&partners);
    let (job, code) = submit(&c, &partners);
    assert_eq!(code, Some(2));
    let reason = reason_of(&job, "vetoed");
    assert!(
        reason.contains("globex") && reason.contains("at least 4 parties"),
        "{reason}"
    );
    assert!(job["result"].is_null());
}

/// A node whose dataset is a FIFO blocks while loading: the job is running, its peers wait for
/// its share. Killing it (SIGKILL) must fail the job with a reason naming it, release nothing,
/// and leave the survivors serving.
#[test]
fn a_node_killed_mid_job_fails_the_job_without_result() {
    let partners = ["acme", "globex", "initech"];
    let mut c = Consortium::new();
    c.synth(&partners.join(","), 100, 0.3, 5);
    c.start_coordinator();
    // globex starts with a regular file (a node checks its datasets at start), which becomes a
    // FIFO before the job.
    let fifo = c.path().join("data/blocking.csv");
    std::fs::copy(c.path().join("data/globex-chargebacks.csv"), &fifo).unwrap();
    for p in partners {
        c.issue_node(p);
        let path = (p == "globex").then_some("data/blocking.csv");
        write_config(&c, p, &partners, &EXACT, path);
        c.start_node(p);
    }
    c.wait_connected(&partners);
    std::fs::remove_file(&fifo).unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());

    let groups = CATEGORIES.join(",");
    let job_id = c.submit_nowait(&aggregate_job("acme,globex,initech", &groups));
    let status = |c: &Consortium| -> Value { c.job_status(&job_id) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&c)["state"] != "running" {
        assert!(
            Instant::now() < deadline,
            "the job never ran: {}",
            status(&c)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Give the other parties time to send their shares and wait for globex's.
    std::thread::sleep(Duration::from_millis(500));
    let pid = c.node("globex").pid();
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    let deadline = Instant::now() + Duration::from_secs(90);
    let job = loop {
        let job = status(&c);
        if job["state"] != "running" {
            break job;
        }
        assert!(Instant::now() < deadline, "the job did not end: {job}");
        std::thread::sleep(Duration::from_millis(250));
    };
    let reason = reason_of(&job, "failed");
    println!("failed as expected: {reason}");
    assert!(reason.contains("globex"), "{reason}");
    assert!(reason.contains("no partial result is released"), "{reason}");
    assert!(job["result"].is_null(), "{job}");
}

/// Per-person clipping: with a person column named by every agreement and by the job, each
/// party sums a person's rows in the first of the job's groups its rows carry, clips the sum
/// and counts the person once, so the noise (here: none, to check the totals exactly) protects
/// a person. A job that does not clip per person, where the agreements require it, is vetoed
/// with what to submit.
#[test]
fn per_person_clipping_counts_people_and_clips_their_sums() {
    per_person_clipping(false);
}

/// The same with acme's pass on its Ballista executors: the grouping per person runs there too,
/// and the figures are the same.
#[test]
fn per_person_clipping_runs_on_a_partners_executors() {
    per_person_clipping(true);
}

fn per_person_clipping(on_cluster: bool) {
    let partners = ["acme", "globex", "initech"];
    let per_person = Terms {
        extra: "min_result = 1\nperson = \"customer\"\n",
        agreement: "",
    };
    let files = [
        (
            "acme",
            // c1: two rows of 150 000 in electronics (300 000, clipped to 200 000) and one in
            // home, left out (outside its group). c4: home first, then electronics, which the
            // job lists first: c4 counts there with 20, its home row left out.
            "customer,category,amount\nc1,electronics,150000\nc1,electronics,150000\nc1,home,5000\n\
             c2,home,100\nc3,home,7\nc4,home,10\nc4,electronics,20\n",
        ),
        (
            "globex",
            "customer,category,amount\ng1,electronics,250000\ng2,electronics,10\ng2,electronics,20\n",
        ),
        (
            "initech",
            "customer,category,amount\ni1,home,1\ni1,home,2\ni2,fashion,400000\n",
        ),
    ];
    let mut c = Consortium::new();
    c.start_coordinator();
    if on_cluster {
        let cluster = cleanroom_e2e::ballista::Ballista::start(c.path(), 2, 600);
        c.node_top.insert("acme".into(), cluster.engine_line(true));
        c.ballista = Some(cluster);
    }
    for (p, csv) in files {
        std::fs::write(c.path().join(format!("{p}-people.csv")), csv).unwrap();
        c.issue_node(p);
        write_config(
            &c,
            p,
            &partners,
            &per_person,
            Some(&format!("{p}-people.csv")),
        );
        c.start_node(p);
    }
    c.wait_connected(&partners);
    let submit = |extra: &[&str]| {
        let mut args = aggregate_job("acme,globex,initech", "electronics,fashion,home").to_vec();
        args.push("--count");
        args.extend(extra);
        c.submit(&args).0
    };
    let vetoed = submit(&[]);
    assert_eq!(vetoed["state"], "vetoed", "{vetoed}");
    assert!(
        vetoed["reason"].as_str().unwrap().contains(
            "requires per-person clipping on 'customer' (submit with --per-person customer)"
        ),
        "{vetoed}"
    );
    let job = submit(&["--per-person", "customer"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    let by_label: std::collections::HashMap<String, Value> = groups(&job)
        .into_iter()
        .map(|g| (g["group"].as_str().unwrap().to_owned(), g))
        .collect();
    // Per row these would be 6 rows and 500 050 in electronics, 6 rows in home.
    for (label, count, amount) in [
        ("electronics", 4, 400_050),
        ("fashion", 1, 200_000),
        ("home", 3, 110),
    ] {
        let g = &by_label[label];
        assert_eq!(g["values"]["count"], count, "{label}: {g}");
        assert_eq!(g["values"]["amount"], amount, "{label}: {g}");
    }
    assert_eq!(by_label["(other)"]["suppressed"], true);
    assert_eq!(job["per_person"], "customer", "{job}");
    // acme audited its persons and the row it left out.
    let access = c.audited_access("acme", job["job_id"].as_str().unwrap());
    assert_eq!(access["persons"]["persons"], 4, "{access}");
    assert_eq!(access["persons"]["rows_outside_group"], 2, "{access}");
    assert_eq!(access["rows_read"], 7, "{access}");
    assert!(
        access["columns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "customer"),
        "{access}"
    );
    let log = c.node_log("acme");
    assert!(
        log.contains(&format!("on_executors={on_cluster}")),
        "acme read on its executors: {on_cluster}"
    );
}

/// With a sealing key, acme's pass runs on its Ballista executors and is grouped there: only a
/// row per (outcome, group) comes back to its node. acme's file has malformed lines besides
/// the synthetic rows: they are rejected and counted, and the totals equal the truth.
#[test]
fn a_partners_pass_and_grouping_run_on_its_executors() {
    let partners = ["acme", "globex", "initech"];
    let mut c = Consortium::new();
    let truth = c.synth(&partners.join(","), 100, 0.3, 11);
    // chargeback_id,category,amount,bucket: a short line, a long one, an open quote, a quote
    // in the amount, and a bad amount.
    let file = c.path().join("data/acme-chargebacks.csv");
    let mut text = std::fs::read_to_string(&file).unwrap();
    let rows = text.lines().count() as u64 - 1;
    text.push_str(
        "x1,electronics,5\nx2,electronics,5,1,extra\nx3,\"electronics,5,1\n\
         x4,electronics,\"5\"\"\",1\nx5,electronics,lots,1\n",
    );
    std::fs::write(&file, text).unwrap();
    c.start_coordinator();
    let cluster = cleanroom_e2e::ballista::Ballista::start(c.path(), 2, 600);
    c.node_top.insert("acme".into(), cluster.engine_line(true));
    c.ballista = Some(cluster);
    for p in partners {
        c.issue_node(p);
        write_config(&c, p, &partners, &EXACT, None);
        c.start_node(p);
    }
    c.wait_connected(&partners);
    let (job, code) = submit(&c, &partners);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(code, Some(0));
    let shown = groups(&job);
    assert_eq!(shown.len(), 6, "{job}");
    for g in shown {
        let label = g["group"].as_str().unwrap();
        if label == "luxury" {
            continue;
        }
        let (count, amount) = truth_of(&truth, label);
        assert_eq!(g["values"]["count"], count, "{label}: {job}");
        assert_eq!(g["values"]["amount"], amount, "{label}: {job}");
    }
    let access = c.audited_access("acme", job["job_id"].as_str().unwrap());
    assert_eq!(access["rows_read"], rows + 5, "{access}");
    assert_eq!(access["rows_rejected"], 5, "{access}");
    // By reason: the short, long and open-quote lines, and the quote in a read field; the bad
    // amount is rejected by the job, not the reader.
    let by_reason = &access["rejected"]["by_reason"];
    assert_eq!(by_reason["field count"], 3, "{access}");
    assert_eq!(by_reason["quote in a field"], 1, "{access}");
    let log = c.node_log("acme");
    assert!(
        log.contains("on_executors=true"),
        "acme read on its executors"
    );
}
