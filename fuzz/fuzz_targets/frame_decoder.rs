//! `FrameDecoder` fed the same byte stream in arbitrary splits must behave exactly as when fed
//! the whole stream at once: same envelopes, same first error (or same `finish` result), and
//! never a panic.
//!
//! Input layout: byte 0 = `k` (mod 16), the next `k` bytes are chunk lengths (cycled; 0 means
//! "push nothing this round"), the rest is the stream.
#![no_main]

use cleanroom_proto::v1::Envelope;
use cleanroom_proto::{FrameDecoder, FrameError};
use libfuzzer_sys::fuzz_target;

/// Envelopes out, then the first error or the result of `finish`.
fn drain(dec: &mut FrameDecoder, out: &mut Vec<Envelope>) -> Result<(), FrameError> {
    while let Some(envelope) = dec.next_frame()? {
        out.push(envelope);
    }
    Ok(())
}

fn run<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> (Vec<Envelope>, Result<(), FrameError>) {
    let mut dec = FrameDecoder::new();
    let mut out = Vec::new();
    for chunk in chunks {
        dec.push(chunk);
        // A driver stops reading a stream at its first error.
        if let Err(e) = drain(&mut dec, &mut out) {
            return (out, Err(e));
        }
    }
    let end = dec.finish();
    (out, end)
}

fuzz_target!(|data: &[u8]| {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let k = usize::from(k % 16).min(rest.len());
    let (sizes, stream) = rest.split_at(k);

    let whole = run(std::iter::once(stream));

    let mut chunks = Vec::new();
    let mut pos = 0;
    let mut i = 0;
    while pos < stream.len() {
        let n = match sizes.get(i % sizes.len().max(1)) {
            Some(&s) => usize::from(s),
            None => stream.len(),
        };
        let end = (pos + n).min(stream.len());
        chunks.push(&stream[pos..end]);
        pos = end;
        i += 1;
        if i > 4 * stream.len() + 16 {
            // Only zero-length chunks left in the cycle: push the rest at once.
            chunks.push(&stream[pos..]);
            break;
        }
    }
    let split = run(chunks.into_iter());

    assert_eq!(whole, split, "split feeding changed the decoder's result");
});
