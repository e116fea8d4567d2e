//! The loop itself, in three parts: [`bind`] (on the caller's thread, so start errors surface
//! at start), [`Node::start`] + [`Node::run`] (the select loop, on the node's thread) and
//! [`Node::shutdown`] (the ordered stop).

use super::connections::{Admission, Closed, Connections, Incoming, RefuseReason};
use super::events::{AppendError, DisconnectReason, NodeEvent, StartError, StopError};
use super::{App, Command, NodeConfig, Waker};
use crate::core::Feed;
use crate::core::peerbook::PeerBook;
use crate::core::replicator::{Action, Replicator};
use crate::discovery::Discovery;
use crate::net::{self, ConnId, Inbound};
use crate::storage::DiskStorage;
use crossbeam_channel::{Receiver, Sender, select};
use feedsync_protocol::{Goodbye, GoodbyeReason, Message};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Peer book backoff, in ticks: first retry after 50, doubling up to 3000 (30 s at 10 ms).
const BACKOFF_BASE: u64 = 50;
const BACKOFF_MAX: u64 = 3000;
/// How long the ordered shutdown waits for goodbyes to be written.
const GOODBYE_GRACE: Duration = Duration::from_millis(500);
/// Discovery results are looked at every this many ticks.
const DISCOVERY_EVERY: u64 = 10;
/// A connection whose peer opened no channel (knows none of our keys) within this long is cut:
/// an honest peer opens its channels in its first round trip.
const CHANNEL_DEADLINE: Duration = Duration::from_secs(20);

/// What the peer book learns when a connection we dialled ends, by why it ended. Every end is
/// reported: an address left marked connected is never dialled again (a clone cut for being too
/// far behind used to sit at zero peers forever).
pub(super) fn book_after_close(
    book: &mut PeerBook<SocketAddr>,
    addr: &SocketAddr,
    reason: &DisconnectReason,
    tick: u64,
) {
    match reason {
        // Our own stop: nothing to redial.
        DisconnectReason::Shutdown => {}
        // The peer lives on through a newer connection; redial when that one ends.
        DisconnectReason::Replaced => book.duplicate(addr),
        // It misbehaved: back off more each time.
        DisconnectReason::Banned
        | DisconnectReason::ProtocolError
        | DisconnectReason::NoChannel => book.failed(addr, tick),
        // It went away, timed out or fell behind: redial after the base delay.
        DisconnectReason::Closed { .. }
        | DisconnectReason::Goodbye(_)
        | DisconnectReason::Stalled
        | DisconnectReason::Backlogged { .. }
        | DisconnectReason::TimedOut => book.disconnected(addr, tick),
    }
}

/// The replicator's clock: ticks counted from real elapsed time. A timer channel alone would not
/// do: crossbeam's `tick` drops ticks the loop was too busy to take, so counting wake-ups would
/// slow the core's clock exactly when the node is busiest, and a timeout "in ticks" would stretch.
#[derive(Debug, Clone, Copy)]
pub(super) struct Clock {
    start: Instant,
    tick: Duration,
}

impl Clock {
    pub(super) fn new(start: Instant, tick: Duration) -> Self {
        Self {
            start,
            tick: tick.max(Duration::from_micros(1)),
        }
    }

