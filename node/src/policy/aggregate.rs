//! The allow-list check of an `aggregate` offer: N ≥ 3 parties, one agreement with each peer.
//!
//! An aggregate releases a total over every party's data to the coordinator, and each peer
//! receives a share of ours; so this node takes part only if it has an agreement with **every**
//! other party that lists the purpose and allows `aggregate` on the dataset the job names for
//! it, grouped by the job's column, summing only value columns the entry lists. The terms that
//! apply are the strictest of those entries: the largest `min_parties`, `min_result`,
//! `min_input_size` and `max_colluders`, the smallest ε and runs-per-period, and per summed
//! column the intersection of the clipping bounds.

use std::collections::HashSet;

use cleanroom_circuits::aggregate::{GroupDomain, MAX_CELLS};
use cleanroom_proto::v1::{AggregateSpec, JobKind, JobSpec};

use crate::data::{DatasetConfig, KeySpec, ValueColumn};
use crate::ledger::Epsilon;

use super::allow::AllowEntry;
use super::allow::{AggregateAllow, Allow, AllowTerms};
use super::permit::{Permit, RunCounter, Veto};
use super::schema::NodeConfig;
use super::values::{Computation, MIN_AGGREGATE_PARTIES, Membership, PolicyDate, Recipient};

/// Most parties an aggregate may have (the circuits' cap).
pub const MAX_PARTIES: usize = cleanroom_circuits::aggregate::MAX_PARTIES;

/// What the agreements let this node do in one accepted aggregate job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregatePermit {
    /// The common permit (partner = the peers' names joined with `,`).
    pub permit: Permit,
    /// This node's index in `spec.parties`.
    pub me: usize,
    /// The other parties, in spec order.
    pub peers: Vec<String>,
    /// The column rows are grouped by.
    pub group_by: String,
    /// Parties that may collude (clamped below the party count).
    pub max_colluders: u32,
    /// The public group domain (labels, or an integer range), "(other)" not included.
    pub domain: GroupDomain,
    /// Per-person clipping: the column naming each row's person (the spec's `person`, which
    /// every agreement that names one must name alike); `None` = per-row clipping.
    pub person: Option<String>,
}

/// The checks of an `aggregate` allow entry: no keys, no membership, at least one group-by
/// column, at least 3 parties, value columns declared and inside the dataset's bounds.
pub(crate) fn check_entry(
    ctx: &str,
    e: &AllowEntry,
    d: &DatasetConfig,
) -> Result<AggregateAllow, String> {
    let at = format!("{ctx}: allow aggregate on '{}'", e.dataset.get_ref());
    if !e.keys.is_empty() {
        return Err(format!("{at}: aggregate joins nothing; remove keys"));
    }
    if e.membership.is_some() || e.reveal_membership_to_partner.is_some() {
        return Err(format!("{at}: membership applies to match only"));
    }
    if e.group_by.is_empty() {
        return Err(format!(
            "{at}: group_by must list the column(s) a job may group by"
        ));
    }
    if e.group_by.iter().any(String::is_empty) {
        return Err(format!("{at}: group_by has an empty column name"));
    }
    if e.person.as_ref().is_some_and(|p| p.is_empty()) {
        return Err(format!("{at}: person names an empty column"));
    }
    if e.person.as_ref().is_some_and(|p| e.group_by.contains(p)) {
        return Err(format!(
            "{at}: person column '{}' is also a group_by column",
            e.person.as_deref().unwrap_or_default()
        ));
    }
    if e.min_parties.is_some_and(|n| n < MIN_AGGREGATE_PARTIES) {
        return Err(format!(
            "{at}: min_parties must be at least {MIN_AGGREGATE_PARTIES}"
        ));
    }
    if !e.counts_to.contains(&Recipient::Coordinator) {
        return Err(format!(
            "{at}: an aggregate releases only to the coordinator; counts_to must include it"
        ));
    }
    let mut seen = HashSet::new();
    for v in &e.value_columns {
        let col = v.column.get_ref();
        let Some(declared) = d.value(col) else {
            return Err(format!(
                "{at}: value_columns names '{col}', which dataset '{}' does not declare \
                 (declared: {})",
                d.name,
                d.value_names()
            ));
        };
        if !seen.insert(col.as_str()) {
            return Err(format!("{at}: value_columns lists '{col}' twice"));
        }
        if v.min > v.max || v.min < declared.min || v.max > declared.max {
            return Err(format!(
                "{at}: bounds [{}, {}] of '{col}' must be ordered and inside the dataset's [{}, {}]",
                v.min, v.max, declared.min, declared.max
            ));
        }
    }
    Ok(AggregateAllow {
        terms: AllowTerms::of(e),
        group_by: e.group_by.clone(),
        min_parties: e.min_parties,
        max_colluders: e.max_colluders,
        person: e.person.clone(),
    })
}

