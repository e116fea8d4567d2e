//! What a folder keeps (issue #13): symlinks as links (never followed, whatever they point
//! to), directory mtimes, permission-only changes (live), and sparseness. Each case runs the
//! real binary: a share and a clone over loopback.

mod common;

use common::{Proc, assert_same_tree, clone_once, share, text, wait_until};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// A fixed time far from now, so a time that merely arrived "recently" cannot pass.
fn long_ago(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(123_456_789)
}

/// Sets the mtime of the directory (or file) `p`, as `touch -d` would.
fn set_mtime(p: &Path, t: SystemTime) {
    fs::File::open(p).unwrap().set_modified(t).unwrap();
}

fn mtime(p: &Path) -> SystemTime {
    fs::symlink_metadata(p).unwrap().modified().unwrap()
}

#[test]
fn symlinks_arrive_as_links_with_their_targets_and_are_never_followed() {
    let t = tempfile::tempdir().unwrap();
    // `../../outside` from a link at the top of `a/src` (or `b/dst`) names `t/outside`.
    let (src, dst) = (t.path().join("a/src"), t.path().join("b/dst"));
    let outside = t.path().join("outside");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::create_dir_all(t.path().join("b")).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(src.join("sub/file.txt"), b"inside").unwrap();
    symlink("sub/file.txt", src.join("inside")).unwrap();
    symlink("/etc/passwd", src.join("passwd")).unwrap();
    symlink("../../outside", src.join("escape")).unwrap();
    symlink("../file.txt", src.join("sub/up")).unwrap();
    symlink("nowhere/at/all", src.join("dangling")).unwrap();
    symlink("sub", src.join("dirlink")).unwrap();
    let link_time = long_ago(1_000_000_000);
    // The link's own time (`touch -h`): through the folder's parent, never the target.
    rustix::fs::utimensat(
        rustix::fs::CWD,
        src.join("inside").as_path(),
        &rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_OMIT,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: 1_000_000_000,
                tv_nsec: 123_456_789,
            },
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
    let passwd_before = fs::metadata("/etc/passwd").unwrap();
    let (share_proc, url, addr) = share(&src);
    let out = clone_once(&url, &dst, &addr, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_same_tree(&src, &dst, &[]);
    for (link, target) in [
        ("inside", "sub/file.txt"),
        ("passwd", "/etc/passwd"),
        ("escape", "../../outside"),
        ("sub/up", "../file.txt"),
        ("dangling", "nowhere/at/all"),
        ("dirlink", "sub"),
    ] {
        let m = fs::symlink_metadata(dst.join(link)).unwrap();
        assert!(m.file_type().is_symlink(), "{link} is not a symlink");
        assert_eq!(fs::read_link(dst.join(link)).unwrap(), Path::new(target));
    }
    assert_eq!(
        mtime(&dst.join("inside")),
        link_time,
        "the link's own mtime"
    );
    // Nothing was written through a link: the outside directory is as it was, and so is
    // /etc/passwd (and `dirlink` is a link, not a copy of `sub`).
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    let passwd_after = fs::metadata("/etc/passwd").unwrap();
    assert_eq!(passwd_before.mtime(), passwd_after.mtime());
    assert_eq!(passwd_before.ino(), passwd_after.ino());
    // No "skipping ..." for a link: they are shared, not warned about.
    let skipped: Vec<String> = share_proc
        .lines()
        .into_iter()
        .chain(share_proc.errors())
        .filter(|l| l.contains("skipping"))
        .collect();
    assert!(skipped.is_empty(), "{skipped:?}");
}

#[test]
fn a_link_changed_or_removed_on_the_writer_follows_and_a_local_one_is_kept() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    symlink("one", src.join("l")).unwrap();
    symlink("gone", src.join("old")).unwrap();
    let (_s, url, addr) = share(&src);
    let d = dst.to_str().unwrap();
    let _c = Proc::feedsync(&["clone", &url, d, "--peer", &addr, "--no-discovery"]);
    wait_until(Duration::from_secs(30), "the links to arrive", || {
        fs::read_link(dst.join("l")).is_ok_and(|p| p == Path::new("one"))
            && fs::read_link(dst.join("old")).is_ok()
    });
    // The user of the clone replaces `old` with a link of their own: never deleted.
    fs::remove_file(dst.join("old")).unwrap();
    symlink("mine", dst.join("old")).unwrap();
    fs::remove_file(src.join("l")).unwrap();
    symlink("two", src.join("l")).unwrap();
    fs::remove_file(src.join("old")).unwrap();
    fs::write(src.join("marker"), b"m").unwrap();
    wait_until(Duration::from_secs(30), "the new target", || {
        fs::read_link(dst.join("l")).is_ok_and(|p| p == Path::new("two"))
            && dst.join("marker").exists()
    });
    assert_eq!(
        fs::read_link(dst.join("old")).unwrap(),
        Path::new("mine"),
        "a link the clone did not make was removed"
    );
    // The clone's own link was replaced, not kept as a conflict copy.
    let names: Vec<String> = fs::read_dir(&dst)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("sync-conflict") || n.contains(".feedsync-"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

/// A link the writer replaced by a file becomes that file on a live clone, and a file
/// replaced by a link and then put back (same bytes, mode and mtime: the same record) comes
/// back as a file. Before: the publish refused the clone's own link in the way ("something
/// that is not a regular file"), and the file's layout slot outlived the link, so the file put
/// back was taken as already in place and the link stayed.
#[test]
fn a_link_replaced_by_a_file_and_back_arrives_as_each() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    let bytes = common::bytes(3, 100_000);
    let when = long_ago(1_000_000_000);
    fs::write(src.join("f"), &bytes).unwrap();
    set_mtime(&src.join("f"), when);
    // The same bytes in `g` keep the writer's blocks: `f` put back reuses them, so its record
    // is the very record it had before.
    fs::write(src.join("g"), &bytes).unwrap();
    symlink("one", src.join("l")).unwrap();
    let (_s, url, addr) = share(&src);
    let d = dst.to_str().unwrap();
    let _c = Proc::feedsync(&["clone", &url, d, "--peer", &addr, "--no-discovery"]);
    let is_file_with = |p: &Path, b: &[u8]| {
        fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file())
            && fs::read(p).is_ok_and(|r| r == b)
    };
    let is_link_to = |p: &Path, to: &str| fs::read_link(p).is_ok_and(|r| r == Path::new(to));
    wait_until(Duration::from_secs(30), "the clone", || {
        is_file_with(&dst.join("f"), &bytes) && is_link_to(&dst.join("l"), "one")
    });
    // Each replaced in one rename (from outside the folder): one version, no removal first.
    let staging = t.path().join("staging");
    fs::create_dir(&staging).unwrap();
    fs::write(staging.join("l"), b"was a link").unwrap();
    fs::rename(staging.join("l"), src.join("l")).unwrap();
    symlink("elsewhere", staging.join("f")).unwrap();
    fs::rename(staging.join("f"), src.join("f")).unwrap();
    wait_until(Duration::from_secs(20), "l a file, f a link", || {
        is_file_with(&dst.join("l"), b"was a link") && is_link_to(&dst.join("f"), "elsewhere")
    });
    fs::write(staging.join("f2"), &bytes).unwrap();
    set_mtime(&staging.join("f2"), when);
    fs::rename(staging.join("f2"), src.join("f")).unwrap();
    wait_until(Duration::from_secs(20), "f a file again", || {
        is_file_with(&dst.join("f"), &bytes)
    });
    assert_same_tree(&src, &dst, &[]);
    let names: Vec<String> = fs::read_dir(&dst)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("sync-conflict") || n.contains(".feedsync-"))
        .collect();
    assert!(
        names.is_empty(),
        "the clone's own entries were moved aside: {names:?}"
    );
}

