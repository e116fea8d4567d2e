//! What a reader wrote into its folder, kept durably beside the version it reached, and what
//! differs on disk from the drive.
//!
//! # Why a ledger
//! A reader must never overwrite or delete bytes it did not write. Judging that from the drive's
//! versions is wrong: a reader that skipped a version (it applies only the newest it holds) has
//! never seen the record of the file it actually published, and a file it wrote at version N,
//! changed by the writer at N+2 and removed at N+3, looked like a local edit and was kept
//! forever. So the reader keeps its own account: for every path it published, the file as it was
//! right after the rename (size, mtime, mode, inode, device, ctime and the whole-file hash it
//! verified), and every directory it made. "Ours" is decided from that account alone:
//!
//! - the file on disk still has the inode, device, size, mtime and ctime we recorded (nobody
//!   wrote to it since: even `touch -d` or a same-size rewrite moves the ctime), or
//! - failing that, it has the recorded size and hashes to the recorded whole-file hash (its
//!   bytes are ours even if its metadata moved: replacing it loses nothing).
//!
//! Anything else at a path the reader must replace or remove is the user's: moved aside to a
//! conflict copy (replace) or left in place (remove), and reported.
//!
//! # Durability
//! The ledger is one file, `.feedsync/ledger`, rewritten atomically
//! ([`Dir::write_atomic`] on the state directory's handle) after the folder was synced: an entry is never durable
//! before the file it describes. It also holds the version the folder was last brought to
//! completely (what `.feedsync/applied` held before; that file is still read when no ledger
//! exists). Between two ledger writes, what the reader is about to write is appended to a
//! journal first (`.feedsync/ledger.journal`, one small `write` per file, emptied when the
//! ledger is written): a reader killed after a rename but before the next ledger write finds
//! the intent at start, and takes the file as its own if it holds exactly the bytes it meant to
//! write. A lost journal (power loss) costs at worst a conflict copy of the reader's own file,
//! never a byte of the user's.
//!
//! # Handles, not paths
//! Every look at the folder (metadata, hashing) and at the state directory (ledger, journal)
//! goes through a directory handle ([`Dir`]): a path checked here and acted on by the guard
//! cannot be redirected by swapping a parent directory for a symlink in between.

use crate::drive::record::FileInfo;
use crate::fsio::{Dir, FileIo, Kind, Meta, OpenHow};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::Arc;
use std::time::SystemTime;

/// The file in the state directory.
pub const LEDGER_FILE: &str = "ledger";

/// The journal of intents beside it.
pub const JOURNAL_FILE: &str = "ledger.journal";

/// Entries kept per list of differences (more only repeat the kind; the oldest go first).
const MAX_DIFFERENCES: usize = 1000;

/// A file this reader published, as it was right after the rename.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// Length in bytes.
    pub size: u64,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (i64, i64),
    /// Change time (seconds, nanoseconds): moves on every write and metadata change.
    pub ctime: (i64, i64),
    /// Permission bits.
    pub mode: u32,
    /// Inode number.
    pub ino: u64,
    /// Device.
    pub dev: u64,
    /// BLAKE3 of the whole content (verified when it was published).
    pub hash: [u8; 32],
}

impl Written {
    /// The file described by `m`, with content `hash`.
    pub fn of(m: &Meta, hash: [u8; 32]) -> Self {
        Self {
            size: m.len,
            mtime: secs_nanos(m.mtime),
            ctime: secs_nanos(m.ctime),
            mode: m.mode & 0o7777,
            ino: m.ino,
            dev: m.dev,
            hash,
        }
    }

    /// Whether `m` is this very file (or symlink: a reader records the links it makes here
    /// too), untouched since (no hashing). An inode never changes kind, so the same inode,
    /// device and times are the same entry.
    pub fn unchanged(&self, m: &Meta) -> bool {
        matches!(m.kind, Kind::File | Kind::Symlink)
            && m.len == self.size
            && m.ino == self.ino
            && m.dev == self.dev
            && secs_nanos(m.mtime) == self.mtime
            && secs_nanos(m.ctime) == self.ctime
    }
}

