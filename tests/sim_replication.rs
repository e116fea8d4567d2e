//! Replication under a deterministic simulated network: loss, reordering, bandwidth limits,
//! partitions and a malicious node. Every test prints its seed; rerun one with FEEDSYNC_SEED=n.

use ed25519_dalek::SigningKey;
use feedsync::core::sim::{Sim, SimConfig};
use feedsync::core::{Config, Event, Feed, MemoryStorage};

const SECOND: u64 = 1_000_000;

mod common;
use common::{block, seeds};

/// Node 0 writes a feed of `blocks` blocks of `size` bytes; nodes 1..n replicate it.
fn swarm(
    n: usize,
    seed: u64,
    blocks: u64,
    size: usize,
    net: SimConfig,
    node: impl Fn(usize) -> Config,
) -> Sim {
    let key = SigningKey::from_bytes(&[77u8; 32]);
    let mut sim = Sim::new(n, seed, net, node);
    let mut writer = Feed::create(MemoryStorage::new(), key.clone()).unwrap();
    let data: Vec<Vec<u8>> = (0..blocks).map(|i| block(i, size)).collect();
    writer.append_batch(&data).unwrap();
    sim.nodes[0].add_feed(writer, false);
    for i in 1..n {
        let replica =
            Feed::create_replica(MemoryStorage::new(), key.verifying_key().to_bytes()).unwrap();
        sim.nodes[i].add_feed(replica, true);
    }
    sim
}

fn all_complete(sim: &Sim, length: u64) -> bool {
    sim.nodes[1..]
        .iter()
        .all(|r| r.feed(0).len() == length && r.is_complete(0))
}

/// Every reader holds every block, byte-identical to the writer's.
fn assert_identical(sim: &mut Sim, seed: u64) {
    let length = sim.nodes[0].feed(0).len();
    for i in 0..length {
        let expected = sim.nodes[0].feed_mut(0).get(i).unwrap();
        for r in 1..sim.nodes.len() {
            let got = sim.nodes[r]
                .feed_mut(0)
                .get(i)
                .unwrap_or_else(|e| panic!("seed {seed}: node {r} block {i}: {e}"));
            assert_eq!(got, expected, "seed {seed}: node {r} block {i} differs");
        }
    }
    for r in 1..sim.nodes.len() {
        sim.nodes[r].feed_mut(0).verify_all().unwrap();
    }
}

#[test]
fn eight_readers_converge_under_loss_and_reordering_with_live_appends() {
    for seed in seeds(&[1, 2, 3, 4, 5]) {
        eprintln!("seed {seed}");
        let net = SimConfig {
            loss: 0.10,
            latency: 2_000,
            jitter: 8_000,
            ..SimConfig::default()
        };
        let mut sim = swarm(9, seed, 150, 1500, net, |_| Config::default());
        let nodes: Vec<usize> = (0..9).collect();
        sim.mesh(&nodes);
        assert!(
            sim.run_until(120 * SECOND, |s| all_complete(s, 150)),
            "seed {seed}: did not converge"
        );
        // Live: the writer keeps appending; every reader follows.
        for round in 0..5u64 {
            let more: Vec<Vec<u8>> = (0..10).map(|i| block(1000 + round * 10 + i, 700)).collect();
            sim.append(0, 0, &more);
            sim.run_until(SECOND / 2, |_| false);
        }
        assert!(
            sim.run_until(120 * SECOND, |s| all_complete(s, 200)),
            "seed {seed}: live appends did not converge"
        );
        assert_identical(&mut sim, seed);
        // Lost and reordered messages, and proofs made against a length that moved on, are not
        // misbehaviour: no honest peer may be banned.
        let bans: Vec<_> = sim
            .events
            .iter()
            .filter(|(_, _, e)| matches!(e, Event::Banned { .. }))
            .collect();
        assert!(
            bans.is_empty(),
            "seed {seed}: honest peers banned: {bans:?}"
        );
        // Loss really happened.
        let lost: u64 = (0..9)
            .flat_map(|a| (0..9).map(move |b| (a, b)))
            .map(|(a, b)| sim.stats(a, b).lost)
            .sum();
        assert!(lost > 100, "seed {seed}: only {lost} messages lost");
    }
}

