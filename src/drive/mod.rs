//! A shared folder ("drive"): a metadata feed of file records and a content feed of blocks
//! whose bytes live in the folder's own files.
//!
//! ```text
//! DIR/.feedsync/meta/      the metadata feed's store (records; the writer's secret key)
//! DIR/.feedsync/content/   the content feed's store, without a data file: blocks are in DIR
//! DIR/**/.NAME.feedsync-*  files being reassembled (reader), hidden beside their destination,
//!                          renamed into place when verified and flushed (see `layout::publish`)
//! DIR/.feedsync/ledger     what the reader wrote, and the version the folder was last
//!                          brought to (reader; see [`ledger`]), with its journal
//! DIR/.feedsync/status.json  progress, rewritten when it changes (for `feedsync status`)
//! ```
//!
//! The folder and `.feedsync` are opened once, as directory handles, when a drive opens
//! ([`Drive::root_dir`], [`Drive::state_handle`]); `.feedsync` is used only if it is a directory
//! owned by us that no one else can write. Why, and what it stops: `dirs.rs`.
//!
//! The [`DriveApp`] rides on the synchronizer loop ([`crate::sync::App`]): a writer scans the
//! folder at start, then on change notifications (notify, debounced) and periodically as a
//! safety net; a reader applies new metadata as it is verified, fetches exactly the blocks of
//! the files it lacks, publishes each file atomically when complete, and removes what the
//! writer removed. It never prints: what it has to say goes out as [`DriveEvent`]s.
//!
//! # Layout
//! - this file: [`Drive`] (share, clone, open, discard, log) and [`DriveError`].
//! - [`record`]: the records of the metadata feed, path rules; `state.rs`: the replayed
//!   [`State`] and the [`Limits`] a version must stay within.
//! - [`import`]: the writer's scan: files to records and deduplicated content blocks.
//! - [`layout`]: where content blocks live (the block map, the handle cache, reassembly,
//!   publish); the content feed's block storage.
//! - [`reconcile`]: the reader's pure plan from one version to another.
//! - `app.rs`: [`DriveApp`] on the loop (what both roles share), [`Drives`] for the daemon.
//! - `writer.rs` / `reader/`: the two sides of a running drive.
//! - [`ledger`], `guard.rs`, [`conflict`]: what a reader wrote, the checks before it replaces
//!   or deletes anything on disk, conflict copies; [`perms`]: permission bits and the umask.
//! - [`event`]: [`DriveEvent`], [`DriveProblem`], [`Stats`].
//! - [`log`]: a drive's history for `feedsync log`.

mod app;
pub mod conflict;
pub mod devices;
mod dirs;
pub mod event;
mod guard;
pub mod import;
pub mod layout;
pub mod ledger;
pub mod log;
pub mod merge;
pub mod perms;
mod reader;
pub mod reconcile;
pub mod record;
mod state;
mod transfer;
mod twoway;
mod writer;

pub use app::{AppOptions, DriveApp, Drives};
pub use event::{DriveEvent, DriveProblem, Stats};
pub use log::{Change, LogEntry};
pub use record::Limits;

use crate::core::Feed;
use crate::core::replicator::FeedId;
use crate::fsio::{Dir, FileIo, Kind};
use crate::storage::DiskStorage;
use ed25519_dalek::SigningKey;
use layout::{FolderBlocks, Shared};
use record::{BLOCK_SIZE, Entry, Record, State};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The state directory inside a shared folder; never imported, never written by a record.
pub const STATE_DIR: &str = ".feedsync";

