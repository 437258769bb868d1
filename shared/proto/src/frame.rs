//! Length-prefixed frames with a hard maximum size.
//!
//! ```text
//! u32 LE body_len | body
//! body = u16 LE version | u32 LE header_len | header (bincode 2, standard config) | payload
//! ```
//!
//! The payload carries tensor bytes back to back, raw, in the order of the header's
//! [`TensorDesc`]s: tensors are never serialised element by element.

use crate::tensor::{Tensor, TensorDesc, TensorError};
use crate::PROTOCOL_VERSION;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Default maximum frame body length (64 MiB).
pub const DEFAULT_MAX_FRAME_LEN: u32 = 64 << 20;
/// No configuration may raise the frame limit above this (1 GiB).
pub const HARD_MAX_FRAME_LEN: u32 = 1 << 30;
/// Maximum length of the bincode header inside a frame (1 MiB).
pub const MAX_HEADER_LEN: u32 = 1 << 20;
/// Bytes before the header: body length, version, header length.
pub const PREFIX_LEN: usize = 10;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The frame exceeds the maximum frame length.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Length of the frame body.
        len: u64,
        /// The limit in force.
        max: u32,
    },
    /// The frame is shorter than its own fields say.
    #[error("truncated frame: {0}")]
    Truncated(&'static str),
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {0} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u16),
    /// The header does not decode as the expected message.
    #[error("malformed header: {0}")]
    Header(String),
    /// The payload does not match the tensor descriptors.
    #[error("payload holds {actual} bytes, tensor descriptors announce {expected}")]
    PayloadMismatch {
        /// Sum of the descriptors' byte lengths.
        expected: u64,
        /// Actual payload length.
        actual: u64,
    },
    /// A tensor is malformed.
    #[error(transparent)]
    Tensor(#[from] TensorError),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_HEADER_LEN as usize }>()
}

/// Encode a message header with bincode.
pub fn encode_header<H: Serialize>(header: &H) -> Result<Vec<u8>, FrameError> {
    let bytes = bincode::serde::encode_to_vec(header, config())
        .map_err(|e| FrameError::Header(e.to_string()))?;
    if bytes.len() > MAX_HEADER_LEN as usize {
        return Err(FrameError::TooLarge {
            len: bytes.len() as u64,
            max: MAX_HEADER_LEN,
        });
    }
    Ok(bytes)
}

/// The fixed prefix of a frame whose header and payload have the given lengths.
pub fn prefix(
    header_len: usize,
    payload_len: u64,
    max: u32,
) -> Result<[u8; PREFIX_LEN], FrameError> {
    let body = 6u64 + header_len as u64 + payload_len;
    let max = max.min(HARD_MAX_FRAME_LEN);
    if body > max as u64 {
        return Err(FrameError::TooLarge { len: body, max });
    }
    let mut out = [0u8; PREFIX_LEN];
    out[0..4].copy_from_slice(&(body as u32).to_le_bytes());
    out[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out[6..10].copy_from_slice(&(header_len as u32).to_le_bytes());
    Ok(out)
}

/// Encode a whole frame into one buffer.
pub fn encode<H: Serialize>(
    header: &H,
    payload: &[&[u8]],
    max: u32,
) -> Result<Vec<u8>, FrameError> {
    let h = encode_header(header)?;
    let payload_len: u64 = payload.iter().map(|p| p.len() as u64).sum();
    let p = prefix(h.len(), payload_len, max)?;
    let mut out = Vec::with_capacity(PREFIX_LEN + h.len() + payload_len as usize);
    out.extend_from_slice(&p);
    out.extend_from_slice(&h);
    for part in payload {
        out.extend_from_slice(part);
    }
    Ok(out)
}

/// Check the 4-byte length prefix; returns the body length to read next.
pub fn body_len(len_prefix: [u8; 4], max: u32) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(len_prefix);
    let max = max.min(HARD_MAX_FRAME_LEN);
    if len > max {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max,
        });
    }
    if len < 6 {
        return Err(FrameError::Truncated(
            "body shorter than its version and header length",
        ));
    }
    Ok(len as usize)
}

