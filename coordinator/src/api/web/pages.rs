//! The console's HTML pages (maud). Every page asks [`crate::api::analyst::answer`] for its
//! data, as the CLI asks the QUIC API, so a page shows what the analyst may see and nothing
//! else. Pages of unfinished jobs reload themselves every few seconds (no script needed); the
//! charts are inline SVG ([`super::chart`]); nothing is loaded from the network.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use cleanroom_proto::v1::analyst_request::Request as Req;
use cleanroom_proto::v1::analyst_response::Response as Resp;
use cleanroom_proto::v1::{
    AggregateSpec, GetJob, GetReport, JobInfo, JobKind, JobSpec, JobState, ListJobs, ListNodes,
    ListSchedules, PartySpec, PsiOutcome, RetryJob, SubmitJob,
};
use jiff::tz::TimeZone;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;

use super::Analyst;
use super::chart::{format_value, trend_svg};
use super::json::refusal_status;
use crate::api::analyst::answer;
use crate::client::state_name;
use crate::metrics::kind_name;
use crate::report::{ScheduleReport, format_with, zone};
use crate::shared::Shared;

/// The pages' routes.
pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/jobs") }))
        .route("/jobs", get(jobs))
        .route("/jobs/new", get(new_job).post(submit))
        .route("/jobs/{id}", get(job))
        .route("/jobs/{id}/retry", post(retry))
        .route("/nodes", get(nodes))
        .route("/schedules", get(schedules))
        .route("/schedules/{name}", get(schedule))
        .route("/matrix", get(matrix))
}

