//! The key holder's sets outside memory (a node's `memory_limit`), and which of the value
//! holder's rows matched, one bit a row.
//!
//! A spilled key holder keeps three sets in its store's buckets ([`crate::spill`]): its own
//! points (sorted, from [`SpilledOwn`]), the value holder's points re-blinded, each with its
//! place in the value holder's stream ([`PointSet::PeerPlaced`]), and its own points as they
//! come back ([`PointSet::Returned`]). After the last returned point, the buckets are merged one
//! at a time and the matched places become bits ([`MatchedRows`]): the value holder's
//! ciphertexts then arrive in that same order and are summed as they come, as in memory.
//!
//! Our points go out bucket by bucket, each bucket sorted by encoding, not shuffled: as for a
//! spilled PSI session ([`crate::spill`]'s module docs), that order is a uniformly random
//! permutation of our items, independent of them, since the encodings of `k·H(x)` under a
//! secret uniform `k` are indistinguishable from uniform strings.

use crate::psi::merge::{MergeResult, combine, merge_buckets};
use crate::psi::received_within;
use crate::spill::{
    BUCKETS, BucketMatches, BucketReader, Merge, PointSet, PointStore, SpilledOwn,
    append_by_bucket, append_records_by_bucket, bucket_cap, placed, spill_error,
};
use crate::{EncodedPoint, PsiError};

/// Which of the value holder's rows (in its stream's order) are in the intersection: one bit a
/// row (2 MiB at 2^24 rows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MatchedRows {
    words: Vec<u64>,
    rows: u64,
    count: u64,
}

impl MatchedRows {
    /// No row matched yet, of `rows`.
    pub(super) fn new(rows: u64) -> MatchedRows {
        MatchedRows {
            words: vec![0; rows.div_ceil(64) as usize],
            rows,
            count: 0,
        }
    }

    /// Marks `row` matched; a row past the end or marked already changes nothing.
    pub(super) fn set(&mut self, row: u64) {
        if row >= self.rows {
            return;
        }
        let (word, bit) = ((row / 64) as usize, row % 64);
        if self.words[word] & (1 << bit) == 0 {
            self.words[word] |= 1 << bit;
            self.count += 1;
        }
    }

    /// Whether `row` matched.
    pub(super) fn contains(&self, row: u64) -> bool {
        row < self.rows && self.words[(row / 64) as usize] & (1 << (row % 64)) != 0
    }

    /// How many rows matched.
    pub(super) fn count(&self) -> u64 {
        self.count
    }
}

/// A spilled key holder's store and its tallies.
pub(super) struct KhSpill {
    store: Box<dyn PointStore>,
    own_reader: BucketReader,
    own_size: u64,
    own_sent: u64,
    peer_counts: Box<[u64; BUCKETS]>,
    peer_received: u64,
    returned_counts: Box<[u64; BUCKETS]>,
    returned_received: u64,
}

impl std::fmt::Debug for KhSpill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KhSpill")
            .field("own_sent", &self.own_sent)
            .field("peer_received", &self.peer_received)
            .field("returned_received", &self.returned_received)
            .finish_non_exhaustive()
    }
}

impl KhSpill {
    /// Over our own set's store.
    pub(super) fn new(own: SpilledOwn) -> KhSpill {
        let own_size = own.size();
        KhSpill {
            store: own.store,
            own_reader: BucketReader::new(PointSet::Own),
            own_size,
            own_sent: 0,
            peer_counts: Box::new([0; BUCKETS]),
            peer_received: 0,
            returned_counts: Box::new([0; BUCKETS]),
            returned_received: 0,
        }
    }

    /// Our next batch of at most `batch_size` points, read from our buckets; `None` once all
    /// are out. Fails if the buckets hold another number of points than the set counted.
    pub(super) fn next_own(&mut self, batch_size: usize) -> Result<Option<Vec<u8>>, PsiError> {
        let store = self.store.as_mut();
        let (sent, total) = (&mut self.own_sent, self.own_size);
        self.own_reader.next_counted(store, batch_size, sent, total)
    }

