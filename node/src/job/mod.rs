//! The job wing: everything a job does at this node once the coordinator offers it.

pub mod aggregate;
pub mod driver;
pub mod frame_budget;
pub mod noise;
pub mod overlap_sum;
pub mod protocol;
pub mod psi;
mod reblind_queue;
pub mod spill;
#[cfg(test)]
mod test_pair;
pub mod wire;
pub use crate::error::{JobError, Party, Timeout, Violation};
pub use crate::spec::spec_digest;

use std::net::SocketAddr;

use cleanroom_proto::v1::PsiOutcome;
use tokio::sync::oneshot;

use crate::dataplane::Delivery;
use crate::error::NodeError;
use crate::job::driver::JobContext;
use crate::kind::Kind;

/// How this node meets the partner of a two-party job.
#[derive(Debug)]
pub enum Side<'a> {
    /// Party 0: it dials the partner's data plane at this address.
    Dial(&'a quinn::Endpoint, SocketAddr),
    /// Party 1: the partner's connection comes through the data plane.
    Accept(oneshot::Receiver<Delivery>),
}

/// Runs an accepted two-party job of `kind`: the kind's protocol under the one driver.
pub async fn run_two_party(
    kind: Kind,
    job: JobContext,
    side: Side<'_>,
) -> Result<PsiOutcome, NodeError> {
    match (kind, side) {
        (Kind::Overlap | Kind::Match, Side::Dial(endpoint, addr)) => {
            driver::run_initiator(job, endpoint, addr).await
        }
        (Kind::Overlap | Kind::Match, Side::Accept(incoming)) => {
            driver::run_responder(job, incoming).await
        }
        (Kind::OverlapSum, Side::Dial(endpoint, addr)) => {
            driver::overlap_sum::run_key_holder(job, endpoint, addr).await
        }
        (Kind::OverlapSum, Side::Accept(incoming)) => {
            driver::overlap_sum::run_value_holder(job, incoming).await
        }
        (Kind::Aggregate, _) => {
            Err(JobError::Internal("an aggregate is not a two-party job".into()).into())
        }
    }
}
