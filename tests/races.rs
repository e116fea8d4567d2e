//! Other local users racing the node (issue #11): a folder writable by others must never make
//! the writer read (and serve) a byte from outside it, never make it block, and never let
//! another user's `.feedsync` take the place of ours.
//!
//! The importer runs in process, scan after scan, while a thread swaps directories for symlinks;
//! the state directory tests open and run real drives.

mod common;

use common::{Rng, bytes};
use feedsync::core::crypto;
use feedsync::core::replicator::{Config, Replicator};
use feedsync::drive::import::Importer;
use feedsync::drive::record::{Entry, State};
use feedsync::drive::{AppOptions, Drive, DriveError};
use feedsync::storage::DiskStorage;
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A writer's importer on its own replicator, as the running writer has them.
struct Writer {
    r: Replicator<DiskStorage>,
    importer: Importer,
    state: State,
    content: usize,
}

fn writer(root: &Path) -> Writer {
    let mut drive = Drive::share(root).unwrap();
    let state = Drive::replay(&mut drive.meta, u64::MAX).unwrap();
    let mut r = Replicator::new(Config::default());
    let meta = r.add_feed(drive.meta, false);
    let content = r.add_feed(drive.content.take().unwrap(), false);
    let mut importer = Importer::new(
        &mut r,
        meta,
        content,
        drive.layout.clone(),
        drive.root_dir.clone(),
        drive.root.clone(),
    )
    .unwrap();
    importer.keep_out(&*drive.state_handle).unwrap();
    Writer {
        r,
        importer,
        state,
        content,
    }
}

impl Writer {
    /// Leaf hashes of every content block held.
    fn leaves(&mut self) -> BTreeSet<[u8; 32]> {
        let feed = self.r.feed_mut(self.content);
        (0..feed.len())
            .filter_map(|i| feed.leaf_hash(i).ok())
            .collect()
    }

    fn paths(&self) -> BTreeSet<String> {
        self.state.entries.keys().cloned().collect()
    }
}

/// Runs `f` on a thread; `None` if it did not return within `limit` (it blocked).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

