//! Drives one replicator with arbitrary input sequences from a keyless and a keyed peer (see
//! `feedsync::core::fuzzing`). Run with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run replicator_messages -- -jobs=1`. Any panic, a message the
//! replicator emits that does not encode, or state beyond the harness's budget is a bug.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    feedsync::core::fuzzing::replicator_messages(data);
});
