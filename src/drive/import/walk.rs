//! Walking the folder through directory handles, with the `.feedsyncignore` rules.
//!
//! Why not the `ignore` crate's walker: it lists and stats by path. Between listing `a` and
//! reading `a/b`, another local user can replace `a` with a symlink to `/root/.ssh`, and a walk
//! by path then lists (and the importer reads, and the node serves) what is there. Here every
//! directory is opened beneath the one listed before it (`openat2`, no symlinks; see
//! [`crate::fsio`]), every entry is stat-ed and opened relative to its directory's handle, and
//! a file is read only if `fstat` of the open file is the inode the walk saw. The `ignore`
//! crate still parses and matches the rules (gitignore syntax, the nearest file deciding): only
//! the rule files' bytes come through the handles too.

use super::{IGNORE_FILE, Importer, ScanError, ScanReport};
use crate::core::replicator::Replicator;
use crate::drive::STATE_DIR;
use crate::drive::import::{Look, dir_entry, link_entry, look};
use crate::drive::record::{Entry, Record, State, check_path};
use crate::fsio::{Dir, Kind, OpenHow, join};
use crate::storage::DiskStorage;
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

/// Directories deeper than this are not entered (each level holds a descriptor while the walk
/// is below it); they are reported as skipped.
const MAX_DEPTH: usize = 256;

/// The largest `.feedsyncignore` read.
const MAX_RULES: u64 = 1 << 20;

/// Whether a name is never imported: our state directory (or a nested drive's, its secret key
/// among it), and temporary files a reader keeps next to their destination
/// (`.NAME.feedsync-*`), which are ours, half-written, and not the user's.
pub fn is_ours(name: &str) -> bool {
    name == STATE_DIR
        || name
            .strip_prefix('.')
            .is_some_and(|n| n.contains(".feedsync-"))
}

/// Parsed `.feedsyncignore` files by directory (relative path, `""` for the root); `None`: the
/// directory has none.
#[derive(Default)]
pub(super) struct Rules(HashMap<String, Option<Gitignore>>);

impl Rules {
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Reads the rules of directory `rel` from its handle `dir`. A rule that does not parse is
    /// dropped (the others still apply) and reported once.
    fn load(&mut self, dir: &dyn Dir, rel: &str) -> Result<(), String> {
        if self.0.contains_key(rel) {
            return Ok(());
        }
        let (rules, result) = match read_rules(dir) {
            Ok(None) => (None, Ok(())),
            Ok(Some(bytes)) => {
                // Matched against paths relative to the rule file's directory.
                let mut b = GitignoreBuilder::new(".");
                let mut first_error = Ok(());
                for line in String::from_utf8_lossy(&bytes).lines() {
                    if let Err(e) = b.add_line(None, line)
                        && first_error.is_ok()
                    {
                        first_error = Err(format!("{IGNORE_FILE}: {e}"));
                    }
                }
                match b.build() {
                    Ok(g) => (Some(g), first_error),
                    Err(e) => (None, Err(format!("{IGNORE_FILE}: {e}"))),
                }
            }
            Err(e) => (None, Err(e.to_string())),
        };
        self.0.insert(rel.to_string(), rules);
        result
    }

    /// Loads the rules of every directory above `rel` (`rel`'s own parent included) through
    /// `root`, for a path named by a change notification.
    pub fn load_above(&mut self, root: &dyn Dir, rel: &str) -> Result<(), String> {
        let mut dir = String::new();
        let parents: Vec<&str> = rel.split('/').collect();
        for (i, c) in parents.iter().enumerate() {
            if !self.0.contains_key(&dir) {
                let handle = root.open_dir(&dir).map_err(|e| e.to_string())?;
                self.load(&*handle, &dir)?;
            }
            if i + 1 < parents.len() {
                dir = join(&dir, c);
            }
        }
        Ok(())
    }

    /// Whether `rel` is excluded: the rule file nearest to it that has an opinion decides (a
    /// `!pattern` deeper down takes back what one above excluded), as git does. Every directory
    /// above `rel` must have been loaded.
    pub fn ignored(&self, rel: &str, is_dir: bool) -> bool {
        let mut dir = rel;
        while let Some(k) = dir.rfind('/') {
            dir = &dir[..k];
            if let Some(m) = self.matched(dir, rel, is_dir) {
                return m;
            }
        }
        self.matched("", rel, is_dir).unwrap_or(false)
    }

