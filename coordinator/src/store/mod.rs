//! The coordinator's job store: jobs, their state history, per-party results and the node
//! registry, in one SQLite database (DESIGN §7).
//!
//! What is stored:
//! - each job's [`JobSpec`] as its protobuf encoding, next to a few columns to query and order by
//!   (kind, state, submitter, idempotency key, times);
//! - every state a job entered, with the time and the reason, in order — the first entry is the
//!   submission itself;
//! - what each party reported ([`PsiOutcome`], protobuf bytes), one per node;
//! - the last hello of each node;
//! - recurring jobs ([`ScheduleRecord`]) and every run of them ([`ScheduleRun`]): which
//!   occurrence, which attempt, which job — or that the occurrence was skipped;
//! - the lease of every job a coordinator process is executing (see [`lease`]);
//! - every signed audit head a node reported, once its signature checks ([`heads`]).
//!
//! Jobs follow the state machine `pending → offered → running → succeeded | failed | vetoed |
//! cancelled` (see [`transition_allowed`]); every change is one transaction that reads the
//! current state, updates it and appends to the history, so a crash never leaves a state without
//! its history row. Write transactions are `BEGIN IMMEDIATE`, so two processes sharing the file
//! serialise (with a busy timeout) instead of failing mid-transaction.
//!
//! Time is never read here: callers pass `now_ms` (Unix milliseconds), so tests and the server's
//! clock decide. Stored bytes are treated like bytes from a peer: a blob that does not decode,
//! or a state number outside the enum, is [`StoreError::Corrupt`], never a panic.
//!
//! Every operation is a short, blocking SQLite call behind a mutex; from async code call it from
//! `tokio::task::spawn_blocking` (or accept the brief block).
//!
//! The rooms: [`schema`] (the file, its schema and migrations, the connection), [`state`] (the
//! job state machine), [`jobs`] (submission, transitions, the analyst's view, the node
//! registry), [`results`] (what parties reported, aggregate results in pages), [`schedules`]
//! and [`runs`] (recurring jobs and their runs), [`lease`] (which process runs which job).
//! Each is an `impl JobStore` block on the one connection of [`schema`]; none imports this
//! module, only its siblings.

mod error;
mod heads;
mod jobs;
mod lease;
mod results;
mod runs;
mod schedules;
mod schema;
mod state;
#[cfg(test)]
mod tests;

pub use error::StoreError;
pub use heads::HeadVerdict;
pub use jobs::{JobFilter, MAX_LIST_LIMIT, NodeRecord, Submitted};
pub use lease::{LeaseHolder, OrphanedJob};
pub use results::{
    MAX_INLINE_RESULT_BYTES, MAX_PAGE_BYTES, MAX_PAGE_GROUPS, STORE_PAGE_GROUPS, releases_nothing,
};
pub use runs::{EndedRun, RunStatus, ScheduleNotify, ScheduleRun};
pub use schedules::{
    MAX_RETRIES_LIMIT, MAX_SCHEDULE_NAME, NewSchedule, ScheduleRecord, validate_schedule_name,
};
pub use schema::{JobStore, SCHEMA_VERSION};
pub use state::{is_terminal, state_name, transition_allowed};
