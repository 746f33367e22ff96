//! `cleanroom bench`: the PSI benchmark (`bench_psi`), the overlap-sum benchmark (`bench_sum`)
//! and, here, the aggregate benchmark.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use cleanroom_proto::v1::{AggregateSpec, IntegerRange, JobKind, JobSpec, JobState, PartySpec};
use serde_json::json;

use crate::args::{BenchAggregateArgs, BenchCommand};
use crate::cluster::{Cluster, Partner};
use crate::measure::{CpuMark, cores, median, verdict, warn_if_debug};
use crate::synth::{SynthSpec, write_synth};
use crate::ui::{WorkDir, spinner};

/// Runs a benchmark.
pub async fn run(command: BenchCommand) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Psi(args) => crate::bench_psi::run(args).await,
        BenchCommand::Aggregate(args) => aggregate(args).await,
        BenchCommand::OverlapSum(args) => crate::bench_sum::run(args).await,
    }
}

/// `cleanroom bench aggregate`: N node processes, G groups, the synthetic chargebacks.
async fn aggregate(args: BenchAggregateArgs) -> anyhow::Result<ExitCode> {
    warn_if_debug("aggregate");
    anyhow::ensure!(args.parties >= 3, "an aggregate needs at least 3 parties");
    if args.in_process {
        return aggregate_in_process(&args);
    }
    if args.integer_groups {
        anyhow::ensure!(
            (1..=cleanroom_circuits::aggregate::MAX_RANGE_GROUPS).contains(&args.groups),
            "--groups must be between 1 and {} with --integer-groups",
            cleanroom_circuits::aggregate::MAX_RANGE_GROUPS
        );
    } else {
        anyhow::ensure!(
            (crate::synth::CATEGORIES.len() as u64..=20_000).contains(&args.groups),
            "--groups must be between {} and 20000",
            crate::synth::CATEGORIES.len()
        );
    }
    let workdir = WorkDir::new(args.each.keep.as_deref(), "cleanroom-bench-")?;
    let dir = workdir.path().to_owned();
    let progress = spinner("measuring the cryptographic floor on this machine");
    let floor = aggregate_floor(&args).await?;
    progress.set_message("writing synthetic data");
    let data_dir = dir.join("data");
    let partners: Vec<String> = (1..=args.parties).map(|i| format!("p{i}")).collect();
    let truth = write_synth(
        &SynthSpec {
            partners: partners.clone(),
            rows: args.rows,
            overlap: 0.3,
            seed: 42,
        },
        &data_dir,
    )?;
    progress.set_message(format!(
        "starting the coordinator and {} nodes",
        partners.len()
    ));
    let cluster = Cluster::start(&dir, &Partner::all_in(&data_dir, &partners)).await?;
    let client = cluster.client().await?;
    let (group_by, labels, group_range) = if args.integer_groups {
        let hi = i64::try_from(args.groups)?;
        ("bucket", Vec::new(), Some(IntegerRange { lo: 0, hi }))
    } else {
        let mut labels: Vec<String> = crate::synth::CATEGORIES
            .iter()
            .map(|c| c.to_string())
            .collect();
        labels.extend((0..args.groups - labels.len() as u64).map(|i| format!("g{i}")));
        ("category", labels, None)
    };
    // Integer groups: the plaintext truth per bucket, from the files themselves.
    let bucket_truth = if args.integer_groups {
        bucket_truth(&truth.chargeback_files, args.groups)?
    } else {
        Vec::new()
    };
    let spec = JobSpec {
        analyst: String::new(),
        kind: JobKind::Aggregate as i32,
        parties: partners
            .iter()
            .map(|node| PartySpec {
                node: node.clone(),
                dataset: "chargebacks".into(),
                ..PartySpec::default()
            })
            .collect(),
        purpose: "fraud-benchmark".into(),
        aggregate: Some(AggregateSpec {
            group_by: group_by.into(),
            groups: labels,
            sums: vec!["amount".into()],
            count: true,
            group_range,
            person: String::new(),
        }),
        overlap_sum: None,
    };

    let mut walls = Vec::new();
    let mut others = Vec::new();
    let pids: Vec<u32> = partners
        .iter()
        .filter_map(|p| cluster.node_pid(p))
        .collect();
    let mut fetches = Vec::new();
    let mut released = 0usize;
    let mut correct = true;
    let mut bytes: Vec<(String, u64, u64)> = Vec::new();
    for run in 0..args.each.runs.max(1) {
        progress.set_message(format!(
            "run {}/{}: aggregate of {} groups over {} parties",
            run + 1,
            args.each.runs.max(1),
            args.groups,
            args.parties
        ));
        let cpu_start = CpuMark::now(&pids);
        let started = Instant::now();
        let job = client.submit(spec.clone(), "").await?;
        let mut job = client
            .wait(&job.job_id, Duration::from_secs(7200), |_| {})
            .await?;
        let wall = started.elapsed().as_secs_f64();
        walls.push(wall);
        others.extend(CpuMark::now(&pids).since(&cpu_start).1.map(|o| o / wall));
        // Reading every group back, page by page when GetJob could not carry them.
        let fetch_started = Instant::now();
        client.fill_aggregate_groups(&mut job).await?;
        fetches.push(fetch_started.elapsed().as_secs_f64());
        let Some(result) = job
            .aggregate
            .as_ref()
            .filter(|_| job.state == JobState::Succeeded as i32)
        else {
            correct = false;
            eprintln!(
                "run {}: job {} did not succeed: {}",
                run + 1,
                job.job_id,
                job.reason
            );
            continue;
        };
        // The categories' noised totals must be within 6 standard deviations of the truth.
        let sd = |column: &str| {
            result
                .noise
                .iter()
                .find(|n| n.column == column)
                .map_or(0.0, |n| n.total_sd)
        };
        if args.integer_groups {
            let (ok, shown) =
                check_buckets(result, &bucket_truth, 6.0 * sd("count"), 6.0 * sd("amount"));
            released = shown;
            if !ok {
                correct = false;
                eprintln!("run {}: the bucket totals are off", run + 1);
            }
        }
        let categories = if args.integer_groups {
            0
        } else {
            crate::synth::CATEGORIES.len()
        };
        for g in result.groups.iter().take(categories) {
            let t = truth
                .chargebacks_total
                .get(&g.label)
                .copied()
                .unwrap_or_default();
            let ok = !g.suppressed
                && g.values.len() == 2
                && ((g.values[0] - t.count as i64) as f64).abs() <= 6.0 * sd("count")
                && ((g.values[1] - t.amount as i64) as f64).abs() <= 6.0 * sd("amount");
            if !ok {
                correct = false;
                eprintln!(
                    "run {}: group {} is off: {:?} vs {t:?}",
                    run + 1,
                    g.label,
                    g.values
                );
            }
        }
        bytes = result
            .parties
            .iter()
            .map(|p| (p.node.clone(), p.bytes_to_peers, p.bytes_to_coordinator))
            .collect();
    }
    client.close().await;
    cluster.stop().await?;
    progress.finish_and_clear();

    // Every run's figures, in run order, before the medians sort them.
    let (run_walls, run_fetches) = (walls.clone(), fetches.clone());
    let wall = median(&mut walls);
    let fetch = median(&mut fetches);
    let cores = cores();
    cleanroom_node::outln!(
        "bench aggregate: {} {} groups (+ other) × 2 columns over {} parties, {} chargebacks per party, {} run(s), {cores} cores",
        args.groups,
        if args.integer_groups {
            "integer"
        } else {
            "labelled"
        },
        args.parties,
        args.rows.div_ceil(5),
        walls.len()
    );
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    cleanroom_node::outln!(
        "wall (submit → result):   {wall:.2} s  (median; runs: {})",
        list(&run_walls)
    );
    cleanroom_node::outln!(
        "floor per cell per party: {:.2} µs = 2 × {} seed expansions × {:.4} + noise draw {:.2}  (one thread's CPU time)",
        floor.costs.per_cell_ns(args.parties as usize) / 1e3,
        args.parties - 1,
        floor.costs.expand_ns / 1e3,
        floor.costs.noise_ns / 1e3
    );
    cleanroom_node::outln!(
        "floor for the job:        {:.2} s  ({} parties × {} cells × per-cell cost / {cores} cores)",
        floor.seconds,
        args.parties,
        floor.cells
    );
    cleanroom_node::outln!("ratio wall / floor:       {:.3}", wall / floor.seconds);
    let other_cores = median(&mut others);
    cleanroom_node::outln!(
        "other processes:          {other_cores:.2} cores on average while the job ran (median; of {cores})"
    );
    cleanroom_node::outln!(
        "result fetch (all pages): {fetch:.2} s  (median; runs: {})",
        list(&run_fetches)
    );
    if args.integer_groups {
        cleanroom_node::outln!(
            "groups released:          {released} (the rest suppressed below the minimum result)"
        );
    }
    for (node, to_peers, to_coordinator) in &bytes {
        cleanroom_node::outln!(
            "bytes sent by {node:<6}      {to_peers} B to peers, {to_coordinator} B to the coordinator"
        );
    }
    cleanroom_node::outln!(
        "result:                   {}",
        match (correct, args.integer_groups) {
            (true, false) => "correct (every category within 6 sd of the ground truth)",
            (true, true) =>
                "correct (every group labelled by its bucket; every released one within 6 sd of the ground truth)",
            (false, _) => "WRONG",
        }
    );
    if args.each.json {
        cleanroom_node::outln!(
            "{}",
            json!({
                "groups": args.groups, "integer_groups": args.integer_groups,
                "parties": args.parties, "rows": args.rows, "cores": cores,
                "runs": walls.len(), "wall_s": wall, "fetch_s": fetch,
                "floor_s": floor.seconds, "ratio": wall / floor.seconds, "other_cores": other_cores,
                "floor_ns": {
                    "expand_per_cell": floor.costs.expand_ns,
                    "noise_per_cell": floor.costs.noise_ns,
                    "per_cell_per_party": floor.costs.per_cell_ns(args.parties as usize),
                },
                "walls_s": run_walls, "fetches_s": run_fetches,
                "bytes": bytes.iter().map(|(n, p, c)| json!({"node": n, "to_peers": p, "to_coordinator": c})).collect::<Vec<_>>(),
                "correct": correct,
            })
        );
    }
    Ok(verdict(correct))
}

