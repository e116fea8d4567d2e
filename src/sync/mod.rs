//! The synchronizer: one event loop per node.
//!
//! It runs on its own thread and selects over five sources: the one inbound channel every
//! connection reports into, a control channel ([`Command`]: appends, dials, shutdown), an optional
//! stop channel ([`NodeConfig::stop`], which a binary feeds from its signal handler), the app's
//! [`Waker`], and a timer. It owns the [`Replicator`] and the feed stores, feeds every input into
//! the replicator, and carries out what the replicator asks: messages go to the connection's
//! bounded queue, answers are pulled from the replicator only when a connection has room for them,
//! peers are dialled through the [`PeerBook`](crate::core::peerbook::PeerBook)'s backoff.
//!
//! # Layout
//! - this file: the public surface ([`NodeConfig`], [`spawn`], [`NodeHandle`], [`App`]).
//! - `events.rs`: what a node reports ([`NodeEvent`], [`DisconnectReason`]) and its errors.
//! - `connections.rs`: the live connections: duplicate tie-break, backpressure, stall cutting.
//! - `node.rs`: start (bind on the caller's thread), the select loop, the ordered shutdown.
//!
//! # Time
//! The replicator counts in ticks of [`NodeConfig::tick`], measured from elapsed real time (a
//! timer that drops missed ticks would slow the core's clock when the loop is busy).
//!
//! # Shutdown
//! On [`Command::Shutdown`], a message on [`NodeConfig::stop`], or the handle dropped, it stops in
//! order: stop accepting connections, tell every peer goodbye, flush the stores to disk, then close
//! the connections and stop the runtime. Everything verified is on disk before it returns.
//! Signals are the binary's business: the library installs no handler and never exits the
//! process, and it never prints; everything it has to say is a [`NodeEvent`].

mod connections;
mod events;
mod node;

pub use events::{AppendError, DisconnectReason, NodeEvent, RefuseReason, StartError, StopError};

use crate::core::Feed;
use crate::core::replicator::{Config, Event, FeedId, Replicator};
use crate::net::Identity;
use crate::storage::DiskStorage;
use crossbeam_channel::{Receiver, Sender};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

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
    /// Length of one replicator tick. The tick count is measured from elapsed time, so a busy
    /// loop does not slow the replicator's clock.
    pub tick: Duration,
    /// Replicator tuning (timeouts are in ticks).
    pub replicator: Config,
    /// Stop by itself once every downloading feed holds every block of the newest length a peer
    /// proved (with at least one peer having proved one).
    pub exit_when_complete: bool,
    /// Any message here (or the sender dropped) starts the ordered shutdown, as
    /// [`Command::Shutdown`] does. A binary forwards its first SIGINT/SIGTERM here.
    pub stop: Option<Receiver<()>>,
    /// A connection whose queue stays full, with nothing drained, for this long is cut.
    pub stall_timeout: Duration,
    /// Announce and find peers on the LAN over mDNS (needs `listen`). Off by default: it joins
    /// multicast on every interface, which tests may do only inside their own network namespace.
    pub discovery: Option<crate::discovery::DiscoveryConfig>,
    /// Connections kept at most; a new peer beyond this is turned away.
    pub max_peers: usize,
    /// Blind relays (`feedsync relay`) to meet peers through when no direct path works: a
    /// listening node waits on each for peers of its feeds, and a feed with no peer for
    /// [`RELAY_GRACE`] is dialled through them (direct dials go on, and win when they work).
    pub relays: Vec<SocketAddr>,
}

/// How long a feed goes without a peer before it is dialled through a relay.
pub const RELAY_GRACE: Duration = Duration::from_secs(2);
/// Feeds a node meets peers for at relays (the first ones it serves: a folder's metadata
/// feed comes first). Each costs one waiting connection per relay.
pub const RELAY_FEEDS: usize = 16;

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
            stop: None,
            stall_timeout: Duration::from_secs(30),
            discovery: None,
            max_peers: DEFAULT_MAX_PEERS,
            relays: Vec::new(),
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// Peers kept at most by default (see [`NodeConfig::max_peers`]).
pub const DEFAULT_MAX_PEERS: usize = 128;

/// Every address of this host, port 0: IPv6 dual-stack where the host has IPv6, else IPv4.
pub fn any_address() -> SocketAddr {
    let ip: std::net::IpAddr = if std::net::TcpListener::bind("[::]:0").is_ok() {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    };
    SocketAddr::new(ip, 0)
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
        reply: Sender<Result<u64, AppendError>>,
    },
    /// Dial another address.
    AddPeer(SocketAddr),
    /// Shut down in order (as on SIGTERM).
    Shutdown,
}

