//! Writer side: scanning the folder into records and content blocks.
//!
//! A scan walks the folder (honouring `.feedsyncignore`, gitignore syntax, through the `ignore`
//! crate; the state directory is never entered), skips files whose size, mtime and mode match
//! the current record, and hashes the rest in [`BLOCK_SIZE`] blocks. A block whose leaf hash the
//! drive already holds is referenced, not appended: a rename, a copy, or a large file changed in
//! a few places sends only the blocks that are new. New blocks are appended in batches (one
//! signature per batch), then the records, so a reader never sees a record before its blocks.
//! Blocks no current file references any more are given up (`unhave`).
//!
//! `read.rs` reads and hashes one file (on two cores for a big one).

use crate::core::replicator::{FeedId, Replicator};
use crate::core::{FeedError, crypto};
use crate::drive::STATE_DIR;
use crate::drive::event::Counts;
use crate::drive::layout::{self, Shared};
use crate::drive::log;
mod read;

pub use read::stamp;

use crate::drive::record::{BLOCK_SIZE, Entry, MAX_BATCH_BYTES, Record, State, check_path, encode};
use crate::storage::DiskStorage;
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

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
    /// Leaf hash -> a held content block with those bytes.
    dedup: HashMap<[u8; 32], u64>,
    pending: Vec<Vec<u8>>,
    /// Leaf hashes of `pending`, computed once for both the dedup lookup and the tree.
    leaves: Vec<crypto::Hash>,
    /// Parsed ignore files by directory, for targeted scans (cleared by every full scan).
    ignores: HashMap<std::path::PathBuf, ignore::gitignore::Gitignore>,
    /// Paths to re-read on the next scan even if size and mtime look unchanged: serving found
    /// bytes in them that no longer match their hash.
    forced: BTreeSet<String>,
}

