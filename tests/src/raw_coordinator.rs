//! A coordinator played by the test: it registers real node processes, offers them jobs of its
//! choosing (the same job twice, if it likes, as a confused or hostile coordinator could) and
//! hands back every offer reply and report **exactly as the nodes sent them**, before any
//! coordinator logic could blank or combine them. What a node puts in its report is what a
//! compromised coordinator learns.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use cleanroom_proto::v1::{
    Envelope, HelloAck, JobSpec, Offer, Phase, Role, Start, envelope::Body, report::Outcome,
};
use cleanroom_transport::{
    FramedRecv, FramedSend, TransportTuning, accept, accept_bi, open_bi, server_endpoint,
};

/// One node's control session.
struct Registered {
    conn: quinn::Connection,
    data_addr: String,
    _hello: (FramedSend, FramedRecv),
}

/// The test's coordinator: its endpoint and the nodes registered with it.
pub struct RawCoordinator {
    endpoint: quinn::Endpoint,
    nodes: HashMap<String, Registered>,
}

impl std::fmt::Debug for RawCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut nodes: Vec<&String> = self.nodes.keys().collect();
        nodes.sort();
        f.debug_struct("RawCoordinator")
            .field("nodes", &nodes)
            .finish_non_exhaustive()
    }
}

impl RawCoordinator {
    /// Listens on loopback with the consortium's coordinator certificate (`<dir>/pki`). Give the
    /// returned address to the nodes' configs (`Consortium::addr`) before starting them.
    pub fn bind(dir: &Path) -> (RawCoordinator, SocketAddr) {
        let creds = crate::load_credentials(dir, "pki", "coordinator");
        let endpoint = server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &creds,
            &TransportTuning::default(),
        )
        .unwrap();
        let addr = endpoint.local_addr().unwrap();
        (
            RawCoordinator {
                endpoint,
                nodes: HashMap::new(),
            },
            addr,
        )
    }

    /// Waits (at most 30 s each) until `count` nodes have registered.
    pub async fn register(&mut self, count: usize) {
        while self.nodes.len() < count {
            let (conn, _) = tokio::time::timeout(Duration::from_secs(30), accept(&self.endpoint))
                .await
                .expect("the nodes register")
                .unwrap()
                .unwrap();
            let (mut send, mut recv) = accept_bi(&conn).await.unwrap();
            let hello = recv.recv_expect("", Phase::Hello).await.unwrap();
            let Some(Body::NodeHello(hello)) = hello.body else {
                panic!("expected a node hello")
            };
            send.send(&Envelope {
                job_id: String::new(),
                phase: Phase::Hello as i32,
                body: Some(Body::HelloAck(HelloAck {
                    coordinator_name: "test".into(),
                })),
            })
            .await
            .unwrap();
            self.nodes.insert(
                hello.node_name.clone(),
                Registered {
                    conn,
                    data_addr: hello.data_addr,
                    _hello: (send, recv),
                },
            );
        }
    }

    /// Offers `spec` as job `job_id` to both parties of a two-party job (the initiator first),
    /// starts it and returns each node's report as sent, sorted by node. `Err((node, reason))`
    /// if a node refuses the offer (the other is then not asked).
    pub async fn run(
        &self,
        job_id: &str,
        spec: &JobSpec,
    ) -> Result<Vec<(String, Outcome)>, (String, String)> {
        let env = |phase: Phase, body: Body| Envelope {
            job_id: job_id.to_owned(),
            phase: phase as i32,
            body: Some(body),
        };
        let mut streams = Vec::new();
        for (i, party) in spec.parties.iter().enumerate() {
            let role = if i == 0 {
                Role::Initiator
            } else {
                Role::Responder
            };
            let (mut send, mut recv) = open_bi(&self.nodes[&party.node].conn).await.unwrap();
            send.send(&env(
                Phase::Offer,
                Body::Offer(Offer {
                    spec: Some(spec.clone()),
                    role: role as i32,
                }),
            ))
            .await
            .unwrap();
            let reply = recv.recv_expect(job_id, Phase::Offer).await.unwrap();
            match reply.body {
                Some(Body::OfferReply(r)) if r.accept => {}
                Some(Body::OfferReply(r)) => return Err((party.node.clone(), r.reason)),
                other => panic!("expected an offer reply, got {other:?}"),
            }
            streams.push((party.node.clone(), role, send, recv));
        }
        // The responder first, so it waits for the initiator's connection.
        streams.reverse();
        let responder_addr = self.nodes[&streams[0].0].data_addr.clone();
        for (_, role, send, recv) in &mut streams {
            let peer_addr = if *role == Role::Initiator {
                responder_addr.clone()
            } else {
                String::new()
            };
            send.send(&env(
                Phase::Start,
                Body::Start(Start {
                    role: *role as i32,
                    peer_addr,
                    ..Start::default()
                }),
            ))
            .await
            .unwrap();
            recv.recv_expect(job_id, Phase::Start).await.unwrap();
        }
        let mut reports = Vec::new();
        for (node, _, _send, recv) in &mut streams {
            let report = tokio::time::timeout(
                Duration::from_secs(120),
                recv.recv_expect(job_id, Phase::Report),
            )
            .await
            .expect("the node reports")
            .unwrap();
            match report.body {
                Some(Body::Report(r)) => reports.push((node.clone(), r.outcome.unwrap())),
                other => panic!("{node} reported {other:?}"),
            }
        }
        reports.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(reports)
    }
}
