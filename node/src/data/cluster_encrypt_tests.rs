use super::*;
use cleanroom_circuits::ahe::{NOISE_BIAS, RowCiphertext, decrypt_cells, keygen};
use datafusion::arrow::array::{Array, BinaryArray};
use std::sync::OnceLock;

fn sealing() -> Arc<SealingKey> {
    Arc::new(SealingKey::from_bytes(&[7; 32]).expect("a key"))
}

/// One Paillier key for the module (safe primes take seconds in a debug build).
fn paillier() -> &'static SecretKey {
    static KEY: OnceLock<SecretKey> = OnceLock::new();
    KEY.get_or_init(|| keygen().expect("a key"))
}

fn layout() -> SlotLayout {
    SlotLayout::for_maxima(&[1, 1 << 56]).expect("a layout")
}

/// A value no other byte of a plan would hold by chance.
const MARK: u64 = 0x0011_2233_4455_6677;

fn rows() -> Vec<u64> {
    vec![1, MARK, 0, 7, 1, 123_456_789]
}

/// Runs the executor's function on one row of sealed rows, as a task would.
fn run(
    udf: &ScalarUDF,
    sealed_key: Vec<u8>,
    sealed_rows: &[u8],
) -> datafusion::error::Result<Vec<u8>> {
    use datafusion::arrow::datatypes::Field;
    let args = ScalarFunctionArgs {
        args: vec![
            ColumnarValue::Scalar(ScalarValue::Binary(Some(sealed_key))),
            ColumnarValue::Scalar(ScalarValue::Utf8(Some(hex::encode(sealed_rows)))),
        ],
        arg_fields: vec![
            Arc::new(Field::new("k", DataType::Binary, true)),
            Arc::new(Field::new("r", DataType::Utf8, true)),
        ],
        number_rows: 1,
        return_field: Arc::new(Field::new("out", DataType::Binary, true)),
        config_options: Arc::new(datafusion::config::ConfigOptions::default()),
    };
    let ColumnarValue::Array(out) = udf.invoke_with_args(args)? else {
        panic!("an array");
    };
    let out = out.as_any().downcast_ref::<BinaryArray>().expect("binary");
    Ok(out.value(0).to_vec())
}

#[test]
fn an_executor_encrypts_rows_the_key_owner_decrypts_in_their_order() {
    let sealing = sealing();
    let (key, layout) = (paillier(), layout());
    let sealed_key = seal_key(&sealing, key, &layout).expect("sealed");
    let sealed_rows = seal_rows(&sealing, &rows()).expect("sealed");
    let udf = EncryptUdf::executor(Arc::clone(&sealing));
    let out = run(&udf, sealed_key.clone(), &sealed_rows).expect("runs");
    let len = layout.ciphertext_len();
    assert_eq!(out.len(), 3 * len);
    let decrypted: Vec<i128> = out
        .chunks_exact(len)
        .flat_map(|c| {
            let ct = RowCiphertext::decode_own(key, &layout, c).expect("a ciphertext");
            decrypt_cells(key, &layout, &ct).expect("decrypts")
        })
        // Decryption takes off the bias the summing party adds its noise to.
        .map(|cell| cell + i128::try_from(NOISE_BIAS).expect("a bias"))
        .collect();
    assert_eq!(
        decrypted,
        rows().into_iter().map(i128::from).collect::<Vec<_>>()
    );
    // Fresh randomness for each call: the same rows never encrypt alike.
    assert_ne!(run(&udf, sealed_key, &sealed_rows).expect("runs"), out);
}

#[test]
fn a_value_wider_than_its_cell_fails_the_piece_without_quoting_it() {
    let sealing = sealing();
    let layout = layout();
    let sealed_key = seal_key(&sealing, paillier(), &layout).expect("sealed");
    // The first cell holds values below 2^32.
    let sealed_rows = seal_rows(&sealing, &[MARK, 1]).expect("sealed");
    let err = run(
        &EncryptUdf::executor(Arc::clone(&sealing)),
        sealed_key,
        &sealed_rows,
    )
    .expect_err("too wide");
    let shown = err.to_string();
    assert!(shown.contains(UDF_NAME), "{shown}");
    assert!(!shown.contains(&MARK.to_string()), "{shown}");
}

