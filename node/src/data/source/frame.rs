//! Datasets read through Apache DataFusion: Parquet (a file, a directory or a glob; local or
//! `s3://`), CSV and JSON lines on a cluster or in `s3://` (handed over line by line and read
//! strictly: [`super::csv_line`], [`super::json_line`]), and SQL views over such tables.
//!
//! DataFusion is async and the node's dataset passes are not, so each open dataset gets a
//! reader thread with its own single-threaded Tokio runtime. The thread plans the table (or the
//! view), reports its column names, waits for the columns the pass reads, then streams record
//! batches of just those columns, cast to text, through a channel of two batches: memory stays
//! at a few batches whatever the dataset's size. In process the plan has one partition, so rows
//! arrive in the same order on every pass (files in path order), which `match` relies on to map
//! its second pass back to row numbers. On a cluster a pass that numbers rows takes the parts in
//! part order ([`super::part_order`]).
//!
//! Engine messages from reading rows can quote data (a value that failed to parse), so they are
//! passed through [`redact`] before they reach an error, a log or the audit log. Registering a
//! table reads rows too (to infer a JSON schema), so its messages are redacted as well; only
//! errors of planning the view's SQL, which has read no row, are kept whole.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use datafusion::arrow::array::{Array, BinaryArray, RecordBatch, StringArray};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{Column, ScalarValue, TableReference};
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::options::{CsvReadOptions, JsonReadOptions, ParquetReadOptions};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::{LogicalPlan, ScalarUDF};
use datafusion::prelude::{
    DataFrame, Expr, SQLOptions, SessionConfig, SessionContext, cast, lit, try_cast,
};
use futures::StreamExt;

use super::csv_line::{LINE_DELIMITER, LINE_QUOTE, LineRecord, header_names};
use super::json_line::{ColumnFinder, JsonColumns, JsonLine};
use super::line_table;
use super::strict_table::{Rejected, StrictCsvTable, TableRejections};
use super::{Malformed, SourceError};
use crate::data::cluster_lines::{CsvLayout, JsonLayout, LineLayout};
use crate::data::cluster_pass::PassUdf;
use crate::data::schema::{Cluster, DataFormat, DatasetConfig, Delimiter, EngineLimits};
use ballista::prelude::SessionContextExt;
use datafusion::execution::session_state::SessionStateBuilder;

/// Record batches the reader thread may have ready ahead of the pass.
const BATCHES_AHEAD: usize = 2;

/// Rows per batch.
const BATCH_ROWS: usize = 8192;

/// On a Ballista cluster, files from this size up are split between tasks.
const CLUSTER_SPLIT_BYTES: usize = 64 * 1024;

/// JSON lines read to infer a table's columns (a column first seen later is not read).
const JSON_INFER_ROWS: usize = 100_000;

/// Longest engine message kept (after [`redact`]).
const MAX_MESSAGE: usize = 400;

/// What the reader thread reports once planned.
struct Schema {
    /// The column names.
    names: Vec<String>,
    /// A view's select reads ([`select_reads`]).
    reads: Vec<String>,
    /// A JSON lines dataset read line by line: its columns, found from its first records.
    json: Option<JsonColumns>,
}

/// The one column of a JSON lines table read line by line.
const LINE_COLUMN: &str = "line";

/// What the pass asks the reader thread for: columns, or an executor pass over them.
struct Request {
    read: Vec<usize>,
    /// The pass's sealed spec; `None` for columns as text.
    sealed: Option<Vec<u8>>,
    /// A pass grouped on the executors ([`Frame::grouped`]); `None` for one outcome a row.
    grouped: Option<Grouping>,
}

/// How a pass is grouped on the executors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grouping {
    /// An aggregate's, by cell, with this many summed columns
    /// ([`crate::data::cluster_aggregate`]).
    Cells(usize),
    /// An aggregate's with per-person clipping, by cell, each person's sums in its first group
    /// clipped to these bounds: each row's figures are its rows, the rows its persons left out,
    /// then the clipped sums; its count is its persons.
    Persons(Vec<(i64, i64)>),
    /// An overlap-sum value holder's, by point, with this many summed columns
    /// ([`crate::data::cluster_outcome`]): each row's sums are its group's lowest and highest,
    /// then the values'.
    Points(usize),
}

/// One row of a grouped pass ([`Grouping`]): a cell or a point's key, how many rows fell in
/// it, and its figures (the sums of an aggregate's clipped values; a point's lowest and
/// highest group, then its values' sums).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupedRow {
    /// The cell, encoded.
    pub cell: Vec<u8>,
    /// Rows in it.
    pub rows: u64,
    /// The figures, exact.
    pub sums: Vec<i128>,
}

/// What the reader thread sends.
enum Message {
    Batch(Vec<StringArray>),
    /// The outcomes of an executor pass ([`Frame::start_pass`]).
    Outcomes(BinaryArray),
    /// The rows of a grouped pass ([`Frame::grouped`]).
    Grouped(Vec<GroupedRow>),
    Done,
    Failed(SourceError),
}

/// A dataset being read through DataFusion.
pub struct Frame {
    dataset: String,
    location: String,
    headers: Vec<String>,
    /// A view's base-table columns that its select lists read ([`select_reads`]).
    reads: Vec<String>,
    /// Sends the columns to read; taken by [`Frame::start`].
    projection: Option<tokio::sync::oneshot::Sender<Request>>,
    /// What a view's local CSV tables rejected ([`StrictCsvTable`]).
    rejected: TableRejections,
    batches: Receiver<Message>,
    /// For each column of [`Frame::headers`], its place in the current batch (read ones only).
    slot: Vec<Option<usize>>,
    columns: Vec<StringArray>,
    /// The current batch of an executor pass.
    outcomes: Option<BinaryArray>,
    /// The next row of the current batch.
    next: usize,
    /// Rows handed out so far (the current one is `rows`).
    rows: u64,
    done: bool,
    /// CSV or JSON lines read line by line: the current line, read.
    lines: Option<Lines>,
    /// Whether rows come in file order ([`DatasetConfig::reads_in_file_order`]).
    in_file_order: bool,
}

/// A dataset read line by line: the one column is the line, read here (or, in an executor
/// pass, on the executors).
enum Lines {
    /// CSV ([`super::csv_line`]), split by its delimiter.
    Csv { delimiter: u8, record: LineRecord },
    /// JSON lines ([`super::json_line`]), one record a line.
    Json {
        columns: JsonColumns,
        record: JsonLine,
    },
}

impl Lines {
    /// Reads the next line.
    fn load(&mut self, line: &[u8]) {
        match self {
            Lines::Csv { delimiter, record } => record.split(line, *delimiter),
            Lines::Json { record, .. } => record.load(line),
        }
    }

    /// The current line's field `i`.
    fn get(&self, i: usize) -> Option<&[u8]> {
        match self {
            Lines::Csv { record, .. } => record.get(i),
            Lines::Json { record, .. } => record.get(i),
        }
    }

    /// Why the current line must not be read, if it must not (`width`: the header's).
    fn malformed(&self, width: usize, read: &[usize]) -> Option<(Option<usize>, Malformed)> {
        match self {
            Lines::Csv { record, .. } => record.malformed(width, read),
            Lines::Json { record, .. } => record.malformed(read),
        }
    }
}

/// How a dataset's lines are read, when it is read line by line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineFormat {
    Csv(u8),
    Json,
}

impl std::fmt::Debug for Frame {
    // Not derived: the current batch holds raw identifiers.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("dataset", &self.dataset)
            .field("location", &self.location)
            .field("headers", &self.headers)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

/// One table of a plan: its name, path or URL, format, and (CSV) delimiter.
struct Table {
    name: String,
    location: String,
    format: DataFormat,
    delimiter: Delimiter,
    /// CSV or JSON lines that DataFusion reads as one text column per line, read by
    /// [`super::csv_line`] or [`super::json_line`].
    lines: bool,
}

/// What the reader thread needs to plan the dataset (owned: it outlives the caller's borrow).
struct Plan {
    dataset: String,
    location: String,
    /// The tables to register; the dataset itself is the table `dataset`.
    tables: Vec<Table>,
    sql: Option<String>,
    engine: EngineLimits,
    /// Shared with the view's local CSV tables, which record their rejected rows in it.
    rejected: TableRejections,
}

impl Frame {
    /// Starts the reader thread, which plans the dataset and reports its columns.
    pub fn open(dataset: &DatasetConfig) -> Result<Frame, SourceError> {
        Frame::open_plan(dataset, Plan::of(dataset))
    }

