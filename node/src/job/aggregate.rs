//! The `aggregate` job at this node as a sans-IO session: [`AggregateSession`] takes the
//! loaded vector, each peer's hello and the results of its CPU work, and hands out
//! [`AggStep`]s (send a hello to a peer, load, compute, charge, re-check, audit, report to the
//! coordinator). It never touches a socket, a task, the ledger or the clock; the driver
//! ([`crate::job::driver::aggregate`]) does, and the tests below run it without a network.
//!
//! The protocol (`cleanroom_circuits::aggregate`) in the order the session runs it:
//!
//! 1. **Offer.** The node decides against its agreements with *every* other party
//!    ([`crate::policy::aggregate`], through [`NodeState::decide`], which audits the decision and
//!    checks the node-wide ε budget). If it accepts, it registers one expected data-plane
//!    connection per peer *before* answering, so no peer can dial before it is expected.
//! 2. **Start** names every peer with its data-plane address; they must be exactly the spec's
//!    other parties.
//! 3. **Seeds.** Draw one fresh 32-byte seed per peer (independent of our data), dial every
//!    peer (its certificate must name it) and send an `AggregateHello` with the spec digest, our
//!    terms and its seed; receive one from every peer on the connection it dials to us (the
//!    data plane routes it here only if its certificate names that peer). This runs while we
//!    load, so a slow loader never makes its peers' waits time out.
//! 4. **Load** the dataset's group and value columns (consent and deletion filters apply), clip
//!    each value to the agreements' bounds and build the `groups × (1 + sums)` vector (count
//!    first); audited as an Access. With per-person clipping (the spec names a person column,
//!    as every agreement requires), a person's rows in the first of the job's groups they
//!    carry are summed, then clipped, and the person counted once. Our kept share is the vector minus the peers'
//!    expanded seeds.
//! 5. **Partial.** Apply the strictest terms of all parties (smallest ε, most colluders, largest
//!    k-threshold, largest sensitivities), add our kept share, the peers' expanded seeds and our
//!    noise share, audit the Release and stream the partial to the coordinator in batches, then
//!    the `AggregateOutcome`: public terms, the audit head and byte counts only. Our rows read,
//!    excluded, rejected and counted in "(other)" are our own figures (with one group, rows read
//!    minus the rest is our exact count): they stay in the audit log's Access entry.
//!
//! A peer that does not connect, sends a wrong hello or goes away fails the job here, and the
//! coordinator fails it everywhere: it reconstructs only from all N partials. If the coordinator
//! drops the job's stream (another party failed), the job stops at once.

use std::collections::BTreeMap;

use cleanroom_circuits::aggregate::{
    self, AggregateError, GroupVector, NoisePlan, ShareSeed, check_no_overflow, encode_cells,
};
use cleanroom_proto::v1::{
    AggregateHello, AggregateOutcome, AggregatePartial, AggregateTerms, ColumnNoise, Envelope,
    Phase, envelope::Body,
};
use sha2::{Digest, Sha256};

use crate::audit::AuditEvent;
use crate::error::{JobError, Party, Violation};
use crate::job::protocol::NoiseRequest;
use crate::ledger::Loss;
use crate::policy::{Permit, Veto};

/// Cells per partial batch: 512 KiB, well under the 1 MiB frame cap.
pub const PARTIAL_BATCH_CELLS: usize = 1 << 16;
/// The label of the group that collects rows whose label the spec does not list (or whose
/// integer is outside the spec's range).
pub const OTHER_GROUP: &str = aggregate::OTHER_GROUP;

/// What an aggregate job is, for the session.
#[derive(Debug, Clone)]
pub struct AggConfig {
    /// The job's id.
    pub job_id: String,
    /// This node's name.
    pub me: String,
    /// The other parties, in the spec's order.
    pub peers: Vec<String>,
    /// The spec digest every party must share.
    pub digest: [u8; 32],
    /// What this node's agreements permit.
    pub permit: Permit,
    /// Our terms, as the hello sends them to every peer.
    pub own_terms: AggregateTerms,
    /// Column names in vector order: the count, then the sums.
    pub columns: Vec<String>,
    /// Whether clipping is per person (the audit's words).
    pub per_person: bool,
    /// The node's δ, to state the ε a charged ρ amounts to.
    pub delta: f64,
}

