//! The coordinator's endpoint: [`server`] (the QUIC server shell: connections, node control
//! sessions, the scheduler and the orphan sweep, graceful stop) and [`analyst`] (the analyst
//! API's requests, with [`analyst::answer`] the one entry point of every analyst request),
//! [`authz`] (who may see and do what: the one decision both the QUIC API and the web console
//! call) and [`web`] (the HTTPS console, JSON API, `/metrics` and `/healthz`, answering through
//! [`analyst::answer`] too). Nothing below imports this room, except the config, which reads
//! [`authz`]'s role types.

pub mod analyst;
pub mod authz;
pub mod server;
pub mod web;

pub use analyst::{DEFAULT_BACKOFF_SECS, schedule_info, schedule_info_notified, submit_scheduled};
pub use server::{ORPHANED_REASON, SHUTDOWN_REASON, serve};
