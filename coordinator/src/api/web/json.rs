//! The JSON API under `/api/v1`: the analyst API's requests over HTTPS, each answered by
//! [`crate::api::analyst::answer`] like its QUIC twin (docs/API.md lists them).
//!
//! Messages are written and read in protobuf's JSON mapping of `proto/cleanroom.proto`, by
//! reflection over its descriptors (prost-reflect), with the proto's field names
//! (`job_id`, `submitted_by`), enums by name (`JOB_STATE_SUCCEEDED`) and 64-bit integers as
//! numbers. Unknown fields in a request body are refused.

use std::sync::{Arc, OnceLock};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, get, on, post};
use axum::{Extension, Json, Router};
use cleanroom_proto::v1::analyst_request::Request as Req;
use cleanroom_proto::v1::analyst_response::Response as Resp;
use cleanroom_proto::v1::{
    AddSchedule, GetAggregatePage, GetJob, GetReport, ListJobs, ListNodes, ListSchedules, RetryJob,
    ScheduleRef, SubmitJob,
};
use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, SerializeOptions};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Analyst;
use crate::api::analyst::answer;
use crate::error::CoordinatorError;
use crate::shared::Shared;

/// The JSON API's routes (nested under `/api/v1`).
pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/jobs", get(list_jobs).post(submit_job))
        .route("/jobs/{id}", get(get_job))
        .route("/jobs/{id}/retry", post(retry_job))
        .route("/jobs/{id}/groups", get(job_groups))
        .route("/nodes", get(nodes))
        .route("/schedules", get(list_schedules).post(add_schedule))
        .route(
            "/schedules/{name}",
            get(show_schedule).merge(on_schedule(MethodFilter::DELETE, Req::RemoveSchedule)),
        )
        .route(
            "/schedules/{name}/pause",
            on_schedule(MethodFilter::POST, Req::PauseSchedule),
        )
        .route(
            "/schedules/{name}/resume",
            on_schedule(MethodFilter::POST, Req::ResumeSchedule),
        )
        .route(
            "/schedules/{name}/run-now",
            on_schedule(MethodFilter::POST, Req::RunScheduleNow),
        )
        .route("/schedules/{name}/report", get(report))
}

fn pool() -> Result<&'static DescriptorPool, String> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(cleanroom_proto::FILE_DESCRIPTOR_SET)
            .map_err(|e| format!("the compiled proto descriptors do not decode: {e}"))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// `msg` (of the proto message `name`, e.g. `cleanroom.v1.JobInfo`) in protobuf's JSON mapping.
pub fn to_json<M: prost::Message>(name: &str, msg: &M) -> Result<Value, String> {
    let desc = pool()?
        .get_message_by_name(name)
        .ok_or_else(|| format!("no message {name} in the proto"))?;
    let dynamic = DynamicMessage::decode(desc, msg.encode_to_vec().as_slice())
        .map_err(|e| format!("{name} does not decode by reflection: {e}"))?;
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .stringify_64_bit_integers(false)
        .skip_default_fields(false);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| format!("{name} does not serialize: {e}"))
}

/// Reads the proto message `name` from JSON in protobuf's JSON mapping.
pub fn from_json<M: prost::Message + Default>(name: &str, value: Value) -> Result<M, String> {
    let desc = pool()?
        .get_message_by_name(name)
        .ok_or_else(|| format!("no message {name} in the proto"))?;
    let dynamic = DynamicMessage::deserialize_with_options(desc, value, &DeserializeOptions::new())
        .map_err(|e| format!("not a valid {name}: {e}"))?;
    M::decode(dynamic.encode_to_vec().as_slice()).map_err(|e| format!("not a valid {name}: {e}"))
}

