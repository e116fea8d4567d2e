//! The reader's side of a running drive: apply metadata as it is verified, plan the way from
//! the folder's version to the newest ([`reconcile::plan`]), carry the plan out (fetch and
//! reuse, remove, make directories), steer the download to exactly the missing blocks, and
//! publish each file when complete.
//!
//! Order of an update: new files become pending and reuse local blocks *before* removed files
//! are deleted (so a rename reuses the old file's bytes), then removals, then directories, then
//! publishes. After a batch of publishes, one `syncfs`, then the reader's [`Ledger`] (what it
//! wrote, and the version reached) is rewritten in `.feedsync/ledger`.
//!
//! Whatever replaces or deletes something on disk asks [`guard`] first, which answers from the
//! ledger alone: a file this reader did not write, or that changed since it wrote it, is never
//! overwritten (it becomes a conflict copy) nor deleted (it is kept and reported). A local file
//! already identical (size and whole-file hash) to one to fetch is taken as is.

use crate::core::Feed;
use crate::core::replicator::{Event, Replicator};
use crate::drive::app::Base;
use crate::drive::event::{Counts, DriveEvent, DriveProblem};
use crate::drive::guard::{self, Cleared, Removed};
use crate::drive::layout::{self, FolderBlocks, PublishError};
use crate::drive::ledger::{Intent, Journal, Ledger};
use crate::drive::log;
use crate::drive::reconcile::{self, Local};
use crate::drive::record::{self, Entry, State};
use crate::fsio::Kind;
use crate::storage::DiskStorage;
use fetch::{drop_stale_pending, fill_from_local, update_want};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

mod durable;
mod fetch;

/// See the module docs.
pub(super) struct Reader {
    /// What the folder holds now: the version last applied.
    previous: State,
    /// The version last reported [`DriveEvent::Complete`] for.
    complete_at: Option<u64>,
    /// Files of the newest version not taken on yet, over the budget of blocks fetched at
    /// once ([`Limits::max_pending_blocks`](crate::drive::Limits)): reconciled again as soon
    /// as the files taken on are done.
    over_budget: bool,
    /// The first file reaching past the content feed's verified length (its path, the first
    /// block it lacks, since when): such files are reconciled again when the content feed
    /// grows.
    waiting: Option<(String, u64, Instant)>,
    /// What this reader wrote (see [`crate::drive::ledger`]); loaded at start.
    ledger: Ledger,
    /// The ledger changed since it was last written.
    ledger_dirty: bool,
    /// Intents noted since the ledger was last written (opened at start).
    journal: Option<Journal>,
    /// When the ledger was last written.
    ledger_saved: Option<Instant>,
    /// The version whose directories were last given their recorded mtimes and modes.
    stamped: Option<u64>,
    /// A two-way folder's: `twoway.rs` merges the devices' metadata into the state and asks
    /// for a reconcile; this reader applies no metadata itself.
    merged: bool,
    /// Met a [`Record::Allow`](record::Record::Allow) in the folder's feed: the folder is a
    /// two-way one, to be read through the merge from here on (applied no further).
    pub two_way_seen: bool,
}

impl Reader {
    pub fn new(previous: State) -> Self {
        Self {
            previous,
            complete_at: None,
            over_budget: false,
            waiting: None,
            ledger: Ledger::default(),
            ledger_dirty: false,
            journal: None,
            ledger_saved: None,
            stamped: None,
            merged: false,
            two_way_seen: false,
        }
    }

    /// Reads a two-way folder from here on (see the field).
    pub fn set_merged(&mut self) {
        self.merged = true;
    }

    /// What this reader wrote (two-way: and what this device's importer read).
    pub fn ledger_mut(&mut self) -> &mut Ledger {
        self.ledger_dirty = true;
        &mut self.ledger
    }

    /// The version the folder was last brought to.
    pub fn applied_version(&self) -> u64 {
        self.previous.version
    }

    pub fn start(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) {
        self.load(b, r);
        // Metadata held from an earlier run: bring the folder up to it.
        if let Some(c) = b.content {
            r.set_ordered(c, true);
            self.reconcile(b, r);
        }
        self.apply_metadata(b, r);
    }

    /// The first half of [`Reader::start`]: the ledger (and what a killed run was about to
    /// write), and the files found in place checked against it. A two-way device scans its
    /// own edits between this and its first reconcile.
    pub fn load(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) {
        self.load_ledger(b);
        let orphans = guard::check_in_place(b, &mut self.ledger, &self.previous);
        b.forget_keys(r, orphans);
    }

