//! Hostile devices in a two-way folder (#13): every device here is allowed (or tries to be) and
//! writes validly encoded but hostile blocks — clocks citing history that never comes or their
//! own device, paths at the length and depth limits (whose conflict copies would be longer
//! still), files over directories over links at one path, denials of the founder, allow storms
//! past the device cap, churn. A node must never panic on them, its merge must stay within the
//! caps, the tree it would materialise must be one the reader accepts (every path passes the
//! record path rules, no entry under a file or link), and two nodes that receive the same
//! blocks in different orders must compute the same tree.
//!
//! `FEEDSYNC_SEED=N cargo test --test two_way_hostile` replays one seed.

mod common;

use common::{Rng, seeds};
use feedsync::drive::merge::{Clock, DeviceId, Merge, MergeError, Offer, Tree};
use feedsync::drive::record::{
    self, BLOCK_SIZE, DirInfo, Entry, Extent, FileInfo, Limits, LinkInfo, MAX_PATH_LEN, Record,
};

const DEVICES: usize = 4;
const BLOCKS: usize = 24;

fn device(k: usize) -> DeviceId {
    // Any 32 bytes: the merge never treats an id as a key.
    [k as u8 + 1; 32]
}

/// A path from a small alphabet (so devices collide), sometimes at the length or depth limit.
fn path(rng: &mut Rng) -> String {
    match rng.below(10) {
        0 => "L".repeat(MAX_PATH_LEN - rng.below(3) as usize),
        1 => format!("{}.txt", "n".repeat(250)),
        2 => vec!["d"; 63].join("/"),
        _ => {
            let depth = 1 + rng.below(3);
            (0..depth)
                .map(|_| ["a", "b", "c.txt", "d.tar.gz", ".e"][rng.below(5) as usize])
                .collect::<Vec<_>>()
                .join("/")
        }
    }
}

fn entry(rng: &mut Rng) -> Entry {
    let mtime_secs = match rng.below(4) {
        0 => -(1 << 40),
        1 => 1 << 40,
        _ => rng.below(1000) as i64,
    };
    match rng.below(5) {
        0 => Entry::Dir,
        1 => Entry::Directory(DirInfo {
            mode: (rng.below(0o1000)) as u32,
            mtime_secs,
            mtime_nanos: 0,
        }),
        2 => Entry::Link(LinkInfo {
            target: ["../../outside", "/etc/passwd", "a"][rng.below(3) as usize].into(),
            mtime_secs,
            mtime_nanos: 0,
        }),
        _ => {
            let size = rng.below(3) * BLOCK_SIZE as u64;
            Entry::File(FileInfo {
                size,
                mode: 0o644,
                mtime_secs,
                mtime_nanos: 0,
                hash: [rng.below(3) as u8; 32],
                extents: if size == 0 {
                    vec![]
                } else {
                    vec![Extent {
                        start: rng.below(1 << 40),
                        count: size / BLOCK_SIZE as u64,
                    }]
                },
            })
        }
    }
}

/// One device's hostile feed: block 0 is its `Init`, the rest random.
fn feed(rng: &mut Rng, me: usize) -> Vec<Vec<u8>> {
    let mut out = vec![record::encode(&[Record::Init {
        content_key: [0x40 + me as u8; 32],
        block_size: BLOCK_SIZE as u32,
    }])];
    for i in 1..BLOCKS {
        let mut recs = Vec::new();
        // Clocks: mostly plausible (what an honest device could have seen), sometimes citing
        // a future that never comes, the device itself, or a device that does not exist.
        let mut clock: Vec<(DeviceId, u64)> = Vec::new();
        for k in (0..DEVICES).filter(|&k| k != me) {
            if rng.below(2) == 0 {
                continue;
            }
            let n = match rng.below(12) {
                0 => 1 << 40,
                1 => BLOCKS as u64 + 1,
                _ => rng.below(i as u64 + 1),
            };
            clock.push((device(k), n));
        }
        if rng.below(40) == 0 {
            clock.push((device(me), 1));
        }
        if rng.below(40) == 0 {
            clock.push(([0xee; 32], 1));
        }
        let clock = Clock::new(clock);
        if !clock.entries().is_empty() {
            recs.push(Record::Clock { clock });
        }
        for _ in 0..1 + rng.below(4) {
            recs.push(match rng.below(12) {
                0 => Record::Allow {
                    device: device(rng.below(DEVICES as u64) as usize),
                },
                1 => Record::Deny {
                    device: device(rng.below(DEVICES as u64) as usize),
                    upto: rng.below(BLOCKS as u64),
                },
                2 => Record::Allow {
                    // Junk devices, to fill the cap.
                    device: [rng.below(256) as u8; 32],
                },
                3 | 4 => Record::Remove { path: path(rng) },
                _ => Record::Put {
                    path: path(rng),
                    entry: entry(rng),
                },
            });
        }
        out.push(record::encode(&recs));
    }
    out
}

