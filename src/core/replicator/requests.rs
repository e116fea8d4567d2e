//! Our requests: sending them, the in-flight bookkeeping (per block and per peer window),
//! answers (`Data` verified and stored, `NoData`), withdrawals, and expiry.
//!
//! Invariant kept here: a block's `in_flight` count is the number of *unexpired* requests
//! covering it, and a peer's `live` is the number of window slots its unexpired requests take.
//! Every path that ends a request (answer, NoData, expiry, cancel, disconnect) releases both
//! exactly once — expiry releases early, so a later end of an expired request releases nothing.

use super::{BanReason, Event, FeedId, PeerId, Replicator, StorageFailure};
use crate::core::error::FeedError;
use crate::core::feed::Proof;
use crate::core::storage::Storage;
use feedsync_protocol::{Cancel, Data, GoodbyeReason, Message, NoData, Request};

/// A request we sent and have not had (all of) the answer to.
#[derive(Clone, Copy)]
pub(super) struct Pending {
    pub feed: FeedId,
    pub index: u64,
    pub count: u64,
    /// Our trusted length when asked: the proof is relative to it.
    pub length: u64,
    pub upgrade: bool,
    pub sent_at: u64,
    /// Timed out: its blocks were released for others, but a late answer is still welcome.
    pub expired: bool,
}

impl Pending {
    /// Window slots the request occupies: one per block (an upgrade-only request counts one).
    pub fn weight(&self) -> u32 {
        (self.count as u32).max(1)
    }
}

impl<S: Storage> Replicator<S> {
    /// Asks `peer` for blocks `index..index + count` of `feed` (and our next signed tree, with
    /// `upgrade`), and counts them in flight.
    pub(super) fn request(
        &mut self,
        peer: PeerId,
        feed: FeedId,
        index: u64,
        count: u64,
        upgrade: bool,
    ) {
        let id = self.next_request_id;
        self.next_request_id += 1;
        let length = self.feeds[feed].feed.len();
        let Some(state) = self.peers.get_mut(&peer) else {
            return; // the scheduler picks connected peers only
        };
        state.requests.insert(
            id,
            Pending {
                feed,
                index,
                count,
                length,
                upgrade,
                sent_at: self.now,
                expired: false,
            },
        );
        state.live += (count as u32).max(1);
        let slot = &mut self.feeds[feed];
        for i in index..index + count {
            *slot.in_flight.entry(i).or_default() += 1;
        }
        if upgrade {
            slot.upgrade_in_flight = Some((peer, id));
        }
        self.send(
            peer,
            Message::Request(Request {
                channel: feed as u32,
                id,
                index,
                count: count as u32,
                length,
                upgrade,
            }),
        );
    }

    /// Takes `req`'s blocks out of the per-block in-flight counts.
    fn release(&mut self, req: &Pending) {
        let slot = &mut self.feeds[req.feed];
        for i in req.index..req.index + req.count {
            if let Some(n) = slot.in_flight.get_mut(&i) {
                *n -= 1;
                if *n == 0 {
                    slot.in_flight.remove(&i);
                }
            }
        }
    }

    /// Withdraws our request `id` from `peer`.
    fn cancel(&mut self, peer: PeerId, feed: FeedId, id: u64) {
        let message = Message::Cancel(Cancel {
            channel: feed as u32,
            id,
        });
        self.send(peer, message);
    }

    /// Forgets `peer` and releases everything it was asked for.
    pub(super) fn forget_peer(&mut self, peer: PeerId) {
        let Some(state) = self.peers.remove(&peer) else {
            return;
        };
        // Its requests go back to the pool. Bounded by connections, so planned at once.
        self.replan_urgent = true;
        for (id, req) in state.requests {
            if !req.expired {
                self.release(&req);
            }
            if self.feeds[req.feed].upgrade_in_flight == Some((peer, id)) {
                self.feeds[req.feed].upgrade_in_flight = None;
            }
        }
    }

    /// `peer` could not give us its newer tree (a sparse replica may lack the nodes): do not ask
    /// it again until it announces a status anew, or the upgrade loop would spin on it.
    fn cannot_upgrade(&mut self, peer: PeerId, feed: FeedId) {
        let ours = self.feeds[feed].feed.len();
        if let Some(ch) = self
            .peers
            .get_mut(&peer)
            .and_then(|p| p.channels.get_mut(&feed))
        {
            ch.length = ch.length.min(ours);
        }
    }

