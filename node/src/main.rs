//! `cleanroom-node`: a partner's node. Thin over [`cleanroom_node::cli`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    cleanroom_node::cli::main(cleanroom_node::cli::NodeCli::parse())
}
