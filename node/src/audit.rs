//! The node's tamper-evident audit log (DESIGN §6).
//!
//! One JSON object per line in `<state_dir>/audit.log`, each entry chained to the previous one:
//!
//! ```text
//! hash_n = SHA-256("cleanroom/1 audit entry" || prev || seq (u64 BE) || at_ms (i64 BE) || event JSON)
//! prev_1 = SHA-256("cleanroom/1 audit genesis")
//! ```
//!
//! where `event JSON` is the compact serde_json encoding of the [`AuditEvent`] exactly as it
//! appears in the line. A line must also be byte-for-byte the canonical encoding of its entry, so
//! any changed byte is either unparsable, non-canonical, or changes a hash.
//!
//! [`AuditLog::append`] writes one line and `fsync`s it before returning; only then may the
//! caller act (an error means: refuse the job). After each append the head (`seq:hash`) is
//! written atomically (temp file + rename) to `<log>.head`, so [`verify`] can see a truncated
//! tail without outside help. **Limit:** someone able to rewrite both the log and the head file
//! can cut the tail undetected locally; that is caught only by comparing with the heads the
//! coordinator keeps with each job result (pass one as `expected_head` to [`verify`]).
//!
//! The log records names (datasets, columns, partners, purposes), counts, decisions, reasons
//! and ε — never identifier values.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::NodeConfig;

const ENTRY_DOMAIN: &[u8] = b"cleanroom/1 audit entry";
const GENESIS_DOMAIN: &[u8] = b"cleanroom/1 audit genesis";

/// Where the node keeps its audit log: `<state_dir>/audit.log`.
pub fn audit_path(cfg: &NodeConfig) -> PathBuf {
    cfg.state_dir.join("audit.log")
}

/// The head file kept next to a log: `<log>.head`.
pub fn head_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".head");
    PathBuf::from(name)
}

/// What per-person clipping did with one party's rows (audited with its Access).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonCounts {
    /// Distinct persons counted.
    pub persons: u64,
    /// Rows of a person outside the group of its first row (left out).
    pub rows_outside_group: u64,
}

/// One audited event. Serialized tagged by `"kind"`; unknown fields are refused when reading.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum AuditEvent {
    /// The node loaded its config / policy.
    PolicyLoaded {
        /// Hex SHA-256 of the config file.
        digest: String,
        /// The partners the node has agreements with.
        agreements: Vec<String>,
    },
    /// An offer was accepted or vetoed.
    Decision {
        /// The job.
        job_id: String,
        /// The partner the job is with.
        partner: String,
        /// The declared purpose.
        purpose: String,
        /// The computation (e.g. `overlap`, `match`).
        computation: String,
        /// The local dataset named by the offer.
        dataset: String,
        /// The join keys (column names).
        keys: Vec<String>,
        /// Accepted (true) or vetoed (false).
        accepted: bool,
        /// Why (the veto reason, or the agreement clause that allowed it).
        reason: String,
    },
    /// Data was read for a job.
    Access {
        /// The job.
        job_id: String,
        /// The dataset read.
        dataset: String,
        /// The columns read.
        columns: Vec<String>,
        /// Rows read from the source.
        rows_read: u64,
        /// Rows rejected: an identifier that does not normalise, or (aggregate, overlap-sum) a
        /// value or group that is not an integer. Kept here, in the node's own log: the
        /// coordinator is not told.
        rows_rejected: u64,
        /// Rows excluded because consent for the purpose is missing.
        rows_excluded_consent: u64,
        /// Rows excluded because the subject asked to be forgotten.
        rows_excluded_deleted: u64,
        /// Aggregate: rows counted in "(other)" (an unlisted label or an integer out of range).
        /// A party's own figure, kept here and never reported (absent in older entries and for
        /// other job kinds).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rows_other: Option<u64>,
        /// Aggregate with per-person clipping: the persons counted, and the rows left out
        /// because they lie outside the group of their person's first row.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        persons: Option<PersonCounts>,
    },
    /// Something was released.
    Release {
        /// The job.
        job_id: String,
        /// The partner the job is with.
        partner: String,
        /// What was released, e.g. "intersection count".
        what: String,
        /// To whom, e.g. `["coordinator", "globex"]`.
        to: Vec<String>,
        /// The released number, if it is one (counts only; never identifiers).
        value: Option<u64>,
        /// The ε spent by this release (0 for exact releases). For an aggregate, the zCDP ε of
        /// the agreements; what it charged is `rho`.
        epsilon: f64,
        /// The zCDP ρ this release charged (an aggregate's discrete Gaussian); absent for pure-ε
        /// and exact releases (and in older entries).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rho: Option<f64>,
    },
    /// A job failed.
    JobError {
        /// The job.
        job_id: String,
        /// The partner the job is with.
        partner: String,
        /// Why.
        reason: String,
    },
    /// A subject was forgotten (deletion request).
    Forget {
        /// The dataset.
        dataset: String,
        /// A hash of the key (never the key).
        key_hash: String,
    },
}

impl AuditEvent {
    /// The kind tag, as written in the log.
    pub fn kind(&self) -> &'static str {
        match self {
            AuditEvent::PolicyLoaded { .. } => "PolicyLoaded",
            AuditEvent::Decision { .. } => "Decision",
            AuditEvent::Access { .. } => "Access",
            AuditEvent::Release { .. } => "Release",
            AuditEvent::JobError { .. } => "JobError",
            AuditEvent::Forget { .. } => "Forget",
        }
    }

    /// The job this event belongs to, if any.
    pub fn job_id(&self) -> Option<&str> {
        match self {
            AuditEvent::Decision { job_id, .. }
            | AuditEvent::Access { job_id, .. }
            | AuditEvent::Release { job_id, .. }
            | AuditEvent::JobError { job_id, .. } => Some(job_id),
            AuditEvent::PolicyLoaded { .. } | AuditEvent::Forget { .. } => None,
        }
    }

    /// A one-line human summary (no job id, no time).
    pub fn summary(&self) -> String {
        match self {
            AuditEvent::PolicyLoaded { digest, agreements } => format!(
                "config sha256 {}…, agreements with [{}]",
                digest.get(..16).unwrap_or(digest),
                agreements.join(", ")
            ),
            AuditEvent::Decision {
                partner,
                purpose,
                computation,
                dataset,
                keys,
                accepted,
                reason,
                ..
            } => format!(
                "{} {computation} with {partner} for '{purpose}' on {dataset} by [{}]: {reason}",
                if *accepted { "ACCEPTED" } else { "VETOED" },
                keys.join(", ")
            ),
            AuditEvent::Access {
                dataset,
                columns,
                rows_read,
                rows_rejected,
                rows_excluded_consent,
                rows_excluded_deleted,
                rows_other,
                persons,
                ..
            } => format!(
                "read {dataset} [{}]: {rows_read} rows, {rows_rejected} rejected, \
                 {rows_excluded_consent} excluded (consent), {rows_excluded_deleted} excluded (deleted){}{}",
                columns.join(", "),
                rows_other
                    .map(|n| format!(", {n} in (other)"))
                    .unwrap_or_default(),
                persons
                    .map(|p| format!(
                        ", {} persons ({} rows outside their person's group left out)",
                        p.persons, p.rows_outside_group
                    ))
                    .unwrap_or_default()
            ),
            AuditEvent::Release {
                partner,
                what,
                to,
                value,
                epsilon,
                rho,
                ..
            } => format!(
                "released {what}{} to [{}] (job with {partner}), ε = {epsilon}{}",
                value.map(|v| format!(" = {v}")).unwrap_or_default(),
                to.join(", "),
                rho.map(|r| format!(" (zCDP, ρ = {r})")).unwrap_or_default()
            ),
            AuditEvent::JobError {
                partner, reason, ..
            } => format!("job with {partner} failed: {reason}"),
            AuditEvent::Forget { dataset, key_hash } => format!(
                "forgot a subject of {dataset} (key hash {}…)",
                key_hash.get(..16).unwrap_or(key_hash)
            ),
        }
    }

    fn validate(&self) -> Result<(), AuditError> {
        if let AuditEvent::Release { epsilon, rho, .. } = self {
            if !epsilon.is_finite() || *epsilon < 0.0 {
                return Err(AuditError::Invalid(format!(
                    "a release's ε must be finite and non-negative, not {epsilon}"
                )));
            }
            if let Some(r) = rho.filter(|r| !r.is_finite() || *r < 0.0) {
                return Err(AuditError::Invalid(format!(
                    "a release's ρ must be finite and non-negative, not {r}"
                )));
            }
        }
        Ok(())
    }
}

