//! Rendering an `aggregate` job: per-group noised totals with their noise scale, suppressed
//! groups marked, as a table, JSON or CSV.

use cleanroom_coordinator::client::state_name;
use cleanroom_proto::v1::{AggregateResult, JobInfo, JobKind};
use serde_json::{Value, json};

use crate::args::Format;

/// Prints `job` if it is an aggregate job and returns true; false for other kinds.
pub fn print_job(job: &JobInfo, format: Format) -> bool {
    let Some(spec) = job.spec.as_ref() else {
        return false;
    };
    if spec.kind != JobKind::Aggregate as i32 {
        return false;
    }
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&job_json(job)).unwrap_or_default()
        ),
        Format::Csv => print!("{}", csv(job)),
        Format::Table => print!("{}", table(job)),
    }
    true
}

/// Standard deviation of the noise in `column`'s totals (0 when exact).
fn noise_sd(result: &AggregateResult, column: &str) -> f64 {
    result
        .noise
        .iter()
        .find(|n| n.column == column)
        .filter(|n| n.noised)
        .map_or(0.0, |n| n.total_sd)
}

/// The job as JSON: the common job fields and an `aggregate` object.
pub fn job_json(job: &JobInfo) -> Value {
    let spec = job.spec.clone().unwrap_or_default();
    let agg = spec.aggregate.clone().unwrap_or_default();
    let result = job.aggregate.as_ref().map(|r| {
        json!({
            "columns": r.columns,
            "min_result": r.min_result,
            "max_colluders": r.max_colluders,
            "zcdp_epsilon": r.zcdp_epsilon,
            "noise": r.noise.iter().map(|n| json!({
                "column": n.column,
                "noised": n.noised,
                "mechanism": if n.noised { "distributed_discrete_gaussian" } else { "none" },
                "share_sigma": n.share_sigma,
                "total_sd": n.total_sd,
                "zcdp_epsilon": n.zcdp_epsilon,
                "sensitivity": n.sensitivity,
            })).collect::<Vec<_>>(),
            "groups": r.groups.iter().map(|g| {
                let values: serde_json::Map<String, Value> = r
                    .columns
                    .iter()
                    .zip(&g.values)
                    .map(|(c, v)| (c.clone(), json!(v)))
                    .collect();
                json!({ "group": g.label, "suppressed": g.suppressed, "values": values })
            }).collect::<Vec<_>>(),
            "parties": r.parties.iter().map(|p| json!({
                "node": p.node,
                "rows_read": p.rows_read,
                "rows_excluded_consent": p.rows_excluded_consent,
                "rows_excluded_deleted": p.rows_excluded_deleted,
                "rows_other": p.rows_other,
                "audit_head": p.audit_head,
                "bytes_to_peers": p.bytes_to_peers,
                "bytes_to_coordinator": p.bytes_to_coordinator,
            })).collect::<Vec<_>>(),
        })
    });
    json!({
        "job_id": job.job_id,
        "kind": "aggregate",
        "state": state_name(job.state),
        "reason": job.reason,
        "purpose": spec.purpose,
        "parties": spec.parties.iter().map(|p| json!({ "node": p.node, "dataset": p.dataset }))
            .collect::<Vec<_>>(),
        "group_by": agg.group_by,
        "sums": agg.sums,
        "count": agg.count,
        "submitted_by": job.submitted_by,
        "created_ms": job.created_ms,
        "updated_ms": job.updated_ms,
        "result": result,
        "history": job.history.iter().map(|h| json!({
            "state": state_name(h.state), "at_ms": h.at_ms, "reason": h.reason,
        })).collect::<Vec<_>>(),
    })
}

/// One row per group: `group,suppressed,<col>,<col>_noise_sd,…` (empty values when suppressed
/// or when the job has no result).
fn csv(job: &JobInfo) -> String {
    let Some(r) = job.aggregate.as_ref() else {
        return format!(
            "job_id,state,reason\n{},{},{}\n",
            job.job_id,
            state_name(job.state),
            field(&job.reason)
        );
    };
    let mut out = String::from("group,suppressed");
    for c in &r.columns {
        out.push_str(&format!(",{},{}_noise_sd", field(c), field(c)));
    }
    out.push('\n');
    for g in &r.groups {
        out.push_str(&format!("{},{}", field(&g.label), g.suppressed));
        for (i, c) in r.columns.iter().enumerate() {
            let value = g.values.get(i).map(i64::to_string).unwrap_or_default();
            out.push_str(&format!(",{value},{:.2}", noise_sd(r, c)));
        }
        out.push('\n');
    }
    out
}

