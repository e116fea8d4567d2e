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
//! ([`crate::util::write_atomic`]) after the folder was synced: an entry is never durable
//! before the file it describes. It also holds the version the folder was last brought to
//! completely (what `.feedsync/applied` held before; that file is still read when no ledger
//! exists). Between two ledger writes, what the reader is about to write is appended to a
//! journal first (`.feedsync/ledger.journal`, one small `write` per file, emptied when the
//! ledger is written): a reader killed after a rename but before the next ledger write finds
//! the intent at start, and takes the file as its own if it holds exactly the bytes it meant to
//! write. A lost journal (power loss) costs at worst a conflict copy of the reader's own file,
//! never a byte of the user's.

use crate::drive::record::FileInfo;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

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
    pub fn of(m: &fs::Metadata, hash: [u8; 32]) -> Self {
        Self {
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            mode: m.mode() & 0o7777,
            ino: m.ino(),
            dev: m.dev(),
            hash,
        }
    }

    /// Whether `m` is this very file, untouched since (no hashing).
    pub fn unchanged(&self, m: &fs::Metadata) -> bool {
        m.is_file()
            && m.len() == self.size
            && m.ino() == self.ino
            && m.dev() == self.dev
            && (m.mtime(), m.mtime_nsec()) == self.mtime
            && (m.ctime(), m.ctime_nsec()) == self.ctime
    }
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

    /// Forgets what no longer holds: conflict copies and kept files the user removed.
    pub fn prune(&mut self, root: &Path) {
        let exists = |rel: &str| fs::symlink_metadata(root.join(rel)).is_ok();
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
    /// Reads the ledger of the drive whose state directory is `state_dir`. None yet (a fresh
    /// clone, or a clone made before the ledger existed): empty, at the version
    /// `.feedsync/applied` names. One that does not decode is an error naming the file.
    pub fn load(state_dir: &Path) -> io::Result<Self> {
        let path = state_dir.join(LEDGER_FILE);
        match fs::read(&path) {
            Ok(bytes) => match bytes.split_first() {
                Some((&FORMAT, rest)) => postcard::from_bytes(rest).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: does not decode: {e}", path.display()),
                    )
                }),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: unknown format", path.display()),
                )),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self {
                applied: legacy_applied(state_dir),
                ..Self::default()
            }),
            Err(e) => Err(e),
        }
    }

    /// Writes the ledger atomically and durably.
    pub fn save(&self, state_dir: &Path) -> io::Result<()> {
        let mut bytes = vec![FORMAT];
        bytes.extend(postcard::to_stdvec(self).map_err(io::Error::other)?);
        crate::util::write_atomic(&state_dir.join(LEDGER_FILE), &bytes)
    }

    /// Whether the file at `path` (described by `m`) is one this reader wrote and nobody
    /// changed since (see the module docs). Hashes the file only when its metadata moved.
    pub fn is_ours(&self, root: &Path, path: &str, m: &fs::Metadata) -> bool {
        let Some(w) = self.files.get(path) else {
            return false;
        };
        if w.unchanged(m) {
            return true;
        }
        m.is_file() && m.len() == w.size && hash_of(&root.join(path)) == Some(w.hash)
    }

    /// Records that the file at `path` (now `m`) was published with content `hash`.
    pub fn wrote(&mut self, path: &str, m: &fs::Metadata, hash: [u8; 32]) {
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
    path: PathBuf,
    file: Option<fs::File>,
}