/// `t` as `stat` gives it: whole seconds (floored) and nanoseconds `0..1e9` — the form ledgers
/// written from `std::fs::Metadata` hold, so they still compare equal.
fn secs_nanos(t: SystemTime) -> (i64, i64) {
    let (secs, nanos) = crate::drive::import::stamp_time(t);
    (secs, i64::from(nanos))
}

/// A local file moved aside so the writer's version could take its place.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ConflictCopy {
    /// The drive's path (now the writer's version).
    pub path: String,
    /// Where the local file is now (relative to the folder).
    pub copy: String,
}

/// A path of the newest version that could not be published.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Unpublished {
    /// The drive's path.
    pub path: String,
    /// Why not.
    pub why: String,
}

/// What differs on disk from the drive, for `status` (and `status.json`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct OnDisk {
    /// Local files moved aside to a conflict copy (their path holds the writer's version).
    pub conflicts: Vec<ConflictCopy>,
    /// Files changed or made here that the writer removed: kept in place, no longer synced.
    pub kept: Vec<String>,
    /// Paths of the newest version not in place, and why.
    pub unpublished: Vec<Unpublished>,
}

impl OnDisk {
    /// Nothing differs.
    pub fn is_empty(&self) -> bool {
        self.conflicts.is_empty() && self.kept.is_empty() && self.unpublished.is_empty()
    }

    /// Notes a conflict copy.
    pub fn conflict(&mut self, path: &str, copy: &str) {
        push_capped(
            &mut self.conflicts,
            ConflictCopy {
                path: path.to_string(),
                copy: copy.to_string(),
            },
        );
    }

    /// Notes a local file kept where the writer removed its path.
    pub fn keep(&mut self, path: &str) {
        if !self.kept.iter().any(|k| k == path) {
            push_capped(&mut self.kept, path.to_string());
        }
    }

    /// Notes (or updates) a path that could not be published.
    pub fn unpublished(&mut self, path: &str, why: String) {
        self.unpublished.retain(|u| u.path != path);
        push_capped(
            &mut self.unpublished,
            Unpublished {
                path: path.to_string(),
                why,
            },
        );
    }

    /// `path` is in place now: no longer unpublished, no longer a kept local file.
    pub fn published(&mut self, path: &str) {
        self.unpublished.retain(|u| u.path != path);
        self.kept.retain(|k| k != path);
    }

    /// Forgets what no longer holds: conflict copies and kept files the user removed (one that
    /// cannot be looked at, a symlink in the way, is remembered).
    pub fn prune(&mut self, root: &dyn Dir) {
        let exists = |rel: &str| !matches!(root.metadata(rel), Ok(None));
        self.conflicts.retain(|c| exists(&c.copy));
        self.kept.retain(|k| exists(k));
    }
}

fn push_capped<T>(list: &mut Vec<T>, item: T) {
    if list.len() >= MAX_DIFFERENCES {
        list.remove(0);
    }
    list.push(item);
}

/// See the module docs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    /// The version the folder was last brought to completely.
    pub applied: u64,
    /// Files this reader published and has not removed since.
    pub files: BTreeMap<String, Written>,
    /// Directories this reader made and has not removed since.
    pub dirs: BTreeSet<String>,
    /// What differs on disk.
    pub on_disk: OnDisk,
}

/// The ledger's format, first in the file: a ledger of another format is not misread.
const FORMAT: u8 = 1;

