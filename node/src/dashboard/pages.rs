//! The dashboard's HTML pages (maud). Each page reads the node's records afresh (the policy in
//! force, the ledger, the audit log, the results directory) on a blocking thread and shows:
//!
//! | Page | Shows |
//! |---|---|
//! | `/` | agreements in force and expiring soon; the audit chain's state |
//! | `/budget` | ε spent and remaining per partner and purpose; ε over time |
//! | `/decisions` | the last offers accepted and vetoed, and failed jobs |
//! | `/forget` | deletion requests per dataset; retention of job results |
//! | `/audit` | the chain's verification, its head, its problems |
//! | `/transparency` | the publishable summary (also `.md` and `.json`) |
//!
//! Names (partners, purposes, datasets, columns), counts, ε, times, job ids and log hashes
//! only: no page reads a dataset, a membership file or the forget list, and a forgotten
//! subject's key hash is not shown (it is a pseudonym of the person).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::chart::spend_svg;
use crate::audit::{self, AuditEntry, AuditEvent, VerifyReport};
use crate::cli::budget::{self, BudgetLine};
use crate::clock::format_ms;
use crate::ledger::show;
use crate::policy::{EXPIRY_WARNING_DAYS, PolicyDate};
use crate::state::NodeState;

/// How many decisions `/decisions` lists.
const RECENT: usize = 100;

/// The pages' routes.
pub fn routes() -> Router<Arc<NodeState>> {
    Router::new()
        .route("/", get(overview))
        .route("/budget", get(budget_page))
        .route("/decisions", get(decisions))
        .route("/forget", get(forget))
        .route("/audit", get(audit_page))
        .route("/transparency", get(transparency))
        .route("/transparency.md", get(transparency_md))
        .route("/transparency.json", get(transparency_json))
}

