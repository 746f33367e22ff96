//! The rules of the two-party kinds that join on keys: what an `overlap` or `match` allow entry
//! may say (`check_entry`), and the agreement check run on every two-party offer (`overlap`,
//! `match`, and the base of `overlap-sum`'s), before any data is read.
//!
//! The coordinator can ask, never order: [`check_offer`] decides from this node's own config
//! alone whether it takes part in a job, and with what limits. A refusal carries one line an
//! analyst can act on, naming the rule. [`recheck`] re-runs the check when the policy was
//! reloaded.

use cleanroom_proto::v1::{JobKind, JobSpec};

use crate::data::{DatasetConfig, KeySpec, key_name};

use super::allow::AllowEntry;
use super::allow::{Allow, AllowTerms, PsiAllow, check_keyed_terms, check_keys};
use super::permit::{Permit, RunCounter, Veto, veto};
use super::schema::NodeConfig;
use super::values::{Computation, Membership, SumRole};

/// The rules of an `overlap` or `match` entry, in order: no `group_by` or `roles`, the keys
/// ([`check_keys`]), membership only on a match, no ε on a match (its count travels with the
/// membership it releases exactly), then the common terms ([`check_keyed_terms`]).
pub(crate) fn check_entry(
    ctx: &str,
    e: &AllowEntry,
    d: &DatasetConfig,
    text: &str,
) -> Result<PsiAllow, String> {
    if !e.group_by.is_empty() || e.roles.is_some() {
        return Err(format!(
            "{ctx}: allow {} on '{}': keys group_by and roles apply to overlap-sum and \
             aggregate only",
            e.computation,
            e.dataset.get_ref()
        ));
    }
    check_keys(ctx, e, d)?;
    let overlap_membership = e.membership.is_some_and(|m| m != Membership::None)
        || e.reveal_membership_to_partner == Some(true);
    if e.computation == Computation::Overlap && overlap_membership {
        return Err(format!(
            "{ctx}: allow {} on '{}': key membership (reveal_membership_to_partner) applies \
             to match only",
            e.computation,
            e.dataset.get_ref()
        ));
    }
    // A match reveals which records are shared to the sides the entry names, and its count
    // travels with that membership: noise on the count would protect nothing, so an ε here
    // would be a promise the node cannot keep.
    if e.computation == Computation::Match && e.epsilon.is_some() {
        return Err(format!(
            "{ctx}: allow {} on '{}': key epsilon does not apply to match (membership is released exactly); remove it, or allow overlap for a differentially private count",
            e.computation,
            e.dataset.get_ref()
        ));
    }
    check_keyed_terms(ctx, e, d, text)?;
    // Who learns membership: `membership`, else the old `reveal_membership_to_partner` (`true`
    // = both), else `self`; always none for overlap.
    let membership = match (e.computation, e.membership, e.reveal_membership_to_partner) {
        (Computation::Overlap, _, _) => Membership::None,
        (_, Some(m), _) => m,
        (_, None, Some(true)) => Membership::Both,
        (_, None, _) => Membership::SelfOnly,
    };
    Ok(PsiAllow {
        terms: AllowTerms::of(e),
        keys: e.keys.clone(),
        membership,
    })
}

/// Decides whether this node takes part in `spec`, where `me` is this node's index in
/// `spec.parties` (0 = initiator, 1 = responder) and the other party is the partner.
///
/// Rules, checked in this order: exactly two distinct parties; `parties[me]` is this node; the
/// kind is overlap or match; an agreement with the partner exists; it lists the purpose; it has
/// an allow entry for the computation on `parties[me].dataset` with exactly this key
/// (`"email+phone"`, order included); the dataset exists and declares those identifiers; the
/// two parties join on the same number of key parts; for match, the partner may learn
/// membership only if the entry reveals it. `learns_membership` flags are ignored for overlap
/// (an overlap reveals no membership).
pub fn check_offer(cfg: &NodeConfig, spec: &JobSpec, me: usize) -> Result<Permit, Veto> {
    check_offer_at(cfg, spec, me, crate::clock::now_ms())
}

