//! The pipeline every job goes through, written once: check that the parties are connected,
//! offer the job to all of them, start them, collect what each reports, and hand the reports to
//! the kind's [`Kind::settle`]. The runner task (`super::task`) runs it under the job's lease.
//!
//! The coordinator asks, it never orders: each node decides against its own agreement. Every
//! state change is stored with its reason, so `cleanroom job status` can tell the analyst what
//! happened and what to do about it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cleanroom_proto::v1::{
    Envelope, JobSpec, JobState, Offer, PeerEndpoint, Phase, PsiOutcome, Role, SignedAuditHead,
    Start, envelope::Body, report::Outcome,
};
use cleanroom_transport::{FramedRecv, FramedSend};
use tokio::task::JoinSet;

use super::error::{JobError, PartyError, Stage, Veto, Violation};
use crate::clock::now_ms;
use crate::registry::NodeHandle;
use crate::shared::Shared;
use crate::store::HeadVerdict;
use crate::untrusted::node_text;

/// After the first failed report, how long to wait for the other parties' reasons.
pub(crate) const FAILURE_GRACE: Duration = Duration::from_secs(3);

/// How long a node has to confirm `Start`.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How a kind's parties are arranged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// Two parties: the first is the initiator (it dials), the second the responder (it
    /// accepts). The responder is started first, so it waits for the initiator before the
    /// initiator, told the responder's data-plane address, dials.
    Pair,
    /// N parties, all peers. Each registered its expected peers before accepting, so all are
    /// started at once, each with every other's address.
    Peers,
}

/// One party's job stream, once it has accepted the offer.
#[derive(Debug)]
pub(crate) struct Party {
    /// The node.
    pub node: String,
    /// Its role in this job.
    pub role: Role,
    /// Where its peers reach its data plane.
    pub data_addr: String,
    /// Our side of the stream. Dropping it (with `recv`) tells the node the job is over.
    pub send: FramedSend,
    /// Its side.
    pub recv: FramedRecv,
    /// Where the signed audit heads it reports go.
    pub heads: HeadSink,
}

/// Where a job's parties' signed audit heads go: the store, once each signature checks (a head
/// that does not verify is logged and dropped; the job goes on).
#[derive(Clone)]
pub(crate) struct HeadSink {
    shared: Arc<Shared>,
    job_id: String,
}

impl std::fmt::Debug for HeadSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadSink")
            .field("job_id", &self.job_id)
            .finish()
    }
}

impl HeadSink {
    /// Keeps `node`'s signed head, if it sent one.
    pub(crate) fn keep(&self, node: &str, signed: Option<&SignedAuditHead>) {
        let Some(signed) = signed else { return };
        match self
            .shared
            .store
            .record_audit_head(node, &self.job_id, signed, now_ms())
        {
            Ok(HeadVerdict::Kept) => {}
            Ok(HeadVerdict::Refused(reason)) => {
                tracing::warn!(job_id = %self.job_id, node = %node, %reason, "dropped an audit head that does not verify");
            }
            Err(e) => {
                tracing::warn!(job_id = %self.job_id, node = %node, error = %e, "could not store an audit head");
            }
        }
    }
}

/// One job kind's part in the pipeline: how its parties are arranged, how one party's report is
/// read, and how the reports make a result. A new kind is one file that implements this, and
/// one line in `super::task::drive`.
pub(crate) trait Kind: Send + Sync + 'static {
    /// What one party's report becomes once read (it names the party).
    type Report: Send + 'static;

    /// How the parties are arranged.
    const SHAPE: Shape;

    /// Whether the coordinator holds partial results while it collects (an aggregate's
    /// partial sums), so that a failure says none is released.
    const HOLDS_PARTIALS: bool = false;

    /// Reads one party's stream after `Ready`, up to and including its report. The pipeline
    /// bounds it by the job timeout and drops the stream (ending the node's job) on failure.
    fn collect(
        self: Arc<Self>,
        party: Party,
        job_id: String,
    ) -> impl Future<Output = Result<Self::Report, PartyError>> + Send;

    /// Checks the reports (in the spec's party order) against each other, stores the result,
    /// and returns the job's summary (its succeeded reason).
    fn settle(&self, job: &Job<'_>, reports: Vec<Self::Report>) -> Result<String, JobError>;
}

/// A two-party kind's settle: both parties report a [`PsiOutcome`].
pub(crate) trait PairSettle: Send + Sync + 'static {
    /// [`Kind::settle`] for the two reports.
    fn settle(&self, job: &Job<'_>, reports: Vec<(String, PsiOutcome)>)
    -> Result<String, JobError>;
}

