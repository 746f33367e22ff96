//! A local CSV table of a SQL view, read by the strict reader ([`CsvFiles`]) instead of
//! DataFusion's CSV reader.
//!
//! DataFusion's reader fails the whole read on a row with another field count than the header,
//! so one bad row would fail every job over the view. Here such a row is rejected, counted and
//! placed by its file and line, like a row of a local CSV dataset, and the view reads the rest.
//! The same rules apply as in the strict reader: a line break or a `"` in a field the view
//! reads rejects the row.
//!
//! Column types (integer, decimal number, true/false, `YYYY-MM-DD` date, text) are inferred from
//! the first [`INFER_ROWS`] well-formed rows, as DataFusion would, with one difference: a column with a value that starts with `0` followed by a digit,
//! or with `+`, stays text, so phone numbers and other identifiers keep their digits. A value
//! that does not read as its column's type in a later row rejects its row (DataFusion would fail
//! the read). Empty fields are nulls, as in DataFusion's reader.
//!
//! The rejections go to a [`TableRejections`] shared with the dataset pass, which counts them
//! once the view has been read: the view's output rows cannot carry them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Float64Builder, Int64Builder, RecordBatch,
    StringBuilder, new_null_array,
};
use datafusion::arrow::compute::kernels::cast_utils::Parser;
use datafusion::arrow::datatypes::Date32Type;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::{PartitionStream, StreamingTableExec};

use super::SourceError;
use super::csv::CsvFiles;
use crate::data::dataset::Rejection;
use crate::data::schema::Delimiter;

/// Well-formed rows read to infer the columns' types.
pub const INFER_ROWS: usize = 1000;

/// Rejected rows kept with their place (the rest are counted only).
const PLACED: usize = 10;

/// One rejected table row: the file, its line, the column (if one field is at fault), why.
#[derive(Debug, Clone)]
pub(crate) struct TableRejection {
    /// The CSV file.
    pub origin: String,
    /// Its line in the file.
    pub line: u64,
    /// The column at fault, if one is.
    pub column: Option<String>,
    /// Why.
    pub(crate) why: Rejection,
}

/// What the view's CSV tables rejected: the first rows with their place, the rest by reason.
#[derive(Debug, Default)]
pub struct Rejected {
    /// The first [`PLACED`] rejected rows.
    pub(crate) placed: Vec<TableRejection>,
    /// The others, by reason label.
    pub more: BTreeMap<String, u64>,
    /// Rows kept although a field the view does not read holds a line break.
    pub multi_line_rows: u64,
}

impl Rejected {
    fn record(&mut self, rejection: TableRejection) {
        if self.placed.len() < PLACED {
            self.placed.push(rejection);
        } else {
            *self.more.entry(rejection.why.label()).or_default() += 1;
        }
    }

    /// Rows rejected, all reasons.
    pub fn total(&self) -> u64 {
        self.placed.len() as u64 + self.more.values().sum::<u64>()
    }
}

/// Rejections shared between a view's CSV tables (written while the view runs) and the dataset
/// pass (which takes them at the end).
#[derive(Debug, Clone, Default)]
pub struct TableRejections(Arc<Mutex<Rejected>>);