/// A node receiving every device's feed in an order of its own: a device's blocks in order,
/// devices interleaved at random, a waiting block offered again later, a refused one ending
/// that device's feed; started over when a late denial asks for it.
fn node(feeds: &[Vec<Vec<u8>>], order: &mut Rng) -> (Merge, Vec<u64>) {
    let limits = Limits {
        max_entries: 200,
        max_depth: 64,
        ..Limits::default()
    };
    let mut merge = Merge::new(device(0), limits);
    let mut stopped = vec![false; feeds.len()];
    for _round in 0..8 {
        let mut moved = true;
        while moved {
            moved = false;
            let mut ks: Vec<usize> = (0..feeds.len()).collect();
            for i in (1..ks.len()).rev() {
                ks.swap(i, order.below(i as u64 + 1) as usize);
            }
            for k in ks {
                if stopped[k] {
                    continue;
                }
                let id = device(k);
                let next = merge.applied(&id) as usize;
                let Some(block) = feeds[k].get(next) else {
                    continue;
                };
                let Ok(recs) = record::decode(next as u64, block) else {
                    stopped[k] = true;
                    continue;
                };
                match merge.offer(id, next as u64, &recs) {
                    Ok(Offer::Applied) => moved = true,
                    Ok(Offer::Waiting { .. }) => {}
                    Err(MergeError::OutOfOrder { .. }) => panic!("offered in order"),
                    Err(_) => stopped[k] = true,
                }
                // Whatever arrived, the tree is computed (the drive does it after each one).
                check_tree(&merge.tree());
            }
        }
        if !merge.needs_rebuild() {
            break;
        }
        merge = merge.rebuild();
        stopped = vec![false; feeds.len()];
    }
    assert!(!merge.needs_rebuild(), "a rebuild settles");
    let applied = (0..feeds.len())
        .map(|k| merge.applied(&device(k)))
        .collect();
    (merge, applied)
}

/// The tree is one the reader takes: every path passes the record rules and every parent of an
/// entry is a directory.
fn check_tree(tree: &Tree) {
    for (p, r) in tree {
        record::check_path(p).unwrap_or_else(|e| panic!("the tree holds {p:?}: {e}"));
        let mut at = 0;
        while let Some(i) = p[at..].find('/') {
            let parent = &p[..at + i];
            let e = tree.get(parent).map(|r| &r.entry);
            assert!(
                e.is_some_and(Entry::is_dir),
                "{p:?} is under {parent:?}, which is {e:?} ({:?})",
                r.source
            );
            at += i + 1;
        }
    }
}

#[test]
fn hostile_devices_cannot_crash_exhaust_or_split_the_merge() {
    for seed in seeds(&(1..=120).collect::<Vec<_>>()) {
        let mut rng = Rng::seeded(seed);
        let feeds: Vec<_> = (0..DEVICES).map(|k| feed(&mut rng, k)).collect();
        let (a, applied_a) = node(&feeds, &mut Rng::seeded(seed ^ 0xa));
        let (b, applied_b) = node(&feeds, &mut Rng::seeded(seed ^ 0xb));
        assert_eq!(applied_a, applied_b, "seed {seed}: the same blocks apply");
        let (ta, tb) = (a.tree(), b.tree());
        assert_eq!(ta, tb, "seed {seed}: two orders, two trees");
        check_tree(&ta);
        assert!(a.members().list().len() <= feedsync::drive::merge::MAX_DEVICES);
        assert!(
            a.members().may_write(&device(0)),
            "seed {seed}: the founder stays"
        );
    }
}
