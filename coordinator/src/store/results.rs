//! What the parties reported: each node's outcome of a two-party job (`job_results`), and the
//! reconstructed result of an aggregate job (`aggregate_results`, `aggregate_result_pages`).

use cleanroom_proto::v1::PsiOutcome;
use prost::Message;
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::error::StoreError;
use super::jobs::decode_spec;
use super::schema::JobStore;

/// Whether a report carries no released figure by design: an overlap-sum key holder's, which
/// only repeats the release's terms (the value holder's report carries the figures).
pub fn releases_nothing(outcome: &PsiOutcome) -> bool {
    outcome.sum.as_ref().is_some_and(|s| s.groups.is_empty())
}

impl JobStore {
    /// Stores what `node` reported for a job, replacing an earlier report of the same node.
    /// The node must be one of the job's parties ([`StoreError::NotAParty`] otherwise).
    pub fn put_result(
        &self,
        job_id: &str,
        node: &str,
        outcome: &PsiOutcome,
    ) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let spec: Option<Vec<u8>> = tx
            .query_row("SELECT spec FROM jobs WHERE job_id = ?1", [job_id], |row| {
                row.get(0)
            })
            .optional()?;
        let Some(spec) = spec else {
            return Err(StoreError::UnknownJob(job_id.to_owned()));
        };
        let spec = decode_spec(job_id, &spec)?;
        if !spec.parties.iter().any(|party| party.node == node) {
            return Err(StoreError::NotAParty {
                job_id: job_id.to_owned(),
                node: node.to_owned(),
            });
        }
        tx.execute(
            "INSERT INTO job_results (job_id, node, outcome) VALUES (?1, ?2, ?3) \
             ON CONFLICT (job_id, node) DO UPDATE SET outcome = excluded.outcome",
            params![job_id, node, outcome.encode_to_vec()],
        )?;
        tx.commit()?;
        Ok(())
    }
}

// ---------------------------------------------------------------- aggregate results
//
// One row per succeeded aggregate job in `aggregate_results` (schema version 5): the
// reconstructed, noised, thresholded result (prost-encoded `AggregateResult`). A result whose
// encoding exceeds [`MAX_INLINE_RESULT_BYTES`] keeps its groups apart, in
// `aggregate_result_pages` (version 6), [`STORE_PAGE_GROUPS`] to a row, so that GetJob stays
// under the frame cap and a page is read without decoding the whole result. Partials are never
// stored.

/// Largest encoded result stored with its groups in one row (and so answered whole by GetJob):
/// 768 KiB, which leaves room in the 1 MiB frame for the spec (a label spec is at most ~170 KiB),
/// the history and the rest of `JobInfo`.
pub const MAX_INLINE_RESULT_BYTES: usize = 768 * 1024;

/// Groups per stored page row of a large result.
pub const STORE_PAGE_GROUPS: usize = 4096;

/// Most groups one GetAggregatePage answer carries.
pub const MAX_PAGE_GROUPS: usize = 16_384;

/// Most encoded bytes of groups in one GetAggregatePage answer: well under the 1 MiB frame cap
/// whatever the labels (a group is at most ~170 bytes: a 64-byte label and 9 values).
pub const MAX_PAGE_BYTES: usize = 896 * 1024;

impl JobStore {
    /// Stores the result of an aggregate job (replacing an earlier one for the same job), in one
    /// transaction: whole if its encoding fits [`MAX_INLINE_RESULT_BYTES`], otherwise its groups
    /// in pages. Either way `total_groups` is set.
    pub fn put_aggregate_result(
        &self,
        job_id: &str,
        result: cleanroom_proto::v1::AggregateResult,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut meta = result;
        let groups = std::mem::take(&mut meta.groups);
        self.put_aggregate_result_streamed(job_id, meta, groups.into_iter(), now_ms)
    }

