//! An overlap's dataset pass on the partner's own Ballista executors: reading, the consent
//! filter, normalising, the deletion filter, hashing to the group and blinding, in
//! parallel over the dataset's parts. The node keeps the exchange with the partner, the
//! deletion list's lookup, the counting and the deduplication.
//!
//! The pass is one scalar function, [`UDF_NAME`], over the columns the node's own pass reads
//! (in the same order: key parts, the consent column, every declared identifier when subjects
//! are forgotten). Its first argument is the job's [`PassSpec`] — the job key, the forget
//! secret and how each column is normalised — sealed with ChaCha20-Poly1305 under a
//! [`SealingKey`] that the node and its executors share (a file each reads at start). So the
//! plan, its display, the scheduler's state and the executors' logs hold only a ciphertext; an
//! executor opens it for each batch and zeroizes what it opened when the batch is done.
//!
//! Per row the function returns an outcome ([`Outcome`]): malformed, no consent, forgotten,
//! rejected by a key column (with its reason) or accepted with its blinded point `k·H(key)`.
//! The checks run in the node's order (malformed, consent, forgotten, key), so the counts
//! equal the in-process pass's. The deletion list's keyed hashes travel sealed in the spec, so
//! no per-row pseudonym that would be stable across jobs leaves the executor.

use std::collections::HashSet;
use std::sync::Arc;

use cleanroom_circuits::{EncodedPoint, ItemSet, JobKey, POINT_LEN, blind_items};
use datafusion::arrow::array::{Array, ArrayRef, BinaryBuilder, StringArray};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

pub use super::cluster_lines::{CsvLayout, JsonLayout, LineLayout};
use super::cluster_lines::{LineReader, decode_lines, encode_lines, line_at};
use super::dataset::{KEY_PART_SEPARATOR, Rejection, forget_hash, is_consent, normalise_field};
use super::normalise::{NormaliseOptions, Normaliser, parse_region};
use super::source::csv_line::{SPANNED_LINES, spans_lines};
use super::source::{Malformed, has_line_break};

/// The function's name in plans (the executors' and the scheduler's registries).
pub const UDF_NAME: &str = "cleanroom_pass";

/// Binds a sealed spec to its use: a ciphertext made for anything else does not open.
const AAD: &[u8] = b"cleanroom executor pass v1";

/// The spec's encoding version.
const SPEC_VERSION: u8 = 2;

/// The key a node and its executors share. Its file holds 64 hex digits (32 random bytes);
/// `cleanroom executor --sealing-key F` and the node's `engine = { …, sealing_key = "F" }`
/// name the same file (or copies of it).
pub struct SealingKey(LessSafeKey);

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealingKey(<redacted>)")
    }
}

impl SealingKey {
    /// Reads a key file (64 hex digits; surrounding whitespace ignored). The error names the
    /// file and what is wrong, never its contents.
    pub fn read(path: &std::path::Path) -> Result<SealingKey, String> {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the sealing key {}: {e}", path.display()))?,
        );
        let mut bytes = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text.trim(), bytes.as_mut()).map_err(|_| {
            format!(
                "the sealing key {} is not 64 hex digits (make one with `cleanroom sealing-key \
                 --out FILE`)",
                path.display()
            )
        })?;
        SealingKey::from_bytes(&bytes)
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<SealingKey, String> {
        UnboundKey::new(&CHACHA20_POLY1305, bytes)
            .map(|k| SealingKey(LessSafeKey::new(k)))
            .map_err(|_| "the sealing key cannot be used".to_owned())
    }

    /// A fresh key file's contents: 64 hex digits and a newline.
    pub fn generate_hex() -> Result<Zeroizing<String>, String> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(bytes.as_mut())
            .map_err(|_| "the operating system gave no randomness".to_owned())?;
        Ok(Zeroizing::new(hex::encode(bytes.as_ref()) + "\n"))
    }

    /// `nonce ‖ ciphertext ‖ tag` of `plain`, under a random nonce, bound to `aad` (what the
    /// sealed bytes are for: a spec made for one function does not open in another).
    pub(crate) fn seal(&self, aad: &'static [u8], plain: &[u8]) -> Result<Vec<u8>, String> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| "the operating system gave no randomness".to_owned())?;
        let mut sealed = Vec::with_capacity(NONCE_LEN + plain.len() + 16);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(plain);
        let mut body = sealed.split_off(NONCE_LEN);
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .map_err(|_| "cannot seal the job's pass".to_owned())?;
        sealed.extend_from_slice(&body);
        Ok(sealed)
    }

    /// What [`seal`](Self::seal) sealed for `aad`, or `None` if it was sealed under another
    /// key, for another use, or changed.
    pub(crate) fn open(&self, aad: &'static [u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let nonce = Nonce::try_assume_unique_for_key(sealed.get(..NONCE_LEN)?).ok()?;
        let mut body = Zeroizing::new(sealed.get(NONCE_LEN..)?.to_vec());
        let plain_len = self
            .0
            .open_in_place(nonce, Aad::from(aad), body.as_mut_slice())
            .ok()?
            .len();
        body.truncate(plain_len);
        Some(body)
    }
}

