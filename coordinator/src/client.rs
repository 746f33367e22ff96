//! The analyst's side of the coordinator API: one bidirectional stream per request.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cleanroom_proto::v1::{
    AddSchedule, AggregatePage, AnalystRequest, AuditHeadRecord, Envelope, GetAggregatePage,
    GetAuditHeads, GetJob, GetReport, JobInfo, JobKind, JobSpec, JobState, ListJobs, ListNodes,
    ListSchedules, NodeInfo, Phase, RetryJob, ScheduleInfo, ScheduleRef, SubmitJob,
    analyst_request::Request, analyst_response::Response, envelope::Body,
};
use cleanroom_transport::{Credentials, Identity, TransportTuning};

use crate::error::CoordinatorError;

/// A connection to the coordinator, authenticated with an analyst certificate.
#[derive(Debug)]
pub struct AnalystClient {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl AnalystClient {
    /// Connects to the coordinator at `addr`.
    pub async fn connect(addr: SocketAddr, creds: &Credentials) -> Result<Self, CoordinatorError> {
        let endpoint =
            cleanroom_transport::client_endpoint(creds, &TransportTuning::default(), addr)?;
        let conn = cleanroom_transport::connect(&endpoint, addr, &Identity::coordinator()).await?;
        Ok(Self { endpoint, conn })
    }

    async fn call(&self, job_id: &str, request: Request) -> Result<Response, CoordinatorError> {
        let (mut send, mut recv) = cleanroom_transport::open_bi(&self.conn).await?;
        send.send(&Envelope {
            job_id: job_id.to_owned(),
            phase: Phase::Analyst as i32,
            body: Some(Body::AnalystRequest(AnalystRequest {
                request: Some(request),
            })),
        })
        .await?;
        send.finish()?;
        let env = recv.recv_expect(job_id, Phase::Analyst).await?;
        match env.body {
            Some(Body::AnalystResponse(r)) => match r.response {
                Some(Response::Error(e)) => Err(CoordinatorError::Refused(e)),
                Some(r) => Ok(r),
                None => Err(protocol("empty response")),
            },
            _ => Err(protocol("expected an analyst response")),
        }
    }

    /// Submits a job; the same non-empty `idempotency_key` with the same spec returns the same job.
    pub async fn submit(
        &self,
        spec: JobSpec,
        idempotency_key: &str,
    ) -> Result<JobInfo, CoordinatorError> {
        let request = Request::Submit(SubmitJob {
            spec: Some(spec),
            idempotency_key: idempotency_key.to_owned(),
        });
        match self.call("", request).await? {
            Response::Job(info) => Ok(info),
            _ => Err(protocol("expected a job")),
        }
    }

    /// One job's state, history and results.
    pub async fn get(&self, job_id: &str) -> Result<JobInfo, CoordinatorError> {
        match self.call(job_id, Request::Get(GetJob {})).await? {
            Response::Job(info) => Ok(info),
            _ => Err(protocol("expected a job")),
        }
    }

    /// Groups `offset`, `offset + 1`, … of a succeeded aggregate job's result: at most `limit`
    /// (0: the coordinator's page cap), possibly fewer (each answer stays under the frame cap);
    /// none past the end.
    pub async fn aggregate_page(
        &self,
        job_id: &str,
        offset: u64,
        limit: u32,
    ) -> Result<AggregatePage, CoordinatorError> {
        let request = Request::AggregatePage(GetAggregatePage { offset, limit });
        match self.call(job_id, request).await? {
            Response::AggregatePage(page) if page.offset == offset => Ok(page),
            Response::AggregatePage(_) => Err(protocol("aggregate page at the wrong offset")),
            _ => Err(protocol("expected an aggregate page")),
        }
    }

