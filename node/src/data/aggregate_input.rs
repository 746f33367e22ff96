//! An `aggregate` party's input: its dataset read into the clipped per-group vector that it then
//! splits into shares.

use std::collections::HashMap;

use cleanroom_circuits::aggregate::{GroupDomain, GroupVector, clip, parse_group_integer};

use super::DatasetConfig;
use super::cluster_aggregate::Cell;
use super::cluster_pass::SealingKey;
use super::dataset::{self, DatasetError, MAX_ROWS, RowFilter};
use super::source::frame::GroupedRow;

/// Why a party's vector could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AggregateInputError {
    /// The group domain and columns make no vector (too many cells).
    #[error("{0}")]
    Vector(String),
    /// The dataset could not be read.
    #[error(transparent)]
    Rows(#[from] DatasetError),
}

/// A party's loaded input.
#[derive(Debug)]
pub struct Loaded {
    /// `(groups + 1) × (1 + sums)` cells: count first, the "(other)" group last.
    pub vector: GroupVector,
    /// What the filters left out.
    pub counts: dataset::RowCounts,
    /// Contributions summed: rows used (passed the filters and parsed), or with per-person
    /// clipping the persons counted.
    pub rows_used: u64,
    /// Rows that were malformed (see `counts.rejections`), whose value field was missing or not
    /// an integer (skipped), or, with per-person clipping, whose person field is empty.
    pub rows_rejected: u64,
    /// Rows (persons, with per-person clipping) counted in "(other)".
    pub rows_other: u64,
    /// Per-person clipping only: persons counted, rows left out.
    pub persons: Option<crate::audit::PersonCounts>,
}

/// One person's contribution while its rows are read: the first of the job's groups among its
/// rows so far (the lowest index), the sums of its rows in that group (saturating; clipped once
/// all rows are read) and how many they are.
struct PersonSum {
    group: usize,
    sums: Vec<i64>,
    rows: u64,
}