impl Journal {
    /// The journal of the state directory `state_dir` (opened at the first note).
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(JOURNAL_FILE),
            file: None,
        }
    }

    /// Appends `intent`: one `write` (a kill leaves at worst a torn last entry, ignored).
    pub fn note(&mut self, intent: &Intent) -> io::Result<()> {
        if self.file.is_none() {
            use std::os::unix::fs::OpenOptionsExt;
            let f = fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&self.path)?;
            self.file = Some(f);
        }
        let body = postcard::to_stdvec(intent).map_err(io::Error::other)?;
        let mut entry = (body.len() as u32).to_le_bytes().to_vec();
        entry.extend(body);
        match &mut self.file {
            Some(f) => f.write_all(&entry),
            None => Ok(()),
        }
    }

    /// Empties the journal: the ledger now holds everything it said.
    pub fn clear(&mut self) -> io::Result<()> {
        match &self.file {
            Some(f) => f.set_len(0),
            None => match fs::remove_file(&self.path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }

    /// The intents noted since the ledger was last written (a torn or foreign tail ends it).
    pub fn read(state_dir: &Path) -> Vec<Intent> {
        let Ok(bytes) = fs::read(state_dir.join(JOURNAL_FILE)) else {
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
    pub fn replay(&mut self, root: &Path, intents: Vec<Intent>) {
        for intent in intents {
            match intent {
                Intent::File { path, hash } => {
                    let target = root.join(&path);
                    if let Ok(m) = fs::symlink_metadata(&target)
                        && m.is_file()
                        && hash_of(&target) == Some(hash)
                    {
                        self.wrote(&path, &m, hash);
                    }
                }
                Intent::Dir { path } => {
                    if fs::symlink_metadata(root.join(&path)).is_ok_and(|m| m.is_dir()) {
                        self.dirs.insert(path);
                    }
                }
            }
        }
    }
}

/// The version recorded by a clone made before the ledger existed (0: none).
fn legacy_applied(state_dir: &Path) -> u64 {
    fs::read_to_string(state_dir.join("applied"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// BLAKE3 of the regular file at `path` (never following a link, never waiting on a FIFO);
/// `None` if it is not a regular file or cannot be read.
pub fn hash_of(path: &Path) -> Option<[u8; 32]> {
    use std::os::unix::fs::OpenOptionsExt;
    // A FIFO put at a path would block a plain open (and the node's loop): O_NONBLOCK, and
    // only a regular file is read.
    let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut h = blake3::Hasher::new();
    h.update_reader(file).ok()?;
    Some(*h.finalize().as_bytes())
}

/// Whether the regular file at `path` (described by `m`) holds exactly the content of `info`:
/// same size and same whole-file hash (size and mtime alone are not enough).
pub fn identical(path: &Path, m: &fs::Metadata, info: &FileInfo) -> bool {
    m.is_file() && m.len() == info.size && hash_of(path) == Some(info.hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_round_trips_and_a_foreign_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"abc").unwrap();
        let m = fs::symlink_metadata(&f).unwrap();
        let mut l = Ledger {
            applied: 7,
            ..Ledger::default()
        };
        l.wrote("f", &m, *blake3::hash(b"abc").as_bytes());
        l.dirs.insert("d".into());
        l.on_disk.conflict("x", "x.sync-conflict-20260101-000000");
        l.save(dir.path()).unwrap();
        assert_eq!(Ledger::load(dir.path()).unwrap(), l);
        assert!(l.is_ours(dir.path(), "f", &m));
        fs::write(dir.path().join(LEDGER_FILE), b"junk").unwrap();
        let e = Ledger::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains(LEDGER_FILE), "{e}");
    }

    #[test]
    fn ours_means_untouched_or_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"abc").unwrap();
        let mut l = Ledger::default();
        l.wrote(
            "f",
            &fs::symlink_metadata(&f).unwrap(),
            *blake3::hash(b"abc").as_bytes(),
        );
        // Same bytes written again (new ctime): still ours, by hash.
        fs::write(&f, b"abc").unwrap();
        assert!(l.is_ours(dir.path(), "f", &fs::symlink_metadata(&f).unwrap()));
        // Same size, other bytes: not ours.
        fs::write(&f, b"abd").unwrap();
        assert!(!l.is_ours(dir.path(), "f", &fs::symlink_metadata(&f).unwrap()));
        // A path never written: not ours.
        assert!(!l.is_ours(dir.path(), "g", &fs::symlink_metadata(&f).unwrap()));
    }

    #[test]
    fn intents_of_a_killed_reader_are_taken_only_where_the_bytes_are_there() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut j = Journal::new(root);
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
        l.replay(root, Journal::read(root));
        assert_eq!(l.files.keys().collect::<Vec<_>>(), ["done"]);
        assert_eq!(l.dirs.iter().collect::<Vec<_>>(), ["d"]);
        j.clear().unwrap();
        assert!(Journal::read(root).is_empty());
    }

    #[test]
    fn a_clone_from_before_the_ledger_keeps_its_version() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("applied"), b"12\n").unwrap();
        assert_eq!(Ledger::load(dir.path()).unwrap().applied, 12);
    }
}
