//! The drive at library level: a writer restarted after offline edits, the watcher waking
//! the loop, `log` beside a running writer, `--once` needing a peer, and the typed errors of
//! opening and cloning (with `discard` leaving nothing behind).

mod common;

use common::bytes;
use crossbeam_channel::Receiver;
use feedsync::drive::record::Entry;
use feedsync::drive::{AppOptions, Change, Drive, DriveError, DriveEvent};
use feedsync::sync::{NodeConfig, NodeEvent, NodeHandle};
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

const B: usize = 64 * 1024;

/// Waits for an event matching `f`, failing after `limit`.
fn wait_for<T: std::fmt::Debug>(
    rx: &Receiver<T>,
    limit: Duration,
    mut f: impl FnMut(&T) -> bool,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(e) if f(&e) => return e,
            Ok(_) => {}
            Err(e) => panic!("no matching event within {limit:?}: {e}"),
        }
    }
}

struct Running {
    node: NodeHandle,
    events: Receiver<DriveEvent>,
    addr: Option<SocketAddr>,
}

/// Runs `drive` on a node (listening on loopback if it is the writer).
fn run(drive: Drive, options: AppOptions, peers: Vec<SocketAddr>, once: bool) -> Running {
    let (tx, events) = crossbeam_channel::unbounded();
    let writer = drive.writer;
    let (feeds, app) = drive
        .into_app(AppOptions {
            events: Some(tx),
            ..options
        })
        .unwrap();
    let config = NodeConfig {
        listen: writer.then(|| "127.0.0.1:0".parse().unwrap()),
        peers,
        exit_when_complete: once,
        ..NodeConfig::new()
    };
    let node = feedsync::sync::spawn_with(config, feeds, Some(Box::new(app))).unwrap();
    let addr = writer.then(|| {
        match wait_for(&node.events, Duration::from_secs(10), |e| {
            matches!(e, NodeEvent::Listening(_))
        }) {
            NodeEvent::Listening(a) => a,
            _ => unreachable!("matched above"),
        }
    });
    Running { node, events, addr }
}

/// An address on loopback nothing listens on (bound, then closed): dials to it fail at once.
fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Waits until the node's loop has run for at least `span`, by the node's own clock: it redials
/// a dead peer after the delay each `DialFailed` names, counted in loop ticks, so the sum of the
/// delays between the failures seen is time the loop really ran (no sleep in the test).
fn loop_ran_for(events: &Receiver<NodeEvent>, span: Duration) {
    let mut ran = Duration::ZERO;
    let mut last: Option<Duration> = None;
    let deadline = Instant::now() + span * 10 + Duration::from_secs(20);
    while ran < span {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(NodeEvent::DialFailed { retry_in, .. }) => {
                ran += last.replace(retry_in).unwrap_or_default();
            }
            Ok(_) => {}
            Err(e) => panic!("the node stopped redialling after {ran:?}: {e}"),
        }
    }
}

fn quiet() -> AppOptions {
    AppOptions {
        follow: false,
        ..AppOptions::default()
    }
}

fn write(root: &Path, rel: &str, data: &[u8], mtime_secs: u64) {
    let p = root.join(rel);
    fs::write(&p, data).unwrap();
    fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(mtime_secs))
        .unwrap();
}

fn content_len(root: &Path) -> u64 {
    Drive::open(root).unwrap().content.unwrap().len()
}

