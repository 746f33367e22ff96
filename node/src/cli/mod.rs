//! The node's command line, shared by `cleanroom-node` and `cleanroom node`.
//!
//! [`budget`] builds what `cleanroom-node budget` prints.

pub mod budget;
mod preview;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::watch;

use crate::audit::{self, AuditHead};
use crate::policy::NodeConfig;

/// A partner's cleanroom node: holds your datasets and your agreements, dials the coordinator
/// for control, and runs jobs with other partners' nodes over QUIC with mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "cleanroom-node", version, about, long_about = None)]
pub struct NodeCli {
    /// Log lines as text or as JSON objects (one a line; a job's lines carry its `job_id`).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "CLEANROOM_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: NodeCommand,
}

/// Node subcommands.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Run the node until SIGINT or SIGTERM.
    ///
    /// Reads the config (see node/testdata/node.example.toml), binds the data-plane endpoint,
    /// and keeps a control session with the coordinator, reconnecting when it drops.
    Run {
        /// The node's config file.
        #[arg(long, short, env = "CLEANROOM_NODE_CONFIG")]
        config: PathBuf,
        /// Also shut down gracefully when standard input closes (for supervisors and tests:
        /// the node never outlives the process that started it).
        #[arg(long, hide = true)]
        stop_on_stdin_eof: bool,
    },
    /// Check a config file (and the datasets and certificates it names) without running.
    Check {
        /// The node's config file.
        #[arg(long, short, env = "CLEANROOM_NODE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a policy (the node config: datasets, agreements, budget) without running.
    Policy {
        /// What to do with it.
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Forget a data subject: every future job excludes the rows of this subject (a row is
    /// excluded if any of the dataset's identifiers matches).
    ///
    /// Records a keyed hash of the normalised value in `<state_dir>/forgotten.jsonl` (the raw
    /// value is written nowhere; the key is `<state_dir>/forget.key`) and appends a Forget
    /// entry to the audit log. Safe while the node runs: it reads the list for every job, and
    /// audit appends are serialised with a file lock.
    Forget {
        /// The node's config file.
        #[arg(long, short, env = "CLEANROOM_NODE_CONFIG")]
        config: PathBuf,
        /// The dataset the subject is in.
        #[arg(long)]
        dataset: String,
        /// The subject's identifier as NAME=VALUE (NAME declared on the dataset), e.g.
        /// `email=alice@example.com`; the value is normalised as the dataset's column is.
        #[arg(long, value_name = "NAME=VALUE")]
        key: String,
    },
    /// Delete job outputs (files in `<state_dir>/results/`, e.g. membership files) last
    /// modified more than N days ago.
    Purge {
        /// The node's config file.
        #[arg(long, short, env = "CLEANROOM_NODE_CONFIG")]
        config: PathBuf,
        /// Retention in days: files older than this are removed (0 = everything).
        #[arg(long, value_name = "N")]
        older_than_days: u64,
    },
    /// Look at a dataset before a job reads it.
    Dataset {
        /// What to do with it.
        #[command(subcommand)]
        command: DatasetCommand,
    },
    /// Inspect the node's audit log (`<state_dir>/audit.log`).
    Audit {
        /// What to do with it.
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Show the privacy budget: ε spent and remaining per partner and purpose in the current
    /// window and over the ledger's life, and node-wide.
    ///
    /// Reads the ledger (`<state_dir>/ledger.sqlite`, or the config's `ledger`) against the
    /// policy's caps: each agreement's `budget_per_purpose` and the node-wide `[budget]`.
    /// Windows slide: a charge counts for one period after it was made, and "next refresh" is
    /// when the oldest charge in the window leaves it; a lifetime cap never refreshes. Spends are
    /// ε at the config's `dp_delta`: Laplace charges add up as ε, aggregate (zCDP) charges as ρ,
    /// shown on their own too. Pairs without a cap are shown over the node-wide period (a day if
    /// there is none). Safe while the node runs.
    Budget {
        /// The node's config file.
        #[arg(long, short, env = "CLEANROOM_NODE_CONFIG")]
        config: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = BudgetFormat::Table)]
        format: BudgetFormat,
    },
    /// Print a non-sensitive summary of the audit log, suitable to publish: partners, purposes,
    /// jobs by computation and outcome, ε released, releases per recipient.
    Transparency {
        /// The node's config file.
        #[arg(long, short, env = "CLEANROOM_NODE_CONFIG")]
        config: PathBuf,
        /// Only entries from this day on (UTC), as YYYY-MM-DD.
        #[arg(long, value_name = "YYYY-MM-DD")]
        since: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ReportFormat::Markdown)]
        format: ReportFormat,
    },
}

