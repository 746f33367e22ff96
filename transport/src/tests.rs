//! Tests over real loopback sockets: PKI on disk in a tempdir, QUIC with mutual TLS, framing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cleanroom_proto::v1::envelope::Body;
use cleanroom_proto::v1::{Abort, Envelope, Phase, PointBatch};
use cleanroom_proto::{FrameError, MAX_FRAME_LEN};
use rustls_pki_types::pem::PemObject;
use tempfile::TempDir;

use super::*;

const T: Duration = Duration::from_secs(20);

struct Pki {
    _dir: TempDir,
    ca_dir: PathBuf,
    certs: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        Pki::named("Test Consortium")
    }

    fn named(consortium: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        init_ca(&ca_dir, consortium).unwrap();
        let certs = dir.path().join("certs");
        Pki {
            _dir: dir,
            ca_dir,
            certs,
        }
    }

    fn ca_cert(&self) -> PathBuf {
        self.ca_dir.join("ca.pem")
    }

    fn creds(&self, id: &Identity) -> Credentials {
        let p = issue(&self.ca_dir, id, &self.certs).unwrap();
        Credentials::load(&self.ca_cert(), &p.cert, &p.key).unwrap()
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn node(name: &str) -> Identity {
    Identity::node(name).unwrap()
}

fn server(creds: &Credentials) -> (quinn::Endpoint, SocketAddr) {
    let ep = server_endpoint(loopback(), creds, &TransportTuning::default()).unwrap();
    let addr = ep.local_addr().unwrap();
    (ep, addr)
}

type Accepted = Option<Result<(quinn::Connection, Identity), TransportError>>;

/// Accepts on `server_ep` while `client_ep` dials it.
async fn both(
    server_ep: &quinn::Endpoint,
    client_ep: &quinn::Endpoint,
    addr: SocketAddr,
    expected: &Identity,
) -> (Accepted, Result<quinn::Connection, TransportError>) {
    timed(async { tokio::join!(accept(server_ep), connect(client_ep, addr, expected)) }).await
}

async fn timed<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(T, f)
        .await
        .expect("test step timed out")
}

/// Runs a client handshake against `server_ep` and returns the server's accept result. The
/// client side must not end up with a usable connection.
async fn refused_at_server(
    server_ep: &quinn::Endpoint,
    client: impl std::future::Future<Output = Result<quinn::Connection, TransportError>>,
) -> String {
    let (accepted, dialed) = timed(async { tokio::join!(accept(server_ep), client) }).await;
    let err = match accepted.expect("endpoint open") {
        Ok((_, id)) => panic!("server accepted a connection from {id}"),
        Err(e) => e,
    };
    assert!(matches!(err, TransportError::Handshake { .. }), "{err:?}");
    // In TLS 1.3 the client may believe it is connected until the server's refusal arrives.
    if let Ok(conn) = dialed {
        let reason = timed(conn.closed()).await;
        assert!(conn.open_uni().await.is_err(), "closed: {reason}");
    }
    err.to_string()
}

