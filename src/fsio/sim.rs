//! A simulated disk that can lose power, for tests of the durability rules.
//!
//! Why it exists: "data durable before the header", "the file durable before the rename that
//! publishes it", "the directory entry durable before the version is recorded" are ordering
//! rules that no test on a real disk can check: a real disk loses nothing unless the power goes.
//! This disk keeps what was written apart from what was made durable, the way LazyFS-style
//! tests do, and [`SimDisk::power_cut`] keeps a *random subset* of what was not yet durable.
//!
//! The model, chosen to be conservative (never more durable than a real file system promises):
//! - Every file has durable bytes, length, mode and mtime, and a list of pending operations
//!   (writes split at 4 KiB page boundaries, so a write can tear between pages; `set_len`;
//!   mode and mtime changes). [`FileIo::sync_data`] makes its pending writes and lengths
//!   durable, [`FileIo::sync_all`] everything pending on that file.
//! - Every directory has durable entries. Creations, `mkdir`, renames, unlinks and `rmdir` are
//!   pending namespace operations until the directory they land in is synced ([`Dir::sync`]):
//!   a creation or removal belongs to its parent, a rename to the directory it moves the entry
//!   *into* (syncing only the source directory does not make a rename durable; the source entry
//!   goes away together with the rename, never on its own). A file's data and its directory
//!   entry are independent: a synced directory can hold an entry for a file whose bytes were
//!   never synced (an empty or short file after the cut), and a synced file can lose its name.
//! - [`Dir::sync_fs`] makes everything durable.
//! - [`SimDisk::power_cut`] applies a random subset of every pending operation, in the original
//!   order, to the durable state (an operation that no longer applies, such as removing an entry
//!   that is not durably there, is skipped), drops the rest, and the disk goes on from there.
//!   Every handle opened before the cut fails from then on, as the process that held it is gone.
//! - Errors can be injected: [`SimDisk::fail_next_syncs`] (a flush reports EIO and makes nothing
//!   durable) and [`SimDisk::set_capacity`] (writes beyond a byte budget fail with ENOSPC).
//!   A failed flush keeps its operations pending (a retry can still make them durable), which
//!   is kinder than Linux, where a failed `fsync` may drop the dirty pages and a retry succeed.
//! - [`SimDisk::stop_after`] stops the simulated process after a number of calls (every later
//!   call fails), so a test can cut the power at any point inside a sequence of operations.
//!
//! There are no symlinks (the race tests run on the real disk); [`SimDisk::mkfifo`] plants an
//! entry that is not a regular file.

mod handles;

use super::{Dir, Kind, Meta, check_rel, split};
use handles::SimDir;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

/// Device number reported for every simulated entry.
const DEV: u64 = 0x5133;
/// The unit a write can tear at: a page of the page cache.
const PAGE: u64 = 4096;
/// The root directory's inode.
const ROOT: Ino = 1;

type Ino = u64;

#[derive(Clone, Debug)]
struct FileState {
    bytes: Vec<u8>,
    mode: u32,
    mtime: SystemTime,
}

#[derive(Clone, Debug)]
enum FileOp {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
    Mode(u32),
    Mtime(SystemTime),
}

impl FileOp {
    /// Made durable by `sync_data` (the rest only by `sync_all`).
    fn is_data(&self) -> bool {
        matches!(self, FileOp::Write { .. } | FileOp::SetLen(_))
    }

    fn apply(&self, f: &mut FileState) {
        match self {
            FileOp::Write { offset, bytes } => {
                let (start, end) = (*offset as usize, *offset as usize + bytes.len());
                if f.bytes.len() < end {
                    f.bytes.resize(end, 0);
                }
                f.bytes[start..end].copy_from_slice(bytes);
            }
            FileOp::SetLen(len) => f.bytes.resize(*len as usize, 0),
            FileOp::Mode(m) => f.mode = *m,
            FileOp::Mtime(t) => f.mtime = *t,
        }
    }
}

