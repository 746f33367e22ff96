//! The job state machine, as the store enforces it.

use cleanroom_proto::v1::JobState;

/// Lower-case name of a state, as analysts read it ("pending", "running", …).
pub fn state_name(state: &JobState) -> &'static str {
    match state {
        JobState::Unspecified => "unspecified",
        JobState::Pending => "pending",
        JobState::Offered => "offered",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Vetoed => "vetoed",
        JobState::Cancelled => "cancelled",
    }
}

/// Whether `state` is final (succeeded, failed, vetoed or cancelled): such a job never moves again.
pub fn is_terminal(state: JobState) -> bool {
    matches!(
        state,
        JobState::Succeeded | JobState::Failed | JobState::Vetoed | JobState::Cancelled
    )
}

/// Whether the job state machine allows moving from `from` to `to`:
/// pending → offered | failed | cancelled | vetoed; offered → running | vetoed | failed |
/// cancelled; running → succeeded | failed | cancelled. Terminal states never move, and no state
/// moves to itself.
pub fn transition_allowed(from: JobState, to: JobState) -> bool {
    use JobState::*;
    matches!(
        (from, to),
        (Pending, Offered | Failed | Cancelled | Vetoed)
            | (Offered, Running | Vetoed | Failed | Cancelled)
            | (Running, Succeeded | Failed | Cancelled)
    )
}
