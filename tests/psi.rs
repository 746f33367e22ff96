//! End to end: a coordinator and two nodes as real processes on loopback run overlap and match
//! jobs submitted through the analyst CLI, and the results equal the plaintext truth.

use cleanroom_e2e::{Consortium, open_agreement};

#[test]
fn overlap_and_match_equal_the_plaintext_truth() {
    let mut c = Consortium::new();
    let truth = c.synth("acme,globex", 3000, 0.4, 11);
    let expected = truth["pairwise_overlap"]["acme,globex"].as_u64().unwrap();
    assert!(expected > 0);
    c.start_coordinator();
    for (me, other) in [("acme", "globex"), ("globex", "acme")] {
        c.issue_node(me);
        c.write_node_config(me, me, &open_agreement(other));
        c.start_node(me);
    }
    c.wait_connected(&["acme", "globex"]);

    let (job, code) = c.submit(&[
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
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(code, Some(0));
    assert_eq!(job["intersection"].as_u64(), Some(expected), "{job}");
    for r in job["results"].as_array().unwrap() {
        assert_eq!(r["intersection"].as_u64(), Some(expected));
        assert_eq!(r["learned_membership"], false);
        assert_eq!(r["rows_read"].as_u64(), Some(3000));
    }

    // Match: only acme asks to learn membership; globex's agreement allows it.
    let (job, _) = c.submit(&[
        "match",
        "--between",
        "acme,globex",
        "--dataset",
        "acme:customers",
        "--dataset",
        "globex:customers",
        "--on",
        "email",
        "--purpose",
        "fraud-detection",
        "--reveal-to",
        "acme",
    ]);
    assert_eq!(job["state"], "succeeded", "{job}");
    let results = job["results"].as_array().unwrap();
    let acme = results.iter().find(|r| r["node"] == "acme").unwrap();
    let globex = results.iter().find(|r| r["node"] == "globex").unwrap();
    assert_eq!(acme["learned_membership"], true);
    assert_eq!(acme["matched_rows"].as_u64(), Some(expected));
    assert_eq!(globex["learned_membership"], false);
    // The membership file lists row numbers only — never identifiers.
    let file = std::fs::read_to_string(acme["membership_file"].as_str().unwrap()).unwrap();
    let rows: Vec<&str> = file.lines().skip(1).collect();
    assert_eq!(rows.len() as u64, expected);
    assert!(
        rows.iter().all(|r| r.parse::<u64>().is_ok()),
        "membership file holds row numbers"
    );
    assert!(!file.contains('@'));

    // The same rows, checked against the data: every listed row's email is at globex too.
    let norm = |s: &str| s.trim().to_lowercase();
    let read_emails = |name: &str| -> Vec<String> {
        let text = std::fs::read_to_string(c.path().join(format!("data/{name}.csv"))).unwrap();
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap().split(',').collect();
        let col = header.iter().position(|h| *h == "email").unwrap();
        lines
            .map(|l| norm(l.split(',').nth(col).unwrap()))
            .collect()
    };
    let acme_emails = read_emails("acme");
    let globex_emails: std::collections::HashSet<String> =
        read_emails("globex").into_iter().collect();
    for r in rows {
        let row: usize = r.parse().unwrap();
        assert!(
            globex_emails.contains(&acme_emails[row - 1]),
            "row {row} is not shared"
        );
    }

    // No raw identifier from the data appears in any log.
    for p in c.nodes.iter().chain(c.coordinator.iter()) {
        let log = p.log_text();
        assert!(
            !acme_emails
                .iter()
                .take(200)
                .any(|e| log.contains(e.as_str())),
            "{} log leaks an email",
            p.name
        );
    }
}
