//! The two-way side of a running drive (#13): every device's metadata feed merged into one
//! tree ([`Merge`]), materialised by the reader's machinery, and this device's own edits
//! written to its own feeds by the importer.
//!
//! # How the pieces fit
//! - **Feeds.** The drive's metadata feed stays the founder's (its key is the folder's URL).
//!   Every device the merge counts as a member gets its metadata feed added at run time
//!   (`.feedsync/devices/<id>/meta`, downloaded whole), and every device whose `Init` is
//!   merged its content feed (`.feedsync/devices/<id>/content`; the founder's is `content`),
//!   downloaded only where a file needs it. A device's own feeds are `device-meta` and
//!   `device-content` (the founder's own: `meta` and `content`).
//! - **Blocks of several feeds.** The layout keys a block by (tag, index) in one `u64`
//!   ([`layout::key`]); tag 0 is this device's own content feed (a clone's: the founder's), the
//!   others are numbered as their feeds open. The merged tree's files are turned into that form
//!   (`local_state`), so reconcile, reassembly, reuse and publish work exactly as in a
//!   one-writer folder, across feeds: a file another device renamed is reused from the old
//!   file here, whichever device wrote its bytes.
//! - **The reader** ([`Reader`], in merged mode) brings the folder to the tree: same guard,
//!   ledger, journal and durability as a clone's. A local file it would replace or delete that
//!   the ledger does not know as ours is kept (a conflict copy, or left in place).
//! - **The importer** (this device's [`Writer`]) scans against the folder as it is on disk
//!   (`on_disk`: a file of the tree still being fetched, or waiting for content, counts as its
//!   older version or as absent; at start, before the first reconcile, the folder as the
//!   ledger says the last run left it: `as_left`), so scans never wait on fetches a device may
//!   never serve. Its blocks carry the *applied clock* — of the last tree the folder was
//!   brought to completely — not what was merged: an edit here never supersedes a version
//!   this device has not put on disk; it is concurrent, and both stay. While files arrive,
//!   only notifications that are not this node's own publishes start a scan (`only_ours`),
//!   besides the periodic rescan. A file the importer reads is recorded in the ledger as ours
//!   (`adopt_own`), so another device's later removal or edit of it applies here; one it did
//!   not read stays protected.
//! - **Kinds.** A receive-only device never scans (a clone with an identity); a send-only
//!   device does not come here at all (a one-writer share of its own feeds, `Drive::into_app`).
//! - **Not allowed (yet).** A joined device the members have not allowed receives like a clone
//!   and writes nothing; its edits stay on disk and are scanned in the moment it is allowed.
//!
//! Bounds: the merge's ([`Merge`]: devices, paths, depth); a device whose block is refused
//! stops there (reported once) and the others go on; a block waiting on history that never
//! comes costs nothing but its wait.

use crate::core::Feed;
use crate::core::replicator::{Event, FeedId, Replicator};
use crate::drive::app::Base;
use crate::drive::devices;
use crate::drive::dirs;
use crate::drive::event::DriveProblem;
use crate::drive::guard;
use crate::drive::import::{Wire, stamp_time};
use crate::drive::layout::{self, FolderBlocks};
use crate::drive::ledger::ConflictCopy;
use crate::drive::merge::{Clock, DeviceId, Merge, Offer, Source, Tree};
use crate::drive::reader::{Reader, settled};
use crate::drive::record::{self, Entry, Record, State};
use crate::drive::writer::Writer;
use crate::fsio::Kind;
use crate::storage::DiskStorage;
use crate::sync::Waker;
use crate::util::hex;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

/// A tag no feed has: a file citing a device whose content feed is not open waits (it is
/// neither fetched nor, as a missing file, removed).
const NO_FEED: u16 = u16::MAX;

