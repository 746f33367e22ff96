//! The node's privacy-budget ledger: every ε it charged, and every noised release it stored, in
//! one SQLite file (`<state_dir>/ledger.sqlite` unless the config sets `ledger`).
//!
//! It is the one source of truth for the budget: the node-wide `[budget]` and each agreement's
//! `budget_per_purpose` are both checked against the charges stored here, in sliding windows
//! `(now − period, now]` like the other rate limits. The audit log still records every release
//! (with its mechanism and ε), but the budget is no longer rebuilt from it.
//!
//! [`Ledger::charge_and_store`] is the only way to spend: in **one** `BEGIN IMMEDIATE`
//! transaction it returns the release already stored under the key (charging nothing), or checks
//! the caps, draws the release (the caller's closure: the noise), stores it with the charge and
//! commits. Noise is therefore drawn only inside the transaction that stores it: a crash before
//! the commit loses the draw *and* the charge together, and nothing drawn is ever used without
//! being stored first. Separate processes and connections serialise on SQLite's write lock, so
//! concurrent jobs cannot overspend.
//!
//! A release has two stored parts: what was drawn at charge time (`draw`) and, once the job has
//! computed it, what was released (`released`, written once by [`Ledger::settle`]: the first
//! value wins, so a duplicated job reports the identical number).
//!
//! Time is never read here: callers pass `now_ms`. Stored rows are read like peer input: a row
//! that does not decode is [`LedgerError::Corrupt`], never a panic.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{Budget, Period};

/// Version of the schema below; recorded in `schema_version`.
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS schema_version (
  version INTEGER NOT NULL PRIMARY KEY
);
-- One row per charge: the release it paid for, keyed so that a duplicated job finds it.
CREATE TABLE IF NOT EXISTS charges (
  release_key TEXT    NOT NULL PRIMARY KEY,
  job_id      TEXT    NOT NULL,
  partner     TEXT    NOT NULL,
  purpose     TEXT    NOT NULL,
  epsilon     REAL    NOT NULL CHECK (epsilon > 0),
  at_ms       INTEGER NOT NULL,
  -- JSON: what was drawn when the charge was made (e.g. this node's noise).
  draw        TEXT    NOT NULL,
  -- JSON: what the job released; NULL until the job settles it.
  released    TEXT
);
CREATE INDEX IF NOT EXISTS charges_by_time ON charges (at_ms);
CREATE INDEX IF NOT EXISTS charges_by_partner ON charges (partner, purpose, at_ms);
";

/// How long a write waits for another connection's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Slack when comparing sums of ε with a cap: decimal ε such as 0.1 are not exact in binary, and
/// ten charges of 0.1 must fit a budget of 1.
const EPSILON_SLACK: f64 = 1e-9;

/// Why a ledger operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// The database failed (I/O, lock timeout, not a database, …).
    #[error("privacy-budget ledger database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The charge would overspend a budget; nothing was drawn or charged. The text says what
    /// was spent, what remains and when it refreshes.
    #[error("{0}")]
    Refused(String),
    /// The release could not be drawn; nothing was charged. (The text names no data.)
    #[error("drawing the release failed: {0}")]
    Draw(String),
    /// A stored row does not decode.
    #[error("the privacy-budget ledger is corrupt at release {key}: {reason}")]
    Corrupt {
        /// The release key of the row.
        key: String,
        /// What failed to decode.
        reason: String,
    },
    /// The database was written by a node with another schema version.
    #[error(
        "the privacy-budget ledger has schema version {found}, this node supports only version \
         {supported}; use a matching node version"
    )]
    UnsupportedSchema {
        /// Version recorded in the database.
        found: i64,
        /// Version this code reads and writes.
        supported: i64,
    },
}

