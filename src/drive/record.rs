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
//! refuses versions that carry one.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use thiserror::Error;

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

/// A file or directory as recorded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A directory (recorded so that empty ones exist on the other side).
    Dir,
    /// A regular file.
    File(FileInfo),
}

/// A regular file's metadata and where its bytes are in the content feed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FileInfo {
    /// Length in bytes.
    pub size: u64,
    /// Owner-executable bit.
    pub executable: bool,
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

    /// Checks that the extents describe exactly `size` bytes and stay within sane bounds, and
    /// that the modification time is one a file system can hold.
    pub fn check(&self) -> Result<(), RecordError> {
        if self.mtime_nanos >= 1_000_000_000
            || self.mtime_secs.unsigned_abs() > MAX_MTIME_SECS as u64
        {
            return Err(RecordError::BadTime {
                secs: self.mtime_secs,
                nanos: self.mtime_nanos,
            });
        }
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

/// Caps on what one folder may hold, checked for every version a reader applies: a version
/// that would exceed one is refused whole. They bound what a writer's signed records can make
/// a reader hold in memory and on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Entries (files and directories) in the folder (default 1,000,000).
    pub max_entries: u64,
    /// Components of a path (default 64).
    pub max_depth: u64,
    /// Bytes of all files together (default 16 TiB).
    pub max_total_bytes: u64,
    /// Content blocks of the files being fetched at once (default 2^20 blocks, 64 GiB):
    /// reassembly state follows it. More files wait until these are done; one file larger
    /// than this is still taken on, alone.
    pub max_pending_blocks: u64,
}

impl Limits {
    /// No cap at all (a writer replaying its own versions).
    pub fn unlimited() -> Self {
        Self {
            max_entries: u64::MAX,
            max_depth: u64::MAX,
            max_total_bytes: u64::MAX,
            max_pending_blocks: u64::MAX,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entries: 1_000_000,
            max_depth: 64,
            max_total_bytes: 16 << 40,
            max_pending_blocks: 1 << 20,
        }
    }
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
                if let Entry::File(f) = entry {
                    f.check()?;
                }
            }
            Record::Remove { path } => check_path(path)?,
            Record::Time { .. } => {}
        }
    }
    Ok(records)
}

/// A folder's state: every path and what is there, in path order (parents before children).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// The content feed's public key, once block 0 is applied.
    pub content_key: Option<[u8; 32]>,
    /// Path -> entry.
    pub entries: BTreeMap<String, Entry>,
    /// Number of metadata blocks applied: the version.
    pub version: u64,
    /// Bytes of all files (kept as entries change, so a version's total is checked without a
    /// walk over the folder).
    bytes: u64,
}

/// What [`State::apply_checked`] changed, to put back if the version is refused.
type Undo = Vec<(String, Option<Entry>)>;

impl State {
    /// Applies the records of the next metadata block, unchecked (the writer's own versions,
    /// which come from a real file system).
    pub fn apply(&mut self, records: Vec<Record>) {
        for r in records {
            let _ = self.apply_one(r, None, None);
        }
        self.version += 1;
    }

    /// Applies the records of the next metadata block if the version they make is one a file
    /// system can hold and stays within `limits`; otherwise the state is left as it was and the
    /// version is refused whole. Checked: no path under a file (`a` and `a/b` both files),
    /// path depth, number of entries, total bytes.
    pub fn apply_checked(
        &mut self,
        records: Vec<Record>,
        limits: &Limits,
    ) -> Result<(), RecordError> {
        let (key, bytes) = (self.content_key, self.bytes);
        let mut undo = Undo::new();
        for r in records {
            if let Err(e) = self.apply_one(r, Some(limits), Some(&mut undo)) {
                for (path, old) in undo.into_iter().rev() {
                    match old {
                        Some(e) => self.entries.insert(path, e),
                        None => self.entries.remove(&path),
                    };
                }
                self.content_key = key;
                self.bytes = bytes;
                return Err(e);
            }
        }
        self.version += 1;
        Ok(())
    }

    fn apply_one(
        &mut self,
        r: Record,
        limits: Option<&Limits>,
        mut undo: Option<&mut Undo>,
    ) -> Result<(), RecordError> {
        match r {
            Record::Init { content_key, .. } => self.content_key = Some(content_key),
            Record::Put { path, entry } => {
                if let Some(limits) = limits {
                    self.check_put(&path, &entry, limits)?;
                }
                // A file replacing a directory replaces everything under it.
                if matches!(entry, Entry::File(_)) {
                    self.remove_under(&path, undo.as_deref_mut());
                }
                self.set(path, Some(entry), undo);
            }
            Record::Remove { path } => {
                self.remove_under(&path, undo.as_deref_mut());
                self.set(path, None, undo);
            }
            Record::Time { .. } => {}
        }
        Ok(())
    }

    /// Whether `entry` may go at `path`: no parent of it is a file, and the caps hold.
    fn check_put(&self, path: &str, entry: &Entry, limits: &Limits) -> Result<(), RecordError> {
        let depth = path.split('/').count() as u64;
        if depth > limits.max_depth {
            return Err(RecordError::Limit {
                what: "path depth",
                value: depth,
                limit: limits.max_depth,
            });
        }
        for (i, _) in path.match_indices('/') {
            let parent = &path[..i];
            if let Some(Entry::File(_)) = self.entries.get(parent) {
                return Err(RecordError::Conflict {
                    path: path.chars().take(200).collect(),
                    file: parent.chars().take(200).collect(),
                });
            }
        }
        let new = !self.entries.contains_key(path);
        let entries = self.entries.len() as u64 + u64::from(new);
        if new && entries > limits.max_entries {
            return Err(RecordError::Limit {
                what: "entries",
                value: entries,
                limit: limits.max_entries,
            });
        }
        if let Entry::File(f) = entry {
            let old = match self.entries.get(path) {
                Some(Entry::File(o)) => o.size,
                _ => 0,
            };
            let total = self.bytes.saturating_sub(old).saturating_add(f.size);
            if total > limits.max_total_bytes {
                return Err(RecordError::Limit {
                    what: "total bytes",
                    value: total,
                    limit: limits.max_total_bytes,
                });
            }
        }
        Ok(())
    }