impl TableRejections {
    /// Takes what was recorded so far.
    pub fn take(&self) -> Rejected {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Counts `n` rows rejected for `reason` (a [`Rejection::label`]), with no place.
    pub(super) fn add(&self, reason: &str, n: u64) {
        self.with(|r| *r.more.entry(reason.to_owned()).or_default() += n);
    }

    fn with<T>(&self, f: impl FnOnce(&mut Rejected) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The column types the table reads its fields as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Text,
    Int,
    Float,
    Bool,
    Date,
}

impl Kind {
    /// The kind's byte in a [`super::line_table`] spec.
    pub(super) fn code(self) -> u8 {
        match self {
            Kind::Text => 0,
            Kind::Int => 1,
            Kind::Float => 2,
            Kind::Bool => 3,
            Kind::Date => 4,
        }
    }

    pub(super) fn from_code(code: u8) -> Option<Kind> {
        Some(match code {
            0 => Kind::Text,
            1 => Kind::Int,
            2 => Kind::Float,
            3 => Kind::Bool,
            4 => Kind::Date,
            _ => return None,
        })
    }

    pub(super) fn data_type(self) -> DataType {
        match self {
            Kind::Text => DataType::Utf8,
            Kind::Int => DataType::Int64,
            Kind::Float => DataType::Float64,
            Kind::Bool => DataType::Boolean,
            Kind::Date => DataType::Date32,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Int => "integer",
            Kind::Float => "decimal number",
            Kind::Bool => "true/false",
            Kind::Date => "date",
        }
    }
}

/// A local CSV table (a file, a directory or a glob), read strictly.
#[derive(Debug)]
pub struct StrictCsvTable {
    location: PathBuf,
    delimiter: Delimiter,
    schema: SchemaRef,
    kinds: Arc<[Kind]>,
    rejected: TableRejections,
}

impl StrictCsvTable {
    /// Reads the header and infers the columns' types from the first rows.
    pub fn open(
        location: PathBuf,
        delimiter: Delimiter,
        rejected: TableRejections,
    ) -> Result<Self, SourceError> {
        let mut files = CsvFiles::open(&location, delimiter)?;
        let headers = files.headers().to_vec();
        let kinds = infer_kinds(&mut files)?;
        let fields: Vec<Field> = headers
            .iter()
            .zip(&kinds)
            .map(|(name, kind)| Field::new(name, kind.data_type(), true))
            .collect();
        Ok(StrictCsvTable {
            location,
            delimiter,
            schema: Arc::new(Schema::new(fields)),
            kinds: kinds.into(),
            rejected,
        })
    }
}

/// Each column's kind: the narrowest of integer, decimal number, true/false, date that every
/// non-empty value of the first [`INFER_ROWS`] well-formed rows reads as; text otherwise, and
/// text for a column with no value there.
fn infer_kinds(files: &mut CsvFiles) -> Result<Vec<Kind>, SourceError> {
    let width = files.headers().len();
    let all: Vec<usize> = (0..width).collect();
    let mut inference = KindInference::new(width);
    let mut multi_line = 0;
    while inference.wants_more() && files.advance()? {
        if files.malformed(&all, &mut multi_line).is_some() {
            continue;
        }
        inference.row(|i| files.field(i));
    }
    Ok(inference.kinds())
}

/// Infers the columns' kinds from well-formed rows, one at a time (see [`infer_kinds`]).
pub(super) struct KindInference {
    /// Per column: may it still be an integer, a number, a boolean, a date? A column with no
    /// value yet is none of them: it stays text.
    may: Vec<(bool, bool, bool, bool)>,
    seen: Vec<bool>,
    rows: usize,
}

impl KindInference {
    pub(super) fn new(width: usize) -> Self {
        KindInference {
            may: vec![(false, false, false, false); width],
            seen: vec![false; width],
            rows: 0,
        }
    }

    /// Whether fewer than [`INFER_ROWS`] rows have been seen.
    pub(super) fn wants_more(&self) -> bool {
        self.rows < INFER_ROWS
    }

    /// One well-formed row; `field(i)` is its `i`th field.
    pub(super) fn row<'a>(&mut self, field: impl Fn(usize) -> Option<&'a [u8]>) {
        self.rows += 1;
        for (i, may) in self.may.iter_mut().enumerate() {
            let Some(field) = field(i).filter(|f| !f.is_empty()) else {
                continue;
            };
            if !std::mem::replace(&mut self.seen[i], true) {
                *may = (true, true, true, true);
            }
            let text = std::str::from_utf8(field).unwrap_or("\u{0}");
            if keeps_digits(text) {
                *may = (false, false, false, false);
                continue;
            }
            may.0 &= text.parse::<i64>().is_ok();
            may.1 &= parse_number(text).is_some();
            may.2 &= parse_bool(text).is_some();
            may.3 &= parse_date(text).is_some();
        }
    }

    pub(super) fn kinds(self) -> Vec<Kind> {
        self.may
            .into_iter()
            .map(|m| match m {
                (true, ..) => Kind::Int,
                (_, true, ..) => Kind::Float,
                (_, _, true, _) => Kind::Bool,
                (.., true) => Kind::Date,
                _ => Kind::Text,
            })
            .collect()
    }
}

/// Whether a value's leading characters would be lost as a number (`0151…`, `+49…`).
fn keeps_digits(text: &str) -> bool {
    let b = text.as_bytes();
    b.first() == Some(&b'+') || (b.len() > 1 && b[0] == b'0' && b[1].is_ascii_digit())
}

/// A decimal number as written in a CSV file (digits, a point, an exponent; no `inf` or `NaN`).
fn parse_number(text: &str) -> Option<f64> {
    let plain = text
        .bytes()
        .all(|c| c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'e' | b'E'));
    if !plain || !text.bytes().any(|c| c.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// An ISO date, `YYYY-MM-DD` (days since 1970-01-01).
fn parse_date(text: &str) -> Option<i32> {
    let b = text.as_bytes();
    let shape = b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit());
    if !shape {
        return None;
    }
    Date32Type::parse(text)
}

fn parse_bool(text: &str) -> Option<bool> {
    if text.eq_ignore_ascii_case("true") {
        Some(true)
    } else if text.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

#[async_trait]
impl TableProvider for StrictCsvTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let read = projection
            .cloned()
            .unwrap_or_else(|| (0..self.kinds.len()).collect());
        let partition = Arc::new(StrictScan {
            location: self.location.clone(),
            delimiter: self.delimiter,
            schema: Arc::clone(&self.schema),
            kinds: Arc::clone(&self.kinds),
            read,
            rejected: self.rejected.clone(),
        });
        let exec = StreamingTableExec::try_new(
            Arc::clone(&self.schema),
            vec![partition],
            projection,
            Vec::new(),
            false,
            limit,
        )?;
        Ok(Arc::new(exec))
    }
}

