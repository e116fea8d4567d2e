//! Folder sync end to end: real `feedsync share` / `feedsync clone` processes over loopback,
//! real files, trees compared byte for byte with mode and mtime.

mod common;

use common::{
    Node, Proc, Rng, assert_same_tree, bytes as random_bytes, same_tree, share, tree, wait_until,
};
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

const BIN: &str = common::BIN;

/// Content blocks a `--report-fetches` clone reported fetched: (index, count) of every
/// `fetched 1 I C` line.
fn fetched_content(p: &Proc) -> Vec<(u64, u64)> {
    p.lines()
        .iter()
        .filter_map(|l| {
            let mut w = l.strip_prefix("fetched 1 ")?.split(' ');
            Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
        })
        .collect()
}

fn clone(url: &str, dir: &Path, addr: &str, once: bool) -> Proc {
    let mut args = vec![
        "clone",
        url,
        dir.to_str().unwrap(),
        "--peer",
        addr,
        "--report-fetches",
        "--no-discovery",
    ];
    if once {
        args.push("--once");
    }
    Proc::feedsync(&args)
}

#[test]
fn tree_round_trips_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    fs::create_dir_all(src.join("a/b/c")).unwrap();
    fs::create_dir_all(src.join("empty dir/nested empty")).unwrap();
    fs::create_dir_all(src.join("ünïcødé ✓/with space")).unwrap();
    const B: usize = 64 * 1024;
    for (name, size) in [
        ("size0", 0),
        ("size1", 1),
        ("block-1", B - 1),
        ("block", B),
        ("block+1", B + 1),
        ("a/b/c/three blocks", 3 * B + 17),
    ] {
        fs::write(src.join(name), random_bytes(size as u64, size)).unwrap();
    }
    fs::write(src.join("ünïcødé ✓/with space/nåme ok.txt"), b"hello\n").unwrap();
    fs::write(src.join("a/run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(src.join("a/run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    // Two identical files: the second costs no blocks.
    fs::write(src.join("a/copy1"), random_bytes(99, 2 * B)).unwrap();
    fs::write(src.join("a/copy2"), random_bytes(99, 2 * B)).unwrap();
    // Old and odd mtimes survive (nanoseconds included).
    let old = SystemTime::UNIX_EPOCH + Duration::new(1_000_000_000, 123_456_789);
    fs::File::options()
        .write(true)
        .open(src.join("size1"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    // A 2 GiB sparse file: hashed once, sent as one block, left sparse on the other side.
    let sparse = fs::File::create(src.join("sparse.img")).unwrap();
    sparse.set_len(2 << 30).unwrap();
    sparse.write_all_at(b"end", (2 << 30) - 3).unwrap();
    drop(sparse);
    // Ignored and state paths stay home.
    fs::write(src.join(".feedsyncignore"), "*.log\nbuild/\n").unwrap();
    fs::write(src.join("debug.log"), b"noise").unwrap();
    fs::create_dir_all(src.join("build")).unwrap();
    fs::write(src.join("build/out.o"), b"obj").unwrap();
    // A drive nested inside: its state (secret key among it) is never shared.
    fs::create_dir_all(src.join("a/inner/.feedsync/meta")).unwrap();
    fs::write(src.join("a/inner/.feedsync/meta/secret_key"), [7u8; 32]).unwrap();
    // A file ending in blocks of zeros that the sparse file already brought: the tail is left
    // as a hole and must still read back at publish.
    let mut zero_tail = random_bytes(77, B);
    zero_tail.resize(3 * B, 0);
    fs::write(src.join("zero-tail.bin"), &zero_tail).unwrap();

    let (_share, url, addr) = share(&src);
    let mut c = clone(&url, &dst, &addr, true);
    let status = c.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "clone --once failed: {:?}", c.errors());

    assert!(!dst.join("debug.log").exists() && !dst.join("build").exists());
    assert_same_tree(&src, &dst, &["debug.log", "build", ".feedsync"]);
    let m = fs::metadata(dst.join("sparse.img")).unwrap();
    assert_eq!(m.len(), 2 << 30);
    assert!(
        m.blocks() * 512 < 64 << 20,
        "the sparse file was written out in full ({} bytes on disk)",
        m.blocks() * 512
    );
    // Nothing was fetched twice, and the copy and the zeros cost nothing extra: the content
    // blocks fetched are exactly those the writer appended.
    let fetched = fetched_content(&c);
    let mut seen = std::collections::BTreeSet::new();
    for (i, n) in &fetched {
        for b in *i..i + n {
            assert!(seen.insert(b), "block {b} fetched twice");
        }
    }
    // size1 1, block-1 1, block 1, block+1 2, three blocks 4, nåme 1, run.sh 1, the copies 2
    // (once), sparse 2 (zeros once + the tail), .feedsyncignore 1.
    assert!(
        !dst.join("a/inner/.feedsync").exists(),
        "a nested drive's state was shared"
    );
    // ... + zero-tail.bin 1 (its zero blocks are the sparse file's).
    assert_eq!(seen.len(), 17, "blocks fetched: {fetched:?}");
}

#[test]
fn live_changes_propagate_and_renames_cost_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    fs::create_dir_all(src.join("docs/old")).unwrap();
    fs::write(src.join("docs/report.bin"), random_bytes(1, 1 << 20)).unwrap();
    fs::write(src.join("docs/old/gone.txt"), b"to be deleted").unwrap();
    fs::write(src.join("notes.txt"), b"v1").unwrap();
    fs::write(src.join(".feedsyncignore"), b"*.log\n").unwrap();
    let big = random_bytes(2, 32 * 64 * 1024);
    fs::write(src.join("big.bin"), &big).unwrap();

    let (_share, url, addr) = share(&src);
    let c = clone(&url, &dst, &addr, false);
    wait_until(Duration::from_secs(60), "the first version", || {
        dst.join("big.bin").exists() && same_tree(&src, &dst, &[])
    });
    let before = fetched_content(&c).len();
    let blocks = |c: &Proc| -> u64 { fetched_content(c).iter().map(|(_, n)| n).sum() };
    let fetched_before = blocks(&c);

    // A rename of 1 MiB and a copy: no content block moves.
    fs::rename(src.join("docs/report.bin"), src.join("report-final.bin")).unwrap();
    fs::copy(src.join("big.bin"), src.join("big-copy.bin")).unwrap();
    wait_until(Duration::from_secs(30), "rename and copy", || {
        same_tree(&src, &dst, &[])
    });
    assert_eq!(blocks(&c), fetched_before, "a rename or copy re-sent bytes");

    // One block changed inside a 32-block file: one block fetched.
    let mut changed = big.clone();
    changed[5 * 64 * 1024 + 10] ^= 0xff;
    fs::write(src.join("big.bin"), &changed).unwrap();
    // Edits, a new nested file, a deletion and a removed directory.
    fs::write(src.join("notes.txt"), b"v2, longer").unwrap();
    fs::create_dir_all(src.join("new/deeper")).unwrap();
    fs::write(src.join("new/deeper/file.txt"), b"fresh").unwrap();
    fs::remove_dir_all(src.join("docs/old")).unwrap();
    wait_until(Duration::from_secs(30), "edits and deletions", || {
        same_tree(&src, &dst, &[])
    });
    assert!(!dst.join("docs/old").exists());

    let extra = blocks(&c) - fetched_before;
    assert!(
        extra <= 3,
        "changing one block of big.bin + two small files fetched {extra} blocks"
    );
    assert!(fetched_content(&c).len() > before);

    // A file becomes a directory of the same name.
    fs::remove_file(src.join("notes.txt")).unwrap();
    fs::create_dir_all(src.join("notes.txt")).unwrap();
    fs::write(src.join("notes.txt/inner.txt"), b"now a directory").unwrap();
    wait_until(Duration::from_secs(30), "a file turned directory", || {
        same_tree(&src, &dst, &[])
    });

    // A file created live that the ignore rules exclude stays home; the one after it arrives.
    fs::write(src.join("docs/trace.log"), b"noise").unwrap();
    fs::write(src.join("docs/after.txt"), b"after").unwrap();
    wait_until(
        Duration::from_secs(30),
        "the file after the ignored one",
        || dst.join("docs/after.txt").exists(),
    );
    assert!(
        !dst.join("docs/trace.log").exists(),
        "an ignored file was shared"
    );
}

/// Builds a drive with a hostile metadata record signed by its own key, and serves only its
/// metadata feed with the low-level `feed sync`.
fn hostile_writer(
    dir: &Path,
    records: Vec<feedsync::drive::record::Record>,
) -> (Proc, String, String) {
    use feedsync::drive::{Drive, record};
    fs::create_dir_all(dir).unwrap();
    let mut d = Drive::share(dir).unwrap();
    d.meta.append(&record::encode(&records)).unwrap();
    let url = d.url();
    drop(d);
    let store = dir.join(".feedsync/meta");
    let p = Proc::feedsync(&[
        "feed",
        "sync",
        store.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    let addr = p.listen_addr();
    (p, url, addr)
}

fn empty_file() -> feedsync::drive::record::Entry {
    feedsync::drive::record::Entry::File(feedsync::drive::record::FileInfo {
        size: 0,
        mode: 0o644,
        mtime_secs: 0,
        mtime_nanos: 0,
        hash: *blake3::hash(b"").as_bytes(),
        extents: vec![],
    })
}

#[test]
fn traversal_records_are_refused_and_nothing_escapes() {
    use feedsync::drive::record::{Entry, Record};
    let tmp = tempfile::tempdir().unwrap();
    for (i, bad) in [
        "../escaped.txt",
        "/tmp/absolute.txt",
        "a/../../escaped.txt",
        "a/./b",
    ]
    .into_iter()
    .enumerate()
    {
        let w = tmp.path().join(format!("w{i}"));
        let dst = tmp.path().join(format!("box{i}/dst"));
        let (_w, url, addr) = hostile_writer(
            &w,
            vec![
                Record::Put {
                    path: "fine.txt".into(),
                    entry: empty_file(),
                },
                Record::Put {
                    path: bad.into(),
                    entry: empty_file(),
                },
                Record::Put {
                    path: "sub".into(),
                    entry: Entry::Dir,
                },
            ],
        );
        let c = clone(&url, &dst, &addr, true);
        wait_until(Duration::from_secs(30), "the refusal", || {
            c.stderr_has("refusing version 2") && c.stderr_has("unsafe path")
        });
        // The whole hostile version is refused: nothing from it lands, inside or out.
        assert!(!tmp.path().join(format!("box{i}/escaped.txt")).exists());
        assert!(!tmp.path().join("escaped.txt").exists());
        assert!(!Path::new("/tmp/absolute.txt").exists());
        assert!(!dst.join("fine.txt").exists() && !dst.join("sub").exists());
    }

    // A path that is fine on paper but would write through a symlink the clone holds.
    let outside = tmp.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    let w = tmp.path().join("wlink");
    let dst = tmp.path().join("dstlink");
    fs::create_dir_all(&dst).unwrap();
    std::os::unix::fs::symlink(&outside, dst.join("link")).unwrap();
    let (_w, url, addr) = hostile_writer(
        &w,
        vec![Record::Put {
            path: "link/pwned.txt".into(),
            entry: empty_file(),
        }],
    );
    // The folder holds the symlink already: cloning into it takes --adopt.
    let c = Proc::feedsync(&[
        "clone",
        &url,
        dst.to_str().unwrap(),
        "--peer",
        &addr,
        "--no-discovery",
        "--adopt",
    ]);
    wait_until(Duration::from_secs(30), "the symlink refusal", || {
        c.stderr_has("a parent directory is a symlink")
    });
    assert_eq!(
        fs::read_dir(&outside).unwrap().count(),
        0,
        "wrote through the symlink"
    );
}

/// Every file at a final path in `dst` is complete and equal to its source: never a part.
fn no_partial_files(src: &Path, dst: &Path) {
    let s = tree(src, &[]).unwrap_or_else(|e| panic!("reading {}: {e}", src.display()));
    let d = tree(dst, &[]).unwrap_or_else(|e| panic!("reading {}: {e}", dst.display()));
    for (path, node) in d {
        // A temporary file beside its destination is hidden and never a final path.
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| feedsync::drive::layout::is_temp_name(&n)) {
            continue;
        }
        if let Node::File { .. } = node {
            let want = s
                .get(&path)
                .unwrap_or_else(|| panic!("{path:?} is not in the source"));
            assert_eq!(
                &node, want,
                "{path:?} is at its final path but not complete"
            );
        }
    }
}

/// A folder shared in this process through the library (as `feedsync share` wires it), with
/// every content block it hands out recorded: the serving side's count, which no kill of a
/// clone can lose.
struct InProcessShare {
    node: feedsync::sync::NodeHandle,
    url: String,
    addr: String,
    /// Content block indices in the order they were uploaded (one entry per block sent).
    uploads: Arc<Mutex<Vec<u64>>>,
    drain: std::thread::JoinHandle<()>,
}

impl InProcessShare {
    fn start(dir: &Path) -> InProcessShare {
        use feedsync::core::Event;
        use feedsync::drive::{AppOptions, Drive};
        use feedsync::sync::{NodeConfig, NodeEvent};
        let drive = Drive::share(dir).unwrap();
        let url = drive.url();
        let options = AppOptions {
            follow: false,
            ..AppOptions::default()
        };
        let (feeds, app) = drive.into_app(options).unwrap();
        // The drive's feeds are metadata then content.
        const CONTENT: usize = 1;
        let config = NodeConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            ..NodeConfig::new()
        };
        let node = feedsync::sync::spawn_with(config, feeds, Some(Box::new(app))).unwrap();
        let events = node.events.clone();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let uploads = Arc::new(Mutex::new(Vec::new()));
        let log = uploads.clone();
        // Drained at once, all the time: the node drops events when its queue is full.
        let drain = std::thread::spawn(move || {
            for e in events.iter() {
                match e {
                    NodeEvent::Listening(a) => {
                        let _ = addr_tx.send(a.to_string());
                    }
                    NodeEvent::Replication(Event::Uploaded {
                        feed: CONTENT,
                        index,
                        count,
                        ..
                    }) => log.lock().unwrap().extend(index..index + count),
                    NodeEvent::Stopped => break,
                    _ => {}
                }
            }
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(60)).unwrap();
        InProcessShare {
            node,
            url,
            addr,
            uploads,
            drain,
        }
    }

    fn uploaded(&self) -> Vec<u64> {
        self.uploads.lock().unwrap().clone()
    }

    fn stop(self) {
        self.node.shutdown().unwrap();
        self.drain.join().unwrap();
    }
}

/// Content blocks the clone in `dst` holds durably (read from its store while nothing runs).
fn held_content(dst: &Path) -> BTreeSet<u64> {
    let Ok(d) = feedsync::drive::Drive::open(dst) else {
        return BTreeSet::new(); // killed before it stored its first metadata
    };
    d.content.map_or_else(BTreeSet::new, |c| {
        let b = c.bitfield();
        (0..c.len()).filter(|&i| b.get(i)).collect()
    })
}

/// A clone SIGKILLed again and again, each time after the serving side saw it fetch content,
/// finishes without fetching again any block it had stored. Counted where the blocks leave
/// (the in-process share's uploads), so nothing a kill interrupts can hide a refetch.
#[test]
fn clone_killed_repeatedly_finishes_without_refetching() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    // ~120 MiB: a few large files and many small ones.
    for i in 0..10u64 {
        let d = src.join(format!("big{}", i % 2));
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join(format!("f{i}.bin")),
            random_bytes(1000 + i, (12 << 20) + i as usize * 777),
        )
        .unwrap();
    }
    for i in 0..300u64 {
        let d = src.join(format!("small/{}", i % 10));
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join(format!("s{i}.txt")),
            random_bytes(i, 1 + (i as usize * 131) % 20_000),
        )
        .unwrap();
    }
    let share = InProcessShare::start(&src);
    let (mut rng, seed) = Rng::from_env_or_clock("kill");

    // Blocks the clone held after the last kill: none of them may leave the share again.
    let mut held = BTreeSet::new();
    let mut kills = 0;
    loop {
        let start = share.uploaded().len();
        let mut c = clone(&share.url, &dst, &share.addr, true);
        // Until the share has handed this run some content (or the run finished).
        wait_until(Duration::from_secs(60), "the run to fetch content", || {
            share.uploaded().len() > start || c.child.try_wait().is_ok_and(|s| s.is_some())
        });
        // Then a random moment later, so the kills land all over the transfer.
        let delay = Duration::from_millis(next_delay(&mut rng));
        let t = Instant::now();
        while t.elapsed() < delay && c.exited().is_none() {
            std::thread::sleep(Duration::from_millis(2));
        }
        let finished = c.exited().is_some();
        if !finished {
            c.kill(); // SIGKILL
        }
        let run = share.uploaded()[start..].to_vec();
        let again: Vec<_> = run.iter().filter(|b| held.contains(*b)).collect();
        assert!(
            again.is_empty(),
            "blocks {again:?} fetched again after a restart, though stored (seed {seed})"
        );
        if finished {
            assert!(
                c.wait_exit(Duration::from_secs(1)).success(),
                "{:?}",
                c.errors()
            );
            break;
        }
        kills += 1;
        assert!(
            !run.is_empty(),
            "killed run {kills} fetched nothing (seed {seed})"
        );
        no_partial_files(&src, &dst);
        held = held_content(&dst);
        if kills == 12 {
            break;
        }
    }
    assert!(
        kills >= 10,
        "only {kills} kills landed mid-transfer (seed {seed})"
    );
    if kills == 12 {
        let start = share.uploaded().len();
        let mut c = clone(&share.url, &dst, &share.addr, true);
        assert!(
            c.wait_exit(Duration::from_secs(120)).success(),
            "{:?}",
            c.errors()
        );
        let run = share.uploaded()[start..].to_vec();
        let again: Vec<_> = run.iter().filter(|b| held.contains(*b)).collect();
        assert!(
            again.is_empty(),
            "blocks {again:?} fetched again (seed {seed})"
        );
    }
    assert_same_tree(&src, &dst, &[]);
    // Whatever was sent twice was lost in flight at a kill (never stored): far fewer than all.
    let all = share.uploaded();
    let distinct: BTreeSet<_> = all.iter().collect();
    eprintln!(
        "{kills} kills; {} content blocks uploaded, {} distinct (seed {seed})",
        all.len(),
        distinct.len()
    );
    assert_eq!(
        held_content(&dst).len(),
        distinct.len(),
        "the clone holds exactly the blocks it was sent"
    );
    share.stop();
}

