//! End to end: datasets in other formats than CSV, read by real nodes through DataFusion. The
//! demo over Parquet files; a real overlap and match between a node whose dataset is a Parquet
//! file and one whose dataset is a SQL view, against a truth counted here from the CSV files
//! `synth` writes with the same seed; a view the agreement does not cover, refused by `check`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use cleanroom_e2e::{Consortium, bins, cleanroom_node, cleanroom_ok, open_agreement};

/// `cleanroom demo --format parquet` runs every job over Parquet files and checks each figure
/// against the truth (it exits non-zero on any mismatch).
#[test]
fn the_demo_runs_over_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(&bins().0)
        .args(["demo", "--rows", "400", "--format", "parquet", "--keep"])
        .arg(dir.path().join("demo"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("in parquet files"), "{stdout}");
    assert!(stdout.contains("ok"), "{stdout}");
    assert!(!stdout.contains("WRONG"), "{stdout}");
    let data = dir.path().join("demo/data");
    assert!(data.join("acme.parquet").exists());
    assert!(
        !data.join("acme.csv").exists(),
        "the nodes must read Parquet, not CSV"
    );
}

/// `(row number from 1, email trimmed and lower-cased, category)` of a `synth` CSV.
fn rows_of(csv: &Path) -> Vec<(u64, String, String)> {
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
    let (mut c, _) = Consortium::with_coordinator("acme,globex", 600, 0.5, 31);
    // The same customers again, as Parquet: acme's node reads those.
    cleanroom_ok(
        c.path(),
        &[
            "synth",
            "--out",
            "data-pq",
            "--partners",
            "acme,globex",
            "--rows",
            "600",
            "--overlap",
            "0.5",
            "--seed",
            "31",
            "--format",
            "parquet",
        ],
    );
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

    let (job, code) = c.submit(&cleanroom_e2e::overlap_between("acme,globex"));
    assert_eq!(code, Some(0), "{job}");
    assert_eq!(job["intersection"].as_u64(), Some(truth), "{job}");

    let (job, code) = c.submit(&cleanroom_e2e::psi_job(
        "match",
        "acme,globex",
        "email",
        "fraud-detection",
    ));
    assert_eq!(code, Some(0), "{job}");
    let job_id = job["job_id"].as_str().unwrap();
    let file = c
        .path()
        .join(format!("state-acme/results/{job_id}-membership.csv"));
    let written: Vec<u64> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(
        written, acme_rows,
        "acme's matched Parquet rows are the CSV's rows"
    );
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