/// How one column is normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartSpec {
    /// The identifier's normaliser.
    pub normaliser: Normaliser,
    /// Its options.
    pub options: NormaliseOptions,
}

/// The deletion list, for the executors: a row is forgotten if any declared identifier
/// normalises to a value whose keyed hash is listed.
#[derive(Clone)]
pub struct ForgetSpec {
    /// The node-local HMAC key.
    pub secret: Zeroizing<[u8; 32]>,
    /// The listed hashes.
    pub hashes: HashSet<[u8; 32]>,
    /// Every declared identifier, in the function's column order.
    pub parts: Vec<PartSpec>,
}

impl std::fmt::Debug for ForgetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForgetSpec")
            .field("hashes", &self.hashes.len())
            .finish_non_exhaustive()
    }
}

/// What the executors need for one job's pass. Holds the job key: never logged (its `Debug`
/// is [`JobKey`]'s, redacted), only ever sealed.
#[derive(Debug)]
pub struct PassSpec {
    /// The job key the points are blinded with.
    pub key: JobKey,
    /// The hash-to-group domain (the job's key name).
    pub key_name: String,
    /// The join key's parts, joined with [`KEY_PART_SEPARATOR`].
    pub parts: Vec<PartSpec>,
    /// Whether a consent column follows the key parts.
    pub consent: bool,
    /// When subjects are forgotten: the deletion list and every declared identifier.
    pub forget: Option<ForgetSpec>,
    /// CSV or JSON lines read line by line: the function takes the line and reads it.
    pub lines: Option<LineLayout>,
    /// An overlap-sum's value holder: each accepted row's values and group come back too.
    pub values: Option<ValuesSpec>,
}

/// The value columns of an overlap-sum's value holder, after the columns above: each summed
/// column, then the group column if the job groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValuesSpec {
    /// How many summed columns.
    pub sums: usize,
    /// The listed group labels, in the job's order; a label not listed is the group after
    /// them ("(other)"). `None`: the job does not group (every row is group 0).
    pub groups: Option<Vec<String>>,
}

impl ValuesSpec {
    /// How many columns it reads.
    fn reads(&self) -> usize {
        self.sums + usize::from(self.groups.is_some())
    }

    /// The group a row's label falls in.
    fn group_of(&self, label: Option<&[u8]>) -> u32 {
        let Some(groups) = &self.groups else {
            return 0;
        };
        let label = label.map(<[u8]>::trim_ascii).unwrap_or_default();
        let at = groups.iter().position(|g| g.as_bytes() == label);
        // Fits: a spec holds at most u16::MAX labels.
        at.unwrap_or(groups.len()) as u32
    }
}

