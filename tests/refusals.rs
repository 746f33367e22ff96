//! End to end: what must be refused is refused, with a reason an analyst can read, and nothing
//! is read that should not be.

use std::time::Duration;

use cleanroom_e2e::{Consortium, cleanroom_ok, open_agreement};

fn running_pair(c: &mut Consortium, acme_agreement: &str) {
    c.synth("acme,globex", 500, 0.5, 3);
    c.start_coordinator();
    c.issue_node("acme");
    c.issue_node("globex");
    c.write_node_config("acme", "acme", acme_agreement);
    c.write_node_config("globex", "globex", &open_agreement("acme"));
    c.start_node("acme");
    c.start_node("globex");
    c.wait_connected(&["acme", "globex"]);
}

#[test]
fn a_job_the_agreement_does_not_permit_is_vetoed_and_no_data_is_read() {
    let mut c = Consortium::new();
    running_pair(&mut c, &open_agreement("globex"));

    // A purpose outside acme's agreement.
    let (job, code) = c.submit(&[
        "overlap",
        "--between",
        "globex,acme",
        "--dataset",
        "customers",
        "--on",
        "email",
        "--purpose",
        "marketing",
    ]);
    assert_eq!(job["state"], "vetoed", "{job}");
    assert_eq!(code, Some(2));
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains("marketing"),
        "reason names the purpose: {reason}"
    );
    assert!(
        reason.contains("acme"),
        "reason names who refused: {reason}"
    );

    // A join key the agreement does not allow.
    let (job, _) = c.submit(&[
        "overlap",
        "--between",
        "acme,globex",
        "--dataset",
        "customers",
        "--on",
        "phone",
        "--purpose",
        "overlap-reporting",
    ]);
    assert_eq!(job["state"], "vetoed", "{job}");

    // Neither node read a row for either vetoed job.
    std::thread::sleep(Duration::from_millis(200));
    for node in ["acme", "globex"] {
        let log = c.node(node).log_text();
        assert!(
            !log.contains("dataset loaded"),
            "{node} read data for a vetoed job:\n{log}"
        );
    }
}

#[test]
fn a_job_with_an_offline_node_fails_with_a_readable_reason() {
    let mut c = Consortium::new();
    running_pair(&mut c, &open_agreement("globex"));
    let (job, code) = c.submit(&[
        "overlap",
        "--between",
        "acme,initech",
        "--dataset",
        "customers",
        "--on",
        "email",
        "--purpose",
        "overlap-reporting",
    ]);
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(code, Some(1));
    let reason = job["reason"].as_str().unwrap();
    assert!(
        reason.contains("initech") && reason.contains("not connected"),
        "{reason}"
    );

    // A node that goes away: stop globex, and a job with it fails the same way.
    c.nodes
        .iter_mut()
        .find(|p| p.name == "globex")
        .unwrap()
        .stop();
    std::thread::sleep(Duration::from_millis(500));
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
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["reason"].as_str().unwrap().contains("globex"), "{job}");
}

#[test]
fn a_node_with_a_certificate_from_another_ca_is_refused() {
    let mut c = Consortium::new();
    running_pair(&mut c, &open_agreement("globex"));
    // Mallory has a CA of its own and calls itself acme-2; the coordinator must refuse it.
    cleanroom_ok(c.path(), &["pki", "init", "--dir", "rogue"]);
    cleanroom_ok(
        c.path(),
        &[
            "pki", "issue", "--dir", "rogue", "--out", "pki", "node", "mallory",
        ],
    );
    // It trusts both CAs (so it accepts the real coordinator) but presents the rogue cert.
    let bundle = [c.path().join("pki/ca.pem"), c.path().join("rogue/ca.pem")]
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect::<String>();
    std::fs::write(c.path().join("rogue/bundle.pem"), bundle).unwrap();
    let cfg = c.write_node_config("mallory", "acme", &open_agreement("acme"));
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("ca = \"pki/ca.pem\"", "ca = \"rogue/bundle.pem\"");
    std::fs::write(&cfg, text).unwrap();
    c.start_node("mallory");
    std::thread::sleep(Duration::from_secs(2));
    let nodes = c.nodes_json();
    assert!(
        !nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == "mallory"),
        "a node from another CA was registered: {nodes}"
    );
    let coordinator_log = c.coordinator.as_ref().unwrap().log_text();
    assert!(
        coordinator_log.to_lowercase().contains("handshake") || coordinator_log.contains("refused"),
        "the coordinator logs the refusal:\n{coordinator_log}"
    );
    let (job, _) = c.submit(&[
        "overlap",
        "--between",
        "mallory,acme",
        "--dataset",
        "customers",
        "--on",
        "email",
        "--purpose",
        "overlap-reporting",
    ]);
    assert_eq!(job["state"], "failed", "{job}");
}

#[test]
fn garbage_on_the_data_plane_is_refused_and_the_node_keeps_serving() {
    use cleanroom_transport::{Credentials, Identity, TransportTuning};
    let mut c = Consortium::new();
    running_pair(&mut c, &open_agreement("globex"));
    // A legitimate certificate (globex's), but the bytes are garbage.
    let creds = Credentials::load(
        &c.path().join("pki/ca.pem"),
        &c.path().join("pki/node-globex.pem"),
        &c.path().join("pki/node-globex.key"),
    )
    .unwrap();
    let acme_log = c.node("acme").log_text();
    let data_addr: std::net::SocketAddr = c
        .nodes_json()
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "acme")
        .and_then(|n| n["data_addr"].as_str())
        .unwrap()
        .parse()
        .unwrap();
    drop(acme_log);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let endpoint =
            cleanroom_transport::client_endpoint(&creds, &TransportTuning::default(), data_addr)
                .unwrap();
        for garbage in [
            vec![0xffu8; 64],
            vec![0, 0, 0, 5, 1, 2, 3, 4, 5],
            u32::MAX.to_be_bytes().to_vec(),
        ] {
            let conn = cleanroom_transport::connect(
                &endpoint,
                data_addr,
                &Identity::node("acme").unwrap(),
            )
            .await
            .unwrap();
            let mut s = conn.open_uni().await.unwrap();
            s.write_all(&garbage).await.unwrap();
            let _ = s.finish();
            // The node closes the connection with a refusal.
            let closed = tokio::time::timeout(Duration::from_secs(15), conn.closed()).await;
            assert!(closed.is_ok(), "the node did not close the connection");
        }
        endpoint.wait_idle().await;
    });
    assert!(
        c.node("acme")
            .log_text()
            .contains("refused data-plane connection")
    );
    // Still serving: a real job succeeds.
    let (job, _) = c.submit(&[
        "overlap",
        "--between",
        "globex,acme",
        "--dataset",
        "customers",
        "--on",
        "email",
        "--purpose",
        "overlap-reporting",
    ]);
    assert_eq!(job["state"], "succeeded", "{job}");
}
