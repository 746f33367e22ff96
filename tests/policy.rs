//! End to end: each rule of the policy language refuses what it must, with its own wording, and
//! is recorded in the refusing node's audit log; rules decided on the offer read no row. Consent
//! and deletion filter exactly the rows they should.
//!
//! acme's policy varies per test; globex always has the open agreement with acme, so every
//! refusal comes from acme.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cleanroom_e2e::{
    Consortium, assert_no_dataset_loaded, open_agreement, overlap_job, psi_job, reason_of,
};
use serde_json::Value;

const ROWS: u64 = 500;

/// An agreement with globex: `agreement` lines (after partner) and `allow` lines (after the
/// overlap-by-email entry's keys).
fn acme_agreement(agreement: &str, allow: &str) -> String {
    format!(
        "[[agreement]]\npartner = \"globex\"\npurposes = [\"overlap-reporting\", \"fraud-detection\"]\n{agreement}\n\n\
         [[agreement.allow]]\ncomputation = \"overlap\"\ndataset = \"customers\"\nkeys = [\"email\"]\n{allow}\n"
    )
}

/// A coordinator, acme with `acme_policy` (agreements TOML) and globex with the open agreement.
fn pair(acme_policy: &str) -> Consortium {
    let (mut c, _) = Consortium::with_coordinator("acme,globex", ROWS, 0.5, 7);
    c.start_pair(acme_policy);
    c
}

fn overlap(c: &Consortium, on: &str, purpose: &str) -> Value {
    c.submit(&overlap_job("acme,globex", on, purpose)).0
}

/// A match job by email for fraud-detection in which `learner` learns membership.
fn match_revealed_to(c: &Consortium, learner: &str) -> Value {
    let words = psi_job("match", "acme,globex", "email", "fraud-detection");
    c.submit(&[&words[..], &["--reveal-to", learner]].concat())
        .0
}

/// Starts the pair with `acme_policy`, submits an overlap by `key` for `purpose`, and checks
/// that acme vetoes it with `wording` before any node reads a row.
fn assert_overlap_vetoed_at_the_offer(acme_policy: &str, key: &str, purpose: &str, wording: &str) {
    let c = pair(acme_policy);
    let job = overlap(&c, key, purpose);
    assert_vetoed_before_reading(&c, &job, wording);
    assert_no_dataset_loaded(&c, &["acme", "globex"]);
}

fn config_path(c: &Consortium, node: &str) -> PathBuf {
    c.path().join(format!("{node}.toml"))
}

fn kinds(entries: &[Value]) -> Vec<&str> {
    entries
        .iter()
        .map(|e| e["event"]["kind"].as_str().unwrap_or(""))
        .collect()
}

/// The job was vetoed by acme with a reason containing `wording`, acme audited the refusal
/// (a Decision with accepted = false and that reason), and no node read a row for it.
fn assert_vetoed_before_reading(c: &Consortium, job: &Value, wording: &str) {
    assert_eq!(job["state"], "vetoed", "{job}");
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(wording),
        "reason {reason:?} lacks {wording:?}"
    );
    assert!(
        reason.contains("acme"),
        "reason names who refused: {reason}"
    );
    let id = job["job_id"].as_str().unwrap();
    let entries = c.audit_entries("acme", Some(id));
    assert!(
        entries.iter().any(|e| e["event"]["kind"] == "Decision"
            && e["event"]["accepted"] == false
            && e["event"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains(wording))),
        "acme's audit log lacks the refusal {wording:?}: {entries:?}"
    );
    assert_neither_node_audited(c, id, &["Access", "Release"]);
}

/// Neither acme nor globex audited an entry of any of `kinds` for the job `id`.
fn assert_neither_node_audited(c: &Consortium, id: &str, forbidden: &[&str]) {
    for node in ["acme", "globex"] {
        let entries = c.audit_entries(node, Some(id));
        let audited = kinds(&entries);
        assert!(
            !forbidden.iter().any(|k| audited.contains(k)),
            "{node} audited one of {forbidden:?} for a refused job: {entries:?}"
        );
    }
}