/// The header and payload lengths of a frame body of `body_len` bytes (as checked by
/// [`body_len`]) that starts with `start` (its version and header length): the reader then
/// reads the header, and the payload into a buffer of its own.
pub fn head_lengths(start: [u8; 6], body_len: usize) -> Result<(usize, usize), FrameError> {
    let version = u16::from_le_bytes([start[0], start[1]]);
    if version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    let header_len = u32::from_le_bytes([start[2], start[3], start[4], start[5]]);
    if header_len > MAX_HEADER_LEN {
        return Err(FrameError::TooLarge {
            len: header_len as u64,
            max: MAX_HEADER_LEN,
        });
    }
    let header_len = header_len as usize;
    let payload_len = body_len
        .checked_sub(6 + header_len)
        .ok_or(FrameError::Truncated("header longer than the frame"))?;
    Ok((header_len, payload_len))
}

/// A received frame: its header, and its payload as shared bytes that the tensors split out
/// of it point into (no copy).
#[derive(Debug)]
pub struct Frame {
    header: Bytes,
    payload: Bytes,
}

impl Frame {
    /// Parse a frame body (everything after the 4-byte length prefix).
    pub fn parse(body: Vec<u8>) -> Result<Frame, FrameError> {
        let Some(start) = body.first_chunk::<6>() else {
            return Err(FrameError::Truncated(
                "body shorter than its version and header length",
            ));
        };
        let (header_len, _) = head_lengths(*start, body.len())?;
        let body = Bytes::from(body);
        Ok(Frame {
            header: body.slice(6..6 + header_len),
            payload: body.slice(6 + header_len..),
        })
    }

    /// A frame read in parts (lengths checked with [`head_lengths`]): the payload in its own
    /// buffer, so its tensors start aligned.
    pub fn from_parts(header: Bytes, payload: Bytes) -> Frame {
        Frame { header, payload }
    }

    /// Decode the header as message `H`.
    pub fn header<H: DeserializeOwned>(&self) -> Result<H, FrameError> {
        let bytes = &self.header[..];
        let (h, used) = bincode::serde::decode_from_slice(bytes, config())
            .map_err(|e| FrameError::Header(e.to_string()))?;
        if used != bytes.len() {
            return Err(FrameError::Header(format!(
                "{} trailing bytes after the header",
                bytes.len() - used
            )));
        }
        Ok(h)
    }

    /// The raw payload after the header.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Split the payload into tensors described by `descs`, checking every size. The tensors
    /// share the payload's memory.
    pub fn tensors(&self, descs: &[TensorDesc]) -> Result<Vec<Tensor>, FrameError> {
        split_tensors(&self.payload, descs)
    }
}