/// What the driver does next for the session.
pub enum AggStep {
    /// Send this hello (with the seed of the peer's share) to `peer`, on its own connection.
    Hello {
        /// The peer.
        peer: String,
        /// The hello.
        hello: Box<Envelope>,
    },
    /// Load the dataset into the clipped vector; hand it to [`AggregateSession::on_loaded`].
    Load,
    /// Run this on the CPU pool; hand the result to [`AggregateSession::handle_done`].
    Compute(AggWork),
    /// Wait until every hello of ours was delivered; then [`AggregateSession::on_delivered`].
    AwaitDelivery,
    /// Charge the ledger (if this node's entry sets ε) and draw the noise; hand it to
    /// [`AggregateSession::handle_noise`].
    Charge(NoiseRequest),
    /// Stop unless the policy in force still permits the job.
    Recheck,
    /// Append this to the audit log; hand the head to [`AggregateSession::on_audited`].
    Audit(AuditEvent),
    /// Send this frame of the partial sum to the coordinator.
    Partial(Box<Envelope>),
    /// Report this outcome to the coordinator; the session is finished.
    Report(Box<AggregateOutcome>),
}

impl std::fmt::Debug for AggStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AggStep::Hello { peer, .. } => write!(f, "Hello({peer})"),
            AggStep::Load => f.write_str("Load"),
            AggStep::Compute(_) => f.write_str("Compute"),
            AggStep::AwaitDelivery => f.write_str("AwaitDelivery"),
            AggStep::Charge(r) => write!(f, "Charge({r:?})"),
            AggStep::Recheck => f.write_str("Recheck"),
            AggStep::Audit(_) => f.write_str("Audit"),
            AggStep::Partial(_) => f.write_str("Partial"),
            AggStep::Report(_) => f.write_str("Report"),
        }
    }
}

/// The session's CPU work; [`AggWork::run`] is pure.
pub enum AggWork {
    /// Our kept share: the vector minus the peers' expanded seeds.
    Split(GroupVector, Vec<ShareSeed>),
    /// The partial: our kept share, the peers' expanded seeds and our noise share.
    Partial(Vec<u64>, Vec<ShareSeed>, Vec<i64>),
}

/// The result of an [`AggWork`].
pub enum AggDone {
    /// Our kept share.
    Split(Vec<u64>),
    /// The partial sum.
    Partial(Result<Vec<u64>, AggregateError>),
}

impl AggWork {
    /// Does the work.
    pub fn run(self) -> AggDone {
        match self {
            AggWork::Split(vector, seeds) => {
                AggDone::Split(aggregate::split_with_seeds(&vector, seeds).own)
            }
            AggWork::Partial(own, seeds, noise) => AggDone::Partial((|| {
                let mut acc = own;
                for seed in &seeds {
                    aggregate::accumulate_seed(&mut acc, seed);
                }
                aggregate::add_noise(&mut acc, &noise)?;
                Ok(acc)
            })()),
        }
    }
}

/// What a peer sent us.
pub struct PeerShare {
    seed: ShareSeed,
    terms: AggregateTerms,
}

// Shares, vectors and noise are secrets: their Debug names the variant only.
impl std::fmt::Debug for PeerShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerShare")
            .field("terms", &self.terms)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for AggWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AggWork::Split(..) => "AggWork::Split",
            AggWork::Partial(..) => "AggWork::Partial",
        })
    }
}

impl std::fmt::Debug for AggDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AggDone::Split(..) => "AggDone::Split",
            AggDone::Partial(..) => "AggDone::Partial",
        })
    }
}

