use super::*;
use crate::drive::record::{BLOCK_SIZE, Extent, FileInfo};

const A: DeviceId = [0xa0; 32];
const B: DeviceId = [0xb0; 32];
const C: DeviceId = [0xc0; 32];

fn file(tag: u8, mtime: i64) -> Entry {
    Entry::File(FileInfo {
        size: 1,
        mode: 0o644,
        mtime_secs: mtime,
        mtime_nanos: 0,
        hash: [tag; 32],
        extents: vec![Extent { start: 0, count: 1 }],
    })
}

fn put(path: &str, e: Entry) -> Record {
    Record::Put {
        path: path.into(),
        entry: e,
    }
}

fn rm(path: &str) -> Record {
    Record::Remove { path: path.into() }
}

/// A device's log as the test writes it: each block gets the device's current clock.
struct Dev {
    id: DeviceId,
    blocks: Vec<Vec<Record>>,
}

impl Dev {
    fn new(id: DeviceId) -> Self {
        Self {
            id,
            blocks: vec![vec![Record::Init {
                content_key: [id[0] ^ 1; 32],
                block_size: BLOCK_SIZE as u32,
            }]],
        }
    }

    /// Appends a block with the clock of what `m` applied, and applies it to `m`.
    fn write(&mut self, m: &mut Merge, mut records: Vec<Record>) {
        self.catch_up(m);
        let clock = m.clock_for(&self.id);
        if !clock.entries().is_empty() {
            records.insert(0, Record::Clock { clock });
        }
        self.blocks.push(records);
        self.catch_up(m);
    }

    /// Offers `m` what it has not applied of this device.
    fn catch_up(&self, m: &mut Merge) -> Offer {
        loop {
            let next = m.applied(&self.id) as usize;
            let Some(b) = self.blocks.get(next) else {
                return Offer::Applied;
            };
            match m.offer(self.id, next as u64, b).unwrap() {
                Offer::Applied => {}
                w => return w,
            }
        }
    }
}

fn allowed_merge() -> (Merge, Dev, Dev, Dev) {
    let mut m = Merge::new(A, Limits::default());
    let mut a = Dev::new(A);
    let b = Dev::new(B);
    let c = Dev::new(C);
    a.write(
        &mut m,
        vec![Record::Allow { device: B }, Record::Allow { device: C }],
    );
    b.catch_up(&mut m);
    (m, a, b, c)
}

/// A and B each write one block without having seen the other's; the merge of a node that
/// then received both.
fn concurrent(x: Vec<Record>, y: Vec<Record>) -> (Merge, Dev, Dev) {
    let (mut ma, mut a, mut b, _) = allowed_merge();
    let mut mb = merged(&[&a, &b]);
    a.write(&mut ma, x);
    b.write(&mut mb, y);
    (merged(&[&a, &b]), a, b)
}

/// Applies every device's blocks to a fresh merge (of a node that saw them all).
fn merged(devs: &[&Dev]) -> Merge {
    let mut m = Merge::new(A, Limits::default());
    loop {
        for _ in 0..devs.len() + 1 {
            for d in devs {
                d.catch_up(&mut m);
            }
        }
        if !m.needs_rebuild() {
            return m;
        }
        m = m.rebuild();
    }
}

fn entry_at(t: &Tree, p: &str) -> Option<Entry> {
    t.get(p).map(|r| r.entry.clone())
}

#[test]
fn concurrent_edits_keep_the_loser_as_a_named_copy_everywhere() {
    let (mut ma, mut a, mut b, _) = allowed_merge();
    let mut mb = merged(&[&a, &b]);
    // Concurrent: each writes x without seeing the other.
    a.write(&mut ma, vec![put("dir/x.txt", file(1, 100))]);
    b.write(&mut mb, vec![put("dir/x.txt", file(2, 200))]);
    // Both sides then see everything, in different orders.
    let m1 = merged(&[&a, &b]);
    let m2 = merged(&[&b, &a]);
    let t = m1.tree();
    assert_eq!(t, m2.tree(), "every device computes the same tree");
    assert_eq!(
        entry_at(&t, "dir/x.txt"),
        Some(file(2, 200)),
        "newer mtime wins"
    );
    let copy = "dir/x.sync-conflict-19700101-000140-a0a0a0a0.txt";
    assert_eq!(entry_at(&t, copy), Some(file(1, 100)), "{t:#?}");
    assert!(matches!(t.get("dir").unwrap().source, Source::Implied));
    let c = m1.conflicts();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].losers[0].1.as_deref(), Some(copy));
}