/// One entry of the log.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEntry {
    /// 1 for the first entry.
    pub seq: u64,
    /// When (Unix milliseconds), as given by the caller.
    pub at_ms: i64,
    /// The previous entry's hash (the genesis hash for seq 1).
    pub prev: [u8; 32],
    /// What happened.
    pub event: AuditEvent,
    /// This entry's hash.
    pub hash: [u8; 32],
}

impl AuditEntry {
    /// The hash this entry should carry, computed from its content.
    pub fn compute_hash(&self) -> [u8; 32] {
        entry_hash(&self.prev, self.seq, self.at_ms, &self.event)
    }

    /// The entry as its canonical log line (without the newline).
    pub fn to_json_line(&self) -> String {
        let mut line = encode_line(self);
        line.pop();
        String::from_utf8(line).unwrap_or_default()
    }
}

/// The line format (hashes as lowercase hex).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    seq: u64,
    at_ms: i64,
    prev: String,
    event: AuditEvent,
    hash: String,
}

fn entry_hash(prev: &[u8; 32], seq: u64, at_ms: i64, event: &AuditEvent) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(ENTRY_DOMAIN);
    h.update(prev);
    h.update(seq.to_be_bytes());
    h.update(at_ms.to_be_bytes());
    // Serializing plain data to a Vec cannot fail (no maps with non-string keys, ε is finite).
    h.update(serde_json::to_vec(event).unwrap_or_default());
    h.finalize().into()
}

fn genesis_hash() -> [u8; 32] {
    Sha256::digest(GENESIS_DOMAIN).into()
}

/// Lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// Parses exactly 64 lowercase hex digits (the inverse of [`to_hex`] for 32 bytes).
pub fn hash_from_hex(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (nibble(s[2 * i])? << 4) | nibble(s[2 * i + 1])?;
    }
    Some(out)
}

fn encode_line(entry: &AuditEntry) -> Vec<u8> {
    let line = Line {
        seq: entry.seq,
        at_ms: entry.at_ms,
        prev: to_hex(&entry.prev),
        event: entry.event.clone(),
        hash: to_hex(&entry.hash),
    };
    let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// Parses one line (without its newline); `None` if it is not exactly a canonical entry.
fn decode_line(bytes: &[u8]) -> Option<AuditEntry> {
    let line: Line = serde_json::from_slice(bytes).ok()?;
    let entry = AuditEntry {
        seq: line.seq,
        at_ms: line.at_ms,
        prev: hash_from_hex(&line.prev)?,
        event: line.event,
        hash: hash_from_hex(&line.hash)?,
    };
    let canonical = encode_line(&entry);
    (canonical[..canonical.len() - 1] == *bytes).then_some(entry)
}

/// The head of a log: how many entries it has and the last entry's hash. Displayed and parsed
/// as `SEQ:HEX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditHead {
    /// Entries so far (= the last entry's seq).
    pub seq: u64,
    /// The last entry's hash, or the genesis hash for an empty log.
    pub hash: [u8; 32],
}

impl AuditHead {
    /// The head of an empty log.
    pub fn genesis() -> AuditHead {
        AuditHead {
            seq: 0,
            hash: genesis_hash(),
        }
    }
}

impl fmt::Display for AuditHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seq, to_hex(&self.hash))
    }
}

impl FromStr for AuditHead {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("'{s}' is not an audit head; expected SEQ:HEX (64 lowercase hex digits)");
        let (seq, hash) = s.trim().split_once(':').ok_or_else(bad)?;
        Ok(AuditHead {
            seq: seq.parse().map_err(|_| bad())?,
            hash: hash_from_hex(hash).ok_or_else(bad)?,
        })
    }
}

/// Where an expected head came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadSource {
    /// The `<log>.head` file next to the log.
    HeadFile,
    /// A head given by the caller (e.g. from the coordinator's job results).
    Expected,
}

impl fmt::Display for HeadSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HeadSource::HeadFile => "the head file",
            HeadSource::Expected => "the expected head",
        })
    }
}

/// One problem found by [`verify`]. Lines are numbered from 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tamper {
    /// The line is not a well-formed, canonical entry (a changed byte, most likely).
    Corrupted {
        /// The line.
        line: u64,
    },
    /// The last line has no final newline: truncated mid-line, or its newline was changed.
    Incomplete {
        /// The line.
        line: u64,
    },
    /// The entry's stored hash does not match its content (a changed byte).
    BadHash {
        /// The line.
        line: u64,
        /// The seq the entry claims.
        seq: u64,
    },
    /// Entries are missing before this line (deleted).
    Gap {
        /// The line.
        line: u64,
        /// The seq that should have come next.
        expected_seq: u64,
        /// The seq found.
        found_seq: u64,
    },
    /// The entry is not where its seq says it belongs (entries reordered).
    OutOfOrder {
        /// The line.
        line: u64,
        /// The seq found.
        seq: u64,
        /// The seq that should have come next.
        expected_seq: u64,
    },
    /// A second entry with a seq already seen (inserted or replayed).
    Duplicate {
        /// The line.
        line: u64,
        /// The repeated seq.
        seq: u64,
    },
    /// The entry does not link to the entry before it (inserted or replaced).
    BrokenLink {
        /// The line.
        line: u64,
        /// The seq the entry claims.
        seq: u64,
    },
    /// The log has fewer entries than a head it once had (tail cut off).
    Truncated {
        /// Entries found.
        entries: u64,
        /// Entries the head says there were at least.
        expected_at_least: u64,
        /// Which head.
        source: HeadSource,
    },
    /// The entry at a head's seq has another hash (history rewritten).
    HeadMismatch {
        /// The head's seq.
        seq: u64,
        /// The hash the head has.
        expected: String,
        /// The hash the log has at that seq (`None`: that entry is unreadable).
        found: Option<String>,
        /// Which head.
        source: HeadSource,
    },
    /// The head file is missing or unreadable while the log has entries.
    HeadFile {
        /// What is wrong with it.
        problem: String,
    },
}

impl fmt::Display for Tamper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tamper::Corrupted { line } => write!(
                f,
                "line {line}: not a valid entry (a changed or corrupted byte)"
            ),
            Tamper::Incomplete { line } => write!(
                f,
                "line {line}: incomplete last line (truncated mid-line, or its newline changed)"
            ),
            Tamper::BadHash { line, seq } => write!(
                f,
                "line {line} (seq {seq}): the hash does not match the content (a changed byte)"
            ),
            Tamper::Gap {
                line,
                expected_seq,
                found_seq,
            } => write!(
                f,
                "line {line}: found seq {found_seq} where seq {expected_seq} should be: \
                 entries {expected_seq}..={} deleted",
                found_seq - 1
            ),
            Tamper::OutOfOrder {
                line,
                seq,
                expected_seq,
            } => write!(
                f,
                "line {line}: seq {seq} out of order (expected seq {expected_seq}): entries reordered"
            ),
            Tamper::Duplicate { line, seq } => write!(
                f,
                "line {line}: seq {seq} appears again (an inserted or replayed entry)"
            ),
            Tamper::BrokenLink { line, seq } => write!(
                f,
                "line {line} (seq {seq}): does not link to the previous entry (an inserted or replaced entry)"
            ),
            Tamper::Truncated {
                entries,
                expected_at_least,
                source,
            } => write!(
                f,
                "truncated: the log has {entries} entries but {source} says at least {expected_at_least}"
            ),
            Tamper::HeadMismatch {
                seq,
                expected,
                found,
                source,
            } => match found {
                Some(found) => write!(
                    f,
                    "seq {seq}: hash {found} but {source} says {expected} (history rewritten)"
                ),
                None => write!(
                    f,
                    "seq {seq}: {source} says {expected}, but that entry is unreadable"
                ),
            },
            Tamper::HeadFile { problem } => write!(f, "head file: {problem}"),
        }
    }
}