impl PassSpec {
    /// How many columns the function reads (from the line, if it takes a line).
    fn reads(&self) -> usize {
        self.parts.len()
            + usize::from(self.consent)
            + self.forget.as_ref().map_or(0, |f| f.parts.len())
            + self.values.as_ref().map_or(0, ValuesSpec::reads)
    }

    /// How many columns the function takes after the sealed spec: the line, or its reads.
    pub fn columns(&self) -> usize {
        match self.lines {
            Some(_) => 1,
            None => self.reads(),
        }
    }

    /// The spec sealed under `key`: the plan's first argument.
    pub fn seal(&self, key: &SealingKey) -> Result<Vec<u8>, String> {
        key.seal(AAD, &self.encode()?)
    }

    fn encode(&self) -> Result<Zeroizing<Vec<u8>>, String> {
        let mut out = Zeroizing::new(Vec::with_capacity(128));
        out.push(SPEC_VERSION);
        out.extend_from_slice(self.key.to_secret_bytes().as_ref());
        let name = self.key_name.as_bytes();
        let name_len = u16::try_from(name.len()).map_err(|_| "the key name is too long")?;
        out.extend_from_slice(&name_len.to_le_bytes());
        out.extend_from_slice(name);
        encode_parts(&mut out, &self.parts)?;
        out.push(u8::from(self.consent));
        encode_forget(&mut out, self.forget.as_ref())?;
        encode_lines(&mut out, self.lines.as_ref())?;
        match &self.values {
            None => out.push(0),
            Some(values) => {
                out.push(1);
                let sums = u16::try_from(values.sums).map_err(|_| "too many summed columns")?;
                out.extend_from_slice(&sums.to_le_bytes());
                match &values.groups {
                    None => out.push(0),
                    Some(groups) => {
                        out.push(1);
                        encode_labels(&mut out, groups)?;
                    }
                }
            }
        }
        Ok(out)
    }

    fn decode(bytes: &[u8]) -> Option<PassSpec> {
        let mut r = Reader(bytes);
        if r.byte()? != SPEC_VERSION {
            return None;
        }
        let key = JobKey::from_secret_bytes(&Zeroizing::new(r.array::<32>()?))?;
        let name_len = u16::from_le_bytes(r.array::<2>()?);
        let key_name = String::from_utf8(r.take(usize::from(name_len))?.to_vec()).ok()?;
        let parts = decode_parts(&mut r)?;
        let consent = r.flag()?;
        let forget = decode_forget(&mut r)?;
        let lines = decode_lines(&mut r)?;
        let values = match r.byte()? {
            0 => None,
            1 => {
                let sums = usize::from(u16::from_le_bytes(r.array()?));
                let groups = match r.byte()? {
                    0 => None,
                    1 => Some(decode_labels(&mut r)?),
                    _ => return None,
                };
                Some(ValuesSpec { sums, groups })
            }
            _ => return None,
        };
        let spec = PassSpec {
            key,
            key_name,
            parts,
            consent,
            forget,
            lines,
            values,
        };
        let layout_fits = spec
            .lines
            .as_ref()
            .is_none_or(|l| l.columns() == spec.reads());
        (r.0.is_empty() && layout_fits).then_some(spec)
    }
}

/// The deletion list, if any: a flag, then the secret, how each identifier is normalised, and
/// the listed hashes.
pub(crate) fn encode_forget(out: &mut Vec<u8>, forget: Option<&ForgetSpec>) -> Result<(), String> {
    let Some(forget) = forget else {
        out.push(0);
        return Ok(());
    };
    out.push(1);
    out.extend_from_slice(forget.secret.as_ref());
    encode_parts(out, &forget.parts)?;
    let n = u32::try_from(forget.hashes.len()).map_err(|_| "too many forgotten")?;
    out.extend_from_slice(&n.to_le_bytes());
    for h in &forget.hashes {
        out.extend_from_slice(h);
    }
    Ok(())
}

