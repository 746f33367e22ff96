//! Runs one `aggregate` job: offer it to all N parties, start them with every peer's address,
//! collect N masked partial sums, reconstruct the noised totals and apply suppression.
//!
//! The coordinator never sees a party's own figures: each partial is that party's kept share
//! plus the shares its peers expanded for it, plus its noise share — uniformly distributed on
//! its own. Only the sum of all N partials is meaningful, and it carries every party's noise.
//! If any party refuses, fails, goes away or reports a malformed partial, the job fails and
//! nothing is stored: there is no partial release.

use std::sync::Arc;

use cleanroom_circuits::aggregate::{GroupDomain, MAX_CELLS, accumulate, decode_cells};
use cleanroom_proto::v1::{
    AggregateGroup, AggregateOutcome, AggregatePartyStats, AggregateResult, AggregateSpec,
    Envelope, JobSpec, JobState, Offer, PeerEndpoint, Phase, Role, Start, envelope::Body,
    report::Outcome,
};
use cleanroom_transport::{FramedRecv, FramedSend};

use crate::now_ms;
use crate::runner::{FAILURE_GRACE, Failure, READY_TIMEOUT, failed, record};
use crate::server::Shared;

/// Most partial cells the coordinator receives for one job (parties × groups × columns): 2^26,
/// i.e. 512 MiB of partials on the wire. It holds only their running sum (at most
/// [`MAX_CELLS`] cells) and one batch per party at a time. 10^6 groups × 2 columns × 3 parties
/// is 6·10^6.
pub const MAX_JOB_PARTIAL_CELLS: usize = 1 << 26;

/// The group domain of an aggregate spec: its labels, or its integer range.
pub fn domain_of(agg: &AggregateSpec) -> Result<GroupDomain, String> {
    match &agg.group_range {
        Some(r) if agg.groups.is_empty() => {
            GroupDomain::range(r.lo, r.hi).map_err(|e| e.to_string())
        }
        Some(_) => {
            Err("give group labels (--groups) or a group range (--group-range), not both".into())
        }
        None => Ok(GroupDomain::Labels(agg.groups.clone())),
    }
}

/// Checks an integer-range domain at submission, before anything is stored or offered: no
/// labels beside it, a non-empty range of at most
/// [`cleanroom_circuits::aggregate::MAX_RANGE_GROUPS`] integers, a vector of at most
/// [`MAX_CELLS`] cells, and at most [`MAX_JOB_PARTIAL_CELLS`] partial cells over all parties.
pub fn validate_range_domain(parties: usize, agg: &AggregateSpec) -> Result<(), String> {
    let domain = domain_of(agg)?;
    let groups = domain.groups();
    let columns = 1 + agg.sums.len();
    let cells = groups.saturating_mul(columns);
    if cells > MAX_CELLS {
        return Err(format!(
            "{groups} groups (with \"(other)\") × {columns} columns (count and sums) is {cells} \
             cells; at most {MAX_CELLS}: a smaller --group-range or fewer --sum columns"
        ));
    }
    if cells.saturating_mul(parties) > MAX_JOB_PARTIAL_CELLS {
        return Err(format!(
            "{cells} cells × {parties} parties is more partial sums than the coordinator holds \
             for one job ({MAX_JOB_PARTIAL_CELLS} cells)"
        ));
    }
    Ok(())
}

/// One party's open job stream.
struct Party {
    node: String,
    data_addr: String,
    send: FramedSend,
    recv: FramedRecv,
}

