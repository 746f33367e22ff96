//! The final comparison of a spilled session: two point sets merged bucket by bucket.
//!
//! A spilled session ([`super::spill`]) keeps the sets it compares in [`BUCKETS`] buckets by one
//! byte of each point, so a point can only match inside its own bucket. The comparison is one
//! [`merge_bucket`] per bucket, each independent of the others: the node runs them in turn
//! ([`merge_buckets`]), or, when its buckets are files its executors can read, hands them to the
//! executors and finishes the session with their answers ([`super::Matching::merged_elsewhere`],
//! and an overlap-sum key holder's
//! [`merged_elsewhere`](crate::intersection_sum::KhAwaitingReturn::merged_elsewhere)).
//!
//! Each merge sorts both buckets itself (a bucket sorted already costs one pass) and checks that
//! no point is in either twice, so its answer depends only on the two buckets' contents.

use super::spill::{BUCKETS, PointSet, PointStore, spill_error};
use crate::{POINT_LEN, PsiError};

/// Which two sets a session's final comparison merges, and what it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// How many of our returned points are among the peer's (`Returned` and `Peer`): an
    /// overlap, or a match that learns no membership.
    Count,
    /// The places in our stream of our returned points found among the peer's
    /// (`ReturnedPlaced` and `Peer`): a match that learns its membership.
    OurPlaces,
    /// The places in the peer's stream of its points found among our returned points
    /// (`PeerPlaced` and `Returned`): an overlap-sum's key holder.
    PeerPlaces,
}

impl Merge {
    /// The set whose records are counted or give their places, then the set they are looked
    /// up in.
    pub fn sets(self) -> (PointSet, PointSet) {
        match self {
            Merge::Count => (PointSet::Returned, PointSet::Peer),
            Merge::OurPlaces => (PointSet::ReturnedPlaced, PointSet::Peer),
            Merge::PeerPlaces => (PointSet::PeerPlaced, PointSet::Returned),
        }
    }

    /// A byte that names it on the way to an executor.
    pub fn code(self) -> u8 {
        match self {
            Merge::Count => 1,
            Merge::OurPlaces => 2,
            Merge::PeerPlaces => 3,
        }
    }

    /// The merge a [`code`](Self::code) names.
    pub fn from_code(code: u8) -> Option<Merge> {
        match code {
            1 => Some(Merge::Count),
            2 => Some(Merge::OurPlaces),
            3 => Some(Merge::PeerPlaces),
            _ => None,
        }
    }
}

/// What one bucket's merge found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BucketMatches {
    /// The matches, counted ([`Merge::Count`]).
    Count(u64),
    /// The matches' places, in no particular order ([`Merge::OurPlaces`],
    /// [`Merge::PeerPlaces`]).
    Places(Vec<u32>),
}

/// A returned point twice is the peer's fault; a peer's point twice too.
fn twice_error(set: PointSet) -> PsiError {
    match set {
        PointSet::Peer | PointSet::PeerPlaced => PsiError::DuplicatePeerPoint,
        _ => PsiError::DuplicateReturnedPoint,
    }
}

/// The bytes of a bucket of `set` as records of `N` bytes, sorted in place, each point once.
fn sorted_records<const N: usize>(set: PointSet, bytes: &mut [u8]) -> Result<&[[u8; N]], PsiError> {
    let len = bytes.len();
    let (records, rest) = bytes.as_chunks_mut::<N>();
    if !rest.is_empty() {
        return Err(PsiError::Spill(format!(
            "a {set:?} bucket holds {len} bytes, not whole records of {N}"
        )));
    }
    records.sort_unstable();
    if records
        .windows(2)
        .any(|w| w[0][..POINT_LEN] == w[1][..POINT_LEN])
    {
        return Err(twice_error(set));
    }
    Ok(records)
}

/// Walks two lists of records sorted by their point (their first [`POINT_LEN`] bytes, each
/// point once in a list) in step, and calls `found` with each record of `a` whose point is in
/// `b`.
fn for_each_match<const A: usize, const B: usize>(
    a: &[[u8; A]],
    b: &[[u8; B]],
    mut found: impl FnMut(&[u8; A]),
) {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i][..POINT_LEN].cmp(&b[j][..POINT_LEN]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                found(&a[i]);
                i += 1;
                j += 1;
            }
        }
    }
}

