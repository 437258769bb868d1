//! The `.npy` reader behind `skein infer --input name=file.npy`; a tensor it accepts encodes
//! again and decodes to the same tensor.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = skein_proto::npy::decode("x", data) {
        let again = skein_proto::npy::encode(&t).expect("re-encoding a decoded tensor");
        let back = skein_proto::npy::decode("x", &again).expect("decoding what we encoded");
        assert_eq!(back, t);
    }
});
