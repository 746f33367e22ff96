//! The coordinator's QUIC endpoint: node control sessions and analyst requests.
//!
//! Who a peer is comes from its certificate alone. Nodes open one stream with a `NodeHello` whose
//! name must equal their certificate's; analysts open one stream per request. Any other role is
//! refused with a log line naming it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cleanroom_proto::v1::{
    AnalystResponse, Envelope, HelloAck, JobInfo, JobList, JobState, NodeInfo, NodeList, Phase,
    ScheduleInfo, ScheduleList, ScheduleRunInfo, analyst_request::Request,
    analyst_response::Response, envelope::Body,
};
use cleanroom_transport::{
    Credentials, FramedRecv, FramedSend, Identity, PeerRole, TransportTuning,
};
use tokio::sync::{Semaphore, watch};

use crate::clock::SystemClock;
use crate::registry::{NodeHandle, Registry};
use crate::report::{ScheduleReport, render_json};
use crate::runner::Launch;
use crate::schedule::{self, ScheduledJob};
use crate::store::{
    JobStore, LeaseHolder, NewSchedule, ScheduleNotify, ScheduleRecord, ScheduleRun,
};
use crate::{CoordinatorConfig, CoordinatorError, now_ms, runner, spec};

/// Backoff base of a schedule's retries when the analyst gives none, seconds.
pub const DEFAULT_BACKOFF_SECS: u32 = 60;

/// Why a job under way at a graceful stop (SIGTERM/SIGINT) is failed.
pub const SHUTDOWN_REASON: &str =
    "the coordinator shut down while the job was in progress; retry it with `cleanroom job retry`";

/// QUIC application error code for a refused connection.
const CLOSE_REFUSED: u32 = 2;
/// Most jobs one list request returns.
const MAX_LIST: u32 = 1000;

/// What the coordinator's tasks share.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub cfg: CoordinatorConfig,
    /// The job store.
    pub store: JobStore,
    /// Connected nodes.
    pub registry: Registry,
    /// This process as the holder of job leases.
    pub holder: LeaseHolder,
    /// One permit per job that may be offered or running at once (`max_running_jobs`).
    pub slots: Semaphore,
    /// Set at a graceful stop: runners still waiting for a slot leave their job pending.
    pub stopping: AtomicBool,
}

/// Runs the coordinator until `shutdown` turns true. `on_bound` is called once with the bound
/// address (the CLI prints it, so tests and the demo can use port 0).
pub async fn serve(
    cfg: CoordinatorConfig,
    mut shutdown: watch::Receiver<bool>,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<(), CoordinatorError> {
    let creds = Credentials::load(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?;
    let me = creds.identity()?;
    if me.role != PeerRole::Coordinator {
        return Err(CoordinatorError::Config(format!(
            "{} is a certificate for {me}, not the coordinator; issue one with `cleanroom pki issue coordinator`",
            cfg.tls.cert.display()
        )));
    }
    let store = JobStore::open(&cfg.database)?;
    let holder = LeaseHolder::generate()?;
    let endpoint =
        cleanroom_transport::server_endpoint(cfg.listen, &creds, &TransportTuning::default())?;
    let bound = endpoint.local_addr().map_err(|e| {
        CoordinatorError::Config(format!(
            "cannot read the bound address of {}: {e}",
            cfg.listen
        ))
    })?;
    tracing::info!(listen = %bound, database = %cfg.database.display(), "coordinator listening");
    on_bound(bound);
    let slots = Semaphore::new(cfg.max_running_jobs);
    let shared = Arc::new(Shared {
        cfg,
        store,
        registry: Registry::default(),
        holder,
        slots,
        stopping: AtomicBool::new(false),
    });
    // Jobs left unfinished by an earlier coordinator are resumed or failed by the orphan sweep,
    // once their leases have expired — at once if it stopped gracefully.
    let sweeper = {
        let shared = shared.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                sweep_orphans(&shared);
                tokio::select! {
                    _ = tokio::time::sleep(runner::LEASE_RENEW) => {}
                    _ = stop.wait_for(|stop| *stop) => break,
                }
            }
        })
    };
    let scheduler = {
        let shared = shared.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let submitter = shared.clone();
            let submit = move |job: ScheduledJob| submit_scheduled(submitter.clone(), job);
            schedule::run_scheduler(Arc::new(SystemClock), &shared.store, submit, async move {
                // A dropped sender also means stop.
                let _ = stop.wait_for(|stop| *stop).await;
            })
            .await;
        })
    };
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.changed() => break,
        };
        let Some(incoming) = incoming else { break };
        let shared = shared.clone();
        // Handshakes run concurrently, so one slow client cannot hold up the others.
        tokio::spawn(async move {
            // A failed handshake has been logged with the remote address and the reason.
            let Ok((conn, peer)) = cleanroom_transport::handshake(incoming).await else {
                return;
            };
            match peer.role {
                PeerRole::Node => node_session(shared, conn, peer).await,
                PeerRole::Analyst => analyst_session(shared, conn, peer).await,
                PeerRole::Coordinator => {
                    tracing::warn!(peer = %peer, remote = %conn.remote_address(), "refused: a coordinator certificate cannot connect as a client");
                    conn.close(
                        CLOSE_REFUSED.into(),
                        b"coordinator certificates cannot connect here",
                    );
                }
            }
        });
    }
    tracing::info!("coordinator shutting down");
    shared.stopping.store(true, Ordering::SeqCst);
    if let Err(e) = scheduler.await {
        tracing::warn!(error = %e, "the scheduler task failed");
    }
    if let Err(e) = sweeper.await {
        tracing::warn!(error = %e, "the orphan sweep task failed");
    }
    // Settle this process's jobs *before* closing the connections: closing them makes the
    // runners fail their jobs with "node lost", which would hide why. A runner's later
    // transition of a failed job is refused by the state machine. Jobs submitted on a still-open
    // analyst connection meanwhile are caught by the second pass.
    settle_own_jobs(&shared)?;
    endpoint.close(0u32.into(), b"coordinator shutting down");
    endpoint.wait_idle().await;
    settle_own_jobs(&shared)?;
    tracing::info!("coordinator stopped");
    Ok(())
}

