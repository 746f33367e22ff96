//! Nested columns. A Parquet or JSON struct's fields are columns named by their path
//! (`contact.email`, `contact.address.city`), so a dataset names a field as it names any
//! column. A view's select list that takes a field (`contact['email']`, `contact.email`) reads
//! that field's path, not the whole struct, so an agreement can permit one field of a struct
//! without the others.

use datafusion::arrow::datatypes::{DataType, Field};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, ScalarValue};
use datafusion::functions::core::expr_fn::get_field;
use datafusion::prelude::{DataFrame, Expr};

/// Deepest struct flattened; a struct nested deeper stays one column.
const MAX_DEPTH: usize = 8;

/// `frame` with each struct column replaced, in place, by its fields, each a column named by
/// its path, recursively; every other column as it was. A frame without a struct comes back
/// unchanged.
pub fn flatten_structs(frame: DataFrame) -> datafusion::error::Result<DataFrame> {
    let schema = frame.schema();
    if !schema
        .fields()
        .iter()
        .any(|f| matches!(f.data_type(), DataType::Struct(_)))
    {
        return Ok(frame);
    }
    let mut columns = Vec::with_capacity(schema.fields().len());
    for (qualifier, field) in schema.iter() {
        let column = Expr::Column(Column::from((qualifier, field)));
        push_leaves(column, field, field.name(), 0, &mut columns);
    }
    frame.select(columns)
}

/// Pushes `expr` (of `field`, at `path`) as one column, or, for a struct, each of its fields.
fn push_leaves(expr: Expr, field: &Field, path: &str, depth: usize, out: &mut Vec<Expr>) {
    match field.data_type() {
        DataType::Struct(fields) if depth < MAX_DEPTH => {
            for child in fields {
                let taken = get_field(expr.clone(), child.name().as_str());
                let path = format!("{path}.{}", child.name());
                push_leaves(taken, child, &path, depth + 1, out);
            }
        }
        _ if depth == 0 => out.push(expr),
        _ => out.push(expr.alias(path)),
    }
}

/// What a column of `kind` holds when it is not one value: "list", "map", "struct" or "union";
/// `None` for a scalar.
pub fn many_values(kind: &DataType) -> Option<&'static str> {
    match kind {
        DataType::List(_)
        | DataType::LargeList(_)
        | DataType::FixedSizeList(..)
        | DataType::ListView(_)
        | DataType::LargeListView(_) => Some("list"),
        DataType::Map(..) => Some("map"),
        DataType::Struct(_) => Some("struct"),
        DataType::Union(..) => Some("union"),
        DataType::Dictionary(_, values) => many_values(values),
        _ => None,
    }
}

/// What `expr` reads of the columns in `base`: a column's name, or, where it takes a field of
/// a struct column, that field's path (`contact['email']` reads `contact.email`). Inserted
/// into `reads`.
pub fn reads_of(
    expr: &Expr,
    base: &std::collections::BTreeSet<String>,
    reads: &mut std::collections::BTreeSet<String>,
) -> datafusion::error::Result<()> {
    expr.apply(|node| {
        if let Some((root, path)) = field_path(node)
            && base.contains(&root)
        {
            reads.insert(path);
            return Ok(TreeNodeRecursion::Jump);
        }
        if let Expr::Column(column) = node
            && base.contains(&column.name)
        {
            reads.insert(column.name.clone());
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(())
}

/// For a field taken from a column (`get_field(contact, 'address', 'city')`, or one
/// `get_field` inside another): the column's name and the field's path.
fn field_path(expr: &Expr) -> Option<(String, String)> {
    let Expr::ScalarFunction(call) = expr else {
        return None;
    };
    if call.name() != "get_field" {
        return None;
    }
    let (from, names) = call.args.split_first()?;
    let (root, mut path) = match from {
        Expr::Column(column) => (column.name.clone(), column.name.clone()),
        inner => field_path(inner)?,
    };
    if names.is_empty() {
        return None;
    }
    for name in names {
        let Expr::Literal(
            ScalarValue::Utf8(Some(name))
            | ScalarValue::LargeUtf8(Some(name))
            | ScalarValue::Utf8View(Some(name)),
            _,
        ) = name
        else {
            // A field chosen at run time could be any of them.
            return None;
        };
        path.push('.');
        path.push_str(name);
    }
    Some((root, path))
}
