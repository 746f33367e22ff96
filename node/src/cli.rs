//! The node's command line, shared by `cleanroom-node` and `cleanroom node`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::watch;

use crate::NodeConfig;
use crate::audit::{self, AuditHead};

/// A partner's cleanroom node: holds your datasets and your agreements, dials the coordinator
/// for control, and runs jobs with other partners' nodes over QUIC with mutual TLS.
#[derive(Debug, Parser)]
#[command(name = "cleanroom-node", version, about, long_about = None)]
pub struct NodeCli {
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
    /// Inspect the node's audit log (`<state_dir>/audit.log`).
    Audit {
        /// What to do with it.
        #[command(subcommand)]
        command: AuditCommand,
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

/// Sets up `tracing` to stderr; `RUST_LOG` overrides the default level (info).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,rustls=warn"));
    // Colours only on a terminal: logs redirected to files stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}

/// Runs a parsed command line; errors are printed with what to do next.
pub fn main(cli: NodeCli) -> ExitCode {
    init_tracing();
    match execute(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: NodeCommand) -> anyhow::Result<ExitCode> {
    match command {
        NodeCommand::Check { config } => {
            let cfg = NodeConfig::load(&config)?;
            cleanroom_transport::Credentials::load(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?;
            println!("{}: ok (node '{}')", config.display(), cfg.name);
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Audit { command } => run_audit(command),
        NodeCommand::Transparency {
            config,
            since,
            format,
        } => {
            let cfg = NodeConfig::load(&config)?;
            let since_ms = since
                .as_deref()
                .map(audit::parse_date_ms)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let path = audit::audit_path(&cfg);
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
            let t = crate::transparency::summarize(&cfg.name, &entries, &report.head, since_ms);
            match format {
                ReportFormat::Markdown => print!("{}", t.to_markdown()),
                ReportFormat::Json => println!("{}", t.to_json()),
            }
            Ok(ExitCode::SUCCESS)
        }
        NodeCommand::Run {
            config,
            stop_on_stdin_eof,
        } => {
            let cfg = NodeConfig::load(&config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let (tx, rx) = watch::channel(false);
                tokio::spawn(async move {
                    wait_for_stop(stop_on_stdin_eof).await;
                    tracing::info!("shutting down");
                    let _ = tx.send(true);
                });
                crate::run(cfg, rx).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run_audit(command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Verify {
            config,
            expect_head,
        } => {
            let cfg = NodeConfig::load(&config)?;
            let path = audit::audit_path(&cfg);
            let report = audit::verify(&path, expect_head.as_ref())?;
            if report.is_ok() {
                println!("ok: {} entries, head {}", report.entries, report.head);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{}: {} problem(s) in {} line(s):",
                path.display(),
                report.problems.len(),
                report.entries
            );
            for p in &report.problems {
                println!("  {p}");
            }
            Ok(ExitCode::FAILURE)
        }
        AuditCommand::Show { config, job, json } => {
            let cfg = NodeConfig::load(&config)?;
            let path = audit::audit_path(&cfg);
            let entries = audit::read_entries(&path)?;
            let selected = entries
                .iter()
                .filter(|e| job.is_none() || e.event.job_id() == job.as_deref());
            if json {
                for e in selected {
                    println!("{}", e.to_json_line());
                }
            } else {
                println!(
                    "{:>6}  {:<19}  {:<12}  {:<20}  summary",
                    "seq", "time (UTC)", "kind", "job"
                );
                for e in selected {
                    println!(
                        "{:>6}  {:<19}  {:<12}  {:<20}  {}",
                        e.seq,
                        audit::format_ms(e.at_ms),
                        e.event.kind(),
                        e.event.job_id().unwrap_or("-"),
                        e.event.summary()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
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
