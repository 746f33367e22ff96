//! The store's tests of jobs, schedules and migrations (results and leases are tested beside
//! their code).

use std::sync::{Arc, Barrier};

use cleanroom_proto::v1::{JobState, PartyResult, PsiOutcome, StateChange};
use prost::Message;
use rusqlite::{Connection, params};
use tempfile::TempDir;

use super::*;

pub(super) use crate::test_support::overlap_job as spec;

fn outcome(intersection: u64) -> PsiOutcome {
    PsiOutcome {
        intersection,
        own_set_size: 1000,
        peer_set_size: 2000,
        learned_membership: false,
        matched_rows: 0,
        membership_file: String::new(),
        ..PsiOutcome::default()
    }
}

pub(super) fn open_temp() -> (TempDir, JobStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = JobStore::open(&dir.path().join("jobs.sqlite")).unwrap();
    (dir, store)
}

fn state_of(store: &JobStore, job_id: &str) -> JobState {
    let info = store.get(job_id).unwrap().unwrap();
    JobState::try_from(info.state).unwrap()
}

/// Runs raw SQL on the store's connection, as a disk fault or a careless operator would.
fn tamper(store: &JobStore, sql: &str, job_id: &str) {
    store.lock().execute(sql, [job_id]).unwrap();
}

/// The versions the store's `schema_version` table records, ascending.
fn schema_versions(store: &JobStore) -> Vec<i64> {
    store
        .lock()
        .prepare("SELECT version FROM schema_version ORDER BY version")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn creates_on_first_open_and_reopen_keeps_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.sqlite");
    assert!(!path.exists());
    let job_id = {
        let store = JobStore::open(&path).unwrap();
        let journal: String = store
            .lock()
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .unwrap();
        assert_eq!(journal, "wal");
        let foreign_keys: bool = store
            .lock()
            .query_row("PRAGMA foreign_keys", [], |row| row.get(0))
            .unwrap();
        assert!(foreign_keys);
        let job = store.submit(&spec("q3"), "", "alice", 1_000).unwrap();
        store
            .transition(
                &job.job_id,
                JobState::Offered,
                "offered to acme and globex",
                1_001,
            )
            .unwrap();
        store.record_node("acme", "10.0.0.1:7000", 900).unwrap();
        job.job_id
    };
    assert!(path.exists());

    let store = JobStore::open(&path).unwrap();
    let info = store.get(&job_id).unwrap().unwrap();
    assert_eq!(info.spec, Some(spec("q3")));
    assert_eq!(info.state, JobState::Offered as i32);
    assert_eq!(info.history.len(), 2);
    assert_eq!(store.nodes().unwrap().len(), 1);
    assert_eq!(schema_versions(&store), vec![SCHEMA_VERSION]);
}

#[test]
fn newer_schema_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.sqlite");
    drop(JobStore::open(&path).unwrap());
    Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE schema_version SET version = ?1",
            [SCHEMA_VERSION + 1],
        )
        .unwrap();
    let err = JobStore::open(&path).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::UnsupportedSchema { found, supported }
                if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION
        ),
        "{err:?}"
    );
}

#[test]
fn submit_creates_pending_job_with_fresh_id() {
    let (_dir, store) = open_temp();
    let job = store.submit(&spec("q3"), "", "alice", 1_000).unwrap();
    assert!(job.created);
    let hex = job.job_id.strip_prefix("job-").unwrap();
    assert_eq!(hex.len(), 16);
    assert!(
        hex.chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    );

    let info = store.get(&job.job_id).unwrap().unwrap();
    assert_eq!(info.job_id, job.job_id);
    assert_eq!(info.state, JobState::Pending as i32);
    assert_eq!(info.reason, "submitted by analyst alice");
    assert_eq!(info.submitted_by, "alice");
    assert_eq!((info.created_ms, info.updated_ms), (1_000, 1_000));
    assert!(info.results.is_empty());
    assert_eq!(
        info.history,
        vec![StateChange {
            state: JobState::Pending as i32,
            at_ms: 1_000,
            reason: "submitted by analyst alice".into(),
        }]
    );
    assert_eq!(store.get("job-0000000000000000").unwrap(), None);
}