    /// Puts or removes one entry, keeping the byte count and the undo log.
    fn set(&mut self, path: String, entry: Option<Entry>, undo: Option<&mut Undo>) {
        if let Some(Entry::File(f)) = &entry {
            self.bytes = self.bytes.saturating_add(f.size);
        }
        let old = match entry {
            Some(e) => self.entries.insert(path.clone(), e),
            None => self.entries.remove(&path),
        };
        if let Some(Entry::File(f)) = &old {
            self.bytes = self.bytes.saturating_sub(f.size);
        }
        if let Some(undo) = undo {
            undo.push((path, old));
        }
    }

    fn remove_under(&mut self, path: &str, mut undo: Option<&mut Undo>) {
        let prefix = format!("{path}/");
        let under: Vec<String> = self
            .entries
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .map(|(p, _)| p.clone())
            .collect();
        for p in under {
            self.set(p, None, undo.as_deref_mut());
        }
    }

    /// Files and bytes in this state.
    pub fn totals(&self) -> (u64, u64) {
        self.entries
            .values()
            .filter_map(|e| match e {
                Entry::File(f) => Some(f.size),
                Entry::Dir => None,
            })
            .fold((0, 0), |(n, b), s| (n + 1, b.saturating_add(s)))
    }
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

    #[test]
    fn a_file_replacing_a_directory_removes_its_contents() {
        let mut s = State::default();
        let file = Entry::File(FileInfo {
            size: 0,
            executable: false,
            mtime_secs: 0,
            mtime_nanos: 0,
            hash: [0; 32],
            extents: vec![],
        });
        s.apply(vec![
            Record::Put {
                path: "d".into(),
                entry: Entry::Dir,
            },
            Record::Put {
                path: "d/x".into(),
                entry: file.clone(),
            },
            Record::Put {
                path: "d0".into(),
                entry: file.clone(),
            },
        ]);
        s.apply(vec![Record::Put {
            path: "d".into(),
            entry: file.clone(),
        }]);
        assert_eq!(
            s.entries.keys().collect::<Vec<_>>(),
            vec!["d", "d0"],
            "d/x went with its directory, d0 stayed"
        );
    }

    fn file(size: u64) -> Entry {
        Entry::File(FileInfo {
            size,
            executable: false,
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

    fn put(path: &str, entry: Entry) -> Record {
        Record::Put {
            path: path.into(),
            entry,
        }
    }

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
    fn a_version_with_a_path_under_a_file_is_refused_whole() {
        let limits = Limits::default();
        let mut s = State::default();
        s.apply_checked(vec![put("keep", file(10))], &limits)
            .unwrap();
        let before = s.clone();
        let e = s
            .apply_checked(
                vec![put("x", file(1)), put("a", file(1)), put("a/b", file(1))],
                &limits,
            )
            .unwrap_err();
        assert!(matches!(e, RecordError::Conflict { .. }), "{e}");
        assert_eq!(s, before, "nothing of the refused version stays");
        // In the other order it is a file replacing a directory: fine.
        s.apply_checked(vec![put("a/b", file(1)), put("a", file(1))], &limits)
            .unwrap();
        assert_eq!(s.entries.keys().collect::<Vec<_>>(), vec!["a", "keep"]);
        // A directory over a file, then something in it: fine too.
        s.apply_checked(vec![put("a", Entry::Dir), put("a/c", file(1))], &limits)
            .unwrap();
    }

    #[test]
    fn versions_over_the_caps_are_refused_and_leave_the_state_as_it_was() {
        let limits = Limits {
            max_entries: 3,
            max_depth: 2,
            max_total_bytes: 100,
            max_pending_blocks: 1,
        };
        let mut s = State::default();
        s.apply_checked(vec![put("a", file(60)), put("d", Entry::Dir)], &limits)
            .unwrap();
        let before = s.clone();
        let refused = [
            vec![put("d/e/f", file(0))],
            vec![put("b", file(1)), put("c", file(1))],
            vec![Record::Remove { path: "a".into() }, put("b", file(101))],
            vec![put("b", file(41))],
        ];
        for (i, v) in refused.into_iter().enumerate() {
            let e = s.apply_checked(v, &limits).unwrap_err();
            assert!(matches!(e, RecordError::Limit { .. }), "{i}: {e}");
            assert_eq!(s, before, "{i}: refused whole");
        }
        // Replacing a file counts its new size only; removing frees room.
        s.apply_checked(vec![put("a", file(100))], &limits).unwrap();
        s.apply_checked(
            vec![
                Record::Remove { path: "a".into() },
                put("b", file(99)),
                put("d/e", file(1)),
            ],
            &limits,
        )
        .unwrap();
        assert_eq!(s.version, before.version + 2);
    }

    #[test]
    fn variant_indices_are_stable() {
        // postcard writes the variant index first: these bytes are on disk in every drive.
        let rm = encode(&[Record::Remove { path: "a".into() }]);
        assert_eq!(rm, [1, 2, 1, b'a']);
        let t = encode(&[Record::Time { millis: 5 }]);
        assert_eq!(t, [1, 3, 5]);
        assert_eq!(decode(1, &t).unwrap(), vec![Record::Time { millis: 5 }]);
    }
}