/// The group domain of an aggregate spec, checked before any work: labels or an integer range
/// (not both), the range non-empty and at most [`cleanroom_circuits::aggregate::MAX_RANGE_GROUPS`],
/// and the whole vector (groups and "(other)" times count and sums) within [`MAX_CELLS`].
pub fn domain_of(agg: &AggregateSpec) -> Result<GroupDomain, String> {
    let domain = match (&agg.group_range, agg.groups.is_empty()) {
        (Some(_), false) => {
            return Err("the aggregate gives both group labels and a group range".into());
        }
        (Some(r), true) => GroupDomain::range(r.lo, r.hi).map_err(|e| e.to_string())?,
        (None, true) => return Err("the aggregate gives no group labels or range".into()),
        (None, false) => GroupDomain::Labels(agg.groups.clone()),
    };
    let cells = domain.groups().saturating_mul(1 + agg.sums.len());
    if cells > MAX_CELLS {
        return Err(format!(
            "{} groups (with \"(other)\") × {} columns is {cells} cells; at most {MAX_CELLS}",
            domain.groups(),
            1 + agg.sums.len()
        ));
    }
    Ok(domain)
}

/// This node's index in an aggregate spec (its name must appear exactly once).
pub fn my_index(spec: &JobSpec, my_name: &str) -> Option<usize> {
    let mut found = spec
        .parties
        .iter()
        .enumerate()
        .filter(|(_, p)| p.node == my_name);
    match (found.next(), found.next()) {
        (Some((i, _)), None) => Some(i),
        _ => None,
    }
}

