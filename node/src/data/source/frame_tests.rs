//! Datasets read through DataFusion, end to end through the dataset passes: Parquet with
//! nullable and nested columns, JSON lines, directories and globs, SQL views.

use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Int64Array, ListBuilder, StringArray, StringBuilder, StructArray,
};
use datafusion::arrow::datatypes::{DataType, Field};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;

use crate::data::dataset::{self, KeySpec, RowFilter};
use crate::data::normalise::Normaliser;
use crate::data::{DataFormat, DatasetConfig, Delimiter, IdentifierConfig, TableConfig};

/// Eight customers: ids 1..=8; emails with a null (3), an empty one (5), a case/space variant
/// of 1 (row 2), one that does not normalise (7); consent false on 4; a nested `contact`
/// struct (with a phone) and a list column the jobs never read.
fn customers() -> RecordBatch {
    let id = Int64Array::from((1..=8).collect::<Vec<i64>>());
    let email = StringArray::from(vec![
        Some("alice@example.com"),
        Some("  ALICE@Example.com "),
        None,
        Some("dave@example.com"),
        Some(""),
        Some("frank@example.com"),
        Some("not an email"),
        Some("heidi@example.com"),
    ]);
    let amount = Int64Array::from(vec![
        Some(10),
        Some(20),
        Some(30),
        None,
        Some(50),
        Some(60),
        Some(70),
        Some(80),
    ]);
    let consent = BooleanArray::from(vec![true, true, true, false, true, true, true, true]);
    let phone = StringArray::from(vec!["+14155550100"; 8]);
    let contact = StructArray::from(vec![(
        Arc::new(Field::new("phone", DataType::Utf8, true)),
        Arc::new(phone) as ArrayRef,
    )]);
    let mut tags = ListBuilder::new(StringBuilder::new());
    for i in 0..8 {
        tags.values().append_value(format!("t{i}"));
        tags.append(i % 2 == 0);
    }
    RecordBatch::try_from_iter(vec![
        ("customer_id", Arc::new(id) as ArrayRef),
        ("email", Arc::new(email) as ArrayRef),
        ("amount_cents", Arc::new(amount) as ArrayRef),
        ("consent_fraud", Arc::new(consent) as ArrayRef),
        ("contact", Arc::new(contact) as ArrayRef),
        ("tags", Arc::new(tags.finish()) as ArrayRef),
    ])
    .unwrap()
}

/// The distinct keys of [`customers`] with consent: rows 1 and 2 (one key), 6 and 8.
const CONSENTED_KEYS: [&str; 3] = [
    "alice@example.com",
    "frank@example.com",
    "heidi@example.com",
];

fn write_parquet(path: &Path, batch: &RecordBatch) {
    let file = std::fs::File::create(path).unwrap();
    let mut writer = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(batch).unwrap();
    writer.close().unwrap();
}

fn email_dataset(path: &Path) -> DatasetConfig {
    let mut d = DatasetConfig::new(
        "customers",
        path.to_owned(),
        vec![IdentifierConfig::new("email", "email", Normaliser::Email)],
    );
    d.consent
        .insert("fraud-detection".into(), "consent_fraud".into());
    d
}

fn keys_of(d: &DatasetConfig, consent: Option<&str>) -> (Vec<String>, dataset::LoadedKeys) {
    let filter = RowFilter {
        consent_column: consent,
        forgotten: None,
    };
    let loaded = dataset::load_keys_for(d, &KeySpec::new(["email"]), filter, 1000).unwrap();
    let items = loaded
        .items
        .iter()
        .map(|k| String::from_utf8(k.to_vec()).unwrap())
        .collect();
    (items, loaded)
}

#[test]
fn parquet_with_nullable_and_nested_columns_reads_keys_and_rejects_nulls() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("customers.parquet");
    write_parquet(&path, &customers());
    let d = email_dataset(&path);
    assert_eq!(d.format(), Some(DataFormat::Parquet));
    let (items, loaded) = keys_of(&d, Some("consent_fraud"));
    assert_eq!(items, CONSENTED_KEYS);
    assert_eq!(loaded.rows_read, 8);
    assert_eq!(loaded.rows_excluded_consent, 1);
    assert_eq!(loaded.duplicate_rows, 1);
    assert_eq!(loaded.rows_rejected, 3);
    let reasons = &loaded.rejections.by_reason;
    assert_eq!(
        reasons.get("the field is null or missing"),
        Some(&1),
        "{reasons:?}"
    );
    assert_eq!(reasons.get("the field is empty"), Some(&1), "{reasons:?}");
    // Rejections are placed by row (1-based), never by value.
    let rows: Vec<u64> = loaded.rejections.first.iter().map(|r| r.line).collect();
    assert_eq!(rows, [3, 5, 7]);
    let text = format!("{:?}", loaded.rejections);
    assert!(!text.contains("not an email"), "{text}");
}

