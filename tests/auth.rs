//! End to end: authentication. Certificates that are expired or not yet valid, an analyst
//! certificate in a node's seat, a client without any certificate, and a valid node that no
//! agreement names — each is refused, and the refusal is logged or audited.

// Test-only code: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cleanroom_e2e::{Consortium, bins, open_agreement, overlap_between, reason_of};
use cleanroom_transport::{Identity, TransportTuning};
use serde_json::Value;
use time::OffsetDateTime;

/// A coordinator with acme and globex connected (each with an agreement naming the other).
fn running_pair() -> Consortium {
    let (c, _) = Consortium::open_pair(300, 0.5, 21);
    c
}

fn registered(c: &Consortium, name: &str) -> bool {
    c.nodes_json()
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["name"] == name)
}

fn coordinator_log(c: &Consortium) -> String {
    c.coordinator.as_ref().unwrap().log_text()
}

/// Waits (up to 20 s) for `needle` to appear in the coordinator's log.
fn wait_coordinator_log(c: &Consortium, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = coordinator_log(c);
        if log.contains(needle) || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Issues `node-<name>` into the consortium's pki dir with the given validity, writes its
/// config and starts it; then checks the coordinator refuses it at the handshake.
fn node_with_validity_is_refused(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    name: &str,
    expect: &str,
) {
    let mut c = running_pair();
    let pki = c.path().join("pki");
    cleanroom_transport::issue_with_validity(
        &pki,
        &Identity::node(name).unwrap(),
        &pki,
        not_before,
        not_after,
    )
    .unwrap();
    c.write_node_config(name, "acme", &open_agreement("acme"));
    let before = coordinator_log(&c)
        .matches("refused incoming connection")
        .count();
    c.start_node(name);
    let deadline = Instant::now() + Duration::from_secs(20);
    let log = loop {
        let log = coordinator_log(&c);
        if log.matches("refused incoming connection").count() > before || Instant::now() > deadline
        {
            break log;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused incoming connection"))
        .collect();
    assert!(
        refusals.len() > before,
        "the coordinator logged no handshake refusal for {name}:\n{log}"
    );
    assert!(
        refusals
            .iter()
            .any(|l| l.to_lowercase().contains(expect) && l.contains("127.0.0.1")),
        "the refusal names the reason ({expect}) and the remote address:\n{}",
        refusals.join("\n")
    );
    // Give it a few reconnection attempts: it is never registered.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!registered(&c, name), "{name} was registered");
    let (job, _) = c.submit(&overlap_between(&format!("{name},acme")));
    assert_eq!(job["state"], "failed", "{job}");
    assert!(
        job["reason"].as_str().unwrap().contains("not connected"),
        "{job}"
    );
    // The consortium is unaffected.
    let (job, _) = c.submit(&overlap_between("acme,globex"));
    assert_eq!(job["state"], "succeeded", "{job}");
}

#[test]
fn a_node_with_an_expired_certificate_is_refused_by_the_coordinator() {
    let now = OffsetDateTime::now_utc();
    node_with_validity_is_refused(
        now - time::Duration::days(30),
        now - time::Duration::days(1),
        "oldco",
        "expired",
    );
}

#[test]
fn a_node_with_a_not_yet_valid_certificate_is_refused_by_the_coordinator() {
    let now = OffsetDateTime::now_utc();
    node_with_validity_is_refused(
        now + time::Duration::days(1),
        now + time::Duration::days(30),
        "newco",
        "not valid yet",
    );
}

#[test]
fn an_analyst_certificate_cannot_act_as_a_node() {
    let c = running_pair();

    // 1. In a node's config: the node refuses to start, naming the mismatch.
    let cfg = c.write_node_config("impostor", "acme", &open_agreement("acme"));
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("pki/node-impostor.pem", "pki/analyst-alice.pem")
        .replace("pki/node-impostor.key", "pki/analyst-alice.key");
    std::fs::write(&cfg, text).unwrap();
    let mut child = Command::new(&bins().1)
        .args(["run", "--config"])
        .arg(&cfg)
        .arg("--stop-on-stdin-eof")
        .current_dir(c.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("a node with an analyst certificate kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("analyst") && err.contains("impostor"),
        "the error names the certificate's identity and the config's name: {err}"
    );
    assert!(!registered(&c, "impostor"));
    assert!(!registered(&c, "alice"));

    // 2. Driving the transport with the analyst's credentials against acme's data plane.
    let creds = c.credentials("analyst-alice");
    let addr = c.data_addr("acme");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reason = rt.block_on(async {
        let endpoint =
            cleanroom_transport::client_endpoint(&creds, &TransportTuning::default(), addr)
                .unwrap();
        let conn = cleanroom_transport::connect(&endpoint, addr, &Identity::node("acme").unwrap())
            .await
            .expect("the TLS handshake itself succeeds: the certificate is from the CA");
        // Try to talk; the node closes the connection.
        if let Ok(mut s) = conn.open_uni().await {
            let _ = s.write_all(b"hello").await;
            let _ = s.finish();
        }
        let closed = tokio::time::timeout(Duration::from_secs(15), conn.closed())
            .await
            .expect("acme did not close the analyst's connection");
        endpoint.wait_idle().await;
        match closed {
            quinn::ConnectionError::ApplicationClosed(a) => {
                String::from_utf8_lossy(&a.reason).into_owned()
            }
            other => other.to_string(),
        }
    });
    assert!(
        reason.contains("not a node certificate"),
        "close reason: {reason}"
    );
    let log = c.node("acme").log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("refused data-plane connection")
                && l.contains("not a node certificate")
                && l.contains("alice")),
        "acme logs the refusal:\n{log}"
    );
    // acme keeps serving.
    let (job, _) = c.submit(&overlap_between("globex,acme"));
    assert_eq!(job["state"], "succeeded", "{job}");
}

#[test]
fn a_client_without_a_certificate_is_refused_by_the_coordinator() {
    let c = running_pair();
    let addr = c.addr.unwrap();
    let before = coordinator_log(&c)
        .matches("refused incoming connection")
        .count();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_file_iter(c.path().join("pki/ca.pem"))
        .unwrap()
        .map(|c: Result<rustls_pki_types::CertificateDer<'static>, _>| c.unwrap())
    {
        roots.add(cert).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![cleanroom_transport::endpoint::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let outcome = rt.block_on(async {
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let dial = ep
            .connect_with(
                quinn::ClientConfig::new(Arc::new(quic)),
                addr,
                &Identity::coordinator().dns_name(),
            )
            .unwrap();
        let outcome = match tokio::time::timeout(Duration::from_secs(15), dial).await {
            Err(_) => Err("the handshake hung".to_owned()),
            Ok(Err(e)) => Ok(format!("handshake failed: {e}")),
            Ok(Ok(conn)) => {
                // TLS 1.3: the client may finish before the server has judged it; any request
                // must fail.
                let r = tokio::time::timeout(Duration::from_secs(15), async {
                    let (mut s, mut r) = conn.open_bi().await?;
                    s.write_all(&[0, 0, 0, 0]).await?;
                    let _ = s.finish();
                    let mut buf = [0u8; 1];
                    r.read_exact(&mut buf).await?;
                    anyhow::Ok(())
                })
                .await;
                match r {
                    Ok(Ok(())) => {
                        Err("the coordinator answered a client without a certificate".to_owned())
                    }
                    Ok(Err(e)) => Ok(format!("connection refused: {e}")),
                    Err(_) => Err("the connection stayed open".to_owned()),
                }
            }
        };
        ep.close(0u32.into(), b"");
        outcome
    });
    let outcome = outcome.unwrap();
    let log = wait_coordinator_log(&c, "certificate");
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused incoming connection"))
        .collect();
    assert!(
        refusals.len() > before
            && refusals
                .iter()
                .any(|l| l.to_lowercase().contains("certificate")),
        "the coordinator logs the refusal ({outcome}):\n{log}"
    );
    // The coordinator keeps serving.
    let (job, _) = c.submit(&overlap_between("acme,globex"));
    assert_eq!(job["state"], "succeeded", "{job}");
}

/// The event of an audit entry: either the entry itself or its `event` field.
fn event(e: &Value) -> &Value {
    if e.get("event").is_some_and(Value::is_object) {
        &e["event"]
    } else {
        e
    }
}

#[test]
fn a_valid_node_no_agreement_names_is_vetoed_and_audited() {
    let (mut c, _) = Consortium::with_coordinator("acme,initech", 300, 0.5, 22);
    c.issue_node("acme");
    c.issue_node("initech");
    // acme has an agreement with globex only; initech believes it has one with acme.
    c.write_node_config("acme", "acme", &open_agreement("globex"));
    c.write_node_config("initech", "initech", &open_agreement("acme"));
    c.start_node("acme");
    c.start_node("initech");
    c.wait_connected(&["acme", "initech"]);

    for pair in ["initech,acme", "acme,initech"] {
        let (job, code) = c.submit(&overlap_between(pair));
        assert_eq!(code, Some(2));
        let reason = reason_of(&job, "vetoed");
        assert!(
            reason.contains("acme") && reason.contains("no agreement with initech"),
            "{reason}"
        );
        let job_id = job["job_id"].as_str().or(job["id"].as_str()).unwrap();
        let entries = c.audit_entries("acme", None);
        let decision = entries
            .iter()
            .map(event)
            .find(|e| e["kind"] == "Decision" && e["job_id"] == job_id)
            .unwrap_or_else(|| panic!("no Decision for {job_id} in acme's audit log: {entries:?}"));
        assert_eq!(decision["accepted"], false, "{decision}");
        assert_eq!(decision["partner"], "initech", "{decision}");
        assert!(
            decision["reason"]
                .as_str()
                .unwrap()
                .contains("no agreement with initech"),
            "{decision}"
        );
        // No data was read for it.
        assert!(
            !entries
                .iter()
                .map(event)
                .any(|e| e["kind"] == "Access" && e["job_id"] == job_id),
            "acme read data for a vetoed job"
        );
    }
    assert!(!c.node("acme").log_text().contains("dataset loaded"));
}
