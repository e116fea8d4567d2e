//! A sparse set of block indices kept as disjoint runs, for every set whose extent comes from
//! the network.
//!
//! A peer's `Have{0..2^48}` is one run here, where a [`crate::core::Bitfield`] would try to
//! allocate 32 TiB: memory follows the number of runs actually announced, never the largest index
//! named. The number of runs is itself capped by the caller ([`RangeSet::with_cap`]); past the cap
//! the set keeps a *subset* of what it was told (a new run is not recorded, a run that would split
//! loses its tail), because a subset of a peer's haves is always safe to act on: we never ask a
//! peer for a block it did not announce. Every operation costs `O(log runs)` plus the runs it
//! merges or removes, so a flood of tiny announcements cannot make one message expensive.

use std::collections::BTreeMap;
use std::ops::Range;

/// Disjoint, non-adjacent half-open runs `start..end`, at most `cap` of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeSet {
    /// Run start -> run end (exclusive). Runs never touch: `a.end < b.start` for consecutive runs.
    runs: BTreeMap<u64, u64>,
    cap: usize,
}

impl Default for RangeSet {
    fn default() -> Self {
        Self::new()
    }
}

impl RangeSet {
    /// An empty set with no cap on its runs (for sets bounded by what we hold ourselves).
    pub fn new() -> Self {
        Self::with_cap(usize::MAX)
    }

    /// An empty set that never holds more than `cap` runs (at least one).
    pub fn with_cap(cap: usize) -> Self {
        Self {
            runs: BTreeMap::new(),
            cap: cap.max(1),
        }
    }

    /// A set holding exactly `range`.
    pub fn from_range(range: Range<u64>) -> Self {
        let mut s = Self::new();
        s.insert(range);
        s
    }

    /// Number of runs held (what the set's memory is proportional to).
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Removes everything.
    pub fn clear(&mut self) {
        self.runs.clear();
    }

    /// The run containing `i`, if any.
    fn run_of(&self, i: u64) -> Option<(u64, u64)> {
        self.runs
            .range(..=i)
            .next_back()
            .filter(|(_, e)| i < **e)
            .map(|(s, e)| (*s, *e))
    }

    /// Whether block `i` is in the set.
    pub fn contains(&self, i: u64) -> bool {
        self.run_of(i).is_some()
    }

    /// Adds `range`. Returns whether the set changed. At the cap, a range that touches no run is
    /// not recorded (see the module docs).
    pub fn insert(&mut self, range: Range<u64>) -> bool {
        if range.is_empty() {
            return false;
        }
        let (mut start, mut end) = (range.start, range.end);
        // The run starting at or before `end` that reaches `start` (touching counts: runs merge).
        let touching = self
            .runs
            .range(..=end)
            .next_back()
            .is_some_and(|(_, e)| *e >= start);
        if !touching && self.runs.len() >= self.cap {
            return false;
        }
        if let Some((s, e)) = self.runs.range(..=start).next_back().map(|(s, e)| (*s, *e))
            && e >= start
        {
            if e >= end {
                return false; // already inside one run
            }
            start = s;
            self.runs.remove(&s);
        }
        // Every run starting inside `start..=end` is absorbed.
        while let Some((s, e)) = self.runs.range(start..=end).next().map(|(s, e)| (*s, *e)) {
            end = end.max(e);
            self.runs.remove(&s);
        }
        self.runs.insert(start, end);
        true
    }

    /// Removes `range`. Returns whether the set changed. At the cap, a run that would split in
    /// two keeps only its head (the set shrinks rather than grows).
    pub fn remove(&mut self, range: Range<u64>) -> bool {
        if range.is_empty() {
            return false;
        }
        let mut changed = false;
        // A run starting before the range that reaches into it.
        if let Some((s, e)) = self
            .runs
            .range(..range.start)
            .next_back()
            .map(|(s, e)| (*s, *e))
            && e > range.start
        {
            changed = true;
            self.runs.insert(s, range.start);
            if e > range.end && self.runs.len() < self.cap {
                self.runs.insert(range.end, e);
            }
        }
        // Runs starting inside the range.
        while let Some((s, e)) = self
            .runs
            .range(range.start..range.end)
            .next()
            .map(|(s, e)| (*s, *e))
        {
            changed = true;
            self.runs.remove(&s);
            if e > range.end {
                self.runs.insert(range.end, e);
            }
        }
        changed
    }