/// The job ended (vetoed, or failed mid-job) with `wording` in its reason, acme audited that
/// reason, and nothing was released by either node.
fn assert_refused_mid_job(c: &Consortium, job: &Value, wording: &str) {
    let state = job["state"].as_str().unwrap_or_default();
    assert!(state == "vetoed" || state == "failed", "{job}");
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(wording),
        "reason {reason:?} lacks {wording:?}"
    );
    let id = job["job_id"].as_str().unwrap();
    let entries = c.audit_entries("acme", Some(id));
    assert!(
        entries.iter().any(|e| e["event"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains(wording))),
        "acme's audit log lacks {wording:?}: {entries:?}"
    );
    assert_neither_node_audited(c, id, &["Release"]);
}

#[test]
fn purpose_not_in_agreement() {
    assert_overlap_vetoed_at_the_offer(
        &acme_agreement("", ""),
        "email",
        "marketing",
        "purpose 'marketing' not in agreement with globex",
    );
}

#[test]
fn expired_agreement() {
    assert_overlap_vetoed_at_the_offer(
        &acme_agreement("expires = \"2026-06-30\"", ""),
        "email",
        "overlap-reporting",
        "agreement with globex expired 2026-06-30",
    );
}

#[test]
fn computation_or_key_not_allowed() {
    let c = pair(&acme_agreement("", ""));
    let job = overlap(&c, "phone", "overlap-reporting");
    assert_vetoed_before_reading(
        &c,
        &job,
        "agreement with globex does not allow overlap on customers by phone",
    );
    let job = match_revealed_to(&c, "acme");
    assert_vetoed_before_reading(
        &c,
        &job,
        "agreement with globex does not allow match on customers by email",
    );
    assert_no_dataset_loaded(&c, &["acme", "globex"]);
}

#[test]
fn membership_not_allowed() {
    let policy = format!(
        "{}[[agreement.allow]]\ncomputation = \"match\"\ndataset = \"customers\"\nkeys = [\"email\"]\nmembership = \"self\"\n",
        acme_agreement("", "")
    );
    let c = pair(&policy);
    let job = match_revealed_to(&c, "globex");
    assert_vetoed_before_reading(
        &c,
        &job,
        "agreement with globex does not let globex learn membership",
    );
    assert_no_dataset_loaded(&c, &["acme", "globex"]);
}

#[test]
fn min_input_size() {
    let c = pair(&acme_agreement("", "min_input_size = 100000"));
    let job = overlap(&c, "email", "overlap-reporting");
    assert_refused_mid_job(&c, &job, "rows < min_input 100000");
    // "input N rows < min_input M" with N acme's distinct keys.
    let reason = job["reason"].as_str().unwrap();
    let n: u64 = reason
        .split("input ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no input size in {reason:?}"));
    assert!(n > 0 && n <= ROWS, "{reason}");
    assert_eq!(
        n,
        emails("acme", &c, None).len() as u64,
        "N is acme's distinct keys: {reason}"
    );
}

#[test]
fn runs_per_day() {
    let c = pair(&acme_agreement("", "runs_per_period = 2\nperiod = \"day\""));
    for _ in 0..2 {
        let job = overlap(&c, "email", "overlap-reporting");
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    let job = overlap(&c, "email", "overlap-reporting");
    assert_vetoed_before_reading(&c, &job, "runs per day exceeded (2/2)");
}

#[test]
fn peer_set_size_bounds() {
    // globex declares about ROWS keys: below a min_set_size of 100000 ...
    let c = pair(&acme_agreement("", "min_set_size = 100000"));
    let job = overlap(&c, "email", "overlap-reporting");
    assert_refused_mid_job(&c, &job, "< min_set_size 100000");
    assert!(
        job["reason"].as_str().unwrap().contains("globex declares"),
        "{job}"
    );
    drop(c);
    // ... and above a max_set_size of 10.
    let c = pair(&acme_agreement("", "max_set_size = 10"));
    let job = overlap(&c, "email", "overlap-reporting");
    assert_refused_mid_job(&c, &job, "> max_set_size 10");
    assert!(
        job["reason"].as_str().unwrap().contains("globex declares"),
        "{job}"
    );
}

/// The normalised emails of a partner's CSV (trim + lowercase; every synthetic email is
/// valid), optionally only of rows whose consent column says yes, with their raw forms.
fn emails_raw(name: &str, c: &Consortium, consent: Option<&str>) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(c.path().join(format!("data/{name}.csv"))).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |n: &str| header.iter().position(|h| *h == n).unwrap();
    let email = col("email");
    let consent = consent.map(col);
    lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(',').map(|f| f.trim_matches('"')).collect();
            if let Some(i) = consent {
                let v = fields[i].trim().to_lowercase();
                if !(v == "true" || v == "1" || v == "yes") {
                    return None;
                }
            }
            Some((
                fields[email].trim().to_lowercase(),
                fields[email].to_owned(),
            ))
        })
        .collect()
}

