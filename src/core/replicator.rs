//! The replicator: the sans-IO protocol engine that keeps any number of feeds in sync with any
//! number of peers.
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
//! - **Have/want**: per feed and per peer it keeps the peer's have and want bitmaps, and our own
//!   bitfield lives in the feed. Stored blocks are announced to every peer of the feed.
//! - **Scheduling**: every wanted block that nobody is fetching is asked of a peer that has it,
//!   the one with the fewest requests in flight; a peer's pipelining window grows while its
//!   answers come back as fast as its best round trip, shrinks as they start to queue, and halves
//!   on a timeout. Each node scans for missing blocks from its own seeded offset, so the readers
//!   of a swarm start on disjoint blocks. Blocks are taken rarest-first (seeded random tie-break,
//!   so readers in a swarm fetch different blocks and then serve each other), or in order with a
//!   bounded look-ahead when a reassembly store needs them that way.
//! - **Timeouts**: a request unanswered after the peer's RTO (smoothed RTT + 4 x variance, as in
//!   TCP) is asked of someone else; a peer with requests pending and no answer for `idle_timeout`
//!   ticks is dropped.
//! - **Misbehaviour**: a peer whose data fails verification is dropped and banned for the
//!   session; a peer that breaks the protocol is dropped. Unsolicited or duplicate data is ignored.
//! - **Live**: local appends are announced at once (status + have); peers announcing a longer
//!   signed length are asked for an upgrade, then for the new blocks.
//! - **Loss**: status, have and unanswered opens are re-sent every `announce_interval` ticks, so a
//!   lost message delays but never stalls replication.

use crate::core::bitfield::{Bitfield, block_set_ranges};
use crate::core::crypto;
use crate::core::error::FeedError;
use crate::core::feed::{Feed, Proof};
use crate::core::storage::Storage;
use feedsync_protocol::{
    Block, BlockSet, Close, Data, GoodbyeReason, Have, Hello, MAX_DATA_BYTES, Message, NoData,
    Open, PROTOCOL_VERSION, Ping, Request, Status, Want,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Identifies a peer for the whole session (the caller maps node identities to these, so that a
/// banned node stays banned across reconnects).
pub type PeerId = u64;

/// Most requests one peer may have waiting for upload (well above the largest window).
const MAX_QUEUED_REQUESTS: usize = 1024;

/// Handle of a feed added with [`Replicator::add_feed`]; also our channel number for it.
pub type FeedId = usize;

/// Tuning knobs, in ticks (the caller decides how long a tick is; the synchronizer uses 10 ms).
#[derive(Debug, Clone)]
pub struct Config {
    /// Fetch blocks in index order (for a reassembly store) instead of rarest-first.
    pub ordered: bool,
    /// In ordered mode, how far past the first missing block requests may reach.
    pub max_ahead: u64,
    /// Requests in flight to a new peer.
    pub initial_window: u32,
    /// Most requests in flight to one peer.
    pub max_window: u32,
    /// Lower bound of the request timeout.
    pub min_request_timeout: u64,
    /// Upper bound of the request timeout.
    pub max_request_timeout: u64,
    /// A peer that sends nothing at all for this long is dropped (we ping every
    /// `ping_interval`, so a live peer always has something to say).
    pub idle_timeout: u64,
    /// A peer whose requests expire this many times in a row, without one answer, is dropped.
    pub max_strikes: u32,
    /// Re-send status, haves and unanswered opens this often.
    pub announce_interval: u64,
    /// Ping a quiet peer this often.
    pub ping_interval: u64,
    /// Most block indices examined per scheduling pass and feed.
    pub scan_limit: u64,
    /// Most blocks asked for in one request (a contiguous range held by one peer).
    pub max_request_blocks: u64,
    /// Seed for tie-breaks (make it differ between nodes).
    pub seed: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ordered: false,
            max_ahead: 1024,
            initial_window: 8,
            max_window: 256,
            min_request_timeout: 20,
            max_request_timeout: 1000,
            idle_timeout: 3000,
            max_strikes: 16,
            announce_interval: 100,
            ping_interval: 500,
            scan_limit: 8192,
            max_request_blocks: 16,
            seed: 0,
        }
    }
}

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
        /// The error.
        error: String,
    },
    /// A block we hold no longer matches its verified hash (its bytes changed underneath, e.g.
    /// a shared file was edited). It was not served; the application should look again.
    DataChanged {
        /// The feed.
        feed: FeedId,
        /// The block.
        index: u64,
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
    /// Live requests per block.
    in_flight: BTreeMap<u64, u32>,
    /// The peer and request id of the upgrade in flight.
    upgrade_in_flight: Option<(PeerId, u64)>,
    /// Blocks we have uploaded to anyone this session.
    uploaded: Bitfield,
    /// Where the next unordered scan starts (`None`: at this node's seeded offset).
    cursor: Option<u64>,
    /// Only these blocks are fetched (`None`: all). A shared folder wants the blocks of its
    /// newest files, not every version it ever held.
    want: Option<Bitfield>,
    /// Fetch in order (overrides [`Config::ordered`] for this feed).
    ordered: bool,
}

