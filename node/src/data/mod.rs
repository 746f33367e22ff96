//! The node's data: its datasets as the config declares them, how rows are read and normalised,
//! and what keeps rows out of a job or a file on disk.
//!
//! - [`schema`]: a dataset's declaration (file, identifier, value and consent columns);
//! - [`normalise`]: identifier normalisers (email, phone to E.164, generic);
//! - [`source`]: where rows come from: the strict CSV reader for local CSV, DataFusion for
//!   Parquet, JSON lines, remote files and SQL views;
//! - [`dataset`]: streaming rows into join keys, through the consent and deletion filters
//!   ([`RowFilter`]);
//! - [`cluster_pass`]: that pass for an overlap, a match or an overlap-sum on the partner's
//!   Ballista executors, blinding included, its secrets sealed;
//! - [`cluster_outcome`]: an overlap-sum value holder's rows grouped by point there;
//! - [`cluster_reblind`]: re-blinding the partner's points there, in pieces, the key sealed;
//! - [`cluster_merge`]: a spilled session's final comparison there, bucket by bucket, over
//!   bucket files in a directory the executors share;
//! - `cluster_job`: the small job each of those pieces is;
//! - [`cluster_encrypt`]: an overlap-sum value holder's rows encrypted there, in pieces, its
//!   Paillier key and rows sealed;
//! - [`cluster_aggregate`]: an aggregate's pass and grouping there, as plan operators;
//! - [`sum_input`]: an `overlap-sum` value holder's rows, summed per identifier then clipped;
//! - [`aggregate_input`]: an `aggregate` party's clipped per-group vector;
//! - [`forget`]: the deletion list (keyed hashes of forgotten identifiers);
//! - [`retention`]: purging old job outputs.
//!
//! Nothing here knows about agreements or jobs: the policy decides which columns a job may read,
//! and passes them in.

pub mod aggregate_input;
pub mod cluster_aggregate;
pub mod cluster_encrypt;
mod cluster_job;
pub mod cluster_lines;
pub mod cluster_merge;
pub mod cluster_outcome;
pub mod cluster_pass;
pub mod cluster_reblind;
pub mod dataset;
pub mod forget;
pub mod normalise;
pub mod retention;
pub mod schema;
pub mod source;
pub mod sum_input;
pub mod value;

pub use dataset::{
    Forgotten, KeySpec, LoadedKeys, RejectedRow, Rejections, RowCounts, RowFilter, key_name,
};
pub use schema::{
    DataFormat, DatasetConfig, Delimiter, IdentifierConfig, TableConfig, ValueColumn,
};