/// A two-party kind in the pipeline: an initiator and a responder, each reporting a
/// [`PsiOutcome`], settled by `S`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TwoParty<S>(pub S);

impl<S: PairSettle> Kind for TwoParty<S> {
    type Report = (String, PsiOutcome);
    const SHAPE: Shape = Shape::Pair;

    async fn collect(
        self: Arc<Self>,
        party: Party,
        job_id: String,
    ) -> Result<Self::Report, PartyError> {
        psi_report(party, &job_id).await
    }

    fn settle(&self, job: &Job<'_>, reports: Vec<Self::Report>) -> Result<String, JobError> {
        self.0.settle(job, reports)
    }
}

/// The job a kind settles: the shared state to store its result in, its id and its spec.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Job<'a> {
    /// What the coordinator's tasks share (the store).
    pub shared: &'a Shared,
    /// The job's id.
    pub id: &'a str,
    /// The job's spec.
    pub spec: &'a JobSpec,
}

impl Job<'_> {
    /// Stores a state change of the job, or fails the job if the store cannot.
    pub(crate) fn record(&self, state: JobState, reason: &str) -> Result<(), JobError> {
        self.shared
            .store
            .transition(self.id, state, reason, now_ms())
            .map_err(JobError::store)
    }

    /// Stores each party's report as the job's result.
    pub(crate) fn store_reports(&self, reports: &[(String, PsiOutcome)]) -> Result<(), JobError> {
        for (node, outcome) in reports {
            self.shared
                .store
                .put_result(self.id, node, outcome)
                .map_err(JobError::storing_result)?;
        }
        Ok(())
    }
}

/// Runs one job through the pipeline to its summary or its error (the caller stores the final
/// state).
pub(crate) async fn run<K: Kind>(
    shared: &Arc<Shared>,
    job_id: &str,
    spec: &JobSpec,
    kind: K,
) -> Result<String, JobError> {
    let job = Job {
        shared,
        id: job_id,
        spec,
    };
    let handles = connected(shared, spec, K::SHAPE)?;
    let everyone = everyone(handles.len());
    job.record(JobState::Offered, &format!("offered to {everyone}"))?;
    let mut parties = offer_all(shared, job_id, spec, handles).await?;
    job.record(JobState::Running, &format!("{everyone} accepted; running"))?;
    start_all(job_id, &mut parties, K::SHAPE).await?;
    let kind = Arc::new(kind);
    let reports = collect_all(shared, job_id, parties, &kind).await?;
    kind.settle(&job, reports)
}

/// `answer`, or the party's timeout at `stage` once `after` has passed.
async fn timed<T>(
    node: &str,
    stage: Stage,
    after: Duration,
    answer: impl Future<Output = Result<T, PartyError>>,
) -> Result<T, PartyError> {
    tokio::time::timeout(after, answer)
        .await
        .unwrap_or_else(|_| {
            Err(PartyError::Timeout {
                node: node.to_owned(),
                stage,
                after,
            })
        })
}

/// "both nodes" or "all N parties".
fn everyone(n: usize) -> String {
    if n == 2 {
        "both nodes".to_owned()
    } else {
        format!("all {n} parties")
    }
}

/// Every party's connection and role: all must be connected before anything is offered.
fn connected(
    shared: &Shared,
    spec: &JobSpec,
    shape: Shape,
) -> Result<Vec<(String, Role, NodeHandle)>, JobError> {
    let mut handles = Vec::with_capacity(spec.parties.len());
    for (i, party) in spec.parties.iter().enumerate() {
        let Some(handle) = shared.registry.get(&party.node) else {
            return Err(JobError::NotConnected {
                node: party.node.clone(),
                connected: shared.registry.names(),
            });
        };
        let role = match (shape, i) {
            (Shape::Pair, 0) => Role::Initiator,
            (Shape::Pair, _) => Role::Responder,
            (Shape::Peers, _) => Role::Peer,
        };
        handles.push((party.node.clone(), role, handle));
    }
    Ok(handles)
}