/// What the scheduler gets and shows: the plan holds the primes and the rows only sealed.
#[test]
fn a_pieces_plan_holds_the_key_and_the_rows_only_sealed() {
    let sealing = sealing();
    let (key, layout) = (paillier(), layout());
    let sealed_key = seal_key(&sealing, key, &layout).expect("sealed");
    let sealed_rows = seal_rows(&sealing, &rows()).expect("sealed");
    let ctx = SessionContext::new();
    let plan = piece_plan(sealed_key, &sealed_rows).expect("a plan");
    let plan = ctx.state().optimize(&plan).expect("optimized");
    let shown = format!("{}{:?}", plan.display_indent(), plan);
    // Not folded into a constant where it is planned (no key there).
    assert!(shown.contains(UDF_NAME), "{shown}");
    let bytes = datafusion_proto::bytes::logical_plan_to_bytes(&plan).expect("encoded");
    let primes = key.prime_bytes();
    for prime in primes.chunks(primes.len() / 2) {
        // Any 32-byte run of either prime, raw or in hex.
        let run = &prime[40..72];
        assert!(!bytes.windows(32).any(|w| w == run), "a prime in the plan");
        assert!(!shown.contains(&hex::encode(run)), "a prime shown");
    }
    let mark = MARK.to_le_bytes();
    assert!(!bytes.windows(8).any(|w| w == mark), "a value in the plan");
    assert!(!shown.contains(&hex::encode(mark)) && !shown.contains(&MARK.to_string()));
    // The physical plan, as the scheduler logs each job's: no sealed rows either.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    let physical = runtime
        .block_on(ctx.state().create_physical_plan(&plan))
        .expect("a physical plan");
    let logged = datafusion::physical_plan::displayable(physical.as_ref())
        .indent(true)
        .to_string();
    assert!(logged.contains(UDF_NAME), "{logged}");
    assert!(
        !logged.contains(&hex::encode(&sealed_rows[..16])),
        "{logged}"
    );
}

#[test]
fn only_the_executors_key_opens_it_and_never_for_another_use() {
    let sealing = sealing();
    let (key, layout) = (paillier(), layout());
    let sealed_key = seal_key(&sealing, key, &layout).expect("sealed");
    let sealed_rows = seal_rows(&sealing, &rows()).expect("sealed");
    // No key: the function plans but refuses to run.
    let err = run(&EncryptUdf::planner(), sealed_key.clone(), &sealed_rows).expect_err("no key");
    assert!(err.to_string().contains("no sealing key"), "{err}");
    // Another executor key.
    let other = Arc::new(SealingKey::from_bytes(&[8; 32]).expect("a key"));
    let err = run(
        &EncryptUdf::executor(other),
        sealed_key.clone(),
        &sealed_rows,
    )
    .expect_err("wrong key");
    assert!(err.to_string().contains("does not open"), "{err}");
    // The key and the rows swapped: each is sealed for its own use.
    let executor = EncryptUdf::executor(Arc::clone(&sealing));
    let err = run(&executor, sealed_rows.clone(), &sealed_key).expect_err("swapped");
    assert!(err.to_string().contains("does not open"), "{err}");
    // Rows that are not whole rows of the layout.
    let ragged = seal_rows(&sealing, &[1, 2, 3]).expect("sealed");
    let err = run(&executor, sealed_key.clone(), &ragged).expect_err("ragged");
    assert!(err.to_string().contains("whole rows"), "{err}");
    // A spec of another version.
    let mut plain = vec![SPEC_VERSION + 1, 2];
    plain.extend_from_slice(layout.widths());
    plain.extend_from_slice(&key.prime_bytes());
    let future = sealing.seal(KEY_AAD, &plain).expect("sealed");
    let err = run(&executor, future, &sealed_rows).expect_err("another version");
    assert!(err.to_string().contains("another version"), "{err}");
    // No error quotes the primes.
    let hex = hex::encode(&key.prime_bytes()[..16]);
    assert!(!err.to_string().contains(&hex));
}

#[test]
fn a_piece_holds_at_most_four_mebibytes_of_ciphertexts() {
    let layout = layout();
    let rows = piece_rows(&layout);
    // Two cells in one Paillier plaintext: 512 bytes a row, 8 192 rows a piece.
    assert_eq!((layout.ciphertext_len(), rows), (512, 8192));
    assert!(rows * layout.ciphertext_len() <= PIECE_OUTPUT_BYTES);
    assert!((rows + 1) * layout.ciphertext_len() > PIECE_OUTPUT_BYTES);
}

#[test]
fn pieces_out_take_a_sixteenth_of_a_memory_limit() {
    assert_eq!(pieces_within(1 << 30), 16);
    assert_eq!(pieces_within(256 << 20), 4);
    assert_eq!(pieces_within(1 << 20), 1, "always one");
}
