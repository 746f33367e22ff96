//! `decode_body` on arbitrary bytes never panics; whatever decodes re-encodes with
//! `encode_frame`, and decoding that frame (directly and through `FrameDecoder`) gives back the
//! same envelope.
#![no_main]

use cleanroom_proto::frame::{LEN_PREFIX, decode_body};
use cleanroom_proto::{FrameDecoder, FrameError, encode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = decode_body(data) else {
        return;
    };
    let frame = match encode_frame(&envelope) {
        Ok(f) => f,
        // Only possible for a body over the cap, which an input this small cannot give.
        Err(FrameError::TooLong { .. }) => return,
        Err(e) => panic!("encode_frame failed on a decoded envelope: {e}"),
    };
    let announced = u32::from_be_bytes(frame[..LEN_PREFIX].try_into().expect("4 bytes")) as usize;
    assert_eq!(announced, frame.len() - LEN_PREFIX, "length prefix does not match the body");

    let again = decode_body(&frame[LEN_PREFIX..]).expect("re-encoded envelope must decode");
    assert_eq!(again, envelope, "decode(encode(x)) != x");

    let mut dec = FrameDecoder::new();
    dec.push(&frame);
    let via_decoder = dec.next_frame().expect("frame decodes").expect("a whole frame");
    assert_eq!(via_decoder, envelope);
    assert_eq!(dec.next_frame(), Ok(None));
    dec.finish().expect("nothing left over");
});
