//! Power loss, simulated: the feed store on [`SimDisk`], which keeps everything written since
//! the last flush apart and, at a cut, keeps a random subset of it. After every cut the store
//! opens, `verify_all` passes, nothing announced (made durable by a sync) is lost, and nothing
//! of a second history appears. Also the replicator's side of it: nothing is announced before
//! it is durable, a peer proving history we lost stops the writer loudly, and a block found
//! corrupt on a reader is given up and fetched again.
//!
//! Seeds: `POWER_LOSS_SEED` replays a run (it is printed), `POWER_LOSS_CUTS` sets the number of
//! cuts per test (default 200).

use ed25519_dalek::SigningKey;
use feedsync::core::{Action, Config, Event, Feed, MemoryStorage, Replicator, Storage, crypto};
use feedsync::fsio::{Dir, OpenHow, SimDisk};
use feedsync::protocol::*;
use feedsync::storage::DiskStorage;
use std::sync::Arc;

/// splitmix64, seeded per cut.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The base seed (printed) and the number of cuts.
fn plan(what: &str) -> (u64, u64) {
    let seed = std::env::var("POWER_LOSS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    let cuts = std::env::var("POWER_LOSS_CUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    eprintln!("{what}: seed {seed}, {cuts} cuts (rerun with POWER_LOSS_SEED={seed})");
    (seed, cuts)
}

fn store(disk: &SimDisk, name: &str) -> DiskStorage {
    let dir: Arc<dyn Dir> = disk.root().open_dir(name).unwrap().into();
    DiskStorage::open_in(dir).unwrap()
}

fn block(rng: &mut Rng, tag: u64) -> Vec<u8> {
    // Sizes around the 4 KiB page the simulated disk tears at, some far over it.
    let len = match rng.below(4) {
        0 => rng.below(64),
        1 => 4000 + rng.below(200),
        _ => rng.below(20_000),
    };
    (0..len).map(|i| (i ^ tag ^ 0x5a) as u8).collect()
}

/// A writer appends random batches and syncs at random points; the process stops at a random
/// call and the power goes. Two generations per seed (the reopened writer appends again).
#[test]
fn a_writer_keeps_every_synced_block_and_signs_no_second_history() {
    let (base, cuts) = plan("writer");
    let key = SigningKey::from_bytes(&[9u8; 32]);
    for cut in 0..cuts {
        let seed = base.wrapping_add(cut);
        let mut rng = Rng(seed);
        let disk = SimDisk::new();
        disk.root().create_dir("w", 0o700).unwrap();
        disk.root().sync().unwrap();
        let mut f = Feed::create(store(&disk, "w"), key.clone()).unwrap();
        f.sync().unwrap();
        // Every block ever signed, by index: a later generation may only re-sign indices that
        // were never synced.
        let mut synced: Vec<Vec<u8>> = Vec::new();
        for generation in 0..2 {
            let mut written = synced.clone();
            written.truncate(f.len() as usize);
            for i in synced.len() as u64..f.len() {
                written.push(f.get(i).unwrap());
            }
            disk.stop_after(rng.below(120));
            for _ in 0..rng.below(12) + 1 {
                let batch: Vec<Vec<u8>> = (0..rng.below(4) + 1)
                    .map(|k| block(&mut rng, seed ^ k))
                    .collect();
                if f.append_batch(&batch).is_err() {
                    break;
                }
                written.extend(batch);
                if rng.below(3) == 0 {
                    if f.sync().is_err() {
                        break;
                    }
                    synced = written.clone();
                }
            }
            drop(f);
            disk.power_cut(seed ^ generation);
            f = Feed::open(store(&disk, "w")).unwrap_or_else(|e| {
                panic!("seed {seed} gen {generation}: the store does not open: {e}")
            });
            assert!(
                f.len() >= synced.len() as u64,
                "seed {seed} gen {generation}: synced length {} lost, reopened at {}",
                synced.len(),
                f.len()
            );
            f.verify_all()
                .unwrap_or_else(|e| panic!("seed {seed} gen {generation}: verify_all: {e}"));
            for i in 0..f.len() {
                let got = f.get(i).unwrap_or_else(|e| {
                    panic!(
                        "seed {seed} gen {generation}: block {i} of {}: {e}",
                        f.len()
                    )
                });
                assert_eq!(
                    got, written[i as usize],
                    "seed {seed} gen {generation}: block {i} is not the one written"
                );
            }
        }
    }
}

/// A replica stores verified blocks in random order and syncs at random points.
#[test]
fn a_replica_keeps_every_synced_block() {
    let (base, cuts) = plan("replica");
    let mut w = Feed::create(MemoryStorage::new(), SigningKey::from_bytes(&[10u8; 32])).unwrap();
    let mut rng = Rng(1);
    let blocks: Vec<Vec<u8>> = (0..48).map(|i| block(&mut rng, i)).collect();
    for b in &blocks {
        w.append(b).unwrap();
    }
    for cut in 0..cuts {
        let seed = base.wrapping_add(cut);
        let mut rng = Rng(seed);
        let disk = SimDisk::new();
        disk.root().create_dir("r", 0o700).unwrap();
        disk.root().sync().unwrap();
        let mut r = Feed::create_replica(store(&disk, "r"), w.public_key()).unwrap();
        r.sync().unwrap();
        let (mut synced_len, mut synced_held) = (0u64, Vec::new());
        disk.stop_after(rng.below(400));
        for _ in 0..rng.below(40) + 1 {
            let i = rng.below(w.len());
            let upgrade = rng.below(2) == 0 && r.len() < w.len();
            let length = r.len();
            let Ok(p) = w.proof(i, 1, length, upgrade || i >= length) else {
                continue;
            };
            if r.verify_and_store(i, &[w.get(i).unwrap()], &p).is_err() {
                break;
            }
            if rng.below(4) == 0 {
                if r.sync().is_err() {
                    break;
                }
                synced_len = r.len();
                synced_held = r.bitfield().runs().flatten().collect();
            }
        }
        drop(r);
        disk.power_cut(seed);
        let mut r = Feed::open(store(&disk, "r"))
            .unwrap_or_else(|e| panic!("seed {seed}: the store does not open: {e}"));
        assert!(r.len() >= synced_len, "seed {seed}: synced length lost");
        r.verify_all()
            .unwrap_or_else(|e| panic!("seed {seed}: verify_all: {e}"));
        for &i in &synced_held {
            assert!(r.has(i), "seed {seed}: synced block {i} lost");
        }
        for i in r.bitfield().runs().flatten().collect::<Vec<_>>() {
            assert_eq!(
                r.get(i).unwrap(),
                blocks[i as usize],
                "seed {seed}: block {i}"
            );
        }
    }
}

/// `Dir::write_atomic` (how the daemon saves `folders.json`): after any cut, the old bytes or
/// the new, never nothing or a mix.
#[test]
fn write_atomic_leaves_the_old_or_the_new_file() {
    let (base, cuts) = plan("write_atomic");
    for cut in 0..cuts {
        let seed = base.wrapping_add(cut);
        let mut rng = Rng(seed);
        let disk = SimDisk::new();
        let root = disk.root();
        root.create_dir("state", 0o700).unwrap();
        root.sync().unwrap();
        let mut current = b"{\"folders\":[]}".to_vec();
        root.write_atomic("state/folders.json", &current, 0o600)
            .unwrap();
        disk.stop_after(rng.below(40));
        let mut attempted = current.clone();
        for k in 0..rng.below(4) + 1 {
            attempted = format!(
                "{{\"folders\":[{k}],\"pad\":\"{}\"}}",
                "x".repeat(rng.below(9000) as usize)
            )
            .into_bytes();
            if root
                .write_atomic("state/folders.json", &attempted, 0o600)
                .is_err()
            {
                break;
            }
            current = attempted.clone();
        }
        disk.power_cut(seed);
        let got = disk
            .root()
            .read_file("state/folders.json")
            .unwrap()
            .unwrap_or_else(|| panic!("seed {seed}: the file is gone"));
        assert!(
            got == current || got == attempted,
            "seed {seed}: {} bytes, neither the last saved nor the one being saved",
            got.len()
        );
    }
}

// The replicator: announce after durable.

fn drain<S: Storage>(r: &mut Replicator<S>) -> Vec<Action> {
    std::iter::from_fn(|| r.poll_action()).collect()
}

fn sent(actions: &[Action]) -> Vec<Message> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { message, .. } => Some(message.clone()),
            _ => None,
        })
        .collect()
}

