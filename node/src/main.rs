//! `cleanroom-node`: a partner's node. Thin over [`cleanroom_node::cli`].

use clap::Parser;

/// The same allocator, with the same settings, as the `cleanroom` binary: see `cli/src/main.rs`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    cleanroom_node::cli::main(cleanroom_node::cli::NodeCli::parse())
}
