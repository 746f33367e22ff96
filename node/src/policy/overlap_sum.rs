//! What an `overlap-sum` job may do at this node, and the terms both parties apply.
//!
//! Party 0 of the spec is the **key holder** (identifiers only), party 1 the **value holder**
//! (identifiers and the summed columns). The agreement's allow entry decides which role this node
//! may take (`roles`), which columns it lets a job sum (`value_columns`, with the clipping bounds)
//! and which it lets a job group by (`group_by`).
//!
//! Each party announces its terms in its hello ([`SumTerms`]); both apply the strictest of the two
//! ([`joint_terms`]): the smaller ε (no noise only if neither policy asks for it), the larger
//! k-threshold, and a release to the coordinator only if both allow it. **Both** parties add
//! noise for the joint ε, as in `overlap`: the key holder under encryption (so the value holder
//! never sees an exact total) and the value holder after decrypting, before it releases (so a key
//! holder colluding with the coordinator cannot remove all the noise). Each draws discrete
//! Laplace on every cell, ε split evenly over the columns (the count and each sum). One
//! identifier is in one group and contributes at most its clipping bound to each column, so each
//! column has L1 sensitivity equal to that bound across all its groups, and each party's noise
//! alone makes the release ε-DP (sequential composition over the columns); the other party's
//! draw only adds to it.

use std::collections::HashSet;

use cleanroom_circuits::dp::{Mechanism, Scale};
use cleanroom_circuits::intersection_sum::{MAX_CELLS, job_cells};
use cleanroom_proto::v1::{JobSpec, NoiseTerm, OverlapSumSpec, SumTerms};

use crate::data::DatasetConfig;
pub use crate::data::sum_input::{ALL_GROUP, COUNT_COLUMN, ColumnBound, OTHER_GROUP, SumShape};

use super::allow::AllowEntry;
use super::allow::{AllowTerms, OverlapSumAllow, check_keyed_terms, check_keys};
use super::permit::{Permit, Veto};
use super::values::{Recipient, SumRole};

/// Most summed columns (as the coordinator allows).
pub const MAX_SUMS: usize = 8;
/// The noise mechanism, as results name it.
pub const MECHANISM: &str = "discrete_laplace";

/// This node's role: party 0 holds keys, party 1 holds values.
pub fn role_of(me: usize) -> SumRole {
    if me == 0 {
        SumRole::KeyHolder
    } else {
        SumRole::ValueHolder
    }
}

/// The checks an `overlap-sum` allow entry adds: roles listed once each (at least one), no
/// membership, group-by names not empty, and value bounds that are not negative (the values
/// are encrypted as unsigned integers; the key holder adds noise, not the values).
fn check_own_rules(ctx: &str, e: &AllowEntry) -> Result<(), String> {
    let at = format!("{ctx}: allow overlap-sum on '{}'", e.dataset.get_ref());
    if let Some(roles) = &e.roles {
        if roles.is_empty() {
            return Err(format!(
                "{at}: roles lists no role; give \"key-holder\", \"value-holder\" or both"
            ));
        }
        let distinct: HashSet<_> = roles.iter().collect();
        if distinct.len() != roles.len() {
            return Err(format!("{at}: roles lists a role twice"));
        }
    }
    if e.membership.is_some() || e.reveal_membership_to_partner.is_some() {
        return Err(format!("{at}: membership applies to match only"));
    }
    if e.group_by.iter().any(String::is_empty) {
        return Err(format!("{at}: group_by has an empty column name"));
    }
    if let Some(v) = e.value_columns.iter().find(|v| v.min < 0) {
        return Err(format!(
            "{at}: value_columns '{}' has a negative lower bound {}; overlap-sum sums values \
             of 0 or more (shift the column, or raise min to 0)",
            v.column.get_ref(),
            v.min
        ));
    }
    Ok(())
}

