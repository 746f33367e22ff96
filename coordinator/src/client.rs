//! The analyst's side of the coordinator API: one bidirectional stream per request.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cleanroom_proto::v1::{
    AnalystRequest, Envelope, GetJob, JobInfo, JobSpec, JobState, ListJobs, ListNodes, NodeInfo,
    Phase, SubmitJob, analyst_request::Request, analyst_response::Response, envelope::Body,
};
use cleanroom_transport::{Credentials, Identity, TransportTuning};

use crate::CoordinatorError;

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

fn protocol(reason: &str) -> CoordinatorError {
    CoordinatorError::Protocol {
        peer: "coordinator".into(),
        reason: reason.into(),
    }
}
