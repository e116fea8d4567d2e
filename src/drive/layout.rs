//! Where a drive's content blocks live: in the folder's own files, never in a second copy.
//!
//! The [`Layout`] maps every content block to the files that hold it (a block may be in several
//! files: copies, renames in flight, repeated blocks). It is the content feed's [`BlockData`],
//! so the feed reads blocks for serving from the files themselves and, on a reader, writes each
//! verified block straight into the file being reassembled.
//!
//! # Reassembly (reader side)
//! A file still to be fetched is *pending*: its bytes go to a temporary file in the state area
//! (`.feedsync/tmp`), each verified block written at its own position as it arrives (blocks come
//! out of order from several peers). Per file it keeps a register (the next position to hash),
//! the set of positions written, and a counter of positions left. The whole-file hash advances
//! in order through the register: a block arriving in order is hashed from memory, a run of
//! early blocks is read back once the gap before it fills. When nothing is left, [`Layout::publish`]
//! checks the whole-file hash, sets mode and mtime, and renames the file into place, which is
//! atomic: a final path holds the old file or the complete, verified new one, never a part.
//!
//! Early blocks are written to their place instead of being held in memory: a block counted as
//! stored in the feed's bitfield must survive a kill, and memory stays flat however far ahead the
//! peers run. A restart finds the temporary file again (its name is derived from the path and the
//! file's hash) and keeps every block already in it that still matches its verified leaf hash.

use crate::core::bitfield::Bitfield;
use crate::drive::record::{BLOCK_SIZE, FileInfo};
use crate::storage::BlockData;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// Open file handles kept (temporary and published files): enough for the files being worked
/// on at once, far under any descriptor limit.
const OPEN_FILES: usize = 64;

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
}

/// Reassembly state of a file being fetched.
#[derive(Debug)]
pub struct Pending {
    /// Block -> positions in the file (units of [`BLOCK_SIZE`]) where it goes.
    positions: HashMap<u64, Vec<u64>>,
    /// Positions written to the temporary file.
    done: Bitfield,
    /// Positions not written yet.
    pub left: u64,
    /// The register: positions `0..next` are in `hasher` (allocated with the first block: a
    /// BLAKE3 state is ~2 KB, and a big tree has thousands of files waiting at once).
    next: u64,
    hasher: Option<Box<blake3::Hasher>>,
    /// The temporary file.
    pub temp: PathBuf,
}

/// The shared layout: the content feed's storage and the drive logic both hold it.
pub type Shared = Arc<Mutex<Layout>>;

/// See the module docs.
#[derive(Debug)]
pub struct Layout {
    root: PathBuf,
    tmp: PathBuf,
    writer: bool,
    slots: HashMap<SlotId, Slot>,
    next_slot: SlotId,
    by_path: HashMap<String, SlotId>,
    owners: HashMap<u64, Vec<SlotId>>,
    /// Pending slots with nothing left to write.
    ready: BTreeSet<SlotId>,
    open: VecDeque<(SlotId, bool, File)>,
    /// Pending slot -> the published file it will replace, kept readable until then (a new
    /// version reuses the old one's unchanged blocks).
    shadow: HashMap<SlotId, SlotId>,
    /// Number of pending slots (asked after every event: kept, not counted).
    pending: usize,
}

