//! Feeds arbitrary metadata blocks to the drive's record decoder and replays what decodes onto
//! a folder state, as a reader does with a hostile writer's (validly signed) metadata feed. Run
//! with `RUSTC_BOOTSTRAP=1 cargo fuzz run drive_records seeds/drive_records --
//! -malloc_limit_mb=64 -max_len=16384`; `seeds/drive_records` holds two valid feeds to start
//! from. `regressions/drive_records/` holds inputs that crashed it, one per finding; replay one
//! with `cargo fuzz run drive_records regressions/drive_records/NAME`:
//! - `totals_overflow`: two files of 2^64-1 bytes each (each passes `FileInfo::check`: one extent
//!   of 2^48 blocks) make `State::totals` overflow its byte sum (a panic with overflow checks,
//!   a wrapped total without).
//!
//! Input: a sequence of blocks, each a 2-byte little-endian length and that many bytes (the
//! last one takes what is left). Block `k` is decoded as metadata block `k`.
//!
//! A bug is: any panic (overflow included: cargo-fuzz builds with debug assertions), an
//! allocation beyond the malloc limit (memory must follow the input, never a number in it), a
//! decoded batch that does not re-encode to itself, or a state holding a path the checks refuse.

#![no_main]

use feedsync::drive::record::{self, Entry, State};
use libfuzzer_sys::fuzz_target;

/// Blocks replayed per input, at most (a real reader replays the whole feed; more blocks add
/// nothing the fuzzer cannot reach with fewer).
const MAX_BLOCKS: usize = 64;

fn blocks(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while !data.is_empty() && out.len() < MAX_BLOCKS {
        if data.len() < 2 {
            out.push(data);
            break;
        }
        let len = usize::from(u16::from_le_bytes([data[0], data[1]]));
        let rest = &data[2..];
        let (block, tail) = rest.split_at(len.min(rest.len()));
        out.push(block);
        data = tail;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let mut state = State::default();
    for (k, block) in blocks(data).into_iter().enumerate() {
        let index = k as u64;
        let Ok(records) = record::decode(index, block) else {
            continue; // refused whole: the reader stops at this version
        };
        // What decodes re-encodes to a block that decodes to the same records.
        let again = record::encode(&records);
        assert_eq!(record::decode(index, &again).as_ref(), Ok(&records));
        for r in &records {
            if let record::Record::Put {
                entry: Entry::File(f),
                ..
            } = r
            {
                // Checked files: their block count and block walk are consistent and cheap to
                // start (the walk is lazy; take a bounded prefix).
                assert_eq!(f.mode & !0o777, 0, "a mode beyond the permission bits");
                let _ = f.blocks();
                let _ = f.block_at().take(1024).count();
            }
        }
        state.apply(records);
        let _ = state.totals();
        for path in state.entries.keys() {
            assert!(record::check_path(path).is_ok(), "state holds {path:?}");
        }
    }
});
