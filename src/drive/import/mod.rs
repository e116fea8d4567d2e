//! Writer side: scanning the folder into records and content blocks.
//!
//! A scan walks the folder through its directory handle (`walk.rs`: every directory, stat and
//! open resolved beneath the folder, no symlink followed, honouring `.feedsyncignore` in
//! gitignore syntax; the state directory and readers' temporary files are never entered or
//! read), skips files whose size, mtime and mode match the current record, and hashes the rest
//! in [`BLOCK_SIZE`] blocks. A block whose leaf hash the drive already holds is referenced, not
//! appended: a rename, a copy, or a large file changed in a few places sends only the blocks
//! that are new. New blocks are appended in batches (one
//! signature per batch), then the records, so a reader never sees a record before its blocks.
//! Blocks no current file references any more are given up (`unhave`).
//!
//! `walk.rs` walks the folder; `read.rs` reads and hashes one file (on two cores for a big
//! one).

use crate::core::replicator::{FeedId, Replicator};
use crate::core::{FeedError, crypto};
use crate::drive::event::Counts;
use crate::drive::layout::{self, Shared};
use crate::drive::log;
mod read;
mod walk;

pub use read::{stamp, stamp_time};
pub use walk::is_ours;

use crate::drive::record::{
    BLOCK_SIZE, Borrow, Clock, DeviceId, DirInfo, Entry, FileInfo, LinkInfo, MAX_BATCH_BYTES,
    MAX_LINK_LEN, Record, State, check_path, encode,
};
use crate::fsio::{Dir, Kind, Meta};
use crate::storage::DiskStorage;
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// The name of the ignore file, in any directory of the folder.
pub const IGNORE_FILE: &str = ".feedsyncignore";

/// Blocks appended under one signature.
const APPEND_BATCH: usize = 16;
/// Bytes read from a file at a time: a whole number of blocks.
const CHUNK: usize = 16 * BLOCK_SIZE;
/// Files at least this big are read and hashed on two cores.
const PIPELINE_MIN: u64 = 4 << 20;

/// What a scan changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScanReport {
    /// Files added or modified.
    pub files: u64,
    /// Bytes in those files.
    pub bytes: u64,
    /// Content blocks appended (the rest were reused).
    pub new_blocks: u64,
    /// Paths removed.
    pub removed: u64,
    /// Directories added.
    pub dirs: u64,
    /// Files that changed while being read (picked up by the next scan).
    pub unstable: u64,
    /// Entries that could not be read, with why (skipped; their previous record stays).
    pub skipped: Vec<(PathBuf, String)>,
    /// Entries not shared by design (symlinks, special files, unusable names), with why.
    pub unshared: Vec<(PathBuf, String)>,
    /// What each version this scan committed changed, in order.
    pub versions: Vec<(u64, Counts)>,
}

/// Writer-side import state.
pub struct Importer {
    meta: FeedId,
    content: FeedId,
    layout: Shared,
    /// The folder's handle: everything is listed, stat-ed and opened beneath it.
    root: Arc<dyn Dir>,
    /// The folder's path: to turn change notifications into relative paths, and for messages.
    root_path: PathBuf,
    /// Leaf hash -> a held content block with those bytes.
    dedup: HashMap<[u8; 32], u64>,
    pending: Vec<Vec<u8>>,
    /// Leaf hashes of `pending`, computed once for both the dedup lookup and the tree.
    leaves: Vec<crypto::Hash>,
    /// Device and inode of a directory never imported whatever its name: our state directory,
    /// which anyone who can write the folder's root can rename to a name we would import (and
    /// the writer's secret key is in it).
    kept_out: Option<(u64, u64)>,
    /// Parsed ignore files by directory (cleared by every full scan).
    rules: walk::Rules,
    /// Paths to re-read on the next scan even if size and mtime look unchanged: serving found
    /// bytes in them that no longer match their hash.
    forced: BTreeSet<String>,
    /// A two-way folder's other content feeds (tags 1, 2...: see [`layout::key`]), whose
    /// blocks in local files are deduplicated against too.
    others: Vec<FeedId>,
    /// Slots below this id were looked at for dedup ([`Importer::learn`]).
    learned: layout::SlotId,
    /// Two-way folders: how records go on the wire (`None`: as they are, one writer's).
    wire: Option<Wire>,
}