/// What one party reported (its partial went into the [`PartialSum`]).
struct Reported {
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

/// Drives an aggregate job to a result or a failure (the caller stores the final state).
pub async fn drive(shared: &Arc<Shared>, job_id: &str, spec: &JobSpec) -> Result<String, Failure> {
    let Some(agg) = spec.aggregate.as_ref() else {
        return Err(failed("aggregate job without its group-by spec"));
    };
    let domain = domain_of(agg).map_err(failed)?;
    let groups = domain.groups();
    let columns = 1 + agg.sums.len();
    let cells = groups * columns;

    let mut handles = Vec::new();
    for party in &spec.parties {
        let Some(handle) = shared.registry.get(&party.node) else {
            return Err(failed(format!(
                "node '{}' is not connected to the coordinator; start it or check its config",
                party.node
            )));
        };
        handles.push((party.node.clone(), handle));
    }
    record(
        shared,
        job_id,
        JobState::Offered,
        &format!("offered to all {} parties", handles.len()),
    )?;

    let offer_timeout = shared.cfg.offer_timeout();
    let mut offers = tokio::task::JoinSet::new();
    for (index, (node, handle)) in handles.into_iter().enumerate() {
        let spec = spec.clone();
        let job_id = job_id.to_owned();
        offers.spawn(async move {
            let answer = tokio::time::timeout(offer_timeout, async {
                let (mut send, mut recv) = cleanroom_transport::open_bi(&handle.conn)
                    .await
                    .map_err(|e| format!("node '{node}' is unreachable: {e}"))?;
                send.send(&Envelope {
                    job_id: job_id.clone(),
                    phase: Phase::Offer as i32,
                    body: Some(Body::Offer(Offer {
                        spec: Some(spec),
                        role: Role::Peer as i32,
                    })),
                })
                .await
                .map_err(|e| format!("node '{node}': {e}"))?;
                let reply = recv
                    .recv_expect(&job_id, Phase::Offer)
                    .await
                    .map_err(|e| format!("node '{node}' did not answer the offer: {e}"))?;
                match reply.body {
                    Some(Body::OfferReply(r)) if r.accept => Ok(Ok(Party {
                        node: node.clone(),
                        data_addr: handle.data_addr.clone(),
                        send,
                        recv,
                    })),
                    Some(Body::OfferReply(r)) => Ok(Err(format!(
                        "node '{node}' refused: {}",
                        crate::untrusted::node_text(&r.reason)
                    ))),
                    _ => Err(format!(
                        "node '{node}' sent something other than an offer reply"
                    )),
                }
            })
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "node '{node}' did not answer the offer within {offer_timeout:?}"
                ))
            });
            (index, answer)
        });
    }
    let mut parties: Vec<(usize, Party)> = Vec::new();
    let (mut vetoes, mut errors) = (Vec::new(), Vec::new());
    while let Some(joined) = offers.join_next().await {
        match joined {
            Ok((i, Ok(Ok(party)))) => parties.push((i, party)),
            Ok((_, Ok(Err(veto)))) => vetoes.push(veto),
            Ok((_, Err(error))) => errors.push(error),
            Err(e) => errors.push(format!("internal error: {e}")),
        }
    }
    if !vetoes.is_empty() {
        vetoes.sort();
        return Err((JobState::Vetoed, vetoes.join("; ")));
    }
    if !errors.is_empty() {
        errors.sort();
        return Err(failed(errors.join("; ")));
    }
    parties.sort_by_key(|(i, _)| *i);
    let mut parties: Vec<Party> = parties.into_iter().map(|(_, p)| p).collect();

    record(
        shared,
        job_id,
        JobState::Running,
        &format!("all {} parties accepted; running", parties.len()),
    )?;
    let endpoints: Vec<PeerEndpoint> = parties
        .iter()
        .map(|p| PeerEndpoint {
            node: p.node.clone(),
            data_addr: p.data_addr.clone(),
        })
        .collect();
    // Every party registered its expected peers before accepting, so the order of starts does
    // not matter: a peer that dials early is expected.
    for party in &mut parties {
        let peers = endpoints
            .iter()
            .filter(|e| e.node != party.node)
            .cloned()
            .collect();
        let start = Envelope {
            job_id: job_id.to_owned(),
            phase: Phase::Start as i32,
            body: Some(Body::Start(Start {
                role: Role::Peer as i32,
                peer_addr: String::new(),
                peers,
            })),
        };
        let node = party.node.clone();
        party
            .send
            .send(&start)
            .await
            .map_err(|e| failed(format!("node '{node}': {e}")))?;
    }
    for party in &mut parties {
        let node = party.node.clone();
        let ready =
            tokio::time::timeout(READY_TIMEOUT, party.recv.recv_expect(job_id, Phase::Start))
                .await
                .map_err(|_| failed(format!("node '{node}' did not confirm the start")))?
                .map_err(|e| failed(format!("node '{node}': {e}")))?;
        if !matches!(ready.body, Some(Body::Ready(_))) {
            return Err(failed(format!("node '{node}' did not confirm the start")));
        }
    }

    // Collect every partial. Each task owns its party's whole stream: dropping it (on failure)
    // tells that node the job is over.
    let job_timeout = shared.cfg.job_timeout();
    let sum: PartialSum = Arc::new(std::sync::Mutex::new(vec![0u64; cells]));
    let mut reports = tokio::task::JoinSet::new();
    for party in parties {
        let job_id = job_id.to_owned();
        let sum = sum.clone();
        reports.spawn(async move {
            let node = party.node.clone();
            tokio::time::timeout(job_timeout, collect(party, &job_id, cells, &sum))
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "node '{node}' did not report within {job_timeout:?}"
                    ))
                })
        });
    }
    let mut reported: Vec<Reported> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    loop {
        let next = if failures.is_empty() {
            reports.join_next().await
        } else {
            tokio::time::timeout(FAILURE_GRACE, reports.join_next())
                .await
                .unwrap_or_default()
        };
        match next {
            None => break,
            Some(Ok(Ok(r))) => reported.push(r),
            Some(Ok(Err(reason))) => failures.push(reason),
            Some(Err(e)) => failures.push(format!("internal error collecting partials: {e}")),
        }
    }
    reports.abort_all();
    if !failures.is_empty() {
        failures.sort_by_key(|f| f.contains(" lost: "));
        return Err(failed(format!(
            "{}; no partial result is released",
            failures.join("; ")
        )));
    }
    // Spec order, so the per-party statistics read in the order the analyst listed them.
    reported.sort_by_key(|r| spec.parties.iter().position(|p| p.node == r.node));
    let total = std::mem::take(
        &mut *sum
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let (meta, domain) = result_meta(&reported, spec)?;
    let parties = reported.len();
    let (mut shown, mut suppressed) = (0usize, 0usize);
    let groups = release_groups(&total, &meta, &domain).inspect(|g| {
        if g.suppressed {
            suppressed += 1;
        } else {
            shown += 1;
        }
    });
    shared
        .store
        .put_aggregate_result_streamed(job_id, meta, groups, now_ms())
        .map_err(|e| failed(format!("storing the result: {e}")))?;
    Ok(format!(
        "aggregate over {parties} parties: {shown} groups released, {suppressed} suppressed"
    ))
}

