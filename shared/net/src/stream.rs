//! One request per bidirectional stream: frames and raw byte transfers, all bounded.

use crate::NetError;
use bytes::Bytes;
use serde::Serialize;
use skein_proto::frame::{self, Frame};

/// Write one frame: header plus raw payload parts. The parts are shared bytes (tensors'
/// [`skein_proto::Tensor::bytes`]): large ones go to quinn as they are, never copied.
pub async fn write_frame<H: Serialize>(
    send: &mut quinn::SendStream,
    header: &H,
    payload: &[Bytes],
    max: u32,
) -> Result<(), NetError> {
    let h = frame::encode_header(header)?;
    let payload_len: u64 = payload.iter().map(|p| p.len() as u64).sum();
    let prefix = frame::prefix(h.len(), payload_len, max)?;
    // Small frames go out in one write; large payloads are handed over in place.
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
        let mut chunks = Vec::with_capacity(1 + payload.len());
        chunks.push(Bytes::from(head));
        chunks.extend(payload.iter().cloned());
        send.write_all_chunks(&mut chunks).await?;
    }
    Ok(())
}

fn read_error(e: quinn::ReadError) -> NetError {
    match e {
        quinn::ReadError::ZeroRttRejected => NetError::ZeroRttRejected,
        e => NetError::Read(e.to_string()),
    }
}

/// Read exactly `buf.len()` bytes.
pub async fn read_exact(recv: &mut quinn::RecvStream, buf: &mut [u8]) -> Result<(), NetError> {
    recv.read_exact(buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => NetError::Closed,
        quinn::ReadExactError::ReadError(e) => read_error(e),
    })
}

/// Read exactly `n` bytes into a buffer of their own, straight from quinn's received chunks:
/// one copy, no zeroing first, and the buffer's start aligned as the allocator aligns it (16
/// bytes on the usual 64-bit targets), so that a payload's first tensor can be viewed in place.
async fn read_owned(recv: &mut quinn::RecvStream, n: usize) -> Result<Vec<u8>, NetError> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let chunk = recv
            .read_chunk(n - out.len(), true)
            .await
            .map_err(read_error)?
            .ok_or(NetError::Closed)?;
        out.extend_from_slice(&chunk.bytes);
    }
    Ok(out)
}

/// Read one frame of at most `max` bytes; every length is checked before anything is
/// allocated. The payload lands in a buffer of its own ([`read_owned`]), which the tensors
/// split out of it share.
pub async fn read_frame(recv: &mut quinn::RecvStream, max: u32) -> Result<Frame, NetError> {
    let mut start = [0u8; 10];
    read_exact(recv, &mut start[..4]).await?;
    let n = frame::body_len([start[0], start[1], start[2], start[3]], max)?;
    read_exact(recv, &mut start[4..]).await?;
    let (header_len, payload_len) = frame::head_lengths(
        [start[4], start[5], start[6], start[7], start[8], start[9]],
        n,
    )?;
    let mut header = vec![0u8; header_len];
    read_exact(recv, &mut header).await?;
    let payload = read_owned(recv, payload_len).await?;
    Ok(Frame::from_parts(Bytes::from(header), Bytes::from(payload)))
}

/// Open a stream on `conn`, send one frame, finish, and read the one-frame answer.
pub async fn call<H: Serialize>(
    conn: &quinn::Connection,
    header: &H,
    payload: &[Bytes],
    max: u32,
) -> Result<Frame, NetError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, header, payload, max).await?;
    let _ = send.finish();
    read_frame(&mut recv, max).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::TransportLimits;
    use crate::endpoint::{client_config, client_endpoint, connect, server_endpoint};
    use crate::tls::{coordinator_server_name, ClientAuth};
    use crate::MeshCa;
    use skein_proto::{DataType, InferRequest, RequestKind, Tensor};
    use std::time::Duration;

    fn request(inputs: &[Tensor]) -> InferRequest {
        InferRequest {
            id: 1,
            model: "m".into(),
            version: None,
            inputs: inputs.iter().map(|t| t.descriptor()).collect(),
            outputs: vec![],
            timeout_ms: None,
            ticket: Default::default(),
            trace: None,
            kind: RequestKind::Infer,
        }
    }

    /// A frame with a large payload (written as shared chunks, not copied) arrives whole over
    /// real QUIC; its tensors share one payload buffer of their own, whose start is aligned
    /// for the widest element type, and a frame whose header claims more than the frame
    /// holds is refused.
    #[tokio::test]
    async fn large_frames_arrive_whole_with_tensors_sharing_an_aligned_payload() {
        let ca = MeshCa::ephemeral().unwrap();
        let limits = TransportLimits::default();
        let server = server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &ca.issue_coordinator().unwrap(),
            &[b"test"],
            ClientAuth::Optional,
            &limits,
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let client = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let cfg = client_config(&ca.issue_client("c").unwrap(), b"test", &limits).unwrap();
        let served = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let mut frames = Vec::new();
            for _ in 0..2 {
                let (_send, mut recv) = conn.accept_bi().await.unwrap();
                frames.push(read_frame(&mut recv, 1 << 24).await);
            }
            frames
        });
        let conn = connect(
            &client,
            cfg,
            addr,
            coordinator_server_name(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let values: Vec<f32> = (0..75_000).map(|i| i as f32 * 0.5).collect();
        let x = Tensor::from_f32("x", vec![3, 25_000], &values).unwrap();
        let sr = Tensor::from_i64("sr", vec![1], &[16_000]).unwrap();
        let odd = Tensor::new("b", DataType::Uint8, vec![3], vec![1, 2, 3]).unwrap();
        let inputs = vec![x.clone(), sr.clone(), odd.clone()];
        let parts: Vec<Bytes> = inputs.iter().map(|t| t.bytes().clone()).collect();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        write_frame(&mut send, &request(&inputs), &parts, 1 << 24)
            .await
            .unwrap();
        send.finish().unwrap();
        // A header length beyond the frame's own length.
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        let mut lying = frame::prefix(4, 0, 1 << 24).unwrap().to_vec();
        lying[6..10].copy_from_slice(&100u32.to_le_bytes());
        lying.extend_from_slice(&[0; 4]);
        send.write_all(&lying).await.unwrap();
        send.finish().unwrap();

        let mut frames = served.await.unwrap().into_iter();
        let f = frames.next().unwrap().unwrap();
        let req: InferRequest = f.header().unwrap();
        let got = f.tensors(&req.inputs).unwrap();
        assert_eq!(got, inputs);
        let payload = f.payload().as_ptr_range();
        assert_eq!(
            got[0].data().as_ptr(),
            payload.start,
            "no copy of the payload"
        );
        assert!(payload.contains(&got[1].data().as_ptr()));
        assert_eq!(payload.start as usize % 8, 0, "payload start aligned");
        assert!(matches!(
            frames.next().unwrap(),
            Err(NetError::Frame(skein_proto::FrameError::Truncated(_)))
        ));
    }
}
