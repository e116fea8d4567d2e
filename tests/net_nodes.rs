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

fn block(i: u64, size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size];
    blake3::Hasher::new()
        .update(&i.to_le_bytes())
        .finalize_xof()
        .fill(&mut b);
    b
}

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
    let key = SigningKey::from_bytes(&[61u8; 32]);
    let mut feed =
        Feed::create(DiskStorage::open(dir.join("writer")).unwrap(), key.clone()).unwrap();
    let data: Vec<Vec<u8>> = (0..blocks).map(|i| block(i, size)).collect();
    for chunk in data.chunks(64) {
        feed.append_batch(chunk).unwrap();
    }
    let config = NodeConfig {
        listen: Some(loopback()),
        ..NodeConfig::new()
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
