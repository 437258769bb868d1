//! The bincode message decoder behind a well-formed frame prefix, so that every input reaches
//! the header decoders: control requests and answers, inference requests and answers. Whatever
//! decodes must encode again, and that encoding must round-trip byte for byte (decode it and
//! encode it again: the very same bytes). The input itself need not come back byte for byte:
//! bincode reads varints that are longer than needed, and a map's duplicate keys collapse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use skein_proto::frame::encode_header;
use skein_proto::{CtlEnvelope, CtlResponse, Frame, InferRequest, InferResponse, PROTOCOL_VERSION};

/// A frame body (version, header length, header, payload) around `header` and `payload`.
fn frame(header: &[u8], payload: &[u8]) -> Frame {
    let mut body = Vec::with_capacity(6 + header.len() + payload.len());
    body.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    body.extend_from_slice(&(header.len() as u32).to_le_bytes());
    body.extend_from_slice(header);
    body.extend_from_slice(payload);
    Frame::parse(body).expect("a frame built here parses")
}

/// `decoded` encodes, and its encoding decodes and encodes to the same bytes.
fn round_trips<H: Serialize + DeserializeOwned>(decoded: &H, what: &str) {
    let once =
        encode_header(decoded).unwrap_or_else(|e| panic!("re-encoding a decoded {what}: {e}"));
    let again: H = frame(&once, &[])
        .header()
        .unwrap_or_else(|e| panic!("decoding a re-encoded {what}: {e}"));
    let twice = encode_header(&again).unwrap_or_else(|e| panic!("encoding {what} twice: {e}"));
    assert_eq!(once, twice, "{what} does not round-trip byte for byte");
}

fuzz_target!(|data: &[u8]| {
    // The first byte splits the input into header and payload.
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let header_len = (split as usize * rest.len() / 255).min(rest.len());
    let f = frame(&rest[..header_len], &rest[header_len..]);
    if let Ok(env) = f.header::<CtlEnvelope>() {
        round_trips(&env, "CtlEnvelope");
    }
    if let Ok(resp) = f.header::<CtlResponse>() {
        round_trips(&resp, "CtlResponse");
    }
    if let Ok(req) = f.header::<InferRequest>() {
        round_trips(&req, "InferRequest");
        let _ = f.tensors(&req.inputs);
    }
    if let Ok(resp) = f.header::<InferResponse>() {
        round_trips(&resp, "InferResponse");
        if let InferResponse::Ok(reply) = resp {
            let _ = f.tensors(&reply.outputs);
        }
    }
});
