//! What a drive's metadata feed holds: records of files and directories, and the rules a path
//! from a record must pass before it touches the disk.
//!
//! Each metadata block is a postcard-encoded `Vec<Record>` (one batch: a scan, a live change).
//! Block 0 holds the [`Record::Init`] naming the content feed. The folder's state at version
//! `v` is the replay of blocks `0..v`.
//!
//! # Compatibility
//! Variants are only ever added at the end of [`Record`] (postcard encodes the variant index,
//! so the indices of those before never change). [`Record::Time`] (index 3) was added after
//! the first release: versions written before carry no time, and a reader built before it
//! refuses versions that carry one. [`FileInfo::mode`] replaced a one-byte `executable` flag
//! (#11: a private `0600` file arrived world-readable): a drive written before decodes with
//! mode 0 or 1 and must be shared again from a current writer. [`Entry::Link`] and
//! [`Entry::Directory`] (#13: symlinks, directory modes and mtimes) were added at the end of
//! [`Entry`]: [`Entry::Dir`] still decodes, and a reader built before refuses versions that
//! carry the new ones.

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use super::merge::{Clock, DeviceId};
pub use super::state::{Limits, State};

/// Bytes per content block. A file's bytes are split at fixed multiples of this, so a change
/// inside a large file alters only the blocks it touches and the rest are reused by hash.
pub const BLOCK_SIZE: usize = 64 * 1024;

/// Longest path a record may carry, in bytes.
pub const MAX_PATH_LEN: usize = 4096;

/// Modification times further than this from the epoch (~34,800 years either way) are
/// refused: no real file has one, and time arithmetic near `i64::MAX` overflows.
pub const MAX_MTIME_SECS: i64 = 1 << 40;

/// Encoded records per metadata block stay under this many bytes (the feed caps a block at
/// 1 MiB; smaller blocks keep the first version of a big tree quick to start on).
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// One change to the folder.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// First record of every drive: the content feed's public key and block size.
    Init {
        /// ed25519 public key of the content feed.
        content_key: [u8; 32],
        /// Bytes per content block.
        block_size: u32,
    },
    /// `path` now is `entry` (created or replaced).
    Put {
        /// Relative, `/`-separated path; see [`check_path`].
        path: String,
        /// What is there.
        entry: Entry,
    },
    /// `path` (and, for a directory, nothing else) was removed.
    Remove {
        /// Relative path.
        path: String,
    },
    /// When the writer committed this version (its clock, milliseconds since the Unix epoch):
    /// for `log`. Changes nothing in the folder.
    Time {
        /// Milliseconds since the epoch.
        millis: u64,
    },
    /// Two-way folders (#13): the causal context of this block, i.e. how many metadata blocks
    /// of each *other* device the writing device had applied when it wrote it. The device's
    /// own entry is implicit (this block's position), so it cannot lie about it. At most one
    /// per block; a block without one has seen nothing of other devices (every one-writer
    /// drive's blocks). See [`merge`](super::merge) and SPEC §6.
    Clock {
        /// The vector, sorted by device, without the writer's own entry.
        clock: Clock,
    },
    /// Two-way folders: `device` (the key of its metadata feed) may write to this folder. It
    /// counts only if the writing device was itself allowed when it wrote it.
    Allow {
        /// The device's id: the public key of its metadata feed.
        device: [u8; 32],
    },
    /// Two-way folders: `device`'s blocks after its first `upto` no longer count. Permanent
    /// for that device id (a removed device joins again with a new id).
    Deny {
        /// The device's id.
        device: [u8; 32],
        /// How many of its blocks the denying device had applied: those keep counting.
        upto: u64,
    },
    /// Two-way folders: `path` now is the regular file `file`, whose extents are (some or all)
    /// blocks of *other* devices' content feeds, as `from` says. A rename, a copy or an
    /// unchanged block on one device of bytes another device wrote cites that device's blocks,
    /// so a third device that holds them fetches nothing (it reuses by (feed, block) as a
    /// one-writer folder does). A one-writer folder never holds one (refused there).
    PutFrom {
        /// Relative path.
        path: String,
        /// The file; `extents` index the content feeds `from` names.
        file: FileInfo,
        /// Runs over `file.extents`, in order, covering each extent exactly once: the next
        /// `extents` extents are blocks of `device`'s content feed (which may be the writer's
        /// own).
        from: Vec<Borrow>,
    },
}