    /// [`JobStore::put_aggregate_result`] with the groups given one at a time: they are held
    /// only until their encoding passes [`MAX_INLINE_RESULT_BYTES`], then written in pages of
    /// [`STORE_PAGE_GROUPS`] as they come, so a result of 10^6 groups is never whole in memory.
    /// `meta`'s own groups and `total_groups` are replaced.
    pub fn put_aggregate_result_streamed(
        &self,
        job_id: &str,
        mut meta: cleanroom_proto::v1::AggregateResult,
        groups: impl Iterator<Item = cleanroom_proto::v1::AggregateGroup>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        use cleanroom_proto::v1::{AggregateGroup, AggregatePage};
        meta.groups.clear();
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let exists: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM jobs WHERE job_id = ?1)",
            [job_id],
            |row| row.get(0),
        )?;
        if !exists {
            return Err(StoreError::UnknownJob(job_id.to_owned()));
        }
        tx.execute(
            "DELETE FROM aggregate_result_pages WHERE job_id = ?1",
            [job_id],
        )?;
        // The row first (the pages reference it), completed below.
        let upsert = "INSERT INTO aggregate_results (job_id, result, stored_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (job_id) DO UPDATE SET result = excluded.result, \
             stored_ms = excluded.stored_ms";
        tx.execute(upsert, params![job_id, meta.encode_to_vec(), now_ms])?;
        // The encoding of the whole result as far as known: the rest, `total_groups` (at most
        // 11 bytes) and the groups so far (each a length-delimited field).
        let mut inline_len = meta.encoded_len() + 11;
        let mut held: Vec<AggregateGroup> = Vec::new();
        let mut paged = false;
        let mut total = 0u64;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO aggregate_result_pages (job_id, first_group, page) VALUES (?1, ?2, ?3)",
            )?;
            let mut first = 0u64;
            // Writes `page` as the stored page starting at group `first` (the total lives in
            // the `aggregate_results` row, not in the pages).
            let mut write = |page: Vec<AggregateGroup>| -> Result<(), StoreError> {
                let page = AggregatePage {
                    offset: first,
                    total_groups: 0,
                    groups: page,
                };
                insert.execute(params![
                    job_id,
                    i64::try_from(first).unwrap_or(i64::MAX),
                    page.encode_to_vec()
                ])?;
                first += page.groups.len() as u64;
                Ok(())
            };
            for g in groups {
                total += 1;
                if !paged {
                    let len = g.encoded_len();
                    inline_len += 1 + prost::encoding::encoded_len_varint(len as u64) + len;
                    held.push(g);
                    if inline_len > MAX_INLINE_RESULT_BYTES {
                        // Too large to answer whole: what is held goes to full pages, the
                        // rest waits for the next groups.
                        paged = true;
                        let mut rest = std::mem::take(&mut held);
                        while rest.len() >= STORE_PAGE_GROUPS {
                            let tail = rest.split_off(STORE_PAGE_GROUPS);
                            write(std::mem::replace(&mut rest, tail))?;
                        }
                        held = rest;
                    }
                } else {
                    held.push(g);
                    if held.len() == STORE_PAGE_GROUPS {
                        write(std::mem::take(&mut held))?;
                    }
                }
            }
            if paged && !held.is_empty() {
                write(std::mem::take(&mut held))?;
            }
        }
        meta.total_groups = total;
        if !paged {
            meta.groups = held;
        }
        tx.execute(upsert, params![job_id, meta.encode_to_vec(), now_ms])?;
        tx.commit()?;
        Ok(())
    }

    /// The stored result of an aggregate job, if any: whole when it fits one frame, otherwise
    /// without its groups (`total_groups` says how many to read with
    /// [`JobStore::get_aggregate_page`]).
    pub fn get_aggregate_result(
        &self,
        job_id: &str,
    ) -> Result<Option<cleanroom_proto::v1::AggregateResult>, StoreError> {
        let conn = self.lock();
        let blob: Option<Vec<u8>> = conn
            .query_row(
                "SELECT result FROM aggregate_results WHERE job_id = ?1",
                [job_id],
                |row| row.get(0),
            )
            .optional()?;
        let Some(blob) = blob else {
            return Ok(None);
        };
        let mut result = cleanroom_proto::v1::AggregateResult::decode(blob.as_slice())
            .map_err(|e| corrupt(job_id, format!("aggregate result: {e}")))?;
        // Results stored before `total_groups` existed hold all their groups.
        if result.total_groups == 0 {
            result.total_groups = result.groups.len() as u64;
        }
        Ok(Some(result))
    }

    /// Groups `offset`, `offset + 1`, … of an aggregate result: at most `limit` (0 or more than
    /// [`MAX_PAGE_GROUPS`]: that cap), and fewer if their encoding would pass
    /// [`MAX_PAGE_BYTES`] (always at least one while any remain). Past the end: no groups.
    /// `None` if the job has no stored result.
    pub fn get_aggregate_page(
        &self,
        job_id: &str,
        offset: u64,
        limit: u32,
    ) -> Result<Option<cleanroom_proto::v1::AggregatePage>, StoreError> {
        let Some(meta) = self.get_aggregate_result(job_id)? else {
            return Ok(None);
        };
        let total = meta.total_groups;
        let limit = match limit as usize {
            0 => MAX_PAGE_GROUPS,
            l => l.min(MAX_PAGE_GROUPS),
        };
        let end = total.min(offset.saturating_add(limit as u64));
        let mut page = cleanroom_proto::v1::AggregatePage {
            offset,
            total_groups: total,
            groups: Vec::new(),
        };
        if offset >= end {
            return Ok(Some(page));
        }
        let mut bytes = 0usize;
        let mut take = |page: &mut cleanroom_proto::v1::AggregatePage,
                        g: cleanroom_proto::v1::AggregateGroup|
         -> bool {
            // Field tag and length prefix of a repeated message: at most 1 + 10 bytes.
            let len = g.encoded_len() + 11;
            if !page.groups.is_empty() && bytes + len > MAX_PAGE_BYTES {
                return false;
            }
            bytes += len;
            page.groups.push(g);
            true
        };
        if !meta.groups.is_empty() || total == 0 {
            for g in meta
                .groups
                .into_iter()
                .skip(usize::try_from(offset).unwrap_or(usize::MAX))
                .take((end - offset) as usize)
            {
                if !take(&mut page, g) {
                    break;
                }
            }
            return Ok(Some(page));
        }
        let first_row = offset - offset % STORE_PAGE_GROUPS as u64;
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT first_group, page FROM aggregate_result_pages \
             WHERE job_id = ?1 AND first_group >= ?2 AND first_group < ?3 ORDER BY first_group",
        )?;
        let mut rows = stmt.query(params![
            job_id,
            i64::try_from(first_row).unwrap_or(i64::MAX),
            i64::try_from(end).unwrap_or(i64::MAX)
        ])?;
        let mut next = offset;
        'rows: while let Some(row) = rows.next()? {
            let first: i64 = row.get(0)?;
            let blob: Vec<u8> = row.get(1)?;
            let stored = cleanroom_proto::v1::AggregatePage::decode(blob.as_slice())
                .map_err(|e| corrupt(job_id, format!("aggregate page {first}: {e}")))?;
            let first = u64::try_from(first).map_err(|_| corrupt(job_id, "negative page"))?;
            if first > next {
                return Err(corrupt(job_id, format!("aggregate page {next} is missing")));
            }
            for g in stored
                .groups
                .into_iter()
                .skip((next - first) as usize)
                .take((end - next) as usize)
            {
                if !take(&mut page, g) {
                    break 'rows;
                }
                next += 1;
            }
        }
        if page.groups.is_empty() {
            return Err(corrupt(
                job_id,
                format!("aggregate page {offset} is missing"),
            ));
        }
        Ok(Some(page))
    }
}

