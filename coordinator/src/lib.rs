//! The cleanroom coordinator.
//!
//! It keeps the registry of connected nodes, the job store (SQLite), runs jobs by *offering* them
//! to the nodes named in them, and serves the analyst API. It never sees records, keys, blinded
//! identifiers or shares — only job metadata and the outcomes nodes choose to report.
//!
//! - [`config`]: the coordinator's TOML config;
//! - [`store`]: the SQLite job store (states, history, results, node registry);
//! - [`registry`]: the live control connections of nodes;
//! - [`runner`]: one job from offer to result;
//! - [`server`]: the QUIC endpoint: node control sessions and analyst requests;
//! - [`client`]: the analyst side of the API, used by the CLI, the demo and the tests;
//! - [`spec`]: validation of job specs submitted by analysts;
//! - [`clock`]: the clock behind the scheduler (a settable one for tests);
//! - [`cron`]: cron expressions in IANA time zones;
//! - [`schedule`]: recurring jobs: the sans-IO planner and the scheduler loop;
//! - [`report`]: a schedule's history as HTML (trend chart, runs table), CSV and JSON;
//! - [`sum_result`]: the two reports of an overlap-sum, checked against each other and stored;
//! - [`untrusted`]: bounding and defusing the text nodes send (refusal and failure reasons).
#![warn(missing_docs)]

pub mod aggregate_runner;
pub mod client;
pub mod clock;
pub mod config;
pub mod cron;
pub mod error;
pub mod registry;
pub mod report;
pub mod runner;
pub mod schedule;
pub mod server;
pub mod spec;
pub mod store;
pub mod sum_result;
pub mod untrusted;

pub use client::AnalystClient;
pub use config::CoordinatorConfig;
pub use error::CoordinatorError;
pub use server::serve;

/// Milliseconds since the Unix epoch, the coordinator's one clock read.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
