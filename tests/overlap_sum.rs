//! End to end: `overlap-sum` (intersection-sum with cardinality) between two real node processes
//! and a coordinator on loopback. acme holds the identifiers (key holder), globex the amounts
//! (value holder).
//!
//! - Without noise (no ε in either policy) every group's count and clipped sum equal an
//!   independent computation from the CSV files exactly; a group with no shared customer is
//!   suppressed; CSV output marks it.
//! - With ε, both nodes draw noise (the key holder under encryption, the value holder after
//!   decryption), every figure lies within 15 standard deviations of the truth, no sum equals the
//!   exact one (the value holder never decrypts an un-noised total), and both ledgers are charged.
//! - Refunds (negative rows) are summed per customer before the total is clipped.
//! - A policy that refuses the key-holder role vetoes the job with a reason naming the roles.
//! - No log, audit file or result file of either node holds an exact per-group sum.

// Test-only code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use cleanroom_e2e::ballista::Ballista;
use cleanroom_e2e::{Consortium, overlap_sum_between};
use serde_json::Value;

/// Categories of `cleanroom synth`'s customers files.
const CATEGORIES: [&str; 5] = ["electronics", "fashion", "home", "grocery", "travel"];
/// The value holder's clipping bound per customer (amounts go up to 500 000).
const CLIP: u64 = 300_000;

/// The customers dataset's value column, then an overlap-sum agreement with `other`.
fn agreements(other: &str, extra: &str) -> String {
    format!(
        "[[dataset.value]]\ncolumn = \"amount_cents\"\nmin = 0\nmax = 10000000\n\n\
         [[agreement]]\npartner = \"{other}\"\npurposes = [\"fraud-detection\"]\n\n\
         [[agreement.allow]]\ncomputation = \"overlap-sum\"\ndataset = \"customers\"\nkeys = [\"email\"]\n\
         group_by = [\"category\"]\nvalue_columns = [{{ column = \"amount_cents\", min = 0, max = {CLIP} }}]\n{extra}\n"
    )
}

/// acme and globex with 400 customers each, 150 shared, under the given extra terms.
fn consortium(acme_extra: &str, globex_extra: &str) -> (Consortium, Value) {
    consortium_with_acme_top("", acme_extra, globex_extra)
}

/// [`consortium`] with `acme_top` at the top of acme's config (a `memory_limit`, say).
fn consortium_with_acme_top(
    acme_top: &str,
    acme_extra: &str,
    globex_extra: &str,
) -> (Consortium, Value) {
    consortium_with_tops([acme_top, ""], acme_extra, globex_extra)
}

/// [`consortium`] with `tops` at the top of acme's and globex's configs.
fn consortium_with_tops(
    tops: [&str; 2],
    acme_extra: &str,
    globex_extra: &str,
) -> (Consortium, Value) {
    let (mut c, truth) = Consortium::with_coordinator("acme,globex", 400, 0.375, 5);
    for (name, top) in ["acme", "globex"].into_iter().zip(tops) {
        if !top.is_empty() {
            c.node_top.insert(name.into(), top.into());
        }
    }
    start_pair(&mut c, acme_extra, globex_extra);
    (c, truth)
}

/// Issues acme's and globex's certificates, writes their configs (each with `extra` in its
/// agreement) and starts them.
fn start_pair(c: &mut Consortium, acme_extra: &str, globex_extra: &str) {
    for (name, other, extra) in [
        ("acme", "globex", acme_extra),
        ("globex", "acme", globex_extra),
    ] {
        c.issue_node(name);
        c.write_node_config(name, name, &agreements(other, extra));
        c.start_node(name);
    }
    c.wait_connected(&["acme", "globex"]);
}

/// Groups by the first three categories and a label no row has; the last two categories end
/// up in "(other)".
fn submit(c: &Consortium, format: &str) -> (String, Option<i32>) {
    let groups = format!("{},luxury", CATEGORIES[..3].join(","));
    let out = c.as_analyst(
        &[
            &["job", "submit"][..],
            &overlap_sum_between("acme,globex"),
            &["--group-by", "category", "--groups", &groups],
            &["--wait", "--timeout", "120", "--format", format],
        ]
        .concat(),
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code(),
    )
}