#[test]
fn a_restarted_writer_finds_offline_edits_and_appends_only_what_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("share");
    fs::create_dir(&root).unwrap();
    write(&root, "a", &bytes(1, 3 * B), 1_000);
    write(&root, "b", &bytes(2, 2 * B), 1_000);
    write(&root, "c", &bytes(3, 100), 1_000);
    write(&root, "e", &bytes(4, B), 1_000);

    let drive = Drive::share(&root).unwrap();
    let url = drive.url();
    let s = run(drive, quiet(), vec![], false);
    wait_for(&s.events, Duration::from_secs(30), |e| {
        matches!(e, DriveEvent::Changed { version: 2, .. })
    });
    s.node.shutdown().unwrap();
    let before = content_len(&root);
    assert_eq!(before, 3 + 2 + 1 + 1, "every block of the first import");
    let b_before = match Drive::replay(&mut Drive::open(&root).unwrap().meta, u64::MAX)
        .unwrap()
        .entries
        .remove("b")
    {
        Some(Entry::File(f)) => f,
        other => panic!("b recorded as {other:?}"),
    };

    // Offline: one block of `a` changed, `c` renamed, `e` removed, `d` new (two blocks).
    let mut a = bytes(1, 3 * B);
    a[B + 7] ^= 0xff;
    write(&root, "a", &a, 2_000);
    fs::rename(root.join("c"), root.join("c2")).unwrap();
    fs::remove_file(root.join("e")).unwrap();
    write(&root, "d", &bytes(5, B + 10), 2_000);

    let drive = Drive::share(&root).unwrap();
    assert_eq!(drive.url(), url, "the same drive, the same URL");
    let s = run(drive, quiet(), vec![], false);
    let changed = wait_for(&s.events, Duration::from_secs(30), |e| {
        matches!(e, DriveEvent::Changed { .. })
    });
    assert_eq!(
        changed,
        DriveEvent::Changed {
            version: 3,
            added: 2,
            modified: 1,
            removed: 2
        },
        "d and c2 added, a modified, e and c removed (the rename counts both ways)"
    );

    // `log` reads the history while the writer runs (it holds the store's lock).
    let log = Drive::log(&root).unwrap();
    assert_eq!(log.len(), 3, "every version");
    let last = &log[2];
    assert!(last.time.is_some(), "the writer records a time per version");
    let mut changes = last.changes.clone();
    changes.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(
        changes,
        vec![
            Change::Add {
                path: "d".into(),
                size: (B + 10) as u64
            },
            Change::Modify {
                path: "a".into(),
                size: (3 * B) as u64
            },
            Change::Remove { path: "e".into() },
            Change::Rename {
                from: "c".into(),
                to: "c2".into()
            },
        ]
    );
    assert!(
        matches!(&log[1].changes[..], [Change::Add { .. }, ..]),
        "{:?}",
        log[1]
    );
    s.node.shutdown().unwrap();

    assert_eq!(
        content_len(&root) - before,
        1 + 2,
        "only the changed block of a and d's two blocks are appended"
    );
    let state = Drive::replay(&mut Drive::open(&root).unwrap().meta, u64::MAX).unwrap();
    assert_eq!(state.version, 3, "one version for the offline edits");
    assert_eq!(
        state.entries.get("b"),
        Some(&Entry::File(b_before)),
        "b unchanged, not re-recorded"
    );
    assert!(!state.entries.contains_key("e") && !state.entries.contains_key("c"));

    // A third start without edits appends nothing at all.
    let options = AppOptions {
        progress: Some(Duration::from_millis(10)),
        ..quiet()
    };
    let s = run(Drive::share(&root).unwrap(), options, vec![], false);
    wait_for(&s.events, Duration::from_secs(10), |e| {
        matches!(e, DriveEvent::Progress(_))
    });
    s.node.shutdown().unwrap();
    assert_eq!(Drive::log(&root).unwrap().len(), 3);
}

#[test]
fn the_watcher_wakes_the_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("share");
    fs::create_dir(&root).unwrap();
    let options = AppOptions {
        follow: true,
        // No periodic rescan within the test: only the watcher can find the change.
        rescan_interval: Duration::from_secs(3600),
        progress: Some(Duration::from_millis(10)),
        ..AppOptions::default()
    };
    let s = run(Drive::share(&root).unwrap(), options, vec![], false);
    // The first figures say the start scan is done.
    wait_for(&s.events, Duration::from_secs(10), |e| {
        matches!(e, DriveEvent::Progress(_))
    });
    fs::write(root.join("new"), b"hello").unwrap();
    let e = wait_for(&s.events, Duration::from_secs(10), |e| {
        matches!(e, DriveEvent::Changed { .. })
    });
    assert!(matches!(e, DriveEvent::Changed { added: 1, .. }), "{e:?}");
    s.node.shutdown().unwrap();
}

#[test]
fn a_special_file_is_reported_once_and_idle_sends_no_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("share");
    fs::create_dir(&root).unwrap();
    // A FIFO: never shared (a symlink is shared as a link since #13).
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("link").as_path(),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let options = AppOptions {
        follow: true,
        rescan_interval: Duration::from_millis(50),
        progress: Some(Duration::from_millis(10)),
        ..AppOptions::default()
    };
    let s = run(
        Drive::share(&root).unwrap(),
        options,
        vec![dead_addr()],
        false,
    );
    // Let the loop run for seconds (dozens of rescans), timed by the node's own dial retries.
    loop_ran_for(&s.node.events, Duration::from_millis(2500));
    s.node.shutdown().unwrap();
    let events: Vec<DriveEvent> = s.events.try_iter().collect();
    let skips = events
        .iter()
        .filter(|e| matches!(e, DriveEvent::Skipped { path, .. } if path.ends_with("link")))
        .count();
    assert_eq!(skips, 1, "warned once, not at every rescan: {events:?}");
    let progress = events
        .iter()
        .filter(|e| matches!(e, DriveEvent::Progress(_)))
        .count();
    assert_eq!(progress, 1, "idle: only the first figures: {events:?}");
}

