//! One [`Envelope`] per frame on QUIC streams (framing in `cleanroom_proto::frame`).
//!
//! The receiver reads the 4-byte length prefix, checks it against the cap, and only then
//! allocates and reads the body: an announced 4 GiB frame costs four bytes.

use cleanroom_proto::FrameError;
use cleanroom_proto::frame::{LEN_PREFIX, body_len, check_envelope, decode_body};
use cleanroom_proto::v1::{Envelope, Phase};
use quinn::{ReadError, ReadExactError, StoppedError, WriteError};

use crate::TransportError;

fn read_err(e: ReadError) -> TransportError {
    match e {
        ReadError::ConnectionLost(c) => TransportError::Closed {
            reason: crate::endpoint::closed_reason(&c),
        },
        ReadError::Reset(code) => {
            TransportError::Stream(format!("reset by the peer (code {code})"))
        }
        other => TransportError::Stream(other.to_string()),
    }
}

fn write_err(e: WriteError) -> TransportError {
    match e {
        WriteError::ConnectionLost(c) => TransportError::Closed {
            reason: crate::endpoint::closed_reason(&c),
        },
        WriteError::Stopped(code) => {
            TransportError::Stream(format!("stopped by the peer (code {code})"))
        }
        other => TransportError::Stream(other.to_string()),
    }
}

/// Sending half: writes one envelope per frame.
#[derive(Debug)]
pub struct FramedSend {
    inner: quinn::SendStream,
}

impl FramedSend {
    /// Wraps a send stream.
    pub fn new(s: quinn::SendStream) -> Self {
        Self { inner: s }
    }

    /// Sends one envelope (waits for flow-control credit: this is the backpressure).
    pub async fn send(&mut self, e: &Envelope) -> Result<(), TransportError> {
        let frame = cleanroom_proto::encode_frame(e)?;
        self.inner.write_all(&frame).await.map_err(write_err)
    }

    /// Ends the stream cleanly after what was sent.
    pub fn finish(&mut self) -> Result<(), TransportError> {
        self.inner
            .finish()
            .map_err(|e| TransportError::Stream(format!("cannot finish: {e}")))
    }

    /// Waits until the peer has received everything up to [`finish`](Self::finish) (returns
    /// `Ok`), or stopped the stream (an error). Call it before closing the connection, so the
    /// last frames are not lost.
    pub async fn stopped(&mut self) -> Result<(), TransportError> {
        match self.inner.stopped().await {
            Ok(None) => Ok(()),
            Ok(Some(code)) => Err(TransportError::Stream(format!(
                "stopped by the peer (code {code})"
            ))),
            Err(StoppedError::ConnectionLost(c)) => Err(TransportError::Closed {
                reason: crate::endpoint::closed_reason(&c),
            }),
            Err(e) => Err(TransportError::Stream(e.to_string())),
        }
    }

    /// The underlying stream.
    pub fn into_inner(self) -> quinn::SendStream {
        self.inner
    }
}

/// Receiving half: reads one envelope per frame, cap checked before the body is buffered.
#[derive(Debug)]
pub struct FramedRecv {
    inner: quinn::RecvStream,
    /// This stream's number in the transcript (test builds only, see [`crate::transcript`]).
    #[cfg(feature = "transcript")]
    transcript_stream: u64,
}

impl FramedRecv {
    /// Wraps a receive stream.
    pub fn new(r: quinn::RecvStream) -> Self {
        Self {
            inner: r,
            #[cfg(feature = "transcript")]
            transcript_stream: crate::transcript::next_stream(),
        }
    }

    /// Next envelope; `Ok(None)` at a clean end of stream (exactly at a frame boundary). A
    /// stream that ends inside a frame is [`FrameError::Truncated`]; an announced length over
    /// the cap is [`FrameError::TooLong`], reported before reading the body.
    pub async fn recv(&mut self) -> Result<Option<Envelope>, TransportError> {
        let mut prefix = [0u8; LEN_PREFIX];
        let mut filled = 0;
        while filled < LEN_PREFIX {
            match self
                .inner
                .read(&mut prefix[filled..])
                .await
                .map_err(read_err)?
            {
                Some(n) => filled += n,
                None if filled == 0 => return Ok(None),
                None => return Err(FrameError::Truncated { buffered: filled }.into()),
            }
        }
        let len = body_len(prefix)?;
        let mut body = vec![0u8; len];
        match self.inner.read_exact(&mut body).await {
            Ok(()) => {}
            Err(ReadExactError::FinishedEarly(n)) => {
                return Err(FrameError::Truncated {
                    buffered: LEN_PREFIX + n,
                }
                .into());
            }
            Err(ReadExactError::ReadError(e)) => return Err(read_err(e)),
        }
        let envelope = decode_body(&body)?;
        #[cfg(feature = "transcript")]
        crate::transcript::record(self.transcript_stream, &body);
        Ok(Some(envelope))
    }

    /// Next envelope, which must exist and belong to `job_id` and `phase`.
    pub async fn recv_expect(
        &mut self,
        job_id: &str,
        phase: Phase,
    ) -> Result<Envelope, TransportError> {
        let envelope = self.recv().await?.ok_or_else(|| TransportError::Closed {
            reason: format!(
                "stream ended while waiting for a {} frame of job '{job_id}'",
                phase.as_str_name()
            ),
        })?;
        check_envelope(&envelope, job_id, phase)?;
        Ok(envelope)
    }

    /// The underlying stream.
    pub fn into_inner(self) -> quinn::RecvStream {
        self.inner
    }
}

fn conn_err(e: quinn::ConnectionError) -> TransportError {
    TransportError::Closed {
        reason: crate::endpoint::closed_reason(&e),
    }
}

/// Opens a bidirectional stream on `conn` and wraps both halves. (QUIC announces the stream to
/// the peer only with its first frame: send before expecting anything.)
pub async fn open_bi(conn: &quinn::Connection) -> Result<(FramedSend, FramedRecv), TransportError> {
    let (s, r) = conn.open_bi().await.map_err(conn_err)?;
    Ok((FramedSend::new(s), FramedRecv::new(r)))
}

/// Accepts the peer's next bidirectional stream and wraps both halves.
pub async fn accept_bi(
    conn: &quinn::Connection,
) -> Result<(FramedSend, FramedRecv), TransportError> {
    let (s, r) = conn.accept_bi().await.map_err(conn_err)?;
    Ok((FramedSend::new(s), FramedRecv::new(r)))
}
