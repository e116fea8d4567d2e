//! One storage test suite, run on every backend: the raw `Storage` contract, and a feed on top
//! of it with blocks at the boundary sizes 0, 1, B-1, B and B+1 (B = 64 KiB). The folder-backed
//! store (a drive's content feed, whose blocks live in the folder's files) is addressed by
//! block, not by byte: it runs the contract without the byte-addressed data part, and the
//! feed with *files* of the boundary sizes (their blocks are what such a feed holds).

use ed25519_dalek::SigningKey;
use feedsync::core::{Bitfield, Feed, Header, MemoryStorage, Storage};
use feedsync::protocol::Node;
use feedsync::storage::DiskStorage;
use std::os::unix::fs::PermissionsExt;

const B: usize = 65536;
const SIZES: [usize; 5] = [0, 1, B - 1, B, B + 1];

/// The raw contract; `bytes`: the store also keeps byte-addressed data (`read_data`).
fn contract<S: Storage>(mut s: S, bytes: bool) -> S {
    assert_eq!(s.header().unwrap(), None);
    assert_eq!(s.secret_key().unwrap(), None);
    assert_eq!(s.node(0).unwrap(), None);
    assert_eq!(s.node(u64::MAX).unwrap(), None);

    for (k, len) in [3u64, 9, 12].into_iter().enumerate() {
        let h = Header {
            public_key: [k as u8; 32],
            length: len,
            byte_length: len * 2,
            signature: Some([k as u8; 64]),
        };
        s.write_header(&h).unwrap();
        assert_eq!(s.header().unwrap(), Some(h));
    }
    s.write_secret_key(&[3u8; 32]).unwrap();
    assert_eq!(s.secret_key().unwrap(), Some([3u8; 32]));

    let nodes: Vec<Node> = [5u64, 0, 1, 2, 100]
        .iter()
        .map(|&i| Node {
            index: i,
            hash: [i as u8 + 1; 32],
            size: i * 3,
        })
        .collect();
    s.write_nodes(&nodes).unwrap();
    for n in &nodes {
        assert_eq!(s.node(n.index).unwrap(), Some(*n));
    }
    assert_eq!(
        s.node(3).unwrap(),
        None,
        "a hole between stored nodes is absent"
    );

    let mut offset = 0u64;
    for (k, size) in SIZES.iter().enumerate().filter(|_| bytes) {
        let data: Vec<u8> = (0..*size).map(|i| (i * 31 + k) as u8).collect();
        s.write_data(offset, &data).unwrap();
        let mut back = vec![0u8; *size];
        s.read_data(offset, &mut back).unwrap();
        assert_eq!(back, data, "size {size}");
        offset += *size as u64;
    }
    let mut past = [0u8; 1];
    assert!(
        s.read_data(offset, &mut past).is_err(),
        "reading past the data fails"
    );
    if !bytes {
        assert!(
            s.write_data(0, b"x").is_err(),
            "a block-addressed store refuses byte-addressed writes"
        );
    }

    let mut bf = Bitfield::new();
    bf.set_range(3..20, true);
    bf.set(1000, true);
    s.write_bitfield(&bf, 0..1001).unwrap();
    bf.set(7, false);
    s.write_bitfield(&bf, 7..8).unwrap();
    assert_eq!(s.bitfield().unwrap(), bf);
    s.sync().unwrap();
    s
}

fn feed_boundaries<S: Storage, R: Storage>(writer_store: S, replica_store: R) {
    let key = SigningKey::from_bytes(&[1u8; 32]);
    let mut w = Feed::create(writer_store, key.clone()).unwrap();
    let blocks: Vec<Vec<u8>> = SIZES
        .iter()
        .map(|&n| (0..n).map(|i| (i % 251) as u8).collect())
        .collect();
    for b in &blocks {
        w.append(b).unwrap();
    }
    w.append_batch(&blocks).unwrap();
    let mut r = Feed::create_replica(replica_store, key.verifying_key().to_bytes()).unwrap();
    for i in (0..w.len()).rev() {
        let p = w.proof(i, 1, r.len(), r.len() < w.len()).unwrap();
        r.verify_and_store(i, &[w.get(i).unwrap()], &p).unwrap();
    }
    for (i, b) in blocks.iter().chain(&blocks).enumerate() {
        assert_eq!(&r.get(i as u64).unwrap(), b);
        assert_eq!(r.block_span(i as u64).unwrap().1, b.len() as u64);
    }
    r.verify_all().unwrap();
    w.verify_all().unwrap();
}

