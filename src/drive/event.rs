//! What a running drive tells the outside: typed events, never printed by the library.
//!
//! A [`DriveApp`](crate::drive::DriveApp) sends [`DriveEvent`]s on the channel given in
//! [`AppOptions::events`](crate::drive::AppOptions::events) with `try_send`: the synchronizer
//! loop never waits for whoever renders them (the CLI draws a progress line, the daemon logs
//! with `tracing`), and a full channel drops the event. [`Reporter`] keeps the rules that make
//! the stream calm: a problem once per distinct problem, a skipped path once per path, progress
//! at most once per interval and only when its figures changed.

pub use crate::drive::transfer::{MAX_PEERS_KEPT, PeerTransfer, Transfers};
use crossbeam_channel::Sender;
use serde::Serialize;
use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Something a running drive reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriveEvent {
    /// The figures of `status`, at most every [`AppOptions::progress`](crate::drive::AppOptions)
    /// and only when they changed (none while idle).
    Progress(Stats),
    /// One version imported (writer) or accepted to apply (reader): what it changed.
    Changed {
        /// The version (number of metadata blocks) this change made.
        version: u64,
        /// Paths that appeared (files and directories).
        added: u64,
        /// Files whose content or metadata changed.
        modified: u64,
        /// Paths removed.
        removed: u64,
    },
    /// A path left out of the share (a symlink, an unreadable file): once per path per process.
    Skipped {
        /// The path (absolute).
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A problem that needs a person, once per distinct problem.
    Problem(DriveProblem),
    /// A reader's folder is at the newest version a peer proved this session.
    Complete {
        /// That version.
        version: u64,
    },
}

/// How many paths one version added, modified and removed (a rename counts as one added and
/// one removed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Paths that appeared.
    pub added: u64,
    /// Files changed in place.
    pub modified: u64,
    /// Paths removed.
    pub removed: u64,
}

impl Counts {
    /// Counts `changes`.
    pub fn of(changes: &[crate::drive::log::Change]) -> Self {
        use crate::drive::log::Change;
        let mut c = Self::default();
        for ch in changes {
            match ch {
                Change::Add { .. } | Change::AddDir { .. } => c.added += 1,
                Change::Modify { .. } => c.modified += 1,
                Change::Remove { .. } | Change::RemoveDir { .. } => c.removed += 1,
                Change::Rename { .. } => {
                    c.added += 1;
                    c.removed += 1;
                }
                // Who may write changes no file.
                Change::Allow { .. } | Change::Deny { .. } => {}
            }
        }
        c
    }

    /// The event for `version`.
    pub fn event(self, version: u64) -> DriveEvent {
        DriveEvent::Changed {
            version,
            added: self.added,
            modified: self.modified,
            removed: self.removed,
        }
    }
}

/// A problem a running drive met, naming the folder, the path or version, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriveProblem {
    /// A signed version holds a record this node refuses (an unsafe path, bad extents): none of
    /// it, and nothing after it, is applied.
    #[error("{}: refusing version {version}: {reason}", folder.display())]
    UnsafeRecord {
        /// The folder.
        folder: PathBuf,
        /// The version refused.
        version: u64,
        /// Why (names the path).
        reason: String,
    },
    /// A file of the newest version names content blocks the writer has not signed (an honest
    /// writer signs content first): it is not taken on, and nothing is set up for it, until the
    /// content feed is long enough.
    #[error(
        "{}: version {version}: {path:?} needs content block {block}, beyond the {signed} blocks the writer signed; waiting for them",
        folder.display()
    )]
    WaitingForContent {
        /// The folder.
        folder: PathBuf,
        /// The newest version applied.
        version: u64,
        /// The file's path.
        path: String,
        /// The first block it lacks.
        block: u64,
        /// The content feed's verified length.
        signed: u64,
    },
    /// A path whose parents would lead out of the folder (a symlink or a file in the way).
    #[error("{}: {path}: refused, {why}", folder.display())]
    UnsafeTarget {
        /// The folder.
        folder: PathBuf,
        /// The record's path.
        path: String,
        /// Why.
        why: &'static str,
    },
    /// A reassembled file did not hash to its recorded value; it is fetched again.
    #[error("{}: {path}: reassembled content does not match its recorded hash", folder.display())]
    HashMismatch {
        /// The folder.
        folder: PathBuf,
        /// The record's path.
        path: String,
    },
    /// The disk is full; work is retried and resumes when there is room.
    #[error("{}: disk full ({error}); free some space, feedsync retries", path.display())]
    DiskFull {
        /// The file or folder being written.
        path: PathBuf,
        /// The system's words.
        error: String,
    },
    /// Any other file system failure.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The system's words.
        error: String,
    },
    /// A feed store failed (reading or storing a block, opening the content feed).
    #[error("{}: {what}: {error}", folder.display())]
    Storage {
        /// The folder.
        folder: PathBuf,
        /// What was being done.
        what: String,
        /// Why it failed.
        error: String,
    },
    /// The folder cannot be watched; changes are found by the periodic rescan only.
    #[error("{}: not watched ({error}); relying on rescans", folder.display())]
    Watch {
        /// The folder.
        folder: PathBuf,
        /// Why.
        error: String,
    },
    /// A local file was in the way of the writer's version (made here, or changed here since
    /// this reader wrote it): it was renamed to a conflict copy, never overwritten, and the
    /// writer's version took its path.
    #[error(
        "{}: {path}: changed here; your version is kept as {copy}, the shared one is at {path}",
        folder.display()
    )]
    Conflict {
        /// The folder.
        folder: PathBuf,
        /// The drive's path.
        path: String,
        /// Where the local file is now (relative to the folder).
        copy: String,
    },
    /// The writer removed a path whose local file this reader did not write (or that changed
    /// here since): the file is kept in place, and no longer synced.
    #[error(
        "{}: {path}: removed from the share but changed here; kept, no longer synced",
        folder.display()
    )]
    KeptLocal {
        /// The folder.
        folder: PathBuf,
        /// The drive's path.
        path: String,
    },
    /// A scan of the folder failed as a whole.
    #[error("{}: scanning: {error}", folder.display())]
    Scan {
        /// The folder.
        folder: PathBuf,
        /// Why.
        error: String,
    },
}

