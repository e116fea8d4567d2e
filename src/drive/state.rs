//! A folder's state replayed from its records, and the caps a version must stay within.
//! Re-exported from [`record`](super::record), where the records are.

use super::record::{Entry, Record, RecordError};
use std::collections::BTreeMap;

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
                // A file or link replacing a directory replaces everything under it.
                if !entry.is_dir() {
                    self.remove_under(&path, undo.as_deref_mut());
                }
                self.set(path, Some(entry), undo);
            }
            Record::Remove { path } => {
                self.remove_under(&path, undo.as_deref_mut());
                self.set(path, None, undo);
            }
            // Read through `merge` only (a one-writer state has no other devices' feeds).
            Record::PutFrom { .. } => return Err(RecordError::TwoWayOnly),
            Record::Time { .. }
            | Record::Clock { .. }
            | Record::Allow { .. }
            | Record::Deny { .. } => {}
        }
        Ok(())
    }

    /// Whether `entry` may go at `path`: no parent of it is a file or a symlink (a path under
    /// a link would be resolved through it), and the caps hold.
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
            if self.entries.get(parent).is_some_and(|e| !e.is_dir()) {
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

    /// A state holding `entries` as they are (a two-way folder's merged tree, checked by the
    /// merge), at `version`.
    pub fn from_entries(entries: BTreeMap<String, Entry>, version: u64) -> Self {
        let bytes = entries
            .values()
            .filter_map(|e| match e {
                Entry::File(f) => Some(f.size),
                _ => None,
            })
            .fold(0u64, u64::saturating_add);
        Self {
            content_key: None,
            entries,
            version,
            bytes,
        }
    }

    /// Files and bytes in this state.
    pub fn totals(&self) -> (u64, u64) {
        self.entries
            .values()
            .filter_map(|e| match e {
                Entry::File(f) => Some(f.size),
                Entry::Dir | Entry::Link(_) | Entry::Directory(_) => None,
            })
            .fold((0, 0), |(n, b), s| (n + 1, b.saturating_add(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drive::record::FileInfo;

    use crate::drive::record::test_file as file;

    fn put(path: &str, entry: Entry) -> Record {
        Record::Put {
            path: path.into(),
            entry,
        }
    }

    /// The fuzz regression `fuzz/regressions/drive_records/totals_overflow`: two files of
    /// 2^64-1 bytes overflowed the byte sum (a panic in debug, a wrap in release).
    #[test]
    fn totals_of_huge_files_saturate() {
        let mut s = State::default();
        s.apply(vec![put("a", file(u64::MAX)), put("b", file(u64::MAX))]);
        assert_eq!(s.totals(), (2, u64::MAX));
        // And such a version is over the default byte cap, refused whole.
        let mut checked = State::default();
        assert!(
            checked
                .apply_checked(
                    vec![put("a", file(u64::MAX)), put("b", file(u64::MAX))],
                    &crate::drive::record::Limits::default()
                )
                .is_err()
        );
        assert!(checked.entries.is_empty());
    }

    #[test]
    fn a_file_replacing_a_directory_removes_its_contents() {
        let mut s = State::default();
        let file = Entry::File(FileInfo {
            size: 0,
            mode: 0o644,
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
    fn nothing_goes_under_a_link_and_a_link_replaces_a_directory_whole() {
        use crate::drive::record::{DirInfo, LinkInfo};
        let limits = Limits::default();
        let link = Entry::Link(LinkInfo {
            target: "/etc".into(),
            mtime_secs: 0,
            mtime_nanos: 0,
        });
        let dir = Entry::Directory(DirInfo {
            mode: 0o755,
            mtime_secs: 0,
            mtime_nanos: 0,
        });
        let mut s = State::default();
        s.apply_checked(vec![put("l", link.clone())], &limits)
            .unwrap();
        let e = s
            .apply_checked(vec![put("l/passwd", file(1))], &limits)
            .unwrap_err();
        assert!(matches!(e, RecordError::Conflict { .. }), "{e}");
        s.apply_checked(vec![put("d", dir), put("d/x", file(1))], &limits)
            .unwrap();
        s.apply_checked(vec![put("d", link)], &limits).unwrap();
        assert_eq!(s.entries.keys().collect::<Vec<_>>(), vec!["d", "l"]);
        assert_eq!(s.totals(), (0, 0));
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
}
