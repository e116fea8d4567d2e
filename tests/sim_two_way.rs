//! The model test of two-way folders (#13): N devices (3 to 5) edit one folder through
//! `drive::merge` alone, in a deterministic seeded simulation (no threads, files or clock),
//! and must converge without losing an edit.
//!
//! Each device has its own log (its metadata feed: block 0 is `Init`), the blocks it holds of
//! every other device's log (a prefix of each, as replication gives them), a [`Merge`] and a
//! "disk": the tree it last materialised. Steps, chosen at random: a user op on a device (a
//! file written with new content, at a new path or one other devices write too; a delete, of
//! a directory with its children too; a rename; a mkdir; a conflict copy edited or deleted;
//! an implied directory recorded the way a writer's scan records a directory it finds), a
//! sync (one device pulls what another holds, sometimes only part of it, and offers it
//! through [`Merge::offer`], honouring `Waiting`), a partition change, a restart (the merge
//! dropped and rebuilt from the stored blocks), and in some runs one device denied by another
//! member. A user op is one block: the device's clock, [`Merge::preserve`] of every path the op
//! writes, then the op's records, all decided on what the device's user sees (its disk).
//!
//! After the random phase every partition heals and devices sync until nothing moves, then:
//! 1. every device applied every block and all trees are identical (and equal to a merge that
//!    applied the blocks in another order);
//! 2. no edit is lost: every content written by a block that counts is in the final tree (at
//!    any path, winner or conflict copy) unless a user op that counts saw it and replaced or
//!    deleted it ("acknowledged"; a rename moves content, it does not acknowledge it); content
//!    that only blocks that no longer count wrote (a denied device's later ones) is not there.
//!    A denied device's later blocks do not count, but what counted devices did on top of them
//!    (having applied them) stands: an acknowledgement or a move (a rename, a copy preserved
//!    as a file) by such a block excuses a missing content;
//! 3. every conflict copy is named `NAME.sync-conflict-YYYYMMDD-HHMMSS-<device8hex>.EXT` from
//!    the loser's mtime and device (or an alternative, `-1` to `-16` before `.EXT`, when that
//!    name is held), beside the path it lost at, and holds exactly what that loser's record
//!    put there, which is not what won;
//! 4. along the way: a restart gives back the tree the device had before.
//!
//! Every failure names its seed; `FEEDSYNC_SEED=n cargo test --test sim_two_way` replays one run
//! and `FEEDSYNC_TRACE=1` prints its steps (every block, every tree as it changes). A longer
//! hunt: `FEEDSYNC_RUNS=40000` (and `FEEDSYNC_FIRST=m` to start elsewhere than seed 1).

use feedsync::drive::Limits;
use feedsync::drive::merge::{DeviceId, Merge, Offer, Resolved, Source, Tree};
use feedsync::drive::record::{BLOCK_SIZE, Entry, FileInfo, Record};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

mod common;
use common::seeds;

/// Runs in CI (about 7 s in a debug build): each is 160 steps on 3 to 5 devices.
const RUNS: u64 = 1000;
/// Steps of the random phase of one run.
const STEPS: usize = 160;

/// File paths users write (some share a name with a directory: a file and a directory at one
/// path, concurrently, is a case the merge must shape).
const FILES: &[&str] = &[
    "a",
    "b.txt",
    "c.tar.gz",
    ".hidden",
    "d/x.txt",
    "d/y",
    "d/e/z.md",
    "a/in.txt",
    "f/g/h.txt",
    "f",
];
/// Directories users make.
const DIRS: &[&str] = &["d", "d/e", "f", "f/g", "a"];

/// xorshift64*: the simulation's only source of choices, a function of the seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // Spread small seeds over the state; xorshift never leaves zero, so never start there.
        Self((seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True with probability `percent`%.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        if v.is_empty() {
            return None;
        }
        Some(&v[self.below(v.len())])
    }
}

/// One simulated device.
struct Device {
    merge: Merge,
    /// Blocks held of each device's log (a prefix: feeds are append-only and verified).
    have: Vec<usize>,
    /// The tree its user sees.
    disk: Tree,
}