/// An aggregate job's floor, measured on this machine.
struct AggregateFloor {
    costs: cleanroom_circuits::AggregateFloorCosts,
    /// Cells per party: (groups + "(other)") × (count, amount).
    cells: u64,
    seconds: f64,
}

/// Measures the floor of the benchmark's aggregate: its noise plan (ε = 1, the count and
/// `amount` clipped to [0, 200 000], all but one party may collude), on up to 16 384 groups, on
/// one thread's CPU clock; the job's cells are `(groups + 1) × 2` per party.
async fn aggregate_floor(args: &BenchAggregateArgs) -> anyhow::Result<AggregateFloor> {
    let parties = args.parties as usize;
    let plan =
        cleanroom_circuits::aggregate::NoisePlan::new(1.0, &[1, 200_000], parties, parties - 1)?;
    let sample = usize::try_from(args.groups.saturating_add(1).min(16_384))?;
    let costs = tokio::task::spawn_blocking(move || {
        cleanroom_circuits::measure_aggregate_floor(&plan, sample, &crate::measure::thread_cpu_time)
    })
    .await??;
    let cells = args.groups.saturating_add(1).saturating_mul(2);
    Ok(AggregateFloor {
        seconds: costs.aggregate_floor_seconds(cells, parties, cores()),
        costs,
        cells,
    })
}

