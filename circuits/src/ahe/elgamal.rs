//! Exponential ElGamal over ristretto255 with 16-bit limbs and one shared randomness per value.

use std::sync::OnceLock;

use curve25519_dalek::constants::{RISTRETTO_BASEPOINT_POINT as G, RISTRETTO_BASEPOINT_TABLE};
use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoBasepointTable};
use curve25519_dalek::traits::{Identity, IsIdentity};
use curve25519_dalek::{RistrettoPoint, Scalar};
use rand::rngs::SysRng;
use rand_core::UnwrapErr;
use rayon::prelude::*;
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};
use zeroize::Zeroize;

use super::{AdditiveScheme, AheError, dlog};

/// Limbs per value: a `u64` is split into four 16-bit limbs, each encrypted in the exponent.
pub const LIMBS: usize = 4;
/// Bits per limb.
pub const LIMB_BITS: u32 = 16;
/// Bytes in one encoded ciphertext: the shared `r·G` and one point per limb.
pub const CIPHERTEXT_LEN: usize = 32 * (LIMBS + 1);
/// Most ciphertexts [`sum_selected`] adds up (and the number of rows a decryption is sized for).
pub const MAX_SUMMANDS: usize = 1 << 24;
/// Each limb's plaintext must be at least `-LIMB_NEG_MARGIN` to decrypt: room for `2^16`
/// negative noise additions of up to `2^16 - 1` per limb.
pub const LIMB_NEG_MARGIN: u64 = 1 << 32;
/// Each limb's plaintext must be below this to decrypt: `2^24` rows of `2^16 - 1` plus
/// `2^16` positive noise additions of up to `2^16 - 1`.
pub const LIMB_MAX: u64 = (1 << 40) + (1 << 32);
/// Values per rayon task in [`encrypt_batch`] (and per shared field inversion).
const ENCRYPT_CHUNK: usize = 256;
/// Row indices per rayon task in [`sum_selected`].
const SUM_CHUNK: usize = 1024;

/// Exponential ElGamal over ristretto255, limb-encoded (see the module documentation).
#[derive(Debug, Clone, Copy, Default)]
pub struct ExpElGamal;

/// A secret key: one scalar per limb. Move-only, zeroized on drop, redacted `Debug`.
pub struct SecretKey([Scalar; LIMBS]);

impl Drop for SecretKey {
    fn drop(&mut self) {
        for x in &mut self.0 {
            x.zeroize();
        }
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// A public key: `x_i·G` per limb, with a fixed-base table for each (about 30 KiB apiece) so
/// that `r·PK_i` costs a fixed-base rather than a variable-base multiplication.
#[derive(Clone)]
pub struct PublicKey {
    points: [RistrettoPoint; LIMBS],
    tables: Box<[RistrettoBasepointTable; LIMBS]>,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("limbs", &LIMBS)
            .finish_non_exhaustive()
    }
}

/// Bytes in an encoded [`PublicKey`].
pub const PUBLIC_KEY_LEN: usize = 32 * LIMBS;

impl PublicKey {
    fn from_points(points: [RistrettoPoint; LIMBS]) -> PublicKey {
        let tables = Box::new(points.map(|p| RistrettoBasepointTable::create(&p)));
        PublicKey { points, tables }
    }

    /// The key as it travels to the party that sums: the limb keys' compressed encodings.
    pub fn to_bytes(&self) -> [u8; PUBLIC_KEY_LEN] {
        let mut out = [0u8; PUBLIC_KEY_LEN];
        for (o, p) in out.chunks_exact_mut(32).zip(&self.points) {
            o.copy_from_slice(p.compress().as_bytes());
        }
        out
    }