/// The rules of an `overlap-sum` entry, in order: its own ([`check_own_rules`]), then the keys
/// and common terms of every keyed entry.
pub(crate) fn check_entry(
    ctx: &str,
    e: &AllowEntry,
    d: &DatasetConfig,
    text: &str,
) -> Result<OverlapSumAllow, String> {
    check_own_rules(ctx, e)?;
    check_keys(ctx, e, d)?;
    check_keyed_terms(ctx, e, d, text)?;
    Ok(OverlapSumAllow {
        terms: AllowTerms::of(e),
        keys: e.keys.clone(),
        roles: e.roles.clone(),
        group_by: e.group_by.clone(),
    })
}

/// The spec's overlap-sum part, checked again here (the coordinator may be wrong or hostile):
/// present, at most [`MAX_SUMS`] columns, at most [`MAX_CELLS`] cells.
pub fn sum_spec(spec: &JobSpec) -> Result<&OverlapSumSpec, Veto> {
    let sum = spec
        .overlap_sum
        .as_ref()
        .ok_or_else(|| Veto("the overlap-sum offer does not say what to sum".into()))?;
    if sum.sums.len() > MAX_SUMS {
        return Err(Veto(format!(
            "the offer sums {} columns; at most {MAX_SUMS}",
            sum.sums.len()
        )));
    }
    if sum.group_by.is_empty() != sum.groups.is_empty() {
        return Err(Veto(
            "the offer's group-by column and group labels do not go together".into(),
        ));
    }
    let cells = job_cells(!sum.group_by.is_empty(), sum.groups.len(), sum.sums.len());
    if cells > MAX_CELLS {
        return Err(Veto(format!(
            "the offer needs {cells} encrypted cells per row; at most {MAX_CELLS}"
        )));
    }
    Ok(sum)
}

/// Checks an accepted two-party permit against the overlap-sum parts of the offer: the role is
/// one the entry grants; the value holder sums only columns the entry bounds and groups only by a
/// column it lists.
pub fn check_offer(permit: &Permit, spec: &JobSpec, me: usize) -> Result<(), Veto> {
    let sum = sum_spec(spec)?;
    let role = role_of(me);
    if !permit.sum_roles.contains(&role) {
        let granted: Vec<&str> = permit.sum_roles.iter().map(SumRole::as_str).collect();
        return Err(Veto(format!(
            "agreement with {} does not let this node be the {} of an overlap-sum (roles: {})",
            permit.partner,
            role.as_str(),
            granted.join(", ")
        )));
    }
    if role == SumRole::ValueHolder {
        column_bounds(permit, sum)?;
        if !sum.group_by.is_empty() && !permit.group_by.contains(&sum.group_by) {
            return Err(Veto(format!(
                "agreement with {} does not allow grouping dataset {} by '{}' (group_by: {})",
                permit.partner,
                permit.dataset.name,
                sum.group_by,
                if permit.group_by.is_empty() {
                    "none".to_owned()
                } else {
                    permit.group_by.join(", ")
                }
            )));
        }
    }
    Ok(())
}

/// The clipping bounds of every summed column, in the spec's order.
pub fn column_bounds(permit: &Permit, sum: &OverlapSumSpec) -> Result<Vec<ColumnBound>, Veto> {
    sum.sums
        .iter()
        .map(|column| {
            let bound = permit
                .value_columns
                .iter()
                .find(|v| v.column.get_ref() == column)
                .ok_or_else(|| {
                    let allowed: Vec<&str> = permit
                        .value_columns
                        .iter()
                        .map(|v| v.column.get_ref().as_str())
                        .collect();
                    Veto(format!(
                        "agreement with {} does not allow summing column '{column}' of dataset {} \
                         (value_columns: {})",
                        permit.partner,
                        permit.dataset.name,
                        if allowed.is_empty() {
                            "none".to_owned()
                        } else {
                            allowed.join(", ")
                        }
                    ))
                })?;
            // The config refuses negative bounds on overlap-sum entries; checked again.
            let min = u64::try_from(bound.min)
                .map_err(|_| Veto(format!("column '{column}' has a negative lower bound")))?;
            let max = u64::try_from(bound.max)
                .map_err(|_| Veto(format!("column '{column}' has a negative upper bound")))?;
            Ok(ColumnBound {
                column: column.clone(),
                min,
                max,
            })
        })
        .collect()
}