/// How a drive failed to open or run. Each names the path and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// The folder to share, sync or read does not exist (or cannot be reached).
    #[error("{} does not exist ({error})", path.display())]
    Missing {
        /// The path given.
        path: PathBuf,
        /// What the system said.
        #[source]
        error: io::Error,
    },
    /// A clone into a folder that already holds files (other than this drive's own state):
    /// refused unless the user asks to adopt them ([`Drive::clone_adopting`]), since a
    /// writer's record must never land on a file the user has (`clone URL ~` and a record
    /// `.ssh/authorized_keys`).
    #[error(
        "{} is not empty; clone into a new or empty folder, or pass --adopt to sync into it (identical files are kept, others renamed to conflict copies)",
        .0.display()
    )]
    NotEmpty(PathBuf),
    /// A folder was expected and a file (or something else) is there.
    #[error("{} is a file, not a folder; give a folder (a new path is created for a clone)", .0.display())]
    NotAFolder(PathBuf),
    /// The folder is not a drive (no state directory).
    #[error("{} is not a shared or cloned folder (no {STATE_DIR} in it)", .0.display())]
    NotADrive(PathBuf),
    /// A URL that does not parse.
    #[error("not a feedsync URL (expected feedsync://<64 hex digits>): {0}")]
    BadUrl(String),
    /// The folder already is a clone (or the share) of another drive.
    #[error(
        "{} is already a clone of {url}; remove {}/{STATE_DIR} to clone another drive into it, or choose another folder",
        path.display(), path.display()
    )]
    OtherDrive {
        /// The folder.
        path: PathBuf,
        /// The URL of the drive it holds.
        url: String,
    },
    /// The state directory is not ours alone: a symlink, not a directory, owned by another
    /// user, or writable by group or others (whoever can write it could redirect our writes).
    #[error(
        "{}: not using it as the state directory: {why}; it must be a directory owned by the user feedsync runs as and writable by no one else (fix its owner and mode, or move it away)",
        path.display()
    )]
    UnsafeState {
        /// The state directory.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// [`Drive::discard`] on the writer: its state holds the only copy of the secret key.
    #[error("{} is shared from here (it holds the writer's key); not discarding it", .0.display())]
    WriterState(PathBuf),
    /// A version held here does not decode (the store is damaged).
    #[error("version {0}: {1}")]
    Record(u64, #[source] record::RecordError),
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

/// What a device does with a two-way folder (#13), as Syncthing users know it. Kept in the
/// state directory (`kind`), so a restarted node keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FolderKind {
    /// Edits go out, other devices' edits come in (the default).
    #[default]
    SendReceive,
    /// Other devices' edits come in; this device's are never sent (a local edit a new version
    /// would replace is kept as a conflict copy, as on a clone).
    ReceiveOnly,
    /// This device's edits go out; other devices' edits are never applied here. Its records
    /// cite nothing of other devices, so an edit elsewhere to a file it also changed is a
    /// conflict every device resolves alike.
    SendOnly,
}

impl std::str::FromStr for FolderKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "send-receive" => Ok(Self::SendReceive),
            "receive-only" => Ok(Self::ReceiveOnly),
            "send-only" => Ok(Self::SendOnly),
            other => Err(format!(
                "not a folder kind: {other:?} (send-receive, receive-only or send-only)"
            )),
        }
    }
}

impl std::fmt::Display for FolderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::SendReceive => "send-receive",
            Self::ReceiveOnly => "receive-only",
            Self::SendOnly => "send-only",
        })
    }
}

/// The state file that keeps a folder's [`FolderKind`].
const KIND_FILE: &str = "kind";

/// The URL of a drive: its metadata feed's public key.
pub fn url(key: &[u8; 32]) -> String {
    format!("feedsync://{}", crate::util::hex(key))
}

/// Parses `feedsync://<hex>` (or bare hex) into a public key.
pub fn parse_url(s: &str) -> Result<[u8; 32], DriveError> {
    let h = s.strip_prefix("feedsync://").unwrap_or(s);
    let bad = || DriveError::BadUrl(s.to_string());
    let key = crate::util::parse_hex32(h).ok_or_else(bad)?;
    // A mistyped key is refused here, not later as a "corrupt store".
    ed25519_dalek::VerifyingKey::from_bytes(&key).map_err(|_| bad())?;
    Ok(key)
}

/// The content feed's signing key, derived from the metadata feed's: one secret to keep, and
/// nobody without it can write either feed.
fn content_key(meta_seed: &[u8; 32]) -> SigningKey {
    SigningKey::from_bytes(&blake3::derive_key(
        "feedsync 2026-11 drive content feed key",
        meta_seed,
    ))
}