#[test]
fn a_parent_swapped_for_a_symlink_never_leaks_a_byte_from_outside() {
    let (mut rng, _seed) = Rng::from_env_or_clock("races");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("share");
    let outside = tmp.path().join("outside");
    fs::create_dir_all(root.join("sub/deep")).unwrap();
    fs::create_dir_all(outside.join("deep")).unwrap();
    // The same names inside and out: a leak shows as an inside path with outside bytes.
    let secrets: Vec<Vec<u8>> = (0..3).map(|_| bytes(rng.next(), 3000)).collect();
    fs::write(outside.join("secret"), &secrets[0]).unwrap();
    fs::write(outside.join("plain"), &secrets[1]).unwrap();
    fs::write(outside.join("deep/plain"), &secrets[2]).unwrap();
    fs::write(root.join("sub/plain"), b"inside").unwrap();
    fs::write(root.join("sub/deep/plain"), b"inside too").unwrap();
    let secret_hashes: Vec<[u8; 32]> = secrets
        .iter()
        .map(|s| *blake3::hash(s).as_bytes())
        .collect();
    let secret_leaves: Vec<[u8; 32]> = secrets.iter().map(|s| crypto::leaf_hash(s)).collect();

    let mut w = writer(&root);
    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let swapper = {
        let (root, outside, stop, swaps) =
            (root.clone(), outside.clone(), stop.clone(), swaps.clone());
        std::thread::spawn(move || {
            // Alternately the real `sub` and a symlink to the outside directory at its name,
            // holding each for a seeded few microseconds.
            let (sub, away, link) = (root.join("sub"), root.join("sub.away"), outside);
            while !stop.load(Ordering::Relaxed) {
                fs::rename(&sub, &away).unwrap();
                symlink(&link, &sub).unwrap();
                spin(rng.next() % 200);
                fs::remove_file(&sub).unwrap();
                fs::rename(&away, &sub).unwrap();
                spin(rng.next() % 200);
                swaps.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let named: BTreeSet<PathBuf> = ["sub/secret", "sub/plain", "sub/deep/plain", "sub"]
        .iter()
        .map(|p| root.join(p))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut scans = 0;
    while Instant::now() < deadline {
        // Both kinds of scan: the full walk, and the one a change notification triggers.
        w.importer.scan(&mut w.r, &mut w.state).unwrap();
        w.importer
            .scan_paths(&mut w.r, &mut w.state, &named)
            .unwrap();
        scans += 1;
        let leaked: Vec<_> = w
            .state
            .entries
            .iter()
            .filter(|(p, e)| {
                p.ends_with("secret")
                    || matches!(e, Entry::File(f) if secret_hashes.contains(&f.hash))
            })
            .collect();
        assert!(
            leaked.is_empty(),
            "read from outside the folder: {leaked:?}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    let leaves = w.leaves();
    for l in &secret_leaves {
        assert!(
            !leaves.contains(l),
            "an outside file's bytes are in the content feed"
        );
    }
    eprintln!("{scans} scans, {} swaps", swaps.load(Ordering::Relaxed));
    assert!(swaps.load(Ordering::Relaxed) > 0 && scans > 1);
    // Settled, the folder's own files are all there.
    w.importer.scan(&mut w.r, &mut w.state).unwrap();
    assert!(w.paths().contains("sub/deep/plain"), "{:?}", w.paths());
}

/// Busy-waits about `n` microseconds (a sleep would be far coarser than the race window).
fn spin(n: u64) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_micros(n) {
        std::hint::spin_loop();
    }
}

#[test]
fn links_are_recorded_not_followed_and_fifos_never_block_a_scan() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("share");
    fs::create_dir(&root).unwrap();
    fs::write(tmp.path().join("outside"), b"not ours").unwrap();
    fs::write(root.join("plain"), b"x").unwrap();
    symlink(tmp.path().join("outside"), root.join("link")).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(root.join("fifo"))
        .status()
        .unwrap();
    assert!(made.success());
    let r2 = root.clone();
    let paths = within(Duration::from_secs(20), move || {
        let mut w = writer(&r2);
        w.importer.scan(&mut w.r, &mut w.state).unwrap();
        let named = ["plain", "link", "fifo"]
            .iter()
            .map(|p| r2.join(p))
            .collect();
        // The targeted scan as a notification about all three would run it.
        fs::write(r2.join("plain"), b"xy").unwrap();
        w.importer
            .scan_paths(&mut w.r, &mut w.state, &named)
            .unwrap();
        let link = w.state.entries.get("link").cloned();
        (w.paths(), link, w.leaves())
    })
    .expect("a scan blocked on the FIFO");
    let (paths, link, leaves) = paths;
    // The link is recorded as a link (#13), its target as it reads, never followed: the
    // outside file's bytes are not in the content feed.
    assert_eq!(
        paths,
        BTreeSet::from(["link".to_string(), "plain".to_string()])
    );
    match link {
        Some(Entry::Link(l)) => {
            assert_eq!(l.target, tmp.path().join("outside").to_str().unwrap());
        }
        other => panic!("not recorded as a link: {other:?}"),
    }
    assert!(!leaves.contains(&crypto::leaf_hash(b"not ours")));
}

#[test]
fn reader_temporaries_and_state_directories_are_never_imported() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("share");
    fs::create_dir_all(root.join("d")).unwrap();
    fs::create_dir_all(root.join("n/.feedsync/meta")).unwrap();
    fs::write(root.join("a.txt"), b"a").unwrap();
    fs::write(root.join(".a.txt.feedsync-1f2e"), b"half written").unwrap();
    fs::write(root.join("d/.x.feedsync-9"), b"half written").unwrap();
    fs::write(root.join("n/.feedsync/meta/secret_key"), b"key").unwrap();
    let mut w = writer(&root);
    w.importer.scan(&mut w.r, &mut w.state).unwrap();
    let want: BTreeSet<String> = ["a.txt", "d", "n"].iter().map(|s| s.to_string()).collect();
    assert_eq!(w.paths(), want);
    // Named by a notification, they are passed over too.
    let named = [".a.txt.feedsync-1f2e", "d/.x.feedsync-9", "d/.y.feedsync-2"]
        .iter()
        .map(|p| root.join(p))
        .collect();
    fs::write(root.join("d/.y.feedsync-2"), b"new temporary").unwrap();
    let rep = w
        .importer
        .scan_paths(&mut w.r, &mut w.state, &named)
        .unwrap();
    assert!(rep.is_some_and(|r| r.versions.is_empty()));
    assert_eq!(w.paths(), want);
}

#[test]
fn a_renamed_state_directory_is_not_imported_under_its_new_name() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("share");
    fs::create_dir(&root).unwrap();
    fs::write(root.join("f"), b"f").unwrap();
    let mut w = writer(&root);
    fs::rename(root.join(".feedsync"), root.join("renamed")).unwrap();
    w.importer.scan(&mut w.r, &mut w.state).unwrap();
    assert_eq!(w.paths(), BTreeSet::from(["f".to_string()]));
}

/// The one line a refused state directory is reported with.
fn refused(e: DriveError, why: &str) {
    let text = e.to_string();
    assert!(matches!(e, DriveError::UnsafeState { .. }), "{text}");
    assert!(text.contains(why) && !text.contains('\n'), "{text}");
}

#[test]
fn a_state_directory_that_is_a_symlink_is_refused_and_nothing_goes_through_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("share");
    let theirs = tmp.path().join("theirs");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&theirs).unwrap();
    fs::set_permissions(&theirs, fs::Permissions::from_mode(0o755)).unwrap();
    symlink(&theirs, root.join(".feedsync")).unwrap();
    refused(Drive::share(&root).err().unwrap(), "symlink");
    refused(Drive::open(&root).err().unwrap(), "symlink");
    refused(Drive::clone_into(&root, [7; 32]).err().unwrap(), "symlink");
    assert_eq!(fs::read_dir(&theirs).unwrap().count(), 0, "written through");
    let mode = fs::metadata(&theirs).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755, "chmod went through the link");
}