    /// What the rules of directory `dir` say about `rel` (below it): ignore, keep, or nothing.
    fn matched(&self, dir: &str, rel: &str, is_dir: bool) -> Option<bool> {
        let g = self.0.get(dir)?.as_ref()?;
        let below = if dir.is_empty() {
            rel
        } else {
            &rel[dir.len() + 1..]
        };
        let m = g.matched(below, is_dir);
        (!m.is_none()).then(|| m.is_ignore())
    }
}

/// The bytes of `dir`'s rule file, if it has one: a regular file (opened like every other,
/// see [`Dir::open`]) of at most [`MAX_RULES`] bytes; anything bigger is another user's way to
/// make every scan allocate without bound.
fn read_rules(dir: &dyn Dir) -> std::io::Result<Option<Vec<u8>>> {
    let f = match dir.open(IGNORE_FILE, OpenHow::READ) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if f.metadata()?.len > MAX_RULES {
        return Err(std::io::Error::other(format!(
            "{IGNORE_FILE} is over {MAX_RULES} bytes (not read)"
        )));
    }
    f.read_all().map(Some)
}

/// What a full scan gathers while it walks.
pub(super) struct Walk<'a> {
    pub state: &'a State,
    pub report: ScanReport,
    pub records: Vec<Record>,
    pub seen: BTreeSet<String>,
    pub root: PathBuf,
}

impl Walk<'_> {
    /// Keeps every recorded path under `rel` (a directory that could not be listed): a
    /// directory we cannot read for a moment is not a directory whose files were deleted.
    fn keep_below(&mut self, rel: &str) {
        let prefix = format!("{rel}/");
        let below = self
            .state
            .entries
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .map(|(p, _)| p.clone());
        self.seen.extend(below);
    }
}

impl Importer {
    /// Whether `dir` is the directory [`Importer::keep_out`] named, whatever it is called now.
    fn kept_out(&self, dir: &dyn Dir) -> bool {
        self.kept_out.is_some_and(|(dev, ino)| {
            dir.self_metadata()
                .is_ok_and(|m| m.dev == dev && m.ino == ino)
        })
    }

    /// Imports the entries of directory `rel` (open as `dir`) and, depth first, everything below.
    pub(super) fn visit(
        &mut self,
        r: &mut Replicator<DiskStorage>,
        w: &mut Walk<'_>,
        dir: &dyn Dir,
        rel: &str,
        depth: usize,
    ) -> Result<(), ScanError> {
        let mut entries = match dir.read_dir("") {
            Ok(e) => e,
            Err(e) => {
                w.report.skipped.push((w.root.join(rel), e.to_string()));
                w.keep_below(rel);
                return Ok(());
            }
        };
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        if let Err(e) = self.rules.load(dir, rel) {
            w.report
                .skipped
                .push((w.root.join(join(rel, IGNORE_FILE)), e));
        }
        for (name, kind) in entries {
            if is_ours(&name) {
                continue;
            }
            let path = join(rel, &name);
            if name.contains(char::REPLACEMENT_CHARACTER) {
                // Listed lossily: the real name is not UTF-8 and cannot be recorded.
                w.report
                    .unshared
                    .push((w.root.join(&path), "name is not UTF-8".into()));
                continue;
            }
            if check_path(&path).is_err() {
                w.report
                    .unshared
                    .push((w.root.join(&path), "unusable name".into()));
                continue;
            }
            if self.rules.ignored(&path, kind == Kind::Dir) {
                continue;
            }
            match kind {
                Kind::Dir => {
                    let sub = dir.open_dir(&name);
                    if let Ok(sub) = &sub
                        && self.kept_out(&**sub)
                    {
                        continue; // our state directory under another name
                    }
                    w.seen.insert(path.clone());
                    // Its mode and mtime from the handle about to be walked (the very
                    // directory), else by name.
                    let meta = match &sub {
                        Ok(sub) => sub.self_metadata().ok(),
                        Err(_) => dir.metadata(&name).ok().flatten(),
                    };
                    let old = w.state.entries.get(&path);
                    if let Some(m) = meta.filter(|m| m.kind == Kind::Dir) {
                        let entry = dir_entry(&m);
                        if old != Some(&entry) {
                            if !old.is_some_and(Entry::is_dir) {
                                w.report.dirs += 1;
                            }
                            w.records.push(Record::Put {
                                path: path.clone(),
                                entry,
                            });
                        }
                    }
                    if depth + 1 > MAX_DEPTH {
                        w.report
                            .skipped
                            .push((w.root.join(&path), "too deeply nested".into()));
                        w.keep_below(&path);
                        continue;
                    }
                    match sub {
                        Ok(sub) => self.visit(r, w, &*sub, &path, depth + 1)?,
                        Err(e) => {
                            // Gone or swapped for a link since the listing: looked at again
                            // by the next scan.
                            w.report.skipped.push((w.root.join(&path), e.to_string()));
                            w.keep_below(&path);
                        }
                    }
                }
                Kind::File => self.visit_file(r, w, dir, &name, path)?,
                Kind::Symlink => match link_entry(dir, &name) {
                    Ok(Some(entry)) => {
                        if w.state.entries.get(&path) != Some(&entry) {
                            w.records.push(Record::Put {
                                path: path.clone(),
                                entry,
                            });
                        }
                        w.seen.insert(path);
                    }
                    Ok(None) => {} // gone or swapped since the listing: the next scan
                    Err(why) => w.report.unshared.push((w.root.join(&path), why)),
                },
                Kind::Other => w.report.unshared.push((
                    w.root.join(&path),
                    "not a regular file, directory or symlink (FIFO, socket, device)".into(),
                )),
            }
        }
        Ok(())
    }

