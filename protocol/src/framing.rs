//! Length-delimited framing: one message per frame, refused above the limit
//! before any allocation.

use tokio_util::codec::LengthDelimitedCodec;

use crate::limits::FRAME_BYTES_MAX;

/// The framing codec: a u32 big-endian length prefix, refused above `max_frame_bytes`.
pub fn frame_codec(max_frame_bytes: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .max_frame_length(max_frame_bytes.min(FRAME_BYTES_MAX))
        .new_codec()
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
}
