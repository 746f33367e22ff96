//! Job specs the unit tests of several modules build (tests only).

use cleanroom_proto::v1::{AggregateSpec, JobKind, JobSpec, PartySpec};

/// An overlap between acme's `customers` and globex's `subscribers` on `email`, for `purpose`.
pub(crate) fn overlap_job(purpose: &str) -> JobSpec {
    let party = |node: &str, dataset: &str| PartySpec {
        node: node.into(),
        dataset: dataset.into(),
        keys: vec!["email".into()],
        learns_membership: false,
    };
    JobSpec {
        analyst: String::new(),
        kind: JobKind::Overlap as i32,
        parties: vec![party("acme", "customers"), party("globex", "subscribers")],
        purpose: purpose.into(),
        aggregate: None,
        overlap_sum: None,
    }
}

/// An aggregate job over `dataset` at each of `nodes` (no keys), for `purpose`.
pub(crate) fn aggregate_job(
    nodes: &[&str],
    dataset: &str,
    purpose: &str,
    aggregate: Option<AggregateSpec>,
) -> JobSpec {
    JobSpec {
        analyst: String::new(),
        kind: JobKind::Aggregate as i32,
        parties: nodes
            .iter()
            .map(|n| PartySpec {
                node: (*n).into(),
                dataset: dataset.into(),
                ..PartySpec::default()
            })
            .collect(),
        purpose: purpose.into(),
        aggregate,
        overlap_sum: None,
    }
}

/// Per-group sums of `sums` (and the count when `count`) grouped by `group_by` into `groups`,
/// with no group range and no person column.
pub(crate) fn aggregate_spec(
    group_by: &str,
    groups: &[&str],
    sums: &[&str],
    count: bool,
) -> AggregateSpec {
    AggregateSpec {
        group_by: group_by.into(),
        groups: groups.iter().map(|g| (*g).into()).collect(),
        sums: sums.iter().map(|s| (*s).into()).collect(),
        count,
        ..AggregateSpec::default()
    }
}
