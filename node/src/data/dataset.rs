//! Ingestion: streams a dataset's rows (from any [`Source`]) and turns the requested identifier
//! columns into join keys.
//!
//! A join key is the normalised value of each requested identifier, joined with the
//! [`KEY_PART_SEPARATOR`] byte for a composite key. Rows where a key part does not normalise
//! (or is too long, or not UTF-8, or missing) are counted as rejected and never matched. Errors
//! and logs name the file, the row and the column, never a value: values are raw identifiers.
//!
//! Reading is strict: a CSV row whose number of fields differs from the header's, or with a line
//! break inside a field (what an unterminated quote leaves: it swallows the rows after it into
//! one field), is rejected whole rather than read by position. A null or empty identifier
//! rejects its row too. Every rejection is counted by reason in [`Rejections`], with the place
//! of the first few (the line of a CSV file, the row of other sources); the job's audit entry
//! keeps them.

use std::collections::HashSet;

use cleanroom_circuits::aggregate::GroupDomain;
use cleanroom_circuits::{EncodedPoint, ItemSet, JobKey};
use zeroize::Zeroizing;

pub use crate::audit::{RejectedRow, Rejections};

use super::cluster_aggregate::{AggregateSpec, Cell, MalformedKind};
use super::cluster_pass::{ForgetSpec, Outcome, PartSpec, PassSpec, SealingKey, ValuesSpec};
use super::normalise::{NormaliseError, NormaliseOptions, Normaliser};
use super::schema::{DatasetConfig, IdentifierConfig};
use super::source::frame::{Frame, GroupedRow, Grouping};
use super::source::{Malformed, Source, SourceError};

/// Most rows a dataset may have for one job.
pub const MAX_ROWS: u64 = 100_000_000;

/// The byte between the parts of a composite key (ASCII unit separator). A field containing it
/// is rejected, so that no two different part lists can join to the same key.
pub const KEY_PART_SEPARATOR: u8 = 0x1F;

/// Longest raw field (bytes) accepted in an identifier column; a longer one rejects its row.
pub const MAX_FIELD_BYTES: usize = 1024;

/// How many rejected rows are logged (row, column, reason) per pass; the rest are only counted.
const LOGGED_REJECTIONS: u64 = 10;

/// The identifier names a job joins on, e.g. `["email"]` or `["email", "phone"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    /// Identifier names (as declared in the dataset config), in join order.
    pub names: Vec<String>,
}

impl KeySpec {
    /// A key spec from identifier names.
    pub fn new<S: Into<String>>(names: impl IntoIterator<Item = S>) -> KeySpec {
        KeySpec {
            names: names.into_iter().map(Into::into).collect(),
        }
    }
}

/// Counting while reading (the record is the audit log's, [`Rejections`]).
impl Rejections {
    /// Counts one rejected row (and keeps its place if it is among the first), logging the first.
    fn record(&mut self, origin: &str, line: u64, column: Option<&str>, why: Rejection) {
        *self.by_reason.entry(why.label()).or_default() += 1;
        if (self.first.len() as u64) < LOGGED_REJECTIONS {
            tracing::warn!(
                file = origin,
                line,
                column = column.unwrap_or(""),
                reason = %why,
                "row rejected"
            );
            self.first.push(RejectedRow {
                line,
                column: column.map(str::to_owned),
                reason: why.to_string(),
            });
        }
    }

    /// Counts `n` rejected rows that have no place (grouped on a cluster).
    fn count_unplaced(&mut self, why: Rejection, n: u64) {
        let count = self.by_reason.entry(why.label()).or_default();
        *count = count.saturating_add(n);
    }

    /// Logs how many rejections went unlogged.
    fn log_rest(&self, origin: &str) {
        let total = self.total();
        if total > LOGGED_REJECTIONS {
            tracing::warn!(
                file = origin,
                rejected = total,
                logged = LOGGED_REJECTIONS,
                "more rows rejected than logged"
            );
        }
    }
}

/// The distinct join keys of a dataset, and what reading it found.
#[derive(Debug, Clone)]
pub struct LoadedKeys {
    /// Distinct join keys, sorted (deduplicated with [`ItemSet::dedup`]).
    pub items: ItemSet,
    /// Data rows read (header excluded), rejected ones included.
    pub rows_read: u64,
    /// Rows skipped because they were malformed or a key part was missing, too long, not UTF-8
    /// or did not normalise.
    pub rows_rejected: u64,
    /// The rejected rows by reason.
    pub rejections: Rejections,
    /// Accepted rows whose key equals that of an earlier row.
    pub duplicate_rows: u64,
    /// Rows excluded because they lack consent for the job's purpose.
    pub rows_excluded_consent: u64,
    /// Rows excluded because one of their identifiers belongs to a forgotten subject.
    pub rows_excluded_deleted: u64,
}

impl LoadedKeys {
    /// The keys of one pass with what the pass counted.
    fn from_counts(items: ItemSet, counts: RowCounts, duplicate_rows: u64) -> LoadedKeys {
        LoadedKeys {
            items,
            rows_read: counts.rows_read,
            rows_rejected: counts.rejections.total(),
            rejections: counts.rejections,
            duplicate_rows,
            rows_excluded_consent: counts.rows_excluded_consent,
            rows_excluded_deleted: counts.rows_excluded_deleted,
        }
    }

    /// What reading the dataset counted, as the audit log's access entry records it.
    pub fn counts(&self) -> KeyedRowCounts {
        KeyedRowCounts {
            rows_read: self.rows_read,
            rows_rejected: self.rows_rejected,
            rejections: self.rejections.clone(),
            rows_excluded_consent: self.rows_excluded_consent,
            rows_excluded_deleted: self.rows_excluded_deleted,
        }
    }
}

/// Forgotten subjects: keyed hashes ([`forget_hash`]) of normalised identifier values, with
/// the node-local secret that keys them.
#[derive(Clone)]
pub struct Forgotten {
    /// The node-local HMAC key.
    pub secret: [u8; 32],
    /// `forget_hash(secret, normalised value)` of every forgotten identifier value.
    pub hashes: HashSet<[u8; 32]>,
}

impl std::fmt::Debug for Forgotten {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forgotten")
            .field("hashes", &self.hashes.len())
            .finish_non_exhaustive()
    }
}

/// Which rows a job may use beyond key validity.
#[derive(Debug, Clone, Copy, Default)]
pub struct RowFilter<'a> {
    /// The consent column for the job's purpose (the permit of the job names it):
    /// a row is used only if this field is `true`, `1` or `yes` (any case, trimmed). `None` =
    /// no consent filter.
    pub consent_column: Option<&'a str>,
    /// Forgotten subjects: a row is excluded if ANY of the dataset's declared identifiers (not
    /// only the job's keys) normalises to a forgotten value.
    pub forgotten: Option<&'a Forgotten>,
}

/// The keyed hash naming a forgotten subject: HMAC-SHA256(secret, normalised identifier
/// value). Keyed so that the deletion list does not reveal identifiers to whoever reads it.
pub fn forget_hash(secret: &[u8; 32], normalised_key: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(secret);
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    inner.update(normalised_key);
    let inner = inner.finalize();
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner);
    let mut out = [0u8; 32];
    out.copy_from_slice(&outer.finalize());
    out
}

/// The message of [`DatasetError::MissingColumn`]: the dataset's columns, and the one the
/// config meant when only its case differs (names match exactly).
fn missing_column(location: &str, column: &str, headers: &[String]) -> String {
    if headers.iter().all(String::is_empty) {
        return format!(
            "dataset {location} has no column '{column}': it has no header line (is the file \
             empty?)"
        );
    }
    format!(
        "dataset {location} has no column '{column}' (its columns: {}){}",
        headers.join(", "),
        header_hint(column, headers)
    )
}

/// What to do when `column` is not among `headers`, if the headers tell: Excel's `sep=;` line
/// read as the header, or a name whose case differs. Empty if they do not.
pub fn header_hint(column: &str, headers: &[String]) -> String {
    if headers
        .first()
        .is_some_and(|h| h.trim_start_matches('\u{feff}').starts_with("sep="))
    {
        return "; the first line is Excel's `sep=` line, not the header: delete that line (the \
                dataset's `delimiter` says the separator)"
            .to_owned();
    }
    match headers.iter().find(|h| h.eq_ignore_ascii_case(column)) {
        Some(near) => format!("; names match exactly: did you mean '{near}'?"),
        None => String::new(),
    }
}

/// Whether a consent field says yes: `true`, `t`, `yes`, `y` or `1`, any case, trimmed
/// (`t` is how PostgreSQL exports a true boolean; `Y` is a common flag). Anything else, empty
/// and null included, is no consent.
pub fn is_consent(field: &[u8]) -> bool {
    const YES: [&[u8]; 5] = [b"true", b"t", b"yes", b"y", b"1"];
    let f = field.trim_ascii();
    YES.iter().any(|yes| f.eq_ignore_ascii_case(yes))
}

