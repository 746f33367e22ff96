//! The value holder's input to an `overlap-sum`: its distinct join keys and, per key, one row of
//! cells (in the [`SumShape`] of the job).
//!
//! An identifier may have several rows (several chargebacks on one account, and refunds as
//! negative rows). They are combined into one contribution: each column's values are **summed
//! first** over the identifier's rows, signed and exactly (in `i128`), and only the total is
//! clipped to the policy's bounds, so a refund offsets the charge it refunds and one identifier
//! adds at most the bound to a column — the sensitivity the noise is scaled to. The identifier
//! belongs to the first of the job's groups that its rows carry, in the order the job lists
//! them, "(other)" last (identifiers whose rows carry more than one label are counted in
//! `keys_with_several_groups`, a figure for this node's audit log only). The rule does not
//! depend on the order of the rows, so a file, a directory of parts and a cluster's parallel
//! read give the same. A row whose value field is missing or not an integer is skipped and
//! counted.

use std::collections::HashMap;

use cleanroom_circuits::ahe::SlotLayout;
use cleanroom_circuits::intersection_sum::{SpilledValues, value_record_len};
use cleanroom_circuits::spill::{BUCKETS, PointSet, PointStore, bucket_of};
use cleanroom_circuits::{EncodedPoint, ItemSet, JobKey, POINT_LEN, blind_items};

use cleanroom_proto::v1::OverlapSumSpec;

use super::DatasetConfig;
use super::cluster_pass::{SealingKey, ValuesSpec};
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
    /// `k·H(x)` for each distinct join key with its row of cells, in spill files, and the job
    /// key `k` ([`load_spilled`]); [`SumInput::values`] is empty.
    Spilled(JobKey, SpilledValues),
}