#[test]
fn directory_mtimes_arrive_after_their_contents() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir_all(src.join("d/e")).unwrap();
    fs::create_dir_all(src.join("empty")).unwrap();
    fs::write(src.join("d/e/f"), b"f").unwrap();
    fs::write(src.join("d/g"), b"g").unwrap();
    symlink("g", src.join("d/link")).unwrap();
    let times = [
        ("d", long_ago(1_100_000_000)),
        ("d/e", long_ago(1_200_000_000)),
        ("empty", long_ago(1_300_000_000)),
    ];
    for (dir, time) in times {
        set_mtime(&src.join(dir), time);
    }
    let (_s, url, addr) = share(&src);
    let out = clone_once(&url, &dst, &addr, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_same_tree(&src, &dst, &[]);
    for (dir, time) in times {
        assert_eq!(mtime(&dst.join(dir)), time, "{dir}'s mtime");
    }
}

#[test]
fn a_chmod_reaches_a_live_clone_without_fetching_the_file_again() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir_all(src.join("d")).unwrap();
    let f = src.join("f");
    fs::write(&f, common::bytes(1, 300_000)).unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(src.join("d"), fs::Permissions::from_mode(0o755)).unwrap();
    let (_s, url, addr) = share(&src);
    let d = dst.to_str().unwrap();
    // umask 000: the writer's bits arrive as they are.
    let _c = Proc::feedsync(&[
        "clone",
        &url,
        d,
        "--peer",
        &addr,
        "--no-discovery",
        "--umask",
        "000",
    ]);
    let mode = |p: &Path| {
        fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o7777)
            .ok()
    };
    wait_until(Duration::from_secs(30), "the clone", || {
        mode(&dst.join("f")) == Some(0o644)
    });
    let ino = fs::metadata(dst.join("f")).unwrap().ino();
    let mtime_before = mtime(&dst.join("f"));
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(src.join("d"), fs::Permissions::from_mode(0o750)).unwrap();
    // Live: well before the 30 s rescan.
    let started = std::time::Instant::now();
    wait_until(Duration::from_secs(10), "the new mode on the clone", || {
        mode(&dst.join("f")) == Some(0o600) && mode(&dst.join("d")) == Some(0o750)
    });
    let took = started.elapsed();
    assert_eq!(
        fs::metadata(dst.join("f")).unwrap().ino(),
        ino,
        "the file was fetched and published again for a chmod"
    );
    assert_eq!(mtime(&dst.join("f")), mtime_before);
    eprintln!("chmod arrived in {took:?}");
    // A file made in the directory afterwards arrives (the directory's new mtime is recorded
    // with it, and must not take the directory's files out of what the writer serves), and
    // the directory's mtime follows.
    fs::write(src.join("d/late"), common::bytes(2, 100_000)).unwrap();
    fs::write(src.join("d/later"), b"later").unwrap();
    wait_until(Duration::from_secs(10), "files made later in d", || {
        fs::read(dst.join("d/late")).is_ok_and(|b| b == common::bytes(2, 100_000))
            && fs::read(dst.join("d/later")).is_ok_and(|b| b == b"later")
            && mtime(&dst.join("d")) == mtime(&src.join("d"))
    });
    assert_same_tree(&src, &dst, &[]);
}

