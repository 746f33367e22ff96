//! An overlap-sum value holder's pass on the partner's executors, grouped there by point: the
//! executors combine each identifier's rows, so one row per distinct point comes back to the
//! node instead of one per row.
//!
//! Over the pass function's outcome ([`super::cluster_pass`], computed once a row in the plan's
//! projection), two functions that hold no key and read only the outcome they are given:
//! [`KEY_UDF`] gives what the row is grouped by (a valued row's point; any other outcome as it
//! is, so rows left out are counted by reason), and [`FIELD_UDF`] a valued row's group (field 0)
//! or one of its values (field `i ≥ 1`), null for any other outcome. The plan is
//!
//! ```text
//! SELECT key(o), count(*), min(field(o, 0)), max(field(o, 0)), sum(field(o, 1)), …
//! FROM (SELECT cleanroom_pass(…) AS o FROM dataset) GROUP BY key(o)
//! ```
//!
//! Per point the node gets its rows' lowest and highest group (the identifier counts in the
//! first of the job's groups its rows carry; two differ when its rows carry several labels) and
//! each value's exact sum, which it clips. Rows left out have no place (the grouping has no
//! order).

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, BinaryArray, BinaryBuilder, Int64Builder};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

use super::cluster_pass::{grouping_key, valued_field};

/// The grouping key function's name in plans.
pub const KEY_UDF: &str = "cleanroom_outcome_key";
/// The field function's name in plans.
pub const FIELD_UDF: &str = "cleanroom_outcome_field";

/// Both functions, for the node's plans and the scheduler's and executors' registries.
pub fn functions() -> [ScalarUDF; 2] {
    [
        ScalarUDF::new_from_impl(OutcomeUdf::new(Output::Key)),
        ScalarUDF::new_from_impl(OutcomeUdf::new(Output::Field)),
    ]
}

/// Which function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Output {
    Key,
    Field,
}

/// One of the two functions over an outcome.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct OutcomeUdf {
    output: Output,
    signature: Signature,
}

