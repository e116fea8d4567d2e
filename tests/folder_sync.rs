//! Folder sync end to end: real `feedsync share` / `feedsync clone` processes over loopback,
//! real files, trees compared byte for byte with mode and mtime.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

const BIN: &str = env!("CARGO_BIN_EXE_feedsync");

/// A running feedsync process whose stdout lines are collected by a thread.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Proc {
    fn start(args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start feedsync");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        for (pipe, sink) in [
            (
                Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
                lines.clone(),
            ),
            (Box::new(child.stderr.take().unwrap()), stderr.clone()),
        ] {
            readers.push(std::thread::spawn(move || {
                for l in BufReader::new(pipe).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(l);
                }
            }));
        }
        Proc {
            child,
            lines,
            stderr,
            readers,
        }
    }

    /// After the process ended: waits until everything it printed has been collected.
    fn drain(&mut self) {
        for r in self.readers.drain(..) {
            r.join().unwrap();
        }
    }

    fn line_with(&self, prefix: &str) -> Option<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.starts_with(prefix))
            .cloned()
    }

    fn stderr_has(&self, needle: &str) -> bool {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
    }

    /// Content blocks fetched: (index, count) of every `fetched 1 I C` line.
    fn fetched_content(&self) -> Vec<(u64, u64)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| {
                let mut w = l.strip_prefix("fetched 1 ")?.split(' ');
                Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
            })
            .collect()
    }

    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if t.elapsed() > limit {
                let _ = self.child.kill();
                panic!(
                    "process did not exit within {limit:?}; stderr: {:?}",
                    self.stderr.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `feedsync share DIR` on loopback; returns it with its URL and address.
fn share(dir: &Path) -> (Proc, String, String) {
    // Never mDNS on this machine's interfaces: discovery is tested in network namespaces.
    let p = Proc::start(&[
        "share",
        dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--no-discovery",
    ]);
    wait_until(Duration::from_secs(60), "share to listen", || {
        p.line_with("listening on ").is_some()
    });
    let url = p.lines.lock().unwrap()[0].clone();
    assert!(
        url.starts_with("feedsync://"),
        "first line is the URL: {url}"
    );
    let addr = p
        .line_with("listening on ")
        .unwrap()
        .trim_start_matches("listening on ")
        .to_string();
    (p, url, addr)
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
    Proc::start(&args)
}

#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir,
    File {
        content_hash: [u8; 32],
        size: u64,
        exec: bool,
        mtime: SystemTime,
    },
}

/// Everything under `root` but the state directory and `skip`ped names.
fn tree(root: &Path, skip: &[&str]) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    // The clone may be renaming files into place while we look: what vanishes mid-walk is
    // left out (the trees then differ, and a waiting caller looks again).
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let Ok(e) = e else { continue };
            let name = e.file_name();
            let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
            if rel == Path::new(".feedsync") || skip.iter().any(|s| name == *s) {
                continue;
            }
            let Ok(m) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.is_dir() {
                out.insert(rel, Node::Dir);
                stack.push(e.path());
            } else {
                let Ok(f) = fs::File::open(e.path()) else {
                    continue;
                };
                let mut h = blake3::Hasher::new();
                h.update_reader(f).unwrap();
                out.insert(
                    rel,
                    Node::File {
                        content_hash: *h.finalize().as_bytes(),
                        size: m.len(),
                        exec: m.permissions().mode() & 0o100 != 0,
                        mtime: m.modified().unwrap(),
                    },
                );
            }
        }
    }
    out
}

fn same_tree(a: &Path, b: &Path, skip: &[&str]) -> bool {
    tree(a, skip) == tree(b, skip)
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
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
    let status = c.wait(Duration::from_secs(120));
    c.drain();
    assert!(
        status.success(),
        "clone --once failed: {:?}",
        c.stderr.lock().unwrap()
    );

    assert!(!dst.join("debug.log").exists() && !dst.join("build").exists());
    assert!(
        same_tree(&src, &dst, &["debug.log", "build", ".feedsync"]),
        "trees differ"
    );
    let m = fs::metadata(dst.join("sparse.img")).unwrap();
    assert_eq!(m.len(), 2 << 30);
    assert!(
        m.blocks() * 512 < 64 << 20,
        "the sparse file was written out in full ({} bytes on disk)",
        m.blocks() * 512
    );
    // Nothing was fetched twice, and the copy and the zeros cost nothing extra: the content
    // blocks fetched are exactly those the writer appended.
    let fetched = c.fetched_content();
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
    let before = c.fetched_content().len();
    let blocks = |c: &Proc| -> u64 { c.fetched_content().iter().map(|(_, n)| n).sum() };
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
    assert!(c.fetched_content().len() > before);

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
    let p = Proc::start(&[
        "feed",
        "sync",
        store.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    wait_until(Duration::from_secs(30), "hostile writer to listen", || {
        p.line_with("listening on ").is_some()
    });
    let addr = p
        .line_with("listening on ")
        .unwrap()
        .trim_start_matches("listening on ")
        .to_string();
    (p, url, addr)
}

fn empty_file() -> feedsync::drive::record::Entry {
    feedsync::drive::record::Entry::File(feedsync::drive::record::FileInfo {
        size: 0,
        executable: false,
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
    let c = clone(&url, &dst, &addr, false);
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
    let s = tree(src, &[]);
    for (path, node) in tree(dst, &[]) {
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
    let (_share, url, addr) = share(&src);

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill seed {seed}");
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut fetched = std::collections::BTreeSet::new();
    let mut record = |p: &Proc| {
        for (i, n) in p.fetched_content() {
            for b in i..i + n {
                assert!(
                    fetched.insert(b),
                    "block {b} fetched again after a restart (seed {seed})"
                );
            }
        }
    };
    let mut kills = 0;
    while kills < 12 {
        let mut c = clone(&url, &dst, &addr, true);
        // Kill at a random moment once the run has started moving data.
        let delay = Duration::from_millis(20 + next() % 200);
        let t = Instant::now();
        while t.elapsed() < delay && c.child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        if c.child.try_wait().unwrap().is_some() {
            c.drain();
            record(&c);
            break; // finished before the kill came
        }
        c.child.kill().unwrap(); // SIGKILL
        c.child.wait().unwrap();
        c.drain();
        record(&c);
        kills += 1;
        no_partial_files(&src, &dst);
    }
    assert!(
        kills >= 10,
        "only {kills} kills landed mid-transfer (seed {seed})"
    );
    let mut c = clone(&url, &dst, &addr, true);
    assert!(c.wait(Duration::from_secs(120)).success());
    c.drain();
    record(&c);
    assert!(
        same_tree(&src, &dst, &[]),
        "trees differ after the last run (seed {seed})"
    );
}

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
    assert!(
        same_tree(&src, &out.join("final"), &[]),
        "the clone did not complete"
    );
    eprintln!("clone stderr:\n{stderr}");
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
        c.wait(Duration::from_secs(60)).success(),
        "{:?}",
        c.stderr.lock().unwrap()
    );
    assert_eq!(fs::read(dst.join("doc.bin")).unwrap(), data);
}
