//! The job wing: everything a job does at this node once the coordinator offers it.

pub mod aggregate;
pub mod driver;
pub mod frame_budget;
pub mod noise;
pub mod overlap_sum;
pub mod psi;
pub mod wire;
pub use crate::error::{JobError, Party, Timeout, Violation};
pub use crate::spec::spec_digest;
