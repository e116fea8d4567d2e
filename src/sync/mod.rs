//! The synchronizer: one event loop per node.
//!
//! It runs on its own thread and selects over four sources: OS signals (signal-hook, forwarded
//! into a channel), the one inbound channel every connection reports into, a control channel
//! (appends, shutdown) and a timer tick. It owns the [`Replicator`] and the feed stores, feeds
//! every input into the replicator, and carries out what the replicator asks: messages go to the
//! connection's bounded queue, answers are pulled from the replicator only when a connection has
//! room for them, peers are dialled through the [`PeerBook`]'s backoff.
//!
//! # Shutdown
//! On the first SIGINT/SIGTERM (or [`Command::Shutdown`]) it stops in order: stop accepting
//! connections, tell every peer goodbye, flush the stores to disk, then close the connections
//! and stop the runtime. Everything verified is on disk before it returns. A second signal exits
//! the process at once (status 130); nothing verified is lost then either, since every stored
//! block was written before it was announced.

use crate::core::peerbook::PeerBook;
use crate::core::replicator::{Action, Config, Event, FeedId, PeerId, Replicator};
use crate::core::{Feed, FeedError};
use crate::net::{self, ConnId, Identity, Inbound};
use crate::storage::DiskStorage;
use crossbeam_channel::{Receiver, Sender, select};
use feedsync_protocol::{Goodbye, GoodbyeReason, Message};
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;

/// Outbound slots kept free for control messages: answers are pulled only above this.
const CONTROL_RESERVE: usize = 8;
/// Block bytes one connection may have queued: answers are pulled only below this, so a slow
/// peer holds at most this much of our memory (plus one answer).
const UPLOAD_BUDGET: usize = 4 * 1024 * 1024;
/// Control messages one connection may have waiting beyond its queue before it counts as too slow.
const BACKLOG_LIMIT: usize = 4096;

/// The feeds a node serves: `(feed, download)` pairs.
pub type Feeds = Vec<(Feed<DiskStorage>, bool)>;

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Address to accept connections on (port 0 picks one; see [`NodeEvent::Listening`]).
    pub listen: Option<SocketAddr>,
    /// Addresses to dial (and redial with backoff).
    pub peers: Vec<SocketAddr>,
    /// This node's identity on the wire.
    pub identity: Identity,
    /// Length of one replicator tick.
    pub tick: Duration,
    /// Replicator tuning (timeouts are in ticks).
    pub replicator: Config,
    /// Stop by itself once every downloading feed holds every block of the newest length a peer
    /// proved (with at least one peer having proved one).
    pub exit_when_complete: bool,
    /// Install SIGINT/SIGTERM handlers (processes do; in-process tests do not).
    pub handle_signals: bool,
    /// A connection whose queue stays full, with nothing drained, for this long is cut.
    pub stall_timeout: Duration,
    /// Announce and find peers on the LAN over mDNS (needs `listen`). Off by default: it joins
    /// multicast on every interface, which tests may do only inside their own network namespace.
    pub discovery: Option<crate::discovery::DiscoveryConfig>,
    /// Connections kept at most; a new peer beyond this is turned away.
    pub max_peers: usize,
}