/// The environment variable that lets analysts give schedules an `--on-done` command: the
/// coordinator runs it on its own host, so the operator must opt in (`1`).
pub const ALLOW_ON_DONE_ENV: &str = "CLEANROOM_ALLOW_ON_DONE";

/// Longest `--on-done` command or `--notify-dir` path accepted.
const MAX_NOTIFY_LEN: usize = 4096;

/// Checks a schedule's notifications: the command only if the operator allows commands
/// ([`ALLOW_ON_DONE_ENV`]), the directory an absolute path.
fn check_notify(notify: &ScheduleNotify) -> Result<(), String> {
    if notify.on_done.len() > MAX_NOTIFY_LEN || notify.notify_dir.len() > MAX_NOTIFY_LEN {
        return Err(format!(
            "--on-done and --notify-dir are limited to {MAX_NOTIFY_LEN} bytes"
        ));
    }
    if notify.on_done.contains('\0') || notify.notify_dir.contains('\0') {
        return Err("--on-done and --notify-dir may not contain NUL".into());
    }
    if !notify.on_done.is_empty() && std::env::var(ALLOW_ON_DONE_ENV).as_deref() != Ok("1") {
        return Err(format!(
            "this coordinator does not run --on-done commands (they run on its host); its operator can allow them with {ALLOW_ON_DONE_ENV}=1, or use --notify-dir"
        ));
    }
    if !notify.notify_dir.is_empty() && !std::path::Path::new(&notify.notify_dir).is_absolute() {
        return Err(format!(
            "--notify-dir must be an absolute path on the coordinator's host, not '{}'",
            notify.notify_dir
        ));
    }
    Ok(())
}

/// Why a job whose runner died with its coordinator is failed: the nodes dropped it with the
/// runner's connections, so it cannot be resumed, and it is never run a second time.
pub const ORPHANED_REASON: &str = "the coordinator restarted (or stopped) while the job was in progress: its runner is gone and the nodes dropped the job; retry it with `cleanroom job retry`";

/// Resumes or fails the unfinished jobs that have no live runner (no lease, or an expired one):
/// a pending job was never offered, so it is taken over and run; an offered or running one is
/// failed with [`ORPHANED_REASON`].
fn sweep_orphans(shared: &Arc<Shared>) {
    let orphans = match shared.store.orphaned(now_ms()) {
        Ok(orphans) => orphans,
        Err(e) => {
            tracing::warn!(error = %e, "could not look for orphaned jobs");
            return;
        }
    };
    for orphan in orphans {
        let job_id = orphan.job_id;
        if orphan.state == JobState::Pending {
            let spec = match shared.store.get(&job_id) {
                Ok(Some(JobInfo {
                    spec: Some(spec), ..
                })) => spec,
                Ok(_) => continue,
                Err(e) => {
                    // A spec that no longer decodes cannot run: say so rather than retry forever.
                    let reason = format!("the stored job cannot be read ({e}); submit it again");
                    fail(&shared.store, &job_id, &reason);
                    continue;
                }
            };
            if runner::start(shared, &job_id, spec, Launch::Resumed) {
                tracing::info!(job_id = %job_id, "pending job resumed");
            }
        } else {
            fail(&shared.store, &job_id, ORPHANED_REASON);
        }
    }
}

