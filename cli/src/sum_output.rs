//! Rendering an `overlap-sum` job: per group, the noised number of shared identifiers and the
//! noised sums, each column with its noise scale, suppressed groups marked; as a table, JSON or
//! CSV.

use cleanroom_coordinator::client::state_name;
use cleanroom_proto::v1::{JobInfo, JobKind, NoiseTerm, PsiOutcome, SumRelease};
use serde_json::{Value, json};

use crate::args::Format;
use crate::text::print_json;

/// Prints `job` if it is an overlap-sum and returns true; false for other kinds.
pub fn print_job(job: &JobInfo, format: Format) -> bool {
    let Some(spec) = job.spec.as_ref() else {
        return false;
    };
    if spec.kind != JobKind::OverlapSum as i32 {
        return false;
    }
    match format {
        Format::Json => print_json(&job_json(job)),
        Format::Csv => cleanroom_node::out!("{}", csv(job)),
        Format::Table => cleanroom_node::out!("{}", table(job)),
    }
    true
}

/// The value holder's report (party 1), which carries the release.
fn value_holder(job: &JobInfo) -> Option<&PsiOutcome> {
    let node = &job.spec.as_ref()?.parties.get(1)?.node;
    job.results
        .iter()
        .find(|r| &r.node == node)
        .and_then(|r| r.outcome.as_ref())
}

/// The release, if the job has one.
pub fn release(job: &JobInfo) -> Option<&SumRelease> {
    value_holder(job).and_then(|o| o.sum.as_ref())
}

/// Standard deviation of discrete Laplace noise of scale `t`: `√(2q)/(1−q)`, `q = e^{−1/t}`.
/// For display only (the noise itself is drawn exactly).
pub fn laplace_sd(scale: &str) -> f64 {
    let t = match scale.split_once('/') {
        Some((n, d)) => n.parse::<f64>().unwrap_or(0.0) / d.parse::<f64>().unwrap_or(1.0),
        None => scale.parse::<f64>().unwrap_or(0.0),
    };
    if t <= 0.0 || !t.is_finite() {
        return 0.0;
    }
    let q = (-1.0 / t).exp();
    (2.0 * q).sqrt() / (1.0 - q)
}

/// The noise terms of column `i`: one per party that drew noise for it (the key holder's under
/// encryption, then the value holder's after decryption).
pub fn column_terms(r: &SumRelease, i: usize) -> &[NoiseTerm] {
    let per = r.noise.len() / r.columns.len().max(1);
    if per == 0 {
        return &[];
    }
    r.noise.chunks(per).nth(i).unwrap_or(&[])
}