#[test]
fn idempotent_submit() {
    let (_dir, store) = open_temp();
    let first = store
        .submit(&spec("q3"), "nightly-1", "alice", 1_000)
        .unwrap();
    assert!(first.created);

    // Same key, same spec: the same job, not a new one.
    let again = store
        .submit(&spec("q3"), "nightly-1", "alice", 2_000)
        .unwrap();
    assert_eq!(
        again,
        Submitted {
            job_id: first.job_id.clone(),
            created: false
        }
    );

    // Same key, other spec: refused, naming the key and the job.
    let err = store
        .submit(&spec("q4"), "nightly-1", "alice", 3_000)
        .unwrap_err();
    match &err {
        StoreError::IdempotencyConflict { key, job_id } => {
            assert_eq!(key, "nightly-1");
            assert_eq!(job_id, &first.job_id);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        format!(
            "idempotency key 'nightly-1' was already used for job {} with a different spec; \
             use a new key",
            first.job_id
        )
    );

    // Empty key: always a new job.
    let a = store.submit(&spec("q3"), "", "alice", 4_000).unwrap();
    let b = store.submit(&spec("q3"), "", "alice", 4_000).unwrap();
    assert!(a.created && b.created);
    assert_ne!(a.job_id, b.job_id);
    assert_ne!(a.job_id, first.job_id);

    // Keys are scoped to the analyst: bob's "nightly-1" is his own.
    let bob = store
        .submit(&spec("q4"), "nightly-1", "bob", 5_000)
        .unwrap();
    assert!(bob.created);
    assert_ne!(bob.job_id, first.job_id);

    assert_eq!(store.list(100).unwrap().len(), 4);
    // The replayed submission did not touch the original job.
    let info = store.get(&first.job_id).unwrap().unwrap();
    assert_eq!(info.created_ms, 1_000);
    assert_eq!(info.history.len(), 1);
}

#[test]
fn legal_transitions_follow_the_state_machine() {
    let (_dir, store) = open_temp();
    let paths: &[&[JobState]] = &[
        &[JobState::Offered, JobState::Running, JobState::Succeeded],
        &[JobState::Offered, JobState::Running, JobState::Failed],
        &[JobState::Offered, JobState::Running, JobState::Cancelled],
        &[JobState::Offered, JobState::Vetoed],
        &[JobState::Offered, JobState::Failed],
        &[JobState::Offered, JobState::Cancelled],
        &[JobState::Failed],
        &[JobState::Cancelled],
        &[JobState::Vetoed],
    ];
    for path in paths {
        let job = store.submit(&spec("q3"), "", "alice", 0).unwrap();
        for (i, &to) in path.iter().enumerate() {
            store
                .transition(&job.job_id, to, "step", i as i64 + 1)
                .unwrap();
            assert_eq!(state_of(&store, &job.job_id), to);
        }
        assert!(is_terminal(*path.last().unwrap()));
    }
}

#[test]
fn illegal_transitions_change_nothing() {
    let (_dir, store) = open_temp();
    let all = [
        JobState::Unspecified,
        JobState::Pending,
        JobState::Offered,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Vetoed,
        JobState::Cancelled,
    ];
    // Reach each state, then try every move the state machine forbids from it.
    let reach: &[(JobState, &[JobState])] = &[
        (JobState::Pending, &[]),
        (JobState::Offered, &[JobState::Offered]),
        (JobState::Running, &[JobState::Offered, JobState::Running]),
        (
            JobState::Succeeded,
            &[JobState::Offered, JobState::Running, JobState::Succeeded],
        ),
        (JobState::Failed, &[JobState::Failed]),
        (JobState::Vetoed, &[JobState::Vetoed]),
        (JobState::Cancelled, &[JobState::Cancelled]),
    ];
    let mut illegal_tried = 0;
    for &(state, steps) in reach {
        let job = store.submit(&spec("q3"), "", "alice", 0).unwrap();
        for &step in steps {
            store.transition(&job.job_id, step, "step", 1).unwrap();
        }
        let before = store.get(&job.job_id).unwrap().unwrap();
        assert_eq!(before.state, state as i32);
        for to in all {
            if transition_allowed(state, to) {
                continue;
            }
            illegal_tried += 1;
            let err = store
                .transition(&job.job_id, to, "should not happen", 99)
                .unwrap_err();
            match err {
                StoreError::IllegalTransition {
                    ref job_id,
                    from,
                    to: got_to,
                } => {
                    assert_eq!(job_id, &job.job_id);
                    assert_eq!((from, got_to), (state, to));
                }
                other => panic!("expected an illegal transition, got {other:?}"),
            }
            assert_eq!(store.get(&job.job_id).unwrap().unwrap(), before);
        }
    }
    // 4 terminal states × 8 targets + pending 4 + offered 4 + running 5.
    assert_eq!(illegal_tried, 4 * 8 + 4 + 4 + 5);

    let job = store.submit(&spec("q3"), "", "alice", 0).unwrap();
    let err = store
        .transition(&job.job_id, JobState::Succeeded, "", 1)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("job {} is pending and cannot move to succeeded", job.job_id)
    );
    assert!(matches!(
        store.transition("job-ffffffffffffffff", JobState::Offered, "", 1),
        Err(StoreError::UnknownJob(id)) if id == "job-ffffffffffffffff"
    ));
}