/// A run of a [`Record::PutFrom`]'s extents that are blocks of one device's content feed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Borrow {
    /// The device whose content feed holds them.
    pub device: DeviceId,
    /// How many consecutive extents.
    pub extents: u32,
}

/// Checks that `from` covers `extents` extents exactly, with no empty run.
pub fn check_borrows(from: &[Borrow], extents: usize) -> Result<(), RecordError> {
    let mut total = 0usize;
    for b in from {
        if b.extents == 0 {
            return Err(RecordError::BadExtent);
        }
        total = total.saturating_add(b.extents as usize);
    }
    if total != extents {
        return Err(RecordError::BadExtent);
    }
    Ok(())
}

impl Record {
    /// A [`Record::Time`] for now (the epoch if the clock is before it).
    pub fn now() -> Self {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self::Time { millis }
    }
}

/// Longest symlink target a record may carry, in bytes: Linux's `PATH_MAX` less its NUL (a
/// longer one is refused by `symlinkat`, so a reader could never make it).
pub const MAX_LINK_LEN: usize = 4095;

/// A file, directory or symlink as recorded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A directory without its metadata: what writers before #13 recorded (still decoded and
    /// applied; a current writer records [`Entry::Directory`] instead).
    Dir,
    /// A regular file.
    File(FileInfo),
    /// A symbolic link, recorded as a link: its target is never followed by the writer, and a
    /// reader makes a link with the same target, never following it either (#13).
    Link(LinkInfo),
    /// A directory with its permission bits and modification time (#13).
    Directory(DirInfo),
}

impl Entry {
    /// Whether this is a directory (of either form).
    pub fn is_dir(&self) -> bool {
        matches!(self, Self::Dir | Self::Directory(_))
    }

    /// The recorded modification time, if the entry carries one (a legacy [`Entry::Dir`]
    /// does not).
    pub fn mtime(&self) -> Option<(i64, u32)> {
        match self {
            Self::Dir => None,
            Self::File(f) => Some((f.mtime_secs, f.mtime_nanos)),
            Self::Link(l) => Some((l.mtime_secs, l.mtime_nanos)),
            Self::Directory(d) => Some((d.mtime_secs, d.mtime_nanos)),
        }
    }
}

/// A symbolic link's target and modification time.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// What the link points to, as `readlink` gave it: any string without NUL of at most
    /// [`MAX_LINK_LEN`] bytes, relative or absolute, inside the folder or not. Only ever
    /// stored in a link, never resolved by feedsync.
    pub target: String,
    /// Modification time of the link itself: seconds since the epoch.
    pub mtime_secs: i64,
    /// Modification time: nanoseconds.
    pub mtime_nanos: u32,
}

impl LinkInfo {
    /// Checks the target (not empty, no NUL, at most [`MAX_LINK_LEN`] bytes) and the time.
    pub fn check(&self) -> Result<(), RecordError> {
        let bad = |why| {
            Err(RecordError::BadLink {
                target: self.target.chars().take(200).collect(),
                why,
            })
        };
        if self.target.is_empty() {
            return bad("empty");
        }
        if self.target.len() > MAX_LINK_LEN {
            return bad("too long");
        }
        if self.target.contains('\0') {
            return bad("contains NUL");
        }
        check_time(self.mtime_secs, self.mtime_nanos)
    }
}

/// A directory's permission bits and modification time.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DirInfo {
    /// The writer's permission bits (`0o777` at most).
    pub mode: u32,
    /// Modification time: seconds since the epoch.
    pub mtime_secs: i64,
    /// Modification time: nanoseconds.
    pub mtime_nanos: u32,
}

impl DirInfo {
    /// Checks the mode (permission bits only) and the time.
    pub fn check(&self) -> Result<(), RecordError> {
        if self.mode & !0o777 != 0 {
            return Err(RecordError::BadMode(self.mode));
        }
        check_time(self.mtime_secs, self.mtime_nanos)
    }
}

/// A modification time a file system can hold (see [`MAX_MTIME_SECS`]).
fn check_time(secs: i64, nanos: u32) -> Result<(), RecordError> {
    if nanos >= 1_000_000_000 || secs.unsigned_abs() > MAX_MTIME_SECS as u64 {
        return Err(RecordError::BadTime { secs, nanos });
    }
    Ok(())
}

/// A regular file's metadata and where its bytes are in the content feed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FileInfo {
    /// Length in bytes.
    pub size: u64,
    /// The writer's permission bits (`0o777` at most: no set-id or sticky bit ever crosses);
    /// a reader applies them less its umask.
    pub mode: u32,
    /// Modification time: seconds since the epoch.
    pub mtime_secs: i64,
    /// Modification time: nanoseconds.
    pub mtime_nanos: u32,
    /// BLAKE3 of the whole content.
    pub hash: [u8; 32],
    /// Content-feed blocks whose concatenation is the file, in order.
    pub extents: Vec<Extent>,
}

