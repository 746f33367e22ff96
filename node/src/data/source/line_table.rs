//! A SQL view's CSV table that the node's strict reader cannot read itself: on a partner's
//! Ballista cluster (the executors read it), or in an object store. It is read as strictly as
//! a local one ([`super::strict_table`]), by plan operators instead of a table provider, since
//! an executor can only run what a plan says.
//!
//! The table is registered line by line ([`super::csv_line`]: one text column, named by the
//! header line), under a hidden name. In its place the view reads a plan over those lines:
//!
//! ```text
//! SELECT TRY_CAST(cleanroom_csv_field(spec, 0, line) AS <kind>) AS <name0>, …
//! FROM <hidden> WHERE cleanroom_csv_problem(spec, line) IS NULL
//! ```
//!
//! `spec` says the delimiter, each column's kind (inferred from well-formed lines the engine
//! reads first) and which columns the view reads. `cleanroom_csv_problem` applies the local
//! reader's rules: the field count, a quote left open at the line's end, a `"` in a column the
//! view reads, a value of such a column that does not read as its kind. It names the reason, or
//! is null for a line that is read. A second plan counts the lines by reason (`GROUP BY`), once
//! the view has been read: the view's output rows cannot carry them. Those counts have no
//! places (the lines come back from many parts).
//!
//! Both functions hold no key and read only the line they are given; the scheduler and the
//! executors register them ([`functions`]).

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, StringArray, StringBuilder};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, ScalarValue, TableReference};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::{
    ColumnarValue, LogicalPlan, LogicalPlanBuilder, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl,
    Signature, Volatility,
};
use datafusion::prelude::{DataFrame, Expr, SessionContext, col, lit, try_cast};

use super::csv_line::{LineRecord, SPANNED_LINES, spans_lines};
use super::strict_table::{INFER_ROWS, Kind, KindInference, read_value};
use crate::data::dataset::Rejection;

/// The function that names why a line is not read (null when it is).
pub const PROBLEM_UDF: &str = "cleanroom_csv_problem";
/// The function that gives one field of a line, as text (null when empty).
pub const FIELD_UDF: &str = "cleanroom_csv_field";

/// The spec's format version (its first byte).
const VERSION: u8 = 1;
/// More columns than a CSV table of a view may have.
const MAX_WIDTH: usize = 4096;

/// How a table's lines are read: the delimiter, each column's kind, the columns the view reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LineSpec {
    pub delimiter: u8,
    pub kinds: Vec<Kind>,
    pub read: Vec<bool>,
}

impl LineSpec {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION, self.delimiter];
        out.extend((self.kinds.len() as u32).to_le_bytes());
        for (kind, read) in self.kinds.iter().zip(&self.read) {
            out.push(kind.code());
            out.push(u8::from(*read));
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<LineSpec> {
        let (&[VERSION, delimiter], rest) = bytes.split_first_chunk::<2>()? else {
            return None;
        };
        let (width, rest) = rest.split_first_chunk::<4>()?;
        let width = u32::from_le_bytes(*width) as usize;
        if width > MAX_WIDTH || rest.len() != 2 * width {
            return None;
        }
        let mut kinds = Vec::with_capacity(width);
        let mut read = Vec::with_capacity(width);
        for pair in rest.chunks_exact(2) {
            kinds.push(Kind::from_code(pair[0])?);
            read.push(match pair[1] {
                0 => false,
                1 => true,
                _ => return None,
            });
        }
        Some(LineSpec {
            delimiter,
            kinds,
            read,
        })
    }

    /// The columns the view reads, by index.
    fn read_columns(&self) -> Vec<usize> {
        (0..self.read.len()).filter(|&i| self.read[i]).collect()
    }

    /// Why `line` is not read, if it is not: the local reader's checks, in its order. `read`:
    /// [`Self::read_columns`] (taken once, not for every line).
    fn problem(&self, record: &mut LineRecord, line: &[u8], read: &[usize]) -> Option<Rejection> {
        record.split(line, self.delimiter);
        if let Some((_, why)) = record.malformed(self.kinds.len(), read) {
            return Some(why.into());
        }
        read.iter()
            .find_map(|&i| read_value(record.get(i), self.kinds[i]).err())
    }
}