/// A kill delay in ms: mostly early (the first blocks), sometimes well into the transfer.
fn next_delay(rng: &mut Rng) -> u64 {
    match rng.next() % 4 {
        0 => 0,
        1 | 2 => rng.next() % 100,
        _ => rng.next() % 400,
    }
}

/// Tests that need root (a tmpfs mount): see `tests/common` for how `scripts/test` runs them.
mod needs_root {
    use super::*;

    /// A full disk: the clone runs on a small tmpfs in a private mount namespace (root only, as in
    /// CI), runs out of space, reports it, keeps every file it published whole, and completes once
    /// space is freed.
    #[test]
    fn full_disk_reports_corrupts_nothing_and_recovers() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(&src).unwrap();
        for i in 0..4u64 {
            fs::write(
                src.join(format!("f{i}.bin")),
                random_bytes(500 + i, 4 << 20),
            )
            .unwrap();
        }
        let (_share, url, addr) = share(&src);
        let out = tmp.path().join("out");
        fs::create_dir_all(&out).unwrap();
        let script = r#"
    set -u
    MNT=$(mktemp -d)
    mount -t tmpfs -o size=24m tmpfs "$MNT" || exit 90
    head -c 14M /dev/zero > "$MNT/filler"
    "$BIN" clone "$URL" "$MNT/dst" --peer "$ADDR" --once --no-discovery > "$OUT/stdout" 2> "$OUT/stderr" &
    CP=$!
    for i in $(seq 1200); do grep -q "No space left" "$OUT/stderr" && break; sleep 0.05; done
    grep -q "No space left" "$OUT/stderr" || { kill $CP; exit 91; }
    cp -a "$MNT/dst" "$OUT/snapshot"
    rm "$MNT/filler"
    wait $CP
    echo $? > "$OUT/clone_status"
    cp -a "$MNT/dst" "$OUT/final"
    "#;
        let status = Command::new("unshare")
            .args(["-m", "--propagation", "private", "bash", "-c", script])
            .env("BIN", BIN)
            .env("URL", &url)
            .env("ADDR", &addr)
            .env("OUT", &out)
            .status()
            .expect("run unshare (util-linux)");
        let stderr = fs::read_to_string(out.join("stderr")).unwrap_or_default();
        assert_ne!(
            status.code(),
            Some(90),
            "could not mount a tmpfs in a private mount namespace (this test needs root)"
        );
        assert_ne!(
            status.code(),
            Some(91),
            "the clone never reported a full disk: {stderr}"
        );
        assert!(
            status.success(),
            "namespace script failed: {status:?}, clone stderr: {stderr}"
        );
        // The error is one clear line naming the cause.
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("feedsync: ") && l.contains("No space left"))
        );
        // While the disk was full, what was at a final path was whole.
        no_partial_files(&src, &out.join("snapshot"));
        assert_eq!(
            fs::read_to_string(out.join("clone_status")).unwrap().trim(),
            "0"
        );
        assert_same_tree(&src, &out.join("final"), &[]);
        eprintln!("clone stderr:\n{stderr}");
    }
}

