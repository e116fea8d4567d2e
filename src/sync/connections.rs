//! The node's live connections: which connection speaks for which peer, and how much each may
//! hold of our memory.
//!
//! Three rules live here and nowhere else:
//! - **Admission and the duplicate tie-break.** A connection to ourselves, or to a new peer beyond
//!   `max_peers`, is refused. When both sides dial each other, both must keep the *same*
//!   connection, so the one whose initiator has the smaller key wins; the same direction twice
//!   means the peer redialled (after a crash, say), so the newer one wins.
//! - **Backpressure.** Messages go to the connection's bounded queue; what does not fit waits in a
//!   backlog capped at [`BACKLOG_LIMIT`] (past it the peer is too slow and is cut). Answers
//!   (block data) are pulled from the replicator only while the connection [`has room`], which
//!   keeps [`CONTROL_RESERVE`] queue slots for control messages and at most [`UPLOAD_BUDGET`]
//!   block bytes queued.
//! - **Stall cutting.** A connection that stays full without writing anything for the stall
//!   timeout is cut: a peer that does not read what it asked for may not hold our memory or our
//!   upload slot forever. A full connection that keeps writing is busy, not stalled.
//!
//! [`has room`]: Connections::has_room

use super::DisconnectReason;
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
/// Block bytes one connection may have queued: answers are pulled only below this, so a slow
/// peer holds at most this much of our memory (plus one answer).
pub const UPLOAD_BUDGET: usize = 4 * 1024 * 1024;
/// Control messages one connection may have waiting beyond its queue before it counts as too slow.
pub const BACKLOG_LIMIT: usize = 4096;

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
    },
    /// Turned away (and closed).
    Refused(RefuseReason),
    /// The peer's existing connection wins the tie-break; this one was closed. Not worth telling
    /// the user: the peer stays connected.
    Duplicate,
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
    outbound: mpsc::Sender<Message>,
    cancel: CancellationToken,
    stats: Arc<net::ConnStats>,
    /// Control messages that did not fit in the queue yet.
    backlog: VecDeque<Message>,
    /// Since when the connection has been full without writing anything, and the write count
    /// then; `None` while it has room or is draining.
    full_since: Option<(Instant, u64)>,
    /// What the peer said when it said goodbye.
    goodbye: Option<GoodbyeReason>,
}

impl Conn {
    fn is_full(&self) -> bool {
        !self.backlog.is_empty()
            || self.outbound.capacity() <= CONTROL_RESERVE
            || self.stats.queued.load(Ordering::Acquire) >= UPLOAD_BUDGET
    }
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
        }
    }

    fn peer_id(&mut self, remote: [u8; 32]) -> PeerId {
        let next = self.ids.len() as PeerId + 1;
        *self.ids.entry(remote).or_insert(next)
    }

    /// Decides whether `new` may speak for its peer (closing what loses).
    pub fn admit(&mut self, new: Incoming) -> Admission {
        if new.remote == self.local {
            new.cancel.cancel();
            return Admission::Refused(RefuseReason::Ourselves);
        }
        let known = self
            .ids
            .get(&new.remote)
            .is_some_and(|p| self.by_peer.contains_key(p));
        if self.conns.len() >= self.max_peers && !known {
            // A known peer redialling is handled below, replacing its old connection.
            new.cancel.cancel();
            return Admission::Refused(RefuseReason::TooManyPeers);
        }
        let peer = self.peer_id(new.remote);
        let mut replaced = None;
        if let Some(&old) = self.by_peer.get(&peer) {
            let initiator_key = |init: bool| if init { self.local } else { new.remote };
            let old_initiator = self.conns[&old].initiator;
            let keep_new = new.initiator == old_initiator
                || initiator_key(new.initiator) < initiator_key(old_initiator);
            if !keep_new {
                new.cancel.cancel();
                return Admission::Duplicate;
            }
            replaced = self.remove(old);
        }
        self.conns.insert(
            new.conn,
            Conn {
                peer,
                addr: new.addr,
                initiator: new.initiator,
                outbound: new.outbound,
                cancel: new.cancel,
                stats: new.stats,
                backlog: VecDeque::new(),
                full_since: None,
                goodbye: None,
            },
        );
        self.by_peer.insert(peer, new.conn);
        Admission::Accepted { peer, replaced }
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
        c.stats
            .queued
            .fetch_add(net::payload_len(&message), Ordering::AcqRel);
        if !c.backlog.is_empty() {
            c.backlog.push_back(message);
            if c.backlog.len() > BACKLOG_LIMIT {
                return Err(DisconnectReason::Stalled);
            }
            return Ok(());
        }
        match c.outbound.try_send(message) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(m)) => {
                c.backlog.push_back(m);
                Ok(())
            }
            Err(TrySendError::Closed(_)) => Err(gone),
        }
    }

    /// Moves what fits from `conn`'s backlog into its queue; false if the connection is gone.
    pub fn flush_backlog(&mut self, conn: ConnId) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        while let Some(m) = c.backlog.pop_front() {
            match c.outbound.try_send(m) {
                Ok(()) => {}
                Err(TrySendError::Full(m)) => {
                    c.backlog.push_front(m);
                    return true;
                }
                Err(TrySendError::Closed(_)) => return false,
            }
        }
        true
    }

    /// Whether answers may be pulled for `conn`: nothing backlogged, the control reserve free,
    /// and the upload budget not spent.
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
mod tests {
    use super::*;
    use feedsync_protocol::{Goodbye, Ping};