    /// Expires requests unanswered past their peer's timeout: their blocks are released for
    /// others, the window halves, the peer earns a strike, and the request is withdrawn with
    /// `Cancel` so a slow peer does not spend upload on what we will fetch elsewhere. Requests
    /// long expired are forgotten (a later answer is then simply unsolicited).
    pub(super) fn expire_requests(&mut self) {
        let now = self.now;
        let mut released = Vec::new();
        for (&peer, state) in self.peers.iter_mut() {
            let timeout = state.congestion.request_timeout(&self.config);
            let mut expired_any = false;
            for (&id, req) in state.requests.iter_mut() {
                if !req.expired && now.saturating_sub(req.sent_at) > timeout {
                    req.expired = true;
                    state.live -= req.weight();
                    state.strikes += 1;
                    expired_any = true;
                    released.push((peer, id, *req));
                }
            }
            if expired_any {
                state.congestion.on_timeout();
            }
            state
                .requests
                .retain(|_, r| !r.expired || now.saturating_sub(r.sent_at) <= 4 * timeout);
        }
        for (peer, id, req) in released {
            self.release(&req);
            self.cancel(peer, req.feed, id);
            if self.feeds[req.feed].upgrade_in_flight == Some((peer, id)) {
                self.feeds[req.feed].upgrade_in_flight = None;
            }
        }
    }

    pub(super) fn on_no_data(&mut self, peer: PeerId, n: NoData) -> Result<(), GoodbyeReason> {
        let Some(state) = self.peers.get_mut(&peer) else {
            return Ok(());
        };
        let Some(req) = state.requests.remove(&n.id) else {
            return Ok(());
        };
        if !req.expired {
            state.live -= req.weight();
        }
        state.strikes = 0; // an answer: the peer is making progress
        // It does not have what it said it had (or lost it): stop asking it for those blocks.
        if let Some(ch) = state.channels.get_mut(&req.feed) {
            ch.have.remove(req.index..req.index + req.count);
        }
        // An answer to our own request (bounded by what we asked): plan at once.
        self.replan_urgent = true;
        if !req.expired {
            self.release(&req);
        }
        if self.feeds[req.feed].upgrade_in_flight == Some((peer, n.id)) {
            self.feeds[req.feed].upgrade_in_flight = None;
            self.cannot_upgrade(peer, req.feed);
        }
        Ok(())
    }

    /// Settles the bookkeeping of an answer to `req` carrying `count` blocks: RTT sample and
    /// window, the answered blocks released, and a remainder (a range answered in pieces) kept
    /// pending under the same id. Returns `false` if the answer has the wrong shape.
    fn settle(&mut self, peer: PeerId, d: &Data, req: Pending) -> bool {
        let now = self.now;
        let max_window = self.config.max_window;
        // Could anyone else serve this feed? (See `Congestion::adapt_window`.)
        let alone = !self
            .peers
            .iter()
            .any(|(&p, st)| p != peer && st.channels.get(&req.feed).is_some_and(|c| c.is_open()));
        let Some(state) = self.peers.get_mut(&peer) else {
            return true;
        };
        let count = d.blocks.len() as u64;
        let right_shape = d.index == req.index && count <= req.count && (count > 0 || req.upgrade);
        if !right_shape {
            // Dropping the peer releases the request, which is still in its table.
            return false;
        }
        state.requests.remove(&d.id);
        // A range may be answered in several pieces (each within MAX_DATA_BYTES): the rest of
        // the request stays pending under the same id.
        let partial = count > 0 && count < req.count;
        if !req.expired {
            let rtt = (now.saturating_sub(req.sent_at) as f64).max(1.0);
            state.congestion.on_answer(rtt, count, max_window, alone);
            // The answered blocks leave the window; a remainder stays in it.
            state.live -= if partial { count as u32 } else { req.weight() };
        }
        if partial {
            state.requests.insert(
                d.id,
                Pending {
                    index: req.index + count,
                    count: req.count - count,
                    // Later pieces are relative to the tree the first piece ended at.
                    length: d.upgrade.as_ref().map_or(req.length, |u| u.length),
                    upgrade: false,
                    sent_at: now,
                    ..req
                },
            );
        }
        state.strikes = 0; // an answer: the peer is making progress
        // An answer to our own request frees window slots: plan at once to keep the pipeline
        // full. Bounded by what we asked (a request is answered in at most as many pieces as it
        // has blocks), unlike messages a peer can send at will.
        self.replan_urgent = true;
        if !req.expired {
            let answered = Pending {
                count: if partial { count } else { req.count },
                ..req
            };
            self.release(&answered);
        }
        if self.feeds[req.feed].upgrade_in_flight == Some((peer, d.id)) {
            self.feeds[req.feed].upgrade_in_flight = None;
        }
        true
    }