/// A run of consecutive content-feed blocks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First block.
    pub start: u64,
    /// Number of blocks.
    pub count: u64,
}

impl FileInfo {
    /// Number of blocks the file spans.
    pub fn blocks(&self) -> u64 {
        self.extents.iter().map(|e| e.count).sum()
    }

    /// The content block at each position of the file, in order.
    pub fn block_at(&self) -> impl Iterator<Item = u64> + '_ {
        self.extents.iter().flat_map(|e| e.start..e.start + e.count)
    }

    /// Checks that the extents describe exactly `size` bytes and stay within sane bounds, that
    /// the modification time is one a file system can hold, and that the mode holds permission
    /// bits only.
    pub fn check(&self) -> Result<(), RecordError> {
        if self.mode & !0o777 != 0 {
            return Err(RecordError::BadMode(self.mode));
        }
        check_time(self.mtime_secs, self.mtime_nanos)?;
        let expected = self.size.div_ceil(BLOCK_SIZE as u64);
        let mut total = 0u64;
        for e in &self.extents {
            if e.count == 0 || e.start.checked_add(e.count).is_none_or(|end| end > 1 << 48) {
                return Err(RecordError::BadExtent);
            }
            total = total.checked_add(e.count).ok_or(RecordError::BadExtent)?;
        }
        if total != expected {
            return Err(RecordError::SizeMismatch {
                size: self.size,
                blocks: total,
            });
        }
        Ok(())
    }
}