#[tokio::test]
async fn node_to_node_and_node_to_coordinator() {
    let pki = Pki::new();
    let acme = pki.creds(&node("acme"));
    let globex = pki.creds(&node("globex"));
    let coord = pki.creds(&Identity::coordinator());
    assert_eq!(acme.identity().unwrap(), node("acme"));
    assert_eq!(coord.identity().unwrap(), Identity::coordinator());

    // Data plane: acme's own server endpoint dials globex's.
    let (acme_ep, _) = server(&acme);
    let (globex_ep, globex_addr) = server(&globex);
    let (accepted, dialed) = both(&globex_ep, &acme_ep, globex_addr, &node("globex")).await;
    let (server_conn, client_id) = accepted.unwrap().unwrap();
    let client_conn = dialed.unwrap();
    assert_eq!(client_id, node("acme"));
    assert_eq!(peer_identity(&server_conn).unwrap(), node("acme"));
    assert_eq!(peer_identity(&client_conn).unwrap(), node("globex"));
    assert_eq!(
        client_conn
            .handshake_data()
            .unwrap()
            .downcast::<quinn::crypto::rustls::HandshakeData>()
            .unwrap()
            .protocol
            .unwrap(),
        ALPN
    );

    // Control plane: acme dials the coordinator from a dial-only endpoint.
    let (coord_ep, coord_addr) = server(&coord);
    let dial_ep = client_endpoint(&acme, &TransportTuning::default(), coord_addr).unwrap();
    let (accepted, dialed) = both(&coord_ep, &dial_ep, coord_addr, &Identity::coordinator()).await;
    let (_, id) = accepted.unwrap().unwrap();
    assert_eq!(id, node("acme"));
    assert_eq!(id.role, PeerRole::Node);
    let conn = dialed.unwrap();
    let server_id = peer_identity(&conn).unwrap();
    assert_eq!(
        (server_id.role, server_id.name.as_str()),
        (PeerRole::Coordinator, "coordinator")
    );

    // An analyst too.
    let alice = pki.creds(&Identity::analyst("alice").unwrap());
    let dial_ep = client_endpoint(&alice, &TransportTuning::default(), coord_addr).unwrap();
    let (accepted, dialed) = both(&coord_ep, &dial_ep, coord_addr, &Identity::coordinator()).await;
    assert_eq!(
        accepted.unwrap().unwrap().1,
        Identity::analyst("alice").unwrap()
    );
    dialed.unwrap();

    // accept returns None once the endpoint is closed.
    coord_ep.close(0u32.into(), b"bye");
    assert!(timed(accept(&coord_ep)).await.is_none());
}

#[tokio::test]
async fn client_cert_from_another_ca_is_refused() {
    let pki = Pki::new();
    let (server_ep, addr) = server(&pki.creds(&node("globex")));

    // Another CA, and an impostor CA with the very same name as the real one.
    for (other, expected_reason) in [
        (Pki::named("Other Consortium"), "UnknownIssuer"),
        (Pki::new(), "BadSignature"),
    ] {
        // The intruder trusts the real CA (so it accepts the server) but its own certificate
        // comes from the other CA, with the identity of a real member.
        let p = issue(&other.ca_dir, &node("acme"), &other.certs).unwrap();
        let both_cas = other.certs.join("both.pem");
        let text = std::fs::read_to_string(other.ca_cert()).unwrap()
            + &std::fs::read_to_string(pki.ca_cert()).unwrap();
        std::fs::write(&both_cas, text).unwrap();
        let intruder = Credentials::load(&both_cas, &p.cert, &p.key).unwrap();
        let ep = client_endpoint(&intruder, &TransportTuning::default(), addr).unwrap();

        let reason = refused_at_server(&server_ep, connect(&ep, addr, &node("globex"))).await;
        assert!(reason.contains(expected_reason), "{reason}");
    }
}

#[tokio::test]
async fn expired_client_cert_is_refused() {
    let pki = Pki::new();
    let (server_ep, addr) = server(&pki.creds(&node("globex")));
    let now = time::OffsetDateTime::now_utc();
    let p = issue_with_validity(
        &pki.ca_dir,
        &node("acme"),
        &pki.certs,
        now - time::Duration::days(30),
        now - time::Duration::days(1),
    )
    .unwrap();
    // Loading an expired certificate works (with a warning): the peer is the one who refuses.
    let expired = Credentials::load(&pki.ca_cert(), &p.cert, &p.key).unwrap();
    let ep = client_endpoint(&expired, &TransportTuning::default(), addr).unwrap();

    let reason = refused_at_server(&server_ep, connect(&ep, addr, &node("globex"))).await;
    assert!(reason.to_lowercase().contains("expired"), "{reason}");
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let pki = Pki::new();
    let (server_ep, addr) = server(&pki.creds(&node("globex")));

    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(pki.ca_cert()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(crate::credentials::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let ep = quinn::Endpoint::client(loopback()).unwrap();
    let dial = async {
        let conn = ep
            .connect_with(
                quinn::ClientConfig::new(Arc::new(quic)),
                addr,
                "globex.node.cleanroom",
            )
            .unwrap()
            .await;
        conn.map_err(|e| TransportError::Stream(e.to_string()))
    };
    let reason = refused_at_server(&server_ep, dial).await;
    assert!(reason.to_lowercase().contains("certificate"), "{reason}");
}

#[tokio::test]
async fn wrong_expected_identity_fails() {
    let pki = Pki::new();
    let (server_ep, addr) = server(&pki.creds(&node("globex")));
    let acme = pki.creds(&node("acme"));
    let ep = client_endpoint(&acme, &TransportTuning::default(), addr).unwrap();

    for expected in [node("initech"), Identity::coordinator()] {
        let (accepted, dialed) = both(&server_ep, &ep, addr, &expected).await;
        let err = dialed.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, TransportError::Connect { .. }), "{err:?}");
        assert!(
            msg.contains(&expected.to_string()) && msg.contains(&addr.to_string()),
            "{msg}"
        );
        assert!(accepted.unwrap().is_err());
    }
}

