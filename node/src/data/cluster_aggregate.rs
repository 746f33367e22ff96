//! An `aggregate`'s dataset pass on the partner's Ballista executors, as plan operators: the
//! executors read, filter (malformed rows, consent, forgotten subjects), parse and clip each
//! row's values and map its group, then group and sum; only one row per (outcome, group) comes
//! back to the node.
//!
//! Two scalar functions over the columns the node's own pass reads (the group column, the
//! summed columns, the consent column, every declared identifier when subjects are forgotten):
//! [`CELL_UDF`] gives each row's cell (why it is left out, or the group it counts in) and
//! [`VALUE_UDF`] the row's clipped value of one summed column (0 for a row left out). The plan
//! is `SELECT cell, count(*), sum(value…) GROUP BY cell`. Their first argument is the job's
//! [`AggregateSpec`], sealed like the overlap pass's ([`super::cluster_pass`]): it carries the
//! deletion list's secret.
//!
//! What the node gets is what its own pass adds up: rows read, rejected by reason, excluded,
//! and per group the row count and the sums. Rows are not placed (the grouping has no order).
//!
//! With per-person clipping ([`AggregateSpec::person`]) values are not clipped a row; two more
//! functions give each counted row's person ([`PERSON_UDF`]) and group ([`GROUP_UDF`]), and the
//! plan sums each person's rows per group, keeps each person's first group (the first of the
//! job's groups its rows carry: the lowest index), clips that group's sums, and adds them up per
//! group with the persons counted and the rows left out ([`crate::data::source::frame`]). No
//! person's identifier comes back to the node.

use std::sync::Arc;

use cleanroom_circuits::aggregate::{GroupDomain, clip, parse_group_integer};
use datafusion::arrow::array::{ArrayRef, BinaryBuilder, Int64Builder};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use zeroize::Zeroizing;

use super::cluster_lines::{LineLayout, decode_lines, encode_lines};
use super::cluster_pass::{
    ForgetSpec, Reader, Rows, SealingKey, decode_forget, decode_labels, encode_forget,
    encode_labels, is_forgotten, text_columns,
};
use super::dataset::is_consent;
use super::source::Malformed;

/// The cell function's name in plans.
pub const CELL_UDF: &str = "cleanroom_aggregate_cell";
/// The value function's name in plans.
pub const VALUE_UDF: &str = "cleanroom_aggregate_value";
/// The person function's name in plans (per-person clipping).
pub const PERSON_UDF: &str = "cleanroom_aggregate_person";
/// The group function's name in plans (per-person clipping).
pub const GROUP_UDF: &str = "cleanroom_aggregate_group";

/// Binds a sealed spec to its use.
const AAD: &[u8] = b"cleanroom executor aggregate v1";

/// The spec's encoding version.
const SPEC_VERSION: u8 = 2;

/// What the executors need for one aggregate's pass.
#[derive(Debug)]
pub struct AggregateSpec {
    /// The groups: listed labels or an integer range; anything else is "(other)".
    pub domain: GroupDomain,
    /// Each summed column's bounds; a row's value is clipped to them (per person: each
    /// person's sum, in the plan).
    pub bounds: Vec<(i64, i64)>,
    /// Per-person clipping: a person column follows the summed columns; a row without a
    /// person is rejected, and values are not clipped a row.
    pub person: bool,
    /// Whether a consent column follows the summed columns.
    pub consent: bool,
    /// When subjects are forgotten: the deletion list and every declared identifier.
    pub forget: Option<ForgetSpec>,
    /// CSV read line by line: the functions take the line and split it.
    pub lines: Option<LineLayout>,
}

impl AggregateSpec {
    /// How many columns the functions read: the group, the summed columns, the person's, the
    /// filters'.
    fn reads(&self) -> usize {
        1 + self.bounds.len()
            + usize::from(self.person)
            + usize::from(self.consent)
            + self.forget.as_ref().map_or(0, |f| f.parts.len())
    }

    /// How many columns the functions take after their leading arguments.
    fn columns(&self) -> usize {
        match self.lines {
            Some(_) => 1,
            None => self.reads(),
        }
    }

    /// The spec sealed under `key`: the functions' first argument.
    pub fn seal(&self, key: &SealingKey) -> Result<Vec<u8>, String> {
        key.seal(AAD, &self.encode()?)
    }

