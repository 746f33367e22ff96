use super::*;
use crate::data::dataset::forget_hash;
use crate::data::normalise::NormaliseError;
use cleanroom_circuits::blind_items;
use datafusion::arrow::array::{BinaryArray, StringArray};
use datafusion::arrow::datatypes::Field;
use datafusion::config::ConfigOptions;

fn email() -> PartSpec {
    PartSpec {
        normaliser: Normaliser::Email,
        options: NormaliseOptions::default(),
    }
}

fn phone() -> PartSpec {
    PartSpec {
        normaliser: Normaliser::Phone,
        options: NormaliseOptions::default(),
    }
}

fn sealing() -> Arc<SealingKey> {
    Arc::new(SealingKey::from_bytes(&[7; 32]).expect("key"))
}

/// Runs the executor's function over `columns` (text, `None` = null) with `spec` sealed.
fn run(spec: &PassSpec, key: &Arc<SealingKey>, columns: &[Vec<Option<&str>>]) -> Vec<Vec<u8>> {
    try_run(spec, key, columns).expect("the pass runs")
}

fn try_run(
    spec: &PassSpec,
    key: &Arc<SealingKey>,
    columns: &[Vec<Option<&str>>],
) -> datafusion::error::Result<Vec<Vec<u8>>> {
    let udf = PassUdf::executor(Arc::clone(key));
    let rows = columns[0].len();
    let mut args = vec![ColumnarValue::Scalar(ScalarValue::Binary(Some(
        spec.seal(key).expect("seal"),
    )))];
    args.extend(
        columns
            .iter()
            .map(|c| ColumnarValue::Array(Arc::new(StringArray::from(c.clone())))),
    );
    let arg_fields = (0..args.len())
        .map(|i| Arc::new(Field::new(format!("a{i}"), DataType::Utf8, true)))
        .collect();
    let out = udf.invoke_with_args(ScalarFunctionArgs {
        args,
        arg_fields,
        number_rows: rows,
        return_field: Arc::new(Field::new("outcome", DataType::Binary, false)),
        config_options: Arc::new(ConfigOptions::default()),
    })?;
    let ColumnarValue::Array(out) = out else {
        panic!("an array")
    };
    let out = out.as_any().downcast_ref::<BinaryArray>().expect("binary");
    Ok((0..rows).map(|r| out.value(r).to_vec()).collect())
}

fn decoded(outcomes: &[Vec<u8>]) -> Vec<Outcome> {
    outcomes
        .iter()
        .map(|o| Outcome::decode(o).expect("an outcome"))
        .collect()
}

fn point_of(key: &JobKey, key_name: &str, item: &str) -> EncodedPoint {
    let mut items = ItemSet::new();
    items.push(item.as_bytes()).expect("push");
    blind_items(key, key_name, &items)[0]
}

#[test]
fn the_pass_gives_what_the_node_would_in_its_order() {
    let key = JobKey::generate();
    let copy = JobKey::from_secret_bytes(&key.to_secret_bytes()).expect("key");
    let secret = [9u8; 32];
    let forgotten_phone = forget_hash(&secret, b"+14155550109");
    let spec = PassSpec {
        key: copy,
        key_name: "email".into(),
        parts: vec![email()],
        consent: true,
        forget: Some(ForgetSpec {
            secret: Zeroizing::new(secret),
            hashes: [forgotten_phone].into_iter().collect(),
            parts: vec![email(), phone()],
        }),
        values: None,
        lines: None,
    };
    // Columns: the key (email), consent, then every declared identifier (email, phone).
    let emails = vec![
        Some(" Alice@Example.com "),
        Some("bob@example.com"),
        Some("carol@example.com"),
        Some("not-an-email"),
        Some("dave@example.com"),
        None,
        Some("line\nbreak@example.com"),
    ];
    let consent = vec![
        Some("yes"),
        Some("no"),
        Some("TRUE"),
        Some("1"),
        Some("true"),
        Some("yes"),
        Some("yes"),
    ];
    let phones = vec![
        Some("+1 415 555 0100"),
        None,
        Some("(415) 555-0109"),
        None,
        Some("garbage"),
        None,
        None,
    ];
    let out = decoded(&run(
        &spec,
        &sealing(),
        &[emails.clone(), consent, emails, phones],
    ));
    assert_eq!(
        out,
        vec![
            Outcome::Accepted(point_of(&key, "email", "alice@example.com")),
            Outcome::NoConsent,
            // Forgotten by its phone, though its email is fine.
            Outcome::Forgotten,
            Outcome::Rejected(0, Rejection::Normalise(NormaliseError::EmailNoAt)),
            // A phone that does not normalise does not make a row forgotten.
            Outcome::Accepted(point_of(&key, "email", "dave@example.com")),
            Outcome::Rejected(0, Rejection::Missing),
            // The line break is in the key column: its place (0) names it.
            Outcome::Malformed(Some(0), Malformed::LineBreak),
        ]
    );
}