#[test]
fn history_keeps_order_times_and_reasons() {
    let (_dir, store) = open_temp();
    let job = store.submit(&spec("q3"), "k", "alice", 100).unwrap();
    store
        .transition(
            &job.job_id,
            JobState::Offered,
            "offered to acme, globex",
            200,
        )
        .unwrap();
    store
        .transition(&job.job_id, JobState::Running, "both nodes accepted", 300)
        .unwrap();
    // Illegal attempts leave no trace in the history.
    store
        .transition(&job.job_id, JobState::Pending, "no", 350)
        .unwrap_err();
    // Times as the caller gives them, even out of order: the history order is insertion.
    store
        .transition(
            &job.job_id,
            JobState::Failed,
            "globex: connection lost",
            250,
        )
        .unwrap();

    let info = store.get(&job.job_id).unwrap().unwrap();
    let history: Vec<(JobState, i64, &str)> = info
        .history
        .iter()
        .map(|c| {
            (
                JobState::try_from(c.state).unwrap(),
                c.at_ms,
                c.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(
        history,
        vec![
            (JobState::Pending, 100, "submitted by analyst alice"),
            (JobState::Offered, 200, "offered to acme, globex"),
            (JobState::Running, 300, "both nodes accepted"),
            (JobState::Failed, 250, "globex: connection lost"),
        ]
    );
    assert_eq!(info.state, JobState::Failed as i32);
    assert_eq!(info.reason, "globex: connection lost");
    assert_eq!((info.created_ms, info.updated_ms), (100, 250));
}

#[test]
fn results_round_trip_and_replace() {
    let (_dir, store) = open_temp();
    let job = store.submit(&spec("q3"), "", "alice", 0).unwrap();
    store
        .put_result(&job.job_id, "globex", &outcome(7))
        .unwrap();
    store.put_result(&job.job_id, "acme", &outcome(41)).unwrap();
    // A second report from acme replaces the first.
    store.put_result(&job.job_id, "acme", &outcome(42)).unwrap();

    let info = store.get(&job.job_id).unwrap().unwrap();
    assert_eq!(
        info.results,
        vec![
            PartyResult {
                node: "acme".into(),
                outcome: Some(outcome(42)),
            },
            PartyResult {
                node: "globex".into(),
                outcome: Some(outcome(7)),
            },
        ]
    );

    let err = store
        .put_result(&job.job_id, "initech", &outcome(1))
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::NotAParty { node, .. } if node == "initech"),
        "{err:?}"
    );
    assert!(matches!(
        store.put_result("job-ffffffffffffffff", "acme", &outcome(1)),
        Err(StoreError::UnknownJob(_))
    ));
    assert_eq!(store.get(&job.job_id).unwrap().unwrap().results.len(), 2);
}

#[test]
fn list_is_newest_first_and_limited() {
    let (_dir, store) = open_temp();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            store
                .submit(&spec("q3"), "", "alice", 1_000 + i)
                .unwrap()
                .job_id,
        );
    }
    // Same creation time as the newest: insertion order breaks the tie.
    ids.push(
        store
            .submit(&spec("q3"), "", "alice", 1_004)
            .unwrap()
            .job_id,
    );
    // A transition does not make a job "newer".
    store
        .transition(&ids[0], JobState::Cancelled, "analyst cancelled", 9_999)
        .unwrap();

    let listed: Vec<String> = store
        .list(100)
        .unwrap()
        .into_iter()
        .map(|info| info.job_id)
        .collect();
    let mut expected = ids.clone();
    expected.reverse();
    assert_eq!(listed, expected);

    let two: Vec<String> = store
        .list(2)
        .unwrap()
        .into_iter()
        .map(|info| info.job_id)
        .collect();
    assert_eq!(two, expected[..2]);
    assert!(store.list(0).unwrap().is_empty());
    assert_eq!(store.list(u32::MAX).unwrap().len(), 6);
    // Listed jobs are full views.
    let oldest = store.list(100).unwrap().pop().unwrap();
    assert_eq!(oldest.history.len(), 2);
    assert_eq!(oldest.spec, Some(spec("q3")));
}

