//! Packed row ciphertexts from arbitrary bytes: layouts, public keys, ciphertexts and sums of
//! selected rows must be accepted or refused with an `AheError`, never a panic. A ciphertext
//! that decodes must encode back to the same bytes (encodings are canonical).
#![no_main]

use arbitrary::Arbitrary;
use cleanroom_circuits::ahe::packed::{RowCiphertext, RowLayout, RowPublicKey, sum_selected_rows};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    /// Cell widths (mostly invalid beyond 1..=4 or too many).
    widths: Vec<u8>,
    key: Vec<u8>,
    ciphertexts: Vec<u8>,
    rows: Vec<u32>,
}

fuzz_target!(|input: Input| {
    let widths: Vec<u8> = input.widths.iter().take(8).copied().collect();
    let Ok(layout) = RowLayout::new(&widths) else {
        return;
    };
    let _ = RowPublicKey::from_bytes(&layout, &input.key);
    let len = layout.ciphertext_len();
    for chunk in input.ciphertexts.chunks(len).take(4) {
        if let Ok(ct) = RowCiphertext::decode(&layout, chunk) {
            assert_eq!(ct.encode(), chunk, "decode/encode is not canonical");
        }
    }
    let rows: Vec<u32> = input.rows.iter().take(8).map(|r| r % 8).collect();
    let _ = sum_selected_rows(&layout, &input.ciphertexts, &rows);
});
