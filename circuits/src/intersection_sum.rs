//! Private intersection-sum with cardinality (Ion et al., "On Deploying Secure Computing:
//! Private Intersection-Sum-with-Cardinality", EuroS&P 2020 — Google's PJC): the sans-IO
//! sessions of its two parties.
//!
//! The **key holder** (party A) has identifiers only; the **value holder** (party B) has
//! identifiers and, per row, a fixed number of integer *cells* (e.g. a count of 1 and one cell
//! per value column, or one-hot per group: the caller decides the layout, values already
//! clipped). The output is, per cell, the sum over the rows whose identifier A also holds — plus
//! noise A adds under encryption — and only B can decrypt it.
//!
//! A row travels as one packed Paillier ciphertext ([`crate::ahe::packed`]): each cell is a slot
//! with headroom of a 2047-bit plaintext, so a count and up to 30 amounts cost one encryption
//! (512 bytes), and each cell decrypts whole.
//!
//! ```text
//! A → B   size                              B → A   size, public key
//! A → B   k_A·H(x), shuffled                B → A   k_B·H(y), shuffled (order π)
//! B → A   k_B·k_A·H(x), shuffled            (A never returns B's points: B learns no count)
//!         A computes k_A·k_B·H(y) in order π and finds which positions of π match
//! B → A   Enc(cells of row π(j)) for every j, in order π, streamed
//!         A adds up the ciphertexts of matched positions as they arrive (memory O(cells))
//! A → B   Rerandomise(Sum + Enc(noise per cell)): one row ciphertext
//!         B decrypts the noised totals
//! ```
//!
//! B sends its ciphertexts *after* it has returned A's points, so A knows which positions match
//! before the first ciphertext arrives and never buffers them (512 bytes a row would be 512 MiB
//! at 2^20 rows).
//!
//! A key holder started with [`KeyHolderSession::start_spilled`] keeps its three point sets in
//! buckets outside memory (a node's `memory_limit`): see `spilled.rs`. It sends its points
//! bucket by bucket instead of shuffled, and holds one bit per value-holder row in the end.
//! A value holder started with [`ValueHolderSession::start_spilled`] keeps its rows and the key
//! holder's points the same way (see `spilled_values.rs`): its points and rows go out bucket by
//! bucket, and the key holder's points go back sorted bucket by bucket.
//!
//! # What each party learns
//!
//! A learns `|A ∩ B|` exactly (from the matched positions) and B's set size; it sees only
//! ciphertexts of B's values. B learns A's set size and, per cell, the *noised* total — not the
//! intersection size, since A never returns B's points (B's count cell carries A's noise too).
//! B decrypts each cell whole, so it learns nothing per part of a cell. The noise A adds
//! protects A's membership information against B: B knows every one of its own values, so an
//! exact total would tell it about which of its rows A holds.
//!
//! # Trust model
//!
//! Semi-honest, as the ECDH-PSI it extends ([`crate::psi`]), with every byte from the peer
//! checked: points as in PSI, ciphertexts by [`crate::ahe`]'s decoder (length, below `n²`, no
//! factor shared with `n`), row and cell counts against what was declared. A must re-randomise
//! (done here): B, which holds the secret key, could otherwise recover the product of the summed
//! rows' randomness and test it against subsets of its rows.

use rand::seq::SliceRandom;
use rayon::prelude::*;

use crate::ahe::{
    AheError, MAX_SUMMANDS, PublicKey, RowCiphertext, RowSum, SecretKey, SlotLayout, decrypt_cells,
    encrypt_rows, sum_selected_rows,
};
use crate::psi::{
    Stream, append_reblinded, blind_items, blind_shuffled, check_total, items_distinct,
    points_distinct, push_returned, reblind_checked, reblind_into, shuffled,
    sort_and_check_distinct, to_batches,
};
use crate::spill::{BucketMatches, Merge, SpilledOwn};
use crate::{EncodedPoint, ItemSet, JobKey, PsiError};

mod spilled;
mod spilled_values;

use spilled::{KhSpill, MatchedRows};
use spilled_values::VhSpill;
pub use spilled_values::{SpilledValues, value_record_len};

/// Most cells per row: one-hot group layouts multiply the encryption work by the cell count,
/// so a layout wider than this is a configuration error, not a workload.
pub const MAX_CELLS: usize = 64;

/// Cells per row of an overlap-sum job: one group ("(all)") without grouping, else the listed
/// groups and "(other)"; per group the count of shared identifiers and one cell per summed
/// column. The node and the coordinator both size the job with it.
pub fn job_cells(grouped: bool, listed_groups: usize, sums: usize) -> usize {
    let groups = if grouped {
        listed_groups.saturating_add(1)
    } else {
        1
    };
    groups.saturating_mul(sums.saturating_add(1))
}

/// Upper bound on one ciphertext batch, in bytes (well under the 1 MiB frame cap).
pub const MAX_CIPHERTEXT_BATCH_BYTES: usize = 512 * 1024;