/// `root` made absolute, or why not in words that name it.
fn existing_folder(root: &Path) -> Result<PathBuf, DriveError> {
    let abs = fs::canonicalize(root).map_err(|e| DriveError::Missing {
        path: root.to_path_buf(),
        error: e,
    })?;
    if !abs.is_dir() {
        return Err(DriveError::NotAFolder(root.to_path_buf()));
    }
    Ok(abs)
}

/// An opened drive, before it runs.
pub struct Drive {
    /// The folder.
    pub root: PathBuf,
    /// `root/.feedsync` (for messages and the stores; see `dirs.rs`).
    pub state_dir: PathBuf,
    /// The folder, opened once: everything read from it is resolved beneath this handle.
    pub root_dir: Arc<dyn Dir>,
    /// The state directory, opened once through `root_dir` and checked to be ours alone
    /// (a directory owned by our uid, writable by no one else): state files are written
    /// through it, so a `.feedsync` replaced later redirects nothing.
    pub state_handle: Arc<dyn Dir>,
    /// The feed stores' locks, held as long as the stores are used (then by the app).
    locks: Vec<Box<dyn FileIo>>,
    /// The metadata feed.
    pub meta: Feed<DiskStorage>,
    /// The content feed (a fresh clone learns its key from metadata block 0).
    pub content: Option<Feed<DiskStorage>>,
    /// Where content blocks live.
    pub layout: Shared,
    /// This node writes the drive.
    pub writer: bool,
    /// [`Drive::clone_into`] created the folder itself (so [`Drive::discard`] may remove it).
    created_root: bool,
}