#[test]
fn a_sparse_file_arrives_sparse() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir(&src).unwrap();
    const BLOCK: usize = 64 * 1024;
    let data = common::bytes(7, BLOCK);
    // `a_first` puts the data block before the block of zeros in the content feed, so the
    // clone receives the data of `b_big` (its last block) before the zeros that precede it.
    let mut first = data.clone();
    first.extend(vec![0u8; BLOCK]);
    fs::write(src.join("a_first"), &first).unwrap();
    let big = src.join("b_big");
    let len = 64u64 << 20;
    {
        use std::os::unix::fs::FileExt;
        let f = fs::File::create(&big).unwrap();
        f.set_len(len).unwrap();
        f.write_all_at(&data, len - BLOCK as u64).unwrap();
        f.sync_all().unwrap();
    }
    let writer_blocks = fs::metadata(&big).unwrap().blocks();
    assert!(writer_blocks < 1024, "the writer's file is not sparse here");
    let (_s, url, addr) = share(&src);
    let out = clone_once(&url, &dst, &addr, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_same_tree(&src, &dst, &[]);
    let clone_blocks = fs::metadata(dst.join("b_big")).unwrap().blocks();
    eprintln!("st_blocks: writer {writer_blocks}, clone {clone_blocks}");
    // Within 512 KiB of the writer's allocation (a 64 MiB file written out is 131072).
    assert!(
        clone_blocks <= writer_blocks + 1024,
        "writer {writer_blocks} blocks, clone {clone_blocks}"
    );
}
