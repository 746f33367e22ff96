//! The job kinds this node runs, registered in one place: each kind's name, its shape (two
//! parties or N) and its policy check. The rest of the node asks [`Kind`] instead of branching
//! on the proto's kind number: [`crate::state::NodeState::decide`] decides an offer through
//! [`check_offer`], and [`crate::job::run_two_party`] picks the kind's protocol and driver.
//! docs/ARCHITECTURE.md lists what a new kind adds.

use cleanroom_proto::v1::{JobKind, JobSpec};

use crate::policy::{self, Permit, Recipient, Veto};

/// A job kind this node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// ECDH-PSI: the intersection's size.
    Overlap,
    /// ECDH-PSI with membership: which of our rows match.
    Match,
    /// Private intersection-sum: sums of the value holder's columns over the intersection.
    OverlapSum,
    /// Secret-shared sums over N parties' rows.
    Aggregate,
}

impl Kind {
    /// The kind of `spec`; `None` for a kind this node does not run.
    pub fn of(spec: &JobSpec) -> Option<Kind> {
        match JobKind::try_from(spec.kind) {
            Ok(JobKind::Overlap) => Some(Kind::Overlap),
            Ok(JobKind::Match) => Some(Kind::Match),
            Ok(JobKind::OverlapSum) => Some(Kind::OverlapSum),
            Ok(JobKind::Aggregate) => Some(Kind::Aggregate),
            Ok(JobKind::Unspecified) | Err(_) => None,
        }
    }

    /// The computation's name, as the policy and the audit log spell it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Overlap => "overlap",
            Kind::Match => "match",
            Kind::OverlapSum => "overlap-sum",
            Kind::Aggregate => "aggregate",
        }
    }

    /// Whether the kind runs between N parties on its offer's control stream (its own offer,
    /// start and report) rather than in the two-party pipeline.
    pub fn is_multiparty(self) -> bool {
        matches!(self, Kind::Aggregate)
    }
}

/// Decides an offer against this node's policy for its kind; returns what the agreement permits.
/// The runs and the budget are checked by the caller, which audits the decision.
pub fn check_offer(
    cfg: &policy::NodeConfig,
    spec: &JobSpec,
    me: usize,
    now_ms: i64,
) -> Result<Permit, Veto> {
    let kind = Kind::of(spec);
    match kind {
        // N parties, one agreement with each peer; the release goes to the coordinator only.
        Some(Kind::Aggregate) => {
            policy::aggregate::check_offer_at(cfg, spec, me, now_ms).map(|p| p.permit)
        }
        // Two parties (a kind this node does not run is vetoed here, by its number).
        _ => {
            let permit = policy::psi::check_offer_at(cfg, spec, me, now_ms)?;
            // ECDH-PSI gives both parties the count: an agreement that forbids the partner
            // learning counts cannot be honoured by this protocol, so the job is refused.
            if !permit.counts_allowed_to(Recipient::Partner) {
                return Err(Veto(format!(
                    "this computation reveals the count to {}, and the agreement does not allow counts to the partner",
                    permit.partner
                )));
            }
            if kind == Some(Kind::OverlapSum) {
                policy::overlap_sum::check_offer(&permit, spec, me)?;
            }
            Ok(permit)
        }
    }
}

/// Re-checks a running job against a reloaded policy: the offer's decision, taken again, must
/// permit the same terms.
pub fn recheck(
    cfg: &policy::NodeConfig,
    spec: &JobSpec,
    me: usize,
    now_ms: i64,
    permit: &Permit,
) -> Result<(), Veto> {
    match Kind::of(spec) {
        Some(Kind::Aggregate) => {
            let fresh = policy::aggregate::check_offer_at(cfg, spec, me, now_ms)?;
            if &fresh.permit != permit {
                return Err(Veto(format!(
                    "the policy for {} changed while the job ran; its terms no longer hold",
                    permit.partner
                )));
            }
            Ok(())
        }
        _ => policy::psi::recheck(cfg, spec, me, now_ms, permit),
    }
}

/// Whom the audit log names as the partner of a decision: the other party, or an aggregate's
/// other parties, comma-separated.
pub fn audit_partner(spec: &JobSpec, me: usize) -> String {
    if Kind::of(spec).is_some_and(Kind::is_multiparty) {
        let peers: Vec<&str> = spec
            .parties
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != me)
            .map(|(_, p)| p.node.as_str())
            .collect();
        peers.join(",")
    } else {
        spec.parties
            .get(1 - me.min(1))
            .map(|p| p.node.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_proto_kind_but_unspecified_is_registered_with_its_policy_name() {
        for (proto, name) in [
            (JobKind::Overlap, "overlap"),
            (JobKind::Match, "match"),
            (JobKind::OverlapSum, "overlap-sum"),
            (JobKind::Aggregate, "aggregate"),
        ] {
            let spec = JobSpec {
                kind: proto as i32,
                ..JobSpec::default()
            };
            let kind = Kind::of(&spec).expect("registered");
            assert_eq!(kind.name(), name);
            assert_eq!(kind.name(), crate::spec::computation_name(proto as i32));
            assert_eq!(kind.is_multiparty(), proto == JobKind::Aggregate);
        }
        assert_eq!(Kind::of(&JobSpec::default()), None);
    }
}
