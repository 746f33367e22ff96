//! The value holder's rows and the key holder's points outside memory (a node's
//! `memory_limit`).
//!
//! The caller (a node's data side) blinds each row's key as the dataset is read, combines each
//! identifier's rows one bucket at a time and puts, per bucket, one record per distinct point:
//! the point, then its row of cells (`u64`, little-endian), sorted by point
//! ([`PointSet::ValueCells`]). The session reads those buckets twice, one at a time: once for
//! the points it sends, once for the rows it encrypts, so both go out in the same order. The key
//! holder's points, re-blinded, go to their buckets ([`PointSet::Peer`]). After its last point
//! every bucket is sorted and checked for a point sent twice; only then do they go back, bucket
//! by bucket.
//!
//! Neither order needs a shuffle ([`crate::spill`]'s module docs): our points are `k·H(x)`
//! sorted, a uniformly random permutation of our identifiers independent of them; the returned
//! points are `k·k_A·H(y)`, whose sorted order the key holder cannot link to the order it sent
//! without our `k`.

use crate::psi::received_within;
use crate::spill::{
    BUCKETS, BucketReader, PointSet, PointStore, append_by_bucket, bucket_cap,
    sort_bucket_distinct, spill_error,
};
use crate::{EncodedPoint, POINT_LEN, PsiError};

/// Bytes of one [`PointSet::ValueCells`] record of `cells` cells.
pub fn value_record_len(cells: usize) -> usize {
    POINT_LEN + 8 * cells
}

/// The value holder's combined rows, put in a store's [`PointSet::ValueCells`] buckets by the
/// caller: start a session over them with
/// [`ValueHolderSession::start_spilled`](super::ValueHolderSession::start_spilled).
#[derive(Debug)]
pub struct SpilledValues {
    store: Box<dyn PointStore>,
    size: u64,
    cells: usize,
}

impl SpilledValues {
    /// `size` distinct points with `cells` cells each, in `store`'s [`PointSet::ValueCells`]
    /// buckets: each point in its bucket ([`crate::spill::bucket_of`]), each bucket sorted by
    /// point with no point twice. The session checks all of it as it reads.
    pub fn new(store: Box<dyn PointStore>, size: u64, cells: usize) -> SpilledValues {
        SpilledValues { store, size, cells }
    }

    /// Distinct points (rows to send).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Cells per row.
    pub fn cells(&self) -> usize {
        self.cells
    }

    /// The store back, its rows unread (to check what a loader put there).
    pub fn into_store(self) -> Box<dyn PointStore> {
        self.store
    }
}

/// Reads the [`PointSet::ValueCells`] buckets in order, whole records at a time, checking each
/// bucket as it is read; holds one bucket.
#[derive(Debug, Default)]
struct RecordReader {
    next_bucket: usize,
    current: Vec<u8>,
    pos: usize,
    sent: u64,
}

impl RecordReader {
    /// Up to `max` records of `width` bytes, concatenated; `None` once `total` are out. Fails
    /// if the buckets hold another number of records, or a bucket is not whole records of
    /// sorted, distinct points of that bucket.
    fn next(
        &mut self,
        store: &mut dyn PointStore,
        width: usize,
        max: usize,
        total: u64,
    ) -> Result<Option<Vec<u8>>, PsiError> {
        if self.sent == total {
            return Ok(None);
        }
        let want = max.max(1) * width;
        let mut out = Vec::with_capacity(want.min(1 << 20));
        while out.len() < want {
            if self.pos == self.current.len() {
                if self.next_bucket == BUCKETS {
                    break;
                }
                self.current = read_value_bucket(store, self.next_bucket, width)?;
                self.next_bucket += 1;
                self.pos = 0;
                continue;
            }
            let take = (want - out.len()).min(self.current.len() - self.pos);
            out.extend_from_slice(&self.current[self.pos..self.pos + take]);
            self.pos += take;
        }
        if self.pos == self.current.len() {
            self.current = Vec::new();
            self.pos = 0;
        }
        let got = (out.len() / width) as u64;
        if got == 0 || self.sent + got > total {
            return Err(PsiError::Spill(format!(
                "our spilled rows hold {} where {total} were counted",
                self.sent + got
            )));
        }
        self.sent += got;
        Ok(Some(out))
    }
}

/// Bucket `b` of [`PointSet::ValueCells`], checked: whole `width`-byte records whose points
/// belong to `b` and rise strictly.
fn read_value_bucket(
    store: &mut dyn PointStore,
    b: usize,
    width: usize,
) -> Result<Vec<u8>, PsiError> {
    let bytes = store.read(PointSet::ValueCells, b).map_err(spill_error)?;
    if !bytes.len().is_multiple_of(width) {
        return Err(PsiError::Spill(format!(
            "a row bucket holds {} bytes, not whole {width}-byte records",
            bytes.len()
        )));
    }
    let mut last: Option<&[u8]> = None;
    for record in bytes.chunks_exact(width) {
        let point = &record[..POINT_LEN];
        if usize::from(point[1]) != b || last.is_some_and(|l| l >= point) {
            return Err(PsiError::Spill(
                "a row bucket is not sorted, distinct points of that bucket".into(),
            ));
        }
        last = Some(point);
    }
    Ok(bytes)
}