#[test]
fn memory_backend() {
    contract(MemoryStorage::new(), true);
    feed_boundaries(MemoryStorage::new(), MemoryStorage::new());
}

#[test]
fn disk_backend() {
    let dir = tempfile::tempdir().unwrap();
    let store = contract(DiskStorage::open(dir.path().join("a")).unwrap(), true);
    drop(store);
    // Everything persists across reopen.
    let mut s = DiskStorage::open(dir.path().join("a")).unwrap();
    assert_eq!(s.header().unwrap().unwrap().length, 12);
    assert_eq!(s.secret_key().unwrap(), Some([3u8; 32]));
    assert_eq!(s.node(100).unwrap().unwrap().size, 300);
    let mode = std::fs::metadata(dir.path().join("a/secret_key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "secret key readable only by its owner");
    drop(s);
    feed_boundaries(
        DiskStorage::open(dir.path().join("w")).unwrap(),
        DiskStorage::open(dir.path().join("r")).unwrap(),
    );
    // Mixed: a disk writer replicated into memory, and back.
    feed_boundaries(
        MemoryStorage::new(),
        DiskStorage::open(dir.path().join("r2")).unwrap(),
    );
}

#[test]
fn disk_store_is_exclusive() {
    let dir = tempfile::tempdir().unwrap();
    let _first = DiskStorage::open(dir.path()).unwrap();
    let err = DiskStorage::open(dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
}

#[test]
fn torn_header_slot_falls_back_to_the_previous_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = DiskStorage::open(dir.path()).unwrap();
    let h = |length| Header {
        public_key: [1; 32],
        length,
        byte_length: 0,
        signature: None,
    };
    s.write_header(&h(1)).unwrap(); // seq 1 -> slot 1
    s.write_header(&h(2)).unwrap(); // seq 2 -> slot 0
    drop(s);
    // Tear the newest slot (slot 0) as a crash in mid-write would.
    let path = dir.path().join("header");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let mut s = DiskStorage::open(dir.path()).unwrap();
    assert_eq!(s.header().unwrap(), Some(h(1)));
    // The next write goes to the slot after the surviving one, not over it.
    s.write_header(&h(3)).unwrap();
    drop(s);
    let mut s = DiskStorage::open(dir.path()).unwrap();
    assert_eq!(s.header().unwrap(), Some(h(3)));
    // Both slots torn: a clear error, not a silent empty store.
    drop(s);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 1;
    bytes[300] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let err = DiskStorage::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
}

#[test]
fn reopened_disk_feed_resumes_appending() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[2u8; 32]);
    let mut f = Feed::create(DiskStorage::open(dir.path()).unwrap(), key).unwrap();
    f.append(b"one").unwrap();
    drop(f);
    let mut f = Feed::open(DiskStorage::open(dir.path()).unwrap()).unwrap();
    assert!(f.is_writable());
    f.append(b"two").unwrap();
    drop(f);
    let mut f = Feed::open(DiskStorage::open(dir.path()).unwrap()).unwrap();
    assert_eq!(
        (f.get(0).unwrap(), f.get(1).unwrap()),
        (b"one".to_vec(), b"two".to_vec())
    );
    // Bytes changed underneath the store are detected, never served.
    let data = dir.path().join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[4] ^= 1;
    std::fs::write(&data, &bytes).unwrap();
    assert!(matches!(
        f.get(1),
        Err(feedsync::core::FeedError::DataChanged(1))
    ));
}

#[test]
fn bits_past_the_committed_length_are_cleared_on_disk() {
    // As if a commit was killed after its bitfield write and before its header write.
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[4u8; 32]);
    let mut f = Feed::create(DiskStorage::open(dir.path()).unwrap(), key).unwrap();
    f.append_batch(&[b"a", b"b"]).unwrap();
    let mut store = f.into_storage();
    let mut bf = store.bitfield().unwrap();
    bf.set_range(2..40, true);
    store.write_bitfield(&bf, 2..40).unwrap();
    let f = Feed::open(store).unwrap();
    assert_eq!(f.bitfield().count(), 2);
    let mut store = f.into_storage();
    assert_eq!(
        store.bitfield().unwrap().count(),
        2,
        "truncation persisted, not only in memory"
    );
}