/// Locks the shared layout. A panic while it was held leaves nothing half-updated that matters
/// more than stopping, so a poisoned lock is taken as is.
pub fn lock(shared: &Shared) -> MutexGuard<'_, Layout> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl Layout {
    /// An empty layout for the folder at `root`, with temporary files in `tmp`. A `writer`'s
    /// blocks are in its files already when the feed appends them.
    pub fn new(root: PathBuf, tmp: PathBuf, writer: bool) -> Shared {
        Arc::new(Mutex::new(Self {
            root,
            tmp,
            writer,
            slots: HashMap::new(),
            next_slot: 0,
            by_path: HashMap::new(),
            owners: HashMap::new(),
            ready: BTreeSet::new(),
            open: VecDeque::new(),
            shadow: HashMap::new(),
            pending: 0,
        }))
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
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
            },
        );
        id
    }

    /// Registers a complete file at its final path.
    pub fn add_live(&mut self, path: String, info: FileInfo) -> SlotId {
        self.insert(path, info, None)
    }

    /// Registers a file to fetch; its temporary file is named after its path and hash, so a
    /// restart finds the same one.
    pub fn add_pending(&mut self, path: String, info: FileInfo) -> SlotId {
        let mut positions: HashMap<u64, Vec<u64>> = HashMap::new();
        for (pos, b) in info.block_at().enumerate() {
            positions.entry(b).or_default().push(pos as u64);
        }
        let name = blake3::Hasher::new()
            .update(path.as_bytes())
            .update(&[0])
            .update(&info.hash)
            .finalize();
        let temp = self.tmp.join(format!("{}.part", &name.to_hex()[..32]));
        let pending = Pending {
            positions,
            done: Bitfield::new(),
            left: info.blocks(),
            next: 0,
            hasher: None,
            temp,
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
            let _ = fs::remove_file(&p.temp); // a version no longer wanted
        }
        self.ready.remove(&id);
        self.open.retain(|(s, ..)| *s != id);
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

    /// Blocks a pending slot still needs, with whether each is written.
    pub fn pending_blocks(&self, id: SlotId) -> Vec<(u64, bool)> {
        let Some(Slot {
            pending: Some(p), ..
        }) = self.slots.get(&id)
        else {
            return Vec::new();
        };
        let mut v: Vec<(u64, bool)> = p
            .positions
            .iter()
            .map(|(b, pos)| (*b, pos.iter().all(|&q| p.done.get(q))))
            .collect();
        v.sort_unstable();
        v
    }

    /// Pending slots whose every block is written, ready to [`Layout::publish`].
    pub fn take_ready(&mut self) -> Vec<SlotId> {
        std::mem::take(&mut self.ready).into_iter().collect()
    }

    fn handle(&mut self, id: SlotId, temp: bool, write: bool) -> io::Result<&File> {
        if let Some(k) = self
            .open
            .iter()
            .position(|(s, t, _)| *s == id && *t == temp)
        {
            let entry = self.open.remove(k).expect("found");
            self.open.push_front(entry);
        } else {
            let slot = self
                .slots
                .get(&id)
                .ok_or_else(|| io::Error::other("no such file"))?;
            let file = if temp {
                let p = slot
                    .pending
                    .as_ref()
                    .expect("temp handles are for pending slots");
                if write {
                    fs::create_dir_all(&self.tmp)?;
                }
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(write)
                    .truncate(false)
                    .mode(0o600)
                    .open(&p.temp)?
            } else {
                // A published file is only read: never follow a link planted at its path.
                OpenOptions::new()
                    .read(true)
                    .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                    .open(self.root.join(&slot.path))?
            };
            self.open.push_front((id, temp, file));
            self.open.truncate(OPEN_FILES);
        }
        Ok(&self.open[0].2)
    }

    /// Reads `buf.len()` bytes of position `pos` of a slot's file (temporary or final).
    fn read_pos(&mut self, id: SlotId, temp: bool, pos: u64, buf: &mut [u8]) -> io::Result<()> {
        let f = self.handle(id, temp, false)?;
        f.read_exact_at(buf, pos * BLOCK_SIZE as u64)
    }

    /// Reads block `index` from the temporary file of pending slot `id` at the block's first
    /// position, whether or not it is marked written (used to recover a restart's work).
    pub fn read_pending(&mut self, id: SlotId, index: u64, buf: &mut [u8]) -> io::Result<()> {
        let pos = self
            .slots
            .get(&id)
            .and_then(|s| s.pending.as_ref())
            .and_then(|p| p.positions.get(&index))
            .and_then(|v| v.first().copied())
            .ok_or_else(|| io::Error::other("block not in this file"))?;
        self.read_pos(id, true, pos, buf)
    }

    /// Writes verified block `index` (bytes in hand) at every position of pending slot `id`
    /// not yet written.
    pub fn write_pending(&mut self, id: SlotId, index: u64, data: &[u8]) -> io::Result<()> {
        self.write_to(id, index, Some(data)).map(|_| ())
    }

    /// Pending slots with nothing left to write go back to the ready set (a publish that
    /// failed on a full disk, say, is tried again).
    pub fn requeue_complete(&mut self) {
        let done: Vec<SlotId> = self
            .slots
            .iter()
            .filter(|(_, s)| s.pending.as_ref().is_some_and(|p| p.left == 0))
            .map(|(id, _)| *id)
            .collect();
        self.ready.extend(done);
    }

    /// Writes `data` (block `index`) at every not-yet-written position of slot `id`;
    /// with `None`, only marks them written.
    fn write_to(&mut self, id: SlotId, index: u64, data: Option<&[u8]>) -> io::Result<bool> {
        let Some(p) = self.slots.get(&id).and_then(|s| s.pending.as_ref()) else {
            return Ok(false);
        };
        let todo: Vec<u64> = p
            .positions
            .get(&index)
            .map(|v| v.iter().copied().filter(|&q| !p.done.get(q)).collect())
            .unwrap_or_default();
        if todo.is_empty() {
            return Ok(false);
        }
        if let Some(data) = data {
            let f = self.handle(id, true, true)?;
            // A block of zeros past the end of the file is left as a hole: a sparse file stays
            // sparse, and costs no writes (the final length is set when publishing).
            let zero = data.iter().all(|&b| b == 0);
            let len = if zero { f.metadata()?.len() } else { 0 };
            for &q in &todo {
                let at = q * BLOCK_SIZE as u64;
                if zero && at >= len {
                    continue;
                }
                f.write_all_at(data, at)?;
            }
        }
        let p = self
            .slots
            .get_mut(&id)
            .and_then(|s| s.pending.as_mut())
            .expect("checked above");
        for &q in &todo {
            p.done.set(q, true);
        }
        p.left -= todo.len() as u64;
        // Advance the register over what is now contiguous; this block from memory.
        if let Some(data) = data {
            while p.next < p.done.first_unset(p.next)
                && p.positions[&index].binary_search(&p.next).is_ok()
            {
                p.hasher
                    .get_or_insert_with(|| Box::new(blake3::Hasher::new()))
                    .update(data);
                p.next += 1;
            }
        }
        if p.left == 0 {
            self.ready.insert(id);
        }
        Ok(true)
    }

    /// Checks the whole-file hash of a pending slot with nothing left, sets its mode and mtime
    /// and renames it into place. Parent directories are created; none may be a symlink or
    /// lead out of the folder.
    pub fn publish(&mut self, id: SlotId) -> Result<Vec<u64>, PublishError> {
        let (path, info, temp, mut next, mut hasher) = {
            let slot = self.slots.get_mut(&id).ok_or(PublishError::Gone)?;
            let p = slot.pending.as_mut().ok_or(PublishError::Gone)?;
            if p.left > 0 {
                return Err(PublishError::Incomplete);
            }
            (
                slot.path.clone(),
                slot.info.clone(),
                p.temp.clone(),
                p.next,
                // A copy: if publishing fails (a full disk, a parent in the way), the register
                // stays as it was for the next attempt.
                p.hasher.clone().unwrap_or_default(),
            )
        };
        let blocks = info.blocks();
        // The final length first: blocks of zeros past the end were left as holes, and must
        // read back (as zeros) below.
        self.handle(id, true, true)
            .and_then(|f| f.set_len(info.size))
            .map_err(PublishError::Io)?;
        // Finish the register from the temporary file (what came out of order).
        if next < blocks {
            let mut buf = vec![0u8; BLOCK_SIZE];
            while next < blocks {
                let len = (info.size - next * BLOCK_SIZE as u64).min(BLOCK_SIZE as u64) as usize;
                self.read_pos(id, true, next, &mut buf[..len])
                    .map_err(PublishError::Io)?;
                hasher.update(&buf[..len]);
                next += 1;
            }
        }
        if hasher.finalize().as_bytes() != &info.hash {
            self.open.retain(|(s, ..)| *s != id);
            return Err(PublishError::HashMismatch(path));
        }
        let target = safe_target(&self.root, &path)?;
        {
            // The handle the blocks were written through (created here for an empty file).
            let f = self.handle(id, true, true).map_err(PublishError::Io)?;
            f.set_len(info.size).map_err(PublishError::Io)?;
            let mode = if info.executable { 0o755 } else { 0o644 };
            f.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(PublishError::Io)?;
            f.set_modified(mtime(&info)).map_err(PublishError::Io)?;
        }
        self.open.retain(|(s, ..)| *s != id);
        if let Ok(m) = fs::symlink_metadata(&target)
            && m.is_dir()
        {
            // A directory where the file goes (the writer replaced it): it must be empty by
            // now, the removals having been applied first.
            fs::remove_dir(&target).map_err(PublishError::Io)?;
        }
        fs::rename(&temp, &target).map_err(PublishError::Io)?;
        if let Some(slot) = self.slots.get_mut(&id)
            && slot.pending.take().is_some()
        {
            self.pending -= 1;
        }
        // The file it replaced is gone now; its blocks stay only where others reference them.
        let mut orphans = Vec::new();
        if let Some(old) = self.shadow.remove(&id) {
            orphans = self.remove(old);
            orphans.retain(|b| !self.is_owned(*b));
        }
        Ok(orphans)
    }

    /// Discards what a pending slot wrote (its whole-file hash failed): every position is to
    /// be written again.
    pub fn reset_pending(&mut self, id: SlotId) {
        self.open.retain(|(s, ..)| *s != id);
        if let Some(p) = self.slots.get_mut(&id).and_then(|s| s.pending.as_mut()) {
            let _ = fs::remove_file(&p.temp);
            p.done = Bitfield::new();
            p.left = p.positions.values().map(|v| v.len() as u64).sum();
            p.next = 0;
            p.hasher = None;
        }
        self.ready.remove(&id);
    }
}