    struct Remote {
        rx: mpsc::Receiver<Message>,
        stats: Arc<net::ConnStats>,
        cancel: CancellationToken,
    }

    fn incoming(conn: ConnId, remote: u8, initiator: bool, queue: usize) -> (Incoming, Remote) {
        let (outbound, rx) = mpsc::channel(queue);
        let stats = Arc::new(net::ConnStats::default());
        let cancel = CancellationToken::new();
        let inc = Incoming {
            conn,
            remote: [remote; 32],
            initiator,
            addr: format!("127.0.0.1:{}", 1000 + conn).parse().unwrap(),
            outbound,
            stats: stats.clone(),
            cancel: cancel.clone(),
        };
        (inc, Remote { rx, stats, cancel })
    }

    fn ping() -> Message {
        Message::Ping(Ping { nonce: 1 })
    }

    #[test]
    fn ourselves_and_peers_beyond_the_limit_are_refused() {
        let mut c = Connections::new([5; 32], 1, Duration::from_secs(1));
        let (me, me_r) = incoming(1, 5, true, 16);
        assert_eq!(c.admit(me), Admission::Refused(RefuseReason::Ourselves));
        assert!(me_r.cancel.is_cancelled());
        let (a, _a) = incoming(2, 7, true, 16);
        assert!(matches!(
            c.admit(a),
            Admission::Accepted {
                peer: 1,
                replaced: None
            }
        ));
        let (b, b_r) = incoming(3, 8, false, 16);
        assert_eq!(c.admit(b), Admission::Refused(RefuseReason::TooManyPeers));
        assert!(b_r.cancel.is_cancelled());
        // A known peer redialling at the limit replaces its old connection instead.
        let (a2, _a2) = incoming(4, 7, true, 16);
        let Admission::Accepted {
            peer: 1,
            replaced: Some(old),
        } = c.admit(a2)
        else {
            panic!("a redial at the limit was not admitted")
        };
        assert_eq!(old.conn, 2);
        assert!(old.current);
        assert_eq!(c.len(), 1);
        assert_eq!(c.conn_of(1), Some(4));
    }

    #[test]
    fn both_ends_keep_the_connection_dialled_by_the_smaller_key() {
        // Our key [5; 32] is smaller than the peer's [9; 32]: the connection we dialled wins,
        // whichever arrives first.
        for our_dial_first in [true, false] {
            let mut c = Connections::new([5; 32], 8, Duration::from_secs(1));
            let (ours, ours_r) = incoming(1, 9, true, 16);
            let (theirs, theirs_r) = incoming(2, 9, false, 16);
            let (first, second) = if our_dial_first {
                (ours, theirs)
            } else {
                (theirs, ours)
            };
            assert!(matches!(c.admit(first), Admission::Accepted { .. }));
            let outcome = c.admit(second);
            assert_eq!(c.conn_of(1), Some(1), "kept the wrong connection");
            assert!(!ours_r.cancel.is_cancelled());
            assert!(theirs_r.cancel.is_cancelled());
            if our_dial_first {
                assert_eq!(outcome, Admission::Duplicate);
            } else {
                let Admission::Accepted {
                    replaced: Some(old),
                    ..
                } = outcome
                else {
                    panic!("ours did not replace theirs: {outcome:?}")
                };
                assert_eq!(old.conn, 2);
            }
        }
    }