    /// A CSV or JSON lines dataset read line by line in process, as it is on a cluster (for
    /// tests: in process, a local file is read by the strict readers).
    #[cfg(test)]
    pub(crate) fn open_lines(dataset: &DatasetConfig) -> Result<Frame, SourceError> {
        let mut plan = Plan::of(dataset);
        for table in &mut plan.tables {
            table.lines = true;
        }
        Frame::open_plan(dataset, plan)
    }

    fn open_plan(dataset: &DatasetConfig, plan: Plan) -> Result<Frame, SourceError> {
        let rejected = plan.rejected.clone();
        let format = plan.line_format();
        let engine = |message: String| SourceError::Engine {
            dataset: dataset.name.clone(),
            location: dataset.location(),
            message,
        };
        let (ready_tx, ready_rx) = sync_channel(1);
        let (projection_tx, projection_rx) = tokio::sync::oneshot::channel();
        let (batch_tx, batch_rx) = sync_channel(BATCHES_AHEAD);
        std::thread::Builder::new()
            .name("dataset-reader".into())
            .spawn(move || serve(plan, ready_tx, projection_rx, batch_tx))
            .map_err(|e| engine(format!("cannot start the reader thread: {e}")))?;
        let Schema {
            names: headers,
            reads,
            json,
        } = ready_rx
            .recv()
            .map_err(|_| engine("the reader thread stopped before reading the schema".into()))??;
        let lines = match (format, json) {
            (Some(LineFormat::Csv(delimiter)), _) => Some(Lines::Csv {
                delimiter,
                record: LineRecord::default(),
            }),
            (Some(LineFormat::Json), Some(columns)) => {
                let all: Vec<usize> = (0..headers.len()).collect();
                Some(Lines::Json {
                    record: JsonLine::new(columns.paths(&all)),
                    columns,
                })
            }
            (Some(LineFormat::Json), None) => {
                return Err(engine("the reader thread found no JSON columns".into()));
            }
            (None, _) => None,
        };
        Ok(Frame {
            dataset: dataset.name.clone(),
            location: dataset.location(),
            slot: vec![None; headers.len()],
            headers,
            reads,
            projection: Some(projection_tx),
            rejected,
            batches: batch_rx,
            columns: Vec::new(),
            outcomes: None,
            next: 0,
            rows: 0,
            done: false,
            lines,
            in_file_order: dataset.reads_in_file_order(),
        })
    }

    /// The dataset's column names, in order.
    pub fn headers(&self) -> &[String] {
        &self.headers
    }

    /// The rows a view's local CSV tables rejected so far (taken: a second call starts at zero).
    pub fn take_table_rejections(&self) -> Rejected {
        self.rejected.take()
    }

    /// For a SQL view: the columns of its tables that its select lists (subqueries included)
    /// read, or the paths of the struct fields they take (`contact.email`), sorted; empty for
    /// files. Conditions (`WHERE`, `JOIN … ON`, `HAVING`) may read
    /// other columns: they decide which rows, not what a row says.
    pub fn view_reads(&self) -> &[String] {
        &self.reads
    }

    /// Where the rows are (for messages).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// How an executor pass takes the columns at `read` (of [`Frame::headers`]) out of a
    /// line, for a dataset read line by line (CSV or JSON lines on a cluster); `None` otherwise.
    pub fn line_layout(&self, read: &[usize]) -> Option<LineLayout> {
        Some(match self.lines.as_ref()? {
            Lines::Csv { delimiter, .. } => LineLayout::Csv(CsvLayout {
                delimiter: *delimiter,
                width: self.headers.len(),
                columns: read.to_vec(),
            }),
            Lines::Json { columns, .. } => LineLayout::Json(JsonLayout {
                paths: columns.paths(read),
            }),
        })
    }

    /// Asks the reader thread for the columns at `read`, and nothing else.
    pub fn start(&mut self, read: &[usize]) -> Result<(), SourceError> {
        if self.lines.is_some() {
            // The line is the one column; fields are read from it.
            let line = self.function_columns(read)?;
            if let Some(Lines::Json { record, .. }) = &mut self.lines {
                record.want(read);
            }
            return self.request(Request {
                read: line,
                sealed: None,
                grouped: None,
            });
        }
        let mut wanted: Vec<usize> = read.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        for (place, &i) in wanted.iter().enumerate() {
            if let Some(slot) = self.slot.get_mut(i) {
                *slot = Some(place);
            }
        }
        self.request(Request {
            read: wanted,
            sealed: None,
            grouped: None,
        })
    }

    /// Asks for an executor pass instead of columns ([`crate::data::cluster_pass`]): each row
    /// becomes one outcome ([`Frame::outcome`]) of the pass function over the columns at `read`
    /// (in that order, repeats kept), its spec `sealed`. Only a dataset on a cluster can. A CSV
    /// dataset read line by line passes its line, and the spec says which fields to take.
    pub fn start_pass(&mut self, read: &[usize], sealed: Vec<u8>) -> Result<(), SourceError> {
        self.request(Request {
            read: self.function_columns(read)?,
            sealed: Some(sealed),
            grouped: None,
        })
    }

    /// The columns an executor function takes for the columns at `read`: those, or the line
    /// of a dataset read line by line (the function's spec says which fields to take). A JSON
    /// column that held only lists or objects in the first records is refused, saying what to
    /// do, as the local reader refuses it.
    fn function_columns(&self, read: &[usize]) -> Result<Vec<usize>, SourceError> {
        match &self.lines {
            Some(Lines::Json { columns, .. }) => match columns.many_values(read) {
                Some((i, kind)) => Err(SourceError::ManyValues {
                    location: self.location.clone(),
                    column: self.headers[i].clone(),
                    kind,
                }),
                None => Ok(vec![0]),
            },
            Some(Lines::Csv { .. }) => Ok(vec![0]),
            None => Ok(read.to_vec()),
        }
    }

