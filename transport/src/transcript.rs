//! Test instrumentation (cargo feature `transcript`, enabled only by the end-to-end test crate):
//! every envelope a [`FramedRecv`](crate::FramedRecv) decodes is appended, as received, to the
//! file named by the environment variable [`ENV`], so a test can see exactly what each process
//! received on every stream.
//!
//! Only *received* frames are written: never what the process sends, never its keys, its
//! identifiers or anything else it holds. A release build does not compile this module.
//!
//! Record format, repeated: the stream's number in this process (`u64`, big-endian; one per
//! `FramedRecv`, in creation order), the body length (`u32`, big-endian), the protobuf body of
//! the `Envelope` (the frame without its length prefix).

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The environment variable naming the transcript file (appended to; created if missing).
pub const ENV: &str = "CLEANROOM_TRANSCRIPT";

static NEXT_STREAM: AtomicU64 = AtomicU64::new(0);

/// A number for a new receiving stream, unique in this process.
pub(crate) fn next_stream() -> u64 {
    NEXT_STREAM.fetch_add(1, Ordering::Relaxed)
}

fn file() -> Option<&'static Mutex<File>> {
    static FILE: OnceLock<Option<Mutex<File>>> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = std::env::var_os(ENV)?;
        match File::options().create(true).append(true).open(&path) {
            Ok(f) => Some(Mutex::new(f)),
            Err(e) => {
                tracing::warn!(path = %path.to_string_lossy(), error = %e, "cannot open the transcript file; nothing is recorded");
                None
            }
        }
    })
    .as_ref()
}

/// Appends one decoded frame body received on `stream` (one write per record, under a lock, so
/// records of concurrent streams do not interleave).
pub(crate) fn record(stream: u64, body: &[u8]) {
    let Some(file) = file() else { return };
    let Ok(len) = u32::try_from(body.len()) else {
        return;
    };
    let mut rec = Vec::with_capacity(12 + body.len());
    rec.extend_from_slice(&stream.to_be_bytes());
    rec.extend_from_slice(&len.to_be_bytes());
    rec.extend_from_slice(body);
    let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = f.write_all(&rec) {
        tracing::warn!(error = %e, "cannot append to the transcript file");
    }
}