/// The terms every party applies: the strictest of all parties' terms.
#[derive(Debug, Clone, PartialEq)]
struct JointTerms {
    epsilon: Option<f64>,
    max_colluders: u32,
    min_result: u64,
    sensitivities: Vec<u64>,
}

/// What the session knows of the release once the noise is planned.
struct Plan {
    plan: NoisePlan,
    joint: JointTerms,
    seeds: Vec<ShareSeed>,
    own: Vec<u64>,
}

/// One party's aggregate session.
pub struct AggregateSession {
    cfg: AggConfig,
    steps: std::collections::VecDeque<AggStep>,
    /// Our seeds for the peers' shares, until our own share is split off.
    seeds: Option<Vec<ShareSeed>>,
    /// Cells and groups of our vector, once loaded.
    shape: Option<(usize, usize)>,
    own: Option<Vec<u64>>,
    shares: BTreeMap<String, PeerShare>,
    plan: Option<Plan>,
    rho: f64,
    partial: Option<Vec<u64>>,
    bytes_to_peers: u64,
    busy: bool,
    finished: bool,
}

impl std::fmt::Debug for AggregateSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregateSession")
            .field("job_id", &self.cfg.job_id)
            .field("shares", &self.shares.len())
            .finish_non_exhaustive()
    }
}

impl AggregateSession {
    /// Starts with one fresh seed per peer (in the order of `cfg.peers`). The seeds do not
    /// depend on our data, so the hellos go out first: the exchange is over within a round trip
    /// of Start, and a peer whose dataset loads slowly cannot make the others' waits time out.
    /// Only the share we keep is computed from the data, after loading.
    pub fn start(cfg: AggConfig, seeds: Vec<ShareSeed>) -> AggregateSession {
        let mut steps = std::collections::VecDeque::new();
        let mut bytes_to_peers = 0;
        for (peer, seed) in cfg.peers.iter().zip(&seeds) {
            let hello = Envelope {
                job_id: cfg.job_id.clone(),
                phase: Phase::AggShare as i32,
                body: Some(Body::AggHello(AggregateHello {
                    sender: cfg.me.clone(),
                    spec_digest: cfg.digest.to_vec(),
                    terms: Some(cfg.own_terms.clone()),
                    share_seed: seed.to_bytes(),
                })),
            };
            bytes_to_peers += framed_len(&hello);
            steps.push_back(AggStep::Hello {
                peer: peer.clone(),
                hello: Box::new(hello),
            });
        }
        steps.push_back(AggStep::Load);
        AggregateSession {
            cfg,
            steps,
            seeds: Some(seeds),
            shape: None,
            own: None,
            shares: BTreeMap::new(),
            plan: None,
            rho: 0.0,
            partial: None,
            bytes_to_peers,
            busy: false,
            finished: false,
        }
    }

    /// The next step, if any.
    pub fn next_step(&mut self) -> Option<AggStep> {
        self.steps.pop_front()
    }

    /// Whether the outcome has been handed out.
    pub fn is_finished(&self) -> bool {
        self.finished && self.steps.is_empty()
    }

    /// The peers whose hello is still due.
    pub fn waiting_for(&self) -> Vec<&str> {
        self.cfg
            .peers
            .iter()
            .filter(|p| !self.shares.contains_key(p.as_str()))
            .map(String::as_str)
            .collect()
    }

    fn fail<T>(&mut self, r: Result<T, JobError>) -> Result<T, JobError> {
        if r.is_err() {
            self.steps.clear();
            self.finished = false;
            self.busy = true;
        }
        r
    }

    fn internal(&self, what: &str) -> JobError {
        JobError::Internal(format!(
            "aggregate session of job '{}': {what}",
            self.cfg.job_id
        ))
    }