/// What [`encode_forget`] wrote: `Some(None)` for no list, `None` if the bytes are not one.
pub(crate) fn decode_forget(r: &mut Reader<'_>) -> Option<Option<ForgetSpec>> {
    if !r.flag()? {
        return Some(None);
    }
    let secret = Zeroizing::new(r.array::<32>()?);
    let parts = decode_parts(r)?;
    let n = u32::from_le_bytes(r.array()?);
    // Bounded by the spec's own length before anything is reserved.
    if r.0.len() / 32 < n as usize {
        return None;
    }
    let mut hashes = HashSet::with_capacity(n as usize);
    for _ in 0..n {
        hashes.insert(r.array::<32>()?);
    }
    Some(Some(ForgetSpec {
        secret,
        hashes,
        parts,
    }))
}

/// Group labels: a count, then each label's length and bytes.
pub(crate) fn encode_labels(out: &mut Vec<u8>, labels: &[String]) -> Result<(), String> {
    let n = u16::try_from(labels.len()).map_err(|_| "too many groups")?;
    out.extend_from_slice(&n.to_le_bytes());
    for g in labels {
        let len = u16::try_from(g.len()).map_err(|_| "a group label is too long")?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(g.as_bytes());
    }
    Ok(())
}

/// What [`encode_labels`] wrote.
pub(crate) fn decode_labels(r: &mut Reader<'_>) -> Option<Vec<String>> {
    let n = u16::from_le_bytes(r.array()?);
    (0..n)
        .map(|_| {
            let len = u16::from_le_bytes(r.array()?);
            String::from_utf8(r.take(usize::from(len))?.to_vec()).ok()
        })
        .collect()
}

fn encode_parts(out: &mut Vec<u8>, parts: &[PartSpec]) -> Result<(), String> {
    out.push(u8::try_from(parts.len()).map_err(|_| "more than 255 identifiers")?);
    for p in parts {
        out.push(match p.normaliser {
            Normaliser::Email => 0,
            Normaliser::Phone => 1,
            Normaliser::Generic => 2,
        });
        out.push(u8::from(p.options.gmail_rule));
        out.push(u8::from(p.options.case_fold));
        let region = p.options.default_region.to_string();
        out.push(u8::try_from(region.len()).map_err(|_| "a region code is too long")?);
        out.extend_from_slice(region.as_bytes());
    }
    Ok(())
}

fn decode_parts(r: &mut Reader<'_>) -> Option<Vec<PartSpec>> {
    let n = r.byte()?;
    (0..n)
        .map(|_| {
            let normaliser = match r.byte()? {
                0 => Normaliser::Email,
                1 => Normaliser::Phone,
                2 => Normaliser::Generic,
                _ => return None,
            };
            let gmail_rule = r.byte()? == 1;
            let case_fold = r.byte()? == 1;
            let len = r.byte()?;
            let region = std::str::from_utf8(r.take(usize::from(len))?).ok()?;
            Some(PartSpec {
                normaliser,
                options: NormaliseOptions {
                    gmail_rule,
                    case_fold,
                    default_region: parse_region(region)?,
                },
            })
        })
        .collect()
}

/// Reads a byte string front to back; every read is bounds-checked.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    pub(crate) fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    /// A byte that is 0 or 1.
    pub(crate) fn flag(&mut self) -> Option<bool> {
        match self.byte()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
}

const MALFORMED: u8 = 1;
/// The kinds of a malformed row, after its place.
const LINE_BREAK: u8 = 1;
const STRAY_QUOTE: u8 = 2;
const OPEN_QUOTE: u8 = 3;
const FIELD_COUNT: u8 = 4;
const NOT_JSON_OBJECT: u8 = 5;
const NOT_ONE_VALUE: u8 = 6;
const LINE_TOO_LONG: u8 = 7;
/// The place of a malformed row that no one column made so (its field count).
const NO_PLACE: u16 = u16::MAX;
const NO_CONSENT: u8 = 2;
const REJECTED: u8 = 3;
const ACCEPTED: u8 = 4;
const FORGOTTEN: u8 = 5;
/// Accepted, with the row's group and values (an overlap-sum's value holder).
const VALUED: u8 = 6;
/// Accepted by its key, but a value is missing or not an integer: the row is skipped.
const BAD_VALUE: u8 = 7;

