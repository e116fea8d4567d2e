//! The node's live connections: which connection speaks for which peer, and how much each may
//! hold of our memory.
//!
//! Three rules live here and nowhere else:
//! - **Admission and the duplicate tie-break.** A connection to ourselves is refused. Only peers
//!   that opened a channel (they know a key we serve) count against `max_peers`; a new peer beyond
//!   it is refused. A peer without a channel is a *stranger*: at most [`MAX_STRANGERS`] are kept,
//!   and a newcomer evicts the oldest one, so keyless peers answering pings cannot lock every
//!   honest newcomer out. When both sides dial each other, both must keep the *same*
//!   connection, so the one whose initiator has the smaller key wins; the same direction twice
//!   means the peer redialled (after a crash, say), so the newer one wins.
//! - **Backpressure.** Messages go to the connection's bounded queue; what does not fit waits in a
//!   backlog of at most [`BACKLOG_BUDGET`] bytes (past it that one peer is too far behind and is
//!   cut, with the reason; a burst of control messages — thousands of `Unhave` after a large
//!   deletion — is small in bytes and passes). Answers
//!   (block data) are pulled from the replicator only while the connection has [`room`], which
//!   keeps [`CONTROL_RESERVE`] queue slots for control messages and at most the connection's
//!   budget of block bytes queued (`core::pacing`: about 100 ms of what it drains, at most
//!   4 MiB; pieces are cut to fit, so the next one is chosen close to the wire).
//! - **Stall cutting.** A connection that stays full without writing anything for the stall
//!   timeout is cut: a peer that does not read what it asked for may not hold our memory or our
//!   upload slot forever. A full connection that keeps writing is busy, not stalled.
//!
//! [`room`]: Connections::room

use super::DisconnectReason;
use crate::core::pacing::SendBudget;
use crate::core::replicator::PeerId;
use crate::net::{self, ConnId};
use feedsync_protocol::{GoodbyeReason, Message};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;

/// Outbound slots kept free for control messages: answers are pulled only above this.
pub const CONTROL_RESERVE: usize = 8;
/// Bytes (as held in memory, see [`net::message_cost`]) of messages one connection may have waiting
/// beyond its queue before it counts as too far behind and is cut. A budget in bytes, not in
/// messages: a burst of small control messages (one `Unhave` per block of a deleted 1 GiB file is
/// 16,384 of them) is a normal event, not a slow peer.
pub const BACKLOG_BUDGET: usize = 16 * 1024 * 1024;
/// Connections kept at most for peers that opened no channel yet (strangers), beyond
/// `max_peers`: a newcomer past this evicts the oldest stranger.
pub const MAX_STRANGERS: usize = 32;

/// A connection that finished its handshake, as the transport hands it over.
pub struct Incoming {
    /// The connection.
    pub conn: ConnId,
    /// The remote node's identity key.
    pub remote: [u8; 32],
    /// We dialled.
    pub initiator: bool,
    /// The remote address.
    pub addr: SocketAddr,
    /// Its bounded outbound queue.
    pub outbound: mpsc::Sender<Message>,
    /// Queued bytes and writes done, shared with the connection's writer.
    pub stats: Arc<net::ConnStats>,
    /// Closes the connection.
    pub cancel: CancellationToken,
    /// It runs through a blind relay.
    pub relayed: bool,
}

/// What [`Connections::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// The connection now speaks for `peer`; `replaced` is the peer's previous connection,
    /// already closed.
    Accepted {
        /// The peer.
        peer: PeerId,
        /// The connection it replaced, if any.
        replaced: Option<Closed>,
        /// A stranger (a peer without a channel) closed to make room, if one was.
        evicted: Option<Closed>,
    },
    /// Turned away (and closed).
    Refused(RefuseReason),
    /// The peer's existing connection wins the tie-break; this one was closed. Not worth telling
    /// the user: the peer stays connected.
    Duplicate {
        /// The peer, connected through its other connection.
        peer: PeerId,
    },
}

