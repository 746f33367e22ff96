//! Additively homomorphic encryption for intersection-sum with cardinality (Ion et al.,
//! EuroS&P 2020): the value holder encrypts each row's values, the other party adds up the
//! ciphertexts of matched rows, adds DP noise under encryption, re-randomises and returns one
//! ciphertext per output cell; only the value holder can decrypt, and only the noised total.
//!
//! The scheme is behind the small [`AdditiveScheme`] trait. The implementation chosen by
//! measurement (docs/HOMOMORPHIC.md) is [`ExpElGamal`]: exponential ElGamal over ristretto255.
//!
//! # Encoding
//!
//! A `u64` value `v` is split into four 16-bit limbs `v_i`. The secret key is one scalar `x_i`
//! per limb and the public key `PK_i = x_i·G`. One fresh `r` is shared by the limbs:
//! `Enc(v) = (r·G, v_0·G + r·PK_0, …, v_3·G + r·PK_3)` — 160 bytes. Sharing `r` across
//! *independent* keys is the multi-recipient ElGamal of Kurosawa (PKC 2002) and
//! Bellare–Boldyreva–Staddon (PKC 2003), IND-CPA under DDH like plain ElGamal; it saves three of
//! eight fixed-base multiplications and three of eight points per value.
//!
//! Ciphertexts add point-wise, so limb `i` of a sum holds `Σ v_i` with no carry between limbs:
//! `2^24` rows of limbs below `2^16` give limb sums below `2^40`, and decryption recovers each
//! limb's sum by bounded baby-step giant-step, then recombines `Σ m_i·2^(16i)` exactly in `i128`.
//! Nothing wraps: a limb outside its decryptable range (`[-LIMB_NEG_MARGIN, LIMB_MAX)`, sized
//! for [`MAX_SUMMANDS`] rows plus `2^16` noise additions) is the error
//! [`AheError::LimbOutOfRange`] after a capped search.
//!
//! # Signed values (noise)
//!
//! [`AdditiveScheme::add_plain`] takes an `i64`. It is added in sign–magnitude form: the 16-bit
//! limbs of `|n|` are added to the ciphertext's limbs with `n`'s sign (negation in the scalar
//! field, i.e. mod ℓ). A limb may thus go negative (by less than `2^16` per noise addition);
//! decryption searches each limb in a window shifted by `LIMB_NEG_MARGIN`, so a limb's
//! plaintext is a signed integer and the recombined total is the exact signed sum. A negative
//! total is returned as a negative `i128`; whether to clamp it to zero is the caller's (DP
//! post-processing) decision.
//!
//! # Trust model
//!
//! Semi-honest, as the PSI it rides on. The summing party must [`AdditiveScheme::rerandomize`]
//! before returning a ciphertext: the sum's `r·G` is `(Σ r_j)·G` over the summed rows, which
//! the encrypting party could otherwise test against subsets. Decoders check every byte (length,
//! canonical encodings, identity `r·G`) and never panic. Secret keys are move-only, zeroized on
//! drop and print as `<redacted>`. Encryption is constant-time in the value (fixed-base
//! multiplications and constant-time table selection); decryption's running time depends on the
//! plaintext, which the decrypting party is entitled to learn.
mod dlog;
mod elgamal;
pub mod packed;

pub use dlog::warm_up;
pub use elgamal::{
    CIPHERTEXT_LEN, Ciphertext, ExpElGamal, LIMB_BITS, LIMB_MAX, LIMB_NEG_MARGIN, LIMBS,
    MAX_SUMMANDS, PUBLIC_KEY_LEN, PublicKey, SecretKey, encrypt_batch, sum_selected,
};

#[cfg(test)]
mod tests;

/// An additively homomorphic public-key encryption of 64-bit values.
pub trait AdditiveScheme {
    /// What the encrypting party publishes.
    type PublicKey;
    /// What only the encrypting party holds.
    type SecretKey;
    /// One encrypted value (or sum of values).
    type Ciphertext;

    /// A fresh key pair from the operating system's CSPRNG.
    fn keygen() -> (Self::SecretKey, Self::PublicKey);
    /// A fresh, randomised encryption of `value`.
    fn encrypt(pk: &Self::PublicKey, value: u64) -> Self::Ciphertext;
    /// An encryption of the sum of the two plaintexts.
    fn add(a: &Self::Ciphertext, b: &Self::Ciphertext) -> Self::Ciphertext;
    /// An encryption of the plaintext plus `value`, which may be negative (DP noise).
    fn add_plain(ct: &Self::Ciphertext, value: i64) -> Self::Ciphertext;
    /// An encryption of the same plaintext with fresh randomness, unlinkable to `ct`.
    fn rerandomize(pk: &Self::PublicKey, ct: &Self::Ciphertext) -> Self::Ciphertext;
    /// The exact (signed) plaintext, or an error if it is outside the decryptable range.
    fn decrypt(sk: &Self::SecretKey, ct: &Self::Ciphertext) -> Result<i128, AheError>;
    /// The ciphertext's wire encoding.
    fn encode(ct: &Self::Ciphertext) -> Vec<u8>;
    /// Parses [`AdditiveScheme::encode`]'s output; rejects anything else without panicking.
    fn decode(bytes: &[u8]) -> Result<Self::Ciphertext, AheError>;
}

/// Why an encoding was rejected or a decryption failed. Carries only lengths and indices.
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
    /// A point that is not a canonical ristretto255 encoding.
    #[error("point {index} of the encoding is not a valid ristretto255 element")]
    InvalidPoint {
        /// Position of the point within the encoding.
        index: usize,
    },
    /// The identity where an honest party never sends it (a key, a ciphertext's `r·G`).
    #[error("point {index} of the encoding is the identity")]
    IdentityPoint {
        /// Position of the point within the encoding.
        index: usize,
    },
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
    /// More summands than decryption is sized for.
    #[error("{count} ciphertexts to sum, more than the supported {max}")]
    TooManySummands {
        /// Indices given.
        count: usize,
        /// [`MAX_SUMMANDS`].
        max: usize,
    },
    /// A row layout that cannot be used (no cells, a cell of 0 or more than 4 limbs, too many
    /// limbs), or a key, ciphertext or cell index that does not fit the layout.
    #[error("row layout: {0}")]
    BadLayout(String),
    /// A value wider than its cell in the row layout (values must be clipped first).
    #[error("value of row {row}, cell {cell} is wider than its cell")]
    ValueTooWide {
        /// The row.
        row: u32,
        /// The cell.
        cell: usize,
    },
    /// Noise larger in magnitude than a cell's decryption window allows.
    #[error("noise magnitude above {max}")]
    NoiseTooLarge {
        /// [`packed::MAX_NOISE`].
        max: u64,
    },
    /// A limb's plaintext outside `[-LIMB_NEG_MARGIN, LIMB_MAX)`: the ciphertext sums more than
    /// the supported rows or noise, or was not produced by this key.
    #[error("limb {limb} of the plaintext is outside the decryptable range")]
    LimbOutOfRange {
        /// Which limb (0 = least significant).
        limb: usize,
    },
}
