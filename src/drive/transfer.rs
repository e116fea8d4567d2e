//! Who served whom: a folder's bytes per peer this session, counted from replication events,
//! for `status.json` (`uploaded` and `transfer`). A swarm is judged by these figures: the
//! seeder's uplink should be spent about once, and readers should serve each other.

use crate::core::replicator::{Event, FeedId, PeerId};
use serde::Serialize;
use std::collections::BTreeMap;

/// Peers [`Transfers`] keeps figures for. How many peers come and go is up to the peers, so
/// the list is capped, or a stream of fresh identities would grow it without end.
pub const MAX_PEERS_KEPT: usize = 256;

/// What went to and from one peer this session, for `status`.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct PeerTransfer {
    /// The session's number for the peer (it keeps it across reconnections).
    pub peer: PeerId,
    /// Its address (`ip:port`) on the latest connection, when the node told it.
    pub addr: Option<String>,
    /// Bytes of verified blocks of this folder received from it.
    pub received: u64,
    /// Bytes of blocks of this folder sent to it.
    pub sent: u64,
}

/// Counts a folder's bytes per peer from replication events: who served whom. Only the events
/// of the folder's own feeds count (a daemon runs several folders on one node, and every
/// folder sees every event).
#[derive(Debug, Default)]
pub struct Transfers {
    /// Per peer, its figures and when it was last active (a [`Transfers::clock`] value).
    peers: BTreeMap<PeerId, (PeerTransfer, u64)>,
    /// Counts calls, to tell the least recently active peer.
    clock: u64,
    /// All bytes sent (kept whole when peers are dropped from the list).
    uploaded: u64,
}

impl Transfers {
    /// A connection to `peer` came up at `addr`.
    pub fn connected(&mut self, peer: PeerId, addr: std::net::SocketAddr) {
        self.entry(peer).addr = Some(addr.to_string());
    }

    /// Counts `event` if it moved blocks of one of `feeds`.
    pub fn count(&mut self, feeds: &[FeedId], event: &Event) {
        match *event {
            Event::Downloaded {
                feed, peer, bytes, ..
            } if feeds.contains(&feed) => {
                let e = self.entry(peer);
                e.received = e.received.saturating_add(bytes);
            }
            Event::Uploaded {
                feed, peer, bytes, ..
            } if feeds.contains(&feed) => {
                self.uploaded = self.uploaded.saturating_add(bytes);
                let e = self.entry(peer);
                e.sent = e.sent.saturating_add(bytes);
            }
            _ => {}
        }
    }

    /// Bytes sent this session, to all peers.
    pub fn uploaded(&self) -> u64 {
        self.uploaded
    }

    /// The peers' figures, by peer number.
    pub fn list(&self) -> Vec<PeerTransfer> {
        self.peers.values().map(|(t, _)| t.clone()).collect()
    }

    /// `peer`'s figures, made (dropping the least recently active peer when full) if new.
    fn entry(&mut self, peer: PeerId) -> &mut PeerTransfer {
        self.clock += 1;
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_PEERS_KEPT {
            // A scan of at most MAX_PEERS_KEPT, only when a new peer arrives at a full list.
            if let Some(oldest) = self
                .peers
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(p, _)| *p)
            {
                self.peers.remove(&oldest);
            }
        }
        let clock = self.clock;
        let (t, at) = self.peers.entry(peer).or_insert_with(|| {
            (
                PeerTransfer {
                    peer,
                    ..PeerTransfer::default()
                },
                clock,
            )
        });
        *at = clock;
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down(feed: FeedId, peer: PeerId, bytes: u64) -> Event {
        Event::Downloaded {
            feed,
            index: 0,
            count: 1,
            peer,
            bytes,
        }
    }

    fn up(feed: FeedId, peer: PeerId, bytes: u64) -> Event {
        Event::Uploaded {
            peer,
            feed,
            index: 0,
            count: 1,
            bytes,
        }
    }

    #[test]
    fn transfers_count_the_folders_feeds_per_peer() {
        let mut t = Transfers::default();
        let a: std::net::SocketAddr = "10.0.0.2:4000".parse().unwrap();
        t.connected(1, a);
        t.connected(2, "10.0.0.3:4001".parse().unwrap());
        let ours = [4, 5];
        for e in [
            down(4, 1, 100),
            down(5, 1, 50),
            up(5, 2, 70),
            up(4, 1, 30),
            // Another folder's feed on the same node: not ours.
            down(6, 1, 1000),
            up(6, 2, 1000),
        ] {
            t.count(&ours, &e);
        }
        assert_eq!(t.uploaded(), 100);
        assert_eq!(
            t.list(),
            vec![
                PeerTransfer {
                    peer: 1,
                    addr: Some("10.0.0.2:4000".into()),
                    received: 150,
                    sent: 30
                },
                PeerTransfer {
                    peer: 2,
                    addr: Some("10.0.0.3:4001".into()),
                    received: 0,
                    sent: 70
                },
            ]
        );
        // A reconnection keeps the peer's figures and takes its new address.
        t.connected(1, "10.0.0.2:5000".parse().unwrap());
        assert_eq!(t.list()[0].addr.as_deref(), Some("10.0.0.2:5000"));
        assert_eq!(t.list()[0].received, 150);
        // Bytes from a peer the node never named still count.
        t.count(&ours, &down(4, 9, 5));
        assert_eq!(t.list()[2].addr, None);
        assert_eq!(t.list()[2].received, 5);
    }

    #[test]
    fn transfers_keep_a_bounded_list_dropping_the_least_recently_active() {
        let mut t = Transfers::default();
        let addr: std::net::SocketAddr = "10.0.0.2:4000".parse().unwrap();
        for p in 0..MAX_PEERS_KEPT as u64 {
            t.connected(p, addr);
        }
        // Peer 0 is the oldest but active again; peer 1 is now the least recently active.
        t.count(&[0], &up(0, 0, 10));
        for p in 0..1000 {
            t.connected(10_000 + p, addr);
            t.count(&[0], &up(0, 10_000 + p, 1));
        }
        let list = t.list();
        assert_eq!(list.len(), MAX_PEERS_KEPT);
        assert_eq!(
            t.uploaded(),
            1010,
            "the total keeps what dropped peers took"
        );
        assert!(list.iter().all(|e| e.peer >= 10_000), "the newest kept");
        // The oldest kept peer is active again: a newcomer drops the next oldest instead.
        let oldest = 10_000 + 1000 - MAX_PEERS_KEPT as u64;
        t.count(&[0], &up(0, oldest, 1));
        t.connected(20_000, addr);
        let kept: Vec<PeerId> = t.list().iter().map(|e| e.peer).collect();
        assert!(kept.contains(&oldest) && kept.contains(&20_000));
        assert!(!kept.contains(&(oldest + 1)));
    }
}
