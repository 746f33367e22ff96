//! Rendering jobs and nodes as a table, JSON or CSV.

use cleanroom_coordinator::client::state_name;
use cleanroom_proto::v1::{JobInfo, JobKind, NodeInfo};
use serde_json::{Value, json};

use crate::args::Format;

fn kind_name(kind: i32) -> &'static str {
    match JobKind::try_from(kind) {
        Ok(JobKind::Overlap) => "overlap",
        Ok(JobKind::Match) => "match",
        _ => "unknown",
    }
}

fn time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    match time::OffsetDateTime::from_unix_timestamp(secs) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => ms.to_string(),
    }
}

/// A job as JSON (stable field names, for scripts).
pub fn job_json(job: &JobInfo) -> Value {
    let spec = job.spec.clone().unwrap_or_default();
    json!({
        "job_id": job.job_id,
        "kind": kind_name(spec.kind),
        "state": state_name(job.state),
        "reason": job.reason,
        "purpose": spec.purpose,
        "parties": spec.parties.iter().map(|p| json!({
            "node": p.node, "dataset": p.dataset, "keys": p.keys, "learns_membership": p.learns_membership,
        })).collect::<Vec<_>>(),
        "submitted_by": job.submitted_by,
        "created_ms": job.created_ms,
        "updated_ms": job.updated_ms,
        "intersection": job.results.first().and_then(|r| r.outcome.as_ref()).map(|o| o.intersection),
        "results": job.results.iter().map(|r| {
            let o = r.outcome.clone().unwrap_or_default();
            json!({
                "node": r.node,
                "intersection": o.intersection,
                "own_set_size": o.own_set_size,
                "peer_set_size": o.peer_set_size,
                "rows_read": o.rows_read,
                "rows_rejected": o.rows_rejected,
                "learned_membership": o.learned_membership,
                "matched_rows": o.matched_rows,
                "membership_file": o.membership_file,
            })
        }).collect::<Vec<_>>(),
        "history": job.history.iter().map(|h| json!({
            "state": state_name(h.state), "at_ms": h.at_ms, "reason": h.reason,
        })).collect::<Vec<_>>(),
    })
}

/// Prints one job in the chosen format.
pub fn print_job(job: &JobInfo, format: Format) {
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&job_json(job)).unwrap_or_default()
        ),
        Format::Csv => print_jobs(std::slice::from_ref(job), Format::Csv),
        Format::Table => {
            let spec = job.spec.clone().unwrap_or_default();
            let parties: Vec<String> = spec
                .parties
                .iter()
                .map(|p| format!("{}:{}", p.node, p.dataset))
                .collect();
            let keys = spec
                .parties
                .first()
                .map(|p| p.keys.join(","))
                .unwrap_or_default();
            println!("job        {}", job.job_id);
            println!(
                "kind       {} on {} between {}",
                kind_name(spec.kind),
                keys,
                parties.join(" and ")
            );
            println!("purpose    {}", spec.purpose);
            println!(
                "state      {}{}",
                state_name(job.state),
                if job.reason.is_empty() {
                    String::new()
                } else {
                    format!(" — {}", job.reason)
                }
            );
            println!(
                "submitted  {} by {}",
                time(job.created_ms),
                job.submitted_by
            );
            if let Some(o) = job.results.first().and_then(|r| r.outcome.as_ref()) {
                println!("result     {} shared", o.intersection);
            }
            for r in &job.results {
                let o = r.outcome.clone().unwrap_or_default();
                let membership = if o.learned_membership {
                    format!(
                        "; {} matching rows listed in {} (on the node)",
                        o.matched_rows, o.membership_file
                    )
                } else {
                    String::new()
                };
                println!(
                    "  {:<10} {} distinct keys from {} rows ({} rejected), peer sent {}{}",
                    r.node,
                    o.own_set_size,
                    o.rows_read,
                    o.rows_rejected,
                    o.peer_set_size,
                    membership
                );
            }
            println!("history");
            for h in &job.history {
                println!(
                    "  {}  {:<10} {}",
                    time(h.at_ms),
                    state_name(h.state),
                    h.reason
                );
            }
        }
    }
}

/// Prints a list of jobs.
pub fn print_jobs(jobs: &[JobInfo], format: Format) {
    match format {
        Format::Json => {
            let list: Vec<Value> = jobs.iter().map(job_json).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&list).unwrap_or_default()
            );
        }
        Format::Csv => {
            println!("job_id,kind,state,purpose,parties,intersection,created,reason");
            for j in jobs {
                let v = job_json(j);
                let parties: Vec<String> = j
                    .spec
                    .clone()
                    .unwrap_or_default()
                    .parties
                    .iter()
                    .map(|p| p.node.clone())
                    .collect();
                println!(
                    "{},{},{},{},{},{},{},{}",
                    j.job_id,
                    v["kind"].as_str().unwrap_or_default(),
                    state_name(j.state),
                    csv_field(v["purpose"].as_str().unwrap_or_default()),
                    parties.join(";"),
                    v["intersection"]
                        .as_u64()
                        .map(|n| n.to_string())
                        .unwrap_or_default(),
                    time(j.created_ms),
                    csv_field(&j.reason)
                );
            }
        }
        Format::Table => {
            println!(
                "{:<22} {:<8} {:<10} {:<20} {:>12}  REASON",
                "JOB", "KIND", "STATE", "PARTIES", "SHARED"
            );
            for j in jobs {
                let v = job_json(j);
                let parties: Vec<String> = j
                    .spec
                    .clone()
                    .unwrap_or_default()
                    .parties
                    .iter()
                    .map(|p| p.node.clone())
                    .collect();
                println!(
                    "{:<22} {:<8} {:<10} {:<20} {:>12}  {}",
                    j.job_id,
                    v["kind"].as_str().unwrap_or_default(),
                    state_name(j.state),
                    parties.join(","),
                    v["intersection"]
                        .as_u64()
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "-".into()),
                    j.reason
                );
            }
        }
    }
}

/// Prints the node list.
pub fn print_nodes(nodes: &[NodeInfo], format: Format) {
    match format {
        Format::Json => {
            let list: Vec<Value> = nodes
                .iter()
                .map(|n| json!({"name": n.name, "data_addr": n.data_addr, "connected": n.connected, "last_seen_ms": n.last_seen_ms}))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&list).unwrap_or_default()
            );
        }
        Format::Csv => {
            println!("name,data_addr,connected,last_seen");
            for n in nodes {
                println!(
                    "{},{},{},{}",
                    n.name,
                    n.data_addr,
                    n.connected,
                    time(n.last_seen_ms)
                );
            }
        }
        Format::Table => {
            println!(
                "{:<20} {:<24} {:<10} LAST SEEN",
                "NODE", "DATA PLANE", "CONNECTED"
            );
            for n in nodes {
                println!(
                    "{:<20} {:<24} {:<10} {}",
                    n.name,
                    n.data_addr,
                    if n.connected { "yes" } else { "no" },
                    time(n.last_seen_ms)
                );
            }
        }
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}