/// Decides an aggregate offer for party `me` at `now_ms`. See the module docs for the rules.
pub fn check_offer_at(
    cfg: &NodeConfig,
    spec: &JobSpec,
    me: usize,
    now_ms: i64,
) -> Result<AggregatePermit, Veto> {
    if JobKind::try_from(spec.kind) != Ok(JobKind::Aggregate) {
        return Err(veto("not an aggregate job"));
    }
    let Some(agg) = spec.aggregate.as_ref() else {
        return Err(veto("the aggregate job names no group-by column or sums"));
    };
    let domain = domain_of(agg).map_err(veto)?;
    let n = spec.parties.len();
    if !(MIN_AGGREGATE_PARTIES as usize..=MAX_PARTIES).contains(&n) {
        return Err(veto(format!(
            "an aggregate needs {MIN_AGGREGATE_PARTIES} to {MAX_PARTIES} parties; the offer has {n}"
        )));
    }
    let mut names = HashSet::new();
    if !spec.parties.iter().all(|p| names.insert(p.node.as_str())) {
        return Err(veto("a node appears twice among the aggregate's parties"));
    }
    let Some(mine) = spec.parties.get(me) else {
        return Err(veto(format!("offer places this node at party index {me}")));
    };
    if mine.node != cfg.name {
        return Err(veto(format!(
            "offer is for node {}, this is {}",
            mine.node, cfg.name
        )));
    }
    let Some(dataset) = cfg.dataset(&mine.dataset) else {
        return Err(veto(format!(
            "node '{}' has no dataset '{}'",
            cfg.name,
            mine.dataset.escape_default()
        )));
    };
    let consent_column = dataset.consent_column(&spec.purpose).map(str::to_owned);
    if consent_column.is_none() && dataset.consent_required {
        return Err(veto(format!(
            "dataset {} has no consent column for purpose '{}' and requires consent",
            dataset.name, spec.purpose
        )));
    }

    let peers: Vec<String> = spec
        .parties
        .iter()
        .filter(|p| p.node != cfg.name)
        .map(|p| p.node.clone())
        .collect();
    let mut entries: Vec<&AggregateAllow> = Vec::new();
    let mut expires: Option<PolicyDate> = None;
    // The per-purpose caps of the agreements involved: the aggregate's loss is charged once,
    // under the peer set as its partner scope, and must fit every one of them.
    let mut purpose_budgets: Vec<crate::policy::Budget> = Vec::new();
    for peer in &peers {
        let Some(agreement) = cfg.agreement_with(peer) else {
            return Err(veto(format!(
                "no agreement with {peer}, one of the aggregate's parties"
            )));
        };
        agreement.check_in_force(now_ms)?;
        if let Some(e) = agreement.expires {
            expires = Some(expires.map_or(e, |x: PolicyDate| x.min(e)));
        }
        if !agreement.allows_purpose(&spec.purpose) {
            return Err(veto(format!(
                "purpose '{}' not in agreement with {peer}",
                spec.purpose.escape_default()
            )));
        }
        agreement.check_analyst(&spec.analyst).map_err(veto)?;
        let Some(entry) = agreement.allow.iter().find_map(|e| match e {
            Allow::Aggregate(a)
                if a.terms.dataset == mine.dataset
                    && a.group_by.iter().any(|g| g == &agg.group_by) =>
            {
                Some(a)
            }
            _ => None,
        }) else {
            return Err(veto(format!(
                "agreement with {peer} does not allow aggregate on {} grouped by {}",
                mine.dataset, agg.group_by
            )));
        };
        // Per-person clipping: an agreement that names a person column holds its ε for a
        // person, so the job must clip per person on that column; one that names none has not
        // let the node read another column, so the job must clip per row.
        match (&entry.person, agg.person.is_empty()) {
            (Some(p), false) if *p == agg.person => {}
            (Some(p), _) => {
                return Err(veto(format!(
                    "agreement with {peer} requires per-person clipping on '{p}' (submit with \
                     --per-person {p}){}",
                    if agg.person.is_empty() {
                        String::new()
                    } else {
                        format!("; the job names '{}'", agg.person.escape_default())
                    }
                )));
            }
            (None, false) => {
                return Err(veto(format!(
                    "agreement with {peer} names no person column, so it does not allow \
                     per-person clipping on '{}'",
                    agg.person.escape_default()
                )));
            }
            (None, true) => {}
        }
        entries.push(entry);
        if let Some(b) = &agreement.budget_per_purpose
            && !purpose_budgets.contains(b)
        {
            purpose_budgets.push(b.clone());
        }
    }

    let min_parties = entries
        .iter()
        .filter_map(|e| e.min_parties)
        .max()
        .unwrap_or(MIN_AGGREGATE_PARTIES)
        .max(MIN_AGGREGATE_PARTIES);
    if (n as u64) < u64::from(min_parties) {
        return Err(veto(format!(
            "the agreements require at least {min_parties} parties for an aggregate; the job has {n}"
        )));
    }
    let max_colluders = entries
        .iter()
        .map(|e| e.max_colluders.unwrap_or(n as u32 - 1))
        .max()
        .unwrap_or(n as u32 - 1)
        .min(n as u32 - 1);

    let mut value_columns = Vec::new();
    for column in &agg.sums {
        let mut bounds: Option<(i64, i64)> = None;
        let mut spanned = None;
        for (entry, peer) in entries.iter().zip(&peers) {
            let Some(v) = entry
                .terms
                .value_columns
                .iter()
                .find(|v| v.column.get_ref() == column)
            else {
                return Err(veto(format!(
                    "agreement with {peer} does not allow summing '{column}' of {}",
                    mine.dataset
                )));
            };
            spanned.get_or_insert_with(|| v.column.clone());
            bounds = Some(match bounds {
                None => (v.min, v.max),
                Some((lo, hi)) => (lo.max(v.min), hi.min(v.max)),
            });
        }
        let (Some((min, max)), Some(column)) = (bounds, spanned) else {
            return Err(veto("no agreement covers the summed columns"));
        };
        if min > max {
            return Err(veto(format!(
                "the agreements' clipping bounds for '{}' do not overlap",
                column.get_ref()
            )));
        }
        value_columns.push(ValueColumn { column, min, max });
    }

    let epsilon: Option<Epsilon> = entries
        .iter()
        .filter_map(|e| e.terms.epsilon)
        .min_by(|a, b| a.get().total_cmp(&b.get()));
    let runs = entries
        .iter()
        .filter_map(|e| {
            e.terms.runs_per_period.map(|limit| RunCounter {
                limit: limit.get(),
                period: e.terms.period,
            })
        })
        .min_by_key(|r| r.limit);
    let max_of = |f: fn(&AllowTerms) -> u64| entries.iter().map(|e| f(&e.terms)).max().unwrap_or(1);
    let permit = Permit {
        partner: peers.join(","),
        computation: Computation::Aggregate,
        purpose: spec.purpose.clone(),
        dataset: dataset.clone(),
        keys: KeySpec::new(Vec::<String>::new()),
        min_peer_set: 0,
        max_peer_set: u64::MAX,
        partner_learns_membership: false,
        i_learn_membership: false,
        membership: Membership::None,
        min_input_size: max_of(|e| e.min_input_size.get()),
        min_result: max_of(|e| e.min_result.get()),
        counts_to: vec![Recipient::Coordinator],
        epsilon,
        runs,
        value_columns,
        consent_column,
        expires,
        purpose_budgets,
        group_by: vec![agg.group_by.clone()],
        sum_roles: Vec::new(),
    };
    Ok(AggregatePermit {
        permit,
        me,
        peers,
        group_by: agg.group_by.clone(),
        max_colluders,
        domain,
        person: (!agg.person.is_empty()).then(|| agg.person.clone()),
    })
}