fn emails(name: &str, c: &Consortium, consent: Option<&str>) -> HashSet<String> {
    emails_raw(name, c, consent)
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

#[test]
fn consent_filters_exactly_the_non_consenting_rows() {
    let (mut c, _) = Consortium::with_coordinator("acme,globex", ROWS, 0.5, 7);
    c.issue_node("acme");
    c.issue_node("globex");
    let cfg = c.write_node_config("acme", "acme", &acme_agreement("", ""));
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "path = \"data/acme.csv\"\n",
        "path = \"data/acme.csv\"\nconsent = { \"overlap-reporting\" = \"consent_marketing\" }\n",
    );
    std::fs::write(&cfg, text).unwrap();
    c.write_node_config("globex", "globex", &open_agreement("acme"));
    c.start_node("acme");
    c.start_node("globex");
    c.wait_connected(&["acme", "globex"]);

    let consenting = emails("acme", &c, Some("consent_marketing"));
    let all = emails("acme", &c, None);
    let globex = emails("globex", &c, None);
    let expected = consenting.intersection(&globex).count() as u64;
    let unfiltered = all.intersection(&globex).count() as u64;
    assert!(
        expected > 0 && expected < unfiltered,
        "the data must make consent matter"
    );

    let job = overlap(&c, "email", "overlap-reporting");
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["intersection"].as_u64(), Some(expected), "{job}");
    // fraud-detection has no consent column at acme: every row counts.
    let job = overlap(&c, "email", "fraud-detection");
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["intersection"].as_u64(), Some(unfiltered), "{job}");
    // The exclusions are audited.
    let access: Vec<Value> = c
        .audit_entries("acme", None)
        .into_iter()
        .filter(|e| e["event"]["kind"] == "Access")
        .collect();
    let rows_without_consent =
        ROWS - emails_raw("acme", &c, Some("consent_marketing")).len() as u64;
    assert_eq!(
        access[0]["event"]["rows_excluded_consent"].as_u64(),
        Some(rows_without_consent),
        "{access:?}"
    );
}

/// Stops a node (removing it from the consortium) and waits until the coordinator sees it go.
fn stop_node(c: &mut Consortium, name: &str) {
    let i = c.nodes.iter().position(|p| p.name == name).unwrap();
    let mut p = c.nodes.remove(i);
    p.stop();
    c.wait_disconnected(name, Duration::from_secs(15));
}

