//! A frame as it arrives on a stream: length prefix, then the body, decoded as every message
//! type a peer may send, tensors split by the descriptors the header announces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_proto::{
    CtlEnvelope, CtlResponse, Frame, InferRequest, InferResponse, DEFAULT_MAX_FRAME_LEN,
};

fuzz_target!(|data: &[u8]| {
    if let [a, b, c, d, rest @ ..] = data {
        if let Ok(n) = skein_proto::frame::body_len([*a, *b, *c, *d], DEFAULT_MAX_FRAME_LEN) {
            assert!(n <= DEFAULT_MAX_FRAME_LEN as usize);
            let body = rest[..n.min(rest.len())].to_vec();
            if let Ok(f) = Frame::parse(body) {
                let _ = f.header::<CtlEnvelope>();
                let _ = f.header::<CtlResponse>();
                if let Ok(InferResponse::Ok(reply)) = f.header::<InferResponse>() {
                    let _ = f.tensors(&reply.outputs);
                }
                if let Ok(req) = f.header::<InferRequest>() {
                    let _ = f.tensors(&req.inputs);
                }
            }
        }
    }
});
