//! End to end: what a partner's operator hits on day one, with hand-made data whose truth is
//! counted by hand in each test (phone formats, forget, `check`, closed pipes, a second node
//! on one state directory, host names, a coordinator restart, a tampered audit log).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use cleanroom_e2e::{Consortium, bins};

fn node_cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(&bins().1)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running cleanroom-node")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An agreement allowing overlap on customers by phone and by email.
fn phone_agreement(partner: &str) -> String {
    format!(
        "[[agreement]]\npartner = \"{partner}\"\npurposes = [\"overlap-reporting\"]\n\n\
         [[agreement.allow]]\ncomputation = \"overlap\"\ndataset = \"customers\"\nkeys = [\"phone\", \"email\"]\n\n"
    )
}

/// Overlap by `key` between acme and globex: the released count.
fn overlap(c: &Consortium, key: &str) -> u64 {
    let (job, code) = c.submit(&[
        "overlap",
        "--between",
        "acme,globex",
        "--dataset",
        "customers",
        "--on",
        key,
        "--purpose",
        "overlap-reporting",
    ]);
    assert_eq!(code, Some(0), "{job}");
    assert_eq!(job["state"], "succeeded", "{job}");
    job["intersection"].as_u64().unwrap()
}

/// Phone numbers as real exports write them (trunk prefix in parentheses, national formats,
/// extensions, several countries): overlap by phone equals the count by hand, and `forget
/// --key phone=…` reports the rows it matches and then excludes them.
#[test]
fn phone_formats_overlap_and_forget_by_phone() {
    let mut c = Consortium::new();
    std::fs::create_dir_all(c.path().join("data")).unwrap();
    // Subjects P1..P5 by their E.164 numbers (national numbering plans, see
    // node/testdata/phone_vectors.csv): P1 +442079460018, P2 +14155550123, P3 +49301234567,
    // P4 +14155550199, P5 +61255501234, P6 +33199001234.
    std::fs::write(
        c.path().join("data/acme.csv"),
        "email,phone\n\
         a1@example.com,+44 (0)20 7946 0018\n\
         a2@example.com,+44 20 7946 0018\n\
         a3@example.com,(415) 555-0123\n\
         a4@example.com,+49 (0)30 1234567\n\
         a5@example.com,+1 415 555 0199 ext. 12\n\
         a6@example.com,+61 (0)2 5550 1234\n",
    )
    .unwrap();
    std::fs::write(
        c.path().join("data/globex.csv"),
        "email,phone\n\
         g1@example.com,+44 20 7946 0018\n\
         g2@example.com,415-555-0123\n\
         g3@example.com,0049 30 1234567\n\
         g4@example.com,+1 (415) 555-0199\n\
         g5@example.com,+33 1 99 00 12 34\n",
    )
    .unwrap();
    c.start_coordinator();
    for (me, other) in [("acme", "globex"), ("globex", "acme")] {
        c.issue_node(me);
        c.write_node_config(me, me, &phone_agreement(other));
        c.start_node(me);
    }
    c.wait_connected(&["acme", "globex"]);
    // Shared: P1, P2, P3, P4 (P5 and P6 are on one side only).
    assert_eq!(overlap(&c, "phone"), 4);

    // A value that matches nothing says so.
    let out = node_cli(
        c.path(),
        &[
            "forget",
            "--config",
            "acme.toml",
            "--dataset",
            "customers",
            "--key",
            "phone=+44 20 7946 0999",
        ],
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("matches 0 rows in customers"), "{t}");
    assert!(t.contains("warning: no row"), "{t}");
    assert_eq!(overlap(&c, "phone"), 4);

    // P1 is written two ways at acme: both rows match, both are excluded.
    let out = node_cli(
        c.path(),
        &[
            "forget",
            "--config",
            "acme.toml",
            "--dataset",
            "customers",
            "--key",
            "phone=+44 20 7946 0018",
        ],
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("forgotten: 1 subject"), "{t}");
    assert!(t.contains("matches 2 rows in customers"), "{t}");
    assert!(!t.contains("warning"), "{t}");
    assert_eq!(overlap(&c, "phone"), 3);
}