/// One charge: who pays, how much, and the caps it must fit.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    /// The job.
    pub job_id: String,
    /// The partner the job is with.
    pub partner: String,
    /// The job's purpose.
    pub purpose: String,
    /// ε this release costs (> 0).
    pub epsilon: f64,
    /// The agreement's cap per purpose with this partner, if any.
    pub purpose_cap: Option<Budget>,
    /// The node-wide cap, if any.
    pub node_cap: Option<Budget>,
}

/// What [`Ledger::charge_and_store`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored<T> {
    /// The release drawn now, or the one stored earlier under the same key.
    pub draw: T,
    /// True when it was drawn (and charged) by this call; false when it was already stored.
    pub fresh: bool,
}

/// ε spent in one window, for `cleanroom-node budget`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spend {
    /// ε charged in the window.
    pub spent: f64,
    /// Charges in the window.
    pub charges: u64,
    /// When the oldest charge in the window leaves it (Unix ms); `None` if nothing was spent.
    pub next_refresh_ms: Option<i64>,
}

/// The ledger. One connection behind a mutex; share it in an `Arc`. Other processes (the
/// `budget` command) may open the same file at the same time.
#[derive(Debug)]
pub struct Ledger {
    conn: Mutex<Connection>,
}

impl Ledger {
    /// Opens (creating on first use) the ledger at `path`: WAL journal, full sync, a busy
    /// timeout, and the schema applied if the database has none. A database with another schema
    /// version, or a file that is not a database, is an error.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let has_version_table: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master \
             WHERE type = 'table' AND name = 'schema_version')",
            [],
            |row| row.get(0),
        )?;
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
            Some(found) => {
                return Err(LedgerError::UnsupportedSchema {
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
        }
        tx.commit()?;
        Ok(Ledger {
            conn: Mutex::new(conn),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a release is stored under `release_key` (a duplicated job, which charges
    /// nothing).
    pub fn has(&self, release_key: &str) -> Result<bool, LedgerError> {
        let conn = self.lock();
        Ok(conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM charges WHERE release_key = ?1)",
            [release_key],
            |row| row.get(0),
        )?)
    }

    /// Checks, without charging, whether `charge` would fit its caps now (for deciding an offer:
    /// the binding check is the one inside [`Ledger::charge_and_store`]).
    pub fn check(&self, charge: &Charge, now_ms: i64) -> Result<(), LedgerError> {
        let conn = self.lock();
        check_caps(&conn, charge, now_ms)
    }

    /// Charges `charge` and stores the release `draw` makes, in one transaction; or, if a release
    /// is already stored under `release_key`, returns it and charges nothing (`fresh: false`).
    /// Refuses with [`LedgerError::Refused`] if the charge would overspend a cap; `draw` is then
    /// not called.
    pub fn charge_and_store<T, E>(
        &self,
        release_key: &str,
        charge: &Charge,
        now_ms: i64,
        draw: impl FnOnce() -> Result<T, E>,
    ) -> Result<Stored<T>, LedgerError>
    where
        T: Serialize + DeserializeOwned,
        E: std::fmt::Display,
    {
        if !(charge.epsilon.is_finite() && charge.epsilon > 0.0) {
            return Err(LedgerError::Refused(format!(
                "a charge must be a finite epsilon > 0, not {}",
                charge.epsilon
            )));
        }
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing: Option<String> = tx
            .query_row(
                "SELECT draw FROM charges WHERE release_key = ?1",
                [release_key],
                |row| row.get(0),
            )
            .optional()?;
        if let Some(text) = existing {
            return Ok(Stored {
                draw: decode(release_key, &text)?,
                fresh: false,
            });
        }
        check_caps(&tx, charge, now_ms)?;
        let value = draw().map_err(|e| LedgerError::Draw(e.to_string()))?;
        let text = serde_json::to_string(&value).map_err(|e| LedgerError::Draw(e.to_string()))?;
        tx.execute(
            "INSERT INTO charges (release_key, job_id, partner, purpose, epsilon, at_ms, draw) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                release_key,
                charge.job_id,
                charge.partner,
                charge.purpose,
                charge.epsilon,
                now_ms,
                text
            ],
        )?;
        tx.commit()?;
        Ok(Stored {
            draw: value,
            fresh: true,
        })
    }

    /// Records what the job under `release_key` released, unless something is recorded
    /// already; returns the recorded value (the first one wins, so a duplicated job releases the
    /// identical value). The key must have been charged.
    pub fn settle<T>(&self, release_key: &str, released: &T) -> Result<T, LedgerError>
    where
        T: Serialize + DeserializeOwned,
    {
        let text = serde_json::to_string(released).map_err(|e| LedgerError::Draw(e.to_string()))?;
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row: Option<Option<String>> = tx
            .query_row(
                "SELECT released FROM charges WHERE release_key = ?1",
                [release_key],
                |row| row.get(0),
            )
            .optional()?;
        let stored = match row {
            None => {
                return Err(LedgerError::Corrupt {
                    key: release_key.to_owned(),
                    reason: "a release was settled that was never charged".into(),
                });
            }
            Some(Some(stored)) => stored,
            Some(None) => {
                tx.execute(
                    "UPDATE charges SET released = ?2 WHERE release_key = ?1",
                    params![release_key, text],
                )?;
                text
            }
        };
        tx.commit()?;
        decode(release_key, &stored)
    }

    /// ε charged in the window `(now − period, now]`, by everyone (`partner = None`) or by one
    /// partner and purpose.
    pub fn spent(
        &self,
        scope: Option<(&str, &str)>,
        period: Period,
        now_ms: i64,
    ) -> Result<Spend, LedgerError> {
        let conn = self.lock();
        let charges = window(&conn, scope, period, now_ms)?;
        Ok(Spend {
            spent: charges.iter().map(|(_, e)| e).sum(),
            charges: charges.len() as u64,
            next_refresh_ms: charges.first().map(|(t, _)| t + period.millis()),
        })
    }

    /// Every (partner, purpose) that was ever charged, sorted.
    pub fn scopes(&self) -> Result<Vec<(String, String)>, LedgerError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT DISTINCT partner, purpose FROM charges ORDER BY partner, purpose")?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn decode<T: DeserializeOwned>(key: &str, text: &str) -> Result<T, LedgerError> {
    serde_json::from_str(text).map_err(|e| LedgerError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// The charges (time, ε) in `(now − period, now]`, oldest first. Charges stamped in the future
/// count (clock skew must not free budget).
fn window(
    conn: &Connection,
    scope: Option<(&str, &str)>,
    period: Period,
    now_ms: i64,
) -> Result<Vec<(i64, f64)>, LedgerError> {
    let since = now_ms.saturating_sub(period.millis());
    let map = |row: &rusqlite::Row<'_>| Ok((row.get::<_, i64>(0)?, row.get::<_, f64>(1)?));
    let rows: Vec<(i64, f64)> = match scope {
        None => conn
            .prepare("SELECT at_ms, epsilon FROM charges WHERE at_ms > ?1 ORDER BY at_ms")?
            .query_map([since], map)?
            .collect::<Result<_, _>>()?,
        Some((partner, purpose)) => conn
            .prepare(
                "SELECT at_ms, epsilon FROM charges \
                 WHERE partner = ?1 AND purpose = ?2 AND at_ms > ?3 ORDER BY at_ms",
            )?
            .query_map(params![partner, purpose, since], map)?
            .collect::<Result<_, _>>()?,
    };
    if let Some((at, e)) = rows.iter().find(|(_, e)| !(e.is_finite() && *e > 0.0)) {
        return Err(LedgerError::Corrupt {
            key: format!("(charged at {at})"),
            reason: format!("epsilon {e} is not a finite number > 0"),
        });
    }
    Ok(rows)
}

fn check_caps(conn: &Connection, charge: &Charge, now_ms: i64) -> Result<(), LedgerError> {
    let caps = [
        (
            charge.purpose_cap.as_ref(),
            Some((charge.partner.as_str(), charge.purpose.as_str())),
        ),
        (charge.node_cap.as_ref(), None),
    ];
    for (cap, scope) in caps {
        let Some(cap) = cap else { continue };
        let charges = window(conn, scope, cap.period, now_ms)?;
        let spent: f64 = charges.iter().map(|(_, e)| e).sum();
        let limit = cap.epsilon_per_period.get();
        if spent + charge.epsilon <= limit + EPSILON_SLACK {
            continue;
        }
        // Sliding window: the budget refreshes when enough old charges have left it.
        let mut left = spent;
        let refresh = charges
            .iter()
            .find(|(_, e)| {
                left -= e;
                left + charge.epsilon <= limit + EPSILON_SLACK
            })
            .map(|(t, _)| t + cap.period.millis());
        let whose = match scope {
            Some((partner, purpose)) => {
                format!("privacy budget for purpose '{purpose}' with {partner}")
            }
            None => "node-wide privacy budget".to_owned(),
        };
        return Err(LedgerError::Refused(format!(
            "{whose} exhausted: {} of {} per {} spent, {} remains, this job needs {}; {}",
            show(spent),
            show(limit),
            cap.period,
            show((limit - spent).max(0.0)),
            show(charge.epsilon),
            match refresh {
                Some(t) => format!("enough refreshes at {}", show_time(t)),
                None => "it never suffices".to_owned(),
            }
        )));
    }
    Ok(())
}

/// ε for people: at most 6 decimals, no trailing zeros (`0.30000000000000004` → `0.3`).
pub fn show(epsilon: f64) -> String {
    let text = format!("{epsilon:.6}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".to_owned()
    } else {
        text.to_owned()
    }
}

/// A Unix-ms time as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn show_time(ms: i64) -> String {
    format!("{}Z", crate::audit::format_ms(ms).replacen(' ', "T", 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Epsilon;
    use std::sync::{Arc, Barrier};

    const DAY: i64 = 86_400_000;
    const NOW: i64 = 1_782_864_000_000;

    fn cap(epsilon: f64, period: Period) -> Budget {
        Budget {
            epsilon_per_period: Epsilon::new(epsilon).unwrap(),
            period,
        }
    }

    fn charge(job: &str, epsilon: f64) -> Charge {
        Charge {
            job_id: job.into(),
            partner: "globex".into(),
            purpose: "reporting".into(),
            epsilon,
            purpose_cap: Some(cap(1.0, Period::Day)),
            node_cap: None,
        }
    }

    fn noise(n: i64) -> impl FnOnce() -> Result<i64, String> {
        move || Ok(n)
    }

    #[test]
    fn fifty_concurrent_charges_of_a_tenth_against_one_exactly_ten_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        Ledger::open(&path).unwrap();
        let start = Arc::new(Barrier::new(50));
        let threads: Vec<_> = (0..50)
            .map(|i| {
                let path = path.clone();
                let start = start.clone();
                std::thread::spawn(move || {
                    // Separate connections, as separate jobs (or processes) would have.
                    let ledger = Ledger::open(&path).unwrap();
                    start.wait();
                    ledger.charge_and_store(
                        &format!("job-{i}"),
                        &charge(&format!("job-{i}"), 0.1),
                        NOW,
                        noise(i),
                    )
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 10, "{results:?}");
        for r in &results {
            match r {
                Ok(s) => assert!(s.fresh),
                Err(LedgerError::Refused(msg)) => {
                    assert!(
                        msg.contains("exhausted: 1 of 1 per day spent, 0 remains"),
                        "{msg}"
                    )
                }
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        let ledger = Ledger::open(&path).unwrap();
        let spend = ledger
            .spent(Some(("globex", "reporting")), Period::Day, NOW)
            .unwrap();
        assert_eq!(spend.charges, 10);
        assert!((spend.spent - 1.0).abs() < 1e-9);
    }

    #[test]
    fn same_key_returns_the_stored_release_and_charges_once() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
        let first = ledger
            .charge_and_store("k", &charge("job-1", 0.5), NOW, noise(7))
            .unwrap();
        assert_eq!(
            first,
            Stored {
                draw: 7,
                fresh: true
            }
        );
        assert!(ledger.has("k").unwrap() && !ledger.has("other").unwrap());
        let mut drawn = false;
        let again = ledger
            .charge_and_store("k", &charge("job-1", 0.5), NOW + 1, || {
                drawn = true;
                Ok::<i64, String>(-3)
            })
            .unwrap();
        assert_eq!(
            again,
            Stored {
                draw: 7,
                fresh: false
            }
        );
        assert!(!drawn, "a stored release must not draw again");
        let spend = ledger.spent(None, Period::Day, NOW + 1).unwrap();
        assert_eq!((spend.spent, spend.charges), (0.5, 1));
        // The first settled value wins.
        assert_eq!(ledger.settle("k", &100u64).unwrap(), 100);
        assert_eq!(ledger.settle("k", &999u64).unwrap(), 100);
        assert!(matches!(
            ledger.settle("never-charged", &1u64),
            Err(LedgerError::Corrupt { .. })
        ));
    }

    #[test]
    fn refusal_says_spent_remaining_and_refresh_and_draws_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
        ledger
            .charge_and_store("a", &charge("job-a", 0.25), NOW - 3_600_000, noise(1))
            .unwrap();
        ledger
            .charge_and_store("b", &charge("job-b", 0.5), NOW, noise(1))
            .unwrap();
        let mut drawn = false;
        let err = ledger
            .charge_and_store("c", &charge("job-c", 0.5), NOW, || {
                drawn = true;
                Ok::<i64, String>(0)
            })
            .unwrap_err();
        assert!(!drawn);
        assert_eq!(
            err.to_string(),
            format!(
                "privacy budget for purpose 'reporting' with globex exhausted: 0.75 of 1 per day \
                 spent, 0.25 remains, this job needs 0.5; enough refreshes at {}",
                show_time(NOW - 3_600_000 + DAY)
            )
        );
        assert!(ledger.check(&charge("job-c", 0.25), NOW).is_ok());
        // Another purpose has its own budget.
        let mut other = charge("job-d", 0.5);
        other.purpose = "audit".into();
        assert!(ledger.charge_and_store("d", &other, NOW, noise(0)).is_ok());
    }

    #[test]
    fn node_wide_cap_counts_every_partner() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
        let mut c = charge("job-1", 0.75);
        c.purpose_cap = None;
        c.node_cap = Some(cap(1.0, Period::Week));
        ledger.charge_and_store("1", &c, NOW, noise(0)).unwrap();
        c.partner = "initech".into();
        let err = ledger.charge_and_store("2", &c, NOW, noise(0)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("node-wide privacy budget exhausted: 0.75 of 1 per week spent"),
            "{err}"
        );
        // Six days later still in the week's window; eight days later it has left.
        assert!(ledger.check(&c, NOW + 6 * DAY).is_err());
        assert!(ledger.check(&c, NOW + 8 * DAY).is_ok());
    }

    #[test]
    fn budget_refreshes_per_period() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
        ledger
            .charge_and_store("1", &charge("job-1", 1.0), NOW, noise(0))
            .unwrap();
        assert!(ledger.check(&charge("job-2", 0.1), NOW + DAY - 1).is_err());
        // A charge exactly one period old has left the window.
        assert!(ledger.check(&charge("job-2", 0.1), NOW + DAY).is_ok());
        let spend = ledger
            .spent(Some(("globex", "reporting")), Period::Day, NOW + 10)
            .unwrap();
        assert_eq!(spend.next_refresh_ms, Some(NOW + DAY));
        // A charge stamped in the future (clock skew) still counts.
        ledger
            .charge_and_store("2", &charge("job-2", 1.0), NOW + 2 * DAY + 5000, noise(0))
            .unwrap();
        assert!(ledger.check(&charge("job-3", 0.1), NOW + 2 * DAY).is_err());
    }

    #[test]
    fn spend_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        {
            let ledger = Ledger::open(&path).unwrap();
            ledger
                .charge_and_store("k", &charge("job-1", 0.75), NOW, noise(-4))
                .unwrap();
            ledger.settle("k", &"released".to_owned()).unwrap();
        }
        let ledger = Ledger::open(&path).unwrap();
        let spend = ledger
            .spent(Some(("globex", "reporting")), Period::Day, NOW)
            .unwrap();
        assert_eq!((spend.spent, spend.charges), (0.75, 1));
        assert!(ledger.check(&charge("job-2", 0.5), NOW).is_err());
        let again = ledger
            .charge_and_store("k", &charge("job-1", 0.75), NOW, noise(9))
            .unwrap();
        assert_eq!(
            again,
            Stored {
                draw: -4,
                fresh: false
            }
        );
        assert_eq!(ledger.settle("k", &"other".to_owned()).unwrap(), "released");
        assert_eq!(
            ledger.scopes().unwrap(),
            [("globex".to_owned(), "reporting".to_owned())]
        );
    }

    #[test]
    fn failed_draw_charges_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
        let err = ledger
            .charge_and_store("k", &charge("job-1", 0.5), NOW, || {
                Err::<i64, _>("random source failed")
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "drawing the release failed: random source failed"
        );
        assert_eq!(ledger.spent(None, Period::Day, NOW).unwrap().charges, 0);
        assert!(
            ledger
                .charge_and_store("k", &charge("job-1", 0.5), NOW, noise(1))
                .unwrap()
                .fresh
        );
    }

    #[test]
    fn corrupt_or_newer_databases_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        // Not a database at all.
        let junk = dir.path().join("junk.sqlite");
        std::fs::write(&junk, b"this is not an SQLite database, just bytes........").unwrap();
        assert!(matches!(Ledger::open(&junk), Err(LedgerError::Sqlite(_))));
        // A newer schema.
        let newer = dir.path().join("newer.sqlite");
        Ledger::open(&newer).unwrap();
        Connection::open(&newer)
            .unwrap()
            .execute("INSERT INTO schema_version (version) VALUES (99)", [])
            .unwrap();
        let err = Ledger::open(&newer).unwrap_err();
        assert!(err.to_string().contains("schema version 99"), "{err}");
        // A row whose stored release does not decode, and an ε that is not a number > 0.
        let bad = dir.path().join("bad.sqlite");
        let ledger = Ledger::open(&bad).unwrap();
        ledger
            .charge_and_store("k", &charge("job-1", 0.5), NOW, noise(1))
            .unwrap();
        let raw = Connection::open(&bad).unwrap();
        raw.execute("UPDATE charges SET draw = '{not json'", [])
            .unwrap();
        assert!(matches!(
            ledger.charge_and_store("k", &charge("job-1", 0.5), NOW, noise(1)),
            Err(LedgerError::Corrupt { .. })
        ));
        raw.execute("PRAGMA ignore_check_constraints = ON", [])
            .unwrap();
        raw.execute("UPDATE charges SET epsilon = -1", []).unwrap();
        assert!(matches!(
            ledger.check(&charge("job-2", 0.1), NOW),
            Err(LedgerError::Corrupt { .. })
        ));
        raw.execute("UPDATE charges SET epsilon = 'lots'", [])
            .unwrap();
        assert!(ledger.check(&charge("job-2", 0.1), NOW).is_err());
    }

    #[test]
    fn epsilon_display() {
        assert_eq!(show(0.1 + 0.2), "0.3");
        assert_eq!(show(1.0), "1");
        assert_eq!(show(0.0), "0");
        assert_eq!(show(0.125), "0.125");
    }
}