#[derive(Default)]
struct Channel {
    /// We sent our `Open`.
    opened: bool,
    /// The remote's channel number, once its `Open` verified.
    remote: Option<u32>,
    have: Bitfield,
    want: Bitfield,
    /// The remote's verified signed length.
    length: u64,
}

impl Channel {
    fn is_open(&self) -> bool {
        self.opened && self.remote.is_some()
    }
}

/// A request we sent and have not had (all of) the answer to.
#[derive(Clone, Copy)]
struct Pending {
    feed: FeedId,
    index: u64,
    count: u64,
    /// Our trusted length when asked: the proof is relative to it.
    length: u64,
    upgrade: bool,
    sent_at: u64,
    /// Timed out: its blocks were released for others, but a late answer is still welcome.
    expired: bool,
}

impl Pending {
    /// Window slots the request occupies: one per block (an upgrade-only request counts one).
    fn weight(&self) -> u32 {
        (self.count as u32).max(1)
    }
}

struct PeerState {
    handshake_hash: Vec<u8>,
    /// We initiated the connection.
    initiator: bool,
    version: Option<u32>,
    channels: BTreeMap<FeedId, Channel>,
    /// Remote channel number -> feed.
    remote_channels: BTreeMap<u32, FeedId>,
    requests: BTreeMap<u64, Pending>,
    /// The peer's requests waiting for our uplink, bounded by `MAX_QUEUED_REQUESTS`.
    uploads: VecDeque<(FeedId, Request)>,
    /// Blocks asked for and not yet answered or expired (the window is counted in blocks, so a
    /// range request takes as many slots as it has blocks).
    live: u32,
    /// Pipelining window in blocks (fractional so it can grow by 1/window per answer).
    window: f64,
    srtt: Option<f64>,
    rttvar: f64,
    /// Lowest round trip seen: the peer's answer time with nothing queued.
    min_rtt: f64,
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

/// Unanswered `Open`s kept per peer.
const MAX_UNANSWERED_OPENS: usize = 32;

impl PeerState {
    fn request_timeout(&self, config: &Config) -> u64 {
        let rto = match self.srtt {
            Some(srtt) => (srtt + 4.0 * self.rttvar).ceil() as u64,
            None => config.min_request_timeout * 5,
        };
        rto.clamp(config.min_request_timeout, config.max_request_timeout)
    }

    /// An answer arrived: the peer is making progress.
    fn progress(&mut self) {
        self.strikes = 0;
    }

    fn free(&self) -> u32 {
        (self.window as u32).saturating_sub(self.live)
    }

    /// Delay-based window control (in the spirit of TCP Vegas / LEDBAT): grow while answers come
    /// back about as fast as the quickest one ever did, shrink once they queue up. A peer then
    /// holds roughly its bandwidth-delay product of our requests, which keeps a busy seeder's
    /// queue short, so readers in a swarm fetch from each other instead of all from the seeder.
    /// `blocks` is how many blocks the answer carried: the window moves by that many steps.
    fn adapt_window(&mut self, rtt: f64, blocks: u64, max: u32) {
        self.min_rtt = self.min_rtt.min(rtt);
        let step = blocks.max(1) as f64 / self.window;
        if rtt <= self.min_rtt * 2.0 + 2.0 {
            self.window = (self.window + step).min(f64::from(max));
        } else {
            self.window = (self.window - step).max(1.0);
        }
    }

