-- Job store of the cleanroom coordinator, schema version 7.
--
-- Applied by `JobStore::open` in one transaction when the database has no schema yet; the
-- version row it writes is what future migrations start from. Every statement is written so that
-- re-running the script on an existing database changes nothing: that is also the migration from
-- version 1 (which lacked the `schedules` and `schedule_runs` tables), from version 2 (which
-- lacked `schedule_notify` and `schedule_run_notified`), from version 3 (which lacked
-- `job_leases`), from version 4 (which lacked `aggregate_results`) and from version 5 (which
-- lacked `aggregate_result_pages`). Version 7 changed no table: its migration rewrites the stored
-- outcomes and aggregate results without the fields that carried a party's own row counts
-- (reserved in the wire protocol since), so a store written before holds none of them either.
--
-- Protobuf messages are stored as their encoded bytes (`spec`, `outcome`); the other columns
-- exist to query and to order by. States are `cleanroom.v1.JobState` numbers.

CREATE TABLE IF NOT EXISTS schema_version (
  version INTEGER NOT NULL PRIMARY KEY
);

CREATE TABLE IF NOT EXISTS jobs (
  -- Insertion order: breaks ties between jobs created in the same millisecond.
  seq             INTEGER PRIMARY KEY AUTOINCREMENT,
  job_id          TEXT    NOT NULL UNIQUE,
  -- NULL when the analyst gave no key (NULLs never collide in a UNIQUE constraint).
  idempotency_key TEXT,
  submitted_by    TEXT    NOT NULL,
  -- Encoded cleanroom.v1.JobSpec.
  spec            BLOB    NOT NULL,
  -- cleanroom.v1.JobKind of the spec, for queries.
  kind            INTEGER NOT NULL,
  state           INTEGER NOT NULL,
  -- Reason of the latest transition (same as the last history row).
  reason          TEXT    NOT NULL,
  created_ms      INTEGER NOT NULL,
  updated_ms      INTEGER NOT NULL,
  -- A key is scoped to the analyst who used it.
  UNIQUE (submitted_by, idempotency_key)
);

CREATE INDEX IF NOT EXISTS jobs_by_recency ON jobs (created_ms DESC, seq DESC);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state);

-- Every state a job entered, in order (`id` is the order), the first row being its submission.
CREATE TABLE IF NOT EXISTS job_history (
  id     INTEGER PRIMARY KEY AUTOINCREMENT,
  job_id TEXT    NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
  state  INTEGER NOT NULL,
  at_ms  INTEGER NOT NULL,
  reason TEXT    NOT NULL
);

CREATE INDEX IF NOT EXISTS job_history_by_job ON job_history (job_id, id);

-- What each party reported; one row per (job, node), replaced on a new report.
CREATE TABLE IF NOT EXISTS job_results (
  job_id  TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
  node    TEXT NOT NULL,
  -- Encoded cleanroom.v1.PsiOutcome.
  outcome BLOB NOT NULL,
  PRIMARY KEY (job_id, node)
);

-- Node registry: the last hello of each node.
CREATE TABLE IF NOT EXISTS nodes (
  name         TEXT    NOT NULL PRIMARY KEY,
  data_addr    TEXT    NOT NULL,
  last_seen_ms INTEGER NOT NULL
);

-- Recurring jobs (version 2). A removed schedule keeps its row (`removed_ms` set) so that its
-- runs keep their history; its name can then be used by a new schedule.
CREATE TABLE IF NOT EXISTS schedules (
  id                 INTEGER PRIMARY KEY AUTOINCREMENT,
  name               TEXT    NOT NULL,
  cron               TEXT    NOT NULL,
  -- IANA name, 'UTC' by default.
  timezone           TEXT    NOT NULL,
  -- Encoded cleanroom.v1.JobSpec: what every run submits.
  spec               BLOB    NOT NULL,
  -- The analyst who added it; its jobs are submitted in that name.
  owner              TEXT    NOT NULL,
  paused             INTEGER NOT NULL DEFAULT 0,
  created_ms         INTEGER NOT NULL,
  -- Next cron occurrence not yet handled (fired or skipped); NULL if it never fires again.
  next_run_ms        INTEGER,
  -- The latest occurrence that was fired.
  last_fired_ms      INTEGER,
  -- Retry policy of failed or vetoed runs.
  max_retries        INTEGER NOT NULL,
  backoff_base_secs  INTEGER NOT NULL,
  removed_ms         INTEGER
);

CREATE UNIQUE INDEX IF NOT EXISTS schedules_live_name ON schedules (name) WHERE removed_ms IS NULL;