const STYLE: &str = r#"
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2933;background:#f7f8fa}
header{background:#14532d;color:#fff;padding:10px 24px;display:flex;gap:22px;align-items:center}
header a{color:#d1fae5;text-decoration:none;font-weight:500}header a:hover{color:#fff}
header .who{margin-left:auto;color:#bbf7d0;font-size:14px}
main{padding:20px 24px;max-width:1200px}
h1{font-size:22px;margin:4px 0 14px}h2{font-size:17px;margin:22px 0 8px}
table{border-collapse:collapse;background:#fff;width:100%;font-size:14px}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid #e5e7eb;vertical-align:top}
th{background:#f1f5f9;font-weight:600}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.ok{background:#dcfce7;color:#166534}.bad{background:#fee2e2;color:#991b1b}.warn{background:#ffedd5;color:#9a3412}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:8px 0}.card{background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:10px 14px;min-width:150px}
.card .l{font-size:12px;color:#64748b}.card .v{font-size:20px;font-weight:600}
.err{background:#fee2e2;color:#991b1b;padding:8px 12px;border-radius:6px}
.muted{color:#64748b;font-size:13px}.chart{background:#fff;border:1px solid #e5e7eb;border-radius:6px;display:inline-block;margin:4px 12px 12px 0}
pre{background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:12px;white-space:pre-wrap;font-size:13px}
code{font-size:13px}
"#;

fn layout(title: &str, node: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                // No favicon request (it would be a 404 in the browser console).
                link rel="icon" href="data:,";
                title { (title) " · " (node) " · cleanroom" }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    strong { "privacy dashboard" }
                    a href="/" { "Agreements" }
                    a href="/budget" { "Budget" }
                    a href="/decisions" { "Decisions" }
                    a href="/forget" { "Deletion & retention" }
                    a href="/audit" { "Audit log" }
                    a href="/transparency" { "Transparency" }
                    span.who { "node " (node) }
                }
                main { (body) }
            }
        }
    }
}

fn time(ms: i64) -> String {
    format!("{} UTC", format_ms(ms))
}

fn badge(class: &str, text: &str) -> Markup {
    html! { span class={"badge " (class)} { (text) } }
}

fn card(label: &str, value: impl std::fmt::Display) -> Markup {
    html! { div.card { div.l { (label) } div.v { (value) } } }
}

/// Runs `f` on a blocking thread (the pages read files and the ledger) and renders its page,
/// or a 500 with the reason.
async fn render<F>(state: Arc<NodeState>, f: F) -> Response
where
    F: FnOnce(&NodeState) -> Result<Markup, String> + Send + 'static,
{
    let name = state.cfg().name.clone();
    match tokio::task::spawn_blocking(move || f(&state)).await {
        Ok(Ok(page)) => page.into_response(),
        Ok(Err(reason)) => error_page(&name, &reason),
        Err(e) => error_page(&name, &e.to_string()),
    }
}

fn error_page(node: &str, reason: &str) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        layout(
            "error",
            node,
            html! { h1 { "Cannot show this page" } p.err { (reason) } },
        ),
    )
        .into_response()
}

/// The audit log, verified, and its entries.
fn read_log(state: &NodeState) -> Result<(VerifyReport, Vec<AuditEntry>), String> {
    let path = state.audit.path();
    let report = audit::verify(path, None).map_err(|e| e.to_string())?;
    let entries = audit::read_entries(path).map_err(|e| e.to_string())?;
    Ok((report, entries))
}

/// The latest [`RECENT`] entries whose event `is` picks, newest first.
fn latest(entries: &[AuditEntry], is: fn(&AuditEvent) -> bool) -> Vec<&AuditEntry> {
    entries
        .iter()
        .rev()
        .filter(|e| is(&e.event))
        .take(RECENT)
        .collect()
}

fn chain_badge(report: &VerifyReport) -> Markup {
    if report.is_ok() {
        badge("ok", "verified")
    } else {
        badge("bad", &format!("{} problem(s)", report.problems.len()))
    }
}

/// An agreement's standing on `today`: in force, expiring within the warning window, expired.
fn standing(expires: Option<PolicyDate>, today: PolicyDate) -> (&'static str, String) {
    let Some(expires) = expires else {
        return ("ok", "in force (no expiry)".into());
    };
    let days = (expires.0 - today.0).whole_days();
    if days < 0 {
        ("bad", format!("expired {expires}"))
    } else if days < EXPIRY_WARNING_DAYS {
        ("warn", format!("expires {expires} ({})", in_days(days)))
    } else {
        ("ok", format!("in force until {expires}"))
    }
}

fn in_days(days: i64) -> String {
    match days {
        0 => "last day today".to_owned(),
        1 => "tomorrow".to_owned(),
        n => format!("in {n} days"),
    }
}

async fn overview(State(state): State<Arc<NodeState>>) -> Response {
    render(state, |state| {
        let cfg = state.cfg();
        let now = crate::clock::now_ms();
        let today = PolicyDate::from_unix_ms(now).ok_or("the clock is out of range")?;
        let (report, entries) = read_log(state)?;
        let standings: Vec<_> = cfg
            .agreements
            .iter()
            .map(|a| (a, standing(a.expires, today)))
            .collect();
        let in_force = standings.iter().filter(|(_, s)| s.0 != "bad").count();
        let expiring = standings.iter().filter(|(_, s)| s.0 == "warn").count();
        let vetoes = entries
            .iter()
            .filter(|e| matches!(e.event, AuditEvent::Decision { accepted: false, .. }))
            .count();
        let lines = budget::report(&cfg, &state.ledger, now).map_err(|e| e.to_string())?;
        let node_line = lines.iter().find(|l| l.partner == "*");
        Ok(layout(
            "Agreements",
            &cfg.name,
            html! {
                h1 { "Agreements of " (cfg.name) }
                div.cards {
                    (card("agreements in force", in_force))
                    (card(&format!("expiring within {EXPIRY_WARNING_DAYS} days"), expiring))
                    (card("ε spent (lifetime, all partners)", node_line.map_or("0".into(), |l| show(l.lifetime_spent))))
                    (card("offers vetoed", vetoes))
                    div.card { div.l { "audit chain" } div.v { (chain_badge(&report)) } }
                }
                h2 { "Agreements" }
                table #agreements {
                    tr { th { "Partner" } th { "Purposes" } th { "Computations" } th { "Datasets" } th { "Standing" } }
                    @for (a, (class, text)) in &standings {
                        tr {
                            td { (a.partner) }
                            td { (a.purposes.join(", ")) }
                            td { (a.allow.iter().map(|x| x.computation().as_str()).collect::<Vec<_>>().join(", ")) }
                            td { (a.allow.iter().map(|x| x.dataset()).collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>().join(", ")) }
                            td { (badge(class, text)) }
                        }
                    }
                }
                @if cfg.agreements.is_empty() { p.muted { "No agreement: every offer is vetoed." } }
                p.muted { "Today is " (today) " (UTC). An agreement is in force through its expiry day." }
            },
        ))
    })
    .await
}

async fn budget_page(State(state): State<Arc<NodeState>>) -> Response {
    render(state, |state| {
        let cfg = state.cfg();
        let now = crate::clock::now_ms();
        let lines = budget::report(&cfg, &state.ledger, now).map_err(|e| e.to_string())?;
        let delta = cfg.delta();
        let mut charts = Vec::new();
        for l in lines.iter().filter(|l| l.partner != "*") {
            let curve = state
                .ledger
                .spent_over_time((&l.partner, &l.purpose), delta)
                .map_err(|e| e.to_string())?;
            if let Some(svg) = spend_svg(&curve, l.lifetime_cap) {
                let range = format!(
                    "{} – {}",
                    time(curve[0].0),
                    time(curve[curve.len() - 1].0)
                );
                charts.push((l, svg, curve.len(), range));
            }
        }
        Ok(layout(
            "Budget",
            &cfg.name,
            html! {
                h1 { "Privacy budget" }
                p.muted { "ε at δ = " (format!("{delta:e}")) " (the node's dp_delta), as the ledger composes it. \
                    The window is a sliding " code { "period" } " ending now; remaining is the cap minus what was spent." }
                (budget_table(&lines))
                h2 { "ε spent over time" }
                @if charts.is_empty() { p.muted { "Nothing charged yet." } }
                @for (l, svg, n, range) in &charts {
                    div.chart {
                        div.muted style="padding:6px 10px" { (l.partner) " · " (l.purpose) " — " (n) " charge(s), " (range)
                            @if let Some(cap) = l.lifetime_cap { ", lifetime cap " (show(cap))
                                @if super::chart::cap_in_view(cap, l.lifetime_spent) { " (dashed line)" } } }
                        (PreEscaped(svg))
                    }
                }
            },
        ))
    })
    .await
}

fn budget_table(lines: &[BudgetLine]) -> Markup {
    let opt = |v: Option<f64>| v.map_or("no cap".to_owned(), show);
    html! {
        table #budget {
            tr { th { "Partner" } th { "Purpose" } th { "Window" } th.num { "Spent" } th.num { "Cap" } th.num { "Remaining" }
                 th.num { "Charges" } th { "Next refresh" } th.num { "Lifetime spent" } th.num { "Lifetime remaining" } }
            @for l in lines {
                tr {
                    td { @if l.partner == "*" { em { "all partners" } } @else { (l.partner) } }
                    td { @if l.purpose == "*" { em { "all purposes" } } @else { (l.purpose) } }
                    td { (l.period) }
                    td.num { (show(l.spent)) }
                    td.num { (opt(l.cap)) }
                    td.num { (opt(l.remaining)) }
                    td.num { (l.charges) }
                    td { (l.next_refresh.clone().unwrap_or_else(|| "—".into())) }
                    td.num { (show(l.lifetime_spent)) }
                    td.num { (opt(l.lifetime_remaining)) }
                }
            }
        }
    }
}

