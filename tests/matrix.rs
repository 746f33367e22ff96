//! End to end: `cleanroom job submit overlap-matrix` over three real nodes, one of whose
//! agreements does not allow one of the others.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cleanroom_e2e::{Consortium, cleanroom, open_agreement};
use serde_json::Value;

fn matrix(c: &Consortium, format: &str, out: Option<&str>) -> std::process::Output {
    let mut args: Vec<String> = [
        "job",
        "submit",
        "overlap-matrix",
        "--parties",
        "acme,globex,initech",
        "--dataset",
        "customers",
        "--on",
        "email",
        "--purpose",
        "overlap-reporting",
        "--idempotency-key",
        "q3",
        "--timeout",
        "120",
        "--format",
        format,
    ]
    .map(String::from)
    .to_vec();
    if let Some(out) = out {
        args.extend(["--out".into(), out.into()]);
    }
    args.extend(c.analyst_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cleanroom(c.path(), &args)
}

#[test]
fn overlap_matrix_marks_forbidden_pairs() {
    let mut c = Consortium::new();
    let truth = c.synth("acme,globex,initech", 300, 0.4, 11);
    let expect = |pair: &str| truth["pairwise_overlap"][pair].as_u64().unwrap();
    c.start_coordinator();
    // initech has no agreement with globex: that pair is vetoed by initech's node.
    let agreements = [
        ("acme", vec!["globex", "initech"]),
        ("globex", vec!["acme", "initech"]),
        ("initech", vec!["acme"]),
    ];
    for (me, partners) in &agreements {
        c.issue_node(me);
        let text: String = partners.iter().map(|p| open_agreement(p)).collect();
        c.write_node_config(me, me, &text);
        c.start_node(me);
    }
    c.wait_connected(&["acme", "globex", "initech"]);

    let out = matrix(&c, "json", None);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        m["parties"],
        serde_json::json!(["acme", "globex", "initech"])
    );
    let cells = &m["cells"];
    for i in 0..3 {
        assert_eq!(cells[i][i]["status"], "self", "{m}");
    }
    for (i, j, pair) in [(0, 1, "acme,globex"), (0, 2, "acme,initech")] {
        for (a, b) in [(i, j), (j, i)] {
            assert_eq!(cells[a][b]["status"], "value", "{m}");
            assert_eq!(cells[a][b]["value"].as_u64(), Some(expect(pair)), "{m}");
        }
    }
    for (a, b) in [(1, 2), (2, 1)] {
        assert_eq!(cells[a][b]["status"], "forbidden", "{m}");
        let reason = cells[a][b]["reason"].as_str().unwrap();
        assert!(
            !reason.is_empty(),
            "a forbidden cell carries the reason: {m}"
        );
    }
    let pairs = m["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 3, "{m}");
    assert_eq!(pairs[2]["state"], "vetoed", "{m}");

    // The same key gives the same jobs; the other formats render the same matrix.
    let out = matrix(&c, "csv", None);
    assert!(out.status.success());
    let csv = String::from_utf8_lossy(&out.stdout);
    let ag = expect("acme,globex");
    let ai = expect("acme,initech");
    assert_eq!(
        csv.lines().collect::<Vec<_>>(),
        vec![
            "party,acme,globex,initech".to_owned(),
            format!("acme,-,{ag},{ai}"),
            format!("globex,{ag},-,forbidden"),
            format!("initech,{ai},forbidden,-"),
        ],
        "{csv}"
    );
    let out = matrix(&c, "table", None);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("globex × initech"), "{table}");
    assert!(table.contains("forbidden"), "{table}");
    let jobs_before: Vec<Value> = pairs.to_vec();
    let out = matrix(&c, "html", Some("matrix.html"));
    assert!(out.status.success());
    let html = std::fs::read_to_string(c.path().join("matrix.html")).unwrap();
    assert!(html.trim_end().ends_with("</html>"));
    assert_eq!(html.matches("class=\"cell value\"").count(), 4, "{html}");
    assert_eq!(
        html.matches("class=\"cell forbidden\"").count(),
        2,
        "{html}"
    );
    let again: Value =
        serde_json::from_str(&String::from_utf8_lossy(&matrix(&c, "json", None).stdout)).unwrap();
    for (a, b) in jobs_before.iter().zip(again["pairs"].as_array().unwrap()) {
        assert_eq!(a["job_id"], b["job_id"], "idempotent per pair");
    }
}
