//! Feed throughput on 64 KiB blocks, single thread: the writer's append (hash + sign + store on
//! the disk store) and the reader's verify (+ store), in MB/s (10^6 bytes per second).
//!
//! Run: `cargo bench --bench feed` (optionally `-- --mib 1024`). Targets from issue #2: both at
//! least 1000 MB/s on the project machine.

use ed25519_dalek::SigningKey;
use feedsync::core::{Feed, MemoryStorage, Proof};
use feedsync::storage::DiskStorage;
use std::hint::black_box;
use std::time::{Duration, Instant};

const BLOCK: usize = 64 * 1024;
const ROUNDS: usize = 3;

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// Runs `f` ROUNDS times and reports the median and best rate (skipped when `--only` names
/// something else).
fn report(what: &str, bytes: usize, mut f: impl FnMut() -> Duration) {
    let args: Vec<String> = std::env::args().collect();
    if let Some(only) = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        && !what.contains(only.as_str())
    {
        return;
    }
    let mut rates: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            // Start every round from a clean page cache, so one round's dirty pages are not
            // written back during the next one's timing.
            let _ = std::process::Command::new("sync").status();
            mbps(bytes, f())
        })
        .collect();
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{what:<58} median {:>7.0} MB/s   best {:>7.0} MB/s",
        rates[ROUNDS / 2],
        rates[ROUNDS - 1]
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args
        .iter()
        .position(|a| a == "--mib")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(512);
    let n = mib * 1024 * 1024 / BLOCK;
    let bytes = n * BLOCK;
    let mut data = vec![0u8; bytes];
    blake3::Hasher::new()
        .update(b"bench")
        .finalize_xof()
        .fill(&mut data);
    let blocks: Vec<&[u8]> = data.chunks(BLOCK).collect();
    let key = SigningKey::from_bytes(&[3u8; 32]);
    println!(
        "feed benchmark: {n} blocks of {BLOCK} bytes ({mib} MiB), single thread, {ROUNDS} rounds"
    );

    report(
        "baseline: BLAKE3 of each block alone (leaf hash)",
        bytes,
        || {
            let t = Instant::now();
            for b in &blocks {
                black_box(feedsync::core::crypto::leaf_hash(b));
            }
            t.elapsed()
        },
    );
    report(
        "baseline: one ed25519 signature per block alone",
        bytes,
        || {
            use ed25519_dalek::Signer;
            let t = Instant::now();
            for i in 0..blocks.len() {
                black_box(key.sign(&(i as u64).to_le_bytes()));
            }
            t.elapsed()
        },
    );
    report(
        "baseline: pwrite of each block to a file alone",
        bytes,
        || {
            use std::os::unix::fs::FileExt;
            let dir = tempfile::tempdir().unwrap();
            let file = std::fs::File::create(dir.path().join("data")).unwrap();
            let t = Instant::now();
            for (i, b) in blocks.iter().enumerate() {
                file.write_all_at(b, (i * BLOCK) as u64).unwrap();
            }
            t.elapsed()
        },
    );
    report(
        "append, one block per signed append (disk store)",
        bytes,
        || {
            let dir = tempfile::tempdir().unwrap();
            let mut feed =
                Feed::create(DiskStorage::open(dir.path()).unwrap(), key.clone()).unwrap();
            let t = Instant::now();
            for b in &blocks {
                feed.append(b).unwrap();
            }
            t.elapsed()
        },
    );
    report("append, batches of 16 blocks (disk store)", bytes, || {
        let dir = tempfile::tempdir().unwrap();
        let mut feed = Feed::create(DiskStorage::open(dir.path()).unwrap(), key.clone()).unwrap();
        let t = Instant::now();
        for chunk in blocks.chunks(16) {
            feed.append_batch(chunk).unwrap();
        }
        t.elapsed()
    });
    report(
        "append one per block, then fsync (disk store)",
        bytes,
        || {
            let dir = tempfile::tempdir().unwrap();
            let mut feed =
                Feed::create(DiskStorage::open(dir.path()).unwrap(), key.clone()).unwrap();
            let t = Instant::now();
            for b in &blocks {
                feed.append(b).unwrap();
            }
            feed.sync().unwrap();
            t.elapsed()
        },
    );

    // Proofs are made once by a writer; only the reader's work is timed.
    let mut writer = Feed::create(MemoryStorage::new(), key.clone()).unwrap();
    writer.append_batch(&blocks).unwrap();
    let upgrade = writer.proof(0, 0, 0, true).unwrap();
    let proofs: Vec<Proof> = (0..n as u64)
        .map(|i| writer.proof(i, 1, n as u64, false).unwrap())
        .collect();
    // A second writer grows one block at a time, so every proof upgrades to a new signed
    // length and the reader must check one signature per block.
    let mut growing = Feed::create(MemoryStorage::new(), key.clone()).unwrap();
    let signed: Vec<Proof> = blocks
        .iter()
        .enumerate()
        .map(|(i, b)| {
            growing.append(b).unwrap();
            growing.proof(i as u64, 1, i as u64, true).unwrap()
        })
        .collect();
    let pk = key.verifying_key().to_bytes();

    report(
        "verify only (no storage), one block per message",
        bytes,
        || {
            let mut r = Feed::create_replica(MemoryStorage::new(), pk).unwrap();
            r.verify_and_store::<&[u8]>(0, &[], &upgrade).unwrap();
            let t = Instant::now();
            for (i, (b, p)) in blocks.iter().zip(&proofs).enumerate() {
                black_box(r.verify(i as u64, &[b], p).unwrap());
            }
            t.elapsed()
        },
    );
    report(
        "verify + store, one block per message (disk store)",
        bytes,
        || {
            let dir = tempfile::tempdir().unwrap();
            let mut r = Feed::create_replica(DiskStorage::open(dir.path()).unwrap(), pk).unwrap();
            r.verify_and_store::<&[u8]>(0, &[], &upgrade).unwrap();
            let t = Instant::now();
            for (i, (b, p)) in blocks.iter().zip(&proofs).enumerate() {
                black_box(r.verify_and_store(i as u64, &[b], p).unwrap());
            }
            t.elapsed()
        },
    );
    report(
        "verify + store, a new signed length every block (disk)",
        bytes,
        || {
            let dir = tempfile::tempdir().unwrap();
            let mut r = Feed::create_replica(DiskStorage::open(dir.path()).unwrap(), pk).unwrap();
            let t = Instant::now();
            for (i, (b, p)) in blocks.iter().zip(&signed).enumerate() {
                black_box(r.verify_and_store(i as u64, &[b], p).unwrap());
            }
            t.elapsed()
        },
    );
    report(
        "verify + store, each block a fresh copy as from the wire (disk)",
        bytes,
        || {
            let dir = tempfile::tempdir().unwrap();
            let mut r = Feed::create_replica(DiskStorage::open(dir.path()).unwrap(), pk).unwrap();
            r.verify_and_store::<&[u8]>(0, &[], &upgrade).unwrap();
            let t = Instant::now();
            for (i, (b, p)) in blocks.iter().zip(&proofs).enumerate() {
                let fresh = b.to_vec();
                black_box(r.verify_and_store(i as u64, &[&fresh], p).unwrap());
            }
            t.elapsed()
        },
    );
    report(
        "verify + store, one block per message (memory store)",
        bytes,
        || {
            let mut r = Feed::create_replica(MemoryStorage::new(), pk).unwrap();
            r.verify_and_store::<&[u8]>(0, &[], &upgrade).unwrap();
            let t = Instant::now();
            for (i, (b, p)) in blocks.iter().zip(&proofs).enumerate() {
                black_box(r.verify_and_store(i as u64, &[b], p).unwrap());
            }
            t.elapsed()
        },
    );
}