/// Per bucket `0..groups` and then "(other)": the plaintext (count, amount) of all partners'
/// chargebacks, read from the files.
fn bucket_truth(
    files: &std::collections::BTreeMap<String, std::path::PathBuf>,
    groups: u64,
) -> anyhow::Result<Vec<(i64, i64)>> {
    let mut truth = vec![(0i64, 0i64); usize::try_from(groups)? + 1];
    let other = truth.len() - 1;
    for path in files.values() {
        let mut reader = csv::Reader::from_path(path)?;
        for record in reader.records() {
            let record = record?;
            let amount: i64 = record[2].parse()?;
            let bucket: u64 = record[3].parse()?;
            let t = &mut truth[if bucket < groups {
                bucket as usize
            } else {
                other
            }];
            t.0 += 1;
            t.1 += amount;
        }
    }
    Ok(truth)
}

/// Every group of an integer-bucket result is labelled with its bucket, and every released
/// group is within the bounds of the truth. Returns (correct, groups released).
fn check_buckets(
    result: &cleanroom_proto::v1::AggregateResult,
    truth: &[(i64, i64)],
    count_bound: f64,
    amount_bound: f64,
) -> (bool, usize) {
    if result.groups.len() != truth.len() {
        eprintln!(
            "the result has {} groups, {} expected",
            result.groups.len(),
            truth.len()
        );
        return (false, 0);
    }
    let mut released = 0;
    for (i, (g, t)) in result.groups.iter().zip(truth).enumerate() {
        let label = if i + 1 == truth.len() {
            "(other)".to_owned()
        } else {
            i.to_string()
        };
        if g.label != label {
            eprintln!("group {i} is labelled {}", g.label);
            return (false, released);
        }
        if g.suppressed {
            continue;
        }
        released += 1;
        let ok = g.values.len() == 2
            && ((g.values[0] - t.0) as f64).abs() <= count_bound
            && ((g.values[1] - t.1) as f64).abs() <= amount_bound;
        if !ok {
            eprintln!("group {label} is off: {:?} vs {t:?}", g.values);
            return (false, released);
        }
    }
    (true, released)
}