fn table(job: &JobInfo) -> String {
    let spec = job.spec.clone().unwrap_or_default();
    let agg = spec.aggregate.clone().unwrap_or_default();
    let parties: Vec<String> = spec
        .parties
        .iter()
        .map(|p| format!("{}:{}", p.node, p.dataset))
        .collect();
    let mut out = String::new();
    out.push_str(&format!("job        {}\n", job.job_id));
    out.push_str(&format!(
        "kind       aggregate by {} over {} parties ({})\n",
        agg.group_by,
        parties.len(),
        parties.join(", ")
    ));
    out.push_str(&format!("purpose    {}\n", spec.purpose));
    out.push_str(&format!(
        "state      {}{}\n",
        state_name(job.state),
        if job.reason.is_empty() {
            String::new()
        } else {
            format!(" — {}", job.reason)
        }
    ));
    if let Some(r) = job.aggregate.as_ref() {
        if r.noise.iter().any(|n| n.noised) {
            out.push_str(&format!(
                "noise      distributed discrete Gaussian, zCDP ε ≈ {:.3} even if {} parties collude; \
                 ± is one standard deviation\n",
                r.zcdp_epsilon, r.max_colluders
            ));
        } else {
            out.push_str("noise      none (no agreement asks for it): totals are exact\n");
        }
        out.push_str(&format!(
            "suppressed groups whose noised count is below {}\n",
            r.min_result
        ));
        let headers: Vec<String> = r
            .columns
            .iter()
            .map(|c| {
                let sd = noise_sd(r, c);
                if sd > 0.0 {
                    format!("{c} (±{sd:.1})")
                } else {
                    c.clone()
                }
            })
            .collect();
        let label_width = r
            .groups
            .iter()
            .map(|g| g.label.chars().count())
            .chain(std::iter::once(5))
            .max()
            .unwrap_or(5);
        let widths: Vec<usize> = headers
            .iter()
            .enumerate()
            .map(|(i, h)| {
                r.groups
                    .iter()
                    .filter_map(|g| g.values.get(i))
                    .map(|v| v.to_string().len())
                    .chain(std::iter::once(h.chars().count()))
                    .max()
                    .unwrap_or(1)
            })
            .collect();
        out.push_str(&format!("  {:<label_width$}", "group"));
        for (h, w) in headers.iter().zip(&widths) {
            out.push_str(&format!("  {h:>w$}"));
        }
        out.push('\n');
        for g in &r.groups {
            out.push_str(&format!("  {:<label_width$}", g.label));
            if g.suppressed {
                out.push_str("  suppressed (below the minimum result)");
            } else {
                for (v, w) in g.values.iter().zip(&widths) {
                    out.push_str(&format!("  {v:>w$}"));
                }
            }
            out.push('\n');
        }
        for p in &r.parties {
            out.push_str(&format!(
                "  {:<10} {} rows read ({} without consent, {} forgotten, {} in (other)); sent {} B to peers, {} B to the coordinator; audit head {}\n",
                p.node,
                p.rows_read,
                p.rows_excluded_consent,
                p.rows_excluded_deleted,
                p.rows_other,
                p.bytes_to_peers,
                p.bytes_to_coordinator,
                p.audit_head
            ));
        }
    }
    out.push_str("history\n");
    for h in &job.history {
        out.push_str(&format!(
            "  {}  {:<10} {}\n",
            h.at_ms,
            state_name(h.state),
            h.reason
        ));
    }
    out
}

fn field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleanroom_proto::v1::{AggregateGroup, AggregateSpec, ColumnNoise, JobSpec, JobState};

    fn job() -> JobInfo {
        JobInfo {
            job_id: "job-1".into(),
            state: JobState::Succeeded as i32,
            spec: Some(JobSpec {
                kind: JobKind::Aggregate as i32,
                aggregate: Some(AggregateSpec {
                    group_by: "category".into(),
                    groups: vec!["home".into()],
                    sums: vec!["amount".into()],
                    count: true,
                }),
                ..JobSpec::default()
            }),
            aggregate: Some(AggregateResult {
                columns: vec!["count".into(), "amount".into()],
                groups: vec![
                    AggregateGroup {
                        label: "home".into(),
                        suppressed: false,
                        values: vec![42, 12345],
                    },
                    AggregateGroup {
                        label: "(other)".into(),
                        suppressed: true,
                        values: vec![],
                    },
                ],
                noise: vec![ColumnNoise {
                    column: "amount".into(),
                    noised: true,
                    total_sd: 12.5,
                    ..ColumnNoise::default()
                }],
                min_result: 5,
                max_colluders: 2,
                zcdp_epsilon: 1.0,
                show_count: true,
                parties: vec![],
            }),
            ..JobInfo::default()
        }
    }

    #[test]
    fn csv_marks_suppressed_groups_and_noise() {
        assert_eq!(
            csv(&job()),
            "group,suppressed,count,count_noise_sd,amount,amount_noise_sd\n\
             home,false,42,0.00,12345,12.50\n\
             (other),true,,0.00,,12.50\n"
        );
    }

    #[test]
    fn table_and_json() {
        let t = table(&job());
        assert!(t.contains("amount (±12.5)"), "{t}");
        assert!(t.contains("(other)  suppressed"), "{t}");
        let j = job_json(&job());
        assert_eq!(j["result"]["groups"][0]["values"]["amount"], 12345);
        assert_eq!(j["result"]["groups"][1]["suppressed"], true);
        assert!(!print_job(&JobInfo::default(), Format::Json));
    }
}
