//! End to end: datasets in an S3 bucket (`s3://` paths), read by real nodes through
//! DataFusion's object store over HTTP from an S3 service on loopback (moto's server, installed
//! and started by the test: [`cleanroom_e2e::s3`]). The credentials come from the nodes'
//! environment and never reach a log or a file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;

use cleanroom_e2e::s3::{S3, SECRET_KEY};
use cleanroom_e2e::{Consortium, open_agreement};

/// `(row number from 1, email trimmed and lower-cased)` of a `synth` CSV.
fn emails_of(csv: &Path) -> Vec<(u64, String)> {
    let mut reader = csv::Reader::from_path(csv).unwrap();
    let at = reader
        .headers()
        .unwrap()
        .iter()
        .position(|h| h == "email")
        .unwrap();
    reader
        .records()
        .enumerate()
        .map(|(i, r)| (i as u64 + 1, r.unwrap()[at].trim().to_lowercase()))
        .collect()
}

/// The emails (trimmed, lower-cased) of the well-formed lines of the CSV `file` whose
/// `amount_cents` is at least `min`. Read line by line, as the node reads S3: the synth data
/// holds no quoted field, so a line with a `"` or another field count is a malformed one.
fn big_spenders(file: &Path, min: i64) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap();
    let mut lines = text.lines();
    let headers: Vec<&str> = lines.next().unwrap().split(',').collect();
    let at = |name: &str| headers.iter().position(|h| *h == name).unwrap();
    let (email, amount) = (at("email"), at("amount_cents"));
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() == headers.len() && !f.iter().any(|v| v.contains('"')))
        .filter(|f| f[amount].parse::<i64>().is_ok_and(|a| a >= min))
        .map(|f| f[email].trim().to_lowercase())
        .collect()
}

/// Every file under `dir` that holds `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

