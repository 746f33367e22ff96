//! The config file's schema (TOML): identity, addresses, TLS files, datasets and the agreements
//! (the allow-list of what this node computes with which partner). `policy::parse` checks what
//! the file says and turns it into a [`NodeConfig`] whose allow entries are typed ([`Allow`]).
//!
//! Every table rejects unknown keys, so a misspelt setting is an error rather than a silently
//! ignored default. Relative paths are resolved against the directory of the config file.
//! `node/testdata/node.example.toml` is a complete, commented example.
//!
//! The file is read as `NodeConfig<AllowEntry>` (each `[[agreement.allow]]` as written, one flat
//! table for every computation); [`NodeConfig::parse`] checks it and converts each entry into
//! the [`Allow`] variant of its computation, whose per-kind rules live beside that kind's offer
//! checks (`policy::psi`, `policy::overlap_sum`, `policy::aggregate`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cleanroom_transport::HostPort;
use serde::Deserialize;

use crate::data::DatasetConfig;
use crate::ledger::{Budget, DEFAULT_DP_DELTA, Delta};

use super::allow::Allow;
use super::values::{Computation, PolicyDate};

/// The whole config file. `NodeConfig` (the default, `A = Allow`) is the checked policy the node
/// runs on; `NodeConfig<AllowEntry>` is the file as written, before [`NodeConfig::parse`] checks
/// it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig<A = Allow> {
    /// This node's name; must equal the identity in its certificate (checked by the engine).
    pub name: String,
    /// The coordinator's QUIC address (`host:port`: a DNS name, resolved at each connection,
    /// or an IP address).
    pub coordinator: HostPort,
    /// Data-plane bind address (port 0 = ephemeral).
    pub listen: SocketAddr,
    /// Data-plane address other nodes dial (`host:port`: a DNS name they resolve, or an IP
    /// address); `None` means the bound address.
    #[serde(default)]
    pub advertise: Option<HostPort>,
    /// Where the node writes membership files and other state.
    pub state_dir: PathBuf,
    /// Certificate files.
    pub tls: TlsConfig,
    /// Datasets this node serves (`[[dataset]]`).
    #[serde(default, rename = "dataset")]
    pub datasets: Vec<DatasetConfig>,
    /// One agreement per partner (`[[agreement]]`); no entry denies everything with a partner.
    #[serde(default = "Vec::new", rename = "agreement")]
    pub agreements: Vec<Agreement<A>>,
    /// The node-wide privacy budget (`[budget]`); `None` = no node-wide cap.
    #[serde(default)]
    pub budget: Option<Budget>,
    /// The privacy-budget ledger (SQLite): every ε charged and every noised release stored.
    /// Default `<state_dir>/ledger.sqlite`, beside the audit log; read it with [`Self::ledger_path`].
    #[serde(default)]
    pub ledger: Option<PathBuf>,
    /// Days to keep job results (membership files) in the state directory; older ones are
    /// purged at start and hourly. `None` = keep until an operator runs `cleanroom-node purge`.
    #[serde(default)]
    pub retention_days: Option<u64>,
    /// The δ at which this node's ε caps are read once a zCDP release (an aggregate's discrete
    /// Gaussian) is in the ledger; default [`DEFAULT_DP_DELTA`]. Read it with
    /// [`Self::delta`].
    #[serde(default)]
    pub dp_delta: Option<Delta>,
    /// The privacy dashboard, `/metrics` and `/healthz` (`[dashboard]`); `None` = not served.
    #[serde(default)]
    pub dashboard: Option<DashboardConfig>,
    /// The most memory a job's data work should take (`memory_limit = "1GiB"`); `None` = no
    /// bound. Overlap jobs then keep their point sets in spill files, and the data engine's
    /// memory pool is capped at half of it. Read it with [`Self::memory_limit_bytes`].
    #[serde(default)]
    pub memory_limit: Option<bytesize::ByteSize>,
    /// Where spill files go; default `<state_dir>/spill`. Read it with [`Self::spill_dir`].
    #[serde(default)]
    pub spill_dir: Option<PathBuf>,
    /// Where the dataset reads run: in this process (the default), or on the partner's Ballista
    /// cluster (`engine = { ballista = "df://HOST:PORT" }`).
    #[serde(default)]
    pub engine: EngineConfig,
}