    /// Parses [`PublicKey::to_bytes`]; rejects a wrong length, an invalid encoding and the
    /// identity (which would encrypt in the clear). Never panics.
    pub fn from_bytes(bytes: &[u8]) -> Result<PublicKey, AheError> {
        if bytes.len() != PUBLIC_KEY_LEN {
            return Err(AheError::WrongLength {
                len: bytes.len(),
                expected: PUBLIC_KEY_LEN,
            });
        }
        let mut points = [RistrettoPoint::identity(); LIMBS];
        for (k, (p, enc)) in points.iter_mut().zip(bytes.chunks_exact(32)).enumerate() {
            *p = decompress(enc, k)?;
            if p.is_identity() {
                return Err(AheError::IdentityPoint { index: k });
            }
        }
        Ok(PublicKey::from_points(points))
    }
}

/// A ciphertext: `(r·G, v_0·G + r·PK_0, …, v_3·G + r·PK_3)`, held decompressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ciphertext {
    r: RistrettoPoint,
    c: [RistrettoPoint; LIMBS],
}

impl Ciphertext {
    /// The encryption of zero with no randomness (all identity): the neutral element of
    /// [`ExpElGamal::add`]. Re-randomise before it leaves the process.
    pub fn zero() -> Ciphertext {
        Ciphertext {
            r: RistrettoPoint::identity(),
            c: [RistrettoPoint::identity(); LIMBS],
        }
    }

    fn add(&self, other: &Ciphertext) -> Ciphertext {
        let mut out = *self;
        out.r += other.r;
        for (a, b) in out.c.iter_mut().zip(&other.c) {
            *a += b;
        }
        out
    }
}

pub(super) fn random_nonzero_scalar() -> Scalar {
    let mut rng = UnwrapErr(SysRng);
    loop {
        let k = Scalar::random(&mut rng);
        if k != Scalar::ZERO {
            return k;
        }
    }
}

pub(super) fn decompress(enc: &[u8], index: usize) -> Result<RistrettoPoint, AheError> {
    CompressedRistretto::from_slice(enc)
        .ok()
        .and_then(|c| c.decompress())
        .ok_or(AheError::InvalidPoint { index })
}

/// `NIBBLES[p][d] = d·16^p·H` with `H = G/2`, for the nibbles of one limb.
fn half_nibble_tables() -> &'static [[RistrettoPoint; 16]; 4] {
    static T: OnceLock<[[RistrettoPoint; 16]; 4]> = OnceLock::new();
    T.get_or_init(|| {
        let h = Scalar::from(2u8).invert() * G;
        let mut t = [[RistrettoPoint::identity(); 16]; 4];
        for (p, row) in t.iter_mut().enumerate() {
            let unit = Scalar::from(1u64 << (4 * p)) * h;
            for d in 1..16 {
                row[d] = row[d - 1] + unit;
            }
        }
        t
    })
}

/// `limb·H` (`H = G/2`, `limb < 2^16`) by constant-time selection of one entry per nibble, so
/// the time taken does not depend on the value.
pub(super) fn half_limb_point(limb: u64) -> RistrettoPoint {
    let t = half_nibble_tables();
    let mut acc = RistrettoPoint::identity();
    for (p, row) in t.iter().enumerate() {
        let d = ((limb >> (4 * p)) & 15) as u8;
        let mut sel = RistrettoPoint::identity();
        for (j, e) in row.iter().enumerate() {
            sel.conditional_assign(e, d.ct_eq(&(j as u8)));
        }
        acc += sel;
    }
    acc
}

/// The five points whose doubles are a fresh encryption of `value`:
/// `(r'·G, r'·PK_i + v_i·G/2)`, so that doubling gives `r = 2r'` (uniform, as `r'` is).
fn encrypt_half(pk: &PublicKey, value: u64) -> [RistrettoPoint; LIMBS + 1] {
    let r = random_nonzero_scalar();
    let mut out = [RistrettoPoint::identity(); LIMBS + 1];
    out[0] = &r * RISTRETTO_BASEPOINT_TABLE;
    for i in 0..LIMBS {
        let limb = (value >> (LIMB_BITS as usize * i)) & 0xffff;
        out[i + 1] = &r * &pk.tables[i] + half_limb_point(limb);
    }
    out
}

impl AdditiveScheme for ExpElGamal {
    type PublicKey = PublicKey;
    type SecretKey = SecretKey;
    type Ciphertext = Ciphertext;

    fn keygen() -> (SecretKey, PublicKey) {
        let xs = [(); LIMBS].map(|()| random_nonzero_scalar());
        let points = xs.map(|x| &x * RISTRETTO_BASEPOINT_TABLE);
        (SecretKey(xs), PublicKey::from_points(points))
    }

