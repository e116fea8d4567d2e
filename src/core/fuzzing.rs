//! A harness that drives one [`Replicator`] with an arbitrary sequence of inputs from two peers:
//! a keyless stranger and a peer that knows both feeds' keys (its `Open`s carry valid
//! capabilities, and the harness signs statuses of any length for it, as a hostile writer
//! could). The cargo-fuzz target `fuzz/fuzz_targets/replicator_messages.rs` and a plain test over
//! seeded random inputs (`tests/sim_hostile.rs`) share it, so the fuzzing runs even where
//! cargo-fuzz is not installed.
//!
//! After every input it checks what must hold whatever a peer sends: no panic, every message the
//! replicator emits encodes (a refused message is one the peer never gets), and the entries it
//! holds stay within [`budget`].

use crate::core::crypto;
use crate::core::feed::Feed;
use crate::core::replicator::{Action, Config, PeerId, Replicator};
use crate::core::storage::MemoryStorage;
use ed25519_dalek::SigningKey;
use feedsync_protocol::{
    Block, BlockSet, Cancel, Close, Data, Have, MAX_FEED_LENGTH, Message, NoData, Node, Open, Ping,
    Request, Status, Upgrade, Want, decode, encode,
};

/// The stranger (never proves a key).
const STRANGER: PeerId = 1;
/// The peer that knows the keys.
const KEYED: PeerId = 2;
/// Blocks of the feed we write (feed 0).
const WRITTEN: u64 = 40;
/// Most runs kept per peer and feed in the harness (small, so the cap is reached).
const MAX_PEER_RUNS: usize = 64;

/// Most entries the harness's replicator may hold: for each of the two peers, two feeds of
/// capped have runs and a full upload queue, plus our requests and the actions of one input.
pub fn budget() -> usize {
    2 * (2 * MAX_PEER_RUNS + 1024) + 4096
}

/// Reads the input front to back; running out of bytes reads zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn word(&mut self) -> u64 {
        let mut w = [0u8; 8];
        for b in &mut w {
            *b = self.byte();
        }
        u64::from_le_bytes(w)
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

/// The node under test, the keys its peers may use, and the sessions' handshake hashes.
struct World {
    r: Replicator<MemoryStorage>,
    keys: [SigningKey; 2],
    now: u64,
    sessions: u64,
}

impl World {
    fn new() -> Self {
        let keys = [
            SigningKey::from_bytes(&[31u8; 32]),
            SigningKey::from_bytes(&[32u8; 32]),
        ];
        let mut r = Replicator::new(Config {
            max_peer_runs: MAX_PEER_RUNS,
            ..Config::default()
        });
        let mut written = Feed::create(MemoryStorage::new(), keys[0].clone()).expect("memory");
        let blocks: Vec<Vec<u8>> = (0..WRITTEN).map(|i| vec![i as u8; 100]).collect();
        written.append_batch(&blocks).expect("memory");
        r.add_feed(written, false);
        let replica =
            Feed::create_replica(MemoryStorage::new(), keys[1].verifying_key().to_bytes())
                .expect("memory");
        r.add_feed(replica, true);
        let mut w = Self {
            r,
            keys,
            now: 0,
            sessions: 0,
        };
        w.connect(STRANGER);
        w.connect(KEYED);
        w
    }

    fn session(&self, peer: PeerId) -> [u8; 16] {
        let mut hh = [0u8; 16];
        hh[..8].copy_from_slice(&peer.to_le_bytes());
        hh[8..].copy_from_slice(&self.sessions.to_le_bytes());
        hh
    }

    /// (Re)connects `peer`, which dialled us; the keyed one opens both feeds with valid
    /// capabilities.
    fn connect(&mut self, peer: PeerId) {
        if self.r.is_banned(peer) {
            return; // it stays away, as the synchronizer would keep it
        }
        self.sessions += 1;
        let hh = self.session(peer);
        self.r.handle_connected(peer, &hh, false);
        if peer == KEYED {
            for (channel, key) in self.keys.clone().iter().enumerate() {
                let pk = key.verifying_key().to_bytes();
                let open = Message::Open(Open {
                    channel: channel as u32,
                    discovery_key: crypto::discovery_key(&pk),
                    capability: crypto::capability(&pk, &hh, true),
                });
                self.r.handle_message(peer, open);
            }
        }
    }

    /// Carries out the replicator's actions, checking each message it emits.
    fn drain(&mut self) {
        let mut n = 0;
        while let Some(action) = self.r.poll_action() {
            n += 1;
            assert!(
                n <= budget(),
                "one input produced more than {} actions",
                budget()
            );
            match action {
                Action::Send { message, .. } => {
                    encode(&message)
                        .expect("the replicator emitted a message no peer would accept");
                }
                Action::Disconnect { peer, .. } => {
                    self.r.handle_disconnected(peer);
                    self.connect(peer);
                }
                Action::Event(_) => {}
            }
        }
        let held = self.r.footprint().total();
        assert!(
            held <= budget(),
            "replicator holds {held} entries, budget {}",
            budget()
        );
    }
}

