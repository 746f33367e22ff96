//! The node's privacy-budget ledger: every privacy loss it charged, in one SQLite file
//! (`<state_dir>/ledger.sqlite` unless the config sets `ledger`).
//!
//! It is the one source of truth for the budget: the node-wide `[budget]` and each agreement's
//! `budget_per_purpose` are both checked against the charges stored here, in sliding windows
//! `(now − period, now]` like the other rate limits, and over the ledger's whole life for an
//! `epsilon_lifetime` cap. The audit log still records every release (with its mechanism and
//! ε), but the budget is not rebuilt from it.
//!
//! # Two kinds of charge, one account
//!
//! A discrete Laplace release (`overlap`, `overlap-sum`) is pure ε-DP and charges its ε. A
//! discrete Gaussian release (`aggregate`) is ρ-zCDP and charges its ρ. A cap is an ε at the
//! node's stated δ (`dp_delta`), and the spend in a scope is the composition of everything in
//! it, by Rényi DP (Mironov 2017): a pure ε-DP release is (α, ε)-RDP for every α, a ρ-zCDP one
//! is (α, αρ)-RDP, RDP composes by addition, and (α, r)-RDP gives (r + ln(1/δ)/(α − 1), δ)-DP.
//! With `E` the sum of the pure ε and `R` the sum of the ρ, minimising over α:
//!
//! ```text
//! spent = E + R + 2·√(R·ln(1/δ))        (just E when R = 0: pure ε-DP, δ = 0)
//! ```
//!
//! ([`epsilon_at`]). So ρ composes as ρ (sub-linearly in ε) and Laplace charges keep their
//! exact pure-ε meaning.
//!
//! # Charging
//!
//! [`Ledger::charge_and_draw`] is the only way to spend: in **one** `BEGIN IMMEDIATE`
//! transaction it refuses a release key that was ever charged ([`LedgerError::AlreadyCharged`]:
//! the data under a repeated job may have changed, so a release is never repeated), checks the
//! caps, calls the caller's closure (which draws the noise) and records the charge; a failed
//! draw charges nothing. The noise itself is **never stored**: a leaked ledger must not turn a
//! released value back into the exact one. Separate processes and connections serialise on
//! SQLite's write lock, so concurrent jobs cannot overspend.
//!
//! Once the job has computed it, what was released (a value the coordinator received anyway)
//! is written once by [`Ledger::settle`].
//!
//! Time is never read here: callers pass `now_ms`. Stored rows are read like peer input: a row
//! that does not decode is [`LedgerError::Corrupt`], never a panic.
//!
//! # Schema versions
//!
//! Version 1 stored each release's noise draw and charged an aggregate's zCDP ε as if it were a
//! pure ε. Opening a version-1 ledger migrates it in place (one transaction): the draws are
//! dropped, an `aggregate:` charge of ε becomes a charge of ρ = ε²/2, and the file is vacuumed
//! so the dropped draws do not linger in free pages.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

mod caps;

pub use caps::{Budget, DEFAULT_DP_DELTA, Delta, Epsilon, MAX_DP_DELTA, Period};

/// Version of the schema below; recorded in `schema_version`.
pub const SCHEMA_VERSION: i64 = 2;

const CHARGES_V2: &str = "
CREATE TABLE IF NOT EXISTS charges (
  release_key TEXT    NOT NULL PRIMARY KEY,
  job_id      TEXT    NOT NULL,
  partner     TEXT    NOT NULL,
  purpose     TEXT    NOT NULL,
  -- Pure ε of a discrete Laplace release (0 for a Gaussian one).
  epsilon     REAL    NOT NULL CHECK (epsilon >= 0),
  -- zCDP ρ of a discrete Gaussian release (0 for a Laplace one).
  rho         REAL    NOT NULL CHECK (rho >= 0),
  at_ms       INTEGER NOT NULL,
  -- JSON: what the job released; NULL until the job settles it. Never the noise.
  released    TEXT,
  CHECK (epsilon > 0 OR rho > 0)
);
CREATE INDEX IF NOT EXISTS charges_by_time ON charges (at_ms);
CREATE INDEX IF NOT EXISTS charges_by_partner ON charges (partner, purpose, at_ms);
";

const SCHEMA_VERSION_TABLE: &str = "
CREATE TABLE IF NOT EXISTS schema_version (
  version INTEGER NOT NULL PRIMARY KEY
);
";

