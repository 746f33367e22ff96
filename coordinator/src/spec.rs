//! Validation of job specs submitted by analysts, before anything is stored or offered.

use cleanroom_circuits::aggregate::{GroupDomain, MAX_CELLS};
use cleanroom_proto::v1::{AggregateSpec, JobKind, JobSpec};
use cleanroom_transport::Identity;

/// Longest purpose, dataset or key name accepted.
const MAX_NAME: usize = 128;
/// Most identifier columns in a composite key.
const MAX_KEYS: usize = 8;

/// Checks that a spec is well-formed; the error says what to fix.
pub fn validate(spec: &JobSpec) -> Result<(), String> {
    let kind = JobKind::try_from(spec.kind).unwrap_or(JobKind::Unspecified);
    match kind {
        JobKind::Overlap | JobKind::Match | JobKind::OverlapSum => {}
        JobKind::Aggregate => return validate_aggregate(spec),
        JobKind::Unspecified => {
            return Err("job kind must be overlap, match, overlap-sum or aggregate".into());
        }
    }
    if spec.parties.len() != 2 {
        return Err(format!(
            "{} needs exactly two parties (--between A,B), got {}",
            kind.as_str_name(),
            spec.parties.len()
        ));
    }
    if spec.parties[0].node == spec.parties[1].node {
        return Err("the two parties must be different nodes".into());
    }
    check_name("purpose", &spec.purpose)?;
    for party in &spec.parties {
        Identity::node(&party.node).map_err(|e| format!("party '{}': {e}", party.node))?;
        check_name("dataset", &party.dataset)?;
        if party.keys.is_empty() || party.keys.len() > MAX_KEYS {
            return Err(format!(
                "party '{}': give 1 to {MAX_KEYS} join keys (--on)",
                party.node
            ));
        }
        for key in &party.keys {
            check_name("join key", key)?;
        }
        if party.learns_membership && kind != JobKind::Match {
            return Err("only match jobs reveal membership".into());
        }
    }
    if spec.parties[0].keys != spec.parties[1].keys {
        return Err("both parties must join on the same keys".into());
    }
    match (kind, spec.overlap_sum.as_ref()) {
        (JobKind::OverlapSum, Some(sum)) => validate_overlap_sum(sum),
        (JobKind::OverlapSum, None) => Err("overlap-sum needs --sum or --count".into()),
        (_, Some(_)) => Err("only overlap-sum jobs carry sum columns".into()),
        (_, None) => Ok(()),
    }
}

/// Checks what an overlap-sum sums: distinct value columns (at most [`MAX_SUMS`]; "count" is
/// the shared identifiers and is asked for with `count`), an optional group-by column with its
/// labels, and at most [`cleanroom_circuits::intersection_sum::MAX_CELLS`] cells per row.
fn validate_overlap_sum(sum: &cleanroom_proto::v1::OverlapSumSpec) -> Result<(), String> {
    if sum.sums.len() > MAX_SUMS {
        return Err(format!("at most {MAX_SUMS} summed columns (--sum)"));
    }
    let mut seen = std::collections::HashSet::new();
    for column in &sum.sums {
        check_name("summed column", column)?;
        if column == "count" {
            return Err(
                "'count' is not a column: it is the number of shared identifiers, \
                 asked for with --sum count (or --count)"
                    .into(),
            );
        }
        if !seen.insert(column.as_str()) {
            return Err(format!("column '{column}' is summed twice"));
        }
    }
    if sum.sums.is_empty() && !sum.count {
        return Err("an overlap-sum needs --sum COLUMN[,count]".into());
    }
    if sum.group_by.is_empty() {
        if !sum.groups.is_empty() {
            return Err("group labels (--groups) need --group-by".into());
        }
    } else {
        check_name("group-by column", &sum.group_by)?;
        if sum.groups.is_empty() {
            return Err("--group-by needs the group labels (--groups a,b,c)".into());
        }
        check_labels(&sum.groups)?;
    }
    let cells = cleanroom_circuits::intersection_sum::job_cells(
        !sum.group_by.is_empty(),
        sum.groups.len(),
        sum.sums.len(),
    );
    let max = cleanroom_circuits::intersection_sum::MAX_CELLS;
    if cells > max {
        return Err(format!(
            "{} groups × {} columns (count and sums) is {cells} encrypted cells per row; at most \
             {max}: fewer groups or fewer --sum columns",
            cells / (1 + sum.sums.len()),
            1 + sum.sums.len()
        ));
    }
    Ok(())
}