/// `engine = { ballista = "df://HOST:PORT", partitions = 16, sealing_key = "executors.key",
/// shared_dir = "/mnt/cleanroom" }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// The Ballista scheduler's URL; `None`: the engine runs in the node's process.
    #[serde(default)]
    pub ballista: Option<String>,
    /// How many parts a dataset read is split into on the cluster (tasks that run in parallel
    /// across the executors); default [`DEFAULT_CLUSTER_PARTITIONS`].
    #[serde(default)]
    pub partitions: Option<usize>,
    /// A file of 64 hex digits the executors hold too (`cleanroom executor --sealing-key`):
    /// with it, an overlap's normalising, filtering and blinding run on the executors, the
    /// job key sealed under it.
    #[serde(default)]
    pub sealing_key: Option<PathBuf>,
    /// A directory the node and every executor see at the same path (a shared mount). With it
    /// (and `sealing_key`), a job's point buckets are written there instead of the spill
    /// directory or memory, and the final comparison runs on the executors.
    #[serde(default)]
    pub shared_dir: Option<PathBuf>,
}

/// Parts a dataset read is split into on a Ballista cluster, unless `partitions` says.
pub const DEFAULT_CLUSTER_PARTITIONS: usize = 16;

/// `[dashboard]`: where the node serves its privacy dashboard, `/metrics` and `/healthz`
/// (plain HTTP; see docs/SECURITY.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardConfig {
    /// The address to listen on, e.g. `127.0.0.1:7600` (port 0 = ephemeral). A loopback
    /// address unless `allow_non_loopback` is set.
    pub listen: SocketAddr,
    /// Serve on a non-loopback address too. Off by default: the dashboard is plain HTTP
    /// without authentication, so anyone who can reach it reads it.
    #[serde(default)]
    pub allow_non_loopback: bool,
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
    /// The consortium CA's certificate revocation list (`cleanroom pki revoke` writes it).
    /// Reloaded with the certificate and key on change or SIGHUP: a revoked peer is refused on
    /// the data plane, a revoked coordinator on the control plane.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

/// The agreement with one partner (its allow entries typed, `A = Allow`, or as written).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agreement<A = Allow> {
    /// The partner's node name (its certificate identity).
    pub partner: String,
    /// Purposes jobs with this partner may declare.
    pub purposes: Vec<String>,
    /// Last day (UTC, inclusive) the agreement is in force; `None` = no expiry.
    #[serde(default)]
    pub expires: Option<PolicyDate>,
    /// Allowed computations (`[[agreement.allow]]`); none allows nothing.
    #[serde(default = "Vec::new")]
    pub allow: Vec<A>,
    /// The ε this partner's jobs may spend per period **for each purpose** (`budget_per_purpose
    /// = { epsilon_per_period = 1.0, period = "week" }`), charged in the ledger; `None` = no cap
    /// beyond the node-wide `[budget]`.
    #[serde(default)]
    pub budget_per_purpose: Option<Budget>,
    /// The partner's public key, pinned: `sha256:<hex>` of its certificate's
    /// SubjectPublicKeyInfo (`cleanroom pki show` prints it). A data-plane connection from a
    /// certificate for another key is refused and audited, even if the CA signed it.
    #[serde(default)]
    pub partner_key: Option<String>,
    /// Analysts who may start jobs under this agreement (the job spec names the analyst); empty
    /// = any analyst.
    #[serde(default)]
    pub analysts: Vec<String>,
}