    /// [`Reader::load`] for a share becoming two-way: the files in the layout are what its own
    /// importer read, so each still at its recorded size and mtime is taken as ours with one
    /// `stat` (`guard::trust_in_place`), not hashed — a big folder would otherwise be read
    /// whole inside one tick of the loop.
    pub fn load_trusting(&mut self, b: &mut Base) {
        self.load_ledger(b);
        guard::trust_in_place(b, &mut self.ledger, &self.previous);
    }

    fn load_ledger(&mut self, b: &mut Base) {
        self.ledger = match Ledger::load(&*b.state_handle) {
            Ok(l) => l,
            Err(e) => {
                // Nothing counts as ours then: files are kept or moved aside, never lost.
                b.problem(DriveProblem::io(&b.state_dir, &e));
                Ledger::default()
            }
        };
        // What a killed run was about to write and did.
        self.ledger
            .replay(&*b.root_dir, Journal::read(&*b.state_handle));
        self.journal = Some(Journal::new(b.state_handle.clone()));
        self.ledger_dirty = true;
        b.stats.on_disk = self.ledger.on_disk.clone();
    }

    /// Makes what was published durable now (instead of on a later tick): a two-way device
    /// about to scan its own edits. Whether it succeeded (a failure is reported).
    pub fn flush_now(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) -> bool {
        self.make_durable(b, r)
    }

