//! Nodes over real TCP on loopback, in one process: encrypted connections, swarm replication,
//! live appends, and what an observer of the wire sees.

use ed25519_dalek::SigningKey;
use feedsync::core::{BanReason, Event, Feed, VerifyError};
use feedsync::storage::DiskStorage;
use feedsync::sync::{self, NodeConfig, NodeEvent, NodeHandle};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

mod common;
use common::{block, recording_proxy};

/// Waits for an event matching `want` from `node`, failing after `secs` seconds.
fn wait_for(
    node: &NodeHandle,
    secs: u64,
    what: &str,
    mut want: impl FnMut(&NodeEvent) -> bool,
) -> NodeEvent {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for {what}");
        if let Ok(e) = node.events.recv_timeout(left)
            && want(&e)
        {
            return e;
        }
    }
}

fn listening(node: &NodeHandle) -> SocketAddr {
    match wait_for(node, 10, "the listener", |e| {
        matches!(e, NodeEvent::Listening(_))
    }) {
        NodeEvent::Listening(a) => a,
        _ => unreachable!(),
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

struct Writer {
    node: NodeHandle,
    addr: SocketAddr,
    key: SigningKey,
}

fn start_writer(dir: &std::path::Path, blocks: u64, size: usize) -> Writer {
    start_writer_with(dir, blocks, size, NodeConfig::new())
}

fn start_writer_with(
    dir: &std::path::Path,
    blocks: u64,
    size: usize,
    config: NodeConfig,
) -> Writer {
    let key = SigningKey::from_bytes(&[61u8; 32]);
    let mut feed =
        Feed::create(DiskStorage::open(dir.join("writer")).unwrap(), key.clone()).unwrap();
    let data: Vec<Vec<u8>> = (0..blocks).map(|i| block(i, size)).collect();
    for chunk in data.chunks(64) {
        feed.append_batch(chunk).unwrap();
    }
    let config = NodeConfig {
        listen: Some(loopback()),
        ..config
    };
    let node = sync::spawn(config, vec![(feed, false)]).unwrap();
    let addr = listening(&node);
    Writer { node, addr, key }
}

fn start_reader(
    dir: &std::path::Path,
    name: &str,
    key: &SigningKey,
    peers: Vec<SocketAddr>,
    listen: bool,
) -> (NodeHandle, Option<SocketAddr>) {
    let store = DiskStorage::open(dir.join(name)).unwrap();
    let feed = match Feed::open(store) {
        Ok(f) => f,
        Err(_) => Feed::create_replica(
            DiskStorage::open(dir.join(name)).unwrap(),
            key.verifying_key().to_bytes(),
        )
        .unwrap(),
    };
    let config = NodeConfig {
        listen: listen.then(loopback),
        peers,
        ..NodeConfig::new()
    };
    let node = sync::spawn(config, vec![(feed, true)]).unwrap();
    let addr = listen.then(|| listening(&node));
    (node, addr)
}

fn check_store(dir: &std::path::Path, name: &str, blocks: u64, size: usize) {
    let mut f = Feed::open(DiskStorage::open(dir.join(name)).unwrap()).unwrap();
    assert_eq!(f.len(), blocks);
    for i in 0..blocks {
        assert_eq!(f.get(i).unwrap(), block(i, size), "{name}: block {i}");
    }
    f.verify_all().unwrap();
}

#[test]
fn two_readers_replicate_over_noise_and_follow_live_appends() {
    let dir = tempfile::tempdir().unwrap();
    let w = start_writer(dir.path(), 300, 20_000);
    let (r1, r1_addr) = start_reader(dir.path(), "r1", &w.key, vec![w.addr], true);
    let (r2, _) = start_reader(
        dir.path(),
        "r2",
        &w.key,
        vec![w.addr, r1_addr.unwrap()],
        false,
    );
    wait_for(&r1, 60, "reader 1 complete", |e| *e == NodeEvent::Complete);
    wait_for(&r2, 60, "reader 2 complete", |e| *e == NodeEvent::Complete);
    // Live: appends reach both readers.
    let more: Vec<Vec<u8>> = (300..320).map(|i| block(i, 20_000)).collect();
    assert_eq!(w.node.append(0, more).unwrap(), 320);
    for r in [&r1, &r2] {
        let mut held = std::collections::BTreeSet::new();
        wait_for(r, 60, "the live blocks", |e| {
            if let NodeEvent::Replication(Event::Downloaded { index, count, .. }) = e {
                held.extend(*index..index + count);
            }
            (300..320).all(|i| held.contains(&i))
        });
    }
    r1.shutdown().unwrap();
    r2.shutdown().unwrap();
    w.node.shutdown().unwrap();
    check_store(dir.path(), "r1", 320, 20_000);
    check_store(dir.path(), "r2", 320, 20_000);
}

#[test]
fn the_wire_shows_neither_the_key_nor_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let w = start_writer(dir.path(), 40, 10_000);
    let (proxy, seen) = recording_proxy(w.addr);
    let (r, _) = start_reader(dir.path(), "r", &w.key, vec![proxy], false);
    wait_for(&r, 60, "the reader complete", |e| *e == NodeEvent::Complete);
    r.shutdown().unwrap();
    w.node.shutdown().unwrap();
    check_store(dir.path(), "r", 40, 10_000);
    let bytes = seen.lock().unwrap().clone();
    assert!(
        bytes.len() > 40 * 10_000,
        "the data went through the proxy ({} bytes)",
        bytes.len()
    );
    let pk = w.key.verifying_key().to_bytes();
    let dkey = feedsync::core::crypto::discovery_key(&pk);
    for (what, needle) in [
        ("public key", &pk[..]),
        ("discovery key", &dkey[..]),
        ("block 7", &block(7, 10_000)[..64]),
    ] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "{what} visible on the wire"
        );
    }
}

