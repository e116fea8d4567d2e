//! Where a drive's content blocks live: in the folder's own files, never in a second copy.
//!
//! The [`Layout`] maps every content block to the files that hold it (a block may be in several
//! files: copies, renames in flight, repeated blocks). It is the content feed's [`BlockData`],
//! so the feed reads blocks for serving from the files themselves and, on a reader, writes each
//! verified block straight into the file being reassembled.
//!
//! # Reassembly (reader side)
//! A file still to be fetched is *pending*: its bytes go to a temporary file (hidden, next to
//! its destination: see [`Temps`]), each verified block written at its own position as it
//! arrives (blocks come out of order from several peers). Per file it keeps a register (the next position to hash),
//! the set of positions written, and a counter of positions left. The whole-file hash advances
//! in order through the register: a block arriving in order is hashed from memory, a run of
//! early blocks is read back once the gap before it fills. When nothing is left, the file is
//! *staged* ([`Layout::stage`]: whole-file hash checked, length, mode and mtime set), the file
//! system is flushed once for a batch of staged files ([`Layout::flush`]), and only then is each
//! renamed into place ([`Layout::commit_staged`]). The rename is atomic and comes after the
//! bytes are durable: after a crash or a power cut a final path holds the old file or the
//! complete, verified new one, never a part and never zeros.
//!
//! # Folder IO
//! Every file and directory of the folder is reached through one directory handle for its root
//! ([`Dir`], opened once and kept): nothing resolves a path from `/` again, no symlink planted
//! by another local user can redirect a rename, a mkdir or a removal (`openat2` beneath the
//! root, no symlinks), a FIFO planted where a file was is refused without blocking, and
//! `syncfs` on the long-lived handle reports every write-back error since it was opened.
//!
//! Early blocks are written to their place instead of being held in memory: a block counted as
//! stored in the feed's bitfield must survive a kill, and memory stays flat however far ahead the
//! peers run. A restart finds the temporary file again (its name is derived from the path and the
//! file's hash) and keeps every block already in it that still matches its verified leaf hash.
//!
//! # Layout
//! - this file: the block map ([`Layout`]): slots (files) and which content blocks each holds,
//!   and [`FolderBlocks`], the content feed's [`BlockData`] on top of it.
//! - `handles.rs`: the cache of open file handles (and the identity check of served files).
//! - `reassembly.rs`: writing verified blocks into pending files, the in-order register.
//! - `publish.rs`: staging, the batched flush and the rename into place; parents, removals.
//! - `temps.rs`: where temporary files live, their names, sweeping stale ones.
//! - `adopt.rs`: files found in place when a node starts (checked by hash when newer than the
//!   version recorded as applied).

mod adopt;
mod handles;
mod publish;
mod reassembly;
mod temps;

pub use publish::{PublishError, mtime, mtime_of};
pub use temps::{Temps, is_temp_name};

use crate::core::bitfield::Bitfield;
use crate::drive::record::FileInfo;
use crate::fsio::{Dir, RealDir};
use crate::storage::BlockData;
use handles::Handles;
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// A slot's identifier inside the layout.
pub type SlotId = u32;

/// One file the layout knows.
#[derive(Debug)]
pub struct Slot {
    /// Relative path.
    pub path: String,
    /// What the file is.
    pub info: FileInfo,
    /// `Some` while the file is being fetched (boxed: most slots are complete files).
    pub pending: Option<Box<Pending>>,
    /// Device and inode of the file in place, once known (published here, or pinned the first
    /// time it is opened for serving): a different file at the path is not this one.
    pub(super) ident: Option<(u64, u64)>,
}

/// Reassembly state of a file being fetched. Where each block goes is read from the file's
/// extents (no map per block): its memory follows the record's extents and the positions
/// written, never the number of blocks a record claims.
#[derive(Debug)]
pub struct Pending {
    /// Positions written to the temporary file.
    pub(super) done: Bitfield,
    /// Positions not written yet.
    pub left: u64,
    /// The register: positions `0..next` are in `hasher` (allocated with the first block: a
    /// BLAKE3 state is ~2 KB, and a big tree has thousands of files waiting at once).
    pub(super) next: u64,
    pub(super) hasher: Option<Box<blake3::Hasher>>,
    /// The temporary file (full path, for messages).
    pub temp: PathBuf,
    /// The temporary file, relative to the folder root (how it is reached).
    pub(super) temp_rel: String,
    /// Hash checked, length, mode and mtime set: waiting for the flush before its rename.
    pub(super) staged: bool,
}

/// The shared layout: the content feed's storage and the drive logic both hold it.
pub type Shared = Arc<Mutex<Layout>>;