/// A user op: what the block says, and what the user saw go.
struct Op {
    what: String,
    records: Vec<Record>,
    /// Paths the op writes: their conflict copies must survive it.
    writes: Vec<String>,
    /// Contents the user saw and replaced or deleted.
    acks: Vec<u64>,
}

struct World {
    rng: Rng,
    ids: Vec<DeviceId>,
    /// Every device's log: blocks of records.
    logs: Vec<Vec<Vec<Record>>>,
    devs: Vec<Device>,
    /// Pairs that cannot sync now (smaller index first).
    cut: HashSet<(usize, usize)>,
    /// Steps taken: the simulation's time.
    now: u64,
    /// Seconds of mtime per step divisor (coarse times make ties and same-second copies).
    coarse: u64,
    /// Each device's clock skew, seconds.
    skew: Vec<i64>,
    next_content: u64,
    /// Per content: the blocks `(device, position)` that put it anywhere.
    puts: HashMap<u64, Vec<(usize, u64)>>,
    /// Per content: the blocks of user ops that saw it and replaced or deleted it.
    acks: HashMap<u64, Vec<(usize, u64)>>,
    /// Per content: the blocks that put it again (a rename, a copy preserved as a file).
    moves: HashMap<u64, Vec<(usize, u64)>>,
    /// The device denied in this run, if one is.
    denied: Option<usize>,
    /// Whether this run denies a device at some point.
    deny_run: bool,
    trace: Vec<String>,
    /// Whether the trace shows each device's tree after it changes (`FEEDSYNC_TRACE`).
    tracing: bool,
}

/// The content a file entry holds (its unique write number), if it is a file.
fn content(e: &Entry) -> Option<u64> {
    match e {
        Entry::File(f) => Some(u64::from_le_bytes(f.hash[..8].try_into().unwrap())),
        Entry::Dir | Entry::Directory(_) | Entry::Link(_) => None,
    }
}

fn parents(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

fn under<'a>(tree: &'a Tree, path: &'a str) -> impl Iterator<Item = (&'a String, &'a Entry)> {
    tree.iter()
        .filter(move |(p, _)| {
            *p == path
                || (p.len() > path.len() && p.starts_with(path) && p.as_bytes()[path.len()] == b'/')
        })
        .map(|(p, r)| (p, &r.entry))
}

/// Whether a user could put a file at `path` on a disk holding `tree`.
fn can_hold_file(tree: &Tree, path: &str) -> bool {
    !matches!(tree.get(path).map(|r| &r.entry), Some(Entry::Dir))
        && parents(path).all(|p| !matches!(tree.get(p).map(|r| &r.entry), Some(Entry::File(_))))
}

fn can_mkdir(tree: &Tree, path: &str) -> bool {
    !tree.contains_key(path)
        && parents(path).all(|p| !matches!(tree.get(p).map(|r| &r.entry), Some(Entry::File(_))))
}

