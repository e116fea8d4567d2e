//! Group commit: a feed we write is announced only once what the announcement reveals is
//! durable.
//!
//! Why: a peer that saw our signed length `n` trusts it forever. If a power cut then took
//! appends below `n` back, our next appends would sign a second history at lengths peers
//! already hold, every replica would see a fork and ban us. So appends only mark the feed
//! dirty; [`Replicator::commit`] (run by `poll_action` and `poll_upload` before anything leaves,
//! so one flush covers every append since the last message went out) syncs each dirty feed and
//! only then sends its status and haves. A failed sync is reported
//! ([`Event::StorageError`]) and announces nothing; it is retried on the next tick.
//!
//! The loud check: a peer's valid status for a feed we write, with a length above ours or a
//! different tree at a length we hold, proves that history we announced was lost anyway (a
//! disk that acknowledged a flush it did not make). Appending to that feed stops for good and
//! [`Event::LostHistory`] names it.

use super::{Event, FeedId, PeerId, Replicator, StorageFailure};
use crate::core::error::FeedError;
use crate::core::storage::Storage;
use feedsync_protocol::Status;

impl<S: Storage> Replicator<S> {
    /// Makes `first` durable before `then` whenever both have appends to commit: a drive's
    /// metadata records name content blocks, so its content feed goes first
    /// (`sync_before(content, metadata)`). If `first` cannot be synced, `then` is held too.
    pub fn sync_before(&mut self, first: FeedId, then: FeedId) {
        if first != then && !self.feeds[then].sync_after.contains(&first) {
            self.feeds[then].sync_after.push(first);
        }
    }

    /// Whether a commit has work to do now.
    pub(super) fn commit_due(&self) -> bool {
        self.dirty_any && self.now >= self.commit_retry_at
    }

    /// Syncs every feed we write that has unannounced appends (respecting
    /// [`Replicator::sync_before`]), then announces what became durable. Called by
    /// [`Replicator::poll_action`] and [`Replicator::poll_upload`]; a driver may call it
    /// itself. Cheap when nothing is dirty.
    pub fn commit(&mut self) {
        if !self.commit_due() {
            return;
        }
        self.dirty_any = false;
        // Passes until nothing more can be synced: a feed waits while a feed it must follow
        // is still dirty (held by a failure, or synced in a later pass).
        let mut progress = true;
        while progress {
            progress = false;
            for feed in 0..self.feeds.len() {
                let slot = &self.feeds[feed];
                if !slot.dirty || slot.sync_after.iter().any(|&f| self.feeds[f].dirty) {
                    continue;
                }
                match self.feeds[feed].feed.sync() {
                    Ok(()) => {
                        self.feeds[feed].dirty = false;
                        self.feeds[feed].sync_failed = false;
                        self.announce_durable(feed);
                        progress = true;
                    }
                    Err(e) => self.sync_failed(feed, &e),
                }
            }
        }
        if self.feeds.iter().any(|s| s.dirty) {
            self.dirty_any = true;
            self.commit_retry_at = self.commit_retry_at.max(self.now + 1);
        }
    }

    fn sync_failed(&mut self, feed: FeedId, e: &FeedError) {
        if !self.feeds[feed].sync_failed {
            self.feeds[feed].sync_failed = true;
            self.event(Event::StorageError {
                feed,
                error: StorageFailure::from(e),
            });
        }
        self.commit_retry_at = self.now + 1;
    }

    /// `feed` is durable up to its length: tell every peer (status before haves).
    fn announce_durable(&mut self, feed: FeedId) {
        let from = self.feeds[feed].durable.map_or(0, |(len, _, _)| len);
        let tree = self.feeds[feed].feed.signed_tree();
        self.feeds[feed].durable = tree;
        let length = self.feeds[feed].feed.len();
        if from == length && from > 0 {
            return;
        }
        if let Some(status) = self.status(feed) {
            self.broadcast(feed, None, status);
        }
        if from < length {
            self.broadcast(feed, None, Self::have(feed, from..length));
        }
    }

    /// The length of `feed` that may be revealed: all of it for a feed we only replicate, what
    /// the last commit made durable for one we write.
    pub(super) fn revealable(&self, feed: FeedId) -> u64 {
        let slot = &self.feeds[feed];
        if slot.feed.is_writable() {
            slot.durable.map_or(0, |(len, _, _)| len)
        } else {
            slot.feed.len()
        }
    }

    /// Refuses an append to a feed whose announced history was lost.
    pub(super) fn check_appendable(&self, feed: FeedId) -> Result<(), FeedError> {
        if self.feeds[feed].lost_history {
            return Err(FeedError::Corrupt(
                "a peer holds history of this feed that this store lost (the disk dropped \
                 flushed appends); appending would fork every replica, so it is refused"
                    .into(),
            ));
        }
        Ok(())
    }

    /// A verified status from `peer` for `feed`: if we write `feed`, does it prove history we
    /// no longer hold?
    pub(super) fn check_own_history(&mut self, peer: PeerId, feed: FeedId, s: &Status) {
        let _ = peer;
        let slot = &mut self.feeds[feed];
        if !slot.feed.is_writable() || slot.lost_history {
            return;
        }
        let ours = slot.feed.len();
        let lost = if s.length > ours {
            true
        } else {
            // A different tree at a length we hold (cheap: the roots at that length).
            slot.feed
                .tree_hash_at(s.length)
                .is_ok_and(|h| h != s.tree_hash)
        };
        if lost {
            slot.lost_history = true;
            self.event(Event::LostHistory {
                feed,
                ours,
                theirs: s.length,
            });
        }
    }
}