    /// Ticks elapsed at `now`.
    pub(super) fn ticks_at(&self, now: Instant) -> u64 {
        let n = now.saturating_duration_since(self.start).as_nanos() / self.tick.as_nanos();
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    /// How long `ticks` ticks last.
    pub(super) fn duration(&self, ticks: u64) -> Duration {
        self.tick
            .saturating_mul(u32::try_from(ticks).unwrap_or(u32::MAX))
    }
}

/// What must exist before the node's thread starts: the runtime and the bound listener.
pub(super) struct Bound {
    rt: tokio::runtime::Runtime,
    listener: Option<tokio::net::TcpListener>,
    /// The descriptor limit this start raised (from, to), to report once.
    raised: Option<(u64, u64)>,
}

/// Builds the runtime and binds the listener, on the caller's thread.
pub(super) fn bind(listen: Option<SocketAddr>) -> Result<Bound, StartError> {
    let raised = net::raise_descriptor_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    let listener = match listen {
        None => None,
        Some(addr) => {
            let err = |source| StartError::Listen { addr, source };
            let std = std::net::TcpListener::bind(addr).map_err(err)?;
            std.set_nonblocking(true).map_err(err)?;
            let _in_runtime = rt.enter();
            Some(tokio::net::TcpListener::from_std(std).map_err(err)?)
        }
    };
    Ok(Bound {
        rt,
        listener,
        raised,
    })
}

/// Why the loop ended.
enum Exit {
    /// Told to stop (command, stop channel, or the handle dropped).
    Stop,
    /// `exit_when_complete` and the job is done.
    Complete,
}

pub(super) struct Node {
    replicator: Replicator<DiskStorage>,
    conns: Connections,
    book: PeerBook<SocketAddr>,
    events: Sender<NodeEvent>,
    clock: Clock,
    tick: u64,
    complete_reported: bool,
    app: Option<Box<dyn App>>,
    wake: Receiver<()>,
    rt: tokio::runtime::Runtime,
    /// Cancels every task (dials and connections); the listener has a child token of its own.
    cancel: CancellationToken,
    listen_cancel: CancellationToken,
    inbound_tx: net::InboundSender,
    inbound: Receiver<Inbound>,
    discovery: Option<Discovery>,
    /// Addresses we dialled that reached a peer already connected through another connection:
    /// the book redials them when that connection ends.
    aliases: BTreeMap<crate::core::replicator::PeerId, BTreeSet<SocketAddr>>,
    /// The feeds we meet peers for at relays, and when each is next dialled through them.
    relayed: Vec<RelayedFeed>,
    /// A relayed dial is under way (cleared when its handshake is over).
    relay_dialling: std::sync::Arc<std::sync::atomic::AtomicBool>,
    config: NodeConfig,
}

/// One feed's schedule of dials through the relays: due [`super::RELAY_GRACE`] after it was
/// last seen with a peer, then backing off (2 s doubling to a minute) while it has none.
struct RelayedFeed {
    feed: crate::core::replicator::FeedId,
    token: [u8; 32],
    next: Instant,
    backoff: Duration,
    /// Which relay this feed's next dial goes to (round robin).
    turn: usize,
}

const RELAY_BACKOFF_FIRST: Duration = Duration::from_secs(2);
const RELAY_BACKOFF_MAX: Duration = Duration::from_secs(60);

impl Node {
    /// Adds the feeds, starts the app, starts accepting and announcing. On the node's thread:
    /// the app's start may take long (a first import).
    pub(super) fn start(
        bound: Bound,
        config: NodeConfig,
        feeds: super::Feeds,
        app: Option<Box<dyn App>>,
        events: Sender<NodeEvent>,
    ) -> Node {
        let mut replicator = Replicator::new(config.replicator.clone());
        for (feed, download) in feeds {
            replicator.add_feed(feed, download);
        }
        let cancel = CancellationToken::new();
        let (inbound_tx, inbound) = crossbeam_channel::bounded::<Inbound>(4096);
        let (wake_tx, wake) = crossbeam_channel::bounded::<()>(1);
        let mut node = Node {
            replicator,
            conns: Connections::new(
                config.identity.public,
                config.max_peers,
                config.stall_timeout,
            ),
            book: PeerBook::new(BACKOFF_BASE, BACKOFF_MAX, config.replicator.seed),
            events,
            clock: Clock::new(Instant::now(), config.tick),
            tick: 0,
            complete_reported: false,
            app,
            wake,
            rt: bound.rt,
            listen_cancel: cancel.child_token(),
            cancel,
            inbound_tx,
            inbound,
            discovery: None,
            aliases: BTreeMap::new(),
            relayed: Vec::new(),
            relay_dialling: Default::default(),
            config,
        };
        if let Some((from, to)) = bound.raised {
            node.emit(NodeEvent::DescriptorLimit { from, to });
        }
        match &mut node.app {
            Some(app) => {
                app.set_waker(Waker(wake_tx));
                app.start(&mut node.replicator);
            }
            None => node.wake = crossbeam_channel::never(),
        }
        node.drive();
        let listening = bound.listener.is_some();
        if let Some(listener) = bound.listener {
            node.accept(listener);
        }
        node.start_relays(listening);
        for p in node.config.peers.clone() {
            node.book.add(p);
        }
        node
    }

