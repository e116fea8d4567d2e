//! The history of a drive, version by version, for `feedsync log`.
//!
//! Read from the metadata store opened read-only ([`DiskStorage::open_read_only`]), so it works
//! while another process serves or clones the folder. Every version is listed (paging is the
//! terminal's job). A version's time is the writer's clock when it committed the version
//! ([`Record::Time`]); versions written before that record existed show none.

use crate::core::Feed;
use crate::drive::record::{self, Entry, Record, State};
use crate::drive::{DriveError, STATE_DIR};
use crate::storage::DiskStorage;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// One version of a drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// The version (1 = the drive's creation).
    pub version: u64,
    /// When the writer committed it, if it recorded that.
    pub time: Option<SystemTime>,
    /// Whether this node holds the version (a clone may not have fetched it yet; nothing after
    /// a version not held can be told).
    pub fetched: bool,
    /// What it changed.
    pub changes: Vec<Change>,
    /// The device that wrote it (#13: each device writes its own feed; this one's key).
    pub device: [u8; 32],
    /// Its version vector: how many versions of each other device its writer had applied
    /// ([`Record::Clock`]; empty for a folder with one writer).
    pub clock: Vec<([u8; 32], u64)>,
}

/// One change of a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new file.
    Add {
        /// Its path.
        path: String,
        /// Its size in bytes.
        size: u64,
    },
    /// A file with new content or metadata.
    Modify {
        /// Its path.
        path: String,
        /// Its new size in bytes.
        size: u64,
    },
    /// A file moved: removed at one path and put at another with the same whole-file hash in
    /// the same version.
    Rename {
        /// The old path.
        from: String,
        /// The new path.
        to: String,
    },
    /// A file removed.
    Remove {
        /// Its path.
        path: String,
    },
    /// A new directory.
    AddDir {
        /// Its path.
        path: String,
    },
    /// A directory removed, with everything under it.
    RemoveDir {
        /// Its path.
        path: String,
    },
    /// A device allowed to write (#13).
    Allow {
        /// Its id.
        device: [u8; 32],
    },
    /// A device denied: only its first `upto` versions count.
    Deny {
        /// Its id.
        device: [u8; 32],
        /// Versions of it that keep counting.
        upto: u64,
    },
}

/// A path as printed for a human: its control characters (ESC, BEL, CR, C1 codes...) escaped
/// as `\u{..}`. A path is the writer's word (only `/`, NUL and backslashes are refused), and
/// printed raw it could drive the terminal of whoever runs `log` (rewrite the screen, set the
/// window title, hide lines).
fn shown(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.chars().any(char::is_control) {
        return path.into();
    }
    path.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Add { path, size } => write!(f, "add     {} ({size} bytes)", shown(path)),
            Self::Modify { path, size } => write!(f, "modify  {} ({size} bytes)", shown(path)),
            Self::Rename { from, to } => write!(f, "rename  {} -> {}", shown(from), shown(to)),
            Self::Remove { path } => write!(f, "remove  {}", shown(path)),
            Self::AddDir { path } => write!(f, "add dir {}/", shown(path)),
            Self::RemoveDir { path } => write!(f, "rm dir  {}/", shown(path)),
            Self::Allow { device } => write!(f, "allow   device {}", crate::util::hex(device)),
            Self::Deny { device, upto } => write!(
                f,
                "deny    device {} (its first {upto} versions stay)",
                crate::util::hex(device)
            ),
        }
    }
}

