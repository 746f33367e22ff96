//! The node's command line, shared by `cleanroom-node` and `cleanroom node`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::sync::watch;

use crate::NodeConfig;

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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: NodeCommand) -> anyhow::Result<()> {
    match command {
        NodeCommand::Check { config } => {
            let cfg = NodeConfig::load(&config)?;
            cleanroom_transport::Credentials::load(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?;
            println!("{}: ok (node '{}')", config.display(), cfg.name);
            Ok(())
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
            Ok(())
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