/// The config file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    // The cause is part of the message, not a chained source: printed once, not twice.
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema (toml's message names the line,
    /// column and key).
    #[error("config file {}: {error}", path.display())]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The TOML error.
        error: toml::de::Error,
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
    /// The dataset called `name`.
    pub fn dataset(&self, name: &str) -> Option<&DatasetConfig> {
        self.datasets.iter().find(|d| d.name == name)
    }

    /// The agreement with `partner`.
    pub fn agreement_with(&self, partner: &str) -> Option<&Agreement> {
        self.agreements.iter().find(|a| a.partner == partner)
    }

    /// The δ at which ε caps are read (`dp_delta`, default [`DEFAULT_DP_DELTA`]).
    pub fn delta(&self) -> f64 {
        self.dp_delta.map_or(DEFAULT_DP_DELTA, Delta::get)
    }

    /// The audit log's file: `<state_dir>/audit.log`.
    pub fn audit_path(&self) -> PathBuf {
        crate::audit::audit_path(&self.state_dir)
    }

    /// `memory_limit` in bytes.
    pub fn memory_limit_bytes(&self) -> Option<u64> {
        self.memory_limit.map(|b| b.as_u64())
    }

    /// Where spill files go: `spill_dir` if set, else `<state_dir>/spill`.
    pub fn spill_dir(&self) -> PathBuf {
        self.spill_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("spill"))
    }

    /// The privacy-budget ledger's file: `ledger` if set, else `<state_dir>/ledger.sqlite`.
    pub fn ledger_path(&self) -> PathBuf {
        self.ledger
            .clone()
            .unwrap_or_else(|| self.state_dir.join("ledger.sqlite"))
    }

    pub(super) fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        // A dataset's path may be a URL: `file://` becomes its local path, and a remote one
        // (`s3://`) is kept as written.
        let resolve_data = |p: &mut PathBuf| {
            if p.as_os_str().is_empty() {
                return;
            }
            if let Some(local) = crate::data::source::local_path(p) {
                *p = local;
                resolve(p);
            }
        };
        resolve(&mut self.state_dir);
        if let Some(ledger) = &mut self.ledger {
            resolve(ledger);
        }
        if let Some(spill) = &mut self.spill_dir {
            resolve(spill);
        }
        if let Some(key) = &mut self.engine.sealing_key {
            resolve(key);
        }
        if let Some(shared) = &mut self.engine.shared_dir {
            resolve(shared);
        }
        resolve(&mut self.tls.ca);
        resolve(&mut self.tls.cert);
        resolve(&mut self.tls.key);
        if let Some(crl) = &mut self.tls.crl {
            resolve(crl);
        }
        let engine = crate::data::schema::EngineLimits {
            cluster: self
                .engine
                .ballista
                .clone()
                .map(|url| crate::data::schema::Cluster {
                    url,
                    partitions: self.engine.partitions.unwrap_or(DEFAULT_CLUSTER_PARTITIONS),
                    sealing_key: self.engine.sealing_key.clone(),
                    shared_dir: self.engine.shared_dir.clone(),
                    in_part_order: false,
                }),
            memory_limit: self.memory_limit.map(|b| b.as_u64()),
            spill_dir: self
                .spill_dir
                .clone()
                .unwrap_or_else(|| self.state_dir.join("spill")),
        };
        for d in &mut self.datasets {
            resolve_data(&mut d.path);
            for t in &mut d.tables {
                resolve_data(&mut t.path);
            }
            d.engine = engine.clone();
        }
    }
}

impl Agreement {
    /// Refuses a job at `now_ms` if the agreement has expired (its last day was before today,
    /// UTC; a time that has no date counts as after it).
    pub fn check_in_force(&self, now_ms: i64) -> Result<(), super::Veto> {
        if let Some(expires) = self.expires
            && PolicyDate::from_unix_ms(now_ms).is_none_or(|today| today > expires)
        {
            return Err(super::Veto(format!(
                "agreement with {} expired {expires}",
                self.partner
            )));
        }
        Ok(())
    }

    /// Refuses a job `analyst` asked for when this agreement names its analysts and not this
    /// one; the reason names the analyst.
    pub fn check_analyst(&self, analyst: &str) -> Result<(), String> {
        if self.analysts.is_empty() || self.analysts.iter().any(|a| a == analyst) {
            return Ok(());
        }
        let who = if analyst.is_empty() {
            "an unnamed analyst".to_owned()
        } else {
            format!("analyst {}", analyst.escape_default())
        };
        Err(format!(
            "the agreement with {} does not let {who} start jobs (it names {})",
            self.partner,
            self.analysts.join(", ")
        ))
    }

    /// Whether `purpose` is one of this agreement's purposes.
    pub fn allows_purpose(&self, purpose: &str) -> bool {
        self.purposes.iter().any(|p| p == purpose)
    }