/// How a device of a two-way folder writes its records (see [`Importer::set_wire`]).
#[derive(Debug, Clone, Default)]
pub struct Wire {
    /// The clock each block carries ([`Record::Clock`]).
    pub clock: Clock,
    /// The device of each content feed tag (tag 0: this device).
    pub devices: Vec<DeviceId>,
    /// The conflict copies of losers at a path, as records that keep them (see
    /// [`Merge::preserve`](crate::drive::merge::Merge::preserve)): written with any record
    /// at that path.
    pub copies: HashMap<String, Vec<Record>>,
}

impl Wire {
    /// The record as it goes in the feed: a file holding other devices' blocks cites them
    /// ([`Record::PutFrom`]); anything else as it is. `None`: a block of a feed with no
    /// device (cannot happen: tags are given to device feeds only).
    fn record(&self, rec: &Record) -> Option<Record> {
        let Record::Put {
            path,
            entry: Entry::File(info),
        } = rec
        else {
            return Some(rec.clone());
        };
        if info.extents.iter().all(|e| layout::split(e.start).0 == 0) {
            return Some(rec.clone()); // tag 0 keys are this device's block indices
        }
        let mut file = info.clone();
        let mut from: Vec<Borrow> = Vec::new();
        for e in &mut file.extents {
            let (tag, start) = layout::split(e.start);
            let device = *self.devices.get(usize::from(tag))?;
            e.start = start;
            match from.last_mut() {
                Some(b) if b.device == device => b.extents += 1,
                _ => from.push(Borrow { device, extents: 1 }),
            }
        }
        Some(Record::PutFrom {
            path: path.clone(),
            file,
            from,
        })
    }
}

impl Importer {
    /// An importer for the drive in `replicator` (`meta` and `content` feeds), whose current
    /// files are registered in `layout`, for the folder open as `root` (at `root_path`). Builds
    /// the dedup index from the held blocks.
    pub fn new(
        replicator: &mut Replicator<DiskStorage>,
        meta: FeedId,
        content: FeedId,
        layout: Shared,
        root: Arc<dyn Dir>,
        root_path: PathBuf,
    ) -> Result<Self, FeedError> {
        // Records name content blocks: the content feed must be durable before any record
        // naming its blocks is (after a power cut, records pointing at content that rolled
        // back would be a signed lie, and the writer would re-append different blocks at
        // indices clones already trust). The replicator's group commit keeps that order.
        replicator.sync_before(content, meta);
        let mut dedup = HashMap::new();
        let blocks: BTreeSet<u64> = {
            let l = layout::lock(&layout);
            l.slots().flat_map(|(_, s)| s.info.block_at()).collect()
        };
        let feed = replicator.feed_mut(content);
        for b in blocks {
            if let Ok(h) = feed.leaf_hash(b) {
                dedup.insert(h, b);
            }
        }
        Ok(Self {
            meta,
            content,
            layout,
            root,
            root_path,
            dedup,
            pending: Vec::new(),
            leaves: Vec::new(),
            kept_out: None,
            rules: walk::Rules::default(),
            forced: BTreeSet::new(),
            others: Vec::new(),
            learned: 0,
            wire: None,
        })
    }

    /// A two-way folder's content feeds other than this device's own (tags 1, 2...).
    pub fn set_others(&mut self, others: Vec<FeedId>) {
        self.others = others;
    }

