//! The analyst API: one request per stream, answered from the store, the registry, the runner
//! and the scheduler.

use std::sync::Arc;

use cleanroom_proto::v1::{
    AnalystRequest, AnalystResponse, AuditHeads, Envelope, JobInfo, JobList, JobState, NodeInfo,
    NodeList, Phase, ScheduleInfo, ScheduleList, ScheduleRunInfo, analyst_request::Request,
    analyst_response::Response, envelope::Body,
};
use cleanroom_transport::{FramedRecv, FramedSend, Identity};

use super::authz::{self, Action, Roles, Target};
use crate::clock::now_ms;
use crate::error::CoordinatorError;
use crate::report::{ScheduleReport, render_json};
use crate::run::{self, Launch};
use crate::schedule::{self, Confinement, ScheduledJob, SubmitError, check_notify};
use crate::shared::Shared;
use crate::spec;
use crate::store::{JobFilter, NewSchedule, ScheduleNotify, ScheduleRecord, ScheduleRun};

/// Backoff base of a schedule's retries when the analyst gives none, seconds.
pub const DEFAULT_BACKOFF_SECS: u32 = 60;

/// Most jobs one list request returns.
const MAX_LIST: u32 = 1000;

/// Submits one job on behalf of the scheduler (or `schedule run-now`): validates the spec,
/// stores it under the run's idempotency key and starts its runner if it is new. Returns the job
/// id, or why the submission was refused.
pub async fn submit_scheduled(
    shared: Arc<Shared>,
    mut job: ScheduledJob,
) -> Result<String, SubmitError> {
    spec::validate(&job.spec).map_err(SubmitError::InvalidSpec)?;
    // A scheduled run is its owner's request (schedules added before specs named the analyst
    // have an empty name stored).
    job.spec.analyst = job.owner.clone();
    let note = if job.attempt == 0 {
        format!("schedule {}", job.schedule)
    } else {
        format!("schedule {}, retry {}", job.schedule, job.attempt)
    };
    let submitted =
        shared
            .store
            .submit_noted(&job.spec, &job.idempotency_key, &job.owner, &note, now_ms())?;
    if submitted.created {
        tracing::info!(job_id = %submitted.job_id, schedule = %job.schedule, attempt = job.attempt, "scheduled job submitted");
        run::start(&shared, &submitted.job_id, job.spec, Launch::New);
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

/// The schedule `name`, once `analyst` may act on it (pause, resume, remove or run it now).
fn schedule_to_act_on(
    shared: &Shared,
    roles: &Roles,
    analyst: &str,
    name: &str,
) -> Result<ScheduleRecord, CoordinatorError> {
    let record = shared
        .store
        .get_schedule(name)?
        .ok_or_else(|| unknown_schedule(name))?;
    may_on_schedule(roles, analyst, Action::ActOnSchedule, &record)?;
    Ok(record)
}

pub(super) async fn analyst_session(
    shared: Arc<Shared>,
    roles: Arc<Roles>,
    conn: quinn::Connection,
    peer: Identity,
) {
    loop {
        let (send, recv) = match cleanroom_transport::accept_bi(&conn).await {
            Ok(s) => s,
            Err(_) => return,
        };
        let shared = shared.clone();
        let roles = roles.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            analyst_request(&shared, &roles, &peer, send, recv).await;
        });
    }
}

/// Refuses unless `analyst` may do `action` on the job `info` (see [`authz::authorize`]).
fn may_on_job(
    shared: &Shared,
    roles: &Roles,
    analyst: &str,
    action: Action,
    info: &JobInfo,
) -> Result<(), CoordinatorError> {
    let target = Target {
        id: &info.job_id,
        owner: &info.submitted_by,
        scheduled: shared.store.is_scheduled_run(&info.job_id)?,
    };
    authz::authorize(analyst, roles, action, &target)
        .map(|_| ())
        .map_err(|e| {
            tracing::info!(analyst = %analyst, job_id = %info.job_id, "refused: {e}");
            CoordinatorError::Forbidden(e.to_string())
        })
}

/// Refuses unless `analyst` may do `action` on the schedule `record`.
fn may_on_schedule(
    roles: &Roles,
    analyst: &str,
    action: Action,
    record: &ScheduleRecord,
) -> Result<(), CoordinatorError> {
    let target = Target {
        id: &record.name,
        owner: &record.owner,
        scheduled: false,
    };
    authz::authorize(analyst, roles, action, &target)
        .map(|_| ())
        .map_err(|e| {
            tracing::info!(analyst = %analyst, schedule = %record.name, "refused: {e}");
            CoordinatorError::Forbidden(e.to_string())
        })
}

fn unknown_job(job_id: &str) -> CoordinatorError {
    CoordinatorError::Refused(format!(
        "no job '{job_id}'; `cleanroom job list` shows the known jobs"
    ))
}