impl Drive {
    /// Shares `root`: opens its drive, or creates one (new keys) if it has none.
    pub fn share(root: &Path) -> Result<Self, DriveError> {
        let root = existing_folder(root)?;
        let state_dir = root.join(STATE_DIR);
        let root_dir = dirs::open_folder(&root)?;
        if root_dir.metadata(STATE_DIR)?.is_some() {
            // Checked before anything in it is believed (a planted `meta/header`, say).
            let state = dirs::open_state(&*root_dir, &root, false)?;
            if state.metadata("meta/header")?.is_some() {
                return Self::open(&root);
            }
        }
        let state_handle = dirs::open_state(&*root_dir, &root, true)?;
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| io::Error::other(e.to_string()))?;
        let key = SigningKey::from_bytes(&seed);
        let ckey = content_key(&seed);
        let layout = layout::Layout::new(root_dir.clone(), root.clone(), true);
        let (meta_store, meta_lock) = dirs::open_store(&*state_handle, &root, "meta", true, None)?;
        let mut meta = Feed::create(meta_store, key)?;
        let blocks = Box::new(FolderBlocks::new(layout.clone()));
        let (content_store, content_lock) =
            dirs::open_store(&*state_handle, &root, "content", true, Some(blocks))?;
        let content = Feed::create(content_store, ckey.clone())?;
        meta.append(&record::encode(&[
            Record::Init {
                content_key: ckey.verifying_key().to_bytes(),
                block_size: BLOCK_SIZE as u32,
            },
            Record::now(),
        ]))?;
        meta.sync()?;
        Ok(Self {
            root,
            state_dir,
            root_dir,
            state_handle,
            locks: vec![meta_lock, content_lock],
            meta,
            content: Some(content),
            layout,
            writer: true,
            created_root: false,
        })
    }

    /// Prepares `root` to clone the drive `key` (or resumes a clone of it already there).
    /// The folder is created if missing; an existing one must be empty but for this drive's
    /// own state ([`DriveError::NotEmpty`]; see [`Drive::clone_adopting`]). A store left by an
    /// earlier clone that never received a verified block (a wrong URL, say) is replaced; one
    /// that holds another drive's data is refused ([`DriveError::OtherDrive`]).
    pub fn clone_into(root: &Path, key: [u8; 32]) -> Result<Self, DriveError> {
        Self::clone_with(root, key, false)
    }

    /// [`Drive::clone_into`] a folder that may already hold files (`clone --adopt`): a file
    /// identical to the drive's (same size and whole-file hash) is kept as is and not fetched;
    /// any other file at a path the drive writes is first renamed to a conflict copy
    /// (`NAME.sync-conflict-YYYYMMDD-HHMMSS.EXT`) and reported; files the drive does not name
    /// are left alone.
    pub fn clone_adopting(root: &Path, key: [u8; 32]) -> Result<Self, DriveError> {
        Self::clone_with(root, key, true)
    }

    /// `join` (#13): a clone of the folder `key` that also has a device of its own — its own
    /// metadata and content feeds, made once and kept (see [`devices`]). Returns the drive
    /// and this device's id. Until a member allows it, the device receives like a clone; see
    /// `notes/two-way.md`.
    pub fn join(root: &Path, key: [u8; 32], adopt: bool) -> Result<(Self, [u8; 32]), DriveError> {
        let d = Self::clone_with(root, key, adopt)?;
        if d.writer {
            // The founder's own folder: it is a device already, the founder.
            return Ok((d, key));
        }
        let id = devices::ensure_device(&*d.state_handle, &d.root)?;
        if d.content.is_some() {
            // A clone joined later: its content store is the founder's, not this device's
            // tag 0 (see `Drive::open`). Opened again as a device's.
            let root = d.root.clone();
            drop(d);
            return Ok((Self::open(&root)?, id));
        }
        Ok((d, id))
    }

    fn clone_with(root: &Path, key: [u8; 32], adopt: bool) -> Result<Self, DriveError> {
        let created_root = match fs::symlink_metadata(root) {
            Ok(m) if m.is_dir() => false,
            Ok(m) if m.file_type().is_symlink() && root.is_dir() => false,
            Ok(_) => return Err(DriveError::NotAFolder(root.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(root)?;
                true
            }
            Err(e) => {
                return Err(DriveError::Missing {
                    path: root.to_path_buf(),
                    error: e,
                });
            }
        };
        let root = existing_folder(root)?;
        let state_dir = root.join(STATE_DIR);
        if state_dir.join("meta").join("header").exists() {
            let d = Self::open(&root)?;
            if d.meta.public_key() == key {
                return Ok(Self { created_root, ..d });
            }
            let verified = d.meta.bitfield().count() > 0 || !d.meta.is_empty();
            if verified || d.writer {
                return Err(DriveError::OtherDrive {
                    url: url(&d.meta.public_key()),
                    path: root,
                });
            }
            // Nothing verified was ever stored: a clone of a key nobody served. Start over
            // (removed by path: only if the name still leads to the directory opened).
            dirs::check_unmoved(&*d.state_handle, &root)?;
            drop(d);
            fs::remove_dir_all(&state_dir)?;
        }
        let root_dir = dirs::open_folder(&root)?;
        if !adopt && has_files(&*root_dir)? {
            return Err(DriveError::NotEmpty(root));
        }
        let state_handle = dirs::open_state(&*root_dir, &root, true)?;
        let layout = layout::Layout::new(root_dir.clone(), root.clone(), false);
        let (meta_store, meta_lock) = dirs::open_store(&*state_handle, &root, "meta", true, None)?;
        let meta = Feed::create_replica(meta_store, key)?;
        Ok(Self {
            root,
            state_dir,
            root_dir,
            state_handle,
            locks: vec![meta_lock],
            meta,
            content: None,
            layout,
            writer: false,
            created_root,
        })
    }

    /// Opens the drive already in `root`.
    pub fn open(root: &Path) -> Result<Self, DriveError> {
        let root = existing_folder(root)?;
        let state_dir = root.join(STATE_DIR);
        let root_dir = dirs::open_folder(&root)?;
        let state_handle = dirs::open_state(&*root_dir, &root, false)?;
        if state_handle.metadata("meta/header")?.is_none() {
            return Err(DriveError::NotADrive(root));
        }
        let (meta_store, meta_lock) = dirs::open_store(&*state_handle, &root, "meta", false, None)?;
        let meta = Feed::open(meta_store)?;
        let writer = meta.is_writable();
        let layout = layout::Layout::new(root_dir.clone(), root.clone(), writer);
        let mut locks = vec![meta_lock];
        // A joined device's tag-0 content feed is its own (`device-content`); the founder's
        // is opened by the two-way side, as one device's among others.
        let joined = state_handle.metadata("device-meta/header")?.is_some();
        let content = if !joined && state_handle.metadata("content/header")?.is_some() {
            let blocks = Box::new(FolderBlocks::new(layout.clone()));
            let (store, lock) =
                dirs::open_store(&*state_handle, &root, "content", false, Some(blocks))?;
            locks.push(lock);
            Some(Feed::open(store)?)
        } else {
            None
        };
        Ok(Self {
            root,
            state_dir,
            root_dir,
            state_handle,
            locks,
            meta,
            content,
            layout,
            writer,
            created_root: false,
        })
    }

    /// Removes what a failed clone created: the state directory, and the folder itself if
    /// [`Drive::clone_into`] created it and nothing else is in it. Files already published
    /// stay. Refused for the writer (its state holds the only copy of the secret key).
    pub fn discard(self) -> Result<(), DriveError> {
        if self.writer {
            return Err(DriveError::WriterState(self.root));
        }
        let Self {
            root,
            state_dir,
            meta,
            content,
            created_root,
            state_handle,
            locks,
            ..
        } = self;
        // Close the stores (and their locks) before removing them.
        drop((meta, content, locks));
        // Removed by path: only if the name still leads to the directory we opened (another
        // user's directory swapped in meanwhile is theirs, not ours to delete).
        if fs::symlink_metadata(&state_dir).is_ok() {
            dirs::check_unmoved(&*state_handle, &root)?;
        }
        match fs::remove_dir_all(&state_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        if created_root && fs::read_dir(&root)?.next().is_none() {
            fs::remove_dir(&root)?;
        }
        Ok(())
    }

    /// This folder's kind on this device (send-receive unless set).
    pub fn kind(&self) -> FolderKind {
        let mut buf = Vec::new();
        let read = self
            .state_handle
            .open(KIND_FILE, crate::fsio::OpenHow::READ)
            .and_then(|f| {
                buf.resize(64, 0);
                let n = f.read_at(&mut buf, 0)?;
                buf.truncate(n);
                Ok(())
            });
        match read {
            Ok(()) => std::str::from_utf8(&buf)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or_default(),
            Err(_) => FolderKind::default(),
        }
    }

    /// Sets (and keeps) this folder's kind on this device.
    pub fn set_kind(&self, kind: FolderKind) -> io::Result<()> {
        self.state_handle
            .write_atomic(KIND_FILE, format!("{kind}\n").as_bytes(), 0o644)
    }

    /// The drive's URL.
    pub fn url(&self) -> String {
        url(&self.meta.public_key())
    }

    /// Replays metadata blocks `0..upto` (those held, in order) into a state, under the
    /// default [`Limits`]. See [`Drive::replay_with`].
    pub fn replay(meta: &mut Feed<DiskStorage>, upto: u64) -> Result<State, DriveError> {
        Self::replay_with(meta, upto, &Limits::default())
    }

    /// Replays metadata blocks `0..upto` (those held, in order) into a state. It stops before
    /// the first version it refuses (a record that does not decode or is unsafe, a version
    /// over `limits`): a signed but hostile version is stored like any other, and must not
    /// keep the folder from opening; the running reader refuses it again and says why.
    ///
    /// A replica's block that no longer reads back as verified (its bytes changed on disk:
    /// `DataChanged`; a tree node lost: `MissingNode`) stops the replay there too, and the
    /// block is forgotten, so the replicator fetches it again from a peer: a damaged block
    /// costs one download, never the folder. The writer's own store has nobody to fetch from,
    /// so there the error is returned.
    pub fn replay_with(
        meta: &mut Feed<DiskStorage>,
        upto: u64,
        limits: &Limits,
    ) -> Result<State, DriveError> {
        let mut state = State::default();
        for i in 0..upto.min(meta.len()) {
            if !meta.has(i) {
                break;
            }
            let block = match meta.get(i) {
                Ok(block) => block,
                Err(e) if meta.is_writable() => return Err(e.into()),
                Err(_) => {
                    meta.forget(i..i + 1)?;
                    break;
                }
            };
            let Ok(recs) = record::decode(i, &block) else {
                break;
            };
            if state.apply_checked(recs, limits).is_err() {
                break;
            }
        }
        Ok(state)
    }

    /// Progress figures computed from the stores, for a folder no node is running on.
    pub fn offline_stats(mut self) -> Result<Stats, DriveError> {
        let full = Self::replay(&mut self.meta, u64::MAX)?;
        let ledger = if self.writer {
            ledger::Ledger::default()
        } else {
            ledger::Ledger::load(&*self.state_handle)?
        };
        let applied = if self.writer {
            full.version
        } else {
            ledger.applied
        };
        let (files_total, bytes_total) = full.totals();
        let (mut files_done, mut bytes_done) = (0, 0);
        for (path, e) in &full.entries {
            // In place: as recorded, or (a reader's) written or adopted here with this content
            // and untouched since, whatever its mtime.
            if let Entry::File(info) = e
                && let Ok(Some(m)) = self.root_dir.metadata(path)
                && (m.kind == Kind::File
                    && m.len == info.size
                    && (import::stamp_time(m.mtime) == (info.mtime_secs, info.mtime_nanos)
                        || ledger
                            .files
                            .get(path)
                            .is_some_and(|w| w.hash == info.hash && w.unchanged(&m))))
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
            uploaded: 0,
            transfer: Vec::new(),
            errors: Vec::new(),
            on_disk: ledger.on_disk,
        })
    }

    /// Every version of the drive in `root` and what it changed, read without the writer's
    /// lock: works while another process serves or clones the folder. See [`log`].
    pub fn log(root: &Path) -> Result<Vec<LogEntry>, DriveError> {
        log::read(root)
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
        let joined = self.state_handle.metadata("device-meta/header")?.is_some();
        let kind = self.kind();
        if joined && kind == FolderKind::SendOnly {
            return self.into_send_only_device(options, first);
        }
        // A send-only founder stays a one-writer share of its own feed.
        let one_writer = self.writer && kind == FolderKind::SendOnly;
        if !one_writer && (joined || allows_another(&mut self.meta)) {
            return self.into_two_way(options, first, joined, kind);
        }
        // The writer's own versions come from its file system: replayed as written.
        let limits = if self.writer {
            Limits::unlimited()
        } else {
            options.limits
        };
        let full = Self::replay_with(&mut self.meta, u64::MAX, &limits)?;
        let applied = if self.writer {
            full.version
        } else {
            read_applied(&*self.state_handle)
        };
        let previous = if applied >= full.version {
            full.clone()
        } else {
            Self::replay_with(&mut self.meta, applied, &limits)?
        };
        // Files in place: as the newest version has them (a clone stopped after publishing
        // but before recording the version it reached: checked by hash), or as the applied one
        // left them. See `layout::Layout::adopt_in_place`.
        layout::lock(&self.layout).adopt_in_place(&full, &previous, self.writer);
        let mut feeds = vec![(self.meta, !self.writer)];
        let content = self.content.is_some().then_some(first + 1);
        if let Some(c) = self.content {
            feeds.push((c, !self.writer));
        }
        let mut base = app::Base::new(
            self.root,
            self.state_dir,
            self.root_dir,
            self.state_handle,
            self.layout,
            first,
            content,
            full,
            options,
        );
        base.locks = self.locks;
        let app = if self.writer {
            DriveApp::writer(base, writer::Writer::new().with_kind(kind))
        } else {
            DriveApp::reader(base, previous)
        };
        Ok((feeds, app))
    }
}

