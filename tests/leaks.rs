//! End to end: after real overlap, match and overlap-sum jobs, no artefact of the consortium (logs, audit logs
//! and their heads, the coordinator's SQLite database and its journal, membership files,
//! configs, state dirs) holds a raw or normalised identifier from the input data, and no text
//! artefact holds a 64-hex-digit string that is not a known hash or digest (a secret scalar or a
//! blinded point written as hex would be one).
//!
//! Limitation: the blinded points travel only on the wire (QUIC, encrypted), so they are not
//! captured here; that each job draws a fresh key is checked at unit level (`JobKey::generate`
//! in `circuits`). A scalar or point written in *binary* into the SQLite database would not be
//! recognised by the hex scan; the database is still searched byte-for-byte for identifiers.

// Test-only code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use cleanroom_e2e::{
    Consortium, MATCH_REVEALED_TO_ACME, OVERLAP, open_agreement, overlap_sum_between,
};
use cleanroom_node::data::normalise::Normaliser;
use serde_json::Value;

/// The email and phone columns of a synthetic CSV, raw.
fn identifiers(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let email = header.iter().position(|h| *h == "email").unwrap();
    let phone = header.iter().position(|h| *h == "phone").unwrap();
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[email].to_owned(), f[phone].to_owned())
        })
        .collect()
}

