//! What the benchmarks measure with: the median of runs, and a process's peak memory.

/// Peak resident set size of a process (VmHWM), in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The median of `v` (sorted in place); NaN for none.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Warns on stderr that a debug build's figures are meaningless, naming the release command.
pub fn warn_if_debug(bench: &str) {
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: this is a debug build; benchmark figures are meaningless. Use `cargo run --release --bin cleanroom -- bench {bench}`."
        );
    }
}

/// The cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The exit code of a benchmark: failure if its result was wrong.
pub fn verdict(correct: bool) -> std::process::ExitCode {
    if correct {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// Peak memory by node, as the benchmarks' JSON reports it.
pub fn rss_json(rss: &[(String, Option<u64>)]) -> serde_json::Value {
    rss.iter()
        .map(|(n, b)| (n.clone(), serde_json::json!(b)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}