/// What [`verify`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifyReport {
    /// Complete lines in the log.
    pub entries: u64,
    /// The head of the log as found: the last readable entry's seq and (recomputed) hash.
    pub head: AuditHead,
    /// Every problem, in file order (then head checks); empty means the log is intact.
    pub problems: Vec<Tamper>,
}

impl VerifyReport {
    /// True when no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Why the audit log could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// An I/O failure (the caller must refuse the job).
    #[error("audit log {}: {what}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The log failed verification.
    #[error(
        "audit log {} is broken ({} problem(s), first: {}); run `cleanroom-node audit verify --config …` for details",
        path.display(),
        problems.len(),
        problems.first().map(|p| p.to_string()).unwrap_or_default()
    )]
    Broken {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problems: Vec<Tamper>,
    },
    /// The event cannot be recorded as given.
    #[error("audit event: {0}")]
    Invalid(String),
    /// The log changed under the running node in a way its own appends and `forget` cannot
    /// explain (its last entry or head file no longer match, or it was replaced); the log takes
    /// no more entries until the node is restarted on a log that verifies.
    #[error(
        "audit log {} does not verify: {reason}; run `cleanroom-node audit verify --config …`",
        path.display()
    )]
    Tampered {
        /// The file.
        path: PathBuf,
        /// What no longer matches.
        reason: String,
    },
    /// An earlier write failed and could not be undone; the log takes no more entries.
    #[error("audit log {} unusable after an earlier failed write: {reason}", path.display())]
    Poisoned {
        /// The file.
        path: PathBuf,
        /// What happened.
        reason: String,
    },
}

fn io_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> AuditError + 'a {
    move |source| AuditError::Io {
        path: path.to_owned(),
        what,
        source,
    }
}

/// The last complete line of the first `len` bytes of the file (without its newline), reading
/// only the end of the file. `None` for an empty log.
fn last_line(path: &Path, len: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::{Read, Seek, SeekFrom};
    if len == 0 {
        return Ok(None);
    }
    let mut file = File::open(path)?;
    let mut chunk = 4096u64;
    loop {
        let start = len.saturating_sub(chunk);
        let mut buf = Vec::with_capacity((len - start) as usize);
        file.seek(SeekFrom::Start(start))?;
        Read::by_ref(&mut file)
            .take(len - start)
            .read_to_end(&mut buf)?;
        // The byte before `len` is the last entry's newline.
        let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
        match body.iter().rposition(|b| *b == b'\n') {
            Some(p) => return Ok(Some(body[p + 1..].to_vec())),
            None if start == 0 => return Ok(Some(body.to_vec())),
            None => chunk *= 4,
        }
    }
}

/// Splits the file into complete lines (without newline) and an optional incomplete tail.
fn split_lines(bytes: &[u8]) -> (Vec<&[u8]>, Option<&[u8]>) {
    let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    // `split` yields a final empty piece after a trailing newline (or for an empty file).
    let tail = lines.pop().filter(|t| !t.is_empty());
    (lines, tail)
}

/// Reads every entry of a log; fails on the first line that is not a valid entry (use
/// [`verify`] to check the chain).
pub fn read_entries(path: &Path) -> Result<Vec<AuditEntry>, AuditError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path, "reading")(e)),
    };
    let (lines, tail) = split_lines(&bytes);
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        let entry = decode_line(l).ok_or_else(|| AuditError::Broken {
            path: path.to_owned(),
            problems: vec![Tamper::Corrupted { line: i as u64 + 1 }],
        })?;
        out.push(entry);
    }
    if tail.is_some() {
        return Err(AuditError::Broken {
            path: path.to_owned(),
            problems: vec![Tamper::Incomplete {
                line: lines.len() as u64 + 1,
            }],
        });
    }
    Ok(out)
}

fn read_head_file(path: &Path) -> Result<Option<AuditHead>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.parse().map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Reads and checks the log at `path` (a missing log is an empty one): every line must be a
/// canonical entry whose hash matches its content, seqs must run 1, 2, 3… and each entry must
/// link to the one before. The log is then compared with its head file and with
/// `expected_head` (e.g. a head kept by the coordinator with a job result): a log with fewer
/// entries than a head is truncated; a different hash at a head's seq means rewritten history.
/// A head file one or more entries *behind* the log is fine (a crash between the log's fsync
/// and the head's rename).
pub fn verify(path: &Path, expected_head: Option<&AuditHead>) -> Result<VerifyReport, AuditError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(path, "reading")(e)),
    };
    let (lines, tail) = split_lines(&bytes);
    let mut problems = Vec::new();

    // Pass 1: parse, and check each entry's own hash. `good` entries are usable for linking.
    let parsed: Vec<Option<AuditEntry>> = lines.iter().map(|l| decode_line(l)).collect();
    let mut good: Vec<Option<(&AuditEntry, [u8; 32])>> = Vec::with_capacity(parsed.len());
    for (i, p) in parsed.iter().enumerate() {
        let line = i as u64 + 1;
        match p {
            None => {
                problems.push(Tamper::Corrupted { line });
                good.push(None);
            }
            Some(e) => {
                let h = e.compute_hash();
                if h != e.hash {
                    problems.push(Tamper::BadHash { line, seq: e.seq });
                    good.push(None);
                } else {
                    good.push(Some((e, h)));
                }
            }
        }
    }
    if tail.is_some() {
        problems.push(Tamper::Incomplete {
            line: lines.len() as u64 + 1,
        });
    }

    // Hashes by seq (every good occurrence), and where each seq occurs.
    let mut by_seq: HashMap<u64, Vec<[u8; 32]>> = HashMap::new();
    let mut lines_of: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, g) in good.iter().enumerate() {
        if let Some((e, h)) = g {
            by_seq.entry(e.seq).or_default().push(*h);
            lines_of.entry(e.seq).or_default().push(i);
        }
    }
    let genesis = genesis_hash();

    // Pass 2: order, duplicates and links, in file order. After an unreadable line the
    // expected seq resynchronises on the next good entry (a changed newline can merge or split
    // lines, so an unreadable line may stand for zero, one or two entries).
    let mut expected: u64 = 1;
    let mut resync = false;
    let mut seen: HashSet<u64> = HashSet::new();
    let mut flagged: HashSet<usize> = HashSet::new();
    let mut ordered: Vec<Tamper> = Vec::new();
    for (i, g) in good.iter().enumerate() {
        let line = i as u64 + 1;
        let Some((e, _)) = g else {
            resync = true;
            continue;
        };
        let s = e.seq;
        // Link: prev must be the hash of (some good occurrence of) seq - 1.
        let linked = if s == 0 {
            false
        } else if s == 1 {
            e.prev == genesis
        } else {
            match by_seq.get(&(s - 1)) {
                Some(hs) => hs.contains(&e.prev),
                None => true, // that entry is missing or unreadable: reported elsewhere
            }
        };
        if !linked {
            ordered.push(Tamper::BrokenLink { line, seq: s });
            flagged.insert(i);
        }
        if seen.contains(&s) {
            // Report the repeat unless the earlier occurrence was already shown to be forged.
            let earlier_ok = lines_of
                .get(&s)
                .is_some_and(|ls| ls.iter().any(|&j| j < i && !flagged.contains(&j)));
            if earlier_ok && linked {
                ordered.push(Tamper::Duplicate { line, seq: s });
            }
            continue;
        }
        seen.insert(s);
        if resync {
            resync = false;
            if s >= expected {
                expected = s + 1;
                continue;
            }
        }
        if s == expected {
            expected = s + 1;
        } else if s > expected {
            let missing_later =
                (expected..s).any(|m| lines_of.get(&m).is_some_and(|ls| ls.iter().any(|&j| j > i)));
            if missing_later {
                ordered.push(Tamper::OutOfOrder {
                    line,
                    seq: s,
                    expected_seq: expected,
                });
            } else {
                ordered.push(Tamper::Gap {
                    line,
                    expected_seq: expected,
                    found_seq: s,
                });
            }
            expected = s + 1;
        } else {
            ordered.push(Tamper::OutOfOrder {
                line,
                seq: s,
                expected_seq: expected,
            });
        }
    }
    problems.extend(ordered);
    problems.sort_by_key(problem_line);

    // The head as found: the last readable entry in the file.
    let head = parsed
        .iter()
        .rev()
        .flatten()
        .next()
        .map(|e| AuditHead {
            seq: e.seq,
            hash: e.compute_hash(),
        })
        .unwrap_or_else(AuditHead::genesis);
    let entries = lines.len() as u64;

    // Heads: the head file, then the caller's.
    let check_head = |h: &AuditHead, source: HeadSource, problems: &mut Vec<Tamper>| {
        if h.seq == 0 {
            if h.hash != genesis {
                problems.push(Tamper::HeadMismatch {
                    seq: 0,
                    expected: to_hex(&h.hash),
                    found: Some(to_hex(&genesis)),
                    source,
                });
            }
            return;
        }
        let max_seq = by_seq.keys().copied().max().unwrap_or(0).max(entries);
        if h.seq > max_seq {
            problems.push(Tamper::Truncated {
                entries,
                expected_at_least: h.seq,
                source,
            });
            return;
        }
        match by_seq.get(&h.seq) {
            Some(hs) if hs.contains(&h.hash) => {}
            Some(hs) => problems.push(Tamper::HeadMismatch {
                seq: h.seq,
                expected: to_hex(&h.hash),
                found: hs.first().map(|x| to_hex(x)),
                source,
            }),
            None => problems.push(Tamper::HeadMismatch {
                seq: h.seq,
                expected: to_hex(&h.hash),
                found: None,
                source,
            }),
        }
    };
    match read_head_file(&head_path(path)) {
        Ok(Some(h)) => check_head(&h, HeadSource::HeadFile, &mut problems),
        Ok(None) if entries > 0 || tail.is_some() => problems.push(Tamper::HeadFile {
            problem: format!("{} is missing", head_path(path).display()),
        }),
        Ok(None) => {}
        Err(problem) => problems.push(Tamper::HeadFile { problem }),
    }
    if let Some(h) = expected_head {
        check_head(h, HeadSource::Expected, &mut problems);
    }

    Ok(VerifyReport {
        entries,
        head,
        problems,
    })
}

