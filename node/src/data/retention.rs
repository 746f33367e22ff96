//! Retention of job outputs: `cleanroom-node purge --older-than-days N` removes the files in
//! `<state_dir>/results/` (membership files of `match` jobs, row numbers only) last modified
//! more than N days ago.
//!
//! [`purge`] takes the retention and the current time from the caller, so the node can run it
//! on a schedule with a retention from its policy and tests can pass any clock. Only regular
//! files directly in `results/` are considered; directories and symbolic links are left alone
//! (and counted as skipped). A file modified in the future is kept.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The directory of job outputs in a state directory: `<state_dir>/results`.
pub fn results_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("results")
}

/// What [`purge`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Files removed.
    pub removed: u64,
    /// Bytes those files held.
    pub bytes_removed: u64,
    /// Regular files kept (younger than the retention).
    pub kept: u64,
    /// Entries that are not regular files (directories, symbolic links), left alone.
    pub skipped: u64,
}

/// Why purging stopped. Files removed before the error stay removed.
#[derive(Debug, thiserror::Error)]
#[error("{}: {what}: {source}", path.display())]
pub struct PurgeError {
    /// The file or directory.
    pub path: PathBuf,
    /// What was being done.
    pub what: &'static str,
    /// The I/O error.
    pub source: std::io::Error,
}

/// Removes every regular file in `<state_dir>/results/` whose modification time is more than
/// `older_than` before `now`. A missing `results/` directory is an empty one.
pub fn purge(
    state_dir: &Path,
    older_than: Duration,
    now: SystemTime,
) -> Result<PurgeReport, PurgeError> {
    let dir = results_dir(state_dir);
    let err = |path: &Path, what: &'static str| {
        let path = path.to_owned();
        move |source| PurgeError { path, what, source }
    };
    let mut report = PurgeReport::default();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(err(&dir, "listing")(e)),
    };
    // Files modified at or before the cutoff are older than the retention.
    let cutoff = now.checked_sub(older_than);
    for entry in entries {
        let entry = entry.map_err(err(&dir, "listing"))?;
        let path = entry.path();
        // Not followed: a link is never the way to delete something outside results/.
        let meta = std::fs::symlink_metadata(&path).map_err(err(&path, "reading metadata"))?;
        if !meta.file_type().is_file() {
            report.skipped += 1;
            continue;
        }
        let modified = meta.modified().map_err(err(&path, "reading the mtime"))?;
        let expired = cutoff.is_some_and(|c| modified < c);
        if !expired {
            report.kept += 1;
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                report.removed += 1;
                report.bytes_removed += meta.len();
            }
            // Removed by someone else meanwhile: gone either way.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(&path, "removing")(e)),
        }
    }
    Ok(report)
}

/// `days` days as a duration (saturating).
pub fn days(days: u64) -> Duration {
    Duration::from_secs(days.saturating_mul(86_400))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn file_aged(dir: &Path, name: &str, modified: SystemTime) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, "row\n1\n").unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(modified).unwrap();
        path
    }

    #[test]
    fn removes_only_files_older_than_the_retention() {
        let state = tempfile::tempdir().unwrap();
        let results = results_dir(state.path());
        std::fs::create_dir_all(&results).unwrap();
        let now = SystemTime::now();
        let old = file_aged(&results, "job-1-membership.csv", now - 40 * DAY);
        let edge = file_aged(&results, "job-2-membership.csv", now - 29 * DAY);
        let fresh = file_aged(&results, "job-3-membership.csv", now - DAY);
        let future = file_aged(&results, "job-4-membership.csv", now + DAY);
        std::fs::create_dir(results.join("sub")).unwrap();
        let report = purge(state.path(), days(30), now).unwrap();
        assert_eq!(
            report,
            PurgeReport {
                removed: 1,
                bytes_removed: 6,
                kept: 3,
                skipped: 1
            }
        );
        assert!(!old.exists() && edge.exists() && fresh.exists() && future.exists());
        // Later, the same retention removes the next one.
        let report = purge(state.path(), days(30), now + 2 * DAY).unwrap();
        assert_eq!(report.removed, 1);
        assert!(!edge.exists() && fresh.exists());
        // Retention 0 removes everything modified before now.
        let report = purge(state.path(), Duration::ZERO, now + 3 * DAY).unwrap();
        assert_eq!((report.removed, report.kept), (2, 0));
    }

    #[test]
    fn missing_results_dir_is_empty() {
        let state = tempfile::tempdir().unwrap();
        let report = purge(state.path(), days(1), SystemTime::now()).unwrap();
        assert_eq!(report, PurgeReport::default());
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_are_not_followed() {
        let state = tempfile::tempdir().unwrap();
        let results = results_dir(state.path());
        std::fs::create_dir_all(&results).unwrap();
        let outside = file_aged(state.path(), "precious.csv", SystemTime::UNIX_EPOCH + DAY);
        std::os::unix::fs::symlink(&outside, results.join("link.csv")).unwrap();
        let report = purge(state.path(), days(1), SystemTime::now()).unwrap();
        assert_eq!((report.removed, report.skipped), (0, 1));
        assert!(outside.exists());
    }

    #[test]
    fn huge_retention_keeps_everything() {
        let state = tempfile::tempdir().unwrap();
        let results = results_dir(state.path());
        std::fs::create_dir_all(&results).unwrap();
        file_aged(&results, "a.csv", SystemTime::UNIX_EPOCH + DAY);
        let report = purge(state.path(), days(u64::MAX), SystemTime::now()).unwrap();
        assert_eq!((report.removed, report.kept), (0, 1));
    }
}
