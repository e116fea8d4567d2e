//! Scheduling: which missing blocks to ask of which peer.
//!
//! The decision is a pure function, [`plan`]: it takes our bitfield, the want filter, the blocks
//! already in flight and a [`PeerSlot`] per peer, and returns the requests to send. The
//! replicator gathers those inputs, calls it, and sends what it returns; keeping the decision
//! free of state and messages is what lets it be tested on its own, below.

use super::{FeedId, PeerId, Replicator, mix};
use crate::core::bitfield::Bitfield;
use crate::core::rangeset::RangeSet;
use crate::core::storage::Storage;
use std::collections::{BTreeMap, BTreeSet};

/// One peer as the planner sees it for one feed.
#[derive(Debug, Clone)]
pub(super) struct PeerSlot<'a> {
    /// The peer.
    pub peer: PeerId,
    /// Window slots it has free (blocks we may still ask of it now).
    pub free: u32,
    /// Blocks asked of it and not yet answered.
    pub live: u32,
    /// Its smoothed round trip in ticks.
    pub srtt: f64,
    /// It holds every block of our length (a complete seed).
    pub complete: bool,
    /// The blocks it announced (sparse: their extent is the peer's word).
    pub have: &'a RangeSet,
}

/// Everything about the feed that the planner needs.
#[derive(Debug, Clone)]
pub(super) struct FeedView<'a> {
    /// Our trusted length.
    pub length: u64,
    /// The blocks we hold.
    pub have: &'a Bitfield,
    /// Only these are fetched (`None`: all).
    pub want: Option<&'a Bitfield>,
    /// Blocks asked of someone and not yet answered or expired.
    pub in_flight: &'a BTreeMap<u64, u32>,
    /// Fetch in index order, at most `max_ahead` past the first missing block.
    pub ordered: bool,
    /// Where the unordered scan starts (this node's seeded offset on the first pass).
    pub cursor: u64,
    /// This node's seeded phase for spreading an ordered window across a swarm.
    pub phase: u64,
}

/// Limits and the tie-break seed (from [`super::Config`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// In ordered mode, how far past the first missing block requests may reach.
    pub max_ahead: u64,
    /// Most block indices examined per pass.
    pub scan_limit: u64,
    /// Most blocks in one request.
    pub max_request_blocks: u64,
    /// In ordered mode with other partial peers about, the window (in blocks from the first
    /// missing one) within which blocks are taken rarest-first from this node's phase instead
    /// of in index order (0: never spread).
    pub spread: u64,
    /// Tie-break seed.
    pub seed: u64,
}

/// One request to send: blocks `index..index + count`, asked of `peer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ask {
    /// Who is asked.
    pub peer: PeerId,
    /// First block.
    pub index: u64,
    /// Number of contiguous blocks.
    pub count: u64,
}

/// The planner's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Plan {
    /// Requests to send, in order.
    pub asks: Vec<Ask>,
    /// Where the next unordered scan starts (`None`: leave it where it was).
    pub cursor: Option<u64>,
}

