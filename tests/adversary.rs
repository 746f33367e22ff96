//! End to end with a hostile peer: a node with a valid certificate that joins a job and then
//! sends points that do not decode. The honest node must end the job with a named error, the
//! analyst must see the reason, and the honest node must keep serving.

// Test-only code: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use cleanroom_e2e::{Consortium, open_agreement};
use cleanroom_proto::v1::{
    BatchEnd, Envelope, HelloAck, NodeHello, OfferReply, Phase, PointBatch, PsiHello, Ready,
    envelope::Body,
};
use cleanroom_transport::{Credentials, Identity, TransportTuning};

/// What mallory sends as its blinded points.
#[derive(Clone, Copy)]
enum Poison {
    /// 32 bytes of 0xff: not a canonical field element, does not decode.
    Undecodable,
    /// The identity point (all zeros), which a blinded point can never be.
    Identity,
    /// More points than it declared.
    TooMany,
}

/// Plays node "mallory" for one job: registers with the coordinator, accepts the offer, dials
/// the responder and sends poisoned points.
async fn mallory(dir: std::path::PathBuf, coordinator: SocketAddr, poison: Poison) {
    let creds = Credentials::load(
        &dir.join("pki/ca.pem"),
        &dir.join("pki/node-mallory.pem"),
        &dir.join("pki/node-mallory.key"),
    )
    .unwrap();
    let endpoint = cleanroom_transport::server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &creds,
        &TransportTuning::default(),
    )
    .unwrap();
    let control = cleanroom_transport::connect(&endpoint, coordinator, &Identity::coordinator())
        .await
        .unwrap();
    let (mut send, mut recv) = cleanroom_transport::open_bi(&control).await.unwrap();
    send.send(&Envelope {
        job_id: String::new(),
        phase: Phase::Hello as i32,
        body: Some(Body::NodeHello(NodeHello {
            node_name: "mallory".into(),
            data_addr: endpoint.local_addr().unwrap().to_string(),
            software_version: "evil".into(),
        })),
    })
    .await
    .unwrap();
    let ack = recv.recv().await.unwrap().unwrap();
    assert!(matches!(ack.body, Some(Body::HelloAck(HelloAck { .. }))));

    // The job stream: offer → accept → start → ready.
    let (mut jsend, mut jrecv) = cleanroom_transport::accept_bi(&control).await.unwrap();
    let offer = jrecv.recv().await.unwrap().unwrap();
    let job_id = offer.job_id.clone();
    let Some(Body::Offer(offer)) = offer.body else {
        panic!("expected an offer")
    };
    let spec = offer.spec.unwrap();
    jsend
        .send(&Envelope {
            job_id: job_id.clone(),
            phase: Phase::Offer as i32,
            body: Some(Body::OfferReply(OfferReply {
                accept: true,
                reason: String::new(),
            })),
        })
        .await
        .unwrap();
    let start = jrecv.recv().await.unwrap().unwrap();
    let Some(Body::Start(start)) = start.body else {
        panic!("expected start")
    };
    jsend
        .send(&Envelope {
            job_id: job_id.clone(),
            phase: Phase::Start as i32,
            body: Some(Body::Ready(Ready {})),
        })
        .await
        .unwrap();

    // The data plane, with a correct hello and poisoned points.
    let peer: SocketAddr = start.peer_addr.parse().unwrap();
    let conn = cleanroom_transport::connect(&endpoint, peer, &Identity::node("acme").unwrap())
        .await
        .unwrap();
    let mut data = cleanroom_transport::FramedSend::new(conn.open_uni().await.unwrap());
    let frame = |phase: Phase, body: Body| Envelope {
        job_id: job_id.clone(),
        phase: phase as i32,
        body: Some(body),
    };
    let declared = 4u64;
    data.send(&frame(
        Phase::PsiSize,
        Body::PsiHello(PsiHello {
            sender: "mallory".into(),
            set_size: declared,
            spec_digest: cleanroom_node::psi_job::spec_digest(&job_id, &spec).to_vec(),
        }),
    ))
    .await
    .unwrap();
    let points: Vec<u8> = match poison {
        Poison::Undecodable => vec![0xff; 32 * declared as usize],
        Poison::Identity => vec![0; 32 * declared as usize],
        Poison::TooMany => {
            // Valid points (the ristretto basepoint's encoding), but twice as many as declared.
            let base = curve_basepoint();
            base.iter()
                .cycle()
                .take(32 * 2 * declared as usize)
                .copied()
                .collect()
        }
    };
    let _ = data
        .send(&frame(
            Phase::PsiBlinded,
            Body::Points(PointBatch { seq: 0, points }),
        ))
        .await;
    let _ = data
        .send(&frame(
            Phase::PsiBlinded,
            Body::BatchEnd(BatchEnd { total: declared }),
        ))
        .await;
    // Keep the connection open until acme gives up on us.
    let _ = tokio::time::timeout(Duration::from_secs(60), conn.closed()).await;
}

/// The compressed ristretto255 basepoint (RFC 9496).
fn curve_basepoint() -> [u8; 32] {
    let hex = "e2f2ae0a6abc4e71a884a961c500515f58e30b6aa582dd8db6a65945e08d2d76";
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}

#[test]
fn poisoned_points_end_the_job_with_a_named_error_and_the_node_keeps_serving() {
    let mut c = Consortium::new();
    c.synth("acme,globex", 300, 0.5, 5);
    let coordinator = c.start_coordinator();
    for name in ["acme", "globex", "mallory"] {
        c.issue_node(name);
    }
    let acme_agreements = format!("{}{}", open_agreement("globex"), open_agreement("mallory"));
    c.write_node_config("acme", "acme", &acme_agreements);
    c.write_node_config("globex", "globex", &open_agreement("acme"));
    c.start_node("acme");
    c.start_node("globex");
    c.wait_connected(&["acme", "globex"]);

    let rt = tokio::runtime::Runtime::new().unwrap();
    for (poison, expect) in [
        (Poison::Undecodable, "not a valid ristretto255 encoding"),
        (Poison::Identity, "identity"),
        (Poison::TooMany, "declared 4 points but has sent 8"),
    ] {
        let evil = rt.spawn(mallory(c.path().to_owned(), coordinator, poison));
        c.wait_connected(&["mallory"]);
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
        let reason = job["reason"].as_str().unwrap().to_lowercase();
        assert!(
            reason.contains("mallory") && reason.contains(expect),
            "reason names the violation ({expect}): {reason}"
        );
        rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(30), evil).await;
        });
        // acme is still up and serves an honest job.
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
    let log = c.node("acme").log_text();
    assert!(!log.contains("panicked"), "acme panicked:\n{log}");
}