    /// Two-way folders: the clock, devices and copies the next commits write with.
    pub fn set_wire(&mut self, wire: Option<Wire>) {
        self.wire = wire;
    }

    /// The feed and index of layout key `key`.
    pub(super) fn locate(&self, key: u64) -> Option<(FeedId, u64)> {
        let (tag, index) = layout::split(key);
        match tag {
            0 => Some((self.content, index)),
            t => self.others.get(usize::from(t) - 1).map(|f| (*f, index)),
        }
    }

    /// Learns the leaf hashes of the blocks of files the layout gained since the last call
    /// (files another device wrote, published here): a rename, a copy or an edit of them
    /// here cites those blocks instead of appending them again. Cost: the new files' blocks.
    pub fn learn(&mut self, r: &mut Replicator<DiskStorage>) {
        let keys: Vec<u64> = {
            let l = layout::lock(&self.layout);
            let mut next = self.learned;
            let keys = l
                .slots()
                .filter(|(id, s)| *id >= self.learned && s.pending.is_none())
                .inspect(|(id, _)| next = next.max(id + 1))
                .flat_map(|(_, s)| s.info.block_at().collect::<Vec<_>>())
                .collect();
            // Pending slots are looked at again once published (their ids stay).
            let oldest_pending = l
                .slots()
                .filter(|(id, s)| *id >= self.learned && s.pending.is_some())
                .map(|(id, _)| id)
                .min();
            self.learned = oldest_pending.map_or(next, |p| p.min(next));
            keys
        };
        for k in keys {
            let Some((feed, x)) = self.locate(k) else {
                continue;
            };
            if !r.feed(feed).has(x) {
                continue;
            }
            if let Ok(h) = r.feed_mut(feed).leaf_hash(x) {
                self.dedup.entry(h).or_insert(k);
            }
        }
    }

    fn flush(&mut self, r: &mut Replicator<DiskStorage>) -> Result<(), FeedError> {
        if !self.pending.is_empty() {
            r.append_hashed(self.content, &self.pending, &self.leaves)?;
            self.pending.clear();
            self.leaves.clear();
        }
        Ok(())
    }

    /// Scans the folder against `state` and appends what changed. Returns what it did; the
    /// records are applied to `state`.
    pub fn scan(
        &mut self,
        r: &mut Replicator<DiskStorage>,
        state: &mut State,
    ) -> Result<ScanReport, ScanError> {
        self.rules.clear();
        let start_len = r.feed(self.content).len();
        let root = self.root.clone();
        let mut w = walk::Walk {
            state,
            report: ScanReport::default(),
            records: Vec::new(),
            seen: BTreeSet::new(),
            root: self.root_path.clone(),
        };
        self.visit(r, &mut w, &*root, "", 0)?;
        let walk::Walk {
            mut report,
            mut records,
            seen,
            ..
        } = w;
        self.flush(r)?;
        report.new_blocks = r.feed(self.content).len() - start_len;
        // Removals: recorded paths not seen (children of a removed directory go with it).
        let gone: Vec<String> = state
            .entries
            .keys()
            .filter(|p| !seen.contains(*p))
            .cloned()
            .collect();
        let mut removed_dirs: Vec<String> = Vec::new();
        for p in gone {
            if removed_dirs.iter().any(|d| {
                p.strip_prefix(d.as_str())
                    .is_some_and(|s| s.starts_with('/'))
            }) {
                continue;
            }
            if state.entries.get(&p).is_some_and(Entry::is_dir) {
                removed_dirs.push(p.clone());
            }
            records.push(Record::Remove { path: p });
            report.removed += 1;
        }
        report.versions = self.commit(r, state, records)?;
        Ok(report)
    }

    /// Never imports the directory `dir` (the drive's state directory), under any name.
    pub fn keep_out(&mut self, dir: &dyn Dir) -> io::Result<()> {
        let m = dir.self_metadata()?;
        self.kept_out = Some((m.dev, m.ino));
        Ok(())
    }

