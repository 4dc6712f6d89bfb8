//! Length-delimited framing: one message per frame, refused above the limit
//! before any allocation; and [`framed`], one message stream over a stream
//! pair (a QUIC bidirectional stream), so no caller builds the codec, encodes
//! and sends by hand.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::limits::FRAME_BYTES_MAX;
use crate::{DecodeError, EncodeError, decode, encode};

/// The framing codec: a u32 big-endian length prefix, refused above `max_frame_bytes`.
pub fn frame_codec(max_frame_bytes: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .max_frame_length(max_frame_bytes.min(FRAME_BYTES_MAX))
        .new_codec()
}

/// Bytes each frame adds on the wire: its length prefix.
pub const FRAME_HEADER_BYTES: usize = 4;

/// A message could not be sent or received on a framed stream.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The message could not be encoded (a bug, or a value serde refuses).
    #[error("{0}")]
    Encode(#[from] EncodeError),
    /// The stream failed, or a frame was above the limit (the stream is then unusable).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A frame arrived that is not a message of the expected type.
    #[error("{0}")]
    Decode(#[from] DecodeError),
}

/// The two halves of one framed message stream over `send` and `recv`, with
/// frames above `max_frame_bytes` (at most [`FRAME_BYTES_MAX`]) refused both ways.
pub fn framed<W, R>(send: W, recv: R, max_frame_bytes: usize) -> (FrameWriter<W>, FrameReader<R>)
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    (
        FrameWriter::new(send, max_frame_bytes),
        FrameReader::new(recv, max_frame_bytes),
    )
}

/// The sending half of a framed stream: one encoded message per frame.
#[derive(Debug)]
pub struct FrameWriter<W = quinn::SendStream> {
    inner: FramedWrite<W, LengthDelimitedCodec>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Frames messages onto `send`.
    pub fn new(send: W, max_frame_bytes: usize) -> Self {
        FrameWriter {
            inner: FramedWrite::new(send, frame_codec(max_frame_bytes)),
        }
    }

    /// Encodes `msg` and writes it as one frame (flushed); returns the bytes it
    /// took on the wire, its length prefix included.
    ///
    /// # Errors
    /// [`FrameError::Encode`] if `msg` does not encode, [`FrameError::Io`] if it
    /// is above the frame limit or the stream fails.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<usize, FrameError> {
        let bytes = encode(msg)?;
        let n = bytes.len() + FRAME_HEADER_BYTES;
        self.inner.send(Bytes::from(bytes)).await?;
        Ok(n)
    }

    /// Encodes `msg` as one frame into the writer's buffer, without flushing
    /// (a full buffer is written out); returns the bytes it takes on the wire.
    /// [`FrameWriter::flush`] then sends the buffered frames together: a
    /// session with several messages ready makes one stream write for them, not
    /// one each.
    ///
    /// # Errors
    /// As [`FrameWriter::send`].
    pub async fn feed<T: Serialize>(&mut self, msg: &T) -> Result<usize, FrameError> {
        let bytes = encode(msg)?;
        let n = bytes.len() + FRAME_HEADER_BYTES;
        self.inner.feed(Bytes::from(bytes)).await?;
        Ok(n)
    }

    /// Writes out every frame [`FrameWriter::feed`] buffered.
    ///
    /// # Errors
    /// [`FrameError::Io`] if the stream fails.
    pub async fn flush(&mut self) -> Result<(), FrameError> {
        Ok(SinkExt::<Bytes>::flush(&mut self.inner).await?)
    }

    /// The stream underneath, to finish or reset it.
    pub fn get_mut(&mut self) -> &mut W {
        self.inner.get_mut()
    }
}

/// The receiving half of a framed stream. As a [`Stream`] it yields raw
/// frames (for callers that peek before decoding); [`FrameReader::recv`]
/// decodes them.
#[derive(Debug)]
pub struct FrameReader<R = quinn::RecvStream> {
    inner: FramedRead<R, LengthDelimitedCodec>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Reads frames from `recv`.
    pub fn new(recv: R, max_frame_bytes: usize) -> Self {
        FrameReader {
            inner: FramedRead::new(recv, frame_codec(max_frame_bytes)),
        }
    }

