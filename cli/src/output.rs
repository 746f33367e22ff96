//! Rendering jobs and nodes as a table, JSON or CSV.

use cleanroom_coordinator::client::state_name;
use cleanroom_proto::v1::{JobInfo, NodeInfo, NoiseTerm, PartySpec, ScheduleInfo, ScheduleRunInfo};
use serde_json::{Value, json};

use crate::args::Format;
use crate::text::{
    csv_field, history_text, keys, kind_name, parties, print_json, state_line, time,
};

/// A job as JSON (stable field names, for scripts).
pub fn job_json(job: &JobInfo) -> Value {
    let spec = job.spec.clone().unwrap_or_default();
    // The reports that carry a released figure (an overlap-sum key holder's carries none).
    let released: Vec<&cleanroom_proto::v1::PsiOutcome> = job
        .results
        .iter()
        .filter_map(|r| r.outcome.as_ref())
        .filter(|o| !cleanroom_coordinator::store::releases_nothing(o))
        .collect();
    json!({
        "job_id": job.job_id,
        "kind": kind_name(spec.kind),
        "state": state_name(job.state),
        "reason": job.reason,
        "purpose": spec.purpose,
        "parties": parties_json(&spec.parties),
        "submitted_by": job.submitted_by,
        "analyst": spec.analyst,
        "created_ms": job.created_ms,
        "updated_ms": job.updated_ms,
        "intersection": released.first().filter(|o| !o.suppressed).map(|o| o.intersection),
        "suppressed": released.iter().any(|o| o.suppressed),
        "noise": job.results.first().and_then(|r| r.outcome.as_ref()).map(|o| noise_json(&o.noise)).unwrap_or_default(),
        "results": job.results.iter().map(|r| {
            let o = r.outcome.clone().unwrap_or_default();
            json!({
                "node": r.node,
                "intersection": o.intersection,
                "own_set_size": o.own_set_size,
                "peer_set_size": o.peer_set_size,
                "learned_membership": o.learned_membership,
                "matched_rows": o.matched_rows,
                "membership_file": o.membership_file,
                "suppressed": o.suppressed,
                "audit_head": o.audit_head,
                "noise": noise_json(&o.noise),
            })
        }).collect::<Vec<_>>(),
        "history": crate::text::history_json(job),
    })
}

/// A spec's parties as JSON.
fn parties_json(parties: &[PartySpec]) -> Vec<Value> {
    parties
        .iter()
        .map(|p| {
            json!({
                "node": p.node, "dataset": p.dataset, "keys": p.keys, "learns_membership": p.learns_membership,
            })
        })
        .collect()
}

/// The noise terms of a released count (empty: exact).
fn noise_json(noise: &[NoiseTerm]) -> Vec<Value> {
    noise
        .iter()
        .map(|t| {
            json!({
                "node": t.node, "mechanism": t.mechanism, "epsilon": t.epsilon,
                "sensitivity": t.sensitivity, "scale": t.scale,
            })
        })
        .collect()
}

/// One line saying how a count was noised: mechanism, sensitivity, each party's ε and scale.
pub fn noise_line(noise: &[NoiseTerm]) -> Option<String> {
    let first = noise.first()?;
    let parts: Vec<String> = noise
        .iter()
        .map(|t| format!("{} ε {} (scale {})", t.node, t.epsilon, t.scale))
        .collect();
    Some(format!(
        "{}, sensitivity {}: {}",
        first.mechanism,
        first.sensitivity,
        parts.join(", ")
    ))
}

