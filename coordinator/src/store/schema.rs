//! The database file: its schema, the migrations from older versions, and the one connection.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use prost::Message;
use rusqlite::{Connection, TransactionBehavior, params};

use super::error::StoreError;

/// The schema applied to a new database, version [`SCHEMA_VERSION`].
const SCHEMA: &str = include_str!("schema.sql");

/// Version of [`SCHEMA`]; recorded in the `schema_version` table.
pub const SCHEMA_VERSION: i64 = 8;

/// How long a statement waits for another connection's write lock before failing with "busy".
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Version 7's migration: decodes every stored PSI outcome and aggregate result and writes it
/// back, so the fields the protocol now reserves (a party's rows read, rejected, excluded and in
/// "(other)", which it used to report) are dropped: protobuf decoding skips them. A blob that
/// does not decode is left as it is (it could not be shown anyway).
fn scrub_party_figures(tx: &rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    use cleanroom_proto::v1::{AggregateResult, PsiOutcome};
    let outcomes: Vec<(String, String, Vec<u8>)> = tx
        .prepare("SELECT job_id, node, outcome FROM job_results")?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (job_id, node, bytes) in outcomes {
        if let Ok(outcome) = PsiOutcome::decode(bytes.as_slice()) {
            tx.execute(
                "UPDATE job_results SET outcome = ?3 WHERE job_id = ?1 AND node = ?2",
                params![job_id, node, outcome.encode_to_vec()],
            )?;
        }
    }
    let results: Vec<(String, Vec<u8>)> = tx
        .prepare("SELECT job_id, result FROM aggregate_results")?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (job_id, bytes) in results {
        if let Ok(result) = AggregateResult::decode(bytes.as_slice()) {
            tx.execute(
                "UPDATE aggregate_results SET result = ?2 WHERE job_id = ?1",
                params![job_id, result.encode_to_vec()],
            )?;
        }
    }
    Ok(())
}

/// The job store. Cheap operations on one SQLite connection behind a mutex; share it in an `Arc`.
#[derive(Debug)]
pub struct JobStore {
    conn: Mutex<Connection>,
}

impl JobStore {
    /// Opens (creating on first start) the SQLite database at `path`: WAL journal, foreign keys
    /// on, a busy timeout, and the schema of `schema.sql` applied if the database has none yet.
    /// A database with another schema version is refused ([`StoreError::UnsupportedSchema`]).
    pub fn open(path: &Path) -> Result<JobStore, StoreError> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // `journal_mode` answers with the mode in effect; WAL is a request, not a requirement
        // (some file systems cannot do it, and the store is correct without it).
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", true)?;

        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let has_version_table: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master \
             WHERE type = 'table' AND name = 'schema_version')",
            [],
            |row| row.get(0),
        )?;
        let mut migrated = false;
        let found: Option<i64> = if has_version_table {
            tx.query_row("SELECT MAX(version) FROM schema_version", [], |row| {
                row.get(0)
            })?
        } else {
            None
        };
        match found {
            None => {
                tx.execute_batch(SCHEMA)?;
                tx.execute(
                    "INSERT INTO schema_version (version) VALUES (?1)",
                    [SCHEMA_VERSION],
                )?;
            }
            Some(SCHEMA_VERSION) => {}
            // Versions 2 to 6 only added tables (schedules, schedule_runs; schedule_notify,
            // schedule_run_notified; job_leases; aggregate_results; aggregate_result_pages); the
            // schema script creates what is missing and leaves the rest untouched. Version 7
            // scrubs the parties' own row counts from what was stored before. Version 8 adds
            // audit_heads.
            Some(old @ 1..=7) => {
                tx.execute_batch(SCHEMA)?;
                if old < 7 {
                    scrub_party_figures(&tx)?;
                }
                tx.execute(
                    "INSERT INTO schema_version (version) VALUES (?1)",
                    [SCHEMA_VERSION],
                )?;
                migrated = old < 7;
            }
            Some(found) => {
                return Err(StoreError::UnsupportedSchema {
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
        }
        tx.commit()?;
        if migrated {
            // The scrubbed bytes must not linger in free pages.
            conn.execute_batch("VACUUM")?;
        }
        Ok(JobStore {
            conn: Mutex::new(conn),
        })
    }

    /// The connection. A panic while it was held leaves nothing half-done (an open transaction
    /// rolls back when dropped), so a poisoned lock is taken over rather than propagated.
    pub(super) fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