/// [`submit`] as JSON: the job, and the exit code.
fn submit_json(c: &Consortium) -> (Value, Option<i32>) {
    let (out, code) = submit(c, "json");
    let job = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}"));
    (job, code)
}

/// The customer index a synthetic email ends its local part with (`cleanroom synth` makes it so;
/// the surface form around it varies).
fn customer_index(email: &str) -> u64 {
    let local = email.trim().split('@').next().unwrap();
    let digits: String = local
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits.parse().unwrap()
}

/// (customer index, category, amount) of every row of a synthetic customers file.
fn customer_rows(c: &Consortium, file: &str) -> Vec<(u64, String, u64)> {
    let text = std::fs::read_to_string(c.path().join(file)).unwrap();
    text.lines()
        .skip(1)
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            (customer_index(f[1]), f[4].to_owned(), f[3].parse().unwrap())
        })
        .collect()
}

/// The expected (count, clipped sum) per reported group, computed from the files: a customer of
/// globex is shared when its index is below the number shared by all; each customer has one
/// row.
fn expected(c: &Consortium, truth: &Value) -> BTreeMap<String, (i64, i64)> {
    let shared = truth["shared_by_all"].as_u64().unwrap();
    let mut out: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for label in ["electronics", "fashion", "home", "luxury", "(other)"] {
        out.insert(label.into(), (0, 0));
    }
    for (index, category, amount) in customer_rows(c, "data/globex.csv") {
        if index >= shared {
            continue;
        }
        let label = if CATEGORIES[..3].contains(&category.as_str()) {
            category
        } else {
            "(other)".to_owned()
        };
        let e = out.get_mut(&label).unwrap();
        e.0 += 1;
        e.1 += amount.min(CLIP) as i64;
    }
    out
}