/// Prints one job in the chosen format.
pub fn print_job(job: &JobInfo, format: Format) {
    if crate::aggregate_output::print_job(job, format) || crate::sum_output::print_job(job, format)
    {
        return;
    }
    match format {
        Format::Json => print_json(&job_json(job)),
        Format::Csv => print_jobs(std::slice::from_ref(job), Format::Csv),
        Format::Table => {
            let spec = job.spec.clone().unwrap_or_default();
            let (parties, keys) = (parties(&spec), keys(&spec));
            cleanroom_node::outln!("job        {}", job.job_id);
            cleanroom_node::outln!(
                "kind       {} on {} between {}",
                kind_name(spec.kind),
                keys,
                parties.join(" and ")
            );
            cleanroom_node::outln!("purpose    {}", spec.purpose);
            cleanroom_node::outln!("{}", state_line(job));
            cleanroom_node::outln!(
                "submitted  {} by {}",
                time(job.created_ms),
                job.submitted_by
            );
            if let Some(o) = job.results.first().and_then(|r| r.outcome.as_ref()) {
                if o.suppressed {
                    cleanroom_node::outln!(
                        "result     withheld by an agreement (below its minimum result, or not \
                         releasable to the coordinator)"
                    );
                } else if o.noise.is_empty() {
                    cleanroom_node::outln!("result     {} shared", o.intersection);
                } else {
                    cleanroom_node::outln!("result     {} shared (noised)", o.intersection);
                }
                if let Some(line) = noise_line(&o.noise) {
                    cleanroom_node::outln!("noise      {line}");
                }
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
                cleanroom_node::outln!(
                    "  {:<10} {} distinct keys, peer sent {}{}; audit head {}",
                    r.node,
                    o.own_set_size,
                    o.peer_set_size,
                    membership,
                    o.audit_head
                );
            }
            cleanroom_node::out!("{}", history_text(job));
        }
    }
}

