//! What the coordinator sends as data, rendered for people: HTML pages (inline CSS and SVG),
//! and CSV. [`page`] is the page shell they share; [`report`] a schedule's history; [`matrix`]
//! the overlap matrix.

pub mod matrix;
pub mod page;
pub mod report;