    fn encrypt(pk: &PublicKey, value: u64) -> Ciphertext {
        let h = encrypt_half(pk, value);
        let mut ct = Ciphertext {
            r: h[0] + h[0],
            c: [RistrettoPoint::identity(); LIMBS],
        };
        for (c, p) in ct.c.iter_mut().zip(&h[1..]) {
            *c = p + p;
        }
        ct
    }

    fn add(a: &Ciphertext, b: &Ciphertext) -> Ciphertext {
        a.add(b)
    }

    /// Adds `value` (signed) in sign–magnitude form: `|value|`'s 16-bit limbs are added to the
    /// limbs with `value`'s sign, so each limb moves by less than `2^16` and the recombined
    /// total moves by exactly `value`. Constant-time in `value` (fixed-base multiplications and
    /// constant-time negation).
    fn add_plain(ct: &Ciphertext, value: i64) -> Ciphertext {
        let neg = Choice::from(u8::from(value < 0));
        let mag = value.unsigned_abs();
        let mut out = *ct;
        for (i, c) in out.c.iter_mut().enumerate() {
            let s = Scalar::from((mag >> (LIMB_BITS as usize * i)) & 0xffff);
            let s = Scalar::conditional_select(&s, &-s, neg);
            *c += &s * RISTRETTO_BASEPOINT_TABLE;
        }
        out
    }

    fn rerandomize(pk: &PublicKey, ct: &Ciphertext) -> Ciphertext {
        let s = random_nonzero_scalar();
        let mut out = *ct;
        out.r += &s * RISTRETTO_BASEPOINT_TABLE;
        for (c, t) in out.c.iter_mut().zip(pk.tables.iter()) {
            *c += &s * t;
        }
        out
    }

    /// Recovers each limb's plaintext `m_i` in `[-LIMB_NEG_MARGIN, LIMB_MAX)` by bounded
    /// baby-step giant-step and returns `Σ m_i·2^(16i)` exactly. A limb outside that range is
    /// [`AheError::LimbOutOfRange`] after a capped search (about 2^19 giant steps), never a hang
    /// and never a wrapped result.
    fn decrypt(sk: &SecretKey, ct: &Ciphertext) -> Result<i128, AheError> {
        let shift = RistrettoPoint::mul_base(&Scalar::from(LIMB_NEG_MARGIN));
        let mut total: i128 = 0;
        for (i, (c, x)) in ct.c.iter().zip(&sk.0).enumerate() {
            let m = c - x * ct.r + shift;
            let shifted = dlog::solve(&m, LIMB_NEG_MARGIN + LIMB_MAX)
                .ok_or(AheError::LimbOutOfRange { limb: i })?;
            let limb = i128::from(shifted) - i128::from(LIMB_NEG_MARGIN);
            total += limb << (LIMB_BITS as usize * i);
        }
        Ok(total)
    }

    fn encode(ct: &Ciphertext) -> Vec<u8> {
        let mut out = Vec::with_capacity(CIPHERTEXT_LEN);
        out.extend_from_slice(ct.r.compress().as_bytes());
        for c in &ct.c {
            out.extend_from_slice(c.compress().as_bytes());
        }
        out
    }

    /// Rejects a length other than [`CIPHERTEXT_LEN`], any point that is not a canonical
    /// ristretto255 encoding, and an identity `r·G` (no honest encryption has one). Never panics.
    fn decode(bytes: &[u8]) -> Result<Ciphertext, AheError> {
        if bytes.len() != CIPHERTEXT_LEN {
            return Err(AheError::WrongLength {
                len: bytes.len(),
                expected: CIPHERTEXT_LEN,
            });
        }
        let r = decompress(&bytes[..32], 0)?;
        if r.is_identity() {
            return Err(AheError::IdentityPoint { index: 0 });
        }
        let mut c = [RistrettoPoint::identity(); LIMBS];
        for (k, (p, enc)) in c.iter_mut().zip(bytes[32..].chunks_exact(32)).enumerate() {
            *p = decompress(enc, k + 1)?;
        }
        Ok(Ciphertext { r, c })
    }
}