    /// A pass on the cluster's executors, grouped there as `grouping` says: the functions
    /// over the columns at `read` (a dataset read line by line passes its line), their spec
    /// `sealed`. Hands each batch of the grouped result to `each`, as it comes.
    pub fn grouped<E: From<SourceError>>(
        &mut self,
        read: &[usize],
        sealed: Vec<u8>,
        grouping: Grouping,
        mut each: impl FnMut(Vec<GroupedRow>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.request(Request {
            read: self.function_columns(read)?,
            sealed: Some(sealed),
            grouped: Some(grouping),
        })?;
        loop {
            match self.batches.recv() {
                Ok(Message::Grouped(more)) => each(more)?,
                Ok(Message::Done) => return Ok(()),
                Ok(Message::Failed(e)) => return Err(e.into()),
                Ok(Message::Batch(_) | Message::Outcomes(_)) => {
                    return Err(self
                        .failure("the reader sent rows to a grouped pass")
                        .into());
                }
                Err(_) => return Err(self.failure("the reader thread stopped mid-way").into()),
            }
        }
    }

    fn request(&mut self, request: Request) -> Result<(), SourceError> {
        let sent = self
            .projection
            .take()
            .map(|tx| tx.send(request).is_ok())
            .unwrap_or(false);
        if !sent {
            return Err(self.failure("the reader thread is not waiting for columns"));
        }
        Ok(())
    }

    /// Moves to the next row, fetching the next batch when this one is used up.
    pub fn advance(&mut self) -> Result<bool, SourceError> {
        while self.next >= self.batch_rows() {
            if self.done {
                return Ok(false);
            }
            match self.batches.recv() {
                Ok(Message::Batch(columns)) => {
                    self.columns = columns;
                    self.next = 0;
                }
                Ok(Message::Outcomes(outcomes)) => {
                    self.outcomes = Some(outcomes);
                    self.next = 0;
                }
                Ok(Message::Done) => {
                    self.done = true;
                    self.columns.clear();
                    self.outcomes = None;
                }
                Ok(Message::Grouped(_)) => {
                    return Err(self.failure("the reader sent groups to a row pass"));
                }
                Ok(Message::Failed(e)) => return Err(e),
                // A reader that stops without saying `Done` must not pass for the end of the
                // data: the counts would be short.
                Err(_) => return Err(self.failure("the reader thread stopped mid-way")),
            }
        }
        self.next += 1;
        self.rows += 1;
        if let Some(lines) = &mut self.lines
            && self.outcomes.is_none()
        {
            let line = self
                .columns
                .first()
                .filter(|c| !c.is_null(self.next - 1))
                .map_or(&b""[..], |c| c.value(self.next - 1).as_bytes());
            if super::csv_line::spans_lines(line) {
                return Err(SourceError::Engine {
                    dataset: self.dataset.clone(),
                    location: self.location.clone(),
                    message: format!("row {}: {}", self.rows, super::csv_line::SPANNED_LINES),
                });
            }
            lines.load(line);
        }
        Ok(true)
    }

    /// Rows in the current batch.
    fn batch_rows(&self) -> usize {
        match &self.outcomes {
            Some(outcomes) => outcomes.len(),
            None => self.columns.first().map_or(0, Array::len),
        }
    }

    /// The current row's outcome in an executor pass ([`Frame::start_pass`]).
    pub fn outcome(&self) -> Option<&[u8]> {
        let outcomes = self.outcomes.as_ref()?;
        let row = self.next.checked_sub(1)?;
        (row < outcomes.len() && !outcomes.is_null(row)).then(|| outcomes.value(row))
    }

    /// The current row's field `i`; `None` if it is null or the column was not asked for.
    pub fn field(&self, i: usize) -> Option<&[u8]> {
        if let Some(lines) = &self.lines {
            return lines.get(i);
        }
        let column = self.columns.get((*self.slot.get(i)?)?)?;
        let row = self.next.checked_sub(1)?;
        (row < column.len() && !column.is_null(row)).then(|| column.value(row).as_bytes())
    }

    /// Whether the current row must not be read, and which column says so (`read`: the
    /// columns the pass reads). A line read on its own is checked as [`LineRecord::malformed`]
    /// says; other rows only for a line break in a read field, which is what an unterminated
    /// quote leaves in CSV read by the engine (a view's table on a cluster).
    pub fn malformed(&self, read: &[usize]) -> Option<(Option<usize>, Malformed)> {
        if let Some(lines) = &self.lines {
            return lines.malformed(self.headers.len(), read);
        }
        read.iter()
            .find(|&&i| self.field(i).is_some_and(super::has_line_break))
            .map(|&i| (Some(i), Malformed::LineBreak))
    }

    /// Whether the rows come in file order (not on a cluster reading parts in parallel).
    pub fn in_file_order(&self) -> bool {
        self.in_file_order
    }

    /// The current row (1-based, over the whole dataset).
    pub fn row(&self) -> u64 {
        self.rows
    }

    fn failure(&self, message: &str) -> SourceError {
        SourceError::Engine {
            dataset: self.dataset.clone(),
            location: self.location.clone(),
            message: message.to_owned(),
        }
    }
}

impl Plan {
    fn of(d: &DatasetConfig) -> Plan {
        let tables = match &d.sql {
            Some(_) => d
                .tables
                .iter()
                .filter_map(|t| {
                    let format = t.format()?;
                    Some(Table {
                        name: t.name.clone(),
                        location: location_text(&t.path),
                        format,
                        delimiter: t.delimiter,
                        // Read by the strict reader in process when local; otherwise line by
                        // line, as strictly ([`super::line_table`]).
                        lines: format == DataFormat::Csv
                            && (d.engine.cluster.is_some() || super::local_path(&t.path).is_none()),
                    })
                })
                .collect(),
            None => d
                .format()
                .map(|format| Table {
                    name: "dataset".to_owned(),
                    location: location_text(&d.path),
                    format,
                    delimiter: d.delimiter,
                    // In process, local CSV and JSON lines are read by the strict readers (not
                    // here); on a cluster or from object storage they are read line by line.
                    lines: matches!(format, DataFormat::Csv | DataFormat::Jsonl)
                        && (d.engine.cluster.is_some() || super::local_path(&d.path).is_none()),
                })
                .into_iter()
                .collect(),
        };
        Plan {
            dataset: d.name.clone(),
            location: d.location(),
            tables,
            sql: d.sql.clone(),
            engine: d.engine.clone(),
            rejected: TableRejections::default(),
        }
    }

    /// How the lines of a dataset that is one table read line by line are read.
    fn line_format(&self) -> Option<LineFormat> {
        match (self.sql.as_ref(), self.tables.as_slice()) {
            (None, [table]) if table.lines => Some(match table.format {
                DataFormat::Jsonl => LineFormat::Json,
                _ => LineFormat::Csv(table.delimiter.byte()),
            }),
            _ => None,
        }
    }

    /// The cluster's URL when this read takes its parts in part order: a read in more than one
    /// part for a pass that numbers rows ([`DatasetConfig::in_file_order`]).
    fn part_order_cluster(&self) -> Option<&str> {
        let cluster = self.engine.cluster.as_ref()?;
        (cluster.in_part_order && cluster.partitions > 1).then_some(cluster.url.as_str())
    }

    /// The engine's runtime: under a `memory_limit`, a memory pool of half of it (the rest is
    /// the job's: its points, buffers and the process) and spill files in the node's spill
    /// directory. A view whose sort or join needs more fails with the engine's "resources
    /// exhausted" error rather than taking the node's memory.
    fn runtime(&self) -> Result<Arc<RuntimeEnv>, SourceError> {
        let mut builder = RuntimeEnvBuilder::new();
        if let Some(limit) = self.engine.memory_limit {
            std::fs::create_dir_all(&self.engine.spill_dir).map_err(|e| {
                self.plan_error(format!(
                    "cannot create the spill directory {}: {e}",
                    self.engine.spill_dir.display()
                ))
            })?;
            let pool = usize::try_from(limit / 2).unwrap_or(usize::MAX);
            builder = builder
                .with_memory_pool(Arc::new(FairSpillPool::new(pool)))
                .with_temp_file_path(self.engine.spill_dir.clone());
        }
        builder
            .build_arc()
            .map_err(|e| self.plan_error(format!("the data engine could not start: {e}")))
    }

    /// A session on the partner's Ballista cluster: the plan is made here (a table's schema is
    /// read from its files), then runs on the executors in `partitions` parts. Ballista's client
    /// returns the parts' outputs in the order the parts finished; a read in file order
    /// ([`DatasetConfig::in_file_order`]) takes them in part order instead
    /// ([`super::part_order`]).
    async fn remote(&self, cluster: &Cluster) -> Result<SessionContext, SourceError> {
        let mut config = SessionConfig::new()
            .with_target_partitions(cluster.partitions)
            .with_batch_size(BATCH_ROWS);
        // Split files from this size up (CSV and JSON lines by byte range, Parquet by row
        // group), not from DataFusion's 1 MiB: a cluster has executors to keep busy.
        config.options_mut().optimizer.repartition_file_min_size = CLUSTER_SPLIT_BYTES;
        if cluster.in_part_order {
            // Part `i` must hold the `i`-th byte range of the files: no batch may be dealt to
            // another part on the way.
            config
                .options_mut()
                .optimizer
                .enable_round_robin_repartition = false;
        }
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_default_features()
            .build();
        SessionContext::remote_with_state(&cluster.url, state)
            .await
            .map_err(|e| self.plan_error(format!("the Ballista cluster at {}: {e}", cluster.url)))
    }