fn groups(job: &Value) -> Vec<Value> {
    job["result"]["groups"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Every group of the job holds the (count, sum) `want` gives its label, and a group no shared
/// customer falls in (none in `want`) is suppressed.
fn assert_groups_exact(job: &Value, want: &BTreeMap<String, (i64, i64)>) {
    for g in groups(job) {
        let label = g["group"].as_str().unwrap();
        let (count, sum) = want.get(label).copied().unwrap_or_default();
        if count == 0 {
            assert_eq!(g["suppressed"], true, "{g}");
            continue;
        }
        assert_eq!(g["values"]["count"], count, "{label}: {job}");
        assert_eq!(g["values"]["amount_cents"], sum, "{label}: {job}");
    }
}

#[test]
fn exact_sums_equal_the_truth_with_clipping_and_suppression() {
    let (c, truth) = consortium("", "");
    let (job, code) = submit_json(&c);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(code, Some(0));
    let want = expected(&c, &truth);
    let gs = groups(&job);
    assert_eq!(gs.len(), 5, "{job}");
    let mut clipped_somewhere = false;
    for g in &gs {
        let label = g["group"].as_str().unwrap();
        let (count, sum) = want[label];
        if label == "luxury" {
            assert_eq!(g["suppressed"], true, "{g}");
            assert!(g["values"].as_object().unwrap().is_empty(), "{g}");
            continue;
        }
        assert_eq!(g["suppressed"], false, "{g}");
        assert_eq!(g["values"]["count"], count, "{label}: {job}");
        assert_eq!(g["values"]["amount_cents"], sum, "{label}: {job}");
        clipped_somewhere |= sum < count * 250_000;
    }
    assert!(clipped_somewhere, "the bound clipped nothing: {want:?}");
    let shared = truth["shared_by_all"].as_i64().unwrap();
    assert_eq!(job["result"]["intersection"], shared, "{job}");
    assert!(job["result"]["noise"].as_array().unwrap().is_empty());
    // Both sides sent something and report it.
    for p in job["parties"].as_array().unwrap() {
        assert!(p["bytes_to_peer"].as_u64().unwrap() > 0, "{p}");
    }

    // The same job as CSV marks the suppressed group.
    let (csv, code) = submit(&c, "csv");
    assert_eq!(code, Some(0), "{csv}");
    assert!(
        csv.starts_with(
            "group,suppressed,count,count_noise_scale,amount_cents,amount_cents_noise_scale\n"
        ),
        "{csv}"
    );
    assert!(csv.contains("\nluxury,true,,0,,0\n"), "{csv}");

    // Nothing on either node's disk or log holds an exact per-group sum, except the value
    // holder's ledger-free release in its audit log, which records the released count only.
    for name in ["acme", "globex"] {
        let log = c.node(name).log_text();
        for (label, (_, sum)) in &want {
            if *sum > 0 {
                assert!(
                    !log.contains(&sum.to_string()),
                    "{name}'s log holds the sum of {label}"
                );
            }
        }
    }
}

/// A key holder with a `memory_limit` keeps its points, the value holder's and its returned
/// ones in spill files: the sums still equal the truth, and the files are gone when the job
/// ends.
#[test]
fn a_memory_limited_key_holder_spills_and_sums_right() {
    let (c, truth) = consortium_with_acme_top("memory_limit = \"256MiB\"\n", "", "");
    let (job, code) = submit_json(&c);
    assert_eq!(code, Some(0), "{job}");
    assert_groups_exact(&job, &expected(&c, &truth));
    let shared = truth["shared_by_all"].as_i64().unwrap();
    assert_eq!(job["result"]["intersection"], shared, "{job}");

    // Own points (written, then sorted and rewritten), globex's with their places, and the
    // returned ones: 2 × 32 + 36 + 32 bytes for each of 400 points.
    let spilled = c.node("acme").spilled_bytes();
    assert_eq!(spilled, [400 * (2 * 32 + 36 + 32)], "acme's spills");
    let spill_dir = c.path().join("state-acme/spill");
    let left: Vec<_> = std::fs::read_dir(&spill_dir).unwrap().collect();
    assert!(left.is_empty(), "the job's spill files were left: {left:?}");
}

/// Both nodes under a `memory_limit`: the value holder (globex) blinds its rows as they are
/// read and combines them in spill files, and keeps acme's points there too; the sums still
/// equal the truth, and both nodes' spill directories are empty when the job ends.
#[test]
fn memory_limited_nodes_both_spill_and_sum_right() {
    let limit = "memory_limit = \"256MiB\"\n";
    let (c, truth) = consortium_with_tops([limit, limit], "", "");
    let (job, code) = submit_json(&c);
    assert_eq!(code, Some(0), "{job}");
    assert_groups_exact(&job, &expected(&c, &truth));

    // Without a cluster the value holder encrypts on its node.
    assert!(encrypted_on_the_cluster(&c.node_log("globex")).is_empty());
    // acme as in the test above; globex: each of its 400 rows (point, group, amount: 44
    // bytes), each customer's combined row (point and 5 groups × 2 cells: 112 bytes), and
    // acme's 400 points, sorted and rewritten (2 × 32 bytes).
    assert_eq!(c.node("acme").spilled_bytes(), [400 * (2 * 32 + 36 + 32)]);
    assert_eq!(
        c.node("globex").spilled_bytes(),
        [400 * 44 + 400 * 112 + 400 * 2 * 32],
        "globex's spills"
    );
    for name in ["acme", "globex"] {
        let spill_dir = c.path().join(format!("state-{name}/spill"));
        let left: Vec<_> = std::fs::read_dir(&spill_dir).unwrap().collect();
        assert!(left.is_empty(), "{name}'s spill files were left: {left:?}");
    }
}

/// The same on a Ballista cluster with a sealing key: both passes run on the executors, and
/// each node keeps what they return in its spill files, byte for byte as in process. acme, the
/// key holder, keeps them in a directory it shares with the executors, which find the matched
/// rows there.
#[test]
fn memory_limited_nodes_on_a_cluster_spill_and_sum_right() {
    let (mut c, truth) = Consortium::with_coordinator("acme,globex", 400, 0.375, 5);
    let cluster = Ballista::start(c.path(), 2, 600);
    let limit = "memory_limit = \"256MiB\"\n";
    let shared = c.path().join("shared");
    let tops = [
        ("acme", cluster.engine_line_shared(&shared)),
        ("globex", cluster.engine_line(true)),
    ];
    for (name, engine) in tops {
        c.node_top.insert(name.into(), format!("{engine}{limit}"));
    }
    c.ballista = Some(cluster);
    start_pair(&mut c, "", "");
    let (job, code) = submit_json(&c);
    assert_eq!(code, Some(0), "{job}");
    assert_groups_exact(&job, &expected(&c, &truth));
    for name in ["acme", "globex"] {
        let log = c.node_log(name);
        assert_eq!(log.matches("on_executors=true").count(), 1, "{name}: {log}");
    }
    // The value holder's 400 rows were encrypted on the executors, in one piece.
    assert_eq!(
        encrypted_on_the_cluster(&c.node_log("globex")),
        [(1, 400)],
        "{}",
        c.node_log("globex")
    );
    assert_eq!(c.node("acme").spilled_bytes(), [400 * (2 * 32 + 36 + 32)]);
    assert_eq!(
        c.node("globex").spilled_bytes(),
        [400 * 44 + 400 * 112 + 400 * 2 * 32]
    );
    // acme's final comparison ran on its executors; globex has nothing to compare.
    let compared = "compared the points on the cluster";
    assert_eq!(c.node_log("acme").matches(compared).count(), 1);
    assert!(!c.node_log("globex").contains(compared));
    let left: Vec<_> = std::fs::read_dir(&shared).unwrap().collect();
    assert!(left.is_empty(), "acme left {left:?}");
}

/// `(pieces, rows)` of each job's rows a value holder encrypted on its cluster, from its `log`.
fn encrypted_on_the_cluster(log: &str) -> Vec<(u64, u64)> {
    let figure = |line: &str, name: &str| -> Option<u64> {
        line.split(&format!(" {name}="))
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    log.lines()
        .filter(|l| l.contains("encrypted our rows on the cluster"))
        .filter_map(|l| Some((figure(l, "pieces")?, figure(l, "rows")?)))
        .collect()
}

#[test]
fn noised_sums_stay_within_the_bound_and_are_charged() {
    // ε must be capped by a budget (a node refuses an uncapped ε when it reads its config).
    let (c, truth) = consortium(
        "epsilon = 1.0\nmin_result = 5\n[budget]\nepsilon_per_period = 100.0\n",
        "epsilon = 2.0\n[budget]\nepsilon_per_period = 100.0\n",
    );
    let (job, code) = submit_json(&c);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(code, Some(0));
    let result = &job["result"];
    // The stricter ε (1.0) and threshold (5) apply; ε is split over the two columns.
    assert_eq!(result["epsilon"], 1.0, "{job}");
    assert_eq!(result["min_result"], 5, "{job}");
    // Both nodes draw noise for each column (issue 12, item 7: the value holder's own draw
    // protects its totals from a key holder that colludes with the coordinator).
    let noise = result["noise"].as_array().unwrap();
    assert_eq!(noise.len(), 4, "{job}");
    for (n, (column, by, scale)) in noise.iter().zip([
        ("count", "acme", "2".to_owned()),
        ("count", "globex", "2".to_owned()),
        ("amount_cents", "acme", (2 * CLIP).to_string()),
        ("amount_cents", "globex", (2 * CLIP).to_string()),
    ]) {
        assert_eq!(
            (
                n["column"].as_str(),
                n["drawn_by"].as_str(),
                n["scale"].as_str()
            ),
            (Some(column), Some(by), Some(scale.as_str())),
            "{job}"
        );
    }
    let sd = |i: usize| {
        let column = ["count", "amount_cents"][i];
        result["column_sd"][column].as_f64().unwrap()
    };
    let want = expected(&c, &truth);
    for g in groups(&job) {
        let label = g["group"].as_str().unwrap();
        let (count, sum) = want[label];
        if g["suppressed"] == true {
            assert!(
                (count as f64) < 5.0 + 15.0 * sd(0),
                "{label} suppressed: {g}"
            );
            continue;
        }
        let got_count = g["values"]["count"].as_i64().unwrap();
        let got_sum = g["values"]["amount_cents"].as_i64().unwrap();
        assert!(
            ((got_count - count) as f64).abs() <= 15.0 * sd(0),
            "{label}: {got_count} vs {count}"
        );
        assert!(
            ((got_sum - sum) as f64).abs() <= 15.0 * sd(1),
            "{label}: {got_sum} vs {sum}"
        );
        // Noise of scale 600 000 is zero with probability ≈ 1e-6: the value holder saw noise.
        assert_ne!(got_sum, sum, "{label}: an exact sum was decrypted");
    }
    // Both nodes charged their ledgers the release's ε.
    for name in ["acme", "globex"] {
        let lines = c.budget_json(name);
        let line = lines
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["purpose"] == "fraud-detection")
            .unwrap_or_else(|| panic!("{name}: {lines}"));
        assert_eq!(line["spent"], 1.0, "{name}: {lines}");
        assert_eq!(line["charges"], 1, "{name}: {lines}");
    }
}

/// Issue 18, item 2: globex's customers get refunds (negative rows) and extra charges; each
/// customer's rows are summed first and the total clipped to [0, CLIP]. The truth is computed
/// here from the file as written; clipping each row before summing would give larger sums.
#[test]
fn refunds_are_summed_per_customer_before_clipping() {
    let (c, truth) = consortium("", "");
    let shared = truth["shared_by_all"].as_u64().unwrap();
    let path = c.path().join("data/globex.csv");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut extra = String::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let (index, amount): (u64, i64) = (customer_index(f[1]), f[3].parse().unwrap());
        let mut row = f.clone();
        let change = match index % 4 {
            0 => -amount / 2,       // a partial refund
            1 => -(amount + 1_000), // refunded in full and more: a net −1 000
            2 => CLIP as i64,       // a second charge that the clipping bound cuts
            _ => continue,
        };
        let change = change.to_string();
        row[3] = &change;
        extra.push_str(&row.join(","));
        extra.push('\n');
    }
    std::fs::write(&path, format!("{text}{extra}")).unwrap();

    // The truth: per customer the signed total of its rows, clipped, in its group (each
    // customer's rows here carry one label).
    let mut totals: BTreeMap<u64, (String, i64)> = BTreeMap::new();
    let written = std::fs::read_to_string(&path).unwrap();
    for line in written.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let e = totals
            .entry(customer_index(f[1]))
            .or_insert_with(|| (f[4].to_owned(), 0));
        e.1 += f[3].parse::<i64>().unwrap();
    }
    let mut want: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut row_clipped: BTreeMap<String, i64> = BTreeMap::new();
    for (index, (category, total)) in &totals {
        if *index >= shared {
            continue;
        }
        let label = if CATEGORIES[..3].contains(&category.as_str()) {
            category.clone()
        } else {
            "(other)".to_owned()
        };
        let e = want.entry(label.clone()).or_default();
        e.0 += 1;
        e.1 += (*total).clamp(0, CLIP as i64);
        // What clipping each row first gives, for the contrast below.
        let per_row: i64 = written
            .lines()
            .skip(1)
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| customer_index(f[1]) == *index)
            .map(|f| f[3].parse::<i64>().unwrap().clamp(0, CLIP as i64))
            .sum::<i64>()
            .min(CLIP as i64);
        *row_clipped.entry(label).or_default() += per_row;
    }
    assert_ne!(
        want.values().map(|v| v.1).collect::<Vec<_>>(),
        row_clipped.values().copied().collect::<Vec<_>>(),
        "the refunds must matter"
    );

    let (job, code) = submit_json(&c);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(code, Some(0));
    assert_groups_exact(&job, &want);
}

