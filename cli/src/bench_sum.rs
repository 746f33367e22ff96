//! `cleanroom bench overlap-sum`: an overlap-sum of N × N items (a count and two value columns)
//! between two node processes, and a plain overlap of the same sets, alternated in the same run:
//! wall times from submission to result, bytes each side sent on the data plane, and the ratio.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use cleanroom_proto::v1::{JobInfo, JobKind, JobSpec, JobState, OverlapSumSpec};
use serde_json::json;

use cleanroom_circuits::measure_sum_floor;

use crate::args::{BenchPsiArgs, EngineArg};
use crate::bench_psi::{PARTNERS, node_pids, write_bench_data};
use crate::cluster::Partner;
use crate::measure::{CpuMark, cores, median, rss_json, thread_cpu_time, verdict, warn_if_debug};
use crate::synth::GroupTruth;
use crate::ui::{WorkDir, spinner};

/// The `orders` clipping bound of the cluster's overlap-sum entry (see `cluster::node_config`);
/// the synthetic amounts never exceed theirs (500 000).
const ORDERS_MAX: u64 = 100;
/// How many noise standard deviations a figure may be from the truth.
const SDS: f64 = 15.0;

fn spec(kind: JobKind) -> JobSpec {
    let mut spec = crate::cluster::customers_spec(&PARTNERS, kind, "fraud-detection");
    if kind == JobKind::OverlapSum {
        spec.overlap_sum = Some(OverlapSumSpec {
            sums: vec!["amount_cents".into(), "orders".into()],
            group_by: String::new(),
            groups: Vec::new(),
            count: true,
        });
    }
    spec
}

/// Bytes each party sent to its peer (spec order).
fn bytes(job: &JobInfo) -> Vec<u64> {
    PARTNERS
        .iter()
        .map(|p| {
            job.results
                .iter()
                .find(|r| r.node == *p)
                .and_then(|r| r.outcome.as_ref())
                .map_or(0, |o| o.bytes_to_peer)
        })
        .collect()
}

/// Whether an overlap-sum's release is within [`SDS`] noise deviations of the truth (the
/// synthetic amounts never exceed the bounds, so no clipping changes them).
fn sum_is_right(job: &JobInfo, truth: &GroupTruth) -> bool {
    let Some(r) = crate::sum_output::release(job) else {
        return false;
    };
    let Some(g) = r.groups.first().filter(|g| !g.suppressed) else {
        return false;
    };
    let sd = |i: usize| crate::sum_output::column_sd(r, i);
    [truth.count, truth.amount, truth.orders]
        .iter()
        .enumerate()
        .all(|(i, &t)| {
            g.values
                .get(i)
                .is_some_and(|&v| (v as f64 - t as f64).abs() <= SDS * sd(i) + 0.5)
        })
}

