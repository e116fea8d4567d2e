//! A growable set of block indices, one bit per block, backed by `bitvec`.
//!
//! Used for "blocks we hold" (persisted by the storage) and the blocks a reader wants: sets whose
//! extent is what we store ourselves. A flat bitmap costs 2 MiB for a 1 TiB feed of 64 KiB
//! blocks. Sets whose extent a peer names (its haves, its wants) are never kept here: they are
//! [`crate::core::rangeset::RangeSet`]s, whose memory follows the runs announced. The byte layout
//! (`Lsb0` over `u8`: block `i` is bit `i % 8` of byte `i / 8`) is what the disk store writes.

use bitvec::prelude::*;
use feedsync_protocol::{BlockSet, MAX_RUNS};
use std::ops::Range;

/// A set of block indices.
#[derive(Clone, Default)]
pub struct Bitfield {
    bits: BitVec<u8, Lsb0>,
}

/// Set equality: trailing absent blocks (e.g. the padding of a reloaded last byte) do not count.
impl PartialEq for Bitfield {
    fn eq(&self, other: &Self) -> bool {
        let n = self.bits.len().min(other.bits.len());
        self.bits[..n] == other.bits[..n] && self.bits[n..].not_any() && other.bits[n..].not_any()
    }
}

impl Eq for Bitfield {}

impl std::fmt::Debug for Bitfield {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.runs()).finish()
    }
}

impl Bitfield {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// A set read back from bytes written by [`Bitfield::as_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self {
            bits: BitVec::from_slice(bytes),
        }
    }

    /// The raw bytes (block `i` is bit `i % 8` of byte `i / 8`).
    pub fn as_bytes(&self) -> &[u8] {
        self.bits.as_raw_slice()
    }

    /// Whether block `i` is in the set.
    pub fn get(&self, i: u64) -> bool {
        usize::try_from(i)
            .ok()
            .and_then(|i| self.bits.get(i).map(|b| *b))
            .unwrap_or(false)
    }

    /// Adds or removes block `i`.
    pub fn set(&mut self, i: u64, value: bool) {
        self.set_range(i..i + 1, value);
    }

    /// Adds or removes every block in `range`.
    pub fn set_range(&mut self, range: Range<u64>, value: bool) {
        if range.is_empty() {
            return;
        }
        if !value {
            // Blocks past the end are already absent: clear only what exists.
            let end = (range.end as usize).min(self.bits.len());
            if (range.start as usize) < end {
                self.bits[range.start as usize..end].fill(false);
            }
            return;
        }
        let end = range.end as usize;
        if end > self.bits.len() {
            self.bits.resize(end, false);
        }
        self.bits[range.start as usize..end].fill(value);
    }

    /// Removes every block at or above `length`.
    pub fn truncate(&mut self, length: u64) {
        let len = (length as usize).min(self.bits.len());
        self.bits[len..].fill(false);
    }

    /// Number of blocks in the set.
    pub fn count(&self) -> u64 {
        self.bits.count_ones() as u64
    }

    /// Number of blocks in the set within `range`.
    pub fn count_range(&self, range: Range<u64>) -> u64 {
        let end = (range.end as usize).min(self.bits.len());
        let start = (range.start as usize).min(end);
        self.bits[start..end].count_ones() as u64
    }

    /// First block at or after `from` that is *not* in the set.
    pub fn first_unset(&self, from: u64) -> u64 {
        let from_us = from as usize;
        if from_us >= self.bits.len() {
            return from;
        }
        match self.bits[from_us..].first_zero() {
            Some(i) => from + i as u64,
            None => self.bits.len() as u64,
        }
    }

    /// First block at or after `from` that is in the set.
    pub fn first_set(&self, from: u64) -> Option<u64> {
        let from_us = from as usize;
        if from_us >= self.bits.len() {
            return None;
        }
        self.bits[from_us..].first_one().map(|i| from + i as u64)
    }

    /// Maximal runs of consecutive blocks in the set, in order.
    pub fn runs(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let mut at = 0u64;
        std::iter::from_fn(move || {
            let start = self.first_set(at)?;
            let end = self.first_unset(start);
            at = end;
            Some(start..end)
        })
    }

    /// The set as wire [`BlockSet`]s, each small enough for one frame (see [`block_sets`]).
    pub fn to_block_sets(&self) -> Vec<BlockSet> {
        block_sets(self.runs())
    }
}

/// Most present runs one [`BlockSet::Runs`] may describe: `k` runs take `2k - 1` lengths, and
/// the protocol refuses more than [`MAX_RUNS`] lengths.
pub const MAX_SET_RUNS: usize = MAX_RUNS.div_ceil(2);

