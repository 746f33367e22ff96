//! Datasets as the node's config declares them: where the rows are (a file, directory or glob of
//! CSV, Parquet or JSON lines, or a SQL view over such tables), its identifier columns (with
//! their normalisers), its value columns (integers with bounds) and its consent columns.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::normalise::{NormaliseOptions, Normaliser, parse_region};

/// The node-wide limits the data engine runs under (`memory_limit`, `spill_dir`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineLimits {
    /// The partner's Ballista cluster, when the reads run there.
    pub cluster: Option<Cluster>,
    /// Bytes; `None` = no bound.
    pub memory_limit: Option<u64>,
    /// Where the engine may spill.
    pub spill_dir: PathBuf,
}

/// A Ballista cluster the dataset reads run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// The scheduler, `df://HOST:PORT`.
    pub url: String,
    /// Parts each read is split into.
    pub partitions: usize,
    /// The key file the node shares with its executors; with it, a job's blinding,
    /// re-blinding, an overlap-sum's encryption and an aggregate's grouping run there too
    /// ([`super::cluster_pass`], [`super::cluster_reblind`], [`super::cluster_encrypt`],
    /// [`super::cluster_aggregate`]).
    pub sealing_key: Option<PathBuf>,
    /// A directory the node and every executor see at the same path (a shared mount): with
    /// it and the sealing key, a job's point buckets are kept there and the final comparison
    /// runs on the executors ([`super::cluster_merge`]).
    pub shared_dir: Option<PathBuf>,
    /// Whether a read's parts are taken in part order, so its rows come in file order
    /// ([`DatasetConfig::in_file_order`]); not a setting.
    pub in_part_order: bool,
}

/// A dataset: a table of rows (files, or a SQL view), and its identifier columns.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// The name jobs use for this dataset.
    pub name: String,
    /// The rows: a file, a directory or a glob, as a local path or a `file://` or `s3://` URL.
    /// Empty for a SQL view (`sql`).
    #[serde(default)]
    pub path: PathBuf,
    /// The files' format; by default read from `path`'s extension.
    #[serde(default)]
    pub format: Option<DataFormat>,
    /// CSV only: the byte between fields (`delimiter = ";"`; default `,`).
    #[serde(default)]
    pub delimiter: Delimiter,
    /// A SQL view: the dataset is this query's result over `tables`.
    #[serde(default)]
    pub sql: Option<String>,
    /// The tables a SQL view reads (`[[dataset.table]]`).
    #[serde(default, rename = "table")]
    pub tables: Vec<TableConfig>,
    /// Identifier columns (`[[dataset.identifier]]`).
    #[serde(default, rename = "identifier")]
    pub identifiers: Vec<IdentifierConfig>,
    /// Value columns (`[[dataset.value]]`): integers with declared bounds.
    #[serde(default, rename = "value")]
    pub values: Vec<ValueColumn>,
    /// Consent columns: purpose → boolean column (`true`, `1`, `yes` = consent, any case;
    /// anything else, empty included, = no consent). Rows without consent for a job's purpose
    /// are excluded and counted.
    #[serde(default)]
    pub consent: BTreeMap<String, String>,
    /// If true, a job whose purpose has no consent column here is refused; if false (default),
    /// such a job uses all rows.
    #[serde(default)]
    pub consent_required: bool,
    /// The node's memory bound and spill directory, copied from the node config when it is read
    /// (not written in a dataset).
    #[serde(skip)]
    pub engine: EngineLimits,
}

/// How a dataset's files are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Comma-separated values with a header row (read strictly when local).
    Csv,
    /// Apache Parquet.
    Parquet,
    /// JSON lines: one object per line.
    Jsonl,
}

impl DataFormat {
    /// The format a path's extension names (`.csv`, `.parquet`/`.parq`, `.jsonl`/`.ndjson`/`.json`),
    /// looking through a glob's last component too (`orders/*.parquet`).
    pub fn from_extension(path: &str) -> Option<DataFormat> {
        let ext = path.rsplit(['/', '.']).next()?;
        if !path.contains('.') {
            return None;
        }
        match ext.to_ascii_lowercase().as_str() {
            "csv" => Some(DataFormat::Csv),
            "parquet" | "parq" => Some(DataFormat::Parquet),
            "jsonl" | "ndjson" | "json" => Some(DataFormat::Jsonl),
            _ => None,
        }
    }

    /// The extension files of this format have inside a directory.
    pub fn extension(self) -> &'static str {
        match self {
            DataFormat::Csv => ".csv",
            DataFormat::Parquet => ".parquet",
            DataFormat::Jsonl => ".jsonl",
        }
    }
}

impl std::fmt::Display for DataFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DataFormat::Csv => "csv",
            DataFormat::Parquet => "parquet",
            DataFormat::Jsonl => "jsonl",
        })
    }
}

/// A table a SQL view reads: files like a dataset's own.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// The name the view's SQL uses.
    pub name: String,
    /// A file, directory or glob, as a local path or a `file://` or `s3://` URL.
    pub path: PathBuf,
    /// The files' format; by default read from `path`'s extension.
    #[serde(default)]
    pub format: Option<DataFormat>,
    /// CSV only: the byte between fields (default `,`).
    #[serde(default)]
    pub delimiter: Delimiter,
}

