//! End to end: datasets in other formats than CSV, read by real nodes through DataFusion. The
//! demo over Parquet files; a real overlap and match between a node whose dataset is a Parquet
//! file and one whose dataset is a SQL view, against a truth counted here from the CSV files
//! `synth` writes with the same seed; the same on a Ballista cluster; a view the agreement does
//! not cover, refused by `check`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use cleanroom_e2e::ballista::Ballista;
use cleanroom_e2e::{Consortium, bins, cleanroom_node, open_agreement};

/// Runs `cleanroom demo ARGS --keep DIR/demo` and checks it exits 0 with no figure wrong (it
/// checks each against the truth); returns its standard output.
fn demo_ok(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(&bins().0)
        .arg("demo")
        .args(args)
        .arg("--keep")
        .arg(dir.join("demo"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok"), "{stdout}");
    assert!(!stdout.contains("WRONG"), "{stdout}");
    stdout
}

/// `cleanroom demo --format parquet` runs every job over Parquet files and checks each figure
/// against the truth (it exits non-zero on any mismatch).
#[test]
fn the_demo_runs_over_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = demo_ok(dir.path(), &["--rows", "400", "--format", "parquet"]);
    assert!(stdout.contains("in parquet files"), "{stdout}");
    let data = dir.path().join("demo/data");
    assert!(data.join("acme.parquet").exists());
    assert!(
        !data.join("acme.csv").exists(),
        "the nodes must read Parquet, not CSV"
    );
}

/// `cleanroom demo --engine ballista`: both nodes read on a local Ballista cluster (a scheduler
/// and two executors the demo starts and stops); every figure equals the truth, and each
/// executor ran a share of the reads. Each node keeps its buckets in a directory of its own
/// that the executors read, and its final comparisons ran there; nothing is left in it.
#[test]
fn the_demo_runs_on_a_ballista_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = demo_ok(dir.path(), &["--rows", "2000", "--engine", "ballista"]);
    for i in [1, 2] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("Ballista executor {i}:")))
            .unwrap_or_else(|| panic!("no share for executor {i}: {stdout}"));
        assert!(!line.contains(": 0 tasks"), "{line}");
    }
    let demo = dir.path().join("demo");
    let shared: Vec<_> = std::fs::read_dir(demo.join("shared"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(shared.len() >= 2, "{shared:?}");
    for node_dir in shared {
        let node = node_dir.file_name().unwrap().to_string_lossy().into_owned();
        let log = std::fs::read_to_string(demo.join(format!("logs/{node}.log"))).unwrap();
        assert!(
            log.contains("compared the points on the cluster"),
            "{node} compared on its node"
        );
        let left: Vec<_> = std::fs::read_dir(&node_dir).unwrap().collect();
        assert!(left.is_empty(), "{node} left {left:?}");
    }
}

/// `(row number from 1, email trimmed and lower-cased, category)` of a `synth` CSV.
pub(crate) fn rows_of(csv: &Path) -> Vec<(u64, String, String)> {
    let mut reader = csv::Reader::from_path(csv).unwrap();
    let headers = reader.headers().unwrap().clone();
    let at = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let (email, category) = (at("email"), at("category"));
    reader
        .records()
        .enumerate()
        .map(|(i, r)| {
            let r = r.unwrap();
            (
                i as u64 + 1,
                r[email].trim().to_lowercase(),
                r[category].to_owned(),
            )
        })
        .collect()
}

const VIEW: &str = "SELECT email FROM crm WHERE category <> 'travel'";

fn globex_view(select: &str) -> String {
    format!(
        "[[dataset]]\nname = \"customers\"\nsql = \"{select}\"\n\
         [[dataset.table]]\nname = \"crm\"\npath = \"data/globex.csv\"\n\n\
         [[dataset.identifier]]\nname = \"email\"\ncolumn = \"email\"\nnormaliser = \"email\"\n\n{}",
        open_agreement("acme")
    )
}

#[test]
fn parquet_meets_a_sql_view_in_a_real_overlap_and_match() {
    parquet_meets_a_view(600, None);
}

/// The same jobs with both nodes' reads on a Ballista cluster (a scheduler and two executors,
/// real processes): the same count and the same matched rows as the truth, which the node's
/// own engine gives above. Every executor ran a share of the reads (its own counters), and no
/// identifier reached the cluster's logs. acme shares a directory with its executors: its
/// final comparisons ran there, and left no bucket file behind.
#[test]
fn a_ballista_cluster_reads_the_same_rows_and_every_executor_takes_a_share() {
    let c = parquet_meets_a_view(3000, Some(2));
    let cluster = c.ballista.as_ref().unwrap();
    let shares = cluster.shares();
    assert_eq!(shares.len(), 2);
    for (i, (tasks, rows)) in shares.iter().enumerate() {
        assert!(
            *tasks > 0 && *rows > 0,
            "executor {} ran nothing: {shares:?}",
            i + 1
        );
    }
    // Each read job reads one dataset whole: acme's 3000 rows, globex's 3000 (the view's filter
    // runs on the executors, so fewer come out); overlap and match read each at least once.
    let total: u64 = shares.iter().map(|(_, rows)| rows).sum();
    assert!(total >= 2 * 3000, "{shares:?}");
    let emails: Vec<String> = rows_of(&c.path().join("data/acme.csv"))
        .into_iter()
        .take(200)
        .map(|(_, email, _)| email)
        .collect();
    for process in cluster.executors.iter().chain([&cluster.scheduler]) {
        let log = process.log_text().to_lowercase();
        if let Some(e) = emails.iter().find(|e| log.contains(e.as_str())) {
            panic!("{} logged the identifier {e}", process.name);
        }
    }
    // acme's buckets were in the shared directory for the jobs only.
    let shared: Vec<_> = std::fs::read_dir(c.path().join("shared"))
        .unwrap()
        .collect();
    assert!(shared.is_empty(), "acme left {shared:?}");
    // The executors' outputs are rows of the datasets: gone once they stop.
    let mut c = c;
    drop(c.ballista.take());
    for i in [1, 2] {
        let work = c.path().join(format!("executor-{i}"));
        let left: Vec<_> = std::fs::read_dir(&work).unwrap().collect();
        assert!(left.is_empty(), "executor {i} left {left:?}");
    }
}

/// acme's customers as Parquet, globex's a view over its CSV (`rows` each, from one seed);
/// overlap and match between them against the truth counted from the CSVs. With `executors`,
/// both nodes read on a Ballista cluster of that many executors.
fn parquet_meets_a_view(rows: u64, executors: Option<usize>) -> Consortium {
    let (mut c, _) = Consortium::with_coordinator("acme,globex", rows, 0.5, 31);
    // The same customers again, as Parquet: acme's node reads those.
    c.synth_as("data-pq", "parquet", "acme,globex", (rows, 0.5, 31));
    let rows = rows.to_string();
    let acme = rows_of(&c.path().join("data/acme.csv"));
    let globex = rows_of(&c.path().join("data/globex.csv"));
    let globex_kept: BTreeSet<&str> = globex
        .iter()
        .filter(|(_, _, category)| category != "travel")
        .map(|(_, email, _)| email.as_str())
        .collect();
    assert!(
        globex_kept.len() < globex.len(),
        "the view must filter something"
    );
    let acme_emails: BTreeSet<&str> = acme.iter().map(|(_, e, _)| e.as_str()).collect();
    let truth = acme_emails.intersection(&globex_kept).count() as u64;
    let acme_rows: Vec<u64> = acme
        .iter()
        .filter(|(_, e, _)| globex_kept.contains(e.as_str()))
        .map(|(row, _, _)| *row)
        .collect();

    if let Some(executors) = executors {
        let cluster = Ballista::start(c.path(), executors, 600);
        // acme's overlap blinding runs on the executors too (it names their sealing key), and
        // its final comparison (it shares a directory with them); globex's reads only.
        let shared = c.path().join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        c.node_top
            .insert("acme".into(), cluster.engine_line_shared(&shared));
        c.node_top
            .insert("globex".into(), cluster.engine_line(false));
        c.ballista = Some(cluster);
    }
    c.admit_node("acme");
    c.admit_node("globex");
    c.write_node_toml(
        "acme",
        &format!(
            "[[dataset]]\nname = \"customers\"\npath = \"data-pq/acme.parquet\"\n\n\
             [[dataset.identifier]]\nname = \"email\"\ncolumn = \"email\"\nnormaliser = \"email\"\n\n{}",
            open_agreement("globex")
        ),
    );
    c.write_node_toml("globex", &globex_view(VIEW));
    c.start_node("acme");
    c.start_node("globex");
    c.wait_connected(&["acme", "globex"]);

    let job = c.overlap_counts(truth);
    let access = c.audited_access("acme", job["job_id"].as_str().unwrap());
    assert_eq!(access["rows_read"].to_string(), rows, "{access}");
    assert_eq!(access["rows_rejected"], 0, "{access}");
    if executors.is_some() {
        let log = |name: &str| {
            c.nodes
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.log_text())
                .unwrap()
        };
        assert!(
            log("acme").contains("on_executors=true"),
            "acme blinded on the executors"
        );
        assert!(
            log("globex").contains("on_executors=false"),
            "globex blinded itself"
        );
    }

    let (job, code) = c.submit(&cleanroom_e2e::psi_job(
        "match",
        "acme,globex",
        "email",
        "fraud-detection",
    ));
    assert_eq!(code, Some(0), "{job}");
    let job_id = job["job_id"].as_str().unwrap();
    let membership = |node: &str| c.membership_rows(node, job_id);
    assert_eq!(
        membership("acme"),
        acme_rows,
        "acme's matched Parquet rows are the CSV's rows"
    );
    // globex's rows are numbered in the order its view produces them: the CSV's order with the
    // travel rows left out. On a cluster the view (a filter over one table) is read in parts,
    // taken in part order.
    let globex_rows: Vec<u64> = globex
        .iter()
        .filter(|(_, _, category)| category != "travel")
        .enumerate()
        .filter(|(_, (_, email, _))| acme_emails.contains(email.as_str()))
        .map(|(i, _)| i as u64 + 1)
        .collect();
    assert_eq!(
        membership("globex"),
        globex_rows,
        "globex's matched rows of its view"
    );
    if executors.is_some() {
        // The match's keys were blinded on acme's executors too, and its membership found
        // there (a second pass with the same key): the rows above are theirs.
        let acme = c.node_log("acme");
        assert_eq!(
            acme.matches("on_executors=true").count(),
            2,
            "acme blinded the overlap's and the match's keys on the executors"
        );
        // And it re-blinded globex's points there, all of them (globex's distinct keys), in
        // both jobs; globex, without a sealing key, on its node.
        assert_eq!(
            reblinded_on_the_cluster(&acme),
            [globex_kept.len() as u64; 2],
            "{acme}"
        );
        assert!(reblinded_on_the_cluster(&c.node_log("globex")).is_empty());
        // Both jobs' final comparisons ran on acme's executors (its buckets are in the shared
        // directory); globex, without one, compared on its node.
        let compared = "compared the points on the cluster";
        assert_eq!(acme.matches(compared).count(), 2, "{acme}");
        assert!(!c.node_log("globex").contains(compared));
        // globex's view filters a CSV over the split size: its membership pass read in parts.
        // (acme's Parquet file, under 64 KiB, is one part.)
        let parts = ordered_reads(&c, "globex");
        assert!(
            parts.iter().any(|&p| p > 1),
            "globex's membership pass read in parts: {parts:?}"
        );
        // A view that may move rows between parts (here DISTINCT) is read in one part when its
        // rows are numbered: a dry run's normalised rows.
        let config = c.write_node_toml("globex", &globex_view("SELECT DISTINCT email FROM crm"));
        let preview = preview_customers(&c, &config, &["--show-normalised", "2"]);
        let log = String::from_utf8_lossy(&preview.stderr);
        assert!(preview.status.success(), "{log}");
        assert_eq!(parts_in(&log), [1], "{log}");
    }
    c
}