#[test]
fn an_idle_node_does_not_rewrite_status_json() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("share");
    fs::create_dir(&root).unwrap();
    write(&root, "f", b"hello", 1_000);
    let s = run(
        Drive::share(&root).unwrap(),
        quiet(),
        vec![dead_addr()],
        false,
    );
    let status = root.join(".feedsync/status.json");
    // Wait on content: the figures after the first scan.
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        assert!(
            Instant::now() < deadline,
            "status.json never said files_total 1"
        );
        if let Ok(text) = fs::read_to_string(&status)
            && text.contains("\"files_total\": 1")
        {
            break fs::metadata(&status).unwrap().ino();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    loop_ran_for(&s.node.events, Duration::from_millis(2500));
    // Every write replaces the file (a new inode): the same inode means no write at all.
    assert_eq!(
        fs::metadata(&status).unwrap().ino(),
        first,
        "status.json rewritten while nothing changed"
    );
    s.node.shutdown().unwrap();
}

#[test]
fn a_clone_is_done_only_after_a_peer_proved_the_newest_version() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    fs::create_dir(&src).unwrap();
    write(&src, "f", &bytes(9, B + 3), 1_000);
    let share = Drive::share(&src).unwrap();
    let key = share.meta.public_key();
    let s = run(share, quiet(), vec![], false);
    let addr = s.addr.unwrap();

    // With the share: complete, and the node stops by itself.
    let c = run(
        Drive::clone_into(&dst, key).unwrap(),
        quiet(),
        vec![addr],
        true,
    );
    wait_for(&c.events, Duration::from_secs(30), |e| {
        matches!(e, DriveEvent::Complete { version: 2 })
    });
    c.node.join().unwrap();
    assert_eq!(fs::read(dst.join("f")).unwrap(), bytes(9, B + 3));
    s.node.shutdown().unwrap();

    // Again, with every block in hand but no peer: never done (it cannot know it is current).
    // The only peer is an address nobody listens on: it never proves anything.
    let c = run(Drive::open(&dst).unwrap(), quiet(), vec![dead_addr()], true);
    // The loop ran its completion check for well over a second (timed by its dial retries).
    loop_ran_for(&c.node.events, Duration::from_millis(2500));
    assert!(
        !c.node.events.try_iter().any(|e| e == NodeEvent::Complete),
        "a clone that heard from no peer called itself complete"
    );
    assert!(
        !c.events
            .try_iter()
            .any(|e| matches!(e, DriveEvent::Complete { .. })),
        "Complete sent without a peer"
    );
    c.node.shutdown().unwrap();
}