/// Why a dataset could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatasetError {
    /// The keys could not be blinded into the job's spill files (this node's disk).
    #[error("the job's spill files failed: {0}")]
    Spill(String),
    /// The job names no identifier.
    #[error("dataset '{dataset}': the job names no join key")]
    NoKeys {
        /// The dataset.
        dataset: String,
    },
    /// The job names an identifier the dataset does not declare.
    #[error("dataset '{dataset}' declares no identifier '{identifier}' (declared: {declared})")]
    UnknownIdentifier {
        /// The dataset.
        dataset: String,
        /// The identifier the job asked for.
        identifier: String,
        /// The declared identifier names, comma-separated.
        declared: String,
    },
    /// The rows could not be read (a file, the engine, a malformed CSV).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A column the config names is not in the dataset.
    #[error("{}", missing_column(location, column, headers))]
    MissingColumn {
        /// The dataset's path, URL or view.
        location: String,
        /// The column the config names.
        column: String,
        /// The dataset's columns.
        headers: Vec<String>,
    },
    /// A column the config names appears more than once.
    #[error("dataset {location}: column '{column}' appears more than once")]
    AmbiguousColumn {
        /// The dataset's path, URL or view.
        location: String,
        /// The repeated column.
        column: String,
    },
    /// The file has more data rows than the cap.
    #[error("dataset {location} has more than {max_rows} data rows (the cap for one job)")]
    TooManyRows {
        /// The dataset's path, URL or view.
        location: String,
        /// The cap.
        max_rows: u64,
    },
    /// The join keys exceed what an [`ItemSet`] holds.
    #[error("dataset {location}: join keys exceed 4 GiB at row {row}")]
    TooLarge {
        /// The dataset's path, URL or view.
        location: String,
        /// The row at which the set filled up.
        row: u64,
    },
}

/// Why one row was rejected (logged with its line and column, never its value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Rejection {
    #[error("the row has {found} fields where the header has {expected}")]
    FieldCount { expected: usize, found: usize },
    #[error("a field holds a line break (what a quote left open makes of its line)")]
    LineBreak,
    #[error("a field holds a quote character (what a quote left open leaves behind)")]
    StrayQuote,
    #[error("a quote is still open at the end of the line (a record over two lines)")]
    OpenQuote,
    #[error("the line is not a JSON object")]
    NotJsonObject,
    #[error("the field holds a list or an object, not one value")]
    NotOneValue,
    #[error(
        "the line is longer than {} bytes",
        super::source::json_line::MAX_LINE_BYTES
    )]
    LineTooLong,
    #[error("the field is null or missing")]
    Missing,
    #[error("the field is empty")]
    Empty,
    #[error("the field is longer than {MAX_FIELD_BYTES} bytes")]
    TooLong,
    #[error("the field is not UTF-8")]
    NotUtf8,
    #[error("the field contains the key separator byte 0x1F")]
    Separator,
    #[error("the field does not read as its column's type ({kind}, from the file's first rows)")]
    ColumnType { kind: &'static str },
    #[error("{0}")]
    Normalise(NormaliseError),
}

impl Rejection {
    /// The reason's name for counting: the message without the row's particulars.
    pub(crate) fn label(self) -> String {
        match self {
            Rejection::FieldCount { .. } => "field count".to_owned(),
            Rejection::ColumnType { .. } => "field type".to_owned(),
            Rejection::LineBreak => "line break in a field".to_owned(),
            Rejection::StrayQuote => "quote in a field".to_owned(),
            Rejection::OpenQuote => "quote left open".to_owned(),
            Rejection::NotJsonObject => "not a JSON object".to_owned(),
            Rejection::NotOneValue => "list or object in a field".to_owned(),
            Rejection::LineTooLong => "line too long".to_owned(),
            other => other.to_string(),
        }
    }
}

/// The codes an executor pass ([`super::cluster_pass`]) sends a rejection as: a kind byte and,
/// for a phone's digit count, that count.
impl Rejection {
    pub(crate) fn to_code(self) -> Option<[u8; 3]> {
        use NormaliseError as N;
        let (kind, n) = match self {
            // Whole-line reasons, sent as a malformed outcome, not as a key part's rejection.
            Rejection::FieldCount { .. }
            | Rejection::ColumnType { .. }
            | Rejection::NotJsonObject
            | Rejection::NotOneValue
            | Rejection::LineTooLong => return None,
            Rejection::LineBreak => (1, 0),
            Rejection::Missing => (2, 0),
            Rejection::Empty => (3, 0),
            Rejection::TooLong => (4, 0),
            Rejection::NotUtf8 => (5, 0),
            Rejection::Separator => (6, 0),
            Rejection::StrayQuote => (7, 0),
            Rejection::OpenQuote => (8, 0),
            Rejection::Normalise(e) => match e {
                N::EmailEmpty => (20, 0),
                N::EmailNoAt => (21, 0),
                N::EmailManyAt => (22, 0),
                N::EmailEmptyLocal => (23, 0),
                N::EmailEmptyDomain => (24, 0),
                N::EmailWhitespace => (25, 0),
                N::PhoneEmpty => (30, 0),
                N::PhoneCountryCode => (31, 0),
                N::PhoneUnparsable => (32, 0),
                N::PhoneTooShort => (33, 0),
                N::PhoneTooLong => (34, 0),
                N::PhoneLength { digits } => (35, u16::try_from(digits).unwrap_or(u16::MAX)),
                N::GenericEmpty => (40, 0),
            },
        };
        let [lo, hi] = n.to_le_bytes();
        Some([kind, lo, hi])
    }

    pub(crate) fn from_code(code: [u8; 3]) -> Option<Rejection> {
        use NormaliseError as N;
        let n = usize::from(u16::from_le_bytes([code[1], code[2]]));
        Some(match code[0] {
            1 => Rejection::LineBreak,
            2 => Rejection::Missing,
            3 => Rejection::Empty,
            4 => Rejection::TooLong,
            5 => Rejection::NotUtf8,
            6 => Rejection::Separator,
            7 => Rejection::StrayQuote,
            8 => Rejection::OpenQuote,
            kind => Rejection::Normalise(match kind {
                20 => N::EmailEmpty,
                21 => N::EmailNoAt,
                22 => N::EmailManyAt,
                23 => N::EmailEmptyLocal,
                24 => N::EmailEmptyDomain,
                25 => N::EmailWhitespace,
                30 => N::PhoneEmpty,
                31 => N::PhoneCountryCode,
                32 => N::PhoneUnparsable,
                33 => N::PhoneTooShort,
                34 => N::PhoneTooLong,
                35 => N::PhoneLength { digits: n },
                40 => N::GenericEmpty,
                _ => return None,
            }),
        })
    }
}

/// A malformed row counted on the executors: its reason, without the row's figures (a field
/// count's are not kept; the count goes under the same reason).
impl From<MalformedKind> for Rejection {
    fn from(m: MalformedKind) -> Rejection {
        match m {
            MalformedKind::FieldCount => Rejection::FieldCount {
                expected: 0,
                found: 0,
            },
            MalformedKind::LineBreak => Rejection::LineBreak,
            MalformedKind::StrayQuote => Rejection::StrayQuote,
            MalformedKind::OpenQuote => Rejection::OpenQuote,
            MalformedKind::NotJsonObject => Rejection::NotJsonObject,
            MalformedKind::NotOneValue => Rejection::NotOneValue,
            MalformedKind::LineTooLong => Rejection::LineTooLong,
        }
    }
}

impl From<Malformed> for Rejection {
    fn from(m: Malformed) -> Rejection {
        match m {
            Malformed::FieldCount { expected, found } => Rejection::FieldCount { expected, found },
            Malformed::LineBreak => Rejection::LineBreak,
            Malformed::StrayQuote => Rejection::StrayQuote,
            Malformed::OpenQuote => Rejection::OpenQuote,
            Malformed::NotJsonObject => Rejection::NotJsonObject,
            Malformed::NotOneValue => Rejection::NotOneValue,
            Malformed::LineTooLong => Rejection::LineTooLong,
        }
    }
}

/// The key name of a job: identifier names joined with `+` (`"email"`, `"email+phone"`). Used
/// in agreements and as the hash-to-group domain.
pub fn key_name(keys: &KeySpec) -> String {
    keys.names.join("+")
}

/// Reads the dataset's CSV row by row (headers required), normalises each requested
/// identifier, joins a composite key's parts with [`KEY_PART_SEPARATOR`], collects the keys and
/// deduplicates them (which sorts them).
///
/// Rows where any key part is missing, longer than [`MAX_FIELD_BYTES`], not UTF-8 or fails to
/// normalise are counted in `rows_rejected` and never matched. A file with more than
/// `max_rows` data rows is refused with [`DatasetError::TooManyRows`].
///
/// No consent or deletion filter: a job with a purpose uses [`load_keys_for`].
pub fn load_keys(
    dataset: &DatasetConfig,
    keys: &KeySpec,
    max_rows: u64,
) -> Result<LoadedKeys, DatasetError> {
    load_keys_for(dataset, keys, RowFilter::default(), max_rows)
}