    fn accept(&mut self, listener: tokio::net::TcpListener) {
        let local = match listener.local_addr() {
            Ok(a) => a,
            // Cannot happen for a bound socket; without the address, announce nothing.
            Err(_) => return,
        };
        if let Some(dc) = &self.config.discovery {
            let keys: Vec<[u8; 32]> = (0..self.replicator.feed_count())
                .map(|f| self.replicator.feed(f).discovery_key())
                .collect();
            let id = &self.config.identity.public;
            match Discovery::start(id, local.port(), &keys, dc, self.rt.handle()) {
                Ok(d) => self.discovery = Some(d),
                // Discovery is a convenience: named peers still work without it.
                Err(e) => self.emit(NodeEvent::DiscoveryFailed {
                    error: e.to_string(),
                }),
            }
        }
        self.emit(NodeEvent::Listening(local));
        self.rt.spawn(net::listen(
            listener,
            self.config.identity.clone(),
            self.inbound_tx.clone(),
            self.listen_cancel.clone(),
        ));
    }

    /// Relays: a listening node keeps one registration waiting on each relay for each of its
    /// first [`super::RELAY_FEEDS`] feeds (peers behind a NAT reach it there); every node
    /// schedules dials through them for feeds that find no peer (see [`RelayedFeed`]).
    fn start_relays(&mut self, listening: bool) {
        if self.config.relays.is_empty() {
            return;
        }
        let first = Instant::now() + super::RELAY_GRACE;
        let n = self.replicator.feed_count().min(super::RELAY_FEEDS);
        let places = std::sync::Arc::new(tokio::sync::Semaphore::new(
            crate::reach::relay::RELAYED_HANDSHAKES,
        ));
        for feed in 0..n {
            let dk = self.replicator.feed(feed).discovery_key();
            let token = crate::reach::relay_token(&dk);
            self.relayed.push(RelayedFeed {
                feed,
                token,
                next: first,
                backoff: RELAY_BACKOFF_FIRST,
                turn: 0,
            });
            if !listening {
                continue;
            }
            for &relay in &self.config.relays {
                // Registrations stop with the listener (no new peer during the ordered stop);
                // their connections live until the node's own end.
                self.rt.spawn(crate::reach::relay::keep_waiting(
                    relay,
                    token,
                    self.config.identity.clone(),
                    self.inbound_tx.clone(),
                    places.clone(),
                    self.listen_cancel.child_token(),
                    self.cancel.child_token(),
                ));
            }
        }
    }

    /// Dials through a relay for the first feed that has gone without a peer long enough (the
    /// feed's next relay in turn). One relayed dial at a time per node: two relayed connections
    /// to one peer made at once could be kept in a different order by each end.
    fn relay_dials(&mut self, now: Instant) {
        let busy = self
            .relay_dialling
            .load(std::sync::atomic::Ordering::Acquire);
        let mut chosen = None;
        for r in &mut self.relayed {
            if self.replicator.has_peer_on(r.feed) {
                r.next = now + super::RELAY_GRACE;
                r.backoff = RELAY_BACKOFF_FIRST;
                continue;
            }
            if busy || chosen.is_some() || now < r.next {
                continue;
            }
            r.next = now + r.backoff;
            r.backoff = (r.backoff * 2).min(RELAY_BACKOFF_MAX);
            let relay = self.config.relays[r.turn % self.config.relays.len()];
            r.turn = r.turn.wrapping_add(1);
            chosen = Some((relay, r.token));
        }
        if let Some((relay, token)) = chosen {
            self.relay_dialling
                .store(true, std::sync::atomic::Ordering::Release);
            self.rt.spawn(crate::reach::relay::dial(
                relay,
                token,
                self.config.identity.clone(),
                self.inbound_tx.clone(),
                self.cancel.child_token(),
                crate::reach::relay::InFlight(self.relay_dialling.clone()),
            ));
        }
    }

    fn emit(&self, e: NodeEvent) {
        // Events are informational; a caller that stops reading does not stall replication.
        let _ = self.events.try_send(e);
    }

    /// The loop, then the ordered shutdown.
    pub(super) fn run(mut self, control: &Receiver<Command>) -> Result<(), StopError> {
        let _ = self.run_loop(control);
        self.shutdown()
    }