#[test]
fn a_composite_key_joins_its_parts_as_the_node_does() {
    let key = JobKey::generate();
    let spec = PassSpec {
        key: JobKey::from_secret_bytes(&key.to_secret_bytes()).expect("key"),
        key_name: "email+phone".into(),
        parts: vec![email(), phone()],
        consent: false,
        forget: None,
        values: None,
        lines: None,
    };
    let out = decoded(&run(
        &spec,
        &sealing(),
        &[
            vec![Some("a@example.com"), Some("b@example.com")],
            vec![Some("+1 415 555 0100"), Some("12")],
        ],
    ));
    let joined = "a@example.com\u{1f}+14155550100";
    assert_eq!(
        out[0],
        Outcome::Accepted(point_of(&key, "email+phone", joined))
    );
    assert!(matches!(
        out[1],
        Outcome::Rejected(1, Rejection::Normalise(_))
    ));
}

#[test]
fn a_spec_opens_only_under_its_key_and_the_plan_carries_no_secret() {
    let key = JobKey::generate();
    let secret_bytes = key.to_secret_bytes();
    let spec = PassSpec {
        key,
        key_name: "email".into(),
        parts: vec![email()],
        consent: false,
        forget: None,
        values: None,
        lines: None,
    };
    let sealed = spec.seal(&sealing()).expect("seal");
    // The sealed bytes hold neither the key nor the key name in the clear.
    assert!(!sealed.windows(32).any(|w| w == secret_bytes.as_ref()));
    assert!(!sealed.windows(5).any(|w| w == b"email"));
    // Another key, or one changed byte, does not open it.
    let other = SealingKey::from_bytes(&[8; 32]).expect("key");
    assert!(other.open(AAD, &sealed).is_none());
    let mut changed = sealed.clone();
    let last = changed.len() - 1;
    changed[last] ^= 1;
    assert!(sealing().open(AAD, &changed).is_none());
    // Sealing twice gives two ciphertexts (fresh nonces).
    assert_ne!(spec.seal(&sealing()).expect("seal"), sealed);

    // The plan's display and its serialised form (what the scheduler stores and executors
    // receive) carry the ciphertext only.
    let udf = Arc::new(PassUdf::planner());
    let expr = datafusion::prelude::Expr::ScalarFunction(
        datafusion::logical_expr::expr::ScalarFunction::new_udf(
            udf,
            vec![
                datafusion::prelude::lit(ScalarValue::Binary(Some(sealed))),
                datafusion::prelude::col("email"),
            ],
        ),
    );
    let shown = format!("{expr} {expr:?}");
    let hex_key = hex::encode(secret_bytes.as_ref());
    assert!(!shown.contains(&hex_key));
    let bytes = datafusion_proto::bytes::Serializeable::to_bytes(&expr).expect("serialise");
    assert!(!bytes.windows(32).any(|w| w == secret_bytes.as_ref()));
}

#[test]
fn without_the_right_key_the_pass_fails_clearly() {
    let spec = PassSpec {
        key: JobKey::generate(),
        key_name: "email".into(),
        parts: vec![email()],
        consent: false,
        forget: None,
        values: None,
        lines: None,
    };
    let sealed = spec.seal(&sealing()).expect("seal");
    let call = |udf: ScalarUDF| {
        udf.invoke_with_args(ScalarFunctionArgs {
            args: vec![
                ColumnarValue::Scalar(ScalarValue::Binary(Some(sealed.clone()))),
                ColumnarValue::Array(Arc::new(StringArray::from(vec![Some("a@example.com")]))),
            ],
            arg_fields: vec![
                Arc::new(Field::new("s", DataType::Binary, false)),
                Arc::new(Field::new("e", DataType::Utf8, true)),
            ],
            number_rows: 1,
            return_field: Arc::new(Field::new("outcome", DataType::Binary, false)),
            config_options: Arc::new(ConfigOptions::default()),
        })
        .expect_err("refused")
        .to_string()
    };
    assert!(call(PassUdf::planner()).contains("no sealing key"));
    let other = Arc::new(SealingKey::from_bytes(&[8; 32]).expect("key"));
    assert!(call(PassUdf::executor(other)).contains("does not open"));
}

