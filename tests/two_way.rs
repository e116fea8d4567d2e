//! Two-way folders (#13) with real processes on loopback: three devices (the founder's `share`,
//! two `join`ed devices it allowed) edit one folder at once; a partition cuts one device off
//! while both sides edit the same files, and heals; a device is killed mid-transfer and
//! restarted. Every device ends with the same tree, every concurrent edit is there as the
//! winner or as a conflict copy with the right name and bytes.
//!
//! The partition is real: every link between devices goes through a TCP proxy in this test,
//! which can drop its connections and refuse new ones (and later let them through again).

mod common;

use common::{Proc, assert_same_tree, bytes, run, same_tree, share, text, wait_until};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SKIP: &[&str] = &[".feedsync"];
const LIMIT: Duration = Duration::from_secs(90);

/// A TCP proxy on loopback to `target` that can be cut (every connection through it dropped,
/// new ones refused at once) and healed.
struct Proxy {
    addr: String,
    up: Arc<AtomicBool>,
    target: Arc<Mutex<String>>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn new(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let up = Arc::new(AtomicBool::new(true));
        let target = Arc::new(Mutex::new(target.to_string()));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (u, t, c) = (up.clone(), target.clone(), conns.clone());
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { continue };
                if !u.load(Ordering::SeqCst) {
                    continue; // dropped: the dialler sees the connection close
                }
                let to = t.lock().unwrap().clone();
                let Ok(outbound) = TcpStream::connect(&to) else {
                    continue;
                };
                let mut list = c.lock().unwrap();
                list.push(inbound.try_clone().unwrap());
                list.push(outbound.try_clone().unwrap());
                drop(list);
                pipe(inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
                pipe(outbound, inbound);
            }
        });
        Proxy {
            addr,
            up,
            target,
            conns,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn heal(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    fn retarget(&self, target: &str) {
        *self.target.lock().unwrap() = target.to_string();
    }
}

/// Copies `from` to `to` on a thread until either side closes.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// `join URL DIR --listen 127.0.0.1:0 --peer P...`, discovery off; its id and address.
fn join(url: &str, dir: &Path, peers: &[&str]) -> (Proc, String, String) {
    let mut args = vec![
        "join",
        url,
        dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--no-discovery",
    ];
    for p in peers {
        args.extend(["--peer", p]);
    }
    let p = Proc::feedsync(&args);
    let id = p.wait_line(LIMIT, "device id", |_| true);
    let addr = p.listen_addr();
    (p, id, addr)
}

/// `sync DIR` for a device that ran before.
fn sync(dir: &Path, peers: &[&str]) -> (Proc, String) {
    let mut args = vec![
        "sync",
        dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--no-discovery",
    ];
    for p in peers {
        args.extend(["--peer", p]);
    }
    let p = Proc::feedsync(&args);
    let addr = p.listen_addr();
    (p, addr)
}

fn allow(dir: &Path, id: &str) {
    let out = run(&["allow", dir.to_str().unwrap(), id]);
    assert!(out.status.success(), "allow: {}", text(&out.stderr));
}

/// Writes `bytes` at `rel` in one step (made beside the folder, then renamed in) with the
/// modification time `mtime` (seconds since the epoch): the watcher sees one finished file.
fn put(dir: &Path, rel: &str, bytes: &[u8], mtime: u64) {
    let tmp = dir
        .parent()
        .unwrap()
        .join(format!(".incoming-{}", std::process::id()));
    std::fs::write(&tmp, bytes).unwrap();
    let f = std::fs::File::options().write(true).open(&tmp).unwrap();
    f.set_modified(UNIX_EPOCH + Duration::from_secs(mtime))
        .unwrap();
    drop(f);
    let dest = dir.join(rel);
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::rename(&tmp, dest).unwrap();
}

fn read(dir: &Path, rel: &str) -> Option<Vec<u8>> {
    std::fs::read(dir.join(rel)).ok()
}

/// `YYYYMMDD-HHMMSS` of `secs` in UTC, as `date` prints it.
fn utc_stamp(secs: u64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y%m%d-%H%M%S"])
        .output()
        .unwrap();
    text(&out.stdout).trim().to_string()
}

/// (version, content bytes received) from the device's `status.json` (rewritten each second
/// while it changes).
fn received(dir: &Path) -> (u64, u64) {
    let v: serde_json::Value = std::fs::read(dir.join(".feedsync/status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    (
        v["version"].as_u64().unwrap_or(0),
        v["received"].as_u64().unwrap_or(0),
    )
}

fn all_same(dirs: &[&PathBuf]) -> bool {
    dirs.windows(2).all(|w| same_tree(w[0], w[1], SKIP))
}

#[test]
fn three_devices_edit_at_once_through_a_partition_and_a_kill_and_converge() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    std::fs::create_dir(&a).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for (rel, seed) in [
        ("same.txt", 1),
        ("del.txt", 2),
        ("keep.txt", 3),
        ("dir/x.txt", 4),
    ] {
        put(&a, rel, &bytes(seed, 3000), now - 1000);
    }
    put(&a, "big.bin", &bytes(5, 2 << 20), now - 1000);

    let (mut pa, url, a_addr) = share(&a);
    let ab = Proxy::new(&a_addr); // B -> A
    let ac = Proxy::new(&a_addr); // C -> A
    let (mut pb, b_id, b_addr) = join(&url, &b, &[&ab.addr]);
    let bc = Proxy::new(&b_addr); // C -> B
    let (mut pc, c_id, _) = join(&url, &c, &[&ac.addr, &bc.addr]);
    // C edits before anyone allowed it: kept on its disk, sent once it is allowed.
    wait_until(LIMIT, "C to receive the folder", || {
        read(&c, "keep.txt").is_some()
    });
    put(
        &c,
        "before_allowed.txt",
        b"written on C before it was allowed",
        now,
    );
    allow(&a, &b_id);
    wait_until(LIMIT, "B to know it is allowed", || {
        text(&run(&["devices", b.to_str().unwrap()]).stdout)
            .lines()
            .any(|l| l.starts_with(&b_id) && !l.contains("not allowed"))
    });
    // A joined device that may write allows another, while it runs (its node answers).
    allow(&b, &c_id);
    wait_until(LIMIT, "both devices to receive the folder", || {
        all_same(&[&a, &b, &c]) && read(&a, "before_allowed.txt").is_some()
    });

    // 1. Connected, every device edits at once: new files, renames (one of a 2 MiB file the
    //    founder wrote: C must take its bytes from its own old file, not fetch them again).
    // What C received for the folder so far, once its status counts all of it.
    wait_until(LIMIT, "C's status to count the first sync", || {
        received(&c).1 >= (2 << 20) + 4 * 3000
    });
    let before = received(&c);
    put(&a, "new_a.txt", b"from a", now);
    put(&b, "new_b.txt", b"from b", now);
    put(&c, "new_c.txt", b"from c", now);
    std::fs::rename(b.join("keep.txt"), b.join("kept.txt")).unwrap();
    std::fs::rename(b.join("big.bin"), b.join("moved.bin")).unwrap();
    wait_until(LIMIT, "the connected edits to converge", || {
        all_same(&[&a, &b, &c])
            && read(&a, "new_b.txt").is_some()
            && read(&b, "new_c.txt").is_some()
            && read(&c, "new_a.txt").is_some()
            && read(&c, "kept.txt").is_some()
            && read(&c, "moved.bin").is_some()
    });
    assert_eq!(
        read(&c, "keep.txt"),
        None,
        "the rename removed the old name"
    );
    let mut grew = 0;
    wait_until(LIMIT, "C's status to count what it received", || {
        let now = received(&c);
        grew = now.1.saturating_sub(before.1);
        now.0 > before.0 && grew > 0
    });
    assert!(
        grew < 256 << 10,
        "a rename on B moved no file bytes to C, yet C received {grew} bytes"
    );

    // 2. C is cut off; both sides edit the same files.
    ac.cut();
    bc.cut();
    put(&b, "same.txt", b"same, as B left it", now + 100);
    put(&c, "same.txt", b"same, as C left it", now + 200);
    std::fs::remove_file(b.join("del.txt")).unwrap();
    put(&c, "del.txt", b"del, edited on C", now + 150);
    put(&a, "dir/x.txt", b"x, edited on A", now + 50);
    put(&c, "only_c.txt", b"written while cut off", now);
    wait_until(LIMIT, "A and B to agree while C is cut off", || {
        same_tree(&a, &b, SKIP)
            && read(&a, "same.txt").as_deref() == Some(&b"same, as B left it"[..])
            && read(&a, "del.txt").is_none()
    });
    assert_eq!(
        read(&c, "same.txt").as_deref(),
        Some(&b"same, as C left it"[..]),
        "nothing crossed the partition"
    );
    assert_eq!(
        read(&a, "only_c.txt"),
        None,
        "nothing crossed the partition"
    );

    ac.heal();
    bc.heal();
    let copy = format!(
        "same.sync-conflict-{}-{}.txt",
        utc_stamp(now + 100),
        &b_id[..8]
    );
    wait_until(LIMIT, "the partition's edits to converge", || {
        all_same(&[&a, &b, &c]) && read(&a, &copy).is_some() && read(&b, "only_c.txt").is_some()
    });
    for d in [&a, &b, &c] {
        // The newer edit wins; the other is kept under the loser's name and time.
        assert_eq!(read(d, "same.txt").unwrap(), b"same, as C left it");
        assert_eq!(read(d, &copy).unwrap(), b"same, as B left it");
        // An edit beats a concurrent delete.
        assert_eq!(read(d, "del.txt").unwrap(), b"del, edited on C");
        assert_eq!(read(d, "dir/x.txt").unwrap(), b"x, edited on A");
    }

    // 3. C writes a big file; B is killed while fetching it, then restarted.
    let big = bytes(6, 48 << 20);
    put(&c, "big2.bin", &big, now);
    wait_until(LIMIT, "B to start fetching big2.bin", || {
        std::fs::read_dir(&b).unwrap().any(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.starts_with(".big2.bin") && name.contains("feedsync")
        })
    });
    pb.kill();
    assert_ne!(
        read(&b, "big2.bin").map(|x| x.len()),
        Some(big.len()),
        "killed before B had the whole file"
    );
    let (pb2, b_addr2) = sync(&b, &[&ab.addr]);
    bc.retarget(&b_addr2);
    wait_until(
        LIMIT,
        "every device to hold big2.bin after the restart",
        || all_same(&[&a, &b, &c]) && read(&b, "big2.bin").is_some_and(|x| x == big),
    );
    assert_same_tree(&a, &b, SKIP);
    assert_same_tree(&a, &c, SKIP);

    // `log` tells who changed what: B's rename (one block, or two if the watcher split it),
    // from B's feed as A holds it, with what B had seen.
    let log = text(&run(&["log", a.to_str().unwrap()]).stdout);
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("by {}", &b_id[..8]))
                && l.contains(" after ")
                && l.contains("moved.bin")),
        "{log}"
    );
    // `status` shows the conflict; `devices` lists all three.
    let status = text(&run(&["status", a.to_str().unwrap()]).stdout);
    assert!(
        status.contains(&copy),
        "status shows the conflict copy: {status}"
    );
    let list = text(&run(&["devices", c.to_str().unwrap()]).stdout);
    for id in [&b_id, &c_id] {
        assert!(list.contains(id.as_str()), "{list}");
    }
    drop(pb2);
    pa.kill();
    pc.kill();
}