/// Reads one party's partial batches, adding each to `sum`, and its outcome.
async fn collect(
    mut party: Party,
    job_id: &str,
    cells: usize,
    sum: &PartialSum,
) -> Result<Reported, String> {
    let node = party.node.clone();
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
                    format!("node '{node}' sent an unreadable frame: {e}")
                }
                _ => format!("node '{node}' lost: {e}"),
            })?
            .ok_or_else(|| format!("node '{node}' lost: its job stream ended"))?;
        if env.job_id != job_id {
            return Err(format!("node '{node}' sent a frame for another job"));
        }
        match env.body {
            Some(Body::AggPartial(p)) if env.phase == Phase::AggPartial as i32 => {
                if p.seq != seq {
                    return Err(format!(
                        "node '{node}' sent partial batch {} where {seq} was due",
                        p.seq
                    ));
                }
                batch.clear();
                decode_cells(&p.cells, &mut batch, cells - received).map_err(|e| {
                    format!("node '{node}' sent a bad partial (after {received} cells): {e}")
                })?;
                add_batch(sum, received, &batch);
                received += batch.len();
                seq += 1;
            }
            Some(Body::Report(r)) if env.phase == Phase::Report as i32 => {
                return match r.outcome {
                    Some(Outcome::Aggregate(outcome)) => {
                        if received != cells || outcome.cells != cells as u64 {
                            return Err(format!(
                                "node '{node}' sent {received} of {cells} partial cells"
                            ));
                        }
                        Ok(Reported { node, outcome })
                    }
                    Some(Outcome::Failure(reason)) => {
                        Err(format!("{node}: {}", crate::untrusted::node_text(&reason)))
                    }
                    _ => Err(format!("node '{node}' sent a report of another job kind")),
                };
            }
            _ => return Err(format!("node '{node}' sent an unexpected frame")),
        }
    }
}

