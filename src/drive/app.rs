//! The drive on the synchronizer loop: [`DriveApp`] holds what both roles share ([`Base`]) and
//! one side, the writer's (import and watch, `writer.rs`) or the reader's (reconcile and
//! publish, `reader.rs`). Each hook hands over to the side once, instead of branching on the
//! role in every step.

use crate::core::replicator::{Event, FeedId, Replicator};
use crate::drive::event::{DriveEvent, DriveProblem, Reporter, Stats, Transfers};
use crate::drive::layout::{self, Shared};
use crate::drive::reader::Reader;
use crate::drive::record::{BLOCK_SIZE, Limits, State};
use crate::drive::twoway::TwoWay;
use crate::drive::writer::Writer;
use crate::fsio::{Dir, FileIo};
use crate::storage::DiskStorage;
use crate::sync::{App, Waker};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a [`DriveApp`] behaves.
#[derive(Debug, Clone)]
pub struct AppOptions {
    /// Writer: watch the folder for changes (and rescan every `rescan_interval`).
    pub follow: bool,
    /// Writer: full rescan period, the safety net under change notifications.
    pub rescan_interval: Duration,
    /// Writer: quiet time after a change notification before scanning.
    pub debounce: Duration,
    /// Send [`DriveEvent::Progress`] at most this often, and only when the figures changed
    /// (`None`: never).
    pub progress: Option<Duration>,
    /// Where events go (`None`: nowhere). Sent with `try_send`: the loop never waits, and a
    /// full channel drops events.
    pub events: Option<crossbeam_channel::Sender<DriveEvent>>,
    /// Reader: caps on what a version may hold and on files fetched at once; a version over
    /// them is refused whole (see [`Limits`]).
    pub limits: Limits,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            follow: true,
            rescan_interval: Duration::from_secs(30),
            debounce: Duration::from_millis(20),
            progress: None,
            events: None,
            limits: Limits::default(),
        }
    }
}

/// What both roles share.
pub(super) struct Base {
    pub root: PathBuf,
    pub state_dir: PathBuf,
    /// The folder's handle: the importer (and the layout) resolve every path beneath it.
    pub root_dir: Arc<dyn Dir>,
    /// The state directory's handle, checked to be ours when the drive opened: state files
    /// (`status.json`, `applied`) are written through it, never by path, so a `.feedsync`
    /// renamed away and replaced by another user's redirects nothing.
    pub state_handle: Arc<dyn Dir>,
    /// The feed stores' locks: held while the drive runs (a second `feedsync` on the folder
    /// fails at once).
    pub locks: Vec<Box<dyn FileIo>>,
    pub layout: Shared,
    pub meta: FeedId,
    /// The content feed (a fresh clone learns its key from metadata block 0): tag 0 of the
    /// layout's keys (see [`layout::key`]). On a device of a two-way folder, its own.
    pub content: Option<FeedId>,
    /// A two-way folder's other content feeds, tags 1, 2... in the order they were opened.
    pub others: Vec<FeedId>,
    /// A two-way folder's conflict copies (the merged tree's), for `status`.
    pub merge_conflicts: Vec<crate::drive::ledger::ConflictCopy>,
    /// A two-way folder's newest version (every device's metadata blocks held), for `status`.
    pub latest: Option<u64>,
    /// Newest verified state (writer: current).
    pub state: State,
    pub options: AppOptions,
    pub reporter: Reporter,
    /// Since when published files wait for a `syncfs`.
    pub dirty_since: Option<Instant>,
    last_status: Instant,
    /// The bytes `status.json` was last written with: an unchanged status is not written
    /// again (an idle node would otherwise rewrite and fsync it every second, forever).
    last_status_json: Option<Vec<u8>>,
    pub stats: Stats,
    /// Bytes per peer, this folder's feeds only (for `Stats::uploaded` and `transfer`).
    transfers: Transfers,
    last_received: u64,
    rate: u64,
}

