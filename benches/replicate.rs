//! Replicates a feed of 64 KiB blocks (1 GiB by default) between two `feedsync` processes on
//! loopback, encrypted (Noise) and verified, and reports MB/s and each process's peak RSS.
//!
//! Run: `cargo bench --bench replicate` (or `-- --mib 256`). Issue #3 targets on this machine:
//! at least 600 MB/s and at most 64 MiB peak RSS per process.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BLOCK: usize = 65536;

/// Peak resident set (VmHWM) of a running process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix("VmHWM:")?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// CPU seconds (user + system) the process has used so far; `/proc/PID/stat` fields 14 and 15.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields are counted after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args
        .iter()
        .position(|a| a == "--mib")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let bin = env!("CARGO_BIN_EXE_feedsync");
    let dir = tempfile::tempdir().unwrap();
    let wstore = dir.path().join("writer");

    // The writer's feed, built through the library (not timed).
    let key = ed25519_dalek::SigningKey::from_bytes(&[5u8; 32]);
    let mut feed = feedsync::core::Feed::create(
        feedsync::storage::DiskStorage::open(&wstore).unwrap(),
        key.clone(),
    )
    .unwrap();
    let mut buf = vec![0u8; 16 * BLOCK];
    let mut xof = blake3::Hasher::new()
        .update(b"replicate bench")
        .finalize_xof();
    // Each batch is 16 x 64 KiB = 1 MiB.
    for _ in 0..mib {
        xof.fill(&mut buf);
        let blocks: Vec<&[u8]> = buf.chunks(BLOCK).collect();
        feed.append_batch(&blocks).unwrap();
    }
    feed.sync().unwrap();
    let total = feed.byte_len();
    drop(feed);
    let pk: String = key
        .verifying_key()
        .to_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let _ = Command::new("sync").status();

    let mut writer = Command::new(bin)
        .args([
            "feed",
            "sync",
            wstore.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut wlines = BufReader::new(writer.stdout.take().unwrap()).lines();
    let addr = wlines
        .next()
        .unwrap()
        .unwrap()
        .trim_start_matches("listening on ")
        .to_string();

    let rstore = dir.path().join("reader");
    let t = Instant::now();
    let mut reader = Command::new(bin)
        .args([
            "feed",
            "sync",
            rstore.to_str().unwrap(),
            "--key",
            &pk,
            "--peer",
            &addr,
            "--once",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let rpid = reader.id();
    let mut reader_peak = 0;
    let mut reader_cpu = 0.0;
    let writer_cpu0 = cpu_secs(writer.id()).unwrap_or(0.0);
    let status = loop {
        if let Some(p) = peak_rss_kib(rpid) {
            reader_peak = reader_peak.max(p);
        }
        if let Some(c) = cpu_secs(rpid) {
            reader_cpu = c; // the last sample before exit; undercounts by at most one poll
        }
        if let Some(s) = reader.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "bounded: gave up after 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = t.elapsed();
    assert!(status.success());
    let writer_peak = peak_rss_kib(writer.id()).unwrap_or(0);
    let writer_cpu = cpu_secs(writer.id()).unwrap_or(0.0) - writer_cpu0;
    let _ = Command::new("kill").arg(writer.id().to_string()).status();
    let _ = writer.wait();

    // The reader's copy verifies (outside the timing).
    let mut copy =
        feedsync::core::Feed::open(feedsync::storage::DiskStorage::open(&rstore).unwrap()).unwrap();
    assert_eq!(copy.byte_len(), total);
    copy.verify_all().unwrap();

    println!(
        "replicated {} MiB of 64 KiB blocks between two processes over loopback (Noise, verified)",
        total >> 20
    );
    println!(
        "  time {:.2} s, throughput {:.0} MB/s",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64() / 1e6
    );
    println!(
        "  peak RSS: writer {} MiB, reader {} MiB",
        writer_peak / 1024,
        reader_peak / 1024
    );
    println!(
        "  CPU: writer {writer_cpu:.2} s, reader {reader_cpu:.2} s, of {:.2} s available on {} cores",
        elapsed.as_secs_f64() * cores() as f64,
        cores()
    );
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
