//! A deterministic simulated network of replicators, the main tool for testing replication.
//!
//! Every node is a [`Replicator`] over [`MemoryStorage`]; messages travel through one event
//! queue ordered by simulated time (microseconds). The network can drop messages, delay them by a
//! random jitter (which reorders them), limit each node's uplink and each link's bandwidth, and
//! partition links. All randomness comes from one seed, so a failing run replays exactly: tests
//! print the seed.
//!
//! A node can also be made [`Hostile`]: on top of what its own replicator says, it sends every
//! peer a seeded stream of well-framed junk each tick (floods of pings, haves naming blocks up
//! to 2^48, fragmented haves, unhaves, wants, requests, cancels, unsolicited data and `NoData`,
//! opens for unknown feeds) and lies that it holds every block; as a writer it also signs
//! statuses for any length it likes. `tests/sim_hostile.rs` runs honest nodes beside it.
//!
//! Messages are encoded with the real framing to learn their size (so bandwidth is charged for
//! real bytes, and a message the encoder would refuse fails here too), then handed over as
//! values.

use crate::core::replicator::{Action, Config, Event, PeerId, Replicator};
use crate::core::storage::MemoryStorage;
use feedsync_protocol::{Message, encode};
use std::collections::{BTreeMap, BTreeSet};

mod hostile;
mod links;

pub use hostile::Hostile;
pub use links::SendQueues;

/// Network conditions.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Probability that any one message is lost.
    pub loss: f64,
    /// One-way latency of every link, in microseconds.
    pub latency: u64,
    /// Extra random delay per message, 0..=jitter microseconds (reorders messages).
    pub jitter: u64,
    /// Upload capacity of each node in bytes per second, shared by all its links.
    pub uplink: Option<u64>,
    /// Capacity of each directed link in bytes per second.
    pub link_bandwidth: Option<u64>,
    /// Microseconds per replicator tick.
    pub tick: u64,
    /// A dropped connection is dialled again after this many microseconds.
    pub reconnect_after: u64,
    /// What sits between a replicator and the wire (see [`SendQueues`]).
    pub queues: SendQueues,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            loss: 0.0,
            latency: 1_000,
            jitter: 0,
            uplink: None,
            link_bandwidth: None,
            tick: 1_000,
            reconnect_after: 200_000,
            queues: SendQueues::Ideal,
        }
    }
}

enum Delivery {
    Message {
        from: usize,
        to: usize,
        generation: u64,
        message: Message,
    },
    Reconnect {
        a: usize,
        b: usize,
    },
    /// `node`'s uplink has finished sending and can take the next answer.
    UplinkFree {
        node: usize,
    },
}

/// Counters, per directed link.
#[derive(Debug, Default, Clone)]
pub struct LinkStats {
    /// Messages put on the link.
    pub sent: u64,
    /// Messages the network dropped.
    pub lost: u64,
    /// Bytes put on the link.
    pub bytes: u64,
    /// Data messages put on the link.
    pub data: u64,
}