/// `peer` dialled us on session `hh` and opens `channel` for the feed with `pk`.
fn open_from<S: Storage>(r: &mut Replicator<S>, peer: u64, hh: &[u8], pk: &[u8; 32], channel: u32) {
    r.handle_connected(peer, hh, false);
    r.handle_message(
        peer,
        Message::Open(Open {
            channel,
            discovery_key: crypto::discovery_key(pk),
            capability: crypto::capability(pk, hh, true),
        }),
    );
}

fn announced_length(messages: &[Message]) -> Option<u64> {
    messages
        .iter()
        .filter_map(|m| match m {
            Message::Status(s) => Some(s.length),
            _ => None,
        })
        .max()
}

#[test]
fn appends_are_announced_once_durable_and_share_one_flush() {
    let disk = SimDisk::new();
    disk.root().create_dir("w", 0o700).unwrap();
    disk.root().sync().unwrap();
    let key = SigningKey::from_bytes(&[11u8; 32]);
    let pk = key.verifying_key().to_bytes();
    let mut r = Replicator::new(Config::default());
    let feed = r.add_feed(Feed::create(store(&disk, "w"), key).unwrap(), false);
    open_from(&mut r, 7, b"s", &pk, 3);
    drain(&mut r);
    // Many appends, one drain: one status, at the final length (before: one per append).
    for i in 0..50u8 {
        r.append(feed, &[vec![i; 100]]).unwrap();
    }
    let out = sent(&drain(&mut r));
    let statuses = out
        .iter()
        .filter(|m| matches!(m, Message::Status(_)))
        .count();
    assert_eq!(statuses, 1, "{out:?}");
    assert_eq!(announced_length(&out), Some(50));
    // What was announced is on disk: a cut that keeps nothing pending loses none of it.
    drop(r);
    disk.power_cut_dropping_all();
    let f = Feed::open(store(&disk, "w")).unwrap();
    assert_eq!(f.len(), 50, "announced appends lost in a power cut");
    let mut r = Replicator::new(Config::default());
    let feed = r.add_feed(f, false);
    open_from(&mut r, 7, b"s", &pk, 3);
    drain(&mut r);
    // A failed flush announces nothing, reports the failure, and serves nothing new.
    r.append(feed, &[b"late".to_vec()]).unwrap();
    disk.fail_next_syncs(1);
    let actions = drain(&mut r);
    let out = sent(&actions);
    assert_eq!(announced_length(&out), None, "{out:?}");
    assert!(
        !out.iter().any(|m| matches!(m, Message::Have(_))),
        "{out:?}"
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Event(Event::StorageError { .. }))),
        "the failed flush is reported"
    );
    r.handle_message(
        7,
        Message::Request(Request {
            channel: 3,
            id: 1,
            index: 0,
            count: 0,
            length: 50,
            upgrade: true,
        }),
    );
    let answer = r.poll_upload(7).unwrap();
    assert!(
        matches!(answer.as_slice(), [Message::NoData(_)]),
        "an upgrade past the durable length was served: {answer:?}"
    );
    // The next tick retries; now it goes out.
    r.handle_tick(1);
    let out = sent(&drain(&mut r));
    assert_eq!(announced_length(&out), Some(51), "{out:?}");
}