/// The byte between a CSV file's fields: one ASCII character that is not a quote, a line break,
/// a letter or a digit (`","`, `";"`, `"|"`, a tab as `"\t"` or `"tab"`). Default `,`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delimiter(u8);

impl Default for Delimiter {
    fn default() -> Self {
        Delimiter(b',')
    }
}

impl Delimiter {
    /// Reads a delimiter as the config writes it.
    pub fn parse(text: &str) -> Result<Delimiter, String> {
        let text = if text.eq_ignore_ascii_case("tab") {
            "\t"
        } else {
            text
        };
        match text.as_bytes() {
            [b] if b.is_ascii()
                && !b.is_ascii_alphanumeric()
                && !matches!(b, b'"' | b'\n' | b'\r') =>
            {
                Ok(Delimiter(*b))
            }
            _ => Err(
                "delimiter must be one ASCII character other than a quote, a line break, \
                      a letter or a digit, such as \",\", \";\", \"|\" or \"tab\""
                    .to_owned(),
            ),
        }
    }

    /// The byte.
    pub fn byte(self) -> u8 {
        self.0
    }

    /// Whether it is the default `,`.
    pub fn is_default(self) -> bool {
        self == Delimiter::default()
    }
}

impl<'de> Deserialize<'de> for Delimiter {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Delimiter::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl TableConfig {
    /// The declared format, or the one the path's extension names.
    pub fn format(&self) -> Option<DataFormat> {
        self.format
            .or_else(|| DataFormat::from_extension(&self.path.to_string_lossy()))
    }
}

/// An integer column with bounds (declared on a dataset, or the clipping bounds an allow entry
/// grants on one).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueColumn {
    /// The CSV header of the column.
    pub column: Spanned<String>,
    /// Smallest value (values below are clipped).
    pub min: i64,
    /// Largest value (values above are clipped).
    pub max: i64,
}

/// One identifier (join-key) column of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentifierConfig {
    /// The key name jobs use (`--on email`).
    pub name: String,
    /// The CSV header of the column.
    pub column: String,
    /// How values are normalised before matching.
    pub normaliser: Normaliser,
    /// Email only: apply the Gmail dot/plus rule (default false).
    #[serde(default)]
    pub gmail_rule: bool,
    /// Generic only: fold case (default false).
    #[serde(default)]
    pub case_fold: bool,
    /// Phone only: region (ISO 3166 alpha-2, e.g. `"GB"`) of numbers written without a
    /// country code (default `"US"`).
    #[serde(default)]
    pub default_region: Option<String>,
}

impl IdentifierConfig {
    /// Identifier `name` read from `column`, normalised by `normaliser` with its default
    /// options (no Gmail rule, no case folding, the default phone region).
    pub fn new(name: &str, column: &str, normaliser: Normaliser) -> Self {
        IdentifierConfig {
            name: name.into(),
            column: column.into(),
            normaliser,
            gmail_rule: false,
            case_fold: false,
            default_region: None,
        }
    }

    /// The normaliser options this identifier sets (validated by the config).
    pub fn options(&self) -> NormaliseOptions {
        let mut o = NormaliseOptions {
            gmail_rule: self.gmail_rule,
            case_fold: self.case_fold,
            ..NormaliseOptions::default()
        };
        if let Some(region) = self.default_region.as_deref().and_then(parse_region) {
            o.default_region = region;
        }
        o
    }
}

impl DatasetConfig {
    /// The same dataset read in file order, for a pass that numbers rows (a match's
    /// membership, a dry run's places). In
    /// process, every read is in file order already. A cluster finishes a read's parts in any
    /// order: the node takes the parts' outputs in part order
    /// ([`crate::data::source::part_order`]), and runs a view that could move rows between parts
    /// (a join, an aggregate, …) in one part.
    pub fn in_file_order(&self) -> DatasetConfig {
        let mut d = self.clone();
        if let Some(cluster) = &mut d.engine.cluster {
            cluster.in_part_order = true;
        }
        d
    }

    /// Whether this node reads the dataset with its strict CSV reader: CSV files (not a view)
    /// on a local path, in process. Its rejected rows are placed by file line; any other
    /// dataset's by row.
    pub fn is_local_csv(&self) -> bool {
        self.sql.is_none()
            && self.engine.cluster.is_none()
            && self.format() == Some(DataFormat::Csv)
            && crate::data::source::local_path(&self.path).is_some()
    }

    /// Whether the dataset is local JSON lines read in process (by [`crate::data::source::json`]).
    pub fn is_local_jsonl(&self) -> bool {
        self.sql.is_none()
            && self.engine.cluster.is_none()
            && self.format() == Some(DataFormat::Jsonl)
            && crate::data::source::local_path(&self.path).is_some()
    }

    /// Whether a read of this dataset comes back in file order ([`Self::in_file_order`]).
    pub fn reads_in_file_order(&self) -> bool {
        self.engine
            .cluster
            .as_ref()
            .is_none_or(|c| c.partitions <= 1 || c.in_part_order)
    }

