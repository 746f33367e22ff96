//! A compact set of byte-string items: one arena of bytes plus end offsets.
//!
//! A node holds millions of normalised identifiers at once; a `Vec<Vec<u8>>` would cost two
//! allocations' overhead per item. Here each item costs its bytes plus four.

/// Most bytes an [`ItemSet`] holds in total (the offsets are `u32`).
pub const MAX_ARENA_BYTES: usize = u32::MAX as usize;

/// Items in insertion order, stored back to back.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ItemSet {
    bytes: Vec<u8>,
    ends: Vec<u32>,
}

/// The arena would exceed [`MAX_ARENA_BYTES`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("item set is full ({MAX_ARENA_BYTES} bytes)")]
pub struct ItemSetFull;

impl std::fmt::Debug for ItemSet {
    // Items are raw identifiers: never print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ItemSet")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl ItemSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one item.
    pub fn push(&mut self, item: &[u8]) -> Result<(), ItemSetFull> {
        let end = self
            .bytes
            .len()
            .checked_add(item.len())
            .ok_or(ItemSetFull)?;
        let end = u32::try_from(end).map_err(|_| ItemSetFull)?;
        self.bytes.extend_from_slice(item);
        self.ends.push(end);
        Ok(())
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are no items.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The `i`-th item, if any.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let end = *self.ends.get(i)? as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.bytes.get(start..end)
    }

    /// Items in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        (0..self.len()).map(move |i| self.get(i).unwrap_or_default())
    }

    /// Removes duplicate items, keeping the first occurrence of each; returns how many were
    /// removed. The order of the remaining items is sorted (byte order), which is also what
    /// makes a later re-read of the same data produce the same indices.
    pub fn dedup(&mut self) -> usize {
        let mut order: Vec<u32> = (0..self.ends.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| self.get(a as usize).cmp(&self.get(b as usize)));
        order.dedup_by(|a, b| self.get(*a as usize) == self.get(*b as usize));
        let removed = self.len() - order.len();
        let mut out = ItemSet {
            bytes: Vec::with_capacity(self.bytes.len()),
            ends: Vec::with_capacity(order.len()),
        };
        for i in order {
            let item = self.get(i as usize).unwrap_or_default();
            // Cannot overflow: the output holds a subset of this set's bytes.
            out.bytes.extend_from_slice(item);
            out.ends.push(out.bytes.len() as u32);
        }
        *self = out;
        removed
    }

    /// Index of `item` in a set that was [`dedup`](Self::dedup)ed (and so is sorted).
    pub fn position_sorted(&self, item: &[u8]) -> Option<usize> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.get(mid).unwrap_or_default().cmp(item) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    }

    /// Bytes held by the arena and offsets (for memory accounting).
    pub fn heap_bytes(&self) -> usize {
        self.bytes.capacity() + 4 * self.ends.capacity()
    }
}

impl<'a> FromIterator<&'a [u8]> for ItemSet {
    /// Collects items; panics only if they exceed 4 GiB in total, which callers building from
    /// untrusted input must prevent by using [`ItemSet::push`] instead.
    fn from_iter<T: IntoIterator<Item = &'a [u8]>>(iter: T) -> Self {
        let mut set = ItemSet::new();
        for item in iter {
            #[allow(clippy::expect_used)]
            set.push(item).expect("item set over 4 GiB");
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_get_dedup() {
        let mut s: ItemSet = [&b"b"[..], b"a", b"", b"b", b"c", b"a"]
            .into_iter()
            .collect();
        assert_eq!(s.len(), 6);
        assert_eq!(s.get(2), Some(&b""[..]));
        assert_eq!(s.dedup(), 2);
        let items: Vec<&[u8]> = s.iter().collect();
        assert_eq!(items, vec![&b""[..], b"a", b"b", b"c"]);
        assert_eq!(s.position_sorted(b"b"), Some(2));
        assert_eq!(s.position_sorted(b"x"), None);
        assert_eq!(s.get(9), None);
    }

    #[test]
    fn debug_never_prints_items() {
        let s: ItemSet = [&b"alice@example.com"[..]].into_iter().collect();
        assert!(!format!("{s:?}").contains("alice"));
    }
}