/// Why an intersection-sum session stopped. Carries counts and indices only, never values.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SumError {
    /// A PSI-level violation (sizes, points, totals).
    #[error(transparent)]
    Psi(#[from] PsiError),
    /// A ciphertext or key that does not decode, or a total outside the decryptable range.
    #[error(transparent)]
    Ahe(#[from] AheError),
    /// The value holder's layout has another number of cells than the job's.
    #[error("the value holder's rows have {got} cells, the job has {expected}")]
    LayoutMismatch {
        /// Cells in the layout received or given.
        got: usize,
        /// Cells the job spec implies.
        expected: usize,
    },
    /// The value holder's values are not `cells` per item.
    #[error("{values} values for {items} items is not {cells} cells per item")]
    ValuesNotAligned {
        /// Items in the set.
        items: usize,
        /// Values given.
        values: usize,
        /// Cells per row.
        cells: usize,
    },
    /// No cells, or more than [`MAX_CELLS`].
    #[error("{cells} cells per row; between 1 and {max} are supported")]
    BadCellCount {
        /// Cells asked for.
        cells: usize,
        /// [`MAX_CELLS`].
        max: usize,
    },
    /// A ciphertext batch that is not a whole number of rows.
    #[error("ciphertext batch of {len} bytes is not a whole number of {row_len}-byte rows")]
    CiphertextBatchNotWholeRows {
        /// Bytes received.
        len: usize,
        /// Bytes per row (`CIPHERTEXT_LEN` per plaintext of the layout).
        row_len: usize,
    },
    /// More ciphertext rows than the peer has items, or a total that disagrees with what came.
    #[error("peer has {expected} rows but sent {received} ciphertext rows (announced {announced})")]
    CiphertextRowsMismatch {
        /// The peer's declared set size.
        expected: u64,
        /// Rows received.
        received: u64,
        /// Rows the peer said it sent (equal to `received` while still streaming).
        announced: u64,
    },
    /// The intersection is larger than decryption is sized for.
    #[error("intersection of {count} rows is larger than the {max} rows a sum supports")]
    IntersectionTooLarge {
        /// Matched rows.
        count: u64,
        /// [`MAX_SUMMANDS`].
        max: usize,
    },
    /// Noise given for a different number of cells.
    #[error("noise for {given} cells, the layout has {cells}")]
    NoiseWrongLength {
        /// Noise values given.
        given: usize,
        /// Cells per row.
        cells: usize,
    },
}

/// The policy and the shape of one party's intersection-sum session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SumParams {
    /// Domain for the hash to the group; both parties must agree.
    pub key_name: String,
    /// The smallest set size the peer may declare.
    pub min_peer_set: u64,
    /// The largest set size the peer may declare.
    pub max_peer_set: u64,
    /// Points per outgoing batch (e.g. 4096); 0 is treated as 1.
    pub batch_size: usize,
    /// Values per row of the value holder (agreed through the job spec).
    pub cells: usize,
}

impl SumParams {
    fn check_cells(&self) -> Result<(), SumError> {
        if self.cells == 0 || self.cells > MAX_CELLS {
            return Err(SumError::BadCellCount {
                cells: self.cells,
                max: MAX_CELLS,
            });
        }
        Ok(())
    }
}

/// Rows per ciphertext batch of `layout`, so a batch stays under
/// [`MAX_CIPHERTEXT_BATCH_BYTES`].
pub fn rows_per_ciphertext_batch(layout: &SlotLayout) -> usize {
    (MAX_CIPHERTEXT_BATCH_BYTES / layout.ciphertext_len()).max(1)
}

/// Checks a declared peer size against the policy and our own inputs, as PSI does.
fn check_sizes(
    params: &SumParams,
    own_size: u64,
    distinct: bool,
    declared: u64,
) -> Result<(), SumError> {
    if declared < params.min_peer_set {
        return Err(PsiError::PeerSetTooSmall {
            declared,
            min: params.min_peer_set,
        }
        .into());
    }
    if declared > params.max_peer_set {
        return Err(PsiError::PeerSetTooLarge {
            declared,
            max: params.max_peer_set,
        }
        .into());
    }
    if params.key_name.len() > usize::from(u16::MAX) {
        return Err(PsiError::KeyNameTooLong {
            len: params.key_name.len(),
        }
        .into());
    }
    if own_size > u64::from(u32::MAX) {
        return Err(PsiError::OwnSetTooLarge { size: own_size }.into());
    }
    if !distinct {
        return Err(PsiError::DuplicateOwnItems.into());
    }
    Ok(())
}

// ---------------------------------------------------------------- value holder (B)

/// Entry point of the value holder's session.
///
/// [`start`](Self::start) → send size and public key → [`VhAwaitingPeerSize::on_peer_size`] →
/// [`VhReadyToBlind::blind`] → send the point batches, then those of
/// [`VhExchanging::next_own_batch`] until `None` → [`VhExchanging::on_peer_batch`] for each
/// of A's batches → [`VhExchanging::on_peer_end`] (send the returned points, then those of
/// [`VhEncrypting::next_returned_batch`] until `None`) → [`VhEncrypting::next_batch`] until
/// `None` (send each) → [`VhAwaitingSums::on_sums`].
#[derive(Debug)]
pub struct ValueHolderSession;

/// What the value holder sends first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueHolderHello {
    /// Our declared set size.
    pub set_size: u64,
    /// Width in bits of each cell's slot ([`SlotLayout::widths`]).
    pub widths: Vec<u8>,
    /// Our fresh Paillier public key for this job (`n`, 256 bytes).
    pub public_key: Vec<u8>,
}

struct VhCommon {
    params: SumParams,
    key: JobKey,
    own_size: u64,
    layout: SlotLayout,
    sk: SecretKey,
}

/// The value holder's keys and rows: in memory, or blinded already and spilled.
enum VhOwn {
    /// Keys, and their rows' `cells` values each, row-major in the keys' order.
    InMemory(OwnKeys, Vec<u64>),
    Spilled(SpilledValues),
}

impl VhOwn {
    fn len(&self) -> u64 {
        match self {
            VhOwn::InMemory(keys, _) => keys.len() as u64,
            VhOwn::Spilled(own) => own.size(),
        }
    }
}

impl ValueHolderSession {
    /// Begins a session over distinct `items` with `values` laid out row-major, `cells` per item
    /// in the set's order, each within its cell of `layout`, under `paillier`, a fresh key pair
    /// for this job ([`ahe::keygen`]: two safe primes, about a second with a long tail, so the
    /// caller runs it off its async path).
    pub fn start(
        params: SumParams,
        key: JobKey,
        items: ItemSet,
        layout: SlotLayout,
        values: Vec<u64>,
        paillier: SecretKey,
    ) -> Result<(ValueHolderHello, VhAwaitingPeerSize), SumError> {
        let distinct = items_distinct(&items);
        let own = VhOwn::InMemory(OwnKeys::Items(items), values);
        Self::begin(params, key, own, distinct, layout, paillier)
    }

