//! The peer's stream, read ahead of the protocol.
//!
//! A reader task drains the peer's stream as fast as it arrives, so QUIC flow control can never
//! deadlock the two sides: each may be busy for seconds (loading, blinding, sorting) while the
//! other is still sending. What the reader takes is first checked: the job id, and what the peer
//! may make us buffer at all ([`FrameBudget`]).
//!
//! Under a `memory_limit`, what waits for the protocol is bounded too. The peer may return our
//! points faster than we take them (at 2^24 it sent 512 MiB in a few seconds while our last
//! buckets were sorted), so the queue holds at most [`ReadAhead::cap`] bytes of point batches in
//! memory; the points of later batches go to an unnamed file in the node's spill directory and
//! are read back when the protocol takes their frame. The file holds only what the peer sent us
//! (blinded points, encrypted rows), never an identifier, and disappears with the job.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cleanroom_proto::v1::{Abort, Envelope, envelope::Body};
use cleanroom_transport::{FramedRecv, TransportError};
use tokio::sync::mpsc;

use super::violation;
use crate::error::{JobError, NodeError, Party, Timeout};
use crate::job::frame_budget::FrameBudget;

/// The most frames the driver lets the protocol hold unused ([`Protocol::backlog`]) when it
/// hands over what arrived between two pieces of CPU work. A piece takes at most four batches,
/// so this keeps the protocol supplied, while the rest waits here, where its memory is bounded.
///
/// [`Protocol::backlog`]: crate::job::protocol::Protocol::backlog
pub(crate) const FRAMES_BETWEEN_WORK: usize = 16;

/// The bounds on the queue of a node with a `memory_limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadAhead {
    /// Most bytes of point batches held in memory.
    pub(crate) cap: u64,
}

impl ReadAhead {
    /// The bound for a node's `memory_limit`: a thirty-second of it (32 MiB under 1 GiB), at
    /// least 1 MiB and at most 64 MiB. Small next to what a job holds anyway, and large enough
    /// that a peer returning points at the speed of loopback rarely reaches the file.
    pub(crate) fn for_limit(memory_limit: u64) -> ReadAhead {
        ReadAhead {
            cap: (memory_limit / 32).clamp(1 << 20, 64 << 20),
        }
    }
}

/// What the reader task passes on.
pub(crate) enum Incoming {
    Frame(Box<Envelope>),
    Failed(String),
    /// The connection itself went away (timed out, closed): no fault of the peer's bytes.
    Lost(String),
    /// This node could not keep what arrived (its read-ahead file failed).
    Local(String),
}

/// One entry of the queue: a frame with its points in memory, or one whose points wait in the
/// read-ahead file.
enum Queued {
    Ready(Incoming),
    Deferred {
        env: Box<Envelope>,
        at: u64,
        len: usize,
    },
}

/// The bytes of points a frame carries (0 for a frame without a batch).
fn point_bytes(env: &Envelope) -> u64 {
    match &env.body {
        Some(Body::Points(batch)) => batch.points.len() as u64,
        _ => 0,
    }
}

/// The sending half, held by the reader task: puts each frame in memory while the points held
/// there stay under the cap, else its points in the file.
pub(crate) struct QueueIn {
    tx: mpsc::UnboundedSender<Queued>,
    held: Arc<AtomicU64>,
    spill: Option<(ReadAhead, Arc<File>)>,
    written: u64,
}