    /// What this reader wrote (and, two-way, what this device's importer read).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn on_event(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>, event: &Event) {
        match event {
            Event::Downloaded { feed, bytes, .. } if b.is_content(*feed) => {
                b.stats.received += bytes;
                self.publish_ready(b, r);
            }
            Event::Downloaded { feed, .. } | Event::Upgraded { feed, .. } if *feed == b.meta => {
                self.apply_metadata(b, r);
            }
            Event::Upgraded { feed, .. } if b.is_content(*feed) && self.deferred() => {
                // Files waiting for the content feed to be long enough.
                self.reconcile(b, r);
            }
            Event::StorageError { feed, error } if *feed == b.meta || b.is_content(*feed) => {
                let what = if *feed == b.meta {
                    "storing metadata"
                } else {
                    "storing content"
                };
                b.problem(DriveProblem::storage(&b.root, what, error));
            }
            _ => {}
        }
    }

    pub fn on_tick(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>, now: Instant) {
        if b.dirty_since
            .is_some_and(|t| now.duration_since(t) >= Duration::from_millis(200))
        {
            // A failure is reported inside; the next tick tries again.
            let _ = self.make_durable(b, r);
        }
        if self.over_budget && settled(b) {
            // The files taken on are done: the next ones.
            self.reconcile(b, r);
        }
        self.report_complete(b, r);
    }

    /// Files of the newest version not taken on yet (see the fields).
    pub fn deferred(&self) -> bool {
        self.over_budget || self.waiting.is_some()
    }

    /// What the folder held when it was last brought to a version completely.
    pub fn previous(&self) -> &State {
        &self.previous
    }

    /// Once per version reached: made durable, then [`DriveEvent::Complete`].
    fn report_complete(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) {
        if self.complete_at != Some(b.state.version)
            && self.is_done(b, r)
            && self.make_durable(b, r)
        {
            self.complete_at = Some(b.state.version);
            b.reporter.send(DriveEvent::Complete {
                version: b.state.version,
            });
        }
    }

    /// Files complete but not published (a full disk, say) are tried again; a file still
    /// waiting for content the writer never signed is reported (once).
    pub fn each_second(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) {
        if layout::lock(&b.layout).pending_count() > 0 {
            layout::lock(&b.layout).requeue_complete();
            self.publish_ready(b, r);
        }
        if let Some((path, key, since)) = &self.waiting
            && since.elapsed() >= WAIT_REPORT
            && let Some((content, block)) = b.locate(*key)
        {
            // An honest writer signs content before the records naming it: a wait that lasts
            // is a writer's records pointing past its content.
            let p = DriveProblem::WaitingForContent {
                folder: b.root.clone(),
                version: b.state.version,
                path: path.clone(),
                block,
                signed: r.feed(content).len(),
            };
            b.problem(p);
        }
    }

    /// At the newest version a peer proved this session, with every file in place. A node that
    /// never heard from a peer is never done: the version it holds may be long out of date.
    pub fn is_done(&self, b: &Base, r: &Replicator<DiskStorage>) -> bool {
        let meta = r.feed(b.meta);
        let Some(content) = b.content else {
            return false;
        };
        // An empty content feed has no signed length to prove: required only once the newest
        // version references content blocks (asked last: it walks the entries).
        let needs_content = || {
            b.state
                .entries
                .values()
                .any(|e| matches!(e, Entry::File(f) if f.size > 0))
        };
        !meta.is_empty()
            && r.peer_proved(b.meta)
            && r.is_complete(b.meta)
            && b.state.version == meta.len()
            && (r.peer_proved(content) || !needs_content())
            && !self.deferred()
            && settled(b)
    }

    pub fn shutdown(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) {
        self.publish_ready(b, r);
        self.ledger_saved = None; // written now, settled or not
        let _ = self.make_durable(b, r); // a failure is reported inside
        // `--once` stops as soon as the loop sees the job done, maybe before a tick said so.
        self.report_complete(b, r);
    }

    /// Applies newly verified metadata blocks.
    fn apply_metadata(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) {
        if self.merged || self.two_way_seen {
            return;
        }
        let mut changed = false;
        loop {
            let i = b.state.version;
            let feed = r.feed_mut(b.meta);
            if i >= feed.len() || !feed.has(i) {
                break;
            }
            let block = match feed.get(i) {
                Ok(block) => block,
                Err(e) => {
                    // Damaged on disk (it was verified when stored): given up, so the
                    // replicator fetches it again, and applied when it comes back.
                    let forgot = r.forget(b.meta, i..i + 1);
                    b.problem(DriveProblem::Storage {
                        folder: b.root.clone(),
                        what: format!("reading version {}", i + 1),
                        error: match forgot {
                            Ok(()) => format!("{e}; fetching it again"),
                            Err(f) => format!("{e}; cannot give it up either: {f}"),
                        },
                    });
                    break;
                }
            };
            let checked = match record::decode(i, &block) {
                Ok(recs)
                    if recs
                        .iter()
                        .any(|r| matches!(r, record::Record::Allow { .. })) =>
                {
                    // Another device may write: read through the merge from here (the app
                    // switches this reader over on its next tick).
                    self.two_way_seen = true;
                    break;
                }
                Ok(recs) => content_key_free(b, r, &recs).and_then(|()| {
                    let counts = Counts::of(&log::changes(&b.state, &recs));
                    let limits = b.options.limits;
                    b.state.apply_checked(recs, &limits).map(|()| counts)
                }),
                Err(e) => Err(e),
            };
            match checked {
                Ok(counts) => {
                    if i > 0 {
                        b.reporter.send(counts.event(b.state.version));
                    }
                    changed = true;
                }
                Err(e) => {
                    // A signed record we refuse: nothing of it is applied, and nothing after.
                    b.problem(DriveProblem::UnsafeRecord {
                        folder: b.root.clone(),
                        version: i + 1,
                        reason: e.to_string(),
                    });
                    return;
                }
            }
        }
        if b.content.is_none()
            && let Some(key) = b.state.content_key
        {
            // Through the state directory's handle (made if missing), locked like the others.
            let store = crate::drive::dirs::open_store(
                &*b.state_handle,
                &b.root,
                "content",
                true,
                Some(Box::new(FolderBlocks::new(b.layout.clone()))),
            );
            match store.map_err(|e| e.to_string()).and_then(|(s, lock)| {
                let feed = Feed::create_replica(s, key).map_err(|e| e.to_string())?;
                Ok((feed, lock))
            }) {
                Ok((feed, lock)) => {
                    b.locks.push(lock);
                    let id = r.add_feed(feed, true);
                    r.set_ordered(id, true);
                    b.content = Some(id);
                    changed = true;
                }
                Err(e) => {
                    b.problem(DriveProblem::Storage {
                        folder: b.root.clone(),
                        what: "opening the content feed".into(),
                        error: e.to_string(),
                    });
                    return;
                }
            }
        }
        if changed {
            self.reconcile(b, r);
        }
    }

    /// Brings the folder from `previous` towards the newest state: plans, then carries out.
    pub fn reconcile(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) {
        if b.content.is_none() {
            return; // a fresh clone's, before metadata block 0 named it
        }
        let plan = {
            // Borrowed from the layout, locked while planning (no copy of every slot's record).
            let l = layout::lock(&b.layout);
            let local: BTreeMap<&str, Local<'_>> = l
                .slots()
                .filter(|(id, s)| l.slot_at(&s.path) == Some(*id)) // not a shadowed old one
                .map(|(_, s)| {
                    let local = Local {
                        info: &s.info,
                        in_place: s.pending.is_none(),
                    };
                    (s.path.as_str(), local)
                })
                .collect();
            let lens: Vec<(u16, u64)> = b
                .content_feeds()
                .map(|(t, f)| (t, r.feed(f).len()))
                .collect();
            let held = |k| b.holds(r, k);
            reconcile::plan(
                &self.previous.entries,
                &b.state.entries,
                &self.ledger,
                &local,
                |tag| lens.iter().find(|(t, _)| *t == tag).map_or(0, |(_, n)| *n),
                held,
            )
        };
        let mut orphans = BTreeSet::new();
        // 1. Fetch, reusing what is here, before anything is removed. Reassembly state costs
        //    memory per file and per position written, so files are taken on up to a budget
        //    of blocks at a time (the rest when those are done); one file over the budget is
        //    taken on alone. Files reaching past the verified content wait.
        self.over_budget = false;
        self.waiting = match (plan.waiting.first(), self.waiting.take()) {
            (Some((p, x)), Some(old)) if old.0 == *p && old.1 == *x => Some(old),
            (Some((p, x)), _) => Some((p.clone(), *x, Instant::now())),
            (None, _) => None,
        };
        let mut budget = {
            let l = layout::lock(&b.layout);
            let busy: u64 = l
                .slots()
                .filter(|(_, s)| s.pending.is_some())
                .map(|(_, s)| s.info.blocks())
                .sum();
            b.options.limits.max_pending_blocks.saturating_sub(busy)
        };
        for (path, _) in &plan.waiting {
            drop_stale_pending(b, path, &mut orphans);
        }
        self.ledger_dirty = true;
        for f in plan.fetch {
            let written_here = guard::written_here(&*b.root_dir, &self.ledger, &f.path);
            if guard::in_place(&*b.root_dir, &mut self.ledger, &f.path, &f.info) {
                // Already here, byte for byte (an adopted folder, a restart after a kill, a
                // `chmod` or `touch` on the writer): taken as is, neither fetched nor
                // rewritten. A file this reader wrote follows the record's mode and mtime; an
                // adopted one keeps the user's.
                if written_here
                    && let Err(e) =
                        guard::apply_file_meta(&*b.root_dir, &mut self.ledger, &f.path, &f.info)
                {
                    b.problem(DriveProblem::io(&b.root.join(&f.path), &e));
                }
                let mut l = layout::lock(&b.layout);
                if let Some(old) = l.slot_at(&f.path) {
                    orphans.extend(l.remove(old));
                }
                l.add_live(f.path, f.info);
                continue;
            }
            let blocks = f.info.blocks();
            if blocks > budget && layout::lock(&b.layout).pending_count() > 0 {
                self.over_budget = true;
                drop_stale_pending(b, &f.path, &mut orphans);
                continue;
            }
            budget = budget.saturating_sub(blocks);
            let id = layout::lock(&b.layout).add_pending(f.path, f.info);
            fill_from_local(b, r, id, &f.reuse);
        }
        // 2. Removals: only what this reader wrote and nobody changed since.
        for rm in &plan.remove {
            {
                let mut l = layout::lock(&b.layout);
                if let Some(id) = l.slot_at(&rm.path) {
                    orphans.extend(l.remove(id));
                }
            }
            match guard::remove(&*b.root_dir, &mut self.ledger, &rm.path) {
                Ok(Removed::Gone) => {}
                Ok(Removed::Kept) => b.problem(DriveProblem::KeptLocal {
                    folder: b.root.clone(),
                    path: rm.path.clone(),
                }),
                Err(e) => b.problem(DriveProblem::io(&b.root.join(&rm.path), &e)),
            }
        }
        for d in &plan.remove_dirs {
            guard::remove_dir(&*b.root_dir, &mut self.ledger, d);
        }
        // 3. Directories. Those made already as parents (of a temporary file in step 1, say)
        //    were made by this reader too.
        let made = layout::lock(&b.layout).take_made_dirs();
        self.ledger.dirs.extend(made);
        for d in &plan.make_dirs {
            // The parents through the root handle (no symlink on the way, made if missing).
            let parents = layout::lock(&b.layout).make_parents(d);
            if let Err(e) = parents {
                b.problem(publish_problem(b, e));
                continue;
            }
            if !matches!(b.root_dir.metadata(d), Ok(Some(m)) if m.kind == Kind::Dir) {
                self.note(b, Intent::Dir { path: d.clone() });
            }
            match guard::make_dir(&*b.root_dir, &mut self.ledger, d) {
                Ok(cleared) => conflict_reported(b, d, cleared),
                Err(e) => b.problem(DriveProblem::io(&b.root.join(d), &e)),
            }
        }
        // 4. Symlinks, once their parents are there. A file of the layout at the path (the
        //    writer replaced a file by a link) leaves it first: else it would still count as
        //    in place, and the same file put back later would never be published again.
        for (path, link) in &plan.links {
            {
                let mut l = layout::lock(&b.layout);
                if let Some(id) = l.slot_at(path) {
                    orphans.extend(l.remove(id));
                }
            }
            let parents = layout::lock(&b.layout).make_parents(path);
            if let Err(e) = parents {
                b.problem(publish_problem(b, e));
                continue;
            }
            match guard::place_link(&*b.root_dir, &mut self.ledger, path, link) {
                Ok(cleared) => conflict_reported(b, path, cleared),
                Err(e) => {
                    self.ledger.on_disk.unpublished(path, e.to_string());
                    b.problem(DriveProblem::io(&b.root.join(path), &e));
                }
            }
        }
        b.stats.on_disk = self.ledger.on_disk.clone();
        // The ledger changed: written with the next durable point.
        b.dirty_since.get_or_insert_with(Instant::now);
        if !orphans.is_empty() {
            let l = layout::lock(&b.layout);
            let orphans: Vec<u64> = orphans.into_iter().filter(|x| !l.is_owned(*x)).collect();
            drop(l);
            b.forget_keys(r, orphans);
        }
        self.publish_ready(b, r);
        update_want(b, r);
    }
}