#[test]
fn ties_on_mtime_go_to_the_larger_device_and_same_content_is_no_conflict() {
    let (_, mut a, mut b, mut c) = allowed_merge();
    let (mut ma, mut mb, mut mc) = (merged(&[&a]), merged(&[&a, &b]), merged(&[&a, &c]));
    a.write(&mut ma, vec![put("x", file(1, 5))]);
    b.write(&mut mb, vec![put("x", file(2, 5))]);
    c.write(&mut mc, vec![put("x", file(2, 5))]);
    let t = merged(&[&a, &b, &c]).tree();
    assert_eq!(entry_at(&t, "x"), Some(file(2, 5)));
    // A's loses and is copied; B's and C's hold the same bytes: one file, no copy.
    let copies: Vec<_> = t.keys().filter(|k| k.contains("sync-conflict")).collect();
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert!(copies[0].ends_with("-a0a0a0a0"));
}

#[test]
fn an_edit_beats_a_concurrent_delete_and_a_later_delete_wins() {
    let (mut ma, mut a, mut b, _) = allowed_merge();
    a.write(&mut ma, vec![put("f", file(1, 10))]);
    let mut mb = merged(&[&a, &b]);
    a.write(&mut ma, vec![rm("f")]);
    b.write(&mut mb, vec![put("f", file(2, 5))]);
    let mut m = merged(&[&a, &b]);
    assert_eq!(
        entry_at(&m.tree(), "f"),
        Some(file(2, 5)),
        "the edit survives"
    );
    // A removal that has seen the edit removes it.
    a.write(&mut m, vec![rm("f")]);
    assert_eq!(entry_at(&m.tree(), "f"), None);
    assert!(m.conflicts().is_empty());
}

#[test]
fn removing_a_directory_keeps_what_a_concurrent_device_put_inside() {
    let (mut ma, mut a, mut b, _) = allowed_merge();
    a.write(
        &mut ma,
        vec![put("d", Entry::Dir), put("d/old", file(1, 1))],
    );
    let mut mb = merged(&[&a, &b]);
    a.write(&mut ma, vec![rm("d")]);
    b.write(&mut mb, vec![put("d/new", file(2, 2))]);
    let t = merged(&[&a, &b]).tree();
    assert_eq!(entry_at(&t, "d/old"), None, "seen by the removal: gone");
    assert_eq!(entry_at(&t, "d/new"), Some(file(2, 2)));
    assert_eq!(entry_at(&t, "d"), Some(Entry::Dir), "its parent stays");
}

#[test]
fn a_file_and_a_concurrent_directory_at_one_path_both_survive() {
    let (mut ma, mut a, mut b, _) = allowed_merge();
    let mut mb = merged(&[&a, &b]);
    a.write(&mut ma, vec![put("p", file(1, 50))]);
    b.write(
        &mut mb,
        vec![put("p", Entry::Dir), put("p/inner", file(2, 1))],
    );
    let t = merged(&[&a, &b]).tree();
    assert_eq!(entry_at(&t, "p"), Some(Entry::Dir));
    assert_eq!(entry_at(&t, "p/inner"), Some(file(2, 1)));
    let copy = "p.sync-conflict-19700101-000050-a0a0a0a0";
    assert_eq!(entry_at(&t, copy), Some(file(1, 50)), "{t:#?}");
}

