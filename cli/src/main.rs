//! `cleanroom`: the command line of the cleanroom runtime.
//!
//! Thin over the libraries: `pki` (transport), `synth` (synthetic data), `coordinator serve`,
//! `node run` (the same as `cleanroom-node run`), `job` and `nodes` (the analyst API),
//! `schedule` and `report` (recurring jobs and their reports), `demo`
//! (everything on loopback) and `bench` (the PSI benchmark against the cryptographic floor).

mod aggregate_output;
mod analyst;
mod args;
mod bench;
mod bench_psi;
mod bench_sum;
mod cluster;
mod demo;
mod group_table;
mod job;
mod matrix;
mod measure;
mod output;
mod pki;
mod render;
mod report;
mod scale;
mod schedule;
mod submit;
mod sum_output;
mod synth;
mod synth_format;
mod text;
mod ui;

use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command, CoordinatorCommand, JobCli};

/// jemalloc instead of the system allocator. A node runs job after job, and its rayon workers
/// allocate and free large buffers in many threads: glibc kept what one job freed, so a node's
/// peak grew from job to job.
/// jemalloc, with the settings in `.cargo/config.toml`, returns freed pages within about a
/// second (docs/BENCHMARKS.md, "Memory").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    cleanroom_node::cli::init_tracing(cli.log_format);
    match execute(cli.command) {
        Ok(code) => code,
        Err(e) if cleanroom_node::cli::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn execute(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::AuditHeads { conn, node, out } => {
            runtime()?.block_on(pki::audit_heads(conn, &node, out.as_deref()))
        }
        Command::Pki { command } => {
            pki::run(command)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Synth(args) => {
            let spec = synth::SynthSpec {
                partners: args.partners.clone(),
                rows: args.rows,
                overlap: args.overlap,
                seed: args.seed,
            };
            let truth = synth::write_synth_as(&spec, &args.out, args.format.into())?;
            cleanroom_node::outln!("{}", serde_json::to_string_pretty(&truth)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Coordinator {
            command:
                CoordinatorCommand::Serve {
                    config,
                    stop_on_stdin_eof,
                },
        } => {
            let cfg = cleanroom_coordinator::CoordinatorConfig::load(&config)?;
            runtime()?.block_on(async move {
                let (tx, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    cleanroom_node::cli::wait_for_stop(stop_on_stdin_eof).await;
                    let _ = tx.send(true);
                });
                cleanroom_coordinator::serve(cfg, rx, |addr, web| {
                    // Supervisors (the demo, the tests) read these lines to learn port-0
                    // addresses. A server does not stop because nobody reads its standard output.
                    use std::io::Write;
                    let mut out = std::io::stdout();
                    let _ = writeln!(out, "listening {addr}").and_then(|()| out.flush());
                    if let Some(web) = web {
                        let _ = writeln!(out, "web {web}").and_then(|()| out.flush());
                    }
                })
                .await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Node(cli) => Ok(cleanroom_node::cli::main(cli)),
        Command::Scheduler(args) => runtime()?.block_on(scale::scheduler(args)),
        Command::Executor(args) => runtime()?.block_on(scale::executor(args)),
        Command::SealingKey(args) => scale::sealing_key(&args),
        Command::Job {
            conn,
            command: JobCli::Base(command),
        } => runtime()?.block_on(job::run(conn, command)),
        Command::Job {
            conn,
            command:
                JobCli::Retry {
                    job_id,
                    idempotency_key,
                    then,
                },
        } => runtime()?.block_on(schedule::retry(conn, &job_id, &idempotency_key, &then)),
        Command::Schedule { conn, command } => runtime()?.block_on(schedule::run(conn, command)),
        Command::Report { conn, args } => runtime()?.block_on(report::run(conn, args)),
        Command::Nodes { conn, format } => runtime()?.block_on(job::nodes(conn, format)),
        Command::Demo(args) => runtime()?.block_on(demo::run(args)),
        Command::Bench { command } => runtime()?.block_on(bench::run(command)),
    }
}

#[cfg(test)]
mod allocator_tests {
    /// The settings in `.cargo/config.toml` reach the allocator: without its background thread
    /// and short decay, freed pages stay with the process and a node's peak grows job by job.
    #[test]
    fn the_allocator_returns_freed_pages_in_the_background() {
        assert_eq!(tikv_jemalloc_ctl::background_thread::read(), Ok(true));
        let conf = tikv_jemalloc_ctl::config::malloc_conf::read().expect("malloc_conf");
        assert!(conf.contains("dirty_decay_ms:1000"), "{conf}");
        assert!(conf.contains("muzzy_decay_ms:0"), "{conf}");
    }
}
