//! Swarming with the folder's real settings, in the deterministic simulator: a clone fetches
//! in order (`set_ordered`) within a want filter, on a 10 ms tick, and every node's connections
//! queue what they send the way the synchronizer's do (`SendQueues::Production`: a budget per
//! connection that follows its drain rate, control messages ahead of answers), on 4 MB/s
//! uplinks. The issue (#12) measured real processes at 4-5x the time of one reader for eight;
//! the simulator with ideal senders said 0.9x. These tests hold the production model to the
//! target. Every test prints its seed; rerun one with FEEDSYNC_SEED=n.

use ed25519_dalek::SigningKey;
use feedsync::core::bitfield::Bitfield;
use feedsync::core::sim::{SendQueues, Sim, SimConfig};
use feedsync::core::{Config, Feed, MemoryStorage};

mod common;
use common::{block, seeds};

const SECOND: u64 = 1_000_000;

/// A folder's content feed: `blocks` blocks of `size` bytes.
#[derive(Clone, Copy)]
struct Workload {
    blocks: u64,
    size: usize,
}

/// 8 MiB in 64 KiB blocks (one big file).
const BIG: Workload = Workload {
    blocks: 128,
    size: 64 * 1024,
};
/// 1,000 files of 4 KiB (a W2-like folder of small files, one block each).
const SMALL: Workload = Workload {
    blocks: 1000,
    size: 4096,
};

struct Outcome {
    /// Simulated microseconds until the slowest reader held every block.
    slowest: u64,
    /// Bytes the seeder put on the wire, in copies of the workload.
    seeder_copies: f64,
    /// Per reader: bytes received from other readers.
    from_readers: Vec<u64>,
}

/// One seeder (node 0) and `readers` readers on 4 MB/s uplinks, every pair connected, folder
/// settings on every reader.
fn swarm(readers: usize, seed: u64, w: Workload, queues: SendQueues) -> Outcome {
    let net = SimConfig {
        uplink: Some(4_000_000),
        latency: 500,
        jitter: 200,
        tick: 10_000, // the synchronizer's tick
        queues,
        ..SimConfig::default()
    };
    let key = SigningKey::from_bytes(&[42u8; 32]);
    let mut sim = Sim::new(readers + 1, seed, net, |_| Config::default());
    let mut writer = Feed::create(MemoryStorage::new(), key.clone()).unwrap();
    let data: Vec<Vec<u8>> = (0..w.blocks).map(|i| block(i, w.size)).collect();
    writer.append_batch(&data).unwrap();
    sim.nodes[0].add_feed(writer, false);
    for i in 1..=readers {
        let replica =
            Feed::create_replica(MemoryStorage::new(), key.verifying_key().to_bytes()).unwrap();
        let id = sim.nodes[i].add_feed(replica, true);
        // What a folder clone does: in order, only the blocks of the files it needs.
        sim.nodes[i].set_ordered(id, true);
        let mut want = Bitfield::new();
        want.set_range(0..w.blocks, true);
        sim.nodes[i].set_want(id, Some(want));
    }
    let nodes: Vec<usize> = (0..=readers).collect();
    sim.mesh(&nodes);
    let done = |s: &Sim| {
        s.nodes[1..]
            .iter()
            .all(|r| r.feed(0).len() == w.blocks && r.is_complete(0))
    };
    assert!(
        sim.run_until(600 * SECOND, done),
        "seed {seed}: {readers} readers did not finish"
    );
    let bytes = w.blocks * w.size as u64;
    let from_readers = (1..=readers)
        .map(|r| {
            (1..=readers)
                .filter(|&o| o != r)
                .map(|o| sim.stats(o, r).bytes)
                .sum()
        })
        .collect();
    Outcome {
        slowest: sim.now(),
        seeder_copies: sim.uploaded(0) as f64 / bytes as f64,
        from_readers,
    }
}

fn check(w: Workload, what: &str, seeds_: &[u64]) {
    for seed in seeds(seeds_) {
        let one = swarm(1, seed, w, SendQueues::Production);
        let eight = swarm(8, seed, w, SendQueues::Production);
        let ratio = eight.slowest as f64 / one.slowest as f64;
        eprintln!(
            "{what}, seed {seed}: 1 reader {:.2} s, 8 readers {:.2} s ({ratio:.2}x); seeder sent \
             {:.2} copies; from other readers: {:?}",
            one.slowest as f64 / 1e6,
            eight.slowest as f64 / 1e6,
            eight.seeder_copies,
            eight.from_readers
        );
        // The targets (1.2x, 1.3 copies) are for real processes and 32 MiB
        // (benches/swarm.rs). These workloads are small enough for a debug build in CI, which
        // makes start-up weigh more (in release, `compare_sending_models` with 16 MiB gives
        // 1.25x and 1.23 copies); the bounds still catch the sending side and scheduling before
        // #12 (connections with 4 MiB FIFOs, strict order: 6.9x and 7.1 copies).
        assert!(
            ratio <= 1.5,
            "seed {seed}: 8 readers took {ratio:.2}x the time of one"
        );
        assert!(
            eight.seeder_copies <= 1.6,
            "seed {seed}: the seeder sent {:.2} copies",
            eight.seeder_copies
        );
        assert!(
            eight.from_readers.iter().all(|&b| b > 0),
            "seed {seed}: a reader got nothing from the others: {:?}",
            eight.from_readers
        );
    }
}

#[test]
fn eight_folder_readers_on_production_connections_finish_near_one_big_file() {
    check(BIG, "8 MiB file", &[1]);
}

#[test]
fn eight_folder_readers_on_production_connections_finish_near_one_small_files() {
    check(SMALL, "1,000 x 4 KiB", &[4]);
}

/// Diagnostics: the same swarm under each sending model (not an assertion; run with
/// `--ignored --nocapture` to see what each part of the sending side costs).
#[test]
#[ignore]
fn compare_sending_models() {
    for (name, q) in [
        ("ideal", SendQueues::Ideal),
        ("fifo 4 MiB", SendQueues::Fifo { budget: 4 << 20 }),
        ("production", SendQueues::Production),
    ] {
        for (wname, w) in [("big", BIG), ("small", SMALL)] {
            let one = swarm(1, 1, w, q);
            let eight = swarm(8, 1, w, q);
            eprintln!(
                "{name:>12} {wname:>5}: 1 reader {:.2} s, 8 readers {:.2} s ({:.2}x), seeder {:.2} copies",
                one.slowest as f64 / 1e6,
                eight.slowest as f64 / 1e6,
                eight.slowest as f64 / one.slowest as f64,
                eight.seeder_copies
            );
        }
    }
}
