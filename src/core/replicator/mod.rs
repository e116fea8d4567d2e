//! The replicator: the sans-IO protocol engine that keeps any number of feeds in sync with any
//! number of peers.
//!
//! (This file is the public surface and the per-feed/per-peer state; at ~630 lines it is a
//! little over the ~600 guide because a quarter of it is these docs.)
//!
//! It is driven from outside, quinn-proto style: inputs arrive through `handle_*` (a peer
//! connected, a message arrived, a peer went away, a tick of logical time passed), and everything
//! the replicator wants done comes out of [`Replicator::poll_action`] — messages to send, peers to
//! drop, events for the application. It never reads a clock, opens a socket or spawns a thread;
//! the feeds' storage is the only I/O, and it goes through the [`Storage`] trait. The same code
//! therefore runs under the real synchronizer and under the deterministic simulation in
//! `crate::sim`, where a failing seed replays exactly.
//!
//! # What it does
//! - **Channels**: the connection's initiator opens a channel for each of its feeds with a
//!   capability bound to the session; the responder answers only `Open`s whose capability
//!   verifies, so a peer without a feed's public key learns nothing about it and gets nothing.
//! - **Have/want**: per feed and per peer it keeps the peer's haves as a sparse run set
//!   ([`RangeSet`], capped at [`Config::max_peer_runs`] runs), and our own bitfield lives in the
//!   feed. Nothing is sized by an index a peer names: `Have{0..2^48}` is one run. A peer's wants
//!   are checked and dropped (nothing uses them). Stored blocks are announced to every peer of
//!   the feed, split into as many `Have`s as the frame limit needs; blocks given up with
//!   [`Replicator::forget`] are gathered and announced as coalesced `Unhave` runs.
//! - **Scheduling** runs on a tick, and on a message that can change the plan: solicited data or
//!   `NoData`, a new verified status, a lost peer at once; a changed `Have`/`Unhave` at most once
//!   per tick (later ones wait for the tick). A message that changes nothing (a ping, a repeated
//!   have, unsolicited data) costs O(1) and plans nothing, so a frame full of them is no CPU
//!   amplifier. Every wanted block that nobody is fetching is asked of a peer that has it,
//!   the one with the fewest requests in flight; a peer's pipelining window grows while its
//!   answers come back as fast as its best round trip, shrinks as they start to queue, and halves
//!   on a timeout. Each node scans for missing blocks from its own seeded offset, so the readers
//!   of a swarm start on disjoint blocks. Blocks are taken rarest-first (seeded random tie-break,
//!   so readers in a swarm fetch different blocks and then serve each other), or in order with a
//!   bounded look-ahead when a reassembly store needs them that way (no request reaches more
//!   than `max_ahead` blocks past the first missing one).
//! - **Uploads**: peers' requests queue per peer; the driver pulls answers with
//!   [`Replicator::poll_upload`] when that peer's connection has room, blocks never uploaded to
//!   anyone first. The simulator drives the same call.
//! - **Timeouts and idle peers**: a request unanswered after the peer's RTO (smoothed RTT + 4 x
//!   variance, as in TCP) expires: its blocks are asked of someone else and it is withdrawn with
//!   `Cancel`. A peer is dropped when it has sent nothing at all for `idle_timeout` ticks (we
//!   ping every `ping_interval`, so a live peer always has something to say), or when
//!   `max_strikes` of its requests expired in a row without one answer (it talks but never
//!   delivers). Having requests pending is not part of either rule.
//! - **Misbehaviour**: a peer whose data fails verification is dropped and banned for the
//!   session; a peer that breaks the protocol is dropped. Unsolicited or duplicate data is ignored.
//! - **Live**: local appends are announced once durable (status + have; see `commit.rs`: one
//!   flush covers every append since the last message, before anything leaves); peers announcing a longer
//!   signed length are asked for an upgrade, then for the new blocks.
//! - **Loss**: status, have and unanswered opens are re-sent every `announce_interval` ticks, so a
//!   lost message delays but never stalls replication.
//!
//! # Layout
//! - `mod.rs` (this file): the public surface — [`Config`], [`Action`], [`Event`],
//!   [`BanReason`], [`StorageFailure`], the `handle_*` inputs, [`Replicator::poll_action`] and
//!   [`Replicator::poll_upload`] — and the per-feed and per-peer state they share.
//! - `channels.rs`: opening channels, capabilities, status and have announcements (one
//!   `broadcast` to every peer of a feed), and the peer's status/have/want.
//! - `congestion.rs`: the round-trip estimator and the pipelining window of one peer.
//! - `requests.rs`: our requests in flight, answers (`on_data`, `on_no_data`), cancels, expiry.
//! - `schedule.rs`: a pure planner (our bitfield and a `PeerSlot` per peer in, requests out),
//!   unit-tested on its own, and the glue that feeds it.
//! - `upload.rs`: the per-peer upload queue and serving answers piece by piece.
//! - `config.rs`: [`Config`], the tuning knobs and caps.
//! - `limits.rs`: what a peer can make us hold or do: the replanning rule, coalesced `Unhave`s,
//!   and [`Footprint`], the count of entries held (what the hostile simulation budgets).