impl Base {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        root: PathBuf,
        state_dir: PathBuf,
        root_dir: Arc<dyn Dir>,
        state_handle: Arc<dyn Dir>,
        layout: Shared,
        meta: FeedId,
        content: Option<FeedId>,
        state: State,
        options: AppOptions,
    ) -> Self {
        Self {
            reporter: Reporter::new(options.events.clone(), options.progress),
            root,
            state_dir,
            root_dir,
            state_handle,
            locks: Vec::new(),
            layout,
            meta,
            content,
            others: Vec::new(),
            merge_conflicts: Vec::new(),
            latest: None,
            state,
            options,
            dirty_since: None,
            last_status: Instant::now() - Duration::from_secs(10),
            last_status_json: None,
            stats: Stats::default(),
            transfers: Transfers::default(),
            last_received: 0,
            rate: 0,
        }
    }

    /// The content feed tagged `tag` (see [`layout::key`]).
    pub fn content_feed(&self, tag: u16) -> Option<FeedId> {
        match tag {
            0 => self.content,
            t => self.others.get(usize::from(t) - 1).copied(),
        }
    }

    /// Whether `feed` is one of this drive's content feeds.
    pub fn is_content(&self, feed: FeedId) -> bool {
        self.content == Some(feed) || self.others.contains(&feed)
    }

    /// Every content feed, with its tag.
    pub fn content_feeds(&self) -> impl Iterator<Item = (u16, FeedId)> + '_ {
        self.content
            .map(|c| (0, c))
            .into_iter()
            .chain((1..).zip(self.others.iter().copied()))
    }

    /// The feed and index of the block with layout key `key`.
    pub fn locate(&self, key: u64) -> Option<(FeedId, u64)> {
        let (tag, index) = layout::split(key);
        self.content_feed(tag).map(|f| (f, index))
    }

    /// Whether this node holds the block with layout key `key`.
    pub fn holds(&self, r: &Replicator<DiskStorage>, key: u64) -> bool {
        self.locate(key).is_some_and(|(f, x)| r.feed(f).has(x))
    }

    /// Gives up the blocks (layout keys) no file holds any more, so peers stop asking us and
    /// the replicator fetches them again if a file needs them later.
    pub fn forget_keys(
        &self,
        r: &mut Replicator<DiskStorage>,
        keys: impl IntoIterator<Item = u64>,
    ) {
        for k in keys {
            if let Some((f, x)) = self.locate(k) {
                let _ = r.forget(f, x..x + 1);
            }
        }
    }

    /// Reports a problem (once) and keeps it for `status`.
    pub fn problem(&mut self, p: DriveProblem) {
        self.reporter.problem(p);
    }

    /// Makes the folder durable: one `syncfs` for a batch of published files, on the folder
    /// root's handle the layout keeps open (a fresh descriptor would not see write-back errors
    /// from before it was opened). A failure is reported (once) and returned: the caller must
    /// not record a version as applied on it.
    pub fn sync_folder(&mut self) -> io::Result<()> {
        let dir = layout::lock(&self.layout).dir();
        match dir.sync_fs() {
            Ok(()) => {
                self.dirty_since = None;
                Ok(())
            }
            Err(e) => {
                self.problem(DriveProblem::Io {
                    path: self.root.clone(),
                    error: format!("flushing the folder to disk failed: {e}"),
                });
                Err(e)
            }
        }
    }

    fn refresh_stats(&mut self, r: &Replicator<DiskStorage>, role: &'static str, version: u64) {
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
            url: crate::drive::url(&r.feed(self.meta).public_key()),
            role,
            version,
            latest_version: self.latest.unwrap_or_else(|| r.feed(self.meta).len()),
            files_total,
            files_done,
            bytes_total,
            bytes_done,
            peers: r.peers().count() as u64,
            received: self.stats.received,
            rate: self.rate,
            uploaded: self.transfers.uploaded(),
            transfer: self.transfers.list(),
            errors: self.reporter.kept().to_vec(),
            on_disk: std::mem::take(&mut self.stats.on_disk),
        };
        for c in &self.merge_conflicts {
            if !self.stats.on_disk.conflicts.contains(c) {
                self.stats.on_disk.conflicts.push(c.clone());
            }
        }
    }

    /// Refreshes the figures and rewrites `status.json` (for `feedsync status` and the daemon)
    /// if they changed since it was last written. Each write is a flush of a file and of the
    /// state directory: an idle node must not pay that (nor wear the disk) every second.
    pub fn write_status(&mut self, r: &Replicator<DiskStorage>, role: &'static str, version: u64) {
        self.refresh_stats(r, role, version);
        let Ok(json) = serde_json::to_vec_pretty(&self.stats) else {
            return;
        };
        if self.last_status_json.as_ref() == Some(&json) {
            return;
        }
        match self.write_state_file("status.json", &json) {
            Ok(()) => self.last_status_json = Some(json),
            Err(e) => self.problem(DriveProblem::io(&self.state_dir.join("status.json"), &e)),
        }
    }

    /// Replaces the state file `name` with `bytes`, atomically and durably, through the state
    /// directory's handle (never by path: see `dirs.rs`). Readable by all (mode 0644): `status`
    /// and `log` run as other users too; nothing secret goes through here.
    pub fn write_state_file(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.state_handle.write_atomic(name, bytes, 0o644)
    }

    /// Whether a second passed since the last [`Base::each_second`].
    fn second_due(&self, now: Instant) -> bool {
        now.duration_since(self.last_status) >= Duration::from_secs(1)
    }

    /// Once a second: the receive rate, `status.json`, and progress (if it changed).
    fn each_second(
        &mut self,
        r: &Replicator<DiskStorage>,
        now: Instant,
        role: &'static str,
        version: u64,
    ) {
        self.last_status = now;
        self.rate = self.stats.received.saturating_sub(self.last_received);
        self.last_received = self.stats.received;
        self.write_status(r, role, version);
        self.reporter.progress(&self.stats, now);
    }
}