const STYLE: &str = r#"
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2933;background:#f7f8fa}
header{background:#1e293b;color:#fff;padding:10px 24px;display:flex;gap:24px;align-items:center}
header a{color:#cbd5e1;text-decoration:none;font-weight:500}header a:hover{color:#fff}
header .who{margin-left:auto;color:#94a3b8;font-size:14px}
main{padding:20px 24px;max-width:1200px}
h1{font-size:22px;margin:4px 0 14px}h2{font-size:17px;margin:22px 0 8px}
table{border-collapse:collapse;background:#fff;width:100%;font-size:14px}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #e5e7eb;vertical-align:top}
th{background:#f1f5f9;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.s-succeeded{background:#dcfce7;color:#166534}.s-failed{background:#fee2e2;color:#991b1b}
.s-vetoed{background:#ffedd5;color:#9a3412}.s-cancelled{background:#e5e7eb;color:#374151}
.s-pending,.s-offered,.s-running{background:#dbeafe;color:#1e40af}
.steps{display:flex;gap:3px}.steps span{width:22px;height:6px;border-radius:3px;background:#e5e7eb}
.steps span.done{background:#3b82f6}.steps span.end-failed{background:#ef4444}.steps span.end-vetoed{background:#f97316}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:8px 0}.card{background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:10px 14px;min-width:140px}
.card .l{font-size:12px;color:#64748b}.card .v{font-size:20px;font-weight:600}
.err{background:#fee2e2;color:#991b1b;padding:8px 12px;border-radius:6px}
form.box{background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:14px;display:grid;grid-template-columns:180px 320px;gap:8px 12px;align-items:center}
input,select{padding:5px;font-size:14px}button{padding:6px 14px;font-size:14px;background:#2563eb;color:#fff;border:0;border-radius:4px;cursor:pointer}
.muted{color:#64748b;font-size:13px}.chart{background:#fff;border:1px solid #e5e7eb;border-radius:6px;display:inline-block}
"#;

fn layout(title: &str, analyst: &Analyst, refresh: Option<u32>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                // No favicon request (it would be a 404 in the browser console).
                link rel="icon" href="data:,";
                @if let Some(s) = refresh { meta http-equiv="refresh" content=(s); }
                title { (title) " · cleanroom" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    strong { "cleanroom" }
                    a href="/jobs" { "Jobs" }
                    a href="/jobs/new" { "Submit" }
                    a href="/schedules" { "Schedules" }
                    a href="/matrix" { "Overlap matrix" }
                    a href="/nodes" { "Nodes" }
                    span.who { "analyst " (analyst.0.name) }
                }
                main { (body) }
            }
        }
    }
}

fn time(ms: i64) -> String {
    if ms <= 0 {
        return "—".to_owned();
    }
    format_with(ms, &TimeZone::UTC, "%Y-%m-%d %H:%M:%S UTC")
}

fn badge(state: i32) -> Markup {
    let name = state_name(state);
    html! { span class={"badge s-" (name)} { (name) } }
}

fn finished(state: i32) -> bool {
    matches!(
        JobState::try_from(state),
        Ok(JobState::Succeeded | JobState::Failed | JobState::Vetoed | JobState::Cancelled)
    )
}

/// Four steps: submitted, offered, running, ended.
fn progress(job: &JobInfo) -> Markup {
    let reached = |s: JobState| job.history.iter().any(|h| h.state == s as i32);
    let end = JobState::try_from(job.state).unwrap_or(JobState::Unspecified);
    let steps = [
        true,
        reached(JobState::Offered) || finished(job.state),
        reached(JobState::Running) || end == JobState::Succeeded,
        finished(job.state),
    ];
    let end_class = match end {
        JobState::Failed | JobState::Cancelled => "end-failed",
        JobState::Vetoed => "end-vetoed",
        _ => "done",
    };
    html! {
        span.steps title=(state_name(job.state)) {
            @for (i, done) in steps.iter().enumerate() {
                @if i == 3 && *done { span class=(end_class) {} }
                @else if *done { span.done {} } @else { span {} }
            }
        }
    }
}

fn parties(spec: Option<&JobSpec>) -> String {
    spec.map(|s| {
        s.parties
            .iter()
            .map(|p| format!("{}:{}", p.node, p.dataset))
            .collect::<Vec<_>>()
            .join(" ↔ ")
    })
    .unwrap_or_default()
}

fn refused(analyst: &Analyst, status: StatusCode, message: &str) -> Response {
    (
        status,
        layout(
            "Refused",
            analyst,
            None,
            html! { h1 { "Refused" } p.err { (message) } },
        ),
    )
        .into_response()
}

/// Asks the analyst API; a refusal becomes an error page.
async fn ask(
    shared: &Arc<Shared>,
    analyst: &Analyst,
    job_id: &str,
    request: Req,
) -> Result<Resp, Response> {
    match answer(shared, &analyst.1, &analyst.0, job_id, request).await {
        Ok(Resp::Error(message)) => Err(refused(analyst, refusal_status(&message), &message)),
        Ok(r) => Ok(r),
        Err(crate::error::CoordinatorError::Refused(message)) => {
            Err(refused(analyst, refusal_status(&message), &message))
        }
        Err(crate::error::CoordinatorError::Forbidden(message)) => {
            Err(refused(analyst, StatusCode::FORBIDDEN, &message))
        }
        Err(e) => Err(refused(
            analyst,
            StatusCode::INTERNAL_SERVER_ERROR,
            &e.to_string(),
        )),
    }
}

fn unexpected(analyst: &Analyst) -> Response {
    refused(
        analyst,
        StatusCode::INTERNAL_SERVER_ERROR,
        "the coordinator answered with something unexpected",
    )
}

async fn jobs(
    State(shared): State<Arc<Shared>>,
    Extension(analyst): Extension<Analyst>,
) -> Response {
    let list = match ask(&shared, &analyst, "", Req::List(ListJobs { limit: 200 })).await {
        Ok(Resp::Jobs(list)) => list.jobs,
        Ok(_) => return unexpected(&analyst),
        Err(r) => return r,
    };
    let live = list.iter().any(|j| !finished(j.state));
    layout(
        "Jobs",
        &analyst,
        live.then_some(3),
        html! {
            h1 { "Jobs" }
            p.muted { (list.len()) " most recent jobs, newest first"
                @if live { " · this page reloads every 3 s while a job is under way" } }
            table id="jobs" {
                thead { tr { th { "Job" } th { "Kind" } th { "Parties" } th { "State" } th { "Progress" }
                    th { "Submitted by" } th { "Created" } th { "Last change" } } }
                tbody {
                    @for j in &list {
                        tr data-job=(j.job_id) {
                            td { a href={"/jobs/" (j.job_id)} { code { (j.job_id) } } }
                            td { (kind_name(j.spec.as_ref().map_or(0, |s| s.kind))) }
                            td { (parties(j.spec.as_ref())) }
                            td.state { (badge(j.state)) }
                            td { (progress(j)) }
                            td { (j.submitted_by) }
                            td { (time(j.created_ms)) }
                            td { (time(j.updated_ms)) }
                        }
                    }
                }
            }
        },
    )
    .into_response()
}

fn rate(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "—".to_owned();
    }
    format_value(part as f64 * 100.0 / whole as f64, true)
}

fn outcome_rows(job: &JobInfo) -> Markup {
    let outcomes: Vec<(&str, &PsiOutcome)> = job
        .results
        .iter()
        .filter_map(|r| r.outcome.as_ref().map(|o| (r.node.as_str(), o)))
        .collect();
    html! {
        @if !outcomes.is_empty() {
            h2 { "Result" }
            table id="result" {
                thead { tr { th { "Node" } th.num { "Intersection" } th.num { "Own set" } th.num { "Peer set" }
                    th.num { "Rate of own set" } th.num { "Rate of peer set" } th { "Membership" } } }
                tbody {
                    @for (node, o) in &outcomes {
                        tr {
                            td { (node) }
                            @if o.suppressed {
                                td.num colspan="5" { "withheld by the node's agreement" }
                            } @else {
                                td.num { (format_value(o.intersection as f64, false)) }
                                td.num { (format_value(o.own_set_size as f64, false)) }
                                td.num { (format_value(o.peer_set_size as f64, false)) }
                                td.num { (rate(o.intersection, o.own_set_size)) }
                                td.num { (rate(o.intersection, o.peer_set_size)) }
                                td { @if o.learned_membership { (o.matched_rows) " rows, written on the node" } @else { "—" } }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn aggregate_rows(job: &JobInfo) -> Markup {
    html! {
        @if let Some(agg) = &job.aggregate {
            h2 { "Result" }
            p.muted { "Released with min result " (agg.min_result)
                @if agg.zcdp_epsilon > 0.0 { " · ε (zCDP) " (format!("{:.3}", agg.zcdp_epsilon)) }
                " · " (agg.total_groups.max(agg.groups.len() as u64)) " groups (the JSON API pages through all of them)" }
            table id="aggregate" {
                thead { tr { th { "Group" } @for c in &agg.columns { th.num { (c) } } } }
                tbody {
                    @for g in agg.groups.iter().take(200) {
                        tr {
                            td { (g.label) }
                            @if g.suppressed { td.num colspan=(agg.columns.len().max(1)) { "suppressed" } }
                            @else { @for v in &g.values { td.num { (format_value(*v as f64, false)) } } }
                        }
                    }
                }
            }
        }
    }
}

async fn job(
    State(shared): State<Arc<Shared>>,
    Extension(analyst): Extension<Analyst>,
    Path(id): Path<String>,
) -> Response {
    let job = match ask(&shared, &analyst, &id, Req::Get(GetJob {})).await {
        Ok(Resp::Job(job)) => job,
        Ok(_) => return unexpected(&analyst),
        Err(r) => return r,
    };
    let retryable = matches!(
        JobState::try_from(job.state),
        Ok(JobState::Failed | JobState::Vetoed | JobState::Cancelled)
    );
    let spec = job.spec.clone().unwrap_or_default();
    layout(
        &format!("Job {}", job.job_id),
        &analyst,
        (!finished(job.state)).then_some(2),
        html! {
            h1 { "Job " code { (job.job_id) } " " span id="state" { (badge(job.state)) } }
            div.cards {
                div.card { div.l { "Kind" } div.v { (kind_name(spec.kind)) } }
                div.card { div.l { "Progress" } div.v { (progress(&job)) } }
                div.card { div.l { "Submitted by" } div.v { (job.submitted_by) } }
                div.card { div.l { "Created" } div.v style="font-size:15px" { (time(job.created_ms)) } }
            }
            @if !job.reason.is_empty() { p id="reason" { (job.reason) } }
            @if retryable {
                form method="post" action={"/jobs/" (job.job_id) "/retry"} {
                    button id="retry" type="submit" { "Retry this job" }
                }
            }
            h2 { "Spec" }
            table {
                thead { tr { th { "Node" } th { "Dataset" } th { "Join keys" } th { "Learns membership" } } }
                tbody { @for p in &spec.parties { tr { td { (p.node) } td { (p.dataset) } td { (p.keys.join("+")) }
                    td { @if p.learns_membership { "yes" } @else { "no" } } } } }
            }
            p.muted { "Purpose: " (spec.purpose) }
            (outcome_rows(&job))
            (aggregate_rows(&job))
            h2 { "History" }
            table id="history" {
                thead { tr { th { "When" } th { "State" } th.num { "After" } th { "Reason" } } }
                tbody {
                    @for h in &job.history {
                        tr { td { (time(h.at_ms)) } td { (badge(h.state)) }
                            td.num { (format!("{:.1} s", (h.at_ms - job.created_ms).max(0) as f64 / 1000.0)) }
                            td { (h.reason) } }
                    }
                }
            }
        },
    )
    .into_response()
}

async fn retry(
    State(shared): State<Arc<Shared>>,
    Extension(analyst): Extension<Analyst>,
    Path(id): Path<String>,
) -> Response {
    match ask(&shared, &analyst, &id, Req::Retry(RetryJob::default())).await {
        Ok(Resp::Job(job)) => Redirect::to(&format!("/jobs/{}", job.job_id)).into_response(),
        Ok(_) => unexpected(&analyst),
        Err(r) => r,
    }
}

/// The submission form's fields.
#[derive(Debug, Default, Deserialize)]
pub struct SubmitForm {
    kind: String,
    node_a: String,
    dataset_a: String,
    node_b: String,
    dataset_b: String,
    keys: String,
    purpose: String,
    #[serde(default)]
    group_by: String,
    #[serde(default)]
    groups: String,
    #[serde(default)]
    sums: String,
    #[serde(default)]
    idempotency_key: String,
}

fn split(list: &str) -> Vec<String> {
    list.split([',', '+'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The job spec of a filled-in form (the coordinator validates it as any other).
pub fn spec_of(form: &SubmitForm) -> Result<JobSpec, String> {
    let kind = match form.kind.as_str() {
        "overlap" => JobKind::Overlap,
        "match" => JobKind::Match,
        "aggregate" => JobKind::Aggregate,
        other => {
            return Err(format!(
                "unknown kind '{other}' (overlap, match or aggregate)"
            ));
        }
    };
    let keys = split(&form.keys);
    let party = |node: &str, dataset: &str| PartySpec {
        node: node.trim().to_owned(),
        dataset: dataset.trim().to_owned(),
        keys: keys.clone(),
        learns_membership: kind == JobKind::Match,
    };
    let aggregate = (kind == JobKind::Aggregate).then(|| AggregateSpec {
        group_by: form.group_by.trim().to_owned(),
        groups: split(&form.groups),
        sums: split(&form.sums),
        count: true,
        ..Default::default()
    });
    Ok(JobSpec {
        kind: kind as i32,
        parties: vec![
            party(&form.node_a, &form.dataset_a),
            party(&form.node_b, &form.dataset_b),
        ],
        purpose: form.purpose.trim().to_owned(),
        aggregate,
        overlap_sum: None,
        // The coordinator sets the submitting analyst from the certificate.
        analyst: String::new(),
    })
}

fn submit_form(
    analyst: &Analyst,
    form: &SubmitForm,
    error: Option<&str>,
    nodes: &[String],
) -> Markup {
    let kinds = ["overlap", "match", "aggregate"];
    layout(
        "Submit a job",
        analyst,
        None,
        html! {
            h1 { "Submit a job" }
            @if let Some(e) = error { p.err id="error" { (e) } }
            form.box method="post" action="/jobs/new" {
                label for="kind" { "Kind" }
                select id="kind" name="kind" { @for k in kinds { option value=(k) selected[form.kind == k] { (k) } } }
                label for="node_a" { "First party (initiator)" }
                input id="node_a" name="node_a" value=(form.node_a) list="nodes" required placeholder="node";
                label for="dataset_a" { "Its dataset" }
                input id="dataset_a" name="dataset_a" value=(form.dataset_a) required placeholder="customers";
                label for="node_b" { "Second party" }
                input id="node_b" name="node_b" value=(form.node_b) list="nodes" required placeholder="node";
                label for="dataset_b" { "Its dataset" }
                input id="dataset_b" name="dataset_b" value=(form.dataset_b) required placeholder="customers";
                label for="keys" { "Join keys" }
                input id="keys" name="keys" value=(form.keys) placeholder="email or email+phone";
                label for="purpose" { "Purpose" }
                input id="purpose" name="purpose" value=(form.purpose) required placeholder="as in the agreements";
                label for="group_by" { "Group by (aggregate)" }
                input id="group_by" name="group_by" value=(form.group_by);
                label for="groups" { "Groups (aggregate)" }
                input id="groups" name="groups" value=(form.groups) placeholder="north,south";
                label for="sums" { "Sum columns (aggregate)" }
                input id="sums" name="sums" value=(form.sums) placeholder="spend";
                label for="idempotency_key" { "Idempotency key (optional)" }
                input id="idempotency_key" name="idempotency_key" value=(form.idempotency_key);
                span {}
                button id="submit" type="submit" { "Submit" }
            }
            datalist id="nodes" { @for n in nodes { option value=(n) {} } }
            p.muted { "Overlap-sum and overlap-matrix jobs: use the CLI or the JSON API (docs/API.md)." }
        },
    )
}

async fn node_names(shared: &Arc<Shared>, analyst: &Analyst) -> Vec<String> {
    match answer(shared, &analyst.1, &analyst.0, "", Req::Nodes(ListNodes {})).await {
        Ok(Resp::Nodes(list)) => list.nodes.into_iter().map(|n| n.name).collect(),
        _ => Vec::new(),
    }
}

async fn new_job(
    State(shared): State<Arc<Shared>>,
    Extension(analyst): Extension<Analyst>,
) -> Response {
    let nodes = node_names(&shared, &analyst).await;
    let form = SubmitForm {
        kind: "overlap".into(),
        keys: "email".into(),
        ..Default::default()
    };
    submit_form(&analyst, &form, None, &nodes).into_response()
}

async fn submit(
    State(shared): State<Arc<Shared>>,
    Extension(analyst): Extension<Analyst>,
    Form(form): Form<SubmitForm>,
) -> Response {
    let fail = |message: String, nodes: Vec<String>| {
        (
            StatusCode::BAD_REQUEST,
            submit_form(&analyst, &form, Some(&message), &nodes),
        )
            .into_response()
    };
    let spec = match spec_of(&form) {
        Ok(spec) => spec,
        Err(e) => return fail(e, node_names(&shared, &analyst).await),
    };
    let request = Req::Submit(SubmitJob {
        spec: Some(spec),
        idempotency_key: form.idempotency_key.trim().to_owned(),
    });
    match answer(&shared, &analyst.1, &analyst.0, "", request).await {
        Ok(Resp::Job(job)) => Redirect::to(&format!("/jobs/{}", job.job_id)).into_response(),
        Ok(Resp::Error(e)) => fail(e, node_names(&shared, &analyst).await),
        Ok(_) => unexpected(&analyst),
        Err(e) => fail(e.to_string(), node_names(&shared, &analyst).await),
    }
}

async fn nodes(
    State(shared): State<Arc<Shared>>,
    Extension(analyst): Extension<Analyst>,
) -> Response {
    let list = match ask(&shared, &analyst, "", Req::Nodes(ListNodes {})).await {
        Ok(Resp::Nodes(list)) => list.nodes,
        Ok(_) => return unexpected(&analyst),
        Err(r) => return r,
    };
    layout(
        "Nodes",
        &analyst,
        Some(10),
        html! {
            h1 { "Nodes" }
            table id="nodes" {
                thead { tr { th { "Node" } th { "Connected" } th { "Data plane" } th { "Last seen" } } }
                tbody { @for n in &list { tr { td { (n.name) }
                    td { @if n.connected { span.badge.s-succeeded { "connected" } } @else { span.badge.s-cancelled { "gone" } } }
                    td { code { (n.data_addr) } } td { (time(n.last_seen_ms)) } } } }
            }
        },
    )
    .into_response()
}

async fn schedules(
    State(shared): State<Arc<Shared>>,
    Extension(analyst): Extension<Analyst>,
) -> Response {
    let list = match ask(&shared, &analyst, "", Req::ListSchedules(ListSchedules {})).await {
        Ok(Resp::Schedules(list)) => list.schedules,
        Ok(_) => return unexpected(&analyst),
        Err(r) => return r,
    };
    layout(
        "Schedules",
        &analyst,
        None,
        html! {
            h1 { "Schedules" }
            @if list.is_empty() { p.muted { "No schedules. Add one with `cleanroom schedule add` or POST /api/v1/schedules." } }
            table id="schedules" {
                thead { tr { th { "Schedule" } th { "Cron" } th { "Time zone" } th { "Kind" } th { "Parties" } th { "Owner" } th { "Next run" } th { "State" } } }
                tbody { @for s in &list { tr {
                    td { a href={"/schedules/" (s.name)} { (s.name) } }
                    td { code { (s.cron) } } td { (s.timezone) }
                    td { (kind_name(s.spec.as_ref().map_or(0, |x| x.kind))) }
                    td { (parties(s.spec.as_ref())) } td { (s.owner) }
                    td { (format_with(s.next_run_ms, &zone(&s.timezone), "%Y-%m-%d %H:%M %Z")) }
                    td { @if s.paused { "paused" } @else { "active" } }
                } } }
            }
        },
    )
    .into_response()
}

async fn schedule(
    State(shared): State<Arc<Shared>>,
    Extension(analyst): Extension<Analyst>,
    Path(name): Path<String>,
) -> Response {
    let request = Req::Report(GetReport {
        name: name.clone(),
        since_ms: 0,
    });
    let report = match ask(&shared, &analyst, "", request).await {
        Ok(Resp::ReportJson(text)) => match ScheduleReport::from_json(&text) {
            Ok(r) => r,
            Err(_) => return unexpected(&analyst),
        },
        Ok(_) => return unexpected(&analyst),
        Err(r) => return r,
    };
    let tz = zone(&report.timezone);
    let counts: Vec<(i64, f64)> = report.released().map(|(t, v)| (t, v as f64)).collect();
    let rates: Vec<(i64, f64)> = report
        .runs
        .iter()
        .filter_map(|r| {
            let (v, own) = (r.intersection?, r.smaller_set?);
            (own > 0).then(|| (r.scheduled_for_ms, v as f64 * 100.0 / own as f64))
        })
        .collect();
    let summary = report.summary();
    let day = |ms: i64| format_with(ms, &tz, "%Y-%m-%d");
    let range = match (report.runs.first(), report.runs.last()) {
        (Some(a), Some(b)) => format!("{} to {}", day(a.scheduled_for_ms), day(b.scheduled_for_ms)),
        _ => "no runs yet".to_owned(),
    };
    layout(
        &format!("Schedule {name}"),
        &analyst,
        None,
        html! {
            h1 { "Schedule " (report.schedule) }
            p.muted id="range" { (report.kind) " between " (parties_of_report(&report)) " · " code { (report.cron) } " " (report.timezone)
                " · runs " (range) }
            div.cards {
                div.card { div.l { "Jobs" } div.v { (summary.jobs) } }
                div.card { div.l { "Succeeded" } div.v { (summary.succeeded) } }
                div.card { div.l { "Failed or vetoed" } div.v { (summary.failed_or_vetoed) } }
                div.card { div.l { "Latest" } div.v { (summary.last_value.map_or("—".to_owned(), |v| format_value(v as f64, false))) } }
                div.card { div.l { "Previous" } div.v { (summary.previous_value.map_or("—".to_owned(), |v| format_value(v as f64, false))) } }
            }
            h2 { "Released intersection" }
            @match trend_svg(&counts, &tz, false) {
                Some(svg) => div.chart id="count-chart" { (PreEscaped(svg)) },
                None => p.muted { "No released value yet." },
            }
            @if !rates.is_empty() {
                h2 { "Overlap rate (intersection ÷ the smaller set)" }
                @if let Some(svg) = trend_svg(&rates, &tz, true) { div.chart id="rate-chart" { (PreEscaped(svg)) } }
            }
            h2 { "Runs" }
            table id="runs" {
                thead { tr { th { "Scheduled for" } th { "Attempt" } th { "Job" } th { "Status" } th.num { "Intersection" }
                    th.num { "Smaller set" } th.num { "Rate" } th { "Why" } } }
                tbody { @for r in &report.runs { tr {
                    td { (r.scheduled_for) } td { (r.attempt) }
                    td { @if let Some(j) = &r.job_id { a href={"/jobs/" (j)} { code { (j) } } } }
                    td { (r.status) }
                    td.num { (r.intersection.map_or("—".to_owned(), |v| format_value(v as f64, false))) }
                    td.num { (r.smaller_set.map_or("—".to_owned(), |v| format_value(v as f64, false))) }
                    td.num { (match (r.intersection, r.smaller_set) { (Some(v), Some(s)) => rate(v, s), _ => "—".to_owned() }) }
                    td { (r.reason) " " span.muted { (r.note) } }
                } } }
            }
        },
    )
    .into_response()
}

fn parties_of_report(report: &ScheduleReport) -> String {
    report
        .parties
        .iter()
        .map(|p| format!("{}:{}", p.node, p.dataset))
        .collect::<Vec<_>>()
        .join(" and ")
}

async fn matrix(
    State(shared): State<Arc<Shared>>,
    Extension(analyst): Extension<Analyst>,
) -> Response {
    let list = match ask(&shared, &analyst, "", Req::List(ListJobs { limit: 1000 })).await {
        Ok(Resp::Jobs(list)) => list.jobs,
        Ok(_) => return unexpected(&analyst),
        Err(r) => return r,
    };
    // The latest finished overlap job of each pair of nodes (the list is newest first).
    let mut cells: BTreeMap<(String, String), &JobInfo> = BTreeMap::new();
    let mut names = std::collections::BTreeSet::new();
    for j in &list {
        let Some(spec) = &j.spec else { continue };
        if spec.kind != JobKind::Overlap as i32 || spec.parties.len() != 2 || !finished(j.state) {
            continue;
        }
        let (a, b) = (spec.parties[0].node.clone(), spec.parties[1].node.clone());
        names.insert(a.clone());
        names.insert(b.clone());
        let key = if a <= b { (a, b) } else { (b, a) };
        cells.entry(key).or_insert(j);
    }
    let names: Vec<String> = names.into_iter().collect();
    let cell = |a: &String, b: &String| -> Markup {
        let key = if a <= b {
            (a.clone(), b.clone())
        } else {
            (b.clone(), a.clone())
        };
        match cells.get(&key) {
            None => html! { span.muted { "—" } },
            Some(j) => {
                let o = j.results.iter().filter_map(|r| r.outcome.as_ref()).next();
                html! { a href={"/jobs/" (j.job_id)} {
                    @match (JobState::try_from(j.state), o) {
                        (Ok(JobState::Succeeded), Some(o)) if o.suppressed => { "suppressed" },
                        (Ok(JobState::Succeeded), Some(o)) => {
                            (format_value(o.intersection as f64, false))
                            br; span.muted { (rate(o.intersection, o.own_set_size.min(o.peer_set_size))) }
                        },
                        _ => { (state_name(j.state)) },
                    }
                } }
            }
        }
    };
    layout(
        "Overlap matrix",
        &analyst,
        None,
        html! {
            h1 { "Overlap matrix" }
            p.muted { "The latest finished overlap job of each pair of nodes: the released intersection and its rate of the smaller set. Submit a full matrix with `cleanroom job submit overlap-matrix`." }
            @if names.is_empty() { p.muted { "No overlap job has finished yet." } }
            @else {
                table id="matrix" {
                    thead { tr { th {} @for n in &names { th { (n) } } } }
                    tbody { @for a in &names { tr { th { (a) }
                        @for b in &names { td.num { @if a == b { span.muted { "·" } } @else { (cell(a, b)) } } } } } }
                }
            }
        },
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_makes_the_spec_the_cli_would() {
        let form = SubmitForm {
            kind: "overlap".into(),
            node_a: "acme".into(),
            dataset_a: "customers".into(),
            node_b: " globex".into(),
            dataset_b: "customers".into(),
            keys: "email+phone".into(),
            purpose: "measurement".into(),
            ..Default::default()
        };
        let spec = spec_of(&form).unwrap();
        assert_eq!(spec.kind, JobKind::Overlap as i32);
        assert_eq!(spec.parties[1].node, "globex");
        assert_eq!(spec.parties[0].keys, ["email", "phone"]);
        assert!(!spec.parties[0].learns_membership);
        crate::spec::validate(&spec).unwrap();
        let bad = SubmitForm {
            kind: "psi".into(),
            ..form
        };
        assert!(spec_of(&bad).unwrap_err().contains("unknown kind"));
    }
}