    /// Takes our loaded vector and the contributions it sums: refuses sums that could overflow
    /// or an input the agreement's sizes do not allow, then splits off our kept share.
    pub fn on_loaded(&mut self, rows_used: u64, vector: GroupVector) -> Result<(), JobError> {
        let r = self.loaded(rows_used, vector);
        self.fail(r)
    }

    fn loaded(&mut self, rows_used: u64, vector: GroupVector) -> Result<(), JobError> {
        let n = self.cfg.peers.len() + 1;
        let max = self
            .cfg
            .own_terms
            .sensitivities
            .iter()
            .copied()
            .max()
            .unwrap_or(1);
        check_no_overflow(rows_used, max, n).map_err(|e| JobError::Refused(Veto(e.to_string())))?;
        self.cfg
            .permit
            .check_input_size(rows_used)
            .map_err(JobError::Refused)?;
        let seeds = self
            .seeds
            .take()
            .ok_or_else(|| self.internal("loaded twice"))?;
        self.shape = Some((vector.cells().len(), vector.groups()));
        self.busy = true;
        self.steps
            .push_back(AggStep::Compute(AggWork::Split(vector, seeds)));
        Ok(())
    }

    /// Takes `peer`'s hello (routed here only if the peer's certificate names it).
    pub fn on_peer_hello(&mut self, peer: &str, hello: Envelope) -> Result<(), JobError> {
        let r = check_hello(&self.cfg.job_id, peer, &self.cfg.digest, hello)
            .map_err(|e| JobError::violation(Party::Peer(peer.to_owned()), Violation::Terms(e)))
            .and_then(|share| self.share(peer, share));
        self.fail(r)
    }

    /// Takes `peer`'s share, its hello already checked ([`check_hello`]).
    pub fn on_peer_share(&mut self, peer: &str, share: PeerShare) -> Result<(), JobError> {
        let r = self.share(peer, share);
        self.fail(r)
    }

    fn share(&mut self, peer: &str, share: PeerShare) -> Result<(), JobError> {
        if !self.cfg.peers.iter().any(|p| p == peer) {
            return Err(self.internal("a share from a party that is not a peer"));
        }
        if self.shares.insert(peer.to_owned(), share).is_some() {
            return Err(self.internal("a second share from one peer"));
        }
        self.gathered();
        Ok(())
    }

    /// Once our share is split off and every peer's is in, the hellos must be delivered.
    fn gathered(&mut self) {
        if self.own.is_some() && self.shares.len() == self.cfg.peers.len() && !self.busy {
            self.busy = true;
            self.steps.push_back(AggStep::AwaitDelivery);
        }
    }

    /// Every hello of ours was delivered: check the peers' terms, plan the noise and ask for it.
    pub fn on_delivered(&mut self) -> Result<(), JobError> {
        let r = self.delivered();
        self.fail(r)
    }

    fn delivered(&mut self) -> Result<(), JobError> {
        let n = self.cfg.peers.len() + 1;
        let (own, (_, groups)) = match (self.own.take(), self.shape) {
            (Some(own), Some(shape)) if self.shares.len() == self.cfg.peers.len() => (own, shape),
            _ => return Err(self.internal("delivered before every share was in")),
        };
        // Each peer's terms decide our noise and threshold: they must be terms an honest node
        // can send, or the peer is named as the one that broke the protocol.
        for peer in &self.cfg.peers {
            let share = &self.shares[peer];
            check_peer_terms(&share.terms, n, self.cfg.own_terms.sensitivities.len())
                .map_err(|e| JobError::violation(Party::Peer(peer.clone()), Violation::Terms(e)))?;
        }
        // The strictest terms of all parties, identical at every honest party.
        let all_terms: Vec<&AggregateTerms> = std::iter::once(&self.cfg.own_terms)
            .chain(self.cfg.peers.iter().map(|p| &self.shares[p].terms))
            .collect();
        let joint = joint_terms(&all_terms, n).map_err(|e| JobError::Compute {
            step: "the parties' terms do not fit",
            reason: e,
        })?;
        let plan = match joint.epsilon {
            Some(eps) => NoisePlan::new(eps, &joint.sensitivities, n, joint.max_colluders as usize),
            None => Ok(NoisePlan::none(joint.sensitivities.len(), n)),
        }
        .map_err(|e| JobError::Compute {
            step: "noise",
            reason: e.to_string(),
        })?;
        let seeds: Vec<ShareSeed> = std::mem::take(&mut self.shares)
            .into_values()
            .map(|s| s.seed)
            .collect();
        let loss = plan
            .is_noised()
            .then(|| Loss::Rho(release_rho(&plan, &joint.sensitivities)));
        let draw_plan = plan.clone();
        self.steps.push_back(AggStep::Charge(NoiseRequest {
            loss,
            draw: Box::new(move || draw_plan.draw(groups).map_err(|e| e.to_string())),
        }));
        self.plan = Some(Plan {
            plan,
            joint,
            seeds,
            own,
        });
        Ok(())
    }

