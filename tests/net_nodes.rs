//! Nodes over real TCP on loopback, in one process: encrypted connections, swarm replication,
//! live appends, and what an observer of the wire sees.

use ed25519_dalek::SigningKey;
use feedsync::core::{Event, Feed};
use feedsync::storage::DiskStorage;
use feedsync::sync::{self, NodeConfig, NodeEvent, NodeHandle};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
use common::block;

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

/// A TCP relay that records every byte it forwards in both directions.
fn recording_proxy(target: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        // One connection is all this test makes; the relay ends when either side closes.
        let Ok((client, _)) = listener.accept() else {
            return;
        };
        let server = TcpStream::connect(target).unwrap();
        let pipe = |mut from: TcpStream, mut to: TcpStream, log: Arc<Mutex<Vec<u8>>>| {
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 || to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    log.lock().unwrap().extend_from_slice(&buf[..n]);
                }
                let _ = to.shutdown(std::net::Shutdown::Both);
            })
        };
        let a = pipe(
            client.try_clone().unwrap(),
            server.try_clone().unwrap(),
            log.clone(),
        );
        let b = pipe(server, client, log);
        let _ = a.join();
        let _ = b.join();
    });
    (addr, seen)
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
    /// Valid status, but every block it uploads has a bit flipped and every upgrade a forged signature.
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
                (Message::Data(d), _) => {
                    if let Some(b) = d.blocks.first_mut().and_then(|b| b.0.first_mut())
                        && matches!(lie, Lie::CorruptBlocks)
                    {
                        *b ^= 0x80;
                    }
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
                Ok(Inbound::Message { conn, message }) => rep.handle_message(conn, message),
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
            while let Some((peer, messages)) = rep.next_upload() {
                for m in messages {
                    if let Some(out) = outs.get(&peer) {
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
        // Only the liar at first: it must be caught and banned on its own.
        let (r, _) = start_reader(dir.path(), "r", &w.key, vec![liar], false);
        wait_for(&r, 60, "the liar banned", |e| {
            matches!(e, NodeEvent::Replication(Event::Banned { .. }))
        });
        // Then the honest writer completes the feed.
        r.control.send(sync::Command::AddPeer(w.addr)).unwrap();
        wait_for(&r, 60, "completion", |e| *e == NodeEvent::Complete);
        r.shutdown().unwrap();
        w.node.shutdown().unwrap();
        // Not one corrupted byte was stored.
        check_store(dir.path(), "r", 200, 30_000);
    }
}

/// A bare Noise client: handshakes with `addr`, sends Hello, an Open for the feed with
/// `pk`'s discovery key and the capability `cap(handshake hash)`, then requests for every block.
/// Returns the socket and the transport state for reading.
fn raw_client(
    addr: SocketAddr,
    pk: [u8; 32],
    blocks: u64,
    cap: impl Fn(&[u8]) -> [u8; 32],
) -> (TcpStream, snow::TransportState) {
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
    let hh = hs.get_handshake_hash().to_vec();
    let mut t = hs.into_transport_mode().unwrap();
    let mut frames = Vec::new();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        features: 0,
        agent: "raw".into(),
    };
    encode_into(&Message::Hello(hello), &mut frames).unwrap();
    let dkey = feedsync::core::crypto::discovery_key(&pk);
    encode_into(
        &Message::Open(Open {
            channel: 0,
            discovery_key: dkey,
            capability: cap(&hh),
        }),
        &mut frames,
    )
    .unwrap();
    for k in 0..blocks / 16 {
        let r = Request {
            channel: 0,
            id: k,
            index: k * 16,
            count: 16,
            length: blocks,
            upgrade: false,
        };
        encode_into(&Message::Request(r), &mut frames).unwrap();
    }
    for chunk in frames.chunks(65535 - 16) {
        let n = t.write_message(chunk, &mut buf).unwrap();
        send_noise(&mut s, &buf[..n]);
    }
    (s, t)
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

#[test]
fn a_peer_without_the_key_gets_nothing_over_a_real_connection() {
    let dir = tempfile::tempdir().unwrap();
    let w = start_writer(dir.path(), 64, 4096);
    let pk = w.key.verifying_key().to_bytes();
    // It knows the discovery key (as from a LAN announcement) but not the public key, so its
    // capability is a guess.
    let (mut s, mut t) = raw_client(w.addr, pk, 64, |_| [0x5a; 32]);
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut plain = Vec::new();
    let mut buf = vec![0u8; 65535];
    // Everything the writer sends within 2 s of the requests (bounded however chatty it is).
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline
        && let Ok(m) = recv_noise(&mut s)
    {
        let n = t.read_message(&m, &mut buf).unwrap();
        plain.extend_from_slice(&buf[..n]);
    }
    let mut messages = Vec::new();
    let mut rest = &plain[..];
    while let Some((p, len)) = feedsync::protocol::frame_header(rest).unwrap() {
        messages.push(feedsync::protocol::decode(&rest[p..p + len]).unwrap());
        rest = &rest[p + len..];
    }
    assert!(
        matches!(messages.as_slice(), [feedsync::protocol::Message::Hello(_)]),
        "a peer without the key got more than a hello: {messages:?}"
    );
    assert!(!plain.windows(32).any(|x| x == pk), "public key sent");
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
    let (greedy, _) = raw_client(w.addr, pk, 640, |hh| {
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
    let held = |n: &NodeHandle| {
        let mut got = 0;
        while let Ok(e) = n.events.try_recv() {
            if let NodeEvent::Replication(Event::Downloaded { count, .. }) = e {
                got += count;
            }
        }
        got
    };
    assert_eq!(held(&r2), 0, "a turned-away peer got blocks");
    r2.shutdown().unwrap();
    r1.shutdown().unwrap();
    w.node.shutdown().unwrap();
}