    fn sample_rtt(&mut self, rtt: f64) {
        // RFC 6298 smoothing.
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2.0;
            }
            Some(srtt) => {
                self.rttvar = 0.75 * self.rttvar + 0.25 * (srtt - rtt).abs();
                self.srtt = Some(0.875 * srtt + 0.125 * rtt);
            }
        }
    }
}

/// The replication engine for one node. See the module docs.
pub struct Replicator<S: Storage> {
    config: Config,
    feeds: Vec<FeedSlot<S>>,
    peers: BTreeMap<PeerId, PeerState>,
    banned: BTreeSet<PeerId>,
    now: u64,
    last_announce: u64,
    next_request_id: u64,
    /// Round-robin position of [`Replicator::next_upload`].
    last_upload_peer: PeerId,
    actions: VecDeque<Action>,
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
            last_upload_peer: 0,
            actions: VecDeque::new(),
        }
    }

    /// Adds a feed to replicate. With `download`, every block of the newest signed length is
    /// fetched (a writer never downloads its own feed).
    pub fn add_feed(&mut self, feed: Feed<S>, download: bool) -> FeedId {
        let id = self.feeds.len();
        let discovery_key = feed.discovery_key();
        let download = download && !feed.is_writable();
        let best_length = feed.len();
        self.feeds.push(FeedSlot {
            feed,
            discovery_key,
            download,
            best_length,
            proved: false,
            in_flight: BTreeMap::new(),
            upgrade_in_flight: None,
            uploaded: Bitfield::new(),
            cursor: None,
            want: None,
            ordered: self.config.ordered,
        });
        let peers: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.initiator)
            .map(|(id, _)| *id)
            .collect();
        for peer in peers {
            self.send_open(peer, id);
        }
        // Peers that asked for this feed before we had it get their answer now.
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

    /// Gives up blocks we can no longer serve (a shared file changed under us): they leave our
    /// bitfield and every peer is told `Unhave`, so nobody asks us for them again.
    pub fn forget(&mut self, feed: FeedId, range: std::ops::Range<u64>) -> Result<(), FeedError> {
        if range.is_empty() {
            return Ok(());
        }
        self.feeds[feed].feed.forget(range.clone())?;
        for peer in self.feed_peers(feed) {
            self.send(
                peer,
                Message::Unhave(Have {
                    channel: feed as u32,
                    blocks: BlockSet::Range {
                        start: range.start,
                        count: range.end - range.start,
                    },
                }),
            );
        }
        Ok(())
    }

    /// Peers currently connected.
    pub fn peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.peers.keys().copied()
    }

    /// Whether `peer` was banned this session.
    pub fn is_banned(&self, peer: PeerId) -> bool {
        self.banned.contains(&peer)
    }

    /// Whether actions are waiting to be polled.
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    /// The next thing to do, if any. Call until `None` after every input.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    fn send(&mut self, peer: PeerId, message: Message) {
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
                live: 0,
                window: f64::from(self.config.initial_window),
                srtt: None,
                rttvar: 0.0,
                min_rtt: f64::INFINITY,
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

    fn forget_peer(&mut self, peer: PeerId) {
        let Some(state) = self.peers.remove(&peer) else {
            return;
        };
        for (id, req) in state.requests {
            if !req.expired {
                self.release(&req);
            }
            if self.feeds[req.feed].upgrade_in_flight == Some((peer, id)) {
                self.feeds[req.feed].upgrade_in_flight = None;
            }
        }
    }

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

    /// Withdraws our request `id` from `peer`.
    fn cancel(&mut self, peer: PeerId, feed: FeedId, id: u64) {
        let message = Message::Cancel(feedsync_protocol::Cancel {
            channel: feed as u32,
            id,
        });
        self.send(peer, message);
    }

    fn send_open(&mut self, peer: PeerId, feed: FeedId) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        let slot = &self.feeds[feed];
        let capability = crypto::capability(
            &slot.feed.public_key(),
            &state.handshake_hash,
            state.initiator,
        );
        state.channels.entry(feed).or_default().opened = true;
        let message = Message::Open(Open {
            channel: feed as u32,
            discovery_key: slot.discovery_key,
            capability,
        });
        self.send(peer, message);
    }

    /// Status and have for `feed`, to `peer`.
    fn announce(&mut self, peer: PeerId, feed: FeedId) {
        let slot = &self.feeds[feed];
        let mut out = Vec::with_capacity(2);
        if let Some((length, tree_hash, signature)) = slot.feed.signed_tree() {
            out.push(Message::Status(Status {
                channel: feed as u32,
                length,
                tree_hash,
                signature,
            }));
        }
        if slot.feed.bitfield().count() > 0 {
            out.push(Message::Have(Have {
                channel: feed as u32,
                blocks: slot.feed.bitfield().to_block_set(),
            }));
        }
        for m in out {
            self.send(peer, m);
        }
    }

    /// Peers with an open channel for `feed`.
    fn feed_peers(&self, feed: FeedId) -> Vec<PeerId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.channels.get(&feed).is_some_and(Channel::is_open))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Appends blocks to a feed we write, and tells every peer at once.
    pub fn append<B: AsRef<[u8]>>(&mut self, feed: FeedId, blocks: &[B]) -> Result<u64, FeedError> {
        self.append_inner(feed, blocks, None)
    }

    /// [`Replicator::append`] with the blocks' leaf hashes already computed (see
    /// [`Feed::append_batch_hashed`]).
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
        let start = self.feeds[feed].feed.len();
        let length = match leaves {
            Some(l) => self.feeds[feed].feed.append_batch_hashed(blocks, l)?,
            None => self.feeds[feed].feed.append_batch(blocks)?,
        };
        self.feeds[feed].best_length = length;
        let (_, tree_hash, signature) = self.feeds[feed].feed.signed_tree().expect("just signed");
        for peer in self.feed_peers(feed) {
            self.send(
                peer,
                Message::Status(Status {
                    channel: feed as u32,
                    length,
                    tree_hash,
                    signature,
                }),
            );
            self.send(
                peer,
                Message::Have(Have {
                    channel: feed as u32,
                    blocks: BlockSet::Range {
                        start,
                        count: length - start,
                    },
                }),
            );
        }
        Ok(length)
    }

    /// Logical time passed: expire requests, drop idle peers, re-announce, schedule.
    pub fn handle_tick(&mut self, now: u64) {
        self.now = now.max(self.now);
        let now = self.now;
        let mut idle = Vec::new();
        let mut released = Vec::new();
        for (&peer, state) in self.peers.iter_mut() {
            let timeout = state.request_timeout(&self.config);
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
                state.window = (state.window / 2.0).max(1.0);
            }
            // Forget long-expired requests: late answers after this are simply unsolicited.
            state
                .requests
                .retain(|_, r| !r.expired || now.saturating_sub(r.sent_at) <= 4 * timeout);
            let silent = now.saturating_sub(state.last_heard) > self.config.idle_timeout;
            if silent || state.strikes >= self.config.max_strikes {
                idle.push(peer);
            }
        }
        for (peer, id, req) in released {
            self.release(&req);
            // Withdraw it, so a slow peer does not spend upload on what we will fetch elsewhere.
            self.cancel(peer, req.feed, id);
            if self.feeds[req.feed].upgrade_in_flight == Some((peer, id)) {
                self.feeds[req.feed].upgrade_in_flight = None;
            }
        }
        for peer in idle {
            self.drop_peer(peer, GoodbyeReason::Timeout);
        }
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

    fn reannounce(&mut self) {
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
                let state = self
                    .peers
                    .get_mut(&peer)
                    .expect("checked by handle_message");
                if let Some(&feed) = state.remote_channels.get(&c.channel) {
                    state.uploads.retain(|(f, r)| !(*f == feed && r.id == c.id));
                }
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
        self.schedule();
    }

    fn with_channel(
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

    fn on_hello(&mut self, peer: PeerId, hello: Hello) -> Result<(), GoodbyeReason> {
        if hello.version == 0 {
            return Err(GoodbyeReason::ProtocolError);
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            p.version = Some(hello.version.min(PROTOCOL_VERSION));
        }
        Ok(())
    }

    fn on_open(&mut self, peer: PeerId, open: Open) -> Result<(), GoodbyeReason> {
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
        let state = self
            .peers
            .get_mut(&peer)
            .expect("checked by handle_message");
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
        let ch = state.channels.entry(feed).or_default();
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

    fn on_status(&mut self, peer: PeerId, s: Status) -> Result<(), GoodbyeReason> {
        let state = self.peers.get(&peer).expect("checked by handle_message");
        let Some(&feed) = state.remote_channels.get(&s.channel) else {
            return Ok(());
        };
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
        let state = self
            .peers
            .get_mut(&peer)
            .expect("checked by handle_message");
        let ch = state.channels.entry(feed).or_default();
        ch.length = ch.length.max(s.length);
        let slot = &mut self.feeds[feed];
        slot.best_length = slot.best_length.max(s.length);
        slot.proved = true;
        Ok(())
    }

    fn on_have(
        &mut self,
        peer: PeerId,
        channel: u32,
        set: &BlockSet,
        value: bool,
        want: bool,
    ) -> Result<(), GoodbyeReason> {
        let state = self.peers.get(&peer).expect("checked by handle_message");
        let Some(&feed) = state.remote_channels.get(&channel) else {
            return Ok(());
        };
        let ranges = block_set_ranges(set, u64::MAX).ok_or(GoodbyeReason::ProtocolError)?;
        // Record only what lies inside a signed length someone proved: a have far past it may just
        // have overtaken its status (it is re-sent), and must not size a bitmap.
        let limit = self.feeds[feed]
            .best_length
            .max(self.feeds[feed].feed.len());
        let state = self
            .peers
            .get_mut(&peer)
            .expect("checked by handle_message");
        let Some(ch) = state.channels.get_mut(&feed) else {
            return Ok(());
        };
        let bits = if want { &mut ch.want } else { &mut ch.have };
        for r in ranges {
            let end = r.end.min(limit);
            if r.start < end {
                bits.set_range(r.start..end, value);
            }
        }
        Ok(())
    }

    fn on_request(&mut self, peer: PeerId, r: Request) -> Result<(), GoodbyeReason> {
        let state = self
            .peers
            .get_mut(&peer)
            .expect("checked by handle_message");
        let Some(&feed) = state.remote_channels.get(&r.channel) else {
            return Ok(());
        };
        if !state.channels.get(&feed).is_some_and(Channel::is_open) {
            return Ok(());
        }
        if state.uploads.len() >= MAX_QUEUED_REQUESTS {
            return Err(GoodbyeReason::ProtocolError); // far past any sane window
        }
        state.uploads.push_back((feed, r));
        Ok(())
    }

    /// The next answer to upload, chosen across all peers: requests for blocks never uploaded to
    /// anyone first (so a seed spends its upload on blocks the swarm lacks, not on copies), then
    /// the oldest; peers take turns. Call whenever the uplink can take another message.
    pub fn next_upload(&mut self) -> Option<(PeerId, Vec<Message>)> {
        let order: Vec<PeerId> = {
            let after = self
                .peers
                .range(self.last_upload_peer.saturating_add(1)..)
                .map(|(id, _)| *id);
            let before = self
                .peers
                .range(..=self.last_upload_peer)
                .map(|(id, _)| *id);
            after
                .chain(before)
                .filter(|id| !self.peers[id].uploads.is_empty())
                .collect()
        };
        let fresh = order.iter().find_map(|&peer| {
            let pos = self.peers[&peer]
                .uploads
                .iter()
                .position(|(feed, r)| self.is_fresh(*feed, r))?;
            Some((peer, pos))
        });
        let (peer, pos) = fresh.or_else(|| order.first().map(|&p| (p, 0)))?;
        self.last_upload_peer = peer;
        Some((peer, self.serve_queued(peer, pos)?))
    }

    /// The next answer for `peer` alone, for a driver whose connections each have their own
    /// outbound queue. Same priority as [`Replicator::next_upload`].
    pub fn poll_upload(&mut self, peer: PeerId) -> Option<Vec<Message>> {
        let queue = &self.peers.get(&peer)?.uploads;
        let pos = queue
            .iter()
            .position(|(feed, r)| self.is_fresh(*feed, r))
            .unwrap_or(0);
        self.serve_queued(peer, pos)
    }

    /// Whether a queued request asks for some block we never uploaded to anyone.
    fn is_fresh(&self, feed: FeedId, r: &Request) -> bool {
        let end = r.index.saturating_add(u64::from(r.count));
        r.count > 0 && self.feeds[feed].uploaded.count_range(r.index..end) < u64::from(r.count)
    }

    /// Whether any peer has requests waiting for upload.
    pub fn has_uploads(&self) -> bool {
        self.peers.values().any(|p| !p.uploads.is_empty())
    }

    /// Answers the next piece of one request: a Data message of at most `MAX_DATA_BYTES` of
    /// blocks (or NoData), and what remains of the request. Serving piece by piece keeps the
    /// driver's byte budget in force for every piece, however large the request.
    fn serve(&mut self, feed: FeedId, r: &Request) -> (Message, Option<Request>) {
        let channel = feed as u32;
        let slot = &mut self.feeds[feed];
        let end = r.index.saturating_add(u64::from(r.count));
        let mut blocks = Vec::new();
        let mut bytes = 0usize;
        while r.index + (blocks.len() as u64) < end {
            let i = r.index + blocks.len() as u64;
            let block = match slot.feed.get(i) {
                Ok(b) => b,
                Err(FeedError::DataChanged(index)) => {
                    self.actions
                        .push_back(Action::Event(Event::DataChanged { feed, index }));
                    break;
                }
                Err(_) => break,
            };
            if !blocks.is_empty() && bytes + block.len() > MAX_DATA_BYTES {
                break;
            }
            bytes += block.len();
            blocks.push(Block(block));
        }
        let count = blocks.len() as u64;
        let no_data = (Message::NoData(NoData { channel, id: r.id }), None);
        if count == 0 && !(r.upgrade && r.count == 0) {
            return no_data;
        }
        let Ok(Proof { nodes, upgrade }) = slot.feed.proof(r.index, count, r.length, r.upgrade)
        else {
            return no_data;
        };
        slot.uploaded.set_range(r.index..r.index + count, true);
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
    /// remainder at the front.
    fn serve_queued(&mut self, peer: PeerId, pos: usize) -> Option<Vec<Message>> {
        let (feed, r) = self.peers.get_mut(&peer)?.uploads.remove(pos)?;
        let (message, rest) = self.serve(feed, &r);
        if let Message::Data(d) = &message
            && !d.blocks.is_empty()
        {
            self.event(Event::Uploaded {
                peer,
                feed,
                index: d.index,
                count: d.blocks.len() as u64,
            });
        }
        if let (Some(rest), Some(state)) = (rest, self.peers.get_mut(&peer)) {
            state.uploads.push_front((feed, rest));
        }
        Some(vec![message])
    }

    fn on_no_data(&mut self, peer: PeerId, n: NoData) -> Result<(), GoodbyeReason> {
        let state = self
            .peers
            .get_mut(&peer)
            .expect("checked by handle_message");
        let Some(req) = state.requests.remove(&n.id) else {
            return Ok(());
        };
        if !req.expired {
            state.live -= req.weight();
        }
        state.progress();
        // It does not have what it said it had (or lost it): stop asking it for those blocks.
        if let Some(ch) = state.channels.get_mut(&req.feed) {
            ch.have.set_range(req.index..req.index + req.count, false);
        }
        if !req.expired {
            self.release(&req);
        }
        if self.feeds[req.feed].upgrade_in_flight == Some((peer, n.id)) {
            self.feeds[req.feed].upgrade_in_flight = None;
            self.cannot_upgrade(peer, req.feed);
        }
        Ok(())
    }

    fn on_data(&mut self, peer: PeerId, d: Data) -> Result<(), GoodbyeReason> {
        let now = self.now;
        let state = self
            .peers
            .get_mut(&peer)
            .expect("checked by handle_message");
        let Some(&req) = state.requests.get(&d.id) else {
            return Ok(()); // unsolicited, or answered long ago: ignored
        };
        let count = d.blocks.len() as u64;
        let right_shape = d.index == req.index && count <= req.count && (count > 0 || req.upgrade);
        if !right_shape {
            // Dropping the peer releases the request, which is still in its table.
            return Err(GoodbyeReason::ProtocolError);
        }
        state.requests.remove(&d.id);
        // A range may be answered in several pieces (each within MAX_DATA_BYTES): the rest of
        // the request stays pending under the same id.
        let partial = count > 0 && count < req.count;
        if !req.expired {
            let rtt = now.saturating_sub(req.sent_at) as f64;
            state.sample_rtt(rtt.max(1.0));
            state.adapt_window(rtt.max(1.0), count, self.config.max_window);
            // The answered blocks leave the window; a remainder stays in it.
            state.live -= if partial { count as u32 } else { req.weight() };
        }
        let answered = Pending {
            count: if partial { count } else { req.count },
            ..req
        };
        if !req.expired {
            self.release(&answered);
        }
        let feed = req.feed;
        if partial {
            let state = self
                .peers
                .get_mut(&peer)
                .expect("checked by handle_message");
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
        let state = self
            .peers
            .get_mut(&peer)
            .expect("checked by handle_message");
        state.progress();
        if self.feeds[feed].upgrade_in_flight == Some((peer, d.id)) {
            self.feeds[feed].upgrade_in_flight = None;
        }
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
        match slot.feed.verify_and_store(d.index, &blocks, &proof) {
            Ok(v) => {
                if let Some(length) = v.upgraded_to {
                    slot.best_length = slot.best_length.max(length);
                    self.event(Event::Upgraded { feed, length });
                    let (_, tree_hash, signature) =
                        self.feeds[feed].feed.signed_tree().expect("just upgraded");
                    for p in self.feed_peers(feed) {
                        self.send(
                            p,
                            Message::Status(Status {
                                channel: feed as u32,
                                length,
                                tree_hash,
                                signature,
                            }),
                        );
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
                    });
                    for p in self.feed_peers(feed) {
                        if p != peer {
                            self.send(
                                p,
                                Message::Have(Have {
                                    channel: feed as u32,
                                    blocks: BlockSet::Range {
                                        start: d.index,
                                        count,
                                    },
                                }),
                            );
                        }
                    }
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
                    error: e.to_string(),
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
            if ids.is_empty() {
                continue;
            }
            for id in ids {
                let r = state.requests.remove(&id).expect("just listed");
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

    fn request(&mut self, peer: PeerId, feed: FeedId, index: u64, count: u64, upgrade: bool) {
        let id = self.next_request_id;
        self.next_request_id += 1;
        let length = self.feeds[feed].feed.len();
        let state = self
            .peers
            .get_mut(&peer)
            .expect("scheduler picks connected peers");
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

    /// Hands out requests: an upgrade when a peer proved a longer tree, then missing blocks.
    fn schedule(&mut self) {
        for feed in 0..self.feeds.len() {
            if self.feeds[feed].download {
                self.schedule_upgrade(feed);
                self.schedule_blocks(feed);
            }
        }
    }

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

    fn schedule_blocks(&mut self, feed: FeedId) {
        let length = self.feeds[feed].feed.len();
        if length == 0 {
            return;
        }
        // Peers with an open channel: (id, free window slots, live requests, smoothed RTT, holds
        // every block).
        let default_rtt = self.config.min_request_timeout as f64;
        let mut peers: Vec<(PeerId, u32, u32, f64, bool)> = self
            .peers
            .iter()
            .filter_map(|(&id, p)| {
                let ch = p.channels.get(&feed).filter(|c| c.is_open())?;
                // First gap, not a full popcount: this runs for every peer on every message.
                let seed = ch.have.first_unset(0) >= length;
                Some((id, p.free(), p.live, p.srtt.unwrap_or(default_rtt), seed))
            })
            .collect();
        let total_free: u64 = peers.iter().map(|p| u64::from(p.1)).sum();
        if total_free == 0 {
            return;
        }
        let slot = &self.feeds[feed];
        // The first block we lack *and want*: with a want filter, blocks given up long ago
        // (old versions of files) must not pin an ordered window far behind the wanted ones.
        let have = slot.feed.bitfield();
        let first_missing = match &slot.want {
            None => have.first_unset(0),
            Some(want) => {
                let mut i = 0;
                loop {
                    match want.first_set(i) {
                        Some(w) if have.get(w) => i = w + 1,
                        Some(w) => break w,
                        None => break length,
                    }
                }
            }
        };
        if first_missing >= length {
            return;
        }
        let ordered = self.feeds[feed].ordered;
        let (start, end) = if ordered {
            (
                first_missing,
                length.min(first_missing.saturating_add(self.config.max_ahead)),
            )
        } else {
            // Each node starts its scan at its own seeded offset and moves on from there, so the
            // readers of a swarm begin on disjoint arcs of the feed instead of all asking the
            // seeder for the same rare blocks; once an arc is done, its neighbours' blocks are
            // available from other readers.
            let cursor = slot
                .cursor
                .unwrap_or(mix(self.config.seed ^ feed as u64) % length);
            (cursor.clamp(first_missing, length), length)
        };
        // Collect candidates: missing, not in flight, held by someone.
        let want = (total_free * 4).min(self.config.scan_limit);
        let mut candidates: Vec<(u64, u64, u64)> = Vec::new(); // (availability, tiebreak, index)
        let mut scanned = 0u64;
        let mut next_cursor = start;
        // Unordered: from the cursor to the end, then wrap around to the first gap.
        let segments = if ordered {
            vec![(start, end)]
        } else {
            vec![(start, end), (first_missing, start)]
        };
        'scan: for (from, to) in segments {
            let mut i = from;
            while i < to {
                if candidates.len() as u64 >= want || scanned >= self.config.scan_limit {
                    break 'scan;
                }
                i = slot.feed.bitfield().first_unset(i);
                if let Some(want) = &slot.want {
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
                if !slot.in_flight.contains_key(&i) {
                    let avail = peers
                        .iter()
                        .filter(|(id, ..)| self.peers[id].channels[&feed].have.get(i))
                        .count() as u64;
                    if avail > 0 {
                        // Within equal rarity, the order of the scan (from this node's cursor).
                        let tiebreak = scanned;
                        candidates.push((avail, tiebreak, i));
                    }
                }
                i += 1;
                next_cursor = i;
            }
        }
        if ordered {
            candidates.sort_by_key(|c| c.2);
        } else {
            candidates.sort_unstable();
        }
        for (avail, _, index) in candidates {
            // Then the peer expected to answer soonest: fewest requests in flight, weighted by how long
            // it takes to answer one (a congested seeder loses to an idle reader holding the same
            // block). Ties broken by seed.
            // A block that a partial peer also holds goes to a partial peer when one has room:
            // a complete seed's upload is saved for the blocks only it can provide.
            let pick = peers
                .iter_mut()
                .filter(|(id, free, ..)| {
                    *free > 0 && self.peers[id].channels[&feed].have.get(index)
                })
                .min_by_key(|(id, _, live, srtt, seed)| {
                    (
                        *seed && avail > 1,
                        (f64::from(*live + 1) * srtt * 1000.0) as u64,
                        mix(self.config.seed ^ *id ^ index),
                    )
                });
            let Some(p) = pick else { continue };
            if self.feeds[feed].in_flight.contains_key(&index) {
                continue; // taken by a range requested a moment ago
            }
            let free = u64::from(p.1);
            let peer = p.0;
            // Extend the request over the following blocks that are missing, not in flight and
            // held by the same peer: fewer messages and round trips per byte, and one proof
            // covers the range.
            let have = &self.peers[&peer].channels[&feed].have;
            let slot = &self.feeds[feed];
            let mut count = 1;
            while count < self.config.max_request_blocks.min(free)
                && index + count < length
                && !slot.feed.has(index + count)
                && slot.want.as_ref().is_none_or(|w| w.get(index + count))
                && !slot.in_flight.contains_key(&(index + count))
                && have.get(index + count)
            {
                count += 1;
            }
            self.request(peer, feed, index, count, false);
            if let Some(p) = peers.iter_mut().find(|p| p.0 == peer) {
                p.1 -= count as u32;
                p.2 += count as u32;
            }
            if peers.iter().all(|p| p.1 == 0) {
                break;
            }
        }
        self.feeds[feed].cursor = Some(if next_cursor >= length {
            0
        } else {
            next_cursor
        });
    }
}