#[test]
fn a_block_waits_for_the_history_it_cites() {
    let (_, mut a, mut b, _) = allowed_merge();
    let mut mb = merged(&[&a, &b]);
    b.write(&mut mb, vec![put("x", file(1, 1))]);
    let mut ma = merged(&[&a]);
    a.write(&mut ma, vec![]);
    // A node that has A's history but not B's block: C's block citing it waits.
    let mut mc = merged(&[&a]);
    let mut c = Dev::new(C);
    c.write(&mut merged(&[&a, &b]), vec![put("y", file(2, 2))]);
    let w = c.catch_up(&mut mc);
    assert_eq!(
        w,
        Offer::Waiting {
            device: B,
            needs: 2
        }
    );
    assert_eq!(mc.applied(&C), 1, "nothing of a waiting block is kept");
    b.catch_up(&mut mc);
    assert_eq!(c.catch_up(&mut mc), Offer::Applied);
    assert!(mc.tree().contains_key("y"));
    // A clock citing its own device is refused.
    let mut bad = merged(&[&a]);
    let e = bad.offer(
        B,
        0,
        &[Record::Clock {
            clock: Clock::new([(B, 1)]),
        }],
    );
    assert!(matches!(e, Err(MergeError::Record(RecordError::Clock(_)))));
}

#[test]
fn a_device_that_is_not_allowed_does_not_count_and_a_denied_one_stops_counting() {
    let mut m = Merge::new(A, Limits::default());
    let mut a = Dev::new(A);
    let mut b = Dev::new(B);
    a.write(&mut m, vec![]);
    b.write(&mut m, vec![put("early", file(1, 1))]);
    assert!(!m.tree().contains_key("early"), "B is not a member yet");
    // Allowed: its earlier edits count ("published the moment it is allowed").
    a.write(&mut m, vec![Record::Allow { device: B }]);
    assert!(m.tree().contains_key("early"));
    b.write(&mut m, vec![put("second", file(2, 2))]);
    let upto = m.applied(&B);
    a.write(&mut m, vec![Record::Deny { device: B, upto }]);
    b.write(&mut m, vec![put("after", file(3, 3)), rm("early")]);
    let t = m.tree();
    assert!(t.contains_key("early") && t.contains_key("second"));
    assert!(
        !t.contains_key("after"),
        "nothing B writes after its denial counts"
    );
    assert!(!m.members().may_write(&B));
    // A denied device's own denial of the founder counts for nothing.
    let mut m2 = merged(&[&a, &b]);
    b.write(&mut m2, vec![Record::Deny { device: A, upto: 0 }]);
    assert!(m2.members().may_write(&A));
}

#[test]
fn resolving_a_conflict_keeps_the_copy_as_a_real_file() {
    let (mut m, mut a, _b) = concurrent(vec![put("x", file(1, 1))], vec![put("x", file(2, 2))]);
    let before = m.tree();
    assert_eq!(before.len(), 2);
    // A edits x again having seen both: its block carries the copy.
    let mut records = m.preserve("x");
    assert_eq!(records.len(), 1);
    records.push(put("x", file(3, 3)));
    a.write(&mut m, records);
    let after = m.tree();
    assert!(m.conflicts().is_empty());
    assert_eq!(entry_at(&after, "x"), Some(file(3, 3)));
    let copy = before.keys().find(|k| k.contains("conflict")).unwrap();
    assert_eq!(entry_at(&after, copy), entry_at(&before, copy));
    // Deleting the copy (a record that covers it) removes it.
    a.write(&mut m, vec![rm(copy)]);
    assert!(!m.tree().contains_key(copy.as_str()));
}

#[test]
fn out_of_order_blocks_and_caps_are_refused() {
    let mut m = Merge::new(
        A,
        Limits {
            max_entries: 2,
            ..Limits::default()
        },
    );
    let a = Dev::new(A);
    a.catch_up(&mut m);
    assert!(matches!(
        m.offer(A, 5, &[]),
        Err(MergeError::OutOfOrder {
            expected: 1,
            got: 5
        })
    ));
    let e = m.offer(
        A,
        1,
        &[
            put("a", file(1, 1)),
            put("b", file(1, 1)),
            put("c", file(1, 1)),
        ],
    );
    assert!(matches!(
        e,
        Err(MergeError::Record(RecordError::Limit { .. }))
    ));
    assert_eq!(m.applied(&A), 1, "refused whole");
}

