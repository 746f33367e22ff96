//! End to end: partners hold their own keys. Enrolment by certificate request (the CA directory
//! never holds a party's key), renewal without a restart, revocation through the CA's CRL.

// Test-only code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use cleanroom_e2e::web::Https;
use cleanroom_e2e::{Consortium, OVERLAP, cleanroom, cleanroom_ok, open_agreement, overlap_job};

fn overlap(c: &Consortium) -> serde_json::Value {
    c.submit(&OVERLAP).0
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
    c.start_open_pair();
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

/// `cleanroom ARGS` with analyst `name`'s certificate from `keys/`.
fn as_analyst(c: &Consortium, name: &str, args: &[&str]) -> std::process::Output {
    // Connection flags right after the command word: a schedule's job words come last.
    let mut all: Vec<String> = vec![args[0].to_owned()];
    all.extend([
        "--coordinator".into(),
        c.addr.unwrap().to_string(),
        "--ca".into(),
        "pki/ca.pem".into(),
        "--cert".into(),
        format!("keys/analyst-{name}.pem"),
        "--key".into(),
        format!("keys/analyst-{name}.key"),
    ]);
    all.extend(args[1..].iter().map(|s| s.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    cleanroom(c.path(), &all)
}

/// Dials `node`'s data plane with the certificate and key in `keys/<stem>.*`; returns the
/// error the first exchange ends with (a refused client learns it there in TLS 1.3), or `None`
/// when the node kept the connection up.
fn data_plane_refusal(c: &Consortium, stem: &str, node: &str) -> Option<String> {
    use cleanroom_transport::{Identity, TransportTuning};
    let creds = c.credentials(stem);
    let addr = c.data_addr(node);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ep = cleanroom_transport::client_endpoint(&creds, &TransportTuning::default(), addr)
            .unwrap();
        let conn =
            match cleanroom_transport::connect(&ep, addr, &Identity::node(node).unwrap()).await {
                Ok(conn) => conn,
                Err(e) => return Some(e.to_string()),
            };
        let closed = tokio::time::timeout(std::time::Duration::from_secs(3), conn.closed()).await;
        closed.ok().map(|e| e.to_string())
    })
}

#[test]
fn a_revoked_node_and_analyst_are_refused_within_one_reload() {
    let mut c = Consortium::enrolled();
    c.crl = true;
    c.serve_web = true;
    c.synth("acme,globex", 200, 0.5, 32);
    c.start_coordinator();
    c.enrol(&["--role", "analyst", "--name", "bob"], "analyst-bob");
    c.start_open_pair();
    assert_eq!(overlap(&c)["state"], "succeeded");
    assert!(as_analyst(&c, "bob", &["nodes"]).status.success());
    let bob_web = Https::with_keys(c.path(), "keys", c.web.unwrap(), Some("analyst-bob"));
    assert_eq!(bob_web.get("/api/v1/nodes").status, 200);
    // Before: globex's certificate is welcome on acme's data plane.
    assert_eq!(data_plane_refusal(&c, "node-globex", "acme"), None);
    let acme_data = c.data_addr("acme");

    let out = cleanroom_ok(c.path(), &["pki", "revoke", "--dir", "pki", "globex"]);
    assert!(out.contains("revoked node globex"), "{out}");
    cleanroom_ok(c.path(), &["pki", "revoke", "--dir", "pki", "bob"]);
    // One reload: SIGHUP to each process (they also poll the file every second).
    c.coordinator.as_ref().unwrap().hang_up();
    for n in ["acme", "globex"] {
        c.node(n).hang_up();
    }

    // Control plane: the coordinator closes globex's open connection and refuses it since.
    c.wait_disconnected("globex", std::time::Duration::from_secs(10));
    let log = c.coordinator.as_ref().unwrap().log_text();
    assert!(
        log.contains("node globex is no longer trusted: its certificate is revoked"),
        "{log}"
    );
    // Data plane: acme refuses globex's certificate at the handshake.
    let refusal = data_plane_refusal(&c, "node-globex", "acme").expect("refused");
    assert!(refusal.to_lowercase().contains("revoked"), "{refusal}");
    let _ = acme_data;
    // The analyst: refused with a message that says why.
    let out = as_analyst(&c, "bob", &["nodes"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the peer refused our certificate: it is revoked by the consortium CA"),
        "{err}"
    );
    // The web console checks the same CRL at every connection: bob gets no answer at all.
    let web = bob_web.try_get("/api/v1/nodes");
    assert!(
        web.is_err(),
        "bob's revoked certificate was answered: {web:?}"
    );
    // Alice is unaffected; a job with globex fails naming it.
    let job = overlap(&c);
    assert_ne!(job["state"], "succeeded", "{job}");
    assert!(job.to_string().contains("globex"), "{job}");
}

/// `as_analyst`, expecting failure: the error text.
fn refused(c: &Consortium, name: &str, args: &[&str]) -> String {
    let out = as_analyst(c, name, args);
    assert!(
        !out.status.success(),
        "{name} {args:?} was allowed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn allowed(c: &Consortium, name: &str, args: &[&str]) -> String {
    let out = as_analyst(c, name, args);
    assert!(
        out.status.success(),
        "{name} {args:?} was refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bob_can_neither_see_nor_touch_alices_jobs_and_schedules() {
    let mut c = Consortium::enrolled();
    c.coordinator_extra = "[[role]]\nname = \"auditors\"\ngrants = [\"read-all\"]\nanalysts = [\"carol\"]\n\n\
                           [[role]]\nname = \"ops\"\ngrants = [\"schedule-admin\"]\nanalysts = [\"sched\"]\n"
        .into();
    c.synth("acme,globex", 200, 0.5, 33);
    c.start_coordinator();
    for who in ["bob", "carol", "sched"] {
        c.enrol(
            &["--role", "analyst", "--name", who],
            &format!("analyst-{who}"),
        );
    }
    c.start_open_pair();

    // alice's job (vetoed: an unknown purpose, so it can be retried) and schedule.
    let job_args = overlap_job("acme,globex", "email", "marketing");
    let (job, _) = c.submit(&job_args);
    assert_eq!(job["state"], "vetoed", "{job}");
    let job_id = job["job_id"].as_str().unwrap().to_owned();
    let mut add = vec!["schedule", "add", "nightly", "--cron", "0 2 * * *", "--"];
    add.extend(OVERLAP);
    allowed(&c, "alice", &add);

    // bob: refused, and told whose it is and what would allow it.
    let err = refused(&c, "bob", &["job", "status", &job_id]);
    assert!(
        err.contains(&format!(
            "analyst bob may not see job {job_id}: it belongs to analyst alice"
        )) && err.contains("read-all or admin"),
        "{err}"
    );
    let err = refused(&c, "bob", &["job", "retry", &job_id]);
    assert!(
        err.contains(&format!(
            "analyst bob may not act on job {job_id}: it belongs to analyst alice"
        )),
        "{err}"
    );
    for verb in ["pause", "resume", "remove", "run-now"] {
        let err = refused(&c, "bob", &["schedule", verb, "nightly"]);
        assert!(
            err.contains(
                "analyst bob may not act on schedule nightly: it belongs to analyst alice"
            ) && err.contains("schedule-admin or admin"),
            "{verb}: {err}"
        );
    }
    let err = refused(&c, "bob", &["schedule", "show", "nightly"]);
    assert!(
        err.contains("analyst bob may not see schedule nightly"),
        "{err}"
    );
    let err = refused(&c, "bob", &["report", "nightly", "--format", "json"]);
    assert!(
        err.contains("analyst bob may not see schedule nightly"),
        "{err}"
    );
    // Listings show bob nothing of alice's.
    let jobs = allowed(&c, "bob", &["job", "list", "--format", "json"]);
    assert!(!jobs.contains(&job_id), "{jobs}");
    let schedules = allowed(&c, "bob", &["schedule", "list", "--format", "json"]);
    assert!(!schedules.contains("nightly"), "{schedules}");
    // The schedule is untouched.
    let shown = allowed(
        &c,
        "alice",
        &["schedule", "show", "nightly", "--format", "json"],
    );
    assert!(
        shown.contains("\"paused\": false") || shown.contains("\"paused\":false"),
        "{shown}"
    );

    // carol (read-all) sees everything and acts on nothing of alice's.
    allowed(&c, "carol", &["job", "status", &job_id]);
    assert!(allowed(&c, "carol", &["job", "list", "--format", "json"]).contains(&job_id));
    assert!(allowed(&c, "carol", &["schedule", "list", "--format", "json"]).contains("nightly"));
    refused(&c, "carol", &["job", "retry", &job_id]);
    refused(&c, "carol", &["schedule", "pause", "nightly"]);
    // sched (schedule-admin) acts on alice's schedule, not on her one-off job.
    allowed(&c, "sched", &["schedule", "pause", "nightly"]);
    refused(&c, "sched", &["job", "status", &job_id]);
    // alice acts on her own.
    allowed(&c, "alice", &["schedule", "resume", "nightly"]);
    allowed(&c, "alice", &["job", "retry", &job_id]);

    // The spec names the analyst from the certificate, whatever the request says: bob's
    // request naming alice is stored (and offered to the nodes) as bob's.
    let stored = submit_claiming(&c, "bob", "alice");
    assert_eq!(stored["analyst"], "bob", "{stored}");
    assert_eq!(stored["submitted_by"], "bob", "{stored}");
    let shown = allowed(&c, "alice", &["job", "status", &job_id, "--format", "json"]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["analyst"], "alice", "{shown}");
}

/// Submits an overlap job as analyst `who` (its certificate) with a spec that names `claimed`
/// as the analyst, through the raw analyst API; returns the job as `job status` prints it.
fn submit_claiming(c: &Consortium, who: &str, claimed: &str) -> serde_json::Value {
    use cleanroom_proto::v1::analyst_request::Request;
    use cleanroom_proto::v1::analyst_response::Response;
    use cleanroom_proto::v1::envelope::Body;
    use cleanroom_proto::v1::{
        AnalystRequest, Envelope, JobKind, JobSpec, PartySpec, Phase, SubmitJob,
    };
    use cleanroom_transport::{Identity, TransportTuning};
    let creds = c.credentials(&format!("analyst-{who}"));
    let addr = c.addr.unwrap();
    let party = |node: &str| PartySpec {
        node: node.into(),
        dataset: "customers".into(),
        keys: vec!["email".into()],
        learns_membership: false,
    };
    let spec = JobSpec {
        kind: JobKind::Overlap as i32,
        parties: vec![party("acme"), party("globex")],
        purpose: "overlap-reporting".into(),
        analyst: claimed.into(),
        ..JobSpec::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job_id = rt.block_on(async {
        let ep = cleanroom_transport::client_endpoint(&creds, &TransportTuning::default(), addr)
            .unwrap();
        let conn = cleanroom_transport::connect(&ep, addr, &Identity::coordinator())
            .await
            .unwrap();
        let (mut send, mut recv) = cleanroom_transport::open_bi(&conn).await.unwrap();
        send.send(&Envelope {
            job_id: String::new(),
            phase: Phase::Analyst as i32,
            body: Some(Body::AnalystRequest(AnalystRequest {
                request: Some(Request::Submit(SubmitJob {
                    spec: Some(spec),
                    idempotency_key: String::new(),
                })),
            })),
        })
        .await
        .unwrap();
        let reply = recv.recv().await.unwrap().unwrap();
        let Some(Body::AnalystResponse(r)) = reply.body else {
            panic!("{reply:?}")
        };
        match r.response {
            Some(Response::Job(info)) => info.job_id,
            other => panic!("{other:?}"),
        }
    });
    let out = allowed(c, who, &["job", "status", &job_id, "--format", "json"]);
    serde_json::from_str(&out).unwrap()
}

fn node_cli(c: &Consortium, args: &[&str]) -> std::process::Output {
    cleanroom_e2e::cleanroom_node(c.path(), args)
}

/// The key fingerprint `pki show` prints for a certificate.
fn fingerprint(c: &Consortium, cert: &str) -> String {
    let show = cleanroom_ok(c.path(), &["pki", "show", cert]);
    show.lines()
        .find_map(|l| l.strip_prefix("key fingerprint: "))
        .unwrap()
        .to_owned()
}

/// `open_agreement(partner)` with extra lines in its `[[agreement]]` table.
fn agreement_with(partner: &str, extra: &str) -> String {
    open_agreement(partner).replacen(
        &format!("partner = \"{partner}\"\n"),
        &format!("partner = \"{partner}\"\n{extra}"),
        1,
    )
}

#[test]
fn a_second_certificate_for_globex_is_refused_by_acmes_pin() {
    let mut c = Consortium::enrolled();
    c.synth("acme,globex", 200, 0.5, 34);
    c.start_coordinator();
    c.enrol_node("globex");
    let pin = fingerprint(&c, "keys/node-globex.pem");
    c.start_pair(&agreement_with(
        "globex",
        &format!("partner_key = \"{pin}\"\n"),
    ));
    let acme_cfg = c.path().join("acme.toml");
    // The pinned partner runs jobs; `policy check` prints the pin.
    assert_eq!(overlap(&c)["state"], "succeeded");
    let check = node_cli(&c, &["policy", "check", acme_cfg.to_str().unwrap()]);
    let check_text = String::from_utf8_lossy(&check.stdout);
    assert!(check_text.contains(&pin), "{check_text}");

    // The CA signs a second certificate for globex, for another key (an impostor's machine).
    std::fs::create_dir_all(c.path().join("rogue")).unwrap();
    cleanroom_ok(
        c.path(),
        &[
            "pki", "request", "--role", "node", "--name", "globex", "--out", "rogue",
        ],
    );
    let signed = cleanroom_ok(
        c.path(),
        &["pki", "sign", "--dir", "pki", "rogue/node-globex.csr"],
    );
    assert!(signed.contains("another key"), "{signed}");
    std::fs::copy(
        c.path().join("rogue/node-globex.pem"),
        c.path().join("keys/rogue-globex.pem"),
    )
    .unwrap();
    std::fs::copy(
        c.path().join("rogue/node-globex.key"),
        c.path().join("keys/rogue-globex.key"),
    )
    .unwrap();
    let refusal = data_plane_refusal(&c, "rogue-globex", "acme").expect("refused");
    assert!(refusal.contains("pin"), "{refusal}");
    // Audited by acme, with both fingerprints.
    let log = c.audit_entries("acme", None);
    let rogue_pin = fingerprint(&c, "rogue/node-globex.pem");
    assert!(
        log.iter().any(|e| {
            let e = e.to_string();
            e.contains(&rogue_pin) && e.contains(&pin)
        }),
        "{log:?}"
    );
    // The real globex still works.
    assert_eq!(overlap(&c)["state"], "succeeded");
}

#[test]
fn an_agreement_naming_alice_vetoes_bobs_job() {
    let mut c = Consortium::enrolled();
    c.synth("acme,globex", 200, 0.5, 35);
    c.start_coordinator();
    c.enrol(&["--role", "analyst", "--name", "bob"], "analyst-bob");
    c.start_pair(&agreement_with("globex", "analysts = [\"alice\"]\n"));
    let acme_cfg = c.path().join("acme.toml");
    assert_eq!(overlap(&c)["state"], "succeeded");
    let out = as_analyst(
        &c,
        "bob",
        &[
            &["job", "submit"][..],
            &OVERLAP,
            &["--wait", "--format", "json"],
        ]
        .concat(),
    );
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(job["state"], "vetoed", "{job}");
    let reason = job.to_string();
    assert!(
        reason.contains("analyst bob") && reason.contains("alice"),
        "{reason}"
    );
    let check = node_cli(&c, &["policy", "check", acme_cfg.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&check.stdout).contains("alice"));
    let log = c.audit_entries("acme", None);
    assert!(
        log.iter().any(|e| e.to_string().contains("analyst bob")),
        "{log:?}"
    );
}

#[test]
fn a_rewritten_audit_suffix_is_detected_against_the_coordinators_heads() {
    let mut c = Consortium::enrolled();
    c.coordinator_extra =
        "[[role]]\nname = \"auditors\"\ngrants = [\"read-all\"]\nanalysts = [\"carol\"]\n".into();
    c.synth("acme,globex", 200, 0.5, 36);
    c.start_coordinator();
    c.enrol(&["--role", "analyst", "--name", "carol"], "analyst-carol");
    c.start_open_pair();
    for _ in 0..3 {
        assert_eq!(overlap(&c)["state"], "succeeded");
    }
    // alice may not export heads; carol (read-all) may.
    let heads = c.path().join("heads.jsonl");
    let err = refused(&c, "alice", &["audit-heads", "--node", "acme"]);
    assert!(err.contains("read-all or admin"), "{err}");
    allowed(
        &c,
        "carol",
        &[
            "audit-heads",
            "--node",
            "acme",
            "--out",
            heads.to_str().unwrap(),
        ],
    );
    let lines = std::fs::read_to_string(&heads).unwrap();
    assert!(lines.lines().count() >= 6, "{lines}");
    let cfg = c.path().join("acme.toml");
    let cfg_arg = cfg.to_str().unwrap();
    let heads_arg = heads.to_str().unwrap();
    let ok = node_cli(
        &c,
        &["audit", "verify", "--config", cfg_arg, "--heads", heads_arg],
    );
    assert!(ok.status.success(), "{ok:?}");

    // Stop acme and rewrite, consistently, the three entries up to the latest head it
    // reported (and every entry after them): each hash recomputed, the head file rewritten.
    // The log still verifies on its own.
    c.nodes
        .iter_mut()
        .find(|p| p.name == "acme")
        .unwrap()
        .stop();
    let reported: u64 = lines
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let head = v["head"].as_str().unwrap().to_owned();
            head.split(':').next().unwrap().parse::<u64>().unwrap()
        })
        .max()
        .unwrap();
    let log_path = c.path().join("state-acme/audit.log");
    let mut entries: Vec<cleanroom_node::audit::AuditEntry> =
        cleanroom_node::audit::read_entries(&log_path).unwrap();
    let first = usize::try_from(reported).unwrap() - 3;
    for i in first..entries.len() {
        if i > first {
            entries[i].prev = entries[i - 1].hash;
        }
        entries[i].at_ms += 1;
        entries[i].hash = entries[i].compute_hash();
    }
    let rewritten: String = entries
        .iter()
        .map(|e| format!("{}\n", e.to_json_line()))
        .collect();
    std::fs::write(&log_path, rewritten).unwrap();
    let last = entries.last().unwrap();
    std::fs::write(
        c.path().join("state-acme/audit.log.head"),
        format!(
            "{}:{}\n",
            last.seq,
            cleanroom_node::audit::to_hex(&last.hash)
        ),
    )
    .unwrap();
    let alone = node_cli(&c, &["audit", "verify", "--config", cfg_arg]);
    assert!(
        alone.status.success(),
        "the rewrite is consistent on its own: {alone:?}"
    );
    // Against the coordinator's heads: detected, naming the first rewritten entry.
    let against = node_cli(
        &c,
        &["audit", "verify", "--config", cfg_arg, "--heads", heads_arg],
    );
    let out = String::from_utf8_lossy(&against.stdout);
    assert!(!against.status.success(), "{out}");
    assert!(out.contains(&format!("seq {}", first + 1)), "{out}");
}
