//! Length-prefixed frames: `u32` big-endian body length, then one protobuf [`Envelope`].
//!
//! The length is checked against [`MAX_FRAME_LEN`] before the body is buffered, so a peer that
//! announces a 4 GiB frame costs us four bytes, not four gigabytes. Decoding is sans-IO: bytes go
//! into a [`FrameDecoder`], whole envelopes come out.

use prost::Message;

use crate::v1::{Envelope, Phase};

/// Hard cap on one frame's body. Bulk data is sent in batches well below it
/// (4096 points × 32 bytes = 128 KiB).
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Why a frame could not be decoded or was not the frame expected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The announced body length exceeds the cap.
    #[error("frame of {len} bytes exceeds the {max}-byte cap")]
    TooLong {
        /// Announced length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The body is not a valid envelope.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes left over.
        buffered: usize,
    },
    /// The frame belongs to another job.
    #[error("frame for job '{got}' on a stream of job '{expected}'")]
    WrongJob {
        /// Job of the stream.
        expected: String,
        /// Job named by the frame.
        got: String,
    },
    /// The frame is for another phase than the receiver is in.
    #[error("frame for phase {got:?} while in phase {expected:?}")]
    WrongPhase {
        /// Phase of the receiver.
        expected: Phase,
        /// Phase named by the frame (or the raw value if unknown).
        got: i32,
    },
    /// The envelope carries no body or a body that does not belong to its phase.
    #[error("unexpected message in phase {phase:?}: {got}")]
    UnexpectedBody {
        /// Phase of the receiver.
        phase: Phase,
        /// What arrived.
        got: &'static str,
    },
}

/// Encodes one envelope as a frame. Fails only if the envelope itself is over the cap, which is
/// a bug in the sender, reported rather than sent.
pub fn encode_frame(envelope: &Envelope) -> Result<Vec<u8>, FrameError> {
    let len = envelope.encoded_len();
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLong {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let mut out = Vec::with_capacity(LEN_PREFIX + len);
    // `len <= MAX_FRAME_LEN < u32::MAX`, so the cast is lossless.
    out.extend_from_slice(&(len as u32).to_be_bytes());
    envelope
        .encode(&mut out)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    Ok(out)
}

/// Reads the announced body length from a 4-byte prefix and checks it against the cap.
pub fn body_len(prefix: [u8; LEN_PREFIX]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLong {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    Ok(len)
}

/// Decodes one envelope from exactly one frame body. Trailing bytes are impossible here: protobuf
/// consumes the whole body or fails.
pub fn decode_body(body: &[u8]) -> Result<Envelope, FrameError> {
    Envelope::decode(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Incremental decoder: feed it bytes as they arrive, take whole envelopes out.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Returns the next whole envelope, `Ok(None)` if more bytes are needed. An over-long
    /// length prefix is an error as soon as its four bytes are in.
    pub fn next_frame(&mut self) -> Result<Option<Envelope>, FrameError> {
        let Some(prefix) = self.buf.first_chunk::<LEN_PREFIX>() else {
            return Ok(None);
        };
        let len = body_len(*prefix)?;
        if self.buf.len() < LEN_PREFIX + len {
            return Ok(None);
        }
        let envelope = decode_body(&self.buf[LEN_PREFIX..LEN_PREFIX + len]);
        self.buf.drain(..LEN_PREFIX + len);
        envelope.map(Some)
    }

    /// Call at end of stream: leftover bytes mean the peer stopped mid-frame.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated {
                buffered: self.buf.len(),
            })
        }
    }
}

/// Checks that an envelope belongs to `job_id` and `phase`.
pub fn check_envelope(envelope: &Envelope, job_id: &str, phase: Phase) -> Result<(), FrameError> {
    if envelope.job_id != job_id {
        return Err(FrameError::WrongJob {
            expected: job_id.to_owned(),
            got: envelope.job_id.clone(),
        });
    }
    if envelope.phase != phase as i32 {
        return Err(FrameError::WrongPhase {
            expected: phase,
            got: envelope.phase,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Abort, envelope::Body};

    fn abort(job: &str, reason: &str) -> Envelope {
        Envelope {
            job_id: job.into(),
            phase: Phase::PsiDone as i32,
            body: Some(Body::Abort(Abort {
                reason: reason.into(),
            })),
        }
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let frames: Vec<u8> = [abort("j1", "a"), abort("j1", "b")]
            .iter()
            .flat_map(|e| encode_frame(e).unwrap())
            .collect();
        let mut dec = FrameDecoder::new();
        let mut out = Vec::new();
        for b in frames {
            dec.push(&[b]);
            while let Some(e) = dec.next_frame().unwrap() {
                out.push(e);
            }
        }
        dec.finish().unwrap();
        assert_eq!(out, vec![abort("j1", "a"), abort("j1", "b")]);
    }

    #[test]
    fn oversize_prefix_rejected_before_body() {
        let mut dec = FrameDecoder::new();
        dec.push(&u32::MAX.to_be_bytes());
        assert!(matches!(dec.next_frame(), Err(FrameError::TooLong { .. })));
    }

    #[test]
    fn garbage_body_is_an_error_not_a_panic() {
        let mut dec = FrameDecoder::new();
        dec.push(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
        assert!(matches!(dec.next_frame(), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn truncated_stream_detected() {
        let mut dec = FrameDecoder::new();
        dec.push(&[0, 0, 0, 9, 1]);
        assert_eq!(dec.next_frame().unwrap(), None);
        assert!(matches!(
            dec.finish(),
            Err(FrameError::Truncated { buffered: 5 })
        ));
    }

    #[test]
    fn wrong_job_and_phase_named() {
        let e = abort("j1", "x");
        assert!(check_envelope(&e, "j1", Phase::PsiDone).is_ok());
        assert!(matches!(
            check_envelope(&e, "j2", Phase::PsiDone),
            Err(FrameError::WrongJob { .. })
        ));
        assert!(matches!(
            check_envelope(&e, "j1", Phase::PsiBlinded),
            Err(FrameError::WrongPhase { .. })
        ));
    }
}