/// See the module docs.
#[derive(Debug)]
pub struct Layout {
    /// The folder's path, for messages only: every operation goes through `dir`.
    pub(super) root: PathBuf,
    /// The folder root's handle, opened once (see the module docs).
    pub(super) dir: Arc<dyn Dir>,
    /// Where temporary files are made.
    pub(super) temps: Temps,
    pub(super) writer: bool,
    pub(super) slots: HashMap<SlotId, Slot>,
    next_slot: SlotId,
    by_path: HashMap<String, SlotId>,
    pub(super) owners: HashMap<u64, Vec<SlotId>>,
    /// Pending slots with nothing left to write.
    pub(super) ready: BTreeSet<SlotId>,
    pub(super) open: Handles,
    /// Pending slot -> the published file it will replace, kept readable until then (a new
    /// version reuses the old one's unchanged blocks).
    pub(super) shadow: HashMap<SlotId, SlotId>,
    /// Number of pending slots (asked after every event: kept, not counted).
    pub(super) pending: usize,
    /// Staged slots (see [`Layout::stage`]), in staging order, and since when the oldest waits.
    pub(super) staged: Vec<SlotId>,
    pub(super) staged_since: Option<Instant>,
    /// Stale temporary files were swept in this run (see [`Layout::sweep_temps_once`]).
    swept: bool,
    /// Directories this layout created as parents (of a temporary file, of a file published)
    /// and the reader has not yet recorded as its own ([`Layout::take_made_dirs`]). A cell: the
    /// parents are made from `&self` paths, and the layout's mutex already makes access
    /// exclusive.
    made_dirs: std::cell::RefCell<BTreeSet<String>>,
}