    /// Dataset `name` in the CSV file `path`, keyed by `identifiers`, with no value or consent
    /// columns.
    pub fn new(name: &str, path: PathBuf, identifiers: Vec<IdentifierConfig>) -> Self {
        DatasetConfig {
            name: name.into(),
            path,
            format: None,
            delimiter: Delimiter::default(),
            sql: None,
            tables: Vec::new(),
            identifiers,
            values: Vec::new(),
            consent: BTreeMap::new(),
            consent_required: false,
            engine: EngineLimits::default(),
        }
    }

    /// The declared format, or the one the path's extension names (`None` for a SQL view).
    pub fn format(&self) -> Option<DataFormat> {
        if self.sql.is_some() {
            return None;
        }
        self.format
            .or_else(|| DataFormat::from_extension(&self.path.to_string_lossy()))
    }

    /// Where the rows are, for messages: the path or URL, or `SQL view over t1, t2`.
    pub fn location(&self) -> String {
        match &self.sql {
            Some(_) => {
                let names: Vec<&str> = self.tables.iter().map(|t| t.name.as_str()).collect();
                format!("SQL view over {}", names.join(", "))
            }
            None => self.path.display().to_string(),
        }
    }

    /// The declared value column `column`.
    pub fn value(&self, column: &str) -> Option<&ValueColumn> {
        self.values.iter().find(|v| v.column.get_ref() == column)
    }

    /// The declared value column names, comma-separated (for messages).
    pub fn value_names(&self) -> String {
        let names: Vec<&str> = self
            .values
            .iter()
            .map(|v| v.column.get_ref().as_str())
            .collect();
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    }

    /// The consent column for `purpose`, if one is configured.
    pub fn consent_column(&self, purpose: &str) -> Option<&str> {
        self.consent.get(purpose).map(String::as_str)
    }

    /// The identifier called `name`.
    pub fn identifier(&self, name: &str) -> Option<&IdentifierConfig> {
        self.identifiers.iter().find(|i| i.name == name)
    }

    /// The declared identifier names, comma-separated (for messages).
    pub fn identifier_names(&self) -> String {
        let names: Vec<&str> = self.identifiers.iter().map(|i| i.name.as_str()).collect();
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Delimiter;

    #[test]
    fn a_delimiter_is_one_ascii_character_that_cannot_be_data() {
        for (text, byte) in [
            (",", b','),
            (";", b';'),
            ("|", b'|'),
            ("\t", b'\t'),
            ("tab", b'\t'),
        ] {
            assert_eq!(
                Delimiter::parse(text).map(Delimiter::byte),
                Ok(byte),
                "{text:?}"
            );
        }
        for bad in ["", ";;", "\"", "\n", "a", "7", "é", "\r"] {
            assert!(Delimiter::parse(bad).is_err(), "{bad:?}");
        }
        #[derive(Debug, serde::Deserialize)]
        struct T {
            delimiter: Delimiter,
        }
        let t: T = toml::from_str("delimiter = \"\\t\"").unwrap();
        assert_eq!(t.delimiter.byte(), b'\t');
        let err = toml::from_str::<T>("delimiter = \"ab\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("one ASCII character"), "{err}");
    }
}

#[cfg(test)]
mod order_tests {
    use super::{Cluster, DatasetConfig};

    /// A cluster finishes a parallel read's parts in any order: a pass that numbers rows takes
    /// its parts in part order. A read in process is in file order already.
    #[test]
    fn a_read_in_file_order_takes_its_parts_in_order_on_a_cluster() {
        let mut d = DatasetConfig::new("d", "d.csv".into(), Vec::new());
        assert!(d.reads_in_file_order());
        assert_eq!(d.in_file_order(), d);
        d.engine.cluster = Some(Cluster {
            url: "df://127.0.0.1:50050".into(),
            partitions: 16,
            sealing_key: None,
            shared_dir: None,
            in_part_order: false,
        });
        assert!(!d.reads_in_file_order());
        let ordered = d.in_file_order();
        assert!(ordered.reads_in_file_order());
        let cluster = ordered.engine.cluster.as_ref().unwrap();
        assert_eq!((cluster.partitions, cluster.in_part_order), (16, true));
        assert_eq!(ordered.name, d.name);
    }

    /// Only CSV files on a local path, read in process, are read by the strict reader (and
    /// placed by file line).
    #[test]
    fn local_csv_is_csv_files_in_process() {
        let mut d = DatasetConfig::new("d", "d.csv".into(), Vec::new());
        assert!(d.is_local_csv());
        d.path = "s3://bucket/d.csv".into();
        assert!(!d.is_local_csv());
        d.path = "d.parquet".into();
        assert!(!d.is_local_csv());
        d.path = "d.csv".into();
        d.sql = Some("SELECT * FROM t".into());
        assert!(!d.is_local_csv());
        d.sql = None;
        d.engine.cluster = Some(Cluster {
            url: "df://127.0.0.1:50050".into(),
            partitions: 1,
            sealing_key: None,
            shared_dir: None,
            in_part_order: false,
        });
        assert!(!d.is_local_csv());
    }
}