/// Folder kinds: a receive-only device takes every edit and sends none (its own edit that a
/// new version replaces is kept as a conflict copy); a send-only device sends its edits and
/// applies none (an edit elsewhere to a file it changed is a conflict the others resolve).
#[test]
fn receive_only_and_send_only_devices_do_what_their_kind_says() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    std::fs::create_dir(&a).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    put(&a, "f.txt", b"f, first", now - 1000);
    put(&a, "g.txt", b"g, first", now - 1000);
    let (mut pa, url, a_addr) = share(&a);
    let args = |dir: &Path, kind: &'static str| {
        vec![
            "join".to_string(),
            url.clone(),
            dir.to_str().unwrap().to_string(),
            "--kind".into(),
            kind.into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--no-discovery".into(),
            "--peer".into(),
            a_addr.clone(),
        ]
    };
    let start = |dir: &Path, kind| {
        let v = args(dir, kind);
        let p = Proc::feedsync(&v.iter().map(String::as_str).collect::<Vec<_>>());
        let id = p.wait_line(LIMIT, "device id", |_| true);
        (p, id)
    };
    let (mut pb, b_id) = start(&b, "receive-only");
    wait_until(LIMIT, "B's join to get the folder first", || {
        read(&b, "g.txt").is_some()
    });
    let (mut pc, c_id) = start(&c, "send-only");
    allow(&a, &b_id);
    allow(&a, &c_id);

    // The send-only device's new file reaches everyone.
    put(&c, "from_c.txt", b"written on the send-only device", now);
    wait_until(LIMIT, "C's file on A and B", || {
        read(&a, "from_c.txt").is_some() && read(&b, "from_c.txt").is_some()
    });
    // A's edit reaches the receive-only device, not the send-only one.
    put(&a, "g.txt", b"g, edited on A", now + 10);
    wait_until(LIMIT, "A's edit on B", || {
        read(&b, "g.txt").as_deref() == Some(&b"g, edited on A"[..])
    });
    // The receive-only device's edit goes nowhere; a new version keeps it as a copy.
    put(
        &b,
        "f.txt",
        b"f, edited on the receive-only device",
        now + 20,
    );
    put(&a, "h.txt", b"a later change on A", now + 30);
    wait_until(LIMIT, "A's later change on B", || {
        read(&b, "h.txt").is_some()
    });
    assert_eq!(read(&a, "f.txt").unwrap(), b"f, first", "nothing left B");
    put(&a, "f.txt", b"f, edited on A", now + 40);
    wait_until(LIMIT, "A's f.txt on B, B's own kept aside", || {
        read(&b, "f.txt").as_deref() == Some(&b"f, edited on A"[..])
            && std::fs::read_dir(&b).unwrap().any(|e| {
                let e = e.unwrap();
                e.file_name()
                    .to_string_lossy()
                    .starts_with("f.sync-conflict-")
                    && std::fs::read(e.path()).unwrap() == b"f, edited on the receive-only device"
            })
    });
    // A send-only device never applies what others write, not even the files it joined to.
    assert_eq!(read(&c, "g.txt"), None, "C applies nothing");
    assert_eq!(read(&c, "h.txt"), None, "C applies nothing");
    // C writes a file A edited too: the newer (C's) wins on A and B, A's edit is a copy there.
    put(&c, "g.txt", b"g, edited on C", now + 50);
    let copy = format!(
        "g.sync-conflict-{}-{}.txt",
        utc_stamp(now + 10),
        &url[11..19]
    );
    wait_until(LIMIT, "the conflict resolved alike on A and B", || {
        [&a, &b].iter().all(|d| {
            read(d, "g.txt").as_deref() == Some(&b"g, edited on C"[..])
                && read(d, &copy).as_deref() == Some(&b"g, edited on A"[..])
        })
    });
    assert_eq!(read(&c, &copy), None, "C applies nothing");
    pa.kill();
    pb.kill();
    pc.kill();
}