#[test]
fn value_columns_read_as_decimal_text_and_match_maps_back_to_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("customers.parquet");
    write_parquet(&path, &customers());
    let d = email_dataset(&path);
    let mut seen = Vec::new();
    let filter = RowFilter::default();
    dataset::for_each_keyed_row_for(
        &d,
        &KeySpec::new(["email"]),
        &["amount_cents"],
        filter,
        1000,
        |row, _, fields| {
            seen.push((
                row,
                fields[0].map(|f| String::from_utf8(f.to_vec()).unwrap()),
            ));
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(
        seen,
        [
            (1, Some("10".into())),
            (2, Some("20".into())),
            (4, None),
            (6, Some("60".into())),
            (8, Some("80".into()))
        ]
    );
    let (_, loaded) = keys_of(&d, None);
    let mut matched = cleanroom_circuits::ItemSet::new();
    matched.push(b"alice@example.com").unwrap();
    let rows = dataset::matching_rows_for(&d, &KeySpec::new(["email"]), filter, &matched).unwrap();
    assert_eq!(rows, [1, 2]);
    assert_eq!(loaded.items.len(), 4);
}

/// Orders keyed by email in one Parquet file: the columns `email` and `amount`.
fn orders(dir: &Path, email: ArrayRef, amount: ArrayRef) -> DatasetConfig {
    let path = dir.join("orders.parquet");
    let batch = RecordBatch::try_from_iter(vec![("email", email), ("amount", amount)]).unwrap();
    write_parquet(&path, &batch);
    DatasetConfig::new(
        "orders",
        path,
        vec![IdentifierConfig::new("email", "email", Normaliser::Email)],
    )
}

/// Each row's `amount` as a summed value reads it.
fn amounts(d: &DatasetConfig) -> Vec<Option<i64>> {
    let mut values = Vec::new();
    dataset::for_each_row_for(d, &["amount"], RowFilter::default(), 100, |_, f| {
        values.push(f[0].and_then(crate::data::value::parse_value));
        Ok(())
    })
    .unwrap();
    values
}

/// A Parquet `DOUBLE` amount (what pandas writes for a nullable integer column): whole
/// numbers read as the integers they are, a fraction and a null as no value.
#[test]
fn a_double_value_column_reads_its_whole_numbers_as_integers() {
    use datafusion::arrow::array::Float64Array;
    let dir = tempfile::tempdir().unwrap();
    let amount = [Some(1200.0), Some(-35.0), Some(12.99), None, Some(1e15)];
    let d = orders(
        dir.path(),
        Arc::new(StringArray::from(vec!["a@x.com"; 5])),
        Arc::new(Float64Array::from(amount.to_vec())),
    );
    assert_eq!(
        amounts(&d),
        [
            Some(1200),
            Some(-35),
            None,
            None,
            Some(1_000_000_000_000_000)
        ]
    );
}

#[test]
fn json_lines_a_directory_and_a_glob_read_every_file_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let lines = dir.path().join("c.jsonl");
    std::fs::write(
        &lines,
        "{\"email\":\"a@example.com\",\"consent_fraud\":true}\n\
         {\"email\":null,\"consent_fraud\":true}\n\
         {\"consent_fraud\":true}\n\
         {\"email\":\"b@example.com\",\"consent_fraud\":false,\"extra\":{\"x\":1}}\n",
    )
    .unwrap();
    let (items, loaded) = keys_of(&email_dataset(&lines), Some("consent_fraud"));
    assert_eq!(items, ["a@example.com"]);
    assert_eq!((loaded.rows_read, loaded.rows_rejected), (4, 2));
    assert_eq!(loaded.rows_excluded_consent, 1);

    let parts = dir.path().join("parts");
    std::fs::create_dir(&parts).unwrap();
    let batch = customers();
    write_parquet(&parts.join("part-1.parquet"), &batch.slice(4, 4));
    write_parquet(&parts.join("part-0.parquet"), &batch.slice(0, 4));
    std::fs::write(parts.join("_SUCCESS"), "").unwrap();
    let mut whole = email_dataset(&parts);
    whole.format = Some(DataFormat::Parquet);
    let glob = email_dataset(&parts.join("part-*.parquet"));
    for d in [whole, glob] {
        let (items, loaded) = keys_of(&d, None);
        assert_eq!(loaded.rows_read, 8);
        assert_eq!(items.len(), 4, "{items:?}");
        let mut matched = cleanroom_circuits::ItemSet::new();
        matched.push(b"heidi@example.com").unwrap();
        let rows = dataset::matching_rows_for(
            &d,
            &KeySpec::new(["email"]),
            RowFilter::default(),
            &matched,
        )
        .unwrap();
        assert_eq!(rows, [8], "files are read in path order");
    }
}

fn view(dir: &Path, sql: &str) -> DatasetConfig {
    let path = dir.join("orders.parquet");
    write_parquet(&path, &customers());
    view_over("orders", &path, sql, Delimiter::default())
}

/// The email dataset as a SQL view `sql` over one table, `name`, at `path`.
fn view_over(name: &str, path: &Path, sql: &str, delimiter: Delimiter) -> DatasetConfig {
    let mut d = email_dataset(Path::new(""));
    d.path = Default::default();
    d.sql = Some(sql.to_owned());
    d.tables = vec![TableConfig {
        name: name.into(),
        path: path.to_owned(),
        format: None,
        delimiter,
    }];
    d
}

