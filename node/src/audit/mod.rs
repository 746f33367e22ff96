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

mod chain;
mod event;
pub mod transparency;
mod verify;
mod writer;

#[cfg(test)]
pub(crate) mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use chain::{AuditEntry, AuditHead, hash_from_hex, to_hex};
pub(crate) use chain::{decode_line, encode_line, genesis_hash};
pub use event::{AuditEvent, PersonCounts, RejectedRow, Rejections};
pub use verify::{
    HeadSource, LineCheck, ShownLine, Tamper, VerifyReport, read_entries, show_lines, verify,
};
pub(crate) use verify::{last_line, read_head_file, split_lines};
pub(crate) use writer::sync_dir;
pub use writer::{AppendObserver, AuditLog};

/// Where a node keeps its audit log: `<state_dir>/audit.log`.
pub fn audit_path(state_dir: &Path) -> PathBuf {
    state_dir.join("audit.log")
}

/// The head file kept next to a log: `<log>.head`.
pub fn head_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".head");
    PathBuf::from(name)
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

pub(crate) fn io_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(std::io::Error) -> AuditError + 'a {
    move |source| AuditError::Io {
        path: path.to_owned(),
        what,
        source,
    }
}

/// Counts of entries by kind (for `audit show` footers and tests).
pub fn count_by_kind(entries: &[AuditEntry]) -> BTreeMap<&'static str, u64> {
    let mut m = BTreeMap::new();
    for e in entries {
        *m.entry(e.event.kind()).or_insert(0) += 1;
    }
    m
}
