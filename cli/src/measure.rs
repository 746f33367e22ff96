//! What the benchmarks measure with: the median of runs, a process's peak memory, and CPU time.
//!
//! The machine is often shared with other work, so CPU time is measured too: the measuring
//! thread's own CPU time (so a floor is what the primitives cost, not what the scheduler left
//! it), each node process's CPU time, and the whole machine's busy time (so a report can say how
//! much of the machine other processes took while a job ran). Linux `/proc` and the thread CPU
//! clock; elsewhere wall time and `None`.

use std::time::Duration;
#[cfg(not(unix))]
use std::time::Instant;

/// Clock ticks per second in `/proc` (`USER_HZ`, fixed at 100 by the Linux ABI).
const USER_HZ: f64 = 100.0;

/// The calling thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`); wall time since the first call
/// where there is no such clock.
pub fn thread_cpu_time() -> Duration {
    #[cfg(unix)]
    {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        Duration::new(
            u64::try_from(t.tv_sec).unwrap_or(0),
            u32::try_from(t.tv_nsec).unwrap_or(0),
        )
    }
    #[cfg(not(unix))]
    {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        START.get_or_init(Instant::now).elapsed()
    }
}

/// Seconds of CPU (user + system) a process has used so far.
pub fn process_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// Seconds of CPU the whole machine has been busy so far, summed over its cores (everything in
/// `/proc/stat`'s first line but idle and iowait).
pub fn machine_busy_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let busy: f64 = v.iter().take(8).sum::<f64>() - v.get(3)? - v.get(4)?;
    Some(busy / USER_HZ)
}

/// CPU used during one job: by the given processes, and by the whole machine.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    processes: Option<f64>,
    machine: Option<f64>,
}

impl CpuMark {
    /// The counters now, for the processes `pids`.
    pub fn now(pids: &[u32]) -> CpuMark {
        CpuMark {
            processes: pids.iter().map(|&p| process_cpu_s(p)).sum(),
            machine: machine_busy_s(),
        }
    }

    /// Since `start`: (CPU seconds of the processes, CPU seconds of everything else on the
    /// machine). Other processes' time includes the benchmark's own and the coordinator's,
    /// which are idle while a job runs.
    pub fn since(&self, start: &CpuMark) -> (Option<f64>, Option<f64>) {
        let ours = self.processes.zip(start.processes).map(|(b, a)| b - a);
        let machine = self.machine.zip(start.machine).map(|(b, a)| b - a);
        let others = machine.zip(ours).map(|(m, o)| (m - o).max(0.0));
        (ours, others)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_move_forward() {
        // Well under a scheduler tick: the clock must resolve it (a tick-based counter reads 0).
        let t0 = thread_cpu_time();
        let mut x = 0u64;
        for i in 0..100_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_time() > t0);
        let me = std::process::id();
        let a = CpuMark::now(&[me]);
        let mut y = 0u64;
        for i in 0..50_000_000u64 {
            y = y.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(y);
        let (ours, others) = CpuMark::now(&[me]).since(&a);
        if cfg!(target_os = "linux") {
            assert!(ours.unwrap() > 0.0, "{ours:?}");
            assert!(others.unwrap() >= 0.0);
        }
    }
}