    #[test]
    fn a_redial_in_the_same_direction_replaces_the_old_connection() {
        let mut c = Connections::new([9; 32], 8, Duration::from_secs(1));
        let (a, a_r) = incoming(1, 5, false, 16);
        let (b, _b) = incoming(2, 5, false, 16);
        c.admit(a);
        assert!(matches!(
            c.admit(b),
            Admission::Accepted {
                replaced: Some(_),
                ..
            }
        ));
        assert!(a_r.cancel.is_cancelled());
        assert_eq!(c.conn_of(1), Some(2));
    }

    #[test]
    fn a_full_queue_backlogs_and_a_backlog_past_its_limit_cuts() {
        let mut c = Connections::new([1; 32], 8, Duration::from_secs(1));
        let (a, mut a_r) = incoming(1, 2, true, CONTROL_RESERVE + 2);
        c.admit(a);
        assert!(c.has_room(1));
        for _ in 0..CONTROL_RESERVE + 2 {
            c.send(1, ping()).unwrap();
        }
        assert!(!c.has_room(1), "no room once the reserve is reached");
        for _ in 0..BACKLOG_LIMIT {
            c.send(1, ping()).unwrap();
        }
        assert_eq!(c.send(1, ping()), Err(DisconnectReason::Stalled));
        // Draining the queue lets the backlog move on, in order.
        while a_r.rx.try_recv().is_ok() {}
        assert!(c.flush_backlog(1));
        assert_eq!(a_r.rx.try_recv().ok(), Some(ping()));
    }

    #[test]
    fn the_upload_budget_closes_the_tap() {
        let mut c = Connections::new([1; 32], 8, Duration::from_secs(1));
        let (a, a_r) = incoming(1, 2, true, 256);
        c.admit(a);
        a_r.stats.queued.store(UPLOAD_BUDGET, Ordering::Release);
        assert!(!c.has_room(1));
        a_r.stats.queued.store(UPLOAD_BUDGET - 1, Ordering::Release);
        assert!(c.has_room(1));
    }

    #[test]
    fn only_a_full_connection_that_writes_nothing_is_stalled() {
        let stall = Duration::from_secs(30);
        let mut c = Connections::new([1; 32], 8, stall);
        let (a, a_r) = incoming(1, 2, true, 256);
        let (b, b_r) = incoming(2, 3, true, 256);
        c.admit(a);
        c.admit(b);
        a_r.stats.queued.store(UPLOAD_BUDGET, Ordering::Release);
        b_r.stats.queued.store(UPLOAD_BUDGET, Ordering::Release);
        let t0 = Instant::now();
        assert!(c.stalled(t0).is_empty());
        // b keeps writing (busy, healthy); a writes nothing.
        let mut t = t0;
        for _ in 0..4 {
            t += stall / 2;
            b_r.stats.writes.fetch_add(1, Ordering::AcqRel);
            let cut = c.stalled(t);
            if t.duration_since(t0) > stall {
                assert_eq!(cut, vec![1]);
            } else {
                assert!(cut.is_empty(), "cut before the stall timeout: {cut:?}");
            }
        }
        // Room again resets the clock (and b is still writing).
        a_r.stats.queued.store(0, Ordering::Release);
        b_r.stats.writes.fetch_add(1, Ordering::AcqRel);
        assert!(c.stalled(t + stall * 2).is_empty());
    }

    #[test]
    fn a_peer_goodbye_is_kept_for_the_report() {
        let mut c = Connections::new([1; 32], 8, Duration::from_secs(1));
        let (a, _a) = incoming(1, 2, true, 16);
        c.admit(a);
        c.note_goodbye(1, GoodbyeReason::Shutdown);
        let closed = c.remove(1).unwrap();
        assert_eq!(closed.goodbye, Some(GoodbyeReason::Shutdown));
        assert_eq!(
            c.send(
                1,
                Message::Goodbye(Goodbye {
                    reason: GoodbyeReason::Done
                })
            ),
            Err(DisconnectReason::Closed { error: None })
        );
    }
}