/// See the module docs.
pub(super) struct TwoWay {
    reader: Reader,
    /// This device's importer (`None`: a clone, which never writes).
    writer: Option<Writer>,
    /// This device (`None`: a clone).
    me: Option<DeviceId>,
    /// This device's own metadata feed.
    own_meta: Option<FeedId>,
    merge: Merge,
    /// Every device's metadata feed held, the founder's first.
    metas: Vec<(DeviceId, FeedId)>,
    /// The device of each content tag (tag 0 first).
    tags: Vec<DeviceId>,
    /// Devices whose feed stopped at a refused block.
    stopped: HashSet<DeviceId>,
    /// Devices whose content feed could not be opened (reported once).
    unopened: HashSet<DeviceId>,
    /// The copies a record at a path must keep (see [`Wire::copies`]), from the last tree.
    copies: HashMap<String, Vec<Record>>,
    /// The own feed's length when the tree was last computed.
    own_len: u64,
    /// A receive-only device: its importer never scans (see [`FolderKind`](crate::drive::FolderKind)).
    pub receive_only: bool,
    /// The tree `b.state` was made from: its version and the clock of what it merged.
    state_clock: (u64, Clock),
    /// The clock of the last tree the folder was brought to completely (every file in place,
    /// flushed): what this device has *on disk* of the others. Its blocks carry this, not
    /// what it merged, so an edit here never covers another device's version it has not put
    /// on disk (that would lose it): such an edit is concurrent, and both stay. Kept in
    /// `.feedsync/applied-clock` across restarts.
    applied_clock: Clock,
    /// This device was seen allowed to write in this run.
    allowed_seen: bool,
    /// The paths of the last tree whose record is this device's (for `adopt_own`).
    own_paths: Vec<String>,
    /// A one-writer share that became two-way: its layout holds what its importer read.
    pub from_writer: bool,
}

/// The state file that keeps [`TwoWay::applied_clock`].
const APPLIED_CLOCK: &str = "applied-clock";

impl TwoWay {
    /// A two-way side for a device (`me`, with its own metadata feed `own_meta`; its own
    /// content feed is the base's `content`), or for a clone (`me: None`), reading on from
    /// `reader` (a fresh one, or a one-writer reader that met an `Allow`).
    pub fn new(
        b: &Base,
        reader: Reader,
        me: Option<(DeviceId, FeedId)>,
        founder: DeviceId,
    ) -> Self {
        let mut reader = reader;
        reader.set_merged();
        let mut metas = vec![(founder, b.meta)];
        let mut tags = Vec::new();
        if let Some((id, feed)) = me {
            if id != founder {
                metas.push((id, feed));
            }
            tags.push(id);
        } else if b.content.is_some() {
            tags.push(founder);
        }
        Self {
            reader,
            writer: me.map(|(_, feed)| Writer::device(feed)),
            me: me.map(|(id, _)| id),
            own_meta: me.map(|(_, feed)| feed),
            merge: Merge::new(founder, b.options.limits),
            metas,
            tags,
            stopped: HashSet::new(),
            unopened: HashSet::new(),
            copies: HashMap::new(),
            own_len: 0,
            receive_only: false,
            state_clock: (0, Clock::default()),
            applied_clock: Clock::default(),
            allowed_seen: false,
            own_paths: Vec::new(),
            from_writer: false,
        }
    }