/// Reads the noised totals from the sum of all partials and applies the k-threshold on the
/// noised count: the whole result in memory (tests; [`drive`] streams the groups instead).
#[cfg(test)]
fn combine(
    sum: Vec<u64>,
    reported: &[Reported],
    spec: &JobSpec,
) -> Result<AggregateResult, Failure> {
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
) -> Result<(AggregateResult, GroupDomain), Failure> {
    let Some(agg) = spec.aggregate.as_ref() else {
        return Err(failed("aggregate job without its group-by spec"));
    };
    let Some(first) = reported.first() else {
        return Err(failed("no party reported"));
    };
    // Every party must have built its partial under the same joint terms.
    if let Some(other) = reported
        .iter()
        .find(|r| r.outcome.terms_digest != first.outcome.terms_digest)
    {
        return Err(failed(format!(
            "nodes '{}' and '{}' applied different terms; nothing is released",
            first.node, other.node
        )));
    }
    let min_result = first.outcome.min_result.max(1);
    let domain = domain_of(agg).map_err(failed)?;
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
    use cleanroom_proto::v1::{AggregateSpec, ColumnNoise, JobKind, PartySpec};

    fn spec(count: bool) -> JobSpec {
        JobSpec {
            kind: JobKind::Aggregate as i32,
            parties: ["a", "b", "c"]
                .iter()
                .map(|n| PartySpec {
                    node: (*n).into(),
                    dataset: "d".into(),
                    ..PartySpec::default()
                })
                .collect(),
            purpose: "p".into(),
            aggregate: Some(AggregateSpec {
                group_by: "category".into(),
                groups: vec!["x".into(), "y".into()],
                sums: vec!["amount".into()],
                count,
                group_range: None,
                person: String::new(),
            }),
            overlap_sum: None,
        }
    }

    /// Three parties' reports and partials.
    struct Run {
        reported: Vec<Reported>,
        partials: Vec<Vec<u64>>,
    }

    /// [`combine`] over the sum of the run's partials, as `collect` builds it.
    fn combine_run(run: &Run, spec: &JobSpec) -> Result<AggregateResult, Failure> {
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
    fn range_domains_are_validated_before_any_work() {
        use cleanroom_proto::v1::IntegerRange;
        let agg = |lo, hi, sums: usize| AggregateSpec {
            group_by: "bucket".into(),
            groups: vec![],
            sums: (0..sums).map(|i| format!("s{i}")).collect(),
            count: true,
            group_range: Some(IntegerRange { lo, hi }),
            person: String::new(),
        };
        validate_range_domain(3, &agg(0, 1_000_000, 1)).unwrap();
        validate_range_domain(3, &agg(-5, 5, 0)).unwrap();
        assert!(
            validate_range_domain(3, &agg(0, 0, 1))
                .unwrap_err()
                .contains("empty")
        );
        assert!(
            validate_range_domain(3, &agg(0, 1 << 22, 1))
                .unwrap_err()
                .contains("at most 2097152")
        );
        assert!(
            validate_range_domain(3, &agg(0, 1 << 21, 8))
                .unwrap_err()
                .contains("cells; at most")
        );
        // 2^21 groups × 2 columns × 64 parties: more partials than the coordinator holds.
        assert!(
            validate_range_domain(64, &agg(0, 1 << 21, 1))
                .unwrap_err()
                .contains("partial sums")
        );
        let mut both = agg(0, 10, 1);
        both.groups = vec!["x".into()];
        assert!(
            validate_range_domain(3, &both)
                .unwrap_err()
                .contains("not both")
        );
    }

    #[test]
    fn different_terms_release_nothing() {
        let inputs = [[1; 6], [1; 6], [1; 6]];
        let mut r = reported(&inputs, 1);
        r.reported[2].outcome.terms_digest = vec![2];
        let (state, reason) = combine_run(&r, &spec(true)).unwrap_err();
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
