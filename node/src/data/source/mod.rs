//! Where a dataset's rows come from, read one record at a time as raw fields.
//!
//! Three readers, one interface ([`Source`]):
//! - [`csv::CsvFiles`]: local CSV (a file, a directory or a glob), read strictly: a row whose
//!   field count differs from the header's, or with a line break in a field the job reads, is
//!   reported as [`Malformed`] rather than read by position;
//! - [`json::JsonFiles`]: local JSON lines, read strictly, one line a record: a line that is
//!   not a JSON object is [`Malformed`], and any scalar reads as its text;
//! - [`frame::Frame`]: everything else, through Apache DataFusion: Parquet and JSON lines
//!   (`s3://`; local JSON on a cluster), remote CSV, and SQL views over such tables. Only the columns a job reads
//!   are selected, so the engine reads no other column (Parquet projection pushdown).
//!
//! A field is raw bytes: `None` for a null (or a missing field), text otherwise. DataFusion
//! columns are cast to text, so an integer value column reads as its decimal digits, and a
//! boolean consent column as `true`/`false`.

pub mod csv;
pub mod csv_line;
pub mod frame;
pub mod json;
pub mod json_line;
mod json_record;
pub mod line_table;
mod nested;
mod parquet_schema;
pub mod part_order;
pub mod strict_table;

use std::path::PathBuf;

use super::schema::{DataFormat, DatasetConfig};

/// Why a dataset could not be opened or read. Messages name files, rows and columns, never a
/// field's value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// A file could not be opened.
    #[error("cannot open dataset file {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A local directory or glob named no file.
    #[error("{location}: no {format} file found")]
    NoFiles {
        /// The directory or glob.
        location: String,
        /// The format looked for.
        format: DataFormat,
    },
    /// The glob could not be read.
    #[error("{location}: {problem}")]
    Glob {
        /// The glob.
        location: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A CSV header row is not UTF-8: the file is in another encoding.
    #[error(
        "dataset file {}: the header row is not UTF-8 ({})",
        path.display(),
        if *utf16 {
            "the file starts with a UTF-16 byte-order mark, as spreadsheet programs write \
             \"Unicode text\": save it as CSV in UTF-8"
        } else {
            "save the file in UTF-8"
        }
    )]
    HeaderNotUtf8 {
        /// The CSV file.
        path: PathBuf,
        /// Whether the file starts with a UTF-16 byte-order mark.
        utf16: bool,
    },
    /// A CSV header row could not be read.
    #[error("dataset file {}: cannot read the header row: {source}", path.display())]
    Header {
        /// The CSV file.
        path: PathBuf,
        /// The CSV error.
        source: ::csv::Error,
    },
    /// The files of one CSV dataset do not share a header.
    #[error("dataset file {} has a different header from {}", path.display(), first.display())]
    HeaderMismatch {
        /// The file that differs.
        path: PathBuf,
        /// The first file.
        first: PathBuf,
    },
    /// A CSV row could not be read (I/O error or malformed CSV).
    #[error("dataset file {}: row {row}: {source}", path.display())]
    Row {
        /// The CSV file.
        path: PathBuf,
        /// 1-based data row (header excluded) that failed.
        row: u64,
        /// The CSV error (it carries positions, not field values).
        source: ::csv::Error,
    },
    /// A column a job reads holds lists or objects, not one value a row.
    #[error(
        "{location}: column '{column}' holds a {kind}, not one value per row: make the dataset \
         a sql view that takes one element (`{column}[1] AS {column}`) or one row per element \
         (`unnest({column}) AS {column}`)"
    )]
    ManyValues {
        /// The file.
        location: String,
        /// The column.
        column: String,
        /// "list" or "object".
        kind: &'static str,
    },
    /// DataFusion could not plan or read the dataset.
    #[error("dataset '{dataset}' ({location}): {message}")]
    Engine {
        /// The dataset.
        dataset: String,
        /// Its path, URL or view.
        location: String,
        /// The engine's message (quoted text removed when it came from reading rows).
        message: String,
    },
}

/// Why a record is not read at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// The record has another number of fields than the header.
    FieldCount {
        /// The header's.
        expected: usize,
        /// The record's.
        found: usize,
    },
    /// A field the job reads holds a line break (what an unterminated quote leaves).
    LineBreak,
    /// A field the job reads holds a `"` (local CSV): no identifier or amount has one, and a
    /// quote left open on an earlier line leaves one where it closes.
    StrayQuote,
    /// A quote still open at the end of a line that is read on its own ([`csv_line`]).
    OpenQuote,
    /// A JSON line that is not a JSON object ([`json`]).
    NotJsonObject,
    /// A field the job reads holds a list or an object, not one value ([`json`]).
    NotOneValue,
    /// A line longer than [`json_line::MAX_LINE_BYTES`], not held ([`json`]).
    LineTooLong,
}

/// A dataset's rows, one record at a time.
#[derive(Debug)]
pub enum Source {
    /// Local CSV, read strictly.
    Csv(csv::CsvFiles),
    /// Local JSON lines, read strictly.
    Json(json::JsonFiles),
    /// DataFusion: Parquet, JSON lines, remote CSV, SQL views.
    Frame(frame::Frame),
}