/// One line of the log as `audit show` lists it, with what [`verify`] says about it.
#[derive(Debug, Clone)]
pub struct ShownLine {
    /// The line (from 1).
    pub line: u64,
    /// The entry, if the line is one.
    pub entry: Option<AuditEntry>,
    /// Whether the entry can be trusted: [`LineCheck::Ok`] for every entry before the first
    /// problem; an entry after it is [`LineCheck::Unverified`] (its chain passes through a
    /// bad entry).
    pub check: LineCheck,
}

/// What [`verify`] says about one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineCheck {
    /// In a chain that verifies up to here.
    Ok,
    /// The line itself is bad (the problem, as `audit verify` words it).
    Bad(String),
    /// Follows a bad line: it cannot be verified.
    Unverified,
}

/// Every line of the log with its check, and the problems that belong to no line (a cut log, a
/// head file that disagrees), for `audit show`.
pub fn show_lines(path: &Path) -> Result<(Vec<ShownLine>, Vec<Tamper>), AuditError> {
    let report = verify(path, None)?;
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_err(path, "reading")(e)),
    };
    let (lines, tail) = split_lines(&bytes);
    let mut by_line: BTreeMap<u64, String> = BTreeMap::new();
    let mut other = Vec::new();
    for p in &report.problems {
        match problem_line(p) {
            u64::MAX => other.push(p.clone()),
            line => {
                by_line.entry(line).or_insert_with(|| p.to_string());
            }
        }
    }
    let first_bad = by_line.keys().next().copied().unwrap_or(u64::MAX);
    let mut out = Vec::with_capacity(lines.len() + 1);
    for (i, l) in lines.iter().chain(tail.as_slice()).enumerate() {
        let line = i as u64 + 1;
        let check = match by_line.get(&line) {
            Some(problem) => LineCheck::Bad(problem.clone()),
            None if line > first_bad => LineCheck::Unverified,
            None => LineCheck::Ok,
        };
        out.push(ShownLine {
            line,
            entry: decode_line(l),
            check,
        });
    }
    Ok((out, other))
}

fn problem_line(t: &Tamper) -> u64 {
    match t {
        Tamper::Corrupted { line }
        | Tamper::Incomplete { line }
        | Tamper::BadHash { line, .. }
        | Tamper::Gap { line, .. }
        | Tamper::OutOfOrder { line, .. }
        | Tamper::Duplicate { line, .. }
        | Tamper::BrokenLink { line, .. } => *line,
        _ => u64::MAX,
    }
}

#[derive(Debug)]
struct Inner {
    file: File,
    head: AuditHead,
    /// Length of the file after the last complete entry.
    len: u64,
    poisoned: Option<String>,
    /// The file as it was after our last append (or open): if it is still so at the next
    /// append, nobody else wrote to it.
    stamp: Option<FileStamp>,
    /// Set once the log failed its tail check: every later append fails with it.
    tampered: Option<String>,
    /// Our last head-file write failed: the head file may lag by our last entry.
    head_stale: bool,
}

/// What identifies a file's content cheaply: any write changes the change time (which no
/// user-level call can set back), a replacement changes the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    #[cfg(unix)]
    dev: u64,
    #[cfg(unix)]
    ino: u64,
    #[cfg(unix)]
    ctime: (i64, i64),
    #[cfg(not(unix))]
    modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    fn of(m: &std::fs::Metadata) -> FileStamp {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            FileStamp {
                len: m.len(),
                dev: m.dev(),
                ino: m.ino(),
                ctime: (m.ctime(), m.ctime_nsec()),
            }
        }
        #[cfg(not(unix))]
        FileStamp {
            len: m.len(),
            modified: m.modified().ok(),
        }
    }

    /// Whether `other` is the same file (not another one put in its place).
    fn same_file(&self, other: &FileStamp) -> bool {
        #[cfg(unix)]
        {
            self.dev == other.dev && self.ino == other.ino
        }
        #[cfg(not(unix))]
        {
            let _ = other;
            true
        }
    }
}

/// The open, append-only audit log. `Send + Sync`; share it with `Arc`.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    head_path: PathBuf,
    inner: Mutex<Inner>,
}