/// The role-specific half.
enum Side {
    Writer(Box<Writer>),
    Reader(Box<Reader>),
    /// A two-way folder (a device of it, or a clone of one).
    TwoWay(Box<TwoWay>),
    /// Only while switching from one side to another.
    Switching,
}

/// The drive logic on the synchronizer loop; see the module docs.
pub struct DriveApp {
    base: Base,
    side: Side,
    /// Kept for a side made later (see `switch_if_two_way`).
    waker: Option<Waker>,
}

impl DriveApp {
    pub(super) fn writer(base: Base, writer: Writer) -> Self {
        Self {
            base,
            side: Side::Writer(Box::new(writer)),
            waker: None,
        }
    }

    pub(super) fn reader(base: Base, previous: State) -> Self {
        Self {
            base,
            side: Side::Reader(Box::new(Reader::new(previous))),
            waker: None,
        }
    }

    pub(super) fn two_way(base: Base, side: TwoWay) -> Self {
        Self {
            base,
            side: Side::TwoWay(Box::new(side)),
            waker: None,
        }
    }

    fn role(&self) -> (&'static str, u64) {
        match &self.side {
            Side::Writer(_) => ("writer", self.base.state.version),
            Side::Reader(rd) => ("reader", rd.applied_version()),
            Side::TwoWay(t) => (t.role(), t.version()),
            Side::Switching => ("reader", 0),
        }
    }

    /// A one-writer side that met a two-way folder (an `Allow` in the folder's feed) goes on
    /// as a two-way one.
    fn switch_if_two_way(&mut self, r: &mut Replicator<DiskStorage>) {
        let b = &mut self.base;
        let founder = r.feed(b.meta).public_key();
        match std::mem::replace(&mut self.side, Side::Switching) {
            Side::Reader(rd) if rd.two_way_seen => {
                let mut t = TwoWay::new(b, *rd, None, founder);
                t.start(b, r, false);
                self.side = Side::TwoWay(Box::new(t));
            }
            Side::Writer(w) if w.two_way_seen => {
                drop(w); // its watcher stops: the two-way side has its own
                let reader = Reader::new(b.state.clone());
                let mut t = TwoWay::new(b, reader, Some((founder, b.meta)), founder);
                if let Some(waker) = &self.waker {
                    t.set_waker(waker.clone());
                }
                t.from_writer = true;
                t.start(b, r, true);
                self.side = Side::TwoWay(Box::new(t));
            }
            other => self.side = other,
        }
    }

    /// The current figures (as last refreshed, at most a second old).
    pub fn stats(&self) -> &Stats {
        &self.base.stats
    }
}

