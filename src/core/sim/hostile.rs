//! Hostile nodes in the simulation: a seeded stream of well-framed junk and lies on top of what
//! the node's own replicator says (see [`Hostile`]).

use super::Sim;
use crate::core::crypto;
use ed25519_dalek::SigningKey;
use feedsync_protocol::{
    Block, BlockSet, Cancel, Data, Have, MAX_FEED_LENGTH, Message, NoData, Open, Ping, Request,
    Status, Want,
};

/// How a hostile node misbehaves (see [`Sim::make_hostile`]).
#[derive(Clone)]
pub struct Hostile {
    /// Junk messages sent to every connected peer per tick.
    pub per_tick: u32,
    /// Channel numbers the junk names (`0..channels`; a node's channels are its feed ids).
    pub channels: u32,
    /// A feed it writes (its channel, its signing key): it signs statuses of random lengths up
    /// to `MAX_FEED_LENGTH` — valid signatures, hostile numbers.
    pub writer: Option<(u32, SigningKey)>,
}

impl Sim {
    /// One random, well-framed message a hostile node might send.
    fn junk(&mut self, h: &Hostile) -> Message {
        let channel = (self.random() % u64::from(h.channels.max(1))) as u32;
        // Indices: mostly near the start, sometimes near the protocol's maximum, rarely anything.
        let index = match self.random() % 8 {
            0 => MAX_FEED_LENGTH - 1 - self.random() % 1024,
            1 => self.random(),
            _ => self.random() % 256,
        };
        let count = match self.random() % 4 {
            0 => MAX_FEED_LENGTH - index.min(MAX_FEED_LENGTH),
            _ => self.random() % 64,
        };
        let blocks = if self.random().is_multiple_of(4) {
            // Fragmented: many single-block runs.
            let n = 1 + self.random() % 2000;
            BlockSet::Runs {
                start: self.random() % 1024,
                runs: vec![1; n as usize * 2 - 1],
            }
        } else {
            BlockSet::Range {
                start: index,
                count,
            }
        };
        match self.random() % 12 {
            0 | 1 => Message::Ping(Ping {
                nonce: self.random(),
            }),
            2 => Message::Pong(Ping {
                nonce: self.random(),
            }),
            3 => Message::Have(Have { channel, blocks }),
            4 => Message::Unhave(Have { channel, blocks }),
            5 => Message::Want(Want { channel, blocks }),
            6 => Message::Unwant(Want { channel, blocks }),
            7 => Message::Request(Request {
                channel,
                id: self.random(),
                index,
                count: (self.random() % 1025) as u32,
                length: self.random() % 1024,
                upgrade: self.random().is_multiple_of(2),
            }),
            8 => Message::Cancel(Cancel {
                channel,
                id: self.random(),
            }),
            9 => Message::Data(Data {
                channel,
                id: self.random(),
                index,
                blocks: vec![Block(vec![7; 64])],
                nodes: Vec::new(),
                upgrade: None,
            }),
            10 => Message::NoData(NoData {
                channel,
                id: self.random(),
            }),
            _ => match &h.writer {
                Some((channel, key)) => {
                    let length = self.random() % (MAX_FEED_LENGTH + 1);
                    let tree_hash = *blake3::hash(&self.random().to_le_bytes()).as_bytes();
                    let signature = crypto::sign(key, &tree_hash, length).to_bytes();
                    Message::Status(Status {
                        channel: *channel,
                        length,
                        tree_hash,
                        signature,
                    })
                }
                None => Message::Open(Open {
                    channel: (self.random() % 1024) as u32,
                    discovery_key: *blake3::hash(&self.random().to_le_bytes()).as_bytes(),
                    capability: [0; 32],
                }),
            },
        }
    }

    /// Every hostile node floods each of its peers, and claims to hold every block of every
    /// channel (a lie it keeps repeating).
    pub(super) fn misbehave(&mut self) {
        let hostile: Vec<(usize, Hostile)> =
            self.hostile.iter().map(|(n, h)| (*n, h.clone())).collect();
        for (node, h) in hostile {
            let peers: Vec<usize> = self
                .links
                .keys()
                .filter_map(|&(a, b)| match (a == node, b == node) {
                    (true, _) => Some(b),
                    (_, true) => Some(a),
                    _ => None,
                })
                .collect();
            for peer in peers {
                for channel in 0..h.channels {
                    let lie = Message::Have(Have {
                        channel,
                        blocks: BlockSet::Range {
                            start: 0,
                            count: MAX_FEED_LENGTH,
                        },
                    });
                    self.transmit(node, peer, lie);
                }
                for _ in 0..h.per_tick {
                    let m = self.junk(&h);
                    self.transmit(node, peer, m);
                }
            }
        }
    }
}