    /// Takes this node's noise share; `charged`: the ledger was charged the release's ρ.
    pub fn handle_noise(&mut self, noise: Vec<i64>, charged: bool) -> Result<(), JobError> {
        let r = match self.plan.as_mut() {
            Some(p) => {
                self.rho = if charged {
                    release_rho(&p.plan, &p.joint.sensitivities)
                } else {
                    0.0
                };
                let work = AggWork::Partial(
                    std::mem::take(&mut p.own),
                    std::mem::take(&mut p.seeds),
                    noise,
                );
                self.steps.push_back(AggStep::Compute(work));
                Ok(())
            }
            None => Err(self.internal("noise came back that was not asked for")),
        };
        self.fail(r)
    }

    /// Takes the result of the last [`AggStep::Compute`].
    pub fn handle_done(&mut self, done: AggDone) -> Result<(), JobError> {
        let r = self.done(done);
        self.fail(r)
    }

    fn done(&mut self, done: AggDone) -> Result<(), JobError> {
        match done {
            AggDone::Split(own) => {
                self.own = Some(own);
                self.busy = false;
                self.gathered();
            }
            AggDone::Partial(r) => {
                let partial = r.map_err(|e| JobError::Compute {
                    step: "partial sum",
                    reason: e.to_string(),
                })?;
                let p = self
                    .plan
                    .as_ref()
                    .ok_or_else(|| self.internal("a partial without a plan"))?;
                let event = self.release_event(p);
                self.partial = Some(partial);
                self.steps.push_back(AggStep::Recheck);
                self.steps.push_back(AggStep::Audit(event));
            }
        }
        Ok(())
    }

    fn release_event(&self, p: &Plan) -> AuditEvent {
        let n = self.cfg.peers.len() + 1;
        let groups = self.shape.map_or(0, |(_, g)| g);
        let rho = self.rho;
        let epsilon_spent = if p.plan.is_noised() {
            self.cfg.permit.epsilon.map_or(0.0, |e| e.get())
        } else {
            0.0
        };
        AuditEvent::Release {
            job_id: self.cfg.job_id.clone(),
            partner: self.cfg.permit.partner.clone(),
            what: format!(
                "aggregate partial sum of {} groups × {} columns (masked; only the sum of all {n} \
                 partials is meaningful){}",
                groups,
                p.joint.sensitivities.len(),
                if !p.plan.is_noised() {
                    ", no noise (no agreement asks for it)".to_owned()
                } else if rho > 0.0 {
                    let delta = self.cfg.delta;
                    format!(
                        ", with this node's share of discrete Gaussian noise: zCDP rho {} \
                         charged (epsilon {} at delta {delta:e} on its own){}",
                        crate::ledger::show(rho),
                        crate::ledger::show(crate::ledger::epsilon_at(0.0, rho, delta)),
                        if self.cfg.per_person {
                            ", per person"
                        } else {
                            ", per row"
                        }
                    )
                } else {
                    ", with this node's share of discrete Gaussian noise (its agreements set no \
                     epsilon: nothing charged)"
                        .to_owned()
                }
            ),
            to: vec!["coordinator".into()],
            value: None,
            epsilon: epsilon_spent,
            rho: (rho > 0.0).then_some(rho),
        }
    }

