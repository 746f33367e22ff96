//! The node's config file (TOML): identity, addresses, TLS files, datasets and the agreements
//! (the allow-list of what this node computes with which partner).
//!
//! Every table rejects unknown keys, so a misspelt setting is an error rather than a silently
//! ignored default. Relative paths are resolved against the directory of the config file.
//! `node/testdata/node.example.toml` is a complete, commented example.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::normalise::Normaliser;

/// Longest name (node, partner, dataset, identifier, purpose) the config accepts.
pub const MAX_NAME_LEN: usize = 63;

/// Default lower bound on the partner's declared set size.
pub const DEFAULT_MIN_SET_SIZE: u64 = 1;
/// Default upper bound on the partner's declared set size.
pub const DEFAULT_MAX_SET_SIZE: u64 = 100_000_000;

/// The whole config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's name; must equal the identity in its certificate (checked by the engine).
    pub name: String,
    /// The coordinator's QUIC address (`ip:port`).
    pub coordinator: SocketAddr,
    /// Data-plane bind address (port 0 = ephemeral).
    pub listen: SocketAddr,
    /// Data-plane address other nodes dial (`ip:port`); `None` means the bound address.
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// Where the node writes membership files and other state.
    pub state_dir: PathBuf,
    /// Certificate files.
    pub tls: TlsConfig,
    /// Datasets this node serves (`[[dataset]]`).
    #[serde(default, rename = "dataset")]
    pub datasets: Vec<DatasetConfig>,
    /// One agreement per partner (`[[agreement]]`); no entry denies everything with a partner.
    #[serde(default, rename = "agreement")]
    pub agreements: Vec<Agreement>,
}

/// Paths of the node's PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The CA certificate that signs every party.
    pub ca: PathBuf,
    /// This node's certificate (chain).
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

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
}

/// The agreement with one partner.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agreement {
    /// The partner's node name (its certificate identity).
    pub partner: String,
    /// Purposes jobs with this partner may declare.
    pub purposes: Vec<String>,
    /// Allowed computations (`[[agreement.allow]]`); none allows nothing.
    #[serde(default)]
    pub allow: Vec<AllowEntry>,
}

/// A computation the agreement allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Computation {
    /// |A ∩ B| only.
    Overlap,
    /// Membership of each side's own records, to the sides allowed to learn it.
    Match,
}

impl Computation {
    /// The name used in config files and vetoes.
    pub fn as_str(&self) -> &'static str {
        match self {
            Computation::Overlap => "overlap",
            Computation::Match => "match",
        }
    }
}

impl std::fmt::Display for Computation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One allowed computation on one of this node's datasets.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowEntry {
    /// Which computation.
    pub computation: Computation,
    /// Which of this node's datasets.
    pub dataset: String,
    /// Allowed join keys: each entry is one key set, composite keys joined with `+`
    /// (`"email+phone"`); a job's key set must equal one entry, order included.
    pub keys: Vec<String>,
    /// Match only: whether the partner may learn which of its rows are shared with us.
    #[serde(default)]
    pub reveal_membership_to_partner: bool,
    /// Smallest set size the partner may declare.
    #[serde(default = "default_min_set_size")]
    pub min_set_size: u64,
    /// Largest set size the partner may declare.
    #[serde(default = "default_max_set_size")]
    pub max_set_size: u64,
}

fn default_min_set_size() -> u64 {
    DEFAULT_MIN_SET_SIZE
}

fn default_max_set_size() -> u64 {
    DEFAULT_MAX_SET_SIZE
}

/// The config file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema (toml's message names the line,
    /// column and key).
    #[error("config file {}: {source}", path.display())]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The TOML error.
        source: toml::de::Error,
    },
    /// The file parses but breaks a rule.
    #[error("config file {}: {problem}", path.display())]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// Which setting and which rule, in words.
        problem: String,
    },
}