/// Offers the job to every party at once. Any veto vetoes the job; any other failure fails it;
/// either way the streams of those that accepted are dropped, and they forget the job.
async fn offer_all(
    shared: &Arc<Shared>,
    job_id: &str,
    spec: &JobSpec,
    handles: Vec<(String, Role, NodeHandle)>,
) -> Result<Vec<Party>, JobError> {
    let offer_timeout = shared.cfg.offer_timeout();
    let mut offers = JoinSet::new();
    for (index, (node, role, handle)) in handles.into_iter().enumerate() {
        let heads = HeadSink {
            shared: shared.clone(),
            job_id: job_id.to_owned(),
        };
        let offer = Envelope {
            job_id: job_id.to_owned(),
            phase: Phase::Offer as i32,
            body: Some(Body::Offer(Offer {
                spec: Some(spec.clone()),
                role: role as i32,
            })),
        };
        offers.spawn(async move {
            let answer = offer_one(node.clone(), role, handle, offer, heads);
            (
                index,
                timed(&node, Stage::Offer, offer_timeout, answer).await,
            )
        });
    }
    let mut answers = Vec::new();
    let mut errors = Vec::new();
    while let Some(joined) = offers.join_next().await {
        match joined {
            Ok(answer) => answers.push(answer),
            Err(e) => errors.push((usize::MAX, PartyError::Internal(e.to_string()))),
        }
    }
    // In the spec's order, so the reasons read in the order the analyst listed the parties.
    answers.sort_by_key(|(index, _)| *index);
    let mut parties = Vec::new();
    let mut vetoes = Vec::new();
    for (index, answer) in answers {
        match answer {
            Ok(Ok(party)) => parties.push(party),
            Ok(Err(veto)) => vetoes.push(veto),
            Err(error) => errors.push((index, error)),
        }
    }
    if !vetoes.is_empty() {
        return Err(JobError::Vetoed(vetoes));
    }
    if !errors.is_empty() {
        errors.sort_by_key(|(index, _)| *index);
        return Err(JobError::Unreached(
            errors.into_iter().map(|(_, e)| e).collect(),
        ));
    }
    Ok(parties)
}

/// Offers the job to one node on a new stream and reads its answer: its stream if it accepts,
/// its veto if it refuses.
async fn offer_one(
    node: String,
    role: Role,
    handle: NodeHandle,
    offer: Envelope,
    heads: HeadSink,
) -> Result<Result<Party, Veto>, PartyError> {
    let (mut send, mut recv) = cleanroom_transport::open_bi(&handle.conn)
        .await
        .map_err(|e| PartyError::Unreachable {
            node: node.clone(),
            error: e.to_string(),
        })?;
    send.send(&offer).await.map_err(|e| PartyError::Stream {
        node: node.clone(),
        error: e.to_string(),
    })?;
    let reply = recv
        .recv_expect(&offer.job_id, Phase::Offer)
        .await
        .map_err(|e| PartyError::NoAnswer {
            node: node.clone(),
            error: e.to_string(),
        })?;
    if let Some(Body::OfferReply(r)) = &reply.body {
        heads.keep(&node, r.signed_head.as_ref());
    }
    match reply.body {
        Some(Body::OfferReply(r)) if r.accept => Ok(Ok(Party {
            node,
            role,
            data_addr: handle.data_addr,
            send,
            recv,
            heads,
        })),
        Some(Body::OfferReply(r)) => Ok(Err(Veto {
            node,
            reason: node_text(&r.reason),
        })),
        _ => Err(PartyError::violation(&node, Violation::NotAnOfferReply)),
    }
}

/// Sends `Start` to every party and waits for its `Ready`, in waves: a pair's responder first
/// (it registers the initiator before it answers), then its initiator; all peers at once.
async fn start_all(job_id: &str, parties: &mut [Party], shape: Shape) -> Result<(), JobError> {
    let starts: Vec<Start> = (0..parties.len())
        .map(|i| start_message(&parties[i], parties))
        .collect();
    let waves: Vec<Vec<usize>> = match shape {
        Shape::Pair => {
            let mut order: Vec<usize> = (0..parties.len()).collect();
            order.sort_by_key(|&i| parties[i].role != Role::Responder);
            order.into_iter().map(|i| vec![i]).collect()
        }
        Shape::Peers => vec![(0..parties.len()).collect()],
    };
    for wave in waves {
        for &i in &wave {
            let party = &mut parties[i];
            let start = Envelope {
                job_id: job_id.to_owned(),
                phase: Phase::Start as i32,
                body: Some(Body::Start(starts[i].clone())),
            };
            party.send.send(&start).await.map_err(|e| {
                JobError::NotStarted(PartyError::Stream {
                    node: party.node.clone(),
                    error: e.to_string(),
                })
            })?;
        }
        for &i in &wave {
            let party = &mut parties[i];
            let node = party.node.as_str();
            let ready = async {
                let ready = party.recv.recv_expect(job_id, Phase::Start).await;
                match ready
                    .map_err(|e| PartyError::Stream {
                        node: node.to_owned(),
                        error: e.to_string(),
                    })?
                    .body
                {
                    Some(Body::Ready(_)) => Ok(()),
                    _ => Err(PartyError::violation(node, Violation::NotReady)),
                }
            };
            timed(node, Stage::Start, READY_TIMEOUT, ready)
                .await
                .map_err(JobError::NotStarted)?;
        }
    }
    Ok(())
}