    /// [`ValueHolderSession::start`] over our keys already blinded with `key` (`k·H(x)` for
    /// each distinct key; on the partner's executors, say), `values` in their order: the
    /// session shuffles and sends them instead of blinding items.
    pub fn start_blinded(
        params: SumParams,
        key: JobKey,
        points: Vec<EncodedPoint>,
        layout: SlotLayout,
        values: Vec<u64>,
        paillier: SecretKey,
    ) -> Result<(ValueHolderHello, VhAwaitingPeerSize), SumError> {
        let distinct = points_distinct(&points);
        let own = VhOwn::InMemory(OwnKeys::Points(points), values);
        Self::begin(params, key, own, distinct, layout, paillier)
    }

    /// [`ValueHolderSession::start`] over our rows blinded with `key` and combined outside
    /// memory ([`SpilledValues`], under a node's `memory_limit`): our points and rows go out
    /// bucket by bucket from [`VhExchanging::next_own_batch`] and
    /// [`VhEncrypting::next_batch`], and the key holder's points wait in the same store (see
    /// `spilled_values.rs`).
    pub fn start_spilled(
        params: SumParams,
        key: JobKey,
        own: SpilledValues,
        layout: SlotLayout,
        paillier: SecretKey,
    ) -> Result<(ValueHolderHello, VhAwaitingPeerSize), SumError> {
        // The reader checks, bucket by bucket, that no point is there twice.
        Self::begin(params, key, VhOwn::Spilled(own), true, layout, paillier)
    }

    fn begin(
        params: SumParams,
        key: JobKey,
        own: VhOwn,
        distinct: bool,
        layout: SlotLayout,
        paillier: SecretKey,
    ) -> Result<(ValueHolderHello, VhAwaitingPeerSize), SumError> {
        params.check_cells()?;
        if layout.cells() != params.cells {
            return Err(SumError::LayoutMismatch {
                got: layout.cells(),
                expected: params.cells,
            });
        }
        match &own {
            VhOwn::InMemory(keys, values) => {
                if Some(values.len()) != keys.len().checked_mul(params.cells) {
                    return Err(SumError::ValuesNotAligned {
                        items: keys.len(),
                        values: values.len(),
                        cells: params.cells,
                    });
                }
            }
            VhOwn::Spilled(own) => {
                if own.cells() != params.cells {
                    return Err(SumError::LayoutMismatch {
                        got: own.cells(),
                        expected: params.cells,
                    });
                }
            }
        }
        let sk = paillier;
        let own_size = own.len();
        let hello = ValueHolderHello {
            set_size: own_size,
            widths: layout.widths().to_vec(),
            public_key: sk.public().to_bytes(),
        };
        let state = VhAwaitingPeerSize {
            common: VhCommon {
                params,
                key,
                own_size,
                layout,
                sk,
            },
            own,
            distinct,
        };
        Ok((hello, state))
    }
}

/// Waiting for the key holder's declared size.
pub struct VhAwaitingPeerSize {
    common: VhCommon,
    own: VhOwn,
    distinct: bool,
}

impl std::fmt::Debug for VhAwaitingPeerSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhAwaitingPeerSize")
            .field("params", &self.common.params)
            .field("own_size", &self.common.own_size)
            .finish_non_exhaustive()
    }
}

impl VhAwaitingPeerSize {
    /// Checks the key holder's declared size against the policy before any exponentiation.
    pub fn on_peer_size(self, declared: u64) -> Result<VhReadyToBlind, SumError> {
        check_sizes(
            &self.common.params,
            self.common.own_size,
            self.distinct,
            declared,
        )?;
        Ok(VhReadyToBlind {
            common: self.common,
            own: self.own,
            peer_size: declared,
        })
    }
}

/// Sizes agreed.
pub struct VhReadyToBlind {
    common: VhCommon,
    own: VhOwn,
    peer_size: u64,
}

impl std::fmt::Debug for VhReadyToBlind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhReadyToBlind")
            .field("peer_size", &self.peer_size)
            .finish_non_exhaustive()
    }
}

/// The value holder's rows, and where the key holder's points go.
enum VhRows {
    /// Our values (row-major in our keys' order), the order our points went out in, and the
    /// key holder's points re-blinded.
    InMemory {
        values: Vec<u64>,
        perm: Vec<u32>,
        peer_double: Vec<EncodedPoint>,
    },
    /// All of it in buckets.
    Spilled(Box<VhSpill>),
}

impl VhReadyToBlind {
    /// Hashes, blinds and shuffles our items (or shuffles our points, blinded already);
    /// returns the point batches to send and keeps the shuffle, so the ciphertexts can later
    /// follow the same order. The item bytes are dropped. A spilled session returns no batch
    /// here: its points come from [`VhExchanging::next_own_batch`].
    pub fn blind(self) -> (Vec<Vec<u8>>, VhExchanging) {
        let Self {
            common,
            own,
            peer_size,
        } = self;
        let (keys, values) = match own {
            VhOwn::InMemory(keys, values) => (keys, values),
            VhOwn::Spilled(own) => {
                let rows = VhRows::Spilled(Box::new(VhSpill::new(own)));
                let next = VhExchanging {
                    common,
                    rows,
                    peer_size,
                };
                return (Vec::new(), next);
            }
        };
        let batch_size = common.params.batch_size;
        let (batches, perm) = match keys {
            OwnKeys::Items(items) => {
                blind_shuffled(&common.key, &common.params.key_name, items, batch_size)
            }
            OwnKeys::Points(points) => shuffled(&points, batch_size),
        };
        let reserve = peer_size.min(1 << 20) as usize;
        let rows = VhRows::InMemory {
            values,
            perm,
            peer_double: Vec::with_capacity(reserve),
        };
        let next = VhExchanging {
            common,
            rows,
            peer_size,
        };
        (batches, next)
    }
}

