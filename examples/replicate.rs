//! One writer and two readers on loopback, each a full node (synchronizer + Noise transport +
//! disk store), printing progress: reader 1 fetches from the writer, reader 2 from both, and a
//! live append reaches them both.
//!
//! Run: `cargo run --release --example replicate`

use feedsync::core::{Event, Feed, crypto};
use feedsync::storage::DiskStorage;
use feedsync::sync::{self, NodeConfig, NodeEvent, NodeHandle};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const BLOCK: usize = 64 * 1024;

fn wait(
    name: &str,
    node: &NodeHandle,
    mut done: impl FnMut(&NodeEvent) -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut held = 0u64;
    while let Ok(e) = node.events.recv_deadline(deadline) {
        match &e {
            NodeEvent::Replication(Event::Downloaded { count, .. }) => {
                held += count;
                if held % 256 < *count {
                    println!("{name}: {held} blocks fetched");
                }
            }
            NodeEvent::PeerConnected { addr, .. } => println!("{name}: connected to {addr}"),
            NodeEvent::Replication(Event::Upgraded { length, .. }) => {
                println!("{name}: feed is {length} blocks long")
            }
            _ => {}
        }
        if done(&e) {
            return Ok(());
        }
    }
    Err(format!("{name}: gave up after 60 s"))
}

fn listening(node: &NodeHandle) -> SocketAddr {
    loop {
        if let Ok(NodeEvent::Listening(a)) = node.events.recv() {
            return a;
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let key = crypto::generate_key();
    let mut feed = Feed::create(DiskStorage::open(dir.path().join("writer"))?, key.clone())?;
    let mut data = vec![0u8; 2048 * BLOCK];
    blake3::Hasher::new()
        .update(b"example")
        .finalize_xof()
        .fill(&mut data);
    for chunk in data.chunks(16 * BLOCK) {
        let blocks: Vec<&[u8]> = chunk.chunks(BLOCK).collect();
        feed.append_batch(&blocks)?;
    }
    println!(
        "writer: {} blocks ({} MiB)",
        feed.len(),
        feed.byte_len() >> 20
    );
    let listen = Some("127.0.0.1:0".parse()?);
    let writer = sync::spawn(
        NodeConfig {
            listen,
            ..NodeConfig::new()
        },
        vec![(feed, false)],
    )?;
    let waddr = listening(&writer);
    println!("writer: listening on {waddr}");

    let pk = key.verifying_key().to_bytes();
    let replica = |name: &str| {
        Feed::create_replica(DiskStorage::open(dir.path().join(name)).unwrap(), pk).unwrap()
    };
    let r1 = sync::spawn(
        NodeConfig {
            listen,
            peers: vec![waddr],
            ..NodeConfig::new()
        },
        vec![(replica("r1"), true)],
    )?;
    let r1addr = listening(&r1);
    let r2 = sync::spawn(
        NodeConfig {
            peers: vec![waddr, r1addr],
            ..NodeConfig::new()
        },
        vec![(replica("r2"), true)],
    )?;
    let t = Instant::now();
    wait("reader 1", &r1, |e| *e == NodeEvent::Complete)?;
    wait("reader 2", &r2, |e| *e == NodeEvent::Complete)?;
    println!(
        "both readers complete in {:.2} s",
        t.elapsed().as_secs_f64()
    );

    let length = writer.append(0, vec![b"a live append".to_vec()])?;
    println!("writer: appended block {}", length - 1);
    for (name, r) in [("reader 1", &r1), ("reader 2", &r2)] {
        wait(
            name,
            r,
            |e| matches!(e, NodeEvent::Replication(Event::Downloaded { index, .. }) if *index == length - 1),
        )?;
        println!("{name}: has the live block");
    }
    r1.shutdown()?;
    r2.shutdown()?;
    writer.shutdown()?;
    Ok(())
}
