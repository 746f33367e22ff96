//! Packed Paillier row ciphertexts from arbitrary bytes: slot layouts, public keys, ciphertexts
//! and sums of selected rows must be accepted or refused with an `AheError`, never a panic. A
//! ciphertext that decodes must encode back to the same bytes (encodings are canonical), and the
//! public-key and secret-key decoders must agree on what they accept.
#![no_main]

use std::sync::LazyLock;

use arbitrary::Arbitrary;
use cleanroom_circuits::ahe::{self, PublicKey, RowCiphertext, SecretKey, SlotLayout, sum_selected_rows};
use libfuzzer_sys::fuzz_target;

/// One key for the whole run (safe-prime generation takes about a second).
static KEY: LazyLock<SecretKey> = LazyLock::new(|| ahe::keygen().expect("key generation"));

#[derive(Debug, Arbitrary)]
struct Input {
    /// Slot widths (mostly invalid outside 65..=97 or too many).
    widths: Vec<u8>,
    key: Vec<u8>,
    ciphertexts: Vec<u8>,
    rows: Vec<u32>,
}

fuzz_target!(|input: Input| {
    let _ = PublicKey::from_bytes(&input.key);
    let widths: Vec<u8> = input.widths.iter().take(40).copied().collect();
    let Ok(layout) = SlotLayout::new(&widths) else {
        return;
    };
    let pk = KEY.public();
    let len = layout.ciphertext_len();
    for chunk in input.ciphertexts.chunks(len).take(2) {
        let public = RowCiphertext::decode(pk, &layout, chunk);
        let own = RowCiphertext::decode_own(&KEY, &layout, chunk);
        assert_eq!(public.is_ok(), own.is_ok(), "the decoders disagree");
        if let Ok(ct) = public {
            assert_eq!(ct.encode(), chunk, "decode/encode is not canonical");
        }
    }
    let rows: Vec<u32> = input.rows.iter().take(4).map(|r| r % 4).collect();
    let _ = sum_selected_rows(pk, &layout, &input.ciphertexts, &rows);
});