/// Our points are out; reblinding the key holder's.
pub struct VhExchanging {
    common: VhCommon,
    rows: VhRows,
    peer_size: u64,
}

impl std::fmt::Debug for VhExchanging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhExchanging")
            .field("peer_size", &self.peer_size)
            .field("received", &self.peer_received())
            .finish_non_exhaustive()
    }
}

impl VhExchanging {
    fn peer_received(&self) -> u64 {
        match &self.rows {
            VhRows::InMemory { peer_double, .. } => peer_double.len() as u64,
            VhRows::Spilled(spill) => spill.peer_received(),
        }
    }

    /// A spilled session's next batch of our points to send (bucket by bucket, each sorted);
    /// `None` once all are out, and always for a session in memory, whose points came from
    /// [`VhReadyToBlind::blind`]. Send them all, then the end marker.
    pub fn next_own_batch(&mut self) -> Result<Option<Vec<u8>>, SumError> {
        match &mut self.rows {
            VhRows::Spilled(spill) => Ok(spill.next_own(self.common.params.batch_size.max(1))?),
            VhRows::InMemory { .. } => Ok(None),
        }
    }

    /// One batch of the key holder's blinded points: reblinded and kept (they go back shuffled,
    /// all at once, so the key holder learns only which of them match, not which of its rows).
    pub fn on_peer_batch(mut self, batch: &[u8]) -> Result<VhExchanging, SumError> {
        let (key, declared) = (&self.common.key, self.peer_size);
        match &mut self.rows {
            VhRows::InMemory { peer_double, .. } => {
                reblind_into(key, declared, peer_double, batch)?;
            }
            VhRows::Spilled(spill) => {
                let reblinded = reblind_checked(key, declared, spill.peer_received(), batch)?;
                spill.store_peer(declared, &reblinded)?;
            }
        }
        Ok(self)
    }

    /// The key holder's next points, re-blinded elsewhere (this node's own executors) after
    /// [`check_peer_batch`](crate::psi::check_peer_batch) passed their batch, in its order: the
    /// same as [`on_peer_batch`](Self::on_peer_batch) once its re-blinding is done.
    pub fn on_peer_reblinded(
        mut self,
        reblinded: &[EncodedPoint],
    ) -> Result<VhExchanging, SumError> {
        match &mut self.rows {
            VhRows::InMemory { peer_double, .. } => {
                append_reblinded(self.peer_size, peer_double, reblinded)?;
            }
            VhRows::Spilled(spill) => spill.store_peer(self.peer_size, reblinded)?,
        }
        Ok(self)
    }

    /// The key holder says it sent `total` points: checks it (and that no point came twice),
    /// and returns them reblinded and shuffled, in batches, with the encrypting state. A
    /// spilled session returns no batch here: they come from
    /// [`VhEncrypting::next_returned_batch`], sorted bucket by bucket.
    pub fn on_peer_end(self, total: u64) -> Result<(Vec<Vec<u8>>, VhEncrypting), SumError> {
        check_total(Stream::Peer, self.peer_size, total, self.peer_received())?;
        let Self { common, rows, .. } = self;
        let (outgoing, rows) = match rows {
            VhRows::InMemory {
                values,
                perm,
                mut peer_double,
            } => {
                peer_double.shuffle(&mut rand::rng());
                let outgoing = to_batches(peer_double.iter(), common.params.batch_size);
                if !sort_and_check_distinct(&mut peer_double) {
                    return Err(PsiError::DuplicatePeerPoint.into());
                }
                let rows = VhRows::InMemory {
                    values,
                    perm,
                    peer_double: Vec::new(),
                };
                (outgoing, rows)
            }
            VhRows::Spilled(mut spill) => {
                if !spill.own_done() {
                    return Err(PsiError::Spill(
                        "the key holder's points ended before all of ours were sent".into(),
                    )
                    .into());
                }
                spill.sort_peer()?;
                (Vec::new(), VhRows::Spilled(spill))
            }
        };
        Ok((
            outgoing,
            VhEncrypting {
                common,
                rows,
                next_row: 0,
            },
        ))
    }
}

/// Sending our rows' ciphertexts, in the order our points went out.
pub struct VhEncrypting {
    common: VhCommon,
    rows: VhRows,
    next_row: u64,
}

impl std::fmt::Debug for VhEncrypting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhEncrypting")
            .field("next_row", &self.rows_sent())
            .field("rows", &self.common.own_size)
            .finish_non_exhaustive()
    }
}

impl VhEncrypting {
    /// A spilled session's next batch of the key holder's points to return (bucket by bucket,
    /// each sorted); `None` once all are out, and always in memory, where
    /// [`VhExchanging::on_peer_end`] gave them all. Send them all, then the end marker, before
    /// the first row.
    pub fn next_returned_batch(&mut self) -> Result<Option<Vec<u8>>, SumError> {
        match &mut self.rows {
            VhRows::Spilled(spill) => {
                Ok(spill.next_returned(self.common.params.batch_size.max(1))?)
            }
            VhRows::InMemory { .. } => Ok(None),
        }
    }

    /// Encrypts and returns the next batch of rows (at most [`rows_per_ciphertext_batch`]), or
    /// `None` when every row has been sent. Encryption is the value holder's heavy step: it
    /// runs on rayon inside. A value wider than its cell is an error (clip first).
    pub fn next_batch(&mut self) -> Result<Option<Vec<u8>>, SumError> {
        let per_batch = rows_per_ciphertext_batch(&self.common.layout);
        let Some(plain) = self.next_rows(per_batch)? else {
            return Ok(None);
        };
        Ok(Some(encrypt_rows(
            &self.common.sk,
            &self.common.layout,
            &plain,
        )?))
    }

