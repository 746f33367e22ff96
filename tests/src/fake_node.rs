//! A hand-driven node for hostile-peer tests: it holds a valid certificate, registers with the
//! coordinator, accepts the next job it is offered as initiator, dials the responder and sends a
//! correct hello — and from then on the test decides what it sends: raw bytes, any envelope, or
//! an honest run of the protocol ([`FakeJob::run_honestly`]) whose frames it records so a later
//! job can replay them.
//!
//! [`join_next_aggregate`] plays a party of an `aggregate` job (N ≥ 3) the same way: it accepts,
//! confirms the start, takes the honest parties' hellos, and the test decides what it sends
//! each peer on the data plane and what it reports to the coordinator.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cleanroom_circuits::aggregate::{ShareSeed, encode_cells};
use cleanroom_circuits::{ItemSet, JobKey, PsiParams, PsiSession};
use cleanroom_proto::v1::{
    AggregateHello, AggregateOutcome, AggregatePartial, AggregateTerms, BatchEnd, Envelope,
    HelloAck, JobKind, JobSpec, NodeHello, OfferReply, Phase, PointBatch, PsiHello, PsiOutcome,
    Ready, Report, Start, envelope::Body, report::Outcome,
};
use cleanroom_transport::{FramedRecv, FramedSend, Identity, TransportTuning};

/// The compressed ristretto255 basepoint (RFC 9496): a valid point to send.
pub const BASEPOINT: [u8; 32] = [
    0xe2, 0xf2, 0xae, 0x0a, 0x6a, 0xbc, 0x4e, 0x71, 0xa8, 0x84, 0xa9, 0x61, 0xc5, 0x00, 0x51, 0x5f,
    0x58, 0xe3, 0x0b, 0x6a, 0xa5, 0x82, 0xdd, 0x8d, 0xb6, 0xa6, 0x59, 0x45, 0xe0, 0x8d, 0x2d, 0x76,
];

/// A fake node in the middle of a job, after its hello; keep it alive as long as the test wants
/// the connections open.
#[derive(Debug)]
pub struct FakeJob {
    /// The job's id.
    pub job_id: String,
    /// Its spec as offered.
    pub spec: JobSpec,
    /// The data-plane connection to the responder.
    pub conn: quinn::Connection,
    /// Our stream to the responder (the hello has been sent on it), unframed so that tests can
    /// write bytes no honest encoder would produce.
    pub data: quinn::SendStream,
    /// Every envelope sent on `data` so far, in order (raw bytes are not recorded).
    pub sent: Vec<Envelope>,
    control: quinn::Connection,
    job_stream: FramedSend,
    _endpoint: quinn::Endpoint,
}

impl FakeJob {
    /// Sends one envelope of this job.
    pub async fn send(&mut self, phase: Phase, body: Body) {
        let envelope = Envelope {
            job_id: self.job_id.clone(),
            phase: phase as i32,
            body: Some(body),
        };
        self.send_envelope(envelope).await;
    }

    /// Sends `envelope` exactly as given (any job id, any phase) and records it.
    pub async fn send_envelope(&mut self, envelope: Envelope) {
        let frame = cleanroom_proto::encode_frame(&envelope).expect("envelope under the cap");
        self.sent.push(envelope);
        self.send_raw(&frame).await;
    }