impl Importer {
    /// An importer for the drive in `replicator` (`meta` and `content` feeds), whose current
    /// files are registered in `layout`. Builds the dedup index from the held blocks.
    pub fn new(
        replicator: &mut Replicator<DiskStorage>,
        meta: FeedId,
        content: FeedId,
        layout: Shared,
    ) -> Result<Self, FeedError> {
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
            dedup,
            pending: Vec::new(),
            leaves: Vec::new(),
            ignores: HashMap::new(),
            forced: BTreeSet::new(),
        })
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
        let root = layout::lock(&self.layout).root().to_path_buf();
        self.ignores.clear();
        let mut report = ScanReport::default();
        let mut records = Vec::new();
        let mut seen = BTreeSet::new();
        let start_len = r.feed(self.content).len();
        let walker = ignore::WalkBuilder::new(&root)
            .standard_filters(false)
            .add_custom_ignore_filename(IGNORE_FILE)
            .follow_links(false)
            .sort_by_file_name(|a, b| a.cmp(b))
            // Our state, and that of any drive nested inside (its secret key among it).
            .filter_entry(|e| e.file_name() != STATE_DIR)
            .build();
        for entry in walker {
            // One unreadable directory or bad ignore file must not stop the rest of the folder.
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    report.skipped.push((root.clone(), e.to_string()));
                    continue;
                }
            };
            if entry.depth() == 0 {
                continue;
            }
            let Ok(rel) = entry.path().strip_prefix(&root) else {
                continue;
            };
            let Some(rel) = rel.to_str().map(str::to_string) else {
                report
                    .unshared
                    .push((entry.path().to_path_buf(), "name is not UTF-8".into()));
                continue;
            };
            if check_path(&rel).is_err() {
                report
                    .unshared
                    .push((entry.path().to_path_buf(), "unusable name".into()));
                continue;
            }
            let Some(ft) = entry.file_type() else {
                continue;
            };
            if ft.is_dir() {
                seen.insert(rel.clone());
                if state.entries.get(&rel) != Some(&Entry::Dir) {
                    records.push(Record::Put {
                        path: rel,
                        entry: Entry::Dir,
                    });
                    report.dirs += 1;
                }
                continue;
            }
            if !ft.is_file() {
                report.unshared.push((
                    entry.path().to_path_buf(),
                    "not a regular file or directory".into(),
                ));
                continue;
            }
            let Ok(meta) = entry.metadata() else {
                continue; // vanished since the walk listed it
            };
            let (secs, nanos) = stamp(&meta);
            let mode = meta.permissions().mode() & 0o777;
            if let Some(Entry::File(f)) = state.entries.get(&rel)
                && f.size == meta.len()
                && f.mtime_secs == secs
                && f.mtime_nanos == nanos
                && f.mode == mode
                && !self.forced.contains(&rel)
            {
                seen.insert(rel);
                continue;
            }
            let imported = match self.import_file(r, entry.path(), &rel, mode) {
                Err(ScanError::Read(_, e)) => {
                    report
                        .skipped
                        .push((entry.path().to_path_buf(), e.to_string()));
                    seen.insert(rel);
                    continue;
                }
                other => other?,
            };
            match imported {
                Some(info) => {
                    seen.insert(rel.clone());
                    report.files += 1;
                    report.bytes += info.size;
                    records.push(Record::Put {
                        path: rel,
                        entry: Entry::File(info),
                    });
                }
                None => {
                    report.unstable += 1;
                    // Keep the previous record until the file settles.
                    seen.insert(rel);
                }
            }
        }
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
            if state.entries.get(&p) == Some(&Entry::Dir) {
                removed_dirs.push(p.clone());
            }
            records.push(Record::Remove { path: p });
            report.removed += 1;
        }
        report.versions = self.commit(r, state, records)?;
        Ok(report)
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
        let root = layout::lock(&self.layout).root().to_path_buf();
        let mut report = ScanReport::default();
        let mut records = Vec::new();
        let start_len = r.feed(self.content).len();
        for abs in paths {
            let Ok(rel_path) = abs.strip_prefix(&root) else {
                continue;
            };
            if rel_path.components().any(|c| c.as_os_str() == STATE_DIR) {
                continue; // any drive's state
            }
            let Some(rel) = rel_path.to_str().map(str::to_string) else {
                return Ok(None);
            };
            if rel.is_empty() || check_path(&rel).is_err() {
                return Ok(None);
            }
            if rel_path.file_name().is_some_and(|n| n == IGNORE_FILE) {
                return Ok(None); // the rules changed: everything may be in or out now
            }
            // The parent must be a recorded directory (or the root).
            if let Some(parent) = rel.rsplit_once('/').map(|(p, _)| p)
                && state.entries.get(parent) != Some(&Entry::Dir)
            {
                return Ok(None);
            }
            if self.ignored(&root, rel_path) {
                continue;
            }
            match std::fs::symlink_metadata(abs) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => match state.entries.get(&rel) {
                    Some(Entry::File(_)) => {
                        records.push(Record::Remove { path: rel });
                        report.removed += 1;
                    }
                    Some(Entry::Dir) => return Ok(None),
                    None => {}
                },
                Err(e) => return Err(ScanError::Read(rel, e)),
                Ok(meta) if meta.is_file() => {
                    let (secs, nanos) = stamp(&meta);
                    let mode = meta.permissions().mode() & 0o777;
                    match state.entries.get(&rel) {
                        Some(Entry::File(f))
                            if f.size == meta.len()
                                && f.mtime_secs == secs
                                && f.mtime_nanos == nanos
                                && f.mode == mode
                                && !self.forced.contains(&rel) =>
                        {
                            continue;
                        }
                        Some(Entry::Dir) => return Ok(None),
                        _ => {}
                    }
                    let imported = match self.import_file(r, abs, &rel, mode) {
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
                Ok(meta) if meta.is_dir() => {
                    if state.entries.get(&rel) != Some(&Entry::Dir) {
                        return Ok(None);
                    }
                }
                Ok(_) => {} // symlinks and specials are not shared
            }
        }
        self.flush(r)?;
        report.new_blocks = r.feed(self.content).len() - start_len;
        report.versions = self.commit(r, state, records)?;
        Ok(Some(report))
    }

    /// Whether `rel` is excluded by a `.feedsyncignore` in the root or any directory above it.
    fn ignored(&mut self, root: &Path, rel: &Path) -> bool {
        let mut dir = root.to_path_buf();
        let mut ancestors = vec![dir.clone()];
        if let Some(parent) = rel.parent() {
            for c in parent.components() {
                dir.push(c);
                ancestors.push(dir.clone());
            }
        }
        for d in ancestors {
            let m = self.ignores.entry(d.clone()).or_insert_with(|| {
                let (g, _) = ignore::gitignore::Gitignore::new(d.join(IGNORE_FILE));
                g
            });
            if m.matched_path_or_any_parents(root.join(rel), false)
                .is_ignore()
            {
                return true;
            }
        }
        false
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
        let mut batches: Vec<Vec<Record>> = vec![Vec::new()];
        let mut size = 0;
        for rec in records {
            let n = encode(std::slice::from_ref(&rec)).len();
            if size + n > MAX_BATCH_BYTES && !batches.last().expect("non-empty").is_empty() {
                batches.push(Vec::new());
                size = 0;
            }
            size += n;
            batches.last_mut().expect("non-empty").push(rec);
        }
        let time = Record::now();
        for b in &mut batches {
            b.insert(0, time.clone());
        }
        let blocks: Vec<Vec<u8>> = batches.iter().map(|b| encode(b)).collect();
        r.append(self.meta, &blocks)?;
        let mut orphans = BTreeSet::new();
        {
            let mut l = layout::lock(&self.layout);
            for batch in &batches {
                for rec in batch {
                    match rec {
                        Record::Put { path, .. } | Record::Remove { path } => {
                            // The path and anything under it leave the layout; a new file
                            // version comes back in, referencing what it reuses.
                            let mut ids: Vec<_> = l.slot_at(path).into_iter().collect();
                            if state.entries.get(path) == Some(&Entry::Dir) {
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
                        Record::Init { .. } | Record::Time { .. } => {}
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
        // Consecutive orphans go in one Unhave.
        let orphans: Vec<u64> = orphans.into_iter().collect();
        let mut i = 0;
        while i < orphans.len() {
            let mut j = i + 1;
            while j < orphans.len() && orphans[j] == orphans[j - 1] + 1 {
                j += 1;
            }
            r.forget(self.content, orphans[i]..orphans[j - 1] + 1)?;
            i = j;
        }
        self.dedup.retain(|_, b| orphans.binary_search(b).is_err());
        Ok(versions)
    }
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
