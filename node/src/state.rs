//! What the node's tasks share: the current policy, the audit log, the run history that rate
//! limits and the privacy budget are checked against, and the jobs waiting for a peer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;

use cleanroom_transport::Identity;
use tokio::sync::oneshot;

use crate::agreement::{self, Permit, Veto};
use crate::audit::{AuditError, AuditEvent, AuditLog};
use crate::config::{Epsilon, NodeConfig};
use crate::dataplane::Handover;
use crate::policy::PolicyHolder;

/// Which allow entry a run was accepted under: rate limits count per entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RunKey {
    partner: String,
    computation: String,
    dataset: String,
    keys: String,
}

impl RunKey {
    fn of(partner: &str, computation: &str, dataset: &str, keys: &[String]) -> Self {
        Self {
            partner: partner.to_owned(),
            computation: computation.to_owned(),
            dataset: dataset.to_owned(),
            keys: keys.join("+"),
        }
    }
}

/// Accepted runs and ε released, rebuilt from the audit log at start.
#[derive(Debug, Default)]
struct History {
    runs: HashMap<RunKey, Vec<i64>>,
    spent: Vec<(i64, Epsilon)>,
}

/// The node's shared state.
#[derive(Debug)]
pub struct NodeState {
    /// The policy (config), reloadable.
    pub policy: PolicyHolder,
    /// The config file, for reloads.
    pub config_path: PathBuf,
    /// The audit log. Every decision, access, release and error goes here first.
    pub audit: AuditLog,
    /// The data-plane address other nodes dial.
    pub advertise: SocketAddr,
    history: Mutex<History>,
    pending: Mutex<HashMap<String, PendingJob>>,
}

#[derive(Debug)]
struct PendingJob {
    partner: String,
    deliver: oneshot::Sender<Handover>,
}