    fn visit_file(
        &mut self,
        r: &mut Replicator<DiskStorage>,
        w: &mut Walk<'_>,
        dir: &dyn Dir,
        name: &str,
        path: String,
    ) -> Result<(), ScanError> {
        let meta = match dir.metadata(name) {
            Ok(Some(m)) if m.kind == Kind::File => m,
            // Vanished or swapped since the listing: the next scan sees what it is now.
            Ok(_) => return Ok(()),
            Err(e) => {
                w.report.skipped.push((w.root.join(&path), e.to_string()));
                w.seen.insert(path);
                return Ok(());
            }
        };
        match look(
            w.state.entries.get(&path),
            &meta,
            self.forced.contains(&path),
        ) {
            Look::Same => {
                w.seen.insert(path);
                return Ok(());
            }
            Look::Mode(info) => {
                w.seen.insert(path.clone());
                w.report.files += 1;
                w.records.push(Record::Put {
                    path,
                    entry: Entry::File(info),
                });
                return Ok(());
            }
            Look::Read => {}
        }
        let imported = match self.import_file(r, dir, name, &path, &meta) {
            Err(ScanError::Read(_, e)) => {
                w.report.skipped.push((w.root.join(&path), e.to_string()));
                w.seen.insert(path);
                return Ok(());
            }
            other => other?,
        };
        w.seen.insert(path.clone());
        match imported {
            Some(info) => {
                w.report.files += 1;
                w.report.bytes += info.size;
                w.records.push(Record::Put {
                    path,
                    entry: Entry::File(info),
                });
            }
            // Keep the previous record until the file settles.
            None => w.report.unstable += 1,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsio::RealDir;

    #[test]
    fn reader_temporaries_and_state_directories_are_ours() {
        for name in [
            ".feedsync",
            ".a.txt.feedsync-1234",
            "..feedsync-x",
            ".b.feedsync-",
        ] {
            assert!(is_ours(name), "{name}");
        }
        for name in [
            "feedsync",
            "a.feedsync-1",
            ".feedsync-x",
            ".feedsyncignore",
            "x",
        ] {
            assert!(!is_ours(name), "{name}");
        }
    }

    #[test]
    fn the_nearest_rule_file_decides() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b")).unwrap();
        std::fs::write(t.path().join(IGNORE_FILE), "*.log\n/top\nbuild/\n").unwrap();
        std::fs::write(t.path().join("a").join(IGNORE_FILE), "!keep.log\n").unwrap();
        let root = RealDir::open_path(t.path()).unwrap();
        let mut rules = Rules::default();
        rules.load_above(&root, "a/b/x").unwrap();
        assert!(rules.ignored("x.log", false));
        assert!(rules.ignored("a/b/x.log", false));
        assert!(
            !rules.ignored("a/keep.log", false),
            "a deeper ! takes it back"
        );
        assert!(!rules.ignored("a/b/keep.log", false));
        assert!(rules.ignored("top", false));
        assert!(!rules.ignored("a/top", false), "anchored to its directory");
        assert!(rules.ignored("a/build", true));
        assert!(
            !rules.ignored("a/build", false),
            "build/ is for directories"
        );
        assert!(!rules.ignored("a/b/x", false));
    }
}