    /// Makes the next scan re-read `rel` whatever its size and mtime say.
    pub fn force(&mut self, rel: String) {
        self.forced.insert(rel);
    }

    /// Scans only `paths` (absolute, as a change notification named them). Handles files
    /// created, modified or removed in directories already recorded; returns `None` when a
    /// full [`Importer::scan`] is needed instead (a directory appeared or went, an ignore file
    /// changed, a path is odd). A full scan of a big tree takes tens of milliseconds; this
    /// takes the time of the files that changed.
    pub fn scan_paths(
        &mut self,
        r: &mut Replicator<DiskStorage>,
        state: &mut State,
        paths: &BTreeSet<std::path::PathBuf>,
    ) -> Result<Option<ScanReport>, ScanError> {
        let mut report = ScanReport::default();
        let mut records = Vec::new();
        let start_len = r.feed(self.content).len();
        // Directories an entry changed in: their mtime moved with it.
        let mut parents: BTreeSet<String> = BTreeSet::new();
        for abs in paths {
            let Ok(rel_path) = abs.strip_prefix(&self.root_path) else {
                continue;
            };
            let Some(rel) = rel_path.to_str().map(str::to_string) else {
                return Ok(None);
            };
            if rel.split('/').any(is_ours) {
                continue; // any drive's state, a reader's temporary file
            }
            if rel.is_empty() || check_path(&rel).is_err() {
                return Ok(None);
            }
            let (parent, name) = match rel.rsplit_once('/') {
                Some((p, n)) => (p, n),
                None => ("", rel.as_str()),
            };
            if name == IGNORE_FILE {
                return Ok(None); // the rules changed: everything may be in or out now
            }
            // The parent must be a recorded directory (or the root).
            if !parent.is_empty() && !state.entries.get(parent).is_some_and(Entry::is_dir) {
                return Ok(None);
            }
            if !parent.is_empty() {
                parents.insert(parent.to_string());
            }
            // Listed, stat-ed and opened through the parent's handle (see `walk.rs`): a
            // parent swapped for a symlink is refused here.
            let dir = match self.root.open_dir(parent) {
                Ok(d) => d,
                Err(_) => return Ok(None), // the parent changed: a full scan sorts it out
            };
            let meta = match dir.metadata(name) {
                Ok(m) => m,
                Err(e) => return Err(ScanError::Read(rel, e)),
            };
            if self.ignored(&rel, meta.is_some_and(|m| m.kind == Kind::Dir)) {
                continue;
            }
            let old = state.entries.get(&rel);
            match meta {
                None => match old {
                    Some(e) if e.is_dir() => return Ok(None),
                    Some(_) => {
                        records.push(Record::Remove { path: rel });
                        report.removed += 1;
                    }
                    None => {}
                },
                Some(meta) if meta.kind == Kind::File => {
                    if old.is_some_and(Entry::is_dir) {
                        return Ok(None);
                    }
                    match look(old, &meta, self.forced.contains(&rel)) {
                        Look::Same => continue,
                        Look::Mode(info) => {
                            report.files += 1;
                            records.push(Record::Put {
                                path: rel,
                                entry: Entry::File(info),
                            });
                            continue;
                        }
                        Look::Read => {}
                    }
                    let imported = match self.import_file(r, &*dir, name, &rel, &meta) {
                        Err(ScanError::Read(_, e)) => {
                            report.skipped.push((abs.clone(), e.to_string()));
                            continue;
                        }
                        other => other?,
                    };
                    match imported {
                        Some(info) => {
                            report.files += 1;
                            report.bytes += info.size;
                            records.push(Record::Put {
                                path: rel,
                                entry: Entry::File(info),
                            });
                        }
                        None => report.unstable += 1,
                    }
                }
                Some(meta) if meta.kind == Kind::Dir => {
                    if !old.is_some_and(Entry::is_dir) {
                        return Ok(None);
                    }
                    // A `chmod` or `touch` of the directory itself.
                    let entry = dir_entry(&meta);
                    if old != Some(&entry) {
                        records.push(Record::Put { path: rel, entry });
                    }
                }
                Some(meta) if meta.kind == Kind::Symlink => {
                    if old.is_some_and(Entry::is_dir) {
                        return Ok(None); // a directory replaced by a link: what was under it
                    }
                    match link_entry(&*dir, name) {
                        Ok(Some(entry)) if old != Some(&entry) => {
                            records.push(Record::Put { path: rel, entry });
                        }
                        Ok(_) => {}
                        Err(why) => report.unshared.push((abs.clone(), why)),
                    }
                }
                Some(_) => {} // special files are not shared
            }
        }
        for parent in parents {
            if let (Some(old), Ok(Some(m))) =
                (state.entries.get(&parent), self.root.metadata(&parent))
                && old.is_dir()
                && m.kind == Kind::Dir
            {
                let entry = dir_entry(&m);
                if *old != entry {
                    records.push(Record::Put {
                        path: parent,
                        entry,
                    });
                }
            }
        }
        self.flush(r)?;
        report.new_blocks = r.feed(self.content).len() - start_len;
        report.versions = self.commit(r, state, records)?;
        Ok(Some(report))
    }