async fn analyst_request(
    shared: &Arc<Shared>,
    roles: &Roles,
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
    let response = match handle(shared, roles, peer, env).await {
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

/// Answers one analyst request, `job_id` being the job it is about (empty for none). This is
/// the one entry point of the analyst API: the QUIC sessions and the web console (its JSON API
/// and its pages) both call it, so they apply the same checks and the same visibility rules,
/// decided in one place ([`authz::authorize`]).
pub async fn answer(
    shared: &Arc<Shared>,
    roles: &Roles,
    peer: &Identity,
    job_id: &str,
    request: Request,
) -> Result<Response, CoordinatorError> {
    let env = Envelope {
        job_id: job_id.to_owned(),
        phase: Phase::Analyst as i32,
        body: Some(Body::AnalystRequest(AnalystRequest {
            request: Some(request),
        })),
    };
    handle(shared, roles, peer, env).await
}

async fn handle(
    shared: &Arc<Shared>,
    roles: &Roles,
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
            let mut job_spec = submit
                .spec
                .ok_or_else(|| CoordinatorError::Refused("submit without a job spec".into()))?;
            // Who asked, from the certificate, whatever the request said: every node sees it
            // (covered by the spec digest) and an agreement may restrict analysts.
            job_spec.analyst = peer.name.clone();
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
                run::start(shared, &submitted.job_id, job_spec, Launch::New);
            }
            let info = shared
                .store
                .get(&submitted.job_id)?
                .ok_or_else(|| CoordinatorError::Refused("job vanished".into()))?;
            Ok(Response::Job(info))
        }
        Some(Request::Get(_)) => match shared.store.get(&env.job_id)? {
            Some(mut info) => {
                may_on_job(shared, roles, &peer.name, Action::ReadJob, &info)?;
                info.aggregate = shared.store.get_aggregate_result(&env.job_id)?;
                Ok(Response::Job(info))
            }
            None => Err(unknown_job(&env.job_id)),
        },
        Some(Request::AggregatePage(page)) => {
            let info = shared
                .store
                .get(&env.job_id)?
                .ok_or_else(|| unknown_job(&env.job_id))?;
            may_on_job(shared, roles, &peer.name, Action::ReadJob, &info)?;
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
            let filter = if authz::sees_all(&peer.name, roles, Action::ReadJob) {
                JobFilter::All
            } else if authz::sees_all(&peer.name, roles, Action::ActOnSchedule) {
                JobFilter::OwnedByOrScheduled(peer.name.clone())
            } else {
                JobFilter::OwnedBy(peer.name.clone())
            };
            let mut jobs = shared.store.list_visible(limit, &filter)?;
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
            let mut job_spec = add
                .spec
                .ok_or_else(|| CoordinatorError::Refused("schedule without a job spec".into()))?;
            job_spec.analyst = peer.name.clone();
            let notify = ScheduleNotify {
                on_done: add.on_done,
                notify_dir: add.notify_dir,
            };
            check_notify(&notify, &Confinement::from_config(&shared.cfg))
                .map_err(CoordinatorError::Refused)?;
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
                .filter(|r| may_on_schedule(roles, &peer.name, Action::ReadSchedule, r).is_ok())
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
            may_on_schedule(roles, &peer.name, Action::ReadSchedule, &record)?;
            let runs = shared.store.runs(&r.name, r.since_ms)?;
            let notify = shared.store.schedule_notify(record.id)?;
            Ok(Response::Schedule(schedule_info_notified(
                &record, &runs, &notify,
            )))
        }
        Some(Request::PauseSchedule(r)) => {
            schedule_to_act_on(shared, roles, &peer.name, &r.name)?;
            let record = shared.store.pause_schedule(&r.name)?;
            tracing::info!(schedule = %r.name, analyst = %peer.name, "schedule paused");
            Ok(Response::Schedule(schedule_info(&record, &[])))
        }
        Some(Request::ResumeSchedule(r)) => {
            schedule_to_act_on(shared, roles, &peer.name, &r.name)?;
            let record = shared.store.resume_schedule(&r.name, now_ms())?;
            tracing::info!(schedule = %r.name, analyst = %peer.name, "schedule resumed");
            Ok(Response::Schedule(schedule_info(&record, &[])))
        }
        Some(Request::RemoveSchedule(r)) => {
            let record = schedule_to_act_on(shared, roles, &peer.name, &r.name)?;
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
            schedule_to_act_on(shared, roles, &peer.name, &r.name)?;
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
            may_on_schedule(roles, &peer.name, Action::ReadSchedule, &record)?;
            let runs = shared.store.runs(&r.name, r.since_ms)?;
            let report = ScheduleReport::build(&record, &runs, r.since_ms, now_ms());
            Ok(Response::ReportJson(render_json(&report)))
        }
        Some(Request::Retry(retry)) => {
            let old = shared
                .store
                .get(&env.job_id)?
                .ok_or_else(|| unknown_job(&env.job_id))?;
            may_on_job(shared, roles, &peer.name, Action::ActOnJob, &old)?;
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
            let mut job_spec = old
                .spec
                .ok_or_else(|| CoordinatorError::Refused("the job has no spec".into()))?;
            // The retry is the retrying analyst's request.
            job_spec.analyst = peer.name.clone();
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
                run::start(shared, &submitted.job_id, job_spec, Launch::New);
            }
            Ok(Response::Job(job_info(shared, &submitted.job_id)?))
        }
        Some(Request::AuditHeads(r)) => {
            // How many entries a node's log has, job by job, says how busy it was for every
            // analyst: only a grant to see everything reaches it.
            if !authz::sees_all(&peer.name, roles, Action::ReadJob) {
                return Err(CoordinatorError::Forbidden(format!(
                    "analyst {} may not read audit heads: they need the read-all or admin grant \
                     of a [[role]] in the coordinator's config",
                    peer.name
                )));
            }
            Ok(Response::AuditHeads(AuditHeads {
                heads: shared.store.audit_heads(&r.node)?,
            }))
        }
        None => Err(CoordinatorError::Refused("empty request".into())),
    }
}