#[test]
fn a_policy_can_refuse_to_be_the_key_holder() {
    let (c, _) = consortium("roles = [\"value-holder\"]\n", "");
    let (job, code) = submit_json(&c);
    assert_eq!(job["state"], "vetoed", "{job}");
    assert_ne!(code, Some(0));
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains("does not let this node be the key-holder")
            && reason.contains("roles: value-holder"),
        "{reason}"
    );
}

/// The shared-flag recipe of docs/OVERLAP_SUM.md, end to end. Each side has a `flagged`
/// dataset (accounts its fraud team flagged). A `match` on the flagged accounts tells acme —
/// and only acme, as both policies say — which of its flagged accounts globex flagged too; an
/// `overlap-sum` with acme's flagged accounts as keys and globex's customer amounts as values
/// gives the amounts globex holds on the accounts acme flagged, per category.
#[test]
fn shared_flag_recipe_match_then_overlap_sum() {
    let mut c = Consortium::new();
    let truth = c.synth("acme,globex", 300, 0.5, 9);
    // Flag every third acme customer and every second globex customer.
    for (name, every) in [("acme", 3), ("globex", 2)] {
        let text = std::fs::read_to_string(c.path().join(format!("data/{name}.csv"))).unwrap();
        let mut lines = text.lines();
        let mut out = format!("{}\n", lines.next().unwrap());
        for line in lines.step_by(every) {
            out.push_str(line);
            out.push('\n');
        }
        std::fs::write(c.path().join(format!("data/{name}-flagged.csv")), out).unwrap();
    }
    c.start_coordinator();
    let flagged = |name: &str| {
        format!(
            "[[dataset.value]]\ncolumn = \"amount_cents\"\nmin = 0\nmax = 10000000\n\n\
             [[dataset]]\nname = \"flagged\"\npath = \"data/{name}-flagged.csv\"\n\n\
             [[dataset.identifier]]\nname = \"email\"\ncolumn = \"email\"\nnormaliser = \"email\"\n\n"
        )
    };
    let acme = format!(
        "{}[[agreement]]\npartner = \"globex\"\npurposes = [\"fraud-detection\"]\n\n\
         [[agreement.allow]]\ncomputation = \"match\"\ndataset = \"flagged\"\nkeys = [\"email\"]\nmembership = \"self\"\n\n\
         [[agreement.allow]]\ncomputation = \"overlap-sum\"\ndataset = \"flagged\"\nkeys = [\"email\"]\nroles = [\"key-holder\"]\n",
        flagged("acme")
    );
    let globex = format!(
        "{}[[agreement]]\npartner = \"acme\"\npurposes = [\"fraud-detection\"]\n\n\
         [[agreement.allow]]\ncomputation = \"match\"\ndataset = \"flagged\"\nkeys = [\"email\"]\nmembership = \"partner\"\n\n\
         [[agreement.allow]]\ncomputation = \"overlap-sum\"\ndataset = \"customers\"\nkeys = [\"email\"]\nroles = [\"value-holder\"]\n\
         group_by = [\"category\"]\nvalue_columns = [{{ column = \"amount_cents\", min = 0, max = 500000 }}]\n",
        flagged("globex")
    );
    for (name, cfg) in [("acme", acme), ("globex", globex)] {
        c.issue_node(name);
        c.write_node_config(name, name, &cfg);
        c.start_node(name);
    }
    c.wait_connected(&["acme", "globex"]);

    // Which rows are shared: the customer index ends the email's local part.
    let shared = truth["shared_by_all"].as_u64().unwrap();
    let rows = |file: &str| customer_rows(&c, file);
    let acme_flagged: std::collections::BTreeSet<u64> = rows("data/acme-flagged.csv")
        .into_iter()
        .map(|r| r.0)
        .filter(|&i| i < shared)
        .collect();
    let globex_flagged: std::collections::BTreeSet<u64> = rows("data/globex-flagged.csv")
        .into_iter()
        .map(|r| r.0)
        .collect();
    let both = acme_flagged.intersection(&globex_flagged).count() as u64;

    // A match of the flagged accounts by email, in which `learners` learn membership.
    let match_flagged = |learners: &[&str]| {
        let mut words = vec![
            "match",
            "--between",
            "acme,globex",
            "--dataset",
            "flagged",
            "--on",
            "email",
            "--purpose",
            "fraud-detection",
        ];
        for who in learners {
            words.extend(["--reveal-to", who]);
        }
        c.submit(&words)
    };

    // 1. match: acme learns which of its flagged accounts globex flagged; globex learns none.
    let (job, code) = match_flagged(&["acme"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(code, Some(0));
    for r in job["results"].as_array().unwrap() {
        let learned = r["learned_membership"] == true;
        assert_eq!(learned, r["node"] == "acme", "{r}");
        if learned {
            assert_eq!(r["matched_rows"], both, "{r}");
        }
    }
    // globex's policy does not let globex learn membership: asking for it is vetoed.
    let (job, _) = match_flagged(&[]);
    assert_eq!(job["state"], "vetoed", "{job}");

    // 2. overlap-sum: globex's amounts on the accounts acme flagged, per category.
    let (job, code) = c.submit(&[
        "overlap-sum",
        "--between",
        "acme,globex",
        "--dataset",
        "acme:flagged",
        "--dataset",
        "globex:customers",
        "--on",
        "email",
        "--sum",
        "amount_cents,count",
        "--group-by",
        "category",
        "--groups",
        &CATEGORIES.join(","),
        "--purpose",
        "fraud-detection",
    ]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(code, Some(0));
    let mut want: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for (index, category, amount) in rows("data/globex.csv") {
        if acme_flagged.contains(&index) {
            let e = want.entry(category).or_default();
            e.0 += 1;
            e.1 += amount.min(500_000) as i64;
        }
    }
    assert_groups_exact(&job, &want);
    assert_eq!(
        job["result"]["intersection"],
        acme_flagged.len() as i64,
        "{job}"
    );
    // The roles are one-way: globex may not be the key holder.
    let (job, _) = c.submit(&[
        "overlap-sum",
        "--between",
        "globex,acme",
        "--dataset",
        "globex:customers",
        "--dataset",
        "acme:flagged",
        "--on",
        "email",
        "--sum",
        "count",
        "--purpose",
        "fraud-detection",
    ]);
    assert_eq!(job["state"], "vetoed", "{job}");
}

/// What the fake key holder sends after a correct start.
#[derive(Debug, Clone, Copy)]
enum BadKeyHolder {
    /// A hello without overlap-sum terms.
    NoTerms,
    /// A result that is not below n².
    UndecodableResult,
    /// A result that shares a factor with n (zero).
    NotAUnitResult,
    /// A valid encryption of a plaintext no sum of the layout can be.
    OutOfRangeResult,
    /// A result one byte short.
    ShortResult,
}

/// Plays node "mallory" as the key holder of the next overlap-sum: a correct run up to the
/// result, then `bad`.
async fn mallory(dir: std::path::PathBuf, coordinator: std::net::SocketAddr, bad: BadKeyHolder) {
    use cleanroom_circuits::{ItemSet, JobKey, blind_items};
    use cleanroom_e2e::fake_node::join_next_job_with_hello;
    use cleanroom_proto::v1::{BatchEnd, Phase, PointBatch, PsiHello, SumTerms, envelope::Body};
    use cleanroom_transport::FramedRecv;

    let mut items = ItemSet::new();
    for i in 0..20u32 {
        items
            .push(format!("mallory-{i}@example.com").as_bytes())
            .unwrap();
    }
    let terms = match bad {
        BadKeyHolder::NoTerms => None,
        _ => Some(SumTerms {
            min_result: 1,
            release_to_coordinator: true,
            ..SumTerms::default()
        }),
    };
    let mut job = join_next_job_with_hello(&dir, coordinator, "mallory", "globex", |id, spec| {
        PsiHello {
            sender: "mallory".into(),
            set_size: 20,
            spec_digest: cleanroom_node::job::spec_digest(id, spec).to_vec(),
            sum: terms,
            ..PsiHello::default()
        }
    })
    .await;
    if let BadKeyHolder::NoTerms = bad {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(30), job.conn.closed()).await;
        return;
    }
    // globex's hello gives its slot layout and its Paillier modulus n.
    let stream = job.conn.accept_uni().await.unwrap();
    let mut recv = FramedRecv::new(stream);
    let hello = recv.recv().await.unwrap().unwrap();
    let Some(Body::PsiHello(hello)) = hello.body else {
        panic!("expected globex's hello")
    };
    let terms = hello.sum.unwrap();
    let layout = cleanroom_circuits::ahe::SlotLayout::new(&terms.widths).unwrap();
    let len = layout.ciphertext_len();
    let n = crypto_bigint::U2048::from_be_slice(&terms.public_key);
    let points = blind_items(&JobKey::generate(), "email", &items).concat();
    job.send(
        Phase::PsiBlinded,
        Body::Points(PointBatch { seq: 0, points }),
    )
    .await;
    job.send(Phase::PsiBlinded, Body::BatchEnd(BatchEnd { total: 20 }))
        .await;
    // Read globex's points, our points returned and its rows, up to its end of rows.
    loop {
        let env = recv.recv().await.unwrap().unwrap();
        if env.phase == Phase::SumRows as i32 && matches!(env.body, Some(Body::BatchEnd(_))) {
            break;
        }
    }
    let result = match bad {
        BadKeyHolder::UndecodableResult => vec![0xff; len],
        BadKeyHolder::NotAUnitResult => vec![0; len],
        // (1 + m·n) mod n² with m = 2^2040: an encryption of a plaintext far above the slots.
        BadKeyHolder::OutOfRangeResult => {
            let m = crypto_bigint::U2048::ONE.shl_vartime(2040);
            let c: crypto_bigint::U4096 = m.concatenating_mul(&n);
            let one = c.wrapping_add(&crypto_bigint::U4096::ONE).to_be_bytes();
            one.as_ref().repeat(len / one.as_ref().len())
        }
        BadKeyHolder::ShortResult => vec![0; len - 1],
        BadKeyHolder::NoTerms => unreachable!(),
    };
    job.send(
        Phase::SumResult,
        Body::Points(PointBatch {
            seq: 0,
            points: result,
        }),
    )
    .await;
    job.send(Phase::PsiDone, Body::BatchEnd(BatchEnd { total: 0 }))
        .await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), job.conn.closed()).await;
}

