//! `overlap` and `match`: two parties run ECDH-PSI and each reports the count. The count is
//! released only if both report the same one, with the same noise, and only if every node
//! released it (the stricter agreement wins): a node that withholds it reports `suppressed`,
//! and the other's figures are blanked too.

use cleanroom_proto::v1::PsiOutcome;

use super::error::{JobError, SettleError};
use super::pipeline::{Job, PairSettle};

/// The settle of a two-party count.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Pairwise;

impl PairSettle for Pairwise {
    fn settle(
        &self,
        job: &Job<'_>,
        mut reports: Vec<(String, PsiOutcome)>,
    ) -> Result<String, JobError> {
        reports.sort_by(|a, b| a.0.cmp(&b.0));
        let withheld = compare(&reports)?;
        if !withheld.is_empty() {
            for (_, outcome) in &mut reports {
                outcome.intersection = 0;
                outcome.suppressed = true;
            }
        }
        job.store_reports(&reports)?;
        Ok(summary(&reports, &withheld))
    }
}

/// Checks that the two reports agree on the count (unless one withholds it) and on the noise;
/// returns the nodes that withheld the count.
fn compare(reports: &[(String, PsiOutcome)]) -> Result<Vec<String>, SettleError> {
    let withheld: Vec<String> = reports
        .iter()
        .filter(|(_, o)| o.suppressed)
        .map(|(n, _)| n.clone())
        .collect();
    if let [(_, a), (_, b)] = reports {
        if withheld.is_empty() && a.intersection != b.intersection {
            // Noised figures are not repeated here: the job failed, so nothing is released.
            return Err(if a.noise.is_empty() && b.noise.is_empty() {
                SettleError::CountsDisagree {
                    a: a.intersection,
                    b: b.intersection,
                }
            } else {
                SettleError::NoisedCountsDisagree
            });
        }
        // Both nodes must describe the same noise (each adds its own and reports both terms).
        if a.noise != b.noise {
            return Err(SettleError::NoiseDisagrees);
        }
    }
    Ok(withheld)
}

/// The job's summary: the count and how it was noised, or who withheld it.
fn summary(reports: &[(String, PsiOutcome)], withheld: &[String]) -> String {
    if !withheld.is_empty() {
        return format!(
            "count withheld by the agreement of {} (below its minimum result, or not releasable to the coordinator)",
            withheld.join(", ")
        );
    }
    let count = reports.first().map(|(_, o)| o.intersection).unwrap_or(0);
    let noise = reports
        .first()
        .map(|(_, o)| o.noise.as_slice())
        .unwrap_or(&[]);
    let Some(first) = noise.first() else {
        return format!("intersection {count}");
    };
    let parts: Vec<String> = noise
        .iter()
        .map(|t| format!("{} ε {} scale {}", t.node, t.epsilon, t.scale))
        .collect();
    format!(
        "intersection {count} (noised: {}, sensitivity 1; {})",
        first.mechanism,
        parts.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use cleanroom_proto::v1::NoiseTerm;

    use super::*;

    fn report(node: &str, intersection: u64, noise: &[&str]) -> (String, PsiOutcome) {
        let noise = noise
            .iter()
            .map(|n| NoiseTerm {
                node: (*n).into(),
                mechanism: "discrete_laplace".into(),
                epsilon: 0.5,
                sensitivity: 1,
                scale: "2".into(),
            })
            .collect();
        (
            node.into(),
            PsiOutcome {
                intersection,
                noise,
                ..PsiOutcome::default()
            },
        )
    }

    #[test]
    fn counts_must_agree_unless_withheld() {
        let ok = [report("acme", 7, &[]), report("globex", 7, &[])];
        assert_eq!(compare(&ok), Ok(vec![]));
        assert_eq!(summary(&ok, &[]), "intersection 7");
        let exact = [report("acme", 7, &[]), report("globex", 8, &[])];
        assert_eq!(
            compare(&exact),
            Err(SettleError::CountsDisagree { a: 7, b: 8 })
        );
        let noised = [report("acme", 7, &["acme"]), report("globex", 8, &["acme"])];
        assert_eq!(compare(&noised), Err(SettleError::NoisedCountsDisagree));
        let noise = [
            report("acme", 7, &["acme"]),
            report("globex", 7, &["globex"]),
        ];
        assert_eq!(compare(&noise), Err(SettleError::NoiseDisagrees));
        let mut withheld = [report("acme", 7, &[]), report("globex", 0, &[])];
        withheld[1].1.suppressed = true;
        assert_eq!(compare(&withheld), Ok(vec!["globex".to_owned()]));
        assert!(summary(&withheld, &["globex".into()]).starts_with("count withheld"));
        let same = [report("acme", 9, &["acme"]), report("globex", 9, &["acme"])];
        assert_eq!(
            summary(&same, &[]),
            "intersection 9 (noised: discrete_laplace, sensitivity 1; acme ε 0.5 scale 2)"
        );
    }
}