    /// The columns of a JSON lines dataset read line by line, from its first records
    /// ([`ColumnFinder`]). They are read here, in one part (files in path order), so that the
    /// same files give the same columns on every run, on a cluster too.
    async fn json_columns(&self) -> Result<JsonColumns, SourceError> {
        let context = |e: String| self.error_in(&format!("dataset ({})", self.location), e);
        let ctx = SessionContext::new_with_config(
            SessionConfig::new()
                .with_target_partitions(1)
                .with_batch_size(BATCH_ROWS),
        );
        let table = self
            .tables
            .first()
            .ok_or_else(|| self.plan_error("no table to read".into()))?;
        register(
            &ctx,
            "dataset",
            &table.location,
            DataFormat::Jsonl,
            table.delimiter,
            true,
        )
        .await
        .map_err(context)?;
        let first = ctx
            .table(TableReference::bare("dataset"))
            .await
            .and_then(json_records)
            .and_then(|frame| frame.limit(0, Some(super::json_line::INFER_LINES)))
            .map_err(|e| context(e.to_string()))?;
        let mut batches = first
            .execute_stream()
            .await
            .map_err(|e| context(e.to_string()))?;
        let mut finder = ColumnFinder::default();
        while let Some(batch) = batches.next().await {
            let batch = batch.map_err(|e| context(e.to_string()))?;
            let Some(lines) = batch.column(0).as_any().downcast_ref::<StringArray>() else {
                return Err(self.plan_error("the lines did not read as text".into()));
            };
            for line in lines.iter().flatten() {
                finder.add(line.as_bytes());
            }
        }
        Ok(finder.finish())
    }

    /// An error of reading data (registering a table infers its schema from rows; streaming
    /// reads them), after `context` (the config's words, kept whole).
    fn error_in(&self, context: &str, e: impl std::fmt::Display) -> SourceError {
        self.plan_error(format!("{context}: {}", self.explained(&e.to_string())))
    }

    /// An error of reading data.
    fn error(&self, message: String) -> SourceError {
        self.plan_error(self.explained(&message))
    }

    /// An engine's message from reading data, [`redact`]ed, with what to do where we know.
    fn explained(&self, message: &str) -> String {
        let mut message = redact(message);
        if self.line_format().is_some()
            && (message.contains("unequal lengths") || message.contains("number of fields"))
        {
            message.push_str(
                " (CSV and JSON lines on a cluster or from object storage are read line by \
                 line, and this line holds the control byte 0x1E, which that read cannot take: \
                 remove it from the file)",
            );
        }
        if self.sql.is_some() && message.contains("Cast error") {
            // The usual cause: a CSV column typed as text from its first rows, compared or
            // summed as a number in the view.
            message.push_str(
                " (a view cast a value to a number: a CSV column is text when its first 1000 \
                 rows hold a value that is not one; write TRY_CAST(column AS BIGINT) in the \
                 view to read such values as null, or clean the file)",
            );
        }
        if message.contains("Json error") {
            message.push_str(if message.contains(" got ") {
                " (a JSON field held a value of another type than the lines its column was \
                 typed from, such as a number where text was: make its values one type in the \
                 file)"
            } else {
                " (a line is not valid JSON: the engine, which reads a view's JSON tables, fails \
                 on it; fix the line, or name the file as the dataset, which is read one line a \
                 record)"
            });
        }
        message
    }

    /// An error of planning the view's SQL against the tables' schemas: no row has been read,
    /// so the message (which names tables and columns) is kept whole.
    fn plan_error(&self, message: String) -> SourceError {
        SourceError::Engine {
            dataset: self.dataset.clone(),
            location: self.location.clone(),
            message,
        }
    }

    /// Registers the tables and plans the dataset: the table itself, or the view's query; with
    /// a view's [`select_reads`], and the plans that count its line-read tables' rejected lines
    /// by reason ([`super::line_table`]; run once the view has been read).
    async fn frame(&self) -> Result<(DataFrame, Vec<String>, Vec<DataFrame>), SourceError> {
        let ctx = match &self.engine.cluster {
            None => {
                let config = SessionConfig::new()
                    .with_target_partitions(1)
                    .with_batch_size(BATCH_ROWS);
                SessionContext::new_with_config_rt(config, self.runtime()?)
            }
            Some(cluster) => self.remote(cluster).await?,
        };
        let mut line_tables = Vec::new();
        for Table {
            name,
            location,
            format,
            delimiter,
            lines,
        } in &self.tables
        {
            if *lines && self.sql.is_some() {
                let table = self
                    .register_view_lines(&ctx, name, location, *delimiter)
                    .await
                    .map_err(|e| self.error_in(&format!("table '{name}' ({location})"), e))?;
                line_tables.push(table);
                continue;
            }
            // In process, a view's local CSV tables are read strictly: a malformed row is
            // rejected, not a failed read. (On a cluster the executors read them.)
            if !*lines
                && self.engine.cluster.is_none()
                && *format == DataFormat::Csv
                && let Some(path) = super::local_path(std::path::Path::new(location))
            {
                let table = StrictCsvTable::open(path, *delimiter, self.rejected.clone())?;
                ctx.register_table(TableReference::bare(name.as_str()), Arc::new(table))
                    .map_err(|e| self.error_in(&format!("table '{name}' ({location})"), e))?;
                continue;
            }
            register(&ctx, name, location, *format, *delimiter, *lines)
                .await
                .map_err(|e| self.error_in(&format!("table '{name}' ({location})"), e))?;
        }
        match &self.sql {
            // JSON lines read line by line: the lines that are records.
            None if self.line_format() == Some(LineFormat::Json) => ctx
                .table(TableReference::bare("dataset"))
                .await
                .and_then(json_records)
                .map(|frame| (frame, Vec::new(), Vec::new()))
                .map_err(|e| self.plan_error(e.to_string())),
            // A struct's fields are columns named by their path ([`super::nested`]).
            None => ctx
                .table(TableReference::bare("dataset"))
                .await
                .and_then(super::nested::flatten_structs)
                .map(|frame| (frame, Vec::new(), Vec::new()))
                .map_err(|e| self.plan_error(e.to_string())),
            Some(sql) => {
                // A view reads; it never writes, creates or changes settings.
                let options = SQLOptions::new()
                    .with_allow_ddl(false)
                    .with_allow_dml(false)
                    .with_allow_statements(false);
                let frame = ctx
                    .sql_with_options(sql, options)
                    .await
                    .map_err(|e| self.plan_error(format!("the sql view: {e}")))?;
                let mut base = std::collections::BTreeSet::new();
                for Table { name, .. } in &self.tables {
                    let table = ctx
                        .table_provider(TableReference::bare(name.as_str()))
                        .await
                        .map_err(|e| self.error(e.to_string()))?;
                    base.extend(table.schema().fields().iter().map(|f| f.name().clone()));
                }
                let reads = select_reads(frame.logical_plan(), &base)
                    .map_err(|e| self.error_in("the sql view", e))?;
                let (frame, problems) = self
                    .read_lines_strictly(&ctx, frame, line_tables)
                    .await
                    .map_err(|e| self.plan_error(format!("the sql view: {e}")))?;
                Ok((frame, reads, problems))
            }
        }
    }
}

/// A view's CSV table read line by line: its name, its lines' hidden name, its columns and
/// their kinds, its delimiter.
struct LineTable {
    name: String,
    hidden: String,
    names: Vec<String>,
    kinds: Vec<super::strict_table::Kind>,
    delimiter: u8,
}

impl Plan {
    /// Registers a view's CSV table as lines under a hidden name, and in its own name an empty
    /// stand-in with its columns typed from its first well-formed lines, to plan the view's SQL
    /// against.
    async fn register_view_lines(
        &self,
        ctx: &SessionContext,
        name: &str,
        location: &str,
        delimiter: Delimiter,
    ) -> Result<LineTable, String> {
        let hidden = line_table::hidden_name(name);
        register(ctx, &hidden, location, DataFormat::Csv, delimiter, true).await?;
        let lines = ctx
            .table(TableReference::bare(hidden.as_str()))
            .await
            .map_err(|e| e.to_string())?;
        let header = lines.schema().field(0).name().clone();
        let names = header_names(&header, delimiter.byte());
        // The kinds come from the first lines of the first file, read here in one part (on a
        // cluster, a sample would come from whichever parts finish first).
        let config = SessionConfig::new()
            .with_target_partitions(1)
            .with_batch_size(BATCH_ROWS);
        let here =
            SessionContext::new_with_config_rt(config, self.runtime().map_err(|e| e.to_string())?);
        register(&here, &hidden, location, DataFormat::Csv, delimiter, true).await?;
        let first = here
            .table(TableReference::bare(hidden.as_str()))
            .await
            .map_err(|e| e.to_string())?;
        let kinds = line_table::sample_kinds(first, delimiter.byte(), names.len())
            .await
            .map_err(|e| e.to_string())?;
        let delimiter = delimiter.byte();
        line_table::register_stand_in(ctx, name, &names, &kinds).map_err(|e| e.to_string())?;
        Ok(LineTable {
            name: name.to_owned(),
            hidden,
            names,
            kinds,
            delimiter,
        })
    }