/// Builds the clipped per-group vector of a dataset: one row per group of `domain` plus
/// "(other)", column 0 the row count and then each of `bounds` (column, min, max) summed after
/// clipping. A row with a missing or non-integer value is rejected (counted, never summed); so
/// is, for an integer domain, a row whose group field is not an integer. An integer outside the
/// range, like an unlisted label, goes to "(other)".
///
/// With a `person` column, contributions are per person instead: a person's rows in the first of
/// the job's groups its (accepted) rows carry — in the domain's order, "(other)" last — are
/// summed, each sum clipped once to its bounds, and the person counted once in that group; its
/// rows in other groups are left out (counted in [`Loaded::persons`]), so one person moves one
/// group's cells by at most the bounds, whatever number of rows it has. The order of the rows
/// does not matter. A row whose person field is empty is rejected.
pub fn load_vector(
    dataset: &DatasetConfig,
    group_by: &str,
    domain: &GroupDomain,
    bounds: &[(String, i64, i64)],
    person: Option<&str>,
    filter: RowFilter<'_>,
) -> Result<Loaded, AggregateInputError> {
    let index: HashMap<&[u8], usize> = match domain {
        GroupDomain::Labels(labels) => labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.as_bytes(), i))
            .collect(),
        GroupDomain::Range { .. } => HashMap::new(),
    };
    let integer_groups = matches!(domain, GroupDomain::Range { .. });
    let other = domain.other();
    let mut vector = GroupVector::zeros(domain.groups(), 1 + bounds.len())
        .map_err(|e| AggregateInputError::Vector(e.to_string()))?;
    let mut columns: Vec<&str> = vec![group_by];
    columns.extend(bounds.iter().map(|(c, _, _)| c.as_str()));
    columns.extend(person);
    let person_field = 1 + bounds.len();
    let (mut used, mut rejected, mut in_other) = (0u64, 0u64, 0u64);
    let mut values = vec![0i64; bounds.len()];
    let mut people: HashMap<Vec<u8>, PersonSum> = HashMap::new();
    let mut outside_group = 0u64;
    let counts = dataset::for_each_row_for(dataset, &columns, filter, MAX_ROWS, |_, fields| {
        for (i, (_, min, max)) in bounds.iter().enumerate() {
            let parsed = fields[i + 1].and_then(super::value::parse_value);
            let Some(v) = parsed else {
                rejected += 1;
                return Ok(());
            };
            // Per person, a row's value is clipped only as part of its person's sum.
            values[i] = if person.is_some() {
                v
            } else {
                clip(v, *min, *max)
            };
        }
        let group = if integer_groups {
            match fields[0].and_then(parse_group_integer) {
                Some(v) => domain.group_of_integer(v),
                None => {
                    rejected += 1;
                    return Ok(());
                }
            }
        } else {
            let label = fields[0].map(<[u8]>::trim_ascii).unwrap_or_default();
            index.get(label).copied().unwrap_or(other)
        };
        if person.is_some() {
            let id = fields[person_field]
                .map(<[u8]>::trim_ascii)
                .unwrap_or_default();
            if id.is_empty() {
                rejected += 1;
                return Ok(());
            }
            match people.get_mut(id) {
                None => {
                    people.insert(
                        id.to_vec(),
                        PersonSum {
                            group,
                            sums: values.clone(),
                            rows: 1,
                        },
                    );
                }
                Some(p) if p.group == group => {
                    for (s, v) in p.sums.iter_mut().zip(&values) {
                        *s = s.saturating_add(*v);
                    }
                    p.rows += 1;
                }
                // A group listed earlier: the rows so far are outside the person's group.
                Some(p) if group < p.group => {
                    outside_group += p.rows;
                    p.group = group;
                    p.sums.clone_from(&values);
                    p.rows = 1;
                }
                Some(_) => outside_group += 1,
            }
            return Ok(());
        }
        if group == other {
            in_other += 1;
        }
        used += 1;
        // In range by construction: `group ≤ labels.len()`, columns = 1 + bounds.
        let _ = vector.add(group, 0, 1);
        for (i, v) in values.iter().enumerate() {
            let _ = vector.add(group, i + 1, *v);
        }
        Ok(())
    })
    .map_err(AggregateInputError::Rows)?;
    let persons = person.map(|_| crate::audit::PersonCounts {
        persons: people.len() as u64,
        rows_outside_group: outside_group,
    });
    for p in people.into_values() {
        if p.group == other {
            in_other += 1;
        }
        used += 1;
        let _ = vector.add(p.group, 0, 1);
        for (i, (s, (_, min, max))) in p.sums.iter().zip(bounds).enumerate() {
            let _ = vector.add(p.group, i + 1, clip(*s, *min, *max));
        }
    }
    Ok(Loaded {
        vector,
        rows_used: used,
        // Malformed rows (the reader's) and rows with a bad value or person (ours).
        rows_rejected: counts.rejections.total() + rejected,
        counts,
        rows_other: in_other,
        persons,
    })
}

/// [`load_vector`] on the partner's Ballista executors: they read, filter, parse and group
/// ([`super::cluster_aggregate`]): a row's values clipped, or with a `person` column each
/// person's sums in its first group clipped. The node adds the groups' counts and sums into
/// the vector. The same vector and counts as [`load_vector`] over the same rows; rejected rows
/// have no place.
pub fn load_vector_on_cluster(
    dataset: &DatasetConfig,
    group_by: &str,
    domain: &GroupDomain,
    bounds: &[(String, i64, i64)],
    person: Option<&str>,
    filter: RowFilter<'_>,
    sealing: &SealingKey,
) -> Result<Loaded, AggregateInputError> {
    let mut columns: Vec<&str> = vec![group_by];
    columns.extend(bounds.iter().map(|(c, _, _)| c.as_str()));
    columns.extend(person);
    let clips: Vec<(i64, i64)> = bounds.iter().map(|(_, min, max)| (*min, *max)).collect();
    let (counts, grouped) = dataset::aggregate_on_cluster(
        dataset,
        &columns,
        (domain, &clips, person.is_some()),
        filter,
        MAX_ROWS,
        sealing,
    )?;
    from_groups(domain, (bounds.len(), person.is_some()), counts, grouped)
}