#[test]
fn clocks_are_canonical_and_checked() {
    let c = Clock::new([(B, 3), (A, 0), (B, 5), (C, 1)]);
    assert_eq!(c.entries(), &[(B, 5), (C, 1)]);
    assert_eq!(c.get(&A), 0);
    c.check().unwrap();
    assert!(Clock(vec![(C, 1), (B, 1)]).check().is_err());
    assert!(Clock(vec![(B, 0)]).check().is_err());
    assert!(Clock(vec![(B, 1), (B, 2)]).check().is_err());
    let block = crate::drive::record::encode(&[
        Record::Clock { clock: c.clone() },
        Record::Clock { clock: c },
    ]);
    assert!(
        crate::drive::record::decode(1, &block).is_err(),
        "two clocks"
    );
}

#[test]
fn a_denial_that_arrives_after_what_it_cuts_off_is_applied_by_starting_over() {
    let (mut ma, mut a, mut b, _) = allowed_merge();
    let mut mb = merged(&[&a, &b]);
    b.write(&mut mb, vec![put("x", file(1, 1))]);
    b.catch_up(&mut ma);
    // A has seen B's first two blocks; B goes on without seeing the denial.
    a.write(&mut ma, vec![Record::Deny { device: B, upto: 2 }]);
    b.write(&mut mb, vec![put("y", file(2, 2)), rm("x")]);
    // A node that applies B's blocks first, then A's denial.
    let mut late = Merge::new(A, Limits::default());
    for _ in 0..3 {
        b.catch_up(&mut late);
        a.catch_up(&mut late);
    }
    assert_eq!(late.applied(&B), 3);
    assert!(late.needs_rebuild());
    let mut fresh = late.rebuild();
    for _ in 0..3 {
        b.catch_up(&mut fresh);
        a.catch_up(&mut fresh);
    }
    assert!(!fresh.needs_rebuild());
    let t = fresh.tree();
    assert!(t.contains_key("x") && !t.contains_key("y"), "{t:?}");
    assert_eq!(t, merged(&[&a, &b]).tree(), "as if the denial came first");
}

/// Found by `tests/sim_two_way.rs`, seed 1: `preserve` put a copy back from the heads alone,
/// over the edit a user had made to that copy.
#[test]
fn preserving_copies_never_puts_one_back_over_an_edit_of_it() {
    let (mut m, mut a, _b) = concurrent(vec![put("x", file(1, 1))], vec![put("x", file(2, 2))]);
    let copy = m
        .tree()
        .into_keys()
        .find(|k| k.contains("conflict"))
        .unwrap();
    // A edits the copy, then writes x with what `preserve` asks for.
    a.write(&mut m, vec![put(&copy, file(3, 3))]);
    assert_eq!(entry_at(&m.tree(), &copy), Some(file(3, 3)));
    assert!(m.preserve("x").is_empty(), "the copy the tree shows is A's");
    let mut records = m.preserve("x");
    records.push(put("x", file(4, 4)));
    a.write(&mut m, records);
    assert_eq!(
        entry_at(&m.tree(), &copy),
        Some(file(3, 3)),
        "the edit stands"
    );
}

/// A file that lost to a directory inside it (a copy the tree's shape makes, not a head's)
/// is kept by `preserve` too when a device records that directory.
#[test]
fn preserving_keeps_a_file_that_lost_to_what_is_inside_it() {
    let (mut m, mut a, _b) =
        concurrent(vec![put("p", file(1, 1))], vec![put("p/inner", file(2, 2))]);
    let copy = "p.sync-conflict-19700101-000001-a0a0a0a0";
    assert_eq!(entry_at(&m.tree(), copy), Some(file(1, 1)));
    // A's scan finds the directory p on disk and records it.
    let mut records = m.preserve("p");
    assert_eq!(records.len(), 1);
    records.push(put("p", Entry::Dir));
    a.write(&mut m, records);
    assert_eq!(entry_at(&m.tree(), copy), Some(file(1, 1)));
}

