//! The writer's side of a running drive: import the folder at start, then on change
//! notifications (debounced) and by a periodic full rescan, the safety net under them.
//!
//! The watcher is a source of the synchronizer's select: notify's thread records the changed
//! paths and calls [`Waker::wake`], the loop calls `on_wake`, and the scan runs on the first
//! tick after the debounce time (a burst of writes makes one scan).

use crate::core::replicator::{Event, FeedId, Replicator};
use crate::drive::FolderKind;
use crate::drive::app::Base;
use crate::drive::devices;
use crate::drive::event::DriveProblem;
use crate::drive::import::{Importer, is_ours};
use crate::drive::layout;
use crate::drive::record::Record;
use crate::storage::DiskStorage;
use crate::sync::Waker;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Paths change notifications named since the last scan, and whether they overflowed.
type ChangedPaths = Arc<Mutex<(BTreeSet<PathBuf>, bool)>>;

/// Paths remembered between two scans; more than this and the next scan is a full one.
const MAX_CHANGED_PATHS: usize = 4096;

/// See the module docs.
pub(super) struct Writer {
    importer: Option<Importer>,
    /// Kept alive: dropping it stops the notifications.
    _watch: Option<notify::RecommendedWatcher>,
    waker: Option<Waker>,
    last_scan: Instant,
    /// When the last change was seen; the scan waits for a quiet `debounce` after it.
    change_seen: Option<Instant>,
    changed: ChangedPaths,
    /// When `allow`/`deny` requests were last looked for (see `drive::devices`).
    last_requests: Instant,
    /// A device of a two-way folder: its own metadata feed (the drive's is the founder's).
    /// Its scans are driven by `twoway.rs`: none at start, no requests here.
    device_meta: Option<FeedId>,
    /// Scans are driven by `twoway.rs` (none at start, no requests here).
    driven: bool,
    /// Never scans (a receive-only founder: nothing it changes goes out).
    receive_only: bool,
    /// Stays a one-writer share whatever it records (send-only).
    one_writer: bool,
    /// Recorded an `Allow`: the folder is a two-way one from now on (the app switches).
    pub two_way_seen: bool,
}

impl Writer {
    pub fn new() -> Self {
        Self {
            importer: None,
            _watch: None,
            waker: None,
            last_scan: Instant::now(),
            change_seen: None,
            changed: ChangedPaths::default(),
            last_requests: Instant::now(),
            device_meta: None,
            driven: false,
            receive_only: false,
            one_writer: false,
            two_way_seen: false,
        }
    }

    /// A one-writer share of a folder of `kind` (see [`FolderKind`]).
    pub fn with_kind(self, kind: FolderKind) -> Self {
        Self {
            receive_only: kind == FolderKind::ReceiveOnly,
            one_writer: kind == FolderKind::SendOnly,
            ..self
        }
    }

    /// A joined device's send-only share of its own feeds (`meta` its metadata feed).
    pub fn send_only(meta: FeedId) -> Self {
        Self {
            device_meta: Some(meta),
            one_writer: true,
            ..Self::new()
        }
    }

    /// The writer of a device of a two-way folder, whose own metadata feed is `meta`.
    pub fn device(meta: FeedId) -> Self {
        Self {
            device_meta: Some(meta),
            driven: true,
            ..Self::new()
        }
    }

    /// Whether its importer runs (it could not be made for a folder whose state directory
    /// cannot be told apart).
    pub fn has_importer(&self) -> bool {
        self.importer.is_some()
    }

    /// The importer (once started).
    pub fn importer_mut(&mut self) -> Option<&mut Importer> {
        self.importer.as_mut()
    }

    /// Scans the whole folder on the next tick.
    pub fn rescan_soon(&mut self) {
        self.changed.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.change_seen = Some(Instant::now() - std::time::Duration::from_secs(1));
    }

    pub fn set_waker(&mut self, waker: Waker) {
        self.waker = Some(waker);
    }

    pub fn start(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) {
        // Invariant: `Drive::into_app_at` builds a writer only with its content feed.
        let content = b.content.expect("a writer opens its content feed");
        match Importer::new(
            r,
            self.device_meta.unwrap_or(b.meta),
            content,
            b.layout.clone(),
            b.root_dir.clone(),
            b.root.clone(),
        ) {
            // Without knowing its state directory, a scan could import it (key and all) from
            // under another name: no importer then.
            Ok(mut i) => match i.keep_out(&*b.state_handle) {
                Ok(()) => self.importer = Some(i),
                Err(e) => b.problem(DriveProblem::io(&b.state_dir, &e)),
            },
            Err(e) => b.problem(DriveProblem::Scan {
                folder: b.root.clone(),
                error: e.to_string(),
            }),
        }
        if b.options.follow {
            self.start_watch(b);
        }
        if !self.driven {
            self.scan(b, r, true);
        }
    }

    /// A file changed in a way its size and mtime did not show (or before the watcher said
    /// so): serving found a block that no longer matches. Re-read the files holding it.
    pub fn on_event(&mut self, b: &mut Base, event: &Event) {
        let Event::DataChanged { feed, index } = event else {
            return;
        };
        if Some(*feed) != b.content {
            return;
        }
        let paths = layout::lock(&b.layout).holders(*index);
        let mut c = self.changed.lock().unwrap_or_else(|p| p.into_inner());
        for p in paths {
            c.0.insert(b.root.join(&p));
            if let Some(i) = &mut self.importer {
                i.force(p);
            }
        }
        drop(c);
        self.change_seen.get_or_insert_with(Instant::now);
    }