#[tokio::test]
async fn nobody_listening_says_what_to_check() {
    let pki = Pki::new();
    let acme = pki.creds(&node("acme"));
    let tuning = TransportTuning {
        idle_timeout: Duration::from_millis(300),
        keep_alive: Duration::from_millis(100),
    };
    // A bound UDP socket nobody answers on.
    let silent = std::net::UdpSocket::bind(loopback()).unwrap();
    let addr = silent.local_addr().unwrap();
    let ep = client_endpoint(&acme, &tuning, addr).unwrap();
    let err = timed(connect(&ep, addr, &Identity::coordinator()))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("is coordinator running") && msg.contains(&addr.to_string()),
        "{msg}"
    );
}

#[test]
fn key_files_are_private_and_nothing_is_overwritten() {
    let pki = Pki::new();
    let p = issue(&pki.ca_dir, &node("acme"), &pki.certs).unwrap();
    assert_eq!(p.cert, pki.certs.join("node-acme.pem"));
    assert_eq!(p.key, pki.certs.join("node-acme.key"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in [&p.key, &pki.ca_dir.join("ca.key")] {
            let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
    }
    let before = std::fs::read(&p.key).unwrap();
    let err = issue(&pki.ca_dir, &node("acme"), &pki.certs).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&p.key).unwrap(), before);
    let err = init_ca(&pki.ca_dir, "again").unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");

    let c = issue(&pki.ca_dir, &Identity::coordinator(), &pki.certs).unwrap();
    assert_eq!(c.cert, pki.certs.join("coordinator.pem"));
    let a = issue(
        &pki.ca_dir,
        &Identity::analyst("alice").unwrap(),
        &pki.certs,
    )
    .unwrap();
    assert_eq!(a.key, pki.certs.join("analyst-alice.key"));
}

#[test]
fn load_errors_name_the_file_and_debug_hides_the_key() {
    let pki = Pki::new();
    let acme = issue(&pki.ca_dir, &node("acme"), &pki.certs).unwrap();
    let globex = issue(&pki.ca_dir, &node("globex"), &pki.certs).unwrap();

    let creds = Credentials::load(&pki.ca_cert(), &acme.cert, &acme.key).unwrap();
    let key_pem = std::fs::read_to_string(&acme.key).unwrap();
    let key_body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let dbg = format!("{creds:?}");
    assert!(
        dbg.contains("redacted") && !dbg.contains(&key_body[..20]),
        "{dbg}"
    );

    let check = |res: Result<Credentials, TransportError>, file: &Path, what: &str| {
        let msg = res.unwrap_err().to_string();
        assert!(
            msg.contains(&file.display().to_string()) && msg.contains(what),
            "{msg}"
        );
    };
    // Key of another certificate.
    check(
        Credentials::load(&pki.ca_cert(), &acme.cert, &globex.key),
        &globex.key,
        "does not belong",
    );
    // Missing file.
    let missing = pki.certs.join("nope.pem");
    check(
        Credentials::load(&pki.ca_cert(), &missing, &acme.key),
        &missing,
        "cannot read",
    );
    // A key where a certificate should be.
    check(
        Credentials::load(&pki.ca_cert(), &acme.key, &acme.key),
        &acme.key,
        "no PEM certificate",
    );
    // Certificate of another CA.
    let other = Pki::new();
    let o = issue(&other.ca_dir, &node("acme"), &other.certs).unwrap();
    check(
        Credentials::load(&pki.ca_cert(), &o.cert, &o.key),
        &o.cert,
        "CA",
    );
}

fn envelope(job: &str, phase: Phase, seq: u64, points: usize) -> Envelope {
    Envelope {
        job_id: job.into(),
        phase: phase as i32,
        body: Some(Body::Points(PointBatch {
            seq,
            points: vec![0xa5; points],
        })),
    }
}