    /// Writes `bytes` on the data stream as they are: truncated frames, bad length prefixes,
    /// bodies that do not decode.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        // The honest side may already have hung up: that is what the tests provoke.
        let _ = self.data.write_all(bytes).await;
    }

    /// Leaves the coordinator mid-job: closes the control connection (the coordinator then
    /// fails the job) and keeps the data-plane connection open.
    pub fn leave_the_coordinator(&self) {
        self.control.close(0u32.into(), b"gone");
    }

    /// Ends our data stream (a clean end of stream after what was sent).
    pub fn finish(&mut self) {
        let _ = self.data.finish();
    }

    /// Reports the job's outcome to the coordinator, as an honest node does at the end.
    pub async fn report(&mut self, outcome: PsiOutcome) {
        let report = Envelope {
            job_id: self.job_id.clone(),
            phase: Phase::Report as i32,
            body: Some(Body::Report(Report {
                outcome: Some(Outcome::Psi(outcome)),
                signed_head: None,
            })),
        };
        let _ = self.job_stream.send(&report).await;
    }

    /// Runs the protocol honestly with `items` (distinct, sorted; the hello declared their
    /// number) against the responder, as `psi_job` does, and returns the intersection size.
    /// Everything sent is recorded in [`FakeJob::sent`].
    pub async fn run_honestly(&mut self, items: ItemSet, key_name: &str) -> Result<u64, String> {
        let done = |job_id: &str, count: u64| Envelope {
            job_id: job_id.to_owned(),
            phase: Phase::PsiDone as i32,
            body: Some(Body::BatchEnd(BatchEnd { total: count })),
        };
        self.run_honestly_then(items, key_name, done).await
    }

    /// Like [`FakeJob::run_honestly`], but the last frame (the count) is what `finale` makes of
    /// the job id and the true count: a wrong count, a frame for another phase…
    pub async fn run_honestly_then(
        &mut self,
        items: ItemSet,
        key_name: &str,
        finale: impl FnOnce(&str, u64) -> Envelope,
    ) -> Result<u64, String> {
        let params = PsiParams {
            key_name: key_name.to_owned(),
            min_peer_set: 1,
            max_peer_set: u64::MAX,
            return_in_order: false,
            learn_membership: false,
            batch_size: 4096,
        };
        let (own_size, session) = PsiSession::start(params, JobKey::generate(), items);
        let stream = self.conn.accept_uni().await.map_err(|e| e.to_string())?;
        let mut recv = FramedRecv::new(stream);
        let Some(Body::PsiHello(hello)) = next_envelope(&mut recv).await?.body else {
            return Err("expected the responder's hello".into());
        };
        let session = session
            .on_peer_size(hello.set_size)
            .map_err(|e| e.to_string())?;
        let (batches, mut exchanging) = session.blind();
        for (seq, points) in batches.into_iter().enumerate() {
            let seq = seq as u64;
            self.send(Phase::PsiBlinded, Body::Points(PointBatch { seq, points }))
                .await;
        }
        self.send(
            Phase::PsiBlinded,
            Body::BatchEnd(BatchEnd { total: own_size }),
        )
        .await;
        // The responder's points, which we blind again and return (shuffled).
        let mut awaiting = loop {
            match next_envelope(&mut recv).await?.body {
                Some(Body::Points(batch)) => {
                    exchanging = exchanging
                        .on_peer_batch(&batch.points)
                        .map_err(|e| e.to_string())?
                        .0;
                }
                Some(Body::BatchEnd(end)) => {
                    let (rest, awaiting) = exchanging
                        .on_peer_end(end.total)
                        .map_err(|e| e.to_string())?;
                    for (seq, points) in rest.into_iter().enumerate() {
                        let seq = seq as u64;
                        self.send(
                            Phase::PsiDoubleBlinded,
                            Body::Points(PointBatch { seq, points }),
                        )
                        .await;
                    }
                    self.send(
                        Phase::PsiDoubleBlinded,
                        Body::BatchEnd(BatchEnd { total: end.total }),
                    )
                    .await;
                    break awaiting;
                }
                other => return Err(format!("unexpected {other:?} while exchanging")),
            }
        };
        // Our points, returned double-blinded.
        let output = loop {
            match next_envelope(&mut recv).await?.body {
                Some(Body::Points(batch)) => {
                    awaiting = awaiting
                        .on_returned_batch(&batch.points)
                        .map_err(|e| e.to_string())?;
                }
                Some(Body::BatchEnd(end)) => {
                    break awaiting
                        .on_returned_end(end.total)
                        .map_err(|e| e.to_string())?;
                }
                other => return Err(format!("unexpected {other:?} while awaiting our points")),
            }
        };
        let last = finale(&self.job_id, output.intersection);
        self.send_envelope(last).await;
        self.finish();
        let Some(Body::BatchEnd(done)) = next_envelope(&mut recv).await?.body else {
            return Err("expected the responder's count".into());
        };
        if done.total != output.intersection {
            return Err(format!(
                "the responder counted {}, we counted {}",
                done.total, output.intersection
            ));
        }
        Ok(output.intersection)
    }

    /// Sends a batch of blinded points and the end marker with `total`.
    pub async fn send_blinded(&mut self, points: Vec<u8>, total: Option<u64>) {
        self.send(
            Phase::PsiBlinded,
            Body::Points(PointBatch { seq: 0, points }),
        )
        .await;
        if let Some(total) = total {
            self.send(Phase::PsiBlinded, Body::BatchEnd(BatchEnd { total }))
                .await;
        }
    }
}

/// The responder's next frame; its stream must not end yet.
async fn next_envelope(recv: &mut FramedRecv) -> Result<Envelope, String> {
    recv.recv()
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "the responder ended its stream".to_owned())
}