#[derive(Debug)]
struct FileNode {
    durable: FileState,
    current: FileState,
    pending: Vec<FileOp>,
    /// Directory entries naming it now (0 once unlinked; the inode lives while handles do).
    links: u64,
    /// Changes made to it so far: its simulated ctime (nanoseconds after the epoch), so a
    /// rewrite that keeps size and mtime still shows, as on a real disk.
    changes: u64,
}

#[derive(Debug, Default)]
struct DirNode {
    durable: BTreeMap<String, Ino>,
    current: BTreeMap<String, Ino>,
}

#[derive(Debug)]
enum Node {
    File(FileNode),
    Dir(DirNode),
    /// A FIFO (or any entry that is not a regular file or directory).
    Other,
}

/// A pending namespace operation: remove `unlink` (if it still names the same inode), then add
/// `link`; durable when `commit` (a directory) is synced.
#[derive(Debug, Clone)]
struct NsOp {
    commit: Ino,
    unlink: Option<(Ino, String, Ino)>,
    link: Option<(Ino, String, Ino)>,
}

#[derive(Debug)]
struct State {
    nodes: HashMap<Ino, Node>,
    next_ino: Ino,
    /// Bumped by every power cut; handles from an older epoch fail.
    epoch: u64,
    ns_pending: Vec<NsOp>,
    fail_syncs: u32,
    /// Injected flush failures lose the file's pending writes.
    failed_sync_loses: bool,
    capacity: Option<u64>,
    /// Calls left before the simulated process stops (every call fails until the cut).
    calls_left: Option<u64>,
}

/// One entry of the tree as read back by [`SimDisk::tree`] / [`SimDisk::durable_tree`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimEntry {
    /// A regular file and its bytes.
    File(Vec<u8>),
    /// A directory.
    Dir,
    /// Something else (a FIFO).
    Other,
}

/// The simulated disk. Cloning shares it.
#[derive(Debug, Clone)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

fn os_err(code: i32, what: &str) -> io::Error {
    let e = io::Error::from_raw_os_error(code);
    io::Error::new(e.kind(), format!("sim:{what}: {e}"))
}

const ENOENT: i32 = 2;
const EIO: i32 = 5;
const EBADF: i32 = 9;
const EEXIST: i32 = 17;
const ENOTDIR: i32 = 20;
const EISDIR: i32 = 21;
const EINVAL: i32 = 22;
const ENOSPC: i32 = 28;
const ENOTEMPTY: i32 = 39;

fn stopped() -> io::Error {
    io::Error::other("sim: the process was stopped (power is about to go)")
}

fn stale() -> io::Error {
    io::Error::other("sim: a handle opened before the power cut (its process is gone)")
}

/// splitmix64: the power cut's choices, reproducible from the seed.
fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Default for SimDisk {
    fn default() -> Self {
        Self::new()
    }
}