/// [`load_keys`] with a [`RowFilter`]: rows without consent (checked first) and rows of
/// forgotten subjects (checked next) are excluded and counted, before key validity.
pub fn load_keys_for(
    dataset: &DatasetConfig,
    keys: &KeySpec,
    filter: RowFilter<'_>,
    max_rows: u64,
) -> Result<LoadedKeys, DatasetError> {
    let mut items = ItemSet::new();
    let counts = for_each_key(dataset, keys, &[], filter, Some(max_rows), |row, key, _| {
        items.push(key).map_err(|_| DatasetError::TooLarge {
            location: dataset.location(),
            row,
        })
    })?;
    let duplicate_rows = items.dedup() as u64;
    Ok(LoadedKeys::from_counts(items, counts, duplicate_rows))
}

/// Keys per chunk that [`load_keys_chunked`] hands over: enough for the blinding to keep every
/// core busy, few enough to stay small (a few hundred KiB).
pub const KEY_CHUNK: usize = 16_384;

/// [`load_keys_for`] for a job whose memory is bounded: the keys go to `sink` in chunks of
/// [`KEY_CHUNK`] as they are read, neither deduplicated nor kept. The result's `items` is empty
/// and its `duplicate_rows` 0; the sink's owner knows the duplicates.
pub fn load_keys_chunked(
    dataset: &DatasetConfig,
    keys: &KeySpec,
    filter: RowFilter<'_>,
    max_rows: u64,
    mut sink: impl FnMut(&ItemSet) -> Result<(), DatasetError>,
) -> Result<LoadedKeys, DatasetError> {
    let mut chunk = ItemSet::new();
    let counts = for_each_key(dataset, keys, &[], filter, Some(max_rows), |row, key, _| {
        chunk.push(key).map_err(|_| DatasetError::TooLarge {
            location: dataset.location(),
            row,
        })?;
        if chunk.len() == KEY_CHUNK {
            sink(&chunk)?;
            chunk = ItemSet::new();
        }
        Ok(())
    })?;
    if !chunk.is_empty() {
        sink(&chunk)?;
    }
    Ok(LoadedKeys::from_counts(ItemSet::new(), counts, 0))
}

/// [`load_keys_chunked`] on the partner's Ballista executors: the pass (consent, forgotten
/// subjects, normalising, hashing and blinding with `key`) runs there
/// ([`super::cluster_pass`]), sealed under `sealing`; the node counts the outcomes as its own
/// pass would and hands the points to `sink` in chunks of [`KEY_CHUNK`], neither deduplicated
/// nor kept. A dataset read in this process (no cluster) is refused.
pub fn blind_keys_on_cluster(
    dataset: &DatasetConfig,
    keys: &KeySpec,
    filter: RowFilter<'_>,
    max_rows: u64,
    key: &JobKey,
    sealing: &SealingKey,
    mut sink: impl FnMut(&[EncodedPoint]) -> Result<(), DatasetError>,
) -> Result<LoadedKeys, DatasetError> {
    let mut chunk: Vec<EncodedPoint> = Vec::with_capacity(KEY_CHUNK);
    let sealed = Sealed {
        key,
        sealing,
        values: None,
    };
    let counts = pass_on_cluster(dataset, keys, filter, max_rows, sealed, |_, outcome| {
        chunk.push(accepted_point(dataset, outcome)?);
        if chunk.len() == KEY_CHUNK {
            sink(&chunk)?;
            chunk.clear();
        }
        Ok(())
    })?;
    if !chunk.is_empty() {
        sink(&chunk)?;
    }
    Ok(LoadedKeys::from_counts(ItemSet::new(), counts, 0))
}

/// Second pass of a `match` whose points the executors computed: the same pass with the same
/// `key`, returning the 1-based data-row numbers, ascending, whose point is in `matched`
/// (sorted), the pass's counts, and how many of the matched points it found (the caller
/// compares both with the first pass, to tell a dataset that changed in between).
pub fn matching_rows_on_cluster(
    dataset: &DatasetConfig,
    keys: &KeySpec,
    filter: RowFilter<'_>,
    max_rows: u64,
    key: &JobKey,
    sealing: &SealingKey,
    matched: &[EncodedPoint],
) -> Result<(Vec<u64>, RowCounts, usize), DatasetError> {
    let mut rows = Vec::new();
    // One flag per matched point: 1 bit's worth, not a second set of them.
    let mut found = vec![false; matched.len()];
    let sealed = Sealed {
        key,
        sealing,
        values: None,
    };
    let counts = pass_on_cluster(dataset, keys, filter, max_rows, sealed, |row, outcome| {
        let point = accepted_point(dataset, outcome)?;
        if let Ok(i) = matched.binary_search(&point) {
            rows.push(row);
            found[i] = true;
        }
        Ok(())
    })?;
    Ok((rows, counts, found.iter().filter(|&&f| f).count()))
}

/// A dataset opened for an executor pass: its frame, its columns, the columns the pass reads
/// (key parts, the filters', then any values'), and the pass's spec, sealed.
struct OpenPass {
    frame: Frame,
    headers: Vec<String>,
    read: Vec<usize>,
    sealed: Vec<u8>,
}

/// Opens `dataset` for an executor pass over `keys` (and the values `sealed` asks for) and
/// seals its spec. A dataset read in this process (no cluster) is refused.
fn open_pass(
    dataset: &DatasetConfig,
    keys: &KeySpec,
    filter: RowFilter<'_>,
    sealed: Sealed<'_>,
) -> Result<OpenPass, DatasetError> {
    let Sealed {
        key,
        sealing,
        values,
    } = sealed;
    let location = dataset.location();
    let engine = |message: String| engine_error(dataset, message);
    let ids = resolve_identifiers(dataset, keys)?;
    let (frame, headers) = open_on_cluster(dataset)?;
    let parts = locate_columns(&headers, &location, &ids)?;
    let mut read: Vec<usize> = parts.iter().map(|p| p.index).collect();
    let (consent, forgotten) = locate_filter(dataset, &headers, &location, filter, &mut read)?;
    let values = match values {
        Some((columns, spec)) => {
            for column in columns {
                read.push(locate_column(&headers, &location, column)?);
            }
            Some(spec)
        }
        None => None,
    };
    let forget = forget_spec(forgotten);
    let spec = PassSpec {
        key: JobKey::from_secret_bytes(&key.to_secret_bytes())
            .ok_or_else(|| engine("the job key cannot be sealed".into()))?,
        key_name: key_name(keys),
        parts: parts.iter().map(Part::spec).collect(),
        consent: consent.is_some(),
        forget,
        lines: frame.line_layout(&read),
        values,
    };
    let sealed = spec.seal(sealing).map_err(engine)?;
    drop(spec);
    Ok(OpenPass {
        frame,
        headers,
        read,
        sealed,
    })
}

/// One distinct point of an overlap-sum value holder's rows, as its executors grouped them
/// ([`grouped_points_on_cluster`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PointRows {
    /// `k·H(key)`.
    pub point: EncodedPoint,
    /// How many rows have it.
    pub rows: u64,
    /// The lowest and the highest group of its rows.
    pub groups: (i128, i128),
    /// Each value's exact sum over its rows.
    pub sums: Vec<i128>,
}

/// An overlap-sum value holder's pass on the partner's executors, grouped there by point
/// ([`super::cluster_outcome`]): counts the rows read and left out as the node's own pass would
/// but without places, and hands each distinct point to `point`. Returns the counts and the
/// rows skipped for a value that is missing or not an integer. `sealed` must ask for values.
pub(crate) fn grouped_points_on_cluster(
    dataset: &DatasetConfig,
    keys: &KeySpec,
    filter: RowFilter<'_>,
    max_rows: u64,
    sealed: Sealed<'_>,
    mut point: impl FnMut(PointRows) -> Result<(), DatasetError>,
) -> Result<(RowCounts, u64), DatasetError> {
    let location = dataset.location();
    let engine = |message: String| engine_error(dataset, message);
    let sums = match &sealed.values {
        Some((_, spec)) => spec.sums,
        None => return Err(engine("a pass grouped by point needs values".into())),
    };
    let OpenPass {
        mut frame,
        read,
        sealed,
        ..
    } = open_pass(dataset, keys, filter, sealed)?;
    let mut counts = RowCounts::default();
    let mut bad_values = 0u64;
    frame.grouped(&read, sealed, Grouping::Points(sums), |rows| {
        for row in rows {
            let outcome = Outcome::decode(&row.cell).ok_or_else(|| {
                engine(
                    "an executor returned an outcome this node cannot read (are the executors \
                     running this node's version?)"
                        .into(),
                )
            })?;
            // Saturating: the figures come from other processes; too many rows fails below.
            counts.rows_read = counts.rows_read.saturating_add(row.rows);
            if counts.rows_read > max_rows {
                return Err(DatasetError::TooManyRows {
                    location: location.clone(),
                    max_rows,
                });
            }
            match outcome {
                Outcome::Malformed(_, why) => {
                    counts.rejections.count_unplaced(why.into(), row.rows)
                }
                Outcome::Rejected(_, why) => counts.rejections.count_unplaced(why, row.rows),
                Outcome::NoConsent => {
                    counts.rows_excluded_consent =
                        counts.rows_excluded_consent.saturating_add(row.rows);
                }
                Outcome::Forgotten => {
                    counts.rows_excluded_deleted =
                        counts.rows_excluded_deleted.saturating_add(row.rows);
                }
                Outcome::BadValue => bad_values = bad_values.saturating_add(row.rows),
                Outcome::Accepted(p) => match row.sums.as_slice() {
                    [lowest, highest, values @ ..] if values.len() == sums => point(PointRows {
                        point: p,
                        rows: row.rows,
                        groups: (*lowest, *highest),
                        sums: values.to_vec(),
                    })?,
                    _ => {
                        return Err(engine(
                            "the executors' grouping returned another shape".into(),
                        ));
                    }
                },
                Outcome::Valued(..) => {
                    return Err(engine(
                        "an executor returned a row where the pass grouped by point".into(),
                    ));
                }
            }
        }
        Ok(())
    })?;
    // A view's CSV tables: the lines they rejected never reached the grouping.
    counts.add_table_rejections(frame.take_table_rejections());
    counts.rejections.log_rest(&location);
    Ok((counts, bad_values))
}