    /// The view's plan with each line-read table's stand-in replaced by the strict read of its
    /// lines (only the columns the view reads are checked), and a plan per table counting its
    /// rejected lines by reason.
    async fn read_lines_strictly(
        &self,
        ctx: &SessionContext,
        frame: DataFrame,
        tables: Vec<LineTable>,
    ) -> datafusion::error::Result<(DataFrame, Vec<DataFrame>)> {
        if tables.is_empty() {
            return Ok((frame, Vec::new()));
        }
        if line_table::reads_hidden(frame.logical_plan()) {
            return Err(datafusion::error::DataFusionError::Plan(
                "it reads a table's raw lines: name the table the dataset declares".into(),
            ));
        }
        let state = ctx.state();
        let optimized = state.optimize(frame.logical_plan())?;
        let mut plan = frame.into_unoptimized_plan();
        let mut problems = Vec::with_capacity(tables.len());
        for table in tables {
            let spec = line_table::LineSpec {
                delimiter: table.delimiter,
                read: line_table::reads_of(&optimized, &table.name, table.names.len()),
                kinds: table.kinds,
            };
            let lines = ctx
                .table(TableReference::bare(table.hidden.as_str()))
                .await?;
            let strict = line_table::table_plan(lines.clone(), &table.names, &spec)?;
            plan = line_table::substitute(plan, &table.name, &strict)?;
            problems.push(line_table::problems_plan(lines, &spec)?);
        }
        Ok((DataFrame::new(state, plan), problems))
    }
}

/// Runs the plans that count a view's rejected lines by reason, into `rejected`.
async fn count_line_problems(plan: &Plan, problems: Vec<DataFrame>) -> Result<(), SourceError> {
    for counted in problems {
        let batches = counted
            .collect()
            .await
            .map_err(|e| plan.error_in("counting the view's rejected lines", e))?;
        for batch in &batches {
            // The batches come from the executors: their shape is checked, not assumed.
            let [reasons, lines] = batch.columns() else {
                return Err(plan.error("the count of rejected lines is not (text, integer)".into()));
            };
            let reasons = reasons.as_any().downcast_ref::<StringArray>();
            let lines = lines
                .as_any()
                .downcast_ref::<datafusion::arrow::array::Int64Array>();
            let (Some(reasons), Some(lines)) = (reasons, lines) else {
                return Err(plan.error("the count of rejected lines is not (text, integer)".into()));
            };
            for row in 0..batch.num_rows() {
                let n = u64::try_from(lines.value(row)).unwrap_or_default();
                plan.rejected.add(reasons.value(row), n);
            }
        }
    }
    Ok(())
}

/// A path as DataFusion takes it: a local directory ends with `/`.
fn location_text(path: &std::path::Path) -> String {
    let text = path.to_string_lossy().into_owned();
    if !text.contains("://") && !text.ends_with('/') && path.is_dir() {
        return text + "/";
    }
    text
}

/// Registers one table: its object store if it is remote, then its files.
async fn register(
    ctx: &SessionContext,
    name: &str,
    location: &str,
    format: DataFormat,
    delimiter: Delimiter,
    lines: bool,
) -> Result<(), String> {
    if let Some(rest) = location.strip_prefix("s3://") {
        let bucket = rest.split('/').next().unwrap_or_default();
        let store = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| format!("s3 (credentials come from AWS_* variables): {e}"))?;
        let url = url::Url::parse(&format!("s3://{bucket}")).map_err(|e| e.to_string())?;
        ctx.register_object_store(&url, Arc::new(store));
    } else if location.contains("://") {
        return Err("only local paths, file:// and s3:// URLs are supported".into());
    }
    // A single file is read whatever its extension; a directory or glob reads the format's.
    let single_file = !location.ends_with('/') && !location.contains(['*', '?', '[']);
    let extension = if single_file {
        location
            .rsplit('/')
            .next()
            .and_then(|file| file.rfind('.').map(|dot| &file[dot..]))
            .unwrap_or("")
    } else {
        format.extension()
    };
    let table = TableReference::bare(name.to_owned());
    let result = match format {
        DataFormat::Parquet => {
            let options = || ParquetReadOptions::default().file_extension(extension);
            let schema = match ctx
                .register_parquet(table.clone(), location, options())
                .await
            {
                Ok(()) => {
                    // Files written over time add columns, and fields to structs. One that a
                    // later file declares required is null in the files before it, so the
                    // table takes every column and struct field as nullable (else the engine
                    // fails the read on the first older file).
                    let schema = table_schema(ctx, &table).await?;
                    if super::parquet_schema::all_nullable(schema.fields()) {
                        return Ok(());
                    }
                    ctx.deregister_table(table.clone())
                        .map_err(|e| e.to_string())?;
                    datafusion::arrow::datatypes::Schema::new(
                        schema
                            .fields()
                            .iter()
                            .map(|f| super::parquet_schema::nullable(f))
                            .collect::<Vec<_>>(),
                    )
                }
                // Files written by different tools or versions: one column in two types.
                Err(e) if e.to_string().contains("Fail to merge schema") => {
                    super::parquet_schema::unified_schema(ctx, location, extension)
                        .await
                        .map_err(|u| format!("{e} (reading each file's schema: {u})"))?
                }
                Err(e) => return Err(e.to_string()),
            };
            ctx.register_parquet(table, location, options().schema(&schema))
                .await
        }
        DataFormat::Jsonl if lines => {
            return register_json_lines(ctx, table, location, extension).await;
        }
        DataFormat::Jsonl => {
            let mut options = JsonReadOptions::default().file_extension(extension);
            options.schema_infer_max_records = JSON_INFER_ROWS;
            ctx.register_json(table, location, options).await
        }
        DataFormat::Csv if lines => return register_lines(ctx, table, location, extension).await,
        DataFormat::Csv => {
            // A view's CSV tables on a cluster: DataFusion's reader, which fails the read on a
            // row with the wrong field count (local CSV in process is read strictly).
            let options = CsvReadOptions::new()
                .has_header(true)
                .delimiter(delimiter.byte())
                .file_extension(extension);
            ctx.register_csv(table, location, options).await
        }
    };
    result.map_err(|e| e.to_string())
}

/// The columns of the registered `table`.
async fn table_schema(
    ctx: &SessionContext,
    table: &TableReference,
) -> Result<datafusion::arrow::datatypes::SchemaRef, String> {
    ctx.table_provider(table.clone())
        .await
        .map(|t| t.schema())
        .map_err(|e| e.to_string())
}

/// Registers CSV as one text column per line ([`super::csv_line`]), named by the header line.
async fn register_lines(
    ctx: &SessionContext,
    table: TableReference,
    location: &str,
    extension: &str,
) -> Result<(), String> {
    let options = || {
        CsvReadOptions::new()
            .has_header(true)
            .delimiter(LINE_DELIMITER)
            .quote(LINE_QUOTE)
            .file_extension(extension)
    };
    ctx.register_csv(table.clone(), location, options())
        .await
        .map_err(|e| e.to_string())?;
    let schema = table_schema(ctx, &table).await?;
    match schema.fields().iter().as_slice() {
        [line] if line.data_type() == &DataType::Utf8 => Ok(()),
        // Lines that all read as numbers (a one-column file): text all the same, or a phone
        // number's leading 0 would be lost.
        [line] => {
            let text = datafusion::arrow::datatypes::Schema::new(vec![
                datafusion::arrow::datatypes::Field::new(line.name(), DataType::Utf8, true),
            ]);
            ctx.deregister_table(table.clone())
                .map_err(|e| e.to_string())?;
            ctx.register_csv(table, location, options().schema(&text))
                .await
                .map_err(|e| e.to_string())
        }
        _ => Err("the CSV files do not all have the same header line".into()),
    }
}

/// Registers JSON lines as one text column, [`LINE_COLUMN`], a line a row (read by
/// [`super::json_line`]): every byte but the line break is the line's (no header, no quote, a
/// delimiter no JSON line holds).
async fn register_json_lines(
    ctx: &SessionContext,
    table: TableReference,
    location: &str,
    extension: &str,
) -> Result<(), String> {
    let schema =
        datafusion::arrow::datatypes::Schema::new(vec![datafusion::arrow::datatypes::Field::new(
            LINE_COLUMN,
            DataType::Utf8,
            true,
        )]);
    let options = CsvReadOptions::new()
        .has_header(false)
        .delimiter(LINE_DELIMITER)
        .quote(LINE_QUOTE)
        .file_extension(extension)
        .schema(&schema);
    ctx.register_csv(table, location, options)
        .await
        .map_err(|e| e.to_string())
}

/// The lines of a JSON lines table read line by line that are records: not blank.
fn json_records(frame: DataFrame) -> datafusion::error::Result<DataFrame> {
    use datafusion::functions::string::expr_fn::btrim;
    let line = datafusion::prelude::col(LINE_COLUMN);
    frame.filter(
        line.clone()
            .is_not_null()
            .and(btrim(vec![line, lit(" \t\r")]).not_eq(lit(""))),
    )
}

/// The reader thread: plans the dataset, reports its columns, waits for the projection, then
/// streams the projected columns as text.
fn serve(
    plan: Plan,
    ready: SyncSender<Result<Schema, SourceError>>,
    projection: tokio::sync::oneshot::Receiver<Request>,
    out: SyncSender<Message>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(plan.error(format!("cannot start a runtime: {e}"))));
            return;
        }
    };
    runtime.block_on(async move {
        let (frame, reads, problems) = match plan.frame().await {
            Ok(planned) => planned,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let mut names: Vec<String> = frame
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let mut json = None;
        match (plan.line_format(), names.as_slice()) {
            (Some(LineFormat::Csv(delimiter)), [line]) => names = header_names(line, delimiter),
            (Some(LineFormat::Json), _) => match plan.json_columns().await {
                Ok(columns) => {
                    names = columns.headers();
                    json = Some(columns);
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            },
            _ => {}
        }
        if ready.send(Ok(Schema { names, reads, json })).is_err() {
            return;
        }
        // The pass may end here (a header check): then the sender is dropped and we stop.
        let Ok(request) = projection.await else {
            return;
        };
        let result = match (request.sealed, request.grouped) {
            (None, _) => stream(&plan, frame, &request.read, &out).await,
            (Some(sealed), None) => stream_pass(&plan, frame, &request.read, sealed, &out).await,
            (Some(sealed), Some(Grouping::Cells(sums))) => {
                stream_grouped(&plan, frame, &request.read, (sealed, sums), &out).await
            }
            (Some(sealed), Some(Grouping::Persons(bounds))) => {
                stream_grouped_persons(&plan, frame, &request.read, (sealed, &bounds), &out).await
            }
            (Some(sealed), Some(Grouping::Points(sums))) => {
                stream_grouped_points(&plan, frame, &request.read, (sealed, sums), &out).await
            }
        };
        let result = match result {
            Ok(()) => count_line_problems(&plan, problems).await,
            failed => failed,
        };
        let message = match result {
            Ok(()) => Message::Done,
            Err(e) => Message::Failed(e),
        };
        let _ = out.send(message);
    });
}

/// Streams the columns at `read` as text into `out`, until the end or until the pass hangs up.
async fn stream(
    plan: &Plan,
    frame: DataFrame,
    read: &[usize],
    out: &SyncSender<Message>,
) -> Result<(), SourceError> {
    let columns: Vec<Expr> = as_text(plan, &frame, read)?
        .into_iter()
        .zip(read)
        .map(|(column, i)| column.alias(format!("c{i}")))
        .collect();
    send_batches(plan, frame, columns, out, |batch| {
        let mut text = Vec::with_capacity(batch.num_columns());
        for column in batch.columns() {
            let strings = column
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| plan.error("a column did not cast to text".into()))?;
            text.push(strings.clone());
        }
        Ok(Message::Batch(text))
    })
    .await
}

