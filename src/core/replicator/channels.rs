//! Channels and announcements: opening a channel per feed with a session-bound capability,
//! answering only `Open`s that prove knowledge of the feed's key, and telling peers what we hold
//! (status and have), what they hold (their status, have and want), and re-sending it all on a
//! timer so a lost message delays but never stalls replication.

use super::{BanReason, Event, FeedId, MAX_UNANSWERED_OPENS, PeerId, Replicator};
use crate::core::bitfield::block_set_ranges;
use crate::core::crypto;
use crate::core::error::FeedError;
use crate::core::rangeset::RangeSet;
use crate::core::storage::Storage;
use feedsync_protocol::{
    BlockSet, GoodbyeReason, Have, Hello, Message, Open, PROTOCOL_VERSION, Status,
};

/// One feed's channel with one peer.
pub(super) struct Channel {
    /// We sent our `Open`.
    pub opened: bool,
    /// The remote's channel number, once its `Open` verified.
    pub remote: Option<u32>,
    /// Blocks the peer announced (within a proved length), at most `Config::max_peer_runs`
    /// runs. (Its wants are a hint nothing uses: checked, never stored.)
    pub have: RangeSet,
    /// The remote's verified signed length.
    pub length: u64,
}

impl Channel {
    /// A channel nothing is known about yet; the peer's haves keep at most `max_runs` runs.
    pub fn new(max_runs: usize) -> Self {
        Self {
            opened: false,
            remote: None,
            have: RangeSet::with_cap(max_runs),
            length: 0,
        }
    }

    /// Both sides opened: only then is anything about the feed said or served.
    pub fn is_open(&self) -> bool {
        self.opened && self.remote.is_some()
    }
}

impl<S: Storage> Replicator<S> {
    /// Sends `message` to every peer with an open channel for `feed`, except `except`.
    pub(super) fn broadcast(&mut self, feed: FeedId, except: Option<PeerId>, message: Message) {
        for peer in self.feed_peers(feed) {
            if Some(peer) != except {
                self.send(peer, message.clone());
            }
        }
    }

    // Local changes, announced to every peer of the feed at once.

    /// Appends blocks to a feed we write. Peers hear of them once they are durable: the next
    /// [`Replicator::commit`] (run before any message leaves) syncs and announces them.
    pub fn append<B: AsRef<[u8]>>(&mut self, feed: FeedId, blocks: &[B]) -> Result<u64, FeedError> {
        self.append_inner(feed, blocks, None)
    }

    /// [`Replicator::append`] with the blocks' leaf hashes already computed (see
    /// [`crate::core::Feed::append_batch_hashed`]).
    pub fn append_hashed<B: AsRef<[u8]>>(
        &mut self,
        feed: FeedId,
        blocks: &[B],
        leaves: &[crate::core::crypto::Hash],
    ) -> Result<u64, FeedError> {
        self.append_inner(feed, blocks, Some(leaves))
    }

    fn append_inner<B: AsRef<[u8]>>(
        &mut self,
        feed: FeedId,
        blocks: &[B],
        leaves: Option<&[crate::core::crypto::Hash]>,
    ) -> Result<u64, FeedError> {
        self.check_appendable(feed)?;
        let length = match leaves {
            Some(l) => self.feeds[feed].feed.append_batch_hashed(blocks, l)?,
            None => self.feeds[feed].feed.append_batch(blocks)?,
        };
        let slot = &mut self.feeds[feed];
        slot.best_length = length;
        if !blocks.is_empty() {
            slot.dirty = true;
            self.dirty_any = true;
        }
        Ok(length)
    }

    /// Gives up blocks we can no longer serve (a shared file changed under us): they leave our
    /// bitfield and every peer is told `Unhave`, so nobody asks us for them again.
    pub fn forget(&mut self, feed: FeedId, range: std::ops::Range<u64>) -> Result<(), FeedError> {
        if range.is_empty() {
            return Ok(());
        }
        self.feeds[feed].feed.forget(range.clone())?;
        // Gathered and sent as coalesced runs (see `limits.rs`): callers often give up a
        // file's blocks one by one.
        self.queue_unhave(feed, range);
        Ok(())
    }

