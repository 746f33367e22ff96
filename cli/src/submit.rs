//! The job spec of `job submit`'s words (also a schedule's job, and each pair of an overlap
//! matrix): which parties, datasets, keys and options make which spec.

use anyhow::{Context, bail};
use cleanroom_proto::v1::{
    AggregateSpec, IntegerRange, JobKind, JobSpec, OverlapSumSpec, PartySpec,
};

use crate::args::{KindArg, SubmitArgs};

/// Builds the job spec from the command line.
pub fn spec_from_args(args: &SubmitArgs) -> anyhow::Result<JobSpec> {
    if args.kind == KindArg::OverlapMatrix {
        bail!(
            "overlap-matrix is not one job but one overlap job per pair of --parties; submit it with `job submit overlap-matrix` (a schedule runs one job: add one schedule per pair)"
        );
    }
    if args.kind == KindArg::Aggregate {
        return spec_for_aggregate(args);
    }
    if args.aggregate.per_person.is_some() {
        bail!("--per-person is for aggregate jobs");
    }
    if args.on.is_empty() {
        bail!("give the join key(s) with --on, e.g. --on email");
    }
    if args.kind == KindArg::OverlapSum {
        return spec_for_overlap_sum(args);
    }
    if args.aggregate.group_by.is_some() || !args.aggregate.sum.is_empty() || args.aggregate.count {
        bail!("--group-by, --groups, --sum and --count are for aggregate and overlap-sum jobs");
    }
    if !args.parties.is_empty() {
        bail!(
            "--parties is for overlap-matrix and aggregate; give the two partners with --between"
        );
    }
    spec_for_pair(args, args.kind, &args.between)
}