impl World {
    fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let n = 3 + rng.below(3);
        // Random ids (the tie-break and the copies' names follow them), distinct in the 4
        // bytes a copy's name shows.
        let mut ids: Vec<DeviceId> = Vec::new();
        while ids.len() < n {
            let mut id = [0u8; 32];
            for chunk in id.chunks_mut(8) {
                chunk.copy_from_slice(&rng.next().to_le_bytes());
            }
            if ids.iter().all(|o| o[..4] != id[..4]) {
                ids.push(id);
            }
        }
        let logs: Vec<Vec<Vec<Record>>> = ids
            .iter()
            .map(|id| {
                vec![vec![Record::Init {
                    content_key: [id[0] ^ 0x55; 32],
                    block_size: BLOCK_SIZE as u32,
                }]]
            })
            .collect();
        let coarse = [1, 3, 10][rng.below(3)];
        let skew = (0..n).map(|_| rng.below(7) as i64 - 3).collect();
        let deny_run = rng.chance(30);
        let devs = (0..n)
            .map(|i| {
                let mut have = vec![0; n];
                have[i] = 1;
                Device {
                    merge: Merge::new(ids[0], Limits::default()),
                    have,
                    disk: Tree::new(),
                }
            })
            .collect();
        let mut w = Self {
            rng,
            ids,
            logs,
            devs,
            cut: HashSet::new(),
            now: 0,
            coarse,
            skew,
            next_content: 1,
            puts: HashMap::new(),
            acks: HashMap::new(),
            moves: HashMap::new(),
            denied: None,
            deny_run,
            trace: Vec::new(),
            tracing: std::env::var_os("FEEDSYNC_TRACE").is_some(),
        };
        for d in 0..n {
            w.catch_up(d);
        }
        // The founder allows every other device in its first block; they learn it by syncing.
        let allow = (1..n).map(|i| Record::Allow { device: w.ids[i] }).collect();
        w.write(
            0,
            Op {
                what: "allow all".into(),
                records: allow,
                writes: Vec::new(),
                acks: Vec::new(),
            },
        );
        w.trace.push(format!(
            "{n} devices, mtime step divisor {coarse}, skew {:?}, deny run {deny_run}",
            w.skew
        ));
        w
    }

    fn n(&self) -> usize {
        self.ids.len()
    }

    fn index(&self, id: &DeviceId) -> usize {
        self.ids
            .iter()
            .position(|i| i == id)
            .expect("a known device")
    }

    /// Offers `d`'s merge every held block it can apply, starting over when a late denial
    /// asks for it; then materialises its tree.
    fn catch_up(&mut self, d: usize) {
        let n = self.n();
        let start = self.rng.below(n);
        loop {
            let dev = &mut self.devs[d];
            let mut progress = true;
            while progress {
                progress = false;
                for k in 0..n {
                    let j = (start + k) % n;
                    loop {
                        let next = dev.merge.applied(&self.ids[j]) as usize;
                        if next >= dev.have[j] {
                            break;
                        }
                        let block = &self.logs[j][next];
                        match dev.merge.offer(self.ids[j], next as u64, block) {
                            Ok(Offer::Applied) => progress = true,
                            Ok(Offer::Waiting { .. }) => break,
                            Err(e) => panic!("device {d}: block {next} of device {j} refused: {e}"),
                        }
                    }
                }
            }
            if !dev.merge.needs_rebuild() {
                break;
            }
            dev.merge = dev.merge.rebuild();
            self.trace
                .push(format!("  device {d} rebuilds after a late denial"));
        }
        let tree = self.devs[d].merge.tree();
        if self.tracing && tree != self.devs[d].disk {
            self.trace
                .push(format!("  device {d} now shows:\n{}", show_tree(&tree)));
        }
        self.devs[d].disk = tree;
    }

    /// `d` writes one block: its clock, the copies the op's paths must keep, the op.
    fn write(&mut self, d: usize, op: Op) {
        let id = self.ids[d];
        let dev = &self.devs[d];
        assert_eq!(
            dev.merge.applied(&id) as usize,
            self.logs[d].len(),
            "a device has applied its own blocks"
        );
        let mut block = Vec::new();
        let clock = dev.merge.clock_for(&id);
        if !clock.entries().is_empty() {
            block.push(Record::Clock { clock });
        }
        // `preserve` for each path the op writes, from one tree.
        let writes: Vec<&str> = op.writes.iter().map(String::as_str).collect();
        block.extend(dev.merge.preserve_all(&writes));
        block.extend(op.records);
        let seq = self.logs[d].len() as u64 + 1;
        for r in &block {
            if let Some((_, entry)) = put_of(r)
                && let Some(c) = content(&entry)
            {
                let puts = self.puts.entry(c).or_default();
                // Content put again (renamed, or a copy preserved as a real file) moves.
                if !puts.is_empty() {
                    self.moves.entry(c).or_default().push((d, seq));
                }
                puts.push((d, seq));
            }
        }
        for c in &op.acks {
            self.acks.entry(*c).or_default().push((d, seq));
        }
        self.trace.push(format!(
            "device {d} ({}) block {seq}: {}: {}",
            dev8(&id),
            op.what,
            records(&block)
        ));
        self.logs[d].push(block);
        self.devs[d].have[d] += 1;
        let before = self.devs[d].merge.applied(&id);
        self.catch_up(d);
        assert_eq!(
            self.devs[d].merge.applied(&id),
            before + 1,
            "a device's own block applies at once"
        );
    }

    fn new_file(&mut self, d: usize) -> (Entry, u64) {
        let c = self.next_content;
        self.next_content += 1;
        let mut hash = [0u8; 32];
        hash[..8].copy_from_slice(&c.to_le_bytes());
        hash[8] = d as u8;
        let secs = 1_700_000_000 + (self.now / self.coarse) as i64 + self.skew[d];
        let entry = Entry::File(FileInfo {
            size: 0,
            mode: 0o644,
            mtime_secs: secs,
            mtime_nanos: 0,
            hash,
            extents: Vec::new(),
        });
        (entry, c)
    }

    /// A random user op on `d`'s disk, if its user can do one (an op that makes no sense on
    /// that disk is skipped).
    fn user_op(&mut self, d: usize) {
        let dev = &self.devs[d];
        if !dev.merge.members().may_write(&self.ids[d]) {
            return;
        }
        let tree = dev.disk.clone();
        let files: Vec<String> = tree
            .iter()
            .filter(|(_, r)| matches!(r.entry, Entry::File(_)))
            .map(|(p, _)| p.clone())
            .collect();
        let copies: Vec<String> = tree
            .iter()
            .filter(|(_, r)| matches!(r.source, Source::Conflict { .. }))
            .map(|(p, _)| p.clone())
            .collect();
        let implied: Vec<String> = tree
            .iter()
            .filter(|(_, r)| matches!(r.source, Source::Implied))
            .map(|(p, _)| p.clone())
            .collect();
        let all: Vec<String> = tree.keys().cloned().collect();
        let roll = self.rng.below(100);
        let op = match roll {
            // Write new content: at a shared name, or over a file the user sees.
            0..=34 => {
                let path = if self.rng.chance(60) {
                    self.rng.pick(FILES).unwrap().to_string()
                } else {
                    match self.rng.pick(&files) {
                        Some(p) => p.clone(),
                        None => return,
                    }
                };
                self.write_op(d, &tree, path)
            }
            // Delete a file or a directory with everything in it.
            35..=49 => {
                let Some(path) = self.rng.pick(&all).cloned() else {
                    return;
                };
                self.delete_op(&tree, path)
            }
            // Rename a file, over another or to a new name.
            50..=64 => {
                let Some(from) = self.rng.pick(&files).cloned() else {
                    return;
                };
                let to = if self.rng.chance(50) {
                    self.rng.pick(FILES).unwrap().to_string()
                } else {
                    format!("r{}.txt", self.rng.below(6))
                };
                if to == from || !can_hold_file(&tree, &to) {
                    return;
                }
                let entry = tree[&from].entry.clone();
                Op {
                    what: format!("rename {from} -> {to}"),
                    acks: tree
                        .get(&to)
                        .and_then(|r| content(&r.entry))
                        .into_iter()
                        .collect(),
                    records: vec![
                        Record::Remove { path: from.clone() },
                        Record::Put {
                            path: to.clone(),
                            entry,
                        },
                    ],
                    writes: vec![from, to],
                }
            }
            65..=74 => {
                let path = self.rng.pick(DIRS).unwrap().to_string();
                if !can_mkdir(&tree, &path) {
                    return;
                }
                Op {
                    what: format!("mkdir {path}"),
                    records: vec![Record::Put {
                        path: path.clone(),
                        entry: Entry::Dir,
                    }],
                    writes: vec![path],
                    acks: Vec::new(),
                }
            }
            // A writer's scan finds a directory no record names (it exists on disk) and
            // records it.
            75..=79 => {
                let Some(path) = self.rng.pick(&implied).cloned() else {
                    return;
                };
                Op {
                    what: format!("scan records the implied directory {path}"),
                    records: vec![Record::Put {
                        path: path.clone(),
                        entry: Entry::Dir,
                    }],
                    writes: vec![path],
                    acks: Vec::new(),
                }
            }
            // Edit or delete a conflict copy.
            _ => {
                let Some(path) = self.rng.pick(&copies).cloned() else {
                    return;
                };
                if self.rng.chance(50) {
                    self.write_op(d, &tree, path)
                } else {
                    self.delete_op(&tree, path)
                }
            }
        };
        self.write(d, op);
    }

    fn write_op(&mut self, d: usize, tree: &Tree, path: String) -> Op {
        if !can_hold_file(tree, &path) {
            return Op {
                what: format!("(cannot write {path})"),
                records: Vec::new(),
                writes: Vec::new(),
                acks: Vec::new(),
            };
        }
        let (entry, c) = self.new_file(d);
        Op {
            what: format!("write {path} = #{c}"),
            acks: tree
                .get(&path)
                .and_then(|r| content(&r.entry))
                .into_iter()
                .collect(),
            records: vec![Record::Put {
                path: path.clone(),
                entry,
            }],
            writes: vec![path],
        }
    }

    fn delete_op(&mut self, tree: &Tree, path: String) -> Op {
        Op {
            what: format!("delete {path}"),
            acks: under(tree, &path).filter_map(|(_, e)| content(e)).collect(),
            records: vec![Record::Remove { path: path.clone() }],
            writes: vec![path],
        }
    }

    /// `to` pulls what `from` holds of every log (sometimes only part of one) and applies it.
    fn sync(&mut self, to: usize, from: usize, whole: bool) {
        for j in 0..self.n() {
            let (mine, theirs) = (self.devs[to].have[j], self.devs[from].have[j]);
            if theirs <= mine {
                continue;
            }
            self.devs[to].have[j] = if whole || self.rng.chance(70) {
                theirs
            } else {
                mine + 1 + self.rng.below(theirs - mine)
            };
        }
        self.catch_up(to);
    }

    /// Drops `d`'s merge and offers every stored block again: the tree must come back.
    fn restart(&mut self, d: usize) {
        let before = self.devs[d].disk.clone();
        self.devs[d].merge = Merge::new(self.ids[0], Limits::default());
        self.catch_up(d);
        assert_eq!(
            self.devs[d].disk, before,
            "device {d}: a restart changed the tree"
        );
    }

    /// A member other than the founder's target denies a device, cutting it at what the
    /// denier has applied of it.
    fn deny(&mut self) {
        let n = self.n();
        let target = 1 + self.rng.below(n - 1);
        let by = self.rng.below(n);
        if by == target || !self.devs[by].merge.members().may_write(&self.ids[by]) {
            return;
        }
        let upto = self.devs[by].merge.applied(&self.ids[target]);
        self.denied = Some(target);
        self.write(
            by,
            Op {
                what: format!("deny device {target} after {upto}"),
                records: vec![Record::Deny {
                    device: self.ids[target],
                    upto,
                }],
                writes: Vec::new(),
                acks: Vec::new(),
            },
        );
    }

    fn step(&mut self) {
        self.now += 1;
        let n = self.n();
        let roll = self.rng.below(100);
        match roll {
            0..=44 => {
                let d = self.rng.below(n);
                self.user_op(d);
            }
            45..=84 => {
                let (a, b) = (self.rng.below(n), self.rng.below(n));
                if a == b || self.cut.contains(&(a.min(b), a.max(b))) {
                    return;
                }
                self.trace.push(format!("sync {a} <- {b}"));
                self.sync(a, b, false);
            }
            85..=91 => {
                if self.rng.chance(25) {
                    self.trace.push("heal all".into());
                    self.cut.clear();
                    return;
                }
                let (a, b) = (self.rng.below(n), self.rng.below(n));
                if a == b {
                    return;
                }
                let pair = (a.min(b), a.max(b));
                if !self.cut.remove(&pair) {
                    self.cut.insert(pair);
                }
                self.trace.push(format!("cut {:?}", self.cut));
            }
            92..=97 => {
                let d = self.rng.below(n);
                self.trace.push(format!("restart {d}"));
                self.restart(d);
            }
            _ => {
                if self.deny_run && self.denied.is_none() && self.now > 20 {
                    self.deny();
                }
            }
        }
    }

    /// Every partition healed: sync every pair until nothing moves.
    fn settle(&mut self) {
        self.cut.clear();
        self.trace.push("settle".into());
        let n = self.n();
        loop {
            let before: Vec<Vec<usize>> = self.devs.iter().map(|d| d.have.clone()).collect();
            for a in 0..n {
                for b in 0..n {
                    if a != b {
                        self.sync(a, b, true);
                    }
                }
            }
            if self.devs.iter().map(|d| &d.have).eq(before.iter()) {
                return;
            }
        }
    }

    /// The final checks (see the module docs).
    fn check(&self) {
        let n = self.n();
        let lens: Vec<usize> = self.logs.iter().map(Vec::len).collect();
        for (d, dev) in self.devs.iter().enumerate() {
            assert_eq!(dev.have, lens, "device {d} holds every block");
            let applied: Vec<usize> = self
                .ids
                .iter()
                .map(|id| dev.merge.applied(id) as usize)
                .collect();
            assert_eq!(applied, lens, "device {d} applied every block");
        }
        let tree = &self.devs[0].disk;
        for (d, dev) in self.devs.iter().enumerate().skip(1) {
            assert!(
                dev.disk == *tree,
                "device {d}'s tree differs from device 0's:\n{}",
                diff(tree, &dev.disk)
            );
        }
        // Another order: device by device, last first, each as far as it goes.
        let mut other = Merge::new(self.ids[0], Limits::default());
        loop {
            let mut progress = true;
            while progress {
                progress = false;
                for j in (0..n).rev() {
                    while (other.applied(&self.ids[j]) as usize) < lens[j] {
                        let next = other.applied(&self.ids[j]) as usize;
                        match other.offer(self.ids[j], next as u64, &self.logs[j][next]) {
                            Ok(Offer::Applied) => progress = true,
                            Ok(Offer::Waiting { .. }) => break,
                            Err(e) => panic!("block refused: {e}"),
                        }
                    }
                }
            }
            if !other.needs_rebuild() {
                break;
            }
            other = other.rebuild();
        }
        assert!(
            other.tree() == *tree,
            "another order of application gives another tree:\n{}",
            diff(tree, &other.tree())
        );
        self.check_no_edit_lost(tree);
        self.check_copies(tree);
        for p in tree.keys() {
            for parent in parents(p) {
                assert!(
                    matches!(tree.get(parent).map(|r| &r.entry), Some(Entry::Dir)),
                    "{p} without its directory {parent}"
                );
            }
        }
    }

    fn check_no_edit_lost(&self, tree: &Tree) {
        let members = self.devs[0].merge.members();
        let counts = |&(d, seq): &(usize, u64)| members.counts(&self.ids[d], seq);
        // A block that no longer counts still acknowledged what its user saw if a device that
        // counts built on it (applied it, then wrote): that device's user saw its result, and
        // what it did after stands. So does a move by such a block (a rename, a copy preserved
        // as a real file): the devices that built on it saw the content leave its old path,
        // but its new one no longer counts. (Inherent to denial: what a denied device wrote
        // after its bound goes, even where others built on it.)
        let mut followed = vec![0u64; self.n()];
        for (j, log) in self.logs.iter().enumerate() {
            for (k, block) in log.iter().enumerate() {
                if !counts(&(j, k as u64 + 1)) {
                    continue;
                }
                for r in block {
                    if let Record::Clock { clock } = r {
                        for (dev, c) in clock.entries() {
                            let i = self.index(dev);
                            followed[i] = followed[i].max(*c);
                        }
                    }
                }
            }
        }
        let present: HashMap<u64, &str> = tree
            .iter()
            .filter_map(|(p, r)| content(&r.entry).map(|c| (c, p.as_str())))
            .collect();
        for (c, puts) in &self.puts {
            let followed_move = self
                .moves
                .get(c)
                .is_some_and(|m| m.iter().any(|a| !counts(a) && a.1 <= followed[a.0]));
            let acked = followed_move
                || self
                    .acks
                    .get(c)
                    .is_some_and(|acks| acks.iter().any(|a| counts(a) || a.1 <= followed[a.0]));
            if puts.iter().any(counts) {
                assert!(
                    acked || present.contains_key(c),
                    "content #{c} (put by {puts:?}, acknowledged by {:?}) is lost",
                    self.acks.get(c)
                );
            } else {
                assert!(
                    !present.contains_key(c),
                    "content #{c} only blocks that do not count put ({puts:?}) is at {:?}",
                    present.get(c)
                );
            }
        }
        for (p, r) in tree {
            if let Some(c) = content(&r.entry) {
                assert!(
                    self.puts.contains_key(&c),
                    "{p} holds content never written"
                );
            }
        }
    }

    fn check_copies(&self, tree: &Tree) {
        for (name, r) in tree {
            let Source::Conflict { dot, of } = &r.source else {
                continue;
            };
            let d = self.index(&dot.device);
            let block = &self.logs[d][(dot.seq - 1) as usize];
            let last = block.iter().rev().find_map(|rec| match (rec, put_of(rec)) {
                (_, Some((path, entry))) if path == of => Some(Some(entry)),
                (Record::Remove { path }, _) if path == of => Some(None),
                _ => None,
            });
            assert_eq!(
                last,
                Some(Some(r.entry.clone())),
                "the copy {name} holds what device {d}'s block {} put at {of}",
                dot.seq
            );
            let Entry::File(f) = &r.entry else {
                panic!("the copy {name} is not a file");
            };
            let names = copy_names(of, f.mtime_secs, &dot.device);
            assert!(
                names.contains(name),
                "the copy of {of}'s loser is misnamed: {name}, not one of {:?}",
                &names[..2]
            );
            let winner = tree.get(of).and_then(|w| content(&w.entry));
            assert_ne!(
                winner,
                content(&r.entry),
                "{name} is a copy of the winner at {of}"
            );
            // The winner rule between two files: the newer mtime, then the larger device.
            if let Some(Resolved {
                entry: Entry::File(w),
                source: Source::Record(wdot),
                ..
            }) = tree.get(of)
            {
                assert!(
                    ((w.mtime_secs, w.mtime_nanos), wdot.device)
                        > ((f.mtime_secs, f.mtime_nanos), dot.device),
                    "{of}: {} won over the copy {name}",
                    resolved(&tree[of])
                );
            }
        }
    }
}