impl NodeConfig {
    /// Defaults: no listener, no peers, a fresh identity, 10 ms ticks.
    pub fn new() -> Self {
        Self {
            listen: None,
            peers: Vec::new(),
            identity: Identity::generate(),
            tick: Duration::from_millis(10),
            replicator: Config {
                seed: crate::core::crypto::generate_key().to_bytes()[0] as u64,
                ..Config::default()
            },
            exit_when_complete: false,
            handle_signals: false,
            stall_timeout: Duration::from_secs(30),
            discovery: None,
            max_peers: 128,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// Asks a running node to do something.
#[derive(Debug)]
pub enum Command {
    /// Append blocks to a feed this node writes; the new length (or the error) is sent back.
    Append {
        /// The feed.
        feed: FeedId,
        /// The blocks.
        blocks: Vec<Vec<u8>>,
        /// Where the outcome goes.
        reply: Sender<Result<u64, String>>,
    },
    /// Dial another address.
    AddPeer(SocketAddr),
    /// Shut down in order (as on SIGTERM).
    Shutdown,
}

/// What a node reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// The listener is bound to this address.
    Listening(SocketAddr),
    /// A peer connection is up.
    PeerConnected {
        /// The peer.
        peer: PeerId,
        /// Its address.
        addr: SocketAddr,
    },
    /// A peer connection ended.
    PeerDisconnected {
        /// The peer.
        peer: PeerId,
    },
    /// Something the replicator reported.
    Replication(Event),
    /// Every downloading feed is complete.
    Complete,
    /// The node stopped (stores flushed).
    Stopped,
}

/// A node running on its own thread.
pub struct NodeHandle {
    /// Send commands here.
    pub control: Sender<Command>,
    /// Events arrive here.
    pub events: Receiver<NodeEvent>,
    thread: std::thread::JoinHandle<io::Result<()>>,
}

impl NodeHandle {
    /// Asks the node to stop and waits for it.
    pub fn shutdown(self) -> io::Result<()> {
        let _ = self.control.send(Command::Shutdown);
        self.join()
    }

    /// Waits for the node to stop by itself.
    pub fn join(self) -> io::Result<()> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("node thread panicked")))
    }

    /// Appends to a feed this node writes.
    pub fn append(&self, feed: FeedId, blocks: Vec<Vec<u8>>) -> Result<u64, String> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.control
            .send(Command::Append {
                feed,
                blocks,
                reply,
            })
            .map_err(|_| "node stopped".to_string())?;
        rx.recv().map_err(|_| "node stopped".to_string())?
    }
}

/// Wakes a node's loop from another thread (a file watcher, say) so that the [`App`] runs
/// [`App::on_wake`] at once instead of polling on every tick. Wakes coalesce: many calls before
/// the loop runs give one `on_wake`.
#[derive(Debug, Clone)]
pub struct Waker(Sender<()>);

impl Waker {
    /// Asks the loop to call [`App::on_wake`] soon. Never blocks.
    pub fn wake(&self) {
        let _ = self.0.try_send(());
    }
}

/// Application logic that rides on a node's loop, such as a shared folder: it runs on the
/// synchronizer thread with the replicator in hand, so it can read verified blocks, append,
/// and steer what is downloaded without any locking or a second event loop.
pub trait App: Send {
    /// Once, after the feeds were added and before any peer connects.
    fn start(&mut self, replicator: &mut Replicator<DiskStorage>);
    /// Every replication event, after the replicator acted on it.
    fn on_event(&mut self, replicator: &mut Replicator<DiskStorage>, event: &Event);
    /// Once, before [`App::start`]: the handle that wakes the loop for [`App::on_wake`].
    fn set_waker(&mut self, _waker: Waker) {}
    /// The app's own source fired (see [`Waker`]).
    fn on_wake(&mut self, _replicator: &mut Replicator<DiskStorage>) {}
    /// Every tick.
    fn on_tick(&mut self, replicator: &mut Replicator<DiskStorage>);
    /// Whether the job is done, for [`NodeConfig::exit_when_complete`].
    fn is_done(&self, replicator: &Replicator<DiskStorage>) -> bool;
    /// During ordered shutdown, before the stores are synced: finish and flush.
    fn shutdown(&mut self, replicator: &mut Replicator<DiskStorage>) -> io::Result<()>;
}

/// Starts a node on its own thread. `feeds` are `(feed, download)` pairs.
pub fn spawn(config: NodeConfig, feeds: Vec<(Feed<DiskStorage>, bool)>) -> io::Result<NodeHandle> {
    spawn_with(config, feeds, None)
}