    /// What `status` calls this node: a device that may write, or a reader.
    pub fn role(&self) -> &'static str {
        match self.me {
            Some(me) if self.merge.members().may_write(&me) => "device",
            Some(_) => "device (not allowed yet)",
            None => "reader",
        }
    }

    /// The version `status` shows: metadata blocks merged, all devices together.
    pub fn version(&self) -> u64 {
        self.metas.iter().map(|(d, _)| self.merge.applied(d)).sum()
    }

    pub fn set_waker(&mut self, waker: Waker) {
        if let Some(w) = &mut self.writer {
            w.set_waker(waker);
        }
    }

    pub fn on_wake(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) {
        if let Some(w) = &mut self.writer {
            w.on_wake(b, r);
        }
    }

    /// `fresh`: the reader was not started before (a one-writer reader switching over was).
    pub fn start(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>, fresh: bool) {
        self.applied_clock = load_clock(b);
        self.advance(b, r, false);
        if fresh && self.from_writer {
            self.reader.load_trusting(b);
        } else if fresh {
            self.reader.load(b, r);
        }
        if let Some(w) = &mut self.writer
            && !self.receive_only
        {
            w.start(b, r);
        }
        if fresh && self.may_write() {
            // What changed here while nothing ran is this device's edit, scanned before the
            // folder is brought to the tree (which would otherwise take it for a stale file).
            let as_left = self.as_left(b);
            self.scan(b, r, Some(as_left), |w, b, r| w.scan_now(b, r));
        }
        if let Some(c) = b.content {
            r.set_ordered(c, true);
        }
        self.reader.reconcile(b, r);
    }

    /// Whether this device scans and writes: a device (not a clone), allowed, not
    /// receive-only, its importer running.
    fn may_write(&self) -> bool {
        !self.receive_only
            && self
                .me
                .is_some_and(|me| self.merge.members().may_write(&me))
            && self.writer.as_ref().is_some_and(|w| w.has_importer())
    }

    /// The folder as the last run left it, for the first scan: what the ledger says this
    /// device wrote or read, as the tree has it if the contents match, else as the ledger
    /// describes it. A file of the tree never put on disk here is not in it (its absence is
    /// no removal); a file changed since the ledger recorded it is this device's edit.
    fn as_left(&self, b: &Base) -> State {
        let ledger = self.reader.ledger();
        let mut entries = std::collections::BTreeMap::new();
        for (path, w) in &ledger.files {
            let entry = match b.state.entries.get(path) {
                Some(Entry::File(info)) if info.hash == w.hash => Entry::File(info.clone()),
                Some(e @ Entry::Link(l)) if guard::link_hash(&l.target) == w.hash => e.clone(),
                _ => Entry::File(record::FileInfo {
                    size: w.size,
                    mode: w.mode & 0o777,
                    mtime_secs: w.mtime.0,
                    mtime_nanos: u32::try_from(w.mtime.1).unwrap_or(0),
                    hash: w.hash,
                    extents: Vec::new(),
                }),
            };
            entries.insert(path.clone(), entry);
        }
        for d in &ledger.dirs {
            let entry = match b.state.entries.get(d) {
                Some(e) if e.is_dir() => e.clone(),
                _ => Entry::Dir,
            };
            entries.insert(d.clone(), entry);
        }
        State::from_entries(entries, b.state.version)
    }

    pub fn on_event(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>, event: &Event) {
        match event {
            Event::Downloaded { feed, .. } | Event::Upgraded { feed, .. }
                if self.metas.iter().any(|(_, f)| f == feed) =>
            {
                self.advance(b, r, true);
            }
            _ => {}
        }
        if let Some(w) = &mut self.writer {
            w.on_event(b, event);
        }
        self.reader.on_event(b, r, event);
    }

    pub fn on_tick(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>, now: Instant) {
        self.reader.on_tick(b, r, now);
        self.note_applied(b);
        let Some(me) = self.me else { return };
        if !self.merge.members().may_write(&me) {
            return;
        }
        if !self.allowed_seen {
            // Allowed now: what was edited here meanwhile goes out.
            self.allowed_seen = true;
            if let Some(w) = &mut self.writer {
                w.rescan_soon();
            }
        }
        // Scanned against what is on disk (`on_disk`), with the clock of what is on disk
        // (`applied_clock`): files still being fetched, or waiting for content a device may
        // never send, hold nothing up. While files are being fetched, the reader's own
        // publishing shows up as changes: those alone start no scan (`only_ours`).
        let busy = !settled(b);
        let mut due = false;
        if !self.receive_only
            && let Some(w) = &mut self.writer
            && w.scan_due(b, now)
        {
            if busy && !w.rescan_due(b, now) && only_ours(b, w) {
                w.forget_changes();
            } else {
                due = true;
            }
        }
        if b.dirty_since.is_some() && (!due || !self.reader.flush_now(b, r)) {
            // Flushed on a later tick; a scan due now flushes first (a live edit waits for
            // no timer).
            return;
        }
        self.take_requests(b, r);
        if !due {
            return;
        }
        // Everything in place (the common case): the tree is what is on disk, as it is.
        let at_tree = !busy && !self.reader.deferred();
        let on_disk = (!at_tree).then(|| self.on_disk(b));
        self.scan(b, r, on_disk, |w, b, r| w.on_tick(b, r, now));
    }

    /// Runs this device's importer (`scan`) with `on_disk`, if given, standing in for the tree
    /// as what the folder holds, then merges what it wrote.
    fn scan(
        &mut self,
        b: &mut Base,
        r: &mut Replicator<DiskStorage>,
        on_disk: Option<State>,
        scan: impl FnOnce(&mut Writer, &mut Base, &mut Replicator<DiskStorage>),
    ) {
        self.prepare_importer(b, r);
        let tree = on_disk.map(|s| std::mem::replace(&mut b.state, s));
        if let Some(w) = &mut self.writer {
            scan(w, b, r);
        }
        if let Some(tree) = tree {
            b.state = tree;
        }
        self.after_local_change(b, r);
    }

    /// Takes the tree the reader last brought the folder to completely as what is on disk
    /// (see `applied_clock`), and keeps its clock.
    fn note_applied(&mut self, b: &Base) {
        let (version, clock) = &self.state_clock;
        if self.reader.previous().version == *version && self.applied_clock != *clock {
            self.applied_clock = clock.clone();
            if let Ok(bytes) = postcard::to_stdvec(&self.applied_clock)
                && let Err(e) = b.write_state_file(APPLIED_CLOCK, &bytes)
            {
                // Kept in memory; after a restart this device's edits are concurrent with
                // more than they need be (conflict copies, never a lost edit).
                tracing::warn!("keeping the applied clock: {e}");
            }
        }
    }

    /// The tree as this device has it on disk, for its importer to compare the folder with:
    /// a file of the tree not in place yet (being fetched, or waiting for content) is what the
    /// folder held before it, or nothing — so it is neither taken for a local removal nor its
    /// older version for a local edit.
    fn on_disk(&self, b: &Base) -> State {
        let l = layout::lock(&b.layout);
        let previous = &self.reader.previous().entries;
        let entries = b
            .state
            .entries
            .iter()
            .filter_map(|(path, e)| {
                let Entry::File(info) = e else {
                    return Some((path.clone(), e.clone()));
                };
                let in_place = l
                    .slot_at(path)
                    .and_then(|id| l.slot(id))
                    .is_some_and(|s| s.pending.is_none() && s.info == *info);
                match previous.get(path) {
                    _ if in_place => Some((path.clone(), e.clone())),
                    Some(old @ Entry::File(_)) => Some((path.clone(), old.clone())),
                    _ => None,
                }
            })
            .collect();
        State::from_entries(entries, b.state.version)
    }

    pub fn each_second(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) {
        self.reader.each_second(b, r);
        b.latest = Some(self.metas.iter().map(|(_, f)| r.feed(*f).len()).sum());
    }

    /// Every device's metadata complete as a peer proved it, merged, and every file in place.
    pub fn is_done(&self, b: &Base, r: &Replicator<DiskStorage>) -> bool {
        self.metas.iter().all(|(d, f)| {
            (Some(*d) == self.me || r.peer_proved(*f) && r.is_complete(*f))
                && (self.stopped.contains(d) || self.merge.applied(d) == r.feed(*f).len())
        }) && !self.reader.deferred()
            && settled(b)
    }

    pub fn shutdown(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) {
        self.reader.shutdown(b, r);
        // The tree the last flush reached is what the next run's first scan is judged against.
        self.note_applied(b);
    }

    /// The blocks of this device's own feed appended since the tree was computed: merged at
    /// once (the tree then has this device's files as the importer read them), and what the
    /// importer read is recorded as ours in the ledger.
    fn after_local_change(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) {
        let Some(own) = self.own_meta else { return };
        if r.feed(own).len() == self.own_len {
            return;
        }
        self.advance(b, r, true);
        self.adopt_own(b);
    }

    /// Merges what the metadata feeds hold beyond what is merged, opens the feeds of devices
    /// newly counted, and (`reconcile`) brings the folder to the new tree.
    fn advance(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>, reconcile: bool) {
        let mut changed = false;
        loop {
            changed |= self.offer_held(b, r);
            if self.merge.needs_rebuild() {
                // A denial arrived after blocks it cuts off: merged again from the start.
                self.merge = self.merge.rebuild();
                self.stopped.clear();
                continue;
            }
            // New members' metadata feeds may hold blocks already (a restart).
            if !self.open_feeds(b, r) {
                break;
            }
            changed = true;
        }
        if let Some(own) = self.own_meta {
            self.own_len = r.feed(own).len();
        }
        if !changed && reconcile {
            return;
        }
        let tree = self.merge.tree();
        self.copies = copies_of(&tree);
        b.merge_conflicts = tree
            .iter()
            .filter_map(|(name, res)| match &res.source {
                Source::Conflict { of, .. } => Some(ConflictCopy {
                    path: of.clone(),
                    copy: name.clone(),
                }),
                _ => None,
            })
            .collect();
        self.own_paths = match self.me {
            Some(me) => tree
                .iter()
                .filter(|(_, res)| matches!(res.source, Source::Record(d) if d.device == me))
                .map(|(path, _)| path.clone())
                .collect(),
            None => Vec::new(),
        };
        b.state = self.local_state(tree);
        self.state_clock = (
            b.state.version,
            self.merge
                .clock_for(&self.me.unwrap_or(self.merge.founder())),
        );
        if reconcile {
            self.reader.reconcile(b, r);
        }
    }

    /// Offers every device's held blocks, in each feed's order, until nothing moves.
    /// Returns whether anything was merged.
    fn offer_held(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) -> bool {
        let mut any = false;
        loop {
            let mut moved = false;
            for k in 0..self.metas.len() {
                let (device, feed) = self.metas[k];
                while !self.stopped.contains(&device) {
                    let i = self.merge.applied(&device);
                    let f = r.feed_mut(feed);
                    if i >= f.len() || !f.has(i) {
                        break;
                    }
                    let block = match f.get(i) {
                        Ok(block) => block,
                        Err(e) => {
                            // Damaged on disk: fetched again if we can, else reported.
                            let forgot = if f.is_writable() {
                                Err("this device's own feed".to_string())
                            } else {
                                r.forget(feed, i..i + 1).map_err(|e| e.to_string())
                            };
                            b.problem(DriveProblem::Storage {
                                folder: b.root.clone(),
                                what: format!(
                                    "reading block {} of device {}",
                                    i + 1,
                                    short(&device)
                                ),
                                error: match forgot {
                                    Ok(()) => format!("{e}; fetching it again"),
                                    Err(f) => format!("{e}; cannot fetch it again: {f}"),
                                },
                            });
                            break;
                        }
                    };
                    let offered = record::decode(i, &block)
                        .map_err(|e| e.to_string())
                        .and_then(|recs| {
                            self.merge
                                .offer(device, i, &recs)
                                .map_err(|e| e.to_string())
                        });
                    match offered {
                        Ok(Offer::Applied) => {
                            moved = true;
                            any = true;
                        }
                        Ok(Offer::Waiting { .. }) => break,
                        Err(reason) => {
                            // A signed block we refuse: nothing of it counts, nor anything
                            // after it from that device; the others go on.
                            self.stopped.insert(device);
                            b.problem(DriveProblem::UnsafeRecord {
                                folder: b.root.clone(),
                                version: i + 1,
                                reason: format!("device {}: {reason}", short(&device)),
                            });
                        }
                    }
                }
            }
            if !moved {
                return any;
            }
        }
    }

    /// Opens the metadata feed of every member not held yet and the content feed of every
    /// device whose `Init` is merged. Returns whether a feed was opened.
    fn open_feeds(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) -> bool {
        let mut opened = false;
        let members: Vec<DeviceId> = self
            .merge
            .members()
            .list()
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        for d in members {
            if self.metas.iter().any(|(x, _)| *x == d) || self.unopened.contains(&d) {
                continue;
            }
            match open_replica(b, r, &device_store(&d, "meta"), d, None) {
                Ok(id) => {
                    r.set_ordered(id, true);
                    self.metas.push((d, id));
                    opened = true;
                }
                Err(e) => self.cannot_open(b, d, "metadata", e),
            }
        }
        let devices: Vec<DeviceId> = self.merge.devices().copied().collect();
        for d in devices {
            if self.tags.contains(&d) || self.unopened.contains(&d) {
                continue;
            }
            let Some(key) = self.merge.content_key(&d) else {
                continue;
            };
            let founder = d == self.merge.founder();
            // A clone's tag 0 is the founder's content feed.
            let tag = if self.me.is_none() && founder && b.content.is_none() {
                0
            } else {
                (b.others.len() + 1) as u16
            };
            let name = if founder {
                "content".to_string()
            } else {
                device_store(&d, "content")
            };
            let blocks = Box::new(FolderBlocks::tagged(b.layout.clone(), tag, false));
            match open_replica(b, r, &name, key, Some(blocks)) {
                Ok(id) => {
                    r.set_ordered(id, true);
                    if tag == 0 {
                        b.content = Some(id);
                        self.tags.insert(0, d);
                    } else {
                        b.others.push(id);
                        self.tags.push(d);
                    }
                    opened = true;
                }
                Err(e) => self.cannot_open(b, d, "content", e),
            }
        }
        if opened
            && let Some(w) = &mut self.writer
            && let Some(i) = w.importer_mut()
        {
            i.set_others(b.others.clone());
        }
        opened
    }

    fn cannot_open(&mut self, b: &mut Base, d: DeviceId, what: &str, error: String) {
        self.unopened.insert(d);
        b.problem(DriveProblem::Storage {
            folder: b.root.clone(),
            what: format!("opening the {what} feed of device {}", short(&d)),
            error,
        });
    }

    /// The merged tree with each file's extents as layout keys.
    fn local_state(&self, tree: Tree) -> State {
        let tag_of: HashMap<DeviceId, u16> = self
            .tags
            .iter()
            .enumerate()
            .map(|(t, d)| (*d, t as u16))
            .collect();
        let entries = tree
            .into_iter()
            .map(|(path, res)| {
                let entry = match res.entry {
                    Entry::File(mut info) => {
                        let mut runs = res.feeds.iter().flat_map(|b| {
                            let tag = tag_of.get(&b.device).copied().unwrap_or(NO_FEED);
                            std::iter::repeat_n(tag, b.extents as usize)
                        });
                        for e in &mut info.extents {
                            let tag = runs.next().unwrap_or(NO_FEED);
                            e.start = layout::key(tag, e.start);
                        }
                        Entry::File(info)
                    }
                    e => e,
                };
                (path, entry)
            })
            .collect();
        State::from_entries(entries, self.version())
    }

    /// Gives the importer what its next commit writes with.
    fn prepare_importer(&mut self, b: &Base, r: &mut Replicator<DiskStorage>) {
        let (Some(_), Some(w)) = (self.me, &mut self.writer) else {
            return;
        };
        let Some(i) = w.importer_mut() else { return };
        i.set_others(b.others.clone());
        i.learn(r);
        i.set_wire(Some(Wire {
            clock: self.applied_clock.clone(),
            devices: self.tags.clone(),
            copies: self.copies.clone(),
        }));
    }

    /// Records in the ledger, as ours, what this device's records describe and the disk still
    /// holds as recorded: another device's removal or edit of it then applies here.
    fn adopt_own(&mut self, b: &mut Base) {
        let ledger = self.reader.ledger_mut();
        for path in &self.own_paths {
            let Some(entry) = b.state.entries.get(path) else {
                continue;
            };
            match entry {
                Entry::File(info) => {
                    if ledger.files.get(path).is_some_and(|w| w.hash == info.hash) {
                        continue;
                    }
                    if let Ok(Some(m)) = b.root_dir.metadata(path)
                        && m.kind == Kind::File
                        && m.len == info.size
                        && stamp_time(m.mtime) == (info.mtime_secs, info.mtime_nanos)
                    {
                        ledger.wrote(path, &m, info.hash);
                    }
                }
                Entry::Link(l) => {
                    let hash = guard::link_hash(&l.target);
                    if ledger.files.get(path).is_some_and(|w| w.hash == hash) {
                        continue;
                    }
                    if let Ok(Some(m)) = b.root_dir.metadata(path)
                        && m.kind == Kind::Symlink
                    {
                        ledger.wrote(path, &m, hash);
                    }
                }
                Entry::Dir | Entry::Directory(_) => {
                    if !ledger.dirs.contains(path) {
                        ledger.dirs.insert(path.clone());
                    }
                }
            }
        }
        b.dirty_since.get_or_insert_with(Instant::now);
    }

    /// Answers `allow`/`deny` requests left by the CLI, as the one-writer writer does, with
    /// the merged membership.
    fn take_requests(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) {
        let stems = devices::waiting_requests(&*b.state_handle);
        if stems.is_empty() {
            return;
        }
        self.prepare_importer(b, r);
        let Some(w) = &mut self.writer else { return };
        let Some(importer) = w.importer_mut() else {
            return;
        };
        let state = &mut b.state;
        devices::take_requests(&*b.state_handle, &stems, &self.merge, |recs| {
            importer
                .commit(r, state, recs)
                .map(|_| state.version)
                .map_err(|e| e.to_string())
        });
        self.after_local_change(b, r);
    }
}

