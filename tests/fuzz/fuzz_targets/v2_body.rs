//! The KServe V2 HTTP request body: JSON, or JSON followed by binary tensor data with the
//! `Inference-Header-Content-Length` split, exactly as the gateway parses it; and the fast JSON
//! reader must agree with serde_json (the reference) on every input: the same request, bit for
//! bit, or the same error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_v2::codec::{decode_request, decode_request_reference, split_body};

fuzz_target!(|data: &[u8]| {
    // The first two bytes pick the header-length value the request claims, if any.
    let (header, body) = match data {
        [0, _, rest @ ..] => (None, rest),
        [a, b, rest @ ..] => (
            Some((u16::from_le_bytes([*a, *b]) as usize).to_string()),
            rest,
        ),
        _ => return,
    };
    if let Ok((json, binary)) = split_body(body, header.as_deref()) {
        match (
            decode_request(json, binary),
            decode_request_reference(json, binary),
        ) {
            (Ok(fast), Ok(reference)) => assert_eq!(fast, reference),
            (Err(fast), Err(reference)) => assert_eq!(fast.to_string(), reference.to_string()),
            (fast, reference) => panic!("fast {fast:?} vs reference {reference:?}"),
        }
    }
});