impl QueueIn {
    /// Queues a frame. Returns false when the job no longer reads the queue (or the file
    /// failed, which the job is told).
    fn push(&mut self, mut env: Box<Envelope>) -> bool {
        let bytes = point_bytes(&env);
        let held = self.held.load(Ordering::Acquire);
        let queued = match &self.spill {
            Some((ahead, file)) if bytes > 0 && held.saturating_add(bytes) > ahead.cap => {
                let Some(Body::Points(batch)) = env.body.as_mut() else {
                    return false;
                };
                let points = std::mem::take(&mut batch.points);
                // A write of one batch (128 KiB) to the page cache: short enough to do here.
                if let Err(e) = file.write_all_at(&points, self.written) {
                    let _ = self.tx.send(Queued::Ready(Incoming::Local(format!(
                        "could not write the peer's frames to the spill directory: {e}"
                    ))));
                    return false;
                }
                let at = self.written;
                self.written += bytes;
                Queued::Deferred {
                    env,
                    at,
                    len: points.len(),
                }
            }
            _ => {
                self.held.fetch_add(bytes, Ordering::AcqRel);
                Queued::Ready(Incoming::Frame(env))
            }
        };
        self.tx.send(queued).is_ok()
    }

    /// Passes on how the stream ended.
    fn end(&self, how: Incoming) {
        let _ = self.tx.send(Queued::Ready(how));
    }
}

/// The peer's frames as the protocol takes them.
pub(crate) struct PeerFrames {
    rx: mpsc::UnboundedReceiver<Queued>,
    held: Arc<AtomicU64>,
    file: Option<Arc<File>>,
    partner: String,
    /// Bytes of points read back from the file so far.
    read_back: u64,
    /// The reader task, stopped when the job drops its frames: its stream would otherwise keep
    /// the peer's connection open after the job ended (a job given up by the coordinator is
    /// dropped, not ended).
    reader: Option<tokio::task::AbortHandle>,
}

impl Drop for PeerFrames {
    fn drop(&mut self) {
        if let Some(reader) = &self.reader {
            reader.abort();
        }
    }
}

/// A queue for the peer's frames: in memory only, or bounded by `ahead` with the rest in an
/// unnamed file under `spill_dir` (created if missing).
pub(crate) fn queue(
    partner: &str,
    bound: Option<(ReadAhead, &Path)>,
) -> Result<(QueueIn, PeerFrames), NodeError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let held = Arc::new(AtomicU64::new(0));
    let spill = match bound {
        Some((ahead, dir)) => {
            let file = std::fs::create_dir_all(dir)
                .and_then(|()| tempfile::tempfile_in(dir))
                .map_err(|e| JobError::Compute {
                    step: "read-ahead",
                    reason: format!(
                        "cannot create a file in the spill directory {}: {e}",
                        dir.display()
                    ),
                })?;
            Some((ahead, Arc::new(file)))
        }
        None => None,
    };
    let file = spill.as_ref().map(|(_, file)| file.clone());
    Ok((
        QueueIn {
            tx,
            held: held.clone(),
            spill,
            written: 0,
        },
        PeerFrames {
            rx,
            held,
            file,
            partner: partner.to_owned(),
            read_back: 0,
            reader: None,
        },
    ))
}

/// The peer's frames from `recv` (after `first`, if the hello came with the connection), read
/// by a task of their own into a [`queue`] bounded by `bound`; the task stops when they are
/// dropped.
pub(crate) fn read_peer(
    recv: FramedRecv,
    job_id: String,
    first: Option<Envelope>,
    budget: FrameBudget,
    partner: &str,
    bound: Option<(ReadAhead, &Path)>,
) -> Result<PeerFrames, NodeError> {
    let (queue, mut frames) = queue(partner, bound)?;
    frames.reader = Some(spawn_reader(recv, job_id, first, budget, queue));
    Ok(frames)
}

/// Reads the peer's stream into `queue` as fast as it arrives, checking job ids and what the
/// peer may make us buffer ([`FrameBudget`]).
fn spawn_reader(
    mut recv: FramedRecv,
    job_id: String,
    mut first: Option<Envelope>,
    mut budget: FrameBudget,
    mut queue: QueueIn,
) -> tokio::task::AbortHandle {
    let task = tokio::spawn(async move {
        loop {
            let env = match first.take() {
                Some(env) => env,
                None => match recv.recv().await {
                    Ok(Some(env)) => env,
                    Ok(None) => return,
                    Err(TransportError::Closed { reason }) => {
                        return queue.end(Incoming::Lost(reason));
                    }
                    Err(e) => return queue.end(Incoming::Failed(e.to_string())),
                },
            };
            if env.job_id != job_id {
                return queue.end(Incoming::Failed(format!(
                    "frame for job '{}' on the stream of job '{job_id}'",
                    env.job_id
                )));
            }
            if let Err(reason) = budget.admit(&env) {
                return queue.end(Incoming::Failed(reason));
            }
            if !queue.push(Box::new(env)) {
                return;
            }
        }
    });
    task.abort_handle()
}