/// Why a connection was turned away right after its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// We dialled ourselves (our own address came back through discovery or `--peer`).
    Ourselves,
    /// The node already holds `max_peers` connections.
    TooManyPeers,
}

impl std::fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RefuseReason::Ourselves => "that is this node",
            RefuseReason::TooManyPeers => "too many peers",
        })
    }
}

/// A connection that was removed (and closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// The connection.
    pub conn: ConnId,
    /// The peer it spoke for.
    pub peer: PeerId,
    /// Its remote address.
    pub addr: SocketAddr,
    /// We dialled it.
    pub initiator: bool,
    /// It was the peer's current connection (the replicator knew the peer through it).
    pub current: bool,
    /// The goodbye reason the peer sent, if it sent one.
    pub goodbye: Option<GoodbyeReason>,
}

struct Conn {
    peer: PeerId,
    addr: SocketAddr,
    initiator: bool,
    relayed: bool,
    outbound: mpsc::Sender<Message>,
    cancel: CancellationToken,
    stats: Arc<net::ConnStats>,
    /// Control messages that did not fit in the queue yet.
    backlog: VecDeque<Message>,
    /// What `backlog` holds, by [`net::message_cost`].
    backlog_bytes: usize,
    /// When the connection was admitted (a stranger must open a channel within a deadline).
    since: Instant,
    /// Since when the connection has been full without writing anything, and the write count
    /// then; `None` while it has room or is draining.
    full_since: Option<(Instant, u64)>,
    /// What the peer said when it said goodbye.
    goodbye: Option<GoodbyeReason>,
    /// How many answer bytes may be queued, following the drain rate (`core::pacing`).
    budget: SendBudget,
    /// `stats.written` when the budget last heard of it.
    seen_written: u64,
}

impl Conn {
    fn is_full(&self) -> bool {
        !self.backlog.is_empty()
            || self.outbound.capacity() <= CONTROL_RESERVE
            || self.stats.queued.load(Ordering::Acquire) as u64 >= self.budget.allowed()
    }

    /// Tells the budget what the writer wrote since it last looked.
    fn observe(&mut self, now: u64) {
        let written = self.stats.written.load(Ordering::Acquire);
        let queued = self.stats.queued.load(Ordering::Acquire) as u64;
        self.budget
            .on_written(now, written.saturating_sub(self.seen_written), queued);
        self.seen_written = written;
    }
}

/// Microseconds since `origin`: the upload budgets' clock (a free function, so it can be read
/// while a connection of the set is borrowed).
fn micros(origin: Instant) -> u64 {
    origin.elapsed().as_micros() as u64
}

/// The live connections of one node.
pub struct Connections {
    conns: BTreeMap<ConnId, Conn>,
    by_peer: BTreeMap<PeerId, ConnId>,
    /// Peer ids by identity key: a peer keeps its id across reconnections, so a ban sticks.
    ids: BTreeMap<[u8; 32], PeerId>,
    local: [u8; 32],
    max_peers: usize,
    stall_timeout: Duration,
    /// Origin of the budgets' clock.
    origin: Instant,
}

impl Connections {
    /// No connections yet; `local` is our own identity key.
    pub fn new(local: [u8; 32], max_peers: usize, stall_timeout: Duration) -> Self {
        Self {
            conns: BTreeMap::new(),
            by_peer: BTreeMap::new(),
            ids: BTreeMap::new(),
            local,
            max_peers,
            stall_timeout,
            origin: Instant::now(),
        }
    }

    fn peer_id(&mut self, remote: [u8; 32]) -> PeerId {
        let next = self.ids.len() as PeerId + 1;
        *self.ids.entry(remote).or_insert(next)
    }