/// A message built from a kind and a few words of input: reaches structured messages far more
/// often than decoding random bytes would.
fn build(input: &mut Input<'_>, w: &World) -> Message {
    let kind = input.byte();
    let channel = u32::from(input.byte() % 3);
    let a = input.word();
    let b = input.word();
    // Indices: small, near the maximum, or anything.
    let index = match a % 4 {
        0 => MAX_FEED_LENGTH.saturating_sub(b % 1024 + 1),
        1 => a,
        _ => a % 128,
    };
    let blocks = if b.is_multiple_of(5) {
        let n = (1 + (a >> 8) % 3000) as usize;
        BlockSet::Runs {
            start: index % 1024,
            runs: vec![1 + b % 3; 2 * n - 1],
        }
    } else {
        BlockSet::Range {
            start: index,
            count: if b.is_multiple_of(3) {
                MAX_FEED_LENGTH
            } else {
                b % 200
            },
        }
    };
    match kind % 14 {
        0 => Message::Ping(Ping { nonce: a }),
        1 => Message::Have(Have { channel, blocks }),
        2 => Message::Unhave(Have { channel, blocks }),
        3 => Message::Want(Want { channel, blocks }),
        4 => Message::Unwant(Want { channel, blocks }),
        5 => Message::Request(Request {
            channel,
            id: b,
            index,
            count: (b % 1025) as u32,
            length: a % (WRITTEN + 2),
            upgrade: b & 1 == 1,
        }),
        6 => Message::Cancel(Cancel { channel, id: b }),
        7 => Message::Data(Data {
            channel,
            // Small ids hit our own requests (ids count up from 1).
            id: b % 64,
            index,
            blocks: vec![Block(vec![a as u8; (b % 300) as usize]); (a % 4) as usize],
            nodes: vec![
                Node {
                    index: a % 256,
                    hash: [b as u8; 32],
                    size: b % 1000,
                };
                (b % 6) as usize
            ],
            upgrade: (a & 1 == 1).then(|| Upgrade {
                length: index,
                roots: Vec::new(),
                signature: [0; 64],
            }),
        }),
        8 => Message::NoData(NoData {
            channel,
            id: b % 64,
        }),
        9 => Message::Close(Close { channel }),
        10 => {
            // A status signed with the feed's real key: any length, valid signature.
            let feed = usize::from(channel == 1);
            let length = a % (MAX_FEED_LENGTH + 1);
            let tree_hash = if feed == 0 && length == WRITTEN {
                w.r.feed(0)
                    .signed_tree()
                    .map_or([0; 32], |(_, hash, _)| hash)
            } else {
                *blake3::hash(&b.to_le_bytes()).as_bytes()
            };
            Message::Status(Status {
                channel,
                length,
                tree_hash,
                signature: crypto::sign(&w.keys[feed], &tree_hash, length).to_bytes(),
            })
        }
        11 => Message::Open(Open {
            channel: (a % 1000) as u32,
            discovery_key: *blake3::hash(&b.to_le_bytes()).as_bytes(),
            capability: [a as u8; 32],
        }),
        12 => Message::Pong(Ping { nonce: b }),
        _ => Message::Status(Status {
            channel,
            length: index,
            tree_hash: [a as u8; 32],
            signature: [b as u8; 64],
        }),
    }
}

/// Runs one input (see the module docs). Panics on any violation.
pub fn replicator_messages(data: &[u8]) {
    let mut w = World::new();
    w.drain();
    let mut input = Input(data);
    let mut steps = 0;
    while !input.0.is_empty() && steps < 4096 {
        steps += 1;
        let op = input.byte();
        let peer = if op & 0x80 == 0 { KEYED } else { STRANGER };
        match op & 0x7f {
            // A message from raw bytes, as the transport would hand it over.
            0..=15 => {
                let len = usize::from(input.byte()) * 4;
                if let Ok(m) = decode(input.bytes(len)) {
                    w.r.handle_message(peer, m);
                }
            }
            16..=79 => {
                let m = build(&mut input, &w);
                w.r.handle_message(peer, m);
            }
            // A burst of the same built message (floods).
            80..=87 => {
                let m = build(&mut input, &w);
                for _ in 0..(1 + input.byte() as usize * 8) {
                    w.r.handle_message(peer, m.clone());
                }
            }
            88..=103 => {
                w.now += u64::from(input.byte()) * 4;
                w.r.handle_tick(w.now);
            }
            104..=111 => {
                let _ = w.r.poll_upload(peer);
            }
            112..=115 => {
                w.r.handle_disconnected(peer);
                w.connect(peer);
            }
            116..=119 => {
                let start = input.word() % (WRITTEN + 8);
                let len = u64::from(input.byte());
                let _ = w.r.forget(0, start..start + len);
            }
            _ => {
                let mut want = crate::core::Bitfield::new();
                let start = input.word() % 4096;
                want.set_range(start..start + u64::from(input.byte()), true);
                w.r.set_want(1, Some(want));
            }
        }
        w.drain();
    }
}