impl PeerFrames {
    /// Bytes of the peer's points that waited in the file rather than in memory.
    pub(crate) fn read_back(&self) -> u64 {
        self.read_back
    }

    /// The peer's next frame, waiting at most `stall` for it.
    pub(crate) async fn next(&mut self, stall: Duration) -> Result<Envelope, NodeError> {
        let next = tokio::time::timeout(stall, self.rx.recv())
            .await
            .map_err(|_| {
                NodeError::from(Timeout::Silent {
                    peer: Party::Node(self.partner.clone()),
                    secs: stall.as_secs(),
                })
            })?;
        self.take(next)
    }

    /// The peer's next frame if one has arrived already, without waiting. The end of the
    /// peer's stream is not an error here: the protocol may need nothing more ([`Self::next`]
    /// says so when it does).
    pub(crate) fn try_next(&mut self) -> Result<Option<Envelope>, NodeError> {
        match self.rx.try_recv() {
            Ok(next) => self.take(Some(next)).map(Some),
            Err(mpsc::error::TryRecvError::Empty | mpsc::error::TryRecvError::Disconnected) => {
                Ok(None)
            }
        }
    }

    /// A queued entry as a frame (its points read back if they waited in the file) or as the
    /// job's error.
    fn take(&mut self, next: Option<Queued>) -> Result<Envelope, NodeError> {
        let incoming = match next {
            Some(Queued::Ready(incoming)) => {
                if let Incoming::Frame(env) = &incoming {
                    self.held.fetch_sub(point_bytes(env), Ordering::AcqRel);
                }
                Some(incoming)
            }
            Some(Queued::Deferred { mut env, at, len }) => {
                let mut points = vec![0; len];
                let read = match &self.file {
                    Some(file) => file.read_exact_at(&mut points, at),
                    None => Err(std::io::Error::other("no read-ahead file")),
                };
                read.map_err(|e| JobError::Compute {
                    step: "read-ahead",
                    reason: format!("could not read the peer's frames back: {e}"),
                })?;
                self.read_back += len as u64;
                if let Some(Body::Points(batch)) = env.body.as_mut() {
                    batch.points = points;
                }
                Some(Incoming::Frame(env))
            }
            None => None,
        };
        frame_or_error(incoming, &self.partner)
    }
}

/// What the reader passed on, as a frame or the job's error.
fn frame_or_error(next: Option<Incoming>, partner: &str) -> Result<Envelope, NodeError> {
    match next {
        Some(Incoming::Frame(env)) => {
            if let Some(Body::Abort(Abort { reason })) = &env.body {
                return Err(JobError::Aborted {
                    peer: Party::Node(partner.to_owned()),
                    reason: reason.clone(),
                }
                .into());
            }
            Ok(*env)
        }
        Some(Incoming::Failed(reason)) => Err(violation(partner, reason)),
        Some(Incoming::Lost(reason)) => Err(JobError::Lost {
            peer: Party::Node(partner.to_owned()),
            reason,
        }
        .into()),
        Some(Incoming::Local(reason)) => Err(JobError::Compute {
            step: "read-ahead",
            reason,
        }
        .into()),
        None => Err(JobError::ClosedEarly {
            peer: Party::Node(partner.to_owned()),
        }
        .into()),
    }
}

#[cfg(test)]
#[path = "peer_stream_tests.rs"]
mod tests;
