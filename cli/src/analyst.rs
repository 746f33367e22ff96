//! What every analyst command does: connect with the analyst's certificate, wait for a job
//! with a spinner, and end with an exit code that says how the job went.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use cleanroom_coordinator::AnalystClient;
use cleanroom_coordinator::client::state_name;
use cleanroom_proto::v1::{JobInfo, JobState};
use cleanroom_transport::Credentials;

use crate::args::ConnArgs;
use crate::ui::spinner;

/// Connects with the analyst's certificate (as every analyst command does).
pub async fn connect(conn: &ConnArgs) -> anyhow::Result<AnalystClient> {
    let (Some(cert), Some(key)) = (&conn.cert, &conn.key) else {
        bail!(
            "give your analyst certificate and key with --cert and --key (or CLEANROOM_CERT and CLEANROOM_KEY); get them with `cleanroom pki request --role analyst --name NAME` and the CA's `cleanroom pki sign`"
        );
    };
    let creds = Credentials::load(&conn.ca, cert, key)?;
    // The TLS server name is the coordinator's consortium identity, not this host name.
    let addr = conn
        .coordinator
        .resolve()
        .await
        .with_context(|| format!("connecting to the coordinator at {}", conn.coordinator))?;
    AnalystClient::connect(addr, &creds)
        .await
        .with_context(|| format!("connecting to the coordinator at {}", conn.coordinator))
}

/// Exit code for a job: 0 if it succeeded or is still under way, 2 if vetoed, 1 otherwise.
pub fn exit_for(state: i32) -> ExitCode {
    match JobState::try_from(state) {
        Ok(JobState::Succeeded) => ExitCode::SUCCESS,
        Ok(JobState::Vetoed) => ExitCode::from(2),
        Ok(JobState::Pending | JobState::Offered | JobState::Running) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

/// Waits for a job to end (at most `timeout_secs`), with a spinner showing `message`, then its
/// state, on a terminal.
pub async fn wait(
    client: &AnalystClient,
    job_id: &str,
    timeout_secs: u64,
    message: String,
) -> anyhow::Result<JobInfo> {
    let progress = spinner(message);
    let done = client
        .wait(job_id, Duration::from_secs(timeout_secs), |info| {
            progress.set_message(format!("job {} is {}", info.job_id, state_name(info.state)));
        })
        .await;
    progress.finish_and_clear();
    Ok(done?)
}