/// How a malicious node lies.
#[derive(Clone, Copy, Debug)]
enum Lie {
    /// Valid status and valid upgrades, but the first block of every Data has a bit flipped.
    CorruptBlocks,
    /// Every status and upgrade it sends carries a forged signature.
    ForgedSignatures,
}

/// A node that holds the real feed (it knows the public key, so channels open) and lies on the
/// way out. Built from the library's own transport and replicator; stops after `secs`.
fn malicious_node(feed: Feed<feedsync::core::MemoryStorage>, lie: Lie, secs: u64) -> SocketAddr {
    use feedsync::core::{Action, Config, Replicator};
    use feedsync::net::{self, Identity, Inbound};
    use feedsync::protocol::Message;
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        addr_tx.send(listener.local_addr().unwrap()).unwrap();
        let (tx, rx) = crossbeam_channel::bounded(1024);
        let cancel = tokio_util::sync::CancellationToken::new();
        rt.spawn(net::listen(
            listener,
            Identity::generate(),
            tx,
            cancel.clone(),
        ));
        let mut rep = Replicator::new(Config::default());
        rep.add_feed(feed, false);
        let mut outs = std::collections::BTreeMap::new();
        let tamper = |mut m: Message| {
            match (&mut m, lie) {
                (Message::Data(d), Lie::CorruptBlocks) => {
                    // The upgrade (if any) stays valid: only the block can give it away.
                    if let Some(b) = d.blocks.first_mut().and_then(|b| b.0.first_mut()) {
                        *b ^= 0x80;
                    }
                }
                (Message::Data(d), Lie::ForgedSignatures) => {
                    if let Some(up) = &mut d.upgrade {
                        up.signature[0] ^= 1;
                    }
                }
                (Message::Status(s), Lie::ForgedSignatures) => s.signature[3] ^= 4,
                _ => {}
            }
            m
        };
        let start = Instant::now();
        let mut tick = 0;
        while start.elapsed() < Duration::from_secs(secs) {
            match rx.recv_timeout(Duration::from_millis(10)) {
                Ok(Inbound::Connected {
                    conn,
                    handshake_hash,
                    initiator,
                    outbound,
                    ..
                }) => {
                    outs.insert(conn, outbound);
                    rep.handle_connected(conn, &handshake_hash, initiator);
                }
                Ok(Inbound::Message { conn, message, .. }) => rep.handle_message(conn, message),
                Ok(Inbound::Disconnected { conn, .. }) => {
                    outs.remove(&conn);
                    rep.handle_disconnected(conn);
                }
                _ => {
                    tick += 1;
                    rep.handle_tick(tick);
                }
            }
            while let Some(a) = rep.poll_action() {
                if let Action::Send { peer, message } = a
                    && let Some(out) = outs.get(&peer)
                {
                    let _ = out.try_send(tamper(message));
                }
            }
            // The production upload path: one queue per connection.
            for (&peer, out) in &outs {
                while let Some(messages) = rep.poll_upload(peer) {
                    for m in messages {
                        let _ = out.try_send(tamper(m));
                    }
                }
            }
        }
        cancel.cancel();
    });
    addr_rx.recv().unwrap()
}