impl Drive {
    /// [`Drive::into_app_at`] for a two-way folder (see `twoway.rs`): this device's own feeds
    /// (a joined device's `device-meta` and `device-content`; the founder's are the drive's),
    /// or none for a clone. Other devices' feeds are opened as the merge counts them.
    fn into_two_way(
        mut self,
        options: AppOptions,
        first: FeedId,
        joined: bool,
        kind: FolderKind,
    ) -> Result<(crate::sync::Feeds, DriveApp), DriveError> {
        let founder = self.meta.public_key();
        let own = if joined {
            Some(self.open_device_feeds()?)
        } else {
            None
        };
        let mut feeds = vec![(self.meta, !self.writer)];
        let mut me = None;
        let mut content = None;
        if let Some((own_meta, own_content)) = own {
            me = Some((own_meta.public_key(), first + 1));
            feeds.push((own_meta, false));
            content = Some(first + 2);
            feeds.push((own_content, false));
        } else if let Some(c) = self.content {
            if self.writer {
                me = Some((founder, first));
            }
            content = Some(first + 1);
            feeds.push((c, !self.writer));
        }
        let mut base = app::Base::new(
            self.root,
            self.state_dir,
            self.root_dir,
            self.state_handle,
            self.layout,
            first,
            content,
            State::default(),
            options,
        );
        base.locks = self.locks;
        let mut side =
            twoway::TwoWay::new(&base, reader::Reader::new(State::default()), me, founder);
        side.receive_only = kind == FolderKind::ReceiveOnly;
        Ok((feeds, DriveApp::two_way(base, side)))
    }

