use super::*;
use crate::fsio::{Dir, FileIo, Kind, OpenHow};
use std::io::ErrorKind;

fn write(d: &dyn Dir, rel: &str, bytes: &[u8]) -> Box<dyn FileIo> {
    let f = d.open(rel, OpenHow::CREATE).unwrap();
    f.write_all_at(bytes, 0).unwrap();
    f
}

fn file(bytes: &[u8]) -> Option<SimEntry> {
    Some(SimEntry::File(bytes.to_vec()))
}

#[test]
fn nothing_unsynced_survives_a_cut_that_keeps_nothing() {
    let disk = SimDisk::new();
    let root = disk.root();
    let f = write(&*root, "a", b"hello");
    assert_eq!(disk.read("a").unwrap(), b"hello", "visible before the cut");
    drop(f);
    disk.power_cut_dropping_all();
    assert!(disk.tree().is_empty(), "{:?}", disk.tree());
}

#[test]
fn a_synced_file_needs_its_directory_synced_too() {
    let disk = SimDisk::new();
    let root = disk.root();
    write(&*root, "a", b"hello").sync_all().unwrap();
    assert_eq!(disk.durable_tree().get("a"), None, "entry not durable yet");
    root.sync().unwrap();
    assert_eq!(disk.durable_tree().get("a"), file(b"hello").as_ref());
    // The converse: the entry durable, the bytes not: an empty file after the cut.
    write(&*root, "b", b"lost");
    root.sync().unwrap();
    disk.power_cut_dropping_all();
    assert_eq!(disk.read("a").unwrap(), b"hello");
    assert_eq!(disk.read("b").unwrap(), b"");
}

#[test]
fn a_rename_is_durable_only_once_its_target_directory_is_synced() {
    let disk = SimDisk::new();
    let root = disk.root();
    root.create_dir("src", 0o755).unwrap();
    root.create_dir("dst", 0o755).unwrap();
    write(&*root, "src/f", b"x").sync_all().unwrap();
    root.sync_fs().unwrap();
    root.rename("src/f", "dst/f").unwrap();
    root.sync_dir("src").unwrap();
    assert_eq!(disk.durable_tree().get("src/f"), file(b"x").as_ref());
    assert_eq!(disk.durable_tree().get("dst/f"), None);
    root.sync_dir("dst").unwrap();
    assert_eq!(disk.durable_tree().get("src/f"), None);
    assert_eq!(disk.durable_tree().get("dst/f"), file(b"x").as_ref());
}

#[test]
fn handles_from_before_a_cut_fail() {
    let disk = SimDisk::new();
    let root = disk.root();
    let f = write(&*root, "a", b"1");
    root.sync_fs().unwrap();
    disk.power_cut(7);
    assert!(f.write_at(b"2", 0).is_err());
    assert!(f.sync_data().is_err());
    assert!(root.open("a", OpenHow::READ).is_err());
    let root = disk.root();
    assert_eq!(root.read_file("a").unwrap().unwrap(), b"1");
}

#[test]
fn sync_data_leaves_mode_and_mtime_pending() {
    let disk = SimDisk::new();
    let root = disk.root();
    let f = write(&*root, "a", b"data");
    f.set_mode(0o640).unwrap();
    f.sync_data().unwrap();
    root.sync().unwrap();
    drop(f);
    disk.power_cut_dropping_all();
    let root = disk.root();
    let m = root.metadata("a").unwrap().unwrap();
    assert_eq!((m.len, m.mode), (4, 0o600));
    let f = root.open("a", OpenHow::WRITE).unwrap();
    f.set_mode(0o640).unwrap();
    f.sync_all().unwrap();
    disk.power_cut_dropping_all();
    assert_eq!(disk.root().metadata("a").unwrap().unwrap().mode, 0o640);
}

#[test]
fn a_write_can_tear_between_pages() {
    let disk = SimDisk::new();
    let root = disk.root();
    let f = write(&*root, "a", &[1u8; 8192]);
    root.sync().unwrap();
    f.sync_all().unwrap();
    f.write_all_at(&[2u8; 8192], 0).unwrap();
    // Pending: page 0, page 1, mtime. Keep the second page only.
    let mut n = 0;
    disk.power_cut_with(&mut || {
        n += 1;
        n == 2
    });
    let got = disk.read("a").unwrap();
    assert_eq!(&got[..4096], &[1u8; 4096][..]);
    assert_eq!(&got[4096..], &[2u8; 4096][..]);
}

#[test]
fn a_failed_flush_is_reported_and_makes_nothing_durable() {
    let disk = SimDisk::new();
    let root = disk.root();
    let f = write(&*root, "a", b"x");
    disk.fail_next_syncs(2);
    assert!(f.sync_data().unwrap_err().to_string().contains("sim:a"));
    assert!(root.sync_fs().is_err());
    assert!(disk.durable_tree().is_empty());
    root.sync_fs().unwrap();
    assert_eq!(disk.durable_tree().get("a"), file(b"x").as_ref());
}

