//! Sans-IO cryptographic protocols of cleanroom.
#![warn(missing_docs)]

mod error;
pub mod floor;
mod hash_to_group;
pub mod items;
mod key;
#[cfg(test)]
mod pair;
mod psi;

pub use error::PsiError;
pub use floor::{FloorCosts, measure_floor};
pub use hash_to_group::{
    HASH_TO_GROUP_DST, MAX_EXPAND_LEN, expand_message_xmd_sha512, hash_to_group,
};
pub use items::ItemSet;
pub use key::JobKey;
pub use psi::{
    AwaitingPeerSize, AwaitingReturn, ExchangingPoints, PsiOutput, PsiParams, PsiSession,
    ReadyToBlind, blind_items, reblind_points,
};

/// Bytes in one compressed ristretto255 element.
pub const POINT_LEN: usize = 32;

/// A compressed ristretto255 element as it travels between parties.
pub type EncodedPoint = [u8; POINT_LEN];

pub use curve25519_dalek::RistrettoPoint;