    /// A joined device's own feeds (`device-meta`, `device-content`: tag 0 of the layout, its
    /// blocks already in its files), their locks kept with the drive's.
    fn open_device_feeds(&mut self) -> Result<(Feed<DiskStorage>, Feed<DiskStorage>), DriveError> {
        let (mstore, mlock) =
            dirs::open_store(&*self.state_handle, &self.root, "device-meta", false, None)?;
        let own_meta = Feed::open(mstore)?;
        let blocks = Box::new(FolderBlocks::tagged(self.layout.clone(), 0, true));
        let (cstore, clock) = dirs::open_store(
            &*self.state_handle,
            &self.root,
            "device-content",
            false,
            Some(blocks),
        )?;
        let own_content = Feed::open(cstore)?;
        self.locks.extend([mlock, clock]);
        Ok((own_meta, own_content))
    }

    /// A joined device of a send-only folder: a one-writer share of its own feeds (what it
    /// wrote is its state; nothing of other devices is applied), beside the folder's feed.
    fn into_send_only_device(
        mut self,
        options: AppOptions,
        first: FeedId,
    ) -> Result<(crate::sync::Feeds, DriveApp), DriveError> {
        let (mut own_meta, own_content) = self.open_device_feeds()?;
        let state = Self::replay_with(&mut own_meta, u64::MAX, &Limits::unlimited())?;
        layout::lock(&self.layout).adopt_in_place(&state, &state, true);
        let feeds = vec![(self.meta, true), (own_meta, false), (own_content, false)];
        let mut base = app::Base::new(
            self.root,
            self.state_dir,
            self.root_dir,
            self.state_handle,
            self.layout,
            first,
            Some(first + 2),
            state,
            options,
        );
        base.locks = self.locks;
        let writer = writer::Writer::send_only(first + 1);
        Ok((feeds, DriveApp::writer(base, writer)))
    }
}

/// Whether the folder's feed (as held) lets a device other than the founder write: then the
/// folder is a two-way one, read through the merge.
fn allows_another(meta: &mut Feed<DiskStorage>) -> bool {
    for i in 0..meta.len() {
        if !meta.has(i) {
            break;
        }
        let Ok(block) = meta.get(i) else { break };
        let Ok(recs) = record::decode(i, &block) else {
            break;
        };
        if recs.iter().any(|r| matches!(r, Record::Allow { .. })) {
            return true;
        }
    }
    false
}

/// Whether the folder `root` holds anything but its state directory (a leftover state
/// directory of a clone that never got a verified block does not count).
fn has_files(root: &dyn Dir) -> io::Result<bool> {
    Ok(root.read_dir("")?.iter().any(|(name, _)| name != STATE_DIR))
}

/// The version a reader's folder was last brought to completely (from its ledger; a ledger
/// that cannot be read counts as none: the reader then checks every file by hash).
fn read_applied(state: &dyn Dir) -> u64 {
    ledger::Ledger::load(state).map_or(0, |l| l.applied)
}