#[test]
fn check_refuses_a_view_that_reads_what_no_agreement_permits() {
    let mut c = Consortium::new();
    c.synth("acme,globex", 50, 0.5, 5);
    c.start_coordinator();
    c.admit_node("globex");
    let config = c.write_node_toml("globex", &globex_view(VIEW));
    let ok = cleanroom_node(c.path(), &["check", "--config", config.to_str().unwrap()]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for (select, says) in [
        ("SELECT email, phone FROM crm", "outputs column 'phone'"),
        ("SELECT phone AS email FROM crm", "reads column 'phone'"),
    ] {
        let config = c.write_node_toml("globex", &globex_view(select));
        let out = cleanroom_node(c.path(), &["check", "--config", config.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{select}: accepted");
        assert!(err.contains(says), "{select}: {err}");
    }
}

/// The same overlap with acme's pass in its node and on its executors (sealed): the same
/// figures, and each equal to the truth counted here. acme's JSON lines exercise every outcome
/// the pass gives: rows without consent, a forgotten subject, emails that do not normalise,
/// null emails, a line break in an email, a number for an email, cut-off lines, blank lines
/// and duplicates. Its email and consent sit in nested objects (`customer.email`,
/// `flags.consent_marketing`), some customers null. On the cluster the lines are handed over
/// whole and read by the executors' pass, one line a record, as the node reads them.
#[test]
fn the_executors_pass_counts_what_the_node_counts() {
    let in_process = messy_overlap(None);
    let on_executors = messy_overlap(Some(2));
    assert_eq!(in_process, on_executors);
}

/// The overlap-sum terms both nodes of [`a_cluster_reads_malformed_csv_strictly`] add to their
/// agreement (each then names its role).
const SUM_TERMS: &str = "[[agreement.allow]]\ncomputation = \"overlap-sum\"\n\
                         dataset = \"customers\"\nkeys = [\"email\"]\n";

/// CSV on a cluster is read line by line and split strictly: on the executors for acme's
/// sealed pass, on the node for its dry run. Rows with the wrong field count, a quote left open
/// or a quote in the email are rejected, a quote in a column the job does not read is text, and
/// every figure equals the truth counted here (DataFusion's own reader would fail the read).
/// Then an overlap-sum, grouped and clipped, with both parties' passes on the executors.
#[test]
fn a_cluster_reads_malformed_csv_strictly() {
    // 3000 rows: acme's file (over 64 KiB) is split into byte ranges, which the cluster returns in
    // the order they finish.
    let (mut c, _) = Consortium::with_coordinator("acme,globex", 3000, 0.5, 43);
    let acme = rows_of(&c.path().join("data/acme.csv"));
    let globex: BTreeSet<String> = rows_of(&c.path().join("data/globex.csv"))
        .into_iter()
        .map(|(_, email, _)| email)
        .collect();
    let mut csv = String::from("email;note;consent_marketing\n");
    let (mut kept, mut rejected, mut no_consent) = (BTreeSet::new(), 0u64, 0u64);
    for (row, email, _) in &acme {
        let line = match row {
            r if r % 17 == 0 => format!("{email};n;yes;extra"),
            r if r % 13 == 0 => format!("{email};\"open;yes"),
            r if r % 11 == 0 => format!("\"{email}\"\"\";n;yes"),
            r if r % 7 == 0 => format!("{email};n;no"),
            r if r % 5 == 0 => format!("{email};5\" screen;yes"),
            r if r % 3 == 0 => format!("\"{}\";\"a; b\";yes", email.to_uppercase()),
            _ => format!(" {email} ;n;yes"),
        };
        match row {
            r if [17, 13, 11].iter().any(|d| r % d == 0) => rejected += 1,
            r if r % 7 == 0 => no_consent += 1,
            _ => {
                kept.insert(email.clone());
            }
        }
        csv += &line;
        csv.push('\n');
    }
    let truth = kept.intersection(&globex).count() as u64;
    std::fs::create_dir_all(c.path().join("data-m")).unwrap();
    std::fs::write(c.path().join("data-m/acme.csv"), csv).unwrap();

    let cluster = Ballista::start(c.path(), 2, 600);
    c.node_top.insert("acme".into(), cluster.engine_line(true));
    c.node_top
        .insert("globex".into(), cluster.engine_line(true));
    c.ballista = Some(cluster);
    c.admit_node("acme");
    c.admit_node("globex");
    let config = c.write_node_toml(
        "acme",
        &format!(
            "[[dataset]]\nname = \"customers\"\npath = \"data-m/acme.csv\"\ndelimiter = \";\"\n\
             consent = {{ \"overlap-reporting\" = \"consent_marketing\", \
             \"fraud-detection\" = \"consent_marketing\" }}\n\n\
             [[dataset.identifier]]\nname = \"email\"\ncolumn = \"email\"\nnormaliser = \"email\"\n\n\
             {}{SUM_TERMS}roles = [\"key-holder\"]\n",
            open_agreement("globex")
        ),
    );
    let preview = preview_customers(&c, &config, &["--purpose", "overlap-reporting"]);
    let text = String::from_utf8_lossy(&preview.stdout);
    assert!(
        preview.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&preview.stderr)
    );
    let figures = [
        acme.len() as u64,
        rejected,
        no_consent,
        0,
        kept.len() as u64,
    ];
    cleanroom_e2e::assert_preview(
        &text,
        "email",
        figures,
        &["field count", "quote in a field"],
    );
    // Read in parallel, the rejected rows have no place; it says how to get one.
    assert!(text.contains("no line numbers"), "{text}");
    assert!(
        !text.contains("  line ") && !text.contains("  row "),
        "{text}"
    );

    c.write_node_toml(
        "globex",
        &format!(
            "[[dataset]]\nname = \"customers\"\npath = \"data/globex.csv\"\n\n\
             [[dataset.identifier]]\nname = \"email\"\ncolumn = \"email\"\nnormaliser = \"email\"\n\n\
             [[dataset.value]]\ncolumn = \"amount_cents\"\nmin = 0\nmax = 10000000\n\n\
             {}{SUM_TERMS}roles = [\"value-holder\"]\ngroup_by = [\"category\"]\n\
             value_columns = [{{ column = \"amount_cents\", min = 0, max = 300000 }}]\n",
            open_agreement("acme")
        ),
    );
    c.start_node("acme");
    c.start_node("globex");
    c.wait_connected(&["acme", "globex"]);
    let job = c.overlap_counts(truth);
    let access = c.audited_access("acme", job["job_id"].as_str().unwrap());
    let figure = |k: &str| {
        access[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k}: {access}"))
    };
    assert_eq!(
        [
            figure("rows_read"),
            figure("rows_rejected"),
            figure("rows_excluded_consent"),
        ],
        [acme.len() as u64, rejected, no_consent],
        "{access}"
    );
    let log = c.node_log("acme");
    assert!(
        log.contains("on_executors=true"),
        "acme's pass ran on the executors"
    );

    // A match: acme's membership rows are its file's rows (read in file order for them).
    let (job, code) = c.submit(&cleanroom_e2e::psi_job(
        "match",
        "acme,globex",
        "email",
        "fraud-detection",
    ));
    assert_eq!(code, Some(0), "{job}");
    let membership = c.membership_rows("acme", job["job_id"].as_str().unwrap());
    let want_rows: Vec<u64> = acme
        .iter()
        .filter(|(row, email, _)| {
            [17, 13, 11, 7].iter().all(|d| row % d != 0) && globex.contains(email)
        })
        .map(|(row, _, _)| *row)
        .collect();
    assert_eq!(membership, want_rows);

    // An overlap-sum, both passes on the executors: acme's keys as the key holder; globex's
    // keys, amounts and categories as the value holder. Each customer's amounts are summed,
    // clipped to CLIP, and counted in the first listed group its rows carry ("(other)" last).
    const CLIP: u64 = 300_000;
    let listed = ["electronics", "fashion"];
    let rank = |g: &str| listed.iter().position(|l| *l == g).unwrap_or(listed.len());
    let mut per_customer: BTreeMap<String, (String, u64)> = BTreeMap::new();
    let mut reader = csv::Reader::from_path(c.path().join("data/globex.csv")).unwrap();
    let headers = reader.headers().unwrap().clone();
    let at = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let (email, amount, category) = (at("email"), at("amount_cents"), at("category"));
    for r in reader.records() {
        let r = r.unwrap();
        let group = if listed.contains(&&r[category]) {
            r[category].to_owned()
        } else {
            "(other)".to_owned()
        };
        let entry = per_customer
            .entry(r[email].trim().to_lowercase())
            .or_insert((group.clone(), 0));
        if rank(&group) < rank(&entry.0) {
            entry.0 = group;
        }
        entry.1 += r[amount].parse::<u64>().unwrap();
    }
    let mut want: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (email, (group, total)) in &per_customer {
        if kept.contains(email) {
            let g = want.entry(group.clone()).or_default();
            g.0 += 1;
            g.1 += (*total).min(CLIP);
        }
    }
    let (job, code) = c.submit(
        &[
            &cleanroom_e2e::overlap_sum_between("acme,globex")[..],
            &["--group-by", "category", "--groups", &listed.join(",")],
        ]
        .concat(),
    );
    assert_eq!(code, Some(0), "{job}");
    let groups = job["result"]["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 3, "{job}");
    let mut shown = 0;
    for g in groups {
        let label = g["group"].as_str().unwrap();
        if g["suppressed"] == true {
            continue;
        }
        shown += 1;
        let (count, sum) = want[label];
        assert_eq!(g["values"]["count"], count, "{label}: {job}");
        assert_eq!(g["values"]["amount_cents"], sum, "{label}: {job}");
    }
    assert!(shown >= 2, "{job}");
    for (node, passes) in [("acme", 3), ("globex", 3)] {
        let log = c.node_log(node);
        assert_eq!(
            log.matches("on_executors=true").count(),
            passes,
            "{node}'s passes ran on the executors"
        );
    }
    // Each node re-blinded the other's points on its cluster, in every job: in the
    // overlap-sum, acme (the key holder) globex's distinct keys, and globex acme's.
    for (node, peer_keys) in [("acme", globex.len()), ("globex", kept.len())] {
        let log = c.node_log(node);
        let reblinded = reblinded_on_the_cluster(&log);
        assert_eq!(reblinded.len(), 3, "{node}: {log}");
        assert_eq!(reblinded.last(), Some(&(peer_keys as u64)), "{node}");
    }
}

/// Local JSON lines are read one line a record, as local CSV is: a line cut off (not JSON), an
/// email given as a list, and a number where the other lines have text are rejected rows,
/// counted by reason and placed by their line; blank lines and CRLF endings are nothing. Every
/// other row counts: the overlap equals the truth counted here, and no rejected value reaches
/// the node's log or audit log. (DataFusion's reader failed the whole read on the first such
/// line.)
#[test]
fn json_lines_with_bad_lines_are_read_one_line_a_record() {
    let (mut c, _) = Consortium::with_coordinator("acme,globex", 300, 0.5, 43);
    let acme = rows_of(&c.path().join("data/acme.csv"));
    let globex: BTreeSet<String> = rows_of(&c.path().join("data/globex.csv"))
        .into_iter()
        .map(|(_, email, _)| email)
        .collect();
    let (mut text, mut line) = (String::new(), 0u64);
    let (mut kept, mut placed) = (BTreeSet::new(), Vec::new());
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    // Counted under a label, placed with the whole reason.
    let mut reject = |line: u64, (label, why): (&str, &str), placed: &mut Vec<(u64, String)>| {
        *want.entry(label.to_owned()).or_default() += 1;
        placed.push((line, why.to_owned()));
    };
    let not_json = ("not a JSON object", "the line is not a JSON object");
    let a_list = (
        "list or object in a field",
        "the field holds a list or an object, not one value",
    );
    let no_at = ("email without '@'", "email without '@'");
    for (row, email, category) in &acme {
        line += 1;
        let record = match row % 10 {
            3 => {
                reject(line, not_json, &mut placed);
                format!("{{\"customer\": {{\"email\": \"{email}\"")
            }
            5 => {
                reject(line, a_list, &mut placed);
                serde_json::json!({"customer": {"email": [email]}}).to_string()
            }
            7 => {
                reject(line, no_at, &mut placed);
                serde_json::json!({"customer": {"email": 4_155_550_000u64 + row}}).to_string()
            }
            _ => {
                kept.insert(email.clone());
                serde_json::json!({"customer": {"email": email}, "category": category}).to_string()
            }
        };
        text += &record;
        text += "\r\n";
        if row % 50 == 0 {
            text += "\r\n";
            line += 1;
        }
    }
    std::fs::create_dir_all(c.path().join("data-j")).unwrap();
    std::fs::write(c.path().join("data-j/acme.jsonl"), text).unwrap();
    let truth = kept.intersection(&globex).count() as u64;
    assert!(truth > 50, "{truth}");

    c.admit_node("acme");
    c.admit_node("globex");
    c.write_node_toml(
        "acme",
        &format!(
            "[[dataset]]\nname = \"customers\"\npath = \"data-j/acme.jsonl\"\n\n\
             [[dataset.identifier]]\nname = \"email\"\ncolumn = \"customer.email\"\n\
             normaliser = \"email\"\n\n{}",
            open_agreement("globex")
        ),
    );
    c.write_node_config("globex", "globex", &open_agreement("acme"));
    c.start_node("acme");
    c.start_node("globex");
    c.wait_connected(&["acme", "globex"]);
    let job = c.overlap_counts(truth);
    let access = c.audited_access("acme", job["job_id"].as_str().unwrap());
    assert_eq!(
        access["rows_read"].as_u64(),
        Some(acme.len() as u64),
        "{access}"
    );
    let by_reason: BTreeMap<String, u64> =
        serde_json::from_value(access["rejected"]["by_reason"].clone()).unwrap();
    assert_eq!(by_reason, want, "{access}");
    let first: Vec<(u64, String)> = access["rejected"]["first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let line = r["line"].as_u64().unwrap();
            (line, r["reason"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(first, placed[..first.len()], "{access}");
    assert_eq!(first.len(), 10, "{access}");
    // The numbers given as emails (ten digits each) are in neither log.
    let audit = std::fs::read_to_string(c.path().join("state-acme/audit.log")).unwrap();
    for text in [c.node_log("acme"), audit] {
        for (row, _, _) in acme.iter().filter(|(row, _, _)| row % 10 == 7) {
            let number = (4_155_550_000u64 + row).to_string();
            assert!(!text.contains(&number), "a rejected value reached a log");
        }
    }
}

/// The README's kind of view, over nested data: acme's dataset is a view that takes the email
/// out of a struct (`customer['email'] AS email`) and filters on another field of it. The node
/// starts (its check lets the view read `customer.email` for an agreement on `email`, and not
/// the struct's `ssn`), and the overlap equals the truth counted here.
#[test]
fn a_view_takes_an_email_out_of_a_struct_in_a_real_overlap() {
    let (mut c, _) = Consortium::with_coordinator("acme,globex", 200, 0.5, 47);
    let acme = rows_of(&c.path().join("data/acme.csv"));
    let globex: BTreeSet<String> = rows_of(&c.path().join("data/globex.csv"))
        .into_iter()
        .map(|(_, email, _)| email)
        .collect();
    let mut text = String::new();
    let mut kept = BTreeSet::new();
    for (row, email, category) in &acme {
        let country = if row % 3 == 0 { "FR" } else { "DE" };
        if country == "DE" {
            kept.insert(email.clone());
        }
        let customer =
            serde_json::json!({"email": email, "ssn": format!("{row:09}"), "country": country});
        text += &serde_json::json!({"customer": customer, "category": category}).to_string();
        text.push('\n');
    }
    std::fs::create_dir_all(c.path().join("data-n")).unwrap();
    std::fs::write(c.path().join("data-n/orders.jsonl"), text).unwrap();
    let truth = kept.intersection(&globex).count() as u64;
    assert!(truth > 20, "{truth}");
    let view = |select: &str| {
        format!(
            "[[dataset]]\nname = \"customers\"\n\
             sql = \"SELECT {select} AS email FROM orders WHERE customer['country'] = 'DE'\"\n\
             [[dataset.table]]\nname = \"orders\"\npath = \"data-n/orders.jsonl\"\n\n\
             [[dataset.identifier]]\nname = \"email\"\ncolumn = \"email\"\nnormaliser = \"email\"\n\n{}",
            open_agreement("globex")
        )
    };
    c.admit_node("acme");
    c.admit_node("globex");
    // Another field of the struct under the email's name is refused before the node starts.
    let config = c.write_node_toml("acme", &view("customer['ssn']"));
    let out = cleanroom_node(c.path(), &["policy", "check", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("reads column 'customer.ssn'"), "{stderr}");
    c.write_node_toml("acme", &view("customer['email']"));
    c.write_node_config("globex", "globex", &open_agreement("acme"));
    c.start_node("acme");
    c.start_node("globex");
    c.wait_connected(&["acme", "globex"]);
    c.overlap_counts(truth);
}

/// Runs the overlap of [`the_executors_pass_counts_what_the_node_counts`]: the intersection
/// and acme's audited rows read, rejected, without consent and forgotten.
fn messy_overlap(executors: Option<usize>) -> (u64, [u64; 4]) {
    let (mut c, _) = Consortium::with_coordinator("acme,globex", 400, 0.5, 41);
    let acme = rows_of(&c.path().join("data/acme.csv"));
    let globex: BTreeSet<String> = rows_of(&c.path().join("data/globex.csv"))
        .into_iter()
        .map(|(_, email, _)| email)
        .collect();
    // A shared customer to forget, whose row is otherwise kept.
    let forgotten = acme
        .iter()
        .find(|(row, email, _)| {
            globex.contains(email) && [7, 11, 13, 17, 19, 23].iter().all(|d| row % d != 0)
        })
        .map(|(_, email, _)| email.clone())
        .unwrap();
    let mut lines = String::new();
    let (mut kept, mut rejected, mut no_consent, mut deleted) = (BTreeSet::new(), 0, 0, 0);
    let rows: Vec<_> = acme.iter().chain(acme.iter().take(5)).collect();
    for (row, email, _) in &rows {
        let consent = if row % 7 == 0 { "no" } else { "yes" };
        let email = match row {
            r if r % 17 == 0 => serde_json::Value::from(format!("x\n{email}")),
            r if r % 13 == 0 => serde_json::Value::Null,
            r if r % 11 == 0 => serde_json::Value::from("not-an-email"),
            // A number where the other lines hold text: read as its digits, no email.
            r if r % 23 == 0 => serde_json::Value::from(4_155_550_100 + r),
            _ => serde_json::Value::from(format!(" {} ", email.to_uppercase())),
        };
        // Nested objects: the email in `customer` (every other null one as a null customer),
        // the consent in `flags`.
        let customer = if email.is_null() && row % 26 == 0 {
            serde_json::Value::Null
        } else {
            serde_json::json!({"email": email, "since": 2019})
        };
        let line =
            serde_json::json!({"customer": customer, "flags": {"consent_marketing": consent}})
                .to_string();
        // A line cut off (a write that did not finish) costs only itself; blank lines are no
        // records. (The engine's own JSON reader would fail the whole read on either line.)
        lines += if row % 19 == 0 {
            &line[..line.len() / 2]
        } else {
            &line
        };
        lines += if row % 29 == 0 { "\n  \n" } else { "\n" };
        if row % 19 == 0 || row % 17 == 0 {
            rejected += 1;
        } else if row % 7 == 0 {
            no_consent += 1;
        } else if email.as_str().map(|e| e.trim().to_lowercase()) == Some(forgotten.clone()) {
            deleted += 1;
        } else if row % 13 == 0 || row % 11 == 0 || row % 23 == 0 {
            rejected += 1;
        } else if let Some(e) = email.as_str() {
            kept.insert(e.trim().to_lowercase());
        }
    }
    let truth = kept.intersection(&globex).count() as u64;
    std::fs::create_dir_all(c.path().join("data-j")).unwrap();
    std::fs::write(c.path().join("data-j/acme.jsonl"), lines).unwrap();

    if let Some(executors) = executors {
        let cluster = Ballista::start(c.path(), executors, 600);
        c.node_top.insert("acme".into(), cluster.engine_line(true));
        c.ballista = Some(cluster);
    }
    c.admit_node("acme");
    c.admit_node("globex");
    c.write_node_toml(
        "acme",
        &format!(
            "[[dataset]]\nname = \"customers\"\npath = \"data-j/acme.jsonl\"\n\
             consent = {{ \"overlap-reporting\" = \"flags.consent_marketing\" }}\n\n\
             [[dataset.identifier]]\nname = \"email\"\ncolumn = \"customer.email\"\nnormaliser = \"email\"\n\n{}",
            open_agreement("globex")
        ),
    );
    c.write_node_toml(
        "globex",
        &format!(
            "[[dataset]]\nname = \"customers\"\npath = \"data/globex.csv\"\n\n\
             [[dataset.identifier]]\nname = \"email\"\ncolumn = \"email\"\nnormaliser = \"email\"\n\n{}",
            open_agreement("acme")
        ),
    );
    c.forget_ok("acme", "customers", &format!("email={forgotten}"));
    c.start_node("acme");
    c.start_node("globex");
    c.wait_connected(&["acme", "globex"]);
    let (job, code) = c.submit(&cleanroom_e2e::overlap_between("acme,globex"));
    assert_eq!(code, Some(0), "{job}");
    let intersection = job["intersection"].as_u64().unwrap();
    assert_eq!(intersection, truth, "{job}");
    let access = c.audited_access("acme", job["job_id"].as_str().unwrap());
    let figure = |k: &str| {
        access[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k}: {access}"))
    };
    let figures = [
        figure("rows_read"),
        figure("rows_rejected"),
        figure("rows_excluded_consent"),
        figure("rows_excluded_deleted"),
    ];
    assert_eq!(
        figures,
        [rows.len() as u64, rejected, no_consent, deleted],
        "{access}"
    );
    if executors.is_some() {
        let log = c.node_log("acme");
        assert!(
            log.contains("on_executors=true"),
            "acme blinded on the executors"
        );
        // The executors' logs hold no email of the data.
        let cluster = c.ballista.as_ref().unwrap();
        for process in cluster.executors.iter().chain([&cluster.scheduler]) {
            let text = process.log_text().to_lowercase();
            assert!(
                !text.contains(&forgotten),
                "{} logged an email",
                process.name
            );
        }
    }
    (intersection, figures)
}

/// A match re-reads acme's dataset for its row numbers: the executors' pass again on a cluster,
/// the node's strict reader in process. Rows appended to the file between the two reads, or one
/// shared record replaced by a new one (the same row count), make the job fail with "the
/// dataset changed during the job": no membership file is written, the failure is audited, and
/// the next match succeeds. (In process, the replaced record once went unseen: the indices the
/// protocol returned then named other keys' rows.) To change the file at the right moment,
/// globex sits behind a UDP proxy that the test cuts before the job starts: acme reads its
/// rows, then cannot reach globex; the test appends rows and heals the proxy (a few seconds,
/// which QUIC's retransmissions bridge).
fn a_match_whose_dataset_changes_between_its_reads_fails(acme: Acme) {
    // Rows appended; then one shared customer's email replaced by a new one (the same number
    // of rows and of distinct emails: only the set differs).
    for change in [Change::Append, Change::Replace] {
        match_with_a_change(acme, change);
    }
}

#[derive(Debug, Clone, Copy)]
enum Change {
    Append,
    Replace,
}

fn match_with_a_change(acme: Acme, change: Change) {
    use cleanroom_e2e::proxy::UdpProxy;
    use std::time::{Duration, Instant};

    let (mut c, _) = Consortium::with_coordinator("acme,globex", 1000, 0.5, 53);
    match acme {
        Acme::InProcess => {}
        Acme::MemoryLimited => {
            c.node_top.insert("acme".into(), MEMORY_LIMIT.into());
        }
        Acme::OnExecutors(executors, limited) => {
            let cluster = Ballista::start(c.path(), executors, 600);
            let mut top = cluster.engine_line(true);
            if limited {
                top = format!("{MEMORY_LIMIT}{top}");
            }
            c.node_top.insert("acme".into(), top);
            c.ballista = Some(cluster);
        }
    }
    let proxy = UdpProxy::start();
    for (me, other) in [("acme", "globex"), ("globex", "acme")] {
        c.admit_node(me);
        c.write_node_config(me, me, &open_agreement(other));
    }
    c.advertise("globex", proxy.addr());
    c.start_node("globex");
    proxy.set_upstream(crate::partition::bound_data_plane(&c, "globex"));
    c.start_node("acme");
    c.wait_connected(&["acme", "globex"]);
    let match_job = cleanroom_e2e::psi_job("match", "acme,globex", "email", "fraud-detection");

    proxy.cut();
    let job_id = c.submit_nowait(&match_job);
    let t0 = Instant::now();
    while !c
        .node_log("acme")
        .lines()
        .any(|l| l.contains(&job_id) && l.contains("dataset loaded"))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "acme never read its rows: {}",
            c.job_status(&job_id)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let csv = c.path().join("data/acme.csv");
    let mut text = std::fs::read_to_string(&csv).unwrap();
    let width = text.lines().next().unwrap().split(',').count();
    let email_at = text
        .lines()
        .next()
        .unwrap()
        .split(',')
        .position(|h| h == "email")
        .unwrap();
    match change {
        Change::Append => {
            for i in 0..5 {
                let mut fields = vec![String::new(); width];
                fields[email_at] = format!("appended-{i}@example.com");
                text += &(fields.join(",") + "\n");
            }
        }
        Change::Replace => {
            // The first data row whose email globex has too.
            let globex: BTreeSet<String> = rows_of(&c.path().join("data/globex.csv"))
                .into_iter()
                .map(|(_, email, _)| email)
                .collect();
            let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
            let line = lines
                .iter_mut()
                .skip(1)
                .find(|l| {
                    globex.contains(&l.split(',').nth(email_at).unwrap().trim().to_lowercase())
                })
                .unwrap();
            let mut fields: Vec<String> = line.split(',').map(str::to_owned).collect();
            fields[email_at] = "replaced@example.com".into();
            *line = fields.join(",");
            text = lines.join("\n") + "\n";
        }
    }
    std::fs::write(&csv, text).unwrap();
    proxy.heal();

    let job = c.wait_job(&job_id, Duration::from_secs(120));
    assert_eq!(job["state"], "failed", "{change:?}: {job}");
    let reason = cleanroom_e2e::reason_of(&job, "failed");
    assert!(
        reason.contains("the dataset changed during the job"),
        "{change:?}: {reason}"
    );
    let audited = c.audited_error("acme", &job_id).unwrap();
    assert!(
        audited.contains("the dataset changed during the job"),
        "{audited}"
    );
    let membership = c
        .path()
        .join(format!("state-acme/results/{job_id}-membership.csv"));
    assert!(!membership.exists(), "a membership file was written");
    let how: &[&str] = match acme {
        Acme::InProcess => &["spilled=false", "on_executors=false"],
        Acme::MemoryLimited => &["spilled=true", "on_executors=false"],
        Acme::OnExecutors(_, false) => &["spilled=false", "on_executors=true"],
        Acme::OnExecutors(_, true) => &["spilled=true", "on_executors=true"],
    };
    assert!(
        c.node_log("acme").lines().any(|l| l.contains(&job_id)
            && l.contains("dataset loaded")
            && how.iter().all(|h| l.contains(h))),
        "acme's first read was not {how:?}"
    );

    // The file is read as it is now: the next match succeeds and names acme's rows of the
    // customers globex has. On a cluster, its membership pass reads the file in parts on both
    // executors and takes them in part order, so the rows are numbered as in the file.
    let (job, code) = c.submit(&match_job);
    assert_eq!(code, Some(0), "{job}");
    let globex: BTreeSet<String> = rows_of(&c.path().join("data/globex.csv"))
        .into_iter()
        .map(|(_, email, _)| email)
        .collect();
    let truth: Vec<u64> = rows_of(&csv)
        .into_iter()
        .filter(|(_, email, _)| globex.contains(email))
        .map(|(row, _, _)| row)
        .collect();
    let job_id = job["job_id"].as_str().unwrap();
    assert_eq!(c.membership_rows("acme", job_id), truth, "{change:?}");
    if let Acme::OnExecutors(..) = acme {
        let parts = ordered_reads(&c, "acme");
        assert!(
            parts.iter().any(|&p| p > 1),
            "acme's membership pass read in parts: {parts:?}"
        );
    }
}

/// `cleanroom-node dataset preview` of the dataset `customers` in `config`, with `extra`.
fn preview_customers(c: &Consortium, config: &Path, extra: &[&str]) -> std::process::Output {
    let config = config.to_str().unwrap();
    let mut args = vec!["dataset", "preview", "--config", config];
    args.extend(["--dataset", "customers"]);
    args.extend(extra);
    cleanroom_node(c.path(), &args)
}

/// The number of parts of each read `node` took in part order on its cluster (from its log).
fn ordered_reads(c: &Consortium, node: &str) -> Vec<u64> {
    parts_in(&c.node_log(node))
}

/// The partner's points each job re-blinded on the node's cluster, from the node's `log`.
fn reblinded_on_the_cluster(log: &str) -> Vec<u64> {
    logged_numbers(
        log,
        "re-blinded the partner's points on the cluster",
        "points=",
    )
}

/// The number of parts of each read taken in part order, from a node's `log`.
fn parts_in(log: &str) -> Vec<u64> {
    logged_numbers(log, "taken in part order", "parts=")
}

/// The number after `field` on each line of `log` that says `what`.
fn logged_numbers(log: &str, what: &str, field: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            l.split(field)
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn a_match_whose_dataset_changes_between_its_reads_fails_in_process() {
    a_match_whose_dataset_changes_between_its_reads_fails(Acme::InProcess);
}

/// Spilled, the second read looks for the tags of the matched keys.
#[test]
fn a_match_whose_dataset_changes_between_its_reads_fails_under_a_memory_limit() {
    a_match_whose_dataset_changes_between_its_reads_fails(Acme::MemoryLimited);
}

#[test]
fn a_match_whose_dataset_changes_between_its_reads_fails_on_a_cluster() {
    a_match_whose_dataset_changes_between_its_reads_fails(Acme::OnExecutors(2, false));
}

/// On a cluster under a `memory_limit`: the session gives the matched points, and the second
/// pass on the executors looks for them.
#[test]
fn a_match_whose_dataset_changes_between_its_reads_fails_on_a_cluster_under_a_memory_limit() {
    a_match_whose_dataset_changes_between_its_reads_fails(Acme::OnExecutors(2, true));
}

/// Where acme's match runs.
#[derive(Debug, Clone, Copy)]
enum Acme {
    InProcess,
    /// In process under a `memory_limit`: its sets spilled.
    MemoryLimited,
    /// On a cluster of this many executors; with a `memory_limit` when `true`.
    OnExecutors(usize, bool),
}

const MEMORY_LIMIT: &str = "memory_limit = \"256MiB\"\n";

/// A view on a cluster reads its CSV table as strictly as the node reads a local one: globex's
/// view `SELECT email FROM crm WHERE amount_cents >= 1000` runs on the executors (its keys
/// blinded there too, by the sealed pass over the view's output) over a file
/// with a line too long, a quote left open, a quote in the email, and (past the lines its
/// columns are typed from) a word for an amount. Those lines are rejected and counted by
/// reason, a quote in a column the view does not read is kept, and the overlap equals the truth
/// counted here. (DataFusion's own reader would fail the whole read on the long line.)
#[test]
fn a_view_on_a_cluster_reads_malformed_csv_strictly() {
    let (mut c, _) = Consortium::with_coordinator("acme,globex", 3000, 0.5, 59);
    let acme: BTreeSet<String> = rows_of(&c.path().join("data/acme.csv"))
        .into_iter()
        .map(|(_, email, _)| email)
        .collect();
    let text = std::fs::read_to_string(c.path().join("data/globex.csv")).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let names: Vec<&str> = header.split(',').collect();
    let at = |name: &str| names.iter().position(|n| *n == name).unwrap();
    let (email, amount, category) = (at("email"), at("amount_cents"), at("category"));
    let last = names.len() - 1;
    assert!(![email, amount].contains(&last));
    let mut csv = format!("{header}\n");
    let mut want: BTreeMap<&str, u64> = BTreeMap::new();
    let mut kept = BTreeSet::new();
    for (i, line) in lines.enumerate() {
        let row = i + 1;
        let mut f: Vec<String> = line.split(',').map(str::to_owned).collect();
        let reason = match row {
            r if r % 17 == 0 => {
                f.push("extra".into());
                Some("field count")
            }
            r if r % 13 == 0 => {
                f[last] = "\"a note over".into();
                Some("quote left open")
            }
            r if r % 11 == 0 => {
                f[email] = format!("\"{}\"\"\"", f[email]);
                Some("quote in a field")
            }
            // Past the 2000 lines the columns' types are read from.
            r if r > 2500 && r % 7 == 0 => {
                f[amount] = "lots".into();
                Some("field type")
            }
            r if r % 5 == 0 => {
                f[category] = "5\" screen".into();
                None
            }
            _ => None,
        };
        match reason {
            Some(reason) => *want.entry(reason).or_default() += 1,
            None if f[amount].parse::<i64>().unwrap() >= 1000 => {
                kept.insert(f[email].trim().to_lowercase());
            }
            None => {}
        }
        csv += &(f.join(",") + "\n");
    }
    std::fs::create_dir_all(c.path().join("data-m")).unwrap();
    std::fs::write(c.path().join("data-m/globex.csv"), csv).unwrap();
    let truth = acme.intersection(&kept).count() as u64;
    assert!(truth > 100, "{truth}");

    let cluster = Ballista::start(c.path(), 2, 600);
    c.node_top
        .insert("globex".into(), cluster.engine_line(true));
    c.ballista = Some(cluster);
    c.admit_node("acme");
    c.admit_node("globex");
    c.write_node_config("acme", "acme", &open_agreement("globex"));
    c.write_node_toml(
        "globex",
        &format!(
            "[[dataset]]\nname = \"customers\"\n\
             sql = \"SELECT email FROM crm WHERE amount_cents >= 1000\"\n\
             [[dataset.table]]\nname = \"crm\"\npath = \"data-m/globex.csv\"\n\n\
             [[dataset.identifier]]\nname = \"email\"\ncolumn = \"email\"\nnormaliser = \"email\"\n\n{}",
            open_agreement("acme")
        ),
    );
    c.start_node("acme");
    c.start_node("globex");
    c.wait_connected(&["acme", "globex"]);
    let job = c.overlap_counts(truth);
    let access = c.audited_access("globex", job["job_id"].as_str().unwrap());
    let by_reason: BTreeMap<String, u64> =
        serde_json::from_value(access["rejected"]["by_reason"].clone()).unwrap();
    let want: BTreeMap<String, u64> = want.into_iter().map(|(k, v)| (k.into(), v)).collect();
    assert_eq!(by_reason, want, "{access}");
    assert_eq!(
        access["rows_rejected"].as_u64(),
        Some(want.values().sum()),
        "{access}"
    );
    let shares = c.ballista.as_ref().unwrap().shares();
    assert!(shares.iter().all(|(tasks, _)| *tasks > 0), "{shares:?}");
    // The executors read the view and blinded its output (the pass runs over the view).
    assert!(
        c.node_log("globex").contains("on_executors=true"),
        "globex's pass ran on the executors"
    );
}
