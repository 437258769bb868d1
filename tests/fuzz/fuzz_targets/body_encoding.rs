//! A compressed request body (`Content-Encoding: gzip` or `deflate`, zlib or raw) as the
//! gateway decompresses it, with the decompressed size bounded: what decodes fits the limit
//! and compresses and decompresses back to the same bytes; what does not decode is refused
//! with 400 (corrupt) or 413 (over the limit), never another status, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skein_v2::encoding::{decode, encode, Coding};

fuzz_target!(|data: &[u8]| {
    // First byte: the coding (low bit); second: the limit, 1 B to 1 MiB in powers of two.
    let [pick, limit, body @ ..] = data else {
        return;
    };
    let coding = if pick & 1 == 0 {
        Coding::Gzip
    } else {
        Coding::Deflate
    };
    let limit = 1usize << (limit % 21);
    match decode(coding, body, limit) {
        Ok(plain) => {
            assert!(
                plain.len() <= limit,
                "{} bytes past a limit of {limit}",
                plain.len()
            );
            let packed = encode(coding, &plain).expect("compressing in memory");
            let back = decode(coding, &packed, limit).expect("what the gateway compresses decodes");
            assert_eq!(back, plain, "{coding:?} does not round-trip");
        }
        Err(e) => {
            let status = e.status();
            assert!(
                matches!(status, 400 | 413),
                "{coding:?} refused with {status}: {e}"
            );
        }
    }
});