impl App for DriveApp {
    fn set_waker(&mut self, waker: Waker) {
        match &mut self.side {
            Side::Writer(w) => w.set_waker(waker.clone()),
            Side::TwoWay(t) => t.set_waker(waker.clone()),
            _ => {}
        }
        self.waker = Some(waker);
    }

    fn on_wake(&mut self, r: &mut Replicator<DiskStorage>) {
        match &mut self.side {
            Side::Writer(w) => w.on_wake(&mut self.base, r),
            Side::TwoWay(t) => t.on_wake(&mut self.base, r),
            _ => {}
        }
    }

    fn start(&mut self, r: &mut Replicator<DiskStorage>) {
        match &mut self.side {
            Side::Writer(w) => w.start(&mut self.base, r),
            Side::Reader(rd) => rd.start(&mut self.base, r),
            Side::TwoWay(t) => t.start(&mut self.base, r, true),
            Side::Switching => {}
        }
        let (role, version) = self.role();
        self.base.write_status(r, role, version);
    }

    fn on_peer(&mut self, peer: crate::core::replicator::PeerId, addr: std::net::SocketAddr) {
        self.base.transfers.connected(peer, addr);
    }

    fn on_event(&mut self, r: &mut Replicator<DiskStorage>, event: &Event) {
        // The content feed of a fresh clone becomes known from metadata: counted from then.
        let b = &mut self.base;
        b.transfers
            .count(&[b.meta, b.content.unwrap_or(b.meta)], event);
        match &mut self.side {
            Side::Writer(w) => w.on_event(&mut self.base, event),
            Side::Reader(rd) => rd.on_event(&mut self.base, r, event),
            Side::TwoWay(t) => t.on_event(&mut self.base, r, event),
            Side::Switching => {}
        }
    }

    fn on_tick(&mut self, r: &mut Replicator<DiskStorage>) {
        let now = Instant::now();
        match &mut self.side {
            Side::Writer(w) => w.on_tick(&mut self.base, r, now),
            Side::Reader(rd) => rd.on_tick(&mut self.base, r, now),
            Side::TwoWay(t) => t.on_tick(&mut self.base, r, now),
            Side::Switching => {}
        }
        self.switch_if_two_way(r);
        if !self.base.second_due(now) {
            return;
        }
        match &mut self.side {
            Side::Reader(rd) => rd.each_second(&mut self.base, r),
            Side::TwoWay(t) => t.each_second(&mut self.base, r),
            _ => {}
        }
        let (role, version) = self.role();
        self.base.each_second(r, now, role, version);
    }

    fn is_done(&self, r: &Replicator<DiskStorage>) -> bool {
        match &self.side {
            Side::Writer(_) | Side::Switching => false,
            Side::Reader(rd) => rd.is_done(&self.base, r),
            Side::TwoWay(t) => t.is_done(&self.base, r),
        }
    }

    fn shutdown(&mut self, r: &mut Replicator<DiskStorage>) -> io::Result<()> {
        match &mut self.side {
            Side::Writer(_) => {
                // Reported by `sync_folder`; the writer records nothing on it.
                let _ = self.base.sync_folder();
            }
            Side::Reader(rd) => rd.shutdown(&mut self.base, r),
            Side::TwoWay(t) => t.shutdown(&mut self.base, r),
            Side::Switching => {}
        }
        let (role, version) = self.role();
        self.base.write_status(r, role, version);
        Ok(())
    }
}

/// Several drives on one node (the daemon): each event and tick goes to every drive, and each
/// drive acts only on its own feeds.
pub struct Drives(pub Vec<DriveApp>);

impl App for Drives {
    fn set_waker(&mut self, waker: Waker) {
        for d in &mut self.0 {
            d.set_waker(waker.clone());
        }
    }

    fn on_wake(&mut self, r: &mut Replicator<DiskStorage>) {
        for d in &mut self.0 {
            d.on_wake(r);
        }
    }

    fn on_peer(&mut self, peer: crate::core::replicator::PeerId, addr: std::net::SocketAddr) {
        for d in &mut self.0 {
            d.on_peer(peer, addr);
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