/// The changes `records` make to `state` (not applied here). A remove and a put of a new
/// path with the same whole-file hash pair up as a rename.
pub fn changes(state: &State, records: &[Record]) -> Vec<Change> {
    let mut out = Vec::new();
    // Removed files by hash, to pair with puts of the same content.
    let mut removed: BTreeMap<[u8; 32], Vec<usize>> = BTreeMap::new();
    for r in records {
        let Record::Remove { path } = r else {
            continue;
        };
        match state.entries.get(path) {
            Some(Entry::File(f)) => {
                removed.entry(f.hash).or_default().push(out.len());
                out.push(Change::Remove { path: path.clone() });
            }
            Some(Entry::Link(_)) => out.push(Change::Remove { path: path.clone() }),
            _ => {}
        }
    }
    for r in records {
        // A file citing other devices' content is, for the log, a file put.
        let put_from;
        let r = match r {
            Record::PutFrom { path, file, .. } => {
                put_from = Record::Put {
                    path: path.clone(),
                    entry: Entry::File(file.clone()),
                };
                &put_from
            }
            r => r,
        };
        match r {
            Record::Init { .. } | Record::Time { .. } | Record::Clock { .. } => {}
            Record::PutFrom { .. } => unreachable!("made a put above"),
            Record::Allow { device } => out.push(Change::Allow { device: *device }),
            Record::Deny { device, upto } => out.push(Change::Deny {
                device: *device,
                upto: *upto,
            }),
            Record::Put {
                path,
                entry: Entry::Dir | Entry::Directory(_),
            } => {
                // A directory's new mode or mtime is no change worth a line.
                if !state.entries.get(path).is_some_and(Entry::is_dir) {
                    out.push(Change::AddDir { path: path.clone() });
                }
            }
            Record::Put {
                path,
                entry: Entry::Link(l),
            } => {
                // A link's size is its target's length, as `ls -l` shows it.
                let size = l.target.len() as u64;
                let path = path.clone();
                out.push(match state.entries.get(&path) {
                    Some(e) if !e.is_dir() => Change::Modify { path, size },
                    _ => Change::Add { path, size },
                });
            }
            Record::Put {
                path,
                entry: Entry::File(f),
            } => match state.entries.get(path) {
                Some(Entry::File(_) | Entry::Link(_)) => out.push(Change::Modify {
                    path: path.clone(),
                    size: f.size,
                }),
                _ => match removed.get_mut(&f.hash).and_then(Vec::pop) {
                    Some(k) => {
                        let Change::Remove { path: from } = &out[k] else {
                            unreachable!("only removes are indexed by hash")
                        };
                        out[k] = Change::Rename {
                            from: from.clone(),
                            to: path.clone(),
                        };
                    }
                    None => out.push(Change::Add {
                        path: path.clone(),
                        size: f.size,
                    }),
                },
            },
            Record::Remove { path } => {
                if state.entries.get(path).is_some_and(Entry::is_dir) {
                    out.push(Change::RemoveDir { path: path.clone() });
                }
            }
        }
    }
    out
}

/// The time a version's records carry, if any.
pub fn time(records: &[Record]) -> Option<SystemTime> {
    records.iter().find_map(|r| match r {
        // Checked: the writer's clock is its own business, never a panic here.
        Record::Time { millis } => {
            SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(*millis))
        }
        _ => None,
    })
}

/// Every version of the drive in `root`, read without the writer's lock: the folder's feed,
/// then (a two-way folder, #13) every other device's feed this node holds, all in the order
/// their writers committed them (each entry's `version` is its position in its device's feed).
pub fn read(root: &Path) -> Result<Vec<LogEntry>, DriveError> {
    let root = std::fs::canonicalize(root).map_err(|error| DriveError::Missing {
        path: root.to_path_buf(),
        error,
    })?;
    let state_dir = root.join(STATE_DIR);
    let dir = state_dir.join("meta");
    if !dir.join("header").exists() {
        return Err(DriveError::NotADrive(root));
    }
    let mut out = read_feed(&dir, true)?;
    let mut others = vec![state_dir.join("device-meta")];
    if let Ok(list) = std::fs::read_dir(state_dir.join("devices")) {
        let mut names: Vec<_> = list.filter_map(Result::ok).map(|e| e.path()).collect();
        names.sort();
        others.extend(
            names
                .into_iter()
                .take(crate::drive::merge::MAX_DEVICES)
                .map(|d| d.join("meta")),
        );
    }
    let several = others.iter().any(|d| d.join("header").exists());
    for d in others {
        if d.join("header").exists() {
            // Another device's feed that does not read is left out, not the whole log.
            out.extend(read_feed(&d, false).unwrap_or_default());
        }
    }
    if several {
        // One history: by commit time (the writers' clocks), then device and position.
        out.sort_by_key(|e| (e.time, e.device, e.version));
    }
    Ok(out)
}

