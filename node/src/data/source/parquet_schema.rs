//! One schema for Parquet files written by different writers over time.
//!
//! DataFusion merges the files' schemas and fails when one column has two types: an `INT32`
//! amount in older files and an `INT64` one in newer files, or a string one writer marks as a
//! large string and another as a string view. A lake fed by more than one tool has such
//! files. Here each file's schema is read on its own, and each column gets one type its
//! values all convert to ([`common_type`]); the engine converts each file's column as it reads
//! it. Only used when the engine's own merge fails, so other tables read as before.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Fields, Schema};
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::ListingTableUrl;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;

/// Files whose footers are read to make the schema; a dataset of more is refused here (the
/// engine's merge error then stands).
const MAX_FILES: usize = 100_000;

/// The schema of the Parquet files at `location` (a file, a directory or a glob, with
/// `extension`): each column in the order first seen (files in path order), of the type
/// every file's values of it convert to, nullable (a file may lack it).
pub(super) async fn unified_schema(
    ctx: &SessionContext,
    location: &str,
    extension: &str,
) -> Result<Schema, String> {
    let url = ListingTableUrl::parse(location).map_err(|e| e.to_string())?;
    let state = ctx.state();
    let store = state
        .runtime_env()
        .object_store(&url)
        .map_err(|e| e.to_string())?;
    let mut objects: Vec<_> = url
        .list_all_files(&state, store.as_ref(), extension)
        .await
        .map_err(|e| e.to_string())?
        .try_collect()
        .await
        .map_err(|e| e.to_string())?;
    if objects.len() > MAX_FILES {
        return Err(format!("more than {MAX_FILES} files"));
    }
    objects.sort_by(|a, b| a.location.cmp(&b.location));
    let format = ParquetFormat::default().with_options(state.table_options().parquet.clone());
    let mut columns: Vec<(String, Vec<DataType>)> = Vec::new();
    for object in objects {
        let schema = format
            .infer_schema(&state, &store, std::slice::from_ref(&object))
            .await
            .map_err(|e| e.to_string())?;
        for field in schema.fields() {
            match columns.iter_mut().find(|(name, _)| name == field.name()) {
                Some((_, types)) => types.push(field.data_type().clone()),
                None => columns.push((field.name().clone(), vec![field.data_type().clone()])),
            }
        }
    }
    Ok(Schema::new(
        columns
            .into_iter()
            .map(|(name, types)| Arc::new(Field::new(name, common_type(&types), true)))
            .collect::<Vec<_>>(),
    ))
}

/// A type the values of every one of `types` convert to without loss where one exists:
/// the type itself when all agree; `Int64` for integers (`UInt64` aside); `Float64` for
/// integers and floats; for structs, a struct of every field any of them has, each field of its
/// own common type (a field whose type drifts does not make the whole struct text, so its other
/// fields stay columns of their own); else text, which any value converts to, and which is how
/// the node reads every column anyway.
pub(super) fn common_type(types: &[DataType]) -> DataType {
    let Some(first) = types.first() else {
        return DataType::Utf8View;
    };
    if types.iter().all(|t| t == first) {
        return first.clone();
    }
    if types.iter().all(fits_int64) {
        return DataType::Int64;
    }
    if types.iter().all(|t| fits_int64(t) || t.is_floating()) {
        return DataType::Float64;
    }
    if types.iter().all(|t| matches!(t, DataType::Struct(_))) {
        return merged_struct(types);
    }
    DataType::Utf8View
}

/// The struct of every field of `structs` (each a `DataType::Struct`), in the order first
/// seen, each of the common type of its types, nullable (a struct may lack it).
fn merged_struct(structs: &[DataType]) -> DataType {
    let mut fields: Vec<(String, Vec<DataType>)> = Vec::new();
    for t in structs {
        let DataType::Struct(children) = t else {
            continue;
        };
        for child in children {
            match fields.iter_mut().find(|(name, _)| name == child.name()) {
                Some((_, types)) => types.push(child.data_type().clone()),
                None => fields.push((child.name().clone(), vec![child.data_type().clone()])),
            }
        }
    }
    DataType::Struct(
        fields
            .into_iter()
            .map(|(name, types)| Field::new(name, common_type(&types), true))
            .collect(),
    )
}

/// Whether `fields` and the fields of every struct among them, however deep, are nullable.
pub(super) fn all_nullable(fields: &Fields) -> bool {
    fields.iter().all(|f| {
        f.is_nullable()
            && match f.data_type() {
                DataType::Struct(children) => all_nullable(children),
                _ => true,
            }
    })
}

/// `field` nullable, and the fields of its structs, however deep.
pub(super) fn nullable(field: &Field) -> Field {
    let kind = match field.data_type() {
        DataType::Struct(children) => {
            DataType::Struct(children.iter().map(|c| nullable(c)).collect())
        }
        other => other.clone(),
    };
    field.clone().with_data_type(kind).with_nullable(true)
}

/// Whether every value of `t` is an `Int64`.
fn fits_int64(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_column_gets_a_type_all_its_values_convert_to() {
        use DataType::*;
        assert_eq!(common_type(&[Int32, Int32]), Int32);
        assert_eq!(common_type(&[Int32, Int64, UInt16]), Int64);
        assert_eq!(common_type(&[Int32, Float32]), Float64);
        assert_eq!(common_type(&[UInt64, Int64]), Utf8View);
        assert_eq!(common_type(&[Int64, Utf8View]), Utf8View);
        assert_eq!(common_type(&[Decimal128(10, 2), Int64]), Utf8View);
        let old = Struct(Fields::from(vec![Field::new("email", Utf8View, true)]));
        let new = Struct(Fields::from(vec![
            Field::new("email", Utf8View, true),
            Field::new("phone", Utf8View, true),
        ]));
        assert_eq!(common_type(&[old.clone(), new.clone()]), new);
        // A field whose type drifts takes its own common type; the struct stays a struct.
        let clash = Struct(Fields::from(vec![
            Field::new("email", Int64, true),
            Field::new("since", Int32, false),
        ]));
        let later = Struct(Fields::from(vec![
            Field::new("email", Utf8View, true),
            Field::new("since", Int64, false),
            Field::new("country", Utf8View, false),
        ]));
        assert_eq!(
            common_type(&[old, clash, later]),
            Struct(Fields::from(vec![
                Field::new("email", Utf8View, true),
                Field::new("since", Int64, true),
                Field::new("country", Utf8View, true),
            ]))
        );
    }
}
