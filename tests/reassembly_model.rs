//! Model test of the reader's reassembly store (`drive::layout`) against "concatenate the
//! blocks in order": verified blocks arrive in a random order (some twice), files share blocks
//! (copies, repeats inside a file, a block of zeros left as a hole), some files are added late
//! and fill from blocks already here, and the store is dropped and reopened at random points
//! (a kill: everything but the files on disk is forgotten). At every step a final path holds
//! nothing or the whole expected file; at the end every file is exactly its blocks in order
//! and no temporary file is left.

mod common;

use common::bytes;
use feedsync::drive::layout::{self, FolderBlocks, Layout, Shared, Temps};
use feedsync::drive::record::{BLOCK_SIZE, Extent, FileInfo};
use feedsync::storage::BlockData;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// The content feed: block `i` of the pool. Full blocks, one of zeros, and short tails.
struct Pool(Vec<Vec<u8>>);

const FULL: usize = 5;
const ZERO: usize = FULL;
const TAILS: [usize; 3] = [1, BLOCK_SIZE - 1, 1000];

impl Pool {
    fn new(seed: u64) -> Self {
        let mut v: Vec<Vec<u8>> = (0..FULL)
            .map(|i| bytes(seed + i as u64, BLOCK_SIZE))
            .collect();
        v.push(vec![0; BLOCK_SIZE]);
        for (k, len) in TAILS.iter().enumerate() {
            v.push(bytes(seed + 100 + k as u64, *len));
        }
        Self(v)
    }
}

/// A file: its content blocks in order (a tail block, if any, only last).
#[derive(Debug, Clone)]
struct Spec {
    blocks: Vec<u64>,
}

fn info(pool: &Pool, spec: &Spec) -> (FileInfo, Vec<u8>) {
    let mut content = Vec::new();
    let mut extents: Vec<Extent> = Vec::new();
    for &b in &spec.blocks {
        content.extend_from_slice(&pool.0[b as usize]);
        match extents.last_mut() {
            Some(e) if e.start + e.count == b => e.count += 1,
            _ => extents.push(Extent { start: b, count: 1 }),
        }
    }
    let info = FileInfo {
        size: content.len() as u64,
        mode: 0o644,
        mtime_secs: 1_700_000_000,
        mtime_nanos: 0,
        hash: *blake3::hash(&content).as_bytes(),
        extents,
    };
    info.check().expect("the model builds consistent records");
    (info, content)
}

fn spec_strategy() -> impl Strategy<Value = Spec> {
    (
        prop::collection::vec(0..=ZERO as u64, 0..5),
        prop::option::of(0..TAILS.len() as u64),
    )
        .prop_map(|(mut blocks, tail)| {
            if let Some(t) = tail {
                blocks.push((ZERO + 1) as u64 + t);
            }
            Spec { blocks }
        })
}

#[derive(Debug, Clone)]
enum Step {
    /// Deliver the next block of the arrival order.
    Deliver,
    /// Drop the store and reopen it.
    Kill,
    /// Add the next late file.
    AddLate,
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![8 => Just(Step::Deliver), 1 => Just(Step::Kill), 1 => Just(Step::AddLate)]
}

struct World<'a> {
    root: &'a Path,
    pool: &'a Pool,
    files: Vec<(String, FileInfo, Vec<u8>)>,
    /// Files known to the store (early ones, and late ones once added).
    known: usize,
    /// Blocks the feed counts as stored.
    stored: BTreeSet<u64>,
    published: BTreeSet<String>,
    layout: Shared,
    temps: Temps,
}

impl World<'_> {
    fn open(&mut self) {
        self.layout = Layout::open(self.root, false).unwrap();
        layout::lock(&self.layout).set_temps(self.temps.clone());
        for k in 0..self.known {
            self.register(k);
        }
    }

    /// As the reader does on start or when a version arrives: a file in place is live; one
    /// to fetch is pending and takes every stored block it needs from here, checked.
    fn register(&mut self, k: usize) {
        let (path, info, _) = self.files[k].clone();
        let mut l = layout::lock(&self.layout);
        if self.published.contains(&path) {
            l.add_live(path, info);
            return;
        }
        let id = l.add_pending(path, info.clone());
        drop(l);
        let unique: BTreeSet<u64> = info.block_at().collect();
        for b in unique.into_iter().filter(|b| self.stored.contains(b)) {
            let want = &self.pool.0[b as usize];
            let mut buf = vec![0u8; want.len()];
            let mut l = layout::lock(&self.layout);
            if l.read_pending(id, b, &mut buf).is_ok() && &buf == want {
                l.write_pending(id, b, &buf).unwrap();
                continue;
            }
            drop(l);
            // From another file holding it, through the feed's storage.
            let mut fb = FolderBlocks::new(self.layout.clone());
            fb.read(b, &mut buf)
                .unwrap_or_else(|e| panic!("stored block {b} is in no file: {e}"));
            assert_eq!(&buf, want, "block {b} read back wrong");
            fb.write(b, &buf).unwrap();
        }
        self.publish();
    }

    fn deliver(&mut self, b: u64) {
        let mut fb = FolderBlocks::new(self.layout.clone());
        let holders = layout::lock(&self.layout).holders(b);
        if holders.is_empty() {
            return; // no known file wants it (yet): the feed would not store it
        }
        fb.write(b, &self.pool.0[b as usize]).unwrap();
        self.stored.insert(b);
        self.publish();
    }

    fn publish(&mut self) {
        let mut l = layout::lock(&self.layout);
        for id in l.take_ready() {
            let path = l.slot(id).unwrap().path.clone();
            l.publish(id).unwrap();
            self.published.insert(path);
        }
    }

    /// A final path holds nothing or the whole expected file.
    fn check_atomic(&self) {
        for (path, _, content) in &self.files {
            match fs::read(self.root.join(path)) {
                Ok(got) => assert!(got == *content, "{path} is in place but not whole"),
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
            }
        }
    }
}