/// The columns at `read` of `frame`, each cast to text. A column of many values (a list, a
/// map) would read as one text of them all, so it is refused, saying what to do instead.
fn as_text(plan: &Plan, frame: &DataFrame, read: &[usize]) -> Result<Vec<Expr>, SourceError> {
    let schema = frame.schema();
    read.iter()
        .map(|&i| {
            let (qualifier, field) = schema.qualified_field(i);
            if let Some(kind) = super::nested::many_values(field.data_type()) {
                return Err(plan.plan_error(format!(
                    "column '{name}' holds a {kind}, not one value per row: make the dataset a \
                     sql view that takes one element (`{name}[1] AS {name}`) or one row per \
                     element (`unnest({name}) AS {name}`)",
                    name = field.name()
                )));
            }
            let column = Expr::Column(Column::from((qualifier, field)));
            Ok(match field.data_type() {
                // Bytes (text a writer did not mark as UTF-8): a value that is not UTF-8 reads
                // as null and rejects its row alone, where a cast would fail the read.
                DataType::Binary
                | DataType::LargeBinary
                | DataType::BinaryView
                | DataType::FixedSizeBinary(_) => try_cast(column, DataType::Utf8),
                _ => cast(column, DataType::Utf8),
            })
        })
        .collect()
}

/// Runs `frame` projected to `exprs` and sends every batch with rows, as `message` makes it,
/// into `out`, until the end or until the pass hangs up.
async fn send_batches(
    plan: &Plan,
    frame: DataFrame,
    exprs: Vec<Expr>,
    out: &SyncSender<Message>,
    message: impl Fn(&RecordBatch) -> Result<Message, SourceError>,
) -> Result<(), SourceError> {
    let frame = frame.select(exprs).map_err(|e| plan.error(e.to_string()))?;
    let mut batches = match plan.part_order_cluster() {
        Some(url) => {
            let (batches, parts) = super::part_order::read_in_part_order(frame, url)
                .await
                .map_err(|e| plan.error(e.to_string()))?;
            tracing::info!(
                dataset = %plan.dataset,
                parts,
                "read on the cluster in {parts} parts, taken in part order"
            );
            batches
        }
        None => frame
            .execute_stream()
            .await
            .map_err(|e| plan.error(e.to_string()))?,
    };
    while let Some(batch) = batches.next().await {
        let batch = batch.map_err(|e| plan.error(e.to_string()))?;
        if batch.num_rows() == 0 {
            continue;
        }
        if out.send(message(&batch)?).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Runs the pass function over the columns at `read` on the cluster's executors and streams
/// its outcomes into `out`.
async fn stream_pass(
    plan: &Plan,
    frame: DataFrame,
    read: &[usize],
    sealed: Vec<u8>,
    out: &SyncSender<Message>,
) -> Result<(), SourceError> {
    if plan.engine.cluster.is_none() {
        return Err(plan.plan_error("an executor pass needs a Ballista cluster".into()));
    }
    let mut args = vec![lit(ScalarValue::Binary(Some(sealed)))];
    args.extend(as_text(plan, &frame, read)?);
    let pass = Expr::ScalarFunction(ScalarFunction::new_udf(Arc::new(PassUdf::planner()), args))
        .alias("outcome");
    send_batches(plan, frame, vec![pass], out, |batch| {
        let outcomes = batch
            .column(0)
            .as_any()
            .downcast_ref::<BinaryArray>()
            .ok_or_else(|| plan.error("the executors' pass did not return outcomes".into()))?;
        Ok(Message::Outcomes(outcomes.clone()))
    })
    .await
}

/// Runs an aggregate's grouped pass on the cluster's executors (`SELECT cell, count(*),
/// sum(value…) GROUP BY cell` over the columns at `read`) and sends its rows into `out`.
async fn stream_grouped(
    plan: &Plan,
    frame: DataFrame,
    read: &[usize],
    (sealed, sums): (Vec<u8>, usize),
    out: &SyncSender<Message>,
) -> Result<(), SourceError> {
    use crate::data::cluster_aggregate::{AggregateUdf, Output};
    use datafusion::functions_aggregate::expr_fn::{count, sum};
    if plan.engine.cluster.is_none() {
        return Err(plan.plan_error("an executor pass needs a Ballista cluster".into()));
    }
    let columns = as_text(plan, &frame, read)?;
    let call = |output: Output, lead: Vec<Expr>| {
        let mut args = vec![lit(ScalarValue::Binary(Some(sealed.clone())))];
        args.extend(lead);
        args.extend(columns.iter().cloned());
        Expr::ScalarFunction(ScalarFunction::new_udf(
            Arc::new(AggregateUdf::planner(output)),
            args,
        ))
    };
    let cell = call(Output::Cell, Vec::new()).alias("cell");
    let mut aggregates = vec![count(lit(1i64)).alias("rows")];
    for i in 0..sums {
        // Exact: up to 2^27 rows of 2^63 fit in 38 digits.
        let value = cast(
            call(Output::Value, vec![lit(i as i64)]),
            DataType::Decimal128(38, 0),
        );
        aggregates.push(sum(value).alias(format!("sum{i}")));
    }
    let frame = frame
        .aggregate(vec![cell], aggregates)
        .map_err(|e| plan.error(e.to_string()))?;
    send_grouped(plan, frame, sums, out).await
}

/// Runs a grouped plan (`frame`: key, count, then `figures` Decimal128 columns) and sends its
/// rows into `out`, a batch at a time, until the end or until the pass hangs up.
async fn send_grouped(
    plan: &Plan,
    frame: DataFrame,
    figures: usize,
    out: &SyncSender<Message>,
) -> Result<(), SourceError> {
    let mut batches = frame
        .execute_stream()
        .await
        .map_err(|e| plan.error(e.to_string()))?;
    while let Some(batch) = batches.next().await {
        let batch = batch.map_err(|e| plan.error(e.to_string()))?;
        let rows = grouped_rows(&batch, figures)
            .ok_or_else(|| plan.error("the executors' grouping returned another shape".into()))?;
        if out.send(Message::Grouped(rows)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Runs an aggregate's pass with per-person clipping on the cluster's executors, grouped there
/// ([`crate::data::cluster_aggregate`]), and sends its rows into `out`: per cell, its persons,
/// its rows, the rows its persons left out, and each clipped sum.
async fn stream_grouped_persons(
    plan: &Plan,
    frame: DataFrame,
    read: &[usize],
    (sealed, bounds): (Vec<u8>, &[(i64, i64)]),
    out: &SyncSender<Message>,
) -> Result<(), SourceError> {
    if plan.engine.cluster.is_none() {
        return Err(plan.plan_error("an executor pass needs a Ballista cluster".into()));
    }
    let columns = as_text(plan, &frame, read)?;
    let planner = |output| {
        Arc::new(crate::data::cluster_aggregate::AggregateUdf::planner(
            output,
        ))
    };
    let frame = grouped_by_person(frame, (&sealed, planner), columns, bounds)
        .map_err(|e| plan.error(e.to_string()))?;
    send_grouped(plan, frame, 2 + bounds.len(), out).await
}

/// `frame` through the aggregate's functions (their spec `sealed`, over `columns`), grouped per
/// person: each person's rows summed per group; each person's first group (the lowest index)
/// kept, its sums clipped to `bounds`; then per cell `count(*)` (persons), its rows, the rows
/// its persons have in other groups, and each clipped sum. Rows left out count under their
/// cell as one "person" each cell. Every figure but the count is a `Decimal128(38, 0)`.
/// `udf` gives each function (the node's planners; a test's executors).
pub(crate) fn grouped_by_person(
    frame: DataFrame,
    (sealed, udf): (
        &[u8],
        impl Fn(crate::data::cluster_aggregate::Output) -> Arc<ScalarUDF>,
    ),
    columns: Vec<Expr>,
    bounds: &[(i64, i64)],
) -> datafusion::error::Result<DataFrame> {
    use crate::data::cluster_aggregate::Output;
    use datafusion::functions_aggregate::expr_fn::{count, first_value, min, sum};
    use datafusion::prelude::{col, when};
    let decimal = |e: Expr| cast(e, DataType::Decimal128(38, 0));
    let call = |output: Output, lead: Vec<Expr>| {
        let mut args = vec![lit(ScalarValue::Binary(Some(sealed.to_vec())))];
        args.extend(lead);
        args.extend(columns.iter().cloned());
        Expr::ScalarFunction(ScalarFunction::new_udf(udf(output), args))
    };
    let mut row = vec![
        call(Output::Cell, Vec::new()).alias("cell"),
        call(Output::Person, Vec::new()).alias("person"),
        call(Output::Group, Vec::new()).alias("grp"),
    ];
    for i in 0..bounds.len() {
        row.push(call(Output::Value, vec![lit(i as i64)]).alias(format!("v{i}")));
    }
    // Each person's rows, per group (a person's cell follows from its group).
    let mut per_group = vec![count(lit(1i64)).alias("rows")];
    for i in 0..bounds.len() {
        per_group.push(sum(decimal(col(format!("v{i}")))).alias(format!("s{i}")));
    }
    let by_group = frame
        .select(row)?
        .aggregate(vec![col("person"), col("grp"), col("cell")], per_group)?;
    // Each person's first group, and that group's figures.
    let first = |name: &str| {
        first_value(col(name), vec![col("grp").sort(true, false)]).alias(format!("first_{name}"))
    };
    let mut per_person = vec![
        min(col("grp")).alias("first_grp"),
        sum(col("rows")).alias("all_rows"),
        first("cell"),
        first("rows"),
    ];
    for i in 0..bounds.len() {
        per_person.push(first(&format!("s{i}")));
    }
    let by_person = by_group.aggregate(vec![col("person")], per_person)?;
    let mut figures = vec![
        count(lit(1i64)).alias("persons"),
        sum(decimal(col("first_rows"))).alias("rows"),
        sum(decimal(col("all_rows")) - decimal(col("first_rows"))).alias("outside"),
    ];
    for (i, (lo, hi)) in bounds.iter().enumerate() {
        let s = col(format!("first_s{i}"));
        let (lo, hi) = (decimal(lit(*lo)), decimal(lit(*hi)));
        let clipped = when(s.clone().lt(lo.clone()), lo)
            .when(s.clone().gt(hi.clone()), hi)
            .otherwise(s)?;
        figures.push(sum(clipped).alias(format!("clipped{i}")));
    }
    by_person.aggregate(vec![col("first_cell").alias("cell")], figures)
}

/// Runs an overlap-sum value holder's pass on the cluster's executors, grouped there by point
/// ([`crate::data::cluster_outcome`]), and sends its rows into `out`: per point (or outcome of
/// a row left out), the row count, the lowest and highest group, and each value's exact sum.
async fn stream_grouped_points(
    plan: &Plan,
    frame: DataFrame,
    read: &[usize],
    (sealed, sums): (Vec<u8>, usize),
    out: &SyncSender<Message>,
) -> Result<(), SourceError> {
    if plan.engine.cluster.is_none() {
        return Err(plan.plan_error("an executor pass needs a Ballista cluster".into()));
    }
    let mut args = vec![lit(ScalarValue::Binary(Some(sealed)))];
    args.extend(as_text(plan, &frame, read)?);
    let frame = grouped_by_point(frame, args, sums).map_err(|e| plan.error(e.to_string()))?;
    send_grouped(plan, frame, 2 + sums, out).await
}

/// `frame` passed through the pass function (over `args`: the sealed spec, then the columns)
/// once a row, then grouped by point: `key, rows, lowest group, highest group, sum0, …`, every
/// figure a `Decimal128(38, 0)` (exact: up to 2^27 rows of 2^63 fit in 38 digits).
pub(crate) fn grouped_by_point(
    frame: DataFrame,
    args: Vec<Expr>,
    sums: usize,
) -> datafusion::error::Result<DataFrame> {
    use crate::data::cluster_outcome;
    use datafusion::functions_aggregate::expr_fn::{count, max, min, sum};
    let pass = Expr::ScalarFunction(ScalarFunction::new_udf(Arc::new(PassUdf::planner()), args));
    // The pass in a projection of its own, so it runs once a row, whatever reads its outcome.
    let frame = frame.select(vec![pass.alias("outcome")])?;
    let [key, field] = cluster_outcome::functions().map(Arc::new);
    let outcome = datafusion::prelude::col("outcome");
    let field = |i: i64| {
        cast(
            Expr::ScalarFunction(ScalarFunction::new_udf(
                Arc::clone(&field),
                vec![outcome.clone(), lit(i)],
            )),
            DataType::Decimal128(38, 0),
        )
    };
    let key = Expr::ScalarFunction(ScalarFunction::new_udf(key, vec![outcome.clone()]));
    let mut figures = vec![
        count(lit(1i64)).alias("rows"),
        min(field(0)).alias("lowest_group"),
        max(field(0)).alias("highest_group"),
    ];
    for i in 0..sums {
        figures.push(sum(field(1 + i as i64)).alias(format!("sum{i}")));
    }
    frame.aggregate(vec![key.alias("key")], figures)
}

/// The rows of one batch of a grouped pass: cell, row count, then each sum.
fn grouped_rows(batch: &RecordBatch, sums: usize) -> Option<Vec<GroupedRow>> {
    use datafusion::arrow::array::{Decimal128Array, Int64Array};
    if batch.num_columns() != 2 + sums {
        return None;
    }
    let cells = batch.column(0).as_any().downcast_ref::<BinaryArray>()?;
    let counts = batch.column(1).as_any().downcast_ref::<Int64Array>()?;
    let totals: Vec<&Decimal128Array> = (0..sums)
        .map(|i| {
            batch
                .column(2 + i)
                .as_any()
                .downcast_ref::<Decimal128Array>()
        })
        .collect::<Option<_>>()?;
    (0..batch.num_rows())
        .map(|r| {
            Some(GroupedRow {
                cell: cells.value(r).to_vec(),
                rows: u64::try_from(counts.value(r)).ok()?,
                sums: totals
                    .iter()
                    .map(|t| if t.is_null(r) { 0 } else { t.value(r) })
                    .collect(),
            })
        })
        .collect()
}

/// The base-table columns (`base`: every column of the view's tables) that the plan's select
/// lists read, or the paths of the struct fields they take ([`super::nested::reads_of`]): the
/// expressions of its projections, aggregates and windows, in subqueries too. Sorted and
/// deduplicated.
fn select_reads(
    plan: &LogicalPlan,
    base: &std::collections::BTreeSet<String>,
) -> datafusion::error::Result<Vec<String>> {
    let mut reads = std::collections::BTreeSet::new();
    plan.apply_with_subqueries(|node| {
        let expressions: Vec<&Expr> = match node {
            LogicalPlan::Projection(p) => p.expr.iter().collect(),
            LogicalPlan::Aggregate(a) => a.group_expr.iter().chain(&a.aggr_expr).collect(),
            LogicalPlan::Window(w) => w.window_expr.iter().collect(),
            _ => Vec::new(),
        };
        for e in expressions {
            super::nested::reads_of(e, base, &mut reads)?;
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(reads.into_iter().collect())
}

/// An engine message without any value it may quote, cut to [`MAX_MESSAGE`]. Engines quote
/// a value that failed in single quotes (DataFusion, Arrow's CSV) or double quotes (Arrow's
/// JSON), write a number bare (`failed to parse 4155550100 as Int64`), and end a JSON error
/// with the element they met (`expected string got …`). So quoted text becomes `'…'`, a word
/// with a digit or an `@` becomes `…` (unless it is a type name such as `Int64`, or a number
/// after `line`, `row` or `column`), and the rest of the message after `got` is dropped. What
/// is left names the error, the types, the JSON field (Arrow quotes its name after `field`)
/// and the place.
pub fn redact(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(MAX_MESSAGE));
    let mut chars = message.chars().peekable();
    while let Some(c) = chars.next() {
        if out.len() > MAX_MESSAGE {
            break;
        }
        if c == '\'' || c == '"' {
            // Up to the closing quote, or the end. Arrow names a JSON field so (`whilst
            // decoding field 'email'`): a name from the schema, not a value.
            let mut quoted = String::new();
            for q in chars.by_ref() {
                if q == c {
                    break;
                }
                quoted.push(q);
            }
            let field_name = out.ends_with("field ") && quoted.chars().all(is_word);
            out.push(c);
            if field_name && may_show(&quoted) {
                out.push_str(&quoted);
            } else {
                out.push('…');
            }
            out.push(c);
        } else if is_word(c) {
            let mut word = String::from(c);
            while let Some(&next) = chars.peek().filter(|n| is_word(**n)) {
                word.push(next);
                chars.next();
            }
            if word == "got" {
                out.push_str("got …");
                break;
            }
            // A number after `line`, `row` or `column` is a place, not a value.
            let place = ["line ", "row ", "column "]
                .iter()
                .any(|w| out.ends_with(w))
                && word.chars().all(|c| c.is_ascii_digit());
            if place || may_show(&word) {
                out.push_str(&word);
            } else {
                out.push('…');
            }
        } else {
            out.push(c);
        }
    }
    if out.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push_str(" …");
    }
    out
}

/// Whether `c` can be part of a value written bare: a number, an email, a phone number.
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '@' | '.' | '+' | '-')
}

/// Whether a bare word may stay in a message: no digit and no `@`, or a type or an encoding
/// (`Int64`, `Decimal128`, `UTF-8`). A word like `C0001234` could be a customer number.
fn may_show(word: &str) -> bool {
    if !word.chars().any(|c| c.is_ascii_digit() || c == '@') {
        return true;
    }
    const TYPES: [&str; 16] = [
        "Int",
        "Utf8View",
        "UInt",
        "Float",
        "Utf",
        "LargeUtf",
        "Decimal",
        "Date",
        "Time",
        "Timestamp",
        "Binary",
        "Interval",
        "Duration",
        "UTF-",
        "utf-",
        "non-UTF-",
    ];
    let name = word.trim_end_matches(|c: char| c.is_ascii_digit());
    TYPES.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_drops_quoted_text() {
        assert_eq!(
            redact("Cannot cast string 'alice@example.com' to value of Int64 type"),
            "Cannot cast string '…' to value of Int64 type"
        );
        assert_eq!(redact("unterminated 'quote"), "unterminated '…'");
        assert!(redact(&"x".repeat(1000)).len() < MAX_MESSAGE + 10);
    }

    /// The messages Arrow's JSON and CSV readers give for a value of another type: each value
    /// goes, whether quoted, bare or the element a JSON error ends with; types and words stay.
    #[test]
    fn redact_drops_bare_values_and_what_a_json_error_met() {
        let cases = [
            (
                "Arrow error: Json error: whilst decoding field 'customer': whilst decoding \
                 field 'email': expected string got 4155550100",
                "Arrow error: Json error: whilst decoding field 'customer': whilst decoding field \
                 'email': expected string got …",
            ),
            (
                "Json error: expected { got \"alice@example.com\"",
                "Json error: expected { got …",
            ),
            (
                "Json error: failed to parse 4155550100 as Int64",
                "Json error: failed to parse … as Int64",
            ),
            (
                "Json error: failed to parse \"+1 415 555 0100\" as Float64",
                "Json error: failed to parse \"…\" as Float64",
            ),
            (
                "Parser error: Error while parsing value alice@example.com as type Decimal128(38, 2) for column 3 at line 12",
                "Parser error: Error while parsing value … as type Decimal128(…, …) for column 3 at line 12",
            ),
        ];
        assert_eq!(
            redact("whilst decoding field 'a@b.c': x"),
            "whilst decoding field '…': x"
        );
        assert_eq!(
            redact("non-UTF-8 data in Utf8 for C0001234"),
            "non-UTF-8 data in Utf8 for …"
        );
        for (message, redacted) in cases {
            assert_eq!(redact(message), redacted);
        }
    }
}