/// A hostile *allowed* device: its signed blocks cite a device that does not exist, claim a
/// file far beyond the content it signed, hide a path that leaves the folder in a block, and
/// cite history that never comes. The other devices keep running and syncing with each other,
/// nothing is written outside any folder, and the refused block is reported naming the device.
#[test]
fn a_hostile_allowed_device_stops_only_itself() {
    use feedsync::core::Feed;
    use feedsync::drive::record::{Borrow, Clock, Entry, Extent, FileInfo, Record, encode};
    use feedsync::storage::DiskStorage;

    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    std::fs::create_dir(&a).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    put(&a, "start.txt", b"start", now - 100);
    let (mut pa, url, a_addr) = share(&a);
    let (mut pb, b_id, _) = join(&url, &b, &[&a_addr]);
    let (mut pc, c_id, _) = join(&url, &c, &[&a_addr]);
    allow(&a, &b_id);
    allow(&a, &c_id);
    wait_until(LIMIT, "both devices to receive", || all_same(&[&a, &b, &c]));
    // One honest file from B first: its bytes are B's content block 0, which A and C hold.
    let honest = b"honest bytes from B";
    put(&b, "b_honest.txt", honest, now - 50);
    wait_until(LIMIT, "B's honest file everywhere", || {
        all_same(&[&a, &b, &c]) && read(&a, "b_honest.txt").is_some()
    });

    // B goes hostile: blocks signed with its own key, appended to its own feed.
    pb.terminate(Duration::from_secs(20));
    let mut feed = Feed::open(DiskStorage::open(b.join(".feedsync/device-meta")).unwrap()).unwrap();
    let file = |size: u64, start: u64, count: u64| FileInfo {
        size,
        mode: 0o644,
        mtime_secs: now as i64,
        mtime_nanos: 0,
        hash: [7; 32],
        extents: vec![Extent { start, count }],
    };
    let blocks = [
        // Valid on its face: a file citing a device that does not exist, and one claiming
        // ~1 TiB of content B never signed. Neither may cost anyone more than a wait.
        vec![
            Record::PutFrom {
                path: "ghost.bin".into(),
                file: file(65536, 0, 1),
                from: vec![Borrow {
                    device: [9; 32],
                    extents: 1,
                }],
            },
            Record::Put {
                path: "huge.bin".into(),
                entry: Entry::File(file(1 << 40, 0, (1 << 40) / 65536)),
            },
            // Content B signed, under a whole-file hash it does not have: never published,
            // and it must not keep A from sending its own edits.
            Record::Put {
                path: "wrong_hash.bin".into(),
                entry: Entry::File(file(honest.len() as u64, 0, 1)),
            },
        ],
        // Refused whole when decoded: a path out of the folder. B's feed stops here.
        vec![
            Record::Put {
                path: "fine.txt".into(),
                entry: Entry::File(file(0, 0, 0)),
            },
            Record::Put {
                path: "../escape".into(),
                entry: Entry::File(file(0, 0, 0)),
            },
        ],
        // Never applied: after the refused block, and citing history that never comes.
        vec![Record::Clock {
            clock: Clock::new([([3; 32], 1_000_000)]),
        }],
    ];
    for recs in &blocks {
        feed.append(&encode(recs)).unwrap();
    }
    feed.sync().unwrap();
    drop(feed);
    let (pb2, _) = sync(&b, &[&a_addr]);

    let problem = format!("device {}", &b_id[..8]);
    wait_until(LIMIT, "A to refuse B's block and say so", || {
        let st = text(&run(&["status", a.to_str().unwrap()]).stdout);
        st.contains(&problem)
    });
    // A and C go on, and keep syncing with each other.
    put(&c, "after.txt", b"written on C after B went hostile", now);
    put(&a, "after_a.txt", b"written on A after B went hostile", now);
    wait_until(LIMIT, "A and C to keep syncing", || {
        read(&a, "after.txt").is_some() && read(&c, "after_a.txt").is_some()
    });
    assert!(
        pa.exited().is_none() && pc.exited().is_none(),
        "nobody crashed"
    );
    for d in [&a, &c] {
        assert_eq!(
            read(d, "fine.txt"),
            None,
            "the refused block counts for nothing"
        );
        assert_eq!(
            read(d, "ghost.bin"),
            None,
            "nothing is made of content nobody has"
        );
        assert_eq!(
            read(d, "huge.bin"),
            None,
            "nothing is made of content nobody signed"
        );
        assert_eq!(
            read(d, "wrong_hash.bin"),
            None,
            "nothing is published unverified"
        );
    }
    let outside: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !["a", "b", "c"].contains(&n.as_str()))
        .collect();
    assert!(
        outside.is_empty(),
        "written outside the folders: {outside:?}"
    );
    drop(pb2);
    pa.kill();
    pc.kill();
}