/// At a graceful stop: fails this process's jobs that are under way (their nodes are about to
/// lose them) with [`SHUTDOWN_REASON`], and releases its pending ones so that the next start
/// resumes them at once.
fn settle_own_jobs(shared: &Shared) -> Result<(), CoordinatorError> {
    for job in shared.store.leased_by(&shared.holder)? {
        if job.state == JobState::Pending {
            if let Err(e) = shared.store.release_lease(&job.job_id, &shared.holder) {
                tracing::warn!(job_id = %job.job_id, error = %e, "could not release a pending job");
            }
        } else {
            fail(&shared.store, &job.job_id, SHUTDOWN_REASON);
        }
    }
    Ok(())
}

/// Fails one unfinished job with `reason`, logging what happened.
fn fail(store: &JobStore, job_id: &str, reason: &str) {
    match store.transition(job_id, JobState::Failed, reason, now_ms()) {
        Ok(()) => tracing::warn!(job_id = %job_id, %reason, "unfinished job failed"),
        Err(e) => tracing::warn!(job_id = %job_id, error = %e, "could not fail an unfinished job"),
    }
}

/// Submits one job on behalf of the scheduler (or `schedule run-now`): validates the spec,
/// stores it under the run's idempotency key and starts its runner if it is new. Returns the job
/// id, or why the submission was refused.
pub async fn submit_scheduled(shared: Arc<Shared>, job: ScheduledJob) -> Result<String, String> {
    spec::validate(&job.spec)?;
    let note = if job.attempt == 0 {
        format!("schedule {}", job.schedule)
    } else {
        format!("schedule {}, retry {}", job.schedule, job.attempt)
    };
    let submitted = shared
        .store
        .submit_noted(&job.spec, &job.idempotency_key, &job.owner, &note, now_ms())
        .map_err(|e| e.to_string())?;
    if submitted.created {
        tracing::info!(job_id = %submitted.job_id, schedule = %job.schedule, attempt = job.attempt, "scheduled job submitted");
        runner::start(&shared, &submitted.job_id, job.spec, Launch::New);
    }
    Ok(submitted.job_id)
}

/// A stored schedule as the analyst API sends it.
pub fn schedule_info(record: &ScheduleRecord, runs: &[ScheduleRun]) -> ScheduleInfo {
    schedule_info_notified(record, runs, &ScheduleNotify::default())
}

/// [`schedule_info`] with the schedule's notifications.
pub fn schedule_info_notified(
    record: &ScheduleRecord,
    runs: &[ScheduleRun],
    notify: &ScheduleNotify,
) -> ScheduleInfo {
    ScheduleInfo {
        on_done: notify.on_done.clone(),
        notify_dir: notify.notify_dir.clone(),
        name: record.name.clone(),
        cron: record.cron.clone(),
        timezone: record.timezone.clone(),
        spec: Some(record.spec.clone()),
        owner: record.owner.clone(),
        paused: record.paused,
        created_ms: record.created_ms,
        next_run_ms: record.next_run_ms.unwrap_or(0),
        last_fired_ms: record.last_fired_ms.unwrap_or(0),
        max_retries: record.max_retries,
        backoff_base_secs: record.backoff_base_secs,
        removed_ms: record.removed_ms.unwrap_or(0),
        runs: runs
            .iter()
            .map(|run| ScheduleRunInfo {
                scheduled_for_ms: run.scheduled_for_ms,
                attempt: run.attempt,
                job_id: run.job_id.clone().unwrap_or_default(),
                status: run.status.as_str().to_owned(),
                note: run.note.clone(),
                recorded_ms: run.recorded_ms,
                job_state: run.job_state.map_or(0, |s| s as i32),
                job_reason: run.job_reason.clone(),
                has_intersection: run.intersection.is_some(),
                intersection: run.intersection.unwrap_or(0),
            })
            .collect(),
    }
}