/// Prints a list of jobs.
pub fn print_jobs(jobs: &[JobInfo], format: Format) {
    match format {
        Format::Json => {
            let list: Vec<Value> = jobs.iter().map(job_json).collect();
            print_json(&list);
        }
        Format::Csv => {
            cleanroom_node::outln!("job_id,kind,state,purpose,parties,intersection,created,reason");
            for j in jobs {
                let v = job_json(j);
                let parties = party_names(j);
                cleanroom_node::outln!(
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
            cleanroom_node::outln!(
                "{:<22} {:<8} {:<10} {:<20} {:>12}  REASON",
                "JOB",
                "KIND",
                "STATE",
                "PARTIES",
                "SHARED"
            );
            for j in jobs {
                let v = job_json(j);
                let parties = party_names(j);
                cleanroom_node::outln!(
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
            print_json(&list);
        }
        Format::Csv => {
            cleanroom_node::outln!("name,data_addr,connected,last_seen");
            for n in nodes {
                cleanroom_node::outln!(
                    "{},{},{},{}",
                    n.name,
                    n.data_addr,
                    n.connected,
                    time(n.last_seen_ms)
                );
            }
        }
        Format::Table => {
            cleanroom_node::outln!(
                "{:<20} {:<24} {:<10} LAST SEEN",
                "NODE",
                "DATA PLANE",
                "CONNECTED"
            );
            for n in nodes {
                cleanroom_node::outln!(
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

fn opt_time(ms: i64) -> String {
    if ms == 0 { "-".to_owned() } else { time(ms) }
}

/// A schedule as JSON (stable field names, for scripts).
pub fn schedule_json(s: &ScheduleInfo) -> Value {
    let spec = s.spec.clone().unwrap_or_default();
    json!({
        "name": s.name,
        "cron": s.cron,
        "timezone": s.timezone,
        "kind": kind_name(spec.kind),
        "purpose": spec.purpose,
        "parties": parties_json(&spec.parties),
        "owner": s.owner,
        "paused": s.paused,
        "removed": s.removed_ms != 0,
        "created_ms": s.created_ms,
        "next_run_ms": (s.next_run_ms != 0).then_some(s.next_run_ms),
        "last_fired_ms": (s.last_fired_ms != 0).then_some(s.last_fired_ms),
        "removed_ms": (s.removed_ms != 0).then_some(s.removed_ms),
        "max_retries": s.max_retries,
        "backoff_base_secs": s.backoff_base_secs,
        "on_done": (!s.on_done.is_empty()).then_some(&s.on_done),
        "notify_dir": (!s.notify_dir.is_empty()).then_some(&s.notify_dir),
        "runs": s.runs.iter().map(|r| json!({
            "scheduled_for_ms": r.scheduled_for_ms,
            "attempt": r.attempt,
            "job_id": (!r.job_id.is_empty()).then_some(&r.job_id),
            "status": r.status,
            "state": run_state(r),
            "reason": r.job_reason,
            "note": r.note,
            "intersection": r.has_intersection.then_some(r.intersection),
        })).collect::<Vec<_>>(),
    })
}

/// A run's job state, or the run's status when it has no job.
fn run_state(r: &ScheduleRunInfo) -> &str {
    if r.job_id.is_empty() {
        r.status.as_str()
    } else {
        state_name(r.job_state)
    }
}

/// The schedule's time zone (`UTC` when none is set).
fn timezone(s: &ScheduleInfo) -> &str {
    if s.timezone.is_empty() {
        "UTC"
    } else {
        &s.timezone
    }
}

fn schedule_status(s: &ScheduleInfo) -> &'static str {
    if s.removed_ms != 0 {
        "removed"
    } else if s.paused {
        "paused"
    } else {
        "active"
    }
}

/// Prints one schedule (with its runs, if any) in the chosen format.
pub fn print_schedule(s: &ScheduleInfo, format: Format) {
    match format {
        Format::Json => print_json(&schedule_json(s)),
        Format::Csv if s.runs.is_empty() => print_schedules(std::slice::from_ref(s), Format::Csv),
        Format::Csv => {
            cleanroom_node::outln!(
                "schedule,scheduled_for,attempt,job_id,state,intersection,note,reason"
            );
            for r in &s.runs {
                cleanroom_node::outln!(
                    "{},{},{},{},{},{},{},{}",
                    s.name,
                    time(r.scheduled_for_ms),
                    r.attempt,
                    r.job_id,
                    run_state(r),
                    if r.has_intersection {
                        r.intersection.to_string()
                    } else {
                        String::new()
                    },
                    csv_field(&r.note),
                    csv_field(&r.job_reason)
                );
            }
        }
        Format::Table => {
            let spec = s.spec.clone().unwrap_or_default();
            let (parties, keys) = (parties(&spec), keys(&spec));
            cleanroom_node::outln!("schedule   {} ({})", s.name, schedule_status(s));
            cleanroom_node::outln!("cron       {} ({})", s.cron, timezone(s));
            cleanroom_node::outln!(
                "job        {} on {} between {}",
                kind_name(spec.kind),
                keys,
                parties.join(" and ")
            );
            cleanroom_node::outln!("purpose    {}", spec.purpose);
            if !s.on_done.is_empty() {
                cleanroom_node::outln!("on done    {}", s.on_done);
            }
            if !s.notify_dir.is_empty() {
                cleanroom_node::outln!("notify     {}", s.notify_dir);
            }
            cleanroom_node::outln!("owner      {}", s.owner);
            cleanroom_node::outln!(
                "retries    up to {}, backoff {}s doubling",
                s.max_retries,
                s.backoff_base_secs
            );
            cleanroom_node::outln!("next run   {}", opt_time(s.next_run_ms));
            cleanroom_node::outln!("last fired {}", opt_time(s.last_fired_ms));
            if !s.runs.is_empty() {
                cleanroom_node::outln!("runs");
                cleanroom_node::outln!(
                    "  {:<21} {:>3} {:<22} {:<13} {:>12}  NOTE / REASON",
                    "SCHEDULED FOR",
                    "TRY",
                    "JOB",
                    "STATE",
                    "SHARED"
                );
                for r in &s.runs {
                    let why = if r.job_reason.is_empty() {
                        r.note.clone()
                    } else {
                        format!("{} — {}", r.note, r.job_reason)
                    };
                    cleanroom_node::outln!(
                        "  {:<21} {:>3} {:<22} {:<13} {:>12}  {}",
                        time(r.scheduled_for_ms),
                        r.attempt,
                        if r.job_id.is_empty() { "-" } else { &r.job_id },
                        run_state(r),
                        if r.has_intersection {
                            r.intersection.to_string()
                        } else {
                            "-".into()
                        },
                        why
                    );
                }
            }
        }
    }
}

/// Prints a list of schedules.
pub fn print_schedules(list: &[ScheduleInfo], format: Format) {
    match format {
        Format::Json => {
            let list: Vec<Value> = list.iter().map(schedule_json).collect();
            print_json(&list);
        }
        Format::Csv => {
            cleanroom_node::outln!(
                "name,status,cron,timezone,kind,parties,purpose,next_run,last_fired,max_retries,backoff_secs"
            );
            for s in list {
                let spec = s.spec.clone().unwrap_or_default();
                let parties: Vec<&str> = spec.parties.iter().map(|p| p.node.as_str()).collect();
                cleanroom_node::outln!(
                    "{},{},{},{},{},{},{},{},{},{},{}",
                    s.name,
                    schedule_status(s),
                    csv_field(&s.cron),
                    s.timezone,
                    kind_name(spec.kind),
                    parties.join(";"),
                    csv_field(&spec.purpose),
                    opt_time(s.next_run_ms),
                    opt_time(s.last_fired_ms),
                    s.max_retries,
                    s.backoff_base_secs
                );
            }
        }
        Format::Table => {
            cleanroom_node::outln!(
                "{:<20} {:<8} {:<16} {:<14} {:<8} {:<16} NEXT RUN",
                "SCHEDULE",
                "STATUS",
                "CRON",
                "TIMEZONE",
                "KIND",
                "PARTIES"
            );
            for s in list {
                let spec = s.spec.clone().unwrap_or_default();
                let parties: Vec<&str> = spec.parties.iter().map(|p| p.node.as_str()).collect();
                cleanroom_node::outln!(
                    "{:<20} {:<8} {:<16} {:<14} {:<8} {:<16} {}",
                    s.name,
                    schedule_status(s),
                    s.cron,
                    timezone(s),
                    kind_name(spec.kind),
                    parties.join(","),
                    opt_time(s.next_run_ms)
                );
            }
        }
    }
}

/// The job's party node names, in order.
fn party_names(job: &JobInfo) -> Vec<String> {
    job.spec
        .as_ref()
        .map(|s| s.parties.iter().map(|p| p.node.clone()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleanroom_proto::v1::{PartyResult, PsiOutcome};

    fn term(node: &str, epsilon: f64, scale: &str) -> NoiseTerm {
        NoiseTerm {
            node: node.into(),
            mechanism: "discrete_laplace".into(),
            epsilon,
            sensitivity: 1,
            scale: scale.into(),
        }
    }

    #[test]
    fn noised_results_show_mechanism_epsilon_and_scale() {
        let noise = vec![term("acme", 0.5, "2"), term("globex", 1.0, "1")];
        assert_eq!(
            noise_line(&noise).unwrap(),
            "discrete_laplace, sensitivity 1: acme ε 0.5 (scale 2), globex ε 1 (scale 1)"
        );
        assert_eq!(noise_line(&[]), None);
        let job = JobInfo {
            job_id: "job-1".into(),
            results: vec![PartyResult {
                node: "acme".into(),
                outcome: Some(PsiOutcome {
                    intersection: 97,
                    noise,
                    ..PsiOutcome::default()
                }),
            }],
            ..JobInfo::default()
        };
        let v = job_json(&job);
        assert_eq!(v["intersection"], 97);
        assert_eq!(v["noise"][0]["mechanism"], "discrete_laplace");
        assert_eq!(v["noise"][1]["epsilon"], 1.0);
        assert_eq!(v["results"][0]["noise"][0]["scale"], "2");
        // An exact result has an empty noise list.
        let exact = JobInfo {
            results: vec![PartyResult {
                node: "acme".into(),
                outcome: Some(PsiOutcome::default()),
            }],
            ..JobInfo::default()
        };
        assert_eq!(job_json(&exact)["noise"], json!([]));
    }

    /// Every table rendering (overlap, overlap-sum, aggregate) ends with the history, its times
    /// written as dates, not Unix milliseconds.
    #[test]
    fn histories_print_times() {
        let job = JobInfo {
            history: vec![cleanroom_proto::v1::StateChange {
                state: cleanroom_proto::v1::JobState::Succeeded as i32,
                at_ms: 1_782_864_000_123,
                reason: "done".into(),
            }],
            ..JobInfo::default()
        };
        let text = history_text(&job);
        assert!(
            text.contains("2026-07-01 00:00:00Z  succeeded  done"),
            "{text}"
        );
        assert!(!text.contains("1782864000123"), "{text}");
    }
}