fn big_len_probe(points: &[u8]) -> Envelope {
    let mut e = envelope("job-1", Phase::PsiBlinded, 2, 0);
    e.body = Some(Body::Points(PointBatch {
        seq: 2,
        points: points.to_vec(),
    }));
    e
}

/// A connected pair: (client-side connection, server-side connection).
async fn pair() -> (
    Pki,
    quinn::Connection,
    quinn::Connection,
    quinn::Endpoint,
    quinn::Endpoint,
) {
    let pki = Pki::new();
    let (server_ep, addr) = server(&pki.creds(&node("globex")));
    let client_ep =
        client_endpoint(&pki.creds(&node("acme")), &TransportTuning::default(), addr).unwrap();
    let (accepted, dialed) = both(&server_ep, &client_ep, addr, &node("globex")).await;
    let (server_conn, _) = accepted.unwrap().unwrap();
    (pki, dialed.unwrap(), server_conn, client_ep, server_ep)
}

#[tokio::test]
async fn framed_round_trip_including_a_frame_near_the_cap() {
    let (_pki, client, server, _e1, _e2) = pair().await;
    // Largest points payload that still fits the cap once the envelope's own fields are added.
    let mut big = envelope("job-1", Phase::PsiBlinded, 2, MAX_FRAME_LEN - 64);
    if let Some(Body::Points(p)) = &mut big.body {
        while prost::Message::encoded_len(&big_len_probe(&p.points)) < MAX_FRAME_LEN {
            p.points.push(0x5a);
        }
        if prost::Message::encoded_len(&big_len_probe(&p.points)) > MAX_FRAME_LEN {
            p.points.pop();
        }
    }
    assert_eq!(prost::Message::encoded_len(&big), MAX_FRAME_LEN);
    let sent = vec![
        envelope("job-1", Phase::PsiBlinded, 0, 32 * 4096),
        envelope("job-1", Phase::PsiBlinded, 1, 0),
        big,
        Envelope {
            job_id: "job-1".into(),
            phase: Phase::PsiDone as i32,
            body: Some(Body::Abort(Abort {
                reason: "done".into(),
            })),
        },
    ];

    let to_send = sent.clone();
    let sender = tokio::spawn(async move {
        let (mut tx, mut rx) = open_bi(&client).await.unwrap();
        for e in &to_send {
            tx.send(e).await.unwrap();
        }
        tx.finish().unwrap();
        // The reply proves the other direction works too.
        let reply = rx.recv_expect("job-1", Phase::PsiDone).await.unwrap();
        assert!(rx.recv().await.unwrap().is_none());
        tx.stopped().await.unwrap();
        reply
    });

    let (mut tx, mut rx) = timed(accept_bi(&server)).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(
            timed(rx.recv_expect("job-1", Phase::PsiBlinded))
                .await
                .unwrap(),
        );
    }
    // Wrong phase is named, not accepted.
    let last = timed(rx.recv()).await.unwrap().unwrap();
    assert!(matches!(
        cleanroom_proto::frame::check_envelope(&last, "job-1", Phase::PsiBlinded),
        Err(FrameError::WrongPhase { .. })
    ));
    got.push(last);
    assert!(
        timed(rx.recv()).await.unwrap().is_none(),
        "clean end of stream"
    );
    assert_eq!(got, sent);

    tx.send(&sent[3]).await.unwrap();
    tx.finish().unwrap();
    assert_eq!(timed(sender).await.unwrap(), sent[3]);
}

#[tokio::test]
async fn recv_expect_rejects_other_job_and_missing_frame() {
    let (_pki, client, server, _e1, _e2) = pair().await;
    let (mut tx, _rx) = open_bi(&client).await.unwrap();
    tx.send(&envelope("job-2", Phase::PsiBlinded, 0, 32))
        .await
        .unwrap();
    tx.finish().unwrap();
    let (_tx, mut rx) = timed(accept_bi(&server)).await.unwrap();
    let err = timed(rx.recv_expect("job-1", Phase::PsiBlinded))
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::Frame(FrameError::WrongJob { .. })),
        "{err:?}"
    );
    let err = timed(rx.recv_expect("job-1", Phase::PsiBlinded))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Closed { .. }), "{err:?}");
}