/// `dataset` subcommands.
#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// A dry run: what the dataset will contribute to a job, read exactly as a job reads it.
    ///
    /// Per declared identifier: rows read, rejected (by reason, with the lines of the first ten:
    /// a row whose field count differs from the header's, a line break inside a field, an
    /// identifier that does not normalise...), excluded for lack of consent for --purpose,
    /// excluded as forgotten subjects, and distinct keys. Reads no identifier into any log.
    Preview {
        /// The node's config file.
        #[arg(long, short, env = "CLEANROOM_NODE_CONFIG")]
        config: PathBuf,
        /// The dataset (as declared in the config).
        #[arg(long)]
        dataset: String,
        /// Apply the consent column of this purpose, as a job for it would.
        #[arg(long)]
        purpose: Option<String>,
        /// Also print what the first N accepted rows' identifiers normalise to — to this
        /// terminal only (they are raw identifiers: never paste them into a ticket).
        #[arg(long, value_name = "N", default_value_t = 0)]
        show_normalised: usize,
    },
}

/// `policy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Load and validate FILE as the node would (and check that each dataset's CSV header has
    /// the declared columns); print a summary per partner. Exit code 1 with the error (file,
    /// line and key) on failure.
    Check {
        /// The policy (node config) file.
        file: PathBuf,
    },
}

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain: detects changed bytes and deleted, inserted, reordered or
    /// truncated entries, and says which. Exit code 1 on any problem.
    Verify {
        /// The node's config file.
        #[arg(long, short, env = "CLEANROOM_NODE_CONFIG")]
        config: PathBuf,
        /// A head the log must contain, as SEQ:HEX (e.g. from a job result kept by the
        /// coordinator); a log shorter than it is truncated.
        #[arg(long, value_name = "SEQ:HEX")]
        expect_head: Option<AuditHead>,
        /// The signed heads this node reported, as the coordinator kept them (`cleanroom
        /// audit-heads --node NAME --out FILE`): each must be signed by this node's audit key
        /// and name an entry the log still has, with that hash. Detects a rewritten suffix the
        /// log and its head file agree on, once a later head was reported.
        #[arg(long, value_name = "FILE")]
        heads: Option<PathBuf>,
    },
    /// List entries (oldest first).
    Show {
        /// The node's config file.
        #[arg(long, short, env = "CLEANROOM_NODE_CONFIG")]
        config: PathBuf,
        /// Only the entries of this job.
        #[arg(long, value_name = "ID")]
        job: Option<String>,
        /// One JSON object per line (the log's own lines) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Output format of `transparency`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    /// Markdown tables.
    Markdown,
    /// Pretty JSON.
    Json,
}

/// Output format of `budget`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BudgetFormat {
    /// An aligned table.
    Table,
    /// Pretty JSON (an array, one object per line of the table).
    Json,
    /// CSV with a header row.
    Csv,
}

/// Writes to standard output. A reader that went away (`cleanroom job list | head -2`) ends
/// the process at once and quietly with exit code 0, as `head` users expect; another write
/// error ends it with exit code 1 and the reason. Every command's output goes through here
/// ([`out!`](crate::out), [`outln!`](crate::outln)), in both binaries.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        stdout_failed(&e);
    }
}

/// Ends the process after a failed write to standard output (see [`write_stdout`]).
pub fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("error: writing to standard output: {e}");
    std::process::exit(1)
}

/// Whether an error comes from writing to a closed pipe (see [`write_stdout`]).
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `print!` that ends the process quietly when standard output is a closed pipe.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!($($arg)*))
    };
}