/// What this node announces in its hello. The value holder adds its layout, key and
/// sensitivities to it.
pub fn own_terms(permit: &Permit) -> SumTerms {
    SumTerms {
        epsilon: permit.epsilon.map_or(0.0, |e| e.get()),
        min_result: permit.min_result,
        release_to_coordinator: permit.counts_allowed_to(Recipient::Coordinator),
        widths: Vec::new(),
        public_key: Vec::new(),
        sensitivities: Vec::new(),
    }
}

/// The terms both parties apply.
#[derive(Debug, Clone, PartialEq)]
pub struct JointTerms {
    /// The release's ε (the smaller positive one); `None`: an exact release.
    pub epsilon: Option<f64>,
    /// The larger k-threshold.
    pub min_result: u64,
    /// Whether both policies let the release go to the coordinator.
    pub release_to_coordinator: bool,
    /// Per column, the value holder's sensitivity (count first, exactly 1).
    pub sensitivities: Vec<u64>,
}

/// Combines the two hellos' terms. `value_holder` is the one that carries the sensitivities;
/// there must be one per column, the count's exactly 1 and every other at least 1.
pub fn joint_terms(
    key_holder: &SumTerms,
    value_holder: &SumTerms,
    columns: usize,
) -> Result<JointTerms, String> {
    for t in [key_holder, value_holder] {
        if !t.epsilon.is_finite() || t.epsilon < 0.0 {
            return Err(format!("an invalid epsilon {}", t.epsilon));
        }
    }
    if value_holder.sensitivities.len() != columns {
        return Err(format!(
            "{} sensitivities for {columns} columns",
            value_holder.sensitivities.len()
        ));
    }
    if value_holder.sensitivities.first() != Some(&1) {
        return Err("a count sensitivity other than 1".into());
    }
    if value_holder.sensitivities.contains(&0) {
        return Err("a sensitivity of 0".into());
    }
    let epsilon = [key_holder.epsilon, value_holder.epsilon]
        .into_iter()
        .filter(|e| *e > 0.0)
        .min_by(f64::total_cmp);
    Ok(JointTerms {
        epsilon,
        min_result: key_holder.min_result.max(value_holder.min_result).max(1),
        release_to_coordinator: key_holder.release_to_coordinator
            && value_holder.release_to_coordinator,
        sensitivities: value_holder.sensitivities.clone(),
    })
}

/// Per column, the discrete Laplace mechanism for the joint ε split evenly over the columns:
/// scale `sensitivity × columns / ε`, exact. Empty for an exact release.
pub fn mechanisms(joint: &JointTerms) -> Result<Vec<Mechanism>, String> {
    let Some(epsilon) = joint.epsilon else {
        return Ok(Vec::new());
    };
    let columns = joint.sensitivities.len() as u64;
    joint
        .sensitivities
        .iter()
        .map(|&s| {
            let scale = Scale::from_epsilon(s.saturating_mul(columns), epsilon)
                .map_err(|e| e.to_string())?;
            Ok(Mechanism::DiscreteLaplace { scale })
        })
        .collect()
}

/// The noise terms results carry: per column, in column order, one term for each party's draw
/// (the key holder's, then the value holder's). Empty for an exact release.
pub fn noise_terms(
    joint: &JointTerms,
    key_holder: &str,
    value_holder: &str,
) -> Result<Vec<NoiseTerm>, String> {
    let Some(epsilon) = joint.epsilon else {
        return Ok(Vec::new());
    };
    let per_column = epsilon / joint.sensitivities.len() as f64;
    Ok(mechanisms(joint)?
        .iter()
        .zip(&joint.sensitivities)
        .flat_map(|(m, &s)| {
            [key_holder, value_holder].map(|drawer| NoiseTerm {
                node: drawer.to_owned(),
                mechanism: MECHANISM.to_owned(),
                epsilon: per_column,
                sensitivity: s,
                scale: m.scale().to_string(),
            })
        })
        .collect())
}

/// Drawers per column in a release's noise terms ([`noise_terms`]).
pub const DRAWERS: usize = 2;

