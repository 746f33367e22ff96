//! `aggregate`: N ≥ 3 parties, all peers, each streams its masked partial sum to the
//! coordinator, which reconstructs the noised totals and applies suppression.
//!
//! The coordinator never sees a party's own figures: each partial is that party's kept share
//! plus the shares its peers expanded for it, plus its noise share — uniformly distributed on
//! its own. Only the sum of all N partials is meaningful, and it carries every party's noise.
//! If any party refuses, fails, goes away or reports a malformed partial, the job fails and
//! nothing is stored: there is no partial release.

use std::sync::Arc;

use cleanroom_circuits::aggregate::{GroupDomain, accumulate, decode_cells};
use cleanroom_proto::v1::{
    AggregateGroup, AggregateOutcome, AggregatePartyStats, AggregateResult, JobSpec, Phase,
    envelope::Body, report::Outcome,
};

use super::error::{JobError, PartyError, SettleError, Violation};
use super::pipeline::{Job, Kind, Party, Shape};
use crate::clock::now_ms;
use crate::spec::domain_of;
use crate::untrusted::node_text;

/// What one party reported (its partial went into the [`PartialSum`]).
#[derive(Debug)]
pub(crate) struct Reported {
    node: String,
    outcome: AggregateOutcome,
}

/// The running sum of all parties' partials: each batch is added (wrapping) at its place as it
/// arrives, so the coordinator holds one vector whatever the number of parties. It means
/// nothing until every party has sent all its cells, and is dropped if any fails.
type PartialSum = Arc<std::sync::Mutex<Vec<u64>>>;

/// Adds `batch` to `sum` from cell `at` on (bounds checked by the caller).
fn add_batch(sum: &PartialSum, at: usize, batch: &[u64]) {
    let mut sum = sum
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(cells) = sum.get_mut(at..at + batch.len()) {
        accumulate(cells, batch).unwrap_or_default();
    }
}

/// The settle of an aggregate: the job's vector size and the running sum of its partials.
#[derive(Debug)]
pub(crate) struct Aggregate {
    cells: usize,
    sum: PartialSum,
}

impl Aggregate {
    /// The aggregate of `spec`, with an empty sum of its cells (groups × columns).
    pub(crate) fn new(spec: &JobSpec) -> Result<Aggregate, JobError> {
        let Some(agg) = spec.aggregate.as_ref() else {
            return Err(JobError::Spec(
                "aggregate job without its group-by spec".into(),
            ));
        };
        let domain = domain_of(agg).map_err(JobError::Spec)?;
        let cells = domain.groups() * (1 + agg.sums.len());
        Ok(Aggregate {
            cells,
            sum: Arc::new(std::sync::Mutex::new(vec![0u64; cells])),
        })
    }
}

impl Kind for Aggregate {
    type Report = Reported;
    const SHAPE: Shape = Shape::Peers;
    const HOLDS_PARTIALS: bool = true;

    async fn collect(
        self: Arc<Self>,
        party: Party,
        job_id: String,
    ) -> Result<Self::Report, PartyError> {
        collect(party, &job_id, self.cells, &self.sum).await
    }

