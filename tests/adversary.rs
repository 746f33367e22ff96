//! End to end with a hostile peer: a node with a valid certificate that joins a job and then
//! sends points that do not decode. The honest node must end the job with a named error, the
//! analyst must see the reason, and the honest node must keep serving.

// Test-only code: a failed step is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use cleanroom_e2e::fake_node::{self, BASEPOINT};
use cleanroom_e2e::{Consortium, open_agreement};

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

/// Plays node "mallory" for one job: joins it as initiator and sends poisoned points.
async fn mallory(dir: std::path::PathBuf, coordinator: SocketAddr, poison: Poison) {
    let declared = 4u64;
    let mut job = fake_node::join_next_job(&dir, coordinator, "mallory", "acme", declared).await;
    let points: Vec<u8> = match poison {
        Poison::Undecodable => vec![0xff; 32 * declared as usize],
        Poison::Identity => vec![0; 32 * declared as usize],
        // Valid points, but twice as many as declared.
        Poison::TooMany => BASEPOINT.repeat(2 * declared as usize),
    };
    job.send_blinded(points, Some(declared)).await;
    // Keep the connection open until acme gives up on us.
    let _ = tokio::time::timeout(Duration::from_secs(60), job.conn.closed()).await;
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