    pub(super) fn on_data(&mut self, peer: PeerId, d: Data) -> Result<(), GoodbyeReason> {
        let Some(&req) = self.peers.get(&peer).and_then(|p| p.requests.get(&d.id)) else {
            return Ok(()); // unsolicited, or answered long ago: ignored
        };
        if !self.settle(peer, &d, req) {
            return Err(GoodbyeReason::ProtocolError);
        }
        let feed = req.feed;
        let count = d.blocks.len() as u64;
        let slot = &mut self.feeds[feed];
        let all_held = (d.index..d.index + count).all(|i| slot.feed.has(i));
        if all_held && (d.upgrade.is_none() || count > 0) {
            if req.upgrade && d.upgrade.is_none() {
                self.cannot_upgrade(peer, feed);
            }
            return Ok(()); // duplicate: someone else answered first
        }
        let length_before = slot.feed.len();
        let proof = Proof {
            nodes: d.nodes,
            upgrade: d.upgrade,
        };
        let blocks: Vec<&[u8]> = d.blocks.iter().map(|b| b.0.as_slice()).collect();
        let bytes: u64 = blocks.iter().map(|b| b.len() as u64).sum();
        match slot.feed.verify_and_store(d.index, &blocks, &proof) {
            Ok(v) => {
                if let Some(length) = v.upgraded_to {
                    slot.best_length = slot.best_length.max(length);
                    self.event(Event::Upgraded { feed, length });
                    if let Some(status) = self.status(feed) {
                        self.broadcast(feed, None, status);
                    }
                }
                if count > 0 {
                    self.cancel_others(feed, d.index, count);
                }
                if count > 0 && v.new_blocks > 0 {
                    self.event(Event::Downloaded {
                        feed,
                        index: d.index,
                        count,
                        peer,
                        bytes,
                    });
                    self.queue_have(feed, d.index..d.index + count);
                }
                Ok(())
            }
            Err(FeedError::Verify(e)) => {
                if req.length != length_before {
                    // Our trusted length moved since we asked: the proof is relative to a tree we
                    // no longer hold the roots of. Not the peer's fault; the block is asked again.
                    return Ok(());
                }
                self.banned.insert(peer);
                self.event(Event::Banned {
                    peer,
                    reason: BanReason::BadData(e),
                });
                Err(GoodbyeReason::BadData)
            }
            Err(e) => {
                self.event(Event::StorageError {
                    feed,
                    error: StorageFailure::from(&e),
                });
                Ok(())
            }
        }
    }

    /// Withdraws every other request (expired ones included) for blocks that just arrived.
    fn cancel_others(&mut self, feed: FeedId, index: u64, count: u64) {
        let end = index + count;
        let mut cancels = Vec::new();
        for (&peer, state) in self.peers.iter_mut() {
            let ids: Vec<u64> = state
                .requests
                .iter()
                .filter(|(_, r)| {
                    r.feed == feed && r.count > 0 && r.index < end && index < r.index + r.count
                })
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                let Some(r) = state.requests.remove(&id) else {
                    continue; // just listed, so always present
                };
                if !r.expired {
                    state.live -= r.weight();
                }
                cancels.push((peer, id, r));
            }
        }
        for (peer, id, r) in cancels {
            if !r.expired {
                self.release(&r);
            }
            self.cancel(peer, feed, id);
        }
    }
}