/// Plays node `name` (its certificate must be in `<dir>/pki`): registers, accepts the next
/// offer, confirms the start, dials the responder `peer` and sends a hello declaring `declared`
/// items with the correct spec digest.
pub async fn join_next_job(
    dir: &Path,
    coordinator: SocketAddr,
    name: &str,
    peer: &str,
    declared: u64,
) -> FakeJob {
    let mut job = join_next_job_without_hello(dir, coordinator, name, peer).await;
    let hello = Body::PsiHello(PsiHello {
        sender: name.into(),
        set_size: declared,
        spec_digest: cleanroom_node::job::spec_digest(&job.job_id, &job.spec).to_vec(),
        // Release terms an honest node with the default agreement sends.
        release: Some(cleanroom_proto::v1::ReleaseTerms {
            min_result: 1,
            counts_to_coordinator: true,
        }),
        ..PsiHello::default()
    });
    job.send(Phase::PsiSize, hello).await;
    job
}

/// Like [`join_next_job`], but the hello is what `hello` makes of the job id and spec (e.g. an
/// overlap-sum hello with its terms).
pub async fn join_next_job_with_hello(
    dir: &Path,
    coordinator: SocketAddr,
    name: &str,
    peer: &str,
    hello: impl FnOnce(&str, &JobSpec) -> PsiHello,
) -> FakeJob {
    let mut job = join_next_job_without_hello(dir, coordinator, name, peer).await;
    let hello = Body::PsiHello(hello(&job.job_id, &job.spec));
    job.send(Phase::PsiSize, hello).await;
    job
}

/// Like [`join_next_job`], but stops after opening the data stream to the responder: nothing
/// is written on it yet (QUIC does not even announce the stream), so the test chooses the
/// first frame — or sends none.
pub async fn join_next_job_without_hello(
    dir: &Path,
    coordinator: SocketAddr,
    name: &str,
    peer: &str,
) -> FakeJob {
    let (endpoint, control) = register(dir, coordinator, name).await;
    let AcceptedJob {
        send: jsend,
        job_id,
        spec,
        start,
        ..
    } = accept_next_job(&control).await;

    // The data plane, with a correct hello.
    let peer_addr: SocketAddr = start.peer_addr.parse().expect("peer address");
    let peer = Identity::node(peer).expect("peer name");
    let conn = cleanroom_transport::connect(&endpoint, peer_addr, &peer)
        .await
        .expect("dial");
    let data = conn.open_uni().await.expect("stream");
    FakeJob {
        job_id,
        spec,
        conn,
        data,
        sent: Vec::new(),
        control,
        job_stream: jsend,
        _endpoint: endpoint,
    }
}

/// Registers node `name` (its certificate must be in `<dir>/pki`) with the coordinator: its
/// endpoint (which also serves as its data plane) and control connection.
async fn register(
    dir: &Path,
    coordinator: SocketAddr,
    name: &str,
) -> (quinn::Endpoint, quinn::Connection) {
    let creds = crate::load_credentials(dir, "pki", &format!("node-{name}"));
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let endpoint = cleanroom_transport::server_endpoint(any, &creds, &TransportTuning::default())
        .expect("fake node endpoint");
    let control = cleanroom_transport::connect(&endpoint, coordinator, &Identity::coordinator())
        .await
        .expect("connect to the coordinator");
    let (mut send, mut recv) = cleanroom_transport::open_bi(&control)
        .await
        .expect("stream");
    send.send(&Envelope {
        job_id: String::new(),
        phase: Phase::Hello as i32,
        body: Some(Body::NodeHello(NodeHello {
            node_name: name.into(),
            data_addr: endpoint.local_addr().expect("bound").to_string(),
            software_version: "fake".into(),
        })),
    })
    .await
    .expect("hello");
    let ack = recv.recv().await.expect("ack").expect("ack");
    assert!(matches!(ack.body, Some(Body::HelloAck(HelloAck { .. }))));
    (endpoint, control)
}

/// A fake party of an `aggregate` job, after `Start`: it has accepted the offer, confirmed the
/// start, knows every other party's data-plane address, and accepts (and records) the hellos
/// the honest parties send it. From then on the test decides what it sends each peer — on a
/// data-plane connection it dials ([`FakeParty::dial`]) — and what it reports to the
/// coordinator on the job's control stream ([`FakeParty::send_control`]).
#[derive(Debug)]
pub struct FakeParty {
    /// This fake node's name.
    pub name: String,
    /// The job's id.
    pub job_id: String,
    /// Its spec as offered.
    pub spec: JobSpec,
    /// Every other party with its data-plane address, as `Start` named them.
    pub peers: Vec<(String, SocketAddr)>,
    /// The data-plane connections dialled so far, kept open until the party is dropped.
    pub conns: Vec<quinn::Connection>,
    /// The hellos the honest parties sent us, as they arrived.
    pub received: Arc<Mutex<Vec<Envelope>>>,
    endpoint: quinn::Endpoint,
    control: quinn::Connection,
    /// The job's control stream, unframed so that tests can write any bytes on it.
    job_send: quinn::SendStream,
    _job_recv: FramedRecv,
    acceptor: tokio::task::JoinHandle<()>,
}