/// The copies a record at each path must keep, from `tree`.
fn copies_of(tree: &Tree) -> HashMap<String, Vec<Record>> {
    let mut out: HashMap<String, Vec<Record>> = HashMap::new();
    for (name, res) in tree {
        if let Source::Conflict { of, .. } = &res.source {
            let rec = res.clone().into_record(name.clone());
            out.entry(of.clone()).or_default().push(rec);
        }
    }
    out
}

/// The store of another device's feed, inside the state directory.
fn device_store(device: &DeviceId, which: &str) -> String {
    format!("devices/{}/{which}", hex(device))
}

/// A device id as messages show it (its first 8 hex digits).
fn short(device: &DeviceId) -> String {
    hex(&device[..4])
}

/// Opens (or makes) the replica store `name` of the feed `key` and adds it to the replicator,
/// downloading. A store holding another key is refused, as is a key another feed on this node
/// has (two feeds on one key would break both).
fn open_replica(
    b: &mut Base,
    r: &mut Replicator<DiskStorage>,
    name: &str,
    key: [u8; 32],
    blocks: Option<Box<dyn crate::storage::BlockData>>,
) -> Result<FeedId, String> {
    if (0..r.feed_count()).any(|id| r.feed(id).public_key() == key) {
        return Err("its key is the key of another feed on this node".into());
    }
    // Parents first (the store's directory is made by `open_store`).
    let mut at = String::new();
    for part in name.split('/').take(name.split('/').count() - 1) {
        if !at.is_empty() {
            at.push('/');
        }
        at.push_str(part);
        match b.state_handle.create_dir(&at, 0o700) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    let exists = b
        .state_handle
        .metadata(&format!("{name}/header"))
        .map_err(|e| e.to_string())?
        .is_some();
    let (store, lock) = dirs::open_store(&*b.state_handle, &b.root, name, true, blocks)
        .map_err(|e| e.to_string())?;
    let feed = if exists {
        let f = Feed::open(store).map_err(|e| e.to_string())?;
        if f.public_key() != key {
            return Err(format!("{name} holds another feed"));
        }
        f
    } else {
        Feed::create_replica(store, key).map_err(|e| e.to_string())?
    };
    b.locks.push(lock);
    Ok(r.add_feed(feed, true))
}

/// The applied clock the last run kept (none: an empty clock, which covers nothing — this
/// device's first edits are then concurrent with everything, never superseding unseen work).
fn load_clock(b: &Base) -> Clock {
    let mut buf = vec![0u8; 64 * 1024];
    let read = b
        .state_handle
        .open(APPLIED_CLOCK, crate::fsio::OpenHow::READ)
        .and_then(|f| f.read_at(&mut buf, 0));
    match read {
        Ok(n) => postcard::from_bytes::<Clock>(&buf[..n])
            .ok()
            .filter(|c| c.check().is_ok())
            .unwrap_or_default(),
        Err(_) => Clock::default(),
    }
}

/// Whether every change notification since the last scan names a file this node just
/// published (in place as its slot records it): then there is nothing of the user's to scan,
/// and while files arrive that is most of them. Overflowed notifications count as ours (the
/// periodic rescan looks at everything).
fn only_ours(b: &Base, w: &Writer) -> bool {
    let Some(paths) = w.changed_paths(b) else {
        return true;
    };
    let l = layout::lock(&b.layout);
    paths.iter().all(|rel| {
        let Some(s) = l.slot_at(rel).and_then(|id| l.slot(id)) else {
            return false;
        };
        s.pending.is_none()
            && matches!(b.root_dir.metadata(rel), Ok(Some(m))
                if m.kind == Kind::File
                    && m.len == s.info.size
                    && stamp_time(m.mtime) == (s.info.mtime_secs, s.info.mtime_nanos))
    })
}