#[test]
fn list_caps_the_limit() {
    let (_dir, store) = open_temp();
    for i in 0..(MAX_LIST_LIMIT as i64 + 5) {
        store.submit(&spec("q3"), "", "alice", i).unwrap();
    }
    assert_eq!(store.list(u32::MAX).unwrap().len(), MAX_LIST_LIMIT as usize);
}

#[test]
fn unfinished_lists_non_terminal_jobs() {
    let (_dir, store) = open_temp();
    let submit = || store.submit(&spec("q3"), "", "alice", 0).unwrap().job_id;
    let pending = submit();
    let offered = submit();
    let running = submit();
    let done = submit();
    let vetoed = submit();
    store
        .transition(&offered, JobState::Offered, "", 1)
        .unwrap();
    store
        .transition(&running, JobState::Offered, "", 1)
        .unwrap();
    store
        .transition(&running, JobState::Running, "", 2)
        .unwrap();
    store.transition(&done, JobState::Offered, "", 1).unwrap();
    store.transition(&done, JobState::Running, "", 2).unwrap();
    store.transition(&done, JobState::Succeeded, "", 3).unwrap();
    store
        .transition(&vetoed, JobState::Vetoed, "acme: policy", 1)
        .unwrap();

    assert_eq!(
        store.unfinished().unwrap(),
        vec![pending.clone(), offered.clone(), running.clone()]
    );
    for id in [&pending, &offered, &running] {
        store
            .transition(id, JobState::Failed, "coordinator restarted", 10)
            .unwrap();
    }
    assert!(store.unfinished().unwrap().is_empty());
}

#[test]
fn a_node_is_last_seen_when_it_leaves() {
    let (_dir, store) = open_temp();
    store.record_node("acme", "10.0.0.1:7000", 100).unwrap();
    store.node_seen("acme", 5_000).unwrap();
    store.node_seen("acme", 4_000).unwrap();
    store.node_seen("nobody", 6_000).unwrap();
    let nodes = store.nodes().unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].last_seen_ms, 5_000);
}

#[test]
fn node_registry_upserts() {
    let (_dir, store) = open_temp();
    assert!(store.nodes().unwrap().is_empty());
    store.record_node("globex", "10.0.0.2:7000", 100).unwrap();
    store.record_node("acme", "10.0.0.1:7000", 200).unwrap();
    store.record_node("acme", "10.0.0.9:7001", 300).unwrap();
    assert_eq!(
        store.nodes().unwrap(),
        vec![
            NodeRecord {
                name: "acme".into(),
                data_addr: "10.0.0.9:7001".into(),
                last_seen_ms: 300,
            },
            NodeRecord {
                name: "globex".into(),
                data_addr: "10.0.0.2:7000".into(),
                last_seen_ms: 100,
            },
        ]
    );
}

