//! Crash safety for real: a child process appends to a disk store in a loop and reports each
//! append that returned; the parent SIGKILLs it at random moments, then reopens the store and
//! checks that it verifies and holds every acknowledged append, byte for byte.

use ed25519_dalek::SigningKey;
use feedsync::core::Feed;
use feedsync::storage::DiskStorage;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::Rng;

const KILLS: usize = 24;
const CHILD_ENV: &str = "FEEDSYNC_CRASH_CHILD_DIR";

/// Deterministic content of block `i`: sizes cycle through boundary cases, bytes from BLAKE3.
fn block(i: u64) -> Vec<u8> {
    const SIZES: [usize; 8] = [0, 1, 4095, 4096, 4097, 65536, 200_000, 777];
    common::bytes(i, SIZES[(i % 8) as usize])
}

/// Not a test on its own: the child process body, run by `appends_survive_sigkill`.
#[test]
#[ignore = "helper process for appends_survive_sigkill"]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let storage = DiskStorage::open(&dir).unwrap();
    let mut feed = match Feed::open(storage) {
        Ok(f) => f,
        Err(feedsync::core::FeedError::NotFound) => Feed::create(
            DiskStorage::open(&dir).unwrap(),
            SigningKey::from_bytes(&[5u8; 32]),
        )
        .unwrap(),
        Err(e) => panic!("reopen failed: {e}"),
    };
    let mut out = std::io::stdout().lock();
    // Bounded: stop by itself after 20,000 blocks even if the parent never kills it.
    while feed.len() < 20_000 {
        let start = feed.len();
        let n = 1 + start % 4; // single appends and batches of 2-4
        let blocks: Vec<Vec<u8>> = (start..start + n).map(block).collect();
        if n == 1 {
            feed.append(&blocks[0]).unwrap();
        } else {
            feed.append_batch(&blocks).unwrap();
        }
        writeln!(out, "ACK {}", feed.len()).unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn appends_survive_sigkill() {
    let (mut rng, seed) = Rng::from_env_or_clock("crash test");
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("feed");
    let exe = std::env::current_exe().unwrap();
    let mut acked = 0u64;

    for round in 0..KILLS {
        let mut child = Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &store)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Let it acknowledge a random number of appends, then kill after a random short delay,
        // so the kill lands anywhere inside an append (data, nodes, bitfield or header write).
        let wait_acks = 1 + rng.next() % 30;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = 0;
        while seen < wait_acks {
            assert!(
                Instant::now() < deadline,
                "child made no progress in round {round}"
            );
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(n) = line.strip_prefix("ACK ") {
                        acked = acked.max(n.parse().unwrap());
                        seen += 1;
                    }
                }
                _ => panic!("child exited early in round {round}"),
            }
        }
        let spin = Duration::from_micros(rng.next() % 3000);
        let t = Instant::now();
        while t.elapsed() < spin {
            std::hint::spin_loop();
        }
        child.kill().unwrap(); // SIGKILL
        // Acknowledgements already in the pipe count: those appends had returned.
        for line in lines.map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("ACK ") {
                acked = acked.max(n.parse().unwrap());
            }
        }
        child.wait().unwrap();

        let mut feed = Feed::open(DiskStorage::open(&store).unwrap())
            .unwrap_or_else(|e| panic!("round {round}: reopen failed: {e} (seed {seed})"));
        assert!(
            feed.len() >= acked,
            "round {round}: lost appends: {} < {acked}",
            feed.len()
        );
        feed.verify_all()
            .unwrap_or_else(|e| panic!("round {round}: {e} (seed {seed})"));
        for i in 0..feed.len() {
            assert_eq!(
                feed.get(i).unwrap(),
                block(i),
                "round {round}: block {i} differs"
            );
        }
    }
    assert!(
        acked > KILLS as u64,
        "the child appended too little to mean anything"
    );
}