/// One scan of the table: the columns at `read` are read; the others are nulls (the scan's
/// projection drops them).
#[derive(Debug)]
struct StrictScan {
    location: PathBuf,
    delimiter: Delimiter,
    schema: SchemaRef,
    kinds: Arc<[Kind]>,
    read: Vec<usize>,
    rejected: TableRejections,
}

impl PartitionStream for StrictScan {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let batch_rows = ctx.session_config().batch_size().max(1);
        let batches: Box<dyn Iterator<Item = Result<RecordBatch>> + Send> =
            match CsvFiles::open(&self.location, self.delimiter) {
                Ok(files) => Box::new(Batches {
                    files,
                    schema: Arc::clone(&self.schema),
                    kinds: Arc::clone(&self.kinds),
                    read: self.read.clone(),
                    rejected: self.rejected.clone(),
                    batch_rows,
                    done: false,
                }),
                Err(e) => Box::new(std::iter::once(Err(external(e)))),
            };
        Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            futures::stream::iter(batches),
        ))
    }
}

fn external(e: SourceError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// Reads the files a batch at a time. The reads block; the view runs on its own reader thread.
struct Batches {
    files: CsvFiles,
    schema: SchemaRef,
    kinds: Arc<[Kind]>,
    read: Vec<usize>,
    rejected: TableRejections,
    batch_rows: usize,
    done: bool,
}

/// A column being built.
enum Column {
    Text(StringBuilder),
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
    Date(Date32Builder),
}

/// A field read as its column's kind (`None`: null).
pub(super) enum Value<'a> {
    Text(Option<&'a str>),
    Int(Option<i64>),
    Float(Option<f64>),
    Bool(Option<bool>),
    Date(Option<i32>),
}

impl Column {
    fn new(kind: Kind, rows: usize) -> Column {
        match kind {
            Kind::Text => Column::Text(StringBuilder::with_capacity(rows, rows * 16)),
            Kind::Int => Column::Int(Int64Builder::with_capacity(rows)),
            Kind::Float => Column::Float(Float64Builder::with_capacity(rows)),
            Kind::Bool => Column::Bool(BooleanBuilder::with_capacity(rows)),
            Kind::Date => Column::Date(Date32Builder::with_capacity(rows)),
        }
    }

    fn push(&mut self, value: Value<'_>) {
        match (self, value) {
            (Column::Text(b), Value::Text(v)) => b.append_option(v),
            (Column::Int(b), Value::Int(v)) => b.append_option(v),
            (Column::Float(b), Value::Float(v)) => b.append_option(v),
            (Column::Bool(b), Value::Bool(v)) => b.append_option(v),
            (Column::Date(b), Value::Date(v)) => b.append_option(v),
            // `read_value` makes the value of the column's own kind.
            _ => {}
        }
    }

    fn finish(self) -> ArrayRef {
        match self {
            Column::Text(mut b) => Arc::new(b.finish()),
            Column::Int(mut b) => Arc::new(b.finish()),
            Column::Float(mut b) => Arc::new(b.finish()),
            Column::Bool(mut b) => Arc::new(b.finish()),
            Column::Date(mut b) => Arc::new(b.finish()),
        }
    }
}

/// A field as `kind`, or why it cannot be read as one.
pub(super) fn read_value(field: Option<&[u8]>, kind: Kind) -> Result<Value<'_>, Rejection> {
    let Some(field) = field.filter(|f| !f.is_empty()) else {
        return Ok(match kind {
            Kind::Text => Value::Text(None),
            Kind::Int => Value::Int(None),
            Kind::Float => Value::Float(None),
            Kind::Bool => Value::Bool(None),
            Kind::Date => Value::Date(None),
        });
    };
    let text = std::str::from_utf8(field).map_err(|_| Rejection::NotUtf8)?;
    let wrong = Rejection::ColumnType { kind: kind.name() };
    Ok(match kind {
        Kind::Text => Value::Text(Some(text)),
        Kind::Int if keeps_digits(text) => return Err(wrong),
        Kind::Int => Value::Int(Some(text.parse().map_err(|_| wrong)?)),
        Kind::Float => Value::Float(Some(parse_number(text).ok_or(wrong)?)),
        Kind::Bool => Value::Bool(Some(parse_bool(text).ok_or(wrong)?)),
        Kind::Date => Value::Date(Some(parse_date(text).ok_or(wrong)?)),
    })
}

