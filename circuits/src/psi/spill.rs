//! Point sets kept in buckets outside memory, so that a session's memory does not grow with the
//! sets (a node's `memory_limit`).
//!
//! A spilled session keeps three sets of 32-byte encodings, each split into [`BUCKETS`] buckets
//! by one byte of the encoding: our own blinded points (`Own`), the peer's points re-blinded
//! (`Peer`) and our points as the peer returns them (`Returned`). Each bucket is read back
//! whole, one at a time, so memory holds a bucket (about `n / 256` points) rather than a set.
//! Where the buckets live is the caller's: [`PointStore`] is files on the node's disk, and
//! [`MemoryStore`] for tests.
//!
//! # What changes on the wire, and why it reveals nothing more
//!
//! Nothing in the frames changes. What changes is the order of two streams:
//!
//! - **Our points go out sorted by their encoding** (bucket by bucket, each sorted), not in a
//!   drawn permutation. The in-memory stream shuffles so that the position of a shared item in
//!   our stream says nothing about the item ([`super::stream`]'s module docs). Sorting by
//!   `k·H(x)` gives the same: `k` is uniform and secret, so under DDH the encodings are
//!   indistinguishable from independent uniform strings, and their order is a uniformly random
//!   permutation of our items that is independent of the items.
//! - **The points we return go out sorted by their encoding**, after the peer's last point, for
//!   the same reason: the peer knows `k_peer·H(y)` but not `k·k_peer·H(y)`, so the sorted order
//!   cannot be linked to the order it sent.
//!
//! Our points are blinded while the dataset is read, so identifiers are never held as a set.
//! The key exists before the peer's hello; nothing blinded leaves before the hello is checked.
//!
//! # What the peer can do to our memory
//!
//! Our re-blinding makes the peer's points uniform whatever it sends, and its key makes our
//! returned points uniform when it is honest. A bucket that holds more than
//! [`bucket_cap`] points ends the job ([`PsiError::UnevenPoints`]); an honest run exceeds it
//! with negligible probability (the cap is twice the mean plus 4096).

use std::collections::HashMap;

use crate::{EncodedPoint, ItemSet, JobKey, POINT_LEN, PsiError, blind_items};

pub use super::merge::{BucketMatches, Merge, merge_bucket};

/// Buckets per set.
pub const BUCKETS: usize = 256;

/// Which bucket a point goes to: its second byte (the first byte's low bit is always 0 in a
/// canonical encoding; the second is uniform).
pub fn bucket_of(point: &EncodedPoint) -> usize {
    usize::from(point[1])
}

/// The most points a bucket of a set of `total` points may hold before the set is declared
/// uneven: twice the mean, plus 4096 so that small sets never trip it.
pub fn bucket_cap(total: u64) -> u64 {
    (total / BUCKETS as u64)
        .saturating_mul(2)
        .saturating_add(4096)
}

/// One of a spilled session's three point sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PointSet {
    /// Our own points, `k·H(x)`: sorted and deduplicated once the dataset is read.
    Own,
    /// The peer's points re-blinded, `k·k_peer·H(y)`.
    Peer,
    /// Our points as the peer returns them, `k_peer·k·H(x)`.
    Returned,
    /// The peer's points as they came, `k_peer·H(y)`, in one bucket (0), until re-blinded.
    PeerRaw,
    /// The peer's points re-blinded, in the order it sent them, in one bucket (0): what a
    /// session that returns in order sends back once they are all checked.
    PeerInOrder,
    /// Our points with the tag of the identifier each came from ([`TagKey`]): 48-byte
    /// records, point then tag, by the point's bucket. Written only when we learn membership.
    OwnTags,
    /// Our points as the peer returns them, each with its place in our stream: 36-byte
    /// records, point then place (`u32`, little-endian), by the point's bucket. Used instead
    /// of `Returned` when we learn membership.
    ReturnedPlaced,
    /// The peer's points re-blinded, each with its place in the peer's stream: 36-byte
    /// records, point then place (`u32`, little-endian), by the point's bucket. An
    /// overlap-sum's key holder keeps these instead of `Peer`: the value holder's rows follow
    /// its stream's order.
    PeerPlaced,
    /// An overlap-sum value holder's accepted rows as they are read, each with its key blinded:
    /// records of the caller's layout, each beginning with the point, by the point's bucket.
    ValueRows,
    /// An overlap-sum value holder's rows combined per identifier: one record per distinct
    /// point, the point then its cells (`u64`, little-endian), each bucket sorted by point
    /// ([`SpilledValues`](crate::intersection_sum::SpilledValues)).
    ValueCells,
}