#[test]
fn errors_name_the_path_and_the_fix_and_discard_leaves_nothing() {
    let key = |_: u8| {
        feedsync::core::crypto::generate_key()
            .verifying_key()
            .to_bytes()
    };
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let e = Drive::share(&missing).err().unwrap();
    assert!(matches!(e, DriveError::Missing { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains(&format!("{} does not exist", missing.display())),
        "{e}"
    );
    let e = Drive::open(&missing).err().unwrap();
    assert!(e.to_string().contains("does not exist"), "{e}");

    let file = tmp.path().join("file");
    fs::write(&file, b"x").unwrap();
    let e = Drive::clone_into(&file, key(1)).err().unwrap();
    assert!(matches!(e, DriveError::NotAFolder(_)), "{e:?}");
    assert!(e.to_string().contains(&file.display().to_string()), "{e}");

    // A clone of a key nobody serves, abandoned: the retry with the right key works.
    let dir = tmp.path().join("clone");
    let (k2, k3) = (key(2), key(3));
    let wrong = Drive::clone_into(&dir, k2).unwrap();
    drop(wrong);
    let right = Drive::clone_into(&dir, k3).unwrap();
    assert_eq!(right.meta.public_key(), k3);
    drop(right);
    // Discard: what clone_into created goes, the folder too (it made it and it is empty).
    let again = tmp.path().join("again");
    Drive::clone_into(&again, k3).unwrap().discard().unwrap();
    assert!(!again.exists(), "a failed clone leaves nothing behind");
    // A resumed clone of a folder made earlier: only the state goes.
    Drive::clone_into(&dir, k3).unwrap().discard().unwrap();
    assert!(!dir.join(".feedsync").exists());

    // A folder that already existed keeps its files; only the state goes. Cloning into it
    // needs the user's word (its files are theirs): refused without, naming the folder.
    let kept = tmp.path().join("kept");
    fs::create_dir(&kept).unwrap();
    fs::write(kept.join("mine"), b"x").unwrap();
    let e = Drive::clone_into(&kept, key(4)).err().unwrap();
    assert!(matches!(e, DriveError::NotEmpty(_)), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains(&kept.display().to_string()) && text.contains("--adopt"),
        "{text}"
    );
    assert!(
        !kept.join(".feedsync").exists(),
        "a refused clone leaves no state"
    );
    Drive::clone_adopting(&kept, key(4))
        .unwrap()
        .discard()
        .unwrap();
    assert!(kept.join("mine").exists());
    assert!(!kept.join(".feedsync").exists());

    // A share is another drive: refused, with the fix.
    let shared = tmp.path().join("shared");
    fs::create_dir(&shared).unwrap();
    let s = Drive::share(&shared).unwrap();
    let url = s.url();
    assert!(
        matches!(s.discard(), Err(DriveError::WriterState(_))),
        "the writer's key is never discarded"
    );
    let e = Drive::clone_into(&shared, key(5)).err().unwrap();
    let text = e.to_string();
    assert!(matches!(e, DriveError::OtherDrive { .. }), "{e:?}");
    assert!(
        text.contains(&url) && text.contains(".feedsync") && text.contains("remove"),
        "{text}"
    );
    assert!(shared.join(".feedsync/meta/secret_key").exists());
}

/// The system calls of a real `feedsync share` (under `strace`) that write or flush the feed
/// stores, in order: `(call, path)`.
fn store_calls(trace: &str) -> Vec<(String, String)> {
    trace
        .lines()
        .filter_map(|l| {
            // `PID call(FD</path>, ...) = N`
            let rest = l.split_once(' ')?.1.trim_start();
            let (call, args) = rest.split_once('(')?;
            let path = args.split_once('<')?.1.split_once('>')?.0;
            path.contains("/.feedsync/")
                .then(|| (call.to_string(), path.to_string()))
        })
        .collect()
}

#[test]
fn the_content_feed_is_durable_before_records_name_its_blocks() {
    use common::{BIN, Proc};
    if std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_err()
    {
        eprintln!("skipped: needs strace to see the order of writes and flushes");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("share");
    fs::create_dir(&root).unwrap();
    write(&root, "f", &bytes(3, 2 * B + 5), 1_000);
    let trace = tmp.path().join("trace");
    let mut cmd = std::process::Command::new("strace");
    cmd.args([
        "-f",
        "-qq",
        "-y",
        "-e",
        "trace=pwrite64,write,fdatasync,fsync",
        "-o",
    ])
    .arg(&trace)
    .arg(BIN)
    .args(["share", root.to_str().unwrap()])
    .args(["--listen", "127.0.0.1:0", "--no-discovery"]);
    let mut p = Proc::spawn(cmd);
    common::wait_until(Duration::from_secs(60), "the first scan's version", || {
        p.stderr_has("version 2:")
    });
    // Stop the traced node itself (strace's only child); strace then exits with it.
    let strace = p.pid();
    let children = fs::read_to_string(format!("/proc/{strace}/task/{strace}/children")).unwrap();
    let node: u32 = children.split_whitespace().next().unwrap().parse().unwrap();
    let ok = std::process::Command::new("kill")
        .arg(node.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok);
    p.wait_exit(Duration::from_secs(30));
    let calls = store_calls(&fs::read_to_string(&trace).unwrap());
    // The first flush of the metadata feed's header after content was appended makes the
    // records naming those blocks durable. Between the last write to the content feed's tree
    // before it (the last append) and it, the content feed's tree and header must have been
    // flushed.
    let flush = |c: &str| c == "fsync" || c == "fdatasync";
    let first_content = calls
        .iter()
        .position(|(c, p)| c.starts_with("pwrite") && p.ends_with("/content/tree"))
        .expect("content was appended");
    let record = first_content
        + calls[first_content..]
            .iter()
            .position(|(c, p)| flush(c) && p.ends_with("/meta/header"))
            .expect("the records were flushed");
    let last_content_write = calls[..record]
        .iter()
        .rposition(|(c, p)| c.starts_with("pwrite") && p.ends_with("/content/tree"))
        .unwrap();
    for file in ["tree", "header"] {
        assert!(
            calls[last_content_write..record]
                .iter()
                .any(|(c, p)| flush(c) && p.ends_with(&format!("/content/{file}"))),
            "content/{file} not flushed before the records naming its blocks: {:?}",
            &calls[first_content..=record]
        );
    }
}