    fn settle(&self, job: &Job<'_>, reported: Vec<Self::Report>) -> Result<String, JobError> {
        // The reports come in spec order, so the per-party statistics read in the order the
        // analyst listed them.
        let total = std::mem::take(
            &mut *self
                .sum
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let (meta, domain) = result_meta(&reported, job.spec)?;
        let parties = reported.len();
        let (mut shown, mut suppressed) = (0usize, 0usize);
        let groups = release_groups(&total, &meta, &domain).inspect(|g| {
            if g.suppressed {
                suppressed += 1;
            } else {
                shown += 1;
            }
        });
        job.shared
            .store
            .put_aggregate_result_streamed(job.id, meta, groups, now_ms())
            .map_err(JobError::storing_result)?;
        Ok(format!(
            "aggregate over {parties} parties: {shown} groups released, {suppressed} suppressed"
        ))
    }
}

/// Reads one party's partial batches, adding each to `sum`, and its outcome.
async fn collect(
    mut party: Party,
    job_id: &str,
    cells: usize,
    sum: &PartialSum,
) -> Result<Reported, PartyError> {
    let node = party.node.clone();
    let violation = |v: Violation| PartyError::violation(&node, v);
    let mut received = 0usize;
    let mut batch: Vec<u64> = Vec::new();
    let mut seq = 0u64;
    loop {
        let env = party
            .recv
            .recv()
            .await
            .map_err(|e| match e {
                // Bytes no honest node sends are its violation, not a lost connection.
                cleanroom_transport::TransportError::Frame(_) => {
                    violation(Violation::UnreadableFrame(e.to_string()))
                }
                _ => PartyError::Lost {
                    node: node.clone(),
                    error: e.to_string(),
                },
            })?
            .ok_or_else(|| PartyError::Lost {
                node: node.clone(),
                error: "its job stream ended".into(),
            })?;
        if env.job_id != job_id {
            return Err(violation(Violation::FrameForAnotherJob));
        }
        match env.body {
            Some(Body::AggPartial(p)) if env.phase == Phase::AggPartial as i32 => {
                if p.seq != seq {
                    return Err(violation(Violation::PartialOutOfOrder {
                        got: p.seq,
                        due: seq,
                    }));
                }
                batch.clear();
                decode_cells(&p.cells, &mut batch, cells - received).map_err(|e| {
                    violation(Violation::BadPartial {
                        after: received,
                        error: e.to_string(),
                    })
                })?;
                add_batch(sum, received, &batch);
                received += batch.len();
                seq += 1;
            }
            Some(Body::Report(r)) if env.phase == Phase::Report as i32 => {
                party.heads.keep(&node, r.signed_head.as_ref());
                return match r.outcome {
                    Some(Outcome::Aggregate(outcome)) => {
                        if received != cells || outcome.cells != cells as u64 {
                            return Err(violation(Violation::MissingCells {
                                sent: received,
                                expected: cells,
                            }));
                        }
                        Ok(Reported { node, outcome })
                    }
                    Some(Outcome::Failure(reason)) => Err(PartyError::Failed {
                        reason: node_text(&reason),
                        node,
                    }),
                    _ => Err(violation(Violation::ReportOfAnotherKind)),
                };
            }
            _ => return Err(violation(Violation::UnexpectedFrame)),
        }
    }
}

/// Reads the noised totals from the sum of all partials and applies the k-threshold on the
/// noised count: the whole result in memory (tests; [`Aggregate::settle`] streams the groups
/// instead).
#[cfg(test)]
fn combine(
    sum: Vec<u64>,
    reported: &[Reported],
    spec: &JobSpec,
) -> Result<AggregateResult, JobError> {
    let (mut result, domain) = result_meta(reported, spec)?;
    result.groups = release_groups(&sum, &result, &domain).collect();
    result.total_groups = result.groups.len() as u64;
    Ok(result)
}

/// The groups of the release, one per row of the summed totals (each cell read as a signed
/// `i64`, two's complement), labelled by the domain, suppressed when the noised count is below
/// the result's `min_result`; produced one at a time, so 10^6 groups are never all in memory.
fn release_groups<'a>(
    sum: &'a [u64],
    meta: &AggregateResult,
    domain: &'a GroupDomain,
) -> impl Iterator<Item = AggregateGroup> + 'a {
    // The count is always the first cell of a row; `columns` names only what is shown.
    let columns = meta.columns.len() + usize::from(!meta.show_count);
    let min_result = i64::try_from(meta.min_result).unwrap_or(i64::MAX);
    let show_count = meta.show_count;
    sum.chunks(columns.max(1))
        .enumerate()
        .map(move |(index, row)| {
            let row: Vec<i64> = row.iter().map(|&c| c as i64).collect();
            let count = row.first().copied().unwrap_or(0);
            let suppressed = count < min_result;
            let values = if suppressed {
                Vec::new()
            } else if show_count {
                row
            } else {
                row[1..].to_vec()
            };
            AggregateGroup {
                label: domain.label(index),
                suppressed,
                values,
            }
        })
}