/// Bytes of an item tag.
pub const TAG_LEN: usize = 16;

/// A tag of one of our identifiers: the first [`TAG_LEN`] bytes of SHA-256 over a key drawn
/// for the job and the identifier. A spilled session that learns membership keeps its points'
/// tags beside them, so that the rows of its matched points can be found by reading the
/// dataset again and tagging each key: a hash, not a second blinding. The key never leaves the
/// node's memory, so a tag in a spill file says nothing about its identifier to whoever reads
/// the file.
pub type ItemTag = [u8; TAG_LEN];

/// The key of a job's [`ItemTag`]s. Move-only, zeroized on drop, redacted in `Debug`.
pub struct TagKey(zeroize::Zeroizing<[u8; 32]>);

impl TagKey {
    /// Draws a key from the operating system's CSPRNG.
    ///
    /// # Panics
    ///
    /// Only if the operating system cannot provide randomness at all (as [`JobKey::generate`]).
    pub fn generate() -> TagKey {
        use rand::TryRng;
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        rand::rngs::SysRng
            .try_fill_bytes(key.as_mut())
            .expect("the operating system gives randomness");
        TagKey(key)
    }

    /// The tag of `item`.
    pub fn tag(&self, item: &[u8]) -> ItemTag {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(b"cleanroom item tag v1");
        hash.update(self.0.as_ref());
        hash.update((item.len() as u64).to_le_bytes());
        hash.update(item);
        let digest = hash.finalize();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&digest[..TAG_LEN]);
        tag
    }
}

impl std::fmt::Debug for TagKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TagKey(..)")
    }
}

/// Where a spilled session's buckets live. Each bucket is appended to and read back whole.
pub trait PointStore: Send + std::fmt::Debug {
    /// Appends concatenated encodings to a bucket.
    fn append(&mut self, set: PointSet, bucket: usize, points: &[u8]) -> std::io::Result<()>;
    /// Everything appended to or put in the bucket, in order (empty if nothing was).
    fn read(&mut self, set: PointSet, bucket: usize) -> std::io::Result<Vec<u8>>;
    /// Up to `len` bytes of the bucket from byte `offset` (fewer at its end, none past it).
    fn read_at(
        &mut self,
        set: PointSet,
        bucket: usize,
        offset: u64,
        len: usize,
    ) -> std::io::Result<Vec<u8>>;
    /// Replaces the bucket's contents.
    fn put(&mut self, set: PointSet, bucket: usize, points: &[u8]) -> std::io::Result<()>;
    /// Bytes written so far, appended or put.
    fn bytes_written(&self) -> u64;
    /// Writes out whatever is buffered, so that another process reading the buckets' files
    /// (a node's executors merging them) sees every point appended so far.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A [`PointStore`] in memory, for tests (it bounds nothing).
#[derive(Debug, Default)]
pub struct MemoryStore {
    buckets: HashMap<(PointSet, usize), Vec<u8>>,
    written: u64,
}

impl PointStore for MemoryStore {
    fn append(&mut self, set: PointSet, bucket: usize, points: &[u8]) -> std::io::Result<()> {
        self.written += points.len() as u64;
        self.buckets
            .entry((set, bucket))
            .or_default()
            .extend_from_slice(points);
        Ok(())
    }

    fn read(&mut self, set: PointSet, bucket: usize) -> std::io::Result<Vec<u8>> {
        Ok(self
            .buckets
            .get(&(set, bucket))
            .cloned()
            .unwrap_or_default())
    }

