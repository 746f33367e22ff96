use super::*;
use crate::data::cluster_lines::CsvLayout;
use crate::data::cluster_pass::{PartSpec, PassSpec};
use crate::data::normalise::{NormaliseOptions, Normaliser};
use datafusion::arrow::array::{Array, BinaryArray, Int64Array, StringArray};
use datafusion::arrow::datatypes::Field;
use datafusion::config::ConfigOptions;

fn sealing() -> Arc<SealingKey> {
    Arc::new(SealingKey::from_bytes(&[5; 32]).expect("key"))
}

fn labels(domain: &[&str]) -> GroupDomain {
    GroupDomain::Labels(domain.iter().map(|s| (*s).to_owned()).collect())
}

/// Runs one of the functions over `columns` (text, `None` = null) with `spec` sealed under
/// `key`; `lead` goes between the spec and the columns (a value's index).
fn invoke(
    output: Output,
    sealed: Vec<u8>,
    key: &Arc<SealingKey>,
    lead: Option<i64>,
    columns: &[Vec<Option<&str>>],
) -> datafusion::error::Result<ColumnarValue> {
    let [cell, value] = AggregateUdf::executors(key);
    let udf = match output {
        Output::Cell => cell,
        Output::Value => value,
    };
    let rows = columns[0].len();
    let mut args = vec![ColumnarValue::Scalar(ScalarValue::Binary(Some(sealed)))];
    args.extend(lead.map(|i| ColumnarValue::Scalar(ScalarValue::Int64(Some(i)))));
    args.extend(
        columns
            .iter()
            .map(|c| ColumnarValue::Array(Arc::new(StringArray::from(c.clone())))),
    );
    let arg_fields = (0..args.len())
        .map(|i| Arc::new(Field::new(format!("a{i}"), DataType::Utf8, true)))
        .collect();
    let returns = match output {
        Output::Cell => DataType::Binary,
        Output::Value => DataType::Int64,
    };
    udf.invoke_with_args(ScalarFunctionArgs {
        args,
        arg_fields,
        number_rows: rows,
        return_field: Arc::new(Field::new("out", returns, false)),
        config_options: Arc::new(ConfigOptions::default()),
    })
}

/// Each row's cell and clipped values, as the executors give them.
fn run(spec: &AggregateSpec, columns: &[Vec<Option<&str>>]) -> Vec<(Cell, Vec<i64>)> {
    let key = sealing();
    let sealed = spec.seal(&key).expect("seal");
    let array = |out: ColumnarValue| match out {
        ColumnarValue::Array(a) => a,
        ColumnarValue::Scalar(_) => panic!("an array"),
    };
    let cells = array(invoke(Output::Cell, sealed.clone(), &key, None, columns).expect("runs"));
    let cells = cells
        .as_any()
        .downcast_ref::<BinaryArray>()
        .expect("binary");
    let values: Vec<ArrayRef> = (0..spec.bounds.len())
        .map(|i| {
            array(
                invoke(Output::Value, sealed.clone(), &key, Some(i as i64), columns).expect("runs"),
            )
        })
        .collect();
    (0..cells.len())
        .map(|r| {
            let cell = Cell::decode(cells.value(r)).expect("a cell");
            let row_values = values
                .iter()
                .map(|v| {
                    v.as_any()
                        .downcast_ref::<Int64Array>()
                        .expect("i64")
                        .value(r)
                })
                .collect();
            (cell, row_values)
        })
        .collect()
}

/// The same file as `aggregate_input`'s `vector_counts_clips_and_collects_other`: the
/// executors' cells give the node's figures.
#[test]
fn the_executors_classify_rows_as_the_node_does() {
    let spec = AggregateSpec {
        domain: labels(&["a", "b"]),
        bounds: vec![(0, 1000)],
        consent: true,
        forget: None,
        lines: None,
    };
    // Columns: the group, the amount, the consent.
    let out = run(
        &spec,
        &[
            vec![
                Some("a"),
                Some("b"),
                Some("a"),
                Some("zzz"),
                Some("b"),
                Some(" a "),
            ],
            vec![
                Some("100"),
                Some("5000"),
                Some("-7"),
                Some("10"),
                Some("abc"),
                Some("1"),
            ],
            vec![
                Some("yes"),
                Some("yes"),
                Some("no"),
                Some("yes"),
                Some("yes"),
                Some("yes"),
            ],
        ],
    );
    assert_eq!(
        out,
        vec![
            (Cell::Counted(0), vec![100]),
            (Cell::Counted(1), vec![1000]),
            (Cell::NoConsent, vec![0]),
            (Cell::Counted(2), vec![10]),
            (Cell::Rejected, vec![0]),
            (Cell::Counted(0), vec![1]),
        ]
    );
}