/// Edits made on a device while it was off are its edits when it comes back (never taken for
/// stale files and overwritten): one that another device's edit of the same file never saw
/// is a conflict both keep; a file changed or removed only here goes out as such.
#[test]
fn edits_made_while_a_device_was_off_go_out_and_conflict_with_what_it_never_saw() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir(&a).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for rel in ["f.txt", "g.txt", "h.txt"] {
        put(&a, rel, format!("{rel}, first").as_bytes(), now - 1000);
    }
    let (mut pa, url, a_addr) = share(&a);
    let (mut pb, b_id, _) = join(&url, &b, &[&a_addr]);
    allow(&a, &b_id);
    wait_until(LIMIT, "B to receive", || all_same(&[&a, &b]));
    // B writes once while on, so its own feed and clock are in use before it stops.
    put(&b, "on.txt", b"written on B while on", now);
    wait_until(LIMIT, "A to get it", || read(&a, "on.txt").is_some());
    pb.terminate(Duration::from_secs(20));

    put(&b, "f.txt", b"f, edited on B while off", now + 10);
    put(&b, "g.txt", b"g, edited on B while off", now + 10);
    std::fs::remove_file(b.join("h.txt")).unwrap();
    put(&a, "f.txt", b"f, edited on A meanwhile", now + 20);
    wait_until(LIMIT, "A to commit its edit", || {
        text(&run(&["log", a.to_str().unwrap()]).stdout).contains("modify  f.txt")
    });

    let (pb2, _) = sync(&b, &[&a_addr]);
    let copy = format!("f.sync-conflict-{}-{}.txt", utc_stamp(now + 10), &b_id[..8]);
    wait_until(LIMIT, "both to agree", || {
        all_same(&[&a, &b]) && read(&a, &copy).is_some() && read(&a, "h.txt").is_none()
    });
    for d in [&a, &b] {
        assert_eq!(read(d, "f.txt").unwrap(), b"f, edited on A meanwhile");
        assert_eq!(read(d, &copy).unwrap(), b"f, edited on B while off");
        assert_eq!(read(d, "g.txt").unwrap(), b"g, edited on B while off");
        assert_eq!(read(d, "h.txt"), None, "removed on B while off");
    }
    drop(pb2);
    pa.kill();
}