#[test]
fn forgotten_subjects_leave_the_overlap() {
    let mut c = pair(&acme_agreement("", ""));
    let globex = emails("globex", &c, None);
    let shared: Vec<(String, String)> = emails_raw("acme", &c, None)
        .into_iter()
        .filter(|(n, _)| globex.contains(n))
        .collect();
    let before = overlap(&c, "email", "overlap-reporting");
    assert_eq!(before["state"], "succeeded", "{before}");
    let before = before["intersection"].as_u64().unwrap();
    assert_eq!(before, shared.len() as u64);

    // Forget k shared subjects (by their raw form in acme's file, which the CLI normalises).
    stop_node(&mut c, "acme");
    let k = 3;
    for (_, raw) in shared.iter().take(k) {
        let out = c.forget_ok("acme", "customers", &format!("email={raw}"));
        // It says how many rows the key matches today (issue 18: a miss must be visible).
        assert_eq!(
            out.trim(),
            "forgotten: 1 subject in dataset customers (effective for all future jobs); email \
             matches 1 row in customers today"
        );
    }
    // Unknown dataset, unknown identifier and a value that does not normalise are refused.
    for (dataset, key, wording) in [
        ("orders", "email=a@b.c", "no dataset 'orders'"),
        ("customers", "ssn=123", "no identifier 'ssn'"),
        ("customers", "email=not-an-email", "does not normalise"),
    ] {
        let out = c.forget("acme", dataset, key);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(wording), "{err}");
        assert!(!err.contains("not-an-email"), "the value is echoed: {err}");
    }
    // The list and the audit log hold hashes, never the values.
    let state = c.path().join("state-acme");
    let list = std::fs::read_to_string(state.join("forgotten.jsonl")).unwrap();
    assert_eq!(list.lines().count(), k);
    let audit = std::fs::read_to_string(state.join("audit.log")).unwrap();
    for (norm, raw) in shared.iter().take(k) {
        for text in [&list, &audit] {
            assert!(!text.contains(norm.as_str()) && !text.contains(raw.trim()));
        }
    }
    let forgets: Vec<Value> = c
        .audit_entries("acme", None)
        .into_iter()
        .filter(|e| e["event"]["kind"] == "Forget")
        .collect();
    assert_eq!(forgets.len(), k, "{forgets:?}");

    c.start_node("acme");
    c.wait_connected(&["acme", "globex"]);
    let after = overlap(&c, "email", "overlap-reporting");
    assert_eq!(after["state"], "succeeded", "{after}");
    assert_eq!(
        after["intersection"].as_u64(),
        Some(before - k as u64),
        "{after}"
    );
}

/// SIGHUP reloads the policy: a valid change applies to the next job; a broken file is refused
/// and the last good policy stays in force.
#[test]
fn sighup_reloads_the_policy_and_a_broken_reload_keeps_the_last_good_one() {
    let c = pair(&acme_agreement("", ""));
    let job = overlap(&c, "email", "overlap-reporting");
    assert_eq!(job["state"], "succeeded", "{job}");

    let wait_for_log = |c: &Consortium, needle: &str, count: usize| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.node("acme").log_text().matches(needle).count() < count {
            assert!(Instant::now() < deadline, "acme never logged {needle:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // Narrow the agreement to fraud detection and reload.
    let path = config_path(&c, "acme");
    let text = std::fs::read_to_string(&path).unwrap();
    let narrowed = text.replace(
        "purposes = [\"overlap-reporting\", \"fraud-detection\"]",
        "purposes = [\"fraud-detection\"]",
    );
    assert_ne!(text, narrowed);
    std::fs::write(&path, &narrowed).unwrap();
    c.node("acme").hang_up();
    wait_for_log(&c, "policy reloaded", 1);
    let job = overlap(&c, "email", "overlap-reporting");
    assert!(
        reason_of(&job, "vetoed")
            .contains("purpose 'overlap-reporting' not in agreement with globex"),
        "{job}"
    );

    // A broken file: refused, and the narrowed policy stays in force.
    std::fs::write(&path, format!("{narrowed}\nthis is not toml = = =\n")).unwrap();
    c.node("acme").hang_up();
    wait_for_log(&c, "policy reload failed", 1);
    let job = overlap(&c, "email", "fraud-detection");
    assert_eq!(job["state"], "succeeded", "{job}");
    let job = overlap(&c, "email", "overlap-reporting");
    assert_eq!(job["state"], "vetoed", "{job}");

    // Each successful load is in the audit log (`audit show` reads the config: restore it).
    std::fs::write(&path, &narrowed).unwrap();
    let loads = c
        .audit_entries("acme", None)
        .into_iter()
        .filter(|e| e["event"]["kind"] == "PolicyLoaded")
        .count();
    assert_eq!(loads, 2, "start and one successful reload");
}