impl AuditLog {
    /// Opens (or creates, with its directory) the log at `path` and verifies the whole chain
    /// against its head file. A broken log is an error: the node must not start (run
    /// `cleanroom-node audit verify`). The one thing repaired is a torn last line left by a
    /// crash during an append (that append never returned, so nothing relied on it) — and only
    /// when the log is otherwise intact and agrees with its head file.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err(path, "creating the directory"))?;
        }
        let head_path = head_path(path);
        let exists = path.exists();
        if !exists {
            write_head(&head_path, &AuditHead::genesis())?;
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(io_err(path, "opening"))?;
        if !exists {
            sync_dir(path);
        }
        // Another process may be appending (a running node while `forget` opens the log):
        // verify and repair under the same lock `append` takes.
        file.lock().map_err(io_err(path, "locking the log"))?;
        // On error the file is dropped, which releases the lock.
        Self::open_locked(path, head_path, file)
    }

    fn open_locked(path: &Path, head_path: PathBuf, file: File) -> Result<AuditLog, AuditError> {
        let report = verify(path, None)?;
        let mut len = file
            .metadata()
            .map_err(io_err(path, "reading metadata"))?
            .len();
        if !report.is_ok() {
            let torn_only = matches!(report.problems.as_slice(), [Tamper::Incomplete { .. }]);
            if !torn_only {
                return Err(AuditError::Broken {
                    path: path.to_owned(),
                    problems: report.problems,
                });
            }
            let bytes = std::fs::read(path).map_err(io_err(path, "reading"))?;
            let keep = bytes
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |p| p as u64 + 1);
            tracing::warn!(
                log = %path.display(),
                bytes = len - keep,
                "removing a torn last line left by an interrupted audit write"
            );
            file.set_len(keep)
                .and_then(|()| file.sync_data())
                .map_err(io_err(path, "removing a torn last line"))?;
            len = keep;
        }
        let log = AuditLog {
            path: path.to_owned(),
            head_path,
            inner: Mutex::new(Inner {
                stamp: file.metadata().ok().map(|m| FileStamp::of(&m)),
                file,
                head: report.head.clone(),
                len,
                poisoned: None,
                tampered: None,
                head_stale: false,
            }),
        };
        // Bring a lagging head file up to date.
        if read_head_file(&log.head_path).ok().flatten().as_ref() != Some(&report.head) {
            write_head(&log.head_path, &report.head)?;
        }
        if let Ok(inner) = log.inner.lock() {
            let _ = inner.file.unlock();
        }
        Ok(log)
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event at `now_ms`: writes the line and fsyncs it before returning, then
    /// updates the head file. Any error means the event may not be recorded: refuse the job.
    /// (If only the head-file update fails, the entry is durable but the error is still
    /// returned; `verify` accepts a head file that lags behind.)
    pub fn append(&self, event: AuditEvent, now_ms: i64) -> Result<AuditHead, AuditError> {
        event.validate()?;
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(reason) = &inner.poisoned {
            return Err(AuditError::Poisoned {
                path: self.path.clone(),
                reason: reason.clone(),
            });
        }
        if let Some(reason) = &inner.tampered {
            return Err(AuditError::Tampered {
                path: self.path.clone(),
                reason: reason.clone(),
            });
        }
        // Another process (`cleanroom-node forget`) may append to the same log: take an
        // exclusive lock for the append and catch up with what it wrote.
        inner
            .file
            .lock()
            .map_err(io_err(&self.path, "locking the log"))?;
        let appended = self.append_locked(&mut inner, event, now_ms);
        let _ = inner.file.unlock();
        appended
    }

    /// Follows entries another process appended since we last wrote (the lock is held).
    fn catch_up(&self, inner: &mut Inner) -> Result<(), AuditError> {
        let disk_len = inner
            .file
            .metadata()
            .map_err(io_err(&self.path, "reading metadata"))?
            .len();
        if disk_len == inner.len {
            return Ok(());
        }
        let broken = |why: &str| {
            AuditError::Invalid(format!(
                "{} changed under this process ({why}); run `cleanroom-node audit verify`",
                self.path.display()
            ))
        };
        if disk_len < inner.len {
            return Err(broken("it was truncated"));
        }
        // Only what was appended since our last entry is read; each new entry must follow the
        // one before it, starting from ours.
        let mut added = Vec::new();
        {
            use std::io::{Read, Seek, SeekFrom};
            let mut reader = File::open(&self.path).map_err(io_err(&self.path, "opening"))?;
            reader
                .seek(SeekFrom::Start(inner.len))
                .and_then(|_| reader.take(disk_len - inner.len).read_to_end(&mut added))
                .map_err(io_err(&self.path, "reading"))?;
        }
        let (lines, torn) = split_lines(&added);
        if torn.is_some() {
            return Err(broken("it ends mid-line"));
        }
        let mut head = inner.head.clone();
        for line in lines {
            let entry =
                decode_line(line).ok_or_else(|| broken("an appended line does not parse"))?;
            if entry.compute_hash() != entry.hash
                || entry.seq != head.seq + 1
                || entry.prev != head.hash
            {
                return Err(broken("an appended entry does not follow ours"));
            }
            head = AuditHead {
                seq: entry.seq,
                hash: entry.hash,
            };
        }
        inner.head = head;
        inner.len = disk_len;
        Ok(())
    }

    /// Checks, before an append, that the log still ends with our last entry: the file under
    /// the log's name is the one we write, its last line is our head entry (content and hash),
    /// and the head file says the same. Cheap (one line and the head file are read); if the
    /// file was written by anything since our last append (its change time moved, which a
    /// `forget` append also does), the whole chain is verified as well.
    fn verify_tail(&self, inner: &mut Inner) -> Result<(), String> {
        let ours = inner
            .file
            .metadata()
            .map_err(|e| format!("cannot read its metadata: {e}"))?;
        let ours = FileStamp::of(&ours);
        let named = std::fs::metadata(&self.path)
            .map_err(|e| format!("the log file cannot be read under its name: {e}"))?;
        if !FileStamp::of(&named).same_file(&ours) {
            return Err("another file was put in place of the log".into());
        }
        if ours.len != inner.len {
            return Err(format!(
                "it is {} bytes long, but ends at byte {} after its last entry",
                ours.len, inner.len
            ));
        }
        let last = last_line(&self.path, inner.len).map_err(|e| format!("reading it: {e}"))?;
        match last {
            None if inner.head == AuditHead::genesis() => {}
            None => {
                return Err(format!(
                    "it is empty, but its head is seq {}",
                    inner.head.seq
                ));
            }
            Some(line) => {
                let entry = decode_line(&line).ok_or_else(|| {
                    format!(
                        "its last line (seq {}) is not a valid entry any more",
                        inner.head.seq
                    )
                })?;
                if entry.seq != inner.head.seq
                    || entry.hash != inner.head.hash
                    || entry.compute_hash() != entry.hash
                {
                    return Err(format!(
                        "its last entry (seq {}) was changed",
                        inner.head.seq
                    ));
                }
            }
        }
        match read_head_file(&self.head_path) {
            Ok(Some(h)) if h == inner.head => {}
            // Rewritten with the next entry.
            _ if inner.head_stale => {}
            Ok(Some(h)) => {
                return Err(format!(
                    "the head file says {h}, but the log's last entry is {}",
                    inner.head
                ));
            }
            Ok(None) => return Err("the head file is missing".into()),
            Err(e) => return Err(format!("the head file is unreadable: {e}")),
        }
        if inner.stamp != Some(ours) {
            let report = verify(&self.path, None).map_err(|e| e.to_string())?;
            if let Some(first) = report.problems.first() {
                return Err(first.to_string());
            }
        }
        Ok(())
    }

    fn append_locked(
        &self,
        inner: &mut Inner,
        event: AuditEvent,
        now_ms: i64,
    ) -> Result<AuditHead, AuditError> {
        self.catch_up(inner)
            .map_err(|e| self.tampered(inner, e.to_string()))?;
        if let Err(reason) = self.verify_tail(inner) {
            return Err(self.tampered(inner, reason));
        }
        let mut entry = AuditEntry {
            seq: inner.head.seq + 1,
            at_ms: now_ms,
            prev: inner.head.hash,
            event,
            hash: [0; 32],
        };
        entry.hash = entry.compute_hash();
        let line = encode_line(&entry);
        let written = inner
            .file
            .write_all(&line)
            .and_then(|()| inner.file.sync_data());
        if let Err(source) = written {
            // Undo a partial line so the next append does not follow garbage.
            let len = inner.len;
            let undone = inner
                .file
                .set_len(len)
                .and_then(|()| inner.file.sync_data());
            if let Err(e) = undone {
                inner.poisoned = Some(format!(
                    "writing failed ({source}) and the partial line could not be removed ({e})"
                ));
            }
            return Err(AuditError::Io {
                path: self.path.clone(),
                what: "appending an entry",
                source,
            });
        }
        inner.len += line.len() as u64;
        let head = AuditHead {
            seq: entry.seq,
            hash: entry.hash,
        };
        inner.head = head.clone();
        inner.stamp = inner.file.metadata().ok().map(|m| FileStamp::of(&m));
        inner.head_stale = true;
        write_head(&self.head_path, &head)?;
        inner.head_stale = false;
        Ok(head)
    }

    /// Records that the log failed its check: this and every later append fail with `reason`.
    fn tampered(&self, inner: &mut Inner, reason: String) -> AuditError {
        tracing::error!(log = %self.path.display(), %reason, "the audit log does not verify; refusing every job");
        inner.tampered = Some(reason.clone());
        AuditError::Tampered {
            path: self.path.clone(),
            reason,
        }
    }

    /// The current head.
    pub fn head(&self) -> AuditHead {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .head
            .clone()
    }
}

