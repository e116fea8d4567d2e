//! Drives one replicator with arbitrary input sequences from a keyless and a keyed peer (see
//! `feedsync::core::fuzzing`). Run with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run replicator_messages`. Without cargo-fuzz, the same build:
//! `RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4
//! -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table
//! -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions
//! -Coverflow-checks" cargo build --release --target x86_64-unknown-linux-gnu
//! --bin replicator_messages`, then run `target/x86_64-unknown-linux-gnu/release/replicator_messages
//! corpus/replicator_messages`. Any panic, a message the replicator emits that does not encode,
//! or state beyond the harness's budget is a bug. The seeded test
//! `tests/sim_hostile.rs::the_replicator_survives_random_message_sequences_from_keyless_and_keyed_peers`
//! runs the same harness without libFuzzer (`FEEDSYNC_FUZZ_RUNS=n`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    feedsync::core::fuzzing::replicator_messages(data);
});
