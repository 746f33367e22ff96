//! End to end: what must be refused is refused, with a reason an analyst can read, and nothing
//! is read that should not be.

use std::time::Duration;

use cleanroom_e2e::{
    Consortium, OVERLAP, assert_no_dataset_loaded, cleanroom_ok, open_agreement, overlap_job,
    reason_of,
};

/// acme and globex, each with the open agreement toward the other, 500 rows each.
fn running_pair() -> Consortium {
    let (c, _) = Consortium::open_pair(500, 0.5, 3);
    c
}

#[test]
fn a_job_the_agreement_does_not_permit_is_vetoed_and_no_data_is_read() {
    let c = running_pair();

    // A purpose outside acme's agreement.
    let (job, code) = c.submit(&overlap_job("globex,acme", "email", "marketing"));
    assert_eq!(code, Some(2));
    let reason = reason_of(&job, "vetoed");
    assert!(
        reason.contains("marketing"),
        "reason names the purpose: {reason}"
    );
    assert!(
        reason.contains("acme"),
        "reason names who refused: {reason}"
    );

    // A join key the agreement does not allow.
    let (job, _) = c.submit(&overlap_job("acme,globex", "phone", "overlap-reporting"));
    assert_eq!(job["state"], "vetoed", "{job}");

    // Neither node read a row for either vetoed job.
    assert_no_dataset_loaded(&c, &["acme", "globex"]);
}

#[test]
fn a_job_with_an_offline_node_fails_with_a_readable_reason() {
    let mut c = running_pair();
    let (job, code) = c.submit(&overlap_job("acme,initech", "email", "overlap-reporting"));
    assert_eq!(code, Some(1));
    let reason = reason_of(&job, "failed");
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
    let (job, _) = c.submit(&OVERLAP);
    assert_eq!(job["state"], "failed", "{job}");
    assert!(job["reason"].as_str().unwrap().contains("globex"), "{job}");
}

#[test]
fn a_node_with_a_certificate_from_another_ca_is_refused() {
    let mut c = running_pair();
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
    let (job, _) = c.submit(&overlap_job("mallory,acme", "email", "overlap-reporting"));
    assert_eq!(job["state"], "failed", "{job}");
}

#[test]
fn garbage_on_the_data_plane_is_refused_and_the_node_keeps_serving() {
    use cleanroom_transport::{Identity, TransportTuning};
    let c = running_pair();
    // A legitimate certificate (globex's), but the bytes are garbage.
    let creds = c.credentials("node-globex");
    let data_addr = c.data_addr("acme");
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
    let (job, _) = c.submit(&overlap_job("globex,acme", "email", "overlap-reporting"));
    assert_eq!(job["state"], "succeeded", "{job}");
}