    fn encode(&self) -> Result<Zeroizing<Vec<u8>>, String> {
        let mut out = Zeroizing::new(Vec::with_capacity(128));
        out.push(SPEC_VERSION);
        match &self.domain {
            GroupDomain::Labels(labels) => {
                out.push(0);
                encode_labels(&mut out, labels)?;
            }
            GroupDomain::Range { lo, hi } => {
                out.push(1);
                out.extend_from_slice(&lo.to_le_bytes());
                out.extend_from_slice(&hi.to_le_bytes());
            }
        }
        let n = u16::try_from(self.bounds.len()).map_err(|_| "too many summed columns")?;
        out.extend_from_slice(&n.to_le_bytes());
        for (min, max) in &self.bounds {
            out.extend_from_slice(&min.to_le_bytes());
            out.extend_from_slice(&max.to_le_bytes());
        }
        out.push(u8::from(self.person));
        out.push(u8::from(self.consent));
        encode_forget(&mut out, self.forget.as_ref())?;
        encode_lines(&mut out, self.lines.as_ref())?;
        Ok(out)
    }

    fn decode(bytes: &[u8]) -> Option<AggregateSpec> {
        let mut r = Reader(bytes);
        if r.byte()? != SPEC_VERSION {
            return None;
        }
        let domain = match r.byte()? {
            0 => GroupDomain::Labels(decode_labels(&mut r)?),
            1 => {
                let lo = i64::from_le_bytes(r.array()?);
                let hi = i64::from_le_bytes(r.array()?);
                GroupDomain::range(lo, hi).ok()?
            }
            _ => return None,
        };
        let n = u16::from_le_bytes(r.array()?);
        let bounds = (0..n)
            .map(|_| {
                Some((
                    i64::from_le_bytes(r.array()?),
                    i64::from_le_bytes(r.array()?),
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        let person = r.flag()?;
        let consent = r.flag()?;
        let forget = decode_forget(&mut r)?;
        let lines = decode_lines(&mut r)?;
        let spec = AggregateSpec {
            domain,
            bounds,
            person,
            consent,
            forget,
            lines,
        };
        let layout_fits = spec
            .lines
            .as_ref()
            .is_none_or(|l| l.columns() == spec.reads());
        (r.0.is_empty() && layout_fits).then_some(spec)
    }
}

/// Where one row goes: why it is left out, or the group it counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Cell {
    /// Not read at all (see [`Malformed`]; a field count's figures are not kept).
    Malformed(MalformedKind),
    /// The consent column does not say yes.
    NoConsent,
    /// An identifier of the row belongs to a forgotten subject.
    Forgotten,
    /// A value is missing or not an integer, or (integer groups) the group is not one.
    Rejected,
    /// Counted, in this group.
    Counted(u32),
}

/// A malformed row's reason, without the row's particulars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum MalformedKind {
    FieldCount,
    LineBreak,
    StrayQuote,
    OpenQuote,
    NotJsonObject,
    NotOneValue,
    LineTooLong,
}

impl From<Malformed> for MalformedKind {
    fn from(m: Malformed) -> MalformedKind {
        match m {
            Malformed::FieldCount { .. } => MalformedKind::FieldCount,
            Malformed::LineBreak => MalformedKind::LineBreak,
            Malformed::StrayQuote => MalformedKind::StrayQuote,
            Malformed::OpenQuote => MalformedKind::OpenQuote,
            Malformed::NotJsonObject => MalformedKind::NotJsonObject,
            Malformed::NotOneValue => MalformedKind::NotOneValue,
            Malformed::LineTooLong => MalformedKind::LineTooLong,
        }
    }
}

impl Cell {
    fn encode(self) -> Vec<u8> {
        match self {
            Cell::Malformed(kind) => vec![
                1,
                match kind {
                    MalformedKind::FieldCount => 1,
                    MalformedKind::LineBreak => 2,
                    MalformedKind::StrayQuote => 3,
                    MalformedKind::OpenQuote => 4,
                    MalformedKind::NotJsonObject => 5,
                    MalformedKind::NotOneValue => 6,
                    MalformedKind::LineTooLong => 7,
                },
            ],
            Cell::NoConsent => vec![2],
            Cell::Forgotten => vec![3],
            Cell::Rejected => vec![4],
            Cell::Counted(group) => {
                let mut out = vec![5];
                out.extend_from_slice(&group.to_le_bytes());
                out
            }
        }
    }

    /// Reads a cell; `None` if the bytes are not one (an executor of another version).
    pub(crate) fn decode(bytes: &[u8]) -> Option<Cell> {
        let mut r = Reader(bytes);
        let cell = match r.byte()? {
            1 => Cell::Malformed(match r.byte()? {
                1 => MalformedKind::FieldCount,
                2 => MalformedKind::LineBreak,
                3 => MalformedKind::StrayQuote,
                4 => MalformedKind::OpenQuote,
                5 => MalformedKind::NotJsonObject,
                6 => MalformedKind::NotOneValue,
                7 => MalformedKind::LineTooLong,
                _ => return None,
            }),
            2 => Cell::NoConsent,
            3 => Cell::Forgotten,
            4 => Cell::Rejected,
            5 => Cell::Counted(u32::from_le_bytes(r.array()?)),
            _ => return None,
        };
        r.0.is_empty().then_some(cell)
    }
}

/// The row's cell, and its clipped values in `values` when it is counted (per person: its
/// values as they are): the node's own checks, in its order (malformed, consent, forgotten,
/// then values, group and person).
fn classify(spec: &AggregateSpec, rows: &mut Rows<'_>, row: usize, values: &mut [i64]) -> Cell {
    if let Some((_, why)) = rows.load(row) {
        return Cell::Malformed(why.into());
    }
    let field = |c: usize| rows.field(row, c);
    let sums = spec.bounds.len();
    let consent_at = 1 + sums + usize::from(spec.person);
    let forget_at = consent_at + usize::from(spec.consent);
    if spec.consent && !field(consent_at).is_some_and(is_consent) {
        return Cell::NoConsent;
    }
    if let Some(forget) = &spec.forget
        && is_forgotten(forget, forget_at, field)
    {
        return Cell::Forgotten;
    }
    for (i, (min, max)) in spec.bounds.iter().enumerate() {
        let parsed = field(1 + i).and_then(super::value::parse_value);
        let Some(v) = parsed else {
            return Cell::Rejected;
        };
        values[i] = if spec.person { v } else { clip(v, *min, *max) };
    }
    let group = match &spec.domain {
        GroupDomain::Range { .. } => match field(0).and_then(parse_group_integer) {
            Some(v) => spec.domain.group_of_integer(v),
            None => return Cell::Rejected,
        },
        GroupDomain::Labels(labels) => {
            let label = field(0).map(<[u8]>::trim_ascii).unwrap_or_default();
            labels
                .iter()
                .position(|l| l.as_bytes() == label)
                .unwrap_or(spec.domain.other())
        }
    };
    if spec.person && person_of(spec, rows, row).is_none() {
        return Cell::Rejected;
    }
    // Fits: a domain has at most a few thousand groups.
    Cell::Counted(group as u32)
}

/// The row's person, trimmed; `None` if the spec has none or the field is empty.
fn person_of<'a>(spec: &AggregateSpec, rows: &'a Rows<'_>, row: usize) -> Option<&'a [u8]> {
    if !spec.person {
        return None;
    }
    let person = rows.field(row, 1 + spec.bounds.len())?.trim_ascii();
    (!person.is_empty()).then_some(person)
}

/// Which of the two functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Output {
    /// Each row's [`Cell`], encoded.
    Cell,
    /// One summed column's clipped value (its index the second argument); per person, its
    /// value as it is.
    Value,
    /// Per person: what a row is summed under: a counted row's person (`1` then the person),
    /// any other row's cell (`0` then the cell), so rows left out count by reason.
    Person,
    /// Per person: a counted row's group index (0 for any other row).
    Group,
}

/// Every output, in the order [`AggregateUdf::planners`] gives them.
const OUTPUTS: [Output; 4] = [Output::Cell, Output::Value, Output::Person, Output::Group];

/// The aggregate's functions. The node and the scheduler hold them without a key (to plan and
/// to decode plans); an executor holds the [`SealingKey`] and runs them.
#[derive(Debug)]
pub struct AggregateUdf {
    output: Output,
    signature: Signature,
    key: Option<Arc<SealingKey>>,
}

impl PartialEq for AggregateUdf {
    fn eq(&self, other: &Self) -> bool {
        self.output == other.output
            && match (&self.key, &other.key) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}
impl Eq for AggregateUdf {}
impl std::hash::Hash for AggregateUdf {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.output.hash(state);
        self.key.as_ref().map(Arc::as_ptr).hash(state);
    }
}

impl AggregateUdf {
    /// The functions as the node and the scheduler hold them: they plan, they never run.
    pub fn planners() -> [ScalarUDF; 4] {
        OUTPUTS.map(|output| Self::with(output, None))
    }

