//! `cleanroom bench psi`: an n × n overlap between two node processes over loopback QUIC with
//! mutual TLS, submitted through the analyst API, against the cryptographic floor measured in
//! the same run; optionally with 1, 2, … worker threads per node, to see how the job scales.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;

use cleanroom_circuits::floor::{FloorCosts, measure_floor_with};
use cleanroom_proto::v1::{JobKind, JobState};
use serde_json::json;

use crate::args::{BenchPsiArgs, EngineArg, PsiKindArg};
use crate::cluster::{Cluster, Partner};
use crate::measure::{CpuMark, cores, median, rss_json, thread_cpu_time, verdict, warn_if_debug};
use crate::synth::{GroundTruth, SynthSpec, write_synth};
use crate::ui::{WorkDir, spinner};

/// The two partners of a bench run.
pub(crate) const PARTNERS: [&str; 2] = ["acme", "globex"];

/// Writes a bench run's synthetic data (`args.n` rows per partner, `args.overlap` of them
/// shared, a fixed seed) under `dir/data`; returns that folder and the ground truth.
pub(crate) fn write_bench_data(
    dir: &Path,
    args: &BenchPsiArgs,
) -> anyhow::Result<(PathBuf, GroundTruth)> {
    let data_dir = dir.join("data");
    let truth = write_synth(
        &SynthSpec {
            partners: PARTNERS.iter().map(|s| s.to_string()).collect(),
            rows: args.n,
            overlap: args.overlap,
            seed: 42,
        },
        &data_dir,
    )?;
    Ok((data_dir, truth))
}

/// One configuration's jobs: worker threads per node (`None`: rayon's default, one per core).
#[derive(Debug, Default)]
struct Runs {
    threads: Option<usize>,
    walls: Vec<f64>,
    /// CPU seconds both nodes used, per job.
    node_cpu: Vec<f64>,
    /// Cores' worth of CPU that other processes used, on average over each job.
    others: Vec<f64>,
    /// Peak RSS per node: over all jobs of one cluster, or the largest single-cluster peak.
    rss: Vec<(String, Option<u64>)>,
    /// The most bytes each node spilled in one job (under `--memory-limit`).
    spilled: Vec<(String, Option<u64>)>,
    correct: bool,
}

impl Runs {
    fn label(&self) -> String {
        match self.threads {
            Some(t) => format!("{t} thread(s) per node"),
            None => "default threads per node".into(),
        }
    }

    fn keep_peak_rss(&mut self, rss: Vec<(String, Option<u64>)>) {
        if self.rss.is_empty() {
            self.rss = rss;
            return;
        }
        for ((_, kept), (_, new)) in self.rss.iter_mut().zip(rss) {
            *kept = (*kept).max(new);
        }
    }

    fn keep_spilled(&mut self, cluster: &Cluster) {
        let now: Vec<(String, Option<u64>)> = PARTNERS
            .iter()
            .map(|n| (n.to_string(), cluster.spilled_bytes(n)))
            .collect();
        if self.spilled.is_empty() {
            self.spilled = now;
            return;
        }
        for ((_, kept), (_, new)) in self.spilled.iter_mut().zip(now) {
            *kept = (*kept).max(new);
        }
    }
}

