//! The reader's reconcile step as a pure function: from the version the folder is at, the
//! version to reach, what this reader wrote (its [`Ledger`]) and what this node holds, to a
//! [`Plan`] of file-system work. No files are touched here; `reader.rs` carries the plan out in
//! its order (fetch and reuse, then removals, then directories), which is what makes a rename
//! reuse the old file's bytes.
//!
//! What to remove comes from the ledger, not from the versions in between: a reader that
//! skipped versions never saw the record of what it last wrote at a path, but its ledger did.
//! Whether a file removed is still ours to delete is decided when the plan is carried out,
//! against the file on disk.

use crate::drive::layout::{key, split};
use crate::drive::ledger::Ledger;
use crate::drive::record::{Entry, FileInfo, LinkInfo};
use std::collections::{BTreeMap, BTreeSet};

/// A file the layout knows at a path (its current slot there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local<'a> {
    /// The version of the file the slot is for.
    pub info: &'a FileInfo,
    /// Whether that file is in place (published or found on disk), not still being fetched.
    pub in_place: bool,
}

/// A file to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    /// Its path.
    pub path: String,
    /// The version to fetch.
    pub info: FileInfo,
    /// Its content blocks this node already holds (each once, ascending): copied in from
    /// local files, checked against their leaf hash, instead of fetched.
    pub reuse: Vec<u64>,
}

/// A file to remove: deleted only if the ledger says this reader wrote it and nobody changed
/// it since; otherwise it is left in place and reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    /// Its path.
    pub path: String,
}

/// What to do to bring the folder from one version to another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Files that become pending, in path order.
    pub fetch: Vec<Fetch>,
    /// Files that go (not those replaced by a newer version: the old file stays readable
    /// until the new one is renamed over it).
    pub remove: Vec<Removal>,
    /// Directories this reader made that the target no longer has, deepest first (each
    /// removed only if empty).
    pub remove_dirs: Vec<String>,
    /// Every directory of the target, parents first (made if missing).
    pub make_dirs: Vec<String>,
    /// The symlinks of the target that are new or changed since the folder's version, or not
    /// made yet, in path order (made, or replaced if this reader made the one there, when it
    /// does not hold the target already).
    pub links: Vec<(String, LinkInfo)>,
    /// Files of the target whose extents go beyond the content feed's verified length: not
    /// taken on (nothing is set up for them) until the content feed's signed length covers
    /// them. Each with the first block it lacks.
    pub waiting: Vec<(String, u64)>,
}

