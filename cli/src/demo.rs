//! `cleanroom demo`: a whole consortium on loopback, one overlap, one match and one overlap-sum
//! job, results printed next to the ground truth. Exits non-zero if any result is wrong (a
//! noised figure: more than 15 standard deviations of its noise from the truth).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use cleanroom_coordinator::AnalystClient;
use cleanroom_coordinator::client::state_name;
use cleanroom_proto::v1::{JobInfo, JobKind, JobSpec, JobState, OverlapSumSpec};
use indicatif::ProgressBar;

use crate::args::DemoArgs;
use crate::cluster::{Cluster, Partner};
use crate::synth::{CATEGORIES, GroundTruth, SynthSpec, write_synth_as};
use crate::ui::{WorkDir, spinner};

const PARTNERS: [&str; 2] = ["acme", "globex"];

/// Submits `spec` and waits (at most 10 minutes) for it to end, showing its state.
async fn submit_and_wait(
    client: &AnalystClient,
    progress: &ProgressBar,
    name: &str,
    spec: JobSpec,
) -> anyhow::Result<JobInfo> {
    let job = client.submit(spec, "").await?;
    let job = client
        .wait(&job.job_id, Duration::from_secs(600), |info| {
            progress.set_message(format!(
                "{name} job {} is {}",
                info.job_id,
                state_name(info.state)
            ));
        })
        .await?;
    Ok(job)
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let workdir = WorkDir::new(args.keep.as_deref(), "cleanroom-demo-")?;
    let dir = workdir.path().to_owned();
    let progress = spinner("starting");

    progress.set_message(format!(
        "writing synthetic data: {} rows per partner, {:.0}% shared",
        args.rows,
        args.overlap * 100.0
    ));
    let data_dir = dir.join("data");
    let spec = SynthSpec {
        partners: PARTNERS.iter().map(|s| s.to_string()).collect(),
        rows: args.rows,
        overlap: args.overlap,
        seed: args.seed,
    };
    let truth = write_synth_as(&spec, &data_dir, args.format.into())?;
    let expected = *truth
        .pairwise_overlap
        .get("acme,globex")
        .context("the ground truth has no acme,globex overlap")?;

    progress
        .set_message("issuing the PKI and starting the coordinator and two nodes (acme, globex)");
    let cluster = Cluster::start_with(
        &dir,
        &Partner::from_truth(&truth),
        args.web,
        &[],
        "",
        args.engine,
    )
    .await?;
    let client = cluster.client().await?;

    let mut jobs = Vec::new();
    for (kind, purpose) in [
        (JobKind::Overlap, "overlap-reporting"),
        (JobKind::Match, "fraud-detection"),
    ] {
        let name = if kind == JobKind::Overlap {
            "overlap"
        } else {
            "match"
        };
        progress.set_message(format!(
            "running a {name} job on email between acme and globex"
        ));
        let spec = crate::cluster::customers_spec(&PARTNERS, kind, purpose);
        let started = Instant::now();
        let job = submit_and_wait(&client, &progress, name, spec).await?;
        jobs.push((name, job, started.elapsed()));
    }
    progress.set_message("running an overlap-sum job: amounts of shared customers per category");
    let started = Instant::now();
    let sum_job = submit_and_wait(&client, &progress, "overlap-sum", overlap_sum_spec()).await?;
    let sum_elapsed = started.elapsed();
    client.close().await;
    let shares = cluster
        .engine
        .as_ref()
        .map(crate::scale::LocalCluster::shares);
    let cluster = if args.web.is_some() {
        Some(cluster)
    } else {
        progress.set_message("stopping the processes");
        cluster.stop().await?;
        None
    };
    progress.finish_and_clear();

    cleanroom_node::outln!(
        "cleanroom demo — {} rows per partner in {} files, seed {}, working directory {}",
        args.rows,
        cleanroom_node::data::DataFormat::from(args.format),
        args.seed,
        dir.display()
    );
    cleanroom_node::outln!();
    cleanroom_node::outln!(
        "JOB      ID                     STATE          RESULT      TRUTH     TIME  CHECK"
    );
    let mut all_ok = true;
    for (name, job, elapsed) in &jobs {
        let (result, ok) = check(job, expected);
        all_ok &= ok;
        cleanroom_node::outln!(
            "{:<8} {:<22} {:<10} {:>10} {:>10} {:>7.2}s  {}",
            name,
            job.job_id,
            state_name(job.state),
            result,
            expected,
            elapsed.as_secs_f64(),
            if ok { "ok" } else { "WRONG" }
        );
        if job.state != JobState::Succeeded as i32 {
            cleanroom_node::outln!("         reason: {}", job.reason);
        }
        for r in &job.results {
            if let Some(o) = r.outcome.as_ref().filter(|o| o.learned_membership) {
                cleanroom_node::outln!(
                    "         {} learned which {} of its rows are shared (row numbers in {})",
                    r.node,
                    o.matched_rows,
                    o.membership_file
                );
            }
        }
    }
    cleanroom_node::outln!();
    all_ok &= print_overlap_sum(&sum_job, &truth, sum_elapsed);
    cleanroom_node::outln!();
    cleanroom_node::outln!(
        "Neither node saw the other's records; the coordinator saw only the counts and noised \
         totals above."
    );
    if let Some(shares) = shares {
        cleanroom_node::outln!();
        for (i, (tasks, rows)) in shares.into_iter().enumerate() {
            cleanroom_node::outln!(
                "Ballista executor {}: {tasks} tasks, {rows} rows read for the nodes",
                i + 1
            );
        }
    }
    if let Some(cluster) = cluster {
        serve_until_interrupted(cluster, &dir).await?;
    }
    if args.keep.is_some() {
        cleanroom_node::outln!("Logs, configs and data are kept in {}.", dir.display());
    } else {
        cleanroom_node::outln!(
            "The working directory is removed now; run `cleanroom demo --keep DIR` to keep its data, configs, logs, audit logs and membership files."
        );
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `demo --web`: prints where the console is and how to reach it, then keeps the consortium
/// running until SIGINT or SIGTERM.
async fn serve_until_interrupted(cluster: Cluster, dir: &std::path::Path) -> anyhow::Result<()> {
    let web = cluster
        .web
        .context("the coordinator did not report its web address")?;
    let pki = dir.join("pki");
    let base = format!("https://coordinator.cleanroom:{}", web.port());
    cleanroom_node::outln!();
    cleanroom_node::outln!("The consortium keeps running; interrupt (Ctrl-C) to stop it.");
    cleanroom_node::outln!();
    cleanroom_node::outln!(
        "console   {base}/   (the coordinator's certificate names coordinator.cleanroom: map it to {} in /etc/hosts)",
        web.ip()
    );
    cleanroom_node::outln!("JSON API  {base}/api/v1/jobs");
    cleanroom_node::outln!("metrics   {base}/metrics");
    cleanroom_node::outln!("health    {base}/healthz");
    cleanroom_node::outln!();
    cleanroom_node::outln!("Privacy dashboards (plain HTTP on loopback, no credentials):");
    for (node, addr) in &cluster.dashboards {
        cleanroom_node::outln!("  {node:<8}  http://{addr}/   metrics http://{addr}/metrics");
    }
    cleanroom_node::outln!();
    cleanroom_node::outln!("Analyst credentials (analyst 'demo'):");
    cleanroom_node::outln!("  CA           {}", pki.join("ca.pem").display());
    cleanroom_node::outln!("  certificate  {}", pki.join("analyst-demo.pem").display());
    cleanroom_node::outln!("  key          {}", pki.join("analyst-demo.key").display());
    cleanroom_node::outln!(
        "  for a browser: openssl pkcs12 -export -name demo -in {} -inkey {} -out demo.p12",
        pki.join("analyst-demo.pem").display(),
        pki.join("analyst-demo.key").display()
    );
    cleanroom_node::outln!("  then import demo.p12 and trust ca.pem (docs/API.md says how)");
    cleanroom_node::outln!(
        "  or: curl --resolve coordinator.cleanroom:{port}:{ip} --cacert {ca} --cert {cert} --key {key} {base}/api/v1/jobs",
        port = web.port(),
        ip = web.ip(),
        ca = pki.join("ca.pem").display(),
        cert = pki.join("analyst-demo.pem").display(),
        key = pki.join("analyst-demo.key").display(),
    );
    cleanroom_node::cli::wait_for_stop(false).await;
    cleanroom_node::outln!("stopping");
    cluster.stop().await
}

/// The demo's overlap-sum: acme holds the identifiers, globex the amounts; per category, the
/// shared customers and the sum of their amounts.
fn overlap_sum_spec() -> JobSpec {
    let mut spec =
        crate::cluster::customers_spec(&PARTNERS, JobKind::OverlapSum, "fraud-detection");
    spec.overlap_sum = Some(OverlapSumSpec {
        sums: vec!["amount_cents".into()],
        group_by: "category".into(),
        groups: CATEGORIES.iter().map(|c| c.to_string()).collect(),
        count: true,
    });
    spec
}

/// How many noise standard deviations a demo figure may be from the truth (a false alarm
/// has probability below e^-15 per figure).
const DEMO_SDS: f64 = 15.0;

/// Prints the overlap-sum's noised cells next to the truth; returns whether every released
/// figure is within [`DEMO_SDS`] standard deviations of its noise (exact figures must be equal).
fn print_overlap_sum(job: &JobInfo, truth: &GroundTruth, elapsed: Duration) -> bool {
    cleanroom_node::outln!(
        "overlap-sum {} {} in {:.2}s: acme's emails × globex's amount_cents by category",
        job.job_id,
        state_name(job.state),
        elapsed.as_secs_f64()
    );
    let Some(release) =
        crate::sum_output::release(job).filter(|_| job.state == JobState::Succeeded as i32)
    else {
        cleanroom_node::outln!("         reason: {}", job.reason);
        return false;
    };
    let sd = |i: usize| crate::sum_output::column_sd(release, i);
    let close = |noised: i64, exact: u64, sd: f64| {
        (noised as f64 - exact as f64).abs() <= DEMO_SDS * sd.max(0.0) + 0.5
    };
    cleanroom_node::outln!(
        "  {:<12} {:>10} {:>10} {:>16} {:>16}  CHECK",
        "CATEGORY",
        "SHARED",
        "TRUTH",
        "AMOUNT",
        "TRUTH"
    );
    let expected = &truth.shared_sums["globex"];
    let mut ok = !release.withheld;
    for g in &release.groups {
        let t = expected.get(&g.label).copied().unwrap_or_default();
        if g.suppressed {
            // Only a small true count may be suppressed.
            let fine = (t.count as f64) < release.min_result as f64 + DEMO_SDS * sd(0);
            ok &= fine;
            cleanroom_node::outln!(
                "  {:<12} {:>10} {:>10} {:>16} {:>16}  {}",
                g.label,
                "suppressed",
                t.count,
                "-",
                t.amount,
                if fine { "ok" } else { "WRONG" }
            );
            continue;
        }
        let (count, amount) = (
            g.values.first().copied().unwrap_or(0),
            g.values.get(1).copied().unwrap_or(0),
        );
        let fine = close(count, t.count, sd(0)) && close(amount, t.amount, sd(1));
        ok &= fine;
        cleanroom_node::outln!(
            "  {:<12} {:>10} {:>10} {:>16} {:>16}  {}",
            g.label,
            count,
            t.count,
            amount,
            t.amount,
            if fine { "ok" } else { "WRONG" }
        );
    }
    cleanroom_node::outln!(
        "  noise: discrete Laplace added under encryption by acme, ε {} (count ±{:.1}, amount \
         ±{:.0} one sd); globex decrypted only the noised totals",
        release.epsilon,
        sd(0),
        sd(1)
    );
    ok
}

/// The job's result, and whether it is right: succeeded, count equals the truth, and for match
/// each side's matched rows equal it too (the synthetic data has one row per customer).
fn check(job: &JobInfo, expected: u64) -> (String, bool) {
    if job.state != JobState::Succeeded as i32 {
        return ("-".into(), false);
    }
    let Some(first) = job.results.first().and_then(|r| r.outcome.as_ref()) else {
        return ("-".into(), false);
    };
    let is_match = job
        .spec
        .as_ref()
        .is_some_and(|s| s.kind == JobKind::Match as i32);
    let ok = job.results.iter().all(|r| {
        r.outcome.as_ref().is_some_and(|o| {
            o.intersection == expected
                && (!is_match || (o.learned_membership && o.matched_rows == expected))
        })
    });
    (first.intersection.to_string(), ok)
}