/// Everything of the result but its groups, once every party's terms are checked equal; and
/// the group domain that labels them.
fn result_meta(
    reported: &[Reported],
    spec: &JobSpec,
) -> Result<(AggregateResult, GroupDomain), JobError> {
    let Some(agg) = spec.aggregate.as_ref() else {
        return Err(JobError::Spec(
            "aggregate job without its group-by spec".into(),
        ));
    };
    let Some(first) = reported.first() else {
        return Err(SettleError::NoPartyReported.into());
    };
    // Every party must have built its partial under the same joint terms.
    if let Some(other) = reported
        .iter()
        .find(|r| r.outcome.terms_digest != first.outcome.terms_digest)
    {
        return Err(SettleError::TermsDisagree {
            a: first.node.clone(),
            b: other.node.clone(),
        }
        .into());
    }
    let min_result = first.outcome.min_result.max(1);
    let domain = domain_of(agg).map_err(JobError::Spec)?;
    let mut names = Vec::new();
    if agg.count {
        names.push("count".to_owned());
    }
    names.extend(agg.sums.iter().cloned());
    let zcdp_epsilon = first
        .outcome
        .noise
        .iter()
        .filter(|c| c.noised)
        .map(|c| c.zcdp_epsilon * c.zcdp_epsilon)
        .sum::<f64>()
        .sqrt();
    let meta = AggregateResult {
        columns: names,
        groups: Vec::new(),
        noise: first.outcome.noise.clone(),
        min_result,
        max_colluders: first.outcome.max_colluders,
        zcdp_epsilon,
        show_count: agg.count,
        parties: reported
            .iter()
            .map(|r| AggregatePartyStats {
                node: r.node.clone(),
                audit_head: r.outcome.audit_head.clone(),
                bytes_to_peers: r.outcome.bytes_to_peers,
                bytes_to_coordinator: r.outcome.bytes_to_coordinator,
            })
            .collect(),
        total_groups: 0,
    };
    Ok((meta, domain))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleanroom_circuits::aggregate::{GroupVector, accumulate_seed, split};
    use cleanroom_proto::v1::{ColumnNoise, JobState};

    use crate::test_support::{aggregate_job, aggregate_spec};

    fn spec(count: bool) -> JobSpec {
        aggregate_job(
            &["a", "b", "c"],
            "d",
            "p",
            Some(aggregate_spec("category", &["x", "y"], &["amount"], count)),
        )
    }

    /// Three parties' reports and partials.
    struct Run {
        reported: Vec<Reported>,
        partials: Vec<Vec<u64>>,
    }

    /// [`combine`] over the sum of the run's partials, as `collect` builds it.
    fn combine_run(run: &Run, spec: &JobSpec) -> Result<AggregateResult, JobError> {
        let sum: PartialSum = Arc::new(std::sync::Mutex::new(vec![0u64; 6]));
        for p in &run.partials {
            // In two batches, as a node may send them.
            add_batch(&sum, 0, &p[..4]);
            add_batch(&sum, 4, &p[4..]);
        }
        let total = std::mem::take(&mut *sum.lock().unwrap());
        combine(total, &run.reported, spec)
    }

    /// Three parties' partials of the given per-party vectors (3 groups × 2 columns).
    fn reported(inputs: &[[i64; 6]; 3], digest: u8) -> Run {
        let splits: Vec<_> = inputs
            .iter()
            .map(|x| {
                let mut v = GroupVector::zeros(3, 2).unwrap();
                for (i, &c) in x.iter().enumerate() {
                    v.add(i / 2, i % 2, c).unwrap();
                }
                split(&v, 2).unwrap()
            })
            .collect();
        let partials = (0..3)
            .map(|i| {
                let mut acc = splits[i].own.clone();
                for (j, s) in splits.iter().enumerate() {
                    if j != i {
                        accumulate_seed(&mut acc, &s.seeds[if i < j { i } else { i - 1 }]);
                    }
                }
                acc
            })
            .collect();
        let reported = (0..3)
            .map(|i| Reported {
                node: format!("n{i}"),
                outcome: AggregateOutcome {
                    cells: 6,
                    min_result: 5,
                    terms_digest: vec![digest],
                    noise: vec![ColumnNoise {
                        column: "count".into(),
                        ..ColumnNoise::default()
                    }],
                    ..AggregateOutcome::default()
                },
            })
            .collect();
        Run { reported, partials }
    }

    #[test]
    fn totals_are_reconstructed_and_small_groups_suppressed() {
        let inputs = [
            [3, 300, 1, 10, 0, 0],
            [3, 30, 1, 20, 2, 5],
            [4, -5, 1, 1, 0, 0],
        ];
        let r = combine_run(&reported(&inputs, 1), &spec(true)).unwrap();
        assert_eq!(r.columns, vec!["count", "amount"]);
        assert_eq!(r.groups[0].label, "x");
        assert_eq!(r.groups[0].values, vec![10, 325]);
        assert!(!r.groups[0].suppressed);
        // y: count 3 < 5; (other): count 2 < 5.
        assert!(r.groups[1].suppressed && r.groups[1].values.is_empty());
        assert_eq!(r.groups[2].label, "(other)");
        assert!(r.groups[2].suppressed);
        // Without --count the count is used for suppression but not shown.
        let r = combine_run(&reported(&inputs, 1), &spec(false)).unwrap();
        assert_eq!(r.columns, vec!["amount"]);
        assert_eq!(r.groups[0].values, vec![325]);
    }

    #[test]
    fn integer_domains_are_labelled_by_their_integers() {
        let inputs = [
            [3, 30, 1, 1, 2, 2],
            [3, 30, 1, 1, 2, 2],
            [3, 30, 1, 1, 2, 2],
        ];
        let mut s = spec(true);
        let a = s.aggregate.as_mut().unwrap();
        a.groups.clear();
        a.group_range = Some(cleanroom_proto::v1::IntegerRange { lo: -1, hi: 1 });
        let r = combine_run(&reported(&inputs, 1), &s).unwrap();
        let labels: Vec<&str> = r.groups.iter().map(|g| g.label.as_str()).collect();
        assert_eq!(labels, ["-1", "0", "(other)"]);
        assert_eq!(r.total_groups, 3);
        assert_eq!(r.groups[0].values, vec![9, 90]);
        assert_eq!(r.groups[2].values, vec![6, 6]);
    }

    #[test]
    fn different_terms_release_nothing() {
        let inputs = [[1; 6], [1; 6], [1; 6]];
        let mut r = reported(&inputs, 1);
        r.reported[2].outcome.terms_digest = vec![2];
        let err = combine_run(&r, &spec(true)).unwrap_err();
        assert!(matches!(
            &err,
            JobError::Settle(SettleError::TermsDisagree { a, b }) if a == "n0" && b == "n2"
        ));
        let (state, reason) = (err.state(), err.to_string());
        assert_eq!(state, JobState::Failed);
        assert!(reason.contains("different terms"), "{reason}");
    }

    #[test]
    fn one_partial_alone_reveals_nothing_of_its_party() {
        // A party's partial is masked by its peers' seeds: for the same inputs, two runs give
        // unrelated partials, while the totals agree.
        let inputs = [[5, 500, 0, 0, 0, 0], [5, 1, 0, 0, 0, 0], [5, 2, 0, 0, 0, 0]];
        let a = reported(&inputs, 1);
        let b = reported(&inputs, 1);
        assert_ne!(a.partials[0], b.partials[0]);
        assert_ne!(a.partials[0][1], 500);
        let ta = combine_run(&a, &spec(true)).unwrap();
        let tb = combine_run(&b, &spec(true)).unwrap();
        assert_eq!(ta, tb);
        assert_eq!(ta.groups[0].values, vec![15, 503]);
    }
}