/// The `Start` of one party: an initiator learns its responder's address, a peer every other
/// peer's.
fn start_message(party: &Party, all: &[Party]) -> Start {
    let peer_addr = match party.role {
        Role::Initiator => all
            .iter()
            .find(|p| p.role == Role::Responder)
            .map(|p| p.data_addr.clone())
            .unwrap_or_default(),
        _ => String::new(),
    };
    let peers = if party.role == Role::Peer {
        all.iter()
            .filter(|p| p.node != party.node)
            .map(|p| PeerEndpoint {
                node: p.node.clone(),
                data_addr: p.data_addr.clone(),
            })
            .collect()
    } else {
        Vec::new()
    };
    Start {
        role: party.role as i32,
        peer_addr,
        peers,
    }
}

/// Collects every party's report, each on its own task that owns the party's stream. The first
/// failure fails the job soon: a node that has given up must not leave the job waiting for its
/// peer's deadline. Returns the reports in the spec's party order.
async fn collect_all<K: Kind>(
    shared: &Shared,
    job_id: &str,
    parties: Vec<Party>,
    kind: &Arc<K>,
) -> Result<Vec<K::Report>, JobError> {
    let job_timeout = shared.cfg.job_timeout();
    let mut tasks = JoinSet::new();
    for (index, party) in parties.into_iter().enumerate() {
        let node = party.node.clone();
        let collect = kind.clone().collect(party, job_id.to_owned());
        tasks.spawn(async move {
            (
                index,
                timed(&node, Stage::Report, job_timeout, collect).await,
            )
        });
    }
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    loop {
        // Once one party has failed, give the others a moment to say why (a node that saw a
        // protocol violation reports it just after its misbehaving peer drops), then stop.
        let next = if failures.is_empty() {
            tasks.join_next().await
        } else {
            tokio::time::timeout(FAILURE_GRACE, tasks.join_next())
                .await
                .unwrap_or_default()
        };
        match next {
            None => break,
            Some(Ok((index, Ok(report)))) => reports.push((index, report)),
            Some(Ok((_, Err(failure)))) => failures.push(failure),
            Some(Err(e)) => failures.push(PartyError::Internal(format!("collecting reports: {e}"))),
        }
    }
    tasks.abort_all();
    if !failures.is_empty() {
        // Reports from the nodes themselves first: they say what went wrong, "lost" says only
        // that a party went away.
        failures.sort_by_key(PartyError::is_lost);
        return Err(JobError::Failed {
            failures,
            partials_dropped: K::HOLDS_PARTIALS,
        });
    }
    reports.sort_by_key(|(index, _)| *index);
    Ok(reports.into_iter().map(|(_, report)| report).collect())
}

/// Reads the one report a two-party node sends: its [`PsiOutcome`], or its failure.
pub(crate) async fn psi_report(
    mut party: Party,
    job_id: &str,
) -> Result<(String, PsiOutcome), PartyError> {
    let node = party.node;
    let env = party
        .recv
        .recv_expect(job_id, Phase::Report)
        .await
        .map_err(|e| PartyError::Lost {
            node: node.clone(),
            error: e.to_string(),
        })?;
    if let Some(Body::Report(r)) = &env.body {
        party.heads.keep(&node, r.signed_head.as_ref());
    }
    let violation = match env.body {
        Some(Body::Report(r)) => match r.outcome {
            Some(Outcome::Psi(outcome)) => return Ok((node, outcome)),
            Some(Outcome::Failure(reason)) => {
                return Err(PartyError::Failed {
                    reason: node_text(&reason),
                    node,
                });
            }
            Some(Outcome::Aggregate(_)) => Violation::AggregateReportForPsi,
            None => Violation::EmptyReport,
        },
        _ => Violation::NotAReport,
    };
    Err(PartyError::violation(&node, violation))
}