/// [`check_offer`] at a given time (`now_ms`, Unix milliseconds), which decides expiry: an
/// agreement `expires = "2026-06-30"` is in force through that UTC day. Also checked: the
/// agreement allows at least one computation, a dataset with `consent_required` has a consent
/// column for the purpose, and for match this node learns membership only if the entry allows.
pub fn check_offer_at(
    cfg: &NodeConfig,
    spec: &JobSpec,
    me: usize,
    now_ms: i64,
) -> Result<Permit, Veto> {
    if spec.parties.len() != 2 {
        return Err(veto(format!(
            "this node takes part only in two-party jobs; the offer has {} parties",
            spec.parties.len()
        )));
    }
    if me > 1 {
        return Err(veto(format!(
            "offer places this node at party index {me} of a two-party job"
        )));
    }
    let mine = &spec.parties[me];
    let theirs = &spec.parties[1 - me];
    if mine.node == theirs.node {
        return Err(veto(format!(
            "both parties of the job are node {}; a job needs two distinct nodes",
            mine.node
        )));
    }
    if mine.node != cfg.name {
        return Err(veto(format!(
            "offer is for node {}, this is {}",
            mine.node, cfg.name
        )));
    }
    let computation = match JobKind::try_from(spec.kind) {
        Ok(JobKind::Overlap) => Computation::Overlap,
        Ok(JobKind::Match) => Computation::Match,
        Ok(JobKind::OverlapSum) => Computation::OverlapSum,
        // Aggregate offers are decided by `crate::policy::aggregate` (N parties).
        Ok(JobKind::Unspecified | JobKind::Aggregate) | Err(_) => {
            return Err(veto(format!(
                "job kind {} is not one this node runs (overlap, match, overlap-sum)",
                spec.kind
            )));
        }
    };
    let partner = theirs.node.as_str();
    let Some(agreement) = cfg.agreement_with(partner) else {
        return Err(veto(format!("no agreement with {partner}")));
    };
    agreement.check_in_force(now_ms)?;
    if agreement.allow.is_empty() {
        return Err(veto(format!(
            "agreement with {partner} allows no computation (empty allow-list)"
        )));
    }
    if !agreement.allows_purpose(&spec.purpose) {
        return Err(veto(format!(
            "purpose '{}' not in agreement with {partner}",
            spec.purpose.escape_default()
        )));
    }
    agreement.check_analyst(&spec.analyst).map_err(veto)?;
    if mine.keys.is_empty() {
        return Err(veto("the offer names no join key for this node"));
    }
    let keys = KeySpec::new(mine.keys.iter().cloned());
    let key = key_name(&keys);
    // Said as it is: a job for a dataset this node does not have is not a matter of what the
    // agreement allows.
    if cfg.dataset(&mine.dataset).is_none() {
        return Err(veto(format!(
            "node '{}' has no dataset '{}'",
            cfg.name,
            mine.dataset.escape_default()
        )));
    }
    let Some(entry) = agreement.find_allow(computation, &mine.dataset, &key) else {
        return Err(veto(format!(
            "agreement with {partner} does not allow {computation} on {} by {key}",
            mine.dataset
        )));
    };
    // The config validation guarantees the next two; checked again so that a permit never
    // names a dataset or identifier that is not there.
    let Some(dataset) = cfg.dataset(&mine.dataset) else {
        return Err(veto(format!(
            "node '{}' has no dataset '{}'",
            cfg.name,
            mine.dataset.escape_default()
        )));
    };
    if let Some(missing) = keys.names.iter().find(|k| dataset.identifier(k).is_none()) {
        return Err(veto(format!(
            "dataset {} declares no identifier '{missing}' (declared: {})",
            dataset.name,
            dataset.identifier_names()
        )));
    }
    let consent_column = dataset.consent_column(&spec.purpose).map(str::to_owned);
    if consent_column.is_none() && dataset.consent_required {
        return Err(veto(format!(
            "dataset {} has no consent column for purpose '{}' and requires consent",
            dataset.name, spec.purpose
        )));
    }
    if theirs.keys.len() != mine.keys.len() {
        return Err(veto(format!(
            "the parties join on different numbers of key parts ({} here, {} at {partner})",
            mine.keys.len(),
            theirs.keys.len()
        )));
    }
    let (partner_learns_membership, i_learn_membership) = match computation {
        Computation::Overlap | Computation::Aggregate | Computation::OverlapSum => (false, false),
        Computation::Match => {
            let membership = entry.membership();
            if theirs.learns_membership && !membership.to_partner() {
                return Err(veto(format!(
                    "agreement with {partner} does not let {partner} learn membership"
                )));
            }
            if mine.learns_membership && !membership.to_self() {
                return Err(veto(format!(
                    "agreement with {partner} does not let {} learn membership",
                    cfg.name
                )));
            }
            (theirs.learns_membership, mine.learns_membership)
        }
    };
    let terms = entry.terms();
    let roles = match entry {
        Allow::OverlapSum(a) => a.roles.clone(),
        _ => None,
    };
    Ok(Permit {
        partner: partner.to_owned(),
        computation,
        purpose: spec.purpose.clone(),
        dataset: dataset.clone(),
        keys,
        min_peer_set: terms.min_set_size,
        max_peer_set: terms.max_set_size,
        partner_learns_membership,
        i_learn_membership,
        membership: entry.membership(),
        min_input_size: terms.min_input_size.get(),
        min_result: terms.min_result.get(),
        counts_to: terms.counts_to.clone(),
        epsilon: terms.epsilon,
        purpose_budgets: agreement.budget_per_purpose.iter().cloned().collect(),
        runs: terms.runs_per_period.map(|limit| RunCounter {
            limit: limit.get(),
            period: terms.period,
        }),
        value_columns: terms.value_columns.clone(),
        consent_column,
        expires: agreement.expires,
        group_by: entry.group_by().to_vec(),
        sum_roles: roles.unwrap_or_else(|| vec![SumRole::KeyHolder, SumRole::ValueHolder]),
    })
}

