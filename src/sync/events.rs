//! What a node tells its owner, and how it fails: typed, so that a CLI can render them and a
//! daemon can log them. The library itself never prints.

use crate::core::FeedError;
use crate::core::replicator::{Event, FeedId, PeerId};
use feedsync_protocol::GoodbyeReason;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

pub use super::connections::RefuseReason;

/// What a node reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// The listener accepts connections on this address.
    Listening(SocketAddr),
    /// A peer connection is up (handshake done, admitted).
    PeerConnected {
        /// The peer.
        peer: PeerId,
        /// Its address.
        addr: SocketAddr,
        /// We dialled it.
        initiator: bool,
        /// Through a blind relay (`addr` is the relay's): kept only until a direct path works.
        relayed: bool,
    },
    /// A peer connection ended.
    PeerDisconnected {
        /// The peer.
        peer: PeerId,
        /// Its address.
        addr: SocketAddr,
        /// Why.
        reason: DisconnectReason,
    },
    /// A dial through a relay came to nothing (nobody waiting there, unreachable, full); the
    /// node tries again on its own schedule while the feed has no peer.
    RelayFailed {
        /// The relay.
        relay: SocketAddr,
        /// Why.
        error: String,
    },
    /// Dialling `addr` gave no connection; the next attempt is in `retry_in`.
    DialFailed {
        /// The address dialled.
        addr: SocketAddr,
        /// Why (connection refused, timed out, handshake failed, ...).
        error: String,
        /// When the peer book tries again.
        retry_in: Duration,
    },
    /// A connection was turned away right after its handshake.
    PeerRefused {
        /// The remote address.
        addr: SocketAddr,
        /// Why.
        reason: RefuseReason,
    },
    /// The process's soft limit on open files was raised to its hard limit at start (every
    /// connection, file and socket takes one; a low limit lets a burst of connections lock out
    /// everything else). Reported once per process.
    DescriptorLimit {
        /// The soft limit before.
        from: u64,
        /// The soft limit now.
        to: u64,
    },
    /// LAN discovery could not start; named peers still work.
    DiscoveryFailed {
        /// Why.
        error: String,
    },
    /// Something LAN discovery reports after its start (its subscription was closed and
    /// browsing started again, or it stopped).
    Discovery(crate::discovery::DiscoveryNote),
    /// Something the replicator reported.
    Replication(Event),
    /// Every downloading feed is complete.
    Complete,
    /// The node stopped (stores flushed).
    Stopped,
}

/// Why a peer connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The peer said goodbye, with its reason.
    Goodbye(GoodbyeReason),
    /// The connection closed without a goodbye: the peer went away, or an I/O or framing error
    /// (`error`) ended it.
    Closed {
        /// What failed, if it was not a clean close.
        error: Option<String>,
    },
    /// A newer connection to the same peer took over (it redialled, or both sides dialled).
    Replaced,
    /// The peer did not read what we queued for it within the stall timeout.
    Stalled,
    /// More than the backlog's byte budget waited to be sent to this peer: it is too far behind
    /// (the decision is per connection; other peers keep theirs).
    Backlogged {
        /// Bytes waiting when it was cut.
        bytes: usize,
    },
    /// The peer opened no channel (knows none of our keys) in time, or was the oldest such
    /// stranger when a newcomer needed its place.
    NoChannel,
    /// The peer sent data that failed verification and is banned for this session.
    Banned,
    /// The peer broke the protocol.
    ProtocolError,
    /// The peer went silent, or left our requests unanswered too often.
    TimedOut,
    /// This node is shutting down.
    Shutdown,
}

impl DisconnectReason {
    /// The reason for a drop the replicator asked for with `goodbye`.
    pub(super) fn from_replicator(goodbye: GoodbyeReason) -> Self {
        match goodbye {
            GoodbyeReason::BadData => DisconnectReason::Banned,
            GoodbyeReason::ProtocolError => DisconnectReason::ProtocolError,
            GoodbyeReason::Timeout => DisconnectReason::TimedOut,
            GoodbyeReason::Shutdown => DisconnectReason::Shutdown,
            // The replicator says `Done` when the peer said goodbye first.
            GoodbyeReason::Done => DisconnectReason::Goodbye(GoodbyeReason::Done),
        }
    }
}

fn goodbye_text(r: GoodbyeReason) -> &'static str {
    match r {
        GoodbyeReason::Shutdown => "it is shutting down",
        GoodbyeReason::ProtocolError => "it says we broke the protocol",
        GoodbyeReason::BadData => "it says we sent bad data",
        GoodbyeReason::Timeout => "it says we were idle or too slow",
        GoodbyeReason::Done => "it is done",
    }
}

impl std::fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DisconnectReason::Goodbye(r) => write!(f, "goodbye: {}", goodbye_text(*r)),
            DisconnectReason::Closed { error: None } => f.write_str("connection closed"),
            DisconnectReason::Closed { error: Some(e) } => write!(f, "connection lost: {e}"),
            DisconnectReason::Replaced => f.write_str("replaced by a newer connection"),
            DisconnectReason::Stalled => f.write_str("stalled: it stopped reading"),
            DisconnectReason::Backlogged { bytes } => write!(
                f,
                "too far behind: {bytes} bytes were waiting to be sent to it"
            ),
            DisconnectReason::NoChannel => f.write_str("it opened no feed we serve"),
            DisconnectReason::Banned => {
                f.write_str("banned: it sent data that failed verification")
            }
            DisconnectReason::ProtocolError => f.write_str("it broke the protocol"),
            DisconnectReason::TimedOut => f.write_str("timed out"),
            DisconnectReason::Shutdown => f.write_str("shutting down"),
        }
    }
}

/// Why a node did not start. Returned by [`super::spawn`] before any thread runs, so a taken
/// port is an error at start, not a surprise at shutdown.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The async runtime could not be built.
    #[error("cannot start the network runtime: {0}")]
    Runtime(#[source] io::Error),
    /// The listen address could not be bound (taken, not ours, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The node's thread could not be started.
    #[error("cannot start the node thread: {0}")]
    Thread(#[source] io::Error),
}

/// What went wrong while a node stopped (everything else was still flushed).
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    /// The app (a folder) failed to finish.
    #[error("{0}")]
    App(#[source] io::Error),
    /// A feed store could not be flushed to disk.
    #[error("flushing feed {feed}: {source}")]
    Flush {
        /// The feed.
        feed: FeedId,
        /// Why.
        source: FeedError,
    },
    /// The node's thread panicked (a bug).
    #[error("the node thread panicked")]
    Panicked,
}

/// Why [`super::NodeHandle::append`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The node is no longer running.
    #[error("the node stopped")]
    Stopped,
    /// The node has no feed with this id.
    #[error("no feed {0}")]
    NoSuchFeed(FeedId),
    /// The feed refused the append (not writable, storage failure, ...).
    #[error(transparent)]
    Feed(#[from] FeedError),
}
