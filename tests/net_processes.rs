//! Real processes over loopback: a source killed mid-transfer, SIGTERM under load and resume.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BLOCK: usize = 65536;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_feedsync")
}

/// A running `feedsync feed sync`, its stdout lines on a channel; killed when dropped.
struct Node {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Node {
    fn start(args: &[&str]) -> Node {
        let mut child = Command::new(bin())
            .args(["feed", "sync"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Node {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// The first line matching `want`, within `secs` seconds.
    fn wait_line(&mut self, secs: u64, what: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if want(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("no {what} within {secs} s; output so far: {:?}", self.log),
            }
        }
    }

    fn addr(&mut self) -> String {
        let line = self.wait_line(20, "listening line", |l| l.starts_with("listening on "));
        line.trim_start_matches("listening on ").to_string()
    }

    fn signal(&self, sig: i32) {
        // Through the `kill` command, so the test needs no libc binding.
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for exit (within `secs`), returning the status and the remaining output.
    fn wait_exit(&mut self, secs: u64) -> (std::process::ExitStatus, Vec<String>) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The reader thread ends at EOF; collect what it still holds.
                while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
                    self.log.push(l);
                }
                return (status, self.log.clone());
            }
            assert!(
                Instant::now() < deadline,
                "did not exit within {secs} s; output: {:?}",
                self.log
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().unwrap();
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
    let mut data = vec![0u8; blocks * BLOCK];
    blake3::Hasher::new()
        .update(b"net-processes")
        .finalize_xof()
        .fill(&mut data);
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
    let mut w = Node::start(&[wstore.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    let waddr = w.addr();
    // A second source: a replica that completes, then keeps serving.
    let r1 = dir.path().join("r1");
    let mut s1 = Node::start(&[
        r1.to_str().unwrap(),
        "--key",
        &key,
        "--peer",
        &waddr,
        "--listen",
        "127.0.0.1:0",
    ]);
    let s1addr = s1.addr();
    s1.wait_line(120, "source 2 complete", |l| l.starts_with("complete"));
    let r2 = dir.path().join("r2");
    let mut reader = Node::start(&[
        r2.to_str().unwrap(),
        "--key",
        &key,
        "--peer",
        &waddr,
        "--peer",
        &s1addr,
        "--once",
    ]);
    let line = reader.wait_line(120, "first progress", |l| progress(l).is_some());
    let (held, length) = progress(&line).unwrap();
    assert!(
        held < length,
        "finished before the kill ({line}): nothing was tested"
    );
    w.child.kill().unwrap(); // SIGKILL, mid-transfer
    let (status, log) = reader.wait_exit(120);
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
    let mut w = Node::start(&[wstore.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    let waddr = w.addr();
    let r = dir.path().join("r");
    let rs = r.to_str().unwrap();
    let mut reader = Node::start(&[rs, "--key", &key, "--peer", &waddr, "--once"]);
    let line = reader.wait_line(120, "first progress", |l| progress(l).is_some());
    assert!(
        progress(&line).unwrap().0 < 1500,
        "finished before the signal: nothing was tested"
    );
    let t = Instant::now();
    reader.signal(15); // SIGTERM under load
    let (status, log) = reader.wait_exit(5);
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
    let mut again = Node::start(&[rs, "--peer", &waddr, "--once"]);
    let (status, log) = again.wait_exit(120);
    assert!(status.success(), "{log:?}");
    let second = fetched(&log);
    assert_eq!(
        first + second,
        1500,
        "re-fetched verified blocks: {first} + {second}"
    );

    // SIGINT too, on the serving writer: a clean exit 0.
    w.signal(2);
    let (status, log) = w.wait_exit(5);
    assert!(status.success(), "writer: {status:?} {log:?}");
    check(&r, &data);
}