#[test]
fn a_sql_view_filters_renames_and_reaches_into_structs() {
    let dir = tempfile::tempdir().unwrap();
    let d = view(
        dir.path(),
        "SELECT lower(trim(email)) AS email, contact['phone'] AS phone, consent_fraud \
         FROM orders WHERE customer_id > 1",
    );
    let (items, loaded) = keys_of(&d, Some("consent_fraud"));
    assert_eq!(items, CONSENTED_KEYS);
    assert_eq!(loaded.rows_read, 7);
    let mut phones = 0;
    dataset::for_each_row_for(&d, &["phone"], RowFilter::default(), 100, |_, f| {
        assert_eq!(f[0], Some(&b"+14155550100"[..]));
        phones += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(phones, 7);
    // The view reads the struct's field, not the struct.
    let source = super::Source::open(&d).unwrap();
    assert_eq!(
        source.view_reads(),
        ["consent_fraud", "contact.phone", "email"]
    );
    let d = view(
        dir.path(),
        "SELECT email, contact.phone AS phone, contact AS whole FROM orders",
    );
    let source = super::Source::open(&d).unwrap();
    assert_eq!(source.view_reads(), ["contact", "contact.phone", "email"]);
}

/// Five customers whose `customer` is a struct: an email, and an address struct with a city.
/// Row 2's email is null, row 4's whole struct is null; a flat `amount_cents` and a list.
fn nested_customers() -> RecordBatch {
    use datafusion::arrow::array::Array;
    use datafusion::arrow::buffer::NullBuffer;
    use datafusion::arrow::datatypes::Fields;
    let email = StringArray::from(vec![
        Some("Alice@Example.com"),
        None,
        Some("carol@example.com"),
        Some("ghost@example.com"),
        Some("erin@example.com"),
    ]);
    let city = StringArray::from(vec!["Berlin", "Paris", "Rome", "Oslo", "Lyon"]);
    let address = StructArray::from(vec![(
        Arc::new(Field::new("city", DataType::Utf8, true)),
        Arc::new(city) as ArrayRef,
    )]);
    let fields = Fields::from(vec![
        Field::new("email", DataType::Utf8, true),
        Field::new("address", address.data_type().clone(), true),
    ]);
    let customer = StructArray::try_new(
        fields,
        vec![Arc::new(email) as ArrayRef, Arc::new(address) as ArrayRef],
        Some(NullBuffer::from(vec![true, true, true, false, true])),
    )
    .unwrap();
    let amount = Int64Array::from(vec![10, 20, 30, 40, 50]);
    let mut tags = ListBuilder::new(StringBuilder::new());
    for i in 0..5 {
        tags.values().append_value(format!("t{i}a"));
        tags.values().append_value(format!("t{i}b"));
        tags.append(true);
    }
    RecordBatch::try_from_iter(vec![
        ("customer", Arc::new(customer) as ArrayRef),
        ("amount_cents", Arc::new(amount) as ArrayRef),
        ("tags", Arc::new(tags.finish()) as ArrayRef),
    ])
    .unwrap()
}

/// [`nested_customers`] written to `dir`, and the dataset keyed by `customer.email` over it.
fn nested_dataset(dir: &Path) -> (std::path::PathBuf, DatasetConfig) {
    let path = dir.join("customers.parquet");
    write_parquet(&path, &nested_customers());
    let id = IdentifierConfig::new("email", "customer.email", Normaliser::Email);
    (
        path.clone(),
        DatasetConfig::new("customers", path, vec![id]),
    )
}

#[test]
fn a_struct_field_is_a_column_named_by_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let (_, d) = nested_dataset(dir.path());
    let source = super::Source::open(&d).unwrap();
    assert_eq!(
        source.headers(),
        [
            "customer.email",
            "customer.address.city",
            "amount_cents",
            "tags"
        ]
    );
    drop(source);
    let (items, loaded) = keys_of(&d, None);
    assert_eq!(
        items,
        ["alice@example.com", "carol@example.com", "erin@example.com"]
    );
    // A null email and a null struct are both a null identifier, placed by row.
    assert_eq!(loaded.rows_read, 5);
    assert_eq!(
        loaded
            .rejections
            .by_reason
            .get("the field is null or missing"),
        Some(&2)
    );
    let rows: Vec<u64> = loaded.rejections.first.iter().map(|r| r.line).collect();
    assert_eq!(rows, [2, 4]);
    // A deeper field and a flat column read side by side.
    let mut seen = Vec::new();
    dataset::for_each_row_for(
        &d,
        &["customer.address.city", "amount_cents"],
        RowFilter::default(),
        100,
        |_, f| {
            let text = |v: Option<&[u8]>| v.map(|b| String::from_utf8(b.to_vec()).unwrap());
            seen.push((text(f[0]), text(f[1])));
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(seen[0], (Some("Berlin".into()), Some("10".into())));
    assert_eq!(
        seen[3],
        (None, Some("40".into())),
        "a null struct's field is null"
    );
    assert_eq!(seen.len(), 5);
}

/// Reading a list column as one value is refused with what to do; a view that unnests it reads
/// one row per element.
#[test]
fn a_list_column_is_refused_and_a_view_unnests_it() {
    let dir = tempfile::tempdir().unwrap();
    let (path, d) = nested_dataset(dir.path());
    let err = dataset::for_each_row_for(&d, &["tags"], RowFilter::default(), 100, |_, _| Ok(()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("column 'tags' holds a list") && err.contains("unnest(tags) AS tags"),
        "{err}"
    );
    let d = view_over(
        "orders",
        &path,
        "SELECT unnest(tags) AS tags FROM orders",
        Delimiter::default(),
    );
    let mut tags = Vec::new();
    dataset::for_each_row_for(&d, &["tags"], RowFilter::default(), 100, |_, f| {
        tags.push(String::from_utf8(f[0].unwrap().to_vec()).unwrap());
        Ok(())
    })
    .unwrap();
    assert_eq!(tags.len(), 10);
    assert_eq!(tags[..3], ["t0a", "t0b", "t1a"]);
}

#[test]
fn engine_errors_name_no_value() {
    let dir = tempfile::tempdir().unwrap();
    let d = view(
        dir.path(),
        "SELECT CAST(email AS BIGINT) AS email FROM orders",
    );
    let err = dataset::load_keys_for(&d, &KeySpec::new(["email"]), RowFilter::default(), 100)
        .unwrap_err()
        .to_string();
    assert!(err.contains("customers"), "{err}");
    assert!(!err.contains("alice"), "{err}");
    let d = view(dir.path(), "SELECT email FROM nowhere");
    let err = super::Source::open(&d).unwrap_err().to_string();
    assert!(err.contains("nowhere"), "{err}");
    let d = view(dir.path(), "INSERT INTO orders VALUES (1)");
    assert!(super::Source::open(&d).is_err());
}

/// A view over JSON lines whose email is text in the first lines and a bare number later: the
/// engine types the column as text and cannot read the number. The read fails naming the field
/// and what to do, and the number (a phone number here) is in no part of the message. (A JSON
/// lines dataset that is no view is read by [`super::json`], which reads the number as text.)
#[test]
fn a_json_value_of_another_type_fails_the_read_naming_no_value() {
    let err = view_error(
        "customers.jsonl",
        "{\"customer\": {\"email\": \"a@example.com\"}}\n\
         {\"customer\": {\"email\": 4155550100}}\n",
        "SELECT customer['email'] AS email FROM orders",
    );
    assert!(
        err.contains("field 'email'") && err.contains("make its values one type"),
        "{err}"
    );
    assert!(
        !err.contains("4155550100") && !err.contains("a@example"),
        "{err}"
    );
}

/// A view's sort runs in the engine's memory pool, half the node's `memory_limit`: with a pool
/// too small for one batch it fails with the engine's "resources exhausted" (so the pool is in
/// force), and with one of 32 MiB it sorts 20 000 rows right; the spill directory it may spill
/// to is created.
#[test]
fn a_view_runs_in_a_memory_pool_of_half_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.csv");
    let mut csv = String::from("email\n");
    for i in (0..20_000).rev() {
        csv.push_str(&format!("user{i:05}@example.com\n"));
    }
    std::fs::write(&path, csv).unwrap();
    let mut d = view_over(
        "big",
        &path,
        "SELECT email FROM big ORDER BY email",
        Delimiter::default(),
    );
    let spill = dir.path().join("spill");
    d.engine.spill_dir = spill.clone();

    d.engine.memory_limit = Some(2048);
    let err = dataset::load_keys_for(&d, &KeySpec::new(["email"]), RowFilter::default(), 100_000)
        .unwrap_err()
        .to_string();
    assert!(err.to_lowercase().contains("resources exhausted"), "{err}");

    d.engine.memory_limit = Some(64 << 20);
    let mut first = Vec::new();
    dataset::for_each_row_for(&d, &["email"], RowFilter::default(), 100_000, |_, f| {
        if first.len() < 2 {
            first.push(String::from_utf8(f[0].unwrap().to_vec()).unwrap());
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(first, ["user00000@example.com", "user00001@example.com"]);
    assert!(spill.is_dir());
}

/// `alice,1` / a row with a field too few / `carol` with a quote that closes a line late, so
/// that its field swallows `dave`'s / `erin`.
const MALFORMED_CSV: &str = "email,amount_cents\n\
    alice@example.com,1\n\
    bob@example.com\n\
    \"carol@example.com,3\n\
    dave@example.com\",4\n\
    erin@example.com,5\n";

/// A `file://` CSV is read by the strict reader, like a plain path: the short row, the line of the
/// open quote and the line where it closes are rejected by reason and placed by line.
#[test]
fn a_file_url_csv_is_read_strictly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("customers.csv");
    std::fs::write(&path, MALFORMED_CSV).unwrap();
    let url = url::Url::from_file_path(&path).unwrap();
    let d = email_dataset(Path::new(url.as_str()));
    assert!(matches!(
        super::Source::open(&d).unwrap(),
        super::Source::Csv(_)
    ));
    let (items, loaded) = keys_of(&d, None);
    assert_eq!(items, ["alice@example.com", "erin@example.com"]);
    // carol's open quote costs her line; dave's line, read again, holds the closing quote.
    let lines: Vec<u64> = loaded.rejections.first.iter().map(|r| r.line).collect();
    assert_eq!(lines, [3, 4, 5], "{:?}", loaded.rejections);
}

/// In a view, a local CSV table is read by the same strict rules: the short row, the line of
/// the open quote and the line where it closes are rejected by reason and placed by line, and
/// the view reads the rest (DataFusion's own reader would fail the whole read).
#[test]
fn a_view_over_malformed_csv_rejects_rows_and_reads_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orders.csv");
    std::fs::write(&path, MALFORMED_CSV).unwrap();
    let d = view_over(
        "orders",
        &path,
        "SELECT email FROM orders",
        Delimiter::default(),
    );
    let (items, loaded) = keys_of(&d, None);
    assert_eq!(items, ["alice@example.com", "erin@example.com"]);
    let lines: Vec<u64> = loaded.rejections.first.iter().map(|r| r.line).collect();
    assert_eq!(lines, [3, 4, 5], "{:?}", loaded.rejections);
    let reasons = &loaded.rejections.by_reason;
    assert_eq!(reasons.get("field count"), Some(&1), "{reasons:?}");
    assert_eq!(
        reasons.get("line break in a field"),
        Some(&1),
        "{reasons:?}"
    );
    assert_eq!(reasons.get("quote in a field"), Some(&1), "{reasons:?}");
    // Read: the view's two rows and the three rejected ones.
    assert_eq!(loaded.rows_read, 5);
    assert_eq!(loaded.rows_rejected, 3);
    // The reasons and places name no value.
    let audit = format!("{:?}", loaded.rejections);
    assert!(
        !audit.contains("bob@") && !audit.contains("carol@"),
        "{audit}"
    );
}

/// The typing tests' view, `SELECT email, phone FROM orders WHERE amount >= 500 AND day's day
/// <= 14`, over [`write_typed_orders`] in `dir`; with `(rows, misfit)`.
fn typed_orders_view(dir: &Path) -> (DatasetConfig, usize, usize) {
    let path = dir.join("orders.csv");
    let (rows, misfit) = write_typed_orders(&path);
    let d = view_over(
        "orders",
        &path,
        "SELECT email, phone FROM orders \
         WHERE amount >= 500 AND extract(day FROM day) <= 14",
        Delimiter::default(),
    );
    (d, rows, misfit)
}

/// `orders.csv` for the typing tests: an email, a phone with a leading 0, an amount and a day
/// per row, and one amount (at `misfit`, past the rows the types come from) that is no number.
/// Returns `(rows, misfit)`.
fn write_typed_orders(path: &Path) -> (usize, usize) {
    let mut csv = String::from("email,phone,amount,day\n");
    let rows = super::strict_table::INFER_ROWS + 200;
    let misfit = super::strict_table::INFER_ROWS + 100;
    for i in 0..rows {
        let amount = if i == misfit {
            "n/a".to_owned()
        } else {
            i.to_string()
        };
        let day = 1 + i % 28;
        csv.push_str(&format!(
            "user{i}@example.com,0151{i:07},{amount},2026-02-{day:02}\n"
        ));
    }
    std::fs::write(path, csv).unwrap();
    (rows, misfit)
}

/// A view's CSV columns are typed from the first rows: numbers compare as numbers, a column of
/// phone numbers with a leading 0 stays text with its 0, and a later value that is not a number
/// rejects its row instead of failing the read.
#[test]
fn a_view_types_csv_columns_keeps_leading_zeros_and_rejects_a_later_misfit() {
    let dir = tempfile::tempdir().unwrap();
    let (d, rows, misfit) = typed_orders_view(dir.path());
    let mut phones = Vec::new();
    dataset::for_each_row_for(&d, &["phone"], RowFilter::default(), 10_000, |_, f| {
        phones.push(String::from_utf8(f[0].unwrap().to_vec()).unwrap());
        Ok(())
    })
    .unwrap();
    // As text, "99" >= "500" would hold; as numbers, rows 500.. pass, less the misfit (whose
    // day, 1 + 1100 % 28 = 9, passes), and the day is a date, of which the first 14 pass.
    let expected = (500..rows).filter(|&i| i != misfit && i % 28 < 14).count();
    assert_eq!(phones.len(), expected);
    // Row 504 is the first from 500 on with a day up to 14; its phone keeps its 0.
    assert_eq!(phones[0], "01510000504");
    let (_, loaded) = keys_of(&d, None);
    let reasons = &loaded.rejections.by_reason;
    assert_eq!(reasons.get("field type"), Some(&1), "{reasons:?}");
    let line = loaded.rejections.first[0].line;
    assert_eq!(line, misfit as u64 + 2, "the header is line 1");
    assert_eq!(loaded.rejections.first[0].column.as_deref(), Some("amount"));
}

/// A semicolon-separated file as a spreadsheet exports it (a byte-order mark, CRLF line ends):
/// read with `delimiter = ";"`, as a dataset and as a view's table. With the default `,` its
/// header is one column, and the job's column is named as missing rather than read wrong.
#[test]
fn a_semicolon_file_with_a_byte_order_mark_reads_with_its_delimiter() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kunden.csv");
    std::fs::write(
        &path,
        "\u{feff}email;name\r\nalice@example.com;Alice\r\nbob@example.com;Bob, Jr.\r\n",
    )
    .unwrap();
    let mut d = email_dataset(&path);
    let err = dataset::load_keys_for(&d, &KeySpec::new(["email"]), RowFilter::default(), 100)
        .unwrap_err()
        .to_string();
    assert!(err.contains("email"), "{err}");

    let semicolon = Delimiter::parse(";").unwrap();
    d.delimiter = semicolon;
    let (items, loaded) = keys_of(&d, None);
    assert_eq!(items, ["alice@example.com", "bob@example.com"]);
    assert_eq!(loaded.rows_rejected, 0);

    let v = view_over(
        "kunden",
        &path,
        "SELECT email FROM kunden WHERE name <> 'Alice'",
        semicolon,
    );
    let (items, _) = keys_of(&v, None);
    assert_eq!(items, ["bob@example.com"]);
}

/// The error of loading the keys of a view `sql` over one table `orders`, the file `name`
/// holding `text`.
fn view_error(name: &str, text: &str, sql: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    let d = view_over("orders", &path, sql, Delimiter::default());
    dataset::load_keys_for(&d, &KeySpec::new(["email"]), RowFilter::default(), 100)
        .unwrap_err()
        .to_string()
}

/// A CSV column with `n/a` among its first rows is text; a view that compares it with a number
/// fails on the cast, and the error says what to write instead (the value itself cut out).
/// With TRY_CAST the view reads the other rows.
#[test]
fn a_text_column_cast_in_a_view_fails_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orders.csv");
    std::fs::write(
        &path,
        "email,amount\nalice@example.com,10\nbob@example.com,n/a\n",
    )
    .unwrap();
    let d = view_over(
        "orders",
        &path,
        "SELECT email FROM orders WHERE amount >= 1",
        Delimiter::default(),
    );
    let err = dataset::load_keys_for(&d, &KeySpec::new(["email"]), RowFilter::default(), 100)
        .unwrap_err()
        .to_string();
    assert!(err.contains("TRY_CAST"), "{err}");
    assert!(!err.contains("n/a"), "{err}");
    let d = view_over(
        "orders",
        &path,
        "SELECT email FROM orders WHERE TRY_CAST(amount AS BIGINT) >= 1",
        Delimiter::default(),
    );
    let (items, _) = keys_of(&d, None);
    assert_eq!(items, ["alice@example.com"]);
}

/// One row as a test sees it: malformed (and why), or its fields.
type SeenRow = (
    Option<(Option<usize>, super::Malformed)>,
    Vec<Option<String>>,
);

/// Every line of `csv` read both ways, local strict reader and line by line through the
/// engine: (malformed as the pass reading `read` sees it, the fields when well formed).
fn both_ways(csv: &str, delimiter: Delimiter, read: &[usize]) -> [Vec<SeenRow>; 2] {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("customers.csv");
    std::fs::write(&path, csv).unwrap();
    let mut d = email_dataset(&path);
    d.delimiter = delimiter;
    let local = super::Source::open(&d).unwrap();
    assert!(matches!(local, super::Source::Csv(_)));
    let lines = super::Source::Frame(super::frame::Frame::open_lines(&d).unwrap());
    [local, lines].map(|mut source| {
        assert_eq!(source.headers(), ["email", "phone", "consent"]);
        source.start(read).unwrap();
        let mut rows = Vec::new();
        let mut multi_line = 0;
        while source.advance().unwrap() {
            let malformed = source.malformed(read, &mut multi_line);
            let fields = match malformed {
                Some(_) => Vec::new(),
                None => (0..3)
                    .map(|i| {
                        source
                            .field(i)
                            .map(|f| String::from_utf8(f.to_vec()).unwrap())
                    })
                    .collect(),
            };
            rows.push((malformed, fields));
        }
        rows
    })
}

/// CSV read line by line (on a cluster, from object storage) is split as strictly as the local
/// reader splits it: on files whose records each fit on one line, every row is rejected or read
/// alike, with the same fields.
#[test]
fn csv_read_line_by_line_agrees_with_the_local_reader() {
    let csv = "\u{feff}email,phone,consent\r\n\
        alice@example.com,0151 2345,yes\r\n\
        \"bob,jr@example.com\",\"+49 \"\"30\"\"\",no\r\n\
        short,row\r\n\
        carol@example.com,5\" tall,yes\r\n\
        dave@example.com,\"\",\"\"\r\n\
        too,many,fields,here\r\n\
        \"erin\"\"@example.com\",1,yes\r\n\
        \r\n\
        ,,\r\n\
        frank@example.com,0049 30,\"yes\"\r\n";
    // The pass reads email and consent: the quote in carol's phone is text.
    let [local, lines] = both_ways(csv, Delimiter::default(), &[0, 2]);
    assert_eq!(local.len(), 9, "{local:?}");
    assert_eq!(lines, local);
    let rejected = local.iter().filter(|(m, _)| m.is_some()).count();
    assert_eq!(rejected, 3, "short, too many, erin's quote: {local:?}");
    // Reading the phone too rejects carol's row and bob's.
    let [local, lines] = both_ways(csv, Delimiter::default(), &[0, 1]);
    assert_eq!(lines, local);
    assert_eq!(local.iter().filter(|(m, _)| m.is_some()).count(), 5);

    let semicolons = "email;phone;consent\nalice@example.com;01512345;yes\nbob;x\n";
    let [local, lines] = both_ways(semicolons, Delimiter::parse(";").unwrap(), &[0, 1]);
    assert_eq!(lines, local);
    assert_eq!(local[0].1[1].as_deref(), Some("01512345"));
}

/// JSON lines read line by line (on a cluster, from object storage) are read as the local
/// reader reads them: the same columns, every line rejected or read alike, with the same
/// fields; and a column of lists is refused alike.
#[test]
fn json_lines_read_line_by_line_agree_with_the_local_reader() {
    let long = format!(
        "{{\"customer\": {{\"email\": \"{}\"}}}}",
        "a".repeat(1 << 20)
    );
    let text = format!(
        "\u{feff}{{\"id\": 1, \"customer\": {{\"email\": \"a@x.com\"}}, \"tags\": [1]}}\r\n\
         {{\"id\": 2, \"customer\": {{\"email\": 4155550100}}}}\n\
         \n   \t\n\
         {{\"id\": 3, \"customer\": {{\"email\": \"b@x.com\"\n\
         [1, 2]\n\
         {{\"id\": 5, \"customer\": null, \"late\": true}}\n\
         {long}\n\
         {{\"id\": 6, \"customer\": {{\"email\": [\"c@x.com\"]}}}}\n\
         {{\"id\": 7.5, \"customer\": {{\"email\": \"x\\ny@x.com\"}}}}\n\
         {{\"id\": 8, \"customer\": {{\"email\": \"d@x.com\"}}}}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("customers.jsonl");
    std::fs::write(&path, text).unwrap();
    let mut d = email_dataset(&path);
    d.format = Some(DataFormat::Jsonl);
    let local = super::Source::open(&d).unwrap();
    assert!(matches!(local, super::Source::Json(_)));
    let lines = super::Source::Frame(super::frame::Frame::open_lines(&d).unwrap());
    let [local, lines] = [local, lines].map(|mut source| {
        assert_eq!(
            source.headers(),
            ["customer.email", "id", "tags", "late"],
            "the same columns"
        );
        let read = [0, 1];
        source.start(&read).unwrap();
        let mut rows = Vec::new();
        while source.advance().unwrap() {
            let malformed = source.malformed(&read, &mut 0);
            let fields: Vec<Option<String>> = read
                .iter()
                .map(|&i| {
                    source
                        .field(i)
                        .map(|f| String::from_utf8_lossy(f).into_owned())
                })
                .collect();
            rows.push((malformed, fields));
        }
        rows
    });
    assert_eq!(lines, local);
    let why: Vec<_> = local.iter().map(|(m, _)| m.map(|(_, why)| why)).collect();
    use super::Malformed::*;
    assert_eq!(
        why,
        [
            None,
            None,
            Some(NotJsonObject),
            Some(NotJsonObject),
            None,
            Some(LineTooLong),
            Some(NotOneValue),
            Some(LineBreak),
            None
        ]
    );
    assert_eq!(local[1].1, [Some("4155550100".into()), Some("2".into())]);
    assert_eq!(local[8].1, [Some("d@x.com".into()), Some("8".into())]);

    // A column that held only lists is refused, saying what to do, both ways.
    for mut source in [
        super::Source::open(&d).unwrap(),
        super::Source::Frame(super::frame::Frame::open_lines(&d).unwrap()),
    ] {
        let err = source.start(&[2]).unwrap_err().to_string();
        assert!(err.contains("'tags' holds a list"), "{err}");
    }
}

/// What the line-by-line read cannot follow: a quote left open. The local reader rejects the
/// line it opens on and reads the next as a record; line by line, the open quote's line is
/// rejected for it, and the next line is read on its own as well.
#[test]
fn a_quote_left_open_costs_its_line_read_line_by_line() {
    let csv = "email,phone,consent\nalice@example.com,\"0151,yes\nbob@example.com,2,yes\n";
    let [local, lines] = both_ways(csv, Delimiter::default(), &[0, 2]);
    assert_eq!(local.len(), 2, "{local:?}");
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].0.is_some() && local[0].0.is_some());
    assert_eq!(lines[1], local[1]);
    let csv = "email,phone,consent\nalice@example.com,1,\"yes\n";
    let [_, lines] = both_ways(csv, Delimiter::default(), &[0, 2]);
    assert_eq!(lines[0].0, Some((None, super::Malformed::OpenQuote)));
}

/// A one-column file of digits is read as text (DataFusion would type it as numbers and drop
/// the leading 0).
#[test]
fn a_one_column_csv_of_digits_keeps_its_leading_zeros_line_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phones.csv");
    std::fs::write(&path, "phone\n0151234567\n0049301234\n").unwrap();
    let mut d = email_dataset(&path);
    d.identifiers[0].column = "phone".into();
    let mut lines = super::Source::Frame(super::frame::Frame::open_lines(&d).unwrap());
    assert_eq!(lines.headers(), ["phone"]);
    lines.start(&[0]).unwrap();
    let mut read = Vec::new();
    while lines.advance().unwrap() {
        read.push(String::from_utf8(lines.field(0).unwrap().to_vec()).unwrap());
    }
    assert_eq!(read, ["0151234567", "0049301234"]);
}