fn job_info(shared: &Shared, job_id: &str) -> Result<JobInfo, CoordinatorError> {
    let mut info = shared
        .store
        .get(job_id)?
        .ok_or_else(|| CoordinatorError::Refused(format!("job {job_id} vanished")))?;
    // Aggregate jobs keep their result in their own table.
    info.aggregate = shared.store.get_aggregate_result(job_id)?;
    Ok(info)
}

fn unknown_schedule(name: &str) -> CoordinatorError {
    CoordinatorError::Refused(format!(
        "no schedule '{name}'; `cleanroom schedule list` shows the schedules"
    ))
}

async fn node_session(shared: Arc<Shared>, conn: quinn::Connection, peer: Identity) {
    let hello = async {
        let (mut send, mut recv) = cleanroom_transport::accept_bi(&conn).await?;
        let env = recv.recv_expect("", Phase::Hello).await?;
        let Some(Body::NodeHello(hello)) = env.body else {
            return Err(CoordinatorError::Protocol {
                peer: peer.to_string(),
                reason: "expected NodeHello".into(),
            });
        };
        if hello.node_name != peer.name {
            return Err(CoordinatorError::Protocol {
                peer: peer.to_string(),
                reason: format!("hello claims to be '{}'", hello.node_name),
            });
        }
        send.send(&Envelope {
            job_id: String::new(),
            phase: Phase::Hello as i32,
            body: Some(Body::HelloAck(HelloAck {
                coordinator_name: "coordinator".into(),
            })),
        })
        .await?;
        Ok(hello.data_addr)
    };
    let data_addr = match hello.await {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(peer = %peer, error = %e, "refused node");
            conn.close(CLOSE_REFUSED.into(), e.to_string().as_bytes());
            return;
        }
    };
    if let Err(e) = shared.store.record_node(&peer.name, &data_addr, now_ms()) {
        tracing::warn!(node = %peer.name, error = %e, "could not record the node");
    }
    shared.registry.insert(
        &peer.name,
        NodeHandle {
            conn: conn.clone(),
            data_addr: data_addr.clone(),
        },
    );
    tracing::info!(node = %peer.name, data_plane = %data_addr, "node connected");
    let why = conn.closed().await;
    shared.registry.remove(&peer.name, &conn);
    // The last time it was seen is when it left (a reconnection moves it on again).
    if let Err(e) = shared.store.node_seen(&peer.name, now_ms()) {
        tracing::warn!(node = %peer.name, error = %e, "could not record when the node left");
    }
    tracing::info!(node = %peer.name, reason = %why, "node disconnected");
}

async fn analyst_session(shared: Arc<Shared>, conn: quinn::Connection, peer: Identity) {
    loop {
        let (send, recv) = match cleanroom_transport::accept_bi(&conn).await {
            Ok(s) => s,
            Err(_) => return,
        };
        let shared = shared.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            analyst_request(&shared, &peer, send, recv).await;
        });
    }
}

async fn analyst_request(
    shared: &Arc<Shared>,
    peer: &Identity,
    mut send: FramedSend,
    mut recv: FramedRecv,
) {
    let env = match recv.recv().await {
        Ok(Some(env)) => env,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(analyst = %peer.name, error = %e, "unreadable analyst request");
            return;
        }
    };
    let job_id = env.job_id.clone();
    let response = match handle(shared, peer, env).await {
        Ok(r) => r,
        Err(e) => Response::Error(e.to_string()),
    };
    let reply = Envelope {
        job_id,
        phase: Phase::Analyst as i32,
        body: Some(Body::AnalystResponse(AnalystResponse {
            response: Some(response),
        })),
    };
    if let Err(e) = send.send(&reply).await {
        tracing::warn!(analyst = %peer.name, error = %e, "could not answer the analyst");
    }
    let _ = send.finish();
    let _ = send.stopped().await;
}