/// Re-checks a running job against `cfg` (after a policy reload): the offer must still be
/// accepted, with exactly the same permit; otherwise the job stops with the reason.
pub fn recheck(
    cfg: &NodeConfig,
    spec: &JobSpec,
    me: usize,
    now_ms: i64,
    permit: &Permit,
) -> Result<(), Veto> {
    let fresh = check_offer_at(cfg, spec, me, now_ms)?;
    if &fresh != permit {
        return Err(veto(format!(
            "the policy for {} changed while the job ran; its terms no longer hold",
            permit.partner
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Budget, Epsilon, Period};
    use crate::policy::Recipient;
    use crate::test_fixtures::{customers, node_head};
    use cleanroom_proto::v1::PartySpec;
    use std::path::Path;

    fn config_text() -> String {
        node_head("acme")
            + &customers("acme.csv")
            + r#"
[[dataset]]
name = "orders"
path = "orders.csv"
[[agreement]]
partner = "globex"
purposes = ["overlap-reporting", "fraud-detection"]
  [[agreement.allow]]
  computation = "overlap"
  dataset = "customers"
  keys = ["email", "email+phone"]
  min_set_size = 10
  max_set_size = 1000
  [[agreement.allow]]
  computation = "match"
  dataset = "customers"
  keys = ["email"]
[[agreement]]
partner = "initech"
purposes = ["fraud-detection"]
  [[agreement.allow]]
  computation = "match"
  dataset = "customers"
  keys = ["phone"]
  reveal_membership_to_partner = true
"#
    }

    fn cfg() -> NodeConfig {
        NodeConfig::parse(&config_text(), Path::new("/srv/acme/node.toml")).unwrap()
    }

    fn party(node: &str, keys: &[&str], learns: bool) -> PartySpec {
        PartySpec {
            node: node.into(),
            dataset: "customers".into(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            learns_membership: learns,
        }
    }

    fn spec(kind: JobKind, parties: Vec<PartySpec>, purpose: &str) -> JobSpec {
        JobSpec {
            analyst: String::new(),
            kind: kind as i32,
            parties,
            purpose: purpose.into(),
            aggregate: None,
            overlap_sum: None,
        }
    }

    fn overlap() -> JobSpec {
        spec(
            JobKind::Overlap,
            vec![
                party("acme", &["email"], false),
                party("globex", &["email"], false),
            ],
            "overlap-reporting",
        )
    }

    fn vetoed(spec: &JobSpec, me: usize) -> String {
        check_offer(&cfg(), spec, me).unwrap_err().0
    }

    #[test]
    fn overlap_is_permitted_with_entry_bounds() {
        let p = check_offer(&cfg(), &overlap(), 0).unwrap();
        assert_eq!(p.partner, "globex");
        assert_eq!(p.computation, Computation::Overlap);
        assert_eq!(p.purpose, "overlap-reporting");
        assert_eq!(p.dataset.name, "customers");
        assert_eq!(p.dataset.path, Path::new("/srv/acme/acme.csv"));
        assert_eq!(p.keys, KeySpec::new(["email"]));
        assert_eq!((p.min_peer_set, p.max_peer_set), (10, 1000));
        assert!(!p.partner_learns_membership && !p.i_learn_membership);
    }

    #[test]
    fn responder_side_and_composite_key() {
        let mut s = overlap();
        s.parties = vec![
            party("globex", &["mail", "tel"], false),
            party("acme", &["email", "phone"], false),
        ];
        let p = check_offer(&cfg(), &s, 1).unwrap();
        assert_eq!(p.keys, KeySpec::new(["email", "phone"]));
    }

    #[test]
    fn overlap_ignores_membership_flags() {
        let mut s = overlap();
        s.parties[0].learns_membership = true;
        s.parties[1].learns_membership = true;
        let p = check_offer(&cfg(), &s, 0).unwrap();
        assert!(!p.partner_learns_membership && !p.i_learn_membership);
    }

    #[test]
    fn exactly_two_parties() {
        let mut s = overlap();
        s.parties.push(party("initech", &["email"], false));
        assert_eq!(
            vetoed(&s, 0),
            "this node takes part only in two-party jobs; the offer has 3 parties"
        );
        s.parties.clear();
        assert!(vetoed(&s, 0).contains("0 parties"));
        assert!(vetoed(&overlap(), 2).contains("party index 2"));
    }

    #[test]
    fn parties_distinct() {
        let mut s = overlap();
        s.parties[1].node = "acme".into();
        assert_eq!(
            vetoed(&s, 0),
            "both parties of the job are node acme; a job needs two distinct nodes"
        );
    }

    #[test]
    fn offer_for_another_node() {
        assert_eq!(
            vetoed(&overlap(), 1),
            "offer is for node globex, this is acme"
        );
    }

    #[test]
    fn kind_must_be_one_this_node_runs() {
        let mut s = overlap();
        s.kind = JobKind::Unspecified as i32;
        assert!(vetoed(&s, 0).contains("(overlap, match, overlap-sum)"));
        s.kind = 99;
        assert_eq!(
            vetoed(&s, 0),
            "job kind 99 is not one this node runs (overlap, match, overlap-sum)"
        );
    }

    #[test]
    fn no_agreement() {
        let mut s = overlap();
        s.parties[1].node = "hooli".into();
        assert_eq!(vetoed(&s, 0), "no agreement with hooli");
    }

    #[test]
    fn purpose_not_in_agreement() {
        let mut s = overlap();
        s.purpose = "marketing".into();
        assert_eq!(
            vetoed(&s, 0),
            "purpose 'marketing' not in agreement with globex"
        );
    }

    #[test]
    fn no_allow_entry() {
        let mut s = overlap();
        s.kind = JobKind::Match as i32;
        s.parties[0].keys = vec!["phone".into()];
        s.parties[1].keys = vec!["phone".into()];
        assert_eq!(
            vetoed(&s, 0),
            "agreement with globex does not allow match on customers by phone"
        );
        // Key order is part of the key.
        let mut s = overlap();
        s.parties[0].keys = vec!["phone".into(), "email".into()];
        s.parties[1].keys = vec!["a".into(), "b".into()];
        assert_eq!(
            vetoed(&s, 0),
            "agreement with globex does not allow overlap on customers by phone+email"
        );
        // Another dataset (declared, not allowed).
        let mut s = overlap();
        s.parties[0].dataset = "orders".into();
        assert_eq!(
            vetoed(&s, 0),
            "agreement with globex does not allow overlap on orders by email"
        );
        // A dataset this node does not have is said as such, not as the agreement's refusal
        // ("does not allow overlap on refunds by email", as it used to read).
        let mut s = overlap();
        s.parties[0].dataset = "refunds".into();
        assert_eq!(vetoed(&s, 0), "node 'acme' has no dataset 'refunds'");
        let mut s = overlap();
        s.parties[0].keys.clear();
        assert_eq!(vetoed(&s, 0), "the offer names no join key for this node");
    }

    #[test]
    fn dataset_and_identifiers_must_exist() {
        // Unreachable through a validated config; build one by hand to exercise the check.
        let mut c = cfg();
        c.datasets.retain(|d| d.name != "customers");
        assert_eq!(
            check_offer(&c, &overlap(), 0).unwrap_err().0,
            "node 'acme' has no dataset 'customers'"
        );
        let mut c = cfg();
        c.datasets[0].identifiers.retain(|i| i.name != "email");
        assert_eq!(
            check_offer(&c, &overlap(), 0).unwrap_err().0,
            "dataset customers declares no identifier 'email' (declared: phone)"
        );
    }

    #[test]
    fn key_arity_must_agree() {
        let mut s = overlap();
        s.parties[1].keys = vec!["email".into(), "phone".into()];
        assert_eq!(
            vetoed(&s, 0),
            "the parties join on different numbers of key parts (1 here, 2 at globex)"
        );
    }

    #[test]
    fn match_membership_rules() {
        let mut s = spec(
            JobKind::Match,
            vec![
                party("acme", &["email"], true),
                party("globex", &["email"], false),
            ],
            "fraud-detection",
        );
        let p = check_offer(&cfg(), &s, 0).unwrap();
        assert!(p.i_learn_membership && !p.partner_learns_membership);
        assert_eq!(
            (p.min_peer_set, p.max_peer_set),
            (
                crate::policy::DEFAULT_MIN_SET_SIZE,
                crate::policy::DEFAULT_MAX_SET_SIZE
            )
        );

        s.parties[1].learns_membership = true;
        assert_eq!(
            vetoed(&s, 0),
            "agreement with globex does not let globex learn membership"
        );

        // initech's entry reveals membership to the partner.
        let s = spec(
            JobKind::Match,
            vec![
                party("initech", &["phone"], true),
                party("acme", &["phone"], false),
            ],
            "fraud-detection",
        );
        let p = check_offer(&cfg(), &s, 1).unwrap();
        assert!(p.partner_learns_membership && !p.i_learn_membership);
        assert_eq!(p.partner, "initech");
    }

    const JULY_1_2026_MS: i64 = 1_782_864_000_000;

    fn with(extra_agreement: &str, extra_allow: &str) -> NodeConfig {
        let text = config_text()
            .replace(
                "purposes = [\"overlap-reporting\", \"fraud-detection\"]",
                &format!(
                    "purposes = [\"overlap-reporting\", \"fraud-detection\"]\n{extra_agreement}"
                ),
            )
            .replacen(
                "  min_set_size = 10\n",
                &format!("  min_set_size = 10\n{extra_allow}\n"),
                1,
            );
        NodeConfig::parse(&text, Path::new("/srv/acme/node.toml")).unwrap()
    }

    #[test]
    fn expired_agreement_is_vetoed() {
        let c = with("expires = \"2026-06-30\"", "");
        let last_day = JULY_1_2026_MS - 1;
        assert!(check_offer_at(&c, &overlap(), 0, last_day).is_ok());
        assert_eq!(
            check_offer_at(&c, &overlap(), 0, JULY_1_2026_MS)
                .unwrap_err()
                .0,
            "agreement with globex expired 2026-06-30"
        );
        let p = check_offer_at(&c, &overlap(), 0, last_day).unwrap();
        assert_eq!(p.expires.unwrap().to_string(), "2026-06-30");
    }

    #[test]
    fn empty_allow_list_denies() {
        let mut c = cfg();
        c.agreements[0].allow.clear();
        assert_eq!(
            check_offer(&c, &overlap(), 0).unwrap_err().0,
            "agreement with globex allows no computation (empty allow-list)"
        );
    }

    #[test]
    fn permit_carries_limits() {
        let c = with(
            "budget_per_purpose = { epsilon_per_period = 1 }",
            "  min_input_size = 1000\n  min_result = 5\n  runs_per_period = 2\n  epsilon = 0.25\n  counts_to = [\"coordinator\"]",
        );
        let p = check_offer(&c, &overlap(), 0).unwrap();
        assert_eq!((p.min_input_size, p.min_result), (1000, 5));
        assert_eq!(p.epsilon.map(Epsilon::get), Some(0.25));
        assert_eq!(
            p.runs,
            Some(RunCounter {
                limit: 2,
                period: Period::Day
            })
        );
        assert!(p.counts_allowed_to(Recipient::Coordinator));
        assert!(!p.counts_allowed_to(Recipient::Partner));
        assert_eq!(
            p.check_input_size(212).unwrap_err().0,
            "input 212 rows < min_input 1000"
        );
        assert!(p.check_input_size(1000).is_ok());
        assert_eq!(p.release_count(4), None);
        assert_eq!(p.release_count(5), Some(5));
        assert_eq!(
            p.check_peer_size(9).unwrap_err().0,
            "globex declares 9 keys < min_set_size 10"
        );
        assert_eq!(
            p.check_peer_size(1001).unwrap_err().0,
            "globex declares 1001 keys > max_set_size 1000"
        );
        assert!(p.check_peer_size(10).is_ok());
    }

    #[test]
    fn run_counter_window() {
        let day = 86_400_000;
        let now = 10 * day;
        let rc = RunCounter {
            limit: 2,
            period: Period::Day,
        };
        assert!(rc.check(&[], now).is_ok());
        assert!(rc.check(&[now - 1000], now).is_ok());
        assert_eq!(
            rc.check(&[now - 1000, now - day + 1], now).unwrap_err().0,
            "runs per day exceeded (2/2)"
        );
        // A run exactly one period ago has left the window.
        assert!(rc.check(&[now - 1000, now - day], now).is_ok());
        let hourly = RunCounter {
            limit: 1,
            period: Period::Hour,
        };
        assert_eq!(
            hourly
                .check(&[now - 60_000, now - 120_000], now)
                .unwrap_err()
                .0,
            "runs per hour exceeded (2/1)"
        );
    }

    #[test]
    fn charge_carries_both_caps() {
        let c = with(
            "budget_per_purpose = { epsilon_per_period = 2, period = \"week\" }",
            "  epsilon = 0.25",
        );
        let p = check_offer(&c, &overlap(), 0).unwrap();
        let node = Budget {
            epsilon_per_period: Epsilon::new(5.0),
            period: Period::Day,
            epsilon_lifetime: None,
        };
        let mut with_node = c.clone();
        with_node.budget = Some(node.clone());
        let charge = p.charge("job-1", &with_node).unwrap();
        assert_eq!(
            (charge.job_id.as_str(), charge.partner.as_str()),
            ("job-1", "globex")
        );
        assert_eq!(
            (charge.purpose.as_str(), charge.loss),
            ("overlap-reporting", crate::ledger::Loss::Epsilon(0.25))
        );
        let [cap] = charge.purpose_caps.as_slice() else {
            panic!("{:?}", charge.purpose_caps)
        };
        assert_eq!(
            (cap.epsilon_per_period.map(Epsilon::get), cap.period),
            (Some(2.0), Period::Week)
        );
        assert_eq!(charge.node_cap, Some(node));
        assert_eq!(charge.delta, crate::ledger::DEFAULT_DP_DELTA);
        // No ε: an exact release, nothing to charge.
        assert!(
            check_offer(&cfg(), &overlap(), 0)
                .unwrap()
                .charge("job-1", &cfg())
                .is_none()
        );
    }

    #[test]
    fn membership_none_and_consent_required() {
        let c = with("", "");
        let mut c2 = c.clone();
        let Allow::Match(entry) = &mut c2.agreements[0].allow[1] else {
            panic!("the second entry is a match")
        };
        entry.membership = Membership::None;
        let s = spec(
            JobKind::Match,
            vec![
                party("acme", &["email"], true),
                party("globex", &["email"], false),
            ],
            "fraud-detection",
        );
        assert!(check_offer(&c, &s, 0).is_ok());
        assert_eq!(
            check_offer(&c2, &s, 0).unwrap_err().0,
            "agreement with globex does not let acme learn membership"
        );
        let mut c3 = c.clone();
        c3.datasets[0].consent_required = true;
        c3.datasets[0]
            .consent
            .insert("overlap-reporting".into(), "consent_reporting".into());
        let p = check_offer(&c3, &overlap(), 0).unwrap();
        assert_eq!(p.consent_column.as_deref(), Some("consent_reporting"));
        assert_eq!(
            check_offer(&c3, &s, 0).unwrap_err().0,
            "dataset customers has no consent column for purpose 'fraud-detection' and requires consent"
        );
    }

    #[test]
    fn recheck_detects_changes() {
        let c = cfg();
        let p = check_offer_at(&c, &overlap(), 0, 0).unwrap();
        assert!(recheck(&c, &overlap(), 0, 0, &p).is_ok());
        let mut tighter = c.clone();
        tighter.agreements[0].allow[0].terms_mut().min_result =
            crate::policy::Threshold::new(50).unwrap();
        assert!(
            recheck(&tighter, &overlap(), 0, 0, &p)
                .unwrap_err()
                .0
                .contains("changed")
        );
        let mut gone = c.clone();
        gone.agreements[0].purposes = vec!["fraud-detection".into()];
        assert_eq!(
            recheck(&gone, &overlap(), 0, 0, &p).unwrap_err().0,
            "purpose 'overlap-reporting' not in agreement with globex"
        );
    }
}
