//! The bincode message decoder behind a well-formed frame prefix, so that every input reaches
//! the header decoders: control requests and answers, inference requests and answers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_proto::{CtlEnvelope, CtlResponse, Frame, InferRequest, InferResponse, PROTOCOL_VERSION};

fuzz_target!(|data: &[u8]| {
    // The first byte splits the input into header and payload.
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let header_len = (split as usize * rest.len() / 255).min(rest.len());
    let mut body = Vec::with_capacity(6 + rest.len());
    body.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    body.extend_from_slice(&(header_len as u32).to_le_bytes());
    body.extend_from_slice(rest);
    let Ok(f) = Frame::parse(body) else {
        return;
    };
    if let Ok(env) = f.header::<CtlEnvelope>() {
        // Whatever decodes must encode again.
        skein_proto::frame::encode_header(&env).expect("re-encoding a decoded envelope");
    }
    let _ = f.header::<CtlResponse>();
    if let Ok(req) = f.header::<InferRequest>() {
        let _ = f.tensors(&req.inputs);
    }
    if let Ok(InferResponse::Ok(reply)) = f.header::<InferResponse>() {
        let _ = f.tensors(&reply.outputs);
    }
});