/// `NAME.sync-conflict-YYYYMMDD-HHMMSS-<device8hex>.EXT` beside `of`, and its alternatives
/// (`-1` to `-16` before `.EXT`, when something else holds the name), written out here rather
/// than taken from the crate, so a change of the name's shape shows.
fn copy_names(of: &str, secs: i64, device: &DeviceId) -> Vec<String> {
    let (dir, name) = match of.rsplit_once('/') {
        Some((d, n)) => (format!("{d}/"), n),
        None => (String::new(), of),
    };
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 && i + 1 < name.len() => (&name[..i], format!(".{}", &name[i + 1..])),
        _ => (name, String::new()),
    };
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil(days);
    let hex: String = device[..4].iter().map(|b| format!("{b:02x}")).collect();
    let (hh, mm, ss) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let head = format!("{dir}{stem}.sync-conflict-{y:04}{m:02}{d:02}-{hh:02}{mm:02}{ss:02}-{hex}");
    let mut names = vec![format!("{head}{ext}")];
    names.extend((1..=16).map(|n| format!("{head}-{n}{ext}")));
    names
}

/// The civil date of a day count from 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The entries two trees disagree on, for a failure message.
fn diff(a: &Tree, b: &Tree) -> String {
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut out = String::new();
    for k in keys {
        if a.get(k) != b.get(k) {
            let show = |r: Option<&Resolved>| r.map_or("-".into(), resolved);
            out.push_str(&format!("  {k}: {} | {}\n", show(a.get(k)), show(b.get(k))));
        }
    }
    out
}

