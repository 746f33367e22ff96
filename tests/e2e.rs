//! The end-to-end suite: real `cleanroom` processes on loopback, one module per file.
//!
//! Run one file's tests with `cargo test -p cleanroom-e2e --test e2e -- faults::`.

mod adversary;
mod adversary_aggregate;
mod aggregate;
mod audit;
mod auth;
mod budget;
mod dashboard;
mod dayone;
mod faults;
mod formats;
mod identity;
mod leaks;
mod matrix;
mod nested_parquet;
mod overlap_sum;
mod partition;
mod policy;
mod psi;
mod refusals;
mod s3;
mod schedule;
mod views;
mod web;