/// Encrypts each value under `pk` and returns the concatenated encodings
/// ([`CIPHERTEXT_LEN`] bytes each, in order).
///
/// rayon chunks of 256 values; each chunk's 1280 points share one field inversion
/// (`double_and_compress_batch` on halved points: `(r'·G, r'·PK_i + v_i·G/2)`, doubled).
pub fn encrypt_batch(pk: &PublicKey, values: &[u64]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * CIPHERTEXT_LEN];
    out.par_chunks_mut(ENCRYPT_CHUNK * CIPHERTEXT_LEN)
        .zip(values.par_chunks(ENCRYPT_CHUNK))
        .for_each(|(out_chunk, vals)| {
            let mut pts = Vec::with_capacity(vals.len() * (LIMBS + 1));
            for &v in vals {
                pts.extend_from_slice(&encrypt_half(pk, v));
            }
            let encs = RistrettoPoint::double_and_compress_batch(&pts);
            for (o, e) in out_chunk.chunks_exact_mut(32).zip(encs) {
                o.copy_from_slice(e.as_bytes());
            }
        });
    out
}

/// Decodes the ciphertexts at `indices` in `ciphertexts` (concatenated encodings, as from
/// [`encrypt_batch`]) and adds them up, in rayon chunks.
///
/// Errors: a length that is not a multiple of [`CIPHERTEXT_LEN`], more than [`MAX_SUMMANDS`]
/// indices (the bound decryption is sized for), an index past the end, or an invalid
/// ciphertext (whose row is named). No indices gives [`Ciphertext::zero`]. Duplicated indices
/// are not rejected here: they add the row twice. Re-randomise the result before sending it —
/// the sum's `r·G` would otherwise tell the encrypting party which rows were summed.
pub fn sum_selected(ciphertexts: &[u8], indices: &[u32]) -> Result<Ciphertext, AheError> {
    if !ciphertexts.len().is_multiple_of(CIPHERTEXT_LEN) {
        return Err(AheError::WrongLength {
            len: ciphertexts.len(),
            expected: CIPHERTEXT_LEN,
        });
    }
    if indices.len() > MAX_SUMMANDS {
        return Err(AheError::TooManySummands {
            count: indices.len(),
            max: MAX_SUMMANDS,
        });
    }
    let rows = ciphertexts.len() / CIPHERTEXT_LEN;
    if let Some(&index) = indices.iter().find(|&&i| i as usize >= rows) {
        return Err(AheError::IndexOutOfRange { index, rows });
    }
    indices
        .par_chunks(SUM_CHUNK)
        .map(|chunk| {
            let mut acc = Ciphertext::zero();
            for &i in chunk {
                let start = i as usize * CIPHERTEXT_LEN;
                let ct = ExpElGamal::decode(&ciphertexts[start..start + CIPHERTEXT_LEN]).map_err(
                    |e| AheError::InvalidCiphertext {
                        row: i,
                        source: Box::new(e),
                    },
                )?;
                acc = acc.add(&ct);
            }
            Ok(acc)
        })
        .try_reduce(Ciphertext::zero, |a, b| Ok(a.add(&b)))
}

/// Test and measurement helper: encrypts arbitrary signed per-limb plaintexts (sums no single
/// `u64` can produce), e.g. the worst-case cell `2^24 · (2^16 - 1)` in every limb.
#[cfg(test)]
pub(crate) fn encrypt_limbs(pk: &PublicKey, limbs: [i64; LIMBS]) -> Ciphertext {
    let r = random_nonzero_scalar();
    let mut ct = Ciphertext {
        r: &r * RISTRETTO_BASEPOINT_TABLE,
        c: [RistrettoPoint::identity(); LIMBS],
    };
    for (i, c) in ct.c.iter_mut().enumerate() {
        let m = Scalar::from(limbs[i].unsigned_abs());
        let m = if limbs[i] < 0 { -m } else { m };
        *c = &r * &pk.tables[i] + &m * RISTRETTO_BASEPOINT_TABLE;
    }
    ct
}