#[test]
fn a_state_directory_others_can_write_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("share");
    fs::create_dir(&root).unwrap();
    drop(Drive::share(&root).unwrap());
    let state = root.join(".feedsync");
    for mode in [0o777, 0o720, 0o702] {
        fs::set_permissions(&state, fs::Permissions::from_mode(mode)).unwrap();
        refused(Drive::open(&root).err().unwrap(), "others can write");
        refused(Drive::share(&root).err().unwrap(), "others can write");
    }
    fs::set_permissions(&state, fs::Permissions::from_mode(0o700)).unwrap();
    Drive::open(&root).unwrap();
}

#[test]
fn a_state_directory_owned_by_another_user_is_refused() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: changing a directory's owner needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("share");
    fs::create_dir(&root).unwrap();
    drop(Drive::share(&root).unwrap());
    let state = root.join(".feedsync");
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    refused(Drive::open(&root).err().unwrap(), "uid 65534");
    refused(Drive::share(&root).err().unwrap(), "uid 65534");
    // A fresh one planted by that user before the first share, too.
    let root2 = tmp.path().join("share2");
    fs::create_dir_all(root2.join(".feedsync")).unwrap();
    fs::set_permissions(root2.join(".feedsync"), fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(root2.join(".feedsync"), Some(65534), Some(65534)).unwrap();
    refused(Drive::share(&root2).err().unwrap(), "uid 65534");
}

#[test]
fn a_state_directory_replaced_while_the_drive_runs_redirects_no_write() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("share");
    let theirs = tmp.path().join("theirs");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&theirs).unwrap();
    fs::write(root.join("f"), b"f").unwrap();
    let (tx, events) = crossbeam_channel::unbounded();
    let (feeds, app) = Drive::share(&root)
        .unwrap()
        .into_app(AppOptions {
            events: Some(tx),
            rescan_interval: Duration::from_millis(50),
            ..AppOptions::default()
        })
        .unwrap();
    let node = feedsync::sync::spawn_with(
        feedsync::sync::NodeConfig::new(),
        feeds,
        Some(Box::new(app)),
    )
    .unwrap();
    let old = root.join(".feedsync");
    let moved = root.join("moved-state");
    let says = |p: &Path, files: u64| {
        fs::read_to_string(p.join("status.json"))
            .is_ok_and(|t| t.contains(&format!("\"files_total\": {files},")))
    };
    common::wait_until(Duration::from_secs(20), "the first status", || {
        says(&old, 1)
    });
    // Another user moves ours away and puts theirs (a link to a directory they own) there.
    fs::rename(&old, &moved).unwrap();
    symlink(&theirs, &old).unwrap();
    fs::write(root.join("g"), b"g").unwrap();
    // The writer's next status (two files) lands in the directory it opened, under its new name.
    common::wait_until(Duration::from_secs(20), "the status after g", || {
        says(&moved, 2)
    });
    node.shutdown().unwrap();
    assert_eq!(
        fs::read_dir(&theirs).unwrap().count(),
        0,
        "a write went through the planted state directory"
    );
    // The planted link is refused on the next open.
    refused(Drive::open(&root).err().unwrap(), "symlink");
    // And the moved state directory was never imported under its new name (its secret key!).
    fs::remove_file(&old).unwrap();
    fs::rename(&moved, &old).unwrap();
    let mut drive = Drive::open(&root).unwrap();
    let state = Drive::replay(&mut drive.meta, u64::MAX).unwrap();
    let paths: BTreeSet<&String> = state.entries.keys().collect();
    assert_eq!(paths, BTreeSet::from([&"f".to_string(), &"g".to_string()]));
    drop(events);
}

#[test]
fn a_drive_open_elsewhere_is_refused_while_its_stores_are_in_use() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("share");
    fs::create_dir(&root).unwrap();
    let first = Drive::share(&root).unwrap();
    // The stores are opened through the state directory's handle; their locks still exclude
    // a second user of the same folder.
    let e = Drive::open(&root).err().unwrap().to_string();
    assert!(e.contains("in use by another process"), "{e}");
    drop(first);
    Drive::open(&root).unwrap();
}
