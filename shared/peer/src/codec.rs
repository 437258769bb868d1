//! The `skein/infer` frames on a libp2p stream: the very codec of the QUIC path
//! ([`skein_proto::frame`]: length prefix, bounded header and payload), here over
//! `futures::io` streams instead of quinn's.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::Serialize;
use skein_proto::frame::{self, Frame};

/// Errors reading or writing a frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameIoError {
    /// The frame is invalid or over the size limit.
    #[error(transparent)]
    Frame(#[from] skein_proto::FrameError),
    /// The stream ended before a whole frame arrived.
    #[error("stream closed before a whole frame arrived")]
    Closed,
    /// The stream failed.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
}

/// Write one frame (header plus raw payload parts) of at most `max` bytes.
pub async fn write_frame<W: AsyncWrite + Unpin, H: Serialize>(
    w: &mut W,
    header: &H,
    payload: &[&[u8]],
    max: u32,
) -> Result<(), FrameIoError> {
    let h = frame::encode_header(header)?;
    let payload_len: u64 = payload.iter().map(|p| p.len() as u64).sum();
    let prefix = frame::prefix(h.len(), payload_len, max)?;
    let mut head = Vec::with_capacity(prefix.len() + h.len());
    head.extend_from_slice(&prefix);
    head.extend_from_slice(&h);
    w.write_all(&head).await?;
    for p in payload {
        w.write_all(p).await?;
    }
    w.flush().await?;
    Ok(())
}

/// Read one frame of at most `max` bytes; the length is checked before anything is allocated.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: u32) -> Result<Frame, FrameIoError> {
    let mut len = [0u8; 4];
    read_exact(r, &mut len).await?;
    let n = frame::body_len(len, max)?;
    let mut body = vec![0u8; n];
    read_exact(r, &mut body).await?;
    Ok(Frame::parse(body)?)
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), FrameIoError> {
    r.read_exact(buf).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameIoError::Closed,
        _ => FrameIoError::Io(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use skein_proto::{InferResponse, WireError};

    #[tokio::test]
    async fn a_frame_round_trips_with_its_payload() {
        let mut buf = Cursor::new(Vec::new());
        let e = WireError::new(skein_proto::ErrorCode::Malformed, "x");
        write_frame(
            &mut buf,
            &InferResponse::Err(e.clone()),
            &[b"ab", b"cd"],
            1 << 20,
        )
        .await
        .unwrap();
        let mut r = Cursor::new(buf.into_inner());
        let f = read_frame(&mut r, 1 << 20).await.unwrap();
        assert_eq!(f.payload(), b"abcd");
        match f.header::<InferResponse>().unwrap() {
            InferResponse::Err(got) => assert_eq!(got, e),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_before_it_is_read() {
        let mut buf = Cursor::new(Vec::new());
        let big = vec![0u8; 4096];
        let e = WireError::new(skein_proto::ErrorCode::Malformed, "x");
        write_frame(&mut buf, &InferResponse::Err(e), &[&big], 1 << 20)
            .await
            .unwrap();
        let mut r = Cursor::new(buf.into_inner());
        let err = read_frame(&mut r, 1024).await.unwrap_err();
        assert!(matches!(err, FrameIoError::Frame(_)), "{err}");
        // Nothing past the length prefix was consumed.
        assert_eq!(r.position(), 4);
    }

    #[tokio::test]
    async fn a_truncated_frame_is_closed_not_garbage() {
        let mut buf = Cursor::new(Vec::new());
        let e = WireError::new(skein_proto::ErrorCode::Malformed, "x");
        write_frame(&mut buf, &InferResponse::Err(e), &[b"abcd"], 1 << 20)
            .await
            .unwrap();
        let mut bytes = buf.into_inner();
        bytes.truncate(bytes.len() - 2);
        let err = read_frame(&mut Cursor::new(bytes), 1 << 20)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameIoError::Closed), "{err}");
    }
}