/// One row's outcome, as the node reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The row is not read, and why: a read column (its place among the function's columns)
    /// holds a line break or a quote, or the line is not one record.
    Malformed(Option<usize>, Malformed),
    /// The consent column does not say yes.
    NoConsent,
    /// An identifier of the row belongs to a forgotten subject.
    Forgotten,
    /// A key part (its place) rejected the row, and why.
    Rejected(usize, Rejection),
    /// The row's key, blinded with the job key.
    Accepted(EncodedPoint),
    /// The same with the row's group and values (an overlap-sum's value holder).
    Valued(EncodedPoint, u32, Vec<i64>),
    /// The key is accepted, but a value is missing or not an integer.
    BadValue,
}

impl Outcome {
    /// Reads an outcome; `None` if the bytes are not one (an executor of another version).
    pub(crate) fn decode(bytes: &[u8]) -> Option<Outcome> {
        let mut r = Reader(bytes);
        let outcome = match r.byte()? {
            MALFORMED => {
                let place = match u16::from_le_bytes(r.array()?) {
                    NO_PLACE => None,
                    place => Some(usize::from(place)),
                };
                let why = match r.byte()? {
                    LINE_BREAK => Malformed::LineBreak,
                    STRAY_QUOTE => Malformed::StrayQuote,
                    OPEN_QUOTE => Malformed::OpenQuote,
                    NOT_JSON_OBJECT => Malformed::NotJsonObject,
                    NOT_ONE_VALUE => Malformed::NotOneValue,
                    LINE_TOO_LONG => Malformed::LineTooLong,
                    FIELD_COUNT => Malformed::FieldCount {
                        expected: u32::from_le_bytes(r.array()?) as usize,
                        found: u32::from_le_bytes(r.array()?) as usize,
                    },
                    _ => return None,
                };
                Outcome::Malformed(place, why)
            }
            NO_CONSENT => Outcome::NoConsent,
            FORGOTTEN => Outcome::Forgotten,
            REJECTED => {
                let part = usize::from(r.byte()?);
                Outcome::Rejected(part, Rejection::from_code(r.array()?)?)
            }
            ACCEPTED => Outcome::Accepted(r.array::<POINT_LEN>()?),
            VALUED => {
                let point = r.array::<POINT_LEN>()?;
                let group = u32::from_le_bytes(r.array()?);
                if r.0.len() % 8 != 0 {
                    return None;
                }
                let mut values = Vec::with_capacity(r.0.len() / 8);
                while !r.0.is_empty() {
                    values.push(i64::from_le_bytes(r.array()?));
                }
                Outcome::Valued(point, group, values)
            }
            BAD_VALUE => Outcome::BadValue,
            _ => return None,
        };
        r.0.is_empty().then_some(outcome)
    }
}

/// What the grouped pass of an overlap-sum's value holder groups a row's outcome by
/// ([`super::cluster_outcome`]): a valued row's point, written as an accepted row's outcome
/// (its group and values left out), or any other outcome as it is.
pub(crate) fn grouping_key(outcome: &[u8], out: &mut Vec<u8>) {
    out.clear();
    match outcome.split_first() {
        Some((&VALUED, rest)) if rest.len() >= POINT_LEN => {
            out.push(ACCEPTED);
            out.extend_from_slice(&rest[..POINT_LEN]);
        }
        _ => out.extend_from_slice(outcome),
    }
}

/// Field `field` of a valued row's outcome: 0 its group, `i ≥ 1` its value `i − 1`. `None` for
/// any other outcome, or a field it does not have.
pub(crate) fn valued_field(outcome: &[u8], field: usize) -> Option<i64> {
    let (&VALUED, rest) = outcome.split_first()? else {
        return None;
    };
    let tail = rest.get(POINT_LEN..)?;
    if field == 0 {
        return Some(i64::from(u32::from_le_bytes(
            tail.get(..4)?.try_into().ok()?,
        )));
    }
    let at = 4 + 8 * (field - 1);
    Some(i64::from_le_bytes(tail.get(at..at + 8)?.try_into().ok()?))
}