impl SumKeys {
    /// How many distinct keys.
    pub fn len(&self) -> usize {
        match self {
            SumKeys::Items(items) => items.len(),
            SumKeys::Blinded(_, points) => points.len(),
            // At most MAX_ROWS (< 2^32) rows were read.
            SumKeys::Spilled(_, own) => own.size() as usize,
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
    check_shape(shape, bounds)?;
    let parser = RowParser::new(group_by, shape, bounds);

    // Every accepted row, in file order: its key (in an arena), its group and its signed
    // values, unclipped (clipping applies to each identifier's total below).
    let mut all = ItemSet::new();
    let mut groups: Vec<u32> = Vec::new();
    let mut values: Vec<i64> = Vec::new();
    let location = dataset.location();
    let (counts, bad) = parser.for_each_row(
        (dataset, keys, filter, max_rows),
        |row, key, group, row_values| {
            all.push(key).map_err(|_| dataset::DatasetError::TooLarge {
                location: location.clone(),
                row,
            })?;
            groups.push(group);
            values.extend_from_slice(row_values);
            Ok(())
        },
    )?;

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

/// Reads one accepted row's values and group label for [`load`] and [`load_spilled`].
struct RowParser<'a> {
    group_by: Option<&'a str>,
    bounds: &'a [ColumnBound],
    /// Listed labels to their index; anything else goes to `other` ("(other)"), and an
    /// ungrouped job has one group.
    index: HashMap<&'a [u8], usize>,
    other: usize,
}

impl<'a> RowParser<'a> {
    fn new(group_by: Option<&'a str>, shape: &'a SumShape, bounds: &'a [ColumnBound]) -> Self {
        let other = shape.labels.len() - 1;
        let index = match group_by {
            Some(_) => shape.labels[..other]
                .iter()
                .enumerate()
                .map(|(i, l)| (l.as_bytes(), i))
                .collect(),
            None => HashMap::new(),
        };
        RowParser {
            group_by,
            bounds,
            index,
            other,
        }
    }

    /// The columns to read besides the keys: the summed ones, then the group's.
    fn columns(&self) -> Vec<&'a str> {
        let mut read: Vec<&str> = self.bounds.iter().map(|b| b.column.as_str()).collect();
        read.extend(self.group_by);
        read
    }

    /// Reads the dataset's accepted rows: each one's number, key, group and values go to `row`.
    /// Returns the row counts and how many rows were skipped for a value missing or not an
    /// integer.
    fn for_each_row(
        &self,
        (dataset, keys, filter, max_rows): (&DatasetConfig, &KeySpec, RowFilter<'_>, u64),
        mut row: impl FnMut(u64, &[u8], u32, &[i64]) -> Result<(), dataset::DatasetError>,
    ) -> Result<(KeyedRowCounts, u64), String> {
        let mut bad = 0u64;
        let mut values = vec![0i64; self.bounds.len()];
        let read = self.columns();
        let counts =
            dataset::for_each_keyed_row_for(dataset, keys, &read, filter, max_rows, |n, key, f| {
                match self.parse(f, &mut values) {
                    Some(group) => row(n, key, group, &values),
                    None => {
                        bad += 1;
                        Ok(())
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok((counts, bad))
    }

    /// The row's values into `values` and its group; `None` if a value is missing or not an
    /// integer.
    fn parse(&self, f: &[Option<&[u8]>], values: &mut [i64]) -> Option<u32> {
        for (i, slot) in values.iter_mut().enumerate() {
            *slot = f[i].and_then(super::value::parse_value)?;
        }
        let group = match self.group_by {
            Some(_) => {
                let label = f[self.bounds.len()]
                    .map(<[u8]>::trim_ascii)
                    .unwrap_or_default();
                self.index.get(label).copied().unwrap_or(self.other)
            }
            None => 0,
        };
        // At most MAX_CELLS groups.
        Some(group as u32)
    }
}

/// Rows blinded (or, from the executors, buffered) per chunk while a spilled input is read.
const SPILL_CHUNK: usize = 4096;

/// [`load`] under a `memory_limit`: each accepted row's key is blinded with `key` as it is read
/// (a chunk at a time) and the row goes to `store`'s buckets; then each bucket is combined as
/// [`load`] combines the whole set ([`RowSpill`]). Memory holds a chunk, then a bucket; no
/// identifier reaches the store. Every row is blinded, not every distinct key: equal keys in
/// one chunk are blinded once.
#[allow(clippy::too_many_arguments)]
pub fn load_spilled(
    dataset: &DatasetConfig,
    keys: &KeySpec,
    group_by: Option<&str>,
    shape: &SumShape,
    bounds: &[ColumnBound],
    filter: RowFilter<'_>,
    max_rows: u64,
    (key, store): (JobKey, Box<dyn PointStore>),
) -> Result<SumInput, String> {
    let sums = check_shape(shape, bounds)?;
    let parser = RowParser::new(group_by, shape, bounds);
    let key_name = dataset::key_name(keys);
    let mut rows = RowSpill::new(store, sums);
    let (counts, bad) = parser.for_each_row(
        (dataset, keys, filter, max_rows),
        |_, row_key, group, row_values| {
            rows.push_key(row_key, group, row_values, (&key, &key_name))
                .map_err(|e| spill_failed(&e))
        },
    )?;
    rows.flush_keys(&key, &key_name)
        .map_err(|e| spill_failed(&e).to_string())?;
    let spilled = rows.combine(shape, bounds)?;
    spilled_input(key, spilled, counts, bad, (shape, bounds))
}

/// The input over a spilled set's combined rows and its count of identifiers with several
/// group labels ([`RowSpill::combine`]).
fn spilled_input(
    key: JobKey,
    (own, several): (SpilledValues, u64),
    counts: KeyedRowCounts,
    rows_bad_value: u64,
    shape_bounds: (&SumShape, &[ColumnBound]),
) -> Result<SumInput, String> {
    let combined = Combined {
        firsts: Vec::new(),
        cells: Vec::new(),
        several,
    };
    let keys = SumKeys::Spilled(key, own);
    combined.into_input(keys, counts, rows_bad_value, shape_bounds)
}

fn spill_failed(e: &dyn std::fmt::Display) -> dataset::DatasetError {
    dataset::DatasetError::Spill(e.to_string())
}

/// A spilled input's rows on their way to its store: a chunk at a time to
/// [`PointSet::ValueRows`] (each row's point, group and values, by the point's bucket, in read
/// order), then combined one bucket at a time into [`PointSet::ValueCells`] (one record per
/// point). An identifier's rows share its point, so they share a bucket.
struct RowSpill {
    store: Box<dyn PointStore>,
    sums: usize,
    /// Rows read in process whose keys are still to blind, and their records' tails (group,
    /// values) in the same order.
    keys: ItemSet,
    tails: Vec<u8>,
    /// Whole records waiting for their bucket, and how many.
    parts: Vec<Vec<u8>>,
    pending: usize,
    /// Records pushed in all.
    pushed: u64,
}

impl RowSpill {
    fn new(store: Box<dyn PointStore>, sums: usize) -> RowSpill {
        RowSpill {
            store,
            sums,
            keys: ItemSet::new(),
            tails: Vec::new(),
            parts: vec![Vec::new(); BUCKETS],
            pending: 0,
            pushed: 0,
        }
    }

    /// Bytes of a [`PointSet::ValueRows`] record after its point: the group, the values.
    fn tail_len(&self) -> usize {
        4 + 8 * self.sums
    }

    /// A row read in process: its key is blinded with the chunk's.
    fn push_key(
        &mut self,
        row_key: &[u8],
        group: u32,
        values: &[i64],
        (key, key_name): (&JobKey, &str),
    ) -> std::io::Result<()> {
        self.keys.push(row_key).map_err(std::io::Error::other)?;
        push_tail(&mut self.tails, group, values);
        if self.keys.len() == SPILL_CHUNK {
            self.flush_keys(key, key_name)?;
        }
        Ok(())
    }

    /// Blinds the chunk's keys (equal ones once) and writes its rows, in read order.
    fn flush_keys(&mut self, key: &JobKey, key_name: &str) -> std::io::Result<()> {
        if self.keys.is_empty() {
            return Ok(());
        }
        let mut distinct = self.keys.clone();
        distinct.dedup();
        let points = blind_items(key, key_name, &distinct);
        let keys = std::mem::take(&mut self.keys);
        let tails = std::mem::take(&mut self.tails);
        for (row_key, tail) in keys.iter().zip(tails.chunks_exact(self.tail_len())) {
            let at = distinct
                .position_sorted(row_key)
                .ok_or_else(|| std::io::Error::other("a chunk's key went missing"))?;
            self.push_record(&points[at], tail);
        }
        self.write_parts()
    }

    /// A row blinded on the executors.
    fn push_point(
        &mut self,
        point: &EncodedPoint,
        group: u32,
        values: &[i64],
    ) -> std::io::Result<()> {
        let mut tail = Vec::with_capacity(self.tail_len());
        push_tail(&mut tail, group, values);
        self.push_record(point, &tail);
        if self.pending >= SPILL_CHUNK {
            self.write_parts()?;
        }
        Ok(())
    }

    fn push_record(&mut self, point: &EncodedPoint, tail: &[u8]) {
        let part = &mut self.parts[bucket_of(point)];
        part.extend_from_slice(point);
        part.extend_from_slice(tail);
        self.pending += 1;
        self.pushed += 1;
    }

    fn write_parts(&mut self) -> std::io::Result<()> {
        for (b, part) in self.parts.iter_mut().enumerate() {
            if !part.is_empty() {
                self.store.append(PointSet::ValueRows, b, part)?;
                part.clear();
            }
        }
        self.pending = 0;
        Ok(())
    }

    /// Writes what is pending, then combines each bucket's rows as [`load`] combines the whole
    /// set, one bucket in memory at a time; returns the rows and the number of identifiers
    /// whose rows carried more than one group label.
    fn combine(
        mut self,
        shape: &SumShape,
        bounds: &[ColumnBound],
    ) -> Result<(SpilledValues, u64), String> {
        let failed = |e: std::io::Error| spill_failed(&e).to_string();
        self.write_parts().map_err(failed)?;
        let (labels, cells, sums) = (shape.labels.len(), shape.cells(), self.sums);
        let width = POINT_LEN + self.tail_len();
        let (mut size, mut several) = (0u64, 0u64);
        for b in 0..BUCKETS {
            let bytes = self.store.read(PointSet::ValueRows, b).map_err(failed)?;
            if !bytes.len().is_multiple_of(width) {
                return Err(spill_failed(&"a row bucket holds a torn record").to_string());
            }
            let rows = bytes.len() / width;
            let mut points: Vec<&[u8]> = Vec::with_capacity(rows);
            let mut groups = Vec::with_capacity(rows);
            let mut values = Vec::with_capacity(rows * sums);
            for record in bytes.chunks_exact(width) {
                let (point, tail) = record.split_at(POINT_LEN);
                let (group, tail) = tail.split_at(4);
                let group = u32::from_le_bytes(group.try_into().map_err(|_| "a torn row")?);
                if group as usize >= labels {
                    return Err(format!("a spilled row names group {group} of {labels}"));
                }
                points.push(point);
                groups.push(group);
                values.extend(tail.chunks_exact(8).map(|v| {
                    let mut le = [0u8; 8];
                    le.copy_from_slice(v);
                    i64::from_le_bytes(le)
                }));
            }
            let combined = combine(
                rows,
                |i| points[i as usize],
                &groups,
                &values,
                shape,
                bounds,
            )?;
            let mut out = Vec::with_capacity(combined.firsts.len() * value_record_len(cells));
            for (first, row) in combined.firsts.iter().zip(combined.cells.chunks(cells)) {
                out.extend_from_slice(points[*first as usize]);
                for cell in row {
                    out.extend_from_slice(&cell.to_le_bytes());
                }
            }
            self.store
                .put(PointSet::ValueCells, b, &out)
                .map_err(failed)?;
            self.store
                .put(PointSet::ValueRows, b, &[])
                .map_err(failed)?;
            size += combined.firsts.len() as u64;
            several += combined.several;
        }
        Ok((SpilledValues::new(self.store, size, cells), several))
    }
}

/// A [`PointSet::ValueRows`] record's tail: the group, then the values (little-endian).
fn push_tail(out: &mut Vec<u8>, group: u32, values: &[i64]) {
    out.extend_from_slice(&group.to_le_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// [`load`] with the pass on the partner's Ballista executors ([`super::cluster_pass`]), grouped
/// there by point ([`super::cluster_outcome`]): they read, filter, normalise and blind each
/// row's key with `key`, parse its values and group, and combine each identifier's rows; one
/// row per distinct point comes back, with its rows' lowest and highest group and its values'
/// exact sums, which the node clips as [`load`] does. The result holds points
/// ([`SumKeys::Blinded`]), never identifiers. With `spill` (a `memory_limit`) the points go to
/// its buckets as they come ([`SumKeys::Spilled`]).
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
    spill: Option<Box<dyn PointStore>>,
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
    let (mut rows, mut several) = (0u64, 0u64);
    let labels = shape.labels.len() as i128;
    let mut spill = spill.map(|store| RowSpill::new(store, sums));
    let mut clipped = vec![0i64; sums];
    let engine = |message: String| dataset::engine_error(dataset, message);
    let (counts, bad) =
        dataset::grouped_points_on_cluster(dataset, keys, filter, max_rows, sealed, |p| {
            let (lowest, highest) = p.groups;
            if !(0 <= lowest && lowest <= highest && highest < labels) {
                return Err(engine(format!(
                    "an executor returned a group outside the job's {labels}"
                )));
            }
            // The first of the job's groups among the identifier's rows, as [`combine`] takes.
            let group = lowest as u32;
            several += u64::from(lowest != highest);
            rows = rows.saturating_add(p.rows);
            for ((c, total), b) in clipped.iter_mut().zip(&p.sums).zip(bounds) {
                // Within [min, max], which an i64 holds: the conversion cannot fail.
                let within = (*total).clamp(i128::from(b.min), i128::from(b.max));
                *c = i64::try_from(within).unwrap_or(i64::MAX);
            }
            match &mut spill {
                Some(spill) => spill
                    .push_point(&p.point, group, &clipped)
                    .map_err(|e| spill_failed(&e)),
                None => {
                    points.push(p.point);
                    groups.push(group);
                    values.extend_from_slice(&clipped);
                    Ok(())
                }
            }
        })
        .map_err(|e| e.to_string())?;
    tracing::info!(
        rows,
        points = spill.as_ref().map_or(points.len() as u64, |s| s.pushed),
        "the executors grouped the rows by point"
    );
    let counts = KeyedRowCounts::from(counts);
    if let Some(spill) = spill {
        let (spilled, combined_several) = spill.combine(shape, bounds)?;
        return spilled_input(
            key,
            (spilled, several + combined_several),
            counts,
            bad,
            (shape, bounds),
        );
    }
    let mut combined = combine(
        points.len(),
        |i| points.get(i as usize).map_or(&[][..], |p| p.as_slice()),
        &groups,
        &values,
        shape,
        bounds,
    )?;
    combined.several += several;
    let distinct: Vec<EncodedPoint> = combined
        .firsts
        .iter()
        .filter_map(|&first| points.get(first as usize).copied())
        .collect();
    drop(points);
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

/// Each identifier's rows combined: per distinct key, in key order, the index of one of its
/// rows, and its row of cells.
struct Combined {
    /// For each distinct key, one of its rows.
    firsts: Vec<u32>,
    /// `firsts.len() × cells` values, row-major.
    cells: Vec<u64>,
    /// Identifiers whose rows carried more than one group label.
    several: u64,
}

/// Combines the `rows` accepted rows (each with its key, its group in `groups` and its `sums`
/// values in `values`): sorts them by key, sums each identifier's values exactly, clips the
/// totals to `bounds`, and puts the identifier in the first of the job's groups among its rows'.
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
    // Any row of an identifier stands for its key.
    order.sort_unstable_by(|&a, &b| key(a).cmp(key(b)));
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
        // The first of the job's groups among the identifier's rows ("(other)" is last): an
        // order the analyst sets, not the file's, so every engine and every split of the data
        // gives the same.
        let run = &order[start..end];
        let group = run.iter().map(|&r| groups[r as usize]).min().unwrap_or(0) as usize;
        totals.iter_mut().for_each(|t| *t = 0);
        let mut mixed = false;
        for &r in run {
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
            SumKeys::Blinded(..) | SumKeys::Spilled(..) => {
                panic!("read in process: identifiers")
            }
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
    fn rows_of_one_identifier_are_summed_clipped_and_grouped_by_the_first_listed() {
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
        // a (fraud, 30+40=70: its rows are dispute then fraud, and the job lists fraud first),
        // b (fraud, 50+70 clipped to 100),
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
        assert_eq!(row("a@x.com"), [1, 70, 0, 0, 0, 0]);
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

    /// Under a `memory_limit` the rows are blinded as they are read and combined bucket by
    /// bucket: each identifier's row of cells is the one [`load`] gives it, over several chunks,
    /// with one identifier's rows in several chunks; no identifier reaches the store.
    #[test]
    fn a_spilled_load_combines_the_rows_as_load_does() {
        use cleanroom_circuits::spill::MemoryStore;
        let dir = tempfile::tempdir().unwrap();
        let mut csv = String::from("email,amount,reason\n");
        // Each identifier has 4 or 5 rows, 3000 apart: some in one chunk, some in others.
        for r in 0..3 * SPILL_CHUNK as u32 {
            let id = (r * 7919) % 3000;
            let value = match r {
                r if r % 13 == 0 => "x".to_owned(),
                r if r % 11 == 0 => format!("-{}", r % 50),
                r => (r % 97).to_string(),
            };
            let reason = ["fraud", "dispute", "weird"][(r % 7 % 3) as usize];
            csv.push_str(&format!("User{id}@x.com,{value},{reason}\n"));
        }
        let d = dataset(dir.path(), &csv);
        let spec = OverlapSumSpec {
            sums: vec!["amount".into()],
            group_by: "reason".into(),
            groups: vec!["fraud".into(), "dispute".into()],
            count: true,
        };
        let bounds = [bound("amount", 0, 150)];
        let (keys, shape) = (KeySpec::new(["email"]), SumShape::of(&spec));
        let read = |spill: Option<(JobKey, Box<dyn PointStore>)>| {
            let (d, keys, shape, f) = (&d, &keys, &shape, RowFilter::default());
            let g = Some("reason");
            match spill {
                None => load(d, keys, g, shape, &bounds, f, 1 << 20),
                Some(spill) => load_spilled(d, keys, g, shape, &bounds, f, 1 << 20, spill),
            }
            .unwrap()
        };
        let in_memory = read(None);
        let key = JobKey::generate();
        let copy = JobKey::from_secret_bytes(&key.to_secret_bytes()).unwrap();
        let spilled = read(Some((key, Box::new(MemoryStore::default()))));

        assert_eq!(spilled.keys.len(), in_memory.keys.len());
        assert_eq!(spilled.rows_bad_value, in_memory.rows_bad_value);
        assert_eq!(spilled.counts.rows_read, in_memory.counts.rows_read);
        assert!(in_memory.keys_with_several_groups > 0);
        assert_eq!(
            spilled.keys_with_several_groups,
            in_memory.keys_with_several_groups
        );
        assert_eq!(spilled.layout, in_memory.layout);
        assert_eq!(spilled.sensitivities, in_memory.sensitivities);
        assert!(spilled.values.is_empty());

        // Each identifier's row, by its point.
        let cells = shape.cells();
        let points = blind_items(&copy, &dataset::key_name(&keys), items(&in_memory));
        let want: std::collections::BTreeMap<Vec<u8>, Vec<u64>> = points
            .iter()
            .zip(in_memory.values.chunks(cells))
            .map(|(p, row)| (p.to_vec(), row.to_vec()))
            .collect();
        let SumKeys::Spilled(_, own) = spilled.keys else {
            panic!("a spilled input");
        };
        let mut store = own.into_store();
        let mut got = std::collections::BTreeMap::new();
        for b in 0..BUCKETS {
            assert!(store.read(PointSet::ValueRows, b).unwrap().is_empty());
            let bytes = store.read(PointSet::ValueCells, b).unwrap();
            assert!(!bytes.windows(6).any(|w| w == b"@x.com"), "an identifier");
            for record in bytes.chunks_exact(value_record_len(cells)) {
                let row = record[POINT_LEN..]
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                    .collect::<Vec<_>>();
                got.insert(record[..POINT_LEN].to_vec(), row);
            }
        }
        assert_eq!(got, want);
    }

    #[test]
    fn a_missing_column_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(dir.path(), "email,amount\na@x.com,1\n");
        let e = load_by_email(&d, &ungrouped("fee"), &[bound("fee", 0, 10)]).unwrap_err();
        assert!(e.contains("fee"), "{e}");
    }
}
