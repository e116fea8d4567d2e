//! A shared folder ("drive"): a metadata feed of file records and a content feed of blocks
//! whose bytes live in the folder's own files.
//!
//! ```text
//! DIR/.feedsync/meta/      the metadata feed's store (records; the writer's secret key)
//! DIR/.feedsync/content/   the content feed's store, without a data file: blocks are in DIR
//! DIR/.feedsync/tmp/       files being reassembled (reader), renamed into place when verified
//! DIR/.feedsync/applied    the version the folder was last brought to (reader)
//! DIR/.feedsync/status.json  progress, rewritten while a node runs (for `feedsync status`)
//! ```
//!
//! The [`DriveApp`] rides on the synchronizer loop ([`crate::sync::App`]): a writer scans the
//! folder at start, then on change notifications (notify, debounced) and periodically as a
//! safety net; a reader applies new metadata as it is verified, fetches exactly the blocks of
//! the files it lacks, publishes each file atomically when complete, and removes what the
//! writer removed.

pub mod import;
pub mod layout;
pub mod record;

use crate::core::Feed;
use crate::core::bitfield::Bitfield;
use crate::core::replicator::{Event, FeedId, Replicator};
use crate::storage::DiskStorage;
use crate::sync::App;
use ed25519_dalek::SigningKey;
use import::Importer;
use layout::{FolderBlocks, PublishError, Shared};
use record::{BLOCK_SIZE, Entry, Record, State};
use serde::Serialize;
use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The state directory inside a shared folder; never imported, never written by a record.
pub const STATE_DIR: &str = ".feedsync";

