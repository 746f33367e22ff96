//! What the node's tasks share: the current policy, the audit log, the run history that rate
//! limits are checked against, the privacy-budget ledger, and the jobs waiting for a peer.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cleanroom_proto::v1::{Envelope, OfferReply, Phase, envelope::Body};

use crate::audit::{AuditError, AuditEvent, AuditLog};
use crate::dataplane::Waiting;
use crate::ledger::{Ledger, LedgerError};
use crate::policy::NodeConfig;
use crate::policy::PolicyHolder;
use crate::policy::{Permit, Veto};

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

/// Accepted runs, rebuilt from the audit log at start. (ε spent lives in the ledger.)
#[derive(Debug, Default)]
struct History {
    runs: HashMap<RunKey, Vec<i64>>,
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
    /// The privacy-budget ledger: the one record of ε spent, and of noised releases.
    pub ledger: Ledger,
    /// The data-plane address other nodes dial.
    pub advertise: cleanroom_transport::HostPort,
    history: Mutex<History>,
    /// The jobs waiting for a peer's data-plane connection.
    pub waiting: Arc<Waiting>,
    /// The node's metrics, fed by every audit append (set up by [`NodeState::new`]).
    pub metrics: Arc<crate::metrics::NodeMetrics>,
    /// The key this node signs its audit heads with (`<state_dir>/audit-signing.key`); `None`
    /// only in tests that build a state without one.
    audit_key: Option<cleanroom_circuits::audit_head::AuditSigningKey>,
}

impl NodeState {
    /// Builds the state, replaying the audit log into the run history.
    pub fn new(
        policy: PolicyHolder,
        config_path: PathBuf,
        audit: AuditLog,
        ledger: Ledger,
        advertise: cleanroom_transport::HostPort,
    ) -> Result<Self, AuditError> {
        let mut history = History::default();
        for entry in crate::audit::read_entries(audit.path())? {
            if let AuditEvent::Decision {
                partner,
                computation,
                dataset,
                keys,
                accepted: true,
                ..
            } = entry.event
            {
                let key = RunKey::of(&partner, &computation, &dataset, &keys);
                history.runs.entry(key).or_default().push(entry.at_ms);
            }
        }
        let metrics = Arc::new(crate::metrics::NodeMetrics::new());
        let observer = metrics.clone();
        audit.observe(Box::new(move |event, at_ms| observer.audited(event, at_ms)));
        Ok(Self {
            policy,
            config_path,
            metrics,
            audit,
            ledger,
            advertise,
            history: Mutex::new(history),
            waiting: Arc::new(Waiting::default()),
            audit_key: None,
        })
    }

    /// The state, signing its audit heads with `key`.
    pub fn with_audit_key(mut self, key: cleanroom_circuits::audit_head::AuditSigningKey) -> Self {
        self.audit_key = Some(key);
        self
    }

    /// This node's answer to offer `job_id`, with its signed audit head.
    pub fn offer_reply(&self, job_id: &str, accept: bool, reason: String) -> Envelope {
        Envelope {
            job_id: job_id.to_owned(),
            phase: Phase::Offer as i32,
            body: Some(Body::OfferReply(OfferReply {
                accept,
                reason,
                signed_head: self.signed_head(),
            })),
        }
    }

    /// The audit log's head now, signed with the node's audit key (reported with every offer
    /// reply and report, so the coordinator can keep it).
    pub fn signed_head(&self) -> Option<cleanroom_proto::v1::SignedAuditHead> {
        let key = self.audit_key.as_ref()?;
        let head = self.audit.head().to_string();
        let name = self.cfg().name.clone();
        Some(cleanroom_proto::v1::SignedAuditHead {
            signature: key.sign(&name, &head).to_vec(),
            public_key: key.public_key().to_vec(),
            head,
        })
    }

    /// The policy in force now.
    pub fn cfg(&self) -> std::sync::Arc<NodeConfig> {
        self.policy.current()
    }