/// The place a placed record (a point, then its place as a little-endian `u32`) carries.
fn place_of(record: &[u8; POINT_LEN + 4]) -> u32 {
    let mut place = [0u8; 4];
    place.copy_from_slice(&record[POINT_LEN..]);
    u32::from_le_bytes(place)
}

/// Merges one bucket: `first` and `second` are the bytes of that bucket of
/// [`merge.sets()`](Merge::sets), in that order, as the store holds them (sorted here, in
/// place). Fails on a record that is not whole, or on a point twice in either (the peer's
/// fault: [`PsiError::DuplicatePeerPoint`] or [`PsiError::DuplicateReturnedPoint`]).
pub fn merge_bucket(
    merge: Merge,
    first: &mut [u8],
    second: &mut [u8],
) -> Result<BucketMatches, PsiError> {
    const PLACED: usize = POINT_LEN + 4;
    let (first_set, second_set) = merge.sets();
    match merge {
        Merge::Count => {
            let first = sorted_records::<POINT_LEN>(first_set, first)?;
            let second = sorted_records::<POINT_LEN>(second_set, second)?;
            let mut count = 0u64;
            for_each_match(first, second, |_| count += 1);
            Ok(BucketMatches::Count(count))
        }
        Merge::OurPlaces | Merge::PeerPlaces => {
            let first = sorted_records::<PLACED>(first_set, first)?;
            let second = sorted_records::<POINT_LEN>(second_set, second)?;
            let mut places = Vec::new();
            for_each_match(first, second, |r| places.push(place_of(r)));
            Ok(BucketMatches::Places(places))
        }
    }
}

/// Merges every bucket of `store` in turn, here, and hands each bucket's answer to `each`.
/// Holds one bucket of each set at a time.
pub(crate) fn merge_buckets(
    store: &mut dyn PointStore,
    merge: Merge,
    mut each: impl FnMut(BucketMatches),
) -> Result<(), PsiError> {
    let (first_set, second_set) = merge.sets();
    for b in 0..BUCKETS {
        let mut first = store.read(first_set, b).map_err(spill_error)?;
        let mut second = store.read(second_set, b).map_err(spill_error)?;
        each(merge_bucket(merge, &mut first, &mut second)?);
    }
    Ok(())
}

/// Every bucket's answer, merged here or elsewhere, as one result: the count, or the places
/// sorted. Fails unless there is one answer of the merge's kind per bucket and no place is
/// there twice or at or past `places_below`.
pub(crate) fn combine(
    merge: Merge,
    buckets: Vec<BucketMatches>,
    places_below: u64,
) -> Result<MergeResult, PsiError> {
    let wrong = |what: &str| PsiError::Spill(format!("the buckets' merge answered {what}"));
    if buckets.len() != BUCKETS {
        return Err(wrong(&format!("{} buckets of {BUCKETS}", buckets.len())));
    }
    match merge {
        Merge::Count => {
            let mut count = 0u64;
            for bucket in buckets {
                let BucketMatches::Count(n) = bucket else {
                    return Err(wrong("places where a count was due"));
                };
                count = count.saturating_add(n);
            }
            Ok(MergeResult::Count(count))
        }
        Merge::OurPlaces | Merge::PeerPlaces => {
            let mut places = Vec::new();
            for bucket in buckets {
                let BucketMatches::Places(p) = bucket else {
                    return Err(wrong("a count where places were due"));
                };
                places.extend(p);
            }
            places.sort_unstable();
            if places.windows(2).any(|w| w[0] == w[1]) {
                return Err(wrong("a place twice"));
            }
            if places.last().is_some_and(|&p| u64::from(p) >= places_below) {
                return Err(wrong("a place past the stream"));
            }
            Ok(MergeResult::Places(places))
        }
    }
}