/// Chooses the requests for one feed. Blocks are taken rarest-first (within equal rarity in scan
/// order from `feed.cursor`, wrapping around), or in index order when `feed.ordered`. Each
/// block goes to the holder expected to answer soonest — fewest blocks in flight weighted by its
/// round trip — with partial peers preferred over a complete seed whenever a partial peer also
/// holds the block, so a seed's upload goes to blocks only it can provide. A request extends
/// over following blocks the same peer holds, up to `max_request_blocks`, its free window and
/// (ordered) the end of the look-ahead window: no request reaches past `max_ahead`.
pub(super) fn plan(feed: &FeedView<'_>, mut peers: Vec<PeerSlot<'_>>, limits: Limits) -> Plan {
    let length = feed.length;
    let mut plan = Plan::default();
    let total_free: u64 = peers.iter().map(|p| u64::from(p.free)).sum();
    if length == 0 || total_free == 0 {
        return plan;
    }
    let wanted = |i: u64| feed.want.is_none_or(|w| w.get(i));
    // The first block we lack *and want*: with a want filter, blocks given up long ago (old
    // versions of files) must not pin an ordered window far behind the wanted ones.
    let first_missing = match feed.want {
        None => feed.have.first_unset(0),
        Some(want) => {
            let mut i = 0;
            loop {
                match want.first_set(i) {
                    Some(w) if feed.have.get(w) => i = w + 1,
                    Some(w) => break w,
                    None => break length,
                }
            }
        }
    };
    if first_missing >= length {
        return plan;
    }
    // Other readers are fetching too (some peer holds part of the feed): an ordered fetch
    // spreads over a short window, so that readers hold different blocks early and trade them
    // instead of all asking the seeder for the same ones in the same order (see `plan`'s docs).
    let spread = feed.ordered && limits.spread > 0 && peers.iter().any(|p| !p.complete);
    let ahead = if spread {
        limits.max_ahead.min(limits.spread)
    } else {
        limits.max_ahead
    };
    let (start, end) = if feed.ordered {
        (
            first_missing,
            length.min(first_missing.saturating_add(ahead)),
        )
    } else {
        // Each node starts its scan at its own seeded offset and moves on from there, so the
        // readers of a swarm begin on disjoint arcs of the feed instead of all asking the seeder
        // for the same rare blocks; once an arc is done, its neighbours' blocks are available
        // from other readers.
        (feed.cursor.clamp(first_missing, length), length)
    };
    // Candidates: missing, wanted, not in flight, held by someone.
    let enough = (total_free * 4).min(limits.scan_limit);
    let mut candidates: Vec<(u64, u64, u64)> = Vec::new(); // (availability, scan order, index)
    let mut scanned = 0u64;
    let mut next_cursor = start;
    // Unordered: from the cursor to the end, then wrap around to the first gap.
    let segments = if feed.ordered {
        vec![(start, end)]
    } else {
        vec![(start, end), (first_missing, start)]
    };
    'scan: for (from, to) in segments {
        let mut i = from;
        while i < to {
            if candidates.len() as u64 >= enough || scanned >= limits.scan_limit {
                break 'scan;
            }
            i = feed.have.first_unset(i);
            if let Some(want) = feed.want {
                match want.first_set(i) {
                    Some(w) if w == i => {}
                    Some(w) => {
                        i = w; // the next wanted block; check it is missing
                        continue;
                    }
                    None => break,
                }
            }
            if i >= to {
                break;
            }
            scanned += 1;
            if !feed.in_flight.contains_key(&i) {
                let avail = peers.iter().filter(|p| p.have.contains(i)).count() as u64;
                if avail > 0 {
                    candidates.push((avail, scanned, i));
                }
            }
            i += 1;
            next_cursor = i;
        }
    }
    if spread {
        // Rarest first; among equals, from this node's phase around the window, so each
        // reader starts on its own arc of it.
        let w = limits.spread.max(1);
        candidates.sort_by_key(|c| ((c.2 + feed.phase) % w, c.2));
    } else if feed.ordered {
        candidates.sort_by_key(|c| c.2);
    } else {
        candidates.sort_unstable();
    }
    // Blocks this plan already covers (a range asked a moment ago may hold a later candidate).
    let mut taken = BTreeSet::new();
    let busy =
        |i: u64, taken: &BTreeSet<u64>| feed.in_flight.contains_key(&i) || taken.contains(&i);
    for (avail, _, index) in candidates {
        let pick = peers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.free > 0 && p.have.contains(index))
            .min_by_key(|(_, p)| {
                (
                    p.complete && avail > 1,
                    (f64::from(p.live + 1) * p.srtt * 1000.0) as u64,
                    mix(limits.seed ^ p.peer ^ index),
                )
            })
            .map(|(k, _)| k);
        let Some(k) = pick else { continue };
        if busy(index, &taken) {
            continue;
        }
        let slot = &mut peers[k];
        // Extend over the following blocks that are missing, wanted, not in flight and held by
        // the same peer: fewer messages and round trips per byte, and one proof covers the range.
        let mut count = 1;
        while count < limits.max_request_blocks.min(u64::from(slot.free))
            && index + count < end
            && !feed.have.get(index + count)
            && wanted(index + count)
            && !busy(index + count, &taken)
            && slot.have.contains(index + count)
        {
            count += 1;
        }
        taken.extend(index..index + count);
        plan.asks.push(Ask {
            peer: slot.peer,
            index,
            count,
        });
        slot.free -= count as u32;
        slot.live += count as u32;
        if peers.iter().all(|p| p.free == 0) {
            break;
        }
    }
    plan.cursor = Some(if next_cursor >= length {
        0
    } else {
        next_cursor
    });
    plan
}

impl<S: Storage> Replicator<S> {
    /// Hands out requests: an upgrade when a peer proved a longer tree, then missing blocks.
    pub(super) fn schedule(&mut self) {
        self.schedule_passes += 1;
        self.replan_urgent = false;
        self.replan_soon = false;
        for feed in 0..self.feeds.len() {
            if self.feeds[feed].download {
                self.schedule_upgrade(feed);
                self.schedule_blocks(feed);
            }
        }
    }

