//! The upload queue: peers' requests wait here until the driver has room on that peer's
//! connection and pulls the next answer with [`Replicator::poll_upload`].
//!
//! Answers are pulled, not pushed, so the uploader decides what to send next when it can send:
//! within a peer's queue, requests for blocks never uploaded to anyone this session go first (a
//! seed spends its upload on blocks the swarm lacks, not on copies the readers can trade among
//! themselves), then the oldest. One request is answered piece by piece (each piece at most
//! `MAX_DATA_BYTES`), so the driver's byte budget applies to every piece, however large the
//! request. Production and the simulator both drive this one path.

use super::{Event, FeedId, MAX_QUEUED_REQUESTS, PeerId, Replicator, StorageFailure};
use crate::core::error::FeedError;
use crate::core::feed::Proof;
use crate::core::storage::Storage;
use feedsync_protocol::{
    Block, Cancel, Data, GoodbyeReason, MAX_DATA_BYTES, Message, NoData, Request,
};

/// The blocks a request asks for.
fn r_range(r: &Request) -> std::ops::Range<u64> {
    r.index..r.index.saturating_add(u64::from(r.count))
}

/// A peer's request waiting in our upload queue.
pub(super) struct Queued {
    /// Our feed it asks for.
    pub feed: FeedId,
    /// What it asks (after a piece was served: what remains).
    pub request: Request,
    /// When it arrived, in ticks.
    pub since: u64,
}

impl<S: Storage> Replicator<S> {
    /// Queues `peer`'s request, if it came on an open channel.
    pub(super) fn on_request(&mut self, peer: PeerId, r: Request) -> Result<(), GoodbyeReason> {
        let Some(state) = self.peers.get_mut(&peer) else {
            return Ok(());
        };
        let Some(&feed) = state.remote_channels.get(&r.channel) else {
            return Ok(());
        };
        if !state.channels.get(&feed).is_some_and(|c| c.is_open()) {
            return Ok(());
        }
        if state.uploads.len() >= MAX_QUEUED_REQUESTS {
            return Err(GoodbyeReason::ProtocolError); // far past any sane window
        }
        state.uploads.push_back(Queued {
            feed,
            request: r,
            since: self.now,
        });
        Ok(())
    }

    /// `peer` withdrew a request: drop it from the queue (a piece already sent stays sent).
    pub(super) fn on_cancel(&mut self, peer: PeerId, c: Cancel) {
        if let Some(state) = self.peers.get_mut(&peer)
            && let Some(&feed) = state.remote_channels.get(&c.channel)
        {
            state
                .uploads
                .retain(|q| !(q.feed == feed && q.request.id == c.id));
        }
    }

    /// Where in `peer`'s queue the next answer comes from: the first request asking for some
    /// block never uploaded to anyone, else the oldest — unless another peer is waiting for such
    /// a fresh block, in which case `peer`'s copies wait (`None`) while they are young.
    ///
    /// The priority spans peers because the uplink does: a seed that sends reader A a copy of a
    /// block already sent to B spends upload that B could have spent on A, while the swarm's
    /// missing blocks, which only the seed can give, wait. Holding copies back makes the driver
    /// move on to the connection that asked for something fresh; meanwhile the held-back
    /// requester's request expires on its side and it re-asks another reader that has the block.
    /// A copy is held back at most `Config::max_request_timeout` ticks after it was queued (no
    /// requester waits longer than that before re-asking), so a peer whose requests are all
    /// copies is still served when the fresh requests sit on a connection that cannot drain.
    pub(super) fn next_in_queue(&self, peer: PeerId) -> Option<usize> {
        let queue = &self.peers.get(&peer)?.uploads;
        if let Some(pos) = queue.iter().position(|q| self.is_fresh(q.feed, &q.request)) {
            return Some(pos);
        }
        let oldest = queue.front()?;
        let young = self.now.saturating_sub(oldest.since) < self.config.max_request_timeout;
        let fresh_elsewhere = || {
            self.peers.iter().any(|(&other, p)| {
                other != peer && p.uploads.iter().any(|q| self.is_fresh(q.feed, &q.request))
            })
        };
        if young && fresh_elsewhere() {
            return None;
        }
        Some(0)
    }

    /// Declines to send `peer` a copy that another reader can give it: if the request at `pos`
    /// asks only for blocks we already uploaded, and another peer with an open channel has
    /// announced every one of them, it is answered `NoData` (the requester forgets that we hold
    /// those blocks until our next announcement, and asks the other holder at once) -- once per
    /// block and peer; asked again, we serve it (the other holder may be unreachable from the
    /// requester). A seeder's uplink is the swarm's scarcest resource: every copy it sends of a
    /// block the readers already trade among themselves is a fresh block it did not send.
    pub(super) fn redirect(&mut self, peer: PeerId, pos: usize) -> Option<Message> {
        let q = self.peers.get(&peer)?.uploads.get(pos)?;
        let (feed, r) = (q.feed, &q.request);
        let asked = r_range(r);
        if r.count == 0 || r.upgrade || self.is_fresh(feed, r) {
            return None;
        }
        let state = self.peers.get(&peer)?;
        // Declined before (or no room left to remember declining): serve. A peer that lies
        // about its haves can cost an honest requester one round trip per block, never more.
        if state.redirected.count_range(asked.clone()) > 0
            || state.redirected.run_count() >= super::MAX_REDIRECT_RUNS
        {
            return None;
        }
        let held_elsewhere = self.peers.iter().any(|(&other, p)| {
            other != peer
                && p.channels.get(&feed).is_some_and(|c| {
                    c.is_open() && c.have.count_range(asked.clone()) == u64::from(r.count)
                })
        });
        if !held_elsewhere {
            return None;
        }
        let state = self.peers.get_mut(&peer)?;
        let q = state.uploads.remove(pos)?;
        state.redirected.insert(asked);
        Some(Message::NoData(NoData {
            channel: q.feed as u32,
            id: q.request.id,
        }))
    }