impl Batches {
    /// Records the current row as rejected, at its file and line.
    fn reject(&self, column: Option<usize>, why: Rejection) {
        let rejection = TableRejection {
            origin: self.files.path().display().to_string(),
            line: self.files.line(),
            column: column.and_then(|i| self.files.headers().get(i).cloned()),
            why,
        };
        self.rejected.with(|r| r.record(rejection));
    }

    /// The next batch of well-formed rows, or `None` at the end.
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, SourceError> {
        let mut columns: Vec<Column> = self
            .read
            .iter()
            .map(|&i| Column::new(self.kinds[i], self.batch_rows))
            .collect();
        let mut rows = 0;
        let mut multi_line = 0;
        while rows < self.batch_rows && self.files.advance()? {
            if let Some((column, why)) = self.files.malformed(&self.read, &mut multi_line) {
                self.reject(column, why.into());
                continue;
            }
            let values: Result<Vec<Value<'_>>, (usize, Rejection)> = self
                .read
                .iter()
                .map(|&i| read_value(self.files.field(i), self.kinds[i]).map_err(|why| (i, why)))
                .collect();
            let values = match values {
                Ok(values) => values,
                Err((i, why)) => {
                    self.reject(Some(i), why);
                    continue;
                }
            };
            for (column, value) in columns.iter_mut().zip(values) {
                column.push(value);
            }
            rows += 1;
        }
        self.rejected.with(|r| r.multi_line_rows += multi_line);
        if rows == 0 {
            return Ok(None);
        }
        let mut arrays: Vec<ArrayRef> = self
            .kinds
            .iter()
            .map(|kind| new_null_array(&kind.data_type(), rows))
            .collect();
        for (&i, column) in self.read.iter().zip(columns) {
            arrays[i] = column.finish();
        }
        RecordBatch::try_new(Arc::clone(&self.schema), arrays)
            .map(Some)
            .map_err(|e| SourceError::Engine {
                dataset: String::new(),
                location: self.files.path().display().to_string(),
                message: e.to_string(),
            })
    }
}

impl Iterator for Batches {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_batch() {
            Ok(Some(batch)) => Some(Ok(batch)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(external(e)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each kind from the first rows, as the README lists them; a phone with a leading 0 or `+`
    /// stays text, and a column of empty fields is text.
    #[test]
    fn columns_are_typed_from_their_first_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        std::fs::write(
            &path,
            "n,x,flag,day,name,phone,intl,blank\n\
             1,1.5,true,2026-01-31,ann,0151234,+49151,\n\
             -2,3,FALSE,2026-02-01,bo,4915123,+1415,\n",
        )
        .unwrap();
        let table =
            StrictCsvTable::open(path, Delimiter::default(), TableRejections::default()).unwrap();
        let types: Vec<DataType> = table
            .schema()
            .fields()
            .iter()
            .map(|f| f.data_type().clone())
            .collect();
        assert_eq!(
            types,
            [
                DataType::Int64,
                DataType::Float64,
                DataType::Boolean,
                DataType::Date32,
                DataType::Utf8,
                DataType::Utf8,
                DataType::Utf8,
                DataType::Utf8,
            ]
        );
    }
}