mod channels;
mod commit;
mod config;
mod congestion;
mod limits;
mod requests;
mod schedule;
mod upload;

use crate::core::bitfield::Bitfield;
use crate::core::error::FeedError;
use crate::core::feed::Feed;
use crate::core::rangeset::RangeSet;
use crate::core::storage::Storage;
use channels::Channel;
pub use config::Config;
use congestion::Congestion;
use feedsync_protocol::{Close, GoodbyeReason, Hello, Message, Open, PROTOCOL_VERSION, Ping, Want};
pub use limits::Footprint;
use requests::Pending;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use upload::Queued;

/// Identifies a peer for the whole session (the caller maps node identities to these, so that a
/// banned node stays banned across reconnects).
pub type PeerId = u64;

/// Most requests one peer may have waiting for upload (well above the largest window).
const MAX_QUEUED_REQUESTS: usize = 1024;

/// Handle of a feed added with [`Replicator::add_feed`]; also our channel number for it.
pub type FeedId = usize;

/// Something the replicator wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `message` to `peer`.
    Send {
        /// Recipient.
        peer: PeerId,
        /// What to send.
        message: Message,
    },
    /// Say goodbye to `peer` and close the connection.
    Disconnect {
        /// The peer to drop.
        peer: PeerId,
        /// Why.
        reason: GoodbyeReason,
    },
    /// Something the application may care about.
    Event(Event),
}

/// Application-level events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Verified blocks `index..index + count` of `feed` were stored.
    Downloaded {
        /// The feed.
        feed: FeedId,
        /// First block.
        index: u64,
        /// Number of blocks.
        count: u64,
        /// The peer that sent them (who serves whom, for per-peer accounting).
        peer: PeerId,
        /// Their total size in bytes.
        bytes: u64,
    },
    /// `feed` now trusts a signed tree of `length` blocks.
    Upgraded {
        /// The feed.
        feed: FeedId,
        /// New trusted length.
        length: u64,
    },
    /// `peer` sent data that failed verification and is banned for this session.
    Banned {
        /// The peer.
        peer: PeerId,
        /// What was wrong.
        reason: BanReason,
    },
    /// Storing or reading a feed failed locally (not the peer's fault).
    StorageError {
        /// The feed.
        feed: FeedId,
        /// What failed (its `Display` is the storage error's message).
        error: StorageFailure,
    },
    /// A block we hold no longer matches its verified hash (its bytes changed underneath, e.g.
    /// a shared file was edited). It was not served; the application should look again.
    DataChanged {
        /// The feed.
        feed: FeedId,
        /// The block.
        index: u64,
    },
    /// A peer proved, with our own signature, a history of `feed` (which we write) that we no
    /// longer hold: a longer signed length, or a different tree at a length we hold. The disk
    /// lost announced appends (it acknowledged a flush it did not make). Appending to `feed` is
    /// refused from now on: signing again at those lengths would fork every replica.
    LostHistory {
        /// The feed.
        feed: FeedId,
        /// Our length.
        ours: u64,
        /// The length the peer proved.
        theirs: u64,
    },
    /// Verified blocks `index..index + count` of `feed` were handed to `peer`'s connection
    /// (the serving side's count: what a peer fetched, as seen by the one who sent it).
    Uploaded {
        /// The peer.
        peer: PeerId,
        /// The feed.
        feed: FeedId,
        /// First block.
        index: u64,
        /// Number of blocks.
        count: u64,
        /// Their total size in bytes.
        bytes: u64,
    },
}

/// Why a peer was banned: what it sent failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BanReason {
    /// A status whose signature does not verify for the length it claims.
    #[error("forged status signature for length {length}")]
    ForgedStatus {
        /// The length it claimed.
        length: u64,
    },
    /// Blocks or proofs that failed verification (the kind of tampering says which).
    #[error("{0}")]
    BadData(crate::core::VerifyError),
}

