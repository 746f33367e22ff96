//! The audit log's event schema: what one entry records.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::AuditError;

/// What per-person clipping did with one party's rows (audited with its Access).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonCounts {
    /// Distinct persons counted.
    pub persons: u64,
    /// Rows of a person outside its group (the first listed among its rows'; left out).
    pub rows_outside_group: u64,
}

/// Rows rejected in one pass over a dataset (filled by `data::dataset`): how many for each reason, and where the first
/// ten were (line and column, never a value).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rejections {
    /// Rows rejected for each reason (e.g. `"field count"`, `"line break in a field"`,
    /// `"email without '@'"`).
    pub by_reason: BTreeMap<String, u64>,
    /// The first rejected rows.
    pub first: Vec<RejectedRow>,
    /// Rows kept although a field the pass does not read holds a line break (legal CSV, but
    /// also what a quote left open in such a column looks like).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub multi_line_rows: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Rejections {
    /// Rows rejected, all reasons.
    pub fn total(&self) -> u64 {
        self.by_reason.values().sum()
    }

    /// Whether no row was rejected or kept with a line break.
    pub fn is_empty(&self) -> bool {
        self.by_reason.is_empty() && self.multi_line_rows == 0
    }
}

/// Where one row was rejected, and why. Holds no field value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RejectedRow {
    /// 1-based line of the file where the row starts (the header is line 1); the 1-based row
    /// for data read through DataFusion; 0 when not known (read in parallel on a cluster, where
    /// the parts come back in the order they finish).
    pub line: u64,
    /// The column that rejected it, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// Why.
    pub reason: String,
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
        /// because they lie outside their person's group (the first listed among its rows').
        #[serde(default, skip_serializing_if = "Option::is_none")]
        persons: Option<PersonCounts>,
        /// The rejected rows by reason, and where the first were (absent when none was, and in
        /// older entries).
        #[serde(default, skip_serializing_if = "Rejections::is_empty")]
        rejected: Rejections,
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
    /// A data-plane connection was refused before any job saw it (a certificate whose key is
    /// not the one the partner's agreement pins).
    ConnectionRefused {
        /// The identity the certificate claims.
        peer: String,
        /// Why, with the presented and pinned key fingerprints.
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
            AuditEvent::ConnectionRefused { .. } => "ConnectionRefused",
        }
    }

    /// The job this event belongs to, if any.
    pub fn job_id(&self) -> Option<&str> {
        match self {
            AuditEvent::Decision { job_id, .. }
            | AuditEvent::Access { job_id, .. }
            | AuditEvent::Release { job_id, .. }
            | AuditEvent::JobError { job_id, .. } => Some(job_id),
            AuditEvent::PolicyLoaded { .. }
            | AuditEvent::Forget { .. }
            | AuditEvent::ConnectionRefused { .. } => None,
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
                rejected,
                ..
            } => format!(
                "read {dataset} [{}]: {rows_read} rows, {rows_rejected} rejected{}, \
                 {rows_excluded_consent} excluded (consent), {rows_excluded_deleted} excluded (deleted){}{}",
                columns.join(", "),
                {
                    let mut parts: Vec<String> = rejected
                        .by_reason
                        .iter()
                        .map(|(why, n)| format!("{n} {why}"))
                        .collect();
                    if rejected.multi_line_rows > 0 {
                        parts.push(format!(
                            "{} kept with a line break in an unread field",
                            rejected.multi_line_rows
                        ));
                    }
                    if parts.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", parts.join(", "))
                    }
                },
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
            AuditEvent::ConnectionRefused { peer, reason } => {
                format!("refused a data-plane connection from {peer}: {reason}")
            }
            AuditEvent::Forget { dataset, key_hash } => format!(
                "forgot a subject of {dataset} (key hash {}…)",
                key_hash.get(..16).unwrap_or(key_hash)
            ),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), AuditError> {
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
