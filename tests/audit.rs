//! End to end: after real jobs, a node's audit log verifies; every kind of tampering with a copy
//! of it is detected and named; the transparency summary lists the partner; and the audit head
//! each node reports with a job result catches a log cut together with its head file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Output;

use cleanroom_e2e::{Consortium, cleanroom_ok, overlap_job};
use serde_json::Value;

fn node_cli(dir: &Path, args: &[&str]) -> Output {
    cleanroom_e2e::cleanroom_node(dir, args)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `audit verify` of the config at `cfg`, with an optional expected head.
fn verify(dir: &Path, cfg: &Path, expect_head: Option<&str>) -> Output {
    let mut args = vec!["audit", "verify", "--config", cfg.to_str().unwrap()];
    if let Some(h) = expect_head {
        args.extend(["--expect-head", h]);
    }
    node_cli(dir, &args)
}

/// A copy of acme's config whose state dir is `<name>/`, holding a copy of acme's audit log
/// (and head file) transformed by `tamper` (lines without their newlines).
fn tampered_copy(
    c: &Consortium,
    name: &str,
    tamper: impl FnOnce(&mut Vec<String>) -> Option<String>,
) -> PathBuf {
    let state = c.path().join("state-acme");
    let copy = c.path().join(name);
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(state.join("audit.log.head"), copy.join("audit.log.head")).unwrap();
    let log = std::fs::read_to_string(state.join("audit.log")).unwrap();
    let mut lines: Vec<String> = log.lines().map(str::to_owned).collect();
    // `tamper` returns the whole new file when it needs more than whole lines.
    let new = tamper(&mut lines)
        .unwrap_or_else(|| lines.iter().map(|l| format!("{l}\n")).collect::<String>());
    std::fs::write(copy.join("audit.log"), new).unwrap();
    let cfg_text = std::fs::read_to_string(c.path().join("acme.toml"))
        .unwrap()
        .replace(
            "state_dir = \"state-acme\"",
            &format!("state_dir = \"{name}\""),
        );
    let cfg = c.path().join(format!("{name}.toml"));
    std::fs::write(&cfg, cfg_text).unwrap();
    cfg
}

fn assert_detected(c: &Consortium, cfg: &Path, wording: &str) {
    let out = verify(c.path(), cfg, None);
    let t = text(&out);
    assert!(!out.status.success(), "tampering not detected: {t}");
    assert!(t.contains(wording), "verify output lacks {wording:?}: {t}");
}

#[test]
fn audit_log_verifies_detects_tampering_and_matches_reported_heads() {
    let (c, truth) = Consortium::open_pair(400, 0.5, 5);
    let expected = truth["pairwise_overlap"]["acme,globex"].as_u64().unwrap();

    // A couple of jobs: two accepted, one vetoed.
    let mut last_job = String::new();
    for purpose in ["overlap-reporting", "fraud-detection", "marketing"] {
        let (job, _) = c.submit(&overlap_job("acme,globex", "email", purpose));
        if purpose == "marketing" {
            assert_eq!(job["state"], "vetoed", "{job}");
        } else {
            assert_eq!(job["state"], "succeeded", "{job}");
            assert_eq!(job["intersection"].as_u64(), Some(expected), "{job}");
            last_job = job["job_id"].as_str().unwrap().to_owned();
        }
    }

    // The untouched log verifies.
    let acme_cfg = c.path().join("acme.toml");
    let out = verify(c.path(), &acme_cfg, None);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).starts_with("ok: "), "{}", text(&out));
    let lines = std::fs::read_to_string(c.path().join("state-acme/audit.log"))
        .unwrap()
        .lines()
        .count();
    assert!(lines >= 5, "decisions, accesses and releases are logged");

    // Each kind of tampering, on a copy.
    let cfg = tampered_copy(&c, "flip", |lines| {
        // A changed digit in line 2's timestamp.
        let l = &mut lines[1];
        let at = l.find("\"at_ms\":").unwrap() + "\"at_ms\":".len() + 3;
        let b = l.as_bytes()[at];
        let flipped = if b == b'9' { '0' } else { char::from(b + 1) };
        l.replace_range(at..=at, &flipped.to_string());
        None
    });
    assert_detected(&c, &cfg, "line 2");
    assert_detected(&c, &cfg, "changed");

    let cfg = tampered_copy(&c, "delete", |lines| {
        lines.remove(1);
        None
    });
    assert_detected(&c, &cfg, "deleted");

    let cfg = tampered_copy(&c, "swap", |lines| {
        lines.swap(1, 2);
        None
    });
    assert_detected(&c, &cfg, "reordered");

    let cfg = tampered_copy(&c, "cut", |lines| {
        let mut all: String = lines.iter().map(|l| format!("{l}\n")).collect();
        all.truncate(all.len() - 20);
        Some(all)
    });
    assert_detected(&c, &cfg, "incomplete last line");

    let cfg = tampered_copy(&c, "drop-last", |lines| {
        lines.pop();
        None
    });
    assert_detected(&c, &cfg, "truncated");

    // The transparency summary parses and names the partner.
    let out = node_cli(
        c.path(),
        &[
            "transparency",
            "--config",
            acme_cfg.to_str().unwrap(),
            "--format",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let summary: Value = serde_json::from_slice(&out.stdout).expect("transparency JSON");
    assert!(
        summary["partners"]
            .as_array()
            .is_some_and(|p| p.iter().any(|x| x == "globex")),
        "{summary}"
    );

    // Each result carries its node's audit head.
    let mut args = vec![
        "job".to_owned(),
        "status".into(),
        last_job.clone(),
        "--format".into(),
        "json".into(),
    ];
    args.extend(c.analyst_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let status: Value = serde_json::from_str(&cleanroom_ok(c.path(), &args)).unwrap();
    let results = status["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{status}");
    for r in results {
        let head = r["audit_head"]
            .as_str()
            .unwrap_or_else(|| panic!("result of {} has no audit_head: {status}", r["node"]));
        let (seq, hash) = head.split_once(':').expect("SEQ:HEX");
        assert!(
            seq.parse::<u64>().unwrap() > 0 && hash.len() == 64,
            "{head}"
        );
    }
    let acme_head = results.iter().find(|r| r["node"] == "acme").unwrap()["audit_head"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = verify(c.path(), &acme_cfg, Some(&acme_head));
    assert!(out.status.success(), "{}", text(&out));

    // Cut the log before that head and rewrite its head file to match: the log verifies on its
    // own (the documented limit), but not against the head the coordinator kept.
    let head_seq: usize = acme_head.split_once(':').unwrap().0.parse().unwrap();
    let cfg = tampered_copy(&c, "cut-with-head", |lines| {
        lines.truncate(head_seq - 1);
        None
    });
    let copy = c.path().join("cut-with-head");
    let last: Value = serde_json::from_str(
        std::fs::read_to_string(copy.join("audit.log"))
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    std::fs::write(
        copy.join("audit.log.head"),
        format!("{}:{}\n", last["seq"], last["hash"].as_str().unwrap()),
    )
    .unwrap();
    let out = verify(c.path(), &cfg, None);
    assert!(out.status.success(), "{}", text(&out));
    let out = verify(c.path(), &cfg, Some(&acme_head));
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("truncated") && t.contains("expected head"),
        "{t}"
    );
}