    /// Decides an offer: the agreement, then its rate limit and whether its ε still fits the
    /// budgets in the ledger, and records the decision in the audit log — all under one lock,
    /// so concurrent offers cannot both take the last run. An offer whose decision cannot be
    /// audited is refused. (The ε check here vetoes early with the reason; the binding charge is
    /// made in the ledger when the job releases, so a job that loses a race for the last ε
    /// still cannot overspend.)
    pub fn decide(
        &self,
        job_id: &str,
        spec: &cleanroom_proto::v1::JobSpec,
        me: usize,
        now_ms: i64,
    ) -> Result<(u64, Permit), Veto> {
        let (generation, cfg) = self.policy.snapshot();
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let decision = crate::kind::check_offer(&cfg, spec, me, now_ms).and_then(|permit| {
            let key = run_key(spec, me, &permit);
            if let Some(counter) = &permit.runs {
                counter.check(
                    history.runs.get(&key).map(Vec::as_slice).unwrap_or(&[]),
                    now_ms,
                )?;
            }
            // A release that would spend ε must fit the budgets, and its key must never have
            // been charged: a repeated offer of a charged job is refused (its data may have
            // changed, and its noise was never kept).
            if let Some(charge) = permit.charge(job_id, &cfg) {
                let key = crate::spec::release_key(job_id, spec);
                self.ledger
                    .check(&key, &charge, now_ms)
                    .map_err(|e| budget_veto(&cfg.name, e))?;
            }
            Ok(permit)
        });
        let mine = spec.parties.get(me).cloned().unwrap_or_default();
        let partner = crate::kind::audit_partner(spec, me);
        let event = AuditEvent::Decision {
            job_id: job_id.to_owned(),
            partner: partner.clone(),
            purpose: spec.purpose.clone(),
            computation: crate::spec::computation_name(spec.kind).to_owned(),
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
            if let crate::audit::AuditError::Tampered { reason, .. } = &e {
                return Err(Veto(format!(
                    "node '{}' refuses every job: its audit log does not verify ({reason}); its \
                     operator must restore the log and restart the node",
                    cfg.name
                )));
            }
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
        crate::kind::recheck(&cfg, spec, me, now_ms, permit)
    }
}

/// A budget refusal is the analyst's veto reason as is; a ledger that cannot be read refuses
/// every DP job (its details go to the node's log, not to the analyst).
pub fn budget_veto(node: &str, error: LedgerError) -> Veto {
    match error {
        LedgerError::Refused(reason) => Veto(reason),
        e @ LedgerError::AlreadyCharged { .. } => Veto(e.to_string()),
        other => {
            tracing::error!(error = %other, "privacy-budget ledger unusable; refusing DP jobs");
            Veto(format!(
                "node '{node}' cannot read its privacy-budget ledger, so it refuses jobs that \
                 spend epsilon until that is fixed"
            ))
        }
    }
}

fn run_key(spec: &cleanroom_proto::v1::JobSpec, me: usize, permit: &Permit) -> RunKey {
    let mine = spec.parties.get(me).cloned().unwrap_or_default();
    RunKey::of(
        &permit.partner,
        crate::spec::computation_name(spec.kind),
        &mine.dataset,
        &mine.keys,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleanroom_proto::v1::{JobKind, JobSpec};
    use std::path::Path;

    use crate::test_fixtures::{NOW, customers, epsilon_charge, node_head, two_party_spec};

    fn config_text() -> String {
        node_head("acme")
            + &customers("acme.csv")
            + r#"
[[agreement]]
partner = "globex"
purposes = ["reporting"]
budget_per_purpose = { epsilon_per_period = 1, period = "day" }
  [[agreement.allow]]
  computation = "overlap"
  dataset = "customers"
  keys = ["email"]
  epsilon = 0.5
"#
    }

    fn spec() -> JobSpec {
        two_party_spec(JobKind::Overlap, "reporting", false)
    }

    fn node_state(dir: &Path) -> NodeState {
        let cfg = NodeConfig::parse(&config_text(), &dir.join("acme.toml")).unwrap();
        let audit = AuditLog::open(&dir.join("audit.log")).unwrap();
        let ledger = Ledger::open(&dir.join("ledger.sqlite")).unwrap();
        NodeState::new(
            PolicyHolder::new(cfg),
            dir.join("acme.toml"),
            audit,
            ledger,
            "127.0.0.1:1".parse().unwrap(),
        )
        .unwrap()
    }

    fn spend(state: &NodeState, job_id: &str) {
        let charge = epsilon_charge(job_id, "globex", "reporting", 0.5);
        let key = crate::spec::release_key(job_id, &spec());
        state
            .ledger
            .charge_and_draw(&key, &charge, NOW - 1000, || Ok::<i64, String>(0))
            .unwrap();
    }

    /// Changed with the repeated-offer fix: a duplicated offer of a charged job used to be
    /// accepted (to report its stored noise again over possibly changed data); it is refused.
    #[test]
    fn offers_are_vetoed_when_the_ledger_budget_is_spent_and_charged_jobs_are_never_repeated() {
        let dir = tempfile::tempdir().unwrap();
        let state = node_state(dir.path());
        assert!(state.decide("job-1", &spec(), 0, NOW).is_ok());
        spend(&state, "job-1");
        spend(&state, "job-2");
        let veto = state.decide("job-3", &spec(), 0, NOW).unwrap_err();
        assert!(
            veto.0.starts_with(
                "privacy budget for purpose 'reporting' with globex exhausted: 1 of 1 per day \
                 spent, 0 remains, this job needs 0.5"
            ),
            "{veto}"
        );
        // A repeated offer of a charged job is refused with what the analyst can do.
        let veto = state.decide("job-2", &spec(), 0, NOW).unwrap_err();
        assert!(
            veto.0
                .starts_with("job job-2's release was already charged")
                && veto
                    .0
                    .ends_with("retry it as a new job with `cleanroom job retry job-2`"),
            "{veto}"
        );
        // The veto is audited.
        let entries = crate::audit::read_entries(&dir.path().join("audit.log")).unwrap();
        assert!(entries.iter().any(|e| matches!(
            &e.event,
            AuditEvent::Decision { job_id, accepted: false, reason, .. }
                if job_id == "job-3" && reason.contains("exhausted")
        )));
        // The spend outlives the state (a restart): a fresh state still refuses.
        drop(state);
        let state = node_state(dir.path());
        assert!(state.decide("job-4", &spec(), 0, NOW).is_err());
    }
}
