//! Running jobs: one runner task per job ([`start`]), one pipeline every kind goes through, and
//! one `settle` per kind.
//!
//! ```text
//! task       lease → slot → (resumed: wait for the parties) → pipeline → final state
//! pipeline   connected? → offer all → start (pair: responder, then initiator; peers: all)
//!            → collect each party's report → settle
//! settle     pairwise     overlap, match: the two counts and their noise must agree
//!            overlap_sum  the key holder's terms against the value holder's release
//!            aggregate    sum of N masked partials → noised totals, suppression
//! ```
//!
//! Failures are [`JobError`]s to the edge: the runner stores [`JobError::state`] and the
//! error's text as the job's reason, the only place it becomes prose.

mod aggregate;
mod error;
mod overlap_sum;
mod pairwise;
mod pipeline;
mod task;

pub use error::{JobError, PartyError, SettleError, Stage, StoreStep, Veto, Violation};
pub use task::{LEASE_RENEW, LEASE_TTL, Launch, start};