/// Locks the shared layout. A panic while it was held leaves nothing half-updated that matters
/// more than stopping, so a poisoned lock is taken as is.
pub fn lock(shared: &Shared) -> MutexGuard<'_, Layout> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl Layout {
    /// An empty layout for the folder whose root handle is `dir` (`root` names it in
    /// messages). A `writer`'s blocks are in its files already when the feed appends them.
    /// Temporary files go next to their destination ([`Temps::default`]).
    pub fn new(dir: Arc<dyn Dir>, root: PathBuf, writer: bool) -> Shared {
        Arc::new(Mutex::new(Self {
            root,
            dir,
            temps: Temps::default(),
            writer,
            slots: HashMap::new(),
            next_slot: 0,
            by_path: HashMap::new(),
            owners: HashMap::new(),
            ready: BTreeSet::new(),
            open: Handles::default(),
            shadow: HashMap::new(),
            pending: 0,
            staged: Vec::new(),
            staged_since: None,
            swept: false,
            made_dirs: Default::default(),
        }))
    }

    /// [`Layout::new`] on the real folder at `root` (its handle opened here, once).
    pub fn open(root: &Path, writer: bool) -> io::Result<Shared> {
        let dir = RealDir::open_path(root)?;
        Ok(Self::new(Arc::new(dir), root.to_path_buf(), writer))
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder root's handle: all folder IO goes through it (see the module docs).
    pub fn dir(&self) -> Arc<dyn Dir> {
        self.dir.clone()
    }

    /// Replaces the folder root's handle (before the drive runs): a test wraps the real one to
    /// inject flush failures into a running drive.
    pub fn set_dir(&mut self, dir: Arc<dyn Dir>) {
        self.dir = dir;
    }

    /// Where temporary files are made (before any file is pending).
    pub fn set_temps(&mut self, temps: Temps) {
        self.temps = temps;
    }

    /// The slot at `path`, if any.
    pub fn slot_at(&self, path: &str) -> Option<SlotId> {
        self.by_path.get(path).copied()
    }

    /// A slot.
    pub fn slot(&self, id: SlotId) -> Option<&Slot> {
        self.slots.get(&id)
    }

    /// Every slot.
    pub fn slots(&self) -> impl Iterator<Item = (SlotId, &Slot)> {
        self.slots.iter().map(|(id, s)| (*id, s))
    }

    /// The directories made as parents since the last call: the reader records them as its
    /// own (a directory made for a renamed file's temporary, before the version's directories
    /// are made, was otherwise nobody's, and stayed after the writer removed it).
    pub fn take_made_dirs(&self) -> BTreeSet<String> {
        std::mem::take(&mut *self.made_dirs.borrow_mut())
    }

    /// Number of files still being fetched.
    pub fn pending_count(&self) -> usize {
        self.pending
    }

    /// Paths of the files that reference block `index`.
    pub fn holders(&self, index: u64) -> Vec<String> {
        self.owners
            .get(&index)
            .map(|o| {
                o.iter()
                    .filter_map(|id| self.slots.get(id))
                    .map(|s| s.path.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether any slot references block `index`.
    pub fn is_owned(&self, index: u64) -> bool {
        self.owners.get(&index).is_some_and(|o| !o.is_empty())
    }

    fn insert(&mut self, path: String, info: FileInfo, pending: Option<Pending>) -> SlotId {
        let id = self.next_slot;
        self.next_slot += 1;
        if let Some(old) = self.by_path.get(&path).copied() {
            let old_live = self.slots.get(&old).is_some_and(|s| s.pending.is_none());
            if old_live && pending.is_some() {
                self.by_path.remove(&path);
                self.shadow.insert(id, old);
            } else {
                self.remove(old);
            }
        }
        let mut seen = BTreeSet::new();
        for b in info.block_at() {
            if seen.insert(b) {
                self.owners.entry(b).or_default().push(id);
            }
        }
        if pending.as_ref().is_some_and(|p| p.left == 0) {
            self.ready.insert(id);
        }
        if pending.is_some() {
            self.pending += 1;
        }
        self.by_path.insert(path.clone(), id);
        self.slots.insert(
            id,
            Slot {
                path,
                info,
                pending: pending.map(Box::new),
                ident: None,
            },
        );
        id
    }

    /// Registers a complete file at its final path.
    pub fn add_live(&mut self, path: String, info: FileInfo) -> SlotId {
        self.insert(path, info, None)
    }

    /// Registers a complete file at its final path whose device and inode are known (the
    /// importer's `fstat` of it): serving refuses any other file found there.
    pub fn add_live_as(&mut self, path: String, info: FileInfo, dev: u64, ino: u64) -> SlotId {
        let id = self.insert(path, info, None);
        if let Some(s) = self.slots.get_mut(&id) {
            s.ident = Some((dev, ino));
        }
        id
    }

    /// Registers a file to fetch; its temporary file is named after its path and hash, so a
    /// restart finds the same one.
    pub fn add_pending(&mut self, path: String, info: FileInfo) -> SlotId {
        let temp_rel = self.temps.name_for(&path, &info);
        let pending = Pending {
            done: Bitfield::new(),
            left: info.blocks(),
            next: 0,
            hasher: None,
            temp: self.root.join(&temp_rel),
            temp_rel,
            staged: false,
        };
        self.insert(path, info, Some(pending))
    }

    /// Forgets a slot; returns the blocks no other slot references any more.
    pub fn remove(&mut self, id: SlotId) -> Vec<u64> {
        let Some(slot) = self.slots.remove(&id) else {
            return Vec::new();
        };
        if let Some(p) = &slot.pending {
            self.pending -= 1;
            let _ = self.dir.remove_file(&p.temp_rel); // a version no longer wanted
            if p.staged {
                self.staged.retain(|s| *s != id);
            }
        }
        self.ready.remove(&id);
        self.open.forget(id);
        if self.by_path.get(&slot.path) == Some(&id) {
            self.by_path.remove(&slot.path);
        }
        let mut orphans = Vec::new();
        if let Some(old) = self.shadow.remove(&id) {
            orphans.extend(self.remove(old));
        }
        let unique: BTreeSet<u64> = slot.info.block_at().collect();
        for b in unique {
            if let Some(o) = self.owners.get_mut(&b) {
                o.retain(|s| *s != id);
                if o.is_empty() {
                    self.owners.remove(&b);
                    orphans.push(b);
                }
            }
        }
        orphans
    }

    /// Content blocks a pending slot still needs, as ranges (one per run of unwritten
    /// positions inside an extent): as many as the file has extents and gaps, never one per block.
    pub fn pending_wants(&self, id: SlotId) -> Vec<std::ops::Range<u64>> {
        let Some(Slot {
            info,
            pending: Some(p),
            ..
        }) = self.slots.get(&id)
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut pos = 0u64;
        for e in &info.extents {
            let end = pos + e.count;
            let mut q = p.done.first_unset(pos);
            while q < end {
                let stop = p.done.first_set(q).map_or(end, |x| x.min(end));
                out.push(e.start + (q - pos)..e.start + (stop - pos));
                q = p.done.first_unset(stop);
            }
            pos = end;
        }
        out
    }

    /// Pending slots whose every block is written, ready to [`Layout::publish`].
    pub fn take_ready(&mut self) -> Vec<SlotId> {
        std::mem::take(&mut self.ready).into_iter().collect()
    }

    /// Pending slots with nothing left to write go back to the ready set (a publish that
    /// failed on a full disk, say, is tried again). Staged ones wait for the flush instead.
    pub fn requeue_complete(&mut self) {
        let done: Vec<SlotId> = self
            .slots
            .iter()
            .filter(|(_, s)| s.pending.as_ref().is_some_and(|p| p.left == 0 && !p.staged))
            .map(|(id, _)| *id)
            .collect();
        self.ready.extend(done);
    }
}

/// The positions (in blocks, ascending) at which content block `index` appears in a file.
pub fn positions_of(info: &FileInfo, index: u64) -> impl Iterator<Item = u64> + '_ {
    let mut pos = 0u64;
    info.extents.iter().filter_map(move |e| {
        let here = pos;
        pos += e.count;
        (e.start <= index && index - e.start < e.count).then(|| here + (index - e.start))
    })
}

/// The content block at position `pos` of a file.
pub fn block_at_pos(info: &FileInfo, pos: u64) -> Option<u64> {
    let mut at = 0u64;
    for e in &info.extents {
        if pos < at + e.count {
            return Some(e.start + (pos - at));
        }
        at += e.count;
    }
    None
}

/// Bits of a layout block key that hold the block's index in its content feed; the bits
/// above hold the feed's *tag*. A one-writer drive has one content feed (tag 0: keys are
/// block indices); a two-way folder has one per device (tag 0: this device's own, or the
/// founder's on a clone), and a file may hold blocks of several. Feed indices are below
/// 2^48 ([`Extent::check`](crate::drive::record::FileInfo::check)), so a key is one `u64`
/// and everything keyed by block stays as it was.
pub const TAG_SHIFT: u32 = 48;

/// The layout key of block `index` of the content feed tagged `tag`.
pub fn key(tag: u16, index: u64) -> u64 {
    (u64::from(tag) << TAG_SHIFT) | (index & ((1 << TAG_SHIFT) - 1))
}

/// The (tag, index) of a layout key.
pub fn split(key: u64) -> (u16, u64) {
    ((key >> TAG_SHIFT) as u16, key & ((1 << TAG_SHIFT) - 1))
}

/// A content feed's block storage: see the module docs.
#[derive(Debug)]
pub struct FolderBlocks {
    layout: Shared,
    /// Which content feed this is the storage of (see [`TAG_SHIFT`]).
    tag: u16,
    /// `Some(true)`: this node writes the feed (its blocks are in the files when appended);
    /// `None`: as the layout says (a one-writer drive's writer).
    own: Option<bool>,
}

impl FolderBlocks {
    /// The storage of the drive's content feed (tag 0).
    pub fn new(layout: Shared) -> Self {
        Self {
            layout,
            tag: 0,
            own: None,
        }
    }

    /// The storage of the content feed tagged `tag`; `own` if this node writes it.
    pub fn tagged(layout: Shared, tag: u16, own: bool) -> Self {
        Self {
            layout,
            tag,
            own: Some(own),
        }
    }
}

impl BlockData for FolderBlocks {
    fn read(&mut self, index: u64, buf: &mut [u8]) -> io::Result<()> {
        let index = key(self.tag, index);
        let mut layout = lock(&self.layout);
        let holders = layout.owners.get(&index).cloned().unwrap_or_default();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no file holds this block");
        for id in holders {
            let Some(slot) = layout.slots.get(&id) else {
                continue;
            };
            let (temp, pos) = match &slot.pending {
                None => match positions_of(&slot.info, index).next() {
                    Some(pos) => (false, pos),
                    None => continue,
                },
                Some(p) => match positions_of(&slot.info, index).find(|&q| p.done.get(q)) {
                    Some(pos) => (true, pos),
                    None => continue,
                },
            };
            match layout.read_pos(id, temp, pos, buf) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn write(&mut self, index: u64, data: &[u8]) -> io::Result<()> {
        let index = key(self.tag, index);
        let mut layout = lock(&self.layout);
        if self.own.unwrap_or(layout.writer) {
            // The writer appends blocks it just read from its own files: they are there.
            return Ok(());
        }
        let holders = layout.owners.get(&index).cloned().unwrap_or_default();
        if holders.is_empty() {
            return Err(io::Error::other(format!(
                "content block {index} belongs to no file"
            )));
        }
        // Idempotent: a position written before (by an earlier attempt whose commit failed,
        // say on a full disk) is not written again, and the store succeeds.
        for id in holders {
            layout.write_to(id, index, Some(data))?;
        }
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        // Durability of the folder's files is the drive's business (it syncs the filesystem
        // in batches); the feed's own files are synced by the disk store.
        Ok(())
    }
}