/// Found by `tests/sim_two_way.rs`, seed 277: a copy renamed back to its path, that loses
/// there again to a concurrent edit, makes a copy of the same name; the block's own removal of
/// the old copy must not hide it.
#[test]
fn a_copy_renamed_back_that_loses_again_is_copied_again() {
    let (mut ma, mut a, mut b, mut c) = allowed_merge();
    let mut mb = merged(&[&a, &b]);
    a.write(&mut ma, vec![put("x", file(1, 1))]);
    let mut mc = merged(&[&a, &c]);
    b.write(&mut mb, vec![put("x", file(2, 2))]);
    let mut m = merged(&[&a, &b]);
    let copy = m
        .tree()
        .into_keys()
        .find(|k| k.contains("conflict"))
        .unwrap();
    // A renames its copy back to x (the block removes the copy and puts its content at x).
    let mut records = m.preserve(&copy);
    records.extend(m.preserve("x"));
    records.extend([rm(&copy), put("x", file(1, 1))]);
    a.write(&mut m, records);
    assert_eq!(entry_at(&m.tree(), "x"), Some(file(1, 1)));
    assert_eq!(entry_at(&m.tree(), &copy), None);
    // Concurrently C, having seen A's first x only, writes x with a newer mtime.
    c.write(&mut mc, vec![put("x", file(3, 3))]);
    let t = merged(&[&a, &b, &c]).tree();
    assert_eq!(entry_at(&t, "x"), Some(file(3, 3)));
    assert_eq!(entry_at(&t, &copy), Some(file(1, 1)), "{t:#?}");
}

/// Found by `tests/sim_two_way.rs`, seed 7472: the same device lost twice at one path within
/// one second, so both copies have one name; C had edited the first copy there. Both C's edit
/// and the second copy stay (the copy under the next alternative name); before, the one the
/// rule ranked lower was dropped.
#[test]
fn a_copy_whose_name_is_held_takes_the_next_alternative() {
    let (mut ma, mut a, mut b, mut c) = allowed_merge();
    let mut mb = merged(&[&a, &b]);
    a.write(&mut ma, vec![put("x.txt", file(1, 5))]);
    b.write(&mut mb, vec![put("x.txt", file(2, 9))]);
    let mut mc = merged(&[&a, &b, &c]);
    let copy = "x.sync-conflict-19700101-000005-a0a0a0a0.txt";
    assert_eq!(entry_at(&mc.tree(), copy), Some(file(1, 5)));
    c.write(&mut mc, vec![put(copy, file(3, 1))]);
    // A writes x again in the same second, without having seen B's x or C's edit.
    a.write(&mut ma, vec![put("x.txt", file(4, 5))]);
    let m = merged(&[&a, &b, &c]);
    let t = m.tree();
    assert_eq!(entry_at(&t, "x.txt"), Some(file(2, 9)));
    assert_eq!(entry_at(&t, copy), Some(file(3, 1)), "C's edit stays");
    let second = "x.sync-conflict-19700101-000005-a0a0a0a0-1.txt";
    assert_eq!(entry_at(&t, second), Some(file(4, 5)), "{t:#?}");
    assert_eq!(t, merged(&[&c, &b, &a]).tree());
    let losers = &m.conflicts()[0].losers;
    assert_eq!(losers[0].1.as_deref(), Some(second));
}

/// Found by `tests/sim_two_way.rs`, seed 44655: a copy under an alternative name (its own
/// held by C's edit there) is not hidden by A removing that name: A deleted C's file, not
/// the copy, which then takes the freed name.
#[test]
fn removing_the_file_that_held_a_copys_name_keeps_the_copy() {
    let (mut ma, mut a, mut b, mut c) = allowed_merge();
    let mut mb = merged(&[&a, &b]);
    a.write(&mut ma, vec![put("x.txt", file(1, 5))]);
    b.write(&mut mb, vec![put("x.txt", file(2, 9))]);
    let mut mc = merged(&[&a, &b, &c]);
    let copy = "x.sync-conflict-19700101-000005-a0a0a0a0.txt";
    c.write(&mut mc, vec![put(copy, file(3, 1))]);
    a.write(&mut ma, vec![put("x.txt", file(4, 5))]);
    let mut m = merged(&[&a, &b, &c]);
    let second = "x.sync-conflict-19700101-000005-a0a0a0a0-1.txt";
    assert_eq!(entry_at(&m.tree(), second), Some(file(4, 5)));
    // A renames C's file away: its block removes the name the copy is derived from.
    a.write(&mut m, vec![rm(copy), put("kept", file(3, 1))]);
    let t = m.tree();
    assert_eq!(entry_at(&t, copy), Some(file(4, 5)), "{t:#?}");
    assert_eq!(entry_at(&t, "kept"), Some(file(3, 1)));
    // Deleting the copy where it now is hides it.
    a.write(&mut m, vec![rm(copy)]);
    assert!(!m.tree().values().any(|r| r.entry == file(4, 5)));
}