fn corrupt(job_id: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        job_id: job_id.to_owned(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod aggregate_result_tests {
    use super::*;
    use cleanroom_proto::v1::{AggregateGroup, AggregateResult};

    #[test]
    fn aggregate_results_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let store = JobStore::open(&path).unwrap();
        let spec = crate::test_support::aggregate_job(&["a", "b", "c"], "d", "p", None);
        let job = store.submit(&spec, "", "alice", 1).unwrap();
        assert_eq!(store.get_aggregate_result(&job.job_id).unwrap(), None);
        let result = AggregateResult {
            columns: vec!["count".into(), "amount".into()],
            groups: vec![AggregateGroup {
                label: "x".into(),
                suppressed: false,
                values: vec![12, -3],
            }],
            min_result: 5,
            ..AggregateResult::default()
        };
        store
            .put_aggregate_result(&job.job_id, result.clone(), 2)
            .unwrap();
        assert!(matches!(
            store.put_aggregate_result("job-nope", result.clone(), 2),
            Err(StoreError::UnknownJob(_))
        ));
        drop(store);
        let store = JobStore::open(&path).unwrap();
        // Stored whole (it fits one frame), with the number of its groups.
        assert_eq!(
            store.get_aggregate_result(&job.job_id).unwrap(),
            Some(AggregateResult {
                total_groups: 1,
                ..result
            })
        );
    }
}

#[cfg(test)]
mod aggregate_page_tests {
    use super::*;
    use cleanroom_proto::frame::MAX_FRAME_LEN;
    use cleanroom_proto::v1::{
        AggregateGroup, AggregatePage, AggregateResult, AnalystResponse, Envelope,
        analyst_response::Response, envelope::Body,
    };

    fn store_with_job() -> (tempfile::TempDir, JobStore, String) {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(&dir.path().join("jobs.db")).unwrap();
        let spec = crate::test_support::aggregate_job(&["a", "b", "c"], "d", "p", None);
        let job = store.submit(&spec, "", "alice", 1).unwrap();
        (dir, store, job.job_id)
    }

    fn result(groups: usize, label: impl Fn(usize) -> String, columns: usize) -> AggregateResult {
        AggregateResult {
            columns: (0..columns).map(|c| format!("c{c}")).collect(),
            groups: (0..groups)
                .map(|i| AggregateGroup {
                    label: label(i),
                    suppressed: i % 7 == 3,
                    values: if i % 7 == 3 {
                        vec![]
                    } else {
                        (0..columns as i64)
                            .map(|c| -(i as i64) * 1_000_003 - c)
                            .collect()
                    },
                })
                .collect(),
            min_result: 5,
            ..AggregateResult::default()
        }
    }

    /// The page as the coordinator frames it: must fit the frame cap.
    fn framed_len(page: &AggregatePage) -> usize {
        Envelope {
            job_id: "j".repeat(40),
            phase: 20,
            body: Some(Body::AnalystResponse(AnalystResponse {
                response: Some(Response::AggregatePage(page.clone())),
            })),
        }
        .encoded_len()
    }

    fn read_all(store: &JobStore, job: &str, limit: u32) -> (Vec<AggregateGroup>, usize) {
        let (mut all, mut pages) = (Vec::new(), 0);
        loop {
            let page = store
                .get_aggregate_page(job, all.len() as u64, limit)
                .unwrap()
                .unwrap();
            assert_eq!(page.offset, all.len() as u64);
            assert!(framed_len(&page) < MAX_FRAME_LEN);
            if page.groups.is_empty() {
                return (all, pages);
            }
            pages += 1;
            all.extend(page.groups);
        }
    }

    #[test]
    fn small_results_are_inline_and_paged_from_the_row() {
        let (_dir, store, job) = store_with_job();
        assert_eq!(store.get_aggregate_page(&job, 0, 0).unwrap(), None);
        let r = result(10, |i| format!("g{i}"), 2);
        store.put_aggregate_result(&job, r.clone(), 2).unwrap();
        let got = store.get_aggregate_result(&job).unwrap().unwrap();
        assert_eq!(got.groups, r.groups);
        assert_eq!(got.total_groups, 10);
        let p = store.get_aggregate_page(&job, 8, 5).unwrap().unwrap();
        assert_eq!((p.offset, p.total_groups), (8, 10));
        assert_eq!(p.groups, r.groups[8..]);
        let p = store.get_aggregate_page(&job, 10, 5).unwrap().unwrap();
        assert!(p.groups.is_empty());
        let p = store
            .get_aggregate_page(&job, u64::MAX, 5)
            .unwrap()
            .unwrap();
        assert!(p.groups.is_empty());
        assert_eq!(read_all(&store, &job, 3), (r.groups.clone(), 4));
    }

    #[test]
    fn large_results_are_stored_and_read_in_pages() {
        let (dir, store, job) = store_with_job();
        // 10^5 integer groups and "(other)", two columns: ~2.5 MB, paged.
        let n = 100_001;
        let r = result(
            n,
            |i| {
                if i + 1 == n {
                    "(other)".into()
                } else {
                    i.to_string()
                }
            },
            2,
        );
        store.put_aggregate_result(&job, r.clone(), 2).unwrap();
        let meta = store.get_aggregate_result(&job).unwrap().unwrap();
        assert!(
            meta.groups.is_empty(),
            "GetJob carries no groups of a paged result"
        );
        assert_eq!(meta.total_groups, n as u64);
        assert_eq!(meta.columns, r.columns);
        // Default and oversized limits are capped.
        let p = store.get_aggregate_page(&job, 0, 0).unwrap().unwrap();
        assert_eq!(p.groups.len(), MAX_PAGE_GROUPS);
        let p = store
            .get_aggregate_page(&job, 0, u32::MAX)
            .unwrap()
            .unwrap();
        assert_eq!(p.groups.len(), MAX_PAGE_GROUPS);
        // A page across a stored row's boundary.
        let from = STORE_PAGE_GROUPS as u64 - 3;
        let p = store.get_aggregate_page(&job, from, 10).unwrap().unwrap();
        assert_eq!(p.groups, r.groups[from as usize..from as usize + 10]);
        // Exactly at a boundary, and the last page (shorter than asked).
        let at = 2 * STORE_PAGE_GROUPS as u64;
        let p = store.get_aggregate_page(&job, at, 1).unwrap().unwrap();
        assert_eq!(p.groups, r.groups[at as usize..at as usize + 1]);
        let p = store
            .get_aggregate_page(&job, n as u64 - 4, 100)
            .unwrap()
            .unwrap();
        assert_eq!(p.groups, r.groups[n - 4..]);
        assert_eq!(p.groups.last().unwrap().label, "(other)");
        // Past the end: nothing.
        let p = store
            .get_aggregate_page(&job, n as u64, 100)
            .unwrap()
            .unwrap();
        assert!(p.groups.is_empty());
        assert_eq!(p.total_groups, n as u64);
        // Everything, in order, survives a reopen.
        drop(store);
        let store = JobStore::open(&dir.path().join("jobs.db")).unwrap();
        let (all, pages) = read_all(&store, &job, 0);
        assert_eq!(pages, n.div_ceil(MAX_PAGE_GROUPS));
        assert_eq!(all, r.groups);
        // Replacing the result replaces its pages.
        let small = result(3, |i| format!("x{i}"), 1);
        store.put_aggregate_result(&job, small.clone(), 3).unwrap();
        assert_eq!(read_all(&store, &job, 0).0, small.groups);
    }

    #[test]
    fn pages_stay_under_the_frame_cap_whatever_the_labels() {
        let (_dir, store, job) = store_with_job();
        // 64-byte labels and 9 large negative values: ~170 bytes a group.
        let n = 20_000;
        let r = result(n, |i| format!("{i:0>64}"), 9);
        store.put_aggregate_result(&job, r.clone(), 2).unwrap();
        let p = store.get_aggregate_page(&job, 0, 0).unwrap().unwrap();
        assert!(p.groups.len() < MAX_PAGE_GROUPS, "cut by bytes");
        assert!(!p.groups.is_empty());
        assert!(framed_len(&p) < MAX_FRAME_LEN);
        assert_eq!(read_all(&store, &job, 0).0, r.groups);
    }
}