async fn decisions(State(state): State<Arc<NodeState>>) -> Response {
    render(state, |state| {
        let cfg = state.cfg();
        let (_, entries) = read_log(state)?;
        let mut by_reason: BTreeMap<&'static str, u64> = BTreeMap::new();
        let (mut accepted, mut vetoed) = (0u64, 0u64);
        for e in &entries {
            if let AuditEvent::Decision {
                accepted: a,
                reason,
                ..
            } = &e.event
            {
                if *a {
                    accepted += 1;
                } else {
                    vetoed += 1;
                    *by_reason
                        .entry(crate::metrics::veto_category(reason))
                        .or_default() += 1;
                }
            }
        }
        let recent = latest(&entries, |e| matches!(e, AuditEvent::Decision { .. }));
        let refused = latest(&entries, |e| matches!(e, AuditEvent::ConnectionRefused { .. }));
        let failed = latest(&entries, |e| matches!(e, AuditEvent::JobError { .. }));
        Ok(layout(
            "Decisions",
            &cfg.name,
            html! {
                h1 { "Decisions and vetoes" }
                div.cards {
                    (card("offers accepted", accepted))
                    (card("offers vetoed", vetoed))
                    @for (reason, n) in &by_reason { (card(&format!("vetoed: {reason}"), n)) }
                }
                h2 { "Last " (recent.len()) " decisions" }
                table #decisions {
                    tr { th { "Time" } th { "Decision" } th { "Partner" } th { "Purpose" } th { "Computation" } th { "Dataset · keys" } th { "Reason" } th { "Job" } }
                    @for e in &recent {
                        @if let AuditEvent::Decision { job_id, partner, purpose, computation, dataset, keys, accepted, reason } = &e.event {
                            tr {
                                td { (time(e.at_ms)) }
                                td { @if *accepted { (badge("ok", "accepted")) } @else { (badge("warn", "vetoed")) } }
                                td { (partner) } td { (purpose) } td { (computation) }
                                td { (dataset) " · " (keys.join("+")) }
                                td { (reason) }
                                td { code { (job_id) } }
                            }
                        }
                    }
                }
                @if !refused.is_empty() {
                    h2 { "Refused data-plane connections" }
                    table #refused {
                        tr { th { "Time" } th { "Peer" } th { "Reason" } }
                        @for e in &refused {
                            @if let AuditEvent::ConnectionRefused { peer, reason } = &e.event {
                                tr { td { (time(e.at_ms)) } td { (peer) } td { (reason) } }
                            }
                        }
                    }
                }
                h2 { "Failed jobs" }
                @if failed.is_empty() { p.muted { "None." } } @else {
                    table #failed {
                        tr { th { "Time" } th { "Partner" } th { "Reason" } th { "Job" } }
                        @for e in &failed {
                            @if let AuditEvent::JobError { job_id, partner, reason } = &e.event {
                                tr { td { (time(e.at_ms)) } td { (partner) } td { (reason) } td { code { (job_id) } } }
                            }
                        }
                    }
                }
            },
        ))
    })
    .await
}