/// The folder-backed store: blocks of files of the boundary sizes, verified into pending files
/// in reverse order, read back through the store, published, and read again from the
/// published files after the store is reopened (as a restarted clone does).
#[test]
fn folder_backend() {
    use feedsync::drive::layout::{self, FolderBlocks, Layout};
    use feedsync::drive::record::{Extent, FileInfo};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("folder");
    std::fs::create_dir(&root).unwrap();
    let store_dir = root.join(".feedsync/content");

    let raw = Layout::open(&root, false).unwrap();
    contract(
        DiskStorage::open_with_blocks(dir.path().join("raw"), Box::new(FolderBlocks::new(raw)))
            .unwrap(),
        false,
    );

    // The files, their blocks in one feed, in file order.
    let files: Vec<(String, Vec<u8>)> = SIZES
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            let data = (0..n).map(|i| ((i * 7 + k) % 251) as u8).collect();
            (format!("f{n}"), data)
        })
        .collect();
    let key = SigningKey::from_bytes(&[5u8; 32]);
    let mut w = Feed::create(MemoryStorage::new(), key.clone()).unwrap();
    let mut infos = Vec::new();
    for (path, data) in &files {
        let start = w.len();
        for chunk in data.chunks(B) {
            w.append(chunk).unwrap();
        }
        let count = w.len() - start;
        let info = FileInfo {
            size: data.len() as u64,
            mode: 0o644,
            mtime_secs: 1_700_000_000,
            mtime_nanos: 0,
            hash: *blake3::hash(data).as_bytes(),
            extents: if count == 0 {
                vec![]
            } else {
                vec![Extent { start, count }]
            },
        };
        infos.push((path.clone(), info));
    }
    let blocks: Vec<Vec<u8>> = (0..w.len()).map(|i| w.get(i).unwrap()).collect();
    assert_eq!(
        blocks.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![1, B - 1, B, B, 1],
        "the files' blocks are the boundary sizes a content feed holds"
    );

    let layout = Layout::open(&root, false).unwrap();
    for (path, info) in &infos {
        layout::lock(&layout).add_pending(path.clone(), info.clone());
    }
    let store =
        DiskStorage::open_with_blocks(&store_dir, Box::new(FolderBlocks::new(layout.clone())))
            .unwrap();
    let mut r = Feed::create_replica(store, key.verifying_key().to_bytes()).unwrap();
    for i in (0..w.len()).rev() {
        let p = w.proof(i, 1, r.len(), r.len() < w.len()).unwrap();
        r.verify_and_store(i, &[w.get(i).unwrap()], &p).unwrap();
    }
    for (i, b) in blocks.iter().enumerate() {
        assert_eq!(
            &r.get(i as u64).unwrap(),
            b,
            "block {i} from its pending file"
        );
        assert_eq!(r.block_span(i as u64).unwrap().1, b.len() as u64);
    }
    r.verify_all().unwrap();
    {
        let mut l = layout::lock(&layout);
        let ready = l.take_ready();
        assert_eq!(
            ready.len(),
            files.len(),
            "every file complete, the empty one too"
        );
        for id in ready {
            l.publish(id).unwrap();
        }
    }
    for (path, data) in &files {
        assert_eq!(&std::fs::read(root.join(path)).unwrap(), data, "{path}");
    }
    drop(r);
    drop(layout);

    // Reopened: the blocks are read from the published files.
    let layout = Layout::open(&root, false).unwrap();
    for (path, info) in &infos {
        layout::lock(&layout).add_live(path.clone(), info.clone());
    }
    let store =
        DiskStorage::open_with_blocks(&store_dir, Box::new(FolderBlocks::new(layout.clone())))
            .unwrap();
    let mut r = Feed::open(store).unwrap();
    assert_eq!(r.len(), blocks.len() as u64);
    for (i, b) in blocks.iter().enumerate() {
        assert_eq!(&r.get(i as u64).unwrap(), b, "block {i} after reopen");
    }
    r.verify_all().unwrap();
    // A published file changed underneath is never served as genuine.
    let mut bytes = std::fs::read(root.join(&files[3].0)).unwrap();
    bytes[10] ^= 1;
    std::fs::write(root.join(&files[3].0), &bytes).unwrap();
    assert!(matches!(
        r.get(2),
        Err(feedsync::core::FeedError::DataChanged(2))
    ));
}