/// Writes `writes` raw on a new stream from `client` (then finishes it when `finish`), and
/// returns the error the framed receiver on `server` reports.
async fn recv_error_after_raw(
    client: &quinn::Connection,
    server: &quinn::Connection,
    writes: &[&[u8]],
    finish: bool,
) -> TransportError {
    let (mut raw, _rx) = client.open_bi().await.unwrap();
    for bytes in writes {
        raw.write_all(bytes).await.unwrap();
    }
    if finish {
        raw.finish().unwrap();
    }
    let (_tx, mut rx) = timed(accept_bi(server)).await.unwrap();
    timed(rx.recv()).await.unwrap_err()
}

#[tokio::test]
async fn oversized_length_prefix_is_refused_before_reading_the_body() {
    let (_pki, client, server, _e1, _e2) = pair().await;
    // Announce 4 GiB - 1 and send only a few bytes (without finishing): the receiver must not
    // wait for (or allocate) the body.
    let err = recv_error_after_raw(
        &client,
        &server,
        &[&u32::MAX.to_be_bytes(), &[1, 2, 3]],
        false,
    )
    .await;
    assert!(
        matches!(
            err,
            TransportError::Frame(FrameError::TooLong { len, max }) if len == u32::MAX as usize && max == MAX_FRAME_LEN
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn stream_ending_mid_frame_is_truncation() {
    let (_pki, client, server, _e1, _e2) = pair().await;
    // Inside the body, then inside the length prefix.
    for (bytes, buffered) in [(&[0, 0, 0, 9, 1][..], 5), (&[0, 0][..], 2)] {
        let err = recv_error_after_raw(&client, &server, &[bytes], true).await;
        assert!(
            matches!(
                err,
                TransportError::Frame(FrameError::Truncated { buffered: b }) if b == buffered
            ),
            "{err:?}"
        );
    }
}

/// The revocation of the certificate of `name` (in `role`, when it names one).
fn by_name(name: &str, role: Option<PeerRole>) -> pki::RevokeTarget {
    pki::RevokeTarget::Name {
        name: name.into(),
        role,
    }
}

/// Every file under `dir` (recursively) that holds a PEM private key.
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
    out
}

#[tokio::test]
async fn a_party_enrolled_by_request_holds_the_only_copy_of_its_key() {
    let pki = Pki::new();
    let home = tempfile::tempdir().unwrap();
    let req = pki::request(&node("acme"), home.path(), false).unwrap();
    assert_eq!(req.key, home.path().join("node-acme.key"));
    assert_eq!(req.csr, home.path().join("node-acme.csr"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&req.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    assert!(
        !std::fs::read_to_string(&req.csr)
            .unwrap()
            .contains("PRIVATE KEY")
    );

    let cert_path = home.path().join("node-acme.pem");
    let signed = pki::sign(&pki.ca_dir, &req.csr, &cert_path, pki::CERT_VALIDITY, false).unwrap();
    assert_eq!(signed.identity, node("acme"));
    assert_eq!(signed.key_fingerprint, req.key_fingerprint);
    assert_eq!(signed.serial.len(), 32, "{}", signed.serial);
    // The CA directory holds its own key and no other.
    assert_eq!(
        private_keys_under(&pki.ca_dir),
        vec![pki.ca_dir.join("ca.key")]
    );
    assert!(
        pki.ca_dir
            .join("issued")
            .join(format!("{}.pem", signed.serial))
            .exists()
    );
    let listed = pki::issued(&pki.ca_dir).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].serial, signed.serial);

    // The certificate works: acme dials globex with it.
    let acme = Credentials::load(&pki.ca_cert(), &cert_path, &req.key).unwrap();
    assert_eq!(acme.identity().unwrap(), node("acme"));
    assert_eq!(
        key_fingerprint(&acme.chain()[0]).unwrap(),
        req.key_fingerprint
    );
    let (globex_ep, addr) = server(&pki.creds(&node("globex")));
    let ep = client_endpoint(&acme, &TransportTuning::default(), addr).unwrap();
    let (accepted, dialed) = both(&globex_ep, &ep, addr, &node("globex")).await;
    assert_eq!(accepted.unwrap().unwrap().1, node("acme"));
    dialed.unwrap();

    // Never overwritten: a second request refuses (pointing at --renew), signing onto an
    // existing certificate refuses.
    let err = pki::request(&node("acme"), home.path(), false).unwrap_err();
    assert!(err.to_string().contains("--renew"), "{err}");
    let err = pki::sign(&pki.ca_dir, &req.csr, &cert_path, pki::CERT_VALIDITY, false).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    // A renewal keeps the key, so the fingerprint (and pins on it) stay.
    let renewed = pki::request(&node("acme"), home.path(), true).unwrap();
    assert!(renewed.reused_key);
    assert_eq!(renewed.key_fingerprint, req.key_fingerprint);
}

#[test]
fn the_ca_signs_only_one_identity_and_verifies_the_request() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.pem");
    let write_csr = |name: &str, sans: Vec<String>| {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(sans).unwrap();
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            params.serialize_request(&key).unwrap().pem().unwrap(),
        )
        .unwrap();
        path
    };
    for (csr, why) in [
        (
            write_csr(
                "two.csr",
                vec!["acme.node.cleanroom".into(), "globex.node.cleanroom".into()],
            ),
            "exactly one identity",
        ),
        (write_csr("none.csr", vec![]), "exactly one identity"),
        (
            write_csr("other.csr", vec!["www.example.com".into()]),
            "not a cleanroom identity",
        ),
    ] {
        let err = pki::sign(&pki.ca_dir, &csr, &out, pki::CERT_VALIDITY, false).unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
    }
    // A request whose signature does not verify (one byte of the key changed).
    let good = pki::request(&node("acme"), dir.path(), false).unwrap();
    let pem = std::fs::read_to_string(&good.csr).unwrap();
    let der =
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
    let mut bytes = der.as_ref().to_vec();
    let n = bytes.len();
    bytes[n - 10] ^= 1;
    let bad = dir.path().join("bad.csr");
    let b64 = rcgen_pem(&bytes);
    std::fs::write(&bad, b64).unwrap();
    let err = pki::sign(&pki.ca_dir, &bad, &out, pki::CERT_VALIDITY, false).unwrap_err();
    assert!(err.to_string().contains("certificate request"), "{err}");
    assert!(!out.exists());
}