#[test]
fn liars_are_detected_and_dropped_and_the_honest_source_completes_the_feed() {
    for lie in [Lie::CorruptBlocks, Lie::ForgedSignatures] {
        let dir = tempfile::tempdir().unwrap();
        let w = start_writer(dir.path(), 200, 30_000);
        let mut copy = Feed::create(feedsync::core::MemoryStorage::new(), w.key.clone()).unwrap();
        let data: Vec<Vec<u8>> = (0..200).map(|i| block(i, 30_000)).collect();
        copy.append_batch(&data).unwrap();
        let liar = malicious_node(copy, lie, 60);
        // Only the liar at first: it must be caught and banned on its own, for its own lie.
        let (r, _) = start_reader(dir.path(), "r", &w.key, vec![liar], false);
        let banned = wait_for(&r, 60, "the liar banned", |e| {
            matches!(e, NodeEvent::Replication(Event::Banned { .. }))
        });
        let NodeEvent::Replication(Event::Banned { reason, .. }) = banned else {
            unreachable!("matched above")
        };
        match lie {
            // A corrupted block under a valid upgrade: caught by the block's hash.
            Lie::CorruptBlocks => assert!(
                matches!(
                    reason,
                    BanReason::BadData(VerifyError::BlockMismatch { .. })
                ),
                "{lie:?} banned for {reason:?}"
            ),
            // Its first word is a status with a forged signature for the real length.
            Lie::ForgedSignatures => assert!(
                matches!(reason, BanReason::ForgedStatus { length: 200 }),
                "{lie:?} banned for {reason:?}"
            ),
        }
        // Then the honest writer completes the feed.
        r.control.send(sync::Command::AddPeer(w.addr)).unwrap();
        wait_for(&r, 60, "completion", |e| *e == NodeEvent::Complete);
        r.shutdown().unwrap();
        w.node.shutdown().unwrap();
        // Not one corrupted byte was stored.
        check_store(dir.path(), "r", 200, 30_000);
    }
}

/// A bare Noise connection to a node, speaking the wire protocol by hand.
struct Raw {
    socket: TcpStream,
    transport: snow::TransportState,
    handshake_hash: Vec<u8>,
    /// Decrypted bytes not yet decoded into messages.
    plain: Vec<u8>,
    /// Every decrypted byte received, for looking for secrets in.
    all: Vec<u8>,
}

