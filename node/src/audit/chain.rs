//! The chain format: one canonical JSON line per entry, each hash covering the previous one, and
//! the head (`SEQ:HEX`) that names a log's state.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AuditEvent;

const ENTRY_DOMAIN: &[u8] = b"cleanroom/1 audit entry";
const GENESIS_DOMAIN: &[u8] = b"cleanroom/1 audit genesis";

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

pub(crate) fn entry_hash(prev: &[u8; 32], seq: u64, at_ms: i64, event: &AuditEvent) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(ENTRY_DOMAIN);
    h.update(prev);
    h.update(seq.to_be_bytes());
    h.update(at_ms.to_be_bytes());
    // Serializing plain data to a Vec cannot fail (no maps with non-string keys, ε is finite).
    h.update(serde_json::to_vec(event).unwrap_or_default());
    h.finalize().into()
}

pub(crate) fn genesis_hash() -> [u8; 32] {
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

pub(crate) fn encode_line(entry: &AuditEntry) -> Vec<u8> {
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
pub(crate) fn decode_line(bytes: &[u8]) -> Option<AuditEntry> {
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