    /// Whether a queued request asks for some block we never uploaded to anyone.
    fn is_fresh(&self, feed: FeedId, r: &Request) -> bool {
        r.count > 0 && self.feeds[feed].uploaded.count_range(r_range(r)) < u64::from(r.count)
    }

    /// A block of a feed we replicate no longer matches its verified leaf (the disk lost or
    /// garbled it): give it up, so that it is never offered again and is fetched anew. Only
    /// where the store holds the bytes itself: blocks kept in a shared folder's files belong to
    /// the user, and the drive decides what a changed file means (it may be a local edit).
    fn forget_changed(&mut self, feed: FeedId, index: u64) {
        let slot = &self.feeds[feed];
        if slot.feed.is_writable() || !slot.feed.holds_data() {
            return;
        }
        match self.forget(feed, index..index + 1) {
            Ok(()) => self.schedule_blocks(feed),
            Err(e) => self.event(Event::StorageError {
                feed,
                error: StorageFailure::from(&e),
            }),
        }
    }

    /// Answers the next piece of one request: a Data message of at most `MAX_DATA_BYTES` of
    /// blocks (or NoData), and what remains of the request.
    fn serve(&mut self, feed: FeedId, r: &Request, max_bytes: usize) -> (Message, Option<Request>) {
        let max_bytes = max_bytes.min(MAX_DATA_BYTES);
        let channel = feed as u32;
        let end = r.index.saturating_add(u64::from(r.count));
        // A feed we write whose last appends are not durable (their sync failed): nothing past
        // the durable length leaves, neither blocks nor a newer signed tree.
        let revealable = self.revealable(feed);
        if self.feeds[feed].feed.len() > revealable && (r.upgrade || end > revealable) {
            return (Message::NoData(NoData { channel, id: r.id }), None);
        }
        let slot = &mut self.feeds[feed];
        let mut blocks = Vec::new();
        let mut bytes = 0usize;
        let mut changed = None;
        while r.index + (blocks.len() as u64) < end {
            let i = r.index + blocks.len() as u64;
            let block = match slot.feed.get(i) {
                Ok(b) => b,
                Err(FeedError::DataChanged(index)) => {
                    changed = Some(index);
                    break;
                }
                Err(_) => break,
            };
            if !blocks.is_empty() && bytes + block.len() > max_bytes {
                break;
            }
            bytes += block.len();
            blocks.push(Block(block));
        }
        if let Some(index) = changed {
            self.event(Event::DataChanged { feed, index });
            self.forget_changed(feed, index);
        }
        let slot = &mut self.feeds[feed];
        let count = blocks.len() as u64;
        let no_data = (Message::NoData(NoData { channel, id: r.id }), None);
        if count == 0 && !(r.upgrade && r.count == 0) {
            return no_data;
        }
        let Ok(Proof { nodes, upgrade }) = slot.feed.proof(r.index, count, r.length, r.upgrade)
        else {
            return no_data;
        };
        slot.uploaded.insert(r.index..r.index + count);
        let data = Message::Data(Data {
            channel,
            id: r.id,
            index: r.index,
            blocks,
            nodes,
            upgrade,
        });
        let rest = (count > 0 && r.index + count < end).then(|| Request {
            index: r.index + count,
            count: r.count - count as u32,
            // Later pieces are relative to the tree the first one upgraded the requester to.
            length: if r.upgrade { slot.feed.len() } else { r.length },
            upgrade: false,
            ..r.clone()
        });
        (data, rest)
    }

    /// Serves the next piece of the queued request at `pos` of `peer`'s queue, leaving any
    /// remainder at the front, and counts the blocks handed out as [`Event::Uploaded`].
    pub(super) fn serve_queued(
        &mut self,
        peer: PeerId,
        pos: usize,
        max_bytes: usize,
    ) -> Option<Vec<Message>> {
        let queued = self.peers.get_mut(&peer)?.uploads.remove(pos)?;
        let feed = queued.feed;
        let (message, rest) = self.serve(feed, &queued.request, max_bytes);
        if let Message::Data(d) = &message
            && !d.blocks.is_empty()
        {
            // It will hold them in a moment (it asked, and they verify): a reader never announces
            // blocks back to the peer they came from, so this is how we know who has our copies.
            let got = d.index..d.index + d.blocks.len() as u64;
            if let Some(ch) = self
                .peers
                .get_mut(&peer)
                .and_then(|p| p.channels.get_mut(&feed))
            {
                ch.have.insert(got);
            }
            self.event(Event::Uploaded {
                peer,
                feed,
                index: d.index,
                count: d.blocks.len() as u64,
                bytes: d.blocks.iter().map(|b| b.0.len() as u64).sum(),
            });
        }
        if let (Some(rest), Some(state)) = (rest, self.peers.get_mut(&peer)) {
            state.uploads.push_front(Queued {
                request: rest,
                ..queued
            });
        }
        Some(vec![message])
    }
}