impl DriveProblem {
    /// Whether this problem is about the user's own files (a conflict copy, a kept file):
    /// `status` lists those apart, as differences on disk.
    pub fn is_on_disk(&self) -> bool {
        matches!(self, Self::Conflict { .. } | Self::KeptLocal { .. })
    }

    /// A file-system error at `path`, told apart when it means the disk is full.
    pub fn io(path: &Path, e: &io::Error) -> Self {
        if e.kind() == io::ErrorKind::StorageFull {
            Self::DiskFull {
                path: path.to_path_buf(),
                error: e.to_string(),
            }
        } else {
            Self::Io {
                path: path.to_path_buf(),
                error: e.to_string(),
            }
        }
    }

    /// A feed-store failure (the replicator's `StorageError`), told apart when it means the
    /// disk is full (ENOSPC).
    pub fn storage(folder: &Path, what: &str, failure: &crate::core::StorageFailure) -> Self {
        let error = failure.to_string();
        if failure.kind == Some(io::ErrorKind::StorageFull) || error.contains("os error 28") {
            Self::DiskFull {
                path: folder.to_path_buf(),
                error,
            }
        } else {
            Self::Storage {
                folder: folder.to_path_buf(),
                what: what.to_string(),
                error,
            }
        }
    }
}

/// Progress figures, also written to `status.json`.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
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
    /// Bytes of blocks of this folder (both feeds) sent to peers this session: what this node
    /// spent of its uplink on the swarm. Counted when handed to a peer's connection (a block
    /// still queued when the connection drops counts; TCP and protocol framing do not).
    pub uploaded: u64,
    /// Per peer seen this session (also after it left), what went each way; at most
    /// [`MAX_PEERS_KEPT`], the least recently active dropped first.
    pub transfer: Vec<PeerTransfer>,
    /// Problems that need a person (unsafe paths, hash mismatches, disk errors).
    pub errors: Vec<String>,
    /// Reader: what differs on disk from the drive (conflict copies made, local files kept,
    /// paths not published), at the top level of `status.json`.
    #[serde(flatten)]
    pub on_disk: crate::drive::ledger::OnDisk,
}

impl Stats {
    /// The figures whose change is worth a progress event (the rate follows from them).
    fn figures(&self) -> [u64; 8] {
        [
            self.version,
            self.latest_version,
            self.files_total,
            self.files_done,
            self.bytes_total,
            self.bytes_done,
            self.peers,
            self.errors.len() as u64,
        ]
    }
}

/// Problems kept for `status` (more would only repeat the kind).
const MAX_KEPT: usize = 100;

/// Sends a drive's events under the rules in the module docs, and keeps its problems for
/// `status.json`.
#[derive(Debug)]
pub struct Reporter {
    events: Option<Sender<DriveEvent>>,
    progress: Option<Duration>,
    /// Problems as shown (for `Stats::errors`), first [`MAX_KEPT`].
    kept: Vec<String>,
    /// Every problem reported, to report each once.
    seen: HashSet<String>,
    skipped: HashSet<PathBuf>,
    last_progress: Option<(Instant, [u64; 8])>,
}