    fn read_at(
        &mut self,
        set: PointSet,
        bucket: usize,
        offset: u64,
        len: usize,
    ) -> std::io::Result<Vec<u8>> {
        let bytes = self
            .buckets
            .get(&(set, bucket))
            .map_or(&[][..], Vec::as_slice);
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let end = start.saturating_add(len).min(bytes.len());
        Ok(bytes[start..end].to_vec())
    }

    fn put(&mut self, set: PointSet, bucket: usize, points: &[u8]) -> std::io::Result<()> {
        self.written += points.len() as u64;
        self.buckets.insert((set, bucket), points.to_vec());
        Ok(())
    }

    fn bytes_written(&self) -> u64 {
        self.written
    }
}

pub(crate) fn spill_error(e: std::io::Error) -> PsiError {
    PsiError::Spill(e.to_string())
}

/// Splits `points` by bucket and appends each part; `counts[b]` tallies bucket `b`. With `cap`,
/// a bucket over it ends the session ([`PsiError::UnevenPoints`] naming `what`).
pub(crate) fn append_by_bucket(
    store: &mut dyn PointStore,
    set: PointSet,
    points: &[EncodedPoint],
    counts: &mut [u64; BUCKETS],
    cap: Option<(u64, &'static str)>,
) -> Result<(), PsiError> {
    append_records_by_bucket(store, set, points, counts, cap)
}

/// Splits records of `N` bytes, each beginning with a point, by the point's bucket
/// ([`bucket_of`]) and appends each part; `counts[b]` tallies bucket `b`. With `cap`, a bucket
/// over it ends the session ([`PsiError::UnevenPoints`] naming `what`).
pub(crate) fn append_records_by_bucket<const N: usize>(
    store: &mut dyn PointStore,
    set: PointSet,
    records: &[[u8; N]],
    counts: &mut [u64; BUCKETS],
    cap: Option<(u64, &'static str)>,
) -> Result<(), PsiError> {
    let mut parts: Vec<Vec<u8>> = vec![Vec::new(); BUCKETS];
    for record in records {
        let b = usize::from(record[1]);
        parts[b].extend_from_slice(record);
        counts[b] += 1;
        if let Some((cap, what)) = cap
            && counts[b] > cap
        {
            return Err(PsiError::UnevenPoints { what, cap });
        }
    }
    for (b, part) in parts.iter().enumerate() {
        if !part.is_empty() {
            store.append(set, b, part).map_err(spill_error)?;
        }
    }
    Ok(())
}

/// A bucket of records of `N` bytes read back, sorted by their bytes (so by point first).
fn read_records_sorted<const N: usize>(
    store: &mut dyn PointStore,
    set: PointSet,
    bucket: usize,
) -> Result<Vec<[u8; N]>, PsiError> {
    let bytes = store.read(set, bucket).map_err(spill_error)?;
    let (records, rest) = bytes.as_chunks::<N>();
    if !rest.is_empty() {
        return Err(PsiError::Spill(format!(
            "a {set:?} bucket holds {} bytes, not whole records",
            bytes.len()
        )));
    }
    let mut records = records.to_vec();
    records.sort_unstable();
    Ok(records)
}

/// A bucket read back as encodings (a torn tail cannot happen: only whole points are written).
pub(crate) fn read_bucket(
    store: &mut dyn PointStore,
    set: PointSet,
    bucket: usize,
) -> Result<Vec<EncodedPoint>, PsiError> {
    let bytes = store.read(set, bucket).map_err(spill_error)?;
    let (points, rest) = bytes.as_chunks::<POINT_LEN>();
    if !rest.is_empty() {
        return Err(PsiError::Spill(format!(
            "a {set:?} bucket holds {} bytes, not whole points",
            bytes.len()
        )));
    }
    Ok(points.to_vec())
}

/// Every point of a set, bucket after bucket.
pub(crate) fn read_all(
    store: &mut dyn PointStore,
    set: PointSet,
) -> Result<Vec<EncodedPoint>, PsiError> {
    let mut all = Vec::new();
    for b in 0..BUCKETS {
        all.extend(read_bucket(store, set, b)?);
    }
    Ok(all)
}

/// Builds our own set while the dataset is read: each chunk of identifiers is blinded at once
/// and its points go to their buckets; [`finish`](Self::finish) sorts and deduplicates each
/// bucket. The identifiers themselves are never kept.
#[derive(Debug)]
pub struct OwnSetBuilder {
    store: Box<dyn PointStore>,
    counts: Box<[u64; BUCKETS]>,
    /// When we learn membership: each point's tag goes beside it ([`PointSet::OwnTags`]).
    tags: Option<TagKey>,
}

impl OwnSetBuilder {
    /// An empty set over `store`.
    pub fn new(store: Box<dyn PointStore>) -> Self {
        OwnSetBuilder {
            store,
            counts: Box::new([0; BUCKETS]),
            tags: None,
        }
    }

    /// An empty set over `store` whose points keep their identifiers' tags under `tag_key`, so
    /// that a session over it can tell which identifiers it matched
    /// ([`PsiOutput::spilled_matches`](crate::PsiOutput::spilled_matches)).
    pub fn with_tags(store: Box<dyn PointStore>, tag_key: TagKey) -> Self {
        OwnSetBuilder {
            tags: Some(tag_key),
            ..OwnSetBuilder::new(store)
        }
    }

    /// Blinds `items` with `key` under `key_name` (the same [`blind_items`] as the in-memory
    /// exchange, so either kind of session can face the other) and spills the points.
    pub fn add(&mut self, key: &JobKey, key_name: &str, items: &ItemSet) -> Result<(), PsiError> {
        let points = blind_items(key, key_name, items);
        if let Some(tags) = &self.tags {
            let records: Vec<[u8; POINT_LEN + TAG_LEN]> = points
                .iter()
                .zip(items.iter())
                .map(|(point, item)| {
                    let mut record = [0u8; POINT_LEN + TAG_LEN];
                    record[..POINT_LEN].copy_from_slice(point);
                    record[POINT_LEN..].copy_from_slice(&tags.tag(item));
                    record
                })
                .collect();
            let mut counts = [0u64; BUCKETS];
            append_records_by_bucket(
                self.store.as_mut(),
                PointSet::OwnTags,
                &records,
                &mut counts,
                None,
            )?;
        }
        append_by_bucket(
            self.store.as_mut(),
            PointSet::Own,
            &points,
            &mut self.counts,
            None,
        )
    }

    /// Spills points blinded elsewhere with this session's key (a partner's own executors,
    /// [`blind_items`]'s encoding): concatenated 32-byte encodings.
    /// A set that keeps tags refuses them: they come without their identifiers.
    pub fn add_points(&mut self, points: &[EncodedPoint]) -> Result<(), PsiError> {
        if self.tags.is_some() {
            return Err(PsiError::Spill(
                "points blinded elsewhere come without identifiers to tag".into(),
            ));
        }
        append_by_bucket(
            self.store.as_mut(),
            PointSet::Own,
            points,
            &mut self.counts,
            None,
        )
    }

    /// Sorts and deduplicates every bucket: equal identifiers gave equal points.
    pub fn finish(mut self) -> Result<SpilledOwn, PsiError> {
        let mut size = 0u64;
        let mut duplicates = 0u64;
        for b in 0..BUCKETS {
            let mut points = read_bucket(self.store.as_mut(), PointSet::Own, b)?;
            let before = points.len();
            points.sort_unstable();
            points.dedup();
            duplicates += (before - points.len()) as u64;
            size += points.len() as u64;
            self.store
                .put(PointSet::Own, b, points.as_flattened())
                .map_err(spill_error)?;
        }
        Ok(SpilledOwn {
            store: self.store,
            size,
            duplicates,
            tagged: self.tags.is_some(),
            tag_key: self.tags,
        })
    }
}

/// Our own set, blinded, sorted and deduplicated in its buckets; start a session over it with
/// [`PsiSession::start_spilled`](super::PsiSession::start_spilled).
#[derive(Debug)]
pub struct SpilledOwn {
    pub(crate) store: Box<dyn PointStore>,
    size: u64,
    duplicates: u64,
    /// Our points' tags are in the store ([`OwnSetBuilder::with_tags`]).
    pub(crate) tagged: bool,
    /// Their key, until the caller takes it.
    tag_key: Option<TagKey>,
}

impl SpilledOwn {
    /// Distinct items.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Items that repeated an earlier one.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Bytes written to the store so far.
    pub fn bytes_written(&self) -> u64 {
        self.store.bytes_written()
    }

    /// The key of the set's tags, once (`None` for a set without them): the caller tags the
    /// identifiers it reads again with it, to find those of
    /// [`PsiOutput::spilled_matches`](crate::PsiOutput::spilled_matches).
    pub fn take_tag_key(&mut self) -> Option<TagKey> {
        self.tag_key.take()
    }
}

/// Reads one set's buckets in order, a batch at a time; holds one bucket.
#[derive(Debug)]
pub(crate) struct BucketReader {
    set: PointSet,
    next_bucket: usize,
    current: Vec<EncodedPoint>,
    pos: usize,
}

impl BucketReader {
    pub(crate) fn new(set: PointSet) -> Self {
        BucketReader {
            set,
            next_bucket: 0,
            current: Vec::new(),
            pos: 0,
        }
    }

    /// Up to `batch_size` points, concatenated; `None` once every bucket is read.
    pub(crate) fn next(
        &mut self,
        store: &mut dyn PointStore,
        batch_size: usize,
    ) -> Result<Option<Vec<u8>>, PsiError> {
        let batch_size = batch_size.max(1);
        let mut out = Vec::new();
        while out.len() < batch_size * POINT_LEN {
            if self.pos == self.current.len() {
                if self.next_bucket == BUCKETS {
                    break;
                }
                self.current = read_bucket(store, self.set, self.next_bucket)?;
                self.next_bucket += 1;
                self.pos = 0;
                continue;
            }
            let take = (batch_size - out.len() / POINT_LEN).min(self.current.len() - self.pos);
            out.extend_from_slice(self.current[self.pos..self.pos + take].as_flattened());
            self.pos += take;
        }
        if self.pos == self.current.len() {
            self.current = Vec::new();
            self.pos = 0;
        }
        Ok((!out.is_empty()).then_some(out))
    }

    /// [`next`](Self::next) over a set counted at `total` points, `sent` of them out already
    /// (moved on here): `None` once all are out; fails if the buckets hold another number.
    pub(crate) fn next_counted(
        &mut self,
        store: &mut dyn PointStore,
        batch_size: usize,
        sent: &mut u64,
        total: u64,
    ) -> Result<Option<Vec<u8>>, PsiError> {
        if *sent == total {
            return Ok(None);
        }
        let batch = self.next(store, batch_size)?;
        let got = batch.as_ref().map_or(0, |b| (b.len() / POINT_LEN) as u64);
        if got == 0 || *sent + got > total {
            return Err(PsiError::Spill(format!(
                "our spilled set holds {} points where {total} were counted",
                *sent + got
            )));
        }
        *sent += got;
        Ok(batch)
    }
}

/// Sorts bucket `b` of `set` and checks that no point is there twice; `false` on a duplicate.
pub(crate) fn sort_bucket_distinct(
    store: &mut dyn PointStore,
    set: PointSet,
    b: usize,
) -> Result<bool, PsiError> {
    let mut points = read_bucket(store, set, b)?;
    points.sort_unstable();
    if points.windows(2).any(|w| w[0] == w[1]) {
        return Ok(false);
    }
    store
        .put(set, b, points.as_flattened())
        .map_err(spill_error)?;
    Ok(true)
}

/// A returned point with its place in our stream ([`PointSet::ReturnedPlaced`]).
pub(crate) type PlacedPoint = [u8; POINT_LEN + 4];

pub(crate) fn placed(point: &EncodedPoint, place: u32) -> PlacedPoint {
    let mut record = [0u8; POINT_LEN + 4];
    record[..POINT_LEN].copy_from_slice(point);
    record[POINT_LEN..].copy_from_slice(&place.to_le_bytes());
    record
}

/// What a spilled session that learns membership gives of its matched items, since it holds
/// no identifiers to index: their tags when it has them, else their points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpilledMatches {
    /// The tags of the matched items ([`OwnSetBuilder::with_tags`]), sorted.
    Tags(Vec<ItemTag>),
    /// Our points of the matched items, `k·H(x)`, sorted (a set blinded elsewhere).
    Points(Vec<EncodedPoint>),
}

/// What we matched at `places` (sorted places in our stream: our buckets in order, each
/// sorted): the tags of those points when the set has them, else the points. One bucket of
/// points and of tags is in memory at a time.
pub(crate) fn matches_at(
    store: &mut dyn PointStore,
    places: &[u32],
    tagged: bool,
) -> Result<SpilledMatches, PsiError> {
    let mut tags = Vec::new();
    let mut points = Vec::new();
    let (mut start, mut next) = (0u64, 0usize);
    for b in 0..BUCKETS {
        if next == places.len() {
            break;
        }
        let own = read_bucket(store, PointSet::Own, b)?;
        let end = start + own.len() as u64;
        let mut wanted = Vec::new();
        while let Some(&place) = places.get(next)
            && u64::from(place) < end
        {
            // In this bucket: start <= place < end.
            wanted.push(own[(u64::from(place) - start) as usize]);
            next += 1;
        }
        if tagged && !wanted.is_empty() {
            let records =
                read_records_sorted::<{ POINT_LEN + TAG_LEN }>(store, PointSet::OwnTags, b)?;
            for point in &wanted {
                let at = records.partition_point(|r| r[..POINT_LEN] < point[..]);
                match records.get(at) {
                    Some(r) if r[..POINT_LEN] == point[..] => {
                        let mut tag = [0u8; TAG_LEN];
                        tag.copy_from_slice(&r[POINT_LEN..]);
                        tags.push(tag);
                    }
                    _ => return Err(PsiError::Spill("a matched point has no tag".into())),
                }
            }
        } else {
            points.extend(wanted);
        }
        start = end;
    }
    if next != places.len() {
        return Err(PsiError::Spill("a matched place is past our set".into()));
    }
    Ok(if tagged {
        tags.sort_unstable();
        SpilledMatches::Tags(tags)
    } else {
        // Buckets in order, each sorted: sorted by bucket, not by bytes.
        points.sort_unstable();
        SpilledMatches::Points(points)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What reaches the store is points, and with tags the tags: no identifier, nor any part
    /// of one, is ever written.
    #[test]
    fn a_spilled_set_holds_no_identifier() {
        let key = JobKey::generate();
        let items: ItemSet = (0..2000)
            .map(|i| format!("customer{i:04}@example.com"))
            .collect::<Vec<_>>()
            .iter()
            .map(|s| s.as_bytes())
            .collect();
        for tagged in [false, true] {
            let store = Box::new(MemoryStore::default());
            let mut builder = if tagged {
                OwnSetBuilder::with_tags(store, TagKey::generate())
            } else {
                OwnSetBuilder::new(store)
            };
            builder.add(&key, "email", &items).unwrap();
            let own = builder.finish().unwrap();
            assert_eq!(own.size(), 2000);
            let mut all = Vec::new();
            let mut store = own.store;
            for b in 0..BUCKETS {
                all.extend(store.read(PointSet::Own, b).unwrap());
                all.extend(store.read(PointSet::OwnTags, b).unwrap());
            }
            let per_item = if tagged {
                2 * POINT_LEN + TAG_LEN
            } else {
                POINT_LEN
            };
            assert_eq!(all.len(), 2000 * per_item);
            for needle in [&b"@example.com"[..], b"customer"] {
                assert!(!all.windows(needle.len()).any(|w| w == needle));
            }
        }
    }
}