    /// Whether `rel` (named by a change notification) is excluded by a `.feedsyncignore`, or
    /// lies in a directory that is. Rule files that cannot be read count as empty (the full
    /// scan reports them).
    fn ignored(&mut self, rel: &str, is_dir: bool) -> bool {
        let _ = self.rules.load_above(&*self.root, rel);
        let mut end = 0;
        while let Some(k) = rel[end..].find('/') {
            end += k;
            if self.rules.ignored(&rel[..end], true) {
                return true;
            }
            end += 1;
        }
        self.rules.ignored(rel, is_dir)
    }

    /// Appends `records` as metadata blocks (each with the time, for `log`), applies them to
    /// `state` and the layout, and gives up blocks no file references any more. Returns what
    /// each new version changed.
    pub fn commit(
        &mut self,
        r: &mut Replicator<DiskStorage>,
        state: &mut State,
        records: Vec<Record>,
    ) -> Result<Vec<(u64, Counts)>, ScanError> {
        self.forced.clear();
        if records.is_empty() {
            return Ok(Vec::new());
        }
        // Each batch twice: as this node's state and layout take it (`batches`: blocks by
        // layout key) and as it goes in the feed (`wired`: see `Wire`).
        let mut batches: Vec<Vec<Record>> = vec![Vec::new()];
        let mut wired: Vec<Vec<Record>> = vec![Vec::new()];
        let mut size = 0;
        let mut preserved: BTreeSet<String> = BTreeSet::new();
        for rec in records {
            // The copies first, each on its own (several big ones may not fit one block with
            // the record): they exist as records before the heads they lost to are
            // superseded, whichever block the record lands in.
            let mut copies = Vec::new();
            let wire_rec = match &self.wire {
                None => rec.clone(),
                Some(w) => {
                    if let Record::Put { path, .. } | Record::Remove { path } = &rec
                        && preserved.insert(path.clone())
                    {
                        copies.extend(w.copies.get(path).into_iter().flatten().cloned());
                    }
                    // A key of a feed no device has cannot be made (tags are given to device
                    // feeds only): the record goes as it is.
                    w.record(&rec).unwrap_or_else(|| rec.clone())
                }
            };
            for (local, wire) in copies
                .into_iter()
                .map(|c| (None, c))
                .chain(std::iter::once((Some(rec), wire_rec)))
            {
                let n = encode(std::slice::from_ref(&wire)).len();
                if size + n > MAX_BATCH_BYTES && !wired.last().expect("non-empty").is_empty() {
                    batches.push(Vec::new());
                    wired.push(Vec::new());
                    size = 0;
                }
                size += n;
                batches.last_mut().expect("non-empty").extend(local);
                wired.last_mut().expect("non-empty").push(wire);
            }
        }
        let time = Record::now();
        for b in &mut wired {
            if let Some(w) = &self.wire {
                b.insert(
                    0,
                    Record::Clock {
                        clock: w.clock.clone(),
                    },
                );
            }
            b.insert(0, time.clone());
        }
        let blocks: Vec<Vec<u8>> = wired.iter().map(|b| encode(b)).collect();
        r.append(self.meta, &blocks)?;
        let mut orphans = BTreeSet::new();
        {
            let mut l = layout::lock(&self.layout);
            for batch in &batches {
                for rec in batch {
                    match rec {
                        Record::Put { entry, path }
                            if entry.is_dir()
                                && state.entries.get(path).is_some_and(Entry::is_dir) =>
                        {
                            // A directory's new mode or mtime: its files stay as they are.
                        }
                        Record::Put { path, .. } | Record::Remove { path } => {
                            // The path and anything under it leave the layout; a new file
                            // version comes back in, referencing what it reuses.
                            let mut ids: Vec<_> = l.slot_at(path).into_iter().collect();
                            if state.entries.get(path).is_some_and(Entry::is_dir) {
                                // A directory going (or becoming a file): everything under it.
                                // Rare, so a pass over all slots is fine.
                                let prefix = format!("{path}/");
                                ids.extend(
                                    l.slots()
                                        .filter(|(_, s)| s.path.starts_with(&prefix))
                                        .map(|(id, _)| id),
                                );
                            }
                            for id in ids {
                                orphans.extend(l.remove(id));
                            }
                            if let Record::Put {
                                entry: Entry::File(info),
                                ..
                            } = rec
                            {
                                l.add_live(path.clone(), info.clone());
                            }
                        }
                        // The wire form of a file put (see `Importer::set_wire`): never in
                        // the importer's own records, which cite blocks by layout key.
                        Record::PutFrom { .. }
                        | Record::Init { .. }
                        | Record::Time { .. }
                        | Record::Clock { .. }
                        | Record::Allow { .. }
                        | Record::Deny { .. } => {}
                    }
                }
            }
            orphans.retain(|b| !l.is_owned(*b));
        }
        let mut versions = Vec::with_capacity(batches.len());
        for batch in batches {
            let counts = Counts::of(&log::changes(state, &batch));
            state.apply(batch);
            versions.push((state.version, counts));
        }
        // Consecutive orphans (of one feed) go in one Unhave.
        let orphans: Vec<u64> = orphans.into_iter().collect();
        let mut i = 0;
        while i < orphans.len() {
            let mut j = i + 1;
            while j < orphans.len() && orphans[j] == orphans[j - 1] + 1 {
                j += 1;
            }
            // Keys of one tag are consecutive only within it (indices stay below 2^48).
            let mut k = i;
            while k < j {
                let tag = layout::split(orphans[k]).0;
                let mut e = k + 1;
                while e < j && layout::split(orphans[e]).0 == tag {
                    e += 1;
                }
                if let Some((feed, x)) = self.locate(orphans[k]) {
                    let n = orphans[e - 1] - orphans[k] + 1;
                    r.forget(feed, x..x + n)?;
                }
                k = e;
            }
            i = j;
        }
        self.dedup.retain(|_, b| orphans.binary_search(b).is_err());
        Ok(versions)
    }
}