    /// Decides whether `new` may speak for its peer (closing what loses). `has_channel` tells a
    /// peer that opened a channel from a stranger (`Replicator::has_channel`).
    pub fn admit(&mut self, new: Incoming, has_channel: impl Fn(PeerId) -> bool) -> Admission {
        if new.remote == self.local {
            new.cancel.cancel();
            return Admission::Refused(RefuseReason::Ourselves);
        }
        let known = self
            .ids
            .get(&new.remote)
            .is_some_and(|p| self.by_peer.contains_key(p));
        let mut evicted = None;
        // A known peer redialling is handled below, replacing its old connection.
        if !known {
            let (mut members, mut strangers) = (0, Vec::new());
            for (&id, c) in &self.conns {
                if has_channel(c.peer) {
                    members += 1;
                } else {
                    strangers.push(id); // in ConnId order: the oldest first
                }
            }
            if members >= self.max_peers {
                new.cancel.cancel();
                return Admission::Refused(RefuseReason::TooManyPeers);
            }
            if strangers.len() >= MAX_STRANGERS {
                evicted = self.remove(strangers[0]);
            }
        }
        let peer = self.peer_id(new.remote);
        let mut replaced = None;
        if let Some(&old) = self.by_peer.get(&peer) {
            let initiator_key = |init: bool| if init { self.local } else { new.remote };
            let (old_initiator, old_relayed) =
                (self.conns[&old].initiator, self.conns[&old].relayed);
            // A direct path beats a relayed one; both sides know which is which, so both
            // keep the same connection. Otherwise a redial replaces, and of two crossing
            // dials the one the smaller key dialled stays.
            let keep_new = match (old_relayed, new.relayed) {
                (true, false) => true,
                (false, true) => false,
                _ => {
                    new.initiator == old_initiator
                        || initiator_key(new.initiator) < initiator_key(old_initiator)
                }
            };
            if !keep_new {
                new.cancel.cancel();
                return Admission::Duplicate { peer };
            }
            replaced = self.remove(old);
        }
        self.conns.insert(
            new.conn,
            Conn {
                peer,
                addr: new.addr,
                initiator: new.initiator,
                relayed: new.relayed,
                outbound: new.outbound,
                cancel: new.cancel,
                stats: new.stats,
                backlog: VecDeque::new(),
                backlog_bytes: 0,
                since: Instant::now(),
                full_since: None,
                goodbye: None,
                budget: SendBudget::new(micros(self.origin)),
                seen_written: 0,
            },
        );
        self.by_peer.insert(peer, new.conn);
        Admission::Accepted {
            peer,
            replaced,
            evicted,
        }
    }

