//! One request per bidirectional stream: frames and raw byte transfers, all bounded.

use crate::NetError;
use serde::Serialize;
use skein_proto::frame::{self, Frame};

/// Write one frame: header plus raw payload parts.
pub async fn write_frame<H: Serialize>(
    send: &mut quinn::SendStream,
    header: &H,
    payload: &[&[u8]],
    max: u32,
) -> Result<(), NetError> {
    let h = frame::encode_header(header)?;
    let payload_len: u64 = payload.iter().map(|p| p.len() as u64).sum();
    let prefix = frame::prefix(h.len(), payload_len, max)?;
    // Small frames go out in one write; large payloads are written in place, never copied.
    if payload_len < 64 * 1024 {
        let mut buf = Vec::with_capacity(prefix.len() + h.len() + payload_len as usize);
        buf.extend_from_slice(&prefix);
        buf.extend_from_slice(&h);
        for p in payload {
            buf.extend_from_slice(p);
        }
        send.write_all(&buf).await?;
    } else {
        let mut head = Vec::with_capacity(prefix.len() + h.len());
        head.extend_from_slice(&prefix);
        head.extend_from_slice(&h);
        send.write_all(&head).await?;
        for p in payload {
            send.write_all(p).await?;
        }
    }
    Ok(())
}

/// Read exactly `buf.len()` bytes.
pub async fn read_exact(recv: &mut quinn::RecvStream, buf: &mut [u8]) -> Result<(), NetError> {
    recv.read_exact(buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => NetError::Closed,
        quinn::ReadExactError::ReadError(quinn::ReadError::ZeroRttRejected) => {
            NetError::ZeroRttRejected
        }
        quinn::ReadExactError::ReadError(e) => NetError::Read(e.to_string()),
    })
}

/// Read one frame of at most `max` bytes.
pub async fn read_frame(recv: &mut quinn::RecvStream, max: u32) -> Result<Frame, NetError> {
    let mut len = [0u8; 4];
    read_exact(recv, &mut len).await?;
    let n = frame::body_len(len, max)?;
    let mut body = vec![0u8; n];
    read_exact(recv, &mut body).await?;
    Ok(Frame::parse(body)?)
}

/// Open a stream on `conn`, send one frame, finish, and read the one-frame answer.
pub async fn call<H: Serialize>(
    conn: &quinn::Connection,
    header: &H,
    payload: &[&[u8]],
    max: u32,
) -> Result<Frame, NetError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, header, payload, max).await?;
    let _ = send.finish();
    read_frame(&mut recv, max).await
}