/// `bench aggregate --in-process`: the protocol core of every party in turn, timed per stage.
fn aggregate_in_process(args: &BenchAggregateArgs) -> anyhow::Result<ExitCode> {
    use cleanroom_circuits::aggregate::{
        GroupVector, NoisePlan, accumulate_seed, add_noise, encode_cells, reconstruct, split,
    };
    let n = args.parties as usize;
    let groups = usize::try_from(args.groups)?;
    let columns = 2;
    let cells = groups * columns;
    // ε = 1, count and amount clipped to [0, 200000], all but one party may collude.
    let sensitivities = [1u64, 200_000];
    let plan = NoisePlan::new(1.0, &sensitivities, n, n - 1)?;
    let mut rng = rand::rng();
    let mut walls = Vec::new();
    let mut stages = [0f64; 4];
    let mut correct = true;
    for _ in 0..args.each.runs.max(1) {
        // Random inputs: counts up to 50, amounts up to 50 × 200000.
        let inputs: Vec<GroupVector> = (0..n)
            .map(|_| {
                let mut v = GroupVector::zeros(groups, columns)?;
                for g in 0..groups {
                    let count = rand::RngExt::random_range(&mut rng, 0..50i64);
                    v.add(g, 0, count)?;
                    v.add(
                        g,
                        1,
                        count * rand::RngExt::random_range(&mut rng, 0..200_000i64),
                    )?;
                }
                Ok(v)
            })
            .collect::<anyhow::Result<_>>()?;
        let started = Instant::now();
        let t = Instant::now();
        let splits = inputs
            .iter()
            .map(|x| split(x, n - 1))
            .collect::<Result<Vec<_>, _>>()?;
        stages[0] += t.elapsed().as_secs_f64();
        let mut partials = Vec::with_capacity(n);
        for (i, own) in splits.iter().enumerate() {
            let t = Instant::now();
            let mut acc = own.own.clone();
            for (j, s) in splits.iter().enumerate() {
                if j != i {
                    accumulate_seed(&mut acc, &s.seeds[if i < j { i } else { i - 1 }]);
                }
            }
            stages[1] += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let noise = plan.draw(groups)?;
            add_noise(&mut acc, &noise)?;
            stages[2] += t.elapsed().as_secs_f64();
            partials.push(acc);
        }
        let t = Instant::now();
        let totals = reconstruct(&partials)?;
        stages[3] += t.elapsed().as_secs_f64();
        walls.push(started.elapsed().as_secs_f64());
        // Within 6 sd of the plaintext sums.
        let sd = plan.describe(&sensitivities);
        for (c, total) in totals.iter().enumerate() {
            let exact: i64 = inputs.iter().map(|x| x.cells()[c] as i64).sum();
            let bound = 6.0 * sd[c % columns].as_ref().map_or(0.0, |d| d.total_sd);
            if ((total - exact) as f64).abs() > bound {
                correct = false;
            }
        }
    }
    let runs = walls.len() as f64;
    let wall = median(&mut walls);
    // Bytes per party: N − 1 hellos (job id, terms, 32-byte seed: 124 B framed, as measured end to end) and the
    // partial in frames of 65 536 cells.
    let partial_bytes =
        encode_cells(&vec![0u64; cells]).len() as u64 + cells.div_ceil(1 << 16) as u64 * 64;
    cleanroom_node::outln!(
        "bench aggregate --in-process: {groups} groups × {columns} columns over {n} parties, {} run(s), ε = 1",
        walls.len()
    );
    cleanroom_node::outln!(
        "wall, all parties in turn on this thread pool: {wall:.2} s (median); per stage (mean over runs, all parties): split {:.2} s, expand peers' seeds {:.2} s, noise {:.2} s, reconstruct {:.2} s",
        stages[0] / runs,
        stages[1] / runs,
        stages[2] / runs,
        stages[3] / runs
    );
    cleanroom_node::outln!(
        "one party's share of the work ≈ {:.2} s; bytes sent per party ≈ {} B to peers (seeds), {partial_bytes} B to the coordinator (partial)",
        (stages[0] + stages[1] + stages[2]) / runs / n as f64,
        (n as u64 - 1) * 124
    );
    cleanroom_node::outln!(
        "result:                   {}",
        if correct {
            "correct (within 6 sd)"
        } else {
            "WRONG"
        }
    );
    Ok(verdict(correct))
}