/// Split `payload` into tensors described by `descs`, checking every size; each tensor is a
/// slice of `payload`, not a copy.
pub fn split_tensors(payload: &Bytes, descs: &[TensorDesc]) -> Result<Vec<Tensor>, FrameError> {
    let expected = descs
        .iter()
        .try_fold(0u64, |acc, d| acc.checked_add(d.byte_len))
        .ok_or(FrameError::PayloadMismatch {
            expected: u64::MAX,
            actual: payload.len() as u64,
        })?;
    if expected != payload.len() as u64 {
        return Err(FrameError::PayloadMismatch {
            expected,
            actual: payload.len() as u64,
        });
    }
    let mut at = 0usize;
    let mut out = Vec::with_capacity(descs.len());
    for d in descs {
        let end = at + d.byte_len as usize;
        out.push(Tensor::from_bytes(
            d.name.clone(),
            d.datatype,
            d.shape.clone(),
            payload.slice(at..end),
        )?);
        at = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::*;
    use crate::DataType;

    fn read(buf: &[u8], max: u32) -> Result<Frame, FrameError> {
        let n = body_len([buf[0], buf[1], buf[2], buf[3]], max)?;
        if buf.len() - 4 != n {
            return Err(FrameError::Truncated("test"));
        }
        Frame::parse(buf[4..].to_vec())
    }

    #[test]
    fn infer_request_round_trips_with_raw_payload() {
        let x = Tensor::from_f32("x", vec![2, 2], &[1.0, -2.5, 3.25, f32::MIN_POSITIVE]).unwrap();
        let sr = Tensor::from_i64("sr", vec![], &[16000]).unwrap();
        let req = InferRequest {
            id: 7,
            model: "m".into(),
            version: Some("1".into()),
            inputs: vec![x.descriptor(), sr.descriptor()],
            outputs: vec![],
            timeout_ms: Some(1000),
            ticket: SignedTicket {
                body: vec![1, 2, 3],
                signature: vec![4; 64],
            },
            trace: None,
            kind: RequestKind::Infer,
        };
        let buf = encode(&req, &[x.data(), sr.data()], DEFAULT_MAX_FRAME_LEN).unwrap();
        let f = read(&buf, DEFAULT_MAX_FRAME_LEN).unwrap();
        let back: InferRequest = f.header().unwrap();
        assert_eq!(back, req);
        let ts = f.tensors(&back.inputs).unwrap();
        assert_eq!(ts, vec![x, sr]);
    }

    #[test]
    fn oversized_frames_are_refused_both_ways() {
        let t = Tensor::new("x", DataType::Uint8, vec![1000], vec![0; 1000]).unwrap();
        let req = InferRequest {
            id: 1,
            model: "m".into(),
            version: None,
            inputs: vec![t.descriptor()],
            outputs: vec![],
            timeout_ms: None,
            ticket: Default::default(),
            trace: None,
            kind: RequestKind::Infer,
        };
        assert!(matches!(
            encode(&req, &[t.data()], 512),
            Err(FrameError::TooLarge { .. })
        ));
        let buf = encode(&req, &[t.data()], DEFAULT_MAX_FRAME_LEN).unwrap();
        assert!(matches!(read(&buf, 512), Err(FrameError::TooLarge { .. })));
        assert!(matches!(
            body_len(u32::MAX.to_le_bytes(), u32::MAX),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn payload_must_match_descriptors() {
        let desc = TensorDesc {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![4],
            byte_len: 16,
        };
        assert!(matches!(
            split_tensors(&Bytes::from_static(&[0; 12]), std::slice::from_ref(&desc)),
            Err(FrameError::PayloadMismatch { .. })
        ));
        let lying = TensorDesc {
            byte_len: 12,
            ..desc
        };
        assert!(matches!(
            split_tensors(&Bytes::from_static(&[0; 12]), &[lying]),
            Err(FrameError::Tensor(_))
        ));
    }

    #[test]
    fn tensors_share_the_payload_and_head_lengths_are_checked() {
        let x = Tensor::from_f32("x", vec![4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        let req = InferRequest {
            id: 1,
            model: "m".into(),
            version: None,
            inputs: vec![x.descriptor(), x.descriptor()],
            outputs: vec![],
            timeout_ms: None,
            ticket: Default::default(),
            trace: None,
            kind: RequestKind::Infer,
        };
        let buf = encode(&req, &[x.data(), x.data()], DEFAULT_MAX_FRAME_LEN).unwrap();
        let f = read(&buf, DEFAULT_MAX_FRAME_LEN).unwrap();
        let ts = f.tensors(&req.inputs).unwrap();
        assert_eq!(ts, vec![x.clone(), x]);
        assert_eq!(ts[0].data().as_ptr(), f.payload().as_ptr());
        assert_eq!(ts[1].data().as_ptr(), f.payload()[16..].as_ptr());
        // The lengths a reader takes from a frame's first six bytes.
        let start = |version: u16, header_len: u32| {
            let mut s = [0u8; 6];
            s[..2].copy_from_slice(&version.to_le_bytes());
            s[2..].copy_from_slice(&header_len.to_le_bytes());
            s
        };
        assert_eq!(
            head_lengths(start(PROTOCOL_VERSION, 10), 50).unwrap(),
            (10, 34)
        );
        assert_eq!(
            head_lengths(start(PROTOCOL_VERSION, 44), 50).unwrap(),
            (44, 0)
        );
        assert!(matches!(
            head_lengths(start(PROTOCOL_VERSION, 45), 50),
            Err(FrameError::Truncated(_))
        ));
        assert!(matches!(
            head_lengths(start(PROTOCOL_VERSION, MAX_HEADER_LEN + 1), usize::MAX),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            head_lengths(start(PROTOCOL_VERSION + 1, 0), 6),
            Err(FrameError::UnsupportedVersion(_))
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x2545F4914F6CDD1Du64;
        for len in 0..300usize {
            let mut body = Vec::with_capacity(len);
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                body.push(seed as u8);
            }
            if body.len() >= 2 {
                body[0] = 1;
                body[1] = 0;
            }
            if let Ok(f) = Frame::parse(body) {
                let _ = f.header::<InferRequest>();
                let _ = f.header::<CtlRequest>();
            }
        }
    }

    #[test]
    fn wrong_version_is_reported() {
        let mut buf = encode(&CtlRequest::ListNodes, &[], DEFAULT_MAX_FRAME_LEN).unwrap();
        buf[4] = 9;
        assert!(matches!(
            read(&buf, DEFAULT_MAX_FRAME_LEN),
            Err(FrameError::UnsupportedVersion(9))
        ));
    }
}
