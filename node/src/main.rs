//! `cleanroom-node`: a partner's node. Thin over [`cleanroom_node::cli`].

use clap::Parser;

/// jemalloc instead of the system allocator. A node runs job after job, and its rayon workers
/// allocate and free large buffers in many threads: glibc kept that memory in per-thread arenas
/// (and raised its mmap threshold after the first job), so a node's peak grew from job to job.
/// jemalloc, with the settings in `.cargo/config.toml`, returns freed pages within about a
/// second (docs/BENCHMARKS.md, "Memory").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    cleanroom_node::cli::main(cleanroom_node::cli::NodeCli::parse())
}