impl Ledger {
    /// Reads the ledger from the drive's state directory `state`. None yet (a fresh clone, or
    /// a clone made before the ledger existed): empty, at the version `.feedsync/applied`
    /// names. One that does not decode is an error naming the file.
    pub fn load(state: &dyn Dir) -> io::Result<Self> {
        let name = format!("{}/{LEDGER_FILE}", crate::drive::STATE_DIR);
        match state.read_file(LEDGER_FILE)? {
            Some(bytes) => match bytes.split_first() {
                Some((&FORMAT, rest)) => postcard::from_bytes(rest).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{name}: does not decode: {e}"),
                    )
                }),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{name}: unknown format"),
                )),
            },
            None => Ok(Self {
                applied: legacy_applied(state),
                ..Self::default()
            }),
        }
    }

    /// Writes the ledger atomically and durably into the state directory `state`.
    pub fn save(&self, state: &dyn Dir) -> io::Result<()> {
        let mut bytes = vec![FORMAT];
        bytes.extend(postcard::to_stdvec(self).map_err(io::Error::other)?);
        state.write_atomic(LEDGER_FILE, &bytes, 0o600)
    }

    /// Whether the file at `path` in the folder `root` (described by `m`) is one this reader
    /// wrote and nobody changed since (see the module docs). Hashes the file only when its
    /// metadata moved.
    pub fn is_ours(&self, root: &dyn Dir, path: &str, m: &Meta) -> bool {
        let Some(w) = self.files.get(path) else {
            return false;
        };
        if w.unchanged(m) {
            return true;
        }
        m.kind == Kind::File && m.len == w.size && hash_of(root, path) == Some(w.hash)
    }

    /// Records that the file at `path` (now `m`) was published with content `hash`.
    pub fn wrote(&mut self, path: &str, m: &Meta, hash: [u8; 32]) {
        self.files.insert(path.to_string(), Written::of(m, hash));
        self.on_disk.published(path);
    }
}

/// What the reader is about to write, noted in the [`Journal`] before it does.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Intent {
    /// A file with this content is about to be renamed to `path`.
    File {
        /// The drive's path.
        path: String,
        /// Its whole-file hash.
        hash: [u8; 32],
    },
    /// The directory `path` is about to be made.
    Dir {
        /// The drive's path.
        path: String,
    },
}

/// Longest journal entry read back (a path is at most 4 KiB).
const MAX_INTENT: usize = 8 * 1024;

/// The append-only journal of intents (see the module docs).
#[derive(Debug)]
pub struct Journal {
    /// The state directory it lives in.
    state: Arc<dyn Dir>,
    /// The open journal and where the next entry goes (its length: only this reader writes
    /// it, and positioned writes have no append mode).
    file: Option<(Box<dyn FileIo>, u64)>,
}

impl Journal {
    /// The journal in the state directory `state` (opened at the first note).
    pub fn new(state: Arc<dyn Dir>) -> Self {
        Self { state, file: None }
    }

    /// Appends `intent`: one `write` at the end (a kill leaves at worst a torn last entry,
    /// ignored).
    pub fn note(&mut self, intent: &Intent) -> io::Result<()> {
        let body = postcard::to_stdvec(intent).map_err(io::Error::other)?;
        let mut entry = (body.len() as u32).to_le_bytes().to_vec();
        entry.extend(body);
        let (f, end) = match &mut self.file {
            Some(open) => open,
            None => {
                let f = self.state.open(JOURNAL_FILE, OpenHow::CREATE)?;
                let end = f.metadata()?.len;
                self.file.insert((f, end))
            }
        };
        f.write_all_at(&entry, *end)?;
        *end += entry.len() as u64;
        Ok(())
    }

    /// Empties the journal: the ledger now holds everything it said.
    pub fn clear(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some((f, end)) => {
                f.set_len(0)?;
                *end = 0;
                Ok(())
            }
            None => match self.state.remove_file(JOURNAL_FILE) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }

    /// The intents noted since the ledger was last written (a torn or foreign tail ends it),
    /// from the state directory `state`.
    pub fn read(state: &dyn Dir) -> Vec<Intent> {
        let Ok(Some(bytes)) = state.read_file(JOURNAL_FILE) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut rest = &bytes[..];
        while let Some((len, tail)) = rest.split_first_chunk::<4>() {
            let len = u32::from_le_bytes(*len) as usize;
            if len > MAX_INTENT || tail.len() < len {
                break;
            }
            let Ok(intent) = postcard::from_bytes(&tail[..len]) else {
                break;
            };
            out.push(intent);
            rest = &tail[len..];
        }
        out
    }
}

impl Ledger {
    /// Takes as ours what the journal says was about to be written and is there now: a file
    /// holding exactly the intended bytes, a directory that exists.
    pub fn replay(&mut self, root: &dyn Dir, intents: Vec<Intent>) {
        for intent in intents {
            match intent {
                Intent::File { path, hash } => {
                    if let Ok(Some(m)) = root.metadata(&path)
                        && m.kind == Kind::File
                        && hash_of(root, &path) == Some(hash)
                    {
                        self.wrote(&path, &m, hash);
                    }
                }
                Intent::Dir { path } => {
                    if matches!(root.metadata(&path), Ok(Some(m)) if m.kind == Kind::Dir) {
                        self.dirs.insert(path);
                    }
                }
            }
        }
    }
}