    /// Peers with an open channel for `feed`.
    fn feed_peers(&self, feed: FeedId) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.channels.get(&feed).is_some_and(Channel::is_open))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Our signed status of `feed`, if it has one: for a feed we write, the durable one.
    pub(super) fn status(&self, feed: FeedId) -> Option<Message> {
        let slot = &self.feeds[feed];
        let (length, tree_hash, signature) = if slot.feed.is_writable() {
            slot.durable?
        } else {
            slot.feed.signed_tree()?
        };
        Some(Message::Status(Status {
            channel: feed as u32,
            length,
            tree_hash,
            signature,
        }))
    }

    /// A `Have` of `range` of `feed`.
    pub(super) fn have(feed: FeedId, range: std::ops::Range<u64>) -> Message {
        Message::Have(Have {
            channel: feed as u32,
            blocks: BlockSet::Range {
                start: range.start,
                count: range.end - range.start,
            },
        })
    }

    /// Opens our channel for `feed` to `peer`, with a capability bound to the session.
    pub(super) fn send_open(&mut self, peer: PeerId, feed: FeedId) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        let slot = &self.feeds[feed];
        let capability = crypto::capability(
            &slot.feed.public_key(),
            &state.handshake_hash,
            state.initiator,
        );
        let max_runs = self.config.max_peer_runs;
        state
            .channels
            .entry(feed)
            .or_insert_with(|| Channel::new(max_runs))
            .opened = true;
        let message = Message::Open(Open {
            channel: feed as u32,
            discovery_key: slot.discovery_key,
            capability,
        });
        self.send(peer, message);
    }

    /// Status and have for `feed`, to `peer`.
    fn announce(&mut self, peer: PeerId, feed: FeedId) {
        if let Some(status) = self.status(feed) {
            self.send(peer, status);
        }
        // As many `Have`s as the frame limit needs: a fragmented bitfield must not become one
        // message every encoder and receiver refuses.
        let bitfield = self.feeds[feed].feed.bitfield();
        let revealable = self.revealable(feed);
        let clamped;
        let bitfield = if bitfield.first_set(revealable).is_some() {
            // Appends not yet durable are not ours to mention (rare: commit runs first).
            let mut b = bitfield.clone();
            b.truncate(revealable);
            clamped = b;
            &clamped
        } else {
            bitfield
        };
        for blocks in bitfield.to_block_sets() {
            let have = Message::Have(Have {
                channel: feed as u32,
                blocks,
            });
            self.send(peer, have);
        }
    }

    /// A feed was added: the initiator opens it to every peer, and peers that asked for it
    /// before we had it get their answer now.
    pub(super) fn open_new_feed(&mut self, feed: FeedId) {
        let initiated: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.initiator)
            .map(|(id, _)| *id)
            .collect();
        for peer in initiated {
            self.send_open(peer, feed);
        }
        let discovery_key = self.feeds[feed].discovery_key;
        let waiting: Vec<(PeerId, Open)> = self
            .peers
            .iter_mut()
            .flat_map(|(&p, st)| {
                let (now, keep): (Vec<Open>, Vec<Open>) = st
                    .unanswered
                    .drain(..)
                    .partition(|o| o.discovery_key == discovery_key);
                st.unanswered = keep.into();
                now.into_iter().map(move |o| (p, o))
            })
            .collect();
        for (peer, open) in waiting {
            if let Err(reason) = self.on_open(peer, open) {
                self.drop_peer(peer, reason);
            }
        }
    }

    /// Re-sends status and have on every open channel, and our `Open` where the initiator's is
    /// still unanswered (either may have been lost).
    pub(super) fn reannounce(&mut self) {
        let mut opens = Vec::new();
        let mut announces = Vec::new();
        for (&peer, state) in &self.peers {
            for feed in 0..self.feeds.len() {
                match state.channels.get(&feed) {
                    Some(ch) if ch.is_open() => announces.push((peer, feed)),
                    Some(ch) if state.initiator && ch.remote.is_none() => opens.push((peer, feed)),
                    None if state.initiator => opens.push((peer, feed)),
                    _ => {}
                }
            }
        }
        for (peer, feed) in opens {
            self.send_open(peer, feed);
        }
        for (peer, feed) in announces {
            self.announce(peer, feed);
        }
    }

    /// Runs `f` on `peer`'s open channel with remote number `channel`; returns its feed.
    pub(super) fn with_channel(
        &mut self,
        peer: PeerId,
        channel: u32,
        f: impl FnOnce(&mut Channel),
    ) -> Option<FeedId> {
        let state = self.peers.get_mut(&peer)?;
        let feed = *state.remote_channels.get(&channel)?;
        let ch = state.channels.get_mut(&feed)?;
        if !ch.is_open() {
            return None;
        }
        f(ch);
        Some(feed)
    }

    pub(super) fn on_hello(&mut self, peer: PeerId, hello: Hello) -> Result<(), GoodbyeReason> {
        if hello.version == 0 {
            return Err(GoodbyeReason::ProtocolError);
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            p.version = Some(hello.version.min(PROTOCOL_VERSION));
        }
        Ok(())
    }

    pub(super) fn on_open(&mut self, peer: PeerId, open: Open) -> Result<(), GoodbyeReason> {
        let Some(feed) = self
            .feeds
            .iter()
            .position(|s| s.discovery_key == open.discovery_key)
        else {
            // Unknown feed: say nothing at all, but remember it in case we add the feed.
            if let Some(state) = self.peers.get_mut(&peer) {
                if state.unanswered.len() == MAX_UNANSWERED_OPENS {
                    state.unanswered.pop_front();
                }
                state.unanswered.push_back(open);
            }
            return Ok(());
        };
        let Some(state) = self.peers.get_mut(&peer) else {
            return Ok(());
        };
        let pk = self.feeds[feed].feed.public_key();
        if !crypto::verify_capability(
            &pk,
            &state.handshake_hash,
            !state.initiator,
            &open.capability,
        ) {
            return Ok(()); // cannot prove it knows the key: it learns nothing either
        }
        // A channel number moving to another feed would confuse everything after it.
        if state
            .remote_channels
            .get(&open.channel)
            .is_some_and(|&f| f != feed)
        {
            return Err(GoodbyeReason::ProtocolError);
        }
        // One remote channel per feed: a capability replayed under new channel numbers must not
        // grow the table.
        if state
            .channels
            .get(&feed)
            .and_then(|c| c.remote)
            .is_some_and(|c| c != open.channel)
        {
            return Err(GoodbyeReason::ProtocolError);
        }
        state.remote_channels.insert(open.channel, feed);
        let max_runs = self.config.max_peer_runs;
        let ch = state
            .channels
            .entry(feed)
            .or_insert_with(|| Channel::new(max_runs));
        let first = ch.remote.is_none();
        ch.remote = Some(open.channel);
        let need_open = !ch.opened;
        if need_open {
            self.send_open(peer, feed);
        }
        if first || need_open {
            self.announce(peer, feed);
        }
        Ok(())
    }

    pub(super) fn on_status(&mut self, peer: PeerId, s: Status) -> Result<(), GoodbyeReason> {
        let Some(state) = self.peers.get(&peer) else {
            return Ok(());
        };
        let Some(&feed) = state.remote_channels.get(&s.channel) else {
            return Ok(());
        };
        // A length no longer than one this peer already proved tells us nothing: it is not
        // verified (a signature check per message would make a flood of repeated statuses a
        // CPU amplifier) and changes nothing.
        if state
            .channels
            .get(&feed)
            .is_some_and(|c| c.length > 0 && s.length <= c.length)
        {
            return Ok(());
        }
        if !self.feeds[feed]
            .feed
            .verify_status(s.length, &s.tree_hash, &s.signature)
        {
            // A forged length is a lie, not a glitch: same fate as forged data.
            self.banned.insert(peer);
            self.event(Event::Banned {
                peer,
                reason: BanReason::ForgedStatus { length: s.length },
            });
            return Err(GoodbyeReason::BadData);
        }
        let max_runs = self.config.max_peer_runs;
        if let Some(state) = self.peers.get_mut(&peer) {
            let ch = state
                .channels
                .entry(feed)
                .or_insert_with(|| Channel::new(max_runs));
            ch.length = ch.length.max(s.length);
        }
        self.check_own_history(peer, feed, &s);
        let slot = &mut self.feeds[feed];
        slot.best_length = slot.best_length.max(s.length);
        slot.proved = true;
        // A newer tree to fetch (or a first proof): plan now. Bounded: each needs a signature
        // the writer made for a longer length than the last.
        self.replan_urgent = true;
        Ok(())
    }

    /// A `Have`/`Unhave` (`want == false`) or `Want`/`Unwant` (`want == true`) from `peer`;
    /// `value` says whether the blocks are being added or removed.
    pub(super) fn on_have(
        &mut self,
        peer: PeerId,
        channel: u32,
        set: &BlockSet,
        value: bool,
        want: bool,
    ) -> Result<(), GoodbyeReason> {
        let Some(&feed) = self
            .peers
            .get(&peer)
            .and_then(|p| p.remote_channels.get(&channel))
        else {
            return Ok(());
        };
        let ranges = block_set_ranges(set, u64::MAX).ok_or(GoodbyeReason::ProtocolError)?;
        if want {
            return Ok(()); // a hint nothing uses: checked above, never stored
        }
        // Record only what lies inside a signed length someone proved: a have far past it may just
        // have overtaken its status (it is re-sent). Even within it, the set is sparse and capped.
        let limit = self.feeds[feed]
            .best_length
            .max(self.feeds[feed].feed.len());
        let Some(ch) = self
            .peers
            .get_mut(&peer)
            .and_then(|p| p.channels.get_mut(&feed))
        else {
            return Ok(());
        };
        let mut changed = false;
        for r in ranges {
            let end = r.end.min(limit);
            if r.start < end {
                changed |= if value {
                    ch.have.insert(r.start..end)
                } else {
                    ch.have.remove(r.start..end)
                };
            }
        }
        if changed {
            self.replan_soon = true;
        }
        Ok(())
    }
}