    /// The release is audited (`head`): the partial goes to the coordinator in batches, then
    /// the outcome (public terms, the audit head and byte counts only).
    pub fn on_audited(&mut self, head: String) -> Result<(), JobError> {
        let r = self.audited(head);
        self.fail(r)
    }

    fn audited(&mut self, head: String) -> Result<(), JobError> {
        let (Some(partial), Some(p), Some((cells, _))) =
            (self.partial.take(), self.plan.as_ref(), self.shape)
        else {
            return Err(self.internal("audited before the partial was ready"));
        };
        let mut bytes_to_coordinator = 0u64;
        let mut frames = Vec::new();
        for (seq, batch) in (0u64..).zip(partial.chunks(PARTIAL_BATCH_CELLS)) {
            let frame = Envelope {
                job_id: self.cfg.job_id.clone(),
                phase: Phase::AggPartial as i32,
                body: Some(Body::AggPartial(AggregatePartial {
                    seq,
                    cells: encode_cells(batch),
                })),
            };
            bytes_to_coordinator += framed_len(&frame);
            frames.push(AggStep::Partial(Box::new(frame)));
        }
        let outcome = AggregateOutcome {
            cells: cells as u64,
            terms_digest: terms_digest(&self.cfg.digest, &p.joint).to_vec(),
            noise: describe_noise(&p.plan, &p.joint, &self.cfg.columns),
            min_result: p.joint.min_result,
            max_colluders: p.joint.max_colluders,
            audit_head: head,
            bytes_to_peers: self.bytes_to_peers,
            bytes_to_coordinator,
        };
        self.steps.extend(frames);
        self.steps.push_back(AggStep::Report(Box::new(outcome)));
        self.finished = true;
        Ok(())
    }
}

/// The zCDP ρ of a noised aggregate release: what the honest parties' noise gives each column
/// (KLS21's `ε_c`, as reported in the result), composed: `ρ = Σ_c ε_c² / 2`.
fn release_rho(plan: &NoisePlan, sensitivities: &[u64]) -> f64 {
    let e = aggregate::composed_epsilon(&plan.describe(sensitivities));
    e * e / 2.0
}

/// Checks terms a peer sent against what an honest node sends: ε finite and ≥ 0 (0 = no
/// noise), fewer colluders than parties, one sensitivity per column of the job, each ≥ 1 and
/// no larger than an `i64` clipping bound allows. (A huge ε or `min_result` needs no check: the
/// joint terms take the smallest ε and the largest threshold, so they only make the release
/// more private.)
pub fn check_peer_terms(
    terms: &AggregateTerms,
    parties: usize,
    columns: usize,
) -> Result<(), String> {
    if !terms.epsilon.is_finite() || terms.epsilon < 0.0 {
        return Err(format!(
            "hello declares epsilon {}, not a finite number >= 0",
            terms.epsilon
        ));
    }
    if terms.max_colluders as usize >= parties {
        return Err(format!(
            "hello declares {} colluders among {parties} parties",
            terms.max_colluders
        ));
    }
    if terms.sensitivities.len() != columns {
        return Err(format!(
            "hello declares {} column sensitivities for a job of {columns} columns",
            terms.sensitivities.len()
        ));
    }
    if let Some(s) = terms.sensitivities.iter().find(|&&s| s == 0 || s > 1 << 63) {
        return Err(format!("hello declares a column sensitivity of {s}"));
    }
    Ok(())
}