    /// Reads the groups `offset .. offset + count` (clamped to the result) of an aggregate job's
    /// result page by page, handing each page to `each` as it arrives: the whole result never
    /// has to be in memory at once.
    pub async fn aggregate_groups(
        &self,
        job_id: &str,
        offset: u64,
        count: u64,
        mut each: impl FnMut(&AggregatePage),
    ) -> Result<(), CoordinatorError> {
        let mut next = offset;
        let end = offset.saturating_add(count);
        while next < end {
            let want = u32::try_from(end - next).unwrap_or(u32::MAX);
            let page = self.aggregate_page(job_id, next, want).await?;
            if page.groups.is_empty() {
                if next < page.total_groups {
                    return Err(protocol("the coordinator sent an empty aggregate page"));
                }
                break;
            }
            if page.groups.len() as u64 > end - next {
                return Err(protocol("the coordinator sent more groups than asked"));
            }
            next += page.groups.len() as u64;
            each(&page);
        }
        Ok(())
    }

    /// Completes `info`'s aggregate result with the groups GetJob left out (a result too large
    /// for one frame comes without them).
    pub async fn fill_aggregate_groups(&self, info: &mut JobInfo) -> Result<(), CoordinatorError> {
        let Some(result) = info.aggregate.as_mut() else {
            return Ok(());
        };
        if result.groups.len() as u64 >= result.total_groups {
            return Ok(());
        }
        let (job_id, have) = (info.job_id.clone(), result.groups.len() as u64);
        let mut groups = std::mem::take(&mut result.groups);
        self.aggregate_groups(&job_id, have, u64::MAX, |page| {
            groups.extend(page.groups.iter().cloned())
        })
        .await?;
        if let Some(result) = info.aggregate.as_mut() {
            result.groups = groups;
        }
        Ok(())
    }

    /// The most recent jobs.
    pub async fn list(&self, limit: u32) -> Result<Vec<JobInfo>, CoordinatorError> {
        match self.call("", Request::List(ListJobs { limit })).await? {
            Response::Jobs(list) => Ok(list.jobs),
            _ => Err(protocol("expected a job list")),
        }
    }

    /// Nodes the coordinator knows, and whether each is connected now.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, CoordinatorError> {
        match self.call("", Request::Nodes(ListNodes {})).await? {
            Response::Nodes(list) => Ok(list.nodes),
            _ => Err(protocol("expected a node list")),
        }
    }

    /// The signed audit heads `node` reported (needs the read-all or admin grant).
    pub async fn audit_heads(&self, node: &str) -> Result<Vec<AuditHeadRecord>, CoordinatorError> {
        let request = Request::AuditHeads(GetAuditHeads {
            node: node.to_owned(),
        });
        match self.call("", request).await? {
            Response::AuditHeads(list) => Ok(list.heads),
            _ => Err(protocol("expected audit heads")),
        }
    }

    /// Resubmits a failed, vetoed or cancelled job as a new job (its history names the old one).
    /// An empty `idempotency_key` means `retry:<job_id>`: retrying the same job twice gives the
    /// same new job.
    pub async fn retry(
        &self,
        job_id: &str,
        idempotency_key: &str,
    ) -> Result<JobInfo, CoordinatorError> {
        let request = Request::Retry(RetryJob {
            idempotency_key: idempotency_key.to_owned(),
        });
        match self.call(job_id, request).await? {
            Response::Job(info) => Ok(info),
            _ => Err(protocol("expected a job")),
        }
    }

    /// Adds a schedule.
    pub async fn add_schedule(&self, add: AddSchedule) -> Result<ScheduleInfo, CoordinatorError> {
        self.schedule_call(Request::AddSchedule(add)).await
    }

    /// The live schedules.
    pub async fn list_schedules(&self) -> Result<Vec<ScheduleInfo>, CoordinatorError> {
        match self
            .call("", Request::ListSchedules(ListSchedules {}))
            .await?
        {
            Response::Schedules(list) => Ok(list.schedules),
            _ => Err(protocol("expected a schedule list")),
        }
    }

    /// One schedule with its runs scheduled at or after `since_ms` (0: all).
    pub async fn show_schedule(
        &self,
        name: &str,
        since_ms: i64,
    ) -> Result<ScheduleInfo, CoordinatorError> {
        self.schedule_call(Request::ShowSchedule(ScheduleRef {
            name: name.to_owned(),
            since_ms,
        }))
        .await
    }