impl Reader {
    /// Notes in the journal what is about to be written (see [`crate::drive::ledger`]).
    fn note(&mut self, b: &mut Base, intent: Intent) {
        if let Some(Err(e)) = self.journal.as_mut().map(|j| j.note(&intent)) {
            b.problem(DriveProblem::io(&b.state_dir, &e));
        }
    }
}

/// Reports a local file moved aside to a conflict copy.
fn conflict_reported(b: &mut Base, path: &str, cleared: Cleared) {
    if let Cleared::MovedAside(copy) = cleared {
        b.problem(DriveProblem::Conflict {
            folder: b.root.clone(),
            path: path.to_string(),
            copy,
        });
    }
}

/// While files still arrive, the ledger is rewritten at most this often: a bulk clone of many
/// small files would otherwise rewrite it (all of it) every 200 ms.
const LEDGER_EVERY: Duration = Duration::from_secs(2);

/// How long a file waits for content the writer has not signed before that is reported.
const WAIT_REPORT: Duration = Duration::from_secs(3);

/// Refuses an `Init` naming, as the content feed, a feed this node already has (the drive's
/// own metadata feed, or another folder's feed): two drives on one feed would break both.
fn content_key_free(
    b: &Base,
    r: &Replicator<DiskStorage>,
    records: &[record::Record],
) -> Result<(), record::RecordError> {
    for rec in records {
        if let record::Record::Init { content_key, .. } = rec {
            let taken = (0..r.feed_count())
                .filter(|&id| Some(id) != b.content)
                .any(|id| r.feed(id).public_key() == *content_key);
            if taken {
                return Err(record::RecordError::ContentKeyInUse);
            }
        }
    }
    Ok(())
}

/// No file pending.
pub(super) fn settled(b: &Base) -> bool {
    layout::lock(&b.layout).pending_count() == 0
}

/// A publish failure as a problem naming the folder and path.
fn publish_problem(b: &Base, e: PublishError) -> DriveProblem {
    match e {
        PublishError::HashMismatch(path) => DriveProblem::HashMismatch {
            folder: b.root.clone(),
            path,
        },
        PublishError::Unsafe { path, why } => DriveProblem::UnsafeTarget {
            folder: b.root.clone(),
            path,
            why,
        },
        PublishError::Io { path, error } => DriveProblem::io(&b.root.join(path), &error),
        PublishError::Gone | PublishError::Incomplete => DriveProblem::Io {
            path: b.root.clone(),
            error: e.to_string(),
        },
    }
}