/// An aggregate's pass on the partner's Ballista executors, grouped there
/// ([`super::cluster_aggregate`]): the rows read and left out (malformed, no consent,
/// forgotten), counted as the node's own pass would but without places, and the rows the
/// executors grouped by cell. `columns`: the group column, then the summed ones (`bounds`, in
/// order), then with `person` the person column: the executors then clip each person's sums
/// ([`Grouping::Persons`]). A dataset read in this process (no cluster) is refused.
pub(crate) fn aggregate_on_cluster(
    dataset: &DatasetConfig,
    columns: &[&str],
    (domain, bounds, person): (&GroupDomain, &[(i64, i64)], bool),
    filter: RowFilter<'_>,
    max_rows: u64,
    sealing: &SealingKey,
) -> Result<(RowCounts, Vec<(Cell, GroupedRow)>), DatasetError> {
    let location = dataset.location();
    let engine = |message: String| engine_error(dataset, message);
    let (mut frame, headers) = open_on_cluster(dataset)?;
    let mut read = columns
        .iter()
        .map(|c| locate_column(&headers, &location, c))
        .collect::<Result<Vec<usize>, _>>()?;
    let (consent, forgotten) = locate_filter(dataset, &headers, &location, filter, &mut read)?;
    let spec = AggregateSpec {
        domain: domain.clone(),
        bounds: bounds.to_vec(),
        person,
        consent: consent.is_some(),
        forget: forget_spec(forgotten),
        lines: frame.line_layout(&read),
    };
    let sealed = spec.seal(sealing).map_err(engine)?;
    drop(spec);
    let grouping = match person {
        true => Grouping::Persons(bounds.to_vec()),
        false => Grouping::Cells(bounds.len()),
    };
    let mut grouped = Vec::new();
    frame.grouped(&read, sealed, grouping, |rows| {
        grouped.extend(rows);
        Ok::<_, DatasetError>(())
    })?;
    let mut counts = RowCounts::default();
    let mut kept = Vec::new();
    for row in grouped {
        let cell = Cell::decode(&row.cell).ok_or_else(|| {
            engine(
                "an executor returned a cell this node cannot read (are the executors running \
                 this node's version?)"
                    .into(),
            )
        })?;
        // Per person, a cell's rows are its persons' rows in it and those they left out in
        // other groups, its first two figures (its count is its persons).
        let rows = match (person, row.sums.as_slice()) {
            (false, _) => row.rows,
            (true, [rows, left_out, ..]) => {
                u64::try_from(rows.saturating_add(*left_out)).unwrap_or(u64::MAX)
            }
            (true, _) => {
                return Err(engine(
                    "the executors' grouping returned another shape".into(),
                ));
            }
        };
        // Saturating: the figures come from other processes; too many rows fails below.
        counts.rows_read = counts.rows_read.saturating_add(rows);
        match cell {
            Cell::Malformed(kind) => counts.rejections.count_unplaced(kind.into(), rows),
            Cell::NoConsent => {
                counts.rows_excluded_consent = counts.rows_excluded_consent.saturating_add(rows);
            }
            Cell::Forgotten => {
                counts.rows_excluded_deleted = counts.rows_excluded_deleted.saturating_add(rows);
            }
            Cell::Rejected | Cell::Counted(_) => kept.push((cell, row)),
        }
    }
    // A view's CSV tables: the lines they rejected never reached the grouping.
    counts.add_table_rejections(frame.take_table_rejections());
    if counts.rows_read > max_rows {
        return Err(DatasetError::TooManyRows { location, max_rows });
    }
    Ok((counts, kept))
}

/// What an executor pass is sealed with: the job key, the sealing key, and for an
/// overlap-sum's value holder the columns whose values come back with each point.
#[derive(Debug)]
pub struct Sealed<'a> {
    /// The job key the points are blinded with.
    pub key: &'a JobKey,
    /// The key the node and its executors share.
    pub sealing: &'a SealingKey,
    /// The summed columns (then the group column, if the spec groups) and how to read them.
    pub values: Option<(Vec<&'a str>, ValuesSpec)>,
}

/// An accepted row's point; an error for an outcome a pass without values never gives.
fn accepted_point(dataset: &DatasetConfig, outcome: Outcome) -> Result<EncodedPoint, DatasetError> {
    match outcome {
        Outcome::Accepted(point) => Ok(point),
        _ => Err(engine_error(
            dataset,
            "an executor returned values this pass did not ask for (are the executors running \
             this node's version?)"
                .into(),
        )),
    }
}

/// An error of a pass on the partner's cluster, about `dataset`.
pub(crate) fn engine_error(dataset: &DatasetConfig, message: String) -> DatasetError {
    DatasetError::Source(SourceError::Engine {
        dataset: dataset.name.clone(),
        location: dataset.location(),
        message,
    })
}

/// `dataset` opened for an executor pass (refused unless it is on a cluster), and its column
/// names.
fn open_on_cluster(dataset: &DatasetConfig) -> Result<(Frame, Vec<String>), DatasetError> {
    if dataset.engine.cluster.is_none() {
        return Err(engine_error(
            dataset,
            "an executor pass needs a Ballista cluster".into(),
        ));
    }
    let frame = Frame::open(dataset)?;
    let headers = frame.headers().to_vec();
    Ok((frame, headers))
}