fn veto(reason: impl Into<String>) -> Veto {
    Veto(reason.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::{aggregate_spec, chargebacks_config};

    /// Acme's config: an aggregate agreement with globex (amounts clipped to [0, 5000]) and
    /// one with initech ([10, 8000]), each entry going on with `extra_*`.
    fn config(extra_globex: &str, extra_initech: &str) -> NodeConfig {
        let globex = format!(
            "  value_columns = [{{ column = \"amount\", min = 0, max = 5000 }}]\n{extra_globex}"
        );
        let initech = format!(
            "  value_columns = [{{ column = \"amount\", min = 10, max = 8000 }}]\n{extra_initech}"
        );
        chargebacks_config("acme", &[("globex", &globex), ("initech", &initech)])
    }

    fn spec(parties: &[&str]) -> JobSpec {
        aggregate_spec(parties)
    }

    fn vetoed(cfg: &NodeConfig, spec: &JobSpec, me: usize) -> String {
        check_offer_at(cfg, spec, me, 0).unwrap_err().0
    }

    #[test]
    fn strictest_terms_of_all_agreements_apply() {
        let cfg = config(
            "  epsilon = 0.5\n  min_result = 5\n  max_colluders = 1",
            "  epsilon = 2.0\n  min_result = 3",
        );
        let p = check_offer_at(&cfg, &spec(&["globex", "acme", "initech"]), 1, 0).unwrap();
        assert_eq!(p.me, 1);
        assert_eq!(p.peers, vec!["globex".to_owned(), "initech".to_owned()]);
        assert_eq!(p.permit.partner, "globex,initech");
        assert_eq!(p.permit.epsilon.map(|e| e.get()), Some(0.5));
        assert_eq!(p.permit.min_result, 5);
        // initech's entry leaves colluders at the default: all but one.
        assert_eq!(p.max_colluders, 2);
        let v = &p.permit.value_columns[0];
        assert_eq!((v.min, v.max), (10, 5000));
        assert_eq!(p.group_by, "category");
    }

    /// An agreement that names a person column holds its ε for a person: the job must clip per
    /// person on exactly that column; one that names none must not be asked to read another.
    /// Every agreement's per-purpose cap travels with the charge.
    #[test]
    fn per_person_clipping_must_match_every_agreement() {
        let with_person = |spec_person: &str| {
            let mut s = spec(&["acme", "globex", "initech"]);
            s.aggregate.as_mut().unwrap().person = spec_person.into();
            s
        };
        let both = config("  person = \"customer\"", "  person = \"customer\"");
        let p = check_offer_at(&both, &with_person("customer"), 0, 0).unwrap();
        assert_eq!(p.person.as_deref(), Some("customer"));
        assert_eq!(
            vetoed(&both, &with_person(""), 0),
            "agreement with globex requires per-person clipping on 'customer' (submit with \
             --per-person customer)"
        );
        assert!(vetoed(&both, &with_person("account"), 0).ends_with("; the job names 'account'"));
        let one = config("", "  person = \"customer\"");
        assert_eq!(
            vetoed(&one, &with_person("customer"), 0),
            "agreement with globex names no person column, so it does not allow per-person \
             clipping on 'customer'"
        );
        assert!(vetoed(&one, &with_person(""), 0).contains("agreement with initech requires"));
        let none = config("", "");
        assert_eq!(
            check_offer_at(&none, &with_person(""), 0, 0)
                .unwrap()
                .person,
            None
        );

        let mut caps = config("  epsilon = 1.0", "  epsilon = 1.0");
        let cap = |e: f64| crate::policy::Budget {
            epsilon_per_period: Epsilon::new(e),
            period: crate::policy::Period::Week,
            epsilon_lifetime: Epsilon::new(10.0 * e),
        };
        caps.agreements[0].budget_per_purpose = Some(cap(20.0));
        caps.agreements[1].budget_per_purpose = Some(cap(30.0));
        let p = check_offer_at(&caps, &with_person(""), 0, 0).unwrap();
        assert_eq!(p.permit.purpose_budgets, vec![cap(20.0), cap(30.0)]);
        // The charge is a zCDP ρ = ε²/2 against both caps and the node-wide one.
        let charge = p.permit.charge("job-1", &caps).unwrap();
        assert_eq!(charge.loss, crate::ledger::Loss::Rho(0.5));
        assert_eq!(charge.purpose_caps.len(), 2);
        assert_eq!(charge.partner, "globex,initech");
    }

    #[test]
    fn refusals_name_the_rule() {
        let cfg = config("", "");
        assert!(vetoed(&cfg, &spec(&["acme", "globex"]), 0).contains("3 to"));
        assert!(vetoed(&cfg, &spec(&["acme", "globex", "acme"]), 0).contains("twice"));
        assert!(
            vetoed(&cfg, &spec(&["acme", "globex", "hooli"]), 0)
                .contains("no agreement with hooli")
        );
        assert!(
            vetoed(&cfg, &spec(&["acme", "globex", "initech"]), 1)
                .contains("offer is for node globex")
        );
        let mut s = spec(&["acme", "globex", "initech"]);
        s.purpose = "marketing".into();
        assert!(vetoed(&cfg, &s, 0).contains("purpose 'marketing'"));
        let mut s = spec(&["acme", "globex", "initech"]);
        s.aggregate.as_mut().unwrap().group_by = "email".into();
        assert!(vetoed(&cfg, &s, 0).contains("grouped by email"));
        let mut s = spec(&["acme", "globex", "initech"]);
        s.aggregate.as_mut().unwrap().sums = vec!["fee".into()];
        assert!(vetoed(&cfg, &s, 0).contains("summing 'fee'"));
        let mut s = spec(&["acme", "globex", "initech"]);
        s.aggregate = None;
        assert!(vetoed(&cfg, &s, 0).contains("names no group-by"));
        let cfg = config("  min_parties = 4", "");
        assert!(
            vetoed(&cfg, &spec(&["acme", "globex", "initech"]), 0).contains("at least 4 parties")
        );
    }

    #[test]
    fn integer_domains_are_checked_at_the_offer() {
        use cleanroom_proto::v1::IntegerRange;
        let cfg = config("", "");
        let ranged = |lo, hi| {
            let mut s = spec(&["acme", "globex", "initech"]);
            let a = s.aggregate.as_mut().unwrap();
            a.groups.clear();
            a.group_range = Some(IntegerRange { lo, hi });
            s
        };
        let p = check_offer_at(&cfg, &ranged(0, 1_000_000), 0, 0).unwrap();
        assert_eq!(
            p.domain,
            GroupDomain::Range {
                lo: 0,
                hi: 1_000_000
            }
        );
        assert_eq!(p.domain.groups(), 1_000_001);
        assert!(vetoed(&cfg, &ranged(5, 5), 0).contains("is empty"));
        assert!(vetoed(&cfg, &ranged(0, 1 << 22), 0).contains("at most 2097152"));
        let mut both = ranged(0, 10);
        both.aggregate.as_mut().unwrap().groups = vec!["a".into()];
        assert!(vetoed(&cfg, &both, 0).contains("both group labels and a group range"));
        let mut neither = ranged(0, 10);
        neither.aggregate.as_mut().unwrap().group_range = None;
        assert!(vetoed(&cfg, &neither, 0).contains("no group labels or range"));
        // 2^21 groups with 8 sums: more cells than a vector may have.
        let mut wide = ranged(0, 1 << 21);
        wide.aggregate.as_mut().unwrap().sums = (0..8).map(|i| format!("s{i}")).collect();
        assert!(vetoed(&cfg, &wide, 0).contains("cells; at most"));
    }

    #[test]
    fn disjoint_bounds_are_refused() {
        let cfg = config("", "").clone();
        let mut cfg = cfg;
        cfg.agreements[1].allow[0].terms_mut().value_columns[0].min = 6000;
        cfg.agreements[1].allow[0].terms_mut().value_columns[0].max = 7000;
        assert!(vetoed(&cfg, &spec(&["acme", "globex", "initech"]), 0).contains("do not overlap"));
    }

    #[test]
    fn index_lookup() {
        let s = spec(&["globex", "acme", "initech"]);
        assert_eq!(my_index(&s, "acme"), Some(1));
        assert_eq!(my_index(&s, "hooli"), None);
        assert_eq!(my_index(&spec(&["acme", "acme", "x"]), "acme"), None);
    }
}