impl SimDisk {
    /// An empty disk: just the root directory (durable).
    pub fn new() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node::Dir(DirNode::default()));
        Self {
            state: Arc::new(Mutex::new(State {
                nodes,
                next_ino: ROOT + 1,
                epoch: 0,
                ns_pending: Vec::new(),
                fail_syncs: 0,
                failed_sync_loses: false,
                capacity: None,
                calls_left: None,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test thread that panicked while holding the lock left the state as consistent as
        // any single operation leaves it (each one finishes its mutation before returning).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The root directory, as a handle valid until the next power cut.
    pub fn root(&self) -> Arc<dyn Dir> {
        let epoch = self.lock().epoch;
        Arc::new(SimDir {
            disk: self.clone(),
            ino: ROOT,
            epoch,
            path: String::new(),
        })
    }

    /// Cuts the power: every pending operation is kept or dropped at random (from `seed`), the
    /// kept ones applied in order. Returns how many pending operations were kept and dropped.
    /// The chance to keep is itself drawn per cut (sometimes nothing, sometimes everything), so
    /// that many seeds cover both ends.
    pub fn power_cut(&self, seed: u64) -> (usize, usize) {
        let mut s = seed;
        let p = match splitmix(&mut s) % 8 {
            0 => 0.0,
            1 => 1.0,
            _ => (splitmix(&mut s) % 1001) as f64 / 1000.0,
        };
        self.power_cut_with(&mut || ((splitmix(&mut s) >> 11) as f64 / (1u64 << 53) as f64) < p)
    }

    /// Cuts the power keeping nothing that was not durable.
    pub fn power_cut_dropping_all(&self) -> (usize, usize) {
        self.power_cut_with(&mut || false)
    }

    /// Cuts the power; `keep` decides, operation by operation in order (namespace operations
    /// first, then each file's), whether a pending operation reached the disk.
    pub fn power_cut_with(&self, keep: &mut dyn FnMut() -> bool) -> (usize, usize) {
        let mut st = self.lock();
        let (mut kept, mut dropped) = (0, 0);
        let ns = std::mem::take(&mut st.ns_pending);
        for op in &ns {
            if keep() {
                st.apply_ns(op);
                kept += 1;
            } else {
                dropped += 1;
            }
        }
        let mut inos: Vec<Ino> = st.nodes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            if let Some(Node::File(f)) = st.nodes.get_mut(&ino) {
                for op in std::mem::take(&mut f.pending) {
                    if keep() {
                        op.apply(&mut f.durable);
                        kept += 1;
                    } else {
                        dropped += 1;
                    }
                }
                f.current = f.durable.clone();
            }
        }
        // What no durable entry reaches is gone; the rest starts over from its durable state.
        let mut links: HashMap<Ino, u64> = HashMap::new();
        let mut seen = HashSet::from([ROOT]);
        let mut stack = vec![ROOT];
        while let Some(d) = stack.pop() {
            if let Some(Node::Dir(dir)) = st.nodes.get(&d) {
                for &child in dir.durable.values() {
                    *links.entry(child).or_default() += 1;
                    if seen.insert(child) {
                        stack.push(child);
                    }
                }
            }
        }
        st.nodes.retain(|ino, _| seen.contains(ino));
        for (ino, node) in st.nodes.iter_mut() {
            match node {
                Node::Dir(d) => {
                    d.durable.retain(|_, c| seen.contains(c));
                    d.current = d.durable.clone();
                }
                Node::File(f) => f.links = links.get(ino).copied().unwrap_or(0),
                Node::Other => {}
            }
        }
        st.epoch += 1;
        st.calls_left = None;
        (kept, dropped)
    }

    /// The next `n` flushes (file, directory or file system) fail with EIO and make nothing
    /// durable.
    pub fn fail_next_syncs(&self, n: u32) {
        let mut st = self.lock();
        st.fail_syncs = n;
        st.failed_sync_loses = false;
    }

    /// Like [`SimDisk::fail_next_syncs`], but a failed file flush also loses that file's
    /// pending writes (reads still see them; a later flush succeeds without writing them):
    /// what Linux does after a write-back error, and why a failed flush cannot just be retried.
    pub fn fail_next_syncs_losing(&self, n: u32) {
        let mut st = self.lock();
        st.fail_syncs = n;
        st.failed_sync_loses = true;
    }

    /// Stops the simulated process after `calls` more calls on any handle: from then on every
    /// call fails, until [`SimDisk::power_cut`]. This is how a test cuts the power at an
    /// arbitrary point *inside* a sequence of operations (run it, let it fail, cut).
    pub fn stop_after(&self, calls: u64) {
        self.lock().calls_left = Some(calls);
    }

    /// A byte budget for the whole disk (the sum of file lengths): a write or `set_len` that
    /// would go beyond it fails with ENOSPC. `None`: unlimited.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.lock().capacity = bytes;
    }

    /// Plants a FIFO at `rel` (durable at once, as if it had been there before).
    pub fn mkfifo(&self, rel: &str) -> io::Result<()> {
        let mut st = self.lock();
        let (parent, name) = st.resolve_parent(ROOT, rel)?;
        if st.dir(parent)?.current.contains_key(name) {
            return Err(os_err(EEXIST, rel));
        }
        let ino = st.new_ino();
        st.nodes.insert(ino, Node::Other);
        let d = st.dir_mut(parent)?;
        d.current.insert(name.to_string(), ino);
        d.durable.insert(name.to_string(), ino);
        Ok(())
    }

    /// How many operations are pending (written, not yet durable).
    pub fn pending(&self) -> usize {
        let st = self.lock();
        st.ns_pending.len()
            + st.nodes
                .values()
                .map(|n| match n {
                    Node::File(f) => f.pending.len(),
                    _ => 0,
                })
                .sum::<usize>()
    }

    /// The tree as a running program sees it now, by path.
    pub fn tree(&self) -> BTreeMap<String, SimEntry> {
        self.lock().walk(false)
    }

    /// The tree as it would be after a power cut that kept nothing pending.
    pub fn durable_tree(&self) -> BTreeMap<String, SimEntry> {
        self.lock().walk(true)
    }

    /// The current bytes of the regular file at `rel`, if there is one.
    pub fn read(&self, rel: &str) -> Option<Vec<u8>> {
        match self.tree().remove(rel) {
            Some(SimEntry::File(b)) => Some(b),
            _ => None,
        }
    }
}

impl State {
    fn new_ino(&mut self) -> Ino {
        self.next_ino += 1;
        self.next_ino - 1
    }

    fn dir(&self, ino: Ino) -> io::Result<&DirNode> {
        match self.nodes.get(&ino) {
            Some(Node::Dir(d)) => Ok(d),
            _ => Err(os_err(ENOTDIR, "not a directory")),
        }
    }

    fn dir_mut(&mut self, ino: Ino) -> io::Result<&mut DirNode> {
        match self.nodes.get_mut(&ino) {
            Some(Node::Dir(d)) => Ok(d),
            _ => Err(os_err(ENOTDIR, "not a directory")),
        }
    }

    fn file_mut(&mut self, ino: Ino) -> io::Result<&mut FileNode> {
        match self.nodes.get_mut(&ino) {
            Some(Node::File(f)) => Ok(f),
            _ => Err(os_err(EBADF, "not a file")),
        }
    }

    /// The inode `rel` names beneath `base` (current state), `""` naming `base` itself.
    fn resolve(&self, base: Ino, rel: &str) -> io::Result<Ino> {
        check_rel(rel)?;
        let mut at = base;
        for c in rel.split('/').filter(|c| !c.is_empty()) {
            at = *self
                .dir(at)
                .map_err(|_| os_err(ENOTDIR, rel))?
                .current
                .get(c)
                .ok_or_else(|| os_err(ENOENT, rel))?;
        }
        Ok(at)
    }

    /// The directory holding `rel` and its last component.
    fn resolve_parent<'a>(&self, base: Ino, rel: &'a str) -> io::Result<(Ino, &'a str)> {
        let (parent, name) = split(rel)?;
        let p = self.resolve(base, parent)?;
        self.dir(p).map_err(|_| os_err(ENOTDIR, rel))?;
        Ok((p, name))
    }

    fn kind(&self, ino: Ino) -> Kind {
        match self.nodes.get(&ino) {
            Some(Node::File(_)) => Kind::File,
            Some(Node::Dir(_)) => Kind::Dir,
            _ => Kind::Other,
        }
    }

    fn meta(&self, ino: Ino) -> Meta {
        let uid = rustix::process::getuid().as_raw();
        let (len, mode, mtime, nlink, changes) = match self.nodes.get(&ino) {
            Some(Node::File(f)) => (
                f.current.bytes.len() as u64,
                f.current.mode,
                f.current.mtime,
                f.links,
                f.changes,
            ),
            Some(Node::Dir(_)) => (0, 0o755, SystemTime::UNIX_EPOCH, 2, 0),
            _ => (0, 0o600, SystemTime::UNIX_EPOCH, 1, 0),
        };
        Meta {
            kind: self.kind(ino),
            len,
            mode,
            mtime,
            ctime: SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(changes),
            uid,
            dev: DEV,
            ino,
            nlink,
        }
    }

    fn apply_ns(&mut self, op: &NsOp) {
        if let Some((dir, name, ino)) = &op.unlink
            && let Some(Node::Dir(d)) = self.nodes.get_mut(dir)
            && d.durable.get(name) == Some(ino)
        {
            d.durable.remove(name);
        }
        if let Some((dir, name, ino)) = &op.link
            && let Some(Node::Dir(d)) = self.nodes.get_mut(dir)
        {
            d.durable.insert(name.clone(), *ino);
        }
    }

    /// A flush: fails if an injected failure is due. A failed flush of file `file` in the
    /// losing mode ([`SimDisk::fail_next_syncs_losing`]) drops its pending writes from what
    /// will reach the disk while reads still see them, as Linux does with the dirty pages of a
    /// failed `fsync`.
    fn flush_check(&mut self, what: &str, file: Option<Ino>) -> io::Result<()> {
        if self.fail_syncs > 0 {
            self.fail_syncs -= 1;
            if self.failed_sync_loses
                && let Some(Node::File(f)) = file.and_then(|i| self.nodes.get_mut(&i))
            {
                f.pending.retain(|op| !op.is_data());
            }
            return Err(os_err(EIO, what));
        }
        Ok(())
    }

    fn sync_dir(&mut self, ino: Ino) {
        let ops = std::mem::take(&mut self.ns_pending);
        for op in ops {
            if op.commit == ino {
                self.apply_ns(&op);
            } else {
                self.ns_pending.push(op);
            }
        }
    }

    fn sync_file(&mut self, ino: Ino, all: bool) -> io::Result<()> {
        let f = self.file_mut(ino)?;
        for op in std::mem::take(&mut f.pending) {
            if all || op.is_data() {
                op.apply(&mut f.durable);
            } else {
                f.pending.push(op);
            }
        }
        Ok(())
    }

    fn sync_everything(&mut self) {
        for op in std::mem::take(&mut self.ns_pending) {
            self.apply_ns(&op);
        }
        for node in self.nodes.values_mut() {
            if let Node::File(f) = node {
                for op in std::mem::take(&mut f.pending) {
                    op.apply(&mut f.durable);
                }
            }
        }
    }

    /// Refuses growth beyond the byte budget.
    fn room_for(&self, ino: Ino, new_len: u64) -> io::Result<()> {
        let Some(cap) = self.capacity else {
            return Ok(());
        };
        let used: u64 = self
            .nodes
            .iter()
            .map(|(i, n)| match n {
                Node::File(f) if *i != ino => f.current.bytes.len() as u64,
                _ => 0,
            })
            .sum();
        if used + new_len > cap {
            return Err(os_err(ENOSPC, "disk full"));
        }
        Ok(())
    }

    fn walk(&self, durable: bool) -> BTreeMap<String, SimEntry> {
        let mut out = BTreeMap::new();
        let mut seen = HashSet::from([ROOT]);
        let mut stack = vec![(ROOT, String::new())];
        while let Some((d, path)) = stack.pop() {
            let Some(Node::Dir(dir)) = self.nodes.get(&d) else {
                continue;
            };
            let entries = if durable { &dir.durable } else { &dir.current };
            for (name, &ino) in entries {
                let p = super::join(&path, name);
                let entry = match self.nodes.get(&ino) {
                    Some(Node::File(f)) => SimEntry::File(if durable {
                        f.durable.bytes.clone()
                    } else {
                        f.current.bytes.clone()
                    }),
                    Some(Node::Dir(_)) => {
                        if seen.insert(ino) {
                            stack.push((ino, p.clone()));
                        }
                        SimEntry::Dir
                    }
                    _ => SimEntry::Other,
                };
                out.insert(p, entry);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