/// The figures of the executors' groups that do not fit the job's vector.
fn out_of_shape() -> AggregateInputError {
    AggregateInputError::Vector(
        "an executor returned a group or a sum outside the job's vector".into(),
    )
}

/// The vector of an aggregate grouped on the executors: each counted cell's count and sums
/// added into its group, and the rows left out counted. Per row, a cell's count is its rows
/// and its figures its clipped values' sums; per `person`, its count is its persons and its
/// figures its rows, the rows its persons left out in other groups, then its persons' clipped
/// sums ([`super::source::frame::Grouping::Persons`]).
fn from_groups(
    domain: &GroupDomain,
    (sums, person): (usize, bool),
    counts: dataset::RowCounts,
    grouped: Vec<(Cell, GroupedRow)>,
) -> Result<Loaded, AggregateInputError> {
    let mut vector = GroupVector::zeros(domain.groups(), 1 + sums)
        .map_err(|e| AggregateInputError::Vector(e.to_string()))?;
    let (mut used, mut rejected, mut in_other, mut outside) = (0u64, 0u64, 0u64, 0u64);
    let figure = |v: &i128| u64::try_from(*v).map_err(|_| out_of_shape());
    for (cell, row) in grouped {
        let (rows, left_out, totals) = match (person, row.sums.as_slice()) {
            (false, totals) => (row.rows, 0, totals),
            (true, [rows, left_out, totals @ ..]) => (figure(rows)?, figure(left_out)?, totals),
            (true, _) => return Err(out_of_shape()),
        };
        let group = match cell {
            Cell::Counted(group) => group as usize,
            _ => {
                rejected = rejected.saturating_add(rows);
                continue;
            }
        };
        if group == domain.other() {
            in_other = in_other.saturating_add(row.rows);
        }
        used = used.saturating_add(row.rows);
        outside = outside.saturating_add(left_out);
        add_cell(&mut vector, group, row.rows, totals, sums)?;
    }
    Ok(Loaded {
        vector,
        rows_used: used,
        rows_rejected: counts.rejections.total() + rejected,
        counts,
        rows_other: in_other,
        persons: person.then_some(crate::audit::PersonCounts {
            persons: used,
            rows_outside_group: outside,
        }),
    })
}

