//! The job spec as the node reads it, whatever the job's kind: the digest both parties compare,
//! the ledger key of its release, and its computation's name. Every room above this one (policy
//! state, the job wing) names a job the same way through these.

use cleanroom_proto::v1::JobSpec;
use prost::Message;
use sha2::{Digest, Sha256};

/// Both parties hash the same spec with the job id; a mismatch means they were told different
/// things (a confused or malicious coordinator).
pub fn spec_digest(job_id: &str, spec: &JobSpec) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"cleanroom/1 job spec\0");
    h.update(job_id.as_bytes());
    h.update([0u8]);
    h.update(spec.encode_to_vec());
    h.finalize().into()
}

/// The ledger key of a job's noised release: its kind and spec digest (job id and spec), so a
/// repeated offer of the same job finds its charge and is refused. `overlap:<hex>`,
/// `overlap-sum:<hex>` or `aggregate:<hex>`.
pub fn release_key(job_id: &str, spec: &cleanroom_proto::v1::JobSpec) -> String {
    use cleanroom_proto::v1::JobKind;
    let kind = match JobKind::try_from(spec.kind) {
        Ok(JobKind::Aggregate) => "aggregate",
        Ok(JobKind::OverlapSum) => "overlap-sum",
        _ => "overlap",
    };
    format!(
        "{kind}:{}",
        crate::audit::to_hex(&spec_digest(job_id, spec))
    )
}

/// The computation's name as the audit log and the policy spell it.
pub fn computation_name(kind: i32) -> &'static str {
    match cleanroom_proto::v1::JobKind::try_from(kind) {
        Ok(cleanroom_proto::v1::JobKind::Overlap) => "overlap",
        Ok(cleanroom_proto::v1::JobKind::Match) => "match",
        Ok(cleanroom_proto::v1::JobKind::Aggregate) => "aggregate",
        Ok(cleanroom_proto::v1::JobKind::OverlapSum) => "overlap-sum",
        _ => "unknown",
    }
}