/// Most parties of an aggregate.
pub const MAX_AGGREGATE_PARTIES: usize = 64;
/// Most group labels an aggregate may list (the spec must fit in one frame, with its result).
pub const MAX_GROUPS: usize = 20_000;
/// Longest group label.
pub const MAX_LABEL: usize = 64;
/// Most summed columns.
pub const MAX_SUMS: usize = 8;
/// Most bytes of all group labels together, and most cells (groups, "(other)" included, times
/// columns): with them the spec and the job's result (labels again, and up to 10 bytes a
/// value) fit in one 1 MiB frame of `GetJob`.
pub const MAX_LABEL_BYTES: usize = 128 * 1024;
/// See [`MAX_LABEL_BYTES`].
pub const MAX_RESULT_CELLS: usize = 50_000;
/// The label of the group that collects rows whose label is not listed.
pub const OTHER_GROUP: &str = "(other)";

/// Checks an aggregate spec: 3 to 64 distinct parties, each naming a dataset and no join keys;
/// a group-by column; 1 to 20 000 distinct group labels (printable, at most 64 bytes, not
/// "(other)", which is added for rows outside the list); at most 8 distinct summed columns.
fn validate_aggregate(spec: &JobSpec) -> Result<(), String> {
    let n = spec.parties.len();
    if !(3..=MAX_AGGREGATE_PARTIES).contains(&n) {
        return Err(format!(
            "aggregate needs 3 to {MAX_AGGREGATE_PARTIES} parties (--parties A,B,C), got {n}"
        ));
    }
    check_name("purpose", &spec.purpose)?;
    let mut nodes = std::collections::HashSet::new();
    for party in &spec.parties {
        Identity::node(&party.node).map_err(|e| format!("party '{}': {e}", party.node))?;
        if !nodes.insert(party.node.as_str()) {
            return Err(format!("party '{}' is named twice", party.node));
        }
        check_name("dataset", &party.dataset)?;
        if !party.keys.is_empty() || party.learns_membership {
            return Err("an aggregate joins nothing: no keys, no membership".into());
        }
    }
    let Some(agg) = spec.aggregate.as_ref() else {
        return Err("aggregate needs --group-by and the groups".into());
    };
    check_name("group-by column", &agg.group_by)?;
    if !agg.person.is_empty() {
        check_name("person column (--per-person)", &agg.person)?;
        if agg.person == agg.group_by {
            return Err("the person column cannot be the group-by column".into());
        }
    }
    if agg.group_range.is_some() {
        validate_range_domain(spec.parties.len(), agg)?;
    } else if agg.groups.is_empty() || agg.groups.len() > MAX_GROUPS {
        return Err(format!(
            "give 1 to {MAX_GROUPS} group labels (--groups), got {}",
            agg.groups.len()
        ));
    }
    check_labels(&agg.groups)?;
    let label_bytes: usize = agg.groups.iter().map(String::len).sum();
    if label_bytes > MAX_LABEL_BYTES {
        return Err(format!(
            "the group labels take {label_bytes} bytes; at most {MAX_LABEL_BYTES} in all"
        ));
    }
    if agg.sums.len() > MAX_SUMS {
        return Err(format!("at most {MAX_SUMS} summed columns (--sum)"));
    }
    let cells = (agg.groups.len() + 1) * (1 + agg.sums.len());
    if agg.group_range.is_none() && cells > MAX_RESULT_CELLS {
        return Err(format!(
            "{} groups (with \"(other)\") × {} columns (count and sums) is {cells} values; at most \
             {MAX_RESULT_CELLS}: fewer groups or fewer --sum columns",
            agg.groups.len() + 1,
            1 + agg.sums.len()
        ));
    }
    let mut sums = std::collections::HashSet::new();
    for column in &agg.sums {
        check_name("summed column", column)?;
        if !sums.insert(column.as_str()) {
            return Err(format!("column '{column}' is summed twice"));
        }
    }
    if agg.sums.is_empty() && !agg.count {
        return Err("an aggregate needs --sum COLUMN or --count".into());
    }
    Ok(())
}

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

/// Group labels: printable, 1 to [`MAX_LABEL`] bytes, no surrounding spaces, distinct, and not
/// the reserved [`OTHER_GROUP`].
fn check_labels(groups: &[String]) -> Result<(), String> {
    let mut labels = std::collections::HashSet::new();
    for label in groups {
        if label.is_empty()
            || label.len() > MAX_LABEL
            || label.chars().any(char::is_control)
            || label.trim() != label
        {
            return Err(format!(
                "group label '{}' must be 1 to {MAX_LABEL} bytes, without control characters or \
                 surrounding spaces",
                label.escape_default()
            ));
        }
        if label == OTHER_GROUP {
            return Err(format!(
                "'{OTHER_GROUP}' is reserved for rows whose group is not listed"
            ));
        }
        if !labels.insert(label.as_str()) {
            return Err(format!("group label '{label}' is listed twice"));
        }
    }
    Ok(())
}

