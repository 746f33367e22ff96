//! `cleanroom-node dataset preview`: what a dataset will contribute to a job, before one runs.
//!
//! Reads the dataset exactly as a job does (the same strict reader, consent filter and deletion
//! list), once per declared identifier, and prints counts: rows read, rejected by reason (with
//! the lines of the first few), excluded for consent or deletion, and distinct keys. With
//! `--show-normalised N` it also prints what the first N accepted rows' identifiers normalise
//! to. Those values go to this terminal only: they are never logged or written to a file.

use std::path::Path;
use std::process::ExitCode;

use crate::data::dataset::{self, MAX_ROWS};
use crate::data::forget::{ForgetStore, KEY_FILE};
use crate::data::{DatasetConfig, KeySpec, RowFilter};
use crate::policy::NodeConfig;

/// Runs the preview; `purpose` selects the consent column as a job for that purpose would.
pub fn run(
    config: &Path,
    dataset_name: &str,
    purpose: Option<&str>,
    show_normalised: usize,
) -> anyhow::Result<ExitCode> {
    let cfg = NodeConfig::load(config)?;
    let d = super::declared_dataset(&cfg, dataset_name)?;
    let consent_column = match purpose {
        Some(p) => match d.consent_column(p) {
            Some(c) => Some(c),
            None if d.consent_required => anyhow::bail!(
                "dataset '{dataset_name}' requires consent and has no consent column for \
                 purpose '{p}': a job for it would be refused (add it under the dataset's \
                 `consent` table)"
            ),
            None => None,
        },
        None => None,
    };
    // No key file means nobody was ever forgotten here; do not create one for a preview.
    let forgotten = if cfg.state_dir.join(KEY_FILE).exists() {
        Some(ForgetStore::open(&cfg.state_dir)?.load(&d.name)?)
    } else {
        None
    };
    let filter = RowFilter {
        consent_column,
        forgotten: forgotten.as_ref(),
    };

    crate::outln!(
        "dataset {} ({}){}",
        d.name,
        d.location(),
        match (purpose, consent_column) {
            (Some(p), Some(c)) => format!(", purpose '{p}': consent column '{c}'"),
            (Some(p), None) => format!(", purpose '{p}': no consent column, every row is used"),
            (None, _) => String::new(),
        }
    );
    crate::outln!(
        "{:<14} {:>10} {:>10} {:>12} {:>12} {:>10}",
        "identifier",
        "rows read",
        "rejected",
        "no consent",
        "forgotten",
        "distinct"
    );
    let mut reasons = Vec::new();
    for id in &d.identifiers {
        let keys = KeySpec::new([id.name.as_str()]);
        let loaded = dataset::load_keys_for(d, &keys, filter, MAX_ROWS)?;
        crate::outln!(
            "{:<14} {:>10} {:>10} {:>12} {:>12} {:>10}",
            id.name,
            loaded.rows_read,
            loaded.rows_rejected,
            loaded.rows_excluded_consent,
            loaded.rows_excluded_deleted,
            loaded.items.len()
        );
        reasons.push((id.name.clone(), loaded.rejections));
    }
    for (name, rejections) in &reasons {
        if rejections.is_empty() {
            continue;
        }
        crate::outln!("\nrejected rows, keyed on {name}:");
        if rejections.multi_line_rows > 0 {
            crate::outln!(
                "  {:>10}  kept, with a line break in a column this key does not read (legal \
                 CSV, but also what an unclosed quote leaves: check the lines count)",
                rejections.multi_line_rows
            );
        }
        for (why, n) in &rejections.by_reason {
            crate::outln!("  {n:>10}  {why}");
        }
        if rejections.first.iter().any(|r| r.line == 0) {
            crate::outln!(
                "  (no line numbers: the cluster read the parts in parallel; set partitions = 1 \
                 on the engine to see them)"
            );
        }
        // A local CSV or JSON lines file's rows are placed by line; a view's by its tables' CSV
        // lines or its own rows; other data (Parquet, data read by the engine) by row, header
        // excluded.
        let place = match (d.is_local_csv() || d.is_local_jsonl(), d.sql.is_some()) {
            (true, _) => "line",
            (false, true) => "at",
            (false, false) => "row",
        };
        if place == "at" && rejections.first.iter().any(|r| r.line > 0) {
            crate::outln!("  (a place is a line of a table's CSV file, or a row of the view)");
        }
        for row in rejections.first.iter().filter(|r| r.line > 0) {
            crate::outln!(
                "  {place} {}{}: {}",
                row.line,
                row.column
                    .as_deref()
                    .map(|c| format!(", column {c}"))
                    .unwrap_or_default(),
                row.reason
            );
        }
    }
    if show_normalised > 0 {
        show_first_normalised(d, filter, show_normalised)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the first `n` accepted rows' normalised identifiers (to stdout only).
fn show_first_normalised(d: &DatasetConfig, filter: RowFilter<'_>, n: usize) -> anyhow::Result<()> {
    crate::outln!("\nfirst {n} accepted rows, normalised (shown here only, never logged):");
    // Row numbers need the rows in file order.
    let d = &d.in_file_order();
    for id in &d.identifiers {
        let keys = KeySpec::new([id.name.as_str()]);
        let mut shown = Vec::new();
        // One whole pass, as a job reads it (simple; a preview is not a hot path).
        dataset::for_each_keyed_row_for(d, &keys, &[], filter, MAX_ROWS, |row, key, _| {
            if shown.len() < n {
                shown.push((row, String::from_utf8_lossy(key).into_owned()));
            }
            Ok(())
        })?;
        for (row, value) in shown {
            crate::outln!("  {:<14} row {row:>8}  {value}", id.name);
        }
    }
    Ok(())
}