/// The spec of a `kind` job between `between` (two partners, initiator first), with the
/// dataset, keys, purpose and reveal options of `args`.
pub fn spec_for_pair(
    args: &SubmitArgs,
    kind: KindArg,
    between: &[String],
) -> anyhow::Result<JobSpec> {
    if between.len() != 2 {
        bail!("--between takes exactly two partners, e.g. --between acme,globex");
    }
    let dataset_of = |node: &str| dataset_of(args, node);
    let reveal = args.reveal_to.clone().unwrap_or_else(|| match kind {
        KindArg::Match => between.to_vec(),
        KindArg::Overlap | KindArg::OverlapMatrix | KindArg::Aggregate | KindArg::OverlapSum => {
            Vec::new()
        }
    });
    if kind != KindArg::Match && !reveal.is_empty() {
        bail!("--reveal-to applies to match jobs only");
    }
    for r in &reveal {
        if !between.contains(r) {
            bail!("--reveal-to names '{r}', which is not one of --between");
        }
    }
    let parties = between
        .iter()
        .map(|node| {
            Ok(PartySpec {
                node: node.clone(),
                dataset: dataset_of(node)?,
                keys: args.keys(),
                learns_membership: reveal.contains(node),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(JobSpec {
        analyst: String::new(), // set by the coordinator from the certificate
        kind: match kind {
            KindArg::Overlap | KindArg::OverlapMatrix => JobKind::Overlap,
            KindArg::Match => JobKind::Match,
            KindArg::OverlapSum => JobKind::OverlapSum,
            KindArg::Aggregate => bail!("aggregate is not a two-party job"),
        } as i32,
        parties,
        purpose: args.purpose.clone(),
        aggregate: None,
        overlap_sum: None,
    })
}

/// The dataset of `node`: `--dataset NAME` (same at every party) or `--dataset node:NAME`.
fn dataset_of(args: &SubmitArgs, node: &str) -> anyhow::Result<String> {
    let mut plain = None;
    for d in &args.dataset {
        match d.split_once(':') {
            Some((n, ds)) if n == node => return Ok(ds.to_owned()),
            Some(_) => {}
            None => plain = Some(d.clone()),
        }
    }
    plain.with_context(|| {
        format!("no dataset for '{node}': use --dataset NAME or --dataset {node}:NAME")
    })
}

/// The spec of an `overlap-sum` between `--between KEYS,VALUES`: the first partner holds the
/// identifiers, the second the summed columns.
pub fn spec_for_overlap_sum(args: &SubmitArgs) -> anyhow::Result<JobSpec> {
    if !args.parties.is_empty() {
        bail!("overlap-sum is between two partners: --between key-holder,value-holder");
    }
    let mut sums = Vec::new();
    let mut count = args.aggregate.count;
    for column in &args.aggregate.sum {
        if column == "count" {
            count = true;
        } else {
            sums.push(column.clone());
        }
    }
    if sums.is_empty() && !count {
        bail!("overlap-sum needs --sum COLUMN[,COLUMN…][,count]");
    }
    if args.aggregate.group_by.is_some() && args.aggregate.groups.is_empty() {
        bail!("--group-by needs the group labels: --groups a,b,c (public, shown in this order)");
    }
    let mut spec = spec_for_pair(args, KindArg::OverlapSum, &args.between)?;
    spec.overlap_sum = Some(OverlapSumSpec {
        sums,
        group_by: args.aggregate.group_by.clone().unwrap_or_default(),
        groups: args.aggregate.groups.clone(),
        count,
    });
    Ok(spec)
}

/// The spec of an `aggregate` job over `--parties` (at least three).
pub fn spec_for_aggregate(args: &SubmitArgs) -> anyhow::Result<JobSpec> {
    if args.parties.len() < 3 {
        bail!("aggregate needs at least three partners: --parties acme,globex,initech");
    }
    if !args.on.is_empty() || args.reveal_to.is_some() {
        bail!("aggregate joins nothing: --on and --reveal-to do not apply");
    }
    let Some(group_by) = args.aggregate.group_by.clone() else {
        bail!("aggregate needs --group-by COLUMN");
    };
    let group_range = args
        .aggregate
        .group_range
        .as_deref()
        .map(parse_group_range)
        .transpose()?;
    if args.aggregate.groups.is_empty() && group_range.is_none() {
        bail!(
            "aggregate needs the group labels: --groups a,b,c (public, the same for every partner), or an integer domain: --group-range 0..1000000"
        );
    }
    if args.aggregate.sum.is_empty() && !args.aggregate.count {
        bail!("aggregate needs --sum COLUMN and/or --count");
    }
    let parties = args
        .parties
        .iter()
        .map(|node| {
            Ok(PartySpec {
                node: node.clone(),
                dataset: dataset_of(args, node)?,
                keys: Vec::new(),
                learns_membership: false,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(JobSpec {
        analyst: String::new(), // set by the coordinator from the certificate
        kind: JobKind::Aggregate as i32,
        parties,
        purpose: args.purpose.clone(),
        aggregate: Some(AggregateSpec {
            group_by,
            groups: args.aggregate.groups.clone(),
            sums: args.aggregate.sum.clone(),
            count: args.aggregate.count,
            group_range,
            person: args.aggregate.per_person.clone().unwrap_or_default(),
        }),
        overlap_sum: None,
    })
}

/// Parses `--group-range LO..HI` (HI excluded; either may be negative).
pub fn parse_group_range(text: &str) -> anyhow::Result<IntegerRange> {
    let parsed = text.split_once("..").and_then(|(lo, hi)| {
        Some(IntegerRange {
            lo: lo.trim().parse().ok()?,
            hi: hi.trim().parse().ok()?,
        })
    });
    match parsed {
        Some(r) if r.lo < r.hi => Ok(r),
        Some(_) => bail!("--group-range {text} is empty: give LO..HI with LO < HI (HI excluded)"),
        None => bail!("--group-range takes two integers LO..HI, e.g. 0..1000000; got '{text}'"),
    }
}

#[cfg(test)]
mod group_range_tests {
    use super::parse_group_range;

    #[test]
    fn group_ranges_parse() {
        let r = parse_group_range("0..1000000").unwrap();
        assert_eq!((r.lo, r.hi), (0, 1_000_000));
        let r = parse_group_range("-5..5").unwrap();
        assert_eq!((r.lo, r.hi), (-5, 5));
        assert!(
            parse_group_range("5..5")
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        for bad in ["", "5", "a..b", "1..", "..3", "1...3", "0..1e6"] {
            assert!(parse_group_range(bad).is_err(), "{bad}");
        }
    }
}