    /// Pauses a schedule.
    pub async fn pause_schedule(&self, name: &str) -> Result<ScheduleInfo, CoordinatorError> {
        self.schedule_call(Request::PauseSchedule(schedule_ref(name)))
            .await
    }

    /// Resumes a paused schedule (occurrences during the pause are not run).
    pub async fn resume_schedule(&self, name: &str) -> Result<ScheduleInfo, CoordinatorError> {
        self.schedule_call(Request::ResumeSchedule(schedule_ref(name)))
            .await
    }

    /// Removes a schedule (its history stays reportable).
    pub async fn remove_schedule(&self, name: &str) -> Result<ScheduleInfo, CoordinatorError> {
        self.schedule_call(Request::RemoveSchedule(schedule_ref(name)))
            .await
    }

    /// Submits a schedule's job now; returns the job.
    pub async fn run_schedule_now(&self, name: &str) -> Result<JobInfo, CoordinatorError> {
        match self
            .call("", Request::RunScheduleNow(schedule_ref(name)))
            .await?
        {
            Response::Job(info) => Ok(info),
            _ => Err(protocol("expected a job")),
        }
    }

    /// A schedule's report as JSON (read it with `report::ScheduleReport::from_json`).
    pub async fn report(&self, name: &str, since_ms: i64) -> Result<String, CoordinatorError> {
        let request = Request::Report(GetReport {
            name: name.to_owned(),
            since_ms,
        });
        match self.call("", request).await? {
            Response::ReportJson(json) => Ok(json),
            _ => Err(protocol("expected a report")),
        }
    }

    async fn schedule_call(&self, request: Request) -> Result<ScheduleInfo, CoordinatorError> {
        match self.call("", request).await? {
            Response::Schedule(info) => Ok(info),
            _ => Err(protocol("expected a schedule")),
        }
    }

    /// Polls a job until it reaches a terminal state or `timeout` passes; `on_poll` sees each
    /// intermediate state (for progress display).
    pub async fn wait(
        &self,
        job_id: &str,
        timeout: Duration,
        mut on_poll: impl FnMut(&JobInfo),
    ) -> Result<JobInfo, CoordinatorError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(20);
        loop {
            let info = self.get(job_id).await?;
            if is_terminal(info.state) {
                return Ok(info);
            }
            on_poll(&info);
            if Instant::now() >= deadline {
                return Err(CoordinatorError::Refused(format!(
                    "job {job_id} is still {} after {timeout:?}; check later with `cleanroom job status {job_id}`",
                    state_name(info.state)
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}

/// Whether a job state is final.
pub fn is_terminal(state: i32) -> bool {
    matches!(
        JobState::try_from(state),
        Ok(JobState::Succeeded | JobState::Failed | JobState::Vetoed | JobState::Cancelled)
    )
}

/// A job kind's name as the CLI, the console and the metrics print it ("overlap-sum").
pub fn kind_name(kind: i32) -> &'static str {
    match JobKind::try_from(kind) {
        Ok(JobKind::Overlap) => "overlap",
        Ok(JobKind::Match) => "match",
        Ok(JobKind::Aggregate) => "aggregate",
        Ok(JobKind::OverlapSum) => "overlap-sum",
        _ => "unknown",
    }
}

/// A job state's name as the CLI prints it ("succeeded").
pub fn state_name(state: i32) -> &'static str {
    match JobState::try_from(state) {
        Ok(JobState::Pending) => "pending",
        Ok(JobState::Offered) => "offered",
        Ok(JobState::Running) => "running",
        Ok(JobState::Succeeded) => "succeeded",
        Ok(JobState::Failed) => "failed",
        Ok(JobState::Vetoed) => "vetoed",
        Ok(JobState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

fn schedule_ref(name: &str) -> ScheduleRef {
    ScheduleRef {
        name: name.to_owned(),
        since_ms: 0,
    }
}

fn protocol(reason: &str) -> CoordinatorError {
    CoordinatorError::Protocol {
        peer: "coordinator".into(),
        reason: reason.into(),
    }
}