    fn run_loop(&mut self, control: &Receiver<Command>) -> Exit {
        let ticker = crossbeam_channel::tick(self.config.tick);
        let stop = self
            .config
            .stop
            .clone()
            .unwrap_or_else(crossbeam_channel::never);
        loop {
            select! {
                recv(stop) -> _ => return Exit::Stop,
                recv(control) -> cmd => match cmd {
                    Ok(Command::Append { feed, blocks, reply }) => {
                        let _ = reply.send(self.append(feed, &blocks));
                    }
                    Ok(Command::AddPeer(addr)) => self.book.add(addr),
                    Ok(Command::Shutdown) | Err(_) => return Exit::Stop,
                },
                recv(self.inbound) -> ev => {
                    // Invariant: we hold a sender ourselves, so the channel never disconnects.
                    self.on_inbound(ev.expect("inbound channel open while the loop holds a sender"));
                    // Take whatever else is waiting before driving, to batch the work.
                    for _ in 0..256 {
                        match self.inbound.try_recv() {
                            Ok(ev) => self.on_inbound(ev),
                            Err(_) => break,
                        }
                    }
                },
                recv(self.wake) -> woke => match (woke, &mut self.app) {
                    (Ok(()), Some(app)) => app.on_wake(&mut self.replicator),
                    // Nobody holds the waker (no app, or one that dropped it): a closed channel
                    // is always ready, and selecting on it would spin the loop.
                    _ => self.wake = crossbeam_channel::never(),
                },
                recv(ticker) -> _ => self.on_tick(Instant::now()),
            }
            self.drive();
            if !self.complete_reported && self.complete() {
                self.complete_reported = true;
                self.emit(NodeEvent::Complete);
                if self.config.exit_when_complete {
                    return Exit::Complete;
                }
            }
        }
    }

    fn append(&mut self, feed: usize, blocks: &[Vec<u8>]) -> Result<u64, AppendError> {
        if feed >= self.replicator.feed_count() {
            return Err(AppendError::NoSuchFeed(feed));
        }
        Ok(self.replicator.append(feed, blocks)?)
    }

    fn on_tick(&mut self, now: Instant) {
        let tick = self.clock.ticks_at(now);
        if tick <= self.tick {
            return; // a wake-up early within the same tick
        }
        let previous = self.tick;
        self.tick = tick;
        self.replicator.handle_tick(tick);
        if let Some(app) = &mut self.app {
            app.on_tick(&mut self.replicator);
        }
        for conn in self.conns.stalled(now) {
            self.close(conn, DisconnectReason::Stalled);
        }
        if let Some(deadline) = now.checked_sub(CHANNEL_DEADLINE) {
            let replicator = &self.replicator;
            for conn in self
                .conns
                .strangers_since(deadline, |p| replicator.has_channel(p))
            {
                self.close(conn, DisconnectReason::NoChannel);
            }
        }
        // Discovered addresses are dialled as discovery hands them out (bounded in number and
        // in flight), not through the peer book, which would keep every one for good.
        let mut dial = Vec::new();
        if tick / DISCOVERY_EVERY != previous / DISCOVERY_EVERY
            && let Some(d) = &mut self.discovery
        {
            let polled = d.poll(now);
            dial = polled.dial;
            for note in polled.notes {
                self.emit(NodeEvent::Discovery(note));
            }
        }
        if tick / DISCOVERY_EVERY != previous / DISCOVERY_EVERY {
            self.relay_dials(now);
        }
        for addr in self.book.due(tick) {
            self.book.dialing(&addr, tick);
            dial.push(addr);
        }
        for addr in dial {
            self.rt.spawn(net::dial(
                addr,
                self.config.identity.clone(),
                self.inbound_tx.clone(),
                self.cancel.child_token(),
            ));
        }
    }