/// Standard deviation of column `i`'s total noise (independent draws: variances add).
pub fn column_sd(r: &SumRelease, i: usize) -> f64 {
    column_terms(r, i)
        .iter()
        .map(|n| laplace_sd(&n.scale).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The job as JSON: the common job fields and an `overlap_sum` object.
pub fn job_json(job: &JobInfo) -> Value {
    let spec = job.spec.clone().unwrap_or_default();
    let sum = spec.overlap_sum.clone().unwrap_or_default();
    let result = release(job).map(|r| {
        json!({
            "intersection": (!r.withheld).then_some(r.intersection),
            "withheld": r.withheld,
            "epsilon": r.epsilon,
            "min_result": r.min_result,
            "columns": r.columns,
            "noise": r.columns.iter().enumerate().flat_map(|(i, c)| {
                column_terms(r, i).iter().map(move |n| json!({
                    "column": c,
                    "drawn_by": n.node,
                    "mechanism": n.mechanism,
                    "epsilon": n.epsilon,
                    "sensitivity": n.sensitivity,
                    "scale": n.scale,
                    "sd": laplace_sd(&n.scale),
                }))
            }).collect::<Vec<_>>(),
            "column_sd": r.columns.iter().enumerate().map(|(i, c)| (c.clone(), json!(column_sd(r, i)))).collect::<serde_json::Map<_, _>>(),
            "groups": r.groups.iter().map(|g| crate::group_table::group_json(&r.columns, g)).collect::<Vec<_>>(),
        })
    });
    json!({
        "job_id": job.job_id,
        "kind": "overlap-sum",
        "state": state_name(job.state),
        "reason": job.reason,
        "purpose": spec.purpose,
        "key_holder": spec.parties.first().map(|p| json!({ "node": p.node, "dataset": p.dataset })),
        "value_holder": spec.parties.get(1).map(|p| json!({ "node": p.node, "dataset": p.dataset })),
        "on": spec.parties.first().map(|p| p.keys.clone()).unwrap_or_default(),
        "sums": sum.sums,
        "group_by": sum.group_by,
        "count": sum.count,
        "submitted_by": job.submitted_by,
        "created_ms": job.created_ms,
        "updated_ms": job.updated_ms,
        "result": result,
        "parties": job.results.iter().map(|r| {
            let o = r.outcome.clone().unwrap_or_default();
            json!({
                "node": r.node,
                "distinct_keys": o.own_set_size,
                "bytes_to_peer": o.bytes_to_peer,
                "audit_head": o.audit_head,
            })
        }).collect::<Vec<_>>(),
        "history": crate::text::history_json(job),
    })
}

/// One row per group: `group,suppressed,<col>,<col>_noise_scale,…`.
fn csv(job: &JobInfo) -> String {
    let Some(r) = release(job) else {
        return crate::text::csv_without_result(job);
    };
    let mut out = String::from("group,suppressed");
    for c in &r.columns {
        out.push_str(&format!(
            ",{},{}_noise_scale",
            crate::text::csv_field(c),
            crate::text::csv_field(c)
        ));
    }
    out.push('\n');
    for g in &r.groups {
        out.push_str(&format!(
            "{},{}",
            crate::text::csv_field(&g.label),
            g.suppressed
        ));
        for i in 0..r.columns.len() {
            let value = g.values.get(i).map(i64::to_string).unwrap_or_default();
            let scale = column_terms(r, i).first().map_or("0", |n| n.scale.as_str());
            out.push_str(&format!(",{value},{}", crate::text::csv_field(scale)));
        }
        out.push('\n');
    }
    out
}

fn table(job: &JobInfo) -> String {
    let spec = job.spec.clone().unwrap_or_default();
    let sum = spec.overlap_sum.clone().unwrap_or_default();
    let party = |i: usize| {
        spec.parties
            .get(i)
            .map(|p| format!("{}:{}", p.node, p.dataset))
            .unwrap_or_default()
    };
    let mut out = String::new();
    out.push_str(&format!("job        {}\n", job.job_id));
    out.push_str(&format!(
        "kind       overlap-sum on {} — keys {} × values {}{}\n",
        crate::text::keys(&spec),
        party(0),
        party(1),
        if sum.group_by.is_empty() {
            String::new()
        } else {
            format!(", grouped by {}", sum.group_by)
        }
    ));
    out.push_str(&format!("purpose    {}\n", spec.purpose));
    out.push_str(&crate::text::state_line(job));
    out.push('\n');
    if let Some(r) = release(job) {
        if r.noise.is_empty() {
            out.push_str("noise      none (no agreement asks for it): totals are exact\n");
        } else {
            let mut drawers: Vec<&str> = r.noise.iter().map(|n| n.node.as_str()).collect();
            drawers.sort_unstable();
            drawers.dedup();
            out.push_str(&format!(
                "noise      discrete Laplace for ε {} (split over the columns), drawn by each of \
                 {} (the key holder's under encryption, the value holder's after decryption); ± \
                 is one standard deviation of the total noise\n",
                r.epsilon,
                drawers.join(" and ")
            ));
        }
        if r.withheld {
            out.push_str(
                "result     withheld by an agreement (below its minimum result, or not \
                 releasable to the coordinator)\n",
            );
        } else {
            out.push_str(&format!(
                "shared     {} identifiers in the released groups{}\n",
                r.intersection,
                if r.noise.is_empty() { "" } else { " (noised)" }
            ));
            out.push_str(&format!(
                "suppressed groups whose noised count is below {}\n",
                r.min_result
            ));
            let headers: Vec<String> = r
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| crate::group_table::column_header(c, column_sd(r, i)))
                .collect();
            out.push_str(&crate::group_table::render(&headers, &r.groups));
        }
    }
    for r in &job.results {
        let o = r.outcome.clone().unwrap_or_default();
        out.push_str(&format!(
            "  {:<10} {} distinct keys; sent {} B to its peer; audit head {}\n",
            r.node, o.own_set_size, o.bytes_to_peer, o.audit_head
        ));
    }
    out.push_str(&crate::text::history_text(job));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleanroom_proto::v1::{JobSpec, OverlapSumSpec, PartyResult};

    fn job() -> JobInfo {
        let spec = JobSpec {
            overlap_sum: Some(OverlapSumSpec {
                sums: vec!["amount".into()],
                group_by: "reason".into(),
                groups: vec!["fraud".into()],
                count: true,
            }),
            ..crate::cluster::customers_spec(&["acme", "payco"], JobKind::OverlapSum, "")
        };
        JobInfo {
            results: vec![PartyResult {
                node: "payco".into(),
                outcome: Some(PsiOutcome {
                    sum: Some(SumRelease {
                        columns: vec!["count".into(), "amount".into()],
                        groups: crate::group_table::sample_groups("fraud"),
                        noise: [
                            ("acme", "2"),
                            ("payco", "2"),
                            ("acme", "2000"),
                            ("payco", "2000"),
                        ]
                        .map(|(node, scale)| NoiseTerm {
                            node: node.into(),
                            scale: scale.into(),
                            ..NoiseTerm::default()
                        })
                        .to_vec(),
                        epsilon: 1.0,
                        min_result: 5,
                        intersection: 44,
                        ..SumRelease::default()
                    }),
                    ..PsiOutcome::default()
                }),
            }],
            ..crate::group_table::succeeded_job(spec)
        }
    }

    #[test]
    fn csv_marks_suppressed_groups_and_noise_scales() {
        assert_eq!(
            csv(&job()),
            "group,suppressed,count,count_noise_scale,amount,amount_noise_scale\n\
             fraud,false,42,2,12345,2000\n\
             (other),true,,2,,2000\n"
        );
    }

    #[test]
    fn table_and_json() {
        let t = table(&job());
        assert!(
            t.contains("shared     44 identifiers in the released groups (noised)"),
            "{t}"
        );
        assert!(t.contains("drawn by each of acme and payco"), "{t}");
        assert!(t.contains("(other)  suppressed"), "{t}");
        assert!(t.contains("amount (±"), "{t}");
        let j = job_json(&job());
        assert_eq!(j["result"]["groups"][0]["values"]["amount"], 12345);
        assert_eq!(j["result"]["intersection"], 44);
        assert_eq!(j["result"]["noise"].as_array().unwrap().len(), 4);
        assert_eq!(j["result"]["noise"][1]["column"], "count");
        assert_eq!(j["result"]["noise"][1]["drawn_by"], "payco");
        assert_eq!(j["result"]["noise"][2]["column"], "amount");
        // Two independent draws of scale 2: √2 times one draw's deviation.
        let sd = j["result"]["column_sd"]["count"].as_f64().unwrap();
        assert!((sd - 2f64.sqrt() * laplace_sd("2")).abs() < 1e-9, "{sd}");
        assert!(j["result"].get("keys_with_several_groups").is_none());
        assert!(!print_job(&JobInfo::default(), Format::Json));
    }

    #[test]
    fn laplace_sd_matches_its_formula() {
        // Scale 1: q = e^-1, sd = √(2q)/(1−q) ≈ 1.3570.
        assert!((laplace_sd("1") - 1.3570).abs() < 1e-3);
        assert!((laplace_sd("2/2") - laplace_sd("1")).abs() < 1e-12);
        assert_eq!(laplace_sd("0"), 0.0);
    }
}