impl OutcomeUdf {
    pub(crate) fn new(output: Output) -> Self {
        OutcomeUdf {
            output,
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for OutcomeUdf {
    fn name(&self) -> &str {
        match self.output {
            Output::Key => KEY_UDF,
            Output::Field => FIELD_UDF,
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(match self.output {
            Output::Key => DataType::Binary,
            Output::Field => DataType::Int64,
        })
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let name = self.name();
        let fail = |m: &str| DataFusionError::Execution(format!("{name}: {m}"));
        let (outcome, field) = match (self.output, args.args.as_slice()) {
            (Output::Key, [outcome]) => (outcome, None),
            (Output::Field, [outcome, ColumnarValue::Scalar(ScalarValue::Int64(Some(i)))]) => {
                let i = usize::try_from(*i).map_err(|_| fail("the field is not an index"))?;
                (outcome, Some(i))
            }
            _ => return Err(fail("the arguments do not match the function")),
        };
        let outcomes = outcome.to_array(args.number_rows)?;
        let outcomes = outcomes
            .as_any()
            .downcast_ref::<BinaryArray>()
            .ok_or_else(|| fail("the outcome is not binary"))?;
        let out: ArrayRef = match field {
            None => {
                let mut out = BinaryBuilder::with_capacity(outcomes.len(), outcomes.len() * 33);
                let mut key = Vec::new();
                for row in 0..outcomes.len() {
                    if outcomes.is_null(row) {
                        out.append_null();
                        continue;
                    }
                    grouping_key(outcomes.value(row), &mut key);
                    out.append_value(&key);
                }
                Arc::new(out.finish())
            }
            Some(i) => {
                let mut out = Int64Builder::with_capacity(outcomes.len());
                for row in 0..outcomes.len() {
                    out.append_option(
                        outcomes
                            .is_valid(row)
                            .then(|| valued_field(outcomes.value(row), i))
                            .flatten(),
                    );
                }
                Arc::new(out.finish())
            }
        };
        Ok(ColumnarValue::Array(out))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::data::cluster_pass::Outcome;
    use datafusion::arrow::datatypes::Field;
    use datafusion::config::ConfigOptions;

    fn call(output: Output, outcomes: &[&[u8]], field: Option<i64>) -> ArrayRef {
        let mut args = vec![ColumnarValue::Array(Arc::new(BinaryArray::from(
            outcomes.to_vec(),
        )))];
        args.extend(field.map(|i| ColumnarValue::Scalar(ScalarValue::Int64(Some(i)))));
        let arg_fields = (0..args.len())
            .map(|i| Arc::new(Field::new(format!("a{i}"), DataType::Binary, true)))
            .collect();
        let udf = OutcomeUdf::new(output);
        let kind = udf.return_type(&[]).unwrap();
        let ColumnarValue::Array(out) = udf
            .invoke_with_args(ScalarFunctionArgs {
                args,
                arg_fields,
                number_rows: outcomes.len(),
                return_field: Arc::new(Field::new("out", kind, true)),
                config_options: Arc::new(ConfigOptions::default()),
            })
            .unwrap()
        else {
            panic!("an array")
        };
        out
    }

    /// A valued row groups by its point alone (as an accepted row's outcome), and gives its
    /// group and values; any other outcome groups as it is and gives no field.
    #[test]
    fn a_valued_row_groups_by_its_point_and_gives_its_group_and_values() {
        let point = [7u8; 32];
        let mut valued = vec![6u8];
        valued.extend_from_slice(&point);
        valued.extend_from_slice(&2u32.to_le_bytes());
        valued.extend_from_slice(&(-40i64).to_le_bytes());
        valued.extend_from_slice(&i64::MAX.to_le_bytes());
        assert_eq!(
            Outcome::decode(&valued),
            Some(Outcome::Valued(point, 2, vec![-40, i64::MAX]))
        );
        let no_consent: &[u8] = &[2];
        let keys = call(Output::Key, &[&valued, no_consent], None);
        let keys = keys.as_any().downcast_ref::<BinaryArray>().unwrap();
        assert_eq!(
            Outcome::decode(keys.value(0)),
            Some(Outcome::Accepted(point))
        );
        assert_eq!(keys.value(1), no_consent);
        let field = |i: i64| {
            let out = call(Output::Field, &[&valued, no_consent], Some(i));
            let out = out
                .as_any()
                .downcast_ref::<datafusion::arrow::array::Int64Array>()
                .unwrap()
                .clone();
            (0..2)
                .map(|r| out.is_valid(r).then(|| out.value(r)))
                .collect::<Vec<_>>()
        };
        assert_eq!(field(0), [Some(2), None]);
        assert_eq!(field(1), [Some(-40), None]);
        assert_eq!(field(2), [Some(i64::MAX), None]);
        // A field past the row's values, or a cut-off outcome, gives none.
        assert_eq!(field(3), [None, None]);
        assert_eq!(valued_field(&valued[..40], 1), None);
    }

    /// The grouped plan runs the pass once a row: in a projection of its own, below the
    /// grouping, however many of the grouping's figures read its outcome.
    #[tokio::test]
    async fn the_pass_runs_once_a_row_in_the_grouped_plan() {
        use datafusion::arrow::array::{RecordBatch, StringArray};
        use datafusion::physical_plan::displayable;
        use datafusion::prelude::{SessionContext, col, lit};
        let ctx = SessionContext::new();
        let batch = RecordBatch::try_from_iter(vec![(
            "email",
            Arc::new(StringArray::from(vec!["a@x.com", "b@x.com"])) as ArrayRef,
        )])
        .unwrap();
        let frame = ctx.read_batch(batch).unwrap();
        let args = vec![lit(ScalarValue::Binary(Some(vec![1, 2, 3]))), col("email")];
        let grouped = crate::data::source::frame::grouped_by_point(frame, args, 3).unwrap();
        let plan = grouped.create_physical_plan().await.unwrap();
        let shown = displayable(plan.as_ref()).indent(true).to_string();
        assert_eq!(shown.matches("cleanroom_pass(").count(), 1, "{shown}");
        // Every figure reads the outcome: the key, the count, two groups and three sums.
        assert!(
            shown.matches("cleanroom_outcome_field(").count() >= 5,
            "{shown}"
        );
    }
}