    /// First block at or after `from` that is in the set.
    pub fn first_set(&self, from: u64) -> Option<u64> {
        if self.contains(from) {
            return Some(from);
        }
        self.runs.range(from..).next().map(|(s, _)| *s)
    }

    /// First block at or after `from` that is not in the set (runs never touch, so the end of
    /// the run holding `from` is free).
    pub fn first_unset(&self, from: u64) -> u64 {
        self.run_of(from).map_or(from, |(_, e)| e)
    }

    /// Number of blocks in the set within `range` (costs the runs that overlap it).
    pub fn count_range(&self, range: Range<u64>) -> u64 {
        if range.is_empty() {
            return 0;
        }
        let mut n = 0;
        if let Some((_, e)) = self.run_of(range.start) {
            n += e.min(range.end) - range.start;
        }
        for (s, e) in self.runs.range(range.start.saturating_add(1)..range.end) {
            n += (*e).min(range.end) - s;
        }
        n
    }

    /// Number of blocks in the set.
    pub fn count(&self) -> u64 {
        self.runs.iter().map(|(s, e)| e - s).sum()
    }

    /// The runs, in order.
    pub fn runs(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.runs.iter().map(|(s, e)| *s..*e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        /// The range set against a `BTreeSet` model (uncapped), including its run invariant.
        #[test]
        fn matches_btreeset(ops in proptest::collection::vec((0..400u64, 0..40u64, any::<bool>()), 1..150)) {
            let mut set = RangeSet::new();
            let mut model = BTreeSet::new();
            for (s, n, add) in ops {
                let changed = if add { set.insert(s..s + n) } else { set.remove(s..s + n) };
                let before = model.clone();
                for i in s..s + n { if add { model.insert(i); } else { model.remove(&i); } }
                prop_assert_eq!(changed, before != model);
            }
            let runs: Vec<_> = set.runs().collect();
            for w in runs.windows(2) { prop_assert!(w[0].end < w[1].start, "{:?}", runs); }
            prop_assert_eq!(set.count(), model.len() as u64);
            for i in 0..460 {
                prop_assert_eq!(set.contains(i), model.contains(&i));
                prop_assert_eq!(set.first_set(i), model.range(i..).next().copied());
                prop_assert_eq!(set.first_unset(i), (i..).find(|x| !model.contains(x)).unwrap());
            }
            prop_assert_eq!(set.count_range(50..300), model.range(50..300).count() as u64);
        }

        /// A capped set never exceeds its cap and only ever holds announced blocks.
        #[test]
        fn a_capped_set_is_a_bounded_subset(ops in proptest::collection::vec((0..400u64, 0..5u64, any::<bool>()), 1..200)) {
            let mut set = RangeSet::with_cap(4);
            let mut model = BTreeSet::new();
            for (s, n, add) in ops {
                if add { set.insert(s..s + n); } else { set.remove(s..s + n); }
                for i in s..s + n { if add { model.insert(i); } else { model.remove(&i); } }
                prop_assert!(set.run_count() <= 4);
            }
            for i in 0..410 { prop_assert!(!set.contains(i) || model.contains(&i)); }
        }
    }

    #[test]
    fn an_announced_maximum_costs_one_run() {
        let mut set = RangeSet::with_cap(8);
        assert!(set.insert(0..1 << 48));
        assert_eq!(set.run_count(), 1);
        assert_eq!(set.first_unset(5), 1 << 48);
        assert!(set.remove(10..20));
        assert_eq!(set.run_count(), 2);
        assert_eq!(set.count(), (1 << 48) - 10);
    }
}
