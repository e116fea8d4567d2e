//! Publishing and durability on the reader: complete files staged, flushed in batches, renamed
//! into place (each after [`guard`] cleared its target: a local file this reader did not write
//! is moved aside, never overwritten), and the ledger — what this reader wrote and the version
//! reached — recorded only once the folder is durable (see `layout::publish` for the order and
//! why).

use super::{LEDGER_EVERY, Reader, conflict_reported, publish_problem, settled, update_want};
use crate::core::replicator::Replicator;
use crate::drive::app::Base;
use crate::drive::event::DriveProblem;
use crate::drive::guard;
use crate::drive::layout::{self, PublishError};
use crate::drive::ledger::{Intent, Journal};
use crate::drive::record::Entry;
use crate::storage::DiskStorage;
use std::time::{Duration, Instant};

impl Reader {
    /// Stages every complete file, and publishes the staged ones as a batch: one flush, then
    /// the renames (see `layout::publish`: bytes durable before the rename that shows them).
    /// While other files are still arriving the flush waits for company, up to [`FLUSH_AFTER`]
    /// or [`FLUSH_FILES`]; when nothing else is coming it is done at once.
    pub(super) fn publish_ready(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) {
        let mut l = layout::lock(&b.layout);
        let mut problems = Vec::new();
        for id in l.take_ready() {
            match l.stage(id) {
                Ok(()) | Err(PublishError::Gone | PublishError::Incomplete) => {}
                Err(e @ PublishError::HashMismatch(_)) => {
                    problems.push(e);
                    l.reset_pending(id);
                }
                Err(e) => problems.push(e),
            }
        }
        let staged = l.staged().len();
        let due = staged > 0
            && (l.all_staged()
                || staged >= FLUSH_FILES
                || l.staged_since().is_some_and(|t| t.elapsed() >= FLUSH_AFTER));
        drop(l);
        for e in problems {
            let p = publish_problem(b, e);
            b.problem(p);
        }
        if staged > 0 {
            // `make_durable` (on the tick) flushes what is still staged then.
            b.dirty_since.get_or_insert_with(Instant::now);
        }
        if due {
            self.flush_staged(b, r);
        }
    }

    /// Flushes the folder and renames the staged files into place, each after its target is
    /// cleared and its intent journaled. A failed flush is reported and the staged files are
    /// fetched again (their bytes may be lost, and no later flush would say so). Whether the
    /// flush succeeded (or there was nothing to flush).
    fn flush_staged(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) -> bool {
        let mut l = layout::lock(&b.layout);
        if l.staged().is_empty() {
            return true;
        }
        if let Err(e) = l.flush() {
            let lost = l.discard_staged();
            drop(l);
            // Worded the same every time: reported once however often it recurs.
            b.problem(DriveProblem::Io {
                path: b.root.clone(),
                error: format!(
                    "flushing the folder to disk failed ({e}): files not published, fetched again"
                ),
            });
            b.forget_keys(r, lost);
            update_want(b, r);
            return false;
        }
        let mut problems = Vec::new();
        let mut orphans = Vec::new();
        let mut moved = Vec::new();
        let mut journal_error = None;
        for id in l.take_staged() {
            let Some((path, info)) = l.slot(id).map(|s| (s.path.clone(), s.info.clone())) else {
                continue;
            };
            // Nothing is renamed over a file this reader did not write.
            match guard::clear(&*b.root_dir, &mut self.ledger, &path, Some(&info)) {
                Ok(cleared) => moved.push((path.clone(), cleared)),
                Err(error) => {
                    let why = format!("cannot move the local file aside: {error}");
                    self.ledger.on_disk.unpublished(&path, why);
                    problems.push(PublishError::Io { path, error });
                    l.unstage(id);
                    continue;
                }
            }
            let intent = Intent::File {
                path: path.clone(),
                hash: info.hash,
            };
            if let Some(Err(e)) = self.journal.as_mut().map(|j| j.note(&intent)) {
                journal_error = Some(e);
            }
            match l.commit(id) {
                Ok(o) => {
                    orphans.extend(o);
                    if let Ok(Some(m)) = b.root_dir.metadata(&path) {
                        self.ledger.wrote(&path, &m, info.hash);
                    }
                }
                Err(PublishError::Gone | PublishError::Incomplete) => {}
                Err(e) => {
                    self.ledger.on_disk.unpublished(&path, e.to_string());
                    problems.push(e);
                }
            }
        }
        drop(l);
        self.ledger_dirty = true;
        if let Some(e) = journal_error {
            b.problem(DriveProblem::io(&b.state_dir, &e));
        }
        for (path, cleared) in moved {
            conflict_reported(b, &path, cleared);
        }
        for e in problems {
            let p = publish_problem(b, e);
            b.problem(p);
        }
        b.stats.on_disk = self.ledger.on_disk.clone();
        b.forget_keys(r, orphans);
        b.dirty_since.get_or_insert_with(Instant::now);
        true
    }

