//! Why a job store operation failed.

use cleanroom_proto::v1::JobState;

use super::state::state_name;

/// Why a job store operation failed. Messages are written for the analyst who will read them.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database itself failed (I/O, lock timeout, constraint, …).
    #[error("job store database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The analyst reused an idempotency key for a different spec.
    #[error(
        "idempotency key '{key}' was already used for job {job_id} with a different spec; \
         use a new key"
    )]
    IdempotencyConflict {
        /// The key the analyst sent.
        key: String,
        /// The job the key already belongs to.
        job_id: String,
    },
    /// The state machine does not allow this move; nothing was changed.
    #[error(
        "job {job_id} is {} and cannot move to {}",
        state_name(.from),
        state_name(.to)
    )]
    IllegalTransition {
        /// The job.
        job_id: String,
        /// Its current state.
        from: JobState,
        /// The state that was asked for.
        to: JobState,
    },
    /// No job has this id.
    #[error("no job with id '{0}'")]
    UnknownJob(String),
    /// A result was reported for a node that is not one of the job's parties; nothing was stored.
    #[error("node '{node}' is not a party of job {job_id}; its result was not stored")]
    NotAParty {
        /// The job.
        job_id: String,
        /// The node that is not in the job's spec.
        node: String,
    },
    /// Stored data of a job does not decode (a blob, or a state number outside the enum).
    #[error("stored data of job {job_id} is corrupt: {reason}")]
    Corrupt {
        /// The job whose row is corrupt.
        job_id: String,
        /// What failed to decode.
        reason: String,
    },
    /// The database was written by a coordinator with another schema version.
    #[error(
        "the job store database has schema version {found}, this coordinator supports only \
         version {supported}; use a matching coordinator version"
    )]
    UnsupportedSchema {
        /// Version recorded in the database.
        found: i64,
        /// Version this code writes and reads.
        supported: i64,
    },
    /// No live schedule has this name.
    #[error("no schedule named '{0}'; `cleanroom schedule list` shows the schedules")]
    UnknownSchedule(String),
    /// A live schedule already has this name.
    #[error("a schedule named '{0}' already exists; remove it first or choose another name")]
    ScheduleExists(String),
    /// The schedule asked for is not valid (name, cron expression, time zone, spec, policy).
    #[error("invalid schedule: {0}")]
    InvalidSchedule(String),
    /// Stored data of a schedule does not decode.
    #[error("stored data of schedule '{name}' is corrupt: {reason}")]
    CorruptSchedule {
        /// The schedule.
        name: String,
        /// What failed to decode.
        reason: String,
    },
    /// The operating system's random number generator failed while drawing a job id.
    #[error("could not draw a job id from the operating system's random number generator: {0}")]
    Randomness(String),
}