/// The strictest of all parties' terms: smallest positive ε (none if no party asks for
/// noise), most colluders (clamped below `n`), largest k-threshold, largest sensitivity per
/// column. Every party must send one sensitivity per column.
fn joint_terms(all: &[&AggregateTerms], n: usize) -> Result<JointTerms, String> {
    let columns = all.first().map_or(0, |t| t.sensitivities.len());
    if all.iter().any(|t| t.sensitivities.len() != columns) {
        return Err("parties declare different numbers of columns".into());
    }
    if all
        .iter()
        .any(|t| !t.epsilon.is_finite() || t.epsilon < 0.0)
    {
        return Err("a party declares an invalid epsilon".into());
    }
    let epsilon = all
        .iter()
        .map(|t| t.epsilon)
        .filter(|e| *e > 0.0)
        .min_by(f64::total_cmp);
    let sensitivities = (0..columns)
        .map(|c| {
            all.iter()
                .map(|t| t.sensitivities[c])
                .max()
                .unwrap_or(1)
                .max(1)
        })
        .collect();
    Ok(JointTerms {
        epsilon,
        max_colluders: all
            .iter()
            .map(|t| t.max_colluders)
            .max()
            .unwrap_or(0)
            .min(n.saturating_sub(1) as u32),
        min_result: all.iter().map(|t| t.min_result).max().unwrap_or(1),
        sensitivities,
    })
}

/// A digest of the spec and the joint terms: equal at every party of an honest run, so the
/// coordinator can tell that all partials were built under the same terms.
fn terms_digest(spec_digest: &[u8], joint: &JointTerms) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"cleanroom/1 aggregate terms\0");
    h.update(spec_digest);
    h.update(joint.epsilon.unwrap_or(0.0).to_bits().to_le_bytes());
    h.update(joint.max_colluders.to_le_bytes());
    h.update(joint.min_result.to_le_bytes());
    for s in &joint.sensitivities {
        h.update(s.to_le_bytes());
    }
    h.finalize().into()
}

fn describe_noise(plan: &NoisePlan, joint: &JointTerms, columns: &[String]) -> Vec<ColumnNoise> {
    plan.describe(&joint.sensitivities)
        .into_iter()
        .zip(columns)
        .zip(&joint.sensitivities)
        .map(|((d, name), &sensitivity)| match d {
            Some(d) => ColumnNoise {
                column: name.clone(),
                noised: true,
                share_sigma: d.share_sigma,
                total_sd: d.total_sd,
                zcdp_epsilon: d.zcdp_epsilon,
                sensitivity,
            },
            None => ColumnNoise {
                column: name.clone(),
                noised: false,
                sensitivity,
                ..ColumnNoise::default()
            },
        })
        .collect()
}

/// Bytes an envelope takes on the wire (length prefix included).
fn framed_len(envelope: &Envelope) -> u64 {
    use prost::Message;
    (envelope.encoded_len() + cleanroom_proto::frame::LEN_PREFIX) as u64
}

/// Checks a peer's `AggregateHello`: this job, the share phase, the sender it claims is the
/// certificate's, the same spec, a well-formed seed and terms.
pub fn check_hello(
    job_id: &str,
    peer: &str,
    digest: &[u8],
    hello: Envelope,
) -> Result<PeerShare, String> {
    cleanroom_proto::frame::check_envelope(&hello, job_id, Phase::AggShare)
        .map_err(|e| e.to_string())?;
    let Some(Body::AggHello(h)) = hello.body else {
        return Err("first frame is not an AggregateHello".into());
    };
    if h.sender != peer {
        return Err(format!(
            "hello claims to be from '{}' on a connection certified as '{peer}'",
            h.sender.escape_default()
        ));
    }
    if h.spec_digest != digest {
        return Err("the peer runs a different job spec".into());
    }
    let seed = ShareSeed::decode(&h.share_seed).map_err(|e| e.to_string())?;
    let terms = h.terms.ok_or("hello without terms")?;
    if terms.sensitivities.len() > 1 + cleanroom_circuits::aggregate::MAX_CELLS {
        return Err("hello declares too many columns".into());
    }
    Ok(PeerShare { seed, terms })
}