#[test]
fn a_peer_proving_history_we_lost_stops_the_writer_loudly() {
    // The disk acknowledged a flush it did not make: the writer reopens at length 3 while a
    // peer holds length 5 with our signature.
    let key = SigningKey::from_bytes(&[12u8; 32]);
    let mut w = Feed::create(MemoryStorage::new(), key).unwrap();
    w.append_batch(&[b"a", b"b", b"c"]).unwrap();
    let stale = w.storage_mut().clone();
    w.append_batch(&[b"d", b"e"]).unwrap();
    let (length, tree_hash, signature) = w.signed_tree().unwrap();
    let pk = w.public_key();

    let mut r = Replicator::new(Config::default());
    let feed = r.add_feed(Feed::open(stale).unwrap(), false);
    open_from(&mut r, 7, b"s", &pk, 3);
    drain(&mut r);
    r.handle_message(
        7,
        Message::Status(Status {
            channel: 3,
            length,
            tree_hash,
            signature,
        }),
    );
    let actions = drain(&mut r);
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::Event(Event::LostHistory {
                feed: 0,
                ours: 3,
                theirs: 5
            })
        )),
        "{actions:?}"
    );
    let e = r.append(feed, &[b"X".to_vec()]).unwrap_err();
    assert!(e.to_string().contains("lost"), "{e}");
    assert_eq!(
        r.feed(feed).len(),
        3,
        "nothing signed at an announced length"
    );
}