/// The deletion list as the executors get it: its secret, its hashes, and how each declared
/// identifier is normalised.
fn forget_spec(forgotten: Option<(&Forgotten, Vec<Part<'_>>)>) -> Option<ForgetSpec> {
    forgotten.map(|(fg, all)| ForgetSpec {
        secret: Zeroizing::new(fg.secret),
        hashes: fg.hashes.clone(),
        parts: all.iter().map(Part::spec).collect(),
    })
}

/// The executors' pass over the dataset ([`super::cluster_pass`]): counts the outcomes as the
/// node's own pass would, and hands each row accepted by its key to `accepted` with its number
/// and its point ([`Outcome::Accepted`]), in the order the plan returns the rows (the parts of
/// the data in order). An overlap-sum's value holder, whose rows carry values, is grouped
/// instead ([`grouped_points_on_cluster`]).
pub(crate) fn pass_on_cluster(
    dataset: &DatasetConfig,
    keys: &KeySpec,
    filter: RowFilter<'_>,
    max_rows: u64,
    sealed: Sealed<'_>,
    mut accepted: impl FnMut(u64, Outcome) -> Result<(), DatasetError>,
) -> Result<RowCounts, DatasetError> {
    let location = dataset.location();
    let engine = |message: String| engine_error(dataset, message);
    let OpenPass {
        mut frame,
        headers,
        read,
        sealed,
    } = open_pass(dataset, keys, filter, sealed)?;
    frame.start_pass(&read, sealed)?;

    let mut counts = RowCounts::default();
    // A rejected row's place: its row when the parts come in file order, else unknown (0).
    let in_order = frame.in_file_order();
    let placed = |row: u64| if in_order { row } else { 0 };
    while frame.advance()? {
        let row = counts.rows_read + 1;
        if row > max_rows {
            return Err(DatasetError::TooManyRows { location, max_rows });
        }
        counts.rows_read = row;
        let outcome = frame.outcome().and_then(Outcome::decode).ok_or_else(|| {
            engine(format!(
                "an executor returned an outcome this node cannot read at row {row} (are the \
                 executors running this node's version?)"
            ))
        })?;
        let column = |place: usize| {
            read.get(place)
                .and_then(|&i| headers.get(i))
                .map(String::as_str)
        };
        match outcome {
            Outcome::Malformed(place, why) => {
                let column = place.and_then(column);
                counts
                    .rejections
                    .record(&location, placed(row), column, why.into());
            }
            Outcome::NoConsent => counts.rows_excluded_consent += 1,
            Outcome::Forgotten => counts.rows_excluded_deleted += 1,
            Outcome::Rejected(place, why) => {
                counts
                    .rejections
                    .record(&location, placed(row), column(place), why);
            }
            accepted_row => accepted(row, accepted_row)?,
        }
    }
    // A view's CSV tables: the lines they rejected never reached the pass.
    counts.add_table_rejections(frame.take_table_rejections());
    if counts.rows_read > max_rows {
        return Err(DatasetError::TooManyRows { location, max_rows });
    }
    counts.rejections.log_rest(&location);
    Ok(counts)
}

/// Second pass for `match`: streams the dataset again and returns the 1-based data-row numbers
/// (header excluded), ascending, whose join key is in `matched` (a sorted, deduplicated set, as
/// [`ItemSet::dedup`] leaves it). Rejected rows never match.
pub fn matching_rows(
    dataset: &DatasetConfig,
    keys: &KeySpec,
    matched: &ItemSet,
) -> Result<Vec<u64>, DatasetError> {
    matching_rows_for(dataset, keys, RowFilter::default(), matched)
}

/// [`matching_rows`] with the same [`RowFilter`] as the load (excluded rows never match).
pub fn matching_rows_for(
    dataset: &DatasetConfig,
    keys: &KeySpec,
    filter: RowFilter<'_>,
    matched: &ItemSet,
) -> Result<Vec<u64>, DatasetError> {
    matching_rows_where(dataset, keys, filter, |key| {
        matched.position_sorted(key).is_some()
    })
    .map(|(rows, _)| rows)
}

/// [`matching_rows_for`] with a test of each key instead of a set of them (a spilled `match`
/// tags each key and looks the tag up); also gives what the pass read.
pub fn matching_rows_where(
    dataset: &DatasetConfig,
    keys: &KeySpec,
    filter: RowFilter<'_>,
    mut is_match: impl FnMut(&[u8]) -> bool,
) -> Result<(Vec<u64>, RowCounts), DatasetError> {
    let mut rows = Vec::new();
    let counts = for_each_key(dataset, keys, &[], filter, None, |row, key, _| {
        if is_match(key) {
            rows.push(row);
        }
        Ok(())
    })?;
    Ok((rows, counts))
}

/// Rows streamed by [`for_each_row_for`], and what filtering left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RowCounts {
    /// Data rows read (header excluded), excluded and malformed ones included.
    pub rows_read: u64,
    /// Malformed rows (wrong field count, a line break in a field), by reason; never passed on.
    pub rejections: Rejections,
    /// Rows excluded because they lack consent for the job's purpose.
    pub rows_excluded_consent: u64,
    /// Rows excluded because one of their identifiers belongs to a forgotten subject.
    pub rows_excluded_deleted: u64,
}

impl RowCounts {
    /// Counts the rows a view's CSV tables rejected (the view never saw them) as read and
    /// rejected, with the file and line of the first when they have one.
    fn add_table_rejections(&mut self, table: super::source::strict_table::Rejected) {
        self.rows_read = self.rows_read.saturating_add(table.total());
        self.rejections.multi_line_rows += table.multi_line_rows;
        for r in table.placed {
            self.rejections
                .record(&r.origin, r.line, r.column.as_deref(), r.why);
        }
        for (reason, n) in table.more {
            let count = self.rejections.by_reason.entry(reason).or_default();
            *count = count.saturating_add(n);
        }
    }
}

/// One pass over the dataset: the records that are well formed ([`Source::malformed`]) and
/// pass the [`RowFilter`] (consent, then forgotten subjects), counted in [`RowCounts`] on the
/// way.
struct Pass<'a> {
    location: String,
    source: Source,
    /// The columns the pass reads: a line break in one of them rejects the row.
    read: Vec<usize>,
    consent_index: Option<usize>,
    /// Forgotten subjects (non-empty) and where every declared identifier is.
    forgotten: Option<(&'a Forgotten, Vec<Part<'a>>)>,
    max_rows: Option<u64>,
    counts: RowCounts,
}

impl<'a> Pass<'a> {
    /// Opens the dataset; `read` are the columns the caller will read (located with
    /// [`locate_column`] or [`locate_columns`] on the source's headers through `locate`).
    fn open(
        dataset: &'a DatasetConfig,
        filter: RowFilter<'a>,
        max_rows: Option<u64>,
        locate: impl FnOnce(&[String], &str) -> Result<Vec<usize>, DatasetError>,
    ) -> Result<Pass<'a>, DatasetError> {
        let location = dataset.location();
        let mut source = Source::open(dataset)?;
        let headers = source.headers();
        let mut read = locate(headers, &location)?;
        let (consent_index, forgotten) =
            locate_filter(dataset, headers, &location, filter, &mut read)?;
        source.start(&read)?;
        Ok(Pass {
            location,
            source,
            read,
            consent_index,
            forgotten,
            max_rows,
            counts: RowCounts::default(),
        })
    }

    /// Reads up to the next record that is well formed and passes the filter: its data-row
    /// number, or `None` at the end.
    fn next_row(&mut self) -> Result<Option<u64>, DatasetError> {
        loop {
            let row = self.counts.rows_read + 1;
            if !self.source.advance()? {
                self.count_table_rejections();
                self.counts.rejections.log_rest(&self.location);
                return Ok(None);
            }
            if let Some(max) = self.max_rows
                && row > max
            {
                return Err(DatasetError::TooManyRows {
                    location: self.location.clone(),
                    max_rows: max,
                });
            }
            let counts = &mut self.counts;
            counts.rows_read = row;
            if let Some((column, why)) = self
                .source
                .malformed(&self.read, &mut counts.rejections.multi_line_rows)
            {
                let column = column
                    .and_then(|i| self.source.headers().get(i))
                    .map(String::as_str);
                counts.rejections.record(
                    &self.source.origin(),
                    self.source.location(),
                    column,
                    why.into(),
                );
                continue;
            }
            if let Some(i) = self.consent_index
                && !self.source.field(i).is_some_and(is_consent)
            {
                counts.rows_excluded_consent += 1;
                continue;
            }
            if let Some((fg, parts)) = &self.forgotten
                && is_forgotten(&self.source, parts, fg)
            {
                counts.rows_excluded_deleted += 1;
                continue;
            }
            return Ok(Some(row));
        }
    }

    /// Counts the rows a view's CSV tables rejected (the view never saw them).
    fn count_table_rejections(&mut self) {
        let table = self.source.take_table_rejections();
        self.counts.add_table_rejections(table);
    }

    /// Counts a row the caller rejected.
    fn reject(&mut self, column: &str, why: Rejection) {
        let (origin, line) = (self.source.origin(), self.source.location());
        self.counts
            .rejections
            .record(&origin, line, Some(column), why);
    }
}

/// Streams the dataset and calls `f(row, fields)` for every row that passes the
/// [`RowFilter`] (consent, then forgotten subjects), with the raw fields of `columns` in the
/// order given. For computations that read columns rather than join keys (aggregate); the caller
/// parses and validates the fields. Each named column must appear exactly once in the header;
/// more than `max_rows` data rows is refused.
pub fn for_each_row_for(
    dataset: &DatasetConfig,
    columns: &[&str],
    filter: RowFilter<'_>,
    max_rows: u64,
    mut f: impl FnMut(u64, &[Option<&[u8]>]) -> Result<(), DatasetError>,
) -> Result<RowCounts, DatasetError> {
    let mut pass = Pass::open(dataset, filter, Some(max_rows), |headers, location| {
        columns
            .iter()
            .map(|c| locate_column(headers, location, c))
            .collect()
    })?;
    let indices = pass.read[..columns.len()].to_vec();
    while let Some(row) = pass.next_row()? {
        let fields: Vec<Option<&[u8]>> = indices.iter().map(|&i| pass.source.field(i)).collect();
        f(row, &fields)?;
    }
    Ok(pass.counts)
}

/// Where the [`RowFilter`]'s columns are: the consent column, and every declared identifier
/// when subjects are forgotten. Appends them to `read` (the columns a pass reads), in that order.
#[allow(clippy::type_complexity)]
fn locate_filter<'a>(
    dataset: &'a DatasetConfig,
    headers: &[String],
    location: &str,
    filter: RowFilter<'a>,
    read: &mut Vec<usize>,
) -> Result<(Option<usize>, Option<(&'a Forgotten, Vec<Part<'a>>)>), DatasetError> {
    let consent = match filter.consent_column {
        Some(column) => Some(locate_column(headers, location, column)?),
        None => None,
    };
    let forgotten = match filter.forgotten.filter(|fg| !fg.hashes.is_empty()) {
        Some(fg) => {
            let all_ids: Vec<&IdentifierConfig> = dataset.identifiers.iter().collect();
            Some((fg, locate_columns(headers, location, &all_ids)?))
        }
        None => None,
    };
    read.extend(consent);
    if let Some((_, parts)) = &forgotten {
        read.extend(parts.iter().map(|p| p.index));
    }
    Ok((consent, forgotten))
}