#[test]
fn a_full_disk_refuses_writes() {
    let disk = SimDisk::new();
    disk.set_capacity(Some(10));
    let root = disk.root();
    let f = write(&*root, "a", b"12345678");
    let e = f.write_all_at(b"abc", 8).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::StorageFull);
    assert!(f.set_len(11).is_err());
    f.set_len(10).unwrap();
    disk.set_capacity(None);
    f.write_all_at(b"abc", 8).unwrap();
}

#[test]
fn namespace_rules_match_the_real_directory() {
    let disk = SimDisk::new();
    let root = disk.root();
    root.create_dir("d", 0o755).unwrap();
    assert_eq!(
        root.create_dir("d", 0o755).unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    write(&*root, "d/x", b"1");
    write(&*root, "y", b"2");
    assert_eq!(
        root.open("y", OpenHow::CREATE_NEW).unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    assert_eq!(
        root.rename_noreplace("y", "d/x").unwrap_err().kind(),
        ErrorKind::AlreadyExists
    );
    assert!(root.remove_dir("d").is_err(), "not empty");
    assert!(root.remove_file("d").is_err(), "a directory");
    assert!(root.rename("d", "d/x/z").is_err());
    assert!(root.open("../y", OpenHow::READ).is_err());
    root.rename("y", "d/x").unwrap();
    assert_eq!(root.read_file("d/x").unwrap().unwrap(), b"2");
    assert_eq!(root.metadata("y").unwrap(), None);
    assert_eq!(root.metadata("nope/y").unwrap(), None);
    let sub = root.open_dir("d").unwrap();
    assert_eq!(
        sub.read_dir("").unwrap(),
        vec![("x".to_string(), Kind::File)]
    );
    root.rename("d", "e").unwrap();
    assert_eq!(sub.read_file("x").unwrap().unwrap(), b"2", "handle follows");
    disk.mkfifo("e/fifo").unwrap();
    let e = root.open("e/fifo", OpenHow::READ).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert_eq!(root.metadata("e/fifo").unwrap().unwrap().kind, Kind::Other);
    // An open file outlives its name.
    let f = root.open("e/x", OpenHow::WRITE).unwrap();
    root.remove_file("e/x").unwrap();
    f.write_all_at(b"3", 0).unwrap();
    assert_eq!(f.metadata().unwrap().nlink, 0);
}

#[test]
fn the_same_seed_cuts_the_same_way() {
    let run = |seed| {
        let disk = SimDisk::new();
        let root = disk.root();
        for i in 0..20 {
            let f = write(&*root, &format!("f{i}"), &[i as u8; 5000]);
            if i % 3 == 0 {
                f.sync_data().unwrap();
            }
        }
        disk.power_cut(seed);
        disk.tree()
    };
    for seed in 0..20 {
        assert_eq!(run(seed), run(seed));
    }
}

#[test]
fn write_atomic_leaves_the_old_or_the_new_bytes_under_any_cut() {
    let (mut partial, mut stopped) = (0, 0);
    for seed in 0..300u64 {
        let disk = SimDisk::new();
        let root = disk.root();
        root.write_atomic("cfg", b"old contents", 0o600).unwrap();
        root.sync_fs().unwrap();
        // The process stops somewhere inside the second write, then the power goes.
        disk.stop_after(seed % 10);
        let new = vec![b'n'; 5000 + seed as usize];
        if root.write_atomic("cfg", &new, 0o600).is_err() {
            stopped += 1;
        }
        let (kept, dropped) = disk.power_cut(seed);
        if kept > 0 && dropped > 0 {
            partial += 1;
        }
        let got = disk.root().read_file("cfg").unwrap().unwrap();
        assert!(
            got == b"old contents" || got == new,
            "seed {seed}: cfg holds {} bytes",
            got.len()
        );
    }
    assert!(stopped > 200, "too few writes were interrupted");
    assert!(
        partial > 30,
        "too few cuts kept part of the pending state: {partial}"
    );
}

#[test]
fn a_rename_without_the_data_flushed_first_can_leave_nothing() {
    // The check that the sim can see the bug write_atomic guards against.
    let mut bad = 0;
    for seed in 0..100u64 {
        let disk = SimDisk::new();
        let root = disk.root();
        root.write_atomic("cfg", b"old", 0o600).unwrap();
        let f = root.open(".cfg.tmp", OpenHow::CREATE_NEW).unwrap();
        f.write_all_at(b"new", 0).unwrap();
        root.rename(".cfg.tmp", "cfg").unwrap();
        root.sync().unwrap();
        disk.power_cut(seed);
        let got = disk.root().read_file("cfg").unwrap().unwrap();
        if got != b"old" && got != b"new" {
            bad += 1;
        }
    }
    assert!(bad > 0, "the sim never exposed an unflushed rename");
}
