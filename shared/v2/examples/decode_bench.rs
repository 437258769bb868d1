//! Decode time of a V2 JSON request body of ppocr_cls's reference input (27 648 FP32 numbers in
//! Rust's shortest form, 230 KB; `scripts/bench-side-by-side` sends the same numbers as Python
//! prints them, `1.0` for one, 245 KB): `decode_request` (the fast reader, serde_json fallback)
//! against `decode_request_reference` (serde_json only).
//!
//! From the repository root:
//! `cargo run --release -p skein-v2 --example decode_bench -- [fast|serde] [iterations]`.
//! Wall time is noisy on a shared machine; for instruction counts run the binary under
//! `valgrind --tool=callgrind` with two iteration counts and take the difference.
// A synchronous timing loop: no tokio clock here.
#![allow(clippy::disallowed_types)]

use std::time::Instant;
fn main() {
    let npy = std::fs::read("models/ppocr_cls/cases/single/input_0.npy").unwrap();
    let hl = u16::from_le_bytes([npy[8], npy[9]]) as usize;
    let xs: Vec<f32> = npy[10 + hl..]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let s: Vec<String> = xs.iter().map(|v| format!("{v}")).collect();
    let body = format!(
        "{{\"inputs\":[{{\"name\":\"x\",\"datatype\":\"FP32\",\"shape\":[1,3,48,192],\"data\":[{}]}}]}}",
        s.join(",")
    )
    .into_bytes();
    let mode = std::env::args().nth(1).unwrap_or_default();
    let n: u32 = std::env::args().nth(2).map_or(200, |v| v.parse().unwrap());
    use skein_v2::codec::{decode_request, decode_request_reference};
    for m in ["fast", "serde"] {
        if !mode.is_empty() && mode != m {
            continue;
        }
        let t = Instant::now();
        for _ in 0..n {
            let r = if m == "fast" {
                decode_request(&body, &[])
            } else {
                decode_request_reference(&body, &[])
            };
            assert_eq!(r.unwrap().inputs[0].data().len(), 27648 * 4);
        }
        println!(
            "{m}: {:?} per decode ({} bytes)",
            t.elapsed() / n,
            body.len()
        );
    }
}