/// PEM of a CSR's DER (base64 by hand: the test needs no extra crate).
fn rcgen_pem(der: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        lines.join("\n")
    )
}

/// Credentials loaded with the CA's CRL.
fn creds_with_crl(pki: &Pki, id: &Identity) -> Credentials {
    let p = issue(&pki.ca_dir, id, &pki.certs).unwrap();
    Credentials::load_files(TlsFiles {
        ca: pki.ca_cert(),
        cert: p.cert,
        key: p.key,
        crl: Some(pki.ca_dir.join("crl.pem")),
    })
    .unwrap()
}

#[tokio::test]
async fn a_revoked_client_is_refused_after_one_reload_and_its_open_connection_closed() {
    let pki = Pki::new();
    let globex = creds_with_crl(&pki, &node("globex"));
    assert_eq!(globex.revoked_entries(), 0);
    let (globex_ep, addr) = server(&globex);
    let acme = pki.creds(&node("acme"));
    let ep = client_endpoint(&acme, &TransportTuning::default(), addr).unwrap();

    // Before: accepted; the connection stays open.
    let (accepted, dialed) = both(&globex_ep, &ep, addr, &node("globex")).await;
    let (server_conn, _) = accepted.unwrap().unwrap();
    let client_conn = dialed.unwrap();
    globex.check_peer(&server_conn).unwrap();

    let revoked = pki::revoke(&pki.ca_dir, &by_name("acme", None)).unwrap();
    assert_eq!(revoked.newly.len(), 1);
    assert_eq!(pki::revocations(&pki.ca_dir).unwrap().len(), 1);
    // Revoking again changes nothing.
    let again = pki::revoke(&pki.ca_dir, &by_name("acme", Some(PeerRole::Node))).unwrap();
    assert_eq!((again.newly.len(), again.already), (0, 1));

    // The open connection: `until_untrusted` fires at the reload, naming the reason.
    let watcher = async { globex.until_untrusted(&server_conn).await };
    let (untrusted, reloaded) =
        timed(async { tokio::join!(watcher, async { globex.reload() }) }).await;
    assert!(reloaded.unwrap());
    assert_eq!(globex.revoked_entries(), 1);
    let msg = untrusted.to_string();
    assert!(
        msg.contains("node acme") && msg.contains("revoked"),
        "{msg}"
    );
    server_conn.close(CLOSE_UNTRUSTED, b"certificate revoked");
    timed(client_conn.closed()).await;

    // A new connection from the same client (same endpoint, so a session ticket could have
    // been reused) is refused at the handshake.
    let reason = refused_at_server(&globex_ep, connect(&ep, addr, &node("globex"))).await;
    assert!(reason.to_lowercase().contains("revoked"), "{reason}");
    // Another node is still welcome.
    let initech = pki.creds(&node("initech"));
    let ep2 = client_endpoint(&initech, &TransportTuning::default(), addr).unwrap();
    let (accepted, dialed) = both(&globex_ep, &ep2, addr, &node("globex")).await;
    assert_eq!(accepted.unwrap().unwrap().1, node("initech"));
    dialed.unwrap();
}