    /// The next `max_rows` rows (at least one) in the clear, [`cells`](SumParams::cells) values
    /// each, in the order our points went out, for encryption elsewhere (this node's own
    /// executors, under this job's key): send their ciphertexts in the same order, cut in
    /// batches of at most [`rows_per_ciphertext_batch`] rows. `None` when every row has been
    /// handed out.
    pub fn next_rows(&mut self, max_rows: usize) -> Result<Option<Vec<u64>>, SumError> {
        let cells = self.common.params.cells;
        let max_rows = max_rows.max(1);
        let plain = match &mut self.rows {
            VhRows::InMemory { values, perm, .. } => {
                let rows = perm.len();
                let first = self.next_row as usize;
                if first >= rows {
                    return Ok(None);
                }
                let end = (first + max_rows).min(rows);
                let mut plain = Vec::with_capacity((end - first) * cells);
                for &item in &perm[first..end] {
                    let start = item as usize * cells;
                    plain.extend_from_slice(&values[start..start + cells]);
                }
                plain
            }
            VhRows::Spilled(spill) => {
                if !spill.returned_done() {
                    return Err(PsiError::Spill(
                        "rows were asked for before every returned point went out".into(),
                    )
                    .into());
                }
                match spill.next_rows(max_rows)? {
                    Some(plain) => plain,
                    None => return Ok(None),
                }
            }
        };
        self.next_row += (plain.len() / cells) as u64;
        Ok(Some(plain))
    }

    /// The slots our rows are packed in, each cell's width.
    pub fn layout(&self) -> &SlotLayout {
        &self.common.layout
    }

    /// Rows sent so far (the total to announce once [`next_batch`](Self::next_batch) is `None`).
    pub fn rows_sent(&self) -> u64 {
        self.next_row
    }

    /// Bytes a spilled session wrote to its store (0 in memory), its own rows included.
    pub fn spilled_bytes(&self) -> u64 {
        match &self.rows {
            VhRows::Spilled(spill) => spill.bytes_written(),
            VhRows::InMemory { .. } => 0,
        }
    }

    /// Every row is out: wait for the noised sums. The values (and a spilled session's store)
    /// are dropped here.
    pub fn finish(self) -> VhAwaitingSums {
        VhAwaitingSums {
            layout: self.common.layout,
            sk: self.common.sk,
        }
    }
}

/// Waiting for the key holder's noised sums.
pub struct VhAwaitingSums {
    layout: SlotLayout,
    sk: SecretKey,
}

impl std::fmt::Debug for VhAwaitingSums {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhAwaitingSums")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl VhAwaitingSums {
    /// Decrypts the key holder's one row ciphertext: the noised totals, in cell order, each
    /// cell's slot read from its whole plaintext.
    pub fn on_sums(self, bytes: &[u8]) -> Result<Vec<i128>, SumError> {
        let ct = RowCiphertext::decode_own(&self.sk, &self.layout, bytes)?;
        Ok(decrypt_cells(&self.sk, &self.layout, &ct)?)
    }
}

// ---------------------------------------------------------------- key holder (A)

/// Entry point of the key holder's session.
///
/// [`start`](Self::start) → send size → [`KhAwaitingHello::on_peer_hello`] →
/// [`KhReadyToBlind::blind`] → send the batches → [`KhReceivingPoints::on_peer_batch`] for each
/// of B's batches → [`KhReceivingPoints::on_peer_end`] → [`KhAwaitingReturn::on_returned_batch`]
/// for our points coming back → [`KhAwaitingReturn::on_returned_end`] (the count is known) →
/// [`KhSumming::on_ciphertext_batch`] for each ciphertext batch →
/// [`KhSumming::on_ciphertext_end`] → [`KhSummed::noised_sums`] → send them.
#[derive(Debug)]
pub struct KeyHolderSession;

struct KhCommon {
    params: SumParams,
    key: JobKey,
    own_size: u64,
}

impl KeyHolderSession {
    /// Begins a session over distinct `items`; returns our declared size and the first state.
    pub fn start(
        params: SumParams,
        key: JobKey,
        items: ItemSet,
    ) -> Result<(u64, KhAwaitingHello), SumError> {
        let distinct = items_distinct(&items);
        let own_size = items.len() as u64;
        let own = KhOwn::InMemory(OwnKeys::Items(items));
        Self::begin(params, key, own, own_size, distinct)
    }

    /// Begins a session over our own keys already blinded with `key` (`k·H(x)` for each
    /// distinct key; on the partner's executors, say): the session sends them, shuffled,
    /// instead of blinding items.
    pub fn start_blinded(
        params: SumParams,
        key: JobKey,
        mut points: Vec<EncodedPoint>,
    ) -> Result<(u64, KhAwaitingHello), SumError> {
        let distinct = sort_and_check_distinct(&mut points);
        let own_size = points.len() as u64;
        let own = KhOwn::InMemory(OwnKeys::Points(points));
        Self::begin(params, key, own, own_size, distinct)
    }

    /// Begins a session over our own keys blinded with `key` as they were read and kept in
    /// buckets outside memory ([`crate::spill::OwnSetBuilder`], under a node's
    /// `memory_limit`). The value holder's points and our returned ones go to the same store
    /// (see `spilled.rs`); our points go out from
    /// [`KhReceivingPoints::next_own_batch`], bucket by bucket.
    pub fn start_spilled(
        params: SumParams,
        key: JobKey,
        own: SpilledOwn,
    ) -> Result<(u64, KhAwaitingHello), SumError> {
        let own_size = own.size();
        // The builder deduplicated the set.
        Self::begin(params, key, KhOwn::Spilled(own), own_size, true)
    }