    /// Connections admitted before `deadline` whose peer still opened no channel: a peer that
    /// knows none of our keys may not keep a connection (and its memory) forever.
    pub fn strangers_since(
        &self,
        deadline: Instant,
        has_channel: impl Fn(PeerId) -> bool,
    ) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, c)| c.since < deadline && !has_channel(c.peer))
            .map(|(&id, _)| id)
            .collect()
    }

    /// The peer `conn` speaks for.
    pub fn peer(&self, conn: ConnId) -> Option<PeerId> {
        self.conns.get(&conn).map(|c| c.peer)
    }

    /// The connection currently speaking for `peer`.
    pub fn conn_of(&self, peer: PeerId) -> Option<ConnId> {
        self.by_peer.get(&peer).copied()
    }

    /// Remembers that the peer on `conn` said goodbye, and why (the reason it gets reported with).
    pub fn note_goodbye(&mut self, conn: ConnId, reason: GoodbyeReason) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.goodbye = Some(reason);
        }
    }

    /// The loop handled one message that arrived on `conn` (its inbound budget gets it back).
    pub fn handled(&self, conn: ConnId, cost: usize) {
        if let Some(c) = self.conns.get(&conn) {
            c.stats.handled(cost);
        }
    }

    /// Removes and closes `conn`. Closing cancels its tasks, even if a write to a peer that
    /// stopped reading is blocked (dropping the queue alone would wait for that write forever).
    pub fn remove(&mut self, conn: ConnId) -> Option<Closed> {
        let c = self.conns.remove(&conn)?;
        c.cancel.cancel();
        let current = self.by_peer.get(&c.peer) == Some(&conn);
        if current {
            self.by_peer.remove(&c.peer);
        }
        Some(Closed {
            conn,
            peer: c.peer,
            addr: c.addr,
            initiator: c.initiator,
            current,
            goodbye: c.goodbye,
        })
    }

    /// Every connection and its peer.
    pub fn list(&self) -> Vec<(ConnId, PeerId)> {
        self.conns.iter().map(|(id, c)| (*id, c.peer)).collect()
    }

    /// How many connections are open.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Queues `message` for `conn`; an error says why the connection must be cut (too slow, or
    /// already gone).
    pub fn send(&mut self, conn: ConnId, message: Message) -> Result<(), DisconnectReason> {
        let gone = DisconnectReason::Closed { error: None };
        let Some(c) = self.conns.get_mut(&conn) else {
            return Err(gone);
        };
        let payload = net::payload_len(&message);
        let queued = c.stats.queued.fetch_add(payload, Ordering::AcqRel) + payload;
        if payload > 0 {
            c.budget.on_queued(micros(self.origin), queued as u64);
        }
        let message = if c.backlog.is_empty() {
            match c.outbound.try_send(message) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(m)) => m,
                Err(TrySendError::Closed(_)) => return Err(gone),
            }
        } else {
            message
        };
        c.backlog_bytes += net::message_cost(&message);
        c.backlog.push_back(message);
        if c.backlog_bytes > BACKLOG_BUDGET {
            // This connection's decision alone: the others keep their own budgets.
            return Err(DisconnectReason::Backlogged {
                bytes: c.backlog_bytes,
            });
        }
        Ok(())
    }

    /// Moves what fits from `conn`'s backlog into its queue; false if the connection is gone.
    pub fn flush_backlog(&mut self, conn: ConnId) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        while let Some(m) = c.backlog.pop_front() {
            let cost = net::message_cost(&m);
            match c.outbound.try_send(m) {
                Ok(()) => c.backlog_bytes -= cost,
                Err(TrySendError::Full(m)) => {
                    c.backlog.push_front(m);
                    return true;
                }
                Err(TrySendError::Closed(_)) => return false,
            }
        }
        true
    }

    /// Bytes of answers that may be pulled for `conn` now (0: none): its budget, which follows
    /// what the connection drains (`core::pacing`), less what is queued; nothing while control
    /// messages are backlogged or the control reserve is reached.
    pub fn room(&mut self, conn: ConnId) -> usize {
        let now = micros(self.origin);
        let Some(c) = self.conns.get_mut(&conn) else {
            return 0;
        };
        c.observe(now);
        if c.is_full() {
            return 0;
        }
        let queued = c.stats.queued.load(Ordering::Acquire) as u64;
        c.budget.allowed().saturating_sub(queued) as usize
    }

    /// Whether answers may be pulled for `conn`: nothing backlogged, the control reserve free,
    /// and the upload budget not spent.
    #[cfg(test)]
    pub fn has_room(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| !c.is_full())
    }

    /// Connections that have been full without writing anything for longer than the stall
    /// timeout, as of `now`. Call it regularly: it also notes when each connection filled up.
    pub fn stalled(&mut self, now: Instant) -> Vec<ConnId> {
        let mut stalled = Vec::new();
        for (&id, c) in self.conns.iter_mut() {
            let full = c.is_full();
            let writes = c.stats.writes.load(Ordering::Acquire);
            match (full, c.full_since) {
                (false, _) => c.full_since = None,
                // Full but draining: a busy healthy connection, not a stalled one.
                (true, Some((_, w))) if w != writes => c.full_since = Some((now, writes)),
                (true, None) => c.full_since = Some((now, writes)),
                (true, Some((t, _))) if now.duration_since(t) > self.stall_timeout => {
                    stalled.push(id)
                }
                (true, Some(_)) => {}
            }
        }
        stalled
    }

    /// Whether every connection's writer has finished (its queue is closed): after a goodbye,
    /// the writer sends it and ends.
    pub fn all_written(&self) -> bool {
        self.conns.values().all(|c| c.outbound.is_closed())
    }

    /// Removes every connection (shutdown), returning them.
    pub fn drain(&mut self) -> Vec<Closed> {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        ids.into_iter().filter_map(|id| self.remove(id)).collect()
    }
}

#[cfg(test)]
mod tests;