/// A line holding the byte DataFusion is told separates fields fails the read with a message
/// that names the line and says what to do, and quotes no value.
#[test]
fn a_line_holding_the_line_delimiter_fails_the_read_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("customers.csv");
    std::fs::write(
        &path,
        "email,phone,consent\nalice@example.com,1,yes\nsecret\u{1e}@example.com,2,yes\n",
    )
    .unwrap();
    let d = email_dataset(&path);
    // The engine finds it while it reads the columns (a long file: while it streams).
    let err = match super::frame::Frame::open_lines(&d) {
        Err(e) => e.to_string(),
        Ok(frame) => {
            let mut lines = super::Source::Frame(frame);
            lines.start(&[0]).unwrap();
            loop {
                match lines.advance() {
                    Ok(true) => {}
                    Ok(false) => panic!("read to the end"),
                    Err(e) => break e.to_string(),
                }
            }
        }
    };
    assert!(err.contains("line 3"), "{err}");
    assert!(!err.contains("secret"), "{err}");
    assert!(err.contains("0x1E"), "{err}");
}

/// Reads `column` of every row of view `d` with its tables read line by line, as on a cluster
/// or from object storage; with what the tables rejected.
fn view_by_lines(d: &DatasetConfig, column: &str) -> (Vec<String>, super::strict_table::Rejected) {
    let mut source = super::Source::Frame(super::frame::Frame::open_lines(d).unwrap());
    let at = source.headers().iter().position(|h| h == column).unwrap();
    source.start(&[at]).unwrap();
    let mut values = Vec::new();
    while source.advance().unwrap() {
        let field = source
            .field(at)
            .map(|f| String::from_utf8(f.to_vec()).unwrap());
        values.push(field.unwrap_or_default());
    }
    (values, source.take_table_rejections())
}