/// The pass function. The node and the scheduler hold it without a key (to plan and to
/// decode plans); an executor holds the [`SealingKey`] and runs it.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct PassUdf {
    signature: Signature,
    #[allow(clippy::struct_field_names)]
    opener: Option<OpenerRef>,
}

/// The executor's key, compared by identity (a UDF must be `Eq` and `Hash`).
#[derive(Debug, Clone)]
pub(crate) struct OpenerRef(pub(crate) Arc<SealingKey>);

impl PartialEq for OpenerRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for OpenerRef {}
impl std::hash::Hash for OpenerRef {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.0).hash(state);
    }
}

impl PassUdf {
    /// The function as the node and the scheduler hold it: it plans, it never runs.
    pub fn planner() -> ScalarUDF {
        ScalarUDF::new_from_impl(PassUdf {
            signature: Signature::variadic_any(Volatility::Volatile),
            opener: None,
        })
    }

    /// The function as an executor holds it, with the key it opens specs with.
    pub fn executor(key: Arc<SealingKey>) -> ScalarUDF {
        ScalarUDF::new_from_impl(PassUdf {
            signature: Signature::variadic_any(Volatility::Volatile),
            opener: Some(OpenerRef(key)),
        })
    }
}

impl ScalarUDFImpl for PassUdf {
    fn name(&self) -> &str {
        UDF_NAME
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Binary)
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let fail = |m: &str| DataFusionError::Execution(format!("{UDF_NAME}: {m}"));
        let Some(OpenerRef(key)) = &self.opener else {
            return Err(fail(
                "this process holds no sealing key (run the pass on a `cleanroom executor` \
                 started with --sealing-key)",
            ));
        };
        let (sealed, columns) = args
            .args
            .split_first()
            .ok_or_else(|| fail("no sealed spec"))?;
        let ColumnarValue::Scalar(ScalarValue::Binary(Some(sealed))) = sealed else {
            return Err(fail("the first argument is not a sealed spec"));
        };
        let plain = key.open(AAD, sealed).ok_or_else(|| {
            fail("the spec does not open with this executor's sealing key (the node's engine.sealing_key and the executor's --sealing-key must be the same key)")
        })?;
        let spec = PassSpec::decode(&plain).ok_or_else(|| {
            fail("the spec is not one this executor reads (a node of another version?)")
        })?;
        drop(plain);
        if columns.len() != spec.columns() {
            return Err(fail("the plan's columns do not match its spec"));
        }
        let arrays = ColumnarValue::values_to_arrays(columns)?;
        let text = text_columns(&arrays).ok_or_else(|| fail("a column is not text"))?;
        let rows = Rows::of(spec.lines.as_ref(), text).map_err(fail)?;
        Ok(ColumnarValue::Array(run_pass(
            &spec,
            rows,
            args.number_rows,
        )))
    }
}

/// The rows of one batch as the pass reads them: its columns, or its lines, read as the
/// layout says.
pub(crate) enum Rows<'a> {
    Columns(Vec<&'a StringArray>),
    Lines {
        lines: &'a StringArray,
        /// The current line, read (boxed: a JSON record's fields are large beside a list
        /// of columns).
        reader: Box<LineReader<'a>>,
    },
}

/// The function's columns as text; `None` if one is not.
pub(crate) fn text_columns(arrays: &[ArrayRef]) -> Option<Vec<&StringArray>> {
    arrays
        .iter()
        .map(|a| a.as_any().downcast_ref::<StringArray>())
        .collect()
}