/// Adds a cell's count and its `sums` exact sums into `group` of `vector` (cells are in
/// Z_2^64: each reduced mod 2^64).
fn add_cell(
    vector: &mut GroupVector,
    group: usize,
    count: u64,
    totals: &[i128],
    sums: usize,
) -> Result<(), AggregateInputError> {
    if totals.len() != sums {
        return Err(out_of_shape());
    }
    vector
        .add(group, 0, count as i64)
        .map_err(|_| out_of_shape())?;
    for (i, total) in totals.iter().enumerate() {
        vector
            .add(group, i + 1, *total as u64 as i64)
            .map_err(|_| out_of_shape())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn dataset(csv: &str) -> (tempfile::TempDir, DatasetConfig) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cb.csv");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(csv.as_bytes())
            .unwrap();
        let d = DatasetConfig::new("chargebacks", path, vec![]);
        (dir, d)
    }

    #[test]
    fn vector_counts_clips_and_collects_other() {
        let (_dir, d) = dataset(
            "id,category,amount,ok\n1,a,100,yes\n2,b,5000,yes\n3,a,-7,no\n4,zzz,10,yes\n5,b,abc,yes\n6, a ,1,yes\n",
        );
        let labels = GroupDomain::Labels(vec!["a".to_owned(), "b".to_owned()]);
        let bounds = vec![("amount".to_owned(), 0, 1000)];
        let l = load_vector(
            &d,
            "category",
            &labels,
            &bounds,
            None,
            RowFilter {
                consent_column: Some("ok"),
                forgotten: None,
            },
        )
        .unwrap();
        assert_eq!(l.counts.rows_read, 6);
        assert_eq!(l.counts.rows_excluded_consent, 1);
        assert_eq!((l.rows_used, l.rows_rejected, l.rows_other), (4, 1, 1));
        // a: rows 1 and 6 (trimmed label); b: row 2 clipped to 1000; other: row 4.
        assert_eq!(l.vector.cells(), &[2, 101, 1, 1000, 1, 10]);
    }

    #[test]
    fn missing_group_column_fails_the_job() {
        let (_dir, d) = dataset("id,amount\n1,2\n");
        let none = GroupDomain::Labels(vec![]);
        let e = load_vector(&d, "category", &none, &[], None, RowFilter::default()).unwrap_err();
        assert!(e.to_string().contains("no column 'category'"), "{e}");
    }

    #[test]
    fn integer_domain_vector() {
        // Range [10, 13): 10, 11, 12 and "(other)". Row 5's bucket is out of range (other),
        // rows 6–8 have a bucket that is not an integer (rejected, not summed, not in other),
        // row 9 has a bad amount (rejected).
        let (_dir, d) = dataset(
            "id,bucket,amount\n1,10,5\n2,12,7\n3, 12 ,1\n4,11,2000\n5,13,4\n6,x,9\n7,1.5,9\n8,,9\n9,10,oops\n10,-1,3\n",
        );
        let domain = GroupDomain::range(10, 13).unwrap();
        let bounds = vec![("amount".to_owned(), 0, 1000)];
        let l = load_vector(&d, "bucket", &domain, &bounds, None, RowFilter::default()).unwrap();
        assert_eq!(l.counts.rows_read, 10);
        assert_eq!((l.rows_used, l.rows_rejected, l.rows_other), (6, 4, 2));
        assert_eq!(l.vector.groups(), 4);
        assert_eq!(l.vector.cells(), &[1, 5, 1, 1000, 2, 8, 2, 7]);
    }

    /// Per person: a person's rows in the group of its first row are summed, then clipped, and
    /// the person counted once; its rows elsewhere are left out. Per row, the same file counts
    /// every row and clips each value.
    #[test]
    fn per_person_clipping_sums_then_clips_and_counts_a_person_once() {
        let (_dir, d) = dataset(
            "customer,category,amount
             p1,a,600
p1,a,700
p1,b,50
p2,a,10
p2,a,20
p3,b,5000
,a,1
p4,zzz,3
p4,zzz,4
p5,b,9
p5,a,8
p5,b,1
",
        );
        let labels = GroupDomain::Labels(vec!["a".to_owned(), "b".to_owned()]);
        let bounds = vec![("amount".to_owned(), 0, 1000)];
        let per_row =
            load_vector(&d, "category", &labels, &bounds, None, RowFilter::default()).unwrap();
        // a: 600 + 700 + 10 + 20 + 1 + 8 (6 rows); b: 50 + 1000 (clipped) + 9 + 1; other: 3 + 4.
        assert_eq!(per_row.vector.cells(), &[6, 1339, 4, 1060, 2, 7]);
        assert_eq!(per_row.persons, None);
        let l = load_vector(
            &d,
            "category",
            &labels,
            &bounds,
            Some("customer"),
            RowFilter::default(),
        )
        .unwrap();
        // a: p1 (600 + 700 = 1300, clipped to 1000), p2 (30) and p5 (8: its rows are b, a, b,
        // and the job lists a first); b: p3 (5000 → 1000), p1's b row and p5's two left out;
        // other: p4 (7); the row without a person is rejected.
        assert_eq!(l.vector.cells(), &[3, 1038, 1, 1000, 1, 7]);
        assert_eq!((l.rows_used, l.rows_rejected, l.rows_other), (5, 1, 1));
        assert_eq!(
            l.persons,
            Some(crate::audit::PersonCounts {
                persons: 5,
                rows_outside_group: 3
            })
        );
        // A person column that is not in the file fails the job.
        let e = load_vector(
            &d,
            "category",
            &labels,
            &bounds,
            Some("nobody"),
            RowFilter::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("no column 'nobody'"), "{e}");
    }
}