    fn begin(
        params: SumParams,
        key: JobKey,
        own: KhOwn,
        own_size: u64,
        distinct: bool,
    ) -> Result<(u64, KhAwaitingHello), SumError> {
        params.check_cells()?;
        let common = KhCommon {
            params,
            key,
            own_size,
        };
        Ok((
            own_size,
            KhAwaitingHello {
                common,
                own,
                distinct,
            },
        ))
    }
}

/// A party's own keys: identifiers to blind, or points blinded already.
enum OwnKeys {
    Items(ItemSet),
    Points(Vec<EncodedPoint>),
}

impl OwnKeys {
    fn len(&self) -> usize {
        match self {
            OwnKeys::Items(items) => items.len(),
            OwnKeys::Points(points) => points.len(),
        }
    }
}

/// The key holder's own keys: in memory, or blinded already and spilled.
enum KhOwn {
    InMemory(OwnKeys),
    Spilled(SpilledOwn),
}

/// Waiting for the value holder's size and public key.
pub struct KhAwaitingHello {
    common: KhCommon,
    own: KhOwn,
    distinct: bool,
}

impl std::fmt::Debug for KhAwaitingHello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KhAwaitingHello")
            .field("params", &self.common.params)
            .field("own_size", &self.common.own_size)
            .finish_non_exhaustive()
    }
}

impl KhAwaitingHello {
    /// Checks the value holder's declared size (before any exponentiation) and slot layout
    /// (the job's number of cells), and decodes its public key (a 2048-bit odd modulus without
    /// small factors).
    pub fn on_peer_hello(
        self,
        declared: u64,
        widths: &[u8],
        public_key: &[u8],
    ) -> Result<KhReadyToBlind, SumError> {
        check_sizes(
            &self.common.params,
            self.common.own_size,
            self.distinct,
            declared,
        )?;
        let layout = SlotLayout::new(widths)?;
        if layout.cells() != self.common.params.cells {
            return Err(SumError::LayoutMismatch {
                got: layout.cells(),
                expected: self.common.params.cells,
            });
        }
        let pk = PublicKey::from_bytes(public_key)?;
        // A spilled session names the value holder's rows by their place, a u32.
        if matches!(self.own, KhOwn::Spilled(_)) && declared > u64::from(u32::MAX) {
            return Err(PsiError::PeerSetTooLarge {
                declared,
                max: u64::from(u32::MAX),
            }
            .into());
        }
        Ok(KhReadyToBlind {
            common: self.common,
            own: self.own,
            peer_size: declared,
            layout,
            pk,
        })
    }
}

/// Sizes, layout and key agreed.
pub struct KhReadyToBlind {
    common: KhCommon,
    own: KhOwn,
    peer_size: u64,
    layout: SlotLayout,
    pk: PublicKey,
}

impl std::fmt::Debug for KhReadyToBlind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KhReadyToBlind")
            .field("peer_size", &self.peer_size)
            .finish_non_exhaustive()
    }
}

/// What the key holder keeps about the value holder from its hello on.
struct KhPeer {
    size: u64,
    layout: SlotLayout,
    pk: PublicKey,
}

impl KhReadyToBlind {
    /// Hashes, blinds and shuffles our items (or shuffles our points, blinded already);
    /// returns the batches to send. No permutation is kept: the key holder never learns which
    /// of its own rows matched. A spilled session returns no batch here: its points come from
    /// [`KhReceivingPoints::next_own_batch`], which the caller sends before anything else.
    pub fn blind(self) -> (Vec<Vec<u8>>, KhReceivingPoints) {
        let Self {
            common,
            own,
            peer_size,
            layout,
            pk,
        } = self;
        let peer = KhPeer {
            size: peer_size,
            layout,
            pk,
        };
        let own = match own {
            KhOwn::InMemory(own) => own,
            KhOwn::Spilled(own) => {
                let next = KhReceivingPoints {
                    common,
                    peer,
                    peer_double: Vec::new(),
                    spill: Some(Box::new(KhSpill::new(own))),
                };
                return (Vec::new(), next);
            }
        };
        let mut blinded = match own {
            OwnKeys::Items(items) => blind_items(&common.key, &common.params.key_name, &items),
            OwnKeys::Points(points) => points,
        };
        blinded.shuffle(&mut rand::rng());
        let batches = to_batches(blinded.iter(), common.params.batch_size);
        drop(blinded);
        let reserve = peer_size.min(1 << 20) as usize;
        (
            batches,
            KhReceivingPoints {
                common,
                peer,
                peer_double: Vec::with_capacity(reserve),
                spill: None,
            },
        )
    }
}

/// Reblinding the value holder's points, kept in its order (the ciphertexts follow it).
pub struct KhReceivingPoints {
    common: KhCommon,
    peer: KhPeer,
    /// In memory: the value holder's points re-blinded, in its order.
    peer_double: Vec<EncodedPoint>,
    /// Spilled: our points still to send, and the value holder's re-blinded points.
    spill: Option<Box<KhSpill>>,
}

impl std::fmt::Debug for KhReceivingPoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KhReceivingPoints")
            .field("peer_size", &self.peer.size)
            .field("received", &self.peer_received())
            .field("spill", &self.spill)
            .finish_non_exhaustive()
    }
}

impl KhReceivingPoints {
    fn peer_received(&self) -> u64 {
        self.spill
            .as_ref()
            .map_or(self.peer_double.len() as u64, |s| s.peer_received())
    }

    /// A spilled session's next batch of our points to send (read from its buckets, each
    /// bucket sorted: see `spilled.rs` for why that order is as good as a shuffle); `None` once
    /// all are out, and always for a session in memory, whose points came from
    /// [`KhReadyToBlind::blind`]. Send them all, then the end marker, before taking the value
    /// holder's points.
    pub fn next_own_batch(&mut self) -> Result<Option<Vec<u8>>, SumError> {
        match &mut self.spill {
            Some(spill) => Ok(spill.next_own(self.common.params.batch_size.max(1))?),
            None => Ok(None),
        }
    }