/// Version 1 → 2: a new `charges` table without the `draw` column, ρ beside ε, and the
/// aggregate charges (zCDP ε) converted to ρ = ε²/2.
const MIGRATE_1_TO_2: &str = "
ALTER TABLE charges RENAME TO charges_v1;
DROP INDEX IF EXISTS charges_by_time;
DROP INDEX IF EXISTS charges_by_partner;
";

const COPY_1_TO_2: &str = "
INSERT INTO charges (release_key, job_id, partner, purpose, epsilon, rho, at_ms, released)
  SELECT release_key, job_id, partner, purpose,
         CASE WHEN release_key LIKE 'aggregate:%' THEN 0 ELSE epsilon END,
         CASE WHEN release_key LIKE 'aggregate:%' THEN epsilon * epsilon / 2 ELSE 0 END,
         at_ms, released
  FROM charges_v1;
DROP TABLE charges_v1;
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
    /// The release key was charged before: a release is never repeated (the data under it may
    /// have changed since, and new noise over new data beside the old release, or old noise over
    /// new data, would give the difference away). Nothing was drawn or charged.
    #[error(
        "job {job_id}'s release was already charged (at {}); a release is never repeated, since \
         the data under it may have changed; retry it as a new job with `cleanroom job retry \
         {job_id}`",
        show_time(*at_ms)
    )]
    AlreadyCharged {
        /// The job that was charged.
        job_id: String,
        /// When (Unix ms).
        at_ms: i64,
    },
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

/// The privacy loss of one release.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Loss {
    /// Pure ε-DP (discrete Laplace).
    Epsilon(f64),
    /// ρ-zCDP (discrete Gaussian).
    Rho(f64),
}

impl Loss {
    fn parts(self) -> (f64, f64) {
        match self {
            Loss::Epsilon(e) => (e, 0.0),
            Loss::Rho(r) => (0.0, r),
        }
    }
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Loss::Epsilon(e) => write!(f, "ε {}", show(*e)),
            Loss::Rho(r) => write!(f, "zCDP ρ {}", show(*r)),
        }
    }
}

/// One charge: who pays, how much, and the caps it must fit.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    /// The job.
    pub job_id: String,
    /// The partner the job is with (an aggregate's peers, joined with `,`).
    pub partner: String,
    /// The job's purpose.
    pub purpose: String,
    /// What this release costs.
    pub loss: Loss,
    /// The agreements' caps per purpose with this partner (an aggregate: every agreement
    /// involved); each must hold.
    pub purpose_caps: Vec<Budget>,
    /// The node-wide cap, if any.
    pub node_cap: Option<Budget>,
    /// The node's δ, at which caps are read (`dp_delta`).
    pub delta: f64,
}

/// ε at δ of pure-ε releases summing to `epsilon` composed with zCDP releases summing to `rho`
/// (see the module docs): `epsilon + rho + 2·√(rho·ln(1/δ))`, or `epsilon` when `rho` is 0.
pub fn epsilon_at(epsilon: f64, rho: f64, delta: f64) -> f64 {
    if rho <= 0.0 {
        return epsilon;
    }
    epsilon + rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt()
}

/// What was spent in a scope (a window, or the ledger's whole life), for `cleanroom-node budget`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spend {
    /// The composed spend, ε at the node's δ ([`epsilon_at`]).
    pub spent: f64,
    /// Sum of the pure ε charges.
    pub epsilon: f64,
    /// Sum of the zCDP ρ charges.
    pub rho: f64,
    /// Charges in the scope.
    pub charges: u64,
    /// When the oldest charge in the window leaves it (Unix ms); `None` if nothing was spent or
    /// the scope is the whole life.
    pub next_refresh_ms: Option<i64>,
}

/// The ledger. One connection behind a mutex; share it in an `Arc`. Other processes (the
/// `budget` command) may open the same file at the same time.
#[derive(Debug)]
pub struct Ledger {
    conn: Mutex<Connection>,
}