#[test]
fn hostile_outcomes_and_specs_are_refused_not_trusted() {
    assert_eq!(Outcome::decode(&[]), None);
    assert_eq!(Outcome::decode(&[9]), None);
    assert_eq!(Outcome::decode(&[ACCEPTED, 1, 2]), None);
    assert_eq!(Outcome::decode(&[NO_CONSENT, 0]), None);
    assert_eq!(Outcome::decode(&[REJECTED, 0, 99, 0, 0]), None);
    assert_eq!(PassSpec::decode(&[]).map(|_| ()), None);
    assert_eq!(PassSpec::decode(&[SPEC_VERSION; 40]).map(|_| ()), None);
    // A spec that claims more forgotten hashes than it holds reserves nothing.
    let spec = PassSpec {
        key: JobKey::generate(),
        key_name: "email".into(),
        parts: vec![email()],
        consent: false,
        forget: Some(ForgetSpec {
            secret: Zeroizing::new([1; 32]),
            hashes: HashSet::new(),
            parts: vec![email()],
        }),
        values: None,
        lines: None,
    };
    let mut bytes = spec.encode().expect("encode").to_vec();
    let n = bytes.len();
    // The count is the last field before the (absent) line layout's byte.
    bytes[n - 5..n - 1].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(PassSpec::decode(&bytes).map(|_| ()), None);
}

#[test]
fn every_rejection_the_normalisers_give_round_trips() {
    use NormaliseError as N;
    let all = [
        Rejection::LineBreak,
        Rejection::StrayQuote,
        Rejection::OpenQuote,
        Rejection::Missing,
        Rejection::Empty,
        Rejection::TooLong,
        Rejection::NotUtf8,
        Rejection::Separator,
        Rejection::Normalise(N::EmailEmpty),
        Rejection::Normalise(N::EmailNoAt),
        Rejection::Normalise(N::EmailManyAt),
        Rejection::Normalise(N::EmailEmptyLocal),
        Rejection::Normalise(N::EmailEmptyDomain),
        Rejection::Normalise(N::EmailWhitespace),
        Rejection::Normalise(N::PhoneEmpty),
        Rejection::Normalise(N::PhoneCountryCode),
        Rejection::Normalise(N::PhoneUnparsable),
        Rejection::Normalise(N::PhoneTooShort),
        Rejection::Normalise(N::PhoneTooLong),
        Rejection::Normalise(N::PhoneLength { digits: 17 }),
        Rejection::Normalise(N::GenericEmpty),
    ];
    for r in all {
        let code = r.to_code().expect("a code");
        assert_eq!(Rejection::from_code(code), Some(r));
    }
}

#[test]
fn a_sealing_key_file_is_read_and_bad_ones_are_named_not_quoted() {
    let dir = tempfile::tempdir().expect("dir");
    let good = dir.path().join("good.key");
    std::fs::write(&good, SealingKey::generate_hex().expect("hex").as_bytes()).expect("write");
    SealingKey::read(&good).expect("reads");
    let bad = dir.path().join("bad.key");
    std::fs::write(&bad, "not-a-secret-but-a-typo").expect("write");
    let e = SealingKey::read(&bad).expect_err("refused");
    assert!(e.contains("64 hex digits") && !e.contains("typo"), "{e}");
    let e = SealingKey::read(&dir.path().join("missing")).expect_err("refused");
    assert!(e.contains("cannot read"), "{e}");
}

/// An overlap's spec over lines laid out as `layout` (an email, then consent), and its key.
fn lines_spec(layout: LineLayout) -> (JobKey, PassSpec) {
    let key = JobKey::generate();
    let copy = JobKey::from_secret_bytes(&key.to_secret_bytes()).expect("key");
    let spec = PassSpec {
        key: copy,
        key_name: "email".into(),
        parts: vec![email()],
        consent: true,
        forget: None,
        values: None,
        lines: Some(layout),
    };
    (key, spec)
}