/// The functions a cluster's scheduler and executors register, and the node plans with.
pub fn functions() -> [ScalarUDF; 2] {
    [
        ScalarUDF::new_from_impl(LineUdf::new(Output::Problem)),
        ScalarUDF::new_from_impl(LineUdf::new(Output::Field)),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Output {
    Problem,
    Field,
}

/// One of the two functions over a table's lines.
#[derive(Debug, PartialEq, Eq, Hash)]
struct LineUdf {
    output: Output,
    signature: Signature,
}

impl LineUdf {
    fn new(output: Output) -> Self {
        LineUdf {
            output,
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for LineUdf {
    fn name(&self) -> &str {
        match self.output {
            Output::Problem => PROBLEM_UDF,
            Output::Field => FIELD_UDF,
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let name = self.name();
        let fail = |m: &str| DataFusionError::Execution(format!("{name}: {m}"));
        let (spec, rest) = args.args.split_first().ok_or_else(|| fail("no spec"))?;
        let ColumnarValue::Scalar(ScalarValue::Binary(Some(spec))) = spec else {
            return Err(fail("the first argument is not a spec"));
        };
        let spec = LineSpec::decode(spec)
            .ok_or_else(|| fail("the spec is not one this process reads (another version?)"))?;
        let (field, line) = match (self.output, rest) {
            (Output::Problem, [line]) => (None, line),
            (Output::Field, [ColumnarValue::Scalar(ScalarValue::Int64(Some(i))), line]) => {
                let i = usize::try_from(*i)
                    .ok()
                    .filter(|&i| i < spec.kinds.len())
                    .ok_or_else(|| fail("the field is past the header"))?;
                (Some(i), line)
            }
            _ => return Err(fail("the arguments do not match the function")),
        };
        let lines = line.to_array(args.number_rows)?;
        let lines = lines
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| fail("the line is not text"))?;
        if lines.iter().flatten().any(|l| spans_lines(l.as_bytes())) {
            return Err(fail(SPANNED_LINES));
        }
        let mut out = StringBuilder::with_capacity(lines.len(), 0);
        let mut record = LineRecord::default();
        let read = spec.read_columns();
        for row in 0..lines.len() {
            let line = lines.is_valid(row).then(|| lines.value(row).as_bytes());
            let line = line.unwrap_or_default();
            match field {
                None => {
                    let problem = spec.problem(&mut record, line, &read);
                    out.append_option(problem.map(Rejection::label));
                }
                Some(i) => {
                    record.split(line, spec.delimiter);
                    let text = record
                        .get(i)
                        .filter(|f| !f.is_empty())
                        .and_then(|f| std::str::from_utf8(f).ok());
                    out.append_option(text);
                }
            }
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish()) as ArrayRef))
    }
}

fn call(output: Output, args: Vec<Expr>) -> Expr {
    Expr::ScalarFunction(ScalarFunction::new_udf(
        Arc::new(ScalarUDF::new_from_impl(LineUdf::new(output))),
        args,
    ))
}

/// The prefix of the names tables' lines are registered under.
const HIDDEN_PREFIX: &str = "__cleanroom_lines_";

/// The name a table's lines are registered under; the view reads `name` itself.
pub(super) fn hidden_name(name: &str) -> String {
    format!("{HIDDEN_PREFIX}{name}")
}

/// Whether `plan` (a view's, before its stand-ins are replaced) reads a table's raw lines by
/// their hidden name: every column at once, past the checks on which columns a view may read.
/// Subqueries count: one in the select list would put a whole line in a column.
pub(super) fn reads_hidden(plan: &LogicalPlan) -> bool {
    let mut found = false;
    let walked = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && scan.table_name.table().starts_with(HIDDEN_PREFIX)
        {
            found = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    // A walk that failed saw only part of the plan: refuse rather than assume.
    found || walked.is_err()
}

/// The lines' one column (named by the header line).
fn line_column(lines: &DataFrame) -> Expr {
    Expr::Column(datafusion::common::Column::from(
        lines.schema().qualified_field(0),
    ))
}

/// The columns' kinds, from up to [`INFER_ROWS`] well-formed lines of the first `lines` gives
/// (twice as many lines are read, for the malformed ones among them).
pub(super) async fn sample_kinds(
    lines: DataFrame,
    delimiter: u8,
    width: usize,
) -> datafusion::error::Result<Vec<Kind>> {
    let line = line_column(&lines);
    let batches = lines
        .select(vec![line])?
        .limit(0, Some(2 * INFER_ROWS))?
        .collect()
        .await?;
    let mut inference = KindInference::new(width);
    let mut record = LineRecord::default();
    let all: Vec<usize> = (0..width).collect();
    'batches: for batch in &batches {
        let Some(text) = batch.column(0).as_any().downcast_ref::<StringArray>() else {
            continue;
        };
        for row in 0..text.len() {
            if !inference.wants_more() {
                break 'batches;
            }
            record.split(text.value(row).as_bytes(), delimiter);
            // As the local inference: only lines with no problem in any column.
            if record.malformed(width, &all).is_some() {
                continue;
            }
            inference.row(|i| record.get(i));
        }
    }
    Ok(inference.kinds())
}

/// The table the view reads in place of the lines: the columns `names` as their kinds, from
/// the lines with no problem.
pub(super) fn table_plan(
    lines: DataFrame,
    names: &[String],
    spec: &LineSpec,
) -> datafusion::error::Result<LogicalPlan> {
    let line = line_column(&lines);
    let bytes = lit(ScalarValue::Binary(Some(spec.encode())));
    let problem = call(Output::Problem, vec![bytes.clone(), line.clone()]);
    let columns: Vec<Expr> = names
        .iter()
        .zip(&spec.kinds)
        .enumerate()
        .map(|(i, (name, kind))| {
            let text = call(
                Output::Field,
                vec![bytes.clone(), lit(i as i64), line.clone()],
            );
            let value = match kind {
                Kind::Text => text,
                // The problem function has checked the value reads as its kind; TRY_CAST, not
                // CAST, since a condition of the view may be evaluated beside it on any line.
                other => try_cast(text, other.data_type()),
            };
            value.alias(name)
        })
        .collect();
    let plan = lines
        .filter(problem.is_null())?
        .select(columns)?
        .into_unoptimized_plan();
    Ok(plan)
}

/// Counts the lines by the reason they are not read: `(reason, lines)` rows.
pub(super) fn problems_plan(
    lines: DataFrame,
    spec: &LineSpec,
) -> datafusion::error::Result<DataFrame> {
    use datafusion::functions_aggregate::expr_fn::count;
    let line = line_column(&lines);
    let bytes = lit(ScalarValue::Binary(Some(spec.encode())));
    let problem = call(Output::Problem, vec![bytes, line]).alias("reason");
    lines
        .select(vec![problem])?
        .filter(col("reason").is_not_null())?
        .aggregate(vec![col("reason")], vec![count(lit(1i64)).alias("lines")])
}

/// Which columns of table `name` the (optimized) `plan` reads: every one a scan of it projects.
pub(super) fn reads_of(plan: &LogicalPlan, name: &str, width: usize) -> Vec<bool> {
    let mut read = vec![false; width];
    let _ = plan.apply(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && scan.table_name.table() == name
        {
            match &scan.projection {
                Some(columns) => columns.iter().for_each(|&i| {
                    if let Some(r) = read.get_mut(i) {
                        *r = true;
                    }
                }),
                None => read.iter_mut().for_each(|r| *r = true),
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    read
}

/// `plan` with each scan of table `name` replaced by `table` (aliased as `name`).
pub(super) fn substitute(
    plan: LogicalPlan,
    name: &str,
    table: &LogicalPlan,
) -> datafusion::error::Result<LogicalPlan> {
    plan.transform_up(|node| {
        if let LogicalPlan::TableScan(scan) = &node
            && scan.table_name.table() == name
        {
            let aliased = LogicalPlanBuilder::from(table.clone())
                .alias(name)?
                .build()?;
            return Ok(Transformed::yes(aliased));
        }
        Ok(Transformed::no(node))
    })
    .map(|t| t.data)
}

/// Registers the lines' provisional stand-in: an empty table of `names` as their kinds, which
/// the view's SQL is planned against before the scans are replaced.
pub(super) fn register_stand_in(
    ctx: &SessionContext,
    name: &str,
    names: &[String],
    kinds: &[Kind],
) -> datafusion::error::Result<()> {
    use datafusion::arrow::datatypes::{Field, Schema};
    let fields: Vec<Field> = names
        .iter()
        .zip(kinds)
        .map(|(n, k)| Field::new(n, k.data_type(), true))
        .collect();
    let table = datafusion::datasource::empty::EmptyTable::new(Arc::new(Schema::new(fields)));
    ctx.register_table(TableReference::bare(name), Arc::new(table))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(read: &[bool]) -> LineSpec {
        LineSpec {
            delimiter: b',',
            kinds: vec![Kind::Text, Kind::Int, Kind::Text],
            read: read.to_vec(),
        }
    }

    /// A view's CSV table read line by line: a "line" holding a line break swallowed lines
    /// (a field that started with the engine's quote byte), so both functions fail, saying so.
    #[test]
    fn a_line_that_swallowed_lines_fails_the_read() {
        use datafusion::arrow::datatypes::Field;
        let lines: ArrayRef = Arc::new(StringArray::from(vec!["a,1,b", "c,2,d\ne,3,f"]));
        for (output, lead) in [
            (Output::Problem, vec![]),
            (
                Output::Field,
                vec![ColumnarValue::Scalar(ScalarValue::Int64(Some(0)))],
            ),
        ] {
            let mut args = vec![ColumnarValue::Scalar(ScalarValue::Binary(Some(
                spec(&[true, true, true]).encode(),
            )))];
            args.extend(lead);
            args.push(ColumnarValue::Array(Arc::clone(&lines)));
            let arg_fields = (0..args.len())
                .map(|i| Arc::new(Field::new(format!("a{i}"), DataType::Utf8, true)))
                .collect();
            let err = LineUdf::new(output)
                .invoke_with_args(ScalarFunctionArgs {
                    args,
                    arg_fields,
                    number_rows: 2,
                    return_field: Arc::new(Field::new("out", DataType::Utf8, true)),
                    config_options: Arc::new(datafusion::config::ConfigOptions::default()),
                })
                .expect_err("the read fails");
            assert!(err.to_string().contains(SPANNED_LINES), "{err}");
        }
    }

    #[test]
    fn a_spec_round_trips_and_a_bad_one_is_refused() {
        let s = spec(&[true, false, true]);
        assert_eq!(LineSpec::decode(&s.encode()), Some(s.clone()));
        let mut bytes = s.encode();
        bytes.pop();
        assert_eq!(LineSpec::decode(&bytes), None);
        let mut bytes = s.encode();
        bytes[0] = 9;
        assert_eq!(LineSpec::decode(&bytes), None);
        let mut bytes = s.encode();
        *bytes.last_mut().unwrap() = 2;
        assert_eq!(LineSpec::decode(&bytes), None);
        assert_eq!(LineSpec::decode(&[]), None);
    }

    #[test]
    fn a_line_has_the_local_readers_problems_in_its_order() {
        let mut r = LineRecord::default();
        let all = spec(&[true, true, true]);
        let label = |s: &LineSpec, r: &mut LineRecord, line: &str| {
            s.problem(r, line.as_bytes(), &s.read_columns())
                .map(Rejection::label)
        };
        assert_eq!(label(&all, &mut r, "a,1,c"), None);
        assert_eq!(label(&all, &mut r, "a,,c"), None, "an empty field is null");
        assert_eq!(label(&all, &mut r, "a,1").as_deref(), Some("field count"));
        assert_eq!(
            label(&all, &mut r, "a,1,\"open").as_deref(),
            Some("quote left open")
        );
        assert_eq!(label(&all, &mut r, "a,x,c").as_deref(), Some("field type"));
        assert_eq!(
            label(&all, &mut r, "a\"b,1,c").as_deref(),
            Some("quote in a field")
        );
        // Columns the view does not read are neither typed nor checked for quotes.
        let first = spec(&[true, false, false]);
        assert_eq!(label(&first, &mut r, "a,x,c\"d"), None);
        assert_eq!(label(&first, &mut r, "a,x").as_deref(), Some("field count"));
    }
}