/// A key holder that sends no terms, or a result that does not decode, does not decrypt to a
/// sum, or has the wrong length: the value holder ends each job with a named error, audits it,
/// releases nothing, and serves the next.
#[test]
fn a_bad_result_ciphertext_ends_the_job_with_a_named_error() {
    let (mut c, _) = Consortium::with_coordinator("acme,globex", 200, 0.5, 3);
    let coordinator = c.addr.unwrap();
    c.start_node_for_fake_peer("globex", "mallory", &agreements("mallory", ""));
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (bad, expect) in [
        (BadKeyHolder::NoTerms, "carries no overlap-sum terms"),
        (BadKeyHolder::UndecodableResult, "not below n²"),
        (BadKeyHolder::NotAUnitResult, "shares a factor with n"),
        (BadKeyHolder::OutOfRangeResult, "bits above its last slot"),
        (BadKeyHolder::ShortResult, "encoding of"),
    ] {
        let evil = rt.spawn(mallory(c.path().to_owned(), coordinator, bad));
        c.wait_connected(&["mallory"]);
        let (job, _) = c.submit(&overlap_sum_between("mallory,globex"));
        assert_eq!(job["state"], "failed", "{bad:?}: {job}");
        let reason = job["reason"].as_str().unwrap();
        assert!(
            reason.contains("mallory") && reason.contains(expect),
            "{bad:?}: {reason}"
        );
        assert!(job["result"].is_null(), "{bad:?}: nothing released: {job}");
        let id = job["job_id"].as_str().unwrap();
        let audited = c.audited_error("globex", id).unwrap_or_default();
        assert!(audited.contains(expect), "{bad:?}: audited {audited:?}");
        rt.block_on(evil).unwrap();
    }
    // Still serving: the node is up and registered.
    c.wait_connected(&["globex"]);
}