/// A spilled value holder's store and its tallies.
pub(super) struct VhSpill {
    store: Box<dyn PointStore>,
    own_size: u64,
    cells: usize,
    /// Our points, read from the rows' buckets.
    points: RecordReader,
    /// Our rows, read again in the same order for encryption.
    rows: RecordReader,
    peer_counts: Box<[u64; BUCKETS]>,
    peer_received: u64,
    /// The key holder's points going back, once all are in and checked.
    returned: BucketReader,
    returned_sent: u64,
}

impl std::fmt::Debug for VhSpill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhSpill")
            .field("own_sent", &self.points.sent)
            .field("peer_received", &self.peer_received)
            .field("returned_sent", &self.returned_sent)
            .field("rows_sent", &self.rows.sent)
            .finish_non_exhaustive()
    }
}

impl VhSpill {
    /// Over our rows' store.
    pub(super) fn new(own: SpilledValues) -> VhSpill {
        VhSpill {
            store: own.store,
            own_size: own.size,
            cells: own.cells,
            points: RecordReader::default(),
            rows: RecordReader::default(),
            peer_counts: Box::new([0; BUCKETS]),
            peer_received: 0,
            returned: BucketReader::new(PointSet::Peer),
            returned_sent: 0,
        }
    }

    fn width(&self) -> usize {
        value_record_len(self.cells)
    }

    /// Our next batch of at most `batch_size` points; `None` once all are out.
    pub(super) fn next_own(&mut self, batch_size: usize) -> Result<Option<Vec<u8>>, PsiError> {
        let width = self.width();
        let records = self
            .points
            .next(self.store.as_mut(), width, batch_size, self.own_size)?;
        Ok(records.map(|records| {
            records
                .chunks_exact(width)
                .flat_map(|r| &r[..POINT_LEN])
                .copied()
                .collect()
        }))
    }

    /// Whether every one of our points has been handed out.
    pub(super) fn own_done(&self) -> bool {
        self.points.sent == self.own_size
    }

    /// The key holder's points received so far.
    pub(super) fn peer_received(&self) -> u64 {
        self.peer_received
    }

    /// The key holder's next points, re-blinded: each to its bucket. `peer_size` (its declared
    /// size) bounds how many may come and how many a bucket may hold.
    pub(super) fn store_peer(
        &mut self,
        peer_size: u64,
        reblinded: &[EncodedPoint],
    ) -> Result<(), PsiError> {
        let received = received_within(peer_size, self.peer_received, reblinded.len())?;
        append_by_bucket(
            self.store.as_mut(),
            PointSet::Peer,
            reblinded,
            &mut self.peer_counts,
            Some((bucket_cap(peer_size), "points")),
        )?;
        self.peer_received = received;
        Ok(())
    }

    /// Every point of the key holder is in: sorts each bucket, and fails on a point sent twice
    /// before any goes back.
    pub(super) fn sort_peer(&mut self) -> Result<(), PsiError> {
        for b in 0..BUCKETS {
            if !sort_bucket_distinct(self.store.as_mut(), PointSet::Peer, b)? {
                return Err(PsiError::DuplicatePeerPoint);
            }
        }
        Ok(())
    }

    /// The next batch of the key holder's points to return, bucket by bucket, each sorted;
    /// `None` once all are out.
    pub(super) fn next_returned(&mut self, batch_size: usize) -> Result<Option<Vec<u8>>, PsiError> {
        let store = self.store.as_mut();
        let (sent, total) = (&mut self.returned_sent, self.peer_received);
        self.returned.next_counted(store, batch_size, sent, total)
    }

    /// Whether every point of the key holder has gone back.
    pub(super) fn returned_done(&self) -> bool {
        self.returned_sent == self.peer_received
    }

    /// The cells of our next `rows` rows at most, row-major, in the order our points went out;
    /// `None` once all are out.
    pub(super) fn next_rows(&mut self, rows: usize) -> Result<Option<Vec<u64>>, PsiError> {
        let width = self.width();
        let records = self
            .rows
            .next(self.store.as_mut(), width, rows, self.own_size)?;
        Ok(records.map(|records| {
            records
                .chunks_exact(width)
                .flat_map(|r| r[POINT_LEN..].chunks_exact(8))
                .map(|cell| {
                    let mut le = [0u8; 8];
                    le.copy_from_slice(cell);
                    u64::from_le_bytes(le)
                })
                .collect()
        }))
    }

    /// Bytes written to the store in all.
    pub(super) fn bytes_written(&self) -> u64 {
        self.store.bytes_written()
    }
}
