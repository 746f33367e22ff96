//! The value holder's input to an `overlap-sum`: its distinct join keys and, per key, one row of
//! cells (in the [`SumShape`] of the job).
//!
//! An identifier may have several rows (several chargebacks on one account, and refunds as
//! negative rows). They are combined into one contribution: each column's values are **summed
//! first** over the identifier's rows, signed and exactly (in `i128`), and only the total is
//! clipped to the policy's bounds, so a refund offsets the charge it refunds and one identifier
//! adds at most the bound to a column — the sensitivity the noise is scaled to. The identifier
//! belongs to the group of its first row (rows of the same identifier with another label are
//! counted in `keys_with_several_groups`, a figure for this node's audit log only). A row whose
//! value field is missing or not an integer is skipped and counted.

use std::collections::HashMap;

use cleanroom_circuits::ahe::SlotLayout;
use cleanroom_circuits::{EncodedPoint, ItemSet, JobKey};

use cleanroom_proto::v1::OverlapSumSpec;

use super::DatasetConfig;
use super::cluster_pass::{Outcome, SealingKey, ValuesSpec};
use super::dataset::{self, KeySpec, KeyedRowCounts, RowFilter, Sealed};

/// The label of the one group of an ungrouped job.
pub const ALL_GROUP: &str = "(all)";
/// The label of the group that collects identifiers whose label is not listed.
pub const OTHER_GROUP: &str = "(other)";
/// The name of the count column (shared identifiers per group).
pub const COUNT_COLUMN: &str = "count";

/// The shape of a job's rows: its groups and columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SumShape {
    /// Group labels in cell order: the spec's then "(other)", or "(all)" ungrouped.
    pub labels: Vec<String>,
    /// Column names in cell order within a group: "count", then the summed columns.
    pub columns: Vec<String>,
}

impl SumShape {
    /// The shape a spec implies (the same at both parties).
    pub fn of(sum: &OverlapSumSpec) -> SumShape {
        let labels = if sum.group_by.is_empty() {
            vec![ALL_GROUP.to_owned()]
        } else {
            let mut l = sum.groups.clone();
            l.push(OTHER_GROUP.to_owned());
            l
        };
        let mut columns = vec![COUNT_COLUMN.to_owned()];
        columns.extend(sum.sums.iter().cloned());
        SumShape { labels, columns }
    }

    /// Cells per row: groups × columns.
    pub fn cells(&self) -> usize {
        self.labels.len() * self.columns.len()
    }
}

/// One summed column and the bounds the entry clips it to (per identifier, `0 ≤ min ≤ max`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnBound {
    /// The CSV header.
    pub column: String,
    /// Smallest per-identifier total.
    pub min: u64,
    /// Largest per-identifier total.
    pub max: u64,
}

/// The value holder's distinct keys: identifiers, or points the executors blinded.
#[derive(Debug)]
pub enum SumKeys {
    /// Distinct join keys, sorted.
    Items(ItemSet),
    /// `k·H(x)` for each distinct join key, sorted, and the job key `k` ([`load_on_cluster`]).
    Blinded(JobKey, Vec<EncodedPoint>),
}