/// One requested key part: where it is in the row and how it is normalised.
struct Part<'a> {
    id: &'a IdentifierConfig,
    opts: NormaliseOptions,
    index: usize,
}

impl Part<'_> {
    /// How the executors normalise it ([`super::cluster_pass`]).
    fn spec(&self) -> PartSpec {
        PartSpec {
            normaliser: self.id.normaliser,
            options: self.opts,
        }
    }
}

/// Rows streamed by [`for_each_keyed_row_for`], and what filtering left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyedRowCounts {
    /// Data rows read (header excluded), excluded and rejected ones included.
    pub rows_read: u64,
    /// Rows skipped because they were malformed or a key part was missing, too long, not UTF-8
    /// or did not normalise.
    pub rows_rejected: u64,
    /// The rejected rows by reason.
    pub rejections: Rejections,
    /// Rows excluded because they lack consent for the job's purpose.
    pub rows_excluded_consent: u64,
    /// Rows excluded because one of their identifiers belongs to a forgotten subject.
    pub rows_excluded_deleted: u64,
}

/// Streams the dataset and calls `f(row, key, fields)` for every row that passes the
/// [`RowFilter`] and whose join key normalises, with the raw fields of `columns` in the order
/// given. For computations that read values next to the key (overlap-sum); the caller parses and
/// validates the fields. More than `max_rows` data rows is refused.
pub fn for_each_keyed_row_for(
    dataset: &DatasetConfig,
    keys: &KeySpec,
    columns: &[&str],
    filter: RowFilter<'_>,
    max_rows: u64,
    f: impl FnMut(u64, &[u8], &[Option<&[u8]>]) -> Result<(), DatasetError>,
) -> Result<KeyedRowCounts, DatasetError> {
    let counts = for_each_key(dataset, keys, columns, filter, Some(max_rows), f)?;
    Ok(KeyedRowCounts::from(counts))
}

impl From<RowCounts> for KeyedRowCounts {
    fn from(counts: RowCounts) -> KeyedRowCounts {
        KeyedRowCounts {
            rows_read: counts.rows_read,
            rows_rejected: counts.rejections.total(),
            rejections: counts.rejections,
            rows_excluded_consent: counts.rows_excluded_consent,
            rows_excluded_deleted: counts.rows_excluded_deleted,
        }
    }
}

/// Streams the file and calls `f(row, key, fields of columns)` for every accepted row.
fn for_each_key(
    dataset: &DatasetConfig,
    keys: &KeySpec,
    columns: &[&str],
    filter: RowFilter<'_>,
    max_rows: Option<u64>,
    mut f: impl FnMut(u64, &[u8], &[Option<&[u8]>]) -> Result<(), DatasetError>,
) -> Result<RowCounts, DatasetError> {
    let ids = resolve_identifiers(dataset, keys)?;
    let mut parts = Vec::new();
    let mut pass = Pass::open(dataset, filter, max_rows, |headers, location| {
        parts = locate_columns(headers, location, &ids)?;
        parts
            .iter()
            .map(|p| Ok(p.index))
            .chain(columns.iter().map(|c| locate_column(headers, location, c)))
            .collect()
    })?;
    let column_indices = pass.read[parts.len()..parts.len() + columns.len()].to_vec();
    let mut key: Vec<u8> = Vec::with_capacity(256);
    while let Some(row) = pass.next_row()? {
        match build_key(&pass.source, &parts, &mut key) {
            Ok(()) => {
                let fields: Vec<Option<&[u8]>> = column_indices
                    .iter()
                    .map(|&i| pass.source.field(i))
                    .collect();
                f(row, &key, &fields)?;
            }
            Err((column, why)) => pass.reject(column, why),
        }
    }
    Ok(pass.counts)
}

/// Whether any declared identifier of the row normalises to a forgotten value.
fn is_forgotten(record: &Source, all: &[Part<'_>], fg: &Forgotten) -> bool {
    all.iter().any(|p| {
        normalise_field(record.field(p.index), p.id.normaliser, &p.opts)
            .is_ok_and(|v| fg.hashes.contains(&forget_hash(&fg.secret, v.as_bytes())))
    })
}

/// The index of one named column (exactly once in the header).
fn locate_column(headers: &[String], location: &str, column: &str) -> Result<usize, DatasetError> {
    let mut found = headers
        .iter()
        .enumerate()
        .filter(|(_, h)| *h == column)
        .map(|(i, _)| i);
    match (found.next(), found.next()) {
        (Some(index), None) => Ok(index),
        (Some(_), Some(_)) => Err(DatasetError::AmbiguousColumn {
            location: location.to_owned(),
            column: column.to_owned(),
        }),
        (None, _) => Err(DatasetError::MissingColumn {
            location: location.to_owned(),
            column: column.to_owned(),
            headers: headers.to_vec(),
        }),
    }
}

fn resolve_identifiers<'a>(
    dataset: &'a DatasetConfig,
    keys: &KeySpec,
) -> Result<Vec<&'a IdentifierConfig>, DatasetError> {
    if keys.names.is_empty() {
        return Err(DatasetError::NoKeys {
            dataset: dataset.name.clone(),
        });
    }
    keys.names
        .iter()
        .map(|name| {
            dataset
                .identifier(name)
                .ok_or_else(|| DatasetError::UnknownIdentifier {
                    dataset: dataset.name.clone(),
                    identifier: name.clone(),
                    declared: dataset.identifier_names(),
                })
        })
        .collect()
}

fn locate_columns<'a>(
    headers: &[String],
    location: &str,
    ids: &[&'a IdentifierConfig],
) -> Result<Vec<Part<'a>>, DatasetError> {
    ids.iter()
        .map(|id| {
            let mut found = headers
                .iter()
                .enumerate()
                .filter(|(_, h)| **h == id.column)
                .map(|(i, _)| i);
            match (found.next(), found.next()) {
                (Some(index), None) => Ok(Part {
                    id,
                    opts: id.options(),
                    index,
                }),
                (Some(_), Some(_)) => Err(DatasetError::AmbiguousColumn {
                    location: location.to_owned(),
                    column: id.column.clone(),
                }),
                (None, _) => Err(DatasetError::MissingColumn {
                    location: location.to_owned(),
                    column: id.column.clone(),
                    headers: headers.to_vec(),
                }),
            }
        })
        .collect()
}

/// Builds the row's join key into `key`, or says which column rejected the row and why.
fn build_key<'c>(
    record: &Source,
    parts: &[Part<'c>],
    key: &mut Vec<u8>,
) -> Result<(), (&'c str, Rejection)> {
    key.clear();
    for (i, part) in parts.iter().enumerate() {
        let column = part.id.column.as_str();
        let normalised = normalise_field(record.field(part.index), part.id.normaliser, &part.opts)
            .map_err(|why| (column, why))?;
        if i > 0 {
            key.push(KEY_PART_SEPARATOR);
        }
        key.extend_from_slice(normalised.as_bytes());
    }
    Ok(())
}

