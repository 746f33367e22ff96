//! The crate's one error type.
//!
//! Every variant names one violation with the values a reader needs to see who broke which rule.
//! Nothing secret is ever carried: only sizes, counts and indices.

/// Why a protocol step or a hash-to-group input was rejected.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PsiError {
    /// The peer declared fewer items than the policy's minimum.
    #[error("peer declared {declared} items, below the policy minimum of {min}")]
    PeerSetTooSmall {
        /// The peer's declared set size.
        declared: u64,
        /// The policy's minimum.
        min: u64,
    },
    /// The peer declared more items than the policy's maximum.
    #[error("peer declared {declared} items, above the policy maximum of {max}")]
    PeerSetTooLarge {
        /// The peer's declared set size.
        declared: u64,
        /// The policy's maximum.
        max: u64,
    },
    /// A batch of points whose length is not a multiple of [`POINT_LEN`](crate::POINT_LEN).
    #[error("batch of {len} bytes is not a whole number of 32-byte points")]
    BatchNotMultipleOfPointLen {
        /// The batch's length in bytes.
        len: usize,
    },
    /// A peer's point that is not a canonical ristretto255 encoding.
    #[error("peer point {index} is not a valid ristretto255 encoding")]
    InvalidPoint {
        /// Position of the point in the peer's stream (or in the slice given to
        /// [`reblind_points`](crate::reblind_points)).
        index: u64,
    },
    /// A peer's point that is the identity element.
    #[error("peer point {index} is the identity element")]
    IdentityPoint {
        /// Position of the point in the peer's stream (or in the slice given to
        /// [`reblind_points`](crate::reblind_points)).
        index: u64,
    },
    /// The peer sent more points than it declared.
    #[error("peer declared {declared} points but has sent {received}")]
    TooManyPoints {
        /// The peer's declared set size.
        declared: u64,
        /// Points received including the offending batch.
        received: u64,
    },
    /// The peer's end-of-points total disagrees with its declaration or with what arrived.
    #[error(
        "peer declared {declared} points, announced {announced} at the end, and sent {received}"
    )]
    TotalMismatch {
        /// The peer's declared set size.
        declared: u64,
        /// The total in the peer's end message.
        announced: u64,
        /// Points actually received.
        received: u64,
    },
    /// The same point appeared twice among the peer's blinded items; an honest peer deduplicates.
    #[error("peer sent the same blinded point twice")]
    DuplicatePeerPoint,
    /// The peer returned more of our points than we sent.
    #[error("we sent {own} points but the peer has returned {received}")]
    TooManyReturnedPoints {
        /// Our set size.
        own: u64,
        /// Returned points including the offending batch.
        received: u64,
    },
    /// The peer's end-of-return total disagrees with our size or with what arrived.
    #[error(
        "we sent {own} points; the peer announced {announced} returned and returned {received}"
    )]
    ReturnedTotalMismatch {
        /// Our set size.
        own: u64,
        /// The total in the peer's end message.
        announced: u64,
        /// Returned points actually received.
        received: u64,
    },
    /// The same point appeared twice among our returned points; an honest peer cannot produce that.
    #[error("peer returned the same double-blinded point twice")]
    DuplicateReturnedPoint,
    /// A bucket of spilled points holds far more than an even spread would put there: the
    /// peer's points (which our key makes uniform) or our returned points (which its key makes
    /// uniform) were chosen to fill one bucket, and so this node's memory.
    #[error("the peer's {what} fall unevenly: one bucket holds more than {cap} of them")]
    UnevenPoints {
        /// "points" or "returned points".
        what: &'static str,
        /// The most a bucket may hold.
        cap: u64,
    },
    /// The session's spill files could not be written or read (this node's disk, not the peer).
    #[error("the job's spill files failed: {0}")]
    Spill(String),
    /// Our own item set was not deduplicated (call [`ItemSet::dedup`](crate::ItemSet::dedup)).
    #[error("our own item set contains duplicates; deduplicate before starting")]
    DuplicateOwnItems,
    /// Our own item set has more items than membership indices (`u32`) can name.
    #[error("our own item set has {size} items, more than the protocol supports")]
    OwnSetTooLarge {
        /// Our set size.
        size: u64,
    },
    /// A key name longer than its 16-bit length prefix can state.
    #[error("key name of {len} bytes is longer than 65535 bytes")]
    KeyNameTooLong {
        /// The name's length in bytes.
        len: usize,
    },
    /// expand_message_xmd: a domain-separation tag over 255 bytes.
    #[error("domain-separation tag of {len} bytes is longer than 255 bytes")]
    DstTooLong {
        /// The tag's length in bytes.
        len: usize,
    },
    /// expand_message_xmd: more output than SHA-512 XMD can produce (255 blocks, 16320 bytes).
    #[error("expand_message_xmd cannot produce {len} bytes (at most 16320)")]
    ExpandLenTooLarge {
        /// The requested length in bytes.
        len: usize,
    },
}

impl PsiError {
    /// The error of a slice of points that starts `offset` points into the peer's stream: a
    /// point's index then names its place in the whole stream. Other errors are unchanged.
    pub fn at_offset(self, offset: u64) -> PsiError {
        match self {
            PsiError::InvalidPoint { index } => PsiError::InvalidPoint {
                index: index + offset,
            },
            PsiError::IdentityPoint { index } => PsiError::IdentityPoint {
                index: index + offset,
            },
            other => other,
        }
    }
}
