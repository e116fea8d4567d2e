//! Power loss, simulated: the feed store on [`SimDisk`], which keeps everything written since
//! the last flush apart and, at a cut, keeps a random subset of it. After every cut the store
//! opens, `verify_all` passes, nothing announced (made durable by a sync) is lost, and nothing
//! of a second history appears. Also the replicator's side of it: nothing is announced before
//! it is durable, a peer proving history we lost stops the writer loudly, and a block found
//! corrupt on a reader is given up and fetched again.
//!
//! Seeds: `POWER_LOSS_SEED` replays a run (it is printed), `POWER_LOSS_CUTS` sets the number of
//! cuts per test (default 500).

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
        .unwrap_or(500);
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

/// The daemon's `folders.json` (`daemon::added::save_in`, which is `Dir::write_atomic`): after
/// any cut, the list last saved or the one being saved, never nothing, a mix, or an error.
#[test]
fn folders_json_holds_the_old_or_the_new_list() {
    use feedsync::daemon::FolderConfig;
    use feedsync::daemon::added::{load_in, save_in};
    let list = |n: u64| -> Vec<FolderConfig> {
        (0..n)
            .map(|k| FolderConfig {
                path: format!("/srv/feedsync/folder-{k}-{}", "x".repeat(k as usize * 97)).into(),
                url: None,
                peers: Vec::new(),
                allow: Vec::new(),
                join: false,
                kind: None,
            })
            .collect()
    };
    let (base, cuts) = plan("folders_json");
    for cut in 0..cuts {
        let seed = base.wrapping_add(cut);
        let mut rng = Rng(seed);
        let disk = SimDisk::new();
        let root = disk.root();
        root.create_dir("state", 0o700).unwrap();
        root.sync().unwrap();
        let state = root.open_dir("state").unwrap();
        let mut current = list(rng.below(5));
        save_in(&*state, &current).unwrap();
        disk.stop_after(rng.below(40));
        let mut attempted = current.clone();
        for _ in 0..rng.below(4) + 1 {
            attempted = list(rng.below(60));
            if save_in(&*state, &attempted).is_err() {
                break;
            }
            current = attempted.clone();
        }
        disk.power_cut(seed);
        let state = disk.root().open_dir("state").unwrap();
        let got = load_in(&*state, std::path::Path::new("state/folders.json"))
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert!(
            got == current || got == attempted,
            "seed {seed}: {} folders, neither the list last saved nor the one being saved",
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

/// End to end through the replicator: whatever length a `Status` announced survives any cut,
/// with the blocks that were appended (the writer never re-signs an announced length).
#[test]
fn no_announced_length_is_lost_in_a_cut() {
    let (base, cuts) = plan("announced");
    let key = SigningKey::from_bytes(&[14u8; 32]);
    let pk = key.verifying_key().to_bytes();
    for cut in 0..cuts / 2 {
        let seed = base.wrapping_add(cut);
        let mut rng = Rng(seed);
        let disk = SimDisk::new();
        disk.root().create_dir("w", 0o700).unwrap();
        disk.root().sync().unwrap();
        let mut r = Replicator::new(Config::default());
        let feed = r.add_feed(Feed::create(store(&disk, "w"), key.clone()).unwrap(), false);
        open_from(&mut r, 7, b"s", &pk, 3);
        drain(&mut r);
        disk.stop_after(rng.below(150));
        let (mut written, mut announced) = (Vec::new(), 0u64);
        for _ in 0..rng.below(20) + 1 {
            let batch: Vec<Vec<u8>> = (0..rng.below(3) + 1)
                .map(|k| block(&mut rng, seed ^ k))
                .collect();
            if r.append(feed, &batch).is_err() {
                break;
            }
            written.extend(batch);
            if rng.below(2) == 0
                && let Some(len) = announced_length(&sent(&drain(&mut r)))
            {
                announced = announced.max(len);
            }
        }
        drop(r);
        disk.power_cut(seed);
        let mut f = Feed::open(store(&disk, "w"))
            .unwrap_or_else(|e| panic!("seed {seed}: the store does not open: {e}"));
        assert!(
            f.len() >= announced,
            "seed {seed}: announced {announced}, reopened at {}",
            f.len()
        );
        f.verify_all()
            .unwrap_or_else(|e| panic!("seed {seed}: verify_all: {e}"));
        for i in 0..f.len() {
            assert_eq!(
                f.get(i).unwrap(),
                written[i as usize],
                "seed {seed}: block {i}"
            );
        }
    }
}

/// The same, over the simulated network: a reader holds 5 blocks; the writer comes back from a
/// disk that lied with 3. The reader's status reaches it, it reports the loss and refuses to
/// sign again, and the reader is never offered a second history (it bans nobody).
#[test]
fn over_the_network_a_writer_that_lost_history_says_so_and_forks_nobody() {
    use feedsync::core::sim::{Sim, SimConfig};
    let key = SigningKey::from_bytes(&[15u8; 32]);
    let mut w = Feed::create(MemoryStorage::new(), key).unwrap();
    w.append_batch(&[b"a", b"b", b"c"]).unwrap();
    let stale = w.storage_mut().clone();
    w.append_batch(&[b"d", b"e"]).unwrap();
    let pk = w.public_key();
    let mut sim = Sim::new(3, 5, SimConfig::default(), |_| Config::default());
    sim.nodes[0].add_feed(w, false);
    sim.nodes[1].add_feed(
        Feed::create_replica(MemoryStorage::new(), pk).unwrap(),
        true,
    );
    sim.connect(1, 0);
    assert!(sim.run_until(2_000_000, |s| s.nodes[1].feed(0).len() == 5
        && s.nodes[1].is_complete(0)));
    // The writer restarts on the stale store (node 2) and meets the reader.
    sim.nodes[2].add_feed(Feed::open(stale).unwrap(), false);
    sim.connect(1, 2);
    let reported = sim.run_until(2_000_000, |s| {
        s.events
            .iter()
            .any(|(_, n, e)| *n == 2 && matches!(e, Event::LostHistory { feed: 0, .. }))
    });
    assert!(reported, "the lost history is reported");
    assert!(sim.nodes[2].append(0, &[b"X".to_vec()]).is_err());
    sim.run_until(200_000, |_| false);
    assert!(
        !sim.events
            .iter()
            .any(|(_, _, e)| matches!(e, Event::Banned { .. })),
        "nobody saw a fork"
    );
    assert_eq!(sim.nodes[1].feed(0).len(), 5);
}

/// A failed flush may lose the pages it could not write while reads still show them (Linux
/// after a write-back error); the retry then succeeds without writing them. The store writes
/// everything since its last good sync again before retrying, so what the retry announces is
/// on disk.
#[test]
fn a_retried_flush_after_a_failed_one_makes_the_announced_blocks_durable() {
    let disk = SimDisk::new();
    disk.root().create_dir("w", 0o700).unwrap();
    disk.root().sync().unwrap();
    let key = SigningKey::from_bytes(&[16u8; 32]);
    let pk = key.verifying_key().to_bytes();
    let mut r = Replicator::new(Config::default());
    let feed = r.add_feed(Feed::create(store(&disk, "w"), key).unwrap(), false);
    open_from(&mut r, 7, b"s", &pk, 3);
    drain(&mut r);
    let blocks: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i + 1; 3000]).collect();
    r.append(feed, &blocks).unwrap();
    disk.fail_next_syncs_losing(1);
    assert_eq!(announced_length(&sent(&drain(&mut r))), None);
    r.handle_tick(1);
    assert_eq!(announced_length(&sent(&drain(&mut r))), Some(5));
    drop(r);
    disk.power_cut_dropping_all();
    let mut f = Feed::open(store(&disk, "w")).unwrap();
    assert!(f.len() >= 5, "announced length lost");
    f.verify_all().unwrap();
    for (i, b) in blocks.iter().enumerate() {
        assert_eq!(&f.get(i as u64).unwrap(), b, "block {i}");
    }
}

/// A drive's metadata names content blocks: with `sync_before(content, meta)` the metadata
/// feed is synced and announced only after the content feed is durable, and held while the
/// content feed's flush fails.
#[test]
fn metadata_waits_for_its_content_to_be_durable() {
    let disk = SimDisk::new();
    for d in ["meta", "content"] {
        disk.root().create_dir(d, 0o700).unwrap();
    }
    disk.root().sync().unwrap();
    let (mk, ck) = (
        SigningKey::from_bytes(&[17u8; 32]),
        SigningKey::from_bytes(&[18u8; 32]),
    );
    let (mpk, cpk) = (mk.verifying_key().to_bytes(), ck.verifying_key().to_bytes());
    let mut r = Replicator::new(Config::default());
    // The drive's order: metadata first (feed 0), then content (feed 1).
    let meta = r.add_feed(Feed::create(store(&disk, "meta"), mk).unwrap(), false);
    let content = r.add_feed(Feed::create(store(&disk, "content"), ck).unwrap(), false);
    r.sync_before(content, meta);
    open_from(&mut r, 7, b"s", &mpk, 10);
    r.handle_message(
        7,
        Message::Open(Open {
            channel: 11,
            discovery_key: crypto::discovery_key(&cpk),
            capability: crypto::capability(&cpk, b"s", true),
        }),
    );
    drain(&mut r);
    r.append(content, &[vec![1u8; 5000]]).unwrap();
    r.append(meta, &[b"Put a -> content block 0".to_vec()])
        .unwrap();
    disk.fail_next_syncs(1);
    let out = sent(&drain(&mut r));
    assert_eq!(
        announced_length(&out),
        None,
        "with the content flush failed, nothing is announced: {out:?}"
    );
    r.handle_tick(1);
    let statuses: Vec<u32> = sent(&drain(&mut r))
        .iter()
        .filter_map(|m| match m {
            Message::Status(s) => Some(s.channel),
            _ => None,
        })
        .collect();
    assert_eq!(
        statuses,
        vec![content as u32, meta as u32],
        "content announced (durable) before the metadata naming it"
    );
}