fn write_head(head_path: &Path, head: &AuditHead) -> Result<(), AuditError> {
    let mut tmp_name = head_path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(format!("{head}\n").as_bytes())?;
        f.sync_data()?;
        std::fs::rename(&tmp, head_path)
    })();
    res.map_err(io_err(head_path, "writing the head file"))?;
    sync_dir(head_path);
    Ok(())
}

/// Best effort: makes a rename or creation in the file's directory durable.
fn sync_dir(path: &Path) {
    #[cfg(unix)]
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn format_ms(at_ms: i64) -> String {
    let secs = at_ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses `YYYY-MM-DD` as Unix milliseconds at 00:00 UTC.
pub fn parse_date_ms(s: &str) -> Result<i64, String> {
    let bad = || format!("'{s}' is not a date; expected YYYY-MM-DD");
    let mut parts = s.trim().splitn(3, '-');
    let mut next = || parts.next().and_then(|p| p.parse::<i64>().ok());
    let (y, m, d) = (
        next().ok_or_else(bad)?,
        next().ok_or_else(bad)?,
        next().ok_or_else(bad)?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let days = days_from_civil(y, m, d);
    if civil_from_days(days) != (y, m, d) {
        return Err(bad());
    }
    Ok(days * 86_400_000)
}

// Howard Hinnant's algorithms (proleptic Gregorian calendar).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Counts of entries by kind (for `audit show` footers and tests).
pub fn count_by_kind(entries: &[AuditEntry]) -> BTreeMap<&'static str, u64> {
    let mut m = BTreeMap::new();
    for e in entries {
        *m.entry(e.event.kind()).or_insert(0) += 1;
    }
    m
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample_events() -> Vec<AuditEvent> {
        vec![
            AuditEvent::PolicyLoaded {
                digest: "ab".repeat(32),
                agreements: vec!["globex".into(), "initech".into()],
            },
            AuditEvent::Decision {
                job_id: "j1".into(),
                partner: "globex".into(),
                purpose: "ad measurement".into(),
                computation: "overlap".into(),
                dataset: "customers".into(),
                keys: vec!["email".into()],
                accepted: true,
                reason: "allowed by agreement with globex".into(),
            },
            AuditEvent::Access {
                job_id: "j1".into(),
                dataset: "customers".into(),
                columns: vec!["email".into()],
                rows_read: 1000,
                rows_rejected: 3,
                rows_excluded_consent: 20,
                rows_excluded_deleted: 1,
                rows_other: None,
                persons: None,
            },
            AuditEvent::Release {
                job_id: "j1".into(),
                partner: "globex".into(),
                what: "intersection count".into(),
                to: vec!["coordinator".into(), "globex".into()],
                value: Some(412),
                epsilon: 0.5,
                rho: None,
            },
            AuditEvent::Decision {
                job_id: "j2".into(),
                partner: "initech".into(),
                purpose: "fraud".into(),
                computation: "match".into(),
                dataset: "customers".into(),
                keys: vec!["phone".into()],
                accepted: false,
                reason: "no agreement allows match with initech".into(),
            },
            AuditEvent::Decision {
                job_id: "j3".into(),
                partner: "globex".into(),
                purpose: "ad measurement".into(),
                computation: "overlap".into(),
                dataset: "customers".into(),
                keys: vec!["email".into()],
                accepted: true,
                reason: "allowed".into(),
            },
            AuditEvent::JobError {
                job_id: "j3".into(),
                partner: "globex".into(),
                reason: "peer disconnected".into(),
            },
            AuditEvent::Forget {
                dataset: "customers".into(),
                key_hash: "cd".repeat(32),
            },
        ]
    }

    /// A log with `n` entries (cycling through the sample events), at `dir/audit.log`.
    pub(crate) fn make_log(dir: &Path, n: usize) -> PathBuf {
        let path = dir.join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        let events = sample_events();
        for i in 0..n {
            log.append(
                events[i % events.len()].clone(),
                1_700_000_000_000 + i as i64 * 1000,
            )
            .unwrap();
        }
        path
    }

    fn lines_of(path: &Path) -> Vec<Vec<u8>> {
        let bytes = std::fs::read(path).unwrap();
        let (lines, tail) = split_lines(&bytes);
        assert!(tail.is_none());
        lines.into_iter().map(<[u8]>::to_vec).collect()
    }

    fn write_lines(path: &Path, lines: &[Vec<u8>]) {
        let mut out = Vec::new();
        for l in lines {
            out.extend_from_slice(l);
            out.push(b'\n');
        }
        std::fs::write(path, out).unwrap();
    }

    fn problems(path: &Path, expected: Option<&AuditHead>) -> Vec<Tamper> {
        verify(path, expected).unwrap().problems
    }

    #[test]
    fn audit_round_trip_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/audit.log");
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.head(), AuditHead::genesis());
        let mut heads = vec![];
        for (i, e) in sample_events().into_iter().enumerate() {
            heads.push(log.append(e, i as i64).unwrap());
        }
        assert_eq!(log.head(), *heads.last().unwrap());
        assert_eq!(log.head().seq, 8);
        drop(log);

        let entries = read_entries(&path).unwrap();
        assert_eq!(entries.len(), 8);
        assert_eq!(
            entries.iter().map(|e| e.event.clone()).collect::<Vec<_>>(),
            sample_events()
        );
        assert_eq!(entries[0].prev, genesis_hash());
        for w in entries.windows(2) {
            assert_eq!(w[1].prev, w[0].hash);
            assert_eq!(w[1].seq, w[0].seq + 1);
        }

        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.head(), heads[7]);
        let h9 = log.append(sample_events()[1].clone(), 99).unwrap();
        assert_eq!(h9.seq, 9);
        let report = verify(&path, Some(&heads[3])).unwrap();
        assert!(report.is_ok(), "{:?}", report.problems);
        assert_eq!(report.entries, 9);
        assert_eq!(report.head, h9);
        // Head display round trip.
        assert_eq!(h9.to_string().parse::<AuditHead>().unwrap(), h9);
        assert!(
            std::fs::read_to_string(head_path(&path))
                .unwrap()
                .starts_with("9:")
        );
    }

    #[test]
    fn audit_verify_clean_and_empty() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.log");
        let r = verify(&missing, None).unwrap();
        assert!(r.is_ok());
        assert_eq!(r.head, AuditHead::genesis());
        let path = make_log(dir.path(), 5);
        let r = verify(&path, None).unwrap();
        assert!(r.is_ok(), "{:?}", r.problems);
        assert_eq!(r.entries, 5);
        assert_eq!(r.head.seq, 5);
    }

    /// An aggregate's own figures (rows in "(other)", per-person counts) are kept in its Access
    /// entry; entries without them (older ones, other job kinds) keep their exact encoding.
    #[test]
    fn access_keeps_an_aggregates_own_figures_and_old_entries_stay_canonical() {
        let old = &sample_events()[2];
        let line = serde_json::to_string(old).unwrap();
        assert!(
            !line.contains("rows_other") && !line.contains("persons"),
            "{line}"
        );
        let agg = AuditEvent::Access {
            job_id: "j2".into(),
            dataset: "chargebacks".into(),
            columns: vec!["category".into(), "amount".into(), "customer".into()],
            rows_read: 900,
            rows_rejected: 2,
            rows_excluded_consent: 0,
            rows_excluded_deleted: 0,
            rows_other: Some(17),
            persons: Some(PersonCounts {
                persons: 400,
                rows_outside_group: 12,
            }),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let log = AuditLog::open(&path).unwrap();
        log.append(old.clone(), 1).unwrap();
        log.append(agg.clone(), 2).unwrap();
        drop(log);
        let entries = read_entries(&path).unwrap();
        assert_eq!(entries[1].event, agg);
        assert!(verify(&path, None).unwrap().is_ok());
        assert!(
            agg.summary().ends_with(
                ", 17 in (other), 400 persons (12 rows outside their person's group left out)"
            ),
            "{}",
            agg.summary()
        );
    }

    #[test]
    fn audit_event_json_is_tagged_and_strict() {
        let e = &sample_events()[3];
        let json = serde_json::to_string(e).unwrap();
        assert!(json.starts_with(r#"{"kind":"Release","#), "{json}");
        let extra = json.replacen('{', r#"{"secret":"x","#, 1);
        assert!(serde_json::from_str::<AuditEvent>(&extra).is_err());
        // Non-finite ε is refused rather than written as null.
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(&dir.path().join("a.log")).unwrap();
        let mut bad = e.clone();
        if let AuditEvent::Release { epsilon, .. } = &mut bad {
            *epsilon = f64::NAN;
        }
        assert!(matches!(log.append(bad, 0), Err(AuditError::Invalid(_))));
        assert_eq!(log.head().seq, 0);
    }

    #[test]
    fn audit_flip_in_json_and_in_hash_each_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = make_log(dir.path(), 6);
        let clean = lines_of(&path);
        for (i, line) in clean.iter().enumerate() {
            let text = std::str::from_utf8(line).unwrap();
            // A byte in the JSON of the event, one in the stored hash, one in prev, one in seq.
            let in_event = text.find("\"kind\":\"").unwrap() + 9;
            let in_hash = text.find("\"hash\":\"").unwrap() + 20;
            let in_prev = text.find("\"prev\":\"").unwrap() + 30;
            let in_time = text.find("\"at_ms\":").unwrap() + 10;
            for pos in [in_event, in_hash, in_prev, in_time, 0, line.len() - 1] {
                let mut lines = clean.clone();
                // Change a letter/digit to another of the same class so it still parses.
                lines[i][pos] = match lines[i][pos] {
                    b'0'..=b'8' | b'a'..=b'e' => lines[i][pos] + 1,
                    b'9' => b'0',
                    b'f' => b'a',
                    b => b ^ 1,
                };
                write_lines(&path, &lines);
                let p = problems(&path, None);
                let line_no = i as u64 + 1;
                assert!(
                    p.iter().any(|t| matches!(t,
                        Tamper::BadHash { line, .. } | Tamper::Corrupted { line } if *line == line_no)),
                    "line {line_no} pos {pos}: {p:?}"
                );
            }
        }
    }

    #[test]
    fn audit_flipping_any_byte_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = make_log(dir.path(), 20);
        let clean = std::fs::read(&path).unwrap();
        // Every byte with its low bit flipped; every 5th byte also with a high bit flipped.
        for pos in 0..clean.len() {
            let masks: &[u8] = if pos % 5 == 0 { &[0x01, 0x40] } else { &[0x01] };
            for &mask in masks {
                let mut bytes = clean.clone();
                bytes[pos] ^= mask;
                std::fs::write(&path, &bytes).unwrap();
                let report = verify(&path, None).unwrap();
                assert!(!report.is_ok(), "flip {mask:#x} at byte {pos} undetected");
            }
        }
        std::fs::write(&path, &clean).unwrap();
        assert!(verify(&path, None).unwrap().is_ok());
    }

    #[test]
    fn audit_deleted_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = make_log(dir.path(), 6);
        let clean = lines_of(&path);
        let head = verify(&path, None).unwrap().head;

        let mut l = clean.clone();
        l.remove(0);
        write_lines(&path, &l);
        assert_eq!(
            problems(&path, None),
            vec![Tamper::Gap {
                line: 1,
                expected_seq: 1,
                found_seq: 2
            }]
        );

        let mut l = clean.clone();
        l.remove(3);
        write_lines(&path, &l);
        let p = problems(&path, None);
        assert_eq!(
            p,
            vec![Tamper::Gap {
                line: 4,
                expected_seq: 4,
                found_seq: 5
            }]
        );
        assert!(
            p[0].to_string().contains("entries 4..=4 deleted"),
            "{}",
            p[0]
        );

        // The last entry: only the heads can tell.
        let mut l = clean.clone();
        l.pop();
        write_lines(&path, &l);
        assert_eq!(
            problems(&path, None),
            vec![Tamper::Truncated {
                entries: 5,
                expected_at_least: 6,
                source: HeadSource::HeadFile
            }]
        );
        // With the head file rewritten to match, the coordinator's head still catches it.
        std::fs::write(
            head_path(&path),
            "5:".to_string() + &to_hex(&clean_hash(&l[4])),
        )
        .unwrap();
        assert!(problems(&path, None).is_empty());
        assert_eq!(
            problems(&path, Some(&head)),
            vec![Tamper::Truncated {
                entries: 5,
                expected_at_least: 6,
                source: HeadSource::Expected
            }]
        );
    }

    fn clean_hash(line: &[u8]) -> [u8; 32] {
        decode_line(line).unwrap().hash
    }

    #[test]
    fn audit_swapped_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = make_log(dir.path(), 6);
        let mut l = lines_of(&path);
        l.swap(2, 3);
        write_lines(&path, &l);
        let p = problems(&path, None);
        assert_eq!(
            p,
            vec![
                Tamper::OutOfOrder {
                    line: 3,
                    seq: 4,
                    expected_seq: 3
                },
                Tamper::OutOfOrder {
                    line: 4,
                    seq: 3,
                    expected_seq: 5
                },
            ]
        );
        assert!(p[0].to_string().contains("reordered"));
    }

    #[test]
    fn audit_inserted_forged_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = make_log(dir.path(), 6);
        let mut l = lines_of(&path);
        // A forged seq-4 entry with a correct own hash but linked to the wrong predecessor.
        let mut forged = AuditEntry {
            seq: 4,
            at_ms: 5,
            prev: decode_line(&l[0]).unwrap().hash,
            event: sample_events()[3].clone(),
            hash: [0; 32],
        };
        forged.hash = forged.compute_hash();
        let mut line = encode_line(&forged);
        line.pop();
        l.insert(3, line.clone());
        write_lines(&path, &l);
        let p = problems(&path, None);
        assert_eq!(p, vec![Tamper::BrokenLink { line: 4, seq: 4 }], "{p:?}");

        // An exact replay of an existing line.
        let mut l = lines_of_clean(dir.path());
        let copy = l[1].clone();
        l.insert(4, copy);
        write_lines(&path, &l);
        let p = problems(&path, None);
        assert_eq!(p, vec![Tamper::Duplicate { line: 5, seq: 2 }], "{p:?}");

        // A forged entry appended at the end that links nowhere.
        let mut l = lines_of_clean(dir.path());
        forged.seq = 7;
        forged.hash = forged.compute_hash();
        let mut line = encode_line(&forged);
        line.pop();
        l.push(line);
        write_lines(&path, &l);
        let p = problems(&path, None);
        assert_eq!(p, vec![Tamper::BrokenLink { line: 7, seq: 7 }], "{p:?}");
    }

    fn lines_of_clean(dir: &Path) -> Vec<Vec<u8>> {
        let sub = tempfile::tempdir_in(dir).unwrap();
        lines_of(&make_log(sub.path(), 6))
    }

    #[test]
    fn audit_truncation_mid_line_and_rewritten_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = make_log(dir.path(), 4);
        let clean = std::fs::read(&path).unwrap();
        std::fs::write(&path, &clean[..clean.len() - 10]).unwrap();
        let p = problems(&path, None);
        assert!(p.contains(&Tamper::Incomplete { line: 4 }), "{p:?}");
        assert!(p.contains(&Tamper::Truncated {
            entries: 3,
            expected_at_least: 4,
            source: HeadSource::HeadFile
        }));
        // open refuses: the head file shows this is not a torn write.
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::Broken { .. })
        ));

        // Rewritten history: a different log with the same length.
        std::fs::write(&path, &clean).unwrap();
        let head = verify(&path, None).unwrap().head;
        let other = tempfile::tempdir().unwrap();
        let other_path = other.path().join("audit.log");
        let log = AuditLog::open(&other_path).unwrap();
        for i in 0..4 {
            log.append(sample_events()[7 - i].clone(), 0).unwrap();
        }
        let p = problems(&other_path, Some(&head));
        assert!(
            matches!(p.as_slice(), [Tamper::HeadMismatch { seq: 4, .. }]),
            "{p:?}"
        );
    }

    #[test]
    fn audit_open_repairs_only_a_torn_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = make_log(dir.path(), 3);
        let head = verify(&path, None).unwrap().head;
        // A crash mid-append: part of line 4 written, head file not yet updated.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(br#"{"seq":4,"at_ms":1,"pre"#);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(problems(&path, None), vec![Tamper::Incomplete { line: 4 }]);
        let log = AuditLog::open(&path).unwrap();
        assert_eq!(log.head(), head);
        log.append(sample_events()[0].clone(), 2).unwrap();
        drop(log);
        assert!(verify(&path, None).unwrap().is_ok());
    }

    #[test]
    fn audit_open_refuses_broken_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = make_log(dir.path(), 5);
        let mut l = lines_of(&path);
        l.remove(2);
        write_lines(&path, &l);
        let err = AuditLog::open(&path).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("audit verify"), "{msg}");
        assert!(matches!(err, AuditError::Broken { .. }));
        // Deleting the head file of a non-empty log is itself a problem.
        let sub = tempfile::tempdir_in(dir.path()).unwrap();
        let path = make_log(sub.path(), 2);
        std::fs::remove_file(head_path(&path)).unwrap();
        assert!(matches!(
            problems(&path, None).as_slice(),
            [Tamper::HeadFile { .. }]
        ));
    }

    #[cfg(unix)]
    #[test]
    fn audit_write_failure_is_an_error_not_a_panic() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let running_as_root = std::fs::write(ro.join("probe"), b"x").is_ok();
        if !running_as_root {
            assert!(matches!(
                AuditLog::open(&ro.join("audit.log")),
                Err(AuditError::Io { .. })
            ));
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();

        // A full disk, where available: /dev/full fails every write with ENOSPC.
        let full = Path::new("/dev/full");
        if full.exists() {
            let file = OpenOptions::new().append(true).open(full).unwrap();
            let log = AuditLog {
                path: full.to_owned(),
                head_path: dir.path().join("full.head"),
                inner: Mutex::new(Inner {
                    stamp: file.metadata().ok().map(|m| FileStamp::of(&m)),
                    file,
                    head: AuditHead::genesis(),
                    len: 0,
                    poisoned: None,
                    tampered: None,
                    // No head file was ever written for it.
                    head_stale: true,
                }),
            };
            let err = log.append(sample_events()[0].clone(), 0).unwrap_err();
            assert!(
                matches!(err, AuditError::Io { .. } | AuditError::Poisoned { .. }),
                "{err}"
            );
            assert_eq!(log.head(), AuditHead::genesis());
            assert!(log.append(sample_events()[0].clone(), 0).is_err());
        }

        // A log file made read-only after opening for reading only: appends fail cleanly.
        let path = make_log(dir.path(), 1);
        let file = OpenOptions::new().read(true).open(&path).unwrap();
        let log = AuditLog {
            path: path.clone(),
            head_path: head_path(&path),
            inner: Mutex::new(Inner {
                stamp: file.metadata().ok().map(|m| FileStamp::of(&m)),
                file,
                head: verify(&path, None).unwrap().head,
                len: std::fs::metadata(&path).unwrap().len(),
                poisoned: None,
                tampered: None,
                head_stale: false,
            }),
        };
        assert!(log.append(sample_events()[0].clone(), 0).is_err());
        assert_eq!(log.head().seq, 1);
        drop(log);
        assert!(verify(&path, None).unwrap().is_ok());
    }

    /// A log of the sample events, open, and its path.
    fn open_log_with_entries(dir: &Path) -> (AuditLog, PathBuf) {
        let path = dir.join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        for (i, e) in sample_events().into_iter().enumerate() {
            log.append(e, i as i64).unwrap();
        }
        // Coarse file timestamps: let the clock tick past our last append.
        std::thread::sleep(std::time::Duration::from_millis(20));
        (log, path)
    }

    fn assert_refused_for_good(log: &AuditLog, wording: &str) {
        for _ in 0..2 {
            match log.append(sample_events()[0].clone(), 100) {
                Err(AuditError::Tampered { reason, .. }) => {
                    assert!(reason.contains(wording), "{reason}")
                }
                other => panic!("expected a tampered log, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_running_log_whose_last_entry_changes_refuses_appends() {
        let dir = tempfile::tempdir().unwrap();
        let (log, path) = open_log_with_entries(dir.path());
        let text = std::fs::read_to_string(&path).unwrap();
        // Same length: one digit of the last entry's time changed.
        let cut = text[..text.len() - 1].rfind('\n').unwrap() + 1;
        let tampered = format!(
            "{}{}",
            &text[..cut],
            text[cut..].replacen("\"at_ms\":7", "\"at_ms\":8", 1)
        );
        assert_ne!(tampered, text);
        assert_eq!(tampered.len(), text.len());
        std::fs::write(&path, tampered).unwrap();
        assert_refused_for_good(&log, "last entry (seq 8)");
    }

    #[test]
    fn a_running_log_changed_in_the_middle_refuses_appends() {
        let dir = tempfile::tempdir().unwrap();
        let (log, path) = open_log_with_entries(dir.path());
        let text = std::fs::read_to_string(&path).unwrap();
        let tampered = text.replacen("\"at_ms\":2", "\"at_ms\":3", 1);
        assert_eq!(tampered.len(), text.len());
        std::fs::write(&path, tampered).unwrap();
        assert_refused_for_good(&log, "line 3");
    }

    #[test]
    fn a_running_log_replaced_or_cut_or_with_another_head_refuses_appends() {
        let dir = tempfile::tempdir().unwrap();
        let (log, path) = open_log_with_entries(dir.path());
        let text = std::fs::read_to_string(&path).unwrap();
        // Replaced by an identical copy under the same name (as `sed -i` or an editor does).
        let copy = dir.path().join("copy");
        std::fs::write(&copy, &text).unwrap();
        std::fs::rename(&copy, &path).unwrap();
        assert_refused_for_good(&log, "another file was put in place");

        let dir = tempfile::tempdir().unwrap();
        let (log, path) = open_log_with_entries(dir.path());
        let text = std::fs::read_to_string(&path).unwrap();
        let cut = text[..text.len() - 1].rfind('\n').unwrap() + 1;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(cut as u64)
            .unwrap();
        assert_refused_for_good(&log, "truncated");

        let dir = tempfile::tempdir().unwrap();
        let (log, path) = open_log_with_entries(dir.path());
        std::fs::write(head_path(&path), "3:".to_owned() + &"ab".repeat(32) + "\n").unwrap();
        assert_refused_for_good(&log, "the head file says 3:");
    }

    #[test]
    fn appends_of_another_writer_are_followed_not_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (log, path) = open_log_with_entries(dir.path());
        // `cleanroom-node forget` appends through its own handle while the node runs.
        let other = AuditLog::open(&path).unwrap();
        other.append(sample_events()[2].clone(), 50).unwrap();
        drop(other);
        let head = log.append(sample_events()[3].clone(), 51).unwrap();
        assert_eq!(head.seq, 10);
        assert!(verify(&path, Some(&head)).unwrap().is_ok());
        // An appended line that does not chain from ours is not an append.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut text = std::fs::read_to_string(&path).unwrap();
        let last = text.lines().last().unwrap().to_owned();
        text.push_str(&last);
        text.push('\n');
        std::fs::write(&path, text).unwrap();
        assert_refused_for_good(&log, "does not follow ours");
    }

    #[test]
    fn audit_log_is_send_sync_and_concurrent() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<AuditLog>();
        let dir = tempfile::tempdir().unwrap();
        let log = std::sync::Arc::new(AuditLog::open(&dir.path().join("a.log")).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..10 {
                        log.append(sample_events()[(t + i) % 8].clone(), i as i64)
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let r = verify(&dir.path().join("a.log"), Some(&log.head())).unwrap();
        assert!(r.is_ok(), "{:?}", r.problems);
        assert_eq!(r.entries, 40);
    }

    #[test]
    fn audit_dates() {
        assert_eq!(parse_date_ms("1970-01-01").unwrap(), 0);
        assert_eq!(parse_date_ms("2024-02-29").unwrap(), 1_709_164_800_000);
        assert!(parse_date_ms("2023-02-29").is_err());
        assert!(parse_date_ms("2024-13-01").is_err());
        assert_eq!(
            format_ms(1_709_164_800_000 + 3_723_000),
            "2024-02-29 01:02:03"
        );
        assert_eq!(format_ms(-1000), "1969-12-31 23:59:59");
    }
}
