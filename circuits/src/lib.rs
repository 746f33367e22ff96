//! Sans-IO cryptographic protocols of cleanroom.
#![warn(missing_docs)]

pub mod items;

pub use items::ItemSet;