impl Drop for FakeParty {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl FakeParty {
    /// The job's columns: the count, then each summed column.
    pub fn columns(&self) -> usize {
        1 + self.spec.aggregate.as_ref().map_or(0, |a| a.sums.len())
    }

    /// The job's cells: `(groups + 1) × columns`.
    pub fn cells(&self) -> usize {
        let groups = self.spec.aggregate.as_ref().map_or(0, |a| a.groups.len()) + 1;
        groups * self.columns()
    }

    /// Terms an honest node could send: no noise, no colluders, threshold 1, sensitivity 1
    /// per column (the joint terms take the strictest of all parties', so these change nothing).
    pub fn honest_terms(&self) -> AggregateTerms {
        AggregateTerms {
            epsilon: 0.0,
            max_colluders: 0,
            min_result: 1,
            sensitivities: vec![1; self.columns()],
        }
    }

    /// A correct `AggregateHello` of this job for a peer, with a fresh seed.
    pub fn hello(&self) -> AggregateHello {
        let seed = ShareSeed::generate().expect("entropy");
        AggregateHello {
            sender: self.name.clone(),
            spec_digest: cleanroom_node::job::spec_digest(&self.job_id, &self.spec).to_vec(),
            terms: Some(self.honest_terms()),
            share_seed: seed.to_bytes(),
        }
    }

    /// Wraps `hello` in an envelope of this job's share phase.
    pub fn envelope(&self, hello: AggregateHello) -> Envelope {
        Envelope {
            job_id: self.job_id.clone(),
            phase: Phase::AggShare as i32,
            body: Some(Body::AggHello(hello)),
        }
    }

    /// Dials `peer` (its certificate must name it) and opens the stream an honest party sends
    /// its hello on; nothing is written yet (QUIC does not even announce the stream).
    pub async fn dial(&mut self, peer: &str) -> quinn::SendStream {
        let addr = self
            .peers
            .iter()
            .find(|(name, _)| name == peer)
            .map(|(_, addr)| *addr)
            .unwrap_or_else(|| panic!("Start named no party '{peer}'"));
        let identity = Identity::node(peer).expect("peer name");
        let conn = cleanroom_transport::connect(&self.endpoint, addr, &identity)
            .await
            .expect("dial the peer");
        let stream = conn.open_uni().await.expect("stream");
        self.conns.push(conn);
        stream
    }