/// How a drive failed to open or run.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// The folder is not a drive (no state directory).
    #[error("{0} is not a shared or cloned folder (no {STATE_DIR} in it)")]
    NotADrive(PathBuf),
    /// A URL that does not parse.
    #[error("not a feedsync URL (expected feedsync://<64 hex digits>): {0}")]
    BadUrl(String),
    /// The folder belongs to another drive.
    #[error("{0} already holds another drive ({1})")]
    OtherDrive(PathBuf, String),
    /// Feed or storage failure.
    #[error(transparent)]
    Feed(#[from] crate::core::FeedError),
    /// File system failure.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// Import failure.
    #[error(transparent)]
    Scan(#[from] import::ScanError),
}

/// The URL of a drive: its metadata feed's public key.
pub fn url(key: &[u8; 32]) -> String {
    format!("feedsync://{}", hex(key))
}

/// Parses `feedsync://<hex>` (or bare hex) into a public key.
pub fn parse_url(s: &str) -> Result<[u8; 32], DriveError> {
    let h = s.strip_prefix("feedsync://").unwrap_or(s);
    let bad = || DriveError::BadUrl(s.to_string());
    if h.len() != 64 {
        return Err(bad());
    }
    let mut key = [0u8; 32];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(h.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    Ok(key)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The content feed's signing key, derived from the metadata feed's: one secret to keep, and
/// nobody without it can write either feed.
fn content_key(meta_seed: &[u8; 32]) -> SigningKey {
    SigningKey::from_bytes(&blake3::derive_key(
        "feedsync 2026-11 drive content feed key",
        meta_seed,
    ))
}

/// An opened drive, before it runs.
pub struct Drive {
    /// The folder.
    pub root: PathBuf,
    /// `root/.feedsync`.
    pub state_dir: PathBuf,
    /// The metadata feed.
    pub meta: Feed<DiskStorage>,
    /// The content feed (a fresh clone learns its key from metadata block 0).
    pub content: Option<Feed<DiskStorage>>,
    /// Where content blocks live.
    pub layout: Shared,
    /// This node writes the drive.
    pub writer: bool,
}

impl Drive {
    /// Shares `root`: opens its drive, or creates one (new keys) if it has none.
    pub fn share(root: &Path) -> Result<Self, DriveError> {
        let root = fs::canonicalize(root)?;
        let state_dir = root.join(STATE_DIR);
        if state_dir.join("meta").join("header").exists() {
            return Self::open(&root);
        }
        fs::create_dir_all(&state_dir)?;
        fs::set_permissions(&state_dir, fs::Permissions::from_mode(0o700))?;
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| io::Error::other(e.to_string()))?;
        let key = SigningKey::from_bytes(&seed);
        let ckey = content_key(&seed);
        let layout = layout::Layout::new(root.clone(), state_dir.join("tmp"), true);
        let mut meta = Feed::create(DiskStorage::open(state_dir.join("meta"))?, key)?;
        let content = Feed::create(
            DiskStorage::open_with_blocks(
                state_dir.join("content"),
                Box::new(FolderBlocks(layout.clone())),
            )?,
            ckey.clone(),
        )?;
        meta.append(&record::encode(&[Record::Init {
            content_key: ckey.verifying_key().to_bytes(),
            block_size: BLOCK_SIZE as u32,
        }]))?;
        meta.sync()?;
        Ok(Self {
            root,
            state_dir,
            meta,
            content: Some(content),
            layout,
            writer: true,
        })
    }

    /// Prepares `root` to clone the drive `key` (or resumes a clone of it already there).
    pub fn clone_into(root: &Path, key: [u8; 32]) -> Result<Self, DriveError> {
        fs::create_dir_all(root)?;
        let root = fs::canonicalize(root)?;
        let state_dir = root.join(STATE_DIR);
        if state_dir.join("meta").join("header").exists() {
            let d = Self::open(&root)?;
            if d.meta.public_key() != key {
                return Err(DriveError::OtherDrive(root, url(&d.meta.public_key())));
            }
            return Ok(d);
        }
        fs::create_dir_all(&state_dir)?;
        fs::set_permissions(&state_dir, fs::Permissions::from_mode(0o700))?;
        let layout = layout::Layout::new(root.clone(), state_dir.join("tmp"), false);
        let meta = Feed::create_replica(DiskStorage::open(state_dir.join("meta"))?, key)?;
        Ok(Self {
            root,
            state_dir,
            meta,
            content: None,
            layout,
            writer: false,
        })
    }

    /// Opens the drive already in `root`.
    pub fn open(root: &Path) -> Result<Self, DriveError> {
        let root = fs::canonicalize(root)?;
        let state_dir = root.join(STATE_DIR);
        if !state_dir.join("meta").join("header").exists() {
            return Err(DriveError::NotADrive(root));
        }
        let meta = Feed::open(DiskStorage::open(state_dir.join("meta"))?)?;
        let writer = meta.is_writable();
        let layout = layout::Layout::new(root.clone(), state_dir.join("tmp"), writer);
        let content = if state_dir.join("content").join("header").exists() {
            Some(Feed::open(DiskStorage::open_with_blocks(
                state_dir.join("content"),
                Box::new(FolderBlocks(layout.clone())),
            )?)?)
        } else {
            None
        };
        Ok(Self {
            root,
            state_dir,
            meta,
            content,
            layout,
            writer,
        })
    }

    /// The drive's URL.
    pub fn url(&self) -> String {
        url(&self.meta.public_key())
    }

    /// Replays metadata blocks `0..upto` (those held, in order) into a state.
    pub fn replay(meta: &mut Feed<DiskStorage>, upto: u64) -> Result<State, DriveError> {
        let mut state = State::default();
        for i in 0..upto.min(meta.len()) {
            if !meta.has(i) {
                break;
            }
            let block = meta.get(i)?;
            match record::decode(i, &block) {
                Ok(recs) => state.apply(recs),
                Err(e) => return Err(io::Error::other(e.to_string()).into()),
            }
        }
        Ok(state)
    }

    /// Progress figures computed from the stores, for a folder no node is running on.
    pub fn offline_stats(mut self) -> Result<Stats, DriveError> {
        let full = Self::replay(&mut self.meta, u64::MAX)?;
        let applied = if self.writer {
            full.version
        } else {
            read_applied(&self.state_dir)
        };
        let (files_total, bytes_total) = full.totals();
        let (mut files_done, mut bytes_done) = (0, 0);
        for (path, e) in &full.entries {
            if let Entry::File(info) = e
                && fs::symlink_metadata(self.root.join(path)).is_ok_and(|m| {
                    m.is_file()
                        && m.len() == info.size
                        && import::stamp(&m) == (info.mtime_secs, info.mtime_nanos)
                })
            {
                files_done += 1;
                bytes_done += info.size;
            }
        }
        Ok(Stats {
            url: self.url(),
            role: if self.writer { "writer" } else { "reader" },
            version: applied,
            latest_version: self.meta.len(),
            files_total,
            files_done,
            bytes_total,
            bytes_done,
            peers: 0,
            received: 0,
            rate: 0,
            errors: Vec::new(),
        })
    }

    /// One line per version: its number and what it changed.
    pub fn log(&mut self) -> Result<Vec<String>, DriveError> {
        let mut lines = Vec::new();
        for i in 0..self.meta.len() {
            if !self.meta.has(i) {
                lines.push(format!("version {}: not fetched", i + 1));
                continue;
            }
            let block = self.meta.get(i)?;
            let recs = record::decode(i, &block).map_err(|e| io::Error::other(e.to_string()))?;
            let mut parts = Vec::new();
            for r in &recs {
                parts.push(match r {
                    Record::Init { .. } => "created".to_string(),
                    Record::Put {
                        path,
                        entry: Entry::Dir,
                    } => format!("+dir {path}"),
                    Record::Put {
                        path,
                        entry: Entry::File(f),
                    } => format!("+{path} ({} bytes)", f.size),
                    Record::Remove { path } => format!("-{path}"),
                });
            }
            let shown = parts.len().min(5);
            let more = if parts.len() > shown {
                format!(" ... and {} more", parts.len() - shown)
            } else {
                String::new()
            };
            lines.push(format!(
                "version {}: {}{more}",
                i + 1,
                parts[..shown].join(", ")
            ));
        }
        Ok(lines)
    }

    /// Turns the drive into the feeds and the app to run them with.
    pub fn into_app(
        self,
        options: AppOptions,
    ) -> Result<(crate::sync::Feeds, DriveApp), DriveError> {
        self.into_app_at(options, 0)
    }

    /// [`Drive::into_app`] for a node that serves several drives: this drive's feeds will be
    /// added after `first` others, so its feed ids start there.
    pub fn into_app_at(
        mut self,
        options: AppOptions,
        first: FeedId,
    ) -> Result<(crate::sync::Feeds, DriveApp), DriveError> {
        let full = Self::replay(&mut self.meta, u64::MAX)?;
        let applied = if self.writer {
            full.version
        } else {
            read_applied(&self.state_dir)
        };
        let previous = if applied >= full.version {
            full.clone()
        } else {
            Self::replay(&mut self.meta, applied)?
        };
        {
            // Files in place: as the newest version has them (a clone killed after publishing
            // but before recording the version it reached), or as the previous one left them.
            // Size and mtime identify them, as the writer's scan does; every block read from
            // them is checked against its leaf hash before it is served or reused.
            let mut l = layout::lock(&self.layout);
            for (path, e) in full.entries.iter().chain(&previous.entries) {
                if l.slot_at(path).is_some() {
                    continue;
                }
                if let Entry::File(info) = e {
                    let on_disk = fs::symlink_metadata(self.root.join(path)).ok();
                    let matches = on_disk.is_some_and(|m| {
                        m.is_file()
                            && m.len() == info.size
                            && import::stamp(&m) == (info.mtime_secs, info.mtime_nanos)
                    });
                    if matches || self.writer {
                        l.add_live(path.clone(), info.clone());
                    }
                }
            }
        }
        let mut feeds = vec![(self.meta, !self.writer)];
        let content = self.content.is_some().then_some(first + 1);
        if let Some(c) = self.content {
            feeds.push((c, !self.writer));
        }
        let app = DriveApp {
            root: self.root,
            state_dir: self.state_dir,
            writer: self.writer,
            layout: self.layout,
            meta: first,
            content,
            state: full,
            previous,
            importer: None,
            options,
            watch: None,
            last_scan: Instant::now(),
            change_seen: None,
            errors: Vec::new(),
            dirty_since: None,
            last_status: Instant::now() - Duration::from_secs(10),
            done: false,
            stats: Stats::default(),
            last_received: 0,
            rate: 0,
            changed: Default::default(),
        };
        Ok((feeds, app))
    }
}

fn read_applied(state_dir: &Path) -> u64 {
    fs::read_to_string(state_dir.join("applied"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes)?;
    fs::rename(tmp, path)
}

/// How a [`DriveApp`] behaves.
#[derive(Debug, Clone)]
pub struct AppOptions {
    /// Writer: watch the folder for changes (and rescan every `rescan_interval`).
    pub follow: bool,
    /// Writer: full rescan period, the safety net under change notifications.
    pub rescan_interval: Duration,
    /// Writer: quiet time after a change notification before scanning.
    pub debounce: Duration,
    /// Print progress to stderr at most this often (`None`: quiet).
    pub progress: Option<Duration>,
    /// Stderr is a terminal: progress redraws one line instead of printing many.
    pub terminal: bool,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            follow: true,
            rescan_interval: Duration::from_secs(30),
            debounce: Duration::from_millis(20),
            progress: None,
            terminal: false,
        }
    }
}

/// Progress figures, also written to `status.json`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Stats {
    /// The drive's URL.
    pub url: String,
    /// `writer` or `reader`.
    pub role: &'static str,
    /// Version (metadata blocks) applied to the folder.
    pub version: u64,
    /// Newest version known.
    pub latest_version: u64,
    /// Files in the newest version.
    pub files_total: u64,
    /// Of those, in place.
    pub files_done: u64,
    /// Bytes in the newest version.
    pub bytes_total: u64,
    /// Of those, in place.
    pub bytes_done: u64,
    /// Connected peers.
    pub peers: u64,
    /// Bytes of verified content received this session (counted in whole blocks).
    pub received: u64,
    /// Receive rate over the last second, bytes per second.
    pub rate: u64,
    /// Problems that need a person (unsafe paths, hash mismatches, disk errors).
    pub errors: Vec<String>,
}

