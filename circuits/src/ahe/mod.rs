//! Additively homomorphic encryption for intersection-sum with cardinality (Ion et al.,
//! EuroS&P 2020): the value holder encrypts each row's cells, the other party adds up the
//! ciphertexts of matched rows, adds DP noise under encryption, re-randomises and returns the
//! sum; only the value holder can decrypt, and only the noised totals.
//!
//! The scheme is Paillier with a 2048-bit modulus ([`paillier`]), as in Google's Private Join
//! and Compute, with several cells packed per plaintext in slots with headroom so that sums never
//! carry ([`packed`]). Each cell is **one slot that the key owner decrypts whole**: it learns per
//! cell the sum plus the noise, never a part of a cell on its own. docs/HOMOMORPHIC.md records the
//! choice and its measurements.
//!
//! # Trust model
//!
//! Semi-honest, as the PSI it rides on. The summing party must re-randomise before returning a
//! sum: the key owner can recover the randomness of what it decrypts, and the product of its
//! rows' randomness would tell it which rows were summed. Decoders check every byte (length,
//! range below `n²`, no factor shared with `n`) and never panic. Secret keys are move-only,
//! zeroized on drop and print as `<redacted>`.
pub mod packed;
pub mod paillier;

pub use packed::{
    MAX_ROW_CELLS, MAX_SUMMANDS, NOISE_BIAS, RowCiphertext, RowSum, SlotLayout, decrypt_cells,
    encrypt_rows, sum_selected_rows,
};
pub use paillier::{
    CIPHERTEXT_LEN, Ciphertext, MODULUS_BITS, PRIME_BYTES_LEN, PUBLIC_KEY_LEN, PublicKey,
    SecretKey, keygen,
};

/// Why an encoding was rejected, a key could not be made or a decryption failed. Carries only
/// lengths and indices.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AheError {
    /// An encoding of the wrong length (for a batch: not a multiple of `expected`).
    #[error("encoding of {len} bytes, expected {expected} (or a multiple, for a batch)")]
    WrongLength {
        /// The length received.
        len: usize,
        /// The length of one encoding.
        expected: usize,
    },
    /// A ciphertext that is not below `n²`.
    #[error("ciphertext is not below n²")]
    OutOfRange,
    /// A ciphertext that shares a factor with `n` (zero included): no encryption is.
    #[error("ciphertext is not invertible modulo n² (it shares a factor with n)")]
    NotAUnit,
    /// A public key that cannot be one (wrong size, even, a small factor).
    #[error("public key refused: {0}")]
    BadPublicKey(&'static str),
    /// Key generation failed (the text names the step, never a value).
    #[error("key generation failed: {0}")]
    KeyGeneration(&'static str),
    /// A row of a batch that does not decode.
    #[error("ciphertext at row {row} is invalid: {source}")]
    InvalidCiphertext {
        /// The row's index in the batch.
        row: u32,
        /// Why it was rejected.
        source: Box<AheError>,
    },
    /// A row index past the end of the batch.
    #[error("row index {index} is past the end of a batch of {rows} ciphertexts")]
    IndexOutOfRange {
        /// The offending index.
        index: u32,
        /// Ciphertexts in the batch.
        rows: usize,
    },
    /// More summands than the slots are sized for.
    #[error("{count} ciphertexts to sum, more than the supported {max}")]
    TooManySummands {
        /// Indices given.
        count: usize,
        /// [`MAX_SUMMANDS`].
        max: usize,
    },
    /// A slot layout that cannot be used, or noise, a key or a ciphertext that does not fit it.
    #[error("slot layout: {0}")]
    BadLayout(String),
    /// A value wider than its cell's slot allows (values must be clipped first).
    #[error("value of row {row}, cell {cell} is wider than its cell")]
    ValueTooWide {
        /// The row.
        row: u32,
        /// The cell.
        cell: usize,
    },
    /// A decrypted plaintext with bits above its last slot: not a sum of this layout's rows plus
    /// one noise per cell.
    #[error("plaintext {ciphertext} of the sum has bits above its last slot")]
    StrayBits {
        /// Which ciphertext of the row.
        ciphertext: usize,
    },
}