/// A read-only open beside the writer: no lock taken, nothing written, one commit seen.
#[test]
fn read_only_open_beside_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[6u8; 32]);
    let mut w = Feed::create(DiskStorage::open(dir.path()).unwrap(), key).unwrap();
    w.append_batch(&[b"one", b"two"]).unwrap();

    let mut ro = Feed::open(DiskStorage::open_read_only(dir.path()).unwrap()).unwrap();
    assert!(!ro.is_writable(), "a read-only view never signs");
    assert_eq!(ro.len(), 2);
    // The writer goes on; the view stays at the commit it opened.
    w.append(b"three").unwrap();
    assert_eq!(ro.get(1).unwrap(), b"two");
    assert_eq!(ro.len(), 2);
    assert!(ro.append(b"x").is_err());
    let mut store = ro.into_storage();
    assert!(store.is_read_only());
    assert_eq!(
        store.header().unwrap().unwrap().length,
        2,
        "the frozen commit"
    );
    assert_eq!(
        store.bitfield().unwrap().count(),
        2,
        "no bit of a later commit"
    );
    assert!(store.write_data(0, b"x").is_err());
    assert!(store.write_bitfield(&Bitfield::new(), 0..8).is_err());
    // A new view sees the new commit.
    let ro = Feed::open(DiskStorage::open_read_only(dir.path()).unwrap()).unwrap();
    assert_eq!(ro.len(), 3);
    // And the writer's store still works (no lock was taken from it).
    w.append(b"four").unwrap();
    assert_eq!(w.len(), 4);
    // A missing store is an error, not a new empty one.
    assert!(DiskStorage::open_read_only(dir.path().join("nope")).is_err());
    assert!(!dir.path().join("nope").exists());
}

#[test]
fn disk_backend_through_a_directory_handle() {
    // The same store on the simulated disk: every byte goes through the `Dir` it was given.
    let disk = feedsync::fsio::SimDisk::new();
    let root = disk.root();
    root.create_dir("a", 0o700).unwrap();
    let s = DiskStorage::open_in(root.open_dir("a").unwrap().into()).unwrap();
    drop(contract(s, true));
    let mut s = DiskStorage::open_in(root.open_dir("a").unwrap().into()).unwrap();
    assert_eq!(s.header().unwrap().unwrap().length, 12);
    assert_eq!(s.secret_key().unwrap(), Some([3u8; 32]));
    assert_eq!(root.metadata("a/secret_key").unwrap().unwrap().mode, 0o600);
    root.create_dir("w", 0o700).unwrap();
    root.create_dir("r", 0o700).unwrap();
    feed_boundaries(
        DiskStorage::open_in(root.open_dir("w").unwrap().into()).unwrap(),
        DiskStorage::open_in(root.open_dir("r").unwrap().into()).unwrap(),
    );
}

#[test]
fn a_commit_whose_tree_was_lost_falls_back_to_the_synced_one() {
    // The header of an unsynced append reached the disk and its tree nodes did not (a power
    // cut keeps any subset of what was not flushed). Before the durable header slot, the feed
    // did not open at all: "root node 7 is missing".
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[5u8; 32]);
    let mut f = Feed::create(DiskStorage::open(dir.path()).unwrap(), key).unwrap();
    f.append_batch(&[b"a", b"b", b"c"]).unwrap();
    f.sync().unwrap();
    f.append_batch(&[b"d", b"e", b"f", b"g", b"h"]).unwrap();
    drop(f);
    // Nodes 6 and up were written by the second append only (its leaves, parents, root 7).
    let path = dir.path().join("tree");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[6 * 40..].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let mut f = Feed::open(DiskStorage::open(dir.path()).unwrap()).unwrap();
    assert_eq!(f.len(), 3, "the synced commit");
    assert_eq!(f.bitfield().count(), 3);
    f.verify_all().unwrap();
    f.append(b"x").unwrap();
    drop(f);
    let mut f = Feed::open(DiskStorage::open(dir.path()).unwrap()).unwrap();
    assert_eq!(f.len(), 4);
    assert_eq!(f.get(3).unwrap(), b"x");
    f.verify_all().unwrap();
}