impl Raw {
    /// Handshakes with `addr` as the initiator and says Hello.
    fn connect(addr: SocketAddr) -> Raw {
        use feedsync::protocol::*;
        let mut s = TcpStream::connect(addr).unwrap();
        let params: snow::params::NoiseParams = feedsync::net::NOISE_PARAMS.parse().unwrap();
        let kp = snow::Builder::new(params.clone())
            .generate_keypair()
            .unwrap();
        let builder = snow::Builder::new(params)
            .prologue(feedsync::net::PROLOGUE)
            .unwrap();
        let mut hs = builder
            .local_private_key(&kp.private)
            .unwrap()
            .build_initiator()
            .unwrap();
        let mut buf = vec![0u8; 65535];
        let n = hs.write_message(&[], &mut buf).unwrap();
        send_noise(&mut s, &buf[..n]);
        let m = recv_noise(&mut s).unwrap();
        hs.read_message(&m, &mut buf).unwrap();
        let n = hs.write_message(&[], &mut buf).unwrap();
        send_noise(&mut s, &buf[..n]);
        let handshake_hash = hs.get_handshake_hash().to_vec();
        let mut raw = Raw {
            socket: s,
            transport: hs.into_transport_mode().unwrap(),
            handshake_hash,
            plain: Vec::new(),
            all: Vec::new(),
        };
        raw.send(&[Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            features: 0,
            agent: "raw".into(),
        })]);
        raw
    }

    fn send(&mut self, messages: &[feedsync::protocol::Message]) {
        let mut frames = Vec::new();
        for m in messages {
            feedsync::protocol::encode_into(m, &mut frames).unwrap();
        }
        let mut buf = vec![0u8; 65535];
        for chunk in frames.chunks(65535 - 16) {
            let n = self.transport.write_message(chunk, &mut buf).unwrap();
            send_noise(&mut self.socket, &buf[..n]);
        }
    }

    /// An Open for the feed of `pk` on `channel` with the capability `cap(handshake hash)`.
    fn open(
        &self,
        channel: u32,
        pk: &[u8; 32],
        cap: impl Fn(&[u8]) -> [u8; 32],
    ) -> feedsync::protocol::Message {
        feedsync::protocol::Message::Open(feedsync::protocol::Open {
            channel,
            discovery_key: feedsync::core::crypto::discovery_key(pk),
            capability: cap(&self.handshake_hash),
        })
    }

    /// The next message, waiting up to `limit`; `None` when the connection ends or time is up.
    fn recv(&mut self, limit: Duration) -> Option<feedsync::protocol::Message> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some((p, len)) = feedsync::protocol::frame_header(&self.plain).unwrap() {
                let m = feedsync::protocol::decode(&self.plain[p..p + len]).unwrap();
                self.plain.drain(..p + len);
                return Some(m);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.socket.set_read_timeout(Some(left)).unwrap();
            let m = recv_noise(&mut self.socket).ok()?;
            let mut buf = vec![0u8; 65535];
            let n = self.transport.read_message(&m, &mut buf).unwrap();
            self.plain.extend_from_slice(&buf[..n]);
            self.all.extend_from_slice(&buf[..n]);
        }
    }
}

/// Requests for blocks `0..blocks`, 16 at a time, on `channel`, with ids from `first_id`.
fn requests(channel: u32, blocks: u64, first_id: u64) -> Vec<feedsync::protocol::Message> {
    (0..blocks / 16)
        .map(|k| {
            feedsync::protocol::Message::Request(feedsync::protocol::Request {
                channel,
                id: first_id + k,
                index: k * 16,
                count: 16,
                length: blocks,
                upgrade: false,
            })
        })
        .collect()
}

/// A bare client that opens the feed of `pk` with the capability `cap(handshake hash)` and
/// then requests every block.
fn raw_client(addr: SocketAddr, pk: [u8; 32], blocks: u64, cap: impl Fn(&[u8]) -> [u8; 32]) -> Raw {
    let mut raw = Raw::connect(addr);
    let mut out = vec![raw.open(0, &pk, cap)];
    out.extend(requests(0, blocks, 0));
    raw.send(&out);
    raw
}

fn send_noise(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(&(msg.len() as u16).to_be_bytes()).unwrap();
    s.write_all(msg).unwrap();
}

fn recv_noise(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut m = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut m)?;
    Ok(m)
}