/// A local storage failure reported in [`Event::StorageError`]: the I/O error kind when there
/// was one, and the message. Typed (not a `String`) so an application can tell a full disk from
/// a permission problem, and still `Clone + Eq` so events stay comparable in tests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StorageFailure {
    /// The I/O error kind, when the failure was an I/O error.
    pub kind: Option<std::io::ErrorKind>,
    /// The failure as the feed reported it.
    pub message: String,
}

impl From<&FeedError> for StorageFailure {
    fn from(e: &FeedError) -> Self {
        Self {
            kind: match e {
                FeedError::Io(io) => Some(io.kind()),
                _ => None,
            },
            message: e.to_string(),
        }
    }
}

/// One feed being replicated.
struct FeedSlot<S: Storage> {
    feed: Feed<S>,
    discovery_key: [u8; 32],
    /// Fetch every block of the newest signed length.
    download: bool,
    /// Highest signed length any peer proved to us (by a verified status).
    best_length: u64,
    /// Some peer proved its signed length to us this session (even one no longer than ours):
    /// only then does "complete" mean "up to date with a peer", not "nothing heard yet".
    proved: bool,
    /// Live (unexpired) requests per block.
    in_flight: BTreeMap<u64, u32>,
    /// The peer and request id of the upgrade in flight.
    upgrade_in_flight: Option<(PeerId, u64)>,
    /// Blocks we have uploaded to anyone this session (a subset of what we hold, kept sparse:
    /// our own length is a writer's signed number, and a hostile writer can sign 2^48).
    uploaded: RangeSet,
    /// Blocks given up by [`Replicator::forget`] and not yet announced: sent as coalesced
    /// `Unhave` runs before the next message goes out.
    unhave: RangeSet,
    /// Blocks stored and not yet announced: sent as coalesced `Have` runs on the next tick.
    have_pending: RangeSet,
    /// Where the next unordered scan starts (`None`: at this node's seeded offset).
    cursor: Option<u64>,
    /// Only these blocks are fetched (`None`: all). A shared folder wants the blocks of its
    /// newest files, not every version it ever held.
    want: Option<Bitfield>,
    /// Fetch in order (overrides [`Config::ordered`] for this feed).
    ordered: bool,
    /// A feed we write: appends not yet durable, so not yet announced.
    dirty: bool,
    /// A feed we write: the length, and the signed tree at it, that the last successful
    /// [`Replicator::commit`] made durable. Nothing beyond it is ever said to a peer.
    durable: Option<(u64, crate::core::crypto::Hash, [u8; 64])>,
    /// The last sync of this feed failed (reported once until one succeeds).
    sync_failed: bool,
    /// Feeds that must be durable before this one is synced ([`Replicator::sync_before`]).
    sync_after: Vec<FeedId>,
    /// A peer proved history we lost: appending is refused (see [`Event::LostHistory`]).
    lost_history: bool,
}

/// One connected peer.
struct PeerState {
    handshake_hash: Vec<u8>,
    /// We initiated the connection.
    initiator: bool,
    version: Option<u32>,
    channels: BTreeMap<FeedId, Channel>,
    /// Remote channel number -> feed.
    remote_channels: BTreeMap<u32, FeedId>,
    /// Our requests to it, by id.
    requests: BTreeMap<u64, Pending>,
    /// The peer's requests waiting for our uplink, bounded by `MAX_QUEUED_REQUESTS`.
    uploads: VecDeque<Queued>,
    /// Blocks whose copy we declined to send this peer because another peer announced them
    /// (see `upload.rs`): declined once, served if asked again. Capped in runs.
    redirected: RangeSet,
    /// Blocks asked for and not yet answered or expired (the window is counted in blocks, so a
    /// range request takes as many slots as it has blocks).
    live: u32,
    /// Round trip and window.
    congestion: Congestion,
    /// When the peer last sent anything at all (pings keep a live peer talking).
    last_heard: u64,
    /// Requests that expired since the peer last answered one: a peer that talks but never
    /// delivers is dropped after `Config::max_strikes`.
    strikes: u32,
    last_ping: u64,
    /// `Open`s for feeds we did not have when they came (a folder clone learns its content
    /// feed's key from metadata a moment later); answered if we add the feed. Bounded.
    unanswered: VecDeque<Open>,
}

/// Runs of declined copies remembered per peer (see `PeerState::redirected`).
const MAX_REDIRECT_RUNS: usize = 1024;