impl Source {
    /// Opens the dataset and reads its column names (nothing else yet).
    pub fn open(dataset: &DatasetConfig) -> Result<Source, SourceError> {
        // On a Ballista cluster every read runs on the executors, CSV too: read line by line
        // and split strictly ([`csv_line`]), as CSV from object storage is.
        if dataset.is_local_csv()
            && let Some(local) = local_path(&dataset.path)
        {
            return Ok(Source::Csv(csv::CsvFiles::open(&local, dataset.delimiter)?));
        }
        if dataset.is_local_jsonl()
            && let Some(local) = local_path(&dataset.path)
        {
            return Ok(Source::Json(json::JsonFiles::open(&local)?));
        }
        Ok(Source::Frame(frame::Frame::open(dataset)?))
    }

    /// The dataset's column names, in order.
    pub fn headers(&self) -> &[String] {
        match self {
            Source::Csv(s) => s.headers(),
            Source::Json(s) => s.headers(),
            Source::Frame(s) => s.headers(),
        }
    }

    /// For a SQL view, the columns of its tables its select lists read (see
    /// [`frame::Frame::view_reads`]); empty otherwise.
    pub fn view_reads(&self) -> &[String] {
        match self {
            Source::Csv(_) | Source::Json(_) => &[],
            Source::Frame(s) => s.view_reads(),
        }
    }

    /// Starts reading rows; only the columns at `read` (indices into [`Source::headers`]) will
    /// be asked for.
    pub fn start(&mut self, read: &[usize]) -> Result<(), SourceError> {
        match self {
            Source::Csv(_) => Ok(()),
            Source::Json(s) => s.start(read),
            Source::Frame(s) => s.start(read),
        }
    }

    /// Moves to the next record; `false` at the end.
    pub fn advance(&mut self) -> Result<bool, SourceError> {
        match self {
            Source::Csv(s) => s.advance(),
            Source::Json(s) => s.advance(),
            Source::Frame(s) => s.advance(),
        }
    }

    /// The current record's field `i` (an index into [`Source::headers`]); `None` if null.
    pub fn field(&self, i: usize) -> Option<&[u8]> {
        match self {
            Source::Csv(s) => s.field(i),
            Source::Json(s) => s.field(i),
            Source::Frame(s) => s.field(i),
        }
    }

    /// Whether the current record must not be read, and which column says so. `read`: the
    /// columns the pass reads. `multi_line` is counted when a column the pass does not read
    /// holds a line break (legal CSV, but also what a quote left open looks like).
    pub fn malformed(
        &self,
        read: &[usize],
        multi_line: &mut u64,
    ) -> Option<(Option<usize>, Malformed)> {
        match self {
            Source::Csv(s) => s.malformed(read, multi_line),
            Source::Json(s) => s.malformed(read),
            Source::Frame(s) => s.malformed(read),
        }
    }

    /// The rows a view's local CSV tables rejected before the view saw them (taken; empty for
    /// anything but a view). Complete once [`Source::advance`] has returned `false`.
    pub fn take_table_rejections(&self) -> strict_table::Rejected {
        match self {
            Source::Csv(_) | Source::Json(_) => strict_table::Rejected::default(),
            Source::Frame(s) => s.take_table_rejections(),
        }
    }

    /// Where the current record is: its line in a CSV or JSON lines file, its 1-based row
    /// otherwise; 0 when the rows do not come in file order
    /// ([`DatasetConfig::reads_in_file_order`]).
    pub fn location(&self) -> u64 {
        match self {
            Source::Csv(s) => s.line(),
            Source::Json(s) => s.line(),
            Source::Frame(s) if s.in_file_order() => s.row(),
            Source::Frame(_) => 0,
        }
    }

    /// The file the current record is in, or the dataset's location (for logs and errors).
    pub fn origin(&self) -> String {
        match self {
            Source::Csv(s) => s.path().display().to_string(),
            Source::Json(s) => s.path().display().to_string(),
            Source::Frame(s) => s.location().to_owned(),
        }
    }
}

/// Whether a field holds a line break: a value no identifier or amount has, and what an
/// unterminated quote leaves in the field it opened.
pub(crate) fn has_line_break(field: &[u8]) -> bool {
    field.contains(&b'\n') || field.contains(&b'\r')
}

/// The local path a dataset location names: a plain path, or a `file://` URL (read by the strict
/// CSV reader like a plain path); `None` for a remote URL. The node's config resolves dataset
/// paths with it too.
pub fn local_path(location: &std::path::Path) -> Option<PathBuf> {
    let text = location.to_string_lossy();
    if !text.contains("://") {
        return Some(location.to_owned());
    }
    let url = url::Url::parse(&text).ok()?;
    if url.scheme() != "file" {
        return None;
    }
    // A `?` or `#` would have started a query or a fragment: such a URL goes to the engine.
    if url.query().is_some() || url.fragment().is_some() {
        return None;
    }
    url.to_file_path().ok()
}

#[cfg(test)]
mod frame_tests;