/// acme's customers are Parquet under a prefix of its bucket (beside a `_SUCCESS` marker, as
/// Spark writes them), globex's a CSV export in its bucket with malformed lines. A real
/// overlap and match read both over S3: the count equals the truth counted here from the CSVs,
/// the malformed lines are rejected and counted, acme's matched rows are its Parquet rows. A
/// deleted object fails a job alone. A SQL view over the export reads it as strictly (a dry
/// run). The secret access key is in no file of the consortium (logs, audit logs, state,
/// results).
/// What `cleanroom-node dataset preview` prints for the dataset `customers` of `config`, run
/// in `dir` with the store's credentials; it must succeed.
fn preview_from_s3(dir: &Path, s3: &S3, config: &Path) -> String {
    let out = std::process::Command::new(&cleanroom_e2e::bins().1)
        .args(["dataset", "preview", "--config"])
        .arg(config)
        .args(["--dataset", "customers"])
        .current_dir(dir)
        .envs(s3.env())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn nodes_read_their_datasets_from_s3() {
    let (mut c, _) = Consortium::with_coordinator("acme,globex", 800, 0.5, 47);
    c.synth_as("data-pq", "parquet", "acme", (800, 0.5, 47));
    let acme = emails_of(&c.path().join("data/acme.csv"));
    let globex = emails_of(&c.path().join("data/globex.csv"));

    // globex's export: the synth file with three malformed lines spliced in.
    let text = std::fs::read_to_string(c.path().join("data/globex.csv")).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let fields = lines[0].split(',').count();
    let email_at = lines[0].split(',').position(|h| h == "email").unwrap();
    let bad = [
        (10, "short@example.com,1".to_owned()),
        (200, format!("{},x", lines[200])),
        (400, {
            // Eight fields, the last one's quote open at the line's end.
            let mut f: Vec<String> = vec![String::new(); fields];
            f[email_at] = "open@example.com".into();
            f[fields - 1] = "\"a note over two lines".into();
            f.join(",")
        }),
    ];
    for (at, line) in bad.iter().rev() {
        lines.insert(*at, line.clone());
    }
    let export = c.path().join("data/globex-export.csv");
    std::fs::write(&export, lines.join("\n") + "\n").unwrap();
    let globex_emails: BTreeSet<&str> = globex.iter().map(|(_, e)| e.as_str()).collect();
    let acme_rows: Vec<u64> = acme
        .iter()
        .filter(|(_, e)| globex_emails.contains(e.as_str()))
        .map(|(row, _)| *row)
        .collect();
    let truth = acme_rows.len() as u64;
    assert!(truth > 100, "{truth}");

    let s3 = S3::start(c.path());
    s3.create_bucket("acme-lake");
    s3.create_bucket("globex-lake");
    s3.put(
        "acme-lake",
        "customers/part-0.parquet",
        &c.path().join("data-pq/acme.parquet"),
    );
    std::fs::write(c.path().join("data/_SUCCESS"), "").unwrap();
    s3.put(
        "acme-lake",
        "customers/_SUCCESS",
        &c.path().join("data/_SUCCESS"),
    );
    s3.put("globex-lake", "exports/customers.csv", &export);
    // The local copies go: the nodes can only have read S3.
    std::fs::remove_dir_all(c.path().join("data-pq")).unwrap();
    // (globex's export is kept outside the consortium's directory, to put back later.)
    let spare = tempfile::tempdir().unwrap();
    let saved = spare.path().join("customers.csv");
    std::fs::rename(&export, &saved).unwrap();

    for node in ["acme", "globex"] {
        c.node_env.insert(node.into(), s3.env());
        c.admit_node(node);
    }
    c.write_node_toml(
        "acme",
        &format!(
            "[[dataset]]\nname = \"customers\"\npath = \"s3://acme-lake/customers/\"\n\
             format = \"parquet\"\n\n\
             [[dataset.identifier]]\nname = \"email\"\ncolumn = \"email\"\nnormaliser = \"email\"\n\n{}",
            open_agreement("globex")
        ),
    );
    c.write_node_toml(
        "globex",
        &format!(
            "[[dataset]]\nname = \"customers\"\npath = \"s3://globex-lake/exports/customers.csv\"\n\n\
             [[dataset.identifier]]\nname = \"email\"\ncolumn = \"email\"\nnormaliser = \"email\"\n\n{}",
            open_agreement("acme")
        ),
    );
    c.start_node("acme");
    c.start_node("globex");
    c.wait_connected(&["acme", "globex"]);

    let job = c.overlap_counts(truth);
    let job_id = job["job_id"].as_str().unwrap();
    let access = c.audited_access("acme", job_id);
    assert_eq!(access["rows_read"], acme.len() as u64, "{access}");
    assert_eq!(access["rows_rejected"], 0, "{access}");
    let access = c.audited_access("globex", job_id);
    assert_eq!(
        [access["rows_read"].clone(), access["rows_rejected"].clone()],
        [globex.len() as u64 + 3, 3].map(serde_json::Value::from),
        "{access}"
    );

    let (job, code) = c.submit(&cleanroom_e2e::psi_job(
        "match",
        "acme,globex",
        "email",
        "fraud-detection",
    ));
    assert_eq!(code, Some(0), "{job}");
    let membership = c.membership_rows("acme", job["job_id"].as_str().unwrap());
    assert_eq!(membership, acme_rows, "acme's matched rows of its Parquet");

    // Counted by reason, and placed by data row (the read is in file order).
    let rejected = &access["rejected"];
    assert_eq!(
        rejected["by_reason"],
        serde_json::json!({"field count": 2, "quote left open": 1}),
        "{access}"
    );
    let places: Vec<u64> = rejected["first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    // Each bad line went in before the ones after it: its row is its place plus those before.
    let want: Vec<u64> = bad
        .iter()
        .enumerate()
        .map(|(before, (at, _))| (at + before) as u64)
        .collect();
    assert_eq!(places, want, "{access}");

    // The export is gone from the bucket: the next job fails alone, saying which dataset and
    // which object, and globex's node keeps serving.
    s3.delete("globex-lake", "exports/customers.csv");
    let (job, code) = c.submit(&cleanroom_e2e::overlap_between("acme,globex"));
    assert_ne!(code, Some(0), "{job}");
    let reason = cleanroom_e2e::reason_of(&job, "failed");
    assert!(
        reason.contains("customers") && reason.contains("exports/customers.csv"),
        "{reason}"
    );
    let error = c
        .audited_error("globex", job["job_id"].as_str().unwrap())
        .unwrap();
    assert!(error.contains("exports/customers.csv"), "{error}");
    s3.put("globex-lake", "exports/customers.csv", &saved);
    c.overlap_counts(truth);

    // A SQL view over the same export, read in process from S3: its CSV table is read as
    // strictly as a local one (line by line; counts by reason, no places), shown by a dry run.
    let view = c.path().join("globex-view.toml");
    let config = std::fs::read_to_string(c.path().join("globex.toml"))
        .unwrap()
        .replacen(
            "path = \"s3://globex-lake/exports/customers.csv\"\n",
            "sql = \"SELECT email FROM exports WHERE amount_cents >= 100000\"\n\
             [[dataset.table]]\nname = \"exports\"\n\
             path = \"s3://globex-lake/exports/customers.csv\"\n",
            1,
        );
    std::fs::write(&view, config).unwrap();
    let text = preview_from_s3(c.path(), &s3, &view);
    let big: Vec<String> = big_spenders(&saved, 100_000);
    let distinct = big.iter().collect::<BTreeSet<_>>().len();
    let figures = [big.len() + 3, 3, 0, 0, distinct].map(|n| n as u64);
    cleanroom_e2e::assert_preview(&text, "email", figures, &["field count", "quote left open"]);

    // acme's customers as nested JSON lines in S3, with a cut-off line, a bare list, a number
    // for an email and blank lines: handed over line by line and read one line a record, as a
    // local file is (the engine's JSON reader would fail the read on the first bad line).
    let mut jsonl = String::new();
    for (row, email) in &acme {
        jsonl += &serde_json::json!({"customer": {"email": email}, "row": row}).to_string();
        jsonl.push('\n');
        if row % 100 == 0 {
            jsonl += "{\"customer\": {\"email\": \"cut@example.com\"\n\n  \n[1, 2]\n";
            jsonl += "{\"customer\": {\"email\": 4155550100}}\n";
        }
    }
    let bad_groups = acme.iter().filter(|(row, _)| row % 100 == 0).count() as u64;
    let events = spare.path().join("customers.jsonl");
    std::fs::write(&events, jsonl).unwrap();
    s3.put("acme-lake", "events/customers.jsonl", &events);
    std::fs::remove_file(&events).unwrap();
    let json = c.path().join("acme-json.toml");
    let config = std::fs::read_to_string(c.path().join("acme.toml"))
        .unwrap()
        .replacen(
            "path = \"s3://acme-lake/customers/\"\nformat = \"parquet\"\n",
            "path = \"s3://acme-lake/events/customers.jsonl\"\n",
            1,
        )
        .replacen("column = \"email\"", "column = \"customer.email\"", 1);
    std::fs::write(&json, config).unwrap();
    let text = preview_from_s3(c.path(), &s3, &json);
    let distinct = acme.iter().map(|(_, e)| e).collect::<BTreeSet<_>>().len() as u64;
    let figures = [
        acme.len() as u64 + 3 * bad_groups,
        3 * bad_groups,
        0,
        0,
        distinct,
    ];
    cleanroom_e2e::assert_preview(&text, "email", figures, &["not a JSON object"]);
    assert!(!text.contains("4155550100"), "{text}");

    let holding = files_holding(c.path(), SECRET_KEY.as_bytes());
    assert!(holding.is_empty(), "the secret key is in {holding:?}");
}