/// Bytes changed behind the scanner's back (same size, mtime put back) are caught when serving:
/// the stale block is never sent, the file is re-read, and a clone gets the file as it now is.
#[test]
fn a_file_changed_behind_the_scanners_back_is_reread_not_served() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dst = tmp.path().join("dst");
    fs::create_dir_all(&src).unwrap();
    let doc = src.join("doc.bin");
    let mut data = random_bytes(7, 3 * 64 * 1024);
    fs::write(&doc, &data).unwrap();
    let (_share, url, addr) = share(&src);

    let mtime = fs::metadata(&doc).unwrap().modified().unwrap();
    data[64 * 1024 + 5] ^= 0x55;
    fs::write(&doc, &data).unwrap();
    fs::File::options()
        .write(true)
        .open(&doc)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(fs::metadata(&doc).unwrap().modified().unwrap(), mtime);

    let mut c = clone(&url, &dst, &addr, true);
    assert!(
        c.wait_exit(Duration::from_secs(60)).success(),
        "{:?}",
        c.errors()
    );
    assert_eq!(fs::read(dst.join("doc.bin")).unwrap(), data);
}

/// The comparison the other tests rest on: two trees that cannot be read are not equal, and
/// an extra file, a changed byte or a changed mode is a difference.
#[test]
fn tree_comparison_is_strict() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    assert!(!same_tree(&a, &b, &[]), "two missing trees compared equal");
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    assert!(!same_tree(&a, &b.join("missing"), &[]));
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    for d in [&a, &b] {
        fs::write(d.join("f"), b"same").unwrap();
        fs::File::options()
            .write(true)
            .open(d.join("f"))
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
    assert!(same_tree(&a, &b, &[]));
    fs::write(b.join("extra"), b"").unwrap();
    assert!(!same_tree(&a, &b, &[]), "an extra file was ignored");
    fs::remove_file(b.join("extra")).unwrap();
    fs::set_permissions(b.join("f"), fs::Permissions::from_mode(0o755)).unwrap();
    assert!(!same_tree(&a, &b, &[]), "a mode change was ignored");
}