/// Runs the benchmark.
pub async fn run(args: BenchPsiArgs) -> anyhow::Result<ExitCode> {
    warn_if_debug("psi");
    let cores = cores();
    anyhow::ensure!(
        args.threads.iter().all(|&t| t >= 1),
        "--threads takes counts of at least 1"
    );
    let workdir = WorkDir::new(args.each.keep.as_deref(), "cleanroom-bench-")?;
    let dir = workdir.path().to_owned();
    let progress = spinner("measuring the cryptographic floor on this machine");
    // Measured again after every job: see `measure_floor`.
    let mut floors = vec![measure_floor().await?];

    progress.set_message(format!("writing {} × {} synthetic rows", args.n, args.n));
    let (data_dir, truth) = write_bench_data(&dir, &args)?;
    let expected = truth
        .pairwise_overlap
        .get("acme,globex")
        .copied()
        .unwrap_or(0);
    let partners = Partner::all_in(&data_dir, &PARTNERS);

    let mut configs: Vec<Runs> = if args.threads.is_empty() {
        vec![Runs::default()]
    } else {
        args.threads
            .iter()
            .map(|&t| Runs {
                threads: Some(t),
                ..Runs::default()
            })
            .collect()
    };
    for c in &mut configs {
        c.correct = true;
    }
    let runs = args.each.runs.max(1);
    if configs.len() == 1 {
        // One cluster for every run, as an operator's nodes would run job after job.
        let c = &mut configs[0];
        let cluster = start(&dir.join("cluster"), &partners, c.threads, &args).await?;
        for run in 0..runs {
            progress.set_message(format!(
                "run {}/{runs}: overlap of {} × {} items",
                run + 1,
                args.n,
                args.n
            ));
            one_job(&cluster, c, (args.kind, expected), run).await?;
            floors.push(measure_floor().await?);
        }
        c.keep_peak_rss(cluster.peak_rss(&PARTNERS));
        c.keep_spilled(&cluster);
        cluster.stop().await?;
    } else {
        // Fresh node processes per job and thread count, alternating, so that every count
        // meets the same changes in the machine's load.
        for run in 0..runs {
            for (i, c) in configs.iter_mut().enumerate() {
                progress.set_message(format!(
                    "run {}/{runs}: overlap of {} × {} items, {}",
                    run + 1,
                    args.n,
                    args.n,
                    c.label()
                ));
                let cluster = start(
                    &dir.join(format!("cluster-{run}-{i}")),
                    &partners,
                    c.threads,
                    &args,
                )
                .await?;
                one_job(&cluster, c, (args.kind, expected), run).await?;
                c.keep_peak_rss(cluster.peak_rss(&PARTNERS));
                c.keep_spilled(&cluster);
                cluster.stop().await?;
                floors.push(measure_floor().await?);
            }
        }
    }
    progress.finish_and_clear();
    let floor = FloorCosts::median_of(&floors).context("the floor was never measured")?;
    let floor_secs = floor.psi_floor_seconds(args.n, args.n, cores);
    let per_item: Vec<f64> = floors.iter().map(FloorCosts::per_item_ns).collect();
    report(&args, cores, &floor, &per_item, floor_secs, &mut configs)
}

/// The floor, measured once on this thread's CPU clock (time the scheduler gives to other
/// processes is not counted as the primitives' cost), while no job runs. `run` measures it
/// before the first job and after every job and takes each primitive's median: one
/// measurement moves by several per cent from one minute to the next on an idle machine
/// (docs/BENCHMARKS.md), and a ratio this close to its bar needs a floor that does not.
async fn measure_floor() -> anyhow::Result<FloorCosts> {
    Ok(tokio::task::spawn_blocking(|| measure_floor_with(20_000, &thread_cpu_time)).await?)
}

pub(crate) async fn start(
    dir: &std::path::Path,
    partners: &[Partner],
    threads: Option<usize>,
    args: &BenchPsiArgs,
) -> anyhow::Result<Cluster> {
    std::fs::create_dir_all(dir)?;
    let env: Vec<(&str, String)> = threads
        .map(|t| ("RAYON_NUM_THREADS", t.to_string()))
        .into_iter()
        .collect();
    // Bytes as a number: exactly what was asked, whatever the unit was written as.
    let top = args.memory_limit.map_or(String::new(), |m| {
        format!("memory_limit = {}\n", m.as_u64())
    });
    Cluster::start_with(dir, partners, None, &env, &top, args.engine).await
}

/// The process ids of the bench's nodes that are running.
pub(crate) fn node_pids(cluster: &Cluster) -> Vec<u32> {
    PARTNERS
        .iter()
        .filter_map(|n| cluster.node_pid(n))
        .collect()
}