impl<'a> Rows<'a> {
    /// The rows of `text`: its columns, or (with a `lines` layout) its one column of lines.
    /// Fails, saying why, if the columns are not what the spec reads, or if a line holds a line
    /// break ([`SPANNED_LINES`]: lines were lost in it).
    pub(crate) fn of(
        lines: Option<&'a LineLayout>,
        text: Vec<&'a StringArray>,
    ) -> Result<Self, &'static str> {
        match (lines, text.as_slice()) {
            (None, _) => Ok(Rows::Columns(text)),
            (Some(layout), [lines]) => {
                if lines.iter().flatten().any(|l| spans_lines(l.as_bytes())) {
                    return Err(SPANNED_LINES);
                }
                Ok(Rows::Lines {
                    lines,
                    reader: Box::new(LineReader::new(layout)),
                })
            }
            (Some(_), _) => Err("the plan's columns do not match its spec"),
        }
    }
}

/// Whether a row belongs to a forgotten subject: one of its identifiers (the function's columns
/// from `at` on, one per `forget.parts`) normalises to a listed hash.
pub(crate) fn is_forgotten<'f>(
    forget: &ForgetSpec,
    at: usize,
    field: impl Fn(usize) -> Option<&'f [u8]>,
) -> bool {
    forget.parts.iter().enumerate().any(|(j, p)| {
        normalise_field(field(at + j), p.normaliser, &p.options).is_ok_and(|v| {
            forget
                .hashes
                .contains(&forget_hash(&forget.secret, v.as_bytes()))
        })
    })
}

impl Rows<'_> {
    /// Moves to `row`, and says why it must not be read, if it must not: the place among the
    /// function's columns of the column that says so, and why.
    pub(crate) fn load(&mut self, row: usize) -> Option<(Option<usize>, Malformed)> {
        match self {
            Rows::Columns(columns) => columns
                .iter()
                .position(|c| text_at(c, row).is_some_and(has_line_break))
                .map(|place| (Some(place), Malformed::LineBreak)),
            Rows::Lines { lines, reader } => reader.load(line_at(lines, row)),
        }
    }

    /// Column `c` of the function (the spec's layout) in the row last loaded.
    pub(crate) fn field(&self, row: usize, c: usize) -> Option<&[u8]> {
        match self {
            Rows::Columns(columns) => text_at(columns.get(c)?, row),
            Rows::Lines { reader, .. } => reader.field(c),
        }
    }
}

fn text_at(column: &StringArray, row: usize) -> Option<&[u8]> {
    (row < column.len() && !column.is_null(row)).then(|| column.value(row).as_bytes())
}

/// A malformed row's outcome: its place (if one column made it so) and why.
fn malformed_outcome(out: &mut Vec<u8>, place: Option<usize>, why: Malformed) {
    out.push(MALFORMED);
    let place = place.map_or(NO_PLACE, |p| u16::try_from(p).unwrap_or(NO_PLACE));
    out.extend_from_slice(&place.to_le_bytes());
    match why {
        Malformed::LineBreak => out.push(LINE_BREAK),
        Malformed::StrayQuote => out.push(STRAY_QUOTE),
        Malformed::OpenQuote => out.push(OPEN_QUOTE),
        Malformed::NotJsonObject => out.push(NOT_JSON_OBJECT),
        Malformed::NotOneValue => out.push(NOT_ONE_VALUE),
        Malformed::LineTooLong => out.push(LINE_TOO_LONG),
        Malformed::FieldCount { expected, found } => {
            out.push(FIELD_COUNT);
            for n in [expected, found] {
                out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
            }
        }
    }
}