    /// The next message; `None` at the end of the stream. Cancel safe: a
    /// partly read frame stays buffered for the next call.
    ///
    /// # Errors
    /// [`FrameError::Io`] if the stream fails or a frame is above the limit,
    /// [`FrameError::Decode`] if a frame is not a `T`.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.inner.next().await {
            Some(frame) => Ok(Some(decode(&frame?)?)),
            None => Ok(None),
        }
    }
}

impl<R: AsyncRead + Unpin> Stream for FrameReader<R> {
    type Item = Result<BytesMut, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use tokio_util::codec::{Decoder, Encoder};

    use super::*;

    #[test]
    fn oversized_frames_are_refused_by_the_framer() {
        let mut codec = frame_codec(1024);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&(2048u32).to_be_bytes());
        buf.extend_from_slice(&[0u8; 16]);
        assert!(codec.decode(&mut buf).is_err());

        let mut out = BytesMut::new();
        assert!(
            codec
                .encode(bytes::Bytes::from(vec![0u8; 2048]), &mut out)
                .is_err()
        );
        codec
            .encode(bytes::Bytes::from(vec![7u8; 10]), &mut out)
            .expect("small frame");
        let frame = codec.decode(&mut out).expect("decode").expect("frame");
        assert_eq!(&frame[..], &[7u8; 10]);
    }

    #[tokio::test]
    async fn messages_cross_a_framed_stream_and_oversized_ones_are_refused() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (a_rd, a_wr) = tokio::io::split(a);
        let (b_rd, b_wr) = tokio::io::split(b);
        let (mut wr, _) = framed(a_wr, a_rd, 1024);
        let (_, mut rd) = framed(b_wr, b_rd, 1024);
        let n = wr.send(&("hello", 7u32)).await.expect("send");
        assert_eq!(
            n,
            FRAME_HEADER_BYTES + encode(&("hello", 7u32)).expect("encode").len()
        );
        let got: Option<(String, u32)> = rd.recv().await.expect("recv");
        assert_eq!(got, Some(("hello".into(), 7)));
        // Too large to send: refused before anything is written.
        let big = vec![0u8; 2048];
        assert!(matches!(wr.send(&big).await, Err(FrameError::Io(_))));
        // The wrong type: a decode error, not a panic.
        wr.send(&"text").await.expect("send");
        assert!(matches!(rd.recv::<u64>().await, Err(FrameError::Decode(_))));
        drop(wr);
        assert!(matches!(rd.recv::<u64>().await, Ok(None)));
    }

    #[tokio::test]
    async fn fed_frames_wait_for_the_flush_and_arrive_in_order() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (a_rd, a_wr) = tokio::io::split(a);
        let (b_rd, b_wr) = tokio::io::split(b);
        let (mut wr, _) = framed(a_wr, a_rd, 1024);
        let (_, mut rd) = framed(b_wr, b_rd, 1024);
        for i in 0..3u32 {
            wr.feed(&i).await.expect("feed");
        }
        // Nothing is on the stream before the flush.
        let early = tokio::time::timeout(std::time::Duration::from_millis(20), rd.recv::<u32>());
        assert!(
            early.await.is_err(),
            "a fed frame was written before the flush"
        );
        wr.flush().await.expect("flush");
        for i in 0..3u32 {
            assert_eq!(rd.recv::<u32>().await.expect("recv"), Some(i));
        }
        // Too large: refused at feed, and what was fed before still goes.
        wr.feed(&7u32).await.expect("feed");
        assert!(matches!(
            wr.feed(&vec![0u8; 2048]).await,
            Err(FrameError::Io(_))
        ));
        wr.flush().await.expect("flush");
        assert_eq!(rd.recv::<u32>().await.expect("recv"), Some(7));
    }
}