    /// The watcher saw a change: restart the debounce.
    pub fn on_wake(&mut self, _b: &mut Base, _r: &mut Replicator<DiskStorage>) {
        self.change_seen = Some(Instant::now());
    }

    pub fn on_tick(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>, now: Instant) {
        if !self.driven && now.duration_since(self.last_requests) >= devices::REQUEST_POLL {
            self.last_requests = now;
            self.take_requests(b, r);
        }
        if self.scan_due(b, now) {
            let periodic = self.rescan_due(b, now);
            self.change_seen = None;
            self.scan(b, r, periodic);
        }
    }

    /// Scans the whole folder now (a two-way device's first scan, before its first
    /// reconcile).
    pub fn scan_now(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) {
        self.change_seen = None;
        self.scan(b, r, true);
    }

    /// Whether the next tick scans (a change seen and quiet for the debounce time, or the
    /// periodic rescan due).
    pub fn scan_due(&self, b: &Base, now: Instant) -> bool {
        b.options.follow
            && (self
                .change_seen
                .is_some_and(|t| now.duration_since(t) >= b.options.debounce)
                || self.rescan_due(b, now))
    }

    /// The paths change notifications named since the last scan (relative to the folder),
    /// or `None` if they overflowed or one is outside it.
    pub fn changed_paths(&self, b: &Base) -> Option<Vec<String>> {
        let c = self.changed.lock().unwrap_or_else(|p| p.into_inner());
        if c.1 {
            return None;
        }
        c.0.iter()
            .map(|p| {
                p.strip_prefix(&b.root)
                    .ok()
                    .and_then(|r| r.to_str())
                    .map(str::to_owned)
            })
            .collect()
    }

    /// Forgets the change notifications seen (they were this node's own writes).
    pub fn forget_changes(&mut self) {
        self.changed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clear();
        self.change_seen = None;
    }

    /// Whether the periodic rescan is due.
    pub fn rescan_due(&self, b: &Base, now: Instant) -> bool {
        now.duration_since(self.last_scan) >= b.options.rescan_interval
    }

    /// Answers `allow`/`deny` requests left by the CLI: the records go through the importer's
    /// commit, like a scan's (flushed before any peer hears of them).
    fn take_requests(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>) {
        let Some(importer) = &mut self.importer else {
            return;
        };
        let stems = devices::waiting_requests(&*b.state_handle);
        if stems.is_empty() {
            return;
        }
        let merge = devices::merge_of(r.feed_mut(self.device_meta.unwrap_or(b.meta)));
        let state = &mut b.state;
        let seen = &mut self.two_way_seen;
        let one_writer = self.one_writer;
        devices::take_requests(&*b.state_handle, &stems, &merge, |recs| {
            *seen |= !one_writer && recs.iter().any(|r| matches!(r, Record::Allow { .. }));
            importer
                .commit(r, state, recs)
                .map(|_| state.version)
                .map_err(|e| e.to_string())
        });
    }

    fn start_watch(&mut self, b: &mut Base) {
        use notify::Watcher;
        let state_root = b.root.clone();
        let changed = self.changed.clone();
        let waker = self.waker.clone();
        let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            {
                let mut c = changed.lock().unwrap_or_else(|p| p.into_inner());
                match ev {
                    Ok(ev) => {
                        // Ours, or a nested drive's (judged below the root only), or a
                        // reader's temporary file: never imported, so no reason to scan.
                        let is_state = |p: &PathBuf| {
                            p.strip_prefix(&state_root).map_or(true, |rel| {
                                rel.components()
                                    .any(|c| c.as_os_str().to_str().is_some_and(is_ours))
                            })
                        };
                        if matches!(ev.kind, notify::EventKind::Access(_))
                            || ev.paths.iter().all(is_state)
                        {
                            // Reads (our own scans and serving open files all the time) and
                            // our own state churning change nothing.
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
            }
            if let Some(w) = &waker {
                w.wake(); // never blocks; wakes coalesce
            }
        });
        match watcher {
            Ok(mut w) => match w.watch(&b.root, notify::RecursiveMode::Recursive) {
                Ok(()) => self._watch = Some(w),
                Err(e) => b.problem(DriveProblem::Watch {
                    folder: b.root.clone(),
                    error: e.to_string(),
                }),
            },
            Err(e) => b.problem(DriveProblem::Watch {
                folder: b.root.clone(),
                error: format!("no file watcher: {e}"),
            }),
        }
    }

    fn scan(&mut self, b: &mut Base, r: &mut Replicator<DiskStorage>, full: bool) {
        if self.receive_only {
            return;
        }
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
            importer.scan_paths(r, &mut b.state, &paths)
        };
        let result = match targeted {
            Ok(Some(rep)) => Ok(rep),
            Ok(None) => importer.scan(r, &mut b.state),
            Err(e) => Err(e),
        };
        match result {
            Ok(rep) => {
                for (path, reason) in rep.skipped {
                    b.reporter.skipped(path, reason, true);
                }
                for (path, reason) in rep.unshared {
                    b.reporter.skipped(path, reason, false);
                }
                for (version, counts) in rep.versions {
                    b.reporter.send(counts.event(version));
                }
                if rep.unstable > 0 {
                    // Something is still being written: look again soon.
                    self.change_seen = Some(Instant::now());
                }
            }
            Err(e) => b.problem(DriveProblem::Scan {
                folder: b.root.clone(),
                error: e.to_string(),
            }),
        }
    }
}