/// Found by `tests/sim_two_way.rs`, seeds 81302 and 54202: A resolves a conflict in the same
/// second its first edit lost (its block preserves that copy as a file and puts new content
/// at x), and the new content loses again; its copy goes to `-1`, the name being A's file.
/// A deleting (or editing, then renaming away) that file does not hide the second copy.
#[test]
fn deleting_a_preserved_copy_keeps_a_later_copy_of_the_same_name() {
    let (mut ma, mut a, mut b, mut c) = allowed_merge();
    let mut mb = merged(&[&a, &b]);
    let mut mc = merged(&[&a, &c]);
    a.write(&mut ma, vec![put("x", file(1, 5))]);
    b.write(&mut mb, vec![put("x", file(2, 9))]);
    let mut m = merged(&[&a, &b]);
    let copy = "x.sync-conflict-19700101-000005-a0a0a0a0";
    let mut records = m.preserve("x");
    records.push(put("x", file(3, 5)));
    a.write(&mut m, records);
    // C, concurrent with all that, writes x with a newer mtime; A sees it.
    c.write(&mut mc, vec![put("x", file(4, 20))]);
    c.catch_up(&mut m);
    let second = "x.sync-conflict-19700101-000005-a0a0a0a0-1";
    assert_eq!(entry_at(&m.tree(), copy), Some(file(1, 5)));
    assert_eq!(entry_at(&m.tree(), second), Some(file(3, 5)));
    // A edits its file there, then deletes it: the copy of file 3 stays.
    a.write(&mut m, vec![put(copy, file(5, 30))]);
    a.write(&mut m, vec![rm(copy)]);
    let t = m.tree();
    assert!(t.values().any(|r| r.entry == file(3, 5)), "{t:#?}");
    assert!(
        !t.values()
            .any(|r| r.entry == file(1, 5) || r.entry == file(5, 30))
    );
}

/// The other side of the rule above: a copy edited in place, then deleted, stays gone.
#[test]
fn a_copy_edited_then_deleted_stays_gone() {
    let (mut ma, mut a, mut b, mut c) = allowed_merge();
    let mut mb = merged(&[&a, &b]);
    a.write(&mut ma, vec![put("x", file(1, 5))]);
    b.write(&mut mb, vec![put("x", file(2, 9))]);
    let mut m = merged(&[&a, &b, &c]);
    let copy = "x.sync-conflict-19700101-000005-a0a0a0a0";
    c.write(&mut m, vec![put(copy, file(3, 1))]);
    c.write(&mut m, vec![put(copy, file(4, 2))]);
    c.write(&mut m, vec![rm(copy)]);
    let t = m.tree();
    assert_eq!(t.len(), 1, "{t:#?}");
    assert_eq!(entry_at(&t, "x"), Some(file(2, 9)));
}

/// Found by reading the model test's notes: a file that lost to a directory inside it came back
/// after the user deleted its copy (nothing hid the copies the tree's shape makes).
#[test]
fn a_deleted_copy_of_a_file_that_lost_to_a_directory_stays_deleted() {
    let (mut m, mut a, b) =
        concurrent(vec![put("p", file(1, 1))], vec![put("p/inner", file(2, 2))]);
    let copy = "p.sync-conflict-19700101-000001-a0a0a0a0";
    assert_eq!(entry_at(&m.tree(), copy), Some(file(1, 1)));
    // A's user deletes the copy.
    a.write(&mut m, vec![rm(copy)]);
    let t = m.tree();
    assert!(!t.contains_key(copy), "the deleted copy came back: {t:?}");
    assert_eq!(entry_at(&t, "p/inner"), Some(file(2, 2)));
    assert_eq!(t, merged(&[&b, &a]).tree(), "and every device agrees");
}