/// Why a record was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    /// The block is not a valid batch of records.
    #[error("metadata block {0} does not decode as records")]
    Decode(u64),
    /// A path that could write outside the folder or is otherwise unusable.
    #[error("unsafe path {path:?}: {why}")]
    UnsafePath {
        /// The path as received.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Extents that are empty or out of range.
    #[error("a file's block extents are out of range")]
    BadExtent,
    /// Extents that do not cover the file's size.
    #[error("a file of {size} bytes cannot span {blocks} blocks")]
    SizeMismatch {
        /// Recorded size.
        size: u64,
        /// Blocks the extents cover.
        blocks: u64,
    },
    /// Block 0 is not an `Init`, or an `Init` appears later.
    #[error("the drive's first record must be its only Init")]
    Init,
    /// A modification time out of range (nanoseconds of a second or more, or further than
    /// [`MAX_MTIME_SECS`] from the epoch).
    #[error("a modification time of {secs} s {nanos} ns is out of range")]
    BadTime {
        /// Recorded seconds.
        secs: i64,
        /// Recorded nanoseconds.
        nanos: u32,
    },
    /// The `Init` names as content feed a feed this node already has (the drive's own
    /// metadata feed, another folder's feed).
    #[error("the content feed's key is the key of another feed on this node")]
    ContentKeyInUse,
    /// A path under a file (`a` and `a/b` both files, say): no file system can hold both.
    #[error("{path:?} would be inside the file {file:?}")]
    Conflict {
        /// The path put.
        path: String,
        /// The file that is one of its parents.
        file: String,
    },
    /// A mode with bits beyond `0o777` (set-user-id, set-group-id, sticky, file type).
    #[error("a file mode of {0:#o} has bits beyond the permission bits 0o777")]
    BadMode(u32),
    /// A symlink target that is empty, too long or holds a NUL.
    #[error("symlink target {target:?}: {why}")]
    BadLink {
        /// The target as received (at most 200 characters of it).
        target: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A version vector that is not sorted, repeats a device, holds a zero count or has more
    /// than [`merge::MAX_DEVICES`](super::merge::MAX_DEVICES) entries.
    #[error("malformed version vector: {0}")]
    Clock(&'static str),
    /// A [`Record::PutFrom`] in a folder read as one writer's (only two-way folders hold
    /// them).
    #[error("a file citing another device's content, in a folder read as one writer's")]
    TwoWayOnly,
    /// The version would take the folder over one of its [`Limits`].
    #[error("{what} {value} is over the limit of {limit}")]
    Limit {
        /// What is counted.
        what: &'static str,
        /// The version's figure.
        value: u64,
        /// The configured cap.
        limit: u64,
    },
}

/// Refuses any path that is not a plain relative path inside the folder: absolute, empty,
/// `.` or `..` components, empty components (`a//b`, trailing `/`), NUL, backslashes (a
/// separator elsewhere), or longer than [`MAX_PATH_LEN`]. A `.feedsync` component is refused
/// too, at any depth: a record may never touch the tool's state, nor a nested drive's (which
/// holds that drive's secret key).
pub fn check_path(path: &str) -> Result<(), RecordError> {
    let bad = |why| {
        Err(RecordError::UnsafePath {
            path: path.chars().take(200).collect(),
            why,
        })
    };
    if path.is_empty() {
        return bad("empty");
    }
    if path.len() > MAX_PATH_LEN {
        return bad("too long");
    }
    if path.starts_with('/') {
        return bad("absolute");
    }
    if path.contains('\0') {
        return bad("contains NUL");
    }
    if path.contains('\\') {
        return bad("contains a backslash");
    }
    for c in path.split('/') {
        match c {
            "" => return bad("empty component"),
            "." | ".." => return bad("dot component"),
            // Any drive's state, ours or one nested inside: never shared, never written.
            c if is_state_dir(c) => return bad("a feedsync state directory"),
            _ => {}
        }
    }
    Ok(())
}

/// Whether a path component names the state directory on some file system: compared without
/// case (case-insensitive file systems: APFS, NTFS, ext4 casefold), with the characters such
/// file systems ignore or fold to ASCII (`ſ` folds to `s`, zero-width and direction marks are
/// ignored by HFS+), and with the trailing dots and spaces Windows drops.
fn is_state_dir(component: &str) -> bool {
    let folded: String = component
        .chars()
        .filter(|c| {
            !matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}' | '\u{00AD}')
        })
        .map(|c| match c {
            '\u{017F}' => 's',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    folded.trim_end_matches(['.', ' ']) == crate::drive::STATE_DIR
}

/// Encodes one batch of records as a metadata block.
pub fn encode(records: &[Record]) -> Vec<u8> {
    postcard::to_stdvec(records).expect("records always encode")
}

/// Decodes metadata block `index` and checks every record in it.
pub fn decode(index: u64, block: &[u8]) -> Result<Vec<Record>, RecordError> {
    let records: Vec<Record> =
        postcard::from_bytes(block).map_err(|_| RecordError::Decode(index))?;
    for (k, r) in records.iter().enumerate() {
        let first = index == 0 && k == 0;
        match r {
            Record::Init { block_size, .. } => {
                if !first || *block_size as usize != BLOCK_SIZE {
                    return Err(RecordError::Init);
                }
            }
            _ if first => return Err(RecordError::Init),
            Record::Put { path, entry } => {
                check_path(path)?;
                match entry {
                    Entry::Dir => {}
                    Entry::File(f) => f.check()?,
                    Entry::Link(l) => l.check()?,
                    Entry::Directory(d) => d.check()?,
                }
            }
            Record::PutFrom { path, file, from } => {
                check_path(path)?;
                file.check()?;
                check_borrows(from, file.extents.len())?;
            }
            Record::Remove { path } => check_path(path)?,
            Record::Time { .. } | Record::Allow { .. } | Record::Deny { .. } => {}
            Record::Clock { clock } => {
                clock.check()?;
                if records[..k]
                    .iter()
                    .any(|r| matches!(r, Record::Clock { .. }))
                {
                    return Err(RecordError::Clock("two clocks in one block"));
                }
            }
        }
    }
    Ok(records)
}

/// A file record of `size` bytes in one extent from block 0 (tests of records and states).
#[cfg(test)]
pub(crate) fn test_file(size: u64) -> Entry {
    Entry::File(FileInfo {
        size,
        mode: 0o644,
        mtime_secs: 0,
        mtime_nanos: 0,
        hash: [0; 32],
        extents: if size == 0 {
            vec![]
        } else {
            vec![Extent {
                start: 0,
                count: size.div_ceil(BLOCK_SIZE as u64),
            }]
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_paths_are_refused() {
        for p in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/./b",
            "a//b",
            "a/",
            "a\0b",
            "a\\..\\b",
            ".feedsync/meta/header",
            "a/.feedsync/meta/secret_key",
            ".",
            // Case-insensitive file systems, and what some of them ignore or fold.
            ".FEEDSYNC/meta/header",
            "a/.FeedSync/x",
            ".feed\u{200B}sync/x",
            ".feedſync/x",
            ".feedsync./x",
            ".feedsync /x",
        ] {
            assert!(check_path(p).is_err(), "{p:?} accepted");
        }
        for p in [
            "a",
            "a/b c/ü.txt",
            ".hidden",
            "a/.feedsyncx",
            "..x",
            "x..",
            "feedsync",
        ] {
            check_path(p).unwrap();
        }
    }

    use super::test_file as file;

    #[test]
    fn out_of_range_times_are_refused_at_decode() {
        for (secs, nanos) in [(i64::MAX, 1_999_999_999), (0, 1_000_000_000), (i64::MIN, 0)] {
            let Entry::File(mut f) = file(0) else {
                unreachable!()
            };
            (f.mtime_secs, f.mtime_nanos) = (secs, nanos);
            assert!(matches!(f.check(), Err(RecordError::BadTime { .. })));
            // And the arithmetic never panics, checked or not.
            let _ = crate::drive::layout::mtime(&f);
        }
        let Entry::File(mut f) = file(0) else {
            unreachable!()
        };
        (f.mtime_secs, f.mtime_nanos) = (-1_700_000_000, 999_999_999);
        f.check().unwrap();
    }

    #[test]
    fn modes_beyond_the_permission_bits_are_refused_at_decode() {
        for mode in [0o4755, 0o2755, 0o1777, 0o100644, u32::MAX] {
            let Entry::File(mut f) = file(0) else {
                unreachable!()
            };
            f.mode = mode;
            assert_eq!(f.check(), Err(RecordError::BadMode(mode)));
            let block = encode(&[Record::Put {
                path: "x".into(),
                entry: Entry::File(f),
            }]);
            assert!(decode(1, &block).is_err(), "{mode:o} accepted");
        }
        for mode in [0, 0o600, 0o750, 0o777] {
            let Entry::File(mut f) = file(0) else {
                unreachable!()
            };
            f.mode = mode;
            f.check().unwrap();
        }
    }

    #[test]
    fn variant_indices_are_stable() {
        // postcard writes the variant index first: these bytes are on disk in every drive.
        let rm = encode(&[Record::Remove { path: "a".into() }]);
        assert_eq!(rm, [1, 2, 1, b'a']);
        let t = encode(&[Record::Time { millis: 5 }]);
        assert_eq!(t, [1, 3, 5]);
        assert_eq!(decode(1, &t).unwrap(), vec![Record::Time { millis: 5 }]);
        // Entry: Dir 0, File 1, Link 2, Directory 3 (a legacy Dir still decodes).
        let put = |entry| {
            encode(&[Record::Put {
                path: "a".into(),
                entry,
            }])
        };
        assert_eq!(put(Entry::Dir), [1, 1, 1, b'a', 0]);
        assert_eq!(decode(1, &put(Entry::Dir)).unwrap().len(), 1);
        let link = put(Entry::Link(LinkInfo {
            target: "b".into(),
            mtime_secs: 1,
            mtime_nanos: 2,
        }));
        assert_eq!(link, [1, 1, 1, b'a', 2, 1, b'b', 2, 2]);
        let dir = put(Entry::Directory(DirInfo {
            mode: 0o755,
            mtime_secs: 1,
            mtime_nanos: 2,
        }));
        assert_eq!(&dir[..5], [1, 1, 1, b'a', 3]);
        assert_eq!(decode(1, &dir).unwrap().len(), 1);
    }

    #[test]
    fn hostile_link_targets_are_refused_at_decode() {
        let link = |target: String| {
            encode(&[Record::Put {
                path: "l".into(),
                entry: Entry::Link(LinkInfo {
                    target,
                    mtime_secs: 0,
                    mtime_nanos: 0,
                }),
            }])
        };
        for target in [
            "a\0b".to_string(),
            String::new(),
            "x".repeat(MAX_LINK_LEN + 1),
        ] {
            let e = decode(1, &link(target.clone())).unwrap_err();
            assert!(matches!(e, RecordError::BadLink { .. }), "{target:?}: {e}");
        }
        // Out of the folder is fine for a record: it is stored as a link, never followed.
        for target in [
            "/etc/passwd",
            "../../outside",
            "x".repeat(MAX_LINK_LEN).as_str(),
        ] {
            decode(1, &link(target.to_string())).unwrap();
        }
        let dir = encode(&[Record::Put {
            path: "d".into(),
            entry: Entry::Directory(DirInfo {
                mode: 0o4755,
                mtime_secs: 0,
                mtime_nanos: 0,
            }),
        }]);
        assert_eq!(decode(1, &dir), Err(RecordError::BadMode(0o4755)));
    }
}