    /// Asks for the newest signed tree of the peer that proved the longest one (the least busy
    /// among equals), unless an upgrade is already in flight.
    fn schedule_upgrade(&mut self, feed: FeedId) {
        let slot = &self.feeds[feed];
        if slot.upgrade_in_flight.is_some() || slot.best_length <= slot.feed.len() {
            return;
        }
        let ours = slot.feed.len();
        let best = self
            .peers
            .iter()
            .filter_map(|(&id, p)| {
                let ch = p
                    .channels
                    .get(&feed)
                    .filter(|c| c.is_open() && c.length > ours)?;
                Some((ch.length, u64::MAX - u64::from(p.live), id))
            })
            .max();
        if let Some((_, _, peer)) = best {
            self.request(peer, feed, ours, 0, true);
        }
    }

    /// Gathers the planner's inputs for `feed`, runs [`plan`], and sends what it chose.
    pub(super) fn schedule_blocks(&mut self, feed: FeedId) {
        let slot = &self.feeds[feed];
        let length = slot.feed.len();
        if length == 0 {
            return;
        }
        let default_rtt = self.config.min_request_timeout as f64;
        let peers: Vec<PeerSlot<'_>> = self
            .peers
            .iter()
            .filter_map(|(&peer, p)| {
                let ch = p.channels.get(&feed).filter(|c| c.is_open())?;
                Some(PeerSlot {
                    peer,
                    free: p.congestion.free(p.live),
                    live: p.live,
                    srtt: p.congestion.srtt().unwrap_or(default_rtt),
                    // First gap, not a full popcount: this runs for every peer on every message.
                    complete: ch.have.first_unset(0) >= length,
                    have: &ch.have,
                })
            })
            .collect();
        let view = FeedView {
            length,
            have: slot.feed.bitfield(),
            want: slot.want.as_ref(),
            in_flight: &slot.in_flight,
            ordered: slot.ordered,
            cursor: slot
                .cursor
                .unwrap_or(mix(self.config.seed ^ feed as u64) % length),
            phase: mix(self.config.seed ^ 0x5eed ^ feed as u64),
        };
        let limits = Limits {
            max_ahead: self.config.max_ahead,
            scan_limit: self.config.scan_limit,
            max_request_blocks: self.config.max_request_blocks,
            // The spreading window is a span of bytes (how far a swarm must fan out is a matter
            // of time on the wire, not of block count): in blocks of this feed's average size.
            spread: match slot.feed.byte_len() / length {
                0 => self.config.spread,
                avg => (self.config.spread_bytes / avg).max(self.config.spread),
            },
            seed: self.config.seed,
        };
        let Plan { asks, cursor } = plan(&view, peers, limits);
        for ask in asks {
            self.request(ask.peer, feed, ask.index, ask.count, false);
        }
        if cursor.is_some() {
            self.feeds[feed].cursor = cursor;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(range: std::ops::Range<u64>) -> Bitfield {
        let mut b = Bitfield::new();
        b.set_range(range, true);
        b
    }

    fn runs(range: std::ops::Range<u64>) -> RangeSet {
        RangeSet::from_range(range)
    }

    fn slot(peer: PeerId, free: u32, have: &RangeSet, complete: bool) -> PeerSlot<'_> {
        PeerSlot {
            peer,
            free,
            live: 0,
            srtt: 10.0,
            complete,
            have,
        }
    }

    const LIMITS: Limits = Limits {
        max_ahead: 1024,
        scan_limit: 8192,
        max_request_blocks: 16,
        spread: 0,
        seed: 1,
    };

    fn view<'a>(
        length: u64,
        have: &'a Bitfield,
        in_flight: &'a BTreeMap<u64, u32>,
        ordered: bool,
    ) -> FeedView<'a> {
        FeedView {
            length,
            have,
            want: None,
            in_flight,
            ordered,
            cursor: 0,
            phase: 0,
        }
    }

    /// Every block asked for, each at most once.
    fn asked(plan: &Plan) -> Vec<u64> {
        let mut all: Vec<u64> = plan
            .asks
            .iter()
            .flat_map(|a| a.index..a.index + a.count)
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "a block asked twice in one plan: {plan:?}");
        all
    }

    #[test]
    fn nothing_is_planned_without_free_slots_or_missing_blocks() {
        let (ours, theirs, none) = (Bitfield::new(), runs(0..10), BTreeMap::new());
        let full = plan(
            &view(10, &ours, &none, false),
            vec![slot(1, 0, &theirs, true)],
            LIMITS,
        );
        assert_eq!(full, Plan::default());
        let all = bits(0..10);
        let done = plan(
            &view(10, &all, &none, false),
            vec![slot(1, 8, &theirs, true)],
            LIMITS,
        );
        assert_eq!(done, Plan::default());
    }

    #[test]
    fn only_missing_blocks_not_in_flight_and_held_by_the_peer_are_asked_within_its_window() {
        let ours = bits(0..3); // we hold 0..3
        let theirs = runs(0..20);
        let in_flight = BTreeMap::from([(5, 1), (6, 1)]);
        let plan = plan(
            &view(20, &ours, &in_flight, false),
            vec![slot(1, 10, &theirs, true)],
            LIMITS,
        );
        let asked = asked(&plan);
        assert_eq!(asked.len(), 10, "exactly the free window: {plan:?}");
        assert!(
            asked.iter().all(|i| *i >= 3 && *i != 5 && *i != 6),
            "{asked:?}"
        );
        assert!(plan.asks.iter().all(|a| a.peer == 1));
    }

    #[test]
    fn the_rarest_block_goes_first_and_a_shared_block_to_the_partial_peer() {
        let ours = Bitfield::new();
        let seed = runs(0..4);
        let partial = runs(0..2); // blocks 0 and 1 are held by both, 2 and 3 by the seed alone
        let none = BTreeMap::new();
        let plan = plan(
            &view(4, &ours, &none, false),
            vec![slot(1, 1, &seed, true), slot(2, 1, &partial, false)],
            LIMITS,
        );
        assert_eq!(plan.asks.len(), 2, "{plan:?}");
        // The seed's one slot goes to a block only it has; the partial peer serves a shared one.
        let seed_ask = plan.asks.iter().find(|a| a.peer == 1).expect("seed asked");
        let partial_ask = plan
            .asks
            .iter()
            .find(|a| a.peer == 2)
            .expect("partial asked");
        assert!(seed_ask.index >= 2, "{plan:?}");
        assert!(partial_ask.index < 2, "{plan:?}");
        assert_eq!(plan.asks[0].peer, 1, "the rarer block is planned first");
    }

    #[test]
    fn ordered_plans_stay_within_max_ahead_of_the_first_missing_block() {
        let ours = bits(0..5);
        let theirs = runs(0..100);
        let none = BTreeMap::new();
        let limits = Limits {
            max_ahead: 8,
            ..LIMITS
        };
        let plan = plan(
            &view(100, &ours, &none, true),
            vec![slot(1, 64, &theirs, true)],
            limits,
        );
        assert_eq!(asked(&plan), (5..13).collect::<Vec<_>>());
        assert_eq!(plan.asks[0].index, 5, "in order");
    }

    #[test]
    fn a_want_filter_limits_the_plan_to_wanted_blocks() {
        let ours = Bitfield::new();
        let theirs = runs(0..100);
        let none = BTreeMap::new();
        let want = bits(40..43);
        let feed = FeedView {
            want: Some(&want),
            ..view(100, &ours, &none, true)
        };
        let plan = plan(&feed, vec![slot(1, 64, &theirs, true)], LIMITS);
        assert_eq!(asked(&plan), vec![40, 41, 42]);
    }

    #[test]
    fn an_unordered_scan_starts_at_the_cursor_and_wraps_around() {
        let ours = Bitfield::new();
        let theirs = runs(0..10);
        let none = BTreeMap::new();
        let feed = FeedView {
            cursor: 7,
            ..view(10, &ours, &none, false)
        };
        let limits = Limits {
            max_request_blocks: 1,
            ..LIMITS
        };
        let plan = plan(&feed, vec![slot(1, 2, &theirs, true)], limits);
        // Equal rarity: scan order from the cursor decides.
        assert_eq!(asked(&plan), vec![7, 8]);
        assert!(plan.cursor.is_some());
    }

    #[test]
    fn a_request_extends_over_contiguous_blocks_up_to_the_limit() {
        let ours = Bitfield::new();
        let theirs = runs(0..40);
        let none = BTreeMap::new();
        let plan = plan(
            &view(40, &ours, &none, true),
            vec![slot(1, 40, &theirs, true)],
            LIMITS,
        );
        let counts: Vec<u64> = plan.asks.iter().map(|a| a.count).collect();
        assert_eq!(counts, vec![16, 16, 8]);
    }
}