impl SumKeys {
    /// How many distinct keys.
    pub fn len(&self) -> usize {
        match self {
            SumKeys::Items(items) => items.len(),
            SumKeys::Blinded(_, points) => points.len(),
        }
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What [`load`] read.
#[derive(Debug)]
pub struct SumInput {
    /// The distinct keys.
    pub keys: SumKeys,
    /// `keys.len() × cells` values, row-major in the order of `keys`.
    pub values: Vec<u64>,
    /// The narrowest slot layout for the bounds.
    pub layout: SlotLayout,
    /// Per column, the largest contribution of one identifier (1 for the count).
    pub sensitivities: Vec<u64>,
    /// Rows read, rejected (key), excluded (consent, forgotten).
    pub counts: KeyedRowCounts,
    /// Rows skipped because a value field was missing or not an integer.
    pub rows_bad_value: u64,
    /// Identifiers whose rows carried more than one group label (this node's own figure: for
    /// its audit log, never released).
    pub keys_with_several_groups: u64,
}

/// Reads the dataset for an overlap-sum of `shape`, grouping by `group_by` (if any) with the
/// shape's labels, summing `bounds` (one per summed column, in order).
pub fn load(
    dataset: &DatasetConfig,
    keys: &KeySpec,
    group_by: Option<&str>,
    shape: &SumShape,
    bounds: &[ColumnBound],
    filter: RowFilter<'_>,
    max_rows: u64,
) -> Result<SumInput, String> {
    let sums = check_shape(shape, bounds)?;
    // Listed labels map to their index; anything else goes to the last group ("(other)"), and
    // an ungrouped job has one group.
    let other = shape.labels.len() - 1;
    let index: HashMap<&[u8], usize> = match group_by {
        Some(_) => shape.labels[..other]
            .iter()
            .enumerate()
            .map(|(i, l)| (l.as_bytes(), i))
            .collect(),
        None => HashMap::new(),
    };
    let mut read: Vec<&str> = Vec::with_capacity(1 + sums);
    read.extend(bounds.iter().map(|b| b.column.as_str()));
    if let Some(g) = group_by {
        read.push(g);
    }

    // Every accepted row, in file order: its key (in an arena), its group and its signed
    // values, unclipped (clipping applies to each identifier's total below).
    let mut all = ItemSet::new();
    let mut groups: Vec<u32> = Vec::new();
    let mut values: Vec<i64> = Vec::new();
    let mut bad = 0u64;
    let mut row_values = vec![0i64; sums];
    let location = dataset.location();
    let counts =
        dataset::for_each_keyed_row_for(dataset, keys, &read, filter, max_rows, |row, key, f| {
            for (i, slot) in row_values.iter_mut().enumerate() {
                let parsed = f[i]
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|s| s.trim().parse::<i64>().ok());
                let Some(v) = parsed else {
                    bad += 1;
                    return Ok(());
                };
                *slot = v;
            }
            let group = match group_by {
                Some(_) => {
                    let label = f[sums].map(<[u8]>::trim_ascii).unwrap_or_default();
                    index.get(label).copied().unwrap_or(other)
                }
                None => 0,
            };
            all.push(key).map_err(|_| dataset::DatasetError::TooLarge {
                location: location.clone(),
                row,
            })?;
            groups.push(group as u32);
            values.extend_from_slice(&row_values);
            Ok(())
        })
        .map_err(|e| e.to_string())?;

    let combined = combine(
        all.len(),
        |i| all.get(i as usize).unwrap_or_default(),
        &groups,
        &values,
        shape,
        bounds,
    )?;
    let mut items = ItemSet::new();
    for &first in &combined.firsts {
        items
            .push(all.get(first as usize).unwrap_or_default())
            .map_err(|e| e.to_string())?;
    }
    combined.into_input(SumKeys::Items(items), counts, bad, (shape, bounds))
}

/// [`load`] with the pass on the partner's Ballista executors ([`super::cluster_pass`]): they
/// read, filter, normalise and blind each row's key with `key`, and parse its values and group;
/// the node combines each identifier's rows by its point as [`load`] does by its key. The
/// result holds points ([`SumKeys::Blinded`]), never identifiers.
#[allow(clippy::too_many_arguments)]
pub fn load_on_cluster(
    dataset: &DatasetConfig,
    keys: &KeySpec,
    group_by: Option<&str>,
    shape: &SumShape,
    bounds: &[ColumnBound],
    filter: RowFilter<'_>,
    max_rows: u64,
    (key, sealing): (JobKey, &SealingKey),
) -> Result<SumInput, String> {
    let sums = check_shape(shape, bounds)?;
    let mut columns: Vec<&str> = bounds.iter().map(|b| b.column.as_str()).collect();
    columns.extend(group_by);
    let spec = ValuesSpec {
        sums,
        groups: group_by.map(|_| shape.labels[..shape.labels.len() - 1].to_vec()),
    };
    let sealed = Sealed {
        key: &key,
        sealing,
        values: Some((columns, spec)),
    };
    let mut points: Vec<EncodedPoint> = Vec::new();
    let mut groups: Vec<u32> = Vec::new();
    let mut values: Vec<i64> = Vec::new();
    let mut bad = 0u64;
    let location = dataset.location();
    let counts = dataset::pass_on_cluster(dataset, keys, filter, max_rows, sealed, |row, out| {
        match out {
            Outcome::Valued(point, group, row_values) if row_values.len() == sums => {
                points.push(point);
                groups.push(group);
                values.extend_from_slice(&row_values);
            }
            Outcome::BadValue => bad += 1,
            _ => {
                return Err(dataset::DatasetError::Source(
                    super::source::SourceError::Engine {
                        dataset: dataset.name.clone(),
                        location: location.clone(),
                        message: format!(
                            "row {row}: an executor returned no values where the pass asked \
                             for them (are the executors running this node's version?)"
                        ),
                    },
                ));
            }
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    let labels = shape.labels.len();
    if groups.iter().any(|&g| g as usize >= labels) {
        return Err(format!(
            "{location}: an executor returned a group outside the job's {labels}"
        ));
    }
    let combined = combine(
        points.len(),
        |i| points.get(i as usize).map_or(&[][..], |p| p.as_slice()),
        &groups,
        &values,
        shape,
        bounds,
    )?;
    let distinct: Vec<EncodedPoint> = combined
        .firsts
        .iter()
        .filter_map(|&first| points.get(first as usize).copied())
        .collect();
    drop(points);
    let counts = KeyedRowCounts::from(counts);
    combined.into_input(
        SumKeys::Blinded(key, distinct),
        counts,
        bad,
        (shape, bounds),
    )
}

/// The number of summed columns, if the shape has one column per bound besides the count.
fn check_shape(shape: &SumShape, bounds: &[ColumnBound]) -> Result<usize, String> {
    let sums = bounds.len();
    if shape.columns.len() != 1 + sums {
        return Err(format!(
            "{} bounds for {} summed columns",
            sums,
            shape.columns.len().saturating_sub(1)
        ));
    }
    Ok(sums)
}

/// Each identifier's rows combined: per distinct key, in key order, the index of its first
/// row, and its row of cells.
struct Combined {
    /// For each distinct key, its first row (in read order).
    firsts: Vec<u32>,
    /// `firsts.len() × cells` values, row-major.
    cells: Vec<u64>,
    /// Identifiers whose rows carried more than one group label.
    several: u64,
}

/// Combines the `rows` accepted rows (each with its key, its group in `groups` and its `sums`
/// values in `values`): sorts them by key, sums each identifier's values exactly, clips the
/// totals to `bounds`, and puts the identifier in the group of its first row.
fn combine<'k>(
    rows: usize,
    key: impl Fn(u32) -> &'k [u8],
    groups: &[u32],
    values: &[i64],
    shape: &SumShape,
    bounds: &[ColumnBound],
) -> Result<Combined, String> {
    let sums = bounds.len();
    let columns = 1 + sums;
    // Fits: at most MAX_ROWS (< 2^32) rows are read.
    let mut order: Vec<u32> = (0..rows as u32).collect();
    // Stable, so the first row of each identifier (in read order) comes first in its run.
    order.sort_by(|&a, &b| key(a).cmp(key(b)));
    let cells = shape.cells();
    let mut firsts = Vec::new();
    let mut out: Vec<u64> = Vec::new();
    let mut several = 0u64;
    // At most `max_rows` (≤ 2^27) rows of |v| ≤ 2^63 each: an i128 total never overflows.
    let mut totals = vec![0i128; sums];
    let mut start = 0;
    while start < order.len() {
        let first = order[start];
        let mut end = start + 1;
        while end < order.len() && key(order[end]) == key(first) {
            end += 1;
        }
        let group = groups[first as usize] as usize;
        totals.iter_mut().for_each(|t| *t = 0);
        let mut mixed = false;
        for &r in &order[start..end] {
            mixed |= groups[r as usize] as usize != group;
            let row = &values[r as usize * sums..(r as usize + 1) * sums];
            for (t, v) in totals.iter_mut().zip(row) {
                *t += i128::from(*v);
            }
        }
        several += u64::from(mixed);
        firsts.push(first);
        let base = out.len();
        out.resize(base + cells, 0);
        let cell = base + group * columns;
        out[cell] = 1;
        for (i, (t, b)) in totals.iter().zip(bounds).enumerate() {
            let clipped = (*t).clamp(i128::from(b.min), i128::from(b.max));
            // Within [min, max] ⊂ [0, 2^63]: the conversion cannot fail.
            out[cell + 1 + i] = u64::try_from(clipped).unwrap_or(b.max);
        }
        start = end;
    }
    Ok(Combined {
        firsts,
        cells: out,
        several,
    })
}

impl Combined {
    /// The input over `keys` (in the order of [`Combined::firsts`]).
    fn into_input(
        self,
        keys: SumKeys,
        counts: KeyedRowCounts,
        rows_bad_value: u64,
        (shape, bounds): (&SumShape, &[ColumnBound]),
    ) -> Result<SumInput, String> {
        let columns = 1 + bounds.len();
        let mut sensitivities = vec![1u64];
        sensitivities.extend(bounds.iter().map(|b| b.max.max(1)));
        let maxima: Vec<u64> = (0..shape.cells())
            .map(|c| sensitivities[c % columns])
            .collect();
        let layout = SlotLayout::for_maxima(&maxima).map_err(|e| e.to_string())?;
        Ok(SumInput {
            keys,
            values: self.cells,
            layout,
            sensitivities,
            counts,
            rows_bad_value,
            keys_with_several_groups: self.several,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn items(input: &SumInput) -> &ItemSet {
        match &input.keys {
            SumKeys::Items(items) => items,
            SumKeys::Blinded(..) => panic!("read in process: identifiers"),
        }
    }

    fn dataset(dir: &std::path::Path, csv: &str) -> DatasetConfig {
        std::fs::write(dir.join("cb.csv"), csv).unwrap();
        // The dataset's table as a node config declares it (`[[dataset]]`), its path resolved.
        let toml = r#"
name = "chargebacks"
path = "cb.csv"
  [[identifier]]
  name = "email"
  column = "email"
  normaliser = "email"
"#;
        let mut d: DatasetConfig = toml::from_str(toml).unwrap();
        d.path = dir.join("cb.csv");
        d
    }

    /// [`load`] keyed by `email`, with no row filter, for the job `spec` clipping by `bounds`.
    fn load_by_email(
        d: &DatasetConfig,
        spec: &OverlapSumSpec,
        bounds: &[ColumnBound],
    ) -> Result<SumInput, String> {
        let group_by = Some(spec.group_by.as_str()).filter(|g| !g.is_empty());
        let keys = KeySpec::new(["email"]);
        let shape = SumShape::of(spec);
        load(
            d,
            &keys,
            group_by,
            &shape,
            bounds,
            RowFilter::default(),
            1000,
        )
    }

    /// An ungrouped job summing `column`.
    fn ungrouped(column: &str) -> OverlapSumSpec {
        OverlapSumSpec {
            sums: vec![column.into()],
            ..Default::default()
        }
    }

    fn bound(column: &str, min: u64, max: u64) -> ColumnBound {
        ColumnBound {
            column: column.into(),
            min,
            max,
        }
    }

    #[test]
    fn rows_of_one_identifier_are_summed_clipped_and_grouped_by_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(
            dir.path(),
            "email,amount,reason\n\
             b@x.com,50,fraud\n\
             a@x.com,30,dispute\n\
             A@x.com,40,fraud\n\
             c@x.com,900,weird\n\
             d@x.com,notanumber,fraud\n\
             b@x.com,70,fraud\n\
             e@x.com,-5,fraud\n",
        );
        let spec = OverlapSumSpec {
            sums: vec!["amount".into()],
            group_by: "reason".into(),
            groups: vec!["fraud".into(), "dispute".into()],
            count: true,
        };
        let input = load_by_email(&d, &spec, &[bound("amount", 0, 100)]).unwrap();
        // a (dispute, 30+40=70, second row labelled fraud), b (fraud, 50+70 clipped to 100),
        // c ((other), 900 clipped to 100), e (fraud, -5 clipped to 0); d's value is bad.
        assert_eq!(items(&input).len(), 4);
        assert_eq!(input.rows_bad_value, 1);
        assert_eq!(input.keys_with_several_groups, 1);
        assert_eq!(input.sensitivities, [1, 100]);
        assert_eq!(input.layout.cells(), 6);
        let row = |k: &str| {
            let i = items(&input).position_sorted(k.as_bytes()).unwrap();
            input.values[i * 6..(i + 1) * 6].to_vec()
        };
        assert_eq!(row("a@x.com"), [0, 0, 1, 70, 0, 0]);
        assert_eq!(row("b@x.com"), [1, 100, 0, 0, 0, 0]);
        assert_eq!(row("c@x.com"), [0, 0, 0, 0, 1, 100]);
        assert_eq!(row("e@x.com"), [1, 0, 0, 0, 0, 0]);
    }

    /// Issue 18, item 2: refunds are negative rows, and each identifier's rows are summed before
    /// its total is clipped. The truth is computed here, independently, from the same rows.
    #[test]
    fn refunds_are_summed_before_the_total_is_clipped() {
        let dir = tempfile::tempdir().unwrap();
        let rows: [(&str, i64); 9] = [
            ("a@x.com", 80),
            ("a@x.com", -50), // refund: a's total is 30, not min(80, 60) + 0
            ("b@x.com", 70),
            ("b@x.com", 70),  // 140, clipped to 60
            ("c@x.com", -20), // a net refund: -20, clipped to the lower bound 0
            ("d@x.com", 100),
            ("d@x.com", -100),
            ("d@x.com", 45), // 45
            ("e@x.com", 60),
        ];
        let mut csv = String::from("email,amount\n");
        for (k, v) in rows {
            csv.push_str(&format!("{k},{v}\n"));
        }
        let d = dataset(dir.path(), &csv);
        let (min, max) = (0i64, 60i64);
        let bounds = [bound("amount", min as u64, max as u64)];
        let input = load_by_email(&d, &ungrouped("amount"), &bounds).unwrap();
        let mut truth: std::collections::BTreeMap<&str, i64> = Default::default();
        for (k, v) in rows {
            *truth.entry(k).or_default() += v;
        }
        assert_eq!(items(&input).len(), truth.len());
        for (k, total) in truth {
            let i = items(&input).position_sorted(k.as_bytes()).unwrap();
            assert_eq!(
                input.values[i * 2..i * 2 + 2],
                [1, total.clamp(min, max) as u64],
                "{k}"
            );
        }
        // Clipping each row first would have given a 60 (80 → 60, −50 → 0), c 0, d 60 + 0 + 45.
        let a = items(&input).position_sorted(b"a@x.com").unwrap();
        assert_eq!(input.values[a * 2 + 1], 30);
    }

    #[test]
    fn an_ungrouped_job_has_one_group_and_the_lower_bound_applies_to_totals() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(dir.path(), "email,amount\na@x.com,1\nb@x.com,20\n");
        let input = load_by_email(&d, &ungrouped("amount"), &[bound("amount", 5, 10)]).unwrap();
        assert_eq!(input.values, [1, 5, 1, 10]);
    }

    #[test]
    fn a_missing_column_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(dir.path(), "email,amount\na@x.com,1\n");
        let e = load_by_email(&d, &ungrouped("fee"), &[bound("fee", 0, 10)]).unwrap_err();
        assert!(e.contains("fee"), "{e}");
    }
}