/// Plans the way from `previous` (the version the folder is at) to `target`, given what this
/// reader wrote (`ledger`), the files the layout knows (`local`: path -> its current slot) and
/// the content blocks held (`held`, by layout key). Files of versions in between that `target`
/// no longer has are removed too: without that a clone would wait for them forever. A file
/// reaching past `content_len(tag)` (the verified length of the content feed with that tag;
/// see [`layout::key`](crate::drive::layout::key)) waits: a record's block numbers are
/// trusted only as far as the signed content goes.
pub fn plan(
    previous: &BTreeMap<String, Entry>,
    target: &BTreeMap<String, Entry>,
    ledger: &Ledger,
    local: &BTreeMap<&str, Local<'_>>,
    content_len: impl Fn(u16) -> u64,
    held: impl Fn(u64) -> bool,
) -> Plan {
    let mut gone: Vec<String> = Vec::new();
    for (path, old) in previous {
        if target.get(path) == Some(old) {
            continue;
        }
        if matches!(old, Entry::File(_) | Entry::Link(_)) {
            gone.push(path.clone());
        }
    }
    let mut remove_dirs: Vec<String> = ledger
        .dirs
        .iter()
        .filter(|d| !target.get(*d).is_some_and(Entry::is_dir))
        .cloned()
        .collect();
    for (&path, l) in local {
        let wanted = matches!(target.get(path), Some(Entry::File(i)) if i == l.info);
        // Already in `gone` exactly when the loop above put it there (one lookup, not a scan
        // of `gone`: a version removing 100k files met 100k local files).
        let from_previous = matches!(previous.get(path), Some(old @ Entry::File(_)) if target.get(path) != Some(old));
        if !wanted && !from_previous {
            gone.push(path.to_owned());
        }
    }
    let mut fetch = Vec::new();
    let mut waiting = Vec::new();
    let mut make_dirs = Vec::new();
    let mut links = Vec::new();
    for (path, e) in target {
        let info = match e {
            Entry::Dir | Entry::Directory(_) => {
                make_dirs.push(path.clone());
                continue;
            }
            Entry::Link(link) => {
                // Made already (the folder's version has it, and the ledger says this reader
                // made it): nothing to look at again on every version.
                if previous.get(path) != Some(e) || !ledger.files.contains_key(path) {
                    links.push((path.clone(), link.clone()));
                }
                continue;
            }
            Entry::File(info) => info,
        };
        if local.get(path.as_str()).is_some_and(|l| l.info == info) {
            continue;
        }
        let lacks = info
            .extents
            .iter()
            .filter_map(|e| {
                let (tag, start) = split(e.start);
                let len = content_len(tag);
                (start.saturating_add(e.count) > len).then(|| key(tag, start.max(len)))
            })
            .min();
        if let Some(block) = lacks {
            waiting.push((path.clone(), block));
            continue;
        }
        // Only the blocks held are collected: memory follows what is here.
        let reuse: BTreeSet<u64> = info.block_at().filter(|&b| held(b)).collect();
        fetch.push(Fetch {
            path: path.clone(),
            info: info.clone(),
            reuse: reuse.into_iter().collect(),
        });
    }
    // Every file (or link) this reader wrote that the target has no file or link at, whatever
    // the versions in between said (one replaced by the other is replaced, not removed).
    let no_file =
        |path: &String| !matches!(target.get(path), Some(Entry::File(_) | Entry::Link(_)));
    let mut remove: BTreeSet<String> = gone.into_iter().filter(no_file).collect();
    remove.extend(ledger.files.keys().filter(|p| no_file(p)).cloned());
    let remove = remove.into_iter().map(|path| Removal { path }).collect();
    remove_dirs.sort_by_key(|d| std::cmp::Reverse(d.len()));
    Plan {
        fetch,
        remove,
        remove_dirs,
        make_dirs,
        links,
        waiting,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drive::record::Extent;

    fn file(start: u64, count: u64, tag: u8) -> FileInfo {
        FileInfo {
            size: count * crate::drive::record::BLOCK_SIZE as u64,
            mode: 0o644,
            mtime_secs: i64::from(tag),
            mtime_nanos: 0,
            hash: [tag; 32],
            extents: vec![Extent { start, count }],
        }
    }

    fn map(entries: &[(&str, Entry)]) -> BTreeMap<String, Entry> {
        entries
            .iter()
            .map(|(p, e)| (p.to_string(), e.clone()))
            .collect()
    }

    fn in_place(state: &BTreeMap<String, Entry>) -> BTreeMap<&str, Local<'_>> {
        state
            .iter()
            .filter_map(|(p, e)| match e {
                Entry::File(info) => Some((
                    p.as_str(),
                    Local {
                        info,
                        in_place: true,
                    },
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_rename_fetches_nothing_new_and_removes_the_old_name() {
        let a = file(0, 3, 1);
        let prev = map(&[("a", Entry::File(a.clone()))]);
        let next = map(&[("b", Entry::File(a.clone()))]);
        let p = plan(
            &prev,
            &next,
            &Ledger::default(),
            &in_place(&prev),
            |_| u64::MAX,
            |b| b < 3,
        );
        assert_eq!(
            p.fetch,
            vec![Fetch {
                path: "b".into(),
                info: a.clone(),
                reuse: vec![0, 1, 2]
            }]
        );
        assert_eq!(p.remove, vec![Removal { path: "a".into() }]);
    }

    #[test]
    fn unchanged_files_are_left_alone_and_replaced_ones_are_not_removed() {
        let a = file(0, 2, 1);
        let b = file(2, 1, 2);
        let b2 = file(3, 1, 3);
        let prev = map(&[("a", Entry::File(a.clone())), ("b", Entry::File(b))]);
        let next = map(&[("a", Entry::File(a)), ("b", Entry::File(b2.clone()))]);
        let p = plan(
            &prev,
            &next,
            &Ledger::default(),
            &in_place(&prev),
            |_| u64::MAX,
            |b| b < 3,
        );
        assert_eq!(
            p.fetch,
            vec![Fetch {
                path: "b".into(),
                info: b2,
                reuse: vec![]
            }]
        );
        assert!(p.remove.is_empty(), "b is replaced by rename, not removed");
    }

    #[test]
    fn directories_go_deepest_first_and_come_parents_first() {
        let prev = map(&[
            ("d", Entry::Dir),
            ("d/e", Entry::Dir),
            ("d/e/f", Entry::Dir),
        ]);
        let next = map(&[("x", Entry::Dir), ("x/y", Entry::Dir)]);
        // Only directories this reader made go.
        let p = plan(
            &prev,
            &next,
            &Ledger::default(),
            &BTreeMap::new(),
            |_| u64::MAX,
            |_| false,
        );
        assert!(p.remove_dirs.is_empty(), "not made here: left alone");
        let made = Ledger {
            dirs: ["d", "d/e", "d/e/f", "x"].map(String::from).into(),
            ..Ledger::default()
        };
        let p = plan(
            &prev,
            &next,
            &made,
            &BTreeMap::new(),
            |_| u64::MAX,
            |_| false,
        );
        assert_eq!(p.remove_dirs, vec!["d/e/f", "d/e", "d"]);
        assert_eq!(p.make_dirs, vec!["x", "x/y"]);
    }

    #[test]
    fn a_file_of_a_version_in_between_is_removed() {
        // The folder is at an empty version; a file of a newer version was fetched, and the
        // newest version removed it again.
        let mid = file(0, 1, 9);
        let local = BTreeMap::from([(
            "m",
            Local {
                info: &mid,
                in_place: false,
            },
        )]);
        let p = plan(
            &BTreeMap::new(),
            &BTreeMap::new(),
            &Ledger::default(),
            &local,
            |_| u64::MAX,
            |_| true,
        );
        assert_eq!(p.remove, vec![Removal { path: "m".into() }]);
        assert!(p.fetch.is_empty());
    }

    #[test]
    fn a_file_already_pending_for_the_target_is_not_fetched_again() {
        let a = file(0, 2, 1);
        let next = map(&[("a", Entry::File(a.clone()))]);
        let local = BTreeMap::from([(
            "a",
            Local {
                info: &a,
                in_place: false,
            },
        )]);
        let p = plan(
            &BTreeMap::new(),
            &next,
            &Ledger::default(),
            &local,
            |_| u64::MAX,
            |_| false,
        );
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn a_file_beyond_the_signed_content_waits_and_sets_nothing_up() {
        // Block 2^48-1 of a feed 4 blocks long: not fetched, no reuse set built for it.
        let far = file((1 << 48) - 1, 1, 1);
        let near = file(0, 2, 2);
        let next = map(&[("far", Entry::File(far)), ("near", Entry::File(near))]);
        let p = plan(
            &BTreeMap::new(),
            &next,
            &Ledger::default(),
            &BTreeMap::new(),
            |_| 4,
            |_| false,
        );
        assert_eq!(p.waiting, vec![("far".to_string(), (1 << 48) - 1)]);
        assert_eq!(p.fetch.len(), 1);
        assert_eq!(p.fetch[0].path, "near");
        let p = plan(
            &BTreeMap::new(),
            &next,
            &Ledger::default(),
            &BTreeMap::new(),
            |_| 1,
            |_| false,
        );
        assert_eq!(p.waiting.len(), 2, "near reaches block 1 of a feed 1 long");
    }

    #[test]
    fn repeated_blocks_are_reused_once() {
        let mut f = file(0, 1, 1);
        f.extents = vec![Extent { start: 4, count: 1 }, Extent { start: 4, count: 1 }];
        f.size *= 2;
        let next = map(&[("z", Entry::File(f))]);
        let p = plan(
            &BTreeMap::new(),
            &next,
            &Ledger::default(),
            &BTreeMap::new(),
            |_| u64::MAX,
            |_| true,
        );
        assert_eq!(p.fetch[0].reuse, vec![4]);
    }
}

#[cfg(test)]
mod link_tests {
    use super::*;
    use crate::drive::ledger::Written;

    fn link(target: &str) -> Entry {
        Entry::Link(LinkInfo {
            target: target.into(),
            mtime_secs: 0,
            mtime_nanos: 0,
        })
    }

    #[test]
    fn links_are_made_when_new_changed_or_missing_and_replaced_not_removed() {
        let prev = BTreeMap::from([
            ("same".to_string(), link("a")),
            ("changed".to_string(), link("b")),
            ("gone".to_string(), link("c")),
            ("to_file".to_string(), link("d")),
        ]);
        let target = BTreeMap::from([
            ("same".to_string(), link("a")),
            ("changed".to_string(), link("b2")),
            ("new".to_string(), link("/etc/passwd")),
            ("to_file".to_string(), crate::drive::record::test_file(0)),
        ]);
        let written = Written {
            size: 1,
            mtime: (0, 0),
            ctime: (0, 0),
            mode: 0o777,
            ino: 1,
            dev: 1,
            hash: [0; 32],
        };
        let mut ledger = Ledger::default();
        for p in ["same", "changed", "gone", "to_file"] {
            ledger.files.insert(p.into(), written.clone());
        }
        let p = plan(
            &prev,
            &target,
            &ledger,
            &BTreeMap::new(),
            |_| u64::MAX,
            |_| false,
        );
        let paths: Vec<&str> = p.links.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            ["changed", "new"],
            "an unchanged link made here is left alone"
        );
        // Only the link with nothing at its path any more is removed; the one that became a
        // file is replaced by the publish.
        assert_eq!(
            p.remove,
            vec![Removal {
                path: "gone".into()
            }]
        );
        // Not made here (a failed attempt, a restart before the ledger): made.
        ledger.files.remove("same");
        let p = plan(
            &prev,
            &target,
            &ledger,
            &BTreeMap::new(),
            |_| u64::MAX,
            |_| false,
        );
        assert_eq!(p.links.len(), 3);
    }
}

#[cfg(test)]
mod ledger_tests {
    use super::*;
    use crate::drive::ledger::Written;

    fn written(tag: u8) -> Written {
        Written {
            size: 1,
            mtime: (i64::from(tag), 0),
            ctime: (0, 0),
            mode: 0o644,
            ino: u64::from(tag),
            dev: 1,
            hash: [tag; 32],
        }
    }

    #[test]
    fn what_this_reader_wrote_is_removed_whatever_versions_it_skipped() {
        // Published at version N (the folder's version stayed older: nothing in `previous`),
        // changed by the writer at N+2 (never seen here), removed at N+3: the target has
        // nothing there, and the ledger says this reader wrote it.
        let ledger = Ledger {
            files: [("f".to_string(), written(1))].into(),
            dirs: ["d".to_string()].into(),
            ..Ledger::default()
        };
        let p = plan(
            &BTreeMap::new(),
            &BTreeMap::new(),
            &ledger,
            &BTreeMap::new(),
            |_| u64::MAX,
            |_| false,
        );
        assert_eq!(p.remove, vec![Removal { path: "f".into() }]);
        assert_eq!(p.remove_dirs, vec!["d"]);
        // Still a file in the target: replaced by publishing, not removed.
        let target = BTreeMap::from([("f".to_string(), crate::drive::record::test_file(1))]);
        let p = plan(
            &BTreeMap::new(),
            &target,
            &ledger,
            &BTreeMap::new(),
            |_| u64::MAX,
            |_| false,
        );
        assert!(p.remove.is_empty());
    }
}