    /// Whether every one of our points has been handed out.
    pub(super) fn own_done(&self) -> bool {
        self.own_sent == self.own_size
    }

    /// The value holder's points received so far.
    pub(super) fn peer_received(&self) -> u64 {
        self.peer_received
    }

    /// The value holder's next points, re-blinded and in its order: each goes to its bucket
    /// with its place in the stream. `peer_size` (its declared size, at most `u32::MAX`) bounds
    /// both how many may come and how many a bucket may hold.
    pub(super) fn store_peer(
        &mut self,
        peer_size: u64,
        reblinded: &[EncodedPoint],
    ) -> Result<(), PsiError> {
        let received = received_within(peer_size, self.peer_received, reblinded.len())?;
        let records: Vec<_> = reblinded
            .iter()
            .zip(self.peer_received..)
            // Fits: the declared size was checked against u32::MAX at the hello.
            .map(|(point, place)| placed(point, place as u32))
            .collect();
        append_records_by_bucket(
            self.store.as_mut(),
            PointSet::PeerPlaced,
            &records,
            &mut self.peer_counts,
            Some((bucket_cap(peer_size), "points")),
        )?;
        self.peer_received = received;
        Ok(())
    }

    /// Our points returned so far.
    pub(super) fn returned_received(&self) -> u64 {
        self.returned_received
    }

    /// A batch of our points coming back (checked against how many we sent): to their buckets.
    pub(super) fn store_returned(&mut self, batch: &[u8]) -> Result<(), PsiError> {
        let points = crate::psi::returned_points(batch, self.own_size, self.returned_received)?;
        append_by_bucket(
            self.store.as_mut(),
            PointSet::Returned,
            points,
            &mut self.returned_counts,
            Some((bucket_cap(self.own_size), "returned points")),
        )?;
        self.returned_received += points.len() as u64;
        Ok(())
    }

    /// Every point is in: which of the value holder's rows matched, and the bytes written to
    /// the store in all. The store is dropped here (a node's spill files with it), before the
    /// rows arrive.
    pub(super) fn matched(mut self) -> Result<(MatchedRows, u64), PsiError> {
        let mut answers = Vec::with_capacity(BUCKETS);
        merge_buckets(self.store.as_mut(), Merge::PeerPlaces, |a| answers.push(a))?;
        self.matched_from(answers)
    }

    /// Writes out what the store buffers, for its buckets to be merged elsewhere.
    pub(super) fn flush(&mut self) -> Result<(), PsiError> {
        self.store.flush().map_err(spill_error)
    }

    /// Which rows matched, from every bucket's answer to [`Merge::PeerPlaces`] in bucket order
    /// (merged here or elsewhere), and the bytes written to the store.
    pub(super) fn matched_from(
        self,
        answers: Vec<BucketMatches>,
    ) -> Result<(MatchedRows, u64), PsiError> {
        let MergeResult::Places(places) = combine(Merge::PeerPlaces, answers, self.peer_received)?
        else {
            return Err(PsiError::Spill(
                "the merge counted where places were due".into(),
            ));
        };
        let mut matched = MatchedRows::new(self.peer_received);
        for place in places {
            matched.set(u64::from(place));
        }
        Ok((matched, self.store.bytes_written()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matched_rows_count_each_row_once_and_ignore_rows_past_the_end() {
        let mut rows = MatchedRows::new(130);
        for row in [0, 63, 64, 129, 64, 130, 1000] {
            rows.set(row);
        }
        assert_eq!(rows.count(), 4);
        let set: Vec<u64> = (0..140).filter(|&r| rows.contains(r)).collect();
        assert_eq!(set, [0, 63, 64, 129]);
        assert_eq!(MatchedRows::new(0).count(), 0);
        assert!(!MatchedRows::new(0).contains(0));
    }
}