/// The drive logic on the synchronizer loop; see the module docs.
pub struct DriveApp {
    root: PathBuf,
    state_dir: PathBuf,
    writer: bool,
    layout: Shared,
    meta: FeedId,
    content: Option<FeedId>,
    /// Newest verified state (writer: current).
    state: State,
    /// What the folder holds now (reader: the version last applied).
    previous: State,
    importer: Option<Importer>,
    options: AppOptions,
    watch: Option<(notify::RecommendedWatcher, crossbeam_channel::Receiver<()>)>,
    last_scan: Instant,
    change_seen: Option<Instant>,
    errors: Vec<String>,
    dirty_since: Option<Instant>,
    last_status: Instant,
    done: bool,
    stats: Stats,
    last_received: u64,
    rate: u64,
    /// Paths change notifications named since the last scan, and whether they overflowed.
    changed: ChangedPaths,
}

type ChangedPaths = std::sync::Arc<std::sync::Mutex<(BTreeSet<PathBuf>, bool)>>;

/// Paths remembered between two scans; more than this and the next scan is a full one.
const MAX_CHANGED_PATHS: usize = 4096;

impl DriveApp {
    /// Reports a problem once (it is retried; repeating it would drown the output) and keeps
    /// it for `status`.
    fn error(&mut self, e: String) {
        if self.errors.contains(&e) {
            return;
        }
        eprintln!("feedsync: {e}");
        if self.errors.len() < 100 {
            self.errors.push(e);
        }
    }

