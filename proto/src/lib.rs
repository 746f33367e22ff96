//! Wire format of cleanroom.
//!
//! Two layers, and no logic beyond them:
//! - [`v1`]: the protobuf messages generated from `proto/cleanroom.proto`, the single source of
//!   truth for everything that crosses a process boundary;
//! - [`frame`]: the length-prefixed framing that carries one [`v1::Envelope`] per frame, with a
//!   hard cap checked before any byte of the body is buffered.
//!
//! The crate is sans-IO and light on purpose (no tokio, no quinn): fuzz targets and every other
//! crate can depend on it.

/// Messages generated from `proto/cleanroom.proto` (package `cleanroom.v1`).
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/cleanroom.v1.rs"));
}

/// The compiled descriptors of `proto/cleanroom.proto` (a serialized `FileDescriptorSet`), for
/// reading and writing the messages as JSON by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cleanroom.fds"));

pub mod frame;

pub use frame::{FrameDecoder, FrameError, MAX_FRAME_LEN, encode_frame};