/// The outcomes of the `count` rows of `rows`.
fn run_pass(spec: &PassSpec, mut rows: Rows<'_>, count: usize) -> ArrayRef {
    let consent_at = spec.parts.len();
    let forget_at = consent_at + usize::from(spec.consent);
    let values_at = forget_at + spec.forget.as_ref().map_or(0, |f| f.parts.len());
    // An accepted row's group and values, after its outcome byte (the point goes between).
    let mut valued: Vec<Vec<u8>> = Vec::new();
    // Each row's outcome without its point; accepted keys go to one batch for blinding.
    let mut pending: Vec<Zeroizing<Vec<u8>>> = Vec::with_capacity(count);
    let mut keys = ItemSet::new();
    let mut accepted: Vec<usize> = Vec::new();
    let mut key = Zeroizing::new(Vec::with_capacity(256));
    for row in 0..count {
        let mut out = Zeroizing::new(Vec::new());
        if let Some((place, why)) = rows.load(row) {
            malformed_outcome(&mut out, place, why);
            pending.push(out);
            continue;
        }
        let field = |c: usize| rows.field(row, c);
        if spec.consent && !field(consent_at).is_some_and(is_consent) {
            out.push(NO_CONSENT);
            pending.push(out);
            continue;
        }
        if let Some(forget) = &spec.forget
            && is_forgotten(forget, forget_at, field)
        {
            out.push(FORGOTTEN);
            pending.push(out);
            continue;
        }
        key.clear();
        let mut rejected = None;
        for (j, p) in spec.parts.iter().enumerate() {
            match normalise_field(field(j), p.normaliser, &p.options) {
                Ok(v) => {
                    if j > 0 {
                        key.push(KEY_PART_SEPARATOR);
                    }
                    key.extend_from_slice(v.as_bytes());
                }
                Err(why) => {
                    rejected = Some((j, why));
                    break;
                }
            }
        }
        match rejected.map(|(j, why)| (j, why.to_code())) {
            Some((j, Some(code))) => {
                out.push(REJECTED);
                out.push(u8::try_from(j).unwrap_or(u8::MAX));
                out.extend_from_slice(&code);
            }
            // A reason with no code (none the normalisers give): the node refuses the
            // outcome rather than count it wrongly.
            Some((_, None)) => out.push(0),
            None => match spec
                .values
                .as_ref()
                .map(|v| values_of(v, values_at, &field))
            {
                Some(None) => out.push(BAD_VALUE),
                tail if keys.push(&key).is_ok() => {
                    accepted.push(row);
                    valued.extend(tail.flatten());
                    out.push(ACCEPTED);
                }
                _ => out.push(0),
            },
        }
        pending.push(out);
    }
    let points = blind_items(&spec.key, &spec.key_name, &keys);
    drop(keys);
    let mut builder = BinaryBuilder::with_capacity(count, count * (1 + POINT_LEN));
    let mut next_point = accepted.iter().zip(&points).enumerate().peekable();
    let mut bytes = Vec::with_capacity(1 + POINT_LEN + 4 + 8 * 16);
    for (row, out) in pending.iter().enumerate() {
        match next_point.peek() {
            Some((i, (r, point))) if **r == row => {
                bytes.clear();
                match valued.get(*i) {
                    None => bytes.push(ACCEPTED),
                    Some(_) => bytes.push(VALUED),
                }
                bytes.extend_from_slice(point.as_slice());
                if let Some(tail) = valued.get(*i) {
                    bytes.extend_from_slice(tail);
                }
                builder.append_value(&bytes);
                next_point.next();
            }
            _ => builder.append_value(out.as_slice()),
        }
    }
    Arc::new(builder.finish())
}

/// An accepted row's group and values, encoded as they follow its point (`u32` group, then
/// each value as `i64`, little-endian); `None` if a value is missing or not an integer.
fn values_of<'a>(
    spec: &ValuesSpec,
    at: usize,
    field: &impl Fn(usize) -> Option<&'a [u8]>,
) -> Option<Vec<u8>> {
    let mut tail = Vec::with_capacity(4 + 8 * spec.sums);
    let group = spec.group_of(if spec.groups.is_some() {
        field(at + spec.sums)
    } else {
        None
    });
    tail.extend_from_slice(&group.to_le_bytes());
    for i in 0..spec.sums {
        let value = field(at + i).and_then(super::value::parse_value)?;
        tail.extend_from_slice(&value.to_le_bytes());
    }
    Some(tail)
}

#[cfg(test)]
#[path = "cluster_pass_tests.rs"]
mod tests;