async fn handle(
    shared: &Arc<Shared>,
    peer: &Identity,
    env: Envelope,
) -> Result<Response, CoordinatorError> {
    if env.phase != Phase::Analyst as i32 {
        return Err(CoordinatorError::Refused(
            "request is not in the analyst phase".into(),
        ));
    }
    let Some(Body::AnalystRequest(req)) = env.body else {
        return Err(CoordinatorError::Refused(
            "expected an analyst request".into(),
        ));
    };
    match req.request {
        Some(Request::Submit(submit)) => {
            let job_spec = submit
                .spec
                .ok_or_else(|| CoordinatorError::Refused("submit without a job spec".into()))?;
            spec::validate(&job_spec).map_err(CoordinatorError::Refused)?;
            if submit.idempotency_key.len() > 128 {
                return Err(CoordinatorError::Refused(
                    "idempotency key longer than 128 bytes".into(),
                ));
            }
            let submitted =
                shared
                    .store
                    .submit(&job_spec, &submit.idempotency_key, &peer.name, now_ms())?;
            if submitted.created {
                tracing::info!(job_id = %submitted.job_id, analyst = %peer.name, "job submitted");
                runner::start(shared, &submitted.job_id, job_spec, Launch::New);
            }
            let info = shared
                .store
                .get(&submitted.job_id)?
                .ok_or_else(|| CoordinatorError::Refused("job vanished".into()))?;
            Ok(Response::Job(info))
        }
        Some(Request::Get(_)) => match shared.store.get(&env.job_id)? {
            Some(mut info) => {
                info.aggregate = shared.store.get_aggregate_result(&env.job_id)?;
                Ok(Response::Job(info))
            }
            None => Err(CoordinatorError::Refused(format!(
                "no job '{}'; `cleanroom job list` shows the known jobs",
                env.job_id
            ))),
        },
        Some(Request::AggregatePage(page)) => {
            match shared
                .store
                .get_aggregate_page(&env.job_id, page.offset, page.limit)?
            {
                Some(page) => Ok(Response::AggregatePage(page)),
                None => Err(CoordinatorError::Refused(format!(
                    "job '{}' has no aggregate result (unknown job, another kind, or not \
                     succeeded yet)",
                    env.job_id
                ))),
            }
        }
        Some(Request::List(list)) => {
            let limit = if list.limit == 0 {
                50
            } else {
                list.limit.min(MAX_LIST)
            };
            let mut jobs = shared.store.list(limit)?;
            // An aggregate spec may list up to 20 000 group labels; fifty of them would not
            // fit in one frame. A listing does not need them (GetJob has them).
            for job in &mut jobs {
                if let Some(agg) = job.spec.as_mut().and_then(|s| s.aggregate.as_mut()) {
                    agg.groups.clear();
                }
            }
            Ok(Response::Jobs(JobList { jobs }))
        }
        Some(Request::Nodes(_)) => {
            let connected = shared.registry.names();
            let now = now_ms();
            let nodes = shared
                .store
                .nodes()?
                .into_iter()
                .map(|n| {
                    // A connected node is seen now; one that left, when it left.
                    let connected = connected.contains(&n.name);
                    NodeInfo {
                        connected,
                        name: n.name,
                        data_addr: n.data_addr,
                        last_seen_ms: if connected { now } else { n.last_seen_ms },
                    }
                })
                .collect();
            Ok(Response::Nodes(NodeList { nodes }))
        }
        Some(Request::AddSchedule(add)) => {
            let job_spec = add
                .spec
                .ok_or_else(|| CoordinatorError::Refused("schedule without a job spec".into()))?;
            let notify = ScheduleNotify {
                on_done: add.on_done,
                notify_dir: add.notify_dir,
            };
            check_notify(&notify).map_err(CoordinatorError::Refused)?;
            let record = shared.store.add_schedule(
                &NewSchedule {
                    name: add.name,
                    cron: add.cron,
                    timezone: add.timezone,
                    spec: job_spec,
                    owner: peer.name.clone(),
                    max_retries: add.max_retries,
                    backoff_base_secs: if add.backoff_base_secs == 0 {
                        DEFAULT_BACKOFF_SECS
                    } else {
                        add.backoff_base_secs
                    },
                },
                now_ms(),
            )?;
            if !notify.is_empty() {
                shared.store.set_schedule_notify(record.id, &notify)?;
            }
            tracing::info!(schedule = %record.name, cron = %record.cron, timezone = %record.timezone, analyst = %peer.name, on_done = %notify.on_done, notify_dir = %notify.notify_dir, "schedule added");
            Ok(Response::Schedule(schedule_info_notified(
                &record,
                &[],
                &notify,
            )))
        }
        Some(Request::ListSchedules(_)) => Ok(Response::Schedules(ScheduleList {
            schedules: shared
                .store
                .list_schedules()?
                .iter()
                .map(|r| schedule_info(r, &[]))
                .collect(),
        })),
        Some(Request::ShowSchedule(r)) => {
            let record = match shared.store.get_schedule(&r.name)? {
                Some(record) => record,
                None => shared
                    .store
                    .schedule_for_report(&r.name)?
                    .ok_or_else(|| unknown_schedule(&r.name))?,
            };
            let runs = shared.store.runs(&r.name, r.since_ms)?;
            let notify = shared.store.schedule_notify(record.id)?;
            Ok(Response::Schedule(schedule_info_notified(
                &record, &runs, &notify,
            )))
        }
        Some(Request::PauseSchedule(r)) => {
            let record = shared.store.pause_schedule(&r.name)?;
            tracing::info!(schedule = %r.name, analyst = %peer.name, "schedule paused");
            Ok(Response::Schedule(schedule_info(&record, &[])))
        }
        Some(Request::ResumeSchedule(r)) => {
            let record = shared.store.resume_schedule(&r.name, now_ms())?;
            tracing::info!(schedule = %r.name, analyst = %peer.name, "schedule resumed");
            Ok(Response::Schedule(schedule_info(&record, &[])))
        }
        Some(Request::RemoveSchedule(r)) => {
            let record = shared
                .store
                .get_schedule(&r.name)?
                .ok_or_else(|| unknown_schedule(&r.name))?;
            let now = now_ms();
            shared.store.remove_schedule(&r.name, now)?;
            tracing::info!(schedule = %r.name, analyst = %peer.name, "schedule removed");
            let record = ScheduleRecord {
                removed_ms: Some(now),
                ..record
            };
            Ok(Response::Schedule(schedule_info(&record, &[])))
        }
        Some(Request::RunScheduleNow(r)) => {
            let submitter = shared.clone();
            let submit = move |job: ScheduledJob| submit_scheduled(submitter.clone(), job);
            let run = schedule::run_now(&shared.store, &r.name, now_ms(), &submit)
                .await
                .map_err(|e| CoordinatorError::Refused(e.to_string()))?;
            tracing::info!(schedule = %r.name, job_id = %run.job_id, analyst = %peer.name, "schedule run now");
            Ok(Response::Job(job_info(shared, &run.job_id)?))
        }
        Some(Request::Report(r)) => {
            let record = shared
                .store
                .schedule_for_report(&r.name)?
                .ok_or_else(|| unknown_schedule(&r.name))?;
            let runs = shared.store.runs(&r.name, r.since_ms)?;
            let report = ScheduleReport::build(&record, &runs, r.since_ms, now_ms());
            Ok(Response::ReportJson(render_json(&report)))
        }
        Some(Request::Retry(retry)) => {
            let old = shared.store.get(&env.job_id)?.ok_or_else(|| {
                CoordinatorError::Refused(format!(
                    "no job '{}'; `cleanroom job list` shows the known jobs",
                    env.job_id
                ))
            })?;
            match JobState::try_from(old.state) {
                Ok(JobState::Failed | JobState::Vetoed | JobState::Cancelled) => {}
                Ok(JobState::Succeeded) => {
                    return Err(CoordinatorError::Refused(format!(
                        "job {} succeeded; submit a new job to run it again",
                        env.job_id
                    )));
                }
                _ => {
                    return Err(CoordinatorError::Refused(format!(
                        "job {} has not finished; only a failed, vetoed or cancelled job can be retried",
                        env.job_id
                    )));
                }
            }
            let job_spec = old
                .spec
                .ok_or_else(|| CoordinatorError::Refused("the job has no spec".into()))?;
            spec::validate(&job_spec).map_err(CoordinatorError::Refused)?;
            let key = if retry.idempotency_key.is_empty() {
                format!("retry:{}", env.job_id)
            } else {
                retry.idempotency_key
            };
            if key.len() > 128 {
                return Err(CoordinatorError::Refused(
                    "idempotency key longer than 128 bytes".into(),
                ));
            }
            let note = format!("retry of job {}", env.job_id);
            let submitted =
                shared
                    .store
                    .submit_noted(&job_spec, &key, &peer.name, &note, now_ms())?;
            if submitted.created {
                tracing::info!(job_id = %submitted.job_id, retry_of = %env.job_id, analyst = %peer.name, "job retried");
                runner::start(shared, &submitted.job_id, job_spec, Launch::New);
            }
            Ok(Response::Job(job_info(shared, &submitted.job_id)?))
        }
        None => Err(CoordinatorError::Refused("empty request".into())),
    }
}
