//! Honest nodes beside a hostile one, in the deterministic simulator, and the replicator fuzz
//! harness over seeded random inputs. Every test prints its seed; rerun one with
//! FEEDSYNC_SEED=n.
//!
//! The hostile node knows the honest feed's key (it is a replica of it) and writes a feed of its
//! own, so it can sign any length for it. Each tick it sends every peer a flood of well-framed
//! junk (see `feedsync::core::sim::Hostile`) and claims to hold every block up to 2^48.
//!
//! Budget: an honest node's replicator holds at most `BUDGET` entries (runs of peers' haves,
//! queued uploads, requests, blocks in flight, pending actions; see `Footprint`), checked every
//! tick; each entry is a fixed-size record of a few dozen bytes, so this bounds its memory.

use ed25519_dalek::SigningKey;
use feedsync::core::sim::{Hostile, Sim, SimConfig};
use feedsync::core::{Config, Feed, MemoryStorage};

const SECOND: u64 = 1_000_000;

/// Runs kept per peer and feed in these tests.
const MAX_PEER_RUNS: usize = 256;
/// Entries one honest node may hold: 3 peers x 2 feeds of capped runs, 3 full upload queues
/// (1024 each), and room for its own requests and actions.
const BUDGET: usize = 3 * 2 * MAX_PEER_RUNS + 3 * 1024 + 4096;

mod common;
use common::seeds;

/// Node 0 writes feed A (`blocks` blocks); nodes 1 and 2 replicate it; node 3 is hostile: a
/// replica of A holding nothing, and the writer of feed B, which nodes 1 and 2 replicate too.
fn world(seed: u64, blocks: u64) -> Sim {
    let a = SigningKey::from_bytes(&[41u8; 32]);
    let b = SigningKey::from_bytes(&[42u8; 32]);
    let node = |_| Config {
        max_peer_runs: MAX_PEER_RUNS,
        ..Config::default()
    };
    let mut sim = Sim::new(4, seed, SimConfig::default(), node);
    let mut writer = Feed::create(MemoryStorage::new(), a.clone()).unwrap();
    let data: Vec<Vec<u8>> = (0..blocks).map(|i| vec![i as u8; 1000]).collect();
    writer.append_batch(&data).unwrap();
    sim.nodes[0].add_feed(writer, false);
    for i in 1..3 {
        let replica = Feed::create_replica(MemoryStorage::new(), a.verifying_key().to_bytes());
        sim.nodes[i].add_feed(replica.unwrap(), true);
        let replica = Feed::create_replica(MemoryStorage::new(), b.verifying_key().to_bytes());
        sim.nodes[i].add_feed(replica.unwrap(), true);
    }
    let replica = Feed::create_replica(MemoryStorage::new(), a.verifying_key().to_bytes());
    sim.nodes[3].add_feed(replica.unwrap(), false);
    let mut own = Feed::create(MemoryStorage::new(), b.clone()).unwrap();
    own.append_batch(&[vec![9u8; 100], vec![8u8; 100]]).unwrap();
    sim.nodes[3].add_feed(own, false);
    sim.make_hostile(
        3,
        Hostile {
            per_tick: 40,
            channels: 2,
            writer: Some((1, b)),
        },
    );
    // The hostile node dials everyone (so its opens come first), then the honest mesh.
    for honest in 0..3 {
        sim.connect(3, honest);
    }
    sim.mesh(&[0, 1, 2]);
    sim
}

#[test]
fn honest_readers_complete_beside_a_flooding_lying_hostile_writer() {
    for seed in seeds(&[1, 2, 3]) {
        eprintln!("seed {seed}");
        let blocks = 300;
        let mut sim = world(seed, blocks);
        let mut peak = 0usize;
        let done = sim.run_until(20 * SECOND, |sim| {
            for r in &sim.nodes[..3] {
                peak = peak.max(r.footprint().total());
            }
            sim.nodes[1..3]
                .iter()
                .all(|r| r.feed(0).len() == blocks && r.is_complete(0))
        });
        assert!(
            peak <= BUDGET,
            "seed {seed}: an honest node held {peak} entries, budget {BUDGET}"
        );
        assert!(
            done,
            "seed {seed}: honest readers did not complete within 20 s of simulated time"
        );
        for r in 1..3 {
            sim.nodes[r].feed_mut(0).verify_all().unwrap();
        }
        // The flood kept coming the whole time: the hostile node sent thousands of messages.
        assert!(sim.stats(3, 1).sent > 1_000, "seed {seed}: no flood");
    }
}

/// xorshift64*: the plain-test stand-in for the fuzzer's inputs.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

#[test]
fn the_replicator_survives_random_message_sequences_from_keyless_and_keyed_peers() {
    let runs: u64 = std::env::var("FEEDSYNC_FUZZ_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let only = std::env::var("FEEDSYNC_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    for seed in (0..runs).filter(|s| only.is_none_or(|o| o == *s)) {
        let len = 64 + (seed as usize * 37) % 4000;
        let input = random_bytes(seed, len);
        let outcome = std::panic::catch_unwind(|| {
            feedsync::core::fuzzing::replicator_messages(&input);
        });
        assert!(
            outcome.is_ok(),
            "seed {seed}: the harness failed (see above)"
        );
    }
}