pub(crate) fn normalise_field(
    field: Option<&[u8]>,
    normaliser: Normaliser,
    options: &NormaliseOptions,
) -> Result<String, Rejection> {
    let field = field.ok_or(Rejection::Missing)?;
    if field.trim_ascii().is_empty() {
        return Err(Rejection::Empty);
    }
    if field.len() > MAX_FIELD_BYTES {
        return Err(Rejection::TooLong);
    }
    if field.contains(&KEY_PART_SEPARATOR) {
        return Err(Rejection::Separator);
    }
    let text = std::str::from_utf8(field).map_err(|_| Rejection::NotUtf8)?;
    normaliser
        .normalise_with(text, options)
        .map_err(Rejection::Normalise)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::IdentifierConfig;
    use std::fs::File;
    use std::io::Write;
    use std::path::Path;

    const CSV: &str = "\
customer_id,email,phone,amount_cents
1,alice@example.com,+1 415 555 0100,10
2,  ALICE@Example.com ,(415) 555-0100,20
3,bob@example.com,415.555.0101,30
4,not-an-email,+1 415 555 0102,40
5,carol@example.com,,50
6,\"dave@example.com\",001 415 555 0103,60
7,bob@example.com,+1 999 555 0101,70
";

    fn dataset(dir: &Path, csv: &[u8]) -> DatasetConfig {
        let path = dir.join("data.csv");
        let mut f = File::create(&path).unwrap();
        f.write_all(csv).unwrap();
        DatasetConfig::new(
            "customers",
            path,
            vec![
                IdentifierConfig::new("email", "email", Normaliser::Email),
                IdentifierConfig::new("phone", "phone", Normaliser::Phone),
                IdentifierConfig::new("id", "customer_id", Normaliser::Generic),
            ],
        )
    }

    fn items(set: &ItemSet) -> Vec<String> {
        set.iter()
            .map(|i| String::from_utf8_lossy(i).into_owned())
            .collect()
    }

    #[test]
    fn single_key_dedups_and_rejects() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(dir.path(), CSV.as_bytes());
        let loaded = load_keys(&d, &KeySpec::new(["email"]), 100).unwrap();
        assert_eq!(loaded.rows_read, 7);
        assert_eq!(loaded.rows_rejected, 1);
        assert_eq!(loaded.duplicate_rows, 2);
        assert_eq!(
            items(&loaded.items),
            [
                "alice@example.com",
                "bob@example.com",
                "carol@example.com",
                "dave@example.com"
            ]
        );
    }

    #[test]
    fn composite_key_joins_with_separator() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(dir.path(), CSV.as_bytes());
        let keys = KeySpec::new(["email", "phone"]);
        assert_eq!(key_name(&keys), "email+phone");
        let loaded = load_keys(&d, &keys, 100).unwrap();
        // Row 4: bad email; row 5: empty phone.
        assert_eq!(loaded.rows_rejected, 2);
        assert_eq!(loaded.duplicate_rows, 1);
        assert_eq!(
            items(&loaded.items),
            [
                "alice@example.com\u{1f}+14155550100",
                "bob@example.com\u{1f}+14155550101",
                "bob@example.com\u{1f}+19995550101",
                "dave@example.com\u{1f}+14155550103",
            ]
        );
    }

    #[test]
    fn matching_rows_maps_keys_back_to_rows() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(dir.path(), CSV.as_bytes());
        let keys = KeySpec::new(["email"]);
        let mut matched: ItemSet = [&b"bob@example.com"[..], b"alice@example.com", b"zed@x.y"]
            .into_iter()
            .collect();
        matched.dedup();
        assert_eq!(matching_rows(&d, &keys, &matched).unwrap(), [1, 2, 3, 7]);
        assert!(
            matching_rows(&d, &keys, &ItemSet::new())
                .unwrap()
                .is_empty()
        );
    }

    /// Row numbers count data records from 1 (the header is not one), not lines: a quoted
    /// field with a line break in it is one record over two lines.
    #[test]
    fn row_numbers_are_data_records_not_lines() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(
            dir.path(),
            b"customer_id,email,phone\n1,\"a@x.y\",+14155550101\n\"2\nwith a break\",b@x.y,+14155550102\n3,c@x.y,+14155550103\n",
        );
        let keys = KeySpec::new(["email"]);
        let mut matched: ItemSet = [&b"c@x.y"[..], b"b@x.y"].into_iter().collect();
        matched.dedup();
        // c@x.y is on line 5 of the file, and is data record 3.
        assert_eq!(matching_rows(&d, &keys, &matched).unwrap(), [2, 3]);
    }

    #[test]
    fn row_cap_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(dir.path(), CSV.as_bytes());
        assert_eq!(
            load_keys(&d, &KeySpec::new(["email"]), 7)
                .unwrap()
                .rows_read,
            7
        );
        let e = load_keys(&d, &KeySpec::new(["email"]), 6).unwrap_err();
        assert!(matches!(e, DatasetError::TooManyRows { max_rows: 6, .. }));
        let msg = e.to_string();
        assert!(
            msg.contains("more than 6 data rows") && msg.contains("data.csv"),
            "{msg}"
        );
    }

    #[test]
    fn long_short_separator_and_non_utf8_fields_reject_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let long = format!("{}@example.com", "a".repeat(MAX_FIELD_BYTES));
        let mut csv = format!("customer_id,email,phone\n1,{long},+14155550100\n2\n").into_bytes();
        csv.extend_from_slice(b"3,x\x1fy@example.com,+14155550100\n");
        csv.extend_from_slice(b"4,caf\xe9@example.com,+14155550100\n");
        csv.extend_from_slice(b"5,ok@example.com,+14155550100\n");
        let d = dataset(dir.path(), &csv);
        let loaded = load_keys(&d, &KeySpec::new(["email"]), 100).unwrap();
        assert_eq!((loaded.rows_read, loaded.rows_rejected), (5, 4));
        assert_eq!(items(&loaded.items), ["ok@example.com"]);
    }

    #[test]
    fn missing_column_lists_headers() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(dir.path(), b"id,mail\n1,a@b.c\n");
        let e = load_keys(&d, &KeySpec::new(["email"]), 100).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "dataset {} has no column 'email' (its columns: id, mail)",
                d.path.display()
            )
        );
        let d = dataset(dir.path(), b"email,email\na@b.c,a@b.c\n");
        let e = load_keys(&d, &KeySpec::new(["email"]), 100).unwrap_err();
        assert!(matches!(e, DatasetError::AmbiguousColumn { .. }));
        // Only the case differs: the message names the column meant.
        let d = dataset(dir.path(), b"Email,Phone\na@b.c,1\n");
        let e = load_keys(&d, &KeySpec::new(["email"]), 100).unwrap_err();
        assert!(e.to_string().ends_with("did you mean 'Email'?"), "{e}");
        // Excel's `sep=;` line read as the header: the message says to delete it.
        let d = dataset(dir.path(), b"sep=;\nemail;phone\na@b.c;1\n");
        let e = load_keys(&d, &KeySpec::new(["email"]), 100).unwrap_err();
        assert!(e.to_string().contains("Excel's `sep=` line"), "{e}");
        // An empty file has no header line.
        let d = dataset(dir.path(), b"");
        let e = load_keys(&d, &KeySpec::new(["email"]), 100).unwrap_err();
        assert!(
            e.to_string()
                .contains("no header line (is the file empty?)"),
            "{e}"
        );
        // A file saved as UTF-16 says so, and how to fix it.
        let mut utf16 = vec![0xFF, 0xFE];
        utf16.extend("email\na@b.c\n".encode_utf16().flat_map(u16::to_le_bytes));
        let d = dataset(dir.path(), &utf16);
        let e = load_keys(&d, &KeySpec::new(["email"]), 100).unwrap_err();
        assert!(e.to_string().contains("UTF-16 byte-order mark"), "{e}");
        assert!(e.to_string().contains("save it as CSV in UTF-8"), "{e}");
    }

    #[test]
    fn unknown_identifier_and_no_keys() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(dir.path(), CSV.as_bytes());
        let e = load_keys(&d, &KeySpec::new(["ssn"]), 100).unwrap_err();
        assert_eq!(
            e.to_string(),
            "dataset 'customers' declares no identifier 'ssn' (declared: email, phone, id)"
        );
        let e = load_keys(&d, &KeySpec::new(Vec::<String>::new()), 100).unwrap_err();
        assert!(matches!(e, DatasetError::NoKeys { .. }));
    }

    #[test]
    fn missing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = dataset(dir.path(), CSV.as_bytes());
        d.path = dir.path().join("absent.csv");
        let e = load_keys(&d, &KeySpec::new(["email"]), 100).unwrap_err();
        assert!(e.to_string().contains("absent.csv"), "{e}");
    }

    #[test]
    fn non_utf8_header_is_an_error_without_values() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(dir.path(), b"id,e\xffmail\n1,secret@example.com\n");
        let e = load_keys(&d, &KeySpec::new(["email"]), 100).unwrap_err();
        assert!(
            matches!(
                e,
                DatasetError::Source(SourceError::HeaderNotUtf8 { utf16: false, .. })
            ),
            "{e}"
        );
        assert!(e.to_string().contains("save the file in UTF-8"), "{e}");
        assert!(!e.to_string().contains("secret"));
    }

    #[test]
    fn empty_file_after_header_gives_empty_set() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(dir.path(), b"customer_id,email,phone\n");
        let loaded = load_keys(&d, &KeySpec::new(["email"]), 100).unwrap();
        assert_eq!((loaded.rows_read, loaded.items.len()), (0, 0));
    }

    #[test]
    fn rereading_gives_the_same_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(dir.path(), CSV.as_bytes());
        let keys = KeySpec::new(["phone", "id"]);
        let a = load_keys(&d, &keys, 100).unwrap();
        let b = load_keys(&d, &keys, 100).unwrap();
        assert_eq!(a.items, b.items);
        assert_eq!(a.items.len(), 6);
    }

    const CONSENT_CSV: &str = "\
customer_id,email,phone,consent_fraud
1,alice@example.com,+14155550100,true
2,bob@example.com,+14155550101,no
3,carol@example.com,+14155550102, YES
4,dave@example.com,+14155550103,
5,erin@example.com,+14155550104,1
6,not-an-email,+14155550105,true
7,frank@example.com,+14155550106,false
";

    #[test]
    fn consent_is_the_usual_ways_of_saying_yes_and_nothing_else() {
        for yes in [
            "true", "TRUE", " True ", "t", "T", "yes", "YES", "y", "Y", "1", "\t1",
        ] {
            assert!(is_consent(yes.as_bytes()), "{yes:?}");
        }
        for no in [
            "false", "f", "no", "n", "0", "", " ", "2", "yes!", "ja", "oui", "1.0", "-1", "on",
            "tru", "yess",
        ] {
            assert!(!is_consent(no.as_bytes()), "{no:?}");
        }
    }

    #[test]
    fn consent_excludes_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(dir.path(), CONSENT_CSV.as_bytes());
        let keys = KeySpec::new(["email"]);
        let filter = RowFilter {
            consent_column: Some("consent_fraud"),
            forgotten: None,
        };
        let loaded = load_keys_for(&d, &keys, filter, 100).unwrap();
        assert_eq!(loaded.rows_read, 7);
        assert_eq!(loaded.rows_excluded_consent, 3);
        assert_eq!(loaded.rows_rejected, 1);
        assert_eq!(
            items(&loaded.items),
            ["alice@example.com", "carol@example.com", "erin@example.com"]
        );
        let mut matched: ItemSet = [&b"bob@example.com"[..], b"carol@example.com"]
            .into_iter()
            .collect();
        matched.dedup();
        assert_eq!(matching_rows_for(&d, &keys, filter, &matched).unwrap(), [3]);
        assert_eq!(matching_rows(&d, &keys, &matched).unwrap(), [2, 3]);
        // Without a filter every row counts.
        let all = load_keys(&d, &keys, 100).unwrap();
        assert_eq!((all.rows_excluded_consent, all.items.len()), (0, 6));
        // A consent column missing from the file is an error naming it.
        let bad = RowFilter {
            consent_column: Some("consent_ads"),
            forgotten: None,
        };
        let e = load_keys_for(&d, &keys, bad, 100).unwrap_err();
        assert!(e.to_string().contains("no column 'consent_ads'"), "{e}");
    }

    #[test]
    fn deletion_excludes_by_any_identifier_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let d = dataset(dir.path(), CONSENT_CSV.as_bytes());
        let secret = [7u8; 32];
        let forgotten = Forgotten {
            secret,
            hashes: [
                forget_hash(&secret, b"bob@example.com"),
                // Forgotten by phone; the job joins on email.
                forget_hash(&secret, b"+14155550104"),
            ]
            .into_iter()
            .collect(),
        };
        let filter = RowFilter {
            consent_column: None,
            forgotten: Some(&forgotten),
        };
        let loaded = load_keys_for(&d, &KeySpec::new(["email"]), filter, 100).unwrap();
        assert_eq!(loaded.rows_excluded_deleted, 2);
        assert_eq!(loaded.rows_rejected, 1);
        assert_eq!(loaded.items.len(), 4);
        assert!(!items(&loaded.items).contains(&"erin@example.com".to_owned()));
        // Both filters: consent first.
        let both = RowFilter {
            consent_column: Some("consent_fraud"),
            forgotten: Some(&forgotten),
        };
        let loaded = load_keys_for(&d, &KeySpec::new(["email"]), both, 100).unwrap();
        assert_eq!(
            (loaded.rows_excluded_consent, loaded.rows_excluded_deleted),
            (3, 1)
        );
        // A different secret forgets nobody.
        let other = Forgotten {
            secret: [8u8; 32],
            hashes: forgotten.hashes.clone(),
        };
        let filter = RowFilter {
            consent_column: None,
            forgotten: Some(&other),
        };
        let loaded = load_keys_for(&d, &KeySpec::new(["email"]), filter, 100).unwrap();
        assert_eq!(loaded.rows_excluded_deleted, 0);
    }

    #[test]
    fn forget_hash_is_hmac_sha256() {
        // RFC 4231 test case 2 uses a 4-byte key; check against a zero-padded 32-byte key, for
        // which HMAC is identical.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let mac = forget_hash(&key, b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// A row with more or fewer fields than the header is rejected whole, never read by
    /// position: a shifted row would otherwise put a phone number where the email was.
    #[test]
    fn a_row_with_the_wrong_field_count_is_rejected_not_read_by_position() {
        let dir = tempfile::tempdir().unwrap();
        let csv = "customer_id,email,phone,amount_cents\n\
                   1,alice@example.com,+1 415 555 0100,10\n\
                   2,bob@example.com,extra,+1 415 555 0101,20\n\
                   3,carol@example.com\n\
                   4,dave@example.com,+1 415 555 0103,40\n";
        let d = dataset(dir.path(), csv.as_bytes());
        let loaded = load_keys(&d, &KeySpec::new(["email"]), 100).unwrap();
        assert_eq!(loaded.rows_read, 4);
        assert_eq!(
            items(&loaded.items),
            ["alice@example.com", "dave@example.com"]
        );
        assert_eq!(loaded.rows_rejected, 2);
        assert_eq!(loaded.rejections.by_reason["field count"], 2);
        let lines: Vec<u64> = loaded.rejections.first.iter().map(|r| r.line).collect();
        assert_eq!(lines, [3, 4]);
        assert!(
            loaded.rejections.first[0]
                .reason
                .contains("5 fields where the header has 4"),
            "{:?}",
            loaded.rejections.first
        );
    }

    /// An unterminated quote swallows the rows after it into one field; the line it starts is
    /// rejected (by its field count, or by the line break in a column the job reads when the
    /// count happens to match), counted and located, and the lines it swallowed are read again
    /// (one where the quote closes holds a `"`, and is rejected for it). A line break in a
    /// column the job does not read is legal CSV: the row is kept, and counted.
    #[test]
    fn an_unterminated_quote_is_a_rejected_row_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        // Line 3's email opens a quote that closes on line 4: one record of the right width
        // whose email holds a line break.
        let csv = "customer_id,email,phone,amount_cents\n\
                   1,alice@example.com,+1 415 555 0100,10\n\
                   2,\"bob@example.com,+1 415 555 0101,20\n\
                   3,carol@example.com\",+1 415 555 0102,30\n\
                   5,erin@example.com,+1 415 555 0104,50\n";
        let d = dataset(dir.path(), csv.as_bytes());
        let loaded = load_keys(&d, &KeySpec::new(["email"]), 100).unwrap();
        assert_eq!(
            items(&loaded.items),
            ["alice@example.com", "erin@example.com"]
        );
        assert_eq!(loaded.rejections.by_reason["line break in a field"], 1);
        let first = &loaded.rejections.first[0];
        assert_eq!((first.line, first.column.as_deref()), (3, Some("email")));
        // Keyed on phone, the email is not read: the row is kept, its line break counted.
        let by_phone = load_keys(&d, &KeySpec::new(["phone"]), 100).unwrap();
        assert_eq!((by_phone.rows_rejected, by_phone.items.len()), (0, 3));
        assert_eq!(by_phone.rejections.multi_line_rows, 1);

        // The quote never closes: read as one record to the end of the file, it is a field
        // short. Only its first line is rejected; carol's line, which it swallowed, is read.
        let csv = "customer_id,email,phone,amount_cents\n\
                   1,alice@example.com,+1 415 555 0100,10\n\
                   2,\"bob@example.com,+1 415 555 0101,20\n\
                   3,carol@example.com,+1 415 555 0102,30\n";
        let d = dataset(dir.path(), csv.as_bytes());
        let loaded = load_keys(&d, &KeySpec::new(["email"]), 100).unwrap();
        assert_eq!(
            items(&loaded.items),
            ["alice@example.com", "carol@example.com"]
        );
        assert_eq!(loaded.rejections.by_reason["field count"], 1);
        assert_eq!(loaded.rejections.first[0].line, 3);
        assert_eq!(loaded.rows_read, 3);
    }

    /// Column readers (aggregate) get the same strictness: a malformed row is never passed on.
    #[test]
    fn column_readers_never_see_a_malformed_row() {
        let dir = tempfile::tempdir().unwrap();
        let csv = "customer_id,email,phone,amount_cents\n\
                   1,alice@example.com,+1 415 555 0100,10\n\
                   2,bob@example.com,+1 415 555 0101\n\
                   3,carol@example.com,+1 415 555 0102,30,99\n";
        let d = dataset(dir.path(), csv.as_bytes());
        let mut seen = Vec::new();
        let counts = for_each_row_for(
            &d,
            &["amount_cents"],
            RowFilter::default(),
            100,
            |row, f| {
                seen.push((row, f[0].map(<[u8]>::to_vec)));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, [(1, Some(b"10".to_vec()))]);
        assert_eq!((counts.rows_read, counts.rejections.total()), (3, 2));
    }

    /// Empty identifiers are rejected and counted under their own reason, and no reason or
    /// location carries a value.
    #[test]
    fn reasons_name_no_value() {
        let dir = tempfile::tempdir().unwrap();
        let csv = "customer_id,email,phone,amount_cents\n\
                   1,,+1 415 555 0100,10\n\
                   2,zed-at-example.com,+1 415 555 0101,20\n\
                   3,\"zoe@example.com\n\",+1 415 555 0102,30\n";
        let d = dataset(dir.path(), csv.as_bytes());
        let loaded = load_keys(&d, &KeySpec::new(["email"]), 100).unwrap();
        // zoe's record spans two lines: its first is rejected (line break), and its second,
        // read again on its own, opens a quote that never closes (field count).
        assert_eq!(loaded.rows_rejected, 4);
        assert_eq!(
            loaded.rejections.by_reason.len(),
            4,
            "{:?}",
            loaded.rejections
        );
        let text = serde_json::to_string(&loaded.rejections).unwrap();
        for value in ["zed", "zoe", "example.com"] {
            assert!(!text.contains(value), "{text}");
        }
    }
}
