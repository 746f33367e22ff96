//! The cleanroom coordinator.
//!
//! It keeps the registry of connected nodes, the job store (SQLite), runs jobs by *offering* them
//! to the nodes named in them, and serves the analyst API. It never sees records, keys, blinded
//! identifiers or shares — only job metadata and the outcomes nodes choose to report.
//!
//! Rooms, from the bottom up (a module imports only modules above it in this list, never one
//! below, so the crate has no import circles):
//! - leaves: [`clock`] (the clock behind the scheduler, a settable one for tests, and
//!   [`now_ms`]), [`cron`] (cron expressions in IANA time zones), [`spec`] (validation of the
//!   job specs analysts submit), [`untrusted`] (bounding and defusing the text nodes send),
//!   [`registry`] (the live control connections of nodes);
//! - [`store`]: the SQLite job store (schema and migrations, jobs, results, schedules and their
//!   runs, leases);
//! - [`error`] and [`config`]: the coordinator's errors and its TOML config;
//! - [`report`]: a schedule's history as data, sent to analysts as JSON;
//! - [`shared`]: what the coordinator's tasks share (config, store, registry, lease holder);
//! - [`run`]: one job from offer to result: the pipeline every kind goes through, and one
//!   `settle` per kind;
//! - [`schedule`]: recurring jobs: the sans-IO planner, the scheduler loop, notifications;
//! - [`metrics`]: the Prometheus metrics (a leaf);
//! - [`api`]: the QUIC endpoint: node control sessions, the analyst API, the orphan sweep; and
//!   the HTTPS web console, JSON API, `/metrics` and `/healthz` (`api::web`);
//! - [`client`]: the analyst side of the API, used by the CLI, the demo and the tests.
//!
//! Static reports (HTML files, CSV) are the CLI's business: the QUIC API sends data. The web
//! console renders its own pages (`api::web`).
#![warn(missing_docs)]

pub mod api;
pub mod client;
pub mod clock;
pub mod config;
pub mod cron;
pub mod error;
pub mod metrics;
pub mod registry;
pub mod report;
pub mod run;
pub mod schedule;
pub mod shared;
pub mod spec;
pub mod store;
pub mod untrusted;

#[cfg(test)]
mod test_support;

pub use api::serve;
pub use client::AnalystClient;
pub use clock::now_ms;
pub use config::CoordinatorConfig;
pub use error::CoordinatorError;