/// An answer of the analyst API as an HTTP response.
pub fn respond(result: Result<Resp, CoordinatorError>) -> Response {
    let value = match result {
        Ok(Resp::Error(message)) => return error(refusal_status(&message), message),
        Ok(Resp::Job(m)) => to_json("cleanroom.v1.JobInfo", &m),
        Ok(Resp::Jobs(m)) => to_json("cleanroom.v1.JobList", &m),
        Ok(Resp::Nodes(m)) => to_json("cleanroom.v1.NodeList", &m),
        Ok(Resp::Schedule(m)) => to_json("cleanroom.v1.ScheduleInfo", &m),
        Ok(Resp::Schedules(m)) => to_json("cleanroom.v1.ScheduleList", &m),
        Ok(Resp::AggregatePage(m)) => to_json("cleanroom.v1.AggregatePage", &m),
        Ok(Resp::AuditHeads(m)) => to_json("cleanroom.v1.AuditHeads", &m),
        Ok(Resp::ReportJson(text)) => {
            serde_json::from_str(&text).map_err(|e| format!("the report is not JSON: {e}"))
        }
        Err(CoordinatorError::Refused(message)) => {
            return error(refusal_status(&message), message);
        }
        Err(CoordinatorError::Forbidden(message)) => {
            return error(StatusCode::FORBIDDEN, message);
        }
        Err(e) => {
            tracing::warn!(error = %e, "web console: request failed");
            return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        }
    };
    match value {
        Ok(v) => Json(v).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// 404 for an unknown job or schedule, 400 for any other refusal.
pub fn refusal_status(message: &str) -> StatusCode {
    if message.starts_with("no job '") || message.starts_with("no schedule '") {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::BAD_REQUEST
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn ask(shared: &Arc<Shared>, analyst: &Analyst, job_id: &str, request: Req) -> Response {
    respond(answer(shared, &analyst.1, &analyst.0, job_id, request).await)
}

/// A body in protobuf's JSON mapping (an empty body is the empty message).
fn body<M: prost::Message + Default>(name: &str, value: Option<Json<Value>>) -> Result<M, String> {
    let value = value.map_or_else(|| json!({}), |Json(v)| v);
    from_json(name, value)
}

fn bad_body(e: String) -> Response {
    error(StatusCode::BAD_REQUEST, e)
}

#[derive(Debug, Deserialize)]
struct Limit {
    limit: Option<u32>,
}

async fn list_jobs(
    State(shared): State<Arc<Shared>>,
    Extension(analyst): Extension<Analyst>,
    Query(q): Query<Limit>,
) -> Response {
    let list = ListJobs {
        limit: q.limit.unwrap_or(0),
    };
    ask(&shared, &analyst, "", Req::List(list)).await
}

async fn submit_job(
    State(shared): State<Arc<Shared>>,
    Extension(analyst): Extension<Analyst>,
    value: Option<Json<Value>>,
) -> Response {
    match body::<SubmitJob>("cleanroom.v1.SubmitJob", value) {
        Ok(submit) => ask(&shared, &analyst, "", Req::Submit(submit)).await,
        Err(e) => bad_body(e),
    }
}

async fn get_job(
    State(shared): State<Arc<Shared>>,
    Extension(analyst): Extension<Analyst>,
    Path(id): Path<String>,
) -> Response {
    ask(&shared, &analyst, &id, Req::Get(GetJob {})).await
}

async fn retry_job(
    State(shared): State<Arc<Shared>>,
    Extension(analyst): Extension<Analyst>,
    Path(id): Path<String>,
    value: Option<Json<Value>>,
) -> Response {
    match body::<RetryJob>("cleanroom.v1.RetryJob", value) {
        Ok(retry) => ask(&shared, &analyst, &id, Req::Retry(retry)).await,
        Err(e) => bad_body(e),
    }
}

#[derive(Debug, Deserialize)]
struct Page {
    offset: Option<u64>,
    limit: Option<u32>,
}

async fn job_groups(
    State(shared): State<Arc<Shared>>,
    Extension(analyst): Extension<Analyst>,
    Path(id): Path<String>,
    Query(q): Query<Page>,
) -> Response {
    let page = GetAggregatePage {
        offset: q.offset.unwrap_or(0),
        limit: q.limit.unwrap_or(0),
    };
    ask(&shared, &analyst, &id, Req::AggregatePage(page)).await
}

async fn nodes(
    State(shared): State<Arc<Shared>>,
    Extension(analyst): Extension<Analyst>,
) -> Response {
    ask(&shared, &analyst, "", Req::Nodes(ListNodes {})).await
}

async fn list_schedules(
    State(shared): State<Arc<Shared>>,
    Extension(analyst): Extension<Analyst>,
) -> Response {
    ask(&shared, &analyst, "", Req::ListSchedules(ListSchedules {})).await
}

async fn add_schedule(
    State(shared): State<Arc<Shared>>,
    Extension(analyst): Extension<Analyst>,
    value: Option<Json<Value>>,
) -> Response {
    match body::<AddSchedule>("cleanroom.v1.AddSchedule", value) {
        Ok(add) => ask(&shared, &analyst, "", Req::AddSchedule(add)).await,
        Err(e) => bad_body(e),
    }
}

#[derive(Debug, Deserialize)]
struct Since {
    since_ms: Option<i64>,
}

fn schedule_ref(name: String, since_ms: i64) -> ScheduleRef {
    ScheduleRef { name, since_ms }
}

async fn show_schedule(
    State(shared): State<Arc<Shared>>,
    Extension(analyst): Extension<Analyst>,
    Path(name): Path<String>,
    Query(q): Query<Since>,
) -> Response {
    let r = schedule_ref(name, q.since_ms.unwrap_or(0));
    ask(&shared, &analyst, "", Req::ShowSchedule(r)).await
}

/// `method` on `/schedules/{name}…`, a body-less request that `make` builds from the schedule's
/// name (remove, pause, resume, run now).
fn on_schedule(method: MethodFilter, make: fn(ScheduleRef) -> Req) -> MethodRouter<Arc<Shared>> {
    on(
        method,
        move |State(shared): State<Arc<Shared>>,
              Extension(analyst): Extension<Analyst>,
              Path(name): Path<String>| async move {
            ask(&shared, &analyst, "", make(schedule_ref(name, 0))).await
        },
    )
}

async fn report(
    State(shared): State<Arc<Shared>>,
    Extension(analyst): Extension<Analyst>,
    Path(name): Path<String>,
    Query(q): Query<Since>,
) -> Response {
    let r = GetReport {
        name,
        since_ms: q.since_ms.unwrap_or(0),
    };
    ask(&shared, &analyst, "", Req::Report(r)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleanroom_proto::v1::{JobInfo, JobKind, JobSpec, JobState, PartySpec};

    #[test]
    fn messages_round_trip_through_json() {
        let info = JobInfo {
            job_id: "j1".into(),
            state: JobState::Succeeded as i32,
            created_ms: 1_764_000_000_000,
            spec: Some(JobSpec {
                kind: JobKind::Overlap as i32,
                parties: vec![PartySpec {
                    node: "acme".into(),
                    dataset: "customers".into(),
                    keys: vec!["email".into()],
                    learns_membership: false,
                }],
                purpose: "measurement".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = to_json("cleanroom.v1.JobInfo", &info).unwrap();
        assert_eq!(v["job_id"], "j1");
        assert_eq!(v["state"], "JOB_STATE_SUCCEEDED");
        assert_eq!(v["created_ms"], 1_764_000_000_000i64);
        assert_eq!(v["spec"]["parties"][0]["keys"][0], "email");
        let back: JobInfo = from_json("cleanroom.v1.JobInfo", v).unwrap();
        assert_eq!(back, info);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = from_json::<SubmitJob>("cleanroom.v1.SubmitJob", json!({"spek": {}})).unwrap_err();
        assert!(e.contains("spek"), "{e}");
    }
}