impl NodeState {
    /// Builds the state, replaying the audit log into the run history.
    pub fn new(
        policy: PolicyHolder,
        config_path: PathBuf,
        audit: AuditLog,
        advertise: SocketAddr,
    ) -> Result<Self, AuditError> {
        let mut history = History::default();
        for entry in crate::audit::read_entries(audit.path())? {
            match entry.event {
                AuditEvent::Decision {
                    partner,
                    computation,
                    dataset,
                    keys,
                    accepted: true,
                    ..
                } => {
                    let key = RunKey::of(&partner, &computation, &dataset, &keys);
                    history.runs.entry(key).or_default().push(entry.at_ms);
                }
                AuditEvent::Release { epsilon, .. } if epsilon > 0.0 => {
                    if let Some(e) = Epsilon::new(epsilon) {
                        history.spent.push((entry.at_ms, e));
                    }
                }
                _ => {}
            }
        }
        Ok(Self {
            policy,
            config_path,
            audit,
            advertise,
            history: Mutex::new(history),
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// The policy in force now.
    pub fn cfg(&self) -> std::sync::Arc<NodeConfig> {
        self.policy.current()
    }

    /// Decides an offer: the agreement, then its rate limit and the node-wide budget, and
    /// records the decision in the audit log — all under one lock, so concurrent offers cannot
    /// both take the last run. An offer whose decision cannot be audited is refused.
    pub fn decide(
        &self,
        job_id: &str,
        spec: &cleanroom_proto::v1::JobSpec,
        me: usize,
        now_ms: i64,
    ) -> Result<(u64, Permit), Veto> {
        let (generation, cfg) = self.policy.snapshot();
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let checked = if is_aggregate(spec) {
            // N parties, one agreement with each peer; the release goes to the coordinator only.
            crate::aggregate_policy::check_offer_at(&cfg, spec, me, now_ms).map(|p| p.permit)
        } else {
            agreement::check_offer_at(&cfg, spec, me, now_ms)
        };
        let decision = checked.and_then(|permit| {
            // ECDH-PSI gives both parties the count: an agreement that forbids the partner
            // learning counts cannot be honoured by this protocol, so the job is refused.
            if !is_aggregate(spec) && !permit.counts_allowed_to(crate::config::Recipient::Partner) {
                return Err(Veto(format!(
                    "this computation reveals the count to {}, and the agreement does not allow counts to the partner",
                    permit.partner
                )));
            }
            let key = run_key(spec, me, &permit);
            if let Some(counter) = &permit.runs {
                counter.check(history.runs.get(&key).map(Vec::as_slice).unwrap_or(&[]), now_ms)?;
            }
            if let Some(epsilon) = permit.epsilon {
                agreement::check_budget(cfg.budget.as_ref(), &history.spent, now_ms, epsilon)?;
            }
            Ok(permit)
        });
        let mine = spec.parties.get(me).cloned().unwrap_or_default();
        let partner = if is_aggregate(spec) {
            aggregate_peers(spec, me)
        } else {
            spec.parties
                .get(1 - me.min(1))
                .map(|p| p.node.clone())
                .unwrap_or_default()
        };
        let event = AuditEvent::Decision {
            job_id: job_id.to_owned(),
            partner: partner.clone(),
            purpose: spec.purpose.clone(),
            computation: computation_name(spec.kind).to_owned(),
            dataset: mine.dataset.clone(),
            keys: mine.keys.clone(),
            accepted: decision.is_ok(),
            reason: decision
                .as_ref()
                .err()
                .map(|v| v.0.clone())
                .unwrap_or_default(),
        };
        if let Err(e) = self.audit.append(event, now_ms) {
            tracing::error!(error = %e, "audit log write failed; refusing the job");
            return Err(Veto(format!(
                "node '{}' cannot write its audit log, so it refuses every job until that is fixed",
                cfg.name
            )));
        }
        let permit = decision?;
        history
            .runs
            .entry(run_key(spec, me, &permit))
            .or_default()
            .push(now_ms);
        Ok((generation, permit))
    }

    /// Records ε spent by a release (for the node-wide budget).
    pub fn record_spend(&self, now_ms: i64, epsilon: Epsilon) {
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history.spent.push((now_ms, epsilon));
    }

    /// Re-checks a running job if the policy was reloaded since `generation`.
    pub fn recheck(
        &self,
        generation: u64,
        spec: &cleanroom_proto::v1::JobSpec,
        me: usize,
        permit: &Permit,
        now_ms: i64,
    ) -> Result<(), Veto> {
        let (now_generation, cfg) = self.policy.snapshot();
        if now_generation == generation {
            return Ok(());
        }
        if is_aggregate(spec) {
            let fresh = crate::aggregate_policy::check_offer_at(&cfg, spec, me, now_ms)?;
            if &fresh.permit != permit {
                return Err(Veto(format!(
                    "the policy for {} changed while the job ran; its terms no longer hold",
                    permit.partner
                )));
            }
            return Ok(());
        }
        agreement::recheck(&cfg, spec, me, now_ms, permit)
    }

    /// Registers a job whose initiator will dial us; the returned receiver yields its connection.
    pub fn expect_connection(&self, job_id: &str, partner: &str) -> oneshot::Receiver<Handover> {
        let (tx, rx) = oneshot::channel();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.insert(
            job_id.to_owned(),
            PendingJob {
                partner: partner.to_owned(),
                deliver: tx,
            },
        );
        rx
    }

    /// Forgets a job that no longer waits for a connection.
    pub fn forget_pending(&self, job_id: &str) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.remove(job_id);
    }

    /// Hands an incoming data-plane connection to the job it names, if that job waits for
    /// exactly this peer. Returns why not otherwise.
    pub fn deliver(&self, job_id: &str, peer: &Identity, handover: Handover) -> Result<(), String> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let Some(job) = pending.get(job_id) else {
            return Err(format!(
                "no job '{job_id}' is waiting for a data-plane connection"
            ));
        };
        if job.partner != peer.name {
            return Err(format!(
                "job '{job_id}' expects node '{}', but the connection is from {peer}",
                job.partner
            ));
        }
        let job = pending
            .remove(job_id)
            .ok_or_else(|| "job vanished".to_owned())?;
        job.deliver
            .send(handover)
            .map_err(|_| format!("job '{job_id}' is no longer running"))
    }
}

fn run_key(spec: &cleanroom_proto::v1::JobSpec, me: usize, permit: &Permit) -> RunKey {
    let mine = spec.parties.get(me).cloned().unwrap_or_default();
    RunKey::of(
        &permit.partner,
        computation_name(spec.kind),
        &mine.dataset,
        &mine.keys,
    )
}

/// The computation's name as the audit log and the policy spell it.
pub fn computation_name(kind: i32) -> &'static str {
    match cleanroom_proto::v1::JobKind::try_from(kind) {
        Ok(cleanroom_proto::v1::JobKind::Overlap) => "overlap",
        Ok(cleanroom_proto::v1::JobKind::Match) => "match",
        Ok(cleanroom_proto::v1::JobKind::Aggregate) => "aggregate",
        _ => "unknown",
    }
}

/// Whether `spec` is an N-party aggregate (decided by [`crate::aggregate_policy`]).
fn is_aggregate(spec: &cleanroom_proto::v1::JobSpec) -> bool {
    spec.kind == cleanroom_proto::v1::JobKind::Aggregate as i32
}

/// An aggregate's other parties, comma-separated (the audit log's partner field).
fn aggregate_peers(spec: &cleanroom_proto::v1::JobSpec, me: usize) -> String {
    let peers: Vec<&str> = spec
        .parties
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != me)
        .map(|(_, p)| p.node.as_str())
        .collect();
    peers.join(",")
}