-- Every run of a schedule: one row per (occurrence, attempt). The uniqueness is what keeps a run
-- from firing twice, even across a restart. A skipped occurrence (missed while the coordinator
-- was down, see `schedule.rs`) has no job.
CREATE TABLE IF NOT EXISTS schedule_runs (
  id               INTEGER PRIMARY KEY AUTOINCREMENT,
  schedule_id      INTEGER NOT NULL REFERENCES schedules (id),
  scheduled_for_ms INTEGER NOT NULL,
  attempt          INTEGER NOT NULL,
  job_id           TEXT    REFERENCES jobs (job_id),
  -- 'submitted' (a job exists), 'skipped' (missed while down) or 'not-submitted' (refused).
  status           TEXT    NOT NULL,
  note             TEXT    NOT NULL,
  recorded_ms      INTEGER NOT NULL,
  UNIQUE (schedule_id, scheduled_for_ms, attempt)
);

CREATE INDEX IF NOT EXISTS schedule_runs_by_time ON schedule_runs (schedule_id, scheduled_for_ms);

-- Notifications of a schedule (version 3): when one of its runs ends (succeeded, failed or
-- vetoed), run `on_done` and/or write the run's JSON into `notify_dir` (see `schedule.rs`).
-- Empty means none; a schedule without a row has neither.
CREATE TABLE IF NOT EXISTS schedule_notify (
  schedule_id INTEGER PRIMARY KEY REFERENCES schedules (id),
  on_done     TEXT    NOT NULL DEFAULT '',
  notify_dir  TEXT    NOT NULL DEFAULT ''
);

-- Runs whose end has been notified (version 3): each run is notified at most once, even across
-- a restart (it is recorded before the notification is carried out).
CREATE TABLE IF NOT EXISTS schedule_run_notified (
  run_id      INTEGER PRIMARY KEY REFERENCES schedule_runs (id),
  notified_ms INTEGER NOT NULL
);

-- Which coordinator instance is executing a job (version 4). A runner holds the lease of its job
-- and renews it while it lives; a terminal transition deletes it. An unfinished job whose lease
-- has expired (or that never had one) has no live runner: a pending one is resumed, an offered or
-- running one is failed with a reason (the nodes dropped it with the runner's connections).
CREATE TABLE IF NOT EXISTS job_leases (
  job_id     TEXT    NOT NULL PRIMARY KEY REFERENCES jobs (job_id) ON DELETE CASCADE,
  -- Random id of the coordinator process that holds it.
  holder     TEXT    NOT NULL,
  expires_ms INTEGER NOT NULL
);

-- The result of each succeeded aggregate job (version 5): the reconstructed, noised,
-- thresholded totals as an encoded cleanroom.v1.AggregateResult. Partials are never stored.
CREATE TABLE IF NOT EXISTS aggregate_results (
  job_id    TEXT    NOT NULL PRIMARY KEY REFERENCES jobs (job_id) ON DELETE CASCADE,
  result    BLOB    NOT NULL,
  stored_ms INTEGER NOT NULL
);

-- The groups of an aggregate result too large to answer in one GetJob frame (version 6), in
-- pages: each row holds the groups first_group, first_group + 1, … as an encoded
-- cleanroom.v1.AggregatePage. The `aggregate_results` row of such a job holds everything else
-- (columns, noise, parties, total_groups) and no groups; a result that fits keeps its groups in
-- that row and has no pages.
CREATE TABLE IF NOT EXISTS aggregate_result_pages (
  job_id      TEXT    NOT NULL REFERENCES aggregate_results (job_id) ON DELETE CASCADE,
  first_group INTEGER NOT NULL,
  page        BLOB    NOT NULL,
  PRIMARY KEY (job_id, first_group)
);

-- Every signed audit head a node reported (version 8), with the job whose offer reply or report
-- carried it. The signature was checked before the row was written; the rows are what a node's
-- log is verified against later (`cleanroom audit-heads`, `cleanroom-node audit verify --heads`).
CREATE TABLE IF NOT EXISTS audit_heads (
  id          INTEGER PRIMARY KEY AUTOINCREMENT,
  node        TEXT    NOT NULL,
  job_id      TEXT    NOT NULL,
  -- The head is SEQ:HASH; the hash is kept as 32 raw bytes.
  seq         INTEGER NOT NULL,
  hash        BLOB    NOT NULL,
  public_key  BLOB    NOT NULL,
  signature   BLOB    NOT NULL,
  received_ms INTEGER NOT NULL,
  UNIQUE (node, seq, hash, public_key)
);

CREATE INDEX IF NOT EXISTS audit_heads_by_node ON audit_heads (node, seq);
