//! Job leases: which coordinator process is executing which job.
//!
//! A runner executes a job only while it holds the job's lease, and renews it well before it
//! expires. The lease is what tells a restarted coordinator (or a second process on the same
//! database) whether an unfinished job still has a live runner: a process that was SIGKILLed
//! stops renewing, its leases expire, and [`JobStore::orphaned`] then lists its jobs. Taking a
//! lease is exclusive — it succeeds only when the job has no lease or an expired one, whoever held
//! it — so two runners can never execute the same job, even inside one process.
//!
//! The terminal transition deletes the lease in the same transaction (see
//! [`JobStore::transition`]), so a finished job never looks orphaned.

use cleanroom_proto::v1::JobState;
use rusqlite::{TransactionBehavior, params};

use super::error::StoreError;
use super::jobs::{decode_state, new_job_id, stored_state};
use super::schema::JobStore;
use super::state::is_terminal;

/// The identity of a coordinator process as a lease holder: random, fresh at every start, so a
/// restarted process never mistakes its predecessor's leases for its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder(String);

impl LeaseHolder {
    /// A fresh holder id from the operating system's RNG.
    pub fn generate() -> Result<LeaseHolder, StoreError> {
        let id = new_job_id()?;
        Ok(LeaseHolder(id.replacen("job-", "coordinator-", 1)))
    }

    /// The id as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An unfinished job without a live runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrphanedJob {
    /// The job.
    pub job_id: String,
    /// Its state: pending (never offered: it can be resumed) or offered/running (the nodes have
    /// dropped it with the runner's connections: it must be failed).
    pub state: JobState,
}

impl JobStore {
    /// Takes the lease of an unfinished job for `holder` until `now_ms + ttl_ms`. Returns false,
    /// changing nothing, if another runner holds an unexpired lease (even one of `holder`'s own:
    /// a job runs under one runner at a time) or if the job has already ended.
    pub fn try_lease(
        &self,
        job_id: &str,
        holder: &LeaseHolder,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if is_terminal(stored_state(&tx, job_id)?) {
            return Ok(false);
        }
        let taken = tx.execute(
            "INSERT INTO job_leases (job_id, holder, expires_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (job_id) DO UPDATE SET holder = excluded.holder, \
             expires_ms = excluded.expires_ms WHERE job_leases.expires_ms <= ?4",
            params![
                job_id,
                holder.as_str(),
                now_ms.saturating_add(ttl_ms),
                now_ms
            ],
        )?;
        tx.commit()?;
        Ok(taken == 1)
    }

    /// Extends `holder`'s lease on a job to `now_ms + ttl_ms`. Returns false if `holder` no longer
    /// holds it (it expired and was taken over, or the job ended): the runner must stop.
    pub fn renew_lease(
        &self,
        job_id: &str,
        holder: &LeaseHolder,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        let conn = self.lock();
        let renewed = conn.execute(
            "UPDATE job_leases SET expires_ms = ?3 WHERE job_id = ?1 AND holder = ?2",
            params![job_id, holder.as_str(), now_ms.saturating_add(ttl_ms)],
        )?;
        Ok(renewed == 1)
    }

    /// Gives up `holder`'s lease on a job (if it still holds it), so that another runner may take
    /// the job at once: a graceful stop hands its pending jobs to the next start this way.
    pub fn release_lease(&self, job_id: &str, holder: &LeaseHolder) -> Result<(), StoreError> {
        let conn = self.lock();
        conn.execute(
            "DELETE FROM job_leases WHERE job_id = ?1 AND holder = ?2",
            params![job_id, holder.as_str()],
        )?;
        Ok(())
    }

    /// Unfinished jobs that `holder` holds a lease on, oldest first.
    pub fn leased_by(&self, holder: &LeaseHolder) -> Result<Vec<OrphanedJob>, StoreError> {
        self.unfinished_where(
            "EXISTS (SELECT 1 FROM job_leases l WHERE l.job_id = j.job_id AND l.holder = ?4)",
            params![
                JobState::Pending as i32,
                JobState::Offered as i32,
                JobState::Running as i32,
                holder.as_str()
            ],
        )
    }

    /// Unfinished jobs with no live runner at `now_ms` — no lease, or an expired one — oldest
    /// first.
    pub fn orphaned(&self, now_ms: i64) -> Result<Vec<OrphanedJob>, StoreError> {
        self.unfinished_where(
            "NOT EXISTS (SELECT 1 FROM job_leases l WHERE l.job_id = j.job_id \
             AND l.expires_ms > ?4)",
            params![
                JobState::Pending as i32,
                JobState::Offered as i32,
                JobState::Running as i32,
                now_ms
            ],
        )
    }

