//! Datasets as the node's config declares them: the CSV file, its identifier columns (with their
//! normalisers), its value columns (integers with bounds) and its consent columns.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::normalise::{NormaliseOptions, Normaliser, parse_region};

/// A dataset: one CSV file with a header row, and its identifier columns.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// The name jobs use for this dataset.
    pub name: String,
    /// The CSV file.
    pub path: PathBuf,
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
    /// Dataset `name` in the CSV file `path`, keyed by `identifiers`, with no value or consent
    /// columns.
    pub fn new(name: &str, path: PathBuf, identifiers: Vec<IdentifierConfig>) -> Self {
        DatasetConfig {
            name: name.into(),
            path,
            identifiers,
            values: Vec::new(),
            consent: BTreeMap::new(),
            consent_required: false,
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