fn run(
    seed: u64,
    temps: Temps,
    early: Vec<Spec>,
    late: Vec<Spec>,
    order: Vec<u64>,
    steps: Vec<Step>,
) {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::new(seed);
    let mut files = Vec::new();
    for (k, s) in early.iter().chain(&late).enumerate() {
        let (i, c) = info(&pool, s);
        files.push((format!("d{}/f{k}", k % 2), i, c));
    }
    let mut w = World {
        root: dir.path(),
        pool: &pool,
        files,
        known: early.len(),
        stored: BTreeSet::new(),
        published: BTreeSet::new(),
        layout: Layout::open(dir.path(), false).unwrap(),
        temps,
    };
    w.open();
    let mut order = order.into_iter();
    for step in steps {
        match step {
            Step::Deliver => {
                if let Some(b) = order.next() {
                    w.deliver(b);
                }
            }
            Step::Kill => w.open(),
            Step::AddLate => {
                if w.known < w.files.len() {
                    w.known += 1;
                    w.register(w.known - 1);
                }
            }
        }
        w.check_atomic();
    }
    // The rest: every late file, then every block still missing, in pool order.
    while w.known < w.files.len() {
        w.known += 1;
        w.register(w.known - 1);
    }
    for b in order.chain(0..pool.0.len() as u64) {
        if !w.stored.contains(&b) {
            w.deliver(b);
        }
    }
    let expected: BTreeMap<&str, &Vec<u8>> =
        w.files.iter().map(|(p, _, c)| (p.as_str(), c)).collect();
    for (path, content) in &expected {
        let got = fs::read(dir.path().join(path)).unwrap();
        assert!(got == **content, "{path}: not the blocks in order");
    }
    assert_eq!(layout::lock(&w.layout).pending_count(), 0);
    let left = temporaries(dir.path());
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn reassembly_matches_concatenation(
        seed in any::<u64>(),
        early in prop::collection::vec(spec_strategy(), 1..4),
        late in prop::collection::vec(spec_strategy(), 0..3),
        order in prop::collection::vec(0..(ZERO + 1 + TAILS.len()) as u64, 0..24),
        steps in prop::collection::vec(step_strategy(), 0..40),
    ) {
        run(seed, Temps::Beside, early, late, order, steps);
    }
}

/// The boundary sizes on their own, delivered backwards with a kill after each block.
#[test]
fn boundary_sizes_backwards_with_kills() {
    let specs: Vec<Spec> = [
        vec![],                            // 0 bytes
        vec![(ZERO + 1) as u64],           // 1 byte
        vec![(ZERO + 2) as u64],           // block - 1
        vec![0],                           // block
        vec![1, (ZERO + 1) as u64],        // block + 1
        vec![ZERO as u64, 2, ZERO as u64], // holes around data
    ]
    .into_iter()
    .map(|blocks| Spec { blocks })
    .collect();
    let order: Vec<u64> = (0..(ZERO + 1 + TAILS.len()) as u64).rev().collect();
    let steps: Vec<Step> = order
        .iter()
        .flat_map(|_| [Step::Deliver, Step::Kill])
        .collect();
    run(
        7,
        Temps::Beside,
        specs.clone(),
        vec![],
        order.clone(),
        steps.clone(),
    );
    run(
        7,
        Temps::In(".feedsync/tmp".into()),
        specs,
        vec![],
        order,
        steps,
    );
}

/// Temporary files anywhere under `root`: ours beside their destination, or any file in the
/// state area's `tmp`.
fn temporaries(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else if layout::is_temp_name(&name) || d.ends_with(".feedsync/tmp") {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}