/// `println!` that ends the process quietly when standard output is a closed pipe.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::cli::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON object a line: `timestamp`, `level`, `fields`, `target`, and `span` with the
    /// job's `job_id` for every line logged while a job runs.
    Json,
}

/// Sets up `tracing` to stderr; `RUST_LOG` overrides the default level (info).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,rustls=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        // Colours only on a terminal: logs redirected to files stay plain text.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
}

/// Runs a parsed command line; errors are printed with what to do next.
pub fn main(cli: NodeCli) -> ExitCode {
    init_tracing(cli.log_format);
    match execute(cli.command) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: NodeCommand) -> anyhow::Result<ExitCode> {
    match command {
        NodeCommand::Check { config } => {
            // The same checks `run` makes before it starts.
            let (cfg, _) = crate::run::preflight(&config)?;
            if let Some(today) = crate::policy::PolicyDate::from_unix_ms(crate::clock::now_ms()) {
                for w in crate::policy::expiry_warnings(&cfg, today) {
                    eprintln!("{w}");
                }
            }
            if let Some(pid) = crate::run::state_dir_holder(&cfg.state_dir) {
                eprintln!(
                    "warning: a node process (pid {pid}) is running on the state directory {}; \
                     `run` with this config would refuse to start a second one",
                    cfg.state_dir.display()
                );
            }
            crate::outln!(
                "{}: ok (node '{}': config, {} dataset file(s), certificates{})",
                config.display(),
                cfg.name,
                cfg.datasets.len(),
                if cfg.audit_path().exists() {
                    ", audit log"
                } else {
                    ""
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Policy {
            command: PolicyCommand::Check { file },
        } => {
            // Printed by hand: the error's own text already names the file, line and key, and
            // the anyhow chain would repeat the TOML message.
            match crate::policy::check_file(&file) {
                Ok(summary) => {
                    crate::out!("{summary}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        NodeCommand::Forget {
            config,
            dataset,
            key,
        } => run_forget(&config, &dataset, &key),
        NodeCommand::Purge {
            config,
            older_than_days,
        } => {
            let cfg = NodeConfig::load(&config)?;
            let report = crate::data::retention::purge(
                &cfg.state_dir,
                crate::data::retention::days(older_than_days),
                std::time::SystemTime::now(),
            )?;
            crate::outln!(
                "purged {} file(s) ({} bytes) older than {older_than_days} day(s) from {}; {} kept{}",
                report.removed,
                report.bytes_removed,
                crate::data::retention::results_dir(&cfg.state_dir).display(),
                report.kept,
                if report.skipped > 0 {
                    format!(", {} non-file entries left alone", report.skipped)
                } else {
                    String::new()
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Audit { command } => run_audit(command),
        NodeCommand::Dataset {
            command:
                DatasetCommand::Preview {
                    config,
                    dataset,
                    purpose,
                    show_normalised,
                },
        } => preview::run(&config, &dataset, purpose.as_deref(), show_normalised),
        NodeCommand::Budget { config, format } => {
            let cfg = NodeConfig::load(&config)?;
            let path = cfg.ledger_path();
            // A node that never charged has no ledger yet: report zeros, create nothing.
            let ledger = if path.exists() {
                crate::ledger::Ledger::open(&path)
            } else {
                crate::ledger::Ledger::open(std::path::Path::new(":memory:"))
            }
            .map_err(|e| anyhow::anyhow!("ledger {}: {e}", path.display()))?;
            let lines = crate::cli::budget::report(&cfg, &ledger, crate::clock::now_ms())?;
            let text = match format {
                BudgetFormat::Table => crate::cli::budget::to_table(&lines),
                BudgetFormat::Json => crate::cli::budget::to_json(&lines) + "\n",
                BudgetFormat::Csv => crate::cli::budget::to_csv(&lines),
            };
            crate::out!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Transparency {
            config,
            since,
            format,
        } => {
            let cfg = NodeConfig::load(&config)?;
            let since_ms = since
                .as_deref()
                .map(crate::clock::parse_date_ms)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let path = cfg.audit_path();
            let report = audit::verify(&path, None)?;
            if !report.is_ok() {
                anyhow::bail!(
                    "the audit log {} does not verify ({} problem(s)); run `cleanroom-node audit \
                     verify --config {}` and resolve it before publishing a summary",
                    path.display(),
                    report.problems.len(),
                    config.display()
                );
            }
            let entries = audit::read_entries(&path)?;
            let t =
                crate::audit::transparency::summarize(&cfg.name, &entries, &report.head, since_ms);
            match format {
                ReportFormat::Markdown => crate::out!("{}", t.to_markdown()),
                ReportFormat::Json => crate::outln!("{}", t.to_json()),
            }
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Run {
            config,
            stop_on_stdin_eof,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_stack_size(THREAD_STACK)
                .build()?;
            runtime.block_on(async move {
                let (tx, rx) = watch::channel(false);
                tokio::spawn(async move {
                    wait_for_stop(stop_on_stdin_eof).await;
                    tracing::info!("shutting down");
                    let _ = tx.send(true);
                });
                // Loads and checks the policy (datasets' headers included) and reloads it on
                // SIGHUP.
                crate::run::run_from(config, rx).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The stack of the node's runtime threads (workers and blocking pool). A job's state machine
/// and the cluster client's futures are deep: a debug build of an overlap-sum's value holder
/// that re-blinds on its cluster overflowed tokio's default 2 MiB (it passed with 16 MiB; the
/// e2e test `formats::a_cluster_reads_malformed_csv_strictly` runs it). Only what is used is
/// resident.
const THREAD_STACK: usize = 8 << 20;

/// `cfg`'s dataset `name`, or an error that lists the datasets it declares.
fn declared_dataset<'a>(
    cfg: &'a NodeConfig,
    name: &str,
) -> anyhow::Result<&'a crate::data::DatasetConfig> {
    cfg.dataset(name).ok_or_else(|| {
        let declared: Vec<&str> = cfg.datasets.iter().map(|d| d.name.as_str()).collect();
        anyhow::anyhow!(
            "node '{}' has no dataset '{name}' (declared: {})",
            cfg.name,
            if declared.is_empty() {
                "none".to_owned()
            } else {
                declared.join(", ")
            }
        )
    })
}

/// `forget`: records the deletion, then audits it. The audit log is opened only for this
/// command ([`audit::AuditLog::append`] locks the file, so a running node's appends and ours
/// do not interleave).
fn run_forget(config: &std::path::Path, dataset: &str, key: &str) -> anyhow::Result<ExitCode> {
    let cfg = NodeConfig::load(config)?;
    let d = declared_dataset(&cfg, dataset)?;
    let Some((identifier, value)) = key.split_once('=') else {
        anyhow::bail!(
            "--key must be NAME=VALUE with NAME one of dataset '{dataset}''s identifiers ({})",
            d.identifier_names()
        );
    };
    let identifier = identifier.trim();
    if d.identifier(identifier).is_none() {
        anyhow::bail!(
            "dataset '{dataset}' declares no identifier '{identifier}' (declared: {})",
            d.identifier_names()
        );
    }
    // Opened (and verified) first: a broken log refuses the request before anything changes.
    let log = audit::AuditLog::open(&cfg.audit_path())?;
    let store = crate::data::forget::ForgetStore::open(&cfg.state_dir)?;
    let hash = store.record(d, identifier, value)?;
    let event = audit::AuditEvent::Forget {
        dataset: dataset.to_owned(),
        key_hash: audit::to_hex(&hash),
    };
    log.append(event, crate::clock::now_ms()).map_err(|e| {
        anyhow::anyhow!(
            "the subject is forgotten (recorded in {}), but the audit entry could not be \
             written: {e}",
            store.list_path().display()
        )
    })?;
    drop(log);
    // What the key matches today, in this dataset and in every other one that declares the same
    // identifier, so that a value that matches nothing (a typo, another format) is visible.
    let mut counts = Vec::new();
    let mut here = None;
    for other in &cfg.datasets {
        if other.identifier(identifier).is_none() {
            counts.push(format!(
                "none in {} (no identifier '{identifier}')",
                other.name
            ));
            continue;
        }
        let n = store.matching_rows(other, identifier, value);
        if other.name == dataset {
            here = n.as_ref().ok().copied();
        }
        counts.push(match n {
            Ok(n) => format!("{n} row{} in {}", if n == 1 { "" } else { "s" }, other.name),
            Err(e) => format!("? rows in {} (cannot read it: {e})", other.name),
        });
    }
    crate::outln!(
        "forgotten: 1 subject in dataset {dataset} (effective for all future jobs); {identifier} \
         matches {} today",
        counts.join(", ")
    );
    if here == Some(0) {
        eprintln!(
            "warning: no row of dataset '{dataset}' has this {identifier} today, so no row is \
             excluded now; check the value (rows are compared after normalisation)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One line of `cleanroom audit-heads`.
#[derive(serde::Deserialize)]
struct ReportedHead {
    node: String,
    job_id: String,
    head: String,
    public_key: String,
    signature: String,
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Checks the log at `path` against the signed heads in `file`: each of this node's heads must
/// carry a valid signature by this node's audit key, and the log's entry at its sequence number
/// must have its hash. Returns the problems found, one line each.
fn check_reported_heads(
    cfg: &NodeConfig,
    path: &std::path::Path,
    file: &std::path::Path,
) -> anyhow::Result<Vec<String>> {
    use cleanroom_circuits::audit_head::{self, AuditSigningKey};
    let key_path = cfg.state_dir.join(crate::run::AUDIT_KEY_FILE);
    let key_text = std::fs::read_to_string(&key_path).map_err(|e| {
        anyhow::anyhow!(
            "{}: cannot read the audit signing key: {e}",
            key_path.display()
        )
    })?;
    let own = AuditSigningKey::from_text(&key_text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", key_path.display()))?
        .public_key();
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", file.display()))?;
    let entries = audit::read_entries(path)?;
    let mut problems = Vec::new();
    let mut checked = 0;
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let h: ReportedHead = serde_json::from_str(line).map_err(|e| {
            anyhow::anyhow!(
                "{} line {}: not a reported head: {e}",
                file.display(),
                n + 1
            )
        })?;
        if h.node != cfg.name {
            continue;
        }
        let (Some(pk), Some(sig)) = (unhex(&h.public_key), unhex(&h.signature)) else {
            problems.push(format!("line {}: key or signature is not hex", n + 1));
            continue;
        };
        if let Err(e) = audit_head::verify(&cfg.name, &h.head, &pk, &sig) {
            problems.push(format!("head {} (job {}): {e}", h.head, h.job_id));
            continue;
        }
        if pk != own {
            problems.push(format!(
                "head {} (job {}) is signed by another key than this node's audit key",
                h.head, h.job_id
            ));
            continue;
        }
        let head: AuditHead = match h.head.parse() {
            Ok(head) => head,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        checked += 1;
        if head.seq == 0 {
            continue;
        }
        match usize::try_from(head.seq - 1)
            .ok()
            .and_then(|i| entries.get(i))
        {
            None => problems.push(format!(
                "the log was cut: head {} (job {}) names entry seq {}, the log has {} entries",
                h.head,
                h.job_id,
                head.seq,
                entries.len()
            )),
            Some(e) if e.hash != head.hash => problems.push(format!(
                "entry seq {} was rewritten: its hash is not the one in head {} (job {}), \
                 signed and reported by this node",
                head.seq, h.head, h.job_id
            )),
            Some(_) => {}
        }
    }
    if checked == 0 {
        problems.push(format!(
            "{} holds no head of node {} signed by it",
            file.display(),
            cfg.name
        ));
    }
    Ok(problems)
}

fn run_audit(command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Verify {
            config,
            expect_head,
            heads,
        } => {
            let cfg = NodeConfig::load(&config)?;
            let path = cfg.audit_path();
            let report = audit::verify(&path, expect_head.as_ref())?;
            if let Some(heads) = heads {
                let problems = check_reported_heads(&cfg, &path, &heads)?;
                if !problems.is_empty() || !report.is_ok() {
                    crate::outln!(
                        "{}: {} problem(s) against the heads in {}:",
                        path.display(),
                        problems.len(),
                        heads.display()
                    );
                    for p in &problems {
                        crate::outln!("  {p}");
                    }
                    for p in &report.problems {
                        crate::outln!("  {p}");
                    }
                    return Ok(ExitCode::FAILURE);
                }
                crate::outln!(
                    "ok: {} entries, head {}; every reported head signed by this node matches",
                    report.entries,
                    report.head
                );
                return Ok(ExitCode::SUCCESS);
            }
            if report.is_ok() {
                crate::outln!("ok: {} entries, head {}", report.entries, report.head);
                return Ok(ExitCode::SUCCESS);
            }
            crate::outln!(
                "{}: {} problem(s) in {} line(s):",
                path.display(),
                report.problems.len(),
                report.entries
            );
            for p in &report.problems {
                crate::outln!("  {p}");
            }
            Ok(ExitCode::FAILURE)
        }
        AuditCommand::Show { config, job, json } => {
            let cfg = NodeConfig::load(&config)?;
            let path = cfg.audit_path();
            // Each line is shown with what `audit verify` says about it, so an altered entry is
            // never printed as if it were the log's.
            let (lines, other) = audit::show_lines(&path)?;
            let selected = lines.iter().filter(|l| {
                job.is_none()
                    || l.entry.as_ref().and_then(|e| e.event.job_id()) == job.as_deref()
                    || (l.entry.is_none() && job.is_some())
            });
            let mut problems = other.len();
            if json {
                for l in selected {
                    match (&l.entry, &l.check) {
                        (Some(e), audit::LineCheck::Ok) => crate::outln!("{}", e.to_json_line()),
                        (_, check) => {
                            problems += 1;
                            eprintln!("line {}: {}", l.line, check_text(check));
                        }
                    }
                }
            } else {
                crate::outln!(
                    "{:>6}  {:<19}  {:<12}  {:<20}  {:<10}  summary",
                    "seq",
                    "time (UTC)",
                    "kind",
                    "job",
                    "check"
                );
                for l in selected {
                    if l.check != audit::LineCheck::Ok {
                        problems += 1;
                    }
                    match &l.entry {
                        Some(e) => crate::outln!(
                            "{:>6}  {:<19}  {:<12}  {:<20}  {:<10}  {}{}",
                            e.seq,
                            crate::clock::format_ms(e.at_ms),
                            e.event.kind(),
                            e.event.job_id().unwrap_or("-"),
                            check_word(&l.check),
                            e.event.summary(),
                            match &l.check {
                                audit::LineCheck::Bad(p) => format!(" [{p}]"),
                                _ => String::new(),
                            }
                        ),
                        None => crate::outln!(
                            "{:>6}  {:<19}  {:<12}  {:<20}  {:<10}  line {}: {}",
                            "?",
                            "-",
                            "-",
                            "-",
                            check_word(&l.check),
                            l.line,
                            check_text(&l.check)
                        ),
                    }
                }
            }
            for p in &other {
                eprintln!("{p}");
            }
            if problems > 0 {
                eprintln!(
                    "warning: the audit log {} does not verify: entries marked TAMPERED or \
                     UNVERIFIED are not the log's as written; run `cleanroom-node audit verify \
                     --config {}`",
                    path.display(),
                    config.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The `check` column of `audit show`.
fn check_word(check: &audit::LineCheck) -> &'static str {
    match check {
        audit::LineCheck::Ok => "ok",
        audit::LineCheck::Bad(_) => "TAMPERED",
        audit::LineCheck::Unverified => "UNVERIFIED",
    }
}

fn check_text(check: &audit::LineCheck) -> String {
    match check {
        audit::LineCheck::Ok => "ok".into(),
        audit::LineCheck::Bad(p) => format!("TAMPERED: {p}"),
        audit::LineCheck::Unverified => {
            "UNVERIFIED: follows a tampered entry, so its chain cannot be checked".into()
        }
    }
}

/// Resolves on SIGINT, SIGTERM, or (if asked) the end of standard input.
pub async fn wait_for_stop(stdin_eof: bool) {
    if !stdin_eof {
        return wait_for_signal().await;
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut sink = [0u8; 256];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    tokio::select! {
        _ = wait_for_signal() => {}
        _ = rx => {}
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
