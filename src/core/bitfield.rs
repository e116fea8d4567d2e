//! A set of block indices, one bit per block in pages of `bitvec` bits, for what we hold and
//! want ourselves.
//!
//! Used for "blocks we hold" (persisted by the storage) and the blocks a reader wants. Their
//! extent is a writer's signed length, and a hostile writer can sign 2^48 and prove a block at
//! index 2^47 cheaply (identical blocks make identical subtrees): a flat bitmap would then be
//! sized by that index (16 TiB, abort). So the bits live in pages of [`PAGE_BITS`] (512 bytes)
//! allocated where a bit was ever set: a dense feed costs what a flat bitmap did (2 MiB per TiB
//! of 64 KiB blocks, plus a little per page), a scattered one a page per scattered block, and
//! each page is bounded by a size we chose. Sets whose extent a peer merely names (its haves,
//! its wants) are not kept here at all but in [`crate::core::rangeset::RangeSet`], whose
//! memory follows the runs announced.
//!
//! The persisted byte layout (`Lsb0` over `u8`: block `i` is bit `i % 8` of byte `i / 8`) is
//! unchanged; the storage writes the pages that exist ([`Bitfield::byte_chunks`]), and pages
//! that never existed are zeros on disk.

use bitvec::prelude::*;
use feedsync_protocol::{BlockSet, MAX_RUNS};
use std::collections::BTreeMap;
use std::ops::Range;

/// Blocks per page of a [`Bitfield`].
pub const PAGE_BITS: u64 = 4096;
const PAGE_BYTES: usize = (PAGE_BITS / 8) as usize;

type Page = BitArr!(for 4096, in u8, Lsb0);

/// A set of block indices.
#[derive(Clone, Default)]
pub struct Bitfield {
    /// Page number -> its bits. A page, once allocated, stays (it may be all zeros): the storage
    /// writes only existing pages, so a page that held bits must remain to carry their clearing.
    pages: BTreeMap<u64, Box<Page>>,
    /// One past the highest bit ever set or loaded (the persisted extent).
    extent: u64,
}

/// Set equality: pages of zeros and the extent do not count.
impl PartialEq for Bitfield {
    fn eq(&self, other: &Self) -> bool {
        self.runs().eq(other.runs())
    }
}

impl Eq for Bitfield {}

impl std::fmt::Debug for Bitfield {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.runs()).finish()
    }
}

/// Page number and offset within it of block `i`.
fn split(i: u64) -> (u64, usize) {
    (i / PAGE_BITS, (i % PAGE_BITS) as usize)
}