    fn on_inbound(&mut self, ev: Inbound) {
        match ev {
            Inbound::Connected {
                conn,
                remote,
                handshake_hash,
                initiator,
                addr,
                relayed,
                outbound,
                stats,
                cancel,
            } => {
                // From now on this connection's reader waits while the loop holds more than its
                // budget of its messages (see `net::ConnStats`).
                stats
                    .inbound_budget
                    .store(net::INBOUND_BUDGET, std::sync::atomic::Ordering::Release);
                let incoming = Incoming {
                    conn,
                    remote,
                    initiator,
                    addr,
                    outbound,
                    stats,
                    cancel,
                    relayed,
                };
                let replicator = &self.replicator;
                match self.conns.admit(incoming, |p| replicator.has_channel(p)) {
                    Admission::Refused(reason) => {
                        // Every cancelled dial is reported to the book, or it redials in a loop.
                        if initiator {
                            match reason {
                                RefuseReason::Ourselves => self.book.ourselves(&addr),
                                RefuseReason::TooManyPeers => self.book.failed(&addr, self.tick),
                            }
                        }
                        self.discovery_failed(initiator, &addr);
                        self.emit(NodeEvent::PeerRefused { addr, reason });
                    }
                    Admission::Duplicate { peer } => {
                        if initiator {
                            self.book.duplicate(&addr);
                            self.aliases.entry(peer).or_default().insert(addr);
                            if let Some(d) = &self.discovery {
                                d.duplicate(&addr, Instant::now());
                            }
                        }
                    }
                    Admission::Accepted {
                        peer,
                        replaced,
                        evicted,
                    } => {
                        if let Some(stranger) = evicted {
                            self.closed(stranger, DisconnectReason::NoChannel);
                        }
                        if let Some(old) = replaced {
                            if old.initiator && old.addr != addr {
                                book_after_close(
                                    &mut self.book,
                                    &old.addr,
                                    &DisconnectReason::Replaced,
                                    self.tick,
                                );
                                self.aliases.entry(peer).or_default().insert(old.addr);
                            }
                            self.replicator.handle_disconnected(peer);
                            self.emit(NodeEvent::PeerDisconnected {
                                peer,
                                addr: old.addr,
                                reason: DisconnectReason::Replaced,
                            });
                        }
                        if initiator {
                            self.book.connected(&addr);
                            if let Some(d) = &self.discovery {
                                d.connected(&addr, Instant::now());
                            }
                        }
                        self.replicator
                            .handle_connected(peer, &handshake_hash, initiator);
                        if let Some(app) = &mut self.app {
                            app.on_peer(peer, addr);
                        }
                        self.emit(NodeEvent::PeerConnected {
                            peer,
                            addr,
                            initiator,
                            relayed,
                        });
                    }
                }
            }
            Inbound::Message {
                conn,
                message,
                cost,
            } => {
                if let Some(peer) = self.conns.peer(conn) {
                    self.conns.handled(conn, cost);
                    // The replicator answers a goodbye with `Done`; the peer's own reason is
                    // what the user wants to see.
                    if let Message::Goodbye(g) = &message {
                        self.conns.note_goodbye(conn, g.reason);
                    }
                    self.replicator.handle_message(peer, message);
                }
            }
            Inbound::Disconnected { conn, error } => {
                self.close(conn, DisconnectReason::Closed { error });
            }
            Inbound::DialFailed { addr, error } => {
                self.book.failed(&addr, self.tick);
                self.discovery_failed(true, &addr);
                let now = Instant::now();
                let retry_in = match self.discovery.as_ref().and_then(|d| d.retry_in(&addr, now)) {
                    Some(d) => d,
                    None => self.clock.duration(self.retry_in(&addr)),
                };
                self.emit(NodeEvent::DialFailed {
                    addr,
                    error: error.to_string(),
                    retry_in,
                });
            }
            Inbound::RelayFailed { relay, error } => {
                self.emit(NodeEvent::RelayFailed { relay, error });
            }
            Inbound::Writable { .. } => {} // `drive` after every event refills the queues
        }
    }

    /// Tells discovery that a dial it may have handed out came to nothing.
    fn discovery_failed(&self, initiator: bool, addr: &SocketAddr) {
        if initiator && let Some(d) = &self.discovery {
            d.dial_failed(addr, Instant::now());
        }
    }

    /// Ticks until the peer book dials `addr` again (0: now, or not at all).
    fn retry_in(&self, addr: &SocketAddr) -> u64 {
        match self.book.next_attempt(addr) {
            Some(t) if t > self.tick && t <= self.tick + 2 * BACKOFF_MAX => t - self.tick,
            _ => 0,
        }
    }

    /// Closes `conn`, telling the replicator and the user if it was the peer's connection.
    fn close(&mut self, conn: ConnId, reason: DisconnectReason) {
        if let Some(c) = self.conns.remove(conn) {
            self.closed(c, reason);
        }
    }

    /// After `c` was removed: the peer book, the replicator and the user learn of it.
    fn closed(&mut self, c: Closed, reason: DisconnectReason) {
        if c.initiator {
            book_after_close(&mut self.book, &c.addr, &reason, self.tick);
        }
        if c.initiator
            && let Some(d) = &self.discovery
        {
            d.disconnected(&c.addr, Instant::now());
        }
        if c.current {
            // Other addresses of this peer were held back while it was connected.
            for addr in self.aliases.remove(&c.peer).unwrap_or_default() {
                if addr != c.addr {
                    self.book.disconnected(&addr, self.tick);
                }
            }
            self.replicator.handle_disconnected(c.peer);
            let reason = match c.goodbye {
                Some(g) => DisconnectReason::Goodbye(g),
                None => reason,
            };
            self.emit(NodeEvent::PeerDisconnected {
                peer: c.peer,
                addr: c.addr,
                reason,
            });
        }
    }