    /// Dials `peer` and writes `bytes` on the stream, then ends it if `finish`.
    pub async fn send_raw_to(&mut self, peer: &str, bytes: &[u8], finish: bool) {
        let mut stream = self.dial(peer).await;
        // The honest side may already have hung up: that is what the tests provoke.
        let _ = stream.write_all(bytes).await;
        if finish {
            let _ = stream.finish();
        }
        // Keep the stream's data flowing until the peer has read it or hung up.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(60), stream.stopped()).await;
        });
    }

    /// Dials `peer` and sends it `envelopes`, framed, then ends the stream (as an honest party
    /// does after its one hello).
    pub async fn send_to(&mut self, peer: &str, envelopes: &[Envelope]) {
        let mut bytes = Vec::new();
        for env in envelopes {
            bytes.extend(cleanroom_proto::encode_frame(env).expect("envelope under the cap"));
        }
        self.send_raw_to(peer, &bytes, true).await;
    }

    /// Writes `bytes` on the job's control stream to the coordinator.
    pub async fn send_control_raw(&mut self, bytes: &[u8]) {
        let _ = self.job_send.write_all(bytes).await;
    }

    /// Sends `body` on the job's control stream, stamped with this job and `phase`.
    pub async fn send_control(&mut self, phase: Phase, body: Body) {
        let frame = cleanroom_proto::encode_frame(&Envelope {
            job_id: self.job_id.clone(),
            phase: phase as i32,
            body: Some(body),
        })
        .expect("envelope under the cap");
        self.send_control_raw(&frame).await;
    }

    /// Sends partial batch `seq` of `cells` (any number of them) to the coordinator.
    pub async fn send_partial(&mut self, seq: u64, cells: &[u64]) {
        let partial = AggregatePartial {
            seq,
            cells: encode_cells(cells),
        };
        self.send_control(Phase::AggPartial, Body::AggPartial(partial))
            .await;
    }

    /// Reports an `AggregateOutcome` claiming `cells` cells.
    pub async fn send_outcome(&mut self, cells: u64) {
        let outcome = AggregateOutcome {
            cells,
            ..AggregateOutcome::default()
        };
        let report = Report {
            outcome: Some(Outcome::Aggregate(outcome)),
            signed_head: None,
        };
        self.send_control(Phase::Report, Body::Report(report)).await;
    }

    /// Waits (at most `limit`) until the honest parties have sent us `n` hellos.
    pub async fn wait_for_hellos(&self, n: usize, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if self
                .received
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len()
                >= n
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Waits (at most `limit`) until the coordinator ends the job (it drops the job's stream,
    /// or the whole control connection), then closes every connection of this fake node.
    pub async fn wait_for_the_end(mut self, limit: Duration) {
        let _ = tokio::time::timeout(limit, async {
            tokio::select! {
                _ = self._job_recv.recv() => {}
                _ = self.control.closed() => {}
            }
        })
        .await;
        for conn in &self.conns {
            conn.close(0u32.into(), b"fake party done");
        }
        self.control.close(0u32.into(), b"fake party done");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// A job stream the fake node accepted, past the coordinator's opening.
struct AcceptedJob {
    send: FramedSend,
    recv: FramedRecv,
    job_id: String,
    spec: JobSpec,
    start: Start,
}

/// Accepts the next job stream on `control` and walks the opening of every job kind: the offer
/// is accepted, and the start answered with ready.
async fn accept_next_job(control: &quinn::Connection) -> AcceptedJob {
    let (mut send, mut recv) = cleanroom_transport::accept_bi(control).await.expect("job");
    let offer = recv.recv().await.expect("offer").expect("offer");
    let job_id = offer.job_id.clone();
    let Some(Body::Offer(offer)) = offer.body else {
        panic!("expected an offer")
    };
    let spec = offer.spec.expect("spec");
    let reply = Body::OfferReply(OfferReply {
        accept: true,
        reason: String::new(),
        signed_head: None,
    });
    send.send(&Envelope {
        job_id: job_id.clone(),
        phase: Phase::Offer as i32,
        body: Some(reply),
    })
    .await
    .expect("offer reply");
    let start = recv.recv().await.expect("start").expect("start");
    let Some(Body::Start(start)) = start.body else {
        panic!("expected start")
    };
    send.send(&Envelope {
        job_id: job_id.clone(),
        phase: Phase::Start as i32,
        body: Some(Body::Ready(Ready {})),
    })
    .await
    .expect("ready");
    AcceptedJob {
        send,
        recv,
        job_id,
        spec,
        start,
    }
}

/// Plays node `name` in the next `aggregate` job it is offered: registers, accepts the offer,
/// confirms the start and starts accepting the honest parties' hellos (recorded in
/// [`FakeParty::received`]). It sends no hello of its own: the test does.
pub async fn join_next_aggregate(dir: &Path, coordinator: SocketAddr, name: &str) -> FakeParty {
    let (endpoint, control) = register(dir, coordinator, name).await;
    let received = Arc::new(Mutex::new(Vec::new()));
    let acceptor = {
        let endpoint = endpoint.clone();
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let received = received.clone();
                tokio::spawn(async move {
                    let Ok((conn, _)) = cleanroom_transport::handshake(incoming).await else {
                        return;
                    };
                    let Ok(stream) = conn.accept_uni().await else {
                        return;
                    };
                    let mut recv = FramedRecv::new(stream);
                    while let Ok(Some(env)) = recv.recv().await {
                        received.lock().unwrap_or_else(|p| p.into_inner()).push(env);
                    }
                    // Hold the connection until the honest party closes it.
                    conn.closed().await;
                });
            }
        })
    };

    let AcceptedJob {
        send: jsend,
        recv: jrecv,
        job_id,
        spec,
        start,
    } = accept_next_job(&control).await;
    assert_eq!(
        spec.kind,
        JobKind::Aggregate as i32,
        "the fake party expected an aggregate job"
    );
    let peers = start
        .peers
        .iter()
        .map(|p| (p.node.clone(), p.data_addr.parse().expect("peer address")))
        .collect();
    FakeParty {
        name: name.to_owned(),
        job_id,
        spec,
        peers,
        conns: Vec::new(),
        received,
        endpoint,
        control,
        job_send: jsend.into_inner(),
        _job_recv: jrecv,
        acceptor,
    }
}