#[tokio::test]
async fn a_revoked_server_is_refused_by_its_client() {
    let pki = Pki::new();
    let (globex_ep, addr) = server(&pki.creds(&node("globex")));
    let acme = creds_with_crl(&pki, &node("acme"));
    pki::revoke(&pki.ca_dir, &by_name("globex", None)).unwrap();
    assert!(acme.reload().unwrap());
    let ep = client_endpoint(&acme, &TransportTuning::default(), addr).unwrap();
    let (_, dialed) = both(&globex_ep, &ep, addr, &node("globex")).await;
    let msg = dialed.unwrap_err().to_string();
    assert!(msg.to_lowercase().contains("revoked"), "{msg}");
}

#[tokio::test]
async fn reload_presents_a_renewed_certificate_and_keeps_the_last_good_files() {
    let pki = Pki::new();
    let home = tempfile::tempdir().unwrap();
    let req = pki::request(&node("globex"), home.path(), false).unwrap();
    let cert = home.path().join("node-globex.pem");
    let first = pki::sign(&pki.ca_dir, &req.csr, &cert, time::Duration::days(2), false).unwrap();
    let globex = Credentials::load_files(TlsFiles {
        ca: pki.ca_cert(),
        cert: cert.clone(),
        key: req.key.clone(),
        crl: Some(pki.ca_dir.join("crl.pem")),
    })
    .unwrap();
    let (globex_ep, addr) = server(&globex);
    let acme = pki.creds(&node("acme"));
    let ep = client_endpoint(&acme, &TransportTuning::default(), addr).unwrap();
    let serial_seen = |conn: &quinn::Connection| {
        let chain = conn
            .peer_identity()
            .unwrap()
            .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
            .unwrap();
        let (_, c) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
        pki_serial(c.raw_serial())
    };
    let (_, dialed) = both(&globex_ep, &ep, addr, &node("globex")).await;
    assert_eq!(serial_seen(&dialed.unwrap()), first.serial);
    assert!(!globex.reload().unwrap(), "nothing changed");

    // Renewal: same key, new certificate swapped in place; the running endpoint presents it.
    pki::request(&node("globex"), home.path(), true).unwrap();
    let second = pki::sign(&pki.ca_dir, &req.csr, &cert, pki::CERT_VALIDITY, true).unwrap();
    assert_ne!(second.serial, first.serial);
    assert!(globex.reload().unwrap());
    let (_, dialed) = both(&globex_ep, &ep, addr, &node("globex")).await;
    assert_eq!(serial_seen(&dialed.unwrap()), second.serial);

    // A broken file is not loaded: the last good certificate stays in use.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnope\n").unwrap();
    assert!(globex.reload().is_err());
    let (_, dialed) = both(&globex_ep, &ep, addr, &node("globex")).await;
    assert_eq!(serial_seen(&dialed.unwrap()), second.serial);
    // Nor a certificate for another identity.
    let other = issue(&pki.ca_dir, &node("initech"), &pki.certs).unwrap();
    std::fs::copy(&other.cert, &cert).unwrap();
    std::fs::copy(&other.key, &req.key).unwrap();
    let err = globex.reload().unwrap_err().to_string();
    assert!(err.contains("cannot change its identity"), "{err}");
    // Nor a CRL from another CA.
    let other_ca = Pki::named("Other");
    std::fs::copy(other_ca.ca_dir.join("crl.pem"), pki.ca_dir.join("crl.pem")).unwrap();
    let err = Credentials::load_files(TlsFiles {
        ca: pki.ca_cert(),
        cert: other.cert.clone(),
        key: other.key.clone(),
        crl: Some(pki.ca_dir.join("crl.pem")),
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("not from the CA"), "{err}");
}

fn pki_serial(raw: &[u8]) -> String {
    let start = raw.iter().position(|&b| b != 0).unwrap_or(raw.len());
    raw[start..].iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn revoke_by_name_needs_a_role_when_the_name_has_two() {
    let pki = Pki::new();
    issue(&pki.ca_dir, &node("sam"), &pki.certs).unwrap();
    issue(&pki.ca_dir, &Identity::analyst("sam").unwrap(), &pki.certs).unwrap();
    let sam = |role| by_name("sam", role);
    let err = pki::revoke(&pki.ca_dir, &sam(None)).unwrap_err();
    assert!(err.to_string().contains("--role"), "{err}");
    let r = pki::revoke(&pki.ca_dir, &sam(Some(PeerRole::Analyst))).unwrap();
    assert_eq!(r.newly.len(), 1);
    assert_eq!(r.newly[0].identity, Identity::analyst("sam").unwrap());
    let err = pki::revoke(&pki.ca_dir, &by_name("nobody", None)).unwrap_err();
    assert!(
        err.to_string()
            .contains("no certificate issued to 'nobody'"),
        "{err}"
    );
    // By serial: the node's one.
    let serial = pki::issued(&pki.ca_dir)
        .unwrap()
        .into_iter()
        .find(|c| c.identity == node("sam"))
        .unwrap()
        .serial;
    let r = pki::revoke(&pki.ca_dir, &pki::RevokeTarget::Serial(serial.clone())).unwrap();
    assert_eq!(r.newly[0].serial, serial);
    let listed: Vec<String> = pki::revocations(&pki.ca_dir)
        .unwrap()
        .into_iter()
        .map(|r| r.serial)
        .collect();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&serial));
    // The CRL number grows with each CRL.
    pki::refresh_crl(&pki.ca_dir).unwrap();
    assert_eq!(pki::revocations(&pki.ca_dir).unwrap().len(), 2);
}