/// What a scan makes of a regular file, given its record.
pub(super) enum Look {
    /// Size, mtime and mode as recorded: nothing to do.
    Same,
    /// Only the permission bits changed (a `chmod` moves the ctime, not the mtime): the record
    /// again with the new mode, nothing read and no content block spent.
    Mode(FileInfo),
    /// New, or changed: read it.
    Read,
}

/// Compares the regular file `meta` with its record `old`; `forced`: read it whatever its
/// metadata says (serving found bytes that no longer match).
pub(super) fn look(old: Option<&Entry>, meta: &Meta, forced: bool) -> Look {
    let Some(Entry::File(f)) = old else {
        return Look::Read;
    };
    let mode = meta.mode & 0o777;
    if forced || f.size != meta.len || (f.mtime_secs, f.mtime_nanos) != stamp_time(meta.mtime) {
        return Look::Read;
    }
    if f.mode == mode {
        return Look::Same;
    }
    Look::Mode(FileInfo { mode, ..f.clone() })
}

/// The record of the directory `meta` describes: its permission bits and mtime.
pub(super) fn dir_entry(meta: &Meta) -> Entry {
    let (mtime_secs, mtime_nanos) = stamp_time(meta.mtime);
    Entry::Directory(DirInfo {
        mode: meta.mode & 0o777,
        mtime_secs,
        mtime_nanos,
    })
}