/// An entry, short: `#content@mtime` or `dir`.
fn entry(e: &Entry) -> String {
    match e {
        Entry::File(f) => format!("#{}@{}", content(e).unwrap(), f.mtime_secs - 1_700_000_000),
        Entry::Dir | Entry::Directory(_) => "dir".into(),
        Entry::Link(l) => format!("link {}", l.target),
    }
}

fn dev8(d: &DeviceId) -> String {
    d[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// A tree entry and where it comes from, short.
fn resolved(r: &Resolved) -> String {
    let from = match &r.source {
        Source::Record(d) => format!("{}/{}", dev8(&d.device), d.seq),
        Source::Conflict { dot, of } => {
            format!("copy of {}/{} at {of}", dev8(&dot.device), dot.seq)
        }
        Source::Implied => "implied".into(),
    };
    format!("{} ({from})", entry(&r.entry))
}

/// A record that puts something at a path: a `Put`, or a `PutFrom` (a file citing other
/// devices' content; the merge reads it as a put of the file).
fn put_of(r: &Record) -> Option<(&str, Entry)> {
    match r {
        Record::Put { path, entry } => Some((path, entry.clone())),
        Record::PutFrom { path, file, .. } => Some((path, Entry::File(file.clone()))),
        _ => None,
    }
}

/// A block's records, short.
fn records(block: &[Record]) -> String {
    let parts: Vec<String> = block
        .iter()
        .map(|r| match r {
            Record::Put { path, entry: e } => format!("put {path}={}", entry(e)),
            Record::PutFrom { path, file, .. } => {
                format!("put {path}={} (cited)", entry(&Entry::File(file.clone())))
            }
            Record::Remove { path } => format!("rm {path}"),
            Record::Clock { clock } => {
                let v: Vec<String> = clock
                    .entries()
                    .iter()
                    .map(|(d, c)| format!("{}:{c}", dev8(d)))
                    .collect();
                format!("clock[{}]", v.join(" "))
            }
            Record::Allow { device } => format!("allow {}", dev8(device)),
            Record::Deny { device, upto } => format!("deny {} upto {upto}", dev8(device)),
            other => format!("{other:?}"),
        })
        .collect();
    parts.join(", ")
}

/// A whole tree, short, for the trace.
fn show_tree(t: &Tree) -> String {
    t.iter()
        .map(|(p, r)| format!("    {p}: {}\n", resolved(r)))
        .collect()
}

/// One run: the random phase, then heal, settle and check.
fn run(seed: u64) -> World {
    let mut w = World::new(seed);
    for _ in 0..STEPS {
        w.step();
    }
    w.settle();
    w.check();
    w
}

#[test]
fn devices_converge_and_lose_no_edit_under_partitions_restarts_and_a_denial() {
    // FEEDSYNC_RUNS=n runs n seeds instead, from FEEDSYNC_FIRST (default 1): a longer hunt.
    let var = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    let first = var("FEEDSYNC_FIRST").unwrap_or(1);
    let default: Vec<u64> = (first..first + var("FEEDSYNC_RUNS").unwrap_or(RUNS)).collect();
    let mut figures: BTreeMap<&str, u64> = BTreeMap::new();
    for seed in seeds(&default) {
        let outcome = std::panic::catch_unwind(|| run(seed));
        let w = match outcome {
            Ok(w) => w,
            Err(e) => {
                if std::env::var_os("FEEDSYNC_TRACE").is_some() {
                    // Replay the run to print its steps (the failing one panicked mid-way).
                    let mut w = World::new(seed);
                    let steps = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        for _ in 0..STEPS {
                            w.step();
                        }
                        w.settle();
                    }));
                    drop(steps);
                    for line in &w.trace {
                        eprintln!("{line}");
                    }
                }
                panic!(
                    "two-way model, seed {seed} failed: {}\nreplay: FEEDSYNC_SEED={seed} \
                     FEEDSYNC_TRACE=1 cargo test -j 1 --test sim_two_way",
                    panic_text(&e)
                );
            }
        };
        *figures.entry("runs").or_default() += 1;
        *figures.entry("blocks").or_default() += w.logs.iter().map(|l| l.len() as u64).sum::<u64>();
        *figures.entry("conflict copies at the end").or_default() += w.devs[0]
            .disk
            .values()
            .filter(|r| matches!(r.source, Source::Conflict { .. }))
            .count() as u64;
        *figures.entry("denials").or_default() += u64::from(w.denied.is_some());
        *figures.entry("contents written").or_default() += w.next_content - 1;
    }
    eprintln!("two-way model: {figures:?}");
}

fn panic_text(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}