    fn start_watch(&mut self) {
        use notify::Watcher;
        let (tx, rx) = crossbeam_channel::bounded(1);
        let state_root = self.root.clone();
        let changed = self.changed.clone();
        let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            let mut c = changed.lock().unwrap_or_else(|p| p.into_inner());
            match ev {
                Ok(ev) => {
                    // Ours, or a nested drive's (judged below the root only).
                    let is_state = |p: &PathBuf| {
                        p.strip_prefix(&state_root).map_or(true, |rel| {
                            rel.components().any(|c| c.as_os_str() == STATE_DIR)
                        })
                    };
                    if matches!(ev.kind, notify::EventKind::Access(_))
                        || ev.paths.iter().all(is_state)
                    {
                        // Reads (our own scans and serving open files all the time) and our
                        // own state churning change nothing.
                        return;
                    }
                    if ev.need_rescan() || c.0.len() + ev.paths.len() > MAX_CHANGED_PATHS {
                        c.1 = true; // too much to track one by one: scan everything
                    } else {
                        c.0.extend(ev.paths.into_iter().filter(|p| !is_state(p)));
                    }
                }
                Err(_) => c.1 = true,
            }
            let _ = tx.try_send(()); // one pending wake-up is enough
        });
        match watcher {
            Ok(mut w) => match w.watch(&self.root, notify::RecursiveMode::Recursive) {
                Ok(()) => self.watch = Some((w, rx)),
                Err(e) => self.error(format!(
                    "watching {} failed ({e}); relying on rescans",
                    self.root.display()
                )),
            },
            Err(e) => self.error(format!("no file watcher ({e}); relying on rescans")),
        }
    }

    fn scan(&mut self, r: &mut Replicator<DiskStorage>, full: bool) {
        let Some(importer) = &mut self.importer else {
            return;
        };
        self.last_scan = Instant::now();
        let (paths, overflow) = {
            let mut c = self.changed.lock().unwrap_or_else(|p| p.into_inner());
            (std::mem::take(&mut c.0), std::mem::take(&mut c.1))
        };
        let targeted = if full || overflow || paths.is_empty() {
            Ok(None)
        } else {
            importer.scan_paths(r, &mut self.state, &paths)
        };
        let result = match targeted {
            Ok(Some(rep)) => Ok(rep),
            Ok(None) => importer.scan(r, &mut self.state),
            Err(e) => Err(e),
        };
        match result {
            Ok(rep) => {
                for e in &rep.skipped {
                    self.error(format!("not shared for now: {e}"));
                }
                if rep.unstable > 0 {
                    // Something is still being written: look again soon.
                    self.change_seen = Some(Instant::now());
                }
                if self.options.progress.is_some() && (rep.files + rep.removed + rep.dirs) > 0 {
                    eprintln!(
                        "imported version {}: {} files ({} bytes, {} new blocks), {} dirs, {} removed, in {} ms",
                        self.state.version,
                        rep.files,
                        rep.bytes,
                        rep.new_blocks,
                        rep.dirs,
                        rep.removed,
                        self.last_scan.elapsed().as_millis()
                    );
                }
            }
            Err(e) => self.error(e.to_string()),
        }
        self.previous = self.state.clone();
    }

    /// Reader: applies newly verified metadata blocks.
    fn apply_metadata(&mut self, r: &mut Replicator<DiskStorage>) {
        let mut changed = false;
        loop {
            let i = self.state.version;
            let feed = r.feed_mut(self.meta);
            if i >= feed.len() || !feed.has(i) {
                break;
            }
            let block = match feed.get(i) {
                Ok(b) => b,
                Err(e) => {
                    self.error(format!("reading metadata block {i}: {e}"));
                    return;
                }
            };
            match record::decode(i, &block) {
                Ok(recs) => {
                    self.state.apply(recs);
                    changed = true;
                }
                Err(e) => {
                    // A signed record we refuse: nothing of it is applied, and nothing after.
                    self.error(format!("refusing version {}: {e}", i + 1));
                    return;
                }
            }
        }
        if self.content.is_none()
            && let Some(key) = self.state.content_key
        {
            let store = DiskStorage::open_with_blocks(
                self.state_dir.join("content"),
                Box::new(FolderBlocks(self.layout.clone())),
            );
            match store
                .map_err(crate::core::FeedError::from)
                .and_then(|s| Feed::create_replica(s, key))
            {
                Ok(feed) => {
                    let id = r.add_feed(feed, true);
                    r.set_ordered(id, true);
                    self.content = Some(id);
                    changed = true;
                }
                Err(e) => {
                    self.error(format!("opening the content feed: {e}"));
                    return;
                }
            }
        }
        if changed {
            self.reconcile(r);
        }
    }

    /// Reader: brings the folder from `previous` towards `state`: removals first, then
    /// directories, then files (each fetched, or reused from blocks already here).
    fn reconcile(&mut self, r: &mut Replicator<DiskStorage>) {
        let Some(content) = self.content else {
            return;
        };
        let target_owned = self.state.entries.clone();
        let target = &target_owned;
        // 1. What went away or changed since the version the folder is at.
        let mut gone_files = Vec::new();
        let mut gone_dirs = Vec::new();
        for (path, old) in &self.previous.entries {
            if target.get(path) == Some(old) {
                continue;
            }
            match old {
                Entry::File(info) => gone_files.push((path.clone(), info.clone())),
                Entry::Dir => {
                    if !matches!(target.get(path), Some(Entry::Dir)) {
                        gone_dirs.push(path.clone());
                    }
                }
            }
        }
        // ... and files of versions in between that the newest no longer has (fetched or being
        // fetched before the folder settled): without this a clone would wait for them forever.
        {
            let l = layout::lock(&self.layout);
            for (id, s) in l.slots() {
                if l.slot_at(&s.path) != Some(id) {
                    continue; // kept readable until its replacement lands
                }
                let wanted = matches!(target.get(&s.path), Some(Entry::File(i)) if *i == s.info);
                if !wanted && !gone_files.iter().any(|(p, _)| *p == s.path) {
                    gone_files.push((s.path.clone(), s.info.clone()));
                }
            }
        }
        // 2. Files not in place yet become pending, and blocks already held here are copied in
        //    before anything is removed: a rename or copy reuses the old file's bytes.
        let mut to_fill = Vec::new();
        {
            let mut l = layout::lock(&self.layout);
            for (path, e) in target.iter() {
                let Entry::File(info) = e else { continue };
                if let Some(id) = l.slot_at(path)
                    && l.slot(id).is_some_and(|s| s.info == *info)
                {
                    continue;
                }
                let id = l.add_pending(path.clone(), info.clone());
                to_fill.push(id);
            }
        }
        for id in to_fill {
            self.fill_from_local(r, content, id);
        }
        let mut orphans = BTreeSet::new();
        {
            let mut l = layout::lock(&self.layout);
            for (path, info) in &gone_files {
                if matches!(target.get(path), Some(Entry::File(_))) {
                    // Replaced by a newer version: the old file stays readable until the new
                    // one is renamed over it (see `Layout::publish`).
                    continue;
                }
                // What we put there: the previous version's file, or the one the layout knows
                // is in place (a version in between, published before the folder settled).
                let mut ours = vec![info.clone()];
                if let Some(id) = l.slot_at(path) {
                    if let Some(s) = l.slot(id).filter(|s| s.pending.is_none()) {
                        ours.push(s.info.clone());
                    }
                    orphans.extend(l.remove(id));
                }
                // Delete only what we put there: a file the user changed is left alone.
                let p = self.root.join(path);
                if let Ok(m) = fs::symlink_metadata(&p)
                    && m.is_file()
                    && ours.iter().any(|info| {
                        m.len() == info.size
                            && import::stamp(&m) == (info.mtime_secs, info.mtime_nanos)
                    })
                {
                    let _ = fs::remove_file(&p);
                }
            }
            // Deepest first, and only if empty.
            gone_dirs.sort_by_key(|d| std::cmp::Reverse(d.len()));
            for d in &gone_dirs {
                let _ = fs::remove_dir(self.root.join(d));
            }
        }
        // 3. Removals (only what we put there), then 4. directories.
        for (path, e) in target.iter() {
            if matches!(e, Entry::Dir) {
                match layout::safe_target(&self.root, path) {
                    Ok(p) => {
                        if !p.is_dir()
                            && let Err(e) = fs::create_dir(&p)
                            && e.kind() != io::ErrorKind::AlreadyExists
                        {
                            self.errors.push(format!("{path}: {e}"));
                        }
                    }
                    Err(e) => self.errors.push(e.to_string()),
                }
            }
        }
        if !orphans.is_empty() {
            let l = layout::lock(&self.layout);
            let orphans: Vec<u64> = orphans.into_iter().filter(|b| !l.is_owned(*b)).collect();
            drop(l);
            for b in orphans {
                let _ = r.forget(content, b..b + 1);
            }
        }
        self.publish_ready(r);
        self.update_want(r);
    }

    /// Copies into pending slot `id` every block this node already holds, checking each
    /// against its verified leaf hash: first the slot's own temporary file (a restart's work),
    /// then any other file holding it.
    fn fill_from_local(&mut self, r: &mut Replicator<DiskStorage>, content: FeedId, id: u32) {
        let blocks = layout::lock(&self.layout).pending_blocks(id);
        let mut buf = vec![0u8; BLOCK_SIZE];
        for (b, written) in blocks {
            if written || !r.feed(content).has(b) {
                continue;
            }
            let Ok(leaf) = r.feed_mut(content).leaf_hash(b) else {
                continue;
            };
            let Ok((_, size)) = r.feed_mut(content).block_span(b) else {
                continue;
            };
            let buf = &mut buf[..size as usize];
            let mut l = layout::lock(&self.layout);
            if l.read_pending(id, b, buf).is_ok() && crate::core::crypto::leaf_hash(buf) == leaf {
                // Found at its first position; written again at every position (a kill may
                // have come between them).
                if let Err(e) = l.write_pending(id, b, buf) {
                    drop(l);
                    self.error(format!("writing a reused block: {e}"));
                }
                continue;
            }
            drop(l);
            match r.feed_mut(content).get(b) {
                Ok(data) => {
                    let mut fb = FolderBlocks(self.layout.clone());
                    if let Err(e) = crate::storage::BlockData::write(&mut fb, b, &data) {
                        self.error(format!("writing a reused block: {e}"));
                    }
                }
                Err(_) => {
                    // Held on paper, gone in fact (a file changed here): fetch it again.
                    let _ = r.forget(content, b..b + 1);
                }
            }
        }
    }

    fn update_want(&mut self, r: &mut Replicator<DiskStorage>) {
        let Some(content) = self.content else { return };
        let mut want = Bitfield::new();
        {
            let l = layout::lock(&self.layout);
            for (id, s) in l.slots() {
                if s.pending.is_some() {
                    for (b, written) in l.pending_blocks(id) {
                        if !written {
                            want.set(b, true);
                        }
                    }
                }
            }
        }
        r.set_want(content, Some(want));
    }

    fn publish_ready(&mut self, r: &mut Replicator<DiskStorage>) {
        let mut l = layout::lock(&self.layout);
        let ready = l.take_ready();
        if ready.is_empty() {
            return;
        }
        let mut errors = Vec::new();
        let mut orphans = Vec::new();
        for id in ready {
            match l.publish(id) {
                Ok(o) => orphans.extend(o),
                Err(PublishError::Gone | PublishError::Incomplete) => {}
                Err(e @ PublishError::HashMismatch(_)) => {
                    errors.push(e.to_string());
                    l.reset_pending(id);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        drop(l);
        for e in errors {
            self.error(e);
        }
        if let Some(content) = self.content {
            for b in orphans {
                let _ = r.forget(content, b..b + 1);
            }
        }
        self.dirty_since.get_or_insert_with(Instant::now);
    }

    /// Whether the folder is at the newest version: no file pending, everything applied.
    fn settled(&self) -> bool {
        layout::lock(&self.layout).pending_count() == 0
    }

    /// Syncs the filesystem (one call for a batch of published files) and records the
    /// version the folder is at.
    fn make_durable(&mut self, r: &Replicator<DiskStorage>) {
        if let Ok(f) = fs::File::open(&self.root) {
            let _ = rustix::fs::syncfs(&f);
        }
        if !self.writer && self.settled() && r.feed(self.meta).len() == self.state.version {
            self.previous = self.state.clone();
            let _ = write_atomic(
                &self.state_dir.join("applied"),
                self.state.version.to_string().as_bytes(),
            );
        }
        self.dirty_since = None;
    }

    fn refresh_stats(&mut self, r: &Replicator<DiskStorage>) {
        let (files_total, bytes_total) = self.state.totals();
        let (mut files_done, mut bytes_done) = (files_total, bytes_total);
        {
            let l = layout::lock(&self.layout);
            for (_, s) in l.slots() {
                if let Some(p) = &s.pending {
                    files_done = files_done.saturating_sub(1);
                    bytes_done =
                        bytes_done.saturating_sub(s.info.size.min(p.left * BLOCK_SIZE as u64));
                }
            }
        }
        self.stats = Stats {
            url: url(&r.feed(self.meta).public_key()),
            role: if self.writer { "writer" } else { "reader" },
            version: self.previous.version,
            latest_version: r.feed(self.meta).len(),
            files_total,
            files_done,
            bytes_total,
            bytes_done,
            peers: r.peers().count() as u64,
            received: self.stats.received,
            rate: self.rate,
            errors: self.errors.clone(),
        };
    }

    fn write_status(&mut self, r: &Replicator<DiskStorage>) {
        self.refresh_stats(r);
        if let Ok(json) = serde_json::to_vec_pretty(&self.stats) {
            let _ = write_atomic(&self.state_dir.join("status.json"), &json);
        }
    }
}

impl App for DriveApp {
    fn start(&mut self, r: &mut Replicator<DiskStorage>) {
        if self.writer {
            let content = self.content.expect("a writer opens its content feed");
            match Importer::new(r, self.meta, content, self.layout.clone()) {
                Ok(i) => self.importer = Some(i),
                Err(e) => self.error(e.to_string()),
            }
            if self.options.follow {
                self.start_watch();
            }
            self.scan(r, true);
        } else {
            // Metadata held from an earlier run: bring the folder up to it.
            if let Some(c) = self.content {
                r.set_ordered(c, true);
                self.reconcile(r);
            }
            self.apply_metadata(r);
        }
        self.write_status(r);
    }

    fn on_event(&mut self, r: &mut Replicator<DiskStorage>, event: &Event) {
        if self.writer {
            if let Event::DataChanged { feed, index } = event
                && Some(*feed) == self.content
            {
                // A file changed in a way its size and mtime did not show (or before the
                // watcher said so): re-read the files holding that block on the next scan.
                let paths = layout::lock(&self.layout).holders(*index);
                let mut c = self.changed.lock().unwrap_or_else(|p| p.into_inner());
                for p in paths {
                    c.0.insert(self.root.join(&p));
                    if let Some(i) = &mut self.importer {
                        i.force(p);
                    }
                }
                drop(c);
                self.change_seen.get_or_insert_with(Instant::now);
            }
            return;
        }
        match event {
            Event::Downloaded { feed, count, .. } if Some(*feed) == self.content => {
                self.stats.received += count * BLOCK_SIZE as u64;
                self.publish_ready(r);
            }
            Event::Downloaded { feed, .. } | Event::Upgraded { feed, .. } if *feed == self.meta => {
                self.apply_metadata(r);
            }
            Event::StorageError { feed, error }
                if *feed == self.meta || Some(*feed) == self.content =>
            {
                self.error(error.to_string())
            }
            _ => {}
        }
    }

    fn on_tick(&mut self, r: &mut Replicator<DiskStorage>) {
        let now = Instant::now();
        if self.writer && self.options.follow {
            let mut woke = false;
            if let Some((_, rx)) = &self.watch {
                while rx.try_recv().is_ok() {
                    woke = true;
                }
            }
            if woke {
                self.change_seen = Some(now);
            }
            let debounced = self
                .change_seen
                .is_some_and(|t| now.duration_since(t) >= self.options.debounce);
            let periodic = now.duration_since(self.last_scan) >= self.options.rescan_interval;
            if debounced || periodic {
                self.change_seen = None;
                self.scan(r, periodic);
            }
        }
        if self
            .dirty_since
            .is_some_and(|t| now.duration_since(t) >= Duration::from_millis(200))
        {
            self.make_durable(r);
        }
        if !self.done && !self.writer && self.is_done(r) {
            self.make_durable(r);
            self.done = true;
        }
        if now.duration_since(self.last_status) >= Duration::from_secs(1) {
            self.last_status = now;
            if !self.writer && layout::lock(&self.layout).pending_count() > 0 {
                // Files complete but not published (a full disk, say) are tried again.
                layout::lock(&self.layout).requeue_complete();
                self.publish_ready(r);
            }
            self.rate = self.stats.received.saturating_sub(self.last_received);
            self.last_received = self.stats.received;
            self.write_status(r);
            if self.options.progress.is_some() && !self.writer && self.stats.latest_version > 0 {
                let s = &self.stats;
                let rate = self.rate;
                let left = s.bytes_total - s.bytes_done;
                let eta = if rate > 0 {
                    format!("{}s", left.div_ceil(rate))
                } else {
                    "-".into()
                };
                let line = format!(
                    "files {}/{}  bytes {}/{}  {:.1} MB/s  eta {eta}  peers {}",
                    s.files_done,
                    s.files_total,
                    s.bytes_done,
                    s.bytes_total,
                    rate as f64 / 1e6,
                    s.peers
                );
                if self.options.terminal {
                    eprint!("\r\x1b[2K{line}");
                } else {
                    eprintln!("progress: {line}");
                }
            }
        }
    }

    fn is_done(&self, r: &Replicator<DiskStorage>) -> bool {
        if self.writer {
            return false;
        }
        let meta = r.feed(self.meta);
        !meta.is_empty()
            && r.is_complete(self.meta)
            && self.state.version == meta.len()
            && self.content.is_some()
            && self.settled()
    }

    fn shutdown(&mut self, r: &mut Replicator<DiskStorage>) -> io::Result<()> {
        if !self.writer {
            self.publish_ready(r);
        }
        self.make_durable(r);
        self.write_status(r);
        Ok(())
    }
}

/// Several drives on one node (the daemon): each event and tick goes to every drive, and each
/// drive acts only on its own feeds.
pub struct Drives(pub Vec<DriveApp>);

impl App for Drives {
    fn set_waker(&mut self, waker: crate::sync::Waker) {
        for d in &mut self.0 {
            d.set_waker(waker.clone());
        }
    }

    fn on_wake(&mut self, r: &mut Replicator<DiskStorage>) {
        for d in &mut self.0 {
            d.on_wake(r);
        }
    }

    fn start(&mut self, r: &mut Replicator<DiskStorage>) {
        for d in &mut self.0 {
            d.start(r);
        }
    }
    fn on_event(&mut self, r: &mut Replicator<DiskStorage>, event: &Event) {
        for d in &mut self.0 {
            d.on_event(r, event);
        }
    }
    fn on_tick(&mut self, r: &mut Replicator<DiskStorage>) {
        for d in &mut self.0 {
            d.on_tick(r);
        }
    }
    fn is_done(&self, r: &Replicator<DiskStorage>) -> bool {
        self.0.iter().all(|d| d.is_done(r))
    }
    fn shutdown(&mut self, r: &mut Replicator<DiskStorage>) -> io::Result<()> {
        let mut result = Ok(());
        for d in &mut self.0 {
            if let Err(e) = d.shutdown(r) {
                result = Err(e);
            }
        }
        result
    }
}