#[test]
fn a_block_found_corrupt_on_a_reader_is_given_up_and_fetched_again() {
    let mut w = Feed::create(MemoryStorage::new(), SigningKey::from_bytes(&[13u8; 32])).unwrap();
    for i in 0..8u8 {
        w.append(&vec![i; 1000]).unwrap();
    }
    let pk = w.public_key();
    let disk = SimDisk::new();
    disk.root().create_dir("r", 0o700).unwrap();
    let mut rf = Feed::create_replica(store(&disk, "r"), pk).unwrap();
    for i in 0..8 {
        let p = w.proof(i, 1, rf.len(), rf.len() < w.len()).unwrap();
        rf.verify_and_store(i, &[w.get(i).unwrap()], &p).unwrap();
    }
    rf.sync().unwrap();
    drop(rf);
    // The disk garbles block 3.
    let data = disk.root().open("r/data", OpenHow::WRITE).unwrap();
    data.write_all_at(b"garbage", 3000).unwrap();
    drop(data);
    let mut r = Replicator::new(Config::default());
    let feed = r.add_feed(Feed::open(store(&disk, "r")).unwrap(), true);
    open_from(&mut r, 7, b"s", &pk, 1);
    drain(&mut r);
    r.handle_message(
        7,
        Message::Request(Request {
            channel: 1,
            id: 1,
            index: 3,
            count: 1,
            length: 8,
            upgrade: false,
        }),
    );
    let answer = r.poll_upload(7).unwrap();
    assert!(
        matches!(answer.as_slice(), [Message::NoData(_)]),
        "{answer:?}"
    );
    assert!(!r.feed(feed).has(3), "the corrupt block is given up");
    let out = sent(&drain(&mut r));
    assert!(
        out.iter().any(|m| matches!(m, Message::Unhave(_))),
        "peers are told: {out:?}"
    );
    // A peer that has it: block 3 is asked for again.
    let (length, tree_hash, signature) = w.signed_tree().unwrap();
    open_from(&mut r, 8, b"t", &pk, 2);
    for m in [
        Message::Status(Status {
            channel: 2,
            length,
            tree_hash,
            signature,
        }),
        Message::Have(Have {
            channel: 2,
            blocks: BlockSet::Range { start: 0, count: 8 },
        }),
    ] {
        r.handle_message(8, m);
    }
    r.handle_tick(1);
    let out = sent(&drain(&mut r));
    assert!(
        out.iter().any(|m| matches!(
            m,
            Message::Request(Request { index, count, .. }) if *index <= 3 && 3 < index + u64::from(*count)
        )),
        "{out:?}"
    );
}