#[test]
fn integer_groups_lines_and_forgotten_subjects() {
    let secret = [3u8; 32];
    let email = PartSpec {
        normaliser: Normaliser::Email,
        options: NormaliseOptions::default(),
    };
    let forgotten = crate::data::dataset::forget_hash(&secret, b"gone@x.com");
    // Lines of `bucket,amount,email`; the functions read all three, the email for the
    // deletion list.
    let spec = AggregateSpec {
        domain: GroupDomain::range(10, 13).expect("range"),
        bounds: vec![(0, 1000)],
        consent: false,
        forget: Some(ForgetSpec {
            secret: Zeroizing::new(secret),
            hashes: [forgotten].into_iter().collect(),
            parts: vec![email],
        }),
        lines: Some(LineLayout::Csv(CsvLayout {
            delimiter: b',',
            width: 3,
            columns: vec![0, 1, 2],
        })),
    };
    let out = run(
        &spec,
        &[vec![
            Some("10,5,a@x.com"),
            Some(" 12 ,2000,b@x.com"),
            Some("13,4,c@x.com"),
            Some("x,9,d@x.com"),
            Some("11,3,GONE@x.com"),
            Some("11,3"),
            Some("10,\"7,e@x.com"),
        ]],
    );
    assert_eq!(
        out,
        vec![
            (Cell::Counted(0), vec![5]),
            (Cell::Counted(2), vec![1000]),
            // Out of the range: "(other)".
            (Cell::Counted(3), vec![4]),
            (Cell::Rejected, vec![0]),
            (Cell::Forgotten, vec![0]),
            (Cell::Malformed(MalformedKind::FieldCount), vec![0]),
            (Cell::Malformed(MalformedKind::FieldCount), vec![0]),
        ]
    );
}

#[test]
fn a_spec_round_trips_and_opens_only_for_its_use() {
    let spec = AggregateSpec {
        domain: labels(&["fraud", "dispute"]),
        bounds: vec![(-5, 10), (0, i64::MAX)],
        consent: true,
        forget: None,
        lines: Some(LineLayout::Csv(CsvLayout {
            delimiter: b';',
            width: 9,
            columns: vec![3, 1, 4, 8],
        })),
    };
    let decoded = AggregateSpec::decode(&spec.encode().expect("encode")).expect("decodes");
    assert_eq!(decoded.domain, spec.domain);
    assert_eq!(decoded.bounds, spec.bounds);
    assert_eq!(decoded.lines, spec.lines);
    assert!(AggregateSpec::decode(&[]).is_none());
    assert!(AggregateSpec::decode(&[SPEC_VERSION; 40]).is_none());
    // A layout that does not give every column the functions read is refused.
    let mut short = spec;
    short.lines = Some(LineLayout::Csv(CsvLayout {
        delimiter: b';',
        width: 9,
        columns: vec![3, 1],
    }));
    assert!(AggregateSpec::decode(&short.encode().expect("encode")).is_none());

    // An overlap's sealed spec does not open as an aggregate's, under the same key.
    let key = sealing();
    let pass = PassSpec {
        key: cleanroom_circuits::JobKey::generate(),
        key_name: "email".into(),
        parts: Vec::new(),
        consent: false,
        forget: None,
        values: None,
        lines: None,
    };
    let err = invoke(
        Output::Cell,
        pass.seal(&key).expect("seal"),
        &key,
        None,
        &[vec![Some("a")]],
    )
    .expect_err("refused");
    assert!(err.to_string().contains("does not open"), "{err}");
    // Without a key, the functions refuse to run and say why.
    let [planner, _] = AggregateUdf::planners();
    let err = planner
        .invoke_with_args(ScalarFunctionArgs {
            args: vec![],
            arg_fields: vec![],
            number_rows: 0,
            return_field: Arc::new(Field::new("out", DataType::Binary, false)),
            config_options: Arc::new(ConfigOptions::default()),
        })
        .expect_err("refused");
    assert!(err.to_string().contains("no sealing key"), "{err}");
}

#[test]
fn hostile_cells_are_refused() {
    for cell in [
        Cell::Malformed(MalformedKind::OpenQuote),
        Cell::NoConsent,
        Cell::Forgotten,
        Cell::Rejected,
        Cell::Counted(70_000),
    ] {
        assert_eq!(Cell::decode(&cell.encode()), Some(cell));
    }
    for bytes in [&[][..], &[9], &[1, 9], &[2, 0], &[5, 1, 2]] {
        assert_eq!(Cell::decode(bytes), None, "{bytes:?}");
    }
}