    /// One batch of the value holder's blinded points.
    pub fn on_peer_batch(mut self, batch: &[u8]) -> Result<KhReceivingPoints, SumError> {
        match &mut self.spill {
            Some(spill) => {
                let key = &self.common.key;
                let reblinded = reblind_checked(key, self.peer.size, spill.peer_received(), batch)?;
                spill.store_peer(self.peer.size, &reblinded)?;
            }
            None => reblind_into(
                &self.common.key,
                self.peer.size,
                &mut self.peer_double,
                batch,
            )?,
        }
        Ok(self)
    }

    /// The value holder's next points, re-blinded elsewhere (this node's own executors) after
    /// [`check_peer_batch`](crate::psi::check_peer_batch) passed their batch, in its order: the
    /// same as [`on_peer_batch`](Self::on_peer_batch) once its re-blinding is done.
    pub fn on_peer_reblinded(
        mut self,
        reblinded: &[EncodedPoint],
    ) -> Result<KhReceivingPoints, SumError> {
        match &mut self.spill {
            Some(spill) => spill.store_peer(self.peer.size, reblinded)?,
            None => append_reblinded(self.peer.size, &mut self.peer_double, reblinded)?,
        }
        Ok(self)
    }

    /// The value holder says it sent `total` points: must equal its declared size and what
    /// came, with no point twice (checked when its points are compared, for a spilled session).
    pub fn on_peer_end(self, total: u64) -> Result<KhAwaitingReturn, SumError> {
        check_total(Stream::Peer, self.peer.size, total, self.peer_received())?;
        if let Some(spill) = &self.spill
            && !spill.own_done()
        {
            return Err(PsiError::Spill(
                "the value holder's points ended before all of ours were sent".into(),
            )
            .into());
        }
        if self.spill.is_none() {
            let mut sorted = self.peer_double.clone();
            if !sort_and_check_distinct(&mut sorted) {
                return Err(PsiError::DuplicatePeerPoint.into());
            }
        }
        Ok(KhAwaitingReturn {
            returned: Vec::new(),
            common: self.common,
            peer: self.peer,
            peer_double: self.peer_double,
            spill: self.spill,
        })
    }
}

/// Waiting for our own points, double-blinded and shuffled by the value holder.
pub struct KhAwaitingReturn {
    common: KhCommon,
    peer: KhPeer,
    peer_double: Vec<EncodedPoint>,
    returned: Vec<EncodedPoint>,
    spill: Option<Box<KhSpill>>,
}

impl std::fmt::Debug for KhAwaitingReturn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let returned = self
            .spill
            .as_ref()
            .map_or(self.returned.len() as u64, |s| s.returned_received());
        f.debug_struct("KhAwaitingReturn")
            .field("returned", &returned)
            .finish_non_exhaustive()
    }
}

impl KhAwaitingReturn {
    /// A batch of our points coming back.
    pub fn on_returned_batch(mut self, batch: &[u8]) -> Result<KhAwaitingReturn, SumError> {
        match &mut self.spill {
            Some(spill) => spill.store_returned(batch)?,
            None => push_returned(&mut self.returned, batch, self.common.own_size)?,
        }
        Ok(self)
    }

    /// The value holder says it returned `total` points: must equal our size and what came,
    /// with no point twice. Finds which of the value holder's positions match.
    pub fn on_returned_end(self, total: u64) -> Result<KhSumming, SumError> {
        let Self {
            common,
            peer,
            peer_double,
            mut returned,
            spill,
        } = self;
        let own = common.own_size;
        let (matched, spilled_bytes) = match spill {
            Some(spill) => {
                check_total(Stream::Returned, own, total, spill.returned_received())?;
                spill.matched()?
            }
            None => {
                check_total(Stream::Returned, own, total, returned.len() as u64)?;
                if !sort_and_check_distinct(&mut returned) {
                    return Err(PsiError::DuplicateReturnedPoint.into());
                }
                let places: Vec<usize> = peer_double
                    .par_iter()
                    .enumerate()
                    .filter(|(_, p)| returned.binary_search(p).is_ok())
                    .map(|(place, _)| place)
                    .collect();
                let mut matched = MatchedRows::new(peer.size);
                for place in places {
                    matched.set(place as u64);
                }
                (matched, 0)
            }
        };
        KhSumming::start(common.own_size, peer, matched, spilled_bytes)
    }

    /// A spilled session whose store's files another process can read (a node's executors):
    /// the value holder says it returned `total` points, checked as
    /// [`on_returned_end`](Self::on_returned_end) checks it, and the store is flushed. The
    /// buckets are then merged elsewhere ([`Merge::PeerPlaces`], one
    /// [`merge_bucket`](crate::spill::merge_bucket) per bucket) and [`KhAwaitingMerge::finish`]
    /// takes their answers. An in-memory session has no buckets.
    pub fn merged_elsewhere(self, total: u64) -> Result<KhAwaitingMerge, SumError> {
        let Some(mut spill) = self.spill else {
            return Err(PsiError::Spill(
                "a session in memory has no buckets to merge elsewhere".into(),
            )
            .into());
        };
        check_total(
            Stream::Returned,
            self.common.own_size,
            total,
            spill.returned_received(),
        )?;
        spill.flush()?;
        Ok(KhAwaitingMerge {
            own_size: self.common.own_size,
            peer: self.peer,
            spill,
        })
    }
}

/// A spilled key holder whose every point is in, waiting for its buckets' merge
/// ([`KhAwaitingReturn::merged_elsewhere`]).
pub struct KhAwaitingMerge {
    own_size: u64,
    peer: KhPeer,
    spill: Box<KhSpill>,
}

impl std::fmt::Debug for KhAwaitingMerge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KhAwaitingMerge")
            .field("own_size", &self.own_size)
            .field("peer_size", &self.peer.size)
            .finish_non_exhaustive()
    }
}

