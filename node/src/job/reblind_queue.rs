//! The partner's points on their way to be re-blinded off the node (on its own executors) and
//! back: what a protocol keeps while it hands them out as pieces
//! ([`Step::Reblind`](crate::job::protocol::Step)) and takes them back, which the cluster
//! returns in any order.
//!
//! A protocol whose session needs the points in the partner's order (PSI in memory, an
//! overlap-sum's sessions, a spilled `match` that returns in order) takes back only the pieces
//! that continue what it has; one that does not care (a spilled overlap, which buckets them)
//! takes every piece as it comes.

use std::collections::{BTreeMap, VecDeque};

use cleanroom_circuits::{EncodedPoint, POINT_LEN, PsiError, check_peer_batch};

use crate::data::cluster_reblind::ReblindFailure;
use crate::error::{JobError, Party, Violation};
use crate::job::psi::ReblindPiece;

/// A piece's points back from the cluster, or why not: a bad point of the partner's is its
/// violation, named by its place in its whole stream; a failure of the cluster is this node's.
pub(crate) fn piece_points(
    partner: &str,
    offset: u64,
    result: Result<Vec<EncodedPoint>, ReblindFailure>,
) -> Result<Vec<EncodedPoint>, JobError> {
    match result {
        Ok(points) => Ok(points),
        Err(ReblindFailure::Peer(e)) => Err(JobError::violation(
            Party::Node(partner.to_owned()),
            Violation::Psi(e.at_offset(offset)),
        )),
        Err(ReblindFailure::Cluster(reason)) => Err(JobError::Compute {
            step: "re-blinding the partner's points on this node's cluster",
            reason,
        }),
    }
}

/// What an in-order session does next with the partner's points re-blinded off the node.
#[derive(Debug)]
pub(crate) enum PeerNext {
    /// Take these pieces, in the partner's order.
    Reblinded(Vec<Vec<EncodedPoint>>),
    /// Every point is back and taken: the partner's end marker, with its total.
    End(u64),
}

/// The partner's points of a session that takes them in order (an overlap-sum's), re-blinded off
/// the node: its batches and its end marker wait here, the end until every piece is back.
#[derive(Debug)]
pub(crate) struct InOrderPoints {
    pub(crate) pieces: ReblindQueue,
    end: Option<u64>,
}

impl InOrderPoints {
    pub(crate) fn new(in_flight: usize, piece_points: usize) -> InOrderPoints {
        InOrderPoints {
            pieces: ReblindQueue::new(in_flight, piece_points, false),
            end: None,
        }
    }

    /// The partner's end marker came; it waits for its points.
    pub(crate) fn ended(&mut self, total: u64) {
        self.end = Some(total);
    }

    /// Whether the partner's end marker waits for pieces still out: the next phase's frames
    /// must wait too.
    pub(crate) fn holds_end(&self) -> bool {
        self.end.is_some()
    }

    /// Pieces to hand out now, and what the session can take (once).
    pub(crate) fn next(&mut self) -> (Vec<ReblindPiece>, Option<PeerNext>) {
        let pieces = self.pieces.hand_out();
        let next = if self.pieces.ready() {
            Some(PeerNext::Reblinded(self.pieces.take_back()))
        } else if self.pieces.pending() {
            None
        } else {
            self.end.take().map(PeerNext::End)
        };
        (pieces, next)
    }
}

/// Pieces of the partner's points out and back.
#[derive(Debug)]
pub(crate) struct ReblindQueue {
    /// Pieces out at once at most.
    in_flight: usize,
    /// Points a piece holds at most.
    piece_points: usize,
    /// The session takes pieces back in any order.
    any_order: bool,
    /// The partner's points that arrived and passed the wire checks.
    arrived: u64,
    /// Their batches not yet handed out.
    waiting: VecDeque<Vec<u8>>,
    /// Points handed out: where the next piece starts in the partner's stream.
    taken: u64,
    /// Pieces out that have not come back.
    out: usize,
    /// Pieces back, by where they start, until the session takes them.
    back: BTreeMap<u64, Vec<EncodedPoint>>,
    /// Points the session has taken back (where order matters).
    applied: u64,
}

impl ReblindQueue {
    pub(crate) fn new(in_flight: usize, piece_points: usize, any_order: bool) -> ReblindQueue {
        ReblindQueue {
            in_flight: in_flight.max(1),
            piece_points: piece_points.max(1),
            any_order,
            arrived: 0,
            waiting: VecDeque::new(),
            taken: 0,
            out: 0,
            back: BTreeMap::new(),
            applied: 0,
        }
    }

    /// One of the partner's batches, checked now (the session would check it on the node):
    /// nothing that is not whole points within its `declared` size leaves the node.
    pub(crate) fn arrive(&mut self, declared: u64, batch: Vec<u8>) -> Result<(), PsiError> {
        self.arrived += check_peer_batch(declared, self.arrived, &batch)?;
        if !batch.is_empty() {
            self.waiting.push_back(batch);
        }
        Ok(())
    }