/// One noise draw per cell (cell `i` is column `i % columns`), from the OS CSPRNG through the
/// exact sampler. All zeros for an exact release.
pub fn draw_noise(joint: &JointTerms, cells: usize) -> Result<Vec<i64>, String> {
    let mechanisms = mechanisms(joint)?;
    if mechanisms.is_empty() {
        return Ok(vec![0; cells]);
    }
    (0..cells)
        .map(|i| {
            mechanisms[i % mechanisms.len()]
                .sample()
                .map_err(|e| e.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn terms(epsilon: f64, min_result: u64, release: bool, sens: &[u64]) -> SumTerms {
        SumTerms {
            epsilon,
            min_result,
            release_to_coordinator: release,
            widths: Vec::new(),
            public_key: Vec::new(),
            sensitivities: sens.to_vec(),
        }
    }

    #[test]
    fn the_strictest_terms_apply() {
        let a = terms(1.0, 5, true, &[]);
        let b = terms(0.5, 3, true, &[1, 1000]);
        let j = joint_terms(&a, &b, 2).unwrap();
        assert_eq!(j.epsilon, Some(0.5));
        assert_eq!(j.min_result, 5);
        assert!(j.release_to_coordinator);
        let none =
            joint_terms(&terms(0.0, 1, true, &[]), &terms(0.0, 1, false, &[1, 9]), 2).unwrap();
        assert_eq!(none.epsilon, None);
        assert!(!none.release_to_coordinator);
        // One side asking for noise is enough.
        let one = joint_terms(&terms(0.0, 1, true, &[]), &b, 2).unwrap();
        assert_eq!(one.epsilon, Some(0.5));
    }

    #[test]
    fn bad_terms_are_refused() {
        let a = terms(1.0, 1, true, &[]);
        for bad in [
            terms(f64::NAN, 1, true, &[1, 5]),
            terms(-1.0, 1, true, &[1, 5]),
            terms(1.0, 1, true, &[1]),
            terms(1.0, 1, true, &[2, 5]),
            terms(1.0, 1, true, &[1, 0]),
        ] {
            assert!(joint_terms(&a, &bad, 2).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_epsilon_is_split_exactly_over_the_columns() {
        let j = joint_terms(
            &terms(1.0, 1, true, &[]),
            &terms(0.0, 1, true, &[1, 1000]),
            2,
        )
        .unwrap();
        let t = noise_terms(&j, "acme", "payco").unwrap();
        assert_eq!(t.len(), 2 * DRAWERS);
        // Count: scale 1 × 2 / 1 = 2; amount: 1000 × 2 / 1 = 2000; each column ε/2, drawn by
        // both parties.
        assert_eq!(
            t.iter()
                .map(|t| (t.node.as_str(), t.scale.as_str()))
                .collect::<Vec<_>>(),
            [
                ("acme", "2"),
                ("payco", "2"),
                ("acme", "2000"),
                ("payco", "2000")
            ]
        );
        assert!(t.iter().all(|t| t.epsilon == 0.5));
        let noise = draw_noise(&j, 6).unwrap();
        assert_eq!(noise.len(), 6);
        let exact =
            joint_terms(&terms(0.0, 1, true, &[]), &terms(0.0, 1, true, &[1, 7]), 2).unwrap();
        assert_eq!(draw_noise(&exact, 4).unwrap(), vec![0; 4]);
        assert!(noise_terms(&exact, "acme", "payco").unwrap().is_empty());
    }

    #[test]
    fn the_shape_follows_the_spec() {
        let grouped = OverlapSumSpec {
            sums: vec!["amount".into()],
            group_by: "reason".into(),
            groups: vec!["fraud".into(), "dispute".into()],
            count: true,
        };
        let s = SumShape::of(&grouped);
        assert_eq!(s.labels, ["fraud", "dispute", "(other)"]);
        assert_eq!(s.columns, ["count", "amount"]);
        assert_eq!(
            s.cells(),
            job_cells(true, 2, 1),
            "node and coordinator size rows alike"
        );
        let flat = OverlapSumSpec {
            sums: vec!["a".into(), "b".into()],
            ..Default::default()
        };
        assert_eq!(SumShape::of(&flat).labels, ["(all)"]);
        assert_eq!(SumShape::of(&flat).cells(), 3);
    }
}
