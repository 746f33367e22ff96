//! End to end: a coordinator and two nodes as real processes on loopback run overlap and match
//! jobs submitted through the analyst CLI, and the results equal the plaintext truth. Each node
//! applies the stricter release terms of both agreements itself: what the coordinator receives
//! (seen by a coordinator played by the test) carries no count, row count or membership that
//! either agreement withholds.

use cleanroom_e2e::raw_coordinator::RawCoordinator;
use cleanroom_e2e::{Consortium, MATCH_REVEALED_TO_ACME, OVERLAP, open_agreement, overlap_job};
use cleanroom_proto::v1::{JobKind, JobSpec, PartySpec, PsiOutcome, report::Outcome};

#[test]
fn overlap_and_match_equal_the_plaintext_truth() {
    let (c, truth) = Consortium::open_pair(3000, 0.4, 11);
    let expected = truth["pairwise_overlap"]["acme,globex"].as_u64().unwrap();
    assert!(expected > 0);

    let (job, code) = c.submit(&OVERLAP);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(code, Some(0));
    assert_eq!(job["intersection"].as_u64(), Some(expected), "{job}");
    for r in job["results"].as_array().unwrap() {
        assert_eq!(r["intersection"].as_u64(), Some(expected));
        assert_eq!(r["learned_membership"], false);
        // A node's rows read, rejected and excluded are its own figures: they stay in its audit
        // log and are in no report.
        for own in [
            "rows_read",
            "rows_rejected",
            "rows_excluded_consent",
            "rows_excluded_deleted",
        ] {
            assert!(r.get(own).is_none(), "{own} left the node: {r}");
        }
    }
    let access = c.audited_access("acme", job["job_id"].as_str().unwrap());
    assert_eq!(access["rows_read"], 3000, "{access}");

    // Match: only acme asks to learn membership; globex's agreement allows it.
    let (job, _) = c.submit(&MATCH_REVEALED_TO_ACME);
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
    let acme_emails = read_emails(&c, "acme");
    let globex_emails: std::collections::HashSet<String> =
        read_emails(&c, "globex").into_iter().collect();
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

/// Thresholds (issue 12): each hello carries its sender's `min_result` and whether its
/// agreement lets counts go to the coordinator, and each node withholds under the stricter of
/// both itself. Before, only the node whose agreement was stricter withheld; the other reported
/// the exact count (and, for a match, its matched rows and membership file) to the coordinator,
/// which had to be trusted to blank it. The coordinator here is played by the test and sees the
/// reports as sent.
#[test]
fn each_node_withholds_under_the_joint_terms_without_trusting_the_coordinator() {
    let mut c = Consortium::new();
    let truth = c.synth("acme,globex", 600, 0.4, 21);
    let expected = truth["pairwise_overlap"]["acme,globex"].as_u64().unwrap();
    assert!(expected > 0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut coordinator, addr) = rt.block_on(async { RawCoordinator::bind(c.path()) });
    c.addr = Some(addr);
    // acme: by email, a threshold far above the count; by phone, counts to the partner only.
    let acme = "[[agreement]]\npartner = \"globex\"\npurposes = [\"overlap-reporting\"]\n\n\
        [[agreement.allow]]\ncomputation = \"overlap\"\ndataset = \"customers\"\nkeys = [\"email\"]\nmin_result = 1000000\n\n\
        [[agreement.allow]]\ncomputation = \"overlap\"\ndataset = \"customers\"\nkeys = [\"phone\"]\ncounts_to = [\"partner\"]\n\n\
        [[agreement.allow]]\ncomputation = \"match\"\ndataset = \"customers\"\nkeys = [\"email\"]\nmembership = \"both\"\nmin_result = 1000000\n\n\
        [[agreement.allow]]\ncomputation = \"match\"\ndataset = \"customers\"\nkeys = [\"phone\"]\nmembership = \"both\"\ncounts_to = [\"partner\"]\n";
    // globex: everything, with the defaults (threshold 1, counts to both).
    let globex = "[[agreement]]\npartner = \"acme\"\npurposes = [\"overlap-reporting\"]\n\n\
        [[agreement.allow]]\ncomputation = \"overlap\"\ndataset = \"customers\"\nkeys = [\"email\", \"phone\"]\n\n\
        [[agreement.allow]]\ncomputation = \"match\"\ndataset = \"customers\"\nkeys = [\"email\", \"phone\"]\nmembership = \"both\"\n";
    for (name, agreements) in [("acme", acme), ("globex", globex)] {
        c.issue_node(name);
        c.write_node_config(name, name, agreements);
        c.start_node(name);
    }
    rt.block_on(coordinator.register(2));
    let spec = |kind: JobKind, key: &str| JobSpec {
        kind: kind as i32,
        parties: ["acme", "globex"]
            .map(|node| PartySpec {
                node: node.into(),
                dataset: "customers".into(),
                keys: vec![key.into()],
                learns_membership: kind == JobKind::Match,
            })
            .to_vec(),
        purpose: "overlap-reporting".into(),
        ..JobSpec::default()
    };
    let reports = |job_id: &str, kind: JobKind, key: &str| -> Vec<(String, PsiOutcome)> {
        rt.block_on(coordinator.run(job_id, &spec(kind, key)))
            .unwrap()
            .into_iter()
            .map(|(node, o)| match o {
                Outcome::Psi(p) => (node, p),
                other => panic!("{node}: {other:?}"),
            })
            .collect()
    };
    let results = |node: &str| c.path().join(format!("state-{node}/results"));
    let files = |node: &str, job_id: &str| results(node).join(format!("{job_id}-membership.csv"));
    for (job_id, kind, key) in [
        ("ovl-threshold", JobKind::Overlap, "email"),
        ("ovl-counts-to", JobKind::Overlap, "phone"),
        ("match-threshold", JobKind::Match, "email"),
        ("match-counts-to", JobKind::Match, "phone"),
    ] {
        for (node, o) in reports(job_id, kind, key) {
            // Nothing of the count reaches the coordinator from either node.
            assert!(o.suppressed, "{job_id} {node}: {o:?}");
            assert_eq!(o.intersection, 0, "{job_id} {node}: {o:?}");
            assert_eq!(o.matched_rows, 0, "{job_id} {node}: {o:?}");
            assert!(!o.learned_membership, "{job_id} {node}: {o:?}");
            assert!(o.membership_file.is_empty(), "{job_id} {node}: {o:?}");
        }
        if kind == JobKind::Match {
            for node in ["acme", "globex"] {
                let written = files(node, job_id).exists();
                if key == "email" {
                    // Under the joint threshold the membership is withheld at both nodes too.
                    assert!(!written, "{node} wrote the membership of {job_id}");
                } else {
                    // Counts to the partner only: each learns its membership, as both
                    // agreements allow, but reports no figure of it.
                    assert!(written, "{node} wrote no membership for {job_id}");
                }
            }
        }
    }
    let rows = std::fs::read_to_string(files("acme", "match-counts-to")).unwrap();
    assert!(rows.lines().count() > 1, "{rows}");
}

/// What a deviating partner can learn (issue 12 item 5; docs/SECURITY.md, README, `policy
/// check`): mallory, in an `overlap` with acme, blinds each of its candidate identifiers with a
/// scalar of its own instead of one job key. acme re-blinds them with its key and returns them
/// shuffled, as the protocol says; mallory unblinds each returned point with each of its
/// scalars (m² multiplications) and tests the result against acme's blinded points. It learns
/// exactly which of its candidates acme holds, not only how many. This test pins the leak the
/// documents state; a protocol that removes it would make it fail.
#[test]
fn a_deviating_partner_learns_which_of_its_candidates_we_hold() {
    use cleanroom_e2e::fake_node;
    use cleanroom_proto::v1::{BatchEnd, Phase, PointBatch, envelope::Body};
    use curve25519_dalek::Scalar;
    use curve25519_dalek::ristretto::CompressedRistretto;

    let (mut c, _) = Consortium::with_coordinator("acme", 300, 0.5, 8);
    let coordinator = c.addr.unwrap();
    c.start_node_for_fake_peer("acme", "mallory", &open_agreement("mallory"));
    // Ten of acme's customers and ten strangers, in one list.
    let text = std::fs::read_to_string(c.path().join("data/acme.csv")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == "email").unwrap();
    let mut candidates: Vec<(String, bool)> = lines
        .take(10)
        .map(|l| (l.split(',').nth(col).unwrap().trim().to_lowercase(), true))
        .collect();
    candidates.extend((0..10).map(|i| (format!("stranger-{i}@example.org"), false)));

    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = c.path().to_owned();
    let probe = candidates.clone();
    let attack = rt.spawn(async move {
        let m = probe.len() as u64;
        let mut job = fake_node::join_next_job(&dir, coordinator, "mallory", "acme", m).await;
        // One scalar per candidate, instead of one key for all.
        let scalars: Vec<Scalar> = (0..probe.len())
            .map(|i| Scalar::from(1_000_003u64 + 7919 * i as u64))
            .collect();
        let mut points = Vec::new();
        for ((email, _), r) in probe.iter().zip(&scalars) {
            let p = r * cleanroom_circuits::hash_to_group("email", email.as_bytes());
            points.extend_from_slice(p.compress().as_bytes());
        }
        job.send(
            Phase::PsiBlinded,
            Body::Points(PointBatch { seq: 0, points }),
        )
        .await;
        job.send(Phase::PsiBlinded, Body::BatchEnd(BatchEnd { total: m }))
            .await;
        // acme's stream: its hello, its own items blinded by its key, then ours re-blinded.
        let stream = job.conn.accept_uni().await.unwrap();
        let mut recv = cleanroom_transport::FramedRecv::new(stream);
        let mut theirs: std::collections::HashSet<[u8; 32]> = Default::default();
        let mut returned: Vec<[u8; 32]> = Vec::new();
        let mut ends = 0;
        while ends < 2 {
            let env = recv.recv().await.unwrap().expect("acme's stream goes on");
            match env.body {
                Some(Body::Points(b)) => {
                    for chunk in b.points.chunks(32) {
                        let point: [u8; 32] = chunk.try_into().unwrap();
                        if env.phase == Phase::PsiBlinded as i32 {
                            theirs.insert(point);
                        } else {
                            returned.push(point);
                        }
                    }
                }
                Some(Body::BatchEnd(_)) => ends += 1,
                _ => {}
            }
        }
        // k·r_i·H(x) for some i: unblind with every r_i and look for k·H(x) among acme's.
        let held: Vec<bool> = scalars
            .iter()
            .map(|r| {
                let inverse = r.invert();
                returned.iter().any(|q| {
                    let q = CompressedRistretto(*q).decompress().unwrap();
                    theirs.contains((inverse * q).compress().as_bytes())
                })
            })
            .collect();
        (held, returned.len())
    });
    c.wait_connected(&["mallory"]);
    let job_id = c.submit_nowait(&overlap_job("mallory,acme", "email", "overlap-reporting"));
    let (held, returned) = rt.block_on(attack).unwrap();
    assert_eq!(returned, candidates.len(), "acme returned every candidate");
    let truth: Vec<bool> = candidates.iter().map(|(_, held)| *held).collect();
    assert_eq!(held, truth, "mallory read the membership of each candidate");
    drop(rt);
    // The job itself ends without a result (mallory never finishes).
    let job = c.wait_job(&job_id, std::time::Duration::from_secs(120));
    assert_ne!(job["state"], "succeeded", "{job}");
}

/// The emails of node `name`'s synthetic CSV, in row order, trimmed and lower-cased.
fn read_emails(c: &Consortium, name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(c.path().join(format!("data/{name}.csv")))
        .expect("the node's synthetic data");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("a header").split(',').collect();
    let col = header
        .iter()
        .position(|h| *h == "email")
        .expect("an email column");
    lines
        .map(|l| {
            let email = l.split(',').nth(col).expect("an email field");
            email.trim().to_lowercase()
        })
        .collect()
}

/// A node with a `memory_limit` runs count-only jobs over spilled sets. Against a node without
/// one (the wire is the same), the overlap equals the truth; the node says what it spilled, and
/// its job's spill directory is gone when the job ends. A `match` spills too: the rows acme
/// learns are exactly its rows whose email globex holds.
#[test]
fn a_memory_limited_node_spills_counts_right_and_cleans_up() {
    let (mut c, truth) = Consortium::with_coordinator("acme,globex", 3000, 0.4, 77);
    let expected = truth["pairwise_overlap"]["acme,globex"].as_u64().unwrap();
    c.node_top
        .insert("acme".into(), "memory_limit = \"256MiB\"\n".into());
    c.start_open_pair();

    let (job, code) = c.submit(&cleanroom_e2e::overlap_between("acme,globex"));
    assert_eq!(code, Some(0), "{job}");
    assert_eq!(job["intersection"].as_u64(), Some(expected), "{job}");

    // Own points (written, then sorted and rewritten), the peer's, and the returned ones:
    // at least 32 bytes for each of 3000 + 3000 + 3000 points.
    let spilled = c.node("acme").spilled_bytes();
    assert!(
        matches!(spilled[..], [bytes] if bytes >= 9000 * 32),
        "acme's spills: {spilled:?}"
    );
    assert!(
        c.node("globex").spilled_bytes().is_empty(),
        "globex has no memory_limit and must not spill"
    );
    let spill_dir = c.path().join("state-acme/spill");
    assert!(spill_dir.is_dir(), "acme's spill directory was not made");
    let left: Vec<_> = std::fs::read_dir(&spill_dir).unwrap().collect();
    assert!(left.is_empty(), "the job's spill files were left: {left:?}");

    // A match spills as well, and finds its rows by the tags of what it matched.
    let (job, code) = c.submit(&cleanroom_e2e::psi_job(
        "match",
        "acme,globex",
        "email",
        "fraud-detection",
    ));
    assert_eq!(code, Some(0), "{job}");
    assert_eq!(job["intersection"].as_u64(), Some(expected), "{job}");
    assert_eq!(
        c.node("acme").spilled_bytes().len(),
        2,
        "acme's match did not spill"
    );
    let job_id = job["job_id"].as_str().unwrap();
    let globex: std::collections::HashSet<String> = read_emails(&c, "globex").into_iter().collect();
    let shared: Vec<u64> = (1..)
        .zip(read_emails(&c, "acme"))
        .filter(|(_, email)| globex.contains(email))
        .map(|(row, _)| row)
        .collect();
    assert_eq!(c.membership_rows("acme", job_id), shared);
    let left: Vec<_> = std::fs::read_dir(&spill_dir).unwrap().collect();
    assert!(
        left.is_empty(),
        "the match's spill files were left: {left:?}"
    );
}
