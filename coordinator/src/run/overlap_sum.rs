//! `overlap-sum`: the two reports checked against each other, then stored.
//!
//! The value holder (party 1) reports the release: per group, the noised count and sums, or
//! "suppressed". The key holder (party 0) reports the same terms (columns, noise, ε, threshold)
//! and no figure: it knows the exact count and must not release it. The two descriptions must
//! agree, or nothing is stored as a result and the job fails.

use cleanroom_proto::v1::{JobSpec, PsiOutcome, SumRelease};

use super::error::{JobError, SettleError};
use super::pipeline::{Job, PairSettle};

/// The settle of an overlap-sum.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct OverlapSum;

impl PairSettle for OverlapSum {
    fn settle(
        &self,
        job: &Job<'_>,
        reports: Vec<(String, PsiOutcome)>,
    ) -> Result<String, JobError> {
        let release = check(job.spec, &reports)?;
        job.store_reports(&reports)?;
        Ok(summary(&release))
    }
}

/// Checks the two reports of an overlap-sum against each other and the spec; returns the value
/// holder's release.
fn check(spec: &JobSpec, outcomes: &[(String, PsiOutcome)]) -> Result<SumRelease, JobError> {
    let (key_holder, value_holder) = match (spec.parties.first(), spec.parties.get(1)) {
        (Some(a), Some(b)) => (a.node.as_str(), b.node.as_str()),
        _ => return Err(JobError::Spec("an overlap-sum needs two parties".into())),
    };
    let find = |node: &str| {
        outcomes
            .iter()
            .find(|(n, _)| n == node)
            .map(|(_, o)| o)
            .ok_or_else(|| SettleError::MissingReport { node: node.into() })
    };
    let a = find(key_holder)?;
    let b = find(value_holder)?;
    let (Some(a_release), Some(b_release)) = (a.sum.as_ref(), b.sum.as_ref()) else {
        return Err(SettleError::NoSumRelease.into());
    };
    if !a_release.groups.is_empty() || a.intersection != 0 || !a.suppressed {
        return Err(SettleError::KeyHolderReleased {
            node: key_holder.into(),
        }
        .into());
    }
    if !same_terms(a_release, b_release) {
        return Err(SettleError::SumTermsDisagree.into());
    }
    let expected_groups = spec.overlap_sum.as_ref().map_or(1, |s| {
        if s.group_by.is_empty() {
            1
        } else {
            s.groups.len() + 1
        }
    });
    if b_release.groups.len() != expected_groups
        || b_release
            .groups
            .iter()
            .any(|g| !g.suppressed && g.values.len() != b_release.columns.len())
    {
        return Err(SettleError::WrongShape {
            node: value_holder.into(),
        }
        .into());
    }
    Ok(b_release.clone())
}

/// The job's summary.
fn summary(release: &SumRelease) -> String {
    if release.withheld {
        return "overlap-sum withheld by the agreements (below the minimum result, or not \
                releasable to the coordinator)"
            .to_owned();
    }
    let released = release.groups.iter().filter(|g| !g.suppressed).count();
    let suppressed = release.groups.len() - released;
    let noise = if release.noise.is_empty() {
        "exact".to_owned()
    } else {
        format!("noised, ε {}", release.epsilon)
    };
    format!(
        "overlap-sum: intersection {} ({noise}); {released} groups released, {suppressed} suppressed",
        release.intersection
    )
}

/// The parts of a release both nodes compute alike.
fn same_terms(a: &SumRelease, b: &SumRelease) -> bool {
    a.columns == b.columns
        && a.noise == b.noise
        && a.epsilon.to_bits() == b.epsilon.to_bits()
        && a.min_result == b.min_result
        && a.show_count == b.show_count
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleanroom_proto::v1::{AggregateGroup, JobKind, NoiseTerm, OverlapSumSpec, PartySpec};

    fn spec() -> JobSpec {
        JobSpec {
            kind: JobKind::OverlapSum as i32,
            parties: ["acme", "globex"]
                .iter()
                .map(|n| PartySpec {
                    node: (*n).into(),
                    ..PartySpec::default()
                })
                .collect(),
            overlap_sum: Some(OverlapSumSpec::default()),
            ..JobSpec::default()
        }
    }

    /// The key holder's and the value holder's reports of one ungrouped release.
    fn reports() -> Vec<(String, PsiOutcome)> {
        let terms = SumRelease {
            columns: vec!["count".into(), "amount".into()],
            epsilon: 1.0,
            min_result: 5,
            ..SumRelease::default()
        };
        let key_holder = PsiOutcome {
            suppressed: true,
            sum: Some(terms.clone()),
            ..PsiOutcome::default()
        };
        let value_holder = PsiOutcome {
            sum: Some(SumRelease {
                intersection: 40,
                groups: vec![AggregateGroup {
                    label: String::new(),
                    suppressed: false,
                    values: vec![40, 1234],
                }],
                ..terms
            }),
            ..PsiOutcome::default()
        };
        vec![("acme".into(), key_holder), ("globex".into(), value_holder)]
    }

    #[test]
    fn the_reports_are_checked_against_each_other() {
        let release = check(&spec(), &reports()).unwrap();
        assert_eq!(
            summary(&release),
            "overlap-sum: intersection 40 (exact); 1 groups released, 0 suppressed"
        );
        let fails = |edit: fn(&mut Vec<(String, PsiOutcome)>)| {
            let mut r = reports();
            edit(&mut r);
            check(&spec(), &r).unwrap_err()
        };
        assert!(matches!(
            fails(|r| r[0].1.intersection = 40),
            JobError::Settle(SettleError::KeyHolderReleased { node }) if node == "acme"
        ));
        assert!(matches!(
            fails(|r| r[1].1.sum = None),
            JobError::Settle(SettleError::NoSumRelease)
        ));
        assert!(matches!(
            fails(|r| r[1].1.sum.as_mut().unwrap().min_result = 1),
            JobError::Settle(SettleError::SumTermsDisagree)
        ));
        assert!(matches!(
            fails(|r| r[1].1.sum.as_mut().unwrap().groups[0].values.pop().map(|_| ()).unwrap()),
            JobError::Settle(SettleError::WrongShape { node }) if node == "globex"
        ));
        assert!(matches!(
            fails(|r| r.truncate(1)),
            JobError::Settle(SettleError::MissingReport { node }) if node == "globex"
        ));
    }

    #[test]
    fn terms_must_match_exactly() {
        let a = SumRelease {
            columns: vec!["count".into(), "amount".into()],
            noise: vec![NoiseTerm {
                node: "acme".into(),
                scale: "2".into(),
                ..Default::default()
            }],
            epsilon: 1.0,
            min_result: 5,
            ..Default::default()
        };
        assert!(same_terms(&a, &a.clone()));
        for change in [
            |r: &mut SumRelease| r.min_result = 4,
            |r: &mut SumRelease| r.epsilon = 0.5,
            |r: &mut SumRelease| r.noise[0].scale = "1".into(),
            |r: &mut SumRelease| r.columns.pop().map(|_| ()).unwrap_or(()),
        ] {
            let mut b = a.clone();
            change(&mut b);
            assert!(!same_terms(&a, &b));
        }
    }
}