#[test]
fn a_csv_line_is_split_and_checked_as_the_node_reads_one() {
    // Header: id;note;email;consent. The function reads email (2), then consent (3).
    let (key, spec) = lines_spec(LineLayout::Csv(CsvLayout {
        delimiter: b';',
        width: 4,
        columns: vec![2, 3],
    }));
    let lines = vec![
        Some("1;plain;Alice@Example.com;yes"),
        // A quote in a field not read is text, as in the local reader.
        Some("2;5\" screen;bob@example.com;yes"),
        Some("3;\"a; quoted\";\"carol@example.com\";yes"),
        Some("4;too;few"),
        Some("5;x;dave@example.com;yes;extra"),
        Some("6;\"left open;erin@example.com;yes"),
        Some("7;x;\"frank\"\"@example.com\";yes"),
        Some("8;x;gina@example.com;\"no"),
        Some("9;x;hank@example.com;no"),
    ];
    let out = decoded(&run(&spec, &sealing(), &[lines]));
    let count = |found| Malformed::FieldCount { expected: 4, found };
    assert_eq!(
        out,
        vec![
            Outcome::Accepted(point_of(&key, "email", "alice@example.com")),
            Outcome::Accepted(point_of(&key, "email", "bob@example.com")),
            Outcome::Accepted(point_of(&key, "email", "carol@example.com")),
            Outcome::Malformed(None, count(3)),
            Outcome::Malformed(None, count(5)),
            // The open quote swallowed the rest of its line: two fields short.
            Outcome::Malformed(None, count(2)),
            // The email (the function's column 0) holds a quote.
            Outcome::Malformed(Some(0), Malformed::StrayQuote),
            Outcome::Malformed(None, Malformed::OpenQuote),
            Outcome::NoConsent,
        ]
    );
}

/// A line that holds a line break came from a field the engine's reader took as quoted (it
/// started with the byte 0x1D): the lines in it cannot be counted one by one, so the pass fails,
/// saying so, rather than count them as one rejected row.
#[test]
fn a_line_that_swallowed_lines_fails_the_pass() {
    for layout in [
        LineLayout::Csv(CsvLayout {
            delimiter: b',',
            width: 2,
            columns: vec![0, 1],
        }),
        LineLayout::Json(JsonLayout {
            paths: vec![vec!["email".into()], vec!["consent".into()]],
        }),
    ] {
        let (_, spec) = lines_spec(layout);
        let lines = vec![
            Some("a@x.com,yes"),
            Some("b@x.com,yes\nc@x.com,yes\r\nd@x.com"),
        ];
        let err = try_run(&spec, &sealing(), &[lines]).expect_err("the pass fails");
        assert!(err.to_string().contains(SPANNED_LINES), "{err}");
    }
}