#[tokio::test]
async fn a_revoked_client_is_told_its_certificate_is_revoked() {
    let pki = Pki::new();
    let coord = creds_with_crl(&pki, &Identity::coordinator());
    let (coord_ep, addr) = server(&coord);
    let bob = pki.creds(&Identity::analyst("bob").unwrap());
    pki::revoke(&pki.ca_dir, &by_name("bob", None)).unwrap();
    assert!(coord.reload().unwrap());
    let ep = client_endpoint(&bob, &TransportTuning::default(), addr).unwrap();
    let server = tokio::spawn(async move { accept(&coord_ep).await.map(|r| r.is_ok()) });
    // TLS 1.3: the client learns of the refusal at its first exchange.
    let conn = timed(connect(&ep, addr, &Identity::coordinator()))
        .await
        .unwrap();
    let (mut send, mut recv) = timed(open_bi(&conn)).await.unwrap();
    let _ = send.send(&Envelope::default()).await;
    let err = timed(recv.recv()).await.unwrap_err().to_string();
    assert!(
        err.contains("the peer refused our certificate: it is revoked by the consortium CA"),
        "{err}"
    );
    assert_eq!(server.await.unwrap(), Some(false));
}

#[tokio::test]
async fn sighup_reloads_at_once_and_a_change_is_seen_by_polling() {
    let pki = Pki::new();
    let globex = creds_with_crl(&pki, &node("globex"));
    // A poll far longer than the test: only SIGHUP can reload.
    let task = globex.spawn_reloader(Duration::from_secs(3600));
    issue(&pki.ca_dir, &node("acme"), &pki.certs).unwrap();
    pki::revoke(&pki.ca_dir, &by_name("acme", None)).unwrap();
    assert_eq!(globex.revoked_entries(), 0);
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    timed(async {
        while globex.revoked_entries() != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    task.abort();

    // Polling: a change is picked up within one poll.
    let task = globex.spawn_reloader(Duration::from_millis(100));
    issue(&pki.ca_dir, &node("initech"), &pki.certs).unwrap();
    pki::revoke(&pki.ca_dir, &by_name("initech", None)).unwrap();
    timed(async {
        while globex.revoked_entries() != 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    task.abort();
}