fn check_name(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_NAME {
        return Err(format!("{what} must be 1 to {MAX_NAME} characters"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "{what} '{value}' may contain only letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleanroom_proto::v1::PartySpec;

    fn party(node: &str) -> PartySpec {
        PartySpec {
            node: node.into(),
            dataset: "customers".into(),
            keys: vec!["email".into()],
            learns_membership: false,
        }
    }

    fn spec() -> JobSpec {
        JobSpec {
            analyst: String::new(),
            kind: JobKind::Overlap as i32,
            parties: vec![party("acme"), party("globex")],
            purpose: "overlap-reporting".into(),
            aggregate: None,
            overlap_sum: None,
        }
    }

    #[test]
    fn accepts_a_good_spec() {
        assert_eq!(validate(&spec()), Ok(()));
    }

    #[test]
    fn rejects_bad_specs_with_reasons() {
        let mut s = spec();
        s.parties.pop();
        assert!(validate(&s).unwrap_err().contains("exactly two"));
        let mut s = spec();
        s.parties[1].node = "acme".into();
        assert!(validate(&s).unwrap_err().contains("different"));
        let mut s = spec();
        s.purpose = "drop table;".into();
        assert!(validate(&s).unwrap_err().contains("purpose"));
        let mut s = spec();
        s.kind = 99;
        assert!(validate(&s).unwrap_err().contains("kind"));
        let mut s = spec();
        s.parties[0].learns_membership = true;
        assert!(validate(&s).unwrap_err().contains("membership"));
        let mut s = spec();
        s.parties[1].keys = vec!["phone".into()];
        assert!(validate(&s).unwrap_err().contains("same keys"));
    }

    fn aggregate() -> JobSpec {
        crate::test_support::aggregate_job(
            &["acme", "globex", "initech"],
            "chargebacks",
            "fraud-benchmark",
            Some(crate::test_support::aggregate_spec(
                "category",
                &["electronics", "home"],
                &["amount"],
                true,
            )),
        )
    }

    #[test]
    fn aggregate_specs() {
        assert_eq!(validate(&aggregate()), Ok(()));
        let err = |f: &dyn Fn(&mut JobSpec)| {
            let mut s = aggregate();
            f(&mut s);
            validate(&s).unwrap_err()
        };
        assert!(
            err(&|s| {
                s.parties.pop();
            })
            .contains("3 to 64 parties")
        );
        assert!(err(&|s| s.parties[2].node = "acme".into()).contains("twice"));
        assert!(err(&|s| s.parties[0].keys = vec!["email".into()]).contains("joins nothing"));
        assert!(err(&|s| s.aggregate = None).contains("--group-by"));
        let mut per_person = aggregate();
        per_person.aggregate.as_mut().unwrap().person = "customer_id".into();
        assert_eq!(validate(&per_person), Ok(()));
        assert!(
            err(&|s| s.aggregate.as_mut().unwrap().person = "a b".into())
                .contains("person column (--per-person) 'a b' may contain only")
        );
        assert!(
            err(&|s| s.aggregate.as_mut().unwrap().person = "category".into())
                .contains("cannot be the group-by column")
        );
        assert!(err(&|s| s.aggregate.as_mut().unwrap().groups.clear()).contains("group labels"));
        assert!(
            err(&|s| s.aggregate.as_mut().unwrap().groups.push("home".into()))
                .contains("listed twice")
        );
        assert!(
            err(&|s| s.aggregate.as_mut().unwrap().groups.push("(other)".into()))
                .contains("reserved")
        );
        assert!(
            err(&|s| s.aggregate.as_mut().unwrap().groups.push("a\nb".into())).contains("control")
        );
        assert!(
            err(&|s| {
                let a = s.aggregate.as_mut().unwrap();
                a.sums.clear();
                a.count = false;
            })
            .contains("--sum COLUMN or --count")
        );
        assert!(
            err(&|s| s.aggregate.as_mut().unwrap().sums.push("amount".into()))
                .contains("summed twice")
        );
        // Size caps: the spec and the result must fit in one frame.
        assert!(
            err(&|s| {
                s.aggregate.as_mut().unwrap().groups =
                    (0..3000).map(|i| format!("{i:0>60}")).collect();
            })
            .contains("bytes; at most")
        );
        assert!(
            err(&|s| {
                let a = s.aggregate.as_mut().unwrap();
                a.groups = (0..20_000).map(|i| format!("g{i}")).collect();
                a.sums = vec!["a".into(), "b".into()];
            })
            .contains("at most 50000")
        );
        let mut s = aggregate();
        s.aggregate.as_mut().unwrap().groups = (0..20_000).map(|i| format!("g{i}")).collect();
        assert_eq!(validate(&s), Ok(()));
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
}
