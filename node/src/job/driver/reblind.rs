//! Pieces of the partner's points re-blinded on this node's own cluster while the exchange goes
//! on: the PSI protocol hands them out ([`Step::Reblind`](crate::job::protocol::Step)), each
//! runs as its own cluster job ([`ClusterReblinder::reblind`]), and they come back in the order
//! they finish. Dropping [`Reblinds`] stops those still running (a failed job leaves none).

use std::sync::Arc;

use cleanroom_circuits::{EncodedPoint, POINT_LEN};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::data::cluster_reblind::{ClusterReblinder, ReblindFailure};
use crate::error::{JobError, NodeError};
use crate::job::psi::ReblindPiece;

/// A piece back: where it starts in the partner's stream, and its points re-blinded.
pub(crate) type PieceBack = (u64, Result<Vec<EncodedPoint>, ReblindFailure>);

/// The job's pieces on the cluster.
pub(crate) struct Reblinds {
    reblinder: Arc<ClusterReblinder>,
    running: JoinSet<PieceBack>,
    /// Pieces and points handed to the cluster, for the log.
    pieces: u64,
    points: u64,
}

impl Reblinds {
    pub(crate) fn new(reblinder: ClusterReblinder) -> Reblinds {
        Reblinds {
            reblinder: Arc::new(reblinder),
            running: JoinSet::new(),
            pieces: 0,
            points: 0,
        }
    }

    /// Sends `piece` to the cluster (its job's log lines keep the job's span).
    pub(crate) fn start(&mut self, piece: ReblindPiece) {
        self.pieces += 1;
        self.points += (piece.points.len() / POINT_LEN) as u64;
        let reblinder = Arc::clone(&self.reblinder);
        let ReblindPiece { offset, points } = piece;
        self.running.spawn(
            async move { (offset, reblinder.reblind(points).await) }
                .instrument(tracing::Span::current()),
        );
    }

    /// Pieces the protocol may have out at once: the cluster's `partitions`.
    pub(crate) fn in_flight(&self) -> usize {
        self.reblinder.pieces_in_flight
    }

    /// Whether a piece is still on the cluster.
    pub(crate) fn busy(&self) -> bool {
        !self.running.is_empty()
    }

    /// The next piece to finish (wait only while [`busy`](Self::busy)).
    pub(crate) async fn next(&mut self) -> Result<PieceBack, NodeError> {
        match self.running.join_next().await {
            Some(joined) => joined.map_err(lost),
            None => Err(JobError::Internal("waited for a piece while none was out".into()).into()),
        }
    }

    /// A piece that has finished already, if any.
    pub(crate) fn try_next(&mut self) -> Option<Result<PieceBack, NodeError>> {
        self.running.try_join_next().map(|j| j.map_err(lost))
    }

    /// Pieces and points sent to the cluster so far.
    pub(crate) fn sent(&self) -> (u64, u64) {
        (self.pieces, self.points)
    }
}

fn lost(e: tokio::task::JoinError) -> NodeError {
    JobError::Internal(format!("a piece's task on this node failed: {e}")).into()
}