/// Job result files in the state directory: how many, and the oldest one's age in days.
fn results_on_disk(state_dir: &std::path::Path) -> (u64, Option<u64>) {
    let dir = crate::data::retention::results_dir(state_dir);
    let Ok(read) = std::fs::read_dir(&dir) else {
        return (0, None);
    };
    let now = std::time::SystemTime::now();
    let (mut n, mut oldest) = (0u64, None::<u64>);
    for entry in read.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        n += 1;
        if let Some(age) = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
        {
            let days = age.as_secs() / 86_400;
            oldest = Some(oldest.map_or(days, |o| o.max(days)));
        }
    }
    (n, oldest)
}

async fn forget(State(state): State<Arc<NodeState>>) -> Response {
    render(state, |state| {
        let cfg = state.cfg();
        let (_, entries) = read_log(state)?;
        let mut per_dataset: BTreeMap<&str, (u64, i64)> = BTreeMap::new();
        let mut excluded: BTreeMap<&str, u64> = BTreeMap::new();
        for e in &entries {
            match &e.event {
                AuditEvent::Forget { dataset, .. } => {
                    let d = per_dataset.entry(dataset).or_default();
                    d.0 += 1;
                    d.1 = d.1.max(e.at_ms);
                }
                AuditEvent::Access {
                    dataset,
                    rows_excluded_deleted,
                    ..
                } => *excluded.entry(dataset).or_default() += rows_excluded_deleted,
                _ => {}
            }
        }
        let (files, oldest) = results_on_disk(&cfg.state_dir);
        Ok(layout(
            "Deletion and retention",
            &cfg.name,
            html! {
                h1 { "Deletion requests" }
                p.muted { "A forgotten subject's rows are left out of every later job. The subject's key is kept \
                    only as a salted hash in the node's forget list, which this page does not read." }
                table #forget {
                    tr { th { "Dataset" } th.num { "Requests honoured" } th { "Last request" } th.num { "Rows left out of jobs since" } }
                    @for (dataset, (n, last)) in &per_dataset {
                        tr { td { (dataset) } td.num { (n) } td { (time(*last)) } td.num { (excluded.get(dataset).copied().unwrap_or(0)) } }
                    }
                }
                @if per_dataset.is_empty() { p.muted { "No deletion request yet." } }
                h2 { "Retention of job results" }
                table #retention {
                    tr { th { "Policy" } th.num { "Result files kept" } th.num { "Oldest (days)" } th { "Standing" } }
                    tr {
                        td { @match cfg.retention_days { Some(d) => { "purged after " (d) " day(s), hourly" }, None => { "kept until an operator purges them" } } }
                        td.num { (files) }
                        td.num { (oldest.map_or("—".into(), |d| d.to_string())) }
                        td { @match (cfg.retention_days, oldest) {
                            (Some(d), Some(o)) if o > d => { (badge("warn", "older files than the policy allows: the next hourly purge removes them")) },
                            (Some(_), _) => { (badge("ok", "within policy")) },
                            (None, _) => { (badge("warn", "no retention policy")) },
                        } }
                    }
                }
            },
        ))
    })
    .await
}

