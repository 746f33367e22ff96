//! A job's work on this node's own cluster, in pieces, while the exchange goes on: the
//! partner's points to re-blind ([`Step::Reblind`](crate::job::protocol::Step), from PSI and
//! overlap-sum, [`ClusterReblinder::reblind`]) and an overlap-sum value holder's rows to encrypt
//! ([`Step::Encrypt`](crate::job::protocol::Step), [`ClusterEncryptor::encrypt`]); and, at the
//! end, a spilled session's final comparison ([`Step::Merge`](crate::job::protocol::Step),
//! [`ClusterMerger::merge`], itself in pieces of buckets). Each piece runs as its own cluster
//! job, and they come back in the order they finish. Dropping [`ClusterPieces`] stops those
//! still running (a failed job leaves none).

use std::sync::Arc;

use cleanroom_circuits::spill::BucketMatches;
use cleanroom_circuits::{EncodedPoint, POINT_LEN};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::data::cluster_encrypt::ClusterEncryptor;
use crate::data::cluster_merge::{ClusterMerger, MergeFailure};
use crate::data::cluster_reblind::{ClusterReblinder, ReblindFailure};
use crate::error::{JobError, NodeError};
use crate::job::overlap_sum::EncryptPiece;
use crate::job::psi::{MergeRequest, ReblindPiece};

/// A piece back from the cluster.
pub(crate) enum PieceBack {
    /// Where it starts in the partner's stream, and its points re-blinded.
    Reblinded(u64, Result<Vec<EncodedPoint>, ReblindFailure>),
    /// Its first row among ours, and its rows' ciphertexts (or the cluster's error).
    Encrypted(u64, Result<Vec<u8>, String>),
    /// Every bucket's answer to the final comparison, in bucket order.
    Merged(Result<Vec<BucketMatches>, MergeFailure>),
}

/// The job's pieces on the cluster.
pub(crate) struct ClusterPieces {
    reblinder: Arc<ClusterReblinder>,
    /// Only for an overlap-sum's value holder.
    encryptor: Option<Arc<ClusterEncryptor>>,
    /// Only for a spilled session whose bucket files are in the cluster's `shared_dir`.
    merger: Option<Arc<ClusterMerger>>,
    /// Whether the final comparison ran on the cluster, for the log.
    merged: bool,
    running: JoinSet<PieceBack>,
    /// Pieces and points handed to the cluster to re-blind, for the log.
    pieces: u64,
    points: u64,
    /// Pieces and rows handed to the cluster to encrypt, for the log.
    encrypt_pieces: u64,
    rows: u64,
}

impl ClusterPieces {
    pub(crate) fn new(reblinder: ClusterReblinder) -> ClusterPieces {
        ClusterPieces {
            reblinder: Arc::new(reblinder),
            encryptor: None,
            merger: None,
            merged: false,
            running: JoinSet::new(),
            pieces: 0,
            points: 0,
            encrypt_pieces: 0,
            rows: 0,
        }
    }

    /// Rows may be encrypted on the cluster too.
    pub(crate) fn with_encryptor(mut self, encryptor: ClusterEncryptor) -> ClusterPieces {
        self.encryptor = Some(Arc::new(encryptor));
        self
    }

    /// The final comparison may run on the cluster too.
    pub(crate) fn with_merger(mut self, merger: ClusterMerger) -> ClusterPieces {
        self.merger = Some(Arc::new(merger));
        self
    }

    /// Whether this job's final comparison can run on the cluster.
    pub(crate) fn merges(&self) -> bool {
        self.merger.is_some()
    }

    /// Sends the final comparison to the cluster; an error if this job has no merger there.
    pub(crate) fn start_merge(&mut self, request: MergeRequest) -> Result<(), JobError> {
        let merger = self.merger.as_ref().map(Arc::clone).ok_or_else(|| {
            JobError::Internal(
                "the protocol handed out its buckets to merge, and this job merges none off the \
                 node"
                    .into(),
            )
        })?;
        self.merged = true;
        let MergeRequest { merge, first_size } = request;
        self.running.spawn(
            async move { PieceBack::Merged(merger.merge(merge, first_size).await) }
                .instrument(tracing::Span::current()),
        );
        Ok(())
    }

    /// Whether the final comparison was handed to the cluster.
    pub(crate) fn merged(&self) -> bool {
        self.merged
    }

    /// Sends `piece` to the cluster (its job's log lines keep the job's span).
    pub(crate) fn start(&mut self, piece: ReblindPiece) {
        self.pieces += 1;
        self.points += (piece.points.len() / POINT_LEN) as u64;
        let reblinder = Arc::clone(&self.reblinder);
        let ReblindPiece { offset, points } = piece;
        self.running.spawn(
            async move { PieceBack::Reblinded(offset, reblinder.reblind(points).await) }
                .instrument(tracing::Span::current()),
        );
    }

    /// Sends rows to the cluster to encrypt; an error if this job has no encryptor there.
    pub(crate) fn start_encrypt(&mut self, piece: EncryptPiece) -> Result<(), JobError> {
        let encryptor = self.encryptor.as_ref().map(Arc::clone).ok_or_else(|| {
            JobError::Internal(
                "the protocol handed out rows to encrypt, and this job encrypts none off the \
                 node"
                    .into(),
            )
        })?;
        self.encrypt_pieces += 1;
        self.rows += piece.row_count;
        let EncryptPiece { offset, rows, .. } = piece;
        self.running.spawn(
            async move { PieceBack::Encrypted(offset, encryptor.encrypt(rows).await) }
                .instrument(tracing::Span::current()),
        );
        Ok(())
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

    /// Pieces and points sent to the cluster to re-blind so far.
    pub(crate) fn sent(&self) -> (u64, u64) {
        (self.pieces, self.points)
    }

    /// Pieces and rows sent to the cluster to encrypt so far.
    pub(crate) fn encrypted(&self) -> (u64, u64) {
        (self.encrypt_pieces, self.rows)
    }
}

fn lost(e: tokio::task::JoinError) -> NodeError {
    JobError::Internal(format!("a piece's task on this node failed: {e}")).into()
}