/// The versions of the metadata feed stored in `dir`. `strict`: a version that does not
/// decode is an error (the folder's own feed); otherwise the listing stops there.
fn read_feed(dir: &Path, strict: bool) -> Result<Vec<LogEntry>, DriveError> {
    let mut meta = Feed::open(DiskStorage::open_read_only(dir)?)?;
    let device = meta.public_key();
    let mut state = State::default();
    let mut out = Vec::new();
    let mut known = true;
    for i in 0..meta.len() {
        let block = if known && meta.has(i) {
            // A block damaged on disk is as good as not held: the reader fetches it again.
            meta.get(i).ok()
        } else {
            None
        };
        let Some(block) = block else {
            known = false;
            out.push(LogEntry {
                version: i + 1,
                time: None,
                fetched: false,
                changes: Vec::new(),
                device,
                clock: Vec::new(),
            });
            continue;
        };
        let recs = match record::decode(i, &block) {
            Ok(recs) => recs,
            Err(e) if strict => return Err(DriveError::Record(i + 1, e)),
            Err(_) => break,
        };
        let clock = recs
            .iter()
            .find_map(|r| match r {
                Record::Clock { clock } => Some(clock.entries().to_vec()),
                _ => None,
            })
            .unwrap_or_default();
        out.push(LogEntry {
            version: i + 1,
            time: time(&recs),
            fetched: true,
            changes: changes(&state, &recs),
            device,
            clock,
        });
        // A file citing other devices' content is, for this device's own history, a put.
        let recs = recs
            .into_iter()
            .map(|r| match r {
                Record::PutFrom { path, file, .. } => Record::Put {
                    path,
                    entry: Entry::File(file),
                },
                r => r,
            })
            .collect();
        state.apply(recs);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drive::record::FileInfo;

    #[test]
    fn control_characters_in_a_hostile_path_are_printed_escaped() {
        let path = "a\u{1b}]0;owned\u{7}\u{1b}[2J\r\u{9b}b/é".to_string();
        let lines = [
            Change::Add {
                path: path.clone(),
                size: 1,
            },
            Change::Rename {
                from: path.clone(),
                to: path.clone(),
            },
            Change::RemoveDir { path },
        ]
        .map(|c| c.to_string());
        for line in &lines {
            assert!(!line.chars().any(char::is_control), "{line:?}");
        }
        assert_eq!(
            lines[0],
            "add     a\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\u{d}\\u{9b}b/é (1 bytes)"
        );
    }

    fn file(tag: u8, size: u64) -> Entry {
        Entry::File(FileInfo {
            size,
            mode: 0o644,
            mtime_secs: 0,
            mtime_nanos: 0,
            hash: [tag; 32],
            extents: vec![],
        })
    }

    fn put(path: &str, entry: Entry) -> Record {
        Record::Put {
            path: path.into(),
            entry,
        }
    }

    #[test]
    fn adds_modifies_renames_and_removes_are_told_apart() {
        let mut s = State::default();
        s.apply(vec![
            put("a", file(1, 0)),
            put("b", file(2, 0)),
            put("c", file(3, 0)),
            put("d", Entry::Dir),
            put("d/x", file(4, 0)),
        ]);
        let recs = vec![
            Record::Time { millis: 1_000 },
            Record::Remove { path: "a".into() },
            put("moved", file(1, 0)),
            put("b", file(5, 0)),
            Record::Remove { path: "c".into() },
            Record::Remove { path: "d".into() },
            put("e", Entry::Dir),
            put("new", file(6, 0)),
        ];
        assert_eq!(
            changes(&s, &recs),
            vec![
                Change::Rename {
                    from: "a".into(),
                    to: "moved".into()
                },
                Change::Remove { path: "c".into() },
                Change::Modify {
                    path: "b".into(),
                    size: 0
                },
                Change::RemoveDir { path: "d".into() },
                Change::AddDir { path: "e".into() },
                Change::Add {
                    path: "new".into(),
                    size: 0
                },
            ]
        );
        assert_eq!(
            time(&recs),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1))
        );
        assert_eq!(time(&recs[1..]), None, "an old version has no time");
    }
}
