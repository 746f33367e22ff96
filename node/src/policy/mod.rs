//! The node's policy: its agreement with each partner, as code.
//!
//! - [`schema`]: the config file (TOML) and its checks, which type every allow entry;
//! - [`values`]: the value types an agreement is written in;
//! - [`allow`]: a checked allow entry, one [`Allow`] variant per computation;
//! - [`psi`], [`overlap_sum`], [`aggregate`]: each kind's rules — what its allow entry may say
//!   and the check of its offers, before any data is read;
//! - [`permit`]: what an accepted offer lets a job do ([`Permit`]), and the [`Veto`];
//! - [`summary`]: what `cleanroom-node policy check` prints;
//! - here: `policy check` itself ([`check_file`]) and the live policy of a running node
//!   ([`PolicyHolder`]), which a failed reload leaves unchanged.
//!
//! [`check_file`] validates the policy as start-up does, and also opens every dataset (a CSV
//! header, a Parquet footer, a view's plan) to check that the declared identifier, value and
//! consent columns (and each aggregate entry's person column) are in it, and that a SQL view
//! outputs no column an allow entry does not permit ([`permitted_columns`]).

pub mod aggregate;
pub mod allow;
pub mod overlap_sum;
pub mod parse;
pub mod permit;
pub mod psi;
pub mod schema;
pub mod summary;
pub mod values;

use std::path::Path;
use std::sync::{Arc, RwLock};

pub use crate::data::{DatasetConfig, IdentifierConfig, ValueColumn};
pub use crate::ledger::{Budget, DEFAULT_DP_DELTA, Delta, Epsilon, MAX_DP_DELTA, Period};
pub use allow::{AggregateAllow, Allow, AllowEntry, AllowTerms, OverlapSumAllow, PsiAllow};
pub use permit::{Permit, RunCounter, Veto};
pub use schema::{Agreement, ConfigError, DashboardConfig, NodeConfig, TlsConfig};
pub use summary::{EXPIRY_WARNING_DAYS, PolicySummary, deviating_partner_learns, expiry_warnings};
pub use values::{
    Computation, DEFAULT_MAX_SET_SIZE, DEFAULT_MIN_SET_SIZE, MAX_NAME_LEN, MIN_AGGREGATE_PARTIES,
    Membership, PolicyDate, Recipient, SumRole, Threshold, is_valid_name, run_cost,
};

/// Loads and validates the policy at `path`, including the headers of the dataset files.
pub fn check_file(path: impl AsRef<Path>) -> Result<PolicySummary, ConfigError> {
    check_file_at(path, crate::clock::now_ms())
}

/// [`check_file`] as of `now_ms` (Unix milliseconds), for the expiry warnings.
pub fn check_file_at(path: impl AsRef<Path>, now_ms: i64) -> Result<PolicySummary, ConfigError> {
    let path = path.as_ref();
    let config = load_checked(path)?;
    let warnings = PolicyDate::from_unix_ms(now_ms)
        .map(|today| expiry_warnings(&config, today))
        .unwrap_or_default();
    Ok(PolicySummary {
        path: path.to_owned(),
        config: Arc::new(config),
        warnings,
    })
}

/// [`NodeConfig::load`] plus the dataset header check of [`check_file`].
pub fn load_checked(path: &Path) -> Result<NodeConfig, ConfigError> {
    let cfg = NodeConfig::load(path)?;
    check_headers(&cfg).map_err(|problem| ConfigError::Invalid {
        path: path.to_owned(),
        problem,
    })?;
    Ok(cfg)
}

