//! The user's own files (issue #11): a clone never overwrites or deletes bytes it did not
//! write, keeps the writer's permission bits within a umask, recovers from a damaged metadata
//! block, and `status` says what differs on disk. Each case runs the real binary over loopback.

mod common;

use common::{Proc, assert_same_tree, clone_once, run, share, text, wait_until};
use std::fs;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

/// `sync --once DIR` from one named peer.
fn sync_once(dir: &Path, peer: &str) -> Output {
    run(&[
        "sync",
        dir.to_str().unwrap(),
        "--peer",
        peer,
        "--no-discovery",
        "--once",
    ])
}

/// `status DIR --json`.
fn status(dir: &Path) -> serde_json::Value {
    let out = run(&["status", dir.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn version_of(dir: &Path) -> u64 {
    status(dir)["version"].as_u64().unwrap_or(0)
}

/// Waits until the share at `src` has imported a version after `before`.
fn wait_for_import(src: &Path, before: u64) -> u64 {
    let mut now = before;
    wait_until(Duration::from_secs(30), "the share to import", || {
        now = version_of(src);
        now > before
    });
    now
}

#[test]
fn a_metadata_block_damaged_on_disk_is_fetched_again() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::write(src.join("a.txt"), b"first").unwrap();
    let (_s, url, addr) = share(&src);
    let v = version_of(&src);
    fs::write(src.join("b.txt"), b"second").unwrap();
    wait_for_import(&src, v);
    let out = clone_once(&url, &dst, &addr, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Damage the last stored metadata block (its bytes, not the tree): it no longer hashes to
    // its verified leaf.
    let data = dst.join(".feedsync/meta/data");
    let mut bytes = fs::read(&data).unwrap();
    let n = bytes.len();
    assert!(n > 8, "metadata stored");
    for b in &mut bytes[n - 4..] {
        *b ^= 0x5a;
    }
    fs::write(&data, &bytes).unwrap();
    // The clone opens at the last good version, fetches the damaged block again and completes.
    let out = sync_once(&dst, &addr);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_same_tree(&src, &dst, &[]);
    let out = run(&["feed", "verify", data.parent().unwrap().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The local files in `dir` whose name marks them as conflict copies of `name`.
fn conflict_copies(dir: &Path, stem: &str) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{stem}.sync-conflict-")))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn clone_refuses_a_non_empty_folder_unless_asked_to_adopt() {
    let t = tempfile::tempdir().unwrap();
    let (src, home) = (t.path().join("src"), t.path().join("home"));
    fs::create_dir_all(src.join(".ssh")).unwrap();
    fs::write(src.join(".ssh/authorized_keys"), b"ssh-ed25519 WRITER").unwrap();
    fs::write(src.join("same.txt"), b"the same bytes").unwrap();
    fs::write(src.join("differs.txt"), b"the shared version").unwrap();
    let (_s, url, addr) = share(&src);
    // The user's home: a key of their own, an identical file (another mtime), a different one.
    fs::create_dir_all(home.join(".ssh")).unwrap();
    fs::write(home.join(".ssh/authorized_keys"), b"ssh-ed25519 MINE").unwrap();
    fs::write(home.join("same.txt"), b"the same bytes").unwrap();
    fs::write(home.join("differs.txt"), b"my own version!!").unwrap();
    fs::write(home.join("mine.txt"), b"not in the share").unwrap();
    let before = common::tree(&home, &[]).unwrap();
    let same_ino =
        std::os::unix::fs::MetadataExt::ino(&fs::metadata(home.join("same.txt")).unwrap());

    // Refused, in one line naming the folder and the flag; nothing touched.
    let out = clone_once(&url, &home, &addr, &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(home.to_str().unwrap()) && err.contains("--adopt"),
        "{err}"
    );
    assert_eq!(
        common::tree(&home, &[]).unwrap(),
        before,
        "a refused clone changed files"
    );
    assert!(!home.join(".feedsync").exists());

    // Adopted: the identical file is kept as is, the others are kept as conflict copies.
    let out = clone_once(&url, &home, &addr, &["--adopt"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        fs::read(home.join(".ssh/authorized_keys")).unwrap(),
        b"ssh-ed25519 WRITER"
    );
    let keys = conflict_copies(&home.join(".ssh"), "authorized_keys");
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(fs::read(&keys[0]).unwrap(), b"ssh-ed25519 MINE");
    assert_eq!(
        fs::read(home.join("differs.txt")).unwrap(),
        b"the shared version"
    );
    let differs = conflict_copies(&home, "differs");
    assert_eq!(differs.len(), 1, "{differs:?}");
    assert!(
        differs[0].to_str().unwrap().ends_with(".txt"),
        "the extension stays last: {differs:?}"
    );
    assert_eq!(fs::read(&differs[0]).unwrap(), b"my own version!!");
    let same = fs::metadata(home.join("same.txt")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&same),
        same_ino,
        "an identical file was rewritten"
    );
    assert_eq!(
        before[Path::new("same.txt")],
        common::tree(&home, &[]).unwrap()[Path::new("same.txt")]
    );
    assert_eq!(
        fs::read(home.join("mine.txt")).unwrap(),
        b"not in the share"
    );
    // Both conflicts are reported by status.
    let st = status(&home);
    let conflicts = st["conflicts"].as_array().cloned().unwrap_or_default();
    let paths: Vec<&str> = conflicts
        .iter()
        .filter_map(|c| c["path"].as_str())
        .collect();
    assert_eq!(paths.len(), 2, "{st}");
    assert!(
        paths.contains(&".ssh/authorized_keys") && paths.contains(&"differs.txt"),
        "{st}"
    );
    // Complete, the adopted file included (its mtime is the user's, not the record's).
    assert_eq!(st["files_done"], st["files_total"], "{st}");
}

#[test]
fn a_local_edit_is_never_overwritten_nor_deleted_and_status_says_so() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::write(src.join("notes.md"), b"version 1").unwrap();
    fs::write(src.join("gone.txt"), b"soon removed").unwrap();
    fs::write(src.join("plain.txt"), b"untouched here").unwrap();
    let (_s, url, addr) = share(&src);
    let d = dst.to_str().unwrap();
    let _c = Proc::feedsync(&["clone", &url, d, "--peer", &addr, "--no-discovery"]);
    wait_until(Duration::from_secs(60), "the first clone", || {
        common::same_tree(&src, &dst, &[])
    });
    // The user edits two cloned files; the writer then changes one and removes the other,
    // and changes a third the user did not touch.
    fs::write(dst.join("notes.md"), b"my notes, edited here").unwrap();
    fs::write(dst.join("gone.txt"), b"edited here too").unwrap();
    let v = version_of(&src);
    fs::write(src.join("notes.md"), b"version 2 from the writer").unwrap();
    fs::remove_file(src.join("gone.txt")).unwrap();
    fs::write(src.join("plain.txt"), b"changed by the writer").unwrap();
    wait_for_import(&src, v);
    wait_until(Duration::from_secs(60), "the writer's versions", || {
        fs::read(dst.join("notes.md")).is_ok_and(|b| b == b"version 2 from the writer")
            && fs::read(dst.join("plain.txt")).is_ok_and(|b| b == b"changed by the writer")
    });
    // The edit is kept as a conflict copy; the edited file the writer removed stays.
    let copies = conflict_copies(&dst, "notes");
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(fs::read(&copies[0]).unwrap(), b"my notes, edited here");
    assert!(copies[0].to_str().unwrap().ends_with(".md"), "{copies:?}");
    assert_eq!(fs::read(dst.join("gone.txt")).unwrap(), b"edited here too");
    // status (from the running node's report) says what differs on disk.
    wait_until(Duration::from_secs(30), "status to list both", || {
        let st = status(&dst);
        let conflict = st["conflicts"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["path"] == "notes.md"));
        let kept = st["kept"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "gone.txt"));
        conflict && kept
    });
    let out = run(&["status", d]);
    let shown = text(&out.stdout);
    assert!(shown.contains("conflict: notes.md"), "{shown}");
    assert!(shown.contains("kept:     gone.txt"), "{shown}");
}

/// The permission bits of `path`.
fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn permission_bits_cross_within_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    for (name, mode) in [("private", 0o600), ("group.sh", 0o750), ("public", 0o644)] {
        let p = src.join(name);
        fs::write(&p, name.as_bytes()).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }
    let (_s, url, addr) = share(&src);
    // With a umask that takes nothing away, the writer's bits arrive as they are.
    let open = t.path().join("open");
    let out = clone_once(&url, &open, &addr, &["--umask", "000"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        mode_of(&open.join("private")),
        0o600,
        "a private file arrived readable"
    );
    assert_eq!(mode_of(&open.join("group.sh")), 0o750);
    assert_eq!(mode_of(&open.join("public")), 0o644);
    // By default, the process umask (the test's, usually 022) applies: private stays private.
    let plain = t.path().join("plain");
    let out = clone_once(&url, &plain, &addr, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        mode_of(&plain.join("private")),
        0o600,
        "a private file arrived readable"
    );
    assert_eq!(mode_of(&plain.join("group.sh")) & 0o700, 0o700);
    // With --umask 077 nothing is readable by others.
    let tight = t.path().join("tight");
    let out = clone_once(&url, &tight, &addr, &["--umask", "077"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(mode_of(&tight.join("public")), 0o600);
    assert_eq!(mode_of(&tight.join("group.sh")), 0o700);
    // A malformed umask is a usage error naming the value.
    let out = clone_once(&url, &t.path().join("bad"), &addr, &["--umask", "999"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("999"), "{}", text(&out.stderr));
}

#[test]
fn what_the_clone_wrote_is_removed_even_when_its_version_record_lags() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir_all(src.join("doomed")).unwrap();
    fs::write(src.join("doomed/f.txt"), common::bytes(7, 758)).unwrap();
    fs::write(src.join("stays.txt"), b"stays").unwrap();
    let (_s, url, addr) = share(&src);
    let out = clone_once(&url, &dst, &addr, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(dst.join("doomed/f.txt").exists());
    // A clone killed after publishing but before recording the version it reached: its record
    // still names the first version, which had none of these files.
    let state = dst.join(".feedsync");
    fs::write(state.join("applied"), b"1").unwrap();
    let state = feedsync::fsio::RealDir::open_path(&state).unwrap();
    let mut ledger = feedsync::drive::ledger::Ledger::load(&state).unwrap();
    ledger.applied = 1;
    ledger.save(&state).unwrap();
    // The writer changes the file (a version the clone will skip), then removes it and its
    // directory.
    let v = version_of(&src);
    fs::write(src.join("doomed/f.txt"), common::bytes(8, 900)).unwrap();
    let v = wait_for_import(&src, v);
    fs::remove_dir_all(src.join("doomed")).unwrap();
    wait_for_import(&src, v);
    let out = sync_once(&dst, &addr);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !dst.join("doomed").exists(),
        "a file (or the directory) this clone wrote and the writer removed was kept"
    );
    assert_same_tree(&src, &dst, &[]);
    let st = status(&dst);
    assert_eq!(st["version"], st["latest_version"], "{st}");
    assert!(st["kept"].as_array().is_none_or(|k| k.is_empty()), "{st}");
    assert!(
        st["conflicts"].as_array().is_none_or(|c| c.is_empty()),
        "{st}"
    );
}

/// Waits (within `limit`) until both trees are the same; if they never are, fails showing
/// what differs.
fn wait_same_tree(src: &Path, dst: &Path, limit: Duration) {
    let t = std::time::Instant::now();
    while !common::same_tree(src, dst, &[]) && t.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_same_tree(src, dst, &[]);
}

/// The churning side of the soak test: a model of what it created, so each operation picks a
/// target that exists.
struct Churn {
    root: std::path::PathBuf,
    rng: common::Rng,
    dirs: Vec<String>,
    files: Vec<String>,
    next: u64,
}

impl Churn {
    fn pick(&mut self, n: usize) -> usize {
        (self.rng.next() % n as u64) as usize
    }

    /// Content for a file: mostly small, sometimes across a block boundary.
    fn content(&mut self) -> Vec<u8> {
        let len = match self.rng.next() % 10 {
            0 => 65_536 + (self.rng.next() % 8_000) as usize,
            1 => 0,
            _ => (self.rng.next() % 3_000) as usize,
        };
        self.next += 1;
        common::bytes(self.rng.next() ^ self.next, len)
    }

    fn new_path(&mut self) -> String {
        self.next += 1;
        let ext = ["txt", "md", "bin", ""][self.pick(4)];
        let name = if ext.is_empty() {
            format!("f{}", self.next)
        } else {
            format!("f{}.{ext}", self.next)
        };
        match self.pick(self.dirs.len() + 1) {
            0 => name,
            i => format!("{}/{name}", self.dirs[i - 1]),
        }
    }

    /// One random operation.
    fn step(&mut self) {
        let r = self.rng.next() % 100;
        match r {
            0..25 => {
                let p = self.new_path();
                let c = self.content();
                fs::write(self.root.join(&p), c).unwrap();
                self.files.push(p);
            }
            25..45 if !self.files.is_empty() => {
                let i = self.pick(self.files.len());
                let c = self.content();
                fs::write(self.root.join(&self.files[i]), c).unwrap();
            }
            45..60 if !self.files.is_empty() => {
                use std::io::Write;
                let i = self.pick(self.files.len());
                let c = self.content();
                let mut f = fs::OpenOptions::new()
                    .append(true)
                    .open(self.root.join(&self.files[i]))
                    .unwrap();
                f.write_all(&c[..c.len().min(2_000)]).unwrap();
            }
            60..75 if !self.files.is_empty() => {
                let i = self.pick(self.files.len());
                let to = self.new_path();
                fs::rename(self.root.join(&self.files[i]), self.root.join(&to)).unwrap();
                self.files[i] = to;
            }
            75..90 if !self.files.is_empty() => {
                let i = self.pick(self.files.len());
                let p = self.files.swap_remove(i);
                fs::remove_file(self.root.join(p)).unwrap();
            }
            90..96 if self.dirs.len() < 12 => {
                self.next += 1;
                let d = match self.pick(self.dirs.len() + 1) {
                    i if i > 0 && !self.dirs[i - 1].contains('/') => {
                        format!("{}/d{}", self.dirs[i - 1], self.next)
                    }
                    _ => format!("d{}", self.next),
                };
                fs::create_dir(self.root.join(&d)).unwrap();
                self.dirs.push(d);
            }
            96.. if !self.dirs.is_empty() => {
                let i = self.pick(self.dirs.len());
                let d = self.dirs.swap_remove(i);
                let under = format!("{d}/");
                fs::remove_dir_all(self.root.join(&d)).unwrap();
                self.dirs.retain(|x| !x.starts_with(&under));
                self.files.retain(|f| !f.starts_with(&under));
            }
            _ => {
                let p = self.new_path();
                fs::write(self.root.join(&p), b"").unwrap();
                self.files.push(p);
            }
        }
    }
}

/// A live clone while the shared folder takes a few thousand seeded creates, overwrites,
/// appends, renames, deletes and directory removals: at the end both trees are the same, and
/// the clone's status says complete with nothing kept, moved aside or missing. Seed printed;
/// `FEEDSYNC_SEED=N` replays it; `FEEDSYNC_CHURN_OPS` changes the number of operations.
#[test]
fn a_live_clone_under_churn_ends_identical_and_complete() {
    let (rng, _seed) = common::Rng::from_env_or_clock("churn");
    let ops: usize = std::env::var("FEEDSYNC_CHURN_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_500);
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    let mut churn = Churn {
        root: src.clone(),
        rng,
        dirs: Vec::new(),
        files: Vec::new(),
        next: 0,
    };
    for _ in 0..40 {
        churn.step();
    }
    let (_s, url, addr) = share(&src);
    let d = dst.to_str().unwrap();
    let _c = Proc::feedsync(&["clone", &url, d, "--peer", &addr, "--no-discovery"]);
    for i in 0..ops {
        churn.step();
        if i % 12 == 0 {
            // Paced so the writer commits many versions and the clone sees some, skips others.
            let pause = 2 + churn.rng.next() % 20;
            std::thread::sleep(Duration::from_millis(pause));
        }
    }
    wait_same_tree(&src, &dst, Duration::from_secs(90));
    assert_same_tree(&src, &dst, &[]);
    // The clone says it is complete, and that nothing differs on disk.
    wait_until(
        Duration::from_secs(30),
        "the clone's status to say complete",
        || {
            let (w, r) = (status(&src), status(&dst));
            r["version"] == w["version"]
                && r["latest_version"] == w["version"]
                && r["files_done"] == r["files_total"]
        },
    );
    let st = status(&dst);
    for k in ["conflicts", "kept", "unpublished"] {
        assert!(
            st[k].as_array().is_none_or(|a| a.is_empty()),
            "{k} on a clone nobody touched: {st}"
        );
    }
    assert!(st["errors"].as_array().is_none_or(|a| a.is_empty()), "{st}");
    assert_same_tree(&src, &dst, &[]);
}

#[test]
fn a_path_that_cannot_be_published_is_listed_by_status_and_the_rest_arrives() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    fs::write(src.join("x"), b"a file in the share").unwrap();
    fs::write(src.join("y"), b"another").unwrap();
    // The user has a folder (with a file of theirs) where the share has the file x.
    fs::create_dir_all(dst.join("x")).unwrap();
    fs::write(dst.join("x/mine"), b"mine").unwrap();
    let (_s, url, addr) = share(&src);
    let d = dst.to_str().unwrap();
    let _c = Proc::feedsync(&[
        "clone",
        &url,
        d,
        "--peer",
        &addr,
        "--no-discovery",
        "--adopt",
    ]);
    wait_until(
        Duration::from_secs(60),
        "status to list x as missing",
        || {
            dst.join("y").exists()
                && status(&dst)["unpublished"]
                    .as_array()
                    .is_some_and(|u| u.iter().any(|u| u["path"] == "x"))
        },
    );
    assert_eq!(fs::read(dst.join("x/mine")).unwrap(), b"mine");
    assert_eq!(fs::read(dst.join("y")).unwrap(), b"another");
    let shown = text(&run(&["status", d]).stdout);
    assert!(shown.contains("missing:  x ("), "{shown}");
}

/// The churn again, with the clone killed (SIGKILL) at seeded moments and restarted: what it
/// published just before a kill is still known as its own (the ledger's journal), so the end
/// is the same: identical trees, nothing kept or moved aside.
#[test]
fn a_clone_killed_under_churn_ends_identical_without_conflicts() {
    let (rng, _seed) = common::Rng::from_env_or_clock("churn with kills");
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    let mut churn = Churn {
        root: src.clone(),
        rng,
        dirs: Vec::new(),
        files: Vec::new(),
        next: 0,
    };
    for _ in 0..40 {
        churn.step();
    }
    let (_s, url, addr) = share(&src);
    let d = dst.to_str().unwrap();
    let mut c = Proc::feedsync(&["clone", &url, d, "--peer", &addr, "--no-discovery"]);
    // Wait for the clone to hold something before the first kill (a clone killed before it
    // fetched anything starts over, which is not what this tests).
    wait_until(Duration::from_secs(30), "the clone to start", || {
        dst.join(".feedsync/meta/header").exists()
    });
    let mut kills = 0;
    for i in 0..1_500 {
        churn.step();
        if i % 12 == 0 {
            let pause = 2 + churn.rng.next() % 20;
            std::thread::sleep(Duration::from_millis(pause));
        }
        if churn.rng.next().is_multiple_of(250) {
            kills += 1;
            c.kill();
            c = Proc::feedsync(&["sync", d, "--peer", &addr, "--no-discovery"]);
        }
    }
    eprintln!("killed the clone {kills} times");
    wait_same_tree(&src, &dst, Duration::from_secs(90));
    wait_until(
        Duration::from_secs(30),
        "the clone's status to say complete",
        || {
            let (w, r) = (status(&src), status(&dst));
            r["version"] == w["version"] && r["files_done"] == r["files_total"]
        },
    );
    let st = status(&dst);
    for k in ["conflicts", "kept", "unpublished"] {
        assert!(
            st[k].as_array().is_none_or(|a| a.is_empty()),
            "{k} on a clone nobody touched: {st}"
        );
    }
    assert_same_tree(&src, &dst, &[]);
    drop(c);
}

/// Every file beneath `dir` (not following links) with its bytes, links as their target.
fn snapshot(dir: &Path) -> std::collections::BTreeMap<std::path::PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            if m.is_dir() {
                todo.push(p.clone());
                out.insert(rel, b"<dir>".to_vec());
            } else if m.is_file() {
                out.insert(rel, fs::read(&p).unwrap());
            } else {
                out.insert(rel, b"<other>".to_vec());
            }
        }
    }
    out
}

/// Asserts that `dir` still holds exactly `before`, naming what changed.
fn assert_untouched(dir: &Path, before: &std::collections::BTreeMap<std::path::PathBuf, Vec<u8>>) {
    let now = snapshot(dir);
    let changed: Vec<_> = before
        .keys()
        .chain(now.keys())
        .filter(|k| before.get(*k) != now.get(*k))
        .collect();
    assert!(
        changed.is_empty(),
        "outside the folder, changed: {changed:?}"
    );
}

/// Busy-waits about `n` microseconds (a sleep is far coarser than the race window).
fn spin(n: u64) {
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_micros(n) {
        std::hint::spin_loop();
    }
}

/// Another local user swaps a directory of the clone for a symlink to an outside directory,
/// over and over, while the reader moves local files in it aside (conflict copies) and
/// publishes the writer's: nothing outside is ever created, renamed or removed, and once the
/// swapping stops the clone completes, every local file kept as a conflict copy.
#[test]
fn a_parent_swapped_for_a_symlink_never_redirects_a_conflict_copy() {
    let (mut rng, _seed) = common::Rng::from_env_or_clock("own_files swap");
    let t = tempfile::tempdir().unwrap();
    let (src, dst, outside) = (
        t.path().join("src"),
        t.path().join("dst"),
        t.path().join("outside"),
    );
    const N: usize = 400;
    let name = |i: usize| format!("f{i:03}.txt");
    for d in [&src, &dst, &outside] {
        fs::create_dir_all(d.join("sub")).unwrap();
    }
    for i in 0..N {
        fs::write(
            src.join("sub").join(name(i)),
            common::bytes(i as u64, 20_000),
        )
        .unwrap();
        // The user's own files in the clone's way, and files of the same names outside.
        fs::write(dst.join("sub").join(name(i)), format!("local {i}")).unwrap();
        fs::write(outside.join(name(i)), format!("outside {i}")).unwrap();
    }
    let before = snapshot(&outside);
    let (_s, url, addr) = share(&src);
    let mut clone = Proc::feedsync(&[
        "clone",
        &url,
        dst.to_str().unwrap(),
        "--peer",
        &addr,
        "--no-discovery",
        "--once",
        "--adopt",
    ]);
    // Swapping starts once the reader writes temporaries in `sub` (it made or took `sub` as a
    // directory before: a symlink it found there then would only be moved aside itself).
    let t0 = std::time::Instant::now();
    while !fs::read_dir(dst.join("sub"))
        .unwrap()
        .any(|e| e.unwrap().file_name().to_string_lossy().starts_with('.'))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no temporary in sub"
        );
        assert!(clone.exited().is_none(), "{:?}", clone.errors());
        std::thread::sleep(Duration::from_micros(200));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (dst, outside, stop) = (dst.clone(), outside.clone(), stop.clone());
        std::thread::spawn(move || {
            // One atomic exchange each way (`RENAME_EXCHANGE`): `sub` is always there, now
            // the real directory, now a symlink to the outside one.
            let (sub, link) = (dst.join("sub"), dst.join("sub.link"));
            std::os::unix::fs::symlink(&outside, &link).unwrap();
            let exchange = || {
                use rustix::fs::{CWD, RenameFlags, renameat_with};
                renameat_with(CWD, &sub, CWD, &link, RenameFlags::EXCHANGE).unwrap();
            };
            let mut swaps = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                exchange();
                spin(rng.next() % 300);
                exchange();
                spin(rng.next() % 300);
                swaps += 1;
            }
            fs::remove_file(&link).unwrap();
            swaps
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while clone.exited().is_none() && std::time::Instant::now() < deadline {
        assert_untouched(&outside, &before);
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    eprintln!("{swaps} swaps");
    assert!(swaps > 0);
    assert_untouched(&outside, &before);
    // Left alone, the clone completes: the writer's files in place, the user's kept aside.
    let status = clone.wait_exit(Duration::from_secs(90));
    assert!(status.success(), "{:?}", clone.errors());
    assert_untouched(&outside, &before);
    let mut top: Vec<String> = fs::read_dir(&dst)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    eprintln!(
        "clone holds {top:?}; sub holds {:?} entries",
        fs::read_dir(dst.join("sub")).unwrap().count()
    );
    let kept: Vec<Vec<u8>> = fs::read_dir(dst.join("sub"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".sync-conflict-"))
        .map(|p| fs::read(p).unwrap())
        .collect();
    for i in 0..N {
        assert_eq!(
            fs::read(dst.join("sub").join(name(i))).unwrap(),
            common::bytes(i as u64, 20_000)
        );
        assert!(kept.contains(&format!("local {i}").into_bytes()), "{i}");
    }
}

/// A file renamed into a new subdirectory arrives through a temporary file beside it, so the
/// clone makes that subdirectory before it handles the version's directories: it is the clone's
/// all the same, and goes when the writer removes the directory (found by the churn test under
/// load: `d/sub` stayed on the clone, empty, for good).
#[test]
fn a_directory_made_for_a_renamed_file_goes_when_the_writer_removes_it() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/x"), common::bytes(7, 100_000)).unwrap();
    let (_s, url, addr) = share(&src);
    let _c = Proc::feedsync(&[
        "clone",
        &url,
        dst.to_str().unwrap(),
        "--peer",
        &addr,
        "--no-discovery",
    ]);
    wait_same_tree(&src, &dst, Duration::from_secs(30));
    // One version: a new directory and the file renamed into it (its bytes reused locally).
    fs::create_dir(src.join("d/sub")).unwrap();
    fs::rename(src.join("d/x"), src.join("d/sub/y")).unwrap();
    wait_until(Duration::from_secs(30), "the rename on the clone", || {
        dst.join("d/sub/y").is_file() && !dst.join("d/x").exists()
    });
    fs::remove_dir_all(src.join("d")).unwrap();
    wait_until(
        Duration::from_secs(30),
        "the directory gone on the clone",
        || !dst.join("d").exists(),
    );
    let st = status(&dst);
    assert!(st["kept"].as_array().is_none_or(|a| a.is_empty()), "{st}");
}