    fn unfinished_where(
        &self,
        condition: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<OrphanedJob>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT j.job_id, j.state FROM jobs j WHERE j.state IN (?1, ?2, ?3) AND {condition} \
             ORDER BY j.seq"
        ))?;
        let rows = stmt
            .query_map(params, |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i32>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        drop(stmt);
        drop(conn);
        rows.into_iter()
            .map(|(job_id, state)| {
                let state = decode_state(&job_id, state)?;
                Ok(OrphanedJob { job_id, state })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{open_temp, spec};

    const TTL: i64 = 10_000;

    fn holder() -> LeaseHolder {
        LeaseHolder::generate().unwrap()
    }

    #[test]
    fn a_lease_is_exclusive_until_it_expires() {
        let (_dir, store) = open_temp();
        let job = store.submit(&spec("q3"), "", "alice", 0).unwrap().job_id;
        let (a, b) = (holder(), holder());
        assert_ne!(a, b);
        assert!(store.try_lease(&job, &a, 1_000, TTL).unwrap());
        // Neither another holder nor the same one takes a live lease.
        assert!(!store.try_lease(&job, &b, 2_000, TTL).unwrap());
        assert!(!store.try_lease(&job, &a, 2_000, TTL).unwrap());
        // Renewal keeps it alive past the first expiry.
        assert!(store.renew_lease(&job, &a, 9_000, TTL).unwrap());
        assert!(!store.try_lease(&job, &b, 12_000, TTL).unwrap());
        assert!(!store.renew_lease(&job, &b, 12_000, TTL).unwrap());
        // Once expired, another holder takes it and the old one can no longer renew.
        assert!(store.try_lease(&job, &b, 19_000, TTL).unwrap());
        assert!(!store.renew_lease(&job, &a, 19_001, TTL).unwrap());
    }

    #[test]
    fn orphans_are_unfinished_jobs_without_a_live_lease() {
        let (_dir, store) = open_temp();
        let submit = || store.submit(&spec("q3"), "", "alice", 0).unwrap().job_id;
        let (never_leased, live, expired, done) = (submit(), submit(), submit(), submit());
        let a = holder();
        for id in [&live, &expired, &done] {
            assert!(store.try_lease(id, &a, 0, TTL).unwrap());
        }
        store
            .transition(&expired, JobState::Offered, "", 1)
            .unwrap();
        store.transition(&done, JobState::Offered, "", 1).unwrap();
        store.transition(&done, JobState::Running, "", 2).unwrap();
        store.transition(&done, JobState::Succeeded, "", 3).unwrap();
        assert!(store.renew_lease(&live, &a, 8_000, TTL).unwrap());

        let orphans = store.orphaned(12_000).unwrap();
        assert_eq!(
            orphans,
            vec![
                OrphanedJob {
                    job_id: never_leased.clone(),
                    state: JobState::Pending
                },
                OrphanedJob {
                    job_id: expired.clone(),
                    state: JobState::Offered
                },
            ]
        );
        let held: Vec<String> = store
            .leased_by(&a)
            .unwrap()
            .into_iter()
            .map(|o| o.job_id)
            .collect();
        assert_eq!(held, vec![live.clone(), expired.clone()]);
        // The terminal transition removed the finished job's lease with it.
        assert!(!store.renew_lease(&done, &a, 12_000, TTL).unwrap());
        assert!(!store.try_lease(&done, &a, 12_000, TTL).unwrap());
    }

    #[test]
    fn release_hands_a_job_over_at_once() {
        let (_dir, store) = open_temp();
        let job = store.submit(&spec("q3"), "", "alice", 0).unwrap().job_id;
        let (a, b) = (holder(), holder());
        assert!(store.try_lease(&job, &a, 0, TTL).unwrap());
        // Releasing someone else's lease does nothing.
        store.release_lease(&job, &b).unwrap();
        assert!(!store.try_lease(&job, &b, 1, TTL).unwrap());
        store.release_lease(&job, &a).unwrap();
        assert_eq!(store.orphaned(2).unwrap().len(), 1);
        assert!(store.try_lease(&job, &b, 2, TTL).unwrap());
    }

    #[test]
    fn leases_survive_reopening_and_unknown_jobs_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.sqlite");
        let a = holder();
        let job = {
            let store = JobStore::open(&path).unwrap();
            let job = store.submit(&spec("q3"), "", "alice", 0).unwrap().job_id;
            assert!(store.try_lease(&job, &a, 0, TTL).unwrap());
            job
        };
        let store = JobStore::open(&path).unwrap();
        assert!(store.orphaned(TTL - 1).unwrap().is_empty());
        let orphans = store.orphaned(TTL).unwrap();
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0].job_id, job);
        assert!(matches!(
            store.try_lease("job-nope", &a, 0, TTL),
            Err(StoreError::UnknownJob(_))
        ));
    }

    #[test]
    fn concurrent_takers_get_one_lease() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.sqlite");
        let job = JobStore::open(&path)
            .unwrap()
            .submit(&spec("q3"), "", "alice", 0)
            .unwrap()
            .job_id;
        let winners: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let (path, job) = (&path, &job);
                    scope.spawn(move || {
                        let store = JobStore::open(path).unwrap();
                        store.try_lease(job, &holder(), 5, TTL).unwrap() as usize
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(winners, 1);
    }
}