/// Time for every reader to finish, with each node's uplink limited to `uplink` bytes/s.
fn finish_time(readers: usize, seed: u64) -> (u64, u64) {
    let net = SimConfig {
        uplink: Some(4_000_000),
        latency: 5_000,
        jitter: 1_000,
        ..SimConfig::default()
    };
    let mut sim = swarm(readers + 1, seed, 256, 16 * 1024, net, |_| {
        Config::default()
    });
    let nodes: Vec<usize> = (0..=readers).collect();
    sim.mesh(&nodes);
    assert!(
        sim.run_until(600 * SECOND, |s| all_complete(s, 256)),
        "seed {seed}: {readers} readers did not finish"
    );
    assert_identical(&mut sim, seed);
    (sim.now(), sim.uploaded(0))
}

#[test]
fn a_swarm_of_eight_readers_serves_itself() {
    for seed in seeds(&[11, 12, 13]) {
        let (one, _) = finish_time(1, seed);
        let (eight, seeder_upload) = finish_time(8, seed);
        let feed_bytes = 256 * 16 * 1024;
        eprintln!(
            "seed {seed}: 1 reader {:.2} s, 8 readers {:.2} s ({:.2}x); seeder uploaded {:.2}x the feed",
            one as f64 / 1e6,
            eight as f64 / 1e6,
            eight as f64 / one as f64,
            seeder_upload as f64 / feed_bytes as f64
        );
        assert!(
            eight * 2 <= one * 3,
            "seed {seed}: 8 readers took {eight} us, 1 reader {one} us"
        );
        // The readers served each other: the seeder sent under 2 copies, not 8.
        assert!(
            seeder_upload < 2 * feed_bytes,
            "seed {seed}: seeder uploaded {seeder_upload} bytes"
        );
    }
}

#[test]
fn a_healed_partition_converges() {
    for seed in seeds(&[21, 22, 23]) {
        let net = SimConfig {
            loss: 0.02,
            jitter: 2_000,
            ..SimConfig::default()
        };
        let mut sim = swarm(5, seed, 40, 1000, net, |_| Config::default());
        sim.mesh(&[0, 1, 2, 3, 4]);
        assert!(
            sim.run_until(60 * SECOND, |s| all_complete(s, 40)),
            "seed {seed}"
        );
        // Cut {3, 4} off from {0, 1, 2}; the writer appends meanwhile.
        for a in [0, 1, 2] {
            for b in [3, 4] {
                sim.partition(a, b, true);
            }
        }
        let more: Vec<Vec<u8>> = (0..30).map(|i| block(500 + i, 900)).collect();
        sim.append(0, 0, &more);
        sim.run_until(30 * SECOND, |_| false);
        assert!(
            sim.nodes[3].feed(0).len() < 70 && sim.nodes[4].feed(0).len() < 70,
            "seed {seed}: partition leaked"
        );
        assert!(
            sim.nodes[1].feed(0).len() == 70 && sim.nodes[1].is_complete(0),
            "seed {seed}: majority side stalled"
        );
        for a in [0, 1, 2] {
            for b in [3, 4] {
                sim.partition(a, b, false);
            }
        }
        assert!(
            sim.run_until(120 * SECOND, |s| all_complete(s, 70)),
            "seed {seed}: did not converge after healing"
        );
        assert_identical(&mut sim, seed);
    }
}

#[test]
fn a_corrupting_peer_is_banned_and_the_honest_source_completes() {
    for seed in seeds(&[31, 32]) {
        // Node 0 writes; node 1 replicates first and then turns malicious; node 2 fetches from both.
        let mut sim = swarm(3, seed, 60, 2000, SimConfig::default(), |_| {
            Config::default()
        });
        sim.connect(0, 1);
        assert!(sim.run_until(30 * SECOND, |s| s.nodes[1].is_complete(0)
            && s.nodes[1].feed(0).len() == 60));
        sim.corrupt(1);
        sim.connect(1, 2);
        sim.connect(0, 2);
        assert!(
            sim.run_until(60 * SECOND, |s| s.nodes[2].feed(0).len() == 60
                && s.nodes[2].is_complete(0)),
            "seed {seed}"
        );
        assert!(
            sim.nodes[2].is_banned(1),
            "seed {seed}: the corrupting peer was not banned"
        );
        assert!(
            !sim.nodes[2].is_banned(0),
            "seed {seed}: the honest peer was banned"
        );
        assert!(
            sim.events
                .iter()
                .any(|(_, n, e)| *n == 2 && matches!(e, Event::Banned { peer: 1, .. }))
        );
        // Every stored block verifies and equals the writer's (no corrupted byte stored).
        for i in 0..60 {
            assert_eq!(sim.nodes[2].feed_mut(0).get(i).unwrap(), block(i, 2000));
        }
    }
}