/// Records that the ledger's tables are now at [`SCHEMA_VERSION`].
fn record_schema_version(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<usize> {
    tx.execute(
        "INSERT INTO schema_version (version) VALUES (?1)",
        [SCHEMA_VERSION],
    )
}

impl Ledger {
    /// Opens (creating on first use) the ledger at `path`: WAL journal, full sync, a busy
    /// timeout, and the schema applied if the database has none; a version-1 ledger is migrated
    /// (see the module docs). A database with another schema version, or a file that is not a
    /// database, is an error.
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
        let mut migrated = false;
        match found {
            None => {
                tx.execute_batch(SCHEMA_VERSION_TABLE)?;
                tx.execute_batch(CHARGES_V2)?;
                record_schema_version(&tx)?;
            }
            Some(1) => {
                tx.execute_batch(MIGRATE_1_TO_2)?;
                tx.execute_batch(CHARGES_V2)?;
                tx.execute_batch(COPY_1_TO_2)?;
                record_schema_version(&tx)?;
                migrated = true;
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
        if migrated {
            // The dropped draws must not survive in free pages or in the write-ahead log.
            conn.execute_batch("VACUUM")?;
            let _: (i64, i64, i64) =
                conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })?;
            tracing::info!("privacy-budget ledger migrated from schema version 1 to 2");
        }
        Ok(Ledger {
            conn: Mutex::new(conn),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks, without charging, whether `charge` could be made now under `release_key`: the
    /// key was never charged, and the charge fits its caps (for deciding an offer: the binding
    /// check is the one inside [`Ledger::charge_and_draw`]).
    pub fn check(
        &self,
        release_key: &str,
        charge: &Charge,
        now_ms: i64,
    ) -> Result<(), LedgerError> {
        let conn = self.lock();
        check_new(&conn, release_key)?;
        check_caps(&conn, charge, now_ms)
    }

    /// Charges `charge` under `release_key` and calls `draw` (which draws the noise), in one
    /// transaction, and returns what `draw` made; the draw is **not** stored. Refuses with
    /// [`LedgerError::AlreadyCharged`] if the key was ever charged, and with
    /// [`LedgerError::Refused`] if the charge would overspend a cap; `draw` is then not called.
    /// If `draw` fails, nothing is charged.
    pub fn charge_and_draw<T, E>(
        &self,
        release_key: &str,
        charge: &Charge,
        now_ms: i64,
        draw: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, LedgerError>
    where
        E: std::fmt::Display,
    {
        let (epsilon, rho) = charge.loss.parts();
        if !(epsilon.is_finite() && rho.is_finite() && epsilon >= 0.0 && rho >= 0.0)
            || epsilon + rho <= 0.0
        {
            return Err(LedgerError::Refused(format!(
                "a charge must be a finite loss > 0, not {}",
                charge.loss
            )));
        }
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        check_new(&tx, release_key)?;
        check_caps(&tx, charge, now_ms)?;
        let value = draw().map_err(|e| LedgerError::Draw(e.to_string()))?;
        tx.execute(
            "INSERT INTO charges (release_key, job_id, partner, purpose, epsilon, rho, at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                release_key,
                charge.job_id,
                charge.partner,
                charge.purpose,
                epsilon,
                rho,
                now_ms
            ],
        )?;
        tx.commit()?;
        Ok(value)
    }

    /// Records what the job under `release_key` released, unless something is recorded
    /// already; returns the recorded value (the first one wins). The key must have been
    /// charged.
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

    /// What was spent by everyone (`scope = None`) or by one partner and purpose: in the window
    /// `(now − period, now]`, or over the ledger's whole life (`period = None`); composed at
    /// `delta`.
    pub fn spent(
        &self,
        scope: Option<(&str, &str)>,
        period: Option<Period>,
        now_ms: i64,
        delta: f64,
    ) -> Result<Spend, LedgerError> {
        let conn = self.lock();
        let charges = window(&conn, scope, period, now_ms)?;
        let (epsilon, rho) = totals(&charges);
        Ok(Spend {
            spent: epsilon_at(epsilon, rho, delta),
            epsilon,
            rho,
            charges: charges.len() as u64,
            next_refresh_ms: period.and_then(|p| charges.first().map(|c| c.at_ms + p.millis())),
        })
    }

    /// The ledger's whole history of one partner and purpose as a curve: after each charge
    /// (oldest first), its time (Unix ms) and the spend so far, composed at `delta`.
    pub fn spent_over_time(
        &self,
        scope: (&str, &str),
        delta: f64,
    ) -> Result<Vec<(i64, f64)>, LedgerError> {
        let conn = self.lock();
        let charges = window(&conn, Some(scope), None, i64::MAX)?;
        let (mut epsilon, mut rho) = (0.0, 0.0);
        Ok(charges
            .iter()
            .map(|c| {
                epsilon += c.epsilon;
                rho += c.rho;
                (c.at_ms, epsilon_at(epsilon, rho, delta))
            })
            .collect())
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

/// Refuses a release key that was charged before.
fn check_new(conn: &Connection, release_key: &str) -> Result<(), LedgerError> {
    let existing: Option<(String, i64)> = conn
        .query_row(
            "SELECT job_id, at_ms FROM charges WHERE release_key = ?1",
            [release_key],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    match existing {
        Some((job_id, at_ms)) => Err(LedgerError::AlreadyCharged { job_id, at_ms }),
        None => Ok(()),
    }
}

/// One stored charge, as the caps read it.
#[derive(Debug, Clone, Copy)]
struct Stored {
    at_ms: i64,
    epsilon: f64,
    rho: f64,
}

fn totals(charges: &[Stored]) -> (f64, f64) {
    charges
        .iter()
        .fold((0.0, 0.0), |(e, r), c| (e + c.epsilon, r + c.rho))
}

/// The charges in `(now − period, now]` (or all of them when `period` is `None`), oldest first.
/// Charges stamped in the future count (clock skew must not free budget).
fn window(
    conn: &Connection,
    scope: Option<(&str, &str)>,
    period: Option<Period>,
    now_ms: i64,
) -> Result<Vec<Stored>, LedgerError> {
    let since = period.map_or(i64::MIN, |p| now_ms.saturating_sub(p.millis()));
    let map = |row: &rusqlite::Row<'_>| {
        Ok(Stored {
            at_ms: row.get(0)?,
            epsilon: row.get(1)?,
            rho: row.get(2)?,
        })
    };
    let rows: Vec<Stored> = match scope {
        None => conn
            .prepare("SELECT at_ms, epsilon, rho FROM charges WHERE at_ms > ?1 ORDER BY at_ms")?
            .query_map([since], map)?
            .collect::<Result<_, _>>()?,
        Some((partner, purpose)) => conn
            .prepare(
                "SELECT at_ms, epsilon, rho FROM charges \
                 WHERE partner = ?1 AND purpose = ?2 AND at_ms > ?3 ORDER BY at_ms",
            )?
            .query_map(params![partner, purpose, since], map)?
            .collect::<Result<_, _>>()?,
    };
    let bad = |x: f64| !(x.is_finite() && x >= 0.0);
    if let Some(c) = rows
        .iter()
        .find(|c| bad(c.epsilon) || bad(c.rho) || c.epsilon + c.rho <= 0.0)
    {
        return Err(LedgerError::Corrupt {
            key: format!("(charged at {})", c.at_ms),
            reason: format!(
                "epsilon {} and rho {} are not finite numbers >= 0 with a positive sum",
                c.epsilon, c.rho
            ),
        });
    }
    Ok(rows)
}

fn check_caps(conn: &Connection, charge: &Charge, now_ms: i64) -> Result<(), LedgerError> {
    let scope = Some((charge.partner.as_str(), charge.purpose.as_str()));
    let caps = charge
        .purpose_caps
        .iter()
        .map(|c| (c, scope))
        .chain(charge.node_cap.iter().map(|c| (c, None)));
    let (add_e, add_r) = charge.loss.parts();
    let delta = charge.delta;
    for (cap, scope) in caps {
        let whose = match scope {
            Some((partner, purpose)) => {
                format!("privacy budget for purpose '{purpose}' with {partner}")
            }
            None => "node-wide privacy budget".to_owned(),
        };
        let limits = [
            (cap.epsilon_per_period, Some(cap.period)),
            (cap.epsilon_lifetime, None),
        ];
        for (limit, period) in limits {
            let Some(limit) = limit.map(|l| l.get()) else {
                continue;
            };
            let charges = window(conn, scope, period, now_ms)?;
            let (e, r) = totals(&charges);
            let spent = epsilon_at(e, r, delta);
            let after = epsilon_at(e + add_e, r + add_r, delta);
            if after <= limit + EPSILON_SLACK {
                continue;
            }
            let needs = after - spent;
            let (what, per, refresh) = match period {
                Some(period) => {
                    // Sliding window: the budget refreshes when enough old charges have left it.
                    let (mut left_e, mut left_r) = (e, r);
                    let refresh = charges
                        .iter()
                        .find(|c| {
                            left_e -= c.epsilon;
                            left_r -= c.rho;
                            epsilon_at(left_e.max(0.0) + add_e, left_r.max(0.0) + add_r, delta)
                                <= limit + EPSILON_SLACK
                        })
                        .map(|c| c.at_ms + period.millis());
                    (
                        whose.clone(),
                        format!(" per {period}"),
                        match refresh {
                            Some(t) => format!("enough refreshes at {}", show_time(t)),
                            None => "it never suffices".to_owned(),
                        },
                    )
                }
                None => (
                    format!("lifetime {whose}"),
                    " in all".to_owned(),
                    "a lifetime budget never refreshes".to_owned(),
                ),
            };
            let at_delta = if r + add_r > 0.0 {
                format!(" (ε at δ {delta:e})")
            } else {
                String::new()
            };
            return Err(LedgerError::Refused(format!(
                "{what} exhausted: {} of {}{per} spent{at_delta}, {} remains, this job needs {}; \
                 {refresh}",
                show(spent),
                show(limit),
                show((limit - spent).max(0.0)),
                show(needs),
            )));
        }
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
    format!("{}Z", crate::clock::format_ms(ms).replacen(' ', "T", 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    const DAY: i64 = 86_400_000;
    const NOW: i64 = 1_782_864_000_000;
    const DELTA: f64 = 1e-9;

    fn cap(epsilon: f64, period: Period) -> Budget {
        Budget {
            epsilon_per_period: Some(Epsilon::new(epsilon).unwrap()),
            period,
            epsilon_lifetime: None,
        }
    }

    fn charge(job: &str, epsilon: f64) -> Charge {
        Charge {
            job_id: job.into(),
            partner: "globex".into(),
            purpose: "reporting".into(),
            loss: Loss::Epsilon(epsilon),
            purpose_caps: vec![cap(1.0, Period::Day)],
            node_cap: None,
            delta: DELTA,
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
                    ledger.charge_and_draw(
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
                Ok(_) => {}
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
            .spent(Some(("globex", "reporting")), Some(Period::Day), NOW, DELTA)
            .unwrap();
        assert_eq!(spend.charges, 10);
        assert!((spend.spent - 1.0).abs() < 1e-9);
    }

    /// A repeated release key is refused, before and inside the charge, and draws nothing: the
    /// data under a repeated job may have changed, so neither the old noise (not stored) nor a
    /// second release may go out under it.
    #[test]
    fn a_charged_key_is_refused_ever_after_and_the_draw_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        let ledger = Ledger::open(&path).unwrap();
        let drawn = ledger
            .charge_and_draw("k", &charge("job-1", 0.5), NOW, noise(734_211))
            .unwrap();
        assert_eq!(drawn, 734_211);
        let mut called = false;
        let again = ledger
            .charge_and_draw("k", &charge("job-1", 0.5), NOW + 1, || {
                called = true;
                Ok::<i64, String>(-3)
            })
            .unwrap_err();
        assert!(!called, "a repeated key must not draw");
        assert_eq!(
            again.to_string(),
            format!(
                "job job-1's release was already charged (at {}); a release is never repeated, \
                 since the data under it may have changed; retry it as a new job with \
                 `cleanroom job retry job-1`",
                show_time(NOW)
            )
        );
        assert!(matches!(
            ledger.check("k", &charge("job-1", 0.5), NOW + 2),
            Err(LedgerError::AlreadyCharged { .. })
        ));
        assert!(
            ledger
                .check("other", &charge("job-2", 0.5), NOW + 2)
                .is_ok()
        );
        let spend = ledger
            .spent(None, Some(Period::Day), NOW + 1, DELTA)
            .unwrap();
        assert_eq!((spend.spent, spend.charges), (0.5, 1));
        // The first settled value wins.
        assert_eq!(ledger.settle("k", &100u64).unwrap(), 100);
        assert_eq!(ledger.settle("k", &999u64).unwrap(), 100);
        assert!(matches!(
            ledger.settle("never-charged", &1u64),
            Err(LedgerError::Corrupt { .. })
        ));
        drop(ledger);
        // The draw is nowhere in the database (nor in its write-ahead log).
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend(std::fs::read(dir.path().join("l.sqlite-wal")).unwrap_or_default());
        let needle = b"734211";
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "the noise draw is stored"
        );
        let columns: Vec<String> = Connection::open(&path)
            .unwrap()
            .prepare("SELECT name FROM pragma_table_info('charges')")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(!columns.iter().any(|c| c == "draw"), "{columns:?}");
    }

    #[test]
    fn refusal_says_spent_remaining_and_refresh_and_draws_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
        ledger
            .charge_and_draw("a", &charge("job-a", 0.25), NOW - 3_600_000, noise(1))
            .unwrap();
        ledger
            .charge_and_draw("b", &charge("job-b", 0.5), NOW, noise(1))
            .unwrap();
        let mut drawn = false;
        let err = ledger
            .charge_and_draw("c", &charge("job-c", 0.5), NOW, || {
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
        assert!(ledger.check("c", &charge("job-c", 0.25), NOW).is_ok());
        // Another purpose has its own budget.
        let mut other = charge("job-d", 0.5);
        other.purpose = "audit".into();
        assert!(ledger.charge_and_draw("d", &other, NOW, noise(0)).is_ok());
    }

    #[test]
    fn node_wide_cap_counts_every_partner() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
        let mut c = charge("job-1", 0.75);
        c.purpose_caps = Vec::new();
        c.node_cap = Some(cap(1.0, Period::Week));
        ledger.charge_and_draw("1", &c, NOW, noise(0)).unwrap();
        c.partner = "initech".into();
        let err = ledger.charge_and_draw("2", &c, NOW, noise(0)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("node-wide privacy budget exhausted: 0.75 of 1 per week spent"),
            "{err}"
        );
        // Six days later still in the week's window; eight days later it has left.
        assert!(ledger.check("2", &c, NOW + 6 * DAY).is_err());
        assert!(ledger.check("2", &c, NOW + 8 * DAY).is_ok());
    }

    #[test]
    fn budget_refreshes_per_period() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
        ledger
            .charge_and_draw("1", &charge("job-1", 1.0), NOW, noise(0))
            .unwrap();
        assert!(
            ledger
                .check("2", &charge("job-2", 0.1), NOW + DAY - 1)
                .is_err()
        );
        // A charge exactly one period old has left the window.
        assert!(ledger.check("2", &charge("job-2", 0.1), NOW + DAY).is_ok());
        let spend = ledger
            .spent(
                Some(("globex", "reporting")),
                Some(Period::Day),
                NOW + 10,
                DELTA,
            )
            .unwrap();
        assert_eq!(spend.next_refresh_ms, Some(NOW + DAY));
        // A charge stamped in the future (clock skew) still counts.
        ledger
            .charge_and_draw("2", &charge("job-2", 1.0), NOW + 2 * DAY + 5000, noise(0))
            .unwrap();
        assert!(
            ledger
                .check("3", &charge("job-3", 0.1), NOW + 2 * DAY)
                .is_err()
        );
    }

    /// A lifetime cap never refreshes: the window empties, the lifetime does not.
    #[test]
    fn a_lifetime_cap_outlasts_every_window() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
        let mut c = charge("job-1", 1.0);
        c.purpose_caps = vec![Budget {
            epsilon_per_period: Some(Epsilon::new(1.0).unwrap()),
            period: Period::Day,
            epsilon_lifetime: Some(Epsilon::new(2.5).unwrap()),
        }];
        for (i, day) in [0, 2].into_iter().enumerate() {
            ledger
                .charge_and_draw(&format!("k{i}"), &c, NOW + day * DAY, noise(0))
                .unwrap();
        }
        // Day 4: the day's window is empty, but 2 of 2.5 are spent for ever.
        let err = ledger.check("k2", &c, NOW + 4 * DAY).unwrap_err();
        assert_eq!(
            err.to_string(),
            "lifetime privacy budget for purpose 'reporting' with globex exhausted: 2 of 2.5 in \
             all spent, 0.5 remains, this job needs 1; a lifetime budget never refreshes"
        );
        let mut half = c.clone();
        half.loss = Loss::Epsilon(0.5);
        ledger
            .charge_and_draw("k2", &half, NOW + 400 * DAY, noise(0))
            .unwrap();
        assert!(ledger.check("k3", &half, NOW + 4000 * DAY).is_err());
        // A node-wide lifetime cap alone (no period) works the same.
        let mut node = charge("job-9", 1.0);
        node.partner = "initech".into();
        node.purpose_caps = Vec::new();
        node.node_cap = Some(Budget {
            epsilon_per_period: None,
            period: Period::Day,
            epsilon_lifetime: Some(Epsilon::new(3.0).unwrap()),
        });
        let err = ledger.check("k9", &node, NOW).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("lifetime node-wide privacy budget exhausted: 2.5 of 3 in all spent"),
            "{err}"
        );
        let life = ledger
            .spent(Some(("globex", "reporting")), None, NOW, DELTA)
            .unwrap();
        assert_eq!(
            (life.spent, life.charges, life.next_refresh_ms),
            (2.5, 3, None)
        );
    }

    /// ρ charges compose as ρ and are read at δ beside the pure ε ones.
    #[test]
    fn gaussian_charges_compose_in_rho_and_are_read_at_delta() {
        let ln = (1.0f64 / DELTA).ln();
        assert_eq!(epsilon_at(0.7, 0.0, DELTA), 0.7);
        let one = epsilon_at(0.0, 0.5, DELTA);
        assert!(
            (one - (0.5 + 2.0 * (0.5 * ln).sqrt())).abs() < 1e-12,
            "{one}"
        );
        // Two ρ of 0.5 cost less than twice one (sub-linear in ε), more than one.
        let two = epsilon_at(0.0, 1.0, DELTA);
        assert!(two < 2.0 * one && two > one);

        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("l.sqlite")).unwrap();
        let mut g = charge("agg-1", 0.0);
        g.loss = Loss::Rho(0.5);
        g.purpose_caps = vec![cap(one + 1.0, Period::Day)];
        ledger.charge_and_draw("a1", &g, NOW, noise(0)).unwrap();
        // A Laplace charge of ε 1 fits beside it exactly; a second ρ of 0.5 does not.
        let mut l = charge("ovl-1", 1.0);
        l.purpose_caps = g.purpose_caps.clone();
        assert!(ledger.check("o1", &l, NOW).is_ok());
        g.job_id = "agg-2".into();
        let err = ledger.check("a2", &g, NOW).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "exhausted: {} of {} per day spent (ε at δ 1e-9), 1 remains, this job needs {}",
                show(one),
                show(one + 1.0),
                show(two - one)
            )),
            "{err}"
        );
        let spend = ledger
            .spent(Some(("globex", "reporting")), Some(Period::Day), NOW, DELTA)
            .unwrap();
        assert_eq!((spend.epsilon, spend.rho, spend.charges), (0.0, 0.5, 1));
        assert!((spend.spent - one).abs() < 1e-12);
        // Invalid losses are refused before anything is drawn.
        for loss in [Loss::Rho(0.0), Loss::Epsilon(f64::NAN), Loss::Rho(-1.0)] {
            g.loss = loss;
            assert!(matches!(
                ledger.charge_and_draw("bad", &g, NOW, noise(0)),
                Err(LedgerError::Refused(_))
            ));
        }
    }

    #[test]
    fn spend_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sqlite");
        {
            let ledger = Ledger::open(&path).unwrap();
            ledger
                .charge_and_draw("k", &charge("job-1", 0.75), NOW, noise(-4))
                .unwrap();
            ledger.settle("k", &"released".to_owned()).unwrap();
        }
        let ledger = Ledger::open(&path).unwrap();
        let spend = ledger
            .spent(Some(("globex", "reporting")), Some(Period::Day), NOW, DELTA)
            .unwrap();
        assert_eq!((spend.spent, spend.charges), (0.75, 1));
        assert!(ledger.check("k2", &charge("job-2", 0.5), NOW).is_err());
        assert!(matches!(
            ledger.charge_and_draw("k", &charge("job-1", 0.75), NOW, noise(9)),
            Err(LedgerError::AlreadyCharged { .. })
        ));
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
            .charge_and_draw("k", &charge("job-1", 0.5), NOW, || {
                Err::<i64, _>("random source failed")
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "drawing the release failed: random source failed"
        );
        let spend = ledger.spent(None, Some(Period::Day), NOW, DELTA).unwrap();
        assert_eq!(spend.charges, 0);
        assert_eq!(
            ledger
                .charge_and_draw("k", &charge("job-1", 0.5), NOW, noise(1))
                .unwrap(),
            1
        );
    }

    /// A version-1 ledger (noise draws stored, an aggregate's zCDP ε charged as ε) opens as
    /// version 2: the spends are kept, the aggregate's becomes ρ = ε²/2, and no draw is left in
    /// the file.
    #[test]
    fn a_version_1_ledger_is_migrated_and_its_draws_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.sqlite");
        {
            let raw = Connection::open(&path).unwrap();
            raw.execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE schema_version (version INTEGER NOT NULL PRIMARY KEY);
                 INSERT INTO schema_version VALUES (1);
                 CREATE TABLE charges (
                   release_key TEXT NOT NULL PRIMARY KEY, job_id TEXT NOT NULL,
                   partner TEXT NOT NULL, purpose TEXT NOT NULL,
                   epsilon REAL NOT NULL CHECK (epsilon > 0), at_ms INTEGER NOT NULL,
                   draw TEXT NOT NULL, released TEXT);
                 CREATE INDEX charges_by_time ON charges (at_ms);
                 CREATE INDEX charges_by_partner ON charges (partner, purpose, at_ms);",
            )
            .unwrap();
            let at = NOW - 1000;
            raw.execute(
                "INSERT INTO charges VALUES ('overlap:aa', 'job-1', 'globex', 'reporting', 0.5, \
                 ?1, '{\"noise\":918273,\"nonce\":\"00\",\"epsilon\":0.5,\"scale\":\"2\"}', \
                 '1234')",
                [at],
            )
            .unwrap();
            raw.execute(
                "INSERT INTO charges VALUES ('aggregate:bb', 'job-2', 'globex,initech', \
                 'reporting', 1.0, ?1, '[564738,-564739]', NULL)",
                [at],
            )
            .unwrap();
        }
        let ledger = Ledger::open(&path).unwrap();
        let ovl = ledger
            .spent(Some(("globex", "reporting")), None, NOW, DELTA)
            .unwrap();
        assert_eq!((ovl.epsilon, ovl.rho, ovl.charges), (0.5, 0.0, 1));
        let agg = ledger
            .spent(Some(("globex,initech", "reporting")), None, NOW, DELTA)
            .unwrap();
        assert_eq!((agg.epsilon, agg.rho, agg.charges), (0.0, 0.5, 1));
        // Migrated keys are still refused as repeats; the released value is kept.
        assert!(matches!(
            ledger.check("overlap:aa", &charge("job-1", 0.5), NOW),
            Err(LedgerError::AlreadyCharged { .. })
        ));
        assert_eq!(ledger.settle("overlap:aa", &0u64).unwrap(), 1234);
        drop(ledger);
        let version: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend(std::fs::read(dir.path().join("v1.sqlite-wal")).unwrap_or_default());
        for needle in [&b"918273"[..], b"564738"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "a version-1 draw survived the migration"
            );
        }
        // And it opens again as version 2.
        assert!(Ledger::open(&path).is_ok());
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
        // A row whose settled release does not decode, and a loss that is not a number >= 0.
        let bad = dir.path().join("bad.sqlite");
        let ledger = Ledger::open(&bad).unwrap();
        ledger
            .charge_and_draw("k", &charge("job-1", 0.5), NOW, noise(1))
            .unwrap();
        let raw = Connection::open(&bad).unwrap();
        raw.execute("UPDATE charges SET released = '{not json'", [])
            .unwrap();
        assert!(matches!(
            ledger.settle("k", &1u64),
            Err(LedgerError::Corrupt { .. })
        ));
        raw.execute("PRAGMA ignore_check_constraints = ON", [])
            .unwrap();
        raw.execute("UPDATE charges SET epsilon = -1", []).unwrap();
        assert!(matches!(
            ledger.check("k2", &charge("job-2", 0.1), NOW),
            Err(LedgerError::Corrupt { .. })
        ));
        raw.execute("UPDATE charges SET epsilon = 'lots'", [])
            .unwrap();
        assert!(ledger.check("k2", &charge("job-2", 0.1), NOW).is_err());
    }

    #[test]
    fn epsilon_display() {
        assert_eq!(show(0.1 + 0.2), "0.3");
        assert_eq!(show(1.0), "1");
        assert_eq!(show(0.0), "0");
        assert_eq!(show(0.125), "0.125");
    }
}