/// Runs (in order, disjoint) as wire sets: a single range when it is one, run lengths
/// otherwise, split so that no set carries more than [`MAX_SET_RUNS`] runs. A set past the limit
/// would be refused by the encoder (and by every receiver), so a fragmented bitfield goes out as
/// several `Have`s instead of none.
pub fn block_sets(runs: impl IntoIterator<Item = Range<u64>>) -> Vec<BlockSet> {
    let mut out = Vec::new();
    let mut chunk: Vec<Range<u64>> = Vec::new();
    let flush = |chunk: &mut Vec<Range<u64>>, out: &mut Vec<BlockSet>| {
        match chunk.as_slice() {
            [] => {}
            [r] => out.push(BlockSet::Range {
                start: r.start,
                count: r.end - r.start,
            }),
            _ => {
                let start = chunk[0].start;
                let mut lens = Vec::with_capacity(chunk.len() * 2);
                let mut prev_end = start;
                for r in chunk.iter() {
                    if r.start != start {
                        lens.push(r.start - prev_end);
                    }
                    lens.push(r.end - r.start);
                    prev_end = r.end;
                }
                out.push(BlockSet::Runs { start, runs: lens });
            }
        }
        chunk.clear();
    };
    for r in runs {
        if r.is_empty() {
            continue;
        }
        chunk.push(r);
        if chunk.len() == MAX_SET_RUNS {
            flush(&mut chunk, &mut out);
        }
    }
    flush(&mut chunk, &mut out);
    out
}

/// Expands a wire [`BlockSet`] into ranges, refusing sets whose indices overflow or reach past
/// `limit` (so a hostile peer cannot make us allocate a bitmap for 2^64 blocks).
pub fn block_set_ranges(set: &BlockSet, limit: u64) -> Option<Vec<Range<u64>>> {
    let mut out = Vec::new();
    match set {
        BlockSet::Range { start, count } => {
            let end = start.checked_add(*count)?;
            if end > limit {
                return None;
            }
            if *count > 0 {
                out.push(*start..end);
            }
        }
        BlockSet::Runs { start, runs } => {
            let mut at = *start;
            for (i, len) in runs.iter().enumerate() {
                let end = at.checked_add(*len)?;
                if end > limit {
                    return None;
                }
                if i % 2 == 0 && *len > 0 {
                    out.push(at..end);
                }
                at = end;
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[derive(Debug, Clone)]
    enum Op {
        Set(u64, bool),
        Range(u64, u64, bool),
        Truncate(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..3000u64, any::<bool>()).prop_map(|(i, v)| Op::Set(i, v)),
            (0..3000u64, 0..300u64, any::<bool>()).prop_map(|(s, n, v)| Op::Range(s, s + n, v)),
            (0..3000u64).prop_map(Op::Truncate),
        ]
    }

    proptest! {
        /// The bitfield against a `BTreeSet` model, including its byte round trip and wire form.
        #[test]
        fn matches_btreeset(ops in proptest::collection::vec(op(), 1..200)) {
            let mut bf = Bitfield::new();
            let mut model = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Set(i, v) => { bf.set(i, v); if v { model.insert(i); } else { model.remove(&i); } }
                    Op::Range(s, e, v) => {
                        bf.set_range(s..e, v);
                        for i in s..e { if v { model.insert(i); } else { model.remove(&i); } }
                    }
                    Op::Truncate(l) => { bf.truncate(l); model.retain(|&i| i < l); }
                }
            }
            prop_assert_eq!(bf.count(), model.len() as u64);
            for i in 0..3400 { prop_assert_eq!(bf.get(i), model.contains(&i)); }
            let back = Bitfield::from_bytes(bf.as_bytes());
            prop_assert_eq!(back.runs().collect::<Vec<_>>(), bf.runs().collect::<Vec<_>>());
            let expanded: BTreeSet<u64> = bf.to_block_sets().iter()
                .flat_map(|set| block_set_ranges(set, u64::MAX).unwrap())
                .flatten().collect();
            prop_assert_eq!(expanded, model.clone());
            let first_gap = (0..).find(|i| !model.contains(i)).unwrap();
            prop_assert_eq!(bf.first_unset(0), first_gap);
            prop_assert_eq!(bf.count_range(100..900), model.range(100..900).count() as u64);
        }
    }

    #[test]
    fn a_fragmented_set_is_split_into_sets_that_fit_a_frame() {
        let runs: Vec<Range<u64>> = (0..70_000u64).map(|i| 2 * i..2 * i + 1).collect();
        let sets = block_sets(runs.clone());
        assert_eq!(sets.len(), 3);
        let mut back = Vec::new();
        for set in &sets {
            let msg = feedsync_protocol::Message::Have(feedsync_protocol::Have {
                channel: 0,
                blocks: set.clone(),
            });
            feedsync_protocol::encode(&msg).expect("each set fits a frame");
            back.extend(block_set_ranges(set, u64::MAX).unwrap());
        }
        assert_eq!(back, runs);
    }

    #[test]
    fn hostile_sets_are_refused() {
        let huge = BlockSet::Range {
            start: u64::MAX,
            count: 2,
        };
        assert!(block_set_ranges(&huge, u64::MAX).is_none());
        let beyond = BlockSet::Runs {
            start: 0,
            runs: vec![5, 5, 10],
        };
        assert!(block_set_ranges(&beyond, 19).is_none());
        assert_eq!(block_set_ranges(&beyond, 20).unwrap(), vec![0..5, 10..20]);
    }
}