#[test]
fn an_unsynced_commit_whose_blocks_are_all_there_is_kept() {
    // The converse: a commit past the synced one whose leaves and blocks all made it (a killed
    // process, or a lucky cut) is kept, and the parents it lost are rewritten.
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[6u8; 32]);
    let mut f = Feed::create(DiskStorage::open(dir.path()).unwrap(), key).unwrap();
    f.append_batch(&[b"a", b"b", b"c"]).unwrap();
    f.sync().unwrap();
    f.append_batch(&[b"d", b"e", b"f", b"g", b"h"]).unwrap();
    drop(f);
    // Lose parent 11 (blocks 4..8) but keep every leaf and the root.
    let path = dir.path().join("tree");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[11 * 40..12 * 40].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let mut f = Feed::open(DiskStorage::open(dir.path()).unwrap()).unwrap();
    assert_eq!(f.len(), 8);
    f.verify_all().unwrap();
    assert_eq!(f.get(7).unwrap(), b"h");
    let p = f.proof(4, 1, 0, true).unwrap();
    assert!(!p.nodes.is_empty(), "node 11 is back: proofs work");
}

#[test]
fn a_bit_set_since_the_last_sync_without_its_block_is_cleared_on_open() {
    // A power cut kept the bitfield write of an unsynced block but not the block. Before the
    // synced copy of the bitfield, the reader claimed the block, served nothing for it, and
    // `verify_all` failed.
    let dir = tempfile::tempdir().unwrap();
    let mut w = Feed::create(MemoryStorage::new(), SigningKey::from_bytes(&[7u8; 32])).unwrap();
    for i in 0..8u8 {
        w.append(&[i; 500]).unwrap();
    }
    let mut r =
        Feed::create_replica(DiskStorage::open(dir.path()).unwrap(), w.public_key()).unwrap();
    for i in [0u64, 1, 2, 6] {
        let p = w.proof(i, 1, r.len(), r.len() < w.len()).unwrap();
        r.verify_and_store(i, &[w.get(i).unwrap()], &p).unwrap();
    }
    r.sync().unwrap();
    let p = w.proof(4, 1, r.len(), false).unwrap();
    r.verify_and_store(4, &[w.get(4).unwrap()], &p).unwrap();
    drop(r);
    let path = dir.path().join("data");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4 * 500..5 * 500].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let mut r = Feed::open(DiskStorage::open(dir.path()).unwrap()).unwrap();
    assert!(
        !r.has(4),
        "the unsynced block whose bytes were lost is not claimed"
    );
    assert_eq!(r.bitfield().count(), 4);
    r.verify_all().unwrap();
    drop(r);
    let mut r = Feed::open(DiskStorage::open(dir.path()).unwrap()).unwrap();
    assert!(!r.has(4), "and the clearing persisted");
    r.verify_all().unwrap();
}

#[test]
fn both_commit_slots_torn_falls_back_to_the_durable_slot() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[8u8; 32]);
    let mut f = Feed::create(DiskStorage::open(dir.path()).unwrap(), key.clone()).unwrap();
    f.append_batch(&[b"a", b"b"]).unwrap();
    f.sync().unwrap();
    drop(f);
    let path = dir.path().join("header");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 1;
    bytes[256 + 10] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    // Not mistaken for an empty store (which `create` would overwrite) ...
    assert!(matches!(
        Feed::create(DiskStorage::open(dir.path()).unwrap(), key),
        Err(feedsync::core::FeedError::AlreadyExists)
    ));
    // ... and opened from the durable copy.
    let mut f = Feed::open(DiskStorage::open(dir.path()).unwrap()).unwrap();
    assert_eq!(f.len(), 2);
    f.verify_all().unwrap();
}
