-- Job store of the cleanroom coordinator, schema version 1.
--
-- Applied by `JobStore::open` in one transaction when the database has no schema yet; the
-- version row it writes is what future migrations start from. Every statement is written so that
-- re-running the script on a version-1 database changes nothing.
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