/// Runs the benchmark.
pub async fn run(args: BenchPsiArgs) -> anyhow::Result<ExitCode> {
    warn_if_debug("overlap-sum");
    anyhow::ensure!(
        args.threads.is_empty(),
        "--threads is for bench psi; bench overlap-sum runs the nodes' default threads"
    );
    let cores = cores();
    let workdir = WorkDir::new(args.each.keep.as_deref(), "cleanroom-bench-")?;
    let dir = workdir.path().to_owned();
    let progress = spinner("measuring the cryptographic floor on this machine");
    // The job's row: the count and the two columns' bounds (one Paillier plaintext), on one
    // thread's CPU clock.
    let floor = tokio::task::spawn_blocking(|| {
        measure_sum_floor(&[1, 500_000, ORDERS_MAX], 200, 20_000, &thread_cpu_time)
    })
    .await??;
    progress.set_message(format!("writing {} × {} synthetic rows", args.n, args.n));
    let (data_dir, truth) = write_bench_data(&dir, &args)?;
    anyhow::ensure!(
        crate::synth::MAX_ORDERS <= ORDERS_MAX,
        "the synthetic orders exceed the bound"
    );
    let expected_overlap = truth.shared_by_all;
    let mut expected = GroupTruth::default();
    for g in truth.shared_sums["globex"].values() {
        expected.count += g.count;
        expected.amount += g.amount;
        expected.orders += g.orders;
    }

    progress.set_message("starting the coordinator and two nodes");
    // Under --memory-limit both roles of the overlap-sum spill their sets, as the overlaps do;
    // with --engine ballista both nodes read, blind and re-blind on their executors.
    let partners = Partner::all_in(&data_dir, &PARTNERS);
    let cluster = crate::bench_psi::start(&dir, &partners, None, &args).await?;
    let client = cluster.client().await?;

    let (mut overlap_walls, mut sum_walls) = (Vec::new(), Vec::new());
    let (mut overlap_others, mut sum_others) = (Vec::new(), Vec::new());
    let pids = node_pids(&cluster);
    let (mut overlap_bytes, mut sum_bytes) = (Vec::new(), Vec::new());
    let mut correct = true;
    let mut last_sum_job: Option<String> = None;
    let runs = args.each.runs.max(1);
    for run in 0..runs {
        for kind in [JobKind::Overlap, JobKind::OverlapSum] {
            let name = if kind == JobKind::Overlap {
                "overlap"
            } else {
                "overlap-sum"
            };
            progress.set_message(format!(
                "run {}/{runs}: {name} of {} × {} items",
                run + 1,
                args.n,
                args.n
            ));
            let cpu_start = CpuMark::now(&pids);
            let started = Instant::now();
            let job = client.submit(spec(kind), "").await?;
            let job = client
                .wait(&job.job_id, Duration::from_secs(7200), |_| {})
                .await?;
            let wall = started.elapsed().as_secs_f64();
            let others = CpuMark::now(&pids).since(&cpu_start).1.map(|o| o / wall);
            let right = job.state == JobState::Succeeded as i32
                && if kind == JobKind::Overlap {
                    job.results.iter().all(|r| {
                        r.outcome.as_ref().map(|o| o.intersection) == Some(expected_overlap)
                    })
                } else {
                    sum_is_right(&job, &expected)
                };
            if !right {
                correct = false;
                eprintln!(
                    "run {}: {name} job {} {}: {}",
                    run + 1,
                    job.job_id,
                    cleanroom_coordinator::client::state_name(job.state),
                    job.reason
                );
            }
            if kind == JobKind::Overlap {
                overlap_walls.push(wall);
                overlap_others.extend(others);
                overlap_bytes.push(bytes(&job));
            } else {
                sum_walls.push(wall);
                sum_others.extend(others);
                sum_bytes.push(bytes(&job));
                last_sum_job = Some(job.job_id.clone());
            }
        }
    }
    let rss = cluster.peak_rss(&PARTNERS);
    // What each node spilled in the last overlap-sum (both roles spill under a limit).
    let spilled: Vec<(String, Option<u64>)> = PARTNERS
        .iter()
        .map(|n| {
            let bytes = last_sum_job
                .as_deref()
                .and_then(|job| cluster.spilled_bytes_of_job(n, job));
            (n.to_string(), bytes)
        })
        .collect();
    client.close().await;
    cluster.stop().await?;
    progress.finish_and_clear();

    let overlap = median(&mut overlap_walls);
    let sum = median(&mut sum_walls);
    let ratio = sum / overlap;
    let last = |v: &[Vec<u64>]| v.last().cloned().unwrap_or_default();
    let (ob, sb) = (last(&overlap_bytes), last(&sum_bytes));
    cleanroom_node::outln!(
        "bench overlap-sum: {} × {} items ({:.0}% shared), a count and 2 value columns, {cores} cores, {runs} run(s) of each",
        args.n,
        args.n,
        args.overlap * 100.0
    );
    let psi_floor = floor.psi.psi_floor_seconds(args.n, args.n, cores);
    let sum_floor = floor.sum_floor_seconds(args.n, args.n, expected_overlap, cores);
    cleanroom_node::outln!(
        "overlap      wall {overlap:.2} s (median), floor {psi_floor:.2} s, wall / floor {:.3}",
        overlap / psi_floor
    );
    cleanroom_node::outln!(
        "overlap-sum  wall {sum:.2} s (median), floor {sum_floor:.2} s, wall / floor {:.3}",
        sum / sum_floor
    );
    cleanroom_node::outln!(
        "floor of the overlap-sum: the overlap's ({:.1} µs per item per party, {}) + one Paillier key {:.2} s + {} rows × encrypt {:.0} µs + {expected_overlap} shared rows × add {:.1} µs + finish {:.0} ms, over {cores} cores (one thread's CPU time)",
        floor.psi.per_item_ns() / 1e3,
        floor.psi.backend,
        floor.keygen_ns / 1e9,
        args.n,
        floor.encrypt_row_ns / 1e3,
        floor.add_row_ns / 1e3,
        floor.finish_ns / 1e6
    );
    cleanroom_node::outln!("ratio overlap-sum / overlap: {ratio:.2}");
    let (overlap_others, sum_others) = (median(&mut overlap_others), median(&mut sum_others));
    cleanroom_node::outln!(
        "other processes: {overlap_others:.2} cores during the overlaps, {sum_others:.2} during the overlap-sums (median; of {cores})"
    );
    for (i, p) in PARTNERS.iter().enumerate() {
        cleanroom_node::outln!(
            "bytes sent by {p:<8} overlap {:>12}  overlap-sum {:>12}  ({})",
            ob.get(i).copied().unwrap_or(0),
            sb.get(i).copied().unwrap_or(0),
            if i == 0 { "key holder" } else { "value holder" }
        );
    }
    for (name, rss) in &rss {
        if let Some(b) = rss {
            cleanroom_node::outln!(
                "peak RSS {name:<8} {:.1} MiB (both jobs)",
                *b as f64 / (1024.0 * 1024.0)
            );
        }
    }
    if let Some(limit) = args.memory_limit {
        cleanroom_node::outln!(
            "memory_limit: {limit} per node (both roles of the overlap-sum and the overlaps spill)"
        );
        for (name, bytes) in &spilled {
            cleanroom_node::outln!(
                "spilled  {name:<8} {:.1} MiB (the last overlap-sum)",
                bytes.unwrap_or(0) as f64 / (1024.0 * 1024.0)
            );
        }
    }
    if args.engine == EngineArg::Ballista {
        cleanroom_node::outln!(
            "engine: Ballista, 2 executors on this machine (the dataset pass, blinding, re-blinding, the value holder's encryption, the key holder's comparison)"
        );
    }
    cleanroom_node::outln!(
        "result: {}",
        if correct {
            "correct (overlap exact; sums within 15 sd of the truth)"
        } else {
            "WRONG"
        }
    );
    if args.each.json {
        cleanroom_node::outln!(
            "{}",
            json!({
                "n": args.n, "overlap": args.overlap, "cores": cores, "runs": runs,
                "overlap_wall_s": overlap, "overlap_sum_wall_s": sum, "ratio": ratio,
                "backend": floor.psi.backend,
                "overlap_floor_s": psi_floor, "overlap_sum_floor_s": sum_floor,
                "overlap_ratio_to_floor": overlap / psi_floor,
                "overlap_sum_ratio_to_floor": sum / sum_floor,
                "other_cores": { "overlap": overlap_others, "overlap_sum": sum_others },
                "floor_ns": {
                    "psi_per_item": floor.psi.per_item_ns(),
                    "keygen": floor.keygen_ns,
                    "encrypt_row": floor.encrypt_row_ns,
                    "add_row": floor.add_row_ns,
                    "finish": floor.finish_ns,
                },
                "overlap_bytes": ob, "overlap_sum_bytes": sb,
                "peak_rss_bytes": rss_json(&rss),
                "spilled_bytes": rss_json(&spilled),
                "memory_limit_bytes": args.memory_limit.map(|m| m.as_u64()),
                "engine": if args.engine == EngineArg::Ballista { "ballista" } else { "in-process" },
                "correct": correct,
            })
        );
    }
    Ok(verdict(correct))
}