/// A view's CSV table read line by line (on a cluster, or from object storage) is read as
/// strictly as a local one: a short row, a quote left open, a quote in a column the view reads
/// are rejected and counted by reason (without places: the lines come from many parts); a quote
/// or a value of another type in a column it does not read is kept. (Locally, carol's note
/// over two lines is legal CSV and her row is read; a line-by-line read cannot follow it.)
#[test]
fn a_view_over_csv_read_line_by_line_rejects_malformed_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orders.csv");
    std::fs::write(
        &path,
        "email,amount_cents,note\n\
         alice@example.com,1,\"a \"\"quoted\"\" note\"\n\
         bob@example.com\n\
         carol@example.com,3,\"a note over\n\
         two lines\",4,x\n\
         erin@example.com,5,5\" screen\n\
         frank@example.com,x1,n\n",
    )
    .unwrap();
    let d = view_over(
        "orders",
        &path,
        "SELECT email FROM orders",
        Delimiter::default(),
    );
    let (emails, rejected) = view_by_lines(&d, "email");
    assert_eq!(
        emails,
        ["alice@example.com", "erin@example.com", "frank@example.com"]
    );
    assert!(rejected.placed.is_empty());
    let want: std::collections::BTreeMap<String, u64> = [
        ("field count", 1),
        ("quote left open", 1),
        ("quote in a field", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(rejected.more, want);
}

/// Read line by line, a view's CSV columns are typed as a local table's: numbers compare as
/// numbers, a phone keeps its leading 0, a date is a date, and a later value that is not a
/// number rejects its row ("field type") instead of failing the read.
#[test]
fn a_view_over_csv_read_line_by_line_types_its_columns() {
    let dir = tempfile::tempdir().unwrap();
    let (d, rows, misfit) = typed_orders_view(dir.path());
    let (phones, rejected) = view_by_lines(&d, "phone");
    let expected = (500..rows).filter(|&i| i != misfit && i % 28 < 14).count();
    assert_eq!(phones.len(), expected);
    assert_eq!(phones[0], "01510000504");
    assert_eq!(rejected.more.get("field type"), Some(&1), "{rejected:?}");
    assert_eq!(rejected.total(), 1);
}

/// A view cannot read a table's raw lines by their hidden name (every column at once, past the
/// check on which columns it may read).
#[test]
fn a_view_cannot_read_a_tables_raw_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orders.csv");
    std::fs::write(&path, "email,ssn\na@x.y,123\n").unwrap();
    let line = super::line_table::hidden_name("orders");
    // Named in the FROM clause, or in a subquery of the select list or of a condition.
    for sql in [
        format!("SELECT * FROM {line}"),
        format!(
            "SELECT (SELECT max(l.{c}) FROM {line} l) AS email FROM orders",
            c = "\"email,ssn\""
        ),
        format!("SELECT email FROM orders WHERE EXISTS (SELECT 1 FROM {line})"),
    ] {
        let d = view_over("orders", &path, &sql, Delimiter::default());
        let err = match super::frame::Frame::open_lines(&d) {
            Ok(_) => panic!("the view read the raw lines: {sql}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("raw lines"), "{sql}: {err}");
    }
}

/// Shapes of real lakes a view meets: a Parquet table joined to a CSV table, dictionary and
/// large strings, a directory of Parquet files whose later file adds a column, a timestamp,
/// and a column name with a space and capitals. Each reads what plain SQL says it holds.
#[test]
fn views_over_real_lake_shapes_read_what_sql_says() {
    use datafusion::arrow::array::{DictionaryArray, LargeStringArray, TimestampMillisecondArray};
    use datafusion::arrow::datatypes::Int32Type;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("orders");
    std::fs::create_dir(&lake).unwrap();
    // Two files; the second adds `country` (a dictionary column).
    let first = RecordBatch::try_from_iter(vec![
        (
            "Customer Email",
            Arc::new(LargeStringArray::from(vec!["A@x.com", "b@x.com"])) as ArrayRef,
        ),
        (
            "placed",
            Arc::new(TimestampMillisecondArray::from(vec![0, 86_400_000])) as ArrayRef,
        ),
    ])
    .unwrap();
    let country: DictionaryArray<Int32Type> = vec!["DE", "FR"].into_iter().collect();
    let second = RecordBatch::try_from_iter(vec![
        (
            "Customer Email",
            Arc::new(LargeStringArray::from(vec!["c@x.com", "d@x.com"])) as ArrayRef,
        ),
        (
            "placed",
            Arc::new(TimestampMillisecondArray::from(vec![0, 0])) as ArrayRef,
        ),
        ("country", Arc::new(country) as ArrayRef),
    ])
    .unwrap();
    write_parquet(&lake.join("part-0.parquet"), &first);
    write_parquet(&lake.join("part-1.parquet"), &second);
    let vip = dir.path().join("vip.csv");
    std::fs::write(
        &vip,
        "email,tier\nb@x.com,gold\nd@x.com,gold\nc@x.com,none\n",
    )
    .unwrap();
    let view = |sql: &str| {
        let mut d = view_over("orders", &lake, sql, Delimiter::default());
        d.tables[0].format = Some(DataFormat::Parquet);
        d.tables.push(TableConfig {
            name: "vip".into(),
            path: vip.clone(),
            format: None,
            delimiter: Delimiter::default(),
        });
        d
    };
    let emails = |d: &DatasetConfig| keys_of(d, None).0;
    // A join, a filter on the added column (null in the first file), a date.
    let d = view(
        "SELECT lower(o.\"Customer Email\") AS email FROM orders o \
         JOIN vip v ON lower(o.\"Customer Email\") = v.email WHERE v.tier = 'gold'",
    );
    assert_eq!(emails(&d), ["b@x.com", "d@x.com"]);
    let d = view("SELECT \"Customer Email\" AS email FROM orders WHERE country = 'DE'");
    assert_eq!(emails(&d), ["c@x.com"]);
    let d = view(
        "SELECT DISTINCT \"Customer Email\" AS email FROM orders \
         WHERE placed >= TIMESTAMP '1970-01-02 00:00:00'",
    );
    assert_eq!(emails(&d), ["b@x.com"]);
}

/// Text a writer stored as bytes (a Parquet `BINARY` without the UTF-8 mark) and a
/// `DECIMAL(10, 2)` amount: a value that is not UTF-8 rejects its row alone (the engine's cast
/// would fail the read), and the decimal's whole numbers sum as integers.
#[test]
fn a_binary_identifier_and_a_decimal_amount_read_row_by_row() {
    use datafusion::arrow::array::{BinaryArray, Decimal128Array};
    let dir = tempfile::tempdir().unwrap();
    let email = BinaryArray::from(vec![&b"a@x.com"[..], b"b@x.com", b"\xff\xfe@x.com"]);
    let amount = Decimal128Array::from(vec![120_000i128, 1299, 5])
        .with_precision_and_scale(10, 2)
        .unwrap();
    let d = orders(dir.path(), Arc::new(email), Arc::new(amount));
    let (items, loaded) = keys_of(&d, None);
    assert_eq!(items, ["a@x.com", "b@x.com"]);
    assert_eq!(loaded.rows_rejected, 1);
    assert_eq!(amounts(&d), [Some(1200), None, None]);
}

/// A view over JSON lines with a line cut off: the engine fails the read, and the message says
/// the line is not valid JSON and what to do (not that a value changed type).
#[test]
fn a_view_over_a_cut_off_json_line_fails_saying_what_to_do() {
    let err = view_error(
        "customers.jsonl",
        "{\"email\": \"a@example.com\"}\n{\"email\": \"cut@off.test\", \"phone\": \"1\n",
        "SELECT email FROM orders",
    );
    assert!(
        err.contains("not valid JSON") && err.contains("read one line a record"),
        "{err}"
    );
    assert!(!err.contains("cut@off"), "{err}");
}

/// Each of `columns` of every row of `d`, as the node reads them (text; `None` for null).
fn read_columns(d: &DatasetConfig, columns: &[&str]) -> Vec<Vec<Option<String>>> {
    let mut source = super::Source::open(d).unwrap();
    let at: Vec<usize> = columns
        .iter()
        .map(|c| source.headers().iter().position(|h| h == c).unwrap())
        .collect();
    source.start(&at).unwrap();
    let mut rows = Vec::new();
    while source.advance().unwrap() {
        rows.push(
            at.iter()
                .map(|&i| {
                    source
                        .field(i)
                        .map(|f| String::from_utf8_lossy(f).into_owned())
                })
                .collect(),
        );
    }
    rows
}

/// A lake fed by several writers: an amount written as `INT32` by one and `INT64` by the
/// next, consent as text then as an integer, the email as a string then as a string view,
/// and a struct that gains a field. The engine's own schema merge fails on such files; each
/// column is read as one type that all its values convert to.
#[test]
fn parquet_files_whose_column_types_drift_read_as_one_table() {
    use datafusion::arrow::array::{Int32Array, Int64Array, StringViewArray, StructArray};
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("orders");
    std::fs::create_dir(&lake).unwrap();
    let customer = |fields: Vec<(&str, Vec<&str>)>| -> ArrayRef {
        Arc::new(StructArray::from(
            fields
                .into_iter()
                .map(|(name, values)| {
                    (
                        Arc::new(Field::new(name, DataType::Utf8, true)),
                        Arc::new(StringArray::from(values)) as ArrayRef,
                    )
                })
                .collect::<Vec<_>>(),
        ))
    };
    let old = RecordBatch::try_from_iter(vec![
        (
            "email",
            Arc::new(StringArray::from(vec!["a@x.com", "b@x.com"])) as ArrayRef,
        ),
        (
            "amount",
            Arc::new(Int32Array::from(vec![100, 200])) as ArrayRef,
        ),
        (
            "consent_fraud",
            Arc::new(StringArray::from(vec!["yes", "no"])) as ArrayRef,
        ),
        ("customer", customer(vec![("id", vec!["c1", "c2"])])),
    ])
    .unwrap();
    let new = RecordBatch::try_from_iter(vec![
        (
            "email",
            Arc::new(StringViewArray::from(vec!["c@x.com", "d@x.com"])) as ArrayRef,
        ),
        (
            "amount",
            Arc::new(Int64Array::from(vec![3_000_000_000, 400])) as ArrayRef,
        ),
        (
            "consent_fraud",
            Arc::new(Int64Array::from(vec![1, 0])) as ArrayRef,
        ),
        (
            "customer",
            customer(vec![
                ("id", vec!["c3", "c4"]),
                ("phone", vec!["+491", "+492"]),
            ]),
        ),
    ])
    .unwrap();
    write_parquet(&lake.join("part-0.parquet"), &old);
    write_parquet(&lake.join("part-1.parquet"), &new);
    let mut d = email_dataset(&lake);
    d.format = Some(DataFormat::Parquet);
    let some = |v: &[&str]| v.iter().map(|s| Some((*s).to_owned())).collect::<Vec<_>>();
    assert_eq!(
        read_columns(&d, &["email", "amount", "consent_fraud", "customer.id"]),
        [
            some(&["a@x.com", "100", "yes", "c1"]),
            some(&["b@x.com", "200", "no", "c2"]),
            some(&["c@x.com", "3000000000", "1", "c3"]),
            some(&["d@x.com", "400", "0", "c4"]),
        ]
    );
    // The field the old file lacks is null there.
    assert_eq!(
        read_columns(&d, &["customer.phone"]),
        [vec![None], vec![None], some(&["+491"]), some(&["+492"])]
    );
    let (items, loaded) = keys_of(&d, Some("consent_fraud"));
    assert_eq!(items, ["a@x.com", "c@x.com"]);
    assert_eq!(loaded.rows_excluded_consent, 2);

    // Only the struct gains a field: the engine's merge takes it; the old file reads it null.
    let lake = dir.path().join("customers");
    std::fs::create_dir(&lake).unwrap();
    for (file, batch) in [("part-0.parquet", &old), ("part-1.parquet", &new)] {
        let only = batch.project(&[3]).unwrap();
        write_parquet(&lake.join(file), &only);
    }
    let mut d = email_dataset(&lake);
    d.format = Some(DataFormat::Parquet);
    d.consent.clear();
    assert_eq!(
        read_columns(&d, &["customer.id", "customer.phone"]),
        [
            vec![Some("c1".into()), None],
            vec![Some("c2".into()), None],
            some(&["c3", "+491"]),
            some(&["c4", "+492"]),
        ]
    );

    // A field the later writer declares required (not nullable) is null in the old file: the
    // table takes it as nullable, as it takes a required top-level column.
    let required = StructArray::try_new(
        vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("phone", DataType::Utf8, false),
        ]
        .into(),
        vec![
            Arc::new(StringArray::from(vec!["c3"])) as ArrayRef,
            Arc::new(StringArray::from(vec!["+493"])) as ArrayRef,
        ],
        None,
    )
    .unwrap();
    let lake = dir.path().join("required");
    std::fs::create_dir(&lake).unwrap();
    write_parquet(&lake.join("part-0.parquet"), &old.project(&[3]).unwrap());
    let later = RecordBatch::try_from_iter(vec![("customer", Arc::new(required) as ArrayRef)]);
    write_parquet(&lake.join("part-1.parquet"), &later.unwrap());
    let mut d = email_dataset(&lake);
    d.format = Some(DataFormat::Parquet);
    d.consent.clear();
    assert_eq!(
        read_columns(&d, &["customer.id", "customer.phone"]),
        [
            vec![Some("c1".into()), None],
            vec![Some("c2".into()), None],
            some(&["c3", "+493"]),
        ]
    );
}

/// Read line by line (as in `s3://` and on a cluster), a line that starts with the byte 0x1D
/// (the quote the engine is given) makes the engine take the lines up to the next such byte as
/// one. The read fails, saying what to do, instead of counting them as one rejected row.
#[test]
fn a_line_that_starts_with_the_engines_quote_fails_the_read() {
    let dir = tempfile::tempdir().unwrap();
    for (name, format, text) in [
        (
            "customers.csv",
            DataFormat::Csv,
            "email\na@x.com\n\u{1d}b@x.com\nc@x.com\n\u{1d}d@x.com\ne@x.com\n",
        ),
        (
            "customers.jsonl",
            DataFormat::Jsonl,
            "{\"email\": \"a@x.com\"}\n\u{1d}{\"email\": \"b@x.com\"}\n\
             {\"email\": \"c@x.com\"}\n\u{1d}\n{\"email\": \"e@x.com\"}\n",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let mut d = email_dataset(&path);
        d.format = Some(format);
        d.consent.clear();
        let mut lines = super::Source::Frame(super::frame::Frame::open_lines(&d).unwrap());
        let at = lines.headers().iter().position(|h| h == "email").unwrap();
        lines.start(&[at]).unwrap();
        let failed = loop {
            match lines.advance() {
                Ok(true) => {}
                Ok(false) => break None,
                Err(e) => break Some(e.to_string()),
            }
        };
        let failed = failed.unwrap_or_else(|| panic!("{name}: the read ended as if whole"));
        assert!(failed.contains("0x1D"), "{name}: {failed}");
    }
}