    /// Carries out everything the replicator asked for, then lets it upload where there is room.
    fn drive(&mut self) {
        loop {
            let mut events = Vec::new();
            while let Some(action) = self.replicator.poll_action() {
                match action {
                    Action::Send { peer, message } => {
                        if let Some(conn) = self.conns.conn_of(peer)
                            && let Err(reason) = self.conns.send(conn, message)
                        {
                            self.close(conn, reason); // too slow, or gone
                        }
                    }
                    Action::Disconnect { peer, reason } => {
                        if let Some(conn) = self.conns.conn_of(peer) {
                            let _ = self.conns.send(conn, Message::Goodbye(Goodbye { reason }));
                            self.close(conn, DisconnectReason::from_replicator(reason));
                        }
                    }
                    Action::Event(e) => events.push(e),
                }
            }
            let app_acted = self.app.is_some() && !events.is_empty();
            for e in events {
                if let Some(app) = &mut self.app {
                    app.on_event(&mut self.replicator, &e);
                }
                self.emit(NodeEvent::Replication(e));
            }
            if app_acted {
                continue; // the app may have asked for more
            }
            let uploaded = self.upload();
            // Serving can produce actions (none today), and actions can queue uploads.
            if !uploaded && !self.replicator.has_actions() {
                break;
            }
        }
    }

    /// Pulls answers from the replicator for every connection with room; true if any were.
    fn upload(&mut self) -> bool {
        let mut uploaded = false;
        for (conn, peer) in self.conns.list() {
            if !self.conns.flush_backlog(conn) {
                self.close(conn, DisconnectReason::Closed { error: None });
                continue;
            }
            loop {
                let room = self.conns.room(conn);
                if room == 0 {
                    break;
                }
                let Some(messages) = self.replicator.poll_upload_limited(peer, room) else {
                    break;
                };
                uploaded = true;
                for m in messages {
                    if let Err(reason) = self.conns.send(conn, m) {
                        self.close(conn, reason);
                        break;
                    }
                }
            }
        }
        uploaded
    }

    fn complete(&self) -> bool {
        if let Some(app) = &self.app {
            return app.is_done(&self.replicator);
        }
        let mut any = false;
        for f in 0..self.replicator.feed_count() {
            let feed: &Feed<DiskStorage> = self.replicator.feed(f);
            if feed.is_writable() {
                continue;
            }
            if feed.is_empty() || !self.replicator.is_complete(f) {
                return false;
            }
            any = true;
        }
        any
    }

    /// The ordered stop: no new connections and a goodbye on the LAN; a goodbye to every peer;
    /// the app finishes and every store is flushed; then connections close and the runtime stops.
    /// Everything verified is on disk when this returns.
    fn shutdown(mut self) -> Result<(), StopError> {
        self.listen_cancel.cancel();
        if let Some(d) = self.discovery.take() {
            d.shutdown();
        }
        // The writer closes each connection after sending its goodbye.
        for (conn, _) in self.conns.list() {
            let goodbye = Message::Goodbye(Goodbye {
                reason: GoodbyeReason::Shutdown,
            });
            let _ = self.conns.send(conn, goodbye);
            let _ = self.conns.flush_backlog(conn);
        }
        let mut result = Ok(());
        if let Some(app) = &mut self.app
            && let Err(e) = app.shutdown(&mut self.replicator)
        {
            result = Err(StopError::App(e));
        }
        for feed in 0..self.replicator.feed_count() {
            if let Err(source) = self.replicator.feed_mut(feed).sync() {
                result = Err(StopError::Flush { feed, source });
            }
        }
        // Let the goodbyes leave (each writer ends after sending its goodbye), but not for
        // longer than a moment: a peer that stopped reading does not hold up our exit.
        let deadline = Instant::now() + GOODBYE_GRACE;
        while !self.conns.all_written() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        for c in self.conns.drain() {
            if c.current {
                self.emit(NodeEvent::PeerDisconnected {
                    peer: c.peer,
                    addr: c.addr,
                    reason: DisconnectReason::Shutdown,
                });
            }
        }
        self.cancel.cancel();
        self.rt.shutdown_timeout(Duration::from_secs(1));
        let _ = self.events.try_send(NodeEvent::Stopped);
        result
    }
}

#[cfg(test)]
mod tests;