async fn audit_page(State(state): State<Arc<NodeState>>) -> Response {
    render(state, |state| {
        let cfg = state.cfg();
        let (report, entries) = read_log(state)?;
        let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
        for e in &entries {
            *kinds.entry(e.event.kind()).or_default() += 1;
        }
        let last = entries.last();
        Ok(layout(
            "Audit log",
            &cfg.name,
            html! {
                h1 { "Audit log" }
                div.cards {
                    div.card { div.l { "chain" } div.v #chain { (chain_badge(&report)) } }
                    (card("entries", report.entries))
                    (card("last entry", last.map_or("—".into(), |e| time(e.at_ms))))
                }
                h2 { "Head" }
                p { code #head { (report.head.to_string()) } }
                p.muted { "seq:hash of the last entry. The coordinator keeps the head with each job result; \
                    compare them with " code { "cleanroom-node audit verify --expected-head" } "." }
                h2 { "Entries by kind" }
                table #kinds {
                    tr { th { "Kind" } th.num { "Entries" } }
                    @for (k, n) in &kinds { tr { td { (k) } td.num { (n) } } }
                }
                @if !report.is_ok() {
                    h2 { "Problems" }
                    ul.err { @for p in &report.problems { li { (p.to_string()) } } }
                }
                p.muted { "Verified now, from " code { (state.audit.path().display()) } " and its head file." }
            },
        ))
    })
    .await
}

fn summary(state: &NodeState) -> Result<audit::transparency::Transparency, String> {
    let cfg = state.cfg();
    let (report, entries) = read_log(state)?;
    if !report.is_ok() {
        return Err(format!(
            "the audit log does not verify ({} problem(s)); resolve it before publishing a summary",
            report.problems.len()
        ));
    }
    Ok(audit::transparency::summarize(
        &cfg.name,
        &entries,
        &report.head,
        None,
    ))
}

async fn transparency(State(state): State<Arc<NodeState>>) -> Response {
    render(state, |state| {
        let cfg = state.cfg();
        let t = summary(state)?;
        Ok(layout(
            "Transparency",
            &cfg.name,
            html! {
                h1 { "Transparency summary" }
                p.muted { "Ready to publish: partners, purposes, jobs by outcome, ε per partner and purpose, \
                    releases per recipient. No job id, no released value, no row count. The same as "
                    code { "cleanroom-node transparency" } ". Download: "
                    a href="/transparency.md" { "Markdown" } " · " a href="/transparency.json" { "JSON" } }
                pre #summary { (t.to_markdown()) }
            },
        ))
    })
    .await
}

async fn transparency_md(State(state): State<Arc<NodeState>>) -> Response {
    download(state, "text/markdown; charset=utf-8", |t| t.to_markdown()).await
}

async fn transparency_json(State(state): State<Arc<NodeState>>) -> Response {
    download(state, "application/json", |t| t.to_json()).await
}

async fn download(
    state: Arc<NodeState>,
    content_type: &'static str,
    f: fn(&audit::transparency::Transparency) -> String,
) -> Response {
    match tokio::task::spawn_blocking(move || summary(&state)).await {
        Ok(Ok(t)) => ([(header::CONTENT_TYPE, content_type)], f(&t)).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}