/// A peer that guesses the capability gets nothing for it. Not concluded from silence: on the
/// same connection it then proves the key on another channel and asks for one block; the answer
/// to that comes after anything the guessed Open and its requests could have produced (messages
/// are handled in order, and those requests would have been queued first), and everything
/// before it is checked.
#[test]
fn a_peer_without_the_key_gets_nothing_over_a_real_connection() {
    use feedsync::protocol::{Message, Request};
    let dir = tempfile::tempdir().unwrap();
    let w = start_writer(dir.path(), 64, 4096);
    let pk = w.key.verifying_key().to_bytes();
    // It knows the discovery key (as from a LAN announcement) but not the public key, so its
    // capability is a guess.
    let mut raw = raw_client(w.addr, pk, 64, |_| [0x5a; 32]);
    // Later, knowing the key, channel 1 and one block, id 999.
    let proven = raw.open(1, &pk, |hh| {
        feedsync::core::crypto::capability(&pk, hh, true)
    });
    raw.send(&[
        proven,
        Message::Request(Request {
            channel: 1,
            id: 999,
            index: 5,
            count: 1,
            length: 64,
            upgrade: false,
        }),
    ]);
    let mut before = Vec::new();
    loop {
        match raw.recv(Duration::from_secs(20)) {
            Some(Message::Data(d)) if d.id == 999 => {
                assert_eq!(d.blocks.len(), 1);
                assert_eq!(d.blocks[0].0, block(5, 4096), "the proven channel's block");
                break;
            }
            Some(m) => before.push(m),
            None => panic!("no answer on the proven channel; received {before:?}"),
        }
    }
    assert!(
        matches!(before.first(), Some(Message::Hello(_))),
        "no hello first: {before:?}"
    );
    let answers = before
        .iter()
        .filter(|m| matches!(m, Message::Data(_) | Message::NoData(_)))
        .count();
    assert_eq!(answers, 0, "the guessed channel was answered");
    let opens = before
        .iter()
        .filter(|m| matches!(m, Message::Open(_)))
        .count();
    assert_eq!(opens, 1, "one Open, for the proven channel");
    assert!(!raw.all.windows(32).any(|x| x == pk), "public key sent");
    w.node.shutdown().unwrap();
}

#[test]
fn a_peer_that_stops_reading_is_cut_and_stalls_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        stall_timeout: Duration::from_secs(1),
        ..NodeConfig::new()
    };
    let w = start_writer_with(dir.path(), 640, 65536, config);
    // 40 MiB requested, far more than the socket buffers and the 4 MiB upload budget hold.
    let pk = w.key.verifying_key().to_bytes();
    let greedy = raw_client(w.addr, pk, 640, |hh| {
        feedsync::core::crypto::capability(&pk, hh, true)
    });
    wait_for(&w.node, 10, "the greedy peer connected", |e| {
        matches!(e, NodeEvent::PeerConnected { .. })
    });
    // Meanwhile an honest reader is served in full: the loop is not stalled.
    let (r, _) = start_reader(dir.path(), "r", &w.key, vec![w.addr], false);
    wait_for(&r, 60, "the honest reader complete", |e| {
        *e == NodeEvent::Complete
    });
    // And the peer that never reads is cut.
    wait_for(&w.node, 30, "the greedy peer cut", |e| {
        matches!(e, NodeEvent::PeerDisconnected { peer: 1, .. })
    });
    drop(greedy);
    r.shutdown().unwrap();
    w.node.shutdown().unwrap();
    check_store(dir.path(), "r", 640, 65536);
}

/// A node at its connection limit turns a new peer away (and keeps serving the one it has).
#[test]
fn a_node_at_its_peer_limit_turns_new_peers_away() {
    let tmp = tempfile::tempdir().unwrap();
    let w = start_writer_with(
        tmp.path(),
        64,
        1000,
        NodeConfig {
            max_peers: 1,
            ..NodeConfig::new()
        },
    );
    let (r1, _) = start_reader(tmp.path(), "r1", &w.key, vec![w.addr], false);
    wait_for(&r1, 30, "the first reader to complete", |e| {
        matches!(e, NodeEvent::Complete)
    });
    let (r2, _) = start_reader(tmp.path(), "r2", &w.key, vec![w.addr], false);
    // The second reader's connection is closed by the writer right after the handshake.
    wait_for(&r2, 30, "the second reader to be turned away", |e| {
        matches!(e, NodeEvent::PeerDisconnected { .. })
    });
    r2.shutdown().unwrap();
    r1.shutdown().unwrap();
    w.node.shutdown().unwrap();
    // What the turned-away reader stored, read from its store once it stopped: nothing.
    let f = Feed::open(DiskStorage::open(tmp.path().join("r2")).unwrap()).unwrap();
    assert_eq!(f.bitfield().count(), 0, "a turned-away peer got blocks");
    // And the served one holds everything (the limit did not stop the writer serving).
    check_store(tmp.path(), "r1", 64, 1000);
}