    /// The batches that wait, gathered into pieces, while fewer than `in_flight` are out.
    pub(crate) fn hand_out(&mut self) -> Vec<ReblindPiece> {
        let mut pieces = Vec::new();
        while self.out < self.in_flight && !self.waiting.is_empty() {
            let mut points = Vec::new();
            while let Some(next) = self.waiting.front() {
                if !points.is_empty() && points.len() + next.len() > self.piece_points * POINT_LEN {
                    break;
                }
                if let Some(next) = self.waiting.pop_front() {
                    points.extend_from_slice(&next);
                }
            }
            let offset = self.taken;
            self.taken += (points.len() / POINT_LEN) as u64;
            self.out += 1;
            pieces.push(ReblindPiece { offset, points });
        }
        pieces
    }

    /// How many more pieces may go out now.
    pub(crate) fn room(&self) -> usize {
        self.in_flight.saturating_sub(self.out)
    }

    /// Points a piece holds at most.
    pub(crate) fn piece_points(&self) -> usize {
        self.piece_points
    }

    /// `pieces` the session took from its own store went out (their offsets are its own).
    pub(crate) fn went_out(&mut self, pieces: usize) {
        self.out += pieces;
    }

    /// Whether a piece is out.
    pub(crate) fn any_out(&self) -> bool {
        self.out > 0
    }

    /// A piece back; `false` if no piece that starts there is out.
    pub(crate) fn came_back(&mut self, offset: u64, points: Vec<EncodedPoint>) -> bool {
        if self.out == 0 || self.back.contains_key(&offset) {
            return false;
        }
        self.out -= 1;
        self.back.insert(offset, points);
        true
    }

    /// Pieces back that the session can take now: all of them when it takes any order, else
    /// those that continue what it has, in order.
    pub(crate) fn take_back(&mut self) -> Vec<Vec<EncodedPoint>> {
        if self.any_order {
            return std::mem::take(&mut self.back).into_values().collect();
        }
        let mut pieces = Vec::new();
        while let Some(entry) = self.back.first_entry() {
            if *entry.key() != self.applied {
                break;
            }
            let points = entry.remove();
            self.applied += points.len() as u64;
            pieces.push(points);
        }
        pieces
    }

    /// Whether [`take_back`](Self::take_back) has something for the session.
    pub(crate) fn ready(&self) -> bool {
        match self.back.first_key_value() {
            Some((&offset, _)) => self.any_order || offset == self.applied,
            None => false,
        }
    }

    /// Whether points wait, are out, or are back and not yet taken: the partner's end waits
    /// until none are.
    pub(crate) fn pending(&self) -> bool {
        !self.waiting.is_empty() || self.out > 0 || !self.back.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(n: usize, tag: u8) -> Vec<EncodedPoint> {
        vec![[tag; POINT_LEN]; n]
    }

    /// Batches gather into pieces of at most `piece_points`, at most `in_flight` out; pieces
    /// back out of order are taken in order; a piece that was not out is refused.
    #[test]
    fn pieces_go_out_in_turn_and_come_back_in_order() {
        let mut q = ReblindQueue::new(2, 4, false);
        for tag in 0..5u8 {
            q.arrive(100, points(2, tag).concat()).unwrap();
        }
        let out = q.hand_out();
        let offsets: Vec<(u64, usize)> = out
            .iter()
            .map(|p| (p.offset, p.points.len() / POINT_LEN))
            .collect();
        assert_eq!(offsets, [(0, 4), (4, 4)]);
        assert_eq!(q.room(), 0);
        assert!(q.hand_out().is_empty());
        assert!(q.came_back(4, points(4, 9)));
        assert!(!q.ready(), "the piece at 0 is not back");
        assert!(!q.came_back(4, points(4, 9)), "already back");
        assert!(q.came_back(0, points(4, 8)));
        let back: Vec<u8> = q.take_back().iter().map(|p| p[0][0]).collect();
        assert_eq!(back, [8, 9]);
        assert!(q.pending(), "a batch still waits");
        let last = q.hand_out();
        assert_eq!((last[0].offset, last[0].points.len()), (8, 2 * POINT_LEN));
        assert!(q.came_back(8, points(2, 7)));
        assert_eq!(q.take_back().len(), 1);
        assert!(!q.pending());
        assert!(!q.came_back(10, points(1, 0)), "nothing is out");
    }

    #[test]
    fn any_order_takes_every_piece_back() {
        let mut q = ReblindQueue::new(3, 4, true);
        q.went_out(2);
        assert!(q.came_back(40, points(1, 1)));
        assert!(q.ready());
        assert_eq!(q.take_back().len(), 1);
        assert!(q.any_out());
    }

    #[test]
    fn batches_past_the_declared_size_are_refused_before_they_leave() {
        let mut q = ReblindQueue::new(1, 4, false);
        q.arrive(3, points(2, 0).concat()).unwrap();
        assert_eq!(
            q.arrive(3, points(2, 0).concat()).unwrap_err(),
            PsiError::TooManyPoints {
                declared: 3,
                received: 4
            }
        );
        assert_eq!(
            q.arrive(3, vec![0; 33]).unwrap_err(),
            PsiError::BatchNotMultipleOfPointLen { len: 33 }
        );
    }
}