/// A session's final comparison, every bucket combined.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum MergeResult {
    Count(u64),
    /// Sorted, each once.
    Places(Vec<u32>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spill::MemoryStore;

    fn point(i: u8, bucket: u8) -> [u8; POINT_LEN] {
        let mut p = [0u8; POINT_LEN];
        p[1] = bucket;
        p[2] = i;
        p
    }

    fn placed(p: [u8; POINT_LEN], place: u32) -> Vec<u8> {
        let mut r = p.to_vec();
        r.extend_from_slice(&place.to_le_bytes());
        r
    }

    #[test]
    fn a_bucket_merges_alike_whatever_order_its_records_came_in() {
        let peer: Vec<u8> = [3u8, 1, 7, 5].iter().flat_map(|&i| point(i, 9)).collect();
        let returned: Vec<u8> = [5u8, 2, 3].iter().flat_map(|&i| point(i, 9)).collect();
        let count = merge_bucket(Merge::Count, &mut returned.clone(), &mut peer.clone());
        assert_eq!(count, Ok(BucketMatches::Count(2)));
        let ours: Vec<u8> = [(5u8, 40u32), (2, 41), (3, 42)]
            .iter()
            .flat_map(|&(i, at)| placed(point(i, 9), at))
            .collect();
        let Ok(BucketMatches::Places(mut places)) =
            merge_bucket(Merge::OurPlaces, &mut ours.clone(), &mut peer.clone())
        else {
            panic!("places are due");
        };
        places.sort_unstable();
        assert_eq!(places, [40, 42]);
        let theirs: Vec<u8> = [(7u8, 0u32), (3, 1), (1, 2)]
            .iter()
            .flat_map(|&(i, at)| placed(point(i, 9), at))
            .collect();
        let Ok(BucketMatches::Places(places)) = merge_bucket(
            Merge::PeerPlaces,
            &mut theirs.clone(),
            &mut returned.clone(),
        ) else {
            panic!("places are due");
        };
        assert_eq!(places, [1]);
    }

    #[test]
    fn a_point_twice_is_the_peers_fault_and_a_torn_record_is_ours() {
        let twice: Vec<u8> = [1u8, 1].iter().flat_map(|&i| point(i, 0)).collect();
        let once: Vec<u8> = point(1, 0).to_vec();
        assert_eq!(
            merge_bucket(Merge::Count, &mut twice.clone(), &mut once.clone()),
            Err(PsiError::DuplicateReturnedPoint)
        );
        assert_eq!(
            merge_bucket(Merge::Count, &mut once.clone(), &mut twice.clone()),
            Err(PsiError::DuplicatePeerPoint)
        );
        let placed_twice: Vec<u8> = [(1u8, 0u32), (1, 1)]
            .iter()
            .flat_map(|&(i, at)| placed(point(i, 0), at))
            .collect();
        assert_eq!(
            merge_bucket(
                Merge::PeerPlaces,
                &mut placed_twice.clone(),
                &mut once.clone()
            ),
            Err(PsiError::DuplicatePeerPoint)
        );
        assert_eq!(
            merge_bucket(
                Merge::OurPlaces,
                &mut placed_twice.clone(),
                &mut once.clone()
            ),
            Err(PsiError::DuplicateReturnedPoint)
        );
        let mut torn = once.clone();
        torn.pop();
        assert!(matches!(
            merge_bucket(Merge::Count, &mut torn, &mut once.clone()),
            Err(PsiError::Spill(_))
        ));
    }

    #[test]
    fn every_bucket_merged_here_combines_as_answers_from_elsewhere_do() {
        let mut store = MemoryStore::default();
        for b in [0u8, 17, 255] {
            let peer: Vec<u8> = (0..6).flat_map(|i| point(i, b)).collect();
            store.put(PointSet::Peer, b.into(), &peer).unwrap();
            let ours: Vec<u8> = (3..9)
                .flat_map(|i| placed(point(i, b), u32::from(b) * 10 + u32::from(i)))
                .collect();
            store
                .put(PointSet::ReturnedPlaced, b.into(), &ours)
                .unwrap();
        }
        let mut answers = Vec::new();
        merge_buckets(&mut store, Merge::OurPlaces, |a| answers.push(a)).unwrap();
        let combined = combine(Merge::OurPlaces, answers.clone(), 10_000).unwrap();
        let mut want: Vec<u32> = [0u32, 17, 255]
            .iter()
            .flat_map(|b| (3..6).map(move |i| b * 10 + i))
            .collect();
        want.sort_unstable();
        assert_eq!(combined, MergeResult::Places(want));
        // Answers that could not come from one merge per bucket are refused.
        assert!(combine(Merge::OurPlaces, answers[1..].to_vec(), 10_000).is_err());
        assert!(combine(Merge::OurPlaces, answers.clone(), 2553).is_err());
        let mut doubled = answers.clone();
        doubled[1] = answers[0].clone();
        assert!(combine(Merge::OurPlaces, doubled, 10_000).is_err());
        assert!(combine(Merge::Count, answers, 10_000).is_err());
    }
}