impl Reporter {
    /// A reporter sending on `events`, progress at most every `progress`.
    pub fn new(events: Option<Sender<DriveEvent>>, progress: Option<Duration>) -> Self {
        Self {
            events,
            progress,
            kept: Vec::new(),
            seen: HashSet::new(),
            skipped: HashSet::new(),
            last_progress: None,
        }
    }

    /// Sends without waiting; a full or closed channel drops the event.
    pub fn send(&self, event: DriveEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.try_send(event);
        }
    }

    /// Reports `p` unless the same problem was reported before (problems are retried, and
    /// repeating them would drown the output).
    pub fn problem(&mut self, p: DriveProblem) {
        let text = p.to_string();
        if !self.seen.insert(text.clone()) {
            return;
        }
        // Conflicts and kept files are listed in `status` as differences on disk.
        if self.kept.len() < MAX_KEPT && !p.is_on_disk() {
            self.kept.push(text);
        }
        self.send(DriveEvent::Problem(p));
    }

    /// Reports a skipped path the first time only. With `keep`, it also counts as a problem
    /// for `status` (an unreadable file; a symlink is a known limit, not a problem).
    pub fn skipped(&mut self, path: PathBuf, reason: String, keep: bool) {
        if !self.skipped.insert(path.clone()) {
            return;
        }
        if keep && self.kept.len() < MAX_KEPT {
            self.kept
                .push(format!("not shared for now: {}: {reason}", path.display()));
        }
        self.send(DriveEvent::Skipped { path, reason });
    }

    /// Problems so far, for `status`.
    pub fn kept(&self) -> &[String] {
        &self.kept
    }

    /// Sends `stats` as progress if progress is on, the interval has passed, and the figures
    /// changed since the last progress sent.
    pub fn progress(&mut self, stats: &Stats, now: Instant) {
        let Some(every) = self.progress else { return };
        let figures = stats.figures();
        if let Some((at, last)) = self.last_progress
            && (now.duration_since(at) < every || last == figures)
        {
            return;
        }
        self.last_progress = Some((now, figures));
        self.send(DriveEvent::Progress(stats.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(rx: &crossbeam_channel::Receiver<DriveEvent>) -> Vec<DriveEvent> {
        rx.try_iter().collect()
    }

    #[test]
    fn problems_and_skips_are_reported_once() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut r = Reporter::new(Some(tx), None);
        let p = DriveProblem::Io {
            path: "/f/a".into(),
            error: "boom".into(),
        };
        r.problem(p.clone());
        r.problem(p.clone());
        r.skipped("/f/link".into(), "a symlink".into(), false);
        r.skipped("/f/link".into(), "a symlink".into(), false);
        assert_eq!(
            drain(&rx),
            vec![
                DriveEvent::Problem(p),
                DriveEvent::Skipped {
                    path: "/f/link".into(),
                    reason: "a symlink".into()
                }
            ]
        );
        assert_eq!(r.kept(), ["/f/a: boom"]);
    }

    #[test]
    fn progress_only_when_figures_change_and_not_too_often() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut r = Reporter::new(Some(tx), Some(Duration::from_secs(1)));
        let t0 = Instant::now();
        let mut s = Stats::default();
        r.progress(&s, t0);
        assert_eq!(drain(&rx).len(), 1, "the first figures are sent");
        r.progress(&s, t0 + Duration::from_secs(5));
        assert!(drain(&rx).is_empty(), "idle: nothing changed, nothing sent");
        s.bytes_done = 10;
        r.progress(&s, t0 + Duration::from_millis(5100));
        assert_eq!(drain(&rx).len(), 1, "changed after the interval: sent");
        s.bytes_done = 20;
        r.progress(&s, t0 + Duration::from_millis(5500));
        assert!(
            drain(&rx).is_empty(),
            "changed, but too soon after the last"
        );
        r.progress(&s, t0 + Duration::from_secs(7));
        assert_eq!(drain(&rx), vec![DriveEvent::Progress(s)]);
    }

    #[test]
    fn a_full_disk_is_named_as_such() {
        let e = io::Error::from(io::ErrorKind::StorageFull);
        assert!(matches!(
            DriveProblem::io(Path::new("/x"), &e),
            DriveProblem::DiskFull { .. }
        ));
        let s = DriveProblem::storage(
            Path::new("/x"),
            "storing",
            &crate::core::StorageFailure {
                kind: Some(io::ErrorKind::StorageFull),
                message: "No space left on device (os error 28)".into(),
            },
        );
        assert!(matches!(s, DriveProblem::DiskFull { .. }));
        assert!(s.to_string().contains("No space left"), "{s}");
    }
}