/// Every dataset has each declared column exactly once, and a SQL view outputs only columns an
/// allow entry permits.
fn check_headers(cfg: &NodeConfig) -> Result<(), String> {
    for d in &cfg.datasets {
        let file = d.location();
        // Opening plans the dataset and reads its column names (a CSV header, a Parquet
        // footer, the view's output); no row is read.
        let source = crate::data::source::Source::open(d)
            .map_err(|e| format!("dataset '{}': {e}", d.name))?;
        let headers = source.headers();
        let declared = d
            .identifiers
            .iter()
            .map(|i| ("identifier", i.column.as_str()))
            .chain(
                d.values
                    .iter()
                    .map(|v| ("value", v.column.get_ref().as_str())),
            )
            .chain(d.consent.values().map(|c| ("consent", c.as_str())))
            .chain(
                cfg.agreements
                    .iter()
                    .flat_map(|a| &a.allow)
                    .filter(|e| e.dataset() == d.name)
                    .filter_map(|e| match e {
                        Allow::Aggregate(a) => a.person.as_deref(),
                        _ => None,
                    })
                    .map(|p| ("person", p)),
            );
        for (kind, column) in declared {
            match headers.iter().filter(|h| *h == column).count() {
                1 => {}
                0 => {
                    return Err(format!(
                        "dataset '{}': {kind} column '{column}' is not in {file} \
                         (its columns: {}){}",
                        d.name,
                        headers.join(", "),
                        crate::data::dataset::header_hint(column, headers)
                    ));
                }
                _ => {
                    return Err(format!(
                        "dataset '{}': {kind} column '{column}' appears more than once in \
                         {file}",
                        d.name
                    ));
                }
            }
        }
        if d.sql.is_some() {
            let permitted = permitted_columns(cfg, d);
            let list = || {
                if permitted.is_empty() {
                    "none".to_owned()
                } else {
                    permitted.iter().copied().collect::<Vec<_>>().join(", ")
                }
            };
            if let Some(extra) = headers.iter().find(|h| !permitted.contains(h.as_str())) {
                return Err(format!(
                    "dataset '{}': the sql view outputs column '{extra}', which no allow entry \
                     permits (permitted: {}); select only the columns the agreements use",
                    d.name,
                    list()
                ));
            }
            // Renaming does not launder a column: `SELECT ssn AS email` reads ssn.
            if let Some(extra) = source
                .view_reads()
                .iter()
                .find(|read| !view_may_read(read, &permitted))
            {
                return Err(format!(
                    "dataset '{}': the sql view reads column '{extra}' into its output, which \
                     no allow entry permits (permitted: {}); conditions (WHERE, JOIN ON) may \
                     use any column, the select list may not",
                    d.name,
                    list()
                ));
            }
        }
    }
    Ok(())
}

/// Whether a view's select list may read `read`, a column or a struct field's path
/// (`contact.email`): it is permitted, or it is a field whose own name is (`contact.email`
/// where `email` is). A whole struct (`contact`) must be permitted itself.
fn view_may_read(read: &str, permitted: &std::collections::BTreeSet<&str>) -> bool {
    permitted.contains(read)
        || read
            .rsplit_once('.')
            .is_some_and(|(_, field)| permitted.contains(field))
}

/// The columns of `d` some allow entry lets a job read: the columns of the identifiers its keys
/// join on, its value, group-by and person columns, and the dataset's consent columns (which
/// only filter rows).
pub fn permitted_columns<'a>(
    cfg: &'a NodeConfig,
    d: &'a crate::data::DatasetConfig,
) -> std::collections::BTreeSet<&'a str> {
    let mut permitted: std::collections::BTreeSet<&str> =
        d.consent.values().map(String::as_str).collect();
    for e in cfg
        .agreements
        .iter()
        .flat_map(|a| &a.allow)
        .filter(|e| e.dataset() == d.name)
    {
        for key in e.keys() {
            for name in key.split('+') {
                if let Some(id) = d.identifier(name) {
                    permitted.insert(id.column.as_str());
                }
            }
        }
        permitted.extend(
            e.terms()
                .value_columns
                .iter()
                .map(|v| v.column.get_ref().as_str()),
        );
        permitted.extend(e.group_by().iter().map(String::as_str));
        if let Allow::Aggregate(a) = e
            && let Some(person) = a.person.as_deref()
        {
            permitted.insert(person);
        }
    }
    permitted
}