    /// Publishes what is staged, makes the folder durable (one `syncfs`: the renames' directory
    /// entries too), and only then records the ledger (what this reader wrote, and the version
    /// the folder is at). Any flush failure is reported and nothing is recorded. Returns whether
    /// the folder is durable (both flushes succeeded).
    pub(super) fn make_durable(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) -> bool {
        if !self.flush_staged(b, r) || b.sync_folder().is_err() {
            return false;
        }
        // At the newest version: a two-way folder's is the merged tree (its version counts
        // every device's blocks merged), a one-writer folder's the feed's length.
        let at_version = settled(b)
            && !self.deferred()
            && (self.merged || r.feed(b.meta).len() == b.state.version);
        if at_version {
            self.previous = b.state.clone();
            if self.ledger.applied != self.previous.version {
                self.ledger.applied = self.previous.version;
                self.ledger_dirty = true;
            }
        }
        // While files still arrive the ledger is rewritten at most every LEDGER_EVERY (the
        // journal covers a kill in between); once settled, at once.
        let due = settled(b)
            || self
                .ledger_saved
                .is_none_or(|t| t.elapsed() >= LEDGER_EVERY);
        // Parents made since (for files whose blocks arrived): this reader's directories too.
        let made = layout::lock(&b.layout).take_made_dirs();
        if !made.is_empty() {
            self.ledger.dirs.extend(made);
            self.ledger_dirty = true;
        }
        if self.ledger_dirty && due {
            self.ledger_saved = Some(Instant::now());
            // After the sync above: no entry is durable before the file it describes.
            self.ledger.on_disk.prune(&*b.root_dir);
            b.stats.on_disk = self.ledger.on_disk.clone();
            match self.ledger.save(&*b.state_handle) {
                Ok(()) => {
                    self.ledger_dirty = false;
                    if let Some(Err(e)) = self.journal.as_mut().map(Journal::clear) {
                        b.problem(DriveProblem::io(&b.state_dir, &e));
                    }
                }
                Err(e) => b.problem(DriveProblem::io(&b.state_dir.join("ledger"), &e)),
            }
        }
        if at_version {
            // Nothing pending: any temporary file left in the folder's directories is from an
            // earlier run, for a version no longer wanted (once per run: it lists directories).
            let dirs: Vec<&str> = std::iter::once("")
                .chain(
                    b.state
                        .entries
                        .iter()
                        .filter_map(|(p, e)| e.is_dir().then_some(p.as_str())),
                )
                .collect();
            layout::lock(&b.layout).sweep_temps_once(dirs);
            if self.stamped != Some(b.state.version) {
                self.stamped = Some(b.state.version);
                self.stamp_dirs(b);
            }
        }
        true
    }

    /// Gives every directory of the version reached its recorded mtime (and mode, if made
    /// here). Last: everything made, renamed or removed in a directory moves its mtime, so
    /// only once its contents are in place does the time stay.
    fn stamp_dirs(&mut self, b: &mut Base) {
        let mut problems = Vec::new();
        for (path, e) in &b.state.entries {
            if let Entry::Directory(d) = e
                && let Err(e) = guard::apply_dir_meta(&*b.root_dir, &self.ledger, path, d)
            {
                problems.push(DriveProblem::io(&b.root.join(path), &e));
            }
        }
        for p in problems {
            b.problem(p);
        }
    }
}

/// Staged files wait at most this long for others to share their flush.
const FLUSH_AFTER: Duration = Duration::from_millis(100);

/// Staged files flushed together at most (more are flushed at once).
const FLUSH_FILES: usize = 4096;
