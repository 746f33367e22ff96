//! A partner's cleanroom node.
//!
//! The node holds the partner's datasets and its agreement with each partner. It dials the
//! coordinator for control (outbound only) and listens on a QUIC endpoint for the data plane with
//! other nodes. The coordinator can *offer* a job; the node decides, against its own agreement
//! and the peer's certificate identity, whether its data takes part.
//!
//! Rooms (each depends only on the ones listed before it):
//! - [`clock`]: Unix milliseconds and the calendar text the node prints;
//! - [`audit`]: the hash-chained audit log (event schema, chain format, writer, verifier);
//! - [`ledger`]: the persistent privacy-budget ledger and the caps it enforces;
//! - [`data`]: datasets, normalisers, consent and deletion filters, retention;
//! - [`spec`]: how every room names a job (spec digest, release key, computation name);
//! - [`policy`]: the agreement as code (the TOML schema, typed allow entries, each kind's offer
//!   check);
//! - [`error`]: the node's errors, and a job's ([`error::JobError`]), typed to the edge;
//! - [`metrics`]: the node's Prometheus metrics, fed by the audit log's appends;
//! - [`dataplane`]: the data-plane endpoint, which hands incoming connections to waiting jobs;
//! - [`state`]: what the node's tasks share (policy, audit log, ledger, run history);
//! - [`job`]: the job wing — the async driver of a job's lifecycle, and the sans-IO protocols
//!   it runs (`overlap` and `match` so far; see `job` for the others);
//! - [`control`]: the control session with the coordinator;
//! - [`dashboard`]: the privacy dashboard for the partner's privacy officer, with `/metrics`
//!   and `/healthz`, on the loopback address of `[dashboard] listen`;
//! - [`run`](mod@run), [`cli`]: running a node, and the `cleanroom-node` commands.
#![warn(missing_docs)]

pub mod audit;
pub mod cli;
pub mod clock;
pub mod control;
pub mod dashboard;
pub mod data;
pub mod dataplane;
pub mod error;
pub mod job;
pub mod kind;
pub mod ledger;
pub mod metrics;
pub mod pin;
pub mod policy;
pub mod run;
pub mod spec;
pub mod state;
#[cfg(test)]
mod test_fixtures;

pub use error::NodeError;
pub use policy::NodeConfig;
pub use run::{preflight, run, run_from};