/// [`spawn`] with an [`App`] on the loop.
pub fn spawn_with(
    config: NodeConfig,
    feeds: Vec<(Feed<DiskStorage>, bool)>,
    app: Option<Box<dyn App>>,
) -> io::Result<NodeHandle> {
    let (control, control_rx) = crossbeam_channel::bounded(64);
    // Events are informational and dropped when nobody reads them; 8,192 covers bursts.
    let (events_tx, events) = crossbeam_channel::bounded(8192);
    let thread = std::thread::Builder::new()
        .name("feedsync-sync".into())
        .spawn(move || run_with(config, feeds, app, control_rx, events_tx))?;
    Ok(NodeHandle {
        control,
        events,
        thread,
    })
}

struct Conn {
    peer: PeerId,
    addr: SocketAddr,
    initiator: bool,
    outbound: tokio::sync::mpsc::Sender<Message>,
    /// Closes the connection.
    cancel: CancellationToken,
    /// Queued bytes and writes done (shared with the connection's writer).
    stats: std::sync::Arc<net::ConnStats>,
    /// Control messages that did not fit in the queue yet.
    backlog: VecDeque<Message>,
    /// Since when the connection has been full without writing anything, and the write count
    /// then; `None` while it has room or is draining.
    full_since: Option<(u64, u64)>,
}

struct Loop {
    replicator: Replicator<DiskStorage>,
    conns: BTreeMap<ConnId, Conn>,
    by_peer: BTreeMap<PeerId, ConnId>,
    ids: BTreeMap<[u8; 32], PeerId>,
    book: PeerBook<SocketAddr>,
    identity: Identity,
    events: Sender<NodeEvent>,
    tick: u64,
    complete_reported: bool,
    app: Option<Box<dyn App>>,
    max_peers: usize,
}

impl Loop {
    fn emit(&self, e: NodeEvent) {
        // Events are informational; a caller that stops reading does not stall replication.
        let _ = self.events.try_send(e);
    }

    fn peer_id(&mut self, remote: [u8; 32]) -> PeerId {
        let next = self.ids.len() as PeerId + 1;
        *self.ids.entry(remote).or_insert(next)
    }

    fn on_inbound(&mut self, ev: Inbound) {
        match ev {
            Inbound::Connected {
                conn,
                remote,
                handshake_hash,
                initiator,
                addr,
                outbound,
                stats,
                cancel,
            } => {
                if remote == self.identity.public {
                    cancel.cancel(); // dialled ourselves
                    return;
                }
                if self.conns.len() >= self.max_peers
                    && !self
                        .ids
                        .get(&remote)
                        .is_some_and(|p| self.by_peer.contains_key(p))
                {
                    // At the limit: a new peer is turned away (a known peer redialling is
                    // handled below, replacing its old connection).
                    cancel.cancel();
                    return;
                }
                let peer = self.peer_id(remote);
                if let Some(&old) = self.by_peer.get(&peer) {
                    // Both sides dialled: keep the connection whose initiator has the smaller
                    // key, so that both ends keep the same one.
                    let initiator_key =
                        |init: bool| if init { self.identity.public } else { remote };
                    // Same direction twice (the peer redialled, e.g. after a crash): the newer
                    // connection is the live one.
                    let old_initiator = self.conns[&old].initiator;
                    let keep_new = initiator == old_initiator
                        || initiator_key(initiator) < initiator_key(old_initiator);
                    if !keep_new {
                        cancel.cancel();
                        return;
                    }
                    self.drop_conn(old);
                }
                if initiator {
                    self.book.connected(&addr);
                }
                self.conns.insert(
                    conn,
                    Conn {
                        peer,
                        addr,
                        initiator,
                        outbound,
                        stats,
                        cancel,
                        backlog: VecDeque::new(),
                        full_since: None,
                    },
                );
                self.by_peer.insert(peer, conn);
                self.replicator
                    .handle_connected(peer, &handshake_hash, initiator);
                self.emit(NodeEvent::PeerConnected { peer, addr });
            }
            Inbound::Message { conn, message } => {
                if let Some(c) = self.conns.get(&conn) {
                    let peer = c.peer;
                    self.replicator.handle_message(peer, message);
                }
            }
            Inbound::Disconnected { conn, .. } => {
                if let Some(c) = self.conns.get(&conn) {
                    if c.initiator {
                        let addr = c.addr;
                        self.book.disconnected(&addr, self.tick);
                    }
                    self.drop_conn(conn);
                }
            }
            Inbound::DialFailed { addr, .. } => self.book.failed(&addr, self.tick),
            Inbound::Writable { .. } => {} // `drive` after every event refills the queues
        }
    }