impl Bitfield {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// A set read back from bytes written through [`Bitfield::byte_chunks`] (block `i` is bit
    /// `i % 8` of byte `i / 8`). Pages of zeros are not allocated.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut pages = BTreeMap::new();
        for (k, chunk) in bytes.chunks(PAGE_BYTES).enumerate() {
            if chunk.iter().any(|b| *b != 0) {
                let mut page = Box::new(Page::ZERO);
                page.as_raw_mut_slice()[..chunk.len()].copy_from_slice(chunk);
                pages.insert(k as u64, page);
            }
        }
        Self {
            pages,
            extent: bytes.len() as u64 * 8,
        }
    }

    /// One past the highest block ever set (or loaded): how far the persisted bytes reach.
    pub fn extent(&self) -> u64 {
        self.extent
    }

    /// The persisted bytes within byte range `bytes` that may be non-zero: `(byte offset,
    /// bytes)` for each allocated page. Bytes outside every page are zero and were never
    /// written otherwise.
    pub fn byte_chunks(&self, bytes: Range<u64>) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        let page_bytes = PAGE_BYTES as u64;
        let first = bytes.start / page_bytes;
        let last = bytes.end.div_ceil(page_bytes);
        self.pages
            .range(first..last.max(first))
            .filter_map(move |(k, page)| {
                let base = k * page_bytes;
                let lo = bytes.start.max(base);
                let hi = bytes.end.min(base + page_bytes);
                (lo < hi).then(|| {
                    let raw = page.as_raw_slice();
                    (lo, &raw[(lo - base) as usize..(hi - base) as usize])
                })
            })
    }

    /// Whether block `i` is in the set.
    pub fn get(&self, i: u64) -> bool {
        let (k, off) = split(i);
        self.pages.get(&k).is_some_and(|p| p[off])
    }

    /// Adds or removes block `i`.
    pub fn set(&mut self, i: u64, value: bool) {
        self.set_range(i..i.saturating_add(1), value);
    }

    /// Adds or removes every block in `range`. Adding allocates the pages the range covers (the
    /// caller adds only blocks it stores or wants); removing touches only existing pages.
    pub fn set_range(&mut self, range: Range<u64>, value: bool) {
        if range.is_empty() {
            return;
        }
        let (first, _) = split(range.start);
        let (last, _) = split(range.end - 1);
        let bounds = |k: u64| {
            let base = k * PAGE_BITS;
            let lo = range.start.max(base) - base;
            let hi = range.end.min(base + PAGE_BITS) - base;
            (lo as usize, hi as usize)
        };
        if value {
            self.extent = self.extent.max(range.end);
            for k in first..=last {
                let (lo, hi) = bounds(k);
                let page = self.pages.entry(k).or_insert_with(|| Box::new(Page::ZERO));
                page[lo..hi].fill(true);
            }
        } else {
            for (&k, page) in self.pages.range_mut(first..=last) {
                let (lo, hi) = bounds(k);
                page[lo..hi].fill(false);
            }
        }
    }

    /// Removes every block at or above `length`.
    pub fn truncate(&mut self, length: u64) {
        self.set_range(length..u64::MAX, false);
    }

    /// Number of blocks in the set.
    pub fn count(&self) -> u64 {
        self.pages.values().map(|p| p.count_ones() as u64).sum()
    }

    /// Number of blocks in the set within `range`.
    pub fn count_range(&self, range: Range<u64>) -> u64 {
        if range.is_empty() {
            return 0;
        }
        let (first, _) = split(range.start);
        let (last, _) = split(range.end - 1);
        self.pages
            .range(first..=last)
            .map(|(&k, page)| {
                let base = k * PAGE_BITS;
                let lo = (range.start.max(base) - base) as usize;
                let hi = (range.end.min(base + PAGE_BITS) - base) as usize;
                page[lo..hi].count_ones() as u64
            })
            .sum()
    }

    /// First block at or after `from` that is *not* in the set.
    pub fn first_unset(&self, from: u64) -> u64 {
        let (mut k, mut off) = split(from);
        loop {
            let Some(page) = self.pages.get(&k) else {
                return k * PAGE_BITS + off as u64;
            };
            match page[off..].first_zero() {
                Some(i) => return k * PAGE_BITS + (off + i) as u64,
                None => {
                    k += 1;
                    off = 0;
                }
            }
        }
    }

    /// First block at or after `from` that is in the set.
    pub fn first_set(&self, from: u64) -> Option<u64> {
        let (k, off) = split(from);
        if let Some(i) = self.pages.get(&k).and_then(|p| p[off..].first_one()) {
            return Some(k * PAGE_BITS + (off + i) as u64);
        }
        self.pages
            .range(k.checked_add(1)?..)
            .find_map(|(&k, page)| page.first_one().map(|i| k * PAGE_BITS + i as u64))
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
            (0..30000u64, any::<bool>()).prop_map(|(i, v)| Op::Set(i, v)),
            (0..30000u64, 0..9000u64, any::<bool>()).prop_map(|(s, n, v)| Op::Range(s, s + n, v)),
            (0..30000u64).prop_map(Op::Truncate),
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
            for i in 0..40000 { prop_assert_eq!(bf.get(i), model.contains(&i)); }
            for i in (0..40000).step_by(97) {
                prop_assert_eq!(bf.first_set(i), model.range(i..).next().copied());
                prop_assert_eq!(bf.first_unset(i), (i..).find(|x| !model.contains(x)).unwrap());
            }
            let mut bytes = vec![0u8; bf.extent().div_ceil(8) as usize];
            for (at, chunk) in bf.byte_chunks(0..bytes.len() as u64) {
                bytes[at as usize..at as usize + chunk.len()].copy_from_slice(chunk);
            }
            let back = Bitfield::from_bytes(&bytes);
            prop_assert_eq!(back.runs().collect::<Vec<_>>(), bf.runs().collect::<Vec<_>>());
            let expanded: BTreeSet<u64> = bf.to_block_sets().iter()
                .flat_map(|set| block_set_ranges(set, u64::MAX).unwrap())
                .flatten().collect();
            prop_assert_eq!(expanded, model.clone());
            let first_gap = (0..).find(|i| !model.contains(i)).unwrap();
            prop_assert_eq!(bf.first_unset(0), first_gap);
            prop_assert_eq!(bf.count_range(100..9000), model.range(100..9000).count() as u64);
        }
    }

    #[test]
    fn a_block_at_a_far_index_costs_one_page() {
        let mut bf = Bitfield::new();
        bf.set((1 << 47) + 5, true);
        bf.set(3, true);
        assert_eq!(bf.pages.len(), 2);
        assert_eq!(
            bf.runs().collect::<Vec<_>>(),
            vec![3..4, (1 << 47) + 5..(1 << 47) + 6]
        );
        assert_eq!(bf.first_unset(3), 4);
        assert_eq!(bf.first_set(4), Some((1 << 47) + 5));
        bf.set_range(0..1 << 48, false);
        assert_eq!(bf.count(), 0);
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