#[test]
fn corrupt_stored_spec_is_an_error_not_a_panic() {
    let (_dir, store) = open_temp();
    let job = store.submit(&spec("q3"), "", "alice", 0).unwrap();
    // 0xff starts a varint that never ends.
    tamper(
        &store,
        "UPDATE jobs SET spec = x'ffffff' WHERE job_id = ?1",
        &job.job_id,
    );

    for err in [
        store.get(&job.job_id).unwrap_err(),
        store.list(10).unwrap_err(),
        store
            .put_result(&job.job_id, "acme", &outcome(1))
            .unwrap_err(),
    ] {
        match err {
            StoreError::Corrupt { job_id, reason } => {
                assert_eq!(job_id, job.job_id);
                assert!(reason.contains("job spec"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}

#[test]
fn corrupt_state_and_result_are_errors_not_panics() {
    let (_dir, store) = open_temp();
    let job = store.submit(&spec("q3"), "", "alice", 0).unwrap();
    store.put_result(&job.job_id, "acme", &outcome(1)).unwrap();
    tamper(
        &store,
        "UPDATE job_results SET outcome = x'ff' WHERE job_id = ?1",
        &job.job_id,
    );
    assert!(matches!(
        store.get(&job.job_id),
        Err(StoreError::Corrupt { .. })
    ));

    tamper(
        &store,
        "UPDATE jobs SET state = 99 WHERE job_id = ?1",
        &job.job_id,
    );
    assert!(matches!(
        store.transition(&job.job_id, JobState::Offered, "", 1),
        Err(StoreError::Corrupt { .. })
    ));
    assert!(matches!(
        store.get(&job.job_id),
        Err(StoreError::Corrupt { .. })
    ));
}

/// Eight threads submit one key at once, each through the store `connect` gives it (before they
/// start together); every one must be told of the same job, and only one that it created it.
fn submit_at_once<S: std::borrow::Borrow<JobStore>>(
    connect: impl Fn() -> S + Send + Sync + 'static,
) {
    let connect = Arc::new(connect);
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let connect = Arc::clone(&connect);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let store = connect();
                barrier.wait();
                store
                    .borrow()
                    .submit(&spec("q3"), "nightly-1", "alice", i)
                    .unwrap()
            })
        })
        .collect();
    let results: Vec<Submitted> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(results.iter().filter(|s| s.created).count(), 1);
    assert!(results.iter().all(|s| s.job_id == results[0].job_id));
}

#[test]
fn concurrent_submits_with_one_key_create_one_job() {
    let (_dir, store) = open_temp();
    let store = Arc::new(store);
    let shared = Arc::clone(&store);
    submit_at_once(move || Arc::clone(&shared));
    assert_eq!(store.list(100).unwrap().len(), 1);
}

#[test]
fn concurrent_submits_from_separate_connections_create_one_job() {
    // As if several coordinator processes shared the file: SQLite's locks, not the mutex,
    // must keep the key unique.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.sqlite");
    drop(JobStore::open(&path).unwrap());
    let each = path.clone();
    submit_at_once(move || JobStore::open(&each).unwrap());
    assert_eq!(JobStore::open(&path).unwrap().list(100).unwrap().len(), 1);
}

fn new_schedule(name: &str) -> NewSchedule {
    NewSchedule {
        name: name.into(),
        cron: "0 2 * * *".into(),
        timezone: "Europe/Berlin".into(),
        spec: spec("overlap-reporting"),
        owner: "alice".into(),
        max_retries: 2,
        backoff_base_secs: 60,
    }
}

/// A version-6 store holds outcomes and aggregate results that carried each party's row
/// counts (fields since reserved): opening it rewrites them without, and keeps the rest.
#[test]
fn version_6_results_lose_the_parties_row_counts() {
    use cleanroom_proto::v1::{AggregatePartyStats, AggregateResult};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.sqlite");
    // Field 7 (rows_read) = 918273 as an old node reported it; field 2 (rows_read) of a
    // party's stats inside field 8 of an aggregate result = 564738.
    let mut old_outcome = outcome(5).encode_to_vec();
    old_outcome.extend([0x38, 0x81, 0x86, 0x38]);
    assert_eq!(
        PsiOutcome::decode(old_outcome.as_slice()).unwrap(),
        outcome(5)
    );
    let mut party = AggregatePartyStats {
        node: "acme".into(),
        audit_head: "3:ab".into(),
        ..AggregatePartyStats::default()
    }
    .encode_to_vec();
    party.extend([0x10, 0x82, 0xbc, 0x22]);
    let mut old_result = AggregateResult {
        columns: vec!["count".into()],
        min_result: 10,
        ..AggregateResult::default()
    }
    .encode_to_vec();
    old_result.push(0x42);
    old_result.push(party.len() as u8);
    old_result.extend(&party);
    let job_id = {
        let store = JobStore::open(&path).unwrap();
        let job = store.submit(&spec("q3"), "k1", "alice", 1_000).unwrap();
        store
            .put_aggregate_result(&job.job_id, AggregateResult::default(), 2_000)
            .unwrap();
        let conn = store.lock();
        conn.execute(
            "INSERT INTO job_results (job_id, node, outcome) VALUES (?1, 'acme', ?2)",
            params![job.job_id, old_outcome],
        )
        .unwrap();
        conn.execute(
            "UPDATE aggregate_results SET result = ?2 WHERE job_id = ?1",
            params![job.job_id, old_result],
        )
        .unwrap();
        conn.execute_batch("DELETE FROM schema_version; INSERT INTO schema_version VALUES (6);")
            .unwrap();
        job.job_id
    };
    let store = JobStore::open(&path).unwrap();
    let (outcome_bytes, result_bytes): (Vec<u8>, Vec<u8>) = store
        .lock()
        .query_row(
            "SELECT o.outcome, a.result FROM job_results o JOIN aggregate_results a \
             USING (job_id) WHERE job_id = ?1",
            [&job_id],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    assert_eq!(outcome_bytes, outcome(5).encode_to_vec());
    let result = AggregateResult::decode(result_bytes.as_slice()).unwrap();
    assert_eq!(result.parties[0].node, "acme");
    assert_eq!(result.parties[0].audit_head, "3:ab");
    assert_eq!(result_bytes, result.encode_to_vec());
    assert!(
        !result_bytes
            .windows(4)
            .any(|w| w == [0x10, 0x82, 0xbc, 0x22])
    );
    drop(store);
    // Nor do the old bytes linger in the file.
    let file = std::fs::read(&path).unwrap();
    for needle in [[0x38u8, 0x81, 0x86, 0x38], [0x10, 0x82, 0xbc, 0x22]] {
        assert!(
            !file.windows(4).any(|w| w == needle),
            "{needle:x?} survived"
        );
    }
}

#[test]
fn version_1_database_is_migrated_and_keeps_its_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jobs.sqlite");
    // A version-1 database: the v1 tables only.
    let job_id = {
        let store = JobStore::open(&path).unwrap();
        let job = store.submit(&spec("q3"), "k1", "alice", 1_000).unwrap();
        store
            .lock()
            .execute_batch(
                "DROP TABLE schedule_runs; DROP TABLE schedules; \
                 DELETE FROM schema_version; INSERT INTO schema_version VALUES (1);",
            )
            .unwrap();
        job.job_id
    };
    let store = JobStore::open(&path).unwrap();
    assert_eq!(schema_versions(&store), vec![1, SCHEMA_VERSION]);
    assert_eq!(store.get(&job_id).unwrap().unwrap().spec, Some(spec("q3")));
    store.add_schedule(&new_schedule("nightly"), 0).unwrap();
    drop(store);
    // And it opens again as the current version.
    let store = JobStore::open(&path).unwrap();
    assert_eq!(store.list_schedules().unwrap().len(), 1);
}

#[test]
fn schedules_add_list_pause_resume_remove() {
    let (_dir, store) = open_temp();
    // 2025-01-06 00:00 UTC; 02:00 in Berlin is 01:00 UTC.
    let now = 1_736_121_600_000;
    let added = store.add_schedule(&new_schedule("nightly"), now).unwrap();
    assert_eq!(added.next_run_ms, Some(now + 3_600_000));
    assert_eq!(added.timezone, "Europe/Berlin");
    assert_eq!(store.get_schedule("nightly").unwrap(), Some(added.clone()));
    assert!(matches!(
        store.add_schedule(&new_schedule("nightly"), now),
        Err(StoreError::ScheduleExists(_))
    ));
    let bad = |edit: fn(&mut NewSchedule)| {
        let mut new = new_schedule("x");
        edit(&mut new);
        match store.add_schedule(&new, now) {
            Err(StoreError::InvalidSchedule(msg)) => msg,
            other => panic!("expected invalid, got {other:?}"),
        }
    };
    assert!(bad(|n| n.cron = "0 25 * * *".into()).contains("hour"));
    assert!(bad(|n| n.timezone = "Nowhere/Land".into()).contains("time zone"));
    assert!(bad(|n| n.name = "a b".into()).contains("may contain only"));
    assert!(bad(|n| n.backoff_base_secs = 0).contains("at least 1 second"));
    assert!(bad(|n| n.max_retries = 99).contains("at most"));
    assert!(bad(|n| n.spec.parties.clear()).len() > 3);

    assert!(store.pause_schedule("nightly").unwrap().paused);
    assert!(
        store
            .due_schedules(now + 10 * 86_400_000)
            .unwrap()
            .is_empty()
    );
    let resumed = store.resume_schedule("nightly", now + 86_400_000).unwrap();
    assert!(!resumed.paused);
    assert_eq!(resumed.next_run_ms, Some(now + 86_400_000 + 3_600_000));
    assert_eq!(store.due_schedules(now + 2 * 86_400_000).unwrap().len(), 1);

    // Runs are recorded once per (occurrence, attempt).
    let job = store
        .submit(&spec("overlap-reporting"), "", "alice", now)
        .unwrap();
    assert!(
        store
            .record_run("nightly", 5, 0, &job.job_id, "cron", now)
            .unwrap()
    );
    assert!(
        !store
            .record_run("nightly", 5, 0, &job.job_id, "cron", now)
            .unwrap()
    );
    assert!(!store.record_skipped("nightly", 5, "missed", now).unwrap());
    assert!(matches!(
        store.record_run("nope", 5, 0, &job.job_id, "cron", now),
        Err(StoreError::UnknownSchedule(_))
    ));
    // A run must name a real job.
    assert!(
        store
            .record_run("nightly", 6, 0, "job-nope", "cron", now)
            .is_err()
    );

    // Remove keeps the history; the name is free again.
    store.remove_schedule("nightly", now).unwrap();
    assert!(store.get_schedule("nightly").unwrap().is_none());
    assert!(store.list_schedules().unwrap().is_empty());
    assert_eq!(store.runs("nightly", 0).unwrap().len(), 1);
    assert!(
        store
            .schedule_for_report("nightly")
            .unwrap()
            .unwrap()
            .removed_ms
            .is_some()
    );
    let again = store.add_schedule(&new_schedule("nightly"), now).unwrap();
    assert_ne!(again.id, added.id);
    assert!(store.runs("nightly", 0).unwrap().is_empty());
    assert!(matches!(
        store.remove_schedule("nope", now),
        Err(StoreError::UnknownSchedule(_))
    ));
}

#[test]
fn corrupt_schedule_spec_is_an_error() {
    let (_dir, store) = open_temp();
    store.add_schedule(&new_schedule("nightly"), 0).unwrap();
    store
        .lock()
        .execute("UPDATE schedules SET spec = x'ffffff'", [])
        .unwrap();
    assert!(matches!(
        store.list_schedules(),
        Err(StoreError::CorruptSchedule { .. })
    ));
}

#[test]
fn errors_read_well() {
    let err = StoreError::IllegalTransition {
        job_id: "job-0123456789abcdef".into(),
        from: JobState::Succeeded,
        to: JobState::Running,
    };
    assert_eq!(
        err.to_string(),
        "job job-0123456789abcdef is succeeded and cannot move to running"
    );
    assert_eq!(
        StoreError::UnknownJob("job-x".into()).to_string(),
        "no job with id 'job-x'"
    );
}
