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
    let source = super::Source::open(&d).unwrap();
    assert_eq!(source.view_reads(), ["consent_fraud", "contact", "email"]);
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

/// A view's CSV columns are typed from the first rows: numbers compare as numbers, a column of
/// phone numbers with a leading 0 stays text with its 0, and a later value that is not a number
/// rejects its row instead of failing the read.
#[test]
fn a_view_types_csv_columns_keeps_leading_zeros_and_rejects_a_later_misfit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("orders.csv");
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
    std::fs::write(&path, csv).unwrap();
    let d = view_over(
        "orders",
        &path,
        "SELECT email, phone FROM orders \
         WHERE amount >= 500 AND extract(day FROM day) <= 14",
        Delimiter::default(),
    );
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