/// The version recorded by a clone made before the ledger existed (0: none).
fn legacy_applied(state: &dyn Dir) -> u64 {
    state
        .read_file("applied")
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Bytes hashed per read.
const HASH_CHUNK: usize = 256 * 1024;

/// BLAKE3 of the regular file `rel` beneath `root`; `None` if it is not a regular file or
/// cannot be read. Opened through the handle: no symlink anywhere on the path is followed, and
/// a FIFO put there is opened without blocking and refused (it would stall the node's loop).
pub fn hash_of(root: &dyn Dir, rel: &str) -> Option<[u8; 32]> {
    let file = root.open(rel, OpenHow::READ).ok()?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut at = 0u64;
    loop {
        match file.read_at(&mut buf, at) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                at += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(*h.finalize().as_bytes())
}

/// Whether the regular file `rel` beneath `root` (described by `m`) holds exactly the content
/// of `info`: same size and same whole-file hash (size and mtime alone are not enough).
pub fn identical(root: &dyn Dir, rel: &str, m: &Meta, info: &FileInfo) -> bool {
    m.kind == Kind::File && m.len == info.size && hash_of(root, rel) == Some(info.hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsio::RealDir;
    use std::fs;

    fn handle(p: &std::path::Path) -> Arc<dyn Dir> {
        Arc::new(RealDir::open_path(p).unwrap())
    }

    #[test]
    fn a_ledger_round_trips_and_a_foreign_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = handle(dir.path());
        let f = dir.path().join("f");
        fs::write(&f, b"abc").unwrap();
        let m = d.metadata("f").unwrap().unwrap();
        let mut l = Ledger {
            applied: 7,
            ..Ledger::default()
        };
        l.wrote("f", &m, *blake3::hash(b"abc").as_bytes());
        l.dirs.insert("d".into());
        l.on_disk.conflict("x", "x.sync-conflict-20260101-000000");
        l.save(&*d).unwrap();
        assert_eq!(Ledger::load(&*d).unwrap(), l);
        assert!(l.is_ours(&*d, "f", &m));
        fs::write(dir.path().join(LEDGER_FILE), b"junk").unwrap();
        let e = Ledger::load(&*d).unwrap_err();
        assert!(e.to_string().contains(LEDGER_FILE), "{e}");
    }

    #[test]
    fn ours_means_untouched_or_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let d = handle(dir.path());
        let f = dir.path().join("f");
        let meta = || d.metadata("f").unwrap().unwrap();
        fs::write(&f, b"abc").unwrap();
        let mut l = Ledger::default();
        l.wrote("f", &meta(), *blake3::hash(b"abc").as_bytes());
        assert!(l.files["f"].unchanged(&meta()));
        // Same bytes written again (new ctime): still ours, by hash.
        fs::write(&f, b"abc").unwrap();
        assert!(l.is_ours(&*d, "f", &meta()));
        // Same size, other bytes: not ours.
        fs::write(&f, b"abd").unwrap();
        assert!(!l.files["f"].unchanged(&meta()));
        assert!(!l.is_ours(&*d, "f", &meta()));
        // A path never written: not ours.
        assert!(!l.is_ours(&*d, "g", &meta()));
    }

    #[test]
    fn intents_of_a_killed_reader_are_taken_only_where_the_bytes_are_there() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let d = handle(root);
        let mut j = Journal::new(d.clone());
        let hash = *blake3::hash(b"meant").as_bytes();
        for path in ["done", "never renamed", "changed since"] {
            j.note(&Intent::File {
                path: path.into(),
                hash,
            })
            .unwrap();
        }
        j.note(&Intent::Dir { path: "d".into() }).unwrap();
        fs::write(root.join("done"), b"meant").unwrap();
        fs::write(root.join("changed since"), b"other").unwrap();
        fs::create_dir(root.join("d")).unwrap();
        // A torn last entry (killed mid-write) is ignored.
        let mut torn = fs::read(root.join(JOURNAL_FILE)).unwrap();
        torn.extend([200, 0, 0, 0, 1, 2]);
        fs::write(root.join(JOURNAL_FILE), torn).unwrap();
        let mut l = Ledger::default();
        l.replay(&*d, Journal::read(&*d));
        assert_eq!(l.files.keys().collect::<Vec<_>>(), ["done"]);
        assert_eq!(l.dirs.iter().collect::<Vec<_>>(), ["d"]);
        j.clear().unwrap();
        assert!(Journal::read(&*d).is_empty());
        // Notes after a clear start at the beginning again.
        j.note(&Intent::Dir { path: "e".into() }).unwrap();
        assert_eq!(Journal::read(&*d), vec![Intent::Dir { path: "e".into() }]);
    }

    #[test]
    fn on_the_simulated_disk_a_same_size_rewrite_is_not_ours_and_a_fifo_is_never_read() {
        let disk = crate::fsio::SimDisk::new();
        let root = disk.root();
        let f = root.open("f", OpenHow::CREATE).unwrap();
        f.write_all_at(b"abc", 0).unwrap();
        let mut l = Ledger::default();
        let meta = || root.metadata("f").unwrap().unwrap();
        l.wrote("f", &meta(), *blake3::hash(b"abc").as_bytes());
        assert!(l.files["f"].unchanged(&meta()));
        // Same size, mtime put back: the change time still shows the write.
        let mtime = meta().mtime;
        f.write_all_at(b"abd", 0).unwrap();
        f.set_mtime(mtime).unwrap();
        assert!(!l.files["f"].unchanged(&meta()));
        assert!(!l.is_ours(&*root, "f", &meta()));
        // The ledger and the journal live through the state directory's handle.
        root.create_dir("state", 0o700).unwrap();
        let state: Arc<dyn Dir> = Arc::from(root.open_dir("state").unwrap());
        l.save(&*state).unwrap();
        assert_eq!(Ledger::load(&*state).unwrap(), l);
        let mut j = Journal::new(state.clone());
        j.note(&Intent::Dir { path: "a".into() }).unwrap();
        // A second journal (a restart) appends after what is there.
        Journal::new(state.clone())
            .note(&Intent::Dir { path: "b".into() })
            .unwrap();
        assert_eq!(Journal::read(&*state).len(), 2);
        // A FIFO where a file was is refused, never waited on.
        disk.mkfifo("p").unwrap();
        assert_eq!(hash_of(&*root, "p"), None);
    }

    #[test]
    fn a_clone_from_before_the_ledger_keeps_its_version() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("applied"), b"12\n").unwrap();
        assert_eq!(Ledger::load(&*handle(dir.path())).unwrap().applied, 12);
    }
}