/// A node running on its own thread.
pub struct NodeHandle {
    /// Send commands here.
    pub control: Sender<Command>,
    /// Events arrive here.
    pub events: Receiver<NodeEvent>,
    thread: std::thread::JoinHandle<Result<(), StopError>>,
}

impl NodeHandle {
    /// Asks the node to stop and waits for it.
    pub fn shutdown(self) -> Result<(), StopError> {
        let _ = self.control.send(Command::Shutdown);
        self.join()
    }

    /// Waits for the node to stop by itself.
    pub fn join(self) -> Result<(), StopError> {
        self.thread.join().unwrap_or(Err(StopError::Panicked))
    }

    /// Appends to a feed this node writes; returns the feed's new length.
    pub fn append(&self, feed: FeedId, blocks: Vec<Vec<u8>>) -> Result<u64, AppendError> {
        let (reply, rx) = crossbeam_channel::bounded(1);
        self.control
            .send(Command::Append {
                feed,
                blocks,
                reply,
            })
            .map_err(|_| AppendError::Stopped)?;
        // A command sent just before the loop ended stays in the channel's buffer (crossbeam's
        // bounded channel keeps buffered messages, and with them our reply sender, until the
        // last handle goes), so a plain `recv` could wait forever: watch the thread too.
        loop {
            match rx.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(result) => return result,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(AppendError::Stopped);
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if self.thread.is_finished() {
                        // It may have answered in the meantime.
                        return rx.try_recv().unwrap_or(Err(AppendError::Stopped));
                    }
                }
            }
        }
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
    /// A connection to `peer` (a session number, as in replication events) came up from or to
    /// `addr`: for per-peer accounting and reports (who served what).
    fn on_peer(&mut self, _peer: crate::core::replicator::PeerId, _addr: std::net::SocketAddr) {}
    /// The app's own source fired (see [`Waker`]).
    fn on_wake(&mut self, _replicator: &mut Replicator<DiskStorage>) {}
    /// When the tick count advanced: at most once per wake-up of the timer, so several ticks
    /// may have passed since the last call when the loop was busy.
    fn on_tick(&mut self, replicator: &mut Replicator<DiskStorage>);
    /// Whether the job is done, for [`NodeConfig::exit_when_complete`].
    fn is_done(&self, replicator: &Replicator<DiskStorage>) -> bool;
    /// During ordered shutdown, before the stores are synced: finish and flush.
    fn shutdown(&mut self, replicator: &mut Replicator<DiskStorage>) -> io::Result<()>;
}

/// Starts a node on its own thread. `feeds` are `(feed, download)` pairs. The listener is
/// bound before this returns, so a taken port is an error here, not later.
pub fn spawn(config: NodeConfig, feeds: Feeds) -> Result<NodeHandle, StartError> {
    spawn_with(config, feeds, None)
}

/// [`spawn`] with an [`App`] on the loop.
pub fn spawn_with(
    config: NodeConfig,
    feeds: Feeds,
    app: Option<Box<dyn App>>,
) -> Result<NodeHandle, StartError> {
    let bound = node::bind(config.listen)?;
    let (control, control_rx) = crossbeam_channel::bounded(64);
    // Events are informational and dropped when nobody reads them; 8,192 covers bursts.
    let (events_tx, events) = crossbeam_channel::bounded(8192);
    let thread = std::thread::Builder::new()
        .name("feedsync-sync".into())
        .spawn(move || node::Node::start(bound, config, feeds, app, events_tx).run(&control_rx))
        .map_err(StartError::Thread)?;
    Ok(NodeHandle {
        control,
        events,
        thread,
    })
}

/// Why [`run`] or [`run_with`] ended badly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The node did not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The node stopped with an error.
    #[error(transparent)]
    Stop(#[from] StopError),
}

/// Runs a node on the current thread until it is told to stop (a [`Command::Shutdown`], a
/// message on [`NodeConfig::stop`], `control` closed) or, with `exit_when_complete`, its feeds
/// are complete.
pub fn run(
    config: NodeConfig,
    feeds: Feeds,
    control: Receiver<Command>,
    events: Sender<NodeEvent>,
) -> Result<(), RunError> {
    run_with(config, feeds, None, control, events)
}

/// [`run`] with an [`App`] on the loop.
pub fn run_with(
    config: NodeConfig,
    feeds: Feeds,
    app: Option<Box<dyn App>>,
    control: Receiver<Command>,
    events: Sender<NodeEvent>,
) -> Result<(), RunError> {
    let bound = node::bind(config.listen)?;
    Ok(node::Node::start(bound, config, feeds, app, events).run(&control)?)
}

#[cfg(test)]
mod tests;