    fn drop_conn(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        // Closes the socket and ends both tasks, even if a write to a peer that stopped reading
        // is blocked (dropping `outbound` alone would wait for that write forever).
        c.cancel.cancel();
        if self.by_peer.get(&c.peer) == Some(&conn) {
            self.by_peer.remove(&c.peer);
            self.replicator.handle_disconnected(c.peer);
            self.emit(NodeEvent::PeerDisconnected { peer: c.peer });
        }
    }

    /// Queues `message` for `conn`; false if the connection is gone or hopelessly behind.
    fn send(&mut self, conn: ConnId, message: Message) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        c.stats.queued.fetch_add(
            net::payload_len(&message),
            std::sync::atomic::Ordering::AcqRel,
        );
        if !c.backlog.is_empty() {
            c.backlog.push_back(message);
            return c.backlog.len() <= BACKLOG_LIMIT;
        }
        match c.outbound.try_send(message) {
            Ok(()) => true,
            Err(TrySendError::Full(m)) => {
                c.backlog.push_back(m);
                true
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }

    fn flush_backlog(&mut self, conn: ConnId) -> bool {
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

    /// Carries out everything the replicator asked for, then lets it upload where there is room.
    fn drive(&mut self) {
        loop {
            let mut events = Vec::new();
            while let Some(action) = self.replicator.poll_action() {
                match action {
                    Action::Send { peer, message } => {
                        if let Some(&conn) = self.by_peer.get(&peer)
                            && !self.send(conn, message)
                        {
                            self.drop_conn(conn); // too slow, or gone
                        }
                    }
                    Action::Disconnect { peer, reason } => {
                        if let Some(&conn) = self.by_peer.get(&peer) {
                            let _ = self.send(conn, Message::Goodbye(Goodbye { reason }));
                            self.drop_conn(conn);
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
            let mut uploaded = false;
            let conns: Vec<(ConnId, PeerId)> =
                self.conns.iter().map(|(id, c)| (*id, c.peer)).collect();
            for (conn, peer) in conns {
                if !self.flush_backlog(conn) {
                    self.drop_conn(conn);
                    continue;
                }
                loop {
                    let c = &self.conns[&conn];
                    if !c.backlog.is_empty()
                        || c.outbound.capacity() <= CONTROL_RESERVE
                        || c.stats.queued.load(std::sync::atomic::Ordering::Acquire)
                            >= UPLOAD_BUDGET
                    {
                        break;
                    }
                    let Some(messages) = self.replicator.poll_upload(peer) else {
                        break;
                    };
                    uploaded = true;
                    for m in messages {
                        if !self.send(conn, m) {
                            break;
                        }
                    }
                }
            }
            // Serving can produce actions (none today), and actions can queue uploads.
            if !uploaded && !self.replicator.has_actions() {
                break;
            }
        }
    }

    /// Cuts connections that have been full for longer than `stall` ticks: a peer that does not
    /// read what it asked for may not hold our memory or our upload slot forever.
    fn cut_stalled(&mut self, stall: u64) {
        let mut stalled = Vec::new();
        for (&id, c) in self.conns.iter_mut() {
            let full = !c.backlog.is_empty()
                || c.outbound.capacity() <= CONTROL_RESERVE
                || c.stats.queued.load(std::sync::atomic::Ordering::Acquire) >= UPLOAD_BUDGET;
            let writes = c.stats.writes.load(std::sync::atomic::Ordering::Acquire);
            match (full, c.full_since) {
                (false, _) => c.full_since = None,
                // Full but draining: a busy healthy connection, not a stalled one.
                (true, Some((_, w))) if w != writes => c.full_since = Some((self.tick, writes)),
                (true, None) => c.full_since = Some((self.tick, writes)),
                (true, Some((t, _))) if self.tick.saturating_sub(t) > stall => stalled.push(id),
                (true, Some(_)) => {}
            }
        }
        for id in stalled {
            self.drop_conn(id);
        }
    }

    fn complete(&self) -> bool {
        if let Some(app) = &self.app {
            return app.is_done(&self.replicator);
        }
        let mut any = false;
        for f in 0..self.replicator.feed_count() {
            let feed = self.replicator.feed(f);
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
}

/// Runs a node on the current thread until it is told to stop, a signal arrives, or (with
/// `exit_when_complete`) its feeds are complete.
pub fn run(
    config: NodeConfig,
    feeds: Vec<(Feed<DiskStorage>, bool)>,
    control: Receiver<Command>,
    events: Sender<NodeEvent>,
) -> io::Result<()> {
    run_with(config, feeds, None, control, events)
}

/// [`run`] with an [`App`] on the loop.
pub fn run_with(
    config: NodeConfig,
    feeds: Vec<(Feed<DiskStorage>, bool)>,
    app: Option<Box<dyn App>>,
    control: Receiver<Command>,
    events: Sender<NodeEvent>,
) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let cancel = CancellationToken::new();
    let listen_cancel = cancel.child_token();
    let (in_tx, in_rx) = crossbeam_channel::bounded::<Inbound>(4096);

    let (sig_tx, sig_rx) = crossbeam_channel::bounded::<i32>(4);
    let signals = if config.handle_signals {
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ])?;
        let handle = signals.handle();
        std::thread::Builder::new()
            .name("feedsync-signals".into())
            .spawn(move || {
                for s in signals.forever() {
                    if sig_tx.send(s).is_err() {
                        break;
                    }
                }
            })?;
        Some(handle)
    } else {
        None
    };

    let mut replicator = Replicator::new(config.replicator.clone());
    for (feed, download) in feeds {
        replicator.add_feed(feed, download);
    }
    let mut lp = Loop {
        replicator,
        conns: BTreeMap::new(),
        by_peer: BTreeMap::new(),
        ids: BTreeMap::new(),
        book: PeerBook::new(50, 3000, config.replicator.seed),
        identity: config.identity.clone(),
        events,
        tick: 0,
        complete_reported: false,
        app,
        max_peers: config.max_peers,
    };
    let (wake_tx, wake_rx) = crossbeam_channel::bounded::<()>(1);
    if let Some(app) = &mut lp.app {
        app.set_waker(Waker(wake_tx));
        app.start(&mut lp.replicator);
    }
    lp.drive();
    let mut discovery = None;
    if let Some(addr) = config.listen {
        let listener = rt.block_on(tokio::net::TcpListener::bind(addr))?;
        let local = listener.local_addr()?;
        if let Some(dc) = &config.discovery {
            let keys: Vec<[u8; 32]> = (0..lp.replicator.feed_count())
                .map(|f| lp.replicator.feed(f).discovery_key())
                .collect();
            match crate::discovery::Discovery::start(
                &config.identity.public,
                local.port(),
                &keys,
                dc,
            ) {
                Ok(d) => discovery = Some(d),
                // Discovery is a convenience: named peers still work without it.
                Err(e) => eprintln!("feedsync: LAN discovery is off: {e}"),
            }
        }
        lp.emit(NodeEvent::Listening(local));
        rt.spawn(net::listen(
            listener,
            config.identity.clone(),
            in_tx.clone(),
            listen_cancel.clone(),
        ));
    }
    for p in &config.peers {
        lp.book.add(*p);
    }
    let ticker = crossbeam_channel::tick(config.tick);
    let stall_ticks = (config.stall_timeout.as_millis() / config.tick.as_millis().max(1)) as u64;

    loop {
        select! {
            recv(sig_rx) -> _ => break,
            recv(control) -> cmd => match cmd {
                Ok(Command::Append { feed, blocks, reply }) => {
                    let r = if feed < lp.replicator.feed_count() {
                        lp.replicator.append(feed, &blocks).map_err(|e: FeedError| e.to_string())
                    } else {
                        Err(format!("no feed {feed}"))
                    };
                    let _ = reply.send(r);
                }
                Ok(Command::AddPeer(addr)) => lp.book.add(addr),
                Ok(Command::Shutdown) | Err(_) => break,
            },
            recv(in_rx) -> ev => {
                // Invariant: we hold a sender ourselves, so the channel never disconnects.
                lp.on_inbound(ev.expect("inbound channel open while the loop holds a sender"));
                // Take whatever else is waiting before driving, to batch the work.
                for _ in 0..256 {
                    match in_rx.try_recv() {
                        Ok(ev) => lp.on_inbound(ev),
                        Err(_) => break,
                    }
                }
            },
            recv(wake_rx) -> _ => {
                if let Some(app) = &mut lp.app {
                    app.on_wake(&mut lp.replicator);
                }
            },
            recv(ticker) -> _ => {
                lp.tick += 1;
                lp.replicator.handle_tick(lp.tick);
                if let Some(app) = &mut lp.app {
                    app.on_tick(&mut lp.replicator);
                }
                lp.cut_stalled(stall_ticks);
                if lp.tick.is_multiple_of(10)
                    && let Some(d) = &mut discovery
                {
                    for addr in d.poll() {
                        lp.book.add(addr);
                    }
                }
                for addr in lp.book.due(lp.tick) {
                    lp.book.dialing(&addr, lp.tick);
                    rt.spawn(net::dial(addr, config.identity.clone(), in_tx.clone(), cancel.child_token()));
                }
            },
        }
        lp.drive();
        if !lp.complete_reported && lp.complete() {
            lp.complete_reported = true;
            lp.emit(NodeEvent::Complete);
            if config.exit_when_complete {
                break;
            }
        }
    }

    // From here on, a second signal ends the process at once.
    if config.handle_signals {
        let second = sig_rx.clone();
        let _ = std::thread::Builder::new()
            .name("feedsync-force-exit".into())
            .spawn(move || {
                if second.recv().is_ok() {
                    std::process::exit(130);
                }
            });
    }
    // Ordered shutdown. 1: no new connections, and a goodbye on the LAN.
    listen_cancel.cancel();
    if let Some(d) = discovery.take() {
        d.shutdown();
    }
    // 2: goodbye to every peer (the writer closes the connection after sending it).
    let conns: Vec<ConnId> = lp.conns.keys().copied().collect();
    for conn in &conns {
        let _ = lp.send(
            *conn,
            Message::Goodbye(Goodbye {
                reason: GoodbyeReason::Shutdown,
            }),
        );
        let _ = lp.flush_backlog(*conn);
    }
    // 3: the app finishes (a folder publishes what is complete), then everything verified is
    // made durable.
    let mut result = Ok(());
    if let Some(app) = &mut lp.app
        && let Err(e) = app.shutdown(&mut lp.replicator)
    {
        result = Err(e);
    }
    for f in 0..lp.replicator.feed_count() {
        if let Err(e) = lp.replicator.feed_mut(f).sync() {
            result = Err(io::Error::other(e.to_string()));
        }
    }
    // 4: close connections (give the goodbyes a moment to leave), stop the runtime.
    drop(lp.conns);
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
    cancel.cancel();
    rt.shutdown_timeout(Duration::from_secs(1));
    if let Some(h) = signals {
        h.close();
    }
    let _ = lp.events.try_send(NodeEvent::Stopped);
    result
}