/// The simulated network.
pub struct Sim {
    /// The nodes; node `i` is peer `i` to every other node.
    pub nodes: Vec<Replicator<MemoryStorage>>,
    config: SimConfig,
    now: u64,
    next_tick: u64,
    queue: BTreeMap<(u64, u64), Delivery>,
    seq: u64,
    rng: u64,
    uplink_free: Vec<u64>,
    /// An `UplinkFree` event is queued for this node.
    pump_pending: Vec<bool>,
    /// The peer each node last served an upload to (its peers take turns).
    last_served: Vec<PeerId>,
    /// Per directed connection, what waits to be sent (not with [`SendQueues::Ideal`]).
    link_queues: BTreeMap<(usize, usize), links::LinkQueue>,
    /// Each node's fair-queueing clock (see `links.rs`).
    vclock: Vec<u64>,
    link_free: BTreeMap<(usize, usize), u64>,
    /// Connected pairs (lower index first) and their connection generation.
    links: BTreeMap<(usize, usize), u64>,
    generation: u64,
    partitioned: BTreeSet<(usize, usize)>,
    /// Nodes whose every outgoing Data has a block bit flipped (a malicious peer).
    corrupt: BTreeSet<usize>,
    /// Nodes that send junk every tick.
    hostile: BTreeMap<usize, Hostile>,
    stats: BTreeMap<(usize, usize), LinkStats>,
    /// Every event every node reported, with the node and the time.
    pub events: Vec<(u64, usize, Event)>,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl Sim {
    /// A network of `n` nodes with no feeds and no links; node `i`'s replicator gets `config(i)`.
    pub fn new(
        n: usize,
        seed: u64,
        config: SimConfig,
        node_config: impl Fn(usize) -> Config,
    ) -> Self {
        Self {
            nodes: (0..n)
                .map(|i| {
                    Replicator::new(Config {
                        seed: seed ^ (i as u64) << 32,
                        ..node_config(i)
                    })
                })
                .collect(),
            config,
            now: 0,
            next_tick: 0,
            queue: BTreeMap::new(),
            seq: 0,
            rng: seed | 1,
            uplink_free: vec![0; n],
            pump_pending: vec![false; n],
            last_served: vec![0; n],
            link_queues: BTreeMap::new(),
            vclock: vec![0; n],
            link_free: BTreeMap::new(),
            links: BTreeMap::new(),
            generation: 0,
            partitioned: BTreeSet::new(),
            corrupt: BTreeSet::new(),
            hostile: BTreeMap::new(),
            stats: BTreeMap::new(),
            events: Vec::new(),
        }
    }

    fn random(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Simulated time in microseconds.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Connects `a` (initiator) and `b`.
    pub fn connect(&mut self, a: usize, b: usize) {
        if self.links.contains_key(&pair(a, b)) {
            return;
        }
        self.generation += 1;
        self.links.insert(pair(a, b), self.generation);
        let hh = blake3::hash(
            &[
                self.generation.to_le_bytes(),
                (a as u64).to_le_bytes(),
                (b as u64).to_le_bytes(),
            ]
            .concat(),
        );
        self.nodes[a].handle_connected(b as PeerId, hh.as_bytes(), true);
        self.nodes[b].handle_connected(a as PeerId, hh.as_bytes(), false);
        self.drain(a);
        self.drain(b);
    }

    /// Connects every pair of the given nodes.
    pub fn mesh(&mut self, nodes: &[usize]) {
        for (k, &a) in nodes.iter().enumerate() {
            for &b in &nodes[k + 1..] {
                self.connect(a, b);
            }
        }
    }

    /// Cuts (or heals) the link between `a` and `b`: messages in either direction are lost.
    pub fn partition(&mut self, a: usize, b: usize, cut: bool) {
        if cut {
            self.partitioned.insert(pair(a, b));
        } else {
            self.partitioned.remove(&pair(a, b));
        }
    }

    /// Makes `node` flip a bit in every block it sends from now on.
    pub fn corrupt(&mut self, node: usize) {
        self.corrupt.insert(node);
    }

    /// Makes `node` hostile from now on (see [`Hostile`]).
    pub fn make_hostile(&mut self, node: usize, hostile: Hostile) {
        self.hostile.insert(node, hostile);
    }

    /// Traffic counters for the directed link `from -> to`.
    pub fn stats(&self, from: usize, to: usize) -> LinkStats {
        self.stats.get(&(from, to)).cloned().unwrap_or_default()
    }

    /// Total bytes `node` uploaded.
    pub fn uploaded(&self, node: usize) -> u64 {
        self.stats
            .iter()
            .filter(|((f, _), _)| *f == node)
            .map(|(_, s)| s.bytes)
            .sum()
    }

    /// Appends to a feed that `node` writes, and lets the node announce it.
    pub fn append(&mut self, node: usize, feed: usize, blocks: &[Vec<u8>]) {
        self.nodes[node].append(feed, blocks).expect("sim append");
        self.drain(node);
    }

    fn drain(&mut self, node: usize) {
        while let Some(action) = self.nodes[node].poll_action() {
            match action {
                Action::Send { peer, message } => self.transmit(node, peer as usize, message),
                Action::Disconnect { peer, .. } => self.disconnect(node, peer as usize),
                Action::Event(e) => self.events.push((self.now, node, e)),
            }
        }
        self.pump(node);
    }

    /// Pulls answers from `node` as its uplink frees up, through the call the synchronizer
    /// uses: a link with room asks the replicator for its own peer's next answer with
    /// [`Replicator::poll_upload`], and the node's peers take turns (round robin from the one
    /// after the last served), so one busy peer cannot starve the others of the shared uplink.
    /// "Room" is the node's uplink (one message at a time when it is limited, everything at once
    /// when not); `link_bandwidth` only delays delivery, it does not hold a link back.
    fn pump(&mut self, node: usize) {
        if self.queued_mode() {
            self.pump_queued(node);
            return;
        }
        if self.config.uplink.is_none() {
            while self.serve_next(node) {}
            return;
        }
        if self.pump_pending[node] || !self.nodes[node].has_uploads() {
            return;
        }
        if self.uplink_free[node] <= self.now {
            self.serve_next(node);
        }
        if self.nodes[node].has_uploads() || self.uplink_free[node] > self.now {
            self.pump_pending[node] = true;
            let at = self.uplink_free[node].max(self.now + 1);
            self.push(at, Delivery::UplinkFree { node });
        }
    }

    /// `node`'s peers in the order they take turns at its uplink: those after the one served
    /// last first, then the rest (it last of all).
    fn peers_in_turn(&self, node: usize) -> Vec<PeerId> {
        let last = self.last_served[node];
        let mut order: Vec<PeerId> = self.nodes[node].peers().collect();
        let after_last = order.partition_point(|p| *p <= last);
        order.rotate_left(after_last);
        order
    }

    /// Serves one answer from `node` to the next peer in turn that has one; false if none has.
    fn serve_next(&mut self, node: usize) -> bool {
        let order = self.peers_in_turn(node);
        for peer in order {
            if let Some(messages) = self.nodes[node].poll_upload(peer) {
                self.last_served[node] = peer;
                for m in messages {
                    self.transmit(node, peer as usize, m);
                }
                return true;
            }
        }
        false
    }

    fn disconnect(&mut self, a: usize, b: usize) {
        if self.links.remove(&pair(a, b)).is_none() {
            return;
        }
        self.link_queues.remove(&(a, b));
        self.link_queues.remove(&(b, a));
        self.nodes[a].handle_disconnected(b as PeerId);
        self.nodes[b].handle_disconnected(a as PeerId);
        self.drain(a);
        self.drain(b);
        if !self.nodes[a].is_banned(b as PeerId) && !self.nodes[b].is_banned(a as PeerId) {
            let at = self.now + self.config.reconnect_after;
            self.push(at, Delivery::Reconnect { a, b });
        }
    }

    fn push(&mut self, at: u64, d: Delivery) {
        self.seq += 1;
        self.queue.insert((at, self.seq), d);
    }

    fn transmit(&mut self, from: usize, to: usize, mut message: Message) {
        if !self.links.contains_key(&pair(from, to)) {
            return;
        }
        if self.corrupt.contains(&from)
            && let Message::Data(d) = &mut message
            && let Some(b) = d.blocks.first_mut().and_then(|b| b.0.first_mut())
        {
            *b ^= 0x01;
        }
        if self.queued_mode() {
            self.enqueue(from, to, message, false);
            self.kick(from);
            return;
        }
        // Invariant: the replicator only emits messages within protocol limits.
        let size = encode(&message)
            .expect("replicator emitted an unencodable message")
            .len() as u64;
        let mut start = self.now;
        if let Some(up) = self.config.uplink {
            start = start.max(self.uplink_free[from]);
            self.uplink_free[from] = start + size * 1_000_000 / up;
            start = self.uplink_free[from];
        }
        self.wire(from, to, message, size, start);
    }

    /// Puts `message` (`size` bytes) on the `from -> to` link once it has left `from`'s uplink
    /// at `start`: counted, delayed by the link's bandwidth, latency and jitter, or lost.
    fn wire(&mut self, from: usize, to: usize, message: Message, size: u64, mut start: u64) {
        let Some(&generation) = self.links.get(&pair(from, to)) else {
            return;
        };
        let stats = self.stats.entry((from, to)).or_default();
        stats.sent += 1;
        stats.bytes += size;
        if matches!(message, Message::Data(_)) {
            stats.data += 1;
        }
        if let Some(bw) = self.config.link_bandwidth {
            let free = self.link_free.entry((from, to)).or_default();
            let s = start.max(*free);
            *free = s + size * 1_000_000 / bw;
            start = *free;
        }
        let lost = (self.random() % 1_000_000) as f64 / 1e6 < self.config.loss
            || self.partitioned.contains(&pair(from, to));
        if lost {
            self.stats.entry((from, to)).or_default().lost += 1;
            return;
        }
        let jitter = if self.config.jitter > 0 {
            self.random() % (self.config.jitter + 1)
        } else {
            0
        };
        let at = start + self.config.latency + jitter;
        self.push(
            at,
            Delivery::Message {
                from,
                to,
                generation,
                message,
            },
        );
    }

    /// Runs until `done(self)` holds (checked every tick) or `limit` microseconds of simulated time
    /// have passed. Returns whether `done` held.
    pub fn run_until(&mut self, limit: u64, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let end = self.now + limit;
        loop {
            let next_delivery = self.queue.first_key_value().map(|((at, _), _)| *at);
            if next_delivery.is_none_or(|at| at >= self.next_tick) {
                self.now = self.next_tick;
                if done(self) {
                    return true;
                }
                if self.now >= end {
                    return false;
                }
                let tick = self.now / self.config.tick;
                for i in 0..self.nodes.len() {
                    self.nodes[i].handle_tick(tick);
                    self.drain(i);
                }
                self.misbehave();
                self.next_tick += self.config.tick;
                continue;
            }
            let ((at, _), delivery) = self.queue.pop_first().expect("checked above");
            self.now = at;
            match delivery {
                Delivery::Message {
                    from,
                    to,
                    generation,
                    message,
                } => {
                    if self.links.get(&pair(from, to)) == Some(&generation) {
                        self.nodes[to].handle_message(from as PeerId, message);
                        self.drain(to);
                    }
                }
                Delivery::Reconnect { a, b } => self.connect(a, b),
                Delivery::UplinkFree { node } => {
                    self.pump_pending[node] = false;
                    self.pump(node);
                }
            }
        }
    }
}
