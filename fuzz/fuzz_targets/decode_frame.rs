//! Feeds arbitrary bytes to the frame decoder. Run with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run decode_frame` (cargo-fuzz needs nightly flags).
//! Any panic, or a decoded message that does not re-encode to a frame that decodes to itself,
//! is a bug.

#![no_main]

use feedsync_protocol::{decode_frame, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode_frame(data) {
        let again = encode(&msg).expect("a decoded message re-encodes");
        assert_eq!(decode_frame(&again).expect("re-encoded frame decodes"), msg);
    }
});