impl NodeConfig {
    /// Reads, parses and validates the config file at `path`, resolving relative paths against
    /// its directory.
    pub fn load(path: impl AsRef<Path>) -> Result<NodeConfig, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text` as if it were read from `path` (which names the file in
    /// errors and anchors relative paths); nothing is read from disk.
    pub fn parse(text: &str, path: &Path) -> Result<NodeConfig, ConfigError> {
        let mut cfg: NodeConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        cfg.validate().map_err(|problem| ConfigError::Invalid {
            path: path.to_owned(),
            problem,
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        cfg.resolve_paths(base);
        Ok(cfg)
    }

    /// The dataset called `name`.
    pub fn dataset(&self, name: &str) -> Option<&DatasetConfig> {
        self.datasets.iter().find(|d| d.name == name)
    }

    /// The agreement with `partner`.
    pub fn agreement_with(&self, partner: &str) -> Option<&Agreement> {
        self.agreements.iter().find(|a| a.partner == partner)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.state_dir);
        resolve(&mut self.tls.ca);
        resolve(&mut self.tls.cert);
        resolve(&mut self.tls.key);
        for d in &mut self.datasets {
            resolve(&mut d.path);
        }
    }

    fn validate(&self) -> Result<(), String> {
        check_name("name", &self.name)?;
        let mut seen = HashSet::new();
        for d in &self.datasets {
            check_name("dataset name", &d.name)?;
            if !seen.insert(d.name.as_str()) {
                return Err(format!("dataset '{}' is declared twice", d.name));
            }
            if d.path.as_os_str().is_empty() {
                return Err(format!("dataset '{}' has an empty path", d.name));
            }
            let mut ids = HashSet::new();
            for id in &d.identifiers {
                check_name(&format!("dataset '{}': identifier name", d.name), &id.name)?;
                if !ids.insert(id.name.as_str()) {
                    return Err(format!(
                        "dataset '{}': identifier '{}' is declared twice",
                        d.name, id.name
                    ));
                }
                if id.column.is_empty() {
                    return Err(format!(
                        "dataset '{}': identifier '{}' has an empty column",
                        d.name, id.name
                    ));
                }
            }
        }
        let mut partners = HashSet::new();
        for a in &self.agreements {
            check_name("agreement partner", &a.partner)?;
            if a.partner == self.name {
                return Err(format!(
                    "agreement with '{}', which is this node",
                    a.partner
                ));
            }
            if !partners.insert(a.partner.as_str()) {
                return Err(format!(
                    "two agreements with '{}' (one per partner)",
                    a.partner
                ));
            }
            let ctx = format!("agreement with '{}'", a.partner);
            if a.purposes.is_empty() {
                return Err(format!("{ctx}: no purposes (at least one is required)"));
            }
            for p in &a.purposes {
                check_name(&format!("{ctx}: purpose"), p)?;
            }
            for e in &a.allow {
                self.validate_allow(&ctx, e)?;
            }
        }
        Ok(())
    }

    fn validate_allow(&self, ctx: &str, e: &AllowEntry) -> Result<(), String> {
        let Some(d) = self.dataset(&e.dataset) else {
            return Err(format!(
                "{ctx}: allow {} references dataset '{}', which is not declared",
                e.computation, e.dataset
            ));
        };
        if e.keys.is_empty() {
            return Err(format!(
                "{ctx}: allow {} on '{}' lists no keys",
                e.computation, e.dataset
            ));
        }
        for key in &e.keys {
            if key.is_empty() {
                return Err(format!(
                    "{ctx}: allow {} on '{}' has an empty key",
                    e.computation, e.dataset
                ));
            }
            let mut parts = HashSet::new();
            for part in key.split('+') {
                if d.identifier(part).is_none() {
                    return Err(format!(
                        "{ctx}: allow {} on '{}' uses key '{part}', which dataset '{}' does not \
                         declare as an identifier (declared: {})",
                        e.computation,
                        e.dataset,
                        d.name,
                        d.identifier_names()
                    ));
                }
                if !parts.insert(part) {
                    return Err(format!(
                        "{ctx}: allow {} on '{}': key '{key}' repeats '{part}'",
                        e.computation, e.dataset
                    ));
                }
            }
        }
        if e.reveal_membership_to_partner && e.computation != Computation::Match {
            return Err(format!(
                "{ctx}: allow {} on '{}': reveal_membership_to_partner applies to match only",
                e.computation, e.dataset
            ));
        }
        if e.min_set_size > e.max_set_size {
            return Err(format!(
                "{ctx}: allow {} on '{}': min_set_size {} is above max_set_size {}",
                e.computation, e.dataset, e.min_set_size, e.max_set_size
            ));
        }
        Ok(())
    }
}

impl DatasetConfig {
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

impl Agreement {
    /// Whether `purpose` is one of this agreement's purposes.
    pub fn allows_purpose(&self, purpose: &str) -> bool {
        self.purposes.iter().any(|p| p == purpose)
    }

    /// The allow entry for `computation` on `dataset` whose keys include `key` (`"email+phone"`).
    pub fn find_allow(
        &self,
        computation: Computation,
        dataset: &str,
        key: &str,
    ) -> Option<&AllowEntry> {
        self.allow.iter().find(|e| {
            e.computation == computation && e.dataset == dataset && e.keys.iter().any(|k| k == key)
        })
    }
}

/// Whether `name` is 1 to 63 characters of `a-z`, `0-9` and `-`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{what} '{}' is not 1 to {MAX_NAME_LEN} characters of a-z, 0-9 and '-'",
            name.escape_default()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../testdata/node.example.toml");

    const MINIMAL: &str = r#"
name = "acme"
coordinator = "127.0.0.1:7400"
listen = "127.0.0.1:0"
state_dir = "state"
[tls]
ca = "pki/ca.pem"
cert = "pki/node-acme.pem"
key = "/etc/cleanroom/node-acme.key"
[[dataset]]
name = "customers"
path = "data/acme.csv"
  [[dataset.identifier]]
  name = "email"
  column = "email"
  normaliser = "email"
  [[dataset.identifier]]
  name = "phone"
  column = "phone"
  normaliser = "phone"
[[agreement]]
partner = "globex"
purposes = ["overlap-reporting"]
  [[agreement.allow]]
  computation = "match"
  dataset = "customers"
  keys = ["email", "email+phone"]
"#;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(text, Path::new("/etc/cleanroom/node.toml"))
    }

    fn invalid(text: &str) -> String {
        match parse(text) {
            Err(e @ (ConfigError::Invalid { .. } | ConfigError::Parse { .. })) => e.to_string(),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn example_file_parses() {
        let cfg = NodeConfig::parse(EXAMPLE, Path::new("node.example.toml")).unwrap();
        assert_eq!(cfg.name, "acme");
        assert!(cfg.dataset("customers").is_some());
        assert!(cfg.agreement_with("globex").is_some());
        assert!(cfg.agreement_with("hooli").is_none());
    }

    #[test]
    fn example_file_loads_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, EXAMPLE).unwrap();
        let cfg = NodeConfig::load(&file).unwrap();
        assert_eq!(cfg.tls.ca, dir.path().join("pki/ca.pem"));
    }

    #[test]
    fn minimal_parses_with_defaults_and_resolved_paths() {
        let cfg = parse(MINIMAL).unwrap();
        assert_eq!(cfg.advertise, None);
        assert_eq!(cfg.state_dir, Path::new("/etc/cleanroom/state"));
        assert_eq!(cfg.tls.ca, Path::new("/etc/cleanroom/pki/ca.pem"));
        assert_eq!(cfg.tls.key, Path::new("/etc/cleanroom/node-acme.key"));
        let d = cfg.dataset("customers").unwrap();
        assert_eq!(d.path, Path::new("/etc/cleanroom/data/acme.csv"));
        assert_eq!(d.identifier("phone").unwrap().normaliser, Normaliser::Phone);
        let a = cfg.agreement_with("globex").unwrap();
        let e = a
            .find_allow(Computation::Match, "customers", "email+phone")
            .unwrap();
        assert!(!e.reveal_membership_to_partner);
        assert_eq!(
            (e.min_set_size, e.max_set_size),
            (DEFAULT_MIN_SET_SIZE, DEFAULT_MAX_SET_SIZE)
        );
        assert!(
            a.find_allow(Computation::Overlap, "customers", "email")
                .is_none()
        );
        assert!(
            a.find_allow(Computation::Match, "customers", "phone+email")
                .is_none()
        );
    }

    #[test]
    fn relative_config_path_keeps_relative_paths() {
        let cfg = NodeConfig::parse(MINIMAL, Path::new("node.toml")).unwrap();
        assert_eq!(cfg.tls.ca, Path::new("pki/ca.pem"));
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = MINIMAL.replace(
            "state_dir = \"state\"",
            "state_dir = \"state\"\nstate_dri = 1",
        );
        let msg = invalid(&text);
        assert!(msg.contains("/etc/cleanroom/node.toml"), "{msg}");
        assert!(msg.contains("state_dri"), "{msg}");
        assert!(msg.contains("line 6"), "{msg}");
        let text = MINIMAL.replace(
            "normaliser = \"phone\"",
            "normaliser = \"phone\"\nnormalizer = \"x\"",
        );
        assert!(invalid(&text).contains("normalizer"));
        let text = MINIMAL.replace("keys = [", "reveal = true\n  keys = [");
        assert!(invalid(&text).contains("reveal"));
    }

    #[test]
    fn unknown_normaliser_and_computation() {
        assert!(
            invalid(&MINIMAL.replace("normaliser = \"phone\"", "normaliser = \"sms\""))
                .contains("sms")
        );
        assert!(invalid(&MINIMAL.replace("\"match\"", "\"join\"")).contains("join"));
    }

    #[test]
    fn missing_file_names_it() {
        let e = NodeConfig::load("/nonexistent/cleanroom/node.toml").unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(e.to_string().contains("/nonexistent/cleanroom/node.toml"));
    }

    #[test]
    fn names_are_checked() {
        assert!(invalid(&MINIMAL.replace("name = \"acme\"", "name = \"Acme\"")).contains("'Acme'"));
        assert!(
            invalid(&MINIMAL.replace("name = \"customers\"", "name = \"cust omers\""))
                .contains("dataset name")
        );
        let long = "a".repeat(64);
        assert!(
            invalid(&MINIMAL.replace("partner = \"globex\"", &format!("partner = \"{long}\"")))
                .contains("partner")
        );
        assert!(
            invalid(&MINIMAL.replace("[\"overlap-reporting\"]", "[\"Overlap\"]"))
                .contains("purpose")
        );
        assert!(is_valid_name(&"a".repeat(63)));
        assert!(!is_valid_name(""));
    }

    #[test]
    fn addresses_are_checked() {
        let msg = invalid(&MINIMAL.replace("\"127.0.0.1:7400\"", "\"coordinator\""));
        assert!(msg.contains("coordinator"), "{msg}");
        let msg = invalid(&MINIMAL.replace("listen = \"127.0.0.1:0\"", "listen = \"localhost\""));
        assert!(msg.contains("listen"), "{msg}");
        let cfg = parse(&MINIMAL.replace("state_dir", "advertise = \"10.0.0.7:7501\"\nstate_dir"))
            .unwrap();
        assert_eq!(cfg.advertise, Some("10.0.0.7:7501".parse().unwrap()));
        let msg = invalid(&MINIMAL.replace("state_dir", "advertise = \"10.0.0.7\"\nstate_dir"));
        assert!(msg.contains("advertise"), "{msg}");
    }

    #[test]
    fn duplicate_dataset() {
        let dup = MINIMAL.replace(
            "[[agreement]]",
            "[[dataset]]\nname = \"customers\"\npath = \"x.csv\"\n[[agreement]]",
        );
        assert!(invalid(&dup).contains("dataset 'customers' is declared twice"));
    }

    #[test]
    fn duplicate_identifier() {
        let dup = MINIMAL.replace("name = \"phone\"", "name = \"email\"");
        let msg = invalid(&dup);
        assert!(
            msg.contains("identifier 'email' is declared twice"),
            "{msg}"
        );
    }

    #[test]
    fn agreement_rules() {
        let msg = invalid(&MINIMAL.replace("dataset = \"customers\"", "dataset = \"orders\""));
        assert!(
            msg.contains("dataset 'orders', which is not declared"),
            "{msg}"
        );
        let msg = invalid(&MINIMAL.replace(
            "keys = [\"email\", \"email+phone\"]",
            "keys = [\"email+ssn\"]",
        ));
        assert!(
            msg.contains("key 'ssn'") && msg.contains("declared: email, phone"),
            "{msg}"
        );
        let msg = invalid(&MINIMAL.replace("keys = [\"email\", \"email+phone\"]", "keys = []"));
        assert!(msg.contains("lists no keys"), "{msg}");
        let msg = invalid(&MINIMAL.replace("keys = [\"email\", \"email+phone\"]", "keys = [\"\"]"));
        assert!(msg.contains("empty key"), "{msg}");
        let msg =
            invalid(&MINIMAL.replace("keys = [\"email\", \"email+phone\"]", "keys = [\"email+\"]"));
        assert!(msg.contains("key ''"), "{msg}");
        let msg = invalid(&MINIMAL.replace(
            "keys = [\"email\", \"email+phone\"]",
            "keys = [\"email+email\"]",
        ));
        assert!(msg.contains("repeats"), "{msg}");
        let msg = invalid(&MINIMAL.replace("purposes = [\"overlap-reporting\"]", "purposes = []"));
        assert!(msg.contains("no purposes"), "{msg}");
        let msg = invalid(&MINIMAL.replace(
            "keys = [",
            "min_set_size = 10\n  max_set_size = 9\n  keys = [",
        ));
        assert!(
            msg.contains("min_set_size 10 is above max_set_size 9"),
            "{msg}"
        );
        let msg = invalid(&MINIMAL.replace(
            "computation = \"match\"",
            "computation = \"overlap\"\n  reveal_membership_to_partner = true",
        ));
        assert!(msg.contains("match only"), "{msg}");
        let msg = invalid(&MINIMAL.replace("partner = \"globex\"", "partner = \"acme\""));
        assert!(msg.contains("this node"), "{msg}");
        let twice = format!("{MINIMAL}\n[[agreement]]\npartner = \"globex\"\npurposes = [\"x\"]\n");
        assert!(invalid(&twice).contains("two agreements with 'globex'"));
    }
}
