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
    let [cell, value, person, group] = AggregateUdf::executors(key);
    let udf = match output {
        Output::Cell => cell,
        Output::Value => value,
        Output::Person => person,
        Output::Group => group,
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
        Output::Cell | Output::Person => DataType::Binary,
        Output::Value | Output::Group => DataType::Int64,
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
        person: false,
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
        person: false,
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
        person: false,
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
    let [planner, ..] = AggregateUdf::planners();
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

/// Per-person clipping as plan operators, run here over the executors' functions: each
/// person's rows summed per group, the person kept in the first of the job's groups its rows
/// carry, that sum clipped, and per cell the persons, their rows and the rows they left out.
/// The figures are the node's own pass's (`aggregate_input` tests, the same rows).
#[tokio::test]
async fn per_person_grouping_keeps_each_persons_first_listed_group_and_clips_it() {
    use datafusion::arrow::array::{Decimal128Array, RecordBatch};
    use datafusion::prelude::{SessionContext, col};
    let rows = [
        ("a", "600", "p1"),
        ("a", "700", "p1"),
        ("b", "50", "p1"),
        ("a", "10", "p2"),
        ("a", "20", "p2"),
        ("b", "5000", "p3"),
        ("a", "1", " "),
        ("zzz", "3", "p4"),
        ("zzz", "4", "p4"),
        ("b", "9", "p5"),
        ("a", "8", "p5"),
        ("b", "1", "p5"),
        ("a", "lots", "p6"),
    ];
    let text = |i: usize| -> ArrayRef {
        Arc::new(StringArray::from(
            rows.iter().map(|r| [r.0, r.1, r.2][i]).collect::<Vec<_>>(),
        ))
    };
    let batch = RecordBatch::try_from_iter(vec![
        ("category", text(0)),
        ("amount", text(1)),
        ("customer", text(2)),
    ])
    .expect("batch");
    let spec = AggregateSpec {
        domain: labels(&["a", "b"]),
        bounds: vec![(0, 1000)],
        person: true,
        consent: false,
        forget: None,
        lines: None,
    };
    let key = sealing();
    let sealed = spec.seal(&key).expect("seal");
    let udfs = AggregateUdf::executors(&key).map(Arc::new);
    let udf = |output: Output| {
        Arc::clone(match output {
            Output::Cell => &udfs[0],
            Output::Value => &udfs[1],
            Output::Person => &udfs[2],
            Output::Group => &udfs[3],
        })
    };
    let ctx = SessionContext::new();
    let frame = ctx.read_batch(batch).expect("frame");
    let columns = vec![col("category"), col("amount"), col("customer")];
    let grouped =
        crate::data::source::frame::grouped_by_person(frame, (&sealed, udf), columns, &spec.bounds)
            .expect("plan");
    let mut got = std::collections::BTreeMap::new();
    for batch in grouped.collect().await.expect("run") {
        let cells = batch
            .column(0)
            .as_any()
            .downcast_ref::<BinaryArray>()
            .expect("cells");
        let persons = batch
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("count");
        let figure = |c: usize, r: usize| {
            let a = batch.column(c).as_any().downcast_ref::<Decimal128Array>();
            a.expect("a decimal").value(r)
        };
        for r in 0..batch.num_rows() {
            let cell = Cell::decode(cells.value(r)).expect("a cell");
            got.insert(
                cell,
                (persons.value(r), figure(2, r), figure(3, r), figure(4, r)),
            );
        }
    }
    // (persons, rows, rows left out, clipped sum)
    let want = std::collections::BTreeMap::from([
        // p1 (1300 → 1000, its b row left out), p2 (30), p5 (8, its two b rows left out).
        (Cell::Counted(0), (3, 5, 3, 1038)),
        // p3 (5000 → 1000).
        (Cell::Counted(1), (1, 1, 0, 1000)),
        // "(other)": p4 (7).
        (Cell::Counted(2), (1, 2, 0, 7)),
        // The row without a person and the row without a number: one cell, two rows.
        (Cell::Rejected, (1, 2, 0, 0)),
    ]);
    assert_eq!(got, want);
}