    /// The functions as an executor holds them, with the key it opens specs with.
    pub fn executors(key: &Arc<SealingKey>) -> [ScalarUDF; 4] {
        OUTPUTS.map(|output| Self::with(output, Some(Arc::clone(key))))
    }

    /// One function, as the node plans with it.
    pub(crate) fn planner(output: Output) -> ScalarUDF {
        Self::with(output, None)
    }

    fn with(output: Output, key: Option<Arc<SealingKey>>) -> ScalarUDF {
        ScalarUDF::new_from_impl(AggregateUdf {
            output,
            signature: Signature::variadic_any(Volatility::Volatile),
            key,
        })
    }
}

impl ScalarUDFImpl for AggregateUdf {
    fn name(&self) -> &str {
        match self.output {
            Output::Cell => CELL_UDF,
            Output::Value => VALUE_UDF,
            Output::Person => PERSON_UDF,
            Output::Group => GROUP_UDF,
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(match self.output {
            Output::Cell | Output::Person => DataType::Binary,
            Output::Value | Output::Group => DataType::Int64,
        })
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let name = self.name().to_owned();
        let fail = |m: &str| DataFusionError::Execution(format!("{name}: {m}"));
        let Some(key) = &self.key else {
            return Err(fail(
                "this process holds no sealing key (run the pass on a `cleanroom executor` \
                 started with --sealing-key)",
            ));
        };
        let (sealed, rest) = args
            .args
            .split_first()
            .ok_or_else(|| fail("no sealed spec"))?;
        let ColumnarValue::Scalar(ScalarValue::Binary(Some(sealed))) = sealed else {
            return Err(fail("the first argument is not a sealed spec"));
        };
        let (index, columns) = match self.output {
            Output::Cell | Output::Person | Output::Group => (None, rest),
            Output::Value => match rest.split_first() {
                Some((ColumnarValue::Scalar(ScalarValue::Int64(Some(i))), columns)) => {
                    let i = usize::try_from(*i)
                        .map_err(|_| fail("the second argument is not a column index"))?;
                    (Some(i), columns)
                }
                _ => return Err(fail("the second argument is not a column index")),
            },
        };
        let plain = key.open(AAD, sealed).ok_or_else(|| {
            fail("the spec does not open with this executor's sealing key (the node's engine.sealing_key and the executor's --sealing-key must be the same key)")
        })?;
        let spec = AggregateSpec::decode(&plain).ok_or_else(|| {
            fail("the spec is not one this executor reads (a node of another version?)")
        })?;
        drop(plain);
        if columns.len() != spec.columns() {
            return Err(fail("the plan's columns do not match its spec"));
        }
        let arrays = ColumnarValue::values_to_arrays(columns)?;
        let text = text_columns(&arrays).ok_or_else(|| fail("a column is not text"))?;
        let mut rows = Rows::of(spec.lines.as_ref(), text).map_err(fail)?;
        let mut values = vec![0i64; spec.bounds.len()];
        let out: ArrayRef = match (self.output, index) {
            (Output::Cell, _) => {
                let mut out = BinaryBuilder::with_capacity(args.number_rows, 5 * args.number_rows);
                for row in 0..args.number_rows {
                    out.append_value(classify(&spec, &mut rows, row, &mut values).encode());
                }
                Arc::new(out.finish())
            }
            (Output::Person, _) => {
                if !spec.person {
                    return Err(fail("the spec has no person column"));
                }
                let mut out = BinaryBuilder::with_capacity(args.number_rows, 9 * args.number_rows);
                let mut key = Vec::new();
                for row in 0..args.number_rows {
                    key.clear();
                    match classify(&spec, &mut rows, row, &mut values) {
                        Cell::Counted(_) => {
                            key.push(1);
                            key.extend_from_slice(person_of(&spec, &rows, row).unwrap_or_default());
                        }
                        cell => {
                            key.push(0);
                            key.extend_from_slice(&cell.encode());
                        }
                    }
                    out.append_value(&key);
                }
                Arc::new(out.finish())
            }
            (Output::Group, _) => {
                let mut out = Int64Builder::with_capacity(args.number_rows);
                for row in 0..args.number_rows {
                    out.append_value(match classify(&spec, &mut rows, row, &mut values) {
                        Cell::Counted(group) => i64::from(group),
                        _ => 0,
                    });
                }
                Arc::new(out.finish())
            }
            (Output::Value, Some(i)) if i < values.len() => {
                let mut out = Int64Builder::with_capacity(args.number_rows);
                for row in 0..args.number_rows {
                    out.append_value(match classify(&spec, &mut rows, row, &mut values) {
                        Cell::Counted(_) => values[i],
                        _ => 0,
                    });
                }
                Arc::new(out.finish())
            }
            (Output::Value, _) => {
                return Err(fail("the column index is past the spec's summed columns"));
            }
        };
        Ok(ColumnarValue::Array(out))
    }
}

#[cfg(test)]
#[path = "cluster_aggregate_tests.rs"]
mod tests;