impl KhAwaitingMerge {
    /// Which merge each bucket needs: the value holder's places.
    pub fn merge(&self) -> Merge {
        Merge::PeerPlaces
    }

    /// Every bucket's answer, in bucket order: which of the value holder's positions match,
    /// then summing, as [`KhAwaitingReturn::on_returned_end`] goes on.
    pub fn finish(self, answers: Vec<BucketMatches>) -> Result<KhSumming, SumError> {
        let (matched, spilled_bytes) = self.spill.matched_from(answers)?;
        KhSumming::start(self.own_size, self.peer, matched, spilled_bytes)
    }
}

/// The count is known; adding up the ciphertexts of matched rows as they arrive.
pub struct KhSumming {
    own_size: u64,
    peer: KhPeer,
    /// The value holder's rows (in its sending order) that are in the intersection.
    matched: MatchedRows,
    intersection: u64,
    rows_received: u64,
    sum: RowSum,
    /// Bytes a spilled session wrote to its store (0 in memory).
    spilled_bytes: u64,
}

impl std::fmt::Debug for KhSumming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KhSumming")
            .field("rows_received", &self.rows_received)
            .field("peer_size", &self.peer.size)
            .finish_non_exhaustive()
    }
}

impl KhSumming {
    /// Summing the value holder's rows at the `matched` positions.
    fn start(
        own_size: u64,
        peer: KhPeer,
        matched: MatchedRows,
        spilled_bytes: u64,
    ) -> Result<KhSumming, SumError> {
        let intersection = matched.count();
        if intersection > MAX_SUMMANDS as u64 {
            return Err(SumError::IntersectionTooLarge {
                count: intersection,
                max: MAX_SUMMANDS,
            });
        }
        let sum = RowSum::empty(&peer.layout);
        Ok(KhSumming {
            own_size,
            peer,
            matched,
            intersection,
            rows_received: 0,
            sum,
            spilled_bytes,
        })
    }

    /// `|A ∩ B|`, exact: the key holder learns it in this protocol.
    pub fn intersection(&self) -> u64 {
        self.intersection
    }

    /// Bytes a spilled session wrote to its store before the rows came (0 in memory).
    pub fn spilled_bytes(&self) -> u64 {
        self.spilled_bytes
    }

    /// One batch of ciphertext rows: the matched ones are decoded and added; the others are
    /// not even decoded (an invalid ciphertext in an unmatched row cannot affect the result).
    pub fn on_ciphertext_batch(mut self, batch: &[u8]) -> Result<KhSumming, SumError> {
        let row_len = self.peer.layout.ciphertext_len();
        if !batch.len().is_multiple_of(row_len) {
            return Err(SumError::CiphertextBatchNotWholeRows {
                len: batch.len(),
                row_len,
            });
        }
        let rows = (batch.len() / row_len) as u64;
        let received = self.rows_received + rows;
        if received > self.peer.size {
            return Err(SumError::CiphertextRowsMismatch {
                expected: self.peer.size,
                received,
                announced: received,
            });
        }
        let first = self.rows_received as usize;
        let matched_rows: Vec<u32> = (0..rows as u32)
            .filter(|&r| self.matched.contains(first as u64 + u64::from(r)))
            .collect();
        let part = sum_selected_rows(&self.peer.pk, &self.peer.layout, batch, &matched_rows)
            .map_err(|e| match e {
                // Name the row in the peer's whole stream, not in this batch.
                AheError::InvalidCiphertext { row, source } => AheError::InvalidCiphertext {
                    row: (first as u32).saturating_add(row),
                    source,
                },
                other => other,
            })?;
        self.sum.add(&self.peer.pk, &part);
        self.rows_received = received;
        Ok(self)
    }

    /// The value holder says it sent `total` rows: must equal its set size and what came.
    pub fn on_ciphertext_end(self, total: u64) -> Result<KhSummed, SumError> {
        if total != self.peer.size || self.rows_received != self.peer.size {
            return Err(SumError::CiphertextRowsMismatch {
                expected: self.peer.size,
                received: self.rows_received,
                announced: total,
            });
        }
        Ok(KhSummed {
            own_size: self.own_size,
            peer: self.peer,
            sum: self.sum,
            intersection: self.intersection,
        })
    }
}

/// Every row is in; the encrypted exact sums of every cell.
pub struct KhSummed {
    own_size: u64,
    peer: KhPeer,
    sum: RowSum,
    intersection: u64,
}

impl std::fmt::Debug for KhSummed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KhSummed")
            .field("cells", &self.peer.layout.cells())
            .finish_non_exhaustive()
    }
}

impl KhSummed {
    /// `|A ∩ B|`, exact.
    pub fn intersection(&self) -> u64 {
        self.intersection
    }

    /// Our set size and the peer's.
    pub fn sizes(&self) -> (u64, u64) {
        (self.own_size, self.peer.size)
    }

    /// The value holder's slot layout (cell widths), e.g. to calibrate noise per cell.
    pub fn layout(&self) -> &SlotLayout {
        &self.peer.layout
    }

    /// Adds `noise[c]` (with the slots' public bias) to cell `c` under encryption,
    /// re-randomises (so the value holder cannot recover the summed rows' randomness) and returns
    /// the one row ciphertext to send. `noise` is drawn by the caller from the policy's
    /// mechanism; zeros for an exact release.
    pub fn noised_sums(self, noise: &[i64]) -> Result<Vec<u8>, SumError> {
        let layout = &self.peer.layout;
        if noise.len() != layout.cells() {
            return Err(SumError::NoiseWrongLength {
                given: noise.len(),
                cells: layout.cells(),
            });
        }
        let pk = &self.peer.pk;
        let mut sum = self.sum.finish(pk);
        sum.add_noise(pk, layout, noise)?;
        sum.rerandomize(pk);
        Ok(sum.encode())
    }
}

#[cfg(test)]
mod tests;
