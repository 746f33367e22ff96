//! `synth --format parquet|jsonl`: the generated CSV files rewritten in another format through
//! DataFusion, with typed columns (integers as Int64, the rest as text), row order kept.

use std::path::{Path, PathBuf};

use anyhow::Context;
use cleanroom_node::data::DataFormat;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::config::TableParquetOptions;
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::prelude::{CsvReadOptions, SessionConfig, SessionContext};

use crate::synth::GroundTruth;

/// Columns the generator writes as integers; every other column is text.
const INTEGER_COLUMNS: [&str; 4] = ["amount_cents", "orders", "amount", "bucket"];

/// Rewrites every file of `truth` in `format` (nothing to do for CSV), removes the CSV files and
/// points `truth` at the new ones.
pub fn convert(truth: &mut GroundTruth, format: DataFormat) -> anyhow::Result<()> {
    if format == DataFormat::Csv {
        return Ok(());
    }
    let extension = format.extension().trim_start_matches('.');
    for path in truth
        .files
        .values_mut()
        .chain(truth.chargeback_files.values_mut())
    {
        let out = path.with_extension(extension);
        rewrite(path, &out, format).with_context(|| format!("writing {}", out.display()))?;
        std::fs::remove_file(&*path).with_context(|| format!("removing {}", path.display()))?;
        *path = out;
    }
    Ok(())
}

/// Reads the CSV at `from` (its header names the columns) and writes it to `to` as one file.
fn rewrite(from: &Path, to: &Path, format: DataFormat) -> anyhow::Result<()> {
    let header = {
        let mut reader = csv::Reader::from_path(from)?;
        reader.headers()?.clone()
    };
    let schema = Schema::new(
        header
            .iter()
            .map(|name| {
                let kind = if INTEGER_COLUMNS.contains(&name) {
                    DataType::Int64
                } else {
                    DataType::Utf8
                };
                Field::new(name, kind, true)
            })
            .collect::<Vec<_>>(),
    );
    let (from, to): (PathBuf, String) = (from.to_owned(), to.to_string_lossy().into_owned());
    on_own_runtime(async move {
        // One partition: rows keep the order of the CSV.
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
        let options = CsvReadOptions::new()
            .has_header(true)
            .schema(&schema)
            .file_extension(".csv");
        let frame = ctx
            .read_csv(from.to_string_lossy().as_ref(), options)
            .await?;
        let write = DataFrameWriteOptions::new().with_single_file_output(true);
        match format {
            DataFormat::Parquet => {
                // Row groups of 8192 rows, as warehouse exports have: a Ballista cluster splits
                // a file's read by row group, so a demo file is read by every executor.
                let mut parquet = TableParquetOptions::default();
                parquet.global.max_row_group_size = 8192;
                frame.write_parquet(&to, write, Some(parquet)).await?
            }
            DataFormat::Jsonl => frame.write_json(&to, write, None).await?,
            DataFormat::Csv => frame.write_csv(&to, write, None).await?,
        };
        Ok(())
    })
}

/// Runs DataFusion work on a thread with its own runtime, so that callers inside or outside
/// Tokio can wait for it.
fn on_own_runtime<F>(work: F) -> anyhow::Result<()>
where
    F: std::future::Future<Output = datafusion::error::Result<()>> + Send + 'static,
{
    let worker = std::thread::spawn(move || -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(work)?;
        Ok(())
    });
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("the file writer panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{SynthSpec, write_synth};

    #[test]
    fn parquet_and_jsonl_keep_every_row_and_value() {
        for format in [DataFormat::Parquet, DataFormat::Jsonl] {
            let dir = tempfile::tempdir().unwrap();
            let spec = SynthSpec {
                partners: vec!["acme".into(), "globex".into()],
                rows: 300,
                overlap: 0.4,
                seed: 3,
            };
            let mut truth = write_synth(&spec, dir.path()).unwrap();
            let csv_text: Vec<Vec<String>> = csv::Reader::from_path(&truth.files["acme"])
                .unwrap()
                .records()
                .map(|r| r.unwrap().iter().map(str::to_owned).collect())
                .collect();
            convert(&mut truth, format).unwrap();
            let file = &truth.files["acme"];
            assert_eq!(
                file.extension().unwrap(),
                format.extension().trim_start_matches('.')
            );
            assert!(!dir.path().join("acme.csv").exists());
            // Read back through DataFusion: same rows, same order, integers typed.
            let rows: Vec<Vec<String>> = {
                let path = file.to_string_lossy().into_owned();
                let (tx, rx) = std::sync::mpsc::channel();
                on_own_runtime(async move {
                    let ctx = SessionContext::new_with_config(
                        SessionConfig::new().with_target_partitions(1),
                    );
                    let frame = match format {
                        DataFormat::Parquet => ctx.read_parquet(&path, Default::default()).await?,
                        _ => {
                            let options =
                                datafusion::execution::options::JsonReadOptions::default()
                                    .file_extension(".jsonl");
                            ctx.read_json(&path, options).await?
                        }
                    };
                    let text = datafusion::arrow::util::pretty::pretty_format_batches(
                        &frame.clone().collect().await?,
                    )?
                    .to_string();
                    let types: Vec<String> = frame
                        .schema()
                        .fields()
                        .iter()
                        .map(|f| format!("{}:{}", f.name(), f.data_type()))
                        .collect();
                    tx.send((text, types)).unwrap();
                    Ok(())
                })
                .unwrap();
                let (text, types) = rx.recv().unwrap();
                assert!(
                    types.contains(&"amount_cents:Int64".to_owned()),
                    "{types:?}"
                );
                text.lines()
                    .filter(|l| l.starts_with("| ") && !l.contains("customer_id"))
                    .map(|l| {
                        l.trim_matches('|')
                            .split('|')
                            .map(|c| c.trim().to_owned())
                            .collect()
                    })
                    .collect()
            };
            assert_eq!(rows.len(), csv_text.len());
            let columns = rows[0].len();
            // JSON may order fields differently; compare the email column, which both carry.
            let email_csv: Vec<&str> = csv_text.iter().map(|r| r[1].trim()).collect();
            let found = (0..columns)
                .any(|c| rows.iter().map(|r| r[c].as_str()).collect::<Vec<_>>() == email_csv);
            assert!(found, "{format}: the email column did not survive in order");
        }
    }
}