/// The record of the symlink `name` in `dir`: its target as `readlink` gives it (never
/// followed) and its own mtime. `Ok(None)`: no longer a symlink (the next scan looks again);
/// `Err`: a link that cannot be recorded, with why.
pub(super) fn link_entry(dir: &dyn Dir, name: &str) -> Result<Option<Entry>, String> {
    let target = match dir.read_link(name) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => return Ok(None), // not a link now
        Err(e) => return Err(e.to_string()),
    };
    // Its time after its target: a link replaced in between shows as another inode below.
    let Ok(Some(m)) = dir.metadata(name) else {
        return Ok(None);
    };
    if m.kind != Kind::Symlink {
        return Ok(None);
    }
    let target = String::from_utf8(target)
        .map_err(|_| "symlink target is not UTF-8 (not shared)".to_string())?;
    if target.len() > MAX_LINK_LEN {
        return Err(format!(
            "symlink target over {MAX_LINK_LEN} bytes (not shared)"
        ));
    }
    let (mtime_secs, mtime_nanos) = stamp_time(m.mtime);
    Ok(Some(Entry::Link(LinkInfo {
        target,
        mtime_secs,
        mtime_nanos,
    })))
}

/// Why a scan failed.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// Walking the folder failed.
    #[error("scanning the folder: {0}")]
    Walk(String),
    /// A file could not be read.
    #[error("reading {0}: {1}")]
    Read(String, #[source] io::Error),
    /// Appending to a feed failed.
    #[error(transparent)]
    Feed(#[from] FeedError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn meta(len: u64, mode: u32, secs: u64) -> Meta {
        Meta {
            kind: Kind::File,
            len,
            mode,
            mtime: UNIX_EPOCH + Duration::from_secs(secs),
            ctime: UNIX_EPOCH,
            uid: 0,
            dev: 1,
            ino: 1,
            nlink: 1,
        }
    }

    #[test]
    fn a_mode_only_change_is_recorded_without_reading_the_file() {
        let old = crate::drive::record::test_file(10);
        assert!(matches!(
            look(Some(&old), &meta(10, 0o644, 0), false),
            Look::Same
        ));
        let Look::Mode(info) = look(Some(&old), &meta(10, 0o100600, 0), false) else {
            panic!("a chmod was not seen as one");
        };
        let Entry::File(f) = &old else { unreachable!() };
        assert_eq!(info.mode, 0o600, "permission bits only");
        assert_eq!((info.hash, &info.extents), (f.hash, &f.extents));
        // Anything else that moved, or a file serving found changed: read again.
        for (m, forced) in [
            (meta(11, 0o600, 0), false),
            (meta(10, 0o600, 5), false),
            (meta(10, 0o600, 0), true),
        ] {
            assert!(matches!(look(Some(&old), &m, forced), Look::Read));
        }
        assert!(matches!(look(None, &meta(10, 0o644, 0), false), Look::Read));
    }
}
