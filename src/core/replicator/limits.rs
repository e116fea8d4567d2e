//! What one peer can make us hold or do, and the rules that bound it.
//!
//! - **Replanning.** A scheduling pass scans up to `scan_limit` blocks against every peer's
//!   haves: far too dear to run for every message when one Noise frame carries ~20,000 pings.
//!   Handlers only *mark* that the plan may have changed; [`Replicator::replan_if_due`] runs
//!   after each message. Marks that a peer cannot produce at will (an answer to one of our own
//!   requests, a newer verified status, a lost peer) plan at once, which keeps the pipeline full;
//!   a changed `Have`/`Unhave`, which any peer can send without end, plans at most once per tick
//!   and otherwise waits for the tick (every tick plans anyway).
//! - **Unhave.** [`Replicator::forget`] gathers blocks in a sparse set; they go out as
//!   coalesced runs (as few `Unhave`s as the frame limit allows) before the next message or
//!   when the driver polls. Deleting a 280 MiB file block by block is then one message per
//!   peer, not one per block (which tripped the connection's backlog cap and cut everyone).
//! - **Footprint.** [`Footprint`] counts the entries the replicator holds on behalf of peers, so
//!   tests can budget memory under hostile traffic without timing anything.

use super::{FeedId, FeedSlot, Replicator};
use crate::core::bitfield::block_sets;
use crate::core::rangeset::RangeSet;
use crate::core::storage::Storage;
use feedsync_protocol::{Have, Message};

/// Entries the replicator holds, by kind. Each is a small fixed-size record (a run, a queued
/// request, a pending request, a block in flight, an action), so the total bounds memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Runs of peers' have sets, over all peers and feeds.
    pub peer_runs: usize,
    /// Peers' requests waiting for upload.
    pub queued_uploads: usize,
    /// Our requests pending (live or recently expired).
    pub requests: usize,
    /// Blocks counted in flight.
    pub in_flight: usize,
    /// Runs of the per-feed `uploaded` and pending-`Unhave` sets.
    pub own_runs: usize,
    /// `Open`s remembered for feeds we do not have.
    pub unanswered_opens: usize,
    /// Actions waiting to be polled.
    pub actions: usize,
}

impl Footprint {
    /// All entries.
    pub fn total(&self) -> usize {
        self.peer_runs
            + self.queued_uploads
            + self.requests
            + self.in_flight
            + self.own_runs
            + self.unanswered_opens
            + self.actions
    }
}

impl<S: Storage> Replicator<S> {
    /// How many entries the replicator holds now (see [`Footprint`]).
    pub fn footprint(&self) -> Footprint {
        let mut f = Footprint {
            actions: self.actions.len(),
            ..Footprint::default()
        };
        for p in self.peers.values() {
            f.peer_runs += p
                .channels
                .values()
                .map(|c| c.have.run_count())
                .sum::<usize>();
            f.queued_uploads += p.uploads.len();
            f.requests += p.requests.len();
            f.unanswered_opens += p.unanswered.len();
        }
        for slot in &self.feeds {
            f.in_flight += slot.in_flight.len();
            f.own_runs += slot.uploaded.run_count() + slot.unhave.run_count();
        }
        f
    }

    /// Scheduling passes run so far: a diagnostic that shows what a message cost (a ping or a
    /// repeated have must cost none).
    pub fn schedule_passes(&self) -> u64 {
        self.schedule_passes
    }

    /// Runs the scheduler if a handler marked the plan as changed (see the module docs).
    pub(super) fn replan_if_due(&mut self) {
        let soon = self.replan_soon && self.last_soon_plan != Some(self.now);
        if self.replan_urgent || soon {
            if self.replan_soon {
                self.last_soon_plan = Some(self.now);
            }
            self.schedule();
        }
    }

    /// Blocks of `feed` just stored: remembered, announced to every peer of the feed as
    /// coalesced runs by [`Replicator::flush_haves`] on the next tick (one `Have` per peer and
    /// tick, not one per answer: a reader of small files takes hundreds of answers a second).
    pub(super) fn queue_have(&mut self, feed: FeedId, range: std::ops::Range<u64>) {
        if self.feeds[feed].have_pending.insert(range) {
            self.have_pending = true;
        }
    }

    /// Sends every pending `Have`, as few messages per peer as the frame limit allows.
    pub(super) fn flush_haves(&mut self) {
        if std::mem::take(&mut self.have_pending) {
            self.broadcast_runs(|slot| &mut slot.have_pending, Message::Have);
        }
    }

    /// Takes the set `pending` picks out of every feed and tells every peer of the feed, as
    /// coalesced runs in as few `kind` messages as the frame limit allows.
    fn broadcast_runs(
        &mut self,
        pending: fn(&mut FeedSlot<S>) -> &mut RangeSet,
        kind: fn(Have) -> Message,
    ) {
        for feed in 0..self.feeds.len() {
            let set = std::mem::take(pending(&mut self.feeds[feed]));
            for blocks in block_sets(set.runs()) {
                let channel = feed as u32;
                self.broadcast(feed, None, kind(Have { channel, blocks }));
            }
        }
    }

    /// Blocks of `feed` given up: remembered, announced as coalesced runs by
    /// [`Replicator::flush_unhaves`].
    pub(super) fn queue_unhave(&mut self, feed: FeedId, range: std::ops::Range<u64>) {
        // Not announced yet, and now not ours to announce.
        self.feeds[feed].have_pending.remove(range.clone());
        if self.feeds[feed].unhave.insert(range) {
            self.unhave_pending = true;
        }
        // Blocks we lost may have to be fetched again.
        self.replan_soon = true;
    }

    /// Sends every pending `Unhave`, as few messages per peer as the frame limit allows.
    pub(super) fn flush_unhaves(&mut self) {
        if std::mem::take(&mut self.unhave_pending) {
            self.broadcast_runs(|slot| &mut slot.unhave, Message::Unhave);
        }
    }
}
