//! Real processes over loopback: a source killed mid-transfer, SIGTERM under load and resume.

mod common;

use common::{BIN, Proc};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const BLOCK: usize = 65536;

/// `feedsync feed sync ARGS`, killed when dropped.
fn start(args: &[&str]) -> Proc {
    let mut all = vec!["feed", "sync"];
    all.extend_from_slice(args);
    Proc::feedsync(&all)
}

/// Waits for `p` to exit within `secs`; returns the status and everything it printed.
fn exit(p: &mut Proc, secs: u64) -> (std::process::ExitStatus, Vec<String>) {
    let status = p.wait_exit(Duration::from_secs(secs));
    (status, p.lines())
}

fn run(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "feedsync {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A writer store holding `blocks` 64 KiB blocks of pseudo-random data; returns (store, key, data).
fn writer(dir: &Path, blocks: usize) -> (PathBuf, String, Vec<u8>) {
    let store = dir.join("writer");
    let key = run(&["feed", "create", store.to_str().unwrap()])
        .trim()
        .to_string();
    let data = common::bytes(0x6e65_7470, blocks * BLOCK);
    let file = dir.join("input");
    std::fs::File::create(&file)
        .unwrap()
        .write_all(&data)
        .unwrap();
    run(&[
        "feed",
        "append",
        store.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    (store, key, data)
}

fn progress(line: &str) -> Option<(u64, u64)> {
    let mut it = line
        .strip_prefix("progress ")?
        .split(' ')
        .map(|n| n.parse().ok());
    Some((it.next()??, it.next()??))
}

fn fetched(log: &[String]) -> u64 {
    log.iter()
        .find_map(|l| l.strip_prefix("fetched ")?.parse().ok())
        .expect("a fetched line")
}

/// Every block of the replica equals the writer's data (read back through the library).
fn check(store: &Path, data: &[u8]) {
    let mut f =
        feedsync::core::Feed::open(feedsync::storage::DiskStorage::open(store).unwrap()).unwrap();
    assert_eq!(f.byte_len() as usize, data.len());
    for (i, chunk) in data.chunks(BLOCK).enumerate() {
        assert_eq!(f.get(i as u64).unwrap(), chunk, "block {i}");
    }
    f.verify_all().unwrap();
}

#[test]
fn a_reader_completes_when_one_of_its_two_sources_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let (wstore, key, data) = writer(dir.path(), 1200);
    let mut w = start(&[wstore.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    let waddr = w.listen_addr();
    // A second source: a replica that completes, then keeps serving.
    let r1 = dir.path().join("r1");
    let s1 = start(&[
        r1.to_str().unwrap(),
        "--key",
        &key,
        "--peer",
        &waddr,
        "--listen",
        "127.0.0.1:0",
    ]);
    let s1addr = s1.listen_addr();
    s1.wait_line(Duration::from_secs(120), "source 2 complete", |l| {
        l.starts_with("complete")
    });
    let r2 = dir.path().join("r2");
    let mut reader = start(&[
        r2.to_str().unwrap(),
        "--key",
        &key,
        "--peer",
        &waddr,
        "--peer",
        &s1addr,
        "--once",
    ]);
    let line = reader.wait_line(Duration::from_secs(120), "first progress", |l| {
        progress(l).is_some()
    });
    let (held, length) = progress(&line).unwrap();
    assert!(
        held < length,
        "finished before the kill ({line}): nothing was tested"
    );
    w.child.kill().unwrap(); // SIGKILL, mid-transfer
    let (status, log) = exit(&mut reader, 120);
    assert!(status.success(), "reader failed: {log:?}");
    assert!(
        log.iter().any(|l| l.starts_with("complete 1200 1200")),
        "{log:?}"
    );
    drop(s1);
    check(&r2, &data);
}

#[test]
fn sigterm_under_load_exits_fast_and_a_restart_fetches_only_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let (wstore, key, data) = writer(dir.path(), 1500);
    let mut w = start(&[wstore.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    let waddr = w.listen_addr();
    let r = dir.path().join("r");
    let rs = r.to_str().unwrap();
    let mut reader = start(&[rs, "--key", &key, "--peer", &waddr, "--once"]);
    let line = reader.wait_line(Duration::from_secs(120), "first progress", |l| {
        progress(l).is_some()
    });
    assert!(
        progress(&line).unwrap().0 < 1500,
        "finished before the signal: nothing was tested"
    );
    let t = Instant::now();
    reader.signal(15); // SIGTERM under load
    let (status, log) = exit(&mut reader, 5);
    let took = t.elapsed();
    assert!(
        status.success(),
        "exit status {status:?} after SIGTERM: {log:?}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let first = fetched(&log);
    assert!(
        first > 0 && first < 1500,
        "fetched {first} before the signal"
    );

    // Restart: it resumes, fetching exactly the blocks it did not have.
    let mut again = start(&[rs, "--peer", &waddr, "--once"]);
    let (status, log) = exit(&mut again, 120);
    assert!(status.success(), "{log:?}");
    let second = fetched(&log);
    assert_eq!(
        first + second,
        1500,
        "re-fetched verified blocks: {first} + {second}"
    );

    // SIGINT too, on the serving writer: a clean exit 0.
    w.signal(2);
    let (status, log) = exit(&mut w, 5);
    assert!(status.success(), "writer: {status:?} {log:?}");
    check(&r, &data);
}