/// The live policy: readers take an `Arc` snapshot; [`PolicyHolder::reload`] swaps in a new
/// one only if it validates, so a failed reload keeps the last good policy.
#[derive(Debug, Clone)]
pub struct PolicyHolder {
    inner: Arc<RwLock<(u64, Arc<NodeConfig>)>>,
}

impl PolicyHolder {
    /// Holds `cfg` as generation 0.
    pub fn new(cfg: NodeConfig) -> PolicyHolder {
        PolicyHolder {
            inner: Arc::new(RwLock::new((0, Arc::new(cfg)))),
        }
    }

    /// The current policy.
    pub fn current(&self) -> Arc<NodeConfig> {
        self.snapshot().1
    }

    /// The current policy and its generation (incremented by each successful reload); a job
    /// re-checks its offer (the kind's offer check, again) when the generation moved.
    pub fn snapshot(&self) -> (u64, Arc<NodeConfig>) {
        let guard = self.inner.read().unwrap_or_else(|e| e.into_inner());
        (guard.0, guard.1.clone())
    }

    /// Loads `path` with [`load_checked`]; on success it becomes the policy, on failure the
    /// last good policy stays and the error is returned.
    pub fn reload(&self, path: impl AsRef<Path>) -> Result<(), ConfigError> {
        let fresh = load_checked(path.as_ref())?;
        let mut guard = self.inner.write().unwrap_or_else(|e| e.into_inner());
        guard.0 += 1;
        guard.1 = Arc::new(fresh);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::node_head;
    use std::path::PathBuf;

    /// Dataset `customers` with a consent column and a value column, and one agreement with
    /// globex allowing an overlap and an overlap-sum.
    fn config_text() -> String {
        node_head("acme")
            + r#"
[[dataset]]
name = "customers"
path = "acme.csv"
consent = { fraud-detection = "consent_fraud" }
  [[dataset.identifier]]
  name = "email"
  column = "email"
  normaliser = "email"
  [[dataset.value]]
  column = "amount_cents"
  min = 0
  max = 1000000
[[agreement]]
partner = "globex"
purposes = ["fraud-detection"]
expires = "2026-06-30"
budget_per_purpose = { epsilon_per_period = 2.0, period = "week" }
  [[agreement.allow]]
  computation = "overlap"
  dataset = "customers"
  keys = ["email"]
  min_result = 10
  [[agreement.allow]]
  computation = "overlap-sum"
  dataset = "customers"
  keys = ["email"]
  roles = ["value-holder"]
  group_by = ["category"]
  value_columns = [{ column = "amount_cents", min = 0, max = 500000 }]
  epsilon = 0.5
"#
    }

    fn setup(csv: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("acme.csv"), csv).unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, config_text()).unwrap();
        (dir, file)
    }

    #[test]
    fn check_file_summarises() {
        let (_dir, file) = setup("email,amount_cents,consent_fraud\na@b.c,1,true\n");
        let summary = check_file(&file).unwrap();
        let text = summary.to_string();
        assert!(text.contains("partner globex"), "{text}");
        assert!(text.contains("expires: 2026-06-30"), "{text}");
        assert!(text.contains("min_result 10"), "{text}");
        assert!(
            text.contains("budget per purpose: epsilon 2 per week"),
            "{text}"
        );
        assert!(
            text.contains("allow overlap-sum on customers by email"),
            "{text}"
        );
        assert!(text.contains("roles value-holder"), "{text}");
        assert!(text.contains("group by category"), "{text}");
        assert!(
            text.contains("value amount_cents clipped to [0, 500000]"),
            "{text}"
        );
        assert!(
            text.contains("consent fraud-detection=consent_fraud"),
            "{text}"
        );
        // Under each entry: what a deviating partner can learn, per role it may take.
        assert!(
            text.contains(
                "    if globex deviates from the protocol: globex can learn which of its own \
                 candidate identifiers are in customers (up to max_set_size 100000000 per run), \
                 not only how many"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "    if globex deviates from the protocol: as key holder (we hold the values), it \
                 can learn which of its own candidate identifiers are in customers"
            ),
            "{text}"
        );
        assert!(
            !text.contains("as value holder (we are the key holder)"),
            "{text}"
        );
        assert!(
            text.contains("epsilon per run 0.5 (pure, discrete Laplace)"),
            "{text}"
        );
        assert!(text.contains("dp_delta: 1e-9"), "{text}");
    }

    #[test]
    fn every_kind_says_what_a_deviating_partner_learns() {
        let cfg = NodeConfig::parse(
            &format!(
                "budget = {{ epsilon_per_period = 20 }}\n{}",
                config_text()
                    .replace("  roles = [\"value-holder\"]\n", "")
                    .replace("epsilon_per_period = 2.0", "epsilon_per_period = 20.0")
                    .replace(
                        "  min_result = 10\n",
                        "  min_result = 10\n  [[agreement.allow]]\n  computation = \"match\"\n  \
                         dataset = \"customers\"\n  keys = [\"email\"]\n  [[agreement.allow]]\n  \
                         computation = \"aggregate\"\n  dataset = \"customers\"\n  group_by = \
                         [\"category\"]\n  epsilon = 1.0\n  person = \"customer\"\n",
                    )
            ),
            Path::new("/srv/node.toml"),
        )
        .unwrap();
        let text = PolicySummary {
            path: "/srv/node.toml".into(),
            config: Arc::new(cfg.clone()),
            warnings: Vec::new(),
        }
        .to_string();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("if globex deviates from the protocol"))
            .collect();
        // overlap, match, aggregate, and overlap-sum in both roles.
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[1].contains("whatever the entry's membership setting (here: self)"));
        assert!(lines[2].contains("alone it learns nothing beyond the released totals"));
        assert!(lines[3].contains("as key holder (we hold the values)"));
        assert!(lines[4].contains("as value holder (we are the key holder)"));
        assert!(
            text.contains("epsilon per run 1 (zCDP: rho 0.5 per run, costs epsilon 6.937898"),
            "{text}"
        );
        assert!(
            text.contains("per person on column customer: a person's rows are summed"),
            "{text}"
        );
    }

    #[test]
    fn check_file_warns_of_expired_and_expiring_agreements() {
        let (_dir, file) = setup("email,amount_cents,consent_fraud\na@b.c,1,true\n");
        let at = |date: &str| {
            let d = PolicyDate::parse(date).unwrap().0;
            d.midnight().assume_utc().unix_timestamp() * 1000 + 3_600_000
        };
        // The agreement expires 2026-06-30 (its last day in force).
        let warnings = |date: &str| check_file_at(&file, at(date)).unwrap().warnings;
        assert!(warnings("2026-05-31").is_empty());
        let w = warnings("2026-06-01");
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("globex expires 2026-06-30") && w[0].contains("in 29 days"),
            "{w:?}"
        );
        assert!(warnings("2026-06-30")[0].contains("(its last day in force; today)"));
        let w = warnings("2026-07-02");
        assert!(
            w[0].contains("globex expired 2026-06-30 (2 days ago)"),
            "{w:?}"
        );
        assert!(w[0].contains("every job with globex is refused"), "{w:?}");
        let text = check_file_at(&file, at("2026-07-02")).unwrap().to_string();
        assert!(
            text.contains("warning: the agreement with globex expired"),
            "{text}"
        );
    }

    #[test]
    fn aggregate_allow_lines_name_their_group_columns() {
        let (_dir, file) = setup("email,amount_cents,consent_fraud,category\na@b.c,1,true,x\n");
        std::fs::write(
            &file,
            config_text()
                + "  [[agreement.allow]]\n  computation = \"aggregate\"\n  dataset = \"customers\"\n  \
                   group_by = [\"category\"]\n  value_columns = [{ column = \"amount_cents\", min = 0, max = 100 }]\n",
        )
        .unwrap();
        let text = check_file(&file).unwrap().to_string();
        assert!(
            text.contains("allow aggregate on customers by category\n"),
            "{text}"
        );
    }

    /// The example config shipped with the node is one a new operator can start from: no
    /// agreement in it has expired or is about to.
    #[test]
    fn the_example_config_is_not_expired() {
        let cfg = NodeConfig::parse(
            include_str!("../../testdata/node.example.toml"),
            Path::new("node.example.toml"),
        )
        .unwrap();
        let today = PolicyDate::from_unix_ms(crate::clock::now_ms()).unwrap();
        assert_eq!(expiry_warnings(&cfg, today), Vec::<String>::new());
    }

    /// The dashboard is plain HTTP: a non-loopback address is refused unless allowed.
    #[test]
    fn the_dashboard_listens_on_loopback_unless_allowed() {
        let example = include_str!("../../testdata/node.example.toml");
        let cfg = NodeConfig::parse(example, Path::new("n.toml")).unwrap();
        let listen = cfg.dashboard.unwrap().listen;
        assert!(listen.ip().is_loopback(), "{listen}");
        let open = example.replace("127.0.0.1:7600", "0.0.0.0:7600");
        let err = NodeConfig::parse(&open, Path::new("n.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a loopback address"), "{err}");
        let allowed = open.replace(
            "listen = \"0.0.0.0:7600\"",
            "listen = \"0.0.0.0:7600\"\nallow_non_loopback = true",
        );
        let cfg = NodeConfig::parse(&allowed, Path::new("n.toml")).unwrap();
        assert!(cfg.dashboard.unwrap().allow_non_loopback);
    }

    /// `memory_limit` reads sizes with units, reaches every dataset's engine, and is refused
    /// below what a node needs; the spill directory defaults under the state directory.
    #[test]
    fn the_memory_limit_is_read_with_units_and_has_a_floor() {
        let example = include_str!("../../testdata/node.example.toml");
        let top = |line: &str| example.replacen("\nstate_dir", &format!("\n{line}\nstate_dir"), 1);
        let cfg = NodeConfig::parse(&top("memory_limit = \"1GiB\""), Path::new("n.toml")).unwrap();
        assert_eq!(cfg.memory_limit_bytes(), Some(1 << 30));
        assert_eq!(cfg.spill_dir(), cfg.state_dir.join("spill"));
        for d in &cfg.datasets {
            assert_eq!(d.engine.memory_limit, Some(1 << 30));
            assert_eq!(d.engine.spill_dir, cfg.state_dir.join("spill"));
        }
        let cfg = NodeConfig::parse(example, Path::new("n.toml")).unwrap();
        assert_eq!(cfg.memory_limit_bytes(), None);
        let err = NodeConfig::parse(&top("memory_limit = \"64MiB\""), Path::new("n.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("memory_limit") && err.contains("below"),
            "{err}"
        );
        let err = NodeConfig::parse(&top("memory_limit = \"lots\""), Path::new("n.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("memory_limit"), "{err}");
    }

    /// `engine = { ballista = … }` reaches every dataset with its partitions; a URL that is not
    /// `df://HOST:PORT`, zero partitions, or partitions without a cluster are refused.
    #[test]
    fn the_engine_names_a_ballista_cluster_for_every_dataset() {
        let example = include_str!("../../testdata/node.example.toml");
        let top = |line: &str| example.replacen("\nstate_dir", &format!("\n{line}\nstate_dir"), 1);
        let cfg = NodeConfig::parse(
            &top("engine = { ballista = \"df://10.0.0.5:50050\", partitions = 64 }"),
            Path::new("n.toml"),
        )
        .unwrap();
        for d in &cfg.datasets {
            let cluster = d.engine.cluster.as_ref().unwrap();
            assert_eq!(cluster.url, "df://10.0.0.5:50050");
            assert_eq!(cluster.partitions, 64);
        }
        assert!(
            cfg.datasets
                .iter()
                .all(|d| d.engine.cluster.as_ref().unwrap().sealing_key.is_none())
        );
        let cfg = NodeConfig::parse(
            &top("engine = { ballista = \"df://h:1\", sealing_key = \"keys/executors.key\" }"),
            Path::new("/etc/cleanroom/n.toml"),
        )
        .unwrap();
        assert_eq!(
            cfg.datasets[0].engine.cluster.as_ref().unwrap().sealing_key,
            Some(Path::new("/etc/cleanroom/keys/executors.key").to_path_buf()),
            "a relative key path is read beside the config"
        );
        let cfg = NodeConfig::parse(
            &top("engine = { ballista = \"df://h:1\", sealing_key = \"k\", shared_dir = \"shared\" }"),
            Path::new("/etc/cleanroom/n.toml"),
        )
        .unwrap();
        assert_eq!(
            cfg.datasets[0].engine.cluster.as_ref().unwrap().shared_dir,
            Some(Path::new("/etc/cleanroom/shared").to_path_buf()),
            "a relative shared directory is read beside the config"
        );
        let cfg = NodeConfig::parse(
            &top("engine = { ballista = \"df://10.0.0.5:50050\" }"),
            Path::new("n.toml"),
        )
        .unwrap();
        assert_eq!(
            cfg.datasets[0].engine.cluster.as_ref().unwrap().partitions,
            schema::DEFAULT_CLUSTER_PARTITIONS
        );
        let cfg = NodeConfig::parse(example, Path::new("n.toml")).unwrap();
        assert!(cfg.datasets.iter().all(|d| d.engine.cluster.is_none()));
        for (line, says) in [
            ("engine = { ballista = \"http://h:1\" }", "df://HOST:PORT"),
            ("engine = { ballista = \"df://h\" }", "df://HOST:PORT"),
            (
                "engine = { ballista = \"df://h:1\", partitions = 0 }",
                "partitions",
            ),
            ("engine = { partitions = 8 }", "only read with ballista"),
            (
                "engine = { sealing_key = \"k\" }",
                "only read with ballista",
            ),
            ("engine = { spark = \"x\" }", "spark"),
            (
                "engine = { ballista = \"df://h:1\", shared_dir = \"/mnt/s\" }",
                "only read with a sealing_key",
            ),
            (
                "engine = { ballista = \"df://h:1\", sealing_key = \"k\", shared_dir = \"\" }",
                "shared_dir is an empty path",
            ),
        ] {
            let err = NodeConfig::parse(&top(line), Path::new("n.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{line}: {err}");
        }
    }

    #[test]
    fn check_file_checks_headers() {
        let (_dir, file) = setup("email,amount_cents\na@b.c,1\n");
        let msg = check_file(&file).unwrap_err().to_string();
        assert!(
            msg.contains("node.toml") && msg.contains("consent column 'consent_fraud'"),
            "{msg}"
        );
        let (_dir, file) = setup("email,consent_fraud\na@b.c,1\n");
        let msg = check_file(&file).unwrap_err().to_string();
        assert!(msg.contains("value column 'amount_cents'"), "{msg}");
    }

    /// The test config with `customers` as a SQL view selecting `select` from the CSV table
    /// `orders` (columns email, amount_cents, consent_fraud, category, ssn).
    fn view_setup(select: &str) -> (tempfile::TempDir, PathBuf) {
        let (dir, file) =
            setup("email,amount_cents,consent_fraud,category,ssn\na@b.c,1,true,home,123-45-6789\n");
        let view = format!(
            "name = \"customers\"\nsql = \"SELECT {select} FROM orders WHERE amount_cents > 0\"\n"
        );
        let text = config_text()
            .replace("name = \"customers\"\npath = \"acme.csv\"\n", &view)
            .replacen(
                "[[agreement]]",
                "  [[dataset.table]]\n  name = \"orders\"\n  path = \"acme.csv\"\n[[agreement]]",
                1,
            );
        std::fs::write(&file, text).unwrap();
        (dir, file)
    }

    #[test]
    fn a_view_may_output_only_columns_an_allow_entry_permits() {
        // email (the key), amount_cents (a value column), category (group-by) and the consent
        // column are all permitted.
        let (_dir, file) = view_setup("email, amount_cents, category, consent_fraud");
        check_file(&file).unwrap();
        // The filter may read ssn; the output may not carry it.
        let (_dir, file) = view_setup("email, amount_cents, consent_fraud, ssn");
        let msg = check_file(&file).unwrap_err().to_string();
        assert!(
            msg.contains("outputs column 'ssn', which no allow entry permits"),
            "{msg}"
        );
        // Renaming does not launder a column.
        let (_dir, file) = view_setup("ssn AS email, amount_cents, consent_fraud");
        let msg = check_file(&file).unwrap_err().to_string();
        assert!(msg.contains("reads column 'ssn'"), "{msg}");
        let (_dir, file) = view_setup("concat(email, ssn) AS email, amount_cents, consent_fraud");
        let msg = check_file(&file).unwrap_err().to_string();
        assert!(msg.contains("reads column 'ssn'"), "{msg}");
        let (_dir, file) = view_setup("email, amount_cents, consent_fraud, ssn AS note");
        let msg = check_file(&file).unwrap_err().to_string();
        assert!(msg.contains("'note'"), "{msg}");
        // A view that writes is refused.
        let (_dir, file) = view_setup("email FROM orders; DROP TABLE orders; SELECT email");
        assert!(check_file(&file).is_err());
    }

    /// [`view_setup`] with the table `orders` as JSON lines whose customer is a nested object:
    /// `{"customer": {"email", "ssn", "address": {"city"}}, "amount_cents", "consent_fraud",
    /// "category"}`.
    fn nested_view_setup(select: &str) -> (tempfile::TempDir, PathBuf) {
        let (dir, file) = view_setup(select);
        let line = r#"{"customer": {"email": "a@b.c", "ssn": "123-45-6789", "address": {"city": "Berlin"}}, "amount_cents": 1, "consent_fraud": true, "category": "home"}"#;
        std::fs::write(dir.path().join("acme.jsonl"), format!("{line}\n")).unwrap();
        let text = std::fs::read_to_string(&file)
            .unwrap()
            .replace("path = \"acme.csv\"", "path = \"acme.jsonl\"");
        std::fs::write(&file, text).unwrap();
        (dir, file)
    }

    #[test]
    fn a_view_may_take_a_permitted_field_of_a_struct_and_no_other() {
        // The field under its own name, in either syntax: it reads `customer.email`.
        for email in ["customer['email']", "customer.email"] {
            let (_dir, file) =
                nested_view_setup(&format!("{email} AS email, amount_cents, consent_fraud"));
            check_file(&file).unwrap();
        }
        // Another field of the same struct under a permitted name is refused by its path.
        let (_dir, file) =
            nested_view_setup("customer['ssn'] AS email, amount_cents, consent_fraud");
        let msg = check_file(&file).unwrap_err().to_string();
        assert!(msg.contains("reads column 'customer.ssn'"), "{msg}");
        // A field deeper down, and the whole struct, likewise.
        let (_dir, file) = nested_view_setup(
            "concat(customer['email'], customer['address']['city']) AS email, amount_cents, \
             consent_fraud",
        );
        let msg = check_file(&file).unwrap_err().to_string();
        assert!(
            msg.contains("reads column 'customer.address.city'"),
            "{msg}"
        );
        let (_dir, file) = nested_view_setup("customer AS email, amount_cents, consent_fraud");
        let msg = check_file(&file).unwrap_err().to_string();
        assert!(msg.contains("reads column 'customer'"), "{msg}");
    }

    #[test]
    fn a_dataset_names_a_struct_field_by_its_path() {
        let (dir, file) = nested_view_setup("email");
        let text = config_text()
            .replace("path = \"acme.csv\"", "path = \"acme.jsonl\"")
            .replace("column = \"email\"", "column = \"customer.email\"");
        std::fs::write(&file, &text).unwrap();
        check_file(&file).unwrap();
        // The struct itself is no column: its fields are, and the message lists them.
        std::fs::write(
            &file,
            text.replace("column = \"customer.email\"", "column = \"customer\""),
        )
        .unwrap();
        let msg = check_file(&file).unwrap_err().to_string();
        assert!(
            msg.contains("customer.address.city") && msg.contains("customer.ssn"),
            "{msg}"
        );
        drop(dir);
    }

    #[test]
    fn a_dataset_has_a_path_or_a_view_and_a_known_format() {
        let (_dir, file) = setup("email,amount_cents,consent_fraud\na@b.c,1,true\n");
        let text = config_text().replace("path = \"acme.csv\"", "path = \"acme.data\"");
        std::fs::write(&file, text).unwrap();
        let msg = check_file(&file).unwrap_err().to_string();
        assert!(msg.contains("cannot tell the format"), "{msg}");
        let text = config_text().replace("path = \"acme.csv\"", "");
        std::fs::write(&file, text).unwrap();
        let msg = check_file(&file).unwrap_err().to_string();
        assert!(msg.contains("no path"), "{msg}");
        // A delimiter is CSV's: on Parquet it is refused, and a bad one is named.
        let text = config_text().replace(
            "path = \"acme.csv\"",
            "path = \"acme.parquet\"\ndelimiter = \";\"",
        );
        std::fs::write(&file, text).unwrap();
        let msg = check_file(&file).unwrap_err().to_string();
        assert!(msg.contains("delimiter applies to CSV only"), "{msg}");
        let text = config_text().replace(
            "path = \"acme.csv\"",
            "path = \"acme.csv\"\ndelimiter = \"ab\"",
        );
        std::fs::write(&file, text).unwrap();
        let msg = check_file(&file).unwrap_err().to_string();
        assert!(msg.contains("one ASCII character"), "{msg}");
        // With it, a semicolon file passes the check.
        std::fs::write(
            file.with_file_name("acme.csv"),
            "email;amount_cents;consent_fraud\na@b.c;1;true\n",
        )
        .unwrap();
        std::fs::write(&file, config_text()).unwrap();
        let msg = check_file(&file).unwrap_err().to_string();
        assert!(
            msg.contains("email"),
            "without it, the header is one column: {msg}"
        );
        let text = config_text().replace(
            "path = \"acme.csv\"",
            "path = \"acme.csv\"\ndelimiter = \";\"",
        );
        std::fs::write(&file, text).unwrap();
        check_file(&file).unwrap();
    }

    #[test]
    fn failed_reload_keeps_the_last_good_policy() {
        let (dir, file) = setup("email,amount_cents,consent_fraud\na@b.c,1,true\n");
        let holder = PolicyHolder::new(load_checked(&file).unwrap());
        assert_eq!(holder.snapshot().0, 0);
        std::fs::write(
            &file,
            config_text().replace("min_result = 10", "min_result = 0"),
        )
        .unwrap();
        let e = holder.reload(&file).unwrap_err().to_string();
        assert!(e.contains("at least 1"), "{e}");
        let (generation, cfg) = holder.snapshot();
        assert_eq!(generation, 0);
        assert_eq!(cfg.agreements[0].allow[0].terms().min_result.get(), 10);
        std::fs::write(
            &file,
            config_text().replace("min_result = 10", "min_result = 20"),
        )
        .unwrap();
        holder.reload(&file).unwrap();
        assert_eq!(holder.snapshot().0, 1);
        assert_eq!(
            holder.current().agreements[0].allow[0]
                .terms()
                .min_result
                .get(),
            20
        );
        drop(dir);
    }
}