#[cfg(test)]
mod tests {
    use super::*;
    fn terms(eps: f64, t: u32, k: u64, s: &[u64]) -> AggregateTerms {
        AggregateTerms {
            epsilon: eps,
            max_colluders: t,
            min_result: k,
            sensitivities: s.to_vec(),
        }
    }

    #[test]
    fn joint_terms_are_the_strictest() {
        let a = terms(1.0, 1, 5, &[1, 100]);
        let b = terms(0.0, 2, 3, &[1, 500]);
        let c = terms(0.5, 0, 10, &[1, 50]);
        let j = joint_terms(&[&a, &b, &c], 3).unwrap();
        assert_eq!(j.epsilon, Some(0.5));
        assert_eq!(j.max_colluders, 2);
        assert_eq!(j.min_result, 10);
        assert_eq!(j.sensitivities, vec![1, 500]);
        // Nobody asks for noise: exact.
        let z = terms(0.0, 9, 1, &[1]);
        let j = joint_terms(&[&z, &z, &z], 3).unwrap();
        assert_eq!(j.epsilon, None);
        assert_eq!(j.max_colluders, 2, "clamped below the party count");
        assert!(joint_terms(&[&a, &z], 3).is_err());
        assert!(joint_terms(&[&terms(f64::NAN, 0, 1, &[1])], 3).is_err());
    }

    #[test]
    fn peer_terms_an_honest_node_cannot_send_are_named() {
        assert!(check_peer_terms(&terms(1.0, 2, 1, &[1, 200]), 3, 2).is_ok());
        assert!(check_peer_terms(&terms(0.0, 0, u64::MAX, &[1, 1 << 63]), 3, 2).is_ok());
        let e = |t: AggregateTerms| check_peer_terms(&t, 3, 2).unwrap_err();
        assert!(e(terms(f64::NAN, 0, 1, &[1, 1])).contains("epsilon NaN"));
        assert!(e(terms(-1.0, 0, 1, &[1, 1])).contains("epsilon -1"));
        assert!(e(terms(f64::INFINITY, 0, 1, &[1, 1])).contains("epsilon inf"));
        assert!(e(terms(1.0, 3, 1, &[1, 1])).contains("3 colluders among 3 parties"));
        assert!(e(terms(1.0, 0, 1, &[1])).contains("1 column sensitivities for a job of 2"));
        assert!(e(terms(1.0, 0, 1, &[1, 0])).contains("sensitivity of 0"));
        assert!(
            e(terms(1.0, 0, 1, &[1, u64::MAX])).contains("sensitivity of 18446744073709551615")
        );
    }

    #[test]
    fn hello_checks() {
        let digest = vec![1u8; 32];
        let hello = |sender: &str, d: &[u8], seed: Vec<u8>| Envelope {
            job_id: "job-1".into(),
            phase: Phase::AggShare as i32,
            body: Some(Body::AggHello(AggregateHello {
                sender: sender.into(),
                spec_digest: d.to_vec(),
                terms: Some(terms(1.0, 1, 1, &[1])),
                share_seed: seed,
            })),
        };
        assert!(
            check_hello(
                "job-1",
                "globex",
                &digest,
                hello("globex", &digest, vec![0; 32])
            )
            .is_ok()
        );
        let e = |env| check_hello("job-1", "globex", &digest, env).err().unwrap();
        assert!(e(hello("initech", &digest, vec![0; 32])).contains("certified as 'globex'"));
        assert!(e(hello("globex", &[2u8; 32], vec![0; 32])).contains("different job spec"));
        assert!(e(hello("globex", &digest, vec![0; 31])).contains("32 bytes"));
        let mut other_job = hello("globex", &digest, vec![0; 32]);
        other_job.job_id = "job-2".into();
        assert!(check_hello("job-1", "globex", &digest, other_job).is_err());
    }
}

#[cfg(test)]
#[path = "aggregate_tests.rs"]
mod session_tests;