    /// The allow entry for `computation` on `dataset` whose keys include `key` (`"email+phone"`).
    pub fn find_allow(&self, computation: Computation, dataset: &str, key: &str) -> Option<&Allow> {
        self.allow.iter().find(|e| {
            e.computation() == computation
                && e.dataset() == dataset
                && e.keys().iter().any(|k| k == key)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::normalise::Normaliser;
    use crate::policy::{
        DEFAULT_MAX_SET_SIZE, DEFAULT_MIN_SET_SIZE, Epsilon, Membership, Period, Recipient,
        SumRole, Threshold, is_valid_name,
    };
    use crate::test_fixtures::customers;
    use std::sync::LazyLock;

    const EXAMPLE: &str = include_str!("../../testdata/node.example.toml");

    /// A small valid config: relative TLS and data paths (anchored at the config's directory)
    /// and one agreement.
    static MINIMAL: LazyLock<String> = LazyLock::new(|| {
        r#"
name = "acme"
coordinator = "127.0.0.1:7400"
listen = "127.0.0.1:0"
state_dir = "state"
[tls]
ca = "pki/ca.pem"
cert = "pki/node-acme.pem"
key = "/etc/cleanroom/node-acme.key"
"#
        .to_owned()
            + &customers("data/acme.csv")
            + r#"[[agreement]]
partner = "globex"
purposes = ["overlap-reporting"]
  [[agreement.allow]]
  computation = "match"
  dataset = "customers"
  keys = ["email", "email+phone"]
"#
    });

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
        let cfg = parse(&MINIMAL).unwrap();
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
        assert_eq!(e.membership(), Membership::SelfOnly);
        assert_eq!(
            (e.terms().min_set_size, e.terms().max_set_size),
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
        let cfg = NodeConfig::parse(&MINIMAL, Path::new("node.toml")).unwrap();
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
    fn composite_keys_are_written_either_way_and_kept_one_way() {
        let cfg = parse(&MINIMAL.replace(
            "keys = [\"email\", \"email+phone\"]",
            "keys = [\"email\", \"email, phone\"]",
        ))
        .unwrap();
        let a = cfg.agreement_with("globex").unwrap();
        assert!(
            a.find_allow(Computation::Match, "customers", "email+phone")
                .is_some()
        );
        assert!(
            a.allow
                .iter()
                .flat_map(|e| e.keys())
                .all(|k| !k.contains(','))
        );
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
        assert!(msg.contains("advertise"), "{msg}"); // DNS names are addresses too (resolved when dialled).
        let cfg = parse(
            &MINIMAL
                .replace("\"127.0.0.1:7400\"", "\"localhost:7400\"")
                .replace(
                    "state_dir",
                    "advertise = \"acme-node.example.internal:7501\"\nstate_dir",
                ),
        )
        .unwrap();
        assert_eq!(cfg.coordinator.to_string(), "localhost:7400");
        assert_eq!(
            cfg.advertise.map(|a| a.to_string()).as_deref(),
            Some("acme-node.example.internal:7501")
        );
        let msg = invalid(&MINIMAL.replace("\"127.0.0.1:7400\"", "\"bad host:7400\""));
        assert!(
            msg.contains("coordinator") && msg.contains("host:port"),
            "{msg}"
        );
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
        let twice = format!(
            "{}\n[[agreement]]\npartner = \"globex\"\npurposes = [\"x\"]\n",
            *MINIMAL
        );
        assert!(invalid(&twice).contains("two agreements with 'globex'"));
    }

    fn with_allow(extra: &str) -> String {
        MINIMAL.replace(
            "keys = [\"email\", \"email+phone\"]",
            &format!("keys = [\"email\"]\n{extra}"),
        )
    }

    /// [`with_allow`] with MINIMAL's first entry made an overlap (ε applies to overlap only).
    fn with_overlap_allow(extra: &str) -> String {
        with_allow(extra).replacen("computation = \"match\"", "computation = \"overlap\"", 1)
    }

    #[test]
    fn policy_fields_parse() {
        let text = MINIMAL
            .replace(
                "purposes = [\"overlap-reporting\"]",
                "purposes = [\"overlap-reporting\"]\nexpires = \"2026-06-30\"",
            )
            .replace(
                "  normaliser = \"phone\"",
                "  normaliser = \"phone\"\n  default_region = \"GB\"\n  [[dataset.value]]\n  column = \"amount_cents\"\n  min = 0\n  max = 1000000",
            )
            .replace(
                "path = \"data/acme.csv\"",
                "path = \"data/acme.csv\"\nconsent = { fraud-detection = \"consent_fraud\" }",
            );
        let text = format!(
            "budget = {{ epsilon_per_period = 10, period = \"week\" }}\n{}",
            text.replace(
                "keys = [\"email\", \"email+phone\"]",
                "keys = [\"email\"]\n  membership = \"both\"\n  min_input_size = 1000\n  min_result = 10\n  runs_per_period = 2\n  period = \"hour\"\n  counts_to = [\"coordinator\"]\n  value_columns = [{ column = \"amount_cents\", min = 0, max = 50000 }]"
            )
        );
        let cfg = parse(&text).unwrap();
        let b = cfg.budget.as_ref().unwrap();
        assert_eq!(
            (b.epsilon_per_period.map(Epsilon::get), b.period),
            (Some(10.0), Period::Week)
        );
        assert_eq!(b.epsilon_lifetime, None);
        assert_eq!(cfg.delta(), DEFAULT_DP_DELTA);
        let a = cfg.agreement_with("globex").unwrap();
        assert_eq!(a.expires.unwrap().to_string(), "2026-06-30");
        let e = &a.allow[0];
        assert_eq!(e.membership(), Membership::Both);
        let e = e.terms();
        assert_eq!((e.min_input_size.get(), e.min_result.get()), (1000, 10));
        assert_eq!(e.runs_per_period.map(Threshold::get), Some(2));
        assert_eq!(e.period, Period::Hour);
        assert_eq!(e.epsilon, None);
        assert_eq!(e.counts_to, [Recipient::Coordinator]);
        assert_eq!(e.value_columns[0].max, 50000);
        let d = cfg.dataset("customers").unwrap();
        assert_eq!(d.consent_column("fraud-detection"), Some("consent_fraud"));
        assert_eq!(d.consent_column("overlap-reporting"), None);
        assert_eq!(
            d.identifier("phone").unwrap().options().default_region,
            crate::data::normalise::parse_region("GB").unwrap()
        );
        // Defaults.
        let e = parse(&MINIMAL).unwrap().agreements[0].allow[0]
            .terms()
            .clone();
        assert_eq!((e.min_input_size.get(), e.min_result.get()), (1, 1));
        assert_eq!(e.runs_per_period, None);
        assert_eq!(e.period, Period::Day);
        assert_eq!(e.epsilon, None);
        assert_eq!(e.counts_to, [Recipient::Partner, Recipient::Coordinator]);
    }

    #[test]
    fn epsilon_must_be_finite_and_positive() {
        for bad in ["0", "0.0", "-1.5", "nan", "inf", "-inf"] {
            let msg = invalid(&with_overlap_allow(&format!("  epsilon = {bad}")));
            assert!(msg.contains("epsilon"), "{bad}: {msg}");
            assert!(msg.contains("line "), "{bad}: {msg}");
            assert!(msg.contains("/etc/cleanroom/node.toml"), "{bad}: {msg}");
        }
        assert!(
            parse(&format!(
                "budget = {{ epsilon_lifetime = 5 }}\n{}",
                with_overlap_allow("  epsilon = 1")
            ))
            .is_ok()
        );
        // On a match, ε is refused: membership is released exactly, a noised count would
        // protect nothing.
        let msg = invalid(&with_allow("  epsilon = 1"));
        assert!(msg.contains("epsilon does not apply to match"), "{msg}");
        let msg = invalid(&format!(
            "budget = {{ epsilon_per_period = nan }}\n{}",
            *MINIMAL
        ));
        assert!(msg.contains("epsilon"), "{msg}");
    }

    #[test]
    fn budget_per_purpose_and_ledger_path() {
        let text = MINIMAL.replace(
            "purposes = [\"overlap-reporting\"]",
            "purposes = [\"overlap-reporting\"]\nbudget_per_purpose = { epsilon_per_period = 1.5, period = \"week\" }",
        );
        let cfg = parse(&text).unwrap();
        let b = cfg.agreements[0].budget_per_purpose.as_ref().unwrap();
        assert_eq!(
            (b.epsilon_per_period.map(Epsilon::get), b.period),
            (Some(1.5), Period::Week)
        );
        // Default ledger beside the audit log; a relative setting is resolved like other paths.
        assert_eq!(
            cfg.ledger_path(),
            Path::new("/etc/cleanroom/state/ledger.sqlite")
        );
        let cfg = parse(&format!("ledger = \"db/budget.sqlite\"\n{text}")).unwrap();
        assert_eq!(
            cfg.ledger_path(),
            Path::new("/etc/cleanroom/db/budget.sqlite")
        );
        assert!(invalid(&format!("ledger = \"\"\n{text}")).contains("ledger is an empty path"));
        // Unknown keys inside the cap are errors, as everywhere.
        let msg = invalid(&MINIMAL.replace(
            "purposes = [\"overlap-reporting\"]",
            "purposes = [\"overlap-reporting\"]\nbudget_per_purpose = { epsilon = 1 }",
        ));
        assert!(msg.contains("epsilon"), "{msg}");
        let msg = invalid(&MINIMAL.replace(
            "purposes = [\"overlap-reporting\"]",
            "purposes = [\"overlap-reporting\"]\nbudget_per_purpose = { epsilon_per_period = 0 }",
        ));
        assert!(msg.contains("greater than 0"), "{msg}");
    }

    /// ε that no cap bounds could be spent without end (and averaging runs removes the
    /// noise): refused when the config is read, with what to add.
    #[test]
    fn epsilon_without_any_cap_is_refused() {
        let msg = invalid(&with_overlap_allow("  epsilon = 1"));
        assert!(
            msg.contains("allow overlap on 'customers' sets epsilon 1 but no budget caps it")
                && msg.contains("budget_per_purpose")
                && msg.contains("[budget]")
                && msg.contains("line "),
            "{msg}"
        );
        // Either cap is enough; so is a lifetime cap alone.
        let capped = with_overlap_allow("  epsilon = 1").replace(
            "purposes = [\"overlap-reporting\"]",
            "purposes = [\"overlap-reporting\"]\nbudget_per_purpose = { epsilon_lifetime = 10 }",
        );
        let cfg = parse(&capped).unwrap();
        let b = cfg.agreements[0].budget_per_purpose.as_ref().unwrap();
        assert_eq!(b.epsilon_per_period, None);
        assert_eq!(b.epsilon_lifetime.map(Epsilon::get), Some(10.0));
        // A budget must cap something.
        let msg = invalid(&format!("budget = {{ period = \"day\" }}\n{}", *MINIMAL));
        assert!(
            msg.contains("[budget] sets neither epsilon_per_period nor epsilon_lifetime"),
            "{msg}"
        );
        // dp_delta: in (0, 1e-5].
        for bad in ["0", "-1e-9", "0.01", "nan"] {
            let msg = invalid(&format!("dp_delta = {bad}\n{}", *MINIMAL));
            assert!(
                msg.contains("dp_delta must be greater than 0"),
                "{bad}: {msg}"
            );
        }
        assert_eq!(
            parse(&format!("dp_delta = 1e-7\n{}", *MINIMAL))
                .unwrap()
                .delta(),
            1e-7
        );
    }

    #[test]
    fn epsilon_per_run_above_a_cap_is_an_error() {
        let text = with_overlap_allow("  epsilon = 2").replace(
            "purposes = [\"overlap-reporting\"]",
            "purposes = [\"overlap-reporting\"]\nbudget_per_purpose = { epsilon_per_period = 1 }",
        );
        let msg = invalid(&text);
        assert!(
            msg.contains(
                "one run costs epsilon 2 (epsilon 2), above the budget_per_purpose cap (epsilon 1 \
                 per day)"
            ),
            "{msg}"
        );
        let msg = invalid(&format!(
            "budget = {{ epsilon_per_period = 1, epsilon_lifetime = 1 }}\n{}",
            with_overlap_allow("  epsilon = 1.5")
        ));
        assert!(
            msg.contains("above the [budget] cap (epsilon 1 per day, epsilon 1 in all (lifetime))"),
            "{msg}"
        );
        assert!(
            parse(&format!(
                "budget = {{ epsilon_per_period = 1 }}\n{}",
                with_overlap_allow("  epsilon = 1")
            ))
            .is_ok()
        );
    }

    #[test]
    fn thresholds_of_zero_are_errors() {
        for key in ["min_input_size", "min_result", "runs_per_period"] {
            let msg = invalid(&with_allow(&format!("  {key} = 0")));
            assert!(
                msg.contains(key) && msg.contains("at least 1") && msg.contains("line "),
                "{msg}"
            );
            assert!(invalid(&with_allow(&format!("  {key} = -3"))).contains("at least 1"));
        }
    }

    #[test]
    fn unknown_policy_keys_and_values() {
        assert!(invalid(&with_allow("  epsilom = 1.0")).contains("epsilom"));
        assert!(invalid(&with_allow("  period = \"month\"")).contains("month"));
        assert!(invalid(&with_allow("  counts_to = [\"analyst\"]")).contains("analyst"));
        assert!(invalid(&with_allow("  membership = \"all\"")).contains("all"));
        assert!(
            invalid(&format!(
                "budget = {{ epsilon_per_period = 1, cap = 2 }}\n{}",
                *MINIMAL
            ))
            .contains("cap")
        );
        let msg = invalid(&MINIMAL.replace(
            "purposes = [\"overlap-reporting\"]",
            "purposes = [\"overlap-reporting\"]\nexpires = \"2026-02-30\"",
        ));
        assert!(
            msg.contains("2026-02-30") && msg.contains("YYYY-MM-DD"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_value_column_and_bounds() {
        let msg = invalid(&with_allow(
            "  value_columns = [{ column = \"amount_cents\", min = 0, max = 1 }]",
        ));
        assert!(
            msg.contains("'amount_cents'")
                && msg.contains("declared: none")
                && msg.contains("line 26:")
                && msg.contains("(line 28)"),
            "{msg}"
        );
        let declared = MINIMAL.replace(
            "  normaliser = \"phone\"",
            "  normaliser = \"phone\"\n  [[dataset.value]]\n  column = \"amount_cents\"\n  min = 0\n  max = 100",
        );
        let wide = declared.replace(
            "keys = [\"email\", \"email+phone\"]",
            "keys = [\"email\"]\n  value_columns = [{ column = \"amount_cents\", min = 0, max = 101 }]",
        );
        assert!(invalid(&wide).contains("inside the dataset's [0, 100]"));
        let inverted = declared.replace("max = 100", "max = -1");
        assert!(invalid(&inverted).contains("min 0 is above max -1"));
    }

    #[test]
    fn membership_alias_and_rules() {
        let e = parse(&with_allow("  reveal_membership_to_partner = true"))
            .unwrap()
            .agreements[0]
            .allow[0]
            .clone();
        assert_eq!(e.membership(), Membership::Both);
        let e = parse(&with_allow("  reveal_membership_to_partner = false"))
            .unwrap()
            .agreements[0]
            .allow[0]
            .clone();
        assert_eq!(e.membership(), Membership::SelfOnly);
        let e = parse(&with_allow("  membership = \"none\""))
            .unwrap()
            .agreements[0]
            .allow[0]
            .clone();
        assert_eq!(e.membership(), Membership::None);
        let msg = invalid(&with_allow(
            "  membership = \"both\"\n  reveal_membership_to_partner = true",
        ));
        assert!(msg.contains("not both"), "{msg}");
        let msg =
            invalid(&with_allow("  membership = \"self\"").replace("\"match\"", "\"overlap\""));
        assert!(msg.contains("match only"), "{msg}");
        assert!(invalid(&with_allow("  counts_to = [\"partner\", \"partner\"]")).contains("twice"));
    }

    #[test]
    fn normaliser_options_apply_to_their_normaliser_only() {
        let msg = invalid(&MINIMAL.replace(
            "  normaliser = \"phone\"",
            "  normaliser = \"phone\"\n  gmail_rule = true",
        ));
        assert!(
            msg.contains("gmail_rule applies to normaliser email only"),
            "{msg}"
        );
        let msg = invalid(&MINIMAL.replace(
            "  normaliser = \"email\"",
            "  normaliser = \"email\"\n  case_fold = true",
        ));
        assert!(msg.contains("case_fold"), "{msg}");
        let msg = invalid(&MINIMAL.replace(
            "  normaliser = \"phone\"",
            "  normaliser = \"phone\"\n  default_region = \"ZZ\"",
        ));
        assert!(msg.contains("default_region 'ZZ'"), "{msg}");
        let cfg = parse(&MINIMAL.replace(
            "  normaliser = \"email\"",
            "  normaliser = \"email\"\n  gmail_rule = true",
        ))
        .unwrap();
        assert!(cfg.datasets[0].identifiers[0].options().gmail_rule);
    }

    #[test]
    fn dates_parse_strictly() {
        assert!(PolicyDate::parse("2026-06-30").is_some());
        for bad in [
            "2026-6-30",
            "2026-13-01",
            "2026-06-31",
            "26-06-30",
            "2026/06/30",
            "+026-06-30",
        ] {
            assert!(PolicyDate::parse(bad).is_none(), "{bad}");
        }
        let d = PolicyDate::from_unix_ms(1_782_864_000_000).unwrap();
        assert_eq!(d.to_string(), "2026-07-01");
    }

    // ---- aggregate entries (group_by, min_parties, max_colluders)

    fn with_aggregate(entry: &str) -> String {
        MINIMAL
            .replace(
                "  normaliser = \"phone\"",
                "  normaliser = \"phone\"\n  [[dataset.value]]\n  column = \"amount\"\n  min = 0\n  max = 100000",
            )
            .replace(
                "  computation = \"match\"\n  dataset = \"customers\"\n  keys = [\"email\", \"email+phone\"]",
                &format!("  computation = \"aggregate\"\n  dataset = \"customers\"\n{entry}"),
            )
    }

    #[test]
    fn aggregate_entry_parses() {
        let cfg = parse(&format!(
            "budget = {{ epsilon_per_period = 20 }}\n{}",
            with_aggregate(
                "  group_by = [\"category\"]\n  min_parties = 4\n  max_colluders = 2\n  value_columns = [{ column = \"amount\", min = 0, max = 5000 }]\n  epsilon = 1.0\n  person = \"customer\"",
            )
        ))
        .unwrap();
        let e = &cfg.agreement_with("globex").unwrap().allow[0];
        assert_eq!(e.computation(), Computation::Aggregate);
        assert!(e.keys().is_empty());
        let Allow::Aggregate(e) = e else {
            panic!("an aggregate entry")
        };
        assert_eq!(e.group_by, vec!["category".to_owned()]);
        assert_eq!((e.min_parties, e.max_colluders), (Some(4), Some(2)));
        assert_eq!(e.person.as_deref(), Some("customer"));
        // Defaults: 3 parties minimum, colluders unset (all but one), per-row clipping.
        let cfg = parse(&with_aggregate("  group_by = [\"category\"]")).unwrap();
        let Allow::Aggregate(e) = &cfg.agreement_with("globex").unwrap().allow[0] else {
            panic!("an aggregate entry")
        };
        assert_eq!((e.min_parties, e.max_colluders), (None, None));
        assert_eq!(e.person, None);
        // An aggregate's ε is a zCDP ε: one run of ε 1 costs ρ 1/2, read at δ 1e-9 as
        // 0.5 + 2·√(0.5·ln 1e9) ≈ 6.94; a cap of 5 could never pay for it.
        let msg = invalid(&format!(
            "budget = {{ epsilon_per_period = 5 }}\n{}",
            with_aggregate("  group_by = [\"category\"]\n  epsilon = 1.0")
        ));
        assert!(
            msg.contains(
                "one run costs epsilon 6.937898 (epsilon 1 read as zCDP, rho 0.5, at dp_delta \
                 1e-9), above the [budget] cap (epsilon 5 per day)"
            ),
            "{msg}"
        );
        // person: aggregate only, not empty, not a group-by column.
        assert!(
            invalid(&with_aggregate(
                "  group_by = [\"category\"]\n  person = \"\""
            ))
            .contains("person names an empty column")
        );
        assert!(
            invalid(&with_aggregate(
                "  group_by = [\"category\"]\n  person = \"category\""
            ))
            .contains("person column 'category' is also a group_by column")
        );
        assert!(
            invalid(&with_overlap_allow("  person = \"customer\""))
                .contains("keys min_parties, max_colluders and person apply to aggregate only")
        );
    }

    fn with_overlap_sum(entry: &str) -> String {
        with_aggregate("").replace(
            "  computation = \"aggregate\"\n  dataset = \"customers\"\n",
            &format!(
                "  computation = \"overlap-sum\"\n  dataset = \"customers\"\n  keys = [\"email\"]\n{entry}\n"
            ),
        )
    }

    #[test]
    fn overlap_sum_entry_parses_and_its_rules_hold() {
        let cfg = parse(&format!(
            "budget = {{ epsilon_lifetime = 20 }}\n{}",
            with_overlap_sum(
                "  roles = [\"value-holder\"]\n  group_by = [\"category\"]\n  value_columns = [{ column = \"amount\", min = 0, max = 5000 }]\n  epsilon = 1.0",
            )
        ))
        .unwrap();
        let e = &cfg.agreement_with("globex").unwrap().allow[0];
        assert_eq!(e.computation(), Computation::OverlapSum);
        let Allow::OverlapSum(e) = e else {
            panic!("an overlap-sum entry")
        };
        assert_eq!(e.roles, Some(vec![SumRole::ValueHolder]));
        assert_eq!(e.group_by, vec!["category".to_owned()]);
        // Roles default to both (None).
        let cfg = parse(&with_overlap_sum("")).unwrap();
        let Allow::OverlapSum(e) = &cfg.agreement_with("globex").unwrap().allow[0] else {
            panic!("an overlap-sum entry")
        };
        assert_eq!(e.roles, None);
        let msg = invalid(&with_overlap_sum("  roles = []"));
        assert!(msg.contains("roles lists no role"), "{msg}");
        let msg = invalid(&with_overlap_sum(
            "  roles = [\"key-holder\", \"key-holder\"]",
        ));
        assert!(msg.contains("a role twice"), "{msg}");
        assert!(invalid(&with_overlap_sum("  roles = [\"boss\"]")).contains("boss"));
        let msg = invalid(&with_overlap_sum(
            "  value_columns = [{ column = \"amount\", min = -1, max = 5 }]",
        ));
        assert!(msg.contains("negative lower bound"), "{msg}");
        let msg = invalid(&with_overlap_sum("  membership = \"both\""));
        assert!(msg.contains("match only"), "{msg}");
        let msg = invalid(&with_overlap_sum("  min_parties = 3"));
        assert!(msg.contains("aggregate only"), "{msg}");
        // roles belong to overlap-sum.
        assert!(invalid(&with_allow("  roles = [\"key-holder\"]")).contains("overlap-sum"));
    }

    #[test]
    fn aggregate_entry_rules() {
        assert!(invalid(&with_aggregate("")).contains("group_by must list"));
        assert!(
            invalid(&with_aggregate(
                "  group_by = [\"category\"]\n  keys = [\"email\"]"
            ))
            .contains("remove keys")
        );
        assert!(
            invalid(&with_aggregate(
                "  group_by = [\"category\"]\n  min_parties = 2"
            ))
            .contains("at least 3")
        );
        assert!(
            invalid(&with_aggregate(
                "  group_by = [\"category\"]\n  counts_to = [\"partner\"]"
            ))
            .contains("counts_to must include")
        );
        assert!(
            invalid(&with_aggregate(
                "  group_by = [\"category\"]\n  value_columns = [{ column = \"amount\", min = 0, max = 100001 }]"
            ))
            .contains("inside the dataset's")
        );
        assert!(
            invalid(&with_aggregate(
                "  group_by = [\"category\"]\n  value_columns = [{ column = \"nope\", min = 0, max = 1 }]"
            ))
            .contains("does not declare")
        );
        // The aggregate keys are refused on other computations.
        assert!(invalid(&with_allow("  group_by = [\"category\"]")).contains("aggregate only"));
        assert!(invalid(&with_allow("  max_colluders = 1")).contains("aggregate only"));
        // Overlap and match still need keys.
        assert!(
            invalid(&MINIMAL.replace("  keys = [\"email\", \"email+phone\"]\n", ""))
                .contains("lists no keys")
        );
    }
}