/// Every file under `dir`, except the input CSVs in `data/`.
fn artefacts(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if !(p.starts_with(dir.join("data"))
                && p.extension().is_some_and(|x| x == "csv"))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Maximal runs of hex digits of length ≥ 64 in `text`.
fn long_hex_runs(text: &str) -> Vec<String> {
    let mut runs = Vec::new();
    let mut cur = String::new();
    for ch in text.chars().chain(std::iter::once(' ')) {
        if ch.is_ascii_hexdigit() {
            cur.push(ch);
        } else {
            if cur.len() >= 64 {
                runs.push(cur.to_lowercase());
            }
            cur.clear();
        }
    }
    runs
}

/// Every 64-hex string value anywhere in a JSON value.
fn hex_values(v: &Value, out: &mut HashSet<String>) {
    match v {
        Value::String(s) => {
            for r in long_hex_runs(s) {
                out.insert(r);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| hex_values(x, out)),
        Value::Object(o) => o.values().for_each(|x| hex_values(x, out)),
        _ => {}
    }
}

#[test]
fn no_artefact_holds_an_identifier_or_a_secret() {
    let (mut c, truth) = Consortium::with_coordinator("acme,globex", 3000, 0.4, 41);
    let expected = truth["pairwise_overlap"]["acme,globex"].as_u64().unwrap();
    for (me, other) in [("acme", "globex"), ("globex", "acme")] {
        c.issue_node(me);
        // Also overlap-sum on the customers' amounts, either role, exact.
        let agreements = format!(
            "[[dataset.value]]\ncolumn = \"amount_cents\"\nmin = 0\nmax = 10000000\n\n{}\
             [[agreement.allow]]\ncomputation = \"overlap-sum\"\ndataset = \"customers\"\n\
             keys = [\"email\"]\nvalue_columns = [{{ column = \"amount_cents\", min = 0, max = 500000 }}]\n",
            open_agreement(other)
        );
        c.write_node_config(me, me, &agreements);
        c.start_node(me);
    }
    c.wait_connected(&["acme", "globex"]);

    let sum = overlap_sum_between("acme,globex");
    let (job, _) = c.submit(&sum);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        job["result"]["intersection"].as_u64(),
        Some(expected),
        "{job}"
    );
    let mut jobs = Vec::new();
    for args in [
        &OVERLAP[..],
        &OVERLAP[..],
        &MATCH_REVEALED_TO_ACME[..],
        &MATCH_REVEALED_TO_ACME[..],
    ] {
        let (job, _) = c.submit(args);
        assert_eq!(job["state"], "succeeded", "{job}");
        assert_eq!(job["intersection"].as_u64(), Some(expected), "{job}");
        jobs.push(job);
    }
    // Two jobs on the same inputs give the same outcomes and the same membership file.
    let outcome = |job: &Value| -> Vec<(String, Value, Value, Value)> {
        let mut v: Vec<_> = job["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["node"].as_str().unwrap().to_owned(),
                    r["intersection"].clone(),
                    r["own_set_size"].clone(),
                    r["peer_set_size"].clone(),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    assert_eq!(outcome(&jobs[0]), outcome(&jobs[1]));
    assert_eq!(outcome(&jobs[2]), outcome(&jobs[3]));
    let membership = |job: &Value| -> String {
        let acme = job["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["node"] == "acme")
            .unwrap();
        std::fs::read_to_string(acme["membership_file"].as_str().unwrap()).unwrap()
    };
    let (m1, m2) = (membership(&jobs[2]), membership(&jobs[3]));
    assert_eq!(m1, m2, "two match jobs on the same inputs disagree");
    assert_eq!(m1.lines().skip(1).count() as u64, expected);

    // Stop everything so logs are flushed and the database is closed.
    for p in c.nodes.iter_mut() {
        p.stop();
    }
    c.coordinator.as_mut().unwrap().stop();

    // The needles: every shared email, 500 others, and their phones; raw and normalised.
    let acme = identifiers(&c.path().join("data/acme.csv"));
    let globex = identifiers(&c.path().join("data/globex.csv"));
    let email = Normaliser::Email;
    let phone = Normaliser::Phone;
    let norm_email = |s: &str| email.normalise(s).unwrap_or_else(|_| s.to_owned());
    let globex_emails: HashSet<String> = globex.iter().map(|(e, _)| norm_email(e)).collect();
    let (shared, others): (Vec<_>, Vec<_>) = acme
        .iter()
        .chain(globex.iter().rev())
        .partition(|(e, _)| globex_emails.contains(&norm_email(e)));
    assert!(shared.len() as u64 >= expected, "{}", shared.len());
    let mut needles = BTreeSet::new();
    let step = (others.len() / 500).max(1);
    for (e, p) in shared
        .iter()
        .copied()
        .chain(others.iter().step_by(step).take(500).copied())
    {
        needles.insert(e.trim().to_owned());
        needles.insert(norm_email(e));
        needles.insert(e.trim().to_lowercase());
        needles.insert(p.trim().to_owned());
        if let Ok(n) = phone.normalise(p) {
            // "+15551234567" and the bare digits.
            needles.insert(n.trim_start_matches('+').to_owned());
            needles.insert(n);
        }
    }
    needles.retain(|n| n.len() >= 6);
    assert!(needles.len() > 2000, "{} needles", needles.len());

    // Known hashes and digests: every 64-hex value in the audit logs, their heads and the jobs.
    let mut known = HashSet::new();
    for name in ["acme", "globex"] {
        let state = c.path().join(format!("state-{name}"));
        let log = std::fs::read_to_string(state.join("audit.log")).unwrap();
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            hex_values(&serde_json::from_str(line).unwrap(), &mut known);
        }
        if let Ok(head) = std::fs::read_to_string(state.join("audit.log.head")) {
            known.extend(long_hex_runs(&head));
        }
    }
    for job in &jobs {
        hex_values(job, &mut known);
    }

    let files = artefacts(c.path());
    let mut scanned = Vec::new();
    let mut leaks = Vec::new();
    let mut unknown_hex = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(c.path()).unwrap().display().to_string();
        let bytes = std::fs::read(f).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for n in &needles {
            if text.contains(n.as_str()) {
                leaks.push(format!("{rel}: {n}"));
            }
        }
        // PEM files are base64, not hex; keys are expected there. A node's audit signing key
        // file is a key file too (its seed in hex): it must be private to its owner.
        let key_file = rel.ends_with("/audit-signing.key");
        if key_file {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{rel}");
            }
        }
        if !rel.starts_with("pki/") && !rel.starts_with("rogue/") && !key_file {
            for run in long_hex_runs(&text) {
                let allowed = run.len() % 64 == 0
                    && run
                        .as_bytes()
                        .chunks(64)
                        .all(|c| known.contains(std::str::from_utf8(c).unwrap()));
                if !allowed {
                    unknown_hex.push(format!("{rel}: {run}"));
                }
            }
        }
        scanned.push(format!("{rel} ({} bytes)", bytes.len()));
    }
    eprintln!(
        "scanned {} files for {} needles:\n{}",
        scanned.len(),
        needles.len(),
        scanned.join("\n")
    );
    // The scan covered what matters.
    for must in [
        "coordinator.db",
        "logs/coordinator.log",
        "logs/acme.log",
        "state-acme/audit.log",
        "state-globex/audit.log",
    ] {
        assert!(
            scanned.iter().any(|s| s.starts_with(must)),
            "{must} was not scanned: {scanned:?}"
        );
    }
    assert!(
        scanned.iter().any(|s| s.contains("-membership.csv")),
        "no membership file scanned"
    );
    assert!(leaks.is_empty(), "identifiers found:\n{}", leaks.join("\n"));
    assert!(
        unknown_hex.is_empty(),
        "64-hex strings that are not known hashes:\n{}",
        unknown_hex.join("\n")
    );
}