/// Unanswered `Open`s kept per peer.
const MAX_UNANSWERED_OPENS: usize = 32;

/// The replication engine for one node. See the module docs.
pub struct Replicator<S: Storage> {
    config: Config,
    feeds: Vec<FeedSlot<S>>,
    peers: BTreeMap<PeerId, PeerState>,
    banned: BTreeSet<PeerId>,
    now: u64,
    last_announce: u64,
    next_request_id: u64,
    actions: VecDeque<Action>,
    /// Something happened that must be planned at once (see `limits.rs`).
    replan_urgent: bool,
    /// A peer's haves changed: planned at most once per tick.
    replan_soon: bool,
    /// The tick of the last plan a have change triggered.
    last_soon_plan: Option<u64>,
    /// Scheduling passes run (diagnostics; see [`Replicator::schedule_passes`]).
    schedule_passes: u64,
    /// Some feed has `unhave` blocks waiting to be announced.
    unhave_pending: bool,
    /// Some feed has `have_pending` blocks waiting to be announced.
    have_pending: bool,
    /// Some feed we write has appends waiting for [`Replicator::commit`].
    dirty_any: bool,
    /// A sync failed: the next attempt waits for this tick (no flush storm per message).
    commit_retry_at: u64,
}

/// SplitMix64: a tiny deterministic mixer for tie-breaks and jitter.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl<S: Storage> Replicator<S> {
    /// A replicator with no feeds and no peers.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            feeds: Vec::new(),
            peers: BTreeMap::new(),
            banned: BTreeSet::new(),
            now: 0,
            last_announce: 0,
            next_request_id: 1,
            actions: VecDeque::new(),
            replan_urgent: false,
            replan_soon: false,
            last_soon_plan: None,
            schedule_passes: 0,
            unhave_pending: false,
            have_pending: false,
            dirty_any: false,
            commit_retry_at: 0,
        }
    }

    /// Adds a feed to replicate. With `download`, every block of the newest signed length is
    /// fetched (a writer never downloads its own feed). A feed we write is announced only
    /// after the first [`Replicator::commit`] made what it holds durable (its store may hold
    /// appends of a killed process that never reached the disk).
    pub fn add_feed(&mut self, feed: Feed<S>, download: bool) -> FeedId {
        let id = self.feeds.len();
        let discovery_key = feed.discovery_key();
        let writable = feed.is_writable();
        let download = download && !writable;
        let best_length = feed.len();
        self.dirty_any |= writable;
        self.feeds.push(FeedSlot {
            feed,
            discovery_key,
            download,
            best_length,
            proved: false,
            in_flight: BTreeMap::new(),
            upgrade_in_flight: None,
            uploaded: RangeSet::new(),
            unhave: RangeSet::new(),
            have_pending: RangeSet::new(),
            cursor: None,
            want: None,
            ordered: self.config.ordered,
            dirty: writable,
            durable: None,
            sync_failed: false,
            sync_after: Vec::new(),
            lost_history: false,
        });
        self.open_new_feed(id);
        id
    }

    /// The feed behind `id`.
    pub fn feed(&self, id: FeedId) -> &Feed<S> {
        &self.feeds[id].feed
    }

    /// The feed behind `id`, mutably (for reads that need storage access).
    pub fn feed_mut(&mut self, id: FeedId) -> &mut Feed<S> {
        &mut self.feeds[id].feed
    }

    /// Number of feeds.
    pub fn feed_count(&self) -> usize {
        self.feeds.len()
    }

    /// Whether `feed` holds every block it wants of the newest signed length any peer proved.
    pub fn is_complete(&self, feed: FeedId) -> bool {
        let slot = &self.feeds[feed];
        if slot.feed.len() < slot.best_length {
            return false;
        }
        let have = slot.feed.bitfield();
        match &slot.want {
            None => have.first_unset(0) >= slot.feed.len(),
            Some(want) => {
                let mut i = 0;
                while let Some(w) = want.first_set(i) {
                    if !have.get(w) {
                        return false;
                    }
                    i = w + 1;
                }
                true
            }
        }
    }

    /// Whether some peer proved its signed length of `feed` to us this session. With
    /// [`Replicator::is_complete`] this says "as new as the newest version a peer proved".
    pub fn peer_proved(&self, feed: FeedId) -> bool {
        self.feeds[feed].proved
    }

    /// Restricts downloading `feed` to the blocks set in `want` (`None`: every block), and
    /// schedules at once. Blocks already held are not affected.
    pub fn set_want(&mut self, feed: FeedId, want: Option<Bitfield>) {
        let slot = &mut self.feeds[feed];
        slot.want = want;
        slot.cursor = None;
        if slot.download {
            self.schedule_blocks(feed);
        }
    }

    /// Fetches `feed` in order (from the first missing block, at most `max_ahead` ahead) or
    /// rarest-first. A reader reassembling files prefers order: each file's hash is computed
    /// as it arrives instead of read back at the end.
    pub fn set_ordered(&mut self, feed: FeedId, ordered: bool) {
        self.feeds[feed].ordered = ordered;
    }

    /// Peers currently connected.
    pub fn peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.peers.keys().copied()
    }

    /// Whether `peer` opened at least one channel whose capability verified: it knows a key we
    /// serve. A peer without one is a stranger, and the first to go when connections run short.
    pub fn has_channel(&self, peer: PeerId) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|p| !p.remote_channels.is_empty())
    }

    /// Whether some connected peer opened a channel on `feed`: it is being replicated with
    /// someone. (A node uses a relay for a feed only while this is false.)
    pub fn has_peer_on(&self, feed: FeedId) -> bool {
        self.peers
            .values()
            .any(|p| p.remote_channels.values().any(|&f| f == feed))
    }

    /// Whether `peer` was banned this session.
    pub fn is_banned(&self, peer: PeerId) -> bool {
        self.banned.contains(&peer)
    }

    /// Whether actions are waiting to be polled.
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty() || self.unhave_pending || self.commit_due()
    }

    /// The next thing to do, if any. Call until `None` after every input. Feeds we write are
    /// committed first ([`Replicator::commit`]): whatever this returns reveals only durable
    /// lengths and blocks.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.commit();
        self.flush_unhaves();
        self.actions.pop_front()
    }

    /// The next answer to upload to `peer`, if it has requests waiting: one message (a piece of
    /// at most `MAX_DATA_BYTES` of blocks, or `NoData`). Call whenever `peer`'s connection can
    /// take another message; requests for blocks never uploaded to anyone go first, and for a
    /// short while this returns `None` while *another* peer waits for such a block (see
    /// `upload.rs`): serve the other connections, and ask again for this one on the next round
    /// or tick. Blocks handed out are reported as [`Event::Uploaded`] through
    /// [`Replicator::poll_action`].
    pub fn poll_upload(&mut self, peer: PeerId) -> Option<Vec<Message>> {
        self.poll_upload_limited(peer, feedsync_protocol::MAX_DATA_BYTES)
    }

    /// [`Replicator::poll_upload`] with a piece of at most `max_bytes` of blocks (one block
    /// always fits): a connection whose budget is short (a slow or shared uplink, see
    /// [`crate::core::pacing`]) takes small pieces, so the next piece is chosen later, when
    /// the swarm has moved on.
    pub fn poll_upload_limited(&mut self, peer: PeerId, max_bytes: usize) -> Option<Vec<Message>> {
        self.commit();
        let pos = self.next_in_queue(peer)?;
        if let Some(no_data) = self.redirect(peer, pos) {
            return Some(vec![no_data]);
        }
        self.serve_queued(peer, pos, max_bytes)
    }

    /// Whether any peer has requests waiting for upload.
    pub fn has_uploads(&self) -> bool {
        self.peers.values().any(|p| !p.uploads.is_empty())
    }

    fn send(&mut self, peer: PeerId, message: Message) {
        // Blocks given up go out before anything said after giving them up (a later `Have` of
        // the same block must not be overtaken by its `Unhave`).
        self.flush_unhaves();
        self.actions.push_back(Action::Send { peer, message });
    }

    fn event(&mut self, event: Event) {
        self.actions.push_back(Action::Event(event));
    }

    fn drop_peer(&mut self, peer: PeerId, reason: GoodbyeReason) {
        if self.peers.contains_key(&peer) {
            self.forget_peer(peer);
            self.actions.push_back(Action::Disconnect { peer, reason });
        }
    }

    /// A connection to `peer` is up. `handshake_hash` binds capabilities to this session;
    /// `initiator` says whether we dialled.
    pub fn handle_connected(&mut self, peer: PeerId, handshake_hash: &[u8], initiator: bool) {
        if self.banned.contains(&peer) {
            self.actions.push_back(Action::Disconnect {
                peer,
                reason: GoodbyeReason::BadData,
            });
            return;
        }
        if self.peers.contains_key(&peer) {
            self.forget_peer(peer);
        }
        self.peers.insert(
            peer,
            PeerState {
                handshake_hash: handshake_hash.to_vec(),
                initiator,
                version: None,
                channels: BTreeMap::new(),
                remote_channels: BTreeMap::new(),
                requests: BTreeMap::new(),
                uploads: VecDeque::new(),
                redirected: RangeSet::with_cap(MAX_REDIRECT_RUNS),
                live: 0,
                congestion: Congestion::new(self.config.initial_window),
                last_heard: self.now,
                strikes: 0,
                last_ping: self.now,
                unanswered: VecDeque::new(),
            },
        );
        self.send(
            peer,
            Message::Hello(Hello {
                version: PROTOCOL_VERSION,
                features: 0,
                agent: concat!("feedsync/", env!("CARGO_PKG_VERSION")).into(),
            }),
        );
        if initiator {
            for feed in 0..self.feeds.len() {
                self.send_open(peer, feed);
            }
        }
    }

    /// The connection to `peer` is gone.
    pub fn handle_disconnected(&mut self, peer: PeerId) {
        self.forget_peer(peer);
        self.schedule();
    }

    /// Logical time passed: expire requests, drop idle peers, re-announce, ping, schedule.
    pub fn handle_tick(&mut self, now: u64) {
        self.now = now.max(self.now);
        let now = self.now;
        self.expire_requests();
        // The idle rule (see the module docs): silence, or strikes, never "requests pending".
        let idle: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                now.saturating_sub(p.last_heard) > self.config.idle_timeout
                    || p.strikes >= self.config.max_strikes
            })
            .map(|(id, _)| *id)
            .collect();
        for peer in idle {
            self.drop_peer(peer, GoodbyeReason::Timeout);
        }
        self.flush_haves();
        if now.saturating_sub(self.last_announce) >= self.config.announce_interval {
            self.last_announce = now;
            self.reannounce();
        }
        let ping_due: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| now.saturating_sub(p.last_ping) >= self.config.ping_interval)
            .map(|(id, _)| *id)
            .collect();
        for peer in ping_due {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.last_ping = now;
            }
            self.send(peer, Message::Ping(Ping { nonce: now }));
        }
        self.schedule();
    }

    /// A message from `peer`.
    pub fn handle_message(&mut self, peer: PeerId, message: Message) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        state.last_heard = self.now;
        let result = match message {
            Message::Hello(h) => self.on_hello(peer, h),
            Message::Open(o) => self.on_open(peer, o),
            Message::Close(Close { channel }) => {
                self.with_channel(peer, channel, |ch| ch.remote = None);
                Ok(())
            }
            Message::Status(s) => self.on_status(peer, s),
            Message::Have(h) => self.on_have(peer, h.channel, &h.blocks, true, false),
            Message::Unhave(h) => self.on_have(peer, h.channel, &h.blocks, false, false),
            Message::Want(Want { channel, blocks }) => {
                self.on_have(peer, channel, &blocks, true, true)
            }
            Message::Unwant(Want { channel, blocks }) => {
                self.on_have(peer, channel, &blocks, false, true)
            }
            Message::Request(r) => self.on_request(peer, r),
            Message::Cancel(c) => {
                self.on_cancel(peer, c);
                Ok(())
            }
            Message::Data(d) => self.on_data(peer, d),
            Message::NoData(n) => self.on_no_data(peer, n),
            Message::Ping(p) => {
                self.send(peer, Message::Pong(p));
                Ok(())
            }
            Message::Pong(_) => Ok(()),
            Message::Goodbye(_) => {
                self.forget_peer(peer);
                self.actions.push_back(Action::Disconnect {
                    peer,
                    reason: GoodbyeReason::Done,
                });
                Ok(())
            }
        };
        if let Err(reason) = result {
            self.drop_peer(peer, reason);
        }
        self.replan_if_due();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storage_failure_keeps_the_io_kind_and_the_message() {
        let io = FeedError::Io(std::io::Error::new(std::io::ErrorKind::StorageFull, "disk"));
        let failure = StorageFailure::from(&io);
        assert_eq!(failure.kind, Some(std::io::ErrorKind::StorageFull));
        assert_eq!(failure.to_string(), io.to_string());
        let corrupt = FeedError::Corrupt("bad header".into());
        let failure = StorageFailure::from(&corrupt);
        assert_eq!(failure.kind, None);
        assert_eq!(failure.to_string(), "store is corrupt: bad header");
    }
}