#[test]
fn a_json_line_is_read_and_checked_as_the_node_reads_one() {
    // The function reads customer.email, then consent.
    let (key, spec) = lines_spec(LineLayout::Json(JsonLayout {
        paths: vec![
            vec!["customer".into(), "email".into()],
            vec!["consent".into()],
        ],
    }));
    let lines = vec![
        Some(r#"{"customer": {"email": "Alice@Example.com"}, "consent": "yes", "n": [1]}"#),
        Some(r#"{"consent": true, "customer": {"email": "bob@example.com"}}"#),
        Some(r#"{"customer": {"email": "carol@example.com"}, "consent": "yes""#),
        Some(r#"["dave@example.com"]"#),
        Some(r#"{"customer": {"email": ["erin@example.com"]}, "consent": "yes"}"#),
        Some(r#"{"customer": {"email": "frank@example.com"}, "consent": {"v": 1}}"#),
        Some(r#"{"customer": {"email": "gina@example.com"}, "consent": "no"}"#),
        Some(r#"{"customer": null, "consent": "yes"}"#),
    ];
    let out = decoded(&run(&spec, &sealing(), &[lines]));
    assert_eq!(
        out,
        vec![
            Outcome::Accepted(point_of(&key, "email", "alice@example.com")),
            Outcome::Accepted(point_of(&key, "email", "bob@example.com")),
            Outcome::Malformed(None, Malformed::NotJsonObject),
            Outcome::Malformed(None, Malformed::NotJsonObject),
            Outcome::Malformed(Some(0), Malformed::NotOneValue),
            Outcome::Malformed(Some(1), Malformed::NotOneValue),
            Outcome::NoConsent,
            Outcome::Rejected(0, Rejection::Missing),
        ]
    );
}

#[test]
fn every_malformed_outcome_round_trips() {
    for (place, why) in [
        (Some(0), Malformed::LineBreak),
        (Some(3), Malformed::StrayQuote),
        (None, Malformed::OpenQuote),
        (
            None,
            Malformed::FieldCount {
                expected: 7,
                found: 70_000,
            },
        ),
    ] {
        let mut out = Vec::new();
        malformed_outcome(&mut out, place, why);
        assert_eq!(Outcome::decode(&out), Some(Outcome::Malformed(place, why)));
    }
    assert_eq!(Outcome::decode(&[MALFORMED, 0, 0, 9]), None);
    assert_eq!(Outcome::decode(&[MALFORMED, 0, 0, FIELD_COUNT, 1]), None);
}

#[test]
fn a_line_layout_that_does_not_fit_is_refused() {
    let spec = |columns: Vec<usize>| PassSpec {
        key: JobKey::generate(),
        key_name: "email".into(),
        parts: vec![email()],
        consent: true,
        forget: None,
        values: None,
        lines: Some(LineLayout::Csv(CsvLayout {
            delimiter: b',',
            width: 3,
            columns,
        })),
    };
    let decodes = |s: PassSpec| PassSpec::decode(&s.encode().expect("encode")).is_some();
    assert!(decodes(spec(vec![0, 2])));
    assert_eq!(
        PassSpec::decode(&spec(vec![0, 2]).encode().expect("encode")).and_then(|s| s.lines),
        Some(LineLayout::Csv(CsvLayout {
            delimiter: b',',
            width: 3,
            columns: vec![0, 2]
        }))
    );
    // A field past the header's width, or another number of columns than the spec reads.
    assert!(!decodes(spec(vec![0, 3])));
    assert!(!decodes(spec(vec![0])));
    assert!(!decodes(spec(vec![0, 1, 2])));
}

#[test]
fn a_value_holders_pass_returns_each_rows_group_and_values() {
    let key = JobKey::generate();
    let copy = JobKey::from_secret_bytes(&key.to_secret_bytes()).expect("key");
    // Columns: the key (email), then the summed columns (amount, fee), then the group.
    let spec = PassSpec {
        key: copy,
        key_name: "email".into(),
        parts: vec![email()],
        consent: false,
        forget: None,
        values: Some(ValuesSpec {
            sums: 2,
            groups: Some(vec!["fraud".into(), "dispute".into()]),
        }),
        lines: None,
    };
    let emails = vec![
        Some("a@x.com"),
        Some("b@x.com"),
        Some("c@x.com"),
        Some("d@x.com"),
        Some("not-an-email"),
    ];
    let amounts = vec![Some(" 50 "), Some("-7"), Some("5"), Some("n/a"), Some("1")];
    let fees = vec![Some("1"), Some("2"), Some("3"), Some("4"), Some("x")];
    let groups = vec![Some(" dispute "), Some("fraud"), Some("travel"), None, None];
    let out = decoded(&run(&spec, &sealing(), &[emails, amounts, fees, groups]));
    let point = |e: &str| point_of(&key, "email", e);
    assert_eq!(
        out,
        vec![
            Outcome::Valued(point("a@x.com"), 1, vec![50, 1]),
            Outcome::Valued(point("b@x.com"), 0, vec![-7, 2]),
            // A label not listed is the group after the listed ones.
            Outcome::Valued(point("c@x.com"), 2, vec![5, 3]),
            Outcome::BadValue,
            // The key is checked first: a bad key is rejected, whatever its values.
            Outcome::Rejected(0, Rejection::Normalise(NormaliseError::EmailNoAt)),
        ]
    );

    // Ungrouped, from CSV lines: every row is group 0.
    let spec = PassSpec {
        key: JobKey::from_secret_bytes(&key.to_secret_bytes()).expect("key"),
        key_name: "email".into(),
        parts: vec![email()],
        consent: false,
        forget: None,
        values: Some(ValuesSpec {
            sums: 1,
            groups: None,
        }),
        lines: Some(LineLayout::Csv(CsvLayout {
            delimiter: b',',
            width: 3,
            columns: vec![0, 2],
        })),
    };
    let lines = vec![Some("a@x.com,note,12"), Some("b@x.com,note,")];
    let out = decoded(&run(&spec, &sealing(), &[lines]));
    assert_eq!(
        out,
        vec![
            Outcome::Valued(point("a@x.com"), 0, vec![12]),
            Outcome::BadValue
        ]
    );
    // The spec round trips, values included.
    let decoded_spec = PassSpec::decode(&spec.encode().expect("encode")).expect("decodes");
    assert_eq!(decoded_spec.values, spec.values);
    assert_eq!(Outcome::decode(&[VALUED; 1 + POINT_LEN + 4 + 3]), None);
}
