//! End to end: partners hold their own keys. Enrolment by certificate request (the CA directory
//! never holds a party's key), renewal without a restart, revocation through the CA's CRL.

// Test-only code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use cleanroom_e2e::{Consortium, cleanroom, cleanroom_ok, open_agreement};

fn overlap(c: &Consortium) -> serde_json::Value {
    let (job, _) = c.submit(&[
        "overlap",
        "--between",
        "acme,globex",
        "--dataset",
        "customers",
        "--on",
        "email",
        "--purpose",
        "overlap-reporting",
    ]);
    job
}

/// Every file under `dir` that holds a PEM private key.
fn private_keys_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(private_keys_under(&path));
        } else if std::fs::read_to_string(&path).is_ok_and(|t| t.contains("PRIVATE KEY")) {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// acme and globex enrolled by request, with agreements naming each other, connected.
fn enrolled_pair(rows: u64) -> (Consortium, u64) {
    let mut c = Consortium::enrolled();
    let truth = c.synth("acme,globex", rows, 0.5, 31);
    let expected = truth["pairwise_overlap"]["acme,globex"].as_u64().unwrap();
    c.start_coordinator();
    for (me, other) in [("acme", "globex"), ("globex", "acme")] {
        c.enrol_node(me);
        c.write_node_config(me, me, &open_agreement(other));
        c.start_node(me);
    }
    c.wait_connected(&["acme", "globex"]);
    (c, expected)
}

#[test]
fn a_partner_enrolled_by_request_runs_jobs_and_the_ca_holds_no_partner_key() {
    let (c, expected) = enrolled_pair(300);
    let job = overlap(&c);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["intersection"].as_u64(), Some(expected), "{job}");

    // The CA directory holds the CA's key and nothing else secret.
    assert_eq!(
        private_keys_under(&c.path().join("pki")),
        vec![c.path().join("pki/ca.key")]
    );
    // Each party's key is where it generated it, readable by its owner only.
    for stem in ["coordinator", "analyst-alice", "node-acme", "node-globex"] {
        let key = c.path().join(format!("keys/{stem}.key"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        assert!(key.exists());
    }
    // The CA's record: four certificates, all valid, each with its key's fingerprint, which
    // is the fingerprint `pki request` printed for the party.
    let list = cleanroom_ok(c.path(), &["pki", "list", "--dir", "pki"]);
    assert_eq!(list.lines().count(), 5, "{list}");
    assert_eq!(list.matches(" valid ").count(), 4, "{list}");
    let show = cleanroom_ok(c.path(), &["pki", "show", "keys/node-acme.pem"]);
    assert!(show.contains("identity: node acme"), "{show}");
    let fp = show
        .lines()
        .find_map(|l| l.strip_prefix("key fingerprint: "))
        .unwrap();
    assert!(fp.starts_with("sha256:") && fp.len() == 7 + 64, "{fp}");
    assert!(list.contains(fp), "{list}");

    // The party's tools refuse to overwrite its key; `pki issue` says what it is for.
    let again = cleanroom(
        c.path(),
        &[
            "pki", "request", "--role", "node", "--name", "acme", "--out", "keys",
        ],
    );
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("--renew"),
        "{again:?}"
    );
    let help = cleanroom_ok(c.path(), &["pki", "issue", "--help"]);
    assert!(help.contains("DEMO AND TESTS ONLY"), "{help}");
}
