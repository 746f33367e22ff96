//! What the node's unit tests share: the lines every test config starts with, the `customers`
//! and `chargebacks` datasets, and the job specs the policy and protocol tests offer. A test
//! writes only what it is about (its agreements, its extra keys) and takes the rest from here.

use std::path::Path;

use cleanroom_proto::v1::{AggregateSpec, JobKind, JobSpec, PartySpec};

use crate::ledger::{Charge, Loss};
use crate::policy::NodeConfig;

/// 2026-07-01T00:00:00Z in Unix milliseconds: the clock the tests run at.
pub(crate) const NOW: i64 = 1_782_864_000_000;

/// The top-level keys every test node config starts with: the node's `name`, the coordinator's
/// and its own addresses, its state directory, and TLS files that no unit test reads. More
/// top-level keys (a node-wide `budget`), datasets and agreements follow.
pub(crate) fn node_head(name: &str) -> String {
    format!(
        r#"
name = "{name}"
coordinator = "127.0.0.1:7400"
listen = "127.0.0.1:0"
state_dir = "state"
tls = {{ ca = "ca.pem", cert = "node.pem", key = "node.key" }}
"#
    )
}

/// Dataset `customers` in the CSV file `path`, keyed by `email` or `phone`; more
/// `[[dataset.identifier]]` or `[[dataset.value]]` tables may follow it.
pub(crate) fn customers(path: &str) -> String {
    format!(
        r#"[[dataset]]
name = "customers"
path = "{path}"
  [[dataset.identifier]]
  name = "email"
  column = "email"
  normaliser = "email"
  [[dataset.identifier]]
  name = "phone"
  column = "phone"
  normaliser = "phone"
"#
    )
}

/// A two-party job on both parties' `customers` keyed by `email`: acme (party 0) and globex.
pub(crate) fn two_party_spec(kind: JobKind, purpose: &str, learns_membership: bool) -> JobSpec {
    let party = |node: &str| PartySpec {
        node: node.into(),
        dataset: "customers".into(),
        keys: vec!["email".into()],
        learns_membership,
    };
    JobSpec {
        kind: kind as i32,
        parties: vec![party("acme"), party("globex")],
        purpose: purpose.into(),
        ..JobSpec::default()
    }
}

/// `me`'s config with dataset `chargebacks` (value column `amount` in [0, 100000]) and, for
/// each `(partner, allow)`, an agreement for purpose `fraud-benchmark` whose aggregate entry on
/// `chargebacks`, grouped by `category`, goes on with the keys in `allow`.
pub(crate) fn chargebacks_config(me: &str, agreements: &[(&str, &str)]) -> NodeConfig {
    let mut text = node_head(me);
    text.push_str(
        r#"budget = { epsilon_per_period = 100 }
[[dataset]]
name = "chargebacks"
path = "cb.csv"
  [[dataset.value]]
  column = "amount"
  min = 0
  max = 100000
"#,
    );
    for (partner, allow) in agreements {
        text.push_str(&format!(
            r#"
[[agreement]]
partner = "{partner}"
purposes = ["fraud-benchmark"]
  [[agreement.allow]]
  computation = "aggregate"
  dataset = "chargebacks"
  group_by = ["category"]
{allow}
"#
        ));
    }
    NodeConfig::parse(&text, Path::new("/srv/node.toml")).expect("test config")
}

/// An aggregate over `parties`' `chargebacks`: the count and the sum of `amount` per
/// `category`, for groups `a` and `b`, for purpose `fraud-benchmark`.
pub(crate) fn aggregate_spec(parties: &[&str]) -> JobSpec {
    JobSpec {
        kind: JobKind::Aggregate as i32,
        parties: parties
            .iter()
            .map(|n| PartySpec {
                node: (*n).into(),
                dataset: "chargebacks".into(),
                keys: vec![],
                learns_membership: false,
            })
            .collect(),
        purpose: "fraud-benchmark".into(),
        aggregate: Some(AggregateSpec {
            group_by: "category".into(),
            groups: vec!["a".into(), "b".into()],
            sums: vec!["amount".into()],
            count: true,
            group_range: None,
            person: String::new(),
        }),
        ..JobSpec::default()
    }
}

/// A ledger charge of `epsilon` for job `job_id` under `partner`'s `purpose`, with no caps.
pub(crate) fn epsilon_charge(job_id: &str, partner: &str, purpose: &str, epsilon: f64) -> Charge {
    Charge {
        job_id: job_id.into(),
        partner: partner.into(),
        purpose: purpose.into(),
        loss: Loss::Epsilon(epsilon),
        purpose_caps: Vec::new(),
        node_cap: None,
        delta: crate::ledger::DEFAULT_DP_DELTA,
    }
}