/// The modification time a record gives.
pub fn mtime(info: &FileInfo) -> SystemTime {
    if info.mtime_secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::new(info.mtime_secs as u64, info.mtime_nanos)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(info.mtime_secs.unsigned_abs())
            + Duration::from_nanos(u64::from(info.mtime_nanos))
    }
}

/// Why a file could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The slot went away (the writer removed or replaced the file meanwhile).
    #[error("the file is no longer wanted")]
    Gone,
    /// Blocks are still missing.
    #[error("the file is incomplete")]
    Incomplete,
    /// The reassembled file does not hash to the recorded value.
    #[error("{0}: reassembled content does not match its recorded hash")]
    HashMismatch(String),
    /// The path would leave the folder.
    #[error("{path}: refused, {why}")]
    Unsafe {
        /// The path.
        path: String,
        /// Why.
        why: &'static str,
    },
    /// The disk said no (full, read-only, permissions).
    #[error("{0}")]
    Io(#[source] io::Error),
}

/// The final location of `rel` under `root`, creating missing parent directories. Every
/// existing ancestor must be a real directory: a symlink (which could point anywhere) or a file
/// in the way is refused, so nothing is ever written outside `root`.
pub fn safe_target(root: &Path, rel: &str) -> Result<PathBuf, PublishError> {
    crate::drive::record::check_path(rel).map_err(|_| PublishError::Unsafe {
        path: rel.to_string(),
        why: "not a plain relative path",
    })?;
    let mut dir = root.to_path_buf();
    let components: Vec<&str> = rel.split('/').collect();
    for c in &components[..components.len() - 1] {
        dir.push(c);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(PublishError::Unsafe {
                    path: rel.to_string(),
                    why: "a parent directory is a symlink",
                });
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(PublishError::Unsafe {
                    path: rel.to_string(),
                    why: "a parent is not a directory",
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&dir).map_err(PublishError::Io)?;
            }
            Err(e) => return Err(PublishError::Io(e)),
        }
    }
    Ok(dir.join(components[components.len() - 1]))
}

/// The content feed's block storage: see the module docs.
#[derive(Debug)]
pub struct FolderBlocks(pub Shared);

impl BlockData for FolderBlocks {
    fn read(&mut self, index: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut layout = lock(&self.0);
        let holders = layout.owners.get(&index).cloned().unwrap_or_default();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no file holds this block");
        for id in holders {
            let Some(slot) = layout.slots.get(&id) else {
                continue;
            };
            let (temp, pos) = match &slot.pending {
                None => match slot.info.block_at().position(|b| b == index) {
                    Some(pos) => (false, pos as u64),
                    None => continue,
                },
                Some(p) => match p.positions[&index].iter().find(|&&q| p.done.get(q)) {
                    Some(&pos) => (true, pos),
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
        let mut layout = lock(&self.0);
        if layout.writer {
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