/// Submits one overlap (or match), waits for it, and records its wall time and CPU.
async fn one_job(
    cluster: &Cluster,
    c: &mut Runs,
    (kind, expected): (PsiKindArg, u64),
    run: u32,
) -> anyhow::Result<()> {
    let client = cluster.client().await?;
    let spec = match kind {
        PsiKindArg::Overlap => {
            crate::cluster::customers_spec(&PARTNERS, JobKind::Overlap, "overlap-reporting")
        }
        PsiKindArg::Match => {
            crate::cluster::customers_spec(&PARTNERS, JobKind::Match, "fraud-detection")
        }
    };
    let pids = node_pids(cluster);
    let cpu_start = CpuMark::now(&pids);
    let started = Instant::now();
    let job = client.submit(spec, "").await?;
    let job = client
        .wait(&job.job_id, Duration::from_secs(7200), |_| {})
        .await?;
    let wall = started.elapsed().as_secs_f64();
    let (ours, others) = CpuMark::now(&pids).since(&cpu_start);
    client.close().await;
    let got = job
        .results
        .first()
        .and_then(|r| r.outcome.as_ref())
        .map(|o| o.intersection);
    if job.state != JobState::Succeeded as i32 || got != Some(expected) {
        c.correct = false;
        eprintln!(
            "run {}: job {} {:?} (result {:?}, expected {expected}): {}",
            run + 1,
            job.job_id,
            job.state,
            got,
            job.reason
        );
    }
    c.walls.push(wall);
    c.node_cpu.extend(ours);
    c.others.extend(others.map(|o| o / wall));
    Ok(())
}

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn report(
    args: &BenchPsiArgs,
    cores: usize,
    floor: &FloorCosts,
    floor_per_item_ns: &[f64],
    floor_secs: f64,
    configs: &mut [Runs],
) -> anyhow::Result<ExitCode> {
    let n = args.n;
    // Both parties' CPU at the floor: every item costs each party the per-item work.
    let floor_cpu = 2.0 * n as f64 * floor.per_item_ns() / 1e9;
    let kind = match args.kind {
        PsiKindArg::Overlap => "overlap",
        PsiKindArg::Match => "match",
    };
    cleanroom_node::outln!(
        "bench psi: {kind} of {n} × {n} items ({:.0}% shared), {cores} cores, {} run(s)",
        args.overlap * 100.0,
        args.each.runs.max(1)
    );
    if args.kind == PsiKindArg::Match {
        cleanroom_node::outln!(
            "match:                    each node reads its dataset a second time for its matched rows; the floor is the overlap's"
        );
    }
    if let Some(limit) = args.memory_limit {
        cleanroom_node::outln!("memory_limit:             {limit} per node (sets spilled to disk)");
    }
    if args.engine == EngineArg::Ballista {
        cleanroom_node::outln!(
            "engine:                   Ballista, 2 executors on this machine (the dataset pass, blinding, re-blinding, the final comparison)"
        );
    }
    cleanroom_node::outln!(
        "curve backend:            {} (picked at run time; the nodes run the same build)",
        floor.backend
    );
    cleanroom_node::outln!(
        "floor per item per party: {:.1} µs = hash-to-group {:.1} + 2 × scalar mul {:.1} + 2 × encode (batched) {:.2} + decode {:.1}  (one thread's CPU time)",
        floor.per_item_ns() / 1e3,
        floor.hash_to_group_ns / 1e3,
        floor.scalar_mul_ns / 1e3,
        floor.encode_ns / 1e3,
        floor.decode_ns / 1e3
    );
    let (low, high) = floor_per_item_ns
        .iter()
        .fold((f64::INFINITY, 0.0_f64), |(l, h), &x| (l.min(x), h.max(x)));
    cleanroom_node::outln!(
        "floor measured:           {} times, before the first job and after each; per item {:.1}–{:.1} µs; each primitive's median above",
        floor_per_item_ns.len(),
        low / 1e3,
        high / 1e3
    );
    cleanroom_node::outln!(
        "floor for the job:        {floor_secs:.2} s  (2 × {n} items × per-item cost / {cores} cores)"
    );
    let mut by_threads = Vec::new();
    let mut correct = true;
    for c in configs.iter_mut() {
        correct &= c.correct;
        let walls = c.walls.clone();
        let wall = median(&mut c.walls);
        let cpu = median(&mut c.node_cpu);
        let others = median(&mut c.others);
        let ratio = wall / floor_secs;
        if args.threads.len() > 1 {
            cleanroom_node::outln!("— {}:", c.label());
        }
        cleanroom_node::outln!(
            "wall (submit → result):   {wall:.2} s  (median; runs: {})",
            list(&walls)
        );
        cleanroom_node::outln!("ratio wall / floor:       {ratio:.3}");
        cleanroom_node::outln!(
            "CPU of both nodes:        {cpu:.2} s  ({:.3} × the floor's {floor_cpu:.2} s of CPU)",
            cpu / floor_cpu
        );
        cleanroom_node::outln!(
            "other processes:          {others:.2} cores on average while the job ran (of {cores})"
        );
        cleanroom_node::outln!(
            "throughput per side:      {:.0} items/s  ({:.0} per core)",
            n as f64 / wall,
            n as f64 / wall / cores as f64
        );
        for (name, rss) in &c.rss {
            match rss {
                Some(b) => cleanroom_node::outln!(
                    "peak RSS {name:<8}          {:.1} MiB",
                    *b as f64 / (1024.0 * 1024.0)
                ),
                None => cleanroom_node::outln!("peak RSS {name:<8}          unavailable"),
            }
        }
        for (name, bytes) in &c.spilled {
            cleanroom_node::outln!(
                "spilled {name:<8}           {}",
                bytes.map_or("nothing".to_owned(), |b| format!(
                    "{:.1} MiB (the job's largest)",
                    b as f64 / (1024.0 * 1024.0)
                ))
            );
        }
        by_threads.push(json!({
            "threads": c.threads, "wall_s": wall, "walls_s": walls, "ratio": ratio,
            "node_cpu_s": cpu, "cpu_ratio": cpu / floor_cpu, "other_cores": others,
            "items_per_s_per_side": n as f64 / wall,
            "peak_rss_bytes": rss_json(&c.rss),
            "spilled_bytes": rss_json(&c.spilled),
        }));
    }
    let speedup = match configs {
        [.., a, b] if a.threads.is_some() && b.threads.is_some() => {
            let (wa, wb) = (median(&mut a.walls), median(&mut b.walls));
            cleanroom_node::outln!(
                "speed-up {} → {} threads per node: {:.2} (median walls {wa:.2} s → {wb:.2} s)",
                a.threads.unwrap_or(0),
                b.threads.unwrap_or(0),
                wa / wb
            );
            Some(wa / wb)
        }
        _ => None,
    };
    cleanroom_node::outln!(
        "floor's throughput:       {:.0} items/s per side per core with both parties on one machine; {:.0} per core with each party on a machine of its own",
        floor.items_per_second_per_core(),
        2.0 * floor.items_per_second_per_core()
    );
    cleanroom_node::outln!(
        "result:                   {}",
        if correct {
            "correct (equals the ground truth)"
        } else {
            "WRONG"
        }
    );
    if args.each.json {
        // The headline figures are those of the last configuration (the most threads, when
        // --threads lists them in increasing order).
        let last = by_threads.last().cloned().unwrap_or_default();
        cleanroom_node::outln!(
            "{}",
            json!({
                "n": n, "overlap": args.overlap, "kind": kind, "cores": cores,
                "runs": args.each.runs.max(1),
                "backend": floor.backend,
                "engine": if args.engine == EngineArg::Ballista { "ballista" } else { "in-process" },
                "wall_s": last["wall_s"], "floor_s": floor_secs, "ratio": last["ratio"],
                "items_per_s_per_side": last["items_per_s_per_side"],
                "node_cpu_s": last["node_cpu_s"], "cpu_ratio": last["cpu_ratio"],
                "other_cores": last["other_cores"],
                "floor_ns": {
                    "hash_to_group": floor.hash_to_group_ns,
                    "scalar_mul": floor.scalar_mul_ns,
                    "encode_batched": floor.encode_ns,
                    "decode": floor.decode_ns,
                    "per_item": floor.per_item_ns(),
                },
                "floor_per_item_ns_measured": floor_per_item_ns,
                "floor_items_per_s_per_core": floor.items_per_second_per_core(),
                "peak_rss_bytes": last["peak_rss_bytes"],
                "by_threads": by_threads,
                "speedup": speedup,
                "correct": correct,
            })
        );
    }
    Ok(verdict(correct))
}
